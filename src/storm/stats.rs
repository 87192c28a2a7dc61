//! What a storm measured: per-loop HDR histograms and counters, merged once
//! at the end into a [`StormReport`] (table via `Display`, JSON via serde),
//! and the live progress display.
//!
//! Latencies are recorded in microseconds in [`hdrhistogram`] histograms with
//! 3 significant digits from 1 µs to an hour; a loop owns its own and they
//! are added up at the end, so recording is lock-free and exact.

use std::fmt;
use std::io::IsTerminal as _;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use super::Shared;

/// Progress refresh period.
pub(crate) const TICK: Duration = Duration::from_millis(100);
/// Plain-line progress period when stderr is not a terminal.
const PLAIN_LINE_EVERY: Duration = Duration::from_secs(1);
/// Highest latency a histogram tracks, in µs (larger values are clamped).
const MAX_TRACKED_US: u64 = 3_600_000_000;
/// Error messages kept per loop for the report.
const MAX_SAMPLES_PER_LOOP: usize = 10;

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// bind/connect failed (refused, no slot, EADDRNOTAVAIL...).
    Connect,
    /// No complete response within the timeout.
    Timeout,
    /// Reset, early close, unparseable response.
    Io,
    /// Unexpected status.
    Status,
    /// Expected status, malformed body (invalid JSON, empty).
    Body,
    /// A well-formed answer about another VM.
    WrongVm,
}

impl ErrorKind {
    const ALL: [ErrorKind; 6] = [
        ErrorKind::Connect,
        ErrorKind::Timeout,
        ErrorKind::Io,
        ErrorKind::Status,
        ErrorKind::Body,
        ErrorKind::WrongVm,
    ];

    /// Name in the table and the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Io => "io",
            ErrorKind::Status => "status",
            ErrorKind::Body => "body",
            ErrorKind::WrongVm => "wrong_vm",
        }
    }
}

/// Errors by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ErrorCounts {
    /// bind/connect failed.
    pub connect: u64,
    /// No complete response within the timeout.
    pub timeout: u64,
    /// Reset, early close, unparseable response.
    pub io: u64,
    /// Unexpected status.
    pub status: u64,
    /// Expected status, malformed body.
    pub body: u64,
    /// Another VM's data.
    pub wrong_vm: u64,
}

impl ErrorCounts {
    fn slot(&mut self, k: ErrorKind) -> &mut u64 {
        match k {
            ErrorKind::Connect => &mut self.connect,
            ErrorKind::Timeout => &mut self.timeout,
            ErrorKind::Io => &mut self.io,
            ErrorKind::Status => &mut self.status,
            ErrorKind::Body => &mut self.body,
            ErrorKind::WrongVm => &mut self.wrong_vm,
        }
    }

    /// Count of one kind.
    pub fn get(&self, k: ErrorKind) -> u64 {
        let mut c = *self;
        *c.slot(k)
    }

    /// All kinds together.
    pub fn total(&self) -> u64 {
        ErrorKind::ALL.iter().map(|k| self.get(*k)).sum()
    }

