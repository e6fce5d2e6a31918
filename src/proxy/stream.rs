//! A client connection's socket: plain TCP or TLS over TCP. An enum rather than a trait
//! object or a generic: dispatch is one branch per I/O call, the request path is compiled
//! once, and the plain variant does what a bare `TcpStream` did.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

pub enum ClientStream {
    Plain(TcpStream),
    /// Boxed: a TLS session is a few hundred bytes, which would make every plain
    /// connection's state that much bigger.
    Tls(Box<TlsStream<TcpStream>>),
}

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

    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }

    /// Whether the TLS handshake chose HTTP/2 (ALPN `h2`).
    pub fn alpn_h2(&self) -> bool {
        match self {
            ClientStream::Plain(_) => false,
            ClientStream::Tls(s) => s.get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientStream::Plain(s) => s.is_write_vectored(),
            ClientStream::Tls(s) => s.is_write_vectored(),
        }
    }

    /// TLS: writes may leave encrypted records in rustls when the socket is full; flushing
    /// sends them. Plain: nothing to do.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(_) => Poll::Ready(Ok(())),
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}
