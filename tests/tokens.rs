//! The token engine against the emulator: every ADC form as credential A, impersonation with
//! and without delegates, errors carrying Google's message, single-flight, refresh ahead of
//! expiry, and an IAM outage longer than the safety window.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use impersonate_proxy::config::{Config, SourceConfig};
use impersonate_proxy::emulator::{self, EmulatorHandle, Policy, Stats};
use impersonate_proxy::tokens::{TokenEngine, TokenSpec};

const TARGET: &str = "target@p.iam.gserviceaccount.com";

/// alice (user), keyed (key file), fed (federated subject) and vm (metadata) may all mint for
/// `target`; `hop` is a delegate.
fn policy(key_id: &str, public_pem: &str, extra: &str) -> String {
    format!(
        r#"
users:
  - {{ email: alice@example.com, client_id: cid, client_secret: csecret, refresh_token: rt-alice }}
service_accounts:
  - email: keyed@p.iam.gserviceaccount.com
    public_keys: {{ {key_id}: {public_pem:?} }}
  - email: vm@p.iam.gserviceaccount.com
  - email: hop@p.iam.gserviceaccount.com
    token_creators: ["user:alice@example.com"]
  - email: src@p.iam.gserviceaccount.com
    token_creators: ["user:alice@example.com"]
  - email: {TARGET}
    token_creators:
      - "user:alice@example.com"
      - "serviceAccount:keyed@p.iam.gserviceaccount.com"
      - "serviceAccount:vm@p.iam.gserviceaccount.com"
      - "serviceAccount:hop@p.iam.gserviceaccount.com"
      - "serviceAccount:src@p.iam.gserviceaccount.com"
      - "principal://iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/ci/subject/job"
  - email: island@p.iam.gserviceaccount.com
external_subjects:
  - {{ subject_token: oidc-from-ci, principal: "principal://iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/ci/subject/job" }}
metadata:
  service_account: vm@p.iam.gserviceaccount.com
{extra}
"#
    )
}

struct World {
    emu: EmulatorHandle,
    dir: PathBuf,
    key_json: String,
}

