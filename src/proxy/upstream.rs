//! The upstream client over hyper-rustls, verifying the real host name against the system roots
//! plus configured extra roots, negotiating h2 where the origin offers it, with a `resolve` map
//! (like curl's `--resolve`) that changes where a name connects without changing which name TLS
//! verifies. Origins that speak h2 get one connection per worker, used directly
//! ([`Multiplex`]); HTTP/1.1 origins and plain `http` go through the worker's [`Pool`].
//!
//! Each proxy worker thread has a client (and so its connections) of its own, built by
//! [`client`] from the one TLS configuration that [`tls_config`] loads at start-up: a request
//! and the upstream connection it rides on are then driven by the same thread.
//!
//! The connector also notes, in the [`Protocols`] all workers share, which origins answered
//! their last new connection with HTTP/1.1 rather than h2: `Expect: 100-continue` can wait for
//! such an origin's own 100, because hyper's client reports 1xx responses on HTTP/1 only.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use dashmap::DashMap;
use http::uri::Scheme;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_rustls::MaybeHttpsStream;
use hyper_util::client::legacy::connect::Connection;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tower::Service;

use super::caps::{Capped, UpstreamCaps};
use super::destination::Destinations;
use super::error::BodyError;
use super::error::ProxyError;
use super::headers::{self, RequestedUpgrade};
use super::multiplex::{self, H2Body, Multiplex, SendError};
use super::pool::{Pool, Sent};
use super::upload::Upload;
use crate::config::UpstreamConfig;
use crate::metrics::Metrics;

type Tls = hyper_rustls::HttpsConnector<Dialer>;
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A worker's upstream client: its own h2 connections to origins that speak h2, its own pool
/// for HTTP/1.1 origins and plain `http`.
pub struct UpstreamClient {
    multiplex: Multiplex,
    pooled: Arc<Pool>,
    protocols: Arc<Protocols>,
    /// Abandoned requests being finished now (see [`Finish`]).
    abandoned: Arc<AtomicUsize>,
}

impl UpstreamClient {
    /// Send `req`, whose URI is absolute, to its origin.
    ///
    /// The returned future is part of every request's state, so it holds only what the common
    /// case needs, the send on the origin's live h2 connection; the other paths are boxed.
    /// As an `async fn` holding them all, it was 9,208 bytes (`-Zprint-type-sizes`), boxed
    /// and copied for every request: 11% of the instructions per request on h2 and 22% on
    /// HTTP/1.1 (`benches/instructions.sh`).
    pub fn request(&self, req: Request<Upload>) -> Sending<'_, impl Future<Output = LiveSent>> {
        if req.uri().scheme() == Some(&Scheme::HTTPS) {
            if let Some((id, conn)) = self.multiplex.live(req.uri()) {
                return Sending::Live {
                    sent: multiplex::send(conn, req),
                    id,
                    client: self,
                };
            }
        }
        Sending::Other {
            other: self.other(req),
        }
    }

    /// The paths besides a live h2 connection: the pool for plain `http` and for an origin
    /// whose newest connection spoke HTTP/1.1; a connect for an origin not yet known.
    fn other(&self, req: Request<Upload>) -> BoxSent<'_> {
        let uri = req.uri();
        let https = uri.scheme() == Some(&Scheme::HTTPS);
        let http1 = uri
            .host()
            .is_some_and(|h| self.protocols.is_http1(h, uri.port_u16().unwrap_or(443)));
        if !https || http1 {
            Box::pin(self.send_pooled(req))
        } else {
            Box::pin(self.connect_and_send(req))
        }
    }

    /// Whether the origin of `uri` (absolute) speaks HTTP/1.1. An origin that no connection
    /// has told about yet is connected to now, one connect at a time as for a request; the
    /// connection is kept if it speaks h2. A failed connect answers no: the request meets the
    /// failure itself.
    pub async fn speaks_http1(&self, uri: &http::Uri) -> bool {
        let Some(host) = uri.host() else {
            return false;
        };
        let https = uri.scheme() == Some(&Scheme::HTTPS);
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        if let Some(h2) = self.protocols.negotiated_h2(host, port) {
            return !h2;
        }
        if !https {
            // The pooled client speaks HTTP/1.1 to plain http.
            return true;
        }
        if self.multiplex.live(uri).is_some() {
            return false;
        }
        Box::pin(self.multiplex.speaks_http1(uri)).await
    }

    /// No live h2 connection: open one, or learn that the origin speaks HTTP/1.1 and use the
    /// pool.
    async fn connect_and_send(&self, req: Request<Upload>) -> Result<Response<UpBody>, BoxError> {
        match self.multiplex.connect_and_send(req).await {
            Ok(sent) => sent,
            Err(http1) => self.send_pooled(http1).await,
        }
    }

    /// The HTTP/1.1 leg (the worker's pool): the rows of the header table that only an
    /// HTTP/1.1 origin needs, then the pool.
    async fn send_pooled(&self, mut req: Request<Upload>) -> Result<Response<UpBody>, BoxError> {
        let upgrade = req.extensions_mut().remove::<RequestedUpgrade>();
        headers::for_http1(req.headers_mut(), upgrade.as_ref());
        let finish = upgrade.is_none() && finishes_if_abandoned(&req);
        let sent: PoolRequest = Box::pin(self.pooled.clone().request(req));
        let sent = if finish {
            Finish::new(sent, self.abandoned.clone()).await
        } else {
            sent.await
        };
        match sent {
            Sent::Answer(answer) => answer.map(|resp| resp.map(UpBody::Http1)),
            // The origin's new connection negotiated h2: the h2 path takes the request.
            Sent::SpeaksH2(req) => match Box::pin(self.multiplex.connect_and_send(req)).await {
                Ok(answer) => answer,
                Err(_) => Err("the origin negotiated h2, then HTTP/1.1 again".into()),
            },
        }
    }
}

