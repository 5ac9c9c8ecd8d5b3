//! Issue 14: no reach into internal networks, errors that reveal nothing to scan with, idle
//! clients closed, and the smaller defects (IPv6 literals, `connections_active`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A TCP echo server on `addr` (port 0), counting the connections it accepted.
async fn echo(addr: &str) -> Option<(SocketAddr, Arc<AtomicU64>)> {
    let l = tokio::net::TcpListener::bind(addr).await.ok()?;
    let at = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Some((at, accepted))
}

/// CONNECT `target` and, on 200, check bytes come back through the tunnel. The head of the
/// proxy's answer and its body, if it sent one (`Connection: close`: a refusal then ends the
/// connection, and the read with it).
async fn connect_to(proxy: SocketAddr, target: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    s.write_all(
        format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await;
    if head.starts_with("HTTP/1.1 200") {
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"ping", "{target}: bytes through the tunnel");
        return head;
    }
    let mut body = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut body)).await;
    head + &String::from_utf8_lossy(&body)
}

#[tokio::test]
async fn internal_destinations_are_refused_by_default() {
    let (addr, accepted) = echo("127.0.0.1:0").await.unwrap();
    let port = addr.port();
    let sb = sandbox_with(|c| {
        c.allowed_ports.push(port);
        // An explicit resolve entry is the operator's choice: it connects.
        c.upstream
            .resolve
            .insert(format!("mapped.example.com:{port}"), addr);
    })
    .await;
    let proxy = sb.server.proxy_addr();
    for target in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("127.1.2.3:{port}"),
        format!("[::1]:{port}"),
        format!("[::ffff:127.0.0.1]:{port}"),
        format!("10.0.0.1:{port}"),
        format!("0.0.0.0:{port}"),
        "169.254.169.254:80".to_string(),
    ] {
        let r = connect_to(proxy, &target).await;
        assert!(r.starts_with("HTTP/1.1 403"), "{target}: {r}");
        // The client hears that it was refused, not why or what answers there.
        assert!(r.contains(&format!("{target} refused")), "{target}: {r}");
        assert!(!r.contains("internal"), "{target}: {r}");
    }
    // Absolute-form plain http to a loopback address (the upstream client's dialer): refused
    // the same way.
    let r = raw(
        proxy,
        format!(
            "GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "nothing was connected to"
    );

    let r = connect_to(proxy, &format!("mapped.example.com:{port}")).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    sb.shutdown().await;
}

#[tokio::test]
async fn allow_internal_opens_cidrs_and_names_on_purpose() {
    let (addr, accepted) = echo("127.0.0.1:0").await.unwrap();
    let port = addr.port();
    let sb = sandbox_with(|c| {
        c.allowed_ports.push(port);
        c.upstream.allow_internal = vec!["127.0.0.0/30".into(), "localhost".into()];
    })
    .await;
    let proxy = sb.server.proxy_addr();
    for target in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
        let r = connect_to(proxy, &target).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{target}: {r}");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    // Outside the CIDR: still refused.
    let r = connect_to(proxy, &format!("127.0.0.9:{port}")).await;
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    sb.shutdown().await;
}

/// CONNECT to an IPv6 literal connects to the address (the brackets used to go to DNS).
#[tokio::test]
async fn connect_to_an_ipv6_literal() {
    let Some((addr, _)) = echo("[::1]:0").await else {
        eprintln!("no IPv6 loopback here; skipped");
        return;
    };
    let port = addr.port();
    let sb = sandbox_with(|c| {
        c.allowed_ports.push(port);
        c.upstream.allow_internal = vec!["::1/128".into()];
    })
    .await;
    let r = connect_to(sb.server.proxy_addr(), &format!("[::1]:{port}")).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    sb.shutdown().await;
}

