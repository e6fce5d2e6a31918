//! The snapshot the data plane reads: routes, services and their pools, built from a config.
//!
//! Requests load the current snapshot through `arc-swap` (no lock); the membership writer
//! (`crate::membership`) publishes a new one for every change. Backends are carried over by
//! (service, address), so a rebuild keeps their identity, health state, counters and pooled
//! connections. Health checkers are not part of a snapshot: they live in a registry keyed by
//! backend identity (`crate::health::registry`), so an old snapshot that requests still hold
//! checks nothing.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tracing::warn;

use crate::balancer::{self, Balancer};
use crate::config::{BackendProtocol, BackendTlsConfig, Config, ServiceConfig};
use crate::health::retry::RetryBudget;
use crate::observe::{AccessLog, Metrics, ServiceMetrics};
use crate::policy::{GlobalGate, Queue, ServiceGate};
use crate::proxy::router::Router;
use crate::upstream::{Backend, BackendTls, Pool};

pub type Shared = Arc<ArcSwap<Snapshot>>;

#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    pub router: Router,
    pub services: Vec<Arc<Service>>,
    pub access_log: Option<AccessLog>,
    /// Process-wide metrics, the same object in every snapshot.
    pub metrics: Arc<Metrics>,
    /// Who the client is (`trusted_proxies`) and the listener's allow/deny rules.
    pub policy: GlobalGate,
}

/// A service's pool and the balancer built for it, swapped as one.
#[derive(Debug)]
pub struct LoadBalancer {
    pub pool: Pool,
    pub balancer: Box<dyn Balancer>,
}

#[derive(Debug)]
pub struct Service {
    pub config: ServiceConfig,
    pub lb: ArcSwap<LoadBalancer>,
    /// Retries allowed as a share of this service's recent requests.
    pub retry_budget: RetryBudget,
    /// Requests waiting for a backend under `max_connections`; carried over by a reload so
    /// that waiting requests keep their place.
    pub queue: Arc<Queue>,
    /// Request counters, carried over by a reload like the queue.
    pub metrics: Arc<ServiceMetrics>,
    /// Allow/deny and rate limits; `None` when the service has none.
    pub gate: Option<ServiceGate>,
}

impl Service {
    fn new(config: ServiceConfig, previous: Option<&Service>) -> std::io::Result<Service> {
        let old = previous.map(|s| s.lb.load_full());
        let queue = previous.map_or_else(Arc::default, |s| s.queue.clone());
        let metrics = previous.map_or_else(|| ServiceMetrics::new(&config.name), |s| s.metrics.clone());
        let backends = config
            .backends
            .iter()
            .map(|b| {
                // The same address with other TLS settings is another backend: its pooled
                // connections were made with the old ones.
                let same = |x: &&Arc<Backend>| {
                    x.addr == b.addr
                        && x.tls.as_ref().map(|t| &t.config) == b.tls.as_ref()
                        && x.protocol == config.backend_protocol
                };
                let kept = old.as_ref().and_then(|lb| lb.pool.backends.iter().find(same).cloned());
                let backend = match kept {
                    Some(kept) => kept,
                    None => {
                        let protocol = config.backend_protocol;
                        let tls = b.tls.as_ref().map(|t| tls_for(&config.name, &b.address, t, protocol)).transpose()?;
                        let added = Backend::with_tls(b.address.clone(), b.addr, &b.authority, tls, protocol);
                        if old.is_some() {
                            // Joining a running service: slow start ramps it up.
                            added.load.mark_recovered();
                        }
                        added
                    }
                };
                backend.set_limits(b.max_connections, &queue);
                Ok((backend, b.weight))
            })
            .collect::<std::io::Result<_>>()?;
        let pool = Pool::new(backends);
        let balancer = balancer::build(&config, &pool);
        let retry_budget = RetryBudget::new(config.health.retry.budget_percent);
        let gate = ServiceGate::build(
            &config.policy,
            previous.and_then(|p| Some((&p.config.policy, p.gate.as_ref()?))),
            &config.name,
        );
        // Limits may have grown or backends been added: let waiting requests look again.
        queue.wake_all();
        let lb = ArcSwap::from_pointee(LoadBalancer { pool, balancer });
        Ok(Service { config, lb, retry_budget, queue, metrics, gate })
    }
}

/// The TLS connector of an https backend, built as the backend joins.
fn tls_for(
    service: &str,
    address: &str,
    t: &BackendTlsConfig,
    protocol: BackendProtocol,
) -> std::io::Result<Arc<BackendTls>> {
    if t.insecure_skip_verify {
        warn!(service, backend = address, "insecure_skip_verify: the backend's certificate is not verified");
    }
    BackendTls::new(t, protocol)
        .map_err(|e| std::io::Error::other(format!("backend {address} of service {service}: {e}")))
}

impl Snapshot {
    /// Build a snapshot, carrying backends (and the access log writer, when its target is
    /// unchanged) over from `previous`.
    pub fn build(config: Config, previous: Option<&Snapshot>) -> std::io::Result<Snapshot> {
        let metrics = previous.map_or_else(Arc::default, |p| p.metrics.clone());
        metrics.recent.set_capacity(config.access_log_ring);
        let access_log = match previous {
            Some(p) if p.config.access_log == config.access_log && p.config.log_format == config.log_format => {
                p.access_log.clone()
            }
            _ => {
                let log = AccessLog::start(&config.access_log, config.log_format, metrics.recent.clone())?;
                if let Some(old) = previous.and_then(|p| p.access_log.as_ref()) {
                    metrics.access_log_replaced(old.dropped());
                }
                log
            }
        };
        let services = config
            .services
            .iter()
            .map(|s| {
                let old = previous.and_then(|p| p.services.iter().find(|o| o.config.name == s.name));
                Service::new(s.clone(), old.map(|o| &**o)).map(Arc::new)
            })
            .collect::<std::io::Result<_>>()?;
        let policy = GlobalGate::build(&config.policy, previous.map(|p| (&p.config.policy, &p.policy)));
        let router = Router::without(&config.services, &config.tcp_services());
        Ok(Snapshot { router, services, access_log, metrics, policy, config: Arc::new(config) })
    }
}
