//! The inventory backend: resolve (scope, address) → (instance, project)
//! from the inventory file, through this loop's cache.
//!
//! The file, its reload and this loop's copy of it are
//! [`crate::inventory::store`], shared with the API. A reload bumps the
//! store's generation; the first lookup that sees a new generation drops
//! the whole cache, which describes the old file.
//!
//! Matching follows Neutron (spec §3.2): router scope → the router's
//! networks, then the port by fixed IP (or by MAC for link-local IPv6) on
//! those networks; exactly one port resolves, zero or several is a 404. A
//! port whose ids are not OpenStack ids resolves to nothing (see
//! [`Resolved::new`]).
//!
//! Rejected: keeping the cache beside the loop's other state in the server
//! (it was, with the Neutron resolver next to it as a second `Option`), and
//! caching across loops (habit 7: a lock on every hit).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use crate::agent::cache::{Equivalent, Lookup, SystemClock, TtlCache};
use crate::agent::identity::{Identity, LookupKey, Scope};
use crate::agent::metrics::{inc, LoopMetrics};
use crate::agent::resolve::{BadId, RejectedPorts, Resolved};
use crate::inventory::store::Local;
use crate::inventory::Inventory;
use crate::log;

/// The outcome of looking one guest up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Exactly one port matched.
    Found(Resolved),
    /// No port matched.
    NotFound,
    /// Several ports matched (overlapping networks behind one router).
    Ambiguous(usize),
}

/// Look a guest up in `inv`. A port whose instance or project id is not an
/// OpenStack id resolves to nothing (reported to `rejected`).
pub fn resolve(
    inv: &Inventory,
    scope: &Scope,
    key: &LookupKey,
    rejected: &RejectedPorts,
) -> Resolution {
    let networks: Vec<&str> = match scope {
        Scope::Router(r) => inv.router_networks(r).iter().map(String::as_str).collect(),
        Scope::Network(n) => vec![n.as_str()],
    };
    let ports = match key {
        LookupKey::Ip(ip) => inv.ports_by_ip(&networks, *ip),
        LookupKey::Mac(mac) => inv.ports_by_mac(&networks, *mac),
    };
    match ports.as_slice() {
        [] => Resolution::NotFound,
        [one] => match Resolved::new(&one.instance.uuid, &one.instance.project) {
            Ok(r) => Resolution::Found(r),
            Err(which) => {
                let value = match which {
                    BadId::Instance => &one.instance.uuid,
                    BadId::Project => &one.instance.project,
                };
                rejected.report(&one.port.id, which, value);
                Resolution::NotFound
            }
        },
        many => Resolution::Ambiguous(many.len()),
    }
}

type CacheKey = (Scope, LookupKey);

/// A [`CacheKey`] borrowed from the request's [`Identity`]: a cache hit
/// looks up with it and allocates no key. It hashes as the tuple does
/// (each field in order), which [`Equivalent`] lookups require.
struct KeyRef<'a>(&'a Scope, &'a LookupKey);

impl std::hash::Hash for KeyRef<'_> {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0.hash(h);
        self.1.hash(h);
    }
}

impl Equivalent<CacheKey> for KeyRef<'_> {
    fn equivalent(&self, key: &CacheKey) -> bool {
        *self.0 == key.0 && *self.1 == key.1
    }
}

/// One loop's resolver over the inventory: its copy of the file and the
/// cache filled from it.
pub struct InventoryResolver {
    inventory: Local,
    cache: RefCell<TtlCache<CacheKey, Rc<Resolved>>>,
    /// Inventory generation the cache was filled from.
    generation: Cell<u64>,
    capacity: usize,
    ttl: Duration,
    negative_ttl: Duration,
    /// Ports whose ids were refused, logged once each.
    rejected: RejectedPorts,
    metrics: Arc<LoopMetrics>,
}

