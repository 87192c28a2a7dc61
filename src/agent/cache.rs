//! Bounded TTL cache with negative entries and a pluggable clock.
//!
//! Used for router → networks and (network set, key) → port lookups. A
//! negative entry remembers "Neutron has no such port" for a short time so a
//! guest hammering a bad address cannot turn each request into a Neutron
//! query, while a port created a moment later still shows up quickly.
//!
//! Eviction must be O(1) amortized because a boot storm inserts at request
//! rate. Entries are kept in two insertion-order queues, one per TTL class.
//! With a monotonic clock and one TTL per queue, each queue is also ordered by
//! expiry, so "evict an expired entry first, else the oldest-inserted" only
//! ever looks at the two queue fronts. Queue slots carry the generation of the
//! insert that pushed them; a slot whose generation no longer matches the map
//! (re-inserted, invalidated or expired) is skipped lazily. The queues are
//! compacted when stale slots would outnumber the capacity, so memory stays
//! bounded by a constant factor of `capacity` whatever the access pattern.
//! Rejected: an LRU linked list (needs `unsafe` or index juggling, and
//! recency is the wrong signal for a cache whose correctness is TTL-based),
//! and a full scan for expired entries on insert (O(n) per insert).
//!
//! Single-threaded by design (`&mut self`, `Cell` clock): one cache per core.
//!
//! The map is hashbrown's with foldhash, not std's SipHash: a cache hit
//! hashes its key once per request, and SipHash was ~600 of the agent's
//! ~52 000 instructions per request (BENCHMARKS.md, issue 13). It stays
//! keyed: each map's seed comes from `getrandom(2)` (foldhash's own default
//! seeds from address-space layout and the time only), so the keys (a
//! router or network id and a guest address, stamped by the proxy) cannot
//! be chosen to collide without knowing it. [`TtlCache::get`] takes any
//! [`Equivalent`] of the key, so a hit needs no owned key (no allocation).

use std::cell::Cell;
use std::collections::VecDeque;
use std::hash::Hash;
use std::rc::Rc;
use std::time::{Duration, Instant};

pub use hashbrown::Equivalent;

/// The map's hasher: foldhash with a seed from the OS.
type Keyed = foldhash::fast::SeedableRandomState;
type HashMap<K, V> = hashbrown::HashMap<K, V, Keyed>;

/// A hasher seeded from `getrandom(2)`; foldhash's own random seed if the
/// OS has none to give (it always has, short of a broken sandbox).
fn keyed() -> Keyed {
    match getrandom::u64() {
        Ok(seed) => Keyed::with_seed(seed, foldhash::SharedSeed::global_random()),
        Err(_) => Keyed::random(),
    }
}

/// Positive entry lifetime: the ~10 s `expiration_time` Neutron's metadata
/// caching docs recommend (`config-metadata-caching.rst`).
pub const DEFAULT_POSITIVE_TTL: Duration = Duration::from_secs(10);
/// Negative ("no such port") entry lifetime.
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(1);
/// Maximum number of live entries.
pub const DEFAULT_CAPACITY: usize = 100_000;
/// Queues are compacted once they hold more than this many slots per unit of
/// capacity (live plus stale).
const MAX_SLOTS_PER_ENTRY: usize = 2;
/// Floor for the compaction threshold so tiny caches do not compact constantly.
const MIN_COMPACT_SLOTS: usize = 64;

/// Source of the current time.
pub trait Clock {
    /// The current instant; must never go backwards.
    fn now(&self) -> Instant;
}

/// The real monotonic clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that only moves when told to; for tests.
#[derive(Debug)]
pub struct FakeClock(Cell<Instant>);

impl FakeClock {
    /// A fake clock starting at the real current instant.
    pub fn new() -> Self {
        FakeClock(Cell::new(Instant::now()))
    }

    /// Move the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.0.set(self.0.get() + d);
    }
}

impl Default for FakeClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Instant {
        self.0.get()
    }
}

impl<T: Clock + ?Sized> Clock for &T {
    fn now(&self) -> Instant {
        (**self).now()
    }
}

impl<T: Clock + ?Sized> Clock for Rc<T> {
    fn now(&self) -> Instant {
        (**self).now()
    }
}

/// Result of [`TtlCache::get`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup<V> {
    /// A live positive entry.
    Hit(V),
    /// A live negative entry: the backend recently said "not found".
    NegativeHit,
    /// Nothing live for this key.
    Miss,
}

/// Counters since creation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// `get` found a live positive entry.
    pub hits: u64,
    /// `get` found a live negative entry.
    pub negative_hits: u64,
    /// `get` found nothing live (including expired entries).
    pub misses: u64,
    /// Entries dropped to make room (expired or oldest).
    pub evictions: u64,
    /// Entries removed by `get` because they had expired.
    pub expirations: u64,
    /// `insert` and `insert_negative` calls that stored something.
    pub inserts: u64,
}

