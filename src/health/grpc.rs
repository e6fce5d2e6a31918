//! `health_check: {type: grpc}`: the standard gRPC health protocol
//! (`grpc.health.v1.Health/Check`, grpc/grpc doc/health-checking.md). The backend passes when
//! it answers `SERVING` for the configured service (empty: the server as a whole).
//!
//! The check goes the way requests go: TLS with ALPN `h2` for https backends, h2c otherwise,
//! on a connection of its own that closes with the check. The two messages are one-field
//! protobufs, written and read here by hand, so no code generation is needed.

use bytes::{BufMut, Bytes, BytesMut};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request};

use super::active::Failed;
use crate::config::HealthCheckConfig;
use crate::upstream::h2::{self, H2Error};
use crate::upstream::{Backend, ConnectError};

const PATH: &str = "/grpc.health.v1.Health/Check";
/// A health answer is a few bytes; anything past this is not one.
const MAX_ANSWER: usize = 4096;

/// `HealthCheckResponse.ServingStatus` values.
const SERVING: u64 = 1;

/// One check: `Ok` with what passed, `Err` with why not.
pub(super) async fn check(cfg: &HealthCheckConfig, host: &HeaderValue, backend: &Backend) -> Result<String, Failed> {
    // The caller bounds the whole check by `timeout`; connecting may take all of it.
    let stream = backend.open_stream(cfg.timeout).await.map_err(|e| match e {
        ConnectError::Local(e) => Failed::Local(e),
        e => Failed::Backend(e.to_string()),
    })?;
    let (send, connection) = h2::handshake(stream).await.map_err(|e| Failed::Backend(e.to_string()))?;
    let mut request = Request::new(());
    *request.method_mut() = Method::POST;
    *request.uri_mut() = hyper::Uri::from_static(PATH);
    let headers = request.headers_mut();
    headers.insert(header::HOST, host.clone());
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    headers.insert(header::USER_AGENT, HeaderValue::from_static("velocity-health-check"));
    h2::prepare_request(&mut request, backend);
    let body = request_message(&cfg.grpc_service);
    // The connection is driven here rather than spawned, so a check that times out leaves
    // nothing behind (as the HTTP checks do).
    let mut connection = std::pin::pin!(connection);
    let mut exchange = std::pin::pin!(ask(send, request, body));
    let answer = tokio::select! {
        biased;
        a = &mut exchange => a,
        c = &mut connection => match c {
            Ok(()) => exchange.await,
            Err(e) => Err(format!("connection error: {e}")),
        },
    };
    Ok(answer?)
}

async fn ask(send: ::h2::client::SendRequest<Bytes>, request: Request<()>, body: Bytes) -> Result<String, String> {
    let failed = |e: ::h2::Error| H2Error::Sent(e).to_string();
    let mut send = send.ready().await.map_err(failed)?;
    let (response, mut body_out) = send.send_request(request, false).map_err(failed)?;
    // A few bytes, within any initial window: no need to wait for capacity.
    body_out.send_data(body, true).map_err(failed)?;
    let response = response.await.map_err(failed)?;
    let status = response.status();
    if status != hyper::StatusCode::OK {
        return Err(format!("status {}", status.as_u16()));
    }
    // A trailers-only answer (an error) has grpc-status in its head.
    if let Some(why) = grpc_error(response.headers()) {
        return Err(why);
    }
    let mut recv = response.into_body();
    let mut message = BytesMut::new();
    while let Some(piece) = recv.data().await {
        let piece = piece.map_err(failed)?;
        let _ = recv.flow_control().release_capacity(piece.len());
        if message.len() + piece.len() > MAX_ANSWER {
            return Err("health answer too large".to_owned());
        }
        message.extend_from_slice(&piece);
    }
    let trailers = recv.trailers().await.map_err(failed)?.unwrap_or_default();
    match grpc_error(&trailers) {
        Some(why) => Err(why),
        None if trailers.contains_key("grpc-status") => match serving_status(&message) {
            Some(SERVING) => Ok("SERVING".to_owned()),
            Some(other) => Err(status_name(other).to_owned()),
            None => Err("malformed health answer".to_owned()),
        },
        None => Err("no grpc-status in the answer".to_owned()),
    }
}

