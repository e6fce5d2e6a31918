//! HTTP/1.x to clients. One client connection: read a request head, hand it to the request path, repeat while the
//! connection is kept alive. Client-side timeouts live here:
//! - no byte of the next request yet: after `client_header` (a new connection) or
//!   `client_idle` (between requests) the connection closes quietly;
//! - part of a request's headers but not all: after `client_header` a 408 goes out and the
//!   connection closes;
//! - a request being served: the request path's own deadlines apply.
//!
//! A slow client costs one task and one timer; nothing here is shared between connections.
//!
//! An idle connection holds no buffer: the read buffer is allocated when bytes arrive, and
//! the buffers requests use (read buffer, head scratch, header lists, the request path's
//! state, which is most of a task's size) are given back when the connection has waited
//! `IDLE_GRACE` for its next request with nothing read. An idle keep-alive connection is then
//! the task's small loop state, the socket and a timer (figures: README, Limits).

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{read_more, send, Downstream, Drain, Session, Waited};
use crate::http1::{encode_local, ChunkedScanner, ClientFraming, Framing, HeadError, RequestHead};
use crate::observe::metrics::Reject;
use crate::proxy::core::{self, Exchange};
use crate::proxy::listener::ListenerSettings;
use crate::proxy::stream::ClientStream;
use crate::proxy::upstream::Upstream;
use crate::request::{Protocol, Scheme};
use crate::state::Shared;
use crate::upstream::{BackendConn, InFlight};

/// After an error answer, how long the rest of what the client sends is read and dropped
/// before closing: closing a socket with unread input sends a reset, which can make the client
/// lose the answer.
const LINGER: Duration = Duration::from_secs(2);

const READ_BUFFER: usize = 8 * 1024;

/// The HTTP/1 connection: a session over the client's socket.
pub type ClientConn = Session<ClientStream>;

impl ClientConn {
    pub async fn write_all(&mut self, parts: &mut [IoSlice<'_>]) -> io::Result<()> {
        send(&mut self.stream, &mut self.timer, self.limits.timeouts.client_send, parts).await
    }

    /// Write one of Velocity's own answers. `close`: the connection ends after it.
    pub async fn write_local(&mut self, status: u16, extra: &[(&str, &[u8])], body: &[u8], close: bool, version: u8) {
        let mut out = std::mem::take(&mut self.out);
        let framing = ClientFraming { chunked: false, close, keep_alive_10: version == 0 && !close };
        encode_local(&mut out, status, extra, body.len(), framing);
        let _ = self.write_all(&mut [IoSlice::new(&out), IoSlice::new(body)]).await;
        self.out = out;
    }

    /// Give back what only a request in progress needs, before waiting for the next one.
    fn release_buffers(&mut self, head: &mut RequestHead) {
        self.buf = BytesMut::new();
        self.out = Vec::new();
        self.resp.release();
        head.release();
    }

    /// One of Velocity's own answers, then the connection closes.
    async fn answer_and_close(&mut self, status: u16, body: &[u8]) {
        self.write_local(status, &[], body, true, 1).await;
        self.close_gracefully().await;
    }

    /// Half-close, then read and drop input until the client closes or `LINGER` passes.
    pub async fn close_gracefully(&mut self) {
        let _ = self.stream.shutdown().await;
        let deadline = Instant::now() + LINGER;
        // On the heap: an array here would be part of every connection task's size.
        let mut scratch = vec![0u8; 2048];
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut scratch)).await {
                Ok(Ok(n)) if n > 0 => continue,
                _ => return,
            }
        }
    }
}

/// How long a kept-alive connection waits for its next request with its buffers before it
/// gives them back. A busy connection keeps them (large allocations and the boxing of the
/// request path per request cost about a quarter more instructions per request), an idle
/// one is small; for this the connection's timer moves about once per `IDLE_GRACE` while
/// it is busy, not once per request. Short, so that a burst of requests on many
/// connections leaves little memory held at once.
const IDLE_GRACE: Duration = Duration::from_millis(50);

/// What reading the next request head gave.
enum Next {
    Request,
    /// The client closed, went idle too long, or the connection is draining.
    Close,
    /// Nothing of a next request for `IDLE_GRACE` since this instant: time to go idle.
    Idle(Instant),
    /// Headers started but did not finish within `client_header`.
    TimedOut,
    Bad(HeadError),
}

