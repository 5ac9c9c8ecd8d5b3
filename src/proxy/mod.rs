//! The proxy: accept loop, CONNECT, interception or blind tunnel, request rewrite, upstream.
//!
//! - `mod.rs`: [`ProxyState`] (everything a request needs, built once) and [`run`], which
//!   serves on one worker thread per core.
//! - `balance.rs`: client connections spread evenly over the workers.
//! - `caps.rs`: caps on upstream connections (per origin, in total) and the open-file limit.
//! - `connect.rs`: the client-facing HTTP/1.1 service: CONNECT, absolute-form, refusals.
//! - `forward.rs`: one intercepted request: route, token, header rewrite, upstream, access log.
//! - `headers.rs`: the header rules between the two legs (HTTP/1.1 and h2 either side), as one
//!   table.
//! - `upload.rs`: the request body on its way upstream: lingering after an early answer, and
//!   the gate that makes `Expect: 100-continue` wait for an HTTP/1.1 origin's 100.
//! - `upstream.rs`: the upstream client, its resolver, and the connector that notes each
//!   origin's protocol.
//! - `destination.rs`: where the proxy may connect (no internal addresses unless allowed), and
//!   the dialer that tunnels and the upstream client share.
//! - `idle.rs`: idle clients: handshake, request and tunnel idle timeouts, and closing idle
//!   connections first at `limits.max_connections`.
//! - `memory.rs`: free memory returned to the system once a burst of connections is over.
//! - `multiplex.rs`: a worker's one h2 connection per origin, used without a pool.
//! - `pool.rs`: a worker's HTTP/1.1 upstream connections, and requests waiting for one.
//! - `tickets.rs`: a TLS 1.3 client's session tickets sent with the first answer, not in a
//!   write of their own.
//! - `token_endpoint.rs`: `facade.token_endpoint`, the OAuth2 token endpoint answered with a
//!   placeholder.
//! - `transparent.rs`: the transparent TLS listener: the client hello's server name as a
//!   CONNECT target, for tools that ignore `HTTPS_PROXY`.
//! - `error.rs`: [`ProxyError`] and its response.

pub(crate) mod balance;
mod caps;
pub(crate) mod connect;
pub(crate) mod destination;
pub mod error;
pub(crate) mod forward;
pub(crate) mod headers;
mod idle;
mod memory;
mod multiplex;
mod pool;
mod tickets;
mod token_endpoint;
pub mod transparent;
mod upload;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::HeaderValue;
use http_body_util::combinators::BoxBody;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

pub use error::{to_response, to_response_for, ProxyError};

use arc_swap::ArcSwap;

use crate::ca::CertificateAuthority;
use crate::clients::ClientTable;
use crate::config::Config;
use crate::metrics::{ClientLabels, Metrics, RouteLabels, SeriesTable};
use crate::routes::{Action, RouteTable};
use crate::tokens::{TokenEngine, TokenSlot, TokenSpec};

/// Every response body the proxy produces: the origin's streamed body or a small local one.
pub type Body = BoxBody<Bytes, error::BodyError>;

/// What a route resolves to, computed once at start-up so a request does one table lookup and
/// one slot read.
pub(crate) struct RouteTarget {
    pub name: String,
    /// `None` for passthrough routes.
    pub identity: Option<String>,
    pub slot: Option<Arc<TokenSlot>>,
    pub quota_project: Option<HeaderValue>,
}

/// The part of the config a reload swaps: routes, the identities behind them, and clients.
/// A request loads the current one once; a reload builds the next one beside it (its new
/// identities warmed) and swaps it in, so requests in flight finish on the one they began
/// with and open connections stay open.
pub struct Live {
    /// Counts reloads; tells a connection admitted under an older generation to find its
    /// client again by name.
    pub generation: u64,
    pub routes: RouteTable,
    pub(crate) targets: Vec<RouteTarget>,
    pub clients: Arc<ClientTable>,
    /// The metrics handles of these routes and clients, by route and client index.
    pub series: SeriesTable,
}

