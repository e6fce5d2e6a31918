use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Balancer, RequestContext};
use crate::upstream::Pool;

/// Fewest requests in flight per unit of weight; ties go in rotation so that an idle pool is
/// still shared evenly.
#[derive(Debug, Default)]
pub struct LeastConnections {
    next: AtomicUsize,
}

impl Balancer for LeastConnections {
    fn pick(&self, pool: &Pool, _ctx: &RequestContext<'_>, usable: &dyn Fn(usize) -> bool) -> Option<usize> {
        let n = pool.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<(usize, u64, u64)> = None; // (index, in flight, weight)
        for k in 0..n {
            let i = (start + k) % n;
            if !usable(i) {
                continue;
            }
            let load = pool.backends[i].in_flight() as u64;
            let weight = u64::from(pool.weights[i].max(1));
            // load/weight < best_load/best_weight, without division.
            if best.is_none_or(|(_, bl, bw)| load * bw < bl * weight) {
                best = Some((i, load, weight));
            }
        }
        best.map(|(i, _, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::test_support::{ctx, pool};

    #[test]
    fn prefers_the_least_loaded() {
        let pool = pool(&[1, 1, 1]);
        let lc = LeastConnections::default();
        let _a = pool.backends[0].start_request();
        let _b = pool.backends[2].start_request();
        for _ in 0..5 {
            assert_eq!(lc.pick(&pool, &ctx(), &|_| true), Some(1));
        }
    }

    #[test]
    fn ties_rotate() {
        let pool = pool(&[1, 1, 1]);
        let lc = LeastConnections::default();
        let picks: Vec<_> = (0..6).map(|_| lc.pick(&pool, &ctx(), &|_| true).unwrap_or(9)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn load_is_per_unit_of_weight() {
        let pool = pool(&[3, 1]);
        let lc = LeastConnections::default();
        // Two in flight on a weight-3 backend (0.67 each) beats one on a weight-1 backend.
        let _a = pool.backends[0].start_request();
        let _b = pool.backends[0].start_request();
        let _c = pool.backends[1].start_request();
        assert_eq!(lc.pick(&pool, &ctx(), &|_| true), Some(0));
    }
}
