//! Downstream HTTP/1.1 plumbing shared by the three servers (the proxy, the
//! agent and the API): waiting for the next request on an idle connection,
//! reading a request body within the client timeout, answering
//! `Expect: 100-continue`, canned rejections, and lingering before a close
//! that leaves request bytes unread.
//!
//! The proxy and the API run their connections on the [`engine`] (each
//! supplies a [`Handler`]); the agent, which resolves pipelined requests
//! concurrently, keeps its own reader/writer on the same [`Server`], head
//! reader [`read_head`] and body reader [`read_body`]: the three must agree
//! on how a request is read and bounded, and one copy keeps the smuggling
//! rules in one place. They share one accept loop and its connection caps:
//! [`admit`].

pub mod admit;
pub mod engine;

pub(crate) use engine::settings;
pub use engine::{
    join_loops, reject, run_loops, serve_conn, Answer, End, Handler, Refusal, Request, Server,
    Settings, Stop, Timeouts, CONN_TASK_MAX_BYTES,
};

use std::time::{Duration, Instant};

use crate::http::{
    self, ChunkProgress, ChunkedScanner, HttpError, Limits, RequestBody, RequestHead,
};
use crate::rt::{self, Stream};

/// Bytes asked for per read while a request (head or body) arrives, and
/// while lingering.
pub const READ_CHUNK_BYTES: usize = 4096;

/// How waiting for the next request on an idle connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// Its first bytes are in the buffer.
    Request,
    /// EOF.
    PeerClosed,
    /// The read failed.
    IoError,
    /// Nothing arrived before the deadline.
    Timeout,
    /// `stop` was set (drain, shutdown, namespace removed).
    Stopping,
}

/// Wait until the first bytes of the next request are in `buf` (an empty
/// `Vec<u8>` place), until `deadline`, or until the `stop` [`Event`] is set;
/// evaluates to an [`Idle`]. The wait holds no buffer
/// ([`rt::Stream::read_idle`]).
///
/// A macro, not a function: this wait is most of what an idle keep-alive
/// connection costs, and expanded in place its futures share the caller's
/// state. As an `async fn` (measured: the proxy's connection task grew from
/// 1 168 to 1 224 bytes) its arguments stay stored for the whole wait, and
/// an `async` block returned from a function stores its captures twice once
/// pinned.
macro_rules! wait_for_request {
    ($conn:expr, $buf:expr, $deadline:expr, $stop:expr) => {{
        let read = $crate::rt::with_deadline(
            $deadline,
            $crate::rt::Stream::read_idle(
                $conn,
                ::std::mem::take(&mut $buf),
                $crate::serve::IDLE_READ_BYTES,
            ),
        );
        let stop = $stop.wait();
        ::futures_util::pin_mut!(read, stop);
        match ::futures_util::future::select(read, stop).await {
            ::futures_util::future::Either::Left((Ok((Ok(n), b)), _)) => {
                $buf = b;
                if n == 0 {
                    $crate::serve::Idle::PeerClosed
                } else {
                    $crate::serve::Idle::Request
                }
            }
            ::futures_util::future::Either::Left((Ok((Err(_), _)), _)) => {
                $crate::serve::Idle::IoError
            }
            ::futures_util::future::Either::Left((Err($crate::rt::Elapsed), _)) => {
                $crate::serve::Idle::Timeout
            }
            ::futures_util::future::Either::Right(_) => $crate::serve::Idle::Stopping,
        }
    }};
}
pub(crate) use wait_for_request;

/// What an idle wait asks for when the buffer ring is empty.
pub const IDLE_READ_BYTES: usize = READ_CHUNK_BYTES;

/// Why a head could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// It is malformed or over a limit: answer [`HttpError::status`] and close.
    Malformed(HttpError),
    /// It was not complete by the deadline (408).
    Timeout,
    /// EOF before it was complete.
    Closed,
    /// A read failed.
    Io,
}

impl HeadError {
    /// What the client is refused for, if it is still there to be told.
    pub fn refusal(self) -> Option<Refusal> {
        match self {
            HeadError::Malformed(e) => Some(Refusal::Http(e)),
            HeadError::Timeout => Some(Refusal::HeadTimeout),
            HeadError::Closed | HeadError::Io => None,
        }
    }
}

/// Complete the head of the request whose first bytes are in `buf`, reading
/// until `deadline`; the head-size cap is checked before every re-read (the
/// parser refuses a head over `limits`).
///
/// # Errors
/// See [`HeadError`].
pub async fn read_head<S: Stream>(
    conn: &S,
    buf: &mut Vec<u8>,
    limits: &Limits,
    deadline: Instant,
) -> Result<RequestHead, HeadError> {
    loop {
        match http::parse_request(buf, limits) {
            Ok(Some(h)) => return Ok(h),
            Ok(None) => {}
            Err(e) => return Err(HeadError::Malformed(e)),
        }
        let taken = std::mem::take(buf);
        let (res, b) =
            match rt::with_deadline(deadline, conn.read_append(taken, READ_CHUNK_BYTES)).await {
                Ok(r) => r,
                Err(rt::Elapsed) => return Err(HeadError::Timeout),
            };
        *buf = b;
        match res {
            Ok(0) => return Err(HeadError::Closed),
            Ok(_) => {}
            Err(_) => return Err(HeadError::Io),
        }
    }
}

