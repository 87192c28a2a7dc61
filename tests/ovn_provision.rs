//! Provisioning of the `ovnmeta-` namespaces against real Debian
//! `ovsdb-server`s (a Southbound database written with `ovn-sbctl` and
//! `ovsdb-client transact` as Neutron and northd write it, and a local
//! Open_vSwitch database), with real namespaces and veths: after a
//! reconcile exactly the expected namespaces exist with the right
//! addresses, MAC and MTU, and the OVS `Port`/`Interface` rows carry the
//! metadata port's `iface-id`; binding a port provisions its network,
//! unbinding the last one tears it down, a `neutron:cidrs` change moves the
//! addresses, `additional_chassis` (live migration) provisions; a new
//! provisioner run against a changed database and hand-made leftovers
//! reconciles without duplicates; a second reconcile changes nothing.
//!
//! Each test uses a namespace prefix and network ids of its own (pid and
//! tag), so tests run in parallel and never touch anyone else's
//! namespaces; a guard deletes every namespace and veth a test made, also
//! when it fails. Needs root, `ip` and the OVN/OVS packages, else
//! `SKIPPED`.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use common::ovn::namespaces;
use common::ovsdb::{available, Kind, Server};
use common::wait_until;
use metaproxy::ovn::ovsdb::{ConnOptions, Remote};
use metaproxy::ovn::provision::{
    desired, veth_names, Desired, Provisioner, ProvisionerConfig, Report, V6State,
};
use metaproxy::ovn::replica::{SbConfig, SbMonitor};
use serde_json::{json, Value};

const LOCAL: &str = "chassis-local";
const OTHER: &str = "chassis-other";
const LIMIT: Duration = Duration::from_secs(20);

fn can_run(test: &str) -> bool {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIPPED {test}: not root (namespaces and veths need CAP_NET_ADMIN; CI runs this as root)");
        return false;
    }
    if !common::netns::have("ip") {
        eprintln!("SKIPPED {test}: `ip` (iproute2) not installed");
        return false;
    }
    available(test)
}

fn opts() -> ConnOptions {
    ConnOptions {
        connect_timeout: Duration::from_secs(5),
        ..ConnOptions::default()
    }
}

/// Network `i` of test `tag`: the first ten characters (the veth names)
/// are unique per process and test.
fn net(tag: u8, i: u8) -> String {
    format!(
        "{:04x}{tag:02x}{i:02x}-5a43-4b7b-8b8b-5dcd3b1b0a{i:02x}",
        std::process::id() & 0xffff
    )
}

/// Deletes on drop every namespace with the test's prefix and every root
/// veth named after its networks.
struct Guard {
    prefix: String,
    nets: Vec<String>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        for ns in namespaces(&self.prefix) {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
        for n in &self.nets {
            for v in veth_names(n) {
                let _ = Command::new("ip").args(["link", "del", &v]).output();
            }
        }
    }
}

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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
        .unwrap()
        .iter()
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect()
}

fn up(l: &Value) -> bool {
    l["flags"].as_array().unwrap().iter().any(|f| f == "UP")
}

fn uuid_of(result: &Value) -> String {
    result[0]["uuid"][1].as_str().unwrap().to_string()
}

/// The Southbound database as Neutron (through northd) leaves it, and this
/// chassis' Open_vSwitch database with `br-int`.
struct Env {
    sb: Server,
    ovs: Server,
    mon: SbMonitor,
    tag: u8,
    key: std::cell::Cell<u32>,
    guard: Guard,
}

