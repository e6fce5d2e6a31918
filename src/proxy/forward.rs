//! The per-request path: route, pick a backend, send the request, read the answer's head
//! (`respond.rs` streams the answer back).
//!
//! Everything for one request runs in its client connection's task: the backend connection is
//! written and read right here, so a request costs no task hand-off and no channel.

use std::io::IoSlice;
use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::client::{read_more, ClientConn, Drain, BODY_READ};
use super::respond::LogLine;
use super::stream::ClientStream;
use crate::balancer::{Pick, RequestContext};
use crate::config::HealthConfig;
use crate::health::passive::{self, Admission};
use crate::health::{active, retry};
use crate::http1::{ChunkedScanner, Forwarding, RequestHead, ResponseHead};
use crate::observe::{AccessRecord, BackendMetrics, RequestEnd};
use crate::policy::{QueueRejection, Ticket};
use crate::state::{LoadBalancer, Service};
use crate::upstream::{Backend, BackendConn, ConnectError, InFlight};

/// A backend's response head may not be larger than this: 502.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Bytes of the client's next requests read while a response is awaited; beyond this the
/// client is no longer watched (TCP holds the rest back).
const MAX_PIPELINED: usize = 64 * 1024;

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

/// The request body, as far as it has been read from the client.
enum ReqBody {
    None,
    /// Read whole before the first try, so a retry can send it again.
    Buffered(Bytes),
    /// Streamed from the client while it is sent: bytes still to come.
    Length(u64),
    Chunked(ChunkedScanner),
    /// Streamed to a backend already: the request cannot be sent again.
    Gone,
}

impl ReqBody {
    /// Whether the request can be sent again as it was.
    fn replayable(&self) -> bool {
        matches!(self, ReqBody::None | ReqBody::Buffered(_))
    }
}

/// Why one exchange with one backend failed.
enum AttemptError {
    /// Nothing reached the backend: the request may go to the next one.
    NotSent(String),
    /// No connection could be opened for a reason of Velocity's own (out of file descriptors,
    /// say): not the backend's failure, and another backend would fare no better.
    Local(String),
    /// The backend failed after (part of) the request was sent.
    Sent(String),
    /// No response headers in time: 504.
    Timeout(TimeoutKind),
    /// The client's (chunked) body went over `max_body_bytes` while it was being sent: 413.
    BodyTooLarge,
    /// The client's body ended early or was malformed: nothing more can be done.
    ClientBody(&'static str),
    /// The client closed its connection while waiting for the answer.
    ClientGone,
}

/// Which deadline ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TimeoutKind {
    /// `backend_response`: the backend took too long to answer this attempt.
    Backend,
    /// `request`: the whole exchange took too long.
    Request,
}

/// What bounds one try at a backend.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    /// About when the try starts (the request's arrival, or later after a wait): for the
    /// connect timeout and the idle pool. `backend_response` does not count from here but
    /// from when the request has been written (see [`read_response_head`]).
    now: Instant,
    connect: Duration,
    backend_response: Duration,
    /// The request's deadline (sending the body counts against it).
    deadline: Instant,
    max_body: Option<u64>,
    /// A WebSocket handshake: a `101` answer is taken (and the connections spliced).
    upgrade: bool,
}

impl Bounds {
    /// When the response head must have come if the request was all sent at `sent`:
    /// `backend_response` later, but never past the request's deadline.
    fn response(&self, sent: Instant) -> (Instant, TimeoutKind) {
        let backend = sent + self.backend_response;
        if backend < self.deadline {
            (backend, TimeoutKind::Backend)
        } else {
            (self.deadline, TimeoutKind::Request)
        }
    }
}

