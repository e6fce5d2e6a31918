use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Balancer, RequestContext};
use crate::upstream::Pool;

/// Strict rotation. Each pick takes one tick of a shared counter, so with every backend usable
/// 3N picks over 3 backends give exactly N each, even under concurrency.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Balancer for RoundRobin {
    fn pick(&self, pool: &Pool, _ctx: &RequestContext<'_>, usable: &dyn Fn(usize) -> bool) -> Option<usize> {
        let n = pool.len();
        // An unusable backend costs a fresh tick rather than handing its turn to its neighbour,
        // so the survivors share its traffic evenly.
        for _ in 0..n {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % n;
            if usable(i) {
                return Some(i);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::test_support::{ctx, pool};

    #[test]
    fn rotates_strictly() {
        let pool = pool(&[1, 1, 1]);
        let rr = RoundRobin::default();
        let picks: Vec<_> = (0..6).map(|_| rr.pick(&pool, &ctx(), &|_| true).unwrap_or(99)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn survivors_share_evenly() {
        let pool = pool(&[1, 1, 1]);
        let rr = RoundRobin::default();
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            counts[rr.pick(&pool, &ctx(), &|i| i != 1).unwrap_or(1)] += 1;
        }
        assert_eq!(counts[1], 0);
        assert!(counts[0].abs_diff(counts[2]) <= 2, "{counts:?}");
    }

    #[test]
    fn none_when_nothing_usable() {
        let pool = pool(&[1, 1]);
        assert_eq!(RoundRobin::default().pick(&pool, &ctx(), &|_| false), None);
    }
}