/// A target that does not answer is "unreachable", without the cause ("Connection refused"
/// would tell a scanner which ports are closed); the access log keeps the cause.
#[tokio::test]
async fn failed_connects_say_only_unreachable() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let sb = sandbox_with(|c| {
        c.upstream
            .resolve
            .insert("dead.example.com:443".into(), dead);
        c.upstream
            .resolve
            .insert("dead.googleapis.com:443".into(), dead);
    })
    .await;
    let r = connect_to(sb.server.proxy_addr(), "dead.example.com:443").await;
    assert!(r.starts_with("HTTP/1.1 502"), "{r}");
    assert!(r.contains("dead.example.com:443 unreachable"), "{r}");
    assert!(!r.to_lowercase().contains("refused"), "{r}");
    // The same through the upstream client, on an intercepted route.
    let resp = sb
        .client()
        .unwrap()
        .get("https://dead.googleapis.com/x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    let text = resp.text().await.unwrap();
    assert!(
        text.contains("dead.googleapis.com:443 unreachable"),
        "{text}"
    );
    assert!(!text.to_lowercase().contains("refused"), "{text}");
    sb.shutdown().await;
}

#[tokio::test]
async fn metadata_flavor_never_reaches_the_origin() {
    let sb = sandbox().await;
    let resp = sb
        .client()
        .unwrap()
        .get("https://storage.googleapis.com/storage/v1/b/dev-x/o")
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = sb.origin.seen();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].headers.get("metadata-flavor").is_none());
    sb.shutdown().await;
}

