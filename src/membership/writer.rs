//! The writer: the only code that changes the desired state and publishes snapshots. It runs
//! in the server's main loop (which also owns the listeners a reload may open), one change at
//! a time, so changes from different sources never interleave.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::desired::{self, Desired, Draining, Sourced};
use super::overlay::{self, same_address, Overlay};
use super::{Change, ChangeError, Command, ErrorKind, Handle, Outcome, Source, View, QUEUE};
use crate::config::{self, Config};
use crate::health::registry::{self, Checkers, Wanted};
use crate::state::{Shared, Snapshot};
use crate::upstream::AdminState;

/// How often draining backends are looked at (their in-flight count).
pub const DRAIN_POLL: std::time::Duration = std::time::Duration::from_millis(50);

pub struct Membership {
    /// The config file as last loaded.
    file: Config,
    overlay: Overlay,
    /// Backend sets owned by sources; not in the overlay (see `Change::SetSourced`).
    sourced: Sourced,
    draining: Vec<Draining>,
    /// The last published desired state.
    current: Arc<Desired>,
    state_file: Option<PathBuf>,
    shared: Shared,
    checkers: Checkers,
    view: Arc<ArcSwap<View>>,
    revision: tokio::sync::watch::Sender<u64>,
}

type Started = (Membership, Handle, mpsc::Receiver<Command>);
/// The overlay and drains after a change, a line for the log, and an added backend's
/// (service, address).
type Edited = (Overlay, Vec<Draining>, String, Option<(String, String)>);

impl Membership {
    /// Merge the file with the saved overlay (if any), build and publish the first snapshot.
    pub fn start(file: Config) -> Result<Started, String> {
        let state_file = file.admin.as_ref().and_then(|a| a.state_file.clone());
        let overlay = match &state_file {
            None => Overlay::empty(),
            Some(path) => match overlay::load(path) {
                Ok(Some(o)) => {
                    info!(
                        "overlay read from {}: {} change(s)",
                        path.display(),
                        o.backends.len() + o.services.len() + o.removed_services.len()
                    );
                    o
                }
                Ok(None) => {
                    // Found out now rather than at the first change: a state file that cannot
                    // be written would make every change fail.
                    overlay::save(path, &Overlay::empty()).map_err(|e| format!("admin.state_file: {e}"))?;
                    Overlay::empty()
                }
                Err(e) => {
                    // Not fatal: serving the file is better than not serving. The unreadable file
                    // is kept aside, as the next change writes a new one.
                    let aside = path.with_extension("unreadable");
                    let _ = std::fs::copy(path, &aside);
                    error!("{e}; starting without the overlay (the file is kept as {})", aside.display());
                    Overlay::empty()
                }
            },
        };
        let desired = desired::merge_lenient(&file, &overlay, &Sourced::new(), &[]);
        for c in &desired.conflicts {
            warn!("overlay conflict: {c}");
        }
        let snapshot =
            Snapshot::build(desired.config.clone(), None).map_err(|e| format!("cannot open the access log: {e}"))?;
        set_admin_states(&snapshot, &desired, None);
        let snapshot = Arc::new(snapshot);
        let shared: Shared = Arc::new(ArcSwap::new(snapshot.clone()));
        let desired = Arc::new(desired);
        let view = Arc::new(ArcSwap::from_pointee(View {
            snapshot: snapshot.clone(),
            desired: desired.clone(),
            overlay: overlay.clone(),
        }));
        let mut checkers = Checkers::default();
        sync_checkers(&mut checkers, &snapshot);
        let (tx, rx) = mpsc::channel(QUEUE);
        let (revision, revisions) = tokio::sync::watch::channel(overlay.revision);
        let handle = Handle { tx, view: view.clone(), revision: revisions };
        let m = Membership {
            file,
            overlay,
            sourced: Sourced::new(),
            draining: Vec::new(),
            current: desired,
            state_file,
            shared,
            checkers,
            view,
            revision,
        };
        Ok((m, handle, rx))
    }

    /// The handle requests read (the data plane's snapshot).
    pub fn shared(&self) -> Shared {
        self.shared.clone()
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.load_full()
    }

