//! The agent's Unix-socket server against a recording fake metadata API.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{read_response, Resp};
use metaproxy::agent::{AgentConfig, AgentHandle};
use metaproxy::sign::sign_instance_id;

const SECRET: &str = "test-shared-secret";
const ROUTER: &str = "4a0e0000-0000-4000-8000-0000000000c1";
const NET: &str = "4a0e0000-0000-4000-8000-0000000000a1";
const VM5: &str = "5a0e0000-0000-4000-8000-000000000005";
const VM6: &str = "6a0e0000-0000-4000-8000-000000000006";
const PROJECT: &str = "4a0e00000000400080000000000000aa";
/// The loopback guest the proxy in [`proxy_to_agent_to_api`] relays for.
const VM_LO: &str = "7a0e0000-0000-4000-8000-000000000007";
const LO_NET: &str = "4a0e0000-0000-4000-8000-0000000000a2";

fn inventory() -> String {
    format!(
        r#"
[[network]]
id = "{NET}"
name = "n"
project = "{PROJECT}"
[[network.subnet]]
id = "4a0e0000-0000-4000-8000-0000000000b1"
cidr = "10.0.0.0/24"

[[router]]
id = "{ROUTER}"
networks = ["{NET}"]

[[instance]]
uuid = "{VM5}"
hostname = "vm5"
project = "{PROJECT}"
[[instance.port]]
id = "4a0e0000-0000-4000-8000-0000000000e5"
network = "{NET}"
mac = "fa:16:3e:00:00:05"
fixed_ips = ["10.0.0.5"]

[[instance]]
uuid = "{VM6}"
hostname = "vm6"
project = "{PROJECT}"
[[instance.port]]
id = "4a0e0000-0000-4000-8000-0000000000e6"
network = "{NET}"
mac = "fa:16:3e:00:00:06"
fixed_ips = ["10.0.0.6"]

[[network]]
id = "{LO_NET}"
name = "lo"
project = "{PROJECT}"
[[network.subnet]]
id = "4a0e0000-0000-4000-8000-0000000000b2"
cidr = "127.0.0.0/8"
dhcp = false

[[router]]
id = "{proxy_router}"
networks = ["{LO_NET}"]

[[instance]]
uuid = "{VM_LO}"
hostname = "vmlo"
project = "{PROJECT}"
[[instance.port]]
id = "4a0e0000-0000-4000-8000-0000000000e7"
network = "{LO_NET}"
mac = "fa:16:3e:00:00:07"
fixed_ips = ["127.0.0.1"]
"#,
        proxy_router = common::ROUTER
    )
}

/// How the fake API answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ApiMode {
    /// 200, body `instance=<X-Instance-ID>`, keep-alive.
    Echo,
    /// This status, body `status <n>`.
    Status(u16),
    /// Reads requests, never answers.
    Silent,
    /// Like `Echo`, but closes the connection after each response without
    /// saying so (an API restarting, an idle timeout racing a request).
    EchoThenClose,
}

#[derive(Clone, Debug)]
struct Seen {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Seen {
    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.headers.iter().map(|(n, _)| n.clone()).collect();
        v.sort();
        v
    }
}

struct FakeApi {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    mode: Arc<Mutex<ApiMode>>,
}

impl FakeApi {
    fn start(mode: ApiMode) -> FakeApi {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mode = Arc::new(Mutex::new(mode));
        let (s, m) = (seen.clone(), mode.clone());
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(conn) = conn else { return };
                let (s, m) = (s.clone(), m.clone());
                std::thread::spawn(move || serve_api(conn, &s, &m));
            }
        });
        FakeApi { addr, seen, mode }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn set_mode(&self, m: ApiMode) {
        *self.mode.lock().unwrap() = m;
    }
}

fn serve_api(conn: TcpStream, seen: &Mutex<Vec<Seen>>, mode: &Mutex<ApiMode>) {
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("").to_string();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end_matches(['\r', '\n']);
            if h.is_empty() {
                break;
            }
            let (n, v) = h.split_once(':').unwrap();
            headers.push((n.to_string(), v.trim().to_string()));
        }
        let cl: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map_or(0, |(_, v)| v.parse().unwrap());
        let mut body = vec![0u8; cl];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let s = Seen {
            method,
            target,
            headers,
            body,
        };
        let instance = s.get("X-Instance-ID").unwrap_or("").to_string();
        let is_head = s.method == "HEAD";
        let target = s.target.clone();
        seen.lock().unwrap().push(s);
        if target == "/broken" {
            // Not a response: the agent's request on this connection fails.
            let _ = w.write_all(b"NOT HTTP AT ALL\r\n\r\n");
            return;
        }
        if target == "/drop" {
            // Read, think, close without an answer: what the agent wrote on
            // this connection after it is lost with it.
            std::thread::sleep(Duration::from_millis(300));
            return;
        }
        if target == "/slow" {
            // A slow render: the answers pipelined behind it are done first.
            std::thread::sleep(Duration::from_millis(300));
        }
        let m = *mode.lock().unwrap();
        let (status, body) = match m {
            ApiMode::Echo | ApiMode::EchoThenClose => (200, format!("instance={instance}")),
            ApiMode::Status(n) => (n, format!("status {n}")),
            ApiMode::Silent => {
                // Hold the connection open, never answer.
                let mut sink = Vec::new();
                let _ = r.read_to_end(&mut sink);
                return;
            }
        };
        let resp = format!(
            "HTTP/1.1 {status} Whatever\r\nContent-Type: text/plain\r\nX-Api: fake\r\nContent-Length: {}\r\n\r\n{}",
            body.len(),
            if is_head { "" } else { &body }
        );
        if w.write_all(resp.as_bytes()).is_err() || m == ApiMode::EchoThenClose {
            return;
        }
    }
}

