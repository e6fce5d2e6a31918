//! TCP (L4) mode: a `protocol: tcp` listener hands each connection whole to a backend of its
//! `service`, picked by the service's balancer, and splices the two (`tunnel.rs`). Also the
//! PROXY protocol on the way in (`accept_proxy_protocol`, any listener) and out
//! (`proxy_protocol`, tcp listeners).
//!
//! A connection picks its backend once, at connect: the balancer gets the client's address
//! and an empty request head (there is no HTTP), so round robin, weighted, least connections,
//! `ip_hash`, `random`, `p2c` and peak EWMA work as they do for requests; the algorithms that
//! hash a path or a header see none (a constant path, no header) and sticky sees no cookie.

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::Method;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::listener::ListenerSettings;
use super::tunnel::{splice_guarded, Spliced, TunnelEnd};
use super::Tracker;
use crate::balancer::RequestContext;
use crate::config::ProxyProtocolVersion;
use crate::health::passive::{self, Admission};
use crate::http1::RequestHead;
use crate::observe::{AccessLog, AccessRecord, BackendMetrics, TcpFailure};
use crate::proxy_protocol::{self as pp, Header, Parsed};
use crate::request::{Protocol, Scheme};
use crate::state::{Service, Shared};
use crate::upstream::{Backend, BackendStream, ConnectError, InFlight};

/// The addresses a connection is from and to: the socket's own, or those a trusted peer's
/// PROXY header carried.
#[derive(Debug, Clone, Copy)]
pub struct Addresses {
    pub client: SocketAddr,
    pub local: SocketAddr,
}

/// Apply the listener's `accept_proxy_protocol` to a new connection: from a listed peer read
/// its header (a missing or malformed one closes the connection); from any other peer, make
/// sure the connection does not start with one. `None`: the connection must close.
///
/// Only the header's bytes are consumed (it is peeked at first), so what follows, an HTTP
/// request or a TLS hello, is read by the listener's usual path. `peek_untrusted: false`
/// leaves other peers' bytes alone (a tcp listener checks them in the stream instead, as its
/// server may speak first).
pub async fn proxy_in(
    stream: &mut TcpStream,
    peer: SocketAddr,
    settings: &ListenerSettings,
    timeout: Duration,
    peek_untrusted: bool,
) -> Option<Addresses> {
    let local = stream.local_addr().unwrap_or(settings.config.addr);
    let own = Addresses { client: peer, local };
    let trusted = &settings.config.accept_proxy_protocol;
    if trusted.is_empty() {
        return Some(own);
    }
    let listener = &settings.config.name;
    let from_trusted = trusted.iter().any(|net| net.contains(&peer.ip()));
    if !from_trusted && !peek_untrusted {
        return Some(own);
    }
    match tokio::time::timeout(timeout, peek_header(stream)).await {
        Err(_) if from_trusted => {
            info!(%peer, %listener, ?timeout, "no PROXY protocol header in time from a trusted peer: closing");
            None
        }
        // An untrusted peer that sends nothing for long (or first waits for the server) goes
        // through the usual path; only a header is refused.
        Err(_) => Some(own),
        Ok(Err(e)) if from_trusted => {
            info!(%peer, %listener, error = %e, "PROXY protocol error from a trusted peer: closing");
            None
        }
        Ok(Err(_)) => Some(own),
        Ok(Ok(_)) if !from_trusted => {
            warn!(%peer, %listener, "PROXY protocol header from a peer not in accept_proxy_protocol: closing");
            None
        }
        Ok(Ok((header, len))) => {
            // Consume exactly the header.
            let mut skip = vec![0u8; len];
            if tokio::io::AsyncReadExt::read_exact(stream, &mut skip).await.is_err() {
                return None;
            }
            match header {
                Header::Proxy { source, destination } => Some(Addresses { client: source, local: destination }),
                Header::Local => Some(own),
            }
        }
    }
}

