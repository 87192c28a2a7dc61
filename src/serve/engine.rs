//! The connection engine of the three daemons: a per-loop [`Server`] (the
//! connections it serves, their drain, the free list of buffers, the accept
//! loop on [`admit`]) and the sequential keep-alive connection
//! ([`serve_conn`]: idle → head → body → answer, with every deadline, a
//! `reject` that lingers, and HEAD framing) that runs a [`Handler`].
//!
//! A daemon supplies only the handler: the proxy rewrites and relays, the API
//! renders. The agent, whose pipelined requests are resolved concurrently,
//! keeps its own reader/writer pair but reads each request with the same
//! [`super::read_head`] and [`super::read_body`], and
//! runs on the same [`Server`].
//!
//! Why this shape: the three servers each grew their own accept loop, active
//! count, free list, drain-by-polling and `reject`, and fixes (linger on
//! reject, throttled accept errors, HEAD framing) landed in one copy only.
//!
//! Rejected:
//! - one pipelined engine for all three (the agent's reader/writer): a
//!   oneshot, an `Rc` of the connection and a spawned task per request, and
//!   a larger idle task, for the proxy and the API, which answer in order
//!   anyway (their handlers are one upstream exchange, or microseconds);
//! - a `dyn Handler`: a boxed future per request beyond the one we already
//!   box, and the idle task would hold a fat pointer; generics compile to the
//!   code the daemons had by hand (no more instructions per request, and an
//!   idle connection costs 1 464 bytes, was 1 673: BENCHMARKS.md);
//! - draining by polling the active count every 20 ms (what the three did):
//!   the last connection to close wakes the drain ([`Server::drain`]).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::rc::Rc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::http::{self, Limits, Method, RequestBody, RequestHead};
use crate::log;
use crate::rt::sync::{unbounded, Event, Notify, UnboundedReceiver, UnboundedSender};
use crate::rt::{self, Stream};
use crate::serve::admit::{self, Accept, Admission, Slot};
use crate::serve::{read_body, read_head, HeadError, Idle};

/// Upper bound on a connection task's size: it is what every idle
/// keep-alive connection costs (see docs/adr/0001-runtime.md); checked (debug
/// builds) for every task [`Server::spawn`] starts.
pub const CONN_TASK_MAX_BYTES: usize = 1536;
/// Buffers kept in a loop's free list. One value for the three daemons: a
/// list only grows to the loop's peak of answers in flight, and a buffer on
/// it is at most [`FREE_BUFFER_MAX_BYTES`].
pub const FREE_BUFFERS: usize = 256;
/// Largest buffer put back on the free list (a larger one is freed).
pub const FREE_BUFFER_MAX_BYTES: usize = 64 * 1024;
/// At most this many answers go out in one write to a pipelining client
/// ([`Handler::BATCH_WRITES`]), and at most [`FREE_BUFFER_MAX_BYTES`] of them:
/// the first answer of a batch waits for at most 15 handlers behind it.
pub const MAX_BATCH_ANSWERS: usize = 16;

/// One loop's connections: the limits and timeouts they are held to, how
/// many are open (for drain and reports), and the buffers they recycle. Per
/// loop, never shared across threads.
pub struct Server {
    settings: Settings,
    active: Cell<usize>,
    /// Notified when `active` falls to zero (wakes [`Server::drain`]).
    drained: Notify,
    free: RefCell<Vec<Vec<u8>>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("active", &self.active.get())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A loop's server, with no connection yet.
    pub fn new(settings: Settings) -> Rc<Server> {
        Rc::new(Server {
            settings,
            active: Cell::new(0),
            drained: Notify::default(),
            free: RefCell::new(Vec::new()),
        })
    }

    /// What its connections are held to.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Connections this loop serves now.
    pub fn active(&self) -> usize {
        self.active.get()
    }

    /// A cleared buffer from the free list (or a new, empty one).
    pub fn take_buf(&self) -> Vec<u8> {
        self.free.borrow_mut().pop().unwrap_or_default()
    }

