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
    send(
        from,
        to,
        &format!(
            "GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{extra}Connection: close\r\n\r\n"
        ),
    )
}

/// `raw` on a new connection from `from`; the answer.
fn send(from: &str, to: SocketAddr, raw: &str) -> common::Resp {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&format!("{from}:0").parse::<SocketAddr>().unwrap().into())
        .unwrap();
    sock.connect(&to.into()).unwrap();
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    read_response(&mut BufReader::new(s), raw.starts_with("HEAD ")).unwrap()
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

const PROJECT: &str = "d0d0d0d0000040008000000000000000";

/// The TCP sockets process `pid` holds with an end on `port`, listeners
/// left out (its fds' socket inodes matched against `/proc/<pid>/net/tcp{,6}`;
/// state `0A` is LISTEN), as `local remote state` in the kernel's hex. Only
/// the process's own: a socket of another test or storm that happens to use
/// the port (a TIME_WAIT one has no owner) is not `up`'s.
fn tcp_sockets_on(pid: u32, port: u16) -> Vec<String> {
    let inodes = common::socket_inodes(pid);
    let hex = format!(":{port:04X}");
    let mut found = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            // sl local remote st tx:rx tr:when retrnsmt uid timeout inode ...
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, remote, state, inode) = (f[1], f[2], f[3], f[9]);
            let on_port = local.ends_with(&hex) || remote.ends_with(&hex);
            if state != "0A" && on_port && inodes.contains(inode) {
                found.push(format!("{local} {remote} {state}"));
            }
        }
    }
    found
}

/// A body to compare: `meta_data.json`'s `random_seed` is new on every
/// answer (as Nova's), so it is left out; any other body as it is.
fn without_seed(body: &[u8]) -> Vec<u8> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(mut o)) => {
            o.remove("random_seed");
            serde_json::to_vec(&o).unwrap()
        }
        _ => body.to_vec(),
    }
}

/// The API's Prometheus text, from `api.metrics_listen`.
fn api_metrics(up: &common::up::Up) -> String {
    let addr: SocketAddr = up
        .start_log()
        .lines()
        .find_map(|l| l.split_once("api metrics on http://"))
        .and_then(|(_, rest)| rest.split('/').next()?.parse().ok())
        .expect("the API's `metrics on` line");
    common::get(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n",
    )
    .unwrap()
    .text()
}

/// A counter's value in Prometheus text (0 when absent).
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