impl Env {
    fn new(tag: u8, nets: u8) -> Env {
        let prefix = format!("ovnmt{:x}-{tag}-", std::process::id());
        let guard = Guard {
            prefix,
            nets: (0..nets).map(|i| net(tag, i)).collect(),
        };
        // Leftovers of an earlier crashed run with the same pid.
        drop(Guard {
            prefix: guard.prefix.clone(),
            nets: guard.nets.clone(),
        });
        let sb = Server::southbound(Kind::Standalone);
        sb.sbctl(&["init"]);
        for (ch, ip) in [(LOCAL, "192.0.2.1"), (OTHER, "192.0.2.2")] {
            sb.sbctl(&["chassis-add", ch, "geneve", ip]);
        }
        let ovs = Server::vswitch(LOCAL, None);
        let env_ovs_bridge = |name: &str| {
            ovs.transact(json!([
                {"op": "insert", "table": "Bridge", "uuid-name": "b", "row": {"name": name}},
                {"op": "mutate", "table": "Open_vSwitch", "where": [],
                 "mutations": [["bridges", "insert", ["set", [["named-uuid", "b"]]]]]}
            ]));
        };
        env_ovs_bridge("br-int");
        env_ovs_bridge("br-old");
        let mon = SbMonitor::start(SbConfig {
            remotes: Remote::parse_list(&sb.remote()).unwrap(),
            conn: opts(),
            chassis: LOCAL.to_string(),
        })
        .unwrap();
        Env {
            sb,
            ovs,
            mon,
            tag,
            key: std::cell::Cell::new(1),
            guard,
        }
    }

    fn net(&self, i: u8) -> String {
        net(self.tag, i)
    }

    fn ns(&self, i: u8) -> String {
        format!("{}{}", self.guard.prefix, self.net(i))
    }

    fn provisioner(&self) -> Provisioner {
        // What `read_local_chassis` gives `metaproxy ovn`.
        let remotes = Remote::parse_list(&self.ovs.remote()).unwrap();
        let (system_id, bridge) =
            metaproxy::ovn::ovsdb::read_local_chassis(&remotes[0], &opts()).unwrap();
        assert_eq!((system_id.as_str(), bridge.as_str()), (LOCAL, "br-int"));
        let mut cfg = ProvisionerConfig::new(remotes, opts(), &bridge);
        cfg.ns_prefix = self.guard.prefix.clone();
        Provisioner::new(cfg)
    }

    fn next_key(&self) -> u32 {
        let k = self.key.get();
        self.key.set(k + 1);
        k
    }

    /// Network `i`'s datapath and metadata port (`md-<i>`); returns the
    /// datapath's UUID.
    fn network(&self, i: u8, cidrs: &str, mtu: &str) -> String {
        let k = self.next_key();
        let dp = uuid_of(&self.sb.transact(json!([{"op": "insert", "table": "Datapath_Binding", "row": {
            "tunnel_key": k,
            "external_ids": ["map", [["name", format!("neutron-{}", self.net(i))], ["name2", "private"]]]
        }}])));
        let k = self.next_key();
        self.sb.transact(json!([{"op": "insert", "table": "Port_Binding", "row": {
            "datapath": ["uuid", dp], "logical_port": format!("md-{i}"), "tunnel_key": k,
            "type": "localport", "mac": format!("fa:16:3e:{:02x}:00:{i:02x} {}", self.tag, cidrs.split('/').next().unwrap()),
            "external_ids": ["map", [["neutron:cidrs", cidrs], ["neutron:mtu", mtu],
                                      ["neutron:device_owner", "network:distributed"],
                                      ["neutron:device_id", format!("ovnmeta-{}", self.net(i))]]]
        }}]));
        dp
    }

    /// A VM port on datapath `dp`.
    fn vm(&self, dp: &str, name: &str, mac: &str) {
        let k = self.next_key();
        self.sb
            .transact(json!([{"op": "insert", "table": "Port_Binding", "row": {
                "datapath": ["uuid", dp], "logical_port": name, "tunnel_key": k, "type": "",
                "mac": mac,
                "external_ids": ["map", [["neutron:device_owner", "compute:nova"]]]
            }}]));
    }

    fn set_port(&self, name: &str, row: Value) {
        self.sb
            .transact(json!([{"op": "update", "table": "Port_Binding",
            "where": [["logical_port", "==", name]], "row": row}]));
    }

    fn chassis_uuid(&self, ch: &str) -> String {
        self.sb
            .sbctl(&[
                "--bare",
                "--columns=_uuid",
                "find",
                "Chassis",
                &format!("name={ch}"),
            ])
            .trim()
            .to_string()
    }

    /// The replica's desired state once `ready` holds for it.
    fn desired_when(&self, what: &str, ready: impl Fn(&Desired) -> bool) -> Desired {
        let mut d = Desired::default();
        wait_until(what, LIMIT, || {
            if !self.mon.shared().stats().synced {
                return false;
            }
            d = desired(&self.mon.shared().snapshot());
            ready(&d)
        });
        d
    }

