//! Raw schema → validated model. Every semantic problem is collected (not just the first), each
//! at the line and column of the value (or key) it is about.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use serde_saphyr::{Location, MessageFormatter, Spanned};

use super::schema::{OneOrMany, Probe, RawBackend, RawConfig, RawService, Scalar, S};
use super::{
    legacy, lifecycle, preflight, AccessLog, Algorithm, BackendConfig, CheckKind, Config, ConfigError, EventLog,
    HostPattern, LogFormat, ServiceConfig, Timeouts,
};

pub const MAX_WEIGHT: i64 = 10_000;

/// How much of the machine validation may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// What `run` needs: host names resolved, the access log opened, listen addresses bound
    /// (and released).
    Run,
    /// Host names resolved; no file or socket touched.
    Text,
    /// Nothing outside the process: host names are not looked up (each stands for 127.0.0.1).
    Offline,
}

pub fn parse(path: &Path, text: &str, scope: Scope) -> Result<Config, Vec<ConfigError>> {
    // The probe tolerates duplicate keys so that the right parse reports them; any other
    // failure (bad YAML, not a mapping) falls through to the full parse, which reports it.
    let probe_options = serde_saphyr::options! { duplicate_keys: serde_saphyr::DuplicateKeyPolicy::FirstWins };
    if serde_saphyr::from_str_with_options::<Probe>(text, probe_options).is_ok_and(|p| p.is_legacy()) {
        return legacy::parse(path, text, scope);
    }
    let raw: RawConfig = serde_saphyr::from_str(text).map_err(|e| vec![syntax_error(path, &e)])?;
    let mut ctx = Ctx::new(path, scope);
    let cfg = convert(&mut ctx, raw);
    ctx.finish(cfg)
}

fn convert(ctx: &mut Ctx, mut raw: RawConfig) -> Config {
    let (limits, shutdown) = lifecycle::global(ctx, &mut raw);
    let http2 = super::http2::convert(ctx, raw.http2.take());
    let policy = super::policy::global(ctx, &mut raw);
    ctx.timeouts = limits.timeouts;
    let listen = match raw.listen {
        Some(l) => listen(ctx, l),
        None if raw.listeners.is_some() => Vec::new(),
        None => {
            ctx.error_at(1, 1, "missing `listen`: the address to listen on, such as 127.0.0.1:8000");
            Vec::new()
        }
    };
    let access_log = raw.access_log.map_or(AccessLog::Stdout, |v| access_log(ctx, &v));
    let log_format = raw.log_format.map_or(LogFormat::Text, |v| log_format(ctx, &v));
    let event_log = raw.event_log.map_or(EventLog::Stderr, |v| event_log(ctx, &v));
    let access_log_ring = raw.access_log_ring.map_or(crate::observe::ring::DEFAULT_LINES, |v| access_log_ring(ctx, &v));
    ctx.tcp_services = super::listeners::tcp_service_names(raw.listeners.as_ref());
    let services = services(ctx, raw.services);
    let admin = raw.admin.and_then(|a| super::admin::convert(ctx, a));
    let listeners = raw.listeners.map_or_else(Vec::new, |l| {
        super::listeners::convert(ctx, l, &listen, &services, limits.max_client_connections)
    });
    let cluster = raw.cluster.and_then(|c| super::cluster::convert(ctx, c));
    if let (None, Some((line, column))) = (&cluster, ctx.cluster_scope_at) {
        ctx.error_at(line, column, "scope: cluster needs a `cluster:` section (the Redis store the instances share)");
    }
    Config {
        listen: listen.into_iter().map(|(addr, _)| addr).collect(),
        listeners,
        access_log,
        log_format,
        event_log,
        access_log_ring,
        services,
        limits,
        shutdown,
        http2,
        admin,
        cluster,
        policy,
        legacy_equivalent: None,
    }
}

/// Collects problems for one file.
pub struct Ctx<'a> {
    file: &'a Path,
    pub scope: Scope,
    errors: Vec<ConfigError>,
    /// Lower-cased host → first resolved address (port 0), so a host used by many backends is
    /// looked up once.
    resolved: HashMap<String, Result<IpAddr, String>>,
    /// The top-level timeouts, which services inherit; set before the services are read.
    pub timeouts: Timeouts,
    /// Where the first `scope: cluster` rate limit is (it needs `cluster:`).
    pub cluster_scope_at: Option<(u64, u64)>,
    /// Services a tcp listener forwards to: they take no HTTP route (see `listeners.rs`).
    pub tcp_services: Vec<String>,
}

