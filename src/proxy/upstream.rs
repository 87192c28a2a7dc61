//! A proxy loop's next hop ([`Upstream`]): the per-loop pool of pipelined
//! HTTP/1.1 connections to the agent's Unix socket ([`Pool`]), or the agent
//! stage itself on the same loop (`Upstream::InProcess`).
//!
//! **In-process** (`metaproxy up`, `metaproxy ovn`; [`AgentLink`] is chosen
//! once at start). When proxy and agent are one process, the socket between
//! them buys nothing: no privilege boundary, no independent restart. It
//! cost, per request, a Unix write and read on each side, the proxy's parse
//! of the agent's answer, and a task and a oneshot in the agent; per
//! process, a second set of per-core loops (`up` ran 6 loop threads on 2
//! cores and measured 1.80× the one-hop floor's CPU per request against
//! 1.46–1.49× for the three daemons, issue 13). So each proxy loop holds its
//! own [`crate::agent::daemon::AgentLoop`] (resolver and cache, signer,
//! pooled API client), built on that loop's thread from the shareable
//! [`crate::agent::daemon::Stage`], and [`crate::proxy::conn`] hands the
//! rewritten request to [`crate::agent::handler::respond_in_process`], whose
//! answer, already framed for the guest, goes straight into the guest's
//! write. The request bytes are the very ones the socket would have carried
//! and are parsed again with `[agent.limits]`, so the agent's identity
//! checks, limits, statuses, pages, 404 retry, counters and access log are
//! its own, not a copy. The proxy's `server` timeout has no place there: the
//! stage is bounded by the agent's own timeouts (the API's, Neutron's), which
//! answer the agent's 504/503 pages.
//!
//! Rejected for in-process: a loopback socketpair per loop between the two
//! (still a write, a read and two parses per request, and the agent's loops
//! stay); the agent's `Identity` built directly from the proxy's peer and
//! namespace, skipping the second parse (it saves about a parse of a ~200
//! byte head, but it is a second identity path beside
//! `identity::parse_identity` that could drift from what the agent accepts
//! over its socket); a trait object for the upstream (an enum match is free
//! on the socket path, which must not grow: the three daemons use it).
//!
//! Requests from many VMs are multiplexed over a few persistent connections.
//! Each connection has one writer task (it batches every queued request into
//! one write, so a storm costs few syscalls) and one reader task (it frames
//! responses with [`crate::http::parse_response`] and hands each, whole, to
//! the waiting request in FIFO order). Responses are buffered whole (they are
//! small and bounded by `max_response_bytes`), so a slow VM never holds up the
//! shared connection: rejected alternative was streaming the body straight to
//! the client, which couples every VM on a connection to the slowest reader.
//!
//! Choosing a connection: HTTP/1.1 answers in order, so a request pipelined
//! behind a slow one waits for it. The real Neutron fault test found cache
//! hits waiting up to a whole Neutron timeout behind a miss on the same
//! connection, because the pool used to fill one connection to a fixed depth
//! before dialling the next. Now an idle connection is used first, the pool
//! grows to `upstream_pool_size` before anything is pipelined, and a full
//! pool pipelines onto the least-loaded connection that is not stalled
//! (requests waiting and no response for 20 ms, `STALLED_AFTER`: a
//! connection that keeps answering under a storm is busy, not stalled).
//! "No response" is judged by when the reader delivered the last one, so
//! before taking every connection for stalled the pool lets the loop reap
//! its ring once ([`rt::next_turn`]): a loop that was itself away for 20 ms
//! (descheduled on a loaded host) must not blame the agent and dial.
//! When all are stalled (more
//! concurrent misses than connections), the pool grows to
//! 4 × size instead (`OVERFLOW_FACTOR`), and closes the surplus once they are
//! idle and nothing is stalled. What is left: requests that arrive in the
//! same instant as slow ones can queue behind them, and with more stalled
//! requests than the overflow allows, everything pipelines again.
//!
//! Failure rules:
//! - a connection that dies (or is shut down after a timeout) fails each
//!   request it had not answered: one never written, or a GET/HEAD, with
//!   [`UpstreamError::Retryable`], and [`Pool::request`] re-sends it once on a
//!   fresh socket; any other request already written (a password POST, a
//!   token PUT) with [`UpstreamError::Unanswered`] → 502, because the agent
//!   may have acted on it: re-sending could store a password twice (Nova
//!   answers the second POST 409);
//! - a partial response → 502; agent unreachable → 503; no response within the
//!   `server` timeout → 504 (and the connection is shut down, because every
//!   request pipelined behind the silent one is stuck too);
//! - an agent that answers `Connection: close` after successful answers
//!   [`ONE_SHOT_AFTER`] times in a row (neutron-metadata-agent does: one
//!   request per connection) switches the pool to one fresh connection per
//!   request, so pipelined requests are never lost to its closes; a
//!   successful keep-alive answer switches it back. A close after an error
//!   answer (a canned 431 or 400 says `Connection: close` because the stream
//!   cannot be trusted any more) only ends that connection: one oversized
//!   head must not degrade the pool for good;
//! - a one-shot connection (one per request, or the fresh one a re-send
//!   uses) is closed as soon as its answer is read, whatever the agent says:
//!   an agent that keeps it alive would otherwise hold one fd per request in
//!   the proxy until its idle timeout.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::http::{self, Limits, Method, ResponseHead};
use crate::log;
use crate::rt::sync::{oneshot, Event, Notify};
use crate::rt::{self, UnixConn};

