//! End-to-end load: the real `impersonate-proxy` binary (a subprocess, so its CPU can be read
//! from /proc) between this tool and the local TLS origin, against the same origin reached
//! directly in the same run. Loopback only; every phase is bounded in time.
//!
//! Shared machines are noisy, so each mode runs `LOAD_ROUNDS` rounds of a direct phase, a
//! phase through the proxy and a phase through its blind tunnel, back to back (the order
//! alternating), and the table gives the median of the rounds' figures.
//!
//! cargo bench --bench load                 # 3 rounds of 2 s phases
//! LOAD_SECS=5 LOAD_ROUNDS=5 cargo bench --bench load   # steadier
//! LOAD_PROXY_WORKERS=1 cargo bench --bench load   # the proxy's runtime threads
//! LOAD_MODES=one,h2 cargo bench --bench load      # only some modes
//! LOAD_PROXY_BIN=/tmp/old-build cargo bench --bench load  # another build of the proxy
//!
//! Modes: keep-alive with 64 connections; one connection (latency); a new connection per
//! request (16 workers); h2 with 100 concurrent streams on one connection. Each mode is also
//! run through the proxy's blind tunnel (CONNECT to a host no route names): that adds the same
//! process hops as interception but no work of the proxy's own, so it is a practical ceiling
//! for any proxy on this machine, and at one connection the floor that its cross-process
//! wake-ups put under the added latency.
//!
//! Besides the proxy's CPU per request, each row gives this tool's own (its clients and the
//! origin together) in the direct phase and in the row's phase, and how much of the machine
//! sat idle: on a machine the three share, what the proxy makes the tool spend and the time
//! nobody runs are as much a part of the ratio as the proxy's own CPU.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use impersonate_proxy::emulator::{self, Policy};
use impersonate_proxy::origin::Origin;
use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HOST: &str = "storage.googleapis.com";
/// A host no route names: the proxy tunnels it blind to the same origin.
const TUNNEL_HOST: &str = "tunnel.example";
const PATH: &str = "/storage/v1/b/prod-bench/o";

#[derive(Clone)]
struct Target {
    /// Where TCP goes: the proxy, or the origin directly.
    addr: SocketAddr,
    via_proxy: bool,
    /// The name CONNECT asks for and TLS verifies.
    host: &'static str,
    tls: Arc<rustls::ClientConfig>,
    tls_h2: Arc<rustls::ClientConfig>,
}

async fn open(t: &Target, h2: bool) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut tcp = TcpStream::connect(t.addr).await?;
    tcp.set_nodelay(true)?;
    if t.via_proxy {
        tcp.write_all(
            format!(
                "CONNECT {h}:443 HTTP/1.1\r\nHost: {h}:443\r\n\r\n",
                h = t.host
            )
            .as_bytes(),
        )
        .await?;
        let mut buf = [0u8; 512];
        let mut got = Vec::new();
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
    }
    let cfg = if h2 { t.tls_h2.clone() } else { t.tls.clone() };
    tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from(t.host).unwrap(), tcp)
        .await
}

fn request() -> http::Request<Empty<Bytes>> {
    http::Request::get(PATH)
        .header("host", HOST)
        .header("authorization", "Bearer client-junk")
        .body(Empty::new())
        .unwrap()
}

#[derive(Default)]
struct Tally {
    lat_us: Vec<u32>,
    errors: u64,
}

