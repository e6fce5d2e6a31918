//! Raw YAML → validated [`Config`], collecting every problem with its position.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;

use serde_saphyr::{Location, SnippetMode};

use super::schema::{Probe, RawBackend, RawConfig, RawService};
use super::{AccessLog, Algorithm, BackendConfig, Config, ConfigError, HostPattern, LogFormat, ServiceConfig};

const MAX_WEIGHT: i64 = 10_000;

pub fn parse(path: &Path, text: &str) -> Result<Config, Vec<ConfigError>> {
    let probe: Option<Probe> = serde_saphyr::from_str(text).ok();
    if probe.is_some_and(|p| p.listen_port.is_some() || p.api_port.is_some()) {
        return super::legacy::parse(path, text);
    }
    let raw: RawConfig = serde_saphyr::from_str(text).map_err(|e| vec![yaml_error(path, &e)])?;
    validate(path, raw)
}

/// A serde-saphyr error as one `FILE:LINE:COLUMN: message` problem.
pub(super) fn yaml_error(path: &Path, e: &serde_saphyr::Error) -> ConfigError {
    let (line, column) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
    let opts = serde_saphyr::render_options! { snippets: SnippetMode::Off };
    let mut message = e.render_with_options(opts);
    // The position is already in front; drop the library's " at line L, column C".
    if let Some(i) = message.rfind(" at line ") {
        message.truncate(i);
    }
    ConfigError { file: path.to_owned(), line, column, message }
}

/// Where problems are gathered while validating.
pub(super) struct Problems<'a> {
    file: &'a Path,
    list: Vec<ConfigError>,
}

impl<'a> Problems<'a> {
    pub(super) fn new(file: &'a Path) -> Self {
        Problems { file, list: Vec::new() }
    }

    pub(super) fn at(&mut self, loc: &Location, message: impl Into<String>) {
        let (line, column) = if *loc == Location::UNKNOWN { (1, 1) } else { (loc.line(), loc.column()) };
        self.list.push(ConfigError { file: self.file.to_owned(), line, column, message: message.into() });
    }

    pub(super) fn into_list(self) -> Vec<ConfigError> {
        self.list
    }
}

pub(super) fn validate(path: &Path, raw: RawConfig) -> Result<Config, Vec<ConfigError>> {
    let mut p = Problems::new(path);
    let top = Location::UNKNOWN;

    let mut listen = Vec::new();
    match raw.listen {
        None => p.at(&top, "missing `listen`: the address to accept clients on, such as 127.0.0.1:8000"),
        Some(l) => {
            for addr in l.value.into_vec() {
                match parse_listen(&addr) {
                    Ok(a) => listen.push(a),
                    Err(e) => p.at(&l.referenced, e),
                }
            }
        }
    }

    let access_log = match raw.access_log {
        None => AccessLog::Stdout,
        Some(v) => match v.value.as_str() {
            "stdout" => AccessLog::Stdout,
            "off" => AccessLog::Off,
            path if path.contains('/') => AccessLog::File(path.into()),
            other => {
                p.at(
                    &v.referenced,
                    format!("access_log must be stdout, off or a file path containing '/', not {other:?}"),
                );
                AccessLog::Off
            }
        },
    };
    let log_format = match raw.log_format {
        None => LogFormat::Text,
        Some(v) => match v.value.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                p.at(&v.referenced, format!("log_format must be text or json, not {other:?}"));
                LogFormat::Text
            }
        },
    };

    let mut services = Vec::new();
    match raw.services {
        None => p.at(&top, "missing `services`: at least one service with backends"),
        Some(s) if s.value.is_empty() => p.at(&s.referenced, "`services` is empty: at least one service is needed"),
        Some(s) => {
            let mut names: HashMap<String, ()> = HashMap::new();
            let mut routes: HashMap<(Option<HostPattern>, String), String> = HashMap::new();
            for svc in s.value {
                let name_loc = svc.name.referenced;
                let name = svc.name.value.clone();
                if names.insert(name.clone(), ()).is_some() {
                    p.at(&name_loc, format!("duplicate service name {name:?}"));
                }
                let Some(service) = service(&mut p, svc) else { continue };
                let patterns: Vec<Option<HostPattern>> = if service.hosts.is_empty() {
                    vec![None]
                } else {
                    service.hosts.iter().cloned().map(Some).collect()
                };
                for pattern in patterns {
                    let key = (pattern, service.path_prefix.clone());
                    if let Some(other) = routes.get(&key) {
                        p.at(
                            &name_loc,
                            format!("service {name:?} has the same host and path_prefix as service {other:?}"),
                        );
                        break;
                    }
                    routes.insert(key, name.clone());
                }
                services.push(service);
            }
        }
    }

    if p.list.is_empty() {
        Ok(Config { listen, access_log, log_format, services, legacy_equivalent: None })
    } else {
        p.list.sort_by_key(|e| (e.line, e.column));
        Err(p.list)
    }
}