    /// Return a buffer for reuse (dropped when the list is full or it grew
    /// beyond [`FREE_BUFFER_MAX_BYTES`]).
    pub fn put_buf(&self, mut b: Vec<u8>) {
        let mut f = self.free.borrow_mut();
        if f.len() < FREE_BUFFERS && b.capacity() <= FREE_BUFFER_MAX_BYTES {
            b.clear();
            f.push(b);
        }
    }

    /// Run one accepted connection as its own task, counted as active until
    /// it ends. `slot` (its place under the listener's caps) is freed after
    /// `conn` completed, so after the future dropped the socket it owns.
    pub fn spawn(self: &Rc<Self>, slot: Slot, conn: impl Future<Output = ()> + 'static) {
        use futures_util::FutureExt;
        self.active.set(self.active.get() + 1);
        let active = Active {
            server: self.clone(),
            _slot: slot,
        };
        // `map`, not `async move { conn.await; drop(active) }`: an async
        // block stores the future it captured and the one it awaits, twice
        // the size of every idle connection in a debug build.
        let task = conn.map(move |()| drop(active));
        debug_assert!(
            std::mem::size_of_val(&task) <= CONN_TASK_MAX_BYTES,
            "idle connection state grew: {} bytes",
            std::mem::size_of_val(&task)
        );
        rt::spawn(task);
    }

    /// The accept loop of a listener ([`admit::accept_loop`]): every
    /// connection `make` turns into a future runs as a task of this server.
    pub async fn accept<A: Accept, F: Future<Output = ()> + 'static>(
        self: Rc<Self>,
        acceptor: A,
        admission: Rc<Admission>,
        mut make: impl FnMut(A::Conn) -> F,
    ) {
        admit::accept_loop(acceptor, admission, |conn, slot| {
            self.spawn(slot, make(conn));
        })
        .await;
    }

    /// Wait until every connection has ended, or `timeout` passed (then
    /// warn, naming the loop with `label`, and return: the loop's end drops
    /// what is left). Call it after the accepts were dropped and the
    /// connections told to stop.
    pub async fn drain(&self, label: &str, timeout: Duration) {
        let all_closed = async {
            while self.active.get() > 0 {
                self.drained.notified().await;
            }
        };
        if rt::with_deadline(Instant::now() + timeout, all_closed)
            .await
            .is_err()
        {
            log::warn(format_args!(
                "{label}: drain timeout, closing {} connection(s)",
                self.active.get()
            ));
        }
    }
}

/// Counts a connection task as active and holds its [`Slot`]; dropped when
/// the task ends, however it ends.
struct Active {
    server: Rc<Server>,
    _slot: Slot,
}

impl Drop for Active {
    fn drop(&mut self) {
        let n = self.server.active.get().saturating_sub(1);
        self.server.active.set(n);
        if n == 0 {
            self.server.drained.notify();
        }
    }
}

/// The message of a daemon whose loops are only ever told to stop (the
/// agent, the API): stop accepting, drain, exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stop;

/// Per-loop receivers of a control channel, handed out once each to the
/// loop threads (which start after the senders were created).
struct Inboxes<T>(Vec<Mutex<Option<UnboundedReceiver<T>>>>);

/// Start `workers` loops ([`rt::run_loops`]), each running `make(index,
/// its control receiver)`; returns the control senders, in loop order, and
/// the threads (see [`join_loops`]).
///
/// # Errors
/// A thread could not start.
#[allow(clippy::type_complexity)] // the two halves a daemon's handle keeps
pub fn run_loops<T, F, Fut>(
    workers: usize,
    name: &str,
    make: F,
) -> io::Result<(
    Vec<UnboundedSender<T>>,
    Vec<std::thread::JoinHandle<io::Result<()>>>,
)>
where
    T: Send + 'static,
    F: Fn(usize, UnboundedReceiver<T>) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = io::Result<()>> + 'static,
{
    let (controls, inboxes) = control_channels(workers);
    let inboxes = std::sync::Arc::new(inboxes);
    let threads = rt::run_loops(workers, name, move |i| {
        let rx = inboxes.take(i);
        let make = make.clone();
        // The main future waits for control messages (then drains) while
        // the tasks it spawned serve: it need not be polled every turn.
        rt::when_woken(async move { make(i, rx?).await })
    })?;
    Ok((controls, threads))
}

