//! Channels between tasks and between loops.
//!
//! Per-core state is `Rc<RefCell<…>>`; cores talk only over these explicit
//! channels (shutdown, reload, namespace add/remove). futures-channel's
//! mpsc wakes across threads through compio's waker, so one type serves
//! both uses. The [`oneshot`] is this loop's own: it carries a request's
//! answer between two tasks of one loop (the proxy's pool, the agent's
//! connections and its API pool), where futures-channel's `Send` oneshot
//! paid for atomics and a lock on every send, poll and drop.

pub use futures_channel::mpsc::{unbounded, UnboundedReceiver, UnboundedSender};

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

pub mod oneshot {
    //! A oneshot channel between two tasks of one loop.
    //!
    //! The same surface as `futures_channel::oneshot` as far as we use it
    //! (`channel`, `Sender::send`, `Receiver` as a future, `close`,
    //! `try_recv`), but `!Send`: a `Cell` per field in one `Rc`, no atomics,
    //! no lock. Sending to another thread does not compile; use
    //! `futures_channel::oneshot` there (the Nova source's database thread
    //! does).

    use std::cell::Cell;
    use std::fmt;
    use std::future::Future;
    use std::pin::Pin;
    use std::rc::Rc;
    use std::task::{Context, Poll, Waker};

    /// The sender went away without sending.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Canceled;

