//! HTTP/2 to clients: ALPN `h2` on TLS listeners, h2c by prior knowledge on plain ones (the
//! HTTP/1 loop hands the connection over when its first bytes are the preface). The `h2`
//! crate's server runs the connection; each stream is a request in a task of its own, served
//! by the same request path as HTTP/1 (`super::super::core`) through an [`H2Stream`] session.
//!
//! Bodies keep HTTP/2's flow control end to end: a request's DATA is taken (and its window
//! released) only as the core forwards it, and a response goes out only as the stream's send
//! window allows, so one slow reader holds its own stream and no other.
//!
//! Limits. The `h2` crate already answers: too many open streams (`REFUSED_STREAM` beyond
//! `max_concurrent_streams`), a header list over `max_header_list_size` (431 and
//! `REFUSED_STREAM`), a header list far over it and CONTINUATION floods (GOAWAY
//! `ENHANCE_YOUR_CALM`), streams reset before they were accepted (its pending-accept reset
//! limit). It does not stop a client that resets streams Velocity has accepted (rapid reset,
//! CVE-2023-44487: each one costs a backend request), nor SETTINGS and PING floods (it only
//! stops reading while an answer is pending). [`Guarded`], a thin reader under the crate,
//! counts those frames from the frame headers and has the connection end with GOAWAY
//! `ENHANCE_YOUR_CALM` past `max_resets_per_second` or `max_control_frames_per_second`.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use hyper::http::{self, HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Downstream, Drain, Session, Waited};
use crate::config::{Http2Config, Limits};
use crate::http1::{ChunkedScanner, Framing, HeadError, RequestHead};
use crate::observe::metrics::Reject;
use crate::proxy::core::{self, Exchange, LogLine};
use crate::proxy::listener::ListenerSettings;
use crate::proxy::stream::ClientStream;
use crate::proxy::timer::LazyTimer;
use crate::proxy::upstream::Upstream;
use crate::request::{Protocol, Scheme};
use crate::state::Shared;
use crate::upstream::{BackendConn, InFlight};

/// The client connection preface (RFC 9113 3.4).
const PREFACE_LEN: usize = 24;
/// How long a connection that ends for a flood gets to send its GOAWAY.
const GOAWAY_FLUSH: Duration = Duration::from_secs(1);

/// What a connection's streams share.
struct Conn {
    client: SocketAddr,
    limits: Limits,
    listener: Arc<ListenerSettings>,
    state: Shared,
    tls: bool,
    /// `max_header_list_size`, checked again on the head as text: the crate applies the
    /// setting only once the client has acknowledged it, so a connection's first requests
    /// would pass it.
    max_header_list: usize,
    /// Set when the listener stops: answers then say so in the access log.
    drain: Drain,
}

