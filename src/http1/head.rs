//! Request and response heads, parsed once with `httparse` and kept as the raw bytes plus the
//! offsets of each header. A proxy forwards most headers untouched, so copying the bytes it
//! received beats building a `HeaderMap` (a hash and an allocation per header) and serialising
//! it again; the few headers the proxy acts on are recognised during the parse.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use hyper::Method;

/// At most this many header lines in a request or response; beyond it, 431 (or 502).
pub const MAX_HEADERS: usize = 128;

/// One header line: offsets of its name and value in the head's bytes.
#[derive(Debug, Clone, Copy)]
pub struct HeaderRef {
    name: (u32, u32),
    value: (u32, u32),
    /// Not forwarded: hop-by-hop, or rewritten by the proxy.
    pub skip: bool,
}

/// Why a head could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// Not HTTP: 400.
    Malformed(&'static str),
    /// Over the size or header-count limit: 431.
    TooLarge,
    /// A transfer coding other than chunked: 501.
    UnsupportedEncoding,
}

impl HeadError {
    pub fn message(self) -> &'static str {
        match self {
            HeadError::Malformed(why) => why,
            HeadError::TooLarge => "headers too large",
            HeadError::UnsupportedEncoding => "unsupported transfer-encoding",
        }
    }
}

/// What the proxy needs to know about the headers of either direction.
#[derive(Debug, Default, Clone)]
struct Known {
    content_length: Option<u64>,
    chunked: bool,
    /// A transfer coding other than chunked last: a request is refused (501), a response is
    /// read until the backend closes.
    unknown_coding: bool,
    /// `Connection: close`.
    close: bool,
    /// `Connection: keep-alive`.
    keep_alive: bool,
    expect_continue: bool,
    host: Option<(u32, u32)>,
    /// How many `X-Forwarded-For` lines there are.
    forwarded_for: u8,
    /// `Connection` names other headers: those are hop-by-hop too.
    connection_lists_others: bool,
}

impl Known {
    /// Whether the connection may carry another message after this one.
    fn keeps_alive(&self, version: u8) -> bool {
        match version {
            0 => self.keep_alive && !self.close,
            _ => !self.close,
        }
    }
}

