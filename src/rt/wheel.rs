//! The deadlines of a loop: a hierarchical timer wheel per thread, driven by
//! the loop itself.
//!
//! [`super::with_deadline`] guards almost every read, write and connect of the
//! three daemons, and almost every one of those deadlines is cancelled long
//! before it fires: a cloud-init connection through the proxy arms about five.
//! compio's own timers are a `BTreeMap` per loop: each one costs an insert and
//! an `Instant::now()` when it is created and a remove when it is dropped, and
//! every turn of the loop that has any timer pays another `Instant::now()`, a
//! `split_off` and a `mem::replace`. Here a deadline is an entry in a slab
//! linked into a slot of the wheel: an insert and an exact cancel are a few
//! index writes, with no clock read, and no compio timer is set for it, so
//! compio's per-turn timer work is not paid either.
//!
//! Shape: six levels of 64 slots, as in tokio's and the kernel's wheels. A
//! deadline goes to the level of the highest 6-bit group in which its tick
//! differs from the wheel's current tick, so level 0 holds the next 64 ticks
//! tick by tick, level 1 the next 64 × 64 in slots of 64 ticks, and so on;
//! when a higher slot's time comes its entries move down (or fire). Each
//! level keeps a bitmap of its non-empty slots, so the earliest non-empty
//! slot is found with a rotate and a `trailing_zeros` per level, not a scan.
//! Six levels at [`TICK`] = 4 ms span 2^36 ticks, about 8.7 years; a deadline
//! further out waits in the top level and is put back each time its slot
//! comes round, so it never fires early either.
//!
//! The tick is 4 ms because the deadlines guarded here are haproxy's and
//! Nova's timeouts, configured in seconds (the shortest shipped is a second
//! or more, tests use 100 ms and up): 4 ms late is below anything a peer can
//! notice, while more entries share a tick and the loop wakes for them at
//! most 250 times a second, and only while a deadline is due. A deadline fires at the
//! first tick boundary at or after its `Instant` (rounded up, never early), so
//! at most one tick plus the loop's own latency late.
//!
//! No task and no compio timer drive it: the loop does ([`super::drive`],
//! the loop every [`super::block_on`] and [`super::run_loops`] runs). Before
//! it waits in the kernel, the loop asks the wheel how long until its next
//! non-empty slot ([`timeout`]) and waits no longer; after the wait it moves
//! the wheel to the clock and wakes what is due ([`expire`]), as compio does
//! for its own timers. A loop with no deadline pending reads no clock for
//! them and waits for its IO alone. Driving it from a compio timer instead
//! (the first version) kept that timer armed while any deadline was pending,
//! and compio's timer map then pays a `BTreeMap::split_off`, an allocation
//! and a free, and two clock reads on every turn of a busy loop: 14 → 17
//! allocations per request through the proxy, against 14 with compio's
//! timers alone (`tests/alloc_counts.rs`).
//!
//! The wheel is a thread-local: a deadline is only ever on its own loop's
//! wheel. A thread runs one loop at a time; when a loop ends, its tasks are
//! dropped and their deadlines with them. A deadline dropped after the
//! thread's wheel is gone (thread teardown) does nothing.
//!
//! Rejected: a single-level hashed wheel (every entry further out than one
//! revolution is walked once per revolution, and its earliest slot says
//! nothing about when anything is due, so the loop would wake once per
//! revolution per busy slot); lazy deletion (a cancelled entry left in place
//! until its slot comes round grows with the rate deadlines are created, not
//! with how many are alive); a fixed-rate tick (a node with a few idle
//! keep-alive connections would wake 250 times a second for nothing); a
//! driver task on a compio timer (above).

use std::cell::RefCell;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// The wheel's resolution: a deadline fires at the first tick boundary at or
/// after its `Instant`.
pub const TICK: Duration = Duration::from_nanos(TICK_NANOS);
const TICK_NANOS: u64 = 4_000_000;
const TICKS_PER_SEC: u64 = 1_000_000_000 / TICK_NANOS;