/// What a send on a live h2 connection comes to: the request comes back if the connection
/// took no new stream.
type LiveSent = Result<Response<UpBody>, SendError>;

type BoxSent<'a> = Pin<Box<dyn Future<Output = Result<Response<UpBody>, BoxError>> + Send + 'a>>;

/// An origin's response body: an HTTP/1.1 connection's (hyper's) or an h2 stream's.
pub enum UpBody {
    Http1(Incoming),
    H2(H2Body),
}

impl http_body::Body for UpBody {
    type Data = bytes::Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, BodyError>>> {
        match self.get_mut() {
            UpBody::Http1(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BodyError::Origin))),
            UpBody::H2(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BodyError::H2))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Http1(b) => b.is_end_stream(),
            UpBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            UpBody::Http1(b) => b.size_hint(),
            UpBody::H2(b) => b.size_hint(),
        }
    }
}

pin_project_lite::pin_project! {
    /// [`UpstreamClient::request`]'s future.
    #[project = SendingProj]
    pub enum Sending<'a, F> {
        Live {
            #[pin]
            sent: F,
            id: u64,
            client: &'a UpstreamClient,
        },
        Other {
            other: BoxSent<'a>,
        },
    }
}

impl<F: Future<Output = LiveSent>> Future for Sending<'_, F> {
    type Output = Result<Response<UpBody>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let (back, id, client) = match self.as_mut().project() {
                SendingProj::Other { other } => return other.as_mut().poll(cx),
                SendingProj::Live { sent, id, client } => match std::task::ready!(sent.poll(cx)) {
                    Ok(resp) => return Poll::Ready(Ok(resp)),
                    // Never sent: the connection was going away. Again, on a new one.
                    Err(SendError::Refused(back, e)) => {
                        tracing::debug!(error = %e, "h2 connection gone; sending on a new one");
                        (*back, *id, *client)
                    }
                    Err(SendError::Failed(e)) => return Poll::Ready(Err(Box::new(e))),
                },
            };
            client.multiplex.forget(back.uri(), id);
            self.set(Sending::Other {
                other: Box::pin(client.connect_and_send(back)),
            });
        }
    }
}

/// A request on the pool, boxed: it may be finished on a task of its own ([`Finish`]).
type PoolRequest = Pin<Box<dyn Future<Output = Sent> + Send>>;

/// How long an abandoned request may take to answer and to send the rest of its body.
const ABANDONED_WAIT: Duration = Duration::from_secs(5);
/// The most of an abandoned answer's body read and discarded to keep its connection.
const ABANDONED_BYTES: usize = 64 * 1024;
/// Abandoned requests a worker finishes at once; past it, their connections are closed.
const ABANDONED_MAX: usize = 256;

/// Whether a request whose client goes away is finished to keep its HTTP/1.1 connection: a
/// GET, HEAD or OPTIONS without a body. hyper closes the connection when the answer to a
/// request in flight is no longer awaited (it cannot know where the next answer starts), so
/// every client that gives up on a request (a deadline in an SDK, a load tool stopping) cost
/// a new upstream connection and its TLS handshake. Finishing such a request costs the origin
/// nothing more (it has it already, or gets a request that is safe to repeat); a request with
/// a body is not, since its body went with the client.
fn finishes_if_abandoned(req: &Request<Upload>) -> bool {
    use http::Method;
    matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS)
        && http_body::Body::is_end_stream(req.body())
}

/// A pooled request that, if dropped before its answer comes, is finished on a task of its
/// own: the answer awaited and its body read to the end (within [`ABANDONED_WAIT`] and
/// [`ABANDONED_BYTES`]), so that the connection goes back to the pool.
struct Finish {
    sent: Option<PoolRequest>,
    abandoned: Arc<AtomicUsize>,
}

