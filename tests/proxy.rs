//! The proxy end to end: real clients (reqwest, curl, raw sockets) through the proxy to a
//! local TLS origin, with tokens from the emulator.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use impersonate_proxy::config::{OtherHosts, Unmatched};

#[tokio::test]
async fn two_routes_reach_the_origin_as_two_identities_and_junk_auth_is_replaced() {
    let sb = sandbox().await;
    let client = sb.client().unwrap();
    let r = client
        .get("https://storage.googleapis.com/storage/v1/b/prod-logs/o")
        .bearer_auth("junk-from-the-client")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(json(r).await["identity"], READER);
    let r = client
        .post("https://bigquery.googleapis.com/bigquery/v2/projects/p/jobs")
        .header("authorization", "Bearer one")
        .header("authorization", "Basic two")
        .send()
        .await
        .unwrap();
    let body = json(r).await;
    assert_eq!(body["identity"], JOBS);
    assert_eq!(body["user_project"], "demo-project");
    let seen = sb.origin.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        let auths: Vec<_> = s.headers.get_all("authorization").iter().collect();
        assert_eq!(
            auths.len(),
            1,
            "exactly one Authorization reaches the origin"
        );
        let token = s.bearer().unwrap();
        assert!(token.starts_with("ya29.emu."), "an emulator-issued token");
        assert!(sb.emulator.token_info(token).is_some());
    }
    assert_eq!(seen[0].host, "storage.googleapis.com");
    sb.shutdown().await;
}

