//! The backend's side of a request: one try at one backend (a pooled connection or a new
//! one), the request head and body sent, the response head read into `Session::resp`. The
//! downstream session then streams the body back (`Downstream::relay`) from the [`Upstream`]
//! the try returned.
//!
//! One variant per backend protocol, dispatched in [`Exchange::attempt`]:
//! - [`Upstream::H1`] (`h1.rs`): an HTTP/1.1 connection from the backend's pool, Velocity's
//!   own encoder and parser.
//! - [`Upstream::H2`] (`h2.rs`): HTTP/2 and h2c backends (`backend_protocol: h2|h2c`), a
//!   stream on one of the backend's multiplexed connections (`crate::upstream::h2`). Its try
//!   takes the request head (`RequestHead`: method, authority, path, headers; its body read
//!   with `Downstream::read_body` as the H1 try does) and gives back the response head
//!   (status and headers into `Session::resp`, so that the core and the access log read it
//!   as they read an HTTP/1 one), then the body as it streams and its trailers
//!   ([`H2Upstream`]). The downstream `relay`s have an arm for it: body pieces to the client
//!   as they come, trailers at the end (HTTP/1 clients get them as a chunked trailer
//!   section). A stream the backend did not process (refused, above a GOAWAY) or a failed
//!   connect is `AttemptError::NotSent`, so the core's retry loop fails over as for a
//!   refused connect.

mod h1;
mod h2;

pub use h2::H2Upstream;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::core::Exchange;
use super::downstream::{Downstream, Session};
use crate::http1::ChunkedScanner;
use crate::upstream::{Backend, BackendConn, ConnectError};

/// What a successful try leaves: the connection (or stream) the response body comes from.
pub enum Upstream {
    H1(BackendConn),
    /// Boxed: a stream's handles are larger than a connection, and the H1 path should not
    /// carry their size.
    H2(Box<H2Upstream>),
}

/// The request body, as far as it has been read from the client.
pub enum ReqBody {
    None,
    /// Read whole before the first try, so a retry can send it again.
    Buffered(Bytes),
    /// Streamed from the client while it is sent: bytes still to come.
    Length(u64),
    Chunked(ChunkedScanner),
    /// Streamed to a backend already: the request cannot be sent again.
    Gone,
}

impl ReqBody {
    /// Whether the request can be sent again as it was.
    pub fn replayable(&self) -> bool {
        matches!(self, ReqBody::None | ReqBody::Buffered(_))
    }
}

/// Why one exchange with one backend failed.
pub enum AttemptError {
    /// Nothing reached the backend: the request may go to the next one.
    NotSent(String),
    /// No connection could be opened for a reason of Velocity's own (out of file descriptors,
    /// say): not the backend's failure, and another backend would fare no better.
    Local(String),
    /// The backend failed after (part of) the request was sent.
    Sent(String),
    /// No response headers in time: 504.
    Timeout(TimeoutKind),
    /// The client's (chunked) body went over `max_body_bytes` while it was being sent: 413.
    BodyTooLarge,
    /// The client's body ended early or was malformed: nothing more can be done.
    ClientBody(&'static str),
    /// The client closed its connection while waiting for the answer.
    ClientGone,
}

/// Which deadline ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutKind {
    /// `backend_response`: the backend took too long to answer this attempt.
    Backend,
    /// `request`: the whole exchange took too long.
    Request,
}

/// What bounds one try at a backend.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// About when the try starts (the request's arrival, or later after a wait): for the
    /// connect timeout and the idle pool. `backend_response` does not count from here but
    /// from when the request has been written (see `h1::read_response_head`).
    pub now: Instant,
    pub connect: Duration,
    pub backend_response: Duration,
    /// The request's deadline (sending the body counts against it).
    pub deadline: Instant,
    pub max_body: Option<u64>,
    /// A WebSocket handshake: a `101` answer is taken (and the connections spliced).
    pub upgrade: bool,
}

impl Bounds {
    /// When the response head must have come if the request was all sent at `sent`:
    /// `backend_response` later, but never past the request's deadline.
    pub fn response(&self, sent: Instant) -> (Instant, TimeoutKind) {
        let backend = sent + self.backend_response;
        if backend < self.deadline {
            (backend, TimeoutKind::Backend)
        } else {
            (self.deadline, TimeoutKind::Request)
        }
    }
}

impl Exchange<'_> {
    /// One try at one backend: a pooled connection (or a new one), then the exchange. A pooled
    /// connection that the backend had closed fails without an answer; the request is then
    /// sent once more on a fresh connection if it can be.
    pub(super) async fn attempt<D: Downstream>(
        &mut self,
        c: &mut Session<D>,
        body: &mut ReqBody,
        backend: &Arc<Backend>,
        bounds: Bounds,
    ) -> Result<Upstream, AttemptError> {
        if bounds.now >= bounds.deadline {
            return Err(AttemptError::Timeout(TimeoutKind::Request));
        }
        if backend.protocol.is_h2() {
            return self.attempt_h2(c, body, backend, bounds).await;
        }
        let connect_timeout = bounds.connect.min(bounds.deadline - bounds.now);
        let mut conn = match backend.checkout(connect_timeout, bounds.now.into_std()).await {
            Ok(conn) => conn,
            Err(e) => return Err(connect_failed(e)),
        };
        match self.exchange(c, body, backend, &mut conn, bounds).await {
            Ok(()) => Ok(Upstream::H1(conn)),
            // Only when nothing was sent: a backend that read the request and then closed may
            // have acted on it, and that is for the retry policy to judge.
            Err(AttemptError::NotSent(_)) if conn.reused && body.replayable() => {
                let mut fresh = match backend.connect(connect_timeout).await {
                    Ok(conn) => conn,
                    Err(e) => return Err(connect_failed(e)),
                };
                self.exchange(c, body, backend, &mut fresh, bounds).await.map(|()| Upstream::H1(fresh))
            }
            Err(e) => Err(e),
        }
    }
}

/// A failed connect as the retry loop sees it.
fn connect_failed(e: ConnectError) -> AttemptError {
    match e {
        ConnectError::Local(_) => AttemptError::Local(e.to_string()),
        e => AttemptError::NotSent(e.to_string()),
    }
}
