//! The emulator's Google semantics, over real HTTP with reqwest.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{json, Value};

use impersonate_proxy::emulator::{self, EmulatorHandle, Policy};

const POLICY: &str = r#"
users:
  - { email: alice@example.com, client_id: cid, client_secret: csecret, refresh_token: rt-alice }
service_accounts:
  - email: hop@p.iam.gserviceaccount.com
    token_creators: ["user:alice@example.com"]
  - email: middle@p.iam.gserviceaccount.com
    unique_id: "100000000000000000042"
    implicit_delegators: ["serviceAccount:hop@p.iam.gserviceaccount.com"]
  - email: target@p.iam.gserviceaccount.com
    token_creators: ["serviceAccount:middle@p.iam.gserviceaccount.com", "user:alice@example.com"]
  - email: long@p.iam.gserviceaccount.com
    token_creators: ["user:alice@example.com"]
    lifetime_extension: true
  - email: island@p.iam.gserviceaccount.com
    token_creators: []
external_subjects:
  - { subject_token: oidc-from-ci, principal: "principal://iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/ci/subject/job" }
metadata:
  service_account: hop@p.iam.gserviceaccount.com
"#;

async fn start(policy: &str) -> EmulatorHandle {
    impersonate_proxy::install_crypto_provider();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    emulator::start(l, Policy::from_yaml(policy).unwrap())
        .await
        .unwrap()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn alice_token(emu: &EmulatorHandle) -> String {
    let v: Value = http()
        .post(format!("{}/token", emu.url()))
        .form(&[
            ("grant_type", "refresh_token"),
            ("client_id", "cid"),
            ("client_secret", "csecret"),
            ("refresh_token", "rt-alice"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["access_token"].as_str().unwrap().to_string()
}

async fn generate(emu: &EmulatorHandle, bearer: &str, sa: &str, body: Value) -> (u16, Value) {
    let r = http()
        .post(format!(
            "{}/v1/projects/-/serviceAccounts/{sa}:generateAccessToken",
            emu.url()
        ))
        .bearer_auth(bearer)
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn assert_google_error(v: &Value, code: u64, status: &str) {
    assert_eq!(v["error"]["code"], code, "{v}");
    assert_eq!(v["error"]["status"], status, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    assert!(v["error"]["details"].is_array(), "{v}");
}

const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

#[tokio::test]
async fn direct_and_delegated_impersonation_and_their_failures() {
    let emu = start(POLICY).await;
    let alice = alice_token(&emu).await;

    let (code, v) = generate(
        &emu,
        &alice,
        "target@p.iam.gserviceaccount.com",
        json!({"scope": [SCOPE]}),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    let token = v["accessToken"].as_str().unwrap();
    let expire = v["expireTime"].as_str().unwrap();
    assert!(
        expire.len() == 20 && expire.ends_with('Z'),
        "2020-04-07T15:01:23Z form: {expire}"
    );
    let info = emu.token_info(token).unwrap();
    assert_eq!(info.principal, "target@p.iam.gserviceaccount.com");

    // alice -> hop -> middle (implicitDelegation only) -> target.
    let chain = json!({"scope": [SCOPE], "delegates": [
        "projects/-/serviceAccounts/hop@p.iam.gserviceaccount.com",
        "projects/-/serviceAccounts/middle@p.iam.gserviceaccount.com"]});
    let (code, v) = generate(&emu, &alice, "target@p.iam.gserviceaccount.com", chain).await;
    assert_eq!(code, 200, "{v}");

    // Broken chain: hop holds nothing on target directly.
    let broken = json!({"scope": [SCOPE], "delegates": ["projects/-/serviceAccounts/hop@p.iam.gserviceaccount.com"]});
    let (code, v) = generate(&emu, &alice, "target@p.iam.gserviceaccount.com", broken).await;
    assert_eq!(code, 403);
    assert_google_error(&v, 403, "PERMISSION_DENIED");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("iam.serviceAccounts"),
        "{v}"
    );

    // Missing role.
    let (code, v) = generate(
        &emu,
        &alice,
        "island@p.iam.gserviceaccount.com",
        json!({"scope": [SCOPE]}),
    )
    .await;
    assert_eq!(code, 403);
    assert_google_error(&v, 403, "PERMISSION_DENIED");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("getAccessToken"));

    // Unknown account, unknown delegate.
    let (code, v) = generate(
        &emu,
        &alice,
        "ghost@p.iam.gserviceaccount.com",
        json!({"scope": [SCOPE]}),
    )
    .await;
    assert_eq!(code, 404);
    assert_google_error(&v, 404, "NOT_FOUND");
    // Bare-email delegates are not Google's format.
    let (code, v) = generate(
        &emu,
        &alice,
        "target@p.iam.gserviceaccount.com",
        json!({"scope": [SCOPE], "delegates": ["hop@p.iam.gserviceaccount.com"]}),
    )
    .await;
    assert_eq!(code, 400);
    assert_google_error(&v, 400, "INVALID_ARGUMENT");

    // No scope.
    let (code, v) = generate(&emu, &alice, "target@p.iam.gserviceaccount.com", json!({})).await;
    assert_eq!(code, 400);
    assert_google_error(&v, 400, "INVALID_ARGUMENT");

    // Lifetimes: over an hour needs the extension; over 12 h never.
    let body = |l: &str| json!({"scope": [SCOPE], "lifetime": l});
    assert_eq!(
        generate(
            &emu,
            &alice,
            "target@p.iam.gserviceaccount.com",
            body("7200s")
        )
        .await
        .0,
        400
    );
    assert_eq!(
        generate(
            &emu,
            &alice,
            "long@p.iam.gserviceaccount.com",
            body("7200s")
        )
        .await
        .0,
        200
    );
    assert_eq!(
        generate(
            &emu,
            &alice,
            "long@p.iam.gserviceaccount.com",
            body("50000s")
        )
        .await
        .0,
        400
    );
    assert_eq!(
        generate(
            &emu,
            &alice,
            "long@p.iam.gserviceaccount.com",
            body("ten minutes")
        )
        .await
        .0,
        400
    );

    // No or a bogus caller token.
    let (code, v) = generate(
        &emu,
        "ya29.forged",
        "target@p.iam.gserviceaccount.com",
        json!({"scope": [SCOPE]}),
    )
    .await;
    assert_eq!(code, 401);
    assert_google_error(&v, 401, "UNAUTHENTICATED");
    assert_eq!(emulator::Stats::get(&emu.stats().generate_access_token), 12);
    emu.shutdown().await;
}

/// The body of an answer, as JSON.
async fn json_of(request: reqwest::RequestBuilder) -> Value {
    request.send().await.unwrap().json().await.unwrap()
}

/// The OIDC key is made on first use, not at start-up: an ID token asked for first, or the
/// certificates, make the one key that both then show.
#[tokio::test]
async fn the_oidc_key_made_on_first_use_is_the_one_kept() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let emu = start(POLICY).await;
    let alice = alice_token(&emu).await;
    let target = "target@p.iam.gserviceaccount.com";
    let mut kids = Vec::new();
    for _ in 0..2 {
        let token = json_of(
            http()
                .post(format!(
                    "{}/v1/projects/-/serviceAccounts/{target}:generateIdToken",
                    emu.url()
                ))
                .bearer_auth(&alice)
                .json(&json!({"audience": "https://svc.a.run.app"})),
        )
        .await;
        let header = token["token"].as_str().unwrap().split('.').next().unwrap();
        let header: Value = serde_json::from_slice(&b64.decode(header).unwrap()).unwrap();
        kids.push(header["kid"].as_str().unwrap().to_string());
        let v3 = json_of(http().get(format!("{}/oauth2/v3/certs", emu.url()))).await;
        kids.push(v3["keys"][0]["kid"].as_str().unwrap().to_string());
        let v1 = json_of(http().get(format!("{}/oauth2/v1/certs", emu.url()))).await;
        let names: Vec<&String> = v1.as_object().unwrap().keys().collect();
        assert_eq!(names.len(), 1);
        kids.push(names[0].clone());
    }
    assert!(!kids[0].is_empty());
    assert!(kids.iter().all(|k| *k == kids[0]), "{kids:?}");
    emu.shutdown().await;
}

#[tokio::test]
async fn id_tokens_verify_against_the_jwks() {
    use base64::Engine as _;
    let emu = start(POLICY).await;
    let alice = alice_token(&emu).await;
    let v: Value = http()
        .post(format!(
            "{}/v1/projects/-/serviceAccounts/target@p.iam.gserviceaccount.com:generateIdToken",
            emu.url()
        ))
        .bearer_auth(&alice)
        .json(&json!({"audience": "https://svc.a.run.app", "includeEmail": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = v["token"].as_str().unwrap();
    let jwks: Value = http()
        .get(format!("{}/oauth2/v3/certs", emu.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = &jwks["keys"][0];
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let n = b64.decode(key["n"].as_str().unwrap()).unwrap();
    let e = b64.decode(key["e"].as_str().unwrap()).unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    let header: Value = serde_json::from_slice(&b64.decode(parts[0]).unwrap()).unwrap();
    assert_eq!(header["alg"], "RS256");
    assert_eq!(header["kid"], key["kid"]);
    let sig = b64.decode(parts[2]).unwrap();
    let components = aws_lc_rs::signature::RsaPublicKeyComponents { n: &n, e: &e };
    components
        .verify(
            &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
            format!("{}.{}", parts[0], parts[1]).as_bytes(),
            &sig,
        )
        .expect("signature verifies with the published key");
    let claims: Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    assert_eq!(claims["aud"], "https://svc.a.run.app");
    assert_eq!(claims["email"], "target@p.iam.gserviceaccount.com");
    assert_eq!(claims["iss"], "https://accounts.google.com");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(claims["exp"].as_u64().unwrap() > now);
    emu.shutdown().await;
}

#[tokio::test]
async fn metadata_sts_and_tokeninfo() {
    let emu = start(POLICY).await;
    let http = http();

    // Metadata: Metadata-Flavor is required.
    let url = format!(
        "{}/computeMetadata/v1/instance/service-accounts/default/token",
        emu.url()
    );
    assert_eq!(http.get(&url).send().await.unwrap().status(), 403);
    let v: Value = http
        .get(&url)
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let t = v["access_token"].as_str().unwrap();
    assert_eq!(
        emu.token_info(t).unwrap().principal,
        "hop@p.iam.gserviceaccount.com"
    );

    // STS exchange of an accepted subject token; a wrong one is refused.
    let form = |subject: &'static str| {
        [
        ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
        ("subject_token", subject),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ("audience", "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/ci/providers/gh"),
        ("requested_token_type", "urn:ietf:params:oauth:token-type:access_token"),
        ("scope", "https://www.googleapis.com/auth/cloud-platform"),
    ]
    };
    let r = http
        .post(format!("{}/v1/token", emu.url()))
        .form(&form("oidc-from-ci"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .post(format!("{}/v1/token", emu.url()))
        .form(&form("forged"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "invalid_grant");

    // tokeninfo: valid, unknown.
    let r = http
        .get(format!("{}/tokeninfo?access_token={t}", emu.url()))
        .send()
        .await
        .unwrap();
    let info: Value = r.json().await.unwrap();
    assert_eq!(info["email"], "hop@p.iam.gserviceaccount.com");
    assert!(info["expires_in"].as_str().unwrap().parse::<u64>().unwrap() > 3000);
    let r = http
        .get(format!("{}/tokeninfo?access_token=ya29.nope", emu.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "invalid_token");
    emu.shutdown().await;
}

#[tokio::test]
async fn expired_tokens_are_refused_everywhere() {
    let emu = start(&format!("{POLICY}token_lifetime: 1s\n")).await;
    let alice = alice_token(&emu).await;
    let (code, v) = generate(
        &emu,
        &alice,
        "target@p.iam.gserviceaccount.com",
        json!({"scope": [SCOPE]}),
    )
    .await;
    assert_eq!(code, 200);
    let t = v["accessToken"].as_str().unwrap().to_string();
    assert!(emu.token_info(&t).is_some());
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert!(emu.token_info(&t).is_none());
    let r = http()
        .get(format!("{}/tokeninfo?access_token={t}", emu.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let (code, _) = generate(
        &emu,
        &alice,
        "target@p.iam.gserviceaccount.com",
        json!({"scope": [SCOPE]}),
    )
    .await;
    assert_eq!(code, 401, "an expired caller token no longer authenticates");
    emu.shutdown().await;
}

#[tokio::test]
async fn faults_on_demand() {
    let emu = start(POLICY).await;
    let alice = alice_token(&emu).await;
    let call = || {
        generate(
            &emu,
            &alice,
            "target@p.iam.gserviceaccount.com",
            json!({"scope": [SCOPE]}),
        )
    };
    emu.faults().set_burst_429(3);
    for _ in 0..3 {
        let (code, v) = call().await;
        assert_eq!(code, 429);
        assert_google_error(&v, 429, "RESOURCE_EXHAUSTED");
    }
    assert_eq!(call().await.0, 200);
    emu.faults().set_error_rate(1.0);
    for _ in 0..5 {
        assert_eq!(call().await.0, 503);
    }
    emu.faults().clear();
    emu.faults().set_down(true);
    assert_eq!(call().await.0, 503);
    emu.faults().set_down(false);
    assert_eq!(call().await.0, 200);
    assert_eq!(emulator::Stats::get(&emu.stats().failures_injected), 9);
    emu.shutdown().await;
}

#[tokio::test]
async fn sign_jwt_and_sign_blob_need_token_creator() {
    use base64::Engine as _;
    let emu = start(POLICY).await;
    let alice = alice_token(&emu).await;
    let url =
        |sa: &str, verb: &str| format!("{}/v1/projects/-/serviceAccounts/{sa}:{verb}", emu.url());
    let r = http()
        .post(url("target@p.iam.gserviceaccount.com", "signJwt"))
        .bearer_auth(&alice)
        .json(&json!({"payload": "{\"sub\":\"x\",\"aud\":\"y\"}"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["signedJwt"].as_str().unwrap().split('.').count(), 3);
    assert!(v["keyId"].as_str().is_some());
    let blob = base64::engine::general_purpose::STANDARD.encode(b"bytes to sign");
    let r = http()
        .post(url("target@p.iam.gserviceaccount.com", "signBlob"))
        .bearer_auth(&alice)
        .json(&json!({"payload": blob}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(v["signedBlob"].as_str().unwrap())
            .unwrap()
            .len(),
        256
    );
    let r = http()
        .post(url("island@p.iam.gserviceaccount.com", "signBlob"))
        .bearer_auth(&alice)
        .json(&json!({"payload": blob}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("iam.serviceAccounts.signBlob"),
        "{v}"
    );
    emu.shutdown().await;
}

/// Roles as Google names them, each with its own permissions; the metadata instance runs as
/// `vm`, which is deliberately not listed under `service_accounts`.
const ROLES_POLICY: &str = r#"
users:
  - { email: alice@example.com, client_id: cid, client_secret: csecret, refresh_token: rt-alice }
custom_roles:
  projects/p/roles/delegateOnly: [iam.serviceAccounts.implicitDelegation]
service_accounts:
  - email: hop@p.iam.gserviceaccount.com
    bindings:
      - { role: roles/iam.serviceAccountTokenCreator, members: ["user:alice@example.com"] }
  - email: target@p.iam.gserviceaccount.com
    unique_id: "109876543210987654321"
    bindings:
      - { role: projects/p/roles/delegateOnly, members: ["serviceAccount:hop@p.iam.gserviceaccount.com"] }
      - { role: roles/iam.serviceAccountTokenCreator, members: ["serviceAccount:vm@p.iam.gserviceaccount.com"] }
  - email: wi@p.iam.gserviceaccount.com
    bindings:
      - { role: roles/iam.workloadIdentityUser, members: ["user:alice@example.com"] }
  - email: oidc@p.iam.gserviceaccount.com
    bindings:
      - { role: roles/iam.serviceAccountOpenIdTokenCreator, members: ["user:alice@example.com"] }
  - email: user@p.iam.gserviceaccount.com
    bindings:
      - { role: roles/iam.serviceAccountUser, members: ["user:alice@example.com"] }
  - email: wif@p.iam.gserviceaccount.com
    bindings:
      - role: roles/iam.workloadIdentityUser
        members: ["principalSet://iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/ci/*"]
external_subjects:
  - { subject_token: oidc-from-ci, principal: "principal://iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/ci/subject/job" }
metadata:
  service_account: vm@p.iam.gserviceaccount.com
"#;

async fn call(
    emu: &EmulatorHandle,
    bearer: &str,
    resource: &str,
    verb: &str,
    body: Value,
) -> (u16, Value) {
    let r = http()
        .post(format!("{}/v1/{resource}:{verb}", emu.url()))
        .bearer_auth(bearer)
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn denied_permission(v: &Value) -> String {
    assert_eq!(v["error"]["status"], "PERMISSION_DENIED", "{v}");
    assert_eq!(
        v["error"]["details"][0]["reason"], "IAM_PERMISSION_DENIED",
        "{v}"
    );
    v["error"]["details"][0]["metadata"]["permission"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Looser item 1: a delegate that holds only implicitDelegation on the target gets nothing
/// from it; the last hop needs the method's own permission (reference 004, the A→B→C rule).
#[tokio::test]
async fn the_last_hop_needs_the_methods_permission_not_implicit_delegation() {
    let emu = start(ROLES_POLICY).await;
    let alice = alice_token(&emu).await;
    let target = "projects/-/serviceAccounts/target@p.iam.gserviceaccount.com";
    let via_hop = ["projects/-/serviceAccounts/hop@p.iam.gserviceaccount.com"];
    for (verb, body, permission) in [
        (
            "generateAccessToken",
            json!({"scope": [SCOPE], "delegates": via_hop}),
            "iam.serviceAccounts.getAccessToken",
        ),
        (
            "generateIdToken",
            json!({"audience": "https://x", "delegates": via_hop}),
            "iam.serviceAccounts.getOpenIdToken",
        ),
        (
            "signBlob",
            json!({"payload": "aGk=", "delegates": via_hop}),
            "iam.serviceAccounts.signBlob",
        ),
        (
            "signJwt",
            json!({"payload": "{}", "delegates": via_hop}),
            "iam.serviceAccounts.signJwt",
        ),
    ] {
        let (code, v) = call(&emu, &alice, target, verb, body).await;
        assert_eq!(code, 403, "{verb}: {v}");
        assert_eq!(denied_permission(&v), permission, "{verb}");
        assert_eq!(
            v["error"]["details"][0]["metadata"]["resource"], target,
            "{verb}"
        );
    }
    emu.shutdown().await;
}

/// Stricter item 10: each predefined role carries the reference's permissions and no more.
#[tokio::test]
async fn each_role_grants_its_own_permissions() {
    let emu = start(ROLES_POLICY).await;
    let alice = alice_token(&emu).await;
    let res = |sa: &str| format!("projects/-/serviceAccounts/{sa}@p.iam.gserviceaccount.com");
    let access = || json!({"scope": [SCOPE]});
    let id = || json!({"audience": "https://svc"});
    let blob = || json!({"payload": "aGk="});
    // Workload Identity User mints both kinds of token but signs nothing.
    assert_eq!(
        call(&emu, &alice, &res("wi"), "generateAccessToken", access())
            .await
            .0,
        200
    );
    assert_eq!(
        call(&emu, &alice, &res("wi"), "generateIdToken", id())
            .await
            .0,
        200
    );
    let (code, v) = call(&emu, &alice, &res("wi"), "signBlob", blob()).await;
    assert_eq!(code, 403);
    assert_eq!(denied_permission(&v), "iam.serviceAccounts.signBlob");
    // OpenID Token Creator: ID tokens only.
    assert_eq!(
        call(&emu, &alice, &res("oidc"), "generateIdToken", id())
            .await
            .0,
        200
    );
    let (code, v) = call(&emu, &alice, &res("oidc"), "generateAccessToken", access()).await;
    assert_eq!(code, 403);
    assert_eq!(denied_permission(&v), "iam.serviceAccounts.getAccessToken");
    // Service Account User (actAs) mints nothing.
    for (verb, body) in [
        ("generateAccessToken", access()),
        ("generateIdToken", id()),
        ("signBlob", blob()),
    ] {
        assert_eq!(
            call(&emu, &alice, &res("user"), verb, body).await.0,
            403,
            "{verb}"
        );
    }
    emu.shutdown().await;
}

/// Looser item 2: a caller token needs cloud-platform or iam; Google's 403 otherwise.
#[tokio::test]
async fn the_callers_scopes_are_checked() {
    let emu = start(ROLES_POLICY).await;
    let vm_token = |scopes: &'static str| {
        let url = format!(
            "{}/computeMetadata/v1/instance/service-accounts/default/token?scopes={scopes}",
            emu.url()
        );
        async move {
            let v: Value = http()
                .get(url)
                .header("Metadata-Flavor", "Google")
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["access_token"].as_str().unwrap().to_string()
        }
    };
    let target = "projects/-/serviceAccounts/target@p.iam.gserviceaccount.com";
    let read_only = vm_token("https://www.googleapis.com/auth/devstorage.read_only").await;
    let (code, v) = call(
        &emu,
        &read_only,
        target,
        "generateAccessToken",
        json!({"scope": [SCOPE]}),
    )
    .await;
    assert_eq!(code, 403, "{v}");
    assert_eq!(
        v["error"]["message"],
        "Request had insufficient authentication scopes."
    );
    assert_eq!(v["error"]["status"], "PERMISSION_DENIED");
    let d = &v["error"]["details"][0];
    assert_eq!(d["reason"], "ACCESS_TOKEN_SCOPE_INSUFFICIENT");
    assert_eq!(d["domain"], "googleapis.com");
    assert_eq!(d["metadata"]["service"], "iamcredentials.googleapis.com");
    assert_eq!(
        d["metadata"]["method"],
        "google.iam.credentials.v1.IAMCredentials.GenerateAccessToken"
    );
    // The iam scope (what google-auth gives key-file sources) is enough, as is cloud-platform.
    let iam = vm_token("https://www.googleapis.com/auth/iam").await;
    assert_eq!(
        call(
            &emu,
            &iam,
            target,
            "generateAccessToken",
            json!({"scope": [SCOPE]})
        )
        .await
        .0,
        200
    );
    emu.shutdown().await;
}

/// Stricter item 9: the metadata instance's account (not listed under service_accounts) is
/// `serviceAccount:vm@…` in bindings, so its Token Creator binding on `target` works.
#[tokio::test]
async fn the_metadata_account_need_not_be_listed() {
    let emu = start(ROLES_POLICY).await;
    let v: Value = http()
        .get(format!(
            "{}/computeMetadata/v1/instance/service-accounts/default/token",
            emu.url()
        ))
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let vm = v["access_token"].as_str().unwrap();
    let (code, v) = call(
        &emu,
        vm,
        "projects/-/serviceAccounts/target@p.iam.gserviceaccount.com",
        "generateAccessToken",
        json!({"scope": [SCOPE]}),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    emu.shutdown().await;
}

/// Stricter items 1, 4, 8 and looser item 7: the request shapes Google accepts and refuses.
#[tokio::test]
async fn request_shapes_google_accepts_and_refuses() {
    use base64::Engine as _;
    let emu = start(POLICY).await;
    let alice = alice_token(&emu).await;
    let target = "projects/-/serviceAccounts/target@p.iam.gserviceaccount.com";
    // `"delegates": null`, as google-auth-library-python sends by default.
    let (code, v) = call(
        &emu,
        &alice,
        target,
        "generateAccessToken",
        json!({"delegates": null, "scope": [SCOPE], "lifetime": "3600s"}),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    let (code, v) = call(
        &emu,
        &alice,
        target,
        "generateIdToken",
        json!({"audience": "https://svc", "delegates": null, "includeEmail": false}),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    // `"includeEmail": "true"` as a string, as Google's own guide writes it.
    let (code, v) = call(
        &emu,
        &alice,
        target,
        "generateIdToken",
        json!({"audience": "https://svc", "includeEmail": "true"}),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    let claims = v["token"]
        .as_str()
        .unwrap()
        .split('.')
        .nth(1)
        .unwrap()
        .to_string();
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(claims)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["email"], "target@p.iam.gserviceaccount.com");
    let (code, v) = call(
        &emu,
        &alice,
        target,
        "generateIdToken",
        json!({"audience": "https://svc", "includeEmail": "yes"}),
    )
    .await;
    assert_eq!(code, 400, "{v}");
    // Numeric unique ids, in the URL and in delegates, name the same accounts.
    let unique = |v: &Value| v["token"].as_str().map(String::from);
    let (_, v) = call(
        &emu,
        &alice,
        target,
        "generateIdToken",
        json!({"audience": "a"}),
    )
    .await;
    let sub: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(unique(&v).unwrap().split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    let target_id = sub["sub"].as_str().unwrap().to_string();
    assert!(target_id.bytes().all(|b| b.is_ascii_digit()), "{target_id}");
    let (code, v) = call(
        &emu,
        &alice,
        &format!("projects/-/serviceAccounts/{target_id}"),
        "generateAccessToken",
        json!({"scope": [SCOPE]}),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        emu.token_info(v["accessToken"].as_str().unwrap())
            .unwrap()
            .principal,
        "target@p.iam.gserviceaccount.com"
    );
    // …and in delegates: alice -> hop -> middle (by its unique id) -> target.
    let (code, v) = call(
        &emu,
        &alice,
        target,
        "generateAccessToken",
        json!({"scope": [SCOPE],
        "delegates": ["projects/-/serviceAccounts/hop@p.iam.gserviceaccount.com",
                      "projects/-/serviceAccounts/100000000000000000042"]}),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    // `projects/-` is required: "replacing it with a project ID is invalid".
    let (code, v) = call(
        &emu,
        &alice,
        "projects/p/serviceAccounts/target@p.iam.gserviceaccount.com",
        "generateAccessToken",
        json!({"scope": [SCOPE]}),
    )
    .await;
    assert_eq!(code, 400, "{v}");
    assert_google_error(&v, 400, "INVALID_ARGUMENT");
    emu.shutdown().await;
}

/// Looser item 4: signJwt refuses an `exp` in the past or over 12 h ahead, and adds one
/// (now + 1 h) when the payload has none (`SignJwtRequest.payload` in Google's API docs).
#[tokio::test]
async fn sign_jwt_applies_the_exp_rules() {
    use base64::Engine as _;
    let emu = start(POLICY).await;
    let alice = alice_token(&emu).await;
    let target = "projects/-/serviceAccounts/target@p.iam.gserviceaccount.com";
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let sign = |payload: String| call(&emu, &alice, target, "signJwt", json!({"payload": payload}));
    let (code, v) = sign("{\"sub\":\"x\"}".into()).await;
    assert_eq!(code, 200, "{v}");
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(v["signedJwt"].as_str().unwrap().split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    let exp = claims["exp"].as_u64().unwrap();
    assert!((now + 3590..=now + 3610).contains(&exp), "{claims}");
    let (code, v) = sign(format!("{{\"exp\":{}}}", now - 60)).await;
    assert_eq!(code, 400, "{v}");
    let (code, v) = sign(format!("{{\"exp\":{}}}", now + 13 * 3600)).await;
    assert_eq!(code, 400, "{v}");
    let (code, v) = sign(format!("{{\"exp\":{}}}", now + 11 * 3600)).await;
    assert_eq!(code, 200, "{v}");
    emu.shutdown().await;
}

/// Stricter items 2 and 3: the metadata server as client libraries probe and read it, over
/// HTTP: the flavor header on every answer, `instance` without a slash (Node's gcp-metadata
/// probes it), the account directory, and `identity?audience=&format=full`.
#[tokio::test]
async fn metadata_answers_as_google_libraries_expect() {
    use base64::Engine as _;
    let emu = start(ROLES_POLICY).await;
    let get = |path: &str, flavor: bool| {
        let mut r = http().get(format!("{}{path}", emu.url()));
        if flavor {
            r = r.header("Metadata-Flavor", "Google");
        }
        async move {
            let r = r.send().await.unwrap();
            let flavor = r
                .headers()
                .get("metadata-flavor")
                .map(|v| v.to_str().unwrap().to_string());
            (r.status().as_u16(), flavor, r.text().await.unwrap())
        }
    };
    let sa = "/computeMetadata/v1/instance/service-accounts";
    for (path, flavor, code) in [
        ("/", true, 200),
        ("/computeMetadata/v1/", true, 200),
        ("/computeMetadata/v1/instance", true, 200),
        ("/computeMetadata/v1/instance/", true, 200),
        ("/computeMetadata/v1/instance/", false, 403),
        ("/computeMetadata/v1/project/project-id", true, 200),
        ("/computeMetadata/v1/project/numeric-project-id", true, 200),
        ("/computeMetadata/v1/instance/missing", true, 404),
    ] {
        let (c, f, _) = get(path, flavor).await;
        assert_eq!(c, code, "{path}");
        assert_eq!(f.as_deref(), Some("Google"), "{path}");
    }
    let (_, _, email) = get(&format!("{sa}/default/email"), true).await;
    assert_eq!(email, "vm@p.iam.gserviceaccount.com");
    let (_, _, same) = get(&format!("{sa}/vm@p.iam.gserviceaccount.com/email"), true).await;
    assert_eq!(same, email);
    let (c, _, info) = get(&format!("{sa}/default/?recursive=true"), true).await;
    assert_eq!(c, 200);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["email"], "vm@p.iam.gserviceaccount.com");
    assert_eq!(info["scopes"], json!([SCOPE]));
    let (c, _, _) = get(&format!("{sa}/default/identity"), true).await;
    assert_eq!(c, 400, "identity needs an audience");
    let (c, f, jwt) = get(
        &format!("{sa}/default/identity?audience=https://svc&format=full"),
        true,
    )
    .await;
    assert_eq!((c, f.as_deref()), (200, Some("Google")));
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(jwt.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["aud"], "https://svc");
    assert_eq!(claims["email"], "vm@p.iam.gserviceaccount.com");
    assert_eq!(claims["iss"], "https://accounts.google.com");
    assert!(claims["google"]["compute_engine"]["project_id"].is_string());
    // The ID token verifies against the published OIDC keys (tokeninfo checks that).
    let r = http()
        .get(format!("{}/tokeninfo?id_token={jwt}", emu.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    emu.shutdown().await;
}

fn rsa_verify(jwk: &Value, message: &[u8], signature: &[u8]) -> bool {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let n = b64.decode(jwk["n"].as_str().unwrap()).unwrap();
    let e = b64.decode(jwk["e"].as_str().unwrap()).unwrap();
    aws_lc_rs::signature::RsaPublicKeyComponents { n: &n, e: &e }
        .verify(
            &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
            message,
            signature,
        )
        .is_ok()
}

/// Looser item 3: each account signs with its own key, published at Google's three paths;
/// a signJwt token claiming Google as issuer no longer passes tokeninfo, and ID tokens are
/// signed with the OIDC key only.
#[tokio::test]
async fn each_account_signs_with_its_own_published_key() {
    use base64::Engine as _;
    let emu = start(POLICY).await;
    let alice = alice_token(&emu).await;
    let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let base = emu.url();
    let get = |path: String| {
        let url = format!("{base}{path}");
        async move {
            let r = http().get(url).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let target = "target@p.iam.gserviceaccount.com";
    let res = format!("projects/-/serviceAccounts/{target}");
    let (code, v) = call(
        &emu,
        &alice,
        &res,
        "signJwt",
        json!({"payload": "{\"iss\":\"https://accounts.google.com\",\"aud\":\"x\",\"sub\":\"1\"}"}),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    let key_id = v["keyId"].as_str().unwrap().to_string();
    let jwt = v["signedJwt"].as_str().unwrap().to_string();
    let parts: Vec<&str> = jwt.split('.').collect();
    let header: Value = serde_json::from_slice(&b64url.decode(parts[0]).unwrap()).unwrap();
    assert_eq!(header["kid"], key_id.as_str());
    // The account's JWK verifies it; the OIDC keys do not list it, and tokeninfo refuses it.
    let (code, jwks) = get(format!("/service_accounts/v1/metadata/jwk/{target}")).await;
    assert_eq!(code, 200);
    assert_eq!(jwks["keys"][0]["kid"], key_id.as_str());
    let signed = format!("{}.{}", parts[0], parts[1]);
    assert!(rsa_verify(
        &jwks["keys"][0],
        signed.as_bytes(),
        &b64url.decode(parts[2]).unwrap()
    ));
    let (_, oidc) = get("/oauth2/v3/certs".into()).await;
    assert_ne!(oidc["keys"][0]["kid"], key_id.as_str());
    assert!(!rsa_verify(
        &oidc["keys"][0],
        signed.as_bytes(),
        &b64url.decode(parts[2]).unwrap()
    ));
    let r = http()
        .get(format!("{}/tokeninfo?id_token={jwt}", emu.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "a signJwt token is not a Google ID token");
    // signBlob: same key, verifiable with the account's key.
    let (code, v) = call(
        &emu,
        &alice,
        &res,
        "signBlob",
        json!({"payload": "aGVsbG8="}),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["keyId"], key_id.as_str());
    let sig = base64::engine::general_purpose::STANDARD
        .decode(v["signedBlob"].as_str().unwrap())
        .unwrap();
    assert!(rsa_verify(&jwks["keys"][0], b"hello", &sig));
    // x509 and raw carry the same key id; another account has another key; unknown is 404.
    let (_, x509) = get(format!("/service_accounts/v1/metadata/x509/{target}")).await;
    assert!(x509[&key_id]
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN CERTIFICATE-----"));
    let (_, raw) = get(format!("/service_accounts/v1/metadata/raw/{target}")).await;
    assert_eq!(raw["keyvalues"][0]["keyid"], key_id.as_str());
    assert_eq!(raw["keyvalues"][0]["exponent"], "AQAB");
    let (_, other) =
        get("/service_accounts/v1/metadata/jwk/hop@p.iam.gserviceaccount.com".into()).await;
    assert_ne!(other["keys"][0]["kid"], key_id.as_str());
    assert_eq!(
        get("/service_accounts/v1/metadata/jwk/ghost@p.iam.gserviceaccount.com".into())
            .await
            .0,
        404
    );
    let (_, v1) = get("/oauth2/v1/certs".into()).await;
    assert!(v1[oidc["keys"][0]["kid"].as_str().unwrap()].is_string());
    emu.shutdown().await;
}

/// Sign `claims` as a key file's holder would (RS256 with the file's private key and kid).
fn assertion(key: &emulator::ServiceAccountKey, claims: &Value) -> String {
    use base64::Engine as _;
    use rustls::pki_types::pem::PemObject;
    let file: Value = serde_json::from_str(&key.key_file_json).unwrap();
    let der = rustls::pki_types::PrivatePkcs8KeyDer::from_pem_slice(
        file["private_key"].as_str().unwrap().as_bytes(),
    )
    .unwrap();
    let kp = aws_lc_rs::rsa::KeyPair::from_pkcs8(der.secret_pkcs8_der()).unwrap();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": key.key_id});
    let input = format!(
        "{}.{}",
        b64.encode(header.to_string()),
        b64.encode(claims.to_string())
    );
    let mut sig = vec![0; kp.public_modulus_len()];
    kp.sign(
        &aws_lc_rs::signature::RSA_PKCS1_SHA256,
        &aws_lc_rs::rand::SystemRandom::new(),
        input.as_bytes(),
        &mut sig,
    )
    .unwrap();
    format!("{input}.{}", b64.encode(sig))
}

/// Looser item 5 and stricter item 7: the JWT-bearer grant checks the audience exactly, the
/// `iat`/`exp` window (an hour at most), and answers Google's messages; `target_audience`
/// gets an ID token.
#[tokio::test]
async fn jwt_bearer_grant_is_as_strict_as_google() {
    impersonate_proxy::install_crypto_provider();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let sa = "keyed@p.iam.gserviceaccount.com";
    let key = emulator::new_service_account_key(sa, &format!("{url}/token")).unwrap();
    let policy = format!(
        "service_accounts:\n  - email: {sa}\n    public_keys: {{ {}: {:?} }}\n",
        key.key_id, key.public_key_pem
    );
    let emu = emulator::start(l, Policy::from_yaml(&policy).unwrap())
        .await
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let grant = |claims: Value| {
        let a = assertion(&key, &claims);
        let url = format!("{}/token", emu.url());
        async move {
            let r = http()
                .post(url)
                .form(&[
                    ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                    ("assertion", a.as_str()),
                ])
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let token_uri = format!("{}/token", emu.url());
    let good = json!({"iss": sa, "aud": token_uri, "iat": now, "exp": now + 3600, "scope": SCOPE});
    let (code, v) = grant(good.clone()).await;
    assert_eq!(code, 200, "{v}");
    assert!(v["access_token"].as_str().unwrap().starts_with("ya29."));
    // Google's own token URI is an accepted audience too; anything else ending in /token not.
    let mut c = good.clone();
    c["aud"] = json!("https://oauth2.googleapis.com/token");
    assert_eq!(grant(c).await.0, 200);
    let mut c = good.clone();
    c["aud"] = json!("https://evil.example.com/token");
    let (code, v) = grant(c).await;
    assert_eq!((code, v["error"].as_str()), (400, Some("invalid_grant")));
    assert_eq!(
        v["error_description"],
        "Invalid JWT: Failed audience check."
    );
    // Over an hour, or without iat: Google's short-lived message.
    for c in [
        json!({"iss": sa, "aud": token_uri, "iat": now, "exp": now + 7200, "scope": SCOPE}),
        json!({"iss": sa, "aud": token_uri, "exp": now + 600, "scope": SCOPE}),
    ] {
        let (code, v) = grant(c).await;
        assert_eq!(code, 400, "{v}");
        assert!(
            v["error_description"]
                .as_str()
                .unwrap()
                .starts_with("Invalid JWT: Token must be a short-lived token (60 minutes)"),
            "{v}"
        );
    }
    // An unknown issuer: "account not found", not a signature error.
    let mut c = good.clone();
    c["iss"] = json!("ghost@p.iam.gserviceaccount.com");
    let (code, v) = grant(c).await;
    assert_eq!(code, 400);
    assert_eq!(v["error_description"], "Invalid grant: account not found");
    // target_audience: an ID token for the account, verifiable by tokeninfo.
    let (code, v) = grant(
        json!({"iss": sa, "aud": token_uri, "iat": now, "exp": now + 3600,
        "target_audience": "https://svc.example.com"}),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    let id = v["id_token"].as_str().unwrap();
    let r = http()
        .get(format!("{}/tokeninfo?id_token={id}", emu.url()))
        .send()
        .await
        .unwrap();
    let info: Value = r.json().await.unwrap();
    assert_eq!(info["aud"], "https://svc.example.com");
    assert_eq!(info["email"], sa);
    emu.shutdown().await;
}

/// Stricter item 11: faults come from the policy file and from `/emulator/faults` while the
/// emulator runs, so a user's CI can drive them without the Rust API.
#[tokio::test]
async fn faults_from_the_policy_and_the_control_endpoint() {
    let emu = start(&format!("{POLICY}faults: {{ down: true }}\n")).await;
    let faults = format!("{}/emulator/faults", emu.url());
    let r = http()
        .post(format!("{}/token", emu.url()))
        .form(&[("grant_type", "refresh_token")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "down from the policy");
    assert_eq!(http().delete(&faults).send().await.unwrap().status(), 200);
    let alice = alice_token(&emu).await;
    let target = "target@p.iam.gserviceaccount.com";
    let mint = || generate(&emu, &alice, target, json!({"scope": [SCOPE]}));
    let r = http()
        .post(&faults)
        .json(&json!({"burst_429": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(mint().await.0, 429);
    assert_eq!(mint().await.0, 429);
    assert_eq!(mint().await.0, 200);
    let r = http()
        .post(&faults)
        .json(&json!({"down": true, "latency": "20ms"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["down"], true);
    assert_eq!(v["latency"], "20ms");
    let (code, v) = mint().await;
    assert_eq!(code, 503);
    assert_google_error(&v, 503, "UNAVAILABLE");
    let v: Value = http()
        .get(&faults)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["down"], true);
    // A bad update changes nothing.
    let r = http()
        .post(&faults)
        .json(&json!({"down": false, "error_rate": 2.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(mint().await.0, 503);
    let r = http().delete(&faults).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(mint().await.0, 200);
    emu.shutdown().await;
}

/// Looser item 6, stricter items 5 and 6: STS checks the audience and token types and needs
/// a scope; it takes the documented camelCase JSON body; and the usual Workload Identity
/// set-up (a `principalSet://…/POOL/*` binding) lets the pool's principals in.
#[tokio::test]
async fn sts_checks_its_request_and_principal_sets_match() {
    let emu = start(ROLES_POLICY).await;
    let sts = format!("{}/v1/token", emu.url());
    let audience =
        "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/ci/providers/gh";
    let form = |audience: &str, subject_type: &str, scope: &str| {
        vec![
            (
                "grant_type".to_string(),
                "urn:ietf:params:oauth:grant-type:token-exchange".to_string(),
            ),
            ("audience".into(), audience.to_string()),
            (
                "requested_token_type".into(),
                "urn:ietf:params:oauth:token-type:access_token".into(),
            ),
            ("subject_token".into(), "oidc-from-ci".into()),
            ("subject_token_type".into(), subject_type.to_string()),
            ("scope".into(), scope.to_string()),
        ]
    };
    let post = |f: Vec<(String, String)>| {
        let r = http().post(&sts).form(&f).send();
        async move {
            let r = r.await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let jwt_type = "urn:ietf:params:oauth:token-type:jwt";
    let (code, v) = post(form("projects/1/pools/ci", jwt_type, SCOPE)).await;
    assert_eq!(code, 400);
    assert_eq!(v["error"], "invalid_request");
    assert!(v["error_description"]
        .as_str()
        .unwrap()
        .starts_with("Invalid value for \"audience\"."));
    let (code, v) = post(form(audience, "urn:example:made-up", SCOPE)).await;
    assert_eq!((code, v["error"].as_str()), (400, Some("invalid_request")));
    let (code, _) = post(form(audience, jwt_type, "")).await;
    assert_eq!(code, 400, "no scope");
    let other_pool =
        "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/other/providers/gh";
    let (code, v) = post(form(other_pool, jwt_type, SCOPE)).await;
    assert_eq!((code, v["error"].as_str()), (400, Some("invalid_grant")));
    // The documented JSON body, camelCase.
    let r = http()
        .post(&sts)
        .json(&json!({
            "grantType": "urn:ietf:params:oauth:grant-type:token-exchange",
            "audience": audience,
            "scope": SCOPE,
            "requestedTokenType": "urn:ietf:params:oauth:token-type:access_token",
            "subjectToken": "oidc-from-ci",
            "subjectTokenType": jwt_type,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let federated = r.json::<Value>().await.unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    // principalSet://…/ci/* holds Workload Identity User on `wif`, not Token Creator on `target`.
    let (code, v) = call(
        &emu,
        &federated,
        "projects/-/serviceAccounts/wif@p.iam.gserviceaccount.com",
        "generateAccessToken",
        json!({"scope": [SCOPE]}),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    let (code, _) = call(
        &emu,
        &federated,
        "projects/-/serviceAccounts/target@p.iam.gserviceaccount.com",
        "generateAccessToken",
        json!({"scope": [SCOPE]}),
    )
    .await;
    assert_eq!(code, 403);
    emu.shutdown().await;
}
