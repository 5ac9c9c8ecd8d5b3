//! The facade for Google's client libraries: the token endpoint answered with a placeholder
//! (`facade.token_endpoint`), and the metadata-server facade (`facade.metadata`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::Value;

/// A JWT's claims, read without verifying it.
fn jwt_claims(jwt: &str) -> Value {
    use base64::Engine as _;
    let claims = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(claims)
            .unwrap(),
    )
    .unwrap()
}

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
    let claims = jwt_claims(v["id_token"].as_str().unwrap());
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

fn facade_config(tokens: FacadeTokens) -> MetadataFacadeConfig {
    MetadataFacadeConfig {
        listen: any_port(),
        identity: "dev".into(),
        project_id: "demo-project".into(),
        numeric_project_id: "123456789012".into(),
        tokens,
    }
}

use impersonate_proxy::config::{FacadeTokens, MetadataFacadeConfig};

/// The facade answers as the metadata server answers client libraries: the flavor header both
/// ways, the account, the project, placeholder tokens (and an ID token that decodes).
#[tokio::test]
async fn the_metadata_facade_hands_out_placeholders_for_the_configured_identity() {
    let sb =
        sandbox_with(|c| c.facade.metadata = Some(facade_config(FacadeTokens::Placeholder))).await;
    let base = format!("http://{}", sb.server.metadata_addr().unwrap());
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let get = |path: &str| {
        http.get(format!("{base}{path}"))
            .header("Metadata-Flavor", "Google")
            .send()
    };
    // Without the request header: Google's 403, still flavoured.
    let r = http.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["metadata-flavor"], "Google");
    let r = get("/").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["metadata-flavor"], "Google");
    let email = get("/computeMetadata/v1/instance/service-accounts/default/email")
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(email, DEV);
    let project = get("/computeMetadata/v1/project/project-id")
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(project, "demo-project");
    let v: Value = get("/computeMetadata/v1/instance/service-accounts/default/token")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        v["access_token"],
        impersonate_proxy::facade::PLACEHOLDER_ACCESS_TOKEN
    );
    // The account's email works as an alias for `default`.
    let r = get(&format!(
        "/computeMetadata/v1/instance/service-accounts/{DEV}/token?scopes=a,b"
    ))
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let jwt = get("/computeMetadata/v1/instance/service-accounts/default/identity?audience=https://svc.a.run.app&format=full")
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let claims = jwt_claims(&jwt);
    assert_eq!(claims["aud"], "https://svc.a.run.app");
    assert_eq!(claims["email"], DEV);
    sb.shutdown().await;
}

/// `tokens: real`: the identity's real token, for clients that also call hosts no route names.
#[tokio::test]
async fn the_metadata_facade_can_hand_out_the_identitys_real_tokens() {
    let sb = sandbox_with(|c| c.facade.metadata = Some(facade_config(FacadeTokens::Real))).await;
    let base = format!("http://{}", sb.server.metadata_addr().unwrap());
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let v: Value = http
        .get(format!(
            "{base}/computeMetadata/v1/instance/service-accounts/default/token"
        ))
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = v["access_token"].as_str().unwrap();
    assert_eq!(sb.emulator.token_info(token).unwrap().principal, DEV);
    assert!(v["expires_in"].as_u64().unwrap() > 60, "{v}");
    sb.shutdown().await;
}
