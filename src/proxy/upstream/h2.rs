//! The HTTP/2 exchange with a backend (`backend_protocol: h2 | h2c`): the request head as an
//! HTTP/2 header list, the body sent as DATA as the client sends it, the response head put
//! in `Session::resp` as an HTTP/1 one would be (so the core, the access log and the client
//! side read it the same way), and the body and trailers left in [`H2Upstream`] for the
//! downstream's relay. The streams and connections are `crate::upstream::h2`'s.

use std::sync::Arc;

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, Response};
use tokio::time::Instant;

use super::{AttemptError, Bounds, ReqBody, TimeoutKind, Upstream};
use crate::proxy::core::Exchange;
use crate::proxy::downstream::{Downstream, Session, BODY_READ};
use crate::upstream::h2::{self as h2up, H2Error, StreamSlot};
use crate::upstream::{Backend, ConnectError};

/// A backend's response head may not be larger than this: 502 (as for HTTP/1 backends).
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// What an HTTP/2 try leaves for the relay: the response head's bytes (which `Session::resp`
/// was parsed from), the body with its trailers, and the stream's place on its connection.
pub struct H2Upstream {
    pub head: Vec<u8>,
    pub body: RecvStream,
    /// Counts the stream on its connection until the exchange ends (the relay drops it).
    _slot: StreamSlot,
    /// The request body still streaming beside the answer, if it was taken whole.
    _pump: Option<Pump>,
}

/// A request body moving from an HTTP/2 client's stream to the backend's, in a task of its
/// own: stopped when the exchange ends (a client or backend that went away, the answer done).
pub struct Pump(tokio::task::JoinHandle<()>);

