//! The metadata API's HTTP/1.1 server: [`MetadataApi`] on the `rt` loops.
//!
//! Like the namespace proxy, every listener is created once with our backlog
//! and shared by all loops, each loop runs its own accept on a `dup` of it,
//! and connections run on the connection engine ([`serve::engine`]: idle
//! wait holding no buffer, head, body, deadlines from `[api.timeouts]`,
//! canned rejections that linger, HEAD framing). This file supplies the
//! engine's [`Handler`]: a chunked body decoded, the request handed to the
//! pure [`MetadataApi::handle`], its answer rendered.
//!
//! The handler runs inline on the loop. It is microseconds, except a password
//! POST, which `fsync`s the password log before answering (that is what makes
//! a 200 durable); POSTs happen once per instance lifetime, so blocking the
//! loop for one fsync was preferred over a blocking-pool hop for every request.
//!
//! In `metaproxy up` the API also runs as a stage on the proxy's loops
//! ([`start_in_process`] → [`Stage`] → [`LoopStage`] per loop): the agent
//! stage hands it the signed request it would have written to `api.listen`
//! and the stage answers it with the same parse limits, handler, signature
//! check, access log, rendering and counters as a connection here (one
//! `render` for both), minus the loopback TCP hop (`agent::link`).
//!
//! Inventory reload: an [`inventory::Store`] (shared with the agent's
//! design) with its watcher thread; each loop reads through its own
//! [`inventory::store::Local`] copy, so a request takes no lock.
//! [`ApiHandle::reload_inventory`] reloads on demand (`main` calls it on
//! SIGHUP); a broken file keeps the old inventory and logs why (the error
//! names the line or key).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::DirBuilderExt;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use smallvec::SmallVec;

use crate::api::config::{ApiConfig, ApiSource};
use crate::api::metrics::{LoopMetrics, Registry};
use crate::api::nova;
use crate::api::{ApiRequest, ApiResponse, ApiSettings, MetadataApi, PasswordStore};
use crate::http::{self, HttpError, Method, RequestHead, WholeRequestError};
use crate::inventory::store::{self, Local, Watcher};
use crate::inventory::{self, InventoryError};
use crate::log;
use crate::rt::sync::{Event, UnboundedReceiver, UnboundedSender};
use crate::rt::{self, TcpAcceptor, TcpConn};
use crate::serve::admit::{self, Admission, Gate};
use crate::serve::{self, Answer, Handler, Refusal, Request, Server, Stop};

/// Where a loop's instances come from.
enum LoopSource {
    /// This loop's copy of the inventory.
    Inventory(Local),
    /// Nova's databases, through the database thread, and Neutron.
    Nova(nova::NovaClient, Box<nova::neutron::SecurityGroups>),
}

/// What each loop builds its [`LoopSource`] from.
#[derive(Clone)]
enum SourceFactory {
    Inventory(Arc<inventory::Store>),
    Nova(nova::NovaClient, Box<crate::api::config::NovaSettings>),
}

impl SourceFactory {
    /// On the loop's thread: the Neutron client is per loop.
    fn for_loop(&self) -> LoopSource {
        match self {
            SourceFactory::Inventory(store) => LoopSource::Inventory(store.local()),
            SourceFactory::Nova(client, n) => LoopSource::Nova(
                client.clone(),
                Box::new(nova::neutron::SecurityGroups::new(
                    &n.neutron,
                    n.metadata_cache_expiration,
                )),
            ),
        }
    }
}

/// Per-loop state shared by its connection tasks.
struct ApiLoop {
    cfg: Arc<ApiConfig>,
    api: Arc<MetadataApi>,
    source: LoopSource,
    /// The dynamic vendordata's Keystone client of this loop.
    vendordata: crate::api::vendordata::LoopVendordata,
    /// Set when the loop drains.
    stopping: Event,
    server: Rc<Server>,
    /// This loop's counters.
    m: Arc<LoopMetrics>,
}

/// A running API server: its loops, the shared handler and the watcher.
pub struct ApiHandle {
    /// Actual bound addresses, in `listen` order (port 0 resolved).
    pub bound: Vec<SocketAddr>,
    /// `None` with the Nova source.
    inventory: Option<Arc<inventory::Store>>,
    /// The database thread of the Nova source.
    nova: Option<nova::NovaSource>,
    controls: Vec<UnboundedSender<Stop>>,
    threads: Vec<std::thread::JoinHandle<io::Result<()>>>,
    watcher: Option<Watcher>,
    exporter: Option<crate::metrics::Exporter>,
    metrics: Registry,
}