/// One control channel per loop: the senders, and the receivers to hand out.
fn control_channels<T>(workers: usize) -> (Vec<UnboundedSender<T>>, Inboxes<T>) {
    let (tx, rx): (Vec<_>, Vec<_>) = (0..workers)
        .map(|_| {
            let (tx, rx) = unbounded();
            (tx, Mutex::new(Some(rx)))
        })
        .unzip();
    (tx, Inboxes(rx))
}

impl<T> Inboxes<T> {
    /// Loop `i`'s receiver (the first call for `i` only).
    ///
    /// # Errors
    /// It was already taken (or `i` is out of range).
    fn take(&self, i: usize) -> io::Result<UnboundedReceiver<T>> {
        self.0
            .get(i)
            .and_then(|m| m.lock().ok().and_then(|mut r| r.take()))
            .ok_or_else(|| io::Error::other("control channel already taken"))
    }
}

/// Wait for every loop thread; the first failure wins (a panic is one,
/// named after `daemon`).
///
/// # Errors
/// A loop failed or panicked.
pub fn join_loops(
    threads: impl IntoIterator<Item = std::thread::JoinHandle<io::Result<()>>>,
    daemon: &str,
) -> io::Result<()> {
    let mut first = Ok(());
    for t in threads {
        let r = t
            .join()
            .unwrap_or_else(|_| Err(io::Error::other(format!("{daemon} loop panicked"))));
        if first.is_ok() {
            first = r;
        }
    }
    first
}

/// The client-side timeouts a connection is held to (haproxy's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From the first byte of a request (the accept, for the first) to its
    /// complete head.
    pub http_request: Duration,
    /// Idle time between requests.
    pub keep_alive: Duration,
    /// Each body read and each response write.
    pub client: Duration,
}

/// What a daemon's connections are held to, read from its config when the
/// loop starts.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// The client-side timeouts.
    pub timeouts: Timeouts,
    /// Head and body limits.
    pub limits: Limits,
}

/// The [`Settings`] of a daemon's runtime config `$cfg`: its
/// `timeouts.{http_request, keep_alive, client}` and its `limits` (the
/// proxy's, the agent's and the API's configs all name them so; a macro
/// because they are three different types, and by name because three
/// `Duration`s in a row are easy to swap).
macro_rules! settings {
    ($cfg:expr) => {
        $crate::serve::Settings {
            timeouts: $crate::serve::Timeouts {
                http_request: $cfg.timeouts.http_request,
                keep_alive: $cfg.timeouts.keep_alive,
                client: $cfg.timeouts.client,
            },
            limits: $cfg.limits,
        }
    };
}
pub(crate) use settings;

/// One request, read whole, as a [`Handler`] sees it.
#[derive(Debug)]
pub struct Request<'a> {
    /// The read buffer: the head's spans point into it.
    pub buf: &'a [u8],
    /// The parsed head.
    pub head: &'a RequestHead,
    /// The body: raw bytes as framed, or the decoded payload of a chunked
    /// body when the handler asks for it ([`Handler::DECODE_CHUNKED`]).
    pub body: &'a [u8],
    /// Where the request ends in `buf` (pipelined bytes may follow).
    pub end: usize,
    /// When its head's first bytes were there (for access logs).
    pub started: Instant,
}

impl Request<'_> {
    /// A `HEAD` request (its answer has the head of a `GET` and no body).
    pub fn is_head(&self) -> bool {
        self.head.method == Method::Head
    }
}

/// What a handler made of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The answer is in the buffer given; `keep`: the connection stays open
    /// (the answer did not say `Connection: close`).
    Write {
        /// Keep the connection after this answer.
        keep: bool,
    },
    /// Answer the canned page for this status (framed for a HEAD) and close.
    Reject(u16),
}

