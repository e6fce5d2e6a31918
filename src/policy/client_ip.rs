//! Who the client is: the socket peer, unless the peer is one of `trusted_proxies`; then the
//! right-most address of `X-Forwarded-For` (or, without it, `Forwarded: for=`) that is not a
//! trusted proxy itself. Addresses to the left of that one were written by the client and
//! are not believed.

use std::net::IpAddr;

use crate::request::RequestView;

use super::IpSet;

/// The client of a request whose socket peer is `peer`.
pub fn resolve(trusted: &IpSet, req: &RequestView<'_>) -> IpAddr {
    let (peer, head) = (req.client_ip(), req);
    if !trusted.contains(peer) {
        return peer;
    }
    // The nearest hop first: the last header line, its last item.
    let mut lines = head.headers_named("x-forwarded-for").peekable();
    if lines.peek().is_some() {
        let items = lines.rev().flat_map(|line| line.rsplit(|&b| b == b','));
        return walk(trusted, peer, items.map(parse_xff_item));
    }
    let lines = head.headers_named("forwarded");
    let items = lines.rev().flat_map(|line| line.rsplit(|&b| b == b',')).map(forwarded_for);
    walk(trusted, peer, items)
}

/// From the nearest hop outward: the first address that is not a trusted proxy. An item that
/// is not an address (`unknown`, an obfuscated name, garbage) ends the walk at the last
/// trusted hop, as nothing beyond it can be believed.
fn walk(trusted: &IpSet, peer: IpAddr, items: impl Iterator<Item = Option<IpAddr>>) -> IpAddr {
    let mut last = peer;
    for item in items {
        match item {
            Some(ip) if trusted.contains(ip) => last = ip,
            Some(ip) => return ip,
            None => return last,
        }
    }
    last
}

fn parse_xff_item(item: &[u8]) -> Option<IpAddr> {
    parse_addr(trim(item))
}

/// `for=` of one `Forwarded` element (`for=192.0.2.1;proto=http`), `None` when absent or not
/// an address.
fn forwarded_for(element: &[u8]) -> Option<IpAddr> {
    element.split(|&b| b == b';').find_map(|pair| {
        let pair = trim(pair);
        let (k, v) = pair.split_at(pair.iter().position(|&b| b == b'=')?);
        if !k.eq_ignore_ascii_case(b"for") {
            return None;
        }
        let v = trim(&v[1..]);
        let v = v.strip_prefix(b"\"").and_then(|v| v.strip_suffix(b"\"")).unwrap_or(v);
        parse_addr(v)
    })
}

/// `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`, `[2001:db8::1]` or `[2001:db8::1]:4711`.
fn parse_addr(s: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(s).ok()?;
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        let end = rest.find(']')?;
        return rest[..end].parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6);
    }
    let (host, port) = s.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

fn trim(s: &[u8]) -> &[u8] {
    s.trim_ascii()
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;
    use crate::config::parse_net;
    use crate::http1::RequestHead;
    use crate::request::{Protocol, Scheme};

    fn head(headers: &str) -> RequestHead {
        let mut h = RequestHead::default();
        let mut buf = BytesMut::from(format!("GET / HTTP/1.1\r\nHost: a\r\n{headers}\r\n").as_bytes());
        assert!(h.parse(&mut buf, 64 * 1024).unwrap());
        h
    }

    fn trusted() -> IpSet {
        let nets: Vec<_> = ["10.0.0.0/8", "2001:db8::/32"].iter().map(|n| parse_net(n).unwrap()).collect();
        IpSet::new(&nets)
    }

    fn client(peer: &str, headers: &str) -> String {
        let head = head(headers);
        let peer = std::net::SocketAddr::new(peer.parse().unwrap(), 0);
        resolve(&trusted(), &RequestView::new(&head, Scheme::Http, Protocol::Http1, peer)).to_string()
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_it_sends() {
        assert_eq!(client("192.0.2.1", "X-Forwarded-For: 198.51.100.1\r\n"), "192.0.2.1");
    }

    #[test]
    fn right_most_untrusted_address_of_x_forwarded_for() {
        assert_eq!(client("10.0.0.1", "X-Forwarded-For: 1.1.1.1, 198.51.100.1, 10.0.0.2\r\n"), "198.51.100.1");
        // Several lines are one list.
        assert_eq!(
            client("10.0.0.1", "X-Forwarded-For: 1.1.1.1\r\nA: b\r\nX-Forwarded-For: 203.0.113.9, 10.9.9.9\r\n"),
            "203.0.113.9"
        );
        // All trusted: the left-most.
        assert_eq!(client("10.0.0.1", "X-Forwarded-For: 10.1.1.1, 10.2.2.2\r\n"), "10.1.1.1");
        // Garbage stops the walk at the last trusted hop.
        assert_eq!(client("10.0.0.1", "X-Forwarded-For: 1.1.1.1, junk, 10.3.3.3\r\n"), "10.3.3.3");
        assert_eq!(client("10.0.0.1", "X-Forwarded-For: [2001:db8::1]:80, 198.51.100.7:5000\r\n"), "198.51.100.7");
        assert_eq!(client("::ffff:10.0.0.1", "X-Forwarded-For: 2001:db9::5\r\n"), "2001:db9::5");
        // No header: the peer.
        assert_eq!(client("10.0.0.1", ""), "10.0.0.1");
    }

    #[test]
    fn forwarded_for_when_there_is_no_x_forwarded_for() {
        assert_eq!(
            client("10.0.0.1", "Forwarded: for=198.51.100.3;proto=http, For=\"[2001:db8::9]:4711\"\r\n"),
            "198.51.100.3"
        );
        assert_eq!(client("10.0.0.1", "Forwarded: for=unknown\r\n"), "10.0.0.1");
        assert_eq!(client("10.0.0.1", "Forwarded: proto=https;for=\"192.0.2.60:8080\"\r\n"), "192.0.2.60");
    }
}
