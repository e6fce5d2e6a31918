//! gRPC to backends (issue 17): real grpcio servers (`tests/grpc/server.py`, Python `grpcio`
//! from PyPI, installed by `.ci/run`) behind the real binary.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use common::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

/// A grpcio server process on 127.0.0.1 (see `tests/grpc/server.py`).
struct GrpcServer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    addr: SocketAddr,
}

impl GrpcServer {
    /// `tls`: the certificate and key files it serves TLS with (ALPN h2, as grpcio does).
    fn start(name: &str, tls: Option<(&Path, &Path)>) -> GrpcServer {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/grpc/server.py");
        let mut cmd = Command::new("python3");
        cmd.arg(script).arg(name);
        if let Some((cert, key)) = tls {
            cmd.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs (tests/grpc needs Python with grpcio: .ci/run installs it)");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        // The server prints its port as soon as it listens; a failure to start ends the
        // process, and with it this read.
        stdout.read_line(&mut line).unwrap();
        let port: u16 = line
            .strip_prefix("port ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("grpc test server did not start (is grpcio installed?): {line:?}"));
        GrpcServer { child, stdin, stdout, addr: SocketAddr::from(([127, 0, 0, 1], port)) }
    }

    /// `serving`, `not_serving`: what its health service answers from now on.
    fn command(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), format!("ok {cmd}"));
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Log lines about the backend at `addr` of `service` containing every one of `needles`.
fn lines(lb: &Velocity, service: &str, addr: &str, needles: &[&str]) -> usize {
    let (service, backend) = (format!("service={service}"), format!("backend={addr}"));
    lb.log_lines()
        .iter()
        .filter(|l| l.contains(&service) && l.contains(&backend) && needles.iter().all(|n| l.contains(n)))
        .count()
}

async fn wait_for(lb: &Velocity, service: &str, addr: &str, needles: &[&str]) {
    eventually(&format!("{needles:?} for {service}"), DEADLINE, || lines(lb, service, addr, needles) > 0).await;
}

const CHECK: &str = "interval: 50ms, timeout: 2s, healthy_threshold: 1, unhealthy_threshold: 1";

#[tokio::test]
async fn grpc_health_check_follows_the_serving_status() {
    let mut server = GrpcServer::start("a", None);
    server.command("not_serving");
    let addr = server.addr.to_string();
    let lb = Velocity::start(&format!(
        "listen: 127.0.0.1:0
access_log: off
services:
  - name: whole
    hosts: whole.local
    backend_protocol: h2c
    health_check: {{type: grpc, {CHECK}}}
    backends: [{{address: {addr}}}]
  - name: echo
    hosts: echo.local
    backend_protocol: h2c
    health_check: {{type: grpc, service: velocity.test.Echo, {CHECK}}}
    backends: [{{address: {addr}}}]
  - name: unknown
    hosts: unknown.local
    backend_protocol: h2c
    health_check: {{type: grpc, service: no.Such, {CHECK}}}
    backends: [{{address: {addr}}}]
"
    ))
    .await;
    wait_for(&lb, "whole", &addr, &["backend is down", "reason=NOT_SERVING"]).await;
    wait_for(&lb, "echo", &addr, &["backend is down", "reason=NOT_SERVING"]).await;
    // The server answers NOT_FOUND for a service it does not know: a gRPC error status.
    wait_for(&lb, "unknown", &addr, &["backend is down", "grpc-status 5 unknown service"]).await;
    server.command("serving");
    wait_for(&lb, "whole", &addr, &["backend is up", "reason=SERVING"]).await;
    wait_for(&lb, "echo", &addr, &["backend is up", "reason=SERVING"]).await;
    assert_eq!(lines(&lb, "unknown", &addr, &["backend is up"]), 0);
    // A server that is gone fails its checks (a check in flight as it goes fails with its
    // connection, the ones after it are refused).
    drop(server);
    eventually("the second down", DEADLINE, || lines(&lb, "whole", &addr, &["backend is down"]) == 2).await;
}

#[tokio::test]
async fn grpc_health_check_over_tls_with_alpn_h2() {
    let dir = temp_path("grpc-tls");
    std::fs::create_dir_all(&dir).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned()]).unwrap().signed_by(&key, &issuer).unwrap();
    let (ca_file, cert_file, key_file) = (dir.join("ca.pem"), dir.join("leaf.pem"), dir.join("leaf.key"));
    std::fs::write(&ca_file, ca.pem()).unwrap();
    std::fs::write(&cert_file, leaf.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();

    let mut server = GrpcServer::start("tls", Some((&cert_file, &key_file)));
    server.command("not_serving");
    let addr = format!("https://{}", server.addr);
    let lb = Velocity::start(&format!(
        "listen: 127.0.0.1:0
access_log: off
services:
  - name: secure
    backend_protocol: h2
    health_check: {{type: grpc, {CHECK}}}
    backends:
      - address: {addr}
        tls: {{ca: {}, server_name: localhost}}
",
        ca_file.display()
    ))
    .await;
    // An answer read over TLS: the handshake, ALPN h2 and the certificate all worked.
    wait_for(&lb, "secure", &addr, &["backend is down", "reason=NOT_SERVING"]).await;
    server.command("serving");
    wait_for(&lb, "secure", &addr, &["backend is up", "reason=SERVING"]).await;
    // Calls take the same way: HTTP/2 over TLS to the backend.
    let answer = call(lb.addr(), "/velocity.test.Echo/Unary", &frame(b"over tls"), false).await;
    assert_eq!((answer.status, answer.header("backend")), (200, Some("tls")), "{answer:?}");
    assert_eq!(messages(&answer.body), ["over tls"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A gRPC message: uncompressed, length-prefixed.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The messages in a gRPC body.
fn messages(mut body: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    while body.len() >= 5 {
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        out.push(String::from_utf8_lossy(&body[5..5 + len]).into_owned());
        body = &body[5 + len..];
    }
    assert!(body.is_empty(), "a partial message is left: {body:?}");
    out
}

/// A response as an HTTP/1.1 client reads it: head fields, the body de-chunked, trailers.
#[derive(Debug)]
struct H1Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    trailers: Vec<(String, String)>,
}

impl H1Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().chain(&self.trailers).find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

fn fields(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect()
}

/// One gRPC call in HTTP/1.1 (what Velocity turns into an HTTP/2 stream): `POST path` with
/// `body`, chunked when `chunked`, on a connection of its own that closes after it.
async fn call(lb: SocketAddr, path: &str, body: &[u8], chunked: bool) -> H1Answer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(lb).await.unwrap();
    let framing =
        if chunked { "transfer-encoding: chunked".to_owned() } else { format!("content-length: {}", body.len()) };
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nhost: grpc.local\r\ncontent-type: application/grpc\r\nte: trailers\r\nconnection: close\r\n{framing}\r\n\r\n"
    )
    .into_bytes();
    if chunked {
        // Two chunks, so the body reaches the backend in more than one piece.
        let (a, b) = body.split_at(body.len() / 2);
        for part in [a, b] {
            req.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
            req.extend_from_slice(part);
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"0\r\n\r\n");
    } else {
        req.extend_from_slice(body);
    }
    tcp.write_all(&req).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut raw)).await.expect("an answer in time").unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head[9..12].parse().unwrap();
    let headers = fields(head.split_once("\r\n").map_or("", |(_, rest)| rest));
    let mut rest = &raw[split + 4..];
    let (mut body, mut trailers) = (Vec::new(), Vec::new());
    if headers.iter().any(|(n, v)| n == "transfer-encoding" && v == "chunked") {
        loop {
            let line_end = rest.windows(2).position(|w| w == b"\r\n").expect("a chunk size line");
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap(), 16).unwrap();
            rest = &rest[line_end + 2..];
            if size == 0 {
                trailers = fields(&String::from_utf8_lossy(rest));
                break;
            }
            body.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
    } else {
        body = rest.to_vec();
    }
    H1Answer { status, headers, body, trailers }
}