/// Sort the parsed header lines of `base` into `headers` and `known`.
fn collect_headers(
    base: &[u8],
    parsed: &[httparse::Header<'_>],
    request: bool,
    headers: &mut Vec<HeaderRef>,
    known: &mut Known,
) -> Result<(), HeadError> {
    headers.clear();
    *known = Known::default();
    for h in parsed {
        let value = span(base, h.value);
        let skip = classify(h.name.as_bytes(), h.value, value, request, known)?;
        headers.push(HeaderRef { name: span(base, h.name.as_bytes()), value, skip });
    }
    if known.connection_lists_others {
        skip_connection_listed(base, headers);
    }
    Ok(())
}

/// A parsed request head.
#[derive(Debug, Clone)]
pub struct RequestHead {
    bytes: Bytes,
    pub method: Method,
    target: (u32, u32),
    /// The target in origin-form (`/path?query`); empty for authority-form and `*`.
    origin: (u32, u32),
    /// The authority of an absolute-form target (`http://host:port/...`).
    authority: Option<(u32, u32)>,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    headers: Vec<HeaderRef>,
    known: Known,
}

impl Default for RequestHead {
    fn default() -> Self {
        RequestHead {
            bytes: Bytes::new(),
            method: Method::GET,
            target: (0, 0),
            origin: (0, 0),
            authority: None,
            version: 1,
            headers: Vec::with_capacity(16),
            known: Known::default(),
        }
    }
}

/// Offsets of `part` (a slice of `base`) within `base`.
fn span(base: &[u8], part: &[u8]) -> (u32, u32) {
    let start = part.as_ptr() as usize - base.as_ptr() as usize;
    (start as u32, (start + part.len()) as u32)
}

fn at(bytes: &[u8], (start, end): (u32, u32)) -> &[u8] {
    &bytes[start as usize..end as usize]
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 {
        return None;
    }
    s.iter().try_fold(0u64, |n, &b| b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0')))
}

/// Sort one header into `known` and say whether it is hop-by-hop for a proxy; `request`
/// also drops the headers the proxy writes itself.
fn classify(
    name: &[u8],
    value: &[u8],
    value_span: (u32, u32),
    request: bool,
    known: &mut Known,
) -> Result<bool, HeadError> {
    let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
    // Dispatch on the length first: most headers are none of these and cost one compare.
    let skip = match name.len() {
        2 => is("te"),
        4 if is("host") => {
            if request && known.host.is_none() {
                known.host = Some(value_span);
            }
            false
        }
        6 if request && is("expect") => {
            known.expect_continue = trim(value).eq_ignore_ascii_case(b"100-continue");
            true
        }
        7 => is("upgrade") || is("trailer"),
        10 if is("connection") => {
            for token in value.split(|&b| b == b',').map(trim).filter(|t| !t.is_empty()) {
                if token.eq_ignore_ascii_case(b"close") {
                    known.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    known.keep_alive = true;
                } else if !token.eq_ignore_ascii_case(b"upgrade") {
                    known.connection_lists_others = true;
                }
            }
            true
        }
        10 => is("keep-alive"),
        14 if is("content-length") => {
            // Repeated lines (or a list) must agree, or the framing is ambiguous (smuggling).
            for part in value.split(|&b| b == b',') {
                let n = parse_u64(trim(part)).ok_or(HeadError::Malformed("invalid content-length"))?;
                if known.content_length.is_some_and(|m| m != n) {
                    return Err(HeadError::Malformed("conflicting content-length"));
                }
                known.content_length = Some(n);
            }
            false
        }
        15 if request && is("x-forwarded-for") => {
            known.forwarded_for = known.forwarded_for.saturating_add(1);
            true
        }
        16 => is("proxy-connection") || (request && is("x-forwarded-host")),
        17 if is("transfer-encoding") => {
            // Only chunked is understood, and it must come last.
            let last = value.rsplit(|&b| b == b',').map(trim).find(|t| !t.is_empty());
            if last.is_some_and(|t| t.eq_ignore_ascii_case(b"chunked")) {
                known.chunked = true;
            } else {
                known.unknown_coding = true;
            }
            if value.split(|&b| b == b',').map(trim).filter(|t| t.eq_ignore_ascii_case(b"chunked")).count() > 1 {
                return Err(HeadError::Malformed("chunked applied twice"));
            }
            true
        }
        17 => request && is("x-forwarded-proto"),
        _ => false,
    };
    Ok(skip)
}

/// Mark as hop-by-hop the headers that `Connection` names (RFC 9110 7.6.1).
fn skip_connection_listed(bytes: &[u8], headers: &mut [HeaderRef]) {
    let mut listed: Vec<&[u8]> = Vec::new();
    for h in headers.iter() {
        if at(bytes, h.name).eq_ignore_ascii_case(b"connection") {
            listed.extend(at(bytes, h.value).split(|&b| b == b',').map(trim).filter(|t| !t.is_empty()));
        }
    }
    for h in headers.iter_mut() {
        let name = at(bytes, h.name);
        if listed.iter().any(|l| l.eq_ignore_ascii_case(name)) {
            h.skip = true;
        }
    }
}

impl RequestHead {
    /// Parse a request head from the front of `buf`. `Ok(false)`: incomplete, read more.
    /// On success the head's bytes are split off `buf`, which keeps what follows (body bytes,
    /// or a pipelined request).
    pub fn parse(&mut self, buf: &mut BytesMut, max_bytes: usize) -> Result<bool, HeadError> {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let len = match req.parse_with_uninit_headers(buf, &mut slots) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > max_bytes => return Err(HeadError::TooLarge),
            Ok(httparse::Status::Partial) => return Ok(false),
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
            Err(e) => return Err(HeadError::Malformed(malformed(e))),
        };
        if len > max_bytes {
            return Err(HeadError::TooLarge);
        }
        let base: &[u8] = buf;
        let method = req.method.unwrap_or("GET");
        self.method = match method {
            "GET" => Method::GET,
            "HEAD" => Method::HEAD,
            "POST" => Method::POST,
            other => Method::from_bytes(other.as_bytes()).map_err(|_| HeadError::Malformed("invalid method"))?,
        };
        let target = req.path.unwrap_or("/").as_bytes();
        self.target = span(base, target);
        let (origin, authority) = split_target(target);
        self.origin = span(base, origin);
        self.authority = authority.map(|a| span(base, a));
        self.version = req.version.unwrap_or(1);
        collect_headers(base, req.headers, true, &mut self.headers, &mut self.known)?;
        if self.known.unknown_coding {
            return Err(HeadError::UnsupportedEncoding);
        }
        if self.known.chunked && self.known.content_length.is_some() {
            return Err(HeadError::Malformed("both content-length and transfer-encoding"));
        }
        if self.known.chunked && self.version == 0 {
            return Err(HeadError::Malformed("transfer-encoding in an HTTP/1.0 request"));
        }
        self.bytes = buf.split_to(len).freeze();
        Ok(true)
    }

    /// The path of the target, without the query; empty for authority-form (CONNECT) and `*`.
    pub fn path(&self) -> &[u8] {
        let origin = at(&self.bytes, self.origin);
        origin.iter().position(|&b| b == b'?').map_or(origin, |q| &origin[..q])
    }

    /// The target as a backend gets it: origin-form (absolute-form loses its scheme and host).
    pub fn origin_target(&self) -> &[u8] {
        match at(&self.bytes, self.origin) {
            [] if self.authority.is_some() => b"/",
            [] => at(&self.bytes, self.target),
            origin => origin,
        }
    }

    /// The Host header, or the authority of an absolute-form target.
    pub fn host(&self) -> Option<&[u8]> {
        match self.known.host {
            Some(h) => Some(trim(at(&self.bytes, h))),
            None => self.authority.map(|a| at(&self.bytes, a)),
        }
    }

    /// The host as a `Bytes` sharing the head's buffer (for the access log).
    pub fn host_bytes(&self) -> Option<Bytes> {
        let host = self.host()?;
        Some(self.bytes.slice_ref(host))
    }

    pub fn target_bytes(&self) -> Bytes {
        self.bytes.slice(self.target.0 as usize..self.target.1 as usize)
    }

    /// The first value of header `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| at(&self.bytes, h.name).eq_ignore_ascii_case(name.as_bytes()))
            .map(|h| at(&self.bytes, h.value))
    }

    pub fn content_length(&self) -> Option<u64> {
        self.known.content_length
    }

    pub fn is_chunked(&self) -> bool {
        self.known.chunked
    }

    /// Whether a body follows the head.
    pub fn has_body(&self) -> bool {
        self.known.chunked || self.known.content_length.is_some_and(|n| n > 0)
    }

    pub fn expects_continue(&self) -> bool {
        self.known.expect_continue && self.has_body() && self.version == 1
    }

    /// Whether the client allows the connection to stay open after this request.
    pub fn keep_alive(&self) -> bool {
        self.known.keeps_alive(self.version)
    }

    /// Write the head as sent to a backend into `out`: origin-form target, HTTP/1.1, the
    /// client's end-to-end headers in order, then `Host` (if the client sent none), the
    /// forwarding headers and the body's framing.
    pub fn encode_for_backend(&self, out: &mut Vec<u8>, fwd: &Forwarding<'_>, backend_host: &[u8]) {
        out.clear();
        out.extend_from_slice(self.method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.origin_target());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        for h in self.headers.iter().filter(|h| !h.skip) {
            push_header(out, at(&self.bytes, h.name), at(&self.bytes, h.value));
        }
        if self.known.host.is_none() {
            push_header(out, b"host", self.host().unwrap_or(backend_host));
        }
        // Several `X-Forwarded-For` lines are one list (RFC 9110 5.3): keep them all, in order.
        out.extend_from_slice(b"x-forwarded-for: ");
        if self.known.forwarded_for > 0 {
            for h in &self.headers {
                if at(&self.bytes, h.name).eq_ignore_ascii_case(b"x-forwarded-for") {
                    out.extend_from_slice(trim(at(&self.bytes, h.value)));
                    out.extend_from_slice(b", ");
                }
            }
        }
        out.extend_from_slice(fwd.client_ip);
        out.extend_from_slice(b"\r\n");
        push_header(out, b"x-forwarded-proto", fwd.proto);
        if let Some(host) = self.host() {
            push_header(out, b"x-forwarded-host", host);
        }
        if self.known.chunked {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// What the proxy adds to every forwarded request.
#[derive(Debug, Clone, Copy)]
pub struct Forwarding<'a> {
    pub client_ip: &'a [u8],
    pub proto: &'a [u8],
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A request target as (origin-form part, authority): `/a?b` is all origin; in absolute-form
/// `http://h:1/a?b` the authority is `h:1` and the origin `/a?b` (empty when there is no
/// path); authority-form (`host:443`) and `*` have neither.
fn split_target(target: &[u8]) -> (&[u8], Option<&[u8]>) {
    if target.first() == Some(&b'/') {
        return (target, None);
    }
    let Some(i) = target.windows(3).position(|w| w == b"://") else {
        return (&target[..0], None);
    };
    let rest = &target[i + 3..];
    let end = rest.iter().position(|&b| b == b'/' || b == b'?').unwrap_or(rest.len());
    let origin = if rest.get(end) == Some(&b'/') { &rest[end..] } else { &rest[rest.len()..] };
    (origin, Some(&rest[..end]))
}

fn malformed(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid request line",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "invalid HTTP version",
    }
}

/// How a response body is delimited (RFC 9112 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the backend closes the connection.
    UntilClose,
}

/// A parsed response head from a backend.
#[derive(Debug, Default)]
pub struct ResponseHead {
    pub status: u16,
    pub version: u8,
    reason: (u32, u32),
    headers: Vec<HeaderRef>,
    known: Known,
    /// The head's length in the buffer it was parsed from.
    pub len: usize,
}

impl ResponseHead {
    /// Parse a response head at the front of `buf` without consuming it. `Ok(false)`: read more.
    pub fn parse(&mut self, buf: &[u8], max_bytes: usize) -> Result<bool, HeadError> {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let mut config = httparse::ParserConfig::default();
        // Lenient with backends, as NGINX is: these forms are obsolete but harmless.
        config.allow_spaces_after_header_name_in_responses(true);
        config.allow_obsolete_multiline_headers_in_responses(true);
        let len = match config.parse_response_with_uninit_headers(&mut resp, buf, &mut slots) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > max_bytes => return Err(HeadError::TooLarge),
            Ok(httparse::Status::Partial) => return Ok(false),
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
            Err(e) => return Err(HeadError::Malformed(malformed(e))),
        };
        self.status = resp.code.unwrap_or(502);
        self.version = resp.version.unwrap_or(1);
        self.reason = span(buf, resp.reason.unwrap_or("").as_bytes());
        collect_headers(buf, resp.headers, false, &mut self.headers, &mut self.known)?;
        self.len = len;
        Ok(true)
    }

    /// Whether the status is an interim 1xx (other than 101) to read past.
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status) && self.status != 101
    }

    pub fn framing(&self, request_method: &Method) -> Framing {
        if request_method == Method::HEAD || self.status == 204 || self.status == 304 || self.status < 200 {
            return Framing::None;
        }
        // An unknown coding is passed through as it is and read until the backend closes.
        if self.known.unknown_coding {
            return Framing::UntilClose;
        }
        if self.known.chunked {
            return Framing::Chunked;
        }
        match self.known.content_length {
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    }

    /// Whether the backend connection can carry another request after this response.
    pub fn backend_keeps_alive(&self) -> bool {
        self.known.keeps_alive(self.version) && !self.known.unknown_coding
    }

    /// The response head for the client, from `buf` (the bytes this head was parsed from).
    /// `chunked`: the body goes out chunked; `close`: the client connection ends after it;
    /// `keep_alive_10`: an HTTP/1.0 client asked to keep the connection.
    pub fn encode_for_client(&self, buf: &[u8], out: &mut Vec<u8>, framing: ClientFraming) {
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        push_status(out, self.status);
        out.push(b' ');
        out.extend_from_slice(at(buf, self.reason));
        out.extend_from_slice(b"\r\n");
        for h in self.headers.iter().filter(|h| !h.skip) {
            push_header(out, at(buf, h.name), at(buf, h.value));
        }
        framing.push(out);
        out.extend_from_slice(b"\r\n");
    }
}

