use super::load::now_ns;
use super::random::WeightedDraw;
use super::slow_start::FULL;
use super::{Balancer, Pick, RequestContext, SlowStart};
use crate::upstream::Pool;

/// Cost of a backend whose latency is not known yet while it has a request in flight: high, so
/// it gets one request at a time until its first answer says what it is worth (Finagle's
/// penalty).
const UNMEASURED_PENALTY: f64 = 1e12;

/// Finagle's and linkerd's balancer: power of two random choices on cost = peak-EWMA of the
/// time to first byte × (in flight + 1), per unit of weight. A backend that turns slow costs
/// its slow answer from its first one (the "peak"), so it loses traffic at once; its estimate
/// then decays (10 s), so it is tried again and wins back traffic when it is fast again.
#[derive(Debug)]
pub struct PeakEwma {
    draw: WeightedDraw,
}

impl PeakEwma {
    pub fn new(weights: &[u32], slow_start: SlowStart) -> Self {
        PeakEwma { draw: WeightedDraw::new(weights, slow_start) }
    }
}

impl Balancer for PeakEwma {
    fn pick(&self, pool: &Pool, _ctx: &RequestContext<'_>, usable: &dyn Fn(usize) -> bool) -> Option<Pick> {
        let a = self.draw.usable(pool, usable, None)?;
        let Some(b) = self.draw.usable(pool, usable, Some(a)) else {
            return Some(Pick::at(a));
        };
        let now = now_ns();
        let slow = self.draw.slow_start;
        let cost = |i: usize| {
            let backend = &pool.backends[i];
            let pending = backend.in_flight() as f64;
            let latency = backend.load.ttfb_estimate(now);
            let raw = if latency == 0.0 && pending > 0.0 { UNMEASURED_PENALTY } else { latency * (pending + 1.0) };
            raw * FULL as f64 / slow.weight(pool.weights[i], backend) as f64
        };
        Some(Pick::at(if cost(a) <= cost(b) { a } else { b }))
    }

    fn observes_latency(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::balancer::test_support::{counts, pool};

    #[test]
    fn the_slow_backend_loses_traffic() {
        let pool = pool(&[1, 1, 1]);
        let p = PeakEwma::new(&pool.weights, SlowStart::default());
        for (i, ms) in [(0, 1), (1, 1), (2, 50)] {
            pool.backends[i].load.observe_ttfb(Duration::from_millis(ms));
        }
        let c = counts(&p, &pool, 3_000, &|_| true);
        assert_eq!(c[2], 0, "{c:?}");
        // Load still counts: with enough in flight on the fast ones, the slow one is worth it.
        let _held: Vec<_> =
            (0..60).flat_map(|_| [pool.backends[0].start_request(), pool.backends[1].start_request()]).collect();
        let c = counts(&p, &pool, 3_000, &|_| true);
        assert!(c[2] > 500, "{c:?}");
    }

    #[test]
    fn an_unmeasured_backend_gets_one_request_at_a_time() {
        let pool = pool(&[1, 1]);
        let p = PeakEwma::new(&pool.weights, SlowStart::default());
        pool.backends[0].load.observe_ttfb(Duration::from_millis(5));
        let _first = pool.backends[1].start_request();
        assert_eq!(counts(&p, &pool, 100, &|_| true), [100, 0]);
    }
}
