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
    /// The request names another authority than the connection it came on (RFC 9110
    /// §15.5.20): its token and route belong to the connection's target.
    #[error("misdirected request: it names {named}, but this connection is for {target}")]
    Misdirected { named: String, target: String },
    #[error("no token for route `{route}` identity `{identity}`: {source}")]
    NoToken {
        route: String,
        identity: String,
        #[source]
        source: Box<TokenError>,
    },
    #[error("upstream {authority} unreachable: {message}")]
    Unreachable { authority: String, message: String },
    /// The target connects to an internal address the config does not allow.
    #[error("refused by policy: {authority}: {message}")]
    Internal { authority: String, message: String },
    /// No upstream connection came free under the caps in time.
    #[error("upstream {authority} busy: {message}")]
    Saturated { authority: String, message: String },
    #[error("upstream {authority} did not answer within {secs}s")]
    Timeout { authority: String, secs: u64 },
    /// More header fields than `limits.max_headers` (HTTP/1.1 gets this from hyper).
    #[error("{count} header fields, more than limits.max_headers ({max})")]
    TooManyHeaders { count: usize, max: usize },
    #[error("invalid configuration: {0}")]
    Config(String),
    /// No or wrong proxy credentials: 407 with `Proxy-Authenticate`.
    #[error("{0}")]
    ProxyAuth(#[from] crate::clients::AuthError),
    /// A known client asked for a route it may not use.
    #[error("refused by policy: client `{client}` may not use route `{route}`")]
    NotForClient { client: String, route: String },
    /// The connection's client is no longer configured as it was admitted (a reload).
    #[error("refused by policy: {0}")]
    ClientGone(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::Refused(_) => StatusCode::FORBIDDEN,
            ProxyError::Misdirected { .. } => StatusCode::MISDIRECTED_REQUEST,
            ProxyError::NoToken { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Unreachable { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Internal { .. } => StatusCode::FORBIDDEN,
            ProxyError::Saturated { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::TooManyHeaders { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::Config(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::ProxyAuth(_) => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            ProxyError::NotForClient { .. } | ProxyError::ClientGone(_) => StatusCode::FORBIDDEN,
        }
    }
}

impl ProxyError {
    /// A failed connect: a refusal by the internal-address policy (or of the proxy's own
    /// address), or unreachable.
    pub(crate) fn from_dial(authority: String, e: super::destination::DialError) -> ProxyError {
        use super::destination::DialError;
        match e {
            DialError::Internal { .. } | DialError::Loop { .. } => ProxyError::Internal {
                authority,
                message: e.to_string(),
            },
            e => ProxyError::Unreachable {
                authority,
                message: e.to_string(),
            },
        }
    }

    /// An upstream client's error: a refusal if a connect was refused by the policy, else
    /// unreachable; the message is the whole chain, for the access log.
    pub(crate) fn from_upstream(
        authority: String,
        e: &(dyn std::error::Error + 'static),
    ) -> ProxyError {
        let message = crate::error_chain(e);
        let mut cur = Some(e);
        while let Some(c) = cur {
            if let Some(
                super::destination::DialError::Internal { .. }
                | super::destination::DialError::Loop { .. },
            ) = c.downcast_ref::<super::destination::DialError>()
            {
                return ProxyError::Internal { authority, message };
            }
            if c.is::<super::caps::Saturated>() {
                return ProxyError::Saturated { authority, message };
            }
            cur = c.source();
        }
        ProxyError::Unreachable { authority, message }
    }

    /// What the client is told. A failed or refused connect says only that, so the proxy
    /// cannot be used to scan which ports answer where; the access log keeps the cause.
    fn client_message(&self) -> String {
        match self {
            ProxyError::Unreachable { authority, .. } => {
                format!("impersonate-proxy: upstream {authority} unreachable")
            }
            ProxyError::Internal { authority, .. } => {
                format!("impersonate-proxy: {authority} refused")
            }
            ProxyError::Saturated { authority, .. } => {
                format!("impersonate-proxy: upstream {authority} busy; try again")
            }
            e => format!("impersonate-proxy: {e}"),
        }
    }
}

/// Why a response body the proxy relays ended early: the origin's connection failed, or the
/// origin went silent (`upstream.body_idle_timeout`). A concrete type, not a boxed error:
/// hyper's bounds on body errors then hold inside spawned tasks.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Origin(#[from] hyper::Error),
    /// An h2 stream's (`multiplex.rs`).
    #[error(transparent)]
    H2(#[from] h2::Error),
    #[error("the origin sent nothing for {0} (upstream.body_idle_timeout)")]
    Idle(String),
}

/// Google's status names for the codes we return.
fn google_status(code: StatusCode) -> &'static str {
    match code {
        StatusCode::BAD_REQUEST
        | StatusCode::MISDIRECTED_REQUEST
        | StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "INVALID_ARGUMENT",
        StatusCode::FORBIDDEN => "PERMISSION_DENIED",
        StatusCode::PROXY_AUTHENTICATION_REQUIRED => "UNAUTHENTICATED",
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::BAD_GATEWAY => "UNAVAILABLE",
        StatusCode::GATEWAY_TIMEOUT => "DEADLINE_EXCEEDED",
        _ => "INTERNAL",
    }
}

/// gRPC's code for each of our statuses (the HTTP-to-gRPC mapping of the gRPC spec).
fn grpc_code(code: StatusCode) -> u8 {
    match code {
        StatusCode::BAD_REQUEST
        | StatusCode::MISDIRECTED_REQUEST
        | StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => 3, // INVALID_ARGUMENT
        StatusCode::FORBIDDEN => 7,       // PERMISSION_DENIED
        StatusCode::GATEWAY_TIMEOUT => 4, // DEADLINE_EXCEEDED
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE => 14, // UNAVAILABLE
        _ => 13,                          // INTERNAL
    }
}

/// The one place an error becomes a response. A gRPC client (`content-type:
/// application/grpc…`) gets a trailers-only answer with `grpc-status` and `grpc-message`, which
/// its library turns into a status; anyone else gets Google's JSON error shape.
pub fn to_response_for(err: &ProxyError, grpc: bool) -> Response<Body> {
    if !grpc {
        return to_response(err);
    }
    let message = err.client_message();
    // grpc-message is percent-encoded; keep printable ASCII other than '%' as is.
    let encoded: String = message
        .bytes()
        .map(|b| {
            if (0x20..0x7f).contains(&b) && b != b'%' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let mut resp = Response::new(
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed(),
    );
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    h.insert(
        "grpc-status",
        http::HeaderValue::from(u16::from(grpc_code(err.status()))),
    );
    if let Ok(v) = http::HeaderValue::from_str(&encoded) {
        h.insert("grpc-message", v);
    }
    resp
}

/// A JSON answer of the proxy's own (errors, the token endpoint's placeholders).
pub(crate) fn json(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(v.to_string()))
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

/// Google's JSON error shape.
pub fn to_response(err: &ProxyError) -> Response<Body> {
    let status = err.status();
    let body = serde_json::json!({
        "error": {
            "code": status.as_u16(),
            "message": err.client_message(),
            "status": google_status(status),
            "details": [],
        }
    });
    let mut resp = json(status, &body);
    if status == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
        resp.headers_mut().insert(
            header::PROXY_AUTHENTICATE,
            http::HeaderValue::from_static("Basic realm=\"impersonate-proxy\""),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_clients_get_a_trailers_only_status() {
        let err = ProxyError::Timeout {
            authority: "pubsub.googleapis.com:443".into(),
            secs: 100,
        };
        let resp = to_response_for(&err, true);
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["grpc-status"], "4");
        let err = ProxyError::BadRequest("a 100% bad request".into());
        let resp = to_response_for(&err, true);
        assert_eq!(resp.headers()["grpc-status"], "3");
        let msg = resp.headers()["grpc-message"].to_str().unwrap();
        assert!(msg.contains("100%25 bad"), "{msg}");
        let err = ProxyError::Unreachable {
            authority: "pubsub.googleapis.com:443".into(),
            message: "Connection refused (os error 111)".into(),
        };
        let resp = to_response_for(&err, true);
        assert_eq!(resp.headers()["grpc-status"], "14");
        let msg = resp.headers()["grpc-message"].to_str().unwrap();
        assert_eq!(
            msg,
            "impersonate-proxy: upstream pubsub.googleapis.com:443 unreachable"
        );
        assert_eq!(
            to_response_for(&err, false).status(),
            StatusCode::BAD_GATEWAY
        );
    }

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
