//! WebSocket tunnels end to end: a real WebSocket client and echo server (tokio-tungstenite)
//! on 127.0.0.1 with a real `velocity` process between them.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{eventually, kill, temp_path, Client, TestBackend, Velocity, DEADLINE};
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

/// A WebSocket echo server: every text or binary message comes back, prefixed with its name.
struct EchoServer {
    addr: SocketAddr,
    /// Handshakes completed.
    upgrades: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo_server(name: &'static str) -> EchoServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upgrades = Arc::new(AtomicUsize::new(0));
    let counted = upgrades.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let counted = counted.clone();
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
                counted.fetch_add(1, Ordering::SeqCst);
                while let Some(Ok(msg)) = ws.next().await {
                    let reply = match msg {
                        Message::Text(t) => Message::text(format!("{name}:{t}")),
                        Message::Binary(b) => Message::binary([name.as_bytes(), b":", &b].concat()),
                        Message::Close(_) => break,
                        _ => continue,
                    };
                    if ws.send(reply).await.is_err() {
                        return;
                    }
                }
                let _ = ws.close(None).await;
            });
        }
    });
    EchoServer { addr, upgrades, task }
}

fn config(backends: &[SocketAddr], extra: &str) -> String {
    let list: String = backends.iter().map(|a| format!("      - address: {a}\n")).collect();
    format!("listen: 127.0.0.1:0\naccess_log: stdout\n{extra}services:\n  - name: ws\n    backends:\n{list}")
}

async fn open(lb: &Velocity) -> Ws {
    let url = format!("ws://{}/chat", lb.addr());
    let stream = TcpStream::connect(lb.addr()).await.unwrap();
    let (ws, resp) = tokio::time::timeout(DEADLINE, tokio_tungstenite::client_async(url, stream))
        .await
        .expect("handshake in time")
        .expect("websocket handshake through velocity");
    assert_eq!(resp.status(), 101);
    ws
}

async fn echo(ws: &mut Ws, text: &str) -> String {
    ws.send(Message::text(text.to_owned())).await.expect("send");
    match tokio::time::timeout(DEADLINE, ws.next()).await.expect("echo in time") {
        Some(Ok(Message::Text(t))) => t.to_string(),
        other => panic!("expected a text echo, got {other:?}"),
    }
}

#[tokio::test]
async fn websocket_echo_through_velocity() {
    let server = echo_server("e1").await;
    let lb = Velocity::start(&config(&[server.addr], "")).await;
    let mut ws = open(&lb).await;
    assert_eq!(echo(&mut ws, "hello").await, "e1:hello");
    // A large binary message crosses many reads each way.
    let big = vec![7u8; 300_000];
    ws.send(Message::binary(big.clone())).await.unwrap();
    match tokio::time::timeout(DEADLINE, ws.next()).await.unwrap() {
        Some(Ok(Message::Binary(b))) => assert_eq!(&b[..], &[b"e1:", &big[..]].concat()[..]),
        other => panic!("expected a binary echo, got {other:?}"),
    }
    assert_eq!(echo(&mut ws, "again").await, "e1:again");
    ws.close(None).await.unwrap();
    // The close handshake completes through the tunnel, then both sides close.
    while let Some(Ok(_)) = tokio::time::timeout(DEADLINE, ws.next()).await.unwrap() {}
    // The server closed its side first (RFC 6455 7.1.1); the client's close ends the tunnel.
    drop(ws);
    assert_eq!(server.upgrades.load(Ordering::SeqCst), 1);
    // One access-log line for the tunnel: status 101, bytes both ways.
    eventually("the tunnel's access-log line", DEADLINE, || {
        lb.log_lines().iter().any(|l| l.contains(" GET ") && l.contains("/chat 101 ") && l.contains(" in:"))
    })
    .await;
    let line = lb.log_lines().into_iter().find(|l| l.contains("/chat 101 ")).unwrap();
    let down: u64 = line.split_whitespace().find_map(|w| w.strip_suffix('B')?.parse().ok()).unwrap();
    let up: u64 = line.split(" in:").nth(1).and_then(|r| r.split('B').next()).unwrap().parse().unwrap();
    assert!(down > 300_000 && up > 300_000, "{line}");
}

