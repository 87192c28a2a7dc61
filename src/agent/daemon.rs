//! The agent's daemon: load the backend, bind the Unix socket, start one
//! loop per worker, stop and report.
//!
//! Each loop has its own accept on a `dup` of the one listening socket (as
//! in [`crate::proxy`]), its own resolution cache and its own pool of API
//! connections: nothing on the request path is shared between loops except
//! the inventory store's generation (an atomic, read per lookup; each loop
//! refreshes its own copy when it moved). Each loop writes its own
//! block of counters ([`metrics`]), merged on scrape. With
//! `backend = "neutron"` each loop also has its own [`NeutronResolver`]
//! (cache, single flight, batching, prefetch).
//!
//! A connection is [`super::conn`] (a pipelined reader and an in-order
//! writer on the engine's [`Server`]); a request is [`super::handler`]
//! (resolve → sign → forward → relay).
//!
//! [`start_in_process`] is the agent with no socket and no loops of its own
//! (`metaproxy up`, `metaproxy ovn`): it starts only the shared pieces, and
//! each loop of the proxy builds its [`AgentLoop`] from the [`Stage`] and
//! runs the handler itself (why: [`crate::proxy::upstream`]).

use std::cell::Cell;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::agent::config::{AgentConfig, Backend};
use crate::agent::forward;
use crate::agent::link::{ApiLink, InProcessApi};
use crate::agent::metrics::{self, LoopMetrics, Registry};
use crate::agent::neutron::NeutronResolver;
use crate::agent::resolve::{InventoryResolver, Resolver};
use crate::inventory::store::{self, Watcher};
use crate::log;
use crate::rt::sync::oneshot::Replies;
use crate::rt::sync::{Event, UnboundedReceiver, UnboundedSender};
use crate::rt::{self, UnixAcceptor};
use crate::serve::admit::{self, Admission, Gate};
use crate::serve::{self, Server, Stop};

/// At most one "shared secrets differ" hint per loop per this interval.
const FORBIDDEN_HINT_EVERY: Duration = Duration::from_secs(60);

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

/// What every loop of one agent shares: the inventory and the counters'
/// registry (one block per loop).
pub(crate) struct Shared {
    /// The inventory (`backend = "inventory"` only).
    store: Option<Arc<crate::inventory::Store>>,
    metrics: Registry,
}

impl Shared {
    fn stats(&self) -> AgentStats {
        use metrics::Call;
        let r = &self.metrics;
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
}

/// A running agent.
pub struct AgentHandle {
    controls: Vec<UnboundedSender<Stop>>,
    threads: Vec<std::thread::JoinHandle<io::Result<()>>>,
    watcher: Option<Watcher>,
    exporter: Option<crate::metrics::Exporter>,
    shared: Arc<Shared>,
    _report: Option<super::report::Reporter>,
    /// The socket it serves.
    pub socket: PathBuf,
}

impl AgentHandle {
    /// Counters so far, summed over loops.
    pub fn stats(&self) -> AgentStats {
        self.shared.stats()
    }

    /// The metrics in Prometheus text (what `agent.metrics_listen` serves).
    pub fn metrics_text(&self) -> String {
        self.shared.metrics.render()
    }

