//! `facade.token_endpoint`: the proxy answers a client's call to Google's OAuth2 token
//! endpoint itself, with a placeholder, and never forwards it. A client holding a placeholder
//! service-account key or an `authorized_user` file then gets a "token" without its
//! credential (whatever it is) reaching Google, and the routes put the real token on the wire.
//!
//! The endpoints are the ones Google's libraries call: `https://oauth2.googleapis.com/token`
//! (google-auth-library-python's `_DEFAULT_TOKEN_URI`, Node's and gcloud's) and the older
//! `https://www.googleapis.com/oauth2/v4/token`. A JWT-bearer grant whose assertion asks for
//! a `target_audience` (an ID token from a key) gets `{"id_token": ...}`; every other grant
//! `{"access_token", "expires_in", "token_type"}`, as Google answers them.

use std::convert::Infallible;
use std::net::SocketAddr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use super::error::json;
use super::Body;
use crate::facade::{placeholder_id_token, PLACEHOLDER_ACCESS_TOKEN, PLACEHOLDER_LIFETIME};

/// The largest token request read; real ones are a few kilobytes (a signed JWT).
const MAX_BODY: usize = 64 * 1024;

/// Hosts whose token endpoint is answered: intercepted even if no route names them.
pub(crate) fn is_host(host: &str) -> bool {
    matches!(host, "oauth2.googleapis.com" | "www.googleapis.com")
}

/// A call to the token endpoint on `host`.
pub(crate) fn is_token_request(host: &str, req: &Request<Incoming>) -> bool {
    req.method() == Method::POST
        && match host {
            "oauth2.googleapis.com" => req.uri().path() == "/token",
            "www.googleapis.com" => req.uri().path() == "/oauth2/v4/token",
            _ => false,
        }
}

/// Answer the call with a placeholder; one access line, without the grant's secrets.
pub(crate) async fn answer(
    req: Request<Incoming>,
    host: &str,
    peer: SocketAddr,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let form = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Ok(json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": "invalid_request", "error_description": "unreadable or oversized token request"}),
            ))
        }
    };
    let mut grant = String::new();
    let mut audience = None;
    for (k, v) in url::form_urlencoded::parse(&form) {
        match &*k {
            "grant_type" => grant = v.into_owned(),
            "assertion" => audience = target_audience(&v),
            _ => {}
        }
    }
    let (kind, body) = match audience {
        Some(aud) => (
            "id_token",
            serde_json::json!({ "id_token": placeholder_id_token(&aud, None) }),
        ),
        None => (
            "access_token",
            serde_json::json!({
                "access_token": PLACEHOLDER_ACCESS_TOKEN,
                "expires_in": PLACEHOLDER_LIFETIME.as_secs(),
                "token_type": "Bearer",
            }),
        ),
    };
    tracing::info!(
        target: "impersonate_proxy::access",
        client = %peer, method = "POST", host, port = 443, path, grant = %grant, kind,
        status = 200, "token endpoint answered with a placeholder"
    );
    Ok(json(StatusCode::OK, &body))
}

/// The `target_audience` claim of a JWT-bearer assertion, read without verifying it: the
/// placeholder answer only needs to know which kind of token was asked for.
fn target_audience(assertion: &str) -> Option<String> {
    let claims = assertion.split('.').nth(1)?;
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims.trim_end_matches('=')).ok()?).ok()?;
    claims["target_audience"].as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_assertion_asking_for_an_audience_wants_an_id_token() {
        let claims = URL_SAFE_NO_PAD.encode(
            r#"{"iss":"sa@p.iam.gserviceaccount.com","target_audience":"https://svc.a.run.app"}"#,
        );
        let jwt = format!("e30.{claims}.c2ln");
        assert_eq!(
            target_audience(&jwt).as_deref(),
            Some("https://svc.a.run.app")
        );
        let plain = URL_SAFE_NO_PAD.encode(r#"{"scope":"x"}"#);
        assert_eq!(target_audience(&format!("e30.{plain}.c2ln")), None);
        assert_eq!(target_audience("not a jwt"), None);
    }
}