    /// Merge a newly loaded file with the overlay; overlay changes that no longer apply are
    /// reported, never fatal.
    pub async fn prepare_reload(&self, file: Config) -> Desired {
        let overlay = self.overlay.clone();
        let sourced = self.sourced.clone();
        let draining = self.draining.clone();
        let fallback = file.clone();
        tokio::task::spawn_blocking(move || desired::merge_lenient(&file, &overlay, &sourced, &draining))
            .await
            .unwrap_or_else(|_| desired::merge_lenient(&fallback, &Overlay::empty(), &Sourced::new(), &[]))
    }

    /// Publish a prepared reload.
    pub fn commit_reload(&mut self, source: Source, file: Config, desired: Desired) -> Result<Outcome, ChangeError> {
        let outcome = self.commit(source, desired, None, None)?;
        self.file = file;
        Ok(outcome)
    }

    /// Apply one change from the API (or another source): check it against the current state,
    /// merge, validate, write the overlay, publish. On any error nothing has changed.
    pub async fn apply(&mut self, source: Source, change: Change) -> Result<Outcome, ChangeError> {
        if let Change::Adopt(overlay) = &change {
            return self.adopt(source, overlay.clone()).await;
        }
        if let Change::SetSourced { service, source: owner, backends } = &change {
            return self.apply_sourced(service, owner, backends).await;
        }
        let (overlay, draining, what, added) = self.edit(&change)?;
        let file = self.file.clone();
        let skip = self.current.skipped.clone();
        let (o, d, so) = (overlay.clone(), draining.clone(), self.sourced.clone());
        let desired = tokio::task::spawn_blocking(move || desired::merge(&file, &o, &so, &d, &skip))
            .await
            .map_err(|e| ChangeError::new(ErrorKind::Failed, format!("validation failed: {e}"), None))??;
        if let Some((service, address)) = added {
            duplicate_check(&desired, &service, &address)?;
        }
        let outcome = self.commit(source, desired, Some(overlay), Some(draining))?;
        if let Change::RemoveService(name) = &change {
            // Its sources stop with it (or get "no service" until it is back).
            self.sourced.retain(|(s, _), _| s != name);
        }
        info!("{source}: {what}");
        Ok(outcome)
    }

    /// Take another instance's overlay when it is newer than ours. It was valid against that
    /// instance's file, which may differ from ours: merged leniently, what does not apply here
    /// is reported as a conflict. A backend it removes drains (its requests in flight finish),
    /// as it does on the instance where the change was made.
    async fn adopt(&mut self, source: Source, overlay: Overlay) -> Result<Outcome, ChangeError> {
        let tie = overlay.revision == self.overlay.revision && !overlay.same_changes(&self.overlay);
        if overlay.revision < self.overlay.revision || (overlay.revision == self.overlay.revision && !tie) {
            return Ok(self.view.load_full());
        }
        let (file, o, old) = (self.file.clone(), overlay.clone(), self.current.clone());
        let (kept, sourced) = (self.draining.clone(), self.sourced.clone());
        let deadline = Instant::now() + old.config.shutdown.drain_timeout;
        let (desired, draining) = tokio::task::spawn_blocking(move || {
            let plain = desired::merge_lenient(&file, &o, &sourced, &[]);
            // Drains that go on: backends the new overlay has gone too (a cancelled drain
            // comes back as a backend of `plain`).
            let has = |d: &Desired, service: &str, address: &str| {
                d.service(service).is_some_and(|s| s.backends.iter().any(|b| same_address(&b.address, address)))
            };
            let mut draining: Vec<Draining> =
                kept.into_iter().filter(|d| !has(&plain, &d.service, &d.backend.address)).collect();
            for s in &old.config.services {
                if plain.service(&s.name).is_none() {
                    continue;
                }
                for b in &s.backends {
                    let gone = !has(&plain, &s.name, &b.address);
                    let listed =
                        draining.iter().any(|d| d.service == s.name && same_address(&d.backend.address, &b.address));
                    if gone && !listed {
                        let from_overlay = old.from_overlay(&s.name, &b.address);
                        draining.push(Draining {
                            service: s.name.clone(),
                            backend: b.clone(),
                            deadline,
                            from_overlay,
                            source: None,
                        });
                    }
                }
            }
            let desired =
                if draining.is_empty() { plain } else { desired::merge_lenient(&file, &o, &sourced, &draining) };
            (desired, draining)
        })
        .await
        .map_err(|e| ChangeError::new(ErrorKind::Failed, format!("merge failed: {e}"), None))?;
        let revision = overlay.revision;
        let outcome = self.commit(source, desired, Some(overlay), Some(draining))?;
        info!("{source}: overlay revision {revision} adopted");
        Ok(outcome)
    }

