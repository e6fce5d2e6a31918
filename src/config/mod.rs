//! Configuration: the YAML schema, its validation into the model below, and the legacy Go format.
//!
//! Everything the data plane needs is resolved here, once, at load: addresses are resolved,
//! host patterns lower-cased, durations parsed. The request path never looks at YAML.

pub(crate) mod admin;
mod backend_protocol;
mod backend_tls;
mod balancing;
pub(crate) mod cluster;
mod discovery;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod health;
mod http2;
mod legacy;
mod lifecycle;
mod listeners;
mod policy;
mod preflight;
mod schema;
mod validate;
mod value;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use admin::AdminConfig;
pub use backend_protocol::BackendProtocol;
pub use backend_tls::BackendTlsConfig;
pub use cluster::{ClusterConfig, OnStoreError};
pub use discovery::{Discovery, DnsDiscovery, DnsKind, DockerDiscovery, ManagedConfig};
pub use http2::Http2Config;
pub use listeners::{CertificateFiles, ListenerConfig, ListenerProtocol, ProxyProtocolVersion, TlsConfig, TlsVersion};
pub use policy::{
    parse_net, AccessRules, DenyAction, GlobalPolicy, LimitKey, LimitScope, Rate, RateLimitConfig, ServicePolicy,
};
pub use validate::{Scope, MAX_WEIGHT};
pub use value::{format_duration, parse_duration, parse_size};

/// A fully validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The top-level `listen:`: plain HTTP listeners (see `all_listeners`).
    pub listen: Vec<SocketAddr>,
    /// `listeners:`, in order.
    pub listeners: Vec<ListenerConfig>,
    pub access_log: AccessLog,
    pub log_format: LogFormat,
    /// Where events (everything but access lines) go.
    pub event_log: EventLog,
    /// Access-log lines kept in memory for `GET /api/v1/logs` (0: none).
    pub access_log_ring: usize,
    pub services: Vec<ServiceConfig>,
    /// Listener-wide timeouts and limits (client side), and the defaults services inherit.
    pub limits: Limits,
    pub shutdown: Shutdown,
    /// `http2:`: HTTP/2 to clients.
    pub http2: Http2Config,
    /// `admin:`: the admin API listener; `None`: no admin API.
    pub admin: Option<AdminConfig>,
    /// `cluster:`: the Redis store shared with other instances; `None`: this instance alone.
    pub cluster: Option<ClusterConfig>,
    /// `trusted_proxies`, the listener's `allow`/`deny`, the run-time deny list.
    pub policy: GlobalPolicy,
    /// Set when the file was in the original Go Velocity format; holds the equivalent new YAML.
    pub legacy_equivalent: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLog {
    Stdout,
    Off,
    File(PathBuf),
}