struct Agent {
    handle: Option<AgentHandle>,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    fn stats(&self) -> metaproxy::agent::AgentStats {
        self.handle.as_ref().unwrap().stats()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.stop();
        }
    }
}

fn config(dir: &Path, api: SocketAddr, timeout: &str, extra: &str) -> AgentConfig {
    let inv = dir.join("inventory.toml");
    std::fs::write(&inv, inventory()).unwrap();
    let text = format!(
        r#"
socket = "{}"
socket_mode = "user"
inventory = "{}"
metadata_proxy_shared_secret = "{SECRET}"
{extra}
[nova]
nova_metadata_host = "{}"
nova_metadata_port = {}
timeout = "{timeout}"
"#,
        dir.join("run/agent.sock").display(),
        inv.display(),
        api.ip(),
        api.port()
    );
    let t: toml::Table = toml::from_str(&text).unwrap();
    AgentConfig::try_from(&t).unwrap()
}

fn start_agent(api: SocketAddr, timeout: &str) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), api, timeout, "");
    let socket = cfg.socket.clone();
    let handle = metaproxy::agent::start(cfg).unwrap();
    Agent {
        handle: Some(handle),
        socket,
        _dir: dir,
    }
}

fn connect(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn request(path_in_guest: &str, id_headers: &str, xff: &str) -> String {
    format!(
        "GET {path_in_guest} HTTP/1.1\r\nHost: 169.254.169.254\r\nUser-Agent: curl\r\nAccept: */*\r\nX-Forwarded-For: {xff}\r\n{id_headers}\r\n"
    )
}

fn router(xff: &str) -> String {
    request(
        "/latest/meta-data/instance-id?x=1",
        &format!("X-Neutron-Router-ID: {ROUTER}\r\n"),
        xff,
    )
}

fn network(xff: &str) -> String {
    request(
        "/openstack/latest/meta_data.json",
        &format!("X-Neutron-Network-ID: {NET}\r\n"),
        xff,
    )
}

/// One request on a fresh connection.
fn ask(socket: &Path, raw: &str) -> Resp {
    let mut s = connect(socket);
    s.write_all(raw.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    read_response(&mut r, false).unwrap()
}

#[test]
fn router_and_network_scoped_requests_are_signed_and_forwarded() {
    let api = FakeApi::start(ApiMode::Echo);
    let agent = start_agent(api.addr, "5s");

    let r = ask(&agent.socket, &router("10.0.0.5"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), format!("instance={VM5}"));
    assert_eq!(r.header("X-Api"), Some("fake"), "API headers relayed");
    let r = ask(&agent.socket, &network("10.0.0.6"));
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), format!("instance={VM6}"));

    let seen = api.seen();
    assert_eq!(seen.len(), 2);
    for (s, vm, target) in [
        (&seen[0], VM5, "/latest/meta-data/instance-id?x=1"),
        (&seen[1], VM6, "/openstack/latest/meta_data.json"),
    ] {
        assert_eq!(s.method, "GET");
        assert_eq!(s.target, target);
        assert_eq!(
            s.names(),
            vec![
                "Host",
                "X-Forwarded-For",
                "X-Instance-ID",
                "X-Instance-ID-Signature",
                "X-Tenant-ID"
            ],
            "exactly these headers: {:?}",
            s.headers
        );
        assert_eq!(s.get("X-Instance-ID"), Some(vm));
        assert_eq!(s.get("X-Tenant-ID"), Some(PROJECT));
        assert_eq!(
            s.get("X-Instance-ID-Signature"),
            Some(sign_instance_id(SECRET.as_bytes(), vm).as_str())
        );
        assert_eq!(
            s.get("Host"),
            Some(format!("127.0.0.1:{}", api.addr.port()).as_str())
        );
    }
    assert_eq!(seen[0].get("X-Forwarded-For"), Some("10.0.0.5"));
    assert_eq!(seen[1].get("X-Forwarded-For"), Some("10.0.0.6"));
}

#[test]
fn post_body_and_token_are_forwarded() {
    let api = FakeApi::start(ApiMode::Echo);
    let agent = start_agent(api.addr, "5s");
    let raw = format!(
        "POST /openstack/latest/password HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.0.0.5\r\n\
         X-Neutron-Router-ID: {ROUTER}\r\nX-aws-ec2-metadata-token: tok\r\nContent-Length: 5\r\n\r\nhello"
    );
    let r = ask(&agent.socket, &raw);
    assert_eq!(r.status, 200);
    let seen = api.seen();
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].body, b"hello");
    assert_eq!(seen[0].get("Content-Length"), Some("5"));
    assert_eq!(seen[0].get("X-aws-ec2-metadata-token"), Some("tok"));
}