    /// Replace the set of backends `owner` has in `service`: add the new, drain the vanished
    /// (the drain of one that comes back is cancelled), re-weight the rest. An unchanged set
    /// changes nothing and builds nothing, so a source may repeat itself cheaply.
    async fn apply_sourced(
        &mut self,
        service: &str,
        owner: &str,
        backends: &[(String, u32)],
    ) -> Result<Outcome, ChangeError> {
        use ErrorKind::*;
        let cur = self.current.clone();
        let Some(svc) = cur.service(service) else {
            return Err(ChangeError::new(NotFound, format!("no service {service:?}"), Some("name")));
        };
        let mut list: Vec<(String, u32)> = Vec::with_capacity(backends.len());
        for (address, weight) in backends {
            let address = address.trim();
            if address.is_empty() {
                return Err(ChangeError::new(Invalid, "address is empty", Some("address")));
            }
            if !(1..=config::MAX_WEIGHT).contains(&i64::from(*weight)) {
                return Err(ChangeError::new(
                    Invalid,
                    format!("weight of {address} must be from 1 to {}, got {weight}", config::MAX_WEIGHT),
                    Some("weight"),
                ));
            }
            // A source may list an address twice (two SRV records): one backend.
            if !list.iter().any(|(a, _)| same_address(a, address)) {
                list.push((address.to_owned(), *weight));
            }
        }
        let key = (service.to_owned(), owner.to_owned());
        let old = self.sourced.get(&key).cloned().unwrap_or_default();
        let mut draining = self.draining.clone();
        let mut lines = Vec::new();
        for (address, _) in &old {
            if list.iter().any(|(a, _)| same_address(a, address)) || cur.source_of(service, address) != Some(owner) {
                continue;
            }
            let Some(b) = svc.backends.iter().find(|b| same_address(&b.address, address)) else { continue };
            if draining.iter().any(|d| d.service == service && same_address(&d.backend.address, address)) {
                continue;
            }
            draining.push(Draining {
                service: service.to_owned(),
                backend: b.clone(),
                deadline: Instant::now() + cur.config.shutdown.drain_timeout,
                from_overlay: false,
                source: Some(owner.to_owned()),
            });
            lines.push(format!("{address} draining"));
        }
        for (address, weight) in &list {
            match old.iter().find(|(a, _)| same_address(a, address)) {
                Some((_, w)) if w == weight => {}
                Some((_, w)) => lines.push(format!("{address} weight {w} -> {weight}")),
                None => {
                    let back = draining.iter().position(|d| {
                        d.service == service
                            && same_address(&d.backend.address, address)
                            && d.source.as_deref() == Some(owner)
                    });
                    match back {
                        Some(i) => {
                            draining.remove(i);
                            lines.push(format!("{address} back (drain cancelled)"));
                        }
                        None => lines.push(format!("{address} added (weight {weight})")),
                    }
                }
            }
        }
        if lines.is_empty() && old.len() == list.len() {
            return Ok(self.view.load_full());
        }
        let mut sourced = self.sourced.clone();
        if list.is_empty() {
            sourced.remove(&key);
        } else {
            sourced.insert(key, list);
        }
        let (file, overlay, skip) = (self.file.clone(), self.overlay.clone(), cur.skipped.clone());
        let (so, d) = (sourced.clone(), draining.clone());
        let desired = tokio::task::spawn_blocking(move || desired::merge(&file, &overlay, &so, &d, &skip))
            .await
            .map_err(|e| ChangeError::new(Failed, format!("validation failed: {e}"), None))??;
        let outcome = self.commit(Source::Discovery, desired, None, Some(draining))?;
        self.sourced = sourced;
        let what = if lines.is_empty() { "set unchanged".to_owned() } else { lines.join(", ") };
        info!("{}: {owner} in service {service}: {what}", Source::Discovery);
        Ok(outcome)
    }

    /// Whether some backend is draining (then [`Membership::finish_drains`] is due every
    /// [`DRAIN_POLL`]).
    pub fn is_draining(&self) -> bool {
        !self.draining.is_empty()
    }

