//! One agent connection: HTTP/1.1 keep-alive with pipelining. A reader
//! parses requests as they arrive and starts each one's resolution and
//! forwarding at once on its own task ([`super::handler`]), so one
//! slow Neutron lookup does not hold up the cache hits pipelined behind it;
//! a writer answers strictly in request order, and writes the answers that
//! are done together in one write (one SEND per batch rather than per
//! answer: the proxy pipelines, so a read often carries several requests and
//! their answers complete in the same loop turn). This serves both metaproxy's
//! own proxy (a pooled, pipelined client) and haproxy with
//! `option http-server-close` (one request, then `Connection: close`).
//!
//! The reader waits with the engine's `serve::wait_for_request!` (no
//! buffer held while idle) and reads with its [`serve::read_head`] and
//! [`serve::read_body`]; the connection runs on the loop's
//! [`crate::serve::Server`] (accept, caps, drain, free list).
//!
//! Rejected: the engine's sequential [`crate::serve::serve_conn`] (the
//! proxy's and the API's): it answers one request before reading the next,
//! which would serialise a pipelined batch behind its slowest lookup.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Instant;

use futures_util::future::{select, Either};

use crate::agent::daemon::AgentLoop;
use crate::agent::handler;
use crate::agent::link::{ApiLink, Link};
use crate::agent::metrics::{inc, LoopMetrics};
use crate::http::{self, HttpError, Method, RequestBody, RequestHead};
use crate::rt::sync::oneshot as reply;
use crate::rt::sync::Notify;
use crate::rt::{self, UnixConn};
use crate::serve::{self, Refusal, Settings};

/// Requests in flight on one connection (resolved and forwarded
/// concurrently); the reader waits for the writer beyond this.
const PIPELINE_MAX: usize = 64;
/// Largest batch of answers written at once: the answers behind the first
/// that are already done join its write up to this size (the first is
/// written whatever its size; its bound is the API's response limit).
/// Equal to the free list's largest buffer, so a batch buffer is recycled.
const WRITE_BATCH_MAX_BYTES: usize = crate::serve::engine::FREE_BUFFER_MAX_BYTES;

/// One answer slot, in request order.
enum AnswerSlot {
    /// Being resolved and forwarded by its own task (for a HEAD when the bool is set).
    Pending(reply::Receiver<Vec<u8>>, bool),
    /// Already known (a canned rejection).
    Ready(Vec<u8>),
}

/// Answers waiting to be written, in the order their requests arrived.
#[derive(Default)]
struct OutQueue {
    slots: RefCell<std::collections::VecDeque<(AnswerSlot, bool)>>,
    /// The reader added a slot or finished.
    more: Notify,
    /// The writer made room.
    room: Notify,
    /// The reader will add nothing more.
    reader_done: Cell<bool>,
}

/// One connection: a reader that parses requests as they arrive and starts
/// each one's resolution and forwarding at once (pipelined requests are
/// resolved concurrently: one slow Neutron lookup does not hold up the cache
/// hits behind it), and a writer that answers strictly in request order.
pub(super) async fn serve(ctx: Rc<AgentLoop>, conn: Rc<UnixConn>) {
    let q = Rc::new(OutQueue::default());
    let reader = read_requests(ctx.clone(), conn.clone(), q.clone());
    let writer = write_answers(ctx.clone(), conn.clone(), q.clone());
    futures_util::pin_mut!(reader, writer);
    match select(reader, writer).await {
        // Reading is over (EOF, close, error slot queued): answer what is queued.
        Either::Left(((), writer)) => writer.await,
        // The writer stopped (write failed, or an answer closed the connection).
        Either::Right(((), _)) => {}
    }
}

