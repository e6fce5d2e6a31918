//! Test harness: real backends on 127.0.0.1 ephemeral ports, a real `velocity` process, and a
//! real HTTP client. Readiness is polled with deadlines, never slept for.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1 as client_http1;
use hyper::header::HeaderValue;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

pub const DEADLINE: Duration = Duration::from_secs(10);

/// Poll `cond` until it holds or the deadline passes.
pub async fn eventually(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What a backend saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub headers: HeaderMap,
}

/// A real HTTP backend. Answers `NAME\n` with `X-Backend: NAME`; a path starting with `/slow`
/// waits for `slow` first; `/status/NNN` answers with that status; `/bytes/N` with N bytes;
/// `/reset` reads the request and closes the connection without an answer.
/// `/healthz` answers `health_status` (not counted in `hits` or `seen`).
pub struct TestBackend {
    pub name: String,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub connections: Arc<AtomicU64>,
    pub knobs: Arc<Knobs>,
    task: Option<tokio::task::JoinHandle<()>>,
    slow: Duration,
}

/// Switches a test flips on a running backend.
#[derive(Debug)]
pub struct Knobs {
    /// Status of `/healthz`.
    pub health_status: AtomicU16,
    /// Alternate `/healthz` between `health_status` and 500, starting with `health_status`.
    pub health_alternate: AtomicBool,
    /// `/healthz` requests served.
    pub health_checks: AtomicUsize,
    /// When not 0, every other request is answered with this status.
    pub fail_status: AtomicU16,
    /// Every request (but `/healthz`) waits this many milliseconds before its answer.
    pub delay_ms: AtomicU64,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            health_status: AtomicU16::new(200),
            health_alternate: AtomicBool::new(false),
            health_checks: AtomicUsize::new(0),
            fail_status: AtomicU16::new(0),
            delay_ms: AtomicU64::new(0),
        }
    }
}

impl TestBackend {
    pub async fn start(name: &str) -> TestBackend {
        Self::start_with(name, Duration::from_millis(500), None).await
    }

    pub async fn start_slow(name: &str, slow: Duration) -> TestBackend {
        Self::start_with(name, slow, None).await
    }

