//! The checks the fuzz targets (`fuzz/fuzz_targets/`) run on each input, here so that
//! `tests/fuzz_corpus.rs` replays the committed corpus through exactly the same code under
//! `cargo test`. Each function panics when the parser breaks one of its promises: besides
//! never panicking itself, a parse must not depend on how the input was split into reads.

use bytes::BytesMut;
use hyper::Method;

use super::{ChunkedScanner, ClientFraming, Forwarding, RequestHead, ResponseHead};

/// Where to split `data` into two reads: its first byte picks the point.
fn split_point(data: &[u8]) -> (usize, &[u8]) {
    match data.split_first() {
        Some((&b, rest)) => ((b as usize * rest.len()) / 255, rest),
        None => (0, data),
    }
}

/// Parse as the client loop does: feed the pieces, parse after each, as far as a head goes.
fn request_outcome(pieces: &[&[u8]], max: usize) -> String {
    let mut head = RequestHead::default();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        buf.extend_from_slice(piece);
        match head.parse(&mut buf, max) {
            Ok(true) => {
                for rest in &pieces[i + 1..] {
                    buf.extend_from_slice(rest);
                }
                head.encode_for_backend(&mut out, &Forwarding { client_ip: b"10.0.0.1", proto: b"http" }, b"b:1");
                // The fields the proxy acts on are all readable.
                let _ = (head.path(), head.header("cookie"), head.host_bytes(), head.target_bytes());
                // The whole parsed head (its bytes, every header's offsets, what was
                // recognised in them), then what the proxy derives from it.
                return format!(
                    "{head:?}\n{} {:?} v{} {:?} {} {} rest={:?}\n{}",
                    head.method,
                    head.host(),
                    head.version,
                    head.content_length(),
                    head.is_chunked(),
                    head.keep_alive(),
                    &buf[..],
                    String::from_utf8_lossy(&out)
                );
            }
            Ok(false) => {}
            Err(e) => return format!("error {e:?}"),
        }
    }
    "incomplete".into()
}

/// The request-head parser: no panic, and one read or two (or one byte per read) agree.
pub fn request_head(data: &[u8]) {
    let (at, data) = split_point(data);
    let max = 8 * 1024;
    let whole = request_outcome(&[data], max);
    assert_eq!(request_outcome(&[&data[..at], &data[at..]], max), whole, "split at {at}");
    if data.len() <= 512 {
        let bytes: Vec<&[u8]> = data.chunks(1).collect();
        assert_eq!(request_outcome(&bytes, max), whole, "byte by byte");
    }
}

/// The response-head parser: no panic; a complete head's framing and the head written for
/// the client are consistent, and the written head parses again (nothing folded or doubled).
pub fn response_head(data: &[u8]) {
    let mut head = ResponseHead::default();
    let Ok(true) = head.parse(data, 16 * 1024) else { return };
    assert!(head.len <= data.len());
    let _ = (head.framing(&Method::GET), head.framing(&Method::HEAD), head.backend_keeps_alive(), head.is_interim());
    let mut out = Vec::new();
    head.encode_for_client(data, &mut out, ClientFraming { chunked: true, close: true, keep_alive_10: false });
    let mut again = ResponseHead::default();
    assert_eq!(again.parse(&out, 64 * 1024), Ok(true), "{:?}", String::from_utf8_lossy(&out));
    assert_eq!(again.len, out.len());
    assert_eq!(again.status, head.status);
}

/// The chunked scanner: no panic; whole, split in two, and byte by byte give the same
/// result, payload ranges lie inside the input and add up to the payload length.
pub fn chunked(data: &[u8]) {
    let (at, data) = split_point(data);
    let whole = chunked_outcome(&[data]);
    assert_eq!(chunked_outcome(&[&data[..at], &data[at..]]), whole, "split at {at}");
    if data.len() <= 4096 {
        let bytes: Vec<&[u8]> = data.chunks(1).collect();
        assert_eq!(chunked_outcome(&bytes), whole, "byte by byte");
    }
}

/// (bytes of the input that are body, payload bytes, done, error) over the pieces.
fn chunked_outcome(pieces: &[&[u8]]) -> (usize, u64, Vec<u8>, bool, Option<String>) {
    let mut scanner = ChunkedScanner::new();
    let mut used = 0;
    let mut payload = Vec::new();
    let mut ranges = Vec::new();
    for piece in pieces {
        ranges.clear();
        match scanner.scan(piece, Some(&mut ranges)) {
            Ok(n) => {
                assert!(n <= piece.len());
                for r in &ranges {
                    assert!(r.start < r.end && r.end <= n, "{r:?} outside {n}");
                    payload.extend_from_slice(&piece[r.clone()]);
                }
                used += n;
                if scanner.is_done() {
                    break;
                }
            }
            Err(e) => return (used, scanner.payload_len(), payload, false, Some(e.to_string())),
        }
    }
    assert_eq!(payload.len() as u64, scanner.payload_len());
    (used, scanner.payload_len(), payload, scanner.is_done(), None)
}