/// Read size for agent responses.
const UPSTREAM_READ_BYTES: usize = 16 * 1024;

/// A connection that has answered nothing for this long while requests wait
/// on it is passed over for pipelining while another is not. The agent answers a cache hit in
/// well under a millisecond; a miss waits on Neutron (tens of milliseconds
/// when healthy, up to its timeout when not).
const STALLED_AFTER: Duration = Duration::from_millis(20);

/// While every pooled connection is stalled, the pool may hold this many
/// times `upstream_pool_size` connections.
const OVERFLOW_FACTOR: usize = 4;

/// Successful answers with `Connection: close`, in a row, after which the
/// agent is taken to close after every response (one connection per
/// request from then on).
pub const ONE_SHOT_AFTER: u32 = 3;

/// How the proxy reaches the agent, chosen once at start
/// ([`crate::proxy::start_with`]).
#[derive(Clone, Debug)]
pub enum AgentLink {
    /// Over `agent_socket` ([`Pool`]): `metaproxy proxy` in front of
    /// `metaproxy agent` or neutron-metadata-agent.
    Socket,
    /// The agent stage runs on each proxy loop itself
    /// ([`crate::agent::InProcess`]): `metaproxy ovn` and `metaproxy up`.
    InProcess(crate::agent::daemon::Stage),
}

/// One proxy loop's next hop: what [`crate::proxy::conn`] hands the
/// rewritten request to.
pub enum Upstream {
    /// The pooled, pipelined connections to the agent's socket.
    Socket(Pool),
    /// This loop's agent state (resolver and cache, signer, pooled API
    /// client), on this same thread:
    /// [`crate::agent::handler::respond_in_process`] resolves, signs,
    /// forwards and writes the agent's answer, with no socket, no second
    /// parse of the answer, no task per request.
    InProcess(Rc<crate::agent::daemon::AgentLoop>),
}

/// Why an upstream exchange failed; [`UpstreamError::status`] classifies it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// Connecting to the agent failed or timed out.
    #[error("agent unreachable: {0}")]
    Unreachable(String),
    /// The connection died before any of this response arrived, and the
    /// request was never written or is idempotent: safe to re-send once.
    #[error("agent connection lost before the response started")]
    Retryable,
    /// The connection died after this non-idempotent request was written and
    /// before its response arrived: the agent may have acted on it, so it is
    /// not re-sent.
    #[error("agent connection lost after the request was sent")]
    Unanswered,
    /// The response was cut off or malformed.
    #[error("agent response broken: {0}")]
    Broken(String),
    /// The agent did not answer within the server timeout.
    #[error("agent did not answer within the server timeout")]
    Timeout,
}