/// Serve an HTTP/2 connection. `preface`: bytes the HTTP/1 loop read already (h2c), which
/// the `h2` crate reads first.
pub async fn serve(
    stream: ClientStream,
    preface: Vec<u8>,
    client: SocketAddr,
    listener: Arc<ListenerSettings>,
    state: Shared,
    drain: &Drain,
) {
    let Some(cfg) = listener.http2 else { return };
    let limits = state.load().config.limits;
    // The listener's shutdown sees a connection with streams as busy.
    drain.idle.store(false, Ordering::Relaxed);
    let tls = stream.is_tls();
    let max_header_list = cfg.max_header_list_size.map_or(limits.max_header_bytes, |n| n as usize);
    let flood = Arc::new(Notify::new());
    let io = Guarded::new(stream, preface, &cfg, flood.clone());
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(cfg.max_concurrent_streams)
        .max_header_list_size(max_header_list as u32)
        .initial_window_size(cfg.stream_window)
        .initial_connection_window_size(cfg.connection_window);
    let mut conn = match tokio::time::timeout(limits.timeouts.client_header, builder.handshake::<_, Bytes>(io)).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            debug!(%client, error = %e, "HTTP/2 handshake failed");
            return;
        }
        Err(_) => {
            debug!(%client, "HTTP/2 preface not received in time (client_header)");
            return;
        }
    };
    let mut stopped = listener.stopped.clone();
    let shared = Arc::new(Conn { client, limits, listener, state, tls, max_header_list, drain: Drain::default() });
    // Dropped with the connection (a cut at `drain_timeout`): its streams end with it.
    let mut streams = JoinSet::new();
    let mut going_away = false;
    let mut idle_until = Instant::now() + limits.timeouts.client_idle;
    loop {
        tokio::select! {
            accepted = conn.accept() => match accepted {
                Some(Ok((req, respond))) => {
                    streams.spawn(serve_stream(req, respond, shared.clone()));
                }
                Some(Err(e)) => {
                    // The crate has sent its GOAWAY (a protocol error, a flood it caught).
                    debug!(%client, error = %e, "HTTP/2 connection ended with an error");
                    break;
                }
                None => break,
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {
                if streams.is_empty() {
                    idle_until = Instant::now() + limits.timeouts.client_idle;
                }
            }
            () = flood.notified() => {
                warn!(%client, "HTTP/2 flood (resets, PING or SETTINGS over the limit): GOAWAY ENHANCE_YOUR_CALM");
                shared.state.load().metrics.unrouted.before_routing(0, Some(Reject::Denied));
                conn.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
                let _ = tokio::time::timeout(GOAWAY_FLUSH, poll_fn(|cx| conn.poll_closed(cx))).await;
                break;
            }
            _ = wait_stop(&mut stopped), if !going_away => {
                // GOAWAY: no new stream; those in flight finish (within `drain_timeout`, which
                // the listener enforces by dropping this future).
                going_away = true;
                shared.drain.draining.store(true, Ordering::Relaxed);
                conn.graceful_shutdown();
            }
            () = tokio::time::sleep_until(idle_until), if streams.is_empty() && !going_away => {
                going_away = true;
                conn.graceful_shutdown();
            }
        }
    }
}

