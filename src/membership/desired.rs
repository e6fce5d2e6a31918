//! Desired state = the file's config + the overlay, merged and validated by the same rules as
//! `velocity check`: the merged config is written as YAML and parsed again, so nothing the
//! file could not say can be said through the API.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use serde_json::Value;

use super::overlay::{same_address, Overlay};
use super::{ChangeError, ErrorKind};
use crate::config::{self, BackendConfig, Config, ConfigError};
use crate::upstream::AdminState;

/// Shown as the "file" of errors found in the merged config.
const MERGED: &str = "config+overlay";
/// Shown as the "file" of errors in a posted service.
const POSTED: &str = "service";

/// A backend removed with a drain: kept in the pool as `draining` until it is idle or its
/// deadline passes. Not in the overlay (which already has it removed): a restart drops it.
#[derive(Debug, Clone)]
pub struct Draining {
    pub service: String,
    pub backend: BackendConfig,
    pub deadline: Instant,
    /// Whether the overlay had added it (for the origin the API shows while it drains).
    pub from_overlay: bool,
    /// The source that owned it (`dns:web`), when a source's set no longer lists it.
    pub source: Option<String>,
}

/// Backend sets owned by sources (discovery, managed instances): (service, source) → the
/// (address, weight) list the source last gave. Kept by the writer, not in the overlay: each
/// source derives its set again at start.
pub type Sourced = BTreeMap<(String, String), Vec<(String, u32)>>;

/// One change held by the overlay, for telling which of them no longer apply.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Item {
    RemoveService(String),
    AddService(String),
    Backend(String, String),
}

/// The merged result: a valid config plus what the admin API shows about its origins.
#[derive(Debug, Clone)]
pub struct Desired {
    pub config: Config,
    /// Admin states other than `active`: (service, address, state).
    pub states: Vec<(String, String, AdminState)>,
    /// Services the overlay added.
    pub overlay_services: HashSet<String>,
    /// (service, address) of backends the overlay added to a service of the file.
    pub overlay_backends: Vec<(String, String)>,
    /// (service, address, source) of backends a source owns.
    pub sources: Vec<(String, String, String)>,
    /// Overlay changes the file contradicts; they are not applied.
    pub conflicts: Vec<String>,
    /// The items behind `conflicts` that failed validation (kept out of later merges).
    pub skipped: HashSet<Item>,
}

impl Desired {
    pub fn state_of(&self, service: &str, address: &str) -> AdminState {
        self.states
            .iter()
            .find(|(s, a, _)| s == service && same_address(a, address))
            .map_or(AdminState::Active, |(_, _, st)| *st)
    }

    /// Whether the backend (or its whole service) comes from the overlay.
    pub fn from_overlay(&self, service: &str, address: &str) -> bool {
        self.overlay_services.contains(service)
            || self.overlay_backends.iter().any(|(s, a)| s == service && same_address(a, address))
    }

    /// The source that owns the backend (`dns:web`), if one does.
    pub fn source_of(&self, service: &str, address: &str) -> Option<&str> {
        self.sources.iter().find(|(s, a, _)| s == service && same_address(a, address)).map(|(_, _, src)| src.as_str())
    }

    pub fn service(&self, name: &str) -> Option<&config::ServiceConfig> {
        self.config.services.iter().find(|s| s.name == name)
    }
}

