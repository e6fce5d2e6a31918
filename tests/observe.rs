//! Issue 14: metrics counted exactly from known traffic, counters across reloads, the event
//! and access logs as separate streams, log reopening after `mv` (SIGUSR1, SIGHUP), and the
//! recent-lines API.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    assert_metric, dead_addr, eventually, get, kill, metric, scrape, temp_path, Client, TestBackend, Velocity, DEADLINE,
};

/// One raw request on a fresh connection; returns what came back until the server closed.
fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn known_traffic_is_counted_exactly() {
    let good = TestBackend::start("good").await;
    let dead = dead_addr();
    let yaml = format!(
        "listen: 127.0.0.1:0
access_log: off
max_header_bytes: 1k
admin:
  listen: 127.0.0.1:0
services:
  - name: web
    hosts: [web.local]
    max_body_bytes: 10
    passive: {{consecutive_failures: 1, base_ejection: 1m}}
    backends:
      - address: {good}
      - address: {dead}
  - name: bad
    hosts: [bad.local]
    backends:
      - address: {dead}
",
        good = good.addr
    );
    let lb = Velocity::start(&yaml).await;
    let admin = lb.admin_addr().await;
    let addr = lb.addr();

    // 4 GETs: round robin sends one to the dead backend, which fails (a connection error),
    // is ejected at once (consecutive_failures: 1), and the request is retried on `good`.
    let mut c = Client::connect(addr).await;
    for _ in 0..4 {
        assert_eq!(c.get("web.local", "/").await.status, 200);
    }
    assert_eq!(c.request("POST", "web.local", "/upload", "hello").await.status, 200);
    let too_large = "x".repeat(100);
    assert_eq!(Client::connect(addr).await.request("POST", "web.local", "/", &too_large).await.status, 413);
    assert_eq!(get(addr, "other.local", "/").await.status, 404);
    assert_eq!(get(addr, "bad.local", "/").await.status, 502);
    let big = format!("GET / HTTP/1.1\r\nHost: web.local\r\nX-Big: {}\r\n\r\n", "a".repeat(2000));
    assert!(raw(addr, big.as_bytes()).starts_with("HTTP/1.1 431"));

    let text = scrape(admin).await;
    let g = good.addr.to_string();
    let d = dead.to_string();
    let web_good = format!(r#"service="web",backend="{g}""#);
    let web_dead = format!(r#"service="web",backend="{d}""#);
    let bad_dead = format!(r#"service="bad",backend="{d}""#);

    let requests = |labels: &str| format!("velocity_http_requests_total{{{labels}}}");
    assert_metric(&text, &requests(r#"service="web",code_class="2xx",method="GET""#), 4.0);
    assert_metric(&text, &requests(r#"service="web",code_class="2xx",method="POST""#), 1.0);
    assert_metric(&text, &requests(r#"service="web",code_class="4xx",method="POST""#), 1.0);
    assert_metric(&text, &requests(r#"service="",code_class="4xx",method="GET""#), 1.0);
    assert_metric(&text, &requests(r#"service="",code_class="4xx",method="other""#), 1.0);
    assert_metric(&text, &requests(r#"service="bad",code_class="5xx",method="GET""#), 1.0);
    assert_eq!(text.lines().filter(|l| l.starts_with("velocity_http_requests_total")).count(), 6, "{text}");

    // Malformed heads (the 431) are not in the duration histogram: no request was read.
    assert_metric(&text, r#"velocity_http_request_duration_seconds_count{service="web"}"#, 6.0);
    assert_metric(&text, r#"velocity_http_request_duration_seconds_count{service=""}"#, 1.0);
    assert_metric(&text, r#"velocity_http_request_duration_seconds_count{service="bad"}"#, 1.0);
    assert_metric(&text, r#"velocity_http_request_duration_seconds_bucket{service="web",le="+Inf"}"#, 6.0);

    assert_metric(&text, r#"velocity_requests_rejected_total{service="web",reason="too_large"}"#, 1.0);
    assert_metric(&text, r#"velocity_requests_rejected_total{service="bad",reason="no_backend"}"#, 1.0);
    assert_metric(&text, r#"velocity_requests_rejected_total{service="",reason="header_too_large"}"#, 1.0);
    assert_eq!(text.lines().filter(|l| l.starts_with("velocity_requests_rejected_total")).count(), 3, "{text}");

    assert_metric(&text, &format!(r#"velocity_backend_responses_total{{{web_good},code_class="2xx"}}"#), 5.0);
    assert!(!text.contains(&format!("velocity_backend_responses_total{{{web_dead}")), "{text}");
    assert_metric(&text, &format!("velocity_backend_response_duration_seconds_count{{{web_good}}}"), 5.0);
    assert_metric(&text, &format!("velocity_backend_response_duration_seconds_count{{{web_dead}}}"), 0.0);
    assert_metric(&text, &format!("velocity_backend_connection_errors_total{{{web_dead}}}"), 1.0);
    assert_metric(&text, &format!("velocity_backend_connection_errors_total{{{web_good}}}"), 0.0);
    assert_metric(&text, &format!("velocity_backend_connection_errors_total{{{bad_dead}}}"), 1.0);
    assert_metric(&text, &format!("velocity_backend_retries_total{{{web_good}}}"), 1.0);
    assert_metric(&text, &format!("velocity_backend_retries_total{{{web_dead}}}"), 0.0);
    assert_metric(&text, &format!("velocity_backend_retries_total{{{bad_dead}}}"), 0.0);
    assert_metric(&text, &format!("velocity_backend_ejections_total{{{web_dead}}}"), 1.0);
    assert_metric(&text, &format!("velocity_backend_ejections_total{{{web_good}}}"), 0.0);
    assert_metric(&text, &format!("velocity_backend_up{{{web_dead}}}"), 0.0);
    assert_metric(&text, &format!("velocity_backend_up{{{web_good}}}"), 1.0);
    assert_metric(&text, &format!("velocity_backend_in_flight{{{web_good}}}"), 0.0);
    let opened = metric(&text, &format!("velocity_backend_connections_opened_total{{{web_good}}}")).unwrap();
    assert!(opened >= 1.0, "{text}");
    assert_metric(&text, &format!("velocity_backend_connect_duration_seconds_count{{{web_good}}}"), opened);
    assert_metric(&text, &format!("velocity_backend_connect_duration_seconds_count{{{web_dead}}}"), 0.0);
    let idle = metric(&text, &format!("velocity_backend_pool_idle_connections{{{web_good}}}")).unwrap();
    assert!(idle >= 1.0 && idle <= opened, "{text}");

    // Body bytes: "hello" in; five "good\n" answers and the 413's text out.
    assert_metric(&text, r#"velocity_bytes_received_total{service="web"}"#, 5.0);
    let body_413 = "413 content too large: the limit is 10 bytes\n".len();
    assert_metric(&text, r#"velocity_bytes_sent_total{service="web"}"#, (5 * 5 + body_413) as f64);
    assert_metric(&text, r#"velocity_queue_depth{service="web"}"#, 0.0);
    assert!(metric(&text, &format!(r#"velocity_client_connections_open{{listener="{addr}"}}"#)).is_some(), "{text}");
    assert_metric(&text, r#"velocity_config_reloads_total{result="success"}"#, 0.0);
    assert!(metric(&text, "velocity_config_last_reload_success_timestamp_seconds").unwrap() > 1.7e9);
    assert_metric(&text, "velocity_access_log_dropped_total", 0.0);
    // CPU time is counted in 10 ms ticks: a fast machine can serve all of the above in none.
    assert!(
        metric(&text, "process_cpu_seconds_total").is_some_and(|v| v >= 0.0),
        "process_cpu_seconds_total in\n{text}"
    );
    for name in ["process_resident_memory_bytes", "process_open_fds", "process_start_time_seconds"] {
        assert!(metric(&text, name).is_some_and(|v| v > 0.0), "{name} in\n{text}");
    }
    // Every label value comes from the config: the client's host and path are nowhere.
    assert!(!text.contains("other.local") && !text.contains("upload"), "{text}");
}

#[tokio::test]
async fn counters_survive_a_reload_for_what_stays() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let config = |extra: &str| {
        format!(
            "listen: 127.0.0.1:0
admin:
  listen: 127.0.0.1:0
services:
  - name: web
    hosts: [web.local]
    backends:
      - address: {}
{extra}",
            a.addr
        )
    };
    let old = format!("  - name: old\n    hosts: [old.local]\n    backends:\n      - address: {}\n", b.addr);
    let path = temp_path("reload.yaml");
    std::fs::write(&path, config(&old)).unwrap();
    let lb = Velocity::start_file(path.clone(), &[]).await;
    let admin = lb.admin_addr().await;
    for _ in 0..3 {
        assert_eq!(get(lb.addr(), "web.local", "/").await.status, 200);
    }
    assert_eq!(get(lb.addr(), "old.local", "/").await.status, 200);

    // `old` goes, `web` stays with another weight, `new` comes.
    let new = format!("  - name: new\n    hosts: [new.local]\n    backends:\n      - address: {}\n", b.addr);
    std::fs::write(
        &path,
        config(&new).replace(&format!("address: {}\n", a.addr), &format!("address: {}\n        weight: 3\n", a.addr)),
    )
    .unwrap();
    kill(lb.pid(), "-HUP");
    eventually("the reload", DEADLINE, || lb.log_contains("reload ok (SIGHUP)")).await;
    assert_eq!(get(lb.addr(), "web.local", "/").await.status, 200);

    let text = scrape(admin).await;
    assert_metric(&text, r#"velocity_http_requests_total{service="web",code_class="2xx",method="GET"}"#, 4.0);
    assert_metric(
        &text,
        &format!(r#"velocity_backend_responses_total{{service="web",backend="{}",code_class="2xx"}}"#, a.addr),
        4.0,
    );
    assert_metric(&text, r#"velocity_http_request_duration_seconds_count{service="web"}"#, 4.0);
    assert!(!text.contains(r#"service="old""#), "a removed service leaves the exposition:\n{text}");
    assert_metric(&text, r#"velocity_http_request_duration_seconds_count{service="new"}"#, 0.0);
    assert_metric(&text, r#"velocity_config_reloads_total{result="success"}"#, 1.0);

    std::fs::write(&path, "listen: [").unwrap();
    kill(lb.pid(), "-HUP");
    eventually("the rejected reload", DEADLINE, || lb.log_contains("reload rejected (SIGHUP)")).await;
    let text = scrape(admin).await;
    assert_metric(&text, r#"velocity_config_reloads_total{result="failure"}"#, 1.0);
    assert_metric(&text, r#"velocity_http_requests_total{service="web",code_class="2xx",method="GET"}"#, 4.0);
}

/// A `velocity run` whose stdout and stderr are kept apart (the harness merges them).
struct Split {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Split {
    fn start(config: &Path) -> Split {
        let mut child = Command::new(env!("CARGO_BIN_EXE_velocity"))
            .args(["run", "-c"])
            .arg(config)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let collect = |stream: Box<dyn Read + Send>| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let keep = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    keep.lock().unwrap().push(line);
                }
            });
            lines
        };
        let stdout = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        Split { child, stdout, stderr }
    }
}

impl Drop for Split {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The proxy's address from a `listening on http://ADDR` line among `lines`.
fn listening(lines: &[String]) -> Option<SocketAddr> {
    lines
        .iter()
        .filter(|l| !l.contains("admin API"))
        .find_map(|l| l.split("listening on http://").nth(1))
        .and_then(|a| a.trim_end_matches('"').split(['"', ' ']).next().and_then(|a| a.parse().ok()))
}

async fn wait_listening(what: &str, lines: impl Fn() -> Vec<String>) -> SocketAddr {
    let start = Instant::now();
    loop {
        if let Some(a) = listening(&lines()) {
            return a;
        }
        assert!(start.elapsed() < DEADLINE, "no listening line in {what}: {:#?}", lines());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).map(|s| s.lines().map(str::to_owned).collect()).unwrap_or_default()
}

#[tokio::test]
async fn events_go_to_stderr_and_access_lines_to_stdout_both_in_json() {
    let backend = TestBackend::start("a").await;
    let path = temp_path("split.yaml");
    let yaml = format!(
        "listen: 127.0.0.1:0\naccess_log: stdout\nlog_format: json\nservices:\n  - name: web\n    backends:\n      - address: {}\n      - address: {}\n",
        backend.addr,
        dead_addr()
    );
    std::fs::write(&path, yaml).unwrap();
    let v = Split::start(&path);
    let addr = wait_listening("stderr", || v.stderr.lock().unwrap().clone()).await;
    for _ in 0..2 {
        // One of the two goes to the dead backend first: a warning event.
        assert_eq!(get(addr, "web.local", "/p").await.status, 200);
    }
    eventually("two access lines", DEADLINE, || v.stdout.lock().unwrap().len() >= 2).await;
    eventually("the warning", DEADLINE, || v.stderr.lock().unwrap().iter().any(|l| l.contains("trying the next one")))
        .await;
    let out = v.stdout.lock().unwrap().clone();
    let err = v.stderr.lock().unwrap().clone();
    let time_of = |line: &str| -> String {
        let obj: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        obj["time"].as_str().unwrap().to_string()
    };
    for line in &out {
        let obj: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(obj["path"], "/p", "only access lines on stdout: {line}");
        assert_eq!(obj["service"], "web");
    }
    for line in &err {
        let obj: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(obj["level"].is_string() && obj["message"].is_string(), "{line}");
        assert!(obj.get("path").is_none(), "no access line on stderr: {line}");
    }
    let warning = err.iter().find(|l| l.contains("trying the next one")).unwrap();
    let w: serde_json::Value = serde_json::from_str(warning).unwrap();
    assert_eq!((w["level"].as_str(), w["service"].as_str()), (Some("WARN"), Some("web")), "{warning}");
    // The same timestamp shape in both streams: 2026-11-29T03:40:00.123Z.
    for t in [time_of(&out[0]), time_of(&err[0])] {
        assert_eq!((t.len(), &t[10..11], &t[19..20], &t[23..]), (24, "T", ".", "Z"), "{t}");
    }
}

#[tokio::test]
async fn sigusr1_and_sighup_reopen_both_log_files_after_mv() {
    let backend = TestBackend::start("a").await;
    let dir = temp_path("logs");
    std::fs::create_dir_all(&dir).unwrap();
    let access = dir.join("access.log");
    let events = dir.join("events.log");
    let config = dir.join("velocity.yaml");
    let yaml = format!(
        "listen: 127.0.0.1:0\naccess_log: {}\nevent_log: {}\nservices:\n  - name: web\n    backends:\n      - address: {}\n",
        access.display(),
        events.display(),
        backend.addr
    );
    std::fs::write(&config, yaml).unwrap();
    let v = Split::start(&config);
    let addr = wait_listening("the event log file", || read_lines(&events)).await;
    assert!(v.stdout.lock().unwrap().is_empty() && v.stderr.lock().unwrap().is_empty(), "nothing on stdout/stderr");
    assert_eq!(get(addr, "web.local", "/before").await.status, 200);
    eventually("the first access line", DEADLINE, || read_lines(&access).len() == 1).await;

    for (signal, name, n) in [("-USR1", "SIGUSR1", 1), ("-HUP", "SIGHUP", 2)] {
        let rotated_access = dir.join(format!("access.log.{n}"));
        let rotated_events = dir.join(format!("events.log.{n}"));
        std::fs::rename(&access, &rotated_access).unwrap();
        std::fs::rename(&events, &rotated_events).unwrap();
        kill(v.child.id(), signal);
        let reopened = format!("log files reopened ({name})");
        eventually(&reopened, DEADLINE, || read_lines(&events).iter().any(|l| l.contains(&reopened))).await;
        let path = format!("/after-{n}");
        assert_eq!(get(addr, "web.local", &path).await.status, 200);
        eventually("the access line in the new file", DEADLINE, || read_lines(&access).len() == 1).await;
        assert!(read_lines(&access)[0].contains(&path), "{:?}", read_lines(&access));
        let old = read_lines(&rotated_access);
        assert_eq!(old.len(), 1, "{old:?}");
        assert!(!old[0].contains(&path), "{old:?}");
        assert!(!read_lines(&rotated_events).iter().any(|l| l.contains(&reopened)));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn recent_lines_api_filters_by_status_and_service_newest_first() {
    let backend = TestBackend::start("a").await;
    let dir = temp_path("ring");
    std::fs::create_dir_all(&dir).unwrap();
    let yaml = format!(
        "listen: 127.0.0.1:0
access_log: {}
access_log_ring: 4
admin:
  listen: 127.0.0.1:0
services:
  - name: web
    hosts: [web.local]
    backends:
      - address: {}
  - name: bad
    hosts: [bad.local]
    backends:
      - address: {}
",
        dir.join("access.log").display(),
        backend.addr,
        dead_addr()
    );
    let lb = Velocity::start(&yaml).await;
    let admin = lb.admin_addr().await;
    let addr = lb.addr();
    // Five lines into a ring of four: the first falls out.
    for (host, path, status) in [
        ("web.local", "/first", 200),
        ("web.local", "/ok", 200),
        ("bad.local", "/broken", 502),
        ("web.local", "/status/503", 503),
        ("nowhere.local", "/lost", 404),
    ] {
        assert_eq!(get(addr, host, path).await.status, status);
    }
    let lines = |query: &'static str| async move {
        let resp = get(admin, "localhost", &format!("/api/v1/logs{query}")).await;
        assert_eq!(resp.status, 200, "{}", resp.body);
        let v: serde_json::Value = serde_json::from_str(&resp.body).unwrap();
        v["lines"].as_array().unwrap().iter().map(|l| l["path"].as_str().unwrap().to_string()).collect::<Vec<_>>()
    };
    let start = Instant::now();
    while lines("").await.first().map(String::as_str) != Some("/lost") {
        assert!(start.elapsed() < DEADLINE, "lines did not arrive: {:?}", lines("").await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(lines("").await, ["/lost", "/status/503", "/broken", "/ok"]);
    assert_eq!(lines("?status=5xx").await, ["/status/503", "/broken"]);
    assert_eq!(lines("?status=5xx&service=web&limit=100").await, ["/status/503"]);
    assert_eq!(lines("?service=web").await, ["/status/503", "/ok"]);
    assert_eq!(lines("?status=404").await, ["/lost"]);
    assert_eq!(lines("?limit=1").await, ["/lost"]);
    let bad = get(admin, "localhost", "/api/v1/logs?status=7xx").await;
    assert_eq!(bad.status, 400);
    let err: serde_json::Value = serde_json::from_str(&bad.body).unwrap();
    assert_eq!(err["field"], "status", "{}", bad.body);
    let full = get(admin, "localhost", "/api/v1/logs?limit=1").await;
    let v: serde_json::Value = serde_json::from_str(&full.body).unwrap();
    let line = &v["lines"][0];
    assert_eq!(
        (line["status"].as_u64(), line["service"].as_str(), line["note"].as_str()),
        (Some(404), Some("-"), Some("no_route"))
    );
    let _ = std::fs::remove_dir_all(&dir);
}
