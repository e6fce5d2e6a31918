//! HTTP/2 to backends (`backend_protocol: h2 | h2c`).
//!
//! Unlike HTTP/1.1 connections (checked out by one request at a time, `connection.rs`), an
//! HTTP/2 connection carries many requests at once. Each backend keeps a few ([`H2Pool`]):
//! a request takes a stream on the first one with room under the peer's
//! `SETTINGS_MAX_CONCURRENT_STREAMS`, and a new connection is opened only when none has room
//! (up to [`MAX_CONNECTIONS`]; past that the least loaded one queues the stream, as h2 does).
//! Each connection is driven by a task of its own, since no single request owns it.
//!
//! The caller gets the stream's [`SendStream`] and response future ([`H2Exchange`]) and moves
//! bodies both ways itself, piece by piece ([`send_data`], [`relay`]): nothing is buffered
//! whole, and each side's flow-control window is released only once the other side took the
//! bytes, so a slow reader slows its own stream and no other.
//!
//! Failures say whether the backend may have seen the request ([`H2Error::nothing_sent`]): a
//! failed connect, a stream the backend refused (`REFUSED_STREAM`) and a stream beyond a
//! graceful `GOAWAY` were not processed (RFC 9113 §8.7), so any method may move to another
//! backend, as after a refused HTTP/1 connect.

use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::{Connection, ResponseFuture, SendRequest};
use h2::{Reason, RecvStream, SendStream};
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::http::uri::{Authority, Scheme};
use hyper::{Request, Response, Uri};
use tracing::debug;

use super::backend::Backend;
use super::connection::ConnectError;
use super::stream::BackendStream;

/// Connections per backend at most. gRPC servers allow 100 streams per connection by
/// default (grpc-go, grpcio), so this is hundreds of requests in flight before h2 queues.
pub const MAX_CONNECTIONS: usize = 8;
/// Receive windows: HTTP/2's default of 64 KiB holds a stream to 64 KiB per round trip, too
/// little for a large download; 1 MiB per stream and 4 MiB per connection (16 full streams)
/// keep a LAN link busy while bounding what one backend connection can hold in memory.
const STREAM_WINDOW: u32 = 1 << 20;
const CONNECTION_WINDOW: u32 = 4 << 20;
/// A backend's response head larger than this ends its stream (the client limit's maximum,
/// `max_header_bytes`).
const MAX_HEADER_LIST: u32 = 256 * 1024;

/// The HTTP/2 connections of one backend.
#[derive(Default)]
pub struct H2Pool {
    /// A per-backend lock held to pick or add a connection, never across an await.
    conns: Mutex<Vec<H2Conn>>,
    /// Held while a connection is being opened, so a burst of requests that finds no room
    /// opens one connection, not one each.
    connecting: tokio::sync::Mutex<()>,
}

impl fmt::Debug for H2Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H2Pool").field("connections", &self.connections()).finish()
    }
}

#[derive(Clone)]
struct H2Conn {
    send: SendRequest<Bytes>,
    state: Arc<ConnState>,
}

#[derive(Default)]
struct ConnState {
    /// Streams taken on it and not yet given back (their [`StreamSlot`] not yet dropped).
    streams: AtomicUsize,
    /// Its task ended (the connection closed or failed): no new stream goes there.
    closed: AtomicBool,
}

impl H2Pool {
    /// Open connections (for tests and the admin view).
    pub fn connections(&self) -> usize {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|c| !c.state.closed.load(Ordering::Relaxed))
            .count()
    }

    /// Drop every connection handle: each connection closes once its streams have ended.
    pub fn clear(&self) {
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// A connection with room for one more stream, its slot taken; `None`: open a new one.
    fn pick(&self) -> Option<(H2Conn, StreamSlot)> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.retain(|c| !c.state.closed.load(Ordering::Relaxed));
        let load = |c: &H2Conn| c.state.streams.load(Ordering::Relaxed);
        let chosen = match conns.iter().find(|c| load(c) < c.send.current_max_send_streams()) {
            Some(c) => c,
            None if conns.len() < MAX_CONNECTIONS => return None,
            None => conns.iter().min_by_key(|c| load(c))?,
        };
        chosen.state.streams.fetch_add(1, Ordering::Relaxed);
        Some((chosen.clone(), StreamSlot(chosen.state.clone())))
    }

    fn add(&self, conn: H2Conn) -> StreamSlot {
        conn.state.streams.fetch_add(1, Ordering::Relaxed);
        let slot = StreamSlot(conn.state.clone());
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
        slot
    }
}