/// Bits of a tick per level, and so slots per level.
const SLOT_BITS: u32 = 6;
const SLOTS: usize = 1 << SLOT_BITS;
const SLOT_MASK: u64 = SLOTS as u64 - 1;
const LEVELS: usize = 6;
/// No entry (end of a list, an empty slot, the end of the free list).
const NIL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// On the free list.
    Free,
    /// In a slot of the wheel, not yet due.
    Linked,
    /// Due: taken off the wheel, its waker woken; freed when its owner sees it.
    Fired,
}

struct Entry {
    /// The tick at or after which it fires.
    when: u64,
    prev: u32,
    /// The next entry of its slot, or of the free list.
    next: u32,
    level: u8,
    slot: u8,
    state: State,
    waker: Option<Waker>,
}

#[derive(Clone, Copy)]
struct Level {
    /// Bit `s` set: slot `s` has entries.
    occupied: u64,
    head: [u32; SLOTS],
}

/// The wheel itself, in ticks and without a clock: entries in, wakers out.
/// Owned by the thread's [`Timers`]; a pure structure so that its tests can
/// drive it tick by tick.
struct Wheel {
    /// Every tick up to this one has been processed: an entry is always for a
    /// later tick.
    elapsed: u64,
    levels: [Level; LEVELS],
    entries: Vec<Entry>,
    free: u32,
    /// Entries linked into a slot (the deadlines pending).
    linked: usize,
}

/// Where an expiration is: level, slot, and the tick at which it is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Expiration {
    level: usize,
    slot: usize,
    tick: u64,
}

impl Wheel {
    const fn new() -> Self {
        Self {
            elapsed: 0,
            levels: [Level {
                occupied: 0,
                head: [NIL; SLOTS],
            }; LEVELS],
            entries: Vec::new(),
            free: NIL,
            linked: 0,
        }
    }

    /// Add an entry due at tick `when`, woken through `waker`. `None` when
    /// that tick has already been processed: the deadline has passed. Else the
    /// entry's index and the tick at which its slot is due (the wheel's next
    /// expiration is no later than that).
    fn insert(&mut self, when: u64, waker: Waker) -> Option<(u32, u64)> {
        if when <= self.elapsed {
            return None;
        }
        let i = if self.free == NIL {
            let i = u32::try_from(self.entries.len())
                .ok()
                .filter(|&i| i != NIL)
                .expect("fewer than 2^32 deadlines on one loop");
            self.entries.push(Entry {
                when,
                prev: NIL,
                next: NIL,
                level: 0,
                slot: 0,
                state: State::Free,
                waker: Some(waker),
            });
            i
        } else {
            let i = self.free;
            let e = &mut self.entries[i as usize];
            debug_assert_eq!(e.state, State::Free);
            self.free = e.next;
            e.when = when;
            e.waker = Some(waker);
            i
        };
        let due = self.link(i);
        Some((i, due))
    }

    /// Put entry `i` (not linked) into the slot its tick belongs to relative
    /// to `elapsed`; returns the tick at which that slot is due.
    fn link(&mut self, i: u32) -> u64 {
        let when = self.entries[i as usize].when;
        debug_assert!(when > self.elapsed);
        // The highest 6-bit group in which `when` and `elapsed` differ (ticks
        // beyond the top level's reach wait in the top level).
        let significant = 63 - ((self.elapsed ^ when) | SLOT_MASK).leading_zeros();
        let level = ((significant / SLOT_BITS) as usize).min(LEVELS - 1);
        let slot = ((when >> (SLOT_BITS * level as u32)) & SLOT_MASK) as usize;
        let head = self.levels[level].head[slot];
        {
            let e = &mut self.entries[i as usize];
            e.prev = NIL;
            e.next = head;
            e.level = level as u8;
            e.slot = slot as u8;
            e.state = State::Linked;
        }
        if head != NIL {
            self.entries[head as usize].prev = i;
        }
        self.levels[level].head[slot] = i;
        self.levels[level].occupied |= 1 << slot;
        self.linked += 1;
        self.slot_due(level, slot)
    }

    /// Take entry `i` out of its slot.
    fn unlink(&mut self, i: u32) {
        let (prev, next, level, slot) = {
            let e = &self.entries[i as usize];
            debug_assert_eq!(e.state, State::Linked);
            (e.prev, e.next, e.level as usize, e.slot as usize)
        };
        if prev == NIL {
            self.levels[level].head[slot] = next;
            if next == NIL {
                self.levels[level].occupied &= !(1 << slot);
            }
        } else {
            self.entries[prev as usize].next = next;
        }
        if next != NIL {
            self.entries[next as usize].prev = prev;
        }
        self.linked -= 1;
    }

