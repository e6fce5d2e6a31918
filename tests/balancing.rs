//! Issue 15, more algorithms, end to end: real backends, a real Velocity, real clients.
//! Every wait is a poll with a deadline.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

fn config(backends: &[&TestBackend], service_lines: &str) -> String {
    let list: String = backends.iter().map(|b| format!("      - address: {}\n", b.addr)).collect();
    format!("listen: 127.0.0.1:0\naccess_log: off\nservices:\n  - name: web\n{service_lines}    backends:\n{list}")
}

/// Active checks quick enough that a test sees a backend leave and come back in well under a
/// second, and patient enough (two failures of 2 s) not to flap on a loaded machine.
const FAST_CHECKS: &str =
    "    health_check: {path: /healthz, interval: 50ms, timeout: 2s, healthy_threshold: 1, unhealthy_threshold: 2}\n";

async fn wait_for_log(lb: &Velocity, backend: &TestBackend, needle: &str) {
    let tag = format!("backend={}", backend.addr);
    eventually(&format!("{needle:?} about {}", backend.name), DEADLINE, || {
        lb.log_lines().iter().any(|l| l.contains(&tag) && l.contains(needle))
    })
    .await;
}

fn set_cookie(r: &Resp) -> Option<String> {
    r.headers.get("set-cookie").and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// `NAME=VALUE` of a `Set-Cookie`, as a client sends it back.
fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn sticky_clients_stay_until_their_backend_goes_down() {
    let backends = [TestBackend::start("a").await, TestBackend::start("b").await, TestBackend::start("c").await];
    let refs: Vec<&TestBackend> = backends.iter().collect();
    let sticky = "    algorithm: sticky\n    sticky: {cookie: VELOCITY_ID, ttl: 1h, base: least_connections}\n";
    let lb = Velocity::start(&config(&refs, &format!("{sticky}{FAST_CHECKS}"))).await;

    // New clients get a cookie each, and the base algorithm spreads them.
    let mut cookies = Vec::new();
    let mut homes = HashSet::new();
    for _ in 0..6 {
        let r = get(lb.addr(), "web.local", "/").await;
        assert_eq!(r.status, 200);
        let set = set_cookie(&r).expect("a first answer sets the cookie");
        assert!(set.starts_with("VELOCITY_ID="), "{set}");
        assert!(set.ends_with("; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax"), "{set}");
        // Opaque: neither the address nor the port shows.
        for b in &backends {
            assert!(!set.contains(&b.addr.to_string()) && !set.contains(&b.addr.port().to_string()), "{set}");
        }
        homes.insert(r.backend());
        cookies.push((cookie_pair(&set), r.backend()));
    }
    assert!(homes.len() >= 2, "new clients all went to {homes:?}");

    // 1,000 requests with the first cookie: one backend, and no new cookie.
    let (cookie, home) = cookies[0].clone();
    let mut client = Client::connect(lb.addr()).await;
    for _ in 0..1000 {
        let r = client.get_with("web.local", "/", &[("cookie", &format!("theme=dark; {cookie}"))]).await;
        assert_eq!((r.status, r.backend()), (200, home.clone()));
        assert_eq!(set_cookie(&r), None);
    }

    // Its backend goes down: the client moves, and is told where to.
    let down = backends.iter().find(|b| b.name == home).unwrap();
    down.set_health(500);
    wait_for_log(&lb, down, "backend is down").await;
    let r = client.get_with("web.local", "/", &[("cookie", &cookie)]).await;
    assert_eq!(r.status, 200);
    assert_ne!(r.backend(), home);
    let moved = cookie_pair(&set_cookie(&r).expect("a reset cookie"));
    assert_ne!(moved, cookie);
    let new_home = r.backend();
    for _ in 0..100 {
        let r = client.get_with("web.local", "/", &[("cookie", &moved)]).await;
        assert_eq!((r.backend(), set_cookie(&r)), (new_home.clone(), None));
    }
    // Clients of the other backends did not move.
    for (cookie, was) in cookies.iter().filter(|(_, b)| *b != home) {
        let r = client.get_with("web.local", "/", &[("cookie", cookie)]).await;
        assert_eq!((&r.backend(), set_cookie(&r)), (was, None));
    }
}

/// Backend of each key, asking `per_key` times; panics if a key is answered by two backends.
async fn stable_mapping(
    lb: &Velocity,
    keys: &[String],
    send: impl Fn(&str) -> (String, Vec<(String, String)>),
) -> HashMap<String, String> {
    let mut client = Client::connect(lb.addr()).await;
    let mut map = HashMap::new();
    for key in keys {
        for _ in 0..3 {
            let (path, headers) = send(key);
            let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            let r = client.get_with("web.local", &path, &headers).await;
            assert_eq!(r.status, 200);
            let first = map.entry(key.clone()).or_insert_with(|| r.backend());
            assert_eq!(*first, r.backend(), "key {key} moved");
        }
    }
    map
}

fn spread(map: &HashMap<String, String>) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for b in map.values() {
        *counts.entry(b.clone()).or_insert(0) += 1;
    }
    counts
}

