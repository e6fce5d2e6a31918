use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Balancer, Pick, RequestContext, SlowStart};
use crate::upstream::Pool;

/// Fewest requests in flight per unit of weight; ties go in rotation so that an idle pool is
/// still shared evenly.
///
/// With slow start on, the load counts the request being placed, (in flight + 1) / weight, as
/// HAProxy's `leastconn` does: otherwise an idle backend that just came back, at any weight,
/// would win every pick until it was as busy as the others.
#[derive(Debug, Default)]
pub struct LeastConnections {
    next: AtomicUsize,
    slow_start: SlowStart,
}

impl LeastConnections {
    pub fn new(slow_start: SlowStart) -> Self {
        LeastConnections { next: AtomicUsize::new(0), slow_start }
    }
}

impl Balancer for LeastConnections {
    fn pick(&self, pool: &Pool, _ctx: &RequestContext<'_>, usable: &dyn Fn(usize) -> bool) -> Option<Pick> {
        let n = pool.len();
        if n == 0 {
            return None;
        }
        let placed = u64::from(self.slow_start.is_on());
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<(usize, u64, u64)> = None; // (index, in flight, weight)
        for k in 0..n {
            let i = (start + k) % n;
            if !usable(i) {
                continue;
            }
            let backend = &pool.backends[i];
            let load = backend.in_flight() as u64 + placed;
            let weight = self.slow_start.weight(pool.weights[i], backend);
            // load/weight < best_load/best_weight, without division.
            if best.is_none_or(|(_, bl, bw)| load * bw < bl * weight) {
                best = Some((i, load, weight));
            }
        }
        best.map(|(i, _, _)| Pick::at(i))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::balancer::test_support::{counts, pick, pool};

    #[test]
    fn prefers_the_least_loaded() {
        let pool = pool(&[1, 1, 1]);
        let lc = LeastConnections::default();
        let _a = pool.backends[0].start_request();
        let _b = pool.backends[2].start_request();
        for _ in 0..5 {
            assert_eq!(pick(&lc, &pool, &|_| true), 1);
        }
    }

    #[test]
    fn ties_rotate() {
        let pool = pool(&[1, 1, 1]);
        let lc = LeastConnections::default();
        let picks: Vec<_> = (0..6).map(|_| pick(&lc, &pool, &|_| true)).collect();
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
        assert_eq!(pick(&lc, &pool, &|_| true), 0);
    }

    #[test]
    fn a_ramping_backend_waits_until_the_others_are_busy() {
        let pool = pool(&[1, 1]);
        let lc = LeastConnections::new(SlowStart::new(Some(Duration::from_secs(600))));
        pool.backends[1].load.mark_recovered();
        // At 10% of its weight, the idle newcomer counts as 10 per request placed.
        let mut held: Vec<_> = (0..8).map(|_| pool.backends[0].start_request()).collect();
        assert_eq!(counts(&lc, &pool, 10, &|_| true), [10, 0]);
        held.push(pool.backends[0].start_request());
        held.push(pool.backends[0].start_request());
        assert_eq!(pick(&lc, &pool, &|_| true), 1);
    }
}
