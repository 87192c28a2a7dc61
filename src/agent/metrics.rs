//! The agent's counters: one block per loop, merged on scrape.
//!
//! Each loop owns one [`LoopMetrics`] and is its only writer; the blocks are
//! `Arc`-shared only so that a scrape (or [`super::AgentHandle::stats`]) on
//! another thread can read them. Writers use relaxed atomic adds on their own
//! block, so loops never contend on a cache line; readers sum the blocks.
//! Rejected: one shared block of atomics (every request of every core would
//! bounce the same lines), and per-loop `Cell`s sent over a channel on
//! scrape (a stalled loop would stall the scrape).
//!
//! The Prometheus endpoint ([`serve`]) is a std thread with a blocking
//! listener: scrapes are rare, and nothing of it runs on the loops.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Response statuses counted one by one; anything else counts as `other`.
pub const STATUSES: [u16; 11] = [200, 400, 403, 404, 408, 409, 413, 500, 502, 503, 504];
/// Upper bounds of the batch-size histogram (keys per Neutron query).
pub const BATCH_BUCKETS: [u64; 8] = [1, 2, 4, 8, 16, 32, 64, 128];
/// Upper bounds of the forward-latency histogram, in microseconds.
pub const LATENCY_BUCKETS_US: [u64; 10] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 1_000_000, 10_000_000,
];
/// How long a scrape connection may take to send its request.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// Kinds of backend (Neutron/Keystone) calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// Router → networks.
    RouterNetworks = 0,
    /// A batch of IP or MAC lookups.
    Ports = 1,
    /// All ports of a network set.
    Prefetch = 2,
    /// A Keystone token.
    Token = 3,
}

const CALL_NAMES: [&str; 4] = ["router_networks", "ports", "prefetch", "token"];

/// A cumulative histogram with fixed bounds (`N` bounds plus `+Inf`).
#[derive(Debug)]
pub struct Histogram<const N: usize> {
    counts: [AtomicU64; N],
    inf: AtomicU64,
    sum: AtomicU64,
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            inf: AtomicU64::new(0),
            sum: AtomicU64::new(0),
        }
    }
}

impl<const N: usize> Histogram<N> {
    fn observe(&self, bounds: &[u64; N], v: u64) {
        if let Some(i) = bounds.iter().position(|b| v <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.inf.fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(v, Ordering::Relaxed);
    }
}

/// One loop's counters (written by that loop only).
#[derive(Debug, Default)]
pub struct LoopMetrics {
    /// Requests parsed.
    pub requests: AtomicU64,
    responses: [AtomicU64; STATUSES.len() + 1],
    /// Resolutions that went to the inventory.
    pub inventory_lookups: AtomicU64,
    /// Cache: live positive entry.
    pub cache_hits: AtomicU64,
    /// Cache: live negative entry.
    pub cache_negative_hits: AtomicU64,
    /// Cache: nothing live.
    pub cache_misses: AtomicU64,
    /// 400 for identity headers.
    pub bad_requests: AtomicU64,
    /// 404 because the guest did not resolve.
    pub not_found: AtomicU64,
    /// 503 because the backend failed.
    pub backend_unavailable: AtomicU64,
    /// Requests sent to the API.
    pub forwarded: AtomicU64,
    /// API exchanges that failed or gave an unexpected status.
    pub api_errors: AtomicU64,
    /// Cached mappings retried after an API 404.
    pub retried_after_404: AtomicU64,
    backend_calls: [AtomicU64; 4],
    /// Backend calls that failed (connect, timeout, 5xx, garbage).
    pub backend_errors: AtomicU64,
    /// Keys looked up in one Neutron call.
    batch_sizes: Histogram<{ BATCH_BUCKETS.len() }>,
    /// Requests waiting for a batched Neutron lookup right now (gauge).
    pub lookups_in_flight: AtomicU64,
    forward_latency: Histogram<{ LATENCY_BUCKETS_US.len() }>,
}

/// Add one.
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl LoopMetrics {
    /// Count a response status.
    pub fn response(&self, status: u16) {
        let i = STATUSES
            .iter()
            .position(|s| *s == status)
            .unwrap_or(STATUSES.len());
        inc(&self.responses[i]);
    }

    /// Count a backend call.
    pub fn call(&self, c: Call) {
        inc(&self.backend_calls[c as usize]);
    }

    /// Record one batched query's size.
    pub fn batch(&self, keys: usize) {
        self.batch_sizes
            .observe(&BATCH_BUCKETS, u64::try_from(keys).unwrap_or(u64::MAX));
    }

    /// Record one API exchange's duration.
    pub fn forward_latency(&self, d: Duration) {
        self.forward_latency.observe(
            &LATENCY_BUCKETS_US,
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
        );
    }
}

/// Every loop's block.
#[derive(Debug, Default, Clone)]
pub struct Registry(pub Arc<Vec<Arc<LoopMetrics>>>);

impl Registry {
    /// `n` fresh blocks.
    pub fn new(n: usize) -> Registry {
        Registry(Arc::new(
            (0..n).map(|_| Arc::new(LoopMetrics::default())).collect(),
        ))
    }

