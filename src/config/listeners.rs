//! `listeners:`: named listeners beside the top-level `listen:` shorthand, each with its own
//! protocol, TLS, connection limit and PROXY protocol settings (issue 16).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;
use serde_saphyr::Location;

use super::legacy::quote;
use super::schema::{Scalar, S};
use super::validate::Ctx;
use super::{value, Config, ServiceConfig};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub name: Option<S<Scalar>>,
    pub listen: Option<S<Scalar>>,
    pub tls: Option<S<RawTls>>,
    pub redirect_https: Option<S<Scalar>>,
    pub max_client_connections: Option<S<Scalar>>,
    pub protocol: Option<S<Scalar>>,
    pub service: Option<S<Scalar>>,
    pub proxy_protocol: Option<S<Scalar>>,
    pub accept_proxy_protocol: Option<S<Vec<S<Scalar>>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub certificates: Option<S<Vec<S<RawCertificate>>>>,
    pub min_version: Option<S<Scalar>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    pub cert: Option<S<Scalar>>,
    pub key: Option<S<Scalar>>,
}

/// One listener, resolved. The top-level `listen:` addresses become listeners named by their
/// address (see [`Config::all_listeners`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    /// Unique among listeners; the `listener` label of its metrics.
    pub name: String,
    pub addr: SocketAddr,
    pub protocol: ListenerProtocol,
    /// `None`: plain text.
    pub tls: Option<TlsConfig>,
    /// Every request is answered with a 308 to the same URL over https.
    pub redirect_https: bool,
    /// Open client connections of this listener; at the limit it stops accepting.
    pub max_client_connections: usize,
    /// `protocol: tcp`: the service whose backends take the connections.
    pub service: Option<String>,
    /// `protocol: tcp`: send a PROXY protocol header to the backend.
    pub proxy_protocol: Option<ProxyProtocolVersion>,
    /// Peers whose connections start with a PROXY v1/v2 header; empty: none do.
    pub accept_proxy_protocol: Vec<IpNet>,
}

impl ListenerConfig {
    /// A plain HTTP listener on `addr`, as the top-level `listen:` gives.
    pub fn plain(addr: SocketAddr, max_client_connections: usize) -> ListenerConfig {
        ListenerConfig {
            name: addr.to_string(),
            addr,
            protocol: ListenerProtocol::Http,
            tls: None,
            redirect_https: false,
            max_client_connections,
            service: None,
            proxy_protocol: None,
            accept_proxy_protocol: Vec::new(),
        }
    }

