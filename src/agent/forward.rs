//! The per-loop client to the metadata API: a few keep-alive TCP connections.
//!
//! Neutron opens a new TCP connection per request (spec §3.4); we keep up to
//! `pool_size` connections per loop and reuse them, in one of two modes:
//!
//! - **one request in flight per connection** (the default, and what the
//!   agent's Neutron and Keystone clients use: a slow answer there would
//!   hold up every request queued behind it). A connection goes back to the
//!   idle list only when its response was fully framed by length or chunks,
//!   with no stray bytes after it, and the API did not ask to close.
//! - **pipelined** ([`Pool::pipelined`], the agent's pool to the metadata
//!   API over plain TCP): up to [`PIPELINE_DEPTH`] requests in flight on
//!   each connection. Each connection has a writer task (every request
//!   queued since its last write goes out in one write) and a reader task
//!   (it frames the answers and hands each, whole, to the oldest request in
//!   flight: HTTP/1.1 answers in order). A request joins a connection
//!   whose writer has not yet taken its queue (the requests of one loop
//!   turn, what one read from the proxy delivered, go out as one write;
//!   spread over idle connections they cost the API a read and a write
//!   each), else an idle connection is used, the pool grows to `pool_size`
//!   before anything else is pipelined, then the least-loaded connection
//!   with room takes the request. This is what
//!   `proxy::upstream` does towards the agent; the API renders in
//!   microseconds and answers a batch in one write
//!   (`serve::engine::Handler::BATCH_WRITES`), so a batch from the proxy
//!   goes to the API as one write and comes back as one read (issue 13,
//!   lever 2; BENCHMARKS.md). Over TLS the pool stays one request at a time.
//!
//! Pipelined, the same rules hold per request: answers strictly in order per
//! connection; bytes that arrive while nothing is in flight, or behind the
//! answer of the last request in flight, close the connection (the request
//! whose answer they followed fails, 502); a request whose deadline passes
//! shuts its connection, because every request behind a silent answer is
//! stuck too and a late answer must not be taken for the next one's; when a
//! connection dies, a request never written or a GET/HEAD is re-sent once on
//! a new connection (if the one it was on had answered before, or the
//! connection broke on the answer of a request ahead of it: requests of one
//! turn share a write, and one broken answer must not fail its neighbours),
//! any other written request (a password POST) is answered 502 and never
//! sent twice.
//!
//! Failure rules (the statuses are the agent's, spec §3.5):
//! - a *reused* connection that fails before any response byte arrived was
//!   probably closed by the API while idle: the request is re-sent once on a
//!   fresh connection;
//! - connect refused or failing → [`ForwardError::Unreachable`] (503);
//! - no complete response within the timeout (connect included) →
//!   [`ForwardError::Timeout`] (504); the connection is dropped, which
//!   cancels its IO;
//! - a malformed or cut-off response → [`ForwardError::Broken`] (502, what
//!   haproxy answers when Neutron's agent writes nothing).
//!
//! A response must never reach the wrong request. A pooled connection on
//! which bytes arrive that no request is waiting for (a second response
//! after the one we read, whether with it or later while the connection sat
//! idle) is broken: it is closed, the request on it fails (502), and it is
//! never reused. That is what turned one smuggled request into other VMs'
//! answers (issue 11); [`write_api_request`] makes the smuggling itself
//! impossible, and this rule keeps any other desync from spreading.
//!
//! The rule is kept without a syscall: an idle pooled connection always has
//! a read posted on it (`Idle`), from the moment its response was framed.
//! Bytes that arrive while it is idle complete that read, and checkout (a
//! poll of the read, no IO) closes the connection. When the read is still
//! waiting at checkout, the request is written and the same read becomes the
//! first read of the response. The previous shape peeked (`recv(MSG_PEEK)`)
//! after every response and at every checkout: 2 of the agent's 6.8 syscalls
//! per request in a storm (BENCHMARKS.md, issue 13), and it only saw bytes
//! that had arrived by the instant of the peek.
//!
//! A request on a pooled connection allocates no buffer: the pool keeps the
//! emptied buffers of its writes and reads (two per slot, at most
//! `POOL_BUFFER_MAX_BYTES` each), and the caller hands a response's bytes
//! back with [`Pool::recycle`] once it has relayed them
//! (`tests/alloc_counts.rs` counts the agent's allocations per request).
//!
//! Response framing is [`http::frame_response`], shared with
//! `proxy::upstream`; the two clients differ only in what they buffer and
//! when they retry, and neither module reaches into the other.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::agent::identity::Identity;
use crate::agent::resolve::Resolved;
use crate::agent::tls::TlsConn;
use crate::http::write::{put_content_length, put_header, HeaderName, HeaderValue, InvalidHeader};
use crate::http::{self, ChunkedScanner, Limits, Method, ResponseBody, ResponseHead};
use crate::log;
use crate::rt::sync::oneshot::{self as reply, Replies};
use crate::rt::sync::{oneshot, Notify};
use crate::rt::{self, PendingInput, TcpConn};
use crate::sign::Signer;

/// Read size for API responses.
const READ_BYTES: usize = 16 * 1024;
/// Largest API response accepted ([`http::DEFAULT_MAX_RESPONSE_BYTES`]).
pub const MAX_RESPONSE_BYTES: u64 = crate::http::DEFAULT_MAX_RESPONSE_BYTES;
/// Largest buffer a pool keeps for reuse (a larger one is freed).
const POOL_BUFFER_MAX_BYTES: usize = 64 * 1024;
/// At most one "unsolicited bytes" warning per pool per this interval.
const UNSOLICITED_LOG_EVERY: Duration = Duration::from_secs(60);

/// Why a request to the API failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    /// The API refused or failed the connection.
    #[error("metadata API unreachable: {0}")]
    Unreachable(String),
    /// No complete response within the timeout.
    #[error("metadata API did not answer within the timeout")]
    Timeout,
    /// The response was malformed or cut off.
    #[error("metadata API response broken: {0}")]
    Broken(String),
}

impl ForwardError {
    /// The status the guest sees.
    pub fn status(&self) -> u16 {
        match self {
            ForwardError::Unreachable(_) => 503,
            ForwardError::Timeout => 504,
            ForwardError::Broken(_) => 502,
        }
    }
}

/// A whole API response.
#[derive(Debug)]
pub struct ApiResponse {
    /// Head and body bytes as received.
    pub bytes: Vec<u8>,
    /// Parsed head (offsets into `bytes`).
    pub head: ResponseHead,
}

