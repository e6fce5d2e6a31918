//! Metrics. The request path records into atomics that belong to what they count: a
//! [`ServiceMetrics`] per service (carried over by a reload, like the service's queue) and a
//! [`BackendMetrics`] in every `Backend` (carried over with the `Arc<Backend>`). No lock, no
//! map lookup, no allocation per request: a few relaxed `fetch_add`s and one clock read.
//!
//! Nothing is registered up front. A scrape builds a `prometheus-client` registry around a
//! collector that walks the current snapshot and reads the atomics (see [`encode`]), so a
//! series exists exactly as long as the config names its service or backend, and every label
//! value comes from the config (service and backend names, listener addresses), never from a
//! client.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use hyper::Method;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::history::History;
use super::ring::Ring;
use crate::state::Snapshot;

/// Histogram bucket bounds in microseconds (0.5 ms to 10 s, about 2.5x apart, as in the
/// Prometheus client defaults with finer steps at the low end a proxy lives in).
pub const BUCKETS_US: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000,
    10_000_000,
];
const SLOTS: usize = BUCKETS_US.len() + 1;

/// The `method` label's values: the methods a config or a client commonly uses, and `other`
/// for the rest, so a client cannot grow the label set.
pub const METHODS: [&str; 8] = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other"];
pub const CODE_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Why Velocity answered a request itself instead of forwarding it
/// (`velocity_requests_rejected_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    NoBackend,
    QueueFull,
    QueueTimeout,
    TooLarge,
    HeaderTooLarge,
    Timeout,
    RateLimited,
    Denied,
}

impl Reject {
    pub const ALL: [Reject; 8] = [
        Reject::NoBackend,
        Reject::QueueFull,
        Reject::QueueTimeout,
        Reject::TooLarge,
        Reject::HeaderTooLarge,
        Reject::Timeout,
        Reject::RateLimited,
        Reject::Denied,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reject::NoBackend => "no_backend",
            Reject::QueueFull => "queue_full",
            Reject::QueueTimeout => "queue_timeout",
            Reject::TooLarge => "too_large",
            Reject::HeaderTooLarge => "header_too_large",
            Reject::Timeout => "timeout",
            Reject::RateLimited => "rate_limited",
            Reject::Denied => "denied",
        }
    }

    /// The rejection an access-log note stands for, if it is one.
    pub fn from_note(note: &str) -> Option<Reject> {
        Some(match note {
            "no_backend" | "no_healthy_backend" => Reject::NoBackend,
            "queue_full" => Reject::QueueFull,
            "queue_timeout" => Reject::QueueTimeout,
            "body_too_large" => Reject::TooLarge,
            "header_too_large" => Reject::HeaderTooLarge,
            "backend_timeout" | "request_timeout" | "client_header_timeout" => Reject::Timeout,
            "rate_limited" => Reject::RateLimited,
            "denied" => Reject::Denied,
            _ => return None,
        })
    }
}

/// Index into [`METHODS`].
#[inline]
pub fn method_index(m: &Method) -> u8 {
    if *m == Method::GET {
        0
    } else if *m == Method::HEAD {
        1
    } else if *m == Method::POST {
        2
    } else if *m == Method::PUT {
        3
    } else if *m == Method::DELETE {
        4
    } else if *m == Method::PATCH {
        5
    } else if *m == Method::OPTIONS {
        6
    } else {
        7
    }
}

/// Index into [`CODE_CLASSES`]; statuses outside 100-599 (none are sent) count as 5xx.
#[inline]
fn class_index(status: u16) -> usize {
    (status / 100).clamp(1, 5) as usize - 1
}

/// A latency histogram: one counter per bucket (not cumulative: an observation touches one)
/// and the sum in microseconds.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; SLOTS],
    sum_us: AtomicU64,
}

impl Histogram {
    #[inline]
    pub fn observe_us(&self, us: u64) {
        let i = BUCKETS_US.partition_point(|&b| b < us);
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    /// Per-bucket (not cumulative) counts, the last one above the largest bound.
    pub fn counts(&self) -> [u64; SLOTS] {
        std::array::from_fn(|i| self.counts[i].load(Relaxed))
    }

    pub fn count(&self) -> u64 {
        self.counts().iter().sum()
    }

    pub fn sum_seconds(&self) -> f64 {
        self.sum_us.load(Relaxed) as f64 / 1e6
    }
}

/// Counters of one service; kept by a reload that keeps the service (by name).
#[derive(Debug)]
pub struct ServiceMetrics {
    /// The `service` label ("" for requests that matched no service).
    pub name: Arc<str>,
    requests: [[AtomicU64; METHODS.len()]; CODE_CLASSES.len()],
    pub duration: Histogram,
    rejected: [AtomicU64; Reject::ALL.len()],
    bytes_received: AtomicU64,
    bytes_sent: AtomicU64,
    /// Connections of the tcp listeners that forward to this service.
    pub tcp: TcpCounters,
    tcp_active: AtomicU64,
    tcp_failed: [AtomicU64; TcpFailure::ALL.len()],
}

impl ServiceMetrics {
    pub fn new(name: &str) -> Arc<ServiceMetrics> {
        Arc::new(ServiceMetrics {
            name: name.into(),
            requests: Default::default(),
            duration: Histogram::default(),
            rejected: Default::default(),
            bytes_received: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            tcp: TcpCounters::default(),
            tcp_active: AtomicU64::new(0),
            tcp_failed: Default::default(),
        })
    }

