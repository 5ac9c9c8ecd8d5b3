//! Routing for the emulated endpoints, and the smaller ones. Error bodies follow Google: IAM answers
//! `{"error":{"code","message","status","details"}}`, OAuth2/STS/tokeninfo answer
//! `{"error","error_description"}`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use rand::Rng;
use serde_json::{json, Value};

use super::grant::{self, oauth_error};
use super::policy::ServiceAccount;
use super::{iam, instance, jwt, Emulator, TokenInfo};

pub(super) type Resp = Response<Full<Bytes>>;

const MAX_BODY: usize = 1 << 20;
pub(super) const DEFAULT_LIFETIME: u64 = 3600;
pub(super) const EXTENDED_LIFETIME: u64 = 43_200;
const USER_SCOPES: &str =
    "openid https://www.googleapis.com/auth/userinfo.email https://www.googleapis.com/auth/cloud-platform";

pub(crate) async fn handle(emu: &Emulator, req: Request<Incoming>) -> Resp {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return google_error(
                400,
                "INVALID_ARGUMENT",
                "Request body too large or unreadable.",
            )
        }
    };
    let path = parts.uri.path();
    let query = parts.uri.query().unwrap_or("");
    let bearer = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match (&parts.method, path) {
        // The emulator's own control endpoint (not Google's): faults while it runs.
        (&Method::GET, "/emulator/faults") => ok_json(&emu.faults.snapshot()),
        (&Method::DELETE, "/emulator/faults") => {
            emu.faults.clear();
            ok_json(&emu.faults.snapshot())
        }
        (&Method::POST | &Method::PUT, "/emulator/faults") => {
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            match emu.faults.update(&v) {
                Ok(()) => ok_json(&emu.faults.snapshot()),
                Err(m) => google_error(400, "INVALID_ARGUMENT", &m),
            }
        }
        (&Method::GET, "/oauth2/v3/certs") => match emu.oidc_signer() {
            Ok(s) => ok_json(&s.jwks()),
            Err(e) => google_error(500, "INTERNAL", &e.to_string()),
        },
        (&Method::GET, "/oauth2/v1/certs") => match emu.oidc_signer() {
            Ok(s) => ok_json(&json!({ s.kid.clone(): s.certificate_pem })),
            Err(e) => google_error(500, "INTERNAL", &e.to_string()),
        },
        (&Method::GET, p) if p.starts_with("/service_accounts/v1/") => public_keys(emu, p),
        (_, "/tokeninfo") => {
            count(&emu.stats.tokeninfo);
            let form = if parts.method == Method::POST {
                parse_form(&body)
            } else {
                parse_form(query.as_bytes())
            };
            tokeninfo(emu, &form)
        }
        (_, p) if crate::metadata::is_metadata_path(p) => {
            if emu.policy.metadata.is_none() {
                // No instance: answer as a host that is not a metadata server.
                return text(404, "Not Found\n");
            }
            if let Some(mut r) = fault(emu).await {
                // The metadata server marks its errors too.
                r.headers_mut()
                    .insert("metadata-flavor", HeaderValue::from_static("Google"));
                return r;
            }
            crate::metadata::serve(
                &instance::EmulatedInstance(emu),
                &parts.method,
                &parts.uri,
                &parts.headers,
            )
            .await
        }
        (&Method::POST, "/token") => {
            count(&emu.stats.oauth_token);
            with_faults(emu, || oauth_token(emu, &parse_form(&body))).await
        }
        (&Method::POST, "/v1/token") => {
            count(&emu.stats.sts_token);
            with_faults(emu, || grant::sts(emu, &parse_form_or_json(&body))).await
        }
        (&Method::POST, p) if p.starts_with("/v1/projects/") => {
            let Some((project, account, verb)) = iam::parse_iam_path(p) else {
                return google_error(404, "NOT_FOUND", "Unknown IAM Credentials method.");
            };
            let counter = match verb.as_str() {
                "generateAccessToken" => &emu.stats.generate_access_token,
                "generateIdToken" => &emu.stats.generate_id_token,
                "signJwt" => &emu.stats.sign_jwt,
                "signBlob" => &emu.stats.sign_blob,
                _ => return google_error(404, "NOT_FOUND", "Unknown IAM Credentials method."),
            };
            count(counter);
            with_faults(emu, || {
                iam::iam(emu, &project, &account, &verb, bearer, &body)
            })
            .await
        }
        _ => google_error(404, "NOT_FOUND", "Not found."),
    }
}

