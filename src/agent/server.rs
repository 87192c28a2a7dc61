//! The agent's Unix-socket server: accept, resolve, sign, forward, relay.
//!
//! One loop per worker, each with its own accept on a `dup` of the one
//! listening socket (as in [`crate::proxy`]), its own resolution cache and
//! its own pool of API connections: nothing on the request path is shared
//! between loops except the inventory store's generation (an atomic, read per
//! lookup; each loop refreshes its own copy when it moved). Each
//! loop writes its own block of counters ([`metrics`]), merged on scrape.
//! With `backend = "neutron"` each loop also has its own
//! [`NeutronResolver`] (cache, single flight, batching, prefetch).
//!
//! Connections are HTTP/1.1 keep-alive with pipelining: requests are taken
//! one after another from the same buffer, so answers go out in order. This
//! serves both metaproxy's own proxy (a pooled, pipelined client) and haproxy
//! with `option http-server-close` (one request, then `Connection: close`).
//! While idle between requests a connection holds no buffer, and the work of
//! one request lives in a boxed future freed when the answer is written
//! (the shape of [`crate::proxy::conn`]).
//!
//! Per request (spec §3):
//! 1. [`identity::parse_identity`] → 400 with its message on any ambiguity;
//! 2. (scope, key) → the loop's [`Resolver`] (the inventory through its
//!    cache, or the [`NeutronResolver`]); zero or several ports → 404 with Neutron's
//!    era-C page ("Instance was not found on network X."); Neutron failing →
//!    503 (cache hits are still served);
//! 3. sign the instance id, forward method, target and body to the API with
//!    exactly `Host`, `X-Forwarded-For` (the raw value), `X-Instance-ID`,
//!    `X-Tenant-ID`, `X-Instance-ID-Signature`, `Content-Length` when there
//!    is a body, and `X-aws-ec2-metadata-token` when the guest sent one;
//! 4. relay 200/400/403/404/409/500/502/503/504 with the API's headers and
//!    body (Content-Length recomputed, chunking removed); anything else →
//!    500; API unreachable → 503; too slow → 504. A 404 for a mapping that
//!    came from the cache invalidates it and retries once with a fresh
//!    lookup (what Neutron's ML2/OVS agent did, spec §3.3).
//!
//! Our own error pages use Neutron's era-C body bytes but CRLF heads and no
//! `Connection: close`: a well-framed request that resolved to "not found"
//! leaves the connection in a good state, and closing it would cost the
//! proxy's pool a reconnect (it switches to one connection per request only
//! after several successful answers that close, never after an error page).
//! After a HEAD every page has the same head and no body
//! ([`http::write_answer`]): the proxy does not read a body after a HEAD, so
//! one would become the start of the next VM's answer on that pooled
//! connection.
//!
//! The request to the API is written by [`forward::write_api_request`] from
//! a [`Resolved`], whose ids were parsed where the backend returned them: a
//! tenant's `device_id` cannot put a byte into the head that an id may not
//! have.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::{select, Either};
use smallvec::SmallVec;

use crate::agent::config::{AgentConfig, Backend};
use crate::agent::forward::{self, ApiResponse, ForwardError, GuestRequest};
use crate::agent::identity::{self, Identity, Scope};
use crate::agent::metrics::{self, inc, LoopMetrics, Registry};
use crate::agent::neutron::{BackendError, NeutronResolver};
use crate::agent::resolve::{InventoryResolver, Resolved, Resolver};
use crate::http::write::{put_content_length, put_status_line, CONNECTION, TEXT_PLAIN};
use crate::http::{self, HeaderName, HeaderValue, Method, RequestBody, RequestHead};
use crate::inventory::store::{self, Watcher};
use crate::log;
use crate::rt::sync::{oneshot, Event, Notify, UnboundedReceiver, UnboundedSender};
use crate::rt::{self, UnixAcceptor, UnixConn};
use crate::serve::admit::{self, Admission, Gate};
use crate::serve::{self, BodyError};