impl UpstreamError {
    /// The status the VM sees.
    pub fn status(&self) -> u16 {
        match self {
            UpstreamError::Unreachable(_) | UpstreamError::Retryable => 503,
            UpstreamError::Broken(_) | UpstreamError::Unanswered => 502,
            UpstreamError::Timeout => 504,
        }
    }
}

/// A whole agent response.
#[derive(Debug)]
pub struct UpstreamResponse {
    /// Raw bytes: head then body, as received.
    pub bytes: Vec<u8>,
    /// Parsed head (offsets into `bytes`).
    pub head: ResponseHead,
    /// Body was delimited by the agent closing (client must be closed too).
    pub until_close: bool,
}

impl UpstreamResponse {
    /// Body bytes as received (raw chunked framing kept).
    pub fn body(&self) -> &[u8] {
        &self.bytes[self.head.head_len..]
    }
}

/// How an exchange ended, with the request's bytes handed back (for the
/// one permitted re-send, else for the caller to recycle).
struct Outcome {
    result: Result<UpstreamResponse, UpstreamError>,
    request: Vec<u8>,
}

type Reply = oneshot::Sender<Outcome>;

struct Pending {
    is_head: bool,
    /// GET or HEAD: may be re-sent after its bytes were written.
    idempotent: bool,
    reply: Reply,
    /// When the request was handed to this connection.
    since: Instant,
    /// The request: copied into the writer's batch, kept until answered so
    /// that a re-send needs no copy of its own, then handed back.
    bytes: Vec<u8>,
}

impl Pending {
    fn answer(self, result: Result<UpstreamResponse, UpstreamError>) {
        let _ = self.reply.send(Outcome {
            result,
            request: self.bytes,
        });
    }
}

/// One pooled connection.
struct UpConn {
    stream: UnixConn,
    queue: RefCell<VecDeque<Pending>>,
    in_flight: RefCell<VecDeque<Pending>>,
    wake_writer: Notify,
    dead: Cell<bool>,
    /// When the last response was delivered.
    answered: Cell<Instant>,
    /// Carries one request: closed as soon as its answer is read.
    one_shot: bool,
}

impl UpConn {
    fn load(&self) -> usize {
        self.queue.borrow().len() + self.in_flight.borrow().len()
    }

    /// Requests are waiting on it and it has made no progress for
    /// [`STALLED_AFTER`]: no response arrived since its oldest request was
    /// sent or since the last response, whichever is later. A busy connection
    /// that keeps answering (a storm) is not stalled; one whose head waits on
    /// a slow Neutron is, and whatever is pipelined behind it waits too.
    fn stalled(&self, now: Instant) -> bool {
        let oldest = self
            .in_flight
            .borrow()
            .front()
            .map(|p| p.since)
            .or_else(|| self.queue.borrow().front().map(|q| q.since));
        oldest.is_some_and(|t| {
            let mark = t.max(self.answered.get());
            now.saturating_duration_since(mark) > STALLED_AFTER
        })
    }

    /// Mark dead, shut the socket and fail everything not yet answered.
    fn kill(&self, first: Option<UpstreamError>) {
        if self.dead.replace(true) {
            return;
        }
        self.stream.shutdown();
        let mut first = first;
        // In flight = written (or being written): only an idempotent
        // request may be re-sent; the queued ones never left.
        let in_flight: Vec<Pending> = self.in_flight.borrow_mut().drain(..).collect();
        for p in in_flight {
            let e = first.take().unwrap_or(if p.idempotent {
                UpstreamError::Retryable
            } else {
                UpstreamError::Unanswered
            });
            p.answer(Err(e));
        }
        let queued: Vec<Pending> = self.queue.borrow_mut().drain(..).collect();
        for q in queued {
            q.answer(Err(UpstreamError::Retryable));
        }
        self.wake_writer.notify();
    }
}

