//! The protocol-neutral request path: route, policy, pick, queue, retry, the exchange with a
//! backend (`super::upstream`), the response head and the access-log record. A downstream
//! session (`super::downstream`: HTTP/1 or an HTTP/2 stream) hands a request head in; the
//! answer goes back through the session's [`Downstream`] methods (head, body pieces,
//! trailers, end).
//!
//! Everything for one request runs in its session's task: the backend connection is written
//! and read right here, so a request costs no task hand-off and no channel.

mod cold_start;
mod redirect;
mod respond;

use std::sync::Arc;

use bytes::Bytes;
use tokio::time::Instant;
use tracing::{debug, warn};

pub(super) use respond::LogLine;

use super::downstream::{Downstream, Drain, Session, BODY_READ};
use super::upstream::{AttemptError, Bounds, ReqBody, TimeoutKind, Upstream};
use crate::balancer::Pick;
use crate::config::HealthConfig;
use crate::health::passive::{self, Admission};
use crate::health::{active, retry};
use crate::http1::{ChunkedScanner, RequestHead, ResponseHead};
use crate::observe::{AccessRecord, BackendMetrics, RequestEnd};
use crate::policy::{QueueRejection, Ticket};
use crate::request::RequestView;
use crate::state::{LoadBalancer, Service};
use crate::upstream::InFlight;

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

/// Serve one request whose head has been read. Returns whether the connection may carry
/// another request.
pub async fn handle<D: Downstream>(c: &mut Session<D>, head: &RequestHead, drain: &Drain) -> bool {
    let start = Instant::now();
    let host = head.host().and_then(|h| std::str::from_utf8(h).ok()).unwrap_or("");
    let path = std::str::from_utf8(head.path()).unwrap_or("");
    let (routed, mut log, view, admitted) = {
        let snapshot = c.state.load();
        let view = RequestView::new(head, c.stream.scheme(), D::PROTOCOL, c.client);
        // Computed once: every policy, the hash balancers and the access log use this value.
        let client_ip = snapshot.policy.client_ip(&view);
        let view = view.with_client_ip(client_ip);
        let admitted = c.listener.gate.permits(client_ip) && snapshot.policy.permits(client_ip);
        let log = snapshot.access_log.as_ref().map(|log| {
            let record = AccessRecord {
                client: view.client,
                method: head.method.clone(),
                host: view.authority_bytes(),
                target: view.target_bytes(),
                status: 0,
                service: None,
                backend: None,
                start: start.into_std(),
                bytes: 0,
                bytes_in: None,
                note: None,
            };
            (log.clone(), record)
        });
        // A client the listener refuses is no service's business: counted as unrouted.
        let routed =
            admitted.then(|| snapshot.router.route(host, path).map(|i| snapshot.services[i].clone())).flatten();
        let metrics = routed.as_ref().map_or_else(|| snapshot.metrics.unrouted.clone(), |s| s.metrics.clone());
        let end = RequestEnd::new(metrics, &head.method, start.into_std());
        (routed, LogLine { end, access: log, finished: false }, view, admitted)
    };
    let mut req = Exchange {
        head,
        drain,
        log: &mut log,
        body_pending: head.has_body(),
        continued: false,
        set_cookie: None,
        done: false,
        view,
    };
    let keep_alive = match routed {
        _ if !admitted => Box::pin(req.denied(c)).await,
        _ if c.listener.config.redirect_https => Box::pin(req.redirect_https(c)).await,
        Some(service) => req.serve(c, &service, start).await,
        None => {
            let body = c.state.load().router.explain_miss(host, path);
            req.local(c, 404, &[], body.as_bytes(), "no_route").await
        }
    };
    req.done = true;
    drop(req);
    c.clock = Some(log.finish());
    keep_alive
}

/// One request on its way through.
pub struct Exchange<'a> {
    pub(crate) head: &'a RequestHead,
    pub(crate) drain: &'a Drain,
    pub(crate) log: &'a mut LogLine,
    /// Body bytes the client has still to send (and that Velocity has not read).
    pub(crate) body_pending: bool,
    /// `100 Continue` sent.
    pub(crate) continued: bool,
    /// A `Set-Cookie` value the balancer asked the response to carry.
    pub(crate) set_cookie: Option<Bytes>,
    /// Served to the end. An exchange dropped before that was cut by the listener because
    /// `drain_timeout` passed (the only place a request's future is dropped half-way).
    done: bool,
    /// The request as policies and balancers see it, its client resolved (see
    /// `GlobalGate::client_ip`).
    pub(crate) view: RequestView<'a>,
}

