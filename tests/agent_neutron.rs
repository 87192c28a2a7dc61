//! The agent with `backend = "neutron"` against a fake Neutron (and fake
//! Keystone) written here, forwarding to a fake metadata API.
//!
//! The fake Neutron implements `GET /v2.0/ports` with the filters the agent
//! uses (`device_id`, `device_owner`, `network_id`, `fixed_ips=ip_address=`,
//! `mac_address`, `fields`, `limit`; repeated values OR-ed, keys AND-ed, an
//! unknown key → 400, as neutron 29.0.0 does) over an in-memory port list,
//! and counts calls. Its Keystone half issues tokens and can be told to make
//! Neutron reject the current one once with 401.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use common::neutron::FakePort;
use common::read_response;
use metaproxy::agent::{AgentConfig, AgentHandle};

const SECRET: &str = "neutron-test-secret";
const ROUTER: &str = "7a000000-0000-4000-8000-0000000000c1";
const NET: &str = "7a000000-0000-4000-8000-0000000000a1";
const NET_OTHER: &str = "7a000000-0000-4000-8000-0000000000a2";
const PROJECT: &str = "7a00000000004000800000000000aaaa";
/// The two ports sharing 10.9.9.9 (on NET and on NET_OTHER).
const DUP_A: &str = "d0000000-0000-4000-8000-00000000000a";
const DUP_B: &str = "d0000000-0000-4000-8000-00000000000b";
/// Instances the fake API misbehaves for: a broken answer (the agent says
/// 502) and no answer at all (504 after the agent's API timeout).
/// Both beyond the 200 VMs the storms ask for.
const API_BROKEN_VM: usize = 200;
const API_SILENT_VM: usize = 201;

fn vm_uuid(i: usize) -> String {
    format!("{i:08x}-0000-4000-8000-000000000000")
}

fn vm_ip(i: usize) -> String {
    format!("10.0.{}.{}", i / 200, 10 + i % 200)
}

/// 202 VMs on NET behind ROUTER (the storms ask the first 200; the fake API
/// misbehaves for the last two), the router's interface, a DHCP port, and
/// two ports sharing 10.9.9.9 (one on NET, one on NET_OTHER also on the router).
fn ports() -> Vec<FakePort> {
    let mut v: Vec<FakePort> = (0..=API_SILENT_VM)
        .map(|i| FakePort {
            device_id: vm_uuid(i),
            device_owner: "compute:nova".into(),
            network_id: NET.into(),
            project: PROJECT.into(),
            mac: format!("fa:16:3e:00:{:02x}:{:02x}", i / 256, i % 256),
            ips: vec![vm_ip(i)],
        })
        .collect();
    v.push(FakePort {
        device_id: ROUTER.into(),
        device_owner: "network:router_interface".into(),
        network_id: NET.into(),
        project: PROJECT.into(),
        mac: "fa:16:3e:ff:00:01".into(),
        ips: vec!["10.0.0.1".into()],
    });
    v.push(FakePort {
        device_id: ROUTER.into(),
        device_owner: "network:ha_router_replicated_interface".into(),
        network_id: NET_OTHER.into(),
        project: PROJECT.into(),
        mac: "fa:16:3e:ff:00:02".into(),
        ips: vec!["10.1.0.1".into()],
    });
    for (net, mac, dev) in [
        (NET, "fa:16:3e:ee:00:01", DUP_A),
        (NET_OTHER, "fa:16:3e:ee:00:02", DUP_B),
    ] {
        v.push(FakePort {
            device_id: dev.into(),
            device_owner: "compute:az2".into(),
            network_id: net.into(),
            project: PROJECT.into(),
            mac: mac.into(),
            ips: vec!["10.9.9.9".into()],
        });
    }
    v
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Up,
    /// Answer 503 to every ports query.
    Error,
    /// Close every connection without answering.
    Down,
    /// Read requests, never answer.
    Silent,
}

#[derive(Default)]
struct NeutronState {
    calls: AtomicUsize,
    tokens_issued: AtomicUsize,
    rejected_401: AtomicUsize,
    /// Reject the next request's token once (then revoke it).
    reject_next: AtomicBool,
    valid_tokens: Mutex<Vec<String>>,
    queries: Mutex<Vec<String>>,
}

struct FakeNeutron {
    addr: SocketAddr,
    state: Arc<NeutronState>,
    mode: Arc<Mutex<Mode>>,
}

