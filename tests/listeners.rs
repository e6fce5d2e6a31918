//! `listeners:` end to end: several plain HTTP listeners, each with its own connection limit,
//! and what a reload does to them (issue 16).

mod common;

use std::time::Duration;

use common::*;

/// Replace the config file in one step, so a reader never sees half of it.
fn write_config(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_listener_serves_and_has_its_own_connection_limit() {
    let a = TestBackend::start("a").await;
    let lb = Velocity::start(&format!(
        "listen: 127.0.0.1:0\nlisteners:\n  - name: small\n    listen: 127.0.0.1:0\n    max_client_connections: 1\n  - name: big\n    listen: 127.0.0.1:0\nservices:\n  - name: web\n    backends: [{{address: {}}}]\n",
        a.addr
    ))
    .await;
    let small = lb.listener_addr("small").await;
    let big = lb.listener_addr("big").await;
    for addr in [lb.addr(), small, big] {
        assert_eq!(get(addr, "x", "/").await.backend(), "a");
    }
    // `small` is full with one connection open; the others still take new ones.
    let mut one = Client::connect(small).await;
    assert_eq!(one.get("x", "/").await.status, 200);
    let waiting = tokio::spawn(async move { get(small, "x", "/").await });
    let mut others = Vec::new();
    for addr in [big, big, lb.addr()] {
        let mut c = Client::connect(addr).await;
        assert_eq!(c.get("x", "/").await.status, 200);
        others.push(c);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "small's second connection was served at its limit");
    drop(one);
    let r = tokio::time::timeout(DEADLINE, waiting).await.expect("served once small has room").unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_listeners_by_address_closes_removed_and_opens_added() {
    let a = TestBackend::start("a").await;
    let service = format!("services:\n  - name: web\n    backends: [{{address: {}}}]\n", a.addr);
    let (kept_port, gone_port, new_port) = (free_port(), free_port(), free_port());
    let lb = Velocity::start(&format!(
        "listeners:\n  - {{name: kept, listen: 127.0.0.1:{kept_port}, max_client_connections: 1}}\n  - {{name: gone, listen: 127.0.0.1:{gone_port}}}\n{service}"
    ))
    .await;
    let kept = lb.listener_addr("kept").await;
    let gone = lb.listener_addr("gone").await;
    let mut open = Client::connect(kept).await;
    assert_eq!(open.get("x", "/").await.status, 200);
    // Renamed and with a higher limit, at the same address: the same socket, and the open
    // connection carries on.
    write_config(
        &lb.config_path,
        &format!(
            "listeners:\n  - {{name: renamed, listen: 127.0.0.1:{kept_port}, max_client_connections: 5}}\n  - {{name: new, listen: 127.0.0.1:{new_port}}}\n{service}"
        ),
    );
    kill(lb.pid(), "-HUP");
    eventually("the reload", DEADLINE, || lb.log_contains("reload ok (SIGHUP)")).await;
    assert!(lb.log_contains("1 opened, 1 closed"), "{:#?}", lb.log_lines());
    let new = lb.listener_addr("new").await;
    assert_eq!(get(new, "x", "/").await.status, 200);
    eventually("the removed listener closed", DEADLINE, || std::net::TcpStream::connect(gone).is_err()).await;
    assert_eq!(open.get("x", "/").await.status, 200, "the kept listener's connection survives");
    // The raised limit applies: a second connection is served while the first stays open.
    let second = tokio::time::timeout(DEADLINE, get(kept, "x", "/")).await.expect("the new limit applies");
    assert_eq!(second.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_to_a_port_in_use_is_rejected_whole() {
    let a = TestBackend::start("a").await;
    let service = format!("services:\n  - name: web\n    backends: [{{address: {}}}]\n", a.addr);
    let lb = Velocity::start(&format!("listen: 127.0.0.1:0\n{service}")).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    write_config(
        &lb.config_path,
        &format!("listen: 127.0.0.1:0\nlisteners:\n  - {{name: clash, listen: 127.0.0.1:{port}}}\n{service}"),
    );
    kill(lb.pid(), "-HUP");
    eventually("the rejection", DEADLINE, || lb.log_contains("reload rejected (SIGHUP)")).await;
    assert_eq!(get(lb.addr(), "x", "/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_https_answers_308_to_the_same_url_over_https() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = TestBackend::start("a").await;
    let lb = Velocity::start(&format!(
        "listen: 127.0.0.1:0\nlisteners:\n  - {{name: plain, listen: 127.0.0.1:0, redirect_https: true}}\nservices:\n  - name: web\n    backends: [{{address: {}}}]\n",
        a.addr
    ))
    .await;
    let plain = lb.listener_addr("plain").await;
    let mut s = tokio::net::TcpStream::connect(plain).await.unwrap();
    s.write_all(b"POST /a/b?c=1 HTTP/1.1\r\nHost: Web.Local:8080\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(DEADLINE, s.read_to_string(&mut out)).await.unwrap().unwrap();
    assert!(out.starts_with("HTTP/1.1 308 "), "{out}");
    assert!(out.to_ascii_lowercase().contains("\r\nlocation: https://web.local/a/b?c=1\r\n"), "{out}");
    assert_eq!(a.hits(), 0, "nothing reaches the backend");
    // The shorthand listener still proxies.
    assert_eq!(get(lb.addr(), "x", "/").await.backend(), "a");
}
