//! `velocity check -c FILE`: the real binary on real files.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A config file under the temp dir, removed on drop; unique per process and call.
struct TempConfig(PathBuf);

impl TempConfig {
    fn new(text: &str) -> TempConfig {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("velocity-check-{}-{n}.yaml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        TempConfig(path)
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Exit code and stdout+stderr of `velocity check -c` on `text`, and the file's path.
fn check(text: &str) -> (Option<i32>, String, String) {
    let file = TempConfig::new(text);
    let out = Command::new(env!("CARGO_BIN_EXE_velocity")).arg("check").arg("-c").arg(&file.0).output().unwrap();
    let output = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), output, file.0.display().to_string())
}

#[test]
fn valid_config_prints_a_summary() {
    let (code, output, _) = check(
        "\
listen: 127.0.0.1:8000
services:
  - name: web
    hosts: [web.local, \"*.web.local\"]
    path_prefix: /api
    algorithm: least_connections
    health_check: {type: tcp, interval: 5s}
    backends:
      - address: 127.0.0.1:9001
        weight: 3
        max_connections: 10
      - address: localhost:9002
",
    );
    assert_eq!(code, Some(0), "{output}");
    assert!(
        output.contains(
            "service web: hosts web.local,*.web.local path /api, least_connections over 2 backends \
             (127.0.0.1:9001 w3 max 10, localhost:9002 w1); tcp check every 5s; 2 retries; queue 100 for 10s"
        ),
        "{output}"
    );
}

#[test]
fn every_problem_is_reported_with_its_position() {
    let (code, output, path) = check(
        "\
listen: 127.0.0.1:8000
services:
  - name: web
    algorithm: fastest
    backends:
      - address: 127.0.0.1:9001
        weight: 0
  - name: web
    hosts: other.local
    backends:
      - address: 127.0.0.1:9002
",
    );
    assert_eq!(code, Some(1), "{output}");
    let positions: Vec<&str> = output
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{path}:")))
        .map(|rest| rest.split(": ").next().unwrap_or_default())
        .collect();
    assert_eq!(positions, ["4:16", "7:17", "8:11"], "{output}");
}

#[test]
fn legacy_go_config_loads_and_shows_the_new_format() {
    let (code, output, _) = check(
        "\
listen_port: 8080
api_port: 8081
services:
  - name: my-service
    domain: \"localhost:8080\"
    targetURLs:
      - \"http://localhost:9001\"
      - \"http://localhost:9002\"
    algorythm: RoundRobin
",
    );
    assert_eq!(code, Some(0), "{output}");
    assert!(output.to_lowercase().contains("legacy"), "{output}");
    assert!(output.contains("listen: 0.0.0.0:8080"), "{output}");
    assert!(output.contains("api_port 8081"), "{output}");
}

#[test]
fn the_file_may_also_be_given_without_c() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/basic.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_velocity")).args(["check", path]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.ends_with("basic.yaml: ok\n"), "{stdout}");
}

#[test]
fn every_example_passes_check() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if !matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            continue;
        }
        let out = Command::new(env!("CARGO_BIN_EXE_velocity")).arg("check").arg("-c").arg(&path).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{}: {stdout}", path.display());
        assert!(stdout.ends_with(": ok\n"), "{}: {stdout}", path.display());
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} examples found");
}