    fn add(&mut self, o: &ErrorCounts) {
        for k in ErrorKind::ALL {
            *self.slot(k) += o.get(k);
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_TRACKED_US, 3).expect("static histogram bounds are valid")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// One loop's measurements; owned by the loop, sent back once at the end.
#[derive(Debug)]
pub struct LoopStats {
    pub(crate) request_us: Histogram<u64>,
    pub(crate) vm_complete_us: Histogram<u64>,
    pub(crate) requests: u64,
    pub(crate) connections: u64,
    pub(crate) errors: ErrorCounts,
    pub(crate) vms_completed: u64,
    pub(crate) vms_failed: u64,
    pub(crate) fd_waits: u64,
    pub(crate) samples: Vec<String>,
    /// When this loop's last VM finished.
    pub(crate) finished: Option<Instant>,
}

impl LoopStats {
    pub(crate) fn new() -> Self {
        LoopStats {
            request_us: new_histogram(),
            vm_complete_us: new_histogram(),
            requests: 0,
            connections: 0,
            errors: ErrorCounts::default(),
            vms_completed: 0,
            vms_failed: 0,
            fd_waits: 0,
            samples: Vec::new(),
            finished: None,
        }
    }

    pub(crate) fn record_request(&mut self, latency: Duration) {
        self.request_us.saturating_record(micros(latency));
    }

    pub(crate) fn record_vm(&mut self, since_scheduled: Duration) {
        self.vm_complete_us
            .saturating_record(micros(since_scheduled));
    }

    pub(crate) fn record_error(&mut self, kind: ErrorKind, sample: impl FnOnce() -> String) {
        *self.errors.slot(kind) += 1;
        if self.samples.len() < MAX_SAMPLES_PER_LOOP {
            self.samples
                .push(format!("{}: {}", kind.as_str(), sample()));
        }
    }
}

/// Percentiles of one histogram, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Summary {
    /// Values recorded.
    pub count: u64,
    /// Smallest value.
    pub min: u64,
    /// Arithmetic mean.
    pub mean: f64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p99_9: u64,
    /// Largest value.
    pub max: u64,
}

impl Summary {
    fn of(h: &Histogram<u64>) -> Summary {
        if h.is_empty() {
            return Summary::default();
        }
        Summary {
            count: h.len(),
            min: h.min(),
            mean: h.mean(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p99_9: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// The result of a storm. `Display` is the final table.
#[derive(Debug, Clone, Serialize)]
pub struct StormReport {
    /// Address the VMs talked to.
    pub target: String,
    /// Request sequence replayed.
    pub profile: super::Profile,
    /// VMs in the storm.
    pub vms: u64,
    /// Loops used.
    pub workers: usize,
    /// Ramp window, seconds.
    pub ramp_s: f64,
    /// Per-request timeout, seconds.
    pub timeout_s: f64,
    /// From the first scheduled start to the last VM's end.
    pub duration_s: f64,
    /// VMs whose every request passed.
    pub vms_completed: u64,
    /// VMs with at least one failed request.
    pub vms_failed: u64,
    /// Requests that got as far as being sent.
    pub requests: u64,
    /// Connections attempted.
    pub connections: u64,
    /// `requests / duration_s`.
    pub requests_per_s: f64,
    /// `connections / duration_s`.
    pub connections_per_s: f64,
    /// Failed requests by kind.
    pub errors: ErrorCounts,
    /// Per request, from its first byte of work (slot held) to its complete response.
    pub request_latency_us: Summary,
    /// Per VM that completed cleanly, from its scheduled start to its last answer.
    pub vm_complete_us: Summary,
    /// Requests that waited for a free connection slot (client-side fd cap).
    pub fd_waits: u64,
    /// Open-connection cap of each loop.
    pub connections_per_loop: usize,
    /// The first few failures, for diagnosis.
    pub error_samples: Vec<String>,
    /// Every VM completed and no request failed.
    pub passed: bool,
}

impl StormReport {
    pub(crate) fn merge(shared: &Shared, loops: Vec<LoopStats>) -> StormReport {
        let mut req = new_histogram();
        let mut vm = new_histogram();
        let mut errors = ErrorCounts::default();
        let (mut requests, mut connections, mut completed, mut failed, mut waits) = (0, 0, 0, 0, 0);
        let mut samples = Vec::new();
        let mut end = shared.t0;
        for l in loops {
            // Same bounds on both sides: `add` cannot fail.
            let _ = req.add(&l.request_us);
            let _ = vm.add(&l.vm_complete_us);
            errors.add(&l.errors);
            requests += l.requests;
            connections += l.connections;
            completed += l.vms_completed;
            failed += l.vms_failed;
            waits += l.fd_waits;
            samples.extend(l.samples);
            if let Some(f) = l.finished {
                end = end.max(f);
            }
        }
        let duration = end.saturating_duration_since(shared.t0);
        let secs = duration.as_secs_f64().max(1e-9);
        let vms = shared.vms.len() as u64;
        StormReport {
            target: shared.target.to_string(),
            profile: shared.profile,
            vms,
            workers: shared.workers,
            ramp_s: shared.ramp.as_secs_f64(),
            timeout_s: shared.timeout.as_secs_f64(),
            duration_s: duration.as_secs_f64(),
            vms_completed: completed,
            vms_failed: failed,
            requests,
            connections,
            requests_per_s: requests as f64 / secs,
            connections_per_s: connections as f64 / secs,
            errors,
            request_latency_us: Summary::of(&req),
            vm_complete_us: Summary::of(&vm),
            fd_waits: waits,
            connections_per_loop: shared.conns_per_loop,
            error_samples: samples,
            passed: completed == vms && errors.total() == 0,
        }
    }
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

impl fmt::Display for StormReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "storm: {} VMs, profile {}, ramp {:.1}s, {} loops -> {}",
            self.vms, self.profile, self.ramp_s, self.workers, self.target
        )?;
        writeln!(
            f,
            "  VMs completed {} / {}  failed {}  duration {:.2}s",
            self.vms_completed, self.vms, self.vms_failed, self.duration_s
        )?;
        writeln!(
            f,
            "  requests {}  ({:.0}/s)  connections {}  ({:.0}/s)  fd waits {}",
            self.requests,
            self.requests_per_s,
            self.connections,
            self.connections_per_s,
            self.fd_waits
        )?;
        writeln!(
            f,
            "  {:<22} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "latency (ms)", "count", "p50", "p90", "p99", "p99.9", "max"
        )?;
        for (name, s) in [
            ("per request", &self.request_latency_us),
            ("VM metadata complete", &self.vm_complete_us),
        ] {
            writeln!(
                f,
                "  {:<22} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
                name,
                s.count,
                ms(s.p50),
                ms(s.p90),
                ms(s.p99),
                ms(s.p99_9),
                ms(s.max)
            )?;
        }
        write!(f, "  errors")?;
        for k in ErrorKind::ALL {
            write!(f, "  {} {}", k.as_str(), self.errors.get(k))?;
        }
        writeln!(f)?;
        for s in &self.error_samples {
            writeln!(f, "    {s}")?;
        }
        write!(f, "  result: {}", if self.passed { "PASS" } else { "FAIL" })
    }
}

/// Sums of the loops' progress counters.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    started: u64,
    completed: u64,
    failed: u64,
    requests: u64,
    errors: u64,
}

fn totals(shared: &Shared) -> Totals {
    let mut t = Totals::default();
    for p in &shared.progress {
        t.started += p.started.load(Ordering::Relaxed);
        t.completed += p.completed.load(Ordering::Relaxed);
        t.failed += p.failed.load(Ordering::Relaxed);
        t.requests += p.requests.load(Ordering::Relaxed);
        t.errors += p.errors.load(Ordering::Relaxed);
    }
    t
}

/// Live progress on stderr: an indicatif bar on a terminal, a plain line
/// per second otherwise, nothing when disabled.
pub(crate) enum Display {
    Off,
    Bar(indicatif::ProgressBar),
    Plain(std::cell::Cell<Instant>),
}

impl Display {
    pub(crate) fn new(enabled: bool, shared: &Shared) -> Display {
        if !enabled {
            return Display::Off;
        }
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(shared.vms.len() as u64);
            let style = indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} VMs {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            Display::Bar(bar)
        } else {
            Display::Plain(std::cell::Cell::new(Instant::now()))
        }
    }

