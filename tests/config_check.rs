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

/// What `velocity SUBCOMMAND -c FILE` did.
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    /// The config file's path, as the messages show it.
    path: String,
}

fn velocity(subcommand: &str, file: &std::path::Path) -> Outcome {
    let out = Command::new(env!("CARGO_BIN_EXE_velocity")).arg(subcommand).arg("-c").arg(file).output().unwrap();
    Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        path: file.display().to_string(),
    }
}

/// Exit code and stdout+stderr of `velocity check -c` on `text`, and the file's path.
fn check(text: &str) -> (Option<i32>, String, String) {
    let o = check_streams(text);
    (o.code, format!("{}{}", o.stdout, o.stderr), o.path)
}

fn check_streams(text: &str) -> Outcome {
    let file = TempConfig::new(text);
    velocity("check", &file.0)
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

/// As `nginx -t`: the summary on stdout, the problems on stderr (exit codes as before).
#[test]
fn problems_go_to_stderr_and_the_summary_to_stdout() {
    let bad = check_streams("listen: 127.0.0.1:8000\nservices: []\n");
    assert_eq!(bad.code, Some(1));
    assert_eq!(bad.stdout, "", "{}", bad.stderr);
    assert_eq!(bad.stderr, format!("{}:2:11: `services` is empty: at least one service is needed\n", bad.path));

    let good =
        check_streams("listen: 127.0.0.1:8000\nservices:\n  - name: a\n    backends: [{address: 127.0.0.1:9001}]\n");
    assert_eq!(good.code, Some(0), "{}", good.stderr);
    assert_eq!(good.stderr, "");
    assert!(good.stdout.ends_with(&format!("{}: ok\n", good.path)), "{}", good.stdout);
}

/// No made-up `:0:0` position for a problem with the whole file; `run` says the same.
#[test]
fn a_file_that_cannot_be_read_is_file_colon_reason() {
    let missing = std::env::temp_dir().join(format!("velocity-check-missing-{}.yaml", std::process::id()));
    for subcommand in ["check", "run"] {
        let o = velocity(subcommand, &missing);
        assert_eq!(o.code, Some(1), "{subcommand}: {}", o.stderr);
        assert_eq!(o.stdout, "", "{subcommand}");
        assert_eq!(
            o.stderr,
            format!("{}: cannot read: No such file or directory (os error 2)\n", o.path),
            "{subcommand}"
        );
    }
}

/// `check` passing means `run` starts: what `run` would fail on is found by `check`, at the key,
/// naming the path, and `run` stops with the same message before it opens any listener.
#[test]
fn an_access_log_that_cannot_be_opened_fails_check_and_run_alike() {
    let dir = std::env::temp_dir().join(format!("velocity-check-dir-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        (
            "/nonexistent/dir/a.log".to_owned(),
            "access_log /nonexistent/dir/a.log: directory /nonexistent/dir does not exist".to_owned(),
        ),
        (format!("{}/", dir.display()), format!("access_log {}/ is a directory, not a file", dir.display())),
    ];
    for (log, message) in cases {
        let file = TempConfig::new(&format!(
            "listen: 127.0.0.1:0\naccess_log: {log}\nservices:\n  - name: a\n    backends: [{{address: 127.0.0.1:9001}}]\n"
        ));
        for subcommand in ["check", "run"] {
            let o = velocity(subcommand, &file.0);
            assert_eq!(o.code, Some(1), "{subcommand} {log}: {}{}", o.stdout, o.stderr);
            assert_eq!(o.stderr, format!("{}:2:13: {message}\n", o.path), "{subcommand}");
            assert!(!o.stdout.contains("listening"), "{subcommand}: {}", o.stdout);
        }
    }
    // A writable place passes, and `check` leaves no file behind.
    let log = dir.join("access.log");
    let (code, output, _) = check(&format!(
        "listen: 127.0.0.1:0\naccess_log: {}\nservices:\n  - name: a\n    backends: [{{address: 127.0.0.1:9001}}]\n",
        log.display()
    ));
    assert_eq!(code, Some(0), "{output}");
    assert!(!log.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An address that is not this machine's cannot be listened on; a port in use is left to `run`.
#[test]
fn a_listen_address_of_another_machine_fails_check() {
    let (code, output, path) = check(
        "listen: [127.0.0.1:0, 192.0.2.1:8000]\nservices:\n  - name: a\n    backends: [{address: 127.0.0.1:9001}]\n",
    );
    assert_eq!(code, Some(1), "{output}");
    assert!(output.starts_with(&format!("{path}:1:23: cannot listen on 192.0.2.1:8000: ")), "{output}");
    assert!(output.contains("192.0.2.1 is not an address of this machine"), "{output}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (code, output, _) = check(&format!(
        "listen: {}\nservices:\n  - name: a\n    backends: [{{address: 127.0.0.1:9001}}]\n",
        taken.local_addr().unwrap()
    ));
    assert_eq!(code, Some(0), "{output}");
}

/// A misspelt key in a Go file used to be dropped, leaving a service without its backends.
#[test]
fn a_misspelt_legacy_key_fails_check_with_a_hint() {
    let (code, output, path) = check(
        "listen_port: 8080\nservices:\n  - name: a\n    domain: a.local\n    targetUrls: [\"http://localhost:9001\"]\n",
    );
    assert_eq!(code, Some(1), "{output}");
    assert!(
        output.starts_with(&format!("{path}:5:5: unknown key `targetUrls`: did you mean `targetURLs`?")),
        "{output}"
    );
}

#[test]
fn the_same_backend_twice_fails_check() {
    let (code, output, path) = check(
        "listen: 127.0.0.1:8000\nservices:\n  - name: a\n    backends:\n      - address: 127.0.0.1:9001\n      - address: 127.0.0.1:9001\n",
    );
    assert_eq!(code, Some(1), "{output}");
    assert_eq!(
        output,
        format!("{path}:6:18: backend 127.0.0.1:9001 is listed twice in service \"a\" (first on line 5)\n")
    );
}
