//! `metaproxy ovn` end to end, as root, against a real Debian Southbound
//! `ovsdb-server` and a real local Open_vSwitch database: rows written with
//! `ovsdb-client transact` and `ovn-sbctl` as Neutron (through northd)
//! writes them; `ovnmeta-<network>` namespaces wired by hand (a veth to
//! each "VM" namespace, 169.254.169.254 on the namespace end, as the OVN
//! agent provisions them); our `metaproxy api` (inventory) as the metadata
//! API. From inside the VMs, cloud-init's own OpenStack reader and curl.
//!
//! The `ovnmeta-` names live in a private netns directory (bind mounts of
//! namespaces whose `/run/netns` names match nobody's discovery), so no
//! other process on the machine serves them and we serve nobody else's;
//! `ip netns` cannot create namespaces there, so `metaproxy ovn` does not
//! provision (the namespaces are left as made; `tests/ovn_e2e.rs` covers
//! provisioning).
//! Without root, `ip`, `curl`, cloud-init or the OVN packages: `SKIPPED`.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::netns::{can_run, cloud_init_read, in_ns, sh, Daemon, Namespaces, SECRET};
use common::ovn::{api_port, route_metadata_via, start_api, uuid_of, write_ovn_config, Netns};
use common::ovsdb::{available, Kind, Server};
use serde_json::{json, Value};

const CHASSIS: &str = "compute-serve";
const OTHER: &str = "compute-other";
const LIMIT: Duration = Duration::from_secs(20);
const MD: &str = "http://169.254.169.254/openstack/latest/meta_data.json";

/// Bind mounts under the private netns directory, unmounted on drop.
#[derive(Default)]
struct Mounts(Vec<PathBuf>);

impl Drop for Mounts {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            let _ = Command::new("umount").arg(m).status();
            let _ = std::fs::remove_file(m);
        }
    }
}

/// What Neutron (through northd) leaves in the Southbound database.
struct Sb<'a> {
    sb: &'a Server,
    key: std::cell::Cell<u32>,
}

