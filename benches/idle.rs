//! Idle connections: what holding many intercepted keep-alive connections costs the proxy in
//! memory, and what it gives back when they close (the gateway case: many batch jobs, each
//! with a connection open between requests). It prints figures and asserts nothing; it is
//! never part of `cargo test`. Speed is measured by the shared harness (`../shared/bench/`),
//! which cannot hold thousands of idle connections; this tool measures only memory.
//!
//! cargo bench --bench idle                         # 10,000 connections, HTTP/1.1
//! IDLE_CONNS=5000 IDLE_H2=1 cargo bench --bench idle
//! IDLE_PROXY_BIN=/tmp/other-build cargo bench --bench idle   # another build, for A/B runs
//!
//! The real `impersonate-proxy` binary runs as a subprocess, so its memory is read from
//! /proc alone, between this tool (the clients) and a local TLS origin. Each client does
//! CONNECT, the TLS handshake with the proxy's leaf and one request with its response read
//! to the end, then stays open and silent. Resident memory (anonymous and file-backed, from
//! /proc/PID/status) is read after one warm-up request, with every connection held, and after
//! they have all closed and the proxy has let go of their sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use impersonate_proxy::emulator::{self, Policy};
use impersonate_proxy::origin::Origin;
use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HOST: &str = "storage.googleapis.com";

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Resident memory of a process in KiB: (total, anonymous, file-backed).
fn rss(pid: u32) -> (u64, u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("RssAnon:"), field("RssFile:"))
}

/// Open sockets of a process (its descriptors that are sockets).
fn sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .map(|t| t.to_string_lossy().starts_with("socket:"))
                        .unwrap_or(false)
                })
                .count()
        })
        .unwrap_or(0)
}

fn client_tls(ca_pem: &str, h2: bool) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![if h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    Arc::new(cfg)
}

/// The connection's end after CONNECT, TLS and one answered request, left open: an HTTP/1.1
/// stream, or an h2 sender whose connection task runs on.
enum Held {
    H1(#[allow(dead_code)] Box<tokio_rustls::client::TlsStream<TcpStream>>),
    H2(
        #[allow(dead_code)]
        hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
        tokio::task::JoinHandle<()>,
    ),
}

async fn open(
    proxy: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    h2: bool,
) -> std::io::Result<Held> {
    let mut tcp = TcpStream::connect(proxy).await?;
    tcp.set_nodelay(true)?;
    tcp.write_all(format!("CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n").as_bytes())
        .await?;
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::Error::other("proxy closed during CONNECT"));
        }
        got.extend_from_slice(&buf[..n]);
    }
    if !got.starts_with(b"HTTP/1.1 200") {
        return Err(std::io::Error::other("CONNECT refused"));
    }
    let mut s = tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::try_from(HOST).unwrap(), tcp)
        .await?;
    if h2 {
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(s),
        )
        .await
        .map_err(std::io::Error::other)?;
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = http::Request::get(format!("https://{HOST}/storage/v1/b/idle/o"))
            .header("authorization", "Bearer client-junk")
            .body(http_body_util::Empty::new())
            .unwrap();
        let resp = send
            .send_request(req)
            .await
            .map_err(std::io::Error::other)?;
        if resp.status() != 200 {
            return Err(std::io::Error::other(format!("status {}", resp.status())));
        }
        http_body_util::BodyExt::collect(resp.into_body())
            .await
            .map_err(std::io::Error::other)?;
        return Ok(Held::H2(send, task));
    }
    s.write_all(
        format!(
            "GET /storage/v1/b/idle/o HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer client-junk\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    // The origin's answers carry Content-Length: read the head, then exactly that much body.
    let mut got = Vec::new();
    let head_end = loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::Error::other("closed before the response"));
        }
        got.extend_from_slice(&buf[..n]);
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&got[..head_end]).to_ascii_lowercase();
    if !head.starts_with("http/1.1 200") {
        return Err(std::io::Error::other("not a 200"));
    }
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other("no content-length"))?;
    while got.len() < head_end + len {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::Error::other("closed during the body"));
        }
        got.extend_from_slice(&buf[..n]);
    }
    Ok(Held::H1(Box::new(s)))
}

