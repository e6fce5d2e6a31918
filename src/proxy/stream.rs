//! A client connection's socket: plain TCP or TLS over TCP ([`MaybeTls`], which does the
//! reads and writes); what only the client side needs is here.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::tls::stream::MaybeTls;

pub type ClientStream = MaybeTls<TlsStream<TcpStream>>;

impl ClientStream {
    /// Wait until there is something to read. For TLS, bytes on the socket may be a partial
    /// record or no application data: the read that follows then waits as usual. Bytes rustls
    /// already took off the socket count too: a request the client sent right behind its
    /// last handshake message arrives with it, and is no longer on the socket.
    pub async fn readable(&mut self) -> io::Result<()> {
        match self {
            ClientStream::Plain(s) => s.readable().await,
            ClientStream::Tls(s) => {
                let (tcp, session) = s.get_mut();
                match session.process_new_packets() {
                    Ok(io) if io.plaintext_bytes_to_read() == 0 && !io.peer_has_closed() => tcp.readable().await,
                    // Data, a close, or an error the next read reports.
                    _ => Ok(()),
                }
            }
        }
    }

    /// [`Self::readable`] through the socket's read-readiness slot (no waiter list entry):
    /// for the one task that reads this connection.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            ClientStream::Plain(s) => s.poll_read_ready(cx),
            ClientStream::Tls(s) => s.get_ref().0.poll_read_ready(cx),
        }
    }

    /// Read what is there without waiting: `WouldBlock` when nothing is.
    pub fn try_read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            ClientStream::Plain(s) => s.try_read_buf(buf),
            ClientStream::Tls(s) => {
                // One poll with a no-op waker: the caller waits with `readable` again, which
                // registers its own waker.
                let mut cx = Context::from_waker(Waker::noop());
                // Into initialized room (rare: only bytes a client sends while its answer is
                // awaited come this way), so no unsafe is needed.
                let start = buf.len();
                buf.resize(buf.capacity().max(start + 1), 0);
                let mut read = ReadBuf::new(&mut buf[start..]);
                let polled = Pin::new(&mut **s).poll_read(&mut cx, &mut read);
                let n = read.filled().len();
                buf.truncate(start + n);
                match polled {
                    Poll::Ready(Ok(())) => Ok(n),
                    Poll::Ready(Err(e)) => Err(e),
                    Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
                }
            }
        }
    }

    /// Whether the TLS handshake chose HTTP/2 (ALPN `h2`).
    pub fn alpn_h2(&self) -> bool {
        match self {
            ClientStream::Plain(_) => false,
            ClientStream::Tls(s) => s.get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }
}