/// Pool settings.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Agent socket path.
    pub socket: PathBuf,
    /// Pooled connections.
    pub size: usize,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Response timeout.
    pub server_timeout: Duration,
    /// Response limits.
    pub limits: Limits,
    /// Largest response.
    pub max_response_bytes: u64,
}

/// Per-loop upstream pool (cheap to clone; not `Send`).
#[derive(Clone)]
pub struct Pool(Rc<PoolInner>);

struct PoolInner {
    cfg: PoolConfig,
    conns: RefCell<Vec<Rc<UpConn>>>,
    /// The agent closes after every response: use one connection per request.
    one_per_conn: Cell<bool>,
    /// Successful answers with `Connection: close` in a row.
    closes_in_a_row: Cell<u32>,
    /// Log "agent unreachable" once per outage, not per request.
    down_logged: Cell<bool>,
    /// Pooled dials in progress (they count against `size`).
    dialing: Cell<usize>,
    /// Set (and replaced) whenever a pooled dial finishes.
    dial_done: RefCell<Event>,
    /// The answers' emptied oneshot cells, for the next requests.
    replies: oneshot::Replies<Outcome>,
}

/// Emptied answer cells a pool keeps for reuse: about one loop's requests
/// in flight at once in a storm, a few hundred bytes each.
const REPLY_CELLS: usize = 256;

impl Pool {
    /// New empty pool; connections are dialled on demand.
    pub fn new(cfg: PoolConfig) -> Pool {
        Pool(Rc::new(PoolInner {
            cfg,
            conns: RefCell::new(Vec::new()),
            one_per_conn: Cell::new(false),
            closes_in_a_row: Cell::new(0),
            down_logged: Cell::new(false),
            dialing: Cell::new(0),
            dial_done: RefCell::new(Event::default()),
            replies: oneshot::Replies::new(REPLY_CELLS),
        }))
    }

    /// Send one `method` request (a complete head + body) and wait for its
    /// response. A request whose connection died before any response byte
    /// arrived is re-sent once on a fresh connection if it was never written
    /// or is a GET or HEAD (see the module's failure rules).
    ///
    /// The request's buffer comes back with the result, as with every owned
    /// buffer here (empty after a timeout): the caller recycles it. The pool
    /// keeps it while the request is unanswered, so the re-send needs no
    /// copy of its own.
    ///
    /// # Errors
    /// See [`UpstreamError`].
    pub async fn request(
        &self,
        bytes: Vec<u8>,
        method: Method,
    ) -> (Result<UpstreamResponse, UpstreamError>, Vec<u8>) {
        match self.exchange(bytes, method, false).await {
            (Err(UpstreamError::Retryable), bytes) => {
                match self.exchange(bytes, method, true).await {
                    (Err(UpstreamError::Retryable), bytes) => (
                        Err(UpstreamError::Broken(
                            "agent connection lost twice before the response started".into(),
                        )),
                        bytes,
                    ),
                    other => other,
                }
            }
            other => other,
        }
    }

    async fn exchange(
        &self,
        bytes: Vec<u8>,
        method: Method,
        fresh: bool,
    ) -> (Result<UpstreamResponse, UpstreamError>, Vec<u8>) {
        let p = &self.0;
        let conn = if fresh || p.one_per_conn.get() {
            self.dial(false).await
        } else {
            self.pick().await
        };
        let conn = match conn {
            Ok(c) => c,
            Err(e) => return (Err(e), bytes),
        };
        let (tx, mut rx) = p.replies.channel();
        conn.queue.borrow_mut().push_back(Pending {
            is_head: method == Method::Head,
            idempotent: matches!(method, Method::Get | Method::Head),
            reply: tx,
            since: Instant::now(),
            bytes,
        });
        conn.wake_writer.notify();
        let deadline = Instant::now() + p.cfg.server_timeout;
        let answer = rt::with_deadline(deadline, &mut rx).await;
        p.replies.recycle(rx);
        match answer {
            Ok(Ok(Outcome { result, request })) => (result, request),
            // The connection's tasks ended (the loop is going away) and took
            // the request with them: nothing to re-send.
            Ok(Err(_canceled)) => (
                Err(UpstreamError::Broken(
                    "agent connection dropped the request".into(),
                )),
                Vec::new(),
            ),
            Err(rt::Elapsed) => {
                log::warn(format_args!(
                    "agent at {} did not answer within {:?}; closing that connection",
                    p.cfg.socket.display(),
                    p.cfg.server_timeout
                ));
                conn.kill(None);
                (Err(UpstreamError::Timeout), Vec::new())
            }
        }
    }