/// Until the listener is told to stop; forever for settings without a listener.
async fn wait_stop(stopped: &mut Option<watch::Receiver<Option<Duration>>>) {
    match stopped {
        Some(rx) => {
            if rx.wait_for(Option::is_some).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

async fn serve_stream(req: Request<RecvStream>, respond: SendResponse<Bytes>, conn: Arc<Conn>) {
    let (parts, recv) = req.into_parts();
    let mut text = BytesMut::new();
    let chunked = write_head(&parts, !recv.is_end_stream(), &mut text);
    let stream = H2Stream { recv: Some(recv), respond, tls: conn.tls, chunked, ended: false };
    let mut c = Session::new(stream, conn.client, conn.limits, conn.listener.clone(), conn.state.clone());
    let mut head = RequestHead::default();
    let parsed = head.parse(&mut text, conn.max_header_list);
    match parsed {
        Ok(true) => {
            core::handle(&mut c, &head, &conn.drain).await;
        }
        Ok(false) => bad_head(&mut c, HeadError::Malformed("incomplete head")).await,
        Err(e) => bad_head(&mut c, e).await,
    }
}

/// A request the HTTP/1 parser refuses (an invalid authority, CONNECT): answered as an
/// HTTP/1 client would be.
async fn bad_head(c: &mut Session<H2Stream>, e: HeadError) {
    let (status, body) = match e {
        HeadError::TooLarge => (431, "431 request header fields too large\n".to_string()),
        HeadError::UnsupportedEncoding => (501, "501 not implemented\n".to_string()),
        HeadError::MethodNotAllowed => {
            (405, "405 method not allowed: Velocity is not a forward proxy (CONNECT)\n".into())
        }
        HeadError::Malformed(why) => (400, format!("400 bad request: {why}\n")),
    };
    info!(client = %c.client, status, error = e.message(), "malformed HTTP/2 request answered");
    c.state.load().metrics.unrouted.before_routing(status, (status == 431).then_some(Reject::HeaderTooLarge));
    H2Stream::write_local(c, status, &[], body.as_bytes(), false, 1).await;
}

/// The stream's request as an HTTP/1.1 head, for the one parser both protocols share (which
/// then checks it as it checks HTTP/1: Host, lengths). Header values cannot hold CR or LF
/// (the `http` crate refuses them), so nothing can be smuggled into the text. Returns whether
/// the body goes to the backend chunked: it has no `content-length`.
fn write_head(parts: &http::request::Parts, has_body: bool, out: &mut BytesMut) -> bool {
    let authority = parts.uri.authority();
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.reserve(256 + parts.headers.len() * 32);
    for piece in [parts.method.as_str().as_bytes(), b" ", target.as_bytes(), b" HTTP/1.1\r\n"] {
        out.extend_from_slice(piece);
    }
    if let Some(a) = authority {
        push(out, b"host", a.as_str().as_bytes());
    }
    let mut length = false;
    let mut cookie: Option<Vec<u8>> = None;
    for (name, value) in &parts.headers {
        match name.as_str() {
            "host" if authority.is_some() => continue,
            // Connection-specific (RFC 9113 8.2.2): the crate refuses most; none is forwarded.
            "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "upgrade" | "http2-settings" => {
                continue
            }
            "content-length" => length = true,
            // HTTP/2 may split cookies into several fields; HTTP/1.1 wants one (8.2.3).
            "cookie" => {
                let c = cookie.get_or_insert_with(Vec::new);
                if !c.is_empty() {
                    c.extend_from_slice(b"; ");
                }
                c.extend_from_slice(value.as_bytes());
                continue;
            }
            _ => {}
        }
        push(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if let Some(c) = cookie {
        push(out, b"cookie", &c);
    }
    let chunked = has_body && !length;
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
    chunked
}

fn push(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    for piece in [name, b": ", value, b"\r\n"] {
        out.extend_from_slice(piece);
    }
}

/// One HTTP/2 stream as a downstream session.
pub struct H2Stream {
    /// `None` once taken by an HTTP/2 backend's exchange (`take_h2_body`).
    recv: Option<RecvStream>,
    respond: SendResponse<Bytes>,
    tls: bool,
    /// The body goes to the backend chunked: DATA frames are written as chunks.
    chunked: bool,
    /// The body has ended (its last chunk written).
    ended: bool,
}

/// Why sending to the client stopped.
enum SendFailed {
    Gone,
    TimedOut,
}

impl SendFailed {
    /// Log and note why the response stopped; a client that opened no window in time has its
    /// stream reset.
    fn record(self, send: &mut SendStream<Bytes>, log: &mut LogLine, client: SocketAddr, limit: Duration) {
        match self {
            SendFailed::TimedOut => {
                warn!(client = %client, timeout = ?limit, "client took no response data in time: stream reset");
                log.note("client_timeout");
                send.send_reset(Reason::CANCEL);
            }
            SendFailed::Gone => {
                debug!(client = %client, "client reset the stream during the response");
                log.note("client_aborted");
            }
        }
    }
}

/// Send `data` on `send` as its window allows; a client that opens no window for
/// `client_send` is given up on.
async fn send_body(
    send: &mut SendStream<Bytes>,
    timer: &mut LazyTimer,
    limit: Duration,
    mut data: Bytes,
) -> Result<(), SendFailed> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let granted = timer.within(|| Instant::now() + limit, poll_fn(|cx| send.poll_capacity(cx))).await;
        let n = match granted {
            Ok(Some(Ok(n))) => n,
            Ok(_) => return Err(SendFailed::Gone),
            Err(_) => return Err(SendFailed::TimedOut),
        };
        if n == 0 {
            continue;
        }
        let piece = data.split_to(n.min(data.len()));
        send.send_data(piece, false).map_err(|_| SendFailed::Gone)?;
    }
    Ok(())
}

/// The trailer section of a chunked body, from `tail`: what came after its last data byte
/// (that chunk's line end, the last-chunk line, the trailer fields, the final empty line).
fn trailers(tail: &[u8]) -> Option<HeaderMap> {
    let t = tail.strip_prefix(b"\r\n").or_else(|| tail.strip_prefix(b"\n")).unwrap_or(tail);
    let line_end = t.iter().position(|&b| b == b'\n')?;
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let httparse::Status::Complete((_, fields)) = httparse::parse_headers(&t[line_end + 1..], &mut slots).ok()? else {
        return None;
    };
    let mut map = HeaderMap::new();
    for f in fields.iter() {
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(f.name.as_bytes()), HeaderValue::from_bytes(f.value))
        else {
            continue;
        };
        // Framing and routing fields are not allowed in trailers (RFC 9110 6.5.1).
        if matches!(
            name.as_str(),
            "content-length"
                | "transfer-encoding"
                | "connection"
                | "keep-alive"
                | "te"
                | "trailer"
                | "host"
                | "upgrade"
        ) {
            continue;
        }
        map.append(name, value);
    }
    (!map.is_empty()).then_some(map)
}

impl Downstream for H2Stream {
    const PROTOCOL: Protocol = Protocol::Http2;

    fn scheme(&self) -> Scheme {
        if self.tls {
            Scheme::Https
        } else {
            Scheme::Http
        }
    }

    async fn read_body(&mut self, buf: &mut BytesMut, _want: usize) -> io::Result<usize> {
        loop {
            let Some(recv) = self.recv.as_mut().filter(|_| !self.ended) else { return Ok(0) };
            match recv.data().await {
                Some(Ok(data)) => {
                    let n = data.len();
                    // The core asks for more only once it has sent what it had: releasing the
                    // window here lets the client send about one window ahead of the backend.
                    let _ = recv.flow_control().release_capacity(n);
                    if n == 0 {
                        continue;
                    }
                    let before = buf.len();
                    if self.chunked {
                        buf.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                        buf.extend_from_slice(&data);
                        buf.extend_from_slice(b"\r\n");
                    } else {
                        buf.extend_from_slice(&data);
                    }
                    return Ok(buf.len() - before);
                }
                Some(Err(e)) => return Err(io::Error::other(e)),
                None if self.chunked => {
                    self.ended = true;
                    buf.extend_from_slice(b"0\r\n\r\n");
                    return Ok(5);
                }
                None => {
                    self.ended = true;
                    return Ok(0);
                }
            }
        }
    }

    fn take_h2_body(&mut self) -> Option<RecvStream> {
        if self.ended || self.recv.as_ref().is_none_or(RecvStream::is_end_stream) {
            return None;
        }
        self.recv.take()
    }

    async fn send_continue(c: &mut Session<Self>) -> io::Result<()> {
        let mut interim = Response::new(());
        *interim.status_mut() = StatusCode::CONTINUE;
        c.stream.respond.send_informational(interim).map_err(io::Error::other)
    }

    async fn backend_or_client(&mut self, _buf: &mut BytesMut, conn: &mut BackendConn) -> Waited {
        let backend = pin!(conn.read_more());
        let respond = &mut self.respond;
        tokio::select! {
            biased;
            read = backend => Waited::Backend(read),
            // The client reset the stream (or the connection went).
            _ = poll_fn(|cx| respond.poll_reset(cx)) => Waited::ClientGone,
        }
    }

    async fn write_local(
        c: &mut Session<Self>,
        status: u16,
        extra: &[(&str, &[u8])],
        body: &[u8],
        _close: bool,
        _version: u8,
    ) {
        let mut resp = Response::new(());
        *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let headers = resp.headers_mut();
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        for (name, value) in extra {
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_bytes(value)) {
                headers.append(n, v);
            }
        }
        if let Ok(mut send) = c.stream.respond.send_response(resp, body.is_empty()) {
            if !body.is_empty() {
                // Small: the crate buffers it beyond the window.
                let _ = send.send_data(Bytes::copy_from_slice(body), true);
            }
        }
    }

    async fn relay(
        ex: &mut Exchange<'_>,
        c: &mut Session<Self>,
        upstream: Upstream,
        in_flight: InFlight,
        stall_timeout: Duration,
    ) -> bool {
        let mut conn = match upstream {
            Upstream::H1(conn) => conn,
            Upstream::H2(up) => return relay_h2(ex, c, *up, in_flight, stall_timeout).await,
        };
        let backend = in_flight.backend().clone();
        let framing = c.resp.framing(&ex.head.method);
        let resp = response_head(ex, c, &conn.buf);
        conn.buf.advance(c.resp.len);
        ex.log.set(c.resp.status, None, Some(&backend));
        let reusable = c.resp.backend_keeps_alive();
        let empty = matches!(framing, Framing::None | Framing::Length(0));
        let mut send = match c.stream.respond.send_response(resp, empty) {
            Ok(send) => send,
            Err(e) => {
                debug!(client = %c.client, error = %e, "client went away before the response");
                ex.log.note("client_aborted");
                return true;
            }
        };
        if empty {
            if reusable {
                backend.put_idle(conn);
            }
            return true;
        }
        let send_limit = c.limits.timeouts.client_send;
        let mut remaining = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        if remaining > conn.buf.len() as u64 {
            conn.expect_bytes(remaining - conn.buf.len() as u64);
        }
        let mut scanner = ChunkedScanner::new();
        let mut ranges = Vec::new();
        // What followed the last data byte of a chunked body: its trailer section at the end.
        let mut tail: Vec<u8> = Vec::new();
        loop {
            let (ready, done) = match framing {
                Framing::None => (0, true),
                Framing::Length(_) => {
                    let n = remaining.min(conn.buf.len() as u64);
                    remaining -= n;
                    (n as usize, remaining == 0)
                }
                Framing::Chunked => match scanner.scan(&conn.buf, Some(&mut ranges)) {
                    Ok(n) => (n, scanner.is_done()),
                    Err(e) => {
                        warn!(backend = %backend.name, error = %e, "backend sent a malformed chunked body");
                        ex.log.note("backend_body_error");
                        send.send_reset(Reason::INTERNAL_ERROR);
                        return true;
                    }
                },
                Framing::UntilClose => (conn.buf.len(), false),
            };
            if ready > 0 {
                let data = if framing == Framing::Chunked {
                    match ranges.last() {
                        Some(last) => {
                            tail.clear();
                            tail.extend_from_slice(&conn.buf[last.end..ready]);
                        }
                        None => tail.extend_from_slice(&conn.buf[..ready]),
                    }
                    let mut data = BytesMut::with_capacity(ranges.iter().map(|r| r.len()).sum());
                    for r in ranges.drain(..) {
                        data.extend_from_slice(&conn.buf[r]);
                    }
                    data.freeze()
                } else {
                    Bytes::copy_from_slice(&conn.buf[..ready])
                };
                let n = data.len() as u64;
                match send_body(&mut send, &mut c.timer, send_limit, data).await {
                    Ok(()) => ex.log.bytes(n),
                    Err(why) => {
                        why.record(&mut send, ex.log, c.client, send_limit);
                        return true;
                    }
                }
                conn.buf.advance(ready);
            }
            if done {
                break;
            }
            let read = c.timer.within(|| Instant::now() + stall_timeout, conn.read_more()).await;
            match read {
                Ok(Ok(n)) if n > 0 => {}
                Ok(Ok(_)) if framing == Framing::UntilClose => {
                    let _ = send.send_data(Bytes::new(), true);
                    return true;
                }
                Ok(result) => {
                    let why = match result {
                        Err(e) => e.to_string(),
                        Ok(_) => "the backend closed the connection".to_string(),
                    };
                    warn!(backend = %backend.name, error = %why, "backend failed while sending the response body");
                    ex.log.note("backend_body_error");
                    send.send_reset(Reason::INTERNAL_ERROR);
                    return true;
                }
                Err(_) => {
                    warn!(backend = %backend.name, timeout = ?stall_timeout, "the backend sent no response data in time: response cut");
                    ex.log.note("backend_body_error");
                    send.send_reset(Reason::INTERNAL_ERROR);
                    return true;
                }
            }
        }
        let ended = match trailers(&tail).filter(|_| framing == Framing::Chunked) {
            Some(fields) => send.send_trailers(fields),
            None => send.send_data(Bytes::new(), true),
        };
        if ended.is_err() {
            ex.log.note("client_aborted");
        }
        if reusable {
            backend.put_idle(conn);
        }
        drop(in_flight);
        true
    }

    async fn upgrade(
        ex: &mut Exchange<'_>,
        c: &mut Session<Self>,
        _upstream: Upstream,
        _in_flight: InFlight,
        _idle: Duration,
    ) -> bool {
        // Not reached: an HTTP/2 request never offers a WebSocket upgrade to the backend
        // (`upgrade` is not forwarded), so a 101 is refused as an invalid answer first.
        ex.log.set(502, Some("backend_error"), None);
        H2Stream::write_local(c, 502, &[], b"502 bad gateway\n", false, 1).await;
        true
    }
}

