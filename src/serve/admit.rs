//! Admission: how many connections a listener may hold, and what happens at
//! the cap. One mechanism for the three daemons (the proxy's namespace
//! listeners, the agent's Unix socket, the API's TCP listeners).
//!
//! At the cap a listener **stops accepting** until one of its connections
//! closes; it never answers 503 and never drops a connection it accepted.
//! The excess waits in the kernel's listen backlog, as with haproxy's
//! `maxconn`, and cloud-init (which does not retry a 5xx) gets its answer a
//! little later instead of an error. Two caps apply to every accept:
//!
//! - the listener's own [`Gate`]: `proxy.max_connections` per namespace,
//!   `agent.max_connections`, `api.max_connections`;
//! - the process-wide [`fd_budget`] gate, derived from `RLIMIT_NOFILE` (soft
//!   limit raised to the hard one at start, minus a reserve for upstream
//!   sockets, listeners, namespaces, logs), so accept(2) pauses before it
//!   would fail with EMFILE. In `metaproxy up` the three daemons share it,
//!   so guests (the proxy's listeners) may fill only [`guest_share`] of it:
//!   the rest stays for the proxy → agent and agent → API hops that answer
//!   them.
//!
//! A gate's count is the one cross-core value (an atomic): the loops share
//! listeners, and a cap is per namespace or per daemon, not per loop. A
//! place is taken (compare-and-swap below the cap) *before* accept(2) is
//! submitted, as haproxy does, so the cap is exact: an accept is an
//! io_uring operation that stays in flight, and counting only after it
//! returned let every loop's pending accept complete past the cap (and,
//! since a close wakes every paused loop, again after each close). The
//! price: an accept waiting on a quiet listener holds a place, so with
//! several addresses per namespace up to workers × (addresses − 1) places
//! can sit on idle addresses; negligible at the default cap, and the count
//! shown as open connections leaves those accepts out.
//!
//! A paused accept loop waits on the gate's waker list, woken by the close
//! of any connection counted there, on whichever core it closes (compio's
//! wakers are `Send`; the list is a `Mutex` taken only while some loop is
//! paused, never on the hot path). Nothing polls. A close wakes every paused
//! loop of the gate: there are at most workers × listeners of them, and the
//! losers of the race go back to sleep.
//!
//! Each pause episode is logged once: when the first loop pauses, and when
//! the count has fallen to half the cap (hysteresis: at the cap in a storm,
//! every close resumes one accept and the next accept pauses again; one
//! line per close would flood the log).
//!
//! Rejected: answering 503 at the cap (what the proxy did; 80 479 requests
//! of a 10 000-VM storm failed and cloud-init gives up on a 5xx); closing
//! the accepted socket (the guest sees a reset, worse than a 503); a
//! semaphore permit reserved before accept (above); a periodic re-check
//! while paused (needless once wakers cross cores).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::log;
use crate::rt::{self, TcpAcceptor, TcpConn, UnixAcceptor, UnixConn};

/// Back-off after accept(2) fails (EMFILE, ENFILE, ENOMEM): no spinning.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Accept failures are logged at most once per this interval, process-wide:
/// EMFILE hits every listener's accept loop on every core at once, and each
/// retries every [`ACCEPT_BACKOFF`] (unlimited, that was 20 lines a second
/// per listener on two cores; `tests/limits_emfile.rs`).
pub const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// File descriptors always kept out of the [`fd_budget`]: stdio, the log,
/// rings and their eventfds, signalfd, control and metrics sockets, the
/// inventory and password files.
pub const FD_RESERVE_MIN: u64 = 64;
/// Share of `RLIMIT_NOFILE` kept out of the [`fd_budget`] beyond
/// [`FD_RESERVE_MIN`] (1/8): upstream sockets (the proxy's agent pool, the
/// agent's API pool and its Neutron client), every namespace's listener and
/// its dups on each loop, namespace fds during setns.
pub const FD_RESERVE_DIVISOR: u64 = 8;

