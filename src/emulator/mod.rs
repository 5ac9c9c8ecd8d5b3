//! An offline stand-in for the parts of Google the proxy talks to, with Google's semantics, on
//! one plain-HTTP port: IAM Credentials v1 (`generateAccessToken`, `generateIdToken`,
//! `signJwt`, `signBlob`), the OAuth2 token endpoint (`/token`: JWT-bearer and refresh-token
//! grants), STS (`/v1/token`: token exchange), the metadata server (`/computeMetadata/v1/…`),
//! tokeninfo (`/tokeninfo`), the OIDC keys (`/oauth2/v3/certs`, `/oauth2/v1/certs`), each
//! service account's public keys (`/service_accounts/v1/metadata/{x509,jwk,raw}/EMAIL`), and its
//! own control endpoint for faults (`/emulator/faults`).
//!
//! - `policy.rs`: the policy file (allow policies per account, roles; test knobs).
//! - `jwt.rs`: RS256 signing and verification, certificates, key files.
//! - `google.rs`: routing, faults, public keys, the refresh-token grant, tokeninfo.
//! - `grant.rs`: STS and the JWT-bearer grant (key files: access tokens and ID tokens).
//! - `iam.rs`: IAM Credentials (permissions hop by hop, scopes, request shapes).
//! - `instance.rs`: the metadata instance behind [`crate::metadata`].

mod google;
mod grant;
mod iam;
mod instance;
pub mod jwt;
pub mod policy;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use jwt::{new_service_account_key, ServiceAccountKey};
pub use policy::Policy;

#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    #[error("policy: {0}")]
    Policy(String),
    #[error("crypto: {0}")]
    Crypto(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Calls served, by endpoint, for tests (single-flight, refresh counts).
#[derive(Default, Debug)]
pub struct Stats {
    pub generate_access_token: AtomicU64,
    pub generate_id_token: AtomicU64,
    pub sign_jwt: AtomicU64,
    pub sign_blob: AtomicU64,
    pub oauth_token: AtomicU64,
    pub sts_token: AtomicU64,
    pub metadata_token: AtomicU64,
    pub tokeninfo: AtomicU64,
    pub failures_injected: AtomicU64,
}

impl Stats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::SeqCst)
    }
}

/// Faults that can be switched at run time.
#[derive(Default, Debug)]
pub struct Faults {
    /// Error rate in millionths, so it fits an atomic.
    error_ppm: AtomicU64,
    latency_ms: AtomicU64,
    burst_429: AtomicU64,
    down: AtomicBool,
}

impl Faults {
    pub fn set_error_rate(&self, rate: f64) {
        let ppm = (rate.clamp(0.0, 1.0) * 1_000_000.0) as u64;
        self.error_ppm.store(ppm, Ordering::SeqCst);
    }
    pub fn set_latency(&self, d: Duration) {
        self.latency_ms.store(
            d.as_millis().min(u128::from(u64::MAX)) as u64,
            Ordering::SeqCst,
        );
    }
    /// The next `n` calls get 429 RESOURCE_EXHAUSTED.
    pub fn set_burst_429(&self, n: u64) {
        self.burst_429.store(n, Ordering::SeqCst);
    }
    /// Every call fails with 503 while set.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
    /// The current settings, as `GET /emulator/faults` shows them.
    pub fn snapshot(&self) -> serde_json::Value {
        serde_json::json!({
            "error_rate": self.error_ppm.load(Ordering::SeqCst) as f64 / 1_000_000.0,
            "latency": format!("{}ms", self.latency_ms.load(Ordering::SeqCst)),
            "burst_429": self.burst_429.load(Ordering::SeqCst),
            "down": self.down.load(Ordering::SeqCst),
        })
    }

    /// Apply `{"error_rate", "latency", "burst_429", "down"}` (any subset), all or nothing.
    pub fn update(&self, v: &serde_json::Value) -> Result<(), String> {
        let Some(obj) = v.as_object() else {
            return Err("expected a JSON object".into());
        };
        if let Some(k) = obj
            .keys()
            .find(|k| !["error_rate", "latency", "burst_429", "down"].contains(&k.as_str()))
        {
            return Err(format!("unknown key `{k}`"));
        }
        let rate = match obj.get("error_rate") {
            None => None,
            Some(r) => match r.as_f64() {
                Some(r) if (0.0..=1.0).contains(&r) => Some(r),
                _ => return Err("error_rate must be a number between 0 and 1".into()),
            },
        };
        let latency = match obj.get("latency") {
            None => None,
            Some(serde_json::Value::String(s)) => {
                Some(crate::config::parse_duration(s).map_err(|e| format!("latency: {e}"))?)
            }
            Some(_) => return Err("latency must be a duration like \"250ms\"".into()),
        };
        let burst = match obj.get("burst_429") {
            None => None,
            Some(n) => Some(n.as_u64().ok_or("burst_429 must be a whole number")?),
        };
        let down = match obj.get("down") {
            None => None,
            Some(b) => Some(b.as_bool().ok_or("down must be true or false")?),
        };
        if let Some(r) = rate {
            self.set_error_rate(r);
        }
        if let Some(l) = latency {
            self.set_latency(l);
        }
        if let Some(n) = burst {
            self.set_burst_429(n);
        }
        if let Some(d) = down {
            self.set_down(d);
        }
        Ok(())
    }

    pub fn clear(&self) {
        self.set_error_rate(0.0);
        self.set_latency(Duration::ZERO);
        self.set_burst_429(0);
        self.set_down(false);
    }
}

