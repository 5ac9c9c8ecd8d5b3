//! The client-facing side: an HTTP/1.1 connection that may carry CONNECT (then interception
//! or a blind tunnel) or absolute-form `http://` requests. Anything else is refused: this is
//! not an open relay and not a web server.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::LazyConfigAcceptor;
use tracing::Instrument;

use super::balance::Admission;
use super::error::{to_response, ProxyError};
use super::forward::{self, Target};
use super::idle::{self, Activity, TunnelEnd};
use super::transparent::Rewound;
use super::upstream::UpstreamClient;
use super::{tickets, token_endpoint};
use super::{Body, ProxyState};
use crate::clients::ClientRef;

/// An intercepted request's answer, boxed (see `intercept_tls`).
type Answer =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response<Body>, Infallible>> + Send>>;
use crate::config::OtherHosts;

/// A client connection's place under `limits.max_connections`, held for as long as the
/// connection lives in any form: the HTTP/1.1 connection, then the tunnel or intercepted
/// session a CONNECT turns it into. `connections_active` counts these; it used to be counted
/// down when the HTTP/1.1 connection handed itself over at the upgrade, so every CONNECT
/// session left it at 0.
pub(crate) struct ConnectionSlot {
    _admission: Admission,
    state: Arc<ProxyState>,
}

