//! The answer's way back: a backend's response streamed to the client, or one of Velocity's
//! own (errors, rejections), and the access-log line each request leaves.

use std::io::IoSlice;
use std::sync::Arc;
use std::time::Duration;

use bytes::Buf;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::client::{send, ClientConn};
use super::forward::{Exchange, TimeoutKind};
use crate::config::Timeouts;
use crate::http1::{ChunkedScanner, ClientFraming, Framing};
use crate::observe::{AccessLog, AccessRecord, RequestEnd};
use crate::policy::{QueueRejection, Refusal};
use crate::state::Service;
use crate::upstream::{Backend, BackendConn, InFlight};

/// What a request leaves when it is dropped (so every way out counts): its metrics, and its
/// access-log line when the log is on.
pub(super) struct LogLine {
    pub(super) end: RequestEnd,
    pub(super) access: Option<(AccessLog, AccessRecord)>,
    /// Recorded already (by [`LogLine::finish`]).
    pub(super) finished: bool,
}

impl LogLine {
    pub(super) fn set(&mut self, status: u16, note: Option<&'static str>, backend: Option<&Arc<Backend>>) {
        self.end.status = status;
        if note.is_some() {
            self.end.note = note;
        }
        if let (Some(b), Some((_, r))) = (backend, &mut self.access) {
            r.backend = Some(b.clone());
        }
    }

    pub(super) fn note(&mut self, note: &'static str) {
        self.end.note = Some(note);
    }

    fn bytes(&mut self, n: u64) {
        self.end.bytes_out += n;
    }
}

impl LogLine {
    /// Record the request now; returns the clock read that ended it, for the connection's next
    /// wait (one clock read per request fewer). A line dropped unfinished records itself.
    pub(super) fn finish(&mut self) -> Instant {
        let now = Instant::now();
        self.record(now.into_std());
        now
    }

    fn record(&mut self, now: std::time::Instant) {
        self.finished = true;
        let us = self.end.finish_at(now);
        if let Some((log, mut record)) = self.access.take() {
            record.status = self.end.status;
            record.note = self.end.note;
            record.bytes = self.end.bytes_out;
            let name = &self.end.service.name;
            record.service = (!name.is_empty()).then(|| name.clone());
            log.log(record, us);
        }
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        if !self.finished {
            self.record(std::time::Instant::now());
        }
    }
}