impl FakeNeutron {
    fn start(keystone: bool) -> FakeNeutron {
        FakeNeutron::start_tls(keystone, None)
    }

    /// With `tls`, every connection is HTTPS with that server config.
    fn start_tls(keystone: bool, tls: Option<Arc<rustls::ServerConfig>>) -> FakeNeutron {
        FakeNeutron::start_db(keystone, tls, ports())
    }

    /// Serving the ports `db`.
    fn start_db(
        keystone: bool,
        tls: Option<Arc<rustls::ServerConfig>>,
        db: Vec<FakePort>,
    ) -> FakeNeutron {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let state = Arc::new(NeutronState::default());
        let mode = Arc::new(Mutex::new(Mode::Up));
        let db = Arc::new(db);
        let (st, md) = (state.clone(), mode.clone());
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(conn) = conn else { return };
                let (st, md, db, tls) = (st.clone(), md.clone(), db.clone(), tls.clone());
                std::thread::spawn(move || match tls {
                    None => serve_neutron(conn, &st, &md, &db, keystone),
                    Some(cfg) => {
                        let tls = rustls::ServerConnection::new(cfg).unwrap();
                        let stream = rustls::StreamOwned::new(tls, conn);
                        serve_neutron(stream, &st, &md, &db, keystone);
                    }
                });
            }
        });
        FakeNeutron { addr, state, mode }
    }

    fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    fn set_mode(&self, m: Mode) {
        *self.mode.lock().unwrap() = m;
    }
}

fn serve_neutron<S: Read + Write>(
    conn: S,
    st: &NeutronState,
    mode: &Mutex<Mode>,
    db: &[FakePort],
    ks: bool,
) {
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("").to_string();
        let mut headers: Vec<(String, String)> = Vec::new();
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
            headers.push((n.to_ascii_lowercase(), v.trim().to_string()));
        }
        let hdr = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let cl: usize = hdr("content-length").map_or(0, |v| v.parse().unwrap());
        let mut body = vec![0u8; cl];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let mut extra = String::new();
        let (status, out) = if method == "POST" && target == "/v3/auth/tokens" {
            let n = st.tokens_issued.fetch_add(1, Ordering::SeqCst) + 1;
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["auth"]["identity"]["methods"][0], "password");
            assert_eq!(v["auth"]["identity"]["password"]["user"]["password"], "pw");
            let token = format!("tok-{n}");
            st.valid_tokens.lock().unwrap().push(token.clone());
            extra = format!("X-Subject-Token: {token}\r\n");
            (
                201,
                r#"{"token":{"expires_at":"2099-01-01T00:00:00.000000Z","methods":["password"]}}"#
                    .to_string(),
            )
        } else {
            match *mode.lock().unwrap() {
                Mode::Down => return,
                Mode::Silent => {
                    let mut sink = Vec::new();
                    let _ = r.read_to_end(&mut sink);
                    return;
                }
                Mode::Error => {
                    st.calls.fetch_add(1, Ordering::SeqCst);
                    (503, "<html>down</html>".to_string())
                }
                Mode::Up => {
                    let token = hdr("x-auth-token");
                    let ok = !ks || {
                        let mut valid = st.valid_tokens.lock().unwrap();
                        let t = token.unwrap_or_default();
                        if valid.contains(&t) && st.reject_next.swap(false, Ordering::SeqCst) {
                            valid.retain(|v| *v != t);
                        }
                        valid.contains(&t)
                    };
                    if ok {
                        st.calls.fetch_add(1, Ordering::SeqCst);
                        st.queries.lock().unwrap().push(target.clone());
                        common::neutron::query(&target, db, false)
                    } else {
                        st.rejected_401.fetch_add(1, Ordering::SeqCst);
                        (401, r#"{"error": {"code": 401}}"#.to_string())
                    }
                }
            }
        };
        let resp = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{out}",
            out.len()
        );
        let w = r.get_mut();
        if w.write_all(resp.as_bytes()).is_err() || w.flush().is_err() {
            return;
        }
    }
}

