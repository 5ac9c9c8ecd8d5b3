//! The token grants: STS token exchange (`/v1/token`) and the OAuth2 JWT-bearer grant (`/token`, RFC 7523) as Google's token endpoint runs it for a
//! service-account key: the assertion's issuer must be a known account, its signature a key of
//! that account, its `aud` the token endpoint, its `iat`/`exp` at most an hour apart around
//! now; it carries either `scope` (an access token) or `target_audience` (an ID token, what
//! google-auth's `service_account.IDTokenCredentials` asks for). The error texts are Google's,
//! as client libraries print them ("Invalid grant: account not found", "Invalid JWT
//! Signature.", "Invalid JWT: Token must be a short-lived token (60 minutes) …").

use std::collections::HashMap;

use serde_json::{json, Value};

use super::google::{
    effective_lifetime, issue, json_response, ok_json, unix_now, Resp, DEFAULT_LIFETIME,
};
use super::iam::{id_token_claims, ServiceAccountRef};
use super::{jwt, Emulator, Policy};

/// The audiences Google's token endpoint answers to (its current and older URLs).
const GOOGLE_TOKEN_URIS: &[&str] = &[
    "https://oauth2.googleapis.com/token",
    "https://www.googleapis.com/oauth2/v4/token",
    "https://accounts.google.com/o/oauth2/token",
];

/// Clock skew tolerated on `iat` (seconds into the future).
const SKEW: u64 = 300;

const SHORT_LIVED: &str = "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.";

pub(super) fn oauth_error(code: u16, error: &str, description: &str) -> Resp {
    json_response(
        code,
        &json!({"error": error, "error_description": description}),
    )
}

pub(super) fn jwt_bearer(emu: &Emulator, form: &HashMap<String, String>) -> Resp {
    let invalid_grant = |m: &str| oauth_error(400, "invalid_grant", m);
    let assertion = form.get("assertion").map(String::as_str).unwrap_or("");
    let Some(jwt) = jwt::decode(assertion) else {
        return invalid_grant("Invalid JWT Signature.");
    };
    let iss = jwt.claims.get("iss").and_then(Value::as_str).unwrap_or("");
    let Some(sa) = emu.policy.account(iss) else {
        return invalid_grant("Invalid grant: account not found");
    };
    let verified = jwt
        .kid()
        .and_then(|kid| sa.public_keys.get(kid))
        .is_some_and(|pem| jwt.verify_pem(pem));
    if !verified {
        return invalid_grant("Invalid JWT Signature.");
    }
    let aud = jwt.claims.get("aud").and_then(Value::as_str).unwrap_or("");
    let own = format!("{}/token", emu.url);
    if !(GOOGLE_TOKEN_URIS.contains(&aud) || aud == own) {
        return invalid_grant("Invalid JWT: Failed audience check.");
    }
    let now = unix_now();
    let iat = jwt.claims.get("iat").and_then(Value::as_u64);
    let exp = jwt.claims.get("exp").and_then(Value::as_u64);
    let timely = match (iat, exp) {
        (Some(iat), Some(exp)) => {
            iat <= now + SKEW && exp > now && exp > iat && exp - iat <= DEFAULT_LIFETIME
        }
        _ => false,
    };
    if !timely {
        return invalid_grant(SHORT_LIVED);
    }
    if let Some(sub) = jwt.claims.get("sub").and_then(Value::as_str) {
        if !sub.eq_ignore_ascii_case(&sa.email) {
            // Domain-wide delegation is not emulated.
            return oauth_error(
                401,
                "unauthorized_client",
                "Client is unauthorized to retrieve access tokens using this method, or client not authorized for any of the scopes requested.",
            );
        }
    }
    let unique_id = Policy::unique_id(sa);
    if let Some(audience) = jwt.claims.get("target_audience").and_then(Value::as_str) {
        let mut claims = id_token_claims(emu, &ServiceAccountRef::from(sa), audience, true);
        // Key-file ID tokens name the account as the authorised party.
        claims["azp"] = json!(sa.email);
        return match emu.oidc_signer().and_then(|s| s.jwt(&claims)) {
            Ok(t) => ok_json(&json!({"id_token": t})),
            Err(e) => oauth_error(500, "internal_failure", &e.to_string()),
        };
    }
    let scopes: Vec<String> = jwt
        .claims
        .get("scope")
        .and_then(Value::as_str)
        .unwrap_or("")
        .split_whitespace()
        .map(String::from)
        .collect();
    if scopes.is_empty() {
        return oauth_error(400, "invalid_scope", "Empty or missing scope not allowed.");
    }
    let secs = effective_lifetime(emu, DEFAULT_LIFETIME);
    let scope = scopes.join(" ");
    let token = issue(emu, &sa.email, scopes, secs, &unique_id);
    ok_json(
        &json!({"access_token": token, "expires_in": secs, "token_type": "Bearer", "scope": scope}),
    )
}

