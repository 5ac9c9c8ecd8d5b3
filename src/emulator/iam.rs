//! IAM Credentials v1: `generateAccessToken`, `generateIdToken`, `signJwt`, `signBlob`, with
//! Google's checks in Google's order: the caller's token, then its scopes, then the arguments,
//! then that every account exists, then the permissions hop by hop.
//!
//! Sources: the REST reference for `projects.serviceAccounts.generateAccessToken` and friends
//! ("The `-` wildcard character is required; replacing it with a project ID is invalid",
//! `{ACCOUNT_EMAIL_OR_UNIQUEID}`), `../shared/reference/001_*.txt` (bodies, delegation chain),
//! `004_*.txt` (roles and the A→B→C implicitDelegation rule) and the answers Google gives, as
//! quoted in public issue threads (403 `ACCESS_TOKEN_SCOPE_INSUFFICIENT`, 403
//! `IAM_PERMISSION_DENIED`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::google::{
    effective_lifetime, google_error, issue, json_response, ok_json, percent_decode, rfc3339,
    unix_now, verify_key_jwt, Resp, DEFAULT_LIFETIME, EXTENDED_LIFETIME,
};
use super::policy::{self, ServiceAccount};
use super::{Emulator, Policy, TokenInfo};

/// A caller token must carry one of these to call IAM Credentials (its discovery document
/// lists exactly these two scopes).
const IAM_SCOPES: &[&str] = &[
    "https://www.googleapis.com/auth/cloud-platform",
    "https://www.googleapis.com/auth/iam",
];

/// `exp` of a signJwt payload: at most 12 hours ahead; added as now + 1 hour when absent.
const SIGN_JWT_MAX_EXP: u64 = 12 * 3600;

/// `/v1/projects/PROJECT/serviceAccounts/ACCOUNT:verb` → (PROJECT, ACCOUNT, verb).
pub(super) fn parse_iam_path(p: &str) -> Option<(String, String, String)> {
    let rest = p.strip_prefix("/v1/projects/")?;
    let (project, rest) = rest.split_once("/serviceAccounts/")?;
    let (account, verb) = rest.rsplit_once(':')?;
    Some((
        percent_decode(project),
        percent_decode(account),
        verb.to_string(),
    ))
}

/// The gRPC method name Google puts in `ErrorInfo.metadata.method`.
fn method_name(verb: &str) -> String {
    let mut c = verb.chars();
    let upper = c
        .next()
        .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
        .unwrap_or_default();
    format!("google.iam.credentials.v1.IAMCredentials.{upper}")
}

fn bad_request(message: &str) -> Resp {
    google_error(400, "INVALID_ARGUMENT", message)
}

fn not_found(account: &str) -> Resp {
    google_error(
        404,
        "NOT_FOUND",
        &format!("Not found; Gaia id not found for email {account}"),
    )
}

/// Parse `delegates`: absent and `null` mean none (google-auth-library-python sends
/// `"delegates": null` by default); each entry must be `projects/-/serviceAccounts/ID`.
fn parse_delegates(req: &Value) -> Result<Vec<String>, String> {
    let list = match req.get("delegates") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(_) => return Err(String::from("Invalid value at 'delegates'.")),
    };
    let mut delegates = Vec::with_capacity(list.len());
    for d in list {
        let d = d.as_str().unwrap_or("");
        match d.strip_prefix("projects/-/serviceAccounts/") {
            Some(id) if !id.is_empty() => delegates.push(id.to_string()),
            _ => {
                return Err(format!(
                    "Invalid form of account ID {d}. Should be [Gaia ID |Email |Unique ID |] of the account"
                ))
            }
        }
    }
    Ok(delegates)
}

/// proto3 JSON for a bool: `true`/`false`, and also the strings `"true"`/`"false"` (the
/// generateIdToken example in Google's guide writes `"includeEmail": "true"`).
fn parse_bool(req: &Value, field: &str, proto_field: &str) -> Result<bool, String> {
    match req.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if s == "true" => Ok(true),
        Some(Value::String(s)) if s == "false" => Ok(false),
        Some(v) => Err(format!("Invalid value at '{proto_field}' (TYPE_BOOL), {v}")),
    }
}

