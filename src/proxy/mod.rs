//! The proxy: accept loop, CONNECT, interception or blind tunnel, request rewrite, upstream.
//!
//! - `mod.rs`: [`ProxyState`] (everything a request needs, built once) and [`run`].
//! - `connect.rs`: the client-facing HTTP/1.1 service: CONNECT, absolute-form, refusals.
//! - `forward.rs`: one intercepted request: route, token, header rewrite, upstream, access log.
//! - `upstream.rs`: the pooled upstream client and its resolver.
//! - `error.rs`: [`ProxyError`] and its response.

mod connect;
pub mod error;
mod forward;
pub mod upstream;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::HeaderValue;
use http_body_util::combinators::BoxBody;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

pub use error::{to_response, to_response_for, ProxyError};

use crate::ca::CertificateAuthority;
use crate::config::Config;
use crate::routes::{Action, RouteTable};
use crate::tokens::{TokenEngine, TokenSlot, TokenSpec};

/// Every response body the proxy produces: the origin's streamed body or a small local one.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// What a route resolves to, computed once at start-up so a request does one table lookup and
/// one slot read.
pub(crate) struct RouteTarget {
    pub name: String,
    /// `None` for passthrough routes.
    pub identity: Option<String>,
    pub slot: Option<Arc<TokenSlot>>,
    pub quota_project: Option<HeaderValue>,
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct Metrics {
    pub connections_total: AtomicU64,
    pub connections_active: AtomicU64,
    pub tunnels_total: AtomicU64,
    pub intercepts_total: AtomicU64,
    pub refused_total: AtomicU64,
    /// Responses by status class: 1xx..5xx at indexes 1..=5.
    pub responses: [AtomicU64; 6],
    pub token_errors_total: AtomicU64,
    pub upstream_errors_total: AtomicU64,
}

impl Metrics {
    pub(crate) fn count_status(&self, status: u16) {
        let class = usize::from(status / 100).min(5);
        self.responses[class].fetch_add(1, Ordering::Relaxed);
    }
}

/// Everything the request path needs, shared by every connection.
pub struct ProxyState {
    pub config: Config,
    pub routes: RouteTable,
    pub(crate) targets: Vec<RouteTarget>,
    pub ca: CertificateAuthority,
    pub engine: Arc<TokenEngine>,
    pub(crate) upstream: upstream::UpstreamClient,
    pub metrics: Metrics,
    /// Caps concurrent client connections (`limits.max_connections`).
    pub(crate) connections: Arc<Semaphore>,
}

impl ProxyState {
    pub fn new(
        config: Config,
        ca: CertificateAuthority,
        engine: Arc<TokenEngine>,
    ) -> Result<Arc<ProxyState>, ProxyError> {
        let routes = RouteTable::compile(&config).map_err(|e| ProxyError::Config(e.to_string()))?;
        let mut targets = Vec::with_capacity(routes.len());
        for route in routes.iter() {
            let identity = route.action.identity().map(str::to_string);
            let id_cfg = identity
                .as_deref()
                .map(|name| {
                    config.identities.get(name).ok_or_else(|| {
                        ProxyError::Config(format!(
                            "route `{}`: unknown identity `{name}`",
                            route.name
                        ))
                    })
                })
                .transpose()?;
            let slot = match (&route.action, id_cfg) {
                (Action::Access { .. }, Some(id)) => Some(engine.slot(TokenSpec::access(id))),
                (
                    Action::IdToken {
                        audience,
                        include_email,
                        ..
                    },
                    Some(id),
                ) => Some(engine.slot(TokenSpec::id_token(id, audience, *include_email))),
                _ => None,
            };
            let quota_project = id_cfg
                .and_then(|id| id.quota_project.as_deref())
                .map(|q| {
                    HeaderValue::from_str(q).map_err(|_| {
                        ProxyError::Config(format!("quota_project `{q}` is not a header value"))
                    })
                })
                .transpose()?;
            targets.push(RouteTarget {
                name: route.name.clone(),
                identity,
                slot,
                quota_project,
            });
        }
        let upstream = upstream::build(&config.upstream)?;
        let connections = Arc::new(Semaphore::new(config.limits.max_connections));
        Ok(Arc::new(ProxyState {
            config,
            routes,
            targets,
            ca,
            engine,
            upstream,
            metrics: Metrics::default(),
            connections,
        }))
    }
}

/// Accept connections until `shutdown` resolves, then stop accepting and drain in-flight
/// connections for at most `limits.drain_timeout`.
pub async fn run(
    listener: TcpListener,
    state: Arc<ProxyState>,
    shutdown: impl Future<Output = ()>,
) {
    let (stop_tx, stop) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        // Take a permit before accepting: at the cap, new clients wait in the kernel backlog
        // instead of being accepted and starved.
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = state.connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Usually EMFILE or a reset before accept: back off briefly, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        connect::spawn_client(stream, peer, state.clone(), stop.clone(), permit);
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection (and every tunnel or intercepted session it became) holds a permit:
    // when all permits are back, everything has drained.
    let drain = state.config.limits.drain_timeout;
    let all = u32::try_from(state.config.limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(drain, state.connections.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            secs = drain.as_secs(),
            "drain timed out; closing remaining connections"
        );
    }
}
