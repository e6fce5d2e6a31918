//! Validation of a service's `health_check`, `passive` and `retry` sections (issue 3). Every
//! problem is collected with its position, as in `validate.rs`; a bad value falls back to its
//! default so the rest of the file is still checked.

use std::net::IpAddr;
use std::time::Duration;

use rustls::pki_types::ServerName;

use super::schema::{RawBackoff, RawHealthCheck, RawPassive, RawRetry, Scalar, S};
use super::validate::Ctx;
use super::value::{self, boolean, format_duration, Bounds, DAY, HOUR, MIB, MILLISECOND, MINUTE};
use super::{BackendProtocol, CheckKind, HealthCheckConfig, HealthConfig, PassiveConfig, RetryConfig};

/// Statuses `retry.on` may list: the ones that say "this backend could not serve it".
pub const RETRYABLE_STATUSES: [u16; 3] = [502, 503, 504];

/// Checks more often than every 10 ms would be load, not health; once a day is the rarest
/// that still says anything.
const CHECK_INTERVAL: Bounds<Duration> = Bounds { min: Duration::from_millis(10), max: DAY };
const CHECK_TIMEOUT: Bounds<Duration> = Bounds { min: MILLISECOND, max: HOUR };
const EJECTION: Bounds<Duration> = Bounds { min: MILLISECOND, max: DAY };
/// A wait between tries longer than a minute outlasts any client.
const BACKOFF: Bounds<Duration> = Bounds { min: Duration::ZERO, max: MINUTE };
/// Bodies up to this are held in memory per request so they can be replayed: beyond a few
/// MiB that is a memory risk under load (Envoy's default buffer limit is 1 MiB).
const BUFFER_BODY_LIMIT: Bounds<u64> = Bounds { min: 0, max: 16 * MIB };

pub fn convert(
    ctx: &mut Ctx,
    check: Option<S<RawHealthCheck>>,
    passive: Option<S<RawPassive>>,
    retry: Option<S<RawRetry>>,
    protocol: BackendProtocol,
) -> HealthConfig {
    HealthConfig {
        check: check.map(|c| health_check(ctx, c.value, protocol)),
        passive: passive.map_or_else(PassiveConfig::default, |p| self::passive(ctx, p.value)),
        retry: retry.map_or_else(RetryConfig::default, |r| self::retry(ctx, r.value)),
    }
}

fn health_check(ctx: &mut Ctx, raw: RawHealthCheck, protocol: BackendProtocol) -> HealthCheckConfig {
    let mut c = HealthCheckConfig::default();
    if let Some(v) = &raw.kind {
        match text(&v.value).map(str::trim) {
            Some("tcp") => c.kind = CheckKind::Tcp,
            Some("http") => c.kind = CheckKind::Http,
            Some("https") => c.kind = CheckKind::Https,
            Some("grpc") => {
                c.kind = CheckKind::Grpc;
                // The check goes over the backends' own transport (TLS or not, from the address).
                if !protocol.is_h2() {
                    ctx.error(&v.referenced, "health_check type grpc speaks HTTP/2: set backend_protocol: h2 or h2c");
                }
            }
            _ => {
                ctx.error(&v.referenced, format!("unknown health_check type {}: use tcp, http, https or grpc", v.value))
            }
        }
    }
    let http = matches!(c.kind, CheckKind::Http | CheckKind::Https);
    if let Some(v) = &raw.path {
        match text(&v.value).map(str::trim) {
            _ if !http => ctx.error(&v.referenced, "health_check path applies to http and https checks only"),
            Some(p) if p.starts_with('/') && p.parse::<hyper::Uri>().is_ok() => c.path = p.to_owned(),
            _ => ctx.error(&v.referenced, format!("health_check path {} must be a path starting with \"/\"", v.value)),
        }
    }
    if let Some(v) = &raw.expect_status {
        match status_range(&v.value) {
            // A gRPC check passes on SERVING, whatever the HTTP status says.
            Ok(_) if !http => ctx.error(&v.referenced, "expect_status applies to http and https checks only"),
            Ok(range) => c.expect_status = range,
            Err(msg) => ctx.error(&v.referenced, msg),
        }
    }
    if let Some(v) = &raw.service {
        match text(&v.value) {
            Some(_) if c.kind != CheckKind::Grpc => {
                ctx.error(&v.referenced, "health_check service applies to grpc checks only")
            }
            Some(s) => c.grpc_service = s.to_owned(),
            None => {
                ctx.error(&v.referenced, format!("health_check service must be a gRPC service name, got {}", v.value))
            }
        }
    }
    if let Some(v) = &raw.host {
        match text(&v.value).map(str::trim) {
            Some(h) if !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()) => c.host = Some(h.to_owned()),
            _ => ctx
                .error(&v.referenced, format!("health_check host {} must be a host name, such as web.local", v.value)),
        }
        // Every https check would fail at its handshake otherwise.
        if let (CheckKind::Https, Some(host)) = (c.kind, &c.host) {
            if let Err(msg) = tls_server_name(host) {
                ctx.error(&v.referenced, format!("health_check host: {msg}"));
            }
        }
    }
    if let Some(d) = duration(ctx, raw.interval.as_ref(), "health_check interval", CHECK_INTERVAL) {
        c.interval = d;
    }
    if let Some(d) = duration(ctx, raw.timeout.as_ref(), "health_check timeout", CHECK_TIMEOUT) {
        c.timeout = d;
    }
    if let Some(n) = int(ctx, raw.healthy_threshold.as_ref(), "healthy_threshold", 1, 1000) {
        c.healthy_threshold = n as u32;
    }
    if let Some(n) = int(ctx, raw.unhealthy_threshold.as_ref(), "unhealthy_threshold", 1, 1000) {
        c.unhealthy_threshold = n as u32;
    }
    if let Some(b) = raw.insecure_skip_verify.as_ref().and_then(|v| boolean(ctx, "insecure_skip_verify", v)) {
        if b && c.kind != CheckKind::Https {
            if let Some(v) = &raw.insecure_skip_verify {
                ctx.error(&v.referenced, "insecure_skip_verify applies to https checks only");
            }
        }
        c.insecure_skip_verify = b;
    }
    c
}

