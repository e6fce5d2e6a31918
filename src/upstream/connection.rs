//! Keep-alive connections to one backend, and the response body that hands its connection back.
//!
//! Hand-written rather than hyper-util's legacy `Client` because that client consumes the request
//! when the connect fails, so a request could not move on to the next backend without copying
//! its body first; here a connect happens before the request is given away, and hyper's
//! `try_send_request` hands back a request that never reached the wire.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::backend::{Backend, InFlight};

/// Body of a request forwarded to a backend: the client's streamed body, or bytes we hold.
#[derive(Debug)]
pub enum RequestBody {
    Streamed(Incoming),
    /// A streamed body of unknown length (chunked) counted against `max_body_bytes`.
    Limited(LimitedBody),
    Buffered(Full<Bytes>),
    Empty(Empty<Bytes>),
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Body for RequestBody {
    type Data = Bytes;
    // Not `hyper::Error`: a body over its limit must fail with an error of our own.
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Streamed(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            RequestBody::Limited(b) => Pin::new(b).poll_frame(cx),
            RequestBody::Buffered(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
            RequestBody::Empty(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Streamed(b) => b.is_end_stream(),
            RequestBody::Limited(b) => b.inner.is_end_stream(),
            RequestBody::Buffered(b) => b.is_end_stream(),
            RequestBody::Empty(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Streamed(b) => b.size_hint(),
            RequestBody::Limited(b) => b.inner.size_hint(),
            RequestBody::Buffered(b) => b.size_hint(),
            RequestBody::Empty(b) => b.size_hint(),
        }
    }
}

/// A client body that fails once it passes `max_body_bytes`, so the backend never gets a
/// request that looks complete; `exceeded` tells the request path to answer 413 rather than 502.
#[derive(Debug)]
pub struct LimitedBody {
    inner: Incoming,
    remaining: u64,
    exceeded: Arc<AtomicBool>,
}

/// The error a [`LimitedBody`] fails with.
#[derive(Debug)]
pub struct BodyTooLarge;

impl fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("request body larger than max_body_bytes")
    }
}

impl std::error::Error for BodyTooLarge {}

impl LimitedBody {
    pub fn new(inner: Incoming, max: u64) -> Self {
        LimitedBody { inner, remaining: max, exceeded: Arc::default() }
    }

    /// Set once the body went over its limit.
    pub fn exceeded(&self) -> Arc<AtomicBool> {
        self.exceeded.clone()
    }

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other.map_err(Into::into),
        };
        if let Some(data) = polled.data_ref() {
            let len = data.len() as u64;
            if len > this.remaining {
                this.exceeded.store(true, Ordering::Relaxed);
                return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
            }
            this.remaining -= len;
        }
        Poll::Ready(Some(Ok(polled)))
    }
}

/// Why a connection to a backend could not be made. No request bytes were sent.
#[derive(Debug)]
pub enum ConnectError {
    Refused,
    Timeout,
    Io(io::Error),
    Handshake(hyper::Error),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Refused => f.write_str("connection refused"),
            ConnectError::Timeout => f.write_str("connect timeout"),
            ConnectError::Io(e) => write!(f, "connect error: {e}"),
            ConnectError::Handshake(e) => write!(f, "handshake error: {e}"),
        }
    }
}

#[derive(Debug)]
pub(super) struct Idle {
    pub(super) sender: SendRequest<RequestBody>,
    pub(super) since: Instant,
}

/// A connection checked out of a backend's pool, ready for one request.
pub struct PooledConnection {
    sender: SendRequest<RequestBody>,
    /// Whether it came from the idle pool; a reused connection may have been closed by the
    /// backend meanwhile, so a failure on it before any byte is sent is worth one more try.
    pub reused: bool,
}

impl PooledConnection {
    pub(super) fn reused(sender: SendRequest<RequestBody>) -> Self {
        PooledConnection { sender, reused: true }
    }

