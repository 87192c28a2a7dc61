//! The main job end to end: `metaproxy up` (api + agent + proxy in one
//! process) serving the example inventory to two "VMs" on loopback
//! (127.0.0.1 = demo, 127.0.0.2 = demo2), through the real binary.

mod common;

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::read_response;
use common::up::start_example;

const DEMO: &str = "d0d0d0d0-0000-4000-8000-000000000001";
const DEMO2: &str = "d0d0d0d0-0000-4000-8000-000000000002";

/// One request from a given loopback source address (a distinct "VM").
fn ask(from: &str, to: SocketAddr, path: &str, extra: &str) -> common::Resp {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&format!("{from}:0").parse::<SocketAddr>().unwrap().into())
        .unwrap();
    sock.connect(&to.into()).unwrap();
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{extra}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    read_response(&mut BufReader::new(s), false).unwrap()
}

#[test]
fn each_vm_gets_its_own_metadata_whatever_it_sends() {
    let dir = tempfile::tempdir().unwrap();
    let (_up, proxy) = start_example(dir.path());

    let r = ask("127.0.0.1", proxy, "/openstack/latest/meta_data.json", "");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["uuid"], DEMO);
    assert_eq!(v["hostname"], "demo.novalocal");

    let r = ask("127.0.0.2", proxy, "/openstack/latest/meta_data.json", "");
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["uuid"], DEMO2);

    // VM 2 claims to be VM 1 in every way it can: it still gets only its own.
    let spoof = format!(
        "X-Forwarded-For: 127.0.0.1\r\nX-Instance-ID: {DEMO}\r\nX-Tenant-ID: d0d0d0d0000040008000000000000000\r\n\
         X-Instance-ID-Signature: 00\r\nX-Neutron-Network-ID: d0d0d0d0-0000-4000-8000-00000000a001\r\nForwarded: for=127.0.0.1\r\n"
    );
    let r = ask(
        "127.0.0.2",
        proxy,
        "/openstack/latest/meta_data.json",
        &spoof,
    );
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        v["uuid"], DEMO2,
        "spoofed headers must not reach another instance"
    );
    assert!(!r.text().contains(DEMO));

    // EC2 tree and user-data, as cloud-init's EC2 crawl reads them.
    let r = ask("127.0.0.1", proxy, "/2009-04-04/meta-data/public-keys/", "");
    assert_eq!(r.text(), "0=demo-key");
    let r = ask("127.0.0.1", proxy, "/2009-04-04/meta-data/hostname", "");
    assert_eq!(r.text(), "demo.novalocal");

    // A VM the inventory does not know: Neutron's 404.
    let r = ask("127.0.0.9", proxy, "/openstack/latest/meta_data.json", "");
    assert_eq!(r.status, 404);
    assert!(
        r.text()
            .contains("Instance was not found on router d0d0d0d0-0000-4000-8000-00000000c001"),
        "{}",
        r.text()
    );
}

/// `[proxy.limits] max_head_bytes = 32768`, above what the agent accepts: a
/// 12 KiB head passes the proxy and gets the agent's canned 431 (its
/// `[agent.limits]` still apply with the agent stage in-process, where the
/// request is parsed again with them). Nothing more: no later request is
/// refused and no fd is left behind (with the old Unix-socket hop, the
/// pool once switched to one connection per request for good and left one
/// fd open per later request), so the fd count stays flat over 60 later
/// requests, all answered.
#[test]
fn one_rejection_by_the_agent_neither_degrades_the_pool_nor_leaks_fds() {
    let dir = tempfile::tempdir().unwrap();
    let inv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/inventory.toml");
    let (up, proxy) = common::up::start_up_with(
        dir.path(),
        &inv,
        common::up::EXAMPLE_ROUTER,
        common::up::UP_SECRET,
        "[proxy.limits]\nmax_head_bytes = 32768\n",
    );
    let path = "/openstack/latest/meta_data.json";
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", up.pid()))
            .unwrap()
            .count()
    };
    for _ in 0..10 {
        assert_eq!(ask("127.0.0.1", proxy, path, "").status, 200);
    }
    let pad = format!("X-Pad: {}\r\n", "a".repeat(12 * 1024));
    assert_eq!(ask("127.0.0.1", proxy, path, &pad).status, 431);
    let before = fds();
    for _ in 0..60 {
        assert_eq!(ask("127.0.0.1", proxy, path, "").status, 200);
    }
    // Connections just answered may still be closing: poll, with a deadline.
    // Slack: the pool re-dials the connection the 431 closed (both its ends
    // live in this process).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let now = fds();
        if now <= before + 4 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "fds grew from {before} to {now} over 60 requests"
        );
        std::thread::yield_now();
    }
}

/// `up` runs the agent on the proxy's own loops: the `[agent] socket` of
/// its file is never created, the process listens on no Unix socket but
/// `metaproxy ctl`'s (so no guest request crosses a socket to an agent),
/// and `metaproxy doctor` on that file says why there is no socket rather
/// than failing its agent socket check. A HEAD through that path gets the
/// agent's 404 head with no body, and the connection stays in step.
#[test]
fn up_has_no_agent_socket_and_doctor_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (up, proxy) = start_example(dir.path());
    assert_eq!(
        ask("127.0.0.1", proxy, "/openstack/latest/meta_data.json", "").status,
        200
    );
    assert!(!dir.path().join("agent.sock").exists(), "an agent socket");
    let ctl = dir.path().join("ctl.sock").display().to_string();
    assert_eq!(common::unix_listeners(up.pid()), vec![ctl]);

    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    // 127.0.0.1 is `demo`; the router is the example's: a HEAD for a path
    // the API has not, then a GET on the same connection.
    let get = "GET /openstack/latest/nothing-here HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n";
    s.write_all(get.replacen("GET", "HEAD", 1).as_bytes())
        .unwrap();
    let head = read_response(&mut r, true).unwrap();
    assert_eq!(head.status, 404);
    assert!(head.body.is_empty());
    s.write_all(get.as_bytes()).unwrap();
    let page = read_response(&mut r, false).unwrap();
    assert_eq!(page.status, 404);
    let len = page.body.len().to_string();
    assert_eq!(head.header("Content-Length"), Some(len.as_str()));

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_metaproxy"))
        .args(["--log-level", "warn", "doctor", "--config"])
        .arg(dir.path().join("up.toml"))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let line = report
        .lines()
        .find(|l| l.contains("agent socket"))
        .unwrap_or_else(|| panic!("no agent socket check:\n{report}"));
    assert!(
        line.starts_with("OK") && line.contains("runs the agent in-process"),
        "{report}"
    );
}
