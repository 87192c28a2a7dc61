//! The namespace metadata proxy: one process, one loop per core, every namespace.
//!
//! Start-up creates every listener inside its namespace (a helper thread
//! does `setns`, bind and listen, see [`crate::rt::netns`]). Each listening
//! socket is then shared by all loops: every loop adopts a `dup` of it and
//! runs its own accept on it, so the kernel hands each new connection to one
//! waiting loop. We do not shard with `SO_REUSEPORT`: a stray haproxy still
//! bound with `SO_REUSEPORT` would silently take half the traffic, where a
//! plain bind fails loudly with "address in use".
//!
//! Per loop: a [`ProxyLoop`] (config, upstream: the agent's socket pool
//! or, in `up` and `ovn`, the agent stage on the loop itself
//! ([`upstream::Upstream`]), the engine's [`Server`] with its buffer free
//! list) and per
//! namespace a [`NsRuntime`] (its config, counters and a `closing` event). The
//! per-namespace connection count is the one cross-core value (an atomic in
//! the namespace's [`Gate`]), because `max_connections` is a namespace limit,
//! not a per-loop one. At the cap a namespace stops accepting until one of
//! its connections closes ([`crate::serve::admit`]).
//!
//! Namespaces come and go at run time ([`control::ControlPlane`]: SIGHUP
//! reload, discovery, `metaproxy ctl`): the control plane binds the new
//! listeners in their namespace and sends [`Control::Add`] to every loop;
//! [`Control::Remove`] makes each loop drop its accepts and set that
//! namespace's `closing` event, so idle connections close and in-flight
//! requests finish, while every other namespace is untouched.
//!
//! Connections run on the connection engine ([`crate::serve::engine`]); this
//! module and [`conn`] hold only the proxy's part.

pub mod config;
pub mod conn;
pub mod control;
pub mod discover;
pub mod error;
pub mod imdsv2;
pub mod ratelimit;
pub mod upstream;

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use crate::log;
use crate::metrics::{counter_set, inc};
use crate::proxy::config::{NamespaceConfig, ProxyConfig};
use crate::rt::sync::{Event, UnboundedReceiver};
use crate::rt::{self, TcpAcceptor};
use crate::serve::admit::{self, Admission, Gate};
use crate::serve::{self, Server};

/// Messages from the control plane to the loops.
pub enum Control {
    /// Start serving a namespace.
    Add(Arc<NamespaceListeners>),
    /// Stop serving a namespace: close its listeners, finish its requests.
    Remove(u64),
    /// Stop accepting, drain in-flight requests, exit.
    Stop,
}

/// One namespace's listeners, created in its namespace, shared by all loops.
#[derive(Debug)]
pub struct NamespaceListeners {
    /// Unique id for this registration.
    pub id: u64,
    /// Its config.
    pub cfg: NamespaceConfig,
    /// Bound, listening sockets (one per address).
    pub sockets: Vec<std::net::TcpListener>,
    /// Its `max_connections` gate: connections open now, across all loops.
    pub gate: Arc<Gate>,
    /// Its counters, one block per loop (loop `i` writes `counters[i]`;
    /// `ctl status` and the metrics endpoint sum them).
    pub counters: Vec<Arc<ProxyCounters>>,
}

impl NamespaceListeners {
    /// Its counters summed over loops.
    pub fn counter_totals(&self) -> ProxyCounterSnapshot {
        let mut s = ProxyCounterSnapshot::default();
        for c in &self.counters {
            s.add(&c.snapshot());
        }
        s
    }
}

/// Per-namespace state on one loop.
pub struct NsRuntime {
    /// Registration id (see [`NamespaceListeners::id`]).
    pub id: u64,
    /// Its config.
    pub cfg: NamespaceConfig,
    /// This loop's counters of the namespace (one of
    /// [`NamespaceListeners::counters`]).
    pub counters: Arc<ProxyCounters>,
    /// Set when the namespace is removed or the loop drains: idle
    /// connections close, in-flight requests finish and then close.
    pub closing: Event,
}