impl Drop for Exchange<'_> {
    fn drop(&mut self) {
        if !self.done && self.drain.is_draining() {
            // The line keeps the status the client saw, if any (`-` if none).
            self.log.note("shutdown");
        }
    }
}

impl Exchange<'_> {
    async fn serve<D: Downstream>(&mut self, c: &mut Session<D>, service: &Arc<Service>, start: Instant) -> bool {
        let head = self.head;
        // Before any backend work: a refused request costs no pool slot and no connection.
        if let Some(gate) = &service.gate {
            if let Err(why) = gate.check(&self.view).await {
                return self.refused(c, service, why).await;
            }
        }
        let lb = service.lb.load_full();
        let timeouts = service.config.limits.timeouts;
        let deadline = start + timeouts.request;
        // When the try begins, as far as the connect timeout and the idle pool care; read again
        // only after a wait (a body read whole, a queue, a retry), so a plain GET reads the
        // clock no more than before.
        let mut now = start;
        let retry = &service.config.health.retry;
        let passive_cfg = &service.config.health.passive;
        let max_body = service.config.limits.max_body_bytes;
        if let (Some(max), Some(len)) = (max_body, head.content_length()) {
            if len > max {
                return self.body_too_large(c, max).await;
            }
        }
        // Counted at the request's arrival, from the clock read that started it.
        service.retry_budget.record_request_at(crate::health::ms_at(start.into_std()));

        let mut body = match head.content_length() {
            _ if head.is_chunked() => ReqBody::Chunked(ChunkedScanner::new()),
            Some(n) if n > 0 => ReqBody::Length(n),
            _ => ReqBody::None,
        };
        // Sending again after a backend received the request: idempotent methods only, and a
        // body held whole (a streamed one is gone once sent). With one backend there is
        // nowhere to send it again.
        let may_replay = retry.attempts > 0 && lb.pool.len() > 1 && retry::idempotent(&head.method);
        if let (true, ReqBody::Length(n)) = (may_replay, &body) {
            if *n <= retry.buffer_body_limit {
                match self.read_whole_body(c, *n as usize, deadline).await {
                    Ok(bytes) => {
                        body = ReqBody::Buffered(bytes);
                        now = Instant::now();
                    }
                    Err(why) => {
                        warn!(service = %service.config.name, error = why, "reading the request body failed");
                        return self.local(c, 400, &[], b"400 bad request body\n", "bad_request_body").await;
                    }
                }
            }
        }

        let mut tried = Tried::default();
        let mut last_failure = String::new();
        let mut retries = 0u32;
        let mut attempted = false;
        let mut bounds = Bounds {
            now,
            connect: timeouts.connect,
            backend_response: timeouts.backend_response,
            deadline,
            max_body,
            upgrade: head.is_websocket_upgrade(),
        };
        // A retryable answer (such as a 503 listed in `retry.on`), kept until another backend
        // takes the request: if none can, the client gets this answer rather than an error.
        let mut held: Option<(Upstream, ResponseHead, InFlight, Option<Bytes>)> = None;
        loop {
            let acquired = {
                let ctx = self.view;
                let pool = &lb.pool;
                let usable = |i: usize| {
                    let b = &pool.backends[i];
                    !tried.contains(i) && b.is_active() && b.health.selectable()
                };
                acquire(service, &lb, &ctx, &usable, deadline.into_std()).await
            };
            let (i, in_flight) = match acquired {
                Acquired::Backend(pick, in_flight, queued) => {
                    if queued {
                        bounds.now = Instant::now();
                    }
                    // The answer that goes out says how to come back here (sticky's cookie).
                    self.set_cookie = pick.set_cookie;
                    (pick.index, in_flight)
                }
                Acquired::NoneUsable => break,
                Acquired::Rejected(why) => return self.queue_rejected(c, service, why).await,
            };
            tried.insert(i);
            let backend = &lb.pool.backends[i];
            let trial = match passive::admit(backend) {
                Admission::Normal => None,
                Admission::Trial(t) => Some(t),
                Admission::Refused => continue,
            };
            attempted = true;
            if retries > 0 {
                bounds.now = Instant::now();
                BackendMetrics::inc(&backend.metrics.retries);
            }
            // Only latency-aware algorithms pay for the clock read.
            let sent_at = lb.balancer.observes_latency().then(std::time::Instant::now);
            // Set when the next try must wait first: only after a backend had the request.
            let mut back_off = true;
            match self.attempt(c, &mut body, backend, bounds).await {
                Ok(conn) => {
                    if let Some(t) = sent_at {
                        backend.load.observe_ttfb(t.elapsed());
                    }
                    let status = c.resp.status;
                    backend.metrics.response(status, bounds.now.into_std());
                    if passive_cfg.on_5xx && (500..600).contains(&status) {
                        let why = StatusReason(status);
                        passive::record_failure(backend, trial, passive_cfg, &lb.pool, &service.config.name, &why);
                    } else {
                        passive::record_success(backend, trial, &service.config.name);
                    }
                    if status == 101 {
                        return Box::pin(D::upgrade(self, c, conn, in_flight, timeouts.tunnel_idle)).await;
                    }
                    if retry.on.contains(&status) && may_replay && body.replayable() && may_retry(service, retries) {
                        warn!(service = %service.config.name, backend = %backend.name, status, retry = retries + 1, "backend answered with a retryable status, retrying on another backend");
                        held = Some((conn, std::mem::take(&mut c.resp), in_flight, self.set_cookie.take()));
                    } else {
                        return D::relay(self, c, conn, in_flight, timeouts.backend_response).await;
                    }
                }
                Err(AttemptError::NotSent(why)) => {
                    BackendMetrics::inc(&backend.metrics.connection_errors);
                    passive::record_failure(backend, trial, passive_cfg, &lb.pool, &service.config.name, &why);
                    warn!(service = %service.config.name, backend = %backend.name, error = %why, "backend unavailable, trying the next one");
                    last_failure = why;
                    if !may_retry(service, retries) {
                        break;
                    }
                    // Nothing was sent, so there is nothing to let settle: the next backend now.
                    back_off = false;
                }
                Err(AttemptError::Local(why)) => {
                    // Not recorded against the backend: the trial (if this was one) is released.
                    drop(trial);
                    warn!(service = %service.config.name, backend = %backend.name, error = %why, "cannot connect to the backend: Velocity is out of a local resource (not counted against the backend)");
                    if let Some((conn, resp, in_flight, cookie)) = held {
                        c.resp = resp;
                        self.set_cookie = cookie;
                        return D::relay(self, c, conn, in_flight, timeouts.backend_response).await;
                    }
                    self.log.set(0, None, Some(backend));
                    let body = b"503 service unavailable: the proxy is out of resources, retry later\n";
                    return self.local(c, 503, &[("retry-after", b"1")], body, "local_error").await;
                }
                Err(AttemptError::Sent(why)) => {
                    passive::record_failure(backend, trial, passive_cfg, &lb.pool, &service.config.name, &why);
                    if may_replay && body.replayable() && may_retry(service, retries) {
                        warn!(service = %service.config.name, backend = %backend.name, error = %why, retry = retries + 1, "backend failed after the request was sent, retrying on another backend");
                    } else {
                        warn!(service = %service.config.name, backend = %backend.name, error = %why, "backend failed after the request was sent");
                        if let Some((conn, resp, in_flight, cookie)) = held {
                            c.resp = resp;
                            self.set_cookie = cookie;
                            return D::relay(self, c, conn, in_flight, timeouts.backend_response).await;
                        }
                        self.log.set(0, None, Some(backend));
                        return self
                            .local(c, 502, &[], b"502 bad gateway: the backend failed\n", "backend_error")
                            .await;
                    }
                }
                Err(AttemptError::Timeout(kind)) => {
                    // The request may be half-way through the backend: not retried, but the
                    // backend's slowness counts against it.
                    if kind == TimeoutKind::Backend {
                        let why = "response timeout";
                        passive::record_failure(backend, trial, passive_cfg, &lb.pool, &service.config.name, &why);
                    }
                    return self.timed_out(c, service, backend, kind, &timeouts).await;
                }
                Err(AttemptError::BodyTooLarge) => {
                    return self.body_too_large(c, max_body.unwrap_or(0)).await;
                }
                Err(AttemptError::ClientGone) => {
                    // Not the backend's fault; dropping its connection tells it the request is off.
                    debug!(client = %c.client, backend = %backend.name, "client closed the connection before the answer came");
                    self.log.set(499, Some("client_aborted"), Some(backend));
                    return false;
                }
                Err(AttemptError::ClientBody(why)) => {
                    debug!(client = %c.client, error = why, "the client's request body failed");
                    self.log.set(400, Some("bad_request_body"), Some(backend));
                    self.body_pending = true;
                    return self.local(c, 400, &[], b"400 bad request body\n", "bad_request_body").await;
                }
            }
            if back_off {
                tokio::time::sleep(retry::backoff(retry.backoff_base, retry.backoff_max, retries)).await;
            }
            retries += 1;
        }
        if let Some((conn, resp, in_flight, cookie)) = held {
            c.resp = resp;
            self.set_cookie = cookie;
            return D::relay(self, c, conn, in_flight, timeouts.backend_response).await;
        }
        if !attempted && lb.pool.is_empty() && service.config.managed.is_some() {
            if let Some(now) = Box::pin(cold_start::wait(&c.state, service, deadline.into_std())).await {
                return Box::pin(self.serve(c, &now, start)).await;
            }
        }
        if !attempted {
            // Nothing was even tried: every backend is down or ejected.
            warn!(service = %service.config.name, "no healthy backend, request dropped");
            let body = format!("503 service unavailable: no healthy backend for service {}\n", service.config.name);
            let wait = retry_after(&service.config.health).to_string();
            let extra = [("retry-after", wait.as_bytes())];
            return self.local(c, 503, &extra, body.as_bytes(), "no_healthy_backend").await;
        }
        warn!(service = %service.config.name, last_error = %last_failure, "no backend could take the request");
        let body = format!("502 bad gateway: no backend of service {} is reachable\n", service.config.name);
        self.local(c, 502, &[], body.as_bytes(), "no_backend").await
    }

    /// Tell a client that waits for it (`Expect: 100-continue`) to send its body.
    pub(super) async fn send_continue<D: Downstream>(&mut self, c: &mut Session<D>) -> Result<(), &'static str> {
        if self.head.expects_continue() && !self.continued {
            self.continued = true;
            D::send_continue(c).await.map_err(|_| "client went away")?;
        }
        Ok(())
    }

    /// Read a body of `len` bytes whole, within the request deadline.
    async fn read_whole_body<D: Downstream>(
        &mut self,
        c: &mut Session<D>,
        len: usize,
        deadline: Instant,
    ) -> Result<Bytes, &'static str> {
        self.send_continue(c).await?;
        while c.buf.len() < len {
            match c.timer.within(|| deadline, c.stream.read_body(&mut c.buf, BODY_READ)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return Err("client closed the connection during the body"),
                Err(_) => return Err("request timeout while reading the body"),
            }
        }
        self.body_pending = false;
        self.log.end.bytes_in += len as u64;
        Ok(c.buf.split_to(len).freeze())
    }
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

