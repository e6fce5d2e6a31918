//! The dashboard in a real browser: headless Chromium (Debian's `chromium`, installed by
//! `.ci/run`) driven over the DevTools protocol loads `GET /` from a running Velocity under
//! traffic, is asked for the token, sees every backend and the request counter rise, changes
//! a backend's state with its buttons, and saves a screenshot.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{get, temp_path, TestBackend, Velocity};
use serde_json::{json, Value};

const TOKEN_ENV: &str = "VELOCITY_DASHBOARD_TEST_TOKEN";
const TOKEN: &str = "dashboard-test-token";
const DEADLINE: Duration = Duration::from_secs(30);

/// A headless Chromium, killed on drop.
struct Browser {
    child: Child,
    profile: std::path::PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Start Chromium and return it with the DevTools address it printed.
fn start_browser() -> (Browser, SocketAddr) {
    let profile = temp_path("chromium-profile");
    let mut child = Command::new("chromium")
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1280,1100",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium must be installed (apt-get install chromium; .ci/run does it)");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(url) = line.split("DevTools listening on ws://").nth(1) {
                let _ = tx.send(url.split('/').next().unwrap_or("").to_string());
            }
        }
    });
    let addr = rx.recv_timeout(DEADLINE).expect("chromium printed no DevTools address");
    (Browser { child, profile }, addr.parse().expect("DevTools address"))
}

/// One HTTP GET to the DevTools endpoint (its JSON listing of targets), read by its
/// Content-Length: the endpoint keeps the connection open.
fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut reader = BufReader::new(s);
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap();
            }
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).unwrap();
    String::from_utf8(body).unwrap()
}

/// A DevTools protocol session over a minimal WebSocket client (text frames, client-masked).
struct Cdp {
    stream: TcpStream,
    next_id: u64,
}

impl Cdp {
    fn connect(ws_url: &str) -> Cdp {
        let rest = ws_url.strip_prefix("ws://").expect("ws url");
        let (host, path) = rest.split_once('/').unwrap();
        let mut stream = TcpStream::connect(host).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        write!(
            stream,
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101"), "websocket handshake: {head}");
        Cdp { stream, next_id: 1 }
    }

    fn send_frame(&mut self, payload: &[u8]) {
        let mut frame = vec![0x81u8];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n < 65536 => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).unwrap();
    }

    fn read_message(&mut self) -> Vec<u8> {
        let mut message = Vec::new();
        loop {
            let mut h = [0u8; 2];
            self.stream.read_exact(&mut h).unwrap();
            let (fin, opcode) = (h[0] & 0x80 != 0, h[0] & 0x0f);
            let len = match h[1] & 0x7f {
                126 => {
                    let mut b = [0u8; 2];
                    self.stream.read_exact(&mut b).unwrap();
                    u16::from_be_bytes(b) as usize
                }
                127 => {
                    let mut b = [0u8; 8];
                    self.stream.read_exact(&mut b).unwrap();
                    u64::from_be_bytes(b) as usize
                }
                n => n as usize,
            };
            let mut payload = vec![0u8; len];
            self.stream.read_exact(&mut payload).unwrap();
            match opcode {
                0x8 => panic!("DevTools closed the connection"),
                0x9 | 0xA => continue,
                _ => message.extend_from_slice(&payload),
            }
            if fin {
                return message;
            }
        }
    }

