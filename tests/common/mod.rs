//! Test support: the sandbox (emulator + TLS origin + proxy) on port 0, clients, raw sockets.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod nginx;

use std::net::SocketAddr;
use std::path::PathBuf;
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

/// The python of a venv under `target/NAME` that can `import` each of `modules`, made (and the
/// `packages` installed from PyPI) on first use, so a plain `cargo test` on a fresh machine
/// sets it up once.
pub async fn python_venv(name: &str, modules: &str, packages: &[&str]) -> PathBuf {
    // Tests of one binary run at once: one of them installs, the others wait for it.
    static INSTALL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one_at_a_time = INSTALL.lock().await;
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(name);
    let python = venv.join("bin/python");
    let ready = tokio::process::Command::new(&python)
        .args(["-c", &format!("import {modules}")])
        .status()
        .await
        .map(|s| s.success())
        .unwrap_or(false);
    if !ready {
        let ok = tokio::process::Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .status()
            .await
            .unwrap();
        assert!(ok.success(), "python3 -m venv failed");
        let out = tokio::process::Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(packages)
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "pip install {packages:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    python
}

/// A TLS session with the proxy's interception of `host:443`, as a client sees it: CONNECT,
/// then TLS trusting only the proxy's CA, offering `alpn`. For requests no ordinary client
/// would send.
pub async fn tls_via_proxy(
    sb: &Sandbox,
    host: &str,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut tcp = tokio::net::TcpStream::connect(sb.server.proxy_addr())
        .await
        .unwrap();
    tcp.write_all(format!("CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let answer = read_head(&mut tcp).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap();
    proxy_tls(sb, alpn).connect(name, tcp).await.unwrap()
}

/// A TLS client trusting only the proxy's CA, offering `alpn`.
pub fn proxy_tls(sb: &Sandbox, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(sb.ca_path()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
}

/// Read an HTTP/1.1 head, byte by byte, up to and including its blank line.
pub async fn read_head(io: &mut (impl AsyncReadExt + Unpin)) -> String {
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        if io.read(&mut b).await.unwrap() == 0 {
            break;
        }
        got.push(b[0]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Every log line the process writes, kept for a test to read. One per test binary: it
/// installs the process-wide subscriber.
#[derive(Clone, Default)]
pub struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Capture {
    /// Install a subscriber with `filter` (an `EnvFilter` directive) writing here.
    pub fn install(filter: &str) -> Capture {
        let capture = Capture::default();
        let writer = capture.clone();
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .init();
        capture
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A fresh temp directory holding a throwaway CA and a leaf it signed for `names`, as the PEM
/// files third-party servers read: `chain.pem` (leaf, then CA), `key.pem`, `ca.pem`.
pub fn cert_dir(prefix: &str, names: &[&str]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "{prefix}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let certs = impersonate_proxy::origin::test_certificates(names).unwrap();
    for (name, pem) in [
        ("chain.pem", &certs.chain_pem),
        ("key.pem", &certs.key_pem),
        ("ca.pem", &certs.ca_pem),
    ] {
        std::fs::write(dir.join(name), pem).unwrap();
    }
    dir
}

/// Start a server that prints the port it bound on its first line; the child dies with its
/// handle.
pub async fn spawn_printing_port(
    mut cmd: tokio::process::Command,
) -> (tokio::process::Child, SocketAddr) {
    use tokio::io::AsyncBufReadExt;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines
        .next_line()
        .await
        .unwrap()
        .expect("the server printed its port");
    let port: u16 = line.trim().parse().unwrap();
    (child, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// A config file for the running sandbox: its restart-only settings as they are, with
/// `rest` (identities, routes, clients) after them.
pub fn config_file(c: &Config, rest: &str) -> String {
    let mut s = format!("listen: {}\n", c.listen);
    match c.admin {
        Some(a) => s.push_str(&format!("admin: {a}\n")),
        None => s.push_str("admin: null\n"),
    }
    s.push_str(&format!(
        "ca: {{ cert: \"{}\", key: \"{}\" }}\n",
        c.ca.cert.display(),
        c.ca.key.display()
    ));
    if let impersonate_proxy::config::SourceConfig::File(p) = &c.source {
        s.push_str(&format!("source: {{ file: \"{}\" }}\n", p.display()));
    }
    s.push_str(&format!("iam: {{ endpoint: \"{}\" }}\n", c.iam.endpoint));
    s.push_str("upstream:\n  system_roots: false\n  extra_roots:\n");
    for r in &c.upstream.extra_roots {
        s.push_str(&format!("    - \"{}\"\n", r.display()));
    }
    s.push_str("  resolve:\n");
    for (k, v) in &c.upstream.resolve {
        s.push_str(&format!("    \"{k}\": \"{v}\"\n"));
    }
    s.push_str(&format!(
        "tokens: {{ jitter: 1s, safety_window: 5s }}\nreload: {{ watch: {}, interval: {}ms }}\n",
        c.reload.watch,
        c.reload.interval.as_millis()
    ));
    s.push_str(rest);
    s
}

/// A request builder for `path` on the sandbox's admin port, never through a proxy the
/// environment names.
pub fn admin(sb: &Sandbox, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    let addr = sb
        .server
        .admin_addr()
        .expect("the sandbox has an admin port");
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .request(method, format!("http://{addr}{path}"))
}
