//! Coalescing bookkeeping for boot storms: single-flight plus batching.
//!
//! During a boot storm hundreds of guests on the same networks ask for
//! metadata within a second, and most of them miss the cache. One Neutron
//! query per miss costs ~10–30 ms of server time each, while one query for
//! 100 IPs costs about as much as four single ones (`peers/README.md` §A).
//! So misses are (1) single-flighted per key, because cloud-init asks for
//! many paths back to back from the same address, and (2) batched per
//! *group*, the set of networks the query is scoped to, because ports on
//! different network sets cannot share a `network_id` filter.
//!
//! This is a pure state machine: no timers, no channels. The async layer owns
//! the clock and the oneshots and drives the protocol:
//!
//! 1. On a cache miss, [`Batcher::join`] with a fresh [`Waiter`] ticket.
//!    * [`JoinOutcome::Joined`]: the key is already queued or in flight; just
//!      wait for the ticket.
//!    * [`JoinOutcome::Queued`]: the key is new. If `batch_full`, flush the
//!      group now. Otherwise, if `queued(&group) == 1` this key opened the
//!      group's batching window: arm a timer to flush it.
//! 2. Flush: [`Batcher::take_batch`] moves up to `max_batch` queued keys to
//!    in-flight and returns them for one backend call. If `queued(&group)` is
//!    still non-zero afterwards, flush again (those keys waited long enough).
//! 3. When the backend answers, [`Batcher::complete`] **every** key of the
//!    batch, including keys the backend did not return (they complete as
//!    not-found) and all keys of a failed call (they complete with the
//!    error). Each call returns the tickets to wake, each exactly once.
//!
//! A join for a key that is in flight rides on that flight: its answer is at
//! most one backend round trip old, which is what a cache fill would give.
//! Rejected: a batcher that owns timers (ties the pure core to the runtime),
//! and one global queue across groups (a flush would mix network filters).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// Opaque ticket the async layer maps to a oneshot sender.
pub type Waiter = u64;

/// Default largest batch: about 110 IPv4 lookups fit in neutron-server's
/// default request line (see [`super::neutron::MAX_REQUEST_LINE_BYTES`]);
/// IPv6 keys are longer, so stay well below.
pub const DEFAULT_MAX_BATCH: usize = 50;

/// What [`Batcher::join`] did with a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JoinOutcome {
    /// Already queued or in flight: wait for the ticket.
    Joined,
    /// Newly queued. `batch_full`: the group holds at least `max_batch`
    /// queued keys, so flush it now instead of waiting for the window.
    Queued {
        /// Flush the group now.
        batch_full: bool,
    },
}

#[derive(Default)]
struct Pending {
    waiters: Vec<Waiter>,
    in_flight: bool,
}

struct Group<K> {
    /// Keys not yet taken, in join order.
    queue: VecDeque<K>,
    /// Every queued or in-flight key of the group and its waiters.
    // Invariant: a key is in `queue` iff it is in `pending` with
    // `in_flight == false`.
    pending: HashMap<K, Pending>,
}

/// Single-flight and batching state for groups `G` of keys `K`.
pub struct Batcher<G, K> {
    max_batch: usize,
    groups: HashMap<G, Group<K>>,
    in_flight: usize,
}

impl<G: Hash + Eq, K: Hash + Eq + Clone> Batcher<G, K> {
    /// A batcher taking at most `max_batch` keys per backend call (at least 1).
    pub fn new(max_batch: usize) -> Self {
        Batcher {
            max_batch: max_batch.max(1),
            groups: HashMap::new(),
            in_flight: 0,
        }
    }

    /// Register `waiter`'s interest in `key` of `group`.
    pub fn join(&mut self, group: G, key: K, waiter: Waiter) -> JoinOutcome {
        let g = self.groups.entry(group).or_insert_with(|| Group {
            queue: VecDeque::new(),
            pending: HashMap::new(),
        });
        if let Some(p) = g.pending.get_mut(&key) {
            p.waiters.push(waiter);
            return JoinOutcome::Joined;
        }
        g.pending.insert(
            key.clone(),
            Pending {
                waiters: vec![waiter],
                in_flight: false,
            },
        );
        g.queue.push_back(key);
        JoinOutcome::Queued {
            batch_full: g.queue.len() >= self.max_batch,
        }
    }

