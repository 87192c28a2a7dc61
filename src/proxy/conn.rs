//! One VM connection: read a request, rewrite its trust headers, relay it
//! through the upstream pool, write the answer back; repeat while keep-alive.
//!
//! Requests pipelined by a client are answered in order because they are
//! handled one after another from the same buffer. While a connection is idle
//! between requests it owns no buffer (see [`crate::rt::TcpConn::read_idle`]).
//! Every wait is bounded by one of haproxy's timeouts via
//! [`crate::rt::with_deadline`], which cancels the IO on expiry:
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
use crate::proxy::{LoopCtx, NsRuntime};
use crate::rt::{self, TcpConn};
use crate::serve::{self, BodyError, Idle};

/// Bytes asked for per read while a request is being assembled.
const READ_CHUNK_BYTES: usize = 4096;

/// How a connection ended (for debug logs and tests of the limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Answered, nothing left unread: just close.
    Done,
    /// Answered (an error, or a final answer with more request bytes
    /// behind it): close gracefully so the answer is not lost to an RST.
    Linger,
    PeerClosed,
    Timeout,
    Stopping,
    IoError,
}

/// Serve one accepted client connection until it closes.
pub async fn serve(
    ctx: Rc<LoopCtx>,
    ns: Rc<NsRuntime>,
    conn: TcpConn,
    peer: SocketAddr,
    accepted: Instant,
) {
    let end = serve_inner(&ctx, &ns, &conn, peer, accepted).await;
    log::debug(format_args!(
        "{}: connection from {peer} ended: {end:?}",
        ns.cfg.name
    ));
    match end {
        // A clean end just closes the fd (no extra syscall for a
        // connection-per-request client like cloud-init).
        End::Done | End::PeerClosed => {}
        // Closing with unread request bytes makes the kernel send an RST,
        // which can destroy the answer we just wrote before the client reads
        // it: half-close, drain what is left for a moment, then close.
        End::Linger => serve::linger_close(&conn).await,
        // A timeout, error or drain: end any IO still queued on it now.
        End::Timeout | End::Stopping | End::IoError => conn.shutdown(),
    }
}

/// The idle loop. Its state is all an idle keep-alive connection costs, so it
/// holds only the wait itself; everything a request needs lives in
/// [`handle_request`]'s future, boxed and freed when the answer is written.
async fn serve_inner(
    ctx: &LoopCtx,
    ns: &NsRuntime,
    conn: &TcpConn,
    peer: SocketAddr,
    accepted: Instant,
) -> End {
    let t = ctx.cfg.timeouts;
    let mut buf: Vec<u8> = Vec::new();
    let mut first = true;
    loop {
        // Wait for the first bytes of the next request, holding no buffer.
        if buf.is_empty() {
            let idle_deadline = if first {
                accepted + t.http_request
            } else {
                Instant::now() + t.keep_alive
            };
            match serve::wait_for_request!(conn, buf, idle_deadline, ns.closing) {
                Idle::Request => {}
                Idle::PeerClosed => return End::PeerClosed,
                Idle::IoError => return End::IoError,
                Idle::Timeout => return End::Timeout,
                Idle::Stopping => return End::Stopping,
            }
        }
        // The head must be complete within `http_request` of its first byte
        // (of the accept, for a connection's first request).
        let head_deadline = if first {
            accepted + t.http_request
        } else {
            Instant::now() + t.http_request
        };
        first = false;
        match Box::pin(handle_request(ctx, ns, conn, peer, &mut buf, head_deadline)).await {
            Ok(()) => {}
            Err(end) => return end,
        }
        if buf.is_empty() {
            buf = Vec::new(); // release the capacity while idle
        }
    }
}