    /// Remove draining backends with nothing in flight, or whose drain timed out.
    pub async fn finish_drains(&mut self) {
        let now = Instant::now();
        let snapshot = self.shared.load_full();
        let mut done = Vec::new();
        self.draining.retain(|d| {
            let in_flight = find_backend(&snapshot, &d.service, &d.backend.address).map_or(0, |b| b.in_flight());
            if in_flight == 0 {
                done.push(format!("backend {} of service {} drained, removed", d.backend.address, d.service));
                false
            } else if now >= d.deadline {
                done.push(format!(
                    "backend {} of service {}: drain timeout with {in_flight} request(s) in flight, removed",
                    d.backend.address, d.service
                ));
                false
            } else {
                true
            }
        });
        if done.is_empty() {
            return;
        }
        let (file, overlay, draining) = (self.file.clone(), self.overlay.clone(), self.draining.clone());
        let (skip, sourced) = (self.current.skipped.clone(), self.sourced.clone());
        let desired = tokio::task::spawn_blocking(move || {
            desired::merge(&file, &overlay, &sourced, &draining, &skip)
                .unwrap_or_else(|_| desired::merge_lenient(&file, &overlay, &sourced, &draining))
        })
        .await;
        match desired {
            Ok(d) => match self.commit(Source::Drain, d, None, None) {
                Ok(_) => {
                    for line in done {
                        info!("{line}");
                    }
                }
                Err(e) => error!("drain: {}", e.message),
            },
            Err(e) => error!("drain: {e}"),
        }
    }

    /// Build, write the overlay (before anything is visible), publish, and bring the health
    /// checkers in line.
    fn commit(
        &mut self,
        source: Source,
        desired: Desired,
        overlay: Option<Overlay>,
        draining: Option<Vec<Draining>>,
    ) -> Result<Outcome, ChangeError> {
        let old = self.shared.load_full();
        let snapshot = Snapshot::build(desired.config.clone(), Some(&old)).map_err(|e| {
            ChangeError::new(ErrorKind::Failed, format!("cannot open the access log: {e}"), Some("access_log"))
        })?;
        // Every change made here counts; an adopted overlay keeps the revision it was given.
        let overlay = overlay.map(|mut o| {
            if source != Source::Cluster {
                o.revision = self.overlay.revision + u64::from(!o.same_changes(&self.overlay));
            }
            o
        });
        if let (Some(o), Some(path)) = (&overlay, &self.state_file) {
            if *o != self.overlay {
                overlay::save(path, o).map_err(|e| {
                    error!("{source}: {e}; the change is not applied");
                    ChangeError::new(ErrorKind::Failed, e, None)
                })?;
            }
        }
        set_admin_states(&snapshot, &desired, Some(&old));
        let snapshot = Arc::new(snapshot);
        self.shared.store(snapshot.clone());
        sync_checkers(&mut self.checkers, &snapshot);
        let new_conflicts: Vec<&String> =
            desired.conflicts.iter().filter(|c| !self.current.conflicts.contains(c)).collect();
        for c in new_conflicts {
            warn!("{source}: overlay conflict: {c}");
        }
        if let Some(o) = overlay {
            self.overlay = o;
        }
        if let Some(d) = draining {
            self.draining = d;
        }
        self.current = Arc::new(desired);
        let view = Arc::new(View { snapshot, desired: self.current.clone(), overlay: self.overlay.clone() });
        self.view.store(view.clone());
        let revision = self.overlay.revision;
        self.revision.send_if_modified(|r| std::mem::replace(r, revision) != revision);
        Ok(view)
    }

    /// The overlay and drains after `change`, checked against the current state, with a line
    /// for the log and, for an added backend, its (service, address).
    fn edit(&self, change: &Change) -> Result<Edited, ChangeError> {
        let Change::Batch(changes) = change else {
            return self.edit_one(self.overlay.clone(), self.draining.clone(), change);
        };
        // All or nothing: each step starts from the one before, and nothing is kept on error.
        let (mut overlay, mut draining) = (self.overlay.clone(), self.draining.clone());
        let mut lines = Vec::new();
        let mut added = None;
        for c in changes {
            let (o, d, what, a) = self.edit_one(overlay, draining, c)?;
            (overlay, draining) = (o, d);
            lines.push(what);
            added = added.or(a);
        }
        Ok((overlay, draining, lines.join("; "), added))
    }