#[test]
fn bad_identity_headers_are_400_and_unknown_guest_is_404() {
    let api = FakeApi::start(ApiMode::Echo);
    let agent = start_agent(api.addr, "5s");

    let both = request(
        "/",
        &format!("X-Neutron-Router-ID: {ROUTER}\r\nX-Neutron-Network-ID: {NET}\r\n"),
        "10.0.0.5",
    );
    let r = ask(&agent.socket, &both);
    assert_eq!(r.status, 400);
    assert!(
        r.text()
            .contains(&format!("Both network {NET} and router {ROUTER} defined.")),
        "{}",
        r.text()
    );
    assert!(r.header("Content-Type").unwrap().starts_with("text/plain"));

    let no_xff = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Neutron-Router-ID: {ROUTER}\r\n\r\n");
    assert_eq!(ask(&agent.socket, &no_xff).status, 400);
    assert_eq!(
        ask(&agent.socket, &router("10.0.0.5, 10.0.0.6")).status,
        400
    );

    let r = ask(&agent.socket, &network("10.0.0.99"));
    assert_eq!(r.status, 404);
    // A pooled client keeps its connection: no close on our own 404.
    assert_eq!(r.header("Connection"), None);
    assert!(r
        .text()
        .contains(&format!("Instance was not found on network {NET}.")));
    let r = ask(&agent.socket, &router("10.0.0.99"));
    assert_eq!(r.status, 404);
    assert!(r
        .text()
        .contains(&format!("Instance was not found on router {ROUTER}.")));
    assert!(api.seen().is_empty(), "nothing reached the API");
    assert_eq!(agent.stats().bad_requests, 3);
    assert_eq!(agent.stats().not_found, 2);
}

#[test]
fn api_statuses_are_relayed_or_mapped() {
    let api = FakeApi::start(ApiMode::Status(418));
    let agent = start_agent(api.addr, "5s");
    assert_eq!(ask(&agent.socket, &router("10.0.0.5")).status, 500);
    for s in [400, 403, 409, 500, 502, 503, 504] {
        api.set_mode(ApiMode::Status(s));
        let r = ask(&agent.socket, &router("10.0.0.5"));
        assert_eq!(r.status, s);
        assert_eq!(r.text(), format!("status {s}"), "body relayed");
    }
}

#[test]
fn api_down_is_503() {
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let agent = start_agent(addr, "5s");
    let r = ask(&agent.socket, &router("10.0.0.5"));
    assert_eq!(r.status, 503);
    assert!(r.text().contains("temporarily unavailable"));
}

#[test]
fn api_silent_is_504() {
    let api = FakeApi::start(ApiMode::Silent);
    let agent = start_agent(api.addr, "300ms");
    let t = std::time::Instant::now();
    let r = ask(&agent.socket, &router("10.0.0.5"));
    assert_eq!(r.status, 504);
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn api_404_for_a_cached_mapping_is_retried_once() {
    let api = FakeApi::start(ApiMode::Echo);
    let agent = start_agent(api.addr, "5s");
    assert_eq!(ask(&agent.socket, &router("10.0.0.5")).status, 200);
    api.set_mode(ApiMode::Status(404));
    let r = ask(&agent.socket, &router("10.0.0.5"));
    assert_eq!(r.status, 404);
    assert_eq!(r.text(), "status 404");
    assert_eq!(api.seen().len(), 3, "one retry after the cached 404");
    assert_eq!(agent.stats().retried_after_404, 1);
    assert_eq!(agent.stats().inventory_lookups, 2);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let api = FakeApi::start(ApiMode::Echo);
    let agent = start_agent(api.addr, "5s");
    let mut s = connect(&agent.socket);
    let all = format!(
        "{}{}{}",
        router("10.0.0.5"),
        network("10.0.0.6"),
        router("10.0.0.99")
    );
    s.write_all(all.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let a = read_response(&mut r, false).unwrap();
    let b = read_response(&mut r, false).unwrap();
    let c = read_response(&mut r, false).unwrap();
    assert_eq!(a.text(), format!("instance={VM5}"));
    assert_eq!(b.text(), format!("instance={VM6}"));
    assert_eq!(c.status, 404);
    // Still open for more.
    r.get_mut()
        .write_all(router("10.0.0.6").as_bytes())
        .unwrap();
    let d = read_response(&mut r, false).unwrap();
    assert_eq!(d.text(), format!("instance={VM6}"));
}

#[test]
fn a_failure_mid_batch_gets_its_own_answer_and_spares_its_neighbours() {
    // Answers that are done by the time the one before them is are written
    // together; each must still be its own request's answer, in order.
    let api = FakeApi::start(ApiMode::Echo);
    let agent = start_agent(api.addr, "5s");
    let with_target =
        |raw: String, t: &str| raw.replacen("/latest/meta-data/instance-id?x=1", t, 1);
    let head = router("10.0.0.6").replacen("GET ", "HEAD ", 1);
    let no_xff = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Neutron-Router-ID: {ROUTER}\r\n\r\n");
    let last = network("10.0.0.5").replace("User-Agent", "Connection: close\r\nUser-Agent");
    let batch = [
        router("10.0.0.5"),
        with_target(router("10.0.0.6"), "/slow"),
        no_xff,
        with_target(router("10.0.0.5"), "/broken"),
        router("10.0.0.99"),
        head,
        network("10.0.0.6"),
        last,
    ]
    .concat();
    let mut s = connect(&agent.socket);
    s.write_all(batch.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let mut next = |is_head: bool| read_response(&mut r, is_head).unwrap();
    let a = next(false);
    assert_eq!((a.status, a.text()), (200, format!("instance={VM5}")));
    let slow = next(false);
    assert_eq!((slow.status, slow.text()), (200, format!("instance={VM6}")));
    let bad = next(false);
    assert_eq!(bad.status, 400, "{}", bad.text());
    let broken = next(false);
    assert_eq!(broken.status, 502, "{}", broken.text());
    assert!(
        broken.text().contains("broken response"),
        "{}",
        broken.text()
    );
    let missing = next(false);
    assert_eq!(missing.status, 404);
    assert!(missing.text().contains("not found on router"));
    let h = next(true);
    assert_eq!(h.status, 200);
    assert!(h.body.is_empty(), "no body after a HEAD");
    let b = next(false);
    assert_eq!((b.status, b.text()), (200, format!("instance={VM6}")));
    let c = next(false);
    assert_eq!((c.status, c.text()), (200, format!("instance={VM5}")));
    assert_eq!(c.header("Connection"), Some("close"));
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    assert!(
        rest.is_empty(),
        "closed after the last answer, nothing stray"
    );
}

fn start_agent_with(api: SocketAddr, timeout: &str, extra: &str) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), api, timeout, extra);
    let socket = cfg.socket.clone();
    let handle = metaproxy::agent::start(cfg).unwrap();
    Agent {
        handle: Some(handle),
        socket,
        _dir: dir,
    }
}