/// Merge, skipping the items in `skip`; an error when the result does not validate.
pub fn merge(
    file: &Config,
    overlay: &Overlay,
    sourced: &Sourced,
    draining: &[Draining],
    skip: &HashSet<Item>,
) -> Result<Desired, ChangeError> {
    let mut cfg = file.clone();
    cfg.legacy_equivalent = None;
    let mut conflicts = Vec::new();
    let mut states = Vec::new();
    let mut overlay_services = HashSet::new();
    let mut overlay_backends = Vec::new();
    let mut sources = Vec::new();

    for name in &overlay.removed_services {
        if skip.contains(&Item::RemoveService(name.clone())) {
            continue;
        }
        let before = cfg.services.len();
        cfg.services.retain(|s| s.name != *name);
        if cfg.services.len() == before {
            conflicts.push(format!("the overlay removes service {name:?}, which the file no longer has"));
        }
    }

    let mut posted = Vec::new();
    for svc in &overlay.services {
        let name = service_name(svc);
        if skip.contains(&Item::AddService(name.clone())) {
            continue;
        }
        if cfg.services.iter().any(|s| s.name == name) {
            conflicts.push(format!(
                "service {name:?} is in the file now; the overlay's copy is not used (DELETE /api/v1/overlay forgets it)"
            ));
            continue;
        }
        overlay_services.insert(name);
        posted.push(svc);
    }
    if !posted.is_empty() {
        cfg.services.extend(parse_services(file, &posted)?);
    }

    for e in &overlay.backends {
        if skip.contains(&Item::Backend(e.service.clone(), e.address.clone())) {
            continue;
        }
        let Some(service) = cfg.services.iter_mut().find(|s| s.name == e.service) else {
            conflicts.push(format!(
                "the overlay changes backend {} of service {:?}, which no longer exists",
                e.address, e.service
            ));
            continue;
        };
        let at = service.backends.iter().position(|b| same_address(&b.address, &e.address));
        if e.added {
            if at.is_some() {
                conflicts.push(format!(
                    "backend {} of service {:?} is in the file now; the overlay's addition is not used",
                    e.address, e.service
                ));
                continue;
            }
            service.backends.push(unresolved(&e.address, e.weight.unwrap_or(1)));
            if !overlay_services.contains(&e.service) {
                overlay_backends.push((e.service.clone(), e.address.clone()));
            }
        } else {
            let Some(i) = at else {
                conflicts.push(format!(
                    "the overlay changes backend {} of service {:?}, which the file no longer has",
                    e.address, e.service
                ));
                continue;
            };
            if e.removed {
                service.backends.remove(i);
                continue;
            }
            if let Some(w) = e.weight {
                service.backends[i].weight = w;
            }
        }
        if let Some(st) = e.state {
            states.push((e.service.clone(), e.address.clone(), st));
        }
    }

    // After the file and the overlay, which win a clash: a source's address that another
    // backend has already is left out (and reported) rather than failing the whole set.
    for ((name, source), list) in sourced {
        let Some(service) = cfg.services.iter_mut().find(|s| s.name == *name) else { continue };
        for (address, weight) in list {
            let literal = ip_literal(address);
            let clash = service.backends.iter().find(|b| {
                same_address(&b.address, address)
                    || (literal.is_some() && (Some(b.addr) == literal || ip_literal(&b.address) == literal))
            });
            if let Some(b) = clash {
                let owner = sources
                    .iter()
                    .find(|(s, a, _): &&(String, String, String)| s == name && same_address(a, &b.address))
                    .map_or("the file or the API", |(_, _, src)| src.as_str());
                conflicts.push(format!(
                    "backend {address} from {source} of service {name:?} is also {} from {owner}; the source's copy is not used",
                    b.address
                ));
                continue;
            }
            service.backends.push(unresolved(address, *weight));
            sources.push((name.clone(), address.clone(), source.clone()));
        }
    }

    for d in draining {
        let Some(service) = cfg.services.iter_mut().find(|s| s.name == d.service) else { continue };
        if !service.backends.iter().any(|b| same_address(&b.address, &d.backend.address)) {
            service.backends.push(d.backend.clone());
        }
        if d.from_overlay {
            overlay_backends.push((d.service.clone(), d.backend.address.clone()));
        }
        if let Some(src) = &d.source {
            sources.push((d.service.clone(), d.backend.address.clone(), src.clone()));
        }
        states.retain(|(s, a, _)| !(*s == d.service && same_address(a, &d.backend.address)));
        states.push((d.service.clone(), d.backend.address.clone(), AdminState::Draining));
    }

    let text = config::to_yaml(&cfg);
    let mut config = config::parse(Path::new(MERGED), &text).map_err(|errors| invalid(&errors, &text))?;
    apply_denylist(&mut config, overlay, &mut conflicts);
    Ok(Desired { config, states, overlay_services, overlay_backends, sources, conflicts, skipped: skip.clone() })
}

