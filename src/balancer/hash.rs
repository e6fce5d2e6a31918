use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{fmix64, hash64, Balancer, Maglev, Pick, RequestContext};
use crate::upstream::Pool;

/// What a hashing algorithm hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// `ip_hash`: the client address (an IPv4-mapped IPv6 address counts as its IPv4 one).
    ClientIp,
    /// `url_hash`: the path, without the query (HAProxy's `balance uri`).
    Path,
    /// `url_hash` with `hash_query: true`: path and query (NGINX's `hash $request_uri`).
    PathAndQuery,
    /// `header_hash`: the value of this header (its name lower-cased).
    Header(String),
}

/// `ip_hash`, `url_hash`, `header_hash`: consistent hashing of a request key over a weighted
/// Maglev table of the whole configured pool (see [`Maglev`]). A request without the key (no
/// such header) is placed in rotation, as HAProxy's `balance hdr()` falls back to round robin.
#[derive(Debug)]
pub struct ConsistentHash {
    key: HashKey,
    table: Maglev,
    /// For requests without a key.
    next: AtomicU64,
}

impl ConsistentHash {
    pub fn new(key: HashKey, pool: &Pool) -> Self {
        let ids: Vec<u64> = pool.backends.iter().map(|b| hash64(0, b.name.as_bytes())).collect();
        ConsistentHash { key, table: Maglev::new(&ids, &pool.weights), next: AtomicU64::new(0) }
    }

    /// The request's hash, `None` when it has no key.
    fn hash(&self, ctx: &RequestContext<'_>) -> Option<u64> {
        match &self.key {
            HashKey::ClientIp => Some(match ctx.client_ip().to_canonical() {
                IpAddr::V4(v4) => hash64(0, &v4.octets()),
                IpAddr::V6(v6) => hash64(0, &v6.octets()),
            }),
            HashKey::Path => Some(hash64(0, ctx.path())),
            HashKey::PathAndQuery => Some(hash64(0, ctx.path_and_query())),
            HashKey::Header(name) => ctx.header(name).map(|v| hash64(0, v.trim_ascii())),
        }
    }
}

impl Balancer for ConsistentHash {
    fn pick(&self, pool: &Pool, ctx: &RequestContext<'_>, usable: &dyn Fn(usize) -> bool) -> Option<Pick> {
        let hash = self.hash(ctx).unwrap_or_else(|| fmix64(self.next.fetch_add(1, Ordering::Relaxed)));
        self.table.lookup(hash, pool.len(), usable).map(Pick::at)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use bytes::BytesMut;

    use super::*;
    use crate::balancer::test_support::pool;
    use crate::http1::RequestHead;
    use crate::request::{Protocol, Scheme};
    use std::net::SocketAddr;

    fn head(text: &str) -> RequestHead {
        let mut h = RequestHead::default();
        let mut buf = BytesMut::from(text);
        assert!(matches!(h.parse(&mut buf, 64 * 1024), Ok(true)));
        h
    }

    fn pick_for(b: &ConsistentHash, pool: &Pool, ip: IpAddr, h: &RequestHead) -> usize {
        b.pick(pool, &RequestContext::new(h, Scheme::Http, Protocol::Http1, SocketAddr::new(ip, 0)), &|_| true)
            .map_or(99, |p| p.index)
    }

    #[test]
    fn keys_are_what_the_algorithm_says() {
        let pool = pool(&[1, 1, 1, 1, 1, 1, 1, 1]);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let url = ConsistentHash::new(HashKey::Path, &pool);
        let a = head("GET /cart/1?x=1 HTTP/1.1\r\nhost: a\r\n\r\n");
        let b = head("GET /cart/1?x=2 HTTP/1.1\r\nhost: a\r\n\r\n");
        assert_eq!(pick_for(&url, &pool, ip, &a), pick_for(&url, &pool, ip, &b));
        let urlq = ConsistentHash::new(HashKey::PathAndQuery, &pool);
        assert_eq!(
            urlq.hash(&RequestContext::new(&a, Scheme::Http, Protocol::Http1, SocketAddr::new(ip, 0))),
            Some(hash64(0, b"/cart/1?x=1"))
        );

        let by_ip = ConsistentHash::new(HashKey::ClientIp, &pool);
        let mapped = IpAddr::V6("::ffff:192.0.2.7".parse::<Ipv6Addr>().unwrap());
        assert_eq!(pick_for(&by_ip, &pool, ip, &a), pick_for(&by_ip, &pool, mapped, &a));

        let by_header = ConsistentHash::new(HashKey::Header("x-user".into()), &pool);
        let u1 = head("GET / HTTP/1.1\r\nhost: a\r\nX-User:  alice \r\n\r\n");
        let u2 = head("GET /other HTTP/1.1\r\nhost: a\r\nx-user: alice\r\n\r\n");
        assert_eq!(pick_for(&by_header, &pool, ip, &u1), pick_for(&by_header, &pool, ip, &u2));
        // Without the header: rotation, so all backends get some.
        let none = head("GET / HTTP/1.1\r\nhost: a\r\n\r\n");
        let mut seen = [false; 8];
        for _ in 0..200 {
            seen[pick_for(&by_header, &pool, ip, &none)] = true;
        }
        assert!(seen.iter().all(|&s| s), "{seen:?}");
    }
}