/// `connections_active` counts CONNECT sessions for as long as they live.
#[tokio::test]
async fn connections_active_counts_open_sessions() {
    let sb = sandbox().await;
    let mut sessions = Vec::new();
    for _ in 0..3 {
        sessions.push(tls_via_proxy(&sb, "storage.googleapis.com", &[b"http/1.1"]).await);
    }
    let m = &sb.server.state().metrics;
    let mut active = 0;
    for _ in 0..50 {
        active = m.connections_active.load(Ordering::SeqCst);
        if active == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(active, 3);
    drop(sessions);
    for _ in 0..100 {
        active = m.connections_active.load(Ordering::SeqCst);
        if active == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(active, 0, "counted down when they close");
    sb.shutdown().await;
}

/// Read until the proxy closes, for at most 5 s; whether it closed.
async fn closes(io: &mut (impl AsyncReadExt + Unpin)) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, io.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

async fn silent_connect(proxy: SocketAddr, target: &str) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{target}: {head}");
    s
}

#[tokio::test]
async fn a_connect_that_never_starts_is_closed_after_handshake_timeout() {
    let (addr, _) = echo("127.0.0.1:0").await.unwrap();
    let sb = sandbox_with(|c| {
        c.limits.handshake_timeout = Duration::from_millis(300);
        c.upstream
            .resolve
            .insert(format!("echo.example.com:{}", addr.port()), addr);
        c.allowed_ports.push(addr.port());
    })
    .await;
    let proxy = sb.server.proxy_addr();
    // Intercepted: no TLS hello.
    let mut s = silent_connect(proxy, "storage.googleapis.com:443").await;
    assert!(closes(&mut s).await, "intercepted CONNECT closed");
    // Blind tunnel: no first byte.
    let mut s = silent_connect(proxy, &format!("echo.example.com:{}", addr.port())).await;
    assert!(closes(&mut s).await, "tunnel closed");
    sb.shutdown().await;
}

#[tokio::test]
async fn idle_tunnels_and_idle_sessions_are_closed() {
    let (addr, _) = echo("127.0.0.1:0").await.unwrap();
    let sb = sandbox_with(|c| {
        c.limits.tunnel_idle_timeout = Duration::from_millis(300);
        c.limits.idle_timeout = Duration::from_millis(300);
        c.upstream
            .resolve
            .insert(format!("echo.example.com:{}", addr.port()), addr);
        c.allowed_ports.push(addr.port());
    })
    .await;
    let proxy = sb.server.proxy_addr();
    let mut s = silent_connect(proxy, &format!("echo.example.com:{}", addr.port())).await;
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert!(closes(&mut s).await, "idle tunnel closed");
    // An h2 session with no request, from a client that answers pings: it used to stay open
    // for good.
    let tls = tls_via_proxy(&sb, "storage.googleapis.com", &[b"h2"]).await;
    let (_send, conn) =
        hyper::client::conn::http2::handshake::<_, _, http_body_util::Empty<bytes::Bytes>>(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(ended.is_ok(), "idle h2 session closed");
    sb.shutdown().await;
}

/// At `max_connections`, idle connections make way for a new client instead of locking it
/// out.
#[tokio::test]
async fn at_the_cap_idle_connects_make_way() {
    let sb = sandbox_with(|c| {
        c.limits.max_connections = 3;
        c.limits.workers = 1;
    })
    .await;
    let proxy = sb.server.proxy_addr();
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(silent_connect(proxy, "storage.googleapis.com:443").await);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        sb.client()
            .unwrap()
            .get("https://storage.googleapis.com/storage/v1/b/dev-x/o")
            .send(),
    )
    .await
    .expect("a new client gets in")
    .unwrap();
    assert_eq!(resp.status(), 200);
    for mut s in idle {
        assert!(closes(&mut s).await, "idle CONNECTs closed");
    }
    sb.shutdown().await;
}

/// `limits.max_headers` holds for HTTP/1.1 and h2 alike.
#[tokio::test]
async fn one_header_count_limit_for_both_protocols() {
    let sb = sandbox_with(|c| c.limits.max_headers = 120).await;
    let url = "https://storage.googleapis.com/storage/v1/b/dev-x/o";
    for (n, expected) in [(110, "200"), (130, "431")] {
        let mut args: Vec<String> = vec![
            "-o".into(),
            "/dev/null".into(),
            "-w".into(),
            "%{http_code}".into(),
        ];
        for i in 0..n {
            args.push("-H".into());
            args.push(format!("x-h{i}: v"));
        }
        args.push(url.into());
        for proto in ["--http1.1", "--http2"] {
            let mut a: Vec<&str> = vec![proto];
            a.extend(args.iter().map(String::as_str));
            let out = curl(&sb, &a).await;
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                expected,
                "{proto} with {n} fields: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    sb.shutdown().await;
}

/// An origin that sends its headers and then nothing: the body fails after
/// `upstream.body_idle_timeout` instead of hanging.
#[tokio::test]
async fn a_silent_origin_body_times_out() {
    let sb = sandbox_with(|c| c.upstream.body_idle_timeout = Duration::from_millis(300)).await;
    let resp = sb
        .client()
        .unwrap()
        .get("https://storage.googleapis.com/stall")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(5), resp.bytes())
        .await
        .expect("the body ends");
    assert!(body.is_err(), "{body:?}");
    sb.shutdown().await;
}

/// Send a request head that never ends, a byte every 50 ms, until the proxy closes the
/// connection (`true`) or 5 s pass (`false`).
async fn trickled_until_closed(io: &mut (impl AsyncReadExt + AsyncWriteExt + Unpin)) -> bool {
    let head = b"GET /storage/v1/b HTTP/1.1\r\nHost: storage.googleapis.com\r\nX-Slow: ";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 256];
    for i in 0.. {
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        let byte = head.get(i).copied().unwrap_or(b'a');
        if io.write_all(&[byte]).await.is_err() || io.flush().await.is_err() {
            return true;
        }
        match tokio::time::timeout(Duration::from_millis(50), io.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(n)) => panic!("an answer to half a head: {:?}", &buf[..n]),
            Err(_) => {}
        }
    }
    unreachable!()
}

