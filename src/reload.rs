//! Reload without dropping a connection: on `SIGHUP`, `POST /reload` at the admin listener,
//! or a change of the config file.
//!
//! A reload reads and validates the file, refuses it if a setting that needs a restart
//! changed (naming each), compiles the next [`Live`] (routes, identities, clients) beside the
//! one in force, mints the tokens of its new identities, and only then swaps it in. Requests
//! in flight finish on the generation they loaded; open connections stay open and their next
//! request sees the new one. Token slots no route uses any more are dropped from the engine, so
//! their refreshers stop. A refused reload leaves everything as it was, and says why in the
//! log, in the `/reload` answer and in `impersonate_proxy_reloads_total{result="failed"}`.
//!
//! **The watch** polls the config path every `reload.interval`, following symlinks: it
//! compares the resolved path, size, modification time and inode. A Kubernetes ConfigMap
//! volume replaces its files by swapping the `..data` symlink in the file's directory, which
//! a watch on the file itself (an inotify watch on the old inode) never sees; resolving the
//! path each time does.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;

use crate::config::{Config, ConfigError};
use crate::proxy::{Live, ProxyState};
use crate::tokens::TokenSpec;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReloadConfig {
    /// Reload when the config file changes (as well as on SIGHUP and `POST /reload`).
    pub watch: bool,
    /// How often the watch looks at the file.
    #[serde(deserialize_with = "crate::config::de_duration")]
    pub interval: Duration,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig {
            watch: true,
            interval: Duration::from_secs(2),
        }
    }
}

/// Where the running config came from, and how reloads went.
#[derive(Default)]
pub struct Reload {
    source: OnceLock<Source>,
    /// One reload at a time.
    turn: tokio::sync::Mutex<()>,
    pub ok_total: AtomicU64,
    pub failed_total: AtomicU64,
}

struct Source {
    path: PathBuf,
    /// `--workers`, applied to every reloaded config as it was at start.
    workers: Option<usize>,
}

impl Reload {
    /// Name the file reloads read. Set once; a proxy built without a file cannot reload.
    pub fn set_source(&self, path: PathBuf, workers: Option<usize>) {
        let _ = self.source.set(Source { path, workers });
    }

    pub fn path(&self) -> Option<&Path> {
        self.source.get().map(|s| s.path.as_path())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the proxy was not started from a config file; nothing to reload")]
    NoSource,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("these settings changed and need a restart: {}; the running config stays", .0.join(", "))]
    NeedsRestart(Vec<String>),
    #[error("cannot compile the new config: {0}; the running config stays")]
    Compile(String),
    #[error("a new identity could not be warmed ({0}); the running config stays")]
    Warm(String),
}

/// What a reload changed.
#[derive(Debug, Clone)]
pub struct Reloaded {
    pub generation: u64,
    pub routes: usize,
    pub clients: usize,
    /// Token slots minted for the new generation before the switch.
    pub warmed: usize,
    /// Token slots dropped (identities no route uses any more).
    pub retired: usize,
}

/// Reload from the config file; `why` names the trigger in the log.
pub async fn reload(state: &ProxyState, why: &str) -> Result<Reloaded, ReloadError> {
    let result = reload_locked(state).await;
    match &result {
        Ok(r) => {
            state.reload.ok_total.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                trigger = why,
                generation = r.generation,
                routes = r.routes,
                clients = r.clients,
                warmed = r.warmed,
                retired = r.retired,
                "config reloaded"
            );
        }
        Err(e) => {
            state.reload.failed_total.fetch_add(1, Ordering::Relaxed);
            tracing::error!(trigger = why, error = %e, "config reload refused");
        }
    }
    result
}

async fn reload_locked(state: &ProxyState) -> Result<Reloaded, ReloadError> {
    let source = state.reload.source.get().ok_or(ReloadError::NoSource)?;
    let _turn = state.reload.turn.lock().await;
    let mut config = Config::load(&source.path)?;
    if let Some(n) = source.workers {
        config.limits.workers = n;
    }
    let changed = needs_restart(&state.config, &config);
    if !changed.is_empty() {
        return Err(ReloadError::NeedsRestart(changed));
    }
    let current = state.live.load_full();
    let generation = current.generation + 1;
    let next = Live::compile(&config, &state.engine, &state.metrics, generation)
        .map_err(|e| ReloadError::Compile(e.to_string()))?;
    // Mint the identities new in this generation before anyone can be routed to them. (Those
    // the running generation has already are refreshed as they were, failing or not.)
    let running: HashSet<&TokenSpec> = current.specs().collect();
    let mut cold: Vec<_> = next
        .targets
        .iter()
        .filter_map(|t| t.slot.clone())
        .filter(|s| !running.contains(s.spec()) && !s.is_ready())
        .collect();
    cold.sort_by_key(|s| Arc::as_ptr(s) as usize);
    cold.dedup_by(|a, b| Arc::ptr_eq(a, b));
    let warmed = cold.len();
    if config.tokens.warm && !cold.is_empty() {
        let limit = config.iam.timeout.saturating_mul(2);
        let results = futures_util::future::join_all(cold.iter().map(|slot| async move {
            match tokio::time::timeout(limit, slot.authorization()).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!(
                    "no token for {} within {}s",
                    slot.spec().target,
                    limit.as_secs()
                )),
            }
        }))
        .await;
        if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
            drop(running);
            drop(cold);
            drop(next);
            retire(state, &current);
            return Err(ReloadError::Warm(e));
        }
    }
    let summary = Reloaded {
        generation,
        routes: next.routes.len(),
        clients: config.clients.len(),
        warmed,
        retired: 0,
    };
    state.live.store(Arc::new(next));
    let retired = retire(state, &state.live.load());
    Ok(Reloaded { retired, ..summary })
}