/// What an issued access token stands for.
#[derive(Debug, Clone)]
pub struct TokenInfo {
    /// Email of a user or service account, or a `principal://` federated identity.
    pub principal: String,
    pub scopes: Vec<String>,
    pub expires: SystemTime,
    /// The OAuth client (users) or unique id (service accounts).
    pub azp: String,
}

impl TokenInfo {
    pub fn seconds_left(&self) -> u64 {
        self.expires
            .duration_since(SystemTime::now())
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

/// Whose key signs Google's ID tokens (its certificates are served under this name too).
pub const OIDC_SIGNER: &str = "federated-signon@system.gserviceaccount.com";

pub(crate) struct Emulator {
    pub policy: Policy,
    /// The OIDC key: ID tokens only, published at `/oauth2/v3/certs` and `/oauth2/v1/certs`.
    /// Made on first use ([`Emulator::oidc_signer`]), as the accounts' keys are: most runs ask
    /// only for access tokens, and an RSA-2048 key took the emulator's start-up 50 – 500 ms
    /// and 0.5 MB of memory it kept (the key generation's code and its thread).
    signer: OnceLock<jwt::Signer>,
    /// Each service account's Google-managed key (signJwt, signBlob), made on first use and
    /// published at `/service_accounts/v1/metadata/{x509,jwk,raw}/EMAIL`. Keyed by lowercase email.
    pub account_keys: DashMap<String, Arc<jwt::Signer>>,
    pub tokens: DashMap<String, TokenInfo>,
    pub stats: Arc<Stats>,
    pub faults: Arc<Faults>,
    /// Base URL, for `aud` checks on key-file assertions.
    pub url: String,
    /// Reused so rejection-sampled randomness is not reseeded per request.
    pub rng: Mutex<rand::rngs::StdRng>,
}

pub struct EmulatorHandle {
    addr: SocketAddr,
    inner: Arc<Emulator>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl EmulatorHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// `http://127.0.0.1:PORT`, the base for every endpoint.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }
    pub fn faults(&self) -> &Faults {
        &self.inner.faults
    }
    /// Who a token belongs to, as tokeninfo would say (None if unknown or expired).
    pub fn token_info(&self, token: &str) -> Option<TokenInfo> {
        self.inner.lookup(token)
    }
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for EmulatorHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Emulator {
    /// The OIDC key, made on the first call.
    pub(crate) fn oidc_signer(&self) -> Result<&jwt::Signer, EmulatorError> {
        if let Some(s) = self.signer.get() {
            return Ok(s);
        }
        // Two first calls at once may both make one; the first stored is the one kept.
        let made = jwt::Signer::generate(OIDC_SIGNER)?;
        Ok(self.signer.get_or_init(|| made))
    }

    /// The OIDC key if one was made: no ID token can have been signed before that.
    pub(crate) fn oidc_signer_if_made(&self) -> Option<&jwt::Signer> {
        self.signer.get()
    }

    /// The Google-managed key of a service account the emulator knows (the policy's accounts
    /// and the metadata instance's), or None.
    pub(crate) fn account_key(
        &self,
        email: &str,
    ) -> Option<Result<Arc<jwt::Signer>, EmulatorError>> {
        let known = self
            .policy
            .account(email)
            .map(|sa| sa.email.clone())
            .or_else(|| {
                self.policy
                    .metadata
                    .as_ref()
                    .filter(|m| m.service_account.eq_ignore_ascii_case(email))
                    .map(|m| m.service_account.clone())
            })?;
        let id = known.to_ascii_lowercase();
        if let Some(k) = self.account_keys.get(&id) {
            return Some(Ok(k.clone()));
        }
        // Made here, on the request: an RSA-2048 key takes milliseconds, once per account.
        let key = match jwt::Signer::generate(&known) {
            Ok(k) => Arc::new(k),
            Err(e) => return Some(Err(e)),
        };
        Some(Ok(self.account_keys.entry(id).or_insert(key).clone()))
    }

    pub(crate) fn lookup(&self, token: &str) -> Option<TokenInfo> {
        self.tokens
            .get(token)
            .map(|t| t.clone())
            .filter(|t| t.expires > SystemTime::now())
    }
}

/// Serve the emulator on `listener` until the handle is shut down or dropped.
pub async fn start(listener: TcpListener, policy: Policy) -> Result<EmulatorHandle, EmulatorError> {
    let addr = listener.local_addr()?;
    let faults = Arc::new(Faults::default());
    faults.set_error_rate(policy.faults.error_rate);
    faults.set_latency(policy.faults.latency.unwrap_or_default());
    faults.set_burst_429(policy.faults.burst_429);
    faults.set_down(policy.faults.down);
    let inner = Arc::new(Emulator {
        policy,
        signer: OnceLock::new(),
        account_keys: DashMap::new(),
        tokens: DashMap::new(),
        stats: Arc::new(Stats::default()),
        faults,
        url: format!("http://{addr}"),
        rng: Mutex::new(rand::SeedableRng::from_os_rng()),
    });
    let (stop, mut stopped) = watch::channel(false);
    let emu = inner.clone();
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = stopped.wait_for(|s| *s) => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(_) => continue,
                },
            };
            let emu = emu.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let emu = emu.clone();
                    async move { Ok::<_, std::convert::Infallible>(google::handle(&emu, req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(EmulatorHandle {
        addr,
        inner,
        stop,
        task: Some(task),
    })
}
