//! HTTP/1.1 on the wire, end to end. Velocity parses and frames HTTP/1.1 itself, so these tests
//! talk to it in exact bytes: raw TCP clients write requests as a browser, a curl or an attacker
//! would, and raw backends answer in the wire forms under test (chunked, HEAD, 204, hop-by-hop
//! headers, closing idle connections). An HTTP library on either side would smooth over exactly
//! the framing these tests are about.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A message head as it was on the wire: the first line, then the header lines (names
/// lowercased, values trimmed) in order.
#[derive(Debug, Clone)]
struct Head {
    line: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn parse(bytes: &[u8]) -> Head {
        let text = String::from_utf8_lossy(bytes);
        let mut lines = text.split("\r\n");
        let line = lines.next().unwrap_or("").to_string();
        let headers = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (name, value) = l.split_once(':').unwrap_or((l, ""));
                (name.trim().to_ascii_lowercase(), value.trim().to_string())
            })
            .collect();
        Head { line, headers }
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// The status of a response head.
    fn status(&self) -> u16 {
        self.line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line {:?}", self.line))
    }

    fn is_chunked(&self) -> bool {
        self.get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }

    fn content_length(&self) -> Option<usize> {
        self.get("content-length").map(|v| v.parse().unwrap_or_else(|_| panic!("content-length {v:?}")))
    }
}

/// Decode a complete chunked body at the front of `buf`: its payload and how many bytes of
/// `buf` it took, or `None` if it has not all arrived. Malformed framing fails the test.
fn decode_chunked(buf: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut pos = 0;
    let mut payload = Vec::new();
    loop {
        let eol = pos + find(&buf[pos..], b"\r\n")?;
        let line = String::from_utf8_lossy(&buf[pos..eol]).into_owned();
        let digits = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(digits, 16).unwrap_or_else(|_| panic!("bad chunk-size line {line:?}"));
        pos = eol + 2;
        if size == 0 {
            // Trailer fields, if any, then the empty line.
            loop {
                let eol = pos + find(&buf[pos..], b"\r\n")?;
                let empty = eol == pos;
                pos = eol + 2;
                if empty {
                    return Some((payload, pos));
                }
            }
        }
        if buf.len() < pos + size + 2 {
            return None;
        }
        payload.extend_from_slice(&buf[pos..pos + size]);
        assert_eq!(&buf[pos + size..pos + size + 2], b"\r\n", "chunk data not followed by CRLF: {line:?}");
        pos += size + 2;
    }
}

/// A response as a raw client read it.
#[derive(Debug)]
struct Response {
    status: u16,
    head: Head,
    body: Vec<u8>,
}

impl Response {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A raw client connection to Velocity: exact bytes out, responses parsed by hand. Every read
/// is bounded by `DEADLINE`.
struct Wire {
    stream: TcpStream,
    /// Read and not yet taken: the rest of a response, or the next (pipelined) one.
    buf: Vec<u8>,
}

impl Wire {
    async fn connect(addr: SocketAddr) -> Wire {
        let stream = TcpStream::connect(addr).await.expect("connect to velocity");
        // Each write goes out as its own segment, so split writes reach Velocity split.
        stream.set_nodelay(true).unwrap();
        Wire { stream, buf: Vec::new() }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write to velocity");
    }

    /// Read what comes next into `buf`; 0 when Velocity closed the connection.
    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 16 * 1024];
        let n = tokio::time::timeout(DEADLINE, self.stream.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("nothing from velocity in time; have {:?}", String::from_utf8_lossy(&self.buf)))
            .expect("read from velocity");
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// The next response head, interim (1xx) ones included.
    async fn head(&mut self) -> Head {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                let head = Head::parse(&self.buf[..i]);
                self.buf.drain(..i + 4);
                return head;
            }
            let n = self.fill().await;
            assert!(n > 0, "closed before a response head; have {:?}", String::from_utf8_lossy(&self.buf));
        }
    }

    /// The next response to a `method` request, its body read as its framing says.
    async fn response(&mut self, method: &str) -> Response {
        let head = self.head().await;
        let status = head.status();
        let body = if method == "HEAD" || status < 200 || status == 204 || status == 304 {
            Vec::new()
        } else if head.is_chunked() {
            loop {
                if let Some((payload, used)) = decode_chunked(&self.buf) {
                    self.buf.drain(..used);
                    break payload;
                }
                let n = self.fill().await;
                assert!(n > 0, "closed inside a chunked body; have {:?}", String::from_utf8_lossy(&self.buf));
            }
        } else if let Some(len) = head.content_length() {
            while self.buf.len() < len {
                let n = self.fill().await;
                assert!(n > 0, "closed inside a {len}-byte body; have {:?}", String::from_utf8_lossy(&self.buf));
            }
            self.buf.drain(..len).collect()
        } else {
            self.until_close().await
        };
        Response { status, head, body }
    }

    /// Everything up to Velocity closing the connection, which must happen within `DEADLINE`.
    async fn until_close(&mut self) -> Vec<u8> {
        while self.fill().await > 0 {}
        std::mem::take(&mut self.buf)
    }
}

