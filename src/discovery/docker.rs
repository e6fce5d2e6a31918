//! Docker discovery: running containers that carry the configured labels are the service's
//! backends (source `docker:web`). A full list on start and on every reconnect, then the
//! engine's event stream: each start, die, stop, kill or health_status event of a matching
//! container lists them again. A container with a Docker health check takes traffic only while
//! `healthy`; one being stopped (its `kill`/`stop` event, while Docker waits for it to exit) is
//! left out at once, so it drains during the stop's grace period rather than being cut.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bollard::models::ContainerSummary;
use bollard::query_parameters::{EventsOptions, ListContainersOptions};
use bollard::Docker;
use futures_util::StreamExt;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::DockerDiscovery;
use crate::membership::{Change, Handle, Source};
use crate::observe::Metrics;

/// The label that overrides `port` per container.
pub const PORT_LABEL: &str = "velocity.port";
const RECONNECT: Duration = Duration::from_secs(1);
const TIMEOUT_SECS: u64 = 30;

pub async fn run(
    service: String,
    source: String,
    cfg: DockerDiscovery,
    handle: Handle,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let mut w = Watcher { service, source, cfg, handle, metrics, last: None, stopping: HashSet::new() };
    info!(service = %w.service, "{}: watching containers labelled {:?} on {}", w.source, w.cfg.labels, w.cfg.socket);
    // An engine that stays away is said once (and counted every time), not every second.
    let mut last_reason = String::new();
    loop {
        tokio::select! {
            reason = w.session() => {
                if reason != last_reason {
                    warn!(service = %w.service, "{}: {reason}; keeping the last good set, reconnecting every {RECONNECT:?}", w.source);
                    last_reason = reason;
                }
                w.metrics.discovery.error(&w.service, &w.source);
            }
            _ = stop.changed() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(RECONNECT) => {}
            _ = stop.changed() => return,
        }
    }
}

struct Watcher {
    service: String,
    source: String,
    cfg: DockerDiscovery,
    handle: Handle,
    metrics: Arc<Metrics>,
    /// The set last given to the writer.
    last: Option<Vec<(String, u32)>>,
    /// Containers with a kill/stop event that still show as running.
    stopping: HashSet<String>,
}

impl Watcher {
    fn filters(&self) -> HashMap<String, Vec<String>> {
        let labels = self.cfg.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        HashMap::from([("label".to_owned(), labels)])
    }

    /// Connect, list, then follow events until something fails; the failure is returned.
    async fn session(&mut self) -> String {
        let docker = match Docker::connect_with_unix(&self.cfg.socket, TIMEOUT_SECS, bollard::API_DEFAULT_VERSION) {
            Ok(d) => d,
            Err(e) => return format!("cannot connect to {}: {e}", self.cfg.socket),
        };
        // The engine may be older than the client's default API version.
        let docker = match docker.negotiate_version().await {
            Ok(d) => d,
            Err(e) => return format!("{}: {e}", self.cfg.socket),
        };
        let mut filters = self.filters();
        filters.insert("type".into(), vec!["container".into()]);
        filters.insert(
            "event".into(),
            ["start", "die", "stop", "kill", "health_status", "pause", "unpause"].map(String::from).to_vec(),
        );
        // Subscribed before the list, so that nothing between the two is missed.
        let mut events = docker.events(Some(EventsOptions { filters: Some(filters), ..Default::default() }));
        self.stopping.clear();
        if let Err(e) = self.refresh(&docker).await {
            return e;
        }
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(e) => e,
                Err(e) => return format!("event stream: {e}"),
            };
            let action = event.action.unwrap_or_default();
            let id = event.actor.and_then(|a| a.id).unwrap_or_default();
            match action.as_str() {
                "kill" | "stop" => {
                    self.stopping.insert(id);
                }
                "start" | "die" => {
                    self.stopping.remove(&id);
                }
                _ => {}
            }
            if let Err(e) = self.refresh(&docker).await {
                return e;
            }
        }
        "the event stream ended".to_owned()
    }

    async fn refresh(&mut self, docker: &Docker) -> Result<(), String> {
        let options = ListContainersOptions { filters: Some(self.filters()), ..Default::default() };
        let list = docker.list_containers(Some(options)).await.map_err(|e| format!("listing containers: {e}"))?;
        let mut set = Vec::new();
        for c in &list {
            if c.id.as_ref().is_some_and(|id| self.stopping.contains(id)) {
                continue;
            }
            match address(c, &self.cfg) {
                Ok(Some(addr)) => set.push((addr.to_string(), 1)),
                Ok(None) => {}
                Err(why) => warn!(service = %self.service, "{}: container {}: {why}; not used", self.source, name(c)),
            }
        }
        set.sort();
        if self.last.as_ref() == Some(&set) {
            return Ok(());
        }
        let change =
            Change::SetSourced { service: self.service.clone(), source: self.source.clone(), backends: set.clone() };
        match self.handle.send(Source::Discovery, change).await {
            Ok(_) => self.last = Some(set),
            Err(e) if e.is_shutdown() => {}
            Err(e) => {
                warn!(service = %self.service, "{}: the set was refused: {}", self.source, e.message);
                self.metrics.discovery.error(&self.service, &self.source);
            }
        }
        Ok(())
    }
}

