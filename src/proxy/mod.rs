//! HTTP listeners and the per-request path. A request flows:
//!
//! ```text
//! listener (this file: accept, limits, drain)
//!   -> downstream/   the client's session, one per protocol: h1.rs (HTTP/1.x), h2.rs (HTTP/2)
//!   -> core/         protocol-neutral: route, policy, pick, queue, retry, log record
//!   -> upstream/     one try at one backend: h1.rs (HTTP/1.1); the slot for HTTP/2 backends
//!   <- downstream/   the response streamed back by the session (`Downstream::relay`)
//! ```
//!
//! `tunnel.rs` (WebSocket after a `101`) and `tcp.rs` (`protocol: tcp` listeners) splice
//! bytes; `router.rs` maps host and path to a service.

mod core;
pub mod downstream;
mod listener;
pub mod router;
mod stream;
mod tcp;
mod timer;
pub mod tunnel;
mod upstream;

use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

use crate::config::ListenerProtocol;
use crate::observe::metrics::{ListenerGauge, Reject};
use crate::state::Shared;
use crate::upstream::is_local_exhaustion;
use downstream::h1;
use downstream::Drain;
pub use listener::ListenerSettings;
pub use stream::ClientStream;

/// The wait before accepting again after an accept failed for want of a descriptor (or
/// another non-transient reason): long enough not to spin, short enough to pick the backlog up
/// soon after connections close.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Counts open client connections (of every listener) so that shutdown can wait for them.
#[derive(Debug, Default)]
pub struct Tracker {
    open: AtomicUsize,
    /// Connections closed with a request in progress because `drain_timeout` passed.
    cut: AtomicUsize,
    closed: Notify,
}

impl Tracker {
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    pub fn cut(&self) -> usize {
        self.cut.load(Ordering::SeqCst)
    }

    /// Wait until no connection is open.
    pub async fn wait_idle(&self) {
        loop {
            let mut closed = pin!(self.closed.notified());
            closed.as_mut().enable();
            if self.open() == 0 {
                return;
            }
            closed.await;
        }
    }

    fn enter(self: &Arc<Self>) -> TrackGuard {
        self.open.fetch_add(1, Ordering::SeqCst);
        TrackGuard(self.clone())
    }
}

struct TrackGuard(Arc<Tracker>);

impl Drop for TrackGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.closed.notify_waiters();
        }
    }
}

/// `max_client_connections` of one listener: the accept loop waits while `open` is at `max`.
/// A counter rather than a semaphore so that a reload can lower the limit under load.
#[derive(Debug)]
struct ConnLimit {
    open: AtomicUsize,
    max: AtomicUsize,
    freed: Notify,
}

struct LimitGuard(Arc<ConnLimit>);

impl Drop for LimitGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
        self.0.freed.notify_one();
    }
}

impl ConnLimit {
    /// Wait for room, then count a connection. Only the accept loop calls this.
    async fn admit(self: &Arc<Self>, local: SocketAddr) -> LimitGuard {
        let mut warned = false;
        loop {
            let mut freed = pin!(self.freed.notified());
            freed.as_mut().enable();
            let max = self.max.load(Ordering::SeqCst);
            if self.open.load(Ordering::SeqCst) < max {
                self.open.fetch_add(1, Ordering::SeqCst);
                return LimitGuard(self.clone());
            }
            if !warned {
                warn!(listener = %local, max_client_connections = max, "connection limit reached: not accepting until a connection closes");
                warned = true;
            }
            freed.await;
        }
    }
}

/// A running listener: its accept loop and the switch that stops it.
pub struct Listener {
    /// The address as configured (`127.0.0.1:0` stays that, whatever port it got): a reload
    /// keeps the listener whose address is still configured.
    pub configured: SocketAddr,
    pub local: SocketAddr,
    /// Read at each accept: a reload swaps them (certificates, redirect, protocol) for new
    /// connections without touching open ones.
    settings: Arc<ArcSwap<ListenerSettings>>,
    /// Session ticket keys, kept across reloads so tickets issued before one still resume.
    pub ticketer: Arc<dyn rustls::server::ProducesTickets>,
    /// `Some(drain_timeout)` once the listener is told to stop.
    stop: watch::Sender<Option<Duration>>,
    limit: Arc<ConnLimit>,
    /// Keeps `velocity_client_connections_open{listener}` listed while the listener runs.
    _open: Arc<ListenerGauge>,
}

impl Listener {
    /// Start accepting on `listener`, bound to `settings.config.addr`.
    pub fn start(
        mut settings: ListenerSettings,
        ticketer: Arc<dyn rustls::server::ProducesTickets>,
        listener: TcpListener,
        state: Shared,
        tracker: Arc<Tracker>,
    ) -> Listener {
        let configured = settings.config.addr;
        let local = listener.local_addr().unwrap_or(configured);
        let max = settings.config.max_client_connections;
        let limit = Arc::new(ConnLimit { open: AtomicUsize::new(0), max: AtomicUsize::new(max), freed: Notify::new() });
        let (stop, stopped) = watch::channel(None);
        settings.stopped = Some(stopped.clone());
        let open = state.load().metrics.listener(local);
        let settings = Arc::new(ArcSwap::from_pointee(settings));
        let accept = Accept { listener, local, state, tracker, limit: limit.clone(), settings: settings.clone() };
        tokio::spawn(serve(accept, stopped, open.clone()));
        Listener { configured, local, settings, ticketer, stop, limit, _open: open }
    }