impl<'a> Ctx<'a> {
    pub fn new(file: &'a Path, scope: Scope) -> Ctx<'a> {
        Ctx {
            file,
            scope,
            errors: Vec::new(),
            resolved: HashMap::new(),
            timeouts: Timeouts::default(),
            cluster_scope_at: None,
            tcp_services: Vec::new(),
        }
    }

    pub fn error(&mut self, at: &Location, message: impl Into<String>) {
        self.error_at(at.line(), at.column(), message);
    }

    pub fn error_at(&mut self, line: u64, column: u64, message: impl Into<String>) {
        self.errors.push(ConfigError { file: self.file.to_owned(), line, column, message: message.into() });
    }

    pub fn finish<T>(mut self, value: T) -> Result<T, Vec<ConfigError>> {
        if self.errors.is_empty() {
            return Ok(value);
        }
        // Stable: problems on one line stay in the order they were found.
        self.errors.sort_by_key(|e| (e.line, e.column));
        Err(self.errors)
    }

    /// `path` as written in the config file: relative to the file's directory.
    pub fn relative(&self, path: &Path) -> PathBuf {
        match self.file.parent() {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_owned(),
        }
    }

    fn resolve(&mut self, host: &str, port: u16) -> Result<SocketAddr, String> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(SocketAddr::new(ip, port));
        }
        if self.scope == Scope::Offline {
            return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
        }
        let ip = self
            .resolved
            .entry(host.to_ascii_lowercase())
            .or_insert_with(|| match (host, 0).to_socket_addrs() {
                Ok(addrs) => {
                    let addrs: Vec<SocketAddr> = addrs.collect();
                    // Prefer IPv4: `localhost` often resolves to ::1 first, and backends
                    // commonly listen on 127.0.0.1 only.
                    addrs
                        .iter()
                        .find(|a| a.is_ipv4())
                        .or(addrs.first())
                        .map(SocketAddr::ip)
                        .ok_or_else(|| format!("host {host:?} does not resolve to any address"))
                }
                Err(e) => Err(format!("cannot resolve host {host:?}: {e}")),
            })
            .clone()?;
        Ok(SocketAddr::new(ip, port))
    }
}

/// A serde-saphyr error as one of ours: the bare message (its Display adds a snippet and a
/// location suffix) at the error's location.
pub fn syntax_error(file: &Path, e: &serde_saphyr::Error) -> ConfigError {
    let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
    let mut inner = e;
    while let serde_saphyr::Error::WithSnippet { error, .. } | serde_saphyr::Error::AliasError { error, .. } = inner {
        inner = error;
    }
    let raw = serde_saphyr::DefaultMessageFormatter.format_message(inner);
    // Messages can quote the input; keep the report on one line.
    let raw: String = raw.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    ConfigError { file: file.to_owned(), line, column, message: tidy_message(&raw) }
}

/// Reword serde's messages in the terms of a YAML file.
fn tidy_message(msg: &str) -> String {
    if let Some(rest) = msg.strip_prefix("duplicate mapping key: ") {
        let key = rest.split(", set DuplicateKeyPolicy").next().unwrap_or(rest);
        return format!("duplicate key `{key}`");
    }
    if let Some(rest) = msg.strip_prefix("unknown field ") {
        let (key, allowed) = match rest.split_once(", expected one of ").or_else(|| rest.split_once(", expected ")) {
            Some((key, allowed)) => (key, allowed),
            None => return format!("unknown key {rest}"),
        };
        let names: Vec<&str> = allowed.split(", ").map(|k| k.trim_matches('`')).collect();
        return match closest(key.trim_matches('`'), &names) {
            Some(hint) => format!("unknown key {key}: did you mean `{hint}`? allowed keys: {allowed}"),
            None => format!("unknown key {key}; allowed keys: {allowed}"),
        };
    }
    if let Some(rest) = msg.strip_prefix("missing field ") {
        return format!("missing key {rest}");
    }
    match msg {
        "expected sequence start" => "expected a list".to_owned(),
        "expected mapping start" => "expected a mapping of keys to values".to_owned(),
        "expected string scalar" => "expected a string".to_owned(),
        _ => msg.to_owned(),
    }
}

/// The allowed key `key` was most likely meant as: the same but for case, `_` and `-`
/// (`targetUrls`, `healthCheck`), or one or two letters off (`conect`, `backend`).
fn closest<'k>(key: &str, allowed: &[&'k str]) -> Option<&'k str> {
    let fold = |k: &str| -> Vec<char> {
        k.chars().filter(|c| *c != '_' && *c != '-').map(|c| c.to_ascii_lowercase()).collect()
    };
    let key = fold(key);
    let (distance, best) = allowed.iter().map(|a| (edit_distance(&key, &fold(a)), *a)).min_by_key(|(d, _)| *d)?;
    // Short keys need a closer match: `on` is not a typo of `ip`.
    (distance <= 2 && distance * 3 <= key.len()).then_some(best)
}