/// A connection cap shared by every loop serving some listeners (a
/// namespace, the agent's socket, the API's addresses), or by the whole
/// process ([`fd_budget`]).
pub struct Gate {
    /// Names the listeners in logs (`ns qrouter-…`, `agent`, `api`, `process`).
    label: String,
    /// Names the cap in logs (`max_connections`, `fd budget`).
    what: &'static str,
    max: usize,
    /// Places taken: open connections plus accepts in flight.
    taken: AtomicUsize,
    /// Accepts in flight holding a place (left out of [`Gate::open`]).
    accepting: AtomicUsize,
    /// Registered [`Take`] futures (paused accept loops): lets a close skip
    /// the lock when nobody waits.
    waiting: AtomicUsize,
    waiters: Mutex<Waiters>,
    /// Milliseconds since [`epoch`] (plus one, so 0 means none) at which the
    /// current pause episode began.
    paused_since: AtomicU64,
    /// Pauses in the current episode.
    episode_pauses: AtomicU64,
    /// Pauses ever (for `metaproxy ctl status`).
    pauses: AtomicU64,
}

/// Slab of parked accept loops; a dropped [`Take`] frees its slot.
#[derive(Default)]
struct Waiters {
    slots: Vec<Option<Waker>>,
    free: Vec<usize>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("label", &self.label)
            .field("max", &self.max)
            .field("open", &self.open())
            .finish_non_exhaustive()
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl Gate {
    /// A gate admitting `max` connections (at least 1); `label` and `what`
    /// name it in log lines ("`label`: at `what` = `max`, pausing accept").
    pub fn new(label: impl Into<String>, what: &'static str, max: usize) -> Gate {
        Gate {
            label: label.into(),
            what,
            max: max.max(1),
            taken: AtomicUsize::new(0),
            accepting: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            waiters: Mutex::new(Waiters::default()),
            paused_since: AtomicU64::new(0),
            episode_pauses: AtomicU64::new(0),
            pauses: AtomicU64::new(0),
        }
    }

    /// Connections open now (places taken, less accepts in flight).
    pub fn open(&self) -> usize {
        let accepting = self.accepting.load(Ordering::Relaxed);
        self.taken.load(Ordering::Relaxed).saturating_sub(accepting)
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Times an accept loop paused at the cap, since the gate was made.
    pub fn pauses(&self) -> u64 {
        self.pauses.load(Ordering::Relaxed)
    }

    /// The name used in log lines.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Take a place if the count is below the cap.
    fn try_take(&self) -> bool {
        self.try_take_below(self.max)
    }

    /// Take a place if the count is below `limit` (at most the cap).
    fn try_take_below(&self, limit: usize) -> bool {
        let mut n = self.taken.load(Ordering::SeqCst);
        while n < limit {
            match self
                .taken
                .compare_exchange_weak(n, n + 1, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return true,
                Err(now) => n = now,
            }
        }
        false
    }

    /// Resolves once a place is taken below `limit` (the caller then owns
    /// it and must [`release`](Gate::release) it).
    fn take(&self, limit: usize) -> Take<'_> {
        Take {
            gate: self,
            limit,
            slot: None,
        }
    }

    /// Give a place back; wakes paused accept loops.
    fn release(&self) {
        // Invariant (with `Take::poll`): the decrement comes before the
        // `waiting` load here, the registration before the count load
        // there, all SeqCst: either this close sees the waiter, or the
        // waiter sees the lower count. A wake-up is never lost.
        let now = self.taken.fetch_sub(1, Ordering::SeqCst).saturating_sub(1);
        if self.waiting.load(Ordering::SeqCst) > 0 {
            let wakers: Vec<Waker> = self
                .lock()
                .slots
                .iter_mut()
                .filter_map(Option::take)
                .collect();
            wakers.into_iter().for_each(Waker::wake);
        }
        if now <= self.max / 2 && self.paused_since.load(Ordering::Relaxed) != 0 {
            self.end_episode(now);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An accept loop is about to wait for room below `limit`: count it,
    /// and log the start of an episode.
    fn note_pause(&self, limit: usize) {
        self.pauses.fetch_add(1, Ordering::Relaxed);
        self.episode_pauses.fetch_add(1, Ordering::Relaxed);
        let start = now_ms().saturating_add(1);
        if self
            .paused_since
            .compare_exchange(0, start, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            let share = if limit < self.max {
                format!(" ({limit} of it for guests' connections)")
            } else {
                String::new()
            };
            log::warn(format_args!(
                "{}: at {} = {}{share}, pausing accept: new connections wait in the listen \
                 backlog until one closes",
                self.label, self.what, self.max
            ));
        }
    }

    fn end_episode(&self, open: usize) {
        let since = self.paused_since.swap(0, Ordering::AcqRel);
        if since == 0 {
            return;
        }
        let pauses = self.episode_pauses.swap(0, Ordering::Relaxed);
        let took = Duration::from_millis(now_ms().saturating_add(1).saturating_sub(since));
        log::info(format_args!(
            "{}: accepting freely again, {open} open (below half of {} = {}) after {took:?} \
             at the cap; accept paused {pauses} time(s)",
            self.label, self.what, self.max
        ));
    }
}

/// Future returned by [`Gate::take`].
struct Take<'a> {
    gate: &'a Gate,
    limit: usize,
    slot: Option<usize>,
}

impl Future for Take<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let (gate, limit) = (self.gate, self.limit);
        if gate.try_take_below(limit) {
            return Poll::Ready(());
        }
        {
            let mut w = gate.lock();
            match self.slot {
                Some(i) => match &mut w.slots[i] {
                    Some(old) if old.will_wake(cx.waker()) => {}
                    s => *s = Some(cx.waker().clone()),
                },
                None => {
                    let i = match w.free.pop() {
                        Some(i) => {
                            w.slots[i] = Some(cx.waker().clone());
                            i
                        }
                        None => {
                            w.slots.push(Some(cx.waker().clone()));
                            w.slots.len() - 1
                        }
                    };
                    self.slot = Some(i);
                    gate.waiting.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        // Re-check after registering (see `Gate::release`).
        if gate.try_take_below(limit) {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl Drop for Take<'_> {
    fn drop(&mut self) {
        if let Some(i) = self.slot.take() {
            let mut w = self.gate.lock();
            w.slots[i] = None;
            w.free.push(i);
            self.gate.waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The process-wide gate: at most this many accepted connections over all
/// listeners of all daemons in this process, so that accept(2) pauses
/// before it would fail with EMFILE. Made (and logged) on first use: the
/// soft `RLIMIT_NOFILE` is raised to the hard limit, and the budget is that
/// limit minus `max(FD_RESERVE_MIN, limit / FD_RESERVE_DIVISOR)` (at most
/// half of it).
pub fn fd_budget() -> &'static Gate {
    static PROCESS: OnceLock<Gate> = OnceLock::new();
    PROCESS.get_or_init(|| {
        let (before, limit) = raise_nofile();
        let budget = budget_for(limit);
        log::info(format_args!(
            "fd budget: {budget} client connections over all listeners (RLIMIT_NOFILE {limit}{}, \
             {} kept for upstream sockets, listeners, namespaces and logs)",
            if before < limit {
                format!(", soft limit raised from {before}")
            } else {
                String::new()
            },
            limit - budget as u64
        ));
        Gate::new("process", "fd budget", budget)
    })
}

/// The connection budget for an fd limit of `limit` (see [`fd_budget`]).
pub fn budget_for(limit: u64) -> usize {
    let reserve = FD_RESERVE_MIN
        .max(limit / FD_RESERVE_DIVISOR)
        .min(limit / 2);
    usize::try_from(limit - reserve)
        .unwrap_or(usize::MAX)
        .max(1)
}

/// Raise the soft `RLIMIT_NOFILE` to the hard limit; (soft before, soft now).
fn raise_nofile() -> (u64, u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return (1024, 1024);
    };
    if soft < hard {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            log::warn(format_args!(
                "cannot raise RLIMIT_NOFILE from {soft} to {hard}: {e}"
            ));
            return (soft, soft);
        }
        return (soft, hard);
    }
    (soft, soft)
}

/// Where listen(2) caps every backlog, TCP and Unix alike, for the network
/// namespace of the calling thread (the file is per namespace).
const SOMAXCONN: &str = "/proc/sys/net/core/somaxconn";

/// Warn (once per process) when `backlog` exceeds `net.core.somaxconn` in
/// the calling thread's network namespace: listen(2) silently caps it
/// there, and a boot storm then overflows the accept queue (dropped SYNs,
/// 1 s, 3 s, 7 s retransmits) long before a cap pauses accepting. Kernels
/// before 5.4 default to 128, and every new namespace starts from the
/// default, whatever the host's sysctl says. Call it where the listener is
/// bound (inside its namespace).
pub fn check_backlog(label: &str, backlog: i32) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let Some(max) = std::fs::read_to_string(SOMAXCONN)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    else {
        return;
    };
    if backlog > max && !WARNED.swap(true, Ordering::Relaxed) {
        log::warn(format_args!(
            "{label}: backlog = {backlog} is capped at net.core.somaxconn = {max} there: a boot \
             storm can overflow the accept queue (SYN retransmits); raise the sysctl to at least \
             {backlog} (in each namespace; logged once)"
        ));
    }
}

/// The part of the process's fd budget that guests' connections (the
/// proxy's namespace listeners) may use: all but 1/16 (at least 1), which
/// only the internal hops (the agent's socket, the API's listeners) may
/// take. In `metaproxy up` the three daemons share one budget, and a storm
/// of guests must not take the places the proxy → agent and agent → API
/// connections need to answer them (they would wait for the guests, who
/// wait for them, until a timeout).
pub fn guest_share(budget: usize) -> usize {
    budget.saturating_sub((budget / 16).max(1)).max(1)
}

/// One loop's view of a listener's caps: its own gate and the process's.
pub struct Admission {
    gate: std::sync::Arc<Gate>,
    process: &'static Gate,
    /// Places of `process` this listener may fill (see [`guest_share`]).
    process_limit: usize,
}

impl Admission {
    /// Admit an internal hop (the agent's socket, the API's listeners)
    /// through `gate` and the whole process-wide [`fd_budget`].
    pub fn new(gate: std::sync::Arc<Gate>) -> Rc<Admission> {
        let process = fd_budget();
        Self::with_process(gate, process, process.max())
    }

    /// Admit guests (the proxy's namespace listeners) through `gate` and
    /// their [`guest_share`] of the process-wide [`fd_budget`].
    pub fn for_guests(gate: std::sync::Arc<Gate>) -> Rc<Admission> {
        let process = fd_budget();
        Self::with_process(gate, process, guest_share(process.max()))
    }

    /// Admit through `gate` and at most `process_limit` places of `process`
    /// (tests use a process gate of their own).
    pub fn with_process(
        gate: std::sync::Arc<Gate>,
        process: &'static Gate,
        process_limit: usize,
    ) -> Rc<Admission> {
        Rc::new(Admission {
            gate,
            process,
            process_limit: process_limit.min(process.max()),
        })
    }

    /// The listener's own gate.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// Take a place under both gates, waiting (paused: counted and
    /// logged) while either is full.
    pub async fn reserve(self: &Rc<Self>) -> Slot {
        let max = self.gate.max();
        if !self.gate.try_take() {
            self.gate.note_pause(max);
            self.gate.take(max).await;
        }
        // Holding the listener's place while the process is full is fine:
        // any connection's close frees a process place.
        let limit = self.process_limit;
        if !self.process.try_take_below(limit) {
            self.process.note_pause(limit);
            self.process.take(limit).await;
        }
        Slot(self.clone())
    }
}

/// Marks an accept in flight on a place (left out of [`Gate::open`]).
struct Accepting<'a>(&'a Gate);

impl<'a> Accepting<'a> {
    fn new(gate: &'a Gate) -> Self {
        gate.accepting.fetch_add(1, Ordering::Relaxed);
        Accepting(gate)
    }
}

impl Drop for Accepting<'_> {
    fn drop(&mut self) {
        self.0.accepting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A place under both gates: an accept in flight, then the connection it
/// accepted. Dropping it (when the connection's task ends, after its socket
/// closed, or when the accept failed) frees the place and wakes paused
/// accept loops.
pub struct Slot(Rc<Admission>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.gate.release();
        self.0.process.release();
    }
}

/// A listener the accept loop can take connections from.
pub trait Accept {
    /// What one accept yields.
    type Conn;
    /// Accept one connection.
    fn accept(&self) -> impl Future<Output = io::Result<Self::Conn>>;
}

impl Accept for TcpAcceptor {
    type Conn = (TcpConn, SocketAddr);
    fn accept(&self) -> impl Future<Output = io::Result<Self::Conn>> {
        TcpAcceptor::accept(self)
    }
}

impl Accept for UnixAcceptor {
    type Conn = UnixConn;
    fn accept(&self) -> impl Future<Output = io::Result<Self::Conn>> {
        UnixAcceptor::accept(self)
    }
}

/// The accept loop of every daemon: take a place under the caps (waiting
/// while they are full), accept, hand the connection and its [`Slot`] to
/// `serve` (which spawns the connection's task). Accept failures back off [`ACCEPT_BACKOFF`] and are
/// logged through one process-wide throttle. Returns when the listener is
/// shut down (EINVAL); otherwise runs until its task is dropped.
pub async fn accept_loop<A: Accept>(
    acceptor: A,
    admission: Rc<Admission>,
    mut serve: impl FnMut(A::Conn, Slot),
) {
    loop {
        let slot = admission.reserve().await;
        let accepting = Accepting::new(&admission.gate);
        let res = acceptor.accept().await;
        drop(accepting);
        let conn = match res {
            Ok(c) => c,
            // EINVAL: the listener was shut down (namespace removed or stopping).
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return,
            Err(e) => {
                if let Some(n) = ACCEPT_ERRORS.note() {
                    log::warn(format_args!(
                        "{}: accept failed: {e}; retrying every {ACCEPT_BACKOFF:?} ({n} accept \
                         failure(s) on all listeners in the last {ACCEPT_ERROR_LOG_INTERVAL:?}, \
                         one line per interval)",
                        admission.gate.label
                    ));
                }
                drop(slot);
                rt::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        serve(conn, slot);
    }
}

/// Process-wide rate limit for the accept-failure log line (a log throttle,
/// not per-core state, hence the atomics).
struct AcceptErrorLog {
    /// Milliseconds since [`epoch`] before which no line is written.
    next_ms: AtomicU64,
    /// Failures since the last line.
    failures: AtomicU64,
}

static ACCEPT_ERRORS: AcceptErrorLog = AcceptErrorLog {
    next_ms: AtomicU64::new(0),
    failures: AtomicU64::new(0),
};

impl AcceptErrorLog {
    /// Count one failure; `Some(failures since the last line)` when a line
    /// is due now.
    fn note(&self) -> Option<u64> {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let now = now_ms();
        let next = self.next_ms.load(Ordering::Relaxed);
        let interval = u64::try_from(ACCEPT_ERROR_LOG_INTERVAL.as_millis()).unwrap_or(u64::MAX);
        if now < next
            || self
                .next_ms
                .compare_exchange(
                    next,
                    now.saturating_add(interval),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return None;
        }
        Some(self.failures.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        let waker = futures_util::task::noop_waker();
        Pin::new(f).poll(&mut Context::from_waker(&waker))
    }

    #[test]
    fn budget_keeps_a_reserve() {
        assert_eq!(budget_for(20_000), 17_500);
        assert_eq!(budget_for(1_048_576), 917_504);
        assert_eq!(budget_for(1024), 896);
        assert_eq!(budget_for(256), 192);
        assert_eq!(budget_for(100), 50);
        assert_eq!(budget_for(1), 1);
    }

    #[test]
    fn the_cap_is_exact_and_a_dropped_waiter_unregisters() {
        let process: &'static Gate = Box::leak(Box::new(Gate::new("p", "fd budget", 100)));
        let adm =
            Admission::with_process(Arc::new(Gate::new("t", "max_connections", 2)), process, 100);
        let mut r = Box::pin(adm.reserve());
        let Poll::Ready(a) = poll_once(&mut r) else {
            panic!("room for 1")
        };
        let mut r = Box::pin(adm.reserve());
        let Poll::Ready(b) = poll_once(&mut r) else {
            panic!("room for 2")
        };
        assert_eq!((adm.gate().open(), process.open()), (2, 2));
        {
            let mut r = Box::pin(adm.reserve());
            assert!(poll_once(&mut r).is_pending(), "a third waits");
            assert_eq!(adm.gate().waiting.load(Ordering::SeqCst), 1);
        }
        assert_eq!(
            adm.gate().waiting.load(Ordering::SeqCst),
            0,
            "dropped waiter unregistered"
        );
        let mut third = Box::pin(adm.reserve());
        let mut fourth = Box::pin(adm.reserve());
        assert!(poll_once(&mut third).is_pending());
        assert!(poll_once(&mut fourth).is_pending());
        drop(a);
        let Poll::Ready(c) = poll_once(&mut third) else {
            panic!("one close admits one")
        };
        assert!(poll_once(&mut fourth).is_pending(), "and only one");
        assert_eq!(adm.gate().open(), 2);
        drop(b);
        let Poll::Ready(d) = poll_once(&mut fourth) else {
            panic!("the next close the next")
        };
        assert_eq!(adm.gate().pauses(), 3);
        drop((c, d));
        assert_eq!((adm.gate().open(), process.open()), (0, 0));
    }

    #[test]
    fn guests_leave_room_for_the_internal_hops() {
        assert_eq!(guest_share(17_500), 16_407);
        assert_eq!(guest_share(192), 180);
        assert_eq!(guest_share(1), 1);
        let process: &'static Gate = Box::leak(Box::new(Gate::new("p", "fd budget", 16)));
        let guests = Admission::with_process(
            Arc::new(Gate::new("g", "max_connections", 100)),
            process,
            15,
        );
        let agent = Admission::with_process(
            Arc::new(Gate::new("a", "max_connections", 100)),
            process,
            16,
        );
        let held: Vec<Slot> = (0..15)
            .map(|_| match poll_once(&mut Box::pin(guests.reserve())) {
                Poll::Ready(s) => s,
                Poll::Pending => panic!("room for 15 guests"),
            })
            .collect();
        assert!(
            poll_once(&mut Box::pin(guests.reserve())).is_pending(),
            "the 16th guest waits"
        );
        assert!(
            poll_once(&mut Box::pin(agent.reserve())).is_ready(),
            "the agent's hop does not"
        );
        drop(held);
    }

    #[test]
    fn an_accept_in_flight_is_not_an_open_connection() {
        let gate = Gate::new("t", "max_connections", 4);
        assert!(gate.try_take());
        let a = Accepting::new(&gate);
        assert_eq!(gate.open(), 0);
        drop(a);
        assert_eq!(gate.open(), 1);
    }

    #[test]
    fn a_close_on_another_thread_wakes_a_paused_loop() {
        let gate = Arc::new(Gate::new("t", "max_connections", 1));
        assert!(gate.try_take());
        let g2 = gate.clone();
        let closer = std::thread::spawn(move || {
            // Wait until the loop below is parked, then close from here.
            let t0 = Instant::now();
            while g2.waiting.load(Ordering::SeqCst) == 0 {
                assert!(t0.elapsed() < Duration::from_secs(10), "never parked");
                std::thread::yield_now();
            }
            g2.release();
        });
        crate::rt::block_on(async {
            gate.note_pause(1);
            gate.take(1).await;
        })
        .unwrap();
        closer.join().unwrap();
        assert_eq!(gate.open(), 1, "the woken loop holds the place");
        assert_eq!(gate.pauses(), 1);
    }

    #[test]
    fn an_episode_ends_at_half_the_cap() {
        let gate = Gate::new("t", "max_connections", 4);
        (0..4).for_each(|_| assert!(gate.try_take()));
        gate.note_pause(4);
        gate.note_pause(4);
        assert_ne!(gate.paused_since.load(Ordering::Relaxed), 0);
        gate.release();
        assert!(gate.try_take());
        gate.release();
        assert_ne!(
            gate.paused_since.load(Ordering::Relaxed),
            0,
            "3 open: still at it"
        );
        gate.release();
        assert_eq!(gate.paused_since.load(Ordering::Relaxed), 0, "2 open: over");
        assert_eq!(gate.pauses(), 2);
    }
}