/// Bytes asked for per read while a request is being assembled.
const READ_CHUNK_BYTES: usize = 4096;
/// Buffers kept in a loop's free list.
const FREE_BUFFERS: usize = 64;
/// At most one "shared secrets differ" hint per loop per this interval.
const FORBIDDEN_HINT_EVERY: Duration = Duration::from_secs(60);
/// Statuses of the API relayed as they are (Neutron era C's list); others → 500.
const RELAYED: [u16; 9] = [200, 400, 403, 404, 409, 500, 502, 503, 504];
/// The guest's IMDSv2-style token header, passed through when present.
const HEADER_TOKEN: &str = "X-aws-ec2-metadata-token";

const MSG_UNKNOWN: &str = "An unknown error has occurred. Please try your request again.";
const MSG_UNAVAILABLE: &str =
    "The remote metadata server is temporarily unavailable. Please try again later.";
const MSG_TIMEOUT: &str =
    "The remote metadata server did not answer in time. Please try again later.";
const MSG_BROKEN: &str = "The remote metadata server sent a broken response.";
const MSG_BACKEND: &str =
    "The instance could not be looked up: Neutron is temporarily unavailable. Please try again later.";

/// A snapshot of the agent's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentStats {
    /// Requests parsed.
    pub requests: u64,
    /// Resolutions that went to the inventory (cache misses and forced lookups).
    pub inventory_lookups: u64,
    /// Resolutions answered by a cache (positive or negative).
    pub cache_hits: u64,
    /// Resolutions that missed the cache (Neutron backend).
    pub cache_misses: u64,
    /// Calls to Neutron (router networks, port batches, prefetches).
    pub neutron_calls: u64,
    /// Keystone token requests.
    pub token_requests: u64,
    /// Requests answered 503 because the backend failed.
    pub backend_unavailable: u64,
    /// Requests answered 400 for their identity headers.
    pub bad_requests: u64,
    /// Requests answered 404 because the guest did not resolve.
    pub not_found: u64,
    /// Requests sent to the API.
    pub forwarded: u64,
    /// API exchanges that failed (503/504/502) or gave an unexpected status.
    pub api_errors: u64,
    /// Cached mappings invalidated and retried after an API 404.
    pub retried_after_404: u64,
}

struct Shared {
    /// The inventory (`backend = "inventory"` only).
    store: Option<Arc<crate::inventory::Store>>,
    metrics: Registry,
}

/// Messages from the handle to the loops.
#[derive(Debug, Clone)]
enum Control {
    Stop,
}

/// A running agent.
pub struct AgentHandle {
    controls: Vec<UnboundedSender<Control>>,
    threads: Vec<std::thread::JoinHandle<io::Result<()>>>,
    watcher: Option<Watcher>,
    exporter: Option<metrics::Exporter>,
    shared: Arc<Shared>,
    _report: Option<super::report::Reporter>,
    /// The socket it serves.
    pub socket: PathBuf,
}

impl AgentHandle {
    /// Counters so far, summed over loops.
    pub fn stats(&self) -> AgentStats {
        use metrics::Call;
        let r = &self.shared.metrics;
        AgentStats {
            requests: r.sum(|m| &m.requests),
            inventory_lookups: r.sum(|m| &m.inventory_lookups),
            cache_hits: r.sum(|m| &m.cache_hits) + r.sum(|m| &m.cache_negative_hits),
            cache_misses: r.sum(|m| &m.cache_misses),
            neutron_calls: r.calls(Call::RouterNetworks)
                + r.calls(Call::Ports)
                + r.calls(Call::Prefetch),
            token_requests: r.calls(Call::Token),
            backend_unavailable: r.sum(|m| &m.backend_unavailable),
            bad_requests: r.sum(|m| &m.bad_requests),
            not_found: r.sum(|m| &m.not_found),
            forwarded: r.sum(|m| &m.forwarded),
            api_errors: r.sum(|m| &m.api_errors),
            retried_after_404: r.sum(|m| &m.retried_after_404),
        }
    }

    /// The metrics in Prometheus text (what `agent.metrics_listen` serves).
    pub fn metrics_text(&self) -> String {
        self.shared.metrics.render()
    }

