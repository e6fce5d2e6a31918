//! TCP (L4) mode and the PROXY protocol end to end: real TCP backends and clients on
//! 127.0.0.1 with a real `velocity` process between them.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use common::{assert_metric, dead_addr, eventually, kill, metric, scrape, TestBackend, Velocity, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use velocity::proxy_protocol::{self as pp, Header, Parsed};

/// A TCP echo server: echoes every byte; when the client half-closes, writes `NAME:N\n` (N:
/// the bytes it got) and closes. With `expect_proxy`, each connection must start with a PROXY
/// header, which is recorded (and not echoed).
struct EchoBackend {
    name: &'static str,
    addr: SocketAddr,
    headers: Arc<Mutex<Vec<Header>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl EchoBackend {
    async fn start(name: &'static str, expect_proxy: bool) -> EchoBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let headers = Arc::new(Mutex::new(Vec::new()));
        let seen = headers.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else { return };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let mut have = 0;
                    if expect_proxy {
                        loop {
                            let n = s.read(&mut buf[have..]).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            have += n;
                            match pp::parse(&buf[..have]) {
                                Ok(Parsed::Done(h, len)) => {
                                    seen.lock().unwrap().push(h);
                                    buf.copy_within(len..have, 0);
                                    have -= len;
                                    break;
                                }
                                Ok(Parsed::Incomplete) => {}
                                Err(_) => return,
                            }
                        }
                    }
                    let mut total = have;
                    if have > 0 && s.write_all(&buf[..have]).await.is_err() {
                        return;
                    }
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) => break,
                            Ok(n) => {
                                total += n;
                                if s.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                            Err(_) => return,
                        }
                    }
                    // After the client's half-close: the answer still goes out.
                    let _ = s.write_all(format!("{name}:{total}\n").as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        EchoBackend { name, addr, headers, task: Some(task) }
    }

    /// Stop listening: connects are refused.
    fn kill(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.kill();
    }
}

fn config(backends: &[SocketAddr], listener_extra: &str, service_extra: &str) -> String {
    let list: String = backends.iter().map(|a| format!("      - address: {a}\n")).collect();
    format!(
        "listen: 127.0.0.1:0\naccess_log: stdout\nlisteners:\n  - name: echo\n    listen: 127.0.0.1:0\n    protocol: tcp\n    service: echo\n{listener_extra}services:\n  - name: echo\n{service_extra}    backends:\n{list}"
    )
}