impl Exchange<'_> {
    /// Stream the response whose head is in `c.resp` to the client.
    pub(super) async fn relay(
        &mut self,
        c: &mut ClientConn,
        mut conn: BackendConn,
        in_flight: InFlight,
        stall_timeout: Duration,
    ) -> bool {
        let head = self.head;
        let backend = in_flight.backend().clone();
        let framing = c.resp.framing(&head.method);
        // An HTTP/1.0 client cannot take chunks: the body goes out decoded, ended by the close.
        let decode = framing == Framing::Chunked && head.version == 0;
        let close = !head.keep_alive()
            || self.body_pending
            || self.drain.is_draining()
            || framing == Framing::UntilClose
            || decode;
        let client_framing = ClientFraming {
            chunked: framing == Framing::Chunked && !decode,
            close,
            keep_alive_10: head.version == 0 && !close,
        };
        c.resp.encode_for_client(&conn.buf, &mut c.out, client_framing);
        if let Some(cookie) = self.set_cookie.take() {
            // Before the blank line that ends the head.
            c.out.truncate(c.out.len().saturating_sub(2));
            for part in [&b"set-cookie: "[..], &cookie, b"\r\n\r\n"] {
                c.out.extend_from_slice(part);
            }
        }
        conn.buf.advance(c.resp.len);
        self.log.set(c.resp.status, None, Some(&backend));
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
                        self.log.note("backend_body_error");
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
                    Ok(n) => self.log.bytes(n as u64),
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                        warn!(client = %c.client, timeout = ?send_limit, "client took no response data in time: response cut");
                        self.log.note("client_timeout");
                        return false;
                    }
                    Err(e) => {
                        debug!(client = %c.client, error = %e, "client went away during the response");
                        self.log.note("client_aborted");
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
                    self.log.note("backend_body_error");
                    return false;
                }
                Err(_) => {
                    warn!(backend = %backend.name, timeout = ?stall_timeout, "the backend sent no response data in time: response cut");
                    self.log.note("backend_body_error");
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

    /// Answer with one of Velocity's own responses.
    pub(super) async fn local(
        &mut self,
        c: &mut ClientConn,
        status: u16,
        extra: &[(&str, &[u8])],
        body: &[u8],
        note: &'static str,
    ) -> bool {
        self.log.set(status, Some(note), None);
        // An unread body would be taken for the next request.
        let close = self.body_pending || !self.head.keep_alive() || self.drain.is_draining();
        c.write_local(status, extra, body, close, self.head.version).await;
        self.log.bytes(body.len() as u64);
        !close
    }

    /// The client is on a deny list (or not on an allow list): `403`.
    pub(super) async fn denied(&mut self, c: &mut ClientConn) -> bool {
        debug!(client = %self.client_ip, "client denied: 403");
        self.local(c, 403, &[], b"403 forbidden\n", "denied").await
    }

    /// A service's allow/deny or rate limit refused the request.
    pub(super) async fn refused(&mut self, c: &mut ClientConn, service: &Service, why: Refusal) -> bool {
        let Refusal::Limited(l) = why else { return self.denied(c).await };
        debug!(service = %service.config.name, client = %self.client_ip, "rate limited: 429");
        // Formatted only for a refused request. Headers of the IETF draft
        // (draft-ietf-httpapi-ratelimit-headers): the bucket size, nothing left, and when
        // the next request under the same key may pass.
        let wait = l.wait_secs().to_string();
        let limit = l.limit.to_string();
        let extra = [
            ("retry-after", wait.as_bytes()),
            ("ratelimit-limit", limit.as_bytes()),
            ("ratelimit-remaining", b"0".as_slice()),
            ("ratelimit-reset", wait.as_bytes()),
        ];
        self.local(c, 429, &extra, b"429 too many requests\n", "rate_limited").await
    }

    pub(super) async fn body_too_large(&mut self, c: &mut ClientConn, max: u64) -> bool {
        let body = format!("413 content too large: the limit is {max} bytes\n");
        // The rest of the body is never read, so the connection cannot be reused.
        self.body_pending = true;
        self.local(c, 413, &[], body.as_bytes(), "body_too_large").await
    }

    pub(super) async fn queue_rejected(&mut self, c: &mut ClientConn, service: &Service, why: QueueRejection) -> bool {
        let q = service.config.limits.queue;
        warn!(
            service = %service.config.name,
            reason = why.note(),
            queue_size = q.size,
            queue_timeout = ?q.timeout,
            "every backend is at max_connections and the request could not wait: 503"
        );
        // About the longest a queued request would have waited.
        let secs = q.timeout.as_secs_f64().ceil().max(1.0) as u64;
        let wait = secs.to_string();
        let body = b"503 service unavailable: all backends are busy, retry later\n";
        self.local(c, 503, &[("retry-after", wait.as_bytes())], body, why.note()).await
    }

    pub(super) async fn timed_out(
        &mut self,
        c: &mut ClientConn,
        service: &Service,
        backend: &Arc<Backend>,
        kind: TimeoutKind,
        timeouts: &Timeouts,
    ) -> bool {
        let (what, limit, note) = match kind {
            TimeoutKind::Backend => ("backend_response", timeouts.backend_response, "backend_timeout"),
            TimeoutKind::Request => ("request", timeouts.request, "request_timeout"),
        };
        warn!(service = %service.config.name, backend = %backend.name, timeout = what, limit = ?limit, "no response headers in time: 504");
        self.log.set(0, None, Some(backend));
        // Whatever the client has not sent of its body is not read any more.
        let body = b"504 gateway timeout: the backend did not answer in time\n";
        self.local(c, 504, &[], body, note).await
    }
}
