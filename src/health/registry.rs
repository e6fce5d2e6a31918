//! The health checkers, one per backend, keyed by backend identity. The registry outlives
//! every snapshot: a rebuild keeps a backend's checker running (the same backend, the same
//! check), restarts it when its check changed, and stops it when the backend or its check is
//! gone. Two bugs of checkers owned by a `Service` are fixed by that: a reload no longer leaves
//! the old service's checkers running beside the new ones while old requests hold the old
//! service (both counted every result, halving the thresholds), and a reload that removes
//! `health_check` marks the backends up again instead of leaving a down one down for good.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::task::AbortHandle;
use tracing::info;

use super::HealthState;
use crate::config::HealthCheckConfig;
use crate::upstream::Backend;

/// One service's part of the desired checks.
pub struct Wanted<'a> {
    pub service: &'a str,
    pub check: Option<&'a HealthCheckConfig>,
    pub backends: &'a [Arc<Backend>],
}

struct Running {
    service: String,
    check: HealthCheckConfig,
    backend: Arc<Backend>,
    task: AbortHandle,
}

#[derive(Default)]
pub struct Checkers {
    running: HashMap<u64, Running>,
}

impl Checkers {
    /// Make the running checkers match `wanted`.
    pub fn sync(&mut self, wanted: &[Wanted<'_>]) {
        let mut want: HashMap<u64, (&str, Option<&HealthCheckConfig>)> = HashMap::new();
        for w in wanted {
            for b in w.backends {
                want.insert(b.id, (w.service, w.check));
            }
        }
        self.running.retain(|id, r| {
            let keep = matches!(want.get(id), Some((service, Some(check))) if *service == r.service && **check == r.check);
            if !keep {
                r.task.abort();
                if let Some((service, None)) = want.get(id) {
                    // The backend stays but is no longer checked: what the checks said no
                    // longer holds, and without them nothing would ever bring it back.
                    if !r.backend.health.is_up() {
                        info!(service = %service, backend = %r.backend.name, "backend is up: its health check was removed");
                    }
                    forget_checks(&r.backend.health);
                }
            }
            keep
        });
        for w in wanted {
            let Some(check) = w.check else { continue };
            let new: Vec<Arc<Backend>> =
                w.backends.iter().filter(|b| !self.running.contains_key(&b.id)).cloned().collect();
            if new.is_empty() {
                continue;
            }
            let tasks = super::active::start(w.service, check, &new);
            for (backend, task) in new.into_iter().zip(tasks) {
                let running = Running { service: w.service.to_owned(), check: check.clone(), backend, task };
                self.running.insert(running.backend.id, running);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.running.len()
    }

    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }
}

impl Drop for Checkers {
    fn drop(&mut self) {
        for r in self.running.values() {
            r.task.abort();
        }
    }
}

/// Up, with no streak: as a backend that was never checked.
fn forget_checks(h: &HealthState) {
    h.active_streak.store(0, Ordering::Relaxed);
    h.active_up.store(true, Ordering::Relaxed);
}

/// A backend added at run time to a checked service: down until its first check passes, so
/// that no request goes to a backend nobody has seen answer.
pub fn await_first_pass(h: &HealthState, healthy_threshold: u32) {
    h.active_up.store(false, Ordering::Relaxed);
    h.active_streak.store(healthy_threshold.saturating_sub(1), Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::active::{record, Transition};

    #[test]
    fn a_new_backend_comes_up_on_its_first_pass() {
        let h = HealthState::default();
        await_first_pass(&h, 3);
        assert!(!h.is_up());
        assert_eq!(record(&h, true, 3, 2), Some(Transition::Up));
        // A failure first: the usual threshold applies from then on.
        let h = HealthState::default();
        await_first_pass(&h, 2);
        assert_eq!(record(&h, false, 2, 2), None);
        assert_eq!(record(&h, true, 2, 2), None);
        assert_eq!(record(&h, true, 2, 2), Some(Transition::Up));
    }

    #[tokio::test]
    async fn one_checker_per_backend_across_syncs_and_none_after_the_check_goes() {
        let b = Backend::new("b".into(), "127.0.0.1:1".parse().unwrap(), "127.0.0.1:1");
        let backends = [b.clone()];
        let check = HealthCheckConfig::default();
        let mut reg = Checkers::default();
        let wanted = |check| [Wanted { service: "s", check, backends: &backends }];
        reg.sync(&wanted(Some(&check)));
        reg.sync(&wanted(Some(&check)));
        assert_eq!(reg.len(), 1);
        b.health.active_up.store(false, Ordering::Relaxed);
        reg.sync(&wanted(None));
        assert!(reg.is_empty());
        assert!(b.health.is_up(), "a backend left down by a removed check must be up again");
        reg.sync(&[]);
        assert!(reg.is_empty());
    }
}
