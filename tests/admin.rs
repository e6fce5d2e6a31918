//! The admin API and live membership, end to end: a real `velocity` process, real backends,
//! real HTTP clients; every answer is read back from the API or seen by a client.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{eventually, kill, temp_path, Client, TestBackend, Velocity, DEADLINE};
use http_body_util::Full;
use hyper::Request;
use serde_json::Value;

const TOKEN: &str = "s3cret-token";

/// One admin API call on a fresh connection: (status, JSON body).
async fn api(admin: SocketAddr, method: &str, path: &str, body: Option<&str>, token: Option<&str>) -> (u16, Value) {
    let mut req = Request::builder().method(method).uri(path).header("host", admin.to_string());
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req.body(Full::new(Bytes::from(body.unwrap_or("").to_owned()))).unwrap();
    let resp = Client::connect(admin).await.send(req).await;
    let value = serde_json::from_str(&resp.body).unwrap_or(Value::String(resp.body.clone()));
    (resp.status, value)
}

/// With the test token.
async fn call(admin: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    api(admin, method, path, body, Some(TOKEN)).await
}

/// The services as the API shows them, without the counters that traffic moves.
async fn membership(admin: SocketAddr) -> Value {
    let (status, mut v) = call(admin, "GET", "/api/v1/services", None).await;
    assert_eq!(status, 200, "{v}");
    for s in v["services"].as_array_mut().unwrap() {
        for b in s["backends"].as_array_mut().unwrap() {
            let b = b.as_object_mut().unwrap();
            for k in ["in_flight", "requests_total", "connections_opened", "health"] {
                b.remove(k);
            }
        }
    }
    v
}

fn backend<'a>(v: &'a Value, service: &str, address: &str) -> Option<&'a Value> {
    v["services"].as_array()?.iter().find(|s| s["name"] == service)?["backends"]
        .as_array()?
        .iter()
        .find(|b| b["address"] == address)
}

fn admin_config(extra_admin: &str, services: &str) -> String {
    format!("listen: 127.0.0.1:0\nadmin:\n  listen: 127.0.0.1:0\n  token_env: VELOCITY_TEST_TOKEN\n{extra_admin}services:\n{services}")
}

fn web(backends: &[&TestBackend], extra: &str) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("      - address: {}\n", b.addr)).collect();
    format!("  - name: web\n{extra}    backends:\n{}", list.concat())
}

async fn start(yaml: &str) -> (Velocity, SocketAddr) {
    let path = temp_path("admin.yaml");
    std::fs::write(&path, yaml).unwrap();
    start_path(path).await
}

async fn start_path(path: std::path::PathBuf) -> (Velocity, SocketAddr) {
    let lb = Velocity::start_file_env(path, &[], &[("VELOCITY_TEST_TOKEN", TOKEN)]).await;
    let admin = lb.admin_addr().await;
    (lb, admin)
}

/// Clients sending GETs in a loop until stopped; every answer that is not a 200 is a failure.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<Mutex<Vec<String>>>,
    seen: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, clients: usize, path: &'static str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, ok, failed, seen) = (stop.clone(), ok.clone(), failed.clone(), seen.clone());
                tokio::spawn(async move {
                    let mut client = Client::connect(addr).await;
                    while !stop.load(Ordering::SeqCst) {
                        match client.try_get("web.local", path).await {
                            Ok(r) if r.status == 200 => {
                                ok.fetch_add(1, Ordering::SeqCst);
                                seen.lock().unwrap().push(r.backend());
                            }
                            Ok(r) => failed.lock().unwrap().push(format!("{} {}", r.status, r.body)),
                            Err(e) => {
                                failed.lock().unwrap().push(e);
                                client = Client::connect(addr).await;
                            }
                        }
                    }
                })
            })
            .collect();
        Load { stop, ok, failed, seen, tasks }
    }

    fn served_by(&self, name: &str) -> usize {
        self.seen.lock().unwrap().iter().filter(|n| *n == name).count()
    }

    /// Stop the load; no request of it may have failed.
    async fn stop_without_failures(self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        let (ok, failed) = (self.ok.load(Ordering::SeqCst), self.failed.lock().unwrap().clone());
        assert!(
            failed.is_empty(),
            "{} failed of {}: {:?}",
            failed.len(),
            ok + failed.len(),
            &failed[..failed.len().min(5)]
        );
    }
}