/// Keeps a stream counted on its connection until dropped: hold it until the exchange ends
/// (both bodies done, or given up).
pub struct StreamSlot(Arc<ConnState>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl fmt::Debug for StreamSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StreamSlot")
    }
}

/// Why an HTTP/2 request to a backend failed.
#[derive(Debug)]
pub enum H2Error {
    /// No connection could be opened (refused, timed out, TLS, ALPN without `h2`).
    Connect(ConnectError),
    /// The backend did not process the stream: it refused it, or it was beyond a graceful
    /// GOAWAY, or the connection was found closed before the request went out.
    NotProcessed(h2::Error),
    /// The request went out; the backend may have acted on it.
    Sent(h2::Error),
}

impl H2Error {
    /// Whether the backend saw none of the request: safe to send elsewhere, whatever the method.
    pub fn nothing_sent(&self) -> bool {
        !matches!(self, H2Error::Sent(_))
    }

    /// Sort an error of a stream that was sent: see RFC 9113 §8.7 for what proves it unprocessed.
    fn of_stream(e: h2::Error) -> H2Error {
        // h2 gives a graceful GOAWAY's error only to the streams above its last stream id (the
        // ones below run on); an erroring GOAWAY ends every stream with it, processed or not.
        let unprocessed = e.reason() == Some(Reason::REFUSED_STREAM)
            || (e.is_go_away() && e.is_remote() && e.reason() == Some(Reason::NO_ERROR));
        if unprocessed {
            H2Error::NotProcessed(e)
        } else {
            H2Error::Sent(e)
        }
    }
}

impl fmt::Display for H2Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            H2Error::Connect(e) => e.fmt(f),
            H2Error::NotProcessed(e) => write!(f, "HTTP/2 stream not processed: {e}"),
            H2Error::Sent(e) => write!(f, "HTTP/2 stream failed: {e}"),
        }
    }
}

impl std::error::Error for H2Error {}

/// One request on its way: stream the body with [`send_data`] (or [`relay`]) on `send`, await
/// `response` for the head, and read its body and trailers from the [`RecvStream`].
#[derive(Debug)]
pub struct H2Exchange {
    pub send: SendStream<Bytes>,
    pub response: H2Response,
    pub slot: StreamSlot,
}

/// The backend's response head, its errors sorted as [`H2Error`].
#[derive(Debug)]
pub struct H2Response(ResponseFuture);

impl Future for H2Response {
    type Output = Result<Response<RecvStream>, H2Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map_err(H2Error::of_stream)
    }
}

impl Backend {
    /// Start `request` on one of this backend's HTTP/2 connections (opened within
    /// `connect_timeout` when none has room). `end_of_stream`: the request has no body. The
    /// head should have gone through [`prepare_request`].
    pub async fn h2_request(
        self: &Arc<Self>,
        request: Request<()>,
        end_of_stream: bool,
        connect_timeout: Duration,
    ) -> Result<H2Exchange, H2Error> {
        let mut request = Some(request);
        // A pooled connection may have just closed: then once more, on a fresh one.
        for fresh in [false, true] {
            let (conn, slot) = match (fresh, self.h2.pick()) {
                (false, Some(picked)) => picked,
                _ => self.h2_connection(connect_timeout, fresh).await?,
            };
            let mut send = match conn.send.clone().ready().await {
                Ok(send) => send,
                Err(e) => {
                    conn.state.closed.store(true, Ordering::Relaxed);
                    if fresh {
                        return Err(H2Error::NotProcessed(e));
                    }
                    continue;
                }
            };
            let Some(req) = request.take() else { break };
            return match send.send_request(req, end_of_stream) {
                Ok((response, send)) => Ok(H2Exchange { send, response: H2Response(response), slot }),
                // Refused before anything was written (the connection failed meanwhile).
                Err(e) => Err(H2Error::NotProcessed(e)),
            };
        }
        Err(H2Error::NotProcessed(Reason::REFUSED_STREAM.into()))
    }

