//! The agent's Unix-socket server: accept, resolve, sign, forward, relay.
//!
//! One loop per worker, each with its own accept on a `dup` of the one
//! listening socket (as in [`crate::proxy`]), its own resolution cache and
//! its own pool of API connections: nothing on the request path is shared
//! between loops except the inventory `Arc` (read on a cache miss) and a few
//! relaxed atomic counters ([`AgentStats`]).
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
//! 2. (scope, key) → [`resolve`] through the loop's [`TtlCache`]; zero or
//!    several ports → 404 with Neutron's era-C page ("Instance was not found
//!    on network X.");
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
//! leaves the connection in a good state, and closing it would make
//! metaproxy's proxy pool believe the agent is one-shot (it switches to one
//! connection per request on the first `Connection: close`).

use std::cell::{Cell, RefCell};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::{select, Either};
use smallvec::SmallVec;

use crate::agent::cache::{Lookup, TtlCache};
use crate::agent::config::{AgentConfig, Backend, INVENTORY_POLL};
use crate::agent::forward::{self, ApiResponse, ForwardError};
use crate::agent::identity::{self, Identity, LookupKey, Scope};
use crate::agent::resolve::{resolve, InventoryStore, Resolution, Resolved, Watcher};
use crate::http::{self, ChunkProgress, ChunkedScanner, Limits, Method, RequestBody, RequestHead};
use crate::log;
use crate::rt::sync::{Event, UnboundedReceiver, UnboundedSender};
use crate::rt::{self, UnixAcceptor, UnixConn};

/// From the first byte of a request to its complete head (haproxy's `http-request`).
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle time allowed between requests on a kept-alive connection.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Each body read and each response write.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(32);
/// How long `stop` waits for requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Back-off after accept(2) fails (EMFILE and friends).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
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

/// Event counters, summed over loops.
#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    inventory_lookups: AtomicU64,
    cache_hits: AtomicU64,
    bad_requests: AtomicU64,
    not_found: AtomicU64,
    forwarded: AtomicU64,
    api_errors: AtomicU64,
    retried_after_404: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// A snapshot of the agent's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentStats {
    /// Requests parsed.
    pub requests: u64,
    /// Resolutions that went to the inventory (cache misses and forced lookups).
    pub inventory_lookups: u64,
    /// Resolutions answered by a cache (positive or negative).
    pub cache_hits: u64,
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
    store: Arc<InventoryStore>,
    counters: Counters,
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
    shared: Arc<Shared>,
    /// The socket it serves.
    pub socket: PathBuf,
}

impl AgentHandle {
    /// Counters so far, summed over loops.
    pub fn stats(&self) -> AgentStats {
        let c = &self.shared.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        AgentStats {
            requests: l(&c.requests),
            inventory_lookups: l(&c.inventory_lookups),
            cache_hits: l(&c.cache_hits),
            bad_requests: l(&c.bad_requests),
            not_found: l(&c.not_found),
            forwarded: l(&c.forwarded),
            api_errors: l(&c.api_errors),
            retried_after_404: l(&c.retried_after_404),
        }
    }

    /// Reload the inventory now (the file is also polled every second).
    ///
    /// # Errors
    /// The file is broken; the previous inventory stays in use.
    pub fn reload_inventory(&self) -> Result<(), String> {
        match &self.watcher {
            Some(w) => w.reload(),
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
    let Backend::Inventory(inv_path) = &cfg.backend;
    let store = InventoryStore::load(inv_path)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    let store = Arc::new(store);
    let listener = Arc::new(bind_socket(&cfg)?);
    let watcher = Watcher::start(store.clone(), INVENTORY_POLL)?;
    let shared = Arc::new(Shared {
        store,
        counters: Counters::default(),
    });
    let workers = cfg.workers.get();
    log::info(format_args!(
        "agent starting: socket {} (mode {:o}), {workers} loop(s), inventory {}, metadata API {}",
        cfg.socket.display(),
        cfg.socket_mode.bits(),
        inv_path.display(),
        cfg.nova.addr
    ));
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
        let rx = receivers[i].lock().ok().and_then(|mut r| r.take());
        async move {
            let rx = rx.ok_or_else(|| io::Error::other("control channel already taken"))?;
            run_loop(cfg, shared, &listener, rx).await
        }
    })?;
    Ok(AgentHandle {
        controls,
        threads,
        watcher: Some(watcher),
        shared,
        socket,
    })
}

