//! Managed backends: processes Velocity starts, admits, restarts and scales itself.
//!
//! One supervisor task per managed service. Instances listen on `127.0.0.1:{port}` from the
//! configured range; one is added to the service (its source set, `managed:web`) once it
//! accepts connections, and then the service's `health_check`, if any, gates it like every new
//! backend. A crashed instance is replaced after a backoff. The autoscaler follows Knative's
//! KPA: desired = ceil(in-flight averaged over `stable_window` / `target_in_flight`), bounded
//! by `min` and `max`; when the `panic_window` average asks for at least twice the ready
//! count it scales up at once and not down until a `stable_window` without panic has passed.
//! Scale-in drains an instance through the membership writer (no request is lost), then sends
//! SIGTERM, then SIGKILL after a grace period; at most one per `scale_down_delay`. In-flight
//! counts are read from the backends' atomics and the service queue's depth (requests waiting,
//! the cold start's included): nothing is added to the request path.

use std::collections::VecDeque;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::ManagedConfig;
use crate::membership::{Change, Handle, Source};
use crate::state::Shared;

/// SIGTERM, then this long before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// An instance that does not accept connections within this is killed and counted as a crash.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Running this long without a crash forgets earlier crashes (the backoff starts over).
const HEALTHY_RUN: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Started, not yet accepting connections.
    Starting,
    /// In the service's set.
    Ready,
    /// Out of the set, its requests finishing.
    Draining,
    /// SIGTERM sent at the instant; SIGKILL after [`STOP_GRACE`].
    Stopping(Instant),
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Ready => "ready",
            State::Draining => "draining",
            State::Stopping(_) => "stopping",
        }
    }
}

struct Instance {
    port: u16,
    pid: u32,
    child: Child,
    state: State,
    started: Instant,
}

/// An instance as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceInfo {
    pub pid: u32,
    pub address: String,
    pub state: &'static str,
    pub uptime_ms: u64,
}

/// A managed service as the admin API shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ManagedInfo {
    pub desired: u32,
    pub panic: bool,
    pub restarts: u64,
    pub instances: Vec<InstanceInfo>,
}

/// The autoscaler's memory: load samples and the panic mode.
struct Scaler {
    cfg: ManagedConfig,
    samples: VecDeque<(Instant, f64)>,
    panic_since: Option<Instant>,
    desired: u32,
    last_removal: Option<Instant>,
}

/// What one decision was made from, for its log line.
struct Inputs {
    stable_avg: f64,
    panic_avg: f64,
    ready: u32,
    waiting: usize,
}

impl Scaler {
    fn new(cfg: ManagedConfig) -> Scaler {
        let desired = cfg.min;
        Scaler { cfg, samples: VecDeque::new(), panic_since: None, desired, last_removal: None }
    }

    fn average(&self, now: Instant, window: Duration) -> f64 {
        let recent: Vec<f64> =
            self.samples.iter().filter(|(t, _)| now.duration_since(*t) <= window).map(|(_, v)| *v).collect();
        if recent.is_empty() {
            0.0
        } else {
            recent.iter().sum::<f64>() / recent.len() as f64
        }
    }

    /// Record `in_flight` (requests on the instances plus those waiting) and decide.
    fn decide(&mut self, now: Instant, in_flight: f64, ready: u32, waiting: usize) -> Inputs {
        self.samples.push_back((now, in_flight));
        while self.samples.front().is_some_and(|(t, _)| now.duration_since(*t) > self.cfg.stable_window) {
            self.samples.pop_front();
        }
        let target = f64::from(self.cfg.target_in_flight);
        let stable_avg = self.average(now, self.cfg.stable_window);
        let panic_avg = self.average(now, self.cfg.panic_window);
        let want = |avg: f64| (avg / target).ceil().min(f64::from(u32::MAX)) as u32;
        let (stable, panic) = (want(stable_avg), want(panic_avg));
        if ready > 0 && f64::from(panic) >= 2.0 * f64::from(ready) {
            self.panic_since = Some(now);
        } else if self.panic_since.is_some_and(|t| now.duration_since(t) >= self.cfg.stable_window) {
            self.panic_since = None;
        }
        let mut desired = if self.panic_since.is_some() { self.desired.max(panic).max(stable) } else { stable };
        // A request waiting with nothing running is a cold start: one instance at once.
        if waiting > 0 && ready == 0 {
            desired = desired.max(1);
        }
        self.desired = desired.clamp(self.cfg.min, self.cfg.max);
        Inputs { stable_avg, panic_avg, ready, waiting }
    }
}

