//! The runtime seam: the only module that names the io_uring runtime (compio)
//! and the only one allowed `unsafe`.
//!
//! Everything above this module sees owned-buffer streams ([`TcpConn`],
//! [`UnixConn`]), a task spawner, deadlines that really cancel IO
//! ([`with_deadline`]), listeners created with socket2 so that the backlog and
//! socket options are ours ([`listen_tcp`], [`listen_unix`]), and per-core
//! loops ([`run_loops`]; a daemon's main future, which mostly waits, runs
//! under [`when_woken`]). The loop is compio's, written out here so that it
//! also drives the deadlines' timer wheel (`wheel.rs`). If profiling ever shows compio itself as the cost,
//! the hot path can move to the raw `io-uring` crate behind these same names
//! without touching `http`, `proxy` or `agent`.
//!
//! Why compio, and why these setup flags: see `docs/adr/0001-runtime.md`.
//! COOP_TASKRUN + TASKRUN_FLAG + SINGLE_ISSUER + DEFER_TASKRUN are safe here
//! because each ring is used by exactly one thread (thread-per-core).

pub mod netns;
mod random;
mod sock;
pub mod sync;
mod wheel;

pub use random::{fill_random, RESEED_AFTER_BYTES};
pub use sock::{
    listen_tcp, listen_tcp_retrying, listen_unix, peer_ip, set_ip_ttl, shutdown_listener,
    PendingInput, Stream, TcpAcceptor, TcpConn, UnixAcceptor, UnixConn, BIND_RETRY_EVERY,
    BIND_RETRY_FOR,
};
pub use wheel::TICK as DEADLINE_TICK;

use std::future::Future;
use std::io;
use std::time::{Duration, Instant};

/// Submission queue entries per ring.
pub const RING_ENTRIES: u32 = 4096;
/// Provided buffers in each loop's buffer ring (used for reads on idle connections).
pub const RING_BUFFERS: u16 = 256;
/// Size of each provided buffer: one typical request head fits.
pub const RING_BUFFER_BYTES: usize = 4096;

/// A deadline expired; the IO it guarded was cancelled and its buffer released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("deadline expired")]
pub struct Elapsed;

/// Which completion engine a loop got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// io_uring with the setup flags above.
    IoUring,
    /// epoll fallback (io_uring blocked, e.g. by a seccomp profile).
    Poll,
}

fn build_runtime() -> io::Result<compio::runtime::Runtime> {
    let mut proactor = compio::driver::ProactorBuilder::new();
    proactor
        .capacity(RING_ENTRIES)
        .coop_taskrun(true)
        .taskrun_flag(true)
        .single_issuer(true)
        .defer_taskrun(true)
        .buffer_pool_size(std::num::NonZeroU16::new(RING_BUFFERS).expect("non-zero"))
        .buffer_pool_buffer_len(RING_BUFFER_BYTES)
        .thread_pool_limit(2);
    compio::runtime::RuntimeBuilder::new()
        .with_proactor(proactor)
        .build()
}

/// The engine the current loop runs on.
pub fn engine() -> Engine {
    compio::runtime::Runtime::with_current(|rt| match rt.driver_type() {
        compio::driver::DriverType::IoUring => Engine::IoUring,
        _ => Engine::Poll,
    })
}

/// Run `future` to completion on a fresh single-threaded loop in this thread.
///
/// # Errors
/// The ring (and its epoll fallback) could not be created.
pub fn block_on<F: Future>(future: F) -> io::Result<F::Output> {
    Ok(drive(build_runtime()?, future))
}

/// Run `future` on `rt` to completion: compio's own `block_on` loop (poll
/// the future, run the tasks it woke, wait in the kernel for IO), with this
/// thread's deadlines ([`wheel`]) driven by the loop itself. The wait is cut
/// to the wheel's next slot, and after it the wheel fires what is due, as
/// compio fires its own timers after reaping the ring. So a deadline costs
/// no compio timer and no task, and a busy loop with deadlines pending pays
/// no timer-map work per turn (see [`wheel`]).
///
/// A panic in `future` drops the runtime, and every task on it, only once
/// the unwind has been caught, as compio's `block_on` does.
fn drive<F: Future>(rt: compio::runtime::Runtime, future: F) -> F::Output {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.enter(|| {
            let waker = rt.waker();
            let mut cx = std::task::Context::from_waker(&waker);
            let mut future = std::pin::pin!(future);
            loop {
                if let std::task::Poll::Ready(v) = future.as_mut().poll(&mut cx) {
                    rt.run();
                    return v;
                }
                let wait = if rt.run() {
                    // Tasks are still queued: reap what has completed, do
                    // not wait.
                    Some(Duration::ZERO)
                } else {
                    match (rt.current_timeout(), wheel::timeout()) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    }
                };
                rt.poll_with(wait);
                wheel::expire();
            }
        })
    }));
    match result {
        Ok(v) => v,
        Err(panic) => {
            drop(rt);
            std::panic::resume_unwind(panic)
        }
    }
}