/// The metadata API: 200 `instance=<X-Instance-ID>` (no body after a HEAD,
/// as Nova answers), except for [`API_BROKEN_VM`] (garbage) and
/// [`API_SILENT_VM`] (no answer). Like a line-oriented server, it takes
/// every header line it reads at face value: a smuggled request is answered.
fn fake_api() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(conn) = conn else { return };
            std::thread::spawn(move || {
                let mut w = conn.try_clone().unwrap();
                let mut r = BufReader::new(conn);
                loop {
                    let mut instance = String::new();
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let is_head = line.starts_with("HEAD ");
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 {
                            return;
                        }
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        if let Some(v) = h.strip_prefix("X-Instance-ID: ") {
                            instance = v.to_string();
                        }
                    }
                    if instance == vm_uuid(API_SILENT_VM) {
                        let mut sink = Vec::new();
                        let _ = r.read_to_end(&mut sink);
                        return;
                    }
                    if instance == vm_uuid(API_BROKEN_VM) {
                        let _ = w.write_all(b"NOT HTTP AT ALL\r\n\r\n");
                        return;
                    }
                    let body = format!("instance={instance}");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{}",
                        body.len(),
                        if is_head { "" } else { &body }
                    );
                    if w.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

struct Agent {
    handle: Option<AgentHandle>,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.stop();
        }
    }
}

impl Agent {
    fn start(neutron: &FakeNeutron, keystone: bool, extra: &str) -> Agent {
        let auth = if keystone {
            keystone_auth(neutron.addr)
        } else {
            "auth_strategy = \"noauth\"".into()
        };
        Agent::start_with(neutron, "http", &auth, extra)
    }

    fn start_with(neutron: &FakeNeutron, scheme: &str, auth: &str, extra: &str) -> Agent {
        Agent::start_full(neutron, scheme, auth, extra, "")
    }

    /// `nova` goes into the agent's `[nova]` section.
    fn start_full(
        neutron: &FakeNeutron,
        scheme: &str,
        auth: &str,
        extra: &str,
        nova: &str,
    ) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let api = fake_api();
        let text = format!(
            r#"
socket = "{}"
socket_mode = "user"
backend = "neutron"
metadata_proxy_shared_secret = "{SECRET}"
metrics_listen = "127.0.0.1:0"
{extra}
[nova]
nova_metadata_host = "127.0.0.1"
nova_metadata_port = {}
{nova}
[neutron]
url = "{scheme}://{}"
timeout = "1s"
{auth}
"#,
            dir.path().join("agent.sock").display(),
            api.port(),
            neutron.addr,
        );
        let t: toml::Table = toml::from_str(&text).unwrap();
        let cfg = AgentConfig::try_from(&t).unwrap();
        let socket = cfg.socket.clone();
        let handle = metaproxy::agent::start(cfg).unwrap();
        Agent {
            handle: Some(handle),
            socket,
            _dir: dir,
        }
    }

    fn handle(&self) -> &AgentHandle {
        self.handle.as_ref().unwrap()
    }
}

fn keystone_auth(keystone: SocketAddr) -> String {
    format!(
        "auth_strategy = \"keystone\"\nauth_url = \"http://{keystone}/v3\"\nusername = \"metaproxy\"\npassword = \"pw\"\nproject_name = \"service\""
    )
}

fn request(xff: &str, scope: &str) -> String {
    format!(
        "GET /openstack/latest/meta_data.json HTTP/1.1\r\nHost: 169.254.169.254\r\nX-Forwarded-For: {xff}\r\n{scope}\r\n"
    )
}

fn by_router(xff: &str) -> String {
    request(xff, &format!("X-Neutron-Router-ID: {ROUTER}\r\n"))
}

fn by_network(xff: &str) -> String {
    request(xff, &format!("X-Neutron-Network-ID: {NET}\r\n"))
}

/// Send `reqs` on one connection, one after another; the responses.
fn exchange(sock: &Path, reqs: &[String]) -> Vec<common::Resp> {
    let s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    reqs.iter()
        .map(|q| {
            w.write_all(q.as_bytes()).unwrap();
            read_response(&mut r, false).unwrap()
        })
        .collect()
}

fn one(sock: &Path, req: &str) -> common::Resp {
    exchange(sock, &[req.to_string()]).pop().unwrap()
}