    /// Start on `addr` (to bring a killed backend back on its old port) or an ephemeral port.
    pub async fn start_with(name: &str, slow: Duration, addr: Option<SocketAddr>) -> TestBackend {
        let listener = bind_retry(addr.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap())).await;
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicU64::new(0));
        let knobs = Arc::new(Knobs::default());
        let task = tokio::spawn(serve(
            listener,
            name.to_string(),
            slow,
            hits.clone(),
            seen.clone(),
            connections.clone(),
            knobs.clone(),
        ));
        TestBackend { name: name.into(), addr, hits, seen, connections, knobs, task: Some(task), slow }
    }

    /// Set the status `/healthz` answers.
    pub fn set_health(&self, status: u16) {
        self.knobs.health_status.store(status, Ordering::SeqCst);
    }

    /// Answer every request (but `/healthz`) with `status`; 0 to serve normally again.
    pub fn set_fail_status(&self, status: u16) {
        self.knobs.fail_status.store(status, Ordering::SeqCst);
    }

    /// Make every request wait `delay` (a backend that turns slow); zero to answer at once.
    pub fn set_delay(&self, delay: Duration) {
        self.knobs.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn health_checks(&self) -> usize {
        self.knobs.health_checks.load(Ordering::SeqCst)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Stop listening and close every open connection: the backend is dead.
    pub fn kill(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Start again on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        let again = Self::start_with(&self.name, self.slow, Some(self.addr)).await;
        *self = again;
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn bind_retry(addr: SocketAddr) -> TcpListener {
    let start = Instant::now();
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) if start.elapsed() > DEADLINE => panic!("bind {addr}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn serve(
    listener: TcpListener,
    name: String,
    slow: Duration,
    hits: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicU64>,
    knobs: Arc<Knobs>,
) {
    // Connections live in this set, so aborting the server task closes them all.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                connections.fetch_add(1, Ordering::SeqCst);
                let (name, hits, seen, knobs) = (name.clone(), hits.clone(), seen.clone(), knobs.clone());
                conns.spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (name, hits, seen, knobs) = (name.clone(), hits.clone(), seen.clone(), knobs.clone());
                        async move {
                            if req.uri().path() == "/healthz" {
                                let n = knobs.health_checks.fetch_add(1, Ordering::SeqCst);
                                let mut status = knobs.health_status.load(Ordering::SeqCst);
                                if knobs.health_alternate.load(Ordering::SeqCst) && n % 2 == 1 {
                                    status = 500;
                                }
                                let mut resp = Response::new(Full::new(Bytes::from_static(b"health\n")));
                                *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
                                return Ok(resp);
                            }
                            hits.fetch_add(1, Ordering::SeqCst);
                            let path = req.uri().path().to_string();
                            seen.lock().unwrap().push(Seen { path: path.clone(), headers: req.headers().clone() });
                            let _ = req.into_body().collect().await;
                            if path.starts_with("/reset") {
                                // An error from the service makes hyper drop the connection.
                                return Err(std::io::Error::other("reset"));
                            }
                            if path.starts_with("/slow") {
                                tokio::time::sleep(slow).await;
                            }
                            let delay = knobs.delay_ms.load(Ordering::SeqCst);
                            if delay > 0 {
                                tokio::time::sleep(Duration::from_millis(delay)).await;
                            }
                            let mut resp = Response::new(Full::new(Bytes::from(format!("{name}\n"))));
                            if let Some(n) = path.strip_prefix("/bytes/").and_then(|n| n.parse::<usize>().ok()) {
                                *resp.body_mut() = Full::new(Bytes::from(vec![b'x'; n]));
                            }
                            if let Some(code) = path.strip_prefix("/status/").and_then(|c| c.parse::<u16>().ok()) {
                                *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
                            }
                            let fail = knobs.fail_status.load(Ordering::SeqCst);
                            if fail != 0 {
                                *resp.status_mut() = StatusCode::from_u16(fail).unwrap_or(StatusCode::OK);
                            }
                            resp.headers_mut().insert("x-backend", HeaderValue::from_str(&name).unwrap());
                            Ok::<_, std::io::Error>(resp)
                        }
                    });
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// A running `velocity run` process, killed on drop.
pub struct Velocity {
    child: Child,
    pub addrs: Vec<SocketAddr>,
    pub config_path: PathBuf,
    pub output: Arc<Mutex<Vec<String>>>,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub fn temp_path(name: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    std::env::temp_dir().join(format!("velocity-test-{}-{n}-{name}", std::process::id()))
}

impl Velocity {
    /// Start with this YAML. The listen address should be `127.0.0.1:0`; the real port is
    /// read from the log.
    pub async fn start(yaml: &str) -> Velocity {
        let path = temp_path("velocity.yaml");
        std::fs::write(&path, yaml).unwrap();
        Self::start_file(path, &[]).await
    }

    pub async fn start_file(config_path: PathBuf, extra_args: &[&str]) -> Velocity {
        Self::start_file_env(config_path, extra_args, &[]).await
    }

    /// Like `start_file`, with extra environment variables (such as the admin token).
    pub async fn start_file_env(config_path: PathBuf, extra_args: &[&str], env: &[(&str, &str)]) -> Velocity {
        Self::start_command(Command::new(env!("CARGO_BIN_EXE_velocity")), config_path, extra_args, env).await
    }

    /// Start with this YAML under open-file limits `soft` and `hard`: `sh` sets them and execs
    /// Velocity, so the pid is Velocity's.
    pub async fn start_with_nofile(yaml: &str, soft: u64, hard: u64) -> Velocity {
        let path = temp_path("velocity.yaml");
        std::fs::write(&path, yaml).unwrap();
        let mut sh = Command::new("sh");
        let limits = format!("ulimit -Sn {soft} && ulimit -Hn {hard} && exec \"$0\" \"$@\"");
        sh.arg("-c").arg(limits).arg(env!("CARGO_BIN_EXE_velocity"));
        Self::start_command(sh, path, &[], &[]).await
    }

    /// File descriptors the process has open (Linux: /proc).
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id())).map_or(0, |d| d.count())
    }

    async fn start_command(
        mut command: Command,
        config_path: PathBuf,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Velocity {
        let mut child = command
            .arg("run")
            .arg("-c")
            .arg(&config_path)
            .args(extra_args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn velocity");
        let output = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    output.lock().unwrap().push(line);
                }
            });
        }
        let mut v = Velocity { child, addrs: vec![], config_path, output };
        let start = Instant::now();
        loop {
            let addrs = v.listening();
            if !addrs.is_empty() {
                v.addrs = addrs;
                return v;
            }
            if let Ok(Some(status)) = v.child.try_wait() {
                panic!("velocity exited with {status}: {:#?}", v.output.lock().unwrap());
            }
            assert!(start.elapsed() < DEADLINE, "velocity did not start: {:#?}", v.output.lock().unwrap());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn listening(&self) -> Vec<SocketAddr> {
        self.output
            .lock()
            .unwrap()
            .iter()
            // The admin listener's line is `admin API listening on ...`: see `admin_addr`.
            .filter(|l| !l.contains("admin API listening"))
            .filter_map(|l| l.split("listening on http://").nth(1))
            .filter_map(addr_in)
            .map(|mut a| {
                // A wildcard listener is reached over loopback.
                if a.ip().is_unspecified() {
                    a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                a
            })
            .collect()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// The address of the named listener (`listeners:`), from its
    /// `listening on SCHEME://ADDR (listener NAME)` line; the last one, after reloads.
    pub async fn listener_addr(&self, name: &str) -> SocketAddr {
        let tag = format!("(listener {name})");
        let mut found = None;
        eventually(&format!("listener {name}"), DEADLINE, || {
            found = self.output.lock().unwrap().iter().rev().filter(|l| l.contains(&tag)).find_map(|l| {
                let rest = l.split("listening on ").nth(1)?.split("://").nth(1)?;
                addr_in(rest)
            });
            found.is_some()
        })
        .await;
        found.unwrap()
    }

    /// The admin API's address, from its `admin API listening on http://ADDR` line (which
    /// may come a moment after the proxy's).
    pub async fn admin_addr(&self) -> SocketAddr {
        let start = Instant::now();
        loop {
            let found = self
                .output
                .lock()
                .unwrap()
                .iter()
                .filter_map(|l| l.split("admin API listening on http://").nth(1))
                .find_map(addr_in);
            if let Some(a) = found {
                return a;
            }
            assert!(start.elapsed() < DEADLINE, "no admin API line: {:#?}", self.output.lock().unwrap());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.output.lock().unwrap().clone()
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.output.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for Velocity {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config_path);
    }
}

/// A response as the client saw it.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Resp {
    pub fn backend(&self) -> String {
        self.headers.get("x-backend").and_then(|v| v.to_str().ok()).unwrap_or("").to_string()
    }
}

/// An HTTP/1.1 client on one keep-alive connection.
pub struct Client {
    sender: client_http1::SendRequest<Full<Bytes>>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.expect("connect to velocity");
        Self::handshake(stream).await
    }

    /// Connect from a given local address (any of 127.0.0.0/8 works on Linux), so that a test
    /// can be many clients.
    pub async fn connect_from(addr: SocketAddr, local: std::net::IpAddr) -> Client {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(SocketAddr::new(local, 0)).expect("bind the client address");
        Self::handshake(socket.connect(addr).await.expect("connect to velocity")).await
    }

    async fn handshake(stream: TcpStream) -> Client {
        let (sender, conn) = client_http1::handshake(TokioIo::new(stream)).await.expect("handshake");
        tokio::spawn(conn);
        Client { sender }
    }

    /// A GET with extra headers.
    pub async fn get_with(&mut self, host: &str, path: &str, headers: &[(&str, &str)]) -> Resp {
        let mut req = Request::builder().uri(path).header("host", host);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        self.send(req.body(Full::new(Bytes::new())).unwrap()).await
    }

    pub async fn request(&mut self, method: &str, host: &str, path: &str, body: &str) -> Resp {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", host)
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        self.send(req).await
    }

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Resp {
        self.sender.ready().await.expect("connection ready");
        let resp = self.sender.send_request(req).await.expect("response");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Resp {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    /// Like `send`, but a transport error is returned instead of failing the test.
    pub async fn try_get(&mut self, host: &str, path: &str) -> Result<Resp, String> {
        try_get_on(&mut self.sender, host, path).await
    }

    pub async fn get(&mut self, host: &str, path: &str) -> Resp {
        self.request("GET", host, path, "").await
    }
}

/// A GET on any HTTP/1.1 connection (plain, TLS); a transport error is returned instead of
/// failing the test.
pub async fn try_get_on(
    sender: &mut client_http1::SendRequest<Full<Bytes>>,
    host: &str,
    path: &str,
) -> Result<Resp, String> {
    let req = Request::builder().uri(path).header("host", host).body(Full::new(Bytes::new())).unwrap();
    sender.ready().await.map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Resp {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// An address nothing listens on: connecting is refused.
pub fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Send `signal` (`-HUP`, `-TERM`, ...) to a process (a Velocity's `pid()`).
pub fn kill(pid: u32, signal: &str) {
    let status = Command::new("kill").args([signal, &pid.to_string()]).status().unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

/// `GET /metrics` on an admin listener (no token configured).
pub async fn scrape(admin: SocketAddr) -> String {
    let resp = get(admin, "localhost", "/metrics").await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(resp.headers["content-type"], "text/plain; version=0.0.4; charset=utf-8");
    resp.body
}

/// The value of the series written exactly as `series` (name and labels), if present.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' '))).map(|v| v.parse().unwrap())
}

#[track_caller]
pub fn assert_metric(text: &str, series: &str, expected: f64) {
    assert_eq!(metric(text, series), Some(expected), "{series} in\n{text}");
}

/// One GET on a fresh connection.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Resp {
    Client::connect(addr).await.get(host, path).await
}

/// Count responses by their `X-Backend`.
pub fn tally(resps: &[Resp]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in resps {
        *m.entry(r.backend()).or_insert(0) += 1;
    }
    m
}

/// The address at the start of `text`, also when the line is a JSON event (`...:8000"}`).
fn addr_in(text: &str) -> Option<SocketAddr> {
    text.trim().split(['"', ' ', '}']).next()?.parse().ok()
}
pub mod redis;