    /// Give entry `i` back, linked or fired; returns its waker, for the caller
    /// to drop once it no longer holds the wheel.
    fn remove(&mut self, i: u32) -> Option<Waker> {
        if self.entries[i as usize].state == State::Linked {
            self.unlink(i);
        }
        let free = self.free;
        let e = &mut self.entries[i as usize];
        debug_assert_ne!(e.state, State::Free);
        e.state = State::Free;
        e.next = free;
        self.free = i;
        e.waker.take()
    }

    /// Whether entry `i` has fired; if not, `waker` is the one its expiry
    /// wakes from now on (the one it replaces is returned, to be dropped by
    /// the caller once it no longer holds the wheel).
    fn poll(&mut self, i: u32, waker: &Waker) -> (bool, Option<Waker>) {
        let e = &mut self.entries[i as usize];
        match e.state {
            State::Fired => (true, None),
            State::Linked => match &e.waker {
                Some(w) if w.will_wake(waker) => (false, None),
                _ => (false, e.waker.replace(waker.clone())),
            },
            State::Free => {
                debug_assert!(false, "a deadline polled its freed entry");
                (true, None)
            }
        }
    }

    /// The tick at which `slot` of `level` is due, seen from `elapsed`.
    fn slot_due(&self, level: usize, slot: usize) -> u64 {
        let slot_range = 1u64 << (SLOT_BITS * level as u32);
        let level_range = slot_range << SLOT_BITS;
        let level_start = self.elapsed & !(level_range - 1);
        let due = level_start + slot as u64 * slot_range;
        if due <= self.elapsed {
            // Only the top level wraps: its slots are a ring for the
            // deadlines beyond its reach.
            debug_assert_eq!(level, LEVELS - 1);
            due.saturating_add(level_range)
        } else {
            due
        }
    }

    /// The earliest non-empty slot. A lower level's slots are all due before
    /// any of a higher level's, so the first level with an entry has it.
    fn next_expiration(&self) -> Option<Expiration> {
        if self.linked == 0 {
            return None;
        }
        for (level, l) in self.levels.iter().enumerate() {
            if l.occupied == 0 {
                continue;
            }
            // From the slot after the current one round to the current one:
            // below the top level the current slot is always empty, and in
            // the top level an entry there is a whole revolution away.
            let from = ((self.elapsed >> (SLOT_BITS * level as u32)) + 1) & SLOT_MASK;
            let slot = ((u64::from(l.occupied.rotate_right(from as u32).trailing_zeros()) + from)
                & SLOT_MASK) as usize;
            return Some(Expiration {
                level,
                slot,
                tick: self.slot_due(level, slot),
            });
        }
        debug_assert!(false, "linked entries in no slot");
        None
    }

    /// Process every slot due by tick `now`: entries due by then fire (their
    /// wakers pushed on `fired`), the others move to a lower slot.
    fn advance(&mut self, now: u64, fired: &mut Vec<Waker>) {
        while let Some(exp) = self.next_expiration() {
            if exp.tick > now {
                break;
            }
            // Relative to the slot's own time, so that what moves down lands
            // where it would have been inserted at that time.
            self.elapsed = exp.tick;
            let l = &mut self.levels[exp.level];
            let mut i = l.head[exp.slot];
            l.head[exp.slot] = NIL;
            l.occupied &= !(1 << exp.slot);
            while i != NIL {
                self.linked -= 1;
                let e = &mut self.entries[i as usize];
                let next = e.next;
                if e.when <= now {
                    e.state = State::Fired;
                    if let Some(w) = e.waker.take() {
                        fired.push(w);
                    }
                } else {
                    self.link(i);
                }
                i = next;
            }
        }
        self.elapsed = self.elapsed.max(now);
    }
}

/// A thread's wheel and its clock.
struct Timers {
    /// Tick 0. Ticks are counted from when the thread first used a deadline.
    epoch: Instant,
    wheel: Wheel,
    /// Wakers of the entries that fired, woken once the wheel is released
    /// (kept to reuse its allocation).
    fired: Vec<Waker>,
}