/// How a run of requests ended.
enum Busy {
    Done,
    /// The first bytes are HTTP/2's connection preface (h2c with prior knowledge).
    H2,
    /// Waiting for the next request since this instant, with nothing read.
    Idle(Instant),
}

/// Serve an accepted connection: the TLS handshake first on a TLS listener, within
/// `client_header` (as the first request's head is). One future for both, so that a plain
/// connection's requests are not polled through an extra layer.
pub async fn serve(
    stream: TcpStream,
    client: SocketAddr,
    listener: Arc<ListenerSettings>,
    state: Shared,
    drain: &Drain,
) {
    let stream = match &listener.tls {
        None => ClientStream::Plain(stream),
        // Boxed: inline, the handshake's state would be part of every connection's task
        // (idle and plain ones included) for the connection's whole life.
        Some(acceptor) => match Box::pin(handshake(acceptor, stream, client, &listener, &state)).await {
            Some(tls) => tls,
            None => return,
        },
    };
    // Connection-level settings come from the config current at accept; a reload applies to
    // new connections.
    let limits = state.load().config.limits;
    if stream.alpn_h2() {
        // Boxed: an HTTP/1 connection's task does not carry HTTP/2's state.
        return Box::pin(super::h2::serve(stream, Vec::new(), client, listener, state, drain)).await;
    }
    let mut conn = ClientConn::new(stream, client, limits, listener, state);
    let mut head = RequestHead::default();
    let mut first = true;
    let mut idle_until = Instant::now() + limits.timeouts.client_header;
    loop {
        // Idle: no buffers, and this loop's state is all the task holds.
        if !wait_readable(&mut conn, idle_until, drain).await {
            return;
        }
        // Busy: requests back to back. Boxed, so that the request path's state (a few KiB of
        // nested futures) exists only while the connection is busy.
        match Box::pin(serve_busy(&mut conn, &mut head, &mut first, drain)).await {
            Busy::Done => return,
            Busy::H2 => {
                // h2c by prior knowledge: the preface was read as the start of a request.
                let preface = std::mem::take(&mut conn.buf).to_vec();
                let Session { stream, client, listener, state, .. } = conn;
                return Box::pin(super::h2::serve(stream, preface, client, listener, state, drain)).await;
            }
            Busy::Idle(since) => {
                conn.release_buffers(&mut head);
                idle_until = since + limits.timeouts.client_idle;
            }
        }
    }
}

async fn handshake(
    acceptor: &tokio_rustls::TlsAcceptor,
    stream: TcpStream,
    client: SocketAddr,
    listener: &ListenerSettings,
    state: &Shared,
) -> Option<ClientStream> {
    let timeout = state.load().config.limits.timeouts.client_header;
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Some(ClientStream::Tls(Box::new(tls))),
        Ok(Err(e)) => {
            debug!(%client, listener = %listener.config.name, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            debug!(%client, listener = %listener.config.name, ?timeout, "TLS handshake timed out (client_header)");
            None
        }
    }
}

/// Wait, holding nothing, until the client sends something (`true`) or `deadline` passes, the
/// client closes or the connection drains (`false`).
async fn wait_readable(conn: &mut ClientConn, deadline: Instant, drain: &Drain) -> bool {
    drain.idle.store(true, Ordering::Relaxed);
    if drain.is_draining() {
        return false;
    }
    let ready = conn.timer.within(|| deadline, conn.stream.readable()).await;
    drain.idle.store(false, Ordering::Relaxed);
    matches!(ready, Ok(Ok(())))
}

