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
        let (send, mut connection) = tokio::time::timeout_at(deadline.into(), handshake(stream))
            .await
            .map_err(|_| H2Error::Connect(ConnectError::Timeout))??;
        let ping = connection.ping_pong();
        let state = Arc::new(ConnState::default());
        let ended = state.clone();
        let name = self.name.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(backend = %name, error = %e, "HTTP/2 backend connection ended");
            }
            ended.closed.store(true, Ordering::Relaxed);
        });
        // The peer's SETTINGS come before its answer to a PING: once it is back, the stream
        // limit is the peer's, not h2's initial guess of 100, so a burst on a new connection
        // spreads over new ones instead of queueing here. One round trip per connection.
        if let Some(mut ping) = ping {
            match tokio::time::timeout_at(deadline.into(), ping.ping(h2::Ping::opaque())).await {
                Err(_) => return Err(H2Error::Connect(ConnectError::Timeout)),
                Ok(Err(e)) => return Err(H2Error::Connect(ConnectError::Io(h2_io(e)))),
                Ok(Ok(_)) => {}
            }
        }
        self.note_connection_opened();
        self.metrics.connect_time.observe_us(started.elapsed().as_micros() as u64);
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
        .map_err(|e| H2Error::Connect(ConnectError::Io(h2_io(e))))
}