pub(super) fn iam(
    emu: &Emulator,
    project: &str,
    account: &str,
    verb: &str,
    bearer: Option<&str>,
    body: &[u8],
) -> Resp {
    let Some((caller, audience_jwt)) = bearer.and_then(|t| authenticate(emu, t)) else {
        return google_error(
            401,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.",
        );
    };
    // A self-signed JWT whose `aud` is this service is authorised for it; an access token
    // must carry one of the service's scopes.
    if !audience_jwt
        && !caller
            .scopes
            .iter()
            .any(|s| IAM_SCOPES.contains(&s.as_str()))
    {
        return insufficient_scopes(verb);
    }
    if project != "-" {
        return bad_request(&format!(
            "Invalid resource name projects/{project}/serviceAccounts/{account}: the - wildcard character is required; replacing it with a project ID is invalid."
        ));
    }
    let req: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        _ => return bad_request("Invalid JSON payload received."),
    };
    // Validate arguments before looking anything up, as Google does.
    let delegates = match parse_delegates(&req) {
        Ok(d) => d,
        Err(m) => return bad_request(&m),
    };
    let permission = match verb {
        "generateAccessToken" => policy::GET_ACCESS_TOKEN,
        "generateIdToken" => policy::GET_OPEN_ID_TOKEN,
        "signJwt" => policy::SIGN_JWT,
        _ => policy::SIGN_BLOB,
    };
    let mut lifetime = DEFAULT_LIFETIME;
    let mut scopes = Vec::new();
    let mut include_email = false;
    let mut jwt_claims = Value::Null;
    match verb {
        "generateAccessToken" => {
            scopes = req
                .get("scope")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default();
            if scopes.is_empty() {
                return bad_request("Scope required.");
            }
            match req.get("lifetime") {
                None | Some(Value::Null) => {}
                Some(l) => match l.as_str().and_then(parse_lifetime) {
                    Some(secs) if secs > 0 => lifetime = secs,
                    _ => return bad_request("Invalid value at 'lifetime' (type.googleapis.com/google.protobuf.Duration)."),
                },
            }
            if lifetime > EXTENDED_LIFETIME {
                return bad_request(&format!("The lifetime requested ({lifetime}s) exceeds the maximum allowed of {EXTENDED_LIFETIME}s."));
            }
        }
        "generateIdToken" => {
            if req
                .get("audience")
                .and_then(Value::as_str)
                .unwrap_or("")
                .is_empty()
            {
                return bad_request("Audience is required.");
            }
            include_email = match parse_bool(&req, "includeEmail", "include_email") {
                Ok(b) => b,
                Err(m) => return bad_request(&m),
            };
        }
        "signJwt" => {
            let Some(payload) = req.get("payload").and_then(Value::as_str) else {
                return bad_request("Payload is required.");
            };
            jwt_claims = match sign_jwt_claims(payload) {
                Ok(c) => c,
                Err(m) => return bad_request(&m),
            };
        }
        _ => {
            if req.get("payload").and_then(Value::as_str).is_none() {
                return bad_request("Payload is required.");
            }
        }
    }

    // Every account in the chain must exist.
    let Some(target) = emu.policy.account(account) else {
        return not_found(account);
    };
    let mut chain: Vec<&ServiceAccount> = Vec::with_capacity(delegates.len() + 1);
    for d in &delegates {
        match emu.policy.account(d) {
            Some(sa) => chain.push(sa),
            None => return not_found(d),
        }
    }
    chain.push(target);

    // Hop by hop (reference 004: "A can get an access token for C if A is granted
    // implicitDelegation on B, and B is granted getAccessToken on C"): every account before
    // the target is reached with implicitDelegation; the target itself with the method's own
    // permission, which implicitDelegation does not give.
    let mut member = member_of(emu, &caller.principal);
    for (i, sa) in chain.iter().enumerate() {
        let needed = if i + 1 == chain.len() {
            permission
        } else {
            policy::IMPLICIT_DELEGATION
        };
        if !emu.policy.holds(sa, &member, needed) {
            return permission_denied(needed, &sa.email);
        }
        member = format!("serviceAccount:{}", sa.email);
    }

    let unique_id = Policy::unique_id(target);
    match verb {
        "generateAccessToken" => {
            if lifetime > DEFAULT_LIFETIME && !target.lifetime_extension {
                return bad_request(&format!(
                    "The lifetime requested ({lifetime}s) exceeds the maximum allowed of {DEFAULT_LIFETIME}s. A longer lifetime requires the constraints/iam.allowServiceAccountCredentialLifetimeExtension organization policy."
                ));
            }
            let secs = effective_lifetime(emu, lifetime);
            let token = issue(emu, &target.email, scopes, secs, &unique_id);
            ok_json(
                &json!({"accessToken": token, "expireTime": rfc3339(SystemTime::now() + Duration::from_secs(secs))}),
            )
        }
        "generateIdToken" => {
            let audience = req.get("audience").and_then(Value::as_str).unwrap_or("");
            let claims = id_token_claims(emu, &target.into(), audience, include_email);
            match emu.oidc_signer().and_then(|s| s.jwt(&claims)) {
                Ok(t) => ok_json(&json!({"token": t})),
                Err(e) => google_error(500, "INTERNAL", &e.to_string()),
            }
        }
        "signJwt" => {
            let key = match signing_key(emu, target) {
                Ok(k) => k,
                Err(r) => return *r,
            };
            match key.jwt(&jwt_claims) {
                Ok(t) => ok_json(&json!({"keyId": key.kid, "signedJwt": t})),
                Err(e) => google_error(500, "INTERNAL", &e.to_string()),
            }
        }
        _ => {
            use base64::Engine as _;
            let payload = req.get("payload").and_then(Value::as_str).unwrap_or("");
            let Ok(blob) = base64::engine::general_purpose::STANDARD.decode(payload) else {
                return bad_request("Payload is not valid base64.");
            };
            let key = match signing_key(emu, target) {
                Ok(k) => k,
                Err(r) => return *r,
            };
            match key.sign_blob(&blob) {
                Ok(s) => ok_json(&json!({"keyId": key.kid, "signedBlob": s})),
                Err(e) => google_error(500, "INTERNAL", &e.to_string()),
            }
        }
    }
}

