//! Slowloris (issue 7, resource limits): 10 000 connections that each send
//! one byte of a never-finished head about every second do not stop normal
//! VMs from being served, and every one of them is closed at `http_request`.
//!
//! The proxy binary runs in a child process (its own fd limit via
//! `prlimit`); the slow clients come from distinct `127.63.x.y` sources,
//! the normal VMs from `127.64.x.y`. One thread drives all slow sockets
//! with `poll(2)` so their close times are measured to ~20 ms. If the fd
//! limit cannot be raised far enough the test scales down and says so.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::limits::*;
use common::{AgentMode, FakeAgent};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// Slow connections wanted.
const SLOW: usize = 10_000;
/// The proxy's `http_request` timeout in this test.
const HTTP_REQUEST: Duration = Duration::from_secs(2);
/// A slow connection must be closed within this much after `http_request`
/// (timer, scheduling on a loaded 2-core machine, our 20 ms poll).
const CLOSE_SLACK: Duration = Duration::from_millis(1500);
/// ... and not before `http_request` minus this (the proxy's accept instant
/// can precede the moment our `connect` returns).
const EARLY_SLACK: Duration = Duration::from_millis(100);
/// Every normal VM request gets its 200 within this.
const NORMAL_BOUND: Duration = Duration::from_secs(1);
/// Slow connections opened between two polls.
const OPEN_PER_ROUND: usize = 250;
/// The never-finished head, dripped one byte at a time (then `a` forever).
const HEAD: &[u8] = b"GET /slowloris HTTP/1.1\r\nHost: 169.254.169.254\r\nX-Slow: ";

struct Slow {
    s: TcpStream,
    opened: Instant,
    closed: Option<Instant>,
    sent: usize,
    got_408: bool,
}

impl Slow {
    fn drip(&mut self, now: Instant) {
        let b = HEAD.get(self.sent).copied().unwrap_or(b'a');
        match self.s.write(&[b]) {
            Ok(_) => self.sent += 1,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => self.close(now),
        }
    }
    fn readable(&mut self, now: Instant) {
        let mut buf = [0u8; 512];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return self.close(now),
                Ok(n) => self.got_408 |= buf[..n].starts_with(b"HTTP/1.1 408"),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => return self.close(now),
            }
        }
    }
    fn close(&mut self, now: Instant) {
        self.closed.get_or_insert(now);
    }
}

/// Normal VMs: one GET every 20 ms on a new connection, each from its own source.
fn normal_vms(addr: SocketAddr, stop: Arc<AtomicBool>) -> Vec<(Result<u16, String>, Duration)> {
    let mut out = Vec::new();
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let r = get_from(source(64, i % 60_000), addr, "/openstack").map_err(|e| e.to_string());
        out.push((r, t.elapsed()));
        i += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    out
}

