//! Several Velocity instances as one, through a real Redis (a `redis-server` per test on a free
//! port) and a real 3-node Redis Cluster: members, shared run-time changes. Every instance is a
//! real `velocity` process; traffic is real HTTP.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::redis::{Relay, Store};
use common::{temp_path, Client, TestBackend, Velocity, DEADLINE};
use http_body_util::Full;
use hyper::Request;
use serde_json::Value;

/// One admin API call on a fresh connection: (status, JSON body).
async fn api(admin: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let mut req = Request::builder().method(method).uri(path).header("host", admin.to_string());
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req.body(Full::new(Bytes::from(body.unwrap_or("").to_owned()))).unwrap();
    let resp = Client::connect(admin).await.send(req).await;
    let value = serde_json::from_str(&resp.body).unwrap_or(Value::String(resp.body.clone()));
    (resp.status, value)
}

async fn cluster_status(admin: SocketAddr) -> Value {
    let (status, v) = api(admin, "GET", "/api/v1/cluster", None).await;
    assert_eq!(status, 200, "{v}");
    v
}

/// One instance of a test cluster: its process and admin address.
struct Instance {
    v: Velocity,
    admin: SocketAddr,
}

/// Start an instance named `id` on `redis` (YAML: a URL or a list), in front of `backends`.
async fn instance(id: &str, redis: &str, prefix: &str, backends: &[&TestBackend]) -> Instance {
    let list: Vec<String> = backends.iter().map(|b| format!("{{address: \"{}\"}}", b.addr)).collect();
    let state = temp_path("overlay.json");
    let yaml = format!(
        "listen: 127.0.0.1:0\naccess_log: off\nadmin:\n  listen: 127.0.0.1:0\n  state_file: {}\ncluster:\n  redis: {redis}\n  key_prefix: \"{prefix}\"\n  instance_id: {id}\nservices:\n  - name: web\n    backends: [{}]\n",
        state.display(),
        list.join(", ")
    );
    let v = Velocity::start(&yaml).await;
    let admin = v.admin_addr().await;
    Instance { v, admin }
}