/// Why a body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// Malformed or over a limit (413, 400, 501): answer
    /// [`HttpError::status`] and close.
    Refused(HttpError),
    /// A read waited longer than `client`: answer 408 and close.
    Timeout,
    /// The client went away (EOF or IO error): just close.
    Gone,
}

impl BodyError {
    /// What the client is refused for, if it is still there to be told.
    pub fn refusal(self) -> Option<Refusal> {
        match self {
            BodyError::Refused(e) => Some(Refusal::Http(e)),
            BodyError::Timeout => Some(Refusal::BodyTimeout),
            BodyError::Gone => None,
        }
    }
}

/// Read the body of the request whose head is at the start of `buf`; returns
/// the offset in `buf` where the request ends (pipelined bytes may follow).
/// A chunked body is kept raw in `buf` and, when `decoded` is given, its
/// payload is appended there. Each read waits at most `client`. `buf` keeps
/// every byte it had on every path, a timeout included (the caller still
/// logs the head from it).
///
/// # Errors
/// See [`BodyError`].
pub async fn read_body<S: Stream>(
    conn: &S,
    buf: &mut Vec<u8>,
    head: &RequestHead,
    max_body_bytes: u64,
    client: Duration,
    mut decoded: Option<&mut Vec<u8>>,
) -> Result<usize, BodyError> {
    let start = head.head_len;
    let mut scanner = match head.body {
        RequestBody::None => return Ok(start),
        RequestBody::Length(_) => None,
        RequestBody::Chunked => Some(ChunkedScanner::new(max_body_bytes)),
    };
    let mut scanned = 0usize;
    let mut sent_continue = false;
    let mut chunk: Vec<u8> = Vec::new();
    loop {
        match (&head.body, scanner.as_mut()) {
            (RequestBody::Length(n), _) => {
                let n =
                    usize::try_from(*n).map_err(|_| BodyError::Refused(HttpError::BodyTooLarge))?;
                if buf.len() >= start + n {
                    return Ok(start + n);
                }
            }
            (_, Some(sc)) => {
                let input = &buf[start + scanned..];
                let progress = match decoded.as_deref_mut() {
                    Some(out) => sc.decode(input, out),
                    None => sc.scan(input),
                };
                match progress {
                    Ok(ChunkProgress::Done { consumed }) => return Ok(start + scanned + consumed),
                    Ok(ChunkProgress::NeedMore { consumed }) => scanned += consumed,
                    Err(e) => return Err(BodyError::Refused(e)),
                }
            }
            _ => return Ok(start),
        }
        if head.expect_continue && !sent_continue {
            sent_continue = true;
            let w = rt::with_deadline(
                Instant::now() + client,
                conn.write_static(http::CONTINUE_100),
            )
            .await;
            if !matches!(w, Ok(Ok(()))) {
                return Err(BodyError::Gone);
            }
        }
        // Invariant: `buf` (the head the caller still logs and answers from)
        // never leaves this function. A read that times out is cancelled and
        // its buffer stays with the kernel until the cancellation completes,
        // so the read goes to `chunk`, which may be lost; `buf` may not. The
        // body of a metadata request nearly always arrives with its head, so
        // `chunk` is rarely allocated at all.
        let (res, b) = match rt::with_deadline(
            Instant::now() + client,
            conn.read_append(std::mem::take(&mut chunk), READ_CHUNK_BYTES),
        )
        .await
        {
            Ok(r) => r,
            Err(rt::Elapsed) => return Err(BodyError::Timeout),
        };
        chunk = b;
        match res {
            Ok(0) | Err(_) => return Err(BodyError::Gone),
            Ok(_) => {
                buf.extend_from_slice(&chunk);
                chunk.clear();
            }
        }
    }
}

/// Longest a rejected client is drained before its socket is closed.
pub const LINGER: Duration = Duration::from_millis(500);
/// Most bytes drained while lingering.
pub const LINGER_BYTES: usize = 64 * 1024;

/// Close gracefully after a final answer with request bytes still unread (a
/// rejection, or `Connection: close` with more pipelined behind it). Closing
/// with unread bytes makes the kernel send an RST, which can destroy the
/// answer just written before the client reads it; so half-close, discard
/// what the client still sends (bounded by [`LINGER`] and [`LINGER_BYTES`]),
/// then let the caller drop the fd.
pub async fn linger_close<S: Stream>(conn: &S) {
    conn.shutdown_write();
    let deadline = Instant::now() + LINGER;
    let mut drained = 0;
    let mut buf = Vec::new();
    while drained < LINGER_BYTES {
        buf.clear();
        match rt::with_deadline(deadline, conn.read_append(buf, READ_CHUNK_BYTES)).await {
            Ok((Ok(n), b)) if n > 0 => {
                drained += n;
                buf = b;
            }
            _ => break,
        }
    }
}