    fn desired_nets(&self, nets: &[u8]) -> Desired {
        let want: BTreeSet<String> = nets.iter().map(|i| self.net(*i)).collect();
        self.desired_when(&format!("networks {nets:?} planned"), |d| {
            d.networks.keys().cloned().collect::<BTreeSet<_>>() == want
        })
    }

    /// The OVS ports named `name`, as (bridge, iface-id of its interface).
    fn ovs_ports(&self, name: &str) -> Vec<(String, Option<String>)> {
        let v = self.ovs.transact(json!([
            {"op": "select", "table": "Bridge", "where": [], "columns": ["name", "ports"]},
            {"op": "select", "table": "Port", "where": [["name", "==", name]], "columns": ["_uuid", "interfaces"]},
            {"op": "select", "table": "Interface", "where": [["name", "==", name]], "columns": ["_uuid", "external_ids"]},
        ]));
        let set = |v: &Value| -> Vec<String> {
            if v[0] == "uuid" {
                vec![v[1].as_str().unwrap().to_string()]
            } else {
                v[1].as_array()
                    .unwrap()
                    .iter()
                    .map(|u| u[1].as_str().unwrap().to_string())
                    .collect()
            }
        };
        let mut out = Vec::new();
        for p in v[1]["rows"].as_array().unwrap() {
            let pu = p["_uuid"][1].as_str().unwrap().to_string();
            let ifs = set(&p["interfaces"]);
            let iface_id = v[2]["rows"]
                .as_array()
                .unwrap()
                .iter()
                .find(|i| ifs.contains(&i["_uuid"][1].as_str().unwrap().to_string()))
                .and_then(|i| {
                    i["external_ids"][1]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|kv| kv[0] == "iface-id")
                        .map(|kv| kv[1].as_str().unwrap().to_string())
                });
            for b in v[0]["rows"].as_array().unwrap() {
                if set(&b["ports"]).contains(&pu) {
                    out.push((b["name"].as_str().unwrap().to_string(), iface_id.clone()));
                }
            }
        }
        out
    }

    /// Network `i` is provisioned: its namespace end has exactly
    /// `addresses` (plus the kernel's own link-local on an IPv4-only
    /// network), the metadata MAC, `mtu` on both ends, both up, and one OVS
    /// port on br-int with `iface-id=md-<i>`.
    fn assert_provisioned(&self, i: u8, addresses: &[&str], mtu: u64, v6: bool) {
        let ns = self.ns(i);
        let [v0, v1] = veth_names(&self.net(i));
        let end = link(Some(&ns), &v1).unwrap_or_else(|| panic!("{v1} in {ns}"));
        let root = link(None, &v0).unwrap_or_else(|| panic!("{v0}"));
        let mac = format!("fa:16:3e:{:02x}:00:{i:02x}", self.tag);
        assert_eq!(end["address"], mac.as_str());
        assert_eq!(
            (end["mtu"].as_u64(), root["mtu"].as_u64()),
            (Some(mtu), Some(mtu))
        );
        assert!(up(&end) && up(&root), "{v0}/{v1} up");
        let mut got = addrs(&end);
        let mut want: BTreeSet<String> = addresses.iter().map(|s| s.to_string()).collect();
        let lla = format!("fe80::f816:3eff:fe{:02x}:{i}/64", self.tag);
        if v6 {
            want.insert("fe80::a9fe:a9fe/128".into());
            want.insert(lla);
        } else {
            got.remove(&lla);
        }
        assert_eq!(got, want, "addresses of {v1} in {ns}");
        assert_eq!(
            self.ovs_ports(&v0),
            vec![("br-int".to_string(), Some(format!("md-{i}")))],
            "OVS port {v0}"
        );
    }

    fn assert_gone(&self, i: u8) {
        let [v0, v1] = veth_names(&self.net(i));
        assert!(!namespaces(&self.guard.prefix).contains(&self.ns(i)));
        assert!(link(None, &v0).is_none() && link(None, &v1).is_none());
        assert_eq!(self.ovs_ports(&v0), vec![]);
    }

    fn assert_namespaces(&self, nets: &[u8]) {
        let want: BTreeSet<String> = nets.iter().map(|i| self.ns(*i)).collect();
        assert_eq!(namespaces(&self.guard.prefix), want);
    }
}

