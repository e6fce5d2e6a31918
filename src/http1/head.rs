//! Request and response heads, parsed once with `httparse` and kept as the raw bytes plus the
//! offsets of each header. A proxy forwards most headers untouched, so copying the bytes it
//! received beats building a `HeaderMap` (a hash and an allocation per header) and serialising
//! it again; the few headers the proxy acts on are recognised during the parse.

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
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
    /// `CONNECT`: Velocity is not a forward proxy (405, as NGINX answers it).
    MethodNotAllowed,
}

impl HeadError {
    pub fn message(self) -> &'static str {
        match self {
            HeadError::Malformed(why) => why,
            HeadError::TooLarge => "headers too large",
            HeadError::UnsupportedEncoding => "unsupported transfer-encoding",
            HeadError::MethodNotAllowed => "CONNECT is not supported",
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
    /// The first `Host` line's value, and how many `Host` lines there are (one is valid).
    host: Option<(u32, u32)>,
    host_lines: u8,
    /// A `Content-Length` line is present (valid or not).
    length_line: bool,
    /// Why the `Content-Length` lines are unusable; an error only where they frame the body
    /// (a response framed by its transfer coding ignores them, RFC 9112 6.3).
    bad_length: Option<&'static str>,
    /// How many `X-Forwarded-For` lines there are.
    forwarded_for: u8,
    /// `Connection` names other headers: those are hop-by-hop too.
    connection_lists_others: bool,
    /// `Connection: upgrade`.
    connection_upgrade: bool,
    /// An `Upgrade` header offers `websocket` (the only protocol Velocity tunnels; `h2c` is
    /// dropped like every other offer).
    upgrade_websocket: bool,
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
    // One allocation for a list given back while the connection was idle.
    headers.reserve(parsed.len());
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
    /// Bytes of an incomplete head already looked at: the next read resumes the search for
    /// the head's end there, so a head that trickles in costs linear time, not quadratic.
    scanned: usize,
    /// The last Host value found valid on this connection.
    last_host: LastHost,
}

/// A connection's requests nearly always carry the same Host: comparing it with the last one
/// found valid is cheaper than validating it again (a per-byte check on every request).
#[derive(Debug, Clone, Default)]
struct LastHost {
    len: u8,
    bytes: [u8; 32],
}

impl LastHost {
    fn is_valid(&mut self, host: &[u8]) -> bool {
        if host.len() == usize::from(self.len) && host == &self.bytes[..host.len()] {
            return true;
        }
        let valid = valid_host(host);
        if valid && host.len() <= self.bytes.len() {
            self.bytes[..host.len()].copy_from_slice(host);
            self.len = host.len() as u8;
        }
        valid
    }
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
            headers: Vec::new(),
            known: Known::default(),
            scanned: 0,
            last_host: LastHost::default(),
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
        4 if request && is("host") => {
            if known.host.is_none() {
                // httparse has trimmed the value (leading and trailing whitespace): routing,
                // validation and forwarding read it as it is.
                known.host = Some(value_span);
            }
            known.host_lines = known.host_lines.saturating_add(1);
            false
        }
        6 if request && is("expect") => {
            known.expect_continue = trim(value).eq_ignore_ascii_case(b"100-continue");
            true
        }
        7 if is("upgrade") => {
            // Always skipped: the websocket offer is written again by `encode_for_backend`,
            // alone, so that `h2c` (a request-smuggling shape) never reaches a backend.
            if request {
                known.upgrade_websocket |=
                    value.split(|&b| b == b',').map(trim).any(|t| t.eq_ignore_ascii_case(b"websocket"));
            }
            true
        }
        7 => is("trailer"),
        10 if is("connection") => {
            for token in value.split(|&b| b == b',').map(trim).filter(|t| !t.is_empty()) {
                if token.eq_ignore_ascii_case(b"close") {
                    known.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    known.keep_alive = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    known.connection_upgrade = true;
                } else {
                    known.connection_lists_others = true;
                }
            }
            true
        }
        10 => is("keep-alive"),
        // h2c's settings: never honoured, so never forwarded.
        14 if request && is("http2-settings") => true,
        14 if is("content-length") => {
            // Repeated lines (or a list) must agree, or the framing is ambiguous (smuggling).
            known.length_line = true;
            for part in value.split(|&b| b == b',') {
                match parse_u64(trim(part)) {
                    None => known.bad_length = Some("invalid content-length"),
                    Some(n) if known.content_length.is_some_and(|m| m != n) => {
                        known.bad_length = Some("conflicting content-length")
                    }
                    Some(n) => known.content_length = Some(n),
                }
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
    ///
    /// A head that comes whole is parsed at once. One that does not is parsed once when it
    /// starts (so that garbage such as a TLS hello is refused at once) and once more when its
    /// end (an empty line) has arrived: in between, each call only looks at the new bytes.
    pub fn parse(&mut self, buf: &mut BytesMut, max_bytes: usize) -> Result<bool, HeadError> {
        // Empty lines before a request line are ignored (RFC 9112 2.2), so that below the
        // first empty line is the end of the head.
        while let [b'\r', b'\n', ..] | [b'\n', ..] = buf[..] {
            buf.advance(if buf[0] == b'\n' { 1 } else { 2 });
            self.scanned = 0;
        }
        // Past the limit the whole parse decides, as in one read: malformed before it was
        // too large is a 400, not a 431.
        if self.scanned > 0 && buf.len() <= max_bytes && !has_blank_line(buf, self.scanned) {
            self.scanned = buf.len();
            return Ok(false);
        }
        match self.parse_whole(buf, max_bytes) {
            Ok(Some(len)) => {
                self.scanned = 0;
                self.bytes = buf.split_to(len).freeze();
                Ok(true)
            }
            Ok(None) if buf.len() > max_bytes => self.fail(HeadError::TooLarge),
            Ok(None) => {
                self.scanned = buf.len();
                Ok(false)
            }
            Err(e) => self.fail(e),
        }
    }

    fn fail(&mut self, e: HeadError) -> Result<bool, HeadError> {
        self.scanned = 0;
        Err(e)
    }

    /// Give back what the head holds (its bytes share the connection's read buffer): an idle
    /// connection keeps no buffer alive.
    pub fn release(&mut self) {
        self.bytes = Bytes::new();
        self.headers = Vec::new();
    }

    /// One `httparse` pass over `buf`: the head's length if it is complete and valid.
    fn parse_whole(&mut self, buf: &[u8], max_bytes: usize) -> Result<Option<usize>, HeadError> {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        #[cfg(test)]
        tests::PARSED.with(|p| p.set(p.get() + buf.len()));
        let len = match req.parse_with_uninit_headers(buf, &mut slots) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
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
        if self.method == Method::CONNECT {
            return Err(HeadError::MethodNotAllowed);
        }
        let target = req.path.unwrap_or("/").as_bytes();
        self.target = span(base, target);
        let (origin, authority) = split_target(target, &self.method)?;
        self.origin = span(base, origin);
        self.authority = authority.map(|a| span(base, a));
        self.version = req.version.unwrap_or(1);
        collect_headers(base, req.headers, true, &mut self.headers, &mut self.known)?;
        let known = &self.known;
        if let Some(why) = known.bad_length {
            return Err(HeadError::Malformed(why));
        }
        if known.unknown_coding {
            return Err(HeadError::UnsupportedEncoding);
        }
        if known.chunked && known.length_line {
            return Err(HeadError::Malformed("both content-length and transfer-encoding"));
        }
        if known.chunked && self.version == 0 {
            return Err(HeadError::Malformed("transfer-encoding in an HTTP/1.0 request"));
        }
        // Host: exactly one in HTTP/1.1, at most one in HTTP/1.0, always a valid
        // `uri-host[:port]` (RFC 9112 3.2). An absolute-form target's authority wins over it.
        match (known.host_lines, known.host) {
            (0, _) if self.version == 1 => return Err(HeadError::Malformed("missing host header")),
            (2.., _) => return Err(HeadError::Malformed("more than one host header")),
            (_, Some(h)) if !self.last_host.is_valid(at(base, h)) => {
                return Err(HeadError::Malformed("invalid host header"))
            }
            _ => {}
        }
        if authority.is_some() && known.host.is_some() {
            // The backend gets the authority as its Host, not the line the client sent.
            for h in &mut self.headers {
                if at(base, h.name).eq_ignore_ascii_case(b"host") {
                    h.skip = true;
                }
            }
        }
        Ok(Some(len))
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

    /// The authority of an absolute-form target, or else the Host header (RFC 9112 3.2.2).
    pub fn host(&self) -> Option<&[u8]> {
        match self.authority {
            Some(a) => Some(at(&self.bytes, a)),
            None => self.known.host.map(|h| at(&self.bytes, h)),
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

    /// The end-to-end headers, in order, as `encode_for_backend` forwards them (hop-by-hop
    /// ones and those `Connection` names left out): for a head sent on in another encoding
    /// (HTTP/2 backends).
    pub fn end_to_end_headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        self.headers.iter().filter(|h| !h.skip).map(|h| (at(&self.bytes, h.name), at(&self.bytes, h.value)))
    }

    /// Every value of header `name`, in order (a list header such as `X-Forwarded-For` may
    /// come on several lines).
    pub fn headers_named<'a>(&'a self, name: &'a str) -> impl DoubleEndedIterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |h| at(&self.bytes, h.name).eq_ignore_ascii_case(name.as_bytes()))
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

    /// A WebSocket opening handshake (RFC 6455 4.1): an HTTP/1.1 GET without a body that
    /// offers `Upgrade: websocket` with `Connection: upgrade`.
    pub fn is_websocket_upgrade(&self) -> bool {
        self.known.upgrade_websocket
            && self.known.connection_upgrade
            && self.version == 1
            && self.method == Method::GET
            && !self.has_body()
    }

    /// Whether the client allows the connection to stay open after this request.
    pub fn keep_alive(&self) -> bool {
        self.known.keeps_alive(self.version)
    }

    /// Write the head as sent to a backend into `out`: origin-form target, HTTP/1.1, the
    /// client's end-to-end headers in order, then `Host` (if the client sent none, or the
    /// target's authority replaces it), the
    /// forwarding headers and the body's framing.
    pub fn encode_for_backend(&self, out: &mut Vec<u8>, fwd: &Forwarding<'_>, backend_host: &[u8]) {
        out.clear();
        // One allocation for a buffer given back while the connection was idle.
        out.reserve(self.bytes.len() + 256);
        out.extend_from_slice(self.method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.origin_target());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        for h in self.headers.iter().filter(|h| !h.skip) {
            push_header(out, at(&self.bytes, h.name), at(&self.bytes, h.value));
        }
        if self.known.host.is_none() || self.authority.is_some() {
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
        if self.known.upgrade_websocket && self.is_websocket_upgrade() {
            out.extend_from_slice(b"upgrade: websocket\r\nconnection: upgrade\r\n");
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
/// path). Only origin-form and absolute-form with an `http` or `https` scheme are served
/// (authority-form belongs to CONNECT; `*` to `OPTIONS *`, refused as NGINX refuses it).
fn split_target<'a>(target: &'a [u8], method: &Method) -> Result<(&'a [u8], Option<&'a [u8]>), HeadError> {
    if target.first() == Some(&b'/') {
        return Ok((target, None));
    }
    if target == b"*" {
        return Err(HeadError::Malformed(if method == Method::OPTIONS {
            "OPTIONS * is not supported"
        } else {
            "invalid request target"
        }));
    }
    let Some(i) = target.windows(3).position(|w| w == b"://") else {
        return Err(HeadError::Malformed("invalid request target"));
    };
    let scheme = &target[..i];
    if !scheme.eq_ignore_ascii_case(b"http") && !scheme.eq_ignore_ascii_case(b"https") {
        return Err(HeadError::Malformed("unsupported scheme in the request target"));
    }
    let rest = &target[i + 3..];
    let end = rest.iter().position(|&b| b == b'/' || b == b'?').unwrap_or(rest.len());
    let authority = &rest[..end];
    // An http(s) URI must have a host (RFC 9110 4.2); userinfo (`user@`) is not valid either.
    if authority.is_empty() || !valid_host(authority) {
        return Err(HeadError::Malformed("invalid host in the request target"));
    }
    let origin = match rest.get(end) {
        Some(b'/') => &rest[end..],
        _ => &rest[rest.len()..],
    };
    Ok((origin, Some(authority)))
}

/// Whether `host` is a valid `uri-host [ ":" port ]` (RFC 3986 3.2.2): a reg-name
/// (unreserved, percent-encoded, sub-delims), an IPv4 address (a reg-name too) or a bracketed
/// IP literal, then digits after a colon. Empty is valid (RFC 9112 3.2: the URI has no host).
///
/// Every request's Host goes through here, so the common `name[:port]` costs one table lookup
/// per byte; only a `[` (IP literal) or a `%` (percent-encoding) takes the general path.
pub fn valid_host(host: &[u8]) -> bool {
    for (i, &b) in host.iter().enumerate() {
        match HOST_CLASS[b as usize] {
            NAME => {}
            // A reg-name has no colon: the first one starts the port.
            COLON => return host[i + 1..].iter().all(u8::is_ascii_digit),
            SPECIAL => return valid_host_general(host),
            _ => return false,
        }
    }
    true
}

const INVALID: u8 = 0;
const NAME: u8 = 1;
const COLON: u8 = 2;
const SPECIAL: u8 = 3;

/// [`valid_host`]'s fast path: what each byte can be in a plain `name[:port]`.
const HOST_CLASS: [u8; 256] = {
    let mut t = [INVALID; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = match b as u8 {
            b'[' | b'%' => SPECIAL,
            b':' => COLON,
            _ if HOST_CHAR[b] => NAME,
            _ => INVALID,
        };
        b += 1;
    }
    t
};

/// [`valid_host`] for any input: IP literals and percent-encoding included.
fn valid_host_general(host: &[u8]) -> bool {
    let (name, port) = match host {
        [b'[', rest @ ..] => {
            let Some(close) = rest.iter().position(|&b| b == b']') else { return false };
            let literal = &rest[..close];
            if literal.is_empty() || !literal.iter().all(|&b| b == b':' || HOST_CHAR[b as usize]) {
                return false;
            }
            match &rest[close + 1..] {
                [] => (&[][..], &[][..]),
                [b':', port @ ..] => (&[][..], port),
                _ => return false,
            }
        }
        _ => match host.iter().rposition(|&b| b == b':') {
            Some(colon) => (&host[..colon], &host[colon + 1..]),
            None => (host, &[][..]),
        },
    };
    let mut i = 0;
    while i < name.len() {
        match name[i] {
            b'%' if name.get(i + 1..i + 3).is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) => i += 3,
            b if HOST_CHAR[b as usize] && b != b'%' => i += 1,
            _ => return false,
        }
    }
    port.iter().all(u8::is_ascii_digit)
}

/// unreserved / sub-delims (RFC 3986), and `%` (checked for its two hex digits apart).
const HOST_CHAR: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b'%'
            );
        b += 1;
    }
    t
};

/// Whether an empty line ends in `buf` at or after `from` (the line ends before `from` were
/// looked at already; each is checked together with the bytes before it).
fn has_blank_line(buf: &[u8], from: usize) -> bool {
    let start = from.min(buf.len());
    buf[start..].iter().enumerate().any(|(k, &b)| {
        let i = start + k;
        b == b'\n' && i >= 1 && (buf[i - 1] == b'\n' || (buf[i - 1] == b'\r' && i >= 2 && buf[i - 2] == b'\n'))
    })
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
    /// The head with its obs-folds replaced by spaces, when it had any (RFC 9112 5.2): the
    /// offsets then refer to this copy, which has the original's length.
    unfolded: Option<Vec<u8>>,
    /// Both `Content-Length` and `Transfer-Encoding`: framed by the coding, forwarded
    /// without the length, and the backend connection is not reused (RFC 9112 6.3).
    length_and_coding: bool,
}

impl ResponseHead {
    /// Parse a response head at the front of `buf` without consuming it. `Ok(false)`: read more.
    pub fn parse(&mut self, buf: &[u8], max_bytes: usize) -> Result<bool, HeadError> {
        self.unfolded = None;
        match self.parse_from(buf, max_bytes) {
            Err(e @ HeadError::Malformed(_)) => self.parse_folded(buf, max_bytes, e),
            parsed => parsed,
        }
    }

    /// obs-fold (a header line continued on the next, indented) is refused by the strict
    /// parse; it is rare, so only then is the head looked at for it (out of line: the common
    /// path keeps `parse_from` inlined).
    #[cold]
    #[inline(never)]
    fn parse_folded(&mut self, buf: &[u8], max_bytes: usize, e: HeadError) -> Result<bool, HeadError> {
        match fold_state(buf) {
            Fold::None => Err(e),
            Fold::Incomplete if buf.len() > max_bytes => Err(HeadError::TooLarge),
            Fold::Incomplete => Ok(false),
            Fold::Complete(end) => {
                let mut copy = buf[..end].to_vec();
                unfold(&mut copy);
                let parsed = self.parse_from(&copy, max_bytes);
                self.unfolded = Some(copy);
                parsed
            }
        }
    }

    #[inline(always)]
    fn parse_from(&mut self, buf: &[u8], max_bytes: usize) -> Result<bool, HeadError> {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let mut config = httparse::ParserConfig::default();
        // Lenient with backends, as NGINX is: this form is obsolete but harmless.
        config.allow_spaces_after_header_name_in_responses(true);
        let len = match config.parse_response_with_uninit_headers(&mut resp, buf, &mut slots) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > max_bytes => return Err(HeadError::TooLarge),
            Ok(httparse::Status::Partial) => return Ok(false),
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
            Err(e) => return Err(HeadError::Malformed(malformed(e))),
        };
        self.status = resp.code.unwrap_or(502);
        self.version = resp.version.unwrap_or(1);
        self.reason = reason_span(buf, resp.reason);
        collect_headers(buf, resp.headers, false, &mut self.headers, &mut self.known)?;
        let coded = self.known.chunked || self.known.unknown_coding;
        self.length_and_coding = coded && self.known.length_line;
        if self.length_and_coding {
            self.known.content_length = None;
            for h in &mut self.headers {
                if at(buf, h.name).eq_ignore_ascii_case(b"content-length") {
                    h.skip = true;
                }
            }
        } else if let Some(why) = self.known.bad_length {
            return Err(HeadError::Malformed(why));
        }
        self.len = len;
        Ok(true)
    }

    /// Give back the header list: an idle connection keeps no buffer alive.
    pub fn release(&mut self) {
        self.headers = Vec::new();
        self.unfolded = None;
    }

    /// The end-to-end headers (hop-by-hop ones left out), from `buf` (the bytes this head was
    /// parsed from): for a client that takes them as fields rather than bytes (HTTP/2).
    pub fn fields<'a>(&'a self, buf: &'a [u8]) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        let buf = self.unfolded.as_deref().unwrap_or(buf);
        self.headers.iter().filter(|h| !h.skip).map(move |h| (at(buf, h.name), at(buf, h.value)))
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
        self.known.keeps_alive(self.version) && !self.known.unknown_coding && !self.length_and_coding
    }

    /// The response head for the client, from `buf` (the bytes this head was parsed from).
    /// `chunked`: the body goes out chunked; `close`: the client connection ends after it;
    /// `keep_alive_10`: an HTTP/1.0 client asked to keep the connection.
    pub fn encode_for_client(&self, buf: &[u8], out: &mut Vec<u8>, framing: ClientFraming) {
        let buf = self.unfolded.as_deref().unwrap_or(buf);
        out.clear();
        out.reserve(self.len + 64);
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

/// Where the reason phrase is in `buf`. httparse gives a phrase that is not UTF-8 (obs-text,
/// which RFC 9112 4 allows) as a static `""` that is no slice of `buf`: its offsets would be
/// garbage, so the phrase is then found in the status line itself, and forwarded as it came.
fn reason_span(buf: &[u8], reason: Option<&str>) -> (u32, u32) {
    if let Some(r) = reason.filter(|r| !r.is_empty()) {
        return span(buf, r.as_bytes());
    }
    let line = &buf[..buf.iter().position(|&b| b == b'\n').unwrap_or(buf.len())];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    // `HTTP/1.1`, spaces, the three digits, one space, then the phrase.
    let mut i = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    i += line[i..].iter().take_while(|&&b| b == b' ').count();
    i += line[i..].iter().take_while(|b| b.is_ascii_digit()).count();
    if line.get(i) == Some(&b' ') {
        i += 1;
    }
    (i as u32, line.len() as u32)
}

/// Whether a response head has an obs-fold: a line end followed by a space or tab before the
/// head's end (an empty line).
enum Fold {
    None,
    /// A fold, but the head's end has not arrived.
    Incomplete,
    /// A fold, and the head (with its final empty line) is this long.
    Complete(usize),
}

fn fold_state(buf: &[u8]) -> Fold {
    let mut folded = false;
    let mut line_start = 0;
    for (i, &b) in buf.iter().enumerate() {
        if b != b'\n' {
            continue;
        }
        let line = &buf[line_start..i];
        if line.is_empty() || line == b"\r" {
            return if folded { Fold::Complete(i + 1) } else { Fold::None };
        }
        if matches!(buf.get(i + 1), Some(b' ' | b'\t')) {
            folded = true;
        }
        line_start = i + 1;
    }
    if folded {
        Fold::Incomplete
    } else {
        Fold::None
    }
}

/// Replace each obs-fold's line end by spaces: the continued line joins the one before.
fn unfold(head: &mut [u8]) {
    for i in 0..head.len().saturating_sub(1) {
        if head[i] == b'\n' && matches!(head[i + 1], b' ' | b'\t') {
            head[i] = b' ';
            if i > 0 && head[i - 1] == b'\r' {
                head[i - 1] = b' ';
            }
        }
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
    out.reserve(256);
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
    fn websocket_handshake_forwarded_alone_and_h2c_dropped() {
        let h = req("GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: h2c, websocket\r\nHTTP2-Settings: AA\r\nSec-WebSocket-Key: k\r\n\r\n").unwrap();
        assert!(h.is_websocket_upgrade());
        let out = forwarded(&h);
        assert!(out.contains("Sec-WebSocket-Key: k\r\n"), "{out}");
        assert!(out.ends_with("upgrade: websocket\r\nconnection: upgrade\r\n\r\n"), "{out}");
        assert!(!out.to_ascii_lowercase().contains("h2c") && !out.contains("HTTP2"), "{out}");
        for not_ws in [
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AA\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 1\r\n\r\nx",
            "GET / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        ] {
            let h = req(not_ws).unwrap();
            assert!(!h.is_websocket_upgrade(), "{not_ws}");
            let out = forwarded(&h).to_ascii_lowercase();
            assert!(!out.contains("upgrade") && !out.contains("http2-settings"), "{out}");
        }
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
    fn absolute_form_becomes_origin_form_and_its_authority_wins_over_host() {
        let h = req("GET http://api.local:8080/x/y?z HTTP/1.1\r\nHost: other\r\nA: 1\r\n\r\n").unwrap();
        assert_eq!(h.path(), b"/x/y");
        assert_eq!(h.origin_target(), b"/x/y?z");
        assert_eq!(h.host(), Some(&b"api.local:8080"[..]));
        assert!(
            forwarded(&h).starts_with("GET /x/y?z HTTP/1.1\r\nA: 1\r\nhost: api.local:8080\r\n"),
            "{}",
            forwarded(&h)
        );
        let h = req("GET HTTPS://api.local HTTP/1.1\r\nHost: api.local\r\n\r\n").unwrap();
        assert_eq!(h.origin_target(), b"/");
        for bad in ["ftp://x/", "x:80", "http:///a", "http://u@h/", "http://a b/", "*"] {
            let text = format!("GET {bad} HTTP/1.1\r\nHost: x\r\n\r\n");
            assert!(matches!(req(&text), Err(HeadError::Malformed(_))), "{bad}");
        }
        assert_eq!(
            req("OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n").unwrap_err(),
            HeadError::Malformed("OPTIONS * is not supported")
        );
        assert_eq!(req("CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n").unwrap_err(), HeadError::MethodNotAllowed);
    }

    #[test]
    fn host_rules() {
        let missing = HeadError::Malformed("missing host header");
        assert_eq!(req("GET / HTTP/1.1\r\n\r\n").unwrap_err(), missing);
        assert_eq!(req("GET http://a/ HTTP/1.1\r\n\r\n").unwrap_err(), missing);
        assert_eq!(
            req("GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n").unwrap_err(),
            HeadError::Malformed("more than one host header")
        );
        assert_eq!(
            req("GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n").unwrap_err(),
            HeadError::Malformed("more than one host header")
        );
        for bad in ["a b", "a/b", "a@b", "[::1", "[]", "a:8x", "%zz", "a\"b", "[::1]x"] {
            let text = format!("GET / HTTP/1.1\r\nHost: {bad}\r\n\r\n");
            assert_eq!(req(&text).unwrap_err(), HeadError::Malformed("invalid host header"), "{bad:?}");
        }
        for good in ["a", "A.example:8080", "127.0.0.1:1", "[::1]:80", "[v1.x]", "xn--d1a.b_c~d", "%41", "a:", ""] {
            let text = format!("GET / HTTP/1.1\r\nHost: {good}\r\n\r\n");
            assert!(req(&text).is_ok(), "{good:?}");
        }
        let h = req("GET / HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!(h.host(), None);
        assert!(forwarded(&h).contains("host: b:1\r\n"));
    }

    /// The fast path of `valid_host` decides as the general one does: every string up to
    /// four bytes long over an alphabet with each kind of byte.
    #[test]
    fn valid_host_fast_path_agrees_with_the_general_one() {
        let alphabet = b"a1.-:[]%F ~@/";
        let mut inputs: Vec<Vec<u8>> = vec![Vec::new()];
        for _ in 0..4 {
            let longer: Vec<Vec<u8>> = inputs
                .iter()
                .filter(|s| s.len() == inputs.last().map_or(0, Vec::len))
                .flat_map(|s| alphabet.iter().map(move |&b| [s.as_slice(), &[b]].concat()))
                .collect();
            inputs.extend(longer);
        }
        assert!(inputs.len() > 30_000);
        for host in &inputs {
            assert_eq!(valid_host(host), valid_host_general(host), "{:?}", String::from_utf8_lossy(host));
        }
    }

    /// One head parses a connection's requests in turn: the remembered valid Host never lets
    /// a different, invalid one through.
    #[test]
    fn the_last_valid_host_is_remembered_but_never_stands_for_another() {
        let mut head = RequestHead::default();
        let long = "h".repeat(40);
        for (host, ok) in [("a:80", true), ("a:80", true), ("a 80", false), ("a:8", true), (&long[..], true)] {
            let mut buf = BytesMut::from(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_str());
            let parsed = head.parse(&mut buf, 8192);
            assert_eq!(parsed.is_ok(), ok, "{host:?}: {parsed:?}");
            if ok {
                assert_eq!(head.host(), Some(host.as_bytes()));
            }
        }
        let mut buf = BytesMut::from(format!("GET / HTTP/1.1\r\nHost: {long} \r\n\r\n").as_str());
        assert_eq!(head.parse(&mut buf, 8192), Ok(true));
        let mut buf = BytesMut::from(format!("GET / HTTP/1.1\r\nHost: {long}/\r\n\r\n").as_str());
        assert!(head.parse(&mut buf, 8192).is_err());
    }

    thread_local! {
        /// Bytes handed to `httparse`, to check that a trickling head costs linear work.
        pub(super) static PARSED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    #[test]
    fn a_head_that_trickles_in_is_not_parsed_again_from_its_start() {
        let filler: String = (0..100).map(|i| format!("x-filler-{i}: {}\r\n", "v".repeat(60))).collect();
        let text = format!("GET /t HTTP/1.1\r\nHost: a\r\n{filler}\r\n");
        let mut head = RequestHead::default();
        let mut buf = BytesMut::new();
        PARSED.with(|p| p.set(0));
        for (i, b) in text.bytes().enumerate() {
            buf.extend_from_slice(&[b]);
            assert_eq!(head.parse(&mut buf, 64 * 1024), Ok(i + 1 == text.len()), "at byte {i}");
        }
        assert_eq!(head.path(), b"/t");
        // Byte by byte, re-parsing from the start would cost len²/2 (about 25 M here).
        let parsed = PARSED.with(|p| p.get());
        assert!(parsed <= 2 * text.len(), "{parsed} bytes parsed for a {}-byte head", text.len());
    }

    /// What a request parses to, as far as the proxy acts on it.
    fn outcome(pieces: &[&[u8]]) -> String {
        let mut head = RequestHead::default();
        let mut buf = BytesMut::new();
        for (i, piece) in pieces.iter().enumerate() {
            buf.extend_from_slice(piece);
            match head.parse(&mut buf, 4096) {
                Ok(true) => {
                    // The rest arrives as it would, behind the head.
                    for rest in &pieces[i + 1..] {
                        buf.extend_from_slice(rest);
                    }
                    // The whole parsed head (bytes, offsets of every header, what the
                    // proxy recognised in them), then what the proxy derives from it.
                    return format!(
                        "{head:?}\n{} {:?} {:?} v{} len={:?} chunked={} ka={} rest={:?}\n{}",
                        head.method,
                        String::from_utf8_lossy(head.origin_target()),
                        head.host().map(String::from_utf8_lossy),
                        head.version,
                        head.content_length(),
                        head.is_chunked(),
                        head.keep_alive(),
                        String::from_utf8_lossy(&buf),
                        forwarded(&head)
                    );
                }
                Ok(false) => {}
                Err(e) => return format!("error {e:?}"),
            }
        }
        "incomplete".into()
    }

    /// Property: a request split into reads at any boundaries parses exactly as in one read.
    /// Every split into two reads and into three (exhaustive for these short requests), and
    /// one byte per read.
    #[test]
    fn any_split_parses_as_one_read() {
        let requests: &[&[u8]] = &[
            b"GET /a?b=1 HTTP/1.1\r\nHost: web\r\nConnection: keep-alive, x-s\r\nX-S: 1\r\n\r\n",
            b"\r\nPOST /up HTTP/1.1\r\nHost: h:1\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\n",
            b"GET http://x.example/p HTTP/1.1\r\nHost: y\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
            b"GET / HTTP/1.0\n\n",
            b"PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            b"GET ftp://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"GET / HTTP/1.1\r\nHost: a\r\n",
        ];
        for &request in requests {
            let whole = outcome(&[request]);
            let n = request.len();
            assert_eq!(
                outcome(&request.chunks(1).collect::<Vec<_>>()),
                whole,
                "byte by byte: {:?}",
                String::from_utf8_lossy(request)
            );
            for i in 0..=n {
                assert_eq!(outcome(&[&request[..i], &request[i..]]), whole, "split at {i}");
                for j in i..=n {
                    assert_eq!(outcome(&[&request[..i], &request[i..j], &request[j..]]), whole, "split at {i}, {j}");
                }
            }
        }
    }

    #[test]
    fn a_response_with_both_length_and_coding_is_framed_by_the_coding() {
        let text = b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n";
        let mut r = ResponseHead::default();
        assert_eq!(r.parse(text, 8192), Ok(true));
        assert_eq!(r.framing(&Method::GET), Framing::Chunked);
        assert!(!r.backend_keeps_alive());
        let mut out = Vec::new();
        r.encode_for_client(text, &mut out, ClientFraming { chunked: true, ..Default::default() });
        assert_eq!(out, b"HTTP/1.1 200 OK\r\nX-A: 1\r\ntransfer-encoding: chunked\r\n\r\n");
        // Lengths that would conflict do not matter when the coding frames the body.
        let text = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(r.parse(text, 8192), Ok(true));
        let text = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        assert!(r.parse(text, 8192).is_err());
    }

    #[test]
    fn obs_fold_in_a_response_becomes_spaces() {
        let text = b"HTTP/1.1 200 OK\r\nX-Long: a,\r\n  b,\r\n\tc\r\nContent-Length: 2\r\n\r\nok";
        let mut r = ResponseHead::default();
        assert_eq!(r.parse(&text[..30], 8192), Ok(false));
        assert_eq!(r.parse(text, 8192), Ok(true));
        assert_eq!(r.len, text.len() - 2);
        assert_eq!(r.framing(&Method::GET), Framing::Length(2));
        let mut out = Vec::new();
        r.encode_for_client(text, &mut out, ClientFraming::default());
        assert_eq!(out, b"HTTP/1.1 200 OK\r\nX-Long: a,    b,  \tc\r\nContent-Length: 2\r\n\r\n");
        // A folded framing header is read unfolded too.
        let text = b"HTTP/1.1 200 OK\r\nTransfer-Encoding:\r\n chunked\r\n\r\n";
        assert_eq!(r.parse(text, 8192), Ok(true));
        assert_eq!(r.framing(&Method::GET), Framing::Chunked);
        // The next head parsed has no fold: nothing of the copy is left.
        assert_eq!(r.parse(b"HTTP/1.1 204 No Content\r\n\r\n", 8192), Ok(true));
        r.encode_for_client(b"HTTP/1.1 204 No Content\r\n\r\n", &mut out, ClientFraming::default());
        assert_eq!(out, b"HTTP/1.1 204 No Content\r\n\r\n");
    }

    /// Found by fuzzing (response_head): a reason phrase in obs-text came back from httparse
    /// as a static "" and its offsets underflowed (a panic, or garbage forwarded).
    #[test]
    fn a_reason_phrase_that_is_not_utf8_is_forwarded_as_it_came() {
        let text = b"HTTP/1.0 304 Not Mod\xff\xfeed\r\nX-A: x\r\n\r\n";
        let mut r = ResponseHead::default();
        assert_eq!(r.parse(text, 8192), Ok(true));
        let mut out = Vec::new();
        r.encode_for_client(text, &mut out, ClientFraming::default());
        assert_eq!(out, b"HTTP/1.1 304 Not Mod\xff\xfeed\r\nX-A: x\r\n\r\n");
        for (text, reason) in [(&b"HTTP/1.1 200 \r\n\r\n"[..], &b""[..]), (b"HTTP/1.1 200\r\n\r\n", b"")] {
            assert_eq!(r.parse(text, 8192), Ok(true));
            r.encode_for_client(text, &mut out, ClientFraming::default());
            assert_eq!(out, [&b"HTTP/1.1 200 "[..], reason, b"\r\n\r\n"].concat());
        }
    }

    /// Found by fuzzing (request_head): past `max_header_bytes`, a head that trickled in is
    /// refused for what is wrong with it, as in one read.
    #[test]
    fn a_malformed_head_past_the_limit_is_malformed_however_it_came() {
        let text = format!("GET / HTTP/1.1\r\nBad Header: {}", "x".repeat(100));
        let mut head = RequestHead::default();
        let mut buf = BytesMut::from(&text.as_bytes()[..10]);
        assert_eq!(head.parse(&mut buf, 64), Ok(false));
        buf.extend_from_slice(&text.as_bytes()[10..]);
        let whole = RequestHead::default().parse(&mut BytesMut::from(text.as_str()), 64);
        assert_eq!(head.parse(&mut buf, 64), whole);
        assert_eq!(whole, Err(HeadError::Malformed("invalid header name")));
    }

    #[test]
    fn framing_rules() {
        assert!(req("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
        assert_eq!(
            req("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n").unwrap_err(),
            HeadError::Malformed("conflicting content-length")
        );
        assert_eq!(
            req("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\n").unwrap().content_length(),
            Some(3)
        );
        assert!(req("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n").is_err());
        assert_eq!(
            req("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n").unwrap_err(),
            HeadError::UnsupportedEncoding
        );
        let h = req("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
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
        assert!(!req("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").unwrap().keep_alive());
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