impl std::fmt::Debug for ApiHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiHandle")
            .field("bound", &self.bound)
            .field("inventory_path", &self.inventory.as_ref().map(|i| i.path()))
            .finish_non_exhaustive()
    }
}

impl ApiHandle {
    /// Where the Prometheus endpoint (`api.metrics_listen`) listens, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.exporter.as_ref().map(crate::metrics::Exporter::addr)
    }

    /// The metrics in Prometheus text (what `api.metrics_listen` serves).
    pub fn metrics_text(&self) -> String {
        self.metrics.render()
    }

    /// Re-read the inventory file and swap it in; requests in flight finish on
    /// the old one. On error the old inventory stays and the error is logged.
    ///
    /// # Errors
    /// The file could not be read or is not a valid inventory (the error names
    /// the line or key).
    pub fn reload_inventory(&self) -> Result<(), InventoryError> {
        match &self.inventory {
            Some(i) => i.reload(),
            None => {
                log::info(format_args!(
                    "api: source = nova reads no inventory file: nothing to reload"
                ));
                Ok(())
            }
        }
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
            let _ = c.unbounded_send(Stop);
        }
        let r = serve::join_loops(self.threads.drain(..), "api");
        // After the loops: their clients are gone, the thread's queries too.
        if let Some(n) = self.nova.take() {
            n.stop();
        }
        r
    }
}

/// Load the inventory, open the password store, bind every listener and start
/// `cfg.workers` loops serving them.
///
/// # Errors
/// The inventory or the password store could not be loaded, an address could
/// not be bound (the daemon must refuse to start), or a thread could not start.
pub fn start(cfg: ApiConfig) -> io::Result<ApiHandle> {
    start_sharing(cfg, None)
}

/// [`start`], serving from `shared` when given (`metaproxy up`: the agent's
/// and the API's inventory are one [`inventory::Store`], loaded once and
/// watched by the caller; this server then starts no watcher of its own).
///
/// # Errors
/// As [`start`].
pub fn start_sharing(
    cfg: ApiConfig,
    shared: Option<Arc<inventory::Store>>,
) -> io::Result<ApiHandle> {
    start_with_stage(cfg, shared, None).map(|(handle, _)| handle)
}

/// [`start_sharing`], and the [`Stage`] that `loops` loops of another
/// daemon run the API on themselves (`metaproxy up`), naming `peer` as the
/// client in the access log. The API still listens on `api.listen` with
/// its own loops (other agents may use it); the stage's loops count into
/// the same metrics, after the API's own.
///
/// # Errors
/// As [`start`].
pub fn start_in_process(
    cfg: ApiConfig,
    shared: Option<Arc<inventory::Store>>,
    loops: usize,
    peer: IpAddr,
) -> io::Result<(ApiHandle, Stage)> {
    let (handle, stage) = start_with_stage(cfg, shared, Some((loops, peer)))?;
    let stage = stage.ok_or_else(|| io::Error::other("api: no in-process stage"))?;
    Ok((handle, stage))
}

