//! `discovery:` (DNS, Docker) and `managed:` (local processes Velocity starts and scales) of a
//! service: where its backends come from besides the `backends` list. Read here once; the
//! tasks that act on them are in `crate::discovery`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use serde_saphyr::Location;

use super::schema::{Scalar, S};
use super::validate::Ctx;
use super::value::{self, format_duration, Bounds, HOUR, SECOND};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDiscovery {
    pub dns: Option<S<RawDns>>,
    pub docker: Option<S<RawDocker>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDns {
    pub name: Option<S<Scalar>>,
    #[serde(rename = "type")]
    pub kind: Option<S<Scalar>>,
    pub port: Option<S<Scalar>>,
    pub resolver: Option<S<Scalar>>,
    pub refresh: Option<S<Scalar>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDocker {
    pub socket: Option<S<Scalar>>,
    pub labels: Option<S<BTreeMap<String, S<Scalar>>>>,
    pub port: Option<S<Scalar>>,
    pub network: Option<S<Scalar>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawManaged {
    pub command: Option<S<Vec<S<Scalar>>>>,
    pub ports: Option<S<Scalar>>,
    pub min: Option<S<Scalar>>,
    pub max: Option<S<Scalar>>,
    pub target_in_flight: Option<S<Scalar>>,
    pub stable_window: Option<S<Scalar>>,
    pub panic_window: Option<S<Scalar>>,
    pub scale_down_delay: Option<S<Scalar>>,
}

/// Where a service's backends come from besides its list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Discovery {
    pub dns: Option<DnsDiscovery>,
    pub docker: Option<DockerDiscovery>,
}

impl Discovery {
    pub fn is_empty(&self) -> bool {
        self.dns.is_none() && self.docker.is_none()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsKind {
    A,
    Aaaa,
    Srv,
}

impl DnsKind {
    pub fn name(self) -> &'static str {
        match self {
            DnsKind::A => "A",
            DnsKind::Aaaa => "AAAA",
            DnsKind::Srv => "SRV",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsDiscovery {
    pub name: String,
    pub kind: DnsKind,
    /// The backends' port for A/AAAA (SRV records carry theirs).
    pub port: u16,
    /// `None`: the system's resolvers (`/etc/resolv.conf`).
    pub resolver: Option<SocketAddr>,
    /// Resolved again this often, or at the answer's TTL when shorter (at least 1 s).
    pub refresh: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerDiscovery {
    pub socket: String,
    /// Containers carrying every one of these labels are backends.
    pub labels: BTreeMap<String, String>,
    /// The container port; the label `velocity.port` overrides it. `None`: the label is required.
    pub port: Option<u16>,
    /// The network whose address is used; `None`: the container's first.
    pub network: Option<String>,
}

pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(30);

/// `managed:`: processes Velocity starts, health-checks, restarts and scales.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedConfig {
    /// argv; `{port}` in any item is replaced by the instance's port.
    pub command: Vec<String>,
    /// Inclusive range of ports for instances.
    pub ports: (u16, u16),
    pub min: u32,
    pub max: u32,
    /// In-flight requests per instance the autoscaler aims at.
    pub target_in_flight: u32,
    pub stable_window: Duration,
    pub panic_window: Duration,
    /// At most one instance is removed per this period.
    pub scale_down_delay: Duration,
}

const WINDOW: Bounds<Duration> = Bounds { min: Duration::from_millis(100), max: HOUR };

pub fn discovery(ctx: &mut Ctx, raw: S<RawDiscovery>) -> Discovery {
    let raw = raw.value;
    Discovery { dns: raw.dns.and_then(|d| dns(ctx, d)), docker: raw.docker.and_then(|d| docker(ctx, d)) }
}

/// A non-empty string, trimmed.
fn text(ctx: &mut Ctx, key: &str, v: &S<Scalar>) -> Option<String> {
    value::text(ctx, key, v, |t| !t.trim().is_empty(), "a non-empty string").map(|t| t.trim().to_owned())
}

fn port(ctx: &mut Ctx, key: &str, v: &S<Scalar>) -> Option<u16> {
    value::whole(ctx, key, v, 1, 65535).and_then(|n| u16::try_from(n).ok())
}

fn dns(ctx: &mut Ctx, raw: S<RawDns>) -> Option<DnsDiscovery> {
    let at = raw.referenced;
    let raw = raw.value;
    let kind = match &raw.kind {
        None => DnsKind::A,
        Some(v) => match &v.value {
            Scalar::Text(t) if t.eq_ignore_ascii_case("a") => DnsKind::A,
            Scalar::Text(t) if t.eq_ignore_ascii_case("aaaa") => DnsKind::Aaaa,
            Scalar::Text(t) if t.eq_ignore_ascii_case("srv") => DnsKind::Srv,
            other => {
                ctx.error(&v.referenced, format!("discovery.dns.type must be A, AAAA or SRV, got {other}"));
                return None;
            }
        },
    };
    let name = match &raw.name {
        Some(v) => text(ctx, "discovery.dns.name", v),
        None => {
            ctx.error(&at, "discovery.dns needs `name`: the DNS name to resolve");
            None
        }
    };
    let port = match (&raw.port, kind) {
        (Some(v), DnsKind::Srv) => {
            ctx.error(&v.referenced, "discovery.dns.port does not apply to SRV records, which carry their port");
            None
        }
        (Some(v), _) => port(ctx, "discovery.dns.port", v),
        (None, DnsKind::Srv) => Some(0),
        (None, _) => {
            ctx.error(&at, "discovery.dns needs `port` for A and AAAA records");
            None
        }
    };
    let resolver = match &raw.resolver {
        None => Some(None),
        Some(v) => text(ctx, "discovery.dns.resolver", v).and_then(|t| {
            match t.parse::<SocketAddr>().or_else(|_| t.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, 53))) {
                Ok(a) => Some(Some(a)),
                Err(_) => {
                    ctx.error(&v.referenced, format!("discovery.dns.resolver must be IP:PORT or an IP, got {t:?}"));
                    None
                }
            }
        }),
    };
    let refresh = match &raw.refresh {
        None => Some(DEFAULT_REFRESH),
        Some(v) => value::duration(ctx, "discovery.dns.refresh", v, Bounds { min: SECOND, max: HOUR }),
    };
    Some(DnsDiscovery { name: name?, kind, port: port?, resolver: resolver?, refresh: refresh? })
}

fn docker(ctx: &mut Ctx, raw: S<RawDocker>) -> Option<DockerDiscovery> {
    let at = raw.referenced;
    let raw = raw.value;
    let socket = match &raw.socket {
        None => Some(DEFAULT_DOCKER_SOCKET.to_owned()),
        Some(v) => text(ctx, "discovery.docker.socket", v),
    };
    let mut labels = BTreeMap::new();
    match &raw.labels {
        Some(l) if !l.value.is_empty() => {
            for (k, v) in &l.value {
                let val = match &v.value {
                    Scalar::Text(t) => t.clone(),
                    Scalar::Int(n) => n.to_string(),
                    Scalar::Other(o) => o.clone(),
                };
                labels.insert(k.clone(), val);
            }
        }
        Some(l) => ctx.error(&l.referenced, "discovery.docker.labels is empty: every container would be a backend"),
        None => ctx.error(&at, "discovery.docker needs `labels`, such as labels: {velocity.service: web}"),
    }
    let port = match &raw.port {
        None => Some(None),
        Some(v) => port(ctx, "discovery.docker.port", v).map(Some),
    };
    let network = match &raw.network {
        None => Some(None),
        Some(v) => text(ctx, "discovery.docker.network", v).map(Some),
    };
    if labels.is_empty() {
        return None;
    }
    Some(DockerDiscovery { socket: socket?, labels, port: port?, network: network? })
}

pub fn managed(ctx: &mut Ctx, raw: S<RawManaged>) -> Option<ManagedConfig> {
    let at: Location = raw.referenced;
    let raw = raw.value;
    let mut ok = true;
    let command = match &raw.command {
        Some(c) if !c.value.is_empty() => {
            let mut out = Vec::new();
            for item in &c.value {
                match &item.value {
                    Scalar::Text(t) => out.push(t.clone()),
                    Scalar::Int(n) => out.push(n.to_string()),
                    other => {
                        ctx.error(&item.referenced, format!("managed.command items must be strings, got {other}"));
                        ok = false;
                    }
                }
            }
            if !out.iter().any(|a| a.contains("{port}")) {
                ctx.error(&c.referenced, "managed.command must contain {port}: each instance listens on its own port");
                ok = false;
            }
            out
        }
        Some(c) => {
            ctx.error(&c.referenced, "managed.command is empty");
            return None;
        }
        None => {
            ctx.error(&at, "managed needs `command`, such as command: [\"./app\", \"--port\", \"{port}\"]");
            return None;
        }
    };
    let ports = match &raw.ports {
        None => {
            ctx.error(&at, "managed needs `ports`, a range such as 9100-9199");
            None
        }
        Some(v) => {
            let t = match &v.value {
                Scalar::Text(t) => t.clone(),
                Scalar::Int(n) => n.to_string(),
                Scalar::Other(o) => o.clone(),
            };
            let parsed = match t.split_once('-') {
                Some((a, b)) => a.trim().parse::<u16>().ok().zip(b.trim().parse::<u16>().ok()),
                None => t.trim().parse::<u16>().ok().map(|p| (p, p)),
            };
            match parsed {
                Some((a, b)) if a >= 1 && a <= b => Some((a, b)),
                _ => {
                    ctx.error(
                        &v.referenced,
                        format!("managed.ports must be a port range such as 9100-9199, got {t:?}"),
                    );
                    None
                }
            }
        }
    };
    let num = |ctx: &mut Ctx, v: &Option<S<Scalar>>, key: &str, min: i64, max: i64, default: u32| match v {
        None => Some(default),
        Some(v) => value::whole(ctx, key, v, min, max).and_then(|n| u32::try_from(n).ok()),
    };
    let min = num(ctx, &raw.min, "managed.min", 0, 1000, 1);
    let max = num(ctx, &raw.max, "managed.max", 1, 1000, min.unwrap_or(1).max(1));
    let target = num(ctx, &raw.target_in_flight, "managed.target_in_flight", 1, 100_000, 10);
    let dur = |ctx: &mut Ctx, v: &Option<S<Scalar>>, key: &str, default: Duration| match v {
        None => Some(default),
        Some(v) => value::duration(ctx, key, v, WINDOW),
    };
    let stable = dur(ctx, &raw.stable_window, "managed.stable_window", Duration::from_secs(60));
    let panic = dur(ctx, &raw.panic_window, "managed.panic_window", Duration::from_secs(6));
    let delay = match &raw.scale_down_delay {
        None => Some(Duration::from_secs(60)),
        Some(v) => value::duration(ctx, "managed.scale_down_delay", v, Bounds { min: Duration::ZERO, max: HOUR }),
    };
    if let (Some(lo), Some(hi), Some(v)) = (min, max, raw.max.as_ref().or(raw.min.as_ref())) {
        if lo > hi {
            ctx.error(&v.referenced, format!("managed.min ({lo}) is above managed.max ({hi})"));
            ok = false;
        }
    }
    if let (Some((a, b)), Some(hi)) = (ports, max) {
        if u32::from(b - a) + 1 < hi {
            if let Some(v) = &raw.ports {
                ctx.error(
                    &v.referenced,
                    format!("managed.ports has {} port(s), fewer than managed.max ({hi})", b - a + 1),
                );
            }
            ok = false;
        }
    }
    if let (Some(s), Some(p), Some(v)) = (stable, panic, raw.panic_window.as_ref()) {
        if p > s {
            ctx.error(&v.referenced, "managed.panic_window must not be longer than managed.stable_window");
            ok = false;
        }
    }
    if !ok {
        return None;
    }
    Some(ManagedConfig {
        command,
        ports: ports?,
        min: min?,
        max: max?,
        target_in_flight: target?,
        stable_window: stable?,
        panic_window: panic?,
        scale_down_delay: delay?,
    })
}

/// As YAML lines of a service block (JSON flow mappings, which are YAML), for `to_yaml`.
pub fn to_yaml(out: &mut String, discovery: &Discovery, managed: &Option<ManagedConfig>) {
    let d = |x: Duration| format_duration(x);
    let mut disc = serde_json::Map::new();
    if let Some(n) = &discovery.dns {
        let mut m = json!({ "name": n.name, "type": n.kind.name(), "refresh": d(n.refresh) });
        if n.kind != DnsKind::Srv {
            m["port"] = json!(n.port);
        }
        if let Some(r) = n.resolver {
            m["resolver"] = json!(r.to_string());
        }
        disc.insert("dns".into(), m);
    }
    if let Some(k) = &discovery.docker {
        let mut m = json!({ "socket": k.socket, "labels": k.labels });
        if let Some(p) = k.port {
            m["port"] = json!(p);
        }
        if let Some(n) = &k.network {
            m["network"] = json!(n);
        }
        disc.insert("docker".into(), m);
    }
    if !disc.is_empty() {
        let _ = writeln!(out, "    discovery: {}", Value::Object(disc));
    }
    if let Some(m) = managed {
        let v = json!({
            "command": m.command,
            "ports": format!("{}-{}", m.ports.0, m.ports.1),
            "min": m.min,
            "max": m.max,
            "target_in_flight": m.target_in_flight,
            "stable_window": d(m.stable_window),
            "panic_window": d(m.panic_window),
            "scale_down_delay": d(m.scale_down_delay),
        });
        let _ = writeln!(out, "    managed: {v}");
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::parse;

    fn service(lines: &str) -> String {
        format!("listen: 127.0.0.1:8000\nservices:\n  - name: web\n{lines}")
    }

    #[test]
    fn discovery_and_managed_round_trip_and_need_no_backends() {
        let text = service(
            "    discovery:\n      dns: {name: _http._tcp.web.internal, type: SRV, resolver: 127.0.0.1:5353, refresh: 5s}\n      docker: {labels: {velocity.service: web, tier: 1}, port: 8080, network: bridge}\n    managed:\n      command: [./app, --port, \"{port}\"]\n      ports: 9100-9199\n      min: 0\n      max: 8\n      stable_window: 10s\n      panic_window: 1s\n      scale_down_delay: 0s\n",
        );
        let cfg = parse(Path::new("t.yaml"), &text).unwrap();
        let s = &cfg.services[0];
        assert!(s.backends.is_empty());
        let dns = s.discovery.dns.as_ref().unwrap();
        assert_eq!((dns.name.as_str(), dns.port, dns.refresh.as_secs()), ("_http._tcp.web.internal", 0, 5));
        assert_eq!(s.discovery.docker.as_ref().unwrap().labels["tier"], "1");
        let m = s.managed.as_ref().unwrap();
        assert_eq!((m.min, m.max, m.ports, m.target_in_flight), (0, 8, (9100, 9199), 10));
        let again = parse(Path::new("t.yaml"), &crate::config::to_yaml(&cfg)).unwrap();
        assert_eq!(again, cfg);
    }

    #[test]
    fn errors_at_their_values() {
        let cases = [
            ("    discovery: {dns: {name: x, type: MX, port: 1}}\n", "type must be A, AAAA or SRV"),
            ("    discovery: {dns: {name: x}}\n", "needs `port`"),
            ("    discovery: {dns: {name: x, type: SRV, port: 80}}\n", "does not apply to SRV"),
            ("    discovery: {dns: {name: x, port: 80, refresh: 100ms}}\n", "refresh must be from 1s"),
            ("    discovery: {docker: {}}\n", "needs `labels`"),
            ("    managed: {command: [./app], ports: 9100-9101}\n", "must contain {port}"),
            ("    managed: {command: [\"{port}\"], ports: 9100-9101, max: 3}\n", "fewer than managed.max"),
            ("    managed: {command: [\"{port}\"], ports: 9100-9199, min: 4, max: 2}\n", "above managed.max"),
            ("    backends: []\n", "has no backends"),
        ];
        for (lines, want) in cases {
            let errors = parse(Path::new("t.yaml"), &service(lines)).unwrap_err();
            assert!(errors.iter().any(|e| e.message.contains(want) && e.line == 4), "{lines}: {errors:?}");
        }
    }
}