pub async fn run(
    service: String,
    source: String,
    cfg: ManagedConfig,
    handle: Handle,
    shared: Shared,
    mut stop: watch::Receiver<bool>,
) {
    let tick = (cfg.panic_window / 5).clamp(Duration::from_millis(20), Duration::from_secs(1));
    let mut sup = Supervisor {
        service: service.clone(),
        source,
        cfg: cfg.clone(),
        handle,
        shared,
        instances: Vec::new(),
        scaler: Scaler::new(cfg),
        crashes: 0,
        restarts: 0,
        not_before: Instant::now(),
        published: None,
    };
    info!(
        service = %service,
        "{}: managing {}..{} instance(s) of {:?} on ports {}-{}",
        sup.source,
        sup.cfg.min,
        sup.cfg.max,
        sup.cfg.command,
        sup.cfg.ports.0,
        sup.cfg.ports.1
    );
    loop {
        sup.step().await;
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = stop.changed() => break,
        }
    }
    sup.stop_all().await;
}

struct Supervisor {
    service: String,
    source: String,
    cfg: ManagedConfig,
    handle: Handle,
    shared: Shared,
    instances: Vec<Instance>,
    scaler: Scaler,
    /// Crashes since the last healthy run, for the backoff.
    crashes: u32,
    /// Instances started to replace crashed ones, for the API.
    restarts: u64,
    /// No start before this (the backoff after a crash).
    not_before: Instant,
    /// The set last given to the writer.
    published: Option<Vec<u16>>,
}

impl Supervisor {
    async fn step(&mut self) {
        let now = Instant::now();
        self.reap(now);
        self.admit().await;
        let (in_flight, waiting, present) = self.load();
        let ready = self.count(|s| s == State::Ready);
        let before = self.scaler.desired;
        let was_panic = self.scaler.panic_since.is_some();
        let inputs = self.scaler.decide(now, in_flight, ready, waiting);
        let desired = self.scaler.desired;
        if desired != before || self.scaler.panic_since.is_some() != was_panic {
            let mode = if self.scaler.panic_since.is_some() { "panic" } else { "stable" };
            info!(
                service = %self.service,
                "{}: desired {before} -> {desired} ({mode} mode; in-flight avg {:.1} over stable_window {:?}, {:.1} over panic_window {:?}; target {} per instance; {} ready, {} waiting)",
                self.source,
                inputs.stable_avg,
                self.cfg.stable_window,
                inputs.panic_avg,
                self.cfg.panic_window,
                self.cfg.target_in_flight,
                inputs.ready,
                inputs.waiting
            );
        }
        self.scale(now, desired);
        self.finish_drains(now, &present);
        self.publish().await;
        self.report();
    }

    fn count(&self, f: impl Fn(State) -> bool) -> u32 {
        self.instances.iter().filter(|i| f(i.state)).count() as u32
    }

    /// Instances that exited: expected when stopping, else a crash (replaced after a backoff).
    fn reap(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.instances.len() {
            let inst = &mut self.instances[i];
            let exited = match inst.child.try_wait() {
                Ok(Some(status)) => Some(status.to_string()),
                Ok(None) => None,
                Err(e) => Some(format!("cannot be waited for: {e}")),
            };
            let Some(status) = exited else {
                i += 1;
                continue;
            };
            let inst = self.instances.remove(i);
            if let State::Stopping(_) = inst.state {
                info!(service = %self.service, "{}: instance pid {} on port {} stopped ({status})", self.source, inst.pid, inst.port);
                continue;
            }
            if now.duration_since(inst.started) >= HEALTHY_RUN {
                self.crashes = 0;
            }
            self.crashes += 1;
            let backoff = BACKOFF_BASE.saturating_mul(1 << self.crashes.min(16)).min(BACKOFF_MAX);
            self.not_before = now + backoff;
            warn!(
                service = %self.service,
                "{}: instance pid {} on port {} exited while {} ({status}); replaced in {backoff:?}",
                self.source,
                inst.pid,
                inst.port,
                inst.state.name()
            );
            self.restarts += 1;
        }
    }