/// The response head in `c.resp` (parsed from `buf`) for the client, with the balancer's
/// `Set-Cookie` (sticky), if any.
fn response_head(ex: &mut Exchange<'_>, c: &Session<H2Stream>, buf: &[u8]) -> Response<()> {
    let mut resp = Response::new(());
    *resp.status_mut() = StatusCode::from_u16(c.resp.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let headers = resp.headers_mut();
    for (name, value) in c.resp.fields(buf) {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            headers.append(n, v);
        }
    }
    if let Some(cookie) = ex.set_cookie.take() {
        let mut v = cookie.to_vec();
        if c.stream.tls {
            v.extend_from_slice(b"; Secure");
        }
        if let Ok(v) = HeaderValue::from_bytes(&v) {
            headers.append(http::header::SET_COOKIE, v);
        }
    }
    resp
}

/// An HTTP/2 backend's answer to an HTTP/2 client: the head, then the DATA pieces as they
/// come and the trailers, stream to stream. A piece's window goes back to the backend only
/// once the client's window took it, so a slow reader slows its own stream only. The request
/// body, when it was taken whole, streams meanwhile in `up`'s task (full duplex).
async fn relay_h2(
    ex: &mut Exchange<'_>,
    c: &mut Session<H2Stream>,
    mut up: crate::proxy::upstream::H2Upstream,
    in_flight: InFlight,
    stall_timeout: Duration,
) -> bool {
    let backend = in_flight.backend().clone();
    let framing = c.resp.framing(&ex.head.method);
    let resp = response_head(ex, c, &up.head);
    ex.log.set(c.resp.status, None, Some(&backend));
    let empty = framing == Framing::None || up.body.is_end_stream();
    let mut send = match c.stream.respond.send_response(resp, empty) {
        Ok(send) => send,
        Err(e) => {
            debug!(client = %c.client, error = %e, "client went away before the response");
            ex.log.note("client_aborted");
            return true;
        }
    };
    if empty {
        return true;
    }
    let send_limit = c.limits.timeouts.client_send;
    let failed = |ex: &mut Exchange<'_>, send: &mut SendStream<Bytes>, why: &dyn std::fmt::Display| {
        warn!(backend = %backend.name, error = %why, "backend failed while sending the response body");
        ex.log.note("backend_body_error");
        send.send_reset(Reason::INTERNAL_ERROR);
        true
    };
    loop {
        let piece = match c.timer.within(|| Instant::now() + stall_timeout, up.body.data()).await {
            Err(_) => return failed(ex, &mut send, &format!("no response data for {stall_timeout:?}")),
            Ok(None) => break,
            Ok(Some(Err(e))) => return failed(ex, &mut send, &e),
            Ok(Some(Ok(piece))) => piece,
        };
        let n = piece.len();
        match send_body(&mut send, &mut c.timer, send_limit, piece).await {
            Ok(()) => ex.log.bytes(n as u64),
            Err(why) => {
                why.record(&mut send, ex.log, c.client, send_limit);
                return true;
            }
        }
        let _ = up.body.flow_control().release_capacity(n);
    }
    let trailers = match c.timer.within(|| Instant::now() + stall_timeout, up.body.trailers()).await {
        Err(_) => return failed(ex, &mut send, &format!("no trailers for {stall_timeout:?}")),
        Ok(Err(e)) => return failed(ex, &mut send, &e),
        Ok(Ok(t)) => t,
    };
    let ended = match trailers {
        Some(fields) => send.send_trailers(fields),
        None => send.send_data(Bytes::new(), true),
    };
    if ended.is_err() {
        ex.log.note("client_aborted");
    }
    drop(in_flight);
    true
}

