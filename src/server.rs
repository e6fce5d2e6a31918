//! Process lifecycle: load the config, open listeners, serve until told to stop.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tracing::{error, info};

use crate::config::Config;
use crate::proxy;
use crate::state::{Shared, Snapshot};

/// Open every listener of `config` and serve. Returns once the process is asked to stop.
pub async fn run(config: Config) -> Result<(), String> {
    let listen = config.listen.clone();
    let snapshot = Snapshot::build(config, None).map_err(|e| format!("cannot open the access log: {e}"))?;
    let state: Shared = Arc::new(ArcSwap::from_pointee(snapshot));
    for addr in listen {
        let listener = bind(addr).await?;
        tokio::spawn(proxy::serve(listener, state.clone()));
    }
    wait_for_stop().await;
    info!("stopping");
    Ok(())
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    let listener = TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    // Tests and scripts read this line to learn the port when the config says `:0`.
    info!("listening on http://{local}");
    Ok(listener)
}

async fn wait_for_stop() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                error!(error = %e, "cannot watch SIGTERM");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
