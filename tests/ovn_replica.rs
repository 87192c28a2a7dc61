//! The Southbound replica against real Debian `ovsdb-server`s (standalone
//! and clustered), rows written with `ovsdb-client transact` and
//! `ovn-sbctl` as Neutron and northd write them: the replica reaches the
//! database's contents, follows binds, MAC changes and deletes, resumes
//! (clustered) or re-snapshots (standalone) after the server is killed and
//! restarted, ending equal to a fresh replica, and keeps or drops the
//! connection by its echo probe. Without the packages: `SKIPPED`.

mod common;

use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixListener;
use std::time::Duration;

use common::ovn::{dump_replica, uuid_of};
use common::ovsdb::{available, Kind, Server};
use common::wait_until;
use metaproxy::ovn::ovsdb::datum::Uuid;
use metaproxy::ovn::ovsdb::frame::Decoder;
use metaproxy::ovn::ovsdb::{read_local_chassis, Conn, ConnOptions, Remote};
use metaproxy::ovn::replica::{Lookup, Method, Replica, SbConfig, SbMonitor};
use serde_json::{json, Value};

const LOCAL: &str = "chassis-local";
const OTHER: &str = "chassis-other";
const NET_A: &str = "5f0ee41c-5a43-4b7b-8b8b-5dcd3b1b0a01";
const NET_B: &str = "5f0ee41c-5a43-4b7b-8b8b-5dcd3b1b0a02";
const LIMIT: Duration = Duration::from_secs(20);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn opts(probe: Duration) -> ConnOptions {
    ConnOptions {
        connect_timeout: Duration::from_secs(5),
        probe_interval: probe,
        ..ConnOptions::default()
    }
}

fn monitor(sb: &Server, probe: Duration) -> SbMonitor {
    SbMonitor::start(SbConfig {
        remotes: Remote::parse_list(&sb.remote()).unwrap(),
        conn: opts(probe),
        chassis: LOCAL.to_string(),
    })
    .unwrap()
}

/// What Neutron (through northd) leaves in the Southbound DB.
struct Cloud<'a> {
    sb: &'a Server,
    next_key: std::cell::Cell<u32>,
}

