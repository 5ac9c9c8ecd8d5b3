//! One cache entry ([`TokenSlot`]) and its refresher.
//!
//! - The read path is an `ArcSwapOption` load and a clock read: no lock, no allocation; the
//!   ready-made `Bearer …` header value is cloned (a reference-count increment).
//! - A cold miss is single-flight: the first caller takes the mint lock and calls IAM; the
//!   others wait on the lock and find the token (or the same error) when they get it.
//! - A refresher task per slot renews the token `margin + jitter` before expiry, off the
//!   request path, and retries failures with exponential backoff and jitter. The task holds
//!   only a `Weak`, so dropping the engine and the proxy state ends it.
//! - While IAM fails, the current token is served as long as it has more than the safety window
//!   left; after that requests fail at once with the last error until the next retry is due.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use rand::Rng;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{fingerprint, Mint, Minted, Settings, TokenError, TokenSpec};

/// Most a failed slot waits before its next attempt.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

struct Current {
    header: HeaderValue,
    /// Served until then; past it the token is too close to expiry to hand out.
    serve_until: Instant,
    refresh_at: Instant,
    /// When the token expires, on the wall clock (for `/metrics`).
    expires_at: SystemTime,
}

struct Failure {
    error: TokenError,
    retry_at: Instant,
    attempts: u32,
}

/// Engine-wide token metrics; mints are counted per slot ([`TokenSlot::mints`]).
#[derive(Default)]
pub struct TokenMetrics {
    pub refreshes_total: AtomicU64,
    /// Each mint's duration: the source credential and the IAM call.
    pub iam: crate::metrics::Histogram,
}

/// One cache entry, shared by every route that uses the same spec.
pub struct TokenSlot {
    spec: TokenSpec,
    current: ArcSwapOption<Current>,
    /// A tokio mutex: it is held across the IAM call, which is the point (single flight).
    mint_lock: tokio::sync::Mutex<()>,
    /// A std mutex: held only to read or replace the record, never across an await.
    failure: Mutex<Option<Failure>>,
    wake: Arc<Notify>,
    minter: Arc<dyn Mint>,
    settings: Settings,
    metrics: Arc<TokenMetrics>,
    /// Mints that succeeded and failed, for `/metrics`.
    mints_ok: AtomicU64,
    mints_failed: AtomicU64,
}

impl TokenSlot {
    pub(crate) fn new(
        spec: TokenSpec,
        minter: Arc<dyn Mint>,
        settings: Settings,
        metrics: Arc<TokenMetrics>,
    ) -> Arc<TokenSlot> {
        let slot = Arc::new(TokenSlot {
            spec,
            current: ArcSwapOption::empty(),
            mint_lock: tokio::sync::Mutex::new(()),
            failure: Mutex::new(None),
            wake: Arc::new(Notify::new()),
            minter,
            settings,
            metrics,
            mints_ok: AtomicU64::new(0),
            mints_failed: AtomicU64::new(0),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(refresher(Arc::downgrade(&slot), slot.wake.clone()));
        }
        slot
    }

    pub fn spec(&self) -> &TokenSpec {
        &self.spec
    }

    /// The hot path without awaiting: the current header if it may still be served.
    #[inline]
    pub fn try_current(&self) -> Option<HeaderValue> {
        let guard = self.current.load();
        match guard.as_deref() {
            Some(c) if Instant::now() < c.serve_until => Some(c.header.clone()),
            _ => None,
        }
    }

    /// A ready `Bearer …` header value, or a single-flight mint when cold or expired, or at
    /// once the last error while IAM is failing and no retry is due.
    pub async fn authorization(&self) -> Result<HeaderValue, TokenError> {
        if let Some(h) = self.try_current() {
            return Ok(h);
        }
        if let Some(e) = self.fail_fast() {
            return Err(e);
        }
        let _guard = self.mint_lock.lock().await;
        if let Some(h) = self.try_current() {
            return Ok(h);
        }
        if let Some(e) = self.fail_fast() {
            return Err(e);
        }
        self.mint_locked().await
    }

    /// The header and how much longer it may be served, minting if needed: for a client that
    /// is handed the token itself and must know when to ask again (the metadata facade).
    pub async fn authorization_for(&self) -> Result<(HeaderValue, Duration), TokenError> {
        let header = self.authorization().await?;
        let left = self.current.load().as_deref().map_or(Duration::ZERO, |c| {
            c.serve_until.saturating_duration_since(Instant::now())
        });
        Ok((header, left))
    }

    /// Mints that succeeded and that failed, since the slot was created.
    pub fn mints(&self) -> (u64, u64) {
        (
            self.mints_ok.load(Ordering::Relaxed),
            self.mints_failed.load(Ordering::Relaxed),
        )
    }

    /// When the token held now expires (whether or not it may still be served).
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.current.load().as_deref().map(|c| c.expires_at)
    }