counter_set! {
    /// The proxy's event counters, per namespace and loop
    /// (`metaproxy_proxy_<event>_total`); every error is counted by
    /// [`error::ProxyError::classify`].
    pub struct ProxyCounters / ProxyCounterSnapshot {
        connections_accepted: "Connections accepted.",
        requests: "Requests relayed to the agent.",
        tokens_issued: "IMDSv2 tokens issued.",
        rx_spoofed_header: "Requests that carried a trust header (X-Forwarded-For, X-Neutron-*, X-Instance-ID, ...), deleted before relaying.",
        rx_bad_request: "Requests refused 400: malformed head or chunked body.",
        rx_smuggling: "Requests refused 400 for ambiguous framing (CL+TE, differing Content-Lengths, TE on HTTP/1.0).",
        rx_head_too_large: "Requests refused 431: head over max_head_bytes or max_headers.",
        rx_body_too_large: "Requests refused 413: body over max_body_bytes.",
        rx_method_not_allowed: "Requests refused 405: a method other than GET, HEAD, POST, PUT.",
        rx_unsupported_encoding: "Requests refused 501: a transfer coding other than chunked.",
        rx_timeout: "Heads not complete within timeouts.http_request (408).",
        rx_body_timeout: "Bodies that stalled longer than timeouts.client (408).",
        rate_limited: "Requests refused 429 by the rate limit.",
        token_rejected: "Requests refused for a missing or invalid IMDSv2 token (401) or a bad token PUT (400/403).",
        upstream_refused: "Requests answered 503: the agent could not be reached.",
        upstream_broken: "Requests answered 502: the agent's answer was cut off or malformed, or lost after a POST/PUT was sent.",
        upstream_timeout: "Requests answered 504: the agent did not answer within timeouts.server.",
        internal_error: "Requests answered 500 by the proxy itself.",
    }
}

impl ProxyCounterSnapshot {
    /// Requests answered 502/503/504 because of the agent (`ctl status`'s `UP_ERR`).
    pub fn upstream_errors(&self) -> u64 {
        self.upstream_refused + self.upstream_broken + self.upstream_timeout
    }
}

/// Per-loop state shared by its tasks.
pub struct ProxyLoop {
    /// Validated configuration.
    pub cfg: Arc<ProxyConfig>,
    /// Where this loop relays: the agent's socket, or the agent stage on
    /// this loop ([`upstream::Upstream`]).
    pub upstream: upstream::Upstream,
    /// This loop's connections and their buffers.
    pub server: Rc<Server>,
    /// IMDSv2 token issuer/validator (one per process).
    pub tokens: Arc<imdsv2::TokenAuthority>,
    /// Rate limiter (one per process), when enabled.
    pub limiter: Option<Arc<ratelimit::RateLimiter>>,
}

/// Create one namespace's listeners inside it.
///
/// # Errors
/// The namespace cannot be entered or an address cannot be bound; the message
/// names the namespace and address.
pub fn bind_namespace(
    ns: &NamespaceConfig,
    backlog: i32,
) -> io::Result<Vec<std::net::TcpListener>> {
    let addrs = ns.listen.clone();
    let label = format!("ns {}", ns.name);
    rt::netns::in_namespace(ns.netns.as_deref(), move || {
        admit::check_backlog(&label, backlog);
        addrs
            .iter()
            .map(|a| {
                // Retrying: a proxy restarted right after a crash finds the
                // dead one's listener still bound for a few milliseconds.
                rt::listen_tcp_retrying(*a, backlog)
                    .map_err(|e| io::Error::new(e.kind(), format!("bind {a}: {e}")))
            })
            .collect::<io::Result<Vec<_>>>()
    })
    .map_err(|e| io::Error::new(e.kind(), format!("namespace {}: {e}", ns.name)))
}

/// A running proxy: its loops and control plane.
pub struct ProxyHandle {
    /// Add/remove namespaces, reload, report.
    pub control: Arc<control::ControlPlane>,
    threads: Vec<std::thread::JoinHandle<io::Result<()>>>,
    exporter: Option<crate::metrics::Exporter>,
    /// Actual bound addresses of the configured namespaces, in config order.
    pub bound: Vec<Vec<SocketAddr>>,
}