fn grpc_service(servers: &[&GrpcServer], extra: &str) -> String {
    let list: String = servers.iter().map(|s| format!("      - address: {}\n", s.addr)).collect();
    format!(
        "listen: 127.0.0.1:0
admin:
  listen: 127.0.0.1:0
services:
  - name: grpc
    backend_protocol: h2c
{extra}    backends:
{list}"
    )
}

#[tokio::test]
async fn grpc_calls_from_an_http1_client_reach_an_h2c_backend_with_their_trailers() {
    let server = GrpcServer::start("a", None);
    let lb = Velocity::start(&grpc_service(&[&server], "")).await;
    let addr = lb.addr();

    let unary = call(addr, "/velocity.test.Echo/Unary", &frame(b"hello"), false).await;
    assert_eq!(unary.status, 200, "{unary:?}");
    assert_eq!(unary.header("content-type"), Some("application/grpc"));
    assert_eq!(unary.header("backend"), Some("a"));
    assert_eq!(messages(&unary.body), ["hello"]);
    // The status is in the trailers, which an HTTP/1.1 client gets after the last chunk.
    assert_eq!(unary.trailers.iter().find(|(n, _)| n == "grpc-status").map(|(_, v)| v.as_str()), Some("0"));

    // A chunked upload goes out as DATA without its chunk framing.
    let chunked = call(addr, "/velocity.test.Echo/Unary", &frame(b"in two chunks"), true).await;
    assert_eq!(messages(&chunked.body), ["in two chunks"]);

    let stream = call(addr, "/velocity.test.Echo/Stream", &frame(b"3"), false).await;
    assert_eq!(messages(&stream.body), ["a 0", "a 1", "a 2"]);
    assert_eq!(stream.header("grpc-status"), Some("0"));

    let mut two = frame(b"one");
    two.extend_from_slice(&frame(b"two"));
    let bidi = call(addr, "/velocity.test.Echo/Bidi", &two, true).await;
    assert_eq!(messages(&bidi.body), ["one", "two"]);

    // An error status passes through, with its message.
    let fail = call(addr, "/velocity.test.Echo/Fail", &frame(b"x"), false).await;
    assert_eq!(fail.status, 200);
    assert_eq!(fail.header("grpc-status"), Some("3"), "{fail:?}");
    assert_eq!(fail.header("grpc-message"), Some("bad request from a"));
    let missing = call(addr, "/velocity.test.Echo/Nope", &frame(b"x"), false).await;
    assert_eq!(missing.header("grpc-status"), Some("12"), "{missing:?}");
}