    /// Where the Prometheus endpoint listens, if enabled.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.exporter.as_ref().map(metrics::Exporter::addr)
    }

    /// Reload the inventory now (the file is also polled every second).
    ///
    /// # Errors
    /// The file is broken; the previous inventory stays in use.
    pub fn reload_inventory(&self) -> Result<(), String> {
        match &self.shared.store {
            Some(s) => s.reload().map_err(|e| e.to_string()),
            None => Err("no inventory watcher".into()),
        }
    }

    /// Stop accepting, let requests in flight finish (bounded), wait for the loops.
    ///
    /// # Errors
    /// A loop failed.
    pub fn stop(mut self) -> io::Result<()> {
        for c in &self.controls {
            let _ = c.unbounded_send(Control::Stop);
        }
        if let Some(w) = self.watcher.take() {
            w.stop();
        }
        self.exporter.take();
        self.join()
    }

    /// Wait for the loops to end.
    ///
    /// # Errors
    /// A loop failed.
    pub fn join(self) -> io::Result<()> {
        let mut first = Ok(());
        for t in self.threads {
            let r = t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("agent loop panicked")));
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

/// Create the socket's directory, replace a stale socket file, bind.
///
/// # Errors
/// Another agent answers on the socket; the path is not a socket; bind failed.
fn bind_socket(cfg: &AgentConfig) -> io::Result<UnixListener> {
    let path = &cfg.socket;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", dir.display())))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Ok(_) => {
            // A SIGKILLed agent's listener lingers (and completes connects)
            // for tens of milliseconds while the kernel tears its io_uring
            // down; only a socket that keeps accepting for
            // BIND_RETRY_FOR belongs to a live agent.
            let give_up = std::time::Instant::now() + rt::BIND_RETRY_FOR;
            while std::os::unix::net::UnixStream::connect(path).is_ok()
                && std::time::Instant::now() < give_up
            {
                std::thread::sleep(rt::BIND_RETRY_EVERY);
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "another agent is running: {} accepts connections",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path)?;
            log::info(format_args!(
                "replaced stale socket {} (nothing was accepting)",
                path.display()
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    rt::listen_unix(path, cfg.backlog, cfg.socket_mode.bits())
        .map_err(|e| io::Error::new(e.kind(), format!("bind {}: {e}", path.display())))
}

/// Load the inventory, bind the socket and start `cfg.workers` loops.
///
/// # Errors
/// The inventory is broken, another agent is running, the socket cannot be
/// bound, or a thread could not start.
pub fn start(cfg: AgentConfig) -> io::Result<AgentHandle> {
    for w in cfg.warnings() {
        log::warn(format_args!("{w}"));
    }
    let (store, backend) = match &cfg.backend {
        Backend::Inventory(inv_path) => {
            let store = crate::inventory::Store::load(inv_path)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            (
                Some(Arc::new(store)),
                format!("inventory {}", inv_path.display()),
            )
        }
        Backend::Neutron(n) => (
            None,
            format!("neutron at {} ({:?})", n.endpoint.addr, n.auth),
        ),
    };
    let listener = Arc::new(bind_socket(&cfg)?);
    admit::check_backlog("agent", cfg.backlog);
    let gate = Arc::new(Gate::new(
        "agent",
        "max_connections",
        cfg.max_connections.get(),
    ));
    let budget = admit::fd_budget().max();
    let watcher = match &store {
        Some(s) => Some(Watcher::start(
            s.clone(),
            store::POLL_INTERVAL,
            "agent-inventory",
        )?),
        None => None,
    };
    let workers = cfg.workers.get();
    let shared = Arc::new(Shared {
        store,
        metrics: Registry::new(workers),
    });
    let exporter = match cfg.metrics_listen {
        Some(addr) => Some(
            metrics::serve(addr, shared.metrics.clone())
                .map_err(|e| io::Error::new(e.kind(), format!("metrics_listen {addr}: {e}")))?,
        ),
        None => None,
    };
    log::info(format_args!(
        "agent starting: socket {} (mode {:o}, max_connections {}, fd budget {budget}), \
         {workers} loop(s), {backend}, metadata API {}{}",
        cfg.socket.display(),
        cfg.socket_mode.bits(),
        cfg.max_connections,
        cfg.nova.addr,
        exporter.as_ref().map_or(String::new(), |e| format!(
            ", metrics on http://{}/metrics",
            e.addr()
        ))
    ));
    let report = super::report::start_for(&cfg)?;
    let socket = cfg.socket.clone();
    let cfg = Arc::new(cfg);
    let mut controls = Vec::with_capacity(workers);
    let mut receivers = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (tx, rx) = crate::rt::sync::unbounded();
        controls.push(tx);
        receivers.push(std::sync::Mutex::new(Some(rx)));
    }
    let receivers = Arc::new(receivers);
    let sh = shared.clone();
    let threads = rt::run_loops(workers, "agent", move |i| {
        let cfg = cfg.clone();
        let shared = sh.clone();
        let listener = listener.clone();
        let gate = gate.clone();
        let rx = receivers[i].lock().ok().and_then(|mut r| r.take());
        async move {
            let rx = rx.ok_or_else(|| io::Error::other("control channel already taken"))?;
            run_loop(cfg, shared, &listener, gate, rx, i).await
        }
    })?;
    Ok(AgentHandle {
        controls,
        threads,
        watcher,
        exporter,
        shared,
        _report: report,
        socket,
    })
}

/// Per-loop state shared by its tasks.
struct LoopCtx {
    cfg: Arc<AgentConfig>,
    /// This loop's counters.
    m: Arc<LoopMetrics>,
    /// The configured backend, with its cache.
    resolver: Resolver,
    host_header: String,
    pool: forward::Pool,
    stopping: Event,
    active: Cell<usize>,
    last_forbidden_hint: Cell<Option<Instant>>,
    free: RefCell<Vec<Vec<u8>>>,
}

impl LoopCtx {
    fn take_buf(&self) -> Vec<u8> {
        self.free.borrow_mut().pop().unwrap_or_default()
    }

    fn put_buf(&self, mut b: Vec<u8>) {
        let mut f = self.free.borrow_mut();
        if f.len() < FREE_BUFFERS && b.capacity() <= 64 * 1024 {
            b.clear();
            f.push(b);
        }
    }

    fn forbidden_hint(&self) {
        let now = Instant::now();
        let due = self
            .last_forbidden_hint
            .get()
            .is_none_or(|t| now.duration_since(t) >= FORBIDDEN_HINT_EVERY);
        if due {
            self.last_forbidden_hint.set(Some(now));
            log::warn(format_args!(
                "metadata API at {} answered 403 Forbidden: the shared secrets \
                 (agent metadata_proxy_shared_secret and Nova's [neutron] \
                 metadata_proxy_shared_secret) probably differ",
                self.cfg.nova.addr
            ));
        }
    }
}

async fn run_loop(
    cfg: Arc<AgentConfig>,
    shared: Arc<Shared>,
    listener: &UnixListener,
    gate: Arc<Gate>,
    mut control: UnboundedReceiver<Control>,
    index: usize,
) -> io::Result<()> {
    use futures_util::StreamExt;
    let m = shared.metrics.0[index].clone();
    let resolver = match &cfg.backend {
        Backend::Neutron(n) => Resolver::Neutron(NeutronResolver::new(
            n,
            cfg.cache_ttl,
            cfg.negative_cache_ttl,
            cfg.cache_capacity,
            m.clone(),
        )),
        Backend::Inventory(_) => {
            let store = shared.store.as_ref();
            let store = store.ok_or_else(|| io::Error::other("inventory not loaded"))?;
            Resolver::Inventory(InventoryResolver::new(
                store.local(),
                cfg.cache_ttl,
                cfg.negative_cache_ttl,
                cfg.cache_capacity,
                m.clone(),
            ))
        }
    };
    let ctx = Rc::new(LoopCtx {
        host_header: cfg.nova.host_header(),
        m,
        resolver,
        pool: forward::Pool::new(cfg.nova.addr, cfg.pool_size.get(), cfg.nova.timeout)
            .with_tls(cfg.nova.tls.clone()),
        stopping: Event::default(),
        active: Cell::new(0),
        last_forbidden_hint: Cell::new(None),
        free: RefCell::new(Vec::new()),
        cfg,
    });
    let acceptor = UnixAcceptor::from_std(listener.try_clone()?)?;
    let accept_task = rt::spawn_handle(accept_loop(ctx.clone(), acceptor, Admission::new(gate)));
    let _ = control.next().await;
    drop(accept_task);
    ctx.stopping.set();
    let deadline = Instant::now() + ctx.cfg.drain_timeout;
    while ctx.active.get() > 0 && Instant::now() < deadline {
        rt::sleep(Duration::from_millis(20)).await;
    }
    if ctx.active.get() > 0 {
        log::warn(format_args!(
            "agent drain timeout, closing {} connection(s)",
            ctx.active.get()
        ));
    }
    Ok(())
}

async fn accept_loop(ctx: Rc<LoopCtx>, acceptor: UnixAcceptor, admission: Rc<Admission>) {
    admit::accept_loop(acceptor, admission, |conn, slot| {
        ctx.active.set(ctx.active.get() + 1);
        let c = ctx.clone();
        rt::spawn(async move {
            let guard = ActiveGuard(c.clone());
            let conn = Rc::new(conn);
            serve(c, conn.clone()).await;
            conn.shutdown();
            drop(guard);
            // After the socket is closed: frees the place under the caps.
            drop((conn, slot));
        });
    })
    .await;
}

struct ActiveGuard(Rc<LoopCtx>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.set(self.0.active.get().saturating_sub(1));
    }
}