/// A daemon's part of a sequential connection ([`serve_conn`]): what to do
/// with a request, and the hooks to count and log what the engine refused.
/// One handler per connection (it may carry the peer's address).
#[allow(async_fn_in_trait)] // thread-per-core: the futures need no `Send`
pub trait Handler {
    /// The connection's socket type.
    type Conn: Stream;
    /// Decode a chunked body into [`Request::body`] (the API) rather than
    /// only frame it (the proxy relays the raw bytes).
    const DECODE_CHUNKED: bool = false;
    /// Answer pipelined requests with one write per batch (the API, whose
    /// handler takes microseconds): an answer is held back while the next
    /// request is already whole in the buffer, and written with the answers
    /// behind it (see [`MAX_BATCH_ANSWERS`]). Off for the proxy: its handler
    /// waits on the agent, and an answer held behind that wait would be late.
    const BATCH_WRITES: bool = false;
    /// This loop's server (settings, free list).
    fn server(&self) -> &Server;
    /// Set when idle connections should close and busy ones close after
    /// their answer (drain, namespace removed).
    fn stop(&self) -> &Event;
    /// The engine refuses the request for `why` (a malformed head: `head` is
    /// `None`; a head that did not arrive within `http_request`; a bad or
    /// late body) and closes after answering the status returned, by
    /// default [`Refusal::status`]; the hook counts and logs it. `started`:
    /// when the head's first bytes were there.
    fn refused(
        &self,
        _buf: &[u8],
        _head: Option<&RequestHead>,
        why: Refusal,
        _started: Instant,
    ) -> u16 {
        why.status()
    }
    /// Called once the head is complete, before the body is read:
    /// `Some(status)` rejects it (the proxy's rate limit).
    fn check_head(&self, _buf: &[u8], _head: &RequestHead, _started: Instant) -> Option<u16> {
        None
    }
    /// Answer `req` into `out` (an empty buffer from the free list).
    async fn answer(&self, conn: &Self::Conn, req: &Request<'_>, out: &mut Vec<u8>) -> Answer;
}

/// Why the engine refused a request before its handler saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The head or body is malformed, ambiguous or over a limit.
    Http(http::HttpError),
    /// The head was not complete within `http_request`.
    HeadTimeout,
    /// A body read waited longer than `client`.
    BodyTimeout,
}

impl Refusal {
    /// The status the client is answered: [`http::HttpError::status`], or 408.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::Http(e) => e.status(),
            Refusal::HeadTimeout | Refusal::BodyTimeout => 408,
        }
    }
}

/// How a connection ended (debug logs, and what the engine does to its socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Answered, nothing left unread: just close.
    Done,
    /// Answered (an error, or a final answer with more request bytes
    /// behind it): close gracefully so the answer is not lost to an RST.
    Linger,
    /// The client closed.
    PeerClosed,
    /// A deadline passed.
    Timeout,
    /// [`Handler::stop`] was set while it was idle.
    Stopping,
    /// A read or write failed.
    IoError,
}

/// Serve one accepted connection with `h` until it ends, then close it the
/// way its end asks for; `accepted` starts the first request's
/// `http_request` deadline.
///
/// Requests pipelined by a client are answered in order, one after another
/// from the same buffer; with [`Handler::BATCH_WRITES`], the answers to the
/// requests that were already whole in the buffer go out in one write (at
/// most [`MAX_BATCH_ANSWERS`]; written before any read, any rejection, and
/// with a final `Connection: close` answer, after which nothing is read).
/// While idle between requests the connection owns no buffer
/// ([`crate::rt::TcpConn::read_idle`]).
pub async fn serve_conn<H: Handler>(h: &H, conn: &H::Conn, accepted: Instant) -> End {
    let end = idle_loop(h, conn, accepted).await;
    match end {
        // A clean end just closes the fd (no extra syscall for a
        // connection-per-request client like cloud-init).
        End::Done | End::PeerClosed => {}
        // Closing with unread request bytes makes the kernel send an RST,
        // which can destroy the answer just written before the client reads
        // it: half-close, drain what is left for a moment, then close.
        End::Linger => super::linger_close(conn).await,
        // A timeout, error or drain: end any IO still queued on it now.
        End::Timeout | End::Stopping | End::IoError => conn.shutdown(),
    }
    end
}