    /// A tcp listener accepted a connection for this service: counted now, and as active
    /// until the guard drops (the end of the connection, or its cut at shutdown).
    pub fn tcp_accepted(&self) -> TcpActive<'_> {
        self.tcp.connections.fetch_add(1, Relaxed);
        self.tcp_active.fetch_add(1, Relaxed);
        TcpActive(&self.tcp_active)
    }

    pub fn tcp_failed(&self, f: TcpFailure) {
        self.tcp_failed[f as usize].fetch_add(1, Relaxed);
    }

    pub fn tcp_failures(&self, f: TcpFailure) -> u64 {
        self.tcp_failed[f as usize].load(Relaxed)
    }

    pub fn tcp_active(&self) -> u64 {
        self.tcp_active.load(Relaxed)
    }

    /// One finished request (Velocity's own answers included).
    #[inline]
    pub fn record(&self, end: &RequestEnd, us: u64) {
        self.requests[class_index(end.status)][end.method as usize].fetch_add(1, Relaxed);
        self.duration.observe_us(us);
        if end.bytes_in > 0 {
            self.bytes_received.fetch_add(end.bytes_in, Relaxed);
        }
        self.bytes_sent.fetch_add(end.bytes_out, Relaxed);
        if let Some(r) = end.note.and_then(Reject::from_note) {
            self.reject(r);
        }
    }

    /// A request answered before it could be routed (malformed, a head too large or too
    /// slow): counted with method `other`, and not in the duration histogram.
    pub fn before_routing(&self, status: u16, reject: Option<Reject>) {
        self.requests[class_index(status)][METHODS.len() - 1].fetch_add(1, Relaxed);
        if let Some(r) = reject {
            self.reject(r);
        }
    }

    pub fn reject(&self, r: Reject) {
        self.rejected[r as usize].fetch_add(1, Relaxed);
    }

    pub fn requests(&self, class: usize, method: usize) -> u64 {
        self.requests[class][method].load(Relaxed)
    }

    /// All requests of a code class (`4` for 4xx), over every method.
    pub fn requests_of_class(&self, class_digit: usize) -> u64 {
        self.requests[class_digit - 1].iter().map(|c| c.load(Relaxed)).sum()
    }

    pub fn requests_total(&self) -> u64 {
        (1..=5).map(|c| self.requests_of_class(c)).sum()
    }

    pub fn rejected(&self, r: Reject) -> u64 {
        self.rejected[r as usize].load(Relaxed)
    }
}

/// What the end of a request records; filled in as the request goes.
#[derive(Debug)]
pub struct RequestEnd {
    pub service: Arc<ServiceMetrics>,
    pub method: u8,
    /// 0 until an answer is chosen (a request dropped before any counts as 499, see `finish`).
    pub status: u16,
    pub note: Option<&'static str>,
    /// Request body bytes read from the client.
    pub bytes_in: u64,
    /// Response body bytes written to the client.
    pub bytes_out: u64,
    pub start: Instant,
}

impl RequestEnd {
    pub fn new(service: Arc<ServiceMetrics>, method: &Method, start: Instant) -> RequestEnd {
        RequestEnd { service, method: method_index(method), status: 0, note: None, bytes_in: 0, bytes_out: 0, start }
    }

    /// Record it; returns the duration in microseconds (for the access log).
    #[inline]
    pub fn finish(&mut self) -> u64 {
        self.finish_at(Instant::now())
    }

    /// [`RequestEnd::finish`] with the clock already read at the end.
    #[inline]
    pub fn finish_at(&mut self, now: Instant) -> u64 {
        let us = now.saturating_duration_since(self.start).as_micros() as u64;
        let unanswered = self.status == 0;
        if unanswered {
            // Ended without an answer (the client left first): NGINX's 499.
            self.status = 499;
        }
        self.service.record(self, us);
        if unanswered && self.note == Some("shutdown") {
            // Cut by drain_timeout: the access log shows that no status reached the client.
            self.status = 0;
        }
        us
    }
}

