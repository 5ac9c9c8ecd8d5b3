//! The IAM Credentials client: `generateAccessToken` and `generateIdToken` for a target,
//! through an optional delegation chain, at a configurable endpoint. Google's error bodies are
//! parsed so their message reaches the user.

use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

use super::{TokenError, TokenKind, TokenSpec};

/// A freshly minted token and how long it lives from now.
pub struct Minted {
    pub token: String,
    pub expires_in: Duration,
}

impl std::fmt::Debug for Minted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        f.debug_struct("Minted")
            .field("token", &super::fingerprint(&self.token))
            .field("expires_in", &self.expires_in)
            .finish()
    }
}

pub struct IamClient {
    http: reqwest::Client,
    endpoint: String,
}

impl IamClient {
    pub fn new(http: reqwest::Client, endpoint: &str) -> IamClient {
        IamClient {
            http,
            endpoint: endpoint.trim_end_matches('/').to_string(),
        }
    }

    pub async fn mint(&self, bearer: &str, spec: &TokenSpec) -> Result<Minted, TokenError> {
        let base = format!(
            "{}/v1/projects/-/serviceAccounts/{}",
            self.endpoint, spec.target
        );
        match &spec.kind {
            TokenKind::Access { scopes, lifetime } => {
                let body = json!({
                    "delegates": spec.delegates,
                    "scope": scopes,
                    "lifetime": format!("{}s", lifetime.as_secs()),
                });
                post_access_token(
                    &self.http,
                    &format!("{base}:generateAccessToken"),
                    bearer,
                    &body,
                    &spec.target,
                )
                .await
            }
            TokenKind::Id {
                audience,
                include_email,
            } => {
                let body = json!({
                    "delegates": spec.delegates,
                    "audience": audience,
                    "includeEmail": include_email,
                });
                let v = post(
                    &self.http,
                    &format!("{base}:generateIdToken"),
                    bearer,
                    &body,
                    &spec.target,
                )
                .await?;
                let token = v
                    .get("token")
                    .and_then(Value::as_str)
                    .ok_or_else(|| malformed(&spec.target, "no `token`"))?;
                let exp = jwt_exp(token)
                    .and_then(|exp| SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(exp)))
                    .ok_or_else(|| malformed(&spec.target, "ID token has no usable `exp`"))?;
                Ok(Minted {
                    token: token.to_string(),
                    expires_in: until(exp),
                })
            }
        }
    }
}

/// `generateAccessToken` at a full URL (also used by impersonated ADC sources).
pub(crate) async fn post_access_token(
    http: &reqwest::Client,
    url: &str,
    bearer: &str,
    body: &Value,
    target: &str,
) -> Result<Minted, TokenError> {
    let v = post(http, url, bearer, body, target).await?;
    let token = v
        .get("accessToken")
        .and_then(Value::as_str)
        .ok_or_else(|| malformed(target, "no `accessToken`"))?;
    let expire = v
        .get("expireTime")
        .and_then(Value::as_str)
        .and_then(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
        })
        .ok_or_else(|| malformed(target, "no valid `expireTime`"))?;
    Ok(Minted {
        token: token.to_string(),
        expires_in: until(SystemTime::from(expire)),
    })
}

async fn post(
    http: &reqwest::Client,
    url: &str,
    bearer: &str,
    body: &Value,
    target: &str,
) -> Result<Value, TokenError> {
    let resp = http
        .post(url)
        .bearer_auth(bearer)
        .json(body)
        .send()
        .await
        .map_err(|e| TokenError::Transport {
            target: target.to_string(),
            message: crate::error_chain(&e),
        })?;
    let status = resp.status();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    if status.is_success() {
        return Ok(v);
    }
    Err(TokenError::Iam {
        target: target.to_string(),
        code: status.as_u16(),
        status: v
            .pointer("/error/status")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        message: v
            .pointer("/error/message")
            .and_then(Value::as_str)
            .unwrap_or("no error message")
            .to_string(),
    })
}

fn malformed(target: &str, what: &str) -> TokenError {
    TokenError::Transport {
        target: target.to_string(),
        message: format!("IAM Credentials answer malformed: {what}"),
    }
}

fn until(t: SystemTime) -> Duration {
    t.duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
}

/// The `exp` claim of a JWT, read without verifying (the IAM API just gave it to us over TLS).
pub(crate) fn jwt_exp(token: &str) -> Option<u64> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice::<Value>(&bytes)
        .ok()?
        .get("exp")?
        .as_u64()
}
