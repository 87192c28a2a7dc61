//! One loop's resolver over Neutron: the four layers that make a boot storm
//! of N guests cost O(1) Neutron calls (see [`super`]): the loop's cache,
//! prefetch of a network set, single flight and batching, then the call
//! itself through [`NeutronClient`].

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::query::{self as neutron, PortInfo};
use super::{BackendError, NeutronClient};
use crate::agent::batch::{Batcher, JoinOutcome, Waiter};
use crate::agent::cache::{Lookup, SystemClock, TtlCache};
use crate::agent::config::NeutronConfig;
use crate::agent::identity::{LookupKey, Scope};
use crate::agent::metrics::{inc, Call, LoopMetrics};
use crate::agent::resolve::{BadId, RejectedPorts, Resolved};
use crate::log;
use crate::rt::{self, sync::oneshot};

/// Network sets remembered as prefetched before stale ones are swept.
const MAX_PREFETCH_SETS: usize = 10_000;

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
            Scope::Network(n) => Rc::from(vec![n.to_string()]),
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