/// Which way TCP-mode bytes went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the client toward the backend (HAProxy's `bytes_in`).
    In,
    /// From the backend toward the client.
    Out,
}

/// TCP-mode counters of a service (`velocity_tcp_*`) or a backend (`velocity_backend_tcp_*`).
/// Bytes are added as they move, not when the connection ends, so a connection open for
/// hours shows its traffic all along.
#[derive(Debug, Default)]
pub struct TcpCounters {
    /// Service: connections accepted. Backend: connections forwarded to it (connected).
    pub connections: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl TcpCounters {
    #[inline]
    pub fn moved(&self, dir: Direction, n: u64) {
        match dir {
            Direction::In => self.bytes_in.fetch_add(n, Relaxed),
            Direction::Out => self.bytes_out.fetch_add(n, Relaxed),
        };
    }

    pub fn connections(&self) -> u64 {
        self.connections.load(Relaxed)
    }

    pub fn bytes(&self, dir: Direction) -> u64 {
        match dir {
            Direction::In => self.bytes_in.load(Relaxed),
            Direction::Out => self.bytes_out.load(Relaxed),
        }
    }
}

/// Counts a tcp connection as active on its service until dropped.
#[derive(Debug)]
pub struct TcpActive<'a>(&'a AtomicU64);

impl Drop for TcpActive<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Why a tcp connection closed before it reached a backend
/// (`velocity_tcp_connections_failed_total{reason}`; the access log's note).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpFailure {
    /// Every connect that was tried failed.
    NoBackend,
    /// No backend could be tried (down, ejected, full).
    NoHealthyBackend,
    /// Velocity was out of a local resource (file descriptors, ports).
    LocalError,
    /// The PROXY header could not be sent to the backend.
    BackendError,
}

impl TcpFailure {
    pub const ALL: [TcpFailure; 4] =
        [TcpFailure::NoBackend, TcpFailure::NoHealthyBackend, TcpFailure::LocalError, TcpFailure::BackendError];

    pub fn label(self) -> &'static str {
        match self {
            TcpFailure::NoBackend => "no_backend",
            TcpFailure::NoHealthyBackend => "no_healthy_backend",
            TcpFailure::LocalError => "local_error",
            TcpFailure::BackendError => "backend_error",
        }
    }
}

/// Counters of one backend, inside its `Backend`: a reload that keeps the backend keeps them.
#[derive(Debug, Default)]
pub struct BackendMetrics {
    responses: [AtomicU64; CODE_CLASSES.len()],
    /// Time to the response head, from the start of the try.
    pub response_time: Histogram,
    pub connect_time: Histogram,
    pub connection_errors: AtomicU64,
    /// Tries of a request here after a failure or a retryable answer elsewhere.
    pub retries: AtomicU64,
    pub ejections: AtomicU64,
    /// TCP mode (a backend of a service that a tcp listener names).
    pub tcp: TcpCounters,
}

impl BackendMetrics {
    /// A response head came back from this backend, `since` the try started.
    #[inline]
    pub fn response(&self, status: u16, since: Instant) {
        self.responses[class_index(status)].fetch_add(1, Relaxed);
        self.response_time.observe_us(since.elapsed().as_micros() as u64);
    }

    pub fn responses(&self, class_digit: usize) -> u64 {
        self.responses[class_digit - 1].load(Relaxed)
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }
}

/// Open client connections of one listener (`velocity_client_connections_open{listener}`).
#[derive(Debug)]
pub struct ListenerGauge {
    pub listener: String,
    open: AtomicU64,
}

/// Counts a client connection until dropped.
#[derive(Debug)]
pub struct OpenConnection(Arc<ListenerGauge>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
    }
}

impl ListenerGauge {
    pub fn enter(self: &Arc<Self>) -> OpenConnection {
        self.open.fetch_add(1, Relaxed);
        OpenConnection(self.clone())
    }

    pub fn open(&self) -> u64 {
        self.open.load(Relaxed)
    }
}

/// Process-wide metrics, carried from snapshot to snapshot.
#[derive(Debug)]
pub struct Metrics {
    /// Requests that matched no service, and malformed ones answered before routing.
    pub unrouted: Arc<ServiceMetrics>,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    /// Unix time in milliseconds of the last config that loaded (the first one included).
    last_reload_ok_ms: AtomicU64,
    started: SystemTime,
    listeners: Mutex<Vec<Weak<ListenerGauge>>>,
    /// (listener, certificate name, notAfter in Unix seconds) of every TLS listener's
    /// certificates, as last loaded (start and reloads).
    tls_certificates: Mutex<Vec<(String, String, i64)>>,
    /// Access-log lines dropped by writers that a reload replaced.
    access_log_dropped_before: AtomicU64,
    /// Requests per second and errors of every service, the last 10 minutes (the dashboard).
    pub history: History,
    /// The most recent access-log lines (`GET /api/v1/logs`).
    pub recent: Arc<Ring>,
    /// Discovery errors and managed instances (`crate::discovery`); written by those tasks
    /// only, never on the request path.
    pub discovery: DiscoveryMetrics,
}