    fn edit_one(&self, overlay: Overlay, draining: Vec<Draining>, change: &Change) -> Result<Edited, ChangeError> {
        use ErrorKind::*;
        let (mut overlay, mut draining) = (overlay, draining);
        // Draining is removal with a drain, from whichever route it came.
        let as_removal;
        let change = match change {
            Change::SetState { service, address, state: AdminState::Draining } => {
                as_removal = Change::RemoveBackend { service: service.clone(), address: address.clone(), drain: true };
                &as_removal
            }
            other => other,
        };
        let cur = &self.current;
        let mut added = None;
        let service_of = |name: &str| {
            cur.service(name).ok_or_else(|| ChangeError::new(NotFound, format!("no service {name:?}"), Some("name")))
        };
        let backend_of = |service: &str, address: &str| {
            let s = service_of(service)?;
            s.backends.iter().find(|b| same_address(&b.address, address)).cloned().ok_or_else(|| {
                ChangeError::new(NotFound, format!("service {service:?} has no backend {address:?}"), Some("address"))
            })
        };
        // A source's backends change at their source: an API edit would be undone by its
        // next answer.
        let not_sourced = |service: &str, address: &str| match cur.source_of(service, address) {
            Some(src) => Err(ChangeError::new(
                Conflict,
                format!("backend {address} of service {service:?} belongs to {src}; it changes there"),
                Some("address"),
            )),
            None => Ok(()),
        };
        let draining_at = |d: &[Draining], service: &str, address: &str| {
            d.iter().position(|x| x.service == service && same_address(&x.backend.address, address))
        };
        let check_weight = |w: u32| {
            if (1..=config::MAX_WEIGHT).contains(&i64::from(w)) {
                Ok(())
            } else {
                Err(ChangeError::new(
                    Invalid,
                    format!("weight must be a whole number from 1 to {}, got {w}", config::MAX_WEIGHT),
                    Some("weight"),
                ))
            }
        };
        let what = match change {
            Change::Reload => {
                return Err(ChangeError::new(Failed, "a reload is applied by the server loop", None));
            }
            Change::AddService(svc) => {
                if !svc.is_object() {
                    return Err(ChangeError::new(Invalid, "a service must be a JSON object", Some("body")));
                }
                let name = desired::service_name(svc);
                if name.is_empty() {
                    return Err(ChangeError::new(Invalid, "the service needs a non-empty string `name`", Some("name")));
                }
                if cur.service(&name).is_some() {
                    return Err(ChangeError::new(Conflict, format!("service {name:?} exists already"), Some("name")));
                }
                overlay.services.retain(|s| desired::service_name(s) != name);
                overlay.tidy(Some(&name));
                draining.retain(|d| d.service != name);
                overlay.services.push(svc.clone());
                format!("service {name} added")
            }
            Change::RemoveService(name) => {
                service_of(name)?;
                if cur.overlay_services.contains(name) {
                    overlay.services.retain(|s| desired::service_name(s) != *name);
                } else {
                    overlay.removed_services.push(name.clone());
                }
                overlay.tidy(Some(name));
                draining.retain(|d| d.service != *name);
                format!("service {name} removed")
            }
            Change::AddBackend { service, address, weight } => {
                service_of(service)?;
                check_weight(*weight)?;
                let address = address.trim();
                if address.is_empty() {
                    return Err(ChangeError::new(Invalid, "address is empty", Some("address")));
                }
                if draining_at(&draining, service, address).is_some() {
                    return Err(ChangeError::new(
                        Conflict,
                        format!("backend {address} of service {service:?} is draining; PATCH its state to active to keep it"),
                        Some("address"),
                    ));
                }
                if backend_of(service, address).is_ok() {
                    return Err(ChangeError::new(
                        Conflict,
                        format!("service {service:?} has backend {address} already"),
                        Some("address"),
                    ));
                }
                let e = overlay.edit(service, address);
                if e.removed {
                    e.removed = false;
                } else {
                    e.added = true;
                    e.address = address.to_owned();
                }
                e.weight = Some(*weight);
                e.state = None;
                added = Some((service.clone(), address.to_owned()));
                format!("backend {address} added to service {service} (weight {weight})")
            }
            Change::RemoveBackend { service, address, drain } => {
                let drain = *drain;
                let b = backend_of(service, address)?;
                not_sourced(service, address)?;
                if let Some(i) = draining_at(&draining, service, address) {
                    if drain {
                        return Ok((
                            overlay,
                            draining,
                            format!("backend {address} of service {service} is draining"),
                            None,
                        ));
                    }
                    draining.remove(i);
                } else {
                    // A service keeps at least one backend, as in the file (`velocity check`);
                    // draining ones are as good as gone.
                    let remaining = service_of(service)?
                        .backends
                        .iter()
                        .filter(|x| !same_address(&x.address, &b.address))
                        .filter(|x| draining_at(&draining, service, &x.address).is_none())
                        .count();
                    if remaining == 0 {
                        return Err(ChangeError::new(
                            Conflict,
                            format!("backend {address} is the last of service {service:?}; remove the service instead"),
                            Some("address"),
                        ));
                    }
                    let e = overlay.edit(service, &b.address);
                    if e.added {
                        e.added = false;
                    } else {
                        e.removed = true;
                    }
                    e.weight = None;
                    e.state = None;
                    overlay.tidy(None);
                    if drain {
                        let deadline = Instant::now() + cur.config.shutdown.drain_timeout;
                        let from_overlay = cur.from_overlay(service, &b.address);
                        draining.push(Draining {
                            service: service.clone(),
                            backend: b,
                            deadline,
                            from_overlay,
                            source: None,
                        });
                    }
                }
                if drain {
                    format!("backend {address} of service {service} draining")
                } else {
                    format!("backend {address} of service {service} removed")
                }
            }
            Change::SetWeight { service, address, weight } => {
                check_weight(*weight)?;
                let b = backend_of(service, address)?;
                not_sourced(service, address)?;
                if draining_at(&draining, service, address).is_some() {
                    return Err(ChangeError::new(Conflict, format!("backend {address} is draining"), Some("weight")));
                }
                overlay.edit(service, &b.address).weight = Some(*weight);
                format!("backend {address} of service {service}: weight {weight}")
            }
            Change::SetState { service, address, state } => {
                let b = backend_of(service, address)?;
                not_sourced(service, address)?;
                if let Some(i) = draining_at(&draining, service, address) {
                    if *state == AdminState::Disabled {
                        return Err(ChangeError::new(
                            Conflict,
                            format!("backend {address} is draining; set it active first"),
                            Some("state"),
                        ));
                    }
                    // Cancel the drain: the backend stays, as it was before.
                    let d = draining.remove(i);
                    // A drain marked a backend of the file (or of a posted service) removed,
                    // and dropped the entry of one the overlay had added.
                    let e = overlay.edit(service, &b.address);
                    if e.removed {
                        e.removed = false;
                    } else {
                        e.added = true;
                        e.weight = Some(d.backend.weight);
                    }
                } else {
                    overlay.edit(service, &b.address).state = (*state == AdminState::Disabled).then_some(*state);
                }
                overlay.tidy(None);
                format!("backend {address} of service {service}: {}", state.name())
            }
            Change::Batch(_) => {
                return Err(ChangeError::new(Invalid, "a batch cannot hold a batch", None));
            }
            Change::Adopt(_) => {
                return Err(ChangeError::new(Invalid, "an adopted overlay is not part of a batch", None));
            }
            Change::SetSourced { .. } => {
                return Err(ChangeError::new(Invalid, "a source's set is not part of a batch", None));
            }
            Change::ClearOverlay => {
                overlay = Overlay::empty();
                draining.clear();
                "overlay cleared: serving the file alone".to_owned()
            }
        };
        Ok((overlay, draining, what, added))
    }
}