/// Serve requests until the connection closes or waits `IDLE_GRACE` for the next one.
async fn serve_busy(conn: &mut ClientConn, head: &mut RequestHead, first: &mut bool, drain: &Drain) -> Busy {
    let client = conn.client;
    loop {
        match next_request(conn, head, *first, drain).await {
            Next::Request => {}
            Next::Close => return Busy::Done,
            Next::Idle(since) => return Busy::Idle(since),
            Next::TimedOut => {
                let timeout = conn.limits.timeouts.client_header;
                debug!(%client, ?timeout, "client did not send its request headers in time: 408");
                conn.state.load().metrics.unrouted.before_routing(408, Some(Reject::Timeout));
                conn.answer_and_close(408, b"408 request timeout\n").await;
                return Busy::Done;
            }
            // Only a failed parse looks for the preface: HTTP/1.1 requests pay nothing for it.
            Next::Bad(_) if *first && conn.buf.starts_with(b"PRI * HTTP/2") && conn.listener.http2.is_some() => {
                return Busy::H2;
            }
            Next::Bad(e) => {
                let (status, body) = match e {
                    HeadError::TooLarge => (431, "431 request header fields too large\n".to_string()),
                    HeadError::UnsupportedEncoding => (501, "501 not implemented: transfer-encoding\n".to_string()),
                    HeadError::MethodNotAllowed => {
                        (405, "405 method not allowed: Velocity is not a forward proxy (CONNECT)\n".to_string())
                    }
                    HeadError::Malformed(why) => (400, format!("400 bad request: {why}\n")),
                };
                info!(%client, status, error = e.message(), "malformed request answered and closed");
                conn.state
                    .load()
                    .metrics
                    .unrouted
                    .before_routing(status, (status == 431).then_some(Reject::HeaderTooLarge));
                conn.answer_and_close(status, body.as_bytes()).await;
                return Busy::Done;
            }
        }
        *first = false;
        let keep_alive = core::handle(conn, head, drain).await;
        if !keep_alive {
            conn.close_gracefully().await;
            return Busy::Done;
        }
        if drain.is_draining() {
            let _ = conn.stream.shutdown().await;
            return Busy::Done;
        }
    }
}

async fn next_request(conn: &mut ClientConn, head: &mut RequestHead, first: bool, drain: &Drain) -> Next {
    let max = conn.limits.max_header_bytes;
    let (client_header, client_idle) = (conn.limits.timeouts.client_header, conn.limits.timeouts.client_idle);
    // Set once the first byte of the head arrives.
    let mut head_deadline: Option<Instant> = None;
    loop {
        if !conn.buf.is_empty() {
            match head.parse(&mut conn.buf, max) {
                Ok(true) => return Next::Request,
                Ok(false) => {}
                Err(e) => return Next::Bad(e),
            }
        }
        let waiting = conn.buf.is_empty();
        if waiting {
            drain.idle.store(true, Ordering::Relaxed);
            if drain.is_draining() {
                return Next::Close;
            }
        } else if head_deadline.is_none() {
            // Part of a head is here (a head that comes whole never gets this far): it has
            // `client_header` from now, however the rest trickles in.
            head_deadline = Some(Instant::now() + client_header);
        }
        let idle = if first { client_header } else { client_idle };
        // With nothing read, wait at most `IDLE_GRACE` here; the rest of the idle time is
        // waited without buffers (`serve`).
        let mut since = None;
        let ended = conn.clock.take();
        let deadline = || {
            head_deadline.unwrap_or_else(|| {
                let now = ended.unwrap_or_else(Instant::now);
                since = Some(now);
                now + idle.min(IDLE_GRACE)
            })
        };
        // A buffer with room is read into at once (one future less on every request); an
        // empty one without room (given back while idle) gets its memory once bytes arrive.
        // TLS always reads at once: rustls may hold decrypted bytes the socket will not signal.
        let read = if conn.buf.capacity() > conn.buf.len() || conn.stream.is_tls() {
            conn.timer.within(deadline, read_more(&mut conn.stream, &mut conn.buf, READ_BUFFER)).await
        } else {
            conn.timer.within(deadline, read_into_empty(&mut conn.stream, &mut conn.buf)).await
        };
        drain.idle.store(false, Ordering::Relaxed);
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => return Next::Close,
            Ok(Ok(_)) => {}
            Err(_) if waiting => {
                return match since {
                    Some(since) if idle > IDLE_GRACE => Next::Idle(since),
                    _ => Next::Close,
                }
            }
            Err(_) => return Next::TimedOut,
        }
    }
}