/// Wait until every instance sees `n` live members.
async fn all_see(instances: &[&Instance], n: u64) {
    let start = Instant::now();
    for i in instances {
        loop {
            let s = cluster_status(i.admin).await;
            if s["live"] == n && s["store"]["reachable"] == true {
                break;
            }
            assert!(start.elapsed() < DEADLINE, "never saw {n} live members: {s}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn prefix(tag: &str) -> String {
    format!("t{}-{tag}:", std::process::id())
}

async fn members_are_listed(redis: &str, tag: &str) {
    let (a, b) = (TestBackend::start("a").await, TestBackend::start("b").await);
    let p = prefix(tag);
    let one = instance("lb-1", redis, &p, &[&a, &b]).await;
    let two = instance("lb-2", redis, &p, &[&a, &b]).await;
    all_see(&[&one, &two], 2).await;
    let s = cluster_status(one.admin).await;
    let ids: Vec<&str> = s["members"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["lb-1", "lb-2"], "{s}");
    assert_eq!(s["instance_id"], "lb-1");
    assert_eq!(s["store"]["breaker"], "closed");
    // A stopped instance leaves the list (it says so on its way out).
    drop(two);
    all_see(&[&one], 1).await;
}

/// A backend drained through A gets no request from B or C a second after the API answered.
async fn drain_reaches_every_instance(redis: &str, tag: &str) {
    let (a, b) = (TestBackend::start("a").await, TestBackend::start("b").await);
    let p = prefix(tag);
    let ia = instance("a", redis, &p, &[&a, &b]).await;
    let ib = instance("b", redis, &p, &[&a, &b]).await;
    let ic = instance("c", redis, &p, &[&a, &b]).await;
    all_see(&[&ia, &ib, &ic], 3).await;
    // Every instance serves from both backends before.
    for i in [&ib, &ic] {
        let mut c = Client::connect(i.v.addr()).await;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..4 {
            seen.insert(c.get("x", "/").await.backend());
        }
        assert_eq!(seen.len(), 2, "{seen:?}");
    }
    let (status, body) =
        api(ia.admin, "PATCH", &format!("/api/v1/services/web/backends/{}", a.addr), Some(r#"{"state":"draining"}"#))
            .await;
    assert!(status == 200 || status == 202, "{status} {body}");
    let changed = Instant::now();
    // B and C learn it; each keeps serving meanwhile.
    let mut clients = [Client::connect(ib.v.addr()).await, Client::connect(ic.v.addr()).await];
    let mut last_on_a = [Duration::ZERO; 2];
    while changed.elapsed() < Duration::from_millis(1500) {
        for (n, c) in clients.iter_mut().enumerate() {
            let r = c.get("x", "/").await;
            assert_eq!(r.status, 200);
            if r.backend() == "a" {
                last_on_a[n] = changed.elapsed();
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for (n, at) in last_on_a.iter().enumerate() {
        assert!(*at < Duration::from_secs(1), "instance {} sent to the drained backend {at:?} after the change", n + 1);
    }
    let (_, v) = api(ic.admin, "GET", "/api/v1/services/web", None).await;
    assert_eq!(v["backends"].as_array().map(Vec::len), Some(1), "{v}");
    assert!(cluster_status(ic.admin).await["overlay_revision"].as_u64() >= Some(1));
}

/// How B is cut off from the store.
enum Cut<'a> {
    /// B's connection goes through a relay the test cuts (B's heartbeat fails, B says so).
    Relay(&'a Relay),
    /// B's process is stopped (SIGSTOP): the way to cut one client off a Redis Cluster, whose
    /// nodes announce their own addresses past any relay.
    Pause,
}

/// A change made through A while B is cut off from the store reaches B once it is back; B
/// serves throughout (relay case).
async fn a_change_made_while_b_was_cut_off_reaches_it(redis_a: &str, redis_b: &str, cut: Cut<'_>, tag: &str) {
    let (a, b) = (TestBackend::start("a").await, TestBackend::start("b").await);
    let p = prefix(tag);
    let ia = instance("a", redis_a, &p, &[&a, &b]).await;
    let ib = instance("b", redis_b, &p, &[&a, &b]).await;
    all_see(&[&ia, &ib], 2).await;
    match &cut {
        Cut::Relay(r) => {
            r.cut();
            let start = Instant::now();
            while cluster_status(ib.admin).await["store"]["reachable"] != false {
                assert!(start.elapsed() < DEADLINE, "B never noticed it was cut off");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Cut::Pause => signal(ib.v.pid(), "-STOP"),
    }
    let path = format!("/api/v1/services/web/backends/{}", b.addr);
    let (status, body) = api(ia.admin, "PATCH", &path, Some(r#"{"weight":7}"#)).await;
    assert_eq!(status, 200, "{body}");
    let weight = |v: &Value| {
        v["backends"].as_array().unwrap().iter().find(|x| x["address"] == b.addr.to_string()).unwrap()["weight"].clone()
    };
    match &cut {
        Cut::Relay(r) => {
            // B still serves, from its own copy, and cannot have heard of the change.
            assert_eq!(common::get(ib.v.addr(), "x", "/").await.status, 200);
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let (_, v) = api(ib.admin, "GET", "/api/v1/services/web", None).await;
            assert_eq!(weight(&v), 1, "B cannot have heard of it: {v}");
            r.restore();
        }
        Cut::Pause => {
            // Long enough for B's member key to expire: B comes back as a new member.
            tokio::time::sleep(Duration::from_millis(3500)).await;
            signal(ib.v.pid(), "-CONT");
        }
    }
    let start = Instant::now();
    loop {
        let (_, v) = api(ib.admin, "GET", "/api/v1/services/web", None).await;
        if weight(&v) == 7 {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "the change never reached B: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill").arg(sig).arg(pid.to_string()).status().is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}

/// Redis restarts empty: each instance's own copy (its state file) brings the overlay back,
/// and a change made after is shared again.
async fn the_overlay_survives_a_store_restart(mut store: Store) {
    let (a, b) = (TestBackend::start("a").await, TestBackend::start("b").await);
    let redis = store.redis_yaml();
    let p = prefix("restart");
    let ia = instance("a", &redis, &p, &[&a, &b]).await;
    let ib = instance("b", &redis, &p, &[&a, &b]).await;
    all_see(&[&ia, &ib], 2).await;
    let path = format!("/api/v1/services/web/backends/{}", a.addr);
    let (status, body) = api(ia.admin, "PATCH", &path, Some(r#"{"state":"disabled"}"#)).await;
    assert_eq!(status, 200, "{body}");
    let state_of = |v: Value| {
        v["backends"].as_array().unwrap().iter().find(|x| x["address"] == a.addr.to_string()).unwrap()["state"].clone()
    };
    let start = Instant::now();
    while state_of(api(ib.admin, "GET", "/api/v1/services/web", None).await.1) != "disabled" {
        assert!(start.elapsed() < DEADLINE, "B never saw the change");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Store::Single(s) = &mut store {
        s.restart();
    } else {
        return;
    }
    all_see(&[&ia, &ib], 2).await;
    // B's change after the restart reaches A: the store has the overlay again, newer.
    let (status, body) = api(ib.admin, "PATCH", &path, Some(r#"{"state":"active"}"#)).await;
    assert_eq!(status, 200, "{body}");
    let start = Instant::now();
    while state_of(api(ia.admin, "GET", "/api/v1/services/web", None).await.1) != "active" {
        assert!(start.elapsed() < DEADLINE, "A never saw B's change after the restart");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_listed_single_redis() {
    let store = Store::single();
    members_are_listed(&store.redis_yaml(), "members").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_drained_through_a_stops_getting_traffic_from_b_and_c_within_1s() {
    let store = Store::single();
    drain_reaches_every_instance(&store.redis_yaml(), "drain").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_while_b_was_cut_off_reaches_b_after_it_reconnects() {
    let store = Store::single();
    let Store::Single(redis) = &store else { unreachable!() };
    let relay = Relay::start(redis.addr()).await;
    a_change_made_while_b_was_cut_off_reaches_it(&redis.url(), &relay.url(), Cut::Relay(&relay), "cutoff").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overlay_comes_back_after_redis_restarts_empty() {
    the_overlay_survives_a_store_restart(Store::single()).await;
}

/// The same against a real 3-node Redis Cluster (made once: it is slow to make, so the cases
/// share it, each under its own key prefix).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_suite_against_a_3_node_redis_cluster() {
    let store = Store::cluster();
    let redis = store.redis_yaml();
    members_are_listed(&redis, "c-members").await;
    drain_reaches_every_instance(&redis, "c-drain").await;
    a_change_made_while_b_was_cut_off_reaches_it(&redis, &redis, Cut::Pause, "c-cutoff").await;
}