impl ConnectionSlot {
    pub(super) fn new(admission: Admission, state: Arc<ProxyState>) -> ConnectionSlot {
        let m = &state.metrics;
        m.connections_total.fetch_add(1, Ordering::Relaxed);
        m.connections_active.fetch_add(1, Ordering::Relaxed);
        ConnectionSlot {
            _admission: admission,
            state,
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.state
            .metrics
            .connections_active
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serve one client connection in its own task, on the worker that accepted it; `upstream` is
/// that worker's client. The connection permit travels with whatever the connection becomes
/// (tunnel or intercepted session), so the cap counts those too.
pub(crate) fn spawn_client(
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<ProxyState>,
    upstream: Arc<UpstreamClient>,
    stop: watch::Receiver<bool>,
    admission: Admission,
) {
    let span = tracing::debug_span!("conn", client = %peer);
    tokio::spawn(
        async move {
            let permit = Arc::new(ConnectionSlot::new(admission, state.clone()));
            serve_client(stream, peer, state, upstream, stop, permit).await;
        }
        .instrument(span),
    );
}

/// One client connection, from its first byte to its end (`spawn_client`).
async fn serve_client(
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<ProxyState>,
    upstream: Arc<UpstreamClient>,
    stop: watch::Receiver<bool>,
    permit: Arc<ConnectionSlot>,
) {
    let mut stream = stream;
    let mut stop = stop;
    let mut head = Vec::new();
    match first_head(&mut stream, &mut head, peer, &state, &mut stop).await {
        First::Closed => return,
        First::Other => {}
        First::Connect(target) => {
            if let Err(e) = stream.write_all(CONNECTED).await {
                tracing::debug!(error = %e, "client went before the CONNECT answer");
                return;
            }
            // Whatever the client sent after its CONNECT (a client hello, early) is
            // read again by the TLS accept.
            head.drain(..target.head_len);
            if head.is_empty() {
                // Nothing to replay: the buffer goes now, not with the connection.
                head = Vec::new();
            }
            let conn = Intercepted {
                host: target.host,
                port: target.port,
                peer,
                client: target.client,
                state: state.clone(),
                upstream,
            };
            session(Rewound::new(head, stream), None, conn, stop, permit).await;
            return;
        }
    }
    // Boxed: its state and its code stay apart from the quick path's, which nearly every
    // connection takes.
    Box::pin(serve_http(
        Rewound::new(head, stream),
        peer,
        state,
        upstream,
        stop,
        permit,
    ))
    .await;
}

/// hyper serves a client connection from its first byte, those `first_head` read included.
async fn serve_http(
    stream: Rewound<TcpStream>,
    peer: SocketAddr,
    state: Arc<ProxyState>,
    upstream: Arc<UpstreamClient>,
    stop: watch::Receiver<bool>,
    permit: Arc<ConnectionSlot>,
) {
    let limits = &state.config.limits;
    let mut http = hyper::server::conn::http1::Builder::new();
    // The request head's deadline is the watchdog's (`idle::serve`), not a timer
    // hyper arms for every head.
    http.header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_header_size(limits.max_header_bytes)
        .max_headers(limits.max_headers)
        .keep_alive(true);
    let activity = Arc::new(Activity::default());
    let svc_state = state.clone();
    let svc_stop = stop.clone();
    let svc_activity = activity.clone();
    let svc = service_fn(move |mut req| {
        let busy = svc_activity.begin();
        let (state, upstream, stop, permit) = (
            svc_state.clone(),
            upstream.clone(),
            svc_stop.clone(),
            permit.clone(),
        );
        let answer = async move {
            // Gateway mode: who is asking, before anything else (crate::clients).
            let client = match crate::clients::admit(&mut req, peer, &state).await {
                Ok(c) => c,
                Err(resp) => return Ok(resp),
            };
            handle(req, peer, client, state, upstream, stop, permit).await
        };
        idle::counted(busy, true, answer)
    });
    let conn = http
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    // On shutdown, when idle, or idle at the cap: finish the request in flight, then
    // close. An upgraded CONNECT has already left this future and lives on its own.
    let reclaim = state.reclaim.subscribe();
    let result = idle::serve(
        Box::pin(conn),
        stop,
        reclaim,
        &activity,
        limits.idle_timeout,
        Some(limits.header_read_timeout),
        |c| c.graceful_shutdown(),
    )
    .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
}

/// The answer to a CONNECT the proxy serves: the tunnel is open from here on.
const CONNECTED: &[u8] = b"HTTP/1.1 200 OK\r\n\r\n";

/// What a client connection's first bytes turned out to be.
enum First {
    /// Closed, shut down or timed out before a whole request head came; nothing to answer.
    Closed,
    /// A CONNECT to a host the proxy intercepts, from a client let in without credentials:
    /// served without hyper (`first_head`).
    Connect(QuickConnect),
    /// Anything else: hyper serves the connection from its first byte.
    Other,
}

struct QuickConnect {
    host: String,
    port: u16,
    client: ClientRef,
    /// The CONNECT head's length; what follows it in the buffer came after it.
    head_len: usize,
}

/// Read a client connection's first request head into `buf`, and say whether it is a CONNECT
/// to an intercepted host that needs nothing from hyper: HTTP/1.1, no body, no
/// `Proxy-Authorization`, a port in `allowed_ports`, a client admitted by its address (or no
/// `clients` at all). That is every `HTTPS_PROXY` client's first (and only) request on a
/// connection, and serving it here saves hyper's connection state (two 8 KB buffers), the
/// upgrade hand-over and a task per intercepted connection. Anything else, refusals and their
/// answers included, goes to hyper with the bytes read so far, and takes the path it always
/// did. The head must come within `limits.header_read_timeout` and before shutdown; a
/// connection still waiting for it at the connection cap is closed, as an idle one.
async fn first_head(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    peer: SocketAddr,
    state: &Arc<ProxyState>,
    stop: &mut watch::Receiver<bool>,
) -> First {
    let limits = &state.config.limits;
    let max = limits.max_header_bytes;
    let read = async {
        loop {
            let room = max.saturating_sub(buf.len());
            if room == 0 {
                return Ok(None);
            }
            if buf.len() == buf.capacity() {
                buf.reserve(buf.capacity().max(512).min(room));
            }
            let n = (&mut *stream).take(room as u64).read_buf(&mut *buf).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            match quick_connect(buf) {
                Parsed::Partial => {}
                Parsed::Connect(head_len, authority) => return Ok(Some((head_len, authority))),
                Parsed::Other => return Ok(None),
            }
        }
    };
    let mut reclaim = state.reclaim.subscribe();
    let head: std::io::Result<Option<(usize, http::uri::Authority)>> = tokio::select! {
        biased;
        r = read => r,
        _ = stop.wait_for(|s| *s) => return First::Closed,
        Ok(()) = reclaim.changed() => return First::Closed,
        () = tokio::time::sleep(limits.header_read_timeout) => {
            tracing::debug!(
                "closing a client connection: no request head within limits.header_read_timeout"
            );
            return First::Closed;
        }
    };
    let (head_len, authority) = match head {
        Ok(Some(h)) => h,
        Ok(None) => return First::Other,
        Err(e) => {
            tracing::debug!(error = %e, "client connection ended before its first request");
            return First::Closed;
        }
    };
    let uri = http::Uri::from(authority);
    let Ok((host, port)) = authority_of(&uri, None, state) else {
        return First::Other;
    };
    if !matches!(intercepts(&host, state), Ok(true)) {
        return First::Other;
    }
    let live = state.live.load_full();
    match live
        .clients
        .identify(live.generation, peer.ip(), None)
        .await
    {
        Ok(client) => First::Connect(QuickConnect {
            host,
            port,
            client,
            head_len,
        }),
        Err(_) => First::Other,
    }
}

/// A request head parsed far enough to say which path serves it.
enum Parsed {
    Partial,
    /// A CONNECT the quick path may take: the head's length and its target.
    Connect(usize, http::uri::Authority),
    Other,
}

/// Parse `buf` as a request head (`httparse`, as hyper does) and say whether it is a CONNECT
/// `first_head` may serve: HTTP/1.1, an authority-form target, and none of `Content-Length`,
/// `Transfer-Encoding` or `Proxy-Authorization`. More than 32 header fields is not such a
/// CONNECT either: hyper applies `limits.max_headers` to it.
fn quick_connect(buf: &[u8]) -> Parsed {
    let mut fields = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut fields);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    if req.method != Some("CONNECT") || req.version != Some(1) {
        return Parsed::Other;
    }
    let handled_by_hyper = ["content-length", "transfer-encoding", "proxy-authorization"];
    if req.headers.iter().any(|f| {
        handled_by_hyper
            .iter()
            .any(|n| f.name.eq_ignore_ascii_case(n))
    }) {
        return Parsed::Other;
    }
    match req
        .path
        .and_then(|p| http::uri::Authority::try_from(p).ok())
    {
        Some(authority) => Parsed::Connect(len, authority),
        None => Parsed::Other,
    }
}

async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    client: ClientRef,
    state: Arc<ProxyState>,
    upstream: Arc<UpstreamClient>,
    stop: watch::Receiver<bool>,
    permit: Arc<ConnectionSlot>,
) -> Result<Response<Body>, Infallible> {
    // For the access line of a refusal: what the client asked for (cheap, shared bytes).
    let asked = req.uri().authority().cloned();
    if req.method() == Method::CONNECT {
        return Ok(
            match connect(req, peer, client, &state, upstream, stop, permit).await {
                Ok(resp) => resp,
                Err(e) => refuse(&state, peer, asked.as_ref(), &e),
            },
        );
    }
    // Absolute-form `http://host/path`: forwarded, routes applied.
    let uri = req.uri();
    if uri.scheme() == Some(&http::uri::Scheme::HTTP) && uri.authority().is_some() {
        let target = match plain_target(&req, client, &state) {
            Ok(t) => t,
            Err(e) => return Ok(refuse(&state, peer, asked.as_ref(), &e)),
        };
        return forward::request(req, Arc::new(target), peer, state, upstream).await;
    }
    let e = if uri.scheme().is_some() {
        ProxyError::BadRequest(format!(
            "only CONNECT and http:// absolute-form requests are proxied, not {}",
            uri.scheme_str().unwrap_or("?")
        ))
    } else {
        ProxyError::BadRequest(
            "this is a proxy: send CONNECT host:port or an absolute-form http:// request".into(),
        )
    };
    Ok(refuse(&state, peer, asked.as_ref(), &e))
}

/// Answer a request the proxy will not carry, with one access line saying who asked for what
/// and why: `refused` for policy and malformed requests, `failed` when the target could not
/// be reached.
fn refuse(
    state: &ProxyState,
    peer: SocketAddr,
    asked: Option<&http::uri::Authority>,
    e: &ProxyError,
) -> Response<Body> {
    let status = e.status().as_u16();
    state.metrics.refused(status);
    let target = asked.map_or("-", http::uri::Authority::as_str);
    let outcome = if e.status().is_server_error() {
        "failed"
    } else {
        "refused"
    };
    tracing::info!(
        target: "impersonate_proxy::access",
        client = %peer, target, route = "-", status, reason = %e,
        "{outcome}"
    );
    to_response(e)
}

/// Host (lower-case, no trailing dot) and port of a CONNECT or absolute-form target, checked
/// against the port policy.
fn authority_of(
    uri: &http::Uri,
    default_port: Option<u16>,
    state: &ProxyState,
) -> Result<(String, u16), ProxyError> {
    let (host, port) = host_port(uri, default_port)?;
    if !state.config.allowed_ports.contains(&port) {
        return Err(ProxyError::Refused(format!(
            "port {port} is not in allowed_ports"
        )));
    }
    Ok((host, port))
}

/// Host (lower-case, no trailing dot) and port of a request-target, `default_port` when it
/// names none.
pub(crate) fn host_port(
    uri: &http::Uri,
    default_port: Option<u16>,
) -> Result<(String, u16), ProxyError> {
    let auth = uri
        .authority()
        .ok_or_else(|| ProxyError::BadRequest("request has no host".into()))?;
    let host = auth.host().trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty() {
        return Err(ProxyError::BadRequest("request has an empty host".into()));
    }
    // The text after the host: the http crate's `port_u16` is `None` for a port that is not
    // a number (`:80z80`), as for no port at all, and that must not become the default.
    let after_host = auth
        .as_str()
        .rsplit('@')
        .next()
        .and_then(|h| h.strip_prefix(auth.host()))
        .unwrap_or_default();
    let port = match after_host.strip_prefix(':') {
        Some(p) if !p.is_empty() => p
            .parse::<u16>()
            .map_err(|_| ProxyError::BadRequest(format!("{auth}: the port is not a number")))?,
        // `[::1]exam`: the http crate takes text after an IPv6 literal's bracket.
        None if !after_host.is_empty() => {
            return Err(ProxyError::BadRequest(format!("{auth}: not an authority")))
        }
        _ => default_port
            .ok_or_else(|| ProxyError::BadRequest(format!("CONNECT {auth}: a port is required")))?,
    };
    Ok((host, port))
}

fn plain_target(
    req: &Request<Incoming>,
    client: ClientRef,
    state: &ProxyState,
) -> Result<Target, ProxyError> {
    let (host, port) = authority_of(req.uri(), Some(80), state)?;
    if !state.live.load().routes.routes_host(&host) && state.config.other_hosts == OtherHosts::Deny
    {
        return Err(ProxyError::Refused(format!(
            "{host} is not named by any route (other_hosts: deny)"
        )));
    }
    let mut target = Target::new(host, port, false)?;
    target.client = client;
    Ok(target)
}

/// CONNECT as named steps: check the target, decide, answer, then (after the upgrade) either
/// intercept or copy bytes.
async fn connect(
    req: Request<Incoming>,
    peer: SocketAddr,
    client: ClientRef,
    state: &Arc<ProxyState>,
    upstream_client: Arc<UpstreamClient>,
    stop: watch::Receiver<bool>,
    permit: Arc<ConnectionSlot>,
) -> Result<Response<Body>, ProxyError> {
    let (host, port) = authority_of(req.uri(), None, state)?;
    // For a tunnel, reach the origin before saying 200, so an unreachable host is a 502 the
    // client can read rather than a connection that dies after the handshake.
    let upstream = if intercepts(&host, state)? {
        None
    } else {
        Some(dial(&host, port, state).await?)
    };
    let conn = Intercepted {
        host,
        port,
        peer,
        client,
        state: state.clone(),
        upstream: upstream_client,
    };
    tokio::spawn(async move {
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "CONNECT upgrade failed");
                return;
            }
        };
        // The stream hyper was given (`serve_http`), with what hyper read past the CONNECT's
        // head put back in front: every session runs on the same stream type.
        let io = match upgraded.downcast::<TokioIo<Rewound<TcpStream>>>() {
            Ok(parts) => parts.io.into_inner().put_back(&parts.read_buf),
            Err(_) => {
                tracing::error!("CONNECT upgrade: not the stream the connection was served on");
                return;
            }
        };
        session(io, upstream, conn, stop, permit).await;
    });
    let mut resp = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    *resp.status_mut() = StatusCode::OK;
    Ok(resp)
}

