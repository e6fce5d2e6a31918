//! Active health checks: one task per backend probes it every `interval` (tcp connect, an
//! HTTP(S) GET whose status must be in range, or a gRPC health call: `grpc.rs`) and moves it down after `unhealthy_threshold`
//! failures in a row, up after `healthy_threshold` passes in a row. Checks never touch the
//! request path: they only flip an atomic that picks read.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{jitter_down, passive, random_fraction, HealthState};
use crate::config::{CheckKind, HealthCheckConfig};
use crate::upstream::{is_local_exhaustion, Backend};

/// Start one check task per backend of a service, sharing what its checks share; the caller
/// (the checker registry, `health::registry`) owns the tasks. Empty outside a Tokio runtime
/// (config tools and unit tests).
pub fn start(service: &str, cfg: &HealthCheckConfig, backends: &[Arc<Backend>]) -> Vec<AbortHandle> {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return Vec::new() };
    let probe = Arc::new(Probe::new(service, cfg));
    backends.iter().map(|b| runtime.spawn(run(probe.clone(), b.clone())).abort_handle()).collect()
}

/// What every check of a service shares, built once.
struct Probe {
    service: String,
    cfg: HealthCheckConfig,
    /// Path and query of the check request.
    uri: Uri,
    /// Host header from the config; the backend's `host:port` when unset.
    host: Option<HeaderValue>,
    /// For https checks; `Err` says why TLS could not be set up (reported by every check).
    tls: Option<Result<tokio_rustls::TlsConnector, String>>,
}

impl Probe {
    fn new(service: &str, cfg: &HealthCheckConfig) -> Probe {
        // Both were validated with the config; the fallbacks are for safety only.
        let uri = cfg.path.parse().unwrap_or_else(|_| Uri::from_static("/"));
        let host = cfg.host.as_deref().and_then(|h| HeaderValue::from_str(h).ok());
        let tls = (cfg.kind == CheckKind::Https).then(|| super::tls::connector(cfg.insecure_skip_verify));
        Probe { service: service.to_owned(), cfg: cfg.clone(), uri, host, tls }
    }
}