type CacheKey = (Scope, LookupKey);

/// Per-loop state shared by its tasks.
struct LoopCtx {
    cfg: Arc<AgentConfig>,
    shared: Arc<Shared>,
    host_header: String,
    cache: RefCell<TtlCache<CacheKey, Rc<Resolved>>>,
    /// Inventory generation the cache was filled from.
    cache_generation: Cell<u64>,
    pool: forward::Pool,
    stopping: Event,
    active: Cell<usize>,
    last_forbidden_hint: Cell<Option<Instant>>,
    free: RefCell<Vec<Vec<u8>>>,
}

impl LoopCtx {
    fn new_cache(cfg: &AgentConfig) -> TtlCache<CacheKey, Rc<Resolved>> {
        TtlCache::new(
            cfg.cache_capacity,
            cfg.cache_ttl,
            cfg.negative_cache_ttl,
            crate::agent::cache::SystemClock,
        )
    }

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

    /// Resolve through the cache (unless `fresh`); the bool says whether the
    /// answer came from the cache.
    fn lookup(&self, id: &Identity, fresh: bool) -> (Option<Rc<Resolved>>, bool) {
        let c = &self.shared.counters;
        let generation = self.shared.store.generation();
        if generation != self.cache_generation.get() {
            // A reload: everything cached describes the old file.
            *self.cache.borrow_mut() = Self::new_cache(&self.cfg);
            self.cache_generation.set(generation);
        }
        let key = (id.scope.clone(), id.key.clone());
        if !fresh {
            match self.cache.borrow_mut().get(&key) {
                Lookup::Hit(r) => {
                    bump(&c.cache_hits);
                    return (Some(r), true);
                }
                Lookup::NegativeHit => {
                    bump(&c.cache_hits);
                    return (None, true);
                }
                Lookup::Miss => {}
            }
        }
        bump(&c.inventory_lookups);
        let (inv, inv_generation) = self.shared.store.current();
        let cacheable = inv_generation == self.cache_generation.get();
        let mut cache = self.cache.borrow_mut();
        match resolve(&inv, &id.scope, &id.key) {
            Resolution::Found(r) => {
                let r = Rc::new(r);
                if cacheable {
                    cache.insert(key, r.clone());
                }
                (Some(r), false)
            }
            Resolution::NotFound => {
                log::debug(format_args!("no port for {} on {:?}", id.xff, id.scope));
                if cacheable {
                    cache.insert_negative(key);
                }
                (None, false)
            }
            Resolution::Ambiguous(n) => {
                log::warn(format_args!(
                    "{n} ports match {} on {:?}; answering 404 (check the inventory for overlaps)",
                    id.xff, id.scope
                ));
                if cacheable {
                    cache.insert_negative(key);
                }
                (None, false)
            }
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
    mut control: UnboundedReceiver<Control>,
) -> io::Result<()> {
    use futures_util::StreamExt;
    let ctx = Rc::new(LoopCtx {
        host_header: cfg.nova.host_header(),
        cache: RefCell::new(LoopCtx::new_cache(&cfg)),
        cache_generation: Cell::new(shared.store.generation()),
        pool: forward::Pool::new(cfg.nova.addr, cfg.pool_size.get(), cfg.nova.timeout),
        stopping: Event::default(),
        active: Cell::new(0),
        last_forbidden_hint: Cell::new(None),
        free: RefCell::new(Vec::new()),
        cfg,
        shared,
    });
    let acceptor = UnixAcceptor::from_std(listener.try_clone()?)?;
    let accept_task = rt::spawn_handle(accept_loop(ctx.clone(), acceptor));
    let _ = control.next().await;
    drop(accept_task);
    ctx.stopping.set();
    let deadline = Instant::now() + DRAIN_TIMEOUT;
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

async fn accept_loop(ctx: Rc<LoopCtx>, acceptor: UnixAcceptor) {
    loop {
        let conn = match acceptor.accept().await {
            Ok(c) => c,
            Err(e) => {
                log::warn(format_args!(
                    "agent accept failed: {e}; retrying in {ACCEPT_BACKOFF:?}"
                ));
                rt::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        ctx.active.set(ctx.active.get() + 1);
        let c = ctx.clone();
        rt::spawn(async move {
            let guard = ActiveGuard(c.clone());
            serve(&c, &conn).await;
            conn.shutdown();
            drop(guard);
        });
    }
}

struct ActiveGuard(Rc<LoopCtx>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.set(self.0.active.get().saturating_sub(1));
    }
}

/// The idle loop of one connection: wait for bytes holding no buffer, then
/// hand the request to a boxed [`handle_request`].
async fn serve(ctx: &LoopCtx, conn: &UnixConn) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        if buf.is_empty() {
            let read = rt::with_deadline(
                Instant::now() + IDLE_TIMEOUT,
                conn.read_idle(std::mem::take(&mut buf), READ_CHUNK_BYTES),
            );
            let stop = ctx.stopping.wait();
            futures_util::pin_mut!(read, stop);
            match select(read, stop).await {
                Either::Left((Ok((Ok(n), b)), _)) => {
                    buf = b;
                    if n == 0 {
                        return;
                    }
                }
                Either::Left(_) | Either::Right(_) => return,
            }
        }
        let head_deadline = Instant::now() + HEAD_TIMEOUT;
        if Box::pin(handle_request(ctx, conn, &mut buf, head_deadline))
            .await
            .is_err()
        {
            return;
        }
        if ctx.stopping.is_set() {
            return;
        }
        if buf.is_empty() {
            buf = Vec::new(); // release the capacity while idle
        }
    }
}

/// The connection must end (after whatever was already written).
struct Close;

/// Read one request (its first bytes are in `buf`), answer it. `Ok` keeps
/// the connection; pipelined bytes that followed stay in `buf`.
async fn handle_request(
    ctx: &LoopCtx,
    conn: &UnixConn,
    buf: &mut Vec<u8>,
    head_deadline: Instant,
) -> Result<(), Close> {
    let limits = Limits::default();
    // 1. The head.
    let head = loop {
        match http::parse_request(buf, &limits) {
            Ok(Some(h)) => break h,
            Ok(None) => {}
            Err(e) => return Err(reject(conn, e.status()).await),
        }
        let taken = std::mem::take(buf);
        let (res, b) =
            match rt::with_deadline(head_deadline, conn.read_append(taken, READ_CHUNK_BYTES)).await
            {
                Ok(r) => r,
                Err(rt::Elapsed) => return Err(reject(conn, 408).await),
            };
        *buf = b;
        match res {
            Ok(0) | Err(_) => return Err(Close),
            Ok(_) => {}
        }
    };
    bump(&ctx.shared.counters.requests);

    // 2. The body.
    let (body_end, chunked_body) = read_body(conn, buf, &head, &limits).await?;
    let body: &[u8] = match &chunked_body {
        Some(b) => b,
        None => &buf[head.head_len..body_end],
    };

    // 3. Resolve, sign, forward. Draining does not add `Connection: close`
    // (metaproxy's proxy would take that as "one-shot agent" for good); the
    // idle loop closes instead, and a pooled client re-sends what it had
    // pipelined behind this request.
    let keep = head.keep_alive;
    let mut out = ctx.take_buf();
    answer(ctx, buf, &head, body, !keep, &mut out).await;

    // 4. Write the answer.
    match rt::with_deadline(Instant::now() + CLIENT_TIMEOUT, conn.write_all(out)).await {
        Ok((Ok(()), b)) => ctx.put_buf(b),
        _ => return Err(Close),
    }
    if !keep {
        conn.shutdown_write();
        return Err(Close);
    }
    buf.drain(..body_end);
    Ok(())
}

/// Build the whole response to one parsed request into `out`.
async fn answer(
    ctx: &LoopCtx,
    buf: &[u8],
    head: &RequestHead,
    body: &[u8],
    close: bool,
    out: &mut Vec<u8>,
) {
    let c = &ctx.shared.counters;
    let id = match identity::parse_identity(|name| {
        head.headers
            .iter()
            .filter(|h| h.name.get(buf).eq_ignore_ascii_case(name.as_bytes()))
            .map(|h| h.value.get(buf))
            .collect::<SmallVec<[&[u8]; 2]>>()
    }) {
        Ok(id) => id,
        Err(e) => {
            bump(&c.bad_requests);
            log::debug(format_args!("400: {e}"));
            page(400, &e.message(), close, out);
            return;
        }
    };
    let (mut resolved, mut cached) = ctx.lookup(&id, false);
    let mut retried = false;
    let token = head.header(buf, HEADER_TOKEN);
    let is_head = head.method == Method::Head;
    loop {
        let Some(r) = resolved.as_deref() else {
            bump(&c.not_found);
            let msg = match &id.scope {
                Scope::Network(n) => format!("Instance was not found on network {n}."),
                Scope::Router(r) => format!("Instance was not found on router {r}."),
            };
            page(404, &msg, close, out);
            return;
        };
        let mut req = ctx.take_buf();
        api_request(
            ctx,
            head,
            head.target.get(buf),
            &id,
            r,
            token,
            body,
            &mut req,
        );
        bump(&c.forwarded);
        let result = ctx.pool.request(&req, is_head).await;
        ctx.put_buf(req);
        match result {
            Ok(resp) if resp.head.status == 404 && cached && !retried => {
                // The instance may have moved or been replaced since we cached it.
                retried = true;
                bump(&c.retried_after_404);
                ctx.cache
                    .borrow_mut()
                    .invalidate(&(id.scope.clone(), id.key.clone()));
                (resolved, cached) = ctx.lookup(&id, true);
            }
            Ok(resp) => {
                let status = resp.head.status;
                if status == 403 {
                    ctx.forbidden_hint();
                }
                if RELAYED.contains(&status) {
                    relay(&resp, is_head, close, out);
                } else {
                    bump(&c.api_errors);
                    log::warn(format_args!(
                        "metadata API answered unexpected status {status}; answering 500"
                    ));
                    page(500, MSG_UNKNOWN, close, out);
                }
                return;
            }
            Err(e) => {
                bump(&c.api_errors);
                log::debug(format_args!("forward for {}: {e}", id.xff));
                let msg = match e {
                    ForwardError::Unreachable(_) => MSG_UNAVAILABLE,
                    ForwardError::Timeout => MSG_TIMEOUT,
                    ForwardError::Broken(_) => MSG_BROKEN,
                };
                page(e.status(), msg, close, out);
                return;
            }
        }
    }
}

/// The request to the metadata API: exactly the headers Neutron sends
/// (spec §3.4) plus `Host` and framing.
#[allow(clippy::too_many_arguments)]
fn api_request(
    ctx: &LoopCtx,
    head: &RequestHead,
    target: &[u8],
    id: &Identity,
    r: &Resolved,
    token: Option<&[u8]>,
    body: &[u8],
    out: &mut Vec<u8>,
) {
    let sig = crate::sign::sign_instance_id(ctx.cfg.shared_secret.as_bytes(), &r.instance);
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target);
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(ctx.host_header.as_bytes());
    for (name, value) in [
        ("X-Forwarded-For", id.xff.as_bytes()),
        ("X-Instance-ID", r.instance.as_bytes()),
        ("X-Tenant-ID", r.project.as_bytes()),
        ("X-Instance-ID-Signature", sig.as_bytes()),
    ] {
        put_header(out, name, value);
    }
    if let Some(t) = token {
        put_header(out, HEADER_TOKEN, t);
    }
    if !body.is_empty() || matches!(head.method, Method::Post | Method::Put) {
        put_header(out, "Content-Length", body.len().to_string().as_bytes());
    }
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body);
}

