//! Validation of timeouts, limits, the request queue and shutdown settings, and their YAML.
//! Kept apart from `validate.rs` so that other sections of the config can grow there
//! independently.

use std::fmt::Write as _;
use std::time::Duration;

use super::schema::{RawBackend, RawConfig, RawQueue, RawService, RawShutdown, RawTimeouts, Scalar, S};
use super::validate::Ctx;
use super::value::{self, format_duration, Bounds, DAY, GIB, HOUR, KIB, MILLISECOND};
use super::{Config, Limits, QueueConfig, ServiceConfig, ServiceLimits, Shutdown, Timeouts};

/// `max_header_bytes`: room for a request line at least; at most what NGINX's largest usual
/// `large_client_header_buffers` hold, as a head is kept whole in memory.
const HEADER_BYTES: Bounds<u64> = Bounds { min: KIB, max: 256 * KIB };
/// `max_body_bytes`: bodies are streamed, never held whole, so the bound is only against a
/// typo; 0 refuses every body.
const BODY_BYTES: Bounds<u64> = Bounds { min: 0, max: 1024 * GIB };
const MAX_CONNECTIONS: i64 = 1_000_000;
const MAX_QUEUE: i64 = 1_000_000;

/// Upper bounds keep every deadline far from `Instant` overflow (an absurd `request: 100000000h`
/// panicked at `Instant + Duration`) while leaving room for what HAProxy and NGINX users set:
/// hours-long idle or streaming connections, day-long drains.
const fn up_to(max: Duration) -> Bounds<Duration> {
    Bounds { min: MILLISECOND, max }
}
const CLIENT_HEADER: Bounds<Duration> = up_to(HOUR);
const CLIENT_IDLE: Bounds<Duration> = up_to(DAY);
const CLIENT_SEND: Bounds<Duration> = up_to(DAY);
/// The kernel gives up on a SYN after about two minutes anyway (NGINX caps it at 75 s).
const CONNECT: Bounds<Duration> = up_to(Duration::from_secs(5 * 60));
const BACKEND_RESPONSE: Bounds<Duration> = up_to(DAY);
const REQUEST: Bounds<Duration> = up_to(DAY);
/// WebSocket and TCP connections may sit quiet for long (HAProxy's `timeout tunnel`).
const TUNNEL_IDLE: Bounds<Duration> = up_to(Duration::from_secs(7 * 24 * 3600));
const DRAIN: Bounds<Duration> = up_to(DAY);
const QUEUE_TIMEOUT: Bounds<Duration> = up_to(HOUR);

/// The top-level `timeouts`, `max_header_bytes`, `max_client_connections` and `shutdown`.
pub fn global(ctx: &mut Ctx, raw: &mut RawConfig) -> (Limits, Shutdown) {
    let mut limits = Limits::default();
    if let Some(t) = raw.timeouts.take() {
        limits.timeouts = timeouts(ctx, t.value, &Timeouts::default(), true);
    }
    if let Some(v) = raw.max_header_bytes.take() {
        if let Some(n) = value::size(ctx, "max_header_bytes", &v, HEADER_BYTES) {
            limits.max_header_bytes = n as usize;
        }
    }
    if let Some(v) = raw.max_client_connections.take() {
        if let Some(n) = count(ctx, "max_client_connections", &v, 1, MAX_CONNECTIONS) {
            limits.max_client_connections = n;
        }
    }
    let mut shutdown = Shutdown::default();
    if let Some(s) = raw.shutdown.take() {
        let RawShutdown { drain_timeout } = s.value;
        if let Some(d) = drain_timeout.and_then(|d| value::duration(ctx, "drain_timeout", &d, DRAIN)) {
            shutdown.drain_timeout = d;
        }
    }
    (limits, shutdown)
}