fn main() {
    impersonate_proxy::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let n: usize = env("IDLE_CONNS", 10_000);
    let h2: bool = env::<u8>("IDLE_H2", 0) == 1;
    let dir = std::env::temp_dir().join(format!("ip-idle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let emu = emulator::start(
        l,
        Policy::from_yaml(impersonate_proxy::demo::POLICY).unwrap(),
    )
    .await
    .unwrap();
    let origin = Origin::start(&[HOST], None).await.unwrap();
    std::fs::write(dir.join("origin-ca.pem"), origin.ca_pem()).unwrap();
    let port = {
        let s = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    // The limits leave every connection open for the whole run: no idle close, no cap.
    let config = format!(
        r#"listen: 127.0.0.1:{port}
admin: null
ca: {{ cert: "{d}/ca.pem", key: "{d}/ca-key.pem" }}
source: {{ file: "{d}/adc.json" }}
iam: {{ endpoint: "http://{emu}" }}
identities:
  dev: {{ service_account: dev@demo-project.iam.gserviceaccount.com }}
routes:
  - {{ host: "*.googleapis.com", identity: dev }}
upstream:
  system_roots: false
  extra_roots: ["{d}/origin-ca.pem"]
  resolve: {{ "{HOST}:443": "{origin}" }}
limits: {{ max_connections: {cap}, idle_timeout: 1h }}
"#,
        d = dir.display(),
        emu = emu.addr(),
        origin = origin.addr(),
        cap = n + 100,
    );
    let adc = serde_json::json!({
        "type": "authorized_user", "client_id": "demo-client.apps.example.com",
        "client_secret": "demo-secret", "refresh_token": "demo-refresh-token",
        "token_uri": format!("http://{}/token", emu.addr()),
    });
    std::fs::write(dir.join("adc.json"), adc.to_string()).unwrap();
    let cfg_path: PathBuf = dir.join("config.yaml");
    std::fs::write(&cfg_path, config).unwrap();
    let bin = std::env::var_os("IDLE_PROXY_BIN").map_or_else(
        || env!("CARGO_BIN_EXE_impersonate-proxy").into(),
        PathBuf::from,
    );
    let mut proxy = std::process::Command::new(&bin)
        .args(["run", "--config"])
        .arg(&cfg_path)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("proxy.log")).unwrap())
        .spawn()
        .expect("start the proxy");
    let pid = proxy.id();
    let proxy_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    for _ in 0..600 {
        if TcpStream::connect(proxy_addr).await.is_ok() && dir.join("ca.pem").exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ca = std::fs::read_to_string(dir.join("ca.pem")).unwrap_or_else(|_| {
        let log = std::fs::read_to_string(dir.join("proxy.log")).unwrap_or_default();
        panic!("the proxy did not start:\n{log}")
    });
    let tls = client_tls(&ca, h2);

    // Warm: the token is minted, the leaf made and the upstream connection open.
    let warm = open(proxy_addr, tls.clone(), h2)
        .await
        .expect("warm-up request");
    drop(warm);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base_sockets = sockets(pid);
    let base = rss(pid);

    let rounds: usize = env("IDLE_ROUNDS", 2);
    println!(
        "\nidle: {n} intercepted {} keep-alive connections held, then closed, {rounds} times; \
         proxy {}\n",
        if h2 { "h2" } else { "HTTP/1.1" },
        bin.display()
    );
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>8}",
        "", "RSS KiB", "anon KiB", "file KiB", "sockets"
    );
    let row = |label: &str, (t, a, f): (u64, u64, u64), s: usize| {
        println!("{label:<28} {t:>10} {a:>10} {f:>10} {s:>8}");
    };
    row("after one warm-up request", base, base_sockets);
    let mut per_conn = Vec::new();
    for r in 1..=rounds {
        let (count, failed, held, after) = round(proxy_addr, &tls, h2, n, pid, base_sockets).await;
        row(
            &format!("round {r}: {count} held ({failed} failed)"),
            held.0,
            held.1,
        );
        row(&format!("round {r}: all closed"), after.0, after.1);
        per_conn.push(held.0 .0.saturating_sub(base.0) as f64 / count.max(1) as f64);
    }
    let hwm = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .unwrap_or_default();
    let last = rss(pid);
    println!(
        "\nper held connection (RSS while held minus the warm-up figure, over the connections): {} KiB; \
         after the last close, {:.1} MiB above the warm-up figure; peak (VmHWM) {hwm} KiB",
        per_conn
            .iter()
            .map(|k| format!("{k:.1}"))
            .collect::<Vec<_>>()
            .join(", "),
        last.0.saturating_sub(base.0) as f64 / 1024.0,
    );

    // SIGTERM, so that a build run under a profiler (valgrind's massif, say) writes its output.
    let _ = std::process::Command::new("kill")
        .arg(pid.to_string())
        .status();
    for _ in 0..200 {
        if matches!(proxy.try_wait(), Ok(Some(_))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = proxy.kill();
    let _ = proxy.wait();
    origin.shutdown();
    emu.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

type Reading = ((u64, u64, u64), usize);

/// Open `n` connections in waves of 100 at once (as a fleet's jobs would arrive), read the
/// proxy's memory with all of them held, close them, wait for the proxy to let go of their
/// sockets and read it again.
async fn round(
    proxy: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    h2: bool,
    n: usize,
    pid: u32,
    base_sockets: usize,
) -> (usize, usize, Reading, Reading) {
    let mut held = Vec::with_capacity(n);
    let mut failed = 0usize;
    while held.len() + failed < n {
        let wave = (n - held.len() - failed).min(100);
        let mut js = tokio::task::JoinSet::new();
        for _ in 0..wave {
            js.spawn(open(proxy, tls.clone(), h2));
        }
        while let Some(r) = js.join_next().await {
            match r {
                Ok(Ok(h)) => held.push(h),
                _ => failed += 1,
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let at_peak = (rss(pid), sockets(pid));
    let count = held.len();
    for h in held {
        if let Held::H2(_, task) = h {
            task.abort();
        }
    }
    for _ in 0..200 {
        if sockets(pid) <= base_sockets + 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(env("IDLE_SETTLE_SECS", 2))).await;
    (count, failed, at_peak, (rss(pid), sockets(pid)))
}