impl ApiResponse {
    /// The body's payload, borrowed from the bytes received unless it was
    /// chunked (then de-chunked into a new buffer).
    pub fn payload_ref(&self) -> std::borrow::Cow<'_, [u8]> {
        let raw = &self.bytes[self.head.head_len..];
        match self.head.body {
            ResponseBody::None => std::borrow::Cow::Borrowed(&[]),
            ResponseBody::Chunked => std::borrow::Cow::Owned(self.payload()),
            ResponseBody::Length(_) | ResponseBody::UntilClose => std::borrow::Cow::Borrowed(raw),
        }
    }

    /// The body's payload: de-chunked if it was chunked.
    pub fn payload(&self) -> Vec<u8> {
        let raw = &self.bytes[self.head.head_len..];
        match self.head.body {
            ResponseBody::None => Vec::new(),
            ResponseBody::Chunked => {
                let mut out = Vec::with_capacity(raw.len());
                let mut sc = ChunkedScanner::new(MAX_RESPONSE_BYTES);
                // Framing already validated it; a failure here yields what decoded.
                let _ = sc.decode(raw, &mut out);
                out
            }
            ResponseBody::Length(_) | ResponseBody::UntilClose => raw.to_vec(),
        }
    }
}

/// TLS settings of a pool: the client config and the name to verify.
pub type TlsTarget = (
    Arc<rustls::ClientConfig>,
    rustls::pki_types::ServerName<'static>,
);

/// A pooled connection: plain TCP or TLS over it.
enum Conn {
    Plain(TcpConn),
    Tls(Box<TlsConn>),
}

impl Conn {
    async fn write_all(&self, data: Vec<u8>) -> (std::io::Result<()>, Vec<u8>) {
        match self {
            Conn::Plain(c) => c.write_all(data).await,
            Conn::Tls(c) => c.write_all(data).await,
        }
    }

    async fn read_append(&self, buf: Vec<u8>, max: usize) -> (std::io::Result<usize>, Vec<u8>) {
        match self {
            Conn::Plain(c) => c.read_append(buf, max).await,
            Conn::Tls(c) => c.read_append(buf, max).await,
        }
    }

    fn shutdown(&self) {
        match self {
            Conn::Plain(c) => c.shutdown(),
            Conn::Tls(c) => c.shutdown(),
        }
    }
}

/// A read in flight: its result and the buffer it read into.
type Read = Pin<Box<dyn Future<Output = (std::io::Result<usize>, Vec<u8>)>>>;

/// What became of the read posted on an idle connection.
enum Posted {
    /// Still waiting: nothing arrived.
    Waiting(Read),
    /// It completed while nothing was asked: bytes, end of stream or error.
    Done(PendingInput),
}

/// An idle pooled connection with a read posted on it, so that bytes no
/// request asked for are seen whenever they arrive, without a peek.
struct Idle {
    conn: Rc<Conn>,
    read: RefCell<Posted>,
}

impl Idle {
    /// Post the read into `buf` (an empty buffer; the op is queued on this
    /// first poll and submitted with the loop's next batch) and keep it.
    fn new(conn: Rc<Conn>, buf: Vec<u8>) -> Idle {
        let c = conn.clone();
        let read: Read = Box::pin(async move { c.read_append(buf, READ_BYTES).await });
        let idle = Idle {
            conn,
            read: RefCell::new(Posted::Waiting(read)),
        };
        idle.pending_input();
        idle
    }

    /// What arrived while idle, from the posted read's state (no syscall).
    fn pending_input(&self) -> PendingInput {
        let mut posted = self.read.borrow_mut();
        if let Posted::Waiting(read) = &mut *posted {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            if let Poll::Ready((res, _)) = read.as_mut().poll(&mut cx) {
                *posted = Posted::Done(match res {
                    Ok(0) | Err(_) => PendingInput::Closed,
                    Ok(_) => PendingInput::Bytes,
                });
            }
        }
        match &*posted {
            Posted::Waiting(_) => PendingInput::Nothing,
            Posted::Done(p) => *p,
        }
    }

    /// The connection and its still-waiting read, if nothing arrived.
    fn take(self) -> Result<(Rc<Conn>, Read), (Rc<Conn>, PendingInput)> {
        let p = self.pending_input();
        match self.read.into_inner() {
            Posted::Waiting(read) => Ok((self.conn, read)),
            Posted::Done(_) => Err((self.conn, p)),
        }
    }
}

/// Requests in flight on one pipelined connection at most
/// ([`Pool::pipelined`]): 8 keeps the latency a request can queue behind
/// others to 7 API renders (microseconds each) and a batch from the
/// agent's socket in one write; the pool then holds up to `pool_size` × 8
/// exchanges.
pub const PIPELINE_DEPTH: usize = 8;

type Reply = reply::Sender<Result<ApiResponse, Attempt>>;

/// A request handed to a pipelined connection, waiting for its answer.
struct Pending {
    is_head: bool,
    /// GET or HEAD: may be re-sent after its bytes were written.
    idempotent: bool,
    reply: Reply,
}

/// One pipelined connection: a writer task writes every queued request in
/// one write, a reader task frames the answers and hands each to the
/// request at the head of `in_flight` (HTTP/1.1 answers in order).
struct Pipe {
    /// Set once connected (requests queue while it connects).
    conn: std::cell::OnceCell<Conn>,
    /// Bytes of the `queued` requests, in order, for the writer's next write.
    outbox: RefCell<Vec<u8>>,
    /// Requests not yet taken by the writer (never written).
    queued: RefCell<VecDeque<Pending>>,
    /// Requests written (or being written), oldest first: the next answer
    /// is the front's.
    in_flight: RefCell<VecDeque<Pending>>,
    wake_writer: Notify,
    /// The writer is in a write: what queues now waits for it to finish.
    writing: Cell<bool>,
    dead: Cell<bool>,
    /// Answers delivered on it (a connection that answered before may have
    /// been closed by the API while idle: its requests are re-sent).
    answered: Cell<u64>,
}

impl Pipe {
    fn load(&self) -> usize {
        self.queued.borrow().len() + self.in_flight.borrow().len()
    }