impl ProxyHandle {
    /// Where the Prometheus endpoint (`proxy.metrics_listen`) listens, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.exporter.as_ref().map(crate::metrics::Exporter::addr)
    }

    /// Ask every loop to drain and wait for them to finish.
    ///
    /// # Errors
    /// A loop failed.
    pub fn stop(self) -> io::Result<()> {
        self.control.broadcast_stop();
        self.join()
    }

    /// Wait for the loops to end.
    ///
    /// # Errors
    /// A loop failed.
    pub fn join(self) -> io::Result<()> {
        serve::join_loops(self.threads, "proxy")
    }
}

/// Bind every configured listener and start `cfg.workers` loops serving
/// them, relaying to the agent's socket (`cfg.agent_socket`).
///
/// # Errors
/// Binding failed (the daemon must refuse to start) or a thread could not start.
pub fn start(cfg: ProxyConfig) -> io::Result<ProxyHandle> {
    start_with(cfg, upstream::AgentLink::Socket)
}

/// [`start`], relaying as `link` says: with
/// [`upstream::AgentLink::InProcess`] every loop runs the agent stage
/// itself (started for `cfg.workers` loops) and `cfg.agent_socket` is not
/// used.
///
/// # Errors
/// As [`start`]; a loop that cannot build its agent state ends with the error.
pub fn start_with(cfg: ProxyConfig, link: upstream::AgentLink) -> io::Result<ProxyHandle> {
    // Bind everything first: a bad namespace or address refuses the start.
    let mut initial = Vec::with_capacity(cfg.namespaces.len());
    for ns in &cfg.namespaces {
        initial.push((ns.clone(), bind_namespace(ns, cfg.backlog)?));
    }
    let metrics = cfg
        .metrics_listen
        .map(|a| crate::metrics::bind("proxy.metrics_listen", a))
        .transpose()?;
    let cfg = Arc::new(cfg);
    let workers = cfg.workers.get();
    let tokens = Arc::new(imdsv2::TokenAuthority::new()?);
    let limiter = cfg
        .rate_limit
        .map(|r| Arc::new(ratelimit::RateLimiter::new(r)));
    let loop_cfg = cfg.clone();
    let agent = match &link {
        upstream::AgentLink::Socket => format!("agent socket {}", cfg.agent_socket.display()),
        upstream::AgentLink::InProcess(s) if s.api_in_process() => {
            "agent and metadata API in-process on each loop".to_string()
        }
        upstream::AgentLink::InProcess(_) => "agent in-process on each loop".to_string(),
    };
    let (controls, threads) = serve::run_loops(workers, "proxy", move |i, rx| {
        let cfg = loop_cfg.clone();
        let (tokens, limiter, link) = (tokens.clone(), limiter.clone(), link.clone());
        async move { run_loop(i, cfg, rx, tokens, limiter, link).await }
    })?;
    let control = Arc::new(control::ControlPlane::new(cfg.clone(), controls));
    let exporter = match metrics {
        Some(l) => {
            let c = control.clone();
            let e = crate::metrics::serve(l, "proxy-metrics", move || c.metrics_text())?;
            log::info(format_args!("proxy metrics on http://{}/metrics", e.addr()));
            Some(e)
        }
        None => None,
    };
    if let Some(depth) = cfg.ignored_pipeline_depth {
        log::warn(format_args!(
            "proxy.upstream_pipeline_depth = {depth} is ignored: the agent pool now dials up to \
             upstream_pool_size connections before it pipelines (remove the key)"
        ));
    }
    let budget = admit::fd_budget().max();
    if cfg.max_connections.get() > budget {
        log::info(format_args!(
            "proxy.max_connections = {} per namespace is above the process's fd budget of \
             {budget}: accept pauses at the budget first (raise LimitNOFILE to lift it)",
            cfg.max_connections
        ));
    }
    log::info(format_args!(
        "proxy starting: {} namespace(s), {workers} loop(s), {agent}, pool {} per loop, imdsv2 {:?}, rate limit {}, max_connections {} per namespace",
        initial.len(),
        cfg.pool_size,
        cfg.imdsv2,
        if cfg.rate_limit.is_some() { "on" } else { "off" },
        cfg.max_connections,
    ));
    let mut bound = Vec::with_capacity(initial.len());
    for (ns, sockets) in initial {
        bound.push(sockets.iter().filter_map(|s| s.local_addr().ok()).collect());
        control.install(ns, sockets, control::Origin::Static);
    }
    Ok(ProxyHandle {
        control,
        threads,
        exporter,
        bound,
    })
}

