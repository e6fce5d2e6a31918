use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Balancer, Pick, RequestContext, SlowStart};
use crate::upstream::Pool;

/// Longest schedule we precompute; larger weight sums are scaled down to fit.
const MAX_SCHEDULE: u64 = 1 << 16;

/// Smooth weighted round robin (NGINX's algorithm), precomputed.
///
/// NGINX runs the algorithm under a lock on every pick. Its output for fixed weights is a fixed
/// cycle of length sum(weights), so we run it once when the pool is built and picks walk the
/// cycle with an atomic counter: same sequence (5,1,1 gives a a b a c a a), no lock.
#[derive(Debug)]
pub struct WeightedRoundRobin {
    schedule: Vec<u32>,
    next: AtomicUsize,
    slow_start: SlowStart,
}

impl WeightedRoundRobin {
    pub fn new(weights: &[u32], slow_start: SlowStart) -> Self {
        WeightedRoundRobin { schedule: smooth_schedule(weights), next: AtomicUsize::new(0), slow_start }
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn smooth_schedule(weights: &[u32]) -> Vec<u32> {
    let mut w: Vec<u64> = weights.iter().map(|&w| u64::from(w.max(1))).collect();
    let g = w.iter().copied().fold(0, gcd).max(1);
    w.iter_mut().for_each(|x| *x /= g);
    let total: u64 = w.iter().sum();
    if total > MAX_SCHEDULE {
        w.iter_mut().for_each(|x| *x = (*x * MAX_SCHEDULE / total).max(1));
    }
    let total: i64 = w.iter().sum::<u64>() as i64;
    let mut current = vec![0i64; w.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i] as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        schedule.push(best as u32);
    }
    schedule
}

impl Balancer for WeightedRoundRobin {
    fn pick(&self, pool: &Pool, _ctx: &RequestContext<'_>, usable: &dyn Fn(usize) -> bool) -> Option<Pick> {
        let len = self.schedule.len();
        if len == 0 {
            return None;
        }
        // Skipping an unusable backend's slots spreads its share over the others by weight;
        // a ramping backend (slow start) takes each of its slots with the ramp's probability.
        for _ in 0..len.min(4 * pool.len() + 64) {
            let i = self.schedule[self.next.fetch_add(1, Ordering::Relaxed) % len] as usize;
            if i < pool.len() && usable(i) && (!self.slow_start.is_on() || self.slow_start.admit(&pool.backends[i])) {
                return Some(Pick::at(i));
            }
        }
        // Long stretches of unusable slots (a heavy backend down): fall back to a scan.
        (0..pool.len()).find(|&i| usable(i)).map(Pick::at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::test_support::{counts, pick, pool};

    #[test]
    fn nginx_sequence() {
        assert_eq!(smooth_schedule(&[5, 1, 1]), [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn picks_follow_the_schedule_and_weights() {
        let pool = pool(&[5, 1, 1]);
        let wrr = WeightedRoundRobin::new(&pool.weights, SlowStart::default());
        let picks: Vec<_> = (0..14).map(|_| pick(&wrr, &pool, &|_| true)).collect();
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0, 0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn large_weights_are_scaled() {
        let s = smooth_schedule(&[100_000, 50_000, 1]);
        assert!(s.len() as u64 <= MAX_SCHEDULE + 3);
        assert!(s.contains(&2));
    }

    #[test]
    fn skips_unusable() {
        let pool = pool(&[5, 1, 1]);
        let wrr = WeightedRoundRobin::new(&pool.weights, SlowStart::default());
        for _ in 0..20 {
            assert_eq!(pick(&wrr, &pool, &|i| i == 2), 2);
        }
    }

    #[test]
    fn a_ramping_backend_gets_a_tenth_of_its_share() {
        let pool = pool(&[1, 1]);
        let wrr = WeightedRoundRobin::new(&pool.weights, SlowStart::new(Some(std::time::Duration::from_secs(600))));
        pool.backends[1].load.mark_recovered();
        let c = counts(&wrr, &pool, 20_000, &|_| true);
        // Weight 1 × 10% against 1: about 1/11 of the picks.
        assert!((1_400..2_300).contains(&c[1]), "{c:?}");
    }
}
