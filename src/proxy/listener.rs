//! What a listener's connections are served with: its config and, for TLS, the acceptor built
//! from its certificates. Built at start and at each reload (before the switch, so a bad
//! certificate rejects the reload); a connection keeps the settings it was accepted with.

use std::sync::Arc;

use rustls::server::ProducesTickets;
use tokio_rustls::TlsAcceptor;

use crate::config::ListenerConfig;
use crate::tls::{self, LoadedCert};

pub struct ListenerSettings {
    pub config: ListenerConfig,
    /// `Some` on a TLS listener.
    pub tls: Option<TlsAcceptor>,
    /// The certificates, as loaded (names and expiry, for metrics).
    pub certs: Vec<LoadedCert>,
}

impl ListenerSettings {
    /// Load the certificates of `config` (when it has TLS). `ticketer`: the session ticket
    /// keys, kept across reloads by the running listener.
    pub fn build(config: ListenerConfig, ticketer: &Arc<dyn ProducesTickets>) -> Result<ListenerSettings, String> {
        let Some(t) = &config.tls else {
            return Ok(ListenerSettings { config, tls: None, certs: Vec::new() });
        };
        let certs = tls::load_all(t).map_err(|e| format!("listener {}: {e}", config.name))?;
        let server = tls::server_config(t, &certs, ticketer.clone())?;
        Ok(ListenerSettings { config, tls: Some(TlsAcceptor::from(server)), certs })
    }
}
