//! The proxy's error type and the one flat function that turns an error into the response a
//! client sees: a status and a JSON body in Google's error shape, which client libraries print
//! as-is. Messages name the route and identity, never a token.

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::Body;
use crate::tokens::TokenError;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("malformed request: {0}")]
    BadRequest(String),
    #[error("refused by policy: {0}")]
    Refused(String),
    #[error("no token for route `{route}` identity `{identity}`: {source}")]
    NoToken {
        route: String,
        identity: String,
        #[source]
        source: Box<TokenError>,
    },
    #[error("upstream {authority} unreachable: {message}")]
    Unreachable { authority: String, message: String },
    #[error("upstream {authority} did not answer within {secs}s")]
    Timeout { authority: String, secs: u64 },
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::Refused(_) => StatusCode::FORBIDDEN,
            ProxyError::NoToken { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Unreachable { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Config(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// Google's status names for the codes we return.
fn google_status(code: StatusCode) -> &'static str {
    match code {
        StatusCode::BAD_REQUEST => "INVALID_ARGUMENT",
        StatusCode::FORBIDDEN => "PERMISSION_DENIED",
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::BAD_GATEWAY => "UNAVAILABLE",
        StatusCode::GATEWAY_TIMEOUT => "DEADLINE_EXCEEDED",
        _ => "INTERNAL",
    }
}

/// The one place an error becomes a response.
pub fn to_response(err: &ProxyError) -> Response<Body> {
    let status = err.status();
    let body = serde_json::json!({
        "error": {
            "code": status.as_u16(),
            "message": format!("impersonate-proxy: {err}"),
            "status": google_status(status),
            "details": [],
        }
    });
    let mut resp = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json; charset=UTF-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn body_is_google_shaped_and_names_route_and_identity() {
        let err = ProxyError::NoToken {
            route: "bq".into(),
            identity: "jobs".into(),
            source: Box::new(TokenError::Unavailable {
                target: "jobs@p.iam.gserviceaccount.com".into(),
                message: "Permission 'iam.serviceAccounts.getAccessToken' denied".into(),
            }),
        };
        let resp = to_response(&err);
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["error"]["code"], 503);
        assert_eq!(v["error"]["status"], "UNAVAILABLE");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("route `bq`") && msg.contains("identity `jobs`"),
            "{msg}"
        );
        assert!(msg.contains("getAccessToken"), "{msg}");
    }
}