/// The decision a CONNECT to `host` gets (the transparent listener asks it too): intercept a
/// host a route names (or the token endpoint the facade answers), tunnel any other, or refuse
/// it under `other_hosts: deny`.
pub(super) fn intercepts(host: &str, state: &ProxyState) -> Result<bool, ProxyError> {
    let intercept = state.live.load().routes.routes_host(host)
        || (state.config.facade.token_endpoint && token_endpoint::is_host(host));
    if !intercept && state.config.other_hosts == OtherHosts::Deny {
        return Err(ProxyError::Refused(format!(
            "{host} is not named by any route (other_hosts: deny)"
        )));
    }
    Ok(intercept)
}

/// After the decision: copy bytes to `upstream` when there is one, else intercept. `io` is
/// the client's stream: an upgraded CONNECT, or a transparent connection with its client
/// hello put back in front. `permit` is the connection's place, given back when the tunnel
/// or the intercepted session ends.
pub(super) async fn session<IO>(
    io: IO,
    upstream: Option<TcpStream>,
    conn: Intercepted,
    stop: watch::Receiver<bool>,
    permit: Arc<ConnectionSlot>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match upstream {
        Some(mut tcp) => {
            let client_name = conn.client.name();
            tunnel(
                io,
                &mut tcp,
                conn.peer,
                client_name,
                &conn.host,
                conn.port,
                &conn.state,
            )
            .await;
            drop(permit);
        }
        None => intercept_tls(io, conn, stop, permit).await,
    }
}