/// Requests in flight on one connection (resolved and forwarded
/// concurrently); the reader waits for the writer beyond this.
const PIPELINE_MAX: usize = 64;

/// One answer slot, in request order.
enum Slot {
    /// Being resolved and forwarded by its own task (for a HEAD when the bool is set).
    Pending(oneshot::Receiver<Vec<u8>>, bool),
    /// Already known (a canned rejection).
    Ready(Vec<u8>),
}

/// Answers waiting to be written, in the order their requests arrived.
#[derive(Default)]
struct OutQueue {
    slots: RefCell<std::collections::VecDeque<(Slot, bool)>>,
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
async fn serve(ctx: Rc<LoopCtx>, conn: Rc<UnixConn>) {
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
async fn read_requests(ctx: Rc<LoopCtx>, conn: Rc<UnixConn>, q: Rc<OutQueue>) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        while q.slots.borrow().len() >= PIPELINE_MAX {
            q.room.notified().await;
        }
        if buf.is_empty() {
            let deadline = Instant::now() + ctx.cfg.timeouts.keep_alive;
            if serve::wait_for_request!(&*conn, buf, deadline, ctx.stopping) != serve::Idle::Request
            {
                break;
            }
        }
        let head_deadline = Instant::now() + ctx.cfg.timeouts.http_request;
        match Box::pin(next_request(&ctx, &conn, &mut buf, head_deadline)).await {
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
                    .push_back((Slot::Ready(rejection), true));
                q.more.notify();
                break;
            }
        }
        if ctx.stopping.is_set() {
            break;
        }
        if buf.is_empty() {
            buf = Vec::new(); // release the capacity while idle
        }
    }
    q.reader_done.set(true);
    q.more.notify();
}

