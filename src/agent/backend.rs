//! The Neutron backend: a per-loop resolver over Neutron's REST API.
//!
//! Per request: router → networks (cached with the positive TTL,
//! single-flighted), then (network set, IP or MAC) through four layers, each
//! of which exists so that a boot storm of N guests costs O(1) Neutron calls:
//!
//! 1. the loop's [`TtlCache`] (positive 10 s, negative 1 s by default);
//! 2. **prefetch**: the first miss on a network set fetches every port of the
//!    set in one query (bounded by `prefetch_max_ports`) and fills the cache;
//!    misses that arrive meanwhile wait for it instead of asking themselves;
//! 3. **single flight + batching** ([`Batcher`]): what still misses joins the
//!    set's queue; the first key opens a `batch_window` timer, `batch_max`
//!    keys flush at once; one query per kind (IPs, MACs) per flush, split
//!    further only if the request line would exceed gunicorn's default;
//! 4. the Neutron call itself ([`NeutronClient`]): a pooled keep-alive
//!    HTTP/1.1 client ([`forward::Pool`], which re-sends once when a pooled
//!    connection turns out to be dead, as gunicorn closes idle ones after
//!    ~2 s) with a Keystone v3 token cached until shortly before it expires
//!    and fetched again once on a 401.
//!
//! Everything here is per loop (habit 7), so the cache, the flights and the
//! batches are per loop too: a storm spread over W loops costs O(W) calls.
//! Rejected: one shared cache behind a lock (a lock on every hit to save a
//! few calls per storm), and one Neutron task for all loops (a cross-core
//! hop on every miss).
//!
//! Work that several requests wait for (a prefetch, a router lookup, a batch)
//! runs in its own spawned task and answers over oneshots, so a guest that
//! hangs up mid-lookup cancels only its own wait, never the shared flight.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::agent::batch::{Batcher, JoinOutcome, Waiter};
use crate::agent::cache::{Lookup, SystemClock, TtlCache};
use crate::agent::config::{Endpoint, KeystoneMethod, NeutronAuth, NeutronConfig};
use crate::agent::forward::{self, ForwardError};
use crate::agent::identity::{LookupKey, Scope};
use crate::agent::metrics::{inc, Call, LoopMetrics};
use crate::agent::neutron::{self, PortInfo};
use crate::agent::resolve::{BadId, RejectedPorts, Resolved};
use crate::log;
use crate::rt::{self, sync::oneshot};

/// Refresh a token this long before Keystone says it expires (at most half
/// its lifetime), so that a request never starts with a token about to die.
pub const TOKEN_MARGIN: Duration = Duration::from_secs(60);
/// Network sets remembered as prefetched before stale ones are swept.
const MAX_PREFETCH_SETS: usize = 10_000;
/// Lifetime assumed for a token whose `expires_at` we cannot read.
const TOKEN_FALLBACK_LIFETIME: Duration = Duration::from_secs(600);