/// Connect to `host:port` for a blind tunnel, honouring `upstream.resolve` and the
/// internal-address policy (`destination.rs`).
pub(super) async fn dial(
    host: &str,
    port: u16,
    state: &ProxyState,
) -> Result<TcpStream, ProxyError> {
    state
        .destinations
        .dial(host, port)
        .await
        .map_err(|e| ProxyError::from_dial(format!("{host}:{port}"), e))
}

/// Copy bytes both ways until either side closes, or the tunnel is idle (`idle.rs`); one
/// access line when it ends.
async fn tunnel(
    mut client: impl AsyncRead + AsyncWrite + Unpin,
    tcp: &mut TcpStream,
    peer: SocketAddr,
    client_name: &str,
    host: &str,
    port: u16,
    state: &ProxyState,
) {
    let m = &state.metrics;
    let _open = crate::metrics::Open::new(&m.tunnels_total, &m.tunnels_open);
    let started = std::time::Instant::now();
    let limits = &state.config.limits;
    let (end, up, down) = idle::tunnel(
        &mut client,
        tcp,
        limits.handshake_timeout,
        limits.tunnel_idle_timeout,
        state.reclaim.subscribe(),
    )
    .await;
    let secs = started.elapsed().as_secs_f64();
    m.tunnel_bytes_up.fetch_add(up, Ordering::Relaxed);
    m.tunnel_bytes_down.fetch_add(down, Ordering::Relaxed);
    match end {
        TunnelEnd::Done(Ok(_)) => tracing::info!(
            target: "impersonate_proxy::access",
            client = %peer, client_name, host, port, up, down, secs, "tunnel closed"
        ),
        // A reset by either end is how many tunnels end; not the proxy's failure.
        TunnelEnd::Done(Err(e)) => tracing::info!(
            target: "impersonate_proxy::access",
            client = %peer, client_name, host, port, up, down, secs, reason = %e, "tunnel ended with an error"
        ),
        TunnelEnd::Closed(reason) => tracing::info!(
            target: "impersonate_proxy::access",
            client = %peer, client_name, host, port, up, down, secs, reason, "tunnel closed by the proxy"
        ),
    }
}