/// Read one request (its first bytes are in `buf`), relay it and answer.
/// `Ok` keeps the connection; pipelined bytes that followed stay in `buf`.
async fn handle_request(
    ctx: &LoopCtx,
    ns: &NsRuntime,
    conn: &TcpConn,
    peer: SocketAddr,
    buf: &mut Vec<u8>,
    head_deadline: Instant,
) -> Result<(), End> {
    let cfg = &ctx.cfg;
    let started = Instant::now();
    let log = |req: Option<&RequestHead>, buf: &[u8], status: u16, bytes: usize| {
        if cfg.access_log {
            access(ns, peer, req.map(|h| (buf, h)), status, bytes, started);
        }
    };
    // 1. Complete the head.
    let head = loop {
        match http::parse_request(buf, &cfg.limits) {
            Ok(Some(h)) => break h,
            Ok(None) => {}
            Err(e) => {
                log(None, buf, e.status(), 0);
                return Err(reject(ctx, conn, e.status(), false).await);
            }
        }
        let taken = std::mem::take(buf);
        let (res, b) =
            match rt::with_deadline(head_deadline, conn.read_append(taken, READ_CHUNK_BYTES)).await
            {
                Ok(r) => r,
                Err(rt::Elapsed) => {
                    ns.counters
                        .http_request_timeouts
                        .set(ns.counters.http_request_timeouts.get() + 1);
                    log(None, &[], 408, 0);
                    return Err(reject(ctx, conn, 408, false).await);
                }
            };
        *buf = b;
        match res {
            Ok(0) => return Err(End::PeerClosed),
            Ok(_) => {}
            Err(_) => return Err(End::IoError),
        }
    };

    // 2. Rate limit before any work for the request.
    if let Some(l) = &ctx.limiter {
        if !l.allow(ns.id, rt::peer_ip(peer), Instant::now()) {
            ns.counters
                .rate_limited
                .set(ns.counters.rate_limited.get() + 1);
            log(Some(&head), buf, 429, 0);
            return Err(reject(ctx, conn, 429, head.method == http::Method::Head).await);
        }
    }

    // 3. The body (bounded by limits.max_body_bytes inside the parser/scanner).
    let limits = &ctx.cfg.limits;
    let body_end = match serve::read_body(
        conn,
        buf,
        &head,
        limits.max_body_bytes,
        ctx.cfg.timeouts.client,
        None,
    )
    .await
    {
        Ok(end) => end,
        Err(BodyError::Status(s)) => {
            log(Some(&head), buf, s, 0);
            return Err(reject(ctx, conn, s, head.method == http::Method::Head).await);
        }
        Err(BodyError::Gone) => return Err(End::PeerClosed),
    };

    // 4. IMDSv2: the token endpoint is answered here; tokens are checked here.
    match token_verdict(ctx, ns, peer, buf, &head) {
        Verdict::Relay => {}
        Verdict::Reject(status) => {
            ns.counters
                .token_rejected
                .set(ns.counters.token_rejected.get() + 1);
            log(Some(&head), buf, status, 0);
            return Err(reject(ctx, conn, status, head.method == http::Method::Head).await);
        }
        Verdict::Issue { token, ttl } => {
            ns.counters
                .tokens_issued
                .set(ns.counters.tokens_issued.get() + 1);
            // The answer must not survive more than `hop_limit` hops (AWS's
            // HttpPutResponseHopLimit): a container behind the VM cannot steal it.
            if let Err(e) = rt::set_ip_ttl(conn, ctx.cfg.hop_limit) {
                log::warn(format_args!(
                    "{}: cannot set IP TTL for a token response: {e}",
                    ns.cfg.name
                ));
                return Err(reject(ctx, conn, 500, head.method == http::Method::Head).await);
            }
            let keep = head.keep_alive && !ns.closing.is_set();
            let mut w = ctx.take_buf();
            w.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-aws-ec2-metadata-token-ttl-seconds: ");
            w.extend_from_slice(ttl.to_string().as_bytes());
            w.extend_from_slice(b"\r\nContent-Length: ");
            w.extend_from_slice(token.len().to_string().as_bytes());
            w.extend_from_slice(if keep {
                b"\r\n\r\n" as &[u8]
            } else {
                b"\r\nConnection: close\r\n\r\n"
            });
            if head.method != http::Method::Head {
                w.extend_from_slice(token.as_bytes());
            }
            log(Some(&head), buf, 200, token.len());
            return finish(ctx, conn, buf, body_end, w, keep).await;
        }
    }

    // 5. Rewrite and relay.
    let mut out = ctx.take_buf();
    upstream_head(buf, &head, peer.ip(), &ns.cfg.identity, &mut out);
    out.extend_from_slice(&buf[head.head_len..body_end]);
    ns.counters.requests.set(ns.counters.requests.get() + 1);
    let resp = match ctx.pool.request(out, head.method).await {
        Ok(r) => r,
        Err(e) => {
            ns.counters
                .upstream_errors
                .set(ns.counters.upstream_errors.get() + 1);
            log::debug(format_args!("{}: request from {peer}: {e}", ns.cfg.name));
            log(Some(&head), buf, e.status(), 0);
            return Err(reject(ctx, conn, e.status(), head.method == http::Method::Head).await);
        }
    };

    // 6. Answer. Keep the client only if both sides allow it.
    let keep = head.keep_alive && !resp.until_close && !ns.closing.is_set();
    let mut w = ctx.take_buf();
    http::write_response_head(&resp.bytes, &resp.head, !keep, &mut w);
    w.extend_from_slice(resp.body());
    log(Some(&head), buf, resp.head.status, resp.body().len());
    finish(ctx, conn, buf, body_end, w, keep).await
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

/// Write a response; on success drop the answered request from `buf`,
/// keeping any pipelined bytes after it.
async fn finish(
    ctx: &LoopCtx,
    conn: &TcpConn,
    buf: &mut Vec<u8>,
    body_end: usize,
    w: Vec<u8>,
    keep: bool,
) -> Result<(), End> {
    match rt::with_deadline(Instant::now() + ctx.cfg.timeouts.client, conn.write_all(w)).await {
        Ok((Ok(()), b)) => ctx.put_buf(b),
        Ok((Err(_), _)) => return Err(End::IoError),
        Err(rt::Elapsed) => return Err(End::Timeout),
    }
    if !keep {
        return Err(if buf.len() > body_end {
            End::Linger
        } else {
            End::Done
        });
    }
    buf.drain(..body_end);
    Ok(())
}

/// The IMDSv2 decision for this request.
fn token_verdict(
    ctx: &LoopCtx,
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

/// Send a canned error (framed for a HEAD when `is_head`) and end the connection.
async fn reject(ctx: &LoopCtx, conn: &TcpConn, status: u16, is_head: bool) -> End {
    let _ = rt::with_deadline(
        Instant::now() + ctx.cfg.timeouts.client,
        conn.write_static(http::canned_for(status, is_head)),
    )
    .await;
    End::Linger
}