#[tokio::test]
async fn url_and_header_hash_are_stable_per_key_and_spread() {
    let backends = [TestBackend::start("a").await, TestBackend::start("b").await, TestBackend::start("c").await];
    let refs: Vec<&TestBackend> = backends.iter().collect();
    let keys: Vec<String> = (0..150).map(|i| format!("k{i}")).collect();

    let lb = Velocity::start(&config(&refs, "    algorithm: url_hash\n")).await;
    // The query is not part of the key: it changes on every request.
    let n = std::sync::atomic::AtomicUsize::new(0);
    let map =
        stable_mapping(&lb, &keys, |k| (format!("/item/{k}?t={}", n.fetch_add(1, Ordering::SeqCst)), vec![])).await;
    let counts = spread(&map);
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|&c| c >= 25), "{counts:?}");
    drop(lb);

    let lb = Velocity::start(&config(&refs, "    algorithm: header_hash\n    hash_key: X-User\n")).await;
    let map = stable_mapping(&lb, &keys, |k| ("/".into(), vec![("x-user".into(), k.to_owned())])).await;
    let counts = spread(&map);
    assert!(counts.len() == 3 && counts.values().all(|&c| c >= 25), "{counts:?}");
    // Without the header a request is still served (in rotation).
    let r = get(lb.addr(), "web.local", "/").await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn ip_hash_is_stable_per_client_and_a_down_backends_clients_alone_move() {
    let backends = [TestBackend::start("a").await, TestBackend::start("b").await, TestBackend::start("c").await];
    let refs: Vec<&TestBackend> = backends.iter().collect();
    let lb = Velocity::start(&config(&refs, &format!("    algorithm: ip_hash\n{FAST_CHECKS}"))).await;
    let clients: Vec<IpAddr> = (1..=120).map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 1, i))).collect();
    let home = |lb_addr| {
        let clients = clients.clone();
        async move {
            let mut map = HashMap::new();
            for ip in clients {
                // A new connection each time: the same address, however it connects.
                for _ in 0..2 {
                    let r = Client::connect_from(lb_addr, ip).await.get("web.local", "/").await;
                    assert_eq!(r.status, 200);
                    let first = map.entry(ip).or_insert_with(|| r.backend());
                    assert_eq!(*first, r.backend(), "client {ip} moved");
                }
            }
            map
        }
    };
    let before = home(lb.addr()).await;
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for b in before.values() {
        *counts.entry(b.as_str()).or_insert(0) += 1;
    }
    assert!(counts.len() == 3 && counts.values().all(|&c| c >= 18), "{counts:?}");

    backends[1].set_health(500);
    wait_for_log(&lb, &backends[1], "backend is down").await;
    let after = home(lb.addr()).await;
    for (ip, was) in &before {
        if *was == "b" {
            assert_ne!(after[ip], "b");
        } else {
            assert_eq!(&after[ip], was, "client {ip} of a healthy backend moved");
        }
    }
    // Back up: everyone is home again.
    backends[1].set_health(200);
    wait_for_log(&lb, &backends[1], "backend is up").await;
    assert_eq!(home(lb.addr()).await, before);
}