    /// Starting instances that accept connections now are ready; one that took too long is
    /// killed (and reaped as a crash).
    async fn admit(&mut self) {
        for inst in self.instances.iter_mut().filter(|i| i.state == State::Starting) {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], inst.port));
            let up = tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await;
            if matches!(up, Ok(Ok(_))) {
                inst.state = State::Ready;
                info!(
                    service = %self.service,
                    "{}: instance pid {} on {addr} accepts connections after {:?}: admitted",
                    self.source,
                    inst.pid,
                    inst.started.elapsed()
                );
            } else if inst.started.elapsed() > START_TIMEOUT {
                warn!(service = %self.service, "{}: instance pid {} did not listen on {addr} within {START_TIMEOUT:?}; killed", self.source, inst.pid);
                let _ = inst.child.start_kill();
            }
        }
    }

    /// Requests in flight on this service's instances plus those waiting in its queue, and
    /// the instance ports still in the pool.
    fn load(&self) -> (f64, usize, Vec<u16>) {
        let snap = self.shared.load();
        let Some(s) = snap.services.iter().find(|s| s.config.name == self.service) else { return (0.0, 0, Vec::new()) };
        let lb = s.lb.load();
        let mut in_flight = 0usize;
        let mut present = Vec::new();
        for b in &lb.pool.backends {
            if b.source().as_deref() == Some(self.source.as_str()) {
                in_flight += b.in_flight();
                present.push(b.addr.port());
            }
        }
        let waiting = s.queue.depth();
        ((in_flight + waiting) as f64, waiting, present)
    }

    fn scale(&mut self, now: Instant, desired: u32) {
        let live = self.count(|s| matches!(s, State::Starting | State::Ready));
        if live < desired && now >= self.not_before {
            for _ in live..desired {
                if !self.start_one() {
                    break;
                }
            }
        } else if live > desired && self.scaler.panic_since.is_none() {
            let due = self.scaler.last_removal.is_none_or(|t| now.duration_since(t) >= self.cfg.scale_down_delay);
            if !due {
                return;
            }
            // The ready instance with the fewest requests in flight drains first.
            let snap = self.shared.load();
            let in_flight = |port: u16| {
                snap.services.iter().find(|s| s.config.name == self.service).map_or(0, |s| {
                    s.lb.load().pool.backends.iter().find(|b| b.addr.port() == port).map_or(0, |b| b.in_flight())
                })
            };
            let pick = self
                .instances
                .iter()
                .enumerate()
                .filter(|(_, i)| i.state == State::Ready)
                .min_by_key(|(_, i)| (in_flight(i.port), std::cmp::Reverse(i.started)))
                .map(|(n, _)| n);
            if let Some(n) = pick {
                let inst = &mut self.instances[n];
                inst.state = State::Draining;
                self.scaler.last_removal = Some(now);
                info!(
                    service = %self.service,
                    "{}: scale in: instance pid {} on port {} draining ({live} live, desired {desired})",
                    self.source,
                    inst.pid,
                    inst.port
                );
            }
        }
    }

    /// Start one instance on a free port; false when none could be started.
    fn start_one(&mut self) -> bool {
        let used: Vec<u16> = self.instances.iter().map(|i| i.port).collect();
        let (lo, hi) = self.cfg.ports;
        // A port something else listens on would make the instance fail: skip it.
        let Some(port) = (lo..=hi)
            .filter(|p| !used.contains(p))
            .find(|p| std::net::TcpListener::bind(std::net::SocketAddr::from(([127, 0, 0, 1], *p))).is_ok())
        else {
            warn!(service = %self.service, "{}: no free port in {lo}-{hi}", self.source);
            return false;
        };
        let argv: Vec<String> = self.cfg.command.iter().map(|a| a.replace("{port}", &port.to_string())).collect();
        let Some((program, args)) = argv.split_first() else { return false };
        let mut command = Command::new(program);
        #[cfg(target_os = "linux")]
        // SAFETY: prctl(2) only, between fork and exec, as pre_exec requires (async-signal-safe).
        unsafe {
            // A Velocity killed outright (SIGKILL, OOM) takes its instances with it.
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let spawned = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // A Velocity that exits without stopping it (a panic) does not leave it running.
            .kill_on_drop(true)
            .spawn();
        match spawned {
            Ok(child) => {
                let pid = child.id().unwrap_or(0);
                info!(service = %self.service, "{}: started instance pid {pid} on port {port}: {argv:?}", self.source);
                self.instances.push(Instance { port, pid, child, state: State::Starting, started: Instant::now() });
                true
            }
            Err(e) => {
                self.crashes += 1;
                let backoff = BACKOFF_BASE.saturating_mul(1 << self.crashes.min(16)).min(BACKOFF_MAX);
                self.not_before = Instant::now() + backoff;
                warn!(service = %self.service, "{}: cannot start {program:?}: {e}; trying again in {backoff:?}", self.source);
                false
            }
        }
    }

    /// A draining instance whose backend the writer has removed (drained) gets SIGTERM; a
    /// stopping one past its grace, SIGKILL.
    fn finish_drains(&mut self, now: Instant, present: &[u16]) {
        for inst in &mut self.instances {
            match inst.state {
                State::Draining if !present.contains(&inst.port) => {
                    info!(service = %self.service, "{}: instance pid {} on port {} drained; SIGTERM", self.source, inst.pid, inst.port);
                    terminate(inst);
                    inst.state = State::Stopping(now);
                }
                State::Stopping(since) if now.duration_since(since) > STOP_GRACE => {
                    warn!(service = %self.service, "{}: instance pid {} still running {STOP_GRACE:?} after SIGTERM; SIGKILL", self.source, inst.pid);
                    let _ = inst.child.start_kill();
                }
                _ => {}
            }
        }
    }

    /// Give the writer the ready instances when they changed.
    async fn publish(&mut self) {
        let mut ports: Vec<u16> = self.instances.iter().filter(|i| i.state == State::Ready).map(|i| i.port).collect();
        ports.sort_unstable();
        if self.published.as_ref() == Some(&ports) {
            return;
        }
        let backends = ports.iter().map(|p| (format!("127.0.0.1:{p}"), 1)).collect();
        let change = Change::SetSourced { service: self.service.clone(), source: self.source.clone(), backends };
        match self.handle.send(Source::Discovery, change).await {
            Ok(_) => self.published = Some(ports),
            Err(e) if e.is_shutdown() => {}
            Err(e) => warn!(service = %self.service, "{}: the instance set was refused: {}", self.source, e.message),
        }
    }

    fn report(&self) {
        let snap = self.shared.load();
        let states = ["starting", "ready", "draining", "stopping"];
        let counts: Vec<(&'static str, i64)> = states
            .iter()
            .map(|st| (*st, self.instances.iter().filter(|i| i.state.name() == *st).count() as i64))
            .collect();
        let d = &snap.metrics.discovery;
        d.managed(&self.service, &counts, i64::from(self.scaler.desired));
        d.set_managed_info(
            &self.service,
            ManagedInfo {
                desired: self.scaler.desired,
                panic: self.scaler.panic_since.is_some(),
                restarts: self.restarts,
                instances: self
                    .instances
                    .iter()
                    .map(|i| InstanceInfo {
                        pid: i.pid,
                        address: format!("127.0.0.1:{}", i.port),
                        state: i.state.name(),
                        uptime_ms: u64::try_from(i.started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    })
                    .collect(),
            },
        );
    }

    /// At shutdown (the listeners have drained) or when the config drops the service:
    /// SIGTERM to every instance, SIGKILL to those still running after the grace period.
    async fn stop_all(&mut self) {
        for inst in &mut self.instances {
            terminate(inst);
        }
        let deadline = Instant::now() + STOP_GRACE;
        for inst in &mut self.instances {
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, inst.child.wait()).await.is_err() {
                warn!(service = %self.service, "{}: instance pid {} ignored SIGTERM for {STOP_GRACE:?}; SIGKILL", self.source, inst.pid);
                let _ = inst.child.kill().await;
            }
        }
        info!(service = %self.service, "{}: {} instance(s) stopped", self.source, self.instances.len());
        self.instances.clear();
        self.shared.load().metrics.discovery.forget_managed(&self.service);
    }
}

fn terminate(inst: &Instance) {
    if let Ok(pid) = libc::pid_t::try_from(inst.pid) {
        if pid > 0 {
            // SAFETY: kill(2) with a pid this task spawned and has not reaped yet (so it cannot
            // have been reused).
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ManagedConfig {
        ManagedConfig {
            command: vec!["{port}".into()],
            ports: (9000, 9010),
            min: 1,
            max: 8,
            target_in_flight: 10,
            stable_window: Duration::from_secs(60),
            panic_window: Duration::from_secs(6),
            scale_down_delay: Duration::from_secs(60),
        }
    }

    #[test]
    fn kpa_stable_then_panic_which_never_scales_down() {
        let mut s = Scaler::new(cfg());
        let t0 = Instant::now();
        s.decide(t0, 10.0, 1, 0);
        assert_eq!(s.desired, 1);
        // A burst: 60 in flight for a few seconds is six times one ready instance: panic.
        for i in 1..=5 {
            s.decide(t0 + Duration::from_secs(i), 60.0, 1, 0);
        }
        assert!(s.panic_since.is_some());
        assert_eq!(s.desired, 6, "panic scales to the panic window's need at once");
        // Load drops: panic mode holds the count (never down) for a stable window.
        for i in 6..=30 {
            s.decide(t0 + Duration::from_secs(i), 0.0, 6, 0);
        }
        assert_eq!(s.desired, 6);
        for i in 31..=140 {
            s.decide(t0 + Duration::from_secs(i), 0.0, 6, 0);
        }
        assert!(s.panic_since.is_none());
        assert_eq!(s.desired, 1, "back to min after the stable window");
        // Bounded by max.
        s.decide(t0 + Duration::from_secs(200), 1000.0, 1, 0);
        assert_eq!(s.desired, 8);
    }

    #[test]
    fn a_waiting_request_with_nothing_running_starts_one() {
        let mut s = Scaler::new(ManagedConfig { min: 0, ..cfg() });
        let t0 = Instant::now();
        s.decide(t0, 0.0, 0, 0);
        assert_eq!(s.desired, 0);
        s.decide(t0 + Duration::from_millis(100), 1.0, 0, 1);
        assert_eq!(s.desired, 1);
    }
}