/// The reader half: wait for bytes holding no buffer while idle, parse each
/// request, queue its answer slot.
async fn read_requests(ctx: Rc<AgentLoop>, conn: Rc<UnixConn>, q: Rc<OutQueue>) {
    let mut buf: Vec<u8> = Vec::new();
    // Invariant: `buf[..pos]` is requests already started; the next one
    // starts at `pos`. Consumed bytes are dropped when the buffer empties
    // or before it is read into again, not per request: a pipelined batch
    // is not moved down once per request it holds.
    let mut pos = 0;
    loop {
        while q.slots.borrow().len() >= PIPELINE_MAX {
            q.room.notified().await;
        }
        if buf.is_empty() {
            let deadline = Instant::now() + ctx.server.settings().timeouts.keep_alive;
            if serve::wait_for_request!(&*conn, buf, deadline, ctx.stopping) != serve::Idle::Request
            {
                break;
            }
        }
        let next = match begin(&ctx, &conn, &mut buf, &mut pos) {
            Next::Started(started) => Ok(started),
            Next::Read(read) => read.await.map(|(started, end)| {
                pos = end;
                started
            }),
        };
        match next {
            Ok((slot, close)) => {
                q.slots.borrow_mut().push_back((slot, close));
                q.more.notify();
                if close {
                    break;
                }
            }
            Err(None) => break,
            Err(Some(rejection)) => {
                q.slots
                    .borrow_mut()
                    .push_back((AnswerSlot::Ready(rejection), true));
                q.more.notify();
                break;
            }
        }
        if ctx.stopping.is_set() {
            break;
        }
        if pos == buf.len() {
            buf = Vec::new(); // release the capacity while idle
            pos = 0;
        }
    }
    q.reader_done.set(true);
    q.more.notify();
}

/// The writer half: write each answer as soon as it and all before it are
/// done, together with the answers behind it that are already done (one
/// write per batch, not one per answer; [`WRITE_BATCH_MAX_BYTES`] bounds a
/// batch).
async fn write_answers(ctx: Rc<AgentLoop>, conn: Rc<UnixConn>, q: Rc<OutQueue>) {
    loop {
        let front = q.slots.borrow_mut().pop_front();
        let Some((slot, mut close)) = front else {
            if q.reader_done.get() {
                return;
            }
            q.more.notified().await;
            continue;
        };
        q.room.notify();
        let mut out = match slot {
            AnswerSlot::Ready(b) => b,
            AnswerSlot::Pending(mut rx, is_head) => {
                let answer = (&mut rx).await;
                ctx.replies.recycle(rx);
                match answer {
                    Ok(b) => b,
                    Err(_) => lost_answer(is_head),
                }
            }
        };
        if !close {
            close = gather_done(&ctx, &q, &mut out);
        }
        match rt::with_deadline(
            Instant::now() + ctx.server.settings().timeouts.client,
            conn.write_all(out),
        )
        .await
        {
            Ok((Ok(()), b)) => ctx.server.put_buf(b),
            _ => return,
        }
        if close {
            conn.shutdown_write();
            return;
        }
    }
}

/// Append to `out` the answers at the front of the queue that are already
/// done, in request order, while the batch stays within
/// [`WRITE_BATCH_MAX_BYTES`]; stops at the first answer still being worked
/// on, and after one that closes the connection. Returns whether the last
/// answer appended closes it.
///
/// Invariant: an answer is appended whole or not at all, so every answer in
/// a batch is exactly the bytes its own task produced (a failed request's
/// error page included), in the order the requests arrived.
fn gather_done(ctx: &AgentLoop, q: &OutQueue, out: &mut Vec<u8>) -> bool {
    let mut slots = q.slots.borrow_mut();
    while let Some((slot, close)) = slots.front_mut() {
        let done = match slot {
            AnswerSlot::Ready(b) => std::mem::take(b),
            AnswerSlot::Pending(rx, is_head) => match rx.try_recv() {
                Ok(Some(b)) => b,
                Ok(None) => break,
                Err(_) => lost_answer(*is_head),
            },
        };
        if out.len() + done.len() > WRITE_BATCH_MAX_BYTES {
            // The next batch starts with it.
            *slot = AnswerSlot::Ready(done);
            break;
        }
        let close = *close;
        if let Some((AnswerSlot::Pending(rx, _), _)) = slots.pop_front() {
            ctx.replies.recycle(rx);
        }
        out.extend_from_slice(&done);
        ctx.server.put_buf(done);
        q.room.notify();
        if close {
            return true;
        }
    }
    false
}