async fn http1_conn(t: &Target, until: Instant, close_each: bool, tally: &mut Tally) {
    loop {
        let tls = open(t, false).await;
        if let Err(e) = &tls {
            if tally.errors == 0 {
                eprintln!("connect via_proxy={}: {e}", t.via_proxy);
            }
        }
        let Ok(tls) = tls else {
            tally.errors += 1;
            if Instant::now() >= until {
                return;
            }
            continue;
        };
        let Ok((mut send, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await
        else {
            tally.errors += 1;
            continue;
        };
        let driver = tokio::spawn(conn);
        loop {
            if Instant::now() >= until {
                driver.abort();
                return;
            }
            let start = Instant::now();
            let mut req = request();
            if close_each {
                req.headers_mut()
                    .insert("connection", http::HeaderValue::from_static("close"));
            }
            match send.send_request(req).await {
                Ok(resp) => {
                    let ok = resp.status() == 200;
                    let _ = resp.into_body().collect().await;
                    if ok {
                        tally.lat_us.push(start.elapsed().as_micros() as u32);
                    } else {
                        tally.errors += 1;
                    }
                }
                Err(e) => {
                    if tally.errors == 0 {
                        eprintln!("request via_proxy={}: {e}", t.via_proxy);
                    }
                    tally.errors += 1;
                    break;
                }
            }
            if close_each {
                break;
            }
        }
        driver.abort();
    }
}

async fn h2_conn(t: &Target, until: Instant, streams: usize) -> Tally {
    let tls = open(t, true).await.expect("h2 connection");
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("h2 handshake");
    let driver = tokio::spawn(conn);
    let workers: Vec<_> = (0..streams)
        .map(|_| {
            let mut send = send.clone();
            tokio::spawn(async move {
                let mut tally = Tally::default();
                while Instant::now() < until {
                    let start = Instant::now();
                    match send.send_request(request()).await {
                        Ok(resp) if resp.status() == 200 => {
                            let _ = resp.into_body().collect().await;
                            tally.lat_us.push(start.elapsed().as_micros() as u32);
                        }
                        _ => tally.errors += 1,
                    }
                }
                tally
            })
        })
        .collect();
    let mut all = Tally::default();
    for w in workers {
        let t = w.await.unwrap();
        all.lat_us.extend(t.lat_us);
        all.errors += t.errors;
    }
    driver.abort();
    all
}

fn print_row(label: &str, r: &Rounds) {
    println!(
        "{:<26} {:>10.0} {:>10.0} {:>7.2} {:>8.0} {:>8.0} {:>9.0} {:>11.1} µs {:>7.1} → {:>5.1} µs {:>5.0}% → {:>3.0}%{}",
        label,
        r.direct_rps,
        r.proxy_rps,
        r.ratio,
        r.direct_p50,
        r.proxy_p50,
        r.proxy_p99,
        r.cpu_per_req_us,
        r.tool_direct_us,
        r.tool_proxy_us,
        r.idle_direct * 100.0,
        r.idle * 100.0,
        if r.errors > 0 {
            format!("  (errors: {})", r.errors)
        } else {
            String::new()
        }
    );
}

/// The medians of a mode's rounds.
struct Rounds {
    direct_rps: f64,
    proxy_rps: f64,
    ratio: f64,
    direct_p50: f64,
    proxy_p50: f64,
    proxy_p99: f64,
    added_p50: f64,
    cpu_per_req_us: f64,
    /// The load tool's own CPU per request: direct, and in this phase.
    tool_direct_us: f64,
    tool_proxy_us: f64,
    /// Machine idle share in the direct phase and in this phase.
    idle_direct: f64,
    idle: f64,
    errors: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `rounds` rounds of a direct phase and one phase per proxied target, back to back; odd
/// rounds run them in reverse order so slow drift on the machine favours no side. Every
/// proxied figure is taken against the direct phase of its own round.
async fn rounds_of(
    direct: &Target,
    vias: &[&Target],
    mode: &str,
    secs: f64,
    rounds: usize,
    pid: u32,
) -> Vec<Rounds> {
    let mut cols: Vec<[Vec<f64>; 12]> = vias.iter().map(|_| Default::default()).collect();
    let mut errors = vec![0; vias.len()];
    for round in 0..rounds {
        // Index 0 is the direct phase, 1.. the proxied targets.
        let mut order: Vec<usize> = (0..=vias.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        let mut results: Vec<Option<(Phase, f64)>> = (0..=vias.len()).map(|_| None).collect();
        for i in order {
            let target = if i == 0 { direct } else { vias[i - 1] };
            let cpu0 = cpu_secs(pid);
            let p = phase(target, mode, secs).await;
            results[i] = Some((p, cpu_secs(pid) - cpu0));
        }
        let (d, _) = results[0].take().unwrap();
        for (k, slot) in results.into_iter().skip(1).enumerate() {
            let (p, cpu) = slot.unwrap();
            errors[k] += d.errors + p.errors;
            let row = [
                d.rps,
                p.rps,
                p.rps / d.rps.max(1.0),
                f64::from(d.p50),
                f64::from(p.p50),
                f64::from(p.p99),
                f64::from(p.p50) - f64::from(d.p50),
                cpu * 1e6 / (p.requests.max(1) as f64),
                d.tool_cpu_us,
                p.tool_cpu_us,
                d.idle,
                p.idle,
            ];
            for (col, v) in cols[k].iter_mut().zip(row) {
                col.push(v);
            }
        }
    }
    cols.into_iter()
        .zip(errors)
        .map(|(c, errors)| {
            let [a, b, c, d, e, f, g, h, i, j, k, l] = c.map(median);
            Rounds {
                direct_rps: a,
                proxy_rps: b,
                ratio: c,
                direct_p50: d,
                proxy_p50: e,
                proxy_p99: f,
                added_p50: g,
                cpu_per_req_us: h,
                tool_direct_us: i,
                tool_proxy_us: j,
                idle_direct: k,
                idle: l,
                errors,
            }
        })
        .collect()
}

struct Phase {
    rps: f64,
    p50: u32,
    p99: u32,
    errors: u64,
    requests: usize,
    /// This process's CPU (the clients and the origin) per request, in µs.
    tool_cpu_us: f64,
    /// The share of the machine's CPU time that went idle during the phase.
    idle: f64,
}

async fn phase(t: &Target, mode: &str, secs: f64) -> Phase {
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let (tool0, idle0) = (cpu_secs(std::process::id()), machine_ticks());
    let mut all = match mode {
        "h2" => h2_conn(t, until, 100).await,
        _ => {
            let (conns, close) = match mode {
                "keepalive" => (64, false),
                "one" => (1, false),
                _ => (16, true),
            };
            let tasks: Vec<_> = (0..conns)
                .map(|_| {
                    let t = t.clone();
                    tokio::spawn(async move {
                        let mut tally = Tally::default();
                        http1_conn(&t, until, close, &mut tally).await;
                        tally
                    })
                })
                .collect();
            let mut all = Tally::default();
            for task in tasks {
                let r = task.await.unwrap();
                all.lat_us.extend(r.lat_us);
                all.errors += r.errors;
            }
            all
        }
    };
    let elapsed = started.elapsed().as_secs_f64();
    let tool = cpu_secs(std::process::id()) - tool0;
    let (idle1, total1) = machine_ticks();
    let idle = (idle1 - idle0.0) / (total1 - idle0.1).max(1.0);
    all.lat_us.sort_unstable();
    let pct = |p: f64| {
        all.lat_us
            .get(((all.lat_us.len() as f64 * p) as usize).min(all.lat_us.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    Phase {
        rps: all.lat_us.len() as f64 / elapsed,
        p50: pct(0.50),
        p99: pct(0.99),
        errors: all.errors,
        requests: all.lat_us.len(),
        tool_cpu_us: tool * 1e6 / (all.lat_us.len().max(1) as f64),
        idle,
    }
}

/// Idle and total CPU ticks of the whole machine, from the first line of /proc/stat.
fn machine_ticks() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait …: idle and iowait count as idle.
    let idle = ticks.get(3).copied().unwrap_or(0.0) + ticks.get(4).copied().unwrap_or(0.0);
    (idle, ticks.iter().sum())
}

/// utime + stime of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn client_tls(ca_pem: &str, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    impersonate_proxy::install_crypto_provider();
    let secs: f64 = std::env::var("LOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let rounds: usize = std::env::var("LOAD_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(secs, rounds));
}

async fn run(secs: f64, rounds: usize) {
    let dir = std::env::temp_dir().join(format!("ip-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let emu = emulator::start(
        l,
        Policy::from_yaml(impersonate_proxy::demo::POLICY).unwrap(),
    )
    .await
    .unwrap();
    let origin = Origin::start(&[HOST, TUNNEL_HOST], None).await.unwrap();
    std::fs::write(dir.join("origin-ca.pem"), origin.ca_pem()).unwrap();
    let port = {
        let s = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
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
  resolve: {{ "{HOST}:443": "{origin}", "{TUNNEL_HOST}:443": "{origin}" }}
limits: {{ max_connections: 20000 }}
"#,
        d = dir.display(),
        emu = emu.addr(),
        origin = origin.addr(),
    );
    let adc = serde_json::json!({
        "type": "authorized_user", "client_id": "demo-client.apps.example.com",
        "client_secret": "demo-secret", "refresh_token": "demo-refresh-token",
        "token_uri": format!("http://{}/token", emu.addr()),
    });
    std::fs::write(dir.join("adc.json"), adc.to_string()).unwrap();
    let cfg_path: PathBuf = dir.join("config.yaml");
    std::fs::write(&cfg_path, config).unwrap();
    let bin = std::env::var_os("LOAD_PROXY_BIN").map_or_else(
        || env!("CARGO_BIN_EXE_impersonate-proxy").into(),
        PathBuf::from,
    );
    let mut cmd = std::process::Command::new(bin);
    cmd.args(["run", "--config"]).arg(&cfg_path);
    if let Ok(w) = std::env::var("LOAD_PROXY_WORKERS") {
        cmd.args(["--workers", &w]);
    }
    let mut proxy = cmd
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("proxy.log")).unwrap())
        .spawn()
        .expect("start the proxy");
    let pid = proxy.id();
    let proxy_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // Up to a minute: a build run under valgrind (see the README) starts slowly.
    for _ in 0..1200 {
        if TcpStream::connect(proxy_addr).await.is_ok() && dir.join("ca.pem").exists() {
            break;
        }
        if matches!(proxy.try_wait(), Ok(Some(_))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let Ok(proxy_ca) = std::fs::read_to_string(dir.join("ca.pem")) else {
        let log = std::fs::read_to_string(dir.join("proxy.log")).unwrap_or_default();
        panic!("the proxy did not start:\n{log}");
    };
    if let Ok(Some(status)) = proxy.try_wait() {
        let log = std::fs::read_to_string(dir.join("proxy.log")).unwrap_or_default();
        panic!("the proxy exited ({status}):\n{log}");
    }
    let via = Target {
        addr: proxy_addr,
        via_proxy: true,
        host: HOST,
        tls: client_tls(&proxy_ca, &[b"http/1.1"]),
        tls_h2: client_tls(&proxy_ca, &[b"h2"]),
    };
    // Through the proxy's blind tunnel: the client verifies the origin's own certificate.
    let tunnelled = Target {
        addr: proxy_addr,
        via_proxy: true,
        host: TUNNEL_HOST,
        tls: client_tls(origin.ca_pem(), &[b"http/1.1"]),
        tls_h2: client_tls(origin.ca_pem(), &[b"h2"]),
    };
    let direct = Target {
        addr: origin.addr(),
        via_proxy: false,
        host: HOST,
        tls: client_tls(origin.ca_pem(), &[b"http/1.1"]),
        tls_h2: client_tls(origin.ca_pem(), &[b"h2"]),
    };
    // Warm: the token is minted and the upstream pool is open before anything is timed.
    let _ = phase(&via, "one", 0.5).await;

    println!(
        "\nload: {rounds} rounds of {secs} s phases per mode (medians shown), loopback, {} cores \
         shared by tool, proxy and origin\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!(
        "{:<26} {:>10} {:>10} {:>7} {:>8} {:>8} {:>9} {:>14} {:>18} {:>12}",
        "mode",
        "direct r/s",
        "proxy r/s",
        "ratio",
        "p50 d µs",
        "p50 p µs",
        "p99 p µs",
        "proxy CPU/req",
        "tool CPU/req d → p",
        "idle d → p"
    );
    let only = std::env::var("LOAD_MODES").ok();
    for (mode, label) in [
        ("keepalive", "keep-alive, 64 conns"),
        ("one", "keep-alive, 1 conn"),
        ("new", "new conn per request (16)"),
        ("h2", "h2, 1 conn x 100 streams"),
    ] {
        if only
            .as_deref()
            .is_some_and(|m| !m.split(',').any(|x| x == mode))
        {
            continue;
        }
        // Every mode is also run through the blind tunnel, in the same rounds: a practical
        // ceiling for a proxy that does no work of its own.
        let all = rounds_of(&direct, &[&via, &tunnelled], mode, secs, rounds, pid).await;
        let (r, t) = (&all[0], &all[1]);
        print_row(label, r);
        print_row("  same, blind tunnel", t);
        if mode == "one" {
            println!(
                "{:<26} added p50: intercepted {:.0} µs, blind tunnel {:.0} µs (the process-hop \
                 floor); interception's own share {:.0} µs",
                "",
                r.added_p50,
                t.added_p50,
                r.added_p50 - t.added_p50
            );
        }
    }
    let _ = proxy.kill();
    let _ = proxy.wait();
    origin.shutdown();
    emu.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
