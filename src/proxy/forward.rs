//! One request on an intercepted connection (or an absolute-form `http://` request): find the
//! route, read the token, rewrite the headers, send it on the pooled upstream client, stream
//! the answer back, and write the access line.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;

use super::error::{to_response_for, ProxyError};
use super::headers;
use super::upload::{Continue, Upload};
use super::upstream::UpstreamClient;
use super::{Body, ProxyState};
use crate::clients::ClientRef;
use crate::config::{PlainHttp, Unmatched};
use crate::metrics::{self, Metered, RequestSeries};

/// Where the requests of one connection go: the CONNECT target (or the absolute-form URI's
/// authority). Routing and the upstream authority come from here, never from the client's
/// `Host` header, so a client cannot steer a token to another host.
pub(crate) struct Target {
    pub host: String,
    pub port: u16,
    /// Scheme and authority of every upstream URI, built once for the connection.
    scheme: Scheme,
    authority: Authority,
    /// A plain `http` target (an absolute-form request on the listener): `Host` is ignored
    /// there, and a request a route gives a token goes to this `https` authority instead
    /// (the host on 443), or is refused, by `plain_http`.
    tls_authority: Option<Authority>,
    /// Who sent this connection's requests, as admitted on the CONNECT (or the absolute-form
    /// request): it decides which routes they may match.
    pub client: ClientRef,
}

impl Target {
    /// `host` is lower-case without a trailing dot, as [`super::connect`] checked it.
    pub fn new(host: String, port: u16, tls: bool) -> Result<Target, ProxyError> {
        let default_port = if tls { 443 } else { 80 };
        let bad = |e: http::uri::InvalidUri| {
            ProxyError::BadRequest(format!("{host}:{port} is not an authority: {e}"))
        };
        let authority = if port == default_port {
            Authority::try_from(host.as_str())
        } else {
            Authority::try_from(format!("{host}:{port}"))
        }
        .map_err(bad)?;
        let tls_authority = if tls {
            None
        } else {
            Some(Authority::try_from(host.as_str()).map_err(bad)?)
        };
        let scheme = if tls { Scheme::HTTPS } else { Scheme::HTTP };
        Ok(Target {
            host,
            port,
            scheme,
            authority,
            tls_authority,
            client: ClientRef::anyone(0),
        })
    }

    /// The authority every upstream request of this connection carries.
    pub(crate) fn authority(&self) -> &Authority {
        &self.authority
    }

    /// `host:port`, for messages and access lines.
    pub fn host_port(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// What the requests on this connection must name as their authority.
    pub(crate) fn expected(&self) -> headers::Expected<'_> {
        headers::Expected {
            host: &self.host,
            port: self.port,
            default_port: if self.scheme == Scheme::HTTPS {
                443
            } else {
                80
            },
            host_ignored: self.tls_authority.is_some(),
        }
    }
}

static X_GOOG_USER_PROJECT: HeaderName = HeaderName::from_static("x-goog-user-project");

pub(crate) async fn request(
    req: Request<Incoming>,
    target: Arc<Target>,
    peer: SocketAddr,
    state: Arc<ProxyState>,
    upstream: Arc<UpstreamClient>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let method = req.method().clone();
    // A cheap clone (shared bytes): the request moves on, the access line still needs it.
    let path_and_query = req.uri().path_and_query().cloned();
    let path = path_and_query.as_ref().map_or("/", PathAndQuery::path);
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    // One load of the routes, identities and clients in force: a reload during this request
    // does not change what it gets.
    let live = state.live.load_full();
    let (client_index, selected) =
        crate::clients::select(&live, &target.client, &target.host, path, &method);
    let route_index = selected.as_ref().ok().copied().flatten();
    let route = route_index.and_then(|i| live.targets.get(i));
    // This request's metrics handles, compiled with the routes: no lookup by name, no lock.
    let series = live.series.cell(route_index, client_index);
    let route_name = route.map_or("-", |r| r.name.as_str());
    let identity = route.and_then(|r| r.identity.as_deref()).unwrap_or("-");
    let target_sa = route
        .and_then(|r| r.slot.as_ref())
        .map_or("-", |s| s.spec().target.as_str());

    let result = match selected {
        Ok(_) => {
            let metered = (series, started);
            forward(req, &target, route, &live, &state, &upstream, metered).await
        }
        Err(e) => Err(e),
    };
    let client_name = target.client.name();
    let (resp, error) = match result {
        Ok(resp) => (resp, None),
        Err(e) => {
            match &e {
                ProxyError::NoToken { .. } => state
                    .metrics
                    .token_errors_total
                    .fetch_add(1, Ordering::Relaxed),
                ProxyError::Unreachable { .. } | ProxyError::Timeout { .. } => state
                    .metrics
                    .upstream_errors_total
                    .fetch_add(1, Ordering::Relaxed),
                _ => 0,
            };
            (to_response_for(&e, grpc), Some(e))
        }
    };
    let status = resp.status().as_u16();
    let latency = started.elapsed();
    series.count(
        metrics::method_class(&method),
        metrics::status_class(status),
    );
    series.route.headers.observe(latency);
    if error.is_some() {
        // A local answer: its small body is complete with its head.
        series.route.complete.observe(latency);
    }
    let bytes = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    let latency_us = latency.as_micros() as u64;
    let source = state.engine.source_principal();
    // One access line per request; a refusal or failure says why, at warn.
    match error {
        None => tracing::info!(
            target: "impersonate_proxy::access",
            client = %peer, client_name, method = %method, host = %target.host, port = target.port, path,
            route = route_name, identity, target_sa, source, status, bytes, latency_us,
            "request"
        ),
        Some(e) => tracing::warn!(
            target: "impersonate_proxy::access",
            client = %peer, client_name, method = %method, host = %target.host, port = target.port, path,
            route = route_name, identity, target_sa, source, status, bytes, latency_us,
            reason = %e,
            "request failed"
        ),
    }
    Ok(resp)
}