impl<'a> Cloud<'a> {
    fn new(sb: &'a Server) -> Self {
        sb.sbctl(&["init"]);
        for (ch, encap_ip) in [(LOCAL, "192.0.2.1"), (OTHER, "192.0.2.2")] {
            sb.sbctl(&["chassis-add", ch, "geneve", encap_ip]);
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
        Cloud {
            sb,
            next_key: std::cell::Cell::new(1),
        }
    }

    fn key(&self) -> u32 {
        let k = self.next_key.get();
        self.next_key.set(k + 1);
        k
    }

    fn network(&self, net: &str) -> String {
        let k = self.key();
        uuid_of(&self.sb.transact(json!([{"op": "insert", "table": "Datapath_Binding", "row": {
            "tunnel_key": k,
            "external_ids": ["map", [["name", format!("neutron-{net}")], ["name2", "private"],
                                      ["logical-switch", "6e0c5d0e-0000-4000-8000-000000000001"]]]
        }}])))
    }

    fn port(&self, dp: &str, name: &str, kind: &str, mac: &str, device_id: &str) -> String {
        let k = self.key();
        uuid_of(&self.sb.transact(json!([{"op": "insert", "table": "Port_Binding", "row": {
            "datapath": ["uuid", dp], "logical_port": name, "tunnel_key": k, "type": kind,
            "mac": mac,
            "external_ids": ["map", [["neutron:device_id", device_id],
                                      ["neutron:project_id", "0b3cfd5e3d9f4d1e9c0a1f6b1c2d3e4f"],
                                      ["neutron:cidrs", "10.0.0.5/24"],
                                      ["neutron:device_owner", if kind == "localport" { "network:distributed" } else { "compute:nova" }]]]
        }}])))
    }

    fn bind(&self, port: &str, chassis: &str) {
        self.sb.sbctl(&["lsp-bind", port, chassis]);
    }

    fn set(&self, port_uuid: &str, row: Value) {
        self.sb
            .transact(json!([{"op": "update", "table": "Port_Binding",
            "where": [["_uuid", "==", ["uuid", port_uuid]]], "row": row}]));
    }

    fn delete(&self, table: &str, uuid: &str) {
        self.sb.transact(json!([{"op": "delete", "table": table,
            "where": [["_uuid", "==", ["uuid", uuid]]]}]));
    }
}

fn found(r: &Replica, net: &str, addr: &str) -> Option<String> {
    match r.lookup(net, ip(addr)) {
        Lookup::Found(u) => Some(
            r.port(u).unwrap()["logical_port"].atoms()[0]
                .as_str()
                .unwrap()
                .to_string(),
        ),
        _ => None,
    }
}

/// A fresh monitor's replica once it has caught up with `want`.
fn fresh_equal(sb: &Server, long_lived: &SbMonitor) {
    let fresh = monitor(sb, Duration::ZERO);
    wait_until("a fresh replica equals the long-lived one", LIMIT, || {
        let a = fresh.shared().snapshot();
        let b = long_lived.shared().snapshot();
        fresh.shared().stats().sessions >= 1 && *a == *b
    });
}

fn follows(kind: Kind) {
    let sb = Server::southbound(kind);
    let cloud = Cloud::new(&sb);
    let a = cloud.network(NET_A);
    let b = cloud.network(NET_B);
    cloud.port(
        &a,
        "meta-a",
        "localport",
        "fa:16:3e:00:00:02 10.0.0.2",
        &format!("ovnmeta-{NET_A}"),
    );
    cloud.port(
        &a,
        "vm1",
        "",
        "fa:16:3e:00:00:05 10.0.0.5",
        "11111111-1111-4111-8111-111111111111",
    );
    cloud.bind("vm1", LOCAL);
    cloud.port(
        &a,
        "vm2",
        "",
        "fa:16:3e:00:00:06 10.0.0.6",
        "22222222-2222-4222-8222-222222222222",
    );
    cloud.bind("vm2", OTHER);
    cloud.port(
        &a,
        "unbound",
        "",
        "fa:16:3e:00:00:07 10.0.0.7",
        "33333333-3333-4333-8333-333333333333",
    );
    let vm3 = cloud.port(
        &b,
        "vm3",
        "",
        "fa:16:3e:00:00:15 10.0.0.5 fd00::5",
        "44444444-4444-4444-8444-444444444444",
    );
    cloud.bind("vm3", LOCAL);

    let m = monitor(&sb, Duration::ZERO);
    wait_until("replica has vm1 and vm3", LIMIT, || {
        let r = m.shared().snapshot();
        found(&r, NET_A, "10.0.0.5").as_deref() == Some("vm1")
            && found(&r, NET_B, "10.0.0.5").as_deref() == Some("vm3")
    });
    let r = m.shared().snapshot();
    assert!(r.chassis_uuid().is_some());
    let names: std::collections::BTreeSet<String> = r
        .table("Port_Binding")
        .unwrap()
        .values()
        .map(|row| row["logical_port"].atoms()[0].as_str().unwrap().to_string())
        .collect();
    // Only localports and this chassis' ports are monitored.
    assert_eq!(
        names,
        ["meta-a", "vm1", "vm3"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
    assert_eq!(r.table("Datapath_Binding").unwrap().len(), 2);
    assert_eq!(r.table("Chassis").unwrap().len(), 1);
    assert_eq!(r.table("Chassis_Private").unwrap().len(), 1);
    assert_eq!(r.table("SB_Global").unwrap().len(), 1);
    assert!(r.monitors("Port_Binding", "additional_chassis"));
    assert_eq!(found(&r, NET_A, "10.0.0.6"), None, "another chassis' port");
    assert_eq!(found(&r, NET_A, "10.0.0.7"), None, "an unbound port");
    assert_eq!(
        found(&r, NET_A, "10.0.0.2"),
        None,
        "the localport is not bound"
    );
    assert_eq!(found(&r, NET_B, "fd00::5").as_deref(), Some("vm3"));
    // A link-local source is matched by the MAC in its EUI-64.
    assert_eq!(
        found(&r, NET_B, "fe80::f816:3eff:fe00:15").as_deref(),
        Some("vm3")
    );
    assert_eq!(found(&r, NET_A, "fe80::f816:3eff:fe00:15"), None);
    assert_eq!(found(&r, "no-such-net", "10.0.0.5"), None);

    // Binding a port to this chassis brings it in.
    cloud.bind("unbound", LOCAL);
    wait_until("bound port appears", LIMIT, || {
        found(&m.shared().snapshot(), NET_A, "10.0.0.7").as_deref() == Some("unbound")
    });
    // Changing the MACs moves its index entries.
    let vm1 = sb.sbctl(&[
        "--bare",
        "--columns=_uuid",
        "find",
        "Port_Binding",
        "logical_port=vm1",
    ]);
    let vm1 = vm1.trim();
    cloud.set(
        vm1,
        json!({"mac": ["set", ["fa:16:3e:00:00:05 10.0.0.9", "fa:16:3e:00:00:55 10.0.0.10"]]}),
    );
    wait_until("vm1 moved to 10.0.0.9", LIMIT, || {
        let r = m.shared().snapshot();
        found(&r, NET_A, "10.0.0.9").as_deref() == Some("vm1")
            && found(&r, NET_A, "10.0.0.5").is_none()
    });
    // Only the first (lowest) entry counts, as in Neutron.
    assert_eq!(found(&m.shared().snapshot(), NET_A, "10.0.0.10"), None);
    // Two bound ports with one address: not found (Neutron's "More than one port").
    let dup = cloud.port(
        &a,
        "dup",
        "",
        "fa:16:3e:00:00:99 10.0.0.9",
        "55555555-5555-4555-8555-555555555555",
    );
    cloud.bind("dup", LOCAL);
    wait_until("duplicate is ambiguous", LIMIT, || {
        matches!(
            m.shared().snapshot().lookup(NET_A, ip("10.0.0.9")),
            Lookup::Ambiguous(2)
        )
    });
    cloud.delete("Port_Binding", &dup);
    wait_until("duplicate deleted", LIMIT, || {
        found(&m.shared().snapshot(), NET_A, "10.0.0.9").as_deref() == Some("vm1")
    });
    // Live migration: chassis elsewhere, this chassis additional.
    let local_ch = sb.sbctl(&[
        "--bare",
        "--columns=_uuid",
        "find",
        "Chassis",
        &format!("name={LOCAL}"),
    ]);
    let vm2 = sb.sbctl(&[
        "--bare",
        "--columns=_uuid",
        "find",
        "Port_Binding",
        "logical_port=vm2",
    ]);
    cloud.set(
        vm2.trim(),
        json!({"additional_chassis": ["uuid", local_ch.trim()]}),
    );
    wait_until("migrating port appears", LIMIT, || {
        found(&m.shared().snapshot(), NET_A, "10.0.0.6").as_deref() == Some("vm2")
    });
    // Unbinding a port takes it out; deleting one too.
    sb.sbctl(&["lsp-unbind", "vm1"]);
    wait_until("unbound vm1 leaves", LIMIT, || {
        found(&m.shared().snapshot(), NET_A, "10.0.0.9").is_none()
    });
    assert!(m
        .shared()
        .snapshot()
        .table("Port_Binding")
        .unwrap()
        .keys()
        .all(|u| u.to_string() != vm1));
    cloud.delete("Port_Binding", &vm3);
    wait_until("deleted vm3 leaves", LIMIT, || {
        found(&m.shared().snapshot(), NET_B, "10.0.0.5").is_none()
    });
    // A network renamed: its ports follow.
    sb.transact(json!([{"op": "update", "table": "Datapath_Binding", "where": [["_uuid", "==", ["uuid", a]]],
        "row": {"external_ids": ["map", [["name", "neutron-renamed"]]]}}]));
    wait_until("rename reindexes", LIMIT, || {
        found(&m.shared().snapshot(), "renamed", "10.0.0.7").as_deref() == Some("unbound")
    });
    assert_eq!(found(&m.shared().snapshot(), NET_A, "10.0.0.7"), None);
    fresh_equal(&sb, &m);
}

#[test]
fn replica_follows_a_standalone_southbound() {
    if !available("replica_follows_a_standalone_southbound") {
        return;
    }
    follows(Kind::Standalone);
}

#[test]
fn replica_follows_a_clustered_southbound() {
    if !available("replica_follows_a_clustered_southbound") {
        return;
    }
    follows(Kind::Clustered);
}

fn restart(kind: Kind) {
    let sb = Server::southbound(kind);
    let cloud = Cloud::new(&sb);
    let a = cloud.network(NET_A);
    for i in 0..20 {
        cloud.port(
            &a,
            &format!("p{i}"),
            "",
            &format!("fa:16:3e:00:01:{i:02x} 10.0.1.{i}"),
            "11111111-1111-4111-8111-111111111111",
        );
        cloud.bind(&format!("p{i}"), LOCAL);
    }
    let m = monitor(&sb, Duration::ZERO);
    wait_until("initial snapshot", LIMIT, || {
        m.shared().stats().sessions >= 1
            && found(&m.shared().snapshot(), NET_A, "10.0.1.19").is_some()
    });
    assert_eq!(m.shared().stats().method, Some(Method::CondSince));
    // Changes, then a crash, then more changes while we reconnect.
    for i in 0..5 {
        cloud.set(
            sb.sbctl(&[
                "--bare",
                "--columns=_uuid",
                "find",
                "Port_Binding",
                &format!("logical_port=p{i}"),
            ])
            .trim(),
            json!({"mac": format!("fa:16:3e:00:02:{i:02x} 10.0.2.{i}")}),
        );
    }
    wait_until("changes seen", LIMIT, || {
        found(&m.shared().snapshot(), NET_A, "10.0.2.4").is_some()
    });
    sb.kill();
    wait_until("disconnect noticed", LIMIT, || {
        !m.shared().stats().connected
    });
    sb.start();
    for i in 5..10 {
        let u = sb.sbctl(&[
            "--bare",
            "--columns=_uuid",
            "find",
            "Port_Binding",
            &format!("logical_port=p{i}"),
        ]);
        cloud.delete("Port_Binding", u.trim());
    }
    cloud.port(
        &a,
        "late",
        "",
        "fa:16:3e:00:03:01 10.0.3.1",
        "11111111-1111-4111-8111-111111111111",
    );
    cloud.bind("late", LOCAL);
    wait_until("reconnected and caught up", LIMIT, || {
        let r = m.shared().snapshot();
        m.shared().stats().sessions >= 2
            && found(&r, NET_A, "10.0.3.1").is_some()
            && found(&r, NET_A, "10.0.1.7").is_none()
    });
    let st = m.shared().stats();
    match kind {
        // The cluster has the txn id in its log: only the changes since.
        Kind::Clustered => {
            assert!(st.resumed >= 1, "{st:?}");
            assert_ne!(st.last_txn, Some(Uuid::ZERO));
        }
        // No transaction ids: found = false, a full snapshot again.
        Kind::Standalone => {
            assert_eq!(st.resumed, 0, "{st:?}");
            assert!(st.full_snapshots >= 2, "{st:?}");
        }
    }
    fresh_equal(&sb, &m);
}

#[test]
fn restart_of_a_clustered_southbound_resumes_from_the_last_txn() {
    if !available("restart_of_a_clustered_southbound_resumes_from_the_last_txn") {
        return;
    }
    restart(Kind::Clustered);
}

#[test]
fn restart_of_a_standalone_southbound_takes_a_full_snapshot() {
    if !available("restart_of_a_standalone_southbound_takes_a_full_snapshot") {
        return;
    }
    restart(Kind::Standalone);
}

#[test]
fn echo_probe_keeps_a_quiet_connection_and_drops_a_hung_server() {
    if !available("echo_probe_keeps_a_quiet_connection_and_drops_a_hung_server") {
        return;
    }
    let sb = Server::southbound(Kind::Standalone);
    Cloud::new(&sb);
    // 1 s: long enough that a loaded CI machine answers every echo in time.
    let m = monitor(&sb, Duration::from_secs(1));
    // A quiet database: our echoes are answered and the session stays.
    wait_until("three probes answered", LIMIT, || {
        m.shared().stats().echoes_sent >= 3
    });
    let st = m.shared().stats();
    assert_eq!((st.sessions, st.probe_timeouts), (1, 0), "{st:?}");
    // A hung server (stopped, socket open): the unanswered probe drops it.
    sb.pause(true);
    wait_until("probe timeout", LIMIT, || {
        m.shared().stats().probe_timeouts >= 1
    });
    sb.pause(false);
    wait_until("reconnected", LIMIT, || {
        let st = m.shared().stats();
        st.sessions >= 2 && st.connected
    });
}

#[test]
fn the_servers_echo_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(br#"{"method":"echo","params":["hi",1],"id":"x1"}"#)
            .unwrap();
        let mut dec = Decoder::new(1 << 16);
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while got.len() < 2 {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "client closed");
            dec.feed(&buf[..n]).unwrap();
            while let Some(v) = dec.next_value().unwrap() {
                got.push(v);
            }
        }
        let req = got
            .iter()
            .find(|v| v["method"] == "list_dbs")
            .expect("list_dbs request")
            .clone();
        s.write_all(
            json!({"id": req["id"], "result": ["OVN_Southbound"], "error": null})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        got
    });
    let mut conn = Conn::open(&Remote::Unix(path), &opts(Duration::ZERO)).unwrap();
    let dbs = conn.call("list_dbs", json!([]), &|| false).unwrap();
    assert_eq!(dbs, json!(["OVN_Southbound"]));
    let got = server.join().unwrap();
    assert!(
        got.contains(&json!({"result": ["hi", 1], "error": null, "id": "x1"})),
        "{got:?}"
    );
    assert_eq!(conn.stats.echoes_answered, 1);
}

#[test]
fn chassis_name_and_bridge_come_from_the_local_open_vswitch_db() {
    if !available("chassis_name_and_bridge_come_from_the_local_open_vswitch_db") {
        return;
    }
    let ovs = Server::vswitch("compute-1", None);
    let remote = Remote::parse(&ovs.remote()).unwrap();
    assert_eq!(
        read_local_chassis(&remote, &opts(Duration::ZERO)).unwrap(),
        ("compute-1".into(), "br-int".into())
    );
    let ovs = Server::vswitch("compute-2", Some("br-ovn"));
    let remote = Remote::parse(&ovs.remote()).unwrap();
    assert_eq!(
        read_local_chassis(&remote, &opts(Duration::ZERO)).unwrap(),
        ("compute-2".into(), "br-ovn".into())
    );
}

/// CA, server and client certificates; the server's name is not its address.
fn pki(
    dir: &std::path::Path,
    tag: &str,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // OpenSSL (ovsdb-server's side) matches issuers by name: give it one.
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("ovn test CA {tag}"));
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let leaf = |name: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (srv_cert, srv_key) = leaf("ovsdb.example");
    let (cli_cert, cli_key) = leaf("chassis-local");
    let p = |n: &str| dir.join(format!("{tag}-{n}"));
    std::fs::write(p("ca.pem"), ca.pem()).unwrap();
    std::fs::write(p("srv.pem"), srv_cert).unwrap();
    std::fs::write(p("srv.key"), srv_key).unwrap();
    std::fs::write(p("cli.pem"), cli_cert).unwrap();
    std::fs::write(p("cli.key"), cli_key).unwrap();
    (
        p("ca.pem"),
        p("srv.pem"),
        p("srv.key"),
        p("cli.pem"),
        p("cli.key"),
    )
}