fn passive(ctx: &mut Ctx, raw: RawPassive) -> PassiveConfig {
    let mut p = PassiveConfig::default();
    if let Some(n) = int(ctx, raw.consecutive_failures.as_ref(), "consecutive_failures", 0, 1_000_000) {
        p.consecutive_failures = n as u32;
    }
    if let Some(b) = raw.on_5xx.as_ref().and_then(|v| boolean(ctx, "on_5xx", v)) {
        p.on_5xx = b;
    }
    let base = duration(ctx, raw.base_ejection.as_ref(), "base_ejection", EJECTION);
    let max = duration(ctx, raw.max_ejection.as_ref(), "max_ejection", EJECTION);
    p.base_ejection = base.unwrap_or(p.base_ejection);
    p.max_ejection = max.unwrap_or(p.max_ejection);
    if p.base_ejection > p.max_ejection {
        if let Some(at) = raw.max_ejection.as_ref().or(raw.base_ejection.as_ref()) {
            ctx.error(&at.referenced, "max_ejection must not be shorter than base_ejection");
        }
    }
    if let Some(n) = int(ctx, raw.max_ejected_percent.as_ref(), "max_ejected_percent", 0, 100) {
        p.max_ejected_percent = n as u32;
    }
    p
}

fn retry(ctx: &mut Ctx, raw: RawRetry) -> RetryConfig {
    let mut r = RetryConfig::default();
    if let Some(n) = int(ctx, raw.attempts.as_ref(), "attempts", 0, 10) {
        r.attempts = n as u32;
    }
    if let Some(list) = raw.on {
        r.on.clear();
        for item in list.value {
            match item.value {
                Scalar::Int(n) if RETRYABLE_STATUSES.iter().any(|&s| i64::from(s) == n) => {
                    let status = n as u16;
                    if !r.on.contains(&status) {
                        r.on.push(status);
                    }
                }
                other => ctx.error(&item.referenced, format!("retry.on lists statuses 502, 503 or 504, got {other}")),
            }
        }
    }
    if let Some(b) = raw.backoff {
        let at = b.referenced;
        let RawBackoff { base, max } = b.value;
        let base_d = duration(ctx, base.as_ref(), "backoff base", BACKOFF);
        let max_d = duration(ctx, max.as_ref(), "backoff max", BACKOFF);
        r.backoff_base = base_d.unwrap_or(r.backoff_base);
        r.backoff_max = max_d.unwrap_or(r.backoff_max);
        if r.backoff_base > r.backoff_max {
            let loc = max.as_ref().or(base.as_ref()).map_or(at, |v| v.referenced);
            ctx.error(&loc, "backoff max must not be shorter than backoff base");
        }
    }
    if let Some(n) =
        raw.buffer_body_limit.as_ref().and_then(|v| value::size(ctx, "buffer_body_limit", v, BUFFER_BODY_LIMIT))
    {
        r.buffer_body_limit = n;
    }
    if let Some(n) = int(ctx, raw.budget_percent.as_ref(), "budget_percent", 0, 100) {
        r.budget_percent = n as u32;
    }
    r
}

