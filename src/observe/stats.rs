//! The dashboard's data (`GET /api/v1/stats`): totals and histogram buckets read now from the
//! same atomics `/metrics` reads, and optionally the 10-minute history. The page computes
//! rates and percentiles from the differences between two reads, as Prometheus would.

use serde::Serialize;

use super::history::Sample;
use super::metrics::{Histogram, BUCKETS_US};
use crate::state::Snapshot;
use crate::upstream::Backend;

#[derive(Debug, Serialize)]
pub struct Stats {
    /// Unix time, milliseconds.
    pub time: u64,
    /// Upper bounds of the histogram buckets in seconds (the last bucket is everything above).
    pub buckets: Vec<f64>,
    pub services: Vec<ServiceStats>,
}

#[derive(Debug, Serialize)]
pub struct ServiceStats {
    pub name: String,
    pub requests: u64,
    /// 5xx answers, Velocity's own included.
    pub errors: u64,
    pub in_flight: usize,
    pub queue_depth: usize,
    /// Request durations, per bucket (not cumulative).
    pub latency: Vec<u64>,
    pub backends: Vec<BackendStats>,
    /// Present when asked for (`?history=1`): one sample a second, oldest first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<Vec<Sample>>,
}

#[derive(Debug, Serialize)]
pub struct BackendStats {
    pub address: String,
    /// `up`, `down` (active checks), `ejected` or `half-open` (passive detection).
    pub health: &'static str,
    /// `active`, `draining` or `disabled` (the admin API's state).
    pub admin: &'static str,
    /// The discovery source that owns it (`dns:web`); absent for the file's and the API's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub in_flight: usize,
    /// Tries: response heads received plus connection errors.
    pub requests: u64,
    /// 5xx responses plus connection errors.
    pub errors: u64,
    /// Time to the response head, per bucket (not cumulative).
    pub latency: Vec<u64>,
}

fn buckets(h: &Histogram) -> Vec<u64> {
    h.counts().to_vec()
}

pub fn health(b: &Backend) -> &'static str {
    if !b.health.is_up() {
        "down"
    } else if b.health.is_ejected() {
        if b.health.selectable() {
            "half-open"
        } else {
            "ejected"
        }
    } else {
        "up"
    }
}

pub fn read(snap: &Snapshot, with_history: bool) -> Stats {
    let time = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let services = snap
        .services
        .iter()
        .map(|s| {
            let lb = s.lb.load();
            let backends: Vec<BackendStats> = lb
                .pool
                .backends
                .iter()
                .map(|b| {
                    let m = &b.metrics;
                    let conn_errors = m.connection_errors.load(std::sync::atomic::Ordering::Relaxed);
                    let responses: u64 = (1..=5).map(|c| m.responses(c)).sum();
                    BackendStats {
                        address: b.name.clone(),
                        health: health(b),
                        admin: b.admin_state().name(),
                        source: b.source().map(|s| s.to_string()),
                        in_flight: b.in_flight(),
                        requests: responses + conn_errors,
                        errors: m.responses(5) + conn_errors,
                        latency: buckets(&m.response_time),
                    }
                })
                .collect();
            ServiceStats {
                name: s.config.name.clone(),
                requests: s.metrics.requests_total(),
                errors: s.metrics.requests_of_class(5),
                in_flight: backends.iter().map(|b| b.in_flight).sum(),
                queue_depth: s.queue.depth(),
                latency: buckets(&s.metrics.duration),
                backends,
                history: with_history.then(|| snap.metrics.history.series(&s.config.name)),
            }
        })
        .collect();
    Stats { time, buckets: BUCKETS_US.iter().map(|&us| us as f64 / 1e6).collect(), services }
}
