//! Process lifecycle: SIGTERM drains in-flight requests and exits 0; timeouts
//! really release their file descriptors; a bad config refuses to start.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// fd counting needs the process to itself: tests in this file run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn sigterm_finishes_in_flight_requests_then_exits_zero() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let agent = FakeAgent::start(AgentMode::Delay(600));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("proxy.toml");
    std::fs::write(
        &cfg,
        format!(
            "[proxy]\nworkers = 2\nagent_socket = \"{}\"\ndrain_timeout = \"5s\"\n[[proxy.namespace]]\nrouter_id = \"{ROUTER}\"\nlisten = \"127.0.0.1:0\"\n",
            agent.path.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_metaproxy"))
        .args(["proxy", "--config"])
        .arg(&cfg)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for "listener up": it names the port the kernel gave.
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let t0 = Instant::now();
    let addr = loop {
        let mut line = String::new();
        assert!(err.read_line(&mut line).unwrap() > 0, "proxy exited early");
        if let Some(a) = bound_addr(&line) {
            break a;
        }
        assert!(t0.elapsed() < Duration::from_secs(10));
    };
    std::thread::spawn(move || for _ in err.lines() {});
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /in-flight HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    // In flight: the agent has it and holds the answer for 600 ms.
    wait_until("the agent has the request", Duration::from_secs(5), || {
        !agent.seen().is_empty()
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let r = read_response(&mut BufReader::new(s), false).unwrap();
    assert_eq!(r.status, 200, "the in-flight request completes");
    assert_eq!(
        r.header("Connection"),
        Some("close"),
        "a draining proxy closes after the answer"
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(TcpStream::connect(addr).is_err(), "no longer accepting");
}

#[test]
fn timed_out_connections_release_their_fds() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let agent = FakeAgent::start(AgentMode::KeepAlive);
    let h = metaproxy::proxy::start(proxy_config(&agent.path, "")).unwrap();
    let addr = h.bound[0][0];
    // Serving (and a pooled agent connection open) before counting. The
    // answer is read to EOF: the proxy has closed its side of it by then.
    let mut warm = TcpStream::connect(addr).unwrap();
    warm.write_all(b"GET /warm HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    warm.read_to_end(&mut answer).unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    drop(warm);
    let before = open_fds();
    // 50 clients that send half a head and stall (slowloris).
    let stalled: Vec<TcpStream> = (0..50)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /slow HTTP/1.1\r\nHost:").unwrap();
            s
        })
        .collect();
    // All 50 accepted (the proxy's own gauge; counting fds here raced with
    // the pooled agent connection, whose two ends may close meanwhile and
    // made "before + 100" unreachable in CI).
    let open = || -> usize { h.control.status().iter().map(|s| s.connections).sum() };
    wait_until("the proxy accepted all 50", Duration::from_secs(5), || {
        open() >= 50
    });
    // http_request is 1 s in the test config; the proxy must close its side
    // (our 50 ends stay open until the drop).
    // The limit is generous for a loaded CI machine; the wait ends as soon
    // as the proxy is done, and a failure says which half was not.
    let limit = Instant::now() + Duration::from_secs(15);
    loop {
        let (o, fds) = (open(), open_fds());
        if o == 0 && fds <= before + 52 {
            break;
        }
        assert!(
            Instant::now() < limit,
            "not within 15 s: the proxy closed its side of every stalled connection: \
             {o} still open by its gauge, {fds} fds in this process against {before} \
             before plus our 50"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(stalled);
    let mut after = open_fds();
    let settled = Instant::now();
    while after > before + 2 && settled.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(5));
        after = open_fds();
    }
    assert!(
        after <= before + 2,
        "fds leaked: before {before}, after {after}"
    );
    // And the proxy still serves.
    assert_eq!(
        get(addr, "GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap()
            .status,
        200
    );
    h.stop().unwrap();
}

#[test]
fn a_bad_config_refuses_to_start_and_names_the_key() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "[[proxy.namespace]]\nrouter_id = \"not-a-uuid\"\nlisten = \"0.0.0.0:9697\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_metaproxy"))
        .args(["proxy", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("proxy.namespace[0].router_id"), "{err}");
}
