//! Plain `http://` through the proxy, and where `upstream.resolve` sends each `host:port`.
//! A request that a route gives a token never leaves the proxy in cleartext: it goes upstream
//! over TLS to the host's 443 (`plain_http: upgrade`, the default) or is refused
//! (`plain_http: deny`). Passthrough routes and unrouted hosts carry the client's own request
//! as they did.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::nginx::Echo;
use common::*;
use impersonate_proxy::config::{PlainHttp, RouteConfig};
use serde_json::Value;

/// A sandbox where `storage.googleapis.com:80` and `plain.test:80` are a plain-http echo
/// server, and `storage.googleapis.com:443` stays the sandbox's TLS origin; `plain.test` is a
/// passthrough route.
async fn sandbox_with_port_80(echo: &Echo, plain_http: PlainHttp) -> Sandbox {
    let addr = echo.addr;
    sandbox_with(move |c| {
        c.plain_http = plain_http;
        for host in ["storage.googleapis.com:80", "plain.test:80"] {
            c.upstream.resolve.insert(host.into(), addr);
        }
        c.routes.insert(
            0,
            RouteConfig {
                name: Some("plain-passthrough".into()),
                host: "plain.test".into(),
                path: None,
                methods: vec![],
                identity: None,
                id_token: None,
                passthrough: true,
                clients: vec![],
            },
        );
    })
    .await
}

/// An absolute-form request through the proxy's listener, as `HTTP_PROXY` clients send it.
async fn plain_get(sb: &Sandbox, url: &str) -> reqwest::Response {
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(sb.proxy_url()).unwrap())
        .build()
        .unwrap()
        .get(url)
        .bearer_auth("client-own-token")
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_token_route_over_plain_http_goes_upstream_over_tls() {
    let echo = Echo::start().await;
    let sb = sandbox_with_port_80(&echo, PlainHttp::Upgrade).await;
    let resp = plain_get(&sb, "http://storage.googleapis.com/storage/v1/b/dev-x/o").await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    // The sandbox's TLS origin answered, as the route's identity; port 80 saw nothing.
    assert_eq!(v["identity"], DEV, "{v}");
    assert_eq!(echo.connections(), 0, "no cleartext connection to port 80");
    let seen = sb.origin.seen();
    let last = seen.last().unwrap();
    assert_eq!(last.path, "/storage/v1/b/dev-x/o");
    assert!(sb.emulator.token_info(last.bearer().unwrap()).is_some());

    // A passthrough route keeps the client's own request, in plain http as asked.
    let resp = plain_get(&sb, "http://plain.test/hello").await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    let auth: Vec<&str> = v["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0] == "authorization")
        .map(|h| h[1].as_str().unwrap())
        .collect();
    assert_eq!(auth, ["Bearer client-own-token"]);
    assert_eq!(echo.connections(), 1);
    sb.shutdown().await;
    echo.stop();
}

#[tokio::test]
async fn plain_http_deny_refuses_a_token_route_naming_it() {
    let echo = Echo::start().await;
    let sb = sandbox_with_port_80(&echo, PlainHttp::Deny).await;
    let resp = plain_get(&sb, "http://storage.googleapis.com/storage/v1/b/dev-x/o").await;
    assert_eq!(resp.status(), 403);
    let v: Value = resp.json().await.unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("route `everything-else`") && msg.contains("plain_http: deny"),
        "{msg}"
    );
    assert_eq!(echo.connections(), 0);
    assert!(sb.origin.seen().is_empty(), "nothing went anywhere");
    // Passthrough is not a token route: it still goes.
    assert_eq!(plain_get(&sb, "http://plain.test/x").await.status(), 200);
    sb.shutdown().await;
    echo.stop();
}

/// `host:443` and `host:80` map to two places; HTTPS traffic reaches the `:443` one. (Before,
/// the port was dropped and the last key in order, `:80`, took both.)
#[tokio::test]
async fn resolve_keys_keep_their_ports() {
    let echo = Echo::start().await;
    let sb = sandbox_with_port_80(&echo, PlainHttp::Upgrade).await;
    let resp = sb
        .client()
        .unwrap()
        .get("https://storage.googleapis.com/storage/v1/b/dev-y/o")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(json(resp).await["identity"], DEV);
    // A blind tunnel honours the port too: blind.example.com:443 is the TLS origin, and
    // plain.test:80 the echo server.
    let out = curl(
        &sb,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-k",
            "https://blind.example.com/",
        ],
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    assert_eq!(echo.connections(), 0);
    sb.shutdown().await;
    echo.stop();
}
