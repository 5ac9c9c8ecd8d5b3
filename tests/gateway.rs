//! Gateway mode (issue 15): clients and their identities, 407 and 403, no open relay off
//! loopback, and reloads (under load, refused, and through a ConfigMap-style symlink swap).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use common::*;
use http_body_util::BodyExt;
use impersonate_proxy::clients::{hash, ClientConfig};
use impersonate_proxy::config::Config;

const PW_A: &str = "correct-horse-a";
const PW_B: &str = "battery-staple-b";
const HOP: &str = "hop@demo-project.iam.gserviceaccount.com";

/// One log capture for this test binary.
fn logs() -> &'static Capture {
    static CAPTURE: OnceLock<Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| Capture::install("info"))
}

/// Two clients: `prod-buckets-read` (as `reader`) is batch-a's only, so batch-b's same
/// request falls through to `everything-else` (as `dev`); `cloud-run` is batch-b's only.
fn two_clients(c: &mut Config) {
    for (name, pw) in [("batch-a", PW_A), ("batch-b", PW_B)] {
        c.clients.insert(
            name.into(),
            ClientConfig {
                password_hash: Some(hash(pw).unwrap()),
                cidrs: vec![],
            },
        );
    }
    for r in &mut c.routes {
        match r.name.as_deref() {
            Some("prod-buckets-read") => r.clients = vec!["batch-a".into()],
            Some("cloud-run") => r.clients = vec!["batch-b".into()],
            _ => {}
        }
    }
}

fn client_as(sb: &Sandbox, user: &str, password: &str) -> reqwest::Client {
    let pem = std::fs::read(sb.ca_path()).unwrap();
    let cert = reqwest::Certificate::from_pem(&pem).unwrap();
    let proxy = reqwest::Proxy::all(sb.proxy_url())
        .unwrap()
        .basic_auth(user, password);
    reqwest::Client::builder()
        .proxy(proxy)
        .tls_certs_only([cert])
        .build()
        .unwrap()
}

fn basic(user: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

#[tokio::test]
async fn two_clients_get_two_identities_for_the_same_url() {
    let capture = logs();
    let sb = sandbox_with(two_clients).await;
    let url = "https://storage.googleapis.com/storage/v1/b/prod-logs/o";
    let a = client_as(&sb, "batch-a", PW_A)
        .get(url)
        .send()
        .await
        .unwrap();
    assert_eq!(a.status(), 200);
    assert_eq!(json(a).await["identity"], READER);
    // The same URL from batch-b, with curl.
    let out = curl(&sb, &["--proxy-user", &format!("batch-b:{PW_B}"), url]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["identity"], DEV, "{v}");
    // Proxy credentials stop at the proxy: never upstream, never in a log line.
    assert!(sb
        .origin
        .seen()
        .iter()
        .all(|s| s.headers.get("proxy-authorization").is_none()));
    let text = capture.text();
    let (a, b) = (basic("batch-a", PW_A), basic("batch-b", PW_B));
    for secret in [PW_A, PW_B, a.as_str(), b.as_str()] {
        assert!(!text.contains(secret), "a credential reached the log");
    }
    // The access line names the client.
    assert!(
        text.lines()
            .any(|l| l.contains("batch-a") && l.contains("prod-buckets-read")),
        "{text}"
    );
    sb.shutdown().await;
}

#[tokio::test]
async fn no_or_wrong_credentials_get_407_and_a_route_of_another_client_403() {
    let capture = logs();
    let sb = sandbox_with(two_clients).await;
    let addr = sb.server.proxy_addr();
    let connect = "CONNECT storage.googleapis.com:443 HTTP/1.1\r\nHost: storage.googleapis.com:443\r\nConnection: close\r\n";
    let none = raw(addr, format!("{connect}\r\n").as_bytes()).await;
    assert!(none.starts_with("HTTP/1.1 407"), "{none}");
    assert!(
        none.to_ascii_lowercase()
            .contains("proxy-authenticate: basic realm=\"impersonate-proxy\""),
        "{none}"
    );
    assert!(none.contains("\"UNAUTHENTICATED\""), "{none}");
    for (user, password) in [("batch-a", "wrong-password"), ("nobody", PW_A)] {
        let creds = basic(user, password);
        let r = raw(
            addr,
            format!("{connect}Proxy-Authorization: Basic {creds}\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 407"), "{r}");
        assert!(!r.contains(password) && !r.contains(&creds), "{r}");
    }
    // Absolute-form requests authenticate too, and blind tunnels.
    let r = raw(
        addr,
        b"GET http://blind.example.com/ HTTP/1.1\r\nHost: blind.example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 407"), "{r}");
    let r = raw(
        addr,
        b"CONNECT blind.example.com:443 HTTP/1.1\r\nHost: blind.example.com:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 407"), "{r}");

    // batch-a is known, but cloud-run is batch-b's.
    let resp = client_as(&sb, "batch-a", PW_A)
        .get("https://svc.a.run.app/hello")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let v = json(resp).await;
    assert_eq!(v["error"]["status"], "PERMISSION_DENIED", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("client `batch-a`") && msg.contains("route `cloud-run`"),
        "{msg}"
    );
    // ... and batch-b may.
    let ok = client_as(&sb, "batch-b", PW_B)
        .get("https://svc.a.run.app/hello")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let text = capture.text();
    assert!(
        !text.contains("wrong-password"),
        "a password reached the log"
    );
    sb.shutdown().await;
}