    /// Mark dead, shut the socket and fail every request not answered: the
    /// front with `first` when given (its answer was the broken one, and a
    /// GET or HEAD behind it is [`Attempt::Behind`]); a request never
    /// written, or a GET or HEAD, as retryable; any other written one (a
    /// password POST) as broken, never re-sent (the API may have acted on
    /// it).
    fn kill(&self, first: Option<ForwardError>) {
        if self.dead.replace(true) {
            return;
        }
        if let Some(c) = self.conn.get() {
            c.shutdown();
        }
        let behind = first.is_some();
        let mut first = first;
        let in_flight: Vec<Pending> = self.in_flight.borrow_mut().drain(..).collect();
        for p in in_flight {
            let e = match first.take() {
                Some(e) => Attempt::Fatal(e),
                None if p.idempotent && behind => Attempt::Behind,
                None if p.idempotent => Attempt::Retryable,
                None => Attempt::Fatal(ForwardError::Broken(
                    "connection lost after the request was sent".into(),
                )),
            };
            let _ = p.reply.send(Err(e));
        }
        let queued: Vec<Pending> = self.queued.borrow_mut().drain(..).collect();
        for p in queued {
            let _ = p.reply.send(Err(Attempt::Retryable));
        }
        self.outbox.borrow_mut().clear();
        self.wake_writer.notify();
    }

    /// The connection could not be opened: every request on it fails so.
    fn unreachable(&self, why: &str) {
        if self.dead.replace(true) {
            return;
        }
        let queued: Vec<Pending> = self.queued.borrow_mut().drain(..).collect();
        for p in queued {
            let e = ForwardError::Unreachable(why.to_string());
            let _ = p.reply.send(Err(Attempt::Fatal(e)));
        }
        self.outbox.borrow_mut().clear();
        self.wake_writer.notify();
    }
}

/// Shuts a pipelined connection if the request waiting on it is dropped (its
/// deadline passed): every request behind a silent answer is stuck too, and
/// an answer that comes late must not be read as the next one's.
struct KillOnDrop(Option<Rc<Pipe>>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            p.kill(None);
        }
    }
}

/// Connect `pipe`, start its reader, then write every queued request in
/// one write, batch after batch.
async fn pipe_writer(pipe: Rc<Pipe>, shared: Rc<Shared>) {
    let tcp = match TcpConn::connect(shared.addr, None).await {
        Ok(c) => c,
        Err(e) => {
            if !shared.down_logged.replace(true) {
                log::error(format_args!(
                    "{} at {} unreachable: {e}; answering 503 until it is back",
                    shared.what, shared.addr
                ));
            }
            pipe.unreachable(&e.to_string());
            return;
        }
    };
    if shared.down_logged.replace(false) {
        log::info(format_args!(
            "{} at {} reachable again",
            shared.what, shared.addr
        ));
    }
    if pipe.dead.get() || pipe.conn.set(Conn::Plain(tcp)).is_err() {
        return;
    }
    rt::spawn(pipe_reader(pipe.clone(), shared));
    let Some(conn) = pipe.conn.get() else { return };
    let mut out: Vec<u8> = Vec::new();
    loop {
        if pipe.dead.get() {
            return;
        }
        if pipe.queued.borrow().is_empty() {
            pipe.wake_writer.notified().await;
            continue;
        }
        out.clear();
        std::mem::swap(&mut *pipe.outbox.borrow_mut(), &mut out);
        {
            // Invariant: a request enters `in_flight` in the order its
            // bytes enter the socket, so the reader matches FIFO.
            let mut q = pipe.queued.borrow_mut();
            let mut f = pipe.in_flight.borrow_mut();
            f.extend(q.drain(..));
        }
        pipe.writing.set(true);
        let (res, back) = conn.write_all(out).await;
        pipe.writing.set(false);
        out = back;
        if res.is_err() {
            pipe.kill(None);
            return;
        }
    }
}

/// Frame the answers on `pipe` and hand them out in order. Bytes that no
/// request asked for (while nothing is in flight, or behind the answer of
/// the last request in flight) close the connection.
async fn pipe_reader(pipe: Rc<Pipe>, shared: Rc<Shared>) {
    let Some(conn) = pipe.conn.get() else { return };
    let mut buf = shared.take_buf();
    // Invariant: `buf[..pos]` is answers already handed out; the next one
    // starts at `pos`. The buffer is emptied when all of it was handed out
    // and compacted before it is read into again: once per read, not once
    // per answer (a batch of answers is not moved down once per answer).
    let mut pos = 0;
    loop {
        loop {
            let (is_head, last) = match pipe.in_flight.borrow().front() {
                Some(p) => (p.is_head, pipe.in_flight.borrow().len() == 1),
                None => break,
            };
            match frame(&buf[pos..], &shared.limits, is_head, false) {
                Ok(None) => break,
                Ok(Some((len, head))) => {
                    if last && pos + len < buf.len() {
                        shared.unsolicited();
                        pipe.kill(Some(ForwardError::Broken(
                            "bytes after the response that no request asked for".into(),
                        )));
                        shared.recycle(buf);
                        return;
                    }
                    // The whole buffer when it is exactly this answer (the
                    // usual case: one answer per read), else a copy.
                    let bytes = if pos == 0 && len == buf.len() {
                        std::mem::replace(&mut buf, shared.take_buf())
                    } else {
                        let mut b = shared.take_buf();
                        b.extend_from_slice(&buf[pos..pos + len]);
                        pos += len;
                        if pos == buf.len() {
                            buf.clear();
                            pos = 0;
                        }
                        b
                    };
                    let reusable = head.keep_alive && head.body != ResponseBody::UntilClose;
                    let p = pipe.in_flight.borrow_mut().pop_front();
                    if let Some(p) = p {
                        let _ = p.reply.send(Ok(ApiResponse { bytes, head }));
                    }
                    pipe.answered.set(pipe.answered.get() + 1);
                    if !reusable {
                        pipe.kill(None);
                        shared.recycle(buf);
                        return;
                    }
                }
                Err(why) => {
                    pipe.kill(Some(ForwardError::Broken(why)));
                    shared.recycle(buf);
                    return;
                }
            }
        }
        if pipe.dead.get() {
            shared.recycle(buf);
            return;
        }
        if pos < buf.len() && pipe.in_flight.borrow().is_empty() {
            shared.unsolicited();
            pipe.kill(None);
            shared.recycle(buf);
            return;
        }
        buf.drain(..pos);
        pos = 0;
        let (res, back) = conn.read_append(buf, READ_BYTES).await;
        buf = back;
        match res {
            Ok(0) => {
                // A close-delimited answer is complete now; anything else
                // partial is broken, and requests with nothing received
                // are failed by the rules of `Pipe::kill`.
                let front = pipe.in_flight.borrow().front().map(|p| p.is_head);
                match front {
                    Some(is_head) if !buf.is_empty() => {
                        match frame(&buf, &shared.limits, is_head, true) {
                            Ok(Some((len, head))) => {
                                buf.truncate(len);
                                let p = pipe.in_flight.borrow_mut().pop_front();
                                if let Some(p) = p {
                                    let bytes = std::mem::take(&mut buf);
                                    let _ = p.reply.send(Ok(ApiResponse { bytes, head }));
                                }
                                pipe.kill(None);
                            }
                            _ => {
                                pipe.kill(Some(ForwardError::Broken("closed mid-response".into())))
                            }
                        }
                    }
                    _ => pipe.kill(None),
                }
                shared.recycle(buf);
                return;
            }
            Ok(_) => {}
            Err(e) => {
                let first = (!buf.is_empty())
                    .then(|| ForwardError::Broken(format!("read failed mid-response: {e}")));
                pipe.kill(first);
                shared.recycle(buf);
                return;
            }
        }
    }
}