/// Peek at the connection's first bytes until they are a whole PROXY header (its length) or
/// cannot be one. Nothing is consumed.
async fn peek_header(stream: &TcpStream) -> Result<(Header, usize), pp::ReadError> {
    let mut buf = vec![0u8; pp::MAX_HEADER];
    let mut seen = 0;
    loop {
        let n = stream.peek(&mut buf).await.map_err(pp::ReadError::Io)?;
        if n == 0 {
            return Err(pp::ReadError::Closed);
        }
        match pp::parse(&buf[..n]) {
            Ok(Parsed::Done(header, len)) => return Ok((header, len)),
            Err(e) => return Err(pp::ReadError::Protocol(e)),
            Ok(Parsed::Incomplete) if n == buf.len() => {
                return Err(pp::ReadError::Protocol(pp::Error::Invalid("header too long")))
            }
            Ok(Parsed::Incomplete) => {
                // Peeking again returns at once with the same bytes: wait a moment for more
                // (a header split over packets is rare; the caller bounds the whole wait).
                if n == seen {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                seen = n;
            }
        }
    }
}

/// Serve one connection of a tcp listener until it ends or, once the listener stops, until
/// `drain_timeout` passes.
pub async fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    settings: Arc<ListenerSettings>,
    state: Shared,
    mut stopped: watch::Receiver<Option<Duration>>,
    tracker: &Tracker,
) {
    let mut conn = pin!(serve(&mut stream, peer, &settings, &state));
    tokio::select! {
        biased;
        () = conn.as_mut() => {}
        drain_timeout = async { stopped.wait_for(Option::is_some).await.map(|d| d.unwrap_or_default()) } => {
            let drain_timeout = drain_timeout.unwrap_or_default();
            if tokio::time::timeout(drain_timeout, conn.as_mut()).await.is_err() {
                tracker.cut.fetch_add(1, Ordering::SeqCst);
                warn!(client = %peer, listener = %settings.config.name, "drain_timeout passed with a tcp connection open: closing it");
            }
        }
    }
}

async fn serve(stream: &mut TcpStream, peer: SocketAddr, settings: &ListenerSettings, state: &Shared) {
    let snapshot = state.load_full();
    let listener = &settings.config.name;
    let Some(name) = settings.config.service.as_deref() else { return };
    let Some(service) = snapshot.services.iter().find(|s| s.config.name == name).cloned() else {
        // Validation ties a tcp listener to a service; a config without it is not loaded.
        warn!(%listener, service = name, "tcp listener's service is not in the config: closing");
        return;
    };
    let timeouts = service.config.limits.timeouts;
    let _active = service.metrics.tcp_accepted();
    let Some(addrs) = proxy_in(stream, peer, settings, snapshot.config.limits.timeouts.client_header, false).await
    else {
        return;
    };
    let guard = !settings.config.accept_proxy_protocol.is_empty()
        && !settings.config.accept_proxy_protocol.iter().any(|n| n.contains(&peer.ip()));
    let mut line = TcpLine::new(snapshot.access_log.as_ref(), addrs.client, listener, &service);
    let (mut backend_stream, in_flight) = match connect(&service, addrs.client, timeouts.connect).await {
        Ok(connected) => connected,
        Err(failure) => {
            service.metrics.tcp_failed(failure);
            line.note = Some(failure.label());
            return;
        }
    };
    let backend = in_flight.backend().clone();
    line.set_backend(&backend);
    let header = match settings.config.proxy_protocol {
        None => None,
        Some(ProxyProtocolVersion::V1) => Some(pp::encode_v1(addrs.client, addrs.local)),
        Some(ProxyProtocolVersion::V2) => Some(pp::encode_v2(addrs.client, addrs.local)),
    };
    if let Some(h) = header {
        // Flushed: a TLS backend connection holds records until then, and a server that
        // speaks first waits for the header.
        let sent = async {
            backend_stream.write_all(&h).await?;
            backend_stream.flush().await
        };
        if let Err(e) = sent.await {
            warn!(backend = %backend.name, error = %e, "sending the PROXY protocol header failed");
            service.metrics.tcp_failed(TcpFailure::BackendError);
            line.note = Some(TcpFailure::BackendError.label());
            return;
        }
    }
    backend.metrics.tcp.connections.fetch_add(1, Ordering::Relaxed);
    let meters = [&service.metrics.tcp, &backend.metrics.tcp];
    let spliced = splice_guarded(stream, &[], &mut backend_stream, &[], timeouts.tunnel_idle, guard, &meters).await;
    debug!(client = %addrs.client, backend = %backend.name, up = spliced.up, down = spliced.down, end = ?spliced.end, "tcp connection closed");
    if let TunnelEnd::Failed(e) = &spliced.end {
        if e.kind() == std::io::ErrorKind::InvalidData {
            warn!(%peer, %listener, "PROXY protocol header from a peer not in accept_proxy_protocol: closing");
        }
    }
    line.done(&spliced);
    drop(in_flight);
}

