//! The counters of the three daemons, defined once: per-loop blocks of
//! relaxed atomics, merged on scrape, and the Prometheus text endpoint that
//! serves them (`proxy.metrics_listen`, `agent.metrics_listen`,
//! `api.metrics_listen`).
//!
//! A daemon names its counters once, in a `counter_set!`: the macro makes
//! the per-loop block (one `AtomicU64` per event, cache-line aligned), its
//! plain snapshot that crosses threads (`add` to merge loops), and the
//! metric names and help texts the endpoint renders. A loop is the only
//! writer of its block; a scrape, or `metaproxy ctl status`, on another
//! thread sums the blocks. Counters are named after events (`rx_smuggling`,
//! `upstream_timeout`); the endpoint adds the daemon's prefix and `_total`.
//!
//! Rejected: one shared block of atomics (every request of every core would
//! bounce the same cache lines); per-loop `Cell`s reported over a channel on
//! scrape (a stalled loop stalls the scrape, and every scrape wakes every
//! loop); the `prometheus` crate (a registry behind a lock, label lookups by
//! string on the hot path).
//!
//! The endpoint ([`serve`]) is a std thread with a blocking listener: scrapes
//! are rare, and nothing of it runs on the loops.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::http::{self, HeaderValue};

/// How long a scrape connection may take to send its request and read the answer.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes of a scrape's request head that are read.
const SCRAPE_HEAD_MAX_BYTES: usize = 8192;
/// The exposition format's content type.
const CONTENT_TYPE: HeaderValue<'static> = HeaderValue::from_static("text/plain; version=0.0.4");

/// Response statuses counted one by one (the agent's and the API's answers);
/// anything else counts as `other`.
pub const STATUSES: [u16; 16] = [
    200, 400, 401, 403, 404, 405, 408, 409, 413, 431, 500, 501, 502, 503, 504, 505,
];
/// Upper bounds of the latency histograms, in microseconds (rendered in seconds).
pub const LATENCY_BUCKETS_US: [u64; 10] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 1_000_000, 10_000_000,
];

/// Add one (relaxed: a counter orders nothing).
#[inline]
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Read a counter.
#[inline]
pub fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// A snapshot of a `counter_set!`: its values in the order of
/// [`Snapshot::METRICS`].
pub trait Snapshot {
    /// Each counter's event name and help text.
    const METRICS: &'static [(&'static str, &'static str)];
    /// The value of counter `i` (in [`Snapshot::METRICS`] order).
    fn value(&self, i: usize) -> u64;
}