    fn line(t: Totals, shared: &Shared) -> String {
        let secs = Instant::now()
            .saturating_duration_since(shared.t0)
            .as_secs_f64();
        format!(
            "running {} failed {} req {} ({:.0}/s) errors {}",
            t.started.saturating_sub(t.completed + t.failed),
            t.failed,
            t.requests,
            t.requests as f64 / secs.max(1e-3),
            t.errors
        )
    }

    pub(crate) fn tick(&self, shared: &Shared) {
        match self {
            Display::Off => {}
            Display::Bar(bar) => {
                let t = totals(shared);
                bar.set_position(t.completed + t.failed);
                bar.set_message(Self::line(t, shared));
            }
            Display::Plain(last) => {
                if last.get().elapsed() >= PLAIN_LINE_EVERY {
                    last.set(Instant::now());
                    let t = totals(shared);
                    eprintln!(
                        "storm: {}/{} VMs done, {}",
                        t.completed + t.failed,
                        shared.vms.len(),
                        Self::line(t, shared)
                    );
                }
            }
        }
    }

    pub(crate) fn finish(&self, shared: &Shared) {
        match self {
            Display::Off => {}
            Display::Bar(bar) => {
                self.tick(shared);
                bar.finish();
            }
            Display::Plain(_) => {
                let t = totals(shared);
                eprintln!(
                    "storm: {}/{} VMs done, {}",
                    t.completed + t.failed,
                    shared.vms.len(),
                    Self::line(t, shared)
                );
            }
        }
    }
}
