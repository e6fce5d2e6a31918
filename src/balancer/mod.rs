//! Load-balancing algorithms, one file each, behind [`Balancer`].
//!
//! A balancer is built once per pool (at load, reload or admin change) and then only picks.
//! Picking is lock-free and allocation-free: each algorithm keeps its state in atomics, and
//! anything a pick hands out (a `Set-Cookie` value) is built with the balancer.

mod hash;
mod least_connections;
mod load;
mod maglev;
mod p2c;
mod peak_ewma;
mod random;
mod round_robin;
mod slow_start;
mod sticky;
mod weighted_round_robin;

use std::fmt::Debug;

use bytes::Bytes;

use crate::config::{Algorithm, ServiceConfig};
use crate::upstream::Pool;

pub use hash::{ConsistentHash, HashKey};
pub use least_connections::LeastConnections;
pub use load::LoadStats;
pub use maglev::Maglev;
pub use p2c::PowerOfTwo;
pub use peak_ewma::PeakEwma;
pub use random::Random;
pub use round_robin::RoundRobin;
pub use slow_start::SlowStart;
pub use sticky::{backend_id, Sticky};
pub use weighted_round_robin::WeightedRoundRobin;

/// What an algorithm may read about the request (hashing and sticky algorithms need it): the
/// protocol-neutral view, the client already resolved (`trusted_proxies`).
pub type RequestContext<'a> = crate::request::RequestView<'a>;

/// The outcome of a pick: the backend, and what the response must carry for the choice to
/// stick (a `Set-Cookie` value, shared with the balancer: cloning it does not allocate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pick {
    pub index: usize,
    pub set_cookie: Option<Bytes>,
}

impl Pick {
    pub fn at(index: usize) -> Pick {
        Pick { index, set_cookie: None }
    }
}

pub trait Balancer: Send + Sync + Debug {
    /// The backend in `pool` to use, among those for which `usable` is true. `None` when no
    /// usable backend is left.
    fn pick(&self, pool: &Pool, ctx: &RequestContext<'_>, usable: &dyn Fn(usize) -> bool) -> Option<Pick>;

    /// Whether the algorithm reads backends' response times ([`LoadStats::observe_ttfb`]): the
    /// request path only reads the clock for those that do.
    fn observes_latency(&self) -> bool {
        false
    }
}

/// Build the balancer for a service's pool.
pub fn build(service: &ServiceConfig, pool: &Pool) -> Box<dyn Balancer> {
    let balancing = &service.balancing;
    match (service.algorithm, &balancing.sticky) {
        (Algorithm::Sticky, Some(sticky)) => {
            let base = build_base(sticky.base, service, pool);
            Box::new(Sticky::new(&service.name, sticky, pool, base))
        }
        (algorithm, _) => build_base(algorithm, service, pool),
    }
}

fn build_base(algorithm: Algorithm, service: &ServiceConfig, pool: &Pool) -> Box<dyn Balancer> {
    let balancing = &service.balancing;
    let slow = SlowStart::new(balancing.slow_start);
    match algorithm {
        // Without weights, slow start needs some: the same rotation from equal weights.
        Algorithm::RoundRobin if slow.is_on() => Box::new(WeightedRoundRobin::new(&vec![1; pool.len()], slow)),
        Algorithm::RoundRobin => Box::new(RoundRobin::default()),
        Algorithm::WeightedRoundRobin => Box::new(WeightedRoundRobin::new(&pool.weights, slow)),
        Algorithm::LeastConnections => Box::new(LeastConnections::new(slow)),
        Algorithm::Random => Box::new(Random::new(&pool.weights, slow)),
        Algorithm::P2c => Box::new(PowerOfTwo::new(&pool.weights, slow)),
        Algorithm::PeakEwma => Box::new(PeakEwma::new(&pool.weights, slow)),
        Algorithm::IpHash => Box::new(ConsistentHash::new(HashKey::ClientIp, pool)),
        Algorithm::UrlHash if balancing.hash_query => Box::new(ConsistentHash::new(HashKey::PathAndQuery, pool)),
        Algorithm::UrlHash => Box::new(ConsistentHash::new(HashKey::Path, pool)),
        Algorithm::HeaderHash => {
            let name = balancing.hash_key.clone().unwrap_or_default();
            Box::new(ConsistentHash::new(HashKey::Header(name), pool))
        }
        // Validation refuses a sticky base of sticky, and sticky without its block.
        Algorithm::Sticky => Box::new(RoundRobin::default()),
    }
}

/// A uniform random `u64` (see [`crate::random`]).
pub fn random_u64() -> u64 {
    crate::random::u64()
}

/// A uniform number in `0..n` (`n` > 0), by multiply-shift rather than a division.
pub fn random_below(n: u64) -> u64 {
    ((u128::from(random_u64()) * u128::from(n)) >> 64) as u64
}

/// A fast, stable 64-bit hash: the same key maps to the same backend in every Velocity
/// process and version, so several instances (or a restart) agree. Not for secrets: a
/// multiply-xor per 8 bytes, then murmur3's finalizer, which spreads every input bit over the
/// output (the tables take the hash modulo their size).
pub fn hash64(seed: u64, data: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = seed ^ (data.len() as u64).wrapping_mul(K);
    let mut chunks = data.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        h = (h ^ u64::from_le_bytes(word)).wrapping_mul(K).rotate_left(29);
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        let mut word = [0u8; 8];
        word[..tail.len()].copy_from_slice(tail);
        h = (h ^ u64::from_le_bytes(word)).wrapping_mul(K).rotate_left(29);
    }
    fmix64(h)
}