/// Serve one request whose head has been read. Returns whether the connection may carry
/// another request.
pub async fn handle(c: &mut ClientConn, head: &RequestHead, drain: &Drain) -> bool {
    let start = Instant::now();
    let host = head.host().and_then(|h| std::str::from_utf8(h).ok()).unwrap_or("");
    let path = std::str::from_utf8(head.path()).unwrap_or("");
    let (routed, mut log, client_ip, admitted) = {
        let snapshot = c.state.load();
        // Computed once: every policy, the hash balancers and the access log use this value.
        let client_ip = snapshot.policy.client_ip(c.client.ip(), head);
        let admitted = c.listener.gate.permits(client_ip) && snapshot.policy.permits(client_ip);
        let log = snapshot.access_log.as_ref().map(|log| {
            let record = AccessRecord {
                client: SocketAddr::new(client_ip, c.client.port()),
                method: head.method.clone(),
                host: head.host_bytes(),
                target: head.target_bytes(),
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
        (routed, LogLine { end, access: log, finished: false }, client_ip, admitted)
    };
    let mut req = Exchange {
        head,
        drain,
        log: &mut log,
        body_pending: head.has_body(),
        continued: false,
        set_cookie: None,
        done: false,
        client_ip,
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
pub(super) struct Exchange<'a> {
    pub(super) head: &'a RequestHead,
    pub(super) drain: &'a Drain,
    pub(super) log: &'a mut LogLine,
    /// Body bytes the client has still to send (and that Velocity has not read).
    pub(super) body_pending: bool,
    /// `100 Continue` sent.
    continued: bool,
    /// A `Set-Cookie` value the balancer asked the response to carry.
    pub(super) set_cookie: Option<Bytes>,
    /// Served to the end. An exchange dropped before that was cut by the listener because
    /// `drain_timeout` passed (the only place a request's future is dropped half-way).
    done: bool,
    /// The client (see `GlobalGate::client_ip`).
    pub(super) client_ip: IpAddr,
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
    async fn serve(&mut self, c: &mut ClientConn, service: &Arc<Service>, start: Instant) -> bool {
        let head = self.head;
        // Before any backend work: a refused request costs no pool slot and no connection.
        if let Some(gate) = &service.gate {
            if let Err(why) = gate.check(self.client_ip, head).await {
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
        let mut held: Option<(BackendConn, ResponseHead, InFlight, Option<Bytes>)> = None;
        loop {
            let acquired = {
                let ctx = RequestContext { client_ip: self.client_ip, head };
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
                        return Box::pin(self.tunnel(c, conn, in_flight, timeouts.tunnel_idle)).await;
                    }
                    if retry.on.contains(&status) && may_replay && body.replayable() && may_retry(service, retries) {
                        warn!(service = %service.config.name, backend = %backend.name, status, retry = retries + 1, "backend answered with a retryable status, retrying on another backend");
                        held = Some((conn, std::mem::take(&mut c.resp), in_flight, self.set_cookie.take()));
                    } else {
                        return self.relay(c, conn, in_flight, timeouts.backend_response).await;
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
                        return self.relay(c, conn, in_flight, timeouts.backend_response).await;
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
                            return self.relay(c, conn, in_flight, timeouts.backend_response).await;
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
            return self.relay(c, conn, in_flight, timeouts.backend_response).await;
        }
        if !attempted && lb.pool.is_empty() && service.config.managed.is_some() {
            if let Some(now) = Box::pin(super::cold_start::wait(&c.state, service, deadline.into_std())).await {
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
    async fn send_continue(&mut self, c: &mut ClientConn) -> Result<(), &'static str> {
        if self.head.expects_continue() && !self.continued {
            self.continued = true;
            let continue_line: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
            c.write_all(&mut [IoSlice::new(continue_line)]).await.map_err(|_| "client went away")?;
        }
        Ok(())
    }

    /// Read a body of `len` bytes whole, within the request deadline.
    async fn read_whole_body(
        &mut self,
        c: &mut ClientConn,
        len: usize,
        deadline: Instant,
    ) -> Result<Bytes, &'static str> {
        self.send_continue(c).await?;
        while c.buf.len() < len {
            match c.timer.within(|| deadline, read_more(&mut c.stream, &mut c.buf, BODY_READ)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return Err("client closed the connection during the body"),
                Err(_) => return Err("request timeout while reading the body"),
            }
        }
        self.body_pending = false;
        self.log.end.bytes_in += len as u64;
        Ok(c.buf.split_to(len).freeze())
    }

    /// One try at one backend: a pooled connection (or a new one), then the exchange. A pooled
    /// connection that the backend had closed fails without an answer; the request is then
    /// sent once more on a fresh connection if it can be.
    async fn attempt(
        &mut self,
        c: &mut ClientConn,
        body: &mut ReqBody,
        backend: &Arc<Backend>,
        bounds: Bounds,
    ) -> Result<BackendConn, AttemptError> {
        if bounds.now >= bounds.deadline {
            return Err(AttemptError::Timeout(TimeoutKind::Request));
        }
        let connect_timeout = bounds.connect.min(bounds.deadline - bounds.now);
        let mut conn = match backend.checkout(connect_timeout, bounds.now.into_std()).await {
            Ok(conn) => conn,
            Err(e) => return Err(connect_failed(e)),
        };
        match self.exchange(c, body, backend, &mut conn, bounds).await {
            Ok(()) => Ok(conn),
            // Only when nothing was sent: a backend that read the request and then closed may
            // have acted on it, and that is for the retry policy to judge.
            Err(AttemptError::NotSent(_)) if conn.reused && body.replayable() => {
                let mut fresh = match backend.connect(connect_timeout).await {
                    Ok(conn) => conn,
                    Err(e) => return Err(connect_failed(e)),
                };
                self.exchange(c, body, backend, &mut fresh, bounds).await.map(|()| fresh)
            }
            Err(e) => Err(e),
        }
    }

    /// Send the request on `conn` and read the response head into `c.resp`.
    async fn exchange(
        &mut self,
        c: &mut ClientConn,
        body: &mut ReqBody,
        backend: &Backend,
        conn: &mut BackendConn,
        bounds: Bounds,
    ) -> Result<(), AttemptError> {
        let proto: &[u8] = if c.stream.is_tls() { b"https" } else { b"http" };
        let fwd = Forwarding { client_ip: &c.client_ip, proto };
        self.head.encode_for_backend(&mut c.out, &fwd, backend.host_header.as_bytes());
        let sent = match body {
            // A backend that does not take the request in is bounded by the request deadline:
            // `backend_response` starts once it has all of it.
            ReqBody::None => {
                c.timer.within(|| bounds.deadline, conn.write_all_vectored(&mut [IoSlice::new(&c.out)])).await
            }
            ReqBody::Buffered(b) => {
                let parts = &mut [IoSlice::new(&c.out), IoSlice::new(b)];
                c.timer.within(|| bounds.deadline, conn.write_all_vectored(parts)).await
            }
            // Not reached: a request whose body went out is never tried again.
            ReqBody::Gone => return Err(AttemptError::Sent("the request body was sent already".into())),
            ReqBody::Length(_) | ReqBody::Chunked(_) => {
                self.send_continue(c).await.map_err(AttemptError::ClientBody)?;
                return self.stream_body(c, body, conn, bounds).await;
            }
        };
        match sent {
            Err(_) => return Err(AttemptError::Timeout(TimeoutKind::Request)),
            Ok(Err((e, 0))) => return Err(AttemptError::NotSent(e.to_string())),
            Ok(Err((e, _))) => return Err(AttemptError::Sent(e.to_string())),
            Ok(Ok(())) => {}
        }
        read_response_head(c, conn, bounds).await
    }

    /// Send the head and a streamed body, the body read from the client as it goes.
    async fn stream_body(
        &mut self,
        c: &mut ClientConn,
        body: &mut ReqBody,
        conn: &mut BackendConn,
        bounds: Bounds,
    ) -> Result<(), AttemptError> {
        let Bounds { deadline, max_body, .. } = bounds;
        let mut head_sent = false;
        loop {
            // The part of the body already read.
            let ready = match body {
                ReqBody::Length(remaining) => (*remaining).min(c.buf.len() as u64) as usize,
                ReqBody::Chunked(scanner) => {
                    let n =
                        scanner.scan(&c.buf, None).map_err(|_| AttemptError::ClientBody("malformed chunked body"))?;
                    if max_body.is_some_and(|max| scanner.payload_len() > max) {
                        return Err(AttemptError::BodyTooLarge);
                    }
                    n
                }
                _ => 0,
            };
            if ready > 0 || !head_sent {
                let head_part: &[u8] = if head_sent { &[] } else { &c.out };
                let parts = &mut [IoSlice::new(head_part), IoSlice::new(&c.buf[..ready])];
                match c.timer.within(|| deadline, conn.write_all_vectored(parts)).await {
                    Err(_) => return Err(AttemptError::Timeout(TimeoutKind::Request)),
                    Ok(Err((e, 0))) if !head_sent => return Err(AttemptError::NotSent(e.to_string())),
                    Ok(Err((e, _))) => {
                        // The backend may have answered early and closed (a 413, say): take
                        // that answer if it is there. The client's body stays unread.
                        return match read_response_head(c, conn, bounds).await {
                            Ok(()) => Ok(()),
                            Err(_) => Err(AttemptError::Sent(e.to_string())),
                        };
                    }
                    Ok(Ok(())) => {}
                }
                head_sent = true;
                c.buf.advance(ready);
                self.log.end.bytes_in += ready as u64;
            }
            let done = match body {
                ReqBody::Length(remaining) => {
                    *remaining -= ready as u64;
                    *remaining == 0
                }
                ReqBody::Chunked(scanner) => scanner.is_done(),
                _ => true,
            };
            if done {
                self.body_pending = false;
                break;
            }
            match c.timer.within(|| deadline, read_more(&mut c.stream, &mut c.buf, BODY_READ)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return Err(AttemptError::ClientBody("client closed the connection during the body")),
                Err(_) => return Err(AttemptError::Timeout(TimeoutKind::Request)),
            }
        }
        *body = ReqBody::Gone;
        // `backend_response` counts from the end of the upload, however long that took.
        read_response_head(c, conn, bounds).await
    }
}

/// Read the backend's response head into `c.resp`, past any interim (1xx) answers. Called
/// once the request has been written: `backend_response` counts from the first wait here (the
/// clock is read only if the answer is not there at once), capped by the request deadline.
async fn read_response_head(c: &mut ClientConn, conn: &mut BackendConn, bounds: Bounds) -> Result<(), AttemptError> {
    let mut until: Option<(Instant, TimeoutKind)> = None;
    loop {
        if !conn.buf.is_empty() {
            match c.resp.parse(&conn.buf, MAX_RESPONSE_HEAD) {
                Ok(true) if c.resp.is_interim() => {
                    conn.buf.advance(c.resp.len);
                    continue;
                }
                Ok(true) if c.resp.status == 101 && !bounds.upgrade => {
                    return Err(AttemptError::Sent("switching protocols without an upgrade".into()));
                }
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(AttemptError::Sent(format!("invalid response: {}", e.message()))),
            }
        }
        let deadline = || until.get_or_insert_with(|| bounds.response(Instant::now())).0;
        match c.timer.within(deadline, backend_or_client(&mut c.stream, &mut c.buf, conn)).await {
            Ok(Waited::Backend(Ok(n))) if n > 0 => {}
            Ok(Waited::Backend(Ok(_))) => return Err(AttemptError::Sent("the backend closed the connection".into())),
            Ok(Waited::Backend(Err(e))) => return Err(AttemptError::Sent(e.to_string())),
            Ok(Waited::ClientGone) => return Err(AttemptError::ClientGone),
            Err(_) => return Err(AttemptError::Timeout(until.map_or(TimeoutKind::Request, |(_, kind)| kind))),
        }
    }
}

/// A failed connect as the retry loop sees it.
fn connect_failed(e: ConnectError) -> AttemptError {
    match e {
        ConnectError::Local(_) => AttemptError::Local(e.to_string()),
        e => AttemptError::NotSent(e.to_string()),
    }
}

/// What ended a wait for the backend.
enum Waited {
    Backend(std::io::Result<usize>),
    ClientGone,
}

/// Read from the backend, watching the client meanwhile: a client that closes while its
/// answer is awaited gets its backend request abandoned, as NGINX does (`499` in the log),
/// rather than holding a backend connection until the answer comes. Bytes the client sends
/// meanwhile (a pipelined request) are kept, up to a bound.
async fn backend_or_client(client: &mut ClientStream, buf: &mut BytesMut, conn: &mut BackendConn) -> Waited {
    let mut backend = pin!(conn.read_more());
    loop {
        if buf.len() >= MAX_PIPELINED {
            return Waited::Backend(backend.await);
        }
        tokio::select! {
            biased;
            read = backend.as_mut() => return Waited::Backend(read),
            // The read-readiness slot rather than `readable()` (a waiter list entry under a
            // lock): this task is the client's only reader, and this wait is on every request.
            ready = std::future::poll_fn(|cx| client.poll_read_ready(cx)) => {
                if ready.is_err() {
                    return Waited::ClientGone;
                }
                buf.reserve(4096);
                match client.try_read_buf(buf) {
                    Ok(0) => return Waited::ClientGone,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return Waited::ClientGone,
                }
            }
        }
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
    ctx: &RequestContext<'_>,
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