impl<'a> Sb<'a> {
    fn new(sb: &'a Server) -> Sb<'a> {
        sb.sbctl(&["init"]);
        for (ch, ip) in [(CHASSIS, "192.0.2.1"), (OTHER, "192.0.2.2")] {
            sb.sbctl(&["chassis-add", ch, "geneve", ip]);
            let id = sb.sbctl(&[
                "--bare",
                "--columns=_uuid",
                "find",
                "Chassis",
                &format!("name={ch}"),
            ]);
            sb.transact(json!([{"op": "insert", "table": "Chassis_Private",
                "row": {"name": ch, "chassis": ["uuid", id.trim()]}}]));
        }
        Sb {
            sb,
            key: std::cell::Cell::new(1),
        }
    }

    fn next(&self) -> u32 {
        let k = self.key.get();
        self.key.set(k + 1);
        k
    }

    fn network(&self, net: &str) -> String {
        let k = self.next();
        uuid_of(&self.sb.transact(json!([{"op": "insert", "table": "Datapath_Binding",
            "row": {"tunnel_key": k, "external_ids": ["map", [["name", format!("neutron-{net}")]]]}}])))
    }

    /// A VM port (`mac` is the Port_Binding's `mac`: "MAC IP..."), bound to `chassis`.
    fn vm_port(&self, dp: &str, name: &str, mac: &str, device: &str, project: &str) -> String {
        let k = self.next();
        let u = uuid_of(&self.sb.transact(
            json!([{"op": "insert", "table": "Port_Binding", "row": {
                "datapath": ["uuid", dp], "logical_port": name, "tunnel_key": k, "type": "",
                "mac": mac,
                "external_ids": ["map", [["neutron:device_id", device],
                                          ["neutron:project_id", project],
                                          ["neutron:device_owner", "compute:nova"]]]
            }}]),
        ));
        self.sb.sbctl(&["lsp-bind", name, CHASSIS]);
        u
    }

    fn delete_port(&self, uuid: &str) {
        self.sb
            .transact(json!([{"op": "delete", "table": "Port_Binding",
            "where": [["_uuid", "==", ["uuid", uuid]]]}]));
    }
}

/// `curl` from inside `ns`: `None` when nothing answered (not served yet).
fn try_curl(ns: &str, url: &str, extra: &[&str]) -> Option<(u16, String)> {
    let out = in_ns(ns, "curl")
        .args(["-sS", "-g", "--max-time", "5", "-w", "\n%{http_code}"])
        .args(extra)
        .arg(url)
        .output()
        .unwrap();
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n')?;
    Some((code.trim().parse().ok()?, body.to_string()))
}

/// Poll until `ns` gets an answer from `url` that `done` accepts; that answer.
fn until(
    d: &Daemon,
    ns: &str,
    url: &str,
    extra: &[&str],
    done: impl Fn(u16, &str) -> bool,
) -> (u16, String) {
    let t0 = Instant::now();
    let mut last = None;
    loop {
        if let Some((code, body)) = try_curl(ns, url, extra) {
            if done(code, &body) {
                return (code, body);
            }
            last = Some((code, body));
        }
        assert!(
            t0.elapsed() < LIMIT,
            "{ns}: {url} never as expected; last answer {last:?}; log:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn uuid_in(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["uuid"].as_str().unwrap_or_default().to_string()
}

fn inventory(nets: &[&str], instances: &[(&str, &str, &str, &str, &str)], project: &str) -> String {
    let mut s = String::from("dhcp_domain = \"novalocal\"\n");
    for (i, net) in nets.iter().enumerate() {
        s += &format!(
            "\n[[network]]\nid = \"{net}\"\nname = \"ovn-serve-{i}\"\nproject = \"{project}\"\n\
             [[network.subnet]]\nid = \"{sub}\"\ncidr = \"10.0.0.0/24\"\n",
            sub = net.replacen("-4000-", "-4500-", 1),
        );
    }
    for (uuid, host, net, mac, ip) in instances {
        s += &format!(
            r#"
[[instance]]
uuid = "{uuid}"
name = "{host}"
hostname = "{host}"
project = "{project}"

[[instance.port]]
id = "{port}"
network = "{net}"
mac = "{mac}"
fixed_ips = ["{ip}"]
"#,
            port = uuid.replacen("-4000-", "-4e00-", 1),
        );
    }
    s
}

/// `meta` (the ovnmeta- namespace's real one) gets `tap` with `meta_cidr`,
/// wired to `eth0` in `vm`, which gets `vm_cidr` (if any) and `mac`.
fn wire(meta: &str, tap: &str, meta_cidr: &str, vm: &str, vm_cidr: Option<&str>, mac: &str) {
    sh(&[
        "ip", "-n", meta, "link", "add", tap, "type", "veth", "peer", "name", "eth0", "netns", vm,
    ]);
    sh(&["ip", "-n", meta, "addr", "add", meta_cidr, "dev", tap]);
    sh(&["ip", "-n", vm, "link", "set", "eth0", "address", mac]);
    if let Some(c) = vm_cidr {
        sh(&["ip", "-n", vm, "addr", "add", c, "dev", "eth0"]);
    }
}

fn up(ns: &str, dev: &str) {
    sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
}

#[test]
fn vms_in_ovnmeta_namespaces_get_their_own_instance_from_the_southbound_replica() {
    let name = "vms_in_ovnmeta_namespaces_get_their_own_instance_from_the_southbound_replica";
    if let Err(why) = can_run(&["mount", "umount"]) {
        eprintln!("SKIPPED {name}: {why}");
        return;
    }
    if !available(name) {
        return;
    }
    let pid = std::process::id();
    let id = |kind: u16| format!("0e5e{kind:04x}-0000-4000-8000-{pid:012x}");
    let (net_a, net_b) = (id(0xa), id(0xb));
    let (inst_a, inst_b, inst_c) = (id(1), id(2), id(3));
    let (inst_dup, inst_bad) = (id(4), id(5));
    let project = format!("0e5e{pid:028x}");
    let dir = tempfile::tempdir().unwrap();
    let netns_dir = dir.path().join("netns");
    std::fs::create_dir_all(&netns_dir).unwrap();

    // Topology: two ovnmeta- namespaces; vm_a and vm_b have the same IP on
    // different networks; vm_c is IPv6 link-local only, on network A.
    let (meta_a, meta_b) = (format!("mpos{pid}ma"), format!("mpos{pid}mb"));
    let (vm_a, vm_b, vm_c) = (
        format!("mpos{pid}va"),
        format!("mpos{pid}vb"),
        format!("mpos{pid}vc"),
    );
    let mut nss = Namespaces::default();
    for n in [&meta_a, &meta_b, &vm_a, &vm_b, &vm_c] {
        nss.add(n);
    }
    let (mac_a, mac_b, mac_c) = (
        "fa:16:3e:5e:00:0a",
        "fa:16:3e:5e:00:0b",
        "fa:16:3e:5e:00:0c",
    );
    for (meta, vm, tap, mac) in [
        (&meta_a, &vm_a, "tapa", mac_a),
        (&meta_b, &vm_b, "tapb", mac_b),
    ] {
        wire(meta, tap, "10.0.0.2/24", vm, Some("10.0.0.5/24"), mac);
        sh(&[
            "ip",
            "-n",
            meta,
            "addr",
            "add",
            "169.254.169.254/32",
            "dev",
            tap,
        ]);
        up(meta, tap);
        up(vm, "eth0");
        route_metadata_via(vm, "10.0.0.2");
    }
    // vm_c: its EUI-64 link-local, no DAD (a guest's would pass it).
    sh(&[
        "ip", "-n", &meta_a, "link", "add", "tapc", "type", "veth", "peer", "name", "eth0",
        "netns", &vm_c,
    ]);
    for (ns, dev) in [(&meta_a, "tapc"), (&vm_c, "eth0")] {
        sh(&["ip", "-n", ns, "link", "set", dev, "addrgenmode", "none"]);
    }
    sh(&["ip", "-n", &vm_c, "link", "set", "eth0", "address", mac_c]);
    sh(&[
        "ip",
        "-n",
        &vm_c,
        "addr",
        "add",
        "fe80::f816:3eff:fe5e:c/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    sh(&[
        "ip",
        "-n",
        &meta_a,
        "addr",
        "add",
        "fe80::a9fe:a9fe/128",
        "dev",
        "tapc",
        "nodad",
    ]);
    up(&meta_a, "tapc");
    // The on-link route an auto-generated link-local address would bring.
    sh(&[
        "ip",
        "-n",
        &meta_a,
        "route",
        "add",
        "fe80::/64",
        "dev",
        "tapc",
    ]);
    up(&vm_c, "eth0");

    // The Southbound database as Neutron leaves it, and this chassis' OVS DB.
    let sb = Server::southbound(Kind::Standalone);
    let ovs = Server::vswitch(CHASSIS, None);
    let cloud = Sb::new(&sb);
    let (dp_a, dp_b) = (cloud.network(&net_a), cloud.network(&net_b));
    cloud.vm_port(
        &dp_a,
        "port-a",
        &format!("{mac_a} 10.0.0.5"),
        &inst_a,
        &project,
    );
    let port_b = cloud.vm_port(
        &dp_b,
        "port-b",
        &format!("{mac_b} 10.0.0.5"),
        &inst_b,
        &project,
    );
    // vm_c's port has an IPv4 address the guest never configured: found by MAC.
    cloud.vm_port(
        &dp_a,
        "port-c",
        &format!("{mac_c} 10.0.0.7"),
        &inst_c,
        &project,
    );
    // A tenant-written device_id that is no instance id.
    cloud.vm_port(
        &dp_a,
        "port-bad",
        "fa:16:3e:5e:00:0d 10.0.0.8",
        "../../etc/passwd\r\nX-Instance-ID: x",
        &project,
    );

    // Our metadata API, serving all of them from an inventory.
    let inv = dir.path().join("inventory.toml");
    std::fs::write(
        &inv,
        inventory(
            &[&net_a, &net_b],
            &[
                (&inst_a, "vm-a", &net_a, mac_a, "10.0.0.5"),
                (&inst_b, "vm-b", &net_b, mac_b, "10.0.0.5"),
                (&inst_c, "vm-c", &net_a, mac_c, "10.0.0.7"),
                (&inst_dup, "vm-dup", &net_a, "fa:16:3e:5e:00:0e", "10.0.0.9"),
                (&inst_bad, "vm-bad", &net_a, "fa:16:3e:5e:00:0d", "10.0.0.8"),
            ],
            &project,
        ),
    )
    .unwrap();
    let api = start_api(dir.path(), &inv);
    let api_port = api_port(&api);

    let cfg = write_ovn_config(dir.path(), &sb, &ovs, api_port, Netns::Dir(&netns_dir));
    let cfg = cfg.to_str().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_metaproxy"))
        .args(["ovn", "--config", cfg, "--check"])
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("is valid"),
        "--check: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Where the first version put its agent socket: nothing goes there now.
    let runtime = dir.path().join("run");
    let mut ovn = Daemon::start_cmd(
        "ovn",
        Command::new(env!("CARGO_BIN_EXE_metaproxy"))
            .args(["ovn", "--config", cfg])
            .env("RUNTIME_DIRECTORY", &runtime),
        dir.path(),
    );

    // 0. Not alive to Neutron while nothing serves: in sync with the
    // Southbound, this chassis' row there, no namespace yet, no keys.
    let t0 = Instant::now();
    while !ovn.log_text().contains("in sync") {
        assert!(t0.elapsed() < LIMIT, "no snapshot:\n{}", ovn.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let keys = || {
        sb.sbctl(&[
            "--bare",
            "--columns=external_ids",
            "find",
            "Chassis_Private",
            &format!("name={CHASSIS}"),
        ])
    };
    assert!(
        !keys().contains("neutron:ovn-neutron-agent-id"),
        "{}",
        keys()
    );
    // The OVN agent's namespaces appear (as its provisioning makes them).
    let mut mounts = Mounts::default();
    for (real, net) in [(&meta_a, &net_a), (&meta_b, &net_b)] {
        let file = netns_dir.join(format!("ovnmeta-{net}"));
        std::fs::write(&file, b"").unwrap();
        mounts.0.push(file.clone());
        sh(&[
            "mount",
            "--bind",
            &format!("/run/netns/{real}"),
            file.to_str().unwrap(),
        ]);
    }

    // 1. A VM gets its own instance, through cloud-init's own reader.
    until(&ovn, &vm_a, MD, &[], |code, _| code == 200);
    let got = cloud_init_read(&vm_a, "http://169.254.169.254");
    assert_eq!(
        got["openstack"]["metadata"]["uuid"],
        inst_a.as_str(),
        "{got:#}"
    );
    assert_eq!(got["openstack"]["metadata"]["hostname"], "vm-a.novalocal");
    // No hop to an agent: the agent stage runs on the listeners' own
    // loops, so the only Unix socket `metaproxy ovn` listens on is
    // `metaproxy ctl`'s, and it made no runtime directory for one.
    let ctl = dir.path().join("ctl.sock").display().to_string();
    assert_eq!(common::unix_listeners(ovn.pid()), vec![ctl]);
    assert!(!runtime.exists(), "a runtime directory was created");
    // Serving: now alive to Neutron.
    common::wait_until("liveness keys written", LIMIT, || {
        keys().contains("neutron:ovn-neutron-agent-id")
    });
    // 2. The same IP on the other network is the other instance.
    let (_, body) = until(&ovn, &vm_b, MD, &[], |code, _| code == 200);
    assert_eq!(uuid_in(&body), inst_b);
    // 3. A spoofed X-OVN-Network-ID (and the rest) from vm_a is stripped:
    // vm_a still gets its own instance, never vm_b's (same IP, network B).
    let spoofed = [
        format!("X-OVN-Network-ID: {net_b}"),
        format!("X-Neutron-Network-ID: {net_b}"),
        "X-Forwarded-For: 10.0.0.7".to_string(),
        format!("X-Instance-ID: {inst_b}"),
        format!("X-Tenant-ID: {project}"),
    ];
    let args: Vec<&str> = spoofed.iter().flat_map(|h| ["-H", h.as_str()]).collect();
    let (code, body) = try_curl(&vm_a, MD, &args).expect("answer");
    assert_eq!((code, uuid_in(&body)), (200, inst_a.clone()), "{body}");
    // 4. An IPv6 link-local client is resolved by the MAC in its EUI-64.
    let (_, body) = until(
        &ovn,
        &vm_c,
        "http://[fe80::a9fe:a9fe%eth0]/openstack/latest/meta_data.json",
        &[],
        |code, _| code == 200,
    );
    assert_eq!(uuid_in(&body), inst_c);
    // 5. A device_id that is not an instance id is a 404, and no header of it
    // reaches the API.
    sh(&[
        "ip",
        "-n",
        &vm_a,
        "addr",
        "add",
        "10.0.0.8/24",
        "dev",
        "eth0",
    ]);
    let (code, body) = try_curl(&vm_a, MD, &["--interface", "10.0.0.8"]).expect("answer");
    assert_eq!(code, 404, "{body}");
    // 6. A second port on network A claiming 10.0.0.5: ambiguous, 404 for
    // vm_a (never either instance's data); vm_b, on network B, unaffected.
    let dup = cloud.vm_port(
        &dp_a,
        "port-dup",
        "fa:16:3e:5e:00:0e 10.0.0.5",
        &inst_dup,
        &project,
    );
    let (_, body) = until(&ovn, &vm_a, MD, &[], |code, _| code == 404);
    assert!(
        !body.contains(&inst_a) && !body.contains(&inst_dup),
        "{body}"
    );
    let (code, body) = try_curl(&vm_b, MD, &[]).expect("answer");
    assert_eq!((code, uuid_in(&body)), (200, inst_b.clone()));
    cloud.delete_port(&dup);
    let (_, body) = until(&ovn, &vm_a, MD, &[], |code, _| code == 200);
    assert_eq!(uuid_in(&body), inst_a);
    // 7. vm_b's port removed from the Southbound: 404.
    cloud.delete_port(&port_b);
    until(&ovn, &vm_b, MD, &[], |code, _| code == 404);

    ovn.assert_running();
    let log = ovn.log_text();
    assert!(
        log.contains(&format!("chassis {CHASSIS}")) && log.contains("More than one port"),
        "{log}"
    );
    assert!(
        !log.contains(SECRET),
        "the shared secret was logged:\n{log}"
    );
    assert!(log.contains("for ovnmeta-* (OVN network id)\n"), "{log}");
    // A netns directory `ip netns` does not manage: its namespaces are
    // served as found, never provisioned or torn down.
    assert!(log.contains("ovn: not provisioning namespaces"), "{log}");
    // SIGTERM: a clean stop.
    drop(ovn);
    let log = std::fs::read_to_string(dir.path().join("ovn.log")).unwrap();
    assert!(
        log.contains("draining and exiting") && log.contains("stopped"),
        "{log}"
    );
    assert!(!runtime.exists(), "a runtime directory was left behind");
    drop(mounts);
    drop(nss);
}
