//! Validation of a service's `health_check`, `passive` and `retry` sections (issue 3). Every
//! problem is collected with its position, as in `validate.rs`; a bad value falls back to its
//! default so the rest of the file is still checked.

use std::time::Duration;

use serde_saphyr::Location;

use super::schema::{RawBackoff, RawHealthCheck, RawPassive, RawRetry, Scalar, S};
use super::validate::Ctx;
use super::{parse_duration, CheckKind, HealthCheckConfig, HealthConfig, PassiveConfig, RetryConfig};

/// Statuses `retry.on` may list: the ones that say "this backend could not serve it".
pub const RETRYABLE_STATUSES: [u16; 3] = [502, 503, 504];

pub fn convert(
    ctx: &mut Ctx,
    check: Option<S<RawHealthCheck>>,
    passive: Option<S<RawPassive>>,
    retry: Option<S<RawRetry>>,
) -> HealthConfig {
    HealthConfig {
        check: check.map(|c| health_check(ctx, c.value)),
        passive: passive.map_or_else(PassiveConfig::default, |p| self::passive(ctx, p.value)),
        retry: retry.map_or_else(RetryConfig::default, |r| self::retry(ctx, r.value)),
    }
}

fn health_check(ctx: &mut Ctx, raw: RawHealthCheck) -> HealthCheckConfig {
    let mut c = HealthCheckConfig::default();
    if let Some(v) = &raw.kind {
        match text(&v.value).map(str::trim) {
            Some("tcp") => c.kind = CheckKind::Tcp,
            Some("http") => c.kind = CheckKind::Http,
            Some("https") => c.kind = CheckKind::Https,
            _ => ctx.error(&v.referenced, format!("unknown health_check type {}: use tcp, http or https", v.value)),
        }
    }
    if let Some(v) = &raw.path {
        match text(&v.value).map(str::trim) {
            _ if c.kind == CheckKind::Tcp => {
                ctx.error(&v.referenced, "health_check path applies to http and https checks only")
            }
            Some(p) if p.starts_with('/') && p.parse::<hyper::Uri>().is_ok() => c.path = p.to_owned(),
            _ => ctx.error(&v.referenced, format!("health_check path {} must be a path starting with \"/\"", v.value)),
        }
    }
    if let Some(v) = &raw.expect_status {
        match status_range(&v.value) {
            Ok(range) => c.expect_status = range,
            Err(msg) => ctx.error(&v.referenced, msg),
        }
    }
    if let Some(v) = &raw.host {
        match text(&v.value).map(str::trim) {
            Some(h) if !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()) => c.host = Some(h.to_owned()),
            _ => ctx
                .error(&v.referenced, format!("health_check host {} must be a host name, such as web.local", v.value)),
        }
    }
    if let Some(d) = duration(ctx, raw.interval.as_ref(), "health_check interval", Duration::from_millis(10)) {
        c.interval = d;
    }
    if let Some(d) = duration(ctx, raw.timeout.as_ref(), "health_check timeout", Duration::from_millis(1)) {
        c.timeout = d;
    }
    if let Some(n) = int(ctx, raw.healthy_threshold.as_ref(), "healthy_threshold", 1, 1000) {
        c.healthy_threshold = n as u32;
    }
    if let Some(n) = int(ctx, raw.unhealthy_threshold.as_ref(), "unhealthy_threshold", 1, 1000) {
        c.unhealthy_threshold = n as u32;
    }
    if let Some(b) = boolean(ctx, raw.insecure_skip_verify.as_ref(), "insecure_skip_verify") {
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
    if let Some(b) = boolean(ctx, raw.on_5xx.as_ref(), "on_5xx") {
        p.on_5xx = b;
    }
    let base = duration(ctx, raw.base_ejection.as_ref(), "base_ejection", Duration::from_millis(1));
    let max = duration(ctx, raw.max_ejection.as_ref(), "max_ejection", Duration::from_millis(1));
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
        let base_d = duration(ctx, base.as_ref(), "backoff base", Duration::ZERO);
        let max_d = duration(ctx, max.as_ref(), "backoff max", Duration::ZERO);
        r.backoff_base = base_d.unwrap_or(r.backoff_base);
        r.backoff_max = max_d.unwrap_or(r.backoff_max);
        if r.backoff_base > r.backoff_max {
            let loc = max.as_ref().or(base.as_ref()).map_or(at, |v| v.referenced);
            ctx.error(&loc, "backoff max must not be shorter than backoff base");
        }
    }
    if let Some(v) = &raw.buffer_body_limit {
        match size(&v.value) {
            Some(n) => r.buffer_body_limit = n,
            None => ctx.error(
                &v.referenced,
                format!("buffer_body_limit must be a size in bytes, such as 65536 or 64KiB, got {}", v.value),
            ),
        }
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
    // Milliseconds as a float, so sub-millisecond values survive the round trip.
    let d = |d: Duration| format!("{}ms", d.as_secs_f64() * 1000.0);
    // Writing to a String cannot fail.
    if let Some(c) = &h.check {
        let _ = writeln!(out, "    health_check:\n      type: {}", c.kind.name());
        if c.kind != CheckKind::Tcp {
            let _ = writeln!(out, "      path: \"{}\"", c.path.replace('\\', "\\\\").replace('"', "\\\""));
        }
        let _ = writeln!(out, "      expect_status: \"{}-{}\"", c.expect_status.0, c.expect_status.1);
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

pub(super) fn text(s: &Scalar) -> Option<&str> {
    match s {
        Scalar::Text(t) => Some(t),
        _ => None,
    }
}

fn int(ctx: &mut Ctx, v: Option<&S<Scalar>>, key: &str, min: i64, max: i64) -> Option<i64> {
    let v = v?;
    match v.value {
        Scalar::Int(n) if (min..=max).contains(&n) => Some(n),
        _ => {
            ctx.error(&v.referenced, format!("{key} must be a whole number from {min} to {max}, got {}", v.value));
            None
        }
    }
}

pub(super) fn boolean(ctx: &mut Ctx, v: Option<&S<Scalar>>, key: &str) -> Option<bool> {
    let v = v?;
    match &v.value {
        Scalar::Other(t) if t == "true" => Some(true),
        Scalar::Other(t) if t == "false" => Some(false),
        other => {
            ctx.error(&v.referenced, format!("{key} must be true or false, got {other}"));
            None
        }
    }
}

/// A duration of at least `min`.
pub(super) fn duration(ctx: &mut Ctx, v: Option<&S<Scalar>>, key: &str, min: Duration) -> Option<Duration> {
    let v = v?;
    let at: Location = v.referenced;
    let parsed = match &v.value {
        Scalar::Text(t) => parse_duration(t),
        // `interval: 2` is a number to YAML; the parser explains the missing unit.
        Scalar::Int(n) => parse_duration(&n.to_string()),
        other => Err(format!("expected a duration such as 250ms or 2s, got {other}")),
    };
    match parsed {
        Ok(d) if d >= min => Some(d),
        Ok(_) => {
            ctx.error(&at, format!("{key} must be at least {min:?}"));
            None
        }
        Err(msg) => {
            ctx.error(&at, format!("{key}: {msg}"));
            None
        }
    }
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

/// Bytes: `65536`, `64KiB`, `64k`, `1MiB`, `1m`.
fn size(v: &Scalar) -> Option<u64> {
    match v {
        Scalar::Int(n) => u64::try_from(*n).ok(),
        Scalar::Text(t) => {
            let t = t.trim();
            let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
            let (number, unit) = t.split_at(split);
            let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
                "" | "b" => 1,
                "k" | "kb" | "kib" => 1024,
                "m" | "mb" | "mib" => 1024 * 1024,
                _ => return None,
            };
            number.parse::<u64>().ok()?.checked_mul(scale)
        }
        Scalar::Other(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{parse, Config};

    fn load(service_lines: &str) -> Result<Config, Vec<String>> {
        let text = format!(
            "listen: 127.0.0.1:8000\nservices:\n  - name: web\n    backends: [{{address: 127.0.0.1:1}}]\n{service_lines}"
        );
        parse(Path::new("t.yaml"), &text)
            .map_err(|errors| errors.iter().map(|e| format!("{}:{}: {}", e.line, e.column, e.message)).collect())
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
            "19:26: buffer_body_limit must be a size",
        ];
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
        for (e, want) in errors.iter().zip(expected) {
            assert!(e.starts_with(want), "{e:?} should start with {want:?}\n{errors:#?}");
        }
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
    fn sizes_and_ranges() {
        assert_eq!(size(&Scalar::Text("64KiB".into())), Some(65536));
        assert_eq!(size(&Scalar::Text("64k".into())), Some(65536));
        assert_eq!(size(&Scalar::Int(10)), Some(10));
        assert_eq!(size(&Scalar::Text("1g".into())), None);
        assert_eq!(status_range(&Scalar::Int(204)), Ok((204, 204)));
        assert_eq!(status_range(&Scalar::Text("200-399".into())), Ok((200, 399)));
        assert!(status_range(&Scalar::Text("99-200".into())).is_err());
    }
}