#[tokio::test]
async fn check_dry_runs_as_a_client() {
    let mut config = Config::from_yaml(include_str!("../config.yaml"), "config.yaml").unwrap();
    two_clients(&mut config);
    let table = impersonate_proxy::routes::RouteTable::compile(&config).unwrap();
    let url = "https://storage.googleapis.com/storage/v1/b/prod-logs/o";
    let a =
        impersonate_proxy::cli::dry_run_as(&config, &table, url, "GET", Some("batch-a")).unwrap();
    let b =
        impersonate_proxy::cli::dry_run_as(&config, &table, url, "GET", Some("batch-b")).unwrap();
    assert!(a.contains("`reader`"), "{a}");
    assert!(b.contains("`dev`"), "{b}");
    assert!(
        impersonate_proxy::cli::dry_run_as(&config, &table, url, "GET", Some("ghost")).is_err()
    );
}

#[test]
fn the_gateway_example_in_config_yaml_is_valid() {
    let text = include_str!("../config.yaml");
    let block: Vec<&str> = text
        .split("# --- gateway example ---\n")
        .nth(1)
        .unwrap()
        .lines()
        .map(|l| l.strip_prefix("# ").unwrap_or(l))
        .collect();
    let start = text.find("identities:").unwrap();
    let end = text.find("# First match wins").unwrap();
    let yaml = format!("{}\n{}\n", &text[start..end], block.join("\n"));
    let c = Config::from_yaml(&yaml, "gateway example").unwrap();
    assert!(!c.listen.ip().is_loopback());
    assert_eq!(c.clients.len(), 2);
    assert_eq!(c.routes[0].clients, ["etl"]);
}

