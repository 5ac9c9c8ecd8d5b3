//! Start-up assembly shared by `run`, the demo, tests and the load tool: config → CA → token
//! engine → proxy state → sockets, then warm the identities in the background and serve until
//! told to stop. Binding happens only after the config, CA and source credential are good.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::ca::CertificateAuthority;
use crate::cli::CliError;
use crate::config::Config;
use crate::proxy::ProxyState;
use crate::tokens::TokenEngine;

/// A running proxy (and admin endpoint): addresses, and the way to stop it.
pub struct Server {
    proxy_addr: SocketAddr,
    transparent_addr: Option<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    metadata_addr: Option<SocketAddr>,
    state: Arc<ProxyState>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Server {
    /// Bind `config.listen` (and `config.admin`) and serve.
    pub async fn start(config: Config) -> Result<Server, CliError> {
        let listener = bind(config.listen).await?;
        let admin = match config.admin {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        Server::start_on(config, listener, admin).await
    }

    /// Serve on listeners the caller bound (port 0 in tests).
    pub async fn start_on(
        config: Config,
        listener: TcpListener,
        admin: Option<TcpListener>,
    ) -> Result<Server, CliError> {
        let ca = CertificateAuthority::load_or_create(&config.ca)?;
        let engine = TokenEngine::from_config(&config).await?;
        let warm = config.tokens.warm;
        // The metadata facade binds here, so `listen: 127.0.0.1:0` works in tests too.
        let facade = match &config.facade.metadata {
            Some(m) => {
                let identity = config.identities.get(&m.identity).cloned().ok_or_else(|| {
                    CliError::Other(format!(
                        "facade.metadata.identity `{}` is unknown",
                        m.identity
                    ))
                })?;
                let listener = bind(m.listen).await?;
                let facade =
                    crate::facade::MetadataFacade::new(m.clone(), identity, engine.clone());
                Some((listener, Arc::new(facade)))
            }
            None => None,
        };
        // `transparent.listen` binds here too, like the facade.
        let transparent = match &config.transparent {
            Some(t) => Some(bind(t.listen).await?),
            None => None,
        };
        let state = ProxyState::new(config, ca, engine.clone())
            .map_err(|e| CliError::Other(e.to_string()))?;
        let proxy_addr = local_addr(&listener)?;
        let transparent_addr = match &transparent {
            Some(l) => Some(local_addr(l)?),
            None => None,
        };
        state.set_own_listeners(
            std::iter::once(proxy_addr)
                .chain(transparent_addr)
                .collect(),
        );
        let admin_addr = match &admin {
            Some(l) => Some(local_addr(l)?),
            None => None,
        };
        let metadata_addr = match &facade {
            Some((l, _)) => Some(local_addr(l)?),
            None => None,
        };

        let (stop, stopped) = watch::channel(false);
        let mut tasks = JoinSet::new();
        if warm {
            // Warm-up runs beside serving: /readyz says when it is done, and a request that
            // arrives first takes part in the same single-flight mint.
            let engine = engine.clone();
            tasks.spawn(async move {
                for (spec, result) in engine.warm().await {
                    match result {
                        Ok(()) => tracing::info!(target_sa = %spec.target, "identity warmed"),
                        Err(e) => tracing::warn!(target_sa = %spec.target, error = %e, "identity could not be warmed"),
                    }
                }
            });
        }
        tasks.spawn(crate::proxy::run(
            listener,
            transparent,
            state.clone(),
            wait_for(stopped.clone()),
        ));
        if let Some((listener, facade)) = facade {
            tasks.spawn(crate::facade::serve(
                listener,
                facade,
                wait_for(stopped.clone()),
            ));
        }
        if let Some(admin) = admin {
            tasks.spawn(crate::admin::serve(admin, state.clone(), wait_for(stopped)));
        }
        Ok(Server {
            proxy_addr,
            transparent_addr,
            admin_addr,
            metadata_addr,
            state,
            stop,
            tasks,
        })
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    /// Where the transparent listener listens, when configured.
    pub fn transparent_addr(&self) -> Option<SocketAddr> {
        self.transparent_addr
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Where the metadata facade listens, when configured.
    pub fn metadata_addr(&self) -> Option<SocketAddr> {
        self.metadata_addr
    }

    pub fn state(&self) -> &Arc<ProxyState> {
        &self.state
    }

    /// Reload from `path` on `POST /reload` (and `SIGHUP`, which `run` wires), and watch it
    /// when `reload.watch` is on. `workers` is `--workers`, applied to each reloaded config.
    pub fn enable_reload(&mut self, path: std::path::PathBuf, workers: Option<usize>) {
        self.state.reload.set_source(path, workers);
        if self.state.config.reload.watch {
            self.tasks.spawn(crate::reload::watch(
                self.state.clone(),
                self.stop.subscribe(),
            ));
        }
    }

    /// Stop accepting, drain in-flight requests (bounded by `limits.drain_timeout`), return.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, CliError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| CliError::Other(format!("cannot listen on {addr}: {e}")))
}

fn local_addr(l: &TcpListener) -> Result<SocketAddr, CliError> {
    l.local_addr()
        .map_err(|e| CliError::Other(format!("listener has no address: {e}")))
}

async fn wait_for(mut stopped: watch::Receiver<bool>) {
    // An Err means the sender is gone, which also means stop.
    let _ = stopped.wait_for(|s| *s).await;
}
