//! TLS termination end to end (issue 16): certificates made here with rcgen, a real rustls
//! client, the real binary.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::client::conn::http1 as client_http1;
use hyper::Request;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// A test CA that signs leaf certificates.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
    pem: String,
}

impl Ca {
    fn new() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { der: cert.der().clone(), pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// A leaf for `names`, written as `DIR/STEM.pem` and `DIR/STEM.key`; its DER.
    fn leaf(&self, dir: &Path, stem: &str, names: &[&str], not_after: Option<SystemTime>) -> CertificateDer<'static> {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        if let Some(t) = not_after {
            params.not_after = t.into();
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        write_atomic(&dir.join(format!("{stem}.pem")), &cert.pem());
        write_atomic(&dir.join(format!("{stem}.key")), &key.serialize_pem());
        cert.der().clone()
    }

    fn connector(&self) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        roots.add(self.der.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        TlsConnector::from(Arc::new(config))
    }
}

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = temp_path(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A TLS connection to `addr` with SNI `name` (none for an IP address).
async fn tls_connect(ca: &Ca, addr: SocketAddr, name: &str) -> Result<TlsStream<TcpStream>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
    ca.connector().connect(name, tcp).await.map_err(|e| e.to_string())
}

fn peer_cert(tls: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    tls.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned()
}

/// HTTP/1.1 over an established TLS connection.
async fn http(tls: TlsStream<TcpStream>) -> client_http1::SendRequest<Full<Bytes>> {
    let (sender, conn) = client_http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    sender
}