/// The non-default parts of `h` as YAML under a service (for `to_yaml`); `parse` reads them back
/// equal.
pub fn to_yaml(out: &mut String, h: &HealthConfig) {
    use std::fmt::Write;
    let d = format_duration;
    // Writing to a String cannot fail.
    if let Some(c) = &h.check {
        let _ = writeln!(out, "    health_check:\n      type: {}", c.kind.name());
        if matches!(c.kind, CheckKind::Http | CheckKind::Https) {
            let _ = writeln!(out, "      path: \"{}\"", c.path.replace('\\', "\\\\").replace('"', "\\\""));
            let _ = writeln!(out, "      expect_status: \"{}-{}\"", c.expect_status.0, c.expect_status.1);
        }
        if c.kind == CheckKind::Grpc {
            let _ = writeln!(out, "      service: {}", super::legacy::quote(&c.grpc_service));
        }
        if let Some(host) = &c.host {
            let _ = writeln!(out, "      host: \"{}\"", host.replace('\\', "\\\\").replace('"', "\\\""));
        }
        let _ = writeln!(out, "      interval: {}\n      timeout: {}", d(c.interval), d(c.timeout));
        let _ = writeln!(out, "      healthy_threshold: {}", c.healthy_threshold);
        let _ = writeln!(out, "      unhealthy_threshold: {}", c.unhealthy_threshold);
        if c.insecure_skip_verify {
            let _ = writeln!(out, "      insecure_skip_verify: true");
        }
    }
    let p = &h.passive;
    if *p != PassiveConfig::default() {
        let _ = writeln!(out, "    passive:\n      consecutive_failures: {}", p.consecutive_failures);
        let _ = writeln!(out, "      on_5xx: {}", p.on_5xx);
        let _ = writeln!(out, "      base_ejection: {}\n      max_ejection: {}", d(p.base_ejection), d(p.max_ejection));
        let _ = writeln!(out, "      max_ejected_percent: {}", p.max_ejected_percent);
    }
    let r = &h.retry;
    if *r != RetryConfig::default() {
        let on: Vec<String> = r.on.iter().map(u16::to_string).collect();
        let _ = writeln!(out, "    retry:\n      attempts: {}\n      on: [{}]", r.attempts, on.join(", "));
        let _ = writeln!(out, "      backoff: {{base: {}, max: {}}}", d(r.backoff_base), d(r.backoff_max));
        let _ = writeln!(out, "      buffer_body_limit: {}", r.buffer_body_limit);
        let _ = writeln!(out, "      budget_percent: {}", r.budget_percent);
    }
}

/// `host` (a name or an IP, with or without `:port`) can be the TLS server name of an https
/// check, which is the Host without its port.
pub fn tls_server_name(host: &str) -> Result<(), String> {
    let bare = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None if host.parse::<IpAddr>().is_ok() => host,
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    ServerName::try_from(bare)
        .map(drop)
        .map_err(|_| format!("{bare:?} is not a name TLS can verify a certificate for (https check)"))
}

pub(super) fn text(s: &Scalar) -> Option<&str> {
    match s {
        Scalar::Text(t) => Some(t),
        _ => None,
    }
}

fn int(ctx: &mut Ctx, v: Option<&S<Scalar>>, key: &str, min: i64, max: i64) -> Option<i64> {
    v.and_then(|v| value::whole(ctx, key, v, min, max))
}

fn duration(ctx: &mut Ctx, v: Option<&S<Scalar>>, key: &str, bounds: Bounds<Duration>) -> Option<Duration> {
    v.and_then(|v| value::duration(ctx, key, v, bounds))
}