/// `grpc-status` other than 0 (OK), with its message.
fn grpc_error(headers: &HeaderMap) -> Option<String> {
    let status = headers.get("grpc-status")?.to_str().unwrap_or("?");
    if status == "0" {
        return None;
    }
    let message = headers.get("grpc-message").and_then(|m| m.to_str().ok()).unwrap_or("");
    Some(format!("grpc-status {status} {message}").trim_end().to_owned())
}

fn status_name(status: u64) -> &'static str {
    match status {
        0 => "UNKNOWN",
        1 => "SERVING",
        2 => "NOT_SERVING",
        3 => "SERVICE_UNKNOWN",
        _ => "unknown serving status",
    }
}

/// A gRPC message (uncompressed, length-prefixed) holding `HealthCheckRequest { service }`.
fn request_message(service: &str) -> Bytes {
    let mut proto = BytesMut::new();
    if !service.is_empty() {
        // Field 1, wire type 2 (length-delimited).
        proto.put_u8(0x0a);
        put_varint(&mut proto, service.len() as u64);
        proto.put_slice(service.as_bytes());
    }
    let mut out = BytesMut::with_capacity(5 + proto.len());
    out.put_u8(0);
    out.put_u32(proto.len() as u32);
    out.put_slice(&proto);
    out.freeze()
}

/// `HealthCheckResponse.status` from one gRPC message; `None` when it is not one.
fn serving_status(message: &[u8]) -> Option<u64> {
    let (&compressed, rest) = message.split_first()?;
    if compressed != 0 || rest.len() < 4 {
        return None;
    }
    let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let mut proto = rest.get(4..4 + len)?;
    // proto3 leaves out a field at its default value: no status field means UNKNOWN (0).
    let mut status = 0;
    while !proto.is_empty() {
        let key = varint(&mut proto)?;
        match (key >> 3, key & 7) {
            (1, 0) => status = varint(&mut proto)?,
            (_, 0) => {
                varint(&mut proto)?;
            }
            (_, 1) => proto = proto.get(8..)?,
            (_, 2) => {
                let n = usize::try_from(varint(&mut proto)?).ok()?;
                proto = proto.get(n..)?;
            }
            (_, 5) => proto = proto.get(4..)?,
            _ => return None,
        }
    }
    Some(status)
}

fn put_varint(out: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        out.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

fn varint(input: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = input.split_first()?;
        *input = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_both_ways() {
        assert_eq!(&request_message("")[..], &[0, 0, 0, 0, 0]);
        assert_eq!(&request_message("a.B")[..], &[0, 0, 0, 0, 5, 0x0a, 3, b'a', b'.', b'B']);
        let answer = |proto: &[u8]| {
            let mut m = vec![0, 0, 0, 0, proto.len() as u8];
            m.extend_from_slice(proto);
            serving_status(&m)
        };
        assert_eq!(answer(&[0x08, 1]), Some(SERVING));
        assert_eq!(answer(&[0x08, 2]), Some(2));
        assert_eq!(answer(&[]), Some(0));
        // Unknown fields of every wire type are skipped.
        assert_eq!(answer(&[0x10, 0x96, 0x01, 0x1a, 2, 9, 9, 0x25, 1, 2, 3, 4, 0x08, 1]), Some(SERVING));
        assert_eq!(answer(&[0x08]), None);
        assert_eq!(answer(&[0x1a, 9]), None);
        assert_eq!(serving_status(&[1, 0, 0, 0, 0]), None);
        assert_eq!(serving_status(&[0, 0, 0, 0, 9, 0x08]), None);
        assert_eq!(serving_status(&[]), None);
        let mut long = BytesMut::new();
        put_varint(&mut long, 300);
        assert_eq!(varint(&mut &long[..]), Some(300));
        assert_eq!(varint(&mut &[0xff; 11][..]), None);
    }

    #[test]
    fn grpc_status_from_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(grpc_error(&h), None);
        h.insert("grpc-status", HeaderValue::from_static("0"));
        assert_eq!(grpc_error(&h), None);
        h.insert("grpc-status", HeaderValue::from_static("5"));
        assert_eq!(grpc_error(&h).as_deref(), Some("grpc-status 5"));
        h.insert("grpc-message", HeaderValue::from_static("unknown service"));
        assert_eq!(grpc_error(&h).as_deref(), Some("grpc-status 5 unknown service"));
    }
}
