//! `metaproxy up` (api + agent + proxy in one process) from the real binary,
//! on free loopback ports with a temp agent socket and state dir.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// The example inventory's router (`examples/inventory.toml`).
pub const EXAMPLE_ROUTER: &str = "d0d0d0d0-0000-4000-8000-00000000c001";

/// A running `metaproxy up`; SIGTERM and reaped on drop, which then fails
/// the test if any of its lines said `panicked` (a panic in a connection
/// task is caught by the runtime and would otherwise go unnoticed).
pub struct Up {
    child: Child,
    /// Start-up lines (up to "serving"), then every line after.
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// How many of `lines` were logged while starting.
    start_lines: usize,
    stderr: Option<std::thread::JoinHandle<()>>,
}

impl Up {
    /// The process id (for `/proc/<pid>/fd`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What `up` logged while starting (through its "serving" line).
    pub fn start_log(&self) -> String {
        self.lines.lock().unwrap()[..self.start_lines].concat()
    }

    /// Every line `up` logged so far, one per line.
    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Send it `SIGHUP` (reload).
    pub fn sighup(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap();
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        if let Some(t) = self.stderr.take() {
            let _ = t.join();
        }
        let panics: Vec<String> = self
            .lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("panicked"))
            .cloned()
            .collect();
        if !std::thread::panicking() {
            assert!(panics.is_empty(), "`up` panicked:\n{}", panics.join("\n"));
        }
    }
}

/// The shared secret `start_up` writes into both `[api]` and `[agent]`.
pub const UP_SECRET: &str = "up-secret";

/// Start `up` serving `inventory`, its proxy stamping `router`; returns once
/// it logged that all three serve, with the proxy's address.
pub fn start_up(dir: &Path, inventory: &Path, router: &str) -> (Up, SocketAddr) {
    start_up_with(dir, inventory, router, UP_SECRET, "")
}

/// [`start_up`] with this shared secret and `proxy_extra` appended to
/// `[proxy]` (it may open subtables, e.g. `[proxy.timeouts]`).
pub fn start_up_with(
    dir: &Path,
    inventory: &Path,
    router: &str,
    secret: &str,
    proxy_extra: &str,
) -> (Up, SocketAddr) {
    start_up_logged(dir, inventory, router, secret, proxy_extra, false)
}

/// [`start_up_with`], with `access_log` set in all three sections.
pub fn start_up_logged(
    dir: &Path,
    inventory: &Path,
    router: &str,
    secret: &str,
    proxy_extra: &str,
    access_log: bool,
) -> (Up, SocketAddr) {
    start_up_full(dir, inventory, router, secret, "", proxy_extra, access_log).0
}

/// [`start_up_logged`] with `api_extra` appended to `[api]`; also returns
/// the API's port (its `api.listen`, which the agent names).
pub fn start_up_full(
    dir: &Path,
    inventory: &Path,
    router: &str,
    secret: &str,
    api_extra: &str,
    proxy_extra: &str,
    access_log: bool,
) -> ((Up, SocketAddr), u16) {
    // The proxy listens on port 0 and its address is read back from the
    // log; the API's port must be named to the agent in the same file.
    let api_port = free_port();
    let sock = dir.join("agent.sock");
    let cfg = dir.join("up.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[api]
access_log = {access_log}
listen = "127.0.0.1:{api_port}"
metadata_proxy_shared_secret = "{secret}"
inventory = "{inv}"
state_dir = "{state}"
{api_extra}

[agent]
access_log = {access_log}
socket = "{sock}"
inventory = "{inv}"
metadata_proxy_shared_secret = "{secret}"
[agent.nova]
nova_metadata_port = {api_port}

[proxy]
access_log = {access_log}
agent_socket = "{sock}"
control_socket = "{ctl}"
{proxy_extra}
[[proxy.namespace]]
router_id = "{router}"
listen = "127.0.0.1:0"
"#,
            inv = inventory.display(),
            state = dir.join("state").display(),
            sock = sock.display(),
            ctl = dir.join("ctl.sock").display(),
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_metaproxy"))
        .args(["up", "--config"])
        .arg(&cfg)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut up = Up {
        child,
        lines: Default::default(),
        start_lines: 0,
        stderr: None,
    };
    let t0 = Instant::now();
    loop {
        let mut line = String::new();
        assert!(err.read_line(&mut line).unwrap() > 0, "up exited early");
        let serving = line.contains("up: api, agent and proxy are serving");
        up.lines.lock().unwrap().push(line);
        if serving {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "up did not start");
    }
    up.start_lines = up.lines.lock().unwrap().len();
    let lines = up.lines.clone();
    up.stderr = Some(std::thread::spawn(move || {
        for l in err.lines().map_while(Result::ok) {
            lines.lock().unwrap().push(l);
        }
    }));
    let proxy = up
        .lines
        .lock()
        .unwrap()
        .iter()
        .filter(|l| !l.contains("api listener up:"))
        .find_map(|l| super::bound_addr(l))
        .expect("the proxy's `listener up:` line");
    ((up, proxy), api_port)
}

/// `start_up` over `examples/inventory.toml`.
pub fn start_example(dir: &Path) -> (Up, SocketAddr) {
    let inv = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/inventory.toml");
    start_up(dir, &inv, EXAMPLE_ROUTER)
}