/// `/service_accounts/v1/metadata/{x509,jwk,raw}/EMAIL` (and `/service_accounts/v1/jwk/EMAIL`):
/// the account's Google-managed public key in the three formats Google documents for checking
/// signBlob and signJwt output; the OIDC key under its own account name.
fn public_keys(emu: &Emulator, path: &str) -> Resp {
    let rest = path.trim_start_matches("/service_accounts/v1/");
    let rest = rest.strip_prefix("metadata/").unwrap_or(rest);
    let Some((format, email)) = rest.split_once('/') else {
        return google_error(404, "NOT_FOUND", "Not found.");
    };
    let email = percent_decode(email);
    let key = if email.eq_ignore_ascii_case(super::OIDC_SIGNER) {
        None
    } else {
        match emu.account_key(&email) {
            Some(Ok(k)) => Some(k),
            Some(Err(e)) => return google_error(500, "INTERNAL", &e.to_string()),
            None => return google_error(404, "NOT_FOUND", "Not found."),
        }
    };
    let signer: &jwt::Signer = match key.as_deref() {
        Some(k) => k,
        None => match emu.oidc_signer() {
            Ok(s) => s,
            Err(e) => return google_error(500, "INTERNAL", &e.to_string()),
        },
    };
    match format {
        "x509" => ok_json(&json!({ signer.kid.clone(): signer.certificate_pem })),
        "jwk" => ok_json(&signer.jwks()),
        "raw" => ok_json(&json!({"keyvalues": [signer.raw()]})),
        _ => google_error(404, "NOT_FOUND", "Not found."),
    }
}

fn count(c: &AtomicU64) {
    c.fetch_add(1, Ordering::SeqCst);
}

pub(super) fn count_metadata_token(emu: &Emulator) {
    count(&emu.stats.metadata_token);
}

/// Latency, outages, 429 bursts and random errors, applied before the real answer.
async fn with_faults(emu: &Emulator, answer: impl FnOnce() -> Resp) -> Resp {
    match fault(emu).await {
        Some(r) => r,
        None => answer(),
    }
}

/// The injected fault for this call, if any (after the injected latency).
async fn fault(emu: &Emulator) -> Option<Resp> {
    let f = &emu.faults;
    let latency = f.latency_ms.load(Ordering::SeqCst);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    if f.down.load(Ordering::SeqCst) {
        count(&emu.stats.failures_injected);
        return Some(google_error(
            503,
            "UNAVAILABLE",
            "The service is currently unavailable.",
        ));
    }
    let burst = f
        .burst_429
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    if burst.is_ok() {
        count(&emu.stats.failures_injected);
        return Some(google_error(
            429,
            "RESOURCE_EXHAUSTED",
            "Quota exceeded for quota metric 'Token requests'.",
        ));
    }
    let ppm = f.error_ppm.load(Ordering::SeqCst);
    if ppm > 0 {
        let roll: u64 = emu
            .rng
            .lock()
            .map(|mut r| r.random_range(0..1_000_000))
            .unwrap_or(0);
        if roll < ppm {
            count(&emu.stats.failures_injected);
            return Some(google_error(
                503,
                "UNAVAILABLE",
                "The service is currently unavailable.",
            ));
        }
    }
    None
}

/// A JWT signed with a service account's registered key, unexpired, iss = sub = that account.
pub(super) fn verify_key_jwt<'a>(
    emu: &'a Emulator,
    token: &str,
) -> Option<(&'a ServiceAccount, Value)> {
    let jwt = jwt::decode(token)?;
    let kid = jwt.header.get("kid").and_then(Value::as_str)?;
    let iss = jwt.claims.get("iss").and_then(Value::as_str)?;
    let sa = emu.policy.account(iss)?;
    let pem = sa.public_keys.get(kid)?;
    if !jwt.verify_pem(pem) {
        return None;
    }
    if let Some(sub) = jwt.claims.get("sub").and_then(Value::as_str) {
        if !sub.eq_ignore_ascii_case(iss) {
            return None;
        }
    }
    let exp = jwt.claims.get("exp").and_then(Value::as_u64)?;
    if exp <= unix_now() {
        return None;
    }
    Some((sa, jwt.claims))
}

// ---------------------------------------------------------------- OAuth2, STS, metadata

