//! One transport connection: plain TCP, or TCP inside mutual TLS when the
//! node has `[cluster.tls]`. Frames and the handshake read and write a
//! [`Conn`] the same either way.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A connection's byte stream.
pub(super) enum Conn {
    /// TCP after the secret handshake (no `[cluster.tls]`).
    Plain(TcpStream),
    /// TLS over TCP; the secret handshake runs inside it.
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Plain(_) => "Conn::Plain",
            Self::Tls(_) => "Conn::Tls",
        })
    }
}

impl Conn {
    /// Whether the peer has nothing for us right now: no hangup (EOF), no
    /// error and no stray bytes. Polls the stream once without waiting; TLS
    /// records that carry no data (session tickets, key updates) are taken
    /// in by the TLS layer and count as silence.
    pub(super) fn is_silent(&mut self) -> bool {
        let mut probe = [0u8; 1];
        let mut buf = ReadBuf::new(&mut probe);
        let mut cx = Context::from_waker(Waker::noop());
        matches!(Pin::new(self).poll_read(&mut cx, &mut buf), Poll::Pending)
    }

    /// Completes when the peer closes the connection, it fails, or the peer
    /// sends bytes (a protocol violation while its request is in flight:
    /// one request at a time). Cancel-safe: partial TLS records stay
    /// buffered in the TLS layer.
    pub(super) async fn hangup(&mut self) {
        let mut probe = [0u8; 1];
        let _ = self.read(&mut probe).await;
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The TLS error inside an I/O error, if that is what it is: a certificate
/// the peer refused (a TLS alert) or one we refused.
pub(super) fn tls_cause(error: &io::Error) -> Option<String> {
    error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<tokio_rustls::rustls::Error>())
        .map(ToString::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn silence_eof_and_stray_bytes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dial = TcpStream::connect(addr);
        let (dialed, accepted) = tokio::join!(dial, listener.accept());
        let mut ours = Conn::Plain(dialed.unwrap());
        let mut theirs = accepted.unwrap().0;
        assert!(ours.is_silent());
        theirs.write_all(b"x").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!ours.is_silent(), "stray bytes are not silence");
        drop(theirs);
        tokio::time::timeout(std::time::Duration::from_secs(5), ours.hangup())
            .await
            .expect("hangup completes on EOF");
    }
}
