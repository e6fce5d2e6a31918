//! Host and path routing, built once per config.

use std::collections::HashMap;

use crate::config::{HostPattern, ServiceConfig};

/// Routes of one host pattern: (path prefix, service index), longest prefix first.
#[derive(Debug, Default)]
struct Routes(Vec<(Box<str>, usize)>);

impl Routes {
    fn add(&mut self, prefix: &str, service: usize) {
        self.0.push((prefix.into(), service));
        self.0.sort_by_key(|r| std::cmp::Reverse(r.0.len()));
    }

    fn find(&self, path: &str) -> Option<usize> {
        self.0.iter().find(|(p, _)| path.starts_with(&**p)).map(|&(_, s)| s)
    }
}

/// Picks a service by Host (exact, then longest wildcard suffix, then default) and then by the
/// longest matching path prefix. A host level with no matching prefix falls through to the next.
#[derive(Debug, Default)]
pub struct Router {
    exact: HashMap<Box<str>, Routes>,
    /// (suffix such as `.web.local`, routes), longest suffix first.
    wildcard: Vec<(Box<str>, Routes)>,
    default: Routes,
}

/// Hosts longer than this are not matched against exact names (none is that long: DNS caps at 253).
const MAX_HOST: usize = 256;

impl Router {
    pub fn new(services: &[ServiceConfig]) -> Router {
        Router::without(services, &[])
    }

    /// Routes for every service but those named in `skip` (the services of tcp listeners,
    /// which take whole connections rather than requests).
    pub fn without(services: &[ServiceConfig], skip: &[&str]) -> Router {
        let mut router = Router::default();
        for (i, svc) in services.iter().enumerate() {
            if skip.contains(&svc.name.as_str()) {
                continue;
            }
            if svc.hosts.is_empty() {
                router.default.add(&svc.path_prefix, i);
            }
            for host in &svc.hosts {
                match host {
                    HostPattern::Exact(h) => {
                        router.exact.entry(h.as_str().into()).or_default().add(&svc.path_prefix, i)
                    }
                    HostPattern::Wildcard(suffix) => match router.wildcard.iter_mut().find(|(s, _)| **s == **suffix) {
                        Some((_, routes)) => routes.add(&svc.path_prefix, i),
                        None => {
                            let mut routes = Routes::default();
                            routes.add(&svc.path_prefix, i);
                            router.wildcard.push((suffix.as_str().into(), routes));
                        }
                    },
                }
            }
        }
        router.wildcard.sort_by_key(|w| std::cmp::Reverse(w.0.len()));
        router
    }

    /// The index of the service for this Host header value (port allowed) and path.
    pub fn route(&self, host: &str, path: &str) -> Option<usize> {
        let mut buf = [0u8; MAX_HOST];
        if let Some(host) = lowercase(strip_port(host), &mut buf) {
            if let Some(s) = self.exact.get(host).and_then(|r| r.find(path)) {
                return Some(s);
            }
            for (suffix, routes) in &self.wildcard {
                if host.len() > suffix.len() && host.ends_with(&**suffix) {
                    if let Some(s) = routes.find(path) {
                        return Some(s);
                    }
                }
            }
        }
        self.default.find(path)
    }

    /// The body of the 404 for a request that [`Router::route`] found no service for: whether
    /// the host is known (and only the path matched nothing) or not. Not on the hot path.
    pub fn explain_miss(&self, host: &str, path: &str) -> String {
        let mut buf = [0u8; MAX_HOST];
        let known = lowercase(strip_port(host), &mut buf).is_some_and(|h| {
            self.exact.contains_key(h) || self.wildcard.iter().any(|(s, _)| h.len() > s.len() && h.ends_with(&**s))
        });
        if known {
            format!("404 not found: host {host:?} has services, but no path_prefix of theirs matches {path:?}\n")
        } else if !self.default.0.is_empty() {
            format!("404 not found: no service for host {host:?}, and no path_prefix of the default services matches {path:?}\n")
        } else {
            format!("404 not found: no service for host {host:?}\n")
        }
    }
}

/// `host` lowercased into `buf`, if it fits (no configured name is longer).
fn lowercase<'a>(host: &str, buf: &'a mut [u8; MAX_HOST]) -> Option<&'a str> {
    let b = buf.get_mut(..host.len())?;
    b.copy_from_slice(host.as_bytes());
    b.make_ascii_lowercase();
    std::str::from_utf8(b).ok()
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest);
    }
    // From the end: the port's digits, then the colon before them. Bytes, not a char search:
    // this runs for every request.
    let bytes = host.as_bytes();
    let digits = bytes.iter().rev().take_while(|b| b.is_ascii_digit()).count();
    match bytes.len().checked_sub(digits + 1) {
        Some(colon) if bytes[colon] == b':' => &host[..colon],
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Algorithm;

    fn svc(name: &str, hosts: &[HostPattern], prefix: &str) -> ServiceConfig {
        ServiceConfig {
            name: name.into(),
            hosts: hosts.to_vec(),
            path_prefix: prefix.into(),
            algorithm: Algorithm::RoundRobin,
            backend_protocol: Default::default(),
            backends: vec![],
            health: Default::default(),
            limits: Default::default(),
            balancing: Default::default(),
            policy: Default::default(),
            discovery: Default::default(),
            managed: None,
        }
    }

    #[test]
    fn host_then_longest_prefix() {
        let router = Router::new(&[
            svc("default", &[], "/"),
            svc("web", &[HostPattern::Exact("web.local".into())], "/"),
            svc("api", &[HostPattern::Exact("web.local".into())], "/api"),
            svc("wild", &[HostPattern::Wildcard(".web.local".into())], "/"),
        ]);
        assert_eq!(router.route("web.local", "/"), Some(1));
        assert_eq!(router.route("WEB.local:8080", "/api/x"), Some(2));
        assert_eq!(router.route("a.web.local", "/api"), Some(3));
        assert_eq!(router.route("other", "/"), Some(0));
        assert_eq!(router.route("web.local.evil", "/"), Some(0));
    }

    #[test]
    fn no_default_no_route() {
        let router = Router::new(&[svc("api", &[HostPattern::Exact("a".into())], "/api")]);
        assert_eq!(router.route("a", "/other"), None);
        assert_eq!(router.route("b", "/api"), None);
        assert!(router.explain_miss("A:80", "/other").contains("host \"A:80\" has services, but no path_prefix"));
        assert_eq!(router.explain_miss("b", "/api"), "404 not found: no service for host \"b\"\n");
    }

    #[test]
    fn ports_and_ipv6() {
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("h:80"), "h");
        assert_eq!(strip_port("h"), "h");
        assert_eq!(strip_port("h:"), "h");
        assert_eq!(strip_port("h:8x"), "h:8x");
        assert_eq!(strip_port("a:b:80"), "a:b");
        assert_eq!(strip_port("80"), "80");
        assert_eq!(strip_port(""), "");
    }
}