/// One attempt's failure: worth a re-send on a fresh connection, or final.
enum Attempt {
    /// Lost with its connection: re-sent once if that connection had
    /// answered before (the API may have closed it while idle).
    Retryable,
    /// A GET or HEAD pipelined behind a request whose answer was broken:
    /// the blame is that request's, so it is re-sent once on a fresh
    /// connection however new its own was (requests of one turn share a
    /// write, so one broken answer must not fail its neighbours).
    Behind,
    Fatal(ForwardError),
}

/// Per-loop pool of idle keep-alive connections to the API.
pub struct Pool {
    /// What the reader tasks of pipelined connections share with the pool.
    shared: Rc<Shared>,
    max_idle: usize,
    timeout: Duration,
    idle: RefCell<Vec<Idle>>,
    /// `Some` for HTTPS.
    tls: Option<TlsTarget>,
    /// Exchanges in progress; at most `max_idle`, so concurrent requests
    /// queue for a pooled connection instead of each opening (and closing) a
    /// fresh one. Without the cap, resolving pipelined requests concurrently
    /// doubled the agent's and the API's CPU per request in a 10 000-VM storm
    /// (connection churn) and took p99 VM completion from 14.5 s to 25 s.
    active: Cell<usize>,
    waiters: RefCell<std::collections::VecDeque<oneshot::Sender<()>>>,
    /// Requests in flight per connection at most: 1 (one at a time, the
    /// idle connections above) or, with [`Pool::pipelined`], up to
    /// [`PIPELINE_DEPTH`] on each of the `pipes`.
    depth: usize,
    /// Pipelined connections (`depth` > 1), at most `max_idle` but for a
    /// moment while one is being replaced.
    pipes: RefCell<Vec<Rc<Pipe>>>,
}

/// The part of a pool its pipelined connections' tasks use too.
struct Shared {
    /// What the peer is, for logs ("metadata API", "Neutron").
    what: &'static str,
    addr: SocketAddr,
    limits: Limits,
    /// Buffers kept at most (two per slot).
    max_bufs: usize,
    /// Log "unreachable" once per outage, not per request.
    down_logged: Cell<bool>,
    /// Connections closed because bytes arrived that no request asked for.
    unsolicited: Cell<u64>,
    /// When that was last logged.
    unsolicited_logged: Cell<Option<Instant>>,
    /// Emptied buffers for request writes and response reads (at most
    /// `max_bufs`, each at most `POOL_BUFFER_MAX_BYTES`): a request on a
    /// pooled connection allocates none.
    bufs: RefCell<Vec<Vec<u8>>>,
    /// Recycled cells of the answers the pipelined connections' readers
    /// hand to their requests (one per request in flight at most).
    replies: Replies<Result<ApiResponse, Attempt>>,
}

impl Shared {
    fn take_buf(&self) -> Vec<u8> {
        self.bufs.borrow_mut().pop().unwrap_or_default()
    }

    fn recycle(&self, mut buf: Vec<u8>) {
        let mut bufs = self.bufs.borrow_mut();
        if bufs.len() < self.max_bufs && buf.capacity() <= POOL_BUFFER_MAX_BYTES {
            buf.clear();
            bufs.push(buf);
        }
    }

    /// Count (and log, throttled) a connection closed for unsolicited bytes.
    fn unsolicited(&self) {
        self.unsolicited.set(self.unsolicited.get() + 1);
        let now = Instant::now();
        if self
            .unsolicited_logged
            .get()
            .is_none_or(|t| now.duration_since(t) >= UNSOLICITED_LOG_EVERY)
        {
            self.unsolicited_logged.set(Some(now));
            log::warn(format_args!(
                "{} at {} sent bytes no request asked for; connection closed \
                 ({} so far)",
                self.what,
                self.addr,
                self.unsolicited.get()
            ));
        }
    }
}

/// Gives the pool slot back (to the next waiter, if any) however the
/// exchange ends, including by cancellation.
struct Slot<'a>(&'a Pool);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let pool = self.0;
        loop {
            let next = pool.waiters.borrow_mut().pop_front();
            match next {
                // The slot passes straight to a waiter still waiting.
                Some(tx) => {
                    if tx.send(()).is_ok() {
                        return;
                    }
                }
                None => {
                    pool.active.set(pool.active.get().saturating_sub(1));
                    return;
                }
            }
        }
    }
}

/// A request queued for a slot. If it is cancelled (deadline) after the slot
/// was handed to it but before it ran, the slot is passed on, not lost.
struct Waiting<'a> {
    pool: &'a Pool,
    rx: Option<oneshot::Receiver<()>>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if let Ok(Some(())) = rx.try_recv() {
                drop(Slot(self.pool));
            }
        }
    }
}

impl Pool {
    /// An empty pool; connections are opened on demand.
    pub fn new(addr: SocketAddr, max_idle: usize, timeout: Duration) -> Pool {
        Pool::named("metadata API", addr, max_idle, timeout)
    }

    /// An empty pool to `what` (named in logs).
    pub fn named(what: &'static str, addr: SocketAddr, max_idle: usize, timeout: Duration) -> Pool {
        Pool {
            shared: Rc::new(Shared {
                what,
                addr,
                limits: Limits::default(),
                max_bufs: 2 * max_idle.max(1),
                down_logged: Cell::new(false),
                unsolicited: Cell::new(0),
                unsolicited_logged: Cell::new(None),
                bufs: RefCell::new(Vec::new()),
                replies: Replies::new(max_idle.max(1) * PIPELINE_DEPTH),
            }),
            max_idle,
            timeout,
            idle: RefCell::new(Vec::new()),
            tls: None,
            active: Cell::new(0),
            waiters: RefCell::new(std::collections::VecDeque::new()),
            depth: 1,
            pipes: RefCell::new(Vec::new()),
        }
    }

