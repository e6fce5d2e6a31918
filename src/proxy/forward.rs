//! The per-request path: route, pick a backend, forward, stream the answer back.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::http::uri::PathAndQuery;
use hyper::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use tracing::{debug, warn};

use super::body::ResponseBody;
use super::headers;
use crate::balancer::RequestContext;
use crate::config::{HealthConfig, Timeouts};
use crate::health::passive::{self, Admission};
use crate::health::{active, retry};
use crate::observe::{AccessLog, AccessRecord};
use crate::policy::{QueueRejection, Ticket};
use crate::state::{LoadBalancer, Service, Shared};
use crate::upstream::{Backend, BoxError, InFlight, LimitedBody, PooledConnection, RequestBody, UpstreamBody};

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
    /// No response headers in time: 504.
    Timeout(TimeoutKind),
    /// The client's (chunked) body went over `max_body_bytes` while it was being sent: 413.
    BodyTooLarge,
}

/// Which deadline ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimeoutKind {
    /// `backend_response`: the backend took too long to answer this attempt.
    Backend,
    /// `request`: the whole exchange took too long.
    Request,
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
    let timeouts = service.config.limits.timeouts;
    let deadline = Instant::now() + timeouts.request;

    let had_host = req.headers().contains_key(header::HOST);
    headers::strip_hop_by_hop(req.headers_mut());
    headers::add_forwarding(req.headers_mut(), &conn.client_ip, &conn.proto, host.as_ref());
    if req.uri().scheme().is_some() {
        // Absolute-form from the client: backends get origin-form.
        let pq = req.uri().path_and_query().cloned().unwrap_or(PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(pq);
    }
    let retry = &service.config.health.retry;
    let passive_cfg = &service.config.health.passive;
    service.retry_budget.record_request();
    let Some(mut req) = limit_body(req, service.config.limits.max_body_bytes) else {
        return Ok(body_too_large(&service, log));
    };
    // What it takes to send the request again after a backend received it: idempotent methods
    // only, and a body we hold (empty, or small enough to buffer). A streamed body is gone once
    // sent, so such a request is only ever moved when its connection failed before sending.
    let mut replay = None;
    // A retry goes to another backend: with one backend there is nothing to replay for.
    if retry.attempts > 0 && lb.pool.len() > 1 && retry::idempotent(req.method()) {
        match Replay::prepare(&mut req, retry.buffer_body_limit).await {
            Ok(r) => replay = r,
            Err(e) => {
                warn!(service = %service.config.name, error = %e, "reading the request body failed");
                return Ok(local(
                    StatusCode::BAD_REQUEST,
                    Bytes::from_static(b"400 bad request body\n"),
                    log,
                    "bad_request_body",
                ));
            }
        }
    }

    let mut tried = Tried::default();
    let mut last_failure = String::new();
    let mut retries = 0u32;
    let mut attempted = false;
    // A retryable answer (such as a 503 listed in `retry.on`), kept until another backend takes
    // the request: if none can, the client gets this answer rather than an error of ours.
    let mut held: Option<(Response<Incoming>, PooledConnection, InFlight)> = None;
    loop {
        let acquired = {
            let ctx = RequestContext {
                client_ip: conn.client.ip(),
                method: req.method(),
                uri: req.uri(),
                headers: req.headers(),
            };
            let pool = &lb.pool;
            let usable = |i: usize| !tried.contains(i) && pool.backends[i].health.selectable();
            acquire(&service, &lb, &ctx, &usable, deadline).await
        };
        let (i, in_flight) = match acquired {
            Acquired::Backend(i, in_flight) => (i, in_flight),
            Acquired::NoneUsable => break,
            Acquired::Rejected(why) => return Ok(queue_rejected(&service, why, log)),
        };
        tried.insert(i);
        let backend = &lb.pool.backends[i];
        let trial = match passive::admit(backend) {
            Admission::Normal => None,
            Admission::Trial(t) => Some(t),
            Admission::Refused => continue,
        };
        attempted = true;
        if !had_host {
            req.headers_mut().insert(header::HOST, backend.host_header.clone());
        }
        match attempt(backend, req, &timeouts, deadline).await {
            Ok((resp, pooled)) => {
                let status = resp.status();
                if passive_cfg.on_5xx && status.is_server_error() {
                    let why = StatusReason(status.as_u16());
                    passive::record_failure(backend, trial, passive_cfg, &lb.pool, &service.config.name, &why);
                } else {
                    passive::record_success(backend, trial, &service.config.name);
                }
                let again = match &replay {
                    Some(r) if retry.on.contains(&status.as_u16()) && may_retry(&service, retries) => r,
                    _ => return Ok(forward(resp, pooled, in_flight, timeouts.backend_response, log)),
                };
                warn!(service = %service.config.name, backend = %backend.name, status = status.as_u16(), retry = retries + 1, "backend answered with a retryable status, retrying on another backend");
                held = Some((resp, pooled, in_flight));
                req = again.request();
            }
            Err(AttemptError::NotSent(back, why)) => {
                passive::record_failure(backend, trial, passive_cfg, &lb.pool, &service.config.name, &why);
                warn!(service = %service.config.name, backend = %backend.name, error = %why, "backend unavailable, trying the next one");
                last_failure = why;
                req = back;
                if !may_retry(&service, retries) {
                    break;
                }
            }
            Err(AttemptError::Sent(e)) => {
                // A failure reading the client's body is not the backend's fault.
                if !e.is_user() {
                    passive::record_failure(backend, trial, passive_cfg, &lb.pool, &service.config.name, &e);
                }
                match &replay {
                    Some(r) if !e.is_user() && may_retry(&service, retries) => {
                        warn!(service = %service.config.name, backend = %backend.name, error = %e, retry = retries + 1, "backend failed after the request was sent, retrying on another backend");
                        req = r.request();
                    }
                    _ => {
                        warn!(service = %service.config.name, backend = %backend.name, error = %e, "backend failed after the request was sent");
                        if let Some((resp, pooled, in_flight)) = held {
                            return Ok(forward(resp, pooled, in_flight, timeouts.backend_response, log));
                        }
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
            Err(AttemptError::Timeout(kind)) => {
                // The request may be half-way through the backend: not retried, but the
                // backend's slowness counts against it.
                if kind == TimeoutKind::Backend {
                    passive::record_failure(
                        backend,
                        trial,
                        passive_cfg,
                        &lb.pool,
                        &service.config.name,
                        &"response timeout",
                    );
                }
                return Ok(timed_out(&service, backend, kind, &timeouts, log));
            }
            Err(AttemptError::BodyTooLarge) => return Ok(body_too_large(&service, log)),
        }
        tokio::time::sleep(retry::backoff(retry.backoff_base, retry.backoff_max, retries)).await;
        retries += 1;
    }
    if let Some((resp, pooled, in_flight)) = held {
        return Ok(forward(resp, pooled, in_flight, timeouts.backend_response, log));
    }
    if !attempted {
        // Nothing was even tried: every backend is down or ejected.
        warn!(service = %service.config.name, "no healthy backend, request dropped");
        let body = format!("503 service unavailable: no healthy backend for service {}\n", service.config.name);
        let mut resp = local(StatusCode::SERVICE_UNAVAILABLE, body.into(), log, "no_healthy_backend");
        resp.headers_mut().insert(header::RETRY_AFTER, retry_after(&service.config.health));
        return Ok(resp);
    }
    warn!(service = %service.config.name, last_error = %last_failure, "no backend could take the request");
    let body = format!("502 bad gateway: no backend of service {} is reachable\n", service.config.name);
    Ok(local(StatusCode::BAD_GATEWAY, body.into(), log, "no_backend"))
}

/// Whether one more try is allowed: attempts left, and room in the service's retry budget.
fn may_retry(service: &Service, retries: u32) -> bool {
    if retries >= service.config.health.retry.attempts {
        return false;
    }
    if !service.retry_budget.try_retry() {
        debug!(service = %service.config.name, "retry budget exhausted, not retrying");
        return false;
    }
    true
}

/// A backend's answer, on its way to the client.
fn forward(
    mut resp: Response<Incoming>,
    pooled: PooledConnection,
    in_flight: InFlight,
    read_timeout: Duration,
    log: Option<(AccessLog, AccessRecord)>,
) -> Response<ResponseBody> {
    headers::strip_hop_by_hop(resp.headers_mut());
    let log = log.map(|(l, mut r)| {
        r.status = resp.status().as_u16();
        r.backend = Some(in_flight.backend().clone());
        (l, r)
    });
    resp.map(|body| ResponseBody::upstream(UpstreamBody::new(body, pooled, in_flight, read_timeout), log))
}

/// Seconds a client should wait when no backend is healthy: about the time for a down backend
/// to pass enough checks (or for an ejection to end), at least one.
fn retry_after(health: &HealthConfig) -> HeaderValue {
    let wait = match &health.check {
        Some(c) => active::recovery_hint(c),
        None => health.passive.base_ejection,
    };
    HeaderValue::from(wait.as_secs_f64().ceil().max(1.0) as u64)
}

/// `status 503`, for logs, without formatting on the success path.
struct StatusReason(u16);

impl std::fmt::Display for StatusReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "status {}", self.0)
    }
}