impl InventoryResolver {
    /// A resolver over `inventory` with an empty cache.
    pub fn new(
        inventory: Local,
        ttl: Duration,
        negative_ttl: Duration,
        capacity: usize,
        metrics: Arc<LoopMetrics>,
    ) -> InventoryResolver {
        let generation = inventory.get().1;
        InventoryResolver {
            inventory,
            cache: RefCell::new(TtlCache::new(capacity, ttl, negative_ttl, SystemClock)),
            generation: Cell::new(generation),
            capacity,
            ttl,
            negative_ttl,
            rejected: RejectedPorts::default(),
            metrics,
        }
    }

    /// Resolve through the cache; `fresh` skips (and drops) the cached
    /// answer. The bool says whether the answer came from the cache.
    pub fn lookup(&self, id: &Identity, fresh: bool) -> (Option<Rc<Resolved>>, bool) {
        let m = &self.metrics;
        let (inv, generation) = self.inventory.get();
        if generation != self.generation.get() {
            // A reload: everything cached describes the old file.
            *self.cache.borrow_mut() =
                TtlCache::new(self.capacity, self.ttl, self.negative_ttl, SystemClock);
            self.generation.set(generation);
        }
        if fresh {
            self.cache
                .borrow_mut()
                .invalidate(&(id.scope.clone(), id.key.clone()));
        } else {
            match self.cache.borrow_mut().get(&KeyRef(&id.scope, &id.key)) {
                Lookup::Hit(r) => {
                    inc(&m.cache_hits);
                    return (Some(r), true);
                }
                Lookup::NegativeHit => {
                    inc(&m.cache_negative_hits);
                    return (None, true);
                }
                Lookup::Miss => inc(&m.cache_misses),
            }
        }
        inc(&m.inventory_lookups);
        let key = (id.scope.clone(), id.key.clone());
        // `inv` is the file `generation` names, so every answer is cacheable.
        let mut cache = self.cache.borrow_mut();
        match resolve(&inv, &id.scope, &id.key, &self.rejected) {
            Resolution::Found(r) => {
                let r = Rc::new(r);
                cache.insert(key, r.clone());
                (Some(r), false)
            }
            Resolution::NotFound => {
                log::debug(format_args!("no port for {} on {:?}", id.xff, id.scope));
                cache.insert_negative(key);
                (None, false)
            }
            Resolution::Ambiguous(n) => {
                log::warn(format_args!(
                    "{n} ports match {} on {:?}; answering 404 (check the inventory for overlaps)",
                    id.xff, id.scope
                ));
                cache.insert_negative(key);
                (None, false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::identity::IdText;
    use std::net::IpAddr;

    const INV: &str = r#"
[[network]]
id = "aaaaaaaa-0000-4000-8000-000000000001"
name = "n1"
project = "p1"
[[network.subnet]]
id = "aaaaaaaa-0000-4000-8000-0000000000b1"
cidr = "10.0.0.0/24"

[[network]]
id = "aaaaaaaa-0000-4000-8000-000000000002"
name = "n2"
project = "p1"
[[network.subnet]]
id = "aaaaaaaa-0000-4000-8000-0000000000b2"
cidr = "10.0.0.0/24"

[[router]]
id = "aaaaaaaa-0000-4000-8000-0000000000c1"
networks = ["aaaaaaaa-0000-4000-8000-000000000001", "aaaaaaaa-0000-4000-8000-000000000002"]

[[instance]]
uuid = "f1aaaaaa-0000-4000-8000-0000000000f1"
hostname = "vm1"
project = "0f1aaaaa000040008000000000000001"
[[instance.port]]
id = "aaaaaaaa-0000-4000-8000-0000000000e1"
network = "aaaaaaaa-0000-4000-8000-000000000001"
mac = "fa:16:3e:00:00:01"
fixed_ips = ["10.0.0.5"]

[[instance]]
uuid = "f2aaaaaa-0000-4000-8000-0000000000f2"
hostname = "vm2"
project = "0f1aaaaa000040008000000000000001"
[[instance.port]]
id = "aaaaaaaa-0000-4000-8000-0000000000e2"
network = "aaaaaaaa-0000-4000-8000-000000000002"
mac = "fa:16:3e:00:00:02"
fixed_ips = ["10.0.0.5"]
"#;

    fn ip(s: &str) -> LookupKey {
        LookupKey::Ip(s.parse::<IpAddr>().unwrap())
    }

    #[test]
    fn one_port_resolves_zero_or_several_do_not() {
        let inv = Inventory::from_toml_str(INV).unwrap();
        let rej = RejectedPorts::default();
        let n1 = Scope::Network(IdText::new("aaaaaaaa-0000-4000-8000-000000000001").unwrap());
        let r = Scope::Router(IdText::new("aaaaaaaa-0000-4000-8000-0000000000c1").unwrap());
        assert_eq!(
            resolve(&inv, &n1, &ip("10.0.0.5"), &rej),
            Resolution::Found(
                Resolved::new(
                    "f1aaaaaa-0000-4000-8000-0000000000f1",
                    "0f1aaaaa000040008000000000000001"
                )
                .unwrap()
            )
        );
        assert_eq!(
            resolve(&inv, &n1, &ip("10.0.0.6"), &rej),
            Resolution::NotFound
        );
        assert_eq!(
            resolve(&inv, &r, &ip("10.0.0.5"), &rej),
            Resolution::Ambiguous(2)
        );
        let unknown = Scope::Router(IdText::new("bbbb").unwrap());
        assert_eq!(
            resolve(&inv, &unknown, &ip("10.0.0.5"), &rej),
            Resolution::NotFound
        );
        let mac = LookupKey::Mac([0xfa, 0x16, 0x3e, 0, 0, 2]);
        assert!(matches!(
            resolve(&inv, &r, &mac, &rej),
            Resolution::Found(Resolved { ref instance, .. }) if instance.as_str().ends_with("f2")
        ));
    }

    #[test]
    fn inventory_ports_with_bad_ids_resolve_to_nothing() {
        let bad = INV.replace(
            "project = \"0f1aaaaa000040008000000000000001\"\n[[instance.port]]\nid = \"aaaaaaaa-0000-4000-8000-0000000000e1\"",
            "project = \"p1\"\n[[instance.port]]\nid = \"aaaaaaaa-0000-4000-8000-0000000000e1\"",
        );
        assert_ne!(bad, INV);
        let inv = Inventory::from_toml_str(&bad).unwrap();
        let n1 = Scope::Network(IdText::new("aaaaaaaa-0000-4000-8000-000000000001").unwrap());
        let rej = RejectedPorts::default();
        assert_eq!(
            resolve(&inv, &n1, &ip("10.0.0.5"), &rej),
            Resolution::NotFound
        );
        assert!(rej.reported("aaaaaaaa-0000-4000-8000-0000000000e1"));
    }

    #[test]
    fn the_cache_serves_hits_and_is_dropped_by_a_reload_or_a_fresh_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("inv.toml");
        std::fs::write(&p, INV).unwrap();
        let store = Arc::new(crate::inventory::Store::load(&p).unwrap());
        let m = Arc::new(LoopMetrics::default());
        let r = InventoryResolver::new(
            store.local(),
            Duration::from_secs(60),
            Duration::from_secs(60),
            100,
            m.clone(),
        );
        let id = Identity {
            scope: Scope::Network(IdText::new("aaaaaaaa-0000-4000-8000-000000000001").unwrap()),
            key: ip("10.0.0.5"),
            xff: IdText::new("10.0.0.5").unwrap(),
        };
        let found = |(r, cached): (Option<Rc<Resolved>>, bool)| (r.is_some(), cached);
        assert_eq!(found(r.lookup(&id, false)), (true, false));
        assert_eq!(found(r.lookup(&id, false)), (true, true));
        assert_eq!(found(r.lookup(&id, true)), (true, false), "fresh skips it");
        // The file loses the port: a reload drops what was cached from it.
        let gone = INV.replace("fixed_ips = [\"10.0.0.5\"]", "fixed_ips = [\"10.0.0.99\"]");
        assert_ne!(gone, INV);
        std::fs::write(&p, gone).unwrap();
        store.reload().unwrap();
        assert_eq!(found(r.lookup(&id, false)), (false, false));
        assert_eq!(
            m.inventory_lookups
                .load(std::sync::atomic::Ordering::Relaxed),
            3
        );
    }
}