fn start_with_stage(
    cfg: ApiConfig,
    shared: Option<Arc<inventory::Store>>,
    in_process: Option<(usize, IpAddr)>,
) -> io::Result<(ApiHandle, Option<Stage>)> {
    for w in cfg.warnings() {
        log::warn(format_args!("{w}"));
    }
    let owned = shared.is_none();
    let settings = ApiSettings {
        shared_secret: cfg.shared_secret.as_bytes().to_vec(),
        service_metadata_proxy: cfg.service_metadata_proxy,
        vendor_data: cfg.vendor_data.clone(),
        dhcp_domain_override: cfg.dhcp_domain.clone(),
        vendordata: cfg.vendordata.clone(),
    };
    let (inventory, nova, api, factory) = match &cfg.source {
        ApiSource::Inventory => {
            let inventory = match shared {
                Some(s) => s,
                None => Arc::new(load_store(&cfg.inventory)?),
            };
            let passwords = open_password_log(&cfg)?;
            let api = MetadataApi::new(settings, Arc::new(passwords));
            let factory = SourceFactory::Inventory(inventory.clone());
            (Some(inventory), None, api, factory)
        }
        ApiSource::Nova(n) => {
            let (source, report) = start_nova(n, &cfg)?;
            for (db, v) in &report.versions {
                log::info(format_args!("api: {db} is at Nova schema version {v}"));
            }
            for (db, count) in &report.instances {
                log::info(format_args!("api: {db}: {count} instance(s)"));
            }
            let factory = SourceFactory::Nova(source.client(), n.clone());
            let api = MetadataApi::without_password_log(settings);
            (None, Some(source), api, factory)
        }
    };
    let api = Arc::new(api);
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
    let from = match &cfg.source {
        ApiSource::Inventory => format!(
            "inventory {}, state {}",
            cfg.inventory.display(),
            cfg.state_dir.display()
        ),
        ApiSource::Nova(n) => format!(
            "nova {}{}",
            n.connection,
            n.api_connection
                .as_ref()
                .map(|a| format!(" + api {a}"))
                .unwrap_or_default()
        ),
    };
    log::info(format_args!(
        "api starting: {workers} loop(s), {from}, max_connections {} \
         (fd budget {})",
        cfg.max_connections,
        admit::fd_budget().max()
    ));
    let stage_loops = in_process.map_or(0, |(n, _)| n);
    let metrics = Registry::new(workers + stage_loops);
    let exporter = match cfg.metrics_listen {
        Some(addr) => {
            let r = metrics.clone();
            let l = crate::metrics::bind("api.metrics_listen", addr)?;
            let e = crate::metrics::serve(l, "api-metrics", move || r.render())?;
            log::info(format_args!("api metrics on http://{}/metrics", e.addr()));
            Some(e)
        }
        None => None,
    };
    let cfg = Arc::new(cfg);
    let stage = in_process.map(|(loops, peer)| Stage {
        cfg: cfg.clone(),
        api: api.clone(),
        source: factory.clone(),
        metrics: metrics.clone(),
        first_block: workers,
        loops,
        peer,
    });
    let sockets = Arc::new(sockets);
    let loop_metrics = metrics.clone();
    let (controls, threads) = serve::run_loops(workers, "api", move |i, rx| {
        let (cfg, api) = (cfg.clone(), api.clone());
        let (sockets, gate) = (sockets.clone(), gate.clone());
        let parts = LoopParts {
            cfg,
            api,
            source: factory.clone(),
            m: loop_metrics.block(i),
        };
        async move { run_loop(i, parts, &sockets, gate, rx).await }
    })?;
    let watcher = match inventory.as_ref().filter(|_| owned) {
        None => None,
        Some(inv) => match Watcher::start(inv.clone(), store::POLL_INTERVAL, "api-inventory-watch")
        {
            Ok(w) => Some(w),
            Err(e) => {
                log::warn(format_args!(
                    "cannot start the inventory watcher ({e}); reload with SIGHUP"
                ));
                None
            }
        },
    };
    let handle = ApiHandle {
        bound,
        inventory,
        nova,
        controls,
        threads,
        watcher,
        exporter,
        metrics,
    };
    Ok((handle, stage))
}

/// Load the inventory at start-up (a broken file refuses the start, naming it).
///
/// # Errors
/// The file cannot be read or is not a valid inventory.
pub fn load_store(path: &std::path::Path) -> io::Result<inventory::Store> {
    inventory::Store::load(path).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })
}

/// The password log of the inventory source, in a private `state_dir`.
fn open_password_log(cfg: &ApiConfig) -> io::Result<PasswordStore> {
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
    PasswordStore::open(&cfg.state_dir).map_err(io::Error::other)
}