/// `threads` connections, each sending `per_thread` requests for VM
/// `(thread + k) % vms`, all starting together. Returns every (vm, response).
fn storm(sock: &Path, threads: usize, per_thread: usize, vms: usize) -> Vec<(usize, common::Resp)> {
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let barrier = barrier.clone();
            let sock = sock.to_path_buf();
            std::thread::spawn(move || {
                let vms_of: Vec<usize> = (0..per_thread).map(|k| (t + k * 7) % vms).collect();
                let reqs: Vec<String> = vms_of.iter().map(|i| by_router(&vm_ip(*i))).collect();
                let s = UnixStream::connect(&sock).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                barrier.wait();
                let mut out = Vec::new();
                for (vm, q) in vms_of.into_iter().zip(reqs) {
                    w.write_all(q.as_bytes()).unwrap();
                    out.push((vm, read_response(&mut r, false).unwrap()));
                }
                out
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect()
}

fn assert_all_resolved(results: &[(usize, common::Resp)]) {
    for (vm, resp) in results {
        assert_eq!(resp.status, 200, "vm {vm}: {}", resp.text());
        assert_eq!(resp.text(), format!("instance={}", vm_uuid(*vm)));
    }
}

#[test]
fn storm_of_1000_requests_from_200_vms_costs_at_most_3_neutron_calls() {
    let neutron = FakeNeutron::start(false);
    let agent = Agent::start(&neutron, false, "");
    let started = Instant::now();
    let results = storm(&agent.socket, 250, 4, 200);
    let elapsed = started.elapsed();
    assert_eq!(results.len(), 1000);
    assert_all_resolved(&results);
    let calls = neutron.calls();
    println!(
        "storm: 1000 requests from 200 VMs (router scope, prefetch on) in {elapsed:?}: {calls} Neutron calls: {:?}",
        neutron.state.queries.lock().unwrap()
    );
    assert!(calls <= 3, "{calls} Neutron calls");
    let st = agent.handle().stats();
    assert_eq!(st.neutron_calls, calls as u64);
    assert_eq!(st.forwarded, 1000);

    // The Prometheus endpoint shows the same.
    let addr = agent.handle().metrics_addr().unwrap();
    let resp = common::get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let text = resp.text();
    assert!(
        text.contains("metaproxy_agent_responses_total{status=\"200\"} 1000\n"),
        "{text}"
    );
    assert!(text.contains("metaproxy_agent_backend_calls_total{kind=\"prefetch\"} 1\n"));
    assert!(text.contains("metaproxy_agent_forward_latency_seconds_count 1000\n"));
}

#[test]
fn storm_without_prefetch_is_batched() {
    let neutron = FakeNeutron::start(false);
    // A window long enough that 250 threads on 2 busy cores all join it.
    let agent = Agent::start(
        &neutron,
        false,
        "prefetch_network = false\nbatch_window = \"50ms\"\nbatch_max = 256",
    );
    let results = storm(&agent.socket, 250, 4, 200);
    assert_all_resolved(&results);
    let calls = neutron.calls();
    let queries = neutron.state.queries.lock().unwrap().clone();
    println!(
        "storm without prefetch: {calls} Neutron calls, batch sizes {:?}",
        queries
            .iter()
            .map(|q| q.matches("fixed_ips=").count())
            .collect::<Vec<_>>()
    );
    // 1 router lookup + batches; every batch stays under gunicorn's default
    // request line, so 200 IPs need at least 2 queries.
    assert!(calls <= 6, "{calls} Neutron calls: {queries:?}");
    assert!(queries.iter().all(|q| q.len() < 4094));
    let text = agent.handle().metrics_text();
    assert!(
        text.contains("metaproxy_agent_batch_size_bucket{le=\"1\"} 0\n"),
        "{text}"
    );
}

#[test]
fn keystone_401_mid_run_refreshes_the_token_once() {
    let neutron = FakeNeutron::start(true);
    let agent = Agent::start(&neutron, true, "cache_ttl = 0");
    let results = storm(&agent.socket, 20, 5, 200);
    assert_all_resolved(&results);
    assert_eq!(neutron.state.tokens_issued.load(Ordering::SeqCst), 1);
    // Neutron now rejects the token: the next call gets 401 and must retry.
    neutron.state.reject_next.store(true, Ordering::SeqCst);
    let results = storm(&agent.socket, 20, 5, 200);
    assert_all_resolved(&results);
    // Calls in flight with the old token may each see a 401; one refresh serves all.
    assert!(neutron.state.rejected_401.load(Ordering::SeqCst) >= 1);
    assert_eq!(
        neutron.state.tokens_issued.load(Ordering::SeqCst),
        2,
        "one refresh"
    );
    assert_eq!(agent.handle().stats().token_requests, 2);
    assert_eq!(agent.handle().stats().backend_unavailable, 0);
}

#[test]
fn keystone_down_is_503_and_waiters_share_the_failure() {
    let neutron = FakeNeutron::start(true);
    // Refused: every miss fails fast.
    let dead = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let agent = Agent::start_with(&neutron, "http", &keystone_auth(dead_addr), "");
    let t = Instant::now();
    let results = storm(&agent.socket, 20, 1, 200);
    assert!(results.iter().all(|(_, r)| r.status == 503));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    drop(agent);

    // Silent: accepts, never answers. The concurrent misses wait for one
    // fetch and share its timeout instead of queueing one timeout each.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming() {
            held.push(c);
        }
    });
    let agent = Agent::start_with(&neutron, "http", &keystone_auth(silent_addr), "");
    let t = Instant::now();
    let results = storm(&agent.socket, 20, 1, 200);
    assert!(results.iter().all(|(_, r)| r.status == 503));
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(agent.handle().stats().token_requests, 1);
    assert_eq!(neutron.calls(), 0);
}