/// `fut`, polled only when it was woken, for the main future of a loop
/// that mostly waits while its spawned tasks serve (a daemon's control
/// channel, then its drain). compio's `block_on` polls the future it runs
/// on every turn of the loop, woken or not: for the daemons' main futures
/// that cost every turn a few hundred instructions (the control channel's
/// `next_message` alone: 470 per request in the proxy's callgrind profile).
/// Not for a future that does the loop's IO itself: each of its wakes also
/// wakes the loop's own waker (so that a wake from another thread ends the
/// loop's wait in the kernel), which is a notification, a syscall.
pub fn when_woken<F: Future>(fut: F) -> impl Future<Output = F::Output> {
    WhenWoken { fut, main: None }
}

pin_project_lite::pin_project! {
    /// Future returned by [`when_woken`]. The waker handed down sets a
    /// flag and wakes the loop's own waker.
    struct WhenWoken<F> {
        #[pin]
        fut: F,
        // Made at the first poll: the flag, and the waker over it.
        main: Option<(std::sync::Arc<MainWaker>, std::task::Waker)>,
    }
}

/// The waker of a [`WhenWoken`] future: marks it woken, then wakes the loop.
struct MainWaker {
    woken: std::sync::atomic::AtomicBool,
    runtime: std::task::Waker,
}

impl std::task::Wake for MainWaker {
    fn wake(self: std::sync::Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &std::sync::Arc<Self>) {
        self.woken.store(true, std::sync::atomic::Ordering::Release);
        self.runtime.wake_by_ref();
    }
}

impl<F: Future> Future for WhenWoken<F> {
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let this = self.project();
        let (main, waker) = this.main.get_or_insert_with(|| {
            let main = std::sync::Arc::new(MainWaker {
                // The first poll runs it.
                woken: std::sync::atomic::AtomicBool::new(true),
                runtime: cx.waker().clone(),
            });
            (main.clone(), std::task::Waker::from(main))
        });
        if !main.woken.swap(false, std::sync::atomic::Ordering::AcqRel) {
            return std::task::Poll::Pending;
        }
        this.fut.poll(&mut std::task::Context::from_waker(waker))
    }
}

/// Pin the calling thread to `cpu` (modulo the CPUs this process may use).
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
    use nix::unistd::Pid;
    let allowed = sched_getaffinity(Pid::from_raw(0)).map_err(io::Error::from)?;
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|c| allowed.is_set(*c).unwrap_or(false))
        .collect();
    if cpus.is_empty() {
        return Ok(());
    }
    let mut set = CpuSet::new();
    set.set(cpus[cpu % cpus.len()]).map_err(io::Error::from)?;
    sched_setaffinity(Pid::from_raw(0), &set).map_err(io::Error::from)
}

/// Number of CPUs this process may run on (the default worker count).
pub fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Start `n` loops, each on its own thread pinned to its own core, each running
/// `make(index)` to completion. Returns the join handles.
///
/// # Errors
/// A thread could not be spawned.
pub fn run_loops<F, Fut>(
    n: usize,
    name: &str,
    make: F,
) -> io::Result<Vec<std::thread::JoinHandle<io::Result<()>>>>
where
    F: Fn(usize) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = io::Result<()>> + 'static,
{
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let make = make.clone();
        let h = std::thread::Builder::new()
            .name(format!("{name}-{i}"))
            .spawn(move || {
                if let Err(e) = pin_to_cpu(i) {
                    crate::log::warn(format_args!("loop {i}: cannot pin to a core: {e}"));
                }
                drive(build_runtime()?, make(i))
            })?;
        handles.push(h);
    }
    Ok(handles)
}

/// Spawn a task on the current loop. It runs detached; it is dropped (and its
/// IO cancelled) when the loop ends.
pub fn spawn<F: Future<Output = ()> + 'static>(future: F) {
    compio::runtime::spawn(future).detach();
}

/// Spawn a task and keep a handle; dropping the handle cancels the task.
pub fn spawn_handle<F: Future + 'static>(future: F) -> Task<F::Output> {
    Task(compio::runtime::spawn(future))
}

/// A spawned task; dropping it cancels the task and its in-flight IO.
pub struct Task<T>(compio::runtime::JoinHandle<T>);

impl<T> Task<T> {
    /// Wait for the task's result (`None` if it panicked or was cancelled).
    pub async fn join(self) -> Option<T> {
        self.0.await.ok()
    }
    /// Let the task run on without a handle.
    pub fn detach(self) {
        self.0.detach();
    }
}