/// The client's half of the connection as the `h2` crate reads it: bytes the HTTP/1 loop
/// read already first, and every frame header looked at on the way (see [`FrameCounter`]).
struct Guarded {
    inner: ClientStream,
    prefix: Vec<u8>,
    /// Bytes of `prefix` given out.
    given: usize,
    counter: FrameCounter,
    flood: Arc<Notify>,
}

impl Guarded {
    fn new(inner: ClientStream, prefix: Vec<u8>, cfg: &Http2Config, flood: Arc<Notify>) -> Guarded {
        Guarded { inner, prefix, given: 0, counter: FrameCounter::new(cfg), flood }
    }

    fn scan(&mut self, bytes: &[u8]) {
        if self.counter.scan(bytes) {
            self.flood.notify_one();
        }
    }
}

/// Counts the frames the `h2` crate does not limit (see the module's comment) from the
/// frame headers of the bytes the client sends, per one-second window.
struct FrameCounter {
    /// Bytes of the preface or of the current frame's payload still to pass.
    skip: usize,
    header: [u8; 9],
    have: usize,
    window: Option<Instant>,
    resets: u32,
    control: u32,
    max_resets: u32,
    max_control: u32,
    /// Over a limit: nothing more is read, the connection ends.
    tripped: bool,
}

