//! Validation of timeouts, limits, the request queue and shutdown settings, and their YAML.
//! Kept apart from `validate.rs` so that other sections of the config can grow there
//! independently.

use std::fmt::Write as _;
use std::time::Duration;

use super::duration::parse_duration;
use super::schema::{RawBackend, RawConfig, RawQueue, RawService, RawShutdown, RawTimeouts, Scalar, S};
use super::validate::Ctx;
use super::{Config, Limits, QueueConfig, ServiceConfig, ServiceLimits, Shutdown, Timeouts};

/// `max_header_bytes` bounds: room for a request line at least; at most what NGINX's largest
/// usual `large_client_header_buffers` hold, as a head is kept whole in memory.
const MIN_HEADER_BYTES: u64 = 1024;
const MAX_HEADER_BYTES: u64 = 256 * 1024;
const MAX_CONNECTIONS: i64 = 1_000_000;
const MAX_QUEUE: i64 = 1_000_000;

/// Parse a byte size: a whole number of bytes, or a number with `k`, `m` or `g` (powers of
/// 1024; `kb`, `KiB` and the like are accepted too), such as `64k` or `10m`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("invalid size {text:?}: expected bytes, or a whole number with k, m or g, such as 64k"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("invalid size unit {other:?} in {text:?}: use k, m or g")),
    };
    n.checked_mul(scale).ok_or_else(|| format!("size {text:?} is out of range"))
}

/// The top-level `timeouts`, `max_header_bytes`, `max_client_connections` and `shutdown`.
pub fn global(ctx: &mut Ctx, raw: &mut RawConfig) -> (Limits, Shutdown) {
    let mut limits = Limits::default();
    if let Some(t) = raw.timeouts.take() {
        limits.timeouts = timeouts(ctx, t.value, &Timeouts::default(), true);
    }
    if let Some(v) = raw.max_header_bytes.take() {
        if let Some(n) = size(ctx, "max_header_bytes", &v, MIN_HEADER_BYTES, MAX_HEADER_BYTES) {
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
        if let Some(d) = drain_timeout.and_then(|d| duration(ctx, "drain_timeout", &d)) {
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
        limits.max_body_bytes = size(ctx, "max_body_bytes", &v, 0, u64::MAX);
    }
    if let Some(q) = raw.queue.take() {
        let RawQueue { size, timeout } = q.value;
        if let Some(n) = size.and_then(|s| count(ctx, "queue size", &s, 0, MAX_QUEUE)) {
            limits.queue.size = n;
        }
        if let Some(d) = timeout.and_then(|t| duration(ctx, "queue timeout", &t)) {
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
    let RawTimeouts { client_header, client_idle, client_send, connect, backend_response, request } = raw;
    let mut out = *base;
    for (key, value, slot) in [
        ("client_header", client_header, &mut out.client_header),
        ("client_idle", client_idle, &mut out.client_idle),
        ("client_send", client_send, &mut out.client_send),
        ("connect", connect, &mut out.connect),
        ("backend_response", backend_response, &mut out.backend_response),
        ("request", request, &mut out.request),
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
        if let Some(d) = duration(ctx, key, &value) {
            *slot = d;
        }
    }
    out
}

fn duration(ctx: &mut Ctx, key: &str, v: &S<Scalar>) -> Option<Duration> {
    let parsed = match &v.value {
        Scalar::Text(t) => parse_duration(t),
        other => Err(format!("duration {other} is missing a unit (ms, s, m or h)")),
    };
    match parsed {
        Ok(d) if d.is_zero() => {
            ctx.error(&v.referenced, format!("{key} must be more than 0"));
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            ctx.error(&v.referenced, format!("{key}: {e}"));
            None
        }
    }
}

fn size(ctx: &mut Ctx, key: &str, v: &S<Scalar>, min: u64, max: u64) -> Option<u64> {
    let parsed = match &v.value {
        Scalar::Int(n) => u64::try_from(*n).map_err(|_| format!("size {n} is negative")),
        Scalar::Text(t) => parse_size(t),
        Scalar::Other(o) => Err(format!("expected a size such as 65536 or 64k, got {o}")),
    };
    match parsed {
        Ok(n) if (min..=max).contains(&n) => Some(n),
        Ok(n) => {
            ctx.error(&v.referenced, format!("{key} must be from {min} to {max} bytes, got {n}"));
            None
        }
        Err(e) => {
            ctx.error(&v.referenced, format!("{key}: {e}"));
            None
        }
    }
}

pub(super) fn count(ctx: &mut Ctx, key: &str, v: &S<Scalar>, min: i64, max: i64) -> Option<usize> {
    match v.value {
        Scalar::Int(n) if (min..=max).contains(&n) => usize::try_from(n).ok(),
        _ => {
            ctx.error(&v.referenced, format!("{key} must be a whole number from {min} to {max}, got {}", v.value));
            None
        }
    }
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
        let _ = writeln!(out, "shutdown: {{drain_timeout: {}}}", duration_yaml(cfg.shutdown.drain_timeout));
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
        let _ = writeln!(out, "    queue: {{size: {}, timeout: {}}}", q.size, duration_yaml(q.timeout));
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
    ]
    .iter()
    .filter(|(_, v, b)| v != b)
    .map(|(k, v, _)| format!("{k}: {}", duration_yaml(*v)))
    .collect::<Vec<_>>()
    .join(", ")
}

/// `2s`, `250ms`, or seconds with a fraction when finer than a millisecond.
fn duration_yaml(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{parse, ConfigError};

    fn load(text: &str) -> Result<Config, Vec<ConfigError>> {
        parse(Path::new("t.yaml"), text)
    }

    fn errors(text: &str) -> Vec<String> {
        load(text).unwrap_err().iter().map(|e| format!("{}:{}: {}", e.line, e.column, e.message)).collect()
    }

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
            "2:21: connect: duration 5 is missing a unit",
            "2:33: request must be more than 0",
            "2:50: client_idle: invalid duration",
            "3:19: max_header_bytes must be from 1024 to 262144 bytes, got 10",
            "4:25: max_client_connections must be a whole number from 1 to 1000000, got 0",
            "5:27: drain_timeout: invalid duration unit",
            "8:31: `client_header` applies to client connections before routing",
            "9:21: max_body_bytes: invalid size unit",
            "10:19: queue size must be a whole number from 0 to 1000000, got -1",
            "10:32: queue timeout: duration 1 is missing a unit",
            "13:26: max_connections must be a whole number from 1 to 1000000, got 0",
        ];
        assert_eq!(e.len(), expected.len(), "{e:#?}");
        for (got, want) in e.iter().zip(expected) {
            assert!(got.starts_with(want), "{got:?} should start with {want:?}\n{e:#?}");
        }
    }

    #[test]
    fn unknown_keys_are_reported() {
        let e = errors("listen: 127.0.0.1:8000\ntimeouts: {conect: 1s}\nservices: []\n");
        assert!(e[0].starts_with("2:12: unknown key `conect`"), "{e:?}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("100"), Ok(100));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("10m"), Ok(10 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("1.5m").is_err());
        assert!(parse_size("k").is_err());
        assert!(parse_size("99999999999999g").unwrap_err().contains("out of range"));
    }

    #[test]
    fn yaml_round_trip() {
        let cfg = load(FULL).unwrap();
        let yaml = crate::config::to_yaml(&cfg);
        assert_eq!(load(&yaml).unwrap_or_else(|e| panic!("{yaml}\n{e:?}")), cfg, "{yaml}");
        assert_eq!(duration_yaml(Duration::from_micros(1500)), "0.0015s");
    }
}
