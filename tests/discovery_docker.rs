//! Docker discovery end to end, against the machine's Docker engine (skipped, saying so, when
//! `docker info` fails). There is no registry: the test builds its own image with
//! `docker import` of a tar holding the debug `velocity` binary and the libraries `ldd` lists,
//! running `velocity testserver`. Containers it starts appear in rotation; one it stops is
//! drained during the stop's grace period (0 failed requests) and disappears. Everything it
//! creates carries its own name and label and is removed at the end, failed or not.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::Request;
use serde_json::Value;

fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker").args(args).output().map_err(|e| format!("docker: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!("docker {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Removes the containers (by label) and the image this test made.
struct Cleanup {
    label: String,
    image: String,
    dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Ok(ids) = docker(&["ps", "-aq", "--filter", &format!("label={}", self.label)]) {
            for id in ids.split_whitespace() {
                let _ = docker(&["rm", "-f", id]);
            }
        }
        let _ = docker(&["rmi", "-f", &self.image]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A root filesystem with the binary and its shared libraries, imported as `image`.
fn build_image(image: &str, dir: &Path) -> Result<(), String> {
    let bin = env!("CARGO_BIN_EXE_velocity");
    let root = dir.join("root");
    std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    std::fs::copy(bin, root.join("velocity")).map_err(|e| e.to_string())?;
    let ldd = Command::new("ldd").arg(bin).output().map_err(|e| format!("ldd: {e}"))?;
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or `/lib64/ld-linux-x86-64.so.2 (0x...)`.
        let path = line.split("=>").last().unwrap_or("").split_whitespace().next().unwrap_or("");
        if !path.starts_with('/') {
            continue;
        }
        let to = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).map_err(|e| e.to_string())?;
        std::fs::copy(path, &to).map_err(|e| format!("{path}: {e}"))?;
    }
    let tar = dir.join("image.tar");
    let ok =
        Command::new("tar").arg("-C").arg(&root).arg("-cf").arg(&tar).arg(".").status().map_err(|e| e.to_string())?;
    if !ok.success() {
        return Err("tar failed".into());
    }
    docker(&["import", "--change", "ENTRYPOINT [\"/velocity\"]", tar.to_str().unwrap(), image])?;
    Ok(())
}

fn run_container(image: &str, label: &str, service_label: &str, name: &str) -> String {
    docker(&[
        "run",
        "-d",
        "--label",
        label,
        "--label",
        service_label,
        "--name",
        name,
        image,
        "testserver",
        "--listen",
        "0.0.0.0:8080",
        "--name",
        name,
    ])
    .unwrap()
}

async fn sources(admin: SocketAddr) -> Vec<(String, String)> {
    let req = Request::builder()
        .uri("/api/v1/services/web")
        .header("host", admin.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let v: Value = serde_json::from_str(&Client::connect(admin).await.send(req).await.body).unwrap();
    let mut out: Vec<(String, String)> = v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let state = format!("{} {}", b["state"].as_str().unwrap(), b["health"]["status"].as_str().unwrap());
            (b["address"].as_str().unwrap().to_owned(), state)
        })
        .collect();
    out.sort();
    out
}

fn ip_of(name: &str) -> String {
    docker(&["inspect", "-f", "{{.NetworkSettings.Networks.bridge.IPAddress}}", name]).unwrap()
}

async fn until(admin: SocketAddr, what: &str, want: &[&str]) {
    let mut want: Vec<(String, String)> = want.iter().map(|a| (a.to_string(), "active up".to_owned())).collect();
    want.sort();
    let start = Instant::now();
    loop {
        let got = sources(admin).await;
        if got == want {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{what}: backends {got:?}, expected {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_started_and_stopped_come_and_go_without_a_failed_request() {
    if let Err(e) = docker(&["info", "--format", "{{.ServerVersion}}"]) {
        eprintln!("SKIPPED: no usable Docker engine (`docker info` failed: {e})");
        return;
    }
    let tag = std::process::id().to_string();
    let image = format!("velocity-discovery-test:{tag}");
    let label = format!("velocity.test=discovery-{tag}");
    let service_label = format!("velocity.service=web-{tag}");
    let dir = temp_path("docker-image");
    let _cleanup = Cleanup { label: label.clone(), image: image.clone(), dir: dir.clone() };
    build_image(&image, &dir).unwrap();
    let c1 = format!("velocity-test-{tag}-c1");
    let c2 = format!("velocity-test-{tag}-c2");
    let c3 = format!("velocity-test-{tag}-c3");
    run_container(&image, &label, &service_label, &c1);
    run_container(&image, &label, &service_label, &c2);

    let socket = "/var/run/docker.sock";
    let config = format!(
        "listen: 127.0.0.1:0\nadmin: {{listen: 127.0.0.1:0}}\nservices:\n  - name: web\n    retry: {{attempts: 0}}\n    health_check: {{type: tcp, interval: 100ms, healthy_threshold: 1}}\n    discovery:\n      docker:\n        socket: {socket}\n        labels: {{velocity.service: web-{tag}}}\n        port: 8080\n        network: bridge\n"
    );
    let v = Velocity::start(&config).await;
    let admin = v.admin_addr().await;
    let (a1, a2) = (format!("{}:8080", ip_of(&c1)), format!("{}:8080", ip_of(&c2)));
    until(admin, "listed at start", &[&a1, &a2]).await;
    let mut seen = std::collections::HashSet::new();
    let mut client = Client::connect(v.addr()).await;
    for _ in 0..10 {
        let r = client.get("web", "/").await;
        assert_eq!(r.status, 200, "{}", r.body);
        seen.insert(r.backend());
    }
    assert_eq!(seen, [c1.clone(), c2.clone()].into_iter().collect());

    // A container started now appears (the event stream), and takes traffic once it passes
    // its first check (it may not listen yet when Docker says it started).
    run_container(&image, &label, &service_label, &c3);
    let a3 = format!("{}:8080", ip_of(&c3));
    until(admin, "the started container", &[&a1, &a2, &a3]).await;

    // Stop c2 under load: drained during the stop's grace period (testserver, as PID 1,
    // ignores SIGTERM, so Docker waits 3 s before SIGKILL), then gone. Retries are off.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed, addr) = (stop.clone(), ok.clone(), failed.clone(), v.addr());
        load.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await;
            while !stop.load(Ordering::SeqCst) {
                match c.try_get("web", "/").await {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::SeqCst),
                    other => {
                        eprintln!("failed: {other:?}");
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c2_stop = c2.clone();
    let stopping = tokio::task::spawn_blocking(move || docker(&["stop", "-t", "3", &c2_stop]));
    until(admin, "the stopped container gone", &[&a1, &a3]).await;
    stopping.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    for l in load {
        l.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::SeqCst), 0, "failed requests while a container stopped");
    assert!(ok.load(Ordering::SeqCst) > 20);
    for _ in 0..10 {
        let r = client.get("web", "/").await;
        assert_eq!(r.status, 200);
        assert_ne!(r.backend(), c2);
    }
    assert!(v.log_contains("docker:web"), "{:#?}", v.log_lines());
}
