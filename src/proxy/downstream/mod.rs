//! The client's side of a request: one session type per protocol, each able to read a request
//! head and body and to write a response head, body pieces, trailers and an end, and to tell
//! when the client is gone (the shape of Pingora's `Session { H1, H2 }`).
//!
//! - [`h1`]: HTTP/1.x, Velocity's own parser and byte relay. A connection is a loop of
//!   requests, one at a time, in the connection's task.
//! - [`h2`]: HTTP/2 (the `h2` crate's server): each stream is a request in a task of its own.
//!
//! Both feed the same request path (`super::core`) through [`Session`], which is generic over
//! the protocol's [`Downstream`] so that each protocol's path is compiled on its own: the
//! HTTP/1.1 hot path pays no dynamic dispatch for the seam.

pub mod h1;
pub mod h2;

use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::core::Exchange;
use super::listener::ListenerSettings;
use super::stream::ClientStream;
use super::timer::LazyTimer;
use super::upstream::Upstream;
use crate::config::Limits;
use crate::http1::ResponseHead;
use crate::request::{Protocol, Scheme};
use crate::state::Shared;
use crate::upstream::{write_all_vectored, BackendConn, InFlight};

/// Shared between a connection and its listener's shutdown: whether the connection waits for
/// a request (and may be closed at once) and whether it must close after the response in
/// progress.
#[derive(Debug, Default)]
pub struct Drain {
    pub idle: AtomicBool,
    pub draining: AtomicBool,
}

impl Drain {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// A client session and what its requests share: for HTTP/1 the connection, for HTTP/2 one
/// stream. `P` is the protocol's own part.
pub struct Session<P> {
    pub stream: P,
    /// Bytes read from the client and not yet used: the next head, or body bytes (HTTP/2: the
    /// stream's body, as an HTTP/1.1 backend takes it).
    pub buf: BytesMut,
    /// Scratch for heads written to the client or to a backend, reused by every request.
    pub out: Vec<u8>,
    pub timer: LazyTimer,
    /// The response head being relayed, its header list reused by every request.
    pub resp: ResponseHead,
    pub state: Shared,
    pub client: SocketAddr,
    /// The client's IP, formatted once, for `X-Forwarded-For`.
    pub client_ip: Vec<u8>,
    pub limits: Limits,
    /// The listener's settings as they were when the connection was accepted.
    pub listener: Arc<ListenerSettings>,
    /// The clock as read when the last request ended (its metrics took it): the wait for the
    /// next request counts from it instead of reading the clock again. Taken by that wait.
    pub clock: Option<Instant>,
}

impl<P> Session<P> {
    pub fn new(stream: P, client: SocketAddr, limits: Limits, listener: Arc<ListenerSettings>, state: Shared) -> Self {
        Session {
            stream,
            buf: BytesMut::new(),
            out: Vec::new(),
            // A new connection gets `client_header` for its first request, as in NGINX.
            timer: LazyTimer::new(limits.timeouts.client_header),
            resp: ResponseHead::default(),
            state,
            client,
            client_ip: client.ip().to_string().into_bytes(),
            limits,
            listener,
            clock: None,
        }
    }
}

/// What ended a wait for the backend's answer.
pub enum Waited {
    Backend(io::Result<usize>),
    ClientGone,
}

/// What the request path needs from a protocol. Methods that write take the whole
/// [`Session`] (its scratch buffers, its timer).
pub trait Downstream: Sized + Send + 'static {
    const PROTOCOL: Protocol;

    fn scheme(&self) -> Scheme;

    /// Read more of the request body into `buf`, asking for about `want` bytes of room. The
    /// bytes are the body as an HTTP/1.1 backend takes it: HTTP/2 DATA of a request without a
    /// `content-length` comes as chunks. `Ok(0)`: the client closed (HTTP/1) or the body
    /// ended early.
    fn read_body(&mut self, buf: &mut BytesMut, want: usize) -> impl Future<Output = io::Result<usize>> + Send;

    /// HTTP/2 clients: the request body's stream itself, taken whole (before any of it was
    /// read) for a backend that speaks HTTP/2 too, so both directions stream at once (gRPC's
    /// bidirectional calls). `None`: the body is read with `read_body`.
    fn take_h2_body(&mut self) -> Option<::h2::RecvStream> {
        None
    }

    /// Tell a client that waits for it (`Expect: 100-continue`) to send its body.
    fn send_continue(c: &mut Session<Self>) -> impl Future<Output = io::Result<()>> + Send;

    /// Read from the backend (`conn.read_more()`), watching the client meanwhile: a client
    /// that goes away while its answer is awaited gets its backend request abandoned.
    /// `buf`: the session's read buffer, for what an HTTP/1 client pipelines meanwhile.
    fn backend_or_client(&mut self, buf: &mut BytesMut, conn: &mut BackendConn) -> impl Future<Output = Waited> + Send;

    /// One of Velocity's own answers. `close`: the connection ends after it (HTTP/1).
    fn write_local(
        c: &mut Session<Self>,
        status: u16,
        extra: &[(&str, &[u8])],
        body: &[u8],
        close: bool,
        version: u8,
    ) -> impl Future<Output = ()> + Send;

    /// Stream the response whose head is in `c.resp` (read from `upstream`) to the client:
    /// head, body pieces, trailers, end. Returns whether the connection may carry another
    /// request (HTTP/1).
    fn relay(
        ex: &mut Exchange<'_>,
        c: &mut Session<Self>,
        upstream: Upstream,
        in_flight: InFlight,
        stall_timeout: Duration,
    ) -> impl Future<Output = bool> + Send;

    /// A backend's `101 Switching Protocols` to a WebSocket handshake: splice the two.
    fn upgrade(
        ex: &mut Exchange<'_>,
        c: &mut Session<Self>,
        upstream: Upstream,
        in_flight: InFlight,
        idle: Duration,
    ) -> impl Future<Output = bool> + Send;
}

/// Write all of `parts` to the client; a client that takes none of it for `limit` is given up
/// on (`client_send`: the error's kind is `TimedOut`).
pub(super) async fn send(
    stream: &mut ClientStream,
    timer: &mut LazyTimer,
    limit: Duration,
    parts: &mut [IoSlice<'_>],
) -> io::Result<()> {
    let write = async {
        write_all_vectored(stream, parts).await.map_err(|(e, _)| e)?;
        // TLS keeps what the socket did not take; plain TCP has nothing to flush.
        if stream.is_tls() {
            stream.flush().await?;
        }
        Ok(())
    };
    match timer.within(|| Instant::now() + limit, write).await {
        Ok(written) => written,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "client_send timeout")),
    }
}

/// Read more from the client into `buf`, asking for at least `want` bytes of room (heads:
/// `READ_BUFFER`; bodies: more, so that an upload moves in few system calls).
pub(super) async fn read_more(stream: &mut ClientStream, buf: &mut BytesMut, want: usize) -> io::Result<usize> {
    if buf.capacity() - buf.len() < want / 4 {
        buf.reserve(want);
    }
    stream.read_buf(buf).await
}

/// Room asked for when reading a request body.
pub(super) const BODY_READ: usize = 64 * 1024;