/// Pick a backend and connect to it; on a failed connect, the next one (the service's
/// `retry.attempts` more at most), each failure counted for passive detection.
async fn connect(
    service: &Service,
    client: SocketAddr,
    connect_timeout: Duration,
) -> Result<(BackendStream, InFlight), TcpFailure> {
    let lb = service.lb.load_full();
    let pool = &lb.pool;
    let name = &service.config.name;
    let passive_cfg = &service.config.health.passive;
    // No HTTP: an empty head (no path, no header).
    let head = RequestHead::default();
    let ctx = RequestContext::new(&head, Scheme::Http, Protocol::Tcp, client);
    let mut tried = vec![false; pool.len()];
    let mut attempted = false;
    for _ in 0..=service.config.health.retry.attempts {
        let usable = |i: usize| {
            let b = &pool.backends[i];
            !tried[i] && b.is_active() && b.health.selectable() && b.has_capacity()
        };
        let Some(pick) = lb.balancer.pick(pool, &ctx, &usable) else { break };
        let i = pick.index;
        tried[i] = true;
        let backend: &Arc<Backend> = &pool.backends[i];
        let trial = match passive::admit(backend) {
            Admission::Normal => None,
            Admission::Trial(t) => Some(t),
            Admission::Refused => continue,
        };
        let Some(in_flight) = backend.try_start_request() else { continue };
        attempted = true;
        match backend.connect(connect_timeout).await {
            Ok(conn) => {
                passive::record_success(backend, trial, name);
                let (stream, _) = conn.into_parts();
                return Ok((stream, in_flight));
            }
            Err(ConnectError::Local(e)) => {
                drop(trial);
                warn!(service = %name, backend = %backend.name, error = %e, "cannot connect to the backend: Velocity is out of a local resource (not counted against the backend)");
                return Err(TcpFailure::LocalError);
            }
            Err(e) => {
                BackendMetrics::inc(&backend.metrics.connection_errors);
                passive::record_failure(backend, trial, passive_cfg, pool, name, &e);
                warn!(service = %name, backend = %backend.name, error = %e, "backend unavailable, trying the next one");
            }
        }
    }
    if attempted {
        warn!(service = %name, "no backend could take the tcp connection");
        Err(TcpFailure::NoBackend)
    } else {
        warn!(service = %name, "no healthy backend, tcp connection closed");
        Err(TcpFailure::NoHealthyBackend)
    }
}

/// The access-log line of one tcp connection, written when it is dropped (so a connection cut
/// at shutdown has one too, note `shutdown`).
struct TcpLine {
    log: Option<(AccessLog, AccessRecord)>,
    note: Option<&'static str>,
    done: bool,
}

impl TcpLine {
    fn new(log: Option<&AccessLog>, client: SocketAddr, listener: &str, service: &Service) -> TcpLine {
        let log = log.map(|log| {
            let record = AccessRecord {
                client,
                // Not an HTTP method: the line's place for one says what the connection was.
                method: Method::from_bytes(b"TCP").unwrap_or(Method::GET),
                host: Some(Bytes::copy_from_slice(listener.as_bytes())),
                target: Bytes::from_static(b"-"),
                status: 0,
                service: Some(service.metrics.name.clone()),
                backend: None,
                start: std::time::Instant::now(),
                bytes: 0,
                bytes_in: Some(0),
                note: None,
            };
            (log.clone(), record)
        });
        TcpLine { log, note: None, done: false }
    }

    fn set_backend(&mut self, backend: &Arc<Backend>) {
        if let Some((_, r)) = &mut self.log {
            r.backend = Some(backend.clone());
        }
    }

    fn done(&mut self, spliced: &Spliced) {
        self.done = true;
        self.note = spliced.end.note();
        if let Some((_, r)) = &mut self.log {
            r.bytes = spliced.down;
            r.bytes_in = Some(spliced.up);
        }
    }
}

impl Drop for TcpLine {
    fn drop(&mut self) {
        if let Some((log, mut record)) = self.log.take() {
            record.note = match self.note {
                Some(n) => Some(n),
                None if !self.done && record.backend.is_some() => Some("shutdown"),
                None => None,
            };
            let us = Instant::from_std(record.start).elapsed().as_micros() as u64;
            log.log(record, us);
        }
    }
}