/// One service; `None` when it has problems (they are in `p`).
fn service(p: &mut Problems, raw: RawService) -> Option<ServiceConfig> {
    let before = p.list.len();
    let name = raw.name.value;
    if name.trim().is_empty() {
        p.at(&raw.name.referenced, "service name is empty");
    }
    let mut hosts = Vec::new();
    if let Some(h) = raw.hosts {
        for host in h.value.into_vec() {
            match host_pattern(&host) {
                Ok(Some(pattern)) => hosts.push(pattern),
                Ok(None) => {}
                Err(e) => p.at(&h.referenced, e),
            }
        }
    }
    let path_prefix = match raw.path_prefix {
        None => "/".to_string(),
        Some(v) if v.value.starts_with('/') => v.value,
        Some(v) => {
            p.at(&v.referenced, format!("path_prefix must start with '/', got {:?}", v.value));
            String::new()
        }
    };
    let algorithm = match raw.algorithm {
        None => Algorithm::RoundRobin,
        Some(v) => match parse_algorithm(&v.value) {
            Some(a) => a,
            None => {
                p.at(
                    &v.referenced,
                    format!(
                        "unknown algorithm {:?}: expected round_robin, weighted_round_robin or least_connections",
                        v.value
                    ),
                );
                Algorithm::RoundRobin
            }
        },
    };
    if raw.backends.value.is_empty() {
        p.at(&raw.backends.referenced, format!("service {name:?} has no backends"));
    }
    let backends: Vec<BackendConfig> = raw.backends.value.into_iter().filter_map(|b| backend(p, b)).collect();
    (p.list.len() == before).then_some(ServiceConfig { name, hosts, path_prefix, algorithm, backends })
}

fn backend(p: &mut Problems, raw: RawBackend) -> Option<BackendConfig> {
    let weight = match raw.weight {
        None => 1,
        Some(w) if (1..=MAX_WEIGHT).contains(&w.value) => w.value as u32,
        Some(w) => {
            p.at(&w.referenced, format!("weight must be between 1 and {MAX_WEIGHT}, got {}", w.value));
            return None;
        }
    };
    match parse_backend_address(&raw.address.value) {
        Ok((authority, addr)) => Some(BackendConfig { address: raw.address.value, addr, authority, weight }),
        Err(e) => {
            p.at(&raw.address.referenced, e);
            None
        }
    }
}

pub(super) fn parse_algorithm(name: &str) -> Option<Algorithm> {
    match name {
        "round_robin" => Some(Algorithm::RoundRobin),
        "weighted_round_robin" => Some(Algorithm::WeightedRoundRobin),
        "least_connections" => Some(Algorithm::LeastConnections),
        _ => None,
    }
}