/// Counters and gauges of discovery sources and managed services, keyed by names from the
/// config (service, `dns:web`, instance states).
#[derive(Debug, Default)]
pub struct DiscoveryMetrics {
    errors: Mutex<std::collections::BTreeMap<(String, String), u64>>,
    instances: Mutex<std::collections::BTreeMap<(String, &'static str), i64>>,
    desired: Mutex<std::collections::BTreeMap<String, i64>>,
    /// Each managed service's instances, for the admin API.
    managed_info: Mutex<std::collections::BTreeMap<String, crate::discovery::managed::ManagedInfo>>,
}

impl DiscoveryMetrics {
    /// A source's answer failed (or was empty) and its last good set was kept.
    pub fn error(&self, service: &str, source: &str) {
        let mut m = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((service.to_owned(), source.to_owned())).or_default() += 1;
    }

    pub fn errors(&self, service: &str, source: &str) -> u64 {
        let m = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&(service.to_owned(), source.to_owned())).copied().unwrap_or(0)
    }

    /// A managed service's instance counts by state, and the autoscaler's desired count.
    pub fn managed(&self, service: &str, counts: &[(&'static str, i64)], desired: i64) {
        let mut m = self.instances.lock().unwrap_or_else(|p| p.into_inner());
        for (state, n) in counts {
            m.insert((service.to_owned(), state), *n);
        }
        drop(m);
        self.desired.lock().unwrap_or_else(|p| p.into_inner()).insert(service.to_owned(), desired);
    }

    pub fn set_managed_info(&self, service: &str, info: crate::discovery::managed::ManagedInfo) {
        self.managed_info.lock().unwrap_or_else(|p| p.into_inner()).insert(service.to_owned(), info);
    }

    pub fn managed_info(&self, service: &str) -> Option<crate::discovery::managed::ManagedInfo> {
        self.managed_info.lock().unwrap_or_else(|p| p.into_inner()).get(service).cloned()
    }

    /// A managed service that is gone: its series go with it.
    pub fn forget_managed(&self, service: &str) {
        self.managed_info.lock().unwrap_or_else(|p| p.into_inner()).remove(service);
        self.instances.lock().unwrap_or_else(|p| p.into_inner()).retain(|(s, _), _| s != service);
        self.desired.lock().unwrap_or_else(|p| p.into_inner()).remove(service);
    }

    fn encode(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let errors = self.errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let rows: Vec<(Labels<2>, u64)> =
            errors.iter().map(|((s, src), n)| ([("service", s.as_str()), ("source", src.as_str())], *n)).collect();
        counters(
            enc,
            "velocity_discovery_errors",
            "Discovery answers that failed or were empty; the last good set was kept.",
            &rows,
        )?;
        let instances = self.instances.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let rows: Vec<(Labels<2>, i64)> =
            instances.iter().map(|((s, st), n)| ([("service", s.as_str()), ("state", *st)], *n)).collect();
        gauges(enc, "velocity_managed_instances", "Managed backend processes by state.", &rows)?;
        let desired = self.desired.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let rows: Vec<(Labels<1>, i64)> = desired.iter().map(|(s, n)| ([("service", s.as_str())], *n)).collect();
        gauges(enc, "velocity_managed_desired_instances", "The autoscaler's desired instance count.", &rows)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            unrouted: ServiceMetrics::new(""),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            last_reload_ok_ms: AtomicU64::new(unix_ms(SystemTime::now())),
            started: SystemTime::now(),
            listeners: Mutex::new(Vec::new()),
            tls_certificates: Mutex::new(Vec::new()),
            access_log_dropped_before: AtomicU64::new(0),
            history: History::default(),
            recent: Arc::new(Ring::new(super::ring::DEFAULT_LINES)),
            discovery: DiscoveryMetrics::default(),
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Metrics {
    pub fn reload_done(&self, ok: bool) {
        if ok {
            self.reloads_ok.fetch_add(1, Relaxed);
            self.last_reload_ok_ms.store(unix_ms(SystemTime::now()), Relaxed);
        } else {
            self.reloads_failed.fetch_add(1, Relaxed);
        }
    }

    /// A gauge for a new listener, listed while the listener (or one of its connections) lives.
    pub fn listener(&self, local: SocketAddr) -> Arc<ListenerGauge> {
        let gauge = Arc::new(ListenerGauge { listener: local.to_string(), open: AtomicU64::new(0) });
        let mut list = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(&gauge));
        gauge
    }

    fn live_listeners(&self) -> Vec<Arc<ListenerGauge>> {
        let list = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        list.iter().filter_map(Weak::upgrade).collect()
    }

    /// The certificates the listeners now serve: (listener, name, notAfter in Unix seconds).
    pub fn set_tls_certificates(&self, rows: Vec<(String, String, i64)>) {
        *self.tls_certificates.lock().unwrap_or_else(|p| p.into_inner()) = rows;
    }

    /// An access-log writer was replaced: keep its drops in the total.
    pub fn access_log_replaced(&self, dropped: u64) {
        self.access_log_dropped_before.fetch_add(dropped, Relaxed);
    }
}

/// The `Content-Type` of what [`encode`] writes.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The Prometheus text exposition of everything, read now.
pub fn encode(snapshot: Arc<Snapshot>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape(snapshot)));
    let mut out = String::with_capacity(16 * 1024);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    out
}

/// Reads the atomics of the snapshot's services and backends at scrape time.
#[derive(Debug)]
struct Scrape(Arc<Snapshot>);

type Labels<'a, const N: usize> = [(&'static str, &'a str); N];

fn counters<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(L, u64)],
) -> std::fmt::Result {
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        family.encode_family(labels)?.encode_counter::<NoLabelSet, u64, f64>(v, None)?;
    }
    Ok(())
}