/// Seconds a client should wait when no backend is healthy: about the time for a down backend
/// to pass enough checks (or for an ejection to end), at least one.
fn retry_after(health: &HealthConfig) -> u64 {
    let wait = match &health.check {
        Some(c) => active::recovery_hint(c),
        None => health.passive.base_ejection,
    };
    wait.as_secs_f64().ceil().max(1.0) as u64
}

/// `status 503`, for logs, without formatting on the success path.
struct StatusReason(u16);

impl std::fmt::Display for StatusReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "status {}", self.0)
    }
}

/// What [`acquire`] found.
enum Acquired {
    /// The backend, its in-flight count, and whether the request waited in the queue first.
    Backend(Pick, InFlight, bool),
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
    ctx: &RequestView<'_>,
    usable: &(dyn Fn(usize) -> bool + Sync),
    deadline: std::time::Instant,
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
            if let Some(pick) = lb.balancer.pick(&lb.pool, ctx, &has_room) {
                if let Some(in_flight) = lb.pool.backends[pick.index].try_start_request() {
                    let queued = ticket.is_some();
                    if let Some(t) = ticket.take() {
                        t.done();
                    }
                    return Acquired::Backend(pick, in_flight, queued);
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
                    wait_until = deadline.min(std::time::Instant::now() + limits.timeout);
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