/// `web.local`, `WEB.local:8080`, `*.web.local`, or `*` (the default service: `None`).
pub(super) fn host_pattern(host: &str) -> Result<Option<HostPattern>, String> {
    let h = host.trim().to_ascii_lowercase();
    if h == "*" {
        return Ok(None);
    }
    let h = match h.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => name.to_string(),
        _ => h,
    };
    let valid = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._[]:".contains(&b));
    if let Some(suffix) = h.strip_prefix('*') {
        if suffix.starts_with('.') && valid(&suffix[1..]) {
            return Ok(Some(HostPattern::Wildcard(suffix.to_string())));
        }
        return Err(format!("invalid wildcard host {host:?}: write it as *.example.com"));
    }
    if valid(&h) {
        Ok(Some(HostPattern::Exact(h)))
    } else {
        Err(format!("invalid host {host:?}"))
    }
}

/// `127.0.0.1:9001`, `localhost:9001`, `http://localhost:9001` → (`host:port`, resolved address).
pub(super) fn parse_backend_address(address: &str) -> Result<(String, SocketAddr), String> {
    let a = address.trim();
    let (rest, default_port) = if let Some(rest) = a.strip_prefix("http://") {
        (rest, Some(80))
    } else if a.starts_with("https://") {
        return Err(format!("backend {address:?}: https backends are not supported yet"));
    } else if a.contains("://") {
        return Err(format!("backend {address:?}: only http:// URLs are supported"));
    } else {
        (a, None)
    };
    let authority = match rest.split_once('/') {
        Some((auth, "")) => auth,
        Some(_) => return Err(format!("backend {address:?}: a path is not allowed in a backend address")),
        None => rest,
    };
    let (host, port) = split_host_port(authority, default_port)
        .ok_or_else(|| format!("invalid backend address {address:?}: expected host:port or http://host[:port]"))?;
    let addr = resolve(host, port).map_err(|e| format!("backend {address:?}: {e}"))?;
    let authority = if authority.contains(':') { authority.to_string() } else { format!("{authority}:{port}") };
    Ok((authority, addr))
}

/// `127.0.0.1:8000`, `localhost:8000`, `:8000` or `8000` (all interfaces).
pub(super) fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    let t = text.trim();
    let bare = t.strip_prefix(':').unwrap_or(t);
    if let Ok(port) = bare.parse::<u16>() {
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    let (host, port) =
        split_host_port(t, None).ok_or_else(|| format!("invalid listen address {text:?}: expected host:port"))?;
    resolve(host, port).map_err(|e| format!("listen address {text:?}: {e}"))
}

fn split_host_port(authority: &str, default_port: Option<u16>) -> Option<(&str, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after.strip_prefix(':') {
            Some(port) => Some((host, port.parse().ok()?)),
            None if after.is_empty() => Some((host, default_port?)),
            None => None,
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !host.contains(':') => Some((host, port.parse().ok()?)),
        Some(_) => None,
        None if !authority.is_empty() => Some((authority, default_port?)),
        None => None,
    }
}

