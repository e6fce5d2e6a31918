//! A backend connection's socket: plain TCP, or TLS for `https://` backends. An enum, as on
//! the client side (`proxy::stream`): one branch per I/O call, nothing boxed on the plain path.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::{BackendProtocol, BackendTlsConfig};

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

#[derive(Debug)]
pub enum BackendStream {
    Plain(TcpStream),
    /// Boxed: a TLS session is large, and plain connections should not carry its size.
    Tls(Box<TlsStream<TcpStream>>),
}

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

    pub fn is_tls(&self) -> bool {
        matches!(self, BackendStream::Tls(_))
    }

    /// The protocol the TLS handshake settled on (ALPN); `None` for plain TCP.
    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            BackendStream::Plain(_) => None,
            BackendStream::Tls(s) => s.get_ref().1.alpn_protocol(),
        }
    }
}

impl AsyncRead for BackendStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            BackendStream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            BackendStream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            BackendStream::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            BackendStream::Plain(s) => s.is_write_vectored(),
            BackendStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(_) => Poll::Ready(Ok(())),
            BackendStream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            BackendStream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}
