//! The original Go Velocity `config.yml`, which must keep loading unchanged. Its services are
//! mapped onto the raw schema of the new format (keeping their locations) and validated by the
//! same code; the equivalent new-format YAML is kept for `velocity check` to show.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;

use serde_saphyr::Spanned;

use super::schema::{LegacyConfig, LegacyService, OneOrMany, RawBackend, RawService, Scalar, S};
use super::validate::{self, map_spanned, Ctx, Scope};
use super::{admin, lifecycle, AccessLog, AdminConfig, Algorithm, Config, ConfigError, Limits, LogFormat, Shutdown};

pub fn parse(path: &Path, text: &str, scope: Scope) -> Result<Config, Vec<ConfigError>> {
    let raw: LegacyConfig = serde_saphyr::from_str(text).map_err(|e| vec![validate::syntax_error(path, &e)])?;
    let mut ctx = Ctx::new(path, scope);
    if let Some(l) = &raw.listen {
        ctx.error(
            &l.referenced,
            "`listen` belongs to the new format, but this file is in the legacy Go format (it has listen_port or api_port); use one format or the other",
        );
    }
    // The Go version listened on all interfaces; keep that.
    let listen = match &raw.listen_port {
        Some(p) => {
            port(&mut ctx, "listen_port", p).map(|port| SocketAddr::from(([0, 0, 0, 0], port))).into_iter().collect()
        }
        None => {
            ctx.error_at(1, 1, "missing `listen_port`");
            Vec::new()
        }
    };
    let api_port = raw.api_port.as_ref().and_then(|p| port(&mut ctx, "api_port", p));
    let services = raw.services.map(|list| {
        map_spanned(list, |items| items.into_iter().map(|s| map_spanned(s, |s| service(&mut ctx, s))).collect())
    });
    let services = validate::services(&mut ctx, services);
    let mut cfg = Config {
        listen,
        listeners: Vec::new(),
        access_log: AccessLog::Stdout,
        log_format: LogFormat::Text,
        event_log: super::EventLog::Stderr,
        access_log_ring: crate::observe::ring::DEFAULT_LINES,
        services,
        limits: Limits::default(),
        shutdown: Shutdown::default(),
        http2: Default::default(),
        // The Go version served its API on api_port; ours listens on loopback only.
        admin: api_port.map(AdminConfig::loopback),
        cluster: None,
        policy: Default::default(),
        legacy_equivalent: None,
    };
    cfg.legacy_equivalent = Some(equivalent_yaml(&cfg));
    ctx.finish(cfg)
}

/// `8080`, `"8080"` or `":8080"`, as the Go version accepted.
fn port(ctx: &mut Ctx, key: &str, p: &S<Scalar>) -> Option<u16> {
    let parsed = match &p.value {
        Scalar::Int(n) => u16::try_from(*n).ok(),
        Scalar::Text(s) => {
            let s = s.trim();
            s.strip_prefix(':').unwrap_or(s).parse::<u16>().ok()
        }
        Scalar::Other(_) => None,
    };
    if parsed.is_none() {
        ctx.error(&p.referenced, format!("{key} must be a port number from 0 to 65535, got {}", p.value));
    }
    parsed
}

fn service(ctx: &mut Ctx, s: LegacyService) -> RawService {
    // `domain` is `host:port`; the host part is what requests are routed by (the port is
    // dropped by the host pattern parsing). No domain means the default service.
    let hosts = s.domain.filter(|d| !d.value.trim().is_empty()).map(|d| map_spanned(d, OneOrMany::One));
    let algorithm = s.algorythm.and_then(|a| match legacy_algorithm(&a.value) {
        Some(alg) => Some(map_spanned(a, |_| alg.name().to_owned())),
        None => {
            ctx.error(
                &a.referenced,
                format!(
                    "unknown algorythm {:?}: use RoundRobin, WeightedRoundRobin or LeastConnections",
                    a.value.trim()
                ),
            );
            None
        }
    });
    let backends = s.target_urls.map(|urls| {
        map_spanned(urls, |urls| {
            urls.into_iter()
                .map(|u| Spanned {
                    referenced: u.referenced,
                    defined: u.defined,
                    value: RawBackend { address: Some(u), ..RawBackend::default() },
                })
                .collect()
        })
    });
    RawService { name: s.name, hosts, path_prefix: None, algorithm, backends, ..RawService::default() }
}