#[test]
fn ssl_remote_verifies_the_chain_not_the_name() {
    if !available("ssl_remote_verifies_the_chain_not_the_name") {
        return;
    }
    let sb = Server::southbound(Kind::Standalone);
    let cloud = Cloud::new(&sb);
    let a = cloud.network(NET_A);
    cloud.port(
        &a,
        "vm1",
        "",
        "fa:16:3e:00:00:05 10.0.0.5",
        "11111111-1111-4111-8111-111111111111",
    );
    cloud.bind("vm1", LOCAL);
    let dir = tempfile::tempdir().unwrap();
    let (ca, srv_cert, srv_key, cli_cert, cli_key) = pki(dir.path(), "good");
    let port = common::free_port();
    sb.listen_ssl(port, &srv_key, &srv_cert, &ca);
    let files = |ca: &std::path::Path| metaproxy::ovn::ovsdb::TlsFiles {
        private_key: cli_key.clone(),
        certificate: cli_cert.clone(),
        ca_cert: ca.to_path_buf(),
    };
    let mut o = opts(Duration::ZERO);
    o.tls = Some(metaproxy::ovn::ovsdb::tls_config(&files(&ca)).unwrap());
    // A remote list: the first is down, the second is the TLS one.
    let m = SbMonitor::start(SbConfig {
        remotes: Remote::parse_list(&format!("tcp:127.0.0.1:1,ssl:127.0.0.1:{port}")).unwrap(),
        conn: o,
        chassis: LOCAL.to_string(),
    })
    .unwrap();
    wait_until("replica over ssl", LIMIT, || {
        found(&m.shared().snapshot(), NET_A, "10.0.0.5").as_deref() == Some("vm1")
    });
    // A CA that did not sign the server's certificate: refused.
    let (other_ca, ..) = pki(dir.path(), "other");
    let mut o = opts(Duration::ZERO);
    o.tls = Some(metaproxy::ovn::ovsdb::tls_config(&files(&other_ca)).unwrap());
    let err = Conn::open(
        &Remote::parse(&format!("ssl:127.0.0.1:{port}")).unwrap(),
        &o,
    )
    .unwrap_err();
    assert!(err.to_string().contains("handshake"), "{err}");
    // ssl: without TLS files is a clear error.
    let err = Conn::open(
        &Remote::parse(&format!("ssl:127.0.0.1:{port}")).unwrap(),
        &opts(Duration::ZERO),
    )
    .unwrap_err();
    assert!(err.to_string().contains("private key"), "{err}");
}

