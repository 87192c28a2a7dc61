//! One VM connection, the proxy's [`Handler`] on the connection engine
//! ([`crate::serve::engine`]): rate-limit the head, answer the IMDSv2 token
//! endpoint or check its token, rewrite the trust headers, relay through
//! the upstream pool, frame the answer back. The engine reads the request
//! and writes the answer; keep-alive, pipelining and every deadline are its.
//! Timeouts are haproxy's, bounded with [`crate::rt::with_deadline`], which
//! cancels the IO on expiry:
//! - `http_request`: from the first byte of a request (or accept) to its complete head;
//! - `keep_alive`: idle time between requests;
//! - `client`: each body read and each response write;
//! - `server`: inside the pool, from sending to the response.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use crate::agent::daemon::AgentLoop;
use crate::agent::handler::{self, InProcessAnswer};
use crate::http::{self, RequestHead};
use crate::log;
use crate::metrics::inc;
use crate::proxy::error::{Downstream, Internal, ProxyError};
use crate::proxy::imdsv2::{self, Verdict};
use crate::proxy::upstream::Upstream;
use crate::proxy::{NsRuntime, ProxyLoop};
use crate::rt::sync::Event;
use crate::rt::{self, TcpConn};
use crate::serve::{self, Answer, Handler, Refusal, Request, Server};

/// One client connection of a namespace on one loop.
pub struct ProxyConn {
    /// The loop's state.
    pub ctx: Rc<ProxyLoop>,
    /// The namespace it came in on.
    pub ns: Rc<NsRuntime>,
    /// The client.
    pub peer: SocketAddr,
}

/// Serve one accepted client connection until it closes.
pub async fn serve(h: ProxyConn, conn: TcpConn, accepted: Instant) {
    let end = serve::serve_conn(&h, &conn, accepted).await;
    log::debug(format_args!(
        "{}: connection from {} ended: {end:?}",
        h.ns.cfg.name, h.peer
    ));
}

impl ProxyConn {
    /// The edge of the proxy: the status `e` is answered with, its event
    /// counted ([`ProxyError::classify`]) and the request access-logged.
    fn fail(&self, e: &ProxyError, req: Option<(&[u8], &RequestHead)>, started: Instant) -> u16 {
        let (status, counter) = e.classify(&self.ns.counters);
        inc(counter);
        self.log(req, status, 0, started);
        status
    }

    fn log(&self, req: Option<(&[u8], &RequestHead)>, status: u16, bytes: usize, started: Instant) {
        if self.ctx.cfg.access_log {
            access(&self.ns, self.peer, req, status, bytes, started);
        }
    }
}

impl Handler for ProxyConn {
    type Conn = TcpConn;

    fn server(&self) -> &Server {
        &self.ctx.server
    }

    fn stop(&self) -> &Event {
        &self.ns.closing
    }

    /// The engine's refusals: counted and logged like every other error.
    fn refused(
        &self,
        buf: &[u8],
        head: Option<&RequestHead>,
        why: Refusal,
        started: Instant,
    ) -> u16 {
        self.fail(&why.into(), head.map(|h| (buf, h)), started)
    }

    /// The rate limit, before any work for the request.
    fn check_head(&self, buf: &[u8], head: &RequestHead, started: Instant) -> Option<u16> {
        let l = self.ctx.limiter.as_ref()?;
        if l.allow(self.ns.id, rt::peer_ip(self.peer), Instant::now()) {
            return None;
        }
        let e = Downstream::RateLimited.into();
        Some(self.fail(&e, Some((buf, head)), started))
    }

    async fn answer(&self, conn: &TcpConn, req: &Request<'_>, w: &mut Vec<u8>) -> Answer {
        let (ctx, ns, peer) = (&*self.ctx, &*self.ns, self.peer);
        let (buf, head, started) = (req.buf, req.head, req.started);
        let logged = Some((buf, head));
        // IMDSv2: the token endpoint is answered here; tokens are checked here.
        match token_verdict(ctx, ns, peer, buf, head) {
            Verdict::Relay => {}
            Verdict::Reject(status) => {
                let e = Downstream::Token(status).into();
                return Answer::Reject(self.fail(&e, logged, started));
            }
            Verdict::Issue { token, ttl } => {
                // The answer must not survive more than `hop_limit` hops (AWS's
                // HttpPutResponseHopLimit): a container behind the VM cannot steal it.
                if let Err(e) = rt::set_ip_ttl(conn, ctx.cfg.hop_limit) {
                    log::warn(format_args!(
                        "{}: cannot set IP TTL for a token response: {e}",
                        ns.cfg.name
                    ));
                    let e = Internal::HopLimit.into();
                    return Answer::Reject(self.fail(&e, logged, started));
                }
                inc(&ns.counters.tokens_issued);
                let keep = head.keep_alive && !ns.closing.is_set();
                imdsv2::write_token_answer(w, &token, ttl, req.is_head(), !keep);
                self.log(logged, 200, token.len(), started);
                return Answer::Write { keep };
            }
        }

        // Rewrite and relay.
        let mut out = ctx.server.take_buf();
        if upstream_head(buf, head, peer.ip(), &ns.cfg.identity, &mut out) > 0 {
            inc(&ns.counters.rx_spoofed_header);
        }
        out.extend_from_slice(req.body);
        inc(&ns.counters.requests);
        // The socket path stays inline (no extra future layer per request
        // for the three daemons). The in-process one is boxed: inline, its
        // future (the agent's whole path) would grow this one, which every
        // request's future moves into its box: +180 memcpy instructions per
        // request on the socket path (callgrind).
        let pool = match &ctx.upstream {
            Upstream::Socket(pool) => pool,
            Upstream::InProcess(agent) => {
                return Box::pin(self.in_process(agent, out, req, w)).await;
            }
        };
        let (res, out) = pool.request(out, head.method).await;
        ctx.server.put_buf(out);
        let resp = match res {
            Ok(r) => r,
            Err(e) => {
                log::debug(format_args!("{}: request from {peer}: {e}", ns.cfg.name));
                return Answer::Reject(self.fail(&e.into(), logged, started));
            }
        };

        // Keep the client only if both sides allow it.
        let keep = head.keep_alive && !resp.until_close && !ns.closing.is_set();
        http::write_response_head(&resp.bytes, &resp.head, !keep, w);
        w.extend_from_slice(resp.body());
        self.log(logged, resp.head.status, resp.body().len(), started);
        Answer::Write { keep }
    }
}