/// Clients sending GETs back to back until stopped; the backend of each answer, in order.
struct Load {
    stop: Arc<AtomicBool>,
    answers: Arc<Mutex<Vec<(Instant, String)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(addr: std::net::SocketAddr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, answers) = (stop.clone(), answers.clone());
                tokio::spawn(async move {
                    let mut client = Client::connect(addr).await;
                    while !stop.load(Ordering::SeqCst) {
                        let r = client.get("web.local", "/").await;
                        assert_eq!(r.status, 200, "{}", r.body);
                        answers.lock().unwrap().push((Instant::now(), r.backend()));
                    }
                })
            })
            .collect();
        Load { stop, answers, tasks }
    }

    fn count(&self) -> usize {
        self.answers.lock().unwrap().len()
    }

    /// Share of `backend` among the answers after the `from`th.
    fn share_since(&self, from: usize, backend: &str) -> (f64, usize) {
        let answers = self.answers.lock().unwrap();
        let recent = &answers[from.min(answers.len())..];
        let n = recent.iter().filter(|(_, b)| b == backend).count();
        (n as f64 / recent.len().max(1) as f64, recent.len())
    }

    async fn finish(self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
    }
}

#[tokio::test]
async fn peak_ewma_moves_traffic_off_a_backend_that_turns_slow() {
    let backends = [TestBackend::start("a").await, TestBackend::start("b").await, TestBackend::start("c").await];
    let refs: Vec<&TestBackend> = backends.iter().collect();
    let lb = Velocity::start(&config(&refs, "    algorithm: peak_ewma\n")).await;
    // One client: nothing is in flight when a pick is made, so only the latency estimate
    // can steer traffic (a balancer on in-flight counts alone would keep sending b a third).
    let load = Load::start(lb.addr(), 1);
    eventually("warm-up traffic", DEADLINE, || load.count() >= 600).await;
    // Not a third each: one answer delayed by a loaded machine keeps a backend out for a
    // while (the peak decays over 10 s), so only ask that b served while fast.
    let (share, _) = load.share_since(0, "b");
    assert!(share > 0.0, "b took no traffic while fast");

    backends[1].set_delay(Duration::from_millis(40));
    let turned = Instant::now();
    // Within seconds the slow backend is down to a trickle: under 5% of the last 200 answers
    // (it is probed again as its estimate decays, and when a fast one has a hiccup).
    let mark = load.count();
    eventually("traffic to move", DEADLINE, || {
        let total = load.count();
        total >= mark + 200 && load.share_since(total - 200, "b").0 < 0.05
    })
    .await;
    let took = turned.elapsed();
    let (share, n) = load.share_since(mark, "b");
    load.finish().await;
    eprintln!("slow backend's share after it turned slow: {share:.3} of {n} (last 200 under 5% after {took:?})");
}

/// The share of `n` requests on `client` that backend `b` answered (each must be a 200).
async fn share_of_b(client: &mut Client, n: usize) -> f64 {
    let mut b = 0;
    for _ in 0..n {
        let r = client.get("web.local", "/").await;
        assert_eq!(r.status, 200);
        b += usize::from(r.backend() == "b");
    }
    b as f64 / n as f64
}

#[tokio::test]
async fn slow_start_ramps_a_recovered_backend() {
    let backends = [TestBackend::start("a").await, TestBackend::start("b").await];
    let refs: Vec<&TestBackend> = backends.iter().collect();
    let lb = Velocity::start(&config(&refs, &format!("    slow_start: 6s\n{FAST_CHECKS}"))).await;
    let mut client = Client::connect(lb.addr()).await;
    // Round robin: half and half.
    assert_eq!(share_of_b(&mut client, 100).await, 0.5);

    backends[1].set_health(500);
    wait_for_log(&lb, &backends[1], "backend is down").await;
    assert_eq!(share_of_b(&mut client, 50).await, 0.0);
    backends[1].set_health(200);
    wait_for_log(&lb, &backends[1], "backend is up").await;
    let back = Instant::now();
    // Just back: about a tenth of its weight, so about 1 in 11 requests.
    let first = share_of_b(&mut client, 50).await;
    let first_took = back.elapsed();
    assert!(first < 0.3, "b took {first:.2} in the first {first_took:?} after it came back");
    // Growing, up to its full half once the window has passed.
    let mut shares = vec![first];
    while back.elapsed() < Duration::from_secs(7) {
        shares.push(share_of_b(&mut client, 200).await);
    }
    let last = share_of_b(&mut client, 200).await;
    assert!((0.45..=0.55).contains(&last), "b took {last:.2} after the window: {shares:?}");
    let mid = shares[shares.len() / 2];
    assert!(first < mid && mid <= last, "not a ramp: {shares:?}");
    eprintln!("b's share by batch of 200 after it came back: {shares:.2?} then {last:.2}");
}