/// Drop the engine's slots that `live` does not use (keeping the metadata facade's identity),
/// so their refreshers stop.
fn retire(state: &ProxyState, live: &Live) -> usize {
    let mut keep: HashSet<TokenSpec> = live.specs().cloned().collect();
    if let Some(m) = &state.config.facade.metadata {
        if let Some(id) = state.config.identities.get(&m.identity) {
            keep.insert(TokenSpec::access(id));
        }
    }
    state.engine.retain(&keep)
}

/// The settings that differ between the running config and `next` and cannot change without
/// a restart (sockets, the CA, the source credential, the workers and their upstream
/// clients, token timing, and the policies the listener reads at start), by key.
pub fn needs_restart(running: &Config, next: &Config) -> Vec<String> {
    let mut keys = Vec::new();
    let mut check = |key: &str, same: bool| {
        if !same {
            keys.push(key.to_string());
        }
    };
    check("listen", running.listen == next.listen);
    check("admin", running.admin == next.admin);
    check("ca", running.ca == next.ca);
    check("source", running.source == next.source);
    check("iam", running.iam == next.iam);
    check(
        "outbound_proxy",
        running.outbound_proxy == next.outbound_proxy,
    );
    check("upstream", running.upstream == next.upstream);
    check(
        "limits.workers",
        running.limits.workers == next.limits.workers,
    );
    let mut limits = next.limits.clone();
    limits.workers = running.limits.workers;
    check("limits", running.limits == limits);
    check("tokens", running.tokens == next.tokens);
    check("facade", running.facade == next.facade);
    check("other_hosts", running.other_hosts == next.other_hosts);
    check("unmatched", running.unmatched == next.unmatched);
    check("allowed_ports", running.allowed_ports == next.allowed_ports);
    check("plain_http", running.plain_http == next.plain_http);
    check("reload", running.reload == next.reload);
    check("transparent", running.transparent == next.transparent);
    if let Some(m) = &running.facade.metadata {
        check(
            &format!("identities.{} (behind facade.metadata)", m.identity),
            running.identities.get(&m.identity) == next.identities.get(&m.identity),
        );
    }
    keys
}

/// Resolves once shutdown has begun; the watch guard is dropped before anything else waits.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// What the watch compares: the resolved path, and its size, modification time and inode.
#[derive(Debug, PartialEq, Eq)]
struct Stamp {
    resolved: PathBuf,
    len: u64,
    modified: Option<std::time::SystemTime>,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let resolved = std::fs::canonicalize(path).ok()?;
    let meta = std::fs::metadata(&resolved).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some(Stamp {
        resolved,
        len: meta.len(),
        modified: meta.modified().ok(),
        inode,
    })
}

/// Reload whenever the config file changes, until `stop`. See the module documentation. The
/// file is looked at once now, so a change right after this call counts as one.
pub fn watch(
    state: Arc<ProxyState>,
    mut stop: watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let path = state.reload.path().map(Path::to_path_buf);
    let mut last = path.as_deref().and_then(stamp);
    async move {
        let Some(path) = path else {
            return;
        };
        let interval = state.config.reload.interval;
        tracing::info!(
            path = %path.display(),
            every_ms = interval.as_millis() as u64,
            "watching the config file"
        );
        watch_loop(&state, &path, interval, &mut last, &mut stop).await;
    }
}

async fn watch_loop(
    state: &ProxyState,
    path: &Path,
    interval: Duration,
    last: &mut Option<Stamp>,
    stop: &mut watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stopped(stop) => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let now = stamp(path);
        // A file that is missing for a moment (mid-swap) is not a change yet.
        if now.is_none() || now == *last {
            continue;
        }
        *last = now;
        let _ = reload(state, "config file changed").await;
    }
}
