//! The client side of one request: a connection slot, connect from the VM's
//! address, send a canned GET, read one response framed by [`crate::http`].
//!
//! Loop-local only (`Rc`, `Cell`): a [`Permits`] caps open connections per
//! loop so 50 000 VMs cannot exhaust file descriptors, and a [`BufPool`]
//! recycles read buffers so a waiting VM holds none.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use crate::http::{self, ChunkProgress, ChunkedScanner, Limits, ResponseBody};
use crate::rt::TcpConn;
use crate::serve::READ_CHUNK_BYTES;
/// Largest response body a VM accepts (metadata answers are a few KiB).
pub const MAX_RESPONSE_BODY_BYTES: u64 = 1024 * 1024;
/// Buffers kept in a loop's pool; more are freed.
const POOL_MAX_BUFFERS: usize = 1024;
/// A buffer that grew past this is freed rather than pooled.
const POOL_MAX_BUFFER_BYTES: usize = 64 * 1024;

/// A loop's pool of byte buffers.
#[derive(Default)]
pub(crate) struct BufPool(RefCell<Vec<Vec<u8>>>);

impl BufPool {
    pub(crate) fn take(&self) -> Vec<u8> {
        self.0
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(READ_CHUNK_BYTES))
    }

    pub(crate) fn put(&self, mut b: Vec<u8>) {
        let mut pool = self.0.borrow_mut();
        if pool.len() < POOL_MAX_BUFFERS && b.capacity() <= POOL_MAX_BUFFER_BYTES {
            b.clear();
            pool.push(b);
        }
    }
}

/// A queued [`Acquire`]: a released slot is handed to it directly.
#[derive(Default)]
struct Waiter {
    granted: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

struct PermitsInner {
    available: Cell<usize>,
    /// FIFO of waiting VMs.
    queue: RefCell<VecDeque<Rc<Waiter>>>,
    waits: Cell<u64>,
}

/// A loop-local counting semaphore for open connections. Invariant: a slot
/// is only ever `available` while the queue is empty, because a release hands
/// its slot straight to the first waiter.
#[derive(Clone)]
pub(crate) struct Permits(Rc<PermitsInner>);

impl Permits {
    pub(crate) fn new(n: usize) -> Self {
        Permits(Rc::new(PermitsInner {
            available: Cell::new(n),
            queue: RefCell::new(VecDeque::new()),
            waits: Cell::new(0),
        }))
    }

    /// Wait for a connection slot.
    pub(crate) fn acquire(&self) -> Acquire {
        Acquire {
            permits: self.clone(),
            waiter: None,
        }
    }

    /// How many acquisitions had to wait.
    pub(crate) fn waits(&self) -> u64 {
        self.0.waits.get()
    }