fn tls_config(dir: &Path, backend: SocketAddr, service_extra: &str) -> String {
    let d = dir.display();
    format!(
        "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
listeners:
  - name: public
    listen: 127.0.0.1:0
    tls:
      certificates:
        - {{cert: {d}/a.pem, key: {d}/a.key}}
        - {{cert: {d}/b.pem, key: {d}/b.key}}
services:
  - name: web
{service_extra}    backends: [{{address: {backend}}}]
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_is_chosen_by_sni_and_requests_are_marked_https() {
    let dir = temp_dir("sni");
    let ca = Ca::new();
    let a_der = ca.leaf(&dir, "a", &["a.test", "127.0.0.1"], None);
    let b_der = ca.leaf(&dir, "b", &["b.test", "*.b.test"], None);
    let backend = TestBackend::start("a").await;
    let lb =
        Velocity::start(&tls_config(&dir, backend.addr, "    algorithm: sticky\n    sticky: {base: round_robin}\n"))
            .await;
    let public = lb.listener_addr("public").await;
    assert!(lb.log_contains(&format!("listening on https://{public} (listener public)")));

    for (sni, want) in [("a.test", &a_der), ("b.test", &b_der), ("www.b.test", &b_der)] {
        let tls = tls_connect(&ca, public, sni).await.unwrap_or_else(|e| panic!("{sni}: {e}"));
        assert_eq!(&peer_cert(&tls), want, "{sni}");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    }
    // No SNI (an IP address): the first certificate.
    let tls = tls_connect(&ca, public, "127.0.0.1").await.unwrap();
    assert_eq!(peer_cert(&tls), a_der);
    // A name no certificate has: the first one, which the client then refuses.
    let err = tls_connect(&ca, public, "c.test").await.unwrap_err();
    assert!(err.contains("NotValidForName") || err.contains("not valid"), "{err}");

    let mut sender = http(tls_connect(&ca, public, "b.test").await.unwrap()).await;
    let r = try_get_on(&mut sender, "b.test", "/x").await.unwrap();
    assert_eq!((r.status, r.backend().as_str()), (200, "a"));
    let seen = backend.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen.headers.get("x-forwarded-proto").unwrap(), "https");
    // The sticky cookie set over TLS is `Secure`; over plain HTTP it is not.
    let cookie = r.headers.get("set-cookie").unwrap().to_str().unwrap();
    assert!(cookie.ends_with("; Secure"), "{cookie}");
    let plain = get(lb.addr(), "b.test", "/x").await;
    assert!(!plain.headers.get("set-cookie").unwrap().to_str().unwrap().contains("Secure"));
    let seen = backend.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen.headers.get("x-forwarded-proto").unwrap(), "http");
    // Keep-alive over TLS.
    for _ in 0..3 {
        assert_eq!(try_get_on(&mut sender, "b.test", "/").await.unwrap().status, 200);
    }

    let metrics = get(lb.admin_addr().await, "localhost", "/metrics").await.body;
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("velocity_tls_certificate_expiry_timestamp_seconds{listener=\"public\",name=\"b.test\"}")
        })
        .unwrap_or_else(|| panic!("{metrics}"));
    let at: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(at > now, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_not_finished_within_client_header_is_closed() {
    use tokio::io::AsyncReadExt;
    let dir = temp_dir("handshake");
    let ca = Ca::new();
    ca.leaf(&dir, "a", &["a.test"], None);
    ca.leaf(&dir, "b", &["b.test"], None);
    let backend = TestBackend::start("a").await;
    let text = tls_config(&dir, backend.addr, "").replace("admin:", "timeouts: {client_header: 300ms}\nadmin:");
    let lb = Velocity::start(&text).await;
    let public = lb.listener_addr("public").await;
    // Connect and say nothing: closed after client_header, not held.
    let mut silent = TcpStream::connect(public).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(DEADLINE, silent.read(&mut buf)).await.expect("closed by Velocity");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_the_file_of_a_bad_or_mismatched_key_and_warns_of_expiry() {
    let dir = temp_dir("check");
    let ca = Ca::new();
    ca.leaf(&dir, "a", &["a.test"], None);
    ca.leaf(&dir, "b", &["b.test"], None);
    let backend = TestBackend::start("a").await;
    let config = dir.join("velocity.yaml");
    let check = |text: &str| {
        std::fs::write(&config, text).unwrap();
        let out =
            std::process::Command::new(env!("CARGO_BIN_EXE_velocity")).arg("check").arg(&config).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let good = tls_config(&dir, backend.addr, "");
    let (code, stdout, stderr) = check(&good);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("listener public: https://127.0.0.1:0, 2 certificate(s)"), "{stdout}");
    assert!(!stderr.contains("warning"), "{stderr}");

    // b's certificate with a's key.
    let d = dir.display();
    let (code, _, stderr) = check(&good.replace(&format!("key: {d}/b.key"), &format!("key: {d}/a.key")));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&format!("key {d}/a.key does not belong to certificate {d}/b.pem")), "{stderr}");
    assert!(stderr.contains("velocity.yaml:9:"), "at the line of the pair: {stderr}");

    // A key file that is not a key, and a certificate that is missing.
    std::fs::write(dir.join("bad.key"), "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").unwrap();
    let (code, _, stderr) = check(&good.replace(&format!("key: {d}/b.key"), &format!("key: {d}/bad.key")));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&format!("key {d}/bad.key cannot be used")), "{stderr}");
    let (code, _, stderr) = check(&good.replace(&format!("cert: {d}/b.pem"), &format!("cert: {d}/missing.pem")));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&format!("cannot read certificate {d}/missing.pem")), "{stderr}");

    // Expiring in three days: a warning, and the check still passes.
    let soon = SystemTime::now() + Duration::from_secs(3 * 86_400 + 3600);
    ca.leaf(&dir, "b", &["b.test"], Some(soon));
    let (code, _, stderr) = check(&good);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!("warning: listener public: certificate {d}/b.pem (b.test) expires in 3 day(s)")),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_swaps_the_certificate_and_keeps_open_tls_connections() {
    let dir = temp_dir("reload");
    let ca = Ca::new();
    let old = ca.leaf(&dir, "a", &["a.test"], None);
    ca.leaf(&dir, "b", &["b.test"], None);
    let backend = TestBackend::start("a").await;
    let lb = Velocity::start(&tls_config(&dir, backend.addr, "")).await;
    let public = lb.listener_addr("public").await;
    let tls = tls_connect(&ca, public, "a.test").await.unwrap();
    assert_eq!(peer_cert(&tls), old);
    let mut kept = http(tls).await;
    assert_eq!(try_get_on(&mut kept, "a.test", "/").await.unwrap().status, 200);

    // A renewed certificate under the same file names.
    let new = ca.leaf(&dir, "a", &["a.test"], None);
    assert_ne!(new, old);
    kill(lb.pid(), "-HUP");
    eventually("the reload", DEADLINE, || lb.log_contains("reload ok (SIGHUP)")).await;
    assert_eq!(peer_cert(&tls_connect(&ca, public, "a.test").await.unwrap()), new, "new connections get the new one");
    for _ in 0..3 {
        let r = try_get_on(&mut kept, "a.test", "/").await.expect("the open connection survives the reload");
        assert_eq!(r.status, 200);
    }

    // A broken key at the next reload: rejected, the current certificate stays.
    std::fs::write(dir.join("a.key"), "not a key").unwrap();
    kill(lb.pid(), "-HUP");
    eventually("the rejection", DEADLINE, || lb.log_contains("reload rejected (SIGHUP)")).await;
    let named = format!("key {}/a.key holds no usable PEM private key", dir.display());
    eventually("the problem, naming the file", DEADLINE, || lb.log_contains(&named)).await;
    assert_eq!(peer_cert(&tls_connect(&ca, public, "a.test").await.unwrap()), new);
    assert_eq!(try_get_on(&mut kept, "a.test", "/").await.unwrap().status, 200);
}

