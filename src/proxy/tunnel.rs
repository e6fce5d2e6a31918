//! Tunnels: two sockets spliced both ways until both sides are done. A WebSocket connection
//! after the backend's `101` and every TCP-mode connection (`crate::proxy::tcp`) end here.
//!
//! Each direction ends on its own: an end of stream from one side is passed on as a
//! half-close (FIN) to the other, which may go on sending (half-close honoured both ways).
//! The tunnel ends when both directions have ended, when either fails (a reset), or when no
//! byte has moved either way for `tunnel_idle`.
//!
//! A tunnel runs in its connection's task: a listener that stops (shutdown, or removed by a
//! reload) cuts it at `drain_timeout` by dropping that task's future, and a reload that keeps
//! the listener leaves it alone.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Buf;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tracing::debug;

use super::core::Exchange;
use super::downstream::h1::ClientConn;
use crate::http1::ClientFraming;
use crate::observe::{Direction, TcpCounters};
use crate::upstream::{BackendConn, InFlight};

/// Room for one read per direction: allocated when the tunnel starts, not per idle
/// connection.
const TUNNEL_BUFFER: usize = 16 * 1024;

/// How a tunnel ended.
#[derive(Debug)]
pub enum TunnelEnd {
    /// Both sides closed their sending side.
    Closed,
    /// Nothing moved either way for `tunnel_idle`.
    Idle,
    /// A read or write failed (most often a reset by one side).
    Failed(io::Error),
}

impl TunnelEnd {
    /// For the access log: `None` for a tunnel both sides closed.
    pub fn note(&self) -> Option<&'static str> {
        match self {
            TunnelEnd::Closed => None,
            TunnelEnd::Idle => Some("tunnel_idle"),
            TunnelEnd::Failed(_) => Some("tunnel_error"),
        }
    }
}

/// What a tunnel carried.
#[derive(Debug)]
pub struct Spliced {
    /// Bytes from the client to the backend (`a` to `b`).
    pub up: u64,
    /// Bytes from the backend to the client (`b` to `a`).
    pub down: u64,
    pub end: TunnelEnd,
}

/// Byte counts and the last activity, shared by the two directions (atomics rather than
/// `Cell`s: the connection's future must stay `Send`).
struct Activity {
    start: Instant,
    /// Milliseconds from `start` to the last byte moved either way.
    last_ms: AtomicU64,
    up: AtomicU64,
    down: AtomicU64,
}

impl Activity {
    fn moved(&self, dir: Direction, meters: &[&TcpCounters], n: usize) {
        let count = match dir {
            Direction::In => &self.up,
            Direction::Out => &self.down,
        };
        count.fetch_add(n as u64, Ordering::Relaxed);
        for m in meters {
            m.moved(dir, n as u64);
        }
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_until(&self, idle: Duration) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + idle
    }
}

/// Copy `a` to `b` and `b` to `a` until the tunnel ends (see the module's comment).
/// `a_pending` (already read from `a`) goes to `b` first, `b_pending` to `a`.
pub async fn splice<A, B>(a: &mut A, a_pending: &[u8], b: &mut B, b_pending: &[u8], idle: Duration) -> Spliced
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    splice_guarded(a, a_pending, b, b_pending, idle, false, &[]).await
}

/// [`splice`]; with `refuse_proxy_header`, a PROXY protocol header at the start of what `a`
/// sends fails the tunnel (`InvalidData`) before any of it reaches `b`: `a` is a peer that
/// `accept_proxy_protocol` does not list. Checked in the stream rather than before it, so
/// that a protocol in which the server speaks first still works. `meters` (TCP mode's
/// service and backend counters) get every byte as it moves, `a` to `b` as `In`.
pub async fn splice_guarded<A, B>(
    a: &mut A,
    a_pending: &[u8],
    b: &mut B,
    b_pending: &[u8],
    idle: Duration,
    refuse_proxy_header: bool,
    meters: &[&TcpCounters],
) -> Spliced
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity =
        Activity { start: Instant::now(), last_ms: AtomicU64::new(0), up: AtomicU64::new(0), down: AtomicU64::new(0) };
    // `tokio::io::split` rather than `TcpStream::split`: the client side may be TLS. Both
    // halves stay in this task, so its lock is never contended.
    let (mut a_read, mut a_write) = tokio::io::split(a);
    let (mut b_read, mut b_write) = tokio::io::split(b);
    let up = copy_half(&mut a_read, &mut b_write, a_pending, &activity, Direction::In, meters, refuse_proxy_header);
    let down = copy_half(&mut b_read, &mut a_write, b_pending, &activity, Direction::Out, meters, false);
    let idle_timer = async {
        loop {
            let until = activity.idle_until(idle);
            if until <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(until).await;
        }
    };
    let end = tokio::select! {
        done = async { tokio::try_join!(up, down) } => match done {
            Ok(_) => TunnelEnd::Closed,
            Err(e) => TunnelEnd::Failed(e),
        },
        () = idle_timer => TunnelEnd::Idle,
    };
    Spliced { up: activity.up.load(Ordering::Relaxed), down: activity.down.load(Ordering::Relaxed), end }
}