fn names(list: &[metaproxy::ovn::provision::Provisioned]) -> BTreeSet<String> {
    list.iter().map(|p| p.network.clone()).collect()
}

fn reconcile(p: &mut Provisioner, d: &Desired) -> Report {
    let r = p.reconcile(d).unwrap();
    assert!(r.complete(), "{r:#?}");
    r
}

#[test]
fn provisions_exactly_the_local_networks() {
    if !can_run("provisions_exactly_the_local_networks") {
        return;
    }
    let env = Env::new(1, 3);
    // Network 0: a VM here in 10.0.0.0/24; the second subnet holds no local VM.
    let dp0 = env.network(0, "10.0.0.2/24 10.9.0.2/24 fd00:9::2/64", "1442");
    env.vm(&dp0, "vm0", "fa:16:3e:aa:00:00 10.0.0.10");
    env.sb.sbctl(&["lsp-bind", "vm0", LOCAL]);
    // Network 1: its VM is on the other chassis.
    let dp1 = env.network(1, "10.1.0.2/24", "1442");
    env.vm(&dp1, "vm1", "fa:16:3e:aa:00:01 10.1.0.10");
    env.sb.sbctl(&["lsp-bind", "vm1", OTHER]);
    // Network 2: dual stack, here.
    let dp2 = env.network(2, "10.2.0.2/24 fd00:2::2/64", "1400");
    env.vm(&dp2, "vm2", "fa:16:3e:aa:00:02 10.2.0.10 fd00:2::10");
    env.sb.sbctl(&["lsp-bind", "vm2", LOCAL]);

    let d = env.desired_nets(&[0, 2]);
    let mut p = env.provisioner();
    let r = reconcile(&mut p, &d);
    assert_eq!(names(&r.created), BTreeSet::from([env.net(0), env.net(2)]));
    assert!(r.removed.is_empty() && r.updated.is_empty());
    env.assert_namespaces(&[0, 2]);
    env.assert_provisioned(0, &["169.254.169.254/32", "10.0.0.2/24"], 1442, false);
    env.assert_provisioned(2, &["169.254.169.254/32", "10.2.0.2/24"], 1400, true);
    assert_eq!(p.v6_state(&env.net(0)).unwrap(), V6State::Off);
    // DAD of fe80::a9fe:a9fe (about a second: one probe, nobody answers).
    assert_eq!(
        p.wait_v6(&env.net(2), Duration::from_secs(15)).unwrap(),
        V6State::Ready
    );

    // The same state again changes nothing, even from a new provisioner.
    let r = reconcile(&mut env.provisioner(), &d);
    assert!(!r.changed(), "{r:#?}");
    assert_eq!(
        names(&r.unchanged),
        BTreeSet::from([env.net(0), env.net(2)])
    );
    env.assert_namespaces(&[0, 2]);

    // Someone else on the link holds fe80::a9fe:a9fe (here the root end,
    // which answers the namespace end's DAD probe): the address is put back,
    // DAD fails, and that is reported, not fought over.
    let ns2 = env.ns(2);
    let [c0, c1] = veth_names(&env.net(2));
    sh(&[
        "ip",
        "-n",
        &ns2,
        "addr",
        "del",
        "fe80::a9fe:a9fe/128",
        "dev",
        &c1,
    ]);
    sh(&[
        "ip",
        "addr",
        "add",
        "fe80::a9fe:a9fe/128",
        "dev",
        &c0,
        "nodad",
    ]);
    let r = reconcile(&mut p, &d);
    assert_eq!(names(&r.updated), BTreeSet::from([env.net(2)]), "{r:#?}");
    assert_eq!(
        p.wait_v6(&env.net(2), Duration::from_secs(15)).unwrap(),
        V6State::DadFailed
    );
    let r = reconcile(&mut p, &d);
    assert!(!r.changed(), "{r:#?}");
    assert_eq!(
        r.unchanged
            .iter()
            .find(|x| x.network == env.net(2))
            .unwrap()
            .v6,
        V6State::DadFailed
    );
}