/// The writer half: write each answer as soon as it and all before it are done.
async fn write_answers(ctx: Rc<LoopCtx>, conn: Rc<UnixConn>, q: Rc<OutQueue>) {
    loop {
        let front = q.slots.borrow_mut().pop_front();
        let Some((slot, close)) = front else {
            if q.reader_done.get() {
                return;
            }
            q.more.notified().await;
            continue;
        };
        q.room.notify();
        let out = match slot {
            Slot::Ready(b) => b,
            Slot::Pending(rx, is_head) => match rx.await {
                Ok(b) => b,
                Err(_) => {
                    let mut b = Vec::new();
                    page(500, MSG_UNKNOWN, is_head, true, &mut b);
                    b
                }
            },
        };
        match rt::with_deadline(
            Instant::now() + ctx.cfg.timeouts.client,
            conn.write_all(out),
        )
        .await
        {
            Ok((Ok(()), b)) => ctx.put_buf(b),
            _ => return,
        }
        if close {
            conn.shutdown_write();
            return;
        }
    }
}

/// Read one request (its first bytes are in `buf`) and start answering it on
/// its own task. Returns the answer slot and whether the connection closes
/// after it; `Err(Some(bytes))` is a rejection to write last, `Err(None)` a
/// connection that just ends. Pipelined bytes that followed stay in `buf`.
async fn next_request(
    ctx: &Rc<LoopCtx>,
    conn: &UnixConn,
    buf: &mut Vec<u8>,
    head_deadline: Instant,
) -> Result<(Slot, bool), Option<Vec<u8>>> {
    let limits = ctx.cfg.limits;
    // 1. The head.
    let head = loop {
        match http::parse_request(buf, &limits) {
            Ok(Some(h)) => break h,
            Ok(None) => {}
            Err(e) => return Err(Some(http::canned(e.status()).to_vec())),
        }
        let taken = std::mem::take(buf);
        let (res, b) =
            match rt::with_deadline(head_deadline, conn.read_append(taken, READ_CHUNK_BYTES)).await
            {
                Ok(r) => r,
                Err(rt::Elapsed) => return Err(Some(http::canned(408).to_vec())),
            };
        *buf = b;
        match res {
            Ok(0) | Err(_) => return Err(None),
            Ok(_) => {}
        }
    };
    inc(&ctx.m.requests);

    // 2. The body.
    let mut decoded = Vec::new();
    let body_end = match serve::read_body(
        conn,
        buf,
        &head,
        limits.max_body_bytes,
        ctx.cfg.timeouts.client,
        Some(&mut decoded),
    )
    .await
    {
        Ok(end) => end,
        Err(BodyError::Status(s)) => {
            return Err(Some(
                http::canned_for(s, head.method == Method::Head).to_vec(),
            ))
        }
        Err(BodyError::Gone) => return Err(None),
    };

    // 3. Resolve, sign, forward on its own task. Draining does not add
    // `Connection: close` (metaproxy's proxy would take that as "one-shot
    // agent" for good); the reader stops instead, and a pooled client
    // re-sends what it had pipelined behind.
    let keep = head.keep_alive;
    let is_head = head.method == Method::Head;
    let request: Vec<u8> = buf.drain(..body_end).collect();
    let (tx, rx) = oneshot::channel();
    let c = ctx.clone();
    rt::spawn(async move {
        let body: &[u8] = match head.body {
            RequestBody::Chunked => &decoded,
            _ => &request[head.head_len..],
        };
        let mut out = c.take_buf();
        let started = Instant::now();
        let trace = answer(&c, &request, &head, body, !keep, &mut out).await;
        // "HTTP/1.1 NNN …": every answer starts with a status line we wrote.
        let status = out
            .get(9..12)
            .and_then(|s| std::str::from_utf8(s).ok())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        c.m.response(status);
        if c.cfg.access_log {
            access(&request, &head, &trace, status, started);
        }
        let _ = tx.send(out);
    });
    Ok((Slot::Pending(rx, is_head), !keep))
}

