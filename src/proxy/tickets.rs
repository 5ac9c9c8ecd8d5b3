//! The client's TLS 1.3 session tickets go out with the connection's first answer, not in a
//! write of their own.
//!
//! A TLS 1.3 server sends its tickets once the client's Finished is in (RFC 8446 §4.6.1), and
//! tokio-rustls writes and flushes them before its handshake future returns. On a connection
//! that carries one request (a client without keep-alive: test (c) of the shared harness) that
//! is one `writev` in five, each with loopback TCP's whole delivery and a wake-up of the client,
//! a moment before the answer (HTTP/1.1) or the server's SETTINGS (h2) would have carried the
//! same bytes. The client needs no ticket to go on, so [`Coalesce`] keeps them back and writes
//! them in front of the connection's next bytes.
//!
//! - **What is held.** Only a write made while [`accept`] polls the handshake, and only one
//!   that starts with a TLS application-data record (content type 23): in TLS 1.3 everything
//!   after the server hello is sent as such records, tickets included, while every server hello
//!   (22) and TLS 1.2's final flight (change cipher spec, 20, or a plaintext ticket, 22) passes
//!   at once.
//! - **Never in the handshake's way.** If the handshake future waits with bytes held, they were
//!   not the tickets that end it (a flight the socket took only part of, say): they are written
//!   before it waits.
//! - **Sent with the next bytes.** After the handshake, the first write goes out behind the held
//!   bytes in one write (up to [`MAX_COALESCED`] of it is copied for that), or a shutdown sends
//!   them. A flush does not, while only the handshake's bytes are held: hyper's HTTP/1.1 server
//!   flushes before it reads each request, which would send the tickets alone again. Once a
//!   write's bytes are held behind them, a flush sends everything, as it must. The buffer is
//!   freed once it is written.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::server::TlsStream;

/// A TLS record's first byte for application data (RFC 8446 §5.1).
const APPLICATION_DATA: u8 = 23;

/// At most this much of a later write is copied behind the held bytes; a larger write goes out
/// after them in a write of its own. Tickets with an HTTP answer's head fit easily.
pub(crate) const MAX_COALESCED: usize = 16 * 1024;

/// A client connection that can hold the handshake's last write back; see the module docs.
pub(crate) struct Coalesce<IO> {
    io: IO,
    /// Bytes taken from the TLS layer and not yet written; empty (unallocated) nearly always.
    held: Vec<u8>,
    /// How much of `held` is written already.
    written: usize,
    /// True only while [`accept`] polls the handshake.
    holding: bool,
    /// Whether `held` has bytes of a write made after the handshake, which a flush must send.
    written_after: bool,
}

impl<IO> Coalesce<IO> {
    pub(crate) fn new(io: IO) -> Self {
        Self {
            io,
            held: Vec::new(),
            written: 0,
            holding: false,
            written_after: false,
        }
    }
}