impl ProxyConn {
    /// Run the agent stage on this loop with the rewritten request `out`:
    /// its answer is written straight into `w`, already framed for the
    /// guest (Content-Length, `Connection: close` when the guest's
    /// connection ends after it).
    async fn in_process(
        &self,
        agent: &AgentLoop,
        out: Vec<u8>,
        req: &Request<'_>,
        w: &mut Vec<u8>,
    ) -> Answer {
        let (ctx, ns) = (&*self.ctx, &*self.ns);
        let (head, started) = (req.head, req.started);
        let logged = Some((req.buf, head));
        // Decided before the answer is written, since the agent frames it;
        // a drain that starts meanwhile closes the connection at its next
        // request instead.
        let keep = head.keep_alive && !ns.closing.is_set();
        let answer = handler::respond_in_process(agent, &out, !keep, w).await;
        ctx.server.put_buf(out);
        match answer {
            InProcessAnswer::Answered { status, body_bytes } => {
                self.log(logged, status, body_bytes, started);
                Answer::Write { keep }
            }
            InProcessAnswer::Refused(status) => {
                self.log(logged, status, 0, started);
                Answer::Reject(status)
            }
        }
    }
}

/// One access-log line: namespace, client, request line (target as
/// [`http::loggable_target`]; `-` when the head never completed), status,
/// body bytes sent, time since the head's first bytes. No header is logged:
/// IMDSv2 tokens travel in headers.
fn access(
    ns: &NsRuntime,
    peer: SocketAddr,
    req: Option<(&[u8], &RequestHead)>,
    status: u16,
    bytes: usize,
    started: Instant,
) {
    let (method, target) = match req {
        Some((buf, h)) => (h.method.as_str(), http::loggable_target(h.target.get(buf))),
        None => ("-", "-".to_string()),
    };
    log::access(format_args!(
        "{} {peer} \"{method} {target}\" {status} {bytes} {:.1}ms",
        ns.cfg.name,
        started.elapsed().as_secs_f64() * 1000.0
    ));
}

/// The head sent to the agent: [`http::rewrite_proxy_request`] with this
/// namespace's router or network id. Returns how many trust headers the
/// client sent (all deleted): a spoofing attempt when not 0.
pub fn upstream_head(
    buf: &[u8],
    head: &RequestHead,
    peer: std::net::IpAddr,
    id: &crate::proxy::config::NsIdentity,
    out: &mut Vec<u8>,
) -> usize {
    http::rewrite_proxy_request(
        buf,
        head,
        peer,
        id.header_name().as_bytes(),
        id.id().as_bytes(),
        out,
    )
}

/// The IMDSv2 decision for this request.
fn token_verdict(
    ctx: &ProxyLoop,
    ns: &NsRuntime,
    peer: SocketAddr,
    buf: &[u8],
    head: &RequestHead,
) -> Verdict {
    if ctx.cfg.imdsv2 == imdsv2::Mode::Off {
        return Verdict::Relay;
    }
    let target = head.target.get(buf);
    let path = target.split(|&c| c == b'?').next().unwrap_or(target);
    let values = |names: &[&str]| -> Vec<&[u8]> {
        head.headers
            .iter()
            .filter(|h| {
                names
                    .iter()
                    .any(|n| h.name.get(buf).eq_ignore_ascii_case(n.as_bytes()))
            })
            .map(|h| h.value.get(buf))
            .collect()
    };
    let (ttl, tokens) = (values(imdsv2::TTL_HEADERS), values(imdsv2::TOKEN_HEADERS));
    let req = imdsv2::TokenRequest {
        is_put: head.method == http::Method::Put,
        path,
        has_forwarded_for: imdsv2::FORWARDING_HEADERS
            .iter()
            .any(|h| head.header_count(buf, h) > 0),
        ttl: &ttl,
        tokens: &tokens,
    };
    imdsv2::decide(
        ctx.cfg.imdsv2,
        &ctx.tokens,
        ns.cfg.identity.id(),
        rt::peer_ip(peer),
        &req,
        Instant::now(),
    )
}
