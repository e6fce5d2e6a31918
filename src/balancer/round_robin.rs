use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Balancer, Pick, RequestContext};
use crate::upstream::Pool;

/// Strict rotation. Each pick takes one tick of a shared counter, so with every backend usable
/// 3N picks over 3 backends give exactly N each, even under concurrency.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Balancer for RoundRobin {
    fn pick(&self, pool: &Pool, _ctx: &RequestContext<'_>, usable: &dyn Fn(usize) -> bool) -> Option<Pick> {
        let n = pool.len();
        // An unusable backend costs a fresh tick rather than handing its turn to its neighbour,
        // so the survivors share its traffic evenly.
        for _ in 0..n {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % n;
            if usable(i) {
                return Some(Pick::at(i));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::test_support::{pick, pool};

    #[test]
    fn rotates_strictly() {
        let pool = pool(&[1, 1, 1]);
        let rr = RoundRobin::default();
        let picks: Vec<_> = (0..6).map(|_| pick(&rr, &pool, &|_| true)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn survivors_share_evenly() {
        let pool = pool(&[1, 1, 1]);
        let rr = RoundRobin::default();
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            counts[pick(&rr, &pool, &|i| i != 1)] += 1;
        }
        assert_eq!(counts[1], 0);
        assert!(counts[0].abs_diff(counts[2]) <= 2, "{counts:?}");
    }

    #[test]
    fn none_when_nothing_usable() {
        let pool = pool(&[1, 1]);
        assert_eq!(pick(&RoundRobin::default(), &pool, &|_| false), 99);
    }
}
