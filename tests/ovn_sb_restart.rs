//! Issue 16's "kill the SB server mid-storm and restart it", as root:
//! `metaproxy ovn` against a real Debian Southbound `ovsdb-server` (a
//! one-member Raft cluster, which has transaction ids, and a standalone
//! one, which has none), with a steady load of cloud-init-like GETs from
//! three VMs on one network, each checking that every answer is its own
//! instance. The Southbound server is SIGKILLed mid-load and changed before
//! it answers again:
//!
//! - standalone: offline, with `ovsdb-tool transact` on its file while it is
//!   down (the server comes back with a database the replica never saw);
//! - clustered: right after the restart, through the server (a Raft file
//!   cannot be written offline); the replica usually resumes from its last
//!   transaction id (or takes a full snapshot if the server says
//!   `found = false`).
//!
//! The changes: VM 3's port is deleted, VM 2's port is handed to another
//! instance (a port re-attached), and a port on a second network is bound
//! to this chassis.
//!
//! What a user would notice, asserted:
//! - no answer is ever another VM's data (each address only ever gets its
//!   port's owner at that time, old owner strictly before new);
//! - while the Southbound server is down, every VM is still served from the
//!   replica, old answers included, as Neutron's agent does (its ovsdbapp
//!   IDL keeps its in-memory tables while it reconnects, and
//!   `get_network_port_bindings_by_ip` reads them);
//! - the unchanged VM never gets anything but 200 and its own instance,
//!   before, during and after the outage;
//! - after the reconnect the replica equals a fresh snapshot, seen through
//!   behaviour: for every address of both networks, the answer from
//!   `metaproxy ovn` is what a fresh `metaproxy ovn-dump-replica` of the
//!   same database says (its port's `neutron:device_id`, or 404 where the
//!   fresh index has no single port), and the newly bound network is
//!   provisioned and serves its VM.
//!
//! The VMs are threads in the VM namespace, each binding its own source
//! address. Without root, `ip`, `curl`, cloud-init or the OVN packages:
//! `SKIPPED`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufReader, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::netns::{can_run, sh, Daemon, Namespaces, SECRET};
use common::ovn::{
    api_port, dump_replica, init_chassis, namespaces, poll_daemon, route_metadata_via, start_api,
    uuid_of, vswitch_with_br_int, write_ovn_config, Netns,
};
use common::ovsdb::{available, Kind, Server};
use metaproxy::ovn::provision::veth_names;
use serde_json::{json, Value};

const CHASSIS: &str = "compute-sbk";
const LIMIT: Duration = Duration::from_secs(30);
/// What cloud-init asks first and what names the instance.
const PATHS: [&str; 2] = ["/openstack/latest/meta_data.json", "/openstack"];

/// Deletes on drop every namespace with the test's prefix, the networks'
/// veths and the test's own links.
struct Guard {
    prefix: String,
    nets: Vec<String>,
    links: Vec<String>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        for ns in namespaces(&self.prefix) {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
        for v in self
            .nets
            .iter()
            .flat_map(|n| veth_names(n))
            .chain(self.links.iter().cloned())
        {
            let _ = Command::new("ip").args(["link", "del", &v]).output();
        }
    }
}

/// One answer a VM got: its status and, for a 200 of `meta_data.json`, the
/// instance it names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Ok(Option<String>),
    Status(u16),
    Failed(String),
}

