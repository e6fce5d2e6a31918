//! Client connection timeouts, enforced in the socket wrapper hyper reads through.
//!
//! hyper's own `header_read_timeout` closes the connection without an answer (its error has no
//! automatic response), and it also runs while a keep-alive connection waits for its next
//! request. So Velocity keeps its own timer here, on the read path hyper already polls:
//! - no request bytes yet (a new connection, or a keep-alive one between requests): after
//!   `client_header` (new) or `client_idle` (between requests) the read ends as EOF and hyper
//!   closes the connection quietly;
//! - some bytes of a request but not all of its headers: after `client_header` a 408 is
//!   written straight to the socket and the read fails, which closes the connection;
//! - a request being served (from its headers to the end of its response): no timer here; the
//!   request path has its own deadlines.
//!
//! A slow client costs one task and one timer; nothing here is shared between connections.
//!
//! The timer is lazy: a phase change only records its deadline, and the timer (whose reset
//! takes the runtime's timer lock) is moved only when it fires before that deadline or must
//! fire sooner. A request whose head arrives in one read never touches it, so a busy keep-alive
//! connection pays for no timer work per request.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tracing::debug;

/// After a 408, how long the rest of what the client sends is read and dropped before closing:
/// closing a socket with unread input sends a reset, which can make the client lose the 408.
const LINGER: Duration = Duration::from_secs(2);

const REQUEST_TIMEOUT_RESPONSE: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 20\r\nconnection: close\r\n\r\n408 request timeout\n";

/// Whether a request on this connection is being served; set by the service, read by the socket.
#[derive(Debug, Default)]
pub struct Activity {
    busy: AtomicBool,
    /// Requests started on this connection. hyper may serve a whole request without polling
    /// the socket in between, so the reader cannot rely on seeing `busy` to know that the
    /// request whose head it timed has been served.
    started: AtomicU64,
    /// The connection task, to wake when the response ends: hyper may have polled the socket
    /// (with no timer armed) before that, and would otherwise not poll it again until the
    /// client sends something, so the idle timer would never start. A per-connection lock,
    /// touched once per read while busy and once per request.
    reader: Mutex<Option<Waker>>,
}

impl Activity {
    /// Mark a request as being served until the guard is dropped (with its response body).
    pub fn busy(self: &Arc<Self>) -> BusyGuard {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.busy.store(true, Ordering::Relaxed);
        BusyGuard(self.clone())
    }
}

#[derive(Debug)]
pub struct BusyGuard(Arc<Activity>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::Relaxed);
        if let Some(w) = self.0.reader.lock().unwrap_or_else(|p| p.into_inner()).take() {
            w.wake();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No byte of the next request yet.
    Waiting,
    /// Part of a request's headers has arrived.
    Head,
    Busy,
    /// 408 sent: reading and dropping input until the client closes or `LINGER` passes.
    Closing,
}

pub struct ClientIo {
    inner: TcpStream,
    activity: Arc<Activity>,
    header_timeout: Duration,
    idle_timeout: Duration,
    phase: Phase,
    /// `Activity::started` when the reader last looked.
    seen: u64,
    /// When the current phase times out.
    deadline: Instant,
    /// When `timer` fires; may be earlier than `deadline` (it then re-arms) but never later.
    armed: Instant,
    timer: Pin<Box<Sleep>>,
    /// hyper holds unwritten response bytes; a 408 written now could land in the middle.
    write_blocked: bool,
}

impl ClientIo {
    pub fn new(inner: TcpStream, activity: Arc<Activity>, header_timeout: Duration, idle_timeout: Duration) -> Self {
        // A new connection gets `client_header` for its first request, as in NGINX.
        let deadline = Instant::now() + header_timeout;
        let timer = Box::pin(tokio::time::sleep_until(deadline));
        ClientIo {
            inner,
            activity,
            header_timeout,
            idle_timeout,
            phase: Phase::Waiting,
            seen: 0,
            deadline,
            armed: deadline,
            timer,
            write_blocked: false,
        }
    }

    /// Ready when `deadline` has passed; re-arms the timer when it fired early.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.armed > self.deadline {
            self.arm(self.deadline);
        }
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if self.armed >= self.deadline {
                return Poll::Ready(());
            }
            // Fired for an older, earlier deadline: wait on for the current one.
            self.arm(self.deadline);
        }
    }

    fn arm(&mut self, at: Instant) {
        self.timer.as_mut().reset(at);
        self.armed = at;
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.phase == Phase::Closing {
            return this.poll_linger(cx);
        }
        if this.activity.busy.load(Ordering::Relaxed) {
            this.phase = Phase::Busy;
            let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
            if polled.is_pending() {
                let mut reader = this.activity.reader.lock().unwrap_or_else(|p| p.into_inner());
                if !reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *reader = Some(cx.waker().clone());
                }
            }
            return polled;
        }
        let started = this.activity.started.load(Ordering::Relaxed);
        if this.phase == Phase::Busy || started != this.seen {
            // A response just ended: the connection is idle until the next request begins.
            this.seen = started;
            this.phase = Phase::Waiting;
            this.deadline = Instant::now() + this.idle_timeout;
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.phase == Phase::Waiting && buf.filled().len() > before {
                    this.phase = Phase::Head;
                    this.deadline = Instant::now() + this.header_timeout;
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        if this.poll_deadline(cx).is_pending() {
            return Poll::Pending;
        }
        if this.phase == Phase::Head {
            debug!(timeout = ?this.header_timeout, "client did not send its request headers in time: 408");
            if this.write_blocked {
                return Poll::Ready(Err(timed_out()));
            }
            // Best effort: the socket has room unless the client stopped reading, and the
            // connection closes either way.
            let _ = this.inner.try_write(REQUEST_TIMEOUT_RESPONSE);
            // FIN after the 408 (a shutdown of the write side completes at once).
            let _ = Pin::new(&mut this.inner).poll_shutdown(cx);
            this.phase = Phase::Closing;
            this.deadline = Instant::now() + LINGER;
            return this.poll_linger(cx);
        }
        // Idle: end the read as EOF, which hyper takes as the client closing.
        Poll::Ready(Ok(()))
    }
}

impl ClientIo {
    /// Drop input until the client closes or `LINGER` passes, then fail the read.
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut scratch = [0u8; 2048];
        loop {
            let mut sink = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.inner).poll_read(cx, &mut sink) {
                Poll::Ready(Ok(())) if sink.filled().is_empty() => return Poll::Ready(Err(timed_out())),
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        match self.poll_deadline(cx) {
            Poll::Ready(()) => Poll::Ready(Err(timed_out())),
            Poll::Pending => Poll::Pending,
        }
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "client_header timeout")
}

impl AsyncWrite for ClientIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.write_blocked = polled.is_pending();
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.write_blocked = polled.is_pending();
        polled
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