/// `limits.header_read_timeout` (HTTP/1.1, enforced by the connection's watchdog since hyper's
/// own timer went): a request head sent a byte at a time is cut off, on the listener and in an
/// intercepted session, while an answer still being sent is not, however long it takes.
#[tokio::test]
async fn a_request_head_must_come_within_header_read_timeout() {
    let sb = sandbox_with(|c| {
        c.limits.header_read_timeout = Duration::from_millis(300);
        c.upstream.body_idle_timeout = Duration::from_secs(2);
    })
    .await;
    let began = std::time::Instant::now();
    let mut plain = tokio::net::TcpStream::connect(sb.server.proxy_addr())
        .await
        .unwrap();
    assert!(
        trickled_until_closed(&mut plain).await,
        "the listener's connection"
    );
    let mut tls = tls_via_proxy(&sb, "storage.googleapis.com", &[b"http/1.1"]).await;
    assert!(
        trickled_until_closed(&mut tls).await,
        "an intercepted session"
    );
    // Each between one and two of the timeout, with room for a slow machine.
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "{:?}",
        began.elapsed()
    );

    // `/stall` sends one byte of its body, then nothing: curl's HTTP/1.1 connection has no
    // request head to send for as long as the answer lasts, which is until the body-idle
    // deadline (2 to 4 s) ends it, not the header deadline.
    let began = std::time::Instant::now();
    let out = curl(
        &sb,
        &[
            "--http1.1",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}",
            "https://storage.googleapis.com/stall",
        ],
    )
    .await;
    let took = began.elapsed();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200 1", "{out:?}");
    assert!(!out.status.success(), "the body was cut short: {out:?}");
    assert!(took >= Duration::from_secs(2), "ended after {took:?}");
    sb.shutdown().await;
}

/// A plain-HTTP origin that answers each request after `delay`, counting its connections.
async fn slow_origin(delay: Duration) -> (SocketAddr, Arc<AtomicU64>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicU64::new(0));
    let count = conns.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    tokio::time::sleep(delay).await;
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, conns)
}

/// Upstream connections per origin are capped: requests queue for a place, and past
/// `upstream.queue_timeout` get 503 instead of opening connections without end.
#[tokio::test]
async fn upstream_connections_per_origin_are_capped() {
    let (addr, conns) = slow_origin(Duration::from_millis(1500)).await;
    let sb = sandbox_with(|c| {
        c.upstream.resolve.insert("slow.test:80".into(), addr);
        c.upstream.max_connections_per_origin = 2;
        c.upstream.queue_timeout = Duration::from_millis(300);
    })
    .await;
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(sb.proxy_url()).unwrap())
        .build()
        .unwrap();
    let sends = (0..6).map(|i| {
        let client = client.clone();
        async move {
            client
                .get(format!("http://slow.test/{i}"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    let mut statuses = futures_util::future::join_all(sends).await;
    statuses.sort();
    assert_eq!(statuses, vec![200, 200, 503, 503, 503, 503]);
    assert_eq!(conns.load(Ordering::SeqCst), 2);
    sb.shutdown().await;
}

/// An intercepted route whose host resolves (by DNS, not `upstream.resolve`) to loopback: the
/// upstream client's dialer refuses it, for the request that connects and for those queued
/// behind it on the same origin alike.
#[tokio::test]
async fn a_routed_host_on_an_internal_address_is_refused_upstream() {
    let sb = sandbox_with(|c| {
        c.routes.insert(
            0,
            impersonate_proxy::config::RouteConfig {
                name: Some("local".into()),
                host: "localhost".into(),
                path: None,
                methods: vec![],
                identity: Some("dev".into()),
                id_token: None,
                passthrough: false,
                clients: vec![],
            },
        );
    })
    .await;
    let client = sb.client().unwrap();
    let sends = (0..4).map(|i| {
        let client = client.clone();
        async move {
            let r = client
                .get(format!("https://localhost/{i}"))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    });
    for (status, body) in futures_util::future::join_all(sends).await {
        assert_eq!(status, 403, "{body}");
        assert!(body.contains("localhost:443 refused"), "{body}");
    }
    assert!(sb.origin.seen().is_empty());
    sb.shutdown().await;
}