/// Two addresses that resolve alike would be one backend listed twice.
fn duplicate_check(desired: &Desired, service: &str, address: &str) -> Result<(), ChangeError> {
    let Some(s) = desired.service(service) else { return Ok(()) };
    let Some(new) = s.backends.iter().find(|b| same_address(&b.address, address)) else { return Ok(()) };
    match s.backends.iter().find(|b| b.addr == new.addr && !same_address(&b.address, address)) {
        Some(other) => Err(ChangeError::new(
            ErrorKind::Conflict,
            format!("{address} is {}, the address of backend {} of service {service:?}", new.addr, other.address),
            Some("address"),
        )),
        None => Ok(()),
    }
}

fn find_backend(snapshot: &Snapshot, service: &str, address: &str) -> Option<Arc<crate::upstream::Backend>> {
    let s = snapshot.services.iter().find(|s| s.config.name == service)?;
    let lb = s.lb.load();
    lb.pool.backends.iter().find(|b| same_address(&b.name, address)).cloned()
}

/// Give every backend of `snapshot` its admin state; a backend new since `old` in a service
/// with active checks waits for its first passing check (none at start: the file's backends
/// are assumed up, as before).
fn set_admin_states(snapshot: &Snapshot, desired: &Desired, old: Option<&Snapshot>) {
    let old_ids: HashSet<u64> = old
        .map(|o| {
            o.services.iter().flat_map(|s| s.lb.load().pool.backends.iter().map(|b| b.id).collect::<Vec<_>>()).collect()
        })
        .unwrap_or_default();
    for s in &snapshot.services {
        let lb = s.lb.load();
        for b in &lb.pool.backends {
            if let (Some(_), Some(check)) = (old, &s.config.health.check) {
                if !old_ids.contains(&b.id) {
                    registry::await_first_pass(&b.health, check.healthy_threshold);
                }
            }
            b.set_admin_state(desired.state_of(&s.config.name, &b.name));
            b.set_source(desired.source_of(&s.config.name, &b.name));
        }
    }
}

