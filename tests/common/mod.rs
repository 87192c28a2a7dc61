//! Shared test helpers: a recording fake agent on a tempdir Unix socket, a
//! raw HTTP client, and proxy start-up with short timeouts.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How the fake agent behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentMode {
    /// Keep-alive, answers every request (pipelined ones in order).
    KeepAlive,
    /// `Connection: close` after each response, like neutron-metadata-agent.
    CloseEach,
    /// Reads requests, never answers.
    Silent,
    /// Answers with a chunked body.
    Chunked,
    /// Keep-alive, but waits this many milliseconds before each answer.
    Delay(u64),
    /// Keep-alive; waits this many milliseconds before answering a target
    /// that starts with `/slow` (a cache miss on a slow Neutron), and answers
    /// everything else at once. One connection answers in order, so whatever
    /// is pipelined behind a slow request waits for it, as with the agent.
    SlowPaths(u64),
    /// Reads one request, records it, and closes without answering.
    CloseAfterRead,
    /// The first connection is `CloseAfterRead`, later ones `KeepAlive`.
    FirstCloses,
}

/// One request as the agent saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Seen {
    pub fn all(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .collect()
    }
}

/// A fake metadata agent that records what it receives and echoes identity.
pub struct FakeAgent {
    pub path: PathBuf,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub connections: Arc<AtomicUsize>,
    /// Connections accepted and not yet closed (by either side).
    pub open: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    _dir: Option<tempfile::TempDir>,
}

impl FakeAgent {
    pub fn start(mode: AgentMode) -> FakeAgent {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let mut a = FakeAgent::start_at(&path, mode);
        a._dir = Some(dir);
        a
    }

    pub fn start_at(path: &Path, mode: AgentMode) -> FakeAgent {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, c2, st2, o2) = (
            seen.clone(),
            connections.clone(),
            stop.clone(),
            open.clone(),
        );
        std::thread::spawn(move || {
            while !st2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let first = c2.fetch_add(1, Ordering::Relaxed) == 0;
                        let mode = match mode {
                            AgentMode::FirstCloses if first => AgentMode::CloseAfterRead,
                            AgentMode::FirstCloses => AgentMode::KeepAlive,
                            m => m,
                        };
                        let (s3, st3, o3) = (s2.clone(), st2.clone(), o2.clone());
                        o3.fetch_add(1, Ordering::SeqCst);
                        std::thread::spawn(move || {
                            serve_agent_conn(conn, mode, s3, st3);
                            o3.fetch_sub(1, Ordering::SeqCst);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        FakeAgent {
            path: path.to_path_buf(),
            seen,
            connections,
            open,
            stop,
            _dir: None,
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Stop accepting and remove the socket (existing connections die at next request).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve_agent_conn(
    conn: UnixStream,
    mode: AgentMode,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
) {
    conn.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                continue;
            }
            Err(_) => return,
        }
        if line.trim().is_empty() {
            continue;
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
            .map(|(_, v)| v.parse().unwrap())
            .unwrap_or(0);
        let chunked = headers.iter().any(|(n, v)| {
            n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
        });
        let mut body = vec![0u8; cl];
        r.read_exact(&mut body).unwrap();
        if chunked {
            body = read_chunked(&mut r);
        }
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let xff = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("x-forwarded-for"))
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let is_head = method == "HEAD";
        let seen_req = Seen {
            method,
            target: target.clone(),
            headers,
            body: body.clone(),
        };
        seen.lock().unwrap().push(seen_req);
        let payload = format!("{target} for {xff} body={}", body.len());
        let resp = match mode {
            AgentMode::Silent => continue,
            AgentMode::CloseAfterRead => {
                let _ = w.shutdown(std::net::Shutdown::Both);
                return;
            }
            AgentMode::FirstCloses => unreachable!("resolved per connection"),
            AgentMode::KeepAlive
            | AgentMode::CloseEach
            | AgentMode::Delay(_)
            | AgentMode::SlowPaths(_) => {
                match mode {
                    AgentMode::Delay(ms) => std::thread::sleep(Duration::from_millis(ms)),
                    AgentMode::SlowPaths(ms) if target.starts_with("/slow") => {
                        std::thread::sleep(Duration::from_millis(ms))
                    }
                    _ => {}
                }
                let close = if mode == AgentMode::CloseEach {
                    "Connection: close\r\n"
                } else {
                    ""
                };
                let mut r = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Agent: fake\r\nContent-Length: {}\r\n{close}\r\n",
                    payload.len()
                )
                .into_bytes();
                if !is_head {
                    r.extend_from_slice(payload.as_bytes());
                }
                r
            }
            AgentMode::Chunked => {
                let mut r = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
                if !is_head {
                    let (a, b) = payload.as_bytes().split_at(payload.len() / 2);
                    r.extend_from_slice(format!("{:x}\r\n", a.len()).as_bytes());
                    r.extend_from_slice(a);
                    r.extend_from_slice(format!("\r\n{:x};ext=1\r\n", b.len()).as_bytes());
                    r.extend_from_slice(b);
                    r.extend_from_slice(b"\r\n0\r\n\r\n");
                }
                r
            }
        };
        if w.write_all(&resp).is_err() {
            return;
        }
        if mode == AgentMode::CloseEach {
            let _ = w.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
}

fn read_chunked(r: &mut impl BufRead) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let size = usize::from_str_radix(line.trim().split(';').next().unwrap(), 16).unwrap();
        if size == 0 {
            let mut end = String::new();
            r.read_line(&mut end).unwrap();
            return out;
        }
        let mut chunk = vec![0u8; size + 2];
        r.read_exact(&mut chunk).unwrap();
        out.extend_from_slice(&chunk[..size]);
    }
}

/// A parsed response from the proxy.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Read one response (Content-Length, chunked, or close-delimited) from `r`.
pub fn read_response(r: &mut impl BufRead, head_request: bool) -> std::io::Result<Resp> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before a response",
        ));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end_matches(['\r', '\n']);
        if h.is_empty() {
            break;
        }
        let (n, v) = h.split_once(':').unwrap();
        headers.push((n.to_string(), v.trim().to_string()));
    }
    let resp_hdr = |name: &str| {
        headers
            .iter()
            .find(|(n, _): &&(String, String)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let body = if head_request || status == 100 {
        Vec::new()
    } else if let Some(cl) = resp_hdr("content-length") {
        let mut b = vec![0u8; cl.parse().unwrap()];
        r.read_exact(&mut b)?;
        b
    } else if resp_hdr("transfer-encoding").is_some() {
        read_chunked(r)
    } else {
        let mut b = Vec::new();
        r.read_to_end(&mut b)?;
        b
    };
    Ok(Resp {
        status,
        headers,
        body,
    })
}

/// One request on a new connection.
pub fn get(addr: SocketAddr, raw: &str) -> std::io::Result<Resp> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(raw.as_bytes())?;
    let mut r = BufReader::new(s);
    read_response(&mut r, raw.starts_with("HEAD "))
}