async fn run(probe: Arc<Probe>, backend: Arc<Backend>) {
    let interval = probe.cfg.interval;
    // Spread the first checks over one interval so backends are not probed in lock-step.
    let mut next = Instant::now() + interval.mul_f64(random_fraction());
    // Checks that could not run for a reason of Velocity's own, in a row (logged once).
    let mut skipped = 0u64;
    loop {
        tokio::time::sleep_until(next).await;
        // Start to start, each interval up to 10% shorter: never later than configured.
        next = Instant::now() + jitter_down(interval, 0.1);
        let result = match tokio::time::timeout(probe.cfg.timeout, check(&probe, &backend)).await {
            Ok(Err(Failed::Local(e))) => {
                // Out of file descriptors and the like: the backend was never reached, so the
                // check neither passes nor fails. Logged when it starts and when it ends.
                if skipped == 0 {
                    warn!(service = %probe.service, backend = %backend.name, error = %e, "health check not run: Velocity is out of a local resource (not counted against the backend)");
                }
                skipped += 1;
                continue;
            }
            Ok(Err(Failed::Backend(why))) => Err(why),
            Ok(Ok(r)) => Ok(r),
            Err(_) => Err(format!("timeout after {:?}", probe.cfg.timeout)),
        };
        if skipped > 0 {
            info!(service = %probe.service, backend = %backend.name, skipped, "health checks run again");
            skipped = 0;
        }
        let pass = result.is_ok();
        let why = result.unwrap_or_else(|e| e);
        backend.note_check(pass, &why);
        match record(&backend.health, pass, probe.cfg.healthy_threshold, probe.cfg.unhealthy_threshold) {
            Some(Transition::Down) => {
                // Pooled connections to a backend that is going away would only fail later.
                backend.close_idle();
                warn!(service = %probe.service, backend = %backend.name, from = "up", to = "down", reason = %why, "backend is down (active check)");
            }
            Some(Transition::Up) => {
                // The checks prove it serves again: a passive ejection from the outage must not
                // keep it out (as Envoy's successful_active_health_check_uneject_host).
                passive::reset(&backend);
                backend.load.mark_recovered();
                info!(service = %probe.service, backend = %backend.name, from = "down", to = "up", reason = %why, "backend is up (active check)");
            }
            None => {}
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Transition {
    Up,
    Down,
}

/// Count one check result; a transition when a threshold is reached.
pub fn record(h: &HealthState, pass: bool, rise: u32, fall: u32) -> Option<Transition> {
    // Only this backend's checker writes these: the registry runs one per backend.
    let up = h.active_up.load(Ordering::Relaxed);
    if pass == up {
        h.active_streak.store(0, Ordering::Relaxed);
        return None;
    }
    let streak = h.active_streak.fetch_add(1, Ordering::Relaxed) + 1;
    if streak < if up { fall } else { rise } {
        return None;
    }
    h.active_streak.store(0, Ordering::Relaxed);
    h.active_up.store(!up, Ordering::Relaxed);
    Some(if up { Transition::Down } else { Transition::Up })
}

/// Why a check did not pass.
pub(super) enum Failed {
    /// The backend's failure: counts towards `unhealthy_threshold`.
    Backend(String),
    /// No connection could be opened for a reason of Velocity's own (out of file descriptors).
    Local(std::io::Error),
}

impl From<String> for Failed {
    fn from(why: String) -> Failed {
        Failed::Backend(why)
    }
}

/// One check: `Ok` with what passed, or `Err` with why it failed.
async fn check(probe: &Probe, backend: &Backend) -> Result<String, Failed> {
    let host = probe.host.as_ref().unwrap_or(&backend.host_header);
    if probe.cfg.kind == CheckKind::Grpc {
        return super::grpc::check(&probe.cfg, host, backend).await;
    }
    let stream = TcpStream::connect(backend.addr).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::ConnectionRefused => Failed::Backend("connection refused".to_owned()),
        _ if is_local_exhaustion(&e) => Failed::Local(e),
        _ => Failed::Backend(format!("connect error: {e}")),
    })?;
    match probe.cfg.kind {
        // (grpc checks were answered above, on a connection of their own)
        CheckKind::Tcp | CheckKind::Grpc => Ok("connected".to_owned()),
        CheckKind::Http => Ok(http_get(probe, host, stream).await?),
        CheckKind::Https => {
            let tls = match &probe.tls {
                Some(Ok(tls)) => tls,
                Some(Err(e)) => return Err(e.clone().into()),
                None => return Err("TLS is not set up".to_owned().into()),
            };
            let name = super::tls::server_name(host, backend)?;
            let stream = tls.connect(name, stream).await.map_err(|e| format!("TLS handshake: {e}"))?;
            Ok(http_get(probe, host, stream).await?)
        }
    }
}

async fn http_get<S>(probe: &Probe, host: &HeaderValue, stream: S) -> Result<String, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let mut req = Request::new(Empty::new());
    *req.uri_mut() = probe.uri.clone();
    let h = req.headers_mut();
    h.insert(header::HOST, host.clone());
    h.insert(header::USER_AGENT, HeaderValue::from_static("velocity-health-check"));
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    // The connection is driven here rather than spawned, so a check that times out leaves
    // nothing behind.
    let mut conn = std::pin::pin!(conn);
    let mut send = std::pin::pin!(sender.send_request(req));
    let resp = tokio::select! {
        biased;
        r = &mut send => r,
        r = &mut conn => match r {
            // With `Connection: close` the connection can finish in the same poll that
            // delivers the answer: the request future then has it (or the reason it has none).
            Ok(()) => send.await,
            Err(e) => return Err(format!("connection error: {e}")),
        },
    }
    .map_err(|e| format!("request failed: {e}"))?;
    let status = resp.status().as_u16();
    let (lo, hi) = probe.cfg.expect_status;
    if (lo..=hi).contains(&status) {
        Ok(format!("status {status}"))
    } else {
        Err(format!("status {status}"))
    }
}

/// The interval after which a service whose every backend is down might have one back.
pub fn recovery_hint(cfg: &HealthCheckConfig) -> Duration {
    cfg.interval.saturating_mul(cfg.healthy_threshold)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_checks(results: &str, rise: u32, fall: u32) -> (String, bool) {
        let h = HealthState::default();
        let mut transitions = String::new();
        for c in results.chars() {
            match record(&h, c == '+', rise, fall) {
                Some(Transition::Up) => transitions.push('U'),
                Some(Transition::Down) => transitions.push('D'),
                None => transitions.push('.'),
            }
        }
        (transitions, h.is_up())
    }

    #[test]
    fn thresholds() {
        assert_eq!(run_checks("--+---", 2, 3), (".....D".to_owned(), false));
        assert_eq!(run_checks("---+-++", 2, 3), ("..D...U".to_owned(), true));
    }

    #[test]
    fn alternating_results_do_not_flap() {
        let (t, up) = run_checks(&"+-".repeat(50), 2, 3);
        assert!(!t.contains('D') && up, "{t}");
        // Down, then alternating: it stays down.
        let (t, up) = run_checks(&format!("---{}", "+-".repeat(50)), 2, 3);
        assert_eq!(t.matches('D').count(), 1);
        assert!(!t.contains('U') && !up, "{t}");
    }
}