/// Send `request` on a fresh connection and read everything up to the close.
async fn one_shot(addr: SocketAddr, request: &[u8]) -> String {
    let mut wire = Wire::connect(addr).await;
    wire.send(request).await;
    String::from_utf8_lossy(&wire.until_close().await).into_owned()
}

/// What a raw backend received of one request: its head and its body, decoded if chunked.
#[derive(Debug, Clone)]
struct Received {
    head: Head,
    body: Vec<u8>,
}

type Answer = Arc<dyn Fn(&Received) -> Vec<u8> + Send + Sync>;

/// A backend that writes exact bytes: `answer(request)` for every request it reads.
struct RawBackend {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    /// Request heads read (counted before the body is read).
    heads: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    /// Connections this backend has closed, or seen closed.
    closed: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl RawBackend {
    /// Serve each connection until the peer closes it or, with `close_after`, close it that
    /// long after its first response: a keep-alive connection the backend gives up on.
    async fn start(
        close_after: Option<Duration>,
        answer: impl Fn(&Received) -> Vec<u8> + Send + Sync + 'static,
    ) -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answer: Answer = Arc::new(answer);
        let received = Arc::new(Mutex::new(Vec::new()));
        let heads = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (r, h, a, c) = (received.clone(), heads.clone(), accepted.clone(), closed.clone());
        let task = tokio::spawn(async move {
            // Connections live in this set, so aborting the task closes them all.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    conn = listener.accept() => {
                        let Ok((stream, _)) = conn else { continue };
                        a.fetch_add(1, Ordering::SeqCst);
                        conns.spawn(serve_raw(stream, answer.clone(), r.clone(), h.clone(), c.clone(), close_after));
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        RawBackend { addr, received, heads, accepted, closed, task }
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_raw(
    mut stream: TcpStream,
    answer: Answer,
    received: Arc<Mutex<Vec<Received>>>,
    heads: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    close_after: Option<Duration>,
) {
    let mut buf = Vec::new();
    while let Some(req) = read_request(&mut stream, &mut buf, &heads).await {
        let reply = answer(&req);
        // Recorded before the answer goes out, so a client that has the answer sees the record.
        received.lock().unwrap().push(req);
        if stream.write_all(&reply).await.is_err() {
            break;
        }
        if let Some(after) = close_after {
            tokio::time::sleep(after).await;
            break;
        }
    }
    drop(stream);
    closed.fetch_add(1, Ordering::SeqCst);
}

/// Read one request (head and body) from a backend's connection; `None` when it closes.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>, heads: &AtomicUsize) -> Option<Received> {
    let mut chunk = [0u8; 16 * 1024];
    let head = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            let head = Head::parse(&buf[..i]);
            buf.drain(..i + 4);
            break head;
        }
        let n = stream.read(&mut chunk).await.ok().filter(|&n| n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
    };
    heads.fetch_add(1, Ordering::SeqCst);
    let body = if head.is_chunked() {
        loop {
            if let Some((payload, used)) = decode_chunked(buf) {
                buf.drain(..used);
                break payload;
            }
            let n = stream.read(&mut chunk).await.ok().filter(|&n| n > 0)?;
            buf.extend_from_slice(&chunk[..n]);
        }
    } else {
        let len = head.content_length().unwrap_or(0);
        while buf.len() < len {
            let n = stream.read(&mut chunk).await.ok().filter(|&n| n > 0)?;
            buf.extend_from_slice(&chunk[..n]);
        }
        buf.drain(..len).collect()
    };
    Some(Received { head, body })
}

/// A 200 with a Content-Length body.
fn ok(body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    out.extend_from_slice(body);
    out
}

/// One catch-all service over `backends`.
fn service_yaml(backends: &[SocketAddr]) -> String {
    let list: String = backends.iter().map(|a| format!("      - address: \"{a}\"\n")).collect();
    format!("listen: 127.0.0.1:0\naccess_log: off\nservices:\n  - name: web\n    backends:\n{list}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_request_body_reaches_the_backend_intact() {
    let echo = RawBackend::start(None, |r| ok(&r.body)).await;
    let lb = Velocity::start(&service_yaml(&[echo.addr])).await;
    let mut wire = Wire::connect(lb.addr()).await;
    wire.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWiki\r\n").await;
    // The head and the first chunk are through before the rest is even written: the body is
    // streamed, and the rest arrives split mid-chunk, with an extension, in several writes.
    eventually("the request head at the backend", DEADLINE, || echo.heads.load(Ordering::SeqCst) == 1).await;
    for piece in [&b"5;note=1\r\npedia\r\n"[..], b"E\r\n in\r\n\r\nch", b"unks.\r\n0\r\n", b"\r\n"] {
        wire.send(piece).await;
    }
    let r = wire.response("POST").await;
    assert_eq!((r.status, r.text().as_str()), (200, "Wikipedia in\r\n\r\nchunks."), "{r:?}");
    let seen = echo.received();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].head.is_chunked() && !seen[0].head.has("content-length"), "{:?}", seen[0].head);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_response_goes_chunked_to_http11_and_decoded_to_http10() {
    let raw = RawBackend::start(None, |_| {
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-B: 1\r\n\r\n5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n"
            .to_vec()
    })
    .await;
    let lb = Velocity::start(&service_yaml(&[raw.addr])).await;

    let mut wire = Wire::connect(lb.addr()).await;
    wire.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let r = wire.response("GET").await;
    assert_eq!(r.status, 200);
    assert!(r.head.is_chunked() && !r.head.has("content-length"), "{:?}", r.head);
    assert_eq!((r.text().as_str(), r.head.get("x-b")), ("hello, world", Some("1")));

    // HTTP/1.0 has no chunked coding: the payload alone, delimited by the close.
    let out = one_shot(lb.addr(), b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").await;
    let end = find(out.as_bytes(), b"\r\n\r\n").unwrap_or_else(|| panic!("no head in {out:?}"));
    let head = Head::parse(&out.as_bytes()[..end]);
    assert_eq!(head.status(), 200, "{out:?}");
    assert!(!head.has("transfer-encoding"), "{out:?}");
    assert_eq!(&out[end + 4..], "hello, world", "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let a = TestBackend::start("a").await;
    let lb = Velocity::start(&service_yaml(&[a.addr])).await;
    let mut wire = Wire::connect(lb.addr()).await;
    wire.send(b"GET /status/201 HTTP/1.1\r\nHost: x\r\n\r\nGET /status/202 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let first = wire.response("GET").await;
    let second = wire.response("GET").await;
    assert_eq!((first.status, first.text().as_str()), (201, "a\n"));
    assert_eq!((second.status, second.text().as_str()), (202, "a\n"));
    let paths: Vec<String> = a.seen.lock().unwrap().iter().map(|s| s.path.clone()).collect();
    assert_eq!(paths, ["/status/201", "/status/202"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_gets_continue_before_the_body() {
    let echo = RawBackend::start(None, |r| ok(&r.body)).await;
    let lb = Velocity::start(&service_yaml(&[echo.addr])).await;
    let mut wire = Wire::connect(lb.addr()).await;
    wire.send(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n").await;
    // Nothing of the body is sent until Velocity says so.
    let interim = wire.head().await;
    assert_eq!(interim.line, "HTTP/1.1 100 Continue");
    wire.send(b"hello").await;
    let r = wire.response("POST").await;
    assert_eq!((r.status, r.text().as_str()), (200, "hello"), "{r:?}");
    assert_eq!(echo.received()[0].body, b"hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_response_has_headers_but_no_body_and_the_connection_goes_on() {
    let raw = RawBackend::start(None, |r| {
        if r.head.line.starts_with("HEAD ") {
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Head: yes\r\n\r\n".to_vec()
        } else {
            ok(b"hello")
        }
    })
    .await;
    let lb = Velocity::start(&service_yaml(&[raw.addr])).await;
    let mut wire = Wire::connect(lb.addr()).await;
    wire.send(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let r = wire.response("HEAD").await;
    assert_eq!(r.status, 200);
    assert_eq!((r.head.get("content-length"), r.head.get("x-head")), (Some("5"), Some("yes")), "{:?}", r.head);
    // Five body bytes must not be waited for, nor sent: the next answer starts right here.
    wire.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let r = wire.response("GET").await;
    assert_eq!((r.status, r.text().as_str()), (200, "hello"), "{r:?}");
    assert!(wire.buf.is_empty(), "stray bytes: {:?}", wire.buf);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_content_response_then_the_connection_goes_on() {
    let raw = RawBackend::start(None, |r| {
        if r.head.line.starts_with("GET /204 ") {
            b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n".to_vec()
        } else {
            ok(b"next")
        }
    })
    .await;
    let lb = Velocity::start(&service_yaml(&[raw.addr])).await;
    let mut wire = Wire::connect(lb.addr()).await;
    wire.send(b"GET /204 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let r = wire.response("GET").await;
    assert_eq!((r.status, r.head.get("x-a")), (204, Some("1")), "{:?}", r.head);
    assert!(!r.head.has("transfer-encoding"), "{:?}", r.head);
    wire.send(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let r = wire.response("GET").await;
    assert_eq!((r.status, r.text().as_str()), (200, "next"), "{r:?}");
    // The backend connection carried both: a 204 ends its response at the head.
    assert_eq!(raw.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_or_unknown_body_framing_is_refused_before_any_backend() {
    let a = TestBackend::start("a").await;
    let lb = Velocity::start(&service_yaml(&[a.addr])).await;
    for (request, want) in [
        (&b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..], "400"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", "400"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nxyz", "501"),
    ] {
        let out = one_shot(lb.addr(), request).await;
        assert!(out.starts_with(&format!("HTTP/1.1 {want} ")), "{:?} got {out:?}", String::from_utf8_lossy(request));
    }
    assert_eq!(a.hits(), 0);
    assert_eq!(get(lb.addr(), "x", "/").await.status, 200);
    assert_eq!(a.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_closes_unless_asked_to_keep_alive() {
    let a = TestBackend::start("a").await;
    let lb = Velocity::start(&service_yaml(&[a.addr])).await;

    let out = one_shot(lb.addr(), b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 200 ") && out.ends_with("\r\n\r\na\n"), "{out:?}");

    let mut wire = Wire::connect(lb.addr()).await;
    for _ in 0..2 {
        wire.send(b"GET / HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n").await;
        let r = wire.response("GET").await;
        assert_eq!((r.status, r.text().as_str()), (200, "a\n"), "{r:?}");
        assert_eq!(r.head.get("connection").map(str::to_ascii_lowercase).as_deref(), Some("keep-alive"), "{r:?}");
    }
    assert_eq!(a.hits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_stop_at_velocity_both_ways() {
    let raw = RawBackend::start(None, |_| {
        b"HTTP/1.1 200 OK\r\nConnection: x-other\r\nX-Other: 1\r\nX-Kept: 1\r\nContent-Length: 2\r\n\r\nok".to_vec()
    })
    .await;
    let lb = Velocity::start(&service_yaml(&[raw.addr])).await;
    let mut wire = Wire::connect(lb.addr()).await;
    wire.send(
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: x-secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nX-Visible: 1\r\n\r\n",
    )
    .await;
    let r = wire.response("GET").await;
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    assert!(!r.head.has("x-other") && r.head.get("x-kept") == Some("1"), "{:?}", r.head);

    let seen = &raw.received()[0].head;
    assert!(!seen.has("x-secret") && !seen.has("keep-alive"), "{seen:?}");
    assert!(!seen.get("connection").is_some_and(|v| v.contains("x-secret")), "{seen:?}");
    assert_eq!(seen.get("x-visible"), Some("1"), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connection_closed_by_the_backend_is_not_reused() {
    let raw = RawBackend::start(Some(Duration::from_millis(50)), |_| ok(b"fresh")).await;
    let lb = Velocity::start(&service_yaml(&[raw.addr])).await;
    let mut wire = Wire::connect(lb.addr()).await;
    for round in 1..=3 {
        wire.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let r = wire.response("GET").await;
        assert_eq!((r.status, r.text().as_str()), (200, "fresh"), "round {round}: {r:?}");
        eventually("the backend to close its idle connection", DEADLINE, || raw.closed.load(Ordering::SeqCst) == round)
            .await;
    }
    // Every request after the first needed a new connection.
    assert_eq!(raw.accepted.load(Ordering::SeqCst), 3);

    // With two such backends, alternating, no client sees an error either.
    let (b1, b2) = (
        RawBackend::start(Some(Duration::from_millis(50)), |_| ok(b"one")).await,
        RawBackend::start(Some(Duration::from_millis(50)), |_| ok(b"two")).await,
    );
    let lb = Velocity::start(&service_yaml(&[b1.addr, b2.addr])).await;
    let mut wire = Wire::connect(lb.addr()).await;
    let closed = || b1.closed.load(Ordering::SeqCst) + b2.closed.load(Ordering::SeqCst);
    for round in 1..=6 {
        wire.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let r = wire.response("GET").await;
        assert_eq!(r.status, 200, "round {round}: {r:?}");
        eventually("the backends to close their idle connections", DEADLINE, || closed() == round).await;
    }
    assert_eq!(b1.received().len() + b2.received().len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_target_routes_by_its_authority_and_goes_out_origin_form() {
    let web = RawBackend::start(None, |_| ok(b"web")).await;
    let other = TestBackend::start("other").await;
    let yaml = format!(
        "listen: 127.0.0.1:0\naccess_log: off\nservices:\n  - name: web\n    hosts: [web.local]\n    backends: [{{address: \"{}\"}}]\n  - name: other\n    hosts: \"*\"\n    backends: [{{address: \"{}\"}}]\n",
        web.addr, other.addr
    );
    let lb = Velocity::start(&yaml).await;
    let mut wire = Wire::connect(lb.addr()).await;
    // The target's authority wins over the Host line (RFC 9112 3.2.2), both for routing and
    // for the Host the backend sees.
    wire.send(b"GET http://web.local/x HTTP/1.1\r\nHost: other.local\r\n\r\n").await;
    let r = wire.response("GET").await;
    assert_eq!((r.status, r.text().as_str()), (200, "web"), "{r:?}");
    assert_eq!(other.hits(), 0);
    let seen = &web.received()[0].head;
    assert_eq!(seen.line, "GET /x HTTP/1.1");
    let hosts: Vec<_> = seen.headers.iter().filter(|(n, _)| n == "host").map(|(_, v)| v.as_str()).collect();
    assert_eq!(hosts, ["web.local"], "{seen:?}");
    assert_eq!(seen.get("x-forwarded-host"), Some("web.local"), "{seen:?}");
    // Only http and https targets are served.
    for target in ["ftp://web.local/x", "web.local:80", "http:///x"] {
        let request = format!("GET {target} HTTP/1.1\r\nHost: web.local\r\n\r\n");
        let out = one_shot(lb.addr(), request.as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 400 "), "{target}: {out:?}");
    }
    assert_eq!(web.received().len() + other.hits(), 1);
}

/// Two services: `web` for `web.local`, `other` for every other host.
async fn web_and_default(web: SocketAddr, other: SocketAddr) -> Velocity {
    let yaml = format!(
        "listen: 127.0.0.1:0\naccess_log: off\nservices:\n  - name: web\n    hosts: [web.local]\n    backends: [{{address: \"{web}\"}}]\n  - name: other\n    hosts: \"*\"\n    backends: [{{address: \"{other}\"}}]\n"
    );
    Velocity::start(&yaml).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_must_be_one_valid_line_in_http11_and_is_optional_in_http10() {
    let web = RawBackend::start(None, |_| ok(b"web")).await;
    let other = RawBackend::start(None, |_| ok(b"other")).await;
    let lb = web_and_default(web.addr, other.addr).await;
    for request in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: web.local\r\nHost: web.local\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: other\r\nX-A: 1\r\nHost: web.local\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: web.local evil\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: web.local/x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: user@web.local\r\n\r\n",
    ] {
        let out = one_shot(lb.addr(), request).await;
        assert!(
            out.starts_with("HTTP/1.1 400 ") && out.contains("host"),
            "{:?}: {out:?}",
            String::from_utf8_lossy(request)
        );
    }
    assert_eq!(web.received().len() + other.received().len(), 0, "a request with a bad Host was forwarded");
    // HTTP/1.0 without Host goes to the default service, with the backend's address as Host.
    let out = one_shot(lb.addr(), b"GET /ten HTTP/1.0\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 200 ") && out.ends_with("other"), "{out:?}");
    let seen = &other.received()[0].head;
    assert_eq!(seen.get("host"), Some(other.addr.to_string().as_str()), "{seen:?}");
    // A valid Host with a port and an IP literal are fine.
    let out = one_shot(lb.addr(), b"GET / HTTP/1.1\r\nHost: WEB.local:8080\r\nConnection: close\r\n\r\n").await;
    assert!(out.ends_with("web"), "{out:?}");
    let out = one_shot(lb.addr(), b"GET / HTTP/1.1\r\nHost: [::1]:80\r\nConnection: close\r\n\r\n").await;
    assert!(out.ends_with("other"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_gets_405_and_options_star_is_answered_by_velocity() {
    let raw = RawBackend::start(None, |_| ok(b"backend")).await;
    let lb = Velocity::start(&service_yaml(&[raw.addr])).await;
    let out = one_shot(lb.addr(), b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{out:?}");
    // As NGINX does: `OPTIONS *` is a 400, never forwarded.
    let out = one_shot(lb.addr(), b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n") && out.contains("OPTIONS *"), "{out:?}");
    assert_eq!(raw.received().len(), 0);
    // OPTIONS on a path is an ordinary request.
    let out = one_shot(lb.addr(), b"OPTIONS /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 200 ") && out.ends_with("backend"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_with_length_and_chunked_is_framed_by_the_chunks_and_sent_without_the_length() {
    let raw = RawBackend::start(None, |_| {
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec()
    })
    .await;
    let lb = Velocity::start(&service_yaml(&[raw.addr])).await;
    let mut wire = Wire::connect(lb.addr()).await;
    for _ in 0..2 {
        wire.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let r = wire.response("GET").await;
        assert_eq!((r.status, r.text().as_str()), (200, "hello"), "{r:?}");
        assert!(r.head.is_chunked() && !r.head.has("content-length"), "{:?}", r.head);
    }
    // Such a backend connection is not trusted with another request.
    assert_eq!(raw.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn obs_fold_in_a_response_header_reaches_the_client_as_spaces() {
    let raw = RawBackend::start(None, |_| {
        b"HTTP/1.1 200 OK\r\nX-Folded: one,\r\n two,\r\n\tthree\r\nContent-Length: 2\r\n\r\nok".to_vec()
    })
    .await;
    let lb = Velocity::start(&service_yaml(&[raw.addr])).await;
    let mut wire = Wire::connect(lb.addr()).await;
    wire.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let head = wire.head().await;
    assert_eq!(head.status(), 200);
    // Every line of the head is a header of its own: no line starts with white space.
    assert!(head.headers.iter().all(|(n, _)| !n.is_empty() && n.trim() == n), "{head:?}");
    let folded = head.get("x-folded").unwrap_or_default().split_whitespace().collect::<Vec<_>>().join(" ");
    assert_eq!(folded, "one, two, three", "{head:?}");
    assert_eq!(head.content_length(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_404_says_whether_the_host_or_only_the_path_matched_nothing() {
    let raw = RawBackend::start(None, |_| ok(b"api")).await;
    let yaml = format!(
        "listen: 127.0.0.1:0\naccess_log: off\nservices:\n  - name: api\n    hosts: [api.local]\n    path_prefix: /api\n    backends: [{{address: \"{}\"}}]\n",
        raw.addr
    );
    let lb = Velocity::start(&yaml).await;
    let mut wire = Wire::connect(lb.addr()).await;
    wire.send(b"GET /other HTTP/1.1\r\nHost: api.local\r\n\r\n").await;
    let r = wire.response("GET").await;
    assert_eq!(r.status, 404);
    assert!(r.text().contains("host \"api.local\" has services, but no path_prefix"), "{:?}", r.text());
    wire.send(b"GET /api HTTP/1.1\r\nHost: elsewhere\r\n\r\n").await;
    let r = wire.response("GET").await;
    assert_eq!((r.status, r.text().as_str()), (404, "404 not found: no service for host \"elsewhere\"\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_written_one_byte_at_a_time_is_served() {
    let raw = RawBackend::start(None, |_| ok(b"slowly")).await;
    let lb = Velocity::start(&service_yaml(&[raw.addr])).await;
    let mut wire = Wire::connect(lb.addr()).await;
    let filler: String = (0..40).map(|i| format!("X-Filler-{i}: value\r\n")).collect();
    let request = format!("GET /t HTTP/1.1\r\nHost: x\r\n{filler}\r\n");
    for b in request.bytes() {
        wire.send(&[b]).await;
    }
    let r = wire.response("GET").await;
    assert_eq!((r.status, r.text().as_str()), (200, "slowly"), "{r:?}");
    assert_eq!(raw.received()[0].head.get("x-filler-39"), Some("value"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interim_answers_are_not_passed_on_and_an_unasked_switch_is_a_bad_gateway() {
    let raw = RawBackend::start(None, |r| {
        if r.head.line.starts_with("GET /switch ") {
            return b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n".to_vec();
        }
        let mut out = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n".to_vec();
        out.extend_from_slice(&ok(b"final"));
        out
    })
    .await;
    let lb = Velocity::start(&service_yaml(&[raw.addr])).await;
    let mut wire = Wire::connect(lb.addr()).await;
    wire.send(b"GET /early HTTP/1.1\r\nHost: x\r\n\r\n").await;
    // `head()` returns interim heads too: the first one the client sees is the final answer.
    let r = wire.response("GET").await;
    assert_eq!((r.status, r.text().as_str()), (200, "final"), "{r:?}");
    assert!(!r.head.has("link"), "{:?}", r.head);
    let out = one_shot(lb.addr(), b"GET /switch HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 502"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_pipelined_while_the_first_is_awaited_is_kept_and_answered() {
    let a = TestBackend::start_slow("a", Duration::from_millis(300)).await;
    let lb = Velocity::start(&service_yaml(&[a.addr])).await;
    let mut wire = Wire::connect(lb.addr()).await;
    wire.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n").await;
    // The second request arrives while Velocity waits on the backend for the first, and is
    // read (not taken for the client leaving) while it watches the client.
    eventually("the first request at the backend", DEADLINE, || a.hits() == 1).await;
    wire.send(b"GET /status/201 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(wire.response("GET").await.status, 200);
    assert_eq!(wire.response("GET").await.status, 201);
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_hold_no_read_buffers() {
    const CONNECTIONS: usize = 1000;
    let raw = RawBackend::start(None, |_| ok(b"hi")).await;
    let lb = Velocity::start(&service_yaml(&[raw.addr])).await;
    let mut warm = Wire::connect(lb.addr()).await;
    warm.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(warm.response("GET").await.status, 200);
    let before = rss_kib(lb.pid());
    let mut idle = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut wire = Wire::connect(lb.addr()).await;
        wire.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(wire.response("GET").await.status, 200);
        idle.push(wire);
    }
    // Buffers are given back 50 ms after a response when no next request came. An 8 KiB read buffer
    // kept per connection made this 16 KiB (a release build is under 1 KiB, bench/idle.sh;
    // this is a debug build, with larger futures: 4.2 KiB here, and once 6.3 KiB on a loaded
    // machine, the allocator's pages as much as the tasks; 8 KiB still tells the 16 KiB apart).
    let per_connection = || rss_kib(lb.pid()).saturating_sub(before) as f64 / CONNECTIONS as f64;
    let start = std::time::Instant::now();
    while per_connection() >= 8.0 {
        assert!(start.elapsed() < DEADLINE, "{:.1} KiB of RSS per idle keep-alive connection", per_connection());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // They still work.
    for wire in idle.iter_mut().take(10) {
        wire.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(wire.response("GET").await.status, 200);
    }
}
