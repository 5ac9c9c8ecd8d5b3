//! The facade for Google's client libraries: the token endpoint answered with a placeholder
//! (`facade.token_endpoint`), and the metadata-server facade (`facade.metadata`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::Value;

/// A client holding a placeholder `authorized_user` file refreshes it at Google's token
/// endpoint: the proxy answers, and the refresh token never leaves the machine. A JWT-bearer
/// assertion asking for a `target_audience` gets an ID token.
#[tokio::test]
async fn the_token_endpoint_is_answered_with_a_placeholder() {
    let sb = sandbox_with(|c| c.facade.token_endpoint = true).await;
    let client = sb.client().unwrap();
    let resp = client
        .post("https://oauth2.googleapis.com/token")
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", "placeholder-refresh-token"),
            ("client_id", "x"),
            ("client_secret", "y"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        v["access_token"],
        impersonate_proxy::facade::PLACEHOLDER_ACCESS_TOKEN
    );
    assert_eq!(v["token_type"], "Bearer");
    assert!(v["expires_in"].as_u64().unwrap() > 3000);

    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let assertion = format!(
        "{}.{}.c2ln",
        b64(r#"{"alg":"RS256"}"#),
        b64(r#"{"iss":"sa@p.iam.gserviceaccount.com","target_audience":"https://svc.a.run.app"}"#)
    );
    let v: Value = client
        .post("https://www.googleapis.com/oauth2/v4/token")
        .form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("assertion", assertion.as_str()),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = v["id_token"].as_str().unwrap();
    let claims = id.split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(claims)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["aud"], "https://svc.a.run.app");
    // The placeholder then reaches a routed origin as the route's real token.
    let v: Value = client
        .get("https://bigquery.googleapis.com/x")
        .bearer_auth(impersonate_proxy::facade::PLACEHOLDER_ACCESS_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["identity"], JOBS);
    assert!(
        sb.origin.seen().iter().all(|s| s.path != "/token"),
        "nothing was forwarded"
    );
    sb.shutdown().await;
}