struct Entry<V> {
    /// `None` is a negative entry.
    value: Option<V>,
    expires: Instant,
    generation: u64,
}

/// A bounded cache whose entries expire after a per-kind TTL.
pub struct TtlCache<K, V, C: Clock = SystemClock> {
    map: HashMap<K, Entry<V>>,
    /// Insertion order of positive entries, `(key, generation)`.
    positive_order: VecDeque<(K, u64)>,
    /// Insertion order of negative entries, `(key, generation)`.
    negative_order: VecDeque<(K, u64)>,
    next_generation: u64,
    capacity: usize,
    positive_ttl: Duration,
    negative_ttl: Duration,
    clock: C,
    stats: CacheStats,
}

impl<K: Hash + Eq + Clone, V: Clone, C: Clock> TtlCache<K, V, C> {
    /// An empty cache holding at most `capacity` live entries. A capacity of
    /// zero disables caching: inserts are dropped.
    pub fn new(capacity: usize, positive_ttl: Duration, negative_ttl: Duration, clock: C) -> Self {
        TtlCache {
            map: HashMap::with_hasher(keyed()),
            positive_order: VecDeque::new(),
            negative_order: VecDeque::new(),
            next_generation: 0,
            capacity,
            positive_ttl,
            negative_ttl,
            clock,
            stats: CacheStats::default(),
        }
    }

    /// Look `k` (the key or a borrowed [`Equivalent`] of it, hashing the
    /// same) up. An expired entry is removed and reported as a miss.
    pub fn get<Q: Hash + Equivalent<K> + ?Sized>(&mut self, k: &Q) -> Lookup<V> {
        let now = self.clock.now();
        match self.map.get(k) {
            None => {
                self.stats.misses += 1;
                Lookup::Miss
            }
            Some(e) if e.expires <= now => {
                self.map.remove(k);
                self.stats.expirations += 1;
                self.stats.misses += 1;
                Lookup::Miss
            }
            Some(Entry { value: Some(v), .. }) => {
                self.stats.hits += 1;
                Lookup::Hit(v.clone())
            }
            Some(Entry { value: None, .. }) => {
                self.stats.negative_hits += 1;
                Lookup::NegativeHit
            }
        }
    }

    /// Store a positive entry, replacing any entry for `k` and restarting its TTL.
    pub fn insert(&mut self, k: K, v: V) {
        self.store(k, Some(v));
    }

    /// Store a negative entry, replacing any entry for `k` and restarting its TTL.
    pub fn insert_negative(&mut self, k: K) {
        self.store(k, None);
    }

    /// Remove `k`; returns whether an entry (live or expired) was present.
    pub fn invalidate(&mut self, k: &K) -> bool {
        // The queue slot goes stale and is skipped or compacted later.
        self.map.remove(k).is_some()
    }

    /// Number of stored entries (expired ones count until removed).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no entries are stored.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Counters since creation.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    fn store(&mut self, k: K, value: Option<V>) {
        if self.capacity == 0 {
            return;
        }
        let now = self.clock.now();
        if !self.map.contains_key(&k) {
            while self.map.len() >= self.capacity {
                if !self.evict_one(now) {
                    break;
                }
            }
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        let (ttl, order) = match value {
            Some(_) => (self.positive_ttl, &mut self.positive_order),
            None => (self.negative_ttl, &mut self.negative_order),
        };
        order.push_back((k.clone(), generation));
        self.map.insert(
            k,
            Entry {
                value,
                expires: now + ttl,
                generation,
            },
        );
        self.stats.inserts += 1;
        self.expire_fronts(now);
        self.compact_if_needed();
    }

    /// Pop what has expired or gone stale from the front of both queues (one
    /// TTL per queue, so the front is always the oldest). Without this, a
    /// steady set of keys re-resolved every TTL grew the queues until the
    /// 2 × capacity compaction (about 26 MB at the default capacity): the
    /// agent's memory crept by ~150 KiB a minute under repeated storms.
    fn expire_fronts(&mut self, now: Instant) {
        for queue in [&mut self.positive_order, &mut self.negative_order] {
            while let Some((k, g)) = queue.front() {
                match self.map.get(k) {
                    Some(e) if e.generation == *g => {
                        if e.expires > now {
                            break;
                        }
                        self.map.remove(k);
                        self.stats.expirations += 1;
                    }
                    // Replaced or removed since: a stale slot.
                    _ => {}
                }
                queue.pop_front();
            }
        }
    }