/// `ask` from `n` guests at once, `gap` apart, each on its own connection;
/// the answers in the order asked.
fn ask_together(socket: &Path, raws: Vec<String>, gap: Duration) -> Vec<Resp> {
    let threads: Vec<_> = raws
        .into_iter()
        .map(|raw| {
            let socket = socket.to_path_buf();
            let t = std::thread::spawn(move || ask(&socket, &raw));
            std::thread::sleep(gap);
            t
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// With one pooled API connection (`pool_size = 1`), requests from many
/// guests are pipelined on it behind a slow render: each still gets its own
/// answer, none is shifted by the slow one at the head.
#[test]
fn pipelined_api_requests_behind_a_slow_one_get_their_own_answers() {
    let api = FakeApi::start(ApiMode::Echo);
    let agent = start_agent_with(api.addr, "5s", "pool_size = 1");
    assert_eq!(ask(&agent.socket, &router("10.0.0.5")).status, 200);
    let slow = router("10.0.0.6").replacen("/latest/meta-data/instance-id?x=1", "/slow", 1);
    let mut raws = vec![slow];
    let mut want = vec![VM6];
    for i in 0..12 {
        let (xff, vm) = if i % 2 == 0 {
            ("10.0.0.5", VM5)
        } else {
            ("10.0.0.6", VM6)
        };
        raws.push(if i % 3 == 0 {
            network(xff)
        } else {
            router(xff)
        });
        want.push(vm);
    }
    let answers = ask_together(&agent.socket, raws, Duration::from_millis(10));
    for (i, (r, vm)) in answers.iter().zip(want).enumerate() {
        assert_eq!(
            (r.status, r.text()),
            (200, format!("instance={vm}")),
            "answer {i}"
        );
    }
    assert_eq!(api.seen().len(), 14, "each request reached the API once");
}

/// A POST written on a pipelined connection that the API then closes
/// without answering is answered 502 and never sent twice (the API may have
/// stored it); a GET pipelined behind it on the same connection is re-sent
/// on a new one and answered.
#[test]
fn a_lost_pipelined_post_is_not_resent_but_the_get_behind_it_is() {
    let api = FakeApi::start(ApiMode::Echo);
    let agent = start_agent_with(api.addr, "5s", "pool_size = 1");
    // The pooled connection has answered: a loss on it is a re-send case.
    assert_eq!(ask(&agent.socket, &router("10.0.0.5")).status, 200);
    let post = format!(
        "POST /drop HTTP/1.1\r\nHost: 169.254.169.254\r\nX-Forwarded-For: 10.0.0.5\r\n\
         X-Neutron-Router-ID: {ROUTER}\r\nContent-Length: 3\r\n\r\nabc"
    );
    let answers = ask_together(
        &agent.socket,
        vec![post, router("10.0.0.6")],
        Duration::from_millis(100),
    );
    assert_eq!(answers[0].status, 502, "{}", answers[0].text());
    assert_eq!(
        (answers[1].status, answers[1].text()),
        (200, format!("instance={VM6}"))
    );
    let seen = api.seen();
    let posts = seen.iter().filter(|s| s.method == "POST").count();
    assert_eq!(posts, 1, "the POST reached the API exactly once");
}

/// Every pipelined request still has its own deadline: behind a silent API
/// each gets 504, and the connection they were on is not reused (a late
/// answer must not become the next request's).
#[test]
fn pipelined_requests_to_a_silent_api_each_time_out() {
    let api = FakeApi::start(ApiMode::Echo);
    let agent = start_agent_with(api.addr, "300ms", "pool_size = 1");
    assert_eq!(ask(&agent.socket, &router("10.0.0.5")).status, 200);
    api.set_mode(ApiMode::Silent);
    let raws = vec![router("10.0.0.5"), router("10.0.0.6"), network("10.0.0.5")];
    for (i, r) in ask_together(&agent.socket, raws, Duration::from_millis(5))
        .iter()
        .enumerate()
    {
        assert_eq!(r.status, 504, "request {i}: {}", r.text());
    }
    api.set_mode(ApiMode::Echo);
    let r = ask(&agent.socket, &router("10.0.0.6"));
    assert_eq!((r.status, r.text()), (200, format!("instance={VM6}")));
}

#[test]
fn connection_close_request_is_answered_then_closed() {
    let api = FakeApi::start(ApiMode::Echo);
    let agent = start_agent(api.addr, "5s");
    let raw = router("10.0.0.5").replace("User-Agent", "Connection: close\r\nUser-Agent");
    let mut s = connect(&agent.socket);
    s.write_all(raw.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let resp = read_response(&mut r, false).unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("Connection"), Some("close"));
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "closed after the answer");
}

#[test]
fn one_guest_costs_one_inventory_lookup() {
    let api = FakeApi::start(ApiMode::Echo);
    let agent = start_agent(api.addr, "5s");
    let mut s = connect(&agent.socket);
    let mut r = BufReader::new(s.try_clone().unwrap());
    for _ in 0..100 {
        s.write_all(router("10.0.0.5").as_bytes()).unwrap();
        assert_eq!(read_response(&mut r, false).unwrap().status, 200);
    }
    let st = agent.stats();
    assert_eq!(st.inventory_lookups, 1, "{st:?}");
    assert_eq!(st.cache_hits, 99);
    assert_eq!(st.forwarded, 100);
    assert_eq!(api.seen().len(), 100);
}

#[test]
fn inventory_reload_swaps_and_a_broken_file_keeps_the_old_one() {
    let api = FakeApi::start(ApiMode::Echo);
    let agent = start_agent(api.addr, "5s");
    let h = agent.handle.as_ref().unwrap();
    let inv = agent._dir.path().join("inventory.toml");
    std::fs::write(&inv, "this is not toml [").unwrap();
    assert!(h.reload_inventory().is_err());
    assert_eq!(ask(&agent.socket, &router("10.0.0.5")).status, 200);
    // Move VM5's address to 10.0.0.7.
    std::fs::write(&inv, inventory().replace("10.0.0.5", "10.0.0.7")).unwrap();
    h.reload_inventory().unwrap();
    assert_eq!(ask(&agent.socket, &router("10.0.0.5")).status, 404);
    let r = ask(&agent.socket, &router("10.0.0.7"));
    assert_eq!(r.text(), format!("instance={VM5}"));
}

#[test]
fn stale_socket_is_replaced_and_a_live_one_refuses_start() {
    let api = FakeApi::start(ApiMode::Echo);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), api.addr, "5s", "");
    std::fs::create_dir_all(cfg.socket.parent().unwrap()).unwrap();
    // A stale socket: bound, then nobody accepting.
    drop(UnixListener::bind(&cfg.socket).unwrap());
    assert!(cfg.socket.exists());
    let h = metaproxy::agent::start(cfg.clone()).unwrap();
    assert_eq!(ask(&cfg.socket, &router("10.0.0.5")).status, 200);
    // A second agent on the live socket must refuse.
    let err = metaproxy::agent::start(cfg.clone())
        .err()
        .expect("must refuse");
    assert!(
        err.to_string().contains("another agent is running"),
        "{err}"
    );
    // The first one still serves.
    assert_eq!(ask(&cfg.socket, &router("10.0.0.5")).status, 200);
    h.stop().unwrap();
}

