//! The transparent listener, for tools that ignore `HTTPS_PROXY`: a TLS listener that takes
//! the client hello's server name (SNI) as the target, as if a CONNECT to
//! `<sni>:<transparent.port>` had named it, and then takes the CONNECT's steps: the same
//! routes, interception or blind tunnel, `other_hosts`, client rules, caps and timeouts
//! (`connect.rs`). Users point hosts at it with the hosts file, a DNS override, or an
//! iptables `REDIRECT`.
//!
//! The steps, each closing the connection with an access line when it fails:
//!
//! 1. Read the client hello (bounded: [`MAX_HELLO`] bytes, `limits.handshake_timeout`) and
//!    keep its bytes; a scratch rustls [`Acceptor`] reads its server name.
//! 2. No server name: nothing says where the connection goes.
//! 3. The client, by source address alone (`clients.NAME.cidrs`): there is no
//!    `Proxy-Authorization` on this path.
//! 4. The CONNECT decision ([`connect::intercepts`]); for a tunnel, dial the target: where an
//!    iptables `REDIRECT` says the client was going when that is known, else the server name
//!    resolved by the proxy, never one of the proxy's own listeners (`destination.rs`).
//! 5. The session, on the client's stream with the hello put back in front ([`Rewound`]).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::server::Acceptor;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::Instrument;

use super::balance::Admission;
use super::connect::{self, ConnectionSlot, Intercepted};
use super::error::ProxyError;
use super::idle;
use super::upstream::UpstreamClient;
use super::ProxyState;
use crate::config::Config;

/// `transparent:` in the config; off unless present.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransparentConfig {
    /// Where the TLS listener binds. Loopback by default, like `listen`.
    pub listen: SocketAddr,
    /// The port the server-name host is reached on, as a CONNECT would name it (the listener's
    /// own port may differ, behind a `REDIRECT`); it must be in `allowed_ports`.
    pub port: u16,
}

impl Default for TransparentConfig {
    fn default() -> Self {
        TransparentConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            port: 443,
        }
    }
}

/// The config rules for `transparent`: `(key, rule)` of the first one broken. Messages never
/// echo a value.
pub fn validate(config: &Config) -> Result<(), (String, String)> {
    let Some(t) = &config.transparent else {
        return Ok(());
    };
    if t.port == 0 || !config.allowed_ports.contains(&t.port) {
        return Err((
            "transparent.port".into(),
            "must be one of allowed_ports (a transparent connection goes where a CONNECT to that port would)".into(),
        ));
    }
    if t.listen == config.listen && t.listen.port() != 0 {
        return Err((
            "transparent.listen".into(),
            "must differ from listen".into(),
        ));
    }
    if config.clients.is_empty() && !config.serve_anyone && !t.listen.ip().is_loopback() {
        return Err((
            "transparent.listen".into(),
            "not a loopback address and no `clients` are configured: anyone who can reach it \
             would get every route's identity. Configure `clients` (by `cidrs`), or set \
             `serve_anyone: true`"
                .into(),
        ));
    }
    let by_address = config
        .clients
        .values()
        .any(|c| c.password_hash.is_none() && !c.cidrs.is_empty());
    if !config.clients.is_empty() && !by_address {
        return Err((
            "transparent".into(),
            "no client is named by address alone (`cidrs` without `password_hash`): a \
             transparent connection carries no Proxy-Authorization, so none could be served"
                .into(),
        ));
    }
    Ok(())
}

/// The most client-hello bytes read before giving up: a hello fits in one 16 KiB record in
/// practice, and rustls takes handshake messages up to 64 KiB.
pub(crate) const MAX_HELLO: usize = 64 * 1024 + 512;

/// Serve one transparent connection in its own task; as `connect::spawn_client`, the
/// connection permit lives as long as the connection does.
pub(crate) fn spawn(
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<ProxyState>,
    upstream: Arc<UpstreamClient>,
    stop: watch::Receiver<bool>,
    admission: Admission,
) {
    let span = tracing::debug_span!("transparent", client = %peer);
    tokio::spawn(
        async move {
            let slot = Arc::new(ConnectionSlot::new(admission, state.clone()));
            serve(stream, peer, state, upstream, stop, slot).await;
        }
        .instrument(span),
    );
}