/// As written in the file: `stdout`, `off` or the path.
impl fmt::Display for AccessLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccessLog::Stdout => f.write_str("stdout"),
            AccessLog::Off => f.write_str("off"),
            AccessLog::File(path) => write!(f, "{}", path.display()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventLog {
    Stderr,
    Stdout,
    File(PathBuf),
}

impl fmt::Display for EventLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventLog::Stderr => f.write_str("stderr"),
            EventLog::Stdout => f.write_str("stdout"),
            EventLog::File(p) => write!(f, "{}", p.display()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    pub name: String,
    /// Empty means "default service" (no hosts, or `*`).
    pub hosts: Vec<HostPattern>,
    /// Always starts with `/`; `/` when not configured.
    pub path_prefix: String,
    pub algorithm: Algorithm,
    /// What Velocity speaks to the backends: HTTP/1.1 (default), HTTP/2 over TLS or h2c.
    pub backend_protocol: BackendProtocol,
    pub backends: Vec<BackendConfig>,
    /// Issue 3: health checks, passive detection, retries.
    pub health: HealthConfig,
    /// Timeouts, body limit and queue of this service (the global defaults where not overridden).
    pub limits: ServiceLimits,
    /// The algorithm's parameters (`hash_key`, `sticky`, `slow_start`, ...).
    pub balancing: Balancing,
    /// `allow`/`deny`, `rate_limits` and the service's run-time deny list.
    pub policy: ServicePolicy,
    /// `discovery:`: DNS or Docker sources of backends (none: the list alone).
    pub discovery: Discovery,
    /// `managed:`: backends Velocity starts and scales itself.
    pub managed: Option<ManagedConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// Lower-cased host without port.
    Exact(String),
    /// `*.example.com` stored as the lower-cased suffix `.example.com`.
    Wildcard(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    RoundRobin,
    WeightedRoundRobin,
    LeastConnections,
    Random,
    P2c,
    PeakEwma,
    IpHash,
    UrlHash,
    HeaderHash,
    /// A cookie over a base algorithm (`Balancing::sticky`).
    Sticky,
}

impl Algorithm {
    pub const ALL: [Algorithm; 10] = [
        Algorithm::RoundRobin,
        Algorithm::WeightedRoundRobin,
        Algorithm::LeastConnections,
        Algorithm::Random,
        Algorithm::P2c,
        Algorithm::PeakEwma,
        Algorithm::IpHash,
        Algorithm::UrlHash,
        Algorithm::HeaderHash,
        Algorithm::Sticky,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::RoundRobin => "round_robin",
            Algorithm::WeightedRoundRobin => "weighted_round_robin",
            Algorithm::LeastConnections => "least_connections",
            Algorithm::Random => "random",
            Algorithm::P2c => "p2c",
            Algorithm::PeakEwma => "peak_ewma",
            Algorithm::IpHash => "ip_hash",
            Algorithm::UrlHash => "url_hash",
            Algorithm::HeaderHash => "header_hash",
            Algorithm::Sticky => "sticky",
        }
    }

    /// Hashing algorithms keep each key on its backend: weights do not ramp.
    pub fn is_hash(self) -> bool {
        matches!(self, Algorithm::IpHash | Algorithm::UrlHash | Algorithm::HeaderHash)
    }
}

/// Parameters of a service's algorithm, beside `algorithm:` in the service block.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Balancing {
    /// `header_hash`: the header to hash, lower-cased.
    pub hash_key: Option<String>,
    /// `url_hash`: hash the query too (default: the path only).
    pub hash_query: bool,
    /// `sticky`: the cookie and the base algorithm.
    pub sticky: Option<StickyConfig>,
    /// Ramp a backend that comes (back) into service from 10% to 100% of its weight.
    pub slow_start: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StickyConfig {
    pub cookie: String,
    /// The cookie's `Max-Age`; `None`: a session cookie.
    pub ttl: Option<Duration>,
    /// Picks when the cookie is missing or its backend is unusable; never `Sticky`.
    pub base: Algorithm,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// The address as written in the file (`127.0.0.1:9001`, `http://localhost:9001`).
    pub address: String,
    /// Resolved at load.
    pub addr: SocketAddr,
    /// `host:port` used as the Host header when the client sent none.
    pub authority: String,
    pub weight: u32,
    /// Requests this backend may have in flight; `None`: no limit.
    pub max_connections: Option<usize>,
    /// `https://` addresses: TLS to the backend.
    pub tls: Option<BackendTlsConfig>,
}

/// A service's failure handling (issue 3), kept in one struct so other per-service sections
/// can be added beside it without touching these fields.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HealthConfig {
    /// `None`: no active checks, every backend is assumed up (passive detection still applies).
    pub check: Option<HealthCheckConfig>,
    pub passive: PassiveConfig,
    pub retry: RetryConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckKind {
    Tcp,
    Http,
    Https,
    /// `grpc.health.v1.Health/Check` over the backends' own HTTP/2 (h2 or h2c).
    Grpc,
}

impl CheckKind {
    pub fn name(self) -> &'static str {
        match self {
            CheckKind::Tcp => "tcp",
            CheckKind::Http => "http",
            CheckKind::Https => "https",
            CheckKind::Grpc => "grpc",
        }
    }
}

/// `health_check:` of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckConfig {
    pub kind: CheckKind,
    /// Path and query of the check request (http/https); starts with `/`.
    pub path: String,
    /// Inclusive range of statuses that pass.
    pub expect_status: (u16, u16),
    /// Host header (and TLS server name for https); the backend's `host:port` when unset.
    pub host: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive passes for a down backend to come back.
    pub healthy_threshold: u32,
    /// Consecutive failures for an up backend to leave.
    pub unhealthy_threshold: u32,
    pub insecure_skip_verify: bool,
    /// `grpc` checks: the gRPC service asked about; empty: the server as a whole.
    pub grpc_service: String,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            kind: CheckKind::Http,
            path: "/healthz".into(),
            expect_status: (200, 399),
            host: None,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            insecure_skip_verify: false,
            grpc_service: String::new(),
        }
    }
}