fn sync_checkers(checkers: &mut Checkers, snapshot: &Snapshot) {
    let lbs: Vec<_> = snapshot.services.iter().map(|s| s.lb.load_full()).collect();
    let wanted: Vec<Wanted<'_>> = snapshot
        .services
        .iter()
        .zip(&lbs)
        .map(|(s, lb)| Wanted {
            service: &s.config.name,
            check: s.config.health.check.as_ref(),
            backends: &lb.pool.backends,
        })
        .collect();
    checkers.sync(&wanted);
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn start() -> Membership {
        let text = "listen: 127.0.0.1:8000\nshutdown: {drain_timeout: 5s}\nservices:\n  - name: web\n    backends:\n      - address: 127.0.0.1:9001\n";
        Membership::start(config::parse(Path::new("f.yaml"), text).unwrap()).unwrap().0
    }

    fn set(m: &mut Membership, source: &str, list: &[(&str, u32)]) -> Result<Outcome, ChangeError> {
        let backends = list.iter().map(|(a, w)| ((*a).to_owned(), *w)).collect();
        let change = Change::SetSourced { service: "web".into(), source: source.into(), backends };
        futures_block(m.apply(Source::Discovery, change))
    }

    fn futures_block<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
    }

    /// (address, weight, state, source) of every backend of `web` in the published snapshot.
    fn backends(m: &Membership) -> Vec<(String, u32, &'static str, Option<String>)> {
        let snap = m.snapshot();
        let lb = snap.services[0].lb.load();
        lb.pool
            .backends
            .iter()
            .zip(&lb.pool.weights)
            .map(|(b, w)| (b.name.clone(), *w, b.admin_state().name(), b.source().map(|s| s.to_string())))
            .collect()
    }

    fn row(a: &str, w: u32, st: &'static str, src: Option<&str>) -> (String, u32, &'static str, Option<String>) {
        (a.to_owned(), w, st, src.map(str::to_owned))
    }

    #[test]
    fn a_source_set_adds_drains_and_reweights_leaving_other_backends_alone() {
        let mut m = start();
        set(&mut m, "dns:web", &[("127.0.0.1:9002", 1), ("127.0.0.1:9003", 2)]).unwrap();
        assert_eq!(
            backends(&m),
            [
                row("127.0.0.1:9001", 1, "active", None),
                row("127.0.0.1:9002", 1, "active", Some("dns:web")),
                row("127.0.0.1:9003", 2, "active", Some("dns:web")),
            ]
        );
        let id = find_backend(&m.snapshot(), "web", "127.0.0.1:9003").unwrap().id;
        // 9002 vanished: drained, not cut (a request is in flight on it); 9003 re-weighted.
        let b2 = find_backend(&m.snapshot(), "web", "127.0.0.1:9002").unwrap();
        let flight = b2.try_start_request().unwrap();
        set(&mut m, "dns:web", &[("127.0.0.1:9003", 5)]).unwrap();
        assert_eq!(
            backends(&m),
            [
                row("127.0.0.1:9001", 1, "active", None),
                row("127.0.0.1:9003", 5, "active", Some("dns:web")),
                row("127.0.0.1:9002", 1, "draining", Some("dns:web")),
            ]
        );
        assert_eq!(find_backend(&m.snapshot(), "web", "127.0.0.1:9003").unwrap().id, id, "identity kept");
        futures_block(m.finish_drains());
        assert_eq!(backends(&m).len(), 3, "still in flight: still there");
        drop(flight);
        futures_block(m.finish_drains());
        assert_eq!(
            backends(&m),
            [row("127.0.0.1:9001", 1, "active", None), row("127.0.0.1:9003", 5, "active", Some("dns:web"))]
        );
        assert!(!m.is_draining());
        // Not in the overlay: a restart derives the set again.
        assert!(m.overlay.is_empty());
    }

    #[test]
    fn a_returning_address_cancels_its_drain_and_repeats_build_nothing() {
        let mut m = start();
        set(&mut m, "dns:web", &[("127.0.0.1:9002", 1), ("127.0.0.1:9003", 1)]).unwrap();
        let b3 = find_backend(&m.snapshot(), "web", "127.0.0.1:9003").unwrap();
        let _flight = b3.try_start_request().unwrap();
        set(&mut m, "dns:web", &[("127.0.0.1:9002", 1)]).unwrap();
        assert!(m.is_draining());
        set(&mut m, "dns:web", &[("127.0.0.1:9002", 1), ("127.0.0.1:9003", 1)]).unwrap();
        assert!(!m.is_draining());
        assert_eq!(backends(&m)[2], row("127.0.0.1:9003", 1, "active", Some("dns:web")));
        assert!(Arc::ptr_eq(&find_backend(&m.snapshot(), "web", "127.0.0.1:9003").unwrap(), &b3));
        let before = m.snapshot();
        set(&mut m, "dns:web", &[("127.0.0.1:9003", 1), ("127.0.0.1:9002", 1)]).unwrap();
        assert!(Arc::ptr_eq(&before, &m.snapshot()), "the same set again publishes nothing");
    }

    #[test]
    fn sources_do_not_take_over_other_backends_nor_the_api_theirs() {
        let mut m = start();
        // 9001 is the file's: left out, reported; the other source's 9002 is its own.
        set(&mut m, "dns:web", &[("127.0.0.1:9001", 3), ("127.0.0.1:9002", 1)]).unwrap();
        set(&mut m, "docker:web", &[("127.0.0.1:9002", 1), ("127.0.0.1:9004", 1)]).unwrap();
        assert_eq!(
            backends(&m),
            [
                row("127.0.0.1:9001", 1, "active", None),
                row("127.0.0.1:9002", 1, "active", Some("dns:web")),
                row("127.0.0.1:9004", 1, "active", Some("docker:web")),
            ]
        );
        assert_eq!(m.current.conflicts.len(), 2, "{:?}", m.current.conflicts);
        // The API edits neither a source's backend nor adds one a source has.
        let remove = Change::RemoveBackend { service: "web".into(), address: "127.0.0.1:9004".into(), drain: false };
        let e = futures_block(m.apply(Source::Admin, remove)).unwrap_err();
        assert!(e.kind == ErrorKind::Conflict && e.message.contains("docker:web"), "{e:?}");
        let add = Change::AddBackend { service: "web".into(), address: "127.0.0.1:9002".into(), weight: 1 };
        assert_eq!(futures_block(m.apply(Source::Admin, add)).unwrap_err().kind, ErrorKind::Conflict);
        // Clearing the overlay keeps the sources' sets; the file's backend can go too while a
        // source has others.
        futures_block(m.apply(Source::Admin, Change::ClearOverlay)).unwrap();
        assert_eq!(backends(&m).len(), 3);
        let e = set(&mut m, "dns:web", &[("127.0.0.1:9005", 0)]).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("weight"));
        let missing = Change::SetSourced {
            service: "nope".into(),
            source: "dns:nope".into(),
            backends: vec![("1.2.3.4:1".into(), 1)],
        };
        assert_eq!(futures_block(m.apply(Source::Discovery, missing)).unwrap_err().kind, ErrorKind::NotFound);
    }
}
