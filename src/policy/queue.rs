//! The per-service FIFO queue where requests wait when every backend is at `max_connections`.
//!
//! The hot path only reads an atomic (`depth`); the lock is taken by requests that queue and
//! by finishing requests when someone is waiting. A finished request hands its slot to the
//! longest-waiting request (`wake_one`), which then picks a backend again; if another request
//! took the slot first, the woken one goes back to the front, so the order stays first come,
//! first served.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::oneshot;

#[derive(Debug, Default)]
pub struct Queue {
    /// Requests waiting now (live tickets).
    depth: AtomicUsize,
    /// Wake-ups for the waiting requests, longest-waiting first. May hold senders of tickets
    /// that gave up; `wake_one` skips those.
    waiters: Mutex<VecDeque<oneshot::Sender<()>>>,
}

/// Why a request was not queued or left the queue without a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueRejection {
    Full,
    Timeout,
}

impl QueueRejection {
    /// The access log note.
    pub fn note(self) -> &'static str {
        match self {
            QueueRejection::Full => "queue_full",
            QueueRejection::Timeout => "queue_timeout",
        }
    }
}

/// A place in the queue. Dropping it leaves the queue; a wake-up it received but did not use
/// is passed on to the next request.
#[derive(Debug)]
pub struct Ticket {
    queue: Arc<Queue>,
    rx: Option<oneshot::Receiver<()>>,
    /// Woken and not yet back in the queue: the slot it was woken for is its to use or pass on.
    woken: bool,
    used: bool,
}

impl Queue {
    /// Requests waiting now; for metrics.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }

    /// Join the back of the queue, unless `size` requests are waiting already.
    pub fn join(self: &Arc<Self>, size: usize) -> Result<Ticket, QueueRejection> {
        // Reserve a place first so that concurrent joins cannot overshoot `size`.
        let reserved = self.depth.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |d| (d < size).then_some(d + 1));
        if reserved.is_err() {
            return Err(QueueRejection::Full);
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut waiters = self.lock();
            // Tickets that timed out leave their senders behind; sweep them now and then.
            if waiters.len() > 2 * size.max(16) {
                waiters.retain(|w| !w.is_closed());
            }
            waiters.push_back(tx);
        }
        Ok(Ticket { queue: self.clone(), rx: Some(rx), woken: false, used: false })
    }

    /// Capacity was freed: wake the longest-waiting request.
    pub fn wake_one(&self) {
        if self.depth() == 0 {
            return;
        }
        let mut waiters = self.lock();
        while let Some(w) = waiters.pop_front() {
            if w.send(()).is_ok() {
                return;
            }
        }
    }

    /// Wake every waiting request (capacity may have changed, as on a reload).
    pub fn wake_all(&self) {
        let mut waiters = self.lock();
        for w in waiters.drain(..) {
            let _ = w.send(());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<oneshot::Sender<()>>> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Ticket {
    /// Wait until woken or `deadline`.
    pub async fn wait(&mut self, deadline: Instant) -> Result<(), QueueRejection> {
        let Some(rx) = self.rx.as_mut() else { return Ok(()) };
        match tokio::time::timeout_at(deadline.into(), rx).await {
            // A closed channel cannot happen (senders are only dropped after sending or once
            // their ticket is gone); a wake-up either way.
            Ok(_) => {
                self.rx = None;
                self.woken = true;
                Ok(())
            }
            Err(_) => Err(QueueRejection::Timeout),
        }
    }

    /// Woken but the slot was taken by someone else: wait again at the front of the queue.
    /// A ticket that was not woken keeps its place.
    pub fn requeue_front(&mut self) {
        if self.rx.is_some() {
            return;
        }
        let (tx, rx) = oneshot::channel();
        self.queue.lock().push_front(tx);
        self.rx = Some(rx);
        self.woken = false;
    }

    /// The request got a backend: leave the queue without passing a wake-up on.
    pub fn done(mut self) {
        self.used = true;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.queue.depth.fetch_sub(1, Ordering::SeqCst);
        let unused_wakeup = self.woken || self.rx.as_mut().is_some_and(|rx| rx.try_recv().is_ok());
        if unused_wakeup && !self.used {
            self.queue.wake_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn soon(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    #[tokio::test]
    async fn full_queue_rejects() {
        let q = Arc::new(Queue::default());
        let a = q.join(2).unwrap();
        let _b = q.join(2).unwrap();
        assert_eq!(q.join(2).unwrap_err(), QueueRejection::Full);
        assert_eq!(q.depth(), 2);
        drop(a);
        assert_eq!(q.depth(), 1);
        assert!(q.join(2).is_ok());
        assert_eq!(Arc::new(Queue::default()).join(0).unwrap_err(), QueueRejection::Full);
    }

    #[tokio::test]
    async fn wakes_in_arrival_order() {
        let q = Arc::new(Queue::default());
        let mut a = q.join(10).unwrap();
        let mut b = q.join(10).unwrap();
        q.wake_one();
        assert_eq!(a.wait(soon(1000)).await, Ok(()));
        assert_eq!(b.wait(soon(20)).await, Err(QueueRejection::Timeout));
        a.done();
        q.wake_one();
        assert_eq!(b.wait(soon(1000)).await, Ok(()));
        b.done();
        assert_eq!(q.depth(), 0);
    }

    #[tokio::test]
    async fn requeued_waiter_goes_first() {
        let q = Arc::new(Queue::default());
        let mut a = q.join(10).unwrap();
        let mut b = q.join(10).unwrap();
        q.wake_one();
        a.wait(soon(1000)).await.unwrap();
        // Someone else took the slot: `a` waits again, ahead of `b`.
        a.requeue_front();
        q.wake_one();
        assert_eq!(a.wait(soon(1000)).await, Ok(()));
        assert_eq!(b.wait(soon(20)).await, Err(QueueRejection::Timeout));
    }

    #[tokio::test]
    async fn timeout_leaves_and_unused_wakeup_passes_on() {
        let q = Arc::new(Queue::default());
        let mut a = q.join(10).unwrap();
        let mut b = q.join(10).unwrap();
        assert_eq!(a.wait(soon(10)).await, Err(QueueRejection::Timeout));
        drop(a);
        assert_eq!(q.depth(), 1);
        // The timed-out ticket's sender is skipped.
        q.wake_one();
        assert_eq!(b.wait(soon(1000)).await, Ok(()));
        // `b` gives up after being woken: the wake-up goes to `c`.
        let mut c = q.join(10).unwrap();
        drop(b);
        assert_eq!(c.wait(soon(1000)).await, Ok(()));
    }
}