/// A minimal proxy config on loopback with short timeouts.
pub fn proxy_config(agent: &Path, extra: &str) -> metaproxy::proxy::config::ProxyConfig {
    let text = format!(
        r#"
[proxy]
workers = 2
agent_socket = "{}"
{extra}
[proxy.timeouts]
http_request = "1s"
connect = "1s"
client = "2s"
server = "1s"
keep_alive = "2s"

[[proxy.namespace]]
router_id = "6e1f3b0c-9d6a-4f0e-8b7a-2c1d0e9f8a7b"
listen = "127.0.0.1:0"
"#,
        agent.display()
    );
    let f = metaproxy::proxy::config::parse_str(&text, Path::new("test.toml")).unwrap();
    metaproxy::proxy::config::ProxyConfig::try_from(f.proxy.as_ref().unwrap()).unwrap()
}

/// Poll `ready` every few milliseconds until it holds; panic naming `what`
/// if it does not within `limit`. Tests wait with this, not with sleeps.
pub fn wait_until(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !ready() {
        assert!(t0.elapsed() < limit, "not within {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The address in a daemon's `listener up:` log line (the proxy's
/// `listener up: <ns> <addr> -> ...`, the API's `api listener up: <addr>`):
/// what a daemon configured with port 0 actually bound. Reading it back is
/// how a test gets a port without racing: [`free_port`] closes its probe
/// socket before the child binds, so another process can take the port in
/// between.
pub fn bound_addr(line: &str) -> Option<SocketAddr> {
    let (_, rest) = line.split_once("listener up: ")?;
    rest.split_whitespace().find_map(|w| w.parse().ok())
}

/// A port this test holds for as long as it keeps the listener: nobody else
/// can bind it, and connections to it complete (the kernel's backlog) but are
/// never answered. For an upstream a config must name but the test never
/// reaches (an agent's metadata API behind requests that are all 404s): no
/// race, unlike [`free_port`].
pub fn held_port() -> (std::net::TcpListener, u16) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

/// A port nobody listens on right now. Racy (the port is free again before
/// the child binds it): only for a config that must name a port before its
/// daemon starts (another daemon's upstream, a restart on the same port) or
/// one that must stay dead; otherwise listen on port 0 and read
/// [`bound_addr`] back.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub const ROUTER: &str = "6e1f3b0c-9d6a-4f0e-8b7a-2c1d0e9f8a7b";
/// The inodes of the sockets process `pid` holds open (its fds' links
/// `socket:[inode]`), to match against the kernel's `/proc/<pid>/net/*`.
pub fn socket_inodes(pid: u32) -> std::collections::HashSet<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .map(str::to_string)
        })
        .collect()
}

/// The paths of the Unix sockets process `pid` listens on (its fds'
/// socket inodes matched against `/proc/<pid>/net/unix`, listening flag
/// set; `@…` for an abstract name, `-` for none).
pub fn unix_listeners(pid: u32) -> Vec<String> {
    let inodes = socket_inodes(pid);
    // Num RefCount Protocol Flags Type St Inode [Path]; Flags 00010000 = listening.
    const LISTENING: u32 = 0x0001_0000;
    std::fs::read_to_string(format!("/proc/{pid}/net/unix"))
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let flags = u32::from_str_radix(f.get(3)?, 16).ok()?;
            let inode = f.get(6)?;
            (flags & LISTENING != 0 && inodes.contains(*inode))
                .then(|| f.get(7).map_or("-".to_string(), |p| (*p).to_string()))
        })
        .collect()
}

pub mod attack;
pub mod daemons;
pub mod limits;
pub mod netns;
pub mod neutron;
pub mod nova_peers;
pub mod oracle;
pub mod ovn;
pub mod ovsdb;
pub mod up;
