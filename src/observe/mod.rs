//! Observability, beside the request path: metrics (atomics recorded per request, encoded at
//! scrape time), the access log (one line per request, written off the request path) with its
//! in-memory ring, the event log, and the dashboard's history.

pub mod access_log;
pub mod events;
pub mod history;
pub mod metrics;
pub mod process;
pub mod ring;
pub mod stats;
mod time;

pub use access_log::{AccessLog, AccessRecord};
pub use events::init_logging;
pub use metrics::{BackendMetrics, Direction, Metrics, RequestEnd, ServiceMetrics, TcpCounters, TcpFailure};