fn gauges<L: EncodeLabelSet, V: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(L, V)],
) -> std::fmt::Result {
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        family.encode_family(labels)?.encode_gauge(v)?;
    }
    Ok(())
}

fn histograms<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(L, &Histogram)],
) -> std::fmt::Result {
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in rows {
        let counts = h.counts();
        let buckets: Vec<(f64, u64)> = counts
            .iter()
            .enumerate()
            .map(|(i, &n)| (BUCKETS_US.get(i).map_or(f64::INFINITY, |&us| us as f64 / 1e6), n))
            .collect();
        let count = counts.iter().sum();
        family.encode_family(labels)?.encode_histogram::<NoLabelSet>(h.sum_seconds(), count, &buckets, None)?;
    }
    Ok(())
}

fn no_labels() -> [(&'static str, &'static str); 0] {
    []
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let snap = &self.0;
        let metrics = &snap.metrics;
        let mut services: Vec<&ServiceMetrics> = vec![&metrics.unrouted];
        services.extend(snap.services.iter().map(|s| &*s.metrics));

        let mut rows: Vec<(Labels<3>, u64)> = Vec::new();
        for s in &services {
            for (c, class) in CODE_CLASSES.iter().enumerate() {
                for (m, method) in METHODS.iter().enumerate() {
                    let n = s.requests(c, m);
                    if n > 0 {
                        rows.push(([("service", &s.name), ("code_class", class), ("method", method)], n));
                    }
                }
            }
        }
        counters(
            &mut enc,
            "velocity_http_requests",
            "Client requests answered, Velocity's own answers included.",
            &rows,
        )?;
        let rows: Vec<(Labels<1>, &Histogram)> =
            services.iter().map(|s| ([("service", &*s.name)], &s.duration)).collect();
        histograms(
            &mut enc,
            "velocity_http_request_duration_seconds",
            "From the request head read to the response's end.",
            &rows,
        )?;
        let mut rows: Vec<(Labels<2>, u64)> = Vec::new();
        for s in &services {
            for r in Reject::ALL {
                let n = s.rejected(r);
                if n > 0 {
                    rows.push(([("service", &s.name), ("reason", r.label())], n));
                }
            }
        }
        counters(
            &mut enc,
            "velocity_requests_rejected",
            "Requests Velocity answered itself instead of forwarding.",
            &rows,
        )?;
        let bytes = |f: fn(&ServiceMetrics) -> u64| -> Vec<(Labels<1>, u64)> {
            services.iter().map(|s| ([("service", &*s.name)], f(s))).collect()
        };
        counters(
            &mut enc,
            "velocity_bytes_received",
            "Request body bytes read from clients.",
            &bytes(|s| s.bytes_received.load(Relaxed)),
        )?;
        counters(
            &mut enc,
            "velocity_bytes_sent",
            "Response body bytes written to clients.",
            &bytes(|s| s.bytes_sent.load(Relaxed)),
        )?;
        let rows: Vec<(Labels<1>, i64)> =
            snap.services.iter().map(|s| ([("service", s.config.name.as_str())], s.queue.depth() as i64)).collect();
        gauges(&mut enc, "velocity_queue_depth", "Requests waiting for a backend under max_connections.", &rows)?;

        self.encode_backends(&mut enc)?;
        self.encode_tcp(&mut enc)?;

        let live = metrics.live_listeners();
        let rows: Vec<(Labels<1>, i64)> =
            live.iter().map(|l| ([("listener", l.listener.as_str())], l.open() as i64)).collect();
        gauges(&mut enc, "velocity_client_connections_open", "Open client connections per listener.", &rows)?;
        let certs = metrics.tls_certificates.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !certs.is_empty() {
            let rows: Vec<(Labels<2>, i64)> =
                certs.iter().map(|(l, n, t)| ([("listener", l.as_str()), ("name", n.as_str())], *t)).collect();
            gauges(
                &mut enc,
                "velocity_tls_certificate_expiry_timestamp_seconds",
                "When each certificate a TLS listener serves expires (notAfter), in Unix seconds.",
                &rows,
            )?;
        }

        let rows = [
            ([("result", "success")], metrics.reloads_ok.load(Relaxed)),
            ([("result", "failure")], metrics.reloads_failed.load(Relaxed)),
        ];
        counters(&mut enc, "velocity_config_reloads", "Config reloads (SIGHUP, --watch, API) by outcome.", &rows)?;
        let last = metrics.last_reload_ok_ms.load(Relaxed) as f64 / 1000.0;
        gauges(
            &mut enc,
            "velocity_config_last_reload_success_timestamp_seconds",
            "When the running config was loaded (Unix time).",
            &[(no_labels(), last)],
        )?;
        let dropped =
            metrics.access_log_dropped_before.load(Relaxed) + snap.access_log.as_ref().map_or(0, |l| l.dropped());
        counters(
            &mut enc,
            "velocity_access_log_dropped",
            "Access-log lines dropped because the writer could not keep up.",
            &[(no_labels(), dropped)],
        )?;
        metrics.discovery.encode(&mut enc)?;
        super::process::encode(&mut enc, metrics.started)
    }
}