/// The answer to a request whose task ended without one (it cannot, short
/// of a bug): a 500 that closes the connection.
fn lost_answer(is_head: bool) -> Vec<u8> {
    let mut b = Vec::new();
    handler::page(500, handler::MSG_UNKNOWN, is_head, true, &mut b);
    b
}

/// A request started, or the boxed future that reads it.
enum Next<'a> {
    /// Started at once (see [`begin`]): its answer slot, and whether the
    /// connection closes after it.
    Started((AnswerSlot, bool)),
    /// Being read by [`next_request`].
    Read(Pin<Box<dyn Future<Output = NextRequest> + 'a>>),
}

/// What [`next_request`] gives: the answer slot, whether the connection
/// closes after it and where the bytes behind the request start in the
/// buffer; or a rejection to write last (`Some`) or nothing.
type NextRequest = Result<((AnswerSlot, bool), usize), Option<Vec<u8>>>;

/// The request whose first bytes are at `buf[*pos..]`. Already whole there
/// with no body (a GET or HEAD: a pipelined batch is many of them), it
/// starts at once and `*pos` moves past it; anything else is read by the
/// boxed [`next_request`] (boxed so that the idle reader stays small), which
/// gets a head already whole here rather than parsing it again, and a
/// buffer that starts with the request (the bytes before `*pos` are dropped
/// first, once per read rather than once per request). Not `async`: the
/// parsed head must not be kept in the reader's state across its wait.
fn begin<'a>(
    ctx: &'a Rc<AgentLoop>,
    conn: &'a UnixConn,
    buf: &'a mut Vec<u8>,
    pos: &mut usize,
) -> Next<'a> {
    let head = match http::parse_request(&buf[*pos..], &ctx.server.settings().limits) {
        Ok(Some(head)) if head.body == RequestBody::None => {
            inc(&ctx.m.requests);
            let end = head.head_len;
            return Next::Started(start(ctx, buf, pos, head, end, Vec::new()));
        }
        Ok(Some(head)) => Some(head),
        // A partial head is read on; an error is found again by the
        // reader, which refuses it.
        Ok(None) | Err(_) => None,
    };
    buf.drain(..*pos);
    *pos = 0;
    let head_deadline = Instant::now() + ctx.server.settings().timeouts.http_request;
    Next::Read(Box::pin(next_request(ctx, conn, buf, head, head_deadline)))
}

/// Read one request (its first bytes are in `buf`; `head`, its head when
/// that is already whole there) and start answering it on its own task.
/// Returns the answer slot, whether the connection closes after it and
/// where the pipelined bytes that followed start in `buf`;
/// `Err(Some(bytes))` is a rejection to write last, `Err(None)` a
/// connection that just ends.
async fn next_request(
    ctx: &Rc<AgentLoop>,
    conn: &UnixConn,
    buf: &mut Vec<u8>,
    head: Option<RequestHead>,
    head_deadline: Instant,
) -> NextRequest {
    let Settings { timeouts, limits } = ctx.server.settings();
    // 1. The head.
    let head = match head {
        Some(head) => head,
        None => match serve::read_head(conn, buf, limits, head_deadline).await {
            Ok(head) => head,
            Err(e) => {
                let status = e.refusal().map(|why| refused(&ctx.m, why));
                return Err(status.map(|s| http::canned(s).to_vec()));
            }
        },
    };
    inc(&ctx.m.requests);

    // 2. The body.
    let mut decoded = Vec::new();
    let (max_body, client) = (limits.max_body_bytes, timeouts.client);
    let end = match serve::read_body(conn, buf, &head, max_body, client, Some(&mut decoded)).await {
        Ok(end) => end,
        Err(e) => {
            let status = e.refusal().map(|why| refused(&ctx.m, why));
            let is_head = head.method == Method::Head;
            return Err(status.map(|s| http::canned_for(s, is_head).to_vec()));
        }
    };

    let mut pos = 0;
    let started = start(ctx, buf, &mut pos, head, end, decoded);
    Ok((started, pos))
}