impl FrameCounter {
    fn new(cfg: &Http2Config) -> FrameCounter {
        FrameCounter {
            skip: PREFACE_LEN,
            header: [0; 9],
            have: 0,
            window: None,
            resets: 0,
            control: 0,
            max_resets: cfg.max_resets_per_second,
            max_control: cfg.max_control_frames_per_second,
            tripped: false,
        }
    }

    /// Look at the next bytes from the client; `true` when they went over a limit.
    fn scan(&mut self, mut bytes: &[u8]) -> bool {
        let was = self.tripped;
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (9 - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == 9 {
                self.have = 0;
                let h = self.header;
                self.skip = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                self.count(h[3], h[4]);
            }
        }
        self.tripped && !was
    }

    /// Count one frame of `kind` (RFC 9113 6) in this second's window.
    fn count(&mut self, kind: u8, flags: u8) {
        const RST_STREAM: u8 = 0x3;
        const SETTINGS: u8 = 0x4;
        const PING: u8 = 0x6;
        const ACK: u8 = 0x1;
        let reset = kind == RST_STREAM;
        let control = matches!(kind, SETTINGS | PING) && flags & ACK == 0;
        if !reset && !control {
            return;
        }
        let now = Instant::now();
        if self.window.is_none_or(|start| now.duration_since(start) >= Duration::from_secs(1)) {
            self.window = Some(now);
            self.resets = 0;
            self.control = 0;
        }
        let over = if reset {
            self.resets += 1;
            self.resets > self.max_resets
        } else {
            self.control += 1;
            self.control > self.max_control
        };
        self.tripped |= over;
    }
}

