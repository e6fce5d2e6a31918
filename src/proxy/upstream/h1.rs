//! The HTTP/1.1 exchange with a backend: the head encoded by Velocity, the body streamed as
//! the client sends it, the response head parsed.

use std::io::IoSlice;

use bytes::Buf;
use tokio::time::Instant;

use super::{AttemptError, Bounds, ReqBody, TimeoutKind};
use crate::http1::Forwarding;
use crate::proxy::core::Exchange;
use crate::proxy::downstream::{Downstream, Session, Waited, BODY_READ};
use crate::upstream::{Backend, BackendConn};

/// A backend's response head may not be larger than this: 502.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

impl Exchange<'_> {
    /// Send the request on `conn` and read the response head into `c.resp`.
    pub(super) async fn exchange<D: Downstream>(
        &mut self,
        c: &mut Session<D>,
        body: &mut ReqBody,
        backend: &Backend,
        conn: &mut BackendConn,
        bounds: Bounds,
    ) -> Result<(), AttemptError> {
        let fwd = Forwarding { client_ip: &c.client_ip, proto: c.stream.scheme().as_bytes() };
        self.head.encode_for_backend(&mut c.out, &fwd, backend.host_header.as_bytes());
        let sent = match body {
            // A backend that does not take the request in is bounded by the request deadline:
            // `backend_response` starts once it has all of it.
            ReqBody::None => {
                c.timer.within(|| bounds.deadline, conn.write_all_vectored(&mut [IoSlice::new(&c.out)])).await
            }
            ReqBody::Buffered(b) => {
                let parts = &mut [IoSlice::new(&c.out), IoSlice::new(b)];
                c.timer.within(|| bounds.deadline, conn.write_all_vectored(parts)).await
            }
            // Not reached: a request whose body went out is never tried again.
            ReqBody::Gone => return Err(AttemptError::Sent("the request body was sent already".into())),
            ReqBody::Length(_) | ReqBody::Chunked(_) => {
                self.send_continue(c).await.map_err(AttemptError::ClientBody)?;
                return self.stream_body(c, body, conn, bounds).await;
            }
        };
        match sent {
            Err(_) => return Err(AttemptError::Timeout(TimeoutKind::Request)),
            Ok(Err((e, 0))) => return Err(AttemptError::NotSent(e.to_string())),
            Ok(Err((e, _))) => return Err(AttemptError::Sent(e.to_string())),
            Ok(Ok(())) => {}
        }
        read_response_head(c, conn, bounds).await
    }

    /// Send the head and a streamed body, the body read from the client as it goes.
    async fn stream_body<D: Downstream>(
        &mut self,
        c: &mut Session<D>,
        body: &mut ReqBody,
        conn: &mut BackendConn,
        bounds: Bounds,
    ) -> Result<(), AttemptError> {
        let Bounds { deadline, max_body, .. } = bounds;
        let mut head_sent = false;
        loop {
            // The part of the body already read.
            let ready = match body {
                ReqBody::Length(remaining) => (*remaining).min(c.buf.len() as u64) as usize,
                ReqBody::Chunked(scanner) => {
                    let n =
                        scanner.scan(&c.buf, None).map_err(|_| AttemptError::ClientBody("malformed chunked body"))?;
                    if max_body.is_some_and(|max| scanner.payload_len() > max) {
                        return Err(AttemptError::BodyTooLarge);
                    }
                    n
                }
                _ => 0,
            };
            if ready > 0 || !head_sent {
                let head_part: &[u8] = if head_sent { &[] } else { &c.out };
                let parts = &mut [IoSlice::new(head_part), IoSlice::new(&c.buf[..ready])];
                match c.timer.within(|| deadline, conn.write_all_vectored(parts)).await {
                    Err(_) => return Err(AttemptError::Timeout(TimeoutKind::Request)),
                    Ok(Err((e, 0))) if !head_sent => return Err(AttemptError::NotSent(e.to_string())),
                    Ok(Err((e, _))) => {
                        // The backend may have answered early and closed (a 413, say): take
                        // that answer if it is there. The client's body stays unread.
                        return match read_response_head(c, conn, bounds).await {
                            Ok(()) => Ok(()),
                            Err(_) => Err(AttemptError::Sent(e.to_string())),
                        };
                    }
                    Ok(Ok(())) => {}
                }
                head_sent = true;
                c.buf.advance(ready);
                self.log.end.bytes_in += ready as u64;
            }
            let done = match body {
                ReqBody::Length(remaining) => {
                    *remaining -= ready as u64;
                    *remaining == 0
                }
                ReqBody::Chunked(scanner) => scanner.is_done(),
                _ => true,
            };
            if done {
                self.body_pending = false;
                break;
            }
            match c.timer.within(|| deadline, c.stream.read_body(&mut c.buf, BODY_READ)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return Err(AttemptError::ClientBody("client closed the connection during the body")),
                Err(_) => return Err(AttemptError::Timeout(TimeoutKind::Request)),
            }
        }
        *body = ReqBody::Gone;
        // `backend_response` counts from the end of the upload, however long that took.
        read_response_head(c, conn, bounds).await
    }
}

/// Read the backend's response head into `c.resp`, past any interim (1xx) answers. Called
/// once the request has been written: `backend_response` counts from the first wait here (the
/// clock is read only if the answer is not there at once), capped by the request deadline.
async fn read_response_head<D: Downstream>(
    c: &mut Session<D>,
    conn: &mut BackendConn,
    bounds: Bounds,
) -> Result<(), AttemptError> {
    let mut until: Option<(Instant, TimeoutKind)> = None;
    loop {
        if !conn.buf.is_empty() {
            match c.resp.parse(&conn.buf, MAX_RESPONSE_HEAD) {
                Ok(true) if c.resp.is_interim() => {
                    conn.buf.advance(c.resp.len);
                    continue;
                }
                Ok(true) if c.resp.status == 101 && !bounds.upgrade => {
                    return Err(AttemptError::Sent("switching protocols without an upgrade".into()));
                }
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(AttemptError::Sent(format!("invalid response: {}", e.message()))),
            }
        }
        let deadline = || until.get_or_insert_with(|| bounds.response(Instant::now())).0;
        match c.timer.within(deadline, c.stream.backend_or_client(&mut c.buf, conn)).await {
            Ok(Waited::Backend(Ok(n))) if n > 0 => {}
            Ok(Waited::Backend(Ok(_))) => return Err(AttemptError::Sent("the backend closed the connection".into())),
            Ok(Waited::Backend(Err(e))) => return Err(AttemptError::Sent(e.to_string())),
            Ok(Waited::ClientGone) => return Err(AttemptError::ClientGone),
            Err(_) => return Err(AttemptError::Timeout(until.map_or(TimeoutKind::Request, |(_, kind)| kind))),
        }
    }
}
