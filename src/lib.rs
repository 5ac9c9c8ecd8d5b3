//! impersonate-proxy: a forward proxy that replaces the `Authorization` header of requests to
//! Google APIs with short-lived tokens of impersonated service accounts.
//!
//! # Layout
//!
//! - [`config`]: the YAML schema, defaults, `validate()` and loading.
//! - [`yaml`]: the bounded YAML reader behind the config and the emulator's policy.
//! - [`routes`]: the compiled route table: host and path patterns and methods → action.
//! - [`ca`]: the local CA in `certs/`, leaf certificates per SNI name, rustls server configs.
//! - [`tokens`]: the source credential, the IAM Credentials client, the token cache and refresher.
//! - [`proxy`]: accept loop, CONNECT, interception or tunnel, request rewrite, upstream client.
//! - [`server`]: start-up assembly: config → CA → tokens → sockets; used by `run`, demo, tests.
//! - [`cli`]: the bodies of the CLI commands, with their exit codes.
//! - [`demo`]: the offline demo.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics`, `POST /reload`.
//! - [`clients`]: gateway mode: proxy authentication, and which routes each client may use.
//! - [`metrics`]: `/metrics`: the counters and histograms, their label handles resolved when
//!   the config compiles, and the OpenMetrics text.
//! - [`reload`]: reloading the config (SIGHUP, `/reload`, the file watch) without dropping a
//!   connection.
//! - [`emulator`]: an offline IAM Credentials + OAuth2 + metadata server with Google's semantics.
//! - [`facade`]: what Google's client libraries need to run unchanged: placeholder credentials.
//! - [`onboard`]: `env`: the lines and files each client family needs to use and trust the proxy.
//! - [`metadata`]: the GCE metadata-server protocol, served by the emulator and the facade.
//! - [`origin`]: a local TLS origin standing in for `*.googleapis.com` (demo, tests, benches).
//! - `fuzzing`: doors for the fuzz targets under `fuzz/` to parsers private to their modules;
//!   hidden, not an API.

pub mod admin;
pub mod ca;
pub mod cli;
pub mod clients;
pub mod config;
pub mod demo;
pub mod emulator;
pub mod facade;
#[doc(hidden)]
pub mod fuzzing;
pub mod metadata;
pub mod metrics;
pub mod onboard;
pub mod origin;
pub mod proxy;
pub mod reload;
pub mod routes;
pub mod server;
pub mod tokens;
pub mod yaml;

/// Install aws-lc-rs as rustls' process-wide provider. Several crates in the tree enable
/// rustls features, so rustls cannot pick one by itself; every entry point calls this first.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is what we want.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// An error and its sources on one line, for logs and client-facing messages.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