#[test]
fn neutron_down_misses_get_503_hits_keep_being_served() {
    let neutron = FakeNeutron::start(false);
    let agent = Agent::start(&neutron, false, "prefetch_network = false");
    // Warm: vm0 and vm1 cached (router networks too).
    for i in 0..2 {
        let r = one(&agent.socket, &by_router(&vm_ip(i)));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    for (mode, name) in [
        (Mode::Down, "closed"),
        (Mode::Error, "503"),
        (Mode::Silent, "silent"),
    ] {
        neutron.set_mode(mode);
        let t = Instant::now();
        let miss = one(&agent.socket, &by_router(&vm_ip(10 + mode as usize)));
        let took = t.elapsed();
        assert_eq!(miss.status, 503, "{name}: {}", miss.text());
        assert!(miss.text().contains("Neutron is temporarily unavailable"));
        // The timeout is 1 s; twice that allows for a retried dead connection.
        assert!(took < Duration::from_millis(2500), "{name}: {took:?}");
        let hit = one(&agent.socket, &by_router(&vm_ip(1)));
        assert_eq!(hit.status, 200, "{name}: hit served");
        assert_eq!(hit.text(), format!("instance={}", vm_uuid(1)));
    }
    neutron.set_mode(Mode::Up);
    let r = one(&agent.socket, &by_router(&vm_ip(10)));
    assert_eq!(r.status, 200, "recovered: {}", r.text());
    assert!(agent.handle().stats().backend_unavailable >= 3);
}

#[test]
fn zero_or_duplicate_ports_are_404_with_neutrons_message() {
    let neutron = FakeNeutron::start(false);
    for extra in ["", "prefetch_network = false"] {
        let agent = Agent::start(&neutron, false, extra);
        let r = one(&agent.socket, &by_router("10.0.99.99"));
        assert_eq!(r.status, 404, "{extra}");
        assert!(
            r.text()
                .contains(&format!("Instance was not found on router {ROUTER}.")),
            "{}",
            r.text()
        );
        let r = one(&agent.socket, &by_network("10.0.99.99"));
        assert_eq!(r.status, 404);
        assert!(r
            .text()
            .contains(&format!("Instance was not found on network {NET}.")));
        // 10.9.9.9 is on two networks of the router: ambiguous → 404.
        let r = one(&agent.socket, &by_router("10.9.9.9"));
        assert_eq!(r.status, 404, "{extra}: {}", r.text());
        // ... but unique on NET alone.
        let r = one(&agent.socket, &by_network("10.9.9.9"));
        assert_eq!(r.status, 200, "{extra}: {}", r.text());
        assert_eq!(r.text(), format!("instance={DUP_A}"));
        // An unknown router has no networks.
        let r = one(
            &agent.socket,
            &request(
                "10.0.0.10",
                "X-Neutron-Router-ID: 7a000000-0000-4000-8000-0000000000ff\r\n",
            ),
        );
        assert_eq!(r.status, 404);
        // A link-local IPv6 guest is looked up by MAC (vm 3: fa:16:3e:00:00:03).
        let r = one(&agent.socket, &by_network("fe80::f816:3eff:fe00:3"));
        assert_eq!(r.status, 200, "{extra}: {}", r.text());
        assert_eq!(r.text(), format!("instance={}", vm_uuid(3)));
    }
}

/// A self-signed certificate for 127.0.0.1: (server config, CA PEM path).
fn tls_server(dir: &Path) -> (Arc<rustls::ServerConfig>, PathBuf) {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let pem = dir.join("ca.pem");
    std::fs::write(&pem, ck.cert.pem()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)
        .unwrap();
    (Arc::new(cfg), pem)
}

#[test]
fn https_neutron_and_keystone_with_ca_file_or_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let (server, ca) = tls_server(dir.path());
    let neutron = FakeNeutron::start_tls(true, Some(server));
    let auth = |extra: &str| {
        format!(
            "auth_strategy = \"keystone\"\nauth_url = \"https://{}/v3\"\nusername = \"metaproxy\"\npassword = \"pw\"\nproject_name = \"service\"\n{extra}",
            neutron.addr
        )
    };
    let https = |agent_auth: &str| Agent::start_with(&neutron, "https", agent_auth, "");
    // Trusted through ca_file: resolves, token over HTTPS too.
    let agent = https(&auth(&format!("ca_file = \"{}\"", ca.display())));
    let results = storm(&agent.socket, 10, 3, 200);
    assert_all_resolved(&results);
    assert_eq!(agent.handle().stats().token_requests, 1);
    drop(agent);
    // insecure = true: any certificate.
    let agent = https(&auth("insecure = true"));
    let r = one(&agent.socket, &by_network(&vm_ip(7)));
    assert_eq!(r.status, 200, "{}", r.text());
    drop(agent);
    // Neither: the self-signed certificate is refused → 503.
    let agent = https(&auth(""));
    let r = one(&agent.socket, &by_network(&vm_ip(7)));
    assert_eq!(r.status, 503, "{}", r.text());
}

