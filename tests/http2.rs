//! HTTP/2 to clients (issue 17) end to end: curl over TLS (ALPN `h2`) and with prior
//! knowledge, the `h2` crate's client for many streams, flow control and trailers, and raw
//! frames written here for the floods. Backends are HTTP/1.1.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::*;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MIB: usize = 1 << 20;

// ---- Backends ----

static CHUNK: [u8; 65536] = [b'x'; 65536];

/// `n` bytes of `x`, streamed in 64 KiB pieces (no 100 MiB buffer).
struct Repeat(usize);

impl Body for Repeat {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.0 == 0 {
            return Poll::Ready(None);
        }
        let n = self.0.min(CHUNK.len());
        self.0 -= n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&CHUNK[..n])))))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.0 as u64)
    }
}

/// An HTTP/1.1 backend: `/bytes/N` streams N bytes; any other path answers with the number
/// of request body bytes it read (`NAME N`), after `/slow` waits 1 s; `x-backend: NAME`.
async fn body_backend(name: &'static str) -> SocketAddr {
    body_backend_counted(name, Arc::new(AtomicUsize::new(0))).await
}

/// [`body_backend`], counting the requests that have arrived in `arrived`.
async fn body_backend_counted(name: &'static str, arrived: Arc<AtomicUsize>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let arrived = arrived.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    arrived.fetch_add(1, Ordering::SeqCst);
                    body_answer(name, req)
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    addr
}

type AnswerBody = http_body_util::Either<Repeat, http_body_util::Full<Bytes>>;

async fn body_answer(name: &'static str, req: Request<Incoming>) -> Result<Response<AnswerBody>, Infallible> {
    let path = req.uri().path().to_string();
    let mut body = req.into_body();
    let mut n = 0usize;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.map(|f| f.into_data()) {
            n += data.map_or(0, |d| d.len());
        }
    }
    if path.starts_with("/slow") {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let body: AnswerBody = match path.strip_prefix("/bytes/").and_then(|n| n.parse().ok()) {
        Some(len) => http_body_util::Either::Left(Repeat(len)),
        None => http_body_util::Either::Right(http_body_util::Full::new(Bytes::from(format!("{name} {n}")))),
    };
    let mut resp = Response::new(body);
    resp.headers_mut().insert("x-backend", name.parse().unwrap());
    Ok::<_, Infallible>(resp)
}

/// A backend that answers every request with a chunked body and a trailer section.
async fn trailers_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut piece = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut piece).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&piece[..n]),
                    }
                }
                let answer = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: grpc-status\r\nconnection: close\r\n\r\n\
                              5\r\nhello\r\n6\r\n world\r\n0\r\ngrpc-status: 7\r\ngrpc-message: denied\r\n\r\n";
                let _ = stream.write_all(answer.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

fn config(backends: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("{{address: \"{b}\"}}")).collect();
    format!(
        "listen: 127.0.0.1:0
access_log: stdout
{extra}services:
  - name: web
    backends: [{}]
",
        list.join(", ")
    )
}

// ---- Clients ----