/// Resolve once, at load; prefer IPv4 (what `localhost` usually means to a backend).
fn resolve(host: &str, port: u16) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> =
        (host, port).to_socket_addrs().map_err(|e| format!("cannot resolve {host:?}: {e}"))?.collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{host:?} resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, Vec<String>> {
        parse(Path::new("t.yaml"), text).map_err(|es| es.iter().map(|e| e.to_string()).collect())
    }

    #[test]
    fn full_config() {
        let cfg = load(
            "listen: [127.0.0.1:8000, ':8001']
access_log: off
log_format: json
services:
  - name: web
    hosts: [Web.Local, \"*.web.local\"]
    path_prefix: /api
    algorithm: least_connections
    backends:
      - address: 127.0.0.1:9001
        weight: 3
      - address: http://localhost:9002
  - name: default
    backends:
      - address: localhost:9003
",
        )
        .unwrap();
        assert_eq!(cfg.listen, vec!["127.0.0.1:8000".parse().unwrap(), "0.0.0.0:8001".parse().unwrap()]);
        assert_eq!(cfg.access_log, AccessLog::Off);
        assert_eq!(cfg.log_format, LogFormat::Json);
        let web = &cfg.services[0];
        assert_eq!(web.hosts, vec![HostPattern::Exact("web.local".into()), HostPattern::Wildcard(".web.local".into())]);
        assert_eq!((web.path_prefix.as_str(), web.algorithm), ("/api", Algorithm::LeastConnections));
        assert_eq!(web.backends[0].weight, 3);
        assert_eq!(web.backends[1].authority, "localhost:9002");
        assert_eq!(web.backends[1].addr, "127.0.0.1:9002".parse().unwrap());
        assert!(cfg.services[1].hosts.is_empty());
        assert_eq!(cfg.services[1].path_prefix, "/");
    }

    #[test]
    fn every_problem_at_its_position() {
        let errors = load(
            "listen: 127.0.0.1:8000
services:
  - name: a
    algorithm: fastest
    backends:
      - address: 127.0.0.1:9001
        weight: 0
  - name: a
    backends: []
  - name: b
    path_prefix: api
    backends:
      - address: not an address
",
        )
        .unwrap_err();
        assert_eq!(
            errors,
            vec![
                "t.yaml:4:16: unknown algorithm \"fastest\": expected round_robin, weighted_round_robin or least_connections",
                "t.yaml:7:17: weight must be between 1 and 10000, got 0",
                "t.yaml:8:11: duplicate service name \"a\"",
                "t.yaml:9:15: service \"a\" has no backends",
                "t.yaml:11:18: path_prefix must start with '/', got \"api\"",
                "t.yaml:13:18: invalid backend address \"not an address\": expected host:port or http://host[:port]",
            ]
        );
    }

    #[test]
    fn structural_errors() {
        let e = load("listen: 127.0.0.1:8000\nservices:\n  - name: a\n    bogus: 1\n    backends: []\n").unwrap_err();
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("t.yaml:4:5: unknown field `bogus`"), "{e:?}");
        let e = load("listen: a:1\nlisten: b:2\nservices: []\n").unwrap_err();
        assert!(e[0].starts_with("t.yaml:2:1: duplicate mapping key"), "{e:?}");
        let e = load("listen: 127.0.0.1:8000\nservices:\n  - name: a\n    backends:\n      - address: h:1\n        weight: heavy\n")
            .unwrap_err();
        assert!(e[0].starts_with("t.yaml:6:17:"), "{e:?}");
    }

    #[test]
    fn missing_and_empty() {
        assert!(load("services: []\n").unwrap_err().iter().any(|e| e.contains("missing `listen`")));
        assert!(load("listen: :80\nservices: []\n").unwrap_err()[0].contains("`services` is empty"));
        assert!(load("listen: :80\naccess_log: stdot\nservices: []\n").unwrap_err()[0]
            .starts_with("t.yaml:2:13: access_log"));
    }

    #[test]
    fn duplicate_routes() {
        let e = load(
            "listen: :80\nservices:\n  - name: a\n    hosts: x\n    backends: [{address: 127.0.0.1:1}]\n  - name: b\n    hosts: [X:80]\n    backends: [{address: 127.0.0.1:2}]\n",
        )
        .unwrap_err();
        assert_eq!(e, vec!["t.yaml:6:11: service \"b\" has the same host and path_prefix as service \"a\""]);
    }

    #[test]
    fn addresses() {
        assert_eq!(parse_backend_address("[::1]:90").unwrap().1, "[::1]:90".parse().unwrap());
        assert_eq!(
            parse_backend_address("http://127.0.0.1").unwrap(),
            ("127.0.0.1:80".into(), "127.0.0.1:80".parse().unwrap())
        );
        assert!(parse_backend_address("https://127.0.0.1").is_err());
        assert!(parse_backend_address("http://127.0.0.1:80/x").is_err());
        assert!(parse_backend_address("127.0.0.1").is_err());
        assert!(parse_backend_address("no-such-host.invalid:80").unwrap_err().contains("cannot resolve"));
        assert_eq!(host_pattern("*").unwrap(), None);
        assert!(host_pattern("*web").is_err());
    }
}