    /// Sum of one counter over loops.
    pub fn sum(&self, f: impl Fn(&LoopMetrics) -> &AtomicU64) -> u64 {
        self.0.iter().map(|m| get(f(m))).sum()
    }

    /// Backend calls of one kind, all loops.
    pub fn calls(&self, c: Call) -> u64 {
        self.sum(|m| &m.backend_calls[c as usize])
    }

    /// Prometheus text exposition (version 0.0.4).
    pub fn render(&self) -> String {
        let mut o = String::new();
        let mut counter = |name: &str, help: &str, f: &dyn Fn(&LoopMetrics) -> &AtomicU64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
            let _ = writeln!(o, "{name} {}", self.sum(f));
        };
        counter("metaproxy_agent_requests_total", "Requests parsed.", &|m| {
            &m.requests
        });
        counter(
            "metaproxy_agent_cache_hits_total",
            "Resolutions answered by a live positive cache entry.",
            &|m| &m.cache_hits,
        );
        counter(
            "metaproxy_agent_cache_negative_hits_total",
            "Resolutions answered by a live negative cache entry.",
            &|m| &m.cache_negative_hits,
        );
        counter(
            "metaproxy_agent_cache_misses_total",
            "Resolutions that found nothing live in the cache.",
            &|m| &m.cache_misses,
        );
        counter(
            "metaproxy_agent_inventory_lookups_total",
            "Resolutions that read the inventory.",
            &|m| &m.inventory_lookups,
        );
        counter(
            "metaproxy_agent_backend_errors_total",
            "Neutron or Keystone calls that failed.",
            &|m| &m.backend_errors,
        );
        counter(
            "metaproxy_agent_forwarded_total",
            "Requests sent to the metadata API.",
            &|m| &m.forwarded,
        );
        counter(
            "metaproxy_agent_api_errors_total",
            "Metadata API exchanges that failed or gave an unexpected status.",
            &|m| &m.api_errors,
        );
        counter(
            "metaproxy_agent_retried_after_404_total",
            "Cached mappings dropped and retried after the API answered 404.",
            &|m| &m.retried_after_404,
        );
        let _ = writeln!(
            o,
            "# HELP metaproxy_agent_responses_total Responses by status.\n# TYPE metaproxy_agent_responses_total counter"
        );
        for (i, s) in STATUSES.iter().enumerate() {
            let _ = writeln!(
                o,
                "metaproxy_agent_responses_total{{status=\"{s}\"}} {}",
                self.sum(|m| &m.responses[i])
            );
        }
        let _ = writeln!(
            o,
            "metaproxy_agent_responses_total{{status=\"other\"}} {}",
            self.sum(|m| &m.responses[STATUSES.len()])
        );
        let _ = writeln!(
            o,
            "# HELP metaproxy_agent_backend_calls_total Calls to Neutron and Keystone.\n# TYPE metaproxy_agent_backend_calls_total counter"
        );
        for (i, name) in CALL_NAMES.iter().enumerate() {
            let _ = writeln!(
                o,
                "metaproxy_agent_backend_calls_total{{kind=\"{name}\"}} {}",
                self.sum(|m| &m.backend_calls[i])
            );
        }
        let _ = writeln!(
            o,
            "# HELP metaproxy_agent_lookups_in_flight Requests waiting for a batched Neutron lookup.\n# TYPE metaproxy_agent_lookups_in_flight gauge\nmetaproxy_agent_lookups_in_flight {}",
            self.sum(|m| &m.lookups_in_flight)
        );
        self.histogram(
            &mut o,
            "metaproxy_agent_batch_size",
            "Keys per batched Neutron query.",
            &BATCH_BUCKETS,
            1.0,
            |m| &m.batch_sizes,
        );
        self.histogram(
            &mut o,
            "metaproxy_agent_forward_latency_seconds",
            "Metadata API exchange time.",
            &LATENCY_BUCKETS_US,
            1e6,
            |m| &m.forward_latency,
        );
        o
    }