fn oauth_token(emu: &Emulator, form: &HashMap<String, String>) -> Resp {
    let grant = form.get("grant_type").map(String::as_str).unwrap_or("");
    match grant {
        "urn:ietf:params:oauth:grant-type:jwt-bearer" => grant::jwt_bearer(emu, form),
        "refresh_token" => {
            let get = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
            let Some(user) = emu
                .policy
                .users
                .iter()
                .find(|u| u.client_id == get("client_id"))
            else {
                return oauth_error(401, "invalid_client", "The OAuth client was not found.");
            };
            if user.client_secret != get("client_secret") {
                return oauth_error(401, "invalid_client", "Unauthorized");
            }
            if user.refresh_token != get("refresh_token") {
                return oauth_error(400, "invalid_grant", "Bad Request");
            }
            let secs = effective_lifetime(emu, DEFAULT_LIFETIME);
            let scopes: Vec<String> = USER_SCOPES.split(' ').map(String::from).collect();
            let token = issue(emu, &user.email, scopes, secs, &user.client_id);
            ok_json(
                &json!({"access_token": token, "expires_in": secs, "token_type": "Bearer", "scope": USER_SCOPES}),
            )
        }
        "" => oauth_error(
            400,
            "invalid_request",
            "Missing required parameter: grant_type",
        ),
        _ => oauth_error(400, "unsupported_grant_type", "Invalid grant_type"),
    }
}

fn tokeninfo(emu: &Emulator, form: &HashMap<String, String>) -> Resp {
    let invalid = || oauth_error(400, "invalid_token", "Invalid Value");
    if let Some(t) = form.get("access_token") {
        let Some(info) = emu.lookup(t) else {
            return invalid();
        };
        let exp = info
            .expires
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut body = json!({
            "azp": info.azp, "aud": info.azp, "sub": info.azp,
            "scope": info.scopes.join(" "),
            "exp": exp.to_string(), "expires_in": info.seconds_left().to_string(),
            "access_type": "online",
        });
        if !info.principal.starts_with("principal://") {
            body["email"] = json!(info.principal);
            body["email_verified"] = json!("true");
        } else {
            body["sub"] = json!(info.principal);
        }
        return ok_json(&body);
    }
    if let Some(t) = form.get("id_token") {
        let Some(jwt) = jwt::decode(t) else {
            return invalid();
        };
        let exp = jwt.claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
        let signed = emu
            .oidc_signer_if_made()
            .is_some_and(|s| jwt.verify_with(s));
        if !signed || exp <= unix_now() {
            return invalid();
        }
        return ok_json(&jwt.claims);
    }
    invalid()
}

// ---------------------------------------------------------------- helpers

pub(super) fn effective_lifetime(emu: &Emulator, requested: u64) -> u64 {
    match emu.policy.token_lifetime {
        Some(cap) => requested.min(cap.as_secs().max(1)),
        None => requested,
    }
}

pub(super) fn issue(
    emu: &Emulator,
    principal: &str,
    scopes: Vec<String>,
    secs: u64,
    azp: &str,
) -> String {
    let token = format!("ya29.emu.{}", jwt::b64url(&rand::random::<[u8; 32]>()));
    emu.tokens.insert(
        token.clone(),
        TokenInfo {
            principal: principal.to_string(),
            scopes,
            expires: SystemTime::now() + Duration::from_secs(secs),
            azp: azp.to_string(),
        },
    );
    token
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `2020-04-07T15:01:23Z`.
pub(super) fn rfc3339(t: SystemTime) -> String {
    let dt = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second()
    )
}

pub(super) fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| s.to_string())
}

fn parse_form(body: &[u8]) -> HashMap<String, String> {
    url::form_urlencoded::parse(body).into_owned().collect()
}

/// A form body, or a JSON object whose camelCase names (STS's documented JSON body:
/// `grantType`, `subjectToken`, …) become the form's snake_case ones.
fn parse_form_or_json(body: &[u8]) -> HashMap<String, String> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => map
            .into_iter()
            .filter_map(|(k, v)| v.as_str().map(|s| (snake_case(&k), s.to_string())))
            .collect(),
        _ => parse_form(body),
    }
}

fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for c in name.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

pub(super) fn json_response(code: u16, body: &Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=UTF-8"),
    );
    r
}

pub(super) fn ok_json(body: &Value) -> Resp {
    json_response(200, body)
}

pub(super) fn google_error(code: u16, status: &str, message: &str) -> Resp {
    json_response(
        code,
        &json!({"error": {"code": code, "message": message, "status": status, "details": []}}),
    )
}

fn text(code: u16, body: &str) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}