    /// The pooled connection for the next request: an idle one if there is
    /// one; else a new one while the pool (counting dials in progress) is
    /// below size; else the least-loaded connection that is not stalled.
    /// When every connection is stalled the pool may grow to
    /// [`OVERFLOW_FACTOR`] × size rather than queue behind them, and sheds
    /// the surplus (idle ones) once nothing is stalled any more.
    async fn pick(&self) -> Result<Rc<UpConn>, UpstreamError> {
        let p = &self.0;
        // Whether the loop has reaped its completions since this pick began.
        let mut looked = false;
        loop {
            let now = Instant::now();
            let all_stalled = {
                let mut conns = p.conns.borrow_mut();
                conns.retain(|c| !c.dead.get());
                let all_stalled = !conns.is_empty() && conns.iter().all(|c| c.stalled(now));
                let mut surplus = conns.len().saturating_sub(p.cfg.size);
                if surplus > 0 && !conns.iter().any(|c| c.stalled(now)) {
                    conns.retain(|c| {
                        if surplus > 0 && c.load() == 0 {
                            surplus -= 1;
                            c.kill(None);
                            false
                        } else {
                            true
                        }
                    });
                }
                all_stalled
            };
            let best = p
                .conns
                .borrow()
                .iter()
                .min_by_key(|c| (c.stalled(now), c.load()))
                .cloned();
            let cap = if all_stalled {
                p.cfg.size * OVERFLOW_FACTOR
            } else {
                p.cfg.size
            };
            let open = p.conns.borrow().len() + p.dialing.get();
            let full = open >= cap;
            // `answered` is when the reader *delivered* the last answer, not
            // when it arrived: a loop that was busy or descheduled for 20 ms
            // (a loaded host) has the agent's answers waiting in its ring
            // while every connection looks stalled, and this request may run
            // before the readers do. Growing then only churns connections
            // (issue 13: 0.01-0.02 connects per request in a storm). So
            // before growing past `size` because all look stalled, let the
            // loop reap what has arrived once (the readers it wakes run
            // before this task resumes) and judge again.
            if all_stalled && !looked && open >= p.cfg.size && !full {
                looked = true;
                rt::next_turn().await;
                continue;
            }
            match best {
                Some(c) if c.load() == 0 || full => return Ok(c),
                _ if !full => {
                    p.dialing.set(p.dialing.get() + 1);
                    let r = self.dial(true).await;
                    p.dialing.set(p.dialing.get() - 1);
                    let done = std::mem::take(&mut *p.dial_done.borrow_mut());
                    done.set();
                    return r;
                }
                // Every slot is being dialled: wait for one to finish.
                _ => {
                    let wait = p.dial_done.borrow().wait();
                    wait.await;
                }
            }
        }
    }

