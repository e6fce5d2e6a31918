//! Traffic policies applied around the balancer: the per-service request queue, the client's
//! identity (`trusted_proxies`), allow/deny lists and rate limits.
//!
//! Everything here is built with a snapshot (from the config and the overlay's run-time deny
//! list) so that a request only reads: an address set lookup is a binary search, a rate limit
//! one sharded map entry. What is not configured is `None`, one branch per request.

pub mod client_ip;
pub mod ipset;
pub mod queue;
pub mod rate_limit;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

pub use ipset::IpSet;
pub use queue::{Queue, QueueRejection, Ticket};
pub use rate_limit::{Limited, Limiter, RateLimit};

use crate::config::{AccessRules, DenyAction, GlobalPolicy, ServicePolicy};
use crate::request::RequestView;
use crate::state::Shared;

/// Allow and deny sets of a listener or a service (deny includes the run-time deny list).
#[derive(Debug, Clone)]
pub struct Access {
    /// `None`: everyone not denied.
    allow: Option<Arc<IpSet>>,
    deny: Arc<IpSet>,
}

impl Access {
    /// `None` when there is no rule at all. `previous`: the last build's rules and sets, kept
    /// when unchanged (a 100,000-entry list is not sorted again for every API change).
    fn build(
        rules: &AccessRules,
        runtime: &[IpNet],
        previous: Option<(&AccessRules, &[IpNet], &Access)>,
    ) -> Option<Access> {
        if rules.is_empty() && runtime.is_empty() {
            return None;
        }
        if let Some((r, rt, a)) = previous {
            if r == rules && rt == runtime {
                return Some(a.clone());
            }
        }
        let allow = (!rules.allow.is_empty()).then(|| Arc::new(IpSet::new(&rules.allow)));
        let deny = Arc::new(IpSet::new(rules.deny.iter().chain(runtime)));
        Some(Access { allow, deny })
    }

    pub fn permits(&self, ip: IpAddr) -> bool {
        !self.deny.contains(ip) && self.allow.as_ref().is_none_or(|a| a.contains(ip))
    }
}

/// The top-level policy of a snapshot: who the client is, and the global run-time deny list
/// (which applies on every listener, beside each listener's own rules).
#[derive(Debug, Clone, Default)]
pub struct GlobalGate {
    trusted: Option<Arc<IpSet>>,
    access: Option<Access>,
}

impl GlobalGate {
    pub fn build(cfg: &GlobalPolicy, previous: Option<(&GlobalPolicy, &GlobalGate)>) -> GlobalGate {
        let trusted = match previous {
            Some((p, g)) if p.trusted_proxies == cfg.trusted_proxies => g.trusted.clone(),
            _ => (!cfg.trusted_proxies.is_empty()).then(|| Arc::new(IpSet::new(&cfg.trusted_proxies))),
        };
        let none = AccessRules::default();
        let prev_access = previous.and_then(|(p, g)| Some((&none, &p.runtime_deny[..], g.access.as_ref()?)));
        let access = Access::build(&none, &cfg.runtime_deny, prev_access);
        GlobalGate { trusted, access }
    }

    /// The client of a request from `peer`: the one value every policy, the hash balancers
    /// and the access log use. Without `trusted_proxies`, the peer (no header is looked at).
    #[inline]
    pub fn client_ip(&self, req: &RequestView<'_>) -> IpAddr {
        match &self.trusted {
            None => req.client_ip(),
            Some(t) => client_ip::resolve(t, req),
        }
    }

    /// Whether the global run-time deny list lets `client` in.
    #[inline]
    pub fn permits(&self, client: IpAddr) -> bool {
        self.access.as_ref().is_none_or(|a| a.permits(client))
    }
}

/// A listener's `allow`/`deny` (the top level's for the `listen:` shorthand), built with the
/// listener's settings: a connection keeps the rules it was accepted with, while the global
/// run-time list ([`GlobalGate`]) applies to every next request.
#[derive(Debug, Clone, Default)]
pub struct ListenerGate {
    access: Option<Access>,
    close_at_accept: bool,
}

