//! Channels between tasks and between loops.
//!
//! Per-core state is `Rc<RefCell<…>>`; cores talk only over these explicit
//! channels (shutdown, reload, namespace add/remove). futures-channel's
//! primitives wake across threads through compio's waker, so one type serves
//! both uses.

pub use futures_channel::mpsc::{unbounded, UnboundedReceiver, UnboundedSender};
pub use futures_channel::oneshot;

use std::cell::Cell;
use std::rc::Rc;

/// A one-way "stop" signal shared by the tasks of one loop.
#[derive(Clone, Default)]
pub struct StopFlag(Rc<Cell<bool>>);

impl StopFlag {
    /// Raise the flag.
    pub fn stop(&self) {
        self.0.set(true);
    }
    /// Whether the flag is raised.
    pub fn is_stopped(&self) -> bool {
        self.0.get()
    }
}

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
struct EventInner {
    set: Cell<bool>,
    waiters: RefCell<Vec<Waker>>,
}

/// A loop-local event that many tasks can wait on; once set it stays set
/// (e.g. "this loop is draining").
#[derive(Clone, Default)]
pub struct Event(Rc<EventInner>);

impl Event {
    /// Set the event and wake every waiter.
    pub fn set(&self) {
        self.0.set.set(true);
        for w in self.0.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }
    /// Whether the event is set.
    pub fn is_set(&self) -> bool {
        self.0.set.get()
    }
    /// Resolves once the event is set.
    pub fn wait(&self) -> EventWait {
        EventWait(self.clone())
    }
}

/// Future returned by [`Event::wait`].
pub struct EventWait(Event);

impl Future for EventWait {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.is_set() {
            return Poll::Ready(());
        }
        let mut ws = self.0 .0.waiters.borrow_mut();
        if !ws.iter().any(|w| w.will_wake(cx.waker())) {
            ws.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// A loop-local wake-up for a single consumer task (e.g. a connection's
/// writer): `notify` before or during the wait both count.
#[derive(Clone, Default)]
pub struct Notify(Rc<NotifyInner>);

#[derive(Default)]
struct NotifyInner {
    pending: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Notify {
    /// Wake the consumer (or make its next wait return at once).
    pub fn notify(&self) {
        self.0.pending.set(true);
        if let Some(w) = self.0.waker.borrow_mut().take() {
            w.wake();
        }
    }
    /// Wait for the next notification.
    pub fn notified(&self) -> Notified {
        Notified(self.clone())
    }
}

/// Future returned by [`Notify::notified`].
pub struct Notified(Notify);

impl Future for Notified {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let inner = &self.0 .0;
        if inner.pending.replace(false) {
            return Poll::Ready(());
        }
        *inner.waker.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }
}