/// Echo backends named `names` behind a Velocity whose tcp listener `echo` forwards to them
/// ([`config`]'s extras); the backends, the Velocity and the listener's address.
async fn echo_service(
    names: &[&'static str],
    expect_proxy: bool,
    listener_extra: &str,
    service_extra: &str,
) -> (Vec<EchoBackend>, Velocity, SocketAddr) {
    let mut backends = Vec::new();
    for name in names {
        backends.push(EchoBackend::start(name, expect_proxy).await);
    }
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let lb = Velocity::start(&config(&addrs, listener_extra, service_extra)).await;
    let echo = lb.listener_addr("echo").await;
    (backends, lb, echo)
}

/// One echo exchange with a half-close: `hello`, its echo, `world`, then the client's FIN;
/// the echo of `world` and the server's `NAME:10` line come after it. Returns the name.
async fn echo_once(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    tokio::time::timeout(DEADLINE, async {
        s.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        s.write_all(b"world").await.unwrap();
        s.shutdown().await.unwrap();
        let mut rest = String::new();
        s.read_to_string(&mut rest).await.unwrap();
        let name = rest.strip_prefix("world").unwrap_or_else(|| panic!("{rest:?}"));
        let name = name.strip_suffix(":10\n").unwrap_or_else(|| panic!("{rest:?}"));
        name.to_owned()
    })
    .await
    .expect("the echo exchange in time")
}

#[tokio::test]
async fn tcp_echo_round_robin_over_three_backends_with_half_close() {
    let (backends, lb, echo) = echo_service(&["t1", "t2", "t3"], false, "", "").await;
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let mut tally: HashMap<String, usize> = HashMap::new();
    let mut order = Vec::new();
    for _ in 0..6 {
        let name = echo_once(echo).await;
        order.push(name.clone());
        *tally.entry(name).or_default() += 1;
    }
    for b in &backends {
        assert_eq!(tally.get(b.name), Some(&2), "{order:?}");
    }
    // Round robin: no backend twice in a row.
    assert!(order.windows(2).all(|w| w[0] != w[1]), "{order:?}");
    // One access-log line per connection: listener, backend, bytes each way.
    eventually("six tcp lines", DEADLINE, || lb.log_lines().iter().filter(|l| l.contains(" TCP echo - ")).count() == 6)
        .await;
    let line = lb.log_lines().into_iter().find(|l| l.contains(" TCP echo - ")).unwrap();
    // 10 bytes up; 10 echoed plus `tN:10\n` down.
    assert!(line.contains(" 16B in:10B"), "{line}");
    assert!(line.contains(&addrs[0].to_string()) || addrs.iter().any(|a| line.contains(&a.to_string())), "{line}");
}

#[tokio::test]
async fn a_tcp_service_takes_no_http_route() {
    let echo_backend = EchoBackend::start("t1", false).await;
    let web = TestBackend::start("web").await;
    // Both services without hosts: the tcp one is no HTTP route, so they do not clash.
    let lb = Velocity::start(&format!(
        "listen: 127.0.0.1:0\nlisteners:\n  - name: echo\n    listen: 127.0.0.1:0\n    protocol: tcp\n    service: echo\nservices:\n  - name: echo\n    backends: [{{address: {}}}]\n  - name: web\n    backends: [{{address: {}}}]\n",
        echo_backend.addr, web.addr
    ))
    .await;
    for _ in 0..3 {
        assert_eq!(common::get(lb.addr(), "x", "/").await.backend(), "web");
    }
    assert_eq!(echo_once(lb.listener_addr("echo").await).await, "t1");
}

#[tokio::test]
async fn a_killed_tcp_backend_is_skipped() {
    let (mut backends, lb, echo) = echo_service(&["t1", "t2", "t3"], false, "", "").await;
    backends[1].kill();
    let mut names = Vec::new();
    for _ in 0..9 {
        names.push(echo_once(echo).await);
    }
    assert!(names.iter().all(|n| n != "t2"), "{names:?}");
    assert!(names.iter().any(|n| n == "t1") && names.iter().any(|n| n == "t3"), "{names:?}");
    assert!(lb.log_contains("backend unavailable, trying the next one"));
}

#[tokio::test]
async fn proxy_v2_and_v1_are_sent_to_backends_that_check_them() {
    for (version, extra) in [("v2", "    proxy_protocol: v2\n"), ("v1", "    proxy_protocol: v1\n")] {
        let (backends, _lb, echo) = echo_service(&["p1"], true, extra, "").await;
        let mut s = TcpStream::connect(echo).await.unwrap();
        let me = s.local_addr().unwrap();
        s.write_all(b"ping").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = String::new();
        tokio::time::timeout(DEADLINE, s.read_to_string(&mut got)).await.unwrap().unwrap();
        // The header is not part of the stream the backend echoes.
        assert_eq!(got, "pingp1:4\n", "{version}");
        let headers = backends[0].headers.lock().unwrap().clone();
        assert_eq!(headers, vec![Header::Proxy { source: me, destination: echo }], "{version}");
    }
}

/// An HTTP request on a raw connection, after `prefix`; the answer, or "" when the connection
/// closed without one.
async fn http_after(addr: SocketAddr, prefix: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(prefix).await;
    let _ = s.write_all(b"GET /who HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut got)).await.expect("an answer or a close in time");
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn proxy_v1_and_v2_parsed_from_a_trusted_peer_and_refused_from_another() {
    let backend = TestBackend::start("b1").await;
    let lb = Velocity::start(&format!(
        "listen: 127.0.0.1:0\naccess_log: stdout\nlisteners:\n  - name: trusted\n    listen: 127.0.0.1:0\n    accept_proxy_protocol: [127.0.0.0/8]\n  - name: other\n    listen: 127.0.0.1:0\n    accept_proxy_protocol: [10.0.0.0/8]\nservices:\n  - name: web\n    backends: [{{address: {}}}]\n",
        backend.addr
    ))
    .await;
    let trusted = lb.listener_addr("trusted").await;
    let other = lb.listener_addr("other").await;
    let v1 = b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 80\r\n".to_vec();
    let v2 = pp::encode_v2("[2001:db8::9]:40000".parse().unwrap(), "[2001:db8::1]:80".parse().unwrap());
    for (header, ip) in [(&v1, "203.0.113.7"), (&v2, "2001:db8::9")] {
        let resp = http_after(trusted, header).await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        let seen = backend.seen.lock().unwrap().last().cloned().unwrap();
        assert_eq!(seen.headers.get("x-forwarded-for").unwrap(), ip);
        // The access log names the carried client.
        eventually("the log line", DEADLINE, || {
            lb.log_lines().iter().any(|l| l.contains(&format!(" {ip} GET x /who 200")))
        })
        .await;
    }
    // A trusted peer must send the header.
    assert_eq!(http_after(trusted, b"").await, "");
    // Another peer may not: the connection closes without an answer.
    let hits = backend.hits();
    assert_eq!(http_after(other, &v1).await, "");
    assert_eq!(http_after(other, &v2).await, "");
    eventually("the refusal", DEADLINE, || {
        lb.log_contains("PROXY protocol header from a peer not in accept_proxy_protocol")
    })
    .await;
    assert_eq!(backend.hits(), hits);
    // Without a header that peer is served as usual, under its own address.
    let resp = http_after(other, b"").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert_eq!(backend.seen.lock().unwrap().last().unwrap().headers.get("x-forwarded-for").unwrap(), "127.0.0.1");
}

#[tokio::test]
async fn a_tcp_listener_carries_a_trusted_address_on_and_refuses_an_untrusted_header() {
    let extra = "    proxy_protocol: v2\n    accept_proxy_protocol: [127.0.0.1/32]\n";
    let (backends, lb, echo) = echo_service(&["p1"], true, extra, "").await;
    let client: SocketAddr = "198.51.100.4:1234".parse().unwrap();
    let dest: SocketAddr = "198.51.100.1:5432".parse().unwrap();
    let mut s = TcpStream::connect(echo).await.unwrap();
    s.write_all(&pp::encode_v1(client, dest)).await.unwrap();
    s.write_all(b"abc").await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = String::new();
    tokio::time::timeout(DEADLINE, s.read_to_string(&mut got)).await.unwrap().unwrap();
    assert_eq!(got, "abcp1:3\n");
    assert_eq!(backends[0].headers.lock().unwrap().clone(), vec![Header::Proxy { source: client, destination: dest }]);

    // Not trusted (the list names another network): a header closes the connection before
    // anything reaches the backend.
    drop(lb);
    let extra = "    accept_proxy_protocol: [10.0.0.0/8]\n";
    let (_plain, lb, echo) = echo_service(&["p2"], false, extra, "").await;
    let mut s = TcpStream::connect(echo).await.unwrap();
    s.write_all(&pp::encode_v2(client, dest)).await.unwrap();
    s.write_all(b"abc").await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut got)).await.expect("closed in time");
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    eventually("the refusal", DEADLINE, || {
        lb.log_contains("PROXY protocol header from a peer not in accept_proxy_protocol")
    })
    .await;
    // Without a header that peer is served.
    assert_eq!(echo_once(echo).await, "p2");
}

#[tokio::test]
async fn a_tcp_connection_counts_in_flight_for_least_connections() {
    let (_backends, _lb, echo) = echo_service(&["l1", "l2"], false, "", "    algorithm: least_connections\n").await;
    // Hold one connection open on whichever backend it went to.
    let mut held = TcpStream::connect(echo).await.unwrap();
    let mut one = [0u8; 1];
    held.write_all(b"y").await.unwrap();
    tokio::time::timeout(DEADLINE, held.read_exact(&mut one)).await.unwrap().unwrap();
    // While it is open, every other connection goes to the other backend.
    let mut names = Vec::new();
    for _ in 0..4 {
        names.push(echo_once(echo).await);
    }
    assert!(names.windows(2).all(|w| w[0] == w[1]), "{names:?}");
    // Closed, it no longer counts: the next connections alternate again.
    held.shutdown().await.unwrap();
    let mut rest = String::new();
    tokio::time::timeout(DEADLINE, held.read_to_string(&mut rest)).await.unwrap().unwrap();
    let held_on = rest.trim_end().split(':').next().unwrap().to_owned();
    assert!(names.iter().all(|n| *n != held_on), "{names:?} {held_on}");
}

/// One byte there and back on an open connection.
async fn ping(s: &mut TcpStream, b: u8) {
    s.write_all(&[b]).await.unwrap();
    let mut one = [0u8; 1];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut one)).await.expect("echo in time").unwrap();
    assert_eq!(one[0], b);
}