/// One direction: `pending`, then everything `from` sends, then a half-close of `to`.
async fn copy_half<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    from: &mut R,
    to: &mut W,
    pending: &[u8],
    activity: &Activity,
    dir: Direction,
    meters: &[&TcpCounters],
    mut refuse_proxy_header: bool,
) -> io::Result<()> {
    if !pending.is_empty() {
        to.write_all(pending).await?;
        to.flush().await?;
        activity.moved(dir, meters, pending.len());
    }
    let mut buf = vec![0u8; TUNNEL_BUFFER];
    // Bytes at the front of `buf` held back until the PROXY check can decide (at most 12).
    let mut held = 0;
    loop {
        let n = from.read(&mut buf[held..]).await?;
        let filled = held + n;
        if n > 0 && refuse_proxy_header {
            match crate::proxy_protocol::parse(&buf[..filled]) {
                Err(crate::proxy_protocol::Error::NotProxy) => refuse_proxy_header = false,
                Ok(crate::proxy_protocol::Parsed::Incomplete) if filled < 12 => {
                    held = filled;
                    continue;
                }
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "PROXY protocol header from an untrusted peer",
                    ))
                }
            }
        }
        if filled > 0 {
            to.write_all(&buf[..filled]).await?;
            // TLS holds records until flushed; a no-op on plain TCP.
            to.flush().await?;
            activity.moved(dir, meters, filled);
            held = 0;
        }
        if n == 0 {
            // The other side may still send: only our sending side towards it closes. It may
            // have gone already (a reset); that shows on its own direction.
            let _ = to.shutdown().await;
            return Ok(());
        }
    }
}

impl Exchange<'_> {
    /// The backend answered `101` to a WebSocket handshake: send its head on, then splice the
    /// two connections. The backend connection is not reused, and the request stays in flight
    /// on its backend (least connections, draining) until the tunnel ends.
    pub(super) async fn tunnel(
        &mut self,
        c: &mut ClientConn,
        conn: BackendConn,
        in_flight: InFlight,
        idle: Duration,
    ) -> bool {
        let backend = in_flight.backend().clone();
        c.resp.encode_for_client(&conn.buf, &mut c.out, ClientFraming::default());
        // `Upgrade` and `Connection` are hop-by-hop, so they were left out: this hop's go in
        // before the blank line that ends the head.
        c.out.truncate(c.out.len().saturating_sub(2));
        c.out.extend_from_slice(b"upgrade: websocket\r\nconnection: upgrade\r\n");
        if let Some(cookie) = self.set_cookie.take() {
            for part in [&b"set-cookie: "[..], &cookie, b"\r\n"] {
                c.out.extend_from_slice(part);
            }
        }
        c.out.extend_from_slice(b"\r\n");
        let (mut stream, mut after_head) = conn.into_parts();
        after_head.advance(c.resp.len);
        self.log.set(101, None, Some(&backend));
        let out = std::mem::take(&mut c.out);
        let written = c.write_all(&mut [std::io::IoSlice::new(&out)]).await;
        c.out = out;
        if written.is_err() {
            self.log.note("client_aborted");
            return false;
        }
        // What the client sent after its handshake (its first frames) goes first.
        let pending = std::mem::take(&mut c.buf);
        let spliced = splice(&mut c.stream, &pending, &mut stream, &after_head, idle).await;
        debug!(client = %c.client, backend = %backend.name, up = spliced.up, down = spliced.down, end = ?spliced.end, "websocket tunnel closed");
        self.log.end.bytes_in += spliced.up;
        self.log.end.bytes_out += spliced.down;
        if let Some((_, record)) = &mut self.log.access {
            record.bytes_in = Some(spliced.up);
        }
        if let Some(note) = spliced.end.note() {
            self.log.note(note);
        }
        drop(in_flight);
        // The client's connection was handed over to the tunnel: nothing can follow on it.
        false
    }
}