/// The target's own Google-managed key: signJwt and signBlob output verifies only against
/// the keys published for that account, never against the OIDC key.
fn signing_key(
    emu: &Emulator,
    sa: &ServiceAccount,
) -> Result<std::sync::Arc<super::jwt::Signer>, Box<Resp>> {
    match emu.account_key(&sa.email) {
        Some(Ok(k)) => Ok(k),
        Some(Err(e)) => Err(Box::new(google_error(500, "INTERNAL", &e.to_string()))),
        None => Err(Box::new(not_found(&sa.email))),
    }
}

/// The claims of an ID token for `sa`, as Google's OIDC issuer writes them.
pub(super) fn id_token_claims(
    emu: &Emulator,
    sa: &ServiceAccountRef<'_>,
    audience: &str,
    include_email: bool,
) -> Value {
    let now = unix_now();
    let mut claims = json!({
        "iss": "https://accounts.google.com", "aud": audience, "azp": sa.unique_id,
        "sub": sa.unique_id, "iat": now, "exp": now + effective_lifetime(emu, DEFAULT_LIFETIME),
    });
    if include_email {
        claims["email"] = json!(sa.email);
        claims["email_verified"] = json!(true);
    }
    claims
}

/// Who an ID token is for: an account of the policy, or the metadata instance's account.
pub(super) struct ServiceAccountRef<'a> {
    pub email: &'a str,
    pub unique_id: String,
}

impl<'a> From<&'a ServiceAccount> for ServiceAccountRef<'a> {
    fn from(sa: &'a ServiceAccount) -> Self {
        ServiceAccountRef {
            email: &sa.email,
            unique_id: Policy::unique_id(sa),
        }
    }
}

/// The claims a signJwt payload is signed with: a JSON object whose `exp`, if present, is an
/// integer not in the past and at most 12 hours ahead; without one, `exp` = now + 1 hour
/// (the API's `SignJwtRequest.payload` documentation).
fn sign_jwt_claims(payload: &str) -> Result<Value, String> {
    let Ok(Value::Object(mut claims)) = serde_json::from_str::<Value>(payload) else {
        return Err(String::from(
            "Payload must be a serialized JSON object that contains a JWT Claims Set.",
        ));
    };
    let now = unix_now();
    match claims.get("exp") {
        None => {
            claims.insert("exp".into(), json!(now + DEFAULT_LIFETIME));
        }
        Some(v) => {
            let Some(exp) = v.as_u64() else {
                return Err(String::from("The exp claim must be an integer timestamp."));
            };
            if exp < now {
                return Err(String::from("The exp claim is in the past."));
            }
            if exp > now + SIGN_JWT_MAX_EXP {
                return Err(String::from(
                    "The exp claim must be no more than 12 hours in the future.",
                ));
            }
        }
    }
    Ok(Value::Object(claims))
}

/// 403 as Google answers a token without an IAM Credentials scope.
fn insufficient_scopes(verb: &str) -> Resp {
    let body = json!({"error": {
        "code": 403,
        "message": "Request had insufficient authentication scopes.",
        "status": "PERMISSION_DENIED",
        "details": [{
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "ACCESS_TOKEN_SCOPE_INSUFFICIENT",
            "domain": "googleapis.com",
            "metadata": {"service": "iamcredentials.googleapis.com", "method": method_name(verb)}
        }]
    }});
    json_response(403, &body)
}

