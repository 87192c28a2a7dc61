//! The proxy's one error, and its one map to a status and a counter.
//!
//! Every answer the proxy makes up itself (rather than relays from the
//! agent) comes from a [`ProxyError`], which says whose fault it was: the
//! VM's request ([`Downstream`]), the agent ([`UpstreamError`]), or the
//! proxy itself ([`Internal`]). [`ProxyError::classify`] is the only place
//! that turns one into a status (400/401/403/405/408/413/429/431/500/501/
//! 502/503/504) and picks the event counter it adds to (`rx_smuggling`,
//! `upstream_timeout`, …), so a status cannot be answered without being
//! counted, and the metrics name what happened rather than the status.
//!
//! Rejected: counting at each call site (the engine's refusals, the rate
//! limit, IMDSv2 and the pool each counted their own, and `Smuggling` was
//! counted by none).

use std::sync::atomic::AtomicU64;

use crate::http::HttpError;
use crate::proxy::upstream::UpstreamError;
use crate::proxy::ProxyCounters;
use crate::serve::Refusal;

/// Why the proxy answered a request itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The VM's request was refused.
    #[error("request refused: {0}")]
    Downstream(#[from] Downstream),
    /// The agent failed.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The proxy itself failed.
    #[error("internal error: {0}")]
    Internal(#[from] Internal),
}

/// A VM's request at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Downstream {
    /// Malformed, ambiguous or over a limit.
    #[error("{0}")]
    Http(HttpError),
    /// Its head was not complete within `http_request`.
    #[error("head not complete within http_request")]
    HeadTimeout,
    /// A body read waited longer than `client`.
    #[error("body read timed out")]
    BodyTimeout,
    /// Over the rate limit.
    #[error("rate limited")]
    RateLimited,
    /// An IMDSv2 token missing or invalid (401), or a bad token PUT
    /// (400/403): the status [`crate::proxy::imdsv2::decide`] chose.
    #[error("IMDSv2 token refused ({0})")]
    Token(u16),
}

/// The proxy's own failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Internal {
    /// The IP TTL of a token answer could not be set (its hop limit is
    /// what keeps a container behind the VM from taking the token).
    #[error("cannot set the hop limit of a token answer")]
    HopLimit,
}

impl From<Refusal> for ProxyError {
    fn from(r: Refusal) -> Self {
        ProxyError::Downstream(match r {
            Refusal::Http(e) => Downstream::Http(e),
            Refusal::HeadTimeout => Downstream::HeadTimeout,
            Refusal::BodyTimeout => Downstream::BodyTimeout,
        })
    }
}

impl ProxyError {
    /// The status the VM is answered and the counter of `c` this error adds
    /// to: the proxy's one map from errors to statuses.
    pub fn classify<'c>(&self, c: &'c ProxyCounters) -> (u16, &'c AtomicU64) {
        use Downstream as D;
        match self {
            ProxyError::Downstream(d) => match *d {
                D::Http(HttpError::Smuggling) => (400, &c.rx_smuggling),
                D::Http(e @ (HttpError::Malformed | HttpError::BadChunk)) => {
                    (e.status(), &c.rx_bad_request)
                }
                D::Http(e @ HttpError::HeadTooLarge) => (e.status(), &c.rx_head_too_large),
                D::Http(e @ HttpError::BodyTooLarge) => (e.status(), &c.rx_body_too_large),
                D::Http(e @ HttpError::MethodNotAllowed) => (e.status(), &c.rx_method_not_allowed),
                D::Http(e @ HttpError::UnsupportedTransferEncoding) => {
                    (e.status(), &c.rx_unsupported_encoding)
                }
                D::HeadTimeout => (408, &c.rx_timeout),
                D::BodyTimeout => (408, &c.rx_body_timeout),
                D::RateLimited => (429, &c.rate_limited),
                D::Token(status) => (status, &c.token_rejected),
            },
            ProxyError::Upstream(u) => match u {
                UpstreamError::Unreachable(_) | UpstreamError::Retryable => {
                    (u.status(), &c.upstream_refused)
                }
                UpstreamError::Broken(_) | UpstreamError::Unanswered => {
                    (u.status(), &c.upstream_broken)
                }
                UpstreamError::Timeout => (u.status(), &c.upstream_timeout),
            },
            ProxyError::Internal(Internal::HopLimit) => (500, &c.internal_error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::get;

    #[test]
    fn every_error_has_its_status_and_its_own_counter() {
        let cases: Vec<(ProxyError, u16)> = vec![
            (Refusal::Http(HttpError::Smuggling).into(), 400),
            (Refusal::Http(HttpError::Malformed).into(), 400),
            (Refusal::Http(HttpError::HeadTooLarge).into(), 431),
            (Refusal::Http(HttpError::BodyTooLarge).into(), 413),
            (Refusal::Http(HttpError::MethodNotAllowed).into(), 405),
            (
                Refusal::Http(HttpError::UnsupportedTransferEncoding).into(),
                501,
            ),
            (Refusal::HeadTimeout.into(), 408),
            (Refusal::BodyTimeout.into(), 408),
            (Downstream::RateLimited.into(), 429),
            (Downstream::Token(401).into(), 401),
            (UpstreamError::Unreachable("x".into()).into(), 503),
            (UpstreamError::Unanswered.into(), 502),
            (UpstreamError::Timeout.into(), 504),
            (Internal::HopLimit.into(), 500),
        ];
        let c = ProxyCounters::default();
        for (i, (e, status)) in cases.iter().enumerate() {
            let (s, counter) = e.classify(&c);
            assert_eq!(s, *status, "{e}");
            assert_eq!(get(counter), 0, "{e} shares a counter with an earlier case");
            crate::metrics::inc(counter);
            let total: u64 = {
                use crate::metrics::Snapshot;
                let snap = c.snapshot();
                (0..<crate::proxy::ProxyCounterSnapshot as Snapshot>::METRICS.len())
                    .map(|j| snap.value(j))
                    .sum()
            };
            assert_eq!(total, i as u64 + 1);
        }
    }
}
