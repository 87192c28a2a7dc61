//! Helpers for the resource-limit tests (`tests/limits_*.rs`): the proxy
//! binary in a child process under its own `RLIMIT_NOFILE` (set with
//! util-linux's `prlimit`, so no `unsafe` `pre_exec`), its RSS, fd count and
//! CPU time from /proc, and client sockets bound to distinct loopback
//! sources so ephemeral ports are never the limit.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use socket2::{Domain, Protocol, Socket, Type};

/// The router id every limits test serves.
pub use super::ROUTER;

/// Raise this process's `RLIMIT_NOFILE` to at least `want` if it can (root
/// may raise the hard limit too), else soft to hard. Returns the soft limit
/// now in force, and says so loudly when it is below `want`.
pub fn raise_nofile(want: u64) -> u64 {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft >= want {
        return soft;
    }
    if setrlimit(Resource::RLIMIT_NOFILE, want, want.max(hard)).is_ok() {
        return want;
    }
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < want {
        eprintln!(
            "WARNING: RLIMIT_NOFILE is {soft} (hard {hard}), below the {want} this test wants: scaling down"
        );
    }
    soft
}

/// The `i`-th distinct loopback source in the `/16` `127.<net>.0.0`
/// (up to 65 000 per net), so tests do not share sources.
pub fn source(net: u8, i: usize) -> IpAddr {
    let i = u32::try_from(i).unwrap();
    IpAddr::V4(Ipv4Addr::new(
        127,
        net,
        u8::try_from(i / 250).unwrap(),
        u8::try_from(1 + i % 250).unwrap(),
    ))
}

/// A blocking TCP connection to `addr` from source address `src`.
pub fn connect_from(src: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.bind(&SocketAddr::new(src, 0).into())?;
    s.connect_timeout(&addr.into(), Duration::from_secs(10))?;
    s.set_tcp_nodelay(true)?;
    Ok(s.into())
}

/// Read one HTTP response with a Content-Length body (or until close)
/// and return its status.
pub fn read_status<S: Read + ?Sized>(s: &mut S) -> std::io::Result<u16> {
    let mut r = BufReader::new(s);
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0);
    let mut len = None;
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((n, v)) = h.split_once(':') {
            if n.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse::<usize>().ok();
            }
        }
    }
    match len {
        Some(n) => r.read_exact(&mut vec![0; n])?,
        None => {
            r.read_to_end(&mut Vec::new())?;
        }
    }
    Ok(status)
}

/// One GET on a new connection from `src`; the status.
pub fn get_from(src: IpAddr, addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let mut s = connect_from(src, addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n")?;
    read_status(&mut s)
}

/// Write a proxy config: one namespace on `127.0.0.1:port`, the agent at
/// `agent`, `[proxy]` extras and `[proxy.timeouts]` lines as given.
pub fn write_proxy_config(
    dir: &Path,
    agent: &Path,
    port: u16,
    proxy_extra: &str,
    timeouts: &str,
) -> std::path::PathBuf {
    let cfg = dir.join("proxy.toml");
    std::fs::write(
        &cfg,
        format!(
            "[proxy]\nagent_socket = \"{}\"\ncontrol_socket = \"{}\"\n{proxy_extra}\n[proxy.timeouts]\n{timeouts}\n[[proxy.namespace]]\nrouter_id = \"{ROUTER}\"\nlisten = \"127.0.0.1:{port}\"\n",
            agent.display(),
            dir.join("ctl.sock").display(),
        ),
    )
    .unwrap();
    cfg
}

/// `metaproxy <args>` in a child process under `prlimit --nofile=N:N`,
/// its stderr collected line by line; SIGTERM (then SIGKILL) on drop.
pub struct Daemon {
    pub child: Child,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    /// Start it and wait until a stderr line contains `ready`.
    pub fn start(nofile: u64, args: &[&str], cfg: &Path, ready: &str) -> Daemon {
        let mut child = Command::new("prlimit")
            .arg(format!("--nofile={nofile}:{nofile}"))
            .arg(env!("CARGO_BIN_EXE_metaproxy"))
            .args(args)
            .arg("--config")
            .arg(cfg)
            .stderr(Stdio::piped())
            .spawn()
            .expect("prlimit (util-linux) is needed");
        let err = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let l2 = log.clone();
        let ready = ready.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                let is_ready = line.contains(&ready);
                // Logged before the signal, so `listen_addr` finds the line.
                l2.lock().unwrap().push(line);
                if is_ready {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(20)).is_err() {
            let _ = child.kill();
            panic!("daemon did not start: {:?}", log.lock().unwrap());
        }
        Daemon { child, log }
    }

    /// The address the daemon's first TCP listener is bound to, from its
    /// `listener up:` log line; give it `127.0.0.1:0` in the config. Waits
    /// up to 10 s for the line.
    pub fn listen_addr(&self) -> SocketAddr {
        let t0 = Instant::now();
        loop {
            if let Some(a) = self
                .log
                .lock()
                .unwrap()
                .iter()
                .find_map(|l| super::bound_addr(l))
            {
                return a;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "no `listener up:` line: {:?}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The daemon's pid (prlimit execs it, so the child's pid is the daemon's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lines logged so far containing `needle`.
    pub fn count_lines(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Retry a GET until it answers 200 (the proxy and its agent are up).
pub fn wait_serving(addr: SocketAddr) {
    let t0 = Instant::now();
    loop {
        if let Ok(200) = get_from(IpAddr::V4(Ipv4Addr::LOCALHOST), addr, "/ready") {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "proxy never served");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn status_field(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Resident set size of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_field(pid, "VmRSS:")
}

/// Open file descriptors of `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// utime + stime of `pid`, from /proc/PID/stat.
pub fn cpu_time(pid: u32) -> Duration {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f[11] + f[12];
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}

/// The 1-minute load average, for the record.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
