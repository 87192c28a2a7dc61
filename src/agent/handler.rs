//! One agent request, as one straight path (spec §3):
//! 1. [`identity::parse_identity`] → 400 with its message on any ambiguity;
//! 2. (scope, key) → the loop's [`crate::agent::resolve::Resolver`] (the
//!    inventory through its cache, or the Neutron resolver); zero or several ports → 404
//!    with Neutron's era-C page ("Instance was not found on network X.");
//!    Neutron failing → 503 (cache hits are still served);
//! 3. sign the instance id, forward method, target and body to the API with
//!    exactly `Host`, `X-Forwarded-For` (the raw value), `X-Instance-ID`,
//!    `X-Tenant-ID`, `X-Instance-ID-Signature`, `Content-Length` when there
//!    is a body, and `X-aws-ec2-metadata-token` when the guest sent one;
//! 4. relay 200/400/403/404/409/500/502/503/504 with the API's headers and
//!    body (Content-Length recomputed, chunking removed); anything else →
//!    500; API unreachable → 503; too slow → 504. A 404 for a mapping that
//!    came from the cache invalidates it and retries once with a fresh
//!    lookup (what Neutron's ML2/OVS agent did, spec §3.3).
//!
//! Our own error pages use Neutron's era-C body bytes but CRLF heads and no
//! `Connection: close`: a well-framed request that resolved to "not found"
//! leaves the connection in a good state, and closing it would cost the
//! proxy's pool a reconnect (it switches to one connection per request only
//! after several successful answers that close, never after an error page).
//! After a HEAD every page has the same head and no body
//! ([`http::write_answer`]): the proxy does not read a body after a HEAD, so
//! one would become the start of the next VM's answer on that pooled
//! connection.
//!
//! The same path serves a request read from the agent's socket
//! ([`super::conn`]) and one handed over in-process by a proxy loop
//! ([`respond_in_process`]: `metaproxy up` and `metaproxy ovn`).
//!
//! The request to the API is written by [`forward::write_api_request`] from
//! a [`Resolved`], whose ids were parsed where the backend returned them: a
//! tenant's `device_id` cannot put a byte into the head that an id may not
//! have.

use std::rc::Rc;
use std::time::Instant;

use smallvec::SmallVec;

use crate::agent::daemon::AgentLoop;
use crate::agent::forward::{self, ApiResponse, ForwardError, GuestRequest};
use crate::agent::identity::{self, Identity, Scope};
use crate::agent::link::{ApiLink, Link};
use crate::agent::metrics::inc;
use crate::agent::neutron::BackendError;
use crate::agent::resolve::Resolved;
use crate::http::write::{put_content_length, put_status_line, CONNECTION, TEXT_PLAIN};
use crate::http::{
    self, HeaderName, HeaderValue, Method, RequestBody, RequestHead, WholeRequestError,
};
use crate::log;
use crate::serve::Refusal;

/// Statuses of the API relayed as they are (Neutron era C's list); others → 500.
const RELAYED: [u16; 9] = [200, 400, 403, 404, 409, 500, 502, 503, 504];
/// The guest's IMDSv2-style token header, passed through when present.
const HEADER_TOKEN: &str = "X-aws-ec2-metadata-token";

/// The 500 page's message.
pub(super) const MSG_UNKNOWN: &str =
    "An unknown error has occurred. Please try your request again.";
const MSG_UNAVAILABLE: &str =
    "The remote metadata server is temporarily unavailable. Please try again later.";
const MSG_TIMEOUT: &str =
    "The remote metadata server did not answer in time. Please try again later.";
const MSG_BROKEN: &str = "The remote metadata server sent a broken response.";
const MSG_BACKEND: &str =
    "The instance could not be looked up: Neutron is temporarily unavailable. Please try again later.";

/// What the access log says about one answer: who asked through what, and
/// which instance that resolved to (`None`: not found, or never resolved).
#[derive(Default)]
struct Trace {
    /// The status answered.
    status: u16,
    id: Option<Identity>,
    resolved: Option<Rc<Resolved>>,
    cached: bool,
}