    /// Where the Prometheus endpoint listens, if enabled.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.exporter.as_ref().map(crate::metrics::Exporter::addr)
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
            let _ = c.unbounded_send(Stop);
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
        serve::join_loops(self.threads, "agent")
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
    start_sharing(cfg, None)
}

/// [`start`], resolving from `shared` when given and the backend is the
/// inventory (`metaproxy up`: the agent's and the API's inventory are one
/// [`crate::inventory::Store`], loaded once and watched by the caller; the
/// agent then starts no watcher of its own).
///
/// # Errors
/// As [`start`].
pub fn start_sharing(
    cfg: AgentConfig,
    shared: Option<Arc<crate::inventory::Store>>,
) -> io::Result<AgentHandle> {
    let workers = cfg.workers.get();
    let budget = admit::fd_budget().max();
    let served = format!(
        "socket {} (mode {:o}, max_connections {}, fd budget {budget}), {workers} loop(s)",
        cfg.socket.display(),
        cfg.socket_mode.bits(),
        cfg.max_connections,
    );
    let socket = cfg.socket.clone();
    let (common, listener) = Common::start(cfg, shared, workers, &served, |cfg| {
        let listener = Arc::new(bind_socket(cfg)?);
        admit::check_backlog("agent", cfg.backlog);
        Ok(listener)
    })?;
    let gate = Arc::new(Gate::new(
        "agent",
        "max_connections",
        common.stage.cfg.max_connections.get(),
    ));
    let (cfg, sh) = (common.stage.cfg.clone(), common.stage.shared.clone());
    let (controls, threads) = serve::run_loops(workers, "agent", move |i, rx| {
        let (cfg, shared) = (cfg.clone(), sh.clone());
        let (listener, gate) = (listener.clone(), gate.clone());
        async move { run_loop(cfg, shared, &listener, gate, rx, i).await }
    })?;
    Ok(AgentHandle {
        controls,
        threads,
        watcher: common.watcher,
        exporter: common.exporter,
        shared: common.stage.shared,
        _report: common.report,
        socket,
    })
}

/// What a socket-serving agent and an in-process one both start: the
/// backend's store (and its watcher when the agent owns it), the counters,
/// the metrics endpoint, Neutron's `report_state`.
struct Common {
    stage: Stage,
    watcher: Option<Watcher>,
    exporter: Option<crate::metrics::Exporter>,
    report: Option<super::report::Reporter>,
}

impl Common {
    /// `loops`: how many loops will resolve (one counter block each);
    /// `served`: how they are reached, for the start line; `bind` runs once
    /// the backend is loaded and before anything is started (a bad
    /// inventory refuses the start before a socket exists).
    fn start<T>(
        cfg: AgentConfig,
        shared: Option<Arc<crate::inventory::Store>>,
        loops: usize,
        served: &str,
        bind: impl FnOnce(&AgentConfig) -> io::Result<T>,
    ) -> io::Result<(Common, T)> {
        for w in cfg.warnings() {
            log::warn(format_args!("{w}"));
        }
        let owned = shared.is_none();
        let (store, backend) = match &cfg.backend {
            Backend::Inventory(inv_path) => {
                let store =
                    match shared {
                        Some(s) => s,
                        None => Arc::new(crate::inventory::Store::load(inv_path).map_err(|e| {
                            io::Error::new(io::ErrorKind::InvalidData, e.to_string())
                        })?),
                    };
                (Some(store), format!("inventory {}", inv_path.display()))
            }
            Backend::Neutron(n) => (
                None,
                format!("neutron at {} ({:?})", n.endpoint.addr, n.auth),
            ),
            Backend::Ovn(r) => (None, format!("{r:?}")),
        };
        let bound = bind(&cfg)?;
        let watcher = match store.as_ref().filter(|_| owned) {
            Some(s) => Some(Watcher::start(
                s.clone(),
                store::POLL_INTERVAL,
                "agent-inventory",
            )?),
            None => None,
        };
        let shared = Arc::new(Shared {
            store,
            metrics: Registry::new(loops),
        });
        let exporter = match cfg.metrics_listen {
            Some(addr) => Some({
                let registry = shared.metrics.clone();
                let l = crate::metrics::bind("agent.metrics_listen", addr)?;
                crate::metrics::serve(l, "agent-metrics", move || registry.render())?
            }),
            None => None,
        };
        log::info(format_args!(
            "agent starting: {served}, {backend}, metadata API {}{}",
            cfg.nova.addr,
            exporter.as_ref().map_or(String::new(), |e| format!(
                ", metrics on http://{}/metrics",
                e.addr()
            ))
        ));
        let report = super::report::start_for(&cfg)?;
        let common = Common {
            stage: Stage {
                cfg: Arc::new(cfg),
                shared,
                api: None,
            },
            watcher,
            exporter,
            report,
        };
        Ok((common, bound))
    }
}

/// What a loop of another daemon needs to run the agent stage on itself
/// (see [`InProcess`]): the config and the shared counters and store.
/// Cheap to clone and `Send`: each loop builds its own [`AgentLoop`] from it
/// on its own thread ([`Stage::on_this_loop`]).
#[derive(Clone)]
pub struct Stage {
    cfg: Arc<AgentConfig>,
    shared: Arc<Shared>,
    /// The API stage each loop hands its signed requests to, in-process
    /// (`metaproxy up`); `None`: over TCP to `[agent.nova]`.
    api: Option<crate::api::server::Stage>,
}

impl std::fmt::Debug for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage")
            .field("metadata_api", &self.cfg.nova.addr)
            .field("api_in_process", &self.api.is_some())
            .finish_non_exhaustive()
    }
}

