//! The metadata API's HTTP/1.1 server: [`MetadataApi`] on the `rt` loops.
//!
//! Shaped like the namespace proxy (`proxy/mod.rs`, `proxy/conn.rs`): every
//! listener is created once with our backlog and shared by all loops, each
//! loop runs its own accept on a `dup` of it, and a connection is an idle loop
//! that owns no buffer between requests plus a boxed per-request future. A
//! request is read (head, then the body: Content-Length, or chunked decoded
//! with [`http::ChunkedScanner::decode`]), handed to the pure handler and answered;
//! pipelined requests are answered in order because they are taken one after
//! another from the same buffer. A bad request gets [`http::canned`] and the
//! connection is closed, since the stream position can no longer be trusted.
//! Every wait is bounded by `[api.timeouts]` through [`rt::with_deadline`].
//!
//! The handler runs inline on the loop. It is microseconds, except a password
//! POST, which `fsync`s the password log before answering (that is what makes
//! a 200 durable); POSTs happen once per instance lifetime, so blocking the
//! loop for one fsync was preferred over a blocking-pool hop for every request.
//!
//! Inventory reload: an [`inventory::Store`] (shared with the agent's
//! design) with its watcher thread; each loop reads through its own
//! [`inventory::store::Local`] copy, so a request takes no lock.
//! [`ApiHandle::reload_inventory`] reloads on demand (`main` calls it on
//! SIGHUP); a broken file keeps the old inventory and logs why (the error
//! names the line or key).

use std::cell::{Cell, RefCell};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::DirBuilderExt;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smallvec::SmallVec;

use crate::api::config::ApiConfig;
use crate::api::{ApiRequest, ApiResponse, ApiSettings, MetadataApi, PasswordStore};
use crate::http::{self, RequestBody};
use crate::inventory::store::{self, Local, Watcher};
use crate::inventory::{self, InventoryError};
use crate::log;
use crate::rt::sync::{Event, UnboundedReceiver, UnboundedSender};
use crate::rt::{self, TcpAcceptor, TcpConn};
use crate::serve::admit::{self, Admission, Gate, Slot};
use crate::serve::{self, BodyError, Idle};

/// Bytes asked for per read while a request is being assembled.
const READ_CHUNK_BYTES: usize = 4096;
/// Upper bound on a connection task's size: what an idle keep-alive
/// connection costs (the request itself is boxed separately).
const CONN_TASK_MAX_BYTES: usize = 1536;
/// Buffers kept in a loop's free list.
const FREE_BUFFERS: usize = 64;
/// Largest buffer put back on the free list.
const FREE_BUFFER_MAX_BYTES: usize = 64 * 1024;

/// Per-loop context shared by its connection tasks.
struct LoopCtx {
    cfg: Arc<ApiConfig>,
    api: Arc<MetadataApi>,
    /// This loop's copy of the inventory.
    inventory: Local,
    /// Set when the loop drains.
    stopping: Event,
    /// Connections being served by this loop.
    active: Cell<usize>,
    free: RefCell<Vec<Vec<u8>>>,
}

impl LoopCtx {
    fn take_buf(&self) -> Vec<u8> {
        self.free.borrow_mut().pop().unwrap_or_default()
    }

    fn put_buf(&self, mut b: Vec<u8>) {
        let mut f = self.free.borrow_mut();
        if f.len() < FREE_BUFFERS && b.capacity() <= FREE_BUFFER_MAX_BYTES {
            b.clear();
            f.push(b);
        }
    }
}

/// Messages from the control side to the loops.
#[derive(Debug, Clone, Copy)]
enum Control {
    /// Stop accepting, drain in-flight requests, exit.
    Stop,
}

/// A running API server: its loops, the shared handler and the watcher.
pub struct ApiHandle {
    /// Actual bound addresses, in `listen` order (port 0 resolved).
    pub bound: Vec<SocketAddr>,
    inventory: Arc<inventory::Store>,
    controls: Vec<UnboundedSender<Control>>,
    threads: Vec<std::thread::JoinHandle<io::Result<()>>>,
    watcher: Option<Watcher>,
}

impl std::fmt::Debug for ApiHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiHandle")
            .field("bound", &self.bound)
            .field("inventory_path", &self.inventory.path())
            .finish_non_exhaustive()
    }
}

impl ApiHandle {
    /// Re-read the inventory file and swap it in; requests in flight finish on
    /// the old one. On error the old inventory stays and the error is logged.
    ///
    /// # Errors
    /// The file could not be read or is not a valid inventory (the error names
    /// the line or key).
    pub fn reload_inventory(&self) -> Result<(), InventoryError> {
        self.inventory.reload()
    }

