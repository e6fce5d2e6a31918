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
    let _ = std::fs::remove_dir_all(&dir);
}