/// An HTTP/2 client connection (prior knowledge) with a large connection window, so that
/// only stream windows hold data back.
async fn h2_connect(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(64 * 1024)
        .initial_connection_window_size(64 * MIB as u32)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

struct H2Resp {
    status: u16,
    headers: hyper::HeaderMap,
    body: Bytes,
    trailers: Option<hyper::HeaderMap>,
}

async fn h2_get(send: &h2::client::SendRequest<Bytes>, path: &str) -> Result<H2Resp, h2::Error> {
    let mut send = send.clone().ready().await?;
    let req = Request::get(format!("http://web.test{path}")).body(()).unwrap();
    let (resp, _) = send.send_request(req, true)?;
    let resp = resp.await?;
    let (parts, mut body) = resp.into_parts();
    let mut data = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await?;
    Ok(H2Resp { status: parts.status.as_u16(), headers: parts.headers, body: data.freeze(), trailers })
}

fn curl(args: &[&str]) -> (String, String) {
    let out = Command::new("curl").args(["-sS", "--max-time", "60"]).args(args).output().expect("curl runs");
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

// ---- Tests ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_gets_http2_over_tls_and_with_prior_knowledge_and_http1_still_works() {
    let dir = temp_path("h2tls");
    std::fs::create_dir_all(&dir).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["web.test".to_string()]).unwrap().self_signed(&key).unwrap();
    std::fs::write(dir.join("c.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("c.key"), key.serialize_pem()).unwrap();
    let backend = body_backend("a").await;
    let d = dir.display();
    let lb = Velocity::start(&format!(
        "listen: 127.0.0.1:0
access_log: stdout
listeners:
  - name: public
    listen: 127.0.0.1:0
    tls: {{certificates: [{{cert: {d}/c.pem, key: {d}/c.key}}]}}
services:
  - name: web
    backends: [{{address: \"{backend}\"}}]
"
    ))
    .await;
    let public = lb.listener_addr("public").await;
    let resolve = format!("web.test:{}:127.0.0.1", public.port());
    let url = format!("https://web.test:{}/hello", public.port());
    let cacert = format!("{d}/c.pem");
    let (out, err) =
        curl(&["--http2", "--cacert", &cacert, "--resolve", &resolve, "-w", "\n%{http_version} %{http_code}", &url]);
    assert_eq!(out, "a 0\n2 200", "{err}");
    // A client that offers only HTTP/1.1 gets it.
    let (out, err) =
        curl(&["--http1.1", "--cacert", &cacert, "--resolve", &resolve, "-w", "\n%{http_version} %{http_code}", &url]);
    assert_eq!(out, "a 0\n1.1 200", "{err}");

    // The plain listener: h2c by prior knowledge, HTTP/1.1 on the same port.
    let plain = format!("http://{}/x", lb.addr());
    let (out, err) = curl(&["--http2-prior-knowledge", "-w", "\n%{http_version}", "-d", "12345", &plain]);
    assert_eq!(out, "a 5\n2", "{err}");
    let (out, err) = curl(&["--http1.1", "-w", "\n%{http_version}", &plain]);
    assert_eq!(out, "a 0\n1.1", "{err}");
    // The access log has the HTTP/2 requests like any other.
    eventually("access lines", DEADLINE, || lb.log_lines().iter().filter(|l| l.contains(" /x 200 ")).count() == 2)
        .await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_streams_on_one_connection_spread_over_the_backends() {
    let backends = [body_backend("a").await, body_backend("b").await, body_backend("c").await];
    // Below the default max_concurrent_streams (128): a client that opens more before it has
    // read the server's SETTINGS gets REFUSED_STREAM for the rest, as it should.
    let lb = Velocity::start(&config(&backends, "")).await;
    let send = h2_connect(lb.addr()).await;
    let send = send.ready().await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..99 {
        let send = send.clone();
        tasks.push(tokio::spawn(async move { h2_get(&send, "/").await.unwrap() }));
    }
    let mut seen = std::collections::HashMap::<String, usize>::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        *seen.entry(r.headers["x-backend"].to_str().unwrap().to_string()).or_default() += 1;
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.values().all(|&n| n == 33), "round robin: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_upload_and_download_over_one_stream() {
    let backend = body_backend("a").await;
    let lb = Velocity::start(&config(&[backend], "")).await;
    let url = format!("http://{}", lb.addr());
    let started = Instant::now();
    let (out, err) = curl(&[
        "--http2-prior-knowledge",
        "-o",
        "/dev/null",
        "-w",
        "%{http_version} %{size_download}",
        &format!("{url}/bytes/{}", 100 * MIB),
    ]);
    assert_eq!(out, format!("2 {}", 100 * MIB), "{err}");
    let down = started.elapsed();

    // Streamed from the client without a length: the backend gets it chunked.
    let send = h2_connect(lb.addr()).await;
    let mut send = send.ready().await.unwrap();
    let req = Request::post("http://web.test/up").body(()).unwrap();
    let started = Instant::now();
    let (resp, mut body) = send.send_request(req, false).unwrap();
    let mut left = 100 * MIB;
    while left > 0 {
        body.reserve_capacity(left.min(CHUNK.len()));
        let n = std::future::poll_fn(|cx| body.poll_capacity(cx)).await.unwrap().unwrap();
        let n = n.min(left);
        body.send_data(Bytes::from_static(&CHUNK[..n]), false).unwrap();
        left -= n;
    }
    body.send_data(Bytes::new(), true).unwrap();
    let resp = resp.await.unwrap();
    let mut text = Vec::new();
    let mut recv = resp.into_body();
    while let Some(d) = recv.data().await {
        text.extend_from_slice(&d.unwrap());
    }
    assert_eq!(String::from_utf8_lossy(&text), format!("a {}", 100 * MIB));
    let up = started.elapsed();
    // "At full speed": far below what a stall (window never reopened, a timeout) would take.
    assert!(down < Duration::from_secs(30) && up < Duration::from_secs(30), "down {down:?}, up {up:?}");
    eprintln!("100 MiB down in {down:?}, up in {up:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_on_one_stream_does_not_stall_another() {
    let backend = body_backend("a").await;
    let lb = Velocity::start(&config(&[backend], "")).await;
    let send = h2_connect(lb.addr()).await;
    let mut slow_send = send.clone().ready().await.unwrap();
    // 50 MiB the client never reads: its stream window (64 KiB) fills and stays full.
    let (slow, _) =
        slow_send.send_request(Request::get("http://web.test/bytes/52428800").body(()).unwrap(), true).unwrap();
    let slow = slow.await.unwrap();
    assert_eq!(slow.status(), 200);
    for _ in 0..20 {
        let started = Instant::now();
        let r = h2_get(&send, "/bytes/200000").await.unwrap();
        assert_eq!(r.body.len(), 200_000);
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    }
    drop(slow);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_trailers_reach_the_client_as_http2_trailers() {
    let backend = trailers_backend().await;
    let lb = Velocity::start(&config(&[backend], "")).await;
    let send = h2_connect(lb.addr()).await;
    let r = h2_get(&send, "/").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], b"hello world");
    let t = r.trailers.expect("trailers");
    assert_eq!(t["grpc-status"], "7");
    assert_eq!(t["grpc-message"], "denied");
    assert!(!r.headers.contains_key("trailer") && !r.headers.contains_key("connection"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_list_over_the_limit_gets_431() {
    let backend = body_backend("a").await;
    let lb = Velocity::start(&config(&[backend], "http2: {max_header_list_size: 8k}\n")).await;
    let big = format!("x-big: {}", "y".repeat(12 * 1024));
    let (out, err) = curl(&[
        "--http2-prior-knowledge",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        &big,
        &format!("http://{}/", lb.addr()),
    ]);
    assert_eq!(out, "431", "{err}");
    let (out, _) = curl(&["--http2-prior-knowledge", &format!("http://{}/", lb.addr())]);
    assert_eq!(out, "a 0");
}

// ---- Floods: raw frames ----

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const ENHANCE_YOUR_CALM: u32 = 0xb;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// `GET http://a/`, HPACK-encoded: :method GET, :path /, :scheme http (static table), then
/// :authority `a` as a literal.
const REQUEST_BLOCK: &[u8] = &[0x82, 0x84, 0x86, 0x41, 0x01, b'a'];

/// Write `flood` after the preface and an empty SETTINGS, then read frames until a GOAWAY:
/// its error code (or `None` if the connection closed without one).
async fn goaway_after(addr: SocketAddr, flood: Vec<u8>) -> Option<u32> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut out = PREFACE.to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    out.extend(flood);
    // Written from a task: the server stops reading once it has had enough.
    let (mut rd, mut wr) = tcp.split();
    let write = async {
        let _ = wr.write_all(&out).await;
    };
    let read = async {
        let mut buf = Vec::new();
        let mut piece = vec![0u8; 65536];
        loop {
            while buf.len() >= 9 {
                let len = (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
                if buf.len() < 9 + len {
                    break;
                }
                if buf[3] == 0x7 {
                    return Some(u32::from_be_bytes(buf[13..17].try_into().unwrap()));
                }
                buf.drain(..9 + len);
            }
            match tokio::time::timeout(Duration::from_secs(10), rd.read(&mut piece)).await {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&piece[..n]),
                _ => return None,
            }
        }
    };
    let (_, code) = tokio::join!(write, read);
    code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_end_in_goaway_enhance_your_calm_while_other_connections_work() {
    let backend = body_backend("a").await;
    let lb =
        Velocity::start(&config(&[backend], "http2: {max_resets_per_second: 50, max_control_frames_per_second: 50}\n"))
            .await;
    let addr = lb.addr();
    let good = h2_connect(addr).await;

    let pings: Vec<u8> = (0..1000u64).flat_map(|i| frame(0x6, 0, 0, &i.to_be_bytes())).collect();
    let settings: Vec<u8> = (0..1000).flat_map(|_| frame(0x4, 0, 0, &[])).collect();
    // Rapid reset: a request and its cancel, over and over.
    let resets: Vec<u8> = (0..1000u32)
        .flat_map(|i| {
            [frame(0x1, 0x5, 2 * i + 1, REQUEST_BLOCK), frame(0x3, 0, 2 * i + 1, &8u32.to_be_bytes())].concat()
        })
        .collect();
    // CONTINUATION flood: a header block that never ends.
    let mut continuation = frame(0x1, 0x1, 1, REQUEST_BLOCK);
    for _ in 0..20_000 {
        continuation.extend(frame(0x9, 0, 1, &[0x40, 0x01, b'x', 0x01, b'y']));
    }
    for (what, flood) in
        [("PING", pings), ("SETTINGS", settings), ("rapid reset", resets), ("CONTINUATION", continuation)]
    {
        assert_eq!(goaway_after(addr, flood).await, Some(ENHANCE_YOUR_CALM), "{what}");
        // The connection that behaves is not touched.
        let r = h2_get(&good, "/").await.unwrap_or_else(|e| panic!("after the {what} flood: {e}"));
        assert_eq!(r.status, 200, "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_sends_goaway_and_the_stream_in_flight_finishes() {
    let arrived = Arc::new(AtomicUsize::new(0));
    let backend = body_backend_counted("a", arrived.clone()).await;
    let lb = Velocity::start(&config(&[backend], "shutdown: {drain_timeout: 10s}\n")).await;
    let send = h2_connect(lb.addr()).await;
    assert_eq!(h2_get(&send, "/").await.unwrap().status, 200);
    let in_flight = {
        let send = send.clone();
        tokio::spawn(async move { h2_get(&send, "/slow").await })
    };
    eventually("the slow request at the backend", DEADLINE, || arrived.load(Ordering::SeqCst) == 2).await;
    let status = Command::new("kill").args(["-TERM", &lb.pid().to_string()]).status().unwrap();
    assert!(status.success());
    let r = in_flight.await.unwrap().expect("the in-flight stream completes");
    assert_eq!((r.status, &r.body[..]), (200, &b"a 0"[..]));
    // After GOAWAY the connection takes no new stream.
    let start = Instant::now();
    loop {
        match h2_get(&send, "/").await {
            Err(_) => break,
            Ok(_) => assert!(start.elapsed() < DEADLINE, "new streams still served after SIGTERM"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