/// One GET from `src` to 169.254.169.254:80 on the calling thread's
/// namespace, `Connection: close` as cloud-init's `requests` does.
fn get_from(src: IpAddr, path: &str) -> Answer {
    let go = || -> std::io::Result<common::Resp> {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.bind(&SocketAddr::new(src, 0).into())?;
        let to: SocketAddr = "169.254.169.254:80".parse().unwrap();
        s.connect_timeout(&to.into(), Duration::from_secs(10))?;
        let mut s = std::net::TcpStream::from(s);
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nUser-Agent: Cloud-Init/23.1\r\n\
             Accept: */*\r\nConnection: close\r\n\r\n"
        )?;
        common::read_response(&mut BufReader::new(s), false)
    };
    match go() {
        Ok(r) if r.status == 200 && path.ends_with("meta_data.json") => {
            let v: Value = serde_json::from_slice(&r.body).unwrap_or_default();
            Answer::Ok(v["uuid"].as_str().map(str::to_string))
        }
        Ok(r) if r.status == 200 => Answer::Ok(None),
        Ok(r) => Answer::Status(r.status),
        Err(e) => Answer::Failed(e.to_string()),
    }
}

/// Enter the network namespace `/run/netns/<ns>` on this thread only.
fn enter(ns: &str) {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
}

/// A VM in a loop: one GET after another (the two paths in turn), each
/// recorded with when it started.
struct Vm {
    log: Arc<Mutex<Vec<(Instant, Answer)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Vm {
    fn start(ns: &str, src: IpAddr, stop: &Arc<AtomicBool>) -> Vm {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (ns, stop2, log2) = (ns.to_string(), stop.clone(), log.clone());
        let thread = std::thread::spawn(move || {
            enter(&ns);
            let mut i = 0;
            while !stop2.load(Ordering::Relaxed) {
                let t = Instant::now();
                let a = get_from(src, PATHS[i % PATHS.len()]);
                log2.lock().unwrap().push((t, a));
                i += 1;
                // A steady load, not a busy loop on a shared machine.
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Vm {
            log,
            thread: Some(thread),
        }
    }

    /// The instances named by 200s of `meta_data.json` started after `t`.
    fn served_since(&self, t: Instant) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, _)| *at >= t)
            .filter_map(|(_, a)| match a {
                Answer::Ok(Some(u)) => Some(u.clone()),
                _ => None,
            })
            .collect()
    }

    fn last(&self) -> Option<Answer> {
        self.log.lock().unwrap().last().map(|(_, a)| a.clone())
    }

    fn stop(mut self) -> Vec<(Instant, Answer)> {
        self.thread.take().unwrap().join().unwrap();
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

/// Poll `ready` every 50 ms until `LIMIT`; on timeout fail with `what` and
/// the daemon's log.
fn poll(d: &Daemon, what: &str, ready: impl FnMut() -> bool) {
    poll_daemon(d, LIMIT, what, ready);
}

/// A VM namespace on `net`'s provisioned root veth end through a Linux
/// bridge, with `addrs` on its `eth0` and Neutron's host route to
/// 169.254.169.254 via the metadata port `md_ip`.
fn wire_vm(
    nss: &mut Namespaces,
    vm: &str,
    net: &str,
    bridge: &str,
    root: &str,
    addrs: &[&str],
    md_ip: &str,
) {
    nss.add(vm);
    let [tap0, _] = veth_names(net);
    sh(&["ip", "link", "add", bridge, "type", "bridge"]);
    sh(&[
        "ip", "link", "add", root, "type", "veth", "peer", "name", "eth0", "netns", vm,
    ]);
    for dev in [root, tap0.as_str()] {
        sh(&["ip", "link", "set", dev, "master", bridge]);
    }
    for dev in [bridge, root] {
        sh(&["ip", "link", "set", dev, "up"]);
    }
    for a in addrs {
        sh(&[
            "ip",
            "-n",
            vm,
            "addr",
            "add",
            &format!("{a}/24"),
            "dev",
            "eth0",
        ]);
    }
    sh(&["ip", "-n", vm, "link", "set", "eth0", "up"]);
    route_metadata_via(vm, md_ip);
}

/// What a fresh replica of `sb` says each address of `net` resolves to:
/// `metaproxy ovn-dump-replica`, a new monitor with its own snapshot.
fn fresh_answers(sb: &Server, ovs: &Server, net: &str) -> BTreeMap<IpAddr, Option<String>> {
    let dump = dump_replica(sb, ovs);
    let ports = &dump["tables"]["Port_Binding"];
    dump["index"][net]["ip"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(ip, uuids)| {
                    let owner = match uuids.as_array().map(Vec::as_slice) {
                        // `external_ids` in OVSDB's notation: ["map", [[k, v], ...]].
                        Some([u]) => ports[u.as_str().unwrap()]["external_ids"][1]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .find(|kv| kv[0] == "neutron:device_id")
                            .and_then(|kv| kv[1].as_str())
                            .map(str::to_string),
                        _ => None,
                    };
                    (ip.parse().unwrap(), owner)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn inventory(net_a: &str, net_b: &str, project: &str, vms: &[(&str, &str, &str)]) -> String {
    let mut s = format!(
        "dhcp_domain = \"novalocal\"\n\n[[network]]\nid = \"{net_a}\"\nname = \"sbk-a\"\nproject = \"{project}\"\n\
         [[network.subnet]]\nid = \"5b0c0000-0000-4000-8000-00000000000a\"\ncidr = \"10.81.0.0/24\"\n\n\
         [[network]]\nid = \"{net_b}\"\nname = \"sbk-b\"\nproject = \"{project}\"\n\
         [[network.subnet]]\nid = \"5b0c0000-0000-4000-8000-00000000000b\"\ncidr = \"10.82.0.0/24\"\n"
    );
    for (i, (inst, net, ip)) in vms.iter().enumerate() {
        s += &format!(
            "\n[[instance]]\nuuid = \"{inst}\"\nname = \"vm-sbk-{i}\"\nhostname = \"vm-sbk-{i}\"\nproject = \"{project}\"\n\
             [[instance.port]]\nid = \"5b0c0001-0000-4000-8000-{i:012x}\"\nnetwork = \"{net}\"\n\
             mac = \"fa:16:3e:5b:00:{i:02x}\"\nfixed_ips = [\"{ip}\"]\n"
        );
    }
    s
}

fn sb_killed_mid_storm(kind: Kind, name: &str) {
    if let Err(why) = can_run(&[]) {
        eprintln!("SKIPPED {name}: {why}");
        return;
    }
    if !available(name) {
        return;
    }
    let pid = std::process::id();
    let tag = match kind {
        Kind::Standalone => '0',
        Kind::Clustered => 'c',
    };
    // The first ten characters (the veth names) hold the pid and the kind.
    let net_a = format!("a{tag}{:06x}-5b0c-4a00-8000-00000000000a", pid & 0xff_ffff);
    let net_b = format!("b{tag}{:06x}-5b0c-4b00-8000-00000000000b", pid & 0xff_ffff);
    let inst = |i: u32| format!("5b0c{i:04x}-0000-4000-8000-{pid:012x}");
    let project = format!("5b0c{pid:028x}");
    let prefix = format!("ovnsbk{tag}{pid:x}-");
    let (ns_a, ns_b) = (format!("{prefix}{net_a}"), format!("{prefix}{net_b}"));
    let (br_a, br_b) = (format!("brk{tag}a{pid:x}"), format!("brk{tag}b{pid:x}"));
    let (root_a, root_b) = (format!("vmk{tag}a{pid:x}"), format!("vmk{tag}b{pid:x}"));
    let (vm_a, vm_b) = (format!("mpsbk{tag}{pid}a"), format!("mpsbk{tag}{pid}b"));
    let guard = Guard {
        prefix: prefix.clone(),
        nets: vec![net_a.clone(), net_b.clone()],
        links: vec![br_a.clone(), br_b.clone(), root_a.clone(), root_b.clone()],
    };
    drop(Guard {
        prefix: prefix.clone(),
        nets: guard.nets.clone(),
        links: guard.links.clone(),
    });
    let dir = tempfile::tempdir().unwrap();

    // Southbound as Neutron (through northd) leaves it: network A with its
    // metadata localport and three VMs bound here; network B with its
    // metadata port and one VM port not bound yet.
    let sb = Server::southbound(kind);
    let chassis = init_chassis(&sb, CHASSIS);
    let network = |net: &str, key: u32, md_mac: &str, cidr: &str, md_ip: &str| -> String {
        let dp = uuid_of(&sb.transact(json!([{"op": "insert", "table": "Datapath_Binding",
            "row": {"tunnel_key": key, "external_ids": ["map", [["name", format!("neutron-{net}")]]]}}])));
        sb.transact(json!([{"op": "insert", "table": "Port_Binding", "row": {
            "datapath": ["uuid", dp.as_str()], "logical_port": format!("md-{key}"), "tunnel_key": 1,
            "type": "localport", "mac": format!("{md_mac} {md_ip}"),
            "external_ids": ["map", [["neutron:cidrs", cidr], ["neutron:device_owner", "network:distributed"],
                                      ["neutron:device_id", format!("ovnmeta-{net}")]]]
        }}]));
        dp
    };
    let dp_a = network(&net_a, 1, "fa:16:3e:5b:a0:02", "10.81.0.2/24", "10.81.0.2");
    let dp_b = network(&net_b, 2, "fa:16:3e:5b:b0:02", "10.82.0.2/24", "10.82.0.2");
    let port = |dp: &str, lp: &str, key: u32, mac: &str, ip: &str, owner: &str| {
        sb.transact(json!([{"op": "insert", "table": "Port_Binding", "row": {
            "datapath": ["uuid", dp], "logical_port": lp, "tunnel_key": key, "type": "",
            "mac": format!("{mac} {ip}"),
            "external_ids": ["map", [["neutron:device_id", owner], ["neutron:project_id", project.as_str()],
                                      ["neutron:device_owner", "compute:nova"]]]
        }}]));
    };
    let addr = |s: &str| -> IpAddr { s.parse().unwrap() };
    let (ip1, ip2, ip3, ip_b) = ("10.81.0.5", "10.81.0.6", "10.81.0.7", "10.82.0.5");
    port(&dp_a, "vm1", 2, "fa:16:3e:5b:00:00", ip1, &inst(1));
    port(&dp_a, "vm2", 3, "fa:16:3e:5b:00:01", ip2, &inst(2));
    port(&dp_a, "vm3", 4, "fa:16:3e:5b:00:02", ip3, &inst(3));
    port(&dp_b, "vmb", 2, "fa:16:3e:5b:00:03", ip_b, &inst(5));
    for lp in ["vm1", "vm2", "vm3"] {
        sb.sbctl(&["lsp-bind", lp, CHASSIS]);
    }
    let ovs = vswitch_with_br_int(CHASSIS);

    // Our metadata API knows every instance, also the port's new owner
    // (instance 4) and network B's VM (instance 5).
    let inv = dir.path().join("inventory.toml");
    std::fs::write(
        &inv,
        inventory(
            &net_a,
            &net_b,
            &project,
            &[
                (&inst(1), &net_a, ip1),
                (&inst(2), &net_a, ip2),
                (&inst(3), &net_a, ip3),
                (&inst(4), &net_a, "10.81.0.9"),
                (&inst(5), &net_b, ip_b),
            ],
        ),
    )
    .unwrap();
    let api = start_api(dir.path(), &inv);
    let api_port = api_port(&api);
    let cfg = write_ovn_config(dir.path(), &sb, &ovs, api_port, Netns::Discover(&prefix));
    let ovn = Daemon::start_cmd(
        "ovn",
        Command::new(env!("CARGO_BIN_EXE_metaproxy"))
            .args(["ovn", "--config", cfg.to_str().unwrap()])
            .env("RUNTIME_DIRECTORY", dir.path().join("run")),
        dir.path(),
    );
    poll(&ovn, "network A served", || {
        ovn.log_text()
            .contains(&format!("listener up: {ns_a} 169.254.169.254:80"))
    });
    assert_eq!(namespaces(&prefix), BTreeSet::from([ns_a.clone()]));

    // The three VMs of network A, in one namespace, each from its own
    // address, in a loop.
    let mut nss = Namespaces::default();
    wire_vm(
        &mut nss,
        &vm_a,
        &net_a,
        &br_a,
        &root_a,
        &[ip1, ip2, ip3],
        "10.81.0.2",
    );
    let stop = Arc::new(AtomicBool::new(false));
    let vms: Vec<Vm> = [ip1, ip2, ip3]
        .iter()
        .map(|ip| Vm::start(&vm_a, addr(ip), &stop))
        .collect();
    let t_start = Instant::now();
    poll(&ovn, "each VM served its own instance", || {
        vms.iter()
            .zip([1, 2, 3])
            .all(|(vm, i)| vm.served_since(t_start).contains(&inst(i)))
    });

    // SIGKILL, mid-load.
    sb.kill();
    poll(&ovn, "the outage noticed", || {
        ovn.log_text().contains("southbound session ended")
    });
    let t_down = Instant::now();
    // The changes: VM 3's port deleted, VM 2's port handed to instance 4,
    // network B's port bound here.
    let changes = json!([
        {"op": "delete", "table": "Port_Binding", "where": [["logical_port", "==", "vm3"]]},
        {"op": "mutate", "table": "Port_Binding", "where": [["logical_port", "==", "vm2"]],
         "mutations": [["external_ids", "delete", ["set", ["neutron:device_id"]]],
                       ["external_ids", "insert", ["map", [["neutron:device_id", inst(4)]]]]]},
        {"op": "update", "table": "Port_Binding", "where": [["logical_port", "==", "vmb"]],
         "row": {"chassis": ["uuid", chassis.as_str()]}}
    ]);
    if kind == Kind::Standalone {
        // Offline, in the file the server will come back with.
        let mut txn = vec![json!("OVN_Southbound")];
        txn.extend(changes.as_array().unwrap().iter().cloned());
        let out = Command::new("ovsdb-tool")
            .arg("transact")
            .arg(&sb.db)
            .arg(Value::Array(txn).to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("error"),
            "{out:?}"
        );
    }
    // While the server is down, every VM is still served from the replica:
    // its last snapshot, old answers included (as Neutron's IDL).
    poll(
        &ovn,
        "VMs served while the Southbound server is down",
        || {
            vms.iter().zip([1, 2, 3]).all(|(vm, i)| {
                vm.served_since(t_down)
                    .iter()
                    .filter(|u| **u == inst(i))
                    .count()
                    >= 3
            })
        },
    );
    assert!(
        !ovn.log_text().contains("in sync via CondSince: 0 ports"),
        "{}",
        ovn.log_text()
    );
    let t_up = Instant::now();
    sb.start();
    if kind == Kind::Clustered {
        sb.transact(changes);
    }

    // After the reconnect: the deleted port is 404, the handed-over one
    // names its new owner, network B is provisioned.
    poll(&ovn, "the changes served after the reconnect", || {
        vms[1].served_since(t_up).last() == Some(&inst(4))
            && matches!(vms[2].last(), Some(Answer::Status(404)))
    });
    poll(&ovn, "network B provisioned and served", || {
        ovn.log_text()
            .contains(&format!("listener up: {ns_b} 169.254.169.254:80"))
    });
    wire_vm(
        &mut nss,
        &vm_b,
        &net_b,
        &br_b,
        &root_b,
        &[ip_b],
        "10.82.0.2",
    );
    let vm_net_b = Vm::start(&vm_b, addr(ip_b), &stop);
    poll(&ovn, "network B's VM served", || {
        vm_net_b.served_since(t_up).contains(&inst(5))
    });
    let log = ovn.log_text();
    // A second session after the restart. The standalone server has no
    // transaction ids: a full snapshot. The clustered one usually resumes
    // from the last transaction id ("(resumed)"); a restarted Raft server
    // may also answer found = false (seen in 2 of about 20 runs here, not
    // explained yet), which is a full snapshot. Either way the replica must
    // end equal to a fresh one (below); the resume itself is asserted by
    // tests/ovn_replica.rs.
    assert!(log.matches("in sync via CondSince").count() >= 2, "{log}");
    if kind == Kind::Standalone {
        assert!(!log.contains("(resumed)"), "{log}");
    }

    // The replica equals a fresh snapshot: every address of both networks
    // gets from metaproxy ovn what a fresh replica of the same database
    // resolves it to (the deleted port's address is in neither; metadata
    // localports are not bound, so not indexed, as in Neutron's scan).
    let mut fresh = fresh_answers(&sb, &ovs, &net_a);
    fresh.extend(fresh_answers(&sb, &ovs, &net_b));
    assert_eq!(
        fresh,
        BTreeMap::from([
            (addr(ip1), Some(inst(1))),
            (addr(ip2), Some(inst(4))),
            (addr(ip_b), Some(inst(5))),
        ]),
        "the fresh replica"
    );
    stop.store(true, Ordering::Relaxed);
    let logs: Vec<_> = vms.into_iter().map(Vm::stop).collect();
    let log_b = vm_net_b.stop();
    let now = |log: &[(Instant, Answer)]| {
        log.iter()
            .rev()
            .find_map(|(_, a)| match a {
                Answer::Ok(Some(u)) => Some(Some(u.clone())),
                Answer::Status(404) => Some(None),
                _ => None,
            })
            .expect("an answer")
    };
    for (ip, log) in [ip1, ip2, ip3].iter().zip(&logs).chain([(&ip_b, &log_b)]) {
        let want = fresh.get(&addr(ip)).cloned().flatten();
        assert_eq!(
            now(log),
            want,
            "{ip}: metaproxy ovn and a fresh replica disagree"
        );
    }

    // Never another VM's data: each address only ever got its port's owner
    // of the time, the old one strictly before the new one.
    let owners = |log: &[(Instant, Answer)]| -> Vec<Answer> {
        let mut seq: Vec<Answer> = Vec::new();
        for (_, a) in log {
            if matches!(a, Answer::Ok(None)) {
                continue;
            }
            if seq.last() != Some(a) {
                seq.push(a.clone());
            }
        }
        seq
    };
    let ok = |i| Answer::Ok(Some(inst(i)));
    // The unchanged VM: only ever 200 and its own instance, also while the
    // Southbound server was down and through the reconnect.
    assert_eq!(owners(&logs[0]), vec![ok(1)], "{ip1}: {:?}", logs[0]);
    assert!(
        logs[0].iter().all(|(_, a)| matches!(a, Answer::Ok(_))),
        "{ip1} was not always served: {:?}",
        logs[0]
    );
    assert_eq!(owners(&logs[1]), vec![ok(2), ok(4)], "{ip2}: {:?}", logs[1]);
    assert_eq!(
        owners(&logs[2]),
        vec![ok(3), Answer::Status(404)],
        "{ip3}: {:?}",
        logs[2]
    );
    assert_eq!(owners(&log_b), vec![ok(5)], "{ip_b}: {:?}", log_b);
    let log = ovn.log_text();
    assert!(
        !log.contains(SECRET),
        "the shared secret was logged:\n{log}"
    );
    drop(ovn);
    drop(api);
    drop(nss);
    drop(guard);
}

#[test]
fn clustered_southbound_killed_mid_storm_serves_throughout_and_catches_up() {
    sb_killed_mid_storm(
        Kind::Clustered,
        "clustered_southbound_killed_mid_storm_serves_throughout_and_catches_up",
    );
}

#[test]
fn standalone_southbound_killed_and_changed_offline_mid_storm_resnapshots() {
    sb_killed_mid_storm(
        Kind::Standalone,
        "standalone_southbound_killed_and_changed_offline_mid_storm_resnapshots",
    );
}