impl Pump {
    fn start(mut from: RecvStream, mut to: SendStream<Bytes>) -> Pump {
        Pump(tokio::spawn(async move {
            if h2up::relay(&mut from, &mut to).await.is_err() {
                // The backend learns that the body will not end well.
                to.send_reset(h2::Reason::CANCEL);
            }
        }))
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Exchange<'_> {
    /// One try at an HTTP/2 backend: the request on a stream of one of its connections, then
    /// the response head into `c.resp`.
    pub(super) async fn attempt_h2<D: Downstream>(
        &mut self,
        c: &mut Session<D>,
        body: &mut ReqBody,
        backend: &Arc<Backend>,
        bounds: Bounds,
    ) -> Result<Upstream, AttemptError> {
        let connect_timeout = bounds.connect.min(bounds.deadline - bounds.now);
        let request = self.h2_head(c, backend)?;
        let no_body = match body {
            ReqBody::None => true,
            ReqBody::Buffered(b) => b.is_empty(),
            // Not reached: a request whose body went out is never tried again.
            ReqBody::Gone => return Err(AttemptError::Sent("the request body was sent already".into())),
            ReqBody::Length(_) | ReqBody::Chunked(_) => false,
        };
        let started = c.timer.within(|| bounds.deadline, backend.h2_request(request, no_body, connect_timeout)).await;
        let h2up::H2Exchange { mut send, response, slot } = match started {
            Err(_) => return Err(AttemptError::Timeout(TimeoutKind::Request)),
            Ok(Err(e)) => return Err(failed(e)),
            Ok(Ok(ex)) => ex,
        };
        // The backend may answer before it has the whole body, and then reset the stream
        // (RFC 9113 8.1): the body fails to go out, but the answer is there to relay.
        let mut body_failed = None;
        match body {
            ReqBody::Buffered(b) if !b.is_empty() => {
                match c.timer.within(|| bounds.deadline, h2up::send_data(&mut send, b.clone(), true)).await {
                    Err(_) => return Err(AttemptError::Timeout(TimeoutKind::Request)),
                    Ok(Err(e)) => body_failed = Some(failed(H2Error::Sent(e))),
                    Ok(Ok(())) => {}
                }
            }
            ReqBody::Length(_) | ReqBody::Chunked(_) => {
                self.send_continue(c).await.map_err(AttemptError::ClientBody)?;
                // An HTTP/2 client's body, none of it read yet: it streams stream to stream in
                // a task of its own while the answer comes (a bidirectional call's messages go
                // both ways at once). Otherwise it is all sent before the answer is awaited.
                match c.buf.is_empty().then(|| c.stream.take_h2_body()).flatten() {
                    Some(from) => {
                        let pump = Pump::start(from, send);
                        *body = ReqBody::Gone;
                        self.body_pending = false;
                        return self.h2_response(c, response, slot, Some(pump), None, bounds).await;
                    }
                    None => match self.stream_body_h2(c, body, &mut send, bounds).await {
                        Err(e @ AttemptError::Sent(_)) => body_failed = Some(e),
                        Err(e) => return Err(e),
                        Ok(()) => {}
                    },
                }
            }
            _ => {}
        }
        drop(send);
        self.h2_response(c, response, slot, None, body_failed, bounds).await
    }

    /// Wait for the response head (`body_failed`: why the body could not all go out, the
    /// error if no answer comes either) and put it in `c.resp`.
    async fn h2_response<D: Downstream>(
        &mut self,
        c: &mut Session<D>,
        response: h2up::H2Response,
        slot: StreamSlot,
        pump: Option<Pump>,
        body_failed: Option<AttemptError>,
        bounds: Bounds,
    ) -> Result<Upstream, AttemptError> {
        // `backend_response` counts from the end of the upload, as for HTTP/1 backends (or
        // from the head, when the body streams beside the answer).
        let (until, kind) = bounds.response(Instant::now());
        let response = match c.timer.within(|| until, response).await {
            Err(_) => return Err(body_failed.unwrap_or(AttemptError::Timeout(kind))),
            Ok(Err(e)) => return Err(body_failed.unwrap_or_else(|| failed(e))),
            Ok(Ok(r)) => r,
        };
        let head = response_head(&response, &self.head.method);
        match c.resp.parse(&head, MAX_RESPONSE_HEAD) {
            Ok(true) => {}
            Ok(false) => return Err(AttemptError::Sent("response head too large".into())),
            Err(e) => return Err(AttemptError::Sent(format!("invalid response: {}", e.message()))),
        }
        Ok(Upstream::H2(Box::new(H2Upstream { head, body: response.into_body(), _slot: slot, _pump: pump })))
    }

    /// The request head as HTTP/2 sends it: the client's end-to-end headers, then the
    /// forwarding ones, as `RequestHead::encode_for_backend` writes them for HTTP/1.1; `TE:
    /// trailers` kept (gRPC needs it); the authority from the client's Host.
    fn h2_head<D: Downstream>(&self, c: &Session<D>, backend: &Backend) -> Result<Request<()>, AttemptError> {
        let head = self.head;
        // The HTTP/1 parser let it through, but HTTP/2 has stricter rules for some bytes.
        let bad = || AttemptError::ClientBody("the request head cannot be sent over HTTP/2");
        let mut request = Request::new(());
        *request.method_mut() = head.method.clone();
        *request.uri_mut() = hyper::Uri::try_from(head.origin_target()).map_err(|_| bad())?;
        let headers = request.headers_mut();
        for (name, value) in head.end_to_end_headers() {
            let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) else {
                return Err(bad());
            };
            headers.append(name, value);
        }
        let host = head.host().unwrap_or(backend.host_header.as_bytes());
        let mut xff = Vec::with_capacity(64);
        for v in head.headers_named("x-forwarded-for") {
            xff.extend_from_slice(v.trim_ascii());
            xff.extend_from_slice(b", ");
        }
        xff.extend_from_slice(&c.client_ip);
        let value = |v: &[u8]| HeaderValue::from_bytes(v).map_err(|_| bad());
        headers.insert(hyper::header::HOST, value(host)?);
        headers.insert("x-forwarded-for", value(&xff)?);
        let proto = match c.stream.scheme() {
            crate::request::Scheme::Http => "http",
            crate::request::Scheme::Https => "https",
        };
        headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
        if let Some(h) = head.host() {
            headers.insert("x-forwarded-host", value(h)?);
        }
        let trailers = head
            .headers_named("te")
            .any(|v| v.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers")));
        if trailers {
            headers.insert(hyper::header::TE, HeaderValue::from_static("trailers"));
        }
        h2up::prepare_request(&mut request, backend);
        Ok(request)
    }

    /// Send the client's body as it comes in, piece by piece, as the stream's window allows.
    async fn stream_body_h2<D: Downstream>(
        &mut self,
        c: &mut Session<D>,
        body: &mut ReqBody,
        send: &mut SendStream<Bytes>,
        bounds: Bounds,
    ) -> Result<(), AttemptError> {
        let Bounds { deadline, max_body, .. } = bounds;
        let mut ranges = Vec::new();
        loop {
            // The payload already read, and whether it is the end.
            let (pieces, consumed, done): (Vec<Bytes>, usize, bool) = match body {
                ReqBody::Length(remaining) => {
                    let n = (*remaining).min(c.buf.len() as u64) as usize;
                    *remaining -= n as u64;
                    (vec![c.buf.split_to(n).freeze()], 0, *remaining == 0)
                }
                ReqBody::Chunked(scanner) => {
                    ranges.clear();
                    let n = scanner
                        .scan(&c.buf, Some(&mut ranges))
                        .map_err(|_| AttemptError::ClientBody("malformed chunked body"))?;
                    if max_body.is_some_and(|max| scanner.payload_len() > max) {
                        return Err(AttemptError::BodyTooLarge);
                    }
                    let pieces = ranges.iter().map(|r| Bytes::copy_from_slice(&c.buf[r.clone()])).collect();
                    (pieces, n, scanner.is_done())
                }
                _ => (Vec::new(), 0, true),
            };
            c.buf.advance(consumed);
            let count = pieces.len();
            for (i, piece) in pieces.into_iter().enumerate() {
                let last = done && i + 1 == count;
                self.log.end.bytes_in += piece.len() as u64;
                match c.timer.within(|| deadline, h2up::send_data(send, piece, last)).await {
                    Err(_) => return Err(AttemptError::Timeout(TimeoutKind::Request)),
                    Ok(Err(e)) => return Err(AttemptError::Sent(H2Error::Sent(e).to_string())),
                    Ok(Ok(())) => {}
                }
            }
            if done {
                if count == 0 {
                    send.send_data(Bytes::new(), true).map_err(|e| AttemptError::Sent(e.to_string()))?;
                }
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
        Ok(())
    }
}

/// An HTTP/2 failure as the retry loop sees it.
fn failed(e: H2Error) -> AttemptError {
    match e {
        H2Error::Connect(ConnectError::Local(_)) => AttemptError::Local(e.to_string()),
        e if e.nothing_sent() => AttemptError::NotSent(e.to_string()),
        e => AttemptError::Sent(e.to_string()),
    }
}

/// The response head written as HTTP/1.1, for `ResponseHead::parse`: a body with no length
/// is marked chunked, which is how an HTTP/1.1 client gets it (and its trailers).
fn response_head(response: &Response<RecvStream>, method: &hyper::Method) -> Vec<u8> {
    let status = response.status();
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let headers = response.headers();
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let bodiless = method == hyper::Method::HEAD || status.as_u16() == 204 || status.as_u16() == 304;
    if !bodiless && !headers.contains_key(hyper::header::CONTENT_LENGTH) {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}
