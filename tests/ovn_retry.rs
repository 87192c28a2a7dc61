//! `metaproxy ovn` when provisioning does not go to plan, as root, against
//! real Debian Southbound and Open_vSwitch `ovsdb-server`s:
//!
//! - **failed DAD**: another host on the network's link already answers for
//!   `fe80::a9fe:a9fe`. As Neutron (its agent waits for DAD, then starts
//!   haproxy on IPv4 only), the namespace is served on IPv4, the failure is
//!   said once, the node still reports alive, and nothing listens on the
//!   duplicate address;
//! - **retry with backoff**: the local Open_vSwitch database goes away just
//!   as a VM is bound here. The pass is incomplete (the OVS port cannot be
//!   added), so it is retried after 1 s, then 2 s, ... (doubling to 60 s),
//!   and completes on its own once the database is back: the port appears
//!   on br-int with the metadata port's `iface-id`, and the VM is served.
//!
//! Without root, `ip`, `curl`, cloud-init or the OVN packages: `SKIPPED`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::netns::{can_run, in_ns, sh, Daemon, Namespaces, SECRET};
use common::ovn::{
    api_port, init_chassis, poll_daemon, route_metadata_via, start_api, vswitch_with_br_int,
};
use common::ovsdb::{available, Kind, Server};
use metaproxy::ovn::provision::veth_names;
use serde_json::{json, Value};

const CHASSIS: &str = "compute-retry";
const LIMIT: Duration = Duration::from_secs(30);
const ALIVE: &str = "reporting this chassis alive";

fn poll(d: &Daemon, what: &str, ready: impl FnMut() -> bool) {
    poll_daemon(d, LIMIT, what, ready);
}

fn at(log: &str, needle: &str) -> usize {
    log.find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in the log:\n{log}"))
}

/// Deletes on drop the test's namespace, veths and links.
struct Guard {
    ns: String,
    links: Vec<String>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        for l in &self.links {
            let _ = Command::new("ip").args(["link", "del", l]).output();
        }
    }
}

/// One network with its metadata port and a VM port (IPv4 + IPv6) not
/// bound yet, a chassis, an OVS database with br-int, our API with the VM,
/// and `metaproxy ovn` serving `prefix`.
struct Node {
    net: String,
    inst: String,
    prefix: String,
    ns: String,
    sb: Server,
    ovs: Server,
    dir: tempfile::TempDir,
    api: Option<Daemon>,
}

impl Node {
    fn new(tag: u8) -> Node {
        let pid = std::process::id();
        let net = format!(
            "{tag:02x}{:06x}-5a43-4b7b-8b8b-5dcd3b1b0a01",
            pid & 0xff_ffff
        );
        let inst = format!("0e{tag:02x}0001-0000-4000-8000-{pid:012x}");
        let project = format!("0e{tag:02x}{pid:028x}");
        let prefix = format!("ovnrt{tag:x}{pid:x}-");
        let ns = format!("{prefix}{net}");
        let dir = tempfile::tempdir().unwrap();
        let sb = Server::southbound(Kind::Standalone);
        init_chassis(&sb, CHASSIS);
        let dp = sb.transact(json!([{"op": "insert", "table": "Datapath_Binding",
            "row": {"tunnel_key": 1, "external_ids": ["map", [["name", format!("neutron-{net}")]]]}}]));
        let dp = dp[0]["uuid"][1].as_str().unwrap().to_string();
        sb.transact(json!([
            {"op": "insert", "table": "Port_Binding", "row": {
                "datapath": ["uuid", dp.as_str()], "logical_port": "md-port", "tunnel_key": 1,
                "type": "localport", "mac": "fa:16:3e:0d:00:02 10.83.0.2 fd83::2",
                "external_ids": ["map", [["neutron:cidrs", "10.83.0.2/24 fd83::2/64"],
                                          ["neutron:device_owner", "network:distributed"]]]}},
            {"op": "insert", "table": "Port_Binding", "row": {
                "datapath": ["uuid", dp.as_str()], "logical_port": "vm-port", "tunnel_key": 2,
                "type": "", "mac": "fa:16:3e:0d:00:05 10.83.0.5 fd83::5",
                "external_ids": ["map", [["neutron:device_id", inst.as_str()],
                                          ["neutron:project_id", project.as_str()]]]}}
        ]));
        let ovs = vswitch_with_br_int(CHASSIS);
        let inv = dir.path().join("inventory.toml");
        std::fs::write(
            &inv,
            format!(
                "[[network]]\nid = \"{net}\"\nname = \"retry\"\nproject = \"{project}\"\n\
                 [[network.subnet]]\nid = \"0e0d0000-0000-4000-8000-00000000000a\"\ncidr = \"10.83.0.0/24\"\n\n\
                 [[instance]]\nuuid = \"{inst}\"\nname = \"vm-retry\"\nhostname = \"vm-retry\"\nproject = \"{project}\"\n\
                 [[instance.port]]\nid = \"0e0d0002-0000-4000-8000-00000000000a\"\nnetwork = \"{net}\"\n\
                 mac = \"fa:16:3e:0d:00:05\"\nfixed_ips = [\"10.83.0.5\"]\n"
            ),
        )
        .unwrap();
        let api = start_api(dir.path(), &inv);
        Node {
            net,
            inst,
            prefix,
            ns,
            sb,
            ovs,
            dir,
            api: Some(api),
        }
    }