    impl fmt::Display for Canceled {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("oneshot canceled")
        }
    }

    impl std::error::Error for Canceled {}

    struct Inner<T> {
        value: Cell<Option<T>>,
        /// The receiver's waker, set while it waits.
        waker: Cell<Option<Waker>>,
        /// The sender has sent or gone.
        sender_done: Cell<bool>,
        /// The receiver was closed or dropped: a send gives its value back.
        receiver_closed: Cell<bool>,
    }

    /// The sending half: one value, once.
    pub struct Sender<T>(Rc<Inner<T>>);

    /// The receiving half: a future of the value, or [`Canceled`] when the
    /// sender went away without sending.
    pub struct Receiver<T>(Rc<Inner<T>>);

    /// A new channel.
    pub fn channel<T>() -> (Sender<T>, Receiver<T>) {
        let inner = Rc::new(Inner {
            value: Cell::new(None),
            waker: Cell::new(None),
            sender_done: Cell::new(false),
            receiver_closed: Cell::new(false),
        });
        (Sender(inner.clone()), Receiver(inner))
    }

    impl<T> Sender<T> {
        /// Send `value`; it comes back as the error when the receiver was
        /// closed or dropped.
        pub fn send(self, value: T) -> Result<(), T> {
            if self.0.receiver_closed.get() {
                return Err(value);
            }
            self.0.value.set(Some(value));
            Ok(())
            // Drop marks the sender done and wakes the receiver.
        }

        /// Whether the receiver was closed or dropped.
        pub fn is_canceled(&self) -> bool {
            self.0.receiver_closed.get()
        }
    }

    impl<T> Drop for Sender<T> {
        fn drop(&mut self) {
            self.0.sender_done.set(true);
            if let Some(w) = self.0.waker.take() {
                w.wake();
            }
        }
    }

    impl<T> Receiver<T> {
        /// Refuse what has not been sent yet; a value already sent can
        /// still be taken with [`Receiver::try_recv`].
        pub fn close(&mut self) {
            self.0.receiver_closed.set(true);
        }

        /// The value if it was sent (`Ok(Some)`), `Ok(None)` while the
        /// sender may still send, [`Canceled`] when it went away without.
        pub fn try_recv(&mut self) -> Result<Option<T>, Canceled> {
            if let Some(v) = self.0.value.take() {
                return Ok(Some(v));
            }
            if self.0.sender_done.get() {
                Err(Canceled)
            } else {
                Ok(None)
            }
        }
    }

    impl<T> Future for Receiver<T> {
        type Output = Result<T, Canceled>;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            let inner = &self.0;
            if let Some(v) = inner.value.take() {
                return Poll::Ready(Ok(v));
            }
            if inner.sender_done.get() {
                return Poll::Ready(Err(Canceled));
            }
            let w = match inner.waker.take() {
                Some(w) if w.will_wake(cx.waker()) => w,
                _ => cx.waker().clone(),
            };
            inner.waker.set(Some(w));
            Poll::Pending
        }
    }

    impl<T> Drop for Receiver<T> {
        fn drop(&mut self) {
            self.0.receiver_closed.set(true);
            // A value sent and never taken drops with the last `Rc`.
            drop(self.0.waker.take());
        }
    }

    #[cfg(test)]
    mod tests {
        use std::cell::Cell;
        use std::rc::Rc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        use std::time::Duration;

        use super::*;
        use crate::rt;

        /// A waker that counts its wakes.
        struct Wakes(AtomicUsize);
        impl std::task::Wake for Wakes {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }

        /// Poll `rx` once with a counting waker.
        fn poll_once<T>(rx: &mut Receiver<T>, wakes: &Arc<Wakes>) -> Poll<Result<T, Canceled>> {
            let waker = Waker::from(wakes.clone());
            Pin::new(rx).poll(&mut Context::from_waker(&waker))
        }

        /// A waiting receiver is woken once by the send and then has the
        /// value; a sender dropped without sending wakes it with
        /// `Canceled`, so it never waits for ever.
        #[test]
        fn a_send_or_a_dropped_sender_wakes_the_waiting_receiver() {
            let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
            let (tx, mut rx) = channel();
            assert!(poll_once(&mut rx, &wakes).is_pending());
            assert!(poll_once(&mut rx, &wakes).is_pending());
            assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
            assert_eq!(tx.send(42u32), Ok(()));
            assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
            assert_eq!(poll_once(&mut rx, &wakes), Poll::Ready(Ok(42)));

            let (tx, mut rx) = channel::<u32>();
            assert!(poll_once(&mut rx, &wakes).is_pending());
            drop(tx);
            assert_eq!(wakes.0.load(Ordering::SeqCst), 2);
            assert_eq!(poll_once(&mut rx, &wakes), Poll::Ready(Err(Canceled)));
        }

        /// On the loop: a value sent from another task reaches the receiver
        /// awaiting it.
        #[test]
        fn a_value_sent_from_another_task_reaches_the_receiver() {
            let got = rt::block_on(async {
                let (tx, rx) = channel();
                rt::spawn(async move {
                    rt::sleep(Duration::from_millis(5)).await;
                    let _ = tx.send(42u32);
                });
                rx.await
            });
            assert_eq!(got.unwrap(), Ok(42));
        }

        /// Sending to a dropped or closed receiver gives the value back (and
        /// drops nothing that was not the sender's); after `close`, a value
        /// sent before it is still there to take.
        #[test]
        fn a_closed_or_dropped_receiver_refuses_and_keeps_what_was_sent() {
            let (tx, rx) = channel();
            assert!(!tx.is_canceled());
            drop(rx);
            assert!(tx.is_canceled());
            assert_eq!(tx.send(1u32), Err(1));

            let (tx, mut rx) = channel();
            rx.close();
            assert_eq!(tx.send(2u32), Err(2));
            assert_eq!(rx.try_recv(), Err(Canceled));

            let (tx, mut rx) = channel();
            assert_eq!(rx.try_recv(), Ok(None));
            assert_eq!(tx.send(3u32), Ok(()));
            rx.close();
            assert_eq!(rx.try_recv(), Ok(Some(3)));
        }

        /// A value sent but never received is dropped with the channel.
        #[test]
        fn an_unreceived_value_is_dropped() {
            struct Counted(Rc<Cell<u32>>);
            impl Drop for Counted {
                fn drop(&mut self) {
                    self.0.set(self.0.get() + 1);
                }
            }
            let drops = Rc::new(Cell::new(0));
            let (tx, rx) = channel();
            assert!(tx.send(Counted(drops.clone())).is_ok());
            assert_eq!(drops.get(), 0);
            drop(rx);
            assert_eq!(drops.get(), 1);
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
