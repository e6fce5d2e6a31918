//! Cheap randomness for spreading things out (balancer draws, check and backoff jitter): a
//! thread-local xorshift64*, seeded from std's per-process random keys. Spread and speed are
//! what matter here, not unpredictability, and no state is shared between threads.

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};

/// A uniform random `u64`.
pub fn u64() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_usize(&h as *const _ as usize);
            h.finish() | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

/// A uniform random number in [0, 1).
pub fn fraction() -> f64 {
    (u64() >> 11) as f64 / (1u64 << 53) as f64
}