    /// Is there a token that may be served now?
    pub fn is_ready(&self) -> bool {
        self.try_current().is_some()
    }

    /// Renew now, whatever is cached (the refresher's call).
    async fn refresh(&self) -> Result<(), TokenError> {
        let _guard = self.mint_lock.lock().await;
        self.metrics.refreshes_total.fetch_add(1, Ordering::Relaxed);
        self.mint_locked().await.map(|_| ())
    }

    fn fail_fast(&self) -> Option<TokenError> {
        let failure = self.failure.lock().ok()?;
        let f = failure.as_ref()?;
        (Instant::now() < f.retry_at).then(|| TokenError::Unavailable {
            target: self.spec.target.clone(),
            message: format!(
                "{} (retrying in {}s)",
                f.error,
                f.retry_at
                    .saturating_duration_since(Instant::now())
                    .as_secs()
            ),
        })
    }

    /// Call IAM; the caller holds the mint lock.
    async fn mint_locked(&self) -> Result<HeaderValue, TokenError> {
        let began = std::time::Instant::now();
        let minted = self.minter.mint(&self.spec).await;
        self.metrics.iam.observe(began.elapsed());
        let result = minted.and_then(|m| {
            let mut header =
                HeaderValue::from_str(&format!("Bearer {}", m.token)).map_err(|_| {
                    TokenError::Transport {
                        target: self.spec.target.clone(),
                        message: "the minted token is not a valid header value".into(),
                    }
                })?;
            header.set_sensitive(true);
            // The safety window is never shortened: a token that arrives with no more than it
            // left is a failure, not something to serve.
            // No token lives longer than Google's longest lifetime; a claim beyond it (a
            // broken or hostile endpoint) must not overflow the instants computed below.
            let m = Minted {
                expires_in: m.expires_in.min(crate::config::MAX_LIFETIME),
                ..m
            };
            let timing = self.settings.timing_or_derived(m.expires_in).ok_or_else(|| {
                TokenError::Unavailable {
                    target: self.spec.target.clone(),
                    message: format!(
                        "IAM issued a token living {}s, no longer than tokens.safety_window ({}s); it is never served",
                        m.expires_in.as_secs_f64(),
                        self.settings.safety_window.as_secs_f64()
                    ),
                }
            })?;
            Ok((header, m, timing))
        });
        let now = Instant::now();
        match result {
            Ok((header, minted, timing)) => {
                let life = minted.expires_in;
                if self.settings.timing(life).is_err() {
                    tracing::warn!(
                        target_sa = %self.spec.target,
                        expires_in_s = life.as_secs_f64(),
                        margin_s = timing.margin.as_secs_f64(),
                        "the token is shorter than tokens.refresh_margin allows; using the derived margin for it"
                    );
                }
                let margin = timing.margin;
                let room = life.saturating_sub(margin);
                // Jitter only moves the refresh earlier, never past the end of serving.
                let jitter_cap = self.settings.jitter.min(room / 2);
                let jitter = if jitter_cap.is_zero() {
                    Duration::ZERO
                } else {
                    jitter_cap.mul_f64(rand::rng().random::<f64>())
                };
                tracing::info!(
                    target_sa = %self.spec.target,
                    token = %fingerprint(&minted.token),
                    expires_in_s = life.as_secs(),
                    "minted"
                );
                self.current.store(Some(Arc::new(Current {
                    header: header.clone(),
                    serve_until: now + timing.serve_for,
                    refresh_at: now + room - jitter,
                    expires_at: SystemTime::now()
                        .checked_add(life)
                        .unwrap_or(SystemTime::UNIX_EPOCH),
                })));
                self.mints_ok.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut f) = self.failure.lock() {
                    *f = None;
                }
                self.wake.notify_one();
                Ok(header)
            }
            Err(error) => {
                self.mints_failed.fetch_add(1, Ordering::Relaxed);
                let attempts = self
                    .failure
                    .lock()
                    .ok()
                    .and_then(|f| f.as_ref().map(|f| f.attempts))
                    .unwrap_or(0)
                    + 1;
                let base = Duration::from_secs(1)
                    .saturating_mul(1 << attempts.min(6).saturating_sub(1))
                    .min(MAX_BACKOFF);
                let backoff = base + base.mul_f64(0.25 * rand::rng().random::<f64>());
                tracing::warn!(
                    target_sa = %self.spec.target,
                    attempts,
                    retry_in_ms = backoff.as_millis() as u64,
                    error = %error,
                    "mint failed"
                );
                if let Ok(mut f) = self.failure.lock() {
                    *f = Some(Failure {
                        error: error.clone(),
                        retry_at: now + backoff,
                        attempts,
                    });
                }
                self.wake.notify_one();
                Err(error)
            }
        }
    }

    /// When the refresher should act next: while failing, when the retry is due (the refresh
    /// time has usually passed by then, and must not turn into a tight loop); otherwise when
    /// the refresh is due; never for a slot that has not been minted yet.
    fn next_wake(&self) -> Option<Instant> {
        let retry = self
            .failure
            .lock()
            .ok()
            .and_then(|f| f.as_ref().map(|f| f.retry_at));
        retry.or_else(|| self.current.load().as_deref().map(|c| c.refresh_at))
    }
}

