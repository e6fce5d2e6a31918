//! `scope: cluster` rate limits: one GCRA state per key in Redis, shared by every instance.
//!
//! A decision is one round trip: a Lua script (EVALSHA) that reads Redis's clock (`TIME`, so
//! instance clocks do not matter), moves the key's theoretical arrival time and says yes, or
//! no with the time until the next request may pass. A "no" is cached here until then, so a
//! client over its limit costs no round trip. The store has `store_timeout` to answer; after
//! that, or while the breaker is open, `on_store_error` decides: `local` (the limit divided by
//! the live instances, enforced here alone), `allow` or `deny`. No request waits longer than
//! the timeout.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use redis::Script;
use tracing::warn;

use crate::config::{OnStoreError, RateLimitConfig};
use crate::policy::rate_limit::Local;
use crate::policy::Limiter;

/// GCRA: KEYS[1] holds the theoretical arrival time (µs, Redis clock). ARGV: emission
/// interval (µs), burst. Returns {1, 0} (allowed) or {0, µs until the next may pass}.
static GCRA: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval
local over = new_tat - now - interval * burst
if over > 0 then return {0, math.ceil(over)} end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, 0}
",
    )
});

/// Shards of the "over the limit until" cache: a lock per shard, never one for all.
const SHARDS: usize = 64;

pub struct ClusterLimiter {
    config: RateLimitConfig,
    /// After the key prefix, before the client key: `rl:SERVICE:INDEX:`.
    key_base: String,
    interval_us: u64,
    /// Keys known to be over the limit, with when they may pass again.
    over: Box<[Mutex<HashMap<u128, Instant>>]>,
    /// The `on_store_error: local` limiter, for this many live instances.
    fallback: ArcSwap<(usize, Local)>,
}

impl std::fmt::Debug for ClusterLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterLimiter").field("key_base", &self.key_base).finish()
    }
}

impl ClusterLimiter {
    /// `id` (service and position) names the rule: every instance with the same config uses
    /// the same keys.
    pub fn new(config: &RateLimitConfig, id: &str) -> ClusterLimiter {
        let interval_us = u64::try_from(config.rate.interval().as_micros()).unwrap_or(u64::MAX).max(1);
        ClusterLimiter {
            config: config.clone(),
            key_base: format!("rl:{id}:"),
            interval_us,
            over: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            fallback: ArcSwap::from_pointee((1, Local::new(config))),
        }
    }

    fn shard(&self, key: u128) -> &Mutex<HashMap<u128, Instant>> {
        let h = (key as u64) ^ ((key >> 64) as u64);
        &self.over[(h.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) as usize % SHARDS]
    }

    /// Count a request under `key`: `Err(wait)` when over the limit.
    pub async fn check(&self, key: u128) -> Result<(), Duration> {
        let now = Instant::now();
        if let Ok(mut m) = self.shard(key).lock() {
            if let Some(until) = m.get(&key).copied() {
                if until > now {
                    return Err(until - now);
                }
                m.remove(&key);
            }
        }
        let Some(cluster) = super::current() else { return self.fallback(key, 1, OnStoreError::Local) };
        let on_error = cluster.config.on_store_error;
        let breaker = &cluster.store.breaker;
        if breaker.is_open() {
            return self.fallback(key, cluster.live(), on_error);
        }
        // The hash tag is the whole key: keys spread over a Redis Cluster's slots.
        let prefix = &cluster.config.key_prefix;
        let mut redis_key = String::with_capacity(prefix.len() + self.key_base.len() + 36);
        redis_key.push('{');
        redis_key.push_str(prefix);
        redis_key.push_str(&self.key_base);
        let _ = write!(redis_key, "{key:x}}}");
        let args: [&dyn super::store::ToRedisArgsDyn; 2] = [&self.interval_us, &self.config.burst];
        match cluster.store.script::<(i64, i64)>(&GCRA, &[&redis_key], &args, cluster.config.store_timeout).await {
            Ok((1, _)) => {
                breaker.success();
                Ok(())
            }
            Ok((_, wait_us)) => {
                breaker.success();
                let wait = Duration::from_micros(u64::try_from(wait_us).unwrap_or(0).max(1));
                if let Ok(mut m) = self.shard(key).lock() {
                    m.insert(key, now + wait);
                }
                Err(wait)
            }
            Err(e) => {
                if breaker.failure() {
                    warn!(
                        "cluster: rate limit store failing ({e}); breaker open, limits follow on_store_error ({}) until the store answers the heartbeat",
                        on_error.name()
                    );
                }
                self.fallback(key, cluster.live(), on_error)
            }
        }
    }

    /// The decision without the store.
    fn fallback(&self, key: u128, live: usize, policy: OnStoreError) -> Result<(), Duration> {
        if let Some(c) = super::current() {
            c.store.breaker.fallbacks.fetch_add(1, Ordering::Relaxed);
        }
        match policy {
            OnStoreError::Allow => Ok(()),
            OnStoreError::Deny => Err(self.config.rate.interval().max(Duration::from_secs(1))),
            OnStoreError::Local => {
                let mut f = self.fallback.load();
                if f.0 != live {
                    // The live count changed: a limiter for the new share (rare: members come
                    // and go, not requests).
                    let mut share = self.config.clone();
                    let n = u32::try_from(live).unwrap_or(u32::MAX).max(1);
                    share.rate.per = share.rate.per.saturating_mul(n);
                    share.burst = share.burst.div_ceil(n).max(1);
                    self.fallback.store(Arc::new((live, Local::new(&share))));
                    f = self.fallback.load();
                }
                f.1.check(key)
            }
        }
    }
}

impl Limiter for ClusterLimiter {
    /// Off the request path (the request path awaits [`ClusterLimiter::check`]): the local share.
    fn check(&self, key: u128) -> Result<(), Duration> {
        self.fallback(key, super::current().map_or(1, |c| c.live()), OnStoreError::Local)
    }

    fn evict_idle(&self) {
        let now = Instant::now();
        for shard in self.over.iter() {
            if let Ok(mut m) = shard.lock() {
                m.retain(|_, until| *until > now);
                m.shrink_to_fit();
            }
        }
        self.fallback.load().1.evict_idle();
    }

    fn keys(&self) -> usize {
        self.over.iter().map(|s| s.lock().map_or(0, |m| m.len())).sum::<usize>() + self.fallback.load().1.keys()
    }
}