#[test]
fn follows_binds_unbinds_cidrs_and_live_migration() {
    if !can_run("follows_binds_unbinds_cidrs_and_live_migration") {
        return;
    }
    let env = Env::new(2, 3);
    let dp0 = env.network(0, "10.0.0.2/24", "1442");
    env.vm(&dp0, "vm0", "fa:16:3e:aa:00:00 10.0.0.10");
    env.sb.sbctl(&["lsp-bind", "vm0", LOCAL]);
    let dp1 = env.network(1, "10.1.0.2/24", "1442");
    env.vm(&dp1, "vm1", "fa:16:3e:aa:00:01 10.1.0.10");
    let dp2 = env.network(2, "10.2.0.2/24", "1442");
    env.vm(&dp2, "vm2", "fa:16:3e:aa:00:02 10.2.0.10");
    env.sb.sbctl(&["lsp-bind", "vm2", OTHER]);
    let mut p = env.provisioner();
    let r = reconcile(&mut p, &env.desired_nets(&[0]));
    assert_eq!(names(&r.created), BTreeSet::from([env.net(0)]));
    env.assert_namespaces(&[0]);

    // A VM of network 1 is bound here.
    env.sb.sbctl(&["lsp-bind", "vm1", LOCAL]);
    let r = reconcile(&mut p, &env.desired_nets(&[0, 1]));
    assert_eq!(names(&r.created), BTreeSet::from([env.net(1)]));
    assert!(r.updated.is_empty() && r.removed.is_empty(), "{r:#?}");
    env.assert_provisioned(1, &["169.254.169.254/32", "10.1.0.2/24"], 1442, false);

    // Neutron moves network 0's metadata address.
    env.set_port(
        "md-0",
        json!({"external_ids": ["map", [["neutron:cidrs", "10.0.0.3/24"], ["neutron:mtu", "1442"],
                                        ["neutron:device_owner", "network:distributed"]]]}),
    );
    let d = env.desired_when("10.0.0.3/24 planned", |d| {
        d.networks
            .get(&env.net(0))
            .is_some_and(|p| p.addresses.iter().any(|c| c.to_string() == "10.0.0.3/24"))
    });
    let r = reconcile(&mut p, &d);
    assert_eq!(names(&r.updated), BTreeSet::from([env.net(0)]));
    assert!(r.created.is_empty() && r.removed.is_empty(), "{r:#?}");
    env.assert_provisioned(0, &["169.254.169.254/32", "10.0.0.3/24"], 1442, false);

    // Live migration of vm2 to here: this chassis in additional_chassis.
    env.set_port(
        "vm2",
        json!({"additional_chassis": ["uuid", env.chassis_uuid(LOCAL)]}),
    );
    let r = reconcile(&mut p, &env.desired_nets(&[0, 1, 2]));
    assert_eq!(names(&r.created), BTreeSet::from([env.net(2)]));
    env.assert_provisioned(2, &["169.254.169.254/32", "10.2.0.2/24"], 1442, false);

    // The last VM of network 1 leaves; the migration is cancelled.
    env.sb.sbctl(&["lsp-unbind", "vm1"]);
    env.set_port("vm2", json!({"additional_chassis": ["set", []]}));
    let r = reconcile(&mut p, &env.desired_nets(&[0]));
    assert_eq!(
        r.removed.iter().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from([env.ns(1), env.ns(2)])
    );
    env.assert_namespaces(&[0]);
    env.assert_gone(1);
    env.assert_gone(2);
    env.assert_provisioned(0, &["169.254.169.254/32", "10.0.0.3/24"], 1442, false);
}