/// A CONNECT's (or transparent connection's) session: where it goes, who asked, and what
/// serves it.
pub(super) struct Intercepted {
    pub host: String,
    pub port: u16,
    pub peer: SocketAddr,
    /// Admitted on the CONNECT; the session's requests inherit it.
    pub client: ClientRef,
    pub state: Arc<ProxyState>,
    pub upstream: Arc<UpstreamClient>,
}

/// TLS accept with a leaf for the CONNECT host, then serve HTTP/1.1 or h2 (by ALPN) on it.
async fn intercept_tls<IO>(
    io: IO,
    conn: Intercepted,
    stop: watch::Receiver<bool>,
    permit: Arc<ConnectionSlot>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Intercepted {
        host,
        port,
        peer,
        client,
        state,
        upstream,
    } = conn;
    let m = &state.metrics;
    let _open = crate::metrics::Open::new(&m.intercepts_total, &m.intercepts_open);
    let limits = &state.config.limits;
    // Each step's state is held only while it runs (the client hello, then the handshake),
    // and no future here is passed by value to an async fn, which would keep a second copy:
    // this task's future was 12.6 KB, copied as it was spawned and again as it ended.
    let tls = {
        let accepting = std::pin::pin!(async {
            // The session tickets wait for the first answer (see `tickets`).
            let io = tickets::Coalesce::new(io);
            let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
            let start = match acceptor.await {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!(target: "impersonate_proxy::access", client = %peer, host, port, reason = %e, "client did not start TLS");
                    return None;
                }
            };
            // Bound first: a temporary in the match would live across the await.
            let accept = handshake(start, &host, port, peer, &state)?;
            match tickets::accept(accept).await {
                Ok(t) => Some(t),
                Err(e) => {
                    // Most often the client does not trust the proxy's CA: say so where users look.
                    tracing::info!(target: "impersonate_proxy::access", client = %peer, host, port, reason = %e, "TLS handshake with the client failed");
                    None
                }
            }
        });
        match idle::before_handshake(
            accepting,
            limits.handshake_timeout,
            state.reclaim.subscribe(),
        )
        .await
        {
            Ok(Some(tls)) => tls,
            Ok(None) => return,
            Err(why) => {
                let reason = match why {
                    idle::Close::AtCap => {
                        "closed at limits.max_connections before the TLS handshake"
                    }
                    _ => "no TLS handshake within limits.handshake_timeout",
                };
                tracing::info!(target: "impersonate_proxy::access", client = %peer, host, port, reason, "client did not start TLS");
                return;
            }
        }
    };
    let target = match Target::new(host, port, true) {
        Ok(mut t) => {
            t.client = client;
            Arc::new(t)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot serve the intercepted connection");
            return;
        }
    };
    let svc_state = state.clone();
    // `facade.token_endpoint`: this connection's token requests are answered here.
    let answers_tokens =
        state.config.facade.token_endpoint && token_endpoint::is_host(&target.host);
    let activity = Arc::new(Activity::default());
    let svc_activity = activity.clone();
    // The protocol is the one ALPN settled in the handshake (`h2`, or HTTP/1.1 when the client
    // offered nothing else: h2 over TLS is negotiated by ALPN, RFC 9113 §3.2), so no bytes are
    // read ahead to guess it.
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    // Each answer is boxed: hyper's HTTP/1.1 server keeps room for one answer future for the
    // connection's whole life, so unboxed, every idle keep-alive connection held the ~3.9 KB
    // of a request's state machine (massif, benches/idle.rs); boxed, it holds a pointer and a
    // request pays one allocation.
    let svc = service_fn(move |req| -> Answer {
        let busy = svc_activity.begin();
        if answers_tokens && token_endpoint::is_token_request(&target.host, &req) {
            let host = target.host.clone();
            return Box::pin(idle::counted(busy, !h2, async move {
                token_endpoint::answer(req, &host, peer).await
            }));
        }
        let answer = forward::request(
            req,
            target.clone(),
            peer,
            svc_state.clone(),
            upstream.clone(),
        );
        Box::pin(idle::counted(busy, !h2, answer))
    });
    // Each protocol's session runs in a task of its own and this one ends: a task keeps room
    // for the largest state its future passes through, so serving in this task kept the
    // CONNECT and handshake states, and the other protocol's, beside every idle keep-alive
    // session (benches/idle.rs: 36.2 KiB a connection before, see the README for after).
    let session = Session {
        stop,
        reclaim: state.reclaim.subscribe(),
        activity,
        idle_timeout: limits.idle_timeout,
        head_timeout: (!h2).then_some(limits.header_read_timeout),
        permit,
    };
    let io = TokioIo::new(tls);
    if h2 {
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .adaptive_window(true)
            .keep_alive_interval(Some(std::time::Duration::from_secs(30)))
            .serve_connection(io, svc);
        session.spawn(Box::pin(conn), |c| c.graceful_shutdown());
    } else {
        let conn = hyper::server::conn::http1::Builder::new()
            .header_read_timeout(None)
            .max_buf_size(limits.max_header_bytes.max(8192))
            .max_headers(limits.max_headers)
            .keep_alive(true)
            .serve_connection(io, svc)
            .with_upgrades();
        session.spawn(Box::pin(conn), |c| c.graceful_shutdown());
    }
}

