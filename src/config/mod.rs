//! Configuration: the YAML schema, its validation into the model below, and the legacy Go format.
//!
//! Everything the data plane needs is resolved here, once, at load: addresses are resolved,
//! host patterns lower-cased, durations parsed. The request path never looks at YAML.

mod duration;
mod legacy;
mod schema;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use duration::parse_duration;

/// A fully validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    pub access_log: AccessLog,
    pub log_format: LogFormat,
    pub services: Vec<ServiceConfig>,
    /// Set when the file was in the original Go Velocity format; holds the equivalent new YAML.
    pub legacy_equivalent: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLog {
    Stdout,
    Off,
    File(PathBuf),
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
    pub backends: Vec<BackendConfig>,
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
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::RoundRobin => "round_robin",
            Algorithm::WeightedRoundRobin => "weighted_round_robin",
            Algorithm::LeastConnections => "least_connections",
        }
    }
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
}

/// One problem in a config file, printed as `FILE:LINE:COLUMN: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: u64,
    pub column: u64,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file.display(), self.line, self.column, self.message)
    }
}

/// Read, parse and validate a config file. On failure, every problem found is returned.
pub fn load(path: &Path) -> Result<Config, Vec<ConfigError>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![ConfigError { file: path.to_owned(), line: 0, column: 0, message: format!("cannot read: {e}") }]
    })?;
    parse(path, &text)
}

/// Parse and validate config text; `path` is used only in error messages.
pub fn parse(path: &Path, text: &str) -> Result<Config, Vec<ConfigError>> {
    validate::parse(path, text)
}

/// One line per service, for `velocity check`, such as
/// `service web: hosts web.local,*.web.local path /api, least_connections over 2 backends (127.0.0.1:9001 w3, 127.0.0.1:9002 w1)`.
pub fn summary_lines(cfg: &Config) -> Vec<String> {
    cfg.services
        .iter()
        .map(|s| {
            let hosts = if s.hosts.is_empty() {
                "*".to_owned()
            } else {
                s.hosts.iter().map(HostPattern::to_string).collect::<Vec<_>>().join(",")
            };
            let backends: Vec<String> = s.backends.iter().map(|b| format!("{} w{}", b.address, b.weight)).collect();
            let noun = if backends.len() == 1 { "backend" } else { "backends" };
            format!(
                "service {}: hosts {hosts} path {}, {} over {} {noun} ({})",
                s.name,
                s.path_prefix,
                s.algorithm.name(),
                backends.len(),
                backends.join(", ")
            )
        })
        .collect()
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
