//! One timer per client connection for all of its deadlines: waiting for a request, for its
//! headers, for a backend's answer, between pieces of a response body.
//!
//! The timer is lazy. Moving a tokio timer takes the runtime's timer lock, so a new deadline
//! only moves it when the deadline is sooner than where it is set; when it fires early it is
//! re-set to the deadline then current. A busy keep-alive connection therefore touches the
//! timer wheel about once per timeout period, not once per request, and a wait that ends at
//! once (the data was there) does not even read the clock.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

pub struct LazyTimer {
    sleep: Pin<Box<Sleep>>,
    /// When `sleep` fires; never later than the deadline being waited for.
    armed: Instant,
}

/// The deadline passed.
#[derive(Debug, Clone, Copy)]
pub struct Elapsed;

impl LazyTimer {
    pub fn new(first: Duration) -> Self {
        let armed = Instant::now() + first;
        LazyTimer { sleep: Box::pin(tokio::time::sleep_until(armed)), armed }
    }

    fn poll_until(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<()> {
        if self.armed > deadline {
            self.arm(deadline);
        }
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if self.armed >= deadline {
                return Poll::Ready(());
            }
            // Fired for an earlier deadline: wait on for this one.
            self.arm(deadline);
        }
    }

    fn arm(&mut self, at: Instant) {
        self.sleep.as_mut().reset(at);
        self.armed = at;
    }

    /// Run `fut` until `deadline()`, which is only called (and the clock only read) if `fut`
    /// does not finish on its first poll.
    pub async fn within<F: Future>(
        &mut self,
        deadline: impl FnOnce() -> Instant,
        fut: F,
    ) -> Result<F::Output, Elapsed> {
        let mut fut = pin!(fut);
        let mut deadline = Some(deadline);
        let mut at = None;
        poll_fn(|cx| {
            if let Poll::Ready(v) = fut.as_mut().poll(cx) {
                return Poll::Ready(Ok(v));
            }
            let until = *at.get_or_insert_with(|| deadline.take().map_or_else(Instant::now, |f| f()));
            self.poll_until(cx, until).map(|()| Err(Elapsed))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn fires_at_the_current_deadline_even_when_armed_earlier() {
        let mut t = LazyTimer::new(Duration::from_secs(1));
        // Armed for 1 s, asked for 3 s: it fires at 1 s internally and re-arms.
        let start = Instant::now();
        let r = t.within(|| start + Duration::from_secs(3), std::future::pending::<()>()).await;
        assert!(r.is_err());
        assert_eq!(Instant::now() - start, Duration::from_secs(3));
        // A sooner deadline moves it.
        let start = Instant::now();
        let r = t.within(|| start + Duration::from_millis(10), std::future::pending::<()>()).await;
        assert!(r.is_err());
        assert_eq!(Instant::now() - start, Duration::from_millis(10));
        // A ready future never reads the deadline.
        let r = t.within(|| unreachable!(), async { 5 }).await;
        assert_eq!(r.ok(), Some(5));
    }
}
