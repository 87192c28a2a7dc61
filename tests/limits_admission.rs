//! At a connection cap a listener stops accepting until one of its
//! connections closes; it never answers 503 and never drops a connection
//! (issue 11, item 1). The same rule for the proxy's namespace listeners,
//! the agent's socket, the API's listener and the process-wide fd budget.
//!
//! Each test starts the daemon (a child process, stderr collected) with a
//! small cap and more clients than the cap. Every client connects and
//! sends its request at once; the excess waits in the listen backlog. The
//! test holds every answered connection open and closes one only when the
//! cap is full, so each close must admit exactly one more client: a server
//! serving more than the cap at once is caught, and so is one that stays
//! paused. Every client must get the daemon's normal answer, and the pause
//! is logged once for the whole episode (not once per close).

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::limits::*;
use common::{held_port, AgentMode, FakeAgent};

/// The small cap of the per-listener tests.
const CAP: usize = 8;
/// Clients against it.
const CLIENTS: usize = 50;
/// How long any one expected event may take.
const DEADLINE: Duration = Duration::from_secs(20);
/// The demo inventory's router.
const DEMO_ROUTER: &str = "d0d0d0d0-0000-4000-8000-00000000c001";

trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

/// Run `clients` clients through a daemon capped at `cap` (see the module
/// doc); returns every client's status.
fn through_the_cap(
    cap: usize,
    clients: usize,
    connect: impl Fn(usize) -> Box<dyn Conn> + Send + Sync + 'static,
    request: &'static [u8],
) -> Vec<u16> {
    let connect = std::sync::Arc::new(connect);
    let (answers, answered) = mpsc::channel::<(usize, u16)>();
    let mut closers = Vec::with_capacity(clients);
    let mut threads = Vec::with_capacity(clients);
    for i in 0..clients {
        let (close, closed) = mpsc::channel::<()>();
        closers.push(Some(close));
        let (answers, connect) = (answers.clone(), connect.clone());
        threads.push(std::thread::spawn(move || {
            let mut c = connect(i);
            let status = match c.write_all(request) {
                Ok(()) => read_status(&mut *c).unwrap_or(0),
                Err(_) => 0,
            };
            let _ = answers.send((i, status));
            // Hold the connection open until told to close it.
            let _ = closed.recv();
        }));
    }
    drop(answers);
    let mut statuses = vec![None; clients];
    let mut held: Vec<usize> = Vec::new();
    for n in 0..clients {
        let (i, status) = answered.recv_timeout(DEADLINE).unwrap_or_else(|_| {
            panic!(
                "only {n} of {clients} clients answered ({} held open)",
                held.len()
            )
        });
        assert!(
            held.len() < cap,
            "client {i} answered while {} answered connections were open: more than the cap {cap}",
            held.len()
        );
        statuses[i] = Some(status);
        held.push(i);
        // Full: close the oldest, which must admit exactly one more.
        if held.len() == cap && n + 1 < clients {
            let c = held.remove(0);
            closers[c].take();
        }
    }
    closers.clear();
    for t in threads {
        t.join().unwrap();
    }
    statuses.into_iter().map(|s| s.unwrap()).collect()
}

