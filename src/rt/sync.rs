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
    /// Slab of waiting tasks; a dropped waiter frees its slot, so a
    /// connection that stops waiting (e.g. it got data) leaves nothing behind.
    waiters: RefCell<Vec<Option<Waker>>>,
    free: RefCell<Vec<usize>>,
}

/// A loop-local event that many tasks can wait on; once set it stays set
/// (e.g. "this loop is draining").
#[derive(Clone, Default)]
pub struct Event(Rc<EventInner>);

impl Event {
    /// Set the event and wake every waiter.
    pub fn set(&self) {
        self.0.set.set(true);
        let wakers: Vec<Waker> = self
            .0
            .waiters
            .borrow_mut()
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        for w in wakers {
            w.wake();
        }
    }
    /// Whether the event is set.
    pub fn is_set(&self) -> bool {
        self.0.set.get()
    }
    /// Resolves once the event is set.
    pub fn wait(&self) -> EventWait {
        EventWait {
            event: self.clone(),
            slot: None,
        }
    }
    /// Tasks currently registered as waiting (for leak tests).
    pub fn waiting(&self) -> usize {
        self.0
            .waiters
            .borrow()
            .iter()
            .filter(|w| w.is_some())
            .count()
    }
}

/// Future returned by [`Event::wait`].
pub struct EventWait {
    event: Event,
    slot: Option<usize>,
}

impl Future for EventWait {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.event.is_set() {
            return Poll::Ready(());
        }
        let inner = self.event.0.clone();
        let mut ws = inner.waiters.borrow_mut();
        match self.slot {
            Some(i) => ws[i] = Some(cx.waker().clone()),
            None => {
                let i = match inner.free.borrow_mut().pop() {
                    Some(i) => {
                        ws[i] = Some(cx.waker().clone());
                        i
                    }
                    None => {
                        ws.push(Some(cx.waker().clone()));
                        ws.len() - 1
                    }
                };
                self.slot = Some(i);
            }
        }
        Poll::Pending
    }
}

impl Drop for EventWait {
    fn drop(&mut self) {
        if let Some(i) = self.slot.take() {
            let inner = &self.event.0;
            if let Some(w) = inner.waiters.borrow_mut().get_mut(i) {
                *w = None;
            }
            inner.free.borrow_mut().push(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_waiters_leave_nothing_registered() {
        crate::rt::block_on(async {
            let ev = Event::default();
            for _ in 0..1000 {
                let w = ev.wait();
                futures_util::pin_mut!(w);
                let waker = futures_util::task::noop_waker();
                let mut cx = Context::from_waker(&waker);
                assert!(w.as_mut().poll(&mut cx).is_pending());
                assert_eq!(ev.waiting(), 1);
            }
            assert_eq!(ev.waiting(), 0, "every dropped waiter unregistered");
            assert!(ev.0.waiters.borrow().len() <= 1, "slots are reused");
        })
        .unwrap();
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
