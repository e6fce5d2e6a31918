//! The passive detector: a circuit breaker per backend, fed by the outcome of live requests.
//!
//! Closed → (`consecutive_failures` in a row) → ejected for `base_ejection × 2^(ejections in a
//! row - 1)`, capped at `max_ejection` and shortened by up to 10% at random → half-open: one
//! trial request. Its success closes the breaker and resets the backoff; its failure ejects
//! again for twice as long.

use std::fmt::Display;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::{jitter_down, now_ms};
use crate::config::PassiveConfig;
use crate::observe::BackendMetrics;
use crate::upstream::{Backend, Pool};

/// Whether a picked backend may take the request.
#[derive(Debug)]
pub enum Admission {
    /// Breaker closed.
    Normal,
    /// Half-open, and this request is the trial.
    Trial(TrialGuard),
    /// Ejected again, or another request took the trial meanwhile: pick another backend.
    Refused,
}

/// The claim on a half-open backend's single trial. Dropped without an outcome (the client
/// went away), it releases the claim so the next request becomes the trial.
#[derive(Debug)]
pub struct TrialGuard {
    backend: Arc<Backend>,
    done: bool,
}

impl Drop for TrialGuard {
    fn drop(&mut self) {
        if !self.done {
            self.backend.health.trial.store(false, Ordering::Release);
        }
    }
}

/// Claim a picked backend. The pick's `selectable` test does not claim the trial, so two
/// requests may pick the same half-open backend; the compare-and-swap lets one through.
pub fn admit(backend: &Arc<Backend>) -> Admission {
    let h = &backend.health;
    let until = h.ejected_until.load(Ordering::Acquire);
    if until == 0 {
        return Admission::Normal;
    }
    if until > now_ms() {
        return Admission::Refused;
    }
    match h.trial.compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed) {
        Ok(_) => Admission::Trial(TrialGuard { backend: backend.clone(), done: false }),
        Err(_) => Admission::Refused,
    }
}

/// A request to `backend` succeeded (an answer that is not a counted failure).
pub fn record_success(backend: &Backend, trial: Option<TrialGuard>, service: &str) {
    let h = &backend.health;
    if let Some(mut t) = trial {
        t.done = true;
        h.failures.store(0, Ordering::Relaxed);
        h.ejections.store(0, Ordering::Relaxed);
        h.ejected_until.store(0, Ordering::Release);
        h.trial.store(false, Ordering::Release);
        backend.load.mark_recovered();
        info!(service, backend = %backend.name, from = "half-open", to = "closed", "trial request succeeded, backend back in rotation");
    } else if h.failures.load(Ordering::Relaxed) != 0 {
        // Only written when it changes: a store on every request would bounce the cache line
        // between cores.
        h.failures.store(0, Ordering::Relaxed);
    }
}

/// A request to `backend` failed (connect error or timeout, a reset, or a 5xx when counted).
/// `pool` is the service's pool, to respect `max_ejected_percent`.
pub fn record_failure(
    backend: &Backend,
    trial: Option<TrialGuard>,
    cfg: &PassiveConfig,
    pool: &Pool,
    service: &str,
    reason: &dyn Display,
) {
    let h = &backend.health;
    if let Some(mut t) = trial {
        t.done = true;
        let n = h.ejections.load(Ordering::Relaxed).saturating_add(1);
        let d = ejection_time(cfg, n);
        h.ejections.store(n, Ordering::Relaxed);
        h.ejected_until.store(now_ms() + d.as_millis() as u64, Ordering::Release);
        h.trial.store(false, Ordering::Release);
        BackendMetrics::inc(&backend.metrics.ejections);
        warn!(service, backend = %backend.name, from = "half-open", to = "ejected", reason = %reason, ejection_ms = d.as_millis() as u64, ejections = n, "trial request failed, backend ejected again");
        return;
    }
    if cfg.consecutive_failures == 0 || h.ejected_until.load(Ordering::Acquire) != 0 {
        // Off, or already ejected: a request that was in flight when it happened.
        return;
    }
    let failures = h.failures.fetch_add(1, Ordering::Relaxed).saturating_add(1);
    if failures < cfg.consecutive_failures {
        return;
    }
    // The failure path only, so a scan of the pool is fine.
    let others = pool.backends.iter().filter(|b| !std::ptr::eq(&***b, backend) && b.health.is_ejected()).count();
    if (others + 1) * 100 > cfg.max_ejected_percent as usize * pool.len() {
        if failures == cfg.consecutive_failures {
            warn!(service, backend = %backend.name, reason = %reason, ejected = others, max_ejected_percent = cfg.max_ejected_percent, "backend keeps failing but is not ejected: too much of the pool is ejected already");
        }
        return;
    }
    let n = h.ejections.load(Ordering::Relaxed).saturating_add(1);
    let d = ejection_time(cfg, n);
    let until = now_ms() + d.as_millis() as u64;
    // Concurrent failures race to eject; one wins and logs.
    if h.ejected_until.compare_exchange(0, until, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
        h.ejections.store(n, Ordering::Relaxed);
        h.failures.store(0, Ordering::Relaxed);
        BackendMetrics::inc(&backend.metrics.ejections);
        warn!(service, backend = %backend.name, from = "closed", to = "ejected", reason = %reason, failures, ejection_ms = d.as_millis() as u64, ejections = n, "backend ejected after consecutive failures");
    }
}

