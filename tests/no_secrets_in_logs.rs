//! Capture every log line the proxy, token engine and emulator write at TRACE while serving
//! real traffic, and check that no token, refresh token or client secret appears in them.
//! Its own test binary, because it installs the process-wide subscriber.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_logs() {
    let capture = common::Capture::install("impersonate_proxy=trace,info");

    let sb = common::sandbox().await;
    let client = sb.client().unwrap();
    for url in [
        "https://storage.googleapis.com/storage/v1/b/prod-a/o",
        "https://bigquery.googleapis.com/x",
        "https://svc.a.run.app/",
        "https://locked.googleapis.com/x",
    ] {
        client
            .get(url)
            .bearer_auth("client-secret-bearer-xyz")
            .send()
            .await
            .unwrap();
    }
    let tokens: Vec<String> = sb
        .origin
        .seen()
        .iter()
        .filter_map(|s| s.bearer().map(String::from))
        .collect();
    assert!(tokens.len() >= 3, "traffic reached the origin with tokens");
    sb.shutdown().await;

    let logs = capture.text();
    assert!(
        logs.contains("impersonate_proxy::access"),
        "the access log was captured"
    );
    assert!(
        logs.contains("minted"),
        "mints were logged (by fingerprint)"
    );
    for t in &tokens {
        assert!(!logs.contains(t.as_str()), "a token leaked into the logs");
        // Not even a long piece of one.
        assert!(
            !logs.contains(&t[..24]),
            "a token prefix leaked into the logs"
        );
    }
    for secret in [
        "demo-refresh-token",
        "demo-secret",
        "client-secret-bearer-xyz",
    ] {
        assert!(!logs.contains(secret), "`{secret}` leaked into the logs");
    }
}