impl<IO: AsyncWrite + Unpin> Coalesce<IO> {
    /// Write out what is held.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.held.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.held[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        if !self.held.is_empty() {
            self.held = Vec::new();
            self.written = 0;
            self.written_after = false;
        }
        Poll::Ready(Ok(()))
    }

    fn write_slices(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.held.is_empty() {
            // Every write after the handshake comes this way: one branch, then the socket.
            if self.holding {
                let first = bufs.iter().find(|b| !b.is_empty()).and_then(|b| b.first());
                let len: usize = bufs.iter().map(|b| b.len()).sum();
                if first == Some(&APPLICATION_DATA) && len <= MAX_COALESCED {
                    self.held.reserve_exact(len);
                    bufs.iter().for_each(|b| self.held.extend_from_slice(b));
                    return Poll::Ready(Ok(len));
                }
            }
            return Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        }
        // Bytes are held: these go behind them, copied (up to a bound) so that both leave in
        // one write. While the handshake runs, nothing is written here: see `accept`.
        let room = MAX_COALESCED.saturating_sub(self.held.len() - self.written);
        if room == 0 {
            ready!(self.poll_drain(cx))?;
            return Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        }
        let mut taken = 0;
        for b in bufs {
            let n = b.len().min(room - taken);
            self.held.extend_from_slice(&b[..n]);
            taken += n;
        }
        if !self.holding {
            self.written_after = true;
            // Taken either way: what the socket cannot take now, a flush or the next write
            // sends (tokio-rustls flushes after writing, and so does hyper).
            if let Poll::Ready(Err(e)) = self.poll_drain(cx) {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Ready(Ok(taken))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Coalesce<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Coalesce<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().write_slices(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().write_slices(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.written_after {
            ready!(this.poll_drain(cx))?;
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// Drive the server handshake `accept` on a [`Coalesce`], holding the writes that end it.
/// A plain function returning the `poll_fn`, not an async one, which would hold `accept`
/// twice (the argument and the closure's copy).
pub(crate) fn accept<IO>(
    mut accept: tokio_rustls::Accept<Coalesce<IO>>,
) -> impl Future<Output = io::Result<TlsStream<Coalesce<IO>>>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    std::future::poll_fn(move |cx| {
        if let Some(io) = accept.get_mut() {
            io.holding = true;
        }
        match Pin::new(&mut accept).poll(cx) {
            Poll::Ready(Ok(mut tls)) => {
                tls.get_mut().0.holding = false;
                Poll::Ready(Ok(tls))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                // The handshake waits for the client, who may be waiting for these bytes.
                if let Some(io) = accept.get_mut() {
                    io.holding = false;
                    if let Poll::Ready(Err(e)) = io.poll_drain(cx) {
                        return Poll::Ready(Err(e));
                    }
                }
                Poll::Pending
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::{ClientConfig, HandshakeKind, ServerConfig};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio_rustls::{LazyConfigAcceptor, TlsConnector};

    use super::*;

    /// The server's socket: notes the first byte and length of each write that reaches it,
    /// taking at most `cap` bytes a write (to split the handshake's flights).
    struct Recorder {
        io: DuplexStream,
        writes: Arc<Mutex<Vec<(u8, usize)>>>,
        cap: usize,
    }

    impl AsyncRead for Recorder {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[IoSlice::new(buf)])
        }

        /// Like `writev`: the slices leave as one write.
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            all.truncate(self.cap);
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &all))?;
            if n > 0 {
                self.writes.lock().unwrap().push((all[0], n));
            }
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    fn configs(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let key = rcgen::generate_simple_self_signed(vec!["origin.test".to_string()]).unwrap();
        let cert = CertificateDer::from(key.cert.der().to_vec());
        let pkcs8 = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.signing_key.serialize_der()));
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], pkcs8)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// One connection: the client says "ping", the server answers "pong" and closes. Returns
    /// the writes that reached the server's socket and the kind of handshake the client saw.
    async fn exchange(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
        cap: usize,
    ) -> (Vec<(u8, usize)>, HandshakeKind) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let writes = Arc::new(Mutex::new(Vec::new()));
        let socket = Recorder {
            io: server_io,
            writes: writes.clone(),
            cap,
        };
        let serve = tokio::spawn(async move {
            let acceptor =
                LazyConfigAcceptor::new(rustls::server::Acceptor::default(), Coalesce::new(socket));
            let start = acceptor.await.unwrap();
            let mut tls = accept(start.into_stream(server)).await.unwrap();
            // As hyper's HTTP/1.1 server does before it reads a request.
            tls.flush().await.unwrap();
            let mut ping = [0u8; 4];
            tls.read_exact(&mut ping).await.unwrap();
            assert_eq!(&ping, b"ping");
            tls.write_all(b"pong").await.unwrap();
            tls.flush().await.unwrap();
            tls.shutdown().await.unwrap();
        });
        let name = ServerName::try_from("origin.test").unwrap();
        let mut tls = TlsConnector::from(client)
            .connect(name, client_io)
            .await
            .unwrap();
        tls.write_all(b"ping").await.unwrap();
        let mut pong = Vec::new();
        tls.read_to_end(&mut pong).await.unwrap();
        assert_eq!(pong, b"pong");
        let kind = tls.get_ref().1.handshake_kind().unwrap();
        serve.await.unwrap();
        let writes = writes.lock().unwrap().clone();
        (writes, kind)
    }

    /// TLS 1.3: the server's flight, then the tickets and "pong" in one write, then
    /// close_notify (four writes without the hold), and the tickets work: a second connection
    /// resumes.
    #[tokio::test]
    async fn tls13_tickets_leave_with_the_first_answer_and_resume() {
        crate::install_crypto_provider();
        let (server, client) = configs(&[&rustls::version::TLS13]);
        let exchange = |c| exchange(server.clone(), Arc::clone(c), usize::MAX);
        let run = tokio::time::timeout(Duration::from_secs(10), async {
            let (writes, kind) = exchange(&client).await;
            assert_eq!(kind, HandshakeKind::Full);
            let firsts: Vec<u8> = writes.iter().map(|w| w.0).collect();
            assert_eq!(
                firsts,
                [22, APPLICATION_DATA, APPLICATION_DATA],
                "{writes:?}"
            );
            // Two tickets (rustls' default) and the answer: three records in the one write.
            assert!(writes[1].1 > 3 * 22, "{writes:?}");
            let (writes, kind) = exchange(&client).await;
            assert_eq!(kind, HandshakeKind::Resumed);
            assert_eq!(writes.len(), 3, "{writes:?}");
        });
        run.await.expect("the exchanges finish");
    }

    /// TLS 1.2's last flight (change cipher spec, Finished) is never held: the client waits for
    /// it before it sends a byte of its own.
    #[tokio::test]
    async fn a_tls12_handshake_is_not_held() {
        crate::install_crypto_provider();
        let (server, client) = configs(&[&rustls::version::TLS12]);
        let run = tokio::time::timeout(Duration::from_secs(10), async {
            exchange(server.clone(), client.clone(), usize::MAX).await;
            exchange(server, client, usize::MAX).await
        });
        let (writes, kind) = run.await.expect("no deadlock");
        assert_eq!(kind, HandshakeKind::Resumed);
        assert!(writes.iter().all(|w| w.1 > 0));
    }

    /// A socket that takes one byte a write splits the server's flight, so a write made inside
    /// the handshake can begin with an application-data record that the client needs: the
    /// hold lets it go when the handshake waits, and the handshake ends.
    #[tokio::test]
    async fn a_split_flight_is_let_go_when_the_handshake_waits() {
        crate::install_crypto_provider();
        let (server, client) = configs(&[&rustls::version::TLS13]);
        let run = tokio::time::timeout(Duration::from_secs(10), exchange(server, client, 1));
        let (writes, _) = run.await.expect("the handshake was not held up");
        assert!(writes.iter().all(|w| w.1 == 1));
    }
}
