//! Timeouts, limits, queueing, graceful shutdown and reload, end to end with real sockets.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1 as client_http1;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(extra_top: &str, service_extra: &str, backends: &[(&TestBackend, &str)]) -> String {
    let backends: String = backends.iter().map(|(b, extra)| format!("      - address: {}\n{extra}", b.addr)).collect();
    format!("listen: 127.0.0.1:0\n{extra_top}services:\n  - name: web\n{service_extra}    backends:\n{backends}")
}

/// Write raw bytes, then read until the server closes (or `deadline`).
async fn raw_exchange(addr: SocketAddr, bytes: &[u8], deadline: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(deadline, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// One GET on its own connection; errors are returned, not panicked on.
async fn try_get(sender: &mut client_http1::SendRequest<Empty<Bytes>>, path: &str) -> Result<(u16, String), String> {
    sender.ready().await.map_err(|e| e.to_string())?;
    let req = Request::get(path).header("host", "x").body(Empty::new()).map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

async fn connect(addr: SocketAddr) -> Result<client_http1::SendRequest<Empty<Bytes>>, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (sender, conn) = client_http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn wait_exit(v: &mut Velocity, deadline: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = v.child().try_wait().unwrap() {
            return status;
        }
        assert!(start.elapsed() < deadline, "velocity did not exit: {:#?}", v.log_lines());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn count_lines(v: &Velocity, needle: &str) -> usize {
    v.log_lines().iter().filter(|l| l.contains(needle)).count()
}

/// Replace the config file in one step, so a reader never sees half of it.
fn write_config(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slowloris_clients_get_408_while_normal_clients_are_served() {
    let a = TestBackend::start("a").await;
    let lb = Velocity::start(&config("access_log: off\ntimeouts: {client_header: 1s}\n", "", &[(&a, "")])).await;
    let addr = lb.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let mut slow = Vec::new();
    for _ in 0..200 {
        let stop = stop.clone();
        slow.push(tokio::spawn(async move {
            let s = TcpStream::connect(addr).await.unwrap();
            let (mut rd, mut wr) = s.into_split();
            let start = Instant::now();
            // Trickle header lines, never the blank line that ends them.
            let writer = tokio::spawn(async move {
                if wr.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.is_err() {
                    return;
                }
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if wr.write_all(b"X-Slow: 1\r\n").await.is_err() {
                        return;
                    }
                }
            });
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(8), rd.read_to_end(&mut out)).await;
            writer.abort();
            (start.elapsed(), String::from_utf8_lossy(&out).into_owned())
        }));
    }
    // Meanwhile a normal client is answered quickly, on new connections and on a kept one.
    let mut client = Client::connect(addr).await;
    for _ in 0..20 {
        let start = Instant::now();
        assert_eq!(get(addr, "x", "/").await.status, 200);
        assert_eq!(client.get("x", "/").await.status, 200);
        assert!(start.elapsed() < Duration::from_millis(500), "slow answer: {:?}", start.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for t in slow {
        let (took, out) = t.await.unwrap();
        assert!(out.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{out:?}");
        assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(5), "closed after {took:?}");
    }
    stop.store(true, Ordering::Relaxed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keepalive_connections_are_closed_quietly() {
    let a = TestBackend::start("a").await;
    let lb = Velocity::start(&config(
        "access_log: off\ntimeouts: {client_idle: 300ms, client_header: 5s}\n",
        "",
        &[(&a, "")],
    ))
    .await;
    let mut s = TcpStream::connect(lb.addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let start = Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("closed by client_idle")
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    // One answer, then the close: no 408 for a connection that sent nothing more.
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert_eq!(out.matches("HTTP/1.1").count(), 1, "{out}");
    assert!(start.elapsed() >= Duration::from_millis(250), "{:?}", start.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_backend_gets_504_and_is_logged() {
    let a = TestBackend::start_slow("a", Duration::from_secs(3)).await;
    let lb = Velocity::start(&config("", "    timeouts: {backend_response: 300ms}\n", &[(&a, "")])).await;
    let start = Instant::now();
    let r = get(lb.addr(), "x", "/slow").await;
    assert_eq!(r.status, 504, "{r:?}");
    assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    // The backend is still fine for fast requests.
    assert_eq!(get(lb.addr(), "x", "/").await.status, 200);
    eventually("the 504 in the logs", DEADLINE, || {
        lb.log_contains("no response headers in time: 504")
            && lb.log_contains(" 504 ")
            && lb.log_contains("backend_timeout")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_response_counts_from_the_end_of_a_slow_upload() {
    let a = TestBackend::start("a").await;
    let lb = Velocity::start(&config("", "    timeouts: {backend_response: 300ms}\n", &[(&a, "")])).await;
    let mut s = TcpStream::connect(lb.addr()).await.unwrap();
    s.write_all(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n").await.unwrap();
    // The client takes 4 x 150 ms to send its body, twice `backend_response`; the backend
    // answers as soon as it has it.
    for piece in ["5\r\nhello\r\n", "1\r\n \r\n", "5\r\nworld\r\n", "0\r\n\r\n"] {
        tokio::time::sleep(Duration::from_millis(150)).await;
        s.write_all(piece.as_bytes()).await.unwrap();
    }
    let mut out = vec![0u8; 4096];
    let n = tokio::time::timeout(DEADLINE, s.read(&mut out)).await.unwrap().unwrap();
    let out = String::from_utf8_lossy(&out[..n]);
    assert!(out.starts_with("HTTP/1.1 200"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_response_counts_from_the_end_of_a_slow_body_read_whole() {
    // Two backends and an idempotent method: the body is read whole first (for a retry), and
    // the client takes 4 x 150 ms over its 4 bytes. The backends answer at once.
    let (a, b) = (TestBackend::start("a").await, TestBackend::start("b").await);
    let service = "    timeouts: {backend_response: 300ms}\n    passive: {consecutive_failures: 1}\n";
    let lb = Velocity::start(&config("", service, &[(&a, ""), (&b, "")])).await;
    for _ in 0..2 {
        let mut s = TcpStream::connect(lb.addr()).await.unwrap();
        s.write_all(b"PUT /up HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n").await.unwrap();
        for byte in [b"a", b"b", b"c", b"d"] {
            tokio::time::sleep(Duration::from_millis(150)).await;
            s.write_all(byte).await.unwrap();
        }
        let mut out = vec![0u8; 4096];
        let n = tokio::time::timeout(DEADLINE, s.read(&mut out)).await.unwrap().unwrap();
        let out = String::from_utf8_lossy(&out[..n]);
        assert!(out.starts_with("HTTP/1.1 200"), "{out:?}");
    }
    // Neither backend was blamed for the client's slowness.
    assert!(!lb.log_contains("ejected"), "{:#?}", lb.log_lines());
    assert_eq!((a.hits(), b.hits()), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backend_response_does_not_count_the_queue_wait() {
    // One slot; each request takes 400 ms at the backend, within `backend_response` (600 ms).
    // The second and third wait 400 and 800 ms in the queue first: not the backend's time.
    let a = TestBackend::start_slow("a", Duration::from_millis(400)).await;
    let service = "    timeouts: {backend_response: 600ms}\n    queue: {size: 5, timeout: 5s}\n";
    let lb = Velocity::start(&config("", service, &[(&a, "        max_connections: 1\n")])).await;
    let addr = lb.addr();
    let first = tokio::spawn(async move { get(addr, "x", "/slow").await });
    eventually("the first request at the backend", DEADLINE, || a.hits() == 1).await;
    let start = Instant::now();
    let queued: Vec<_> = (0..2).map(|_| tokio::spawn(async move { get(addr, "x", "/slow").await })).collect();
    assert_eq!(first.await.unwrap().status, 200);
    for q in queued {
        let r = q.await.unwrap();
        assert_eq!(r.status, 200, "{r:?} after {:?}: {:#?}", start.elapsed(), lb.log_lines());
    }
    assert!(start.elapsed() > Duration::from_millis(1000), "they did queue: {:?}", start.elapsed());
    assert!(!lb.log_contains("ejected"), "{:#?}", lb.log_lines());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_before_the_answer_abandons_the_backend_request() {
    let a = TestBackend::start_slow("a", Duration::from_secs(5)).await;
    let yaml = config("access_log: stdout\n", "", &[(&a, "")]);
    let lb = Velocity::start(&yaml).await;
    let mut s = TcpStream::connect(lb.addr()).await.unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    eventually("the request at the backend", DEADLINE, || a.hits() == 1).await;
    let start = Instant::now();
    drop(s);
    // Logged as NGINX does (499), at once rather than when the backend would have answered.
    eventually("the abort in the access log", DEADLINE, || {
        lb.log_contains(" 499 ") && lb.log_contains("client_aborted")
    })
    .await;
    assert!(start.elapsed() < Duration::from_secs(3), "{:?}", start.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_after_client_send() {
    let a = TestBackend::start("a").await;
    let lb = Velocity::start(&config("access_log: stdout\ntimeouts: {client_send: 300ms}\n", "", &[(&a, "")])).await;
    let mut s = TcpStream::connect(lb.addr()).await.unwrap();
    // 32 MiB: far more than the socket buffers between Velocity and this client hold.
    s.write_all(b"GET /bytes/33554432 HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    eventually("the cut in the logs", DEADLINE, || {
        lb.log_contains("client took no response data in time") && lb.log_contains("client_timeout")
    })
    .await;
    // The connection is closed: reading what was buffered ends, short of the whole body.
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match tokio::time::timeout(DEADLINE, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got += n,
            _ => break,
        }
    }
    assert!(got < 32 << 20, "{got}");
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_bounds_the_whole_exchange() {
    let a = TestBackend::start_slow("a", Duration::from_secs(3)).await;
    let lb = Velocity::start(&config("timeouts: {request: 300ms}\n", "", &[(&a, "")])).await;
    let r = get(lb.addr(), "x", "/slow").await;
    assert_eq!(r.status, 504, "{r:?}");
    eventually("the note", DEADLINE, || lb.log_contains("request_timeout")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_queue_answers_503_and_queued_request_completes_when_capacity_frees() {
    let a = TestBackend::start_slow("a", Duration::from_millis(800)).await;
    let lb =
        Velocity::start(&config("", "    queue: {size: 1, timeout: 5s}\n", &[(&a, "        max_connections: 1\n")]))
            .await;
    let addr = lb.addr();
    let first = tokio::spawn(async move { get(addr, "x", "/slow").await });
    eventually("the first request at the backend", DEADLINE, || a.hits() == 1).await;
    // One of these waits in the queue (size 1), the other finds it full.
    let second = tokio::spawn(async move { get(addr, "x", "/slow").await });
    let third = tokio::spawn(async move { get(addr, "x", "/slow").await });
    let first = first.await.unwrap();
    let (second, third) = (second.await.unwrap(), third.await.unwrap());
    assert_eq!(first.status, 200);
    let mut statuses = [second.status, third.status];
    statuses.sort();
    assert_eq!(statuses, [200, 503], "{second:?} {third:?}");
    let rejected = if second.status == 503 { &second } else { &third };
    assert_eq!(rejected.headers.get("retry-after").map(|v| v.to_str().unwrap()), Some("5"));
    // Never more than one request at a time reached the backend.
    assert_eq!(a.hits(), 2);
    eventually("the drop in the logs", DEADLINE, || lb.log_contains("queue_full") && lb.log_contains("503")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_timeout_answers_503() {
    let a = TestBackend::start_slow("a", Duration::from_secs(2)).await;
    let lb = Velocity::start(&config(
        "",
        "    queue: {size: 10, timeout: 200ms}\n",
        &[(&a, "        max_connections: 1\n")],
    ))
    .await;
    let addr = lb.addr();
    let first = tokio::spawn(async move { get(addr, "x", "/slow").await });
    eventually("the first request at the backend", DEADLINE, || a.hits() == 1).await;
    let start = Instant::now();
    let r = get(addr, "x", "/").await;
    assert_eq!(r.status, 503);
    assert!(start.elapsed() >= Duration::from_millis(150) && start.elapsed() < Duration::from_secs(1));
    assert_eq!(r.headers.get("retry-after").map(|v| v.to_str().unwrap()), Some("1"));
    eventually("the note", DEADLINE, || lb.log_contains("queue_timeout")).await;
    assert_eq!(first.await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_on_headers_and_bodies() {
    let a = TestBackend::start("a").await;
    let lb = Velocity::start(&config("max_header_bytes: 2k\n", "    max_body_bytes: 100\n", &[(&a, "")])).await;
    let addr = lb.addr();
    let big = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(4000));
    let out = raw_exchange(addr, big.as_bytes(), Duration::from_secs(5)).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");

    let mut client = Client::connect(addr).await;
    assert_eq!(client.request("POST", "x", "/", &"b".repeat(100)).await.status, 200);
    assert_eq!(Client::connect(addr).await.request("POST", "x", "/", &"b".repeat(101)).await.status, 413);

    // Chunked: counted as it streams.
    let chunk = "b".repeat(80);
    let chunked = format!(
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n50\r\n{chunk}\r\n50\r\n{chunk}\r\n0\r\n\r\n"
    );
    let out = raw_exchange(addr, chunked.as_bytes(), Duration::from_secs(5)).await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    let small = format!("POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n50\r\n{chunk}\r\n0\r\n\r\n");
    let out = raw_exchange(addr, small.as_bytes(), Duration::from_secs(5)).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_request_in_flight_finish_and_exits_0() {
    let a = TestBackend::start_slow("a", Duration::from_millis(1000)).await;
    let mut lb = Velocity::start(&config("", "", &[(&a, "")])).await;
    let addr = lb.addr();
    // An idle keep-alive connection, which shutdown closes.
    let mut idle = connect(addr).await.unwrap();
    assert_eq!(try_get(&mut idle, "/").await.unwrap().0, 200);
    let slow = tokio::spawn(async move { get(addr, "x", "/slow").await });
    eventually("the slow request at the backend", DEADLINE, || a.hits() == 2).await;
    kill(lb.pid(), "-TERM");
    eventually("new connections refused", DEADLINE, || std::net::TcpStream::connect(addr).is_err()).await;
    let r = slow.await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "a\n"));
    assert_eq!(r.headers.get("connection").map(|v| v.to_str().unwrap()), Some("close"));
    let status = wait_exit(&mut lb, DEADLINE).await;
    assert_eq!(status.code(), Some(0), "{:#?}", lb.log_lines());
    assert!(try_get(&mut idle, "/").await.is_err());
    assert!(lb.log_contains("shutdown (SIGTERM): no longer accepting"), "{:#?}", lb.log_lines());
    assert!(lb.log_contains("shutdown: drained, exiting"), "{:#?}", lb.log_lines());
    // The access log (stdout here) was flushed before the exit: the last request is in it.
    let line = " GET x /slow 200 ";
    eventually("the drained request's access-log line", DEADLINE, || lb.log_contains(line)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cut_by_drain_timeout_is_logged_with_note_shutdown() {
    let a = TestBackend::start_slow("a", Duration::from_secs(20)).await;
    let yaml = config("access_log: stdout\nshutdown: {drain_timeout: 300ms}\n", "", &[(&a, "")]);
    let mut lb = Velocity::start(&yaml).await;
    let addr = lb.addr();
    let slow =
        tokio::spawn(async move { raw_exchange(addr, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n", DEADLINE).await });
    eventually("the slow request at the backend", DEADLINE, || a.hits() == 1).await;
    kill(lb.pid(), "-TERM");
    let status = wait_exit(&mut lb, DEADLINE).await;
    assert_eq!(status.code(), Some(0), "{:#?}", lb.log_lines());
    // The client got no answer: the connection was closed.
    assert_eq!(slow.await.unwrap(), "");
    eventually("the cut request's access-log line", DEADLINE, || lb.log_contains(" GET x /slow - - ")).await;
    let line = lb.log_lines().into_iter().find(|l| l.contains(" GET x /slow ")).unwrap();
    assert!(line.ends_with(" shutdown"), "{line}");
    // The line the README shows.
    assert!(
        lb.log_contains("shutdown: drain_timeout (300ms) passed with 1 request(s) in progress, cut; exiting"),
        "{:#?}",
        lb.log_lines()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let a = TestBackend::start_slow("a", Duration::from_secs(20)).await;
    let mut lb = Velocity::start(&config("", "", &[(&a, "")])).await;
    let addr = lb.addr();
    let _slow = tokio::spawn(async move { get(addr, "x", "/slow").await });
    eventually("the slow request at the backend", DEADLINE, || a.hits() == 1).await;
    kill(lb.pid(), "-TERM");
    eventually("the shutdown to start", DEADLINE, || lb.log_contains("shutdown (SIGTERM)")).await;
    let start = Instant::now();
    kill(lb.pid(), "-INT");
    let status = wait_exit(&mut lb, Duration::from_secs(3)).await;
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(status.code(), Some(1));
    assert!(lb.log_contains("second signal (SIGINT)"), "{:#?}", lb.log_lines());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_reloads_under_load_lose_no_request() {
    let (a, b, c) = (TestBackend::start("a").await, TestBackend::start("b").await, TestBackend::start("c").await);
    let one = config("access_log: off\n", "", &[(&a, ""), (&b, "")]);
    let two = config(
        "access_log: off\ntimeouts: {backend_response: 5s}\n",
        "    algorithm: least_connections\n    queue: {size: 50, timeout: 5s}\n",
        &[(&b, "        max_connections: 20\n"), (&c, "        weight: 2\n")],
    );
    let mut lb = Velocity::start(&one).await;
    let addr = lb.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut workers = Vec::new();
    for w in 0..6 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            // Half on kept connections, half on a new connection each time.
            let mut kept = connect(addr).await.ok();
            while !stop.load(Ordering::Relaxed) {
                let result = if w % 2 == 0 {
                    match kept.as_mut() {
                        Some(s) => try_get(s, "/").await,
                        None => Err("no connection".into()),
                    }
                } else {
                    match connect(addr).await {
                        Ok(mut s) => try_get(&mut s, "/").await,
                        Err(e) => Err(e),
                    }
                };
                match result {
                    Ok((200, _)) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        errors.push(format!("{other:?}"));
                        kept = connect(addr).await.ok();
                    }
                }
            }
            errors
        }));
    }
    for i in 0..50 {
        write_config(&lb.config_path, if i % 2 == 0 { &two } else { &one });
        kill(lb.pid(), "-HUP");
        eventually("the reload", DEADLINE, || count_lines(&lb, "reload ok (SIGHUP)") == i + 1).await;
        let before = ok.load(Ordering::Relaxed);
        eventually("traffic after the reload", DEADLINE, || ok.load(Ordering::Relaxed) > before + 5).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for w in workers {
        errors.extend(w.await.unwrap());
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "{errors:#?}");
    assert!(ok.load(Ordering::Relaxed) > 300);
    // Both configs served: `c` is only in the second one.
    assert!(a.hits() > 0 && c.hits() > 0);
    assert!(lb.child().try_wait().unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_reload_keeps_the_old_config_and_logs_positions() {
    let (a, b) = (TestBackend::start("a").await, TestBackend::start("b").await);
    let lb = Velocity::start(&config("", "", &[(&a, "")])).await;
    let bad = config("timeouts: {connect: 5}\n", "", &[(&b, "        weight: 0\n")]);
    write_config(&lb.config_path, &bad);
    kill(lb.pid(), "-HUP");
    eventually("the rejection", DEADLINE, || lb.log_contains("reload rejected (SIGHUP): 2 problem(s)")).await;
    let file = lb.config_path.display().to_string();
    eventually("the positioned errors", DEADLINE, || {
        lb.log_contains(&format!("{file}:2:21: connect: duration \"5\" is missing a unit"))
            && lb.log_contains(&format!("{file}:7:17: weight must be"))
    })
    .await;
    for _ in 0..5 {
        assert_eq!(get(lb.addr(), "x", "/").await.backend(), "a");
    }
    // A fixed file then loads.
    write_config(&lb.config_path, &config("", "", &[(&b, "")]));
    kill(lb.pid(), "-HUP");
    eventually("the reload", DEADLINE, || lb.log_contains("reload ok (SIGHUP)")).await;
    assert_eq!(get(lb.addr(), "x", "/").await.backend(), "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reloads_when_the_file_changes() {
    let (a, b) = (TestBackend::start("a").await, TestBackend::start("b").await);
    let path = temp_path("watched.yaml");
    std::fs::write(&path, config("", "", &[(&a, "")])).unwrap();
    let lb = Velocity::start_file(path, &["--watch"]).await;
    assert_eq!(get(lb.addr(), "x", "/").await.backend(), "a");
    write_config(&lb.config_path, &config("", "", &[(&b, "")]));
    eventually("the reload", DEADLINE, || lb.log_contains("reload ok (file change)")).await;
    assert_eq!(get(lb.addr(), "x", "/").await.backend(), "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_opens_added_listeners_and_closes_removed_ones() {
    let a = TestBackend::start("a").await;
    let lb = Velocity::start(&config("", "", &[(&a, "")])).await;
    let first = lb.addr();
    // A free port for the new listener.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let second: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut kept = Client::connect(first).await;
    assert_eq!(kept.get("x", "/").await.status, 200);
    let moved = config("", "", &[(&a, "")]).replace("listen: 127.0.0.1:0", &format!("listen: {second}"));
    write_config(&lb.config_path, &moved);
    kill(lb.pid(), "-HUP");
    eventually("the reload", DEADLINE, || lb.log_contains("reload ok (SIGHUP)")).await;
    assert!(lb.log_contains(&format!("listening on http://{second}")));
    assert_eq!(get(second, "x", "/").await.status, 200);
    eventually("the old listener closed", DEADLINE, || std::net::TcpStream::connect(first).is_err()).await;
    // Its open connection drained: it answered its request, then closed.
    assert!(lb.log_contains(&format!("closing listener http://{first}")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_client_connections_the_listener_waits_instead_of_failing() {
    let a = TestBackend::start("a").await;
    let lb = Velocity::start(&config("max_client_connections: 2\n", "", &[(&a, "")])).await;
    let addr = lb.addr();
    let mut one = Client::connect(addr).await;
    let mut two = Client::connect(addr).await;
    assert_eq!(one.get("x", "/").await.status, 200);
    assert_eq!(two.get("x", "/").await.status, 200);
    // The third connection is not refused, just not served yet.
    let third = tokio::spawn(async move { get(addr, "x", "/").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!third.is_finished());
    drop(one);
    let r = tokio::time::timeout(DEADLINE, third).await.expect("served once a slot frees").unwrap();
    assert_eq!(r.status, 200);
    assert!(lb.log_contains("connection limit reached"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_keepalive_connection_outlives_client_header() {
    // client_header times a request's head, not the connection: a keep-alive client sending a
    // request every 50 ms for well over client_header keeps its connection.
    let a = TestBackend::start("a").await;
    let lb = Velocity::start(&config("access_log: off\ntimeouts: {client_header: 300ms}\n", "", &[(&a, "")])).await;
    let mut client = Client::connect(lb.addr()).await;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1200) {
        let r = client.try_get("x", "/").await.expect("kept connection still open");
        assert_eq!(r.status, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_soft_fd_limit_is_raised_and_a_config_that_cannot_fit_is_named() {
    let a = TestBackend::start("a").await;
    // The default max_client_connections (10000): clients, as many backend connections, one
    // idle pool, one listener and the reserve do not fit in 4096.
    let lb = Velocity::start_with_nofile(&config("", "", &[(&a, "")]), 256, 4096).await;
    assert!(lb.log_contains("file descriptors: soft limit raised to 4096"), "{:#?}", lb.log_lines());
    let warning = "file descriptors: the limit is 4096 but this config may need 20545: max_client_connections 10000 x 1 listener(s), up to 10000 backend connection(s) in flight, 512 idle x 1 backend(s), 33 for the rest";
    assert!(lb.log_contains(warning), "{:#?}", lb.log_lines());
    assert_eq!(get(lb.addr(), "x", "/").await.status, 200);

    // 100 x 2 + 512 + 33 fits.
    let lb = Velocity::start_with_nofile(&config("max_client_connections: 100\n", "", &[(&a, "")]), 4096, 4096).await;
    assert!(lb.log_contains("file descriptors: limit 4096"), "{:#?}", lb.log_lines());
    assert!(!lb.log_contains("may need"), "{:#?}", lb.log_lines());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_accept_loop_backs_off_and_says_so_once() {
    let a = TestBackend::start("a").await;
    let nofile = 48;
    let lb = Velocity::start_with_nofile(&config("", "", &[(&a, "")]), nofile, nofile).await;
    let addr = lb.addr();
    let mut fillers = Vec::new();
    let start = Instant::now();
    while lb.open_fds() < nofile as usize {
        assert!(start.elapsed() < DEADLINE, "fds stuck at {}", lb.open_fds());
        fillers.push(TcpStream::connect(addr).await.unwrap());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // These wait in the backlog: every 50 ms the accept loop tries again and fails.
    for _ in 0..4 {
        fillers.push(TcpStream::connect(addr).await.unwrap());
    }
    eventually("the accept failure in the log", DEADLINE, || {
        lb.log_contains("out of file descriptors") || lb.log_contains("accept failed")
    })
    .await;
    // Long enough for several retries (the bug logged each one).
    tokio::time::sleep(Duration::from_millis(400)).await;
    drop(fillers);
    eventually("accepting again", DEADLINE, || lb.log_contains("accepting again")).await;
    assert_eq!(get(addr, "x", "/").await.status, 200);
    let lines = lb.log_lines();
    let failures = lines.iter().filter(|l| l.contains("accept")).count();
    assert_eq!(failures, 2, "one line when it starts, one when it ends: {lines:#?}");
    let recovered = lines.iter().find(|l| l.contains("accepting again")).unwrap();
    let retries: u64 =
        recovered.split("failed_accepts=").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    assert!(retries >= 4, "retried every 50 ms: {recovered}");
}

/// Resident memory of a process, in KiB (Linux: /proc).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_access_log_drops_lines_and_stays_bounded() {
    let a = TestBackend::start("a").await;
    // A FIFO that is opened for reading (so Velocity can open it) and then not read.
    let fifo = temp_path("access.fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let (opened_tx, opened_rx) = std::sync::mpsc::channel();
    let (drain_tx, drain_rx) = std::sync::mpsc::channel::<()>();
    let reader_path = fifo.clone();
    let reader = std::thread::spawn(move || {
        let mut f = std::fs::File::open(&reader_path).unwrap();
        opened_tx.send(()).unwrap();
        // Stalled until told to read.
        let _ = drain_rx.recv();
        let mut sink = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut sink).unwrap();
        sink.len()
    });
    let yaml = config(&format!("access_log: {}\n", fifo.display()), "", &[(&a, "")]);
    let lb = Velocity::start(&yaml).await;
    opened_rx.recv_timeout(DEADLINE).unwrap();
    let before = rss_kib(lb.pid());
    // 8 KiB targets: each line is big, so the 8 MiB queue fills after about a thousand.
    let path = format!("/{}", "p".repeat(8 * 1024));
    let addr = lb.addr();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let path = path.clone();
            tokio::spawn(async move {
                let mut client = Client::connect(addr).await;
                for _ in 0..400 {
                    assert_eq!(client.get("x", &path).await.status, 200);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    eventually("the drops in the log", DEADLINE, || lb.log_contains("access log: the writer is not keeping up")).await;
    let grown = rss_kib(lb.pid()).saturating_sub(before);
    // 3200 requests of 8 KiB heads; the queue holds at most 8 MiB of them.
    assert!(grown < 24 * 1024, "RSS grew by {grown} KiB");
    drop(drain_tx);
    eventually("the writer caught up", DEADLINE, || lb.log_contains("access log: caught up")).await;
    let line = lb.log_lines().into_iter().find(|l| l.contains("access log: caught up")).unwrap();
    let dropped: u64 = line.split("dropped=").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    assert!(dropped > 1000, "{line}");
    eprintln!("stalled access log: RSS grew by {grown} KiB, {dropped} lines dropped");
    drop(lb);
    let written = reader.join().unwrap();
    assert!(written > 1000 * 8 * 1024, "{written} bytes of log");
    let _ = std::fs::remove_file(&fifo);
}
