//! Traffic policy keys (issue 15): `trusted_proxies`, `allow`/`deny` (top level: the listener;
//! and per service), `deny_action` and a service's `rate_limits`. Read here, once, into plain
//! data; `crate::policy` builds the lookup structures (address sets, limiters) from it when a
//! snapshot is built.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use serde_saphyr::Location;

use super::schema::{RawConfig, RawService, Scalar, S};
use super::validate::Ctx;
use super::value::{HOUR, MINUTE, SECOND};

/// `rate_limits:` item as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub key: Option<S<String>>,
    pub path_prefix: Option<S<String>>,
    pub methods: Option<S<Vec<S<String>>>>,
    pub rate: Option<S<String>>,
    pub burst: Option<S<Scalar>>,
    pub scope: Option<S<String>>,
}

/// A list of CIDRs (`10.0.0.0/8`, `2001:db8::/32`, or a bare address for one host).
pub type RawNets = Option<S<Vec<S<String>>>>;

/// Who may reach a listener or a service. An address is refused when it is in `deny`, or
/// when `allow` is not empty and it is not in `allow`: deny wins.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AccessRules {
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
}

impl AccessRules {
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }
}

/// What a listener does with a denied client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DenyAction {
    /// Answer `403` (the default).
    #[default]
    Forbid,
    /// Close the connection at accept, on the socket peer's address; requests are still
    /// checked (with `trusted_proxies`, the client behind a proxy may be denied too: `403`).
    Close,
}

/// Top-level policy: the client's identity and the plain `listen:` listener's rules.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GlobalPolicy {
    /// Peers whose `X-Forwarded-For` (or `Forwarded: for=`) names the client.
    pub trusted_proxies: Vec<IpNet>,
    pub access: AccessRules,
    pub deny_action: DenyAction,
    /// `/api/v1/denylist`: set from the overlay by the membership writer, never from the file
    /// (and not written by `to_yaml`).
    pub runtime_deny: Vec<IpNet>,
}

/// A service's policy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServicePolicy {
    pub access: AccessRules,
    pub rate_limits: Vec<RateLimitConfig>,
    /// `/api/v1/services/{name}/denylist`, from the overlay as for [`GlobalPolicy`].
    pub runtime_deny: Vec<IpNet>,
}

impl ServicePolicy {
    pub fn is_empty(&self) -> bool {
        self.access.is_empty() && self.rate_limits.is_empty() && self.runtime_deny.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitConfig {
    pub key: LimitKey,
    /// Only requests whose path starts with this.
    pub path_prefix: Option<String>,
    /// Only these methods (upper case); empty: every method.
    pub methods: Vec<String>,
    pub rate: Rate,
    /// Requests allowed at once on top of the rate (the bucket's size); at least 1.
    pub burst: u32,
    pub scope: LimitScope,
}

/// What a limit counts requests by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitKey {
    ClientIp,
    /// A header's value (the name lower-cased). Requests without it share one bucket, so that
    /// leaving the header out does not escape the limit.
    Header(String),
    Global,
}

/// Where a limit's state lives: this process, or the cluster store (`cluster:`), shared by
/// every instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LimitScope {
    #[default]
    Local,
    Cluster,
}

/// `count` requests per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl Rate {
    /// The time one request's allowance takes to come back.
    pub fn interval(&self) -> Duration {
        self.per / self.count.max(1)
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.per.as_secs() {
            60 => "m",
            3600 => "h",
            _ => "s",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

impl std::fmt::Display for LimitKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitKey::ClientIp => f.write_str("client_ip"),
            LimitKey::Header(h) => write!(f, "header:{h}"),
            LimitKey::Global => f.write_str("global"),
        }
    }
}