#[test]
fn a_pooled_connection_the_api_closed_is_replaced() {
    let api = FakeApi::start(ApiMode::EchoThenClose);
    let agent = start_agent(api.addr, "5s");
    for vm in [VM5, VM5, VM5] {
        let r = ask(&agent.socket, &router("10.0.0.5"));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), format!("instance={vm}"));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(api.seen().len(), 3, "each request reached the API once");
}

#[test]
fn inventory_file_changes_are_picked_up_by_polling() {
    let api = FakeApi::start(ApiMode::Echo);
    let agent = start_agent(api.addr, "5s");
    assert_eq!(ask(&agent.socket, &router("10.0.0.8")).status, 404);
    let inv = agent._dir.path().join("inventory.toml");
    std::fs::write(&inv, inventory().replace("10.0.0.6", "10.0.0.8")).unwrap();
    let t = std::time::Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let r = ask(&agent.socket, &router("10.0.0.8"));
        if r.status == 200 {
            assert_eq!(r.text(), format!("instance={VM6}"));
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "not reloaded");
    }
}

#[test]
fn socket_gets_the_configured_mode() {
    use std::os::unix::fs::PermissionsExt;
    let api = FakeApi::start(ApiMode::Echo);
    let agent = start_agent(api.addr, "5s");
    let mode = std::fs::metadata(&agent.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644);
}

#[test]
fn proxy_to_agent_to_api() {
    let api = FakeApi::start(ApiMode::Echo);
    let agent = start_agent(api.addr, "5s");
    let proxy = metaproxy::proxy::start(common::proxy_config(&agent.socket, "")).unwrap();
    let addr = proxy.bound[0][0];
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    // A guest spoofing its identity gets its own instance anyway.
    let raw = "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\
               X-Forwarded-For: 10.0.0.5\r\nX-Instance-ID: victim\r\n\r\n";
    for _ in 0..3 {
        s.write_all(raw.as_bytes()).unwrap();
        let resp = read_response(&mut r, false).unwrap();
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(resp.text(), format!("instance={VM_LO}"));
    }
    let seen = api.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0].get("X-Forwarded-For"), Some("127.0.0.1"));
    assert_eq!(
        seen[0].get("X-Instance-ID-Signature"),
        Some(sign_instance_id(SECRET.as_bytes(), VM_LO).as_str())
    );
    assert_eq!(agent.stats().inventory_lookups, 1);
    proxy.stop().unwrap();
}

#[test]
fn link_local_v6_resolves_by_mac_and_mapped_v4_as_v4() {
    let api = FakeApi::start(ApiMode::Echo);
    let agent = start_agent(api.addr, "5s");
    let r = ask(&agent.socket, &router("fe80::f816:3eff:fe00:6"));
    assert_eq!(r.text(), format!("instance={VM6}"));
    let r = ask(&agent.socket, &network("::ffff:10.0.0.5"));
    assert_eq!(r.text(), format!("instance={VM5}"));
    let seen = api.seen();
    assert_eq!(
        seen[0].get("X-Forwarded-For"),
        Some("fe80::f816:3eff:fe00:6")
    );
    assert_eq!(seen[1].get("X-Forwarded-For"), Some("::ffff:10.0.0.5"));
}

