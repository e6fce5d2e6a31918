use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use hyper::header::HeaderValue;

use super::connection::BackendConn;
use super::h2::H2Pool;
use super::stream::BackendTls;
use crate::balancer::LoadStats;
use crate::config::BackendProtocol;
use crate::health::HealthState;
use crate::observe::BackendMetrics;
use crate::policy::Queue;

/// Idle keep-alive connections kept per backend. Beyond this, a finished connection is closed.
pub(crate) const MAX_IDLE_PER_BACKEND: usize = 512;
/// An idle connection older than this is not reused (the backend may be about to close it).
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// What an operator (or another source of change) decided for a backend, beside its health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    Active,
    /// No new requests and no keep-alive reuse; removed once its in-flight requests finish.
    Draining,
    /// Kept and health-checked, but takes no traffic.
    Disabled,
}

impl AdminState {
    pub fn name(self) -> &'static str {
        match self {
            AdminState::Active => "active",
            AdminState::Draining => "draining",
            AdminState::Disabled => "disabled",
        }
    }

    fn from_u8(v: u8) -> AdminState {
        match v {
            1 => AdminState::Draining,
            2 => AdminState::Disabled,
            _ => AdminState::Active,
        }
    }
}

/// The last active health check of a backend, for the admin API.
#[derive(Debug, Clone)]
pub struct LastCheck {
    pub at: SystemTime,
    pub passed: bool,
    /// What passed (`status 200`) or why it failed (`connection refused`).
    pub reason: String,
}

/// Identities are never reused within a process: a backend removed and added again is a new one.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// One backend server and everything the data plane knows about it.
#[derive(Debug)]
pub struct Backend {
    /// Stable for as long as this backend exists: reloads and admin changes carry the same
    /// `Arc<Backend>` over, so the identity (and the health-checker keyed by it) goes with it.
    pub id: u64,
    /// As written in the config; names the backend in logs.
    pub name: String,
    pub addr: SocketAddr,
    /// Host header for clients that sent none.
    pub host_header: HeaderValue,
    /// `https://` backends: how to connect over TLS.
    pub tls: Option<Arc<BackendTls>>,
    /// The service's `backend_protocol`; a reload that changes it makes a new backend.
    pub protocol: BackendProtocol,
    /// HTTP/2 backends: their multiplexed connections (empty for HTTP/1.1 ones).
    pub h2: H2Pool,
    /// Up/down and circuit-breaker state; the rules that change it are in `crate::health`.
    pub health: HealthState,
    /// Latency estimate and slow-start mark, for the load-aware algorithms.
    pub load: LoadStats,
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
    /// [`AdminState`] as a byte: one relaxed load per pick.
    admin: AtomicU8,
    /// Written by its health checker once per check; read by the admin API.
    last_check: Mutex<Option<LastCheck>>,
    /// The discovery source that owns it (`dns:web`), for the dashboard; set by the writer,
    /// never read on the request path.
    source: Mutex<Option<Arc<str>>>,
}

impl Backend {
    pub fn new(name: String, addr: SocketAddr, authority: &str) -> Arc<Backend> {
        Self::with_tls(name, addr, authority, None, BackendProtocol::Http1)
    }

    pub fn with_tls(
        name: String,
        addr: SocketAddr,
        authority: &str,
        tls: Option<Arc<BackendTls>>,
        protocol: BackendProtocol,
    ) -> Arc<Backend> {
        let host_header = HeaderValue::from_str(authority).unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Arc::new(Backend {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            name,
            addr,
            host_header,
            tls,
            protocol,
            h2: H2Pool::default(),
            health: HealthState::default(),
            load: LoadStats::default(),
            metrics: BackendMetrics::default(),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            connections_opened: AtomicU64::new(0),
            idle: Mutex::new(VecDeque::new()),
            max_in_flight: AtomicUsize::new(0),
            queue: OnceLock::new(),
            admin: AtomicU8::new(0),
            last_check: Mutex::new(None),
            source: Mutex::new(None),
        })
    }

    /// Set by the membership writer on every publish.
    pub fn set_source(&self, source: Option<&str>) {
        let mut cur = self.source.lock().unwrap_or_else(|p| p.into_inner());
        if cur.as_deref() != source {
            *cur = source.map(Arc::from);
        }
    }

    pub fn source(&self) -> Option<Arc<str>> {
        self.source.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether new requests may go here (the admin state; health is checked apart).
    pub fn is_active(&self) -> bool {
        self.admin.load(Ordering::Relaxed) == 0
    }

    pub fn admin_state(&self) -> AdminState {
        AdminState::from_u8(self.admin.load(Ordering::Relaxed))
    }

    /// Set by the membership writer only. Leaving `active` closes the idle connections: a
    /// draining or disabled backend takes no new request, so they would only linger.
    pub fn set_admin_state(&self, state: AdminState) {
        let v = match state {
            AdminState::Active => 0,
            AdminState::Draining => 1,
            AdminState::Disabled => 2,
        };
        if self.admin.swap(v, Ordering::Relaxed) != v && v != 0 {
            self.close_idle();
        }
    }

    pub fn note_check(&self, passed: bool, reason: &str) {
        let check = LastCheck { at: SystemTime::now(), passed, reason: reason.to_owned() };
        *self.last_check.lock().unwrap_or_else(|p| p.into_inner()) = Some(check);
    }

    pub fn last_check(&self) -> Option<LastCheck> {
        self.last_check.lock().unwrap_or_else(|p| p.into_inner()).clone()
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
        // HTTP/2 connections are shared by requests: dropping the handles lets each one
        // close as its streams end.
        self.h2.clear();
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
