//! The admin listener's connections: the router served by hyper with deadlines, so that a
//! client that connects and sends nothing, or half a request, cannot hold a connection (and a
//! file descriptor) for ever. `axum::serve` sets none.
//!
//! The deadlines are the data plane's client timeouts, as the config has them at start:
//! - `client_header`: a request head must be complete within it of the connection's start or
//!   of the previous response (hyper's header timeout, which runs while hyper waits for a
//!   head: an idle keep-alive connection closes after it too);
//! - `client_idle`: a connection with no byte read or written for that long closes, whatever
//!   it is doing (a client that stops reading its answer, say).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tower_service::Service;
use tracing::debug;

/// How long an admin connection may take, from `timeouts` of the config.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    pub header: Duration,
    pub idle: Duration,
}

/// Accept and serve admin connections for ever (the task is aborted to stop it).
pub async fn serve(listener: TcpListener, app: Router, deadlines: Deadlines) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, most likely: wait rather than spin on the error.
                debug!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(connection(stream, app.clone(), deadlines));
    }
}

async fn connection(stream: TcpStream, app: Router, deadlines: Deadlines) {
    let activity = Arc::new(AtomicU64::new(0));
    let io = TokioIo::new(Counted { inner: stream, activity: activity.clone() });
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let mut app = app.clone();
        // The router is always ready (axum): no poll_ready needed.
        async move { app.call(req).await }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(deadlines.header)
        .serve_connection(io, service);
    tokio::select! {
        result = conn => {
            if let Err(e) = result {
                debug!(error = %e, "admin connection ended");
            }
        }
        () = quiet_for(&activity, deadlines.idle) => debug!("admin connection idle: closed"),
    }
}

/// Return once `activity` has not moved for `limit` (checked every quarter of it).
async fn quiet_for(activity: &AtomicU64, limit: Duration) {
    let step = (limit / 4).max(Duration::from_millis(1));
    let mut seen = activity.load(Relaxed);
    let mut quiet = Duration::ZERO;
    loop {
        tokio::time::sleep(step).await;
        let now = activity.load(Relaxed);
        if now != seen {
            seen = now;
            quiet = Duration::ZERO;
        } else {
            quiet += step;
            if quiet >= limit {
                return;
            }
        }
    }
}

/// A stream that counts the reads and writes that moved bytes.
struct Counted {
    inner: TcpStream,
    activity: Arc<AtomicU64>,
}

impl AsyncRead for Counted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.fetch_add(1, Relaxed);
        }
        polled
    }
}

impl AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.fetch_add(1, Relaxed);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.fetch_add(1, Relaxed);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