    /// Ask every loop to drain and wait for them to finish.
    ///
    /// # Errors
    /// A loop failed.
    pub fn stop(mut self) -> io::Result<()> {
        if let Some(w) = self.watcher.take() {
            w.stop();
        }
        for c in &self.controls {
            let _ = c.unbounded_send(Control::Stop);
        }
        let mut first = Ok(());
        for t in self.threads.drain(..) {
            let r = t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("api loop panicked")));
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

/// Load the inventory, open the password store, bind every listener and start
/// `cfg.workers` loops serving them.
///
/// # Errors
/// The inventory or the password store could not be loaded, an address could
/// not be bound (the daemon must refuse to start), or a thread could not start.
pub fn start(cfg: ApiConfig) -> io::Result<ApiHandle> {
    for w in cfg.warnings() {
        log::warn(format_args!("{w}"));
    }
    let inventory = inventory::Store::load(&cfg.inventory).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", cfg.inventory.display()),
        )
    })?;
    // Private from the start (PasswordStore::open makes it 0700 in any case).
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(super::password::STATE_DIR_MODE)
        .create(&cfg.state_dir)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("state_dir {}: {e}", cfg.state_dir.display()),
            )
        })?;
    let passwords = PasswordStore::open(&cfg.state_dir).map_err(io::Error::other)?;
    let settings = ApiSettings {
        shared_secret: cfg.shared_secret.as_bytes().to_vec(),
        service_metadata_proxy: cfg.service_metadata_proxy,
        vendor_data: cfg.vendor_data.clone(),
        dhcp_domain_override: cfg.dhcp_domain.clone(),
    };
    let inventory = Arc::new(inventory);
    let api = Arc::new(MetadataApi::new(settings, Arc::new(passwords)));
    admit::check_backlog("api", cfg.backlog);
    let mut sockets = Vec::with_capacity(cfg.listen.len());
    for a in &cfg.listen {
        sockets.push(bind_with_retry(*a, cfg.backlog)?);
    }
    let bound: Vec<SocketAddr> = sockets
        .iter()
        .zip(&cfg.listen)
        .map(|(s, a)| s.local_addr().unwrap_or(*a))
        .collect();
    for b in &bound {
        log::info(format_args!("api listener up: {b}"));
    }
    let workers = cfg.workers.get();
    let gate = Arc::new(Gate::new(
        "api",
        "max_connections",
        cfg.max_connections.get(),
    ));
    log::info(format_args!(
        "api starting: {workers} loop(s), inventory {}, state {}, max_connections {} \
         (fd budget {})",
        cfg.inventory.display(),
        cfg.state_dir.display(),
        cfg.max_connections,
        admit::fd_budget().max()
    ));
    let cfg = Arc::new(cfg);
    let sockets = Arc::new(sockets);
    let mut controls = Vec::with_capacity(workers);
    let mut receivers = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (tx, rx) = rt::sync::unbounded();
        controls.push(tx);
        receivers.push(std::sync::Mutex::new(Some(rx)));
    }
    let receivers = Arc::new(receivers);
    let loop_inventory = inventory.clone();
    let threads = rt::run_loops(workers, "api", move |i| {
        let cfg = cfg.clone();
        let api = api.clone();
        let inventory = loop_inventory.clone();
        let sockets = sockets.clone();
        let gate = gate.clone();
        let rx = receivers[i].lock().ok().and_then(|mut r| r.take());
        async move {
            let rx = rx.ok_or_else(|| io::Error::other("control channel already taken"))?;
            run_loop(i, cfg, api, inventory.local(), &sockets, gate, rx).await
        }
    })?;
    let watcher = match Watcher::start(
        inventory.clone(),
        store::POLL_INTERVAL,
        "api-inventory-watch",
    ) {
        Ok(w) => Some(w),
        Err(e) => {
            log::warn(format_args!(
                "cannot start the inventory watcher ({e}); reload with SIGHUP"
            ));
            None
        }
    };
    Ok(ApiHandle {
        bound,
        inventory,
        controls,
        threads,
        watcher,
    })
}

/// [`rt::listen_tcp_retrying`]: a quick restart after a crash waits out the
/// dead process's listener.
fn bind_with_retry(addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    rt::listen_tcp_retrying(addr, backlog)
        .map_err(|e| io::Error::new(e.kind(), format!("bind {addr}: {e}")))
}