/// Read the start of a request head into `buf`, which has no room (an idle connection's, plain TCP): it gets its memory only once the socket is readable.
async fn read_into_empty(stream: &mut ClientStream, buf: &mut BytesMut) -> io::Result<usize> {
    loop {
        stream.readable().await?;
        buf.reserve(READ_BUFFER);
        match stream.try_read_buf(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            read => return read,
        }
    }
}

/// Bytes of the client's next requests read while a response is awaited; beyond this the
/// client is no longer watched (TCP holds the rest back).
const MAX_PIPELINED: usize = 64 * 1024;

impl Downstream for ClientStream {
    const PROTOCOL: Protocol = Protocol::Http1;

    fn scheme(&self) -> Scheme {
        if self.is_tls() {
            Scheme::Https
        } else {
            Scheme::Http
        }
    }

    async fn read_body(&mut self, buf: &mut BytesMut, want: usize) -> io::Result<usize> {
        read_more(self, buf, want).await
    }

    async fn send_continue(c: &mut ClientConn) -> io::Result<()> {
        let continue_line: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
        c.write_all(&mut [IoSlice::new(continue_line)]).await
    }

    /// Read from the backend, watching the client meanwhile: a client that closes while its
    /// answer is awaited gets its backend request abandoned, as NGINX does (`499` in the log),
    /// rather than holding a backend connection until the answer comes. Bytes the client sends
    /// meanwhile (a pipelined request) are kept, up to a bound.
    async fn backend_or_client(&mut self, buf: &mut BytesMut, conn: &mut BackendConn) -> Waited {
        let client = self;
        let mut backend = pin!(conn.read_more());
        loop {
            if buf.len() >= MAX_PIPELINED {
                return Waited::Backend(backend.await);
            }
            tokio::select! {
                biased;
                read = backend.as_mut() => return Waited::Backend(read),
                // The read-readiness slot rather than `readable()` (a waiter list entry under a
                // lock): this task is the client's only reader, and this wait is on every request.
                ready = std::future::poll_fn(|cx| client.poll_read_ready(cx)) => {
                    if ready.is_err() {
                        return Waited::ClientGone;
                    }
                    buf.reserve(4096);
                    match client.try_read_buf(buf) {
                        Ok(0) => return Waited::ClientGone,
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => return Waited::ClientGone,
                    }
                }
            }
        }
    }

    async fn write_local(
        c: &mut ClientConn,
        status: u16,
        extra: &[(&str, &[u8])],
        body: &[u8],
        close: bool,
        version: u8,
    ) {
        c.write_local(status, extra, body, close, version).await
    }

    async fn upgrade(
        ex: &mut Exchange<'_>,
        c: &mut ClientConn,
        upstream: Upstream,
        in_flight: InFlight,
        idle: Duration,
    ) -> bool {
        match upstream {
            Upstream::H1(conn) => ex.tunnel(c, conn, in_flight, idle).await,
            // HTTP/2 has no 101 (RFC 9113 8.6): an h2 try never asks for an upgrade.
            Upstream::H2(_) => false,
        }
    }