fn name(c: &ContainerSummary) -> String {
    c.names
        .as_ref()
        .and_then(|n| n.first())
        .map(|n| n.trim_start_matches('/').to_owned())
        .or_else(|| c.id.as_ref().map(|id| id.chars().take(12).collect()))
        .unwrap_or_default()
}

/// Whether a running container takes traffic, from its status text (`Up 5 seconds (healthy)`;
/// older engines have no health field in the list): without a health check always, with one
/// only while healthy.
pub fn takes_traffic(status: &str) -> bool {
    if status.contains("(unhealthy)") || status.contains("(health: starting)") || status.contains("(Paused)") {
        return false;
    }
    status.starts_with("Up")
}

/// The container's address on the configured network (else its first), with the port from
/// its `velocity.port` label or the config. `Ok(None)`: not taking traffic now.
fn address(c: &ContainerSummary, cfg: &DockerDiscovery) -> Result<Option<SocketAddr>, String> {
    if !takes_traffic(c.status.as_deref().unwrap_or("")) {
        return Ok(None);
    }
    let port = match c.labels.as_ref().and_then(|l| l.get(PORT_LABEL)) {
        Some(p) => {
            p.trim().parse::<u16>().ok().filter(|p| *p > 0).ok_or(format!("label {PORT_LABEL}={p:?} is not a port"))?
        }
        None => cfg.port.ok_or(format!("no port: set discovery.docker.port or the label {PORT_LABEL}"))?,
    };
    let networks = c.network_settings.as_ref().and_then(|n| n.networks.as_ref());
    let endpoint = match (&cfg.network, networks) {
        (Some(want), Some(n)) => n.get(want).ok_or(format!("not on network {want:?}"))?,
        (None, Some(n)) => {
            // The first by name, so the choice is stable.
            let mut names: Vec<&String> = n.keys().collect();
            names.sort();
            names.first().and_then(|k| n.get(*k)).ok_or("on no network")?
        }
        (_, None) => return Err("on no network".into()),
    };
    let ip = endpoint.ip_address.as_deref().unwrap_or("");
    let ip: IpAddr = ip.parse().map_err(|_| format!("no address on its network (got {ip:?})"))?;
    Ok(Some(SocketAddr::new(ip, port)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_status_decides() {
        assert!(takes_traffic("Up 3 seconds"));
        assert!(takes_traffic("Up 2 minutes (healthy)"));
        assert!(!takes_traffic("Up 2 minutes (unhealthy)"));
        assert!(!takes_traffic("Up 1 second (health: starting)"));
        assert!(!takes_traffic("Up 1 second (Paused)"));
        assert!(!takes_traffic("Exited (0) 3 seconds ago"));
    }

    #[test]
    fn address_from_network_and_port_label() {
        let c: ContainerSummary = serde_json::from_value(serde_json::json!({
            "Id": "abc", "Names": ["/web-1"], "Status": "Up 1 second",
            "Labels": {"velocity.service": "web", "velocity.port": "9000"},
            "NetworkSettings": {"Networks": {"bridge": {"IPAddress": "172.17.0.2"}, "other": {"IPAddress": "10.0.0.2"}}}
        }))
        .unwrap();
        let cfg = DockerDiscovery {
            socket: "/var/run/docker.sock".into(),
            labels: Default::default(),
            port: Some(8080),
            network: Some("other".into()),
        };
        assert_eq!(address(&c, &cfg).unwrap(), Some("10.0.0.2:9000".parse().unwrap()));
        let cfg = DockerDiscovery { network: None, ..cfg };
        assert_eq!(address(&c, &cfg).unwrap(), Some("172.17.0.2:9000".parse().unwrap()));
        let cfg = DockerDiscovery { network: Some("none".into()), ..cfg };
        assert!(address(&c, &cfg).unwrap_err().contains("not on network"));
    }
}