/// Answer one request read whole (`request`: its head and raw body;
/// `decoded`: a chunked body's payload): resolve, sign, forward, relay,
/// count its status, log it. Runs on its own task (see [`super::conn`]).
pub(super) async fn respond<L: Link>(
    ctx: &AgentLoop,
    link: &L,
    request: &[u8],
    head: &RequestHead,
    decoded: &[u8],
    close: bool,
) -> Vec<u8> {
    let mut out = ctx.server.take_buf();
    let started = ctx.cfg.access_log.then(Instant::now);
    let body = body_of(request, head, decoded);
    let trace = answer(ctx, link, request, head, body, close, &mut out).await;
    answered(ctx, request, head, &trace, started);
    out
}

/// The body the API gets: the raw bytes after the head, or a chunked
/// body's decoded payload.
fn body_of<'a>(request: &'a [u8], head: &RequestHead, decoded: &'a [u8]) -> &'a [u8] {
    match head.body {
        RequestBody::Chunked => decoded,
        _ => &request[head.head_len..],
    }
}

/// Count the answer's status and write its access-log line (`started`:
/// when the request began, read only with the access log on, so the clock
/// is not read per request for nothing). (Not folded into a wrapper `async
/// fn` around [`answer`]: one more future layer per request on the socket
/// path.)
fn answered(
    ctx: &AgentLoop,
    request: &[u8],
    head: &RequestHead,
    trace: &Trace,
    started: Option<Instant>,
) {
    ctx.m.response(trace.status);
    if let Some(started) = started {
        access(request, head, trace, started);
    }
}

/// What the agent stage made of a request handed to it in-process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InProcessAnswer {
    /// The whole answer was appended to `out`: its status and body bytes.
    Answered {
        /// The status answered.
        status: u16,
        /// Body bytes (0 after a HEAD).
        body_bytes: usize,
    },
    /// The request broke one of the agent's limits before it was resolved
    /// (the proxy's own are checked first; these are `[agent.limits]`):
    /// answer this status's canned page and close, as the agent's
    /// connection would.
    Refused(u16),
}

/// The agent stage run by a proxy loop on its own thread (`metaproxy ovn`,
/// `metaproxy up`): `request` is exactly what the proxy would have written
/// to the agent's socket (the rewritten head with `X-Forwarded-For` and
/// the router or network id, then the body as the guest framed it). It is
/// parsed again with the agent's limits, so identity, limits, statuses,
/// pages, counters and access log lines are the agent's own, byte for
/// byte; then the socket path's handler runs with `close` (the proxy's decision
/// for the guest's connection) and the answer is appended to `out`.
pub async fn respond_in_process(
    ctx: &AgentLoop,
    request: &[u8],
    close: bool,
    out: &mut Vec<u8>,
) -> InProcessAnswer {
    let mut decoded = Vec::new();
    let (head, body) = match http::parse_whole_request(request, &ctx.cfg.limits, &mut decoded) {
        Ok(whole) => whole,
        Err(WholeRequestError::Head(e) | WholeRequestError::Body(e, _)) => {
            return refused(ctx, Refusal::Http(e))
        }
        // Shorter than its framing says: the agent's connection would
        // still be waiting for the rest, until its body timeout.
        Err(WholeRequestError::Incomplete(_)) => return refused(ctx, Refusal::BodyTimeout),
    };
    inc(&ctx.m.requests);
    let start = out.len();
    let started = ctx.cfg.access_log.then(Instant::now);
    let trace = match &ctx.pool {
        ApiLink::Pool(link) => answer(ctx, &**link, request, &head, body, close, out).await,
        ApiLink::InProcess(link) => answer(ctx, &**link, request, &head, body, close, out).await,
    };
    answered(ctx, request, &head, &trace, started);
    let status = trace.status;
    let answer = &out[start..];
    let head_len = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(answer.len(), |p| p + 4);
    InProcessAnswer::Answered {
        status,
        body_bytes: answer.len() - head_len,
    }
}

/// A request the agent's connection would have refused: counted as there.
fn refused(ctx: &AgentLoop, why: Refusal) -> InProcessAnswer {
    InProcessAnswer::Refused(super::conn::refused(&ctx.m, why))
}

