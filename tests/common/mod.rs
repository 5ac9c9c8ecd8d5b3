//! Test support: the sandbox (emulator + TLS origin + proxy) on port 0, clients, raw sockets.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use impersonate_proxy::config::Config;
pub use impersonate_proxy::demo::{Sandbox, POLICY};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const READER: &str = "reader@demo-project.iam.gserviceaccount.com";
pub const DEV: &str = "dev@demo-project.iam.gserviceaccount.com";
pub const JOBS: &str = "bq-jobs@demo-project.iam.gserviceaccount.com";

pub fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

pub async fn sandbox() -> Sandbox {
    sandbox_with(|_| {}).await
}

pub async fn sandbox_with(tweak: impl FnOnce(&mut Config)) -> Sandbox {
    Sandbox::start(any_port(), POLICY, tweak)
        .await
        .expect("sandbox starts")
}

/// Send raw bytes to the proxy and read until it closes or `limit` passes.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Run curl through the proxy with explicit CA settings (the machine's env points the CA
/// variables at the system bundle, so each is set here rather than inherited). Async: the
/// proxy under test runs on the same runtime.
pub async fn curl(sb: &Sandbox, args: &[&str]) -> std::process::Output {
    let ca = sb.ca_path();
    tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "--proxy",
            &sb.proxy_url(),
            "--cacert",
        ])
        .arg(&ca)
        .args(args)
        .env("SSL_CERT_FILE", &ca)
        .env("CURL_CA_BUNDLE", &ca)
        .env("REQUESTS_CA_BUNDLE", &ca)
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .await
        .expect("curl runs")
}

/// Peak resident memory of this process so far, in KiB.
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

pub async fn json(resp: reqwest::Response) -> serde_json::Value {
    resp.json().await.expect("JSON body")
}
