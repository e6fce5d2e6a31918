//! Issue 15, traffic policy end to end: trusted client addresses, rate limits, allow/deny
//! lists and the run-time deny list, with real backends, a real Velocity and real clients.
//! Addresses other than 127.0.0.x are given through `X-Forwarded-For` from a trusted peer
//! (the only way to be 2001:db8::5 on a test machine).

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;

fn config(top: &str, backend: &TestBackend, service_lines: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\naccess_log: off\nadmin:\n  listen: 127.0.0.1:0\n{top}services:\n  - name: web\n{service_lines}    backends:\n      - address: {}\n",
        backend.addr
    )
}

fn local(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// At twice the rate for 3 s, the accepted count is rate × seconds + burst (within 10%), each
/// refusal a 429 with the draft's headers, counted as rejected{reason="rate_limited"} and
/// costing the backend nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_accepts_rate_times_seconds_plus_burst_and_answers_429() {
    let b = TestBackend::start("b").await;
    let lb =
        Velocity::start(&config("", &b, "    rate_limits:\n      - {key: client_ip, rate: 20/s, burst: 10}\n")).await;
    let admin = lb.admin_addr().await;
    let mut c = Client::connect(lb.addr()).await;
    let (mut accepted, mut refused) = (0u32, 0u32);
    let mut tick = tokio::time::interval(Duration::from_millis(25));
    let start = Instant::now();
    let mut first_429 = None;
    while start.elapsed() < Duration::from_secs(3) {
        tick.tick().await;
        let r = c.get("web", "/").await;
        match r.status {
            200 => accepted += 1,
            429 => {
                refused += 1;
                first_429.get_or_insert(r);
            }
            other => panic!("unexpected status {other}"),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let expected = 20.0 * elapsed + 10.0;
    assert!(
        (f64::from(accepted) - expected).abs() <= 0.1 * expected,
        "accepted {accepted} in {elapsed:.2}s, expected about {expected:.0} (refused {refused})"
    );
    let r = first_429.expect("some requests were refused");
    assert_eq!(r.headers["ratelimit-limit"], "10");
    assert_eq!(r.headers["ratelimit-remaining"], "0");
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(r.headers["ratelimit-reset"], "1");
    assert_eq!(b.hits(), accepted as usize, "a limited request never reaches the backend");
    let m = scrape(admin).await;
    let series = r#"velocity_requests_rejected_total{service="web",reason="rate_limited"}"#;
    assert_eq!(metric(&m, series), Some(f64::from(refused)), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_limit_leaves_other_paths_and_methods_alone() {
    let b = TestBackend::start("b").await;
    let lines = "    rate_limits:\n      - {path_prefix: /login, methods: [POST], rate: 1/h, burst: 2}\n";
    let lb = Velocity::start(&config("", &b, lines)).await;
    let mut c = Client::connect(lb.addr()).await;
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(c.request("POST", "web", "/login", "").await.status);
        }
        v
    };
    assert_eq!(statuses, [200, 200, 429]);
    for _ in 0..5 {
        assert_eq!(c.get("web", "/login").await.status, 200, "GET /login is not limited");
        assert_eq!(c.request("POST", "web", "/other", "").await.status, 200, "POST /other is not limited");
    }
    assert_eq!(c.request("POST", "web", "/login/again", "").await.status, 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_per_header_key() {
    let b = TestBackend::start("b").await;
    let lines = "    rate_limits:\n      - {key: \"header:X-Api-Key\", rate: 1/h, burst: 2}\n";
    let lb = Velocity::start(&config("", &b, lines)).await;
    let mut c = Client::connect(lb.addr()).await;
    async fn three(c: &mut Client, key: &str) -> Vec<u16> {
        let mut v = Vec::new();
        for _ in 0..3 {
            let headers: &[(&str, &str)] = if key.is_empty() { &[] } else { &[("x-api-key", key)] };
            v.push(c.get_with("web", "/", headers).await.status);
        }
        v
    }
    assert_eq!(three(&mut c, "alpha").await, [200, 200, 429]);
    assert_eq!(three(&mut c, "beta").await, [200, 200, 429], "another key has its own bucket");
    // Without the header: one shared bucket, not a way around the limit.
    assert_eq!(three(&mut c, "").await, [200, 200, 429]);
}

/// The peer is the client unless it is a trusted proxy; a trusted proxy's X-Forwarded-For
/// names the client for the limits and the access log, and is still appended to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_peers_x_forwarded_for_is_ignored() {
    let b = TestBackend::start("b").await;
    let top = "trusted_proxies: [127.0.0.2]\n";
    let lines = "    rate_limits:\n      - {key: client_ip, rate: 1/h, burst: 1}\n";
    let yaml = config(top, &b, lines).replace("access_log: off", "access_log: stdout");
    let lb = Velocity::start(&yaml).await;
    let from = |peer: u8, xff: &'static str| {
        let addr = lb.addr();
        async move {
            let mut c = Client::connect_from(addr, local(peer)).await;
            c.get_with("web", "/", &[("x-forwarded-for", xff)]).await.status
        }
    };
    // 127.0.0.1 is not trusted: whatever it claims, it is one client.
    assert_eq!(from(1, "198.51.100.1").await, 200);
    assert_eq!(from(1, "198.51.100.2").await, 429, "an untrusted peer's X-Forwarded-For is ignored");
    // 127.0.0.2 is trusted: the address it forwards for is the client.
    assert_eq!(from(2, "203.0.113.1").await, 200);
    assert_eq!(from(2, "203.0.113.2").await, 200);
    assert_eq!(from(2, "203.0.113.1").await, 429);
    // The client can put anything on the left: the right-most untrusted address counts.
    assert_eq!(from(2, "203.0.113.99, 203.0.113.2").await, 429);
    let seen = b.seen.lock().unwrap().clone();
    let xff: Vec<String> = seen.iter().map(|s| s.headers["x-forwarded-for"].to_str().unwrap().to_owned()).collect();
    assert_eq!(xff[0], "198.51.100.1, 127.0.0.1");
    assert_eq!(xff[1], "203.0.113.1, 127.0.0.2", "the peer is appended as before");
    eventually("the access log names the forwarded client", DEADLINE, || lb.log_contains("203.0.113.2")).await;
}

/// v4, v6 and v4-mapped clients against allow and deny lists of a service: 403 when refused,
/// counted as rejected{reason="denied"}.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_and_deny_with_v4_v6_and_v4_mapped_addresses() {
    let b = TestBackend::start("b").await;
    let yaml = format!(
        "listen: 127.0.0.1:0
access_log: off
admin:
  listen: 127.0.0.1:0
trusted_proxies: [127.0.0.0/8]
services:
  - name: web
    hosts: [web]
    deny: [10.0.0.0/8, \"2001:db8::/32\", 192.0.2.7]
    backends: [{{address: {b}}}]
  - name: inner
    hosts: [inner]
    allow: [192.0.2.0/24, \"2001:db8:1::/48\"]
    deny: [192.0.2.66]
    backends: [{{address: {b}}}]
",
        b = b.addr
    );
    let lb = Velocity::start(&yaml).await;
    let status = |host: &'static str, client: &'static str| {
        let addr = lb.addr();
        async move {
            let mut c = Client::connect(addr).await;
            c.get_with(host, "/", &[("x-forwarded-for", client)]).await.status
        }
    };
    for (client, want) in [
        ("10.1.2.3", 403),
        ("::ffff:10.1.2.3", 403),
        ("2001:db8:5::1", 403),
        ("192.0.2.7", 403),
        ("::ffff:192.0.2.7", 403),
        ("192.0.2.8", 200),
        ("2001:db9::1", 200),
        ("11.0.0.1", 200),
    ] {
        assert_eq!(status("web", client).await, want, "web, client {client}");
    }
    for (client, want) in [
        ("192.0.2.9", 200),
        ("::ffff:192.0.2.9", 200),
        ("2001:db8:1::9", 200),
        ("2001:db8:2::9", 403),
        ("198.51.100.1", 403),
        ("192.0.2.66", 403),
    ] {
        assert_eq!(status("inner", client).await, want, "inner, client {client}");
    }
    let m = scrape(lb.admin_addr().await).await;
    assert_eq!(metric(&m, r#"velocity_requests_rejected_total{service="web",reason="denied"}"#), Some(5.0), "{m}");
}

/// The listener's own rules: 403 by default; with `deny_action: close`, the connection of a
/// denied peer is closed at accept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_deny_answers_403_or_closes_at_accept() {
    let b = TestBackend::start("b").await;
    let lb = Velocity::start(&config("deny: [127.0.0.3]\n", &b, "")).await;
    assert_eq!(Client::connect_from(lb.addr(), local(3)).await.get("web", "/").await.status, 403);
    assert_eq!(Client::connect_from(lb.addr(), local(4)).await.get("web", "/").await.status, 200);

    let lb = Velocity::start(&config("deny: [127.0.0.3]\ndeny_action: close\n", &b, "")).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(local(3), 0)).unwrap();
    let mut stream = socket.connect(lb.addr()).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n").await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut buf)).await.expect("closed in time");
    assert!(
        read.is_err() || buf.is_empty(),
        "no answer, the connection is closed: {:?}",
        String::from_utf8_lossy(&buf)
    );
    assert_eq!(Client::connect_from(lb.addr(), local(4)).await.get("web", "/").await.status, 200);
    let hits = b.hits();
    assert_eq!(hits, 2);
    let m = scrape(lb.admin_addr().await).await;
    assert_eq!(metric(&m, r#"velocity_requests_rejected_total{service="",reason="denied"}"#), Some(1.0), "{m}");
}

/// Whether a connection from `from` is closed without an answer to a request.
async fn closed_unanswered(addr: SocketAddr, from: IpAddr) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    // The write may already fail: the connection can be gone before it. `close`: an answer,
    // if one comes, ends the connection, so it is seen at once.
    let _ = stream.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n").await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut buf)).await.expect("closed in time");
    match read {
        Err(_) => Ok(()),
        Ok(_) if buf.is_empty() => Ok(()),
        Ok(_) => Err(String::from_utf8_lossy(&buf).into_owned()),
    }
}

/// A named listener's own `allow`/`deny`: they hold on that listener only (the other one,
/// without rules, serves the same clients), `deny` wins over `allow`, a client outside
/// `allow` is refused too, with 403 by default and by closing the connection at accept with
/// `deny_action: close`; either way the backend sees nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_listeners_allow_and_deny_rules_answer_403_or_close() {
    let b = TestBackend::start("b").await;
    for action in ["403", "close"] {
        let lb = Velocity::start(&format!(
            "access_log: off
admin:
  listen: 127.0.0.1:0
listeners:
  - name: open
    listen: 127.0.0.1:0
  - name: guarded
    listen: 127.0.0.1:0
    allow: [127.0.0.0/29]
    deny: [127.0.0.3]
    deny_action: {action}
services:
  - name: web
    backends: [{{address: {}}}]
",
            b.addr
        ))
        .await;
        let open = lb.listener_addr("open").await;
        let guarded = lb.listener_addr("guarded").await;
        let before = b.hits();
        // In `allow` and not in `deny`: served on both.
        for addr in [open, guarded] {
            assert_eq!(Client::connect_from(addr, local(4)).await.get("web", "/").await.status, 200, "{action}");
        }
        // Denied (127.0.0.3) and outside allow (127.0.0.9): refused on `guarded`, served on `open`.
        for client in [local(3), local(9)] {
            assert_eq!(Client::connect_from(open, client).await.get("web", "/").await.status, 200, "{action}");
            if action == "close" {
                let got = closed_unanswered(guarded, client).await;
                assert_eq!(got, Ok(()), "{client} on guarded: closed at accept, no answer");
            } else {
                let r = Client::connect_from(guarded, client).await.get("web", "/").await;
                assert_eq!(r.status, 403, "{client} on guarded");
            }
        }
        assert_eq!(b.hits() - before, 4, "{action}: the refused requests reached no backend");
        let m = scrape(lb.admin_addr().await).await;
        assert_eq!(
            metric(&m, r#"velocity_requests_rejected_total{service="",reason="denied"}"#),
            Some(2.0),
            "{action}: {m}"
        );
    }
}

/// One admin API call: (status, JSON body).
async fn api(admin: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    let mut req = hyper::Request::builder().method(method).uri(path).header("host", admin.to_string());
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let body = http_body_util::Full::new(bytes::Bytes::from(body.unwrap_or("").to_owned()));
    let resp = Client::connect(admin).await.send(req.body(body).unwrap()).await;
    (resp.status, serde_json::from_str(&resp.body).unwrap_or(serde_json::Value::Null))
}

/// The run-time deny list: an entry added through the API refuses the very next request (on
/// a connection that was already open), survives a reload and a restart (state file), and
/// removing it lets the client back in. Global and per-service lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_list_changed_through_the_api_takes_effect_on_the_next_request_and_survives_reload_and_restart() {
    let b = TestBackend::start("b").await;
    let state = temp_path("policy-overlay.json");
    let _ = std::fs::remove_file(&state);
    let yaml = format!(
        "listen: 127.0.0.1:0\naccess_log: off\nadmin:\n  listen: 127.0.0.1:0\n  state_file: {}\nservices:\n  - name: web\n    hosts: [web]\n    backends: [{{address: {b}}}]\n  - name: other\n    hosts: [other]\n    backends: [{{address: {b}}}]\n",
        state.display(),
        b = b.addr
    );
    let path = temp_path("policy-denylist.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let lb = Velocity::start_file(path.clone(), &[]).await;
    let admin = lb.admin_addr().await;
    let mut five = Client::connect_from(lb.addr(), local(5)).await;
    let mut six = Client::connect_from(lb.addr(), local(6)).await;
    assert_eq!(five.get("web", "/").await.status, 200);

    let (status, body) =
        api(admin, "POST", "/api/v1/denylist", Some(r#"{"cidrs": ["127.0.0.5", "2001:db8::/32"]}"#)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["denylist"], serde_json::json!(["127.0.0.5/32", "2001:db8::/32"]));
    assert_eq!(five.get("web", "/").await.status, 403, "the next request on the open connection");
    assert_eq!(five.get("other", "/").await.status, 403, "the global list covers every service");
    assert_eq!(six.get("web", "/").await.status, 200);

    let (status, body) = api(admin, "POST", "/api/v1/services/web/denylist", Some(r#"{"cidr": "127.0.0.6"}"#)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(six.get("web", "/").await.status, 403);
    assert_eq!(six.get("other", "/").await.status, 200, "a service's list is its own");
    let (_, body) = api(admin, "GET", "/api/v1/services/web/denylist", None).await;
    assert_eq!(body["denylist"], serde_json::json!(["127.0.0.6/32"]));

    let (status, body) = api(admin, "POST", "/api/v1/denylist", Some(r#"{"cidrs": ["not-an-address"]}"#)).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(api(admin, "POST", "/api/v1/services/nope/denylist", Some(r#"{"cidr": "1.2.3.4"}"#)).await.0, 404);

    let (status, _) = api(admin, "POST", "/api/v1/reload", None).await;
    assert_eq!(status, 200);
    assert_eq!(Client::connect_from(lb.addr(), local(5)).await.get("web", "/").await.status, 403, "after a reload");

    drop(lb);
    // Dropping the harness removed the config file.
    std::fs::write(&path, &yaml).unwrap();
    let lb = Velocity::start_file(path, &[]).await;
    let admin = lb.admin_addr().await;
    assert_eq!(Client::connect_from(lb.addr(), local(5)).await.get("other", "/").await.status, 403, "after a restart");
    assert_eq!(Client::connect_from(lb.addr(), local(6)).await.get("web", "/").await.status, 403, "after a restart");

    let (status, body) = api(admin, "DELETE", "/api/v1/denylist?cidr=127.0.0.5/32", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["denylist"], serde_json::json!(["2001:db8::/32"]));
    assert_eq!(Client::connect_from(lb.addr(), local(5)).await.get("web", "/").await.status, 200);
    let (status, body) = api(admin, "DELETE", "/api/v1/services/web/denylist", None).await;
    assert_eq!((status, body["denylist"].clone()), (200, serde_json::json!([])));
    assert_eq!(Client::connect_from(lb.addr(), local(6)).await.get("web", "/").await.status, 200);
    let _ = std::fs::remove_file(&state);
}