/// Build the whole response to one parsed request into `out`, forwarding
/// through `link`.
async fn answer<L: Link>(
    ctx: &AgentLoop,
    link: &L,
    buf: &[u8],
    head: &RequestHead,
    body: &[u8],
    close: bool,
    out: &mut Vec<u8>,
) -> Trace {
    let c = &*ctx.m;
    let is_head = head.method == Method::Head;
    let id = match identity::parse_identity(|name| {
        head.headers
            .iter()
            .filter(|h| h.name.get(buf).eq_ignore_ascii_case(name.as_bytes()))
            .map(|h| h.value.get(buf))
            .collect::<SmallVec<[&[u8]; 2]>>()
    }) {
        Ok(id) => id,
        Err(e) => {
            inc(&c.bad_requests);
            log::debug(format_args!("400: {e}"));
            page(400, &e.message(), is_head, close, out);
            return Trace {
                status: 400,
                ..Trace::default()
            };
        }
    };
    let (mut resolved, mut cached) = match ctx.resolver.lookup(&id, false).await {
        Ok(r) => r,
        Err(e) => return backend_failed(ctx, id, &e, is_head, close, out),
    };
    let mut retried = false;
    let status;
    let guest = GuestRequest {
        method: head.method,
        target: head.target.get(buf),
        token: head.header(buf, HEADER_TOKEN),
        body,
    };
    loop {
        let Some(r) = resolved.as_deref() else {
            inc(&c.not_found);
            let msg = match &id.scope {
                Scope::Network(n) => format!("Instance was not found on network {n}."),
                Scope::Router(r) => format!("Instance was not found on router {r}."),
            };
            page(404, &msg, is_head, close, out);
            return Trace {
                status: 404,
                id: Some(id),
                resolved: None,
                cached,
            };
        };
        let mut req = ctx.server.take_buf();
        if let Err(e) =
            forward::write_api_request(&mut req, &guest, &ctx.host_header, &id, r, &ctx.signer)
        {
            ctx.server.put_buf(req);
            inc(&c.bad_requests);
            log::debug(format_args!("400: request not forwardable: {e}"));
            page(400, "The request cannot be forwarded.", is_head, close, out);
            return Trace {
                status: 400,
                id: Some(id),
                resolved,
                cached,
            };
        }
        inc(&c.forwarded);
        let started = Instant::now();
        let result = link.request(&req, is_head).await;
        c.forward_latency(started.elapsed());
        ctx.server.put_buf(req);
        match result {
            Ok(resp) if resp.head.status == 404 && cached && !retried => {
                // The instance may have moved or been replaced since we cached it.
                retried = true;
                inc(&c.retried_after_404);
                (resolved, cached) = match ctx.resolver.lookup(&id, true).await {
                    Ok(r) => r,
                    Err(e) => return backend_failed(ctx, id, &e, is_head, close, out),
                };
            }
            Ok(resp) => {
                let relayed = resp.head.status;
                if relayed == 403 {
                    ctx.forbidden_hint();
                }
                if RELAYED.contains(&relayed) {
                    relay(&resp, is_head, close, out);
                    link.recycle(resp.bytes);
                    status = relayed;
                } else {
                    inc(&c.api_errors);
                    log::warn(format_args!(
                        "metadata API answered unexpected status {relayed}; answering 500"
                    ));
                    page(500, MSG_UNKNOWN, is_head, close, out);
                    status = 500;
                }
                break;
            }
            Err(e) => {
                inc(&c.api_errors);
                log::debug(format_args!("forward for {}: {e}", id.xff));
                let msg = match e {
                    ForwardError::Unreachable(_) => MSG_UNAVAILABLE,
                    ForwardError::Timeout => MSG_TIMEOUT,
                    ForwardError::Broken(_) => MSG_BROKEN,
                };
                status = e.status();
                page(status, msg, is_head, close, out);
                break;
            }
        }
    }
    Trace {
        status,
        id: Some(id),
        resolved,
        cached,
    }
}

/// One access-log line: the guest (`X-Forwarded-For`), the router or
/// network it came through, the instance and project it resolved to (`-`
/// when none) and whether from the cache, then the request line, status and
/// time. Never a header value: the signature and tokens travel in headers.
fn access(buf: &[u8], head: &RequestHead, trace: &Trace, started: Instant) {
    let status = trace.status;
    let t = head.target.get(buf);
    let target = http::loggable_target(t);
    let (client, scope) = match &trace.id {
        Some(id) => (
            id.xff.escape_default().to_string(),
            match &id.scope {
                Scope::Router(r) => format!("router {r}"),
                Scope::Network(n) => format!("network {n}"),
            },
        ),
        None => ("-".to_string(), "-".to_string()),
    };
    let instance = match &trace.resolved {
        Some(r) => format!(
            "instance {} project {} ({})",
            r.instance,
            r.project,
            if trace.cached { "cached" } else { "looked up" }
        ),
        None => "no instance".to_string(),
    };
    log::access(format_args!(
        "{client} via {scope} -> {instance} \"{} {target}\" {status} {:.1}ms",
        head.method.as_str(),
        started.elapsed().as_secs_f64() * 1000.0
    ));
}