/// What the access log says about one answer: who asked through what, and
/// which instance that resolved to (`None`: not found, or never resolved).
#[derive(Default)]
struct Trace {
    id: Option<Identity>,
    resolved: Option<Rc<Resolved>>,
    cached: bool,
}

/// Build the whole response to one parsed request into `out`.
async fn answer(
    ctx: &LoopCtx,
    buf: &[u8],
    head: &RequestHead,
    body: &[u8],
    close: bool,
    out: &mut Vec<u8>,
) -> Trace {
    let c = &*ctx.m;
    let is_head = head.method == Method::Head;
    let id = match identity::parse_identity(|name| {
        head.headers
            .iter()
            .filter(|h| h.name.get(buf).eq_ignore_ascii_case(name.as_bytes()))
            .map(|h| h.value.get(buf))
            .collect::<SmallVec<[&[u8]; 2]>>()
    }) {
        Ok(id) => id,
        Err(e) => {
            inc(&c.bad_requests);
            log::debug(format_args!("400: {e}"));
            page(400, &e.message(), is_head, close, out);
            return Trace::default();
        }
    };
    let (mut resolved, mut cached) = match ctx.resolver.lookup(&id, false).await {
        Ok(r) => r,
        Err(e) => {
            backend_failed(ctx, &id, &e, is_head, close, out);
            return Trace {
                id: Some(id),
                ..Trace::default()
            };
        }
    };
    let mut retried = false;
    let guest = GuestRequest {
        method: head.method,
        target: head.target.get(buf),
        token: head.header(buf, HEADER_TOKEN),
        body,
    };
    loop {
        let Some(r) = resolved.as_deref() else {
            inc(&c.not_found);
            let msg = match &id.scope {
                Scope::Network(n) => format!("Instance was not found on network {n}."),
                Scope::Router(r) => format!("Instance was not found on router {r}."),
            };
            page(404, &msg, is_head, close, out);
            return Trace {
                id: Some(id),
                resolved: None,
                cached,
            };
        };
        let mut req = ctx.take_buf();
        let secret = ctx.cfg.shared_secret.as_bytes();
        if let Err(e) =
            forward::write_api_request(&mut req, &guest, &ctx.host_header, &id, r, secret)
        {
            ctx.put_buf(req);
            inc(&c.bad_requests);
            log::debug(format_args!("400: request not forwardable: {e}"));
            page(400, "The request cannot be forwarded.", is_head, close, out);
            return Trace {
                id: Some(id),
                resolved,
                cached,
            };
        }
        inc(&c.forwarded);
        let started = Instant::now();
        let result = ctx.pool.request(&req, is_head).await;
        c.forward_latency(started.elapsed());
        ctx.put_buf(req);
        match result {
            Ok(resp) if resp.head.status == 404 && cached && !retried => {
                // The instance may have moved or been replaced since we cached it.
                retried = true;
                inc(&c.retried_after_404);
                (resolved, cached) = match ctx.resolver.lookup(&id, true).await {
                    Ok(r) => r,
                    Err(e) => {
                        backend_failed(ctx, &id, &e, is_head, close, out);
                        return Trace {
                            id: Some(id),
                            ..Trace::default()
                        };
                    }
                };
            }
            Ok(resp) => {
                let status = resp.head.status;
                if status == 403 {
                    ctx.forbidden_hint();
                }
                if RELAYED.contains(&status) {
                    relay(&resp, is_head, close, out);
                } else {
                    inc(&c.api_errors);
                    log::warn(format_args!(
                        "metadata API answered unexpected status {status}; answering 500"
                    ));
                    page(500, MSG_UNKNOWN, is_head, close, out);
                }
                break;
            }
            Err(e) => {
                inc(&c.api_errors);
                log::debug(format_args!("forward for {}: {e}", id.xff));
                let msg = match e {
                    ForwardError::Unreachable(_) => MSG_UNAVAILABLE,
                    ForwardError::Timeout => MSG_TIMEOUT,
                    ForwardError::Broken(_) => MSG_BROKEN,
                };
                page(e.status(), msg, is_head, close, out);
                break;
            }
        }
    }
    Trace {
        id: Some(id),
        resolved,
        cached,
    }
}

