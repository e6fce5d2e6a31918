use std::fmt::Write as _;

use bytes::Bytes;

use super::{hash64, Balancer, Pick, RequestContext};
use crate::config::StickyConfig;
use crate::upstream::Pool;

/// `sticky`: the first answer to a client carries a cookie naming its backend (by an opaque
/// id); later requests with the cookie go to that backend while it is usable. Otherwise (no
/// cookie, an unknown id, the backend down, draining, full or failed for this request) the
/// base algorithm picks and the response resets the cookie.
#[derive(Debug)]
pub struct Sticky {
    cookie: String,
    /// Backend ids, by pool index.
    ids: Vec<u64>,
    /// The `Set-Cookie` value for each backend, built here so a pick only clones a `Bytes`.
    set_cookie: Vec<Bytes>,
    base: Box<dyn Balancer>,
}

/// The opaque id of a backend, as its cookie carries it: a hash of the service name and the
/// backend address, so it names the backend without showing its address, and is the same in
/// every Velocity process with this config (a restart or a second instance keeps sessions).
/// It is not a secret: anyone who knows the address can compute it, which only lets them pick
/// their own backend.
pub fn backend_id(service: &str, address: &str) -> u64 {
    hash64(hash64(0x7374_6963_6b79, service.as_bytes()), address.as_bytes())
}

impl Sticky {
    pub fn new(service: &str, cfg: &StickyConfig, pool: &Pool, base: Box<dyn Balancer>) -> Sticky {
        let ids: Vec<u64> = pool.backends.iter().map(|b| backend_id(service, &b.name)).collect();
        let set_cookie = ids
            .iter()
            .map(|id| {
                let mut v = format!("{}={id:016x}; Path=/", cfg.cookie);
                if let Some(ttl) = cfg.ttl {
                    let _ = write!(v, "; Max-Age={}", ttl.as_secs().max(1));
                }
                // `Secure` is added on TLS listeners, as the response is written.
                v.push_str("; HttpOnly; SameSite=Lax");
                let value = Bytes::from(v);
                // The first clone of a `Bytes` made from a `String` allocates its shared
                // header; do it here, so that every clone a pick makes is a count increment.
                drop(value.clone());
                value
            })
            .collect();
        Sticky { cookie: cfg.cookie.clone(), ids, set_cookie, base }
    }

    /// The pool index the request's cookie names, if it names one of ours.
    fn cookie_target(&self, ctx: &RequestContext<'_>) -> Option<usize> {
        let value = cookie_value(ctx.header("cookie")?, self.cookie.as_bytes())?;
        let id = parse_id(value)?;
        self.ids.iter().position(|&x| x == id)
    }
}

/// The value of cookie `name` in a `Cookie` header (`a=1; VELOCITY_ID=...; b=2`).
fn cookie_value<'a>(header: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    header.split(|&b| b == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let rest = pair.strip_prefix(name)?;
        rest.strip_prefix(b"=").map(<[u8]>::trim_ascii)
    })
}

/// Sixteen hex digits, as [`Sticky`] writes them.
fn parse_id(value: &[u8]) -> Option<u64> {
    let value = value.strip_prefix(b"\"").and_then(|v| v.strip_suffix(b"\"")).unwrap_or(value);
    if value.len() != 16 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(value).ok()?, 16).ok()
}

impl Balancer for Sticky {
    fn pick(&self, pool: &Pool, ctx: &RequestContext<'_>, usable: &dyn Fn(usize) -> bool) -> Option<Pick> {
        if let Some(i) = self.cookie_target(ctx) {
            if i < pool.len() && usable(i) {
                return Some(Pick::at(i));
            }
        }
        let pick = self.base.pick(pool, ctx, usable)?;
        let set_cookie = self.set_cookie.get(pick.index).cloned();
        Some(Pick { index: pick.index, set_cookie })
    }

    fn observes_latency(&self) -> bool {
        self.base.observes_latency()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::time::Duration;

    use bytes::BytesMut;

    use super::*;
    use crate::balancer::test_support::pool;
    use crate::balancer::RoundRobin;
    use crate::config::Algorithm;
    use crate::http1::RequestHead;
    use crate::request::{Protocol, Scheme};

    fn sticky(pool: &Pool) -> Sticky {
        let cfg = StickyConfig {
            cookie: "VELOCITY_ID".into(),
            ttl: Some(Duration::from_secs(3600)),
            base: Algorithm::RoundRobin,
        };
        Sticky::new("web", &cfg, pool, Box::new(RoundRobin::default()))
    }

    fn pick_with(s: &Sticky, pool: &Pool, cookie: Option<&str>, usable: &dyn Fn(usize) -> bool) -> Option<Pick> {
        let text = match cookie {
            Some(c) => format!("GET / HTTP/1.1\r\nhost: a\r\ncookie: {c}\r\n\r\n"),
            None => "GET / HTTP/1.1\r\nhost: a\r\n\r\n".to_owned(),
        };
        let mut head = RequestHead::default();
        assert!(matches!(head.parse(&mut BytesMut::from(text.as_str()), 65536), Ok(true)));
        s.pick(
            pool,
            &RequestContext::new(
                &head,
                Scheme::Http,
                Protocol::Http1,
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            ),
            usable,
        )
    }

    #[test]
    fn cookie_is_set_then_followed_then_reset() {
        let pool = pool(&[1, 1, 1]);
        let s = sticky(&pool);
        let first = pick_with(&s, &pool, None, &|_| true).unwrap();
        let set = String::from_utf8(first.set_cookie.clone().unwrap().to_vec()).unwrap();
        let id = format!("{:016x}", backend_id("web", &pool.backends[first.index].name));
        assert_eq!(set, format!("VELOCITY_ID={id}; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax"));
        assert!(!set.contains("127.0.0.1") && !set.contains("9000"));

        let cookie = format!("a=1; VELOCITY_ID={id}; b=2");
        for _ in 0..10 {
            assert_eq!(pick_with(&s, &pool, Some(&cookie), &|_| true), Some(Pick::at(first.index)));
        }
        // Its backend unusable: another one, with a new cookie.
        let moved = pick_with(&s, &pool, Some(&cookie), &|i| i != first.index).unwrap();
        assert_ne!(moved.index, first.index);
        assert!(moved.set_cookie.is_some());
        // Garbage and unknown ids are re-picked.
        for bad in ["VELOCITY_ID=zz", "VELOCITY_ID=0000000000000000", "VELOCITY_IDX=1", "VELOCITY_ID="] {
            assert!(pick_with(&s, &pool, Some(bad), &|_| true).unwrap().set_cookie.is_some(), "{bad}");
        }
    }

    #[test]
    fn ids_differ_by_service_and_address() {
        assert_ne!(backend_id("web", "127.0.0.1:1"), backend_id("api", "127.0.0.1:1"));
        assert_ne!(backend_id("web", "127.0.0.1:1"), backend_id("web", "127.0.0.1:2"));
        assert_eq!(parse_id(b"\"00000000000000ff\""), Some(255));
        assert_eq!(cookie_value(b"x=1;  VELOCITY_ID = abc", b"VELOCITY_ID"), None);
        assert_eq!(cookie_value(b"x=1;  VELOCITY_ID=abc ", b"VELOCITY_ID"), Some(&b"abc"[..]));
    }
}