const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// The subject token types the STS reference lists.
const SUBJECT_TOKEN_TYPES: &[&str] = &[
    "urn:ietf:params:oauth:token-type:jwt",
    "urn:ietf:params:oauth:token-type:id_token",
    "urn:ietf:params:oauth:token-type:saml2",
    "urn:ietf:params:aws:token-type:aws4_request",
    "urn:ietf:params:oauth:token-type:access_token",
];

/// The pool an STS audience names: `//iam.googleapis.com/projects/N/locations/global/
/// workloadIdentityPools/P/providers/R` → `projects/N/locations/global/workloadIdentityPools/P`
/// (workforce pools: `locations/global/workforcePools/P`).
fn audience_pool(audience: &str) -> Option<&str> {
    let rest = audience.strip_prefix("//iam.googleapis.com/")?;
    let (pool, provider) = rest.rsplit_once("/providers/")?;
    let workload = pool.starts_with("projects/")
        && pool.contains("/locations/")
        && pool.contains("/workloadIdentityPools/");
    let workforce = pool.starts_with("locations/") && pool.contains("/workforcePools/");
    ((workload || workforce) && !provider.is_empty() && !provider.contains('/')).then_some(pool)
}

/// STS `token` (RFC 8693), form or JSON body: every field the reference marks required is
/// checked, the audience must name a provider, and the subject token must be one the policy
/// accepts for a principal of that audience's pool.
pub(super) fn sts(emu: &Emulator, form: &HashMap<String, String>) -> Resp {
    let get = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    let invalid_request = |m: &str| oauth_error(400, "invalid_request", m);
    if get("grant_type") != TOKEN_EXCHANGE {
        return oauth_error(
            400,
            "unsupported_grant_type",
            "The grant type is not supported.",
        );
    }
    let Some(pool) = audience_pool(get("audience")) else {
        return invalid_request("Invalid value for \"audience\". This value should be the full resource name of the Identity Provider. See https://cloud.google.com/iam/docs/reference/sts/rest/v1/TopLevel/token for the list of possible formats.");
    };
    if get("requested_token_type") != ACCESS_TOKEN_TYPE {
        return invalid_request(&format!(
            "Invalid value for \"requested_token_type\": expected {ACCESS_TOKEN_TYPE}."
        ));
    }
    if !SUBJECT_TOKEN_TYPES.contains(&get("subject_token_type")) {
        return invalid_request("Invalid value for \"subject_token_type\".");
    }
    let scopes: Vec<String> = get("scope").split_whitespace().map(String::from).collect();
    if scopes.is_empty() {
        return oauth_error(400, "invalid_scope", "Empty or missing scope not allowed.");
    }
    let subject = get("subject_token");
    let accepted = emu.policy.external_subjects.iter().find(|s| {
        s.subject_token == subject
            && s.principal
                .strip_prefix("principal://iam.googleapis.com/")
                .and_then(|p| p.strip_prefix(pool))
                .is_some_and(|rest| rest.starts_with("/subject/"))
    });
    let Some(ext) = accepted else {
        return oauth_error(
            400,
            "invalid_grant",
            "The subject token is invalid or not accepted by the workload identity pool.",
        );
    };
    let secs = effective_lifetime(emu, DEFAULT_LIFETIME);
    let token = issue(emu, &ext.principal, scopes, secs, "sts");
    ok_json(&json!({
        "access_token": token,
        "issued_token_type": ACCESS_TOKEN_TYPE,
        "token_type": "Bearer",
        "expires_in": secs,
    }))
}