/// `passive:` of a service: the circuit breaker fed by live traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassiveConfig {
    /// Consecutive failures that eject a backend; 0 turns passive detection off.
    pub consecutive_failures: u32,
    /// Whether a 5xx answer counts as a failure (connect errors always do).
    pub on_5xx: bool,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    /// At most this percentage of a pool is ejected at once.
    pub max_ejected_percent: u32,
}

impl Default for PassiveConfig {
    fn default() -> Self {
        PassiveConfig {
            consecutive_failures: 5,
            on_5xx: false,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(120),
            max_ejected_percent: 50,
        }
    }
}

/// `retry:` of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryConfig {
    /// Retries after the first try (so up to `attempts + 1` tries); 0 turns retries off.
    pub attempts: u32,
    /// Backend statuses that are retried (a subset of 502, 503, 504).
    pub on: Vec<u16>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Request bodies with a Content-Length up to this are buffered so they can be replayed.
    pub buffer_body_limit: u64,
    /// Retries allowed as a percentage of recent requests.
    pub budget_percent: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: 2,
            on: Vec::new(),
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_secs(1),
            buffer_body_limit: 64 * 1024,
            budget_percent: 20,
        }
    }
}

/// One problem in a config file, printed as `FILE:LINE:COLUMN: message`, or `FILE: message`
/// when it is about the whole file (line 0: it cannot be read, or the YAML error has no place).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: u64,
    pub column: u64,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            return write!(f, "{}: {}", self.file.display(), self.message);
        }
        write!(f, "{}:{}:{}: {}", self.file.display(), self.line, self.column, self.message)
    }
}

/// Read, parse and validate a config file, and check what `run` needs of the machine (the
/// access log can be opened, the listen addresses are this machine's): a file that loads
/// here starts, unless a port is taken. On failure, every problem found is returned.
pub fn load(path: &Path) -> Result<Config, Vec<ConfigError>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![ConfigError { file: path.to_owned(), line: 0, column: 0, message: format!("cannot read: {e}") }]
    })?;
    validate::parse(path, &text, Scope::Run)
}

/// Parse and validate config text; `path` is used only in error messages. Host names are
/// resolved; no file or socket is touched.
pub fn parse(path: &Path, text: &str) -> Result<Config, Vec<ConfigError>> {
    validate::parse(path, text, Scope::Text)
}

/// As `parse`, without looking anything up: every host name stands for 127.0.0.1. For fuzzing
/// and tools that must not send DNS queries; the result is not meant to be run.
pub fn parse_offline(path: &Path, text: &str) -> Result<Config, Vec<ConfigError>> {
    validate::parse(path, text, Scope::Offline)
}

/// One line per service, for `velocity check`, such as
/// `service web: hosts web.local,*.web.local path /api, least_connections over 2 backends (127.0.0.1:9001 w3, 127.0.0.1:9002 w1)`.
pub fn summary_lines(cfg: &Config) -> Vec<String> {
    let services = cfg.services.iter().map(|s| {
        let hosts = if s.hosts.is_empty() {
            "*".to_owned()
        } else {
            s.hosts.iter().map(HostPattern::to_string).collect::<Vec<_>>().join(",")
        };
        let backends: Vec<String> = s
            .backends
            .iter()
            .map(|b| match b.max_connections {
                Some(max) => format!("{} w{} max {max}", b.address, b.weight),
                None => format!("{} w{}", b.address, b.weight),
            })
            .collect();
        let noun = if backends.len() == 1 { "backend" } else { "backends" };
        let mut line = format!(
            "service {}: hosts {hosts} path {}, {} over {} {noun} ({})",
            s.name,
            s.path_prefix,
            s.algorithm.name(),
            backends.len(),
            backends.join(", ")
        );
        // What else governs the service, so `check` shows the settings that took effect.
        if s.backend_protocol.is_h2() {
            line += &format!("; speaks {} to them", s.backend_protocol.name());
        }
        line += &balancing::summary(s);
        line += &policy::summary(&s.policy);
        if let Some(c) = &s.health.check {
            line += &format!("; {} check every {:?}", c.kind.name(), c.interval);
        }
        line += &format!("; {} retries", s.health.retry.attempts);
        if let Some(d) = &s.discovery.dns {
            line += &format!("; dns {} {} every {:?}", d.kind.name(), d.name, d.refresh);
        }
        if let Some(d) = &s.discovery.docker {
            let labels: Vec<String> = d.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            line += &format!("; docker containers labelled {}", labels.join(","));
        }
        if let Some(m) = &s.managed {
            line += &format!("; managed {}..{} instances on ports {}-{}", m.min, m.max, m.ports.0, m.ports.1);
        }
        if s.backends.iter().any(|b| b.max_connections.is_some()) {
            let q = s.limits.queue;
            line += &format!("; queue {} for {:?}", q.size, q.timeout);
        }
        line
    });
    listeners::summary_lines(cfg).into_iter().chain(services).collect()
}