    fn start(&self) -> Daemon {
        let api_port = api_port(self.api.as_ref().unwrap());
        let cfg = self.dir.path().join("ovn.toml");
        std::fs::write(
            &cfg,
            format!(
                "[ovn]\novn_sb_connection = \"{}\"\nmetadata_proxy_shared_secret = \"{SECRET}\"\n\
                 [ovn.ovs]\novsdb_connection = \"{}\"\n[ovn.nova]\nnova_metadata_host = \"127.0.0.1\"\n\
                 nova_metadata_port = {api_port}\n\n[proxy]\nworkers = 1\ncontrol_socket = \"{}\"\n\
                 [proxy.discover]\novn_prefixes = [\"{}\"]\n",
                self.sb.remote(),
                self.ovs.remote(),
                self.dir.path().join("ctl.sock").display(),
                self.prefix,
            ),
        )
        .unwrap();
        Daemon::start_cmd(
            "ovn",
            Command::new(env!("CARGO_BIN_EXE_metaproxy"))
                .args(["ovn", "--config", cfg.to_str().unwrap()])
                .env("RUNTIME_DIRECTORY", self.dir.path().join("run")),
            self.dir.path(),
        )
    }

    /// The OVS interfaces named `tap<net[:10]>0`, as their `external_ids`.
    fn ovs_port(&self) -> Vec<String> {
        let [tap0, _] = veth_names(&self.net);
        let v = self
            .ovs
            .transact(json!([{"op": "select", "table": "Interface",
            "where": [["name", "==", tap0.as_str()]], "columns": ["external_ids"]}]));
        v[0]["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["external_ids"].to_string())
            .collect()
    }
}

/// A VM namespace on `bridge` (created, with `tap0` in it), with the VM's
/// IPv4 address and Neutron's host route to 169.254.169.254.
fn wire_vm(nss: &mut Namespaces, vm: &str, bridge: &str, root: &str, tap0: &str) {
    nss.add(vm);
    sh(&["ip", "link", "add", bridge, "type", "bridge"]);
    sh(&[
        "ip", "link", "add", root, "type", "veth", "peer", "name", "eth0", "netns", vm,
    ]);
    for dev in [root, tap0] {
        sh(&["ip", "link", "set", dev, "master", bridge]);
    }
    for dev in [bridge, root] {
        sh(&["ip", "link", "set", dev, "up"]);
    }
    sh(&[
        "ip",
        "-n",
        vm,
        "link",
        "set",
        "eth0",
        "address",
        "fa:16:3e:0d:00:05",
    ]);
    sh(&["ip", "-n", vm, "addr", "add", "10.83.0.5/24", "dev", "eth0"]);
    sh(&["ip", "-n", vm, "link", "set", "eth0", "up"]);
    route_metadata_via(vm, "10.83.0.2");
}

/// The node for test `name`, set up with `tag`; `None`, saying why, when the
/// test cannot run here.
fn node_for(name: &str, tag: u8) -> Option<Node> {
    if let Err(why) = can_run(&[]) {
        eprintln!("SKIPPED {name}: {why}");
        return None;
    }
    if !available(name) {
        return None;
    }
    Some(Node::new(tag))
}

/// The links wiring a VM to `node`'s network, named after `c`: the
/// network's veth pair, the bridge, the VM's root-side veth and the VM's
/// namespace; and the guard that deletes them (and the network's
/// namespace) on drop.
fn vm_links(node: &Node, c: char) -> ([String; 2], String, String, String, Guard) {
    let pid = std::process::id();
    let [tap0, tap1] = veth_names(&node.net);
    let (bridge, root, vm) = (
        format!("brr{c}{pid:x}"),
        format!("vmr{c}{pid:x}"),
        format!("mprt{pid}{c}"),
    );
    let guard = Guard {
        ns: node.ns.clone(),
        links: vec![tap0.clone(), bridge.clone(), root.clone()],
    };
    ([tap0, tap1], bridge, root, vm, guard)
}

fn meta_data(vm: &str) -> Option<String> {
    let out = in_ns(vm, "curl")
        .args([
            "-sf",
            "--max-time",
            "5",
            "http://169.254.169.254/openstack/latest/meta_data.json",
        ])
        .output()
        .unwrap();
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v["uuid"].as_str().map(str::to_string)
}

#[test]
fn failed_dad_serves_ipv4_only_and_still_reports_alive() {
    let Some(node) = node_for("failed_dad_serves_ipv4_only_and_still_reports_alive", 0xd1) else {
        return;
    };
    let ([tap0, tap1], bridge, root, vm, guard) = vm_links(&node, 'd');
    // The network's namespace is already there (a leftover the daemon
    // adopts), wired to the VM, and the VM already holds fe80::a9fe:a9fe:
    // the namespace end's DAD for it must fail.
    sh(&["ip", "netns", "add", &node.ns]);
    sh(&[
        "ip", "link", "add", &tap0, "type", "veth", "peer", "name", &tap1, "netns", &node.ns,
    ]);
    let mut nss = Namespaces::default();
    wire_vm(&mut nss, &vm, &bridge, &root, &tap0);
    sh(&[
        "ip",
        "-n",
        &vm,
        "addr",
        "add",
        "fe80::a9fe:a9fe/128",
        "dev",
        "eth0",
        "nodad",
    ]);
    node.sb.sbctl(&["lsp-bind", "vm-port", CHASSIS]);

    let ovn = node.start();
    poll(&ovn, "liveness after the first pass", || {
        ovn.log_text().contains(ALIVE)
    });
    let log = ovn.log_text();
    let failed = at(
        &log,
        &format!(
            "{}: DAD failed for fe80::a9fe:a9fe (another node answers for it); serving IPv4 only",
            node.ns
        ),
    );
    assert!(
        failed < at(&log, "first provisioning pass done: 1 namespace(s)")
            && failed < at(&log, ALIVE),
        "{log}"
    );
    assert_eq!(log.matches("DAD failed").count(), 1, "said once:\n{log}");
    assert!(
        log.contains(&format!("listener up: {} 169.254.169.254:80", node.ns)),
        "{log}"
    );
    assert!(
        !log.contains(&format!("listener up: {} [fe80", node.ns)),
        "a listener on the duplicate address:\n{log}"
    );
    // The VM is served its own instance over IPv4.
    let mut got = None;
    poll(&ovn, "the VM's meta_data.json over IPv4", || {
        got = meta_data(&vm);
        got.is_some()
    });
    assert_eq!(got.as_deref(), Some(node.inst.as_str()));
    drop(ovn);
    drop(nss);
    drop(guard);
}

#[test]
fn provisioning_retries_with_backoff_until_open_vswitch_is_back() {
    let Some(node) = node_for(
        "provisioning_retries_with_backoff_until_open_vswitch_is_back",
        0xb1,
    ) else {
        return;
    };
    let ([tap0, _], bridge, root, vm, guard) = vm_links(&node, 'b');
    let ovn = node.start();
    poll(&ovn, "first pass with no VM", || {
        ovn.log_text()
            .contains("first provisioning pass done: 0 namespace(s)")
    });
    // The local Open_vSwitch database goes away; then a VM is bound here.
    node.ovs.kill();
    node.sb.sbctl(&["lsp-bind", "vm-port", CHASSIS]);
    poll(&ovn, "two retries, 1 s then 2 s", || {
        let log = ovn.log_text();
        log.find("retrying in 1s")
            .is_some_and(|a| log[a..].contains("retrying in 2s"))
    });
    // Incomplete because of the Open_vSwitch part only, said with the delay.
    let log = ovn.log_text();
    assert!(
        log.contains(
            "provisioning incomplete (0 network(s) failed, 0 teardown(s) failed, Open_vSwitch: "
        ),
        "{log}"
    );
    // Back: the next retry completes on its own.
    node.ovs.start();
    poll(
        &ovn,
        "the OVS port with the metadata port's iface-id",
        || node.ovs_port() == vec![r#"["map",[["iface-id","md-port"]]]"#.to_string()],
    );
    let mut nss = Namespaces::default();
    wire_vm(&mut nss, &vm, &bridge, &root, &tap0);
    let mut got = None;
    poll(&ovn, "the VM's meta_data.json", || {
        got = meta_data(&vm);
        got.is_some()
    });
    assert_eq!(got.as_deref(), Some(node.inst.as_str()));
    drop(ovn);
    drop(nss);
    drop(guard);
}
