//! `metaproxy ovn` end to end with provisioning, as root: what
//! neutron-ovn-metadata-agent does on a compute node, from the Southbound
//! rows to a VM's own metadata. Real Debian `ovsdb-server`s (a Southbound
//! database written with `ovn-sbctl` and `ovsdb-client transact` as Neutron
//! and northd write it: a network's metadata `localport` with
//! `neutron:device_owner=network:distributed`, `neutron:cidrs` and
//! `neutron:mtu`, a VM port bound to this chassis; a local Open_vSwitch
//! database with `br-int`); `metaproxy ovn` as a child process; our
//! `metaproxy api` (inventory) as the metadata API.
//!
//! No ovs-vswitchd: the VM namespace reaches the provisioned root veth end
//! `tap<net[:10]>0` through a Linux bridge in the root namespace. From
//! inside the VM, cloud-init's own OpenStack reader and curl.
//!
//! `ip netns` creates namespaces only in `/run/netns`, so the namespaces
//! are there, under a prefix of this test's own (`[proxy.discover]
//! ovn_prefixes`, which the provisioner manages as its own) and with
//! network ids whose first ten characters hold the pid (the veth names); a
//! guard deletes every namespace, veth and bridge the test or the daemon
//! made, also when it fails. Without root, `ip`, `curl`, cloud-init or the
//! OVN packages: `SKIPPED`.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use common::netns::{can_run, cloud_init_read, in_ns, sh, Daemon, Namespaces, SECRET};
use common::ovn::{
    api_port, namespaces, poll_daemon, route_metadata_via, start_api, uuid_of, vswitch_with_br_int,
    write_ovn_config, Netns,
};
use common::ovsdb::{available, Kind, Server};
use metaproxy::ovn::provision::veth_names;
use serde_json::{json, Value};

const CHASSIS: &str = "compute-e2e";
const OTHER: &str = "compute-e2e-other";
const LIMIT: Duration = Duration::from_secs(20);
const MD: &str = "http://169.254.169.254/openstack/latest/meta_data.json";

/// Deletes on drop every namespace with the test's prefix, the network's
/// veths, the VM's root veth and the bridge.
struct Guard {
    prefix: String,
    net: String,
    links: Vec<String>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        for ns in namespaces(&self.prefix) {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
        for v in veth_names(&self.net).iter().chain(&self.links) {
            let _ = Command::new("ip").args(["link", "del", v]).output();
        }
    }
}

/// One link as `ip -j` shows it, in `ns` (or the root namespace).
fn link(ns: Option<&str>, dev: &str) -> Option<Value> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    let out = cmd
        .args(["-j", "-d", "addr", "show", "dev", dev])
        .output()
        .unwrap();
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v.as_array()?.first().cloned()
}

fn addrs(l: &Value) -> BTreeSet<String> {
    l["addr_info"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|a| format!("{}/{}", a["local"].as_str().unwrap_or(""), a["prefixlen"]))
                .collect()
        })
        .unwrap_or_default()
}

/// Poll `ready` every 50 ms (it runs `ip` or `curl`) until `LIMIT`; on
/// timeout, fail with `what` and the daemon's log.
fn poll(d: &Daemon, what: &str, ready: impl FnMut() -> bool) {
    poll_daemon(d, LIMIT, what, ready);
}

/// `curl` from inside `ns`: `None` when nothing answered.
fn try_curl(ns: &str, url: &str) -> Option<(u16, String)> {
    let out = in_ns(ns, "curl")
        .args(["-sS", "-g", "--max-time", "5", "-w", "\n%{http_code}", url])
        .output()
        .unwrap();
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n')?;
    Some((code.trim().parse().ok()?, body.to_string()))
}

fn uuid_in(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["uuid"].as_str().unwrap_or_default().to_string()
}

/// Where `needle` first is in `log`, failing with the log if absent.
fn at(log: &str, needle: &str) -> usize {
    log.find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in the log:\n{log}"))
}