    /// Take up to `max_batch` queued keys of `group`, oldest first, for one
    /// backend call; they become in flight. Empty if nothing is queued.
    pub fn take_batch(&mut self, group: &G) -> Vec<K> {
        let Some(g) = self.groups.get_mut(group) else {
            return Vec::new();
        };
        let n = g.queue.len().min(self.max_batch);
        let batch: Vec<K> = g.queue.drain(..n).collect();
        for k in &batch {
            if let Some(p) = g.pending.get_mut(k) {
                p.in_flight = true;
            }
        }
        self.in_flight += batch.len();
        batch
    }

    /// Finish `key` of `group` and return the tickets to wake, each once.
    /// Unknown or already-completed keys return nothing. Completing a key
    /// that is still queued (e.g. answered another way) removes it.
    pub fn complete(&mut self, group: &G, key: &K) -> Vec<Waiter> {
        let Some(g) = self.groups.get_mut(group) else {
            return Vec::new();
        };
        let Some(p) = g.pending.remove(key) else {
            return Vec::new();
        };
        if p.in_flight {
            self.in_flight -= 1;
        } else if let Some(i) = g.queue.iter().position(|k| k == key) {
            // Rare path, O(queue): the normal protocol completes in-flight keys.
            g.queue.remove(i);
        }
        if g.pending.is_empty() {
            self.groups.remove(group);
        }
        p.waiters
    }

    /// Keys taken by [`Batcher::take_batch`] and not yet completed, all groups.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Keys of `group` waiting to be taken.
    pub fn queued(&self, group: &G) -> usize {
        self.groups.get(group).map_or(0, |g| g.queue.len())
    }

    /// Whether no key is queued or in flight in any group.
    pub fn is_idle(&self) -> bool {
        self.groups.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// A storm of joins (any keys, any batch cap) is fetched in batches
        /// that cover each key once, and completing them wakes every waiter.
        #[test]
        fn storm_batches_cover_each_key_once(
            keys in proptest::collection::vec(0..200u32, 1..1000),
            max in 1..64usize,
        ) {
            storm_batches(&keys, max);
        }
    }

    fn storm_batches(keys: &[u32], max: usize) {
        let mut b: Batcher<&str, u32> = Batcher::new(max);
        let mut batches: Vec<Vec<u32>> = Vec::new();
        let mut joined_per_key: HashMap<u32, usize> = HashMap::new();
        for (waiter, &key) in (0u64..).zip(keys) {
            *joined_per_key.entry(key).or_default() += 1;
            if let JoinOutcome::Queued { batch_full: true } = b.join("net-set", key, waiter) {
                batches.push(b.take_batch(&"net-set"));
            }
        }
        while b.queued(&"net-set") > 0 {
            batches.push(b.take_batch(&"net-set"));
        }
        let mut seen = HashSet::new();
        for batch in &batches {
            assert!(!batch.is_empty() && batch.len() <= max);
            for k in batch {
                assert!(seen.insert(*k), "key {k} fetched twice");
            }
        }
        assert_eq!(seen.len(), joined_per_key.len());
        assert_eq!(b.in_flight(), seen.len());

        let mut woken = Vec::new();
        for batch in &batches {
            for k in batch {
                let w = b.complete(&"net-set", k);
                assert_eq!(w.len(), joined_per_key[k]);
                woken.extend(w);
            }
        }
        woken.sort_unstable();
        assert_eq!(woken, (0..keys.len() as u64).collect::<Vec<_>>());
        assert_eq!(b.in_flight(), 0);
        assert!(b.is_idle());
    }

    #[test]
    fn duplicate_joins_single_flight() {
        let mut b: Batcher<u8, &str> = Batcher::new(10);
        assert_eq!(
            b.join(1, "ip", 1),
            JoinOutcome::Queued { batch_full: false }
        );
        assert_eq!(b.join(1, "ip", 2), JoinOutcome::Joined);
        assert_eq!(b.take_batch(&1), ["ip"]);
        // Joining while in flight rides on the flight, no new queue entry.
        assert_eq!(b.join(1, "ip", 3), JoinOutcome::Joined);
        assert_eq!(b.queued(&1), 0);
        assert!(b.take_batch(&1).is_empty());
        assert_eq!(b.complete(&1, &"ip"), [1, 2, 3]);
        assert!(b.complete(&1, &"ip").is_empty(), "waiters returned once");
        // After completion the key is fetched afresh.
        assert_eq!(
            b.join(1, "ip", 4),
            JoinOutcome::Queued { batch_full: false }
        );
    }