    /// Pipeline up to [`PIPELINE_DEPTH`] requests on each connection (plain
    /// TCP only: over TLS the pool stays one request at a time). For a peer
    /// that answers in order and quickly, the metadata API; not for Neutron
    /// or Keystone, whose slow answers would hold up the requests behind.
    #[must_use]
    pub fn pipelined(mut self) -> Pool {
        if self.tls.is_none() {
            self.depth = PIPELINE_DEPTH;
            let slots = self.max_idle.max(1) * PIPELINE_DEPTH;
            Rc::get_mut(&mut self.shared)
                .expect("pool not yet shared")
                .max_bufs = 2 * slots;
        }
        self
    }

    /// Wait for one of the pool's `max_idle` × depth slots.
    async fn slot(&self) -> Slot<'_> {
        if self.active.get() < self.max_idle.max(1) * self.depth {
            self.active.set(self.active.get() + 1);
            return Slot(self);
        }
        let (tx, rx) = oneshot::channel();
        self.waiters.borrow_mut().push_back(tx);
        let mut waiting = Waiting {
            pool: self,
            rx: Some(rx),
        };
        if let Some(rx) = waiting.rx.as_mut() {
            // A dropped sender cannot happen while the pool lives; treat it as granted.
            let _ = rx.await;
        }
        waiting.rx = None; // granted and now owned by the Slot below
        Slot(self)
    }

    /// Speak TLS to the peer (call it before [`Pool::pipelined`]: a TLS
    /// pool is not pipelined).
    #[must_use]
    pub fn with_tls(mut self, tls: Option<TlsTarget>) -> Pool {
        if tls.is_some() && self.depth > 1 {
            self.depth = 1;
        }
        self.tls = tls;
        self
    }

    /// An empty buffer, reused if one was given back.
    fn take_buf(&self) -> Vec<u8> {
        self.shared.take_buf()
    }

    /// Give a buffer back for the pool's next request or response (the
    /// caller is done with an [`ApiResponse`]'s `bytes`, say); dropped when
    /// the pool holds enough or it is larger than `POOL_BUFFER_MAX_BYTES`.
    pub fn recycle(&self, buf: Vec<u8>) {
        self.shared.recycle(buf);
    }

    /// Idle connections held now (pipelined ones with nothing in flight
    /// included).
    pub fn idle(&self) -> usize {
        let pipes = self.pipes.borrow();
        let idle_pipes = pipes.iter().filter(|p| !p.dead.get() && p.load() == 0);
        self.idle.borrow().len() + idle_pipes.count()
    }

    /// Exchanges in progress now (at most `max_idle`).
    pub fn active(&self) -> usize {
        self.active.get()
    }

    /// Send `req` (a complete request) and wait for the whole response.
    ///
    /// # Errors
    /// See [`ForwardError`].
    pub async fn request(&self, req: &[u8], is_head: bool) -> Result<ApiResponse, ForwardError> {
        let deadline = Instant::now() + self.timeout;
        match rt::with_deadline(deadline, self.exchange(req, is_head)).await {
            Ok(r) => r,
            Err(rt::Elapsed) => Err(ForwardError::Timeout),
        }
    }

    async fn exchange(&self, req: &[u8], is_head: bool) -> Result<ApiResponse, ForwardError> {
        let _slot = self.slot().await;
        if self.depth > 1 {
            return self.exchange_pipelined(req, is_head).await;
        }
        if let Some((conn, read)) = self.checkout() {
            match self.once(conn, Some(read), req, is_head).await {
                Ok(r) => return Ok(r),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retryable | Attempt::Behind) => {
                    log::debug(format_args!(
                        "pooled connection to {} was closed; re-sending on a new one",
                        self.shared.addr
                    ));
                }
            }
        }
        let conn = match self.connect().await {
            Ok(c) => c,
            Err(e) => {
                if !self.shared.down_logged.replace(true) {
                    log::error(format_args!(
                        "{} at {} unreachable: {e}; answering 503 until it is back",
                        self.shared.what, self.shared.addr
                    ));
                }
                return Err(ForwardError::Unreachable(e.to_string()));
            }
        };
        if self.shared.down_logged.replace(false) {
            log::info(format_args!(
                "{} at {} reachable again",
                self.shared.what, self.shared.addr
            ));
        }
        match self.once(Rc::new(conn), None, req, is_head).await {
            Ok(r) => Ok(r),
            Err(Attempt::Fatal(e)) => Err(e),
            Err(Attempt::Retryable | Attempt::Behind) => Err(ForwardError::Broken(
                "connection closed before any response".into(),
            )),
        }
    }

    /// [`Pool::exchange`] on pipelined connections: an idle one first, a new
    /// one while fewer than `max_idle` are open, else the least loaded with
    /// room. A request lost because a connection that had answered before
    /// closed is re-sent once on a new one, when `Pipe::kill`'s rules allow.
    async fn exchange_pipelined(
        &self,
        req: &[u8],
        is_head: bool,
    ) -> Result<ApiResponse, ForwardError> {
        let idempotent = req.starts_with(b"GET ") || req.starts_with(b"HEAD ");
        let pipe = self.pick();
        let reused = pipe.answered.get() > 0;
        match self.send(&pipe, req, is_head, idempotent).await {
            Ok(r) => return Ok(r),
            Err(Attempt::Fatal(e)) => return Err(e),
            Err(Attempt::Retryable) if reused => {
                log::debug(format_args!(
                    "pooled connection to {} was closed; re-sending on a new one",
                    self.shared.addr
                ));
            }
            Err(Attempt::Behind) => {
                log::debug(format_args!(
                    "request pipelined behind a broken answer from {}; re-sending on a new connection",
                    self.shared.addr
                ));
            }
            Err(Attempt::Retryable) => {
                return Err(ForwardError::Broken(
                    "connection closed before any response".into(),
                ))
            }
        }
        // A connection of its own: one re-send that meets a silent API
        // times out by its own deadline, not by a neighbour's.
        let pipe = self.new_pipe();
        match self.send(&pipe, req, is_head, idempotent).await {
            Ok(r) => Ok(r),
            Err(Attempt::Fatal(e)) => Err(e),
            Err(Attempt::Retryable | Attempt::Behind) => Err(ForwardError::Broken(
                "connection closed before any response".into(),
            )),
        }
    }

    /// The pipelined connection to use: one whose writer has not yet taken
    /// its queue and is not in a write, if it has room (the request joins
    /// that write: the requests one read from the proxy delivered go to the
    /// API as one write, not one per connection; a write that does not
    /// finish, an API that stopped reading, keeps no more than what was
    /// queued behind it); else an idle live one, else a new one
    /// while fewer than `max_idle` are open (or opening), else the least
    /// loaded with room (the slots guarantee there is one).
    fn pick(&self) -> Rc<Pipe> {
        {
            let mut pipes = self.pipes.borrow_mut();
            pipes.retain(|p| !p.dead.get());
            let unwritten = pipes.iter().find(|p| {
                !p.queued.borrow().is_empty() && !p.writing.get() && p.load() < self.depth
            });
            if let Some(p) = unwritten {
                return p.clone();
            }
            if let Some(p) = pipes.iter().find(|p| p.load() == 0) {
                return p.clone();
            }
            if pipes.len() >= self.max_idle.max(1) {
                let least = pipes
                    .iter()
                    .filter(|p| p.load() < self.depth)
                    .min_by_key(|p| p.load());
                if let Some(p) = least {
                    return p.clone();
                }
            }
        }
        self.new_pipe()
    }

    /// A pipelined connection, pooled at once: requests queue on it while
    /// its writer task connects (and fail 503 if that fails).
    fn new_pipe(&self) -> Rc<Pipe> {
        let pipe = Rc::new(Pipe {
            conn: std::cell::OnceCell::new(),
            outbox: RefCell::new(self.take_buf()),
            queued: RefCell::new(VecDeque::with_capacity(self.depth)),
            in_flight: RefCell::new(VecDeque::with_capacity(self.depth)),
            wake_writer: Notify::default(),
            writing: Cell::new(false),
            dead: Cell::new(false),
            answered: Cell::new(0),
        });
        rt::spawn(pipe_writer(pipe.clone(), self.shared.clone()));
        self.pipes.borrow_mut().push(pipe.clone());
        pipe
    }

    /// Queue `req` on `pipe` and wait for its answer.
    async fn send(
        &self,
        pipe: &Rc<Pipe>,
        req: &[u8],
        is_head: bool,
        idempotent: bool,
    ) -> Result<ApiResponse, Attempt> {
        if pipe.dead.get() {
            return Err(Attempt::Retryable);
        }
        let (tx, mut rx) = self.shared.replies.channel();
        pipe.outbox.borrow_mut().extend_from_slice(req);
        pipe.queued.borrow_mut().push_back(Pending {
            is_head,
            idempotent,
            reply: tx,
        });
        pipe.wake_writer.notify();
        let mut guard = KillOnDrop(Some(pipe.clone()));
        let r = (&mut rx).await;
        guard.0 = None;
        self.shared.replies.recycle(rx);
        match r {
            Ok(r) => r,
            // The connection's tasks ended without a word: it is gone.
            Err(_) => Err(Attempt::Retryable),
        }
    }

    /// An idle connection that is still clean: one on which bytes arrived
    /// while it was idle (nothing was asked) is broken and closed, as is one
    /// the peer closed. Returned with its posted read, which is to be the
    /// response's first read.
    fn checkout(&self) -> Option<(Rc<Conn>, Read)> {
        loop {
            let idle = self.idle.borrow_mut().pop()?;
            match idle.take() {
                Ok(ready) => return Some(ready),
                Err((conn, PendingInput::Bytes)) => {
                    conn.shutdown();
                    self.unsolicited();
                }
                Err((conn, _)) => conn.shutdown(),
            }
        }
    }

    /// Count (and log, throttled) a connection closed for unsolicited bytes.
    fn unsolicited(&self) {
        self.shared.unsolicited();
    }

    /// Connections closed so far because bytes arrived that no request asked for.
    pub fn unsolicited_closes(&self) -> u64 {
        self.shared.unsolicited.get()
    }

    async fn connect(&self) -> std::io::Result<Conn> {
        let tcp = TcpConn::connect(self.shared.addr, None).await?;
        match &self.tls {
            None => Ok(Conn::Plain(tcp)),
            Some((cfg, name)) => Ok(Conn::Tls(Box::new(
                TlsConn::connect(tcp, cfg.clone(), name.clone()).await?,
            ))),
        }
    }

    /// One request on `conn`; the connection returns to the pool if reusable.
    /// `posted` is the read kept on it while idle: the response's first read.
    async fn once(
        &self,
        conn: Rc<Conn>,
        mut posted: Option<Read>,
        req: &[u8],
        is_head: bool,
    ) -> Result<ApiResponse, Attempt> {
        let mut out = self.take_buf();
        out.extend_from_slice(req);
        let (res, out) = conn.write_all(out).await;
        self.recycle(out);
        if res.is_err() {
            return Err(Attempt::Retryable);
        }
        // The posted read brings its own buffer.
        let mut buf: Vec<u8> = match posted {
            Some(_) => Vec::new(),
            None => self.take_buf(),
        };
        loop {
            match frame(&buf, &self.shared.limits, is_head, false) {
                Ok(Some((len, head))) => {
                    // More than one response's worth: the response we framed
                    // may not be this request's (the connection is out of
                    // step). Fail the request, close the connection.
                    // Bytes that arrive later complete the read posted on
                    // the idle connection (see `Idle`).
                    if len < buf.len() {
                        conn.shutdown();
                        self.unsolicited();
                        return Err(Attempt::Fatal(ForwardError::Broken(
                            "bytes after the response that no request asked for".into(),
                        )));
                    }
                    let reusable = head.keep_alive && head.body != ResponseBody::UntilClose;
                    buf.truncate(len);
                    if reusable && self.idle.borrow().len() < self.max_idle {
                        let read_buf = self.take_buf();
                        self.idle.borrow_mut().push(Idle::new(conn, read_buf));
                    } else {
                        conn.shutdown();
                    }
                    return Ok(ApiResponse { bytes: buf, head });
                }
                Ok(None) => {}
                Err(why) => return Err(Attempt::Fatal(ForwardError::Broken(why))),
            }
            let (res, back) = match posted.take() {
                Some(read) => read.await,
                None => conn.read_append(buf, READ_BYTES).await,
            };
            buf = back;
            match res {
                Ok(0) if buf.is_empty() => return Err(Attempt::Retryable),
                Ok(0) => {
                    return match frame(&buf, &self.shared.limits, is_head, true) {
                        Ok(Some((len, head))) => {
                            buf.truncate(len);
                            Ok(ApiResponse { bytes: buf, head })
                        }
                        _ => Err(Attempt::Fatal(ForwardError::Broken(
                            "closed mid-response".into(),
                        ))),
                    };
                }
                Ok(_) => {}
                Err(_) if buf.is_empty() => return Err(Attempt::Retryable),
                Err(e) => {
                    return Err(Attempt::Fatal(ForwardError::Broken(format!(
                        "read failed mid-response: {e}"
                    ))))
                }
            }
        }
    }
}