/// Append `\r\nName: value` (the caller ends the head with `\r\n\r\n`).
fn put_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
}

/// The API's response for the guest: its status, reason and headers, with
/// the connection headers and framing replaced by ours.
fn relay(resp: &ApiResponse, is_head: bool, close: bool, out: &mut Vec<u8>) {
    let h = &resp.head;
    let b = &resp.bytes;
    out.extend_from_slice(format!("HTTP/1.1 {} ", h.status).as_bytes());
    let reason = h.reason.get(b);
    if reason.is_empty() {
        out.extend_from_slice(http::reason(h.status).as_bytes());
    } else {
        out.extend_from_slice(reason);
    }
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
        if !drop {
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(hs.value.get(b));
        }
    }
    let payload = if is_head { Vec::new() } else { resp.payload() };
    if !is_head {
        out.extend_from_slice(format!("\r\nContent-Length: {}", payload.len()).as_bytes());
    }
    if close {
        out.extend_from_slice(b"\r\nConnection: close");
    }
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(&payload);
}

/// Neutron era C's error page (`neutron/common/metadata.py`): same body
/// bytes (LF line endings, N = 95 + 2·len(title) + len(message)), CRLF head.
pub fn page(status: u16, message: &str, close: bool, out: &mut Vec<u8>) {
    let title = format!("{status} {}", http::reason(status));
    let body = format!(
        "<html>\n <head>\n  <title>{title}</title>\n </head>\n <body>\n  <h1>{title}</h1>\n  {message}<br /><br />\n\n\n </body>\n</html>"
    );
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {title}\r\nContent-Type: text/plain; charset=UTF-8\r\nContent-Length: {}\r\n{}\r\n",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        )
        .as_bytes(),
    );
    out.extend_from_slice(body.as_bytes());
}

