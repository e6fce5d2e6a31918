//! File descriptors: every client connection, backend connection (in flight or idle in a
//! pool) and listener is one. At start the soft `RLIMIT_NOFILE` is raised to the hard limit
//! (the soft default, often 1024, is far below what `max_client_connections` allows), and a
//! config that could need more than the limit is named at start, as HAProxy derives its
//! `maxconn` from the same limit, rather than found out as EMFILE under load.

use std::collections::HashSet;
use std::io;

use tracing::{info, warn};

use crate::config::Config;

/// Descriptors besides connections: stdio, the runtime's epoll and wakers, signal pipes, the
/// access log file, health checks in progress.
pub const RESERVED: u64 = 32;

/// Idle keep-alive connections a backend's pool may hold (`upstream::backend`).
const IDLE_PER_BACKEND: u64 = crate::upstream::MAX_IDLE_PER_BACKEND as u64;

/// What raising the limit found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoFile {
    /// The soft limit before.
    pub was: u64,
    /// The soft limit now: the most descriptors this process may have open.
    pub now: u64,
    pub hard: u64,
}

/// Raise the soft `RLIMIT_NOFILE` to the hard limit (on Linux an unlimited hard limit stops
/// at `fs.nr_open`).
#[cfg(unix)]
// `rlim_t` is u64 on Linux but not on every unix.
#[allow(clippy::unnecessary_cast)]
pub fn raise() -> io::Result<NoFile> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let was = lim.rlim_cur as u64;
    let hard = lim.rlim_max as u64;
    if lim.rlim_cur == lim.rlim_max {
        return Ok(NoFile { was, now: was, hard });
    }
    let mut target = lim.rlim_max;
    if target == libc::RLIM_INFINITY {
        // The kernel refuses more than fs.nr_open (1048576 unless raised).
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse().ok());
        target = nr_open.unwrap_or(1 << 20) as libc::rlim_t;
    }
    let raised = libc::rlimit { rlim_cur: target, rlim_max: lim.rlim_max };
    // SAFETY: setrlimit only reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(NoFile { was, now: target as u64, hard })
}

#[cfg(not(unix))]
pub fn raise() -> io::Result<NoFile> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "no RLIMIT_NOFILE here"))
}

/// The most descriptors `config` can have open at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub listeners: u64,
    /// `max_client_connections` per listener.
    pub per_listener: u64,
    /// Backend connections carrying a request: at most one per client connection, and at most
    /// the sum of `max_connections` when every backend has one.
    pub in_flight: u64,
    /// Distinct backend addresses, each with up to `IDLE_PER_BACKEND` idle connections.
    pub backends: u64,
    pub total: u64,
}

pub fn need(config: &Config) -> Need {
    let all = config.all_listeners();
    let listeners = all.len() as u64;
    // Listeners may have their own limits: the clients are their sum, the message shows the
    // largest.
    let per_listener = all.iter().map(|l| l.max_client_connections as u64).max().unwrap_or(0);
    let clients = all.iter().fold(0u64, |sum, l| sum.saturating_add(l.max_client_connections as u64));
    let mut addrs = HashSet::new();
    let mut capped: Option<u64> = Some(0);
    for b in config.services.iter().flat_map(|s| &s.backends) {
        addrs.insert(b.addr);
        capped = match (capped, b.max_connections) {
            (Some(sum), Some(max)) => Some(sum.saturating_add(max as u64)),
            _ => None,
        };
    }
    let in_flight = capped.map_or(clients, |c| c.min(clients));
    let backends = addrs.len() as u64;
    let total = clients
        .saturating_add(in_flight)
        .saturating_add(backends.saturating_mul(IDLE_PER_BACKEND))
        .saturating_add(listeners)
        .saturating_add(RESERVED);
    Need { listeners, per_listener, in_flight, backends, total }
}

/// Raise the limit and log it (once, at start).
pub fn raise_and_log() -> Option<u64> {
    match raise() {
        Ok(n) if n.now > n.was => {
            info!(soft_was = n.was, hard = n.hard, "file descriptors: soft limit raised to {}", n.now);
            Some(n.now)
        }
        Ok(n) => {
            info!(hard = n.hard, "file descriptors: limit {}", n.now);
            Some(n.now)
        }
        Err(e) => {
            warn!(error = %e, "file descriptors: cannot read or raise RLIMIT_NOFILE");
            None
        }
    }
}

/// Warn when `config` could need more descriptors than `limit`.
pub fn check(config: &Config, limit: u64) {
    let n = need(config);
    if n.total > limit {
        warn!(
            limit,
            needed = n.total,
            "file descriptors: the limit is {limit} but this config may need {}: max_client_connections {} x {} listener(s), \
             up to {} backend connection(s) in flight, {IDLE_PER_BACKEND} idle x {} backend(s), {} for the rest; \
             beyond the limit connections fail (EMFILE): lower max_client_connections or raise the hard limit \
             (ulimit -Hn, LimitNOFILE= in systemd)",
            n.total,
            n.per_listener,
            n.listeners,
            n.in_flight,
            n.backends,
            n.listeners + RESERVED,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_counts_clients_their_backend_connections_and_idle_pools() {
        let path = std::path::Path::new("t.yaml");
        let yaml = "listen: [127.0.0.1:1, 127.0.0.1:2]\nmax_client_connections: 100\nservices:\n  - name: a\n    backends:\n      - address: 127.0.0.1:9001\n      - address: 127.0.0.1:9002\n  - name: b\n    hosts: [b.local]\n    backends:\n      - address: 127.0.0.1:9001\n";
        let cfg = crate::config::parse(path, yaml).unwrap();
        let n = need(&cfg);
        assert_eq!((n.listeners, n.per_listener, n.in_flight, n.backends), (2, 100, 200, 2));
        assert_eq!(n.total, 200 + 200 + 2 * 512 + 2 + RESERVED);
    }

    #[test]
    fn max_connections_on_every_backend_caps_in_flight() {
        let path = std::path::Path::new("t.yaml");
        let yaml = "listen: 127.0.0.1:1\nservices:\n  - name: a\n    backends:\n      - address: 127.0.0.1:9001\n        max_connections: 10\n";
        let cfg = crate::config::parse(path, yaml).unwrap();
        assert_eq!(need(&cfg).in_flight, 10);
    }
}
