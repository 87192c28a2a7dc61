//! A short soak (issue 7, resource limits; the long one is `scripts/soak.sh`):
//! ~20 s of steady mixed load against the proxy binary while its RSS and fd
//! count are sampled every second. After a warm-up both must stay flat: the
//! end may exceed the start only by a small slack.
//!
//! The load covers every way a connection ends: keep-alive clients (closed
//! by the client after 50 requests), connection-per-request clients, and
//! stalled clients that send half a head and are closed at `http_request`.
//! Each client thread paces itself so the test does not take the machine.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::limits::*;
use common::{AgentMode, FakeAgent};

/// Whole run.
const RUN: Duration = Duration::from_secs(20);
/// Samples before this are warm-up (free lists, pool, allocator arenas).
const WARM_UP: Duration = Duration::from_secs(5);
/// RSS may end at most this much above its post-warm-up level.
const RSS_SLACK_KIB: u64 = 1024;
/// The fd count may end at most this much above it (clients in flight).
const FD_SLACK: usize = 16;

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    bad: AtomicU64,
}

fn keepalive_client(addr: SocketAddr, net: u8, stop: &AtomicBool, t: &Tally) {
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut s) = connect_from(source(net, i % 60_000), addr) else {
            t.bad.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        i += 1;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for _ in 0..50 {
            let r = s
                .write_all(b"GET /openstack/latest/meta_data.json HTTP/1.1\r\nHost: h\r\n\r\n")
                .and_then(|()| read_status(&mut s));
            match r {
                Ok(200) => t.ok.fetch_add(1, Ordering::Relaxed),
                _ => t.bad.fetch_add(1, Ordering::Relaxed),
            };
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn per_request_client(addr: SocketAddr, net: u8, stop: &AtomicBool, t: &Tally) {
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        match get_from(source(net, i % 60_000), addr, "/latest/meta-data/") {
            Ok(200) => t.ok.fetch_add(1, Ordering::Relaxed),
            _ => t.bad.fetch_add(1, Ordering::Relaxed),
        };
        i += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn stalled_client(addr: SocketAddr, net: u8, stop: &AtomicBool) {
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        // Ten half-heads at a time, left to the proxy's http_request (1 s).
        let held: Vec<_> = (0..10)
            .filter_map(|k| connect_from(source(net, (i * 10 + k) % 60_000), addr).ok())
            .map(|mut s| {
                let _ = s.write_all(b"GET /stalled HTTP/1.1\r\nHo");
                s
            })
            .collect();
        i += 1;
        std::thread::sleep(Duration::from_millis(1500));
        drop(held);
    }
}

#[test]
fn rss_and_fds_stay_flat_under_steady_load() {
    raise_nofile(4096);
    let agent = FakeAgent::start(AgentMode::KeepAlive);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_proxy_config(
        dir.path(),
        &agent.path,
        0,
        "workers = 2",
        "http_request = \"1s\"\nkeep_alive = \"5s\"",
    );
    let mut proxy = Daemon::start(4096, &["proxy"], &cfg, "proxy starting");
    let addr = proxy.listen_addr();
    wait_serving(addr);
    let pid = proxy.pid();

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut threads = Vec::new();
    for k in 0..2u8 {
        let (s, t) = (stop.clone(), tally.clone());
        threads.push(std::thread::spawn(move || {
            keepalive_client(addr, 65 + k, &s, &t)
        }));
        let (s, t) = (stop.clone(), tally.clone());
        threads.push(std::thread::spawn(move || {
            per_request_client(addr, 67 + k, &s, &t)
        }));
    }
    let s = stop.clone();
    threads.push(std::thread::spawn(move || stalled_client(addr, 69, &s)));

    let t0 = Instant::now();
    let mut samples = Vec::new();
    while t0.elapsed() < RUN {
        std::thread::sleep(Duration::from_secs(1));
        samples.push((t0.elapsed(), rss_kib(pid), fd_count(pid)));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    assert!(proxy.alive(), "the proxy died");
    let (ok, bad) = (
        tally.ok.load(Ordering::Relaxed),
        tally.bad.load(Ordering::Relaxed),
    );
    for (t, rss, fds) in &samples {
        eprintln!("t={:>5.1}s rss={rss} KiB fds={fds}", t.as_secs_f64());
    }
    let after_warm: Vec<_> = samples.iter().filter(|s| s.0 >= WARM_UP).collect();
    let (start_rss, start_fds) = (after_warm[0].1, after_warm[0].2);
    let end = &samples[samples.len() - 3..];
    let end_rss = end.iter().map(|s| s.1).min().unwrap();
    let end_fds = end.iter().map(|s| s.2).min().unwrap();
    eprintln!(
        "soak {RUN:?}: {ok} requests 200, {bad} failed; RSS {start_rss} -> {end_rss} KiB, fds {start_fds} -> {end_fds} after a {WARM_UP:?} warm-up; load {}",
        loadavg()
    );
    assert_eq!(bad, 0, "requests failed under steady load");
    assert!(ok > 1000, "too little load to mean anything: {ok} requests");
    assert!(
        end_rss <= start_rss + RSS_SLACK_KIB,
        "RSS grew: {start_rss} -> {end_rss} KiB"
    );
    assert!(
        end_fds <= start_fds + FD_SLACK,
        "fds grew: {start_fds} -> {end_fds}"
    );
}