async fn run_loop(
    index: usize,
    cfg: Arc<ApiConfig>,
    api: Arc<MetadataApi>,
    inventory: Local,
    sockets: &[std::net::TcpListener],
    gate: Arc<Gate>,
    mut control: UnboundedReceiver<Control>,
) -> io::Result<()> {
    use futures_util::StreamExt;
    let ctx = Rc::new(LoopCtx {
        cfg: cfg.clone(),
        api,
        inventory,
        stopping: Event::default(),
        active: Cell::new(0),
        free: RefCell::new(Vec::new()),
    });
    if index == 0 {
        log::info(format_args!("api loops use {:?}", rt::engine()));
    }
    let admission = Admission::new(gate);
    let mut accept_tasks = Vec::with_capacity(sockets.len());
    for s in sockets {
        let acceptor = TcpAcceptor::from_std(s.try_clone()?)?;
        accept_tasks.push(rt::spawn_handle(accept_loop(
            ctx.clone(),
            acceptor,
            admission.clone(),
        )));
    }
    // Run until told to stop (or the control side is gone).
    let _ = control.next().await;
    drop(accept_tasks); // cancels the accepts: no new connections on this loop
    ctx.stopping.set();
    let deadline = Instant::now() + cfg.drain_timeout;
    while ctx.active.get() > 0 && Instant::now() < deadline {
        rt::sleep(Duration::from_millis(20)).await;
    }
    if ctx.active.get() > 0 {
        log::warn(format_args!(
            "api loop {index}: drain timeout, closing {} connection(s)",
            ctx.active.get()
        ));
    }
    Ok(())
}

async fn accept_loop(ctx: Rc<LoopCtx>, acceptor: TcpAcceptor, admission: Rc<Admission>) {
    admit::accept_loop(acceptor, admission, |(conn, peer), slot| {
        let accepted = Instant::now();
        ctx.active.set(ctx.active.get() + 1);
        let c = ctx.clone();
        let fut = async move {
            let guard = ActiveGuard {
                ctx: c.clone(),
                _slot: slot,
            };
            serve(&c, conn, peer, accepted).await;
            drop(guard);
        };
        debug_assert!(
            std::mem::size_of_val(&fut) <= CONN_TASK_MAX_BYTES,
            "idle connection state grew"
        );
        rt::spawn(fut);
    })
    .await;
}

/// Decrements the active count and frees the admission slot (after the
/// connection's socket closed) however the connection task ends.
struct ActiveGuard {
    ctx: Rc<LoopCtx>,
    _slot: Slot,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.ctx.active.set(self.ctx.active.get().saturating_sub(1));
    }
}

/// How a connection ended (for debug logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Answered, nothing left unread.
    Done,
    /// Answered (an error, or a final answer with more request bytes behind
    /// it): linger so the answer is not lost to an RST.
    Linger,
    PeerClosed,
    Timeout,
    Stopping,
    IoError,
}

async fn serve(ctx: &LoopCtx, conn: TcpConn, peer: SocketAddr, accepted: Instant) {
    let end = serve_inner(ctx, &conn, rt::peer_ip(peer), accepted).await;
    log::debug(format_args!("api: connection from {peer} ended: {end:?}"));
    match end {
        End::Linger => serve::linger_close(&conn).await,
        _ => conn.shutdown(),
    }
}

/// The idle loop: holds no buffer while waiting; each request's state lives
/// in [`handle_request`]'s boxed future.
async fn serve_inner(ctx: &LoopCtx, conn: &TcpConn, peer: IpAddr, accepted: Instant) -> End {
    let t = ctx.cfg.timeouts;
    let mut buf: Vec<u8> = Vec::new();
    let mut first = true;
    loop {
        if buf.is_empty() {
            let idle_deadline = if first {
                accepted + t.http_request
            } else {
                Instant::now() + t.keep_alive
            };
            match serve::wait_for_request!(conn, buf, idle_deadline, ctx.stopping) {
                Idle::Request => {}
                Idle::PeerClosed => return End::PeerClosed,
                Idle::IoError => return End::IoError,
                Idle::Timeout => return End::Timeout,
                Idle::Stopping => return End::Stopping,
            }
        }
        let head_deadline = if first {
            accepted + t.http_request
        } else {
            Instant::now() + t.http_request
        };
        first = false;
        if let Err(end) = Box::pin(handle_request(ctx, conn, peer, &mut buf, head_deadline)).await {
            return end;
        }
        if buf.is_empty() {
            buf = Vec::new(); // release the capacity while idle
        }
    }
}