/// A server from before `monitor_cond_since` and `monitor_cond`: it
/// answers `unknown method` (ovsdb-server's own words) and serves RFC 7047
/// `monitor`, whose rows the replica filters itself.
#[test]
fn falls_back_to_monitor_cond_then_monitor() {
    if !std::path::Path::new(common::ovsdb::SB_SCHEMA).exists() {
        eprintln!(
            "SKIPPED falls_back_to_monitor_cond_then_monitor: needs {}",
            common::ovsdb::SB_SCHEMA
        );
        return;
    }
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(common::ovsdb::SB_SCHEMA).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let ch = "00000000-0000-4000-8000-0000000000c1";
    let other = "00000000-0000-4000-8000-0000000000c2";
    let dp = "00000000-0000-4000-8000-0000000000d1";
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut dec = Decoder::new(1 << 20);
        let mut buf = [0u8; 4096];
        let mut methods = Vec::new();
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                return methods;
            }
            dec.feed(&buf[..n]).unwrap();
            while let Some(req) = dec.next_value().unwrap() {
                let m = req["method"].as_str().unwrap().to_string();
                methods.push(m.clone());
                let answer = match m.as_str() {
                    "get_schema" => json!({"id": req["id"], "result": schema, "error": null}),
                    "monitor" => {
                        assert!(req["params"][2]["Port_Binding"]["where"].is_null());
                        json!({"id": req["id"], "error": null, "result": {
                            "Chassis": {ch: {"new": {"name": LOCAL, "hostname": "", "external_ids": ["map", []]}}},
                            "Datapath_Binding": {dp: {"new": {"tunnel_key": 1, "external_ids": ["map", [["name", format!("neutron-{NET_A}")]]]}}},
                            "Port_Binding": {
                                "00000000-0000-4000-8000-000000000001": {"new": {"logical_port": "mine", "type": "", "datapath": ["uuid", dp],
                                    "chassis": ["uuid", ch], "additional_chassis": ["set", []], "mac": "fa:16:3e:00:00:05 10.0.0.5",
                                    "external_ids": ["map", []], "options": ["map", []], "up": true}},
                                "00000000-0000-4000-8000-000000000002": {"new": {"logical_port": "elsewhere", "type": "", "datapath": ["uuid", dp],
                                    "chassis": ["uuid", other], "additional_chassis": ["set", []], "mac": "fa:16:3e:00:00:06 10.0.0.5",
                                    "external_ids": ["map", []], "options": ["map", []], "up": true}}
                            }
                        }})
                    }
                    _ => json!({"id": req["id"], "result": null, "error": "unknown method"}),
                };
                s.write_all(answer.to_string().as_bytes()).unwrap();
            }
        }
    });
    let m = monitor_at(&format!("unix:{}", path.display()));
    // Another chassis' port with the same address is filtered out here,
    // as the server-side condition would have.
    wait_until("plain monitor snapshot", LIMIT, || {
        m.shared().stats().sessions >= 1
            && found(&m.shared().snapshot(), NET_A, "10.0.0.5").as_deref() == Some("mine")
    });
    assert_eq!(m.shared().stats().method, Some(Method::Plain));
    drop(m);
    let methods = server.join().unwrap();
    assert_eq!(
        methods,
        [
            "get_schema",
            "monitor_cond_since",
            "monitor_cond",
            "monitor"
        ]
    );
}

