//! What Google's client libraries need from the proxy to run unchanged: a credential to find
//! before their first request. They look for a key file, gcloud's file, then the metadata
//! server, and stop if there is none (google-auth's `DefaultCredentialsError`). The proxy
//! offers them placeholders (from its metadata-server facade, or as the answer to their
//! token-endpoint call) and puts the route's real token on the wire itself.
//!
//! A placeholder is recognisably not a token: `ya29.impersonate-proxy-placeholder`, and ID
//! tokens that are JWTs with a real `exp` (Python's google-auth decodes the payload for the
//! expiry) and a signature nobody can verify. Sent to a host no route names, a placeholder
//! fails there with Google's 401; `facade.metadata.tokens: real` is for those clients.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

/// The access token the facade hands out; routes replace it on the wire.
pub const PLACEHOLDER_ACCESS_TOKEN: &str = "ya29.impersonate-proxy-placeholder";

/// How long a placeholder says it lives: clients ask again when it runs out, which costs
/// nothing.
pub const PLACEHOLDER_LIFETIME: Duration = Duration::from_secs(3599);

/// An ID token placeholder for `audience`: a JWT whose claims are what a client reads (`aud`,
/// `exp`, `iat`, `iss`, and `email` when given), with a signature that verifies nowhere.
pub fn placeholder_id_token(audience: &str, email: Option<&str>) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let header = serde_json::json!({
        "alg": "RS256",
        "typ": "JWT",
        "kid": "impersonate-proxy-placeholder",
    });
    let mut claims = serde_json::json!({
        "iss": "https://accounts.google.com",
        "aud": audience,
        "azp": "impersonate-proxy-placeholder",
        "sub": "impersonate-proxy-placeholder",
        "iat": now,
        "exp": now + PLACEHOLDER_LIFETIME.as_secs(),
    });
    if let Some(email) = email {
        claims["email"] = email.into();
        claims["email_verified"] = true.into();
    }
    let part = |v: &serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.{}",
        part(&header),
        part(&claims),
        URL_SAFE_NO_PAD.encode("impersonate-proxy-placeholder")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_placeholder_id_token_decodes_with_a_future_exp() {
        let t = placeholder_id_token(
            "https://svc.a.run.app",
            Some("dev@p.iam.gserviceaccount.com"),
        );
        let parts: Vec<&str> = t.split('.').collect();
        assert_eq!(parts.len(), 3);
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["aud"], "https://svc.a.run.app");
        assert_eq!(claims["email"], "dev@p.iam.gserviceaccount.com");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let exp = claims["exp"].as_u64().unwrap();
        assert!(exp > now + 3000 && exp <= now + 3600, "{exp} vs {now}");
    }
}
