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
//! The counters, histograms and the endpoint are [`crate::metrics`]'s, as for
//! the proxy and the API; this file names the agent's.

use std::ops::Deref;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

pub use crate::metrics::inc;
use crate::metrics::{
    self as m, counter_set, Histogram, HistogramSnapshot, PerLoop, StatusCounts,
    LATENCY_BUCKETS_US, STATUSES,
};

/// Upper bounds of the batch-size histogram (keys per Neutron query).
pub const BATCH_BUCKETS: [u64; 8] = [1, 2, 4, 8, 16, 32, 64, 128];

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

counter_set! {
    /// The agent's event counters (`metaproxy_agent_<event>_total`).
    pub struct AgentCounters / AgentCounterSnapshot {
        requests: "Requests parsed.",
        cache_hits: "Resolutions answered by a live positive cache entry.",
        cache_negative_hits: "Resolutions answered by a live negative cache entry.",
        cache_misses: "Resolutions that found nothing live in the cache.",
        inventory_lookups: "Resolutions that read the inventory.",
        backend_errors: "Neutron or Keystone calls that failed (connect, timeout, 5xx, garbage).",
        forwarded: "Requests sent to the metadata API.",
        api_errors: "Metadata API exchanges that failed or gave an unexpected status.",
        retried_after_404: "Cached mappings dropped and retried after the API answered 404.",
        bad_requests: "Requests answered 400 for their identity headers.",
        not_found: "Requests answered 404 because the guest did not resolve.",
        backend_unavailable: "Requests answered 503 because Neutron failed.",
        rx_malformed: "Requests refused 400/405/413/431/501 before they were resolved.",
        rx_smuggling: "Requests refused 400 for ambiguous framing (CL+TE, differing lengths).",
        rx_timeout: "Requests whose head or body did not arrive in time (408).",
    }
}

/// One loop's metrics (written by that loop only): the [`AgentCounters`]
/// (reached through `Deref`) plus the labelled ones and the histograms.
#[derive(Debug, Default)]
pub struct LoopMetrics {
    counters: AgentCounters,
    responses: StatusCounts,
    backend_calls: [AtomicU64; 4],
    /// Keys looked up in one Neutron call.
    batch_sizes: Histogram<{ BATCH_BUCKETS.len() }>,
    /// Requests waiting for a batched Neutron lookup right now (gauge).
    pub lookups_in_flight: AtomicU64,
    forward_latency: Histogram<{ LATENCY_BUCKETS_US.len() }>,
}

impl Deref for LoopMetrics {
    type Target = AgentCounters;
    fn deref(&self) -> &AgentCounters {
        &self.counters
    }
}

impl LoopMetrics {
    /// Count a response status.
    pub fn response(&self, status: u16) {
        self.responses.count(status);
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
        self.forward_latency.observe_micros(&LATENCY_BUCKETS_US, d);
    }
}

/// Every loop's block.
pub type Registry = PerLoop<LoopMetrics>;

impl Registry {
    /// The counters summed over loops.
    pub fn counters(&self) -> AgentCounterSnapshot {
        let mut s = AgentCounterSnapshot::default();
        for l in self.0.iter() {
            s.add(&l.counters.snapshot());
        }
        s
    }

    /// Sum of one counter over loops.
    pub fn sum(&self, f: impl Fn(&LoopMetrics) -> &AtomicU64) -> u64 {
        self.0.iter().map(|l| m::get(f(l))).sum()
    }

    /// Backend calls of one kind, all loops.
    pub fn calls(&self, c: Call) -> u64 {
        self.sum(|l| &l.backend_calls[c as usize])
    }

    /// Prometheus text exposition (version 0.0.4).
    pub fn render(&self) -> String {
        let mut o = String::new();
        m::write_counters(
            &mut o,
            "metaproxy_agent",
            &[(String::new(), self.counters())],
        );
        let mut statuses = [0; STATUSES.len() + 1];
        let mut batches = HistogramSnapshot::default();
        let mut latency = HistogramSnapshot::default();
        for l in self.0.iter() {
            l.responses.merge_into(&mut statuses);
            l.batch_sizes.merge_into(&mut batches);
            l.forward_latency.merge_into(&mut latency);
        }
        m::write_statuses(
            &mut o,
            "metaproxy_agent_responses_total",
            "Responses by status.",
            &statuses,
        );
        let calls: Vec<(&str, u64)> = CALL_NAMES
            .iter()
            .enumerate()
            .map(|(i, n)| (*n, self.sum(|l| &l.backend_calls[i])))
            .collect();
        m::write_labelled(
            &mut o,
            "metaproxy_agent_backend_calls_total",
            "Calls to Neutron and Keystone.",
            "kind",
            &calls,
        );
        m::write_gauge(
            &mut o,
            "metaproxy_agent_lookups_in_flight",
            "Requests waiting for a batched Neutron lookup.",
            self.sum(|l| &l.lookups_in_flight),
        );
        m::write_histogram(
            &mut o,
            "metaproxy_agent_batch_size",
            "Keys per batched Neutron query.",
            &BATCH_BUCKETS,
            1.0,
            &batches,
        );
        m::write_histogram(
            &mut o,
            "metaproxy_agent_forward_latency_seconds",
            "Metadata API exchange time.",
            &LATENCY_BUCKETS_US,
            1e6,
            &latency,
        );
        o
    }
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