/// One access-log line: the guest (`X-Forwarded-For`), the router or
/// network it came through, the instance and project it resolved to (`-`
/// when none) and whether from the cache, then the request line, status and
/// time. Never a header value: the signature and tokens travel in headers.
fn access(buf: &[u8], head: &RequestHead, trace: &Trace, status: u16, started: Instant) {
    let t = head.target.get(buf);
    let target = http::loggable_target(t);
    let (client, scope) = match &trace.id {
        Some(id) => (
            id.xff.escape_default().to_string(),
            match &id.scope {
                Scope::Router(r) => format!("router {r}"),
                Scope::Network(n) => format!("network {n}"),
            },
        ),
        None => ("-".to_string(), "-".to_string()),
    };
    let instance = match &trace.resolved {
        Some(r) => format!(
            "instance {} project {} ({})",
            r.instance,
            r.project,
            if trace.cached { "cached" } else { "looked up" }
        ),
        None => "no instance".to_string(),
    };
    log::access(format_args!(
        "{client} via {scope} -> {instance} \"{} {target}\" {status} {:.1}ms",
        head.method.as_str(),
        started.elapsed().as_secs_f64() * 1000.0
    ));
}

/// Neutron (or Keystone) failed: 503.
fn backend_failed(
    ctx: &LoopCtx,
    id: &Identity,
    e: &BackendError,
    is_head: bool,
    close: bool,
    out: &mut Vec<u8>,
) {
    inc(&ctx.m.backend_unavailable);
    log::warn(format_args!(
        "cannot resolve {} on {:?}: {e}",
        id.xff, id.scope
    ));
    page(503, MSG_BACKEND, is_head, close, out);
}