thread_local! {
    static TIMERS: RefCell<Timers> = RefCell::new(Timers {
        epoch: Instant::now(),
        wheel: Wheel::new(),
        fired: Vec::new(),
    });
}

impl Timers {
    /// The first tick at or after `t`.
    fn tick_ceil(&self, t: Instant) -> u64 {
        let d = t.saturating_duration_since(self.epoch);
        d.as_secs()
            .saturating_mul(TICKS_PER_SEC)
            .saturating_add(u64::from(d.subsec_nanos()).div_ceil(TICK_NANOS))
    }

    /// The last tick at or before `t`.
    fn tick_floor(&self, t: Instant) -> u64 {
        let d = t.saturating_duration_since(self.epoch);
        d.as_secs()
            .saturating_mul(TICKS_PER_SEC)
            .saturating_add(u64::from(d.subsec_nanos()) / TICK_NANOS)
    }

    fn instant(&self, tick: u64) -> Instant {
        let d = Duration::new(
            tick / TICKS_PER_SEC,
            ((tick % TICKS_PER_SEC) * TICK_NANOS) as u32,
        );
        self.epoch.checked_add(d).unwrap_or_else(far_future)
    }
}

/// An `Instant` no deadline reaches (for ticks past what `Instant` holds).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600)
}

/// The wheel side of one deadline, owned by [`super::Deadline`]: registered
/// at its first poll, cancelled when dropped.
pub(crate) enum Timer {
    /// Not on the wheel yet.
    Unarmed(Instant),
    /// Entry `0` of the thread's wheel.
    Armed(u32),
    /// Fired and given back.
    Done,
}

impl Timer {
    pub(crate) fn new(deadline: Instant) -> Self {
        Timer::Unarmed(deadline)
    }

    /// Ready once the deadline has passed; until then `cx`'s waker is woken
    /// when it does.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match *self {
            Timer::Unarmed(deadline) => self.register(deadline, cx),
            Timer::Armed(i) => {
                let (fired, old) = TIMERS.with(|t| {
                    let mut t = t.borrow_mut();
                    let (fired, old) = t.wheel.poll(i, cx.waker());
                    if fired {
                        t.wheel.remove(i);
                    }
                    (fired, old)
                });
                drop(old);
                if fired {
                    // The entry is given back already: not through `drop`.
                    std::mem::forget(std::mem::replace(self, Timer::Done));
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            }
            Timer::Done => Poll::Ready(()),
        }
    }

    fn register(&mut self, deadline: Instant, cx: &mut Context<'_>) -> Poll<()> {
        let registered = TIMERS.with(|t| {
            let mut t = t.borrow_mut();
            let when = t.tick_ceil(deadline);
            t.wheel.insert(when, cx.waker().clone())
        });
        match registered {
            None => {
                *self = Timer::Done;
                Poll::Ready(())
            }
            Some((i, _)) => {
                *self = Timer::Armed(i);
                Poll::Pending
            }
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        let Timer::Armed(i) = *self else { return };
        // After the thread's wheel is gone there is nothing to cancel.
        let _ = TIMERS.try_with(|t| {
            let Ok(mut t) = t.try_borrow_mut() else {
                debug_assert!(false, "a deadline dropped while its wheel is in use");
                return;
            };
            let waker = t.wheel.remove(i);
            drop(t);
            drop(waker);
        });
    }
}

/// How long the loop may wait in the kernel before the wheel's next
/// non-empty slot is due: `None` when no deadline is pending (no clock is
/// read then), zero when one is due already.
pub(crate) fn timeout() -> Option<Duration> {
    TIMERS
        .try_with(|t| {
            let t = t.try_borrow().ok()?;
            let next = t.wheel.next_expiration()?;
            Some(
                t.instant(next.tick)
                    .saturating_duration_since(Instant::now()),
            )
        })
        .ok()
        .flatten()
}