impl Scrape {
    fn encode_backends(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let snap = &self.0;
        let pools: Vec<_> = snap.services.iter().map(|s| (s.config.name.as_str(), s.lb.load_full())).collect();
        let each = || {
            pools.iter().flat_map(|(service, lb)| lb.pool.backends.iter().map(move |b| (*service, b.name.as_str(), b)))
        };
        let mut rows: Vec<(Labels<3>, u64)> = Vec::new();
        for (service, backend, b) in each() {
            for (c, class) in CODE_CLASSES.iter().enumerate() {
                let n = b.metrics.responses(c + 1);
                if n > 0 {
                    rows.push(([("service", service), ("backend", backend), ("code_class", class)], n));
                }
            }
        }
        counters(enc, "velocity_backend_responses", "Response heads received from backends.", &rows)?;
        let rows: Vec<(Labels<2>, &Histogram)> =
            each().map(|(s, n, b)| ([("service", s), ("backend", n)], &b.metrics.response_time)).collect();
        histograms(
            enc,
            "velocity_backend_response_duration_seconds",
            "Time to the response head (first byte), from the start of the try.",
            &rows,
        )?;
        let rows: Vec<(Labels<2>, &Histogram)> =
            each().map(|(s, n, b)| ([("service", s), ("backend", n)], &b.metrics.connect_time)).collect();
        histograms(enc, "velocity_backend_connect_duration_seconds", "Time to open a new backend connection.", &rows)?;
        let counter = |f: &dyn Fn(&crate::upstream::Backend) -> u64| -> Vec<(Labels<2>, u64)> {
            each().map(|(s, n, b)| ([("service", s), ("backend", n)], f(b))).collect()
        };
        let gauge = |f: &dyn Fn(&crate::upstream::Backend) -> i64| -> Vec<(Labels<2>, i64)> {
            each().map(|(s, n, b)| ([("service", s), ("backend", n)], f(b))).collect()
        };
        counters(
            enc,
            "velocity_backend_connection_errors",
            "Tries that could not deliver the request or tcp connection: connect refused, timed out or failed.",
            &counter(&|b| b.metrics.connection_errors.load(Relaxed)),
        )?;
        counters(
            enc,
            "velocity_backend_retries",
            "Retries sent to this backend after a failure or a retryable answer on another.",
            &counter(&|b| b.metrics.retries.load(Relaxed)),
        )?;
        gauges(
            enc,
            "velocity_backend_up",
            "1 when the backend takes traffic by its health: checks pass and not ejected.",
            &gauge(&|b| i64::from(b.health.is_up() && !b.health.is_ejected())),
        )?;
        gauges(
            enc,
            "velocity_backend_in_flight",
            "Requests being served (until their response body ends).",
            &gauge(&|b| b.in_flight() as i64),
        )?;
        counters(
            enc,
            "velocity_backend_ejections",
            "Ejections by passive detection.",
            &counter(&|b| b.metrics.ejections.load(Relaxed)),
        )?;
        gauges(
            enc,
            "velocity_backend_pool_idle_connections",
            "Idle keep-alive connections in the backend's pool.",
            &gauge(&|b| b.idle_connections() as i64),
        )?;
        counters(
            enc,
            "velocity_backend_connections_opened",
            "New connections opened to the backend.",
            &counter(&|b| b.connections_opened()),
        )?;
        cluster(enc)
    }
}