#[test]
fn metaproxy_ovn_provisions_serves_and_tears_down_like_the_ovn_agent() {
    let name = "metaproxy_ovn_provisions_serves_and_tears_down_like_the_ovn_agent";
    if let Err(why) = can_run(&[]) {
        eprintln!("SKIPPED {name}: {why}");
        return;
    }
    if !available(name) {
        return;
    }
    let pid = std::process::id();
    // The first ten characters (the veth names) hold the pid.
    let net = format!("e2{:06x}-5a43-4b7b-8b8b-5dcd3b1b0a01", pid & 0xff_ffff);
    let inst = format!("0e2e0001-0000-4000-8000-{pid:012x}");
    let project = format!("0e2e{pid:028x}");
    let prefix = format!("ovnme2e{pid:x}-");
    let ns = format!("{prefix}{net}");
    let [tap0, tap1] = veth_names(&net);
    let (bridge, vm_root) = (format!("bre2e{pid:x}"), format!("vme2e{pid:x}"));
    let vm = format!("mpe2e{pid}vm");
    let (md_mac, vm_mac) = ("fa:16:3e:e2:00:02", "fa:16:3e:e2:00:05");
    let guard = Guard {
        prefix: prefix.clone(),
        net: net.clone(),
        links: vec![bridge.clone(), vm_root.clone()],
    };
    // Leftovers of an earlier crashed run with the same pid.
    drop(Guard {
        prefix: prefix.clone(),
        net: net.clone(),
        links: guard.links.clone(),
    });
    let dir = tempfile::tempdir().unwrap();

    // The Southbound database as Neutron (through northd) leaves it: two
    // chassis, the network's datapath, its metadata localport, a VM port
    // not bound yet.
    let sb = Server::southbound(Kind::Standalone);
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
    let dp = uuid_of(&sb.transact(json!([{"op": "insert", "table": "Datapath_Binding",
        "row": {"tunnel_key": 1, "external_ids": ["map", [["name", format!("neutron-{net}")], ["name2", "private"]]]}}])));
    sb.transact(json!([{"op": "insert", "table": "Port_Binding", "row": {
        "datapath": ["uuid", dp], "logical_port": "md-port", "tunnel_key": 1,
        "type": "localport", "mac": format!("{md_mac} 10.77.0.2 fd77::2"),
        "external_ids": ["map", [["neutron:cidrs", "10.77.0.2/24 fd77::2/64"], ["neutron:mtu", "1400"],
                                  ["neutron:device_owner", "network:distributed"],
                                  ["neutron:device_id", format!("ovnmeta-{net}")]]]
    }}]));
    sb.transact(json!([{"op": "insert", "table": "Port_Binding", "row": {
        "datapath": ["uuid", dp], "logical_port": "vm-port", "tunnel_key": 2, "type": "",
        "mac": format!("{vm_mac} 10.77.0.5 fd77::5"),
        "external_ids": ["map", [["neutron:device_id", inst.as_str()],
                                  ["neutron:project_id", project.as_str()],
                                  ["neutron:device_owner", "compute:nova"]]]
    }}]));
    // This chassis' Open_vSwitch database, with its integration bridge.
    let ovs = vswitch_with_br_int(CHASSIS);
    // The OVS interfaces named `tap0`, as (bridge, iface-id).
    let ovs_port = || -> Vec<String> {
        let v = ovs.transact(json!([{"op": "select", "table": "Interface",
            "where": [["name", "==", tap0.as_str()]], "columns": ["external_ids"]}]));
        v[0]["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["external_ids"].to_string())
            .collect()
    };

    // Our metadata API with the VM's instance.
    let inv = dir.path().join("inventory.toml");
    std::fs::write(
        &inv,
        format!(
            r#"dhcp_domain = "novalocal"

[[network]]
id = "{net}"
name = "ovn-e2e"
project = "{project}"
[[network.subnet]]
id = "{sub}"
cidr = "10.77.0.0/24"

[[instance]]
uuid = "{inst}"
name = "vm-e2e"
hostname = "vm-e2e"
project = "{project}"

[[instance.port]]
id = "{port}"
network = "{net}"
mac = "{vm_mac}"
fixed_ips = ["10.77.0.5"]
"#,
            sub = inst.replacen("-4000-", "-4500-", 1),
            port = inst.replacen("-4000-", "-4e00-", 1),
        ),
    )
    .unwrap();
    let api = start_api(dir.path(), &inv);
    let api_port = api_port(&api);

    let cfg = write_ovn_config(dir.path(), &sb, &ovs, api_port, Netns::Discover(&prefix));
    let start = |tag: &str| {
        Daemon::start_cmd(
            tag,
            Command::new(env!("CARGO_BIN_EXE_metaproxy")).args([
                "ovn",
                "--config",
                cfg.to_str().unwrap(),
            ]),
            dir.path(),
        )
    };
    let keys = || {
        sb.sbctl(&[
            "--bare",
            "--columns=external_ids",
            "find",
            "Chassis_Private",
            &format!("name={CHASSIS}"),
        ])
    };
    const ALIVE: &str = "reporting this chassis alive";

    // 1. No local VM yet: the first pass provisions nothing and the node
    // reports alive once it is done, as Neutron's agent after its sync.
    let ovn = start("ovn1");
    poll(&ovn, "liveness keys", || {
        keys().contains("neutron:ovn-neutron-agent-id")
    });
    let log = ovn.log_text();
    assert!(
        at(&log, "first provisioning pass done: 0 namespace(s)") < at(&log, ALIVE),
        "{log}"
    );
    assert_eq!(namespaces(&prefix), BTreeSet::new());

    // 2. The VM's port is bound here: its network's namespace appears with
    // 169.254.169.254 and the metadata port's address, MAC and MTU (and, the
    // VM having IPv6, fe80::a9fe:a9fe and the metadata MAC's link-local;
    // never an IPv6 subnet's CIDR, as Neutron), and the root end is on
    // br-int with the metadata port's iface-id.
    sb.sbctl(&["lsp-bind", "vm-port", CHASSIS]);
    let want = BTreeSet::from(
        [
            "169.254.169.254/32",
            "10.77.0.2/24",
            "fe80::a9fe:a9fe/128",
            "fe80::f816:3eff:fee2:2/64",
        ]
        .map(String::from),
    );
    // Exactly these (the reconcile adds them one by one).
    poll(&ovn, "namespace provisioned with its addresses", || {
        link(Some(&ns), &tap1).is_some_and(|l| addrs(&l) == want)
    });
    let end = link(Some(&ns), &tap1).unwrap();
    assert_eq!(end["address"], md_mac);
    assert_eq!(end["mtu"], 1400);
    assert_eq!(link(None, &tap0).unwrap()["mtu"], 1400);
    poll(&ovn, "OVS interface with iface-id", || {
        ovs_port() == vec![r#"["map",[["iface-id","md-port"]]]"#.to_string()]
    });
    assert_eq!(namespaces(&prefix), BTreeSet::from([ns.clone()]));

    // 3. The VM, wired to the root end through a Linux bridge (no
    // ovs-vswitchd here), gets its own instance through metaproxy ovn.
    let mut nss = Namespaces::default();
    nss.add(&vm);
    sh(&["ip", "link", "add", &bridge, "type", "bridge"]);
    sh(&[
        "ip", "link", "add", &vm_root, "type", "veth", "peer", "name", "eth0", "netns", &vm,
    ]);
    for dev in [&vm_root, &tap0] {
        sh(&["ip", "link", "set", dev, "master", &bridge]);
    }
    for dev in [&bridge, &vm_root] {
        sh(&["ip", "link", "set", dev, "up"]);
    }
    sh(&["ip", "-n", &vm, "link", "set", "eth0", "address", vm_mac]);
    sh(&[
        "ip",
        "-n",
        &vm,
        "addr",
        "add",
        "10.77.0.5/24",
        "dev",
        "eth0",
    ]);
    sh(&["ip", "-n", &vm, "link", "set", "eth0", "up"]);
    // The host route Neutron's DHCP gives: via the metadata port.
    route_metadata_via(&vm, "10.77.0.2");
    let mut last = None;
    poll(&ovn, "the VM's meta_data.json", || {
        last = try_curl(&vm, MD);
        last.as_ref().is_some_and(|(code, _)| *code == 200)
    });
    assert_eq!(uuid_in(&last.take().unwrap().1), inst);
    let got = cloud_init_read(&vm, "http://169.254.169.254");
    assert_eq!(
        got["openstack"]["metadata"]["uuid"],
        inst.as_str(),
        "{got:#}"
    );
    assert_eq!(got["openstack"]["metadata"]["hostname"], "vm-e2e.novalocal");
    // Over IPv6 link-local too, once DAD is done on both sides: the VM is
    // found by the MAC in its EUI-64 address.
    poll(&ovn, "the VM's meta_data.json over fe80::a9fe:a9fe", || {
        last = try_curl(
            &vm,
            "http://[fe80::a9fe:a9fe%eth0]/openstack/latest/meta_data.json",
        );
        last.as_ref().is_some_and(|(code, _)| *code == 200)
    });
    assert_eq!(uuid_in(&last.take().unwrap().1), inst);
    assert!(
        ovn.log_text()
            .contains(&format!("listener up: {ns} [fe80::a9fe:a9fe%")),
        "{}",
        ovn.log_text()
    );
    drop(ovn);

    // 4. While metaproxy ovn is down, Neutron changes the network's MTU. A
    // restart adopts the namespace (no second one, nothing recreated),
    // fixes the MTU, and reports alive only once it is served again.
    sb.transact(json!([{"op": "mutate", "table": "Port_Binding",
        "where": [["logical_port", "==", "md-port"]],
        "mutations": [["external_ids", "delete", ["map", [["neutron:mtu", "1400"]]]],
                      ["external_ids", "insert", ["map", [["neutron:mtu", "1450"]]]]]}]));
    let ovn = start("ovn2");
    poll(&ovn, "liveness after restart", || {
        ovn.log_text().contains(ALIVE)
    });
    let log = ovn.log_text();
    assert!(
        at(&log, &format!("listener up: {ns} ")) < at(&log, ALIVE)
            && at(&log, "first provisioning pass done: 1 namespace(s)") < at(&log, ALIVE),
        "{log}"
    );
    assert!(!log.contains("provisioned namespace"), "{log}");
    assert!(log.contains(&format!("updated namespace {ns}")), "{log}");
    assert_eq!(link(Some(&ns), &tap1).unwrap()["mtu"], 1450);
    assert_eq!(link(None, &tap0).unwrap()["mtu"], 1450);
    assert_eq!(namespaces(&prefix), BTreeSet::from([ns.clone()]));
    let (code, body) = try_curl(&vm, MD).expect("served after restart");
    assert_eq!((code, uuid_in(&body)), (200, inst.clone()));

    // 5. The VM leaves this chassis: the namespace, both veth ends and the
    // OVS port are torn down.
    sb.sbctl(&["lsp-unbind", "vm-port"]);
    poll(&ovn, "namespace torn down", || {
        !namespaces(&prefix).contains(&ns) && link(None, &tap0).is_none()
    });
    poll(&ovn, "OVS port removed", || ovs_port().is_empty());
    poll(&ovn, "listener down", || {
        ovn.log_text().contains(&format!("listener down: {ns}"))
    });
    let log = ovn.log_text();
    assert!(log.contains(&format!("removed namespace {ns}")), "{log}");
    assert!(
        !log.contains(SECRET),
        "the shared secret was logged:\n{log}"
    );
    drop(ovn);
    drop(nss);
    drop(guard);
}