/// Define a set of event counters once: `struct Block / Snapshot { event:
/// "help", … }` makes the per-loop block `Block` (an `AtomicU64` per event,
/// `snapshot()`), the thread-crossing `Snapshot` (a `u64` per event, `add`)
/// and its [`Snapshot`] impl, which [`write_counters`] renders.
macro_rules! counter_set {
    (
        $(#[$meta:meta])*
        $vis:vis struct $block:ident / $snap:ident {
            $( $field:ident : $help:literal ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        ///
        /// One block per loop (its only writer), cache-line aligned so loops
        /// never share a line.
        #[derive(Debug, Default)]
        #[repr(align(64))]
        $vis struct $block {
            $( #[doc = $help] pub $field: ::std::sync::atomic::AtomicU64, )*
        }

        /// A snapshot of the counters that can cross threads.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        $vis struct $snap {
            $( #[doc = $help] pub $field: u64, )*
        }

        impl $block {
            /// Read every counter.
            pub fn snapshot(&self) -> $snap {
                $snap { $( $field: $crate::metrics::get(&self.$field), )* }
            }
        }

        impl $snap {
            /// Field-wise sum (merges loops).
            pub fn add(&mut self, o: &$snap) {
                $( self.$field += o.$field; )*
            }
        }

        impl $crate::metrics::Snapshot for $snap {
            const METRICS: &'static [(&'static str, &'static str)] =
                &[ $( (stringify!($field), $help), )* ];
            fn value(&self, i: usize) -> u64 {
                [ $( self.$field, )* ].get(i).copied().unwrap_or(0)
            }
        }
    };
}
pub(crate) use counter_set;

/// One metrics block per loop (`T`: a daemon's block), `Arc`-shared only
/// so that a scrape on another thread can read them.
#[derive(Debug, Default)]
pub struct PerLoop<T>(pub Arc<Vec<Arc<T>>>);

impl<T> Clone for PerLoop<T> {
    fn clone(&self) -> Self {
        PerLoop(self.0.clone())
    }
}

impl<T: Default> PerLoop<T> {
    /// `n` fresh blocks.
    pub fn new(n: usize) -> Self {
        PerLoop(Arc::new((0..n).map(|_| Arc::new(T::default())).collect()))
    }

    /// Loop `i`'s block (a fresh, unread one past the end).
    pub fn block(&self, i: usize) -> Arc<T> {
        self.0.get(i).cloned().unwrap_or_default()
    }
}

/// A cumulative histogram with fixed bounds (`N` bounds plus `+Inf`), one per
/// loop like the counters.
#[derive(Debug)]
pub struct Histogram<const N: usize> {
    counts: [AtomicU64; N],
    count: AtomicU64,
    sum: AtomicU64,
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
        }
    }
}

impl<const N: usize> Histogram<N> {
    /// Record `v` against `bounds` (ascending, the same on every call).
    pub fn observe(&self, bounds: &[u64; N], v: u64) {
        if let Some(i) = bounds.iter().position(|b| v <= *b) {
            inc(&self.counts[i]);
        }
        inc(&self.count);
        self.sum.fetch_add(v, Ordering::Relaxed);
    }

    /// Record a duration in microseconds (against [`LATENCY_BUCKETS_US`]-like bounds).
    pub fn observe_micros(&self, bounds: &[u64; N], d: Duration) {
        self.observe(bounds, u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    /// Add this block to `acc`.
    pub fn merge_into(&self, acc: &mut HistogramSnapshot<N>) {
        for (a, c) in acc.counts.iter_mut().zip(&self.counts) {
            *a += get(c);
        }
        acc.count += get(&self.count);
        acc.sum += get(&self.sum);
    }
}

/// Loops' [`Histogram`]s summed.
#[derive(Debug, Clone, Copy)]
pub struct HistogramSnapshot<const N: usize> {
    /// Observations per bucket (not cumulative).
    pub counts: [u64; N],
    /// All observations.
    pub count: u64,
    /// Their sum, in the unit observed.
    pub sum: u64,
}

impl<const N: usize> Default for HistogramSnapshot<N> {
    fn default() -> Self {
        HistogramSnapshot {
            counts: [0; N],
            count: 0,
            sum: 0,
        }
    }
}

/// Answers counted by status ([`STATUSES`], then `other`).
#[derive(Debug, Default)]
pub struct StatusCounts([AtomicU64; STATUSES.len() + 1]);

impl StatusCounts {
    /// Count one answer with `status`.
    pub fn count(&self, status: u16) {
        let i = STATUSES
            .iter()
            .position(|s| *s == status)
            .unwrap_or(STATUSES.len());
        inc(&self.0[i]);
    }

    /// Add this block to `acc`.
    pub fn merge_into(&self, acc: &mut [u64; STATUSES.len() + 1]) {
        for (a, c) in acc.iter_mut().zip(&self.0) {
            *a += get(c);
        }
    }
}

/// Escape a label value (`\`, `"` and newlines, as the text format asks).
pub fn label_value(v: &str) -> String {
    let mut o = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o
}

fn head(o: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn sample(o: &mut String, name: &str, labels: &str, v: impl std::fmt::Display) {
    if labels.is_empty() {
        let _ = writeln!(o, "{name} {v}");
    } else {
        let _ = writeln!(o, "{name}{{{labels}}} {v}");
    }
}

/// Render every counter of a set as `<prefix>_<event>_total`, one sample per
/// row; a row's labels are `name="value",…` text ([`label_value`] escaped),
/// or empty.
pub fn write_counters<S: Snapshot>(o: &mut String, prefix: &str, rows: &[(String, S)]) {
    for (i, (event, help)) in S::METRICS.iter().enumerate() {
        let name = format!("{prefix}_{event}_total");
        head(o, &name, help, "counter");
        for (labels, s) in rows {
            sample(o, &name, labels, s.value(i));
        }
    }
}

/// Render one counter family by status (`<name>{status="…"}`), `other` last.
pub fn write_statuses(o: &mut String, name: &str, help: &str, counts: &[u64; STATUSES.len() + 1]) {
    head(o, name, help, "counter");
    for (s, v) in STATUSES.iter().zip(counts) {
        sample(o, name, &format!("status=\"{s}\""), v);
    }
    sample(o, name, "status=\"other\"", counts[STATUSES.len()]);
}

/// Render one counter family with one sample per `(label, value)`.
pub fn write_labelled(o: &mut String, name: &str, help: &str, label: &str, rows: &[(&str, u64)]) {
    head(o, name, help, "counter");
    for (l, v) in rows {
        sample(o, name, &format!("{label}=\"{}\"", label_value(l)), v);
    }
}

/// Render one family of `kind` (`counter`, `gauge`) with a sample per row
/// of (labels text, value), as [`write_counters`] for one value per row.
pub fn write_rows(o: &mut String, name: &str, help: &str, kind: &str, rows: &[(String, u64)]) {
    head(o, name, help, kind);
    for (labels, v) in rows {
        sample(o, name, labels, v);
    }
}

/// Render a gauge.
pub fn write_gauge(o: &mut String, name: &str, help: &str, v: u64) {
    head(o, name, help, "gauge");
    sample(o, name, "", v);
}

/// Render a histogram; bounds and sum are divided by `divisor` (1e6 turns
/// microseconds into the seconds a `_seconds` metric is in).
pub fn write_histogram<const N: usize>(
    o: &mut String,
    name: &str,
    help: &str,
    bounds: &[u64; N],
    divisor: f64,
    h: &HistogramSnapshot<N>,
) {
    head(o, name, help, "histogram");
    let mut cumulative = 0;
    for (b, c) in bounds.iter().zip(&h.counts) {
        cumulative += c;
        #[allow(clippy::cast_precision_loss)] // bounds are small
        let le = *b as f64 / divisor;
        let _ = writeln!(o, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
    }
    let _ = writeln!(o, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
    #[allow(clippy::cast_precision_loss)] // a sum of microseconds
    let sum = h.sum as f64 / divisor;
    let _ = writeln!(o, "{name}_sum {sum}\n{name}_count {}", h.count);
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

/// Bind a daemon's `metrics_listen` (before its loops start, so a bad
/// address refuses the start); the error names `key`.
///
/// # Errors
/// The address cannot be bound.
pub fn bind(key: &str, addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).map_err(|e| io::Error::new(e.kind(), format!("{key} {addr}: {e}")))
}

/// Serve the text `render` makes on `l` (from [`bind`]; any path: `GET
/// /metrics` is what Prometheus asks for), one scrape at a time, from a std
/// thread named `thread`. A HEAD gets the head alone.
///
/// # Errors
/// The thread could not be spawned.
pub fn serve(
    l: TcpListener,
    thread: &str,
    render: impl Fn() -> String + Send + 'static,
) -> io::Result<Exporter> {
    let addr = l.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let thread = std::thread::Builder::new()
        .name(thread.into())
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
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < SCRAPE_HEAD_MAX_BYTES
                {
                    match c.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&chunk[..n]),
                    }
                }
                let body = render();
                let mut out = Vec::with_capacity(body.len() + 128);
                let is_head = req.starts_with(b"HEAD ");
                http::write_answer(&mut out, 200, CONTENT_TYPE, body.as_bytes(), is_head, true);
                let _ = c.write_all(&out);
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

    counter_set! {
        /// Test counters.
        struct TestCounters / TestSnapshot {
            rx_a: "A happened.",
            rx_b: "B happened.",
        }
    }

    #[test]
    fn counter_sets_merge_and_render_with_labels() {
        let loops = [TestCounters::default(), TestCounters::default()];
        inc(&loops[0].rx_a);
        inc(&loops[1].rx_a);
        inc(&loops[1].rx_b);
        let mut sum = TestSnapshot::default();
        for l in &loops {
            sum.add(&l.snapshot());
        }
        assert_eq!((sum.rx_a, sum.rx_b), (2, 1));
        let mut o = String::new();
        let labels = format!("namespace=\"{}\"", label_value("q\"r\\"));
        write_counters(&mut o, "metaproxy_test", &[(labels, sum)]);
        assert!(
            o.contains("# TYPE metaproxy_test_rx_a_total counter\n"),
            "{o}"
        );
        assert!(o.contains("metaproxy_test_rx_a_total{namespace=\"q\\\"r\\\\\"} 2\n"));
        assert!(o.contains("metaproxy_test_rx_b_total{namespace=\"q\\\"r\\\\\"} 1\n"));
        assert_eq!(std::mem::align_of::<TestCounters>(), 64);
    }

    #[test]
    fn histograms_are_cumulative_in_base_units() {
        let h = Histogram::<{ LATENCY_BUCKETS_US.len() }>::default();
        h.observe_micros(&LATENCY_BUCKETS_US, Duration::from_millis(3));
        h.observe_micros(&LATENCY_BUCKETS_US, Duration::from_secs(60));
        let mut s = HistogramSnapshot::default();
        h.merge_into(&mut s);
        let mut o = String::new();
        write_histogram(&mut o, "x_seconds", "X.", &LATENCY_BUCKETS_US, 1e6, &s);
        assert!(o.contains("x_seconds_bucket{le=\"0.0025\"} 0\n"), "{o}");
        assert!(o.contains("x_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(o.contains("x_seconds_bucket{le=\"10\"} 1\n"));
        assert!(o.contains("x_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(o.contains("x_seconds_sum 60.003\nx_seconds_count 2\n"));
    }

    #[test]
    fn statuses_outside_the_list_count_as_other() {
        let s = StatusCounts::default();
        s.count(200);
        s.count(299);
        let mut acc = [0; STATUSES.len() + 1];
        s.merge_into(&mut acc);
        let mut o = String::new();
        write_statuses(&mut o, "r_total", "R.", &acc);
        assert!(o.contains("r_total{status=\"200\"} 1\n"), "{o}");
        assert!(o.contains("r_total{status=\"other\"} 1\n"));
    }
}