/// The framing and connection headers Velocity adds to a response.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientFraming {
    pub chunked: bool,
    pub close: bool,
    pub keep_alive_10: bool,
}

impl ClientFraming {
    fn push(self, out: &mut Vec<u8>) {
        if self.chunked {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        if self.close {
            out.extend_from_slice(b"connection: close\r\n");
        } else if self.keep_alive_10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
    }
}

fn push_status(out: &mut Vec<u8>, status: u16) {
    let s = status.min(999);
    out.extend_from_slice(&[b'0' + (s / 100) as u8, b'0' + (s / 10 % 10) as u8, b'0' + (s % 10) as u8]);
}

/// A complete response head of Velocity's own (errors and the like) with a short text body.
pub fn encode_local(out: &mut Vec<u8>, status: u16, extra: &[(&str, &[u8])], body_len: usize, framing: ClientFraming) {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    push_status(out, status);
    out.push(b' ');
    let reason = hyper::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("Unknown");
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: ");
    out.extend_from_slice(body_len.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in extra {
        push_header(out, name.as_bytes(), value);
    }
    framing.push(out);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(text: &str) -> Result<RequestHead, HeadError> {
        let mut head = RequestHead::default();
        let mut buf = BytesMut::from(text);
        assert!(head.parse(&mut buf, 8192)?);
        Ok(head)
    }

    fn forwarded(head: &RequestHead) -> String {
        let mut out = Vec::new();
        head.encode_for_backend(&mut out, &Forwarding { client_ip: b"10.1.1.1", proto: b"http" }, b"b:1");
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn forwards_end_to_end_headers_and_adds_forwarding() {
        let h = req("GET /a?b=1 HTTP/1.1\r\nHost: web\r\nConnection: keep-alive, x-secret\r\nX-Secret: 1\r\nX-Forwarded-For: 1.2.3.4\r\nAccept: */*\r\nX-Forwarded-For: 5.6.7.8\r\nKeep-Alive: 5\r\nTE: trailers\r\n\r\n").unwrap();
        assert_eq!(h.path(), b"/a");
        assert_eq!(h.host(), Some(&b"web"[..]));
        assert!(h.keep_alive());
        assert_eq!(
            forwarded(&h),
            "GET /a?b=1 HTTP/1.1\r\nHost: web\r\nAccept: */*\r\nx-forwarded-for: 1.2.3.4, 5.6.7.8, 10.1.1.1\r\nx-forwarded-proto: http\r\nx-forwarded-host: web\r\n\r\n"
        );
    }

    #[test]
    fn absolute_form_becomes_origin_form_and_gives_the_host() {
        let h = req("GET http://api.local:8080/x/y?z HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(h.path(), b"/x/y");
        assert_eq!(h.origin_target(), b"/x/y?z");
        assert_eq!(h.host(), Some(&b"api.local:8080"[..]));
        assert!(forwarded(&h).starts_with("GET /x/y?z HTTP/1.1\r\nhost: api.local:8080\r\n"));
        let h = req("GET http://api.local HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(h.origin_target(), b"/");
    }

    #[test]
    fn framing_rules() {
        assert!(req("POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
        assert_eq!(
            req("POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n").unwrap_err(),
            HeadError::Malformed("conflicting content-length")
        );
        assert_eq!(req("POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n").unwrap().content_length(), Some(3));
        assert!(req("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n").is_err());
        assert_eq!(
            req("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n").unwrap_err(),
            HeadError::UnsupportedEncoding
        );
        let h = req("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
        assert!(h.is_chunked() && h.has_body());
        assert!(forwarded(&h).ends_with("transfer-encoding: chunked\r\n\r\n"));
    }

    #[test]
    fn header_lookup_and_the_header_count_limit() {
        let h = req("GET / HTTP/1.1\r\nHost: a\r\nCookie: s=1\r\ncookie: s=2\r\n\r\n").unwrap();
        assert_eq!(h.header("COOKIE"), Some(&b"s=1"[..]));
        assert_eq!(h.header("accept"), None);
        let many: String = (0..MAX_HEADERS).map(|i| format!("x-{i}: 1\r\n")).collect();
        assert!(req(&format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n")).is_err_and(|e| e == HeadError::TooLarge));
    }

    #[test]
    fn a_response_in_an_unknown_coding_is_read_until_close() {
        let mut r = ResponseHead::default();
        assert_eq!(r.parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 5\r\n\r\n", 8192), Ok(true));
        assert_eq!(r.framing(&Method::GET), Framing::UntilClose);
        assert!(!r.backend_keeps_alive());
    }

    #[test]
    fn http10_keep_alive_only_when_asked() {
        assert!(!req("GET / HTTP/1.0\r\n\r\n").unwrap().keep_alive());
        assert!(req("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap().keep_alive());
        assert!(!req("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap().keep_alive());
    }

    #[test]
    fn partial_and_oversized_heads() {
        let mut head = RequestHead::default();
        let mut buf = BytesMut::from("GET / HTTP/1.1\r\nHost: a\r\n");
        assert_eq!(head.parse(&mut buf, 8192), Ok(false));
        assert_eq!(head.parse(&mut buf, 10), Err(HeadError::TooLarge));
        let mut buf = BytesMut::from("GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /next");
        assert_eq!(head.parse(&mut buf, 8192), Ok(true));
        assert_eq!(&buf[..], b"GET /next");
    }

    #[test]
    fn response_framing_and_hop_by_hop() {
        let text = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\nX-B: 1\r\n\r\nok";
        let mut r = ResponseHead::default();
        assert_eq!(r.parse(text, 8192), Ok(true));
        assert_eq!(r.framing(&Method::GET), Framing::Length(2));
        assert_eq!(r.framing(&Method::HEAD), Framing::None);
        assert!(r.backend_keeps_alive());
        let mut out = Vec::new();
        r.encode_for_client(text, &mut out, ClientFraming { close: true, ..Default::default() });
        assert_eq!(out, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-B: 1\r\nconnection: close\r\n\r\n");
        assert_eq!(r.len, text.len() - 2);

        let mut r = ResponseHead::default();
        assert_eq!(r.parse(b"HTTP/1.0 200 OK\r\n\r\n", 8192), Ok(true));
        assert_eq!(r.framing(&Method::GET), Framing::UntilClose);
        assert!(!r.backend_keeps_alive());
        assert_eq!(r.parse(b"HTTP/1.1 204 No Content\r\n\r\n", 8192), Ok(true));
        assert_eq!(r.framing(&Method::GET), Framing::None);
        assert_eq!(r.parse(b"HTTP/1.1 100 Continue\r\n\r\n", 8192), Ok(true));
        assert!(r.is_interim());
    }
}