/// A service's `timeouts`, `max_body_bytes` and `queue`, over the global timeouts.
pub fn service(ctx: &mut Ctx, raw: &mut RawService, global: &Timeouts) -> ServiceLimits {
    let mut limits = ServiceLimits { timeouts: *global, ..ServiceLimits::default() };
    if let Some(t) = raw.timeouts.take() {
        limits.timeouts = timeouts(ctx, t.value, global, false);
    }
    if let Some(v) = raw.max_body_bytes.take() {
        limits.max_body_bytes = value::size(ctx, "max_body_bytes", &v, BODY_BYTES);
    }
    if let Some(q) = raw.queue.take() {
        let RawQueue { size, timeout } = q.value;
        if let Some(n) = size.and_then(|s| count(ctx, "queue size", &s, 0, MAX_QUEUE)) {
            limits.queue.size = n;
        }
        if let Some(d) = timeout.and_then(|t| value::duration(ctx, "queue timeout", &t, QUEUE_TIMEOUT)) {
            limits.queue.timeout = d;
        }
    }
    limits
}

/// A backend's `max_connections`.
pub fn backend(ctx: &mut Ctx, raw: &RawBackend) -> Option<usize> {
    raw.max_connections.as_ref().and_then(|v| count(ctx, "max_connections", v, 1, MAX_CONNECTIONS))
}

fn timeouts(ctx: &mut Ctx, raw: RawTimeouts, base: &Timeouts, top_level: bool) -> Timeouts {
    let RawTimeouts { client_header, client_idle, client_send, connect, backend_response, request, tunnel_idle } = raw;
    let mut out = *base;
    for (key, value, slot, bounds) in [
        ("client_header", client_header, &mut out.client_header, CLIENT_HEADER),
        ("client_idle", client_idle, &mut out.client_idle, CLIENT_IDLE),
        ("client_send", client_send, &mut out.client_send, CLIENT_SEND),
        ("connect", connect, &mut out.connect, CONNECT),
        ("backend_response", backend_response, &mut out.backend_response, BACKEND_RESPONSE),
        ("request", request, &mut out.request, REQUEST),
        ("tunnel_idle", tunnel_idle, &mut out.tunnel_idle, TUNNEL_IDLE),
    ] {
        let Some(value) = value else { continue };
        if !top_level && key.starts_with("client_") {
            // They run before the request is routed, so no service is known yet.
            ctx.error(
                &value.referenced,
                format!("`{key}` applies to client connections before routing; set it in the top-level `timeouts`"),
            );
            continue;
        }
        if let Some(d) = value::duration(ctx, key, &value, bounds) {
            *slot = d;
        }
    }
    out
}

pub(super) fn count(ctx: &mut Ctx, key: &str, v: &S<Scalar>, min: i64, max: i64) -> Option<usize> {
    value::whole(ctx, key, v, min, max).and_then(|n| usize::try_from(n).ok())
}

/// YAML for the top-level settings that differ from the defaults.
pub fn global_yaml(out: &mut String, cfg: &Config) {
    let l = &cfg.limits;
    let t = timeouts_yaml(&l.timeouts, &Timeouts::default());
    if !t.is_empty() {
        let _ = writeln!(out, "timeouts: {{{t}}}");
    }
    if l.max_header_bytes != Limits::default().max_header_bytes {
        let _ = writeln!(out, "max_header_bytes: {}", l.max_header_bytes);
    }
    if l.max_client_connections != Limits::default().max_client_connections {
        let _ = writeln!(out, "max_client_connections: {}", l.max_client_connections);
    }
    if cfg.shutdown != Shutdown::default() {
        let _ = writeln!(out, "shutdown: {{drain_timeout: {}}}", format_duration(cfg.shutdown.drain_timeout));
    }
}

/// YAML lines (indented for a service) for the service settings that differ from the defaults.
pub fn service_yaml(out: &mut String, s: &ServiceConfig, global: &Timeouts) {
    let t = timeouts_yaml(&s.limits.timeouts, global);
    if !t.is_empty() {
        let _ = writeln!(out, "    timeouts: {{{t}}}");
    }
    if let Some(n) = s.limits.max_body_bytes {
        let _ = writeln!(out, "    max_body_bytes: {n}");
    }
    if s.limits.queue != QueueConfig::default() {
        let q = s.limits.queue;
        let _ = writeln!(out, "    queue: {{size: {}, timeout: {}}}", q.size, format_duration(q.timeout));
    }
}

