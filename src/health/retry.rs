//! Retry policy: which requests may be tried again, how long to wait, and the budget that
//! keeps a sick cluster from being buried in retries.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hyper::Method;

use super::{now_ms, random_fraction};

/// The budget counts requests and retries over this many one-second buckets.
const BUCKETS: usize = 10;
const BUCKET_MS: u64 = 1000;
/// Retries always allowed per window, so that low traffic can still retry at all.
pub const MIN_RETRIES_PER_WINDOW: u64 = 10;

/// Methods that may be sent again after a backend received them (RFC 9110 9.2.2).
pub fn idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE)
}

/// The wait before retry number `retry` (0 for the first): full jitter, uniform in
/// `[0, min(max, base × 2^retry)]`.
pub fn backoff(base: Duration, max: Duration, retry: u32) -> Duration {
    let cap = base.saturating_mul(1u32 << retry.min(30)).min(max);
    cap.mul_f64(random_fraction())
}

/// Retries allowed as a share of recent requests: a sliding window of one-second buckets,
/// per service, in atomics. Counts are approximate at bucket boundaries (a racing increment
/// may land just before a bucket is reset), which a budget can afford.
#[derive(Debug)]
pub struct RetryBudget {
    percent: u64,
    buckets: [Bucket; BUCKETS],
}

#[derive(Debug, Default)]
struct Bucket {
    /// Which second (of [`now_ms`]) the counts are for.
    second: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

impl RetryBudget {
    pub fn new(percent: u32) -> RetryBudget {
        RetryBudget { percent: u64::from(percent), buckets: Default::default() }
    }

    fn current(&self, second: u64) -> &Bucket {
        let b = &self.buckets[(second % BUCKETS as u64) as usize];
        let seen = b.second.load(Ordering::Acquire);
        if seen != second && b.second.compare_exchange(seen, second, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            b.requests.store(0, Ordering::Relaxed);
            b.retries.store(0, Ordering::Relaxed);
        }
        b
    }

    /// Count one client request.
    pub fn record_request(&self) {
        self.record_request_at(now_ms());
    }

    /// Count one client request that arrived at `ms` ([`now_ms`] time, such as
    /// [`super::ms_at`] of the clock read that started it: one clock read per request fewer).
    pub fn record_request_at(&self, ms: u64) {
        self.current(ms / BUCKET_MS).requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Take one retry from the budget, if there is room.
    pub fn try_retry(&self) -> bool {
        let second = now_ms() / BUCKET_MS;
        let (mut requests, mut retries) = (0, 0);
        for b in &self.buckets {
            let s = b.second.load(Ordering::Acquire);
            if s + (BUCKETS as u64) > second {
                requests += b.requests.load(Ordering::Relaxed);
                retries += b.retries.load(Ordering::Relaxed);
            }
        }
        let allowed = (requests * self.percent / 100).max(MIN_RETRIES_PER_WINDOW);
        if retries >= allowed {
            return false;
        }
        self.current(second).retries.fetch_add(1, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_a_share_of_requests_with_a_floor() {
        let budget = RetryBudget::new(20);
        // The floor lets a quiet service retry.
        let granted = (0..100).filter(|_| budget.try_retry()).count() as u64;
        assert_eq!(granted, MIN_RETRIES_PER_WINDOW);
        for _ in 0..1000 {
            budget.record_request();
        }
        let more = (0..1000).filter(|_| budget.try_retry()).count() as u64;
        assert_eq!(granted + more, 200, "20% of 1000 requests");
    }

    #[test]
    fn zero_percent_keeps_only_the_floor() {
        let budget = RetryBudget::new(0);
        for _ in 0..1000 {
            budget.record_request();
        }
        assert_eq!((0..100).filter(|_| budget.try_retry()).count() as u64, MIN_RETRIES_PER_WINDOW);
    }

    #[test]
    fn backoff_is_full_jitter_under_an_exponential_cap() {
        let (base, max) = (Duration::from_millis(25), Duration::from_millis(150));
        for retry in 0..8 {
            let cap = Duration::from_millis((25u64 << retry).min(150));
            let waits: Vec<Duration> = (0..200).map(|_| backoff(base, max, retry)).collect();
            assert!(waits.iter().all(|w| *w <= cap), "retry {retry}: {waits:?}");
            // Full jitter: spread over the whole range, not bunched at the cap.
            assert!(waits.iter().any(|w| *w < cap / 4) && waits.iter().any(|w| *w > cap * 3 / 4));
        }
        assert!(backoff(base, max, 99) <= max);
    }

    #[test]
    fn idempotent_methods() {
        for m in [Method::GET, Method::HEAD, Method::OPTIONS, Method::PUT, Method::DELETE] {
            assert!(idempotent(&m));
        }
        assert!(!idempotent(&Method::POST) && !idempotent(&Method::PATCH));
    }
}
