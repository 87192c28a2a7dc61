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

use crate::http::{self, RequestHead};
use crate::log;
use crate::proxy::imdsv2::{self, Verdict};
use crate::proxy::{NsRuntime, ProxyLoop};
use crate::rt::sync::Event;
use crate::rt::{self, TcpConn};
use crate::serve::{self, Answer, Handler, Request, Server};

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

    fn head_timeout(&self, started: Instant) {
        let c = &self.ns.counters;
        c.http_request_timeouts
            .set(c.http_request_timeouts.get() + 1);
        self.log(None, 408, 0, started);
    }

    fn refused(&self, buf: &[u8], head: Option<&RequestHead>, status: u16, started: Instant) {
        self.log(head.map(|h| (buf, h)), status, 0, started);
    }

    /// The rate limit, before any work for the request.
    fn check_head(&self, buf: &[u8], head: &RequestHead, started: Instant) -> Option<u16> {
        let l = self.ctx.limiter.as_ref()?;
        if l.allow(self.ns.id, rt::peer_ip(self.peer), Instant::now()) {
            return None;
        }
        let c = &self.ns.counters;
        c.rate_limited.set(c.rate_limited.get() + 1);
        self.log(Some((buf, head)), 429, 0, started);
        Some(429)
    }

    async fn answer(&self, conn: &TcpConn, req: &Request<'_>, w: &mut Vec<u8>) -> Answer {
        let (ctx, ns, peer) = (&*self.ctx, &*self.ns, self.peer);
        let (buf, head, started) = (req.buf, req.head, req.started);
        // IMDSv2: the token endpoint is answered here; tokens are checked here.
        match token_verdict(ctx, ns, peer, buf, head) {
            Verdict::Relay => {}
            Verdict::Reject(status) => {
                let c = &ns.counters;
                c.token_rejected.set(c.token_rejected.get() + 1);
                self.log(Some((buf, head)), status, 0, started);
                return Answer::Reject(status);
            }
            Verdict::Issue { token, ttl } => {
                let c = &ns.counters;
                c.tokens_issued.set(c.tokens_issued.get() + 1);
                // The answer must not survive more than `hop_limit` hops (AWS's
                // HttpPutResponseHopLimit): a container behind the VM cannot steal it.
                if let Err(e) = rt::set_ip_ttl(conn, ctx.cfg.hop_limit) {
                    log::warn(format_args!(
                        "{}: cannot set IP TTL for a token response: {e}",
                        ns.cfg.name
                    ));
                    return Answer::Reject(500);
                }
                let keep = head.keep_alive && !ns.closing.is_set();
                w.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-aws-ec2-metadata-token-ttl-seconds: ");
                w.extend_from_slice(ttl.to_string().as_bytes());
                w.extend_from_slice(b"\r\nContent-Length: ");
                w.extend_from_slice(token.len().to_string().as_bytes());
                w.extend_from_slice(if keep {
                    b"\r\n\r\n" as &[u8]
                } else {
                    b"\r\nConnection: close\r\n\r\n"
                });
                if !req.is_head() {
                    w.extend_from_slice(token.as_bytes());
                }
                self.log(Some((buf, head)), 200, token.len(), started);
                return Answer::Write { keep };
            }
        }

        // Rewrite and relay.
        let mut out = ctx.server.take_buf();
        upstream_head(buf, head, peer.ip(), &ns.cfg.identity, &mut out);
        out.extend_from_slice(req.body);
        ns.counters.requests.set(ns.counters.requests.get() + 1);
        let resp = match ctx.pool.request(out, head.method).await {
            Ok(r) => r,
            Err(e) => {
                let c = &ns.counters;
                c.upstream_errors.set(c.upstream_errors.get() + 1);
                log::debug(format_args!("{}: request from {peer}: {e}", ns.cfg.name));
                self.log(Some((buf, head)), e.status(), 0, started);
                return Answer::Reject(e.status());
            }
        };

        // Keep the client only if both sides allow it.
        let keep = head.keep_alive && !resp.until_close && !ns.closing.is_set();
        http::write_response_head(&resp.bytes, &resp.head, !keep, w);
        w.extend_from_slice(resp.body());
        self.log(
            Some((buf, head)),
            resp.head.status,
            resp.body().len(),
            started,
        );
        Answer::Write { keep }
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
/// namespace's router or network id.
pub fn upstream_head(
    buf: &[u8],
    head: &RequestHead,
    peer: std::net::IpAddr,
    id: &crate::proxy::config::NsIdentity,
    out: &mut Vec<u8>,
) {
    http::rewrite_proxy_request(
        buf,
        head,
        peer,
        id.header_name().as_bytes(),
        id.id().as_bytes(),
        out,
    );
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