#[test]
fn chunked_guest_body_is_forwarded_with_a_length_and_head_has_no_body() {
    let api = FakeApi::start(ApiMode::Echo);
    let agent = start_agent(api.addr, "5s");
    let raw = format!(
        "POST /openstack/latest/password HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.0.0.5\r\n\
         X-Neutron-Router-ID: {ROUTER}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    );
    let mut s = connect(&agent.socket);
    s.write_all(raw.as_bytes()).unwrap();
    let head = router("10.0.0.5").replacen("GET", "HEAD", 1);
    s.write_all(head.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    assert_eq!(read_response(&mut r, false).unwrap().status, 200);
    let h = read_response(&mut r, true).unwrap();
    assert_eq!(h.status, 200);
    let len = format!("instance={VM5}").len().to_string();
    assert_eq!(
        h.header("Content-Length"),
        Some(len.as_str()),
        "the API's length"
    );
    // Still in step: a third request is answered.
    r.get_mut()
        .write_all(router("10.0.0.6").as_bytes())
        .unwrap();
    let c = read_response(&mut r, false).unwrap();
    assert_eq!(c.text(), format!("instance={VM6}"));
    // Pipelined requests are forwarded concurrently: the API may see them in
    // any order (the guest's answers stay in order, checked above).
    let seen = api.seen();
    let post = seen
        .iter()
        .find(|r| r.method == "POST")
        .expect("POST forwarded");
    assert_eq!(post.body, b"abcde");
    assert_eq!(post.get("Content-Length"), Some("5"));
    assert_eq!(post.get("Transfer-Encoding"), None);
    assert!(seen.iter().any(|r| r.method == "HEAD"));
}

/// `transport_url` pointing at a broker that never answers (a listener
/// nobody accepts on: the TCP handshake completes, AMQP's never does) and
/// at one that refuses: requests are served as without reporting, and the
/// agent still stops at once (the reporter's thread is not waited on for its
/// connect timeout).
#[test]
#[cfg(feature = "amqp-report")]
fn a_dead_broker_does_not_affect_serving_or_stopping() {
    let black_hole = TcpListener::bind("127.0.0.1:0").unwrap();
    let refused = common::free_port();
    let api = FakeApi::start(ApiMode::Echo);
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "transport_url = \"rabbit://u:pw@{},u:pw@127.0.0.1:{refused}/\"\nhost = \"t\"\nreport_interval = \"1s\"",
        black_hole.local_addr().unwrap()
    );
    let cfg = config(dir.path(), api.addr, "5s", &extra);
    let socket = cfg.socket.clone();
    let handle = metaproxy::agent::start(cfg).unwrap();
    let t0 = std::time::Instant::now();
    for _ in 0..20 {
        let r = ask(&socket, &router("10.0.0.5"));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    let t0 = std::time::Instant::now();
    handle.stop().unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "stop took {:?}",
        t0.elapsed()
    );
}

/// The agent stage on the proxy's own loops (`metaproxy up`, `metaproxy
/// ovn`): no agent socket exists, and through the proxy a guest still gets
/// everything the agent answers over its socket: its own instance whatever
/// it spoofs (the proxy strips and counts, the agent signs), the agent's
/// 404 page for an address no port has and the same head with no body for
/// a HEAD (the next request on that connection still in step), the API's
/// 404 for a cached mapping retried once with a fresh lookup, and the
/// agent's 503 page when the API is down. The agent's counters count it.
#[test]
fn in_process_agent_stage_answers_as_the_agent_with_no_socket() {
    let api = FakeApi::start(ApiMode::Echo);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), api.addr, "5s", "");
    let socket = cfg.socket.clone();
    let proxy_cfg = common::proxy_config(&socket, "");
    let agent = metaproxy::agent::start_in_process(cfg, None, proxy_cfg.workers.get()).unwrap();
    let link = metaproxy::proxy::upstream::AgentLink::InProcess(agent.stage());
    let proxy = metaproxy::proxy::start_with(proxy_cfg, link).unwrap();
    assert!(!socket.exists(), "an agent socket was created");
    let addr = proxy.bound[0][0];
    let guest = |from: &str| {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.bind(&format!("{from}:0").parse::<SocketAddr>().unwrap().into())
            .unwrap();
        sock.connect(&addr.into()).unwrap();
        let s: TcpStream = sock.into();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        BufReader::new(s)
    };
    let send = |r: &mut BufReader<TcpStream>, raw: &str| r.get_mut().write_all(raw.as_bytes());

    // 1. Spoofed identity: stripped by the proxy, the guest's own instance.
    // (Its connection stays on one loop, so its cache entry is that loop's.)
    let mut first = guest("127.0.0.1");
    let r = &mut first;
    let spoofed = format!(
        "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\
         X-Forwarded-For: 10.0.0.5\r\nX-Instance-ID: {VM5}\r\nX-Neutron-Router-ID: {ROUTER}\r\n\r\n"
    );
    for _ in 0..2 {
        send(r, &spoofed).unwrap();
        let resp = read_response(r, false).unwrap();
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(resp.text(), format!("instance={VM_LO}"));
    }
    let seen = api.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].get("X-Forwarded-For"), Some("127.0.0.1"));
    assert_eq!(seen[0].get("X-Instance-ID"), Some(VM_LO));
    assert_eq!(
        seen[0].get("X-Instance-ID-Signature"),
        Some(sign_instance_id(SECRET.as_bytes(), VM_LO).as_str())
    );
    let spoofs = proxy.control.status()[0].counters.rx_spoofed_header;
    assert_eq!(spoofs, 2, "the proxy counts each spoofed request");

    // 2. No port has 127.0.0.2: the agent's own 404 page, keep-alive; a
    // HEAD gets its head and no body, and the connection stays in step.
    let mut r = guest("127.0.0.2");
    let get = "GET /openstack/latest/meta_data.json HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n";
    send(&mut r, get).unwrap();
    let page = read_response(&mut r, false).unwrap();
    assert_eq!(page.status, 404);
    assert!(
        page.text().contains(&format!(
            "Instance was not found on router {}.",
            common::ROUTER
        )),
        "{}",
        page.text()
    );
    send(&mut r, &get.replacen("GET", "HEAD", 1)).unwrap();
    let head = read_response(&mut r, true).unwrap();
    assert_eq!(head.status, 404);
    let len = page.text().len().to_string();
    assert_eq!(head.header("Content-Length"), Some(len.as_str()));
    send(&mut r, get).unwrap();
    assert_eq!(read_response(&mut r, false).unwrap().status, 404, "in step");

    // 3. The API's 404 for the mapping cached on that connection's loop:
    // retried once, then relayed.
    api.set_mode(ApiMode::Status(404));
    let r = &mut first;
    send(r, &spoofed).unwrap();
    let resp = read_response(r, false).unwrap();
    assert_eq!((resp.status, resp.text()), (404, "status 404".to_string()));
    assert_eq!(api.seen().len(), 4, "one retry after the cached 404");
    let stats = agent.stats();
    assert_eq!(stats.retried_after_404, 1);
    assert_eq!(
        stats.inventory_lookups, 3,
        "127.0.0.1 twice, 127.0.0.2 once"
    );
    assert_eq!(stats.requests, 6);
    proxy.stop().unwrap();
    agent.stop();
}