/// As written in the file: `web.local` or `*.web.local`.
impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Wildcard(suffix) => write!(f, "*{suffix}"),
        }
    }
}

/// The config as new-format YAML; `parse` of the result gives an equal `Config` (with
/// `legacy_equivalent` unset).
pub fn to_yaml(cfg: &Config) -> String {
    legacy::to_yaml(cfg)
}

// ---- Timeouts, limits, queueing and shutdown ----

/// Every timeout, resolved. In a service, the `client_*` ones are the global ones
/// (they apply before a request is routed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From the first byte of a request (or the accept) to the end of its headers: then 408.
    pub client_header: Duration,
    /// A keep-alive client connection with no request for this long is closed.
    pub client_idle: Duration,
    /// A client that takes none of its response for this long is cut off (NGINX's
    /// `send_timeout`): it would otherwise hold a backend connection for as long as it likes.
    pub client_send: Duration,
    /// Connecting to a backend.
    pub connect: Duration,
    /// From sending the request to the backend's response headers: then 504.
    pub backend_response: Duration,
    /// The whole exchange up to the response headers (queueing, connects, retries): then 504.
    pub request: Duration,
    /// A tunnel (WebSocket, TCP mode) with no byte either way for this long is closed.
    pub tunnel_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            client_header: Duration::from_secs(10),
            client_idle: Duration::from_secs(60),
            client_send: Duration::from_secs(60),
            connect: Duration::from_secs(2),
            backend_response: Duration::from_secs(30),
            request: Duration::from_secs(60),
            tunnel_idle: Duration::from_secs(3600),
        }
    }
}

/// Top-level limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub timeouts: Timeouts,
    /// Request line plus headers; beyond it the client gets 431.
    pub max_header_bytes: usize,
    /// Open client connections per listener; at the limit the listener stops accepting.
    pub max_client_connections: usize,
}

pub const DEFAULT_MAX_HEADER_BYTES: usize = 32 * 1024;
pub const DEFAULT_MAX_CLIENT_CONNECTIONS: usize = 10_000;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeouts: Timeouts::default(),
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_client_connections: DEFAULT_MAX_CLIENT_CONNECTIONS,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shutdown {
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT.
    pub drain_timeout: Duration,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown { drain_timeout: Duration::from_secs(30) }
    }
}

/// Per-service limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServiceLimits {
    pub timeouts: Timeouts,
    /// Request body limit; beyond it the client gets 413. `None`: no limit.
    pub max_body_bytes: Option<u64>,
    pub queue: QueueConfig,
}

/// Where requests wait when every backend is at its `max_connections`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// Requests that may wait; 0 means none (503 at once).
    pub size: usize,
    pub timeout: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig { size: 100, timeout: Duration::from_secs(10) }
    }
}

/// Helpers shared by the config's unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    use std::path::Path;

    use super::{parse, Config, ConfigError};

    /// A config of `section` (top-level keys, each line ending in a newline) beside one listener
    /// and one service: the frame for testing a section on its own.
    pub fn with_one_service(section: &str) -> String {
        format!(
            "listen: 127.0.0.1:8000\n{section}services:\n  - name: a\n    backends: [{{address: 127.0.0.1:9001}}]\n"
        )
    }

    /// `parse` of `text` as the file `t.yaml`.
    pub fn load(text: &str) -> Result<Config, Vec<ConfigError>> {
        parse(Path::new("t.yaml"), text)
    }

    /// The problems as `LINE:COL: message`.
    pub fn lines(errors: &[ConfigError]) -> Vec<String> {
        errors.iter().map(|e| format!("{}:{}: {}", e.line, e.column, e.message)).collect()
    }

    /// Each problem starts with its expected `LINE:COL: message` prefix, and there are no others.
    pub fn assert_prefixes(errors: &[String], expected: &[&str]) {
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
        for (got, want) in errors.iter().zip(expected) {
            assert!(got.starts_with(want), "{got:?} should start with {want:?}\n{errors:#?}");
        }
    }

    /// The problems in `text` as `LINE:COL: message`; panics when it loads.
    pub fn errors(text: &str) -> Vec<String> {
        match load(text) {
            Ok(cfg) => panic!("expected errors, got {cfg:?}"),
            Err(errors) => lines(&errors),
        }
    }
}