impl Scrape {
    /// TCP mode: the services that tcp listeners name, and their backends. Nothing (not even
    /// the families) without a tcp listener.
    fn encode_tcp(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let snap = &self.0;
        let names = snap.config.tcp_services();
        let services: Vec<_> = snap.services.iter().filter(|s| names.contains(&s.config.name.as_str())).collect();
        if services.is_empty() {
            return Ok(());
        }
        let each = |f: &dyn Fn(&ServiceMetrics) -> u64| -> Vec<(Labels<1>, u64)> {
            services.iter().map(|s| ([("service", s.config.name.as_str())], f(&s.metrics))).collect()
        };
        counters(
            enc,
            "velocity_tcp_connections",
            "Connections accepted by tcp listeners, by the service they forward to.",
            &each(&|m| m.tcp.connections()),
        )?;
        let rows: Vec<(Labels<1>, i64)> =
            services.iter().map(|s| ([("service", s.config.name.as_str())], s.metrics.tcp_active() as i64)).collect();
        gauges(enc, "velocity_tcp_connections_active", "Open tcp-mode client connections.", &rows)?;
        let mut rows: Vec<(Labels<2>, u64)> = Vec::new();
        for s in &services {
            for f in TcpFailure::ALL {
                let n = s.metrics.tcp_failures(f);
                if n > 0 {
                    rows.push(([("service", s.config.name.as_str()), ("reason", f.label())], n));
                }
            }
        }
        counters(
            enc,
            "velocity_tcp_connections_failed",
            "Tcp-mode connections closed before they reached a backend.",
            &rows,
        )?;
        counters(
            enc,
            "velocity_tcp_bytes_in",
            "Bytes from tcp-mode clients to backends, counted as they move.",
            &each(&|m| m.tcp.bytes(Direction::In)),
        )?;
        counters(
            enc,
            "velocity_tcp_bytes_out",
            "Bytes from backends to tcp-mode clients, counted as they move.",
            &each(&|m| m.tcp.bytes(Direction::Out)),
        )?;

        let pools: Vec<_> = services.iter().map(|s| (s.config.name.as_str(), s.lb.load_full())).collect();
        let backends = || {
            pools.iter().flat_map(|(service, lb)| lb.pool.backends.iter().map(move |b| (*service, b.name.as_str(), b)))
        };
        let each = |f: &dyn Fn(&crate::upstream::Backend) -> u64| -> Vec<(Labels<2>, u64)> {
            backends().map(|(s, n, b)| ([("service", s), ("backend", n)], f(b))).collect()
        };
        counters(
            enc,
            "velocity_backend_tcp_connections",
            "Tcp-mode connections forwarded to the backend (connected).",
            &each(&|b| b.metrics.tcp.connections()),
        )?;
        // A tcp service takes no HTTP route, so its backends' in-flight count is their open
        // (or connecting) tcp connections: the same number, under the name a user looks for.
        let rows: Vec<(Labels<2>, i64)> =
            backends().map(|(s, n, b)| ([("service", s), ("backend", n)], b.in_flight() as i64)).collect();
        gauges(
            enc,
            "velocity_backend_tcp_connections_active",
            "Open tcp-mode connections to the backend (connecting included).",
            &rows,
        )?;
        counters(
            enc,
            "velocity_backend_tcp_bytes_in",
            "Bytes sent to the backend from tcp-mode clients.",
            &each(&|b| b.metrics.tcp.bytes(Direction::In)),
        )?;
        counters(
            enc,
            "velocity_backend_tcp_bytes_out",
            "Bytes from the backend to tcp-mode clients.",
            &each(&|b| b.metrics.tcp.bytes(Direction::Out)),
        )
    }
}

