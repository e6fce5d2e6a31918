//! What the load-aware algorithms know about one backend, beside its in-flight count: a
//! peak-EWMA of its time to first byte, and when it last came (back) into service. Kept on the
//! [`Backend`](crate::upstream::Backend), so a reload that carries the backend over keeps it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How fast the latency estimate forgets: Finagle's and linkerd's default decay time.
pub const EWMA_DECAY: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct LoadStats {
    /// Peak-EWMA of the time to first byte, nanoseconds, as `f64` bits; 0: never measured.
    ewma_ns: AtomicU64,
    /// When `ewma_ns` was last updated, [`now_ns`] time.
    stamp_ns: AtomicU64,
    /// When the backend came (back) into service, [`now_ms`] time; 0: not ramping up.
    pub(super) ramp_start_ms: AtomicU64,
}

impl LoadStats {
    /// A response head arrived `ttfb` after the request went out. A time above the estimate
    /// replaces it at once (the "peak"): a backend that turns slow is seen as slow by the
    /// next pick. Below it, the estimate moves towards it, the more so the longer since the
    /// last sample.
    pub fn observe_ttfb(&self, ttfb: Duration) {
        let now = now_ns();
        let rtt = ttfb.as_nanos() as f64;
        let last = self.stamp_ns.swap(now, Ordering::Relaxed);
        let w = (-(now.saturating_sub(last) as f64) / EWMA_DECAY.as_nanos() as f64).exp();
        // A lost race between two samples only loses one of them.
        let _ = self.ewma_ns.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
            let cost = f64::from_bits(bits);
            let next = if rtt > cost { rtt } else { cost * w + rtt * (1.0 - w) };
            Some(next.to_bits())
        });
    }

    /// The latency estimate at `now` (nanoseconds), decayed towards 0 since the last sample,
    /// as Finagle does: a backend that got no traffic because it was slow is tried again
    /// after a while. 0 when never measured.
    pub fn ttfb_estimate(&self, now: u64) -> f64 {
        let cost = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        if cost == 0.0 {
            return 0.0;
        }
        let idle = now.saturating_sub(self.stamp_ns.load(Ordering::Relaxed)) as f64;
        cost * (-idle / EWMA_DECAY.as_nanos() as f64).exp()
    }

    /// The backend just came (back) into service: added to a running pool, up again after
    /// its checks failed, or out of a passive ejection. Slow start ramps it from here.
    pub fn mark_recovered(&self) {
        self.ramp_start_ms.store(now_ms(), Ordering::Relaxed);
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since a process-wide epoch, never 0.
pub fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64 + 1
}

/// Milliseconds since the same epoch, never 0.
pub fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_then_decay() {
        let s = LoadStats::default();
        assert_eq!(s.ttfb_estimate(now_ns()), 0.0);
        s.observe_ttfb(Duration::from_millis(1));
        let one = s.ttfb_estimate(now_ns());
        assert!((0.5e6..=1.0e6).contains(&one), "{one}");
        // A slow answer is taken at once.
        s.observe_ttfb(Duration::from_millis(200));
        assert!(s.ttfb_estimate(now_ns()) > 150e6);
        // Fast answers right after pull it down only slowly (samples close together weigh little).
        s.observe_ttfb(Duration::from_millis(1));
        assert!(s.ttfb_estimate(now_ns()) > 100e6);
        // Long idle: decays.
        let later = now_ns() + 60 * 1_000_000_000;
        assert!(s.ttfb_estimate(later) < 1e6);
    }
}
