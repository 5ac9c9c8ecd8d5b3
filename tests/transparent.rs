//! The transparent listener (`transparent:`), driven by curl with `--resolve` pointing hosts
//! at it, as the hosts file would, with Debian's nginx as the origin. Every refusal closes
//! the connection and writes an access line naming why. Its own test binary, because it
//! installs the process-wide log subscriber.
//!
//! The listener is on a free port P with `transparent.port: P`: curl puts the listener's port
//! in the URL (and so in `Host`), and the proxy then names the same port when it connects or
//! checks the authority, as it names 443 when the listener is reached on 443 or by a
//! `REDIRECT` from it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use common::nginx::Nginx;
use common::*;
use impersonate_proxy::config::Config;
use impersonate_proxy::proxy::transparent::TransparentConfig;
use serde_json::Value;

const ROUTED: &str = "storage.googleapis.com";
const UNROUTED: &str = "unrouted.example.org";
/// An unrouted host `upstream.resolve` maps to the transparent listener itself.
const LOOP: &str = "loop.example.org";
const NAMES: &[&str] = &["storage.googleapis.com", "unrouted.example.org"];

static CAPTURE: OnceLock<Capture> = OnceLock::new();

fn capture() -> &'static Capture {
    CAPTURE.get_or_init(|| Capture::install("impersonate_proxy=info"))
}

/// The access lines that mention every one of `needles`.
fn access_lines(needles: &[&str]) -> Vec<String> {
    capture()
        .text()
        .lines()
        .filter(|l| {
            l.contains("impersonate_proxy::access") && needles.iter().all(|n| l.contains(n))
        })
        .map(String::from)
        .collect()
}

/// A free port on loopback, for a listener that must be named before it is bound.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The sandbox's proxy with a transparent listener on P (see the module documentation), and
/// the routed and unrouted hosts' port P at nginx, `LOOP`'s at the listener itself.
async fn sandbox_for(nginx: &Nginx, tweak: impl FnOnce(&mut Config)) -> (Sandbox, u16) {
    let port = free_port();
    let listener = SocketAddr::from(([127, 0, 0, 1], port));
    let (origin, ca) = (nginx.addr, nginx.ca_file.clone());
    let sb = sandbox_with(move |c| {
        c.transparent = Some(TransparentConfig {
            listen: listener,
            port,
        });
        c.allowed_ports.push(port);
        for host in [ROUTED, UNROUTED] {
            c.upstream.resolve.insert(format!("{host}:{port}"), origin);
        }
        c.upstream
            .resolve
            .insert(format!("{LOOP}:{port}"), listener);
        c.upstream.extra_roots.push(ca);
        tweak(c);
    })
    .await;
    assert_eq!(sb.server.transparent_addr(), Some(listener));
    (sb, port)
}

/// curl to `https://HOST:PORT/echo/t` with HOST resolved to the transparent listener (no
/// proxy), trusting only `ca`, sending a client `Authorization`; `extra` go first.
async fn curl_direct(host: &str, port: u16, ca: &Path, extra: &[&str]) -> std::process::Output {
    let url = format!("https://{host}:{port}/echo/t");
    tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "--noproxy", "*"])
        .args(extra)
        .arg("--resolve")
        .arg(format!("{host}:{port}:127.0.0.1"))
        .arg("--cacert")
        .arg(ca)
        .args(["-H", "Authorization: Bearer client-junk", &url])
        .env("SSL_CERT_FILE", ca)
        .env("CURL_CA_BUNDLE", ca)
        .env("REQUESTS_CA_BUNDLE", ca)
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .output()
        .await
        .expect("curl runs")
}