/// Levenshtein distance (insertions, deletions, substitutions).
fn edit_distance(a: &[char], b: &[char]) -> usize {
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(ca != cb);
            current.push(substitute.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

/// The top-level `listen:` addresses, each with its line.
fn listen(ctx: &mut Ctx, value: S<OneOrMany>) -> Vec<(SocketAddr, u64)> {
    let whole = value.referenced;
    let items = OneOrMany::into_items(value);
    if items.is_empty() {
        ctx.error(&whole, "`listen` has no addresses");
    }
    let mut seen: HashMap<SocketAddr, u64> = HashMap::new();
    let mut out = Vec::new();
    for item in items {
        match listen_address(ctx, &item.value) {
            Ok(addr) => {
                if let Some(first) = seen.get(&addr) {
                    ctx.error(&item.referenced, format!("listen address {addr} is already listed on line {first}"));
                } else {
                    if ctx.scope == Scope::Run {
                        if let Err(msg) = preflight::listen(addr) {
                            ctx.error(&item.referenced, msg);
                        }
                    }
                    seen.insert(addr, item.referenced.line());
                    out.push((addr, item.referenced.line()));
                }
            }
            Err(msg) => ctx.error(&item.referenced, msg),
        }
    }
    out
}

/// One listen address: `host:port`, `[v6]:port`, `port` or `:port`.
pub(super) fn listen_address(ctx: &mut Ctx, text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    // `8000` and `:8000` mean all interfaces, like the Go version's listen_port.
    let port_only = text.strip_prefix(':').unwrap_or(text);
    if !port_only.is_empty() && port_only.bytes().all(|b| b.is_ascii_digit()) {
        port_only
            .parse::<u16>()
            .map(|port| SocketAddr::from(([0, 0, 0, 0], port)))
            .map_err(|_| format!("port {port_only} is out of range (0-65535)"))
    } else {
        split_authority(text).and_then(|(host, port)| {
            check_host(host)?;
            let port = port.ok_or_else(|| format!("listen address {text:?} needs a port, such as 127.0.0.1:8000"))?;
            ctx.resolve(host, port)
        })
    }
}

fn access_log(ctx: &mut Ctx, v: &S<String>) -> AccessLog {
    let text = v.value.trim();
    if text.eq_ignore_ascii_case("stdout") {
        AccessLog::Stdout
    } else if text.eq_ignore_ascii_case("off") {
        AccessLog::Off
    } else if text.contains('/') {
        // Only values with a `/` are paths, so a typo such as `stdot` or `none` is reported
        // instead of silently creating a file by that name.
        let path = PathBuf::from(text);
        if ctx.scope == Scope::Run {
            if let Err(msg) = preflight::access_log(&path) {
                ctx.error(&v.referenced, msg);
            }
        }
        AccessLog::File(path)
    } else {
        ctx.error(
            &v.referenced,
            format!("unknown access_log {text:?}: use stdout, off, or a file path containing \"/\", such as ./{text}"),
        );
        AccessLog::Stdout
    }
}

fn event_log(ctx: &mut Ctx, v: &S<String>) -> EventLog {
    let text = v.value.trim();
    if text.eq_ignore_ascii_case("stderr") {
        EventLog::Stderr
    } else if text.eq_ignore_ascii_case("stdout") {
        EventLog::Stdout
    } else if text.contains('/') {
        EventLog::File(PathBuf::from(text))
    } else {
        ctx.error(
            &v.referenced,
            format!(
                "unknown event_log {text:?}: use stderr, stdout, or a file path containing \"/\", such as ./{text}"
            ),
        );
        EventLog::Stderr
    }
}

/// The most lines `access_log_ring` may keep (each is a few hundred bytes).
const MAX_RING_LINES: i64 = 1_000_000;

fn access_log_ring(ctx: &mut Ctx, v: &S<Scalar>) -> usize {
    lifecycle::count(ctx, "access_log_ring", v, 0, MAX_RING_LINES).unwrap_or(crate::observe::ring::DEFAULT_LINES)
}

fn log_format(ctx: &mut Ctx, v: &S<String>) -> LogFormat {
    match v.value.trim() {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            ctx.error(&v.referenced, format!("unknown log_format {other:?}: use text or json"));
            LogFormat::Text
        }
    }
}

/// Shared with the legacy format, which maps its services onto `RawService` first.
pub fn services(ctx: &mut Ctx, raw: Option<S<Vec<S<RawService>>>>) -> Vec<ServiceConfig> {
    let Some(list) = raw else {
        ctx.error_at(1, 1, "missing `services`: at least one service is needed");
        return Vec::new();
    };
    if list.value.is_empty() {
        ctx.error(&list.referenced, "`services` is empty: at least one service is needed");
    }
    // Name → line of its first definition.
    let mut names: HashMap<String, u64> = HashMap::new();
    // (host or None for the default, path prefix) → (service name, line).
    let mut routes: HashMap<(Option<HostPattern>, String), (String, u64)> = HashMap::new();
    let mut out = Vec::new();
    for (index, item) in list.value.into_iter().enumerate() {
        let at = item.referenced;
        let mut raw = item.value;
        let global_timeouts = ctx.timeouts;
        let limits = lifecycle::service(ctx, &mut raw, &global_timeouts);
        let name = match &raw.name {
            Some(n) if n.value.trim().is_empty() => {
                ctx.error(&n.referenced, "service name is empty");
                format!("#{}", index + 1)
            }
            Some(n) => {
                let name = n.value.trim().to_owned();
                match names.get(&name) {
                    Some(first) => ctx.error(
                        &n.referenced,
                        format!("duplicate service name {name:?} (first defined on line {first})"),
                    ),
                    None => {
                        names.insert(name.clone(), n.referenced.line());
                    }
                }
                name
            }
            None => {
                ctx.error(&at, "service has no `name`");
                format!("#{}", index + 1)
            }
        };
        let name_at = raw.name.as_ref().map_or(at, |n| n.referenced);

        let algorithm = raw.algorithm.as_ref().map_or(Algorithm::RoundRobin, |a| algorithm(ctx, a));
        let balancing = super::balancing::convert(ctx, &mut raw, algorithm, name_at);
        let policy = super::policy::service(ctx, &mut raw);
        let (hosts, hosts_valid) = raw.hosts.map_or((Vec::new(), true), |h| hosts(ctx, h));
        let path_prefix = match &raw.path_prefix {
            Some(p) => path_prefix(ctx, p),
            None => "/".to_owned(),
        };
        let backend_protocol = super::backend_protocol::convert(ctx, raw.backend_protocol.as_ref());
        let health = super::health::convert(ctx, raw.health_check, raw.passive, raw.retry, backend_protocol);
        // An https check without a `host` verifies each backend's certificate against the
        // backend's own name, so that name must be one TLS can carry.
        let tls_names = health.check.as_ref().is_some_and(|c| c.kind == CheckKind::Https && c.host.is_none());
        if let Some(at) = raw.discovery.as_ref().map(|d| d.referenced).or(raw.managed.as_ref().map(|m| m.referenced)) {
            super::backend_protocol::check_dynamic(ctx, backend_protocol, at);
        }
        let discovery = raw.discovery.map(|d| super::discovery::discovery(ctx, d)).unwrap_or_default();
        let managed = raw.managed.and_then(|m| super::discovery::managed(ctx, m));
        // A discovered or managed service may start with no backends: they come later.
        let dynamic = !discovery.is_empty() || managed.is_some();
        let backends = backends(ctx, &name, raw.backends, name_at, tls_names, dynamic, backend_protocol);

        // Route conflicts point at the second service's host entry, else its path_prefix,
        // else its name: whichever makes the route the same.
        // Hosts that were all invalid must not count as the default route.
        // A tcp listener's service is no HTTP route at all.
        let keys: Vec<(Option<HostPattern>, Location)> =
            if ctx.tcp_services.contains(&name) || (!hosts_valid && hosts.is_empty()) {
                Vec::new()
            } else if hosts.is_empty() {
                vec![(None, raw.path_prefix.as_ref().map_or(name_at, |p| p.referenced))]
            } else {
                hosts.iter().map(|(h, loc)| (Some(h.clone()), *loc)).collect()
            };
        for (host, loc) in keys {
            let key = (host, path_prefix.clone());
            match routes.get(&key) {
                Some((other, line)) => {
                    let host = key.0.as_ref().map_or_else(|| "*".to_owned(), HostPattern::to_string);
                    ctx.error(
                        &loc,
                        format!(
                            "service {name:?} has the same route as service {other:?} (line {line}): host {host}, path {}",
                            key.1
                        ),
                    );
                }
                None => {
                    routes.insert(key, (name.clone(), loc.line()));
                }
            }
        }

        out.push(ServiceConfig {
            name,
            hosts: hosts.into_iter().map(|(h, _)| h).collect(),
            path_prefix,
            algorithm,
            backend_protocol,
            backends,
            health,
            limits,
            balancing,
            policy,
            discovery,
            managed,
        });
    }
    out
}

/// The host patterns with their locations (empty means the default service), and whether all
/// of them were valid.
fn hosts(ctx: &mut Ctx, value: S<OneOrMany>) -> (Vec<(HostPattern, Location)>, bool) {
    let items = OneOrMany::into_items(value);
    let mut out: Vec<(HostPattern, Location)> = Vec::new();
    let mut star: Option<Location> = None;
    let mut valid = true;
    for item in &items {
        match host_pattern(&item.value) {
            Ok(Some(h)) => {
                // A repeated host in one service is harmless; keep it once.
                if !out.iter().any(|(seen, _)| *seen == h) {
                    out.push((h, item.referenced));
                }
            }
            Ok(None) => star = Some(item.referenced),
            Err(msg) => {
                valid = false;
                ctx.error(&item.referenced, msg);
            }
        }
    }
    if let (Some(at), false) = (star, out.is_empty()) {
        // The model cannot say "default and also these hosts", and it would mean the same as `*`.
        ctx.error(&at, "`*` (the default service) cannot be listed together with other hosts");
    }
    (out, valid)
}

/// `None` for `*` (the default service).
fn host_pattern(text: &str) -> Result<Option<HostPattern>, String> {
    let lower = text.trim().to_ascii_lowercase();
    if lower == "*" {
        return Ok(None);
    }
    // A Host header carries a port; routing ignores it, so drop it here.
    let (host, _port) = split_authority(&lower)?;
    if let Some(suffix) = host.strip_prefix("*.") {
        check_host(suffix)?;
        return Ok(Some(HostPattern::Wildcard(format!(".{suffix}"))));
    }
    if host.contains('*') {
        return Err(format!("invalid host {text:?}: a wildcard must be the whole first label, as in *.example.com"));
    }
    check_host(host)?;
    Ok(Some(HostPattern::Exact(host.to_owned())))
}

fn path_prefix(ctx: &mut Ctx, p: &S<String>) -> String {
    let text = p.value.trim();
    if !text.starts_with('/') {
        ctx.error(&p.referenced, format!("path_prefix {text:?} must start with \"/\""));
    } else if text.contains(|c: char| c.is_whitespace() || c == '?' || c == '#') {
        ctx.error(&p.referenced, format!("path_prefix {text:?} must be a plain path (no spaces, `?` or `#`)"));
    }
    text.to_owned()
}

fn algorithm(ctx: &mut Ctx, a: &S<String>) -> Algorithm {
    let text = a.value.trim();
    match Algorithm::ALL.into_iter().find(|alg| alg.name() == text) {
        Some(alg) => alg,
        None => {
            ctx.error(
                &a.referenced,
                format!("unknown algorithm {text:?}: use {}", super::balancing::algorithm_names()),
            );
            Algorithm::RoundRobin
        }
    }
}

fn backends(
    ctx: &mut Ctx,
    service: &str,
    raw: Option<S<Vec<S<RawBackend>>>>,
    name_at: Location,
    tls_names: bool,
    dynamic: bool,
    protocol: super::BackendProtocol,
) -> Vec<BackendConfig> {
    let list = match raw {
        Some(list) if !list.value.is_empty() => list,
        _ if dynamic => return Vec::new(),
        Some(list) => {
            ctx.error(&list.referenced, format!("service {service:?} has no backends"));
            return Vec::new();
        }
        None => {
            ctx.error(&name_at, format!("service {service:?} has no backends"));
            return Vec::new();
        }
    };
    // Resolved address → (line, address as written) of its first listing. Backends are one per
    // address (a reload carries them over by it), so a second listing would silently merge.
    let mut seen: HashMap<SocketAddr, (u64, String)> = HashMap::new();
    let mut out: Vec<BackendConfig> = Vec::new();
    for item in list.value {
        let mut b = item.value;
        let weight = match &b.weight {
            None => Some(1),
            Some(w) => match w.value {
                Scalar::Int(n @ 1..=MAX_WEIGHT) => u32::try_from(n).ok(),
                _ => {
                    ctx.error(
                        &w.referenced,
                        format!("weight must be a whole number from 1 to {MAX_WEIGHT}, got {}", w.value),
                    );
                    None
                }
            },
        };
        let Some(address) = &b.address else {
            ctx.error(&item.referenced, "backend has no `address`");
            continue;
        };
        let max_connections = lifecycle::backend(ctx, &b);
        let written = address.value.trim();
        let target = parse_backend_address(written).and_then(|(host, port)| {
            if tls_names {
                super::health::tls_server_name(host)?;
            }
            ctx.resolve(host, port)
        });
        let addr = match target {
            Ok(addr) => addr,
            Err(msg) => {
                ctx.error(&address.referenced, msg);
                continue;
            }
        };
        let host = parse_backend_address(written).map_or("", |(h, _)| h);
        let tls = super::backend_tls::convert(ctx, is_https(written), host, b.tls.take(), address.referenced);
        if let Some((line, first)) = seen.get(&addr) {
            let again = if first == written {
                format!("backend {written} is listed twice in service {service:?} (first on line {line})")
            } else {
                // Name why two spellings are the same backend when it does not show.
                let both = if authority_of(written) == addr.to_string() {
                    String::new()
                } else {
                    format!(" (both are {addr})")
                };
                format!("backend {written} is already listed in service {service:?} on line {line} as {first}{both}")
            };
            ctx.error(&address.referenced, again);
            continue;
        }
        seen.insert(addr, (address.referenced.line(), written.to_owned()));
        if let Some(weight) = weight {
            let b = BackendConfig {
                address: written.to_owned(),
                addr,
                authority: authority_of(written).to_owned(),
                weight,
                max_connections,
                tls,
            };
            super::backend_protocol::check_backend(ctx, protocol, &b, address.referenced);
            out.push(b);
        }
    }
    out
}

/// `host:port` of a backend address as written: without the scheme and the trailing `/`.
fn authority_of(address: &str) -> &str {
    let text = address.trim();
    let rest = text.split_once("://").map_or(text, |(_, rest)| rest);
    rest.split(['/', '?', '#']).next().unwrap_or(rest)
}

/// Whether a backend address is `https://`: Velocity speaks TLS to it.
fn is_https(address: &str) -> bool {
    address.trim().split_once("://").is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("https"))
}