/// Parse `10/s`, `100/m`, `5000/h`.
pub fn parse_rate(text: &str) -> Result<Rate, String> {
    let bad = || format!("invalid rate {text:?}: expected requests per unit, such as 10/s, 100/m or 5000/h");
    let (n, unit) = text.trim().split_once('/').ok_or_else(bad)?;
    let per = match unit.trim() {
        "s" => SECOND,
        "m" => MINUTE,
        "h" => HOUR,
        _ => return Err(bad()),
    };
    let count: u32 = n.trim().parse().map_err(|_| bad())?;
    if count == 0 || count > 1_000_000 {
        return Err(format!("rate {text:?}: the count must be from 1 to 1000000"));
    }
    Ok(Rate { count, per })
}

/// A CIDR, or a bare address for one host. Host bits are dropped (`10.1.2.3/8` is
/// `10.0.0.0/8`), as the rule can only mean the network.
pub fn parse_net(text: &str) -> Result<IpNet, String> {
    let t = text.trim();
    if let Ok(net) = t.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    t.parse::<IpAddr>().map(IpNet::from).map_err(|_| {
        format!("invalid address range {t:?}: expected a CIDR such as 10.0.0.0/8 or 2001:db8::/32, or an address")
    })
}

fn nets(ctx: &mut Ctx, key: &str, raw: RawNets) -> Vec<IpNet> {
    let Some(list) = raw else { return Vec::new() };
    let mut out = Vec::with_capacity(list.value.len());
    for item in list.value {
        match parse_net(&item.value) {
            Ok(n) => out.push(n),
            Err(e) => ctx.error(&item.referenced, format!("{key}: {e}")),
        }
    }
    out
}

/// The top-level keys.
pub fn global(ctx: &mut Ctx, raw: &mut RawConfig) -> GlobalPolicy {
    let trusted_proxies = nets(ctx, "trusted_proxies", raw.trusted_proxies.take());
    let access = AccessRules { allow: nets(ctx, "allow", raw.allow.take()), deny: nets(ctx, "deny", raw.deny.take()) };
    let deny_action = match raw.deny_action.take() {
        None => DenyAction::Forbid,
        Some(v) => match v.value.trim() {
            "403" | "forbid" => DenyAction::Forbid,
            "close" => DenyAction::Close,
            other => {
                ctx.error(&v.referenced, format!("unknown deny_action {other:?}: use 403 or close"));
                DenyAction::Forbid
            }
        },
    };
    GlobalPolicy { trusted_proxies, access, deny_action, runtime_deny: Vec::new() }
}

/// A service's keys.
pub fn service(ctx: &mut Ctx, raw: &mut RawService) -> ServicePolicy {
    let access = AccessRules { allow: nets(ctx, "allow", raw.allow.take()), deny: nets(ctx, "deny", raw.deny.take()) };
    let mut rate_limits = Vec::new();
    if let Some(list) = raw.rate_limits.take() {
        for item in list.value {
            if let Some(l) = rate_limit(ctx, item.value, item.referenced) {
                rate_limits.push(l);
            }
        }
    }
    ServicePolicy { access, rate_limits, runtime_deny: Vec::new() }
}

/// Largest burst: far beyond any sensible bucket, small enough for governor's arithmetic.
const MAX_BURST: i64 = 1_000_000;

