//! Tokens: credential A (the source), the IAM Credentials client that exchanges it for
//! credential B, and the cache that keeps B fresh off the request path.
//!
//! - `source.rs`: the source credential in every ADC form, with its own cached token.
//! - `iam.rs`: `generateAccessToken` / `generateIdToken`, Google's errors parsed.
//! - `cache.rs`: [`TokenSlot`]: lock-free reads, single-flight mints, refresher, backoff.

mod cache;
pub mod iam;
pub mod source;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;

pub use cache::{TokenMetrics, TokenSlot};
pub use iam::Minted;

use crate::config::{Config, IdentityConfig, TokensConfig};

#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    #[error("source credential: {message}")]
    Source { message: String },
    #[error("IAM Credentials refused a token for {target}: {code} {status}: {message}")]
    Iam {
        target: String,
        code: u16,
        status: String,
        message: String,
    },
    #[error("cannot reach IAM Credentials for {target}: {message}")]
    Transport { target: String, message: String },
    #[error("no valid token for {target}: {message}")]
    Unavailable { target: String, message: String },
}

/// What to mint: one cache entry per distinct spec.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenSpec {
    pub target: String,
    /// Normalised to `projects/-/serviceAccounts/EMAIL`.
    pub delegates: Vec<String>,
    pub kind: TokenKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TokenKind {
    Access {
        scopes: Vec<String>,
        lifetime: Duration,
    },
    Id {
        audience: String,
        include_email: bool,
    },
}

impl TokenSpec {
    pub fn access(id: &IdentityConfig) -> TokenSpec {
        TokenSpec {
            target: id.service_account.clone(),
            delegates: id.delegates.iter().map(|d| normalise_delegate(d)).collect(),
            kind: TokenKind::Access {
                scopes: id.scopes.clone(),
                lifetime: id.lifetime,
            },
        }
    }

    pub fn id_token(id: &IdentityConfig, audience: &str, include_email: bool) -> TokenSpec {
        TokenSpec {
            target: id.service_account.clone(),
            delegates: id.delegates.iter().map(|d| normalise_delegate(d)).collect(),
            kind: TokenKind::Id {
                audience: audience.to_string(),
                include_email,
            },
        }
    }
}

/// `hop@p.iam.gserviceaccount.com` → `projects/-/serviceAccounts/hop@p.iam.gserviceaccount.com`.
pub fn normalise_delegate(d: &str) -> String {
    if d.starts_with("projects/") {
        d.to_string()
    } else {
        format!("projects/-/serviceAccounts/{d}")
    }
}

/// A short, non-reversible name for a token, safe to log.
pub fn fingerprint(token: &str) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(token.as_bytes());
    format!("sha256:{}", crate::emulator::jwt::hex(&d[..6]))
}

/// Whatever turns a spec into a token: IAM in production, a double in unit tests and benches.
pub trait Mint: Send + Sync + 'static {
    fn mint<'a>(
        &'a self,
        spec: &'a TokenSpec,
    ) -> Pin<Box<dyn Future<Output = Result<Minted, TokenError>> + Send + 'a>>;
}

struct GoogleMinter {
    source: source::Source,
    iam: iam::IamClient,
}

impl Mint for GoogleMinter {
    fn mint<'a>(
        &'a self,
        spec: &'a TokenSpec,
    ) -> Pin<Box<dyn Future<Output = Result<Minted, TokenError>> + Send + 'a>> {
        Box::pin(async move {
            let bearer = self.source.token().await?;
            self.iam.mint(&bearer, spec).await
        })
    }
}

/// Refresh and serving rules, from `tokens:` in the config.
#[derive(Debug, Clone)]
pub struct Settings {
    pub refresh_margin: Option<Duration>,
    pub jitter: Duration,
    pub safety_window: Duration,
}

/// The most a derived margin adds to the safety window.
pub const DERIVED_LEAD_CAP: Duration = Duration::from_secs(300);

/// How a token of a given lifetime is served and renewed. The invariant that keeps warm
/// requests off IAM: the refresh (at `life - margin`, earlier by jitter) comes before the token
/// stops being served (at `serve_for = life - safety_window`), because `margin` is longer than
/// the safety window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Served for this long after minting; past it, less than the safety window is left.
    pub serve_for: Duration,
    /// Renewed this long before expiry, before jitter.
    pub margin: Duration,
    /// `margin` was derived rather than taken from `tokens.refresh_margin`.
    pub derived: bool,
}

