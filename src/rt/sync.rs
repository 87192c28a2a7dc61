//! Channels between tasks and between loops.
//!
//! Per-core state is `Rc<RefCell<…>>`; cores talk only over these explicit
//! channels (shutdown, reload, namespace add/remove). futures-channel's
//! mpsc wakes across threads through compio's waker, so one type serves
//! both uses. The [`oneshot`] is this loop's own: it carries a request's
//! answer between two tasks of one loop (the proxy's pool, the agent's
//! connections and its API pool), where futures-channel's `Send` oneshot
//! paid for atomics and a lock on every send, poll and drop, and for a new
//! `Arc` each time: its cells are recycled.

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
    //! A oneshot channel between two tasks of one loop, whose cell can be
    //! recycled: how a request's answer gets from the task that makes it to
    //! the one that waits for it (the proxy's pool, the agent's connections
    //! and its API pool), and how the agent's permits and Neutron lookups
    //! are handed over.
    //!
    //! `!Send`: `Cell`s in one `Rc`, no atomics and no lock, where
    //! `futures_channel`'s oneshot paid for both on every send, poll and
    //! drop, and allocated a fresh `Arc` every time. A [`Replies`] list
    //! keeps the emptied cells of one loop (or one pool) and hands them out
    //! again, so a reply allocates only while the list has not yet grown to
    //! the loop's peak of replies in flight; [`channel`] makes a fresh one.
    //! Sending to another thread does not compile; the Nova source's
    //! database thread uses `futures_channel::oneshot`.
    //!
    //! A cell goes back only from the receiving side, once the value was
    //! taken and the sender is gone ([`Replies::recycle`]): then nothing
    //! else holds it. Any other cell is simply dropped, so a cell still
    //! shared is never reused.
    //!
    //! Rejected: `Rc` cells in the reply's owner indexed by a sequence
    //! number (the connection's queue of answers): one mechanism per user,
    //! where the users need the same one.

    use std::cell::{Cell, RefCell};
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

    /// A new channel on a fresh cell, for a sender and receiver no
    /// [`Replies`] list recycles.
    pub fn channel<T>() -> (Sender<T>, Receiver<T>) {
        let cell = Rc::new(Inner::new());
        (Sender(Some(cell.clone())), Receiver(Some(cell)))
    }

    struct Inner<T> {
        value: RefCell<Option<T>>,
        waker: RefCell<Option<Waker>>,
        /// The sender is gone (sent or dropped).
        sender_gone: Cell<bool>,
        /// The receiver is gone.
        receiver_gone: Cell<bool>,
    }

    impl<T> Inner<T> {
        fn new() -> Inner<T> {
            Inner {
                value: RefCell::new(None),
                waker: RefCell::new(None),
                sender_gone: Cell::new(false),
                receiver_gone: Cell::new(false),
            }
        }
    }

    /// The sending half: [`Sender::send`] once, or drop it (the receiver then
    /// gets [`Canceled`]).
    pub struct Sender<T>(Option<Rc<Inner<T>>>);

    /// The receiving half: a future of the value, or [`Canceled`]; poll it by
    /// `&mut` and give it back with [`Replies::recycle`] once it is done.
    pub struct Receiver<T>(Option<Rc<Inner<T>>>);

    /// Emptied cells for reuse, at most `max` (one loop's or one pool's).
    pub struct Replies<T> {
        free: RefCell<Vec<Rc<Inner<T>>>>,
        max: usize,
    }

    impl<T> Replies<T> {
        /// An empty list that keeps at most `max` cells.
        pub fn new(max: usize) -> Replies<T> {
            Replies {
                free: RefCell::new(Vec::new()),
                max,
            }
        }

        /// A new sender and receiver, on a recycled cell when there is one.
        pub fn channel(&self) -> (Sender<T>, Receiver<T>) {
            let cell = self
                .free
                .borrow_mut()
                .pop()
                .unwrap_or_else(|| Rc::new(Inner::new()));
            (Sender(Some(cell.clone())), Receiver(Some(cell)))
        }

        /// Give a receiver's cell back for reuse: kept only when its value was
        /// taken, its sender is gone and nothing else holds it; otherwise just
        /// dropped.
        pub fn recycle(&self, mut rx: Receiver<T>) {
            let Some(cell) = rx.0.take() else { return };
            let done = Rc::strong_count(&cell) == 1
                && cell.sender_gone.get()
                && cell.value.borrow().is_none();
            let mut free = self.free.borrow_mut();
            if done && free.len() < self.max {
                // Reset for the next pair.
                cell.sender_gone.set(false);
                cell.receiver_gone.set(false);
                *cell.waker.borrow_mut() = None;
                free.push(cell);
            } else {
                cell.receiver_gone.set(true);
            }
        }
    }

    impl<T> Sender<T> {
        /// Send the value; `Err(value)` back if the receiver is gone.
        ///
        /// # Errors
        /// The receiver was dropped.
        pub fn send(mut self, value: T) -> Result<(), T> {
            let Some(cell) = self.0.take() else {
                return Err(value);
            };
            cell.sender_gone.set(true);
            if cell.receiver_gone.get() {
                return Err(value);
            }
            *cell.value.borrow_mut() = Some(value);
            let waker = cell.waker.borrow_mut().take();
            drop(cell);
            if let Some(w) = waker {
                w.wake();
            }
            Ok(())
        }
    }

    impl<T> Drop for Sender<T> {
        fn drop(&mut self) {
            if let Some(cell) = self.0.take() {
                cell.sender_gone.set(true);
                let waker = cell.waker.borrow_mut().take();
                drop(cell);
                if let Some(w) = waker {
                    w.wake();
                }
            }
        }
    }

    impl<T> Receiver<T> {
        /// Refuse what has not been sent yet: a later [`Sender::send`] gives its
        /// value back. A value already sent can still be taken with
        /// [`Receiver::try_recv`].
        pub fn close(&mut self) {
            if let Some(cell) = &self.0 {
                cell.receiver_gone.set(true);
            }
        }

        /// The value if it was sent (`Ok(Some)`), not yet (`Ok(None)`), or
        /// never will be (`Err`).
        ///
        /// # Errors
        /// The sender was dropped without sending.
        pub fn try_recv(&mut self) -> Result<Option<T>, Canceled> {
            let Some(cell) = &self.0 else {
                return Err(Canceled);
            };
            if let Some(v) = cell.value.borrow_mut().take() {
                return Ok(Some(v));
            }
            if cell.sender_gone.get() {
                Err(Canceled)
            } else {
                Ok(None)
            }
        }
    }

    impl<T> Future for Receiver<T> {
        type Output = Result<T, Canceled>;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            let this = self.get_mut();
            match this.try_recv() {
                Ok(Some(v)) => Poll::Ready(Ok(v)),
                Err(c) => Poll::Ready(Err(c)),
                Ok(None) => {
                    if let Some(cell) = &this.0 {
                        *cell.waker.borrow_mut() = Some(cx.waker().clone());
                    }
                    Poll::Pending
                }
            }
        }
    }

    impl<T> Drop for Receiver<T> {
        fn drop(&mut self) {
            if let Some(cell) = self.0.take() {
                cell.receiver_gone.set(true);
                // A value sent but never taken goes with the cell.
                drop(cell.value.borrow_mut().take());
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn poll<T>(rx: &mut Receiver<T>) -> Poll<Result<T, Canceled>> {
            let mut cx = Context::from_waker(Waker::noop());
            Pin::new(rx).poll(&mut cx)
        }

        #[test]
        fn a_sent_value_is_received_once_and_the_cell_is_reused() {
            let replies: Replies<u32> = Replies::new(4);
            let (tx, mut rx) = replies.channel();
            assert_eq!(poll(&mut rx), Poll::Pending);
            tx.send(7u32).unwrap();
            assert_eq!(poll(&mut rx), Poll::Ready(Ok(7)));
            let first = Rc::as_ptr(rx.0.as_ref().unwrap());
            replies.recycle(rx);
            let (tx, mut rx) = replies.channel();
            assert_eq!(Rc::as_ptr(rx.0.as_ref().unwrap()), first, "the same cell");
            // Reset: nothing of the last pair is seen.
            assert_eq!(rx.try_recv(), Ok(None));
            tx.send(8).unwrap();
            assert_eq!(rx.try_recv(), Ok(Some(8)));
        }

        #[test]
        fn a_dropped_sender_cancels_and_a_dropped_receiver_refuses() {
            let replies: Replies<u32> = Replies::new(4);
            let (tx, mut rx) = replies.channel();
            drop(tx);
            assert_eq!(poll(&mut rx), Poll::Ready(Err(Canceled)));
            let (tx, rx) = replies.channel();
            drop(rx);
            assert_eq!(tx.send(1u32), Err(1));
        }

        #[test]
        fn a_cell_still_shared_or_holding_a_value_is_not_reused() {
            let replies: Replies<u32> = Replies::new(4);
            // Sender alive: the receiver gives up, the cell is not kept.
            let (tx, rx) = replies.channel();
            replies.recycle(rx);
            assert!(replies.free.borrow().is_empty());
            assert_eq!(tx.send(1), Err(1), "the receiver is gone");
            // A value never taken: not kept either.
            let (tx, rx) = replies.channel();
            tx.send(2).unwrap();
            replies.recycle(rx);
            assert!(replies.free.borrow().is_empty());
            // At most `max` kept.
            let replies: Replies<u32> = Replies::new(1);
            for _ in 0..3 {
                let (tx, mut rx) = replies.channel();
                tx.send(3).unwrap();
                assert_eq!(rx.try_recv(), Ok(Some(3)));
                replies.recycle(rx);
            }
            assert_eq!(replies.free.borrow().len(), 1);
        }

        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        use std::time::Duration;

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

        /// `close` refuses a later send; a value sent before it is still
        /// there to take.
        #[test]
        fn close_refuses_what_is_not_sent_yet() {
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
