//! What a listener's connections are served with: its config and, for TLS, the acceptor built
//! from its certificates. Built at start and at each reload (before the switch, so a bad
//! certificate rejects the reload); a connection keeps the settings it was accepted with.

use std::sync::Arc;
use std::time::Duration;

use rustls::server::ProducesTickets;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::config::{Http2Config, ListenerConfig, ListenerProtocol};
use crate::policy::ListenerGate;
use crate::tls::{self, LoadedCert};

pub struct ListenerSettings {
    pub config: ListenerConfig,
    /// `Some` on a TLS listener.
    pub tls: Option<TlsAcceptor>,
    /// The certificates, as loaded (names and expiry, for metrics).
    pub certs: Vec<LoadedCert>,
    /// The listener's `allow`/`deny` (issue 15), as lookup sets.
    pub gate: ListenerGate,
    /// `Some` when the listener serves HTTP/2 (ALPN `h2`, h2c by prior knowledge).
    pub http2: Option<Http2Config>,
    /// The listener's stop signal (`Some(drain_timeout)` once it stops), for connections that
    /// must act on it themselves (HTTP/2 sends GOAWAY). Set by the running listener.
    pub stopped: Option<watch::Receiver<Option<Duration>>>,
}

impl ListenerSettings {
    /// Load the certificates of `config` (when it has TLS). `ticketer`: the session ticket
    /// keys, kept across reloads by the running listener.
    pub fn build(
        config: ListenerConfig,
        http2: Http2Config,
        ticketer: &Arc<dyn ProducesTickets>,
    ) -> Result<ListenerSettings, String> {
        let gate = ListenerGate::new(&config.access, config.deny_action);
        let http2 = (http2.enabled && config.protocol == ListenerProtocol::Http).then_some(http2);
        let Some(t) = &config.tls else {
            return Ok(ListenerSettings { config, tls: None, certs: Vec::new(), gate, http2, stopped: None });
        };
        let certs = tls::load_all(t).map_err(|e| format!("listener {}: {e}", config.name))?;
        let server = tls::server_config(t, &certs, ticketer.clone(), http2.is_some())?;
        Ok(ListenerSettings { config, tls: Some(TlsAcceptor::from(server)), certs, gate, http2, stopped: None })
    }
}