/// In-process, the API unreachable is the agent's 503 page.
#[test]
fn in_process_agent_stage_with_the_api_down_is_the_agent_s_503() {
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), addr, "5s", "");
    let proxy_cfg = common::proxy_config(&cfg.socket, "");
    let agent = metaproxy::agent::start_in_process(cfg, None, proxy_cfg.workers.get()).unwrap();
    let link = metaproxy::proxy::upstream::AgentLink::InProcess(agent.stage());
    let proxy = metaproxy::proxy::start_with(proxy_cfg, link).unwrap();
    let mut s = TcpStream::connect(proxy.bound[0][0]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let resp = read_response(&mut BufReader::new(s), false).unwrap();
    assert_eq!(resp.status, 503);
    assert!(
        resp.text().contains("temporarily unavailable"),
        "{}",
        resp.text()
    );
    assert_eq!(agent.stats().api_errors, 1);
    proxy.stop().unwrap();
    agent.stop();
}

/// One request as a fake API reads it: method, target, `X-Instance-ID`,
/// body (`Content-Length` framed); `None` at end of stream.
fn read_api_request(r: &mut impl BufRead) -> Option<(String, String, String, String)> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let (mut instance, mut cl) = (String::new(), 0usize);
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end_matches(['\r', '\n']);
        if h.is_empty() {
            break;
        }
        let (n, v) = h.split_once(':')?;
        if n.eq_ignore_ascii_case("x-instance-id") {
            instance = v.trim().to_string();
        } else if n.eq_ignore_ascii_case("content-length") {
            cl = v.trim().parse().ok()?;
        }
    }
    let mut body = vec![0u8; cl];
    r.read_exact(&mut body).ok()?;
    Some((method, target, instance, String::from_utf8(body).ok()?))
}

/// What [`target_echo_api`] answers a request with: who it was for and
/// what it asked, so an answer handed to the wrong request shows.
fn target_echo(method: &str, target: &str, instance: &str, body: &str) -> Vec<u8> {
    let text = format!("{instance} {method} {target} {body}");
    let payload = if method == "HEAD" { "" } else { text.as_str() };
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{payload}",
        text.len()
    )
    .into_bytes()
}

