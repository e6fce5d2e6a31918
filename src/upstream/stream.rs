//! A backend connection's socket: plain TCP, or TLS for `https://` backends ([`MaybeTls`],
//! as on the client side, does the reads and writes); what only the backend side needs is here.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::{BackendProtocol, BackendTlsConfig};
use crate::tls::stream::MaybeTls;

/// What connecting to an https backend needs, built once per backend (at load).
pub struct BackendTls {
    pub config: BackendTlsConfig,
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl std::fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendTls").field("config", &self.config).finish_non_exhaustive()
    }
}

impl BackendTls {
    /// `protocol` is offered in ALPN: `h2` for HTTP/2 backends, `http/1.1` otherwise.
    pub fn new(config: &BackendTlsConfig, protocol: BackendProtocol) -> Result<Arc<BackendTls>, String> {
        let ca = config.ca.as_deref().map(crate::tls::client::load_ca).transpose()?;
        let alpn: &[u8] = if protocol.is_h2() { b"h2" } else { b"http/1.1" };
        let connector = crate::tls::client::connector(config.insecure_skip_verify, ca, &[alpn])?;
        let name = ServerName::try_from(config.server_name.clone())
            .map_err(|e| format!("invalid TLS server name {:?}: {e}", config.server_name))?;
        Ok(Arc::new(BackendTls { config: config.clone(), connector, name }))
    }

    pub async fn handshake(&self, tcp: TcpStream) -> io::Result<BackendStream> {
        let tls = self.connector.connect(self.name.clone(), tcp).await?;
        Ok(BackendStream::Tls(Box::new(tls)))
    }
}

pub type BackendStream = MaybeTls<TlsStream<TcpStream>>;

impl BackendStream {
    /// Whether the backend closed (or wrote to) this idle connection, without waiting and
    /// without a system call for a live plain connection.
    pub fn is_stale(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self {
            BackendStream::Plain(s) => match s.poll_read_ready(&mut cx) {
                Poll::Pending => false,
                Poll::Ready(Err(_)) => true,
                Poll::Ready(Ok(())) => {
                    let mut probe = [0u8; 1];
                    !matches!(s.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
                }
            },
            // The socket may hold TLS records that are not data (a session ticket the server
            // sent after the handshake): read through rustls, which consumes those, and only
            // data or a close makes the connection unusable.
            BackendStream::Tls(s) => {
                let mut probe = [0u8; 1];
                let mut buf = ReadBuf::new(&mut probe);
                Pin::new(&mut **s).poll_read(&mut cx, &mut buf).is_ready()
            }
        }
    }

    /// The protocol the TLS handshake settled on (ALPN); `None` for plain TCP.
    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            BackendStream::Plain(_) => None,
            BackendStream::Tls(s) => s.get_ref().1.alpn_protocol(),
        }
    }
}
