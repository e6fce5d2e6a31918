//! Velocity's own answers (errors, rejections) and the access-log line each request leaves.
//! A backend's response is streamed by the downstream session (`Downstream::relay`).

use std::sync::Arc;

use tokio::time::Instant;
use tracing::{debug, warn};

use super::{Exchange, TimeoutKind};
use crate::config::Timeouts;
use crate::observe::{AccessLog, AccessRecord, RequestEnd};
use crate::policy::{QueueRejection, Refusal};
use crate::proxy::downstream::{Downstream, Session};
use crate::state::Service;
use crate::upstream::Backend;

/// What a request leaves when it is dropped (so every way out counts): its metrics, and its
/// access-log line when the log is on.
pub struct LogLine {
    pub(crate) end: RequestEnd,
    pub(crate) access: Option<(AccessLog, AccessRecord)>,
    /// Recorded already (by [`LogLine::finish`]).
    pub(crate) finished: bool,
}

impl LogLine {
    pub(crate) fn set(&mut self, status: u16, note: Option<&'static str>, backend: Option<&Arc<Backend>>) {
        self.end.status = status;
        if note.is_some() {
            self.end.note = note;
        }
        if let (Some(b), Some((_, r))) = (backend, &mut self.access) {
            r.backend = Some(b.clone());
        }
    }

    pub(crate) fn note(&mut self, note: &'static str) {
        self.end.note = Some(note);
    }

    pub(crate) fn bytes(&mut self, n: u64) {
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
    /// Answer with one of Velocity's own responses.
    pub(super) async fn local<D: Downstream>(
        &mut self,
        c: &mut Session<D>,
        status: u16,
        extra: &[(&str, &[u8])],
        body: &[u8],
        note: &'static str,
    ) -> bool {
        self.log.set(status, Some(note), None);
        // An unread body would be taken for the next request.
        let close = self.body_pending || !self.head.keep_alive() || self.drain.is_draining();
        D::write_local(c, status, extra, body, close, self.head.version).await;
        self.log.bytes(body.len() as u64);
        !close
    }

    /// The client is on a deny list (or not on an allow list): `403`.
    pub(super) async fn denied<D: Downstream>(&mut self, c: &mut Session<D>) -> bool {
        debug!(client = %self.view.client_ip(), "client denied: 403");
        self.local(c, 403, &[], b"403 forbidden\n", "denied").await
    }

    /// A service's allow/deny or rate limit refused the request.
    pub(super) async fn refused<D: Downstream>(&mut self, c: &mut Session<D>, service: &Service, why: Refusal) -> bool {
        let Refusal::Limited(l) = why else { return self.denied(c).await };
        debug!(service = %service.config.name, client = %self.view.client_ip(), "rate limited: 429");
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

    pub(super) async fn body_too_large<D: Downstream>(&mut self, c: &mut Session<D>, max: u64) -> bool {
        let body = format!("413 content too large: the limit is {max} bytes\n");
        // The rest of the body is never read, so the connection cannot be reused.
        self.body_pending = true;
        self.local(c, 413, &[], body.as_bytes(), "body_too_large").await
    }

    pub(super) async fn queue_rejected<D: Downstream>(
        &mut self,
        c: &mut Session<D>,
        service: &Service,
        why: QueueRejection,
    ) -> bool {
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

    pub(super) async fn timed_out<D: Downstream>(
        &mut self,
        c: &mut Session<D>,
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