/// An HTTPS backend: answers `NAME` with `X-Backend: NAME`, keeps connections alive, and
/// counts the TLS connections it accepted.
struct TlsBackend {
    addr: SocketAddr,
    connections: Arc<std::sync::atomic::AtomicUsize>,
}

impl TlsBackend {
    async fn start(ca: &Ca, dir: &Path, name: &'static str, names: &[&str]) -> TlsBackend {
        use hyper::service::service_fn;
        use rustls::pki_types::pem::PemObject;
        ca.leaf(dir, name, names, None);
        let chain =
            CertificateDer::pem_file_iter(dir.join(format!("{name}.pem"))).unwrap().map(Result::unwrap).collect();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(dir.join(format!("{name}.key"))).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = connections.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let acceptor = acceptor.clone();
                let count = count.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let service = service_fn(move |_req: Request<hyper::body::Incoming>| async move {
                        let resp = hyper::Response::builder()
                            .header("x-backend", name)
                            .body(http_body_util::Full::new(Bytes::from(format!("{name}\n"))))
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(resp)
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service).await;
                });
            }
        });
        TlsBackend { addr, connections }
    }
}

fn https_backend_config(backend: &TlsBackend, tls: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nservices:\n  - name: web\n    backends:\n      - address: https://{}\n{tls}",
        backend.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_backends_are_verified_against_the_configured_ca_and_kept_alive() {
    let dir = temp_dir("https-backend");
    let ca = Ca::new();
    std::fs::write(dir.join("ca.pem"), &ca.pem).unwrap();
    let backend = TlsBackend::start(&ca, &dir, "secure", &["backend.test"]).await;
    let tls = format!("        tls: {{ca: {}/ca.pem, server_name: backend.test}}\n", dir.display());
    let lb = Velocity::start(&https_backend_config(&backend, &tls)).await;
    let mut client = Client::connect(lb.addr()).await;
    for _ in 0..5 {
        let r = client.get("x", "/").await;
        assert_eq!((r.status, r.backend().as_str()), (200, "secure"), "{:#?}", lb.log_lines());
    }
    // One TLS connection to the backend carried all five requests (and a new client reuses it).
    assert_eq!(get(lb.addr(), "x", "/").await.status, 200);
    assert_eq!(backend.connections.load(std::sync::atomic::Ordering::SeqCst), 1);

    // The server name must match the certificate.
    let wrong = format!("        tls: {{ca: {}/ca.pem, server_name: other.test}}\n", dir.display());
    let lb = Velocity::start(&https_backend_config(&backend, &wrong)).await;
    assert_eq!(get(lb.addr(), "x", "/").await.status, 502);
    eventually("the handshake failure logged", DEADLINE, || lb.log_contains("TLS handshake failed")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_backend_is_checked_against_the_system_roots_unless_verification_is_skipped() {
    let dir = temp_dir("https-roots");
    let ca = Ca::new();
    let backend = TlsBackend::start(&ca, &dir, "lab", &["127.0.0.1"]).await;
    // The test CA is not among the system roots.
    let lb = Velocity::start(&https_backend_config(&backend, "")).await;
    assert_eq!(get(lb.addr(), "x", "/").await.status, 502);
    eventually("the handshake failure logged", DEADLINE, || lb.log_contains("TLS handshake failed")).await;

    let lb = Velocity::start(&https_backend_config(&backend, "        tls: {insecure_skip_verify: true}\n")).await;
    let r = get(lb.addr(), "x", "/").await;
    assert_eq!((r.status, r.backend().as_str()), (200, "lab"));
    assert!(lb.log_contains("insecure_skip_verify: the backend's certificate is not verified"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reloads_when_a_certificate_file_is_replaced() {
    let dir = temp_dir("watch");
    let ca = Ca::new();
    let old = ca.leaf(&dir, "a", &["a.test"], None);
    ca.leaf(&dir, "b", &["b.test"], None);
    let backend = TestBackend::start("a").await;
    let config = dir.join("velocity.yaml");
    std::fs::write(&config, tls_config(&dir, backend.addr, "")).unwrap();
    let lb = Velocity::start_file(config, &["--watch"]).await;
    let public = lb.listener_addr("public").await;
    assert_eq!(peer_cert(&tls_connect(&ca, public, "a.test").await.unwrap()), old);
    eventually("the watch", DEADLINE, || lb.log_contains("for changes")).await;
    // The YAML does not change; the certificate and key files do, one after the other: the
    // reload in between sees a mismatched pair and is rejected, the next one loads.
    let renewed = temp_dir("watch-renewed");
    let new = ca.leaf(&renewed, "a", &["a.test"], None);
    let copy = |f: &str| write_atomic(&dir.join(f), &std::fs::read_to_string(renewed.join(f)).unwrap());
    copy("a.pem");
    eventually("the mismatched pair rejected", DEADLINE, || lb.log_contains("reload rejected (file change)")).await;
    copy("a.key");
    let start = std::time::Instant::now();
    loop {
        if peer_cert(&tls_connect(&ca, public, "a.test").await.unwrap()) == new {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "the new certificate was not picked up: {:#?}", lb.log_lines());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(lb.log_contains("reload ok (file change)"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sent_with_the_last_handshake_message_is_served() {
    use std::io::{Read, Write};
    let dir = temp_dir("early");
    let ca = Ca::new();
    ca.leaf(&dir, "a", &["a.test"], None);
    ca.leaf(&dir, "b", &["b.test"], None);
    let backend = TestBackend::start("a").await;
    let lb = Velocity::start(&tls_config(&dir, backend.addr, "")).await;
    let public = lb.listener_addr("public").await;
    let mut roots = RootCertStore::empty();
    roots.add(ca.der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let answer = tokio::task::spawn_blocking(move || {
        let mut tls = rustls::ClientConnection::new(Arc::new(config), "a.test".try_into().unwrap()).unwrap();
        // Written before the handshake: rustls sends it right behind the client's Finished,
        // in the same write, so Velocity reads both at once.
        tls.writer().write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n").unwrap();
        let mut tcp = std::net::TcpStream::connect(public).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut stream = rustls::Stream::new(&mut tls, &mut tcp);
        let mut out = Vec::new();
        let _ = stream.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
}