/// Sleep on the current loop.
pub async fn sleep(d: Duration) {
    compio::time::sleep(d).await;
}

/// Resume after the loop has polled its ring once: every completion that
/// had arrived by then has been reaped, and the tasks it woke were queued
/// ahead of this one, so they run first. A task that judges a peer by
/// state its other tasks update (the proxy's pool deciding that the agent
/// is stalled) uses it to make sure it is not looking at its own lateness.
/// It is a timer [`NEXT_TURN_AFTER`] ahead, because compio wakes timers
/// right after it reaps the ring, in the same poll.
pub async fn next_turn() {
    compio::time::sleep(NEXT_TURN_AFTER).await;
}

/// How far ahead [`next_turn`]'s timer is set: far enough to be still in
/// the future when it is registered (a timer already due would not wait
/// for the poll at all), short next to the connect it usually precedes.
pub const NEXT_TURN_AFTER: Duration = Duration::from_micros(100);

/// Run `fut` until `deadline`. On expiry the future is dropped, which cancels
/// its in-flight io_uring operations (compio submits ASYNC_CANCEL and keeps the
/// buffer until the kernel completes the cancellation), so an expired read
/// can never swallow the peer's next bytes. This is the one deadline helper.
///
/// The deadline is an entry on the loop's timer wheel (`rt/wheel.rs`), made only
/// if `fut` is still pending at its first poll and given back when the
/// returned future is dropped: no clock read and no compio timer per
/// deadline. It fires at the first [`DEADLINE_TICK`] boundary at or after
/// `deadline`, never before it.
///
/// It is a plain struct rather than compio's `timeout_at` because that is an
/// `async fn` over `select!`, which stores the inner future twice: for an idle
/// connection's read that tripled the per-connection memory (528 → 2 328
/// bytes). This one costs the inner future plus 16 bytes.
///
/// # Errors
/// [`Elapsed`] when the deadline passed first.
pub fn with_deadline<F: Future>(deadline: Instant, fut: F) -> Deadline<F> {
    Deadline {
        fut,
        timer: wheel::Timer::new(deadline),
    }
}

pin_project_lite::pin_project! {
    /// Future returned by [`with_deadline`].
    pub struct Deadline<F> {
        #[pin]
        fut: F,
        // Polled after `fut`, so a future that is ready at once never
        // touches the wheel.
        timer: wheel::Timer,
    }
}

impl<F: Future> Future for Deadline<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.project();
        if let std::task::Poll::Ready(v) = this.fut.poll(cx) {
            return std::task::Poll::Ready(Ok(v));
        }
        match this.timer.poll(cx) {
            std::task::Poll::Ready(()) => std::task::Poll::Ready(Err(Elapsed)),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;
    use std::task::{Poll, Waker};
    use std::time::Duration;

    use futures_util::StreamExt;

    use super::*;

    /// A loop whose tasks run 50 turns while its main future waits: the
    /// main future is polled when it starts and when it is woken, not on
    /// every turn.
    #[test]
    fn a_main_future_is_polled_only_when_woken() {
        let polls = Rc::new(Cell::new(0));
        let p = polls.clone();
        block_on(when_woken(async move {
            let done = Rc::new(Cell::new(false));
            let waiter: Rc<Cell<Option<Waker>>> = Rc::default();
            let (d, w) = (done.clone(), waiter.clone());
            spawn(async move {
                for _ in 0..50 {
                    sleep(Duration::from_millis(1)).await;
                }
                d.set(true);
                if let Some(w) = w.take() {
                    w.wake();
                }
            });
            std::future::poll_fn(|cx| {
                p.set(p.get() + 1);
                if done.get() {
                    return Poll::Ready(());
                }
                waiter.set(Some(cx.waker().clone()));
                Poll::Pending
            })
            .await;
        }))
        .unwrap();
        assert_eq!(polls.get(), 2, "polled at the start and once woken");
    }

    /// A wake from another thread (a control message) ends the wait of a
    /// loop that has nothing else to do.
    #[test]
    fn a_main_future_woken_from_another_thread_runs() {
        let (tx, mut rx) = sync::unbounded::<u32>();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            tx.unbounded_send(7).unwrap();
        });
        // The timer is polled first: it wins only if the loop slept through
        // the message (until the timer's expiry woke it).
        let timer = Box::pin(sleep(Duration::from_secs(10)));
        let got = block_on(when_woken(async {
            match futures_util::future::select(timer, rx.next()).await {
                futures_util::future::Either::Left(_) => None,
                futures_util::future::Either::Right((got, _)) => got,
            }
        }))
        .unwrap();
        sender.join().unwrap();
        assert_eq!(got, Some(7), "the loop slept through the wake");
    }
}