impl AsyncRead for Guarded {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.counter.tripped {
            // The connection is being ended: its GOAWAY goes out, nothing more comes in.
            return Poll::Pending;
        }
        if this.given < this.prefix.len() {
            let n = (this.prefix.len() - this.given).min(buf.remaining());
            let start = this.given;
            this.given += n;
            buf.put_slice(&this.prefix[start..start + n]);
            let prefix = std::mem::take(&mut this.prefix);
            this.scan(&prefix[start..start + n]);
            this.prefix = prefix;
            if this.given == this.prefix.len() {
                this.prefix = Vec::new();
                this.given = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            this.scan(&buf.filled()[before..]);
        }
        polled
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailer_section_of_a_chunked_tail() {
        let t = trailers(b"\r\n0\r\ngrpc-status: 0\r\ngrpc-message: ok\r\n\r\n").unwrap();
        assert_eq!(t.get("grpc-status").unwrap(), "0");
        assert_eq!(t.get("grpc-message").unwrap(), "ok");
        assert!(trailers(b"\r\n0\r\n\r\n").is_none());
        assert!(trailers(b"0;ext=1\r\ncontent-length: 5\r\nx: y\r\n\r\n").unwrap().get("content-length").is_none());
    }

    #[test]
    fn frames_over_the_limit_trip_the_counter() {
        let cfg = Http2Config { max_control_frames_per_second: 2, max_resets_per_second: 1, ..Http2Config::default() };
        let ping = |ack: u8| [&[0u8, 0, 8, 6, ack, 0, 0, 0, 0][..], &[0; 8]].concat();
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // Acks are answers, not counted; a DATA frame's payload is skipped whatever it holds.
        bytes.extend(ping(1));
        bytes.extend([0, 0, 9, 0, 0, 0, 0, 0, 1]);
        bytes.extend(ping(0)[..9].to_vec());
        bytes.extend(ping(0));
        bytes.extend(ping(0));
        bytes.extend(ping(0));
        let mut c = FrameCounter::new(&cfg);
        // Split anywhere: the scanner keeps its place across reads.
        assert!(!c.scan(&bytes[..30]));
        assert!(!c.scan(&bytes[30..bytes.len() - 17]));
        assert!(c.scan(&bytes[bytes.len() - 17..]));
        let mut r = FrameCounter::new(&cfg);
        let rst = [0u8, 0, 4, 3, 0, 0, 0, 0, 1, 0, 0, 0, 8];
        let mut resets = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        resets.extend(rst);
        assert!(!r.scan(&resets));
        assert!(r.scan(&rst));
    }
}