fn rate_limit(ctx: &mut Ctx, raw: RawRateLimit, at: Location) -> Option<RateLimitConfig> {
    let mut ok = true;
    let key = match &raw.key {
        None => LimitKey::ClientIp,
        Some(k) => {
            let text = k.value.trim();
            match text {
                "client_ip" => LimitKey::ClientIp,
                "global" => LimitKey::Global,
                _ => match text.strip_prefix("header:").map(str::trim) {
                    Some(name) if is_token(name) => LimitKey::Header(name.to_ascii_lowercase()),
                    _ => {
                        ctx.error(
                            &k.referenced,
                            format!("unknown rate limit key {text:?}: use client_ip, global or header:NAME"),
                        );
                        ok = false;
                        LimitKey::Global
                    }
                },
            }
        }
    };
    let path_prefix = match &raw.path_prefix {
        Some(p) if !p.value.starts_with('/') => {
            ctx.error(&p.referenced, format!("rate limit path_prefix must start with /, got {:?}", p.value));
            ok = false;
            None
        }
        Some(p) => Some(p.value.clone()),
        None => None,
    };
    let mut methods = Vec::new();
    if let Some(list) = &raw.methods {
        for m in &list.value {
            let name = m.value.trim();
            if is_token(name) {
                methods.push(name.to_ascii_uppercase());
            } else {
                ctx.error(&m.referenced, format!("invalid method {name:?} in rate limit methods"));
                ok = false;
            }
        }
    }
    let rate = match &raw.rate {
        None => {
            ctx.error(&at, "rate limit needs `rate`, such as rate: 10/s");
            None
        }
        Some(r) => match parse_rate(&r.value) {
            Ok(rate) => Some(rate),
            Err(e) => {
                ctx.error(&r.referenced, e);
                None
            }
        },
    };
    let burst = match &raw.burst {
        None => rate.map(|r| r.count),
        Some(b) => super::value::whole(ctx, "burst", b, 1, MAX_BURST).map(|n| n as u32),
    };
    let mut scope = LimitScope::Local;
    if let Some(s) = &raw.scope {
        match s.value.trim() {
            "local" => {}
            "cluster" => {
                // Needs `cluster:`, which may come later in the file: checked once all is read.
                ctx.cluster_scope_at.get_or_insert((s.referenced.line(), s.referenced.column()));
                scope = LimitScope::Cluster;
            }
            other => {
                ctx.error(&s.referenced, format!("unknown rate limit scope {other:?}: use local or cluster"));
                ok = false;
            }
        }
    }
    if !ok {
        return None;
    }
    Some(RateLimitConfig { key, path_prefix, methods, rate: rate?, burst: burst?, scope })
}

/// An HTTP token (RFC 9110), which header names and methods must be.
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn net_list(nets: &[IpNet]) -> String {
    let items: Vec<String> = nets.iter().map(|n| format!("\"{n}\"")).collect();
    format!("[{}]", items.join(", "))
}

/// The top-level keys as YAML (for `to_yaml`).
pub fn global_yaml(out: &mut String, p: &GlobalPolicy) {
    if !p.trusted_proxies.is_empty() {
        let _ = writeln!(out, "trusted_proxies: {}", net_list(&p.trusted_proxies));
    }
    if !p.access.allow.is_empty() {
        let _ = writeln!(out, "allow: {}", net_list(&p.access.allow));
    }
    if !p.access.deny.is_empty() {
        let _ = writeln!(out, "deny: {}", net_list(&p.access.deny));
    }
    if p.deny_action == DenyAction::Close {
        let _ = writeln!(out, "deny_action: close");
    }
}

/// A service's keys as YAML lines of its block.
pub fn service_yaml(out: &mut String, p: &ServicePolicy) {
    if !p.access.allow.is_empty() {
        let _ = writeln!(out, "    allow: {}", net_list(&p.access.allow));
    }
    if !p.access.deny.is_empty() {
        let _ = writeln!(out, "    deny: {}", net_list(&p.access.deny));
    }
    if p.rate_limits.is_empty() {
        return;
    }
    let _ = writeln!(out, "    rate_limits:");
    for l in &p.rate_limits {
        let _ = write!(out, "      - {{key: \"{}\", rate: {}, burst: {}", l.key, l.rate, l.burst);
        if let Some(p) = &l.path_prefix {
            let _ = write!(out, ", path_prefix: {}", serde_json::Value::from(p.as_str()));
        }
        if !l.methods.is_empty() {
            let _ = write!(out, ", methods: [{}]", l.methods.join(", "));
        }
        if l.scope == LimitScope::Cluster {
            let _ = write!(out, ", scope: cluster");
        }
        let _ = writeln!(out, "}}");
    }
}