/// `200`, `"200"` or `"200-399"`.
fn status_range(v: &Scalar) -> Result<(u16, u16), String> {
    let bad = || format!("expect_status must be a status or a range such as 200-399, got {v}");
    let one = |t: &str| t.trim().parse::<u16>().ok().filter(|s| (100..=599).contains(s));
    match v {
        Scalar::Int(n) => u16::try_from(*n).ok().filter(|s| (100..=599).contains(s)).map(|s| (s, s)).ok_or_else(bad),
        Scalar::Text(t) => {
            let (lo, hi) = match t.split_once('-') {
                Some((lo, hi)) => (one(lo), one(hi)),
                None => (one(t), one(t)),
            };
            match (lo, hi) {
                (Some(lo), Some(hi)) if lo <= hi => Ok((lo, hi)),
                _ => Err(bad()),
            }
        }
        Scalar::Other(_) => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::test_support::{assert_prefixes, lines};
    use crate::config::{parse, Config};

    fn load(service_lines: &str) -> Result<Config, Vec<String>> {
        let text = format!(
            "listen: 127.0.0.1:8000\nservices:\n  - name: web\n    backends: [{{address: 127.0.0.1:1}}]\n{service_lines}"
        );
        crate::config::test_support::load(&text).map_err(|errors| lines(&errors))
    }

    #[test]
    fn defaults_without_sections() {
        let cfg = load("").unwrap();
        let h = &cfg.services[0].health;
        assert_eq!(h.check, None);
        assert_eq!(h.passive, PassiveConfig::default());
        assert_eq!(h.retry, RetryConfig::default());
        assert_eq!(h.passive.consecutive_failures, 5);
        assert_eq!(h.retry.attempts, 2);
        assert_eq!(h.retry.buffer_body_limit, 65536);
    }

    #[test]
    fn every_key() {
        let cfg = load(
            "    health_check:
      type: http
      path: /healthz?full=1
      expect_status: 200-299
      host: web.local
      interval: 500ms
      timeout: 200ms
      healthy_threshold: 4
      unhealthy_threshold: 1
    passive:
      consecutive_failures: 3
      on_5xx: true
      base_ejection: 1s
      max_ejection: 30s
      max_ejected_percent: 34
    retry:
      attempts: 3
      on: [502, 503, 503]
      backoff: {base: 10ms, max: 100ms}
      buffer_body_limit: 1MiB
      budget_percent: 5
",
        )
        .unwrap();
        let h = &cfg.services[0].health;
        assert_eq!(
            h.check,
            Some(HealthCheckConfig {
                kind: CheckKind::Http,
                path: "/healthz?full=1".into(),
                expect_status: (200, 299),
                host: Some("web.local".into()),
                interval: Duration::from_millis(500),
                timeout: Duration::from_millis(200),
                healthy_threshold: 4,
                unhealthy_threshold: 1,
                insecure_skip_verify: false,
                grpc_service: String::new(),
            })
        );
        assert_eq!(
            h.passive,
            PassiveConfig {
                consecutive_failures: 3,
                on_5xx: true,
                base_ejection: Duration::from_secs(1),
                max_ejection: Duration::from_secs(30),
                max_ejected_percent: 34,
            }
        );
        assert_eq!(
            h.retry,
            RetryConfig {
                attempts: 3,
                on: vec![502, 503],
                backoff_base: Duration::from_millis(10),
                backoff_max: Duration::from_millis(100),
                buffer_body_limit: 1 << 20,
                budget_percent: 5,
            }
        );
        let tcp = load("    health_check: {type: tcp}\n").unwrap();
        assert_eq!(tcp.services[0].health.check.as_ref().map(|c| c.kind), Some(CheckKind::Tcp));
    }

    #[test]
    fn grpc_checks() {
        let cfg = load("    backend_protocol: h2c\n    health_check: {type: grpc, service: pkg.Echo, interval: 1s}\n")
            .unwrap();
        let c = cfg.services[0].health.check.clone().unwrap();
        assert_eq!((c.kind, c.grpc_service.as_str()), (CheckKind::Grpc, "pkg.Echo"));
        let again = parse(Path::new("t.yaml"), &crate::config::to_yaml(&cfg)).unwrap();
        assert_eq!(again, cfg);
        let whole = load("    backend_protocol: h2c\n    health_check: {type: grpc}\n").unwrap();
        assert_eq!(whole.services[0].health.check.as_ref().map(|c| c.grpc_service.as_str()), Some(""));
        let errors = load(
            "    health_check: {type: grpc, path: /x, expect_status: 200}\n  - name: api\n    hosts: api.local\n    backends: [{address: 127.0.0.1:2}]\n    health_check: {type: http, service: pkg.Echo}\n",
        )
        .unwrap_err();
        assert_prefixes(
            &errors,
            &[
                "5:26: health_check type grpc speaks HTTP/2: set backend_protocol: h2 or h2c",
                "5:38: health_check path applies to http and https checks only",
                "5:57: expect_status applies to http and https checks only",
                "9:41: health_check service applies to grpc checks only",
            ],
        );
    }

    #[test]
    fn errors_at_their_values_all_at_once() {
        let errors = load(
            "    health_check:
      type: udp
      expect_status: 200-99
      interval: 2
      healthy_threshold: 0
      insecure_skip_verify: maybe
    passive:
      base_ejection: 10s
      max_ejection: 1s
      max_ejected_percent: 101
      on_5xx: 1
    retry:
      attempts: -1
      on: [500]
      buffer_body_limit: lots
",
        )
        .unwrap_err();
        let expected = [
            "6:13: unknown health_check type \"udp\"",
            "7:22: expect_status must be",
            "8:17: health_check interval: duration \"2\" is missing a unit",
            "9:26: healthy_threshold must be a whole number from 1 to 1000, got 0",
            "10:29: insecure_skip_verify must be true or false",
            "13:21: max_ejection must not be shorter than base_ejection",
            "14:28: max_ejected_percent must be a whole number from 0 to 100, got 101",
            "15:15: on_5xx must be true or false, got 1",
            "17:17: attempts must be",
            "18:12: retry.on lists statuses 502, 503 or 504, got 500",
            "19:26: buffer_body_limit: invalid size \"lots\"",
        ];
        assert_prefixes(&errors, &expected);
        let errors = load("    health_check:\n      type: tcp\n      path: /x\n    bogus: 1\n").unwrap_err();
        assert!(errors[0].contains("unknown key `bogus`"), "{errors:?}");
        let errors = load("    health_check:\n      type: tcp\n      path: /x\n").unwrap_err();
        assert_eq!(errors, ["7:13: health_check path applies to http and https checks only"]);
    }

    #[test]
    fn to_yaml_round_trips() {
        let cfg = load(
            "    health_check: {type: https, host: \"a.local\", interval: 10.5ms, timeout: 0.25s, insecure_skip_verify: true}
    passive: {on_5xx: true, base_ejection: 100ms}
    retry: {on: [504], backoff: {base: 1ms, max: 2s}, buffer_body_limit: 10}
",
        )
        .unwrap();
        let yaml = crate::config::to_yaml(&cfg);
        let again = parse(Path::new("t.yaml"), &yaml).unwrap_or_else(|e| panic!("{yaml}\n{e:?}"));
        assert_eq!(again, cfg, "{yaml}");
    }

    #[test]
    fn durations_and_buffer_body_limit_have_upper_bounds() {
        let errors = load(
            "    health_check: {interval: 25h, timeout: 2h}
    passive: {base_ejection: 100000000h, max_ejection: 25h}
    retry: {backoff: {base: 2m, max: 2m}, buffer_body_limit: 17MiB}
",
        )
        .unwrap_err();
        let expected = [
            "5:30: health_check interval must be from 10ms to 24h, got \"25h\"",
            "5:44: health_check timeout must be from 1ms to 1h",
            "6:30: base_ejection must be from 1ms to 24h, got \"100000000h\"",
            "6:56: max_ejection must be from 1ms to 24h",
            "7:29: backoff base must be from 0s to 1m",
            "7:38: backoff max must be from 0s to 1m",
            "7:62: buffer_body_limit must be from 0 to 16m bytes, got \"17MiB\"",
        ];
        assert_prefixes(&errors, &expected);
        let cfg = load("    retry: {backoff: {base: 1m, max: 1m}, buffer_body_limit: 16m}\n").unwrap();
        assert_eq!(cfg.services[0].health.retry.buffer_body_limit, 16 << 20);
        // The same size forms as every other size key.
        for (text, bytes) in [("64k", 65536), ("64KiB", 65536), ("10m", 10 << 20), ("10MiB", 10 << 20), ("100", 100)] {
            let cfg = load(&format!("    retry: {{buffer_body_limit: {text}}}\n")).unwrap();
            assert_eq!(cfg.services[0].health.retry.buffer_body_limit, bytes, "{text}");
        }
    }

    /// `run` would start, and every check of every backend fail at its TLS handshake.
    #[test]
    fn an_https_check_host_must_be_a_tls_server_name() {
        let errors = load("    health_check: {type: https, host: \"web_site!:8443\"}\n").unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with("5:39: health_check host: \"web_site!\" is not a name TLS can verify"),
            "{errors:?}"
        );
        for host in ["web.local", "web.local:8443", "10.0.0.1:443", "[::1]:443", "::1"] {
            assert!(load(&format!("    health_check: {{type: https, host: \"{host}\"}}\n")).is_ok(), "{host}");
        }
        // A plain http check sends it as a Host header only.
        assert!(load("    health_check: {type: http, host: \"web_site!\"}\n").is_ok());
    }

    #[test]
    fn status_ranges() {
        assert_eq!(status_range(&Scalar::Int(204)), Ok((204, 204)));
        assert_eq!(status_range(&Scalar::Text("200-399".into())), Ok((200, 399)));
        assert!(status_range(&Scalar::Text("99-200".into())).is_err());
    }
}
