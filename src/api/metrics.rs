//! The API's counters ([`crate::metrics`]): one [`LoopMetrics`] per loop,
//! merged by `api.metrics_listen`'s scrape thread.

use std::time::Duration;

use crate::http::HttpError;
use crate::metrics::{
    self as m, counter_set, inc, Histogram, HistogramSnapshot, PerLoop, StatusCounts,
    LATENCY_BUCKETS_US, STATUSES,
};
use crate::serve::Refusal;

counter_set! {
    /// The API's event counters (`metaproxy_api_<event>_total`).
    pub struct ApiCounters / ApiCounterSnapshot {
        requests: "Requests answered by the metadata handler.",
        rx_bad_request: "Requests refused 400/405/413/431/501 before the handler: malformed or over a limit.",
        rx_smuggling: "Requests refused 400 for ambiguous framing (CL+TE, differing Content-Lengths).",
        rx_timeout: "Requests whose head or body did not arrive in time (408).",
    }
}

/// One loop's metrics (written by that loop only).
#[derive(Debug, Default)]
pub struct LoopMetrics {
    /// The event counters.
    pub counters: ApiCounters,
    responses: StatusCounts,
    latency: Histogram<{ LATENCY_BUCKETS_US.len() }>,
}

impl LoopMetrics {
    /// A request the handler answered with `status` after `took` (from
    /// its head's first bytes).
    pub fn answered(&self, status: u16, took: Duration) {
        inc(&self.counters.requests);
        self.responses.count(status);
        self.latency.observe_micros(&LATENCY_BUCKETS_US, took);
    }

    /// The API's edge for requests the engine refused: the event counted,
    /// the status answered.
    pub fn refused(&self, why: Refusal) -> u16 {
        let c = &self.counters;
        inc(match why {
            Refusal::Http(HttpError::Smuggling) => &c.rx_smuggling,
            Refusal::Http(_) => &c.rx_bad_request,
            Refusal::HeadTimeout | Refusal::BodyTimeout => &c.rx_timeout,
        });
        let status = why.status();
        self.responses.count(status);
        status
    }
}

/// Every loop's block.
pub type Registry = PerLoop<LoopMetrics>;

impl Registry {
    /// Prometheus text exposition (version 0.0.4).
    pub fn render(&self) -> String {
        let mut counters = ApiCounterSnapshot::default();
        let mut statuses = [0; STATUSES.len() + 1];
        let mut latency = HistogramSnapshot::default();
        for l in self.0.iter() {
            counters.add(&l.counters.snapshot());
            l.responses.merge_into(&mut statuses);
            l.latency.merge_into(&mut latency);
        }
        let mut o = String::new();
        m::write_counters(&mut o, "metaproxy_api", &[(String::new(), counters)]);
        m::write_statuses(
            &mut o,
            "metaproxy_api_responses_total",
            "Responses by status (refusals included).",
            &statuses,
        );
        m::write_histogram(
            &mut o,
            "metaproxy_api_request_duration_seconds",
            "Time from a request's first bytes to its rendered answer.",
            &LATENCY_BUCKETS_US,
            1e6,
            &latency,
        );
        o
    }
}
