//! The last 10 minutes of every service, sampled once a second, for the dashboard's charts:
//! a page opened now shows the past 10 minutes at once. Written by one task, read by the
//! dashboard; the request path never touches it.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::state::Shared;

/// Samples kept per service: 10 minutes at one a second.
pub const SAMPLES: usize = 600;
pub const INTERVAL: Duration = Duration::from_secs(1);

/// Totals at one moment; the dashboard charts the differences.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Sample {
    /// Unix time, milliseconds.
    pub t: u64,
    pub requests: u64,
    /// 5xx answers (Velocity's own included).
    pub errors: u64,
}

#[derive(Debug, Default)]
pub struct History {
    services: Mutex<HashMap<String, VecDeque<Sample>>>,
}

impl History {
    /// Take one sample of every service in the current config; forget services it dropped.
    pub fn sample(&self, services: impl Iterator<Item = (String, u64, u64)>) {
        let t = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let mut map = self.services.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen = Vec::new();
        for (name, requests, errors) in services {
            let series = map.entry(name.clone()).or_default();
            if series.len() == SAMPLES {
                series.pop_front();
            }
            series.push_back(Sample { t, requests, errors });
            seen.push(name);
        }
        map.retain(|name, _| seen.contains(name));
    }

    pub fn series(&self, service: &str) -> Vec<Sample> {
        let map = self.services.lock().unwrap_or_else(|p| p.into_inner());
        map.get(service).map(|s| s.iter().copied().collect()).unwrap_or_default()
    }
}

/// Sample every second for as long as the process runs.
pub fn spawn_sampler(state: Shared) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let snap = state.load_full();
            let totals = snap
                .services
                .iter()
                .map(|s| (s.config.name.clone(), s.metrics.requests_total(), s.metrics.requests_of_class(5)));
            snap.metrics.history.sample(totals);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_ten_minutes_and_forgets_removed_services() {
        let h = History::default();
        for i in 0..SAMPLES as u64 + 5 {
            h.sample([("web".to_string(), i, 0), ("api".to_string(), 1, 1)].into_iter());
        }
        let web = h.series("web");
        assert_eq!(web.len(), SAMPLES);
        assert_eq!(web[0].requests, 5);
        h.sample([("web".to_string(), 0, 0)].into_iter());
        assert!(h.series("api").is_empty());
    }
}
