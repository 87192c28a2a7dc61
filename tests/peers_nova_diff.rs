//! Differential against the real Nova metadata API (nova 34, `scripts/peers/`).
//!
//! Opt-in: runs only with `METAPROXY_PEERS=1` (`scripts/peers/up.sh && .
//! /tmp/metaproxy-peers/env`), otherwise prints SKIPPED and passes. With the
//! variable set, a missing fixture is a failure.
//!
//! The fixture names the four instances `scripts/peers/nova.sh` created in
//! Nova with Nova's own objects. This test writes the same instances into an
//! inventory (uuid, display name, hostname, project, AZ, key, user data,
//! metadata, launch index, flavor, root device, port / network / subnet), with
//! the EC2 ids Nova derives from its database rows (`i-%08x` of the instance's
//! DB id, `ami-%08x` of the image mapping, the reservation id) read from Nova
//! first, starts `metaproxy api` with the same shared secret and the same
//! static vendor JSON file, and sends every request cloud-init makes (the
//! OpenStack reader's files at 2018-08-27 and latest, the EC2 crawl of
//! `2009-04-04/meta-data/` and `latest/meta-data/` walked recursively from
//! Nova's own listings, user-data, public keys) plus `/`, `/ec2`, listings,
//! path-normalisation variants, unknown paths and identity errors, signed
//! identically, to both. A 200 must match in status, `Content-Type` and body
//! (`random_seed` masked); an error must match in status (Nova's error bodies
//! depend on `Accept` and are HTML/JSON/plain text).
//!
//! Deliberate differences, asserted as such rather than skipped:
//! - one extra segment below a leaf (`/latest/meta-data/hostname/x`): Nova
//!   raises `TypeError` and answers 500, metaproxy answers 404 (spec §1.6).

mod common;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::free_port;
use common::nova_peers::{
    assert_same, compare_everything, instances, peers, request, who, Api, NOVA_DNS, VENDOR_JSON,
};

/// The inventory with the fixture's instances, as Nova holds them.
fn inventory(fx: &Value, ec2: &[(String, Ec2Ids)]) -> String {
    let mut t = String::from("# written by tests/peers_nova_diff.rs from the peers fixture\ndhcp_domain = \"novalocal\"\n");
    for (name, net) in fx["networks"].as_object().unwrap() {
        let _ = write!(
            t,
            "\n[[network]]\nid = {id}\nname = {name:?}\nproject = {proj}\nmtu = 1500\n\n[[network.subnet]]\n\
             id = {sub}\ncidr = {cidr}\ngateway = {gw}\ndns = [{NOVA_DNS:?}]\n\
             # populate_nova.py's network_info has no dhcp_server: Nova renders static ipv4.\ndhcp = false\n",
            id = net["id"],
            proj = net["project_id"],
            sub = net["subnet_id"],
            cidr = net["cidr"],
            gw = net["gateway_ip"],
        );
    }
    for r in fx["routers"].as_object().unwrap().values() {
        let _ = write!(
            t,
            "\n[[router]]\nid = {}\nnetworks = {}\n",
            r["id"], r["network_ids"]
        );
    }
    for (name, vm) in fx["instances"].as_object().unwrap() {
        let nv = &vm["nova"];
        let ids = &ec2.iter().find(|(n, _)| n == name).unwrap().1;
        let _ = write!(
            t,
            "\n[[instance]]\nuuid = {uuid}\nname = {display}\nhostname = {host}\nproject = {proj}\n\
             availability_zone = {az}\nlaunch_index = 0\nflavor = \"m1.peer\"\nec2_id = {ec2}\n\
             image_ec2_id = {ami}\nreservation_id = {rid:?}\nroot_device_name = \"/dev/vda\"\n\
             security_groups = [\"default\"]\n",
            uuid = vm["uuid"],
            display = nv["display_name"],
            host = nv["hostname"],
            proj = vm["project_id"],
            az = nv["availability_zone"],
            ec2 = ids.instance,
            ami = ids.image,
            rid = ids.reservation,
        );
        if let Some(ud) = nv["user_data"].as_str() {
            let _ = writeln!(t, "user_data = {}", Value::from(ud));
        }
        let meta: Vec<String> = nv["metadata"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| format!("{} = {v}", Value::from(k.as_str())))
            .collect();
        let _ = writeln!(t, "meta = {{ {} }}", meta.join(", "));
        if let Some(key) = nv["key_name"].as_str() {
            let _ = write!(
                t,
                "\n[[instance.key]]\nname = {}\ntype = \"ssh\"\ndata = {}\n",
                Value::from(key),
                nv["public_key"]
            );
        }
        let _ = write!(
            t,
            "\n[[instance.port]]\nid = {}\nnetwork = {}\nmac = {}\nfixed_ips = [{}]\nvif_type = \"ovs\"\n",
            vm["port_id"], vm["network_id"], vm["mac_address"], vm["ip_address"]
        );
    }
    t
}

/// What Nova derives from its database rows.
struct Ec2Ids {
    instance: u32,
    image: u32,
    reservation: String,
}

fn parse_hex_id(s: &str, prefix: &str) -> u32 {
    u32::from_str_radix(
        s.strip_prefix(prefix)
            .unwrap_or_else(|| panic!("{s:?} lacks {prefix}")),
        16,
    )
    .unwrap()
}

fn start_api(dir: &Path, secret: &str, inventory: &str) -> (Api, SocketAddr) {
    let port = free_port();
    let inv = dir.join("inventory.toml");
    std::fs::write(&inv, inventory).unwrap();
    let cfg = dir.join("api.toml");
    std::fs::write(
        &cfg,
        format!(
            "[api]\nlisten = \"127.0.0.1:{port}\"\nmetadata_proxy_shared_secret = {secret}\ninventory = {inv:?}\n\
             state_dir = {state:?}\nvendor_data_json = {VENDOR_JSON:?}\n",
            secret = Value::from(secret),
            state = dir.join("state"),
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_metaproxy"))
        .args(["api", "--config"])
        .arg(&cfg)
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let api = Api(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let t0 = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "metaproxy api did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (api, addr)
}

#[test]
fn metaproxy_api_answers_what_nova_answers() {
    let Some(p) = peers("peers_nova_diff") else {
        return;
    };
    let fx = &p.fixture;
    let instances = instances(&p);
    assert!(!instances.is_empty(), "fixture has no instances");
    let who = |vm: &Value| who(&p, vm);

    // Nova's EC2 ids come from its DB rows: ask Nova, then give ours the same.
    let ec2: Vec<(String, Ec2Ids)> = instances
        .iter()
        .map(|(name, vm)| {
            let h = who(vm).headers();
            let get = |key: &str| {
                let r = request(p.nova, "GET", &format!("/2009-04-04/meta-data/{key}"), &h);
                assert_eq!(r.status, 200, "nova {key} for {name}: {}", r.text());
                r.text()
            };
            let ids = Ec2Ids {
                instance: parse_hex_id(&get("instance-id"), "i-"),
                image: parse_hex_id(&get("ami-id"), "ami-"),
                reservation: get("reservation-id"),
            };
            (name.clone(), ids)
        })
        .collect();

    let dir = tempfile::tempdir().unwrap();
    let (_api, ours) = start_api(dir.path(), &p.secret, &inventory(fx, &ec2));
    let d = compare_everything(&p, ours);
    assert_same("peers_nova_diff", &p, &d);
}
