use super::random::WeightedDraw;
use super::{Balancer, Pick, RequestContext, SlowStart};
use crate::upstream::Pool;

/// Power of two random choices: draw two backends (by weight), take the one with fewer requests
/// in flight per unit of weight. Nearly as good as least connections at spreading load, without
/// a scan of the pool or a shared counter, and without least connections' herd: every balancer
/// instance sending its next request to the same idle backend.
#[derive(Debug)]
pub struct PowerOfTwo {
    draw: WeightedDraw,
}

impl PowerOfTwo {
    pub fn new(weights: &[u32], slow_start: SlowStart) -> Self {
        PowerOfTwo { draw: WeightedDraw::new(weights, slow_start) }
    }
}

impl Balancer for PowerOfTwo {
    fn pick(&self, pool: &Pool, _ctx: &RequestContext<'_>, usable: &dyn Fn(usize) -> bool) -> Option<Pick> {
        let a = self.draw.usable(pool, usable, None)?;
        let Some(b) = self.draw.usable(pool, usable, Some(a)) else {
            return Some(Pick::at(a));
        };
        let slow = self.draw.slow_start;
        let load = |i: usize| {
            let backend = &pool.backends[i];
            (backend.in_flight() as u64, slow.weight(pool.weights[i], backend))
        };
        let ((la, wa), (lb, wb)) = (load(a), load(b));
        // la/wa <= lb/wb, without division; a tie goes to the first draw, which was by weight.
        Some(Pick::at(if la * wb <= lb * wa { a } else { b }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::test_support::{counts, pool};

    #[test]
    fn idle_pool_spreads_by_weight() {
        let pool = pool(&[2, 1, 1]);
        let p = PowerOfTwo::new(&pool.weights, SlowStart::default());
        let c = counts(&p, &pool, 40_000, &|_| true);
        assert!((18_500..21_500).contains(&c[0]), "{c:?}");
        assert!((9_000..11_000).contains(&c[1]), "{c:?}");
    }

    #[test]
    fn avoids_the_busy_backend() {
        let pool = pool(&[1, 1, 1]);
        let p = PowerOfTwo::new(&pool.weights, SlowStart::default());
        let _busy: Vec<_> = (0..5).map(|_| pool.backends[0].start_request()).collect();
        let c = counts(&p, &pool, 3_000, &|_| true);
        // Backend 0 only wins when drawn twice, which cannot happen: never.
        assert_eq!(c[0], 0, "{c:?}");
        assert!(c[1].abs_diff(c[2]) < 300, "{c:?}");
    }

    #[test]
    fn one_usable_backend_is_picked() {
        let pool = pool(&[1, 1, 1]);
        let p = PowerOfTwo::new(&pool.weights, SlowStart::default());
        assert_eq!(counts(&p, &pool, 50, &|i| i == 1), [0, 50, 0]);
    }
}