/// Host and port of `host:port` or `http[s]://host[:port][/]` (port 80 or 443 by default for
/// a URL).
fn parse_backend_address(address: &str) -> Result<(&str, u16), String> {
    let text = address.trim();
    let default_port = match text.split_once("://") {
        Some((scheme, rest)) => {
            let https = scheme.eq_ignore_ascii_case("https");
            if !https && !scheme.eq_ignore_ascii_case("http") {
                return Err(format!(
                    "backend address {text:?}: unsupported scheme {scheme}://, only http:// and https:// are supported"
                ));
            }
            let path = &rest[authority_of(text).len()..];
            if !path.is_empty() && path != "/" {
                return Err(format!(
                    "backend address {text:?} has a path; only a host and port are allowed (requests keep their own path)"
                ));
            }
            Some(if https { 443 } else { 80 })
        }
        None => None,
    };
    let (host, port) = split_authority(authority_of(text)).map_err(|e| format!("backend address {text:?}: {e}"))?;
    check_host(host).map_err(|e| format!("backend address {text:?}: {e}"))?;
    match port.or(default_port) {
        Some(0) => Err(format!("backend address {text:?}: port 0 is not a usable port")),
        Some(port) => Ok((host, port)),
        None => Err(format!("backend address {text:?} needs a port, such as 127.0.0.1:9001")),
    }
}