#[test]
fn slowloris_is_closed_at_http_request_while_normal_vms_are_served() {
    let have = usize::try_from(raise_nofile(SLOW as u64 + 2048)).unwrap();
    let n = SLOW.min(have.saturating_sub(2048));
    if n < SLOW {
        eprintln!("WARNING: RLIMIT_NOFILE {have}: running {n} slowloris connections, not {SLOW}");
    }
    let agent = FakeAgent::start(AgentMode::KeepAlive);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_proxy_config(
        dir.path(),
        &agent.path,
        0,
        &format!("workers = 2\nmax_connections = {}", SLOW + 1000),
        &format!(
            "http_request = \"{}ms\"\nkeep_alive = \"10s\"\nclient = \"10s\"",
            HTTP_REQUEST.as_millis()
        ),
    );
    let mut proxy = Daemon::start(SLOW as u64 + 4096, &["proxy"], &cfg, "proxy starting");
    let addr = proxy.listen_addr();
    wait_serving(addr);
    eprintln!("load before: {}", loadavg());

    let stop = Arc::new(AtomicBool::new(false));
    let normal = {
        let stop = stop.clone();
        std::thread::spawn(move || normal_vms(addr, stop))
    };
    // The normal VMs' head start: they are already being served when the
    // slowloris begins (the behaviour under test, not a readiness wait).
    std::thread::sleep(Duration::from_millis(200));

    let t0 = Instant::now();
    let mut slow: Vec<Slow> = Vec::with_capacity(n);
    let mut last_drip = Instant::now();
    let mut max_open = 0usize;
    loop {
        // Open the next round.
        let now = Instant::now();
        for i in slow.len()..n.min(slow.len() + OPEN_PER_ROUND) {
            let s = connect_from(source(63, i), addr).unwrap();
            s.set_nonblocking(true).unwrap();
            let mut c = Slow {
                s,
                opened: Instant::now(),
                closed: None,
                sent: 0,
                got_408: false,
            };
            c.drip(now);
            slow.push(c);
        }
        let now = Instant::now();
        if now - last_drip >= Duration::from_secs(1) {
            last_drip = now;
            for c in slow.iter_mut().filter(|c| c.closed.is_none()) {
                c.drip(now);
            }
        }
        let open: Vec<usize> = (0..slow.len())
            .filter(|&i| slow[i].closed.is_none())
            .collect();
        max_open = max_open.max(open.len());
        if open.is_empty() && slow.len() == n {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{} slow connections still open after 60 s",
            open.len()
        );
        let ready: Vec<usize> = {
            let mut fds: Vec<PollFd> = open
                .iter()
                .map(|&i| PollFd::new(slow[i].s.as_fd(), PollFlags::POLLIN))
                .collect();
            poll(&mut fds, PollTimeout::from(20u8)).unwrap();
            fds.iter()
                .zip(&open)
                .filter(|(f, _)| f.revents().is_some_and(|r| !r.is_empty()))
                .map(|(_, &i)| i)
                .collect()
        };
        let now = Instant::now();
        for i in ready {
            slow[i].readable(now);
        }
    }
    let all_closed = t0.elapsed();
    // Keep the normal VMs going a little past the last close.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let normal = normal.join().unwrap();
    assert!(proxy.alive(), "the proxy died");

    let mut ages: Vec<Duration> = slow.iter().map(|c| c.closed.unwrap() - c.opened).collect();
    ages.sort();
    let got_408 = slow.iter().filter(|c| c.got_408).count();
    let max_sent = slow.iter().map(|c| c.sent).max().unwrap_or(0);
    let lat_max = normal.iter().map(|(_, d)| *d).max().unwrap_or_default();
    let ok = normal.iter().filter(|(r, _)| matches!(r, Ok(200))).count();
    eprintln!(
        "{n} slowloris connections (max {max_open} open at once, up to {max_sent} bytes each): \
         closed after min {:?} / p50 {:?} / max {:?} (http_request {HTTP_REQUEST:?}), {got_408} saw the 408; \
         all closed {all_closed:?} after the first; normal VMs {ok}/{} got 200, slowest {lat_max:?}; load {}",
        ages[0],
        ages[ages.len() / 2],
        ages[ages.len() - 1],
        normal.len(),
        loadavg()
    );
    assert!(
        ages[0] + EARLY_SLACK >= HTTP_REQUEST,
        "a slow connection was closed before http_request: {:?}",
        ages[0]
    );
    assert!(
        ages[ages.len() - 1] <= HTTP_REQUEST + CLOSE_SLACK,
        "a slow connection outlived http_request: {:?}",
        ages[ages.len() - 1]
    );
    assert!(
        normal.len() >= 20,
        "too few normal requests: {}",
        normal.len()
    );
    for (r, d) in &normal {
        assert!(matches!(r, Ok(200)), "a normal VM got {r:?}");
        assert!(*d <= NORMAL_BOUND, "a normal VM waited {d:?}");
    }
}
