//! Logging: the access log (one line per request, written off the request path) and the
//! process log set-up.

pub mod access_log;
mod time;

pub use access_log::{AccessLog, AccessRecord};

/// Events go to stdout through `tracing`; `RUST_LOG` overrides the default `info` level.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).try_init();
}
