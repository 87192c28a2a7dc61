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

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use common::{free_port, Resp};

/// cloud-init's OpenStack reader picks the newest version it knows (Rocky).
const CLOUD_INIT_OS_VERSION: &str = "2018-08-27";
const VENDOR_JSON: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/scripts/peers/nova/vendor_data.json"
);
/// Nova (SQLite, one gunicorn worker) can be slow on a busy machine.
const NOVA_TIMEOUT: Duration = Duration::from_secs(30);
/// The DNS server `scripts/peers/nova/populate_nova.py` puts in every subnet.
const NOVA_DNS: &str = "10.0.0.53";

struct Peers {
    fixture: Value,
    nova: SocketAddr,
    secret: String,
}

/// `None` (after printing SKIPPED) unless `METAPROXY_PEERS=1`.
fn peers() -> Option<Peers> {
    if std::env::var("METAPROXY_PEERS").as_deref() != Ok("1") {
        println!("SKIPPED peers_nova_diff: METAPROXY_PEERS not set (scripts/peers/up.sh, then . /tmp/metaproxy-peers/env)");
        return None;
    }
    let path = std::env::var("METAPROXY_PEERS_FIXTURE")
        .unwrap_or_else(|_| "/tmp/metaproxy-peers/fixture.json".into());
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("METAPROXY_PEERS=1 but the fixture {path} is unreadable: {e}"));
    let fixture: Value = serde_json::from_str(&text).unwrap();
    let url = std::env::var("METAPROXY_PEERS_NOVA_URL")
        .unwrap_or_else(|_| fixture["nova_url"].as_str().unwrap().to_owned());
    let nova = url
        .strip_prefix("http://")
        .unwrap_or(&url)
        .trim_end_matches('/')
        .parse()
        .unwrap_or_else(|e| panic!("nova url {url}: {e}"));
    let secret = std::env::var("METAPROXY_PEERS_SECRET")
        .unwrap_or_else(|_| fixture["shared_secret"].as_str().unwrap().to_owned());
    Some(Peers {
        fixture,
        nova,
        secret,
    })
}

fn sign(secret: &str, id: &str) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    m.update(id.as_bytes());
    m.finalize()
        .into_bytes()
        .iter()
        .fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The identity headers Neutron's agent sends.
#[derive(Clone)]
struct Who {
    instance: String,
    tenant: String,
    signature: String,
    forwarded_for: String,
}

impl Who {
    fn headers(&self) -> String {
        format!(
            "X-Forwarded-For: {}\r\nX-Instance-ID: {}\r\nX-Tenant-ID: {}\r\nX-Instance-ID-Signature: {}\r\n",
            self.forwarded_for, self.instance, self.tenant, self.signature
        )
    }
}

