//! Header rewriting between client and backend.

use hyper::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Remove hop-by-hop headers (RFC 9110 7.6.1): the fixed list, and any named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names first: most messages carry none of these, and a `remove` costs a
    // hash of the name each time.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // `remove` returns only the first `Connection` value but removes them all; a second
    // `Connection` line naming more headers is rare enough to accept that.
    if let Some(connection) = headers.remove(header::CONNECTION) {
        if let Ok(list) = connection.to_str() {
            for name in list.split(',') {
                if let Ok(name) = HeaderName::from_bytes(name.trim().as_bytes()) {
                    headers.remove(name);
                }
            }
        }
    }
    for name in
        [&KEEP_ALIVE, &PROXY_CONNECTION, &header::TE, &header::TRAILER, &header::TRANSFER_ENCODING, &header::UPGRADE]
    {
        headers.remove(name);
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
}

/// Add the forwarding headers NGINX users expect: the client appended to `X-Forwarded-For`,
/// `X-Forwarded-Proto` and `X-Forwarded-Host` set to what the client used.
pub fn add_forwarding(
    headers: &mut HeaderMap,
    client_ip: &HeaderValue,
    proto: &HeaderValue,
    host: Option<&HeaderValue>,
) {
    // One hash of the name whether or not the client sent the header.
    match headers.entry(&X_FORWARDED_FOR) {
        Entry::Occupied(mut e) => {
            // Several `X-Forwarded-For` lines are one list (RFC 9110 5.3); keep them all.
            let mut v = Vec::with_capacity(64);
            for prev in e.iter() {
                v.extend_from_slice(prev.as_bytes());
                v.extend_from_slice(b", ");
            }
            v.extend_from_slice(client_ip.as_bytes());
            let joined = HeaderValue::from_bytes(&v).unwrap_or_else(|_| client_ip.clone());
            e.insert(joined);
        }
        Entry::Vacant(e) => {
            e.insert(client_ip.clone());
        }
    }
    headers.insert(X_FORWARDED_PROTO.clone(), proto.clone());
    if let Some(host) = host {
        headers.insert(X_FORWARDED_HOST.clone(), host.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_listed_and_fixed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn appends_xff() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        let ip = HeaderValue::from_static("127.0.0.1");
        add_forwarding(&mut h, &ip, &HeaderValue::from_static("http"), Some(&HeaderValue::from_static("a")));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.2"));
        add_forwarding(&mut h, &ip, &HeaderValue::from_static("http"), None);
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1, 10.0.0.2, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "a");
    }
}
