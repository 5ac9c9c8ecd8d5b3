//! The pooled upstream client: hyper-util's legacy client over hyper-rustls, verifying the
//! real host name against the system roots plus configured extra roots, negotiating h2 where
//! the origin offers it, with a `resolve` map (like curl's `--resolve`) that changes where a
//! name connects without changing which name TLS verifies.
//!
//! Each proxy worker thread has a client (and so a pool) of its own, built by [`client`] from
//! the one TLS configuration that [`tls_config`] loads at start-up: a request and the upstream
//! connection it rides on are then driven by the same thread.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tower::Service;

use super::error::ProxyError;
use super::upload::Upload;
use crate::config::UpstreamConfig;

pub type Connector = hyper_rustls::HttpsConnector<HttpConnector<Resolver>>;
pub type UpstreamClient = Client<Connector, Upload>;

/// DNS with overrides. hyper's connector keeps the port we return when the URI names none, so
/// `https://host/…` reaches the mapped `addr:port`.
#[derive(Clone)]
pub struct Resolver {
    overrides: Arc<HashMap<String, SocketAddr>>,
    gai: GaiResolver,
}

impl Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.gai.poll_ready(cx)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        if let Some(addr) = self.overrides.get(name.as_str()) {
            let addr = *addr;
            return Box::pin(async move { Ok(vec![addr].into_iter()) });
        }
        let fut = self.gai.call(name);
        Box::pin(async move { Ok(fut.await?.collect::<Vec<_>>().into_iter()) })
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
pub fn client(tls: rustls::ClientConfig, cfg: &UpstreamConfig) -> UpstreamClient {
    // `host:port` keys: the connector only sees the host, so the port is dropped here and the
    // mapped address's own port is used.
    let overrides = cfg
        .resolve
        .iter()
        .map(|(k, v)| {
            let host = k.rsplit_once(':').map_or(k.as_str(), |(h, _)| h);
            (host.to_ascii_lowercase(), *v)
        })
        .collect();
    let mut http = HttpConnector::new_with_resolver(Resolver {
        overrides: Arc::new(overrides),
        gai: GaiResolver::new(),
    });
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(cfg.connect_timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http);
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_idle_timeout(cfg.idle_timeout)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_max_idle_per_host(256)
        .http2_adaptive_window(true);
    builder.build(https)
}
