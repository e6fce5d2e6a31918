//! HTTP listeners and the per-request path.

mod body;
mod forward;
mod headers;
pub mod router;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::state::Shared;
pub use forward::ConnContext;

/// Accept connections on `listener` forever, serving each on its own task.
pub async fn serve(listener: TcpListener, state: Shared) {
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(10)).keep_alive(true);
    loop {
        let (stream, client) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(error = %e, "accept failed");
                if !matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let ctx = Arc::new(ConnContext::new(state.clone(), client));
        let conn = builder
            .serve_connection(TokioIo::new(stream), service_fn(move |req| forward::handle(ctx.clone(), req)))
            .with_upgrades();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%client, error = %e, "client connection ended with an error");
            }
        });
    }
}