#[tokio::test]
async fn curl_through_the_proxy_gets_the_routes_identity() {
    let sb = sandbox().await;
    let out = curl(
        &sb,
        &[
            "-H",
            "Authorization: Bearer junk",
            "https://storage.googleapis.com/storage/v1/b/dev-bucket/o",
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["identity"], DEV);
    sb.shutdown().await;
}

#[tokio::test]
async fn keep_alive_reuses_one_client_connection_and_one_upstream_connection() {
    let sb = sandbox().await;
    let client = sb.client().unwrap();
    for i in 0..20 {
        let r = client
            .get(format!(
                "https://storage.googleapis.com/storage/v1/b/prod-{i}/o"
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let m = &sb.server.state().metrics;
    assert_eq!(m.intercepts_total.load(Ordering::SeqCst), 1);
    assert_eq!(sb.origin.connections(), 1, "upstream leg pooled");
    assert_eq!(sb.origin.seen().len(), 20);
    sb.shutdown().await;
}

#[tokio::test]
async fn a_client_connection_close_does_not_cost_an_upstream_handshake() {
    // Each worker thread keeps its own upstream pool: however many client connections come and
    // go, the origin sees at most one connection per worker.
    let sb = sandbox_with(|c| c.limits.workers = 2).await;
    for _ in 0..8 {
        let out = curl(
            &sb,
            &[
                "--http1.1",
                "-H",
                "Connection: close",
                "https://bigquery.googleapis.com/x",
            ],
        )
        .await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        sb.server
            .state()
            .metrics
            .intercepts_total
            .load(Ordering::SeqCst),
        8
    );
    let upstream = sb.origin.connections();
    assert!(
        (1..=2).contains(&upstream),
        "upstream stays pooled per worker: {upstream} connections for 8 clients"
    );
    sb.shutdown().await;
}

/// `n` GETs at once through the proxy, each to its own path; their statuses.
async fn at_once(client: &reqwest::Client, tag: &str, n: usize) -> Vec<u16> {
    let calls = (0..n).map(|i| {
        let client = client.clone();
        let url = format!("https://storage.googleapis.com/storage/v1/b/{tag}-{i}/o");
        async move {
            client
                .get(url)
                .send()
                .await
                .map_or(0, |r| r.status().as_u16())
        }
    });
    futures_util::future::join_all(calls).await
}

#[tokio::test]
async fn concurrent_first_requests_share_one_upstream_connect() {
    // One worker, so every request below needs that worker's one h2 connection to the origin,
    // which none has yet: one connects, the others wait for it and then use it.
    let sb = sandbox_with(|c| c.limits.workers = 1).await;
    let client = sb.client().unwrap();
    assert_eq!(at_once(&client, "first", 32).await, vec![200; 32]);
    assert_eq!(
        sb.origin.connections(),
        1,
        "one connect for 32 waiting requests"
    );
    assert_eq!(sb.origin.seen().len(), 32);
    sb.shutdown().await;
}

#[tokio::test]
async fn an_origin_ending_its_h2_connections_costs_no_request() {
    // Front ends end h2 connections with a GOAWAY at some age; requests that meet one are
    // sent again on a new connection, never failed.
    let sb = sandbox_with(|c| c.limits.workers = 1).await;
    sb.origin.set_requests_per_connection(5);
    let client = sb.client().unwrap();
    for round in 0..6 {
        let tag = format!("goaway-{round}");
        assert_eq!(
            at_once(&client, &tag, 8).await,
            vec![200; 8],
            "round {round}"
        );
    }
    for i in 0..12 {
        let r = client
            .get(format!(
                "https://storage.googleapis.com/storage/v1/b/seq-{i}/o"
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "sequential request {i}");
    }
    assert_eq!(sb.origin.seen().len(), 60);
    // Each round of 8 outlives its connection (the origin finishes the streams it took), and
    // the 12 sequential requests need at least 2 more connections.
    let opened = sb.origin.connections();
    assert!(
        opened >= 8,
        "60 requests at 5 per connection took only {opened} connections"
    );
    sb.shutdown().await;
}

#[tokio::test]
async fn an_idle_upstream_connection_is_closed_then_reopened_on_demand() {
    let sb = sandbox_with(|c| {
        c.limits.workers = 1;
        c.upstream.idle_timeout = Duration::from_secs(1);
    })
    .await;
    let client = sb.client().unwrap();
    assert_eq!(at_once(&client, "idle", 4).await, vec![200; 4]);
    assert_eq!(sb.origin.connections(), 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sb.origin.closed() < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the idle upstream connection was never closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(at_once(&client, "again", 4).await, vec![200; 4]);
    assert_eq!(
        sb.origin.connections(),
        2,
        "a new connection after the idle one closed"
    );
    sb.shutdown().await;
}

#[tokio::test]
async fn an_unrouted_host_is_tunnelled_blind() {
    let sb = sandbox().await;
    // The client trusts only the origin's own CA: the handshake can only succeed end to end
    // with the origin, so the proxy never saw plaintext.
    let origin_ca = reqwest::Certificate::from_pem(sb.origin.ca_pem().as_bytes()).unwrap();
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(sb.proxy_url()).unwrap())
        .tls_certs_only([origin_ca])
        .resolve("blind.example.com", sb.origin.addr())
        .build()
        .unwrap();
    let r = client
        .get("https://blind.example.com/anything")
        .bearer_auth("the-clients-own")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = sb.origin.seen();
    assert_eq!(seen[0].bearer(), Some("the-clients-own"), "untouched");
    let m = &sb.server.state().metrics;
    assert_eq!(m.tunnels_total.load(Ordering::SeqCst), 1);
    assert_eq!(m.intercepts_total.load(Ordering::SeqCst), 0);
    sb.shutdown().await;
}

#[tokio::test]
async fn other_hosts_deny_refuses_connect_with_403() {
    let sb = sandbox_with(|c| c.other_hosts = OtherHosts::Deny).await;
    let resp = raw(
        sb.server.proxy_addr(),
        b"CONNECT blind.example.com:443 HTTP/1.1\r\nHost: blind.example.com:443\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(resp.contains("\"PERMISSION_DENIED\""), "{resp}");
    assert!(resp.contains("other_hosts: deny"), "{resp}");
    sb.shutdown().await;
}

#[tokio::test]
async fn unmatched_path_on_a_routed_host_is_refused_or_forwarded_untouched() {
    let drop_catch_all = |c: &mut impersonate_proxy::config::Config| {
        c.routes.retain(|r| r.host != "*.googleapis.com");
    };
    let sb = sandbox_with(|c| {
        drop_catch_all(c);
        c.unmatched = Unmatched::Deny;
    })
    .await;
    let client = sb.client().unwrap();
    let r = client
        .get("https://storage.googleapis.com/storage/v1/b/dev-bucket/o")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v = json(r).await;
    assert_eq!(v["error"]["status"], "PERMISSION_DENIED");
    assert!(sb.origin.seen().is_empty());
    sb.shutdown().await;

    let sb = sandbox_with(drop_catch_all).await;
    let client = sb.client().unwrap();
    let r = client
        .delete("https://storage.googleapis.com/storage/v1/b/prod-logs")
        .bearer_auth("users-own")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        sb.origin.seen()[0].bearer(),
        Some("users-own"),
        "no identity given"
    );
    sb.shutdown().await;
}

#[tokio::test]
async fn a_denied_identity_gets_503_with_googles_message_and_no_token() {
    let sb = sandbox().await;
    let r = sb
        .client()
        .unwrap()
        .get("https://locked.googleapis.com/v1/x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let v = json(r).await;
    assert_eq!(v["error"]["code"], 503);
    assert_eq!(v["error"]["status"], "UNAVAILABLE");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("route `locked`") && msg.contains("identity `locked`"),
        "{msg}"
    );
    assert!(msg.contains("iam.serviceAccounts.getAccessToken"), "{msg}");
    assert!(!msg.contains("ya29"), "{msg}");
    sb.shutdown().await;
}

#[tokio::test]
async fn origin_down_is_a_502() {
    // Point the route at a port nobody listens on.
    let sb = sandbox_with(|c| {
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = dead.local_addr().unwrap();
        drop(dead);
        c.upstream
            .resolve
            .insert("bigquery.googleapis.com:443".into(), addr);
    })
    .await;
    let r = sb
        .client()
        .unwrap()
        .get("https://bigquery.googleapis.com/x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let v = json(r).await;
    assert_eq!(v["error"]["status"], "UNAVAILABLE");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("bigquery.googleapis.com:443"));
    sb.shutdown().await;
}

#[tokio::test]
async fn malformed_and_refused_requests_get_clean_errors() {
    let sb = sandbox().await;
    let addr = sb.server.proxy_addr();
    // Origin-form to the proxy itself: not an open relay, not a web server.
    let r = raw(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert!(r.contains("INVALID_ARGUMENT"), "{r}");
    // CONNECT without a port.
    let r = raw(
        addr,
        b"CONNECT storage.googleapis.com HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    // A port that is not allowed.
    let r = raw(
        addr,
        b"CONNECT storage.googleapis.com:22 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    assert!(r.contains("port 22"), "{r}");
    // Garbage.
    let r = raw(addr, b"\x16\x03\x01 not http at all\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 400") || r.is_empty(), "{r}");
    // The proxy still serves after all that.
    let ok = sb
        .client()
        .unwrap()
        .get("https://bigquery.googleapis.com/x")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    sb.shutdown().await;
}

#[tokio::test]
async fn absolute_form_http_obeys_the_port_policy() {
    let sb = sandbox_with(|c| {
        c.routes.push(impersonate_proxy::config::RouteConfig {
            name: Some("plain".into()),
            host: "plain.test".into(),
            path: None,
            methods: vec![],
            identity: None,
            id_token: None,
            passthrough: true,
            clients: vec![],
        });
    })
    .await;
    let r = raw(
        sb.server.proxy_addr(),
        b"GET http://plain.test:8/ HTTP/1.1\r\nHost: plain.test:8\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 403"), "port 8 is not allowed: {r}");
    sb.shutdown().await;
}

#[tokio::test]
async fn h2_on_both_legs_each_request_with_its_routes_token() {
    let sb = sandbox().await;
    let client = sb.client().unwrap();
    let a = client
        .get("https://storage.googleapis.com/storage/v1/b/prod-a/o")
        .send();
    let b = client
        .get("https://storage.googleapis.com/storage/v1/b/dev-b/o")
        .send();
    let (a, b) = tokio::join!(a, b);
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(
        a.version(),
        http::Version::HTTP_2,
        "client leg negotiated h2"
    );
    assert_eq!(json(a).await["identity"], READER);
    assert_eq!(json(b).await["identity"], DEV);
    for s in sb.origin.seen() {
        assert_eq!(
            s.version,
            http::Version::HTTP_2,
            "upstream leg negotiated h2"
        );
    }
    // An HTTP/1.1-only client to the same h2 origin.
    let out = curl(
        &sb,
        &["--http1.1", "https://pubsub.googleapis.com/v1/topics"],
    )
    .await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["identity"], DEV);
    assert_eq!(v["version"], "HTTP/2.0");
    sb.shutdown().await;
}

#[tokio::test]
async fn admin_endpoints_report_health_readiness_and_metrics() {
    let sb = sandbox_with(|c| c.admin = Some(any_port())).await;
    let admin = sb.server.admin_addr().unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let get = |p: &'static str| http.get(format!("http://{admin}{p}")).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    // `locked` can never be minted, so this replica never becomes ready.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get("/readyz").await.unwrap().status(), 503);
    sb.client()
        .unwrap()
        .get("https://bigquery.googleapis.com/x")
        .send()
        .await
        .unwrap();
    let m = get("/metrics").await.unwrap().text().await.unwrap();
    assert!(
        m.contains(
            "impersonate_proxy_requests_total{route=\"bigquery\",identity=\"jobs\",client=\"none\",method=\"read\",status=\"2xx\"} 1"
        ),
        "{m}"
    );
    assert!(m.contains("impersonate_proxy_token_mints_total"), "{m}");
    sb.shutdown().await;

    let sb = sandbox_with(|c| {
        c.admin = Some(any_port());
        c.routes.retain(|r| r.identity.as_deref() != Some("locked"));
    })
    .await;
    let admin = sb.server.admin_addr().unwrap();
    let mut ready = false;
    for _ in 0..50 {
        if http
            .get(format!("http://{admin}/readyz"))
            .send()
            .await
            .unwrap()
            .status()
            == 200
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "ready once every identity is warm");
    sb.shutdown().await;
}

/// A sandbox whose `ws.googleapis.com` is the [`upgrade_origin`], trusted through a CA file
/// the caller removes.
async fn http1_origin_sandbox() -> (Sandbox, std::path::PathBuf) {
    let (addr, ca) = upgrade_origin().await;
    let ca_file =
        std::env::temp_dir().join(format!("ws-ca-{}-{}.pem", std::process::id(), addr.port()));
    std::fs::write(&ca_file, ca).unwrap();
    let sb = sandbox_with(|c| {
        c.upstream
            .resolve
            .insert("ws.googleapis.com:443".into(), addr);
        c.upstream.extra_roots.push(ca_file.clone());
    })
    .await;
    (sb, ca_file)
}

/// An HTTP/1.1-only TLS origin that switches to an echo protocol on `Upgrade: echo`, answers
/// 413 on `/refuse` without reading the body, reads the whole body on `/read` (hyper sends the
/// 100 Continue then) and answers anything else normally.
async fn upgrade_origin() -> (std::net::SocketAddr, String) {
    use hyper_util::rt::TokioIo;
    let (mut tls, ca) = impersonate_proxy::origin::tls_config(&["ws.googleapis.com"]).unwrap();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(io) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    |mut req: http::Request<hyper::body::Incoming>| async move {
                        use http_body_util::BodyExt;
                        match req.uri().path() {
                            "/refuse" => {
                                let mut resp = http::Response::new(http_body_util::Empty::new());
                                *resp.status_mut() = http::StatusCode::PAYLOAD_TOO_LARGE;
                                return Ok(resp);
                            }
                            "/read" => {
                                let n = match req.into_body().collect().await {
                                    Ok(b) => b.to_bytes().len(),
                                    Err(_) => 0,
                                };
                                let mut resp = http::Response::new(http_body_util::Empty::new());
                                resp.headers_mut().insert("x-read", n.into());
                                return Ok(resp);
                            }
                            _ => {}
                        }
                        let wants_echo = req.headers().get("upgrade").is_some_and(|v| v == "echo");
                        let mut resp =
                            http::Response::new(http_body_util::Empty::<bytes::Bytes>::new());
                        if wants_echo {
                            let on = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                let mut io = TokioIo::new(on.await.unwrap());
                                let mut buf = [0u8; 64];
                                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                                while let Ok(n) = io.read(&mut buf).await {
                                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            });
                            *resp.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
                            resp.headers_mut()
                                .insert("upgrade", http::HeaderValue::from_static("echo"));
                            resp.headers_mut()
                                .insert("connection", http::HeaderValue::from_static("upgrade"));
                        } else {
                            let seen = format!(
                                "{:?} bearer={}",
                                req.version(),
                                req.headers()
                                    .get("authorization")
                                    .is_some_and(|v| v.as_bytes().starts_with(b"Bearer "))
                            );
                            if let Ok(v) = http::HeaderValue::from_str(&seen) {
                                resp.headers_mut().insert("x-origin-saw", v);
                            }
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(io), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (addr, ca)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_requests_behave_as_the_origin_decides() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (sb, ca_file) = http1_origin_sandbox().await;
    for (proto, expect_switch) in [("echo", true), ("teapot", false)] {
        let mut tls = tls_via_proxy(&sb, "ws.googleapis.com", &[b"http/1.1"]).await;
        tls.write_all(
            format!("GET /stream HTTP/1.1\r\nHost: ws.googleapis.com\r\nConnection: Upgrade\r\nUpgrade: {proto}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let h = read_head(&mut tls).await;
        if expect_switch {
            assert!(h.starts_with("HTTP/1.1 101"), "{h}");
            assert!(h.to_ascii_lowercase().contains("upgrade: echo"), "{h}");
            tls.write_all(b"ping through the proxy").await.unwrap();
            let mut buf = [0u8; 22];
            tls.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"ping through the proxy");
        } else {
            assert!(
                h.starts_with("HTTP/1.1 200"),
                "origin refused the upgrade: {h}"
            );
        }
    }

    // The other mix: an h2 client to this HTTP/1.1-only origin.
    let r = sb
        .client()
        .unwrap()
        .get("https://ws.googleapis.com/plain")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), http::Version::HTTP_2, "client leg is h2");
    assert_eq!(
        r.headers().get("x-origin-saw").map(|v| v.as_bytes()),
        Some(&b"HTTP/1.1 bearer=true"[..]),
        "upstream leg fell back to HTTP/1.1, with a token"
    );
    sb.shutdown().await;
    let _ = std::fs::remove_file(ca_file);
}

/// curl POSTs `data` (`@file`) with `Expect: 100-continue`, willing to wait 15 s for the 100,
/// verbose on stderr; stdout ends with the status code, and with `--size` also the bytes
/// uploaded. Also returns how long it took.
async fn post_expecting_continue(
    sb: &Sandbox,
    data: &str,
    url: &str,
) -> (std::process::Output, Duration) {
    post_expecting_continue_with(sb, data, url, "\n%{http_code}").await
}

async fn post_expecting_continue_with(
    sb: &Sandbox,
    data: &str,
    url: &str,
    write_out: &str,
) -> (std::process::Output, Duration) {
    let started = std::time::Instant::now();
    let out = curl(
        sb,
        &[
            "--http1.1",
            "-v",
            "--expect100-timeout",
            "15",
            "-H",
            "Expect: 100-continue",
            "--data-binary",
            data,
            "-w",
            write_out,
            url,
        ],
    )
    .await;
    (out, started.elapsed())
}

/// A temporary file of `n` bytes `byte` for curl's `--data-binary`, and that argument.
fn upload_file(tag: &str, n: usize, byte: u8) -> (std::path::PathBuf, String) {
    let file = std::env::temp_dir().join(format!("ip-{tag}-{}.bin", std::process::id()));
    std::fs::write(&file, vec![byte; n]).unwrap();
    let data = format!("@{}", file.display());
    (file, data)
}

/// `Expect: 100-continue`: the expectation travels to the origin with the request. An origin
/// that reads the body gets all of it (the client is told to go on as soon as the proxy starts
/// streaming the body upstream, not after curl's expect timeout), and an origin that answers
/// without reading it gets its final status to the client.
#[tokio::test]
async fn expect_100_continue_follows_the_origin() {
    const N: usize = 2 * 1024 * 1024;
    let sb = sandbox().await;
    let (file, data) = upload_file("expect", N, b'e');
    let (out, took) =
        post_expecting_continue(&sb, &data, "https://storage.googleapis.com/upload").await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.ends_with("\n200"), "{stdout}");
    assert!(stderr.contains("100 Continue"), "{stderr}");
    assert!(
        took < Duration::from_secs(10),
        "waited for the expect timeout: {took:?}"
    );
    assert_eq!(sb.origin.uploaded(), N as u64);
    let seen = sb.origin.seen();
    let last = seen.last().unwrap();
    assert_eq!(
        last.headers.get("expect").map(|v| v.as_bytes()),
        Some(&b"100-continue"[..]),
        "the expectation reaches the origin"
    );

    // The origin answers 413 without reading a byte: the client gets the 413, promptly.
    let (out, took) =
        post_expecting_continue(&sb, &data, "https://storage.googleapis.com/status/413").await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        stdout.ends_with("\n413"),
        "{stdout} / {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert_eq!(sb.origin.uploaded(), N as u64, "nothing more was uploaded");
    let _ = std::fs::remove_file(&file);
    sb.shutdown().await;
}

/// An origin may answer before it has read the request body (a 413, a 401 for a bad token).
/// The client, still uploading, must get that answer, not a reset connection: the proxy reads
/// and discards the rest of the body for a while instead of closing on unread bytes.
#[tokio::test]
async fn an_early_answer_reaches_a_client_that_is_still_uploading() {
    const N: usize = 8 * 1024 * 1024;
    let sb = sandbox().await;
    let (file, data) = upload_file("early", N, b'x');
    for round in 0..5 {
        let out = curl(
            &sb,
            &[
                "--http1.1",
                "-H",
                "Expect:",
                "--data-binary",
                &data,
                "-w",
                "\n%{http_code}",
                "https://storage.googleapis.com/status/413",
            ],
        )
        .await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.ends_with("\n413"),
            "round {round}: {stdout} / {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(sb.origin.uploaded(), 0, "the origin read nothing");

    // Over h2 the proxy resets the request stream after the answer, as the origin does. (curl
    // 7.88 reports that reset as an error, talking to the h2 origin directly too, so this uses
    // hyper's h2 client.)
    let h2 = sb.client().unwrap();
    for _ in 0..3 {
        let r = h2
            .post("https://storage.googleapis.com/status/413")
            .body(vec![b'z'; N])
            .send()
            .await
            .unwrap();
        assert_eq!(r.version(), http::Version::HTTP_2);
        assert_eq!(r.status(), 413);
    }

    // A client that sends its whole body anyway gets the answer too, and once the rest is
    // discarded its connection stays usable.
    let pem = std::fs::read(sb.ca_path()).unwrap();
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(sb.proxy_url()).unwrap())
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
        .http1_only()
        .build()
        .unwrap();
    let before = sb
        .server
        .state()
        .metrics
        .intercepts_total
        .load(Ordering::SeqCst);
    for _ in 0..3 {
        let r = client
            .post("https://storage.googleapis.com/status/413")
            .body(vec![b'y'; 2 * 1024 * 1024])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 413);
        r.bytes().await.unwrap();
    }
    let r = client
        .get("https://storage.googleapis.com/storage/v1/b/dev-bucket/o")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let after = sb
        .server
        .state()
        .metrics
        .intercepts_total
        .load(Ordering::SeqCst);
    assert_eq!(after - before, 1, "one connection for all four requests");
    let _ = std::fs::remove_file(&file);
    sb.shutdown().await;
}

/// Towards an HTTP/1.1 origin, `Expect: 100-continue` waits for the origin's own answer: a
/// refusal reaches the client before it has sent a byte, and an origin that reads the body
/// sends the 100 that lets it go. This holds for the very first request to the origin, before
/// any connection has told the proxy which protocol it speaks.
#[tokio::test]
async fn expect_100_continue_towards_http1_waits_for_the_origins_answer() {
    const N: usize = 2 * 1024 * 1024;
    let (sb, ca_file) = http1_origin_sandbox().await;
    let (file, data) = upload_file("expect1", N, b'h');

    let send = |path: &'static str| {
        let url = format!("https://ws.googleapis.com{path}");
        let (sb, data) = (&sb, &data);
        async move {
            let (out, took) =
                post_expecting_continue_with(sb, data, &url, "\n%{http_code} %{size_upload}").await;
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            (format!("{stdout}\n{stderr}"), stdout, took)
        }
    };
    let (text, stdout, took) = send("/refuse").await;
    assert!(
        stdout.ends_with("\n413 0"),
        "refused before any upload: {text}"
    );
    assert!(!text.contains("100 Continue"), "{text}");
    assert!(took < Duration::from_secs(10), "{took:?}");

    let (text, stdout, took) = send("/read").await;
    assert!(stdout.ends_with(&format!("\n200 {N}")), "{text}");
    assert!(text.contains("< HTTP/1.1 100 Continue"), "{text}");
    assert!(text.contains(&format!("< x-read: {N}")), "{text}");
    assert!(
        took < Duration::from_secs(10),
        "waited out curl's timeout: {took:?}"
    );
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(ca_file);
    sb.shutdown().await;
}

