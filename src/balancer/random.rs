use super::{random_below, Balancer, Pick, RequestContext, SlowStart};
use crate::upstream::Pool;

/// A backend drawn at random, in proportion to its weight (NGINX's `random`, HAProxy's
/// `balance random`). No shared counter at all: picks on different cores touch no common
/// cache line.
#[derive(Debug)]
pub struct Random {
    draw: WeightedDraw,
}

impl Random {
    pub fn new(weights: &[u32], slow_start: SlowStart) -> Self {
        Random { draw: WeightedDraw::new(weights, slow_start) }
    }
}

impl Balancer for Random {
    fn pick(&self, pool: &Pool, _ctx: &RequestContext<'_>, usable: &dyn Fn(usize) -> bool) -> Option<Pick> {
        self.draw.usable(pool, usable, None).map(Pick::at)
    }
}

/// Draws of a backend index in proportion to the weights (and slow-start ramps), shared by the
/// random, p2c and peak-EWMA algorithms.
#[derive(Debug)]
pub struct WeightedDraw {
    /// Running sums of the weights: backend `i` owns `cumulative[i-1]..cumulative[i]`.
    cumulative: Vec<u64>,
    /// Every weight the same: a draw is one multiply, no search.
    uniform: bool,
    pub slow_start: SlowStart,
}

/// Draws before giving up on chance and scanning: with most of a pool unusable, a scan is surer.
const DRAWS: usize = 8;

impl WeightedDraw {
    pub fn new(weights: &[u32], slow_start: SlowStart) -> Self {
        let cumulative = weights
            .iter()
            .scan(0u64, |sum, &w| {
                *sum += u64::from(w.max(1));
                Some(*sum)
            })
            .collect();
        let uniform = weights.windows(2).all(|w| w[0].max(1) == w[1].max(1));
        WeightedDraw { cumulative, uniform, slow_start }
    }

    fn draw(&self) -> usize {
        let n = self.cumulative.len();
        let total = self.cumulative.last().copied().unwrap_or(0);
        if self.uniform {
            return random_below(n as u64) as usize;
        }
        let r = random_below(total);
        self.cumulative.partition_point(|&c| c <= r)
    }

    /// A usable backend other than `not`, drawn by weight; after a few unlucky draws, the
    /// first usable one from a random place.
    pub fn usable(&self, pool: &Pool, usable: &dyn Fn(usize) -> bool, not: Option<usize>) -> Option<usize> {
        let n = pool.len().min(self.cumulative.len());
        if n == 0 {
            return None;
        }
        for _ in 0..DRAWS {
            let i = self.draw();
            if i < n
                && Some(i) != not
                && usable(i)
                && (!self.slow_start.is_on() || self.slow_start.admit(&pool.backends[i]))
            {
                return Some(i);
            }
        }
        let start = random_below(n as u64) as usize;
        (0..n).map(|k| (start + k) % n).find(|&i| Some(i) != not && usable(i))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::balancer::test_support::{counts, pool};

    #[test]
    fn spreads_by_weight() {
        let pool = pool(&[3, 1, 1]);
        let r = Random::new(&pool.weights, SlowStart::default());
        let c = counts(&r, &pool, 50_000, &|_| true);
        assert!((28_500..31_500).contains(&c[0]), "{c:?}");
        assert!((9_000..11_000).contains(&c[1]) && (9_000..11_000).contains(&c[2]), "{c:?}");
    }

    #[test]
    fn skips_unusable_and_finds_the_last_one() {
        let pool = pool(&[100, 100, 1]);
        let r = Random::new(&pool.weights, SlowStart::default());
        let c = counts(&r, &pool, 1000, &|i| i != 1);
        assert_eq!((c[0] + c[2], c[1]), (1000, 0), "{c:?}");
        // Only the lightest is usable: draws mostly miss it, the scan finds it.
        assert_eq!(counts(&r, &pool, 100, &|i| i == 2), [0, 0, 100]);
        assert_eq!(r.pick(&pool, &crate::balancer::test_support::ctx(), &|_| false), None);
    }

    #[test]
    fn a_ramping_backend_gets_a_tenth_of_its_share() {
        let pool = pool(&[1, 1]);
        let r = Random::new(&pool.weights, SlowStart::new(Some(Duration::from_secs(600))));
        pool.backends[1].load.mark_recovered();
        let c = counts(&r, &pool, 20_000, &|_| true);
        assert!((1_400..2_300).contains(&c[1]), "{c:?}");
    }
}