async fn serve(
    mut tcp: TcpStream,
    peer: SocketAddr,
    state: Arc<ProxyState>,
    upstream: Arc<UpstreamClient>,
    stop: watch::Receiver<bool>,
    slot: Arc<ConnectionSlot>,
) {
    let port = state.config.transparent.as_ref().map_or(443, |t| t.port);
    let limits = &state.config.limits;
    let hello = match idle::before_handshake(
        std::pin::pin!(read_hello(&mut tcp)),
        limits.handshake_timeout,
        state.reclaim.subscribe(),
    )
    .await
    {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => return closed(&state, peer, "-", &e.to_string()),
        Err(idle::Close::AtCap) => {
            return closed(
                &state,
                peer,
                "-",
                "closed at limits.max_connections before the client hello",
            )
        }
        Err(_) => {
            return closed(
                &state,
                peer,
                "-",
                "no client hello within limits.handshake_timeout",
            )
        }
    };
    let Some(host) = hello.server_name else {
        return closed(
            &state,
            peer,
            "-",
            "the client hello names no server (no SNI): nothing says where the connection goes",
        );
    };
    let target = format!("{host}:{port}");
    let live = state.live.load_full();
    let client = match live
        .clients
        .identify(live.generation, peer.ip(), None)
        .await
    {
        Ok(c) => c,
        Err(_) => {
            return closed(
                &state,
                peer,
                &target,
                "not a configured client: transparent connections are identified by source \
                 address alone (clients.NAME.cidrs without password_hash)",
            )
        }
    };
    drop(live);
    let upstream_tcp = match open(&host, port, &tcp, &state).await {
        Ok(u) => u,
        Err(e) => return closed(&state, peer, &target, &e.to_string()),
    };
    let conn = Intercepted {
        host,
        port,
        peer,
        client,
        state,
        upstream,
    };
    connect::session(
        Rewound::new(hello.bytes, tcp),
        upstream_tcp,
        conn,
        stop,
        slot,
    )
    .await;
}

/// The CONNECT decision for `host:port`; for a tunnel, the upstream connection.
async fn open(
    host: &str,
    port: u16,
    client: &TcpStream,
    state: &ProxyState,
) -> Result<Option<TcpStream>, ProxyError> {
    if connect::intercepts(host, state)? {
        return Ok(None);
    }
    let tcp = match redirected_from(client) {
        Some(addr) => state
            .destinations
            .dial_addr(host, addr)
            .await
            .map_err(|e| ProxyError::from_dial(format!("{host}:{port} at {addr}"), e))?,
        None => connect::dial(host, port, state).await?,
    };
    Ok(Some(tcp))
}

/// Where the client was connecting before an iptables `REDIRECT` (or `TPROXY`) sent it here:
/// `SO_ORIGINAL_DST`, when it differs from the listener's own address.
#[cfg(target_os = "linux")]
fn redirected_from(client: &TcpStream) -> Option<SocketAddr> {
    let local = client.local_addr().ok()?;
    let sock = socket2::SockRef::from(client);
    let v4 = match local.ip() {
        std::net::IpAddr::V4(_) => true,
        std::net::IpAddr::V6(a) => a.to_ipv4_mapped().is_some(),
    };
    let original = if v4 {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    let original = original.ok()?.as_socket()?;
    let same = original.port() == local.port()
        && original.ip().to_canonical() == local.ip().to_canonical();
    (!same).then_some(original)
}

#[cfg(not(target_os = "linux"))]
fn redirected_from(_client: &TcpStream) -> Option<SocketAddr> {
    None
}

/// A transparent connection the proxy closes, with its access line.
fn closed(state: &ProxyState, peer: SocketAddr, target: &str, reason: &str) {
    state
        .metrics
        .transparent_closed_total
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        target: "impersonate_proxy::access",
        client = %peer, target, route = "-", reason,
        "transparent connection closed"
    );
}