    async fn dial(&self, pooled: bool) -> Result<Rc<UpConn>, UpstreamError> {
        let p = &self.0;
        let deadline = Instant::now() + p.cfg.connect_timeout;
        let stream = match rt::with_deadline(deadline, UnixConn::connect(&p.cfg.socket)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(self.unreachable(e.to_string())),
            Err(rt::Elapsed) => return Err(self.unreachable("connect timed out".into())),
        };
        if p.down_logged.replace(false) {
            log::info(format_args!(
                "agent at {} reachable again",
                p.cfg.socket.display()
            ));
        }
        let conn = Rc::new(UpConn {
            stream,
            queue: RefCell::new(VecDeque::new()),
            in_flight: RefCell::new(VecDeque::new()),
            wake_writer: Notify::default(),
            dead: Cell::new(false),
            answered: Cell::new(Instant::now()),
            one_shot: !pooled,
        });
        rt::spawn(writer(conn.clone()));
        rt::spawn(reader(self.clone(), conn.clone()));
        if pooled {
            p.conns.borrow_mut().push(conn.clone());
        }
        Ok(conn)
    }

    fn unreachable(&self, why: String) -> UpstreamError {
        let p = &self.0;
        if !p.down_logged.replace(true) {
            log::error(format_args!(
                "agent at {} unreachable: {why}; answering 503 until it is back",
                p.cfg.socket.display()
            ));
        }
        UpstreamError::Unreachable(why)
    }

    /// A successful answer said `Connection: close` (`close`) or not.
    fn saw_success(&self, close: bool) {
        let p = &self.0;
        if !close {
            p.closes_in_a_row.set(0);
            if p.one_per_conn.replace(false) {
                log::info(format_args!(
                    "agent at {} keeps connections alive again; pooling",
                    p.cfg.socket.display()
                ));
            }
            return;
        }
        let n = p.closes_in_a_row.get().saturating_add(1);
        p.closes_in_a_row.set(n);
        if n < ONE_SHOT_AFTER {
            return;
        }
        if !self.0.one_per_conn.replace(true) {
            log::info(format_args!(
                "agent at {} closes after each response; using one connection per request",
                self.0.cfg.socket.display()
            ));
            // Pooled connections will be closed by the agent; drop them from the pool.
            self.0.conns.borrow_mut().clear();
        }
    }
}

/// Batch every queued request into one write, in queue order.
async fn writer(conn: Rc<UpConn>) {
    let mut out: Vec<u8> = Vec::new();
    loop {
        if conn.dead.get() {
            return;
        }
        if conn.queue.borrow().is_empty() {
            conn.wake_writer.notified().await;
            continue;
        }
        out.clear();
        {
            let mut q = conn.queue.borrow_mut();
            let mut f = conn.in_flight.borrow_mut();
            // Invariant: a request enters `in_flight` in the same order its
            // bytes enter the socket, so the reader can match FIFO.
            while let Some(item) = q.pop_front() {
                out.extend_from_slice(&item.bytes);
                f.push_back(item);
            }
        }
        let (res, back) = conn.stream.write_all(std::mem::take(&mut out)).await;
        out = back;
        if let Err(e) = res {
            log::debug(format_args!("agent connection write failed: {e}"));
            conn.kill(None);
            return;
        }
    }
}

