//! One client connection: read a request head, hand it to the request path, repeat while the
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, info};

use super::forward;
use super::listener::ListenerSettings;
use super::stream::ClientStream;
use super::timer::LazyTimer;
use crate::config::Limits;
use crate::http1::{encode_local, ClientFraming, HeadError, RequestHead, ResponseHead};
use crate::observe::metrics::Reject;
use crate::state::Shared;
use crate::upstream::write_all_vectored;

/// After an error answer, how long the rest of what the client sends is read and dropped
/// before closing: closing a socket with unread input sends a reset, which can make the client
/// lose the answer.
const LINGER: Duration = Duration::from_secs(2);

const READ_BUFFER: usize = 8 * 1024;

/// Shared between a connection's loop and its listener's shutdown: whether the connection
/// waits for a request (and may be closed at once) and whether it must close after the
/// response in progress.
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

/// A client connection and what its requests share.
pub struct ClientConn {
    pub stream: ClientStream,
    /// Bytes read from the client and not yet used: the next head, or body bytes.
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
    /// Waiting for the next request since this instant, with nothing read.
    Idle(Instant),
}

/// Serve an accepted connection: the TLS handshake first on a TLS listener, within
/// `client_header` (as the first request's head is).
pub async fn serve_tcp(
    stream: TcpStream,
    client: SocketAddr,
    listener: Arc<ListenerSettings>,
    state: Shared,
    drain: &Drain,
) {
    let stream = match &listener.tls {
        None => ClientStream::Plain(stream),
        Some(acceptor) => {
            let timeout = state.load().config.limits.timeouts.client_header;
            match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => ClientStream::Tls(Box::new(tls)),
                Ok(Err(e)) => {
                    debug!(%client, listener = %listener.config.name, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%client, listener = %listener.config.name, ?timeout, "TLS handshake timed out (client_header)");
                    return;
                }
            }
        }
    };
    serve(stream, client, listener, state, drain).await;
}

async fn serve(
    stream: ClientStream,
    client: SocketAddr,
    listener: Arc<ListenerSettings>,
    state: Shared,
    drain: &Drain,
) {
    // Connection-level settings come from the config current at accept; a reload applies to
    // new connections.
    let limits = state.load().config.limits;
    let mut conn = ClientConn {
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
    };
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
            Busy::Idle(since) => {
                conn.release_buffers(&mut head);
                idle_until = since + limits.timeouts.client_idle;
            }
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
        let keep_alive = forward::handle(conn, head, drain).await;
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
        let read = conn.timer.within(deadline, read_head(&mut conn.stream, &mut conn.buf)).await;
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

/// Read more of a request head into `buf`. An empty buffer without room (an idle
/// connection's) gets its memory only once the socket is readable.
async fn read_head(stream: &mut ClientStream, buf: &mut BytesMut) -> io::Result<usize> {
    if buf.capacity() > buf.len() || stream.is_tls() {
        return read_more(stream, buf, READ_BUFFER).await;
    }
    loop {
        stream.readable().await?;
        buf.reserve(READ_BUFFER);
        match stream.try_read_buf(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            read => return read,
        }
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