/// Read the body into `buf`. Returns where the request ends in `buf` and,
/// for a chunked body, the de-chunked payload.
async fn read_body(
    conn: &UnixConn,
    buf: &mut Vec<u8>,
    head: &RequestHead,
    limits: &Limits,
) -> Result<(usize, Option<Vec<u8>>), Close> {
    let start = head.head_len;
    let mut sent_continue = false;
    loop {
        match head.body {
            RequestBody::None => return Ok((start, None)),
            RequestBody::Length(n) => {
                let n = usize::try_from(n).map_err(|_| Close)?;
                if buf.len() >= start + n {
                    return Ok((start + n, None));
                }
            }
            RequestBody::Chunked => {
                let mut sc = ChunkedScanner::new(limits.max_body_bytes);
                let mut payload = Vec::new();
                match sc.decode(&buf[start..], &mut payload) {
                    Ok(ChunkProgress::Done { consumed }) => {
                        return Ok((start + consumed, Some(payload)))
                    }
                    Ok(ChunkProgress::NeedMore { .. }) => {}
                    Err(e) => return Err(reject(conn, e.status()).await),
                }
            }
        }
        if head.expect_continue && !sent_continue {
            sent_continue = true;
            let w = rt::with_deadline(
                Instant::now() + CLIENT_TIMEOUT,
                conn.write_static(http::CONTINUE_100),
            )
            .await;
            if !matches!(w, Ok(Ok(()))) {
                return Err(Close);
            }
        }
        let taken = std::mem::take(buf);
        let (res, b) = match rt::with_deadline(
            Instant::now() + CLIENT_TIMEOUT,
            conn.read_append(taken, READ_CHUNK_BYTES),
        )
        .await
        {
            Ok(r) => r,
            Err(rt::Elapsed) => return Err(reject(conn, 408).await),
        };
        *buf = b;
        match res {
            Ok(0) | Err(_) => return Err(Close),
            Ok(_) => {}
        }
    }
}

/// Send a canned error (it says `Connection: close`) and end the connection.
async fn reject(conn: &UnixConn, status: u16) -> Close {
    let _ = rt::with_deadline(
        Instant::now() + CLIENT_TIMEOUT,
        conn.write_static(http::canned(status)),
    )
    .await;
    Close
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_page_matches_neutron_length_formula() {
        let msg = "Instance was not found on network abc.";
        let mut out = Vec::new();
        page(404, msg, false, &mut out);
        let text = String::from_utf8(out).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let title = "404 Not Found";
        assert_eq!(body.len(), 95 + 2 * title.len() + msg.len());
        assert!(head.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(!head.contains("Connection"));
        assert!(body.contains(&format!("  {msg}<br /><br />\n\n\n </body>\n</html>")));
    }
}
