//! Managed backends end to end: the real binary starts `velocity testserver` processes, admits
//! them, replaces a killed one, scales them with the load (KPA, short windows) and back with no
//! failed request, scales from zero for the first request, and stops them on shutdown.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::Request;
use serde_json::Value;

/// A first port with (probably) 20 free ones after it; the supervisor skips any that are not.
fn port_range() -> (u16, u16) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let p = l.local_addr().unwrap().port().min(65_000);
    (p, p + 19)
}

fn config(managed: &str) -> String {
    let (lo, hi) = port_range();
    let bin = env!("CARGO_BIN_EXE_velocity");
    format!(
        "listen: 127.0.0.1:0\nadmin: {{listen: 127.0.0.1:0}}\nshutdown: {{drain_timeout: 10s}}\nservices:\n  - name: web\n    retry: {{attempts: 0}}\n    managed:\n      command: [\"{bin}\", testserver, --listen, \"127.0.0.1:{{port}}\", --delay, 200ms]\n      ports: {lo}-{hi}\n{managed}"
    )
}

async fn managed(admin: SocketAddr) -> Value {
    let req = Request::builder()
        .uri("/api/v1/services/web")
        .header("host", admin.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let body = Client::connect(admin).await.send(req).await.body;
    let v: Value = serde_json::from_str(&body).unwrap();
    v["managed"].clone()
}

/// (pid, state) of every instance.
async fn instances(admin: SocketAddr) -> Vec<(u64, String)> {
    managed(admin).await["instances"]
        .as_array()
        .map(|a| a.iter().map(|i| (i["pid"].as_u64().unwrap(), i["state"].as_str().unwrap().to_owned())).collect())
        .unwrap_or_default()
}

async fn until_instances(admin: SocketAddr, what: &str, deadline: Duration, cond: impl Fn(&[(u64, String)]) -> bool) {
    let start = Instant::now();
    loop {
        let got = instances(admin).await;
        if cond(&got) {
            return;
        }
        assert!(start.elapsed() < deadline, "timed out waiting for {what}: {got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ready(list: &[(u64, String)]) -> usize {
    list.iter().filter(|(_, s)| s == "ready").count()
}

fn alive(pid: u64) -> bool {
    // Signal 0: whether the process exists (a zombie counts until reaped).
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// SIGTERM to Velocity, wait for it, and check that it stopped every instance.
async fn shut_down(mut v: Velocity, pids: &[u64]) {
    unsafe {
        libc::kill(v.pid() as i32, libc::SIGTERM);
    }
    let start = Instant::now();
    while v.child().try_wait().unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(20), "Velocity did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for pid in pids {
        assert!(!alive(*pid), "instance {pid} still runs after shutdown");
    }
    assert!(v.log_contains("instance(s) stopped"), "{:#?}", v.log_lines());
}

/// Clients in a loop until `stop`; failures (anything but 200) counted.
fn load(addr: SocketAddr, clients: usize, stop: Arc<AtomicBool>, ok: Arc<AtomicUsize>, failed: Arc<AtomicUsize>) {
    for _ in 0..clients {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            let mut c = Client::connect(addr).await;
            while !stop.load(Ordering::SeqCst) {
                match c.try_get("web", "/").await {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::SeqCst),
                    _ => failed.fetch_add(1, Ordering::SeqCst),
                };
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scales_up_under_slow_load_and_back_to_one_without_a_failed_request() {
    let v = Velocity::start(&config(
        "      min: 1\n      max: 5\n      target_in_flight: 2\n      stable_window: 2s\n      panic_window: 500ms\n      scale_down_delay: 300ms\n",
    ))
    .await;
    let admin = v.admin_addr().await;
    until_instances(admin, "the first instance", DEADLINE, |l| ready(l) == 1).await;
    assert_eq!(get(v.addr(), "web", "/").await.status, 200);

    // 16 clients on 200 ms answers: about 16 in flight, 8 instances wanted, 5 at most.
    let (stop, ok, failed) = (Arc::new(AtomicBool::new(false)), Arc::default(), Arc::new(AtomicUsize::new(0)));
    load(v.addr(), 16, stop.clone(), ok, failed.clone());
    until_instances(admin, "at least 4 ready instances", Duration::from_secs(20), |l| ready(l) >= 4).await;
    let peak = instances(admin).await;
    stop.store(true, Ordering::SeqCst);
    assert_eq!(failed.load(Ordering::SeqCst), 0, "failed requests while scaling up");
    assert!(v.log_contains("panic mode"), "{:#?}", v.log_lines());

    // Two clients keep going while the other instances drain and stop (about one request in
    // flight each when the last but one goes): nothing may fail, and retries are off, so only
    // the drain can make that so.
    let (stop, ok, failed) =
        (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    load(v.addr(), 2, stop.clone(), ok.clone(), failed.clone());
    until_instances(admin, "back to one instance", Duration::from_secs(30), |l| l.len() == 1 && ready(l) == 1).await;
    stop.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(failed.load(Ordering::SeqCst), 0, "failed requests during scale-in");
    assert!(ok.load(Ordering::SeqCst) > 5);
    assert!(v.log_contains("drained; SIGTERM"), "{:#?}", v.log_lines());
    for (pid, _) in &peak {
        let kept = instances(admin).await.iter().any(|(p, _)| p == pid);
        assert!(kept || !alive(*pid), "a scaled-in instance {pid} still runs");
    }
    let metrics = {
        let req = Request::builder().uri("/metrics").header("host", admin.to_string());
        Client::connect(admin).await.send(req.body(Full::new(Bytes::new())).unwrap()).await.body
    };
    assert!(metrics.contains("velocity_managed_instances{service=\"web\",state=\"ready\"} 1"), "{metrics}");
    assert!(metrics.contains("velocity_managed_desired_instances{service=\"web\"} 1"), "{metrics}");
    let pids: Vec<u64> = instances(admin).await.iter().map(|(p, _)| *p).collect();
    shut_down(v, &pids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_is_replaced() {
    let v = Velocity::start(&config("      min: 1\n      max: 1\n")).await;
    let admin = v.admin_addr().await;
    until_instances(admin, "the first instance", DEADLINE, |l| ready(l) == 1).await;
    let first = instances(admin).await[0].0;
    unsafe {
        libc::kill(first as i32, libc::SIGKILL);
    }
    until_instances(admin, "a replacement", DEADLINE, |l| ready(l) == 1 && l[0].0 != first).await;
    assert_eq!(get(v.addr(), "web", "/").await.status, 200);
    assert_eq!(managed(admin).await["restarts"], 1);
    assert!(v.log_contains("exited while ready"), "{:#?}", v.log_lines());
    let pids: Vec<u64> = instances(admin).await.iter().map(|(p, _)| *p).collect();
    shut_down(v, &pids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scales_from_zero_for_the_first_request_and_back() {
    let v = Velocity::start(&config(
        "      min: 0\n      max: 2\n      stable_window: 1s\n      panic_window: 200ms\n      scale_down_delay: 0s\n",
    ))
    .await;
    let admin = v.admin_addr().await;
    // Nothing runs until a request comes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(instances(admin).await.is_empty());
    let r = get(v.addr(), "web", "/").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(v.log_contains("desired 0 -> 1"), "{:#?}", v.log_lines());
    until_instances(admin, "scaled back to zero", Duration::from_secs(20), |l| l.is_empty()).await;
    shut_down(v, &[]).await;
}
