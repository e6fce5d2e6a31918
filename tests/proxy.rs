//! The core data plane, end to end: real backends, a real Velocity, a real client.

mod common;

use std::time::Duration;

use common::*;

fn backends_yaml(backends: &[&TestBackend], weights: &[u32]) -> String {
    backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            format!("      - address: {}\n        weight: {}\n", b.addr, weights.get(i).copied().unwrap_or(1))
        })
        .collect()
}

fn one_service(algorithm: &str, backends: &[&TestBackend], weights: &[u32]) -> String {
    format!(
        "listen: 127.0.0.1:0\naccess_log: off\nservices:\n  - name: web\n    algorithm: {algorithm}\n    backends:\n{}",
        backends_yaml(backends, weights)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_gives_each_backend_exactly_its_share() {
    let (a, b, c) = (TestBackend::start("a").await, TestBackend::start("b").await, TestBackend::start("c").await);
    let lb = Velocity::start(&one_service("round_robin", &[&a, &b, &c], &[])).await;
    let mut client = Client::connect(lb.addr()).await;
    let mut resps = Vec::new();
    for _ in 0..30 {
        resps.push(client.get("anything", "/").await);
    }
    assert!(resps.iter().all(|r| r.status == 200));
    let t = tally(&resps);
    assert_eq!((t["a"], t["b"], t["c"]), (10, 10, 10), "{t:?}");
    // Strict rotation: the pattern repeats every three requests.
    let order: Vec<String> = resps.iter().map(|r| r.backend()).collect();
    for i in 3..order.len() {
        assert_eq!(order[i], order[i - 3]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_is_exact_under_concurrency() {
    let (a, b, c) = (TestBackend::start("a").await, TestBackend::start("b").await, TestBackend::start("c").await);
    let lb = Velocity::start(&one_service("round_robin", &[&a, &b, &c], &[])).await;
    let addr = lb.addr();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(async move {
                let mut client = Client::connect(addr).await;
                let mut v = Vec::new();
                for _ in 0..30 {
                    v.push(client.get("x", "/").await);
                }
                v
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let t = tally(&all);
    assert_eq!((t["a"], t["b"], t["c"]), (80, 80, 80), "{t:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_is_smooth() {
    let (a, b, c) = (TestBackend::start("a").await, TestBackend::start("b").await, TestBackend::start("c").await);
    let lb = Velocity::start(&one_service("weighted_round_robin", &[&a, &b, &c], &[5, 1, 1])).await;
    let mut client = Client::connect(lb.addr()).await;
    let mut order = String::new();
    for _ in 0..14 {
        order.push_str(&client.get("x", "/").await.backend());
    }
    assert_eq!(order, "aabacaaaabacaa");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_avoids_the_busy_backend() {
    let a = TestBackend::start_slow("a", Duration::from_secs(2)).await;
    let b = TestBackend::start_slow("b", Duration::from_secs(2)).await;
    let lb = Velocity::start(&one_service("least_connections", &[&a, &b], &[])).await;
    let addr = lb.addr();
    let slow = tokio::spawn(async move { get(addr, "x", "/slow").await });
    eventually("the slow request to reach a backend", DEADLINE, || a.hits() + b.hits() == 1).await;
    let busy = if a.hits() == 1 { "a" } else { "b" };
    let mut client = Client::connect(addr).await;
    for _ in 0..10 {
        let r = client.get("x", "/").await;
        assert_eq!(r.status, 200);
        assert_ne!(r.backend(), busy, "a request went to the backend holding the slow one");
    }
    let slow = slow.await.unwrap();
    assert_eq!((slow.status, slow.backend().as_str()), (200, busy));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_then_longest_path_prefix() {
    let (web, api, wild, default) = (
        TestBackend::start("web").await,
        TestBackend::start("api").await,
        TestBackend::start("wild").await,
        TestBackend::start("default").await,
    );
    let yaml = format!(
        "listen: 127.0.0.1:0
access_log: off
services:
  - name: web
    hosts: [web.local]
    backends: [{{address: {}}}]
  - name: api
    hosts: web.local
    path_prefix: /api
    backends: [{{address: {}}}]
  - name: wild
    hosts: [\"*.web.local\"]
    backends: [{{address: {}}}]
  - name: default
    hosts: \"*\"
    backends: [{{address: {}}}]
",
        web.addr, api.addr, wild.addr, default.addr
    );
    let lb = Velocity::start(&yaml).await;
    let mut c = Client::connect(lb.addr()).await;
    for (host, path, want) in [
        ("web.local", "/", "web"),
        ("WEB.Local:8000", "/index.html", "web"),
        ("web.local", "/api/users", "api"),
        ("web.local", "/api", "api"),
        ("shop.web.local", "/api/users", "wild"),
        ("a.b.web.local", "/", "wild"),
        ("example.org", "/", "default"),
        ("web.local.example.org", "/", "default"),
    ] {
        let r = c.get(host, path).await;
        assert_eq!((r.status, r.backend().as_str()), (200, want), "Host: {host} path {path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_host_is_404_naming_the_host() {
    let web = TestBackend::start("web").await;
    let yaml = format!(
        "listen: 127.0.0.1:0\naccess_log: off\nservices:\n  - name: web\n    hosts: [web.local]\n    backends:\n      - address: {}\n",
        web.addr
    );
    let lb = Velocity::start(&yaml).await;
    let r = get(lb.addr(), "nope.example", "/").await;
    assert_eq!(r.status, 404);
    assert!(r.body.contains("nope.example"), "{}", r.body);
    assert_eq!(web.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_backend_is_skipped_and_logged() {
    let (a, mut dead, c) =
        (TestBackend::start("a").await, TestBackend::start("dead").await, TestBackend::start("c").await);
    dead.kill();
    let lb = Velocity::start(&one_service("round_robin", &[&a, &dead, &c], &[])).await;
    let mut client = Client::connect(lb.addr()).await;
    let mut resps = Vec::new();
    for _ in 0..30 {
        resps.push(client.get("x", "/").await);
    }
    assert!(resps.iter().all(|r| r.status == 200), "{:?}", resps.iter().map(|r| r.status).collect::<Vec<_>>());
    let t = tally(&resps);
    assert_eq!(t.get("dead"), None);
    assert_eq!(t["a"] + t["c"], 30);
    eventually("the refused connection in the log", DEADLINE, || lb.log_contains("connection refused")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_backends_refusing_is_502() {
    let (mut a, mut b) = (TestBackend::start("a").await, TestBackend::start("b").await);
    a.kill();
    b.kill();
    let lb = Velocity::start(&one_service("round_robin", &[&a, &b], &[])).await;
    let r = get(lb.addr(), "x", "/").await;
    assert_eq!(r.status, 502);
    assert!(r.body.contains("no backend"), "{}", r.body);
    eventually("the 502 in the log", DEADLINE, || lb.log_contains("no backend could take the request")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_and_host_are_set() {
    let a = TestBackend::start("a").await;
    let lb = Velocity::start(&one_service("round_robin", &[&a], &[])).await;
    let mut client = Client::connect(lb.addr()).await;
    let req = hyper::Request::builder()
        .uri("/p?q=1")
        .header("host", "shop.example:8000")
        .header("x-forwarded-for", "10.1.2.3")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "secret")
        .header("keep-alive", "timeout=5")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let r = client.send(req).await;
    assert_eq!(r.status, 200);
    let seen = a.seen.lock().unwrap()[0].clone();
    assert_eq!(seen.path, "/p");
    let h = &seen.headers;
    assert_eq!(h["host"], "shop.example:8000");
    assert_eq!(h["x-forwarded-for"], "10.1.2.3, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "shop.example:8000");
    assert!(h.get("x-hop").is_none() && h.get("keep-alive").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_stream_both_ways() {
    let a = TestBackend::start("a").await;
    let lb = Velocity::start(&one_service("round_robin", &[&a], &[])).await;
    let mut client = Client::connect(lb.addr()).await;
    let big = "y".repeat(3 << 20);
    let r = client.request("POST", "x", "/upload", &big).await;
    assert_eq!(r.status, 200);
    let r = client.get("x", "/bytes/5000000").await;
    assert_eq!((r.status, r.body.len()), (200, 5_000_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_connections_are_reused() {
    let (a, b) = (TestBackend::start("a").await, TestBackend::start("b").await);
    let lb = Velocity::start(&one_service("round_robin", &[&a, &b], &[])).await;
    let addr = lb.addr();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                let mut client = Client::connect(addr).await;
                for _ in 0..100 {
                    assert_eq!(client.get("x", "/").await.status, 200);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    // 400 requests from 4 clients: at most one connection per concurrent request per backend.
    let opened = a.connections.load(std::sync::atomic::Ordering::SeqCst)
        + b.connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(opened <= 8, "{opened} backend connections for 400 requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_records_each_request() {
    let a = TestBackend::start("a").await;
    let yaml = format!(
        "listen: 127.0.0.1:0\naccess_log: stdout\nlog_format: json\nservices:\n  - name: web\n    hosts: [web.local]\n    backends:\n      - address: {}\n",
        a.addr
    );
    let lb = Velocity::start(&yaml).await;
    get(lb.addr(), "web.local", "/hello?x=1").await;
    get(lb.addr(), "other.local", "/missing").await;
    let backend = a.addr.to_string();
    eventually("the forward in the access log", DEADLINE, || {
        lb.log_lines().iter().any(|l| {
            l.contains(r#""method":"GET""#)
                && l.contains(r#""host":"web.local""#)
                && l.contains(r#""path":"/hello?x=1""#)
                && l.contains(r#""status":200"#)
                && l.contains(&format!(r#""backend":"{backend}""#))
                && l.contains(r#""bytes":2"#)
        })
    })
    .await;
    eventually("the drop in the access log", DEADLINE, || {
        lb.log_lines().iter().any(|l| l.contains(r#""status":404"#) && l.contains(r#""note":"no_route""#))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_go_config_serves() {
    let (a, b) = (TestBackend::start("a").await, TestBackend::start("b").await);
    let yaml = format!(
        "listen_port: 0\napi_port: 0\nservices:\n  - name: legacy\n    domain: \"legacy.local:8080\"\n    targetURLs:\n      - \"http://{}\"\n      - \"http://{}\"\n    algorythm: RoundRobin\n",
        a.addr, b.addr
    );
    let lb = Velocity::start(&yaml).await;
    let mut client = Client::connect(lb.addr()).await;
    let mut resps = Vec::new();
    for _ in 0..4 {
        resps.push(client.get("legacy.local:8080", "/").await);
    }
    let t = tally(&resps);
    assert_eq!((t["a"], t["b"]), (2, 2), "{t:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testserver_answers_with_its_name() {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_velocity"))
        .args(["testserver", "--listen", "127.0.0.1:0", "--name", "alpha"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Events (the listening line among them) go to stderr.
    let stdout = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(a) = line.split("listening on http://").nth(1) {
                let _ = tx.send(a.trim().to_string());
            }
        }
    });
    let addr = rx.recv_timeout(DEADLINE).expect("testserver address").parse().unwrap();
    let r = get(addr, "x", "/any/path").await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!((r.status, r.body.as_str(), r.backend().as_str()), (200, "alpha\n", "alpha"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_and_the_proxy_keeps_serving() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = TestBackend::start("a").await;
    let lb = Velocity::start(&one_service("round_robin", &[&a], &[])).await;
    for garbage in ["GARBAGE\r\n\r\n", "GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", "\x00\x01\x02\r\n\r\n"] {
        let mut s = tokio::net::TcpStream::connect(lb.addr()).await.unwrap();
        s.write_all(garbage.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut out)).await;
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 400"), "{garbage:?} got {out:?}");
    }
    assert_eq!(a.hits(), 0);
    assert_eq!(get(lb.addr(), "x", "/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_dying_mid_response_cuts_only_that_response() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A backend that promises 100 bytes, sends 3 and closes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let liar = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc").await;
        }
    });
    let good = TestBackend::start("good").await;
    let yaml = format!(
        "listen: 127.0.0.1:0\naccess_log: stdout\nservices:\n  - name: liar\n    hosts: liar\n    backends: [{{address: \"{liar}\"}}]\n  - name: good\n    backends: [{{address: \"{}\"}}]\n",
        good.addr
    );
    let lb = Velocity::start(&yaml).await;
    let mut s = tokio::net::TcpStream::connect(lb.addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: liar\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 200") && out.ends_with("abc"), "{out:?}");
    eventually("the cut response in the log", DEADLINE, || lb.log_contains("backend_body_error")).await;
    assert_eq!(get(lb.addr(), "other", "/").await.status, 200);
}

/// A raw backend: answers every request with a chunked 200 whose chunks `"x"` come every
/// `every`, `chunks` of them, then (if `finish`) the last chunk; otherwise it stalls, open.
async fn trickling_backend(every: Duration, chunks: usize, finish: bool) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").await;
                for _ in 0..chunks {
                    tokio::time::sleep(every).await;
                    if s.write_all(b"1\r\nx\r\n").await.is_err() {
                        return;
                    }
                }
                if finish {
                    let _ = s.write_all(b"0\r\n\r\n").await;
                }
                // Hold the connection open until the proxy gives up on it.
                let _ = s.read(&mut buf).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_response_body_is_cut_after_backend_response() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stalls = trickling_backend(Duration::from_millis(10), 2, false).await;
    let steady = trickling_backend(Duration::from_millis(100), 8, true).await;
    let yaml = format!(
        "listen: 127.0.0.1:0\naccess_log: off\ntimeouts: {{backend_response: 300ms}}\nservices:\n  - name: stalls\n    hosts: stalls\n    backends: [{{address: \"{stalls}\"}}]\n  - name: steady\n    backends: [{{address: \"{steady}\"}}]\n"
    );
    let lb = Velocity::start(&yaml).await;

    // A body that stops: the client gets what came, then the connection closes.
    let start = std::time::Instant::now();
    let mut s = tokio::net::TcpStream::connect(lb.addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: stalls\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut out)).await.expect("the stalled response was never cut").unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 200") && out.contains("\r\n1\r\nx\r\n"), "{out:?}");
    assert!(!out.ends_with("0\r\n\r\n"), "a cut body must not look complete: {out:?}");
    assert!(start.elapsed() >= Duration::from_millis(250), "{:?}", start.elapsed());
    eventually("the stall in the log", DEADLINE, || lb.log_contains("sent no response data")).await;

    // A body that keeps coming, each piece within the timeout, is never cut.
    let r = get(lb.addr(), "other", "/").await;
    assert_eq!((r.status, r.body.as_str()), (200, "xxxxxxxx"));
}