#[tokio::test]
async fn a_tcp_connection_survives_a_reload_and_drains_at_shutdown() {
    let backend = EchoBackend::start("t1", false).await;
    let path = common::temp_path("velocity.yaml");
    std::fs::write(&path, config(&[backend.addr], "", "")).unwrap();
    let mut lb = Velocity::start_file(path.clone(), &[]).await;
    let echo = lb.listener_addr("echo").await;
    let mut s = TcpStream::connect(echo).await.unwrap();
    ping(&mut s, b'a').await;
    std::fs::write(
        &path,
        config(&[backend.addr], "", "    timeouts: {connect: 1s}\n") + "shutdown: {drain_timeout: 1s}\n",
    )
    .unwrap();
    kill(lb.pid(), "-HUP");
    eventually("the reload", DEADLINE, || lb.log_contains("reload ok (SIGHUP)")).await;
    ping(&mut s, b'b').await;
    kill(lb.pid(), "-TERM");
    eventually("shutdown to start", DEADLINE, || lb.log_contains("shutdown (SIGTERM)")).await;
    ping(&mut s, b'c').await;
    // Cut at drain_timeout: the connection closes (the backend's line never comes, as the
    // client never half-closed).
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut rest)).await.expect("closed at drain_timeout");
    assert!(rest.is_empty(), "{rest:?}");
    eventually("the cut", DEADLINE, || lb.log_contains("drain_timeout passed with a tcp connection open")).await;
    let start = std::time::Instant::now();
    while lb.child().try_wait().unwrap().is_none() {
        assert!(start.elapsed() < DEADLINE, "velocity did not exit");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The tcp-mode series of service `echo` and its backend `b`, read from one scrape.
fn tcp_series(text: &str, b: SocketAddr) -> [Option<f64>; 8] {
    let s = r#"service="echo""#;
    let sb = format!(r#"service="echo",backend="{b}""#);
    [
        metric(text, &format!("velocity_tcp_connections_total{{{s}}}")),
        metric(text, &format!("velocity_tcp_connections_active{{{s}}}")),
        metric(text, &format!("velocity_tcp_bytes_in_total{{{s}}}")),
        metric(text, &format!("velocity_tcp_bytes_out_total{{{s}}}")),
        metric(text, &format!("velocity_backend_tcp_connections_total{{{sb}}}")),
        metric(text, &format!("velocity_backend_tcp_connections_active{{{sb}}}")),
        metric(text, &format!("velocity_backend_tcp_bytes_in_total{{{sb}}}")),
        metric(text, &format!("velocity_backend_tcp_bytes_out_total{{{sb}}}")),
    ]
}

#[tokio::test]
async fn tcp_connections_bytes_and_connect_failures_are_in_the_metrics() {
    let mut backend = EchoBackend::start("m1", false).await;
    let dead = dead_addr();
    let yaml = format!("admin: {{listen: 127.0.0.1:0}}\n{}", config(&[dead, backend.addr], "", ""));
    let lb = Velocity::start(&yaml).await;
    let admin = lb.admin_addr().await;
    let echo = lb.listener_addr("echo").await;
    // One connection held open (1 byte each way so far), two whole exchanges (10 bytes up,
    // 16 down each); the dead backend is tried and skipped on the way.
    let mut held = TcpStream::connect(echo).await.unwrap();
    ping(&mut held, b'x').await;
    for _ in 0..2 {
        assert_eq!(echo_once(echo).await, "m1");
    }
    // Bytes count as they move and the two closed connections end a moment after the client
    // saw their end: poll.
    let expected = [3.0, 1.0, 21.0, 33.0, 3.0, 1.0, 21.0, 33.0].map(Some);
    let start = std::time::Instant::now();
    let text = loop {
        let text = scrape(admin).await;
        if tcp_series(&text, backend.addr) == expected {
            break text;
        }
        assert!(start.elapsed() < DEADLINE, "{:?} in\n{text}", tcp_series(&text, backend.addr));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let errors =
        metric(&text, &format!(r#"velocity_backend_connection_errors_total{{service="echo",backend="{dead}"}}"#));
    assert!(errors.is_some_and(|n| n >= 1.0), "{text}");
    assert_metric(&text, &format!(r#"velocity_backend_tcp_connections_total{{service="echo",backend="{dead}"}}"#), 0.0);
    // A failure series appears at its first count.
    assert!(!text.lines().any(|l| l.starts_with("velocity_tcp_connections_failed_total{")), "{text}");

    // Both backends refuse: the connection closes, counted by its reason before the close.
    backend.kill();
    // The aborted task's listener closes a moment later (until then the kernel still accepts).
    let m1 = backend.addr;
    eventually("the backend to refuse", DEADLINE, || std::net::TcpStream::connect(m1).is_err()).await;
    let mut s = TcpStream::connect(echo).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut got)).await.expect("closed in time");
    assert!(got.is_empty(), "{got:?}");
    let text = scrape(admin).await;
    assert_metric(&text, r#"velocity_tcp_connections_failed_total{service="echo",reason="no_backend"}"#, 1.0);
    assert_metric(&text, r#"velocity_tcp_connections_total{service="echo"}"#, 4.0);
    // The held connection (served by a task the kill left running) is still open.
    assert_metric(&text, r#"velocity_tcp_connections_active{service="echo"}"#, 1.0);
    ping(&mut held, b'y').await;
}