/// A client that sends its TLS client hello in the same write as its CONNECT, before the
/// proxy's answer, as a client that does not wait for the 200 may. The CONNECT head goes out
/// in front of the first write; on the read side the answer's head is taken off and kept.
struct Eager {
    tcp: tokio::net::TcpStream,
    connect: Option<Vec<u8>>,
    answer: Vec<u8>,
    after_answer: Option<Vec<u8>>,
}

impl tokio::io::AsyncWrite for Eager {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if let Some(mut all) = this.connect.take() {
            all.extend_from_slice(buf);
            // A few hundred bytes to a fresh loopback socket: taken whole, in one segment.
            let n = this.tcp.try_write(&all)?;
            assert_eq!(
                n,
                all.len(),
                "the CONNECT and the client hello in one write"
            );
            return std::task::Poll::Ready(Ok(buf.len()));
        }
        std::pin::Pin::new(&mut this.tcp).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

impl tokio::io::AsyncRead for Eager {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = self.get_mut();
        while this.after_answer.is_none() {
            let mut b = [0u8; 512];
            let mut rb = tokio::io::ReadBuf::new(&mut b);
            match std::pin::Pin::new(&mut this.tcp).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => this.answer.extend_from_slice(rb.filled()),
                other => return other,
            }
            if let Some(end) = this.answer.windows(4).position(|w| w == b"\r\n\r\n") {
                this.after_answer = Some(this.answer.split_off(end + 4));
            }
        }
        if let Some(rest) = this.after_answer.as_mut().filter(|r| !r.is_empty()) {
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            rest.drain(..n);
            return Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.tcp).poll_read(cx, buf)
    }
}