    /// The backend's bytes as they come: the head re-encoded, the body as it is framed.
    async fn relay(
        ex: &mut Exchange<'_>,
        c: &mut ClientConn,
        upstream: Upstream,
        in_flight: InFlight,
        stall_timeout: Duration,
    ) -> bool {
        let mut conn = match upstream {
            Upstream::H1(conn) => conn,
            Upstream::H2(h2) => return relay_h2(ex, c, *h2, in_flight, stall_timeout).await,
        };
        let head = ex.head;
        let backend = in_flight.backend().clone();
        let framing = c.resp.framing(&head.method);
        // An HTTP/1.0 client cannot take chunks: the body goes out decoded, ended by the close.
        let decode = framing == Framing::Chunked && head.version == 0;
        let close =
            !head.keep_alive() || ex.body_pending || ex.drain.is_draining() || framing == Framing::UntilClose || decode;
        let client_framing = ClientFraming {
            chunked: framing == Framing::Chunked && !decode,
            close,
            keep_alive_10: head.version == 0 && !close,
        };
        c.resp.encode_for_client(&conn.buf, &mut c.out, client_framing);
        add_set_cookie(ex, c);
        conn.buf.advance(c.resp.len);
        ex.log.set(c.resp.status, None, Some(&backend));
        let reusable = c.resp.backend_keeps_alive();

        let send_limit = c.limits.timeouts.client_send;
        let mut head_out = true;
        let mut remaining = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        if remaining > conn.buf.len() as u64 {
            conn.expect_bytes(remaining - conn.buf.len() as u64);
        }
        let mut scanner = ChunkedScanner::new();
        let mut ranges = Vec::new();
        loop {
            let (ready, done) = match framing {
                Framing::None => (0, true),
                Framing::Length(_) => {
                    let n = remaining.min(conn.buf.len() as u64);
                    remaining -= n;
                    (n as usize, remaining == 0)
                }
                Framing::Chunked => match scanner.scan(&conn.buf, decode.then_some(&mut ranges)) {
                    Ok(n) => (n, scanner.is_done()),
                    Err(e) => {
                        warn!(backend = %backend.name, error = %e, "backend sent a malformed chunked body");
                        ex.log.note("backend_body_error");
                        return false;
                    }
                },
                Framing::UntilClose => (conn.buf.len(), false),
            };
            if ready > 0 || head_out {
                let head_part: &[u8] = if head_out { &c.out } else { &[] };
                let written = if decode {
                    let mut parts = Vec::with_capacity(ranges.len() + 1);
                    parts.push(IoSlice::new(head_part));
                    parts.extend(ranges.iter().map(|r| IoSlice::new(&conn.buf[r.clone()])));
                    let n: usize = ranges.iter().map(|r| r.len()).sum();
                    send(&mut c.stream, &mut c.timer, send_limit, &mut parts).await.map(|()| n)
                } else {
                    let parts = &mut [IoSlice::new(head_part), IoSlice::new(&conn.buf[..ready])];
                    send(&mut c.stream, &mut c.timer, send_limit, parts).await.map(|()| ready)
                };
                ranges.clear();
                match written {
                    Ok(n) => ex.log.bytes(n as u64),
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                        warn!(client = %c.client, timeout = ?send_limit, "client took no response data in time: response cut");
                        ex.log.note("client_timeout");
                        return false;
                    }
                    Err(e) => {
                        debug!(client = %c.client, error = %e, "client went away during the response");
                        ex.log.note("client_aborted");
                        return false;
                    }
                }
                head_out = false;
                conn.buf.advance(ready);
            }
            if done {
                break;
            }
            match c.timer.within(|| Instant::now() + stall_timeout, conn.read_more()).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(Ok(_)) if framing == Framing::UntilClose => return false,
                Ok(result) => {
                    let why = match result {
                        Err(e) => e.to_string(),
                        Ok(_) => "the backend closed the connection".to_string(),
                    };
                    warn!(backend = %backend.name, error = %why, "backend failed while sending the response body");
                    ex.log.note("backend_body_error");
                    return false;
                }
                Err(_) => {
                    warn!(backend = %backend.name, timeout = ?stall_timeout, "the backend sent no response data in time: response cut");
                    ex.log.note("backend_body_error");
                    return false;
                }
            }
        }
        if reusable {
            backend.put_idle(conn);
        }
        drop(in_flight);
        !close
    }
}

/// The balancer's `Set-Cookie` (sticky), if any, into the response head in `c.out`.
fn add_set_cookie(ex: &mut Exchange<'_>, c: &mut ClientConn) {
    if let Some(cookie) = ex.set_cookie.take() {
        // Before the blank line that ends the head.
        c.out.truncate(c.out.len().saturating_sub(2));
        // A cookie set over TLS is sent back over TLS only.
        let secure: &[u8] = if c.stream.is_tls() { b"; Secure" } else { b"" };
        for part in [&b"set-cookie: "[..], &cookie, secure, b"\r\n\r\n"] {
            c.out.extend_from_slice(part);
        }
    }
}