impl Finish {
    fn new(sent: PoolRequest, abandoned: Arc<AtomicUsize>) -> Self {
        Finish {
            sent: Some(sent),
            abandoned,
        }
    }
}

impl Future for Finish {
    type Output = Sent;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(sent) = self.sent.as_mut() else {
            return Poll::Pending;
        };
        let out = std::task::ready!(Pin::new(sent).poll(cx));
        self.sent = None;
        Poll::Ready(out)
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        let Some(sent) = self.sent.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.abandoned.fetch_add(1, Ordering::Relaxed) >= ABANDONED_MAX {
            self.abandoned.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let abandoned = self.abandoned.clone();
        runtime.spawn(async move {
            let _ = tokio::time::timeout(ABANDONED_WAIT, finish_abandoned(sent)).await;
            abandoned.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Await an abandoned request's answer and read its body to the end; a longer body is dropped
/// unread, which closes the connection as before.
async fn finish_abandoned(sent: PoolRequest) {
    use http_body_util::BodyExt;
    let Sent::Answer(Ok(resp)) = sent.await else {
        return;
    };
    let mut body = resp.into_body();
    let mut left = ABANDONED_BYTES;
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(data) = frame.data_ref() {
            match left.checked_sub(data.len()) {
                Some(l) => left = l,
                None => return,
            }
        }
    }
}

/// Which protocol each origin (`host:port`) negotiated on its newest upstream connection.
#[derive(Default)]
pub struct Protocols(DashMap<String, bool>);

/// At most this many origins are remembered; past it, new ones go unrecorded (and are treated
/// as h2, the behaviour for an origin not yet seen).
const PROTOCOLS_KEPT: usize = 4096;

impl Protocols {
    fn note(&self, key: String, h2: bool) {
        if self.0.len() < PROTOCOLS_KEPT || self.0.contains_key(&key) {
            self.0.insert(key, h2);
        }
    }

    /// The origin's newest upstream connection spoke HTTP/1.x.
    pub fn is_http1(&self, host: &str, port: u16) -> bool {
        self.negotiated_h2(host, port) == Some(false)
    }

    /// What the origin's newest upstream connection negotiated: h2 or not; `None` if no
    /// connection has told yet.
    ///
    /// Asked on every request, so the key is written into a buffer the thread keeps rather
    /// than a new `String` (three allocations a request, with `format!`).
    pub fn negotiated_h2(&self, host: &str, port: u16) -> Option<bool> {
        thread_local!(static KEY: RefCell<String> = const { RefCell::new(String::new()) });
        KEY.with_borrow_mut(|key| {
            key.clear();
            write_key(key, host, port);
            self.0.get(key.as_str()).map(|h2| *h2)
        })
    }
}

/// An origin's key: `host:port`, the host in lowercase.
fn key(host: &str, port: u16) -> String {
    let mut key = String::with_capacity(host.len() + 6);
    write_key(&mut key, host, port);
    key
}

fn write_key(key: &mut String, host: &str, port: u16) {
    key.extend(host.chars().map(|c| c.to_ascii_lowercase()));
    key.push(':');
    let mut digits = [0u8; 5];
    let mut at = digits.len();
    let mut rest = port;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    digits[at..].iter().for_each(|&d| key.push(char::from(d)));
}

/// hyper-rustls' connector, noting what each new connection negotiated and timing its TLS
/// handshake.
#[derive(Clone)]
pub struct Connector {
    tls: Tls,
    protocols: Arc<Protocols>,
    metrics: Arc<Metrics>,
}

impl Service<http::Uri> for Connector {
    type Response = MaybeHttpsStream<TokioIo<Capped>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.tls.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
            Some("http") => 80,
            _ => 443,
        });
        let origin = key(uri.host().unwrap_or_default(), port);
        let protocols = self.protocols.clone();
        let metrics = self.metrics.clone();
        let connecting = self.tls.call(uri);
        Box::pin(async move {
            let conn = connecting.await?;
            if let MaybeHttpsStream::Https(tls) = &conn {
                let tcp = tls.inner().get_ref().0.inner().inner();
                metrics.upstream_tls.observe(tcp.connected_at().elapsed());
            }
            protocols.note(origin, conn.connected().is_negotiated_h2());
            Ok(conn)
        })
    }
}

/// `upstream.resolve`: where a `host:port` connects instead of where DNS says, like curl's
/// `--resolve`. Keyed by host and port, so `host:443` and `host:80` can differ; a port with no
/// entry resolves normally.
#[derive(Default)]
pub struct Overrides(HashMap<(String, u16), SocketAddr>);