/// Murmur3's 64-bit finalizer.
pub fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    h ^= h >> 33;
    h = h.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    h ^ (h >> 33)
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::sync::{Arc, LazyLock};

    use super::{Balancer, RequestContext};
    use crate::http1::RequestHead;
    use crate::request::{Protocol, Scheme};
    use crate::upstream::{Backend, Pool};

    static HEAD: LazyLock<RequestHead> = LazyLock::new(RequestHead::default);

    pub fn ctx() -> RequestContext<'static> {
        RequestContext::new(&HEAD, Scheme::Http, Protocol::Http1, SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0))
    }

    pub fn pool(weights: &[u32]) -> Pool {
        Pool::new(
            weights
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    let addr = SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16));
                    (Backend::new(format!("b{i}"), addr, &addr.to_string()), *w)
                })
                .collect::<Vec<(Arc<Backend>, u32)>>(),
        )
    }

    /// The index a pick gave, `99` for none.
    pub fn pick(b: &dyn Balancer, pool: &Pool, usable: &dyn Fn(usize) -> bool) -> usize {
        b.pick(pool, &ctx(), usable).map_or(99, |p| p.index)
    }

    /// How many of `n` picks went to each backend.
    pub fn counts(b: &dyn Balancer, pool: &Pool, n: usize, usable: &dyn Fn(usize) -> bool) -> Vec<usize> {
        let mut counts = vec![0; pool.len()];
        for _ in 0..n {
            if let Some(p) = b.pick(pool, &ctx(), usable) {
                counts[p.index] += 1;
            }
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable_and_spreads() {
        // Fixed values: a change here reshuffles every hashed key of every deployment.
        assert_eq!(hash64(0, b""), fmix64(0));
        assert_ne!(hash64(0, b"/a"), hash64(0, b"/b"));
        assert_ne!(hash64(0, b"12345678"), hash64(0, b"12345678\0"));
        let mut buckets = [0u32; 16];
        for i in 0..16_000u32 {
            buckets[(hash64(7, format!("/user/{i}").as_bytes()) % 16) as usize] += 1;
        }
        assert!(buckets.iter().all(|&b| (900..1100).contains(&b)), "{buckets:?}");
    }

    /// A discovered or managed service may have no backend yet (or scaled to zero).
    #[test]
    fn every_algorithm_picks_nothing_from_an_empty_pool() {
        let text = "listen: 127.0.0.1:8000\nservices:\n  - name: web\n    managed: {command: [\"{port}\"], ports: 9000-9009}\n";
        let base = crate::config::parse(std::path::Path::new("t.yaml"), text).unwrap().services.remove(0);
        let empty = test_support::pool(&[]);
        for algorithm in Algorithm::ALL {
            let mut svc = base.clone();
            svc.algorithm = algorithm;
            svc.balancing.hash_key = Some("x-user".into());
            svc.balancing.sticky =
                Some(crate::config::StickyConfig { cookie: "ID".into(), ttl: None, base: Algorithm::LeastConnections });
            for slow_start in [None, Some(std::time::Duration::from_secs(1))] {
                svc.balancing.slow_start = slow_start;
                let b = build(&svc, &empty);
                assert_eq!(test_support::pick(&*b, &empty, &|_| true), 99, "{}", algorithm.name());
            }
        }
    }

    #[test]
    fn random_below_is_in_range_and_spread() {
        let mut counts = [0u32; 5];
        for _ in 0..50_000 {
            counts[random_below(5) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (9_000..11_000).contains(&c)), "{counts:?}");
    }
}