/// What an intercepted session's task needs besides its connection.
struct Session {
    stop: watch::Receiver<bool>,
    reclaim: watch::Receiver<u64>,
    activity: Arc<Activity>,
    idle_timeout: std::time::Duration,
    /// HTTP/1.1: `limits.header_read_timeout`.
    head_timeout: Option<std::time::Duration>,
    /// The connection's place under `limits.max_connections`, free when the session ends.
    permit: Arc<ConnectionSlot>,
}

impl Session {
    /// Serve `conn` in a task of its own until it ends. It comes boxed, before the task
    /// captures it, so that it is held once (see `idle::serve`).
    fn spawn<C>(
        self,
        conn: std::pin::Pin<Box<C>>,
        graceful: impl FnOnce(std::pin::Pin<&mut C>) + Send + 'static,
    ) where
        C: std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static,
    {
        let Session {
            stop,
            reclaim,
            activity,
            idle_timeout,
            head_timeout,
            permit,
        } = self;
        tokio::spawn(
            async move {
                let result = idle::serve(
                    conn,
                    stop,
                    reclaim,
                    &activity,
                    idle_timeout,
                    head_timeout,
                    graceful,
                )
                .await;
                if let Err(e) = result {
                    tracing::debug!(error = %e, "intercepted connection ended with an error");
                }
                drop(permit);
            }
            .in_current_span(),
        );
    }
}