/// Poll until `d` has logged a line containing `needle` (deadline).
fn wait_line(d: &Daemon, needle: &str) {
    let t0 = Instant::now();
    while d.count_lines(needle) == 0 {
        assert!(
            t0.elapsed() < DEADLINE,
            "no {needle:?} line: {:?}",
            d.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The episode was logged once, and its end too.
fn assert_one_episode(d: &Daemon, label: &str, what: &str, cap: usize) {
    let start = format!("{label}: at {what} = {cap}");
    wait_line(d, "accepting freely again");
    let lines = d.count_lines(&start);
    if lines != 1 {
        eprintln!("{:#?}", d.log.lock().unwrap());
    }
    assert_eq!(lines, 1, "one pause line for the episode, got {lines}");
    assert_eq!(d.count_lines("accepting freely again"), 1);
    assert_eq!(d.count_lines("accept failed"), 0);
}

fn all_answered(statuses: &[u16], want: u16) {
    let wrong: Vec<(usize, u16)> = statuses
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, s)| *s != want)
        .collect();
    assert!(
        wrong.is_empty(),
        "every client must get {want}: {} did not ({:?})",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
}

const PROXY_GET: &[u8] = b"GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n";

#[test]
fn proxy_at_max_connections_pauses_accept_and_serves_everyone() {
    raise_nofile(4096);
    let agent = FakeAgent::start(AgentMode::KeepAlive);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_proxy_config(
        dir.path(),
        &agent.path,
        0,
        &format!("workers = 2\nmax_connections = {CAP}"),
        "",
    );
    let proxy = Daemon::start(4096, &["proxy"], &cfg, "proxy starting");
    let addr = proxy.listen_addr();
    wait_serving(addr);
    let statuses = through_the_cap(
        CAP,
        CLIENTS,
        move |i| Box::new(connect_from(source(71, i), addr).unwrap()),
        PROXY_GET,
    );
    all_answered(&statuses, 200);
    // Not in a network namespace: the namespace is named "host".
    assert_one_episode(&proxy, "ns host", "max_connections", CAP);
}

/// The demo inventory, and an `[api]` that identifies by TCP peer (so
/// 127.0.0.1 is instance "demo" without a signing agent in front).
fn write_api_config(dir: &Path, port: u16, extra: &str) -> std::path::PathBuf {
    let cfg = dir.join("api.toml");
    let inv = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/inventory.toml");
    std::fs::write(
        &cfg,
        format!(
            "[api]\nlisten = \"127.0.0.1:{port}\"\ninventory = \"{}\"\nstate_dir = \"{}\"\n\
             service_metadata_proxy = false\nworkers = 2\n{extra}\n",
            inv.display(),
            dir.join("state").display()
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn api_at_max_connections_pauses_accept_and_serves_everyone() {
    raise_nofile(4096);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_api_config(dir.path(), 0, &format!("max_connections = {CAP}"));
    let api = Daemon::start(4096, &["api"], &cfg, "api starting");
    let addr = api.listen_addr();
    let statuses = through_the_cap(
        CAP,
        CLIENTS,
        move |_| Box::new(connect_from(IpAddr::V4(Ipv4Addr::LOCALHOST), addr).unwrap()),
        b"GET /openstack/latest/meta_data.json HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    all_answered(&statuses, 200);
    assert_one_episode(&api, "api", "max_connections", CAP);
}

/// An `[agent]` on the demo inventory; no API behind it (the test's
/// requests are for an address that is no instance: 404 from the agent).
/// The API port is one the caller holds ([`common::held_port`]).
fn write_agent_config(
    dir: &Path,
    extra: &str,
    api_port: u16,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let cfg = dir.join("agent.toml");
    let sock = dir.join("agent.sock");
    let inv = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/inventory.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nsocket = \"{}\"\ninventory = \"{}\"\nmetadata_proxy_shared_secret = \"s\"\n\
             workers = 2\n{extra}\n[agent.nova]\nnova_metadata_port = {}\n",
            sock.display(),
            inv.display(),
            api_port
        ),
    )
    .unwrap();
    (cfg, sock)
}

const AGENT_UNKNOWN_VM: &[u8] = b"GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\n\
X-Forwarded-For: 10.99.0.1\r\nX-Neutron-Router-ID: d0d0d0d0-0000-4000-8000-00000000c001\r\n\r\n";

#[test]
fn agent_at_max_connections_pauses_accept_and_serves_everyone() {
    assert!(std::str::from_utf8(AGENT_UNKNOWN_VM)
        .unwrap()
        .contains(DEMO_ROUTER));
    raise_nofile(4096);
    let dir = tempfile::tempdir().unwrap();
    let (_api, api_port) = held_port();
    let (cfg, sock) = write_agent_config(dir.path(), &format!("max_connections = {CAP}"), api_port);
    let agent = Daemon::start(4096, &["agent"], &cfg, "agent starting");
    let t0 = Instant::now();
    while UnixStream::connect(&sock).is_err() {
        assert!(t0.elapsed() < DEADLINE, "no agent socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let statuses = through_the_cap(
        CAP,
        CLIENTS,
        move |_| Box::new(UnixStream::connect(&sock).unwrap()),
        AGENT_UNKNOWN_VM,
    );
    all_answered(&statuses, 404);
    assert_one_episode(&agent, "agent", "max_connections", CAP);
}

/// The process-wide cap: under `RLIMIT_NOFILE` 256 the budget is 192
/// connections ([`metaproxy::serve::admit::budget_for`]), 180 of them for
/// guests ([`metaproxy::serve::admit::guest_share`]); 300 clients get
/// the proxy to pause at the budget instead of failing accept(2) with
/// EMFILE, and every one is served.
#[test]
fn proxy_at_the_fd_budget_pauses_accept_instead_of_emfile() {
    const NOFILE: u64 = 256;
    let budget = metaproxy::serve::admit::budget_for(NOFILE);
    raise_nofile(4096);
    let agent = FakeAgent::start(AgentMode::KeepAlive);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_proxy_config(dir.path(), &agent.path, 0, "workers = 2", "");
    let proxy = Daemon::start(NOFILE, &["proxy"], &cfg, "proxy starting");
    assert_eq!(
        proxy.count_lines(&format!("fd budget: {budget} client connections")),
        1
    );
    let addr = proxy.listen_addr();
    wait_serving(addr);
    // The proxy's share of it: the rest is kept for the internal hops.
    let statuses = through_the_cap(
        metaproxy::serve::admit::guest_share(budget),
        300,
        move |i| Box::new(connect_from(source(72, i), addr).unwrap()),
        PROXY_GET,
    );
    all_answered(&statuses, 200);
    assert_one_episode(&proxy, "process", "fd budget", budget);
}

/// A backlog above `net.core.somaxconn` is silently capped by listen(2); a
/// storm then overflows the accept queue long before any cap pauses
/// accepting. The daemon says so at start.
#[test]
fn a_backlog_above_somaxconn_is_reported() {
    let somaxconn: i64 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_api_config(dir.path(), 0, &format!("backlog = {}", somaxconn + 1));
    let api = Daemon::start(4096, &["api"], &cfg, "api starting");
    assert_eq!(
        api.count_lines(&format!("capped at net.core.somaxconn = {somaxconn}")),
        1,
        "{:?}",
        api.log.lock().unwrap()
    );
}