struct LoopNs {
    ns: Rc<NsRuntime>,
    accepts: Vec<rt::Task<()>>,
}

async fn run_loop(
    index: usize,
    cfg: Arc<ProxyConfig>,
    mut control: UnboundedReceiver<Control>,
    tokens: Arc<imdsv2::TokenAuthority>,
    limiter: Option<Arc<ratelimit::RateLimiter>>,
    link: upstream::AgentLink,
) -> io::Result<()> {
    use futures_util::StreamExt;
    let server = Server::new(serve::settings!(cfg));
    let upstream = match link {
        upstream::AgentLink::Socket => {
            upstream::Upstream::Socket(upstream::Pool::new(upstream::PoolConfig {
                socket: cfg.agent_socket.clone(),
                size: cfg.pool_size.get(),
                connect_timeout: cfg.timeouts.connect,
                server_timeout: cfg.timeouts.server,
                limits: cfg.limits,
                max_response_bytes: cfg.max_response_bytes,
            }))
        }
        // Built here, on the loop's own thread: the state is per-loop.
        upstream::AgentLink::InProcess(stage) => {
            upstream::Upstream::InProcess(stage.on_this_loop(index, server.clone())?)
        }
    };
    let ctx = Rc::new(ProxyLoop {
        cfg: cfg.clone(),
        upstream,
        server,
        tokens,
        limiter,
    });
    if index == 0 {
        log::info(format_args!("proxy loops use {:?}", rt::engine()));
    }
    let mut served: std::collections::HashMap<u64, LoopNs> = std::collections::HashMap::new();
    while let Some(msg) = control.next().await {
        match msg {
            Control::Add(l) => {
                let ns = Rc::new(NsRuntime {
                    id: l.id,
                    cfg: l.cfg.clone(),
                    counters: l.counters.get(index).cloned().unwrap_or_default(),
                    closing: Event::default(),
                });
                let admission = Admission::for_guests(l.gate.clone());
                let mut accepts = Vec::with_capacity(l.sockets.len());
                for s in &l.sockets {
                    match s.try_clone().and_then(TcpAcceptor::from_std) {
                        Ok(a) => accepts.push(rt::spawn_handle(accept_loop(
                            &ctx,
                            &ns,
                            a,
                            admission.clone(),
                        ))),
                        Err(e) => log::error(format_args!(
                            "loop {index}: cannot adopt a listener of {}: {e}",
                            l.cfg.name
                        )),
                    }
                }
                served.insert(l.id, LoopNs { ns, accepts });
            }
            Control::Remove(id) => {
                if let Some(gone) = served.remove(&id) {
                    drop(gone.accepts); // cancels the accepts; the dup'd fds close
                    gone.ns.closing.set();
                }
            }
            Control::Stop => break,
        }
    }
    for (_, l) in served.drain() {
        drop(l.accepts);
        l.ns.closing.set();
    }
    let label = format!("proxy loop {index}");
    ctx.server.drain(&label, cfg.drain_timeout).await;
    Ok(())
}

/// One listener's accept loop: every connection is a [`conn::ProxyConn`]
/// on the loop's [`Server`].
fn accept_loop(
    ctx: &Rc<ProxyLoop>,
    ns: &Rc<NsRuntime>,
    acceptor: TcpAcceptor,
    admission: Rc<Admission>,
) -> impl std::future::Future<Output = ()> {
    let (ctx, ns) = (ctx.clone(), ns.clone());
    ctx.server
        .clone()
        .accept(acceptor, admission, move |(conn, peer)| {
            let accepted = Instant::now();
            inc(&ns.counters.connections_accepted);
            let h = conn::ProxyConn {
                ctx: ctx.clone(),
                ns: ns.clone(),
                peer,
            };
            conn::serve(h, conn, accepted)
        })
}