async fn scrape(lb: &Velocity) -> String {
    let resp = get(lb.admin_addr().await, "localhost", "/metrics").await;
    assert_eq!(resp.status, 200);
    resp.body
}

fn opened(metrics: &str, server: &GrpcServer) -> u64 {
    let series = format!("velocity_backend_connections_opened_total{{service=\"grpc\",backend=\"{}\"}} ", server.addr);
    metrics.lines().find_map(|l| l.strip_prefix(&series)).map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn concurrent_calls_share_one_backend_connection() {
    let server = GrpcServer::start("a", None);
    let lb = Velocity::start(&grpc_service(&[&server], "")).await;
    let addr = lb.addr();
    let calls: Vec<_> = (0..40)
        .map(|i| {
            tokio::spawn(async move {
                let text = format!("call {i}");
                let answer = call(addr, "/velocity.test.Echo/Unary", &frame(text.as_bytes()), false).await;
                assert_eq!(messages(&answer.body), [text]);
                assert_eq!(answer.header("grpc-status"), Some("0"));
            })
        })
        .collect();
    for c in calls {
        c.await.unwrap();
    }
    // 40 client connections, 40 streams, one backend connection (grpcio allows 100 streams).
    assert_eq!(opened(&scrape(&lb).await, &server), 1);
}

#[tokio::test]
async fn a_lost_backend_connection_fails_over_to_the_next_backend() {
    let a = GrpcServer::start("a", None);
    let b = GrpcServer::start("b", None);
    let lb = Velocity::start(&grpc_service(&[&a, &b], "")).await;
    let addr = lb.addr();
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(
            call(addr, "/velocity.test.Echo/Unary", &frame(b"x"), false).await.header("backend").map(str::to_owned),
        );
    }
    assert!(seen.contains(&Some("a".into())) && seen.contains(&Some("b".into())), "{seen:?}");
    // Server a goes away with its connection open: that connection is lost, and the connect
    // that replaces it is refused. Nothing of those requests reached a, so they go to b.
    drop(a);
    for i in 0..10 {
        let answer = call(addr, "/velocity.test.Echo/Unary", &frame(b"after"), false).await;
        let warnings = || lb.log_lines().into_iter().filter(|l| l.contains("WARN")).collect::<Vec<_>>();
        assert_eq!(
            (answer.status, answer.header("backend")),
            (200, Some("b")),
            "call {i}: {answer:?}\n{:#?}",
            warnings()
        );
        assert_eq!(messages(&answer.body), ["after"]);
    }
}

/// Run `tests/grpc/client.py` against `target` for `case`; its JSON answer.
async fn grpc_client(target: SocketAddr, case: &str) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/grpc/client.py");
    let run = tokio::process::Command::new("python3")
        .arg(script)
        .arg(target.to_string())
        .arg(case)
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(DEADLINE * 2, run).await.expect("the client finishes").unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{case}: {text}\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{case}: {e}: {text}"))
}

#[tokio::test]
async fn a_grpc_client_over_h2c_through_velocity_to_grpc_servers() {
    let a = GrpcServer::start("a", None);
    let b = GrpcServer::start("b", None);
    let lb = Velocity::start(&grpc_service(&[&a, &b], "")).await;
    let addr = lb.addr();
    let unary = grpc_client(addr, "unary").await;
    assert_eq!(unary["reply"], "hello");
    let stream = grpc_client(addr, "stream").await;
    let replies: Vec<String> = serde_json::from_value(stream["replies"].clone()).unwrap();
    assert!(replies == ["a 0", "a 1", "a 2"] || replies == ["b 0", "b 1", "b 2"], "{replies:?}");
    // Each message goes out only when the one before was answered: both directions stream.
    let bidi = grpc_client(addr, "bidi").await;
    assert_eq!(bidi["replies"], serde_json::json!(["ping 0", "ping 1", "ping 2", "ping 3", "ping 4"]));
    let fail = grpc_client(addr, "fail").await;
    assert_eq!(fail["code"], "INVALID_ARGUMENT", "{fail}");
    assert!(fail["details"].as_str().is_some_and(|d| d.starts_with("bad request from")), "{fail}");
    // 60 calls on one client connection, spread over both backends, each backend's share
    // over its one connection.
    let many = grpc_client(addr, "many").await;
    assert_eq!((many["backends"]["a"].as_u64(), many["backends"]["b"].as_u64()), (Some(30), Some(30)), "{many}");
    let metrics = scrape(&lb).await;
    assert_eq!((opened(&metrics, &a), opened(&metrics, &b)), (1, 1), "{metrics}");
}