/// Forget the passive state: the active checks just saw the backend come back.
pub fn reset(backend: &Backend) {
    let h = &backend.health;
    h.failures.store(0, Ordering::Relaxed);
    h.ejections.store(0, Ordering::Relaxed);
    h.ejected_until.store(0, Ordering::Release);
}

/// How long the `n`th ejection in a row lasts: doubling from the base, capped, with up to 10%
/// taken off at random so that backends ejected together do not come back together.
pub fn ejection_time(cfg: &PassiveConfig, n: u32) -> Duration {
    let doubled = cfg.base_ejection.saturating_mul(1u32 << n.saturating_sub(1).min(30));
    jitter_down(doubled.min(cfg.max_ejection), 0.1).max(Duration::from_millis(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::test_support::pool;

    fn cfg() -> PassiveConfig {
        PassiveConfig {
            consecutive_failures: 3,
            on_5xx: true,
            base_ejection: Duration::from_millis(100),
            max_ejection: Duration::from_millis(350),
            max_ejected_percent: 50,
        }
    }

    fn fail(pool: &Pool, i: usize, times: u32) {
        for _ in 0..times {
            record_failure(&pool.backends[i], None, &cfg(), pool, "t", &"boom");
        }
    }

    #[test]
    fn ejection_time_doubles_and_caps() {
        let c = cfg();
        let within = |d: Duration, ms: u64| d <= Duration::from_millis(ms) && d >= Duration::from_millis(ms * 9 / 10);
        assert!(within(ejection_time(&c, 1), 100));
        assert!(within(ejection_time(&c, 2), 200));
        assert!(within(ejection_time(&c, 3), 350));
        assert!(within(ejection_time(&c, 40), 350));
    }

    #[test]
    fn consecutive_failures_eject_and_success_resets_the_count() {
        let pool = pool(&[1, 1, 1, 1]);
        let b = &pool.backends[0];
        fail(&pool, 0, 2);
        record_success(b, None, "t");
        fail(&pool, 0, 2);
        assert!(b.health.selectable(), "two in a row after a success must not eject");
        fail(&pool, 0, 1);
        assert!(!b.health.selectable());
        assert!(matches!(admit(b), Admission::Refused));
    }

    #[test]
    fn half_open_admits_one_trial_and_doubles_on_failure() {
        let pool = pool(&[1, 1]);
        let b = &pool.backends[0];
        fail(&pool, 0, 3);
        let first = b.health.ejected_until.load(Ordering::Relaxed);
        // Pretend the ejection ran out.
        b.health.ejected_until.store(1, Ordering::Relaxed);
        assert!(b.health.selectable());
        let Admission::Trial(trial) = admit(b) else { panic!("expected the trial") };
        assert!(!b.health.selectable(), "only one trial at a time");
        assert!(matches!(admit(b), Admission::Refused));
        let before = now_ms();
        record_failure(b, Some(trial), &cfg(), &pool, "t", &"still down");
        let second = b.health.ejected_until.load(Ordering::Relaxed) - before;
        assert!((180..=201).contains(&second), "second ejection {second}ms (first ended at {first})");
        assert_eq!(b.health.ejections.load(Ordering::Relaxed), 2);

        b.health.ejected_until.store(1, Ordering::Relaxed);
        let Admission::Trial(trial) = admit(b) else { panic!("expected the trial") };
        record_success(b, Some(trial), "t");
        assert!(b.health.selectable());
        assert!(matches!(admit(b), Admission::Normal));
        assert_eq!(b.health.ejections.load(Ordering::Relaxed), 0, "success resets the backoff");
    }

    #[test]
    fn an_abandoned_trial_is_released() {
        let pool = pool(&[1, 1]);
        let b = &pool.backends[0];
        fail(&pool, 0, 3);
        b.health.ejected_until.store(1, Ordering::Relaxed);
        let Admission::Trial(trial) = admit(b) else { panic!("expected the trial") };
        drop(trial);
        assert!(b.health.selectable());
    }

    #[test]
    fn never_ejects_more_than_the_allowed_share() {
        let pool = pool(&[1, 1, 1, 1]);
        for i in 0..4 {
            fail(&pool, i, 3);
        }
        let ejected = pool.backends.iter().filter(|b| b.health.is_ejected()).count();
        assert_eq!(ejected, 2, "50% of 4");
        let single = crate::balancer::test_support::pool(&[1]);
        fail(&single, 0, 10);
        assert!(single.backends[0].health.selectable(), "the only backend is never ejected at 50%");
    }

    #[test]
    fn disabled_never_ejects() {
        let pool = pool(&[1, 1]);
        let off = PassiveConfig { consecutive_failures: 0, ..cfg() };
        for _ in 0..10 {
            record_failure(&pool.backends[0], None, &off, &pool, "t", &"x");
        }
        assert!(pool.backends[0].health.selectable());
    }
}
