//! Every refusal or failure writes an access line naming the client's address, the
//! `host:port` it asked for, the route (if any), the status and the reason. Its own test
//! binary, because it installs the process-wide subscriber.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

/// The access lines (target `impersonate_proxy::access`) that mention `needle`.
fn lines_with(capture: &Capture, needle: &str) -> Vec<String> {
    capture
        .text()
        .lines()
        .filter(|l| l.contains("impersonate_proxy::access") && l.contains(needle))
        .map(String::from)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_failures_each_write_an_access_line() {
    let capture = Capture::install("impersonate_proxy=info");
    // A host no route names, whose :443 nobody listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let sb = sandbox_with(|c| {
        c.upstream
            .resolve
            .insert("dead.example.com:443".into(), dead);
    })
    .await;
    let addr = sb.server.proxy_addr();

    // A port refusal, from a client whose address the line must name.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let client = s.local_addr().unwrap().to_string();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"CONNECT storage.googleapis.com:22 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 403"));
    drop(s);

    // An unreachable tunnel target is a failure (502), not a refusal.
    let r = raw(
        addr,
        b"CONNECT dead.example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 502"), "{r}");

    // A request a route maps to an identity the emulator refuses: 503, with route and reason.
    let resp = sb
        .client()
        .unwrap()
        .get("https://locked.googleapis.com/v1/x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    // A Host naming another authority: 421.
    let out = curl(
        &sb,
        &[
            "--http1.1",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "Host: evil.example.com",
            "https://bigquery.googleapis.com/x",
        ],
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "421");
    sb.shutdown().await;

    let port = lines_with(&capture, "storage.googleapis.com:22");
    assert_eq!(port.len(), 1, "{port:?}");
    let l = &port[0];
    assert!(
        l.contains(&format!("client={client}"))
            && l.contains("status=403")
            && l.contains("route=\"-\"")
            && l.contains("not in allowed_ports")
            && l.contains("refused"),
        "{l}"
    );
    let dead = lines_with(&capture, "dead.example.com:443");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        dead[0].contains("status=502")
            && dead[0].contains("failed")
            && dead[0].contains("unreachable"),
        "{}",
        dead[0]
    );
    let locked = lines_with(&capture, "host=locked.googleapis.com");
    assert_eq!(locked.len(), 1, "{locked:?}");
    let l = &locked[0];
    assert!(
        l.contains("port=443")
            && l.contains("status=503")
            && l.contains("route=\"locked\"")
            && l.contains("reason=")
            && l.contains("getAccessToken"),
        "{l}"
    );
    let spoof = lines_with(&capture, "status=421");
    assert_eq!(spoof.len(), 1, "{spoof:?}");
    assert!(
        spoof[0].contains("host=bigquery.googleapis.com") && spoof[0].contains("evil.example.com"),
        "{}",
        spoof[0]
    );
}
