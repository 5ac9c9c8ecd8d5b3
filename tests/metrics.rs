//! `/metrics` (issue 16): labelled request counters, latency histograms, token expiry, reloads
//! by result, and an exposition that a third-party OpenMetrics parser accepts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use impersonate_proxy::clients::ClientConfig;

/// The sandbox with its admin endpoint, no file watch, and one client named by its address.
async fn metrics_sandbox() -> Sandbox {
    sandbox_with(|c| {
        c.admin = Some(any_port());
        c.reload.watch = false;
        c.clients.insert(
            "local".into(),
            ClientConfig {
                password_hash: None,
                cidrs: vec!["127.0.0.0/8".into()],
            },
        );
    })
    .await
}

async fn scrape(sb: &Sandbox) -> (String, String) {
    let resp = common::admin(sb, reqwest::Method::GET, "/metrics")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let ctype = resp.headers()["content-type"].to_str().unwrap().to_string();
    (ctype, resp.text().await.unwrap())
}

/// The value of the sample written exactly as `series` (name and labels), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

fn requests(route: &str, identity: &str, method: &str, status: &str) -> String {
    format!(
        "impersonate_proxy_requests_total{{route=\"{route}\",identity=\"{identity}\",client=\"local\",method=\"{method}\",status=\"{status}\"}}"
    )
}

