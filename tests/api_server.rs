//! The metadata API server over real TCP: in-process for the HTTP behaviour,
//! the real binary (SIGKILLed mid-life) for password durability.

mod common;

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, get, read_response, Resp};
use metaproxy::api::config::ApiConfig;
use metaproxy::api::server::{start, ApiHandle};

const SECRET: &str = "s3cret-for-tests";
const DEMO: &str = "d0d0d0d0-0000-4000-8000-000000000001";
const DEMO2: &str = "d0d0d0d0-0000-4000-8000-000000000002";
/// Signed correctly, but in no inventory.
const UNKNOWN: &str = "d0d0d0d0-0000-4000-8000-0000000000ff";
const PROJECT: &str = "d0d0d0d0000040008000000000000000";

fn demo_inventory() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/inventory.toml")
}

fn config_text(listen: &str, inventory: &Path, state: &Path) -> String {
    format!(
        r#"
[api]
listen = "{listen}"
metadata_proxy_shared_secret = "{SECRET}"
inventory = {inventory:?}
state_dir = {state:?}
workers = 2
drain_timeout = "1s"

[api.timeouts]
http_request = "2s"
client = "2s"
keep_alive = "2s"
"#,
        inventory = inventory.display().to_string(),
        state = state.display().to_string(),
    )
}

fn api_config(text: &str) -> ApiConfig {
    let f = metaproxy::config::parse_str(text, Path::new("test.toml")).unwrap();
    ApiConfig::from_table(f.api.as_ref().unwrap()).unwrap()
}

struct Server {
    handle: ApiHandle,
    addr: SocketAddr,
    _state: tempfile::TempDir,
}

fn start_with(inventory: &Path) -> Server {
    let state = tempfile::tempdir().unwrap();
    let cfg = api_config(&config_text("127.0.0.1:0", inventory, state.path()));
    let handle = start(cfg).unwrap();
    let addr = handle.bound[0];
    Server {
        handle,
        addr,
        _state: state,
    }
}

fn start_demo() -> Server {
    start_with(&demo_inventory())
}

/// A request carrying the agent's identity headers for `instance`.
fn signed(method: &str, path: &str, instance: &str, extra: &str, body: &str) -> String {
    let sig = metaproxy::sign::sign_instance_id(SECRET.as_bytes(), instance);
    let cl = if (body.is_empty() && method != "POST") || extra.contains("Transfer-Encoding") {
        String::new()
    } else {
        format!("Content-Length: {}\r\n", body.len())
    };
    format!(
        "{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nX-Forwarded-For: 10.0.0.5\r\n\
         X-Instance-ID: {instance}\r\nX-Instance-ID-Signature: {sig}\r\nX-Tenant-ID: {PROJECT}\r\n\
         {cl}{extra}\r\n{body}"
    )
}

fn json(r: &Resp) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.text()))
}