/// What a tenant can store in its own port's `device_id` and `project_id`
/// (Neutron accepts any string up to 255 characters): CR LF that smuggle a
/// second request onto the agent's pooled API connection (naming another
/// VM), a NUL, 255 bytes, and ids that are simply not UUIDs. The ports sit
/// on NET at 10.8.0.10 and up.
fn hostile_ports() -> Vec<FakePort> {
    let smuggle = |victim: usize| {
        format!(
            "{}\r\nContent-Length: 0\r\n\r\nGET /smuggled HTTP/1.1\r\nX-Instance-ID: {}",
            vm_uuid(victim),
            vm_uuid(victim + 1)
        )
    };
    let devices = [
        smuggle(1),
        smuggle(50),
        format!("{}\r\n\r\n", vm_uuid(2)),
        format!("{}\n", vm_uuid(3)),
        format!("{}\0", vm_uuid(4)),
        "\0".repeat(36),
        "d".repeat(255),
        "not-a-uuid".into(),
        format!("{} ", vm_uuid(5)),
        String::new(),
    ];
    let projects = [
        format!("{PROJECT}\r\nX-Instance-ID: {}", vm_uuid(6)),
        format!("{PROJECT}\r\n\r\nGET / HTTP/1.1"),
        "\0".repeat(32),
        "p".repeat(255),
        "demo".into(),
    ];
    let mut v = Vec::new();
    let mut k = 0usize;
    let mut push = |device: String, project: String| {
        v.push(FakePort {
            device_id: device,
            device_owner: "compute:nova".into(),
            network_id: NET.into(),
            project,
            mac: format!("fa:16:3e:88:00:{k:02x}"),
            ips: vec![hostile_ip(k)],
        });
        k += 1;
    };
    for d in devices {
        push(d, PROJECT.into());
    }
    for (j, p) in projects.into_iter().enumerate() {
        push(format!("e{j:07x}-0000-4000-8000-000000000000"), p);
    }
    v
}

const HOSTILE_PORTS: usize = 15;

fn hostile_ip(k: usize) -> String {
    format!("10.8.0.{}", 10 + k)
}