fn permission_denied(permission: &str, resource: &str) -> Resp {
    let body = json!({"error": {
        "code": 403,
        "message": format!("Permission '{permission}' denied on resource (or it may not exist)."),
        "status": "PERMISSION_DENIED",
        "details": [{
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "IAM_PERMISSION_DENIED",
            "domain": "iam.googleapis.com",
            "metadata": {"permission": permission, "resource": format!("projects/-/serviceAccounts/{resource}")}
        }]
    }});
    json_response(403, &body)
}

/// The IAM member a token's principal is: `serviceAccount:EMAIL` for service accounts (those
/// of the policy, the metadata instance's, and any `*.gserviceaccount.com` address),
/// `user:EMAIL` for others, and a federated `principal://…` as is.
pub(super) fn member_of(emu: &Emulator, principal: &str) -> String {
    let is_metadata_account = emu
        .policy
        .metadata
        .as_ref()
        .is_some_and(|m| m.service_account.eq_ignore_ascii_case(principal));
    if principal.starts_with("principal://") {
        principal.to_string()
    } else if emu.policy.account(principal).is_some()
        || is_metadata_account
        || principal
            .to_ascii_lowercase()
            .ends_with(".gserviceaccount.com")
    {
        format!("serviceAccount:{principal}")
    } else {
        format!("user:{principal}")
    }
}

/// Who is calling: an access token we issued, or a self-signed JWT of a policy key. The flag
/// says the JWT was authorised by its `aud` (this service) rather than by scopes.
fn authenticate(emu: &Emulator, token: &str) -> Option<(TokenInfo, bool)> {
    if let Some(info) = emu.lookup(token) {
        return Some((info, false));
    }
    let (sa, claims) = verify_key_jwt(emu, token)?;
    let aud_ok = claims.get("aud").and_then(Value::as_str).is_some_and(|a| {
        a.starts_with("https://iamcredentials.googleapis.com") || a.starts_with(&emu.url)
    });
    let scope = claims.get("scope").and_then(Value::as_str).unwrap_or("");
    if !aud_ok && scope.is_empty() {
        return None;
    }
    let info = TokenInfo {
        principal: sa.email.clone(),
        scopes: scope.split_whitespace().map(String::from).collect(),
        expires: UNIX_EPOCH
            + Duration::from_secs(claims.get("exp").and_then(Value::as_u64).unwrap_or(0)),
        azp: Policy::unique_id(sa),
    };
    Some((info, aud_ok && scope.is_empty()))
}

/// `"3600s"` or `"3600.5s"` → whole seconds.
fn parse_lifetime(s: &str) -> Option<u64> {
    let n = s.strip_suffix('s')?;
    let whole = n.split('.').next()?;
    whole.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_bools_and_sign_jwt_claims() {
        assert_eq!(
            parse_iam_path("/v1/projects/-/serviceAccounts/a%40p.iam.gserviceaccount.com:signJwt"),
            Some((
                "-".into(),
                "a@p.iam.gserviceaccount.com".into(),
                "signJwt".into()
            ))
        );
        assert_eq!(
            method_name("generateIdToken"),
            "google.iam.credentials.v1.IAMCredentials.GenerateIdToken"
        );
        let v = json!({"a": "true", "b": true, "c": "yes", "d": null});
        assert!(parse_bool(&v, "a", "a").unwrap());
        assert!(parse_bool(&v, "b", "b").unwrap());
        assert!(parse_bool(&v, "c", "c").is_err());
        assert!(!parse_bool(&v, "d", "d").unwrap());
        assert!(!parse_bool(&v, "e", "e").unwrap());
        let now = unix_now();
        let c = sign_jwt_claims("{\"sub\":\"x\"}").unwrap();
        let exp = c["exp"].as_u64().unwrap();
        assert!((now + 3599..=now + 3601).contains(&exp));
        assert!(sign_jwt_claims(&format!("{{\"exp\":{}}}", now - 10)).is_err());
        assert!(sign_jwt_claims(&format!("{{\"exp\":{}}}", now + 13 * 3600)).is_err());
        assert!(sign_jwt_claims(&format!("{{\"exp\":{}}}", now + 11 * 3600)).is_ok());
        assert!(sign_jwt_claims("[1]").is_err());
        assert_eq!(parse_lifetime("3600s"), Some(3600));
        assert_eq!(parse_lifetime("3600"), None);
    }
}