/// The guest's IMDSv2-style token header, passed through when present.
pub const HEADER_TOKEN: HeaderName<'static> = HeaderName::from_static("X-aws-ec2-metadata-token");
const HEADER_HOST: HeaderName<'static> = HeaderName::from_static("Host");
const HEADER_XFF: HeaderName<'static> = HeaderName::from_static("X-Forwarded-For");
const HEADER_INSTANCE: HeaderName<'static> = HeaderName::from_static("X-Instance-ID");
const HEADER_TENANT: HeaderName<'static> = HeaderName::from_static("X-Tenant-ID");
const HEADER_SIGNATURE: HeaderName<'static> = HeaderName::from_static("X-Instance-ID-Signature");

/// What the agent forwards of the guest's request.
#[derive(Clone, Copy, Debug)]
pub struct GuestRequest<'a> {
    /// Its method.
    pub method: Method,
    /// Its target, as parsed.
    pub target: &'a [u8],
    /// Its `X-aws-ec2-metadata-token`, if any.
    pub token: Option<&'a [u8]>,
    /// Its body (de-chunked).
    pub body: &'a [u8],
}

/// The request to the metadata API: exactly the headers Neutron sends (spec
/// §3.4): `Host`, `X-Forwarded-For`, `X-Instance-ID`, `X-Tenant-ID`,
/// `X-Instance-ID-Signature` (signed here, over the validated instance id),
/// the guest's token when it sent one, and `Content-Length` when there is a
/// body. Every field goes through [`put_header`]; the ids come typed from
/// [`Resolved`], the rest is checked first, so nothing is written unless the
/// whole head is well formed.
///
/// # Errors
/// The target, `host` or the token would not make a well-formed head
/// (`out` is untouched then).
pub fn write_api_request(
    out: &mut Vec<u8>,
    guest: &GuestRequest<'_>,
    host: &str,
    id: &Identity,
    r: &Resolved,
    signer: &Signer,
) -> Result<(), InvalidHeader> {
    // The request line has no field syntax of its own: a target is one
    // run of visible bytes (httparse already refused anything else).
    if guest.target.is_empty() || guest.target.iter().any(|&b| b <= b' ' || b == 0x7f) {
        return Err(InvalidHeader::Value);
    }
    let host = HeaderValue::new(host.as_bytes())?;
    let xff = HeaderValue::new(id.xff.as_bytes())?;
    let token = guest.token.map(HeaderValue::new).transpose()?;
    let sig = signer.sign_hex(r.instance.as_str());
    let sig = HeaderValue::new(sig.as_bytes())?;
    out.extend_from_slice(guest.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(guest.target);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    put_header(out, HEADER_HOST, host);
    put_header(out, HEADER_XFF, xff);
    put_header(out, HEADER_INSTANCE, r.instance.header_value());
    put_header(out, HEADER_TENANT, r.project.header_value());
    put_header(out, HEADER_SIGNATURE, sig);
    if let Some(t) = token {
        put_header(out, HEADER_TOKEN, t);
    }
    if !guest.body.is_empty() || matches!(guest.method, Method::Post | Method::Put) {
        put_content_length(out, guest.body.len() as u64);
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(guest.body);
    Ok(())
}

/// [`http::frame_response`] with the agent's response bound.
fn frame(
    buf: &[u8],
    limits: &Limits,
    is_head: bool,
    eof: bool,
) -> Result<Option<(usize, ResponseHead)>, String> {
    http::frame_response(buf, limits, is_head, MAX_RESPONSE_BYTES, eof)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_requests_share_at_most_max_idle_connections() {
        use std::io::{BufRead, BufReader, Write};
        // A one-thread-per-connection HTTP server that counts connections.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let conns = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c2 = conns.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                c2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                std::thread::spawn(move || {
                    let mut w = s.try_clone().unwrap();
                    let mut r = BufReader::new(s);
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line.trim().is_empty() {
                            std::thread::sleep(Duration::from_millis(5));
                            if w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                                .is_err()
                            {
                                return;
                            }
                        }
                    }
                });
            }
        });
        let pool = std::rc::Rc::new(Pool::new(addr, 3, Duration::from_secs(5)));
        let ok = crate::rt::block_on(async {
            let tasks: Vec<_> = (0..40)
                .map(|_| {
                    let p = pool.clone();
                    crate::rt::spawn_handle(async move {
                        p.request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", false)
                            .await
                            .is_ok()
                    })
                })
                .collect();
            let mut ok = 0;
            for t in tasks {
                if t.join().await == Some(true) {
                    ok += 1;
                }
            }
            ok
        })
        .unwrap();
        assert_eq!(ok, 40);
        let n = conns.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            n <= 3,
            "40 concurrent requests opened {n} connections (cap 3)"
        );
        assert_eq!(pool.active(), 0, "every slot returned");
    }

    /// A server that answers each request with its connection's index; on
    /// connection 0 it sends a stale extra answer when told (while the
    /// connection is idle in the pool), and `/extra` gets its answer and a
    /// second one in one write.
    fn desync_server() -> (
        std::net::SocketAddr,
        std::sync::mpsc::Sender<()>,
        std::sync::mpsc::Receiver<()>,
    ) {
        use std::io::{BufRead, BufReader, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let mut go = Some((go_rx, done_tx));
        std::thread::spawn(move || {
            for (i, s) in l.incoming().flatten().enumerate() {
                let mut signal = if i == 0 { go.take() } else { None };
                std::thread::spawn(move || {
                    let mut w = s.try_clone().unwrap();
                    let mut r = BufReader::new(s);
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        loop {
                            let mut h = String::new();
                            if r.read_line(&mut h).unwrap_or(0) == 0 {
                                return;
                            }
                            if h.trim().is_empty() {
                                break;
                            }
                        }
                        let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n{i}");
                        let stale = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale";
                        let out = if line.starts_with("GET /extra ") {
                            format!("{answer}{stale}")
                        } else {
                            answer
                        };
                        if w.write_all(out.as_bytes()).is_err() {
                            return;
                        }
                        if let Some((go, done)) = signal.take() {
                            if go.recv().is_ok() {
                                w.write_all(stale.as_bytes()).unwrap();
                                done.send(()).unwrap();
                            }
                        }
                    }
                });
            }
        });
        (addr, go_tx, done_rx)
    }

    #[test]
    fn unsolicited_bytes_close_the_connection_and_never_answer_a_request() {
        unsolicited_bytes_close(false);
    }

    #[test]
    fn unsolicited_bytes_close_a_pipelined_connection_and_never_answer_a_request() {
        unsolicited_bytes_close(true);
    }

    fn unsolicited_bytes_close(pipelined: bool) {
        let (addr, go, done) = desync_server();
        let pool = Pool::new(addr, 2, Duration::from_secs(5));
        let pool = if pipelined { pool.pipelined() } else { pool };
        let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes();
        crate::rt::block_on(async {
            let a = pool.request(&get("/"), false).await.unwrap();
            assert_eq!(a.payload(), b"0");
            assert_eq!(pool.idle(), 1);
            // Bytes arrive on the idle connection that no request asked for.
            go.send(()).unwrap();
            done.recv().unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            let arrived = |pool: &Pool| match pool.idle.borrow().first() {
                Some(idle) => idle.pending_input() == PendingInput::Bytes,
                // A pipelined connection's reader closes it at once.
                None => pool.unsolicited_closes() == 1,
            };
            while !arrived(&pool) {
                assert!(Instant::now() < deadline, "stale bytes never arrived");
                // The posted read completes when the loop runs.
                crate::rt::sleep(Duration::from_millis(1)).await;
            }
            // The next request is not answered with them: a new connection.
            let b = pool.request(&get("/"), false).await.unwrap();
            assert_eq!(b.payload(), b"1", "answered from a fresh connection");
            assert_eq!(pool.unsolicited_closes(), 1);
            // A second answer right behind the first: the request fails (its
            // answer is not trustworthy) and the connection is not reused.
            let c = pool.request(&get("/extra"), false).await;
            assert!(
                matches!(c, Err(ForwardError::Broken(_))),
                "{:?}",
                c.map(|r| r.payload())
            );
            assert_eq!(pool.unsolicited_closes(), 2);
            let d = pool.request(&get("/"), false).await.unwrap();
            assert_eq!(d.payload(), b"2", "not the broken connection");
        })
        .unwrap();
    }

    /// A server that takes what arrives for a moment, then answers every
    /// whole request with its own path in one write. Returns its address,
    /// the most requests it ever answered at once, and its connections.
    fn batch_server() -> (
        std::net::SocketAddr,
        std::sync::Arc<std::sync::atomic::AtomicUsize>,
        std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let most = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let conns = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (m2, c2) = (most.clone(), conns.clone());
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                c2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let m2 = m2.clone();
                std::thread::spawn(move || {
                    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                    let mut got: Vec<u8> = Vec::new();
                    loop {
                        // Take everything that comes for a moment, then
                        // answer every whole request (its path echoed).
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk) {
                            Ok(0) => return,
                            Ok(n) => {
                                got.extend_from_slice(&chunk[..n]);
                                continue;
                            }
                            Err(_) => {}
                        }
                        let mut answers = Vec::new();
                        let mut n = 0;
                        while let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&got[..end]).into_owned();
                            let path = head.split(' ').nth(1).unwrap_or("").to_string();
                            answers.extend_from_slice(
                                format!(
                                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{path}",
                                    path.len()
                                )
                                .as_bytes(),
                            );
                            got.drain(..end + 4);
                            n += 1;
                        }
                        m2.fetch_max(n, std::sync::atomic::Ordering::Relaxed);
                        if s.write_all(&answers).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, most, conns)
    }

    /// Send `n` requests on `pool` at once (`GET /i`); how many got the
    /// answer to their own path.
    fn own_answers(pool: &std::rc::Rc<Pool>, n: usize) -> usize {
        crate::rt::block_on(async {
            let tasks: Vec<_> = (0..n)
                .map(|i| {
                    let p = pool.clone();
                    crate::rt::spawn_handle(async move {
                        let req = format!("GET /{i} HTTP/1.1\r\nHost: x\r\n\r\n");
                        let r = p.request(req.as_bytes(), false).await;
                        r.map(|r| r.payload()) == Ok(format!("/{i}").into_bytes())
                    })
                })
                .collect();
            let mut ok = 0;
            for t in tasks {
                if t.join().await == Some(true) {
                    ok += 1;
                }
            }
            ok
        })
        .unwrap()
    }

    /// 40 requests at once on a pipelined pool of one connection: the
    /// server sees several requests before it answers any (they are
    /// pipelined, in few writes), never more than `PIPELINE_DEPTH`, and
    /// every request gets the answer to its own path.
    #[test]
    fn pipelined_requests_are_bounded_by_the_depth_and_answered_in_order() {
        let (addr, most, conns) = batch_server();
        let pool = std::rc::Rc::new(Pool::new(addr, 1, Duration::from_secs(10)).pipelined());
        assert_eq!(
            own_answers(&pool, 40),
            40,
            "every request got its own answer"
        );
        assert_eq!(conns.load(std::sync::atomic::Ordering::Relaxed), 1);
        let most = most.load(std::sync::atomic::Ordering::Relaxed);
        assert!(most > 1, "requests were pipelined ({most} at most)");
        assert!(
            most <= PIPELINE_DEPTH,
            "{most} requests in flight on one connection (depth {PIPELINE_DEPTH})"
        );
        assert_eq!(pool.active(), 0, "every slot returned");
    }

    /// Requests made in the same loop turn (what one read from the proxy
    /// delivers) join one write on one connection, although the pool may
    /// open four: the API reads them in one read and answers them in one
    /// write, instead of one read and one write per connection.
    #[test]
    fn requests_of_one_turn_go_out_in_one_write() {
        let (addr, most, conns) = batch_server();
        let pool = std::rc::Rc::new(Pool::new(addr, 4, Duration::from_secs(10)).pipelined());
        assert_eq!(own_answers(&pool, 4), 4, "every request got its own answer");
        assert_eq!(conns.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(most.load(std::sync::atomic::Ordering::Relaxed), 4);
        assert_eq!(pool.active(), 0, "every slot returned");
    }

    #[test]
    fn frames_length_chunked_and_close_delimited() {
        let l = Limits::default();
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcEXTRA";
        let (len, head) = frame(r, &l, false, false).unwrap().unwrap();
        assert_eq!(len, r.len() - 5);
        assert_eq!(head.status, 200);
        assert!(frame(&r[..40], &l, false, false).unwrap().is_none());

        let c = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let (len, head) = frame(c, &l, false, false).unwrap().unwrap();
        assert_eq!(len, c.len());
        let resp = ApiResponse {
            bytes: c.to_vec(),
            head,
        };
        assert_eq!(resp.payload(), b"abc");

        let u = b"HTTP/1.0 200 OK\r\n\r\nxyz";
        assert!(frame(u, &l, false, false).unwrap().is_none());
        assert_eq!(frame(u, &l, false, true).unwrap().unwrap().0, u.len());
        assert!(frame(b"NOT HTTP\r\n\r\n", &l, false, false).is_err());
    }
}