/// Start answering the request of `end` bytes at `buf[*pos..]` (its head
/// parsed, with spans from `*pos`; `decoded` a chunked body's payload) on
/// its own task, and move `*pos` past it. The bytes behind it stay in
/// `buf`; when there are none, the task takes the whole buffer rather than
/// a copy of the request (`buf` is left empty, `*pos` 0). Returns its answer
/// slot and whether the connection closes after it.
fn start(
    ctx: &Rc<AgentLoop>,
    buf: &mut Vec<u8>,
    pos: &mut usize,
    head: RequestHead,
    end: usize,
    decoded: Vec<u8>,
) -> (AnswerSlot, bool) {
    // Resolve, sign, forward on its own task. Draining does not add
    // `Connection: close` (metaproxy's proxy would take that as "one-shot
    // agent" for good); the reader stops instead, and a pooled client
    // re-sends what it had pipelined behind.
    let keep = head.keep_alive;
    let is_head = head.method == Method::Head;
    let at = *pos;
    // `pooled`: the request was copied into a buffer of the free list, and
    // goes back there. The read buffer itself is as large as what one read
    // brought (the idle read sizes it so): freed, not kept, or the free
    // list would fill with buffers that answers outgrow at once.
    let (request, from, pooled) = if at + end == buf.len() {
        *pos = 0;
        (std::mem::take(buf), at, false)
    } else {
        *pos = at + end;
        let mut request = ctx.server.take_buf();
        request.extend_from_slice(&buf[at..at + end]);
        (request, 0, true)
    };
    let (tx, rx) = ctx.replies.channel();
    let task = Task {
        ctx: ctx.clone(),
        request,
        from,
        pooled,
        head,
        decoded,
        tx,
    };
    // One task type per link (see `ApiLink`): the agent's own loops have
    // the pool, so their tasks have no room for an in-process render.
    match &ctx.pool {
        ApiLink::Pool(link) => rt::spawn(task.run(link.clone())),
        ApiLink::InProcess(link) => rt::spawn(task.run(link.clone())),
    }
    (AnswerSlot::Pending(rx, is_head), !keep)
}

/// A request started on its own task: its bytes (from `from` on; `pooled`:
/// the buffer came from the free list and goes back), parsed head and
/// decoded body, and where its answer goes.
struct Task {
    ctx: Rc<AgentLoop>,
    request: Vec<u8>,
    from: usize,
    pooled: bool,
    head: RequestHead,
    decoded: Vec<u8>,
    tx: reply::Sender<Vec<u8>>,
}

impl Task {
    /// Answer it, forwarding through `link`.
    async fn run<L: Link>(self, link: Rc<L>) {
        let close = !self.head.keep_alive;
        let request = &self.request[self.from..];
        let out =
            handler::respond(&self.ctx, &*link, request, &self.head, &self.decoded, close).await;
        if self.pooled {
            self.ctx.server.put_buf(self.request);
        }
        let _ = self.tx.send(out);
    }
}

/// The agent's edge for requests refused before they were resolved: the
/// status, and the event counted.
pub(super) fn refused(m: &LoopMetrics, why: Refusal) -> u16 {
    inc(match why {
        Refusal::Http(HttpError::Smuggling) => &m.rx_smuggling,
        Refusal::Http(_) => &m.rx_malformed,
        Refusal::HeadTimeout | Refusal::BodyTimeout => &m.rx_timeout,
    });
    why.status()
}