    /// Send a command and wait for its answer (events in between are skipped).
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send_frame(json!({ "id": id, "method": method, "params": params }).to_string().as_bytes());
        loop {
            let msg: Value = serde_json::from_slice(&self.read_message()).unwrap();
            if msg["id"] == id {
                assert!(msg.get("error").is_none(), "{method}: {msg}");
                return msg["result"].clone();
            }
        }
    }

    /// Evaluate a JavaScript expression in the page; its value as JSON.
    fn eval(&mut self, expression: &str) -> Value {
        let r = self.call("Runtime.evaluate", json!({ "expression": expression, "returnByValue": true }));
        assert!(r.get("exceptionDetails").is_none(), "{expression}: {r}");
        r["result"]["value"].clone()
    }

    /// Poll `expression` until it is `true`.
    fn wait_for(&mut self, what: &str, expression: &str) {
        let start = Instant::now();
        // Before the page has loaded, the elements the expression reads may not exist yet.
        let guarded = format!("(() => {{ try {{ return ({expression}); }} catch (e) {{ return false; }} }})()");
        while self.eval(&guarded) != json!(true) {
            let body = self.eval("document.body.innerText");
            assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}; the page says:\n{body}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn text(&mut self, selector: &str) -> String {
        let expr = format!("(document.querySelector({}) || {{}}).textContent || ''", json!(selector));
        self.eval(&expr).as_str().unwrap_or("").to_string()
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| *c != b'=' && !c.is_ascii_whitespace()).map(value).collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, v)| n | (u32::from(*v) << (18 - 6 * i)));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_live_backends_and_drives_the_api_in_chromium() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let api = TestBackend::start("api-1").await;
    // The harness passes the test's environment on to Velocity; this binary has one test.
    std::env::set_var(TOKEN_ENV, TOKEN);
    let yaml = format!(
        "listen: 127.0.0.1:0
admin:
  listen: 127.0.0.1:0
  token_env: {TOKEN_ENV}
services:
  - name: web
    hosts: [web.local]
    backends:
      - address: {}
      - address: {}
  - name: api
    hosts: [api.local]
    backends:
      - address: {}
",
        a.addr, b.addr, api.addr
    );
    let lb = Velocity::start(&yaml).await;
    let admin = lb.admin_addr().await;
    // The page is public, the data is not.
    assert_eq!(get(admin, "localhost", "/").await.status, 200);
    assert_eq!(get(admin, "localhost", "/api/v1/stats").await.status, 401);

    // Traffic all along, a few errors among it, so the counters and the chart move.
    let addr = lb.addr();
    let traffic = tokio::spawn(async move {
        for i in 0u64.. {
            let path = if i % 10 == 9 { "/status/502" } else { "/" };
            let _ = tokio::time::timeout(Duration::from_secs(2), get(addr, "web.local", path)).await;
            if i % 3 == 0 {
                let _ = tokio::time::timeout(Duration::from_secs(2), get(addr, "api.local", "/")).await;
            }
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    });

    let can_patch = velocity::admin::route_table()
        .iter()
        .any(|(m, p)| m == "PATCH" && p.starts_with("/api/v1/services/") && p.contains("/backends/"));
    let (a_addr, b_addr) = (a.addr.to_string(), b.addr.to_string());
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let shot_path = shot.clone();
    tokio::task::spawn_blocking(move || {
        let (_browser, devtools) = start_browser();
        let targets: Value = serde_json::from_str(&http_get(devtools, "/json/list")).unwrap();
        let page = targets.as_array().unwrap().iter().find(|t| t["type"] == "page").expect("a page target");
        let mut cdp = Cdp::connect(page["webSocketDebuggerUrl"].as_str().unwrap());
        cdp.call("Page.navigate", json!({ "url": format!("http://{admin}/") }));

        // Asked for the token once; nothing shown before it is given.
        cdp.wait_for("the token prompt", "!document.querySelector('#token-form').classList.contains('hidden')");
        assert_eq!(cdp.eval("document.querySelectorAll('tr.backend').length"), json!(0));
        cdp.eval(&format!(
            "document.querySelector('#token').value = {}; document.querySelector('#token-submit').click(); true",
            json!(TOKEN)
        ));

        // Every backend of every service.
        for (service, backend) in [("web", &a_addr), ("web", &b_addr), ("api", &api.addr.to_string())] {
            let sel = format!("section[data-service=\"{service}\"] tr[data-backend=\"{backend}\"] .state");
            cdp.wait_for(
                &format!("{service} {backend}"),
                &format!("(document.querySelector({}) || {{}}).textContent === 'up'", json!(sel)),
            );
        }
        assert_eq!(cdp.eval("sessionStorage.getItem('velocity-token')"), json!(TOKEN));

        // The request counter rises.
        let total = "section[data-service=\"web\"] .requests-total";
        cdp.wait_for("some requests", &format!("Number(document.querySelector({}).textContent) > 0", json!(total)));
        let first: u64 = cdp.text(total).parse().unwrap();
        cdp.wait_for(
            "the counter to rise",
            &format!("Number(document.querySelector({}).textContent) > {}", json!(total), first + 20),
        );
        cdp.wait_for(
            "a rate",
            "/^[0-9.]+$/.test(document.querySelector('section[data-service=\"web\"] .rps').textContent)",
        );
        cdp.wait_for("a p99", "/ms|s$/.test(document.querySelector('section[data-service=\"web\"] .p99').textContent)");
        cdp.wait_for(
            "the recent errors",
            "document.querySelector('#errors tbody').textContent.includes('/status/502')",
        );

        let row = |addr: &str| format!("section[data-service=\"web\"] tr[data-backend=\"{addr}\"]");
        if can_patch {
            let state_is = |addr: &str, text: &str| {
                format!(
                    "(document.querySelector({}) || {{}}).textContent === {}",
                    json!(format!("{} .state", row(addr))),
                    json!(text)
                )
            };
            let click = |addr: &str, action: &str| {
                format!("document.querySelector({}).click(); true", json!(format!("{} .action-{action}", row(addr))))
            };
            cdp.eval(&click(&b_addr, "disabled"));
            cdp.wait_for("b disabled", &state_is(&b_addr, "up · disabled"));
            save_screenshot(&mut cdp, &shot_path);
            cdp.eval(&click(&b_addr, "active"));
            cdp.wait_for("b enabled again", &state_is(&b_addr, "up"));
            cdp.eval(&click(&a_addr, "draining"));
            // A draining backend leaves the pool once its requests end: draining, then gone.
            let gone = format!("document.querySelector({}) === null", json!(row(&a_addr)));
            cdp.wait_for("a draining or gone", &format!("{} || {}", state_is(&a_addr, "up · draining"), gone));
        } else {
            // The admin API has no backend PATCH route yet: the buttons are there, unused.
            assert_eq!(
                cdp.eval(&format!("document.querySelectorAll({}).length", json!(format!("{} button", row(&a_addr))))),
                json!(3)
            );
            save_screenshot(&mut cdp, &shot_path);
        }
    })
    .await
    .unwrap();
    traffic.abort();
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000, "screenshot at {}", shot.display());
    println!("screenshot: {}", shot.display());
}

fn save_screenshot(cdp: &mut Cdp, path: &std::path::Path) {
    // Let the chart and the rates settle on a few seconds of traffic.
    cdp.wait_for("a chart", "(() => { const c = document.querySelector('canvas'); return !!c && c.width > 0; })()");
    let shot = cdp.call("Page.captureScreenshot", json!({ "format": "png", "captureBeyondViewport": true }));
    std::fs::write(path, base64_decode(shot["data"].as_str().unwrap())).unwrap();
}