/// Split `host:port`, `[v6]:port`, `host` or a bare IPv6 address; brackets are removed.
fn split_authority(text: &str) -> Result<(&str, Option<u16>), String> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(|| format!("{text:?}: missing `]`"))?;
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err(format!("{text:?}: unexpected {after:?} after `]`")),
            },
        }
    } else if text.matches(':').count() > 1 {
        (text, None)
    } else {
        match text.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            Some(p.parse::<u16>().map_err(|_| format!("port {p} is out of range (0-65535)"))?)
        }
        Some(p) => return Err(format!("invalid port {p:?}")),
    };
    if host.is_empty() {
        return Err(format!("{text:?} has no host"));
    }
    Ok((host, port))
}

/// A host name or IP address (IPv6 without brackets).
fn check_host(host: &str) -> Result<(), String> {
    if host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let valid_label = |l: &str| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    // A trailing dot (fully qualified name) is allowed.
    let name = host.strip_suffix('.').unwrap_or(host);
    if !name.is_empty() && name.split('.').all(valid_label) {
        Ok(())
    } else {
        Err(format!("invalid host name {host:?}"))
    }
}

/// Transform a spanned value, keeping its location.
pub fn map_spanned<T, U>(s: S<T>, f: impl FnOnce(T) -> U) -> S<U> {
    Spanned { value: f(s.value), referenced: s.referenced, defined: s.defined }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{errors, load};

    /// The positions of the errors, `LINE:COL`.
    fn positions(text: &str) -> Vec<String> {
        errors(text).iter().map(|e| e.split(": ").next().unwrap_or_default().to_owned()).collect()
    }

    const FULL: &str = "\
listen: 127.0.0.1:8000
access_log: ./access.log
log_format: json
services:
  - name: web
    hosts: [Web.Local, \"*.web.local\", \"web.local:8080\"]
    path_prefix: /api
    algorithm: least_connections
    backends:
      - address: 127.0.0.1:9001
        weight: 3
      - address: http://localhost:9002/
  - name: default
    hosts: \"*\"
    algorithm: weighted_round_robin
    backends:
      - address: localhost:9003
";

    #[test]
    fn valid_full_config() {
        let cfg = load(FULL).unwrap();
        assert_eq!(cfg.listen, vec!["127.0.0.1:8000".parse().unwrap()]);
        assert_eq!(cfg.access_log, AccessLog::File(PathBuf::from("./access.log")));
        assert_eq!(cfg.log_format, LogFormat::Json);
        assert_eq!(cfg.legacy_equivalent, None);
        let web = &cfg.services[0];
        assert_eq!(web.name, "web");
        assert_eq!(web.hosts, vec![HostPattern::Exact("web.local".into()), HostPattern::Wildcard(".web.local".into())]);
        assert_eq!(web.path_prefix, "/api");
        assert_eq!(web.algorithm, Algorithm::LeastConnections);
        assert_eq!(
            web.backends,
            vec![
                BackendConfig {
                    address: "127.0.0.1:9001".into(),
                    addr: "127.0.0.1:9001".parse().unwrap(),
                    authority: "127.0.0.1:9001".into(),
                    weight: 3,
                    max_connections: None,
                    tls: None,
                },
                BackendConfig {
                    address: "http://localhost:9002/".into(),
                    addr: "127.0.0.1:9002".parse().unwrap(),
                    authority: "localhost:9002".into(),
                    weight: 1,
                    max_connections: None,
                    tls: None,
                },
            ]
        );
        let default = &cfg.services[1];
        assert!(default.hosts.is_empty());
        assert_eq!(default.path_prefix, "/");
        assert_eq!(default.algorithm, Algorithm::WeightedRoundRobin);
        assert_eq!(default.backends[0].addr, "127.0.0.1:9003".parse().unwrap());
        assert_eq!(default.backends[0].authority, "localhost:9003");
    }

    #[test]
    fn defaults_and_listen_forms() {
        let cfg = load(
            "listen: [127.0.0.1:8000, \"localhost:8001\", \"[::1]:8002\"]\nservices:\n  - name: a\n    backends:\n      - address: 127.0.0.1:1\n",
        )
        .unwrap();
        assert_eq!(
            cfg.listen,
            vec!["127.0.0.1:8000".parse().unwrap(), "127.0.0.1:8001".parse().unwrap(), "[::1]:8002".parse().unwrap()]
        );
        assert_eq!(cfg.access_log, AccessLog::Stdout);
        assert_eq!(cfg.log_format, LogFormat::Text);
        let s = &cfg.services[0];
        assert!(s.hosts.is_empty());
        assert_eq!((s.path_prefix.as_str(), s.algorithm), ("/", Algorithm::RoundRobin));
        assert_eq!(s.backends[0].weight, 1);

        let cfg =
            load("listen: [8000, \":8001\"]\nservices:\n  - name: a\n    backends:\n      - address: 127.0.0.1:1\n")
                .unwrap();
        assert_eq!(cfg.listen, vec!["0.0.0.0:8000".parse().unwrap(), "0.0.0.0:8001".parse().unwrap()]);

        let cfg = load("listen: 127.0.0.1:0\naccess_log: off\nservices:\n  - name: a\n    hosts: web.local\n    backends:\n      - address: 127.0.0.1:1\n").unwrap();
        assert_eq!(cfg.access_log, AccessLog::Off);
        assert_eq!(cfg.services[0].hosts, vec![HostPattern::Exact("web.local".into())]);
    }

    fn one_service(service_lines: &str) -> String {
        format!("listen: 127.0.0.1:8000\nservices:\n  - name: web\n{service_lines}")
    }

    #[test]
    fn each_error_kind_at_its_position() {
        let cases: &[(&str, &str, &str)] = &[
            ("listen: 127.0.0.1:8000\nservices: []\nbogus: 1\n", "3:1", "unknown key `bogus`; allowed keys: listen"),
            (&one_service("    backend: []\n"), "4:5", "unknown key `backend`"),
            ("listen: 127.0.0.1:8000\nservices: web\n", "2:11", "expected a list"),
            (&one_service("    name: [web]\n"), "4:5", "duplicate key `name`"),
            ("listen: 127.0.0.1:8000\nservices:\n  - name: [web]\n", "3:11", "expected a string"),
            (&one_service("    backends:\n      - address: 127.0.0.1:1\n        weight: [1]\n"), "6:17", "got a list"),
            ("listen: 127.0.0.1:8000\nlisten: 127.0.0.1:8001\nservices: []\n", "2:1", "duplicate key `listen`"),
            (&one_service("    backends:\n      - address: 127.0.0.1:1\n      - address: 127.0.0.1:2\n        address: 127.0.0.1:3\n"), "7:9", "duplicate key `address`"),
            (&one_service("    backends: []\n"), "4:15", "service \"web\" has no backends"),
            (&one_service("    algorithm: round_robin\n"), "3:11", "service \"web\" has no backends"),
            (&one_service("    backends:\n      - address: 127.0.0.1:1\n        weight: 0\n"), "6:17", "weight must be a whole number from 1 to 10000, got 0"),
            (&one_service("    backends:\n      - address: 127.0.0.1:1\n        weight: 10001\n"), "6:17", "got 10001"),
            (&one_service("    backends:\n      - address: 127.0.0.1:1\n        weight: heavy\n"), "6:17", "got \"heavy\""),
            (&one_service("    backends:\n      - address: 127.0.0.1\n"), "5:18", "needs a port"),
            (&one_service("    backends:\n      - address: 127.0.0.1:99999\n"), "5:18", "out of range"),
            (&one_service("    backends:\n      - address: ftp://127.0.0.1:9001\n"), "5:18", "only http:// and https:// are supported"),
            (&one_service("    backends:\n      - address: http://127.0.0.1:9001/app\n"), "5:18", "has a path"),
            (&one_service("    backends:\n      - address: bad_host!:80\n"), "5:18", "invalid host name"),
            (&one_service("    backends:\n      - weight: 2\n"), "5:9", "backend has no `address`"),
            (&one_service("    algorithm: fastest\n    backends:\n      - address: 127.0.0.1:1\n"), "4:16", "unknown algorithm \"fastest\": use round_robin, weighted_round_robin, least_connections, random, p2c, peak_ewma, ip_hash, url_hash, header_hash or sticky"),
            (&one_service("    path_prefix: api\n    backends:\n      - address: 127.0.0.1:1\n"), "4:18", "path_prefix \"api\" must start with \"/\""),
            (&one_service("    hosts: [\"web.*\"]\n    backends:\n      - address: 127.0.0.1:1\n"), "4:13", "wildcard"),
            ("listen: 127.0.0.1:8000\naccess_log: stderr\nservices:\n  - name: a\n    backends:\n      - address: 127.0.0.1:1\n", "2:13", "unknown access_log \"stderr\""),
            ("listen: 127.0.0.1:8000\nlog_format: xml\nservices:\n  - name: a\n    backends:\n      - address: 127.0.0.1:1\n", "2:13", "unknown log_format \"xml\": use text or json"),
            ("listen: 127.0.0.1:8000\nservices: []\n", "2:11", "`services` is empty"),
            ("listen: 127.0.0.1:8000\n", "1:1", "missing `services`"),
            ("services:\n  - name: a\n    backends:\n      - address: 127.0.0.1:1\n", "1:1", "missing `listen`"),
            ("listen: localhost\nservices:\n  - name: a\n    backends:\n      - address: 127.0.0.1:1\n", "1:9", "needs a port"),
            ("listen: 70000\nservices:\n  - name: a\n    backends:\n      - address: 127.0.0.1:1\n", "1:9", "out of range"),
            ("listen: 127.0.0.1:8000\naccess_log: access.log\nservices:\n  - name: a\n    backends:\n      - address: 127.0.0.1:1\n", "2:13", "containing \"/\", such as ./access.log"),
            ("listen: [127.0.0.1:8000, 127.0.0.1:8000]\nservices:\n  - name: a\n    backends:\n      - address: 127.0.0.1:1\n", "1:26", "already listed on line 1"),
            ("listen: [a\n", "1:9", "unclosed bracket"),
        ];
        for (text, at, message) in cases {
            let errors = errors(text);
            assert_eq!(errors.len(), 1, "{text}\n{errors:?}");
            assert!(errors[0].starts_with(&format!("{at}: ")), "{text}\nexpected at {at}: {errors:?}");
            assert!(errors[0].contains(message), "{text}\nexpected {message:?}: {errors:?}");
        }
    }

    #[test]
    fn duplicate_service_names_and_routes_point_at_the_second() {
        let text = "\
listen: 127.0.0.1:8000
services:
  - name: web
    hosts: [a.local, b.local]
    path_prefix: /x
    backends: [{address: 127.0.0.1:1}]
  - name: web
    hosts: [B.local:80]
    path_prefix: /x
    backends: [{address: 127.0.0.1:2}]
  - name: one
    backends: [{address: 127.0.0.1:3}]
  - name: two
    hosts: \"*\"
    backends: [{address: 127.0.0.1:4}]
";
        assert_eq!(
            errors(text),
            vec![
                "7:11: duplicate service name \"web\" (first defined on line 3)",
                "8:13: service \"web\" has the same route as service \"web\" (line 4): host b.local, path /x",
                "13:11: service \"two\" has the same route as service \"one\" (line 11): host *, path /",
            ]
        );
        // The same host with another prefix, or another host, is a different route.
        assert!(load("listen: 127.0.0.1:8000\nservices:\n  - name: a\n    backends: [{address: 127.0.0.1:1}]\n  - name: b\n    path_prefix: /b\n    backends: [{address: 127.0.0.1:1}]\n  - name: c\n    hosts: c.local\n    backends: [{address: 127.0.0.1:1}]\n").is_ok());
    }

    #[test]
    fn several_errors_reported_together_sorted_by_line() {
        let text = "\
log_format: yaml
services:
  - name: web
    algorithm: randomly
    backends:
      - address: 127.0.0.1:9001
        weight: 0
      - address: 127.0.0.1
  - name: web
    path_prefix: nope
    backends: []
";
        assert_eq!(
            positions(text),
            vec!["1:1", "1:13", "4:16", "7:17", "8:18", "9:11", "10:18", "11:15"],
            "{:#?}",
            errors(text)
        );
    }

    #[test]
    fn duplicate_keys_are_reported_with_their_location() {
        assert_eq!(
            errors("listen: 127.0.0.1:8000\nservices: []\nservices: []\n"),
            vec!["3:1: duplicate key `services`"]
        );
        // Also in the legacy format, which otherwise ignores keys it does not know.
        assert_eq!(errors("listen_port: 8080\nlisten_port: 8081\n"), vec!["2:1: duplicate key `listen_port`"]);
    }

    #[test]
    fn error_display_is_file_line_column_message() {
        let e = load("listen: 127.0.0.1:8000\nservices: []\n").unwrap_err();
        assert_eq!(e[0].to_string(), "t.yaml:2:11: `services` is empty: at least one service is needed");
        // About the whole file: no made-up `:0:0`.
        let e = crate::config::load(Path::new("/nonexistent/velocity.yaml")).unwrap_err();
        assert_eq!(e[0].to_string(), "/nonexistent/velocity.yaml: cannot read: No such file or directory (os error 2)");
    }

    #[test]
    fn the_same_backend_twice_in_a_service_points_at_the_second() {
        let text = one_service(
            "    backends:
      - address: 127.0.0.1:9001
      - address: 127.0.0.1:9002
      - address: 127.0.0.1:9001
      - address: http://localhost:9002/
",
        );
        assert_eq!(
            errors(&text),
            vec![
                "7:18: backend 127.0.0.1:9001 is listed twice in service \"web\" (first on line 5)",
                "8:18: backend http://localhost:9002/ is already listed in service \"web\" on line 6 as 127.0.0.1:9002 (both are 127.0.0.1:9002)",
            ]
        );
        // In two services it is two backends: each service has its own pool.
        assert!(load("listen: 127.0.0.1:8000\nservices:\n  - name: a\n    backends: [{address: 127.0.0.1:1}]\n  - name: b\n    path_prefix: /b\n    backends: [{address: 127.0.0.1:1}]\n").is_ok());
    }

    #[test]
    fn unknown_keys_get_a_hint_when_one_is_close() {
        let cases = [
            ("listen: 127.0.0.1:8000\nservice: []\n", "2:1: unknown key `service`: did you mean `services`?"),
            (&one_service("    backend: []\n"), "4:5: unknown key `backend`: did you mean `backends`?"),
            (&one_service("    pathPrefix: /x\n"), "4:5: unknown key `pathPrefix`: did you mean `path_prefix`?"),
            (&one_service("    healthCheck: {}\n"), "4:5: unknown key `healthCheck`: did you mean `health_check`?"),
            (&one_service("    retry: {atempts: 1}\n"), "4:13: unknown key `atempts`: did you mean `attempts`?"),
            ("listen: 127.0.0.1:8000\ntimeouts: {conect: 1s}\n", "2:12: unknown key `conect`: did you mean `connect`?"),
        ];
        for (text, want) in cases {
            let e = errors(text);
            assert!(e.len() == 1 && e[0].starts_with(want), "{text}\n{e:?}");
            assert!(e[0].contains("allowed keys: "), "{e:?}");
        }
        // Nothing close: the allowed keys only.
        let e = errors("listen: 127.0.0.1:8000\nservices: []\nbogus: 1\n");
        assert!(e[0].starts_with("3:1: unknown key `bogus`; allowed keys: listen, listeners, access_log"), "{e:?}");
        assert_eq!(closest("on", &["ip", "name"]), None);
        assert_eq!(closest("targetUrls", &["name", "targetURLs"]), Some("targetURLs"));
    }

    #[test]
    fn an_https_check_needs_backend_names_tls_can_verify() {
        let long = "a".repeat(64);
        let text = format!(
            "listen: 127.0.0.1:8000\nservices:\n  - name: web\n    health_check: {{type: https}}\n    backends:\n      - address: {long}:443\n      - address: 127.0.0.2:443\n"
        );
        let e = errors(&text);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("6:18: ") && e[0].contains("is not a name TLS can verify"), "{e:?}");
        // With a `host`, the certificate is checked against it instead.
        let text = text.replace("{type: https}", "{type: https, host: web.local}");
        assert!(crate::config::parse_offline(Path::new("t.yaml"), &text).is_ok());
    }

    #[test]
    fn host_patterns() {
        assert_eq!(host_pattern("*"), Ok(None));
        assert_eq!(host_pattern("Web.Local:8080"), Ok(Some(HostPattern::Exact("web.local".into()))));
        assert_eq!(host_pattern("*.Web.Local"), Ok(Some(HostPattern::Wildcard(".web.local".into()))));
        assert_eq!(host_pattern("[::1]:80"), Ok(Some(HostPattern::Exact("::1".into()))));
        assert!(host_pattern("").is_err());
        assert!(host_pattern("a b").is_err());
        assert!(host_pattern("*.").is_err());
    }

    #[test]
    fn backend_addresses() {
        assert_eq!(parse_backend_address("http://localhost"), Ok(("localhost", 80)));
        assert_eq!(parse_backend_address("HTTP://127.0.0.1:81/"), Ok(("127.0.0.1", 81)));
        assert_eq!(parse_backend_address("[::1]:9000"), Ok(("::1", 9000)));
        assert_eq!(authority_of("http://localhost:9001/"), "localhost:9001");
        assert!(parse_backend_address("localhost:0").is_err());
        assert!(parse_backend_address("localhost:").is_err());
        assert!(parse_backend_address(":9000").is_err());
        assert!(parse_backend_address("http://user@localhost:9000").is_err());
    }
}
