//! `/healthz` (the process serves), `/readyz` (every configured identity has a usable token,
//! so a load balancer only sends traffic to a warm replica), `/metrics` (Prometheus text) and
//! `POST /reload` (reload the config file; see [`crate::reload`]).

use std::fmt::Write as _;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::proxy::ProxyState;

pub async fn serve(
    listener: TcpListener,
    state: Arc<ProxyState>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move {
                    if req.uri().path() == "/reload" {
                        let post = req.method() == http::Method::POST;
                        return Ok::<_, std::convert::Infallible>(reload(post, &state).await);
                    }
                    Ok(answer(&req, &state))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// `POST /reload`: 200 with what changed, or 409 with why the running config stays.
async fn reload(post: bool, state: &ProxyState) -> Response<Full<Bytes>> {
    let (status, body) = if !post {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({ "error": "POST /reload" }),
        )
    } else {
        match crate::reload::reload(state, "POST /reload").await {
            Ok(r) => (
                StatusCode::OK,
                serde_json::json!({
                    "reloaded": true,
                    "generation": r.generation,
                    "routes": r.routes,
                    "clients": r.clients,
                    "warmed": r.warmed,
                    "retired": r.retired,
                }),
            ),
            Err(e) => (
                StatusCode::CONFLICT,
                serde_json::json!({ "reloaded": false, "error": e.to_string() }),
            ),
        }
    };
    let mut resp = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn answer(req: &Request<Incoming>, state: &ProxyState) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match req.uri().path() {
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" => {
            if state.engine.is_ready() {
                (StatusCode::OK, "text/plain", "ready\n".to_string())
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready: tokens are still being minted or cannot be minted\n".to_string(),
                )
            }
        }
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics_text(state),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(ctype) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp
}

fn metrics_text(state: &ProxyState) -> String {
    let m = &state.metrics;
    let mut s = String::new();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let series: [(&str, &str, &str, u64); 10] = [
        (
            "auth_failures_total",
            "counter",
            "Requests answered 407: no or wrong proxy credentials.",
            load(&m.auth_failures_total),
        ),
        (
            "config_generation",
            "gauge",
            "The config generation in force (1 at start, one more per reload).",
            state.live.load().generation,
        ),
        (
            "connections_total",
            "counter",
            "Client connections accepted.",
            load(&m.connections_total),
        ),
        (
            "connections_active",
            "gauge",
            "Client connections open now.",
            load(&m.connections_active),
        ),
        (
            "tunnels_total",
            "counter",
            "CONNECTs tunnelled blind.",
            load(&m.tunnels_total),
        ),
        (
            "intercepts_total",
            "counter",
            "CONNECTs intercepted with the local CA.",
            load(&m.intercepts_total),
        ),
        (
            "refused_total",
            "counter",
            "Requests refused by policy or as malformed.",
            load(&m.refused_total),
        ),
        (
            "token_errors_total",
            "counter",
            "Requests answered 503 because no token could be had.",
            load(&m.token_errors_total),
        ),
        (
            "upstream_errors_total",
            "counter",
            "Requests answered 502/504 because the origin failed.",
            load(&m.upstream_errors_total),
        ),
        (
            "leaf_certificates_cached",
            "gauge",
            "Minted leaf certificates in the cache.",
            state.ca.cached_leaves() as u64,
        ),
    ];
    for (name, kind, help, v) in series {
        let _ = writeln!(
            s,
            "# HELP impersonate_proxy_{name} {help}\n# TYPE impersonate_proxy_{name} {kind}\nimpersonate_proxy_{name} {v}"
        );
    }
    let _ = writeln!(
        s,
        "# HELP impersonate_proxy_responses_total Responses by status class.\n# TYPE impersonate_proxy_responses_total counter"
    );
    for (class, n) in m.responses.iter().enumerate().skip(1) {
        let _ = writeln!(
            s,
            "impersonate_proxy_responses_total{{class=\"{class}xx\"}} {}",
            n.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        s,
        "# HELP impersonate_proxy_reloads_total Config reloads, by result.\n# TYPE impersonate_proxy_reloads_total counter\nimpersonate_proxy_reloads_total{{result=\"ok\"}} {}\nimpersonate_proxy_reloads_total{{result=\"failed\"}} {}",
        load(&state.reload.ok_total),
        load(&state.reload.failed_total),
    );
    s.push_str(&state.engine.metrics_text());
    s
}