    /// Send the request. On an error before the request reached the wire, it is handed back.
    pub async fn send(
        &mut self,
        req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, (hyper::Error, Option<Request<RequestBody>>)> {
        self.sender.try_send_request(req).await.map_err(|mut e| {
            let req = e.take_message();
            (e.into_error(), req)
        })
    }
}

impl Backend {
    /// A ready connection: a pooled idle one if there is one, otherwise a new one.
    pub async fn checkout(self: &Arc<Self>, connect_timeout: Duration) -> Result<PooledConnection, ConnectError> {
        while let Some(mut conn) = self.take_idle() {
            // Usually ready at once; a closed one errors and we try the next.
            if conn.sender.ready().await.is_ok() {
                return Ok(conn);
            }
        }
        self.connect(connect_timeout).await
    }

    /// Open a new connection, not taken from the pool.
    pub async fn connect(self: &Arc<Self>, connect_timeout: Duration) -> Result<PooledConnection, ConnectError> {
        let stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(self.addr)).await {
            Err(_) => return Err(ConnectError::Timeout),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => return Err(ConnectError::Refused),
            Ok(Err(e)) => return Err(ConnectError::Io(e)),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) =
            http1::Builder::new().handshake(TokioIo::new(stream)).await.map_err(ConnectError::Handshake)?;
        self.note_connection_opened();
        tokio::spawn(async move {
            // Errors here are the backend closing or resetting; the request that was on the
            // connection, if any, sees the error through its response future and reports it.
            let _ = conn.with_upgrades().await;
        });
        Ok(PooledConnection { sender, reused: false })
    }
}

/// A backend's response body. Keeps the request counted in flight until it ends, then returns
/// the connection to the pool so the next request reuses it.
///
/// A backend that stops sending halfway is given up on after `read_timeout` without data
/// (NGINX's `proxy_read_timeout`): the client's response is cut, as HTTP/1.1 allows no better
/// once the status went out. The timer exists only while the body waits on the backend, so a
/// response that arrives with its head costs no timer work.
pub struct UpstreamBody {
    inner: Incoming,
    conn: Option<PooledConnection>,
    in_flight: Option<InFlight>,
    read_timeout: Duration,
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether the last poll found no data (the stall timer is counting).
    waiting: bool,
}

/// The backend sent nothing for the body's read timeout.
#[derive(Debug)]
pub struct BodyStalled(pub Duration);

impl fmt::Display for BodyStalled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the backend sent no response data for {:?}", self.0)
    }
}

impl std::error::Error for BodyStalled {}

impl UpstreamBody {
    pub fn new(inner: Incoming, conn: PooledConnection, in_flight: InFlight, read_timeout: Duration) -> Self {
        let mut body = UpstreamBody {
            inner,
            conn: Some(conn),
            in_flight: Some(in_flight),
            read_timeout,
            stall: None,
            waiting: false,
        };
        if body.inner.is_end_stream() {
            body.finish();
        }
        body
    }

    fn finish(&mut self) {
        if let (Some(conn), Some(in_flight)) = (self.conn.take(), self.in_flight.take()) {
            in_flight.backend().put_idle(Idle { sender: conn.sender, since: Instant::now() });
        }
    }

    /// The connection is broken or given up on: let it close instead of returning it.
    fn abandon(&mut self) {
        self.conn = None;
        self.in_flight = None;
    }

    /// No data yet: (re)start the stall timer when this wait began, fail once it passes.
    fn poll_stall(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let deadline = tokio::time::Instant::now() + self.read_timeout;
        let timer = match &mut self.stall {
            Some(t) => {
                if !self.waiting {
                    t.as_mut().reset(deadline);
                }
                t
            }
            None => self.stall.insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.waiting = true;
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.abandon();
        Poll::Ready(Some(Err(Box::new(BodyStalled(self.read_timeout)))))
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => return this.poll_stall(cx),
            Poll::Ready(polled) => polled,
        };
        this.waiting = false;
        match &polled {
            None => this.finish(),
            Some(Ok(_)) if this.inner.is_end_stream() => this.finish(),
            Some(Err(_)) => this.abandon(),
            _ => {}
        }
        Poll::Ready(polled.map(|r| r.map_err(BoxError::from)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