async fn world(extra: &str) -> World {
    impersonate_proxy::install_crypto_provider();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let key = emulator::new_service_account_key(
        "keyed@p.iam.gserviceaccount.com",
        &format!("{url}/token"),
    )
    .unwrap();
    let emu = emulator::start(
        l,
        Policy::from_yaml(&policy(&key.key_id, &key.public_key_pem, extra)).unwrap(),
    )
    .await
    .unwrap();
    let dir = std::env::temp_dir().join(format!(
        "ip-tokens-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    World {
        emu,
        dir,
        key_json: key.key_file_json,
    }
}

impl World {
    fn config(&self, source: SourceConfig) -> Config {
        let mut c = Config::from_yaml(
            &format!(
                "iam: {{ endpoint: \"{}\" }}\nidentities:\n  t: {{ service_account: {TARGET} }}\n  chained: {{ service_account: {TARGET}, delegates: [hop@p.iam.gserviceaccount.com] }}\n  island: {{ service_account: island@p.iam.gserviceaccount.com }}\n  ghost: {{ service_account: ghost@p.iam.gserviceaccount.com }}\n  long: {{ service_account: {TARGET}, lifetime: 2h }}\n",
                self.emu.url()
            ),
            "test",
        )
        .unwrap();
        c.source = source;
        c
    }

    fn file(&self, name: &str, v: serde_json::Value) -> SourceConfig {
        let p = self.dir.join(name);
        std::fs::write(&p, v.to_string()).unwrap();
        SourceConfig::File(p)
    }

    fn user(&self) -> serde_json::Value {
        json!({"type": "authorized_user", "client_id": "cid", "client_secret": "csecret",
               "refresh_token": "rt-alice", "token_uri": format!("{}/token", self.emu.url())})
    }

    async fn mint_for(&self, source: SourceConfig, identity: &str) -> Result<String, String> {
        let c = self.config(source);
        let engine = TokenEngine::from_config(&c)
            .await
            .map_err(|e| e.to_string())?;
        let h = engine
            .slot(TokenSpec::access(&c.identities[identity]))
            .authorization()
            .await
            .map_err(|e| e.to_string())?;
        Ok(h.to_str()
            .unwrap()
            .trim_start_matches("Bearer ")
            .to_string())
    }

    async fn done(self) {
        self.emu.shutdown().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn every_adc_form_works_as_credential_a() {
    let w = world("").await;
    let url = w.emu.url();
    let imp_url = format!(
        "{url}/v1/projects/-/serviceAccounts/src@p.iam.gserviceaccount.com:generateAccessToken"
    );
    let subject = w.dir.join("subject.txt");
    std::fs::write(&subject, "oidc-from-ci\n").unwrap();
    let sources = [
        ("service_account", w.file("sa.json", serde_json::from_str(&w.key_json).unwrap())),
        ("authorized_user", w.file("user.json", w.user())),
        ("impersonated_service_account", w.file("imp.json", json!({
            "type": "impersonated_service_account",
            "service_account_impersonation_url": imp_url,
            "delegates": [],
            "source_credentials": w.user(),
        }))),
        ("external_account", w.file("ext.json", json!({
            "type": "external_account",
            "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/ci/providers/gh",
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "token_url": format!("{url}/v1/token"),
            "credential_source": {"file": subject},
        }))),
        ("metadata", SourceConfig::Metadata { host: Some(w.emu.addr().to_string()) }),
    ];
    for (name, source) in sources {
        let token = w
            .mint_for(source, "t")
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let info = w
            .emu
            .token_info(&token)
            .unwrap_or_else(|| panic!("{name}: unknown token"));
        assert_eq!(info.principal, TARGET, "{name}");
    }
    let s = w.emu.stats();
    assert_eq!(
        Stats::get(&s.oauth_token),
        3,
        "key-file JWT grant + user refresh (twice)"
    );
    assert_eq!(Stats::get(&s.sts_token), 1);
    assert_eq!(Stats::get(&s.metadata_token), 1);
    w.done().await;
}

#[tokio::test]
async fn delegation_and_errors_carry_googles_message() {
    let w = world("").await;
    let user = || w.file("user.json", w.user());
    let t = w.mint_for(user(), "chained").await.unwrap();
    assert_eq!(w.emu.token_info(&t).unwrap().principal, TARGET);
    let long = w.mint_for(user(), "long").await.unwrap_err();
    assert!(long.contains("400") && long.contains("exceeds"), "{long}");
    let denied = w.mint_for(user(), "island").await.unwrap_err();
    assert!(
        denied.contains("island@p.iam.gserviceaccount.com"),
        "{denied}"
    );
    assert!(
        denied.contains("Permission 'iam.serviceAccounts.getAccessToken' denied"),
        "{denied}"
    );
    let ghost = w.mint_for(user(), "ghost").await.unwrap_err();
    assert!(
        ghost.contains("404") && ghost.contains("NOT_FOUND"),
        "{ghost}"
    );
    let bad_source = w
        .mint_for(w.file("bad.json", json!({"type": "authorized_user", "client_id": "cid", "client_secret": "nope", "refresh_token": "rt-alice", "token_uri": format!("{}/token", w.emu.url())})), "t")
        .await
        .unwrap_err();
    assert!(bad_source.starts_with("source credential"), "{bad_source}");
    assert!(
        !bad_source.contains("nope"),
        "no secret in the error: {bad_source}"
    );
    w.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_cold_requests_make_one_iam_call() {
    let w = world("").await;
    let c = w.config(w.file("user.json", w.user()));
    let engine = TokenEngine::from_config(&c).await.unwrap();
    let slot = engine.slot(TokenSpec::access(&c.identities["t"]));
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let s = slot.clone();
            tokio::spawn(async move { s.authorization().await.unwrap() })
        })
        .collect();
    let mut tokens = std::collections::HashSet::new();
    for t in tasks {
        tokens.insert(t.await.unwrap());
    }
    assert_eq!(tokens.len(), 1, "all 1,000 got the same token");
    assert_eq!(Stats::get(&w.emu.stats().generate_access_token), 1);
    w.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_replaced_before_expiry_and_never_served_expired() {
    // Every issued token lives 4 s; the engine refreshes a quarter of that ahead.
    let w = world("token_lifetime: 4s\n").await;
    let mut c = w.config(w.file("user.json", w.user()));
    c.tokens.jitter = Duration::from_millis(200);
    c.tokens.safety_window = Duration::from_millis(500);
    let engine = TokenEngine::from_config(&c).await.unwrap();
    let slot = engine.slot(TokenSpec::access(&c.identities["t"]));
    let mut distinct = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(9);
    while tokio::time::Instant::now() < deadline {
        let h = slot.authorization().await.unwrap();
        let t = h
            .to_str()
            .unwrap()
            .trim_start_matches("Bearer ")
            .to_string();
        let info = w
            .emu
            .token_info(&t)
            .expect("served token is valid at the emulator");
        assert!(info.expires > std::time::SystemTime::now());
        distinct.insert(t);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        distinct.len() >= 3,
        "refreshed in the background: {} tokens in 9 s",
        distinct.len()
    );
    let mints = Stats::get(&w.emu.stats().generate_access_token);
    assert!(mints <= 6, "no refresh storm: {mints} mints");
    drop(slot);
    drop(engine);
    w.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iam_down_past_the_safety_window_fails_fast_then_recovers() {
    let w = world("token_lifetime: 3s\n").await;
    let mut c = w.config(w.file("user.json", w.user()));
    c.tokens.jitter = Duration::ZERO;
    c.tokens.safety_window = Duration::from_millis(500);
    let engine = TokenEngine::from_config(&c).await.unwrap();
    let slot = engine.slot(TokenSpec::access(&c.identities["t"]));
    slot.authorization().await.unwrap();
    w.emu.faults().set_down(true);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Past expiry with IAM down: clear errors, fast, naming the account and Google's message.
    let started = std::time::Instant::now();
    for _ in 0..50 {
        let e = slot.authorization().await.unwrap_err().to_string();
        assert!(e.contains(TARGET), "{e}");
        assert!(e.contains("currently unavailable"), "{e}");
    }
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "fail fast: {:?}",
        started.elapsed()
    );
    w.emu.faults().set_down(false);
    // Recovers by itself (backoff is at most a few seconds this early).
    let mut recovered = false;
    for _ in 0..80 {
        if slot.try_current().is_some() {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        recovered,
        "the refresher brought a token back without a request"
    );
    w.done().await;
}