/// With `cluster:`: the members and the store's health.
fn cluster(enc: &mut DescriptorEncoder) -> std::fmt::Result {
    let Some(c) = crate::cluster::current() else { return Ok(()) };
    let b = &c.store.breaker;
    let n = no_labels();
    gauges(
        enc,
        "velocity_cluster_members",
        "Live instances at the last heartbeat, this one included.",
        &[(n, c.live() as i64)],
    )?;
    gauges(
        enc,
        "velocity_cluster_store_up",
        "1 when the last heartbeat reached the store.",
        &[(n, i64::from(c.reachable()))],
    )?;
    gauges(
        enc,
        "velocity_cluster_breaker_open",
        "1 while requests do not ask the store.",
        &[(n, i64::from(b.is_open()))],
    )?;
    counters(
        enc,
        "velocity_cluster_store_errors",
        "Failed or timed-out store requests.",
        &[(n, b.errors.load(Relaxed))],
    )?;
    counters(
        enc,
        "velocity_cluster_store_fallbacks",
        "Cluster-scope rate limit decisions made by on_store_error (store failed or breaker open).",
        &[(n, b.fallbacks.load(Relaxed))],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_inclusive_upper_bounds() {
        let h = Histogram::default();
        h.observe_us(0);
        h.observe_us(500);
        h.observe_us(501);
        h.observe_us(20_000_000);
        let c = h.counts();
        assert_eq!((c[0], c[1], c[SLOTS - 1], h.count()), (2, 1, 1, 4));
        assert!((h.sum_seconds() - 20.001001).abs() < 1e-9);
    }

    #[test]
    fn methods_and_classes_are_bounded() {
        assert_eq!(method_index(&Method::GET), 0);
        assert_eq!(method_index(&Method::OPTIONS), 6);
        assert_eq!(method_index(&Method::from_bytes(b"BREW").unwrap()), 7);
        assert_eq!(method_index(&Method::CONNECT), 7);
        assert_eq!((class_index(204), class_index(499), class_index(503), class_index(0)), (1, 3, 4, 0));
    }

    #[test]
    fn a_request_end_counts_once_with_its_rejection() {
        let s = ServiceMetrics::new("web");
        let mut end = RequestEnd::new(s.clone(), &Method::POST, Instant::now());
        end.status = 503;
        end.note = Some("queue_full");
        end.bytes_out = 10;
        end.finish();
        let mut end = RequestEnd::new(s.clone(), &Method::GET, Instant::now());
        end.finish();
        assert_eq!(s.requests(4, 2), 1);
        assert_eq!(s.requests(3, 0), 1, "a request that got no answer is a 499");
        assert_eq!(s.rejected(Reject::QueueFull), 1);
        assert_eq!(s.duration.count(), 2);
        assert_eq!(s.bytes_sent.load(Relaxed), 10);
    }

    #[test]
    fn encodes_every_family_with_config_labels() {
        let yaml = "listen: 127.0.0.1:0\naccess_log: off\nservices:\n  - name: web\n    backends:\n      - address: 127.0.0.1:9\n";
        let cfg = crate::config::parse(std::path::Path::new("t.yaml"), yaml).unwrap();
        let snap = Arc::new(Snapshot::build(cfg, None).unwrap());
        let web = &snap.services[0];
        let mut end = RequestEnd::new(web.metrics.clone(), &Method::GET, Instant::now());
        end.status = 200;
        end.finish();
        let backend = web.lb.load().pool.backends[0].clone();
        backend.metrics.response(200, Instant::now());
        snap.metrics.unrouted.before_routing(431, Some(Reject::HeaderTooLarge));
        snap.metrics.reload_done(false);
        let text = encode(snap.clone());
        for line in [
            "# TYPE velocity_http_requests_total counter",
            r#"velocity_http_requests_total{service="web",code_class="2xx",method="GET"} 1"#,
            r#"velocity_http_requests_total{service="",code_class="4xx",method="other"} 1"#,
            r#"velocity_http_request_duration_seconds_count{service="web"} 1"#,
            r#"velocity_http_request_duration_seconds_bucket{service="web",le="+Inf"} 1"#,
            r#"velocity_requests_rejected_total{service="",reason="header_too_large"} 1"#,
            r#"velocity_backend_responses_total{service="web",backend="127.0.0.1:9",code_class="2xx"} 1"#,
            r#"velocity_backend_response_duration_seconds_count{service="web",backend="127.0.0.1:9"} 1"#,
            r#"velocity_backend_up{service="web",backend="127.0.0.1:9"} 1"#,
            r#"velocity_config_reloads_total{result="failure"} 1"#,
            r#"velocity_queue_depth{service="web"} 0"#,
            r#"velocity_queue_depth{service="web"} 0"#,
            "# TYPE process_cpu_seconds_total counter",
            "# TYPE process_start_time_seconds gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        // No tcp listener: not even the tcp families' headers.
        assert!(!text.contains("velocity_tcp_") && !text.contains("velocity_backend_tcp_"), "{text}");
    }
}