/// Frame responses and hand them out in order.
async fn reader(pool: Pool, conn: Rc<UpConn>) {
    let cfg = &pool.0.cfg;
    // The read buffer keeps its capacity for the connection's life (at most
    // `OVERFLOW_FACTOR` × size of them per loop): each answer is copied out
    // of it at its own size, so a batch of answers costs one allocation
    // each, not a fresh read buffer each plus a copy of the rest of the batch.
    let mut buf: Vec<u8> = Vec::new();
    loop {
        // Deliver every complete response already buffered, from `start`.
        let mut start = 0;
        loop {
            let Some(is_head) = conn.in_flight.borrow().front().map(|p| p.is_head) else {
                break;
            };
            let rest = &buf[start..];
            match http::frame_response(rest, &cfg.limits, is_head, cfg.max_response_bytes, false) {
                Ok(None) => break,
                Ok(Some((len, head))) => {
                    // `head`'s offsets are relative to `rest`, as to `bytes`.
                    let bytes = rest[..len].to_vec();
                    start += len;
                    let close = !head.keep_alive;
                    let success = head.status < 400;
                    let p = conn
                        .in_flight
                        .borrow_mut()
                        .pop_front()
                        .expect("front exists");
                    p.answer(Ok(UpstreamResponse {
                        bytes,
                        head,
                        until_close: false,
                    }));
                    conn.answered.set(Instant::now());
                    if success {
                        pool.saw_success(close);
                    }
                    if close || conn.one_shot {
                        conn.kill(None);
                        return;
                    }
                }
                Err(why) => {
                    conn.kill(Some(UpstreamError::Broken(why)));
                    return;
                }
            }
        }
        buf.drain(..start);
        if buf.is_empty() && buf.capacity() > 2 * UPSTREAM_READ_BYTES {
            buf = Vec::new(); // a large answer's capacity is not kept
        }
        if conn.dead.get() {
            return;
        }
        if !buf.is_empty() && conn.in_flight.borrow().is_empty() {
            conn.kill(Some(UpstreamError::Broken(
                "unsolicited bytes from agent".into(),
            )));
            return;
        }
        let (res, back) = conn.stream.read_append(buf, UPSTREAM_READ_BYTES).await;
        buf = back;
        match res {
            Ok(0) => {
                // EOF: a close-delimited response is complete now; anything
                // else partial is broken, and requests with nothing received
                // are retryable.
                let front = conn.in_flight.borrow().front().map(|p| p.is_head);
                if let (Some(is_head), false) = (front, buf.is_empty()) {
                    match http::frame_response(
                        &buf,
                        &cfg.limits,
                        is_head,
                        cfg.max_response_bytes,
                        true,
                    ) {
                        Ok(Some((_, head))) => {
                            let p = conn
                                .in_flight
                                .borrow_mut()
                                .pop_front()
                                .expect("front exists");
                            p.answer(Ok(UpstreamResponse {
                                bytes: std::mem::take(&mut buf),
                                head,
                                until_close: true,
                            }));
                            conn.kill(None);
                        }
                        _ => conn.kill(Some(UpstreamError::Broken(
                            "agent closed mid-response".into(),
                        ))),
                    }
                } else {
                    conn.kill(None);
                }
                return;
            }
            Ok(_) => {}
            Err(e) => {
                let first = if buf.is_empty() {
                    None
                } else {
                    Some(UpstreamError::Broken(format!(
                        "read failed mid-response: {e}"
                    )))
                };
                conn.kill(first);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{mpsc, Arc};

    /// A Unix-socket agent that counts its connections and answers every
    /// request `200 ok` at once, except the first one it ever reads: that
    /// one it reports on `got`, answers when told on `go`, then reports on
    /// `answered` (so the test knows the answer is in the proxy's socket).
    struct HeldAgent {
        connections: Arc<AtomicUsize>,
        got: mpsc::Receiver<()>,
        go: mpsc::Sender<()>,
        answered: mpsc::Receiver<()>,
    }

    fn held_agent(path: &std::path::Path) -> HeldAgent {
        let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let (got_tx, got) = mpsc::channel();
        let (go, go_rx) = mpsc::channel::<()>();
        let (answered_tx, answered) = mpsc::channel();
        let held = Arc::new(std::sync::Mutex::new(Some((got_tx, go_rx, answered_tx))));
        let count = connections.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { return };
                count.fetch_add(1, Ordering::SeqCst);
                let held = held.clone();
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let first = held.lock().unwrap().take();
                            if let Some((got, go, _)) = &first {
                                got.send(()).unwrap();
                                go.recv().unwrap();
                            }
                            let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                            if s.write_all(answer).is_err() {
                                return;
                            }
                            if let Some((_, _, answered)) = first {
                                answered.send(()).unwrap();
                            }
                        }
                        match s.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        HeldAgent {
            connections,
            got,
            go,
            answered,
        }
    }

    /// Four pipelined requests; the agent answers them in two writes, the
    /// first holding three whole answers and half of the fourth: each
    /// request gets exactly its own answer (the reader copies each out of
    /// one buffer), and the pool used one connection.
    #[test]
    fn a_batch_of_answers_in_one_read_is_split_per_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let answer = |i: usize| {
            let body = format!("answer {i}").repeat(i + 1);
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        };
        let agent = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let (mut buf, mut chunk) = (Vec::new(), [0u8; 4096]);
            while buf.windows(4).filter(|w| w == b"\r\n\r\n").count() < 4 {
                let n = s.read(&mut chunk).unwrap();
                assert!(n > 0, "proxy closed early");
                buf.extend_from_slice(&chunk[..n]);
            }
            let all: String = (0..4).map(answer).collect();
            let cut = all.len() - answer(3).len() / 2;
            s.write_all(&all.as_bytes()[..cut]).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            s.write_all(&all.as_bytes()[cut..]).unwrap();
            // Stay open until the proxy is done.
            let _ = s.read(&mut chunk);
        });
        let pool = Pool::new(PoolConfig {
            socket: path,
            size: 1,
            connect_timeout: Duration::from_secs(5),
            server_timeout: Duration::from_secs(5),
            limits: Limits::default(),
            max_response_bytes: 1 << 20,
        });
        let test = async move {
            let tasks: Vec<_> = (0..4)
                .map(|i| {
                    let pool = pool.clone();
                    let bytes = format!("GET /{i} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes();
                    rt::spawn_handle(async move { pool.request(bytes, Method::Get).await.0 })
                })
                .collect();
            let mut bodies = Vec::new();
            for t in tasks {
                let r = t.join().await.unwrap().unwrap();
                assert_eq!(r.head.status, 200);
                bodies.push(String::from_utf8(r.body().to_vec()).unwrap());
            }
            bodies
        };
        let bodies = rt::block_on(async { rt::spawn_handle(test).join().await })
            .unwrap()
            .unwrap();
        for (i, body) in bodies.iter().enumerate() {
            assert_eq!(*body, format!("answer {i}").repeat(i + 1), "request {i}");
        }
        agent.join().unwrap();
    }

    /// Regression (issue 13): the agent answered in time, but the proxy's
    /// loop did not run for longer than [`STALLED_AFTER`] (a loaded host
    /// deschedules it; here the test blocks the loop's thread). The next
    /// request ran before the reader that had the answer waiting, took the
    /// only connection for stalled and dialled a new one. It must reuse it.
    #[test]
    fn a_late_loop_does_not_take_an_answered_connection_for_stalled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let HeldAgent {
            connections,
            got,
            go,
            answered,
        } = held_agent(&path);
        let pool = Pool::new(PoolConfig {
            socket: path,
            size: 1,
            connect_timeout: Duration::from_secs(5),
            server_timeout: Duration::from_secs(5),
            limits: Limits::default(),
            max_response_bytes: 1 << 20,
        });
        let req = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes();
        // On a spawned task, as every proxy request runs (`block_on` polls
        // its own future before the loop's tasks, so it would not see the
        // order the loop gives them).
        let test = async move {
            let first = {
                let pool = pool.clone();
                let bytes = req("/first");
                rt::spawn_handle(async move { pool.request(bytes, Method::Get).await.0 })
            };
            // Let the loop write the first request; the agent holds it.
            while got.try_recv().is_err() {
                rt::sleep(Duration::from_millis(1)).await;
            }
            // From here on this task does not yield: the loop is "away".
            go.send(()).unwrap();
            answered.recv().unwrap();
            std::thread::sleep(STALLED_AFTER * 2);
            let second = pool.request(req("/second"), Method::Get).await.0.unwrap();
            assert_eq!(second.head.status, 200);
            let first = first.join().await.unwrap().unwrap();
            assert_eq!(first.head.status, 200);
        };
        rt::block_on(async { rt::spawn_handle(test).join().await })
            .unwrap()
            .unwrap();
        assert_eq!(
            connections.load(Ordering::SeqCst),
            1,
            "the answered connection was taken for stalled and another dialled"
        );
    }
}