/// A client hello: its bytes as read, and the server name it carries.
#[derive(Debug)]
pub(crate) struct Hello {
    pub bytes: Vec<u8>,
    /// Lower-case, without a trailing dot.
    pub server_name: Option<String>,
}

/// Why no client hello could be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HelloError {
    #[error("the client closed before its client hello")]
    Closed,
    #[error("not a TLS client hello: {0}")]
    NotTls(rustls::Error),
    #[error("the client hello is longer than {MAX_HELLO} bytes")]
    TooLong,
    #[error("reading the client hello: {0}")]
    Io(io::Error),
}

/// Read from `io` until a whole client hello is in; return every byte read (to be replayed)
/// and its server name.
pub(crate) async fn read_hello(io: &mut (impl AsyncRead + Unpin)) -> Result<Hello, HelloError> {
    let mut acceptor = Acceptor::default();
    let mut bytes = Vec::with_capacity(2048);
    loop {
        // Read into `bytes` itself: a buffer on the stack would be kept in this future's
        // state, which the connection's task holds and copies.
        let room = MAX_HELLO.saturating_sub(bytes.len()).min(4096);
        if room == 0 {
            return Err(HelloError::TooLong);
        }
        bytes.reserve(room);
        let start = bytes.len();
        let n = (&mut *io)
            .take(room as u64)
            .read_buf(&mut bytes)
            .await
            .map_err(HelloError::Io)?;
        if n == 0 {
            return Err(HelloError::Closed);
        }
        let mut rest = &bytes[start..];
        while !rest.is_empty() {
            match acceptor.read_tls(&mut rest) {
                Ok(0) | Err(_) => return Err(HelloError::TooLong),
                Ok(_) => {}
            }
            match acceptor.accept() {
                Ok(None) => {}
                Ok(Some(accepted)) => {
                    let server_name = accepted
                        .client_hello()
                        .server_name()
                        .map(|s| s.trim_end_matches('.').to_ascii_lowercase())
                        .filter(|s| !s.is_empty());
                    return Ok(Hello { bytes, server_name });
                }
                Err((e, _alert)) => return Err(HelloError::NotTls(e)),
            }
        }
    }
}

/// A stream whose first bytes were already read: they are read again first, then the stream.
/// Writes go straight through.
pub(crate) struct Rewound<T> {
    prefix: Vec<u8>,
    at: usize,
    inner: T,
}