impl Live {
    /// Compile routes and clients, and take (or create) the token slot of every route.
    pub fn compile(
        config: &Config,
        engine: &TokenEngine,
        metrics: &Metrics,
        generation: u64,
    ) -> Result<Live, ProxyError> {
        let routes = RouteTable::compile(config).map_err(|e| ProxyError::Config(e.to_string()))?;
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
        let clients = Arc::new(ClientTable::compile(config, routes.len()));
        let route_labels: Vec<RouteLabels<'_>> = targets
            .iter()
            .map(|t| RouteLabels {
                name: &t.name,
                identity: t.identity.as_deref(),
            })
            .collect();
        let client_labels: Vec<ClientLabels<'_>> = clients
            .names()
            .map(|name| {
                let allowed = clients.allowed_for(name);
                ClientLabels {
                    name,
                    may_use: Box::new(move |i| allowed.is_some_and(|a| a.contains(i))),
                }
            })
            .collect();
        let series = metrics.compile(&route_labels, &client_labels);
        drop((route_labels, client_labels));
        Ok(Live {
            generation,
            routes,
            targets,
            clients,
            series,
        })
    }

    /// The token specs this generation's routes use.
    pub fn specs(&self) -> impl Iterator<Item = &TokenSpec> {
        self.targets
            .iter()
            .filter_map(|t| t.slot.as_ref().map(|s| s.spec()))
    }
}

/// Everything the request path needs, shared by every connection.
pub struct ProxyState {
    /// The config the proxy started with. Its `routes`, `identities` and `clients` are
    /// superseded by `live` after a reload; every other setting needs a restart to change.
    pub config: Config,
    /// Routes, identities and clients in force; swapped whole by a reload.
    pub live: ArcSwap<Live>,
    pub ca: CertificateAuthority,
    pub engine: Arc<TokenEngine>,
    /// Checked at start-up; each worker builds its own upstream client from it.
    upstream_tls: rustls::ClientConfig,
    /// `upstream.resolve` and the internal-address policy, for the upstream clients and for
    /// blind tunnels alike.
    pub(crate) destinations: Arc<destination::Destinations>,
    /// Upstream connections per origin and in total, across workers.
    pub(crate) caps: Arc<caps::UpstreamCaps>,
    /// What each origin negotiated, as the workers' upstream connectors find out.
    pub(crate) protocols: Arc<upstream::Protocols>,
    /// Shared with the upstream clients, which count and time their connections.
    pub metrics: Arc<Metrics>,
    /// Caps concurrent client connections (`limits.max_connections`).
    pub(crate) connections: Arc<Semaphore>,
    /// Bumped when the cap is reached: every idle connection closes (`idle.rs`).
    pub(crate) reclaim: watch::Sender<u64>,
    /// Where the config came from and how reloads went (`SIGHUP`, `POST /reload`, the watch).
    pub reload: crate::reload::Reload,
}

impl ProxyState {
    pub fn new(
        config: Config,
        ca: CertificateAuthority,
        engine: Arc<TokenEngine>,
    ) -> Result<Arc<ProxyState>, ProxyError> {
        let metrics = Arc::new(Metrics::default());
        let live = Live::compile(&config, &engine, &metrics, 1)?;
        let upstream_tls = upstream::tls_config(&config.upstream)?;
        // Read once: the hosts file's mappings of routed hosts count as deliberate
        // (destination.rs).
        let hosts_file = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        let destinations = Arc::new(
            destination::Destinations::from_config(&config.upstream)
                .with_hosts_file(&hosts_file, |h| live.routes.routes_host(h)),
        );
        let caps = Arc::new(caps::UpstreamCaps::from_config(&config.upstream));
        caps::raise_fd_limit(
            config.limits.max_connections,
            config.upstream.max_connections,
        );
        let connections = Arc::new(Semaphore::new(config.limits.max_connections));
        Ok(Arc::new(ProxyState {
            config,
            live: ArcSwap::from_pointee(live),
            ca,
            engine,
            upstream_tls,
            destinations,
            caps,
            protocols: Arc::default(),
            metrics,
            connections,
            reclaim: watch::Sender::new(0),
            reload: crate::reload::Reload::default(),
        }))
    }
}

impl ProxyState {
    /// The addresses the proxy's listeners are bound to: nothing connects to them (a
    /// transparent host resolving to the proxy itself would loop; `destination.rs`).
    pub fn set_own_listeners(&self, addrs: Vec<std::net::SocketAddr>) {
        self.destinations.set_own_listeners(addrs);
    }
}

