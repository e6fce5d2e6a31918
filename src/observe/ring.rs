//! The most recent access-log lines in memory, for `GET /api/v1/logs` and the dashboard: an
//! operator sees what failed without shell access. Filled by the access-log writer thread
//! (never by a request), bounded by `access_log_ring` lines.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Lines kept unless the config says otherwise.
pub const DEFAULT_LINES: usize = 10_000;
/// The most `limit` may ask for at once.
pub const DEFAULT_LIMIT: usize = 100;

/// One access-log line: what filters look at, and the line as a JSON object.
#[derive(Debug, Clone)]
pub struct Entry {
    pub status: u16,
    pub service: Option<Arc<str>>,
    pub json: String,
}

#[derive(Debug)]
pub struct Ring {
    capacity: AtomicUsize,
    lines: Mutex<VecDeque<Entry>>,
}

/// Which lines a query wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub status: StatusFilter,
    pub service: Option<String>,
    pub limit: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    Any,
    /// `5xx`: 500-599.
    Class(u16),
    Exact(u16),
}

impl StatusFilter {
    fn matches(self, status: u16) -> bool {
        match self {
            StatusFilter::Any => true,
            StatusFilter::Class(c) => status / 100 == c,
            StatusFilter::Exact(s) => status == s,
        }
    }
}

impl Query {
    /// Parse a query string (`status=5xx&service=web&limit=100`); unknown keys are errors, so a
    /// typo does not silently return everything. An error names the parameter.
    pub fn parse(query: &str) -> Result<Query, (&'static str, String)> {
        let mut q = Query { status: StatusFilter::Any, service: None, limit: DEFAULT_LIMIT };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value);
            match key {
                "status" => q.status = status_filter(&value).map_err(|e| ("status", e))?,
                "service" => q.service = Some(value),
                "limit" => {
                    q.limit = value
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| ("limit", format!("limit must be a whole number above 0, got {value:?}")))?
                }
                other => return Err(("query", format!("unknown parameter {other:?}: use status, service or limit"))),
            }
        }
        Ok(q)
    }
}

fn status_filter(v: &str) -> Result<StatusFilter, String> {
    let bad = || format!("status must be like 5xx or 502, got {v:?}");
    let b = v.as_bytes();
    if b.len() == 3 && b[1..].eq_ignore_ascii_case(b"xx") && (b'1'..=b'5').contains(&b[0]) {
        return Ok(StatusFilter::Class(u16::from(b[0] - b'0')));
    }
    match v.parse::<u16>() {
        Ok(s) if (100..=599).contains(&s) => Ok(StatusFilter::Exact(s)),
        _ => Err(bad()),
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'+', _) => out.push(b' '),
            (b'%', Some(v)) => {
                out.push(v);
                i += 2;
            }
            (c, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Ring {
    pub fn new(capacity: usize) -> Ring {
        Ring { capacity: AtomicUsize::new(capacity), lines: Mutex::new(VecDeque::new()) }
    }

    /// A reload may change the size; 0 turns the ring off.
    pub fn set_capacity(&self, capacity: usize) {
        self.capacity.store(capacity, Ordering::Relaxed);
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        while lines.len() > capacity {
            lines.pop_front();
        }
        if capacity == 0 {
            lines.shrink_to_fit();
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity.load(Ordering::Relaxed)
    }

    pub fn push(&self, entry: Entry) {
        let capacity = self.capacity();
        if capacity == 0 {
            return;
        }
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        while lines.len() >= capacity {
            lines.pop_front();
        }
        lines.push_back(entry);
    }

    /// The newest lines matching `q`, newest first, as one JSON object: `{"lines":[...]}`.
    pub fn query_json(&self, q: &Query) -> String {
        let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::from("{\"lines\":[");
        let matching = lines.iter().rev().filter(|e| {
            q.status.matches(e.status) && q.service.as_deref().is_none_or(|s| e.service.as_deref() == Some(s))
        });
        for (i, e) in matching.take(q.limit).enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&e.json);
        }
        out.push_str("]}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(status: u16, service: &str, n: usize) -> Entry {
        Entry { status, service: Some(service.into()), json: format!("{{\"n\":{n}}}") }
    }

    #[test]
    fn filters_newest_first_within_the_bound() {
        let ring = Ring::new(4);
        for (n, (status, service)) in
            [(200, "web"), (502, "web"), (503, "api"), (500, "web"), (404, "web")].into_iter().enumerate()
        {
            ring.push(entry(status, service, n));
        }
        let all = Query::parse("").unwrap();
        assert_eq!(ring.query_json(&all), r#"{"lines":[{"n":4},{"n":3},{"n":2},{"n":1}]}"#);
        let q = Query::parse("status=5xx&service=web&limit=100").unwrap();
        assert_eq!(ring.query_json(&q), r#"{"lines":[{"n":3},{"n":1}]}"#);
        let q = Query::parse("status=503&limit=1").unwrap();
        assert_eq!(ring.query_json(&q), r#"{"lines":[{"n":2}]}"#);
        ring.set_capacity(1);
        assert_eq!(ring.query_json(&all), r#"{"lines":[{"n":4}]}"#);
    }

    #[test]
    fn bad_queries_say_why() {
        assert!(Query::parse("status=6xx").is_err());
        assert!(Query::parse("limit=0").is_err());
        assert!(Query::parse("servce=web").is_err());
        assert_eq!(Query::parse("service=my%20web").unwrap().service.as_deref(), Some("my web"));
        assert_eq!(Query::parse("status=4XX").unwrap().status, StatusFilter::Class(4));
    }
}