/// The API's response for the guest: its status, reason and headers, with
/// the connection headers and framing replaced by ours. A field of the
/// API's that would not make a well-formed head is dropped.
fn relay(resp: &ApiResponse, is_head: bool, close: bool, out: &mut Vec<u8>) {
    let h = &resp.head;
    let b = &resp.bytes;
    let reason = HeaderValue::new(h.reason.get(b))
        .ok()
        .filter(|r| !r.as_bytes().is_empty())
        .unwrap_or(HeaderValue::from_static(http::reason(h.status)));
    put_status_line(out, h.status, reason);
    for hs in &h.headers {
        let name = hs.name.get(b);
        let drop = [
            "connection",
            "keep-alive",
            "proxy-connection",
            "transfer-encoding",
        ]
        .iter()
        .any(|d| name.eq_ignore_ascii_case(d.as_bytes()))
            || (!is_head && name.eq_ignore_ascii_case(b"content-length"));
        if drop {
            continue;
        }
        if let (Ok(n), Ok(v)) = (HeaderName::new(name), HeaderValue::new(hs.value.get(b))) {
            http::put_header(out, n, v);
        }
    }
    let payload = if is_head { Vec::new() } else { resp.payload() };
    if !is_head {
        put_content_length(out, payload.len() as u64);
    }
    if close {
        http::put_header(out, CONNECTION, HeaderValue::from_static("close"));
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&payload);
}

/// Neutron era C's error page (`neutron/common/metadata.py`): same body
/// bytes (LF line endings, N = 95 + 2·len(title) + len(message)), CRLF head.
/// After a HEAD, the same head and no body ([`http::write_answer`]).
pub fn page(status: u16, message: &str, is_head: bool, close: bool, out: &mut Vec<u8>) {
    let title = format!("{status} {}", http::reason(status));
    let body = format!(
        "<html>\n <head>\n  <title>{title}</title>\n </head>\n <body>\n  <h1>{title}</h1>\n  {message}<br /><br />\n\n\n </body>\n</html>"
    );
    http::write_answer(out, status, TEXT_PLAIN, body.as_bytes(), is_head, close);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_page_matches_neutron_length_formula() {
        let msg = "Instance was not found on network abc.";
        let mut out = Vec::new();
        page(404, msg, false, false, &mut out);
        let text = String::from_utf8(out).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let title = "404 Not Found";
        assert_eq!(body.len(), 95 + 2 * title.len() + msg.len());
        assert!(head.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(!head.contains("Connection"));
        assert!(body.contains(&format!("  {msg}<br /><br />\n\n\n </body>\n</html>")));
    }

    #[test]
    fn error_pages_after_head_have_the_head_and_no_body() {
        for status in [400, 404, 500, 502, 503, 504] {
            let mut get = Vec::new();
            page(status, "m", false, false, &mut get);
            let mut head = Vec::new();
            page(status, "m", true, false, &mut head);
            assert!(get.starts_with(&head), "{status}: same head");
            assert!(head.ends_with(b"\r\n\r\n"), "{status}: no body");
            assert!(get.len() > head.len());
        }
    }
}