#[test]
fn hostile_device_and_project_ids_are_404_and_every_innocent_vm_gets_its_own_answer() {
    let mut db = ports();
    db.extend(hostile_ports());
    assert_eq!(db.len(), ports().len() + HOSTILE_PORTS);
    for extra in ["", "prefetch_network = false\nbatch_window = \"5ms\""] {
        let neutron = FakeNeutron::start_db(false, None, db.clone());
        let agent = Agent::start(&neutron, false, extra);
        // 200 innocent VMs and every hostile port ask at once, each on its
        // own connection, three times each; the hostile ones as GET and HEAD.
        let barrier = Arc::new(Barrier::new(200 + HOSTILE_PORTS));
        let spawn = |reqs: Vec<(String, bool)>| {
            let barrier = barrier.clone();
            let sock = agent.socket.clone();
            std::thread::spawn(move || {
                let s = UnixStream::connect(&sock).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                barrier.wait();
                reqs.into_iter()
                    .map(|(q, head)| {
                        w.write_all(q.as_bytes()).unwrap();
                        read_response(&mut r, head).unwrap()
                    })
                    .collect::<Vec<_>>()
            })
        };
        let innocent: Vec<_> = (0..200)
            .map(|i| (i, spawn(vec![(by_router(&vm_ip(i)), false); 3])))
            .collect();
        let hostile: Vec<_> = (0..HOSTILE_PORTS)
            .map(|k| {
                let get = by_router(&hostile_ip(k));
                let head = get.replacen("GET ", "HEAD ", 1);
                (
                    k,
                    spawn(vec![(get.clone(), false), (head, true), (get, false)]),
                )
            })
            .collect();
        let mut wrong = Vec::new();
        for (i, t) in innocent {
            for resp in t.join().unwrap() {
                let want = format!("instance={}", vm_uuid(i));
                if resp.status != 200 || resp.text() != want {
                    wrong.push(format!("vm {i}: {} {:?}", resp.status, resp.text()));
                }
            }
        }
        for (k, t) in hostile {
            for resp in t.join().unwrap() {
                if resp.status != 404 {
                    wrong.push(format!(
                        "hostile port {k}: {} {:?}",
                        resp.status,
                        resp.text()
                    ));
                }
            }
        }
        assert!(
            wrong.is_empty(),
            "{extra:?}: {} wrong: {wrong:#?}",
            wrong.len()
        );
        // Refused ports are not cached as hits: asked again, still 404.
        for k in 0..HOSTILE_PORTS {
            assert_eq!(one(&agent.socket, &by_router(&hostile_ip(k))).status, 404);
        }
        let st = agent.handle().stats();
        assert_eq!(
            st.forwarded, 600,
            "{extra:?}: only the innocent were forwarded"
        );
    }
}

/// Send `first` (a HEAD) and a GET for VM 0 pipelined in one write; the
/// HEAD's answer must be exactly a head and the GET's answer intact.
fn head_then_get(sock: &Path, first: &str, want_status: u16) {
    let s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let head = first.replacen("GET ", "HEAD ", 1);
    assert!(head.starts_with("HEAD "));
    w.write_all(format!("{head}{}", by_router(&vm_ip(0))).as_bytes())
        .unwrap();
    let h = read_response(&mut r, true).unwrap();
    assert_eq!(h.status, want_status, "HEAD answer: {:?}", h.headers);
    assert!(
        h.header("content-length").is_some_and(|l| l != "0"),
        "{want_status}: a HEAD gets the GET's Content-Length: {:?}",
        h.headers
    );
    let g = read_response(&mut r, false).unwrap();
    assert_eq!(
        g.status,
        200,
        "GET after a HEAD {want_status}: {}",
        g.text()
    );
    assert_eq!(g.text(), format!("instance={}", vm_uuid(0)));
}

#[test]
fn head_then_get_pipelined_after_every_error_page() {
    let neutron = FakeNeutron::start(false);
    let agent = Agent::start_full(
        &neutron,
        "http",
        "auth_strategy = \"noauth\"",
        "prefetch_network = false",
        "timeout = \"1s\"",
    );
    // Warm VM 0 so that it is served while Neutron is down below.
    assert_eq!(one(&agent.socket, &by_router(&vm_ip(0))).status, 200);
    // 404: nothing on this address.
    head_then_get(&agent.socket, &by_router("10.0.99.99"), 404);
    // 400: no router or network id.
    head_then_get(
        &agent.socket,
        &request("10.0.0.10", "X-Neutron-Router-ID: <bad>\r\n"),
        400,
    );
    // 502: the API sends garbage; 504: the API never answers.
    head_then_get(&agent.socket, &by_router(&vm_ip(API_BROKEN_VM)), 502);
    head_then_get(&agent.socket, &by_router(&vm_ip(API_SILENT_VM)), 504);
    // 503: Neutron is down for an address not cached.
    neutron.set_mode(Mode::Down);
    head_then_get(&agent.socket, &by_router(&vm_ip(77)), 503);
}