/// Move the wheel to the clock and wake the tasks whose deadlines are due
/// (after the loop's wait in the kernel, as compio does for its timers).
/// Nothing, and no clock read, when no deadline is pending.
pub(crate) fn expire() {
    let Ok(mut fired) = TIMERS.try_with(|t| {
        let Ok(mut t) = t.try_borrow_mut() else {
            return Vec::new();
        };
        let t = &mut *t;
        if t.wheel.linked == 0 {
            return Vec::new();
        }
        let now = t.tick_floor(Instant::now());
        let mut fired = std::mem::take(&mut t.fired);
        t.wheel.advance(now, &mut fired);
        fired
    }) else {
        return;
    };
    if fired.capacity() == 0 {
        return;
    }
    for w in fired.drain(..) {
        w.wake();
    }
    // Back for the next turn, to reuse its allocation: a wake only queues
    // its task, so nothing took the list meanwhile.
    let _ = TIMERS.try_with(|t| {
        if let Ok(mut t) = t.try_borrow_mut() {
            t.fired = fired;
        }
    });
}

/// The deadlines pending on the thread's wheel.
#[cfg(test)]
pub(crate) fn pending() -> usize {
    TIMERS.with(|t| t.borrow().wheel.linked)
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;

    use super::*;

    fn noop() -> Waker {
        Waker::noop().clone()
    }

    /// Entries at ticks from 1 to far beyond the top level's reach, the wheel
    /// moved on to just before, at and just after each, and in steps of
    /// several sizes between: each fires at the first advance that reaches
    /// its tick, never before.
    #[test]
    fn every_entry_fires_at_its_tick_and_never_before() {
        let whens: Vec<u64> = [1, 2, 63, 64, 65, 100, 4095, 4096, 4097, 300_000]
            .into_iter()
            .chain([1 << 24, (1 << 30) + 7, (1 << 36) + 3, (1 << 40) + 11])
            .collect();
        for step in [1u64, 7, 64, 1000, 1 << 20, 1 << 33] {
            let mut stops: Vec<u64> = whens
                .iter()
                .flat_map(|&t| [t - 1, t, t + 1])
                .chain((1..5000).map(|k| k * step))
                .collect();
            stops.sort_unstable();
            stops.dedup();
            let mut w = Wheel::new();
            let ids: Vec<u32> = whens
                .iter()
                .map(|&t| w.insert(t, noop()).unwrap().0)
                .collect();
            let mut fired = Vec::new();
            for now in stops {
                w.advance(now, &mut fired);
                for (&i, &t) in ids.iter().zip(&whens) {
                    let state = w.entries[i as usize].state;
                    if t > now {
                        assert_eq!(state, State::Linked, "tick {t} fired at {now}");
                    } else {
                        assert_eq!(state, State::Fired, "tick {t} not fired by {now}");
                    }
                }
                assert_eq!(fired.len(), whens.iter().filter(|&&t| t <= now).count());
            }
            assert_eq!(w.linked, 0);
            assert_eq!(w.next_expiration(), None);
        }
    }

    /// The next expiration is the earliest entry's slot: the loop waits
    /// until then, not tick by tick.
    #[test]
    fn the_next_expiration_is_the_earliest_slot() {
        let mut w = Wheel::new();
        assert_eq!(w.next_expiration(), None);
        let (_, due) = w.insert(5000, noop()).unwrap();
        // Level 2, slot of tick 4096.
        assert_eq!(due, 4096);
        assert_eq!(w.next_expiration().map(|e| e.tick), Some(4096));
        let (near, due) = w.insert(10, noop()).unwrap();
        assert_eq!(due, 10);
        assert_eq!(w.next_expiration().map(|e| e.tick), Some(10));
        w.remove(near);
        assert_eq!(w.next_expiration().map(|e| e.tick), Some(4096));
        let mut fired = Vec::new();
        w.advance(4096, &mut fired);
        assert!(fired.is_empty());
        // Moved down a level: to the slot of 64 ticks that holds it.
        assert_eq!(w.next_expiration().map(|e| e.tick), Some(4992));
        w.advance(4992, &mut fired);
        assert!(fired.is_empty());
        // And down to its own tick.
        assert_eq!(w.next_expiration().map(|e| e.tick), Some(5000));
        w.advance(5000, &mut fired);
        assert_eq!(fired.len(), 1);
        assert_eq!(w.next_expiration(), None);
    }

    /// Cancelled entries leave no trace: the slab is reused, not grown.
    #[test]
    fn cancelled_entries_are_reused() {
        let mut w = Wheel::new();
        for round in 0..100u64 {
            let ids: Vec<u32> = (0..100)
                .map(|k| w.insert(1 + round * 3 + k * 977, noop()).unwrap().0)
                .collect();
            for i in ids {
                w.remove(i);
            }
        }
        assert_eq!(w.linked, 0);
        assert_eq!(w.next_expiration(), None);
        assert_eq!(w.entries.len(), 100);
        assert!(w.levels.iter().all(|l| l.occupied == 0));
    }

    /// A tick already processed is refused: that deadline has passed.
    #[test]
    fn a_processed_tick_is_refused() {
        let mut w = Wheel::new();
        w.advance(50, &mut Vec::new());
        assert!(w.insert(50, noop()).is_none());
        assert!(w.insert(51, noop()).is_some());
    }

    use std::cell::{Cell, RefCell as Shared};
    use std::rc::Rc;

    use crate::rt::{block_on, spawn, with_deadline, Elapsed};

    /// A future that never completes (the IO a deadline guards, stuck).
    fn stuck() -> std::future::Pending<()> {
        std::future::pending()
    }

    /// Whether the current runtime has any compio timer set.
    fn compio_timer_set() -> bool {
        compio::runtime::Runtime::with_current(|rt| rt.current_timeout()).is_some()
    }

    /// Poll `done` every 5 ms for at most 10 s (a test that fails ends).
    async fn wait_for(done: impl Fn() -> bool) {
        for _ in 0..2000 {
            if done() {
                return;
            }
            crate::rt::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A stuck future under a deadline ends with `Elapsed`, not before its
    /// `Instant`; a future that is ready never touches the wheel.
    #[test]
    fn a_deadline_fires_and_not_before_its_instant() {
        block_on(async {
            let deadline = Instant::now() + Duration::from_millis(30);
            assert_eq!(with_deadline(deadline, stuck()).await, Err(Elapsed));
            assert!(Instant::now() >= deadline, "fired early");
            assert_eq!(with_deadline(deadline, async { 7 }).await, Ok(7));
            let past = Instant::now() - Duration::from_millis(1);
            assert_eq!(with_deadline(past, stuck()).await, Err(Elapsed));
            assert_eq!(pending(), 0);
        })
        .unwrap();
    }

    /// 10 000 deadlines registered then dropped (the IO they guarded done
    /// first) leave an empty wheel and no compio timer.
    #[test]
    fn cancelled_deadlines_leave_no_timer() {
        block_on(async {
            assert!(!compio_timer_set());
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut all: Vec<_> = (0..10_000)
                .map(|_| Box::pin(with_deadline(deadline, stuck())))
                .collect();
            std::future::poll_fn(|cx| {
                for d in &mut all {
                    assert!(d.as_mut().poll(cx).is_pending());
                }
                Poll::Ready(())
            })
            .await;
            crate::rt::next_turn().await;
            assert_eq!(pending(), 10_000);
            // The loop waits no longer than the wheel's next slot, and
            // without a compio timer.
            assert!(timeout().is_some_and(|t| t <= Duration::from_secs(30)));
            assert!(!compio_timer_set(), "a deadline set a compio timer");
            drop(all);
            assert_eq!(pending(), 0);
            assert_eq!(timeout(), None, "an empty wheel still bounds the wait");
            assert!(!compio_timer_set(), "a compio timer is left set");
        })
        .unwrap();
    }

    /// Tasks whose deadlines are more than one revolution of the lowest
    /// level (64 ticks, 256 ms) apart each wake in deadline order, each not
    /// before its own `Instant`: the right task wakes, at the right time.
    #[test]
    fn deadlines_beyond_a_revolution_wake_their_own_task_in_order() {
        let order = Rc::new(Shared::new(Vec::new()));
        let o = order.clone();
        block_on(async move {
            let start = Instant::now();
            // Spawned latest-first, so the order is the wheel's, not spawning's.
            let ms = [700u64, 300, 20];
            let done = Rc::new(Cell::new(0));
            for (k, &m) in ms.iter().enumerate() {
                let (o, done) = (o.clone(), done.clone());
                spawn(async move {
                    let deadline = start + Duration::from_millis(m);
                    assert_eq!(with_deadline(deadline, stuck()).await, Err(Elapsed));
                    assert!(Instant::now() >= deadline, "{m} ms fired early");
                    o.borrow_mut().push(k);
                    done.set(done.get() + 1);
                });
            }
            wait_for(|| done.get() == ms.len()).await;
        })
        .unwrap();
        assert_eq!(
            *order.borrow(),
            vec![2, 1, 0],
            "woken out of order or not at all"
        );
    }

    /// A thousand tasks with the same deadline (one tick) all wake.
    #[test]
    fn many_deadlines_in_one_tick_all_fire() {
        block_on(async {
            let deadline = Instant::now() + Duration::from_millis(40);
            let fired = Rc::new(Cell::new(0));
            for _ in 0..1000 {
                let fired = fired.clone();
                spawn(async move {
                    if with_deadline(deadline, stuck()).await == Err(Elapsed)
                        && Instant::now() >= deadline
                    {
                        fired.set(fired.get() + 1);
                    }
                });
            }
            wait_for(|| fired.get() == 1000).await;
            assert_eq!(fired.get(), 1000, "not every deadline fired");
            assert_eq!(pending(), 0);
        })
        .unwrap();
    }

    /// A loop whose deadlines are all gone, fired or cancelled, sets no
    /// timer: it sleeps in the kernel until its IO or a message wakes it.
    #[test]
    fn an_idle_wheel_sets_no_timer() {
        block_on(async {
            assert!(!compio_timer_set());
            let soon = Instant::now() + Duration::from_millis(10);
            assert_eq!(with_deadline(soon, stuck()).await, Err(Elapsed));
            crate::rt::next_turn().await;
            assert_eq!(pending(), 0);
            assert_eq!(timeout(), None, "an idle wheel bounds the loop's wait");
            assert!(!compio_timer_set(), "an idle wheel keeps a timer");
        })
        .unwrap();
    }

    /// A loop that ends with deadlines pending drops them with its tasks;
    /// the next loop on the thread drives the wheel, and its deadlines fire.
    #[test]
    fn the_next_runtime_on_a_thread_drives_its_own_deadlines() {
        block_on(async {
            spawn(async {
                let _ = with_deadline(Instant::now() + Duration::from_secs(60), stuck()).await;
            });
            let soon = Instant::now() + Duration::from_millis(5);
            assert_eq!(with_deadline(soon, stuck()).await, Err(Elapsed));
        })
        .unwrap();
        assert_eq!(pending(), 0, "the ended runtime's deadline is left");
        let fired = block_on(async {
            let soon = Instant::now() + Duration::from_millis(10);
            let guard = Box::pin(compio::time::sleep(Duration::from_secs(10)));
            let d = Box::pin(with_deadline(soon, stuck()));
            matches!(
                futures_util::future::select(d, guard).await,
                futures_util::future::Either::Left((Err(Elapsed), _))
            )
        })
        .unwrap();
        assert!(fired, "a deadline on the second runtime never fired");
    }

    /// A deadline dropped after its thread's wheel is gone (a thread-local
    /// destroyed after the wheel's) does not panic.
    #[test]
    fn a_deadline_outliving_its_wheel_drops_quietly() {
        type Held = Pin<Box<dyn Future<Output = Result<(), Elapsed>>>>;
        thread_local! {
            static HELD: Shared<Option<Held>> = const { Shared::new(None) };
        }
        std::thread::spawn(|| {
            // Thread-locals are destroyed in the reverse order of first
            // use: touched first, HELD outlives the wheel.
            HELD.with(|_| {});
            block_on(async {
                let mut d: Held = Box::pin(with_deadline(
                    Instant::now() + Duration::from_secs(60),
                    stuck(),
                ));
                std::future::poll_fn(|cx| {
                    assert!(d.as_mut().poll(cx).is_pending());
                    Poll::Ready(())
                })
                .await;
                HELD.with(|h| *h.borrow_mut() = Some(d));
            })
            .unwrap();
        })
        .join()
        .expect("the thread panicked");
    }
}