#[tokio::test]
async fn a_tunnel_counts_in_flight_and_survives_a_reload() {
    let server = echo_server("e1").await;
    let path = temp_path("velocity.yaml");
    std::fs::write(&path, config(&[server.addr], "")).unwrap();
    let lb = Velocity::start_file(path.clone(), &[]).await;
    let mut ws = open(&lb).await;
    assert_eq!(echo(&mut ws, "before").await, "e1:before");
    // A reload that keeps the backend (here: another service added, a timeout changed).
    let other = TestBackend::start("other").await;
    let mut changed = config(&[server.addr], "timeouts: {backend_response: 5s}\n");
    changed.push_str(&format!(
        "  - name: other\n    path_prefix: /other\n    backends:\n      - address: {}\n",
        other.addr
    ));
    std::fs::write(&path, changed).unwrap();
    kill(lb.pid(), "-HUP");
    eventually("the reload", DEADLINE, || lb.log_contains("reload ok (SIGHUP)")).await;
    assert_eq!(common::get(lb.addr(), "x", "/other").await.status, 200);
    assert_eq!(echo(&mut ws, "after").await, "e1:after");
    assert_eq!(server.upgrades.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn shutdown_lets_a_tunnel_run_until_drain_timeout() {
    let server = echo_server("e1").await;
    let lb = Velocity::start(&config(&[server.addr], "shutdown: {drain_timeout: 1500ms}\n")).await;
    let mut lb = lb;
    let mut ws = open(&lb).await;
    assert_eq!(echo(&mut ws, "one").await, "e1:one");
    let stopped = Instant::now();
    kill(lb.pid(), "-TERM");
    eventually("shutdown to start", DEADLINE, || lb.log_contains("shutdown (SIGTERM)")).await;
    // Still open while draining.
    assert_eq!(echo(&mut ws, "two").await, "e1:two");
    // Then cut at drain_timeout.
    let end = tokio::time::timeout(DEADLINE, async {
        loop {
            match ws.next().await {
                Some(Ok(_)) => continue,
                _ => return,
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the tunnel was not closed");
    assert!(stopped.elapsed() >= Duration::from_millis(1400), "closed before drain_timeout: {:?}", stopped.elapsed());
    let start = Instant::now();
    while lb.child().try_wait().unwrap().is_none() {
        assert!(start.elapsed() < DEADLINE, "velocity did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_quiet_tunnel_closes_after_tunnel_idle() {
    let server = echo_server("e1").await;
    let lb = Velocity::start(&config(&[server.addr], "timeouts: {tunnel_idle: 300ms}\n")).await;
    let mut ws = open(&lb).await;
    // Traffic keeps it open past the idle time.
    for i in 0..4 {
        assert_eq!(echo(&mut ws, &i.to_string()).await, format!("e1:{i}"));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let quiet = Instant::now();
    let end = tokio::time::timeout(DEADLINE, ws.next()).await.expect("the idle tunnel was not closed");
    assert!(!matches!(end, Some(Ok(Message::Text(_)))), "{end:?}");
    assert!(quiet.elapsed() >= Duration::from_millis(100), "{:?}", quiet.elapsed());
    eventually("the line", DEADLINE, || lb.log_contains("tunnel_idle")).await;
}

#[tokio::test]
async fn websocket_over_a_tls_listener() {
    use rustls::pki_types::ServerName;
    let server = echo_server("e1").await;
    // A self-signed certificate for `localhost`, trusted by the client alone.
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap().self_signed(&key).unwrap();
    let dir = temp_path("wss");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("c.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("c.key"), key.serialize_pem()).unwrap();
    let d = dir.display();
    let lb = Velocity::start(&format!(
        "listen: 127.0.0.1:0\nlisteners:\n  - name: public\n    listen: 127.0.0.1:0\n    tls:\n      certificates: [{{cert: {d}/c.pem, key: {d}/c.key}}]\nservices:\n  - name: ws\n    backends: [{{address: {}}}]\n",
        server.addr
    ))
    .await;
    let tag = "(listener public)";
    let mut addr: Option<SocketAddr> = None;
    eventually("the tls listener", DEADLINE, || {
        addr = lb
            .log_lines()
            .iter()
            .filter(|l| l.contains(tag))
            .find_map(|l| l.split("listening on https://").nth(1)?.split(' ').next()?.parse().ok());
        addr.is_some()
    })
    .await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr.unwrap()).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (mut ws, resp) = tokio::time::timeout(DEADLINE, tokio_tungstenite::client_async("wss://localhost/chat", tls))
        .await
        .unwrap_or_else(|_| panic!("handshake in time: {:#?}", lb.log_lines()))
        .expect("websocket handshake over TLS");
    assert_eq!(resp.status(), 101);
    for text in ["one", "two"] {
        ws.send(Message::text(text)).await.unwrap();
        match tokio::time::timeout(DEADLINE, ws.next()).await.unwrap() {
            Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), format!("e1:{text}")),
            other => panic!("{other:?}"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Write `req` on a fresh connection and read until the response head (and `body_len` body
/// bytes) are in.
async fn raw_exchange(stream: &mut TcpStream, req: &str) -> String {
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(DEADLINE, async {
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let len = text[..end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase().strip_prefix("content-length: ").map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0usize);
                if got.len() >= end + 4 + len {
                    return text;
                }
            }
        }
    })
    .await
    .expect("an answer in time")
}

#[tokio::test]
async fn h2c_upgrade_and_http2_settings_are_stripped() {
    let backend = TestBackend::start("b1").await;
    let lb = Velocity::start(&config(&[backend.addr], "")).await;
    let mut s = TcpStream::connect(lb.addr()).await.unwrap();
    let resp = raw_exchange(
        &mut s,
        // `HTTP2-Settings` not named in `Connection`: stripped all the same.
        "GET /h2 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    // The connection stays plain HTTP: another request on it works.
    let again = raw_exchange(&mut s, "GET /h2b HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(again.starts_with("HTTP/1.1 200"), "{again}");
    let seen = backend.seen.lock().unwrap().clone();
    let h = &seen.iter().find(|s| s.path == "/h2").unwrap().headers;
    assert!(h.get("upgrade").is_none(), "{h:?}");
    assert!(h.get("http2-settings").is_none(), "{h:?}");
    assert!(h.get("connection").is_none_or(|v| !v.to_str().unwrap().to_ascii_lowercase().contains("upgrade")), "{h:?}");
}

#[tokio::test]
async fn a_backend_that_answers_200_to_an_upgrade_is_relayed_as_a_normal_response() {
    // TestBackend is plain HTTP: it answers the handshake with a 200.
    let backend = TestBackend::start("b1").await;
    let lb = Velocity::start(&config(&[backend.addr], "")).await;
    let mut s = TcpStream::connect(lb.addr()).await.unwrap();
    let handshake = "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let resp = raw_exchange(&mut s, handshake).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.to_ascii_lowercase().contains("x-backend: b1"), "{resp}");
    // The handshake was forwarded as a handshake.
    let seen = backend.seen.lock().unwrap().clone();
    let h = &seen.iter().find(|s| s.path == "/ws").unwrap().headers;
    assert_eq!(h.get("upgrade").unwrap(), "websocket", "{h:?}");
    assert_eq!(h.get("sec-websocket-key").unwrap(), "dGhlIHNhbXBsZSBub25jZQ==", "{h:?}");
    // And the client connection is still HTTP.
    let again = raw_exchange(&mut s, "GET /after HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(again.starts_with("HTTP/1.1 200"), "{again}");
}

#[tokio::test]
async fn an_open_tunnel_is_in_flight_on_its_backend() {
    const TOKEN: &str = "tunnel-token";
    let server = echo_server("e1").await;
    let admin = "admin:\n  listen: 127.0.0.1:0\n  token_env: VELOCITY_TEST_TOKEN\n";
    let path = temp_path("velocity.yaml");
    std::fs::write(&path, config(&[server.addr], admin)).unwrap();
    let lb = Velocity::start_file_env(path, &[], &[("VELOCITY_TEST_TOKEN", TOKEN)]).await;
    let admin = lb.admin_addr().await;
    let in_flight = || async move {
        let req = Request::builder()
            .uri("/api/v1/services")
            .header("host", admin.to_string())
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = Client::connect(admin).await.send(req).await;
        let v: serde_json::Value = serde_json::from_str(&resp.body).unwrap();
        v["services"][0]["backends"][0]["in_flight"].as_u64().unwrap()
    };
    let mut ws = open(&lb).await;
    assert_eq!(echo(&mut ws, "x").await, "e1:x");
    assert_eq!(in_flight().await, 1);
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = tokio::time::timeout(DEADLINE, ws.next()).await.unwrap() {}
    // The server closed its side first (RFC 6455 7.1.1); the client's close ends the tunnel.
    drop(ws);
    let start = Instant::now();
    while in_flight().await != 0 {
        assert!(start.elapsed() < DEADLINE, "the tunnel stayed in flight");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
