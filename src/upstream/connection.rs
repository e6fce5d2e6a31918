//! Keep-alive connections to one backend.
//!
//! A connection is a socket and its read buffer, nothing more: no task of its own and no
//! channel. The request that holds it writes and reads it directly (see `proxy::forward`), and
//! an idle one waits in its backend's pool with the socket still registered with the runtime,
//! so a close by the backend shows as read readiness when it is next taken out.

use std::fmt;
use std::io::{self, IoSlice};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::backend::Backend;
use super::stream::BackendStream;

/// What one read from a backend asks for at first: a small response comes whole.
const READ_BUFFER: usize = 16 * 1024;
/// The most one read asks for: a large body moves in few system calls (NGINX's default
/// `proxy_buffers` hold 64-128 KiB per request) without a large buffer per idle connection.
const MAX_READ: usize = 128 * 1024;

/// Why a connection to a backend could not be made. No request bytes were sent.
#[derive(Debug)]
pub enum ConnectError {
    Refused,
    Timeout,
    /// Velocity itself ran out of something (file descriptors, socket buffers, local ports):
    /// it says nothing about the backend, so it must not count against it.
    Local(io::Error),
    Io(io::Error),
    /// The TLS handshake with an https backend failed (its certificate, most often).
    Tls(io::Error),
}

impl ConnectError {
    fn from_io(e: io::Error) -> ConnectError {
        if e.kind() == io::ErrorKind::ConnectionRefused {
            ConnectError::Refused
        } else if is_local_exhaustion(&e) {
            ConnectError::Local(e)
        } else {
            ConnectError::Io(e)
        }
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Refused => f.write_str("connection refused"),
            ConnectError::Timeout => f.write_str("connect timeout"),
            ConnectError::Local(e) => write!(f, "cannot open a connection here: {e}"),
            ConnectError::Io(e) => write!(f, "connect error: {e}"),
            ConnectError::Tls(e) => write!(f, "TLS handshake failed: {e}"),
        }
    }
}

/// Whether `e` (from opening a socket or connecting) means this process or host is out of a
/// resource: too many open files (EMFILE, ENFILE), no buffer space or memory (ENOBUFS,
/// ENOMEM), no free local port (EADDRNOTAVAIL). HAProxy and Envoy do not hold these against
/// the server either: the server was never reached.
pub fn is_local_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL))
}

/// A connection to a backend, checked out for one request at a time.
#[derive(Debug)]
pub struct BackendConn {
    stream: BackendStream,
    /// Bytes read from the backend and not yet forwarded.
    pub buf: BytesMut,
    /// How much the next read asks for: doubles while reads fill it, up to `MAX_READ`.
    read_size: usize,
    /// Whether it came from the idle pool: a backend may close an idle connection just as it
    /// is reused, so a request that could not be written is worth one try on a fresh one.
    pub reused: bool,
    /// When it was last checked out (or opened): its idle time counts from there, which spares
    /// the request path a clock read when it gives the connection back.
    since: Instant,
    /// `since` + the idle timeout, added once per checkout: the two idle checks each
    /// request makes compare instants instead of subtracting them.
    expires: Instant,
}

impl BackendConn {
    fn new(stream: BackendStream) -> Self {
        let since = Instant::now();
        BackendConn {
            stream,
            buf: BytesMut::with_capacity(READ_BUFFER),
            read_size: READ_BUFFER,
            reused: false,
            since,
            expires: since + super::backend::IDLE_TIMEOUT,
        }
    }

    /// Read more from the backend into `buf`; `Ok(0)` is the backend closing.
    pub async fn read_more(&mut self) -> io::Result<usize> {
        self.buf.reserve(self.read_size);
        let room = self.buf.capacity() - self.buf.len();
        let n = self.stream.read_buf(&mut self.buf).await?;
        if n == room {
            self.read_size = (self.read_size * 2).min(MAX_READ);
        }
        Ok(n)
    }

    /// Expect about `n` more bytes: the next reads ask for that much (within `MAX_READ`).
    pub fn expect_bytes(&mut self, n: u64) {
        self.read_size = (n.min(MAX_READ as u64) as usize).max(self.read_size);
    }