/// Read one request (its first bytes are in `buf`), run the handler, answer.
/// `Ok` keeps the connection; pipelined bytes that followed stay in `buf`.
async fn handle_request(
    ctx: &LoopCtx,
    conn: &TcpConn,
    peer: IpAddr,
    buf: &mut Vec<u8>,
    head_deadline: Instant,
) -> Result<(), End> {
    let cfg = &ctx.cfg;
    // 1. The head.
    let head = loop {
        match http::parse_request(buf, &cfg.limits) {
            Ok(Some(h)) => break h,
            Ok(None) => {}
            Err(e) => return Err(reject(ctx, conn, e.status(), false).await),
        }
        let taken = std::mem::take(buf);
        let (res, b) =
            match rt::with_deadline(head_deadline, conn.read_append(taken, READ_CHUNK_BYTES)).await
            {
                Ok(r) => r,
                Err(rt::Elapsed) => return Err(reject(ctx, conn, 408, false).await),
            };
        *buf = b;
        match res {
            Ok(0) => return Err(End::PeerClosed),
            Ok(_) => {}
            Err(_) => return Err(End::IoError),
        }
    };

    // 2. The body.
    let mut decoded = Vec::new();
    let (max_body, client) = (ctx.cfg.limits.max_body_bytes, ctx.cfg.timeouts.client);
    let body_end =
        match serve::read_body(conn, buf, &head, max_body, client, Some(&mut decoded)).await {
            Ok(end) => end,
            Err(BodyError::Status(s)) => {
                return Err(reject(ctx, conn, s, head.method == http::Method::Head).await)
            }
            Err(BodyError::Gone) => return Err(End::PeerClosed),
        };
    let body: &[u8] = match head.body {
        RequestBody::Chunked => &decoded,
        _ => &buf[head.head_len..body_end],
    };

    // 3. The handler.
    // On the stack for up to 24 fields (cloud-init sends 5, the agent adds 5).
    let headers: SmallVec<[(&[u8], &[u8]); 24]> = head
        .headers
        .iter()
        .map(|h| (h.name.get(buf), h.value.get(buf)))
        .collect();
    let req = ApiRequest {
        method: head.method.as_str(),
        target: head.target.get(buf),
        headers: &headers,
        body,
        peer,
    };
    let started = Instant::now();
    let resp = ctx.api.handle(&ctx.inventory.get().0, &req);
    if cfg.access_log {
        access(&req, &resp, started);
    }
    drop(headers);

    // 4. The answer.
    let keep = head.keep_alive && !ctx.stopping.is_set();
    let mut w = ctx.take_buf();
    write_response(&resp, head.method == http::Method::Head, keep, &mut w);
    match rt::with_deadline(Instant::now() + cfg.timeouts.client, conn.write_all(w)).await {
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
    // Keep any pipelined bytes that followed this request.
    buf.drain(..body_end);
    Ok(())
}

/// One access-log line: the client, the instance it asked as (the agent's
/// `X-Instance-ID`, `-` for a direct guest), the request line, status, body
/// bytes and handler time. The signature and every other header stay out.
fn access(req: &ApiRequest<'_>, resp: &ApiResponse, started: Instant) {
    let t = req.target;
    let target = http::loggable_target(t);
    let instance = req
        .headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(b"x-instance-id"))
        .map(|(_, v)| String::from_utf8_lossy(v).escape_default().to_string())
        .unwrap_or_else(|| "-".into());
    log::access(format_args!(
        "{} as {instance} \"{} {target}\" {} {} {:.1}ms",
        req.peer,
        req.method,
        resp.status,
        resp.body.len(),
        started.elapsed().as_secs_f64() * 1000.0
    ));
}

/// Serialise a handler response. `HEAD` gets the real `Content-Length` and no body.
fn write_response(resp: &ApiResponse, head_only: bool, keep: bool, out: &mut Vec<u8>) {
    // The content types are the handlers' constants; one that would not
    // make a well-formed head (none does) falls back to plain text.
    let content_type =
        http::HeaderValue::new(resp.content_type.as_bytes()).unwrap_or(http::write::TEXT_PLAIN);
    http::write_answer(out, resp.status, content_type, &resp.body, head_only, !keep);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_response_keeps_the_length_and_drops_the_body() {
        let resp = ApiResponse {
            status: 200,
            content_type: crate::api::CONTENT_TYPE_TEXT,
            body: b"1.0\nlatest".to_vec(),
        };
        let mut get = Vec::new();
        write_response(&resp, false, true, &mut get);
        assert_eq!(
            get,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=UTF-8\r\nContent-Length: 10\r\n\r\n1.0\nlatest"
        );
        let mut head = Vec::new();
        write_response(&resp, true, false, &mut head);
        assert_eq!(
            head,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=UTF-8\r\nContent-Length: 10\r\nConnection: close\r\n\r\n"
        );
    }
}