/// Why the backend could not answer (the guest gets 503).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// Connect failed, the peer closed, or it sent garbage.
    #[error("{0} unreachable: {1}")]
    Unreachable(&'static str, String),
    /// No answer within the timeout.
    #[error("{0} did not answer within the timeout")]
    Timeout(&'static str),
    /// An unexpected status.
    #[error("{0} answered {1}: {2}")]
    Status(&'static str, u16, String),
    /// A 200 whose body we cannot use.
    #[error("{0} sent an unusable answer: {1}")]
    Garbage(&'static str, String),
    /// The lookup was abandoned (the loop is stopping).
    #[error("lookup cancelled")]
    Cancelled,
}

fn from_forward(what: &'static str, e: ForwardError) -> BackendError {
    match e {
        ForwardError::Timeout => BackendError::Timeout(what),
        ForwardError::Unreachable(m) | ForwardError::Broken(m) => {
            BackendError::Unreachable(what, m)
        }
    }
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SS[.frac][Z|+00:00]`
/// (Keystone's `expires_at`, always UTC).
fn parse_utc(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (hh, mm, ss) = (n(11..13)?, n(14..16)?, n(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

/// When to stop using a token that Keystone says expires at `expires_at`.
fn refresh_deadline(expires_at: Option<&str>, now: Instant) -> Instant {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let lifetime = expires_at
        .and_then(parse_utc)
        .map_or(TOKEN_FALLBACK_LIFETIME, |e| {
            Duration::from_secs(e.saturating_sub(wall))
        });
    now + lifetime - TOKEN_MARGIN.min(lifetime / 2)
}

fn keystone_body(method: &KeystoneMethod) -> String {
    let v = match method {
        KeystoneMethod::Password {
            username,
            password,
            user_domain_name,
            project_name,
            project_domain_name,
        } => serde_json::json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": username, "domain": {"name": user_domain_name}, "password": password}}},
            "scope": {"project": {"name": project_name, "domain": {"name": project_domain_name}}}
        }}),
        KeystoneMethod::ApplicationCredential { id, secret } => serde_json::json!({"auth": {
            "identity": {"methods": ["application_credential"],
                "application_credential": {"id": id, "secret": secret}}
        }}),
    };
    v.to_string()
}

#[derive(serde::Deserialize)]
struct TokenBody {
    token: TokenInner,
}

#[derive(serde::Deserialize)]
struct TokenInner {
    #[serde(default)]
    expires_at: Option<String>,
}

struct Token {
    value: Rc<str>,
    refresh_at: Instant,
}

/// One loop's client to Neutron (and Keystone).
pub struct NeutronClient {
    endpoint: Endpoint,
    auth: NeutronAuth,
    neutron: forward::Pool,
    keystone: Option<forward::Pool>,
    token: RefCell<Option<Token>>,
    /// Serializes token fetches: concurrent callers wait for one POST.
    token_lock: futures_util::lock::Mutex<()>,
    /// Token fetches finished, and how the last one failed: callers that
    /// queued behind a failed fetch share its error instead of each trying
    /// again in turn (N waiters × the timeout while Keystone is down).
    fetches: Cell<u64>,
    last_error: RefCell<Option<BackendError>>,
    metrics: Arc<LoopMetrics>,
}

impl NeutronClient {
    /// A client for `cfg`; connections open on demand.
    pub fn new(cfg: &NeutronConfig, metrics: Arc<LoopMetrics>) -> NeutronClient {
        let tls = |e: &Endpoint| {
            e.tls_name
                .clone()
                .and_then(|name| Some((cfg.tls.as_ref()?.0.clone(), name)))
        };
        let keystone = match &cfg.auth {
            NeutronAuth::NoAuth => None,
            NeutronAuth::Keystone { endpoint, .. } => Some(
                forward::Pool::named("Keystone", endpoint.addr, 1, cfg.timeout)
                    .with_tls(tls(endpoint)),
            ),
        };
        NeutronClient {
            endpoint: cfg.endpoint.clone(),
            auth: cfg.auth.clone(),
            neutron: forward::Pool::named(
                "Neutron",
                cfg.endpoint.addr,
                crate::agent::config::NEUTRON_POOL_SIZE,
                cfg.timeout,
            )
            .with_tls(tls(&cfg.endpoint)),
            keystone,
            token: RefCell::new(None),
            token_lock: futures_util::lock::Mutex::new(()),
            fetches: Cell::new(0),
            last_error: RefCell::new(None),
            metrics,
        }
    }

    fn cached_token(&self) -> Option<Rc<str>> {
        self.token
            .borrow()
            .as_ref()
            .filter(|t| Instant::now() < t.refresh_at)
            .map(|t| t.value.clone())
    }

    /// A valid token (`None` under noauth), fetched if needed.
    async fn token(&self) -> Result<Option<Rc<str>>, BackendError> {
        let NeutronAuth::Keystone { endpoint, method } = &self.auth else {
            return Ok(None);
        };
        if let Some(t) = self.cached_token() {
            return Ok(Some(t));
        }
        let seen = self.fetches.get();
        let _guard = self.token_lock.lock().await;
        if let Some(t) = self.cached_token() {
            return Ok(Some(t)); // fetched while we waited
        }
        if self.fetches.get() != seen {
            if let Some(e) = self.last_error.borrow().clone() {
                return Err(e); // failed while we waited
            }
        }
        let r = self.fetch_token(endpoint, method).await;
        self.fetches.set(self.fetches.get() + 1);
        *self.last_error.borrow_mut() = r.as_ref().err().cloned();
        r.map(Some)
    }

    async fn fetch_token(
        &self,
        endpoint: &Endpoint,
        method: &KeystoneMethod,
    ) -> Result<Rc<str>, BackendError> {
        let Some(pool) = &self.keystone else {
            return Err(BackendError::Cancelled);
        };
        self.metrics.call(Call::Token);
        let body = keystone_body(method);
        let req = format!(
            "POST {}/auth/tokens HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nAccept: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            endpoint.prefix,
            endpoint.host_header,
            body.len()
        );
        let resp = pool.request(req.as_bytes(), false).await.map_err(|e| {
            inc(&self.metrics.backend_errors);
            from_forward("Keystone", e)
        })?;
        if resp.head.status != 201 && resp.head.status != 200 {
            inc(&self.metrics.backend_errors);
            let payload = resp.payload();
            return Err(BackendError::Status(
                "Keystone",
                resp.head.status,
                String::from_utf8_lossy(&payload[..payload.len().min(200)]).into_owned(),
            ));
        }
        let Some(value) = resp
            .head
            .header(&resp.bytes, "X-Subject-Token")
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(Rc::<str>::from)
        else {
            inc(&self.metrics.backend_errors);
            return Err(BackendError::Garbage(
                "Keystone",
                "no X-Subject-Token header".into(),
            ));
        };
        let expires = serde_json::from_slice::<TokenBody>(&resp.payload())
            .ok()
            .and_then(|b| b.token.expires_at);
        let refresh_at = refresh_deadline(expires.as_deref(), Instant::now());
        log::info(format_args!(
            "got a Keystone token (valid until {})",
            expires.as_deref().unwrap_or("unknown")
        ));
        *self.token.borrow_mut() = Some(Token {
            value: value.clone(),
            refresh_at,
        });
        Ok(value)
    }

    /// Forget `bad` (Neutron rejected it), unless a newer token replaced it already.
    fn drop_token(&self, bad: &Rc<str>) {
        let mut t = self.token.borrow_mut();
        if t.as_ref().is_some_and(|t| Rc::ptr_eq(&t.value, bad)) {
            *t = None;
        }
    }

    /// `GET path` on Neutron; the body of a 200.
    ///
    /// # Errors
    /// See [`BackendError`]; a 401 is retried once with a fresh token.
    pub async fn get(&self, path: &str, call: Call) -> Result<Vec<u8>, BackendError> {
        self.metrics.call(call);
        let mut refreshed = false;
        loop {
            let token = self.token().await?;
            let mut req = format!(
                "GET {}{path} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\n",
                self.endpoint.prefix, self.endpoint.host_header
            );
            if let Some(t) = &token {
                req.push_str("X-Auth-Token: ");
                req.push_str(t);
                req.push_str("\r\n");
            }
            req.push_str("\r\n");
            let resp = self
                .neutron
                .request(req.as_bytes(), false)
                .await
                .map_err(|e| {
                    inc(&self.metrics.backend_errors);
                    from_forward("Neutron", e)
                })?;
            match (resp.head.status, &token) {
                (200, _) => return Ok(resp.payload()),
                (401, Some(t)) if !refreshed => {
                    log::info(format_args!(
                        "Neutron rejected the token (401); getting a new one"
                    ));
                    refreshed = true;
                    self.drop_token(t);
                }
                (status, _) => {
                    inc(&self.metrics.backend_errors);
                    let payload = resp.payload();
                    let msg = neutron::parse_neutron_error(&payload).unwrap_or_else(|| {
                        String::from_utf8_lossy(&payload[..payload.len().min(200)]).into_owned()
                    });
                    return Err(BackendError::Status("Neutron", status, msg));
                }
            }
        }
    }
}

/// A set of network ids, sorted: the scope of one port query.
pub type NetSet = Rc<[String]>;
type PortKey = (NetSet, LookupKey);
type Answer = Result<Option<Rc<Resolved>>, BackendError>;
type RouterWaiter = oneshot::Sender<Result<NetSet, BackendError>>;

enum Prefetch {
    /// Running; these wait for it.
    Running(Vec<oneshot::Sender<Result<(), BackendError>>>),
    /// Finished (filled the cache, or found the set too big) at this instant.
    Done(Instant),
}

/// One loop's resolver over Neutron.
pub struct NeutronResolver {
    client: NeutronClient,
    batch_window: Duration,
    prefetch_network: bool,
    prefetch_max_ports: usize,
    /// How long a prefetch stands for the set (the positive TTL).
    prefetch_ttl: Duration,
    routers: RefCell<TtlCache<String, NetSet>>,
    router_flights: RefCell<HashMap<String, Vec<RouterWaiter>>>,
    ports: RefCell<TtlCache<PortKey, Rc<Resolved>>>,
    batcher: RefCell<Batcher<NetSet, LookupKey>>,
    tickets: RefCell<HashMap<Waiter, oneshot::Sender<Answer>>>,
    next_ticket: Cell<Waiter>,
    prefetches: RefCell<HashMap<NetSet, Prefetch>>,
    /// Ports whose ids were refused, logged once each.
    rejected: RejectedPorts,
    metrics: Arc<LoopMetrics>,
}

/// The backend boundary: what Neutron said about `p`, parsed into a
/// [`Resolved`], or `None` (reported to `rejected`) when its `device_id` or
/// `project_id` is not an OpenStack id. Everything Neutron returns is
/// untrusted: a tenant sets its own port's `device_id`.
pub fn resolved_from_port(p: &PortInfo, rejected: &RejectedPorts) -> Option<Rc<Resolved>> {
    match Resolved::new(&p.device_id, &p.project_id) {
        Ok(r) => Some(Rc::new(r)),
        Err(which) => {
            let value = match which {
                BadId::Instance => &p.device_id,
                BadId::Project => &p.project_id,
            };
            rejected.report(&p.id, which, value);
            None
        }
    }
}

impl NeutronResolver {
    /// A resolver with empty caches.
    pub fn new(
        cfg: &NeutronConfig,
        cache_ttl: Duration,
        negative_ttl: Duration,
        capacity: usize,
        metrics: Arc<LoopMetrics>,
    ) -> Rc<NeutronResolver> {
        Rc::new(NeutronResolver {
            client: NeutronClient::new(cfg, metrics.clone()),
            batch_window: cfg.batch_window,
            prefetch_network: cfg.prefetch_network,
            prefetch_max_ports: cfg.prefetch_max_ports,
            prefetch_ttl: cache_ttl,
            routers: RefCell::new(TtlCache::new(
                capacity,
                cache_ttl,
                negative_ttl,
                SystemClock,
            )),
            router_flights: RefCell::new(HashMap::new()),
            ports: RefCell::new(TtlCache::new(
                capacity,
                cache_ttl,
                negative_ttl,
                SystemClock,
            )),
            batcher: RefCell::new(Batcher::new(cfg.batch_max.get())),
            tickets: RefCell::new(HashMap::new()),
            next_ticket: Cell::new(0),
            prefetches: RefCell::new(HashMap::new()),
            rejected: RejectedPorts::default(),
            metrics,
        })
    }

    /// Resolve a guest. `fresh` skips (and drops) the cached answer. The bool
    /// says whether the answer came from the cache.
    ///
    /// # Errors
    /// Neutron (or Keystone) failed; nothing is cached then.
    pub async fn lookup(
        self: &Rc<Self>,
        scope: &Scope,
        key: &LookupKey,
        fresh: bool,
    ) -> Result<(Option<Rc<Resolved>>, bool), BackendError> {
        let nets: NetSet = match scope {
            Scope::Network(n) => Rc::from(vec![n.clone()]),
            Scope::Router(r) => self.router_networks(r).await?,
        };
        if nets.is_empty() {
            return Ok((None, false));
        }
        let k = (nets.clone(), key.clone());
        if fresh {
            self.ports.borrow_mut().invalidate(&k);
        } else {
            match self.cached(&k) {
                Some(r) => return Ok((r, true)),
                None => inc(&self.metrics.cache_misses),
            }
            if self.prefetch_network {
                self.prefetch(&nets).await?;
                if let Some(r) = self.cached(&k) {
                    return Ok((r, false));
                }
            }
        }
        Ok((self.batched(nets, key.clone()).await?, false))
    }

    /// `Some(answer)` on a live cache entry (counted), `None` on a miss.
    fn cached(&self, k: &PortKey) -> Option<Option<Rc<Resolved>>> {
        match self.ports.borrow_mut().get(k) {
            Lookup::Hit(r) => {
                inc(&self.metrics.cache_hits);
                Some(Some(r))
            }
            Lookup::NegativeHit => {
                inc(&self.metrics.cache_negative_hits);
                Some(None)
            }
            Lookup::Miss => None,
        }
    }

    /// The router's networks, sorted; cached, single-flighted.
    async fn router_networks(self: &Rc<Self>, router: &str) -> Result<NetSet, BackendError> {
        match self.routers.borrow_mut().get(&router.to_string()) {
            Lookup::Hit(n) => return Ok(n),
            Lookup::NegativeHit => return Ok(Rc::from(Vec::new())),
            Lookup::Miss => {}
        }
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut f = self.router_flights.borrow_mut();
            match f.get_mut(router) {
                Some(waiters) => {
                    waiters.push(tx);
                    false
                }
                None => {
                    f.insert(router.to_string(), vec![tx]);
                    true
                }
            }
        };
        if start {
            let me = self.clone();
            let router = router.to_string();
            rt::spawn(async move {
                let r = me
                    .client
                    .get(
                        &neutron::router_networks_path(&router),
                        Call::RouterNetworks,
                    )
                    .await
                    .and_then(|body| {
                        neutron::parse_router_networks(&body)
                            .map_err(|e| BackendError::Garbage("Neutron", e.to_string()))
                    })
                    .map(NetSet::from);
                if let Ok(nets) = &r {
                    let mut c = me.routers.borrow_mut();
                    if nets.is_empty() {
                        c.insert_negative(router.clone());
                    } else {
                        c.insert(router.clone(), nets.clone());
                    }
                }
                let waiters = me.router_flights.borrow_mut().remove(&router);
                for w in waiters.unwrap_or_default() {
                    let _ = w.send(r.clone());
                }
            });
        }
        rx.await.unwrap_or(Err(BackendError::Cancelled))
    }

    /// Make sure `nets` was prefetched within the TTL (waiting for a running
    /// prefetch). An error is the prefetch's: the caller answers 503 rather
    /// than piling a second call onto a failing Neutron.
    async fn prefetch(self: &Rc<Self>, nets: &NetSet) -> Result<(), BackendError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.prefetches.borrow_mut();
            match p.get_mut(nets) {
                Some(Prefetch::Done(at)) if at.elapsed() < self.prefetch_ttl => return Ok(()),
                Some(Prefetch::Running(waiters)) => {
                    waiters.push(tx);
                }
                _ => {
                    if p.len() >= MAX_PREFETCH_SETS {
                        let ttl = self.prefetch_ttl;
                        p.retain(|_, s| match s {
                            Prefetch::Running(_) => true,
                            Prefetch::Done(at) => at.elapsed() < ttl,
                        });
                    }
                    p.insert(nets.clone(), Prefetch::Running(vec![tx]));
                    let me = self.clone();
                    let nets = nets.clone();
                    rt::spawn(async move {
                        let r = me.run_prefetch(&nets).await;
                        let prev = if r.is_ok() {
                            me.prefetches
                                .borrow_mut()
                                .insert(nets, Prefetch::Done(Instant::now()))
                        } else {
                            me.prefetches.borrow_mut().remove(&nets)
                        };
                        if let Some(Prefetch::Running(waiters)) = prev {
                            for w in waiters {
                                let _ = w.send(r.clone());
                            }
                        }
                    });
                }
            }
        }
        rx.await.unwrap_or(Err(BackendError::Cancelled))
    }

    async fn run_prefetch(&self, nets: &NetSet) -> Result<(), BackendError> {
        let refs: Vec<&str> = nets.iter().map(String::as_str).collect();
        let Some(path) = neutron::networks_ports_path(&refs, self.prefetch_max_ports + 1) else {
            return Ok(());
        };
        let body = self.client.get(&path, Call::Prefetch).await?;
        let ports = neutron::parse_ports(&body)
            .map_err(|e| BackendError::Garbage("Neutron", e.to_string()))?;
        if ports.len() > self.prefetch_max_ports {
            log::info(format_args!(
                "networks {refs:?} have more than {} ports: not prefetched, looked up per key",
                self.prefetch_max_ports
            ));
            return Ok(());
        }
        // Count every port per key (all owners, as `match_key` does), then
        // cache the keys of instance ports: unique → positive, shared → negative.
        let mut by_key: HashMap<LookupKey, (usize, &PortInfo)> = HashMap::new();
        for p in ports
            .iter()
            .filter(|p| refs.contains(&p.network_id.as_str()))
        {
            let mac = p.mac().map(LookupKey::Mac);
            for k in p.fixed_ips.iter().map(|ip| LookupKey::Ip(*ip)).chain(mac) {
                by_key.entry(k).or_insert((0, p)).0 += 1;
            }
        }
        let mut cache = self.ports.borrow_mut();
        for (k, (n, p)) in by_key {
            if !neutron::is_compute_owner(&p.device_owner) {
                continue;
            }
            let key = (nets.clone(), k);
            // A refused port is "no instance": cached as a miss, never a hit.
            let r = if n == 1 {
                resolved_from_port(p, &self.rejected)
            } else {
                None
            };
            match r {
                Some(r) => cache.insert(key, r),
                None => cache.insert_negative(key),
            }
        }
        Ok(())
    }

    /// Look `key` up through the batcher.
    async fn batched(self: &Rc<Self>, nets: NetSet, key: LookupKey) -> Answer {
        let ticket = self.next_ticket.get();
        self.next_ticket.set(ticket + 1);
        let (tx, rx) = oneshot::channel();
        self.tickets.borrow_mut().insert(ticket, tx);
        let outcome = self.batcher.borrow_mut().join(nets.clone(), key, ticket);
        match outcome {
            JoinOutcome::Joined => {}
            JoinOutcome::Queued { batch_full: true } => self.flush(&nets),
            JoinOutcome::Queued { batch_full: false } => {
                if self.batcher.borrow().queued(&nets) == 1 {
                    let me = self.clone();
                    let window = self.batch_window;
                    rt::spawn(async move {
                        rt::sleep(window).await;
                        me.flush(&nets);
                    });
                }
            }
        }
        self.gauge();
        rx.await.unwrap_or(Err(BackendError::Cancelled))
    }

    fn gauge(&self) {
        let n = self.tickets.borrow().len();
        self.metrics.lookups_in_flight.store(
            u64::try_from(n).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Send everything queued for `nets`, one task per batch.
    fn flush(self: &Rc<Self>, nets: &NetSet) {
        loop {
            let keys = self.batcher.borrow_mut().take_batch(nets);
            if keys.is_empty() {
                return;
            }
            let me = self.clone();
            let nets = nets.clone();
            rt::spawn(async move {
                let (ips, macs): (Vec<LookupKey>, Vec<LookupKey>) = keys
                    .into_iter()
                    .partition(|k| matches!(k, LookupKey::Ip(_)));
                for chunk in chunks(&nets, ips).into_iter().chain(chunks(&nets, macs)) {
                    me.run_batch(&nets, chunk).await;
                }
            });
        }
    }

    async fn run_batch(&self, nets: &NetSet, (keys, path): (Vec<LookupKey>, String)) {
        self.metrics.batch(keys.len());
        let refs: Vec<&str> = nets.iter().map(String::as_str).collect();
        let ports = self.client.get(&path, Call::Ports).await.and_then(|body| {
            neutron::parse_ports(&body).map_err(|e| BackendError::Garbage("Neutron", e.to_string()))
        });
        for key in keys {
            let answer: Answer = match &ports {
                Err(e) => Err(e.clone()),
                Ok(ports) => {
                    let k = (nets.clone(), key.clone());
                    Ok(match neutron::match_key(ports, &refs, &key) {
                        neutron::PortMatch::Found(p) => {
                            match resolved_from_port(p, &self.rejected) {
                                Some(r) => {
                                    self.ports.borrow_mut().insert(k, r.clone());
                                    Some(r)
                                }
                                // Not an instance: cached as a miss, never a hit.
                                None => {
                                    self.ports.borrow_mut().insert_negative(k);
                                    None
                                }
                            }
                        }
                        neutron::PortMatch::NotFound => {
                            log::debug(format_args!("no port for {key:?} on {refs:?}"));
                            self.ports.borrow_mut().insert_negative(k);
                            None
                        }
                        neutron::PortMatch::Ambiguous(n) => {
                            log::warn(format_args!(
                                "{n} ports match {key:?} on networks {refs:?}; answering 404"
                            ));
                            self.ports.borrow_mut().insert_negative(k);
                            None
                        }
                    })
                }
            };
            let waiters = self.batcher.borrow_mut().complete(nets, &key);
            for w in waiters {
                if let Some(tx) = self.tickets.borrow_mut().remove(&w) {
                    let _ = tx.send(answer.clone());
                }
            }
        }
        self.gauge();
    }
}

/// Queries for `keys` (all IPs or all MACs) on `nets`, each short enough for
/// a stock gunicorn request line: halved until they fit.
fn chunks(nets: &NetSet, keys: Vec<LookupKey>) -> Vec<(Vec<LookupKey>, String)> {
    if keys.is_empty() {
        return Vec::new();
    }
    let refs: Vec<&str> = nets.iter().map(String::as_str).collect();
    let ips: Vec<_> = keys
        .iter()
        .filter_map(|k| match k {
            LookupKey::Ip(ip) => Some(*ip),
            LookupKey::Mac(_) => None,
        })
        .collect();
    let macs: Vec<_> = keys
        .iter()
        .filter_map(|k| match k {
            LookupKey::Mac(m) => Some(*m),
            LookupKey::Ip(_) => None,
        })
        .collect();
    let path = if ips.is_empty() {
        neutron::ports_by_macs_path(&refs, &macs)
    } else {
        neutron::ports_by_ips_path(&refs, &ips)
    };
    let Some(path) = path else {
        return Vec::new();
    };
    if neutron::query_fits(&path) || keys.len() == 1 {
        return vec![(keys, path)];
    }
    let mut keys = keys;
    let rest = keys.split_off(keys.len() / 2);
    let mut out = chunks(nets, keys);
    out.extend(chunks(nets, rest));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keystone_expiry_parses() {
        assert_eq!(parse_utc("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_utc("2026-11-24T12:00:00.000000Z"),
            Some(1_795_521_600)
        );
        assert_eq!(parse_utc("2000-03-01T00:00:01+00:00"), Some(951_868_801));
        assert_eq!(parse_utc("garbage"), None);
        let now = Instant::now();
        let at = refresh_deadline(Some("1970-01-01T00:00:00Z"), now);
        assert_eq!(at, now, "an expired token is refreshed at once");
        let at = refresh_deadline(None, now);
        assert_eq!(at, now + TOKEN_FALLBACK_LIFETIME - TOKEN_MARGIN);
    }

    #[test]
    fn keystone_bodies() {
        let b = keystone_body(&KeystoneMethod::ApplicationCredential {
            id: "i".into(),
            secret: "s".into(),
        });
        assert!(b.contains(r#""methods":["application_credential"]"#), "{b}");
        let b = keystone_body(&KeystoneMethod::Password {
            username: "u".into(),
            password: "p".into(),
            user_domain_name: "Default".into(),
            project_name: "service".into(),
            project_domain_name: "Default".into(),
        });
        assert!(
            b.contains(r#""scope":{"project":{"domain":{"name":"Default"},"name":"service"}}"#)
                || b.contains(r#""name":"service""#),
            "{b}"
        );
    }

    #[test]
    fn long_batches_are_split_to_fit() {
        let nets: NetSet = Rc::from(vec!["3636b40f-3e32-48da-8a7d-266006b19663".to_string()]);
        let keys: Vec<LookupKey> = (0..=255u8)
            .map(|i| LookupKey::Ip(format!("10.10.0.{i}").parse().unwrap()))
            .collect();
        let c = chunks(&nets, keys);
        assert!(c.len() >= 3, "{}", c.len());
        assert!(c.iter().all(|(_, p)| neutron::query_fits(p)));
        assert_eq!(c.iter().map(|(k, _)| k.len()).sum::<usize>(), 256);
    }
}