/// Serve until `shutdown` resolves, then stop accepting and drain in-flight connections for at
/// most `limits.drain_timeout`.
///
/// The data plane is thread-per-core: `limits.workers` threads (one per core by default), each
/// with a single-threaded runtime that accepts from the shared listener, serves the connections
/// it accepted and owns an upstream pool; a worker serving more connections than another
/// leaves new ones to the others for a while (`balance.rs`). A connection, its requests and the upstream
/// connections they ride on all stay on one thread, so a request costs no cross-thread wake-ups
/// and h2's per-connection locks are never contended; under tokio's work-stealing runtime the
/// same h2 load took 1.6 times the CPU per request. The token refresher and the admin endpoint
/// stay on the caller's runtime; a cold token miss mints on the worker that needs the token.
///
/// `transparent` is the `transparent.listen` socket, when configured: the same workers accept
/// from it (`transparent.rs`), under the same connection cap.
pub async fn run(
    listener: TcpListener,
    transparent: Option<TcpListener>,
    state: Arc<ProxyState>,
    shutdown: impl Future<Output = ()>,
) {
    let workers = match state.config.limits.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let listener = match listener.into_std() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot hand the listener to the workers");
            return;
        }
    };
    let transparent = match transparent.map(TcpListener::into_std).transpose() {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "cannot hand the transparent listener to the workers");
            return;
        }
    };
    let nodelay =
        nodelay_inherited(&listener) && transparent.as_ref().is_none_or(nodelay_inherited);
    let (stop_tx, stop) = watch::channel(false);
    let (done_tx, done) = watch::channel(false);
    let balance = balance::Balance::new(workers);
    let _ = state.metrics.worker_connections.set(balance.clone());
    let mut exits = Vec::with_capacity(workers);
    for index in 0..workers {
        let worker = Worker {
            index,
            balance: balance.clone(),
            nodelay,
        };
        match spawn_worker(
            worker,
            &listener,
            transparent.as_ref(),
            &state,
            &stop,
            &done,
        ) {
            Ok(exit) => exits.push(exit),
            Err(e) => tracing::error!(worker = index, error = %e, "cannot start a worker"),
        }
    }
    drop(balance);
    drop(listener);
    drop(transparent);
    // Off the workers: returns free memory to the system once a burst of connections is over.
    tokio::spawn(memory::give_back_after_bursts(state.clone(), stop.clone()));
    if exits.is_empty() {
        tracing::error!("no proxy worker could start; not serving");
        return;
    }
    shutdown.await;
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
    // Workers stop their runtimes now, dropping whatever did not drain.
    let _ = done_tx.send(true);
    for exit in exits {
        let _ = exit.await;
    }
}

/// A worker's place among the others: its index and the shared balance.
struct Worker {
    index: usize,
    balance: Arc<balance::Balance>,
    /// Accepted connections come with TCP_NODELAY set (`nodelay_inherited`).
    nodelay: bool,
}

/// Set TCP_NODELAY on a listening socket, and say whether the connections it accepts come
/// with it set. Linux copies a listener's socket options to each connection it accepts
/// (`sk_clone_lock` copies the whole socket, Nagle's flag with it; checked by the test
/// below), which saves a `setsockopt` per connection. Elsewhere, `false`: each connection
/// gets its own call.
fn nodelay_inherited(listener: &std::net::TcpListener) -> bool {
    cfg!(target_os = "linux")
        && socket2::SockRef::from(listener)
            .set_tcp_nodelay(true)
            .is_ok()
}