/// The parts of a request needed to send it again.
struct Replay {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    /// `None`: no body.
    body: Option<Bytes>,
}

impl Replay {
    /// A replayable copy of `req`, buffering its body first when it has a Content-Length of at
    /// most `limit`; `None` when the body is streamed (unknown or larger length).
    async fn prepare(req: &mut Request<RequestBody>, limit: u64) -> Result<Option<Replay>, BoxError> {
        let body = if req.body().is_end_stream() {
            None
        } else {
            match req.body().size_hint().exact() {
                Some(n) if n <= limit => {
                    let taken = std::mem::replace(req.body_mut(), RequestBody::Empty(Empty::new()));
                    // Bounded: the length is known and small, and hyper enforces it.
                    let bytes = taken.collect().await?.to_bytes();
                    *req.body_mut() = RequestBody::Buffered(Full::new(bytes.clone()));
                    Some(bytes)
                }
                _ => return Ok(None),
            }
        };
        Ok(Some(Replay {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
            body,
        }))
    }

    fn request(&self) -> Request<RequestBody> {
        let body = match &self.body {
            Some(b) => RequestBody::Buffered(Full::new(b.clone())),
            None => RequestBody::Empty(Empty::new()),
        };
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// One try at one backend: a pooled connection (or a new one), then the request.
/// One try at one backend: a pooled connection (or a new one), then the request, within the
/// connect timeout, and `backend_response` or the request `deadline`, whichever is sooner.
async fn attempt(
    backend: &Arc<Backend>,
    req: Request<RequestBody>,
    timeouts: &Timeouts,
    deadline: Instant,
) -> Result<(Response<Incoming>, PooledConnection), AttemptError> {
    let now = Instant::now();
    if now >= deadline {
        return Err(AttemptError::Timeout(TimeoutKind::Request));
    }
    let connect_timeout = timeouts.connect.min(deadline - now);
    let over_limit = match req.body() {
        RequestBody::Limited(b) => Some(b.exceeded()),
        _ => None,
    };
    let mut conn = match backend.checkout(connect_timeout).await {
        Ok(c) => c,
        Err(e) => return Err(AttemptError::NotSent(req, e.to_string())),
    };
    match send_within(&mut conn, req, timeouts, deadline, over_limit.as_deref()).await {
        Ok(resp) => Ok((resp, conn)),
        Err(SendError::Failed(_, Some(req))) if conn.reused => {
            // The backend closed an idle connection just as we picked it: one fresh try.
            let mut fresh = match backend.connect(connect_timeout).await {
                Ok(c) => c,
                Err(e) => return Err(AttemptError::NotSent(req, e.to_string())),
            };
            match send_within(&mut fresh, req, timeouts, deadline, over_limit.as_deref()).await {
                Ok(resp) => Ok((resp, fresh)),
                Err(e) => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

enum SendError {
    Failed(hyper::Error, Option<Request<RequestBody>>),
    Other(AttemptError),
}

impl From<SendError> for AttemptError {
    fn from(e: SendError) -> Self {
        match e {
            SendError::Failed(e, None) => AttemptError::Sent(e),
            SendError::Failed(e, Some(req)) => AttemptError::NotSent(req, e.to_string()),
            SendError::Other(e) => e,
        }
    }
}

/// Send on `conn` and wait for the response headers until the sooner of `backend_response`
/// from now and the request deadline. Dropping the response future on a timeout makes hyper
/// close that backend connection, so a late answer cannot be taken for the next request's.
async fn send_within(
    conn: &mut PooledConnection,
    req: Request<RequestBody>,
    timeouts: &Timeouts,
    deadline: Instant,
    over_limit: Option<&AtomicBool>,
) -> Result<Response<Incoming>, SendError> {
    let backend_deadline = Instant::now() + timeouts.backend_response;
    let (until, kind) = if backend_deadline < deadline {
        (backend_deadline, TimeoutKind::Backend)
    } else {
        (deadline, TimeoutKind::Request)
    };
    match tokio::time::timeout_at(until.into(), conn.send(req)).await {
        Err(_) => Err(SendError::Other(AttemptError::Timeout(kind))),
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(_)) if over_limit.is_some_and(|f| f.load(Ordering::Relaxed)) => {
            Err(SendError::Other(AttemptError::BodyTooLarge))
        }
        Ok(Err((e, req))) => Err(SendError::Failed(e, req)),
    }
}

/// What [`acquire`] found.
enum Acquired {
    Backend(usize, InFlight),
    /// No backend is usable (all tried, or none eligible): not a capacity problem.
    NoneUsable,
    Rejected(QueueRejection),
}

/// Pick a usable backend with room under its `max_connections` and count the request on it.
/// When every usable backend is full, wait in the service's queue (FIFO, at most `queue.size`
/// requests, at most `queue.timeout` and never past the request deadline).
async fn acquire(
    service: &Service,
    lb: &LoadBalancer,
    ctx: &RequestContext<'_>,
    usable: &(dyn Fn(usize) -> bool + Sync),
    deadline: Instant,
) -> Acquired {
    let queue = &service.queue;
    let limits = &service.config.limits.queue;
    let mut ticket: Option<Ticket> = None;
    // Set on joining: being woken and sent back to the front does not restart the clock.
    let mut wait_until = deadline;
    loop {
        // Requests already waiting go first: a newcomer may only pick when nobody waits.
        if ticket.is_some() || queue.depth() == 0 {
            let has_room = |i: usize| usable(i) && lb.pool.backends[i].has_capacity();
            if let Some(i) = lb.balancer.pick(&lb.pool, ctx, &has_room) {
                if let Some(in_flight) = lb.pool.backends[i].try_start_request() {
                    if let Some(t) = ticket.take() {
                        t.done();
                    }
                    return Acquired::Backend(i, in_flight);
                }
                // Another request took the last slot between the check and the count.
            } else if !(0..lb.pool.len()).any(usable) {
                return Acquired::NoneUsable;
            }
        }
        match ticket.as_mut() {
            // Woken, but the slot went to someone else: back to the front.
            Some(t) => t.requeue_front(),
            None => match queue.join(limits.size) {
                Ok(t) => {
                    ticket = Some(t);
                    wait_until = deadline.min(Instant::now() + limits.timeout);
                    // A request may have ended between our pick and the join, waking nobody:
                    // look once more before sleeping.
                    continue;
                }
                Err(why) => return Acquired::Rejected(why),
            },
        }
        if let Some(t) = ticket.as_mut() {
            if let Err(why) = t.wait(wait_until).await {
                return Acquired::Rejected(why);
            }
        }
    }
}

/// The request with its body limit applied: `None` when its Content-Length is already over.
/// A body of unknown length is counted as it streams.
fn limit_body(req: Request<Incoming>, max: Option<u64>) -> Option<Request<RequestBody>> {
    let Some(max) = max else { return Some(req.map(RequestBody::Streamed)) };
    match req.body().size_hint().exact() {
        // hyper enforces a Content-Length, so a body within it needs no counting.
        Some(len) if len > max => None,
        Some(_) => Some(req.map(RequestBody::Streamed)),
        None => Some(req.map(|b| RequestBody::Limited(LimitedBody::new(b, max)))),
    }
}

fn body_too_large(service: &Service, log: Option<(AccessLog, AccessRecord)>) -> Response<ResponseBody> {
    let max = service.config.limits.max_body_bytes.unwrap_or(0);
    let body = format!("413 content too large: the limit is {max} bytes\n");
    let mut resp = local(StatusCode::PAYLOAD_TOO_LARGE, body.into(), log, "body_too_large");
    // The rest of the body is never read, so the connection cannot be reused.
    resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

fn queue_rejected(
    service: &Service,
    why: QueueRejection,
    log: Option<(AccessLog, AccessRecord)>,
) -> Response<ResponseBody> {
    let q = service.config.limits.queue;
    warn!(
        service = %service.config.name,
        reason = why.note(),
        queue_size = q.size,
        queue_timeout = ?q.timeout,
        "every backend is at max_connections and the request could not wait: 503"
    );
    let mut resp = local(
        StatusCode::SERVICE_UNAVAILABLE,
        Bytes::from_static(b"503 service unavailable: all backends are busy, retry later\n"),
        log,
        why.note(),
    );
    // About the longest a queued request would have waited.
    let secs = q.timeout.as_secs_f64().ceil().max(1.0) as u64;
    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    resp
}

fn timed_out(
    service: &Service,
    backend: &Arc<Backend>,
    kind: TimeoutKind,
    timeouts: &Timeouts,
    log: Option<(AccessLog, AccessRecord)>,
) -> Response<ResponseBody> {
    let (what, limit, note) = match kind {
        TimeoutKind::Backend => ("backend_response", timeouts.backend_response, "backend_timeout"),
        TimeoutKind::Request => ("request", timeouts.request, "request_timeout"),
    };
    warn!(service = %service.config.name, backend = %backend.name, timeout = what, limit = ?limit, "no response headers in time: 504");
    let log = log.map(|(l, mut r)| {
        r.backend = Some(backend.clone());
        (l, r)
    });
    local(
        StatusCode::GATEWAY_TIMEOUT,
        Bytes::from_static(b"504 gateway timeout: the backend did not answer in time\n"),
        log,
        note,
    )
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