#[tokio::test]
async fn off_loopback_without_clients_the_proxy_refuses_to_start() {
    let err = Config::from_yaml("listen: 0.0.0.0:8080\n", "c.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("listen") && err.contains("clients") && err.contains("serve_anyone"),
        "{err}"
    );
    Config::from_yaml("listen: 0.0.0.0:8080\nserve_anyone: true\n", "c.yaml").unwrap();
    let h = hash("pw").unwrap();
    let with_client = format!("listen: 0.0.0.0:8080\nclients:\n  a: {{ password_hash: '{h}' }}\n");
    Config::from_yaml(&with_client, "c.yaml").unwrap();
    // A hash that is not one is refused without being echoed.
    let err = Config::from_yaml(
        "clients:\n  a: { password_hash: 'hunter2-plain-text' }\n",
        "c.yaml",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("clients.a.password_hash") && !err.contains("hunter2"),
        "{err}"
    );
    // The binary: exit code 3 (a config error), before binding anything.
    let dir = std::env::temp_dir().join(format!("gw-refuse-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("config.yaml");
    std::fs::write(&file, "listen: 0.0.0.0:0\nadmin: null\n").unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_impersonate-proxy"))
        .arg("run")
        .arg("--config")
        .arg(&file)
        .output()
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("listen") && stderr.contains("clients"),
        "{stderr}"
    );
}

/// The sandbox's identities, plus `hop` when `with_hop`.
fn identities(with_hop: bool) -> String {
    let mut s = String::from(
        "identities:\n  reader: { service_account: reader@demo-project.iam.gserviceaccount.com, delegates: [hop@demo-project.iam.gserviceaccount.com], scopes: [https://www.googleapis.com/auth/devstorage.read_only] }\n  jobs: { service_account: bq-jobs@demo-project.iam.gserviceaccount.com, quota_project: demo-project, lifetime: 2h }\n  dev: { service_account: dev@demo-project.iam.gserviceaccount.com }\n  locked: { service_account: locked@demo-project.iam.gserviceaccount.com }\n",
    );
    if with_hop {
        s.push_str("  hop: { service_account: hop@demo-project.iam.gserviceaccount.com }\n");
    }
    s
}

const ROUTES_V1: &str =
    "routes:\n  - { name: everything-else, host: '*.googleapis.com', identity: dev }\n";
const ROUTES_V2: &str = "routes:\n  - { name: pubsub-hop, host: pubsub.googleapis.com, identity: hop }\n  - { name: everything-else, host: '*.googleapis.com', identity: dev }\n";

/// An HTTP/1.1 connection through the proxy's interception of `host`, kept open.
async fn open_connection(
    sb: &Sandbox,
    host: &str,
) -> hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    let tls = tls_via_proxy(sb, host, &[b"http/1.1"]).await;
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

async fn identity_on(
    send: &mut hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    host: &str,
) -> serde_json::Value {
    send.ready().await.unwrap();
    let req = http::Request::get("/v1/projects/p/topics")
        .header("host", host)
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["identity"].clone()
}

async fn post_reload(sb: &Sandbox) -> (u16, serde_json::Value) {
    let resp = common::admin(sb, reqwest::Method::POST, "/reload")
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

async fn reloadable_sandbox(watch: bool) -> Sandbox {
    sandbox_with(move |c| {
        c.admin = Some(any_port());
        c.reload.watch = watch;
        c.reload.interval = Duration::from_millis(200);
    })
    .await
}

#[tokio::test]
async fn a_reload_under_load_drops_nothing_and_applies_to_open_connections() {
    let mut sb = reloadable_sandbox(false).await;
    let file = sb.dir.join("config.yaml");
    let v1 = format!("{}{ROUTES_V1}", identities(false));
    std::fs::write(&file, config_file(&sb.config, &v1)).unwrap();
    sb.server.enable_reload(file.clone(), None);
    let host = "pubsub.googleapis.com";

    // A connection opened before the reload, used before and after it.
    let mut old = open_connection(&sb, host).await;
    assert_eq!(identity_on(&mut old, host).await, DEV);

    // A client sending requests in a loop across the reload (bounded, not timed).
    let sent = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = sb.client().unwrap();
    let looping = {
        let (sent, stop) = (sent.clone(), stop.clone());
        tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut last = serde_json::Value::Null;
            for _ in 0..5000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                match client
                    .get(format!("https://{host}/v1/projects/p/topics"))
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 200 => last = json(r).await["identity"].clone(),
                    Ok(r) => failures.push(format!("status {}", r.status())),
                    Err(e) => failures.push(e.to_string()),
                }
                sent.fetch_add(1, Ordering::SeqCst);
            }
            (failures, last)
        })
    };
    let wait_for = |n: usize| {
        let sent = sent.clone();
        async move {
            for _ in 0..2000 {
                if sent.load(Ordering::SeqCst) >= n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            panic!("the client loop stalled");
        }
    };
    wait_for(20).await;
    let v2 = format!("{}{ROUTES_V2}", identities(true));
    std::fs::write(&file, config_file(&sb.config, &v2)).unwrap();
    let (status, body) = post_reload(&sb).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["generation"], 2, "{body}");
    assert_eq!(
        body["warmed"], 1,
        "hop is new and minted before the switch: {body}"
    );
    // reader, jobs, locked and cloud-run's ID token are no route's any more: dropped from
    // the engine (their refreshers end with the last request holding them); dev and hop stay.
    assert_eq!(body["retired"], 4, "{body}");
    assert_eq!(sb.server.state().engine.slots().len(), 2);
    let after = sent.load(Ordering::SeqCst);
    wait_for(after + 20).await;
    stop.store(true, Ordering::SeqCst);
    let (failures, last) = looping.await.unwrap();
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert_eq!(last, HOP, "the new route is in force");
    // The connection from before the reload is still open, and its next request gets the
    // new route.
    assert_eq!(identity_on(&mut old, host).await, HOP);
    sb.shutdown().await;
}