/// Start `worker` on a thread of its own; the receiver resolves when it has stopped.
fn spawn_worker(
    worker: Worker,
    listener: &std::net::TcpListener,
    transparent: Option<&std::net::TcpListener>,
    state: &Arc<ProxyState>,
    stop: &watch::Receiver<bool>,
    done: &watch::Receiver<bool>,
) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
    let listener = listener.try_clone()?;
    let transparent = transparent.map(|t| t.try_clone()).transpose()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (state, stop, mut done) = (state.clone(), stop.clone(), done.clone());
    let (exit_tx, exit) = tokio::sync::oneshot::channel();
    let index = worker.index;
    std::thread::Builder::new()
        .name(format!("proxy-worker-{index}"))
        .spawn(move || {
            runtime.block_on(async move {
                let listeners = TcpListener::from_std(listener).and_then(|l| {
                    let t = transparent.map(TcpListener::from_std).transpose()?;
                    Ok((l, t))
                });
                match listeners {
                    Ok((listener, t)) => accept_loop(worker, listener, t, state, stop).await,
                    Err(e) => {
                        tracing::error!(worker = index, error = %e, "cannot use the listener")
                    }
                }
                // Keep driving this thread's connections until the drain is over.
                let _ = done.wait_for(|d| *d).await;
            });
            drop(runtime);
            let _ = exit_tx.send(());
        })?;
    Ok(exit)
}

/// One worker's accept loop: until shutdown begins, take a connection permit, wait for this
/// worker's turn (`balance.rs`), accept, serve.
async fn accept_loop(
    worker: Worker,
    listener: TcpListener,
    transparent: Option<TcpListener>,
    state: Arc<ProxyState>,
    mut stop: watch::Receiver<bool>,
) {
    let upstream = Arc::new(upstream::client(
        state.upstream_tls.clone(),
        &state.config.upstream,
        state.destinations.clone(),
        state.caps.clone(),
        state.protocols.clone(),
        state.metrics.clone(),
    ));
    loop {
        // Take a permit before accepting while there are free ones. At the cap, accept one
        // client and hold it (at most one per worker) while every idle connection is asked to
        // close; it is served once a place is free.
        let permit = match state.connections.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(tokio::sync::TryAcquireError::Closed) => break,
            Err(tokio::sync::TryAcquireError::NoPermits) => None,
        };
        if worker.balance.ahead(worker.index) {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                () = worker.balance.turn(worker.index, balance::PATIENCE) => {}
            }
        }
        let (stream, peer, is_transparent) = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            r = accept(&listener, transparent.as_ref()) => match r {
                Ok(c) => c,
                Err(e) => {
                    // Usually EMFILE or a reset before accept: back off briefly, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let permit = match permit {
            Some(p) => p,
            None => {
                tracing::debug!("at limits.max_connections: closing idle connections");
                state.reclaim.send_modify(|g| *g = g.wrapping_add(1));
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => break,
                    p = state.connections.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                }
            }
        };
        if !worker.nodelay {
            let _ = stream.set_nodelay(true);
        }
        let admission = worker.balance.admit(worker.index, permit);
        let serve = if is_transparent {
            transparent::spawn
        } else {
            connect::spawn_client
        };
        serve(
            stream,
            peer,
            state.clone(),
            upstream.clone(),
            stop.clone(),
            admission,
        );
    }
}

/// The size of the future `f` returns, which a task spawned with it holds: for the tests that
/// keep a connection's task small.
#[cfg(test)]
pub(crate) fn future_size<A, B, C, D, E, G, F: Future>(_: fn(A, B, C, D, E, G) -> F) -> usize {
    std::mem::size_of::<F>()
}

/// The next connection on either listener; `true` when it came to the transparent one.
async fn accept(
    listener: &TcpListener,
    transparent: Option<&TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr, bool)> {
    let Some(t) = transparent else {
        return listener.accept().await.map(|(s, p)| (s, p, false));
    };
    tokio::select! {
        r = listener.accept() => r.map(|(s, p)| (s, p, false)),
        r = t.accept() => r.map(|(s, p)| (s, p, true)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The accept loop leaves out its per-connection `set_nodelay` when this says the listener
    /// passes the option on: an answer's last segment must not wait for an ACK (Nagle).
    #[test]
    fn accepted_connections_come_with_nodelay_when_the_listener_says_so() {
        let accepted_nodelay = |listener: &std::net::TcpListener| {
            let addr = listener.local_addr().unwrap();
            let _client = std::net::TcpStream::connect(addr).unwrap();
            listener.accept().unwrap().0.nodelay().unwrap()
        };
        // Off by default: what follows tests the listener's option, not a default.
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(!accepted_nodelay(&plain));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let inherited = nodelay_inherited(&listener);
        assert_eq!(inherited, cfg!(target_os = "linux"));
        if inherited {
            assert!(accepted_nodelay(&listener));
        }
    }
}