/// A keep-alive API answering every request with [`target_echo`].
fn target_echo_api() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(conn) = conn else { return };
            std::thread::spawn(move || {
                // One write per answer: without this, Nagle holds the
                // second until the first is acknowledged.
                conn.set_nodelay(true).unwrap();
                let mut w = conn.try_clone().unwrap();
                let mut r = BufReader::new(conn);
                while let Some((m, t, i, b)) = read_api_request(&mut r) {
                    if w.write_all(&target_echo(&m, &t, &i, &b)).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A pipelined batch of the shapes a pooled proxy connection carries (GETs
/// from two guests by router and by network, a guest that does not resolve,
/// a POST with a length, a HEAD, a chunked POST), and for each the status
/// and body its own guest must get.
fn mixed_batch() -> (Vec<String>, Vec<(u16, bool, String)>) {
    let with_path = |raw: String, from: &str, to: &str| raw.replacen(from, to, 1);
    let get_r5 = with_path(
        router("10.0.0.5"),
        "/latest/meta-data/instance-id?x=1",
        "/a",
    );
    let get_n6 = with_path(
        network("10.0.0.6"),
        "/openstack/latest/meta_data.json",
        "/b",
    );
    let unknown = router("10.0.0.99");
    let post_n5 = format!(
        "POST /c HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.0.0.5\r\n\
         X-Neutron-Network-ID: {NET}\r\nContent-Length: 5\r\n\r\nhello"
    );
    let head_r6 = with_path(
        router("10.0.0.6"),
        "/latest/meta-data/instance-id?x=1",
        "/d",
    )
    .replacen("GET", "HEAD", 1);
    let chunked_r6 = format!(
        "POST /e HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.0.0.6\r\n\
         X-Neutron-Router-ID: {ROUTER}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nwor\r\n2\r\nld\r\n0\r\n\r\n"
    );
    let get_n5 = with_path(
        network("10.0.0.5"),
        "/openstack/latest/meta_data.json",
        "/f",
    );
    let raws = vec![
        get_r5, get_n6, unknown, post_n5, head_r6, chunked_r6, get_n5,
    ];
    let want = vec![
        (200, false, format!("{VM5} GET /a ")),
        (200, false, format!("{VM6} GET /b ")),
        (
            404,
            false,
            format!("Instance was not found on router {ROUTER}."),
        ),
        (200, false, format!("{VM5} POST /c hello")),
        (200, true, String::new()),
        (200, false, format!("{VM6} POST /e world")),
        (200, false, format!("{VM5} GET /f ")),
    ];
    (raws, want)
}

/// Read the answers to `want` from `r`, checking each is its own request's.
fn expect_answers(r: &mut impl BufRead, want: &[(u16, bool, String)], split: usize) {
    for (i, (status, is_head, body)) in want.iter().enumerate() {
        let a = read_response(r, *is_head)
            .unwrap_or_else(|e| panic!("split at {split}: answer {i}: {e}"));
        assert_eq!(a.status, *status, "split at {split}: answer {i}");
        if *status == 200 {
            assert_eq!(a.text(), *body, "split at {split}: answer {i}");
        } else {
            assert!(
                a.text().contains(body.as_str()),
                "split at {split}: answer {i}"
            );
        }
    }
}

/// The agent reads a pipelined batch as it comes: however the batch is cut
/// across reads, every request gets its own answer, in order. For every
/// byte boundary, the first part is written and the answers to the requests
/// it holds whole are read (so the agent has read it, the partial request
/// behind them included), then the rest.
#[test]
fn a_pipelined_batch_split_at_every_byte_gets_every_answer_in_order() {
    let agent = start_agent(target_echo_api(), "5s");
    let (raws, want) = mixed_batch();
    let batch = raws.concat();
    let ends: Vec<usize> = raws
        .iter()
        .scan(0, |end, r| {
            *end += r.len();
            Some(*end)
        })
        .collect();
    // One connection for every split: what is left in the buffer from one
    // batch must not leak into the next.
    let mut s = connect(&agent.socket);
    let mut r = BufReader::new(s.try_clone().unwrap());
    for split in 1..=batch.len() {
        let whole = ends.iter().filter(|&&e| e <= split).count();
        s.write_all(&batch.as_bytes()[..split]).unwrap();
        expect_answers(&mut r, &want[..whole], split);
        s.write_all(&batch.as_bytes()[split..]).unwrap();
        expect_answers(&mut r, &want[whole..], split);
    }
    assert_eq!(agent.stats().requests, (raws.len() * batch.len()) as u64);
}

/// The API's answers to pipelined requests reach their own requests however
/// they are cut across the agent's reads of the pooled connection. One
/// pooled connection (`pool_size = 1`) carries a batch of five; the fake API
/// reads all five, writes its answers up to a byte boundary, and the rest
/// only once the guest has read the answers the first part completed.
#[test]
fn api_answers_split_at_every_byte_reach_their_own_requests() {
    use std::sync::mpsc;
    let (raws, want) = mixed_batch();
    // Only what reaches the API (the unresolved guest is answered by the agent).
    let (raws, want): (Vec<String>, Vec<_>) = raws
        .into_iter()
        .zip(want)
        .filter(|(_, (status, _, _))| *status == 200)
        .take(5)
        .unzip();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (split_tx, split_rx) = mpsc::channel::<usize>();
    let (whole_tx, whole_rx) = mpsc::channel::<usize>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (len_tx, len_rx) = mpsc::channel::<usize>();
    let n = raws.len();
    std::thread::spawn(move || {
        let Ok((conn, _)) = l.accept() else { return };
        conn.set_nodelay(true).unwrap();
        let mut w = conn.try_clone().unwrap();
        let mut r = BufReader::new(conn);
        loop {
            let mut out = Vec::new();
            let mut ends = Vec::new();
            for _ in 0..n {
                let Some((m, t, i, b)) = read_api_request(&mut r) else {
                    return;
                };
                out.extend_from_slice(&target_echo(&m, &t, &i, &b));
                ends.push(out.len());
            }
            let _ = len_tx.send(out.len());
            let Ok(split) = split_rx.recv() else { return };
            let split = split.min(out.len());
            w.write_all(&out[..split]).unwrap();
            let _ = whole_tx.send(ends.iter().filter(|&&e| e <= split).count());
            if go_rx.recv().is_err() {
                return;
            }
            w.write_all(&out[split..]).unwrap();
        }
    });
    let agent = start_agent_with(addr, "5s", "pool_size = 1");
    let batch = raws.concat();
    let mut s = connect(&agent.socket);
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut split = 1;
    loop {
        s.write_all(batch.as_bytes()).unwrap();
        let total = len_rx.recv().unwrap();
        split_tx.send(split).unwrap();
        let whole = whole_rx.recv().unwrap();
        expect_answers(&mut r, &want[..whole], split);
        go_tx.send(()).unwrap();
        expect_answers(&mut r, &want[whole..], split);
        if split >= total {
            break;
        }
        split += 1;
    }
    assert_eq!(agent.stats().api_errors, 0);
}
