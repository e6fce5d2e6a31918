//! The per-request path: route, pick a backend, forward, stream the answer back.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::http::uri::PathAndQuery;
use hyper::{Request, Response, StatusCode, Uri};
use tracing::warn;

use super::body::ResponseBody;
use super::headers;
use crate::balancer::RequestContext;
use crate::observe::{AccessLog, AccessRecord};
use crate::state::{Shared, DEFAULT_CONNECT_TIMEOUT};
use crate::upstream::{Backend, PooledConnection, RequestBody, UpstreamBody};

/// What a client connection's requests share; built once per accepted connection.
pub struct ConnContext {
    pub state: Shared,
    pub client: SocketAddr,
    /// The client's IP as a header value, made once per connection for `X-Forwarded-For`.
    client_ip: HeaderValue,
    proto: HeaderValue,
}

impl ConnContext {
    pub fn new(state: Shared, client: SocketAddr) -> Self {
        let client_ip = HeaderValue::from_str(&client.ip().to_string()).unwrap_or(HeaderValue::from_static("unknown"));
        ConnContext { state, client, client_ip, proto: HeaderValue::from_static("http") }
    }
}

/// Backends already tried for this request.
#[derive(Default)]
struct Tried {
    low: u128,
    high: Vec<usize>,
}

impl Tried {
    fn insert(&mut self, i: usize) {
        if i < 128 {
            self.low |= 1 << i;
        } else {
            self.high.push(i);
        }
    }

    fn contains(&self, i: usize) -> bool {
        if i < 128 {
            self.low & (1 << i) != 0
        } else {
            self.high.contains(&i)
        }
    }
}

/// Why one attempt at one backend failed.
// The request travels by value: boxing it would cost an allocation on every failed attempt.
#[allow(clippy::large_enum_variant)]
enum AttemptError {
    /// The request never reached the backend; it is handed back for the next backend.
    NotSent(Request<RequestBody>, String),
    /// The backend failed after the request was sent.
    Sent(hyper::Error),
}

pub async fn handle(conn: Arc<ConnContext>, mut req: Request<Incoming>) -> Result<Response<ResponseBody>, Infallible> {
    let snapshot = conn.state.load_full();

    let host = req
        .headers()
        .get(header::HOST)
        .cloned()
        .or_else(|| req.uri().authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
    let host_str = host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or("");
    let log = snapshot.access_log.as_ref().map(|log| {
        let record = AccessRecord {
            client: conn.client,
            method: req.method().clone(),
            host: host.clone(),
            uri: req.uri().clone(),
            status: 0,
            backend: None,
            start: Instant::now(),
            bytes: 0,
            note: None,
        };
        (log.clone(), record)
    });

    let Some(service) = snapshot.router.route(host_str, req.uri().path()) else {
        let body = format!("no service for host {host_str:?}\n");
        return Ok(local(StatusCode::NOT_FOUND, body.into(), log, "no_route"));
    };
    let service = snapshot.services[service].clone();
    drop(snapshot);
    let lb = service.lb.load_full();

    let had_host = req.headers().contains_key(header::HOST);
    headers::strip_hop_by_hop(req.headers_mut());
    headers::add_forwarding(req.headers_mut(), &conn.client_ip, &conn.proto, host.as_ref());
    if req.uri().scheme().is_some() {
        // Absolute-form from the client: backends get origin-form.
        let pq = req.uri().path_and_query().cloned().unwrap_or(PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(pq);
    }
    let mut req = req.map(RequestBody::Streamed);

    let mut tried = Tried::default();
    let mut last_failure = String::new();
    for _ in 0..lb.pool.len() {
        let ctx = RequestContext {
            client_ip: conn.client.ip(),
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
        };
        let Some(i) = lb.balancer.pick(&lb.pool, &ctx, &|i| !tried.contains(i)) else { break };
        tried.insert(i);
        let backend = &lb.pool.backends[i];
        if !had_host {
            req.headers_mut().insert(header::HOST, backend.host_header.clone());
        }
        let in_flight = backend.start_request();
        match attempt(backend, req).await {
            Ok((mut resp, pooled)) => {
                headers::strip_hop_by_hop(resp.headers_mut());
                let log = log.map(|(l, mut r)| {
                    r.status = resp.status().as_u16();
                    r.backend = Some(backend.clone());
                    (l, r)
                });
                return Ok(resp.map(|body| ResponseBody::upstream(UpstreamBody::new(body, pooled, in_flight), log)));
            }
            Err(AttemptError::NotSent(back, why)) => {
                warn!(service = %service.config.name, backend = %backend.name, error = %why, "backend unavailable, trying the next one");
                last_failure = why;
                req = back;
            }
            Err(AttemptError::Sent(e)) => {
                warn!(service = %service.config.name, backend = %backend.name, error = %e, "backend failed after the request was sent");
                let log = log.map(|(l, mut r)| {
                    r.backend = Some(backend.clone());
                    (l, r)
                });
                return Ok(local(
                    StatusCode::BAD_GATEWAY,
                    Bytes::from_static(b"502 bad gateway: the backend failed\n"),
                    log,
                    "backend_error",
                ));
            }
        }
    }
    warn!(service = %service.config.name, last_error = %last_failure, "no backend could take the request");
    let body = format!("502 bad gateway: no backend of service {} is reachable\n", service.config.name);
    Ok(local(StatusCode::BAD_GATEWAY, body.into(), log, "no_backend"))
}

/// One try at one backend: a pooled connection (or a new one), then the request.
async fn attempt(
    backend: &Arc<Backend>,
    req: Request<RequestBody>,
) -> Result<(Response<Incoming>, PooledConnection), AttemptError> {
    let mut conn = match backend.checkout(DEFAULT_CONNECT_TIMEOUT).await {
        Ok(c) => c,
        Err(e) => return Err(AttemptError::NotSent(req, e.to_string())),
    };
    match conn.send(req).await {
        Ok(resp) => Ok((resp, conn)),
        Err((e, None)) => Err(AttemptError::Sent(e)),
        Err((e, Some(req))) if !conn.reused => Err(AttemptError::NotSent(req, e.to_string())),
        Err((_, Some(req))) => {
            // The backend closed an idle connection just as we picked it: one fresh try.
            let mut fresh = match backend.connect(DEFAULT_CONNECT_TIMEOUT).await {
                Ok(c) => c,
                Err(e) => return Err(AttemptError::NotSent(req, e.to_string())),
            };
            match fresh.send(req).await {
                Ok(resp) => Ok((resp, fresh)),
                Err((e, Some(req))) => Err(AttemptError::NotSent(req, e.to_string())),
                Err((e, None)) => Err(AttemptError::Sent(e)),
            }
        }
    }
}

fn local(
    status: StatusCode,
    body: Bytes,
    log: Option<(AccessLog, AccessRecord)>,
    note: &'static str,
) -> Response<ResponseBody> {
    let log = log.map(|(l, mut r)| {
        r.status = status.as_u16();
        r.note = Some(note);
        (l, r)
    });
    let mut resp = Response::new(ResponseBody::local(body, log));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}
