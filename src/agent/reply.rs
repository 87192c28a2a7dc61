//! A single-threaded oneshot whose allocation is recycled: how a request's
//! answer gets from the task that makes it to the one that waits for it.
//!
//! Two of these are on every request the agent forwards: the answer of the
//! request's own task to its connection's in-order writer
//! ([`super::conn`]), and the API's answer from a pooled connection's
//! reader task to the request ([`super::forward`]). A `futures_channel`
//! oneshot is a fresh `Arc` each (two of the agent's 17 allocations per
//! cache hit, `tests/alloc_counts.rs`); a [`Replies`] list keeps the emptied
//! cells of one loop (or one pool) and hands them out again, so a reply
//! allocates only while the list has not yet grown to the loop's peak of
//! replies in flight.
//!
//! A cell goes back only from the receiving side, once the value was taken
//! and the sender is gone ([`Replies::recycle`]): then nothing else holds
//! it. Any other cell is simply dropped, so a cell still shared is never
//! reused.
//!
//! Rejected: `Rc` cells in the reply's owner indexed by a sequence number
//! (the connection's queue of answers): one mechanism per user, where the
//! two users need the same one.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// The sender went away without sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Canceled;

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
        let done =
            Rc::strong_count(&cell) == 1 && cell.sender_gone.get() && cell.value.borrow().is_none();
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
}