impl Stage {
    /// Loop `index`'s agent state (resolver and cache, signer, pooled API
    /// client), sharing the calling loop's buffers (`server`). Call it on
    /// that loop's thread: the state is per-loop and not `Send`.
    ///
    /// # Errors
    /// `index` is past the loops the stage was started for, or the
    /// inventory is not loaded.
    pub fn on_this_loop(&self, index: usize, server: Rc<Server>) -> io::Result<Rc<AgentLoop>> {
        AgentLoop::new(
            self.cfg.clone(),
            &self.shared,
            index,
            server,
            self.api.as_ref(),
        )
    }

    /// Whether its signed requests go to an API stage on the same loop.
    pub fn api_in_process(&self) -> bool {
        self.api.is_some()
    }

    /// This stage, handing its signed requests to `api` on the same loop
    /// instead of over TCP to `[agent.nova]` (`metaproxy up`, where the API
    /// is in the same process; see [`super::link`]).
    pub fn with_api_in_process(mut self, api: crate::api::server::Stage) -> Stage {
        self.api = Some(api);
        self
    }
}

/// The agent without a socket (`metaproxy ovn`, `metaproxy up`): no
/// listener, no loops of its own; every loop of the proxy runs the agent
/// stage itself, from [`InProcess::stage`] ([`crate::proxy::upstream`]'s
/// `Upstream::InProcess`). This holds what the agent owns besides its
/// loops: the inventory watcher, the metrics endpoint and counters, the
/// `report_state` thread.
pub struct InProcess {
    common: Common,
}

/// Start the agent's shared pieces for `loops` loops of another daemon
/// (`store` as in [`start_sharing`]). The `[agent]` keys about its socket
/// and its own loops (`socket`, `socket_mode`, `workers`, `backlog`,
/// `max_connections`) have no effect.
///
/// # Errors
/// The inventory is broken, or the metrics endpoint cannot be bound.
pub fn start_in_process(
    cfg: AgentConfig,
    store: Option<Arc<crate::inventory::Store>>,
    loops: usize,
) -> io::Result<InProcess> {
    let served = format!("in-process on the proxy's {loops} loop(s), no socket");
    let (common, ()) = Common::start(cfg, store, loops, &served, |_| Ok(()))?;
    Ok(InProcess { common })
}

impl InProcess {
    /// What each proxy loop builds its agent state from.
    pub fn stage(&self) -> Stage {
        self.common.stage.clone()
    }

    /// Counters so far, summed over loops.
    pub fn stats(&self) -> AgentStats {
        self.common.stage.shared.stats()
    }

    /// The metrics in Prometheus text (what `agent.metrics_listen` serves).
    pub fn metrics_text(&self) -> String {
        self.common.stage.shared.metrics.render()
    }

    /// Where the Prometheus endpoint listens, if enabled.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.common
            .exporter
            .as_ref()
            .map(crate::metrics::Exporter::addr)
    }

    /// Stop the inventory watcher and the metrics endpoint (after the
    /// proxy's loops, which hold the per-loop state, have stopped).
    pub fn stop(mut self) {
        if let Some(w) = self.common.watcher.take() {
            w.stop();
        }
        self.common.exporter.take();
    }
}

