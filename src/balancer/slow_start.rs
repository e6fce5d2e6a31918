//! `slow_start`: a backend that comes (back) into service gets its weight ramped from 10% to
//! 100% over the window (HAProxy's `slowstart`, Envoy's slow-start window), so a cold cache or
//! a just-restarted JIT is not handed its full share at once.
//!
//! Cheap by design: the only state is one timestamp per backend ([`LoadStats`]); a pick reads
//! it, and reads the clock only while it is set. Once the window has passed, the first pick
//! that notices clears it.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::load::now_ms;
use super::random_below;
use crate::upstream::Backend;

/// Effective weights are in thousandths of the configured weight.
pub const FULL: u64 = 1000;
/// Where the ramp starts.
const FLOOR: u64 = 100;

#[derive(Debug, Clone, Copy, Default)]
pub struct SlowStart {
    /// The window in milliseconds; 0: off.
    window_ms: u64,
}

impl SlowStart {
    pub fn new(window: Option<Duration>) -> SlowStart {
        SlowStart { window_ms: window.map_or(0, |w| (w.as_millis() as u64).max(1)) }
    }

    pub fn is_on(self) -> bool {
        self.window_ms != 0
    }

    /// The backend's share of its weight now, in thousandths: 100 at the start of the ramp,
    /// [`FULL`] outside it.
    pub fn factor(self, backend: &Backend) -> u64 {
        if self.window_ms == 0 {
            return FULL;
        }
        let start = backend.load.ramp_start_ms.load(Ordering::Relaxed);
        if start == 0 {
            return FULL;
        }
        let elapsed = now_ms().saturating_sub(start);
        if elapsed >= self.window_ms {
            // Ramp over: later picks skip the clock. A newer start (it went down and came
            // back meanwhile) is left alone.
            let _ = backend.load.ramp_start_ms.compare_exchange(start, 0, Ordering::Relaxed, Ordering::Relaxed);
            return FULL;
        }
        ramp(elapsed, self.window_ms)
    }

    /// `weight` scaled by the ramp, in thousandths.
    pub fn weight(self, weight: u32, backend: &Backend) -> u64 {
        u64::from(weight.max(1)) * self.factor(backend)
    }

    /// For algorithms that walk a fixed schedule or draw by configured weight: take this
    /// backend now with the probability of its ramp, so its share follows the ramp.
    pub fn admit(self, backend: &Backend) -> bool {
        let f = self.factor(backend);
        f >= FULL || random_below(FULL) < f
    }
}

/// Linear from [`FLOOR`] at 0 to [`FULL`] at `window` (milliseconds).
fn ramp(elapsed: u64, window: u64) -> u64 {
    FLOOR + (FULL - FLOOR) * elapsed.min(window) / window.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::test_support::pool;

    #[test]
    fn ramps_from_a_tenth_to_full() {
        let pool = pool(&[1]);
        let b = &pool.backends[0];
        let off = SlowStart::new(None);
        let on = SlowStart::new(Some(Duration::from_secs(100)));
        assert_eq!(on.factor(b), FULL);
        b.load.mark_recovered();
        assert_eq!(off.factor(b), FULL);
        let f = on.factor(b);
        assert!((100..200).contains(&f), "{f}");
        assert_eq!([ramp(0, 30_000), ramp(15_000, 30_000), ramp(30_000, 30_000)], [100, 550, 1000]);
        // Past it: full, and the mark is cleared.
        b.load.ramp_start_ms.store(1, Ordering::Relaxed);
        let on_short = SlowStart::new(Some(Duration::from_millis(1)));
        while now_ms() < 3 {
            std::hint::spin_loop();
        }
        assert_eq!(on_short.factor(b), FULL);
        assert_eq!(b.load.ramp_start_ms.load(Ordering::Relaxed), 0);
    }
}