#[tokio::test]
async fn the_token_is_required_and_compared() {
    let a = TestBackend::start("a").await;
    let (_lb, admin) = start(&admin_config("", &web(&[&a], ""))).await;
    let (status, body) = api(admin, "GET", "/api/v1/services", None, None).await;
    assert_eq!((status, body["field"].as_str()), (401, Some("authorization")), "{body}");
    assert_eq!(body["error"], "missing bearer token");
    let (status, body) = api(admin, "GET", "/api/v1/services", None, Some("s3cret-tokem")).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("wrong bearer token")));
    let (status, _) = api(admin, "DELETE", "/api/v1/overlay", None, Some("s3cret")).await;
    assert_eq!(status, 401);
    let (status, body) = call(admin, "GET", "/api/v1/services", None).await;
    assert_eq!(status, 200);
    assert_eq!(body["services"][0]["backends"][0]["address"], a.addr.to_string());
}

#[tokio::test]
async fn bad_requests_are_4xx_with_a_field_and_change_nothing() {
    let a = TestBackend::start("a").await;
    let (_lb, admin) = start(&admin_config("", &web(&[&a], ""))).await;
    let before = membership(admin).await;
    let backends = "/api/v1/services/web/backends";
    let taken = format!(r#"{{"address": "{}"}}"#, a.addr);
    let huge = format!(r#"{{"address": "127.0.0.1:1", "pad": "{}"}}"#, "x".repeat(100_000));
    let one = format!("{backends}/{}", a.addr);
    let cases: Vec<(&str, String, Option<String>, u16, &str)> = vec![
        ("POST", backends.into(), Some("{\"address\": ".into()), 400, "body"),
        ("POST", backends.into(), Some("[1, 2]".into()), 400, "body"),
        ("POST", backends.into(), Some("{}".into()), 400, "address"),
        ("POST", backends.into(), Some(r#"{"address": 9004}"#.into()), 400, "address"),
        ("POST", "/api/v1/services/nope/backends".into(), Some(r#"{"address": "127.0.0.1:9"}"#.into()), 404, "name"),
        ("POST", backends.into(), Some(taken), 409, "address"),
        ("POST", backends.into(), Some(r#"{"address": "127.0.0.1:0"}"#.into()), 400, "address"),
        ("POST", backends.into(), Some(r#"{"address": "ftp://127.0.0.1:21"}"#.into()), 400, "address"),
        ("POST", backends.into(), Some(r#"{"address": "bad host:1"}"#.into()), 400, "address"),
        ("POST", backends.into(), Some(r#"{"address": "127.0.0.1:9", "weight": 0}"#.into()), 400, "weight"),
        ("POST", backends.into(), Some(r#"{"address": "127.0.0.1:9", "weight": 10001}"#.into()), 400, "weight"),
        ("POST", backends.into(), Some(r#"{"address": "127.0.0.1:9", "weight": 1.5}"#.into()), 400, "weight"),
        ("POST", backends.into(), Some(r#"{"address": "127.0.0.1:9", "colour": 1}"#.into()), 400, "colour"),
        ("POST", backends.into(), Some(huge), 413, "body"),
        ("PATCH", one.clone(), Some(r#"{"weight": -1}"#.into()), 400, "weight"),
        ("PATCH", one.clone(), Some(r#"{"weight": 2, "state": "asleep"}"#.into()), 400, "state"),
        ("PATCH", one.clone(), Some("{}".into()), 400, "body"),
        ("PATCH", format!("{backends}/127.0.0.1:1"), Some(r#"{"weight": 2}"#.into()), 404, "address"),
        ("DELETE", format!("{backends}/127.0.0.1:1"), None, 404, "address"),
        ("DELETE", format!("{one}?drain=maybe"), None, 400, "drain"),
        ("DELETE", "/api/v1/services/nope".into(), None, 404, "name"),
        ("GET", "/api/v1/services/nope".into(), None, 404, "name"),
        ("POST", "/api/v1/services".into(), Some(r#"{"name": "web", "backends": [{"address": "127.0.0.1:9"}]}"#.into()), 409, "name"),
        ("POST", "/api/v1/services".into(), Some(r#"{"name": "x", "hosts": ["x.local"], "backends": [{"address": "127.0.0.1:9", "weight": "heavy"}]}"#.into()), 400, "weight"),
        ("POST", "/api/v1/services".into(), Some(r#"{"name": "x", "hosts": ["x.local"], "algorithm": "randomly", "backends": [{"address": "127.0.0.1:9"}]}"#.into()), 400, "algorithm"),
        ("POST", "/api/v1/services".into(), Some(r#"{"name": "x", "backends": [{"address": "127.0.0.1:9"}]}"#.into()), 409, "name"),
        ("POST", "/api/v1/services".into(), Some(r#"{"hosts": ["x.local"]}"#.into()), 400, "name"),
        ("GET", "/api/v1/nothing".into(), None, 404, "path"),
    ];
    for (method, path, body, status, field) in &cases {
        let (got, answer) = call(admin, method, path, body.as_deref()).await;
        assert_eq!((got, answer["field"].as_str()), (*status, Some(*field)), "{method} {path} {body:?}: {answer}");
        assert!(answer["error"].as_str().is_some_and(|e| !e.is_empty()), "{answer}");
        assert_eq!(membership(admin).await, before, "{method} {path} {body:?} changed the state");
    }
    // A body that is not declared JSON.
    let req = Request::builder()
        .method("POST")
        .uri(backends)
        .header("host", "x")
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from_static(br#"{"address": "127.0.0.1:9"}"#)))
        .unwrap();
    let resp = Client::connect(admin).await.send(req).await;
    assert_eq!(resp.status, 415, "{}", resp.body);
    assert!(resp.body.contains("\"field\":\"content-type\""), "{}", resp.body);
    assert_eq!(membership(admin).await, before);
}

#[tokio::test]
async fn every_route_does_what_it_says() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let extra = "  state_file: STATE\n".replace("STATE", &temp_path("overlay.json").display().to_string());
    let (lb, admin) =
        start(&admin_config(&extra, &web(&[&a], "    hosts: [web.local]\n    algorithm: weighted_round_robin\n")))
            .await;

    let (status, list) = call(admin, "GET", "/api/v1/services", None).await;
    assert_eq!(status, 200);
    let first = backend(&list, "web", &a.addr.to_string()).unwrap().clone();
    assert_eq!((first["origin"].as_str(), first["state"].as_str()), (Some("file"), Some("active")));
    assert_eq!(first["health"]["status"], "up");

    // Add, then read it back: its own id, from the overlay, and serving.
    let body = format!(r#"{{"address": "{}", "weight": 3}}"#, b.addr);
    let (status, added) = call(admin, "POST", "/api/v1/services/web/backends", Some(&body)).await;
    assert_eq!(status, 201, "{added}");
    assert_eq!((added["weight"].as_u64(), added["origin"].as_str()), (Some(3), Some("overlay")));
    assert_ne!(added["id"], first["id"]);
    let (status, one) = call(admin, "GET", "/api/v1/services/web", None).await;
    assert_eq!((status, one["backends"].as_array().unwrap().len()), (200, 2), "{one}");
    let mut client = Client::connect(lb.addr()).await;
    for _ in 0..8 {
        client.get("web.local", "/").await;
    }
    assert_eq!((a.hits(), b.hits()), (2, 6), "weight 3 against 1");

    // Weight and state: the answer and the traffic agree.
    let path_a = format!("/api/v1/services/web/backends/{}", a.addr);
    let (status, patched) = call(admin, "PATCH", &path_a, Some(r#"{"state": "disabled"}"#)).await;
    assert_eq!((status, patched["state"].as_str()), (200, Some("disabled")), "{patched}");
    for _ in 0..4 {
        assert_eq!(client.get("web.local", "/").await.backend(), "b");
    }
    let (status, patched) = call(admin, "PATCH", &path_a, Some(r#"{"state": "active", "weight": 5}"#)).await;
    assert_eq!((status, patched["state"].as_str(), patched["weight"].as_u64()), (200, Some("active"), Some(5)));
    // A whole service.
    let svc = format!(
        r#"{{"name": "api", "hosts": ["api.local"], "algorithm": "least_connections", "backends": [{{"address": "{}"}}]}}"#,
        b.addr
    );
    let (status, created) = call(admin, "POST", "/api/v1/services", Some(&svc)).await;
    assert_eq!((status, created["origin"].as_str()), (201, Some("overlay")), "{created}");
    assert_eq!(client.get("api.local", "/").await.backend(), "b");
    let (status, config) = call(admin, "GET", "/api/v1/config", None).await;
    assert_eq!(status, 200);
    let effective = config["effective"].as_str().unwrap();
    assert!(effective.contains("name: api") && effective.contains("weight: 5"), "{effective}");
    assert_eq!(config["overlay"]["services"][0]["name"], "api");
    let (status, _) = call(admin, "DELETE", "/api/v1/services/api", None).await;
    assert_eq!(status, 200);
    assert_eq!(client.get("api.local", "/").await.status, 404);

    // Remove at once, and reload (the overlay stays).
    let path_b = format!("/api/v1/services/web/backends/{}?drain=false", b.addr);
    let (status, removed) = call(admin, "DELETE", &path_b, None).await;
    assert_eq!((status, removed["state"].as_str()), (200, Some("removed")), "{removed}");
    let (status, reloaded) = call(admin, "POST", "/api/v1/reload", None).await;
    assert_eq!((status, reloaded["status"].as_str()), (200, Some("ok")), "{reloaded}");
    let now = membership(admin).await;
    assert!(backend(&now, "web", &b.addr.to_string()).is_none());
    assert_eq!(backend(&now, "web", &a.addr.to_string()).unwrap()["weight"], 5);

    // Forget the overlay: the file alone.
    let (status, cleared) = call(admin, "DELETE", "/api/v1/overlay", None).await;
    assert_eq!((status, cleared["overlay"]["backends"].as_array().map(Vec::len)), (200, Some(0)), "{cleared}");
    assert_eq!(backend(&membership(admin).await, "web", &a.addr.to_string()).unwrap()["weight"], 1);

    // A reload of a broken file: 400 with every problem, and the old config kept.
    let before = membership(admin).await;
    std::fs::write(
        &lb.config_path,
        "listen: 127.0.0.1:0\nservices:\n  - name: web\n    backends: [{address: 127.0.0.1:0}]\n",
    )
    .unwrap();
    let (status, rejected) = call(admin, "POST", "/api/v1/reload", None).await;
    assert_eq!(status, 400, "{rejected}");
    assert!(rejected["details"][0].as_str().unwrap().contains("port 0 is not a usable port"), "{rejected}");
    assert_eq!(membership(admin).await, before);
}

#[tokio::test]
async fn a_backend_added_under_load_takes_traffic_with_no_failed_request() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let (lb, admin) = start(&admin_config("", &web(&[&a], ""))).await;
    let load = Load::start(lb.addr(), 4, "/");
    eventually("traffic", DEADLINE, || load.ok.load(Ordering::SeqCst) > 50).await;
    let (status, body) =
        call(admin, "POST", "/api/v1/services/web/backends", Some(&format!(r#"{{"address": "{}"}}"#, b.addr))).await;
    assert_eq!(status, 201, "{body}");
    eventually("the new backend serving", DEADLINE, || load.served_by("b") > 50).await;
    load.stop_without_failures().await;
}

#[tokio::test]
async fn a_backend_drained_under_load_finishes_its_slow_request_and_gets_no_new_one() {
    let a = TestBackend::start_slow("a", Duration::from_millis(1500)).await;
    let b = TestBackend::start_slow("b", Duration::from_millis(1500)).await;
    let (lb, admin) = start(&admin_config("", &web(&[&a, &b], ""))).await;
    // One slow request in flight; the API tells where it went.
    let lb_addr = lb.addr();
    let slow = tokio::spawn(async move { Client::connect(lb_addr).await.get("web.local", "/slow").await });
    let mut target = String::new();
    let start = std::time::Instant::now();
    while target.is_empty() {
        assert!(start.elapsed() < DEADLINE, "the slow request never showed in flight");
        let (_, v) = call(admin, "GET", "/api/v1/services/web", None).await;
        if let Some(x) = v["backends"].as_array().unwrap().iter().find(|x| x["in_flight"] == 1) {
            target = x["address"].as_str().unwrap().to_owned();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (drained, other) = if target == a.addr.to_string() { (&a, &b) } else { (&b, &a) };
    let load = Load::start(lb.addr(), 4, "/");
    eventually("traffic on both", DEADLINE, || load.served_by(&drained.name) > 20 && load.served_by(&other.name) > 20)
        .await;

    let (status, body) = call(admin, "DELETE", &format!("/api/v1/services/web/backends/{target}"), None).await;
    assert_eq!((status, body["state"].as_str()), (202, Some("draining")), "{body}");
    // Requests already past the pick may still land; after that, none.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let settled = drained.hits();
    let served_before = load.served_by(&other.name);
    eventually("more traffic", DEADLINE, || load.served_by(&other.name) > served_before + 200).await;
    assert_eq!(drained.hits(), settled, "a draining backend got new requests");

    let slow = slow.await.unwrap();
    assert_eq!((slow.status, slow.backend()), (200, drained.name.clone()), "{}", slow.body);
    let address = target.clone();
    let start = std::time::Instant::now();
    loop {
        if backend(&membership(admin).await, "web", &address).is_none() {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "the drained backend was not removed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    load.stop_without_failures().await;
    // The log line may reach the test's reader a moment after the API shows the removal.
    let removed = format!("backend {target} of service web drained, removed");
    eventually("the removal logged", DEADLINE, || lb.log_contains(&removed)).await;
}

#[tokio::test]
async fn the_overlay_survives_sighup_and_a_restart() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let state = temp_path("overlay.json");
    let yaml = admin_config(&format!("  state_file: {}\n", state.display()), &web(&[&a], ""));
    let path = temp_path("restart.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let (lb, admin) = start_path(path.clone()).await;
    let body = format!(r#"{{"address": "{}", "weight": 2}}"#, b.addr);
    assert_eq!(call(admin, "POST", "/api/v1/services/web/backends", Some(&body)).await.0, 201);
    let patch = format!("/api/v1/services/web/backends/{}", a.addr);
    assert_eq!(call(admin, "PATCH", &patch, Some(r#"{"state": "disabled"}"#)).await.0, 200);
    let saved = std::fs::read_to_string(&state).unwrap();
    assert!(saved.contains(&b.addr.to_string()) && saved.contains("disabled"), "{saved}");
    let id = backend(&membership(admin).await, "web", &b.addr.to_string()).unwrap()["id"].clone();

    kill(lb.pid(), "-HUP");
    eventually("the reload", DEADLINE, || lb.log_contains("reload ok (SIGHUP)")).await;
    let after = membership(admin).await;
    let added = backend(&after, "web", &b.addr.to_string()).expect("the added backend after SIGHUP");
    assert_eq!((added["id"].clone(), added["weight"].as_u64()), (id, Some(2)), "same identity, same weight");
    assert_eq!(backend(&after, "web", &a.addr.to_string()).unwrap()["state"], "disabled");
    assert_eq!(common::get(lb.addr(), "web.local", "/").await.backend(), "b");

    drop(lb);
    std::fs::write(&path, &yaml).unwrap();
    let (lb, admin) = start_path(path).await;
    assert!(lb.log_contains("overlay read from"), "{:#?}", lb.log_lines());
    let again = membership(admin).await;
    let added = backend(&again, "web", &b.addr.to_string()).expect("the added backend after a restart");
    assert_eq!((added["origin"].as_str(), added["weight"].as_u64()), (Some("overlay"), Some(2)));
    assert_eq!(backend(&again, "web", &a.addr.to_string()).unwrap()["state"], "disabled");
    for _ in 0..3 {
        assert_eq!(common::get(lb.addr(), "web.local", "/").await.backend(), "b");
    }
    let _ = std::fs::remove_file(&state);
}

#[tokio::test]
async fn overlay_changes_the_file_contradicts_are_reported_not_fatal() {
    let a = TestBackend::start("a").await;
    let (lb, admin) = start(&admin_config("", &web(&[&a], "    hosts: [web.local]\n"))).await;
    let svc = format!(r#"{{"name": "api", "hosts": ["api.local"], "backends": [{{"address": "{}"}}]}}"#, a.addr);
    assert_eq!(call(admin, "POST", "/api/v1/services", Some(&svc)).await.0, 201);
    // The file now has a service `api` of its own: the file wins, the overlay's is reported.
    let file = admin_config(
        "",
        &(web(&[&a], "    hosts: [web.local]\n")
            + &format!("  - name: api\n    hosts: [api2.local]\n    backends: [{{address: \"{}\"}}]\n", a.addr)),
    );
    std::fs::write(&lb.config_path, file).unwrap();
    let (status, body) = call(admin, "POST", "/api/v1/reload", None).await;
    assert_eq!(status, 200, "{body}");
    let conflict = body["conflicts"][0].as_str().unwrap_or_default();
    assert!(conflict.contains("service \"api\" is in the file now"), "{body}");
    // The API answers before the log line may have reached the file: wait for it.
    eventually("the conflict in the log", DEADLINE, || {
        lb.log_contains("overlay conflict: service \"api\" is in the file now")
    })
    .await;
    let (_, list) = call(admin, "GET", "/api/v1/services", None).await;
    assert_eq!(list["conflicts"][0], conflict);
    assert_eq!(common::get(lb.addr(), "api2.local", "/").await.status, 200);
}

#[tokio::test]
async fn a_backend_added_to_a_checked_service_waits_for_its_first_passing_check() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    b.set_health(500);
    let check = "    health_check: {path: /healthz, interval: 100ms, timeout: 1s, healthy_threshold: 3}\n";
    let (lb, admin) = start(&admin_config("", &web(&[&a], check))).await;
    let (status, added) =
        call(admin, "POST", "/api/v1/services/web/backends", Some(&format!(r#"{{"address": "{}"}}"#, b.addr))).await;
    assert_eq!((status, added["health"]["status"].as_str()), (201, Some("down")), "{added}");
    eventually("checks of the new backend", DEADLINE, || b.health_checks() >= 3).await;
    let mut client = Client::connect(lb.addr()).await;
    for _ in 0..6 {
        assert_eq!(client.get("web.local", "/").await.backend(), "a");
    }
    b.set_health(200);
    let start = std::time::Instant::now();
    while client.get("web.local", "/").await.backend() != "b" {
        assert!(start.elapsed() < DEADLINE, "the new backend never took traffic");
    }
    let (_, v) = call(admin, "GET", "/api/v1/services/web", None).await;
    let shown = v["backends"].as_array().unwrap().iter().find(|x| x["address"] == b.addr.to_string()).unwrap().clone();
    assert_eq!(shown["health"]["status"], "up");
    assert_eq!(shown["health"]["last_check"]["passed"], true, "{shown}");
    assert_eq!(shown["health"]["reason"], "status 200");
}

#[tokio::test]
async fn a_reload_that_removes_health_check_brings_a_down_backend_back() {
    let a = TestBackend::start("a").await;
    a.set_health(500);
    let check = "    health_check: {path: /healthz, interval: 100ms, timeout: 1s, unhealthy_threshold: 1}\n";
    let lb = Velocity::start(&format!("listen: 127.0.0.1:0\nservices:\n{}", web(&[&a], check))).await;
    let start = std::time::Instant::now();
    while common::get(lb.addr(), "web.local", "/").await.status != 503 {
        assert!(start.elapsed() < DEADLINE, "the backend never went down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::write(&lb.config_path, format!("listen: 127.0.0.1:0\nservices:\n{}", web(&[&a], ""))).unwrap();
    kill(lb.pid(), "-HUP");
    eventually("the reload", DEADLINE, || lb.log_contains("reload ok (SIGHUP)")).await;
    let r = common::get(lb.addr(), "web.local", "/").await;
    assert_eq!((r.status, r.backend()), (200, "a".to_owned()), "{}", r.body);
    assert!(lb.log_contains("backend is up: its health check was removed"));
}

#[tokio::test]
async fn a_reload_while_old_requests_run_keeps_one_checker_per_backend() {
    // Old requests hold the old snapshot; its checkers used to keep running beside the new
    // ones, doubling the checks (and halving the thresholds).
    let a = TestBackend::start_slow("a", Duration::from_secs(4)).await;
    let check = "    health_check: {path: /healthz, interval: 200ms, timeout: 1s}\n";
    let lb = Velocity::start(&format!("listen: 127.0.0.1:0\nservices:\n{}", web(&[&a], check))).await;
    let addr = lb.addr();
    let slow = tokio::spawn(async move { Client::connect(addr).await.get("web.local", "/slow").await });
    eventually("the slow request", DEADLINE, || a.hits() == 1).await;
    for i in 1..=3 {
        kill(lb.pid(), "-HUP");
        eventually("the reload", DEADLINE, || {
            lb.log_lines().iter().filter(|l| l.contains("reload ok (SIGHUP)")).count() == i
        })
        .await;
    }
    let before = a.health_checks();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let checks = a.health_checks() - before;
    // One checker: 2 s / (180-200 ms) = 10 or 11 checks; four would make about 40.
    assert!((7..=14).contains(&checks), "{checks} checks in 2 s");
    assert_eq!(slow.await.unwrap().status, 200);
}

#[tokio::test]
async fn legacy_api_port_opens_the_admin_api_on_loopback() {
    let a = TestBackend::start("a").await;
    let yaml =
        format!("listen_port: 0\napi_port: 0\nservices:\n  - name: web\n    targetURLs: [\"http://{}\"]\n", a.addr);
    let lb = Velocity::start(&yaml).await;
    let admin = lb.admin_addr().await;
    assert!(admin.ip().is_loopback());
    let (status, body) = api(admin, "GET", "/api/v1/services", None, None).await;
    assert_eq!(status, 200);
    assert_eq!(body["services"][0]["name"], "web");
}

#[tokio::test]
async fn a_guarded_admin_api_without_its_token_does_not_start() {
    let path = temp_path("notoken.yaml");
    std::fs::write(&path, admin_config("", "  - name: web\n    backends: [{address: 127.0.0.1:9}]\n")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_velocity"))
        .args(["run", "-c"])
        .arg(&path)
        .env_remove("VELOCITY_TEST_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("VELOCITY_TEST_TOKEN is not set"), "{text}");
    let _ = std::fs::remove_file(&path);
}

#[tokio::test]
async fn a_state_file_that_cannot_be_written_stops_the_start() {
    let path = temp_path("badstate.yaml");
    let extra = "  state_file: /nonexistent-dir/velocity/overlay.json\n";
    std::fs::write(&path, admin_config(extra, "  - name: web\n    backends: [{address: 127.0.0.1:9}]\n")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_velocity"))
        .args(["run", "-c"])
        .arg(&path)
        .env("VELOCITY_TEST_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("admin.state_file: cannot write the overlay to /nonexistent-dir"), "{text}");
    let _ = std::fs::remove_file(&path);
}

fn ctl(admin: SocketAddr, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_velocity"))
        .args(["ctl", "--admin", &admin.to_string(), "--token-env", "VELOCITY_TEST_TOKEN"])
        .args(args)
        .env("VELOCITY_TEST_TOKEN", TOKEN)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn velocity_ctl_end_to_end() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start_slow("b", Duration::from_millis(300)).await;
    let (lb, admin) = start(&admin_config("", &web(&[&a], ""))).await;
    let (a_addr, b_addr) = (a.addr.to_string(), b.addr.to_string());

    let (ok, out, err) = ctl(admin, &["services"]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("SERVICE  ID  ADDRESS"), "{out}");
    assert!(lines[1].starts_with("web ") && lines[1].contains(&a_addr) && lines[1].contains("active"), "{out}");

    let (ok, out, err) = ctl(admin, &["add", "web", &b_addr, "--weight", "4"]);
    assert!(ok && out.contains(&b_addr) && out.contains("overlay"), "{out}{err}");
    let (ok, out, err) = ctl(admin, &["weight", "web", &b_addr, "7"]);
    assert!(ok && out.lines().nth(1).unwrap().split_whitespace().nth(3) == Some("7"), "{out}{err}");
    assert_eq!(common::get(lb.addr(), "web.local", "/").await.status, 200);

    // Errors: the API's message, non-zero exit.
    let (ok, out, err) = ctl(admin, &["add", "web", &b_addr]);
    assert!(!ok && out.is_empty(), "{out}");
    assert!(err.contains("error 409") && err.contains("already") && err.contains("field: address"), "{err}");
    let (ok, _, err) = ctl(admin, &["drain", "nope", &b_addr]);
    assert!(!ok && err.contains("error 404: no service \"nope\""), "{err}");
    let (ok, _, err) = ctl(admin, &["weight", "web", &b_addr, "0"]);
    assert!(!ok && err.contains("field: weight"), "{err}");

    let (ok, out, err) = ctl(admin, &["remove", "web", &b_addr]);
    assert!(ok && out.contains("removed"), "{out}{err}");
    let (ok, out, err) = ctl(admin, &["add", "web", &b_addr]);
    assert!(ok && out.contains(&b_addr), "{out}{err}");
    let (ok, out, err) = ctl(admin, &["drain", "web", &b_addr]);
    assert!(ok && out.contains(&b_addr), "{out}{err}");
    let (ok, _, err) = ctl(admin, &["remove", "web", &a_addr]);
    assert!(!ok && err.contains("is the last of service"), "{err}");
    // Nothing is in flight on b, so its drain ends at the writer's next poll: it is removed.
    // (Polled: a loaded machine may take longer than that poll to run `velocity ctl` at all.)
    let start = std::time::Instant::now();
    loop {
        let (ok, out, err) = ctl(admin, &["services"]);
        assert!(ok, "{err}");
        if !out.contains(&b_addr) {
            break;
        }
        assert!(start.elapsed() < common::DEADLINE, "the drained backend stays: {out}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (ok, out, err) = ctl(admin, &["reload"]);
    assert!(ok && out.starts_with("reload ok: 1 service(s)"), "{out}{err}");
    let (ok, out, _) = ctl(admin, &["services"]);
    assert!(
        ok && out.contains(&a_addr) && !out.contains(&b_addr),
        "removed, and the overlay kept across the reload: {out}"
    );

    let (ok, _, err) = ctl("127.0.0.1:1".parse().unwrap(), &["services"]);
    assert!(!ok && err.contains("cannot reach the admin API at 127.0.0.1:1"), "{err}");
}

/// Read from `stream` until the peer closes it (`Some(bytes read)`), or `None` if it is still
/// open after `limit`.
async fn closed_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let read = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    read.ok().map(|()| got)
}

/// One whole answer with a `content-length`, read off `stream`.
async fn read_answer(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed mid-answer: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        let Some(end) = text.find("\r\n\r\n") else { continue };
        let len: usize = text[..end]
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
            .expect("a content-length");
        if got.len() >= end + 4 + len {
            return text;
        }
    }
}

/// The admin listener has the data plane's client deadlines: a connection that sends half a
/// request, or nothing, or goes idle after an answer, is closed; one that keeps asking is
/// served on.
#[tokio::test]
async fn the_admin_listener_closes_slow_and_idle_connections() {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    let a = TestBackend::start("a").await;
    let yaml = admin_config("", &web(&[&a], ""))
        .replace("services:\n", "timeouts: {client_header: 1s, client_idle: 2s}\nservices:\n");
    let (_lb, admin) = start(&yaml).await;
    // Generous against a loaded machine; without the deadlines these stay open for ever.
    let limit = Duration::from_secs(8);

    let mut half = TcpStream::connect(admin).await.unwrap();
    half.write_all(b"GET /api/v1/services HTTP/1.1\r\nHost: admin\r\n").await.unwrap();
    let started = std::time::Instant::now();
    assert!(closed_within(&mut half, limit).await.is_some(), "half a request: still open after {limit:?}");
    assert!(started.elapsed() >= Duration::from_millis(900), "closed before client_header: {:?}", started.elapsed());

    let mut silent = TcpStream::connect(admin).await.unwrap();
    assert!(closed_within(&mut silent, limit).await.is_some(), "nothing sent: still open after {limit:?}");

    // Requests back to back on one connection are served; then, idle, it is closed.
    let mut kept = TcpStream::connect(admin).await.unwrap();
    let ask = format!("GET /api/v1/services HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {TOKEN}\r\n\r\n");
    for _ in 0..2 {
        kept.write_all(ask.as_bytes()).await.unwrap();
        let answer = tokio::time::timeout(limit, read_answer(&mut kept)).await.expect("an answer in time");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    assert!(closed_within(&mut kept, limit).await.is_some(), "idle keep-alive: still open after {limit:?}");
}