fn monitor_at(remote: &str) -> SbMonitor {
    SbMonitor::start(SbConfig {
        remotes: Remote::parse_list(remote).unwrap(),
        conn: opts(Duration::ZERO),
        chassis: LOCAL.to_string(),
    })
    .unwrap()
}

#[test]
fn ovn_dump_replica_prints_the_replica_and_its_index() {
    if !available("ovn_dump_replica_prints_the_replica_and_its_index") {
        return;
    }
    let sb = Server::southbound(Kind::Standalone);
    let cloud = Cloud::new(&sb);
    let a = cloud.network(NET_A);
    let vm1 = cloud.port(
        &a,
        "vm1",
        "",
        "fa:16:3e:00:00:05 10.0.0.5",
        "11111111-1111-4111-8111-111111111111",
    );
    cloud.bind("vm1", LOCAL);
    // The chassis name comes from the local Open_vSwitch DB.
    let ovs = Server::vswitch(LOCAL, None);
    let dump = dump_replica(&sb, &ovs);
    assert_eq!(dump["chassis"], LOCAL);
    assert_eq!(dump["index"][NET_A]["ip"]["10.0.0.5"], json!([vm1]));
    assert_eq!(
        dump["index"][NET_A]["mac"]["fa:16:3e:00:00:05"],
        json!([vm1])
    );
    assert_eq!(dump["tables"]["Port_Binding"][&vm1]["logical_port"], "vm1");
    // Unreachable: a clear error naming the remote, exit 1.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_metaproxy"))
        .args([
            "ovn-dump-replica",
            "--ovn-sb-connection",
            "unix:/nonexistent/sb.sock",
            "--chassis",
            LOCAL,
            "--timeout",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unix:/nonexistent/sb.sock"), "{err}");
}

/// `--config FILE`: the same settings from `[ovn]` and `[ovn.ovs]`, in
/// Neutron's keys; a typo in the section refuses to run, naming the key.
#[test]
fn ovn_dump_replica_reads_its_settings_from_the_config_file() {
    if !available("ovn_dump_replica_reads_its_settings_from_the_config_file") {
        return;
    }
    let sb = Server::southbound(Kind::Standalone);
    let cloud = Cloud::new(&sb);
    let a = cloud.network(NET_A);
    let vm1 = cloud.port(
        &a,
        "vm1",
        "",
        "fa:16:3e:00:00:05 10.0.0.5",
        "11111111-1111-4111-8111-111111111111",
    );
    cloud.bind("vm1", LOCAL);
    let ovs = Server::vswitch(LOCAL, None);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("metaproxy.toml");
    std::fs::write(
        &cfg,
        format!(
            "[ovn]\novn_sb_connection = \"{}\"\novsdb_probe_interval = 0\novsdb_connection_timeout = 5\n[ovn.ovs]\novsdb_connection = \"{}\"\n",
            sb.remote(),
            ovs.remote()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_metaproxy"))
            .arg("ovn-dump-replica")
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(dump["chassis"], LOCAL, "system-id read via [ovn.ovs]");
    assert_eq!(dump["index"][NET_A]["ip"]["10.0.0.5"], json!([vm1]));
    // The flags and the file do not mix.
    let out = run(&["--ovn-sb-connection", &sb.remote()]);
    assert_eq!(out.status.code(), Some(2), "clap usage error");
    std::fs::write(&cfg, "[ovn]\novn_sb_conection = \"tcp:127.0.0.1:6642\"\n").unwrap();
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ovn_sb_conection"), "{err}");
}

/// A server that sends one endless string: refused at the message bound,
/// the buffer never past it.
#[test]
fn a_hostile_server_cannot_make_us_buffer_without_bound() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hostile.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _ = s.write_all(b"{\"id\":1,\"result\":\"");
        let chunk = vec![b'x'; 64 * 1024];
        // Until the client hangs up (at most 64 MiB).
        for _ in 0..1024 {
            if s.write_all(&chunk).is_err() {
                return true;
            }
        }
        false
    });
    let mut o = opts(Duration::ZERO);
    o.max_message_bytes = 1024 * 1024;
    let mut conn = Conn::open(&Remote::Unix(path), &o).unwrap();
    let err = conn.call("list_dbs", json!([]), &|| false).unwrap_err();
    assert!(
        err.to_string().contains("larger than 1048576 bytes"),
        "{err}"
    );
    drop(conn);
    assert!(server.join().unwrap(), "the client kept reading");
}

/// Notifications that arrive while `call` waits for its reply are handed
/// out afterwards, in the order they arrived, across several calls.
#[test]
fn notifications_during_calls_keep_their_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("order.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut dec = Decoder::new(1 << 16);
        let mut buf = [0u8; 4096];
        let mut n = 0;
        while n < 2 {
            let k = s.read(&mut buf).unwrap();
            assert!(k > 0);
            dec.feed(&buf[..k]).unwrap();
            while let Some(req) = dec.next_value().unwrap() {
                n += 1;
                let note = json!({"method": "update2", "params": ["m", {"seq": n}], "id": null});
                let reply = json!({"id": req["id"], "result": n, "error": null});
                s.write_all(format!("{note}{reply}").as_bytes()).unwrap();
            }
        }
    });
    let mut conn = Conn::open(&Remote::Unix(path), &opts(Duration::ZERO)).unwrap();
    assert_eq!(conn.call("a", json!([]), &|| false).unwrap(), json!(1));
    assert_eq!(conn.call("b", json!([]), &|| false).unwrap(), json!(2));
    server.join().unwrap();
    for seq in [1, 2] {
        match conn.next_event(&|| false).unwrap() {
            metaproxy::ovn::ovsdb::Event::Notify(m, p) => {
                assert_eq!(m, "update2");
                assert_eq!(p[1]["seq"], seq);
            }
            other => panic!("{other:?}"),
        }
    }
}