/// `ip:port` (with or without `http://` and a trailing `/`) as a socket address; a host name
/// gives `None`.
fn ip_literal(address: &str) -> Option<SocketAddr> {
    let t = address.trim();
    let t = t.strip_prefix("http://").unwrap_or(t);
    t.strip_suffix('/').unwrap_or(t).parse().ok()
}

/// The overlay's deny list into the merged config (it is not part of the file's schema, so
/// it goes in after the parse). Entries were checked when they were added.
fn apply_denylist(config: &mut Config, overlay: &Overlay, conflicts: &mut Vec<String>) {
    for e in &overlay.denylist {
        let Ok(net) = config::parse_net(&e.cidr) else { continue };
        match &e.service {
            None => config.policy.runtime_deny.push(net),
            Some(name) => match config.services.iter_mut().find(|s| s.name == *name) {
                Some(s) => s.policy.runtime_deny.push(net),
                None => {
                    conflicts.push(format!("the overlay denies {} in service {name:?}, which no longer exists", e.cidr))
                }
            },
        }
    }
}

/// Merge what can be merged: an overlay item that makes the result invalid (the file changed
/// under it) is left out and reported. Never fails: the file alone is valid.
pub fn merge_lenient(file: &Config, overlay: &Overlay, sourced: &Sourced, draining: &[Draining]) -> Desired {
    if let Ok(d) = merge(file, overlay, sourced, draining, &HashSet::new()) {
        return d;
    }
    let items = items(overlay);
    let mut skip: HashSet<Item> = HashSet::new();
    let mut failed = Vec::new();
    for (i, item) in items.iter().enumerate() {
        // This item on top of the ones kept so far, without any later one.
        let mut trial = skip.clone();
        trial.extend(items[i + 1..].iter().cloned());
        if let Err(e) = merge(file, overlay, sourced, draining, &trial) {
            failed.push(format!("overlay change {} no longer passes check: {}", describe(item), e.message));
            skip.insert(item.clone());
        }
    }
    // Source-owned sets never make a merge invalid on their own (clashes are left out), but a
    // source's address could still be refused by `check`: then they go too, and come back
    // with the source's next answer.
    let mut d = merge(file, overlay, sourced, draining, &skip)
        .or_else(|_| merge(file, overlay, &Sourced::new(), draining, &skip))
        .unwrap_or_else(|_| file_only(file));
    d.conflicts.extend(failed);
    d
}

fn file_only(file: &Config) -> Desired {
    let mut config = file.clone();
    config.legacy_equivalent = None;
    Desired {
        config,
        states: Vec::new(),
        overlay_services: HashSet::new(),
        overlay_backends: Vec::new(),
        sources: Vec::new(),
        conflicts: vec!["the overlay cannot be applied at all; serving the file alone".into()],
        skipped: HashSet::new(),
    }
}

fn items(overlay: &Overlay) -> Vec<Item> {
    let mut out: Vec<Item> = overlay.removed_services.iter().map(|n| Item::RemoveService(n.clone())).collect();
    out.extend(overlay.services.iter().map(|s| Item::AddService(service_name(s))));
    out.extend(overlay.backends.iter().map(|e| Item::Backend(e.service.clone(), e.address.clone())));
    out
}

fn describe(item: &Item) -> String {
    match item {
        Item::RemoveService(n) => format!("\"remove service {n}\""),
        Item::AddService(n) => format!("\"add service {n}\""),
        Item::Backend(s, a) => format!("\"backend {a} of service {s}\""),
    }
}

pub fn service_name(svc: &Value) -> String {
    svc.get("name").and_then(Value::as_str).map(|n| n.trim().to_owned()).unwrap_or_default()
}