async fn forward(
    req: Request<Incoming>,
    target: &Target,
    route: Option<&super::RouteTarget>,
    live: &super::Live,
    state: &ProxyState,
    upstream: &UpstreamClient,
    (series, started): (&Arc<RequestSeries>, Instant),
) -> Result<Response<Body>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    // One limit for both protocols: hyper enforces it on HTTP/1.1, h2 has only a size limit.
    let max = state.config.limits.max_headers;
    if parts.headers.len() > max {
        return Err(ProxyError::TooManyHeaders {
            count: parts.headers.len(),
            max,
        });
    }
    // The table in `headers.rs`, row by row: the authority first, since the route and the
    // token belong to the connection's target.
    headers::check_authority(&mut parts, &target.expected())?;
    if route.is_none()
        && live.routes.routes_host(&target.host)
        && state.config.unmatched == Unmatched::Deny
    {
        return Err(ProxyError::Refused(format!(
            "no route matches {} {}{} (unmatched: deny)",
            parts.method,
            target.host,
            parts.uri.path()
        )));
    }

    // An HTTP/1.1 upgrade (WebSocket and the like) is the origin's to accept or refuse: the
    // HTTP/1.1 leg asks for it again, and a 101 joins the two connections.
    let upgrade = requested_upgrade(&parts.headers, parts.version);
    let client_upgrade = upgrade
        .as_ref()
        .and_then(|_| parts.extensions.remove::<hyper::upgrade::OnUpgrade>());
    headers::strip_hop_by_hop(&mut parts.headers);
    headers::match_content_length(&mut parts.headers, body.size_hint().exact());
    if let Some(proto) = upgrade {
        parts.extensions.insert(headers::RequestedUpgrade(proto));
    }
    let mut tls_upgrade = false;
    if let Some(route) = route {
        if let Some(slot) = &route.slot {
            // A token never leaves in cleartext: a plain-http request that gets one goes
            // upstream over TLS, or is refused.
            if target.tls_authority.is_some() {
                if state.config.plain_http == PlainHttp::Deny {
                    return Err(ProxyError::Refused(format!(
                        "route `{}` gives a token, and tokens are not sent over plain http \
                         (plain_http: deny); use https://{}",
                        route.name, target.host
                    )));
                }
                tls_upgrade = true;
            }
            let value = slot
                .authorization()
                .await
                .map_err(|source| ProxyError::NoToken {
                    route: route.name.clone(),
                    identity: route.identity.clone().unwrap_or_default(),
                    source: Box::new(source),
                })?;
            // `insert` replaces every existing Authorization value, not just the first.
            parts.headers.insert(header::AUTHORIZATION, value);
        }
        if let Some(q) = &route.quota_project {
            parts.headers.insert(X_GOOG_USER_PROJECT.clone(), q.clone());
        }
    }

    parts.uri = upstream_uri(target, std::mem::take(&mut parts.uri), tls_upgrade)?;
    let client_version = parts.version;
    // The upstream leg negotiates its own version by ALPN; hyper's client speaks h2 on an h2
    // connection whatever this says, and HTTP/2 here would forbid falling back to HTTP/1.1.
    parts.version = Version::HTTP_11;
    let timeout = state.config.upstream.response_timeout;
    // Whether the origin will send its own 100 decides how the body waits; for an origin no
    // connection has told about yet, a connect finds out (bounded like any connect).
    let expects = client_version <= Version::HTTP_11
        && parts
            .headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
        && tokio::time::timeout(
            state.config.upstream.connect_timeout,
            upstream.speaks_http1(&parts.uri),
        )
        .await
        .unwrap_or(false);
    let mut body = Upload::new(body, client_version, series.clone());
    let mut continues = None;
    if expects {
        let signal = Arc::new(Continue::default());
        body = body.wait_for(signal.clone());
        continues = Some(signal);
    }
    let mut req = Request::from_parts(parts, body);
    if let Some(signal) = continues {
        hyper::ext::on_informational(&mut req, move |res| {
            if res.status() == http::StatusCode::CONTINUE {
                signal.open();
            }
        });
    }
    let sent = tokio::time::timeout(timeout, upstream.request(req));
    let mut resp = match sent.await {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => return Err(ProxyError::from_upstream(target.host_port(), &*e)),
        Err(_) => {
            return Err(ProxyError::Timeout {
                authority: target.host_port(),
                secs: timeout.as_secs(),
            })
        }
    };
    let switching = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
    let accepted = resp.headers().get(header::UPGRADE).cloned();
    headers::response_from_origin(resp.headers_mut());
    if let (true, Some(client), Some(proto)) = (switching, client_upgrade, accepted) {
        resp.headers_mut().insert(header::UPGRADE, proto);
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        let origin = hyper::upgrade::on(&mut resp);
        tokio::spawn(join_upgraded(client, origin, target.host_port()));
    }
    let idle = state.config.upstream.body_idle_timeout;
    let series = series.clone();
    Ok(resp.map(|b| Metered::new(super::idle::BodyIdle::new(b, idle), series, started).boxed()))
}