fn ok_json(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The `Authorization` lines the backend behind nginx received.
fn authorization(v: &Value) -> Vec<String> {
    v["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0] == "authorization")
        .map(|h| h[1].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_hosts_are_intercepted_and_others_tunnelled_blind() {
    capture();
    let nginx = Nginx::start(true, NAMES).await;
    let (sb, port) = sandbox_for(&nginx, |_| {}).await;

    // A routed host: TLS with the proxy's leaf, curl's Authorization replaced by the route's
    // token, on its way to nginx.
    for http in ["--http1.1", "--http2"] {
        let out = curl_direct(ROUTED, port, &sb.ca_path(), &[http]).await;
        let v = ok_json(&out);
        let auth = authorization(&v);
        assert_eq!(auth.len(), 1, "{v}");
        let token = auth[0].strip_prefix("Bearer ").unwrap();
        assert_ne!(token, "client-junk");
        let info = sb.emulator.token_info(token).expect("an emulator token");
        assert_eq!(info.principal, DEV);
    }
    // Its access lines, as for a CONNECT: the route.
    let lines = access_lines(&["access: request", ROUTED, "everything-else"]);
    assert!(lines.len() >= 2, "{}", capture().text());

    // An unrouted host: nothing decrypted. curl trusts nginx's own CA, not the proxy's, and
    // its Authorization reaches nginx as sent.
    let out = curl_direct(UNROUTED, port, &nginx.ca_file, &[]).await;
    let v = ok_json(&out);
    assert_eq!(authorization(&v), ["Bearer client-junk"]);
    let seen = nginx.seen_at_least(3).await;
    assert!(
        seen.iter()
            .any(|s| s["authorization"] == "Bearer client-junk"),
        "{seen:?}"
    );
    // The proxy's CA is not what answers there.
    let out = curl_direct(UNROUTED, port, &sb.ca_path(), &[]).await;
    assert!(!out.status.success());
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    // One tunnel line each (curl may end either with a reset).
    while access_lines(&[": tunnel ", UNROUTED]).len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no tunnel line: {}",
            capture().text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // An unrouted host that resolves to the proxy's own listener: closed, and the proxy never
    // connects to itself (one connection counted, not a chain of them).
    let before = sb
        .server
        .state()
        .metrics
        .connections_total
        .load(Ordering::Relaxed);
    let out = curl_direct(LOOP, port, &nginx.ca_file, &[]).await;
    assert!(!out.status.success(), "the loop was served");
    let lines = access_lines(&["transparent connection closed", LOOP, "own listener"]);
    assert_eq!(lines.len(), 1, "{}", capture().text());
    let after = sb
        .server
        .state()
        .metrics
        .connections_total
        .load(Ordering::Relaxed);
    assert_eq!(after - before, 1, "the proxy connected to itself");

    // No server name (curl sends none for an address): closed, with the reason.
    let out = curl_direct("127.0.0.1", port, &sb.ca_path(), &[]).await;
    assert!(!out.status.success());
    let lines = access_lines(&["transparent connection closed", "no SNI"]);
    assert_eq!(lines.len(), 1, "{}", capture().text());

    // Not TLS at all.
    let answer = raw(
        SocketAddr::from(([127, 0, 0, 1], port)),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!(answer, "");
    assert!(!access_lines(&["transparent connection closed", "not a TLS client hello"]).is_empty());

    nginx.stop().await;
    sb.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_and_client_rules_apply_as_to_connect() {
    capture();
    let nginx = Nginx::start(false, NAMES).await;
    let (sb, port) = sandbox_for(&nginx, |c| {
        c.other_hosts = impersonate_proxy::config::OtherHosts::Deny;
        c.clients.insert(
            "local".into(),
            impersonate_proxy::clients::ClientConfig {
                password_hash: None,
                cidrs: vec!["127.0.0.1".into()],
            },
        );
    })
    .await;

    // The client named by its address is served a routed host.
    let v = ok_json(&curl_direct(ROUTED, port, &sb.ca_path(), &[]).await);
    let auth = authorization(&v);
    let token = auth[0].strip_prefix("Bearer ").unwrap();
    assert_eq!(sb.emulator.token_info(token).unwrap().principal, DEV);
    assert!(
        !access_lines(&["client_name=\"local\"", ROUTED]).is_empty()
            || !access_lines(&["client_name=local", ROUTED]).is_empty(),
        "{}",
        capture().text()
    );

    // A host no route names, under other_hosts: deny: closed before any byte reaches nginx.
    let before = nginx.seen().len();
    let out = curl_direct(UNROUTED, port, &nginx.ca_file, &[]).await;
    assert!(!out.status.success());
    let lines = access_lines(&[
        "transparent connection closed",
        UNROUTED,
        "other_hosts: deny",
    ]);
    assert_eq!(lines.len(), 1, "{}", capture().text());

    // From an address no client has: closed, routed host or not.
    let out = curl_direct(ROUTED, port, &sb.ca_path(), &["--interface", "127.0.0.2"]).await;
    assert!(!out.status.success());
    let lines = access_lines(&[
        "transparent connection closed",
        "127.0.0.2",
        "not a configured client",
    ]);
    assert_eq!(lines.len(), 1, "{}", capture().text());
    assert_eq!(
        nginx.seen().len(),
        before,
        "nginx saw a refused connection's request"
    );

    nginx.stop().await;
    sb.server.shutdown().await;
}