/// A backend as the API gives it; the merged config's parse resolves and checks the address.
fn unresolved(address: &str, weight: u32) -> BackendConfig {
    BackendConfig {
        address: address.trim().to_owned(),
        addr: ([0, 0, 0, 0], 0).into(),
        authority: String::new(),
        weight,
        max_connections: None,
        tls: None,
    }
}

/// Posted services (JSON, the file's schema) validated in the context of the file's top-level
/// settings, which they inherit (timeouts).
fn parse_services(file: &Config, posted: &[&Value]) -> Result<Vec<config::ServiceConfig>, ChangeError> {
    let mut head = file.clone();
    head.services.clear();
    head.legacy_equivalent = None;
    // `to_yaml` ends with `services:`; JSON is YAML, so each service goes in as a flow mapping,
    // one key per line so that an error's line names its key.
    let mut text = config::to_yaml(&head);
    for svc in posted {
        let json = serde_json::to_string_pretty(svc).unwrap_or_default();
        for (i, line) in json.lines().enumerate() {
            text.push_str(if i == 0 { "  - " } else { "    " });
            text.push_str(line);
            text.push('\n');
        }
    }
    config::parse(Path::new(POSTED), &text).map(|c| c.services).map_err(|errors| invalid(&errors, &text))
}

/// The first problem as the API's error (all of them in `details`), with the field it is about:
/// the key on the problem's line, or above it.
fn invalid(errors: &[ConfigError], text: &str) -> ChangeError {
    let first = errors.first();
    let message = first.map_or_else(|| "invalid".to_owned(), |e| without_line_numbers(&e.message));
    let field = first.and_then(|e| field_at(text, e.line));
    // A clash with a service that exists is a conflict (409), not a malformed request.
    let clash = message.contains("has the same route as") || message.starts_with("duplicate service name");
    let kind = if clash { ErrorKind::Conflict } else { ErrorKind::Invalid };
    let mut err = ChangeError::new(kind, message, field.as_deref());
    if errors.len() > 1 {
        err.details = errors.iter().map(|e| without_line_numbers(&e.message)).collect();
    }
    err
}