impl Overrides {
    pub fn from_config(cfg: &UpstreamConfig) -> Overrides {
        // Keys were checked when the config loaded; one that does not split is skipped.
        Overrides(
            cfg.resolve
                .iter()
                .filter_map(|(k, v)| Some((crate::config::split_host_port(k)?, *v)))
                .collect(),
        )
    }

    /// Where `host:port` connects, if the config says; `host` is lower-case.
    pub fn get(&self, host: &str, port: u16) -> Option<SocketAddr> {
        if self.0.is_empty() {
            return None;
        }
        self.0.get(&(host.to_string(), port)).copied()
    }
}

/// The TCP leg under TLS: [`Destinations::dial`], so an overridden `host:port` connects to
/// its address (TLS above still verifies the host name from the URI) and no connection goes
/// to an internal address the config does not allow.
#[derive(Clone)]
pub struct Dialer {
    destinations: Arc<Destinations>,
    caps: Arc<UpstreamCaps>,
    metrics: Arc<Metrics>,
}

impl Service<http::Uri> for Dialer {
    type Response = TokioIo<Capped>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
            Some("http") => 80,
            _ => 443,
        });
        let host = uri.host().unwrap_or_default().to_ascii_lowercase();
        let destinations = self.destinations.clone();
        let caps = self.caps.clone();
        let metrics = self.metrics.clone();
        Box::pin(async move {
            // A place under the caps first: a request queued here takes any pooled
            // connection that comes free meanwhile.
            let places = caps.acquire(key(&host, port)).await?;
            let began = std::time::Instant::now();
            let tcp = destinations.dial(&host, port).await?;
            let capped = Capped::new(tcp, places, metrics);
            capped
                .metrics()
                .upstream_connect
                .observe(capped.connected_at().saturating_duration_since(began));
            Ok(TokioIo::new(capped))
        })
    }
}

/// The upstream TLS client configuration: roots loaded and checked once, at start-up.
pub fn tls_config(cfg: &UpstreamConfig) -> Result<rustls::ClientConfig, ProxyError> {
    let mut roots = rustls::RootCertStore::empty();
    if cfg.system_roots {
        let native = rustls_native_certs::load_native_certs();
        for err in &native.errors {
            tracing::warn!(error = %err, "could not load some system roots");
        }
        let (added, _ignored) = roots.add_parsable_certificates(native.certs);
        tracing::debug!(added, "system roots loaded");
    }
    for path in &cfg.extra_roots {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| {
                ProxyError::Config(format!("upstream.extra_roots {}: {e}", path.display()))
            })?;
        if certs.is_empty() {
            return Err(ProxyError::Config(format!(
                "upstream.extra_roots {}: no PEM certificate",
                path.display()
            )));
        }
        for c in certs {
            roots.add(c).map_err(|e| {
                ProxyError::Config(format!("upstream.extra_roots {}: {e}", path.display()))
            })?;
        }
    }
    if roots.is_empty() {
        return Err(ProxyError::Config(
            "no upstream roots: enable upstream.system_roots or list upstream.extra_roots".into(),
        ));
    }
    Ok(rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A client with a pool of its own. Its connections are driven by tasks on the runtime that
/// opens them, so it is built and used on one worker thread.
pub fn client(
    tls: rustls::ClientConfig,
    cfg: &UpstreamConfig,
    destinations: Arc<Destinations>,
    caps: Arc<UpstreamCaps>,
    protocols: Arc<Protocols>,
    metrics: Arc<Metrics>,
) -> UpstreamClient {
    let dialer = Dialer {
        destinations,
        caps,
        metrics: metrics.clone(),
    };
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(dialer);
    let connector = Connector {
        tls: https,
        protocols: protocols.clone(),
        metrics,
    };
    UpstreamClient {
        multiplex: Multiplex::new(connector.clone(), protocols.clone(), cfg.idle_timeout),
        pooled: Arc::new(Pool::new(connector, cfg.idle_timeout)),
        protocols,
        abandoned: Arc::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_keyed_by_lowercase_host_and_port() {
        assert_eq!(
            key("Storage.GoogleAPIs.com", 443),
            "storage.googleapis.com:443"
        );
        assert_eq!(key("h", 0), "h:0");
        assert_eq!(key("[::1]", 65535), "[::1]:65535");
        let p = Protocols::default();
        p.note(key("A.example", 8443), true);
        p.note(key("b.example", 443), false);
        assert_eq!(p.negotiated_h2("a.EXAMPLE", 8443), Some(true));
        assert_eq!(p.negotiated_h2("a.example", 443), None);
        assert!(p.is_http1("B.example", 443));
        assert_eq!(p.negotiated_h2("b.example", 44), None);
        // The buffer is reused: a shorter key after a longer one is not its prefix.
        assert_eq!(p.negotiated_h2("b.example", 4431), None);
    }
}