#[test]
fn restart_adopts_or_removes_leftovers_without_duplicates() {
    if !can_run("restart_adopts_or_removes_leftovers_without_duplicates") {
        return;
    }
    let env = Env::new(3, 4);
    let dp0 = env.network(0, "10.0.0.2/24", "1442");
    env.vm(&dp0, "vm0", "fa:16:3e:aa:00:00 10.0.0.10");
    env.sb.sbctl(&["lsp-bind", "vm0", LOCAL]);
    let dp1 = env.network(1, "10.1.0.2/24", "1442");
    env.vm(&dp1, "vm1", "fa:16:3e:aa:00:01 10.1.0.10");
    env.sb.sbctl(&["lsp-bind", "vm1", LOCAL]);
    // Network 3 has its metadata port but its VM left this node while the
    // old agent was down.
    let dp3 = env.network(3, "10.3.0.2/24", "1442");
    env.vm(&dp3, "vm3", "fa:16:3e:aa:00:03 10.3.0.10");
    env.sb.sbctl(&["lsp-bind", "vm3", LOCAL]);
    let r = reconcile(&mut env.provisioner(), &env.desired_nets(&[0, 1, 3]));
    assert_eq!(r.created.len(), 3);

    // Meanwhile (no provisioner running): the VM of network 3 moves away,
    // network 0's MTU changes ...
    env.sb.sbctl(&["lsp-unbind", "vm3"]);
    env.set_port(
        "md-0",
        json!({"external_ids": ["map", [["neutron:cidrs", "10.0.0.2/24"], ["neutron:mtu", "1450"],
                                        ["neutron:device_owner", "network:distributed"]]]}),
    );
    // ... and the host drifts by hand: a stray address, a downed end, a
    // root end whose peer is not in the namespace (paired with a stranger), network 0's port
    // moved to another bridge (as after an ML2/OVS migration).
    let ns0 = env.ns(0);
    let [a0, a1] = veth_names(&env.net(0));
    sh(&["ip", "-n", &ns0, "addr", "add", "192.0.2.99/24", "dev", &a1]);
    sh(&["ip", "-n", &ns0, "link", "set", "dev", &a1, "down"]);
    let [b0, b1] = veth_names(&env.net(1));
    sh(&["ip", "link", "del", &b0]);
    let stranger = format!("x{}", &b0[1..]);
    sh(&[
        "ip", "link", "add", &b0, "type", "veth", "peer", "name", &stranger,
    ]);
    let ports = env.ovs.transact(json!([{"op": "select", "table": "Port",
        "where": [["name", "==", a0]], "columns": ["_uuid"]}]));
    let pu = ports[0]["rows"][0]["_uuid"][1]
        .as_str()
        .unwrap()
        .to_string();
    env.ovs.transact(json!([
        {"op": "mutate", "table": "Bridge", "where": [["name", "==", "br-int"]],
         "mutations": [["ports", "delete", ["set", [["uuid", pu]]]]]},
        {"op": "mutate", "table": "Bridge", "where": [["name", "==", "br-old"]],
         "mutations": [["ports", "insert", ["set", [["uuid", pu]]]]]}
    ]));
    // ... and network 1's interface lost its iface-id to someone's edit.
    env.ovs.transact(
        json!([{"op": "mutate", "table": "Interface", "where": [["name", "==", b0]],
        "mutations": [["external_ids", "delete", ["set", ["iface-id"]]],
                      ["external_ids", "insert", ["map", [["iface-id", "stale-id"]]]]]}]),
    );
    assert_eq!(
        env.ovs_ports(&a0),
        vec![("br-old".to_string(), Some("md-0".to_string()))]
    );

    let d = env.desired_when("network 0 at MTU 1450, network 3 gone", |d| {
        d.networks.len() == 2
            && d.networks
                .get(&env.net(0))
                .is_some_and(|p| p.mtu == Some(1450))
    });
    let mut p = env.provisioner();
    let r = reconcile(&mut p, &d);
    assert_eq!(r.removed, vec![env.ns(3)]);
    assert_eq!(
        names(&r.updated),
        BTreeSet::from([env.net(0), env.net(1)]),
        "{r:#?}"
    );
    assert!(r.created.is_empty());
    env.assert_namespaces(&[0, 1]);
    env.assert_gone(3);
    env.assert_provisioned(0, &["169.254.169.254/32", "10.0.0.2/24"], 1450, false);
    env.assert_provisioned(1, &["169.254.169.254/32", "10.1.0.2/24"], 1442, false);
    let b = link(None, &b0).unwrap();
    assert!(link(None, &b1).is_none(), "{b1} only inside the namespace");
    assert_eq!(b["linkinfo"]["info_kind"], "veth", "{b0} is a veth again");

    // And once more: nothing to do.
    let r = reconcile(&mut p, &d);
    assert!(!r.changed(), "{r:#?}");
}
