use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use hyper::header::HeaderValue;

use super::connection::BackendConn;
use crate::health::HealthState;
use crate::observe::BackendMetrics;
use crate::policy::Queue;

/// Idle keep-alive connections kept per backend. Beyond this, a finished connection is closed.
pub(super) const MAX_IDLE_PER_BACKEND: usize = 512;
/// An idle connection older than this is not reused (the backend may be about to close it).
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// One backend server and everything the data plane knows about it.
#[derive(Debug)]
pub struct Backend {
    /// As written in the config; names the backend in logs.
    pub name: String,
    pub addr: SocketAddr,
    /// Host header for clients that sent none.
    pub host_header: HeaderValue,
    /// Up/down and circuit-breaker state; the rules that change it are in `crate::health`.
    pub health: HealthState,
    /// Response, latency, retry and ejection counters (read at scrape time).
    pub metrics: BackendMetrics,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    connections_opened: AtomicU64,
    /// Idle connections, most recently used at the back. A per-backend lock held for a push or a pop:
    /// no lock is shared between backends, and none is held across an await.
    pub(super) idle: Mutex<VecDeque<BackendConn>>,
    /// `max_connections` from the config (0: no limit); a reload may change it.
    max_in_flight: AtomicUsize,
    /// The queue of the service this backend belongs to, woken when a request here ends.
    queue: OnceLock<Arc<Queue>>,
}

impl Backend {
    pub fn new(name: String, addr: SocketAddr, authority: &str) -> Arc<Backend> {
        let host_header = HeaderValue::from_str(authority).unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Arc::new(Backend {
            name,
            addr,
            host_header,
            health: HealthState::default(),
            metrics: BackendMetrics::default(),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            connections_opened: AtomicU64::new(0),
            idle: Mutex::new(VecDeque::new()),
            max_in_flight: AtomicUsize::new(0),
            queue: OnceLock::new(),
        })
    }

    /// Requests currently being served by this backend (until their response body ends).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn requests_total(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn connections_opened(&self) -> u64 {
        self.connections_opened.load(Ordering::Relaxed)
    }

    /// Count a request as in flight until the returned guard is dropped.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlight { backend: self.clone() }
    }

    /// Set the in-flight limit (`None`: no limit) and the service queue to wake when a request
    /// ends. A backend carried over by a reload keeps its queue (the service's is carried too).
    pub fn set_limits(&self, max_connections: Option<usize>, queue: &Arc<Queue>) {
        self.max_in_flight.store(max_connections.unwrap_or(0), Ordering::Relaxed);
        let _ = self.queue.set(queue.clone());
    }

    /// Whether a request could start now without going over `max_connections`.
    pub fn has_capacity(&self) -> bool {
        let max = self.max_in_flight.load(Ordering::Relaxed);
        max == 0 || self.in_flight() < max
    }

    /// Like [`Backend::start_request`], but only within `max_connections`: the check and the
    /// count are one atomic step, so concurrent requests cannot overshoot the limit.
    pub fn try_start_request(self: &Arc<Self>) -> Option<InFlight> {
        let max = self.max_in_flight.load(Ordering::Relaxed);
        if max == 0 {
            return Some(self.start_request());
        }
        // SeqCst pairs with the queue depth: a request that queues after seeing this backend
        // full, and a request that ends here, cannot both miss each other.
        self.in_flight.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < max).then_some(n + 1)).ok()?;
        self.requests.fetch_add(1, Ordering::Relaxed);
        Some(InFlight { backend: self.clone() })
    }

    pub(super) fn note_connection_opened(&self) {
        self.connections_opened.fetch_add(1, Ordering::Relaxed);
    }

    /// Close every idle connection (used when a backend leaves the config or goes down).
    pub fn close_idle(&self) {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    pub fn idle_connections(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Keeps a request counted in [`Backend::in_flight`] until dropped.
#[derive(Debug)]
pub struct InFlight {
    backend: Arc<Backend>,
}

impl InFlight {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.backend.in_flight.fetch_sub(1, Ordering::SeqCst);
        if let Some(queue) = self.backend.queue.get() {
            // One atomic load when nobody waits.
            queue.wake_one();
        }
    }
}
