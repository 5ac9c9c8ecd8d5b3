//! Soak: the proxy under steady load for a while against an IAM that misbehaves, as a bench
//! (it prints figures; it asserts nothing and is never part of `cargo test`). Everything runs
//! in this process on loopback: the emulator (with faults: a share of IAM calls fail, each
//! takes some latency, every token lives only a short time), the local origin (which asks the
//! emulator's tokeninfo whose each token is, so an expired or unknown token shows), the proxy,
//! and `SOAK_CLIENTS` clients sending requests through it until `SOAK_SECS` have passed.
//!
//! cargo bench --bench soak                      # 60 s, 30% IAM errors, 30 s tokens
//! SOAK_SECS=300 SOAK_ERROR_RATE=0.3 SOAK_TOKEN_SECS=30 SOAK_IAM_LATENCY_MS=50 cargo bench --bench soak
//!
//! It prints the requests sent, the failures by status, the tokens the origin could not
//! verify (expired or unknown: the proxy must never send one), the IAM calls and injected
//! failures, and the resident memory at start and end (of this whole process: clients,
//! origin, emulator and proxy together).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use impersonate_proxy::demo::{Sandbox, POLICY};
use impersonate_proxy::emulator::Stats;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    ok: AtomicU64,
    /// 200s whose token the origin could not verify (expired or unknown).
    unverified: AtomicU64,
    by_status: Mutex<BTreeMap<String, u64>>,
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(soak());
}

async fn soak() {
    let secs: u64 = env("SOAK_SECS", 60);
    let error_rate: f64 = env("SOAK_ERROR_RATE", 0.3);
    let token_secs: u64 = env("SOAK_TOKEN_SECS", 30);
    let latency_ms: u64 = env("SOAK_IAM_LATENCY_MS", 50);
    let clients: usize = env("SOAK_CLIENTS", 16);
    let policy = format!(
        "{POLICY}token_lifetime: {token_secs}s\nfaults: {{ error_rate: {error_rate}, latency: {latency_ms}ms }}\n"
    );
    let rss_start = rss_kib();
    let sb = Sandbox::start(SocketAddr::from(([127, 0, 0, 1], 0)), &policy, |c| {
        // One IAM call, timed out or not, must end inside the refresh margin.
        c.iam.timeout = Duration::from_secs(2);
    })
    .await
    .expect("sandbox starts");
    println!(
        "soak: {secs} s, {clients} clients, IAM error rate {error_rate}, IAM latency {latency_ms} ms, tokens live {token_secs} s"
    );
    let urls = [
        "https://bigquery.googleapis.com/bigquery/v2/projects/demo-project/jobs",
        "https://storage.googleapis.com/storage/v1/b/dev-scratch/o",
        "https://storage.googleapis.com/storage/v1/b/prod-logs/o",
    ];
    // Warm first, as a deployment's readiness probe would: one good answer per route, not
    // counted (with IAM failing at this rate, a cold start may need a retry or two).
    let warm = sb.client().unwrap();
    let warm_until = Instant::now() + Duration::from_secs(30);
    for url in urls {
        while Instant::now() < warm_until {
            match warm.get(url).send().await {
                Ok(r) if r.status() == 200 => break,
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    let tally = Arc::new(Tally::default());
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for n in 0..clients {
        let client = sb.client().unwrap();
        let tally = tally.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = n;
            while Instant::now() < deadline {
                let url = urls[i % urls.len()];
                i += 1;
                tally.requests.fetch_add(1, Ordering::Relaxed);
                let sent = client
                    .get(url)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                let status = match sent {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        if status == 200 {
                            let v: serde_json::Value = r.json().await.unwrap_or_default();
                            if v["identity"].is_string() {
                                tally.ok.fetch_add(1, Ordering::Relaxed);
                            } else {
                                tally.unverified.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        status.to_string()
                    }
                    Err(e) => format!("client error: {e}"),
                };
                if status != "200" {
                    *tally.by_status.lock().unwrap().entry(status).or_default() += 1;
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let stats = sb.emulator.stats();
    let iam_calls = Stats::get(&stats.generate_access_token) + Stats::get(&stats.generate_id_token);
    let report = format!(
        "requests          {}\n\
         200, token valid  {}\n\
         200, token the origin could not verify (expired or unknown)  {}\n\
         failures          {:?}\n\
         IAM calls         {} generateAccessToken/IdToken, {} OAuth2 refreshes, {} failures injected\n\
         RSS (whole process)  {} KiB at start, {} KiB at end",
        tally.requests.load(Ordering::Relaxed),
        tally.ok.load(Ordering::Relaxed),
        tally.unverified.load(Ordering::Relaxed),
        tally.by_status.lock().unwrap(),
        iam_calls,
        Stats::get(&stats.oauth_token),
        Stats::get(&stats.failures_injected),
        rss_start,
        rss_kib(),
    );
    println!("{report}");
    sb.shutdown().await;
}