/// Messages point at other lines (`(line 6)`, `(first defined on line 6)`); those are lines of
/// the merged text, which nobody sees, so they go.
fn without_line_numbers(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find(" (") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        match after.find(')') {
            Some(end) if after[..end].contains("line ") && after[..end].ends_with(|c: char| c.is_ascii_digit()) => {
                rest = &after[end + 1..];
            }
            _ => {
                out.push_str(" (");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn field_at(text: &str, line: u64) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let upto = usize::try_from(line).ok()?.min(lines.len());
    lines[..upto].iter().rev().find_map(|l| key_of(l))
}

/// `"key": ...` (JSON) or `key: ...` (YAML) → `key`.
fn key_of(line: &str) -> Option<String> {
    let t = line.trim_start().trim_start_matches("- ").trim_start_matches('{').trim_start();
    let (key, rest) = match t.strip_prefix('"') {
        Some(q) => {
            let end = q.find('"')?;
            (&q[..end], &q[end + 1..])
        }
        None => {
            let end = t.find(':')?;
            (&t[..end], &t[end..])
        }
    };
    let valid = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    (valid && rest.trim_start().starts_with(':')).then(|| key.to_owned())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::membership::overlay::Overlay;

    fn file() -> Config {
        let text = "listen: 127.0.0.1:8000\ntimeouts: {connect: 1s}\nservices:\n  - name: web\n    backends:\n      - address: 127.0.0.1:9001\n        max_connections: 5\n      - address: http://localhost:9002\n";
        config::parse(Path::new("f.yaml"), text).unwrap()
    }

    #[test]
    fn overlay_changes_apply_over_the_file() {
        let mut o = Overlay::empty();
        o.edit("web", "127.0.0.1:9003").added = true;
        o.edit("web", "127.0.0.1:9003").weight = Some(4);
        o.edit("web", "localhost:9002").removed = true;
        o.edit("web", "127.0.0.1:9001").weight = Some(7);
        o.edit("web", "127.0.0.1:9001").state = Some(AdminState::Disabled);
        o.services.push(json!({"name": "api", "hosts": ["api.local"], "backends": [{"address": "127.0.0.1:9100"}]}));
        let d = merge(&file(), &o, &Sourced::new(), &[], &HashSet::new()).unwrap();
        let web = d.service("web").unwrap();
        let got: Vec<(String, u32, Option<usize>)> =
            web.backends.iter().map(|b| (b.address.clone(), b.weight, b.max_connections)).collect();
        assert_eq!(got, [("127.0.0.1:9001".into(), 7, Some(5)), ("127.0.0.1:9003".into(), 4, None)]);
        assert_eq!(web.backends[1].addr, "127.0.0.1:9003".parse().unwrap());
        let api = d.service("api").unwrap();
        assert_eq!(api.limits.timeouts.connect, std::time::Duration::from_secs(1), "inherits the file's timeouts");
        assert_eq!(d.state_of("web", "127.0.0.1:9001"), AdminState::Disabled);
        assert!(d.from_overlay("web", "127.0.0.1:9003") && d.from_overlay("api", "127.0.0.1:9100"));
        assert!(!d.from_overlay("web", "127.0.0.1:9001"));
        assert!(d.conflicts.is_empty(), "{:?}", d.conflicts);
    }

    #[test]
    fn invalid_changes_name_their_field() {
        let mut o = Overlay::empty();
        o.edit("web", "127.0.0.1:0").added = true;
        let e = merge(&file(), &o, &Sourced::new(), &[], &HashSet::new()).unwrap_err();
        assert_eq!((e.kind, e.field.as_deref()), (ErrorKind::Invalid, Some("address")), "{e:?}");
        let mut o = Overlay::empty();
        o.services.push(json!({"name": "api", "backends": [{"address": "127.0.0.1:1", "weight": 0}]}));
        let e = merge(&file(), &o, &Sourced::new(), &[], &HashSet::new()).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("weight"), "{e:?}");
        let mut o = Overlay::empty();
        o.services.push(json!({"name": "api", "backends": [{"address": "127.0.0.1:1"}], "color": "red"}));
        let e = merge(&file(), &o, &Sourced::new(), &[], &HashSet::new()).unwrap_err();
        assert!(e.message.contains("unknown key"), "{e:?}");
        // Same route as `web` (the default service): found by the merged parse.
        let mut o = Overlay::empty();
        o.services.push(json!({"name": "api", "backends": [{"address": "127.0.0.1:1"}]}));
        let e = merge(&file(), &o, &Sourced::new(), &[], &HashSet::new()).unwrap_err();
        assert!(e.message.contains("same route") && e.kind == ErrorKind::Conflict, "{e:?}");
        assert!(!e.message.contains("line"), "{e:?}");
    }

    #[test]
    fn contradictions_are_reported_and_invalid_leftovers_skipped() {
        let mut o = Overlay::empty();
        o.removed_services.push("gone".into());
        o.edit("gone", "127.0.0.1:1").added = true;
        o.edit("web", "127.0.0.1:9001").added = true;
        o.services.push(json!({"name": "web", "backends": [{"address": "127.0.0.1:1"}]}));
        // Valid once, invalid against this file: the same route as `web`.
        o.services.push(json!({"name": "api", "backends": [{"address": "127.0.0.1:1"}]}));
        let d = merge_lenient(&file(), &o, &Sourced::new(), &[]);
        assert_eq!(d.config.services.len(), 1);
        assert_eq!(d.conflicts.len(), 5, "{:#?}", d.conflicts);
        assert!(d.conflicts[4].contains("add service api"), "{:#?}", d.conflicts);
        assert!(d.skipped.contains(&Item::AddService("api".into())));
    }
}