#[test]
fn root_lists_ec2_versions_without_identity() {
    let s = start_demo();
    let r = get(s.addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Content-Type"), Some("text/plain; charset=UTF-8"));
    let text = r.text();
    assert!(text.starts_with("1.0\n"), "{text}");
    assert!(text.ends_with("\nlatest"), "{text}");
    s.handle.stop().unwrap();
}

#[test]
fn signed_request_gets_the_instance_meta_data() {
    let s = start_demo();
    let r = get(
        s.addr,
        &signed("GET", "/openstack/latest/meta_data.json", DEMO, "", ""),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    assert_eq!(json(&r)["uuid"], DEMO);
    let r = get(
        s.addr,
        &signed("GET", "/latest/meta-data/instance-id", DEMO2, "", ""),
    )
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "i-00000002");
    s.handle.stop().unwrap();
}

#[test]
fn wrong_signature_is_403_and_missing_identity_is_400() {
    let s = start_demo();
    let forged = signed("GET", "/openstack/latest/meta_data.json", DEMO, "", "").replace(
        &metaproxy::sign::sign_instance_id(SECRET.as_bytes(), DEMO),
        &metaproxy::sign::sign_instance_id(b"not-the-secret", DEMO),
    );
    let r = get(s.addr, &forged).unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
    let r = get(
        s.addr,
        "GET /openstack/latest/meta_data.json HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .unwrap();
    assert_eq!(r.status, 400);
    assert!(r.text().contains("X-Instance-ID header is missing"));
    s.handle.stop().unwrap();
}

#[test]
fn head_sends_get_length_without_a_body() {
    let s = start_demo();
    let path = "/openstack/latest/meta_data.json";
    let g = get(s.addr, &signed("GET", path, DEMO, "", "")).unwrap();
    assert_eq!(g.status, 200);
    assert!(!g.body.is_empty());
    // Read HEAD's answer to EOF: nothing may follow the head.
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(signed("HEAD", path, DEMO, "Connection: close\r\n", "").as_bytes())
        .unwrap();
    let mut raw = Vec::new();
    c.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains(&format!("\r\nContent-Length: {}\r\n", g.body.len())),
        "{head}"
    );
    assert!(head.contains("\r\nConnection: close"), "{head}");
    assert_eq!(rest, "", "HEAD must not send a body");
    s.handle.stop().unwrap();
}

#[test]
fn keep_alive_and_pipelined_requests_answer_in_order() {
    let s = start_demo();
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut r = BufReader::new(c.try_clone().unwrap());
    // Three requests in one write.
    let batch = [
        signed("GET", "/latest/meta-data/hostname", DEMO2, "", ""),
        "GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
        signed("GET", "/latest/meta-data/instance-id", DEMO, "", ""),
    ]
    .concat();
    c.write_all(batch.as_bytes()).unwrap();
    let a = read_response(&mut r, false).unwrap();
    let b = read_response(&mut r, false).unwrap();
    let d = read_response(&mut r, false).unwrap();
    assert_eq!(a.text(), "demo2.novalocal");
    assert!(b.text().ends_with("latest"));
    assert_eq!(d.text(), "i-00000001");
    for x in [&a, &b, &d] {
        assert_eq!(x.status, 200);
        assert_eq!(x.header("Connection"), None, "keep-alive expected");
    }
    // The connection is still open for a fourth, which asks to close.
    c.write_all(b"GET /openstack HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let e = read_response(&mut r, false).unwrap();
    assert_eq!(e.status, 400, "no identity: {}", e.text());
    assert_eq!(e.header("Connection"), Some("close"));
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    s.handle.stop().unwrap();
}

/// The API answers requests pipelined in one write with one write per batch
/// (`serve::engine`, `BATCH_WRITES`); what a client sees must not change:
/// every answer in request order across batches (more requests than one
/// batch holds), an error answer in the middle, a HEAD framed as such, and
/// nothing after the answer that says `Connection: close`.
#[test]
fn pipelined_batches_answer_in_order_and_stop_at_connection_close() {
    let s = start_demo();
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut r = BufReader::new(c.try_clone().unwrap());
    let n = metaproxy::serve::engine::MAX_BATCH_ANSWERS * 2 + 3;
    let mut batch = String::new();
    for i in 0..n {
        batch += &match i % 4 {
            0 => signed("GET", "/latest/meta-data/hostname", DEMO2, "", ""),
            1 => signed("GET", "/latest/meta-data/instance-id", DEMO, "", ""),
            2 => signed("HEAD", "/latest/meta-data/hostname", DEMO, "", ""),
            _ => signed("GET", "/latest/meta-data/hostname", UNKNOWN, "", ""),
        };
    }
    batch += "GET /openstack HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    batch += &signed("GET", "/latest/meta-data/hostname", DEMO2, "", "");
    c.write_all(batch.as_bytes()).unwrap();
    for i in 0..n {
        let a = read_response(&mut r, i % 4 == 2).unwrap();
        match i % 4 {
            0 => assert_eq!(a.text(), "demo2.novalocal", "answer {i}"),
            1 => assert_eq!(a.text(), "i-00000001", "answer {i}"),
            2 => {
                assert_eq!(a.status, 200, "answer {i}");
                assert!(a.body.is_empty(), "answer {i}: HEAD with a body");
            }
            _ => assert_ne!(a.status, 200, "answer {i}: {}", a.text()),
        }
        assert_eq!(a.header("Connection"), None, "answer {i} kept alive");
    }
    let last = read_response(&mut r, false).unwrap();
    assert_eq!(last.status, 400, "no identity: {}", last.text());
    assert_eq!(last.header("Connection"), Some("close"));
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);
    assert!(
        rest.is_empty(),
        "answered after Connection: close: {}",
        String::from_utf8_lossy(&rest)
    );
    s.handle.stop().unwrap();
}

/// Answers held back for a batch are written before the server waits for
/// more bytes: a client that sends two whole requests and half of a third
/// gets the first two answers without sending the rest; after a malformed
/// request its 400 comes after the answers before it, then the close.
#[test]
fn held_answers_go_out_before_a_read_and_before_a_rejection() {
    let s = start_demo();
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut r = BufReader::new(c.try_clone().unwrap());
    let third = signed("GET", "/latest/meta-data/instance-id", DEMO, "", "");
    let (half, rest_of_it) = third.split_at(third.len() / 2);
    let first = [
        signed("GET", "/latest/meta-data/hostname", DEMO2, "", ""),
        signed("GET", "/latest/meta-data/hostname", DEMO, "", ""),
        half.to_string(),
    ]
    .concat();
    c.write_all(first.as_bytes()).unwrap();
    let a = read_response(&mut r, false).expect("first answer held while waiting");
    let b = read_response(&mut r, false).expect("second answer held while waiting");
    assert_eq!(a.text(), "demo2.novalocal");
    assert_eq!(b.text(), "demo.novalocal");
    let second = [
        rest_of_it.to_string(),
        signed("GET", "/latest/meta-data/hostname", DEMO2, "", ""),
        "GET / HTTP/1.1\r\nHost x\r\n\r\n".to_string(),
        signed("GET", "/latest/meta-data/hostname", DEMO, "", ""),
    ]
    .concat();
    c.write_all(second.as_bytes()).unwrap();
    let d = read_response(&mut r, false).unwrap();
    let e = read_response(&mut r, false).unwrap();
    let f = read_response(&mut r, false).unwrap();
    assert_eq!(d.text(), "i-00000001");
    assert_eq!(e.text(), "demo2.novalocal");
    assert_eq!(f.status, 400);
    assert_eq!(f.header("Connection"), Some("close"));
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    s.handle.stop().unwrap();
}

#[test]
fn malformed_request_is_400_and_closes() {
    let s = start_demo();
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // A header line without a colon, followed by a request that must never be answered.
    c.write_all(b"GET / HTTP/1.1\r\nHost x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut r = BufReader::new(c);
    let resp = read_response(&mut r, false).unwrap();
    assert_eq!(resp.status, 400);
    assert_eq!(resp.header("Connection"), Some("close"));
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    s.handle.stop().unwrap();
}

#[test]
fn password_post_limits_and_chunked_bodies() {
    let s = start_demo();
    let path = "/openstack/latest/password";
    let too_big = "x".repeat(1021);
    let r = get(s.addr, &signed("POST", path, DEMO, "", &too_big)).unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    let r = get(s.addr, &signed("PUT", path, DEMO, "", "pw")).unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    // A chunked POST is decoded before the handler sees it.
    let chunked = signed(
        "POST",
        path,
        DEMO,
        "Transfer-Encoding: chunked\r\n",
        "3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\n\r\n",
    );
    let r = get(s.addr, &chunked).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(s.addr, &signed("GET", path, DEMO, "", "")).unwrap();
    assert_eq!(r.text(), "abcdefg");
    // Exactly the cap is accepted (for the other instance).
    let max = "y".repeat(1020);
    let r = get(s.addr, &signed("POST", path, DEMO2, "", &max)).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(s.addr, &signed("GET", path, DEMO2, "", "")).unwrap();
    assert_eq!(r.text(), max);
    s.handle.stop().unwrap();
}

#[test]
fn inventory_reload_swaps_and_a_broken_file_keeps_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let inv = dir.path().join("inventory.toml");
    let original = std::fs::read_to_string(demo_inventory()).unwrap();
    std::fs::write(&inv, &original).unwrap();
    let s = start_with(&inv);
    let hostname = |s: &Server| {
        get(
            s.addr,
            &signed("GET", "/latest/meta-data/hostname", DEMO, "", ""),
        )
        .unwrap()
        .text()
    };
    assert_eq!(hostname(&s), "demo.novalocal");

    // Broken file: reload fails naming the line, the old inventory keeps serving.
    std::fs::write(&inv, "this is = not [valid toml\n").unwrap();
    let e = s.handle.reload_inventory().unwrap_err().to_string();
    assert!(e.contains("line 1"), "{e}");
    assert_eq!(hostname(&s), "demo.novalocal");

    // A good edit is picked up by reload_inventory.
    std::fs::write(&inv, original.replace("novalocal", "example.org")).unwrap();
    s.handle.reload_inventory().unwrap();
    assert_eq!(hostname(&s), "demo.example.org");

    // And by the watcher, without being asked.
    std::fs::write(&inv, original.replace("novalocal", "watched.test")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while hostname(&s) != "demo.watched.test" {
        assert!(Instant::now() < deadline, "watcher did not reload");
        std::thread::sleep(Duration::from_millis(100));
    }
    s.handle.stop().unwrap();
}

#[test]
fn config_errors_name_the_key_and_debug_hides_the_secret() {
    let bad = "[api]\ninventory = \"i.toml\"\nmetadata_proxy_shared_secert = \"x\"\n";
    let f = metaproxy::config::parse_str(bad, Path::new("t.toml")).unwrap();
    let e = ApiConfig::from_table(f.api.as_ref().unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("metadata_proxy_shared_secert"), "{e}");

    let bad = "[api]\ninventory = \"i.toml\"\nlisten = [\"127.0.0.1:1\", \"localhost\"]\n";
    let f = metaproxy::config::parse_str(bad, Path::new("t.toml")).unwrap();
    let e = ApiConfig::from_table(f.api.as_ref().unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("api.listen[1]"), "{e}");

    let state = tempfile::tempdir().unwrap();
    let cfg = api_config(&config_text("127.0.0.1:0", &demo_inventory(), state.path()));
    assert_eq!(cfg.shared_secret, SECRET);
    let d = format!("{cfg:?}");
    assert!(!d.contains(SECRET), "{d}");
}

/// One request from a chosen loopback source address.
fn get_from(source: &str, addr: SocketAddr, raw: &str) -> Resp {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let src: SocketAddr = format!("{source}:0").parse().unwrap();
    sock.bind(&src.into()).unwrap();
    sock.connect(&addr.into()).unwrap();
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    read_response(&mut BufReader::new(s), false).unwrap()
}

#[test]
fn direct_mode_identifies_by_peer_on_a_dual_stack_listener() {
    let state = tempfile::tempdir().unwrap();
    let text = config_text("[::]:0", &demo_inventory(), state.path())
        .replace("workers = 2", "workers = 1\nservice_metadata_proxy = false");
    let h = start(api_config(&text)).unwrap();
    let port = h.bound[0].port();
    let v4: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // The peer arrives as ::ffff:127.0.0.x and must be matched as IPv4.
    let id = "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n\r\n";
    assert_eq!(get_from("127.0.0.1", v4, id).text(), "i-00000001");
    assert_eq!(get_from("127.0.0.2", v4, id).text(), "i-00000002");
    let r = get_from(
        "127.0.0.2",
        v4,
        "GET /latest/meta-data/local-ipv4 HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(r.text(), "127.0.0.2");
    // Signed headers mean nothing in direct mode; an unknown peer is 404.
    assert_eq!(
        get_from(
            "127.0.0.9",
            v4,
            &signed("GET", "/latest/meta-data/instance-id", DEMO, "", "")
        )
        .status,
        404
    );
    h.stop().unwrap();
}

#[test]
fn expect_continue_gets_100_before_the_body() {
    let s = start_demo();
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let head = signed(
        "POST",
        "/openstack/latest/password",
        DEMO,
        "Expect: 100-continue\r\n",
        "",
    )
    .replace("Content-Length: 0", "Content-Length: 6");
    c.write_all(head.as_bytes()).unwrap();
    let mut r = BufReader::new(c.try_clone().unwrap());
    let interim = read_response(&mut r, false).unwrap();
    assert_eq!(interim.status, 100);
    c.write_all(b"secret").unwrap();
    let done = read_response(&mut r, false).unwrap();
    assert_eq!(done.status, 200, "{}", done.text());
    let r = get(
        s.addr,
        &signed("GET", "/openstack/latest/password", DEMO, "", ""),
    )
    .unwrap();
    assert_eq!(r.text(), "secret");
    s.handle.stop().unwrap();
}

#[test]
fn slow_heads_get_408_and_idle_connections_are_closed() {
    let state = tempfile::tempdir().unwrap();
    let text = config_text("127.0.0.1:0", &demo_inventory(), state.path())
        .replace("http_request = \"2s\"", "http_request = \"300ms\"")
        .replace("keep_alive = \"2s\"", "keep_alive = \"300ms\"");
    let h = start(api_config(&text)).unwrap();
    let addr = h.bound[0];
    // Half a head, then nothing: 408 and close.
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHo").unwrap();
    let t0 = Instant::now();
    let r = read_response(&mut BufReader::new(c), false).unwrap();
    assert_eq!(r.status, 408);
    assert!(t0.elapsed() < Duration::from_secs(3));
    // An idle keep-alive connection is closed after keep_alive.
    let c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut w = c.try_clone().unwrap();
    w.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut r = BufReader::new(c);
    assert_eq!(read_response(&mut r, false).unwrap().status, 200);
    let t0 = Instant::now();
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert!(t0.elapsed() < Duration::from_secs(3));
    h.stop().unwrap();
}

#[test]
fn stop_closes_idle_keep_alive_connections() {
    let s = start_demo();
    let c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut w = c.try_clone().unwrap();
    w.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut r = BufReader::new(c);
    assert_eq!(read_response(&mut r, false).unwrap().status, 200);
    let t0 = Instant::now();
    s.handle.stop().unwrap();
    assert!(
        t0.elapsed() < Duration::from_millis(900),
        "idle connection held the drain"
    );
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);
    assert!(rest.is_empty());
}

// ---- password durability against the real binary ----

/// The daemon as a child process on a fixed port.
struct Daemon {
    child: Child,
    addr: SocketAddr,
}

impl Daemon {
    fn kill(mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start the binary on `port` (`None`: a free one). If the port is taken
/// (EADDRINUSE: another test's client may have been given it as its
/// ephemeral port), try a free one instead.
fn spawn_daemon(dir: &Path, state: &Path, port: Option<u16>) -> Daemon {
    spawn_daemon_with(dir, &demo_inventory(), state, port)
}

fn spawn_daemon_with(dir: &Path, inventory: &Path, state: &Path, port: Option<u16>) -> Daemon {
    let mut port = port;
    for _ in 0..10 {
        let p = port.take().unwrap_or_else(free_port);
        let addr: SocketAddr = format!("127.0.0.1:{p}").parse().unwrap();
        let conf = dir.join("api.toml");
        std::fs::write(&conf, config_text(&addr.to_string(), inventory, state)).unwrap();
        let log = std::fs::File::create(dir.join("api.log")).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_metaproxy"))
            .args(["--log-level", "warn", "api", "--config"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let log = std::fs::read_to_string(dir.join("api.log")).unwrap_or_default();
                assert!(
                    log.contains("Address already in use"),
                    "daemon exited with {status}: {log}"
                );
                break; // port taken: try another
            }
            // Ready means answering: a bare connect could still reach the
            // listener of a just-killed daemon while the kernel tears it down.
            if get(addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").is_ok_and(|r| r.status == 200) {
                return Daemon { child, addr };
            }
            assert!(Instant::now() < deadline, "daemon did not start listening");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    panic!("could not start the daemon");
}

#[test]
fn posted_password_survives_sigkill_and_restart() {
    let path = "/openstack/latest/password";
    for i in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let instance = if i % 2 == 0 { DEMO } else { DEMO2 };
        let password = format!("pw-{i}-{}", "z".repeat(i * 50));
        assert!(password.len() <= 1020);

        let d = spawn_daemon(dir.path(), &state, None);
        let r = get(d.addr, &signed("POST", path, instance, "", &password)).unwrap();
        assert_eq!(r.status, 200, "iteration {i}: {}", r.text());
        let port = d.addr.port();
        d.kill(); // no drain, no clean shutdown

        // Same port, as a supervisor restart would (the server retries the
        // bind while the killed process's ring is torn down).
        let d = spawn_daemon(dir.path(), &state, Some(port));
        let r = get(d.addr, &signed("GET", path, instance, "", "")).unwrap_or_else(|e| {
            let log = std::fs::read_to_string(dir.path().join("api.log")).unwrap_or_default();
            panic!("iteration {i}: {e}; daemon log: {log}")
        });
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), password, "iteration {i}");
        let r = get(d.addr, &signed("POST", path, instance, "", "again")).unwrap();
        assert_eq!(r.status, 409, "iteration {i}: {}", r.text());
        d.kill();
    }
}

#[test]
fn sighup_reloads_the_inventory_and_sigterm_exits_cleanly() {
    use nix::sys::signal::{kill, Signal};
    let dir = tempfile::tempdir().unwrap();
    let inv = dir.path().join("inventory.toml");
    let original = std::fs::read_to_string(demo_inventory()).unwrap();
    std::fs::write(&inv, &original).unwrap();
    let mut d = spawn_daemon_with(dir.path(), &inv, &dir.path().join("state"), None);
    let pid = nix::unistd::Pid::from_raw(i32::try_from(d.child.id()).unwrap());
    let hostname = |addr| {
        get(
            addr,
            &signed("GET", "/latest/meta-data/hostname", DEMO, "", ""),
        )
        .unwrap()
        .text()
    };
    assert_eq!(hostname(d.addr), "demo.novalocal");

    std::fs::write(&inv, original.replace("novalocal", "hup.test")).unwrap();
    kill(pid, Signal::SIGHUP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while hostname(d.addr) != "demo.hup.test" {
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A broken file on SIGHUP: logged, the daemon keeps serving the old one.
    std::fs::write(&inv, "[[instance]\n").unwrap();
    kill(pid, Signal::SIGHUP).unwrap();
    let log = dir.path().join("api.log");
    common::wait_until(
        "the failed reload is logged",
        Duration::from_secs(5),
        || {
            std::fs::read_to_string(&log)
                .is_ok_and(|l| l.contains("not reloaded, keeping the previous one"))
        },
    );
    assert_eq!(hostname(d.addr), "demo.hup.test");

    kill(pid, Signal::SIGTERM).unwrap();
    let status = d.child.wait().unwrap();
    assert!(status.success(), "{status}");
    let log = std::fs::read_to_string(dir.path().join("api.log")).unwrap();
    assert!(
        log.contains("not reloaded, keeping the previous one"),
        "{log}"
    );
    assert!(log.contains("line 1"), "the error names the line: {log}");
}

#[test]
fn check_validates_the_inventory_too() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("api.toml");
    let run = |inventory: &Path| {
        std::fs::write(
            &conf,
            config_text("127.0.0.1:0", inventory, &dir.path().join("state")),
        )
        .unwrap();
        Command::new(env!("CARGO_BIN_EXE_metaproxy"))
            .args(["--log-level", "warn", "api", "--check", "--config"])
            .arg(&conf)
            .output()
            .unwrap()
    };
    let ok = run(&demo_inventory());
    assert!(ok.status.success(), "{ok:?}");
    let missing = run(&dir.path().join("nope.toml"));
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nope.toml"));
    // The secret is never printed, even at info level.
    let out = Command::new(env!("CARGO_BIN_EXE_metaproxy"))
        .args(["api", "--check", "--config"])
        .arg(&conf)
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("effective api config"), "{all}");
    assert!(!all.contains(SECRET), "{all}");
}

/// A rejected request with bytes the API never read (an oversized head,
/// still arriving): closing at once makes the kernel answer those bytes with
/// an RST, which fails a client still sending its request (it never reads
/// the answer; an RST can also discard an answer not yet sent). The API
/// lingers as the proxy does: half-close, drain, then close, so the client
/// gets its 431 and a clean end, and can finish sending without a reset.
#[test]
fn error_answer_with_unread_request_bytes_survives_the_close() {
    let s = start_demo();
    let mut head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: ".to_vec();
    head.resize(16 * 1024, b'a');
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(&head).unwrap();
    let mut r = BufReader::new(c.try_clone().unwrap());
    let resp = read_response(&mut r, false).unwrap();
    assert_eq!(resp.status, 431);
    // The API's FIN: it sent everything it will send.
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    // The client goes on sending the rest of its head, as a client that
    // writes its whole request before reading does.
    for i in 0..16 {
        c.write_all(&[b'a'; 1024])
            .unwrap_or_else(|e| panic!("write {i} after the answer: {e} (the API reset)"));
    }
    s.handle.stop().unwrap();
}