/// What `velocity check` adds to a service's line.
pub fn summary(p: &ServicePolicy) -> String {
    let mut line = String::new();
    for l in &p.rate_limits {
        let _ = write!(line, "; rate limit {} by {} burst {}", l.rate, l.key, l.burst);
        if l.scope == LimitScope::Cluster {
            line.push_str(" (cluster)");
        }
        if let Some(prefix) = &l.path_prefix {
            let _ = write!(line, " on {prefix}");
        }
        if !l.methods.is_empty() {
            let _ = write!(line, " ({})", l.methods.join(","));
        }
    }
    if !p.access.allow.is_empty() {
        let _ = write!(line, "; allow {} range(s)", p.access.allow.len());
    }
    if !p.access.deny.is_empty() {
        let _ = write!(line, "; deny {} range(s)", p.access.deny.len());
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{errors, load};

    fn service(lines: &str) -> String {
        format!(
            "listen: 127.0.0.1:8000\nservices:\n  - name: web\n    backends:\n      - address: 127.0.0.1:1\n{lines}"
        )
    }

    #[test]
    fn policy_keys_load_and_round_trip() {
        let text = format!(
            "trusted_proxies: [10.0.0.0/8, \"::1\"]\ndeny: [192.0.2.7, \"2001:db8::/32\"]\ndeny_action: close\n{}",
            service(
                "    allow: [10.1.2.3/16]\n    rate_limits:\n      - {key: client_ip, rate: 10/s, burst: 20, path_prefix: /login, methods: [post]}\n      - {key: \"header:X-Api-Key\", rate: 100/m}\n      - {key: global, rate: 5000/h, scope: local}\n"
            )
        );
        let cfg = load(&text).unwrap();
        let g = &cfg.policy;
        assert_eq!(g.trusted_proxies.len(), 2);
        assert_eq!(g.access.deny[0].to_string(), "192.0.2.7/32");
        assert_eq!(g.deny_action, DenyAction::Close);
        let p = &cfg.services[0].policy;
        assert_eq!(p.access.allow[0].to_string(), "10.1.0.0/16");
        let l = &p.rate_limits;
        assert_eq!(l[0].methods, ["POST"]);
        assert_eq!((l[0].rate.count, l[0].burst), (10, 20));
        assert_eq!(l[1].key, LimitKey::Header("x-api-key".into()));
        assert_eq!((l[1].rate.per, l[1].burst), (MINUTE, 100));
        assert_eq!(l[2].key, LimitKey::Global);
        let yaml = crate::config::to_yaml(&cfg);
        assert_eq!(load(&yaml).unwrap_or_else(|e| panic!("{yaml}\n{e:?}")), cfg, "{yaml}");
    }

    #[test]
    fn policy_errors_at_their_position() {
        let text = format!(
            "trusted_proxies: [1.2.3]\ndeny_action: drop\n{}",
            service(
                "    deny: [10.0.0.0/33, nonsense]\n    rate_limits:\n      - {key: ip, rate: 10/d}\n      - {rate: 1/s, scope: cluster}\n      - {key: global, burst: 0, path_prefix: login}\n",
            )
        );
        let e = errors(&text);
        let joined = e.join("\n");
        for want in [
            "1:19: trusted_proxies: invalid address range \"1.2.3\"",
            "2:14: unknown deny_action \"drop\"",
            "deny: invalid address range \"10.0.0.0/33\"",
            "deny: invalid address range \"nonsense\"",
            "unknown rate limit key \"ip\"",
            "invalid rate \"10/d\"",
            "scope: cluster needs a `cluster:` section",
            "rate limit needs `rate`",
            "burst",
            "path_prefix must start with /",
        ] {
            assert!(joined.contains(want), "missing {want:?} in\n{joined}");
        }
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("10/s").unwrap().interval(), Duration::from_millis(100));
        assert_eq!(parse_rate(" 60 / m ").unwrap().interval(), SECOND);
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("ten/s").is_err());
        assert_eq!(parse_net("::ffff:10.0.0.1").unwrap().to_string(), "::ffff:10.0.0.1/128");
    }
}