    #[test]
    fn groups_are_independent() {
        let mut b: Batcher<&str, &str> = Batcher::new(2);
        b.join("a", "k", 1);
        assert_eq!(
            b.join("b", "k", 2),
            JoinOutcome::Queued { batch_full: false }
        );
        assert_eq!(
            b.join("a", "l", 3),
            JoinOutcome::Queued { batch_full: true }
        );
        assert_eq!(b.queued(&"a"), 2);
        assert_eq!(b.queued(&"b"), 1);
        assert_eq!(b.take_batch(&"a"), ["k", "l"]);
        assert_eq!(b.queued(&"b"), 1);
        assert_eq!(b.complete(&"b", &"k"), [2], "queued key completed early");
        assert_eq!(b.queued(&"b"), 0);
        assert_eq!(b.in_flight(), 2);
        assert!(b.complete(&"zz", &"k").is_empty());
    }

    #[test]
    fn take_batch_respects_max_and_order() {
        let mut b: Batcher<(), u32> = Batcher::new(3);
        let outcomes: Vec<_> = (0..7).map(|k| b.join((), k, u64::from(k))).collect();
        assert_eq!(outcomes[1], JoinOutcome::Queued { batch_full: false });
        assert_eq!(outcomes[2], JoinOutcome::Queued { batch_full: true });
        assert_eq!(b.take_batch(&()), [0, 1, 2]);
        assert_eq!(b.take_batch(&()), [3, 4, 5]);
        assert_eq!(b.take_batch(&()), [6]);
        assert!(b.take_batch(&()).is_empty());
        assert_eq!(b.in_flight(), 7);
        // A key the backend did not return still completes (as not-found).
        for k in 0..7 {
            assert_eq!(b.complete(&(), &k), [u64::from(k)]);
        }
        assert!(b.is_idle());
    }

    #[test]
    fn zero_max_batch_means_one() {
        let mut b: Batcher<(), u8> = Batcher::new(0);
        assert_eq!(b.join((), 1, 1), JoinOutcome::Queued { batch_full: true });
        b.join((), 2, 2);
        assert_eq!(b.take_batch(&()), [1]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Any interleaving of joins, takes and completions (in any order)
        /// keeps one flight per key and wakes every waiter exactly once.
        #[test]
        fn random_interleaving_wakes_every_waiter_once(
            ops in proptest::collection::vec(
                (0..10u8, 0..3u8, 0..40u8, proptest::prelude::any::<proptest::sample::Index>()),
                1..2000,
            ),
        ) {
            interleaving(&ops);
        }
    }

    fn interleaving(ops: &[(u8, u8, u8, proptest::sample::Index)]) {
        const MAX: usize = 8;
        let mut b: Batcher<u8, u8> = Batcher::new(MAX);
        let mut flights: Vec<(u8, Vec<u8>)> = Vec::new();
        let mut airborne: HashSet<(u8, u8)> = HashSet::new();
        let mut woken: Vec<Waiter> = Vec::new();
        let mut next_waiter = 0u64;
        for &(op, g, k, pick) in ops {
            match op {
                0..=5 => {
                    b.join(g, k, next_waiter);
                    next_waiter += 1;
                }
                6 | 7 => {
                    let batch = b.take_batch(&g);
                    assert!(batch.len() <= MAX);
                    for k in &batch {
                        assert!(airborne.insert((g, *k)), "two flights for one key");
                    }
                    if !batch.is_empty() {
                        flights.push((g, batch));
                    }
                }
                _ => {
                    if !flights.is_empty() {
                        let (g, batch) = flights.swap_remove(pick.index(flights.len()));
                        for k in batch {
                            airborne.remove(&(g, k));
                            woken.extend(b.complete(&g, &k));
                        }
                    }
                }
            }
            assert_eq!(b.in_flight(), airborne.len());
        }
        for g in 0..3 {
            while b.queued(&g) > 0 {
                flights.push((g, b.take_batch(&g)));
            }
        }
        for (g, batch) in flights {
            for k in batch {
                woken.extend(b.complete(&g, &k));
            }
        }
        woken.sort_unstable();
        assert_eq!(woken, (0..next_waiter).collect::<Vec<_>>());
        assert!(b.is_idle());
    }
}