/// An HTTP/2 backend's answer to an HTTP/1 client: the head (in `c.resp`, from `up.head`),
/// then each DATA piece as it comes (a chunk, unless the length is known or the client is
/// HTTP/1.0), then the trailers as the chunked body's trailer section. Each piece's window
/// goes back to the backend only once the client took it, so a slow client slows its own
/// stream only.
async fn relay_h2(
    ex: &mut Exchange<'_>,
    c: &mut ClientConn,
    mut up: crate::proxy::upstream::H2Upstream,
    in_flight: InFlight,
    stall_timeout: Duration,
) -> bool {
    let head = ex.head;
    let backend = in_flight.backend().clone();
    let framing = c.resp.framing(&head.method);
    // An HTTP/1.0 client cannot take chunks: the body goes out as it is, ended by the close.
    let decode = framing == Framing::Chunked && head.version == 0;
    let close = !head.keep_alive() || ex.body_pending || ex.drain.is_draining() || decode;
    let client_framing = ClientFraming {
        chunked: framing == Framing::Chunked && !decode,
        close,
        keep_alive_10: head.version == 0 && !close,
    };
    c.resp.encode_for_client(&up.head, &mut c.out, client_framing);
    add_set_cookie(ex, c);
    ex.log.set(c.resp.status, None, Some(&backend));
    let send_limit = c.limits.timeouts.client_send;
    let chunked = client_framing.chunked;
    let mut head_out = true;
    let mut size_line = Vec::with_capacity(20);
    let body = &mut up.body;
    let failed = |ex: &mut Exchange<'_>, why: &dyn std::fmt::Display| {
        warn!(backend = %backend.name, error = %why, "backend failed while sending the response body");
        ex.log.note("backend_body_error");
        false
    };
    // The body, piece by piece; a body-less answer (HEAD, 204, 304) sends the head alone.
    let mut trailers = None;
    if framing != Framing::None {
        loop {
            let piece = match c.timer.within(|| Instant::now() + stall_timeout, body.data()).await {
                Err(_) => return failed(ex, &format!("no response data for {stall_timeout:?}")),
                Ok(None) => break,
                Ok(Some(Err(e))) => return failed(ex, &e),
                Ok(Some(Ok(piece))) => piece,
            };
            if piece.is_empty() {
                continue;
            }
            size_line.clear();
            if chunked {
                size_line.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            }
            let head_part: &[u8] = if head_out { &c.out } else { &[] };
            let end: &[u8] = if chunked { b"\r\n" } else { b"" };
            let parts =
                &mut [IoSlice::new(head_part), IoSlice::new(&size_line), IoSlice::new(&piece), IoSlice::new(end)];
            let written = send(&mut c.stream, &mut c.timer, send_limit, parts).await;
            if !client_took(ex, c.client, written, send_limit) {
                return false;
            }
            head_out = false;
            ex.log.bytes(piece.len() as u64);
            let _ = body.flow_control().release_capacity(piece.len());
        }
        trailers = match c.timer.within(|| Instant::now() + stall_timeout, body.trailers()).await {
            Err(_) => return failed(ex, &format!("no trailers for {stall_timeout:?}")),
            Ok(Err(e)) => return failed(ex, &e),
            Ok(Ok(t)) => t,
        };
    }
    // The last chunk with the trailer section (hop-by-hop trailers do not exist in HTTP/2).
    let mut tail = Vec::new();
    if chunked {
        tail.extend_from_slice(b"0\r\n");
        for (name, value) in trailers.iter().flatten() {
            for part in [name.as_str().as_bytes(), b": ", value.as_bytes(), b"\r\n"] {
                tail.extend_from_slice(part);
            }
        }
        tail.extend_from_slice(b"\r\n");
    }
    if head_out || !tail.is_empty() {
        let head_part: &[u8] = if head_out { &c.out } else { &[] };
        let parts = &mut [IoSlice::new(head_part), IoSlice::new(&tail)];
        let written = send(&mut c.stream, &mut c.timer, send_limit, parts).await;
        if !client_took(ex, c.client, written, send_limit) {
            return false;
        }
    }
    drop(up);
    drop(in_flight);
    !close
}

/// Whether a write to the client went through; notes and logs why not.
fn client_took(ex: &mut Exchange<'_>, client: SocketAddr, written: io::Result<()>, send_limit: Duration) -> bool {
    match written {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::TimedOut => {
            warn!(client = %client, timeout = ?send_limit, "client took no response data in time: response cut");
            ex.log.note("client_timeout");
            false
        }
        Err(e) => {
            debug!(client = %client, error = %e, "client went away during the response");
            ex.log.note("client_aborted");
            false
        }
    }
}