/// The rest of the TLS handshake once the client hello is in: check its server name, mint a
/// leaf for the CONNECT host, and start the handshake with it. `None` (logged) if a step fails.
fn handshake<IO>(
    start: tokio_rustls::StartHandshake<tickets::Coalesce<IO>>,
    host: &str,
    port: u16,
    peer: SocketAddr,
    state: &ProxyState,
) -> Option<tokio_rustls::Accept<tickets::Coalesce<IO>>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    // The CONNECT target decides where the request goes and which routes apply; a client
    // hello naming another host is refused rather than trusted.
    if let Some(sni) = start.client_hello().server_name() {
        if !sni.trim_end_matches('.').eq_ignore_ascii_case(host) {
            tracing::info!(
                target: "impersonate_proxy::access",
                client = %peer,
                host,
                port,
                sni,
                "refused: the TLS server name differs from the CONNECT host"
            );
            return None;
        }
    }
    match state.ca.server_config(host) {
        Ok(config) => Some(start.into_stream(config)),
        Err(e) => {
            tracing::warn!(host, error = %e, "cannot mint a certificate");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every intercepted connection's task holds this future, moved there as the task is
    /// spawned and written over as it ends. It was 11,976 bytes (12,664 with the upgrade
    /// around it) when the handshake's futures went by value into async fns, each kept twice.
    #[test]
    fn a_handshake_s_state_stays_small() {
        fn state_of<A, B, C, D, F: std::future::Future>(_: fn(A, B, C, D) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        // Every session runs on this stream: a CONNECT served by `first_head` or by hyper
        // (put back together from the upgrade), and a transparent connection.
        let bytes = state_of(intercept_tls::<Rewound<TcpStream>>);
        assert!(bytes <= 3 * 1024, "intercept_tls is {bytes} bytes");
        let bytes = super::super::future_size(serve_client);
        assert!(bytes <= 3 * 1024, "serve_client is {bytes} bytes");
    }

    #[test]
    fn only_a_plain_connect_takes_the_quick_path() {
        let quick = |head: &str| match quick_connect(head.as_bytes()) {
            Parsed::Connect(len, authority) => Some((len, authority.to_string())),
            Parsed::Partial => None,
            Parsed::Other => Some((0, "other".into())),
        };
        let plain = "CONNECT storage.googleapis.com:443 HTTP/1.1\r\nHost: storage.googleapis.com:443\r\n\r\n";
        assert_eq!(
            quick(plain),
            Some((plain.len(), "storage.googleapis.com:443".into()))
        );
        // What came after the head is not part of it.
        assert_eq!(
            quick(&format!("{plain}\x16\x03\x01")).map(|(n, _)| n),
            Some(plain.len())
        );
        // Not all there yet.
        assert_eq!(
            quick("CONNECT storage.googleapis.com:443 HTTP/1.1\r\nHost: x"),
            None
        );
        assert_eq!(quick("CONN"), None);
        // hyper's: other methods and versions, a body, credentials, a target that is no
        // authority, malformed heads, more fields than the quick path reads.
        let many: String = (0..40).map(|i| format!("X-{i}: y\r\n")).collect();
        for head in [
            "GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n".to_string(),
            "CONNECT example.com:443 HTTP/1.0\r\n\r\n".into(),
            "CONNECT example.com:443 HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello".into(),
            "CONNECT example.com:443 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".into(),
            "CONNECT example.com:443 HTTP/1.1\r\nproxy-authorization: Basic eDp5\r\n\r\n".into(),
            "CONNECT /path HTTP/1.1\r\n\r\n".into(),
            "CONNECT http://example.com:443/ HTTP/1.1\r\n\r\n".into(),
            "connect example.com:443 HTTP/1.1\r\n\r\n".into(),
            "CONNECT example.com:443 HTTP/1.1\r\nBad Field: x\r\n\r\n".into(),
            "\x16\x03\x01\x02\x00\x01\x00\x01\x7c\x03\x03".into(),
            format!("CONNECT example.com:443 HTTP/1.1\r\n{many}\r\n"),
        ] {
            assert_eq!(quick(&head), Some((0, "other".into())), "{head:?}");
        }
    }

    /// Found by the `request_target` fuzz target: `http://example.com:80z80/` (the http crate
    /// takes it, with no port number) was forwarded to port 80.
    #[test]
    fn a_port_that_is_no_number_is_refused_not_defaulted() {
        for (target, default) in [
            ("http://example.com:80z80/x", Some(80)),
            ("http://example.com:99999/x", Some(80)),
            ("example.com:4x3", None),
            ("[::1]:44x3", None),
            // Found by the fuzz target too: text after an IPv6 literal's bracket.
            ("http://[::1]exam/", Some(80)),
            ("[::1]443", None),
        ] {
            let uri: http::Uri = target.parse().unwrap();
            let e = host_port(&uri, default).unwrap_err();
            assert_eq!(e.status(), 400, "{target}");
        }
        for (target, default, port) in [
            ("http://example.com/x", Some(80), 80),
            ("http://example.com:/x", Some(80), 80),
            ("http://u:p@example.com:8080/x", Some(80), 8080),
            ("example.com:443", None, 443),
            ("[::1]:8443", None, 8443),
            ("http://[::1]/", Some(80), 80),
        ] {
            let uri: http::Uri = target.parse().unwrap();
            assert_eq!(host_port(&uri, default).unwrap().1, port, "{target}");
        }
    }
}
