//! DNS discovery: resolve a service's name (A, AAAA or SRV) every `refresh`, or at the
//! answer's TTL when that is shorter, and give the membership writer the set. A failed or
//! empty answer keeps the last good set (logged and counted): a DNS outage must not empty a
//! pool that is serving (haproxy#1295).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::{Resolver, TokioResolver};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{DnsDiscovery, DnsKind, MAX_WEIGHT};
use crate::membership::{Change, Handle, Source};
use crate::observe::Metrics;

/// Never sooner than this, whatever the TTL (a TTL of 0 would spin).
const MIN_REFRESH: Duration = Duration::from_secs(1);
/// Per query, so that one slow server does not hold the refresh past its period.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// The set an answer gave, and its smallest TTL.
type Answer = (Vec<(String, u32)>, Option<Duration>);

pub async fn run(
    service: String,
    source: String,
    cfg: DnsDiscovery,
    handle: Handle,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let resolver = match build(&cfg) {
        Ok(r) => r,
        Err(e) => {
            warn!(service = %service, "{source}: cannot set up the resolver: {e}; no DNS discovery for this service");
            metrics.discovery.error(&service, &source);
            return;
        }
    };
    info!(service = %service, "{source}: resolving {} {} every {:?}", cfg.kind.name(), cfg.name, cfg.refresh);
    let mut last_good: Option<Vec<(String, u32)>> = None;
    loop {
        let wait = match resolve(&resolver, &cfg).await {
            Ok((set, ttl)) if !set.is_empty() => {
                let mut sorted = set.clone();
                sorted.sort();
                if last_good.as_ref() != Some(&sorted) {
                    let change = Change::SetSourced { service: service.clone(), source: source.clone(), backends: set };
                    match handle.send(Source::Discovery, change).await {
                        Ok(_) => last_good = Some(sorted),
                        Err(e) if e.is_shutdown() => {}
                        Err(e) => {
                            warn!(service = %service, "{source}: the set was refused: {}", e.message);
                            metrics.discovery.error(&service, &source);
                        }
                    }
                }
                ttl.map_or(cfg.refresh, |t| t.min(cfg.refresh))
            }
            outcome => {
                let why = match outcome {
                    Err(e) => e,
                    Ok(_) => "the answer has no records".to_owned(),
                };
                let kept = last_good.as_ref().map_or(0, Vec::len);
                warn!(
                    service = %service,
                    "{source}: {} {} failed: {why}; keeping the last good set ({kept} backend(s))",
                    cfg.kind.name(),
                    cfg.name
                );
                metrics.discovery.error(&service, &source);
                cfg.refresh
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait.max(MIN_REFRESH)) => {}
            _ = stop.changed() => return,
        }
    }
}

fn build(cfg: &DnsDiscovery) -> Result<TokioResolver, String> {
    let provider = TokioRuntimeProvider::default();
    let mut builder = match cfg.resolver {
        Some(addr) => {
            let mut server = NameServerConfig::udp_and_tcp(addr.ip());
            for c in &mut server.connections {
                c.port = addr.port();
            }
            Resolver::builder_with_config(ResolverConfig::from_name_servers(vec![server]), provider)
        }
        None => Resolver::builder(provider).map_err(|e| format!("reading the system's DNS config: {e}"))?,
    };
    let options = builder.options_mut();
    // Every refresh asks the server: the point is to see changes (the refresh already follows
    // the TTL, so a cache would only hide them).
    options.cache_size = 0;
    options.timeout = QUERY_TIMEOUT;
    options.attempts = 1;
    builder.build().map_err(|e| e.to_string())
}

async fn resolve(resolver: &TokioResolver, cfg: &DnsDiscovery) -> Result<Answer, String> {
    let kind = match cfg.kind {
        DnsKind::A => RecordType::A,
        DnsKind::Aaaa => RecordType::AAAA,
        DnsKind::Srv => RecordType::SRV,
    };
    let lookup = resolver.lookup(cfg.name.as_str(), kind).await.map_err(|e| e.to_string())?;
    let ttl = lookup.answers().iter().map(|r| r.ttl).min().map(|t| Duration::from_secs(u64::from(t)));
    let mut set = Vec::new();
    if cfg.kind != DnsKind::Srv {
        for r in lookup.answers() {
            let ip: IpAddr = match &r.data {
                RData::A(a) => a.0.into(),
                RData::AAAA(a) => a.0.into(),
                _ => continue,
            };
            set.push((SocketAddr::new(ip, cfg.port).to_string(), 1));
        }
        return Ok((set, ttl));
    }
    let srvs: Vec<_> = lookup
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    // The lowest priority is the one to use; higher ones are backups (RFC 2782), which a
    // pool without tiers has no place for.
    let Some(best) = srvs.iter().map(|s| s.priority).min() else { return Ok((set, ttl)) };
    for s in srvs.iter().filter(|s| s.priority == best) {
        // Weight 0 means "rarely" in RFC 2782; a backend needs at least 1.
        let weight = u32::from(s.weight).clamp(1, MAX_WEIGHT as u32);
        // The additional section usually carries the targets' addresses; else look them up.
        let mut ips: Vec<IpAddr> = lookup
            .additionals()
            .iter()
            .filter(|r| r.name == s.target)
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0.into()),
                RData::AAAA(a) => Some(a.0.into()),
                _ => None,
            })
            .collect();
        if ips.is_empty() {
            match resolver.lookup_ip(s.target.clone()).await {
                Ok(found) => ips.extend(found.iter()),
                Err(e) => return Err(format!("SRV target {}: {e}", s.target)),
            }
        }
        for ip in ips {
            set.push((SocketAddr::new(ip, s.port).to_string(), weight));
        }
    }
    Ok((set, ttl))
}