/// The protocol a client asks to switch to, if it asks the HTTP/1.1 way.
fn requested_upgrade(headers: &HeaderMap, version: Version) -> Option<HeaderValue> {
    if version != Version::HTTP_11 {
        return None;
    }
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
}

/// After a 101: copy bytes between the client's and the origin's upgraded connections.
async fn join_upgraded(
    client: hyper::upgrade::OnUpgrade,
    origin: hyper::upgrade::OnUpgrade,
    authority: String,
) {
    match tokio::try_join!(client, origin) {
        Ok((c, o)) => {
            let (mut c, mut o) = (TokioIo::new(c), TokioIo::new(o));
            if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut o).await {
                tracing::debug!(authority, error = %e, "upgraded connection ended");
            }
        }
        Err(e) => tracing::debug!(authority, error = %e, "upgrade did not complete"),
    }
}

/// The client's path and query on the connection's scheme and authority (or, for a plain-http
/// request that carries a token, `https` on the host's 443): the client's own authority (or
/// `Host`) is never used.
fn upstream_uri(target: &Target, incoming: Uri, tls_upgrade: bool) -> Result<Uri, ProxyError> {
    let mut parts = incoming.into_parts();
    match (&target.tls_authority, tls_upgrade) {
        (Some(authority), true) => {
            parts.scheme = Some(Scheme::HTTPS);
            parts.authority = Some(authority.clone());
        }
        _ => {
            parts.scheme = Some(target.scheme.clone());
            parts.authority = Some(target.authority.clone());
        }
    }
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    Uri::from_parts(parts)
        .map_err(|e| ProxyError::BadRequest(format!("cannot build the upstream URI: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every intercepted request allocates this future, boxed, and moves it there: it stays
    /// small. It was 2,032 bytes with a boxed 9,208-byte upstream send beside it; the paths
    /// only some requests take (a connect, the HTTP/1.1 pool) are boxed on their own.
    #[test]
    fn a_request_s_state_stays_small() {
        fn state_of<A, B, C, D, E, F: std::future::Future>(_: fn(A, B, C, D, E) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let bytes = state_of(request);
        assert!(
            bytes <= 3 * 1024,
            "forward::request's future is {bytes} bytes"
        );
    }

    #[test]
    fn upstream_uri_keeps_path_and_query_and_drops_default_port() {
        // (connection target, the request's URI, whether a token sends it over TLS, what goes
        // upstream); the connection's target decides, never the request's own authority.
        for ((host, port, tls), incoming, upgrade, expected) in [
            (
                ("storage.googleapis.com", 443, true),
                "/b/x/o?alt=media",
                false,
                "https://storage.googleapis.com/b/x/o?alt=media",
            ),
            (
                ("h", 8443, true),
                "http://h:8443/p",
                false,
                "https://h:8443/p",
            ),
            (
                ("h", 80, false),
                "https://elsewhere.example:444",
                false,
                "http://h/",
            ),
            // A token over plain http: TLS on the host's 443, whatever port the client named.
            (("h", 80, false), "http://h/p?q", true, "https://h/p?q"),
            (("h", 8080, false), "http://h:8080/p", true, "https://h/p"),
            // The connection was TLS already: nothing to upgrade.
            (("h", 443, true), "/p", true, "https://h/p"),
        ] {
            let t = Target::new(host.into(), port, tls).unwrap();
            let u = upstream_uri(&t, incoming.parse().unwrap(), upgrade).unwrap();
            assert_eq!(u.to_string(), expected, "{incoming}");
        }
    }
}
