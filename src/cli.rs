//! The bodies of the CLI commands, kept out of `main.rs` so that they return typed errors and
//! the start-up order (config → CA → tokens → sockets) lives in one place.

use std::net::SocketAddr;
use std::path::Path;

use http::Method;

use crate::ca::{CaError, CertificateAuthority};
use crate::config::{Config, ConfigError};
use crate::routes::{Action, RouteTable};
use crate::tokens::{TokenEngine, TokenError, TokenSpec};

/// One error per failing stage, each with its own exit code so scripts can tell a bad config
/// from an unreachable IAM.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("{0}")]
    Other(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Config(_) => 3,
            CliError::Ca(_) => 4,
            CliError::Token(_) => 5,
            CliError::Other(_) => 1,
        }
    }
}

/// `check`: validate, print identities and the route table; with a URL, the dry run.
pub fn check(
    config_path: &Path,
    url: Option<&str>,
    method: &str,
    client: Option<&str>,
) -> Result<(), CliError> {
    let config = Config::load(config_path)?;
    let table = RouteTable::compile(&config)?;
    match url {
        None => {
            println!("{}: ok", config_path.display());
            println!("\nidentities:");
            for (name, id) in &config.identities {
                let chain = if id.delegates.is_empty() {
                    String::new()
                } else {
                    format!(" via {}", id.delegates.join(" -> "))
                };
                println!(
                    "  {name}: {}{chain} (lifetime {}s)",
                    id.service_account,
                    id.lifetime.as_secs()
                );
                println!("    {}", timing_line(&config, id.lifetime));
            }
            if config.routes.iter().any(|r| r.id_token.is_some()) {
                println!(
                    "  ID tokens (1h, Google's): {}",
                    timing_line(&config, std::time::Duration::from_secs(3600))
                );
            }
            println!("{}", timing_rules(&config));
            println!("\nroutes (first match wins):\n{}", table.describe());
            print_clients(&config);
            println!(
                "other hosts: {:?}; unmatched paths on routed hosts: {:?}",
                config.other_hosts, config.unmatched
            );
        }
        Some(url) => println!("{}", dry_run_as(&config, &table, url, method, client)?),
    }
    Ok(())
}

/// `check`'s lines about clients: how each is named and which routes it may use.
fn print_clients(config: &Config) {
    if config.clients.is_empty() {
        println!(
            "clients: none configured; everyone who can reach {} is served",
            config.listen
        );
        return;
    }
    println!("clients (Proxy-Authorization: Basic and/or source address):");
    for (name, c) in &config.clients {
        let how = match (&c.password_hash, c.cidrs.is_empty()) {
            (Some(_), true) => "password".to_string(),
            (Some(_), false) => format!("password, from {}", c.cidrs.join(", ")),
            (None, _) => format!("from {}", c.cidrs.join(", ")),
        };
        let routes: Vec<String> = (0..config.routes.len())
            .filter(|&i| {
                let r = &config.routes[i];
                r.clients.is_empty() || r.clients.contains(name)
            })
            .map(|i| config.route_name(i))
            .collect();
        println!("  {name} ({how}): {}", routes.join(", "));
    }
}

/// When a token of this lifetime is renewed and how long it is served, and whether the margin
/// was configured or derived; the config was validated, so the timing exists.
fn timing_line(config: &Config, life: std::time::Duration) -> String {
    use crate::config::show;
    let settings = crate::tokens::Settings::from(&config.tokens);
    match settings.timing(life) {
        Ok(t) => format!(
            "renewed {} before expiry ({}), never served with less than {} left",
            show(t.margin),
            if t.derived {
                "derived"
            } else {
                "tokens.refresh_margin"
            },
            show(config.tokens.safety_window),
        ),
        Err(_) => "no valid token timing".into(),
    }
}

/// The token timing rules in one line, under the identities.
fn timing_rules(config: &Config) -> String {
    use crate::config::show;
    let margin = match config.tokens.refresh_margin {
        Some(m) => format!("tokens.refresh_margin {} as configured", show(m)),
        None => "derived margins (tokens.safety_window plus 5m, or plus a quarter of the rest of the lifetime when shorter)".into(),
    };
    format!(
        "tokens: {margin}; refreshes up to {} earlier at random (tokens.jitter); each starts at least {} (iam.timeout) before its token stops being served, so a warm request never waits on IAM",
        show(config.tokens.jitter),
        show(config.iam.timeout),
    )
}