/// Connect to Nova's databases and check their schema (refusing to start
/// on an untested version or a missing column).
///
/// # Errors
/// What [`nova::start`] found, as `InvalidData`.
pub fn start_nova(
    n: &crate::api::config::NovaSettings,
    cfg: &ApiConfig,
) -> io::Result<(nova::NovaSource, nova::StartReport)> {
    let domain = cfg
        .dhcp_domain
        .clone()
        .unwrap_or_else(|| DEFAULT_NOVA_DHCP_DOMAIN.to_owned());
    nova::start(n, domain).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Nova's `[api] dhcp_domain` default, used when `api.dhcp_domain` is unset.
pub const DEFAULT_NOVA_DHCP_DOMAIN: &str = "novalocal";

/// [`rt::listen_tcp_retrying`]: a quick restart after a crash waits out the
/// dead process's listener.
fn bind_with_retry(addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    rt::listen_tcp_retrying(addr, backlog)
        .map_err(|e| io::Error::new(e.kind(), format!("bind {addr}: {e}")))
}

/// What a loop starts from (made on the main thread, so all `Send`).
struct LoopParts {
    cfg: Arc<ApiConfig>,
    api: Arc<MetadataApi>,
    source: SourceFactory,
    m: Arc<LoopMetrics>,
}

async fn run_loop(
    index: usize,
    parts: LoopParts,
    sockets: &[std::net::TcpListener],
    gate: Arc<Gate>,
    mut control: UnboundedReceiver<Stop>,
) -> io::Result<()> {
    use futures_util::StreamExt;
    let LoopParts {
        cfg,
        api,
        source,
        m,
    } = parts;
    // On the loop's thread: the Neutron client is per loop.
    let source = source.for_loop();
    let ctx = Rc::new(ApiLoop {
        vendordata: crate::api::vendordata::LoopVendordata::new(&cfg.vendordata),
        cfg: cfg.clone(),
        api,
        source,
        stopping: Event::default(),
        server: Server::new(serve::settings!(cfg)),
        m,
    });
    if index == 0 {
        log::info(format_args!("api loops use {:?}", rt::engine()));
    }
    let admission = Admission::new(gate);
    let mut accept_tasks = Vec::with_capacity(sockets.len());
    for s in sockets {
        let acceptor = TcpAcceptor::from_std(s.try_clone()?)?;
        let c = ctx.clone();
        let accept = ctx
            .server
            .clone()
            .accept(acceptor, admission.clone(), move |(conn, peer)| {
                let accepted = Instant::now();
                let h = ApiConn {
                    ctx: c.clone(),
                    peer,
                };
                async move {
                    let end = serve::serve_conn(&h, &conn, accepted).await;
                    log::debug(format_args!("api: connection from {peer} ended: {end:?}"));
                }
            });
        accept_tasks.push(rt::spawn_handle(accept));
    }
    // Run until told to stop (or the control side is gone).
    let _ = control.next().await;
    drop(accept_tasks); // cancels the accepts: no new connections on this loop
    ctx.stopping.set();
    let label = format!("api loop {index}");
    ctx.server.drain(&label, cfg.drain_timeout).await;
    Ok(())
}

/// One API connection: the engine's [`Handler`].
struct ApiConn {
    ctx: Rc<ApiLoop>,
    peer: SocketAddr,
}

impl Handler for ApiConn {
    type Conn = TcpConn;
    const DECODE_CHUNKED: bool = true;
    /// Pipelined requests (the agent's pooled connections) are answered with
    /// one write per batch: the handler is microseconds.
    const BATCH_WRITES: bool = true;

    fn server(&self) -> &Server {
        &self.ctx.server
    }

    fn stop(&self) -> &Event {
        &self.ctx.stopping
    }

    fn refused(&self, _: &[u8], _: Option<&RequestHead>, why: Refusal, _: Instant) -> u16 {
        self.ctx.m.refused(why)
    }

    /// Run the handler and render its answer.
    async fn answer(&self, _conn: &TcpConn, req: &Request<'_>, out: &mut Vec<u8>) -> Answer {
        let keep = req.head.keep_alive && !self.ctx.stopping.is_set();
        let peer = rt::peer_ip(self.peer);
        render(
            &self.ctx,
            req.buf,
            req.head,
            req.body,
            peer,
            req.started,
            keep,
            out,
        )
        .await;
        Answer::Write { keep }
    }
}

/// The API's answer to one request read whole (`buf`: where `head`'s spans
/// point; `body`: its payload), from `peer`, for both ways in: a
/// connection of its own loops ([`ApiConn`]) and the in-process stage
/// ([`LoopStage::exchange`]). Handler, access log, rendering and counters
/// are this one path's; `keep`: the answer does not say `Connection: close`.
#[allow(clippy::too_many_arguments)] // the request's parts, as the engine hands them over
async fn render(
    ctx: &ApiLoop,
    buf: &[u8],
    head: &RequestHead,
    body: &[u8],
    peer: IpAddr,
    request_started: Instant,
    keep: bool,
    out: &mut Vec<u8>,
) {
    // On the stack for up to 24 fields (cloud-init sends 5, the agent adds 5).
    let headers: SmallVec<[(&[u8], &[u8]); 24]> = head
        .headers
        .iter()
        .map(|h| (h.name.get(buf), h.value.get(buf)))
        .collect();
    let api_req = ApiRequest {
        method: head.method.as_str(),
        target: head.target.get(buf),
        headers: &headers,
        body,
        peer,
    };
    let started = Instant::now();
    let resp = match &ctx.source {
        LoopSource::Inventory(local) => {
            let inventory = local.get().0;
            ctx.api
                .handle_async(&inventory, &api_req, &ctx.vendordata)
                .await
        }
        LoopSource::Nova(client, groups) => {
            nova::answer(&ctx.api, client, groups, &ctx.vendordata, &api_req).await
        }
    };
    if ctx.cfg.access_log {
        access(&api_req, &resp, started);
    }
    write_response(&resp, head.method == Method::Head, keep, out);
    ctx.m.answered(resp.status, request_started.elapsed());
}

/// What another daemon's loop needs to run the API stage itself
/// (`metaproxy up`: the agent stage hands it the signed request it would
/// have written to `api.listen`, on the same thread, with no socket; see
/// [`LoopStage`]). Cheap to clone and `Send`: each loop builds its own
/// [`LoopStage`] from it on its own thread ([`Stage::on_this_loop`]).
#[derive(Clone)]
pub struct Stage {
    cfg: Arc<ApiConfig>,
    api: Arc<MetadataApi>,
    source: SourceFactory,
    metrics: Registry,
    /// The API's own loops come first in `metrics`; in-process loop `i`
    /// counts into block `first_block + i`.
    first_block: usize,
    loops: usize,
    /// The peer address the access log names (the agent's, as its TCP
    /// connection to `api.listen` would have shown it).
    peer: IpAddr,
}

impl std::fmt::Debug for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage")
            .field("loops", &self.loops)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Stage {
    /// In-process loop `index`'s API state: its `LoopSource` (its copy of
    /// the inventory, or its Neutron client), its vendordata client and its
    /// block of counters. Call it on that loop's thread: the state is
    /// per-loop and not `Send`.
    ///
    /// # Errors
    /// `index` is past the loops the stage was started for.
    pub fn on_this_loop(&self, index: usize) -> io::Result<Rc<LoopStage>> {
        if index >= self.loops {
            return Err(io::Error::other(format!(
                "api stage: loop {index} of {}",
                self.loops
            )));
        }
        let cfg = self.cfg.clone();
        Ok(Rc::new(LoopStage {
            ctx: ApiLoop {
                vendordata: crate::api::vendordata::LoopVendordata::new(&cfg.vendordata),
                source: self.source.for_loop(),
                api: self.api.clone(),
                stopping: Event::default(),
                server: Server::new(serve::settings!(cfg)),
                m: self.metrics.block(self.first_block + index),
                cfg,
            },
            peer: self.peer,
        }))
    }
}

/// The API stage on one loop of another daemon (`metaproxy up`): what a
/// connection of the API's own loops does with a request, minus the socket.
pub struct LoopStage {
    ctx: ApiLoop,
    peer: IpAddr,
}

impl LoopStage {
    /// Answer `req`, one whole request as it would have been written to
    /// `api.listen` (the agent's signed request), appending the API's
    /// answer to `out`, byte for byte what its connection would have
    /// written: the request is parsed with `[api.limits]` (a refusal is the
    /// canned page with `Connection: close`, counted as the engine counts
    /// it), then rendered by the path its connections run (handler with the
    /// signature check, access log, `write_response`, counters).
    pub async fn exchange(&self, req: &[u8], out: &mut Vec<u8>) {
        let started = Instant::now();
        let mut decoded = Vec::new();
        let (head, body) = match http::parse_whole_request(req, &self.ctx.cfg.limits, &mut decoded)
        {
            Ok(whole) => whole,
            Err(WholeRequestError::Head(e)) => return self.refuse(e, false, out),
            Err(WholeRequestError::Body(e, method)) => {
                return self.refuse(e, method == Method::Head, out)
            }
            // Shorter than it says: its connection would have timed out.
            Err(WholeRequestError::Incomplete(method)) => {
                return self.refuse_timeout(method == Method::Head, out)
            }
        };
        let keep = head.keep_alive && !self.ctx.stopping.is_set();
        render(&self.ctx, req, &head, body, self.peer, started, keep, out).await;
    }

    /// The engine's refusal of a malformed or oversized request.
    fn refuse(&self, e: HttpError, is_head: bool, out: &mut Vec<u8>) {
        let status = self.ctx.m.refused(Refusal::Http(e));
        out.extend_from_slice(http::canned_for(status, is_head));
    }

    /// The engine's refusal of a body that never came whole.
    fn refuse_timeout(&self, is_head: bool, out: &mut Vec<u8>) {
        let status = self.ctx.m.refused(Refusal::BodyTimeout);
        out.extend_from_slice(http::canned_for(status, is_head));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const DEMO: &str = "d0d0d0d0-0000-4000-8000-000000000001";

    /// The in-process stage (`metaproxy up`) is the API's connection minus
    /// the socket: it verifies every request's signature (a forged one is
    /// 403, never rendered), refuses what the engine refuses with its
    /// canned page, counts all of it, and answers a well-signed request
    /// with the bytes `api.listen` answers the same request with.
    #[test]
    fn the_in_process_stage_checks_signatures_and_answers_as_the_listener() {
        use std::io::{Read, Write};
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[api]\nlisten = \"127.0.0.1:0\"\nworkers = 1\nmetadata_proxy_shared_secret = \"s\"\n\
             inventory = \"{}/examples/inventory.toml\"\nstate_dir = \"{}\"\n",
            env!("CARGO_MANIFEST_DIR"),
            dir.path().display()
        );
        let file = crate::config::parse_str(&text, std::path::Path::new("t.toml")).unwrap();
        let cfg = ApiConfig::from_table(file.api.as_ref().unwrap()).unwrap();
        let peer = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
        let (handle, stage) = start_in_process(cfg, None, 1, peer).unwrap();
        let request = |sig: &str| {
            format!(
                "GET /2009-04-04/meta-data/hostname HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 127.0.0.1\r\n\
                 X-Instance-ID: {DEMO}\r\nX-Tenant-ID: d0d0d0d0000040008000000000000000\r\n\
                 X-Instance-ID-Signature: {sig}\r\n\r\n"
            )
        };
        let good = request(&crate::sign::sign_instance_id(b"s", DEMO));
        let forged = request(&crate::sign::sign_instance_id(b"not the secret", DEMO));
        let smuggling =
            "GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab";
        let answers = rt::block_on(async {
            let on_loop = stage.on_this_loop(0).unwrap();
            let mut answers = Vec::new();
            for req in [&good, &forged, smuggling] {
                let mut out = Vec::new();
                on_loop.exchange(req.as_bytes(), &mut out).await;
                answers.push(out);
            }
            answers
        })
        .unwrap();
        let text: Vec<String> = answers
            .iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        assert!(text[0].starts_with("HTTP/1.1 200 "), "{}", text[0]);
        assert!(text[0].ends_with("\r\n\r\ndemo.novalocal"), "{}", text[0]);
        assert!(text[1].starts_with("HTTP/1.1 403 "), "{}", text[1]);
        assert!(!text[1].contains("demo.novalocal"));
        assert_eq!(answers[2], http::canned_for(400, false));
        let m = handle.metrics_text();
        for counted in [
            "metaproxy_api_requests_total 2",
            "metaproxy_api_rx_smuggling_total 1",
        ] {
            assert!(m.lines().any(|l| l == counted), "{counted}:\n{m}");
        }

        // The same signed request to `api.listen`: the same bytes back.
        let mut conn = std::net::TcpStream::connect(handle.bound[0]).unwrap();
        conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        conn.write_all(good.as_bytes()).unwrap();
        let mut direct = vec![0; answers[0].len()];
        conn.read_exact(&mut direct).unwrap();
        assert_eq!(direct, answers[0]);
        handle.stop().unwrap();
    }

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