impl Drop for TokenSlot {
    fn drop(&mut self) {
        // Wake the refresher so it sees the slot is gone and ends.
        self.wake.notify_one();
    }
}

async fn refresher(slot: Weak<TokenSlot>, wake: Arc<Notify>) {
    loop {
        let when = match slot.upgrade() {
            Some(s) => s.next_wake(),
            None => return,
        };
        match when {
            Some(t) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(t) => {}
                    _ = wake.notified() => continue,
                }
            }
            None => {
                wake.notified().await;
                continue;
            }
        }
        let Some(s) = slot.upgrade() else {
            return;
        };
        // Errors are recorded on the slot (and logged) by the mint itself.
        let _ = s.refresh().await;
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::tokens::{Minted, TokenEngine, TokenKind};

    /// Counts calls, hands out numbered tokens of a fixed lifetime, can be made to fail, and
    /// takes a little (virtual) time per call.
    struct Fake {
        calls: AtomicU64,
        fail: AtomicBool,
        life: Duration,
        latency: Duration,
        /// When each token (`tok-N` at index N - 1) expires.
        expiries: Mutex<Vec<Instant>>,
    }

    impl Mint for Fake {
        fn mint<'a>(
            &'a self,
            spec: &'a TokenSpec,
        ) -> Pin<Box<dyn Future<Output = Result<Minted, TokenError>> + Send + 'a>> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(self.latency).await;
                if self.fail.load(Ordering::SeqCst) {
                    return Err(TokenError::Iam {
                        target: spec.target.clone(),
                        code: 503,
                        status: "UNAVAILABLE".into(),
                        message: "The service is currently unavailable.".into(),
                    });
                }
                self.expiries
                    .lock()
                    .unwrap()
                    .push(Instant::now() + self.life);
                Ok(Minted {
                    token: format!("tok-{n}"),
                    expires_in: self.life,
                })
            })
        }
    }

    fn engine(life: Duration, safety: Duration) -> (Arc<TokenEngine>, Arc<Fake>) {
        let settings = Settings {
            refresh_margin: None,
            jitter: Duration::from_secs(5),
            safety_window: safety,
        };
        engine_with(life, Duration::from_millis(50), settings)
    }

    fn engine_with(
        life: Duration,
        latency: Duration,
        settings: Settings,
    ) -> (Arc<TokenEngine>, Arc<Fake>) {
        let fake = Arc::new(Fake {
            calls: AtomicU64::new(0),
            fail: AtomicBool::new(false),
            life,
            latency,
            expiries: Mutex::new(Vec::new()),
        });
        (
            TokenEngine::with_minter(fake.clone(), settings, "test".into()),
            fake,
        )
    }

    /// Issue 14: the safety window was capped at a quarter of the lifetime (tokens with 5 s left
    /// against a 10 s window reached the origin), and the refresh could come after the token
    /// stopped being served, so warm requests waited on IAM. Here IAM takes 2 s per call.
    #[tokio::test(start_paused = true)]
    async fn a_warm_request_never_waits_on_iam_nor_gets_less_than_the_safety_window() {
        let safety = Duration::from_secs(10);
        let settings = Settings {
            refresh_margin: None,
            jitter: Duration::ZERO,
            safety_window: safety,
        };
        let (engine, fake) = engine_with(Duration::from_secs(20), Duration::from_secs(2), settings);
        let slot = engine.slot(spec());
        slot.authorization().await.unwrap();
        for _ in 0..800 {
            tokio::time::advance(Duration::from_millis(100)).await;
            let asked = Instant::now();
            let h = slot.authorization().await.unwrap();
            assert_eq!(Instant::now(), asked, "a warm request waited on IAM");
            let n: usize = h.to_str().unwrap()["Bearer tok-".len()..].parse().unwrap();
            let left = fake.expiries.lock().unwrap()[n - 1] - asked;
            assert!(left > safety, "served tok-{n} with {left:?} left");
        }
        let calls = fake.calls.load(Ordering::SeqCst);
        assert!((8..=12).contains(&calls), "one mint per 7.5 s: {calls}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_with_no_more_than_the_safety_window_is_never_served() {
        let (engine, fake) = engine(Duration::from_secs(5), Duration::from_secs(10));
        let slot = engine.slot(spec());
        let err = slot.authorization().await.unwrap_err().to_string();
        assert!(err.contains("tokens.safety_window"), "{err}");
        assert!(!err.contains("tok-1"), "{err}");
        assert!(slot.try_current().is_none());
        // Retried with backoff, not in a loop.
        for _ in 0..60 {
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        let calls = fake.calls.load(Ordering::SeqCst);
        assert!(calls <= 7, "{calls} mints in a minute");
    }

    fn spec() -> TokenSpec {
        TokenSpec {
            target: "a@p.iam.gserviceaccount.com".into(),
            delegates: vec![],
            kind: TokenKind::Access {
                scopes: vec!["s".into()],
                lifetime: Duration::from_secs(3600),
            },
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_thousand_cold_readers_cause_one_mint_and_share_it() {
        let (engine, fake) = engine(Duration::from_secs(3600), Duration::from_secs(60));
        let slot = engine.slot(spec());
        let tasks: Vec<_> = (0..1000)
            .map(|_| {
                let s = slot.clone();
                tokio::spawn(async move { s.authorization().await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), "Bearer tok-1");
        }
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
        assert!(
            Arc::ptr_eq(&slot, &engine.slot(spec())),
            "one entry per spec"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refreshes_ahead_of_expiry_and_never_serves_an_expired_token() {
        let life = Duration::from_secs(3600);
        let (engine, fake) = engine(life, Duration::from_secs(60));
        let slot = engine.slot(spec());
        let first_at = Instant::now();
        assert_eq!(slot.authorization().await.unwrap(), "Bearer tok-1");
        // Walk through three lifetimes in 30 s steps; at every step the served token must be
        // one minted less than its lifetime ago minus the safety window.
        let mut minted_at = vec![first_at];
        let mut last = "Bearer tok-1".to_string();
        for _ in 0..(3 * 3600 / 30) {
            tokio::time::sleep(Duration::from_secs(30)).await;
            let h = slot
                .try_current()
                .expect("a warm slot always has a token to serve");
            let h = h.to_str().unwrap().to_string();
            if h != last {
                minted_at.push(Instant::now());
                last = h;
            }
            let age = Instant::now() - *minted_at.last().unwrap();
            assert!(
                age < life - Duration::from_secs(60),
                "served a token {age:?} old"
            );
        }
        let calls = fake.calls.load(Ordering::SeqCst);
        assert!(
            (3..=5).contains(&calls),
            "expected ~4 mints in 3 lifetimes, got {calls}"
        );
        // Refreshes happened before expiry: 5 min margin plus up to 5 s jitter.
        for w in minted_at.windows(2) {
            let gap = w[1] - w[0];
            assert!(
                gap <= life - Duration::from_secs(295),
                "refresh came late: {gap:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn iam_down_past_the_safety_window_fails_fast_then_recovers() {
        let life = Duration::from_secs(600);
        let (engine, fake) = engine(life, Duration::from_secs(60));
        let slot = engine.slot(spec());
        slot.authorization().await.unwrap();
        fake.fail.store(true, Ordering::SeqCst);
        // Refresh is due at 405 s (the 60 s window plus a quarter of the 540 s served, less
        // jitter); it fails, but the current token is still served until 60 s before expiry.
        tokio::time::sleep(Duration::from_secs(500)).await;
        assert!(slot.try_current().is_some());
        assert_eq!(slot.authorization().await.unwrap(), "Bearer tok-1");
        // Past the safety window: errors, quickly, naming the account and Google's message.
        tokio::time::sleep(Duration::from_secs(60)).await;
        let started = Instant::now();
        for _ in 0..100 {
            let err = slot.authorization().await.unwrap_err().to_string();
            assert!(err.contains("a@p.iam.gserviceaccount.com"), "{err}");
            assert!(err.contains("currently unavailable"), "{err}");
        }
        assert!(
            Instant::now() - started < Duration::from_secs(1),
            "errors must not wait for IAM"
        );
        let failed_calls = fake.calls.load(Ordering::SeqCst);
        assert!(
            failed_calls < 20,
            "backoff, not a storm: {failed_calls} calls"
        );
        // IAM recovers: the background retry (at most a minute of backoff) brings a token back.
        fake.fail.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(90)).await;
        let h = slot.try_current().expect("recovered without a request");
        assert_ne!(h, "Bearer tok-1");
        assert!(engine.is_ready());
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_engine_and_slots_ends_the_refresher() {
        let (engine, fake) = engine(Duration::from_secs(100), Duration::from_secs(10));
        let slot = engine.slot(spec());
        slot.authorization().await.unwrap();
        drop(slot);
        drop(engine);
        tokio::time::sleep(Duration::from_secs(1000)).await;
        assert_eq!(
            fake.calls.load(Ordering::SeqCst),
            1,
            "no refresh after drop"
        );
    }
}
