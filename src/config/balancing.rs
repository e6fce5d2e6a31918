//! The algorithm's parameters in a service block: `hash_key`, `hash_query`, `sticky`,
//! `slow_start`. Each problem is reported at its position with the others; a key that does
//! not fit the service's algorithm is an error rather than silently ignored.

use std::fmt::Write as _;

use serde::Deserialize;
use serde_saphyr::Location;

use super::health::text;
use super::schema::{RawService, Scalar, S};
use super::validate::Ctx;
use super::value::{self, Bounds, DAY, MILLISECOND, SECOND};
use super::{Algorithm, Balancing, ServiceConfig, StickyConfig};

pub const DEFAULT_COOKIE: &str = "VELOCITY_ID";

/// `sticky: {cookie: VELOCITY_ID, ttl: 1h, base: least_connections}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSticky {
    pub cookie: Option<S<Scalar>>,
    pub ttl: Option<S<Scalar>>,
    pub base: Option<S<Scalar>>,
}

/// `round_robin, ..., header_hash or sticky`, for messages.
pub fn algorithm_names() -> String {
    let names: Vec<&str> = Algorithm::ALL.iter().map(|a| a.name()).collect();
    match names.split_last() {
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// Read the parameters out of `raw`, checking them against `algorithm` (the `algorithm:` key,
/// or the service's name when it has none, is where a missing one is reported).
pub fn convert(ctx: &mut Ctx, raw: &mut RawService, algorithm: Algorithm, service_at: Location) -> Balancing {
    let algorithm_at = raw.algorithm.as_ref().map_or(service_at, |a| a.referenced);
    let mut out = Balancing::default();

    let sticky_raw = raw.sticky.take();
    out.sticky = match (algorithm, sticky_raw) {
        (Algorithm::Sticky, Some(s)) => sticky(ctx, s),
        (Algorithm::Sticky, None) => {
            ctx.error(
                &algorithm_at,
                "algorithm sticky needs a `sticky` block with its base algorithm, such as sticky: {base: least_connections}",
            );
            None
        }
        (other, Some(s)) => {
            ctx.error(
                &s.referenced,
                format!(
                    "`sticky` applies to algorithm sticky, not {}: set algorithm: sticky and sticky.base: {}",
                    other.name(),
                    other.name()
                ),
            );
            None
        }
        (_, None) => None,
    };
    // What actually picks: the base of a sticky service.
    let picking = out.sticky.as_ref().map_or(algorithm, |s| s.base);

    match raw.hash_key.take() {
        Some(v) if picking != Algorithm::HeaderHash => {
            ctx.error(&v.referenced, format!("hash_key applies to algorithm header_hash, not {}", picking.name()));
        }
        Some(v) => match text(&v.value).map(str::trim) {
            Some(name) if is_token(name) => out.hash_key = Some(name.to_ascii_lowercase()),
            _ => {
                ctx.error(&v.referenced, format!("hash_key must be a header name, such as X-User-Id, got {}", v.value))
            }
        },
        None if picking == Algorithm::HeaderHash => {
            ctx.error(&algorithm_at, "header_hash needs `hash_key`: the header to hash, such as hash_key: X-User-Id");
        }
        None => {}
    }

    if let Some(v) = raw.hash_query.take() {
        if picking != Algorithm::UrlHash {
            ctx.error(&v.referenced, format!("hash_query applies to algorithm url_hash, not {}", picking.name()));
        } else if let Some(b) = value::boolean(ctx, "hash_query", &v) {
            out.hash_query = b;
        }
    }

    if let Some(v) = raw.slow_start.take() {
        if picking.is_hash() {
            ctx.error(
                &v.referenced,
                format!("slow_start does not apply to {}: a hash keeps each key on its backend", picking.name()),
            );
        } else {
            out.slow_start = value::duration(ctx, "slow_start", &v, Bounds { min: MILLISECOND, max: DAY });
        }
    }
    out
}

fn sticky(ctx: &mut Ctx, s: S<RawSticky>) -> Option<StickyConfig> {
    let at = s.referenced;
    let raw = s.value;
    let cookie = match &raw.cookie {
        None => Some(DEFAULT_COOKIE.to_owned()),
        Some(v) => match text(&v.value).map(str::trim) {
            Some(name) if is_token(name) => Some(name.to_owned()),
            _ => {
                ctx.error(
                    &v.referenced,
                    format!("sticky cookie must be a cookie name (letters, digits, -_.), got {}", v.value),
                );
                None
            }
        },
    };
    let ttl =
        raw.ttl.as_ref().and_then(|v| value::duration(ctx, "sticky ttl", v, Bounds { min: SECOND, max: 365 * DAY }));
    let base = match &raw.base {
        None => {
            ctx.error(&at, "sticky needs `base`: the algorithm that picks a backend for a new client, such as base: least_connections");
            None
        }
        Some(v) => {
            let name = text(&v.value).map(str::trim).unwrap_or("");
            match Algorithm::ALL.into_iter().find(|a| a.name() == name) {
                Some(Algorithm::Sticky) => {
                    ctx.error(&v.referenced, "sticky base cannot be sticky itself");
                    None
                }
                Some(a) => Some(a),
                None => {
                    let names = algorithm_names();
                    let names = names.trim_end_matches(" or sticky");
                    ctx.error(&v.referenced, format!("unknown sticky base {}: use {names}", v.value));
                    None
                }
            }
        }
    };
    Some(StickyConfig { cookie: cookie?, ttl, base: base? })
}

/// An HTTP token (RFC 9110), which header and cookie names must be.
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The parameters as YAML lines of a service block (for `to_yaml`).
pub fn to_yaml(out: &mut String, b: &Balancing) {
    if let Some(key) = &b.hash_key {
        let _ = writeln!(out, "    hash_key: {key}");
    }
    if b.hash_query {
        let _ = writeln!(out, "    hash_query: true");
    }
    if let Some(s) = &b.sticky {
        let ttl = s.ttl.map(|t| format!(", ttl: {}s", t.as_secs_f64())).unwrap_or_default();
        let _ = writeln!(out, "    sticky: {{cookie: {}{ttl}, base: {}}}", s.cookie, s.base.name());
    }
    if let Some(d) = b.slow_start {
        let _ = writeln!(out, "    slow_start: {}s", d.as_secs_f64());
    }
}

/// What `velocity check` adds to a service's line: the parameters in force.
pub fn summary(s: &ServiceConfig) -> String {
    let b = &s.balancing;
    let mut line = String::new();
    if let Some(st) = &b.sticky {
        let _ = write!(line, "; cookie {} over {}", st.cookie, st.base.name());
    }
    if let Some(key) = &b.hash_key {
        let _ = write!(line, "; hashing header {key}");
    }
    if b.hash_query {
        line += "; hashing path and query";
    }
    if let Some(d) = b.slow_start {
        let _ = write!(line, "; slow_start {d:?}");
    }
    line
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::config::{parse, Config, ConfigError};

    fn load(service_lines: &str) -> Result<Config, Vec<ConfigError>> {
        let text = format!(
            "listen: 127.0.0.1:8000\nservices:\n  - name: web\n    backends:\n      - address: 127.0.0.1:1\n{service_lines}"
        );
        parse(Path::new("t.yaml"), &text)
    }

    fn errors(service_lines: &str) -> Vec<String> {
        match load(service_lines) {
            Ok(cfg) => panic!("expected errors, got {cfg:?}"),
            Err(errors) => errors.iter().map(|e| format!("{}:{}: {}", e.line, e.column, e.message)).collect(),
        }
    }

    #[test]
    fn every_algorithm_and_parameter_loads() {
        for a in Algorithm::ALL.iter().filter(|a| !matches!(a, Algorithm::Sticky | Algorithm::HeaderHash)) {
            let cfg = load(&format!("    algorithm: {}\n", a.name())).unwrap();
            assert_eq!(cfg.services[0].algorithm, *a);
        }
        let s = load("    algorithm: header_hash\n    hash_key: X-User\n").unwrap();
        assert_eq!(s.services[0].balancing.hash_key.as_deref(), Some("x-user"));
        let s = load("    algorithm: url_hash\n    hash_query: true\n").unwrap();
        assert!(s.services[0].balancing.hash_query);
        let s = load(
            "    algorithm: sticky\n    sticky: {cookie: SRV, ttl: 1h, base: least_connections}\n    slow_start: 30s\n",
        )
        .unwrap();
        let b = &s.services[0].balancing;
        assert_eq!(
            b.sticky,
            Some(StickyConfig {
                cookie: "SRV".into(),
                ttl: Some(Duration::from_secs(3600)),
                base: Algorithm::LeastConnections
            })
        );
        assert_eq!(b.slow_start, Some(Duration::from_secs(30)));
        let s = load("    algorithm: sticky\n    sticky:\n      base: header_hash\n    hash_key: X-Session\n").unwrap();
        let st = s.services[0].balancing.sticky.as_ref().unwrap();
        assert_eq!((st.cookie.as_str(), st.ttl), (DEFAULT_COOKIE, None));
    }

    #[test]
    fn problems_at_their_positions() {
        let cases: &[(&str, &str)] = &[
            ("    algorithm: header_hash\n", "6:16: header_hash needs `hash_key`"),
            ("    algorithm: sticky\n", "6:16: algorithm sticky needs a `sticky` block"),
            ("    algorithm: sticky\n    sticky: {cookie: A}\n", "7:13: sticky needs `base`"),
            (
                "    algorithm: sticky\n    sticky: {base: fastest}\n",
                "7:20: unknown sticky base \"fastest\": use round_robin",
            ),
            ("    algorithm: sticky\n    sticky: {base: sticky}\n", "7:20: sticky base cannot be sticky itself"),
            (
                "    algorithm: sticky\n    sticky: {base: random, cookie: \"a b\"}\n",
                "7:36: sticky cookie must be a cookie name",
            ),
            ("    algorithm: sticky\n    sticky: {base: random, ttl: 0s}\n", "7:33: sticky ttl must be from 1s to"),
            ("    algorithm: sticky\n    sticky: {base: random, tll: 1h}\n", "unknown key `tll`"),
            ("    sticky: {base: random}\n", "6:13: `sticky` applies to algorithm sticky, not round_robin"),
            (
                "    algorithm: ip_hash\n    hash_key: X-A\n",
                "7:15: hash_key applies to algorithm header_hash, not ip_hash",
            ),
            ("    algorithm: header_hash\n    hash_key: \"X A\"\n", "7:15: hash_key must be a header name"),
            ("    hash_query: true\n", "6:17: hash_query applies to algorithm url_hash"),
            ("    algorithm: url_hash\n    hash_query: yes please\n", "7:17: hash_query must be true or false"),
            ("    algorithm: ip_hash\n    slow_start: 30s\n", "7:17: slow_start does not apply to ip_hash"),
            ("    slow_start: 30\n", "6:17: slow_start: duration \"30\" is missing a unit"),
            (
                "    algorithm: sticky\n    sticky: {base: url_hash}\n    slow_start: 1m\n",
                "8:17: slow_start does not apply to url_hash",
            ),
        ];
        for (lines, want) in cases {
            let got = errors(lines);
            assert_eq!(got.len(), 1, "{lines}\n{got:?}");
            assert!(got[0].contains(want), "{lines}\nwant {want:?}\ngot {got:?}");
        }
        // Without an `algorithm` key the service's name is where it is reported.
        assert!(algorithm_names().ends_with("header_hash or sticky"));
    }

    #[test]
    fn to_yaml_round_trips() {
        for lines in [
            "    algorithm: sticky\n    sticky: {cookie: SRV, ttl: 90m, base: header_hash}\n    hash_key: X-A\n",
            "    algorithm: sticky\n    sticky: {base: p2c}\n    slow_start: 1.5s\n",
            "    algorithm: url_hash\n    hash_query: true\n",
        ] {
            let cfg = load(lines).unwrap();
            let again = parse(Path::new("t.yaml"), &crate::config::to_yaml(&cfg)).unwrap();
            assert_eq!(again.services[0].balancing, cfg.services[0].balancing);
            assert_eq!(again.services[0].algorithm, cfg.services[0].algorithm);
        }
    }
}