/// Neutron (or Keystone) failed: 503, and what the access log says of it.
fn backend_failed(
    ctx: &AgentLoop,
    id: Identity,
    e: &BackendError,
    is_head: bool,
    close: bool,
    out: &mut Vec<u8>,
) -> Trace {
    inc(&ctx.m.backend_unavailable);
    log::warn(format_args!(
        "cannot resolve {} on {:?}: {e}",
        id.xff, id.scope
    ));
    page(503, MSG_BACKEND, is_head, close, out);
    Trace {
        status: 503,
        id: Some(id),
        ..Trace::default()
    }
}

/// The API's response for the guest: its status, reason and headers, with
/// the connection headers and framing replaced by ours. A field of the
/// API's that would not make a well-formed head is dropped.
fn relay(resp: &ApiResponse, is_head: bool, close: bool, out: &mut Vec<u8>) {
    let h = &resp.head;
    let b = &resp.bytes;
    let reason = HeaderValue::new(h.reason.get(b))
        .ok()
        .filter(|r| !r.as_bytes().is_empty())
        .unwrap_or(HeaderValue::from_static(http::reason(h.status)));
    put_status_line(out, h.status, reason);
    for hs in &h.headers {
        let name = hs.name.get(b);
        let drop = [
            "connection",
            "keep-alive",
            "proxy-connection",
            "transfer-encoding",
        ]
        .iter()
        .any(|d| name.eq_ignore_ascii_case(d.as_bytes()))
            || (!is_head && name.eq_ignore_ascii_case(b"content-length"));
        if drop {
            continue;
        }
        if let (Ok(n), Ok(v)) = (HeaderName::new(name), HeaderValue::new(hs.value.get(b))) {
            http::put_header(out, n, v);
        }
    }
    let payload = if is_head {
        std::borrow::Cow::Borrowed(&[][..])
    } else {
        resp.payload_ref()
    };
    if !is_head {
        put_content_length(out, payload.len() as u64);
    }
    if close {
        http::put_header(out, CONNECTION, HeaderValue::from_static("close"));
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&payload);
}

/// Neutron era C's error page (`neutron/common/metadata.py`): same body
/// bytes (LF line endings, N = 95 + 2·len(title) + len(message)), CRLF head.
/// After a HEAD, the same head and no body ([`http::write_answer`]).
pub fn page(status: u16, message: &str, is_head: bool, close: bool, out: &mut Vec<u8>) {
    let title = format!("{status} {}", http::reason(status));
    let body = format!(
        "<html>\n <head>\n  <title>{title}</title>\n </head>\n <body>\n  <h1>{title}</h1>\n  {message}<br /><br />\n\n\n </body>\n</html>"
    );
    http::write_answer(out, status, TEXT_PLAIN, body.as_bytes(), is_head, close);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_page_matches_neutron_length_formula() {
        let msg = "Instance was not found on network abc.";
        let mut out = Vec::new();
        page(404, msg, false, false, &mut out);
        let text = String::from_utf8(out).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let title = "404 Not Found";
        assert_eq!(body.len(), 95 + 2 * title.len() + msg.len());
        assert!(head.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(!head.contains("Connection"));
        assert!(body.contains(&format!("  {msg}<br /><br />\n\n\n </body>\n</html>")));
    }

    #[test]
    fn error_pages_after_head_have_the_head_and_no_body() {
        for status in [400, 404, 500, 502, 503, 504] {
            let mut get = Vec::new();
            page(status, "m", false, false, &mut get);
            let mut head = Vec::new();
            page(status, "m", true, false, &mut head);
            assert!(get.starts_with(&head), "{status}: same head");
            assert!(head.ends_with(b"\r\n\r\n"), "{status}: no body");
            assert!(get.len() > head.len());
        }
    }
}