    /// `http`, `https` or `tcp`, for log lines.
    pub fn scheme(&self) -> &'static str {
        match (self.protocol, &self.tls) {
            (ListenerProtocol::Tcp, _) => "tcp",
            (ListenerProtocol::Http, Some(_)) => "https",
            (ListenerProtocol::Http, None) => "http",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerProtocol {
    Http,
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocolVersion {
    V1,
    V2,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// In order: the first is the fallback for a client without SNI or with an unknown name.
    pub certificates: Vec<CertificateFiles>,
    pub min_version: TlsVersion,
}

/// A certificate chain and its key, as PEM files. Relative paths are resolved against the
/// config file's directory at load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    V1_2,
    V1_3,
}

impl TlsVersion {
    pub fn name(self) -> &'static str {
        match self {
            TlsVersion::V1_2 => "1.2",
            TlsVersion::V1_3 => "1.3",
        }
    }
}

impl Config {
    /// Every listener to run: the top-level `listen:` addresses (plain HTTP, named by their
    /// address, with the top-level `max_client_connections`), then `listeners:`.
    pub fn all_listeners(&self) -> Vec<ListenerConfig> {
        let shorthand = self.listen.iter().map(|a| ListenerConfig::plain(*a, self.limits.max_client_connections));
        shorthand.chain(self.listeners.iter().cloned()).collect()
    }
}

const MAX_CONNECTIONS: i64 = 1_000_000;

/// `listeners:`, after the services (a tcp listener names one). `shorthand`: the top-level
/// `listen:` addresses with their lines, which no listener may repeat.
pub fn convert(
    ctx: &mut Ctx,
    raw: S<Vec<S<RawListener>>>,
    shorthand: &[(SocketAddr, u64)],
    services: &[ServiceConfig],
    default_max: usize,
) -> Vec<ListenerConfig> {
    let mut names: HashMap<String, u64> = HashMap::new();
    let mut addrs: HashMap<SocketAddr, u64> = shorthand.iter().copied().collect();
    let mut out = Vec::new();
    for (index, item) in raw.value.into_iter().enumerate() {
        let at = item.referenced;
        let r = item.value;
        let name = match &r.name {
            Some(n) => match super::health::text(&n.value).map(str::trim) {
                Some(t) if valid_name(t) => {
                    if let Some(first) = names.get(t) {
                        ctx.error(
                            &n.referenced,
                            format!("duplicate listener name {t:?} (first defined on line {first})"),
                        );
                    }
                    names.entry(t.to_owned()).or_insert(n.referenced.line());
                    t.to_owned()
                }
                _ => {
                    ctx.error(
                        &n.referenced,
                        format!("listener name must be letters, digits, `-`, `_` or `.`, got {}", n.value),
                    );
                    format!("#{}", index + 1)
                }
            },
            None => {
                ctx.error(&at, "listener has no `name`");
                format!("#{}", index + 1)
            }
        };
        let addr = match &r.listen {
            Some(l) => {
                let text = match &l.value {
                    Scalar::Text(t) => Some(t.clone()),
                    Scalar::Int(n) => Some(n.to_string()),
                    Scalar::Other(_) => None,
                };
                let parsed = text
                    .ok_or_else(|| format!("listen must be an address such as 127.0.0.1:8443, got {}", l.value))
                    .and_then(|t| super::validate::listen_address(ctx, &t));
                match parsed {
                    Ok(addr) => {
                        // Port 0 (any free port) may repeat: each gets its own.
                        if let Some(first) = addrs.get(&addr).filter(|_| addr.port() != 0) {
                            ctx.error(
                                &l.referenced,
                                format!("listen address {addr} is already listed on line {first}"),
                            );
                        } else {
                            addrs.insert(addr, l.referenced.line());
                            if ctx.scope == super::Scope::Run {
                                if let Err(msg) = super::preflight::listen(addr) {
                                    ctx.error(&l.referenced, msg);
                                }
                            }
                        }
                        Some(addr)
                    }
                    Err(msg) => {
                        ctx.error(&l.referenced, msg);
                        None
                    }
                }
            }
            None => {
                ctx.error(&at, format!("listener {name:?} has no `listen` address"));
                None
            }
        };
        let protocol = match &r.protocol {
            None => ListenerProtocol::Http,
            Some(p) => match super::health::text(&p.value).map(str::trim) {
                Some("http") => ListenerProtocol::Http,
                Some("tcp") => ListenerProtocol::Tcp,
                _ => {
                    ctx.error(&p.referenced, format!("unknown protocol {}: use http or tcp", p.value));
                    ListenerProtocol::Http
                }
            },
        };
        let is_tcp = protocol == ListenerProtocol::Tcp;
        let max_client_connections = r
            .max_client_connections
            .as_ref()
            .and_then(|v| super::lifecycle::count(ctx, "max_client_connections", v, 1, MAX_CONNECTIONS))
            .unwrap_or(default_max);
        let redirect_https = r.redirect_https.as_ref().and_then(|v| value::boolean(ctx, "redirect_https", v));
        let tls = r.tls.map(|t| tls(ctx, t));
        if let (Some(true), Some(v)) = (redirect_https, &r.redirect_https) {
            if tls.is_some() {
                ctx.error(&v.referenced, "redirect_https on a TLS listener would redirect to itself");
            } else if is_tcp {
                ctx.error(&v.referenced, "redirect_https applies to http listeners only");
            }
        }
        if let (true, Some(_)) = (is_tcp, &tls) {
            ctx.error(&at, format!("listener {name:?}: TLS termination applies to http listeners only"));
        }
        let service = match (&r.service, is_tcp) {
            (Some(s), true) => match super::health::text(&s.value).map(str::trim) {
                Some(t) if services.iter().any(|svc| svc.name == t) => Some(t.to_owned()),
                _ => {
                    ctx.error(&s.referenced, format!("service {} is not one of the services", s.value));
                    None
                }
            },
            (Some(s), false) => {
                ctx.error(&s.referenced, "`service` applies to tcp listeners; http listeners route by host and path");
                None
            }
            (None, true) => {
                let loc = r.protocol.as_ref().map_or(at, |p| p.referenced);
                ctx.error(&loc, format!("tcp listener {name:?} needs a `service` to forward to"));
                None
            }
            (None, false) => None,
        };
        let proxy_protocol = r.proxy_protocol.as_ref().and_then(|p| {
            let version = match super::health::text(&p.value).map(str::trim) {
                Some("v1") => Some(ProxyProtocolVersion::V1),
                Some("v2") => Some(ProxyProtocolVersion::V2),
                _ => {
                    ctx.error(&p.referenced, format!("unknown proxy_protocol {}: use v1 or v2", p.value));
                    None
                }
            };
            if version.is_some() && !is_tcp {
                ctx.error(&p.referenced, "proxy_protocol (sent to backends) applies to tcp listeners only");
            }
            version
        });
        let accept_proxy_protocol = r.accept_proxy_protocol.map_or_else(Vec::new, |list| cidrs(ctx, list));
        if let Some(addr) = addr {
            out.push(ListenerConfig {
                name,
                addr,
                protocol,
                tls,
                redirect_https: redirect_https.unwrap_or(false),
                max_client_connections,
                service,
                proxy_protocol,
                accept_proxy_protocol,
            });
        }
    }
    out
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn tls(ctx: &mut Ctx, raw: S<RawTls>) -> TlsConfig {
    let at = raw.referenced;
    let RawTls { certificates, min_version } = raw.value;
    let min_version = match &min_version {
        None => TlsVersion::V1_2,
        Some(v) => match &v.value {
            Scalar::Text(t) if t.trim() == "1.2" => TlsVersion::V1_2,
            Scalar::Text(t) if t.trim() == "1.3" => TlsVersion::V1_3,
            // `min_version: 1.2` unquoted is a YAML float.
            Scalar::Other(t) if t == "1.2" => TlsVersion::V1_2,
            Scalar::Other(t) if t == "1.3" => TlsVersion::V1_3,
            other => {
                ctx.error(&v.referenced, format!("min_version must be \"1.2\" or \"1.3\", got {other}"));
                TlsVersion::V1_2
            }
        },
    };
    let mut out = Vec::new();
    match certificates {
        None => ctx.error(&at, "tls needs `certificates`: a list of {cert: FILE, key: FILE}"),
        Some(list) if list.value.is_empty() => ctx.error(&list.referenced, "`certificates` is empty"),
        Some(list) => {
            for item in list.value {
                let c = item.value;
                let cert = file(ctx, "cert", c.cert.as_ref(), item.referenced);
                let key = file(ctx, "key", c.key.as_ref(), item.referenced);
                if let (Some((cert, cert_at)), Some((key, key_at))) = (cert, key) {
                    if ctx.scope == super::Scope::Run {
                        if let Err(e) = crate::tls::check_files(&cert, &key) {
                            // The file the problem is in, at its key.
                            let loc = if e.in_key { key_at } else { cert_at };
                            ctx.error(&loc, e.message);
                        }
                    }
                    out.push(CertificateFiles { cert, key });
                }
            }
        }
    }
    TlsConfig { certificates: out, min_version }
}

/// A file path, relative to the config file's directory.
fn file(ctx: &mut Ctx, key: &str, v: Option<&S<Scalar>>, item: Location) -> Option<(PathBuf, Location)> {
    let Some(v) = v else {
        ctx.error(&item, format!("certificate has no `{key}` file"));
        return None;
    };
    match super::health::text(&v.value).map(str::trim) {
        Some(t) if !t.is_empty() => Some((ctx.relative(Path::new(t)), v.referenced)),
        _ => {
            ctx.error(&v.referenced, format!("{key} must be a file path, got {}", v.value));
            None
        }
    }
}

/// CIDRs (`10.0.0.0/8`) or single addresses (`10.1.2.3`).
fn cidrs(ctx: &mut Ctx, list: S<Vec<S<Scalar>>>) -> Vec<IpNet> {
    let mut out = Vec::new();
    for item in list.value {
        let parsed = super::health::text(&item.value)
            .map(str::trim)
            .and_then(|t| t.parse::<IpNet>().ok().or_else(|| t.parse::<std::net::IpAddr>().ok().map(IpNet::from)));
        match parsed {
            Some(net) => out.push(net.trunc()),
            None => ctx.error(
                &item.referenced,
                format!("accept_proxy_protocol: expected a CIDR such as 10.0.0.0/8 or an address, got {}", item.value),
            ),
        }
    }
    out
}

/// `listeners:` as YAML, for `to_yaml`; nothing when there are none.
pub fn to_yaml(out: &mut String, cfg: &Config) {
    if cfg.listeners.is_empty() {
        return;
    }
    let _ = writeln!(out, "listeners:");
    for l in &cfg.listeners {
        let _ = writeln!(out, "  - name: {}", quote(&l.name));
        let _ = writeln!(out, "    listen: {}", quote(&l.addr.to_string()));
        if l.protocol == ListenerProtocol::Tcp {
            let _ = writeln!(out, "    protocol: tcp");
        }
        if let Some(s) = &l.service {
            let _ = writeln!(out, "    service: {}", quote(s));
        }
        if let Some(t) = &l.tls {
            let _ = writeln!(out, "    tls:\n      min_version: \"{}\"\n      certificates:", t.min_version.name());
            for c in &t.certificates {
                let (cert, key) = (c.cert.display().to_string(), c.key.display().to_string());
                let _ = writeln!(out, "        - {{cert: {}, key: {}}}", quote(&cert), quote(&key));
            }
        }
        if l.redirect_https {
            let _ = writeln!(out, "    redirect_https: true");
        }
        if l.max_client_connections != cfg.limits.max_client_connections {
            let _ = writeln!(out, "    max_client_connections: {}", l.max_client_connections);
        }
        if let Some(v) = l.proxy_protocol {
            let _ = writeln!(out, "    proxy_protocol: {}", if v == ProxyProtocolVersion::V1 { "v1" } else { "v2" });
        }
        if !l.accept_proxy_protocol.is_empty() {
            let nets: Vec<String> = l.accept_proxy_protocol.iter().map(|n| quote(&n.to_string())).collect();
            let _ = writeln!(out, "    accept_proxy_protocol: [{}]", nets.join(", "));
        }
    }
}

/// One line per listener for `velocity check`.
pub fn summary_lines(cfg: &Config) -> Vec<String> {
    cfg.listeners
        .iter()
        .map(|l| {
            let mut line = format!("listener {}: {}://{}", l.name, l.scheme(), l.addr);
            if let Some(t) = &l.tls {
                let n = t.certificates.len();
                let _ = write!(line, ", {n} certificate(s), TLS {}+", t.min_version.name());
            }
            if l.redirect_https {
                line += ", redirects to https";
            }
            if let Some(s) = &l.service {
                let _ = write!(line, " to service {s}");
            }
            line
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{errors, load};

    const ISSUE: &str = "\
listeners:
  - name: public
    listen: 127.0.0.1:443
    tls:
      certificates:
        - {cert: certs/a.pem, key: certs/a.key}
        - {cert: /etc/b.pem, key: /etc/b.key}
      min_version: \"1.3\"
  - name: plain
    listen: 127.0.0.1:80
    redirect_https: true
    max_client_connections: 50
  - name: postgres
    listen: 127.0.0.1:5432
    protocol: tcp
    service: pg
    proxy_protocol: v2
  - name: behind-lb
    listen: 8080
    accept_proxy_protocol: [10.0.0.0/8, 192.168.1.7]
services:
  - name: pg
    backends: [{address: 127.0.0.1:5433}]
";

    #[test]
    fn the_issues_example() {
        let cfg = load(ISSUE).unwrap();
        assert!(cfg.listen.is_empty());
        let [public, plain, pg, behind] = &cfg.listeners[..] else { panic!("{:?}", cfg.listeners) };
        assert_eq!(public.scheme(), "https");
        let tls = public.tls.as_ref().unwrap();
        assert_eq!(tls.min_version, TlsVersion::V1_3);
        // Relative to the config file (`t.yaml`: the current directory).
        assert_eq!(tls.certificates[0], CertificateFiles { cert: "certs/a.pem".into(), key: "certs/a.key".into() });
        assert_eq!(tls.certificates[1].cert, PathBuf::from("/etc/b.pem"));
        assert!(plain.redirect_https && plain.tls.is_none());
        assert_eq!((plain.max_client_connections, public.max_client_connections), (50, 10_000));
        assert_eq!(
            (pg.protocol, pg.service.as_deref(), pg.proxy_protocol),
            (ListenerProtocol::Tcp, Some("pg"), Some(ProxyProtocolVersion::V2))
        );
        assert_eq!(behind.addr, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(
            behind.accept_proxy_protocol,
            vec!["10.0.0.0/8".parse::<IpNet>().unwrap(), "192.168.1.7/32".parse().unwrap()]
        );
        // `to_yaml` gives the same config back.
        let again = crate::config::parse(Path::new("t.yaml"), &crate::config::to_yaml(&cfg)).unwrap();
        assert_eq!(again, cfg);
        // Paths relative to the config file's directory.
        let nested = crate::config::parse(Path::new("/etc/velocity/v.yaml"), ISSUE).unwrap();
        assert_eq!(
            nested.listeners[0].tls.as_ref().unwrap().certificates[0].cert,
            PathBuf::from("/etc/velocity/certs/a.pem")
        );
    }

    #[test]
    fn listen_shorthand_and_listeners_together() {
        let cfg = load("listen: 127.0.0.1:8000\nmax_client_connections: 7\nlisteners:\n  - {name: b, listen: 127.0.0.1:8001}\nservices:\n  - name: a\n    backends: [{address: 127.0.0.1:1}]\n").unwrap();
        let all = cfg.all_listeners();
        assert_eq!(all.len(), 2);
        assert_eq!((all[0].name.as_str(), all[0].max_client_connections), ("127.0.0.1:8000", 7));
        assert_eq!((all[1].name.as_str(), all[1].max_client_connections), ("b", 7));
    }

    #[test]
    fn each_problem_at_its_position() {
        let svc = "services:\n  - name: pg\n    backends: [{address: 127.0.0.1:1}]\n";
        let cases: &[(&str, &str)] = &[
            ("listeners:\n  - listen: 127.0.0.1:1\n", "2:5: listener has no `name`"),
            ("listeners:\n  - name: \"a b\"\n    listen: 127.0.0.1:1\n", "2:11: listener name must be"),
            ("listeners:\n  - name: a\n", "2:5: listener \"a\" has no `listen` address"),
            ("listeners:\n  - {name: a, listen: 127.0.0.1:1}\n  - {name: a, listen: 127.0.0.1:2}\n", "3:12: duplicate listener name \"a\" (first defined on line 2)"),
            ("listen: 127.0.0.1:1\nlisteners:\n  - {name: a, listen: 127.0.0.1:1}\n", "3:23: listen address 127.0.0.1:1 is already listed on line 1"),
            ("listeners:\n  - {name: a, listen: nowhere}\n", "2:23: listen address \"nowhere\" needs a port"),
            ("listeners:\n  - {name: a, listen: 127.0.0.1:1, protocol: udp}\n", "2:46: unknown protocol \"udp\": use http or tcp"),
            ("listeners:\n  - {name: a, listen: 127.0.0.1:1, protocol: tcp}\n", "2:46: tcp listener \"a\" needs a `service`"),
            ("listeners:\n  - {name: a, listen: 127.0.0.1:1, protocol: tcp, service: web}\n", "2:60: service \"web\" is not one of the services"),
            ("listeners:\n  - {name: a, listen: 127.0.0.1:1, service: pg}\n", "2:45: `service` applies to tcp listeners"),
            ("listeners:\n  - {name: a, listen: 127.0.0.1:1, proxy_protocol: v2}\n", "2:52: proxy_protocol (sent to backends) applies to tcp listeners only"),
            ("listeners:\n  - {name: a, listen: 127.0.0.1:1, protocol: tcp, service: pg, proxy_protocol: v3}\n", "2:80: unknown proxy_protocol \"v3\": use v1 or v2"),
            ("listeners:\n  - {name: a, listen: 127.0.0.1:1, accept_proxy_protocol: [10.0.0.0/33]}\n", "2:60: accept_proxy_protocol: expected a CIDR"),
            ("listeners:\n  - {name: a, listen: 127.0.0.1:1, redirect_https: maybe}\n", "2:52: redirect_https must be true or false"),
            ("listeners:\n  - {name: a, listen: 127.0.0.1:1, max_client_connections: 0}\n", "2:60: max_client_connections must be a whole number from 1"),
            ("listeners:\n  - {name: a, listen: 127.0.0.1:1, tls: {}}\n", "2:41: tls needs `certificates`"),
            ("listeners:\n  - {name: a, listen: 127.0.0.1:1, tls: {certificates: []}}\n", "2:56: `certificates` is empty"),
            ("listeners:\n  - {name: a, listen: 127.0.0.1:1, tls: {certificates: [{cert: a.pem}]}}\n", "2:57: certificate has no `key` file"),
            ("listeners:\n  - {name: a, listen: 127.0.0.1:1, tls: {min_version: \"1.1\", certificates: [{cert: a, key: b}]}}\n", "2:55: min_version must be \"1.2\" or \"1.3\""),
            ("listeners:\n  - {name: a, listen: 127.0.0.1:1, redirect_https: true, tls: {certificates: [{cert: a, key: b}]}}\n", "2:52: redirect_https on a TLS listener would redirect to itself"),
            ("listeners:\n  - {name: a, listen: 127.0.0.1:1, tlss: {}}\n", "2:36: unknown key `tlss`: did you mean `tls`?"),
        ];
        let mut wrong = Vec::new();
        for (text, want) in cases {
            let text = format!("{text}{svc}");
            let e = errors(&text);
            if !(e.len() == 1 && e[0].starts_with(want)) {
                wrong.push(format!("{text}expected {want:?}\n{e:#?}"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
        // Unquoted `min_version: 1.2` (a YAML number) is accepted.
        let cfg = load(&format!("listeners:\n  - {{name: a, listen: 127.0.0.1:1, tls: {{min_version: 1.2, certificates: [{{cert: a, key: b}}]}}}}\n{svc}")).unwrap();
        assert_eq!(cfg.listeners[0].tls.as_ref().unwrap().min_version, TlsVersion::V1_2);
    }
}