    fn release(&self) {
        let next = self.0.queue.borrow_mut().pop_front();
        match next {
            Some(w) => {
                w.granted.set(true);
                if let Some(waker) = w.waker.borrow_mut().take() {
                    waker.wake();
                }
            }
            None => self.0.available.set(self.0.available.get() + 1),
        }
    }
}

/// One open-connection slot; freed on drop.
pub(crate) struct Permit(Permits);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// Future of [`Permits::acquire`].
pub(crate) struct Acquire {
    permits: Permits,
    waiter: Option<Rc<Waiter>>,
}

impl Future for Acquire {
    type Output = Permit;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Permit> {
        let permits = self.permits.clone();
        match &self.waiter {
            None => {
                let inner = &permits.0;
                if inner.available.get() > 0 {
                    inner.available.set(inner.available.get() - 1);
                    return Poll::Ready(Permit(permits));
                }
                let w = Rc::new(Waiter::default());
                *w.waker.borrow_mut() = Some(cx.waker().clone());
                inner.queue.borrow_mut().push_back(Rc::clone(&w));
                inner.waits.set(inner.waits.get() + 1);
                self.waiter = Some(w);
                Poll::Pending
            }
            Some(w) if w.granted.get() => {
                self.waiter = None;
                Poll::Ready(Permit(permits))
            }
            Some(w) => {
                *w.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for Acquire {
    fn drop(&mut self) {
        let Some(w) = self.waiter.take() else { return };
        if w.granted.get() {
            // Handed a slot we will never use: pass it on.
            self.permits.release();
        } else {
            self.permits
                .0
                .queue
                .borrow_mut()
                .retain(|q| !Rc::ptr_eq(q, &w));
        }
    }
}

/// An open connection and the slot it occupies.
pub(crate) struct Conn {
    pub(crate) tcp: TcpConn,
    _permit: Permit,
}

/// Why an exchange produced no response.
#[derive(Debug)]
pub(crate) enum ExchangeError {
    Connect(std::io::Error),
    Io(std::io::Error),
    /// The peer closed before a complete response.
    Closed,
    /// Unparseable or oversized response.
    Protocol(String),
}

impl std::fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExchangeError::Connect(e) => write!(f, "connect: {e}"),
            ExchangeError::Io(e) => write!(f, "io: {e}"),
            ExchangeError::Closed => f.write_str("connection closed before a complete response"),
            ExchangeError::Protocol(m) => write!(f, "bad response: {m}"),
        }
    }
}

/// Open a connection from `source` to `target` in an already-held slot.
pub(crate) async fn connect(
    target: SocketAddr,
    source: IpAddr,
    permit: Permit,
) -> Result<Conn, ExchangeError> {
    let tcp = TcpConn::connect(target, Some(source))
        .await
        .map_err(ExchangeError::Connect)?;
    Ok(Conn {
        tcp,
        _permit: permit,
    })
}

/// The request bytes cloud-init's `requests` session sends for `path`.
pub(crate) fn write_request(path: &str, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(
        b" HTTP/1.1\r\nHost: 169.254.169.254\r\nUser-Agent: Cloud-Init/22.4\r\n\
          Accept-Encoding: identity\r\nAccept: */*\r\nConnection: keep-alive\r\n\r\n",
    );
}

/// A complete response: status, whether the connection may be reused, and
/// the (de-chunked) body in the caller's `body` buffer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) keep_alive: bool,
}

/// Send `req` on `conn` and read one response; the body lands in `body`.
/// `buf` is the read buffer (returned emptied of this response).
pub(crate) async fn exchange(
    conn: &TcpConn,
    req: &mut Vec<u8>,
    buf: &mut Vec<u8>,
    body: &mut Vec<u8>,
) -> Result<Response, ExchangeError> {
    let (res, r) = conn.write_all(std::mem::take(req)).await;
    *req = r;
    res.map_err(ExchangeError::Io)?;
    buf.clear();
    body.clear();
    let limits = Limits::default();
    let head = loop {
        match http::parse_response(buf, &limits, false) {
            Ok(Some(h)) => break h,
            Ok(None) => {}
            Err(e) => return Err(ExchangeError::Protocol(e.to_string())),
        }
        read_more(conn, buf).await?;
    };
    let start = head.head_len;
    match head.body {
        ResponseBody::None => {}
        ResponseBody::Length(n) => {
            if n > MAX_RESPONSE_BODY_BYTES {
                return Err(ExchangeError::Protocol(format!("body of {n} bytes")));
            }
            let end = start + usize::try_from(n).unwrap_or(usize::MAX);
            while buf.len() < end {
                read_more(conn, buf).await?;
            }
            body.extend_from_slice(&buf[start..end]);
        }
        ResponseBody::Chunked => {
            let mut sc = ChunkedScanner::new(MAX_RESPONSE_BODY_BYTES);
            let mut at = start;
            loop {
                match sc.decode(&buf[at..], body) {
                    Ok(ChunkProgress::Done { .. }) => break,
                    Ok(ChunkProgress::NeedMore { consumed }) => at += consumed,
                    Err(e) => return Err(ExchangeError::Protocol(e.to_string())),
                }
                read_more(conn, buf).await?;
            }
        }
        ResponseBody::UntilClose => loop {
            let taken = std::mem::take(buf);
            let (res, b) = conn.read_append(taken, READ_CHUNK_BYTES).await;
            *buf = b;
            match res {
                Ok(0) => {
                    body.extend_from_slice(&buf[start..]);
                    break;
                }
                Ok(_) if (buf.len() - start) as u64 > MAX_RESPONSE_BODY_BYTES => {
                    return Err(ExchangeError::Protocol("body too large".to_owned()));
                }
                Ok(_) => {}
                Err(e) => return Err(ExchangeError::Io(e)),
            }
        },
    }
    Ok(Response {
        status: head.status,
        keep_alive: head.keep_alive,
    })
}

async fn read_more(conn: &TcpConn, buf: &mut Vec<u8>) -> Result<(), ExchangeError> {
    let taken = std::mem::take(buf);
    let (res, b) = conn.read_append(taken, READ_CHUNK_BYTES).await;
    *buf = b;
    match res {
        Ok(0) => Err(ExchangeError::Closed),
        Ok(_) => Ok(()),
        Err(e) => Err(ExchangeError::Io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        Pin::new(f).poll(&mut cx)
    }

    #[test]
    fn permits_are_handed_over_in_order() {
        let p = Permits::new(1);
        let mut a = p.acquire();
        let Poll::Ready(first) = poll_once(&mut a) else {
            panic!("a free slot is taken at once")
        };
        let mut b = p.acquire();
        let mut c = p.acquire();
        assert!(poll_once(&mut b).is_pending());
        assert!(poll_once(&mut c).is_pending());
        assert_eq!(p.waits(), 2);
        drop(first);
        // The slot went to b, not to whoever polls first.
        assert!(poll_once(&mut c).is_pending());
        let Poll::Ready(second) = poll_once(&mut b) else {
            panic!("b was first in line")
        };
        drop(second);
        assert!(poll_once(&mut c).is_ready());
    }

    #[test]
    fn a_dropped_waiter_passes_its_slot_on() {
        let p = Permits::new(1);
        let mut a = p.acquire();
        let Poll::Ready(held) = poll_once(&mut a) else {
            panic!()
        };
        let mut b = p.acquire();
        let mut c = p.acquire();
        assert!(poll_once(&mut b).is_pending());
        assert!(poll_once(&mut c).is_pending());
        drop(held); // granted to b...
        drop(b); // ...which goes away without using it
        assert!(poll_once(&mut c).is_ready());
        // A waiter dropped before being granted leaves the queue.
        let p = Permits::new(0);
        let mut d = p.acquire();
        assert!(poll_once(&mut d).is_pending());
        drop(d);
        assert!(p.0.queue.borrow().is_empty());
    }

    #[test]
    fn request_bytes() {
        let mut out = b"stale".to_vec();
        write_request("/openstack", &mut out);
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("GET /openstack HTTP/1.1\r\nHost: 169.254.169.254\r\n"));
        assert!(s.ends_with("\r\n\r\n"));
    }
}