/// An h2 error of a connection being set up, as the I/O error `ConnectError` carries.
fn h2_io(e: h2::Error) -> std::io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| std::io::Error::other("HTTP/2 connection failed"))
    } else {
        std::io::Error::other(e)
    }
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use hyper::header::HeaderMap;
    use hyper::StatusCode;
    use tokio::net::TcpListener;

    use super::*;

    /// An h2c server: echoes the request body and its trailers back, with `x-te` telling the
    /// `te` it got; `/hold` answers only after the client's body ends; `/refuse` refuses the
    /// stream. Each connection allows `max_streams` streams; `/goaway` ends the connection
    /// gracefully after its answer, `/kill` drops it.
    async fn server(max_streams: u32) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                tokio::spawn(async move {
                    let mut conn = h2::server::Builder::new()
                        .max_concurrent_streams(max_streams)
                        .handshake::<_, Bytes>(tcp)
                        .await
                        .unwrap();
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        let path = req.uri().path().to_owned();
                        if path == "/refuse" {
                            respond.send_reset(Reason::REFUSED_STREAM);
                            continue;
                        }
                        if path == "/goaway" {
                            conn.graceful_shutdown();
                        }
                        if path == "/kill" {
                            // The connection is dropped: its socket closes, no GOAWAY.
                            return;
                        }
                        tokio::spawn(async move {
                            let te = req.headers().get(header::TE).cloned();
                            let mut body = req.into_body();
                            let mut head = Response::new(());
                            if let Some(te) = te {
                                head.headers_mut().insert("x-te", te);
                            }
                            let mut send = respond.send_response(head, false).unwrap();
                            let _ = relay(&mut body, &mut send).await;
                        });
                    }
                });
            }
        });
        (addr, task)
    }

    fn backend(addr: SocketAddr) -> Arc<Backend> {
        Backend::with_tls("b".into(), addr, &addr.to_string(), None, crate::config::BackendProtocol::H2c)
    }

    fn request(backend: &Backend, path: &str) -> Request<()> {
        let mut req = Request::new(());
        *req.method_mut() = hyper::Method::POST;
        *req.uri_mut() = path.parse().unwrap();
        let h = req.headers_mut();
        h.insert(header::HOST, HeaderValue::from_static("web.local"));
        h.insert(header::CONNECTION, HeaderValue::from_static("x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        prepare_request(&mut req, backend);
        req
    }

    const SECOND: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn streams_share_one_connection_and_bodies_and_trailers_go_both_ways() {
        let (addr, _server) = server(100).await;
        let b = backend(addr);
        let req = request(&b, "/echo?x=1");
        assert_eq!(req.uri().to_string(), "http://web.local/echo?x=1");
        assert!(req.headers().get("x-hop").is_none() && req.headers().get(header::HOST).is_none());
        assert_eq!(req.headers().get(header::TE).unwrap(), "trailers");
        let mut calls = Vec::new();
        for i in 0..20u8 {
            let b = b.clone();
            calls.push(tokio::spawn(async move {
                let mut ex = b.h2_request(request(&b, "/echo"), false, SECOND).await.unwrap();
                // Larger than every window: the body moves as the windows open, both ways.
                let body = Bytes::from(vec![i; 3 << 20]);
                let sending = async {
                    send_data(&mut ex.send, body.clone(), false).await.unwrap();
                    let mut t = HeaderMap::new();
                    t.insert("grpc-status", HeaderValue::from_static("7"));
                    ex.send.send_trailers(t).unwrap();
                };
                let receiving = async {
                    let resp = (&mut ex.response).await.unwrap();
                    assert_eq!(resp.status(), StatusCode::OK);
                    assert_eq!(resp.headers().get("x-te").unwrap(), "trailers");
                    let mut recv = resp.into_body();
                    let mut got = 0;
                    while let Some(piece) = recv.data().await {
                        let piece = piece.unwrap();
                        assert!(piece.iter().all(|&x| x == i));
                        got += piece.len();
                        recv.flow_control().release_capacity(piece.len()).unwrap();
                    }
                    assert_eq!(got, 3 << 20);
                    let t = recv.trailers().await.unwrap().unwrap();
                    assert_eq!(t.get("grpc-status").unwrap(), "7");
                };
                tokio::join!(sending, receiving);
            }));
        }
        for c in calls {
            c.await.unwrap();
        }
        assert_eq!((b.h2.connections(), b.connections_opened()), (1, 1));
    }

    #[tokio::test]
    async fn a_new_connection_when_the_peers_stream_limit_is_reached() {
        let (addr, _server) = server(2).await;
        let b = backend(addr);
        // The first connection learns the limit from the server's SETTINGS with its first answer.
        let mut first = b.h2_request(request(&b, "/"), true, SECOND).await.unwrap();
        (&mut first.response).await.unwrap();
        drop(first);
        let mut open = Vec::new();
        for _ in 0..5 {
            let mut ex = b.h2_request(request(&b, "/hold"), false, SECOND).await.unwrap();
            ex.send.send_data(Bytes::from_static(b"x"), false).unwrap();
            open.push(ex);
        }
        assert_eq!(b.h2.connections(), 3);
        for mut ex in open {
            ex.send.send_data(Bytes::new(), true).unwrap();
            assert_eq!((&mut ex.response).await.unwrap().status(), StatusCode::OK);
        }
    }

    #[tokio::test]
    async fn unprocessed_streams_and_lost_connections_say_nothing_was_sent() {
        let (addr, server) = server(100).await;
        let b = backend(addr);
        let ex = b.h2_request(request(&b, "/refuse"), true, SECOND).await.unwrap();
        match ex.response.await {
            Err(e) => assert!(e.nothing_sent(), "{e}"),
            Ok(r) => panic!("answered {}", r.status()),
        }
        // A graceful GOAWAY: the pool notices, and the next request takes a new connection.
        let ex = b.h2_request(request(&b, "/goaway"), true, SECOND).await.unwrap();
        assert_eq!(ex.response.await.unwrap().status(), StatusCode::OK);
        let deadline = Instant::now() + SECOND;
        while b.h2.connections() > 0 {
            assert!(Instant::now() < deadline, "the closed connection stays in the pool");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let ex = b.h2_request(request(&b, "/"), true, SECOND).await.unwrap();
        assert_eq!(ex.response.await.unwrap().status(), StatusCode::OK);
        assert_eq!(b.connections_opened(), 2);
        // The backend goes away: a stream in flight when its connection dies may have been
        // processed; the connect after it is refused, which is safe to move.
        server.abort();
        let _ = server.await;
        let ex = b.h2_request(request(&b, "/kill"), true, SECOND).await.unwrap();
        match ex.response.await {
            Err(e) => assert!(!e.nothing_sent(), "{e}"),
            Ok(r) => panic!("answered {}", r.status()),
        }
        let deadline = Instant::now() + SECOND;
        while b.h2.connections() > 0 {
            assert!(Instant::now() < deadline, "the lost connection stays in the pool");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        match b.h2_request(request(&b, "/"), true, SECOND).await {
            Err(e) => assert!(e.nothing_sent() && matches!(e, H2Error::Connect(ConnectError::Refused)), "{e}"),
            Ok(_) => panic!("a request went to a backend that is gone"),
        }
    }
}
