//! `/healthz` (the process serves), `/readyz` (every configured identity has a usable token,
//! so a load balancer only sends traffic to a warm replica), `/metrics` (OpenMetrics text; see
//! [`crate::metrics`]) and `POST /reload` (reload the config file; see [`crate::reload`]).

use std::future::Future;
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

fn answer(req: &Request<Incoming>, state: &Arc<ProxyState>) -> Response<Full<Bytes>> {
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
        "/metrics" => match crate::metrics::encode(state) {
            Ok(text) => (StatusCode::OK, crate::metrics::CONTENT_TYPE, text),
            Err(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                "cannot encode the metrics\n".to_string(),
            ),
        },
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