/// Scrape until `series` has `want` (a body's end is counted just after the client has it).
async fn scrape_until(sb: &Sandbox, series: &str, want: f64) -> String {
    let mut text = String::new();
    for _ in 0..100 {
        text = scrape(sb).await.1;
        if value(&text, series) == Some(want) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{series} never reached {want}:\n{text}");
}

async fn post_reload(sb: &Sandbox) -> u16 {
    common::admin(sb, reqwest::Method::POST, "/reload")
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn labelled_series_histograms_token_expiry_and_reloads() {
    let mut sb = metrics_sandbox().await;
    let client = sb.client().unwrap();
    for _ in 0..3 {
        let r = client
            .get("https://bigquery.googleapis.com/bigquery/v2/projects/p/datasets")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    let r = client
        .post("https://storage.googleapis.com/upload/storage/v1/b/x/o")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    // `locked` can never be minted: 503.
    let r = client
        .get("https://locked.googleapis.com/x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);

    let complete =
        "impersonate_proxy_request_duration_seconds_count{route=\"bigquery\",identity=\"jobs\"}";
    let m = scrape_until(&sb, complete, 3.0).await;
    assert_eq!(
        value(&m, &requests("bigquery", "jobs", "read", "2xx")),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        value(&m, &requests("everything-else", "dev", "write", "2xx")),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        value(&m, &requests("locked", "locked", "read", "5xx")),
        Some(1.0),
        "{m}"
    );
    // Only series that counted something are written.
    assert_eq!(
        value(&m, &requests("bigquery", "jobs", "write", "2xx")),
        None
    );
    assert_eq!(
        value(
            &m,
            "impersonate_proxy_response_headers_duration_seconds_count{route=\"bigquery\",identity=\"jobs\"}"
        ),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        value(
            &m,
            "impersonate_proxy_response_headers_duration_seconds_bucket{le=\"+Inf\",route=\"bigquery\",identity=\"jobs\"}"
        ),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        value(
            &m,
            "impersonate_proxy_request_body_bytes_total{route=\"everything-else\",identity=\"dev\",client=\"local\"}"
        ),
        Some(5.0),
        "{m}"
    );
    assert!(
        value(
            &m,
            "impersonate_proxy_response_body_bytes_total{route=\"bigquery\",identity=\"jobs\",client=\"local\"}"
        )
        .unwrap()
            > 0.0,
        "{m}"
    );

    // Tokens: jobs' expiry about 2 h ahead (its lifetime), mints by result.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let expiry = value(
        &m,
        "impersonate_proxy_token_expiry_timestamp_seconds{identity=\"jobs\",kind=\"access\",audience=\"none\"}",
    )
    .expect(&m);
    assert!(
        (now + 7000.0..now + 7201.0).contains(&expiry),
        "{expiry} vs {now}"
    );
    assert_eq!(
        value(&m, "impersonate_proxy_token_safety_window_seconds"),
        Some(5.0)
    );
    let mints = |name: &str, result: &str| {
        value(
            &m,
            &format!("impersonate_proxy_token_mints_total{{identity=\"{name}\",kind=\"access\",audience=\"none\",result=\"{result}\"}}"),
        )
    };
    assert!(mints("jobs", "ok").unwrap() >= 1.0, "{m}");
    assert!(mints("locked", "failed").unwrap() >= 1.0, "{m}");
    assert_eq!(mints("locked", "ok"), None, "{m}");
    assert!(
        value(
            &m,
            "impersonate_proxy_token_expiry_timestamp_seconds{identity=\"locked\",kind=\"access\",audience=\"none\"}"
        )
        .is_none(),
        "no token, no expiry"
    );
    assert!(value(&m, "impersonate_proxy_iam_request_duration_seconds_count").unwrap() >= 2.0);

    // Connections: reqwest kept one client connection per host; the upstream leg is open.
    assert!(value(&m, "impersonate_proxy_connections_total{kind=\"upstream\"}").unwrap() >= 1.0);
    assert!(value(&m, "impersonate_proxy_open_connections{kind=\"upstream\"}").unwrap() >= 1.0);
    assert_eq!(
        value(
            &m,
            "impersonate_proxy_connections_total{kind=\"intercepted\"}"
        ),
        Some(3.0),
        "bigquery, storage, locked: {m}"
    );
    assert!(
        value(
            &m,
            "impersonate_proxy_upstream_connect_duration_seconds_count"
        )
        .unwrap()
            >= 1.0
    );
    assert!(
        value(
            &m,
            "impersonate_proxy_upstream_tls_handshake_duration_seconds_count"
        )
        .unwrap()
            >= 1.0
    );

    // A reload that keeps the bigquery route, its identity and the client keeps their series;
    // one that does not parse counts as failed.
    let file = sb.dir.join("config.yaml");
    let rest = "identities:\n  jobs: { service_account: bq-jobs@demo-project.iam.gserviceaccount.com, quota_project: demo-project, lifetime: 2h }\n  dev: { service_account: dev@demo-project.iam.gserviceaccount.com }\nroutes:\n  - { name: bigquery, host: bigquery.googleapis.com, identity: jobs }\n  - { name: everything-else, host: '*.googleapis.com', identity: dev }\nclients:\n  local: { cidrs: [127.0.0.0/8] }\n";
    std::fs::write(&file, config_file(&sb.config, rest)).unwrap();
    sb.server.enable_reload(file.clone(), None);
    assert_eq!(post_reload(&sb).await, 200);
    std::fs::write(&file, "routes: [unclosed\n").unwrap();
    assert_eq!(post_reload(&sb).await, 409);
    let r = client
        .get("https://bigquery.googleapis.com/bigquery/v2/projects/p/datasets")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let m = scrape_until(&sb, complete, 4.0).await;
    assert_eq!(
        value(&m, &requests("bigquery", "jobs", "read", "2xx")),
        Some(4.0),
        "the series survived the reload: {m}"
    );
    assert_eq!(
        value(&m, "impersonate_proxy_reloads_total{result=\"ok\"}"),
        Some(1.0)
    );
    assert_eq!(
        value(&m, "impersonate_proxy_reloads_total{result=\"failed\"}"),
        Some(1.0)
    );
    assert_eq!(value(&m, "impersonate_proxy_config_generation"), Some(2.0));
    sb.shutdown().await;
}

/// The whole exposition, read by the Python Prometheus client's OpenMetrics parser (strict:
/// `# EOF`, counter and histogram sample names, cumulative buckets, escaping).
#[tokio::test]
async fn the_exposition_parses_with_the_python_openmetrics_parser() {
    let sb = metrics_sandbox().await;
    let client = sb.client().unwrap();
    for url in [
        "https://bigquery.googleapis.com/x",
        "https://locked.googleapis.com/x",
        "https://storage.googleapis.com/storage/v1/b/prod-a/o",
    ] {
        client.get(url).send().await.unwrap().bytes().await.unwrap();
    }
    // A refusal before any route: a port the config does not allow.
    let refused = raw(
        sb.server.proxy_addr(),
        b"CONNECT storage.googleapis.com:25 HTTP/1.1\r\nHost: storage.googleapis.com:25\r\n\r\n",
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    let (ctype, text) = scrape(&sb).await;
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    assert!(text.ends_with("# EOF\n"));

    let python = python_venv(
        "pyenv-metrics",
        "prometheus_client",
        &["prometheus-client==0.26.0"],
    )
    .await;
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for f in text_string_to_metric_families(sys.stdin.read()):
    out[f.name] = {"type": f.type, "samples": [[s.name, s.labels, s.value] for s in f.samples]}
print(json.dumps(out))
"#;
    let mut child = tokio::process::Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(text.as_bytes()).await.unwrap();
    }
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "the parser refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let families: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let kind = |name: &str| families[name]["type"].as_str().map(str::to_string);
    for (name, want) in [
        ("impersonate_proxy_requests", "counter"),
        (
            "impersonate_proxy_response_headers_duration_seconds",
            "histogram",
        ),
        ("impersonate_proxy_request_duration_seconds", "histogram"),
        ("impersonate_proxy_request_body_bytes", "counter"),
        ("impersonate_proxy_response_body_bytes", "counter"),
        ("impersonate_proxy_connections", "counter"),
        ("impersonate_proxy_open_connections", "gauge"),
        (
            "impersonate_proxy_upstream_connect_duration_seconds",
            "histogram",
        ),
        (
            "impersonate_proxy_upstream_tls_handshake_duration_seconds",
            "histogram",
        ),
        ("impersonate_proxy_tunnel_bytes", "counter"),
        ("impersonate_proxy_token_mints", "counter"),
        ("impersonate_proxy_token_expiry_timestamp_seconds", "gauge"),
        ("impersonate_proxy_token_safety_window_seconds", "gauge"),
        ("impersonate_proxy_token_refreshes", "counter"),
        (
            "impersonate_proxy_iam_request_duration_seconds",
            "histogram",
        ),
        ("impersonate_proxy_token_slots", "gauge"),
        ("impersonate_proxy_token_slots_ready", "gauge"),
        ("impersonate_proxy_refused", "counter"),
        ("impersonate_proxy_auth_failures", "counter"),
        ("impersonate_proxy_token_errors", "counter"),
        ("impersonate_proxy_upstream_errors", "counter"),
        ("impersonate_proxy_reloads", "counter"),
        ("impersonate_proxy_config_generation", "gauge"),
        ("impersonate_proxy_leaf_certificates_cached", "gauge"),
    ] {
        assert_eq!(kind(name).as_deref(), Some(want), "{name}: {families}");
    }
    // The parser saw the labelled samples, not just the families.
    let samples = families["impersonate_proxy_requests"]["samples"]
        .as_array()
        .unwrap();
    assert!(
        samples.iter().any(|s| s[1]["route"] == "prod-buckets-read"
            && s[1]["identity"] == "reader"
            && s[1]["client"] == "local"
            && s[1]["status"] == "2xx"
            && s[2] == 1.0),
        "{samples:?}"
    );
    let refused = &families["impersonate_proxy_refused"]["samples"];
    assert!(
        refused
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s[1]["status"] == "4xx" && s[2] == 1.0),
        "{refused}"
    );
    sb.shutdown().await;
}

/// Connections spread evenly over the workers (`proxy/balance.rs`): whichever worker wakes
/// first, a worker serving more connections than the other leaves the next one to it, so two
/// workers serve half each; every connection is served, and the counts fall as they close.
/// Without the balance, the split followed which thread woke first: in 12 runs, worker 0 took
/// from 6 to 15 of the 20, and 10 once.
#[tokio::test]
async fn client_connections_are_spread_evenly_over_the_workers() {
    let sb = sandbox_with(|c| {
        c.admin = Some(any_port());
        c.reload.watch = false;
        c.limits.workers = 2;
    })
    .await;
    let worker = |w: u32| format!("impersonate_proxy_worker_connections{{worker=\"{w}\"}}");
    let mut held = Vec::new();
    let mut text = String::new();
    for n in 1..=20 {
        held.push(
            tokio::net::TcpStream::connect(sb.server.proxy_addr())
                .await
                .unwrap(),
        );
        // Each accepted before the next comes.
        for _ in 0..100 {
            text = scrape(&sb).await.1;
            let total =
                value(&text, &worker(0)).unwrap_or(0.0) + value(&text, &worker(1)).unwrap_or(0.0);
            if total == f64::from(n) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert_eq!(value(&text, &worker(0)), Some(10.0), "{text}");
    assert_eq!(value(&text, &worker(1)), Some(10.0), "{text}");
    // Each is served where it landed: a refusal answered on every one.
    for s in &mut held {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(
            b"CONNECT storage.googleapis.com:25 HTTP/1.1\r\nHost: storage.googleapis.com:25\r\n\r\n",
        )
        .await
        .unwrap();
        let mut head = [0u8; 12];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut head))
            .await
            .expect("an answer")
            .unwrap();
        assert_eq!(&head, b"HTTP/1.1 403");
    }
    drop(held);
    scrape_until(&sb, &worker(0), 0.0).await;
    scrape_until(&sb, &worker(1), 0.0).await;
}