/// The idle loop. Its state is all an idle keep-alive connection costs, so it
/// holds only the wait itself; everything a request needs lives in
/// [`request`]'s future, boxed and freed when the answer is written.
async fn idle_loop<H: Handler>(h: &H, conn: &H::Conn, accepted: Instant) -> End {
    let mut buf: Vec<u8> = Vec::new();
    let mut first = true;
    loop {
        // Wait for the first bytes of the next request, holding no buffer
        // (nor the timeouts: they are read again after the wait).
        if buf.is_empty() {
            let idle_deadline = {
                let t = &h.server().settings.timeouts;
                if first {
                    accepted + t.http_request
                } else {
                    Instant::now() + t.keep_alive
                }
            };
            match super::wait_for_request!(conn, buf, idle_deadline, h.stop()) {
                Idle::Request => {}
                Idle::PeerClosed => return End::PeerClosed,
                Idle::IoError => return End::IoError,
                Idle::Timeout => return End::Timeout,
                Idle::Stopping => return End::Stopping,
            }
        }
        // The head must be complete within `http_request` of its first byte
        // (of the accept, for a connection's first request).
        let http_request = h.server().settings.timeouts.http_request;
        let head_deadline = if first {
            accepted + http_request
        } else {
            Instant::now() + http_request
        };
        first = false;
        if let Err(end) = Box::pin(requests(h, conn, &mut buf, head_deadline)).await {
            return end;
        }
        if buf.is_empty() {
            buf = Vec::new(); // release the capacity while idle
        }
    }
}

/// Answers held back to go out in one write ([`Handler::BATCH_WRITES`]).
#[derive(Default)]
struct Held {
    /// The answers, whole and in request order.
    bytes: Vec<u8>,
    /// How many.
    answers: usize,
}

/// Serve the request whose first bytes are in `buf`, and the pipelined
/// requests behind it while their answers are being batched. `Ok` keeps the
/// connection, with nothing held back; pipelined bytes that followed the
/// last answered request stay in `buf`.
async fn requests<H: Handler>(
    h: &H,
    conn: &H::Conn,
    buf: &mut Vec<u8>,
    mut head_deadline: Instant,
) -> Result<(), End> {
    let mut held = Held::default();
    loop {
        request(h, conn, buf, head_deadline, &mut held).await?;
        if held.answers == 0 {
            return Ok(());
        }
        head_deadline = Instant::now() + h.server().settings.timeouts.http_request;
    }
}

/// Write the answers held back, if any, within `client`.
async fn flush<S: Stream>(
    server: &Server,
    conn: &S,
    held: &mut Held,
    client: Duration,
) -> Result<(), End> {
    if held.answers == 0 {
        return Ok(());
    }
    held.answers = 0;
    let out = std::mem::take(&mut held.bytes);
    match rt::with_deadline(Instant::now() + client, conn.write_all(out)).await {
        Ok((Ok(()), b)) => {
            server.put_buf(b);
            Ok(())
        }
        Ok((Err(_), _)) => Err(End::IoError),
        Err(rt::Elapsed) => Err(End::Timeout),
    }
}

/// The head of the request at the start of `buf` when it and its body are
/// already whole there (no read needed), else `None`.
fn buffered_request(buf: &[u8], limits: &Limits) -> Option<RequestHead> {
    let head = http::parse_request(buf, limits).ok()??;
    let whole = match head.body {
        RequestBody::None => true,
        RequestBody::Length(n) => {
            usize::try_from(n).is_ok_and(|n| buf.len() >= head.head_len.saturating_add(n))
        }
        RequestBody::Chunked => false,
    };
    whole.then_some(head)
}