/// Per-loop state shared by its tasks: the agent's own loop's, or a proxy
/// loop's that runs the agent stage itself ([`Stage::on_this_loop`]).
pub struct AgentLoop {
    pub(super) cfg: Arc<AgentConfig>,
    /// This loop's counters.
    pub(super) m: Arc<LoopMetrics>,
    /// The configured backend, with its cache.
    pub(super) resolver: Resolver,
    /// The `Host` sent to the API.
    pub(super) host_header: String,
    /// This loop's way to the API: its connections, or the API stage on
    /// this loop.
    pub(super) pool: ApiLink,
    /// The shared secret's HMAC state, keyed once (`X-Instance-ID-Signature`).
    pub(super) signer: crate::sign::Signer,
    /// Set when the loop drains.
    pub(super) stopping: Event,
    /// This loop's buffers (and, on the agent's own loops, its connections).
    pub(super) server: Rc<Server>,
    /// Recycled cells of the answers its request tasks hand their
    /// connections' writers ([`super::conn`]).
    pub(super) replies: Replies<Vec<u8>>,
    last_forbidden_hint: Cell<Option<Instant>>,
}

impl AgentLoop {
    fn new(
        cfg: Arc<AgentConfig>,
        shared: &Shared,
        index: usize,
        server: Rc<Server>,
        api: Option<&crate::api::server::Stage>,
    ) -> io::Result<Rc<AgentLoop>> {
        let m = shared
            .metrics
            .0
            .get(index)
            .cloned()
            .ok_or_else(|| io::Error::other(format!("agent loop {index}: no counters")))?;
        let resolver = match &cfg.backend {
            Backend::Neutron(n) => Resolver::Neutron(NeutronResolver::new(
                n,
                cfg.cache_ttl,
                cfg.negative_cache_ttl,
                cfg.cache_capacity,
                m.clone(),
            )),
            Backend::Ovn(r) => Resolver::Ovn(crate::ovn::serve::OvnResolver::new(r)),
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
        let pool = match api {
            Some(api) => ApiLink::InProcess(Rc::new(InProcessApi {
                api: api.on_this_loop(index)?,
                server: server.clone(),
                timeout: cfg.nova.timeout,
            })),
            None => ApiLink::Pool(Rc::new(
                forward::Pool::new(cfg.nova.addr, cfg.pool_size.get(), cfg.nova.timeout)
                    .with_tls(cfg.nova.tls.clone())
                    .pipelined(),
            )),
        };
        Ok(Rc::new(AgentLoop {
            host_header: cfg.nova.host_header(),
            m,
            resolver,
            pool,
            signer: crate::sign::Signer::new(cfg.shared_secret.as_bytes()),
            stopping: Event::default(),
            server,
            replies: Replies::new(serve::engine::FREE_BUFFERS),
            last_forbidden_hint: Cell::new(None),
            cfg,
        }))
    }

    pub(super) fn forbidden_hint(&self) {
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
    mut control: UnboundedReceiver<Stop>,
    index: usize,
) -> io::Result<()> {
    use futures_util::StreamExt;
    let server = Server::new(serve::settings!(cfg));
    let ctx = AgentLoop::new(cfg, &shared, index, server, None)?;
    let acceptor = UnixAcceptor::from_std(listener.try_clone()?)?;
    let c = ctx.clone();
    let accept = ctx
        .server
        .clone()
        .accept(acceptor, Admission::new(gate), move |conn| {
            let c = c.clone();
            async move {
                let conn = Rc::new(conn);
                super::conn::serve(c, conn.clone()).await;
                conn.shutdown();
                // The task drops `conn` (closing the socket) before the
                // engine frees its place under the caps.
            }
        });
    let accept_task = rt::spawn_handle(accept);
    let _ = control.next().await;
    drop(accept_task);
    ctx.stopping.set();
    let label = format!("agent loop {index}");
    ctx.server.drain(&label, ctx.cfg.drain_timeout).await;
    Ok(())
}