#[tokio::test]
async fn a_bad_reload_keeps_the_running_config() {
    let mut sb = reloadable_sandbox(false).await;
    let file = sb.dir.join("config.yaml");
    sb.server.enable_reload(file.clone(), None);
    let host = "pubsub.googleapis.com";
    let client = sb.client().unwrap();
    let client = &client;
    let get = || async move {
        let r = client
            .get(format!("https://{host}/v1/x"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        json(r).await["identity"].clone()
    };
    let before = get().await;
    let routes_before = sb.server.state().live.load().routes.len();

    // A route naming an identity that does not exist.
    let bad = format!(
        "{}routes:\n  - {{ host: pubsub.googleapis.com, identity: ghost }}\n",
        identities(false)
    );
    std::fs::write(&file, config_file(&sb.config, &bad)).unwrap();
    let (status, body) = post_reload(&sb).await;
    assert_eq!(status, 409, "{body}");
    let e = body["error"].as_str().unwrap();
    assert!(e.contains("routes[0].identity"), "{e}");
    // A setting that needs a restart, named.
    let moved = config_file(&sb.config, &format!("{}{ROUTES_V2}", identities(true)))
        .replacen("listen: 127.0.0.1:0", "listen: 127.0.0.1:1", 1)
        .replace("interval: 200ms", "interval: 300ms");
    std::fs::write(&file, moved).unwrap();
    let (status, body) = post_reload(&sb).await;
    assert_eq!(status, 409, "{body}");
    let e = body["error"].as_str().unwrap();
    assert!(e.contains("listen") && e.contains("reload"), "{e}");
    // Not YAML at all.
    std::fs::write(&file, "routes: [unclosed\n").unwrap();
    let (status, _) = post_reload(&sb).await;
    assert_eq!(status, 409);
    // A new identity IAM will not mint for: refused before the switch, and its slot dropped.
    let slots = |sb: &Sandbox| sb.server.state().engine.slots().len();
    let slots_before = slots(&sb);
    let unmintable = format!(
        "{}  locked-ro: {{ service_account: locked@demo-project.iam.gserviceaccount.com, scopes: [https://www.googleapis.com/auth/devstorage.read_only] }}\nroutes:\n  - {{ host: pubsub.googleapis.com, identity: locked-ro }}\n",
        identities(false)
    );
    std::fs::write(&file, config_file(&sb.config, &unmintable)).unwrap();
    let (status, body) = post_reload(&sb).await;
    assert_eq!(status, 409, "{body}");
    let e = body["error"].as_str().unwrap();
    assert!(e.contains("could not be warmed"), "{e}");
    assert_eq!(slots(&sb), slots_before);

    let live = sb.server.state().live.load();
    assert_eq!(live.generation, 1);
    assert_eq!(live.routes.len(), routes_before);
    assert_eq!(get().await, before);
    let metrics = common::admin(&sb, reqwest::Method::GET, "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("impersonate_proxy_reloads_total{result=\"failed\"} 4"),
        "{metrics}"
    );
    sb.shutdown().await;
}

#[cfg(unix)]
#[tokio::test]
async fn the_watch_sees_a_configmap_symlink_swap() {
    use std::os::unix::fs::symlink;
    let mut sb = reloadable_sandbox(true).await;
    // The layout a ConfigMap volume has: config.yaml → ..data/config.yaml, ..data → ..<ts>.
    let dir = sb.dir.join("configmap");
    let v1 = dir.join("..2026_11_25_v1");
    std::fs::create_dir_all(&v1).unwrap();
    std::fs::write(
        v1.join("config.yaml"),
        config_file(&sb.config, &format!("{}{ROUTES_V1}", identities(false))),
    )
    .unwrap();
    symlink("..2026_11_25_v1", dir.join("..data")).unwrap();
    symlink("..data/config.yaml", dir.join("config.yaml")).unwrap();
    sb.server.enable_reload(dir.join("config.yaml"), None);

    // The kubelet's swap: a new directory, a new symlink, renamed over `..data`.
    let v2 = dir.join("..2026_11_25_v2");
    std::fs::create_dir_all(&v2).unwrap();
    std::fs::write(
        v2.join("config.yaml"),
        config_file(&sb.config, &format!("{}{ROUTES_V2}", identities(true))),
    )
    .unwrap();
    symlink("..2026_11_25_v2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();

    let state = sb.server.state().clone();
    for _ in 0..200 {
        if state.live.load().generation >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(state.live.load().generation, 2, "the swap was not seen");
    let r = sb
        .client()
        .unwrap()
        .get("https://pubsub.googleapis.com/v1/x")
        .send()
        .await
        .unwrap();
    assert_eq!(json(r).await["identity"], HOP);
    sb.shutdown().await;
}

/// The README's figure: requests per second with and without reloads, in the same run. A
/// bounded loop (a fixed number of requests), not a timed test; run it by hand:
///
/// cargo test --test gateway reload_throughput -- --ignored --nocapture
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn reload_throughput() {
    const REQUESTS: usize = 2000;
    const CONCURRENCY: usize = 8;
    let mut sb = reloadable_sandbox(false).await;
    let file = sb.dir.join("config.yaml");
    let v1 = config_file(&sb.config, &format!("{}{ROUTES_V1}", identities(true)));
    let v2 = config_file(&sb.config, &format!("{}{ROUTES_V2}", identities(true)));
    std::fs::write(&file, &v1).unwrap();
    sb.server.enable_reload(file.clone(), None);
    let client = sb.client().unwrap();
    let url = "https://pubsub.googleapis.com/v1/x";
    // Warm: connections and tokens.
    for _ in 0..50 {
        assert_eq!(client.get(url).send().await.unwrap().status(), 200);
    }
    let state = sb.server.state().clone();
    let mut results = Vec::new();
    for round in 0..5 {
        // Alternate which phase goes first, so warming up favours neither.
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for reloading in order {
            let done = Arc::new(AtomicUsize::new(0));
            let started = std::time::Instant::now();
            let workers: Vec<_> = (0..CONCURRENCY)
                .map(|_| {
                    let (client, done) = (client.clone(), done.clone());
                    tokio::spawn(async move {
                        let mut failed = 0;
                        while done.fetch_add(1, Ordering::SeqCst) < REQUESTS {
                            match client.get(url).send().await {
                                Ok(r) if r.status() == 200 => {
                                    let _ = r.bytes().await;
                                }
                                _ => failed += 1,
                            }
                        }
                        failed
                    })
                })
                .collect();
            let mut reloads = 0;
            if reloading {
                while done.load(Ordering::SeqCst) < REQUESTS {
                    let text = if reloads % 2 == 0 { &v2 } else { &v1 };
                    std::fs::write(&file, text).unwrap();
                    impersonate_proxy::reload::reload(&state, "bench")
                        .await
                        .unwrap();
                    reloads += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let mut failed = 0;
            for w in workers {
                failed += w.await.unwrap();
            }
            let secs = started.elapsed().as_secs_f64();
            let rps = REQUESTS as f64 / secs;
            println!(
                "round {round}: reloading={reloading} requests={REQUESTS} reloads={reloads} failed={failed} rps={rps:.0}"
            );
            assert_eq!(failed, 0);
            results.push((reloading, rps));
        }
    }
    let median = |r: bool| {
        let mut v: Vec<f64> = results.iter().filter(|x| x.0 == r).map(|x| x.1).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    println!(
        "median rps without reloads {:.0}, during reloads {:.0}",
        median(false),
        median(true)
    );
    sb.shutdown().await;
}

/// `run` reloads on SIGHUP: the real binary, signalled by its process id.
#[cfg(unix)]
#[tokio::test]
async fn the_binary_reloads_on_sighup() {
    use tokio::io::AsyncBufReadExt;
    let sb = sandbox().await;
    let dir = sb.dir.join("sighup");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("config.yaml");
    let head = format!(
        "listen: 127.0.0.1:0\nadmin: null\nca: {{ cert: \"{}\", key: \"{}\" }}\nsource: {{ file: \"{}\" }}\niam: {{ endpoint: \"{}\" }}\ntokens: {{ warm: false }}\nreload: {{ watch: false }}\n",
        sb.config.ca.cert.display(),
        sb.config.ca.key.display(),
        sb.dir.join("adc.json").display(),
        sb.config.iam.endpoint,
    );
    std::fs::write(&file, format!("{head}{}{ROUTES_V1}", identities(false))).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_impersonate-proxy"))
        .args(["--log-format", "json", "run", "--config"])
        .arg(&file)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap() as libc::pid_t;
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut until = async |needle: &str| {
        let found = tokio::time::timeout(Duration::from_secs(20), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains(needle) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        found.ok().flatten()
    };
    assert!(until("impersonate-proxy serving").await.is_some());
    std::fs::write(&file, format!("{head}{}{ROUTES_V2}", identities(true))).unwrap();
    // SAFETY: signalling the child this test started, by its id.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let line = until("config reloaded")
        .await
        .expect("a reload after SIGHUP");
    assert!(
        line.contains("\"trigger\":\"SIGHUP\"") && line.contains("\"generation\":2"),
        "{line}"
    );
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(Duration::from_secs(40), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    sb.shutdown().await;
}