fn timeouts_yaml(t: &Timeouts, base: &Timeouts) -> String {
    [
        ("client_header", t.client_header, base.client_header),
        ("client_idle", t.client_idle, base.client_idle),
        ("client_send", t.client_send, base.client_send),
        ("connect", t.connect, base.connect),
        ("backend_response", t.backend_response, base.backend_response),
        ("request", t.request, base.request),
        ("tunnel_idle", t.tunnel_idle, base.tunnel_idle),
    ]
    .iter()
    .filter(|(_, v, b)| v != b)
    .map(|(k, v, _)| format!("{k}: {}", format_duration(*v)))
    .collect::<Vec<_>>()
    .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{assert_prefixes, errors, load};

    const FULL: &str = "\
listen: 127.0.0.1:8000
timeouts: {client_header: 5s, client_idle: 30s, client_send: 15s, connect: 500ms, backend_response: 10s, request: 20s}
max_header_bytes: 16k
max_client_connections: 500
shutdown: {drain_timeout: 5s}
services:
  - name: web
    timeouts: {backend_response: 2s}
    max_body_bytes: 1m
    queue: {size: 10, timeout: 1s}
    backends:
      - address: 127.0.0.1:9001
        max_connections: 4
  - name: other
    path_prefix: /other
    backends: [{address: 127.0.0.1:9002}]
";

    #[test]
    fn all_keys() {
        let cfg = load(FULL).unwrap();
        let t = cfg.limits.timeouts;
        assert_eq!(t.client_header, Duration::from_secs(5));
        assert_eq!(t.client_idle, Duration::from_secs(30));
        assert_eq!(t.client_send, Duration::from_secs(15));
        assert_eq!(t.connect, Duration::from_millis(500));
        assert_eq!(cfg.limits.max_header_bytes, 16 * 1024);
        assert_eq!(cfg.limits.max_client_connections, 500);
        assert_eq!(cfg.shutdown.drain_timeout, Duration::from_secs(5));
        let web = &cfg.services[0].limits;
        // Overridden here, inherited from the top level otherwise.
        assert_eq!(web.timeouts.backend_response, Duration::from_secs(2));
        assert_eq!(web.timeouts.request, Duration::from_secs(20));
        assert_eq!(web.timeouts.connect, Duration::from_millis(500));
        assert_eq!(web.max_body_bytes, Some(1 << 20));
        assert_eq!(web.queue, QueueConfig { size: 10, timeout: Duration::from_secs(1) });
        assert_eq!(cfg.services[0].backends[0].max_connections, Some(4));
        let other = &cfg.services[1].limits;
        assert_eq!(other.timeouts, t);
        assert_eq!(other.max_body_bytes, None);
        assert_eq!(other.queue, QueueConfig::default());
        assert_eq!(cfg.services[1].backends[0].max_connections, None);
    }

    #[test]
    fn tunnel_idle_defaults_to_an_hour_and_is_set_per_service() {
        let text = "listen: 127.0.0.1:8000\ntimeouts: {tunnel_idle: 2h}\nservices:\n  - name: a\n    timeouts: {tunnel_idle: 30s}\n    backends: [{address: 127.0.0.1:1}]\n  - name: b\n    path_prefix: /b\n    backends: [{address: 127.0.0.1:2}]\n";
        let cfg = load(text).unwrap();
        assert_eq!(Timeouts::default().tunnel_idle, HOUR);
        assert_eq!(cfg.limits.timeouts.tunnel_idle, 2 * HOUR);
        assert_eq!(cfg.services[0].limits.timeouts.tunnel_idle, Duration::from_secs(30));
        assert_eq!(cfg.services[1].limits.timeouts.tunnel_idle, 2 * HOUR);
        assert_prefixes(
            &errors("listen: 127.0.0.1:8000\ntimeouts: {tunnel_idle: 5}\n"),
            &["1:1: missing `services`", "2:25: tunnel_idle: duration \"5\" is missing a unit"],
        );
    }

    #[test]
    fn defaults() {
        let cfg =
            load("listen: 127.0.0.1:8000\nservices:\n  - name: a\n    backends: [{address: 127.0.0.1:1}]\n").unwrap();
        assert_eq!(cfg.limits, Limits::default());
        assert_eq!(cfg.shutdown, Shutdown::default());
        assert_eq!(cfg.services[0].limits, ServiceLimits::default());
        assert_eq!(cfg.limits.timeouts.client_header, Duration::from_secs(10));
        assert_eq!(cfg.limits.timeouts.request, Duration::from_secs(60));
    }

    #[test]
    fn errors_at_their_positions() {
        let text = "\
listen: 127.0.0.1:8000
timeouts: {connect: 5, request: 0s, client_idle: soon}
max_header_bytes: 10
max_client_connections: 0
shutdown: {drain_timeout: 1d}
services:
  - name: web
    timeouts: {client_header: 1s}
    max_body_bytes: 1x
    queue: {size: -1, timeout: 1}
    backends:
      - address: 127.0.0.1:9001
        max_connections: 0
";
        let e = errors(text);
        let expected = [
            "2:21: connect: duration \"5\" is missing a unit",
            "2:33: request must be from 1ms to 24h, got \"0s\"",
            "2:50: client_idle: invalid duration",
            "3:19: max_header_bytes must be from 1k to 256k bytes, got 10",
            "4:25: max_client_connections must be a whole number from 1 to 1000000, got 0",
            "5:27: drain_timeout: invalid duration unit",
            "8:31: `client_header` applies to client connections before routing",
            "9:21: max_body_bytes: invalid size unit",
            "10:19: queue size must be a whole number from 0 to 1000000, got -1",
            "10:32: queue timeout: duration \"1\" is missing a unit",
            "13:26: max_connections must be a whole number from 1 to 1000000, got 0",
        ];
        assert_prefixes(&e, &expected);
    }

    #[test]
    fn unknown_keys_are_reported() {
        let e = errors("listen: 127.0.0.1:8000\ntimeouts: {conect: 1s}\nservices: []\n");
        assert!(e[0].starts_with("2:12: unknown key `conect`"), "{e:?}");
    }

    /// An absurd value is a config error at its position, not a panic at `Instant + Duration`
    /// when the first request arrives.
    #[test]
    fn durations_and_sizes_have_upper_bounds() {
        let text = "\
listen: 127.0.0.1:8000
timeouts: {request: 100000000h, client_header: 2h, client_idle: 25h, client_send: 25h, connect: 6m, backend_response: 25h}
shutdown: {drain_timeout: 25h}
services:
  - name: web
    max_body_bytes: 1025g
    queue: {timeout: 2h}
    backends: [{address: 127.0.0.1:9001}]
";
        let e = errors(text);
        let expected = [
            "2:21: request must be from 1ms to 24h, got \"100000000h\"",
            "2:48: client_header must be from 1ms to 1h, got \"2h\"",
            "2:65: client_idle must be from 1ms to 24h",
            "2:83: client_send must be from 1ms to 24h",
            "2:97: connect must be from 1ms to 5m",
            "2:119: backend_response must be from 1ms to 24h",
            "3:27: drain_timeout must be from 1ms to 24h",
            "6:21: max_body_bytes must be from 0 to 1024g bytes, got \"1025g\"",
            "7:22: queue timeout must be from 1ms to 1h",
        ];
        assert_prefixes(&e, &expected);
        // The bounds themselves are allowed.
        let at_the_bounds = "\
listen: 127.0.0.1:8000
timeouts: {request: 24h, client_header: 1h, client_idle: 24h, client_send: 1ms, connect: 5m, backend_response: 24h}
shutdown: {drain_timeout: 24h}
services:
  - name: web
    max_body_bytes: 1024g
    queue: {timeout: 1h}
    backends: [{address: 127.0.0.1:9001}]
";
        let cfg = load(at_the_bounds).unwrap();
        assert_eq!(cfg.limits.timeouts.request, Duration::from_secs(86400));
        assert_eq!(cfg.services[0].limits.max_body_bytes, Some(1 << 40));
    }

    #[test]
    fn yaml_round_trip() {
        let cfg = load(FULL).unwrap();
        let yaml = crate::config::to_yaml(&cfg);
        assert_eq!(load(&yaml).unwrap_or_else(|e| panic!("{yaml}\n{e:?}")), cfg, "{yaml}");
        assert_eq!(format_duration(Duration::from_micros(1500)), "0.0015s");
    }
}