impl ListenerGate {
    pub fn new(rules: &AccessRules, action: DenyAction) -> ListenerGate {
        ListenerGate { access: Access::build(rules, &[], None), close_at_accept: action == DenyAction::Close }
    }

    #[inline]
    pub fn permits(&self, client: IpAddr) -> bool {
        self.access.as_ref().is_none_or(|a| a.permits(client))
    }

    /// `deny_action: close`: whether a connection from `peer` is closed at accept (by this
    /// listener's rules or the global run-time list).
    pub fn closes_at_accept(&self, peer: IpAddr, global: &GlobalGate) -> bool {
        self.close_at_accept && !(self.permits(peer) && global.permits(peer))
    }
}

/// A service's checks, made before any backend work (no pool slot, no connect).
#[derive(Debug, Clone)]
pub struct ServiceGate {
    access: Option<Access>,
    limits: Vec<RateLimit>,
}

/// Why a service refused a request.
#[derive(Debug, Clone, Copy)]
pub enum Refusal {
    Denied,
    Limited(Limited),
}

impl ServiceGate {
    /// `None` when the service has no policy. Rate limit state and address sets carry over
    /// from `previous` where the rules are unchanged.
    pub fn build(
        cfg: &ServicePolicy,
        previous: Option<(&ServicePolicy, &ServiceGate)>,
        service: &str,
    ) -> Option<ServiceGate> {
        if cfg.is_empty() {
            return None;
        }
        let prev_access = previous.and_then(|(p, g)| Some((&p.access, &p.runtime_deny[..], g.access.as_ref()?)));
        let access = Access::build(&cfg.access, &cfg.runtime_deny, prev_access);
        let limits = cfg
            .rate_limits
            .iter()
            .enumerate()
            .map(|(i, l)| RateLimit::new(l, previous.and_then(|(_, g)| g.limits.get(i)), &format!("{service}:{i}")))
            .collect();
        Some(ServiceGate { access, limits })
    }

    /// `req`'s client is the resolved one.
    pub async fn check(&self, req: &RequestView<'_>) -> Result<(), Refusal> {
        if let Some(a) = &self.access {
            if !a.permits(req.client_ip()) {
                return Err(Refusal::Denied);
            }
        }
        for l in &self.limits {
            l.check(req).await.map_err(Refusal::Limited)?;
        }
        Ok(())
    }

    pub fn limiters(&self) -> impl Iterator<Item = &Arc<dyn Limiter>> {
        self.limits.iter().map(|l| &l.limiter)
    }
}

/// How often idle rate-limit keys are dropped.
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// A sweep that drops at least this many keys (a few MiB of map) hands the freed memory back
/// to the system: below it, collecting costs more than it returns.
const COLLECT_AFTER_EVICTING: usize = 50_000;

/// Drop idle rate-limit keys every [`SWEEP_EVERY`], on a blocking thread (a sweep of a
/// million keys takes a while, and must not hold up requests on the runtime's threads).
pub fn spawn_sweeper(state: Shared) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let limiters: Vec<Arc<dyn Limiter>> = state
                .load()
                .services
                .iter()
                .filter_map(|s| s.gate.as_ref())
                .flat_map(|g| g.limiters().cloned())
                .collect();
            if limiters.is_empty() {
                continue;
            }
            let _ = tokio::task::spawn_blocking(move || {
                let mut evicted = 0;
                for l in limiters {
                    let before = l.keys();
                    l.evict_idle();
                    evicted += before.saturating_sub(l.keys());
                }
                if evicted >= COLLECT_AFTER_EVICTING {
                    release_freed_memory();
                }
            })
            .await;
        }
    });
}

/// Give pages that are free back to the system now. mimalloc (the binary's allocator) keeps
/// freed pages for a while to reuse them, and only purges them when an allocation comes by
/// later: after a million keys are swept from an idle process that is never, and the
/// resident size stayed at twice what the live keys need (bench/ratelimit_memory.sh). A forced
/// collect purges every arena, whichever thread freed into it. Harmless when mimalloc is
/// not the global allocator (the tests): its heaps are then empty.
fn release_freed_memory() {
    // SAFETY: `mi_collect` takes no pointers and may be called from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}