    pub fn settings(&self) -> Arc<ListenerSettings> {
        self.settings.load_full()
    }

    /// Apply reloaded settings: new connections get them, open ones keep theirs.
    pub fn update(&self, mut settings: ListenerSettings) {
        settings.stopped = Some(self.stop.subscribe());
        self.set_max_connections(settings.config.max_client_connections);
        self.settings.store(Arc::new(settings));
    }

    /// Apply a reloaded `max_client_connections`.
    fn set_max_connections(&self, max: usize) {
        if self.limit.max.swap(max, Ordering::SeqCst) != max {
            // A raised limit frees room at once.
            self.limit.freed.notify_one();
        }
    }

    /// Stop accepting (the socket closes) and let open connections finish within `drain`.
    pub fn stop(&self, drain: Duration) {
        self.stop.send_replace(Some(drain));
    }
}

/// What an accept loop needs.
struct Accept {
    listener: TcpListener,
    local: SocketAddr,
    state: Shared,
    tracker: Arc<Tracker>,
    limit: Arc<ConnLimit>,
    settings: Arc<ArcSwap<ListenerSettings>>,
}

async fn serve(accept: Accept, mut stopped: watch::Receiver<Option<Duration>>, open: Arc<ListenerGauge>) {
    let Accept { listener, local, state, tracker, limit, settings } = accept;
    // Failed accepts in the current out-of-descriptors episode (0: none): logged when it
    // starts and when it ends, not every 50 ms.
    let mut exhausted = 0u64;
    loop {
        let admitted = tokio::select! {
            g = limit.admit(local) => g,
            _ = stopped.wait_for(Option::is_some) => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stopped.wait_for(Option::is_some) => break,
        };
        let (stream, client) = match accepted {
            Ok(accepted) => accepted,
            // The client gave up while in the backlog: nothing to do.
            Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset) => continue,
            Err(e) => {
                // Out of file descriptors (EMFILE, ENFILE) or memory: the connection waits in
                // the backlog; back off instead of spinning, and say so once.
                if !is_local_exhaustion(&e) {
                    warn!(listener = %local, error = %e, "accept failed");
                } else if exhausted == 0 {
                    warn!(listener = %local, error = %e, "cannot accept: out of file descriptors; new connections wait in the backlog, retrying every 50ms");
                }
                exhausted += u64::from(is_local_exhaustion(&e));
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        if exhausted > 0 {
            info!(listener = %local, failed_accepts = exhausted, "accepting again: file descriptors are free");
            exhausted = 0;
        }
        if settings.load().gate.closes_at_accept(client.ip(), &state.load().policy) {
            // `deny_action: close`: not even a 403.
            debug!(listener = %local, %client, "denied client: connection closed at accept");
            state.load().metrics.unrouted.reject(Reject::Denied);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let tracked = (tracker.enter(), open.enter());
        let state = state.clone();
        let stopped = stopped.clone();
        let settings = settings.load_full();
        tokio::spawn(async move {
            serve_connection(stream, client, settings, state, stopped, &tracked.0 .0).await;
            drop((admitted, tracked));
        });
    }
    // Dropping the socket here refuses new connections while the open ones drain.
    debug!(listener = %local, "stopped accepting");
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    client: SocketAddr,
    settings: Arc<ListenerSettings>,
    state: Shared,
    mut stopped: watch::Receiver<Option<Duration>>,
    tracker: &Tracker,
) {
    if settings.config.protocol == ListenerProtocol::Tcp {
        // Boxed, like the PROXY header read below: inline, their state would be part of every
        // HTTP connection's task, idle ones included.
        return Box::pin(tcp::serve_connection(stream, client, settings, state, stopped, tracker)).await;
    }
    let mut stream = stream;
    let client = if settings.config.accept_proxy_protocol.is_empty() {
        client
    } else {
        let timeout = state.load().config.limits.timeouts.client_header;
        match Box::pin(tcp::proxy_in(&mut stream, client, &settings, timeout, true)).await {
            Some(addrs) => addrs.client,
            None => return,
        }
    };
    let drain = Drain::default();
    let mut conn = pin!(h1::serve(stream, client, settings, state, &drain));
    tokio::select! {
        biased;
        () = conn.as_mut() => {}
        drain_timeout = async { stopped.wait_for(Option::is_some).await.map(|d| d.unwrap_or_default()) } => {
            // Idle: close now. Busy: the response goes out with `Connection: close`.
            if drain.idle.load(Ordering::Relaxed) {
                return;
            }
            drain.draining.store(true, Ordering::Relaxed);
            // A closed channel means the listener is gone without a word: drain with no wait.
            let drain_timeout = drain_timeout.unwrap_or_default();
            if tokio::time::timeout(drain_timeout, conn.as_mut()).await.is_err() {
                tracker.cut.fetch_add(1, Ordering::SeqCst);
                // The request's access-log line is written as its future is dropped, with note
                // `shutdown`.
                warn!(%client, "drain_timeout passed with a request still in progress: closing the connection");
            }
        }
    }
}