/// Read one request (its first bytes are in `buf`), have `h` answer it,
/// write the answer, after the answers `held` back; or, batching, add it to
/// them when the next request is already whole in `buf`. `Ok` keeps the
/// connection; pipelined bytes that followed stay in `buf`.
///
/// Answers are held back only while no read is needed: before anything
/// that may wait on the client, and before any rejection, they are written.
async fn request<H: Handler>(
    h: &H,
    conn: &H::Conn,
    buf: &mut Vec<u8>,
    head_deadline: Instant,
    held: &mut Held,
) -> Result<(), End> {
    let started = Instant::now();
    let server = h.server();
    let Settings { timeouts, limits } = &server.settings;
    let client = timeouts.client;
    // 1. The head: already parsed when answers are held back (it was whole
    // in the buffer), else read.
    let buffered = if held.answers > 0 {
        let b = buffered_request(buf, limits);
        if b.is_none() {
            flush(server, conn, held, client).await?;
        }
        b
    } else {
        None
    };
    let read = match buffered {
        Some(head) => Ok(head),
        None => read_head(conn, buf, limits, head_deadline).await,
    };
    let head = match read {
        Ok(head) => head,
        Err(HeadError::Malformed(e)) => {
            let status = h.refused(buf, None, Refusal::Http(e), started);
            return Err(reject(conn, status, false, client).await);
        }
        Err(HeadError::Timeout) => {
            let status = h.refused(buf, None, Refusal::HeadTimeout, started);
            return Err(reject(conn, status, false, client).await);
        }
        Err(HeadError::Closed) => return Err(End::PeerClosed),
        Err(HeadError::Io) => return Err(End::IoError),
    };
    let is_head = head.method == Method::Head;
    if let Some(status) = h.check_head(buf, &head, started) {
        flush(server, conn, held, client).await?;
        return Err(reject(conn, status, is_head, client).await);
    }

    // 2. The body (bounded by `max_body_bytes` inside the parser/scanner).
    let mut decoded = Vec::new();
    let max_body = limits.max_body_bytes;
    let decode = H::DECODE_CHUNKED.then_some(&mut decoded);
    let end = match read_body(conn, buf, &head, max_body, client, decode).await {
        Ok(end) => end,
        Err(e) => {
            let Some(why) = e.refusal() else {
                return Err(End::PeerClosed);
            };
            let status = h.refused(buf, Some(&head), why, started);
            flush(server, conn, held, client).await?;
            return Err(reject(conn, status, is_head, client).await);
        }
    };
    let body: &[u8] = match head.body {
        RequestBody::Chunked if H::DECODE_CHUNKED => &decoded,
        _ => &buf[head.head_len..end],
    };

    // 3. The answer.
    let req = Request {
        buf,
        head: &head,
        body,
        end,
        started,
    };
    let mut out = server.take_buf();
    let keep = match h.answer(conn, &req, &mut out).await {
        Answer::Write { keep } => keep,
        Answer::Reject(status) => {
            server.put_buf(out);
            flush(server, conn, held, client).await?;
            return Err(reject(conn, status, is_head, client).await);
        }
    };
    // Behind the answers held back, in order.
    if held.answers > 0 {
        held.bytes.extend_from_slice(&out);
        server.put_buf(out);
    } else {
        held.bytes = out;
    }
    held.answers += 1;
    // Hold it while the next request is already here (no read to wait on)
    // and the batch has room; a final answer is written at once.
    let batch = H::BATCH_WRITES
        && keep
        && buf.len() > end
        && held.answers < MAX_BATCH_ANSWERS
        && held.bytes.len() < FREE_BUFFER_MAX_BYTES;
    if !batch {
        flush(server, conn, held, client).await?;
    }
    if !keep {
        return Err(if buf.len() > end {
            End::Linger
        } else {
            End::Done
        });
    }
    // Keep any pipelined bytes that followed this request.
    buf.drain(..end);
    Ok(())
}

/// Send the canned error page for `status` (framed for a HEAD when
/// `is_head`; it says `Connection: close`) within `client`; the connection
/// then lingers and closes.
pub async fn reject<S: Stream>(conn: &S, status: u16, is_head: bool, client: Duration) -> End {
    let _ = rt::with_deadline(
        Instant::now() + client,
        conn.write_static(http::canned_for(status, is_head)),
    )
    .await;
    End::Linger
}
