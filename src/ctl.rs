//! `velocity ctl`: a thin client of the admin API for operators. It prints tables, and exits
//! non-zero with the API's error. Everything it can do, the API does; it decides nothing.

use std::fmt::Write as _;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;

/// What to do, as parsed from the command line.
#[derive(Debug, Clone)]
pub enum Action {
    Services,
    Add { service: String, address: String, weight: u32 },
    Drain { service: String, address: String },
    Remove { service: String, address: String },
    Weight { service: String, address: String, weight: u32 },
    Reload,
}

/// Run `action` against the admin API at `admin` (`host:port` or `http://host:port`). `Ok`
/// with what to print, `Err` with the error to print (the exit is then non-zero).
pub async fn run(admin: &str, token: Option<&str>, action: &Action) -> Result<String, String> {
    let seg = |s: &str| percent_encode(s);
    let (method, path, body) = match action {
        Action::Services => (Method::GET, "/api/v1/services".to_owned(), None),
        Action::Add { service, address, weight } => (
            Method::POST,
            format!("/api/v1/services/{}/backends", seg(service)),
            Some(json!({ "address": address, "weight": weight })),
        ),
        Action::Drain { service, address } => {
            (Method::DELETE, format!("/api/v1/services/{}/backends/{}", seg(service), seg(address)), None)
        }
        Action::Remove { service, address } => {
            (Method::DELETE, format!("/api/v1/services/{}/backends/{}?drain=false", seg(service), seg(address)), None)
        }
        Action::Weight { service, address, weight } => (
            Method::PATCH,
            format!("/api/v1/services/{}/backends/{}", seg(service), seg(address)),
            Some(json!({ "weight": weight })),
        ),
        Action::Reload => (Method::POST, "/api/v1/reload".to_owned(), None),
    };
    let (status, answer) = call(admin, token, method, &path, body).await?;
    if !(200..300).contains(&status) {
        return Err(error_text(status, &answer));
    }
    Ok(match action {
        Action::Services => services_table(&answer),
        Action::Reload => {
            let mut out = format!("reload ok: {} service(s)\n", answer["services"]);
            for c in answer["conflicts"].as_array().into_iter().flatten() {
                let _ = writeln!(out, "conflict: {}", c.as_str().unwrap_or_default());
            }
            out
        }
        Action::Add { service, .. }
        | Action::Drain { service, .. }
        | Action::Remove { service, .. }
        | Action::Weight { service, .. } => table(&[backend_row(service, &answer)]),
    })
}

fn error_text(status: u16, answer: &Value) -> String {
    let mut out = match (answer["error"].as_str(), answer["field"].as_str()) {
        (Some(e), Some(f)) => format!("error {status}: {e} (field: {f})"),
        (Some(e), None) => format!("error {status}: {e}"),
        _ => format!("error {status}: {answer}"),
    };
    for d in answer["details"].as_array().into_iter().flatten() {
        let _ = write!(out, "\n  {}", d.as_str().unwrap_or_default());
    }
    out
}

async fn call(
    admin: &str,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Value), String> {
    let authority = admin.trim().trim_start_matches("http://").trim_end_matches('/');
    let unreachable = |e: &dyn std::fmt::Display| format!("cannot reach the admin API at {authority}: {e}");
    let stream = TcpStream::connect(authority).await.map_err(|e| unreachable(&e))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| unreachable(&e))?;
    tokio::spawn(conn);
    let bytes = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = Request::builder().method(method).uri(path).header(header::HOST, authority);
    if !bytes.is_empty() {
        req = req.header(header::CONTENT_TYPE, "application/json");
    }
    if let Some(t) = token {
        let value =
            HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| "the token is not a valid header value")?;
        req = req.header(header::AUTHORIZATION, value);
    }
    let req = req.body(Full::new(Bytes::from(bytes))).map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| unreachable(&e))?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.map_err(|e| unreachable(&e))?.to_bytes();
    let value = serde_json::from_slice(&body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()));
    Ok((status, value))
}

const COLUMNS: [&str; 9] = ["SERVICE", "ID", "ADDRESS", "WEIGHT", "STATE", "HEALTH", "IN-FLIGHT", "REQUESTS", "ORIGIN"];

fn backend_row(service: &str, b: &Value) -> Vec<String> {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    vec![
        service.to_owned(),
        text(&b["id"]),
        text(&b["address"]),
        text(&b["weight"]),
        text(&b["state"]),
        text(&b["health"]["status"]),
        text(&b["in_flight"]),
        text(&b["requests_total"]),
        text(&b["origin"]),
    ]
}

fn services_table(answer: &Value) -> String {
    let mut rows = Vec::new();
    for s in answer["services"].as_array().into_iter().flatten() {
        let name = s["name"].as_str().unwrap_or_default();
        for b in s["backends"].as_array().into_iter().flatten() {
            rows.push(backend_row(name, b));
        }
    }
    let mut out = table(&rows);
    for c in answer["conflicts"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "conflict: {}", c.as_str().unwrap_or_default());
    }
    out
}

/// Columns padded to their widest cell, under a header.
fn table(rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = COLUMNS.iter().map(|c| c.len()).collect();
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = COLUMNS.iter().map(|c| c.to_string()).collect();
    for r in std::iter::once(&header).chain(rows) {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

/// A path segment: anything but unreserved characters and `:` is percent-encoded.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_line_up_and_errors_carry_the_field() {
        let answer = json!({"services": [{"name": "web", "backends": [
            {"id": 1, "address": "127.0.0.1:9001", "weight": 1, "state": "active", "health": {"status": "up"}, "in_flight": 0, "requests_total": 12, "origin": "file"}
        ]}], "conflicts": ["x"]});
        let t = services_table(&answer);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "SERVICE  ID  ADDRESS         WEIGHT  STATE   HEALTH  IN-FLIGHT  REQUESTS  ORIGIN");
        assert_eq!(lines[1], "web      1   127.0.0.1:9001  1       active  up      0          12        file");
        assert_eq!(lines[2], "conflict: x");
        let e = error_text(404, &json!({"error": "no service \"x\"", "field": "name"}));
        assert_eq!(e, "error 404: no service \"x\" (field: name)");
        assert_eq!(percent_encode("http://a:1/"), "http:%2F%2Fa:1%2F");
    }
}