    /// Write all of `parts` (most often in one `writev`). Returns how many bytes went out when
    /// it fails, so the caller knows whether the backend saw any of the request.
    pub async fn write_all_vectored(&mut self, parts: &mut [IoSlice<'_>]) -> Result<(), (io::Error, usize)> {
        write_all_vectored(&mut self.stream, parts).await?;
        // TLS keeps records the socket did not take; plain TCP has nothing to flush.
        if self.stream.is_tls() {
            self.stream.flush().await.map_err(|e| (e, 0))?;
        }
        Ok(())
    }

    /// The socket and what was read past the last response head, for a connection that leaves
    /// HTTP (a WebSocket tunnel): it never goes back to the pool.
    pub fn into_parts(self) -> (BackendStream, BytesMut) {
        (self.stream, self.buf)
    }

    /// Whether an idle connection may carry a request: not idle too long, not closed.
    fn usable(&mut self, now: Instant) -> bool {
        now < self.expires && !self.is_stale()
    }

    /// Whether the backend closed (or wrote to) this idle connection: both make it unusable.
    /// Looks only at the readiness the runtime already has, so a live connection costs no
    /// system call.
    fn is_stale(&mut self) -> bool {
        self.stream.is_stale()
    }
}

/// `write_all` for a gather list: one system call for a head and a body that are in two buffers.
pub async fn write_all_vectored<S: AsyncWrite + Unpin>(
    stream: &mut S,
    parts: &mut [IoSlice<'_>],
) -> Result<(), (io::Error, usize)> {
    let mut parts = parts;
    let mut written = 0;
    while !parts.is_empty() {
        match stream.write_vectored(parts).await {
            Ok(0) => return Err((io::ErrorKind::WriteZero.into(), written)),
            Ok(n) => {
                written += n;
                IoSlice::advance_slices(&mut parts, n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((e, written)),
        }
    }
    Ok(())
}

impl Backend {
    /// A ready connection: a pooled idle one if there is one, otherwise a new one.
    pub async fn checkout(
        self: &Arc<Self>,
        connect_timeout: Duration,
        now: Instant,
    ) -> Result<BackendConn, ConnectError> {
        if let Some(conn) = self.take_idle(now) {
            return Ok(conn);
        }
        self.connect(connect_timeout).await
    }

    /// Open a new connection, not taken from the pool.
    pub async fn connect(self: &Arc<Self>, connect_timeout: Duration) -> Result<BackendConn, ConnectError> {
        let started = Instant::now();
        let stream = self.open_stream(connect_timeout).await?;
        self.note_connection_opened();
        self.metrics.connect_time.observe_us(started.elapsed().as_micros() as u64);
        Ok(BackendConn::new(stream))
    }

    /// TCP, then TLS for an https backend, within `connect_timeout`; counted nowhere (health
    /// checks use it too).
    pub async fn open_stream(&self, connect_timeout: Duration) -> Result<BackendStream, ConnectError> {
        let started = Instant::now();
        let stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(self.addr)).await {
            Err(_) => return Err(ConnectError::Timeout),
            Ok(Err(e)) => return Err(ConnectError::from_io(e)),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        let stream = match &self.tls {
            None => BackendStream::Plain(stream),
            // The handshake is part of connecting: within the same `connect` timeout, and a
            // failed one counts as a failed connect (no request byte was sent).
            Some(tls) => match tokio::time::timeout_at((started + connect_timeout).into(), tls.handshake(stream)).await
            {
                Err(_) => return Err(ConnectError::Timeout),
                Ok(Err(e)) => return Err(ConnectError::Tls(e)),
                Ok(Ok(s)) => s,
            },
        };
        Ok(stream)
    }

    /// Take a reusable idle connection, newest first (it is the least likely to have timed out).
    fn take_idle(&self, now: Instant) -> Option<BackendConn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(mut conn) = idle.pop_back() {
            if conn.usable(now) {
                conn.reused = true;
                conn.since = now;
                conn.expires = now + super::backend::IDLE_TIMEOUT;
                return Some(conn);
            }
        }
        None
    }

    /// Give a connection back after a complete exchange. Only a connection with nothing unread
    /// is reusable: stray bytes would be taken for the next response.
    /// A draining (or disabled) backend keeps none: its connections close as its requests end.
    pub fn put_idle(&self, mut conn: BackendConn) {
        if !conn.buf.is_empty() || !self.is_active() {
            return;
        }
        let now = conn.since;
        if conn.read_size > READ_BUFFER {
            // A large body went through: do not keep its buffer while idle.
            conn.read_size = READ_BUFFER;
            conn.buf = BytesMut::new();
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // Connections at the front are only reached after a burst; without a task of their
        // own they would hold a socket the backend closed. Close a couple per return, so the
        // work stays constant.
        for _ in 0..2 {
            if idle.front_mut().is_some_and(|oldest| !oldest.usable(now)) {
                idle.pop_front();
            } else {
                break;
            }
        }
        if idle.len() >= super::backend::MAX_IDLE_PER_BACKEND {
            // Drop the oldest: it is the most likely to be closed by the backend soon.
            idle.pop_front();
        }
        idle.push_back(conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_connections_the_backend_closed_are_dropped_not_reused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backend = Backend::new("b".into(), addr, &addr.to_string());
        let mut server_side = Vec::new();
        for _ in 0..3 {
            let conn = backend.connect(Duration::from_secs(1)).await.unwrap();
            server_side.push(listener.accept().await.unwrap().0);
            backend.put_idle(conn);
        }
        assert_eq!(backend.idle_connections(), 3);
        // The backend closes the oldest and the newest; the runtime sees each close as
        // readiness once it polls, so wait for it.
        drop(server_side.remove(2));
        drop(server_side.remove(0));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let stale = {
                let mut idle = backend.idle.lock().unwrap();
                idle.iter_mut().map(|c| c.is_stale()).filter(|stale| *stale).count()
            };
            if stale == 2 {
                break;
            }
            assert!(Instant::now() < deadline, "closes not seen");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Taking skips the closed newest one; returning prunes the closed oldest one.
        let conn = backend.checkout(Duration::from_secs(1), Instant::now()).await.unwrap();
        assert!(conn.reused);
        assert_eq!(backend.idle_connections(), 1);
        backend.put_idle(conn);
        assert_eq!(backend.idle_connections(), 1);
        assert_eq!(backend.connections_opened(), 3);
    }
}