fn request(to: SocketAddr, method: &str, path: &str, headers: &str) -> Resp {
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{headers}Connection: close\r\n\r\n"
    );
    let t0 = Instant::now();
    loop {
        match common::get(to, &raw) {
            Ok(r) => return r,
            // gunicorn may drop a connection under load; one more try is what
            // a pooling client does too.
            Err(e) if t0.elapsed() < NOVA_TIMEOUT => {
                eprintln!("retrying {method} {path} to {to}: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("{method} {path} to {to}: {e}"),
        }
    }
}

/// `random_seed` is 512 fresh random bytes per response: replace its value.
fn mask_seed(body: &[u8]) -> Vec<u8> {
    const KEY: &[u8] = b"\"random_seed\": \"";
    let Some(at) = body.windows(KEY.len()).position(|w| w == KEY) else {
        return body.to_vec();
    };
    let start = at + KEY.len();
    let len = body[start..]
        .iter()
        .position(|&b| b == b'"')
        .expect("unterminated random_seed");
    let mut out = body[..start].to_vec();
    out.extend_from_slice(b"<masked>");
    out.extend_from_slice(&body[start + len..]);
    out
}

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

struct Api(Child);
impl Drop for Api {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
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

/// Compares one request on both servers; collects mismatches.
struct Diff {
    nova: SocketAddr,
    ours: SocketAddr,
    compared: usize,
    mismatches: Vec<String>,
}

impl Diff {
    /// Send to both; on a 200 compare `Content-Type` and body too. Returns Nova's answer.
    fn check(&mut self, method: &str, path: &str, headers: &str, label: &str) -> Resp {
        let n = request(self.nova, method, path, headers);
        let o = request(self.ours, method, path, headers);
        self.compared += 1;
        let what = format!("{label}: {method} {path}");
        if n.status != o.status {
            self.mismatches.push(format!(
                "{what}: status nova {} ours {}",
                n.status, o.status
            ));
        } else if n.status == 200 {
            let (nct, oct) = (n.header("Content-Type"), o.header("Content-Type"));
            if nct != oct {
                self.mismatches
                    .push(format!("{what}: Content-Type nova {nct:?} ours {oct:?}"));
            }
            let (nb, ob) = (mask_seed(&n.body), mask_seed(&o.body));
            if nb != ob {
                self.mismatches.push(format!(
                    "{what}: body\n  nova {}\n  ours {}",
                    String::from_utf8_lossy(&nb),
                    String::from_utf8_lossy(&ob)
                ));
            }
        }
        n
    }

    /// Expect both to answer these statuses (a documented difference).
    fn expect(&mut self, path: &str, headers: &str, nova: u16, ours: u16) {
        let n = request(self.nova, "GET", path, headers);
        let o = request(self.ours, "GET", path, headers);
        self.compared += 1;
        if (n.status, o.status) != (nova, ours) {
            self.mismatches.push(format!(
                "GET {path}: expected nova {nova} / ours {ours}, got {} / {}",
                n.status, o.status
            ));
        }
    }

    /// cloud-init's EC2 crawl, driven by Nova's listings: every line of every
    /// listing is fetched (directories with a trailing `/`, `N=name` as
    /// `N/` and `N/openssh-key`).
    fn crawl(&mut self, dir: &str, headers: &str, label: &str, seen: &mut BTreeSet<String>) {
        let listing = self.check("GET", dir, headers, label);
        if listing.status != 200 {
            return;
        }
        for line in listing.text().lines() {
            if let Some(sub) = line.strip_suffix('/') {
                self.crawl(&format!("{dir}{sub}/"), headers, label, seen);
            } else if let Some((idx, _name)) = line.split_once('=') {
                self.crawl(&format!("{dir}{idx}/"), headers, label, seen);
                self.check("GET", &format!("{dir}{idx}/openssh-key"), headers, label);
            } else {
                let path = format!("{dir}{line}");
                self.check("GET", &path, headers, label);
                seen.insert(path);
            }
        }
    }
}

#[test]
fn metaproxy_api_answers_what_nova_answers() {
    let Some(p) = peers() else { return };
    let fx = &p.fixture;
    let instances: Vec<(String, Value)> = fx["instances"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert!(!instances.is_empty(), "fixture has no instances");
    let who = |vm: &Value| Who {
        instance: vm["uuid"].as_str().unwrap().to_owned(),
        tenant: vm["project_id"].as_str().unwrap().to_owned(),
        signature: sign(&p.secret, vm["uuid"].as_str().unwrap()),
        forwarded_for: vm["ip_address"].as_str().unwrap().to_owned(),
    };

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
    let mut d = Diff {
        nova: p.nova,
        ours,
        compared: 0,
        mismatches: Vec::new(),
    };

    // No identity needed.
    for path in ["/", "/foo/../", "//"] {
        d.check("GET", path, "", "anonymous");
    }

    let mut ec2_leaves = BTreeSet::new();
    for (name, vm) in &instances {
        let h = who(vm).headers();
        let h = h.as_str();
        let label = name.as_str();
        // Version lists and the OpenStack reader's probe.
        for path in [
            "/ec2",
            "/ec2/",
            "/openstack",
            "/openstack/",
            "/latest",
            "/2009-04-04",
            "/2009-04-04/",
            "/latest/",
        ] {
            d.check("GET", path, h, label);
        }
        // cloud-init's OpenStack reader, at the version it picks and at latest.
        for v in [CLOUD_INIT_OS_VERSION, "latest"] {
            d.check("GET", &format!("/openstack/{v}"), h, label);
            d.check("GET", &format!("/openstack/{v}/"), h, label);
            for file in [
                "meta_data.json",
                "user_data",
                "vendor_data.json",
                "vendor_data2.json",
                "network_data.json",
                "password",
            ] {
                d.check("GET", &format!("/openstack/{v}/{file}"), h, label);
            }
        }
        // Every OpenStack version's meta_data.json (version-gated keys).
        let versions = request(p.nova, "GET", "/openstack", h).text();
        for v in versions.lines() {
            d.check("GET", &format!("/openstack/{v}/meta_data.json"), h, label);
            d.check("GET", &format!("/openstack/{v}"), h, label);
        }
        // cloud-init's EC2 version probe, then its crawl.
        for v in ["2021-03-23", "2018-09-24", "2016-09-02"] {
            d.check("GET", &format!("/{v}/meta-data/instance-id"), h, label);
        }
        for v in ["2009-04-04", "latest"] {
            d.check("GET", &format!("/{v}/user-data"), h, label);
            let mut seen = BTreeSet::new();
            d.crawl(&format!("/{v}/meta-data/"), h, label, &mut seen);
            d.check("GET", &format!("/{v}/meta-data"), h, label);
            ec2_leaves.extend(seen);
        }
        // Every EC2 version's listing (version-gated keys).
        for v in request(p.nova, "GET", "/", "").text().lines() {
            d.check("GET", &format!("/{v}/meta-data/"), h, label);
        }
        // Path normalisation, HEAD, and unknown paths.
        for path in [
            "/openstack//latest/meta_data.json",
            "/openstack/latest/../latest/network_data.json",
            "/ec2/latest/meta-data/hostname",
            "/ec2/2009-04-04/meta-data/",
            "/latest//meta-data//placement//",
            "/latest/meta-data/public-keys/0/openssh-key/",
            "/openstack/content",
            "/openstack/2099-01-01/meta_data.json",
            "/openstack/latest/nope",
            "/latest/meta-data/nope",
            "/latest/api/token",
            "/2016-09-02/meta-data/",
            "/nope",
        ] {
            d.check("GET", path, h, label);
        }
        for path in [
            "/openstack/latest/meta_data.json",
            "/latest/meta-data/",
            "/openstack/latest/password",
        ] {
            d.check("HEAD", path, h, label);
        }
        // Nova's uncaught TypeError one segment below a leaf; two segments is 404 on both.
        d.expect("/latest/meta-data/hostname/x", h, 500, 404);
        d.check("GET", "/latest/meta-data/hostname/x/y", h, label);

        // Identity errors.
        let w = who(vm);
        let bad_sig = Who {
            signature: sign("not-the-secret", &w.instance),
            ..w.clone()
        };
        d.check(
            "GET",
            "/openstack/latest/meta_data.json",
            &bad_sig.headers(),
            label,
        );
        let upper = Who {
            signature: w.signature.to_uppercase(),
            ..w.clone()
        };
        d.check(
            "GET",
            "/openstack/latest/meta_data.json",
            &upper.headers(),
            label,
        );
        let other_tenant = Who {
            tenant: "ffffffffffffffffffffffffffffffff".into(),
            ..w.clone()
        };
        d.check(
            "GET",
            "/openstack/latest/meta_data.json",
            &other_tenant.headers(),
            label,
        );
        let no_sig = format!(
            "X-Instance-ID: {}\r\nX-Tenant-ID: {}\r\n",
            w.instance, w.tenant
        );
        d.check("GET", "/openstack/latest/meta_data.json", &no_sig, label);
        let no_tenant = format!(
            "X-Instance-ID: {}\r\nX-Instance-ID-Signature: {}\r\n",
            w.instance, w.signature
        );
        d.check("GET", "/openstack/latest/meta_data.json", &no_tenant, label);
        d.check("GET", "/openstack/latest/meta_data.json", "", label);
    }
    let unknown = "ffffffff-0000-4000-8000-00000000ffff";
    let stranger = Who {
        instance: unknown.into(),
        tenant: instances[0].1["project_id"].as_str().unwrap().into(),
        signature: sign(&p.secret, unknown),
        forwarded_for: "10.10.0.99".into(),
    };
    d.check(
        "GET",
        "/openstack/latest/meta_data.json",
        &stranger.headers(),
        "unknown instance",
    );

    // The crawl really walked the tree cloud-init reads.
    for leaf in [
        "/2009-04-04/meta-data/instance-id",
        "/latest/meta-data/placement/availability-zone",
        "/latest/meta-data/block-device-mapping/root",
    ] {
        assert!(
            ec2_leaves.contains(leaf),
            "crawl missed {leaf}: {ec2_leaves:?}"
        );
    }
    println!(
        "peers_nova_diff: {} requests compared against {}",
        d.compared, p.nova
    );
    assert!(
        d.mismatches.is_empty(),
        "{} of {} differ from Nova:\n{}",
        d.mismatches.len(),
        d.compared,
        d.mismatches.join("\n")
    );
}
