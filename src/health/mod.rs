//! Keeping failing backends out of rotation (issue 3): active checks ([`active`]), the passive
//! circuit breaker fed by live traffic ([`passive`]) and the retry policy ([`retry`]).
//!
//! The state lives on each [`Backend`](crate::upstream::Backend) as atomics in a
//! [`HealthState`], so the request path reads it without a lock and a reload, which carries
//! the `Arc<Backend>` over, keeps it. The rules that change it live here.

pub mod active;
mod grpc;
pub mod passive;
pub mod registry;
pub mod retry;
mod tls;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Health of one backend. Only atomics: written by its checker task and by requests, read by
/// every pick.
#[derive(Debug)]
pub struct HealthState {
    /// What the active checks say; true until they say otherwise (and without checks).
    active_up: AtomicBool,
    /// Consecutive check results against the current state: failures while up, passes while
    /// down. Reset on every transition.
    active_streak: AtomicU32,
    /// Consecutive failures on live traffic.
    failures: AtomicU32,
    /// While ejected: until when, in [`now_ms`] time. 0 means the breaker is closed; a past
    /// value means half-open (one trial request may go).
    ejected_until: AtomicU64,
    /// Ejections in a row, without a successful trial in between; doubles the next ejection.
    ejections: AtomicU32,
    /// A half-open trial request is in flight.
    trial: AtomicBool,
}

impl Default for HealthState {
    fn default() -> Self {
        HealthState {
            active_up: AtomicBool::new(true),
            active_streak: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            trial: AtomicBool::new(false),
        }
    }
}

impl HealthState {
    /// May a new request be sent here? Up by the active checks, and the breaker closed, or
    /// half-open with no trial in flight. Does not claim the trial: see [`passive::admit`].
    pub fn selectable(&self) -> bool {
        if !self.active_up.load(Ordering::Relaxed) {
            return false;
        }
        let until = self.ejected_until.load(Ordering::Relaxed);
        until == 0 || (until <= now_ms() && !self.trial.load(Ordering::Relaxed))
    }

    pub fn is_up(&self) -> bool {
        self.active_up.load(Ordering::Relaxed)
    }

    /// Ejected by the passive detector (possibly half-open).
    pub fn is_ejected(&self) -> bool {
        self.ejected_until.load(Ordering::Relaxed) != 0
    }
}

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Milliseconds since a process-wide epoch, never 0 (0 marks "not ejected").
pub fn now_ms() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// [`now_ms`] of an instant already read (no clock read).
pub fn ms_at(t: Instant) -> u64 {
    t.saturating_duration_since(*EPOCH.get_or_init(Instant::now)).as_millis() as u64 + 1
}

/// A uniform random number in [0, 1) (see [`crate::random`]).
pub fn random_fraction() -> f64 {
    crate::random::fraction()
}

/// `d` shortened by up to `fraction` at random, so that timers set together spread out
/// without ever exceeding the configured value.
pub fn jitter_down(d: Duration, fraction: f64) -> Duration {
    d.mul_f64(1.0 - fraction * random_fraction())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_is_in_range_and_varies() {
        let v: Vec<f64> = (0..1000).map(|_| random_fraction()).collect();
        assert!(v.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        assert!((0.4..0.6).contains(&mean), "{mean}");
        let d = Duration::from_millis(1000);
        for _ in 0..100 {
            let j = jitter_down(d, 0.1);
            assert!(j <= d && j >= Duration::from_millis(900), "{j:?}");
        }
    }

    #[test]
    fn clock_is_never_zero() {
        assert!(now_ms() >= 1);
    }
}