/// The Go names (`RoundRobin`); case, `_` and `-` are ignored so `round_robin` works too.
fn legacy_algorithm(name: &str) -> Option<Algorithm> {
    let key: String = name.chars().filter(|c| *c != '_' && *c != '-').collect::<String>().to_ascii_lowercase();
    match key.trim() {
        "roundrobin" => Some(Algorithm::RoundRobin),
        "weightedroundrobin" => Some(Algorithm::WeightedRoundRobin),
        "leastconnections" => Some(Algorithm::LeastConnections),
        _ => None,
    }
}

/// The legacy file's config in the new format, with what did not carry over as comments.
fn equivalent_yaml(cfg: &Config) -> String {
    let mut out = String::from("# The legacy Go Velocity config in the current format.\n");
    if let Some(a) = &cfg.admin {
        let port = a.listen.port();
        out.push_str(&format!("# api_port {port}: the admin API, on loopback only (add token_env to open it wider)\n"));
    }
    out + &to_yaml(cfg)
}

/// `cfg` as new-format YAML; `parse` of the result gives `cfg` back (apart from
/// `legacy_equivalent`). Hand-written: the crate has no YAML serializer.
pub fn to_yaml(cfg: &Config) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail; the results of `writeln!` are ignored for that reason.
    let listen: Vec<String> = cfg.listen.iter().map(|a| quote(&a.to_string())).collect();
    match listen.as_slice() {
        // Only `listeners:` (an empty `listen:` would be an error).
        [] if !cfg.listeners.is_empty() => {}
        [one] => {
            let _ = writeln!(out, "listen: {one}");
        }
        many => {
            let _ = writeln!(out, "listen: [{}]", many.join(", "));
        }
    }
    match &cfg.access_log {
        AccessLog::Stdout => {}
        AccessLog::Off => {
            let _ = writeln!(out, "access_log: off");
        }
        AccessLog::File(p) => {
            let _ = writeln!(out, "access_log: {}", quote(&p.display().to_string()));
        }
    }
    if cfg.log_format == LogFormat::Json {
        let _ = writeln!(out, "log_format: json");
    }
    match &cfg.event_log {
        super::EventLog::Stderr => {}
        super::EventLog::Stdout => {
            let _ = writeln!(out, "event_log: stdout");
        }
        super::EventLog::File(p) => {
            let _ = writeln!(out, "event_log: {}", quote(&p.display().to_string()));
        }
    }
    if cfg.access_log_ring != crate::observe::ring::DEFAULT_LINES {
        let _ = writeln!(out, "access_log_ring: {}", cfg.access_log_ring);
    }
    super::listeners::to_yaml(&mut out, cfg);
    lifecycle::global_yaml(&mut out, cfg);
    super::http2::to_yaml(&mut out, &cfg.http2);
    admin::to_yaml(&mut out, &cfg.admin);
    super::cluster::to_yaml(&mut out, &cfg.cluster);
    super::policy::global_yaml(&mut out, &cfg.policy);
    let _ = writeln!(out, "services:");
    for s in &cfg.services {
        let _ = writeln!(out, "  - name: {}", quote(&s.name));
        if !s.hosts.is_empty() {
            let hosts: Vec<String> = s.hosts.iter().map(|h| quote(&h.to_string())).collect();
            let _ = writeln!(out, "    hosts: [{}]", hosts.join(", "));
        }
        if s.path_prefix != "/" {
            let _ = writeln!(out, "    path_prefix: {}", quote(&s.path_prefix));
        }
        let _ = writeln!(out, "    algorithm: {}", s.algorithm.name());
        if s.backend_protocol != super::BackendProtocol::Http1 {
            let _ = writeln!(out, "    backend_protocol: {}", s.backend_protocol.name());
        }
        super::balancing::to_yaml(&mut out, &s.balancing);
        super::policy::service_yaml(&mut out, &s.policy);
        lifecycle::service_yaml(&mut out, s, &cfg.limits.timeouts);
        let _ = writeln!(out, "    backends:");
        for b in &s.backends {
            let _ = writeln!(out, "      - address: {}", quote(&b.address));
            if b.weight != 1 {
                let _ = writeln!(out, "        weight: {}", b.weight);
            }
            if let Some(n) = b.max_connections {
                let _ = writeln!(out, "        max_connections: {n}");
            }
            super::backend_tls::to_yaml(&mut out, &b.tls);
        }
        super::health::to_yaml(&mut out, &s.health);
        super::discovery::to_yaml(&mut out, &s.discovery, &s.managed);
    }
    out
}