#[tokio::test]
async fn p2c_and_random_spread_by_weight() {
    let backends = [TestBackend::start("a").await, TestBackend::start("b").await, TestBackend::start("c").await];
    for algorithm in ["p2c", "random"] {
        let list: String = backends
            .iter()
            .zip([2, 1, 1])
            .map(|(b, w)| format!("      - address: {}\n        weight: {w}\n", b.addr))
            .collect();
        let yaml = format!(
            "listen: 127.0.0.1:0\naccess_log: off\nservices:\n  - name: web\n    algorithm: {algorithm}\n    backends:\n{list}"
        );
        let lb = Velocity::start(&yaml).await;
        let load = Load::start(lb.addr(), 4);
        eventually("2,000 answers", DEADLINE, || load.count() >= 2000).await;
        let (a, _) = load.share_since(0, "a");
        let (b, _) = load.share_since(0, "b");
        let (c, _) = load.share_since(0, "c");
        load.finish().await;
        // Weights 2:1:1. Under load p2c also weighs what is in flight, so allow a margin.
        assert!((0.38..0.62).contains(&a), "{algorithm}: a {a:.2} b {b:.2} c {c:.2}");
        assert!(b > 0.15 && c > 0.15, "{algorithm}: a {a:.2} b {b:.2} c {c:.2}");
    }
}

#[test]
fn check_reports_algorithm_parameters_at_their_position() {
    let path = temp_path("bad.yaml");
    std::fs::write(
        &path,
        "listen: 127.0.0.1:0\nservices:\n  - name: web\n    algorithm: header_hash\n    backends: [{address: 127.0.0.1:1}]\n  - name: api\n    hosts: api.local\n    algorithm: sticky\n    sticky: {cookie: SID, base: fastest}\n    backends: [{address: 127.0.0.1:2}]\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_velocity")).arg("check").arg(&path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_file(&path);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let file = path.display().to_string();
    assert!(text.contains(&format!("{file}:4:16: header_hash needs `hash_key`")), "{text}");
    assert!(text.contains(&format!("{file}:9:33: unknown sticky base \"fastest\"")), "{text}");
}

#[tokio::test]
async fn slow_start_ramps_a_backend_added_by_a_reload() {
    let backends = [TestBackend::start("a").await, TestBackend::start("b").await];
    let lb = Velocity::start(&config(&[&backends[0]], "    algorithm: p2c\n    slow_start: 6s\n")).await;
    let mut client = Client::connect(lb.addr()).await;
    assert_eq!(client.get("web.local", "/").await.backend(), "a");

    let both: Vec<&TestBackend> = backends.iter().collect();
    std::fs::write(&lb.config_path, config(&both, "    algorithm: p2c\n    slow_start: 6s\n")).unwrap();
    kill(lb.pid(), "-HUP");
    eventually("the reload", DEADLINE, || lb.log_contains("reload ok (SIGHUP)")).await;
    let added = Instant::now();
    let first = share_of_b(&mut client, 50).await;
    assert!(first < 0.3, "the new backend took {first:.2} at once");
    let mut last = first;
    while added.elapsed() < Duration::from_secs(7) {
        last = share_of_b(&mut client, 200).await;
    }
    last = last.max(share_of_b(&mut client, 400).await);
    assert!(last > 0.38, "the new backend took only {last:.2} after the window");
}