impl<T> Rewound<T> {
    pub fn new(prefix: Vec<u8>, inner: T) -> Rewound<T> {
        Rewound {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl<T> Rewound<T> {
    /// `bytes` to be read first, before whatever was still to be replayed.
    pub fn put_back(self, bytes: &[u8]) -> Rewound<T> {
        let Rewound {
            prefix: mut rest,
            at,
            inner,
        } = self;
        rest.drain(..at.min(rest.len()));
        if bytes.is_empty() {
            return Rewound::new(rest, inner);
        }
        let mut prefix = Vec::with_capacity(bytes.len() + rest.len());
        prefix.extend_from_slice(bytes);
        prefix.extend_from_slice(&rest);
        Rewound::new(prefix, inner)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewound<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at < this.prefix.len() {
            let rest = this.prefix.get(this.at..).unwrap_or_default();
            let n = rest.len().min(buf.remaining());
            buf.put_slice(rest.get(..n).unwrap_or_default());
            this.at += n;
            if this.at >= this.prefix.len() {
                // Replayed: the memory goes back now, not when the connection ends.
                this.prefix = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewound<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Each transparent connection's task holds this future and copies it as it is spawned
    /// and as it ends. It was 5,976 bytes with a 4 KB read buffer inside `read_hello`'s state
    /// and the handshake's futures held twice (see `connect::intercept_tls`).
    #[test]
    fn a_transparent_connection_s_state_stays_small() {
        let bytes = super::super::future_size(serve);
        assert!(bytes <= 3 * 1024, "transparent::serve is {bytes} bytes");
    }

    /// A real client hello from rustls' client, for `name` (or none).
    fn client_hello(name: Option<&str>) -> Vec<u8> {
        crate::install_crypto_provider();
        let roots = rustls::RootCertStore::empty();
        let mut cfg = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.enable_sni = name.is_some();
        let server = rustls::pki_types::ServerName::try_from(
            name.unwrap_or("no-sni.example.com").to_string(),
        )
        .unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(cfg), server).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[tokio::test]
    async fn the_hello_is_read_whole_and_replayed_byte_for_byte() {
        let hello = client_hello(Some("Storage.GoogleAPIs.com"));
        // Sent a few bytes at a time, with more after it that must stay unread.
        let (mut a, mut b) = tokio::io::duplex(64);
        let sent = hello.clone();
        let writer = tokio::spawn(async move {
            for piece in sent.chunks(7) {
                a.write_all(piece).await.unwrap();
            }
            a.write_all(b"after").await.unwrap();
            a
        });
        let got = read_hello(&mut b).await.unwrap();
        assert_eq!(got.server_name.as_deref(), Some("storage.googleapis.com"));
        // Every byte read is kept, the hello's and any that came with its last piece.
        let mut stream = hello.clone();
        stream.extend_from_slice(b"after");
        assert!(got.bytes.len() >= hello.len() && stream.starts_with(&got.bytes));
        let _a = writer.await.unwrap();
        let mut replay = Rewound::new(got.bytes, b);
        let mut all = vec![0u8; hello.len() + 5];
        replay.read_exact(&mut all).await.unwrap();
        assert_eq!(&all[..hello.len()], &hello[..]);
        assert_eq!(&all[hello.len()..], b"after");
    }

    #[tokio::test]
    async fn no_sni_not_tls_closed_and_too_long_are_told_apart() {
        let got = read_hello(&mut &client_hello(None)[..]).await.unwrap();
        assert_eq!(got.server_name, None);
        let e = read_hello(&mut &b"GET / HTTP/1.1\r\n\r\n"[..]).await;
        assert!(matches!(e, Err(HelloError::NotTls(_))), "{e:?}");
        let hello = client_hello(Some("a.example.com"));
        let e = read_hello(&mut &hello[..hello.len() - 1]).await;
        assert!(matches!(e, Err(HelloError::Closed)), "{e:?}");
        // A handshake record that claims to go on and on.
        let mut endless = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0xff, 0xff];
        endless.resize(MAX_HELLO + 10, 0);
        let e = read_hello(&mut &endless[..]).await;
        assert!(
            matches!(e, Err(HelloError::TooLong | HelloError::NotTls(_))),
            "{e:?}"
        );
    }

    #[test]
    fn config_rules_name_the_key() {
        let base = "transparent: { listen: 127.0.0.1:8443 }\n";
        let c = Config::from_yaml(base, "c.yaml").unwrap();
        assert_eq!(c.transparent.as_ref().map(|t| t.port), Some(443));
        assert!(Config::from_yaml("", "c.yaml")
            .unwrap()
            .transparent
            .is_none());
        for (yaml, key) in [
            ("transparent: { port: 8443 }\n", "transparent.port"),
            ("transparent: { port: 0 }\n", "transparent.port"),
            ("transparent: { listen: 127.0.0.1:8080 }\n", "transparent.listen"),
            ("transparent: { listen: 0.0.0.0:443 }\n", "transparent.listen"),
            (
                "transparent: {}\nclients:\n  a: { password_hash: '$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g' }\n",
                "transparent",
            ),
            ("transparent: { nonsense: 1 }\n", "nonsense"),
        ] {
            let e = Config::from_yaml(yaml, "c.yaml").unwrap_err().to_string();
            assert!(e.contains(key), "{yaml}: {e}");
        }
        let ok = "transparent: { listen: 0.0.0.0:443, port: 8443 }\nallowed_ports: [443, 8443]\nclients:\n  lan: { cidrs: [10.0.0.0/8] }\n";
        Config::from_yaml(ok, "c.yaml").unwrap();
    }
}
