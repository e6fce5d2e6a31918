//! The body of every response Velocity sends: a backend's streamed body or a short local one.
//! It writes the access log line when it is done, so the line carries the real byte count and
//! duration, and says so when the client went away first.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use super::client::BusyGuard;
use crate::observe::{AccessLog, AccessRecord};
use crate::upstream::{BoxError, UpstreamBody};

enum Kind {
    Upstream(UpstreamBody),
    Local(Option<Bytes>),
}

pub struct ResponseBody {
    kind: Kind,
    log: Option<(AccessLog, AccessRecord)>,
    done: bool,
    /// Keeps the client connection counted as busy (no idle/header timer) until the response ends.
    busy: Option<BusyGuard>,
}

impl ResponseBody {
    pub fn upstream(body: UpstreamBody, log: Option<(AccessLog, AccessRecord)>) -> Self {
        ResponseBody { kind: Kind::Upstream(body), log, done: false, busy: None }
    }

    pub fn local(bytes: Bytes, log: Option<(AccessLog, AccessRecord)>) -> Self {
        ResponseBody { kind: Kind::Local(Some(bytes)), log, done: false, busy: None }
    }

    pub fn hold(mut self, busy: BusyGuard) -> Self {
        self.busy = Some(busy);
        self
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = match &mut this.kind {
            Kind::Upstream(b) => Pin::new(b).poll_frame(cx),
            Kind::Local(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some((_, record)), Some(data)) = (&mut this.log, frame.data_ref()) {
                    record.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) => this.done = true,
            Poll::Ready(Some(Err(e))) => {
                // The backend died mid-response; hyper will cut the client connection, which is
                // all HTTP/1.1 allows once the status line has gone out.
                if let Some((_, record)) = &mut this.log {
                    record.note = Some("backend_body_error");
                }
                let backend = this.log.as_ref().and_then(|(_, r)| r.backend.as_ref()).map(|b| b.name.as_str());
                tracing::warn!(backend = backend.unwrap_or("-"), error = %e, "backend failed while sending the response body");
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Upstream(b) => b.is_end_stream(),
            Kind::Local(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream(b) => b.size_hint(),
            Kind::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Some((log, mut record)) = self.log.take() {
            if !self.done && !self.is_end_stream() && record.note.is_none() {
                record.note = Some("client_aborted");
            }
            let us = record.start.elapsed().as_micros() as u64;
            log.log(record, us);
        }
    }
}
