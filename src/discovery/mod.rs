//! Sources of backends beside the config's lists: DNS (`dns.rs`), managed processes
//! (`managed.rs`), Docker (`docker.rs`). Each configured source is one task that gives the membership writer the
//! complete set it owns (`Change::SetSourced`), through the same channel as the admin API;
//! nothing here touches the request path, and a config without `discovery` starts nothing.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

use crate::config::{Config, DnsDiscovery, DockerDiscovery, ManagedConfig};
use crate::membership::{Change, Handle, Source};
use crate::state::Shared;

pub mod dns;
pub mod docker;
pub mod managed;

/// What one source task was started from; a change restarts it.
#[derive(Debug, Clone, PartialEq)]
enum Spec {
    Dns(DnsDiscovery),
    Docker(DockerDiscovery),
    Managed(ManagedConfig),
}

struct Running {
    service: String,
    spec: Spec,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The running source tasks, kept in line with the running config by [`Sources::sync`].
pub struct Sources {
    handle: Handle,
    shared: Shared,
    /// By source name (`dns:web`).
    running: HashMap<String, Running>,
}

/// How long a stopping source may take before it is aborted.
const STOP_GRACE: Duration = Duration::from_secs(10);

impl Sources {
    pub fn new(handle: Handle, shared: Shared) -> Sources {
        Sources { handle, shared, running: HashMap::new() }
    }

    /// Start the sources `config` names that are not running, and stop the ones it no longer
    /// names (or names differently); a stopped source's backends are drained.
    pub fn sync(&mut self, config: &Config) {
        let mut wanted: Vec<(String, String, Spec)> = Vec::new();
        for s in &config.services {
            if let Some(d) = &s.discovery.dns {
                wanted.push((format!("dns:{}", s.name), s.name.clone(), Spec::Dns(d.clone())));
            }
            if let Some(d) = &s.discovery.docker {
                wanted.push((format!("docker:{}", s.name), s.name.clone(), Spec::Docker(d.clone())));
            }
            if let Some(m) = &s.managed {
                wanted.push((format!("managed:{}", s.name), s.name.clone(), Spec::Managed(m.clone())));
            }
        }
        let stale: Vec<String> = self
            .running
            .iter()
            .filter(|(name, r)| !wanted.iter().any(|(n, s, spec)| n == *name && *s == r.service && *spec == r.spec))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(r) = self.running.remove(&name) {
                info!(service = %r.service, "{name}: stopped (the config changed)");
                let _ = r.stop.send(true);
                let (handle, service) = (self.handle.clone(), r.service.clone());
                // A source that is gone has its backends drained like any other removal (the
                // service may be gone too: fine); one that restarts with new settings replaces
                // its set with its first answer instead. A managed source stops its processes
                // first.
                let gone = !wanted.iter().any(|(n, s, _)| *n == name && *s == service);
                tokio::spawn(async move {
                    let abort = r.task.abort_handle();
                    if tokio::time::timeout(STOP_GRACE, r.task).await.is_err() {
                        abort.abort();
                    }
                    if gone {
                        let change = Change::SetSourced { service, source: name, backends: Vec::new() };
                        let _ = handle.send(Source::Discovery, change).await;
                    }
                });
            }
        }
        for (name, service, spec) in wanted {
            if self.running.contains_key(&name) {
                continue;
            }
            let (stop, stopped) = watch::channel(false);
            let metrics = self.shared.load().metrics.clone();
            let task = match &spec {
                Spec::Dns(cfg) => tokio::spawn(dns::run(
                    service.clone(),
                    name.clone(),
                    cfg.clone(),
                    self.handle.clone(),
                    metrics,
                    stopped,
                )),
                Spec::Docker(cfg) => tokio::spawn(docker::run(
                    service.clone(),
                    name.clone(),
                    cfg.clone(),
                    self.handle.clone(),
                    self.shared.load().metrics.clone(),
                    stopped,
                )),
                Spec::Managed(cfg) => tokio::spawn(managed::run(
                    service.clone(),
                    name.clone(),
                    cfg.clone(),
                    self.handle.clone(),
                    self.shared.clone(),
                    stopped,
                )),
            };
            self.running.insert(name, Running { service, spec, stop, task });
        }
    }

    /// Stop every source (at shutdown, after the listeners drained): each is told to stop and
    /// waited for, up to a grace period.
    pub async fn stop(&mut self) {
        for r in self.running.values() {
            let _ = r.stop.send(true);
        }
        for (_, r) in self.running.drain() {
            let abort = r.task.abort_handle();
            if tokio::time::timeout(STOP_GRACE, r.task).await.is_err() {
                abort.abort();
            }
        }
    }
}