/// [`dry_run`] for a named client (gateway mode): only the routes it may use match, and a
/// matching route it may not use is the 403 it would get.
pub fn dry_run_as(
    config: &Config,
    table: &RouteTable,
    url: &str,
    method: &str,
    client: Option<&str>,
) -> Result<String, CliError> {
    let Some(name) = client else {
        if !config.clients.is_empty() {
            return Err(CliError::Other(format!(
                "clients are configured: say which with --client (one of: {})",
                config
                    .clients
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        return dry_run(
            config,
            table,
            url,
            method,
            &crate::routes::RouteSet::All,
            None,
        );
    };
    let clients = crate::clients::ClientTable::compile(config, table.len());
    let allowed = clients.allowed_for(name).ok_or_else(|| {
        CliError::Other(format!(
            "no client `{name}` under `clients` (have: {})",
            clients.names().collect::<Vec<_>>().join(", ")
        ))
    })?;
    dry_run(config, table, url, method, allowed, Some(name))
}

/// Which route and identity a request would get, in one line; `allowed` are the routes the
/// client may use.
pub fn dry_run(
    config: &Config,
    table: &RouteTable,
    url: &str,
    method: &str,
    allowed: &crate::routes::RouteSet,
    client: Option<&str>,
) -> Result<String, CliError> {
    let who = client
        .map(|c| format!(" (client `{c}`)"))
        .unwrap_or_default();
    let parsed =
        url::Url::parse(url).map_err(|e| CliError::Other(format!("`{url}` is not a URL: {e}")))?;
    let host = parsed
        .host_str()
        .ok_or_else(|| CliError::Other(format!("`{url}` has no host")))?
        .to_ascii_lowercase();
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| CliError::Other(format!("`{method}` is not an HTTP method")))?;
    let port = parsed.port_or_known_default().unwrap_or(443);
    if !config.allowed_ports.contains(&port) {
        return Ok(format!("{method} {url}: refused (port {port} not allowed)"));
    }
    if !table.routes_host(&host) {
        return Ok(format!(
            "{method} {url}: no route names {host}: {}",
            match config.other_hosts {
                crate::config::OtherHosts::Tunnel => "tunnelled blind, Authorization untouched",
                crate::config::OtherHosts::Deny => "refused (403)",
            }
        ));
    }
    let Some(index) = table.find_in(&host, parsed.path(), &method, allowed) else {
        if let Some(i) = table.find(&host, parsed.path(), &method) {
            let route = table.get(i).map_or("?", |r| r.name.as_str());
            return Ok(format!(
                "{method} {url}{who}: refused (403): client `{}` may not use route `{route}`",
                client.unwrap_or("-")
            ));
        }
        return Ok(format!(
            "{method} {url}: {host} is routed but no rule matches this path/method: {}",
            match config.unmatched {
                crate::config::Unmatched::Forward => "forwarded unchanged",
                crate::config::Unmatched::Deny => "refused (403)",
            }
        ));
    };
    let route = table
        .get(index)
        .ok_or_else(|| CliError::Other("route table is inconsistent".into()))?;
    let what = match &route.action {
        Action::Access { identity } => {
            let sa = config
                .identities
                .get(identity)
                .map(|i| i.service_account.as_str())
                .unwrap_or("?");
            format!("access token of `{identity}` ({sa})")
        }
        Action::IdToken {
            identity, audience, ..
        } => {
            let sa = config
                .identities
                .get(identity)
                .map(|i| i.service_account.as_str())
                .unwrap_or("?");
            format!("ID token of `{identity}` ({sa}) for audience {audience}")
        }
        Action::Passthrough => "forwarded with its own Authorization (passthrough)".into(),
    };
    Ok(format!(
        "{method} {url}{who}: route `{}` → {what}",
        route.name
    ))
}

/// `token`: mint once and print, like `gcloud auth print-access-token`.
pub async fn token(
    config_path: &Path,
    identity: &str,
    audience: Option<&str>,
) -> Result<(), CliError> {
    let config = Config::load(config_path)?;
    let id = config.identities.get(identity).ok_or_else(|| {
        CliError::Other(format!(
            "no identity `{identity}` in {} (have: {})",
            config_path.display(),
            config
                .identities
                .keys()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    let spec = match audience {
        Some(aud) => TokenSpec::id_token(id, aud, true),
        None => TokenSpec::access(id),
    };
    let engine = TokenEngine::from_config(&config).await?;
    let header = engine.slot(spec).authorization().await?;
    let value = header
        .to_str()
        .map_err(|_| CliError::Other("the minted token is not printable".into()))?;
    // Printing the token is this command's whole purpose, on the user's own terminal.
    println!("{}", value.strip_prefix("Bearer ").unwrap_or(value));
    Ok(())
}

/// `hash-password`: one line from stdin → an Argon2id hash in PHC form on stdout.
pub fn hash_password() -> Result<(), CliError> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| CliError::Other(format!("cannot read stdin: {e}")))?;
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        return Err(CliError::Other("an empty password".into()));
    }
    println!(
        "{}",
        crate::clients::hash(password).map_err(CliError::Other)?
    );
    Ok(())
}

/// `ca init`.
pub fn ca_init(config_path: &Path, force: bool) -> Result<(), CliError> {
    let ca_cfg = if config_path.exists() {
        Config::load(config_path)?.ca
    } else {
        Config::default().ca
    };
    CertificateAuthority::create(&ca_cfg.cert, &ca_cfg.key, force)?;
    println!(
        "created {} and {} (key mode 0600)",
        ca_cfg.cert.display(),
        ca_cfg.key.display()
    );
    for warning in crate::ca::permission_warnings(&ca_cfg.cert, &ca_cfg.key) {
        eprintln!("warning: {warning}");
    }
    Ok(())
}

/// `env`: export lines for every kind of client, with a merged bundle next to the CA.
pub fn env(config_path: &Path, format: crate::onboard::Format) -> Result<(), CliError> {
    use crate::onboard;
    let config = Config::load(config_path)?;
    let ca = CertificateAuthority::load_or_create(&config.ca)?;
    let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let files = onboard::Files::beside(&abs(&config.ca.cert));
    ca.write_bundle(&files.bundle)?;
    std::fs::write(&files.boto, onboard::boto(&config, &files))
        .map_err(|e| CliError::Other(format!("{}: {e}", files.boto.display())))?;
    let java = onboard::write_truststore(&files);
    print!(
        "{}",
        onboard::render(&onboard::lines(&config, &files, &java), format)
    );
    Ok(())
}

/// `emulator`: serve until Ctrl-C.
pub async fn emulator(policy_path: &Path, listen: SocketAddr) -> Result<(), CliError> {
    let policy = crate::emulator::Policy::load(policy_path)
        .map_err(|e| CliError::Other(format!("{}: {e}", policy_path.display())))?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| CliError::Other(format!("cannot listen on {listen}: {e}")))?;
    let handle = crate::emulator::start(listener, policy)
        .await
        .map_err(|e| CliError::Other(e.to_string()))?;
    tracing::info!(url = %handle.url(), "emulator serving");
    wait_for_ctrl_c().await;
    handle.shutdown().await;
    Ok(())
}

/// `run`: config → CA → tokens → sockets, then serve until Ctrl-C/SIGTERM and drain.
/// `workers` (the `--workers` flag) overrides `limits.workers`.
pub async fn run(config_path: &Path, workers: Option<usize>) -> Result<(), CliError> {
    let mut config = Config::load(config_path)?;
    if let Some(n) = workers {
        // Same meaning and bounds as the key: 0 is one per core, over 1024 is refused.
        config.limits.workers = n;
        config.validate("--workers")?;
    }
    let mut server = crate::server::Server::start(config).await?;
    server.enable_reload(config_path.to_path_buf(), workers);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(mut hup) => {
                let state = server.state().clone();
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        let _ = crate::reload::reload(&state, "SIGHUP").await;
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reload with POST /reload")
            }
        }
    }
    // Only once the SIGHUP, SIGTERM and SIGINT handlers are in place: from here on SIGHUP
    // reloads and SIGTERM drains, never kill.
    let stop = shutdown_signal();
    tracing::info!(listen = %server.proxy_addr(), "impersonate-proxy serving");
    stop.await;
    tracing::info!("shutting down: draining connections");
    server.shutdown().await;
    Ok(())
}

/// Ctrl-C or SIGTERM (what Kubernetes sends).
pub async fn wait_for_ctrl_c() {
    shutdown_signal().await
}

/// Ctrl-C or SIGTERM, with both handlers installed now, before the future is first polled: a
/// caller that announces it is serving and then waits can no longer be killed by a signal that
/// arrives in between (seen under load in tests/gateway.rs).
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate()).ok();
        let int = signal(SignalKind::interrupt()).ok();
        async move {
            match (term, int) {
                (Some(mut term), Some(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