impl Timing {
    /// How long before the end of serving the refresh starts: the time one IAM call (and its
    /// retries) has to bring the next token while the current one is still served.
    pub fn lead(&self, life: Duration) -> Duration {
        self.serve_for
            .saturating_sub(life.saturating_sub(self.margin))
    }
}

/// Why a lifetime and the `tokens:` settings cannot work together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimingError {
    /// The token would have no more than the safety window left when minted.
    NeverServable,
    /// `refresh_margin` is not longer than `safety_window`: the token would stop being served
    /// before its refresh, and requests would wait on IAM.
    MarginNotAboveSafety,
    /// `refresh_margin` would renew the token before half of its servable time has passed.
    MarginTooLong,
}

impl Settings {
    /// The timing for a token of this lifetime. Nothing is capped silently: the safety window
    /// is always honoured, and a configured margin is used as given or refused. When no margin
    /// is configured it is derived: the safety window plus 5 minutes, or plus a quarter of the
    /// servable time (`life - safety_window`) when that is shorter.
    pub fn timing(&self, life: Duration) -> Result<Timing, TimingError> {
        let safety = self.safety_window;
        if life <= safety {
            return Err(TimingError::NeverServable);
        }
        let serve_for = life - safety;
        match self.refresh_margin {
            None => Ok(Timing {
                serve_for,
                margin: safety + (serve_for / 4).min(DERIVED_LEAD_CAP),
                derived: true,
            }),
            Some(m) if m <= safety => Err(TimingError::MarginNotAboveSafety),
            Some(m) if m - safety > serve_for / 2 => Err(TimingError::MarginTooLong),
            Some(m) => Ok(Timing {
                serve_for,
                margin: m,
                derived: false,
            }),
        }
    }

    /// [`Settings::timing`], or for a token shorter than the configured margin allows (an IAM
    /// that caps lifetimes, such as the emulator's `token_lifetime`), the derived timing.
    /// `None` when the token cannot be served at all.
    pub fn timing_or_derived(&self, life: Duration) -> Option<Timing> {
        match self.timing(life) {
            Ok(t) => Some(t),
            Err(TimingError::NeverServable) => None,
            Err(_) => Settings {
                refresh_margin: None,
                ..self.clone()
            }
            .timing(life)
            .ok(),
        }
    }
}

impl From<&TokensConfig> for Settings {
    fn from(t: &TokensConfig) -> Settings {
        Settings {
            refresh_margin: t.refresh_margin,
            jitter: t.jitter,
            safety_window: t.safety_window,
        }
    }
}

/// The client for the proxy's own calls to Google (IAM Credentials, OAuth2, STS, the
/// metadata server). It never takes `HTTPS_PROXY`, `HTTP_PROXY` or `ALL_PROXY` from the
/// proxy's environment: a shell that ran `eval "$(impersonate-proxy env)"` points those at the
/// proxy itself. Only `outbound_proxy` in the config sends these calls through a proxy, and
/// never those to the metadata server, which is link-local.
fn outbound_client(config: &Config) -> Result<reqwest::Client, TokenError> {
    let failed = |what: &str, e: reqwest::Error| TokenError::Source {
        // reqwest's message for a bad proxy URL does not include the URL (and so no password).
        message: format!("cannot build the HTTP client ({what}): {e}"),
    };
    let builder = reqwest::Client::builder()
        .timeout(config.iam.timeout)
        .connect_timeout(config.iam.timeout);
    let builder = match &config.outbound_proxy {
        None => builder.no_proxy(),
        Some(url) => {
            let direct = reqwest::NoProxy::from_string("169.254.169.254,metadata.google.internal");
            let proxy = reqwest::Proxy::all(url.as_str())
                .map_err(|e| failed("outbound_proxy", e))?
                .no_proxy(direct);
            builder.proxy(proxy)
        }
    };
    builder.build().map_err(|e| failed("build", e))
}

pub struct TokenEngine {
    minter: Arc<dyn Mint>,
    settings: Settings,
    slots: DashMap<TokenSpec, Arc<TokenSlot>>,
    principal: String,
    metrics: Arc<TokenMetrics>,
}

impl TokenEngine {
    /// Build the source credential and IAM client from config. No network call.
    pub async fn from_config(config: &Config) -> Result<Arc<TokenEngine>, TokenError> {
        let http = outbound_client(config)?;
        let source = source::Source::from_config(&config.source, http.clone())?;
        let principal = source.principal().to_string();
        let minter = GoogleMinter {
            source,
            iam: iam::IamClient::new(http, &config.iam.endpoint),
        };
        Ok(TokenEngine::with_minter(
            Arc::new(minter),
            Settings::from(&config.tokens),
            principal,
        ))
    }