    /// A connection with room, opening one if needed (`fresh`: always open one).
    async fn h2_connection(
        self: &Arc<Self>,
        connect_timeout: Duration,
        fresh: bool,
    ) -> Result<(H2Conn, StreamSlot), H2Error> {
        let _opening = self.h2.connecting.lock().await;
        if !fresh {
            // Another request may have opened one while this one waited.
            if let Some(picked) = self.h2.pick() {
                return Ok(picked);
            }
        }
        let started = Instant::now();
        let stream = self.open_stream(connect_timeout).await.map_err(H2Error::Connect)?;
        let deadline = started + connect_timeout;
        let (send, connection) = tokio::time::timeout_at(deadline.into(), handshake(stream))
            .await
            .map_err(|_| H2Error::Connect(ConnectError::Timeout))??;
        self.note_connection_opened();
        self.metrics.connect_time.observe_us(started.elapsed().as_micros() as u64);
        let state = Arc::new(ConnState::default());
        let ended = state.clone();
        let name = self.name.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(backend = %name, error = %e, "HTTP/2 backend connection ended");
            }
            ended.closed.store(true, Ordering::Relaxed);
        });
        let conn = H2Conn { send, state };
        Ok((conn.clone(), self.h2.add(conn)))
    }
}

/// The HTTP/2 handshake on a connected (and, for `h2`, TLS) stream. The caller drives the
/// returned connection (a task of its own, or beside a health check's one request).
pub async fn handshake(
    stream: BackendStream,
) -> Result<(SendRequest<Bytes>, Connection<BackendStream, Bytes>), H2Error> {
    if stream.is_tls() && stream.alpn() != Some(b"h2") {
        let e = std::io::Error::other("the backend did not agree to HTTP/2 (ALPN h2)");
        return Err(H2Error::Connect(ConnectError::Tls(e)));
    }
    h2::client::Builder::new()
        .enable_push(false)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(MAX_HEADER_LIST)
        .handshake(stream)
        .await
        .map_err(|e| {
            let e = e.into_io().unwrap_or_else(|| std::io::Error::other("HTTP/2 handshake failed"));
            H2Error::Connect(ConnectError::Io(e))
        })
}

/// Headers that mean something for one HTTP/1.1 connection only, which HTTP/2 forbids
/// (RFC 9113 §8.2.2). `te` is kept when it is `trailers` (gRPC servers require it).
const CONNECTION_SPECIFIC: [HeaderName; 5] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Make a request head fit for an HTTP/2 backend: the URI gets the scheme (`https` over TLS)
/// and the authority (the `Host` header's, else the URI's, else the backend's `host:port`);
/// `Host` and the connection-specific headers go, with those `Connection` names.
pub fn prepare_request(request: &mut Request<()>, backend: &Backend) {
    let headers = request.headers_mut();
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(CONNECTION_SPECIFIC.iter()) {
        headers.remove(name);
    }
    headers.remove("http2-settings");
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers"))));
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    let host = headers.remove(header::HOST);
    let authority = host
        .as_ref()
        .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        .or_else(|| request.uri().authority().cloned())
        .or_else(|| Authority::try_from(backend.host_header.as_bytes()).ok());
    let mut parts = request.uri().clone().into_parts();
    parts.scheme = Some(if backend.tls.is_some() { Scheme::HTTPS } else { Scheme::HTTP });
    parts.authority = authority;
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(hyper::http::uri::PathAndQuery::from_static("/"));
    }
    if let Ok(uri) = Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
}

/// Send `data` on `send`, as its flow-control window allows (waiting for window, never
/// buffering past it); `end`: the last piece of the body.
pub async fn send_data(send: &mut SendStream<Bytes>, mut data: Bytes, end: bool) -> Result<(), h2::Error> {
    if data.is_empty() {
        return send.send_data(data, end);
    }
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let room = match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(room) => room?,
            // The stream was reset or closed by the peer.
            None => return Err(Reason::CANCEL.into()),
        };
        let piece = data.split_to(room.min(data.len()));
        send.send_data(piece, end && data.is_empty())?;
    }
    Ok(())
}

/// Copy a body with its trailers from one HTTP/2 stream to another, as it comes: each piece's
/// window is given back to `from` only once `to` has taken it.
pub async fn relay(from: &mut RecvStream, to: &mut SendStream<Bytes>) -> Result<(), h2::Error> {
    while let Some(piece) = from.data().await {
        let piece = piece?;
        let n = piece.len();
        // No trailers follow a DATA frame that ends the stream.
        let end = from.is_end_stream();
        send_data(to, piece, end).await?;
        from.flow_control().release_capacity(n)?;
        if end {
            return Ok(());
        }
    }
    match from.trailers().await? {
        Some(trailers) => to.send_trailers(trailers),
        None => to.send_data(Bytes::new(), true),
    }
}