/// In `up` the agent stage hands its signed request to the API stage on the
/// same loop: every kind of answer (OpenStack and EC2 trees, user-data, a
/// HEAD, the API's 404 and the agent's, a password POST and its 409) comes
/// back, the API's handler answered each one (its counters and access log:
/// the request it saw carried the agent's `X-Instance-ID`, and it checked
/// the signature, else 403), and no TCP connection was made to `api.listen`
/// for any of them (the agent's pooled keep-alive connections were there
/// before). The API still listens there, and a request signed as the agent
/// signs gets the same status, type and body from it.
#[test]
fn up_answers_through_the_api_stage_in_process_as_its_listener_would() {
    let dir = tempfile::tempdir().unwrap();
    let inv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/inventory.toml");
    let ((up, proxy), api_port) = common::up::start_up_full(
        dir.path(),
        &inv,
        common::up::EXAMPLE_ROUTER,
        common::up::UP_SECRET,
        "metrics_listen = \"127.0.0.1:0\"\n",
        "",
        true,
    );
    let gets = [
        ("/openstack/latest/meta_data.json", 200),
        ("/2009-04-04/meta-data/hostname", 200),
        ("/2009-04-04/user-data", 200),
        ("/openstack/latest/user_data", 200),
        ("/openstack/latest/nothing-here", 404),
    ];
    let mut answers = Vec::new();
    for (path, status) in gets {
        let r = ask("127.0.0.1", proxy, path, "");
        assert_eq!(r.status, status, "{path}: {}", r.text());
        answers.push((path, r));
    }
    let v: serde_json::Value = serde_json::from_slice(&answers[0].1.body).unwrap();
    assert_eq!(v["uuid"], DEMO);
    assert_eq!(answers[1].1.text(), "demo.novalocal");
    assert!(!answers[2].1.body.is_empty());

    let head = send(
        "127.0.0.1",
        proxy,
        "HEAD /openstack/latest/meta_data.json HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    let len = answers[0].1.body.len().to_string();
    assert_eq!(head.header("Content-Length"), Some(len.as_str()));

    // The agent's own 404: no instance, so nothing reaches the API.
    let r = ask("127.0.0.9", proxy, "/openstack/latest/meta_data.json", "");
    assert_eq!(r.status, 404);
    assert!(r.text().contains("Instance was not found on router"));

    let post = |pw: &str| {
        send(
            "127.0.0.2",
            proxy,
            &format!(
                "POST /openstack/latest/password HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{pw}",
                pw.len()
            ),
        )
        .status
    };
    assert_eq!(post("first"), 200);
    assert_eq!(post("second"), 409);
    let r = ask("127.0.0.2", proxy, "/openstack/latest/password", "");
    assert_eq!((r.status, r.text().as_str()), (200, "first"));

    // 5 GETs, a HEAD, 2 POSTs and a GET: 10 answers of the API's handler
    // (the API's 404 came for a cached mapping, so the agent looked the
    // guest up again and asked once more), none of them over a socket to it.
    let api_answered = 10;
    let sockets = tcp_sockets_on(up.pid(), api_port);
    assert!(sockets.is_empty(), "TCP to the API's port: {sockets:?}");
    let m = api_metrics(&up);
    assert_eq!(
        metric(&m, "metaproxy_api_requests_total"),
        api_answered,
        "{m}"
    );
    common::wait_until("the API's access log lines", Duration::from_secs(5), || {
        let log = up.log();
        log.contains(&format!(
            "127.0.0.1 as {DEMO} \"GET /openstack/latest/meta_data.json\" 200"
        )) && log.contains(&format!(
            "127.0.0.1 as {DEMO2} \"POST /openstack/latest/password\" 409"
        ))
    });

    // `api.listen` still serves: the same answers to the agent's request.
    let sig = metaproxy::sign::sign_instance_id(common::up::UP_SECRET.as_bytes(), DEMO);
    let api: SocketAddr = format!("127.0.0.1:{api_port}").parse().unwrap();
    let mut held = TcpStream::connect(api).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut held_reader = BufReader::new(held.try_clone().unwrap());
    for (path, via_up) in &answers {
        let signed = format!(
            "GET {path} HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 127.0.0.1\r\nX-Instance-ID: {DEMO}\r\n\
             X-Tenant-ID: {PROJECT}\r\nX-Instance-ID-Signature: {sig}\r\n\r\n"
        );
        held.write_all(signed.as_bytes()).unwrap();
        let direct = read_response(&mut held_reader, false).unwrap();
        assert_eq!(direct.status, via_up.status, "{path}");
        assert_eq!(
            direct.header("Content-Type"),
            via_up.header("Content-Type"),
            "{path}"
        );
        assert_eq!(
            without_seed(&direct.body),
            without_seed(&via_up.body),
            "{path}"
        );
    }
    // ... over a connection this check sees (so its emptiness above meant something).
    assert!(!tcp_sockets_on(up.pid(), api_port).is_empty());
    let m = api_metrics(&up);
    assert_eq!(
        metric(&m, "metaproxy_api_requests_total"),
        api_answered + answers.len() as u64
    );
}

/// SIGHUP reloads the one inventory `up` loaded, and the API stage on the
/// proxy's loops renders from the new one.
#[test]
fn up_renders_the_reloaded_inventory_in_process() {
    let dir = tempfile::tempdir().unwrap();
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/inventory.toml");
    let text = std::fs::read_to_string(example).unwrap();
    let inv = dir.path().join("inventory.toml");
    std::fs::write(&inv, &text).unwrap();
    let (up, proxy) = common::up::start_up(dir.path(), &inv, common::up::EXAMPLE_ROUTER);
    let name = || {
        let r = ask("127.0.0.1", proxy, "/openstack/latest/meta_data.json", "");
        assert_eq!(r.status, 200);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        v["name"].as_str().unwrap().to_string()
    };
    assert_eq!(name(), "demo");
    let renamed = text.replacen("name = \"demo\"", "name = \"demo-renamed\"", 1);
    assert_ne!(renamed, text);
    std::fs::write(&inv, renamed).unwrap();
    up.sighup();
    common::wait_until("the renamed instance", Duration::from_secs(10), || {
        name() == "demo-renamed"
    });
}
