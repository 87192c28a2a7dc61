//! The real binary's daemons (`metaproxy api`, `agent`, `proxy`) as child
//! processes that a test can SIGKILL and restart, plus a raw HTTP client that
//! binds a VM's source address. Readiness is "accepts a connection" rather
//! than a log line: after a restart that is exactly what a client waits for.
#![allow(dead_code)]

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long a (re)started daemon may take to accept.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Shared secret written into every config.
pub const SECRET: &str = "faults-secret";

/// What "ready" means for a daemon.
#[derive(Clone, Debug)]
pub enum Ready {
    /// A TCP connect succeeds.
    Tcp(SocketAddr),
    /// A Unix-socket connect succeeds.
    Unix(PathBuf),
}

impl Ready {
    /// Connected *and answered*: after a SIGKILL the dead process's listener
    /// lingers for a few milliseconds (its io_uring is torn down
    /// asynchronously) and still completes connects, so a bare connect
    /// would report a corpse as ready.
    fn probe(&self) -> bool {
        const PROBE: &[u8] = b"GET / HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n";
        let t = Some(Duration::from_millis(50));
        let answered = |s: &mut dyn ReadWrite| -> bool {
            let mut head = [0u8; 5];
            s.write_all(PROBE).is_ok() && s.read_exact(&mut head).is_ok() && &head == b"HTTP/"
        };
        match self {
            Ready::Tcp(a) => match TcpStream::connect_timeout(a, Duration::from_millis(100)) {
                Ok(mut s) => s.set_read_timeout(t).is_ok() && answered(&mut s),
                Err(_) => false,
            },
            Ready::Unix(p) => match UnixStream::connect(p) {
                Ok(mut s) => s.set_read_timeout(t).is_ok() && answered(&mut s),
                Err(_) => false,
            },
        }
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// One daemon of the real binary; killed (SIGKILL) on drop.
pub struct Daemon {
    kind: &'static str,
    config: PathBuf,
    log: PathBuf,
    ready: Ready,
    child: Option<Child>,
    /// The log, held open so that drop can still read it after the test's
    /// temp dir (often dropped first) is gone.
    log_held: Option<std::fs::File>,
}

impl Daemon {
    /// `metaproxy <kind> --config <config>`, stderr appended to `<config dir>/<kind>.log`.
    pub fn start(kind: &'static str, config: &Path, ready: Ready) -> Daemon {
        let log = config.with_file_name(format!("{kind}.log"));
        let mut d = Daemon {
            kind,
            config: config.to_path_buf(),
            log,
            ready,
            child: None,
            log_held: None,
        };
        d.spawn();
        d
    }

    /// Spawn without waiting for readiness.
    pub fn spawn_only(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.kind);
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        if self.log_held.is_none() {
            self.log_held = Some(std::fs::File::open(&self.log).unwrap());
        }
        let child = Command::new(env!("CARGO_BIN_EXE_metaproxy"))
            .args([self.kind, "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// Spawn and wait until it accepts; returns when it did.
    pub fn spawn(&mut self) -> Instant {
        self.spawn_only();
        self.wait_ready()
    }

    /// Wait until the daemon accepts; panics (with its log) if it exits or takes too long.
    pub fn wait_ready(&mut self) -> Instant {
        let t0 = Instant::now();
        loop {
            if self.ready.probe() {
                return Instant::now();
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "{} exited ({st}) before serving:\n{}",
                    self.kind,
                    self.log_text()
                );
            }
            assert!(
                t0.elapsed() < START_TIMEOUT,
                "{} did not start:\n{}",
                self.kind,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = c.wait();
        }
    }

    /// Send a signal (e.g. SIGHUP) to the running daemon.
    pub fn signal(&self, sig: Signal) {
        let c = self.child.as_ref().expect("running");
        kill(Pid::from_raw(c.id() as i32), sig).unwrap();
    }

    /// Everything the daemon wrote to stderr, across restarts.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Fails the test if the daemon's log ever said `panicked` (a panic in a
/// connection task is caught by the runtime and would otherwise go unnoticed).
impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        let mut log = String::new();
        if let Some(f) = &mut self.log_held {
            use std::io::{Read, Seek};
            let _ = f.rewind();
            let _ = f.read_to_string(&mut log);
        }
        if !std::thread::panicking() && log.contains("panicked") {
            panic!("`metaproxy {}` panicked:\n{log}", self.kind);
        }
    }
}

use super::free_port;

/// Where the three daemons of one chain listen.
#[derive(Clone, Debug)]
pub struct Chain {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub api: SocketAddr,
    pub agent_socket: PathBuf,
    pub proxy: SocketAddr,
    pub inventory: PathBuf,
}

/// Write one config file with `[api]`, `[agent]` and `[proxy]` sections for a
/// chain serving `router` from `inventory`, with short timeouts. `extra_proxy`
/// is appended inside `[proxy]` (before its subtables).
pub fn chain_config(dir: &Path, inventory: &Path, router: &str, extra_proxy: &str) -> Chain {
    let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let agent_socket = dir.join("agent.sock");
    let config = dir.join("chain.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[api]
listen = "{api}"
metadata_proxy_shared_secret = "{SECRET}"
inventory = "{inv}"
state_dir = "{state}"

[agent]
socket = "{sock}"
inventory = "{inv}"
metadata_proxy_shared_secret = "{SECRET}"
[agent.nova]
nova_metadata_port = {api_port}
timeout = "2s"

[proxy]
workers = 1
agent_socket = "{sock}"
control_socket = "{ctl}"
{extra_proxy}
[proxy.timeouts]
http_request = "2s"
connect = "500ms"
client = "2s"
server = "3s"
keep_alive = "2s"

[[proxy.namespace]]
router_id = "{router}"
listen = "{proxy}"
"#,
            inv = inventory.display(),
            state = dir.join("state").display(),
            sock = agent_socket.display(),
            api_port = api.port(),
            ctl = dir.join("ctl.sock").display(),
        ),
    )
    .unwrap();
    Chain {
        dir: dir.to_path_buf(),
        config,
        api,
        agent_socket,
        proxy,
        inventory: inventory.to_path_buf(),
    }
}

/// A one-shot HTTP exchange from source address `from` (port 0), `Connection: close`.
pub fn request_from(
    from: std::net::IpAddr,
    to: SocketAddr,
    method: &str,
    path: &str,
    extra_headers: &str,
    body: &[u8],
    timeout: Duration,
) -> std::io::Result<super::Resp> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.bind(&SocketAddr::new(from, 0).into())?;
    sock.connect_timeout(&to.into(), timeout)?;
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{extra_headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    s.write_all(&req)?;
    super::read_response(&mut BufReader::new(s), method == "HEAD")
}

/// One probe request: when it started and ended, and its status (0 = no response).
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub start: Instant,
    pub end: Instant,
    pub status: u16,
}

/// A VM that asks for its `meta_data.json` every few milliseconds, checks
/// every 200 is its own, and records each outcome.
pub struct Probe {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(Vec<Sample>, u64)>>,
}

impl Probe {
    pub fn start(from: std::net::IpAddr, uuid: &str, to: SocketAddr) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let uuid = uuid.to_string();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            let mut wrong_vm = 0;
            while !flag.load(Ordering::Relaxed) {
                let start = Instant::now();
                let r = request_from(
                    from,
                    to,
                    "GET",
                    "/openstack/latest/meta_data.json",
                    "",
                    b"",
                    Duration::from_secs(5),
                );
                let status = match r {
                    Ok(r) => {
                        if r.status == 200 && !r.text().contains(&uuid) {
                            wrong_vm += 1;
                        }
                        r.status
                    }
                    Err(_) => 0,
                };
                samples.push(Sample {
                    start,
                    end: Instant::now(),
                    status,
                });
                std::thread::sleep(Duration::from_millis(5));
            }
            (samples, wrong_vm)
        });
        Probe {
            stop,
            thread: Some(thread),
        }
    }

    /// Stop; the samples and the number of 200s that carried another VM's data.
    pub fn finish(mut self) -> (Vec<Sample>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Statuses of samples wholly inside `[from, to]`.
pub fn statuses_between(samples: &[Sample], from: Instant, to: Instant) -> Vec<u16> {
    samples
        .iter()
        .filter(|s| s.start >= from && s.end <= to)
        .map(|s| s.status)
        .collect()
}

/// Time from `back` (the daemon accepts again) to the end of the first 200
/// that started after it (zero if one ended before `back` was noticed).
pub fn recovery(samples: &[Sample], back: Instant) -> Option<Duration> {
    samples
        .iter()
        .find(|s| s.status == 200 && s.end >= back && s.start >= back - Duration::from_millis(50))
        .map(|s| s.end.saturating_duration_since(back))
}

/// Switch the agent of `chain` from its inventory to `backend = "neutron"`
/// at `url` (noauth, `timeout`), with no prefetch, so every VM is its own
/// lookup and a fault hits exactly the VMs asked while it lasts.
pub fn use_neutron_backend(chain: &Chain, url: &str, timeout: Duration) {
    let cfg = std::fs::read_to_string(&chain.config).unwrap();
    let agent_inv = format!(
        "socket = \"{}\"\ninventory = \"{}\"\n",
        chain.agent_socket.display(),
        chain.inventory.display()
    );
    assert!(cfg.contains(&agent_inv), "chain_config changed shape");
    let cfg = cfg
        .replacen(
            &agent_inv,
            &format!(
                "socket = \"{}\"\nbackend = \"neutron\"\nprefetch_network = false\ncache_ttl = \"300s\"\n",
                chain.agent_socket.display()
            ),
            1,
        )
        .replacen(
            "[agent.nova]",
            &format!(
                "[agent.neutron]\nurl = \"{url}\"\nauth_strategy = \"noauth\"\ntimeout = \"{}ms\"\n[agent.nova]",
                timeout.as_millis()
            ),
            1,
        );
    std::fs::write(&chain.config, cfg).unwrap();
}

/// The three daemons of one [`Chain`], started in order (api, agent, proxy),
/// each once it serves; all killed on drop.
pub struct Daemons {
    pub api: Daemon,
    pub agent: Daemon,
    pub proxy: Daemon,
}

impl Daemons {
    pub fn start(chain: &Chain) -> Daemons {
        let api = Daemon::start("api", &chain.config, Ready::Tcp(chain.api));
        let agent = Daemon::start(
            "agent",
            &chain.config,
            Ready::Unix(chain.agent_socket.clone()),
        );
        let proxy = Daemon::start("proxy", &chain.config, Ready::Tcp(chain.proxy));
        Daemons { api, agent, proxy }
    }
}

/// `vm` asks `to` for its `meta_data.json` (from its own address): the
/// status and how long it took. Panics if a 200 carries another VM's data.
pub fn ask_metadata(to: SocketAddr, vm: &metaproxy::storm::VmSpec) -> (u16, Duration) {
    let t0 = Instant::now();
    let r = request_from(
        vm.ip,
        to,
        "GET",
        "/openstack/latest/meta_data.json",
        "",
        b"",
        Duration::from_secs(10),
    )
    .unwrap();
    if r.status == 200 {
        let md: serde_json::Value = serde_json::from_slice(&r.body)
            .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {}", vm.ip, r.text()));
        assert_eq!(
            md["uuid"],
            vm.uuid.as_str(),
            "{} got another VM's data",
            vm.ip
        );
    }
    (r.status, t0.elapsed())
}

/// Every VM of `vms` asks at once, one thread each; results in `vms` order.
pub fn burst(to: SocketAddr, vms: &[metaproxy::storm::VmSpec]) -> Vec<(u16, Duration)> {
    let hs: Vec<_> = vms
        .iter()
        .cloned()
        .map(|vm| std::thread::spawn(move || ask_metadata(to, &vm)))
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}
