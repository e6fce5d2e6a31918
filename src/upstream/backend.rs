use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::header::HeaderValue;

use super::connection::{Idle, PooledConnection};
use crate::health::HealthState;

/// Idle keep-alive connections kept per backend. Beyond this, a finished connection is closed.
const MAX_IDLE_PER_BACKEND: usize = 512;
/// An idle connection older than this is not reused (the backend may be about to close it).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

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
    in_flight: AtomicUsize,
    requests: AtomicU64,
    connections_opened: AtomicU64,
    /// Idle connections, most recently used last. A per-backend lock held for a push or a pop:
    /// no lock is shared between backends, and none is held across an await.
    idle: Mutex<Vec<Idle>>,
}

impl Backend {
    pub fn new(name: String, addr: SocketAddr, authority: &str) -> Arc<Backend> {
        let host_header = HeaderValue::from_str(authority).unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Arc::new(Backend {
            name,
            addr,
            host_header,
            health: HealthState::default(),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            connections_opened: AtomicU64::new(0),
            idle: Mutex::new(Vec::new()),
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

    pub(super) fn note_connection_opened(&self) {
        self.connections_opened.fetch_add(1, Ordering::Relaxed);
    }

    /// Take a reusable idle connection, newest first (it is the least likely to have timed out).
    pub(super) fn take_idle(&self) -> Option<PooledConnection> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(conn) = idle.pop() {
            if conn.since.elapsed() < IDLE_TIMEOUT && !conn.sender.is_closed() {
                return Some(PooledConnection::reused(conn.sender));
            }
        }
        None
    }

    pub(super) fn put_idle(&self, conn: Idle) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() >= MAX_IDLE_PER_BACKEND {
            // Drop the oldest: it is the most likely to be closed by the backend soon.
            idle.remove(0);
        }
        idle.push(conn);
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
        self.backend.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