/// A YAML scalar for `s`: plain when that is unambiguous, else double-quoted.
pub(super) fn quote(s: &str) -> String {
    let lower = s.to_ascii_lowercase();
    let plain = s.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '/')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "._/:-".contains(c))
        && !s.ends_with(':')
        && s.parse::<f64>().is_err()
        && !matches!(lower.as_str(), "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n" | "null");
    if plain {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendConfig, HostPattern};

    const GO_CONFIG: &str = "\
listen_port: 8080
api_port: 8081
services:
  - name: my-service
    domain: \"localhost:8080\"
    targetURLs:
      - \"http://localhost:9001\"
      - \"http://localhost:9002\"
    algorythm: RoundRobin
  - name: other
    domain: \"\"
    targetURLs: [\"http://127.0.0.1:9003\"]
    algorythm: leastconnections
";

    use crate::config::test_support::{errors, lines, load};

    #[test]
    fn go_config_loads() {
        let cfg = load(GO_CONFIG).unwrap();
        assert_eq!(cfg.listen, vec!["0.0.0.0:8080".parse().unwrap()]);
        assert_eq!(cfg.services.len(), 2);
        let s = &cfg.services[0];
        assert_eq!(s.name, "my-service");
        assert_eq!(s.hosts, vec![HostPattern::Exact("localhost".into())]);
        assert_eq!(s.path_prefix, "/");
        assert_eq!(s.algorithm, Algorithm::RoundRobin);
        assert_eq!(
            s.backends[0],
            BackendConfig {
                address: "http://localhost:9001".into(),
                addr: "127.0.0.1:9001".parse().unwrap(),
                authority: "localhost:9001".into(),
                weight: 1,
                max_connections: None,
                tls: None,
            }
        );
        assert_eq!(s.backends[1].addr, "127.0.0.1:9002".parse().unwrap());
        let other = &cfg.services[1];
        assert!(other.hosts.is_empty());
        assert_eq!(other.algorithm, Algorithm::LeastConnections);
        let yaml = cfg.legacy_equivalent.as_deref().unwrap();
        assert!(yaml.contains("admin:\n  listen: \"127.0.0.1:8081\"\n"), "{yaml}");
        assert_eq!(cfg.admin, Some(AdminConfig::loopback(8081)));
        assert!(yaml.contains("listen: 0.0.0.0:8080\n"), "{yaml}");
    }

    #[test]
    fn equivalent_yaml_round_trips() {
        let cfg = load(GO_CONFIG).unwrap();
        let yaml = cfg.legacy_equivalent.clone().unwrap();
        let again =
            crate::config::parse(Path::new("equivalent.yaml"), &yaml).unwrap_or_else(|e| panic!("{yaml}\n{e:?}"));
        assert_eq!(again.legacy_equivalent, None);
        assert_eq!(again, Config { legacy_equivalent: None, ..cfg });
    }

    #[test]
    fn to_yaml_round_trips_every_field() {
        let text = "\
listen: [127.0.0.1:8000, \"[::1]:8001\"]
access_log: ./logs/access.log
log_format: json
services:
  - name: \"web: main\"
    hosts: [Web.Local, \"*.web.local\"]
    path_prefix: /api
    algorithm: weighted_round_robin
    backends:
      - address: 127.0.0.1:9001
        weight: 3
      - address: http://localhost:9002/
  - name: \"8080\"
    hosts: \"*\"
    backends: [{address: localhost:9003}]
";
        let cfg = load(text).unwrap();
        let yaml = crate::config::to_yaml(&cfg);
        assert_eq!(load(&yaml).unwrap_or_else(|e| panic!("{yaml}\n{e:?}")), cfg, "{yaml}");
        let off = Config { access_log: AccessLog::Off, ..cfg };
        assert_eq!(load(&crate::config::to_yaml(&off)).unwrap(), off);
    }

    #[test]
    fn port_forms_and_minimal_file() {
        for (text, port) in
            [("listen_port: \"8080\"\n", 8080), ("listen_port: \":9090\"\n", 9090), ("listen_port: 0\n", 0)]
        {
            let cfg =
                load(&format!("{text}services:\n  - name: a\n    targetURLs: [\"http://localhost:9001\"]\n")).unwrap();
            assert_eq!(cfg.listen, vec![SocketAddr::from(([0, 0, 0, 0], port))]);
            assert_eq!(cfg.services[0].algorithm, Algorithm::RoundRobin);
            assert!(!cfg.legacy_equivalent.unwrap().contains("api_port"));
        }
    }

    #[test]
    fn legacy_errors_point_at_the_original_file() {
        let text = "\
api_port: 8081
listen_port: eighty
services:
  - name: a
    domain: \"bad domain\"
    targetURLs:
      - \"ftp://localhost:21\"
    algorythm: Fastest
  - name: a
    targetURLs: []
";
        let errors = errors(text);
        assert_eq!(errors.len(), 6, "{errors:#?}");
        assert!(errors[0].starts_with("2:14: listen_port must be a port number"), "{errors:#?}");
        assert!(errors[1].starts_with("5:13: invalid host name"), "{errors:#?}");
        assert!(errors[2].starts_with("7:9: backend address \"ftp://localhost:21\""), "{errors:#?}");
        assert!(errors[3].starts_with("8:16: unknown algorythm \"Fastest\""), "{errors:#?}");
        assert!(errors[4].starts_with("9:11: duplicate service name"), "{errors:#?}");
        assert!(errors[5].starts_with("10:17: service \"a\" has no backends"), "{errors:#?}");
    }

    #[test]
    fn missing_listen_port_and_mixed_formats() {
        let errors = lines(
            &load("api_port: 1\nlisten: 127.0.0.1:8000\nservices:\n  - name: a\n    targetURLs: [\"http://localhost:9001\"]\n")
                .unwrap_err(),
        );
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert!(errors[0].starts_with("1:1: missing `listen_port`"));
        assert!(errors[1].starts_with("2:9: `listen` belongs to the new format"), "{errors:#?}");
    }

    /// Today's Go files keep loading; a misspelt key is no longer dropped without a word.
    #[test]
    fn unknown_keys_are_errors_with_a_hint() {
        let cases = [
            (
                "listen_port: 8080\nservices:\n  - name: a\n    targetUrls: [\"http://localhost:9001\"]\n",
                "4:5: unknown key `targetUrls`: did you mean `targetURLs`?",
            ),
            ("listen_port: 8080\napiPort: 8081\n", "2:1: unknown key `apiPort`: did you mean `api_port`?"),
            (
                "listen_port: 8080\nservices:\n  - name: a\n    targetURLs: [\"http://localhost:9001\"]\n    healthCheck: /health\n",
                "5:5: unknown key `healthCheck`; allowed keys: name, domain, targetURLs",
            ),
        ];
        for (text, want) in cases {
            let e = errors(text);
            assert!(e.len() == 1 && e[0].starts_with(want), "{text}\n{e:?}");
        }
    }

    #[test]
    fn the_same_target_twice_is_an_error() {
        let text = "listen_port: 8080\nservices:\n  - name: a\n    targetURLs:\n      - \"http://127.0.0.1:9001\"\n      - \"127.0.0.1:9001\"\n";
        let e = errors(text);
        assert_eq!(
            e,
            ["6:9: backend 127.0.0.1:9001 is already listed in service \"a\" on line 5 as http://127.0.0.1:9001"]
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(quote("my-service"), "my-service");
        assert_eq!(quote("http://localhost:9001"), "http://localhost:9001");
        assert_eq!(quote("*.web.local"), "\"*.web.local\"");
        assert_eq!(quote("8080"), "\"8080\"");
        assert_eq!(quote("on"), "\"on\"");
        assert_eq!(quote("a \"b\"\n"), "\"a \\\"b\\\"\\u000a\"");
        assert_eq!(quote(""), "\"\"");
    }
}
