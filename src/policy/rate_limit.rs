//! `rate_limits:` of a service: GCRA (the `governor` crate), one keyed limiter per rule.
//!
//! The decision sits behind [`Limiter`], so that a limit shared by several instances
//! (`scope: cluster`, issue 19) can be another implementation beside [`Local`] without the
//! request path changing. Keys are `u128`: a client address as its v4-mapped form, a header
//! value as a keyed 64-bit hash (no allocation per request, and a client cannot aim for
//! collisions without the process's random key), `0` for `global`.
//!
//! Idle keys cost memory until [`Limiter::evict_idle`], which a periodic task runs off the
//! request path (`spawn_sweeper`): a key whose bucket has refilled is indistinguishable from
//! a new one and is dropped.

use std::fmt;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::{LimitKey, LimitScope, RateLimitConfig};
use crate::request::RequestView;

use super::ipset;

/// A rate limit's state: counts requests by key and says when one is over.
pub trait Limiter: Send + Sync + fmt::Debug {
    /// Count a request under `key`. `Err(wait)`: over the limit; the next request under this
    /// key may pass after `wait`.
    fn check(&self, key: u128) -> Result<(), Duration>;
    /// Forget keys whose state equals a fresh key's. Takes time with many keys: not on the
    /// request path.
    fn evict_idle(&self);
    /// Keys held now.
    fn keys(&self) -> usize;
}

/// State in this process: a sharded map (no global lock) of GCRA cells.
pub struct Local {
    limiter: DefaultKeyedRateLimiter<u128>,
}

impl fmt::Debug for Local {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Local").field("keys", &self.limiter.len()).finish()
    }
}

impl Local {
    pub fn new(config: &RateLimitConfig) -> Local {
        let burst = NonZeroU32::new(config.burst).unwrap_or(NonZeroU32::MIN);
        // The interval is at least a microsecond (1,000,000/s at most, checked at load).
        let interval = config.rate.interval().max(Duration::from_nanos(1));
        let quota =
            Quota::with_period(interval).unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN)).allow_burst(burst);
        Local { limiter: RateLimiter::dashmap(quota) }
    }
}

impl Limiter for Local {
    fn check(&self, key: u128) -> Result<(), Duration> {
        self.limiter.check_key(&key).map_err(|not_until| not_until.wait_time_from(self.limiter.clock().now()))
    }

    fn evict_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    fn keys(&self) -> usize {
        self.limiter.len()
    }
}

/// One rule: what it applies to, and its state.
#[derive(Debug, Clone)]
pub struct RateLimit {
    pub config: RateLimitConfig,
    pub limiter: Arc<dyn Limiter>,
    /// `scope: cluster`: the state is in the cluster store (`limiter` is the same object, for
    /// the sweeper).
    cluster: Option<Arc<crate::cluster::ratelimit::ClusterLimiter>>,
}

/// A request over a limit: what the `429` says.
#[derive(Debug, Clone, Copy)]
pub struct Limited {
    /// The rule's burst: requests allowed at once.
    pub limit: u32,
    /// Until the next request under the same key may pass.
    pub wait: Duration,
}

impl Limited {
    /// Whole seconds to wait, at least 1 (`Retry-After`, `RateLimit-Reset`).
    pub fn wait_secs(&self) -> u64 {
        self.wait.as_secs_f64().ceil().max(1.0) as u64
    }
}

/// The process's key for hashing header values.
fn hasher() -> &'static std::hash::RandomState {
    static H: OnceLock<std::hash::RandomState> = OnceLock::new();
    H.get_or_init(std::hash::RandomState::new)
}

impl RateLimit {
    /// A rule for `config`, keeping `previous`'s state when it is the same rule (a reload or
    /// an API change does not reset the limits). `id` names the rule among the instances of a
    /// cluster (service and position).
    pub fn new(config: &RateLimitConfig, previous: Option<&RateLimit>, id: &str) -> RateLimit {
        if let Some(p) = previous.filter(|p| p.config == *config) {
            return p.clone();
        }
        match config.scope {
            LimitScope::Local => {
                RateLimit { config: config.clone(), limiter: Arc::new(Local::new(config)), cluster: None }
            }
            LimitScope::Cluster => {
                let c = Arc::new(crate::cluster::ratelimit::ClusterLimiter::new(config, id));
                RateLimit { config: config.clone(), limiter: c.clone(), cluster: Some(c) }
            }
        }
    }

    fn applies(&self, head: &RequestView<'_>) -> bool {
        let c = &self.config;
        c.path_prefix.as_ref().is_none_or(|p| head.path().starts_with(p.as_bytes()))
            && (c.methods.is_empty() || c.methods.iter().any(|m| m == head.method().as_str()))
    }

    fn key(&self, client: IpAddr, head: &RequestView<'_>) -> u128 {
        match &self.config.key {
            LimitKey::ClientIp => ipset::key(client),
            // Every instance of a cluster must find the same key for the same value: there
            // the hash key is fixed (the store's keys are not for clients to choose anyway).
            LimitKey::Header(name) if self.cluster.is_some() => head.header(name).map_or(0, |v| {
                u128::from(
                    std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(v),
                ) | 1 << 64
            }),
            LimitKey::Header(name) => head.header(name).map_or(0, |v| u128::from(hasher().hash_one(v)) | 1 << 64),
            LimitKey::Global => 0,
        }
    }

    /// Count `head` under this rule if it applies.
    pub async fn check(&self, head: &RequestView<'_>) -> Result<(), Limited> {
        let client = head.client_ip();
        if !self.applies(head) {
            return Ok(());
        }
        let key = self.key(client, head);
        let decision = match &self.cluster {
            // Boxed: the store's future is large, and only cluster-scope rules should carry it
            // (a request future without them stays as small as before).
            Some(c) => Box::pin(c.check(key)).await,
            None => self.limiter.check(key),
        };
        decision.map_err(|wait| Limited { limit: self.config.burst, wait })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::config::Rate;

    fn rule(count: u32, burst: u32) -> RateLimitConfig {
        RateLimitConfig {
            key: LimitKey::ClientIp,
            path_prefix: None,
            methods: vec![],
            rate: Rate { count, per: Duration::from_secs(1) },
            burst,
            scope: LimitScope::Local,
        }
    }

    #[test]
    fn burst_then_rate_and_idle_keys_are_evicted() {
        let l = Local::new(&rule(10, 5));
        for _ in 0..5 {
            assert!(l.check(1).is_ok());
        }
        let wait = l.check(1).unwrap_err();
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO, "{wait:?}");
        // Another key has its own bucket.
        assert!(l.check(2).is_ok());
        for k in 10..1010 {
            let _ = l.check(k);
        }
        assert_eq!(l.keys(), 1002);
        // Nothing is idle yet.
        l.evict_idle();
        assert!(l.keys() > 1000);
        // A bucket of 5 at 10/s is full again within 0.5 s.
        let start = Instant::now();
        while l.keys() > 0 && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(100));
            l.evict_idle();
        }
        assert_eq!(l.keys(), 0);
    }

    #[test]
    fn state_carries_over_an_unchanged_rule_only() {
        let a = RateLimit::new(&rule(1, 1), None, "t");
        let b = RateLimit::new(&rule(1, 1), Some(&a), "t");
        assert!(Arc::ptr_eq(&a.limiter, &b.limiter));
        let c = RateLimit::new(&rule(2, 1), Some(&a), "t");
        assert!(!Arc::ptr_eq(&a.limiter, &c.limiter));
    }
}