    fn histogram<const N: usize>(
        &self,
        o: &mut String,
        name: &str,
        help: &str,
        bounds: &[u64; N],
        divisor: f64,
        f: impl Fn(&LoopMetrics) -> &Histogram<N>,
    ) {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, b) in bounds.iter().enumerate() {
            cumulative += self.sum(|m| &f(m).counts[i]);
            #[allow(clippy::cast_precision_loss)]
            let le = *b as f64 / divisor;
            let _ = writeln!(o, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let count = self.sum(|m| &f(m).inf);
        let _ = writeln!(o, "{name}_bucket{{le=\"+Inf\"}} {count}");
        #[allow(clippy::cast_precision_loss)]
        let sum = self.sum(|m| &f(m).sum) as f64 / divisor;
        let _ = writeln!(o, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// The scrape thread; stops when dropped.
#[derive(Debug)]
pub struct Exporter {
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Exporter {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the blocking accept.
        let _ = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serve `GET /metrics` (any path, in fact) on `addr` from a std thread.
///
/// # Errors
/// The address cannot be bound or the thread not spawned.
pub fn serve(addr: SocketAddr, registry: Registry) -> io::Result<Exporter> {
    let l = TcpListener::bind(addr)?;
    let addr = l.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let thread = std::thread::Builder::new()
        .name("agent-metrics".into())
        .spawn(move || {
            for conn in l.incoming() {
                if st.load(Ordering::Acquire) {
                    return;
                }
                let Ok(mut c) = conn else { continue };
                let _ = c.set_read_timeout(Some(SCRAPE_TIMEOUT));
                let _ = c.set_write_timeout(Some(SCRAPE_TIMEOUT));
                let mut req = Vec::new();
                let mut chunk = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                    match c.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&chunk[..n]),
                    }
                }
                let body = registry.render();
                let _ = write!(
                    c,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })?;
    Ok(Exporter {
        stop,
        addr,
        thread: Some(thread),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_loops_and_renders_buckets() {
        let r = Registry::new(2);
        r.0[0].batch(3);
        r.0[1].batch(100);
        r.0[1].batch(1000);
        r.0[0].response(200);
        r.0[1].response(200);
        r.0[1].response(299);
        r.0[0].call(Call::Ports);
        inc(&r.0[1].cache_hits);
        r.0[0].forward_latency(Duration::from_millis(3));
        let t = r.render();
        assert!(
            t.contains("metaproxy_agent_batch_size_bucket{le=\"2\"} 0\n"),
            "{t}"
        );
        assert!(t.contains("metaproxy_agent_batch_size_bucket{le=\"4\"} 1\n"));
        assert!(t.contains("metaproxy_agent_batch_size_bucket{le=\"128\"} 2\n"));
        assert!(t.contains("metaproxy_agent_batch_size_bucket{le=\"+Inf\"} 3\n"));
        assert!(t.contains("metaproxy_agent_batch_size_sum 1103\n"));
        assert!(t.contains("metaproxy_agent_responses_total{status=\"200\"} 2\n"));
        assert!(t.contains("metaproxy_agent_responses_total{status=\"other\"} 1\n"));
        assert!(t.contains("metaproxy_agent_backend_calls_total{kind=\"ports\"} 1\n"));
        assert!(t.contains("metaproxy_agent_cache_hits_total 1\n"));
        assert!(t.contains("metaproxy_agent_forward_latency_seconds_bucket{le=\"0.005\"} 1\n"));
        assert_eq!(r.calls(Call::Ports), 1);
        assert!(t.contains("metaproxy_agent_forward_latency_seconds_bucket{le=\"0.0005\"} 0\n"));
    }
}