    /// An engine over any minter (tests, benches).
    pub fn with_minter(
        minter: Arc<dyn Mint>,
        settings: Settings,
        principal: String,
    ) -> Arc<TokenEngine> {
        Arc::new(TokenEngine {
            minter,
            settings,
            slots: DashMap::new(),
            principal,
            metrics: Arc::new(TokenMetrics::default()),
        })
    }

    /// The cache entry for a spec, created (cold) on first call and given a refresher.
    pub fn slot(&self, spec: TokenSpec) -> Arc<TokenSlot> {
        self.slots
            .entry(spec.clone())
            .or_insert_with(|| {
                TokenSlot::new(
                    spec,
                    self.minter.clone(),
                    self.settings.clone(),
                    self.metrics.clone(),
                )
            })
            .clone()
    }

    /// Mint every slot created so far, concurrently; one result per slot.
    pub async fn warm(&self) -> Vec<(TokenSpec, Result<(), TokenError>)> {
        let slots: Vec<Arc<TokenSlot>> = self.slots.iter().map(|e| e.value().clone()).collect();
        let tasks = slots.into_iter().map(|slot| async move {
            let r = slot.authorization().await.map(|_| ());
            (slot.spec().clone(), r)
        });
        futures_util::future::join_all(tasks).await
    }

    /// Forget the slots whose spec is not in `keep` (identities a reload removed): their
    /// refreshers end once the last request holding them is done. How many were dropped.
    pub fn retain(&self, keep: &std::collections::HashSet<TokenSpec>) -> usize {
        let before = self.slots.len();
        self.slots.retain(|spec, _| keep.contains(spec));
        before.saturating_sub(self.slots.len())
    }

    /// Every slot has a token that may be served now.
    pub fn is_ready(&self) -> bool {
        self.slots.iter().all(|e| e.value().is_ready())
    }

    pub fn metrics(&self) -> &TokenMetrics {
        &self.metrics
    }

    /// Who credential A is, for audit lines (an email, or the ADC type when unknown).
    pub fn source_principal(&self) -> &str {
        &self.principal
    }

    /// Every cache entry now (for `/metrics`).
    pub fn slots(&self) -> Vec<Arc<TokenSlot>> {
        self.slots.iter().map(|e| e.value().clone()).collect()
    }

    /// `tokens.safety_window`.
    pub fn safety_window(&self) -> Duration {
        self.settings.safety_window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(margin: Option<u64>, safety: u64) -> Settings {
        Settings {
            refresh_margin: margin.map(Duration::from_secs),
            jitter: Duration::from_secs(30),
            safety_window: Duration::from_secs(safety),
        }
    }

    #[test]
    fn timing_derives_or_takes_the_margin_and_never_shortens_the_window() {
        let h = Duration::from_secs(3600);
        let t = settings(None, 60).timing(h).unwrap();
        assert_eq!(
            (t.serve_for, t.margin, t.derived),
            (h - Duration::from_secs(60), Duration::from_secs(360), true)
        );
        assert_eq!(t.lead(h), Duration::from_secs(300));
        // Short lifetimes: a quarter of what is served, on top of the window.
        let t = settings(None, 10).timing(Duration::from_secs(50)).unwrap();
        assert_eq!(t.margin, Duration::from_secs(20));
        let t = settings(Some(600), 60).timing(h).unwrap();
        assert_eq!((t.margin, t.derived), (Duration::from_secs(600), false));
        assert_eq!(
            settings(Some(3), 10).timing(h),
            Err(TimingError::MarginNotAboveSafety)
        );
        assert_eq!(
            settings(Some(2400), 60).timing(h),
            Err(TimingError::MarginTooLong)
        );
        assert_eq!(
            settings(None, 60).timing(Duration::from_secs(60)),
            Err(TimingError::NeverServable)
        );
        // A token shorter than a configured margin allows gets the derived timing instead.
        let t = settings(Some(600), 1)
            .timing_or_derived(Duration::from_secs(9))
            .unwrap();
        assert_eq!((t.margin, t.derived), (Duration::from_secs(3), true));
        assert_eq!(
            settings(Some(600), 10).timing_or_derived(Duration::from_secs(9)),
            None
        );
    }
}