    /// Drop one entry: the earliest-expiring expired one, else the
    /// oldest-inserted. Returns false if there was nothing to drop.
    fn evict_one(&mut self, now: Instant) -> bool {
        self.skip_stale_fronts();
        let pos = self
            .positive_order
            .front()
            .and_then(|(k, _)| self.map.get(k));
        let neg = self
            .negative_order
            .front()
            .and_then(|(k, _)| self.map.get(k));
        // Invariant: after skip_stale_fronts each front is live, and within a
        // queue expiry grows with insertion (one TTL, monotonic clock).
        let take_positive = match (pos, neg) {
            (None, None) => return false,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some(p), Some(n)) => match (p.expires <= now, n.expires <= now) {
                (true, true) => p.expires <= n.expires,
                (true, false) => true,
                (false, true) => false,
                (false, false) => p.generation < n.generation,
            },
        };
        let queue = if take_positive {
            &mut self.positive_order
        } else {
            &mut self.negative_order
        };
        if let Some((k, _)) = queue.pop_front() {
            self.map.remove(&k);
            self.stats.evictions += 1;
        }
        true
    }

    /// Pop queue-front slots that no longer describe a stored entry.
    fn skip_stale_fronts(&mut self) {
        for queue in [&mut self.positive_order, &mut self.negative_order] {
            while let Some((k, g)) = queue.front() {
                if self.map.get(k).is_some_and(|e| e.generation == *g) {
                    break;
                }
                queue.pop_front();
            }
        }
    }

    /// Drop stale slots once they could outnumber live entries; amortized
    /// O(1) because at least `capacity` pushes happen between compactions.
    fn compact_if_needed(&mut self) {
        let limit = (self.capacity.saturating_mul(MAX_SLOTS_PER_ENTRY)).max(MIN_COMPACT_SLOTS);
        if self.positive_order.len() + self.negative_order.len() <= limit {
            return;
        }
        let map = &self.map;
        let live = |(k, g): &(K, u64)| map.get(k).is_some_and(|e| e.generation == *g);
        self.positive_order.retain(live);
        self.negative_order.retain(live);
    }

    #[cfg(test)]
    fn slots(&self) -> usize {
        self.positive_order.len() + self.negative_order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: Duration = Duration::from_nanos(1);

    fn cache(capacity: usize, clock: &FakeClock) -> TtlCache<u32, &'static str, &FakeClock> {
        TtlCache::new(capacity, DEFAULT_POSITIVE_TTL, DEFAULT_NEGATIVE_TTL, clock)
    }

    #[test]
    fn a_steady_set_of_keys_does_not_grow_the_queues() {
        let clock = FakeClock::new();
        let mut c = cache(100_000, &clock);
        for round in 0..10_000u32 {
            for k in 0..10u32 {
                c.insert(k, "v");
            }
            if round % 10 == 0 {
                clock.advance(DEFAULT_POSITIVE_TTL + NS);
            }
        }
        assert!(
            c.slots() <= 200,
            "{} queue slots for 10 live keys",
            c.slots()
        );
        assert!(c.map.len() <= 10);
    }

    #[test]
    fn positive_ttl_boundary() {
        let clock = FakeClock::new();
        let mut c = cache(10, &clock);
        c.insert(1, "a");
        clock.advance(DEFAULT_POSITIVE_TTL - NS);
        assert_eq!(c.get(&1), Lookup::Hit("a"));
        clock.advance(NS);
        assert_eq!(c.get(&1), Lookup::Miss);
        assert_eq!(c.len(), 0, "expired entry is removed on get");
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.expirations, s.inserts), (1, 1, 1, 1));
    }

    #[test]
    fn negative_ttl_boundary() {
        let clock = FakeClock::new();
        let mut c = cache(10, &clock);
        c.insert_negative(1);
        assert_eq!(c.get(&1), Lookup::NegativeHit);
        clock.advance(DEFAULT_NEGATIVE_TTL - NS);
        assert_eq!(c.get(&1), Lookup::NegativeHit);
        clock.advance(NS);
        assert_eq!(c.get(&1), Lookup::Miss);
        assert_eq!(c.stats().negative_hits, 2);
    }

    #[test]
    fn reinsert_refreshes_ttl_and_kind() {
        let clock = FakeClock::new();
        let mut c = cache(10, &clock);
        c.insert(1, "a");
        clock.advance(Duration::from_secs(8));
        c.insert(1, "b");
        clock.advance(Duration::from_secs(8));
        assert_eq!(c.get(&1), Lookup::Hit("b"));
        c.insert_negative(1);
        assert_eq!(c.get(&1), Lookup::NegativeHit);
        c.insert(1, "c");
        clock.advance(DEFAULT_NEGATIVE_TTL);
        assert_eq!(c.get(&1), Lookup::Hit("c"), "positive TTL applies again");
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn invalidate() {
        let clock = FakeClock::new();
        let mut c = cache(10, &clock);
        c.insert(1, "a");
        assert!(c.invalidate(&1));
        assert!(!c.invalidate(&1));
        assert_eq!(c.get(&1), Lookup::Miss);
        assert!(c.is_empty());
        // A stale queue slot must not evict a later entry for the same key.
        c.insert(1, "b");
        for k in 2..=10 {
            c.insert(k, "x");
        }
        c.insert(11, "y");
        assert_eq!(c.get(&1), Lookup::Miss, "oldest live entry evicted");
        assert_eq!(c.get(&2), Lookup::Hit("x"));
        assert_eq!(c.len(), 10);
    }

    #[test]
    fn evicts_oldest_when_full() {
        let clock = FakeClock::new();
        let mut c = cache(3, &clock);
        c.insert(1, "a");
        c.insert_negative(2);
        c.insert(3, "c");
        c.insert(4, "d");
        assert_eq!(c.get(&1), Lookup::Miss);
        c.insert(5, "e");
        assert_eq!(c.get(&2), Lookup::Miss, "negative entry was oldest");
        assert_eq!(c.get(&3), Lookup::Hit("c"));
        assert_eq!(c.stats().evictions, 2);
    }

    #[test]
    fn evicts_expired_before_oldest() {
        let clock = FakeClock::new();
        let mut c = cache(3, &clock);
        c.insert(1, "a");
        c.insert(2, "b");
        c.insert_negative(3);
        clock.advance(DEFAULT_NEGATIVE_TTL);
        c.insert(4, "d");
        assert_eq!(c.get(&1), Lookup::Hit("a"), "live old entry kept");
        assert_eq!(c.get(&3), Lookup::Miss, "expired negative evicted");
        // Both kinds expired: the earlier-expiring one goes first, even
        // though the other was inserted earlier.
        let mut c = cache(2, &clock);
        c.insert(1, "a"); // expires at t+10
        clock.advance(Duration::from_secs(8));
        c.insert_negative(2); // expires at t+9
        clock.advance(Duration::from_secs(5));
        c.insert(3, "c");
        // The earlier-expiring 2 made room; 1 had expired too and is dropped
        // from the front of its queue by the same insert.
        assert!(!c.map.contains_key(&2));
        assert!(!c.map.contains_key(&1));
        assert_eq!(c.get(&3), Lookup::Hit("c"));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn memory_bounded_after_a_million_inserts() {
        let clock = FakeClock::new();
        let mut c: TtlCache<u32, u32, &FakeClock> =
            TtlCache::new(1_000, DEFAULT_POSITIVE_TTL, DEFAULT_NEGATIVE_TTL, &clock);
        for i in 0..1_000_000u32 {
            if i % 3 == 0 {
                c.insert_negative(i);
            } else {
                c.insert(i, i);
            }
            if i % 1000 == 0 {
                clock.advance(Duration::from_millis(1));
            }
            assert!(c.len() <= 1_000);
            assert!(c.slots() <= 2 * 1_000 + 1);
        }
        assert_eq!(c.get(&999_998), Lookup::Hit(999_998));
        assert_eq!(c.get(&999_999), Lookup::NegativeHit);
        assert_eq!(c.get(&0), Lookup::Miss);
        assert_eq!(c.stats().inserts, 1_000_000);
    }

    #[test]
    fn memory_bounded_under_reinsert_of_one_key() {
        let clock = FakeClock::new();
        let mut c = cache(100, &clock);
        for _ in 0..100_000 {
            c.insert(7, "a");
            c.insert_negative(7);
        }
        assert_eq!(c.len(), 1);
        assert!(c.slots() <= 2 * 100 + 1);
    }

    #[test]
    fn zero_capacity_disables() {
        let clock = FakeClock::new();
        let mut c = cache(0, &clock);
        c.insert(1, "a");
        assert_eq!(c.get(&1), Lookup::Miss);
        assert!(c.is_empty());
    }

    #[test]
    fn rc_and_system_clocks() {
        let clock = Rc::new(FakeClock::new());
        let mut c: TtlCache<u8, u8, Rc<FakeClock>> = TtlCache::new(
            4,
            DEFAULT_POSITIVE_TTL,
            DEFAULT_NEGATIVE_TTL,
            Rc::clone(&clock),
        );
        c.insert(1, 1);
        clock.advance(DEFAULT_POSITIVE_TTL);
        assert_eq!(c.get(&1), Lookup::Miss);
        let mut s: TtlCache<u8, u8> =
            TtlCache::new(4, DEFAULT_POSITIVE_TTL, DEFAULT_NEGATIVE_TTL, SystemClock);
        s.insert(1, 1);
        assert_eq!(s.get(&1), Lookup::Hit(1));
    }
}