/// A client hello that comes in the same read as its CONNECT is the TLS accept's first
/// input, whichever path serves the CONNECT: the proxy's own (a plain CONNECT) or hyper's
/// (here one with `Content-Length: 0`, which the quick path leaves to hyper), where what hyper
/// read past the head is put back in front of the stream.
#[tokio::test]
async fn a_client_hello_in_the_same_write_as_its_connect_is_not_lost() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sb = sandbox().await;
    let connector = proxy_tls(&sb, &[b"http/1.1"]);
    let host = "storage.googleapis.com";
    for (extra, hyper_s) in [("", false), ("Content-Length: 0\r\n", true)] {
        let tcp = tokio::net::TcpStream::connect(sb.server.proxy_addr())
            .await
            .unwrap();
        let eager = Eager {
            tcp,
            connect: Some(
                format!("CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n{extra}\r\n").into(),
            ),
            answer: Vec::new(),
            after_answer: None,
        };
        let name = rustls::pki_types::ServerName::try_from(host).unwrap();
        // A client hello lost on the way would leave the handshake waiting for ever.
        let mut tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, eager))
            .await
            .expect("the handshake finished")
            .unwrap();
        let answer = String::from_utf8_lossy(&tls.get_ref().0.answer).into_owned();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        // hyper's answer carries a date; the quick path's does not. Either way, the path
        // this case is about was taken.
        assert_eq!(answer.contains("date:"), hyper_s, "{answer}");
        tls.write_all(
            format!("GET /storage/v1/b/prod-logs/o HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut response = Vec::new();
        tls.read_to_end(&mut response).await.unwrap();
        let response = String::from_utf8_lossy(&response);
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.contains(READER), "{response}");
    }
    assert_eq!(sb.origin.seen().len(), 2);
    sb.shutdown().await;
}
