//! The interop tier: programs nobody here wrote on both sides of the proxy. Debian's nginx is
//! the origin, offering h2 and HTTP/1.1 or HTTP/1.1 only; curl (over HTTP/1.1 and h2) and
//! reqwest are the clients; a Python grpcio server is the gRPC origin. Our own origin accepts
//! whatever it is sent, so what counts is what nginx and grpcio make of the proxy's requests:
//! nginx's view of each one (its access log) must show exactly one authority, the route's
//! token and no hop-by-hop field.
//!
//! `.ci/run` installs nginx; the grpcio venv is made under `target/` on first use.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::nginx::{self, Nginx};
use common::*;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

const HOST: &str = "storage.googleapis.com";
const NAMES: &[&str] = &["storage.googleapis.com", "*.googleapis.com"];

/// The sandbox's proxy (emulator, routes, CA) with `storage.googleapis.com:443` at nginx.
async fn sandbox_for(nginx: &Nginx) -> Sandbox {
    let (addr, ca) = (nginx.addr, nginx.ca_file.clone());
    sandbox_with(move |c| {
        c.upstream.resolve.insert(format!("{HOST}:443"), addr);
        c.upstream.extra_roots.push(ca);
    })
    .await
}

fn url(path: &str) -> String {
    format!("https://{HOST}{path}")
}

/// curl's output as text, with its exit status checked.
async fn curl_ok(sb: &Sandbox, args: &[&str]) -> String {
    let out = curl(sb, args).await;
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The header lines the backend behind nginx received (duplicates kept).
/// curl fetching `path` `times` times on one connection (`version`: `--http1.1`, `--http2`),
/// printing `write_out` after each; its output.
async fn curl_repeat(
    sb: &Sandbox,
    version: &str,
    write_out: &str,
    path: &str,
    times: usize,
) -> String {
    let mut args = vec![version.to_string(), "-w".into(), write_out.into()];
    // `-o` applies to one URL: each gets its own.
    for _ in 0..times {
        args.extend(["-o".into(), "/dev/null".into(), url(path)]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    curl_ok(sb, &args).await
}

fn backend_headers(v: &Value, name: &str) -> Vec<String> {
    v["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0] == name)
        .map(|h| h[1].as_str().unwrap().to_string())
        .collect()
}

async fn headers_follow_the_rules(h2_origin: bool) {
    let nginx = Nginx::start(h2_origin, NAMES).await;
    let sb = sandbox_for(&nginx).await;

    // curl over HTTP/1.1, with every kind of field the table names.
    let body = curl_ok(
        &sb,
        &[
            "--http1.1",
            "-H",
            "Authorization: Bearer client-junk",
            "-H",
            "Connection: x-drop",
            "-H",
            "X-Drop: 1",
            "-H",
            "Keep-Alive: timeout=5",
            "-H",
            "Proxy-Connection: keep-alive",
            "-H",
            "Proxy-Authorization: Basic c2VjcmV0OnNlY3JldA==",
            "-H",
            "TE: trailers",
            "-H",
            "Cookie: a=1",
            "-H",
            "X-End: kept",
            &url("/echo/h1"),
        ],
    )
    .await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(backend_headers(&v, "x-end"), ["kept"]);
    assert!(backend_headers(&v, "x-drop").is_empty(), "{body}");
    assert_eq!(backend_headers(&v, "cookie"), ["a=1"]);

    // curl over h2.
    let body = curl_ok(
        &sb,
        &[
            "--http2",
            "-H",
            "Authorization: Bearer client-junk",
            "-H",
            "X-End: kept",
            &url("/echo/h2"),
        ],
    )
    .await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(backend_headers(&v, "x-end"), ["kept"]);

    // reqwest, h2 by ALPN, with a cookie split over two fields as h2 allows: nginx's HTTP/1.1
    // leg to its backend gets one field, joined with "; ", whichever leg the proxy spoke.
    let resp = sb
        .client()
        .unwrap()
        .get(url("/echo/cookies"))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .bearer_auth("client-junk")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(backend_headers(&v, "cookie"), ["a=1; b=2"], "{v}");

    let seen = nginx.assert_clean(&sb, DEV, 3).await;
    let protocol = if h2_origin { "HTTP/2.0" } else { "HTTP/1.1" };
    assert!(seen.iter().all(|s| s["protocol"] == protocol), "{seen:?}");

    // A Host naming another authority never reaches nginx with the token: 421. Two Host
    // fields: 400 (RFC 9112 §3.2).
    let before = nginx.seen().len();
    let out = curl_ok(
        &sb,
        &[
            "--http1.1",
            "-w",
            "%{http_code}",
            "-o",
            "/dev/null",
            "-H",
            "Host: evil.example.com",
            &url("/echo/spoof"),
        ],
    )
    .await;
    assert_eq!(out, "421");
    let mut tls = tls_via_proxy(&sb, HOST, &[b"http/1.1"]).await;
    tls.write_all(
        format!("GET /echo/two HTTP/1.1\r\nHost: {HOST}\r\nHost: {HOST}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(&mut tls).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    // A request after them is the next line nginx writes: neither of them reached it.
    curl_ok(&sb, &["--http1.1", "-o", "/dev/null", &url("/echo/after")]).await;
    let seen = nginx.seen_at_least(before + 1).await;
    assert_eq!(seen.len(), before + 1, "neither reached nginx");
    assert_eq!(seen[before]["uri"], "/echo/after");

    sb.shutdown().await;
    nginx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_follow_the_rules_to_an_h2_nginx() {
    headers_follow_the_rules(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_follow_the_rules_to_an_http1_nginx() {
    headers_follow_the_rules(false).await;
}

const BIG: usize = 100 * 1024 * 1024;

async fn bodies_ranges_and_bodiless_answers(h2_origin: bool) {
    let nginx = Nginx::start(h2_origin, NAMES).await;
    let sb = sandbox_for(&nginx).await;
    let big = nginx::payload(BIG);
    let digest = nginx::sha256(&big);
    nginx.serve_file("big.bin", &big);
    let upload = sb.dir.join("upload.bin");
    std::fs::write(&upload, &big).unwrap();
    let upload = upload.to_str().unwrap().to_string();
    let small = sb.dir.join("chunked.bin");
    std::fs::write(&small, &big[..8 * 1024 * 1024]).unwrap();
    let small = small.to_str().unwrap().to_string();
    let download = sb.dir.join("download.bin");
    let download = download.to_str().unwrap().to_string();

    for version in ["--http1.1", "--http2"] {
        // 100 MiB up, with Expect: 100-continue, compared by nginx's backend.
        let body = curl_ok(
            &sb,
            &[
                version,
                "--max-time",
                "120",
                "-H",
                "Expect: 100-continue",
                "-T",
                &upload,
                &url("/echo/upload"),
            ],
        )
        .await;
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["body_len"], BIG as u64, "{version}");
        assert_eq!(v["body_sha256"], digest.as_str(), "{version}");

        // 100 MiB down from nginx's static files, bytes compared.
        let _ = std::fs::remove_file(&download);
        let code = curl_ok(
            &sb,
            &[
                version,
                "--max-time",
                "120",
                "-w",
                "%{http_code}",
                "-o",
                &download,
                &url("/files/big.bin"),
            ],
        )
        .await;
        assert_eq!(code, "200");
        assert_eq!(
            nginx::sha256(&std::fs::read(&download).unwrap()),
            digest,
            "{version}"
        );

        // Ranged GETs: a middle slice and a suffix.
        for (range, slice) in [("1000-1999", &big[1000..2000]), ("-500", &big[BIG - 500..])] {
            let out = curl(
                &sb,
                &[
                    version,
                    "-r",
                    range,
                    "-o",
                    &download,
                    "-w",
                    "%{http_code}",
                    &url("/files/big.bin"),
                ],
            )
            .await;
            assert_eq!(String::from_utf8_lossy(&out.stdout), "206", "{range}");
            assert_eq!(std::fs::read(&download).unwrap(), slice, "{range}");
        }

        // HEAD: the length of what a GET would send, and no body.
        let head = curl_ok(&sb, &[version, "-sI", &url("/files/big.bin")]).await;
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains(&format!("content-length: {BIG}")), "{head}");
        let etag = head
            .lines()
            .find_map(|l| {
                l.split_once(':')
                    .filter(|(k, _)| k.eq_ignore_ascii_case("etag"))
            })
            .map(|(_, v)| v.trim().to_string())
            .expect("nginx sends an ETag");

        // 304 for a matching ETag, 204 from nginx's `return 204`.
        let code = curl_ok(
            &sb,
            &[
                version,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                &format!("If-None-Match: {etag}"),
                &url("/files/big.bin"),
            ],
        )
        .await;
        assert_eq!(code, "304", "{version}");
        let code = curl_ok(
            &sb,
            &[
                version,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &url("/empty"),
            ],
        )
        .await;
        assert_eq!(code, "204", "{version}");
    }

    // A chunked upload (HTTP/1.1; its length is not known in advance).
    let body = curl_ok(
        &sb,
        &[
            "--http1.1",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &format!("@{small}"),
            &url("/echo/chunked"),
        ],
    )
    .await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["body_len"], 8 * 1024 * 1024);
    assert_eq!(
        v["body_sha256"],
        nginx::sha256(&big[..8 * 1024 * 1024]).as_str()
    );

    let seen = nginx.assert_clean(&sb, DEV, 15).await;
    let chunked = seen.iter().find(|s| s["uri"] == "/echo/chunked").unwrap();
    assert_eq!(chunked["content_length"], "", "{chunked}");
    sb.shutdown().await;
    nginx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_ranges_and_bodiless_answers_with_an_h2_nginx() {
    bodies_ranges_and_bodiless_answers(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_ranges_and_bodiless_answers_with_an_http1_nginx() {
    bodies_ranges_and_bodiless_answers(false).await;
}

async fn five_hundred_requests_on_one_connection(h2_origin: bool) {
    let nginx = Nginx::start(h2_origin, NAMES).await;
    let sb = sandbox_for(&nginx).await;
    nginx.serve_file("small.txt", b"keep-alive\n");
    for version in ["--http1.1", "--http2"] {
        let before = sb
            .server
            .state()
            .metrics
            .connections_total
            .load(std::sync::atomic::Ordering::Relaxed);
        let logged = nginx.seen().len();
        let write_out = "%{http_code} %{num_connects}\n";
        let out = curl_repeat(&sb, version, write_out, "/files/small.txt", 500).await;
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 500);
        assert!(lines.iter().all(|l| l.starts_with("200 ")), "{out}");
        let connects: u32 = lines.iter().map(|l| l[4..].parse::<u32>().unwrap()).sum();
        assert_eq!(connects, 1, "curl opened one connection to the proxy");
        let after = sb
            .server
            .state()
            .metrics
            .connections_total
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(after - before, 1, "{version}: one client connection");
        let seen = nginx.seen_at_least(logged + 500).await;
        let these = &seen[logged..];
        assert_eq!(
            these.len(),
            500,
            "{version}: logged before {logged}, now {}",
            seen.len()
        );
        let conns: std::collections::BTreeSet<&str> =
            these.iter().map(|s| s["conn"].as_str().unwrap()).collect();
        assert_eq!(
            conns.len(),
            1,
            "{version}: the proxy kept one upstream connection"
        );
    }
    nginx.assert_clean(&sb, DEV, 1000).await;
    sb.shutdown().await;
    nginx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_requests_on_one_connection_to_an_h2_nginx() {
    five_hundred_requests_on_one_connection(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_requests_on_one_connection_to_an_http1_nginx() {
    five_hundred_requests_on_one_connection(false).await;
}

/// nginx ends an h2 connection after `keepalive_requests` with a GOAWAY (RFC 9113 §6.8: no new
/// streams on it) and closes it. The proxy drives its upstream h2 connections with the `h2`
/// crate itself: a connection whose driver has ended is forgotten, and one that has received
/// the GOAWAY but is not yet forgotten refuses the next stream before anything is sent, so the
/// request goes on a new connection either way (with both removed, 7 of these 12 fail).
/// Twelve requests one after another on one client connection, nginx closing every fifth: all
/// answered, on at least three upstream connections, none counted as an upstream error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_after_an_h2_nginx_s_goaway_go_on_a_new_connection() {
    let nginx = Nginx::start_closing_after(true, NAMES, 5).await;
    let sb = sandbox_for(&nginx).await;
    nginx.serve_file("small.txt", b"goaway\n");
    let out = curl_repeat(&sb, "--http1.1", "%{http_code}\n", "/files/small.txt", 12).await;
    assert_eq!(out.lines().filter(|l| *l == "200").count(), 12, "{out}");
    let seen = nginx.seen_at_least(12).await;
    let conns: std::collections::BTreeSet<&str> =
        seen.iter().map(|s| s["conn"].as_str().unwrap()).collect();
    assert!(
        conns.len() >= 3,
        "nginx closes every fifth: {} connections",
        conns.len()
    );
    let errors = sb
        .server
        .state()
        .metrics
        .upstream_errors_total
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(errors, 0, "no request failed on a connection going away");
    sb.shutdown().await;
    nginx.stop().await;
}

/// A client that gives up on a GET in flight to an HTTP/1.1 origin does not cost the proxy its
/// upstream connection: the request is finished and its answer read on a task of its own, and
/// the next request rides the same connection to nginx (nginx's `$connection` serial). Before,
/// hyper closed the connection with the abandoned answer (nginx logged 499) and every client
/// deadline, or a load tool stopping with requests in flight, cost a new upstream TLS
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_the_client_gave_up_on_keeps_its_http1_upstream_connection() {
    let nginx = Nginx::start(false, NAMES).await;
    let (addr, ca) = (nginx.addr, nginx.ca_file.clone());
    // One worker: one pool, whichever worker accepts the next curl.
    let sb = sandbox_with(move |c| {
        c.upstream.resolve.insert(format!("{HOST}:443"), addr);
        c.upstream.extra_roots.push(ca);
        c.limits.workers = 1;
    })
    .await;
    curl_ok(&sb, &[&url("/echo/first")]).await;
    // curl gives up after 300 ms; the backend answers after 800.
    let out = curl(&sb, &["--max-time", "0.3", &url("/echo/slow?delay_ms=800")]).await;
    assert!(!out.status.success(), "curl was meant to give up");
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    curl_ok(&sb, &[&url("/echo/after")]).await;
    let seen = nginx.seen_at_least(3).await;
    let line = |path: &str| {
        seen.iter()
            .find(|s| s["uri"].as_str().is_some_and(|u| u.starts_with(path)))
            .unwrap_or_else(|| panic!("{path} not in nginx's log: {seen:?}"))
            .clone()
    };
    let (first, slow, after) = (line("/echo/first"), line("/echo/slow"), line("/echo/after"));
    // Status and connection serial only: the lines also hold the (emulator's) token.
    let brief = |s: &Value| format!("{} {} on connection {}", s["uri"], s["status"], s["conn"]);
    assert_eq!(
        slow["status"],
        "200",
        "the abandoned answer was read to its end: {}",
        brief(&slow)
    );
    assert_eq!(
        first["conn"],
        slow["conn"],
        "{} / {}",
        brief(&first),
        brief(&slow)
    );
    assert_eq!(
        after["conn"],
        slow["conn"],
        "the next request reused the connection: {} / {}",
        brief(&slow),
        brief(&after)
    );
    sb.shutdown().await;
    nginx.stop().await;
}

/// The HTTP/1.1 pool opens a connection only for a request that would otherwise wait, not one
/// per checkout that finds no idle connection at that instant. Every upstream connection
/// goes through a forwarder that holds it 300 ms before reaching nginx (a far origin): after
/// one warm-up request, two clients send 20 requests each, one after another. The second
/// client's first request finds the one connection busy and a connect starts; meanwhile the
/// two share the connection that exists. hyper-util's pool, used before, started one more
/// connect at every such miss and kept each connection it opened (36 to 38 more in three
/// runs); now the one connect under way is enough.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_connect_is_not_raced_by_one_per_request() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let nginx = Nginx::start(false, NAMES).await;
    let forwarder = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let via = forwarder.local_addr().unwrap();
    let opened = std::sync::Arc::new(AtomicUsize::new(0));
    let (count, to) = (opened.clone(), nginx.addr);
    let relay = tokio::spawn(async move {
        while let Ok((mut c, _)) = forwarder.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                let mut u = tokio::net::TcpStream::connect(to).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
            });
        }
    });
    let ca = nginx.ca_file.clone();
    // One worker: one pool for both clients.
    let sb = sandbox_with(move |c| {
        c.upstream.resolve.insert(format!("{HOST}:443"), via);
        c.upstream.extra_roots.push(ca);
        c.limits.workers = 1;
    })
    .await;
    let client = sb.client().unwrap();
    let get = |path: String| {
        let client = client.clone();
        async move {
            let r = client.get(url(&path)).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap();
        }
    };
    // The first request connects twice: the h2 path finds out that nginx speaks HTTP/1.1
    // only (and closes that connection), then the pool connects.
    get("/echo/warm".into()).await;
    let warm = opened.load(Ordering::SeqCst);
    let clients = (0..2).map(|i| {
        let get = &get;
        async move {
            for j in 0..20 {
                get(format!("/echo/{i}-{j}")).await;
            }
        }
    });
    futures_util::future::join_all(clients).await;
    let n = opened.load(Ordering::SeqCst) - warm;
    assert!(
        n <= 1,
        "two clients in turn took {n} more upstream connections"
    );
    sb.shutdown().await;
    relay.abort();
    nginx.stop().await;
}

/// The cipher suite the intercepting server negotiates with curl (OpenSSL), from curl's `-v`
/// line "SSL connection using TLSv1.3 / <suite>" for the connection to the routed host.
async fn negotiated_suite(sb: &Sandbox, tls13_ciphers: &str) -> String {
    let out = curl(
        sb,
        &[
            "-v",
            "-o",
            "/dev/null",
            "--tls13-ciphers",
            tls13_ciphers,
            &url("/suite"),
        ],
    )
    .await;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "curl: {log}");
    log.lines()
        .find_map(|l| l.split("SSL connection using TLSv1.3 / ").nth(1))
        .unwrap_or_else(|| panic!("no TLS 1.3 line in curl's log: {log}"))
        .trim()
        .to_string()
}

/// The server's order wins for TLS 1.3 suites: a client listing AES-256-GCM-SHA384 first (as
/// rustls-based clients such as oha and reqwest do) gets AES-128-GCM-SHA256, whose key schedule
/// runs on SHA-256 (hardware SHA-NI) rather than SHA-384; a client offering only AES-256 still
/// gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_prefers_aes_128_gcm_sha256_with_clients_that_list_aes_256_first() {
    let nginx = Nginx::start(true, NAMES).await;
    let sb = sandbox_for(&nginx).await;
    assert_eq!(
        negotiated_suite(&sb, "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256").await,
        "TLS_AES_128_GCM_SHA256"
    );
    assert_eq!(
        negotiated_suite(&sb, "TLS_AES_256_GCM_SHA384").await,
        "TLS_AES_256_GCM_SHA384"
    );
    sb.shutdown().await;
    nginx.stop().await;
}

/// Python's `ssl` (OpenSSL, a client nobody here wrote): CONNECT, TLS 1.3 trusting the proxy's
/// CA, one request with `Connection: close`, then the same again offering the first session.
/// Prints each answer's status line, whether the session was resumed, and the TLS version.
const RESUMING_CLIENT: &str = r#"
import json, socket, ssl, sys
proxy_port, ca, host = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
def once(session):
    s = socket.create_connection(("127.0.0.1", proxy_port), timeout=20)
    s.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 200"), head
    t = ctx.wrap_socket(s, server_hostname=host, session=session)
    t.sendall(f"GET /empty HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    answer = b""
    while chunk := t.recv(65536):
        answer += chunk
    out = [answer.split(b"\r\n", 1)[0].decode(), t.session_reused, t.version()]
    session = t.session
    t.close()
    return out, session
first, session = once(None)
second, _ = once(session)
print(json.dumps([first, second]))
"#;

/// The session tickets the proxy holds back until its first answer (`proxy/tickets.rs`) reach
/// a client nobody here wrote: OpenSSL, through Python, resumes its TLS 1.3 session with them
/// on a second connection, and both requests reach nginx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openssl_client_resumes_with_the_tickets_that_came_with_the_answer() {
    let nginx = Nginx::start(true, NAMES).await;
    let sb = sandbox_for(&nginx).await;
    let port = sb.server.proxy_addr().port().to_string();
    let ca = sb.ca_path();
    let out = tokio::process::Command::new("python3")
        .args(["-c", RESUMING_CLIENT, &port])
        .arg(&ca)
        .arg(HOST)
        .env("SSL_CERT_FILE", &ca)
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        got[0],
        serde_json::json!(["HTTP/1.1 204 No Content", false, "TLSv1.3"])
    );
    assert_eq!(
        got[1],
        serde_json::json!(["HTTP/1.1 204 No Content", true, "TLSv1.3"])
    );
    assert_eq!(nginx.seen_at_least(2).await.len(), 2);
    sb.shutdown().await;
    nginx.stop().await;
}

/// A gRPC origin that is not hyper: Python grpcio, with a generic handler (no generated
/// code). Each answer says which `authorization` the server saw.
const GRPC_SERVER: &str = r#"
import sys, grpc
from concurrent import futures

def unary(request, context):
    auth = dict(context.invocation_metadata()).get("authorization", "")
    if request == b"fail":
        context.set_trailing_metadata((("x-why", "asked-to-fail"),))
        context.abort(grpc.StatusCode.NOT_FOUND, "no such topic: fail")
    context.set_trailing_metadata((("x-trailer", "unary-done"),))
    return auth.encode() + b"|" + request

def stream(requests, context):
    auth = dict(context.invocation_metadata()).get("authorization", "")
    for r in requests:
        yield auth.encode() + b"|" + r
    context.set_trailing_metadata((("x-trailer", "stream-done"),))

handler = grpc.method_handlers_generic_handler("test.Echo", {
    "Unary": grpc.unary_unary_rpc_method_handler(unary),
    "Stream": grpc.stream_stream_rpc_method_handler(stream),
})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((handler,))
creds = grpc.ssl_server_credentials(((open(sys.argv[2], "rb").read(), open(sys.argv[1], "rb").read()),))
port = server.add_secure_port("127.0.0.1:0", creds)
server.start()
print(port, flush=True)
server.wait_for_termination()
"#;

/// The client side, also grpcio, through `https_proxy`: a unary call, a bidi stream, and a
/// call the server fails; prints what came back, trailers included.
const GRPC_CLIENT: &str = r#"
import json, grpc
channel = grpc.secure_channel("pubsub.googleapis.com:443", grpc.ssl_channel_credentials())
md = (("authorization", "Bearer client-junk"),)
unary = channel.unary_unary("/test.Echo/Unary")
reply, call = unary.with_call(b"hello", metadata=md, timeout=20)
out = {"unary": reply.decode(), "unary_trailers": dict(call.trailing_metadata())}
stream = channel.stream_stream("/test.Echo/Stream")
replies = stream(iter([b"one", b"two", b"three"]), metadata=md, timeout=20)
out["stream"] = [r.decode() for r in replies]
out["stream_trailers"] = dict(replies.trailing_metadata())
try:
    unary(b"fail", metadata=md, timeout=20)
    out["fail"] = "no error"
except grpc.RpcError as e:
    out["fail"] = [e.code().name, e.details(), dict(e.trailing_metadata())]
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpcio_server_behind_the_proxy_gets_unary_streaming_and_errors_intact() {
    let python = python_venv("pyenv-grpc", "grpc", &["grpcio"]).await;
    let dir = cert_dir("ip-grpcio", &["pubsub.googleapis.com"]);
    let mut cmd = tokio::process::Command::new(&python);
    cmd.args(["-c", GRPC_SERVER])
        .arg(dir.join("chain.pem"))
        .arg(dir.join("key.pem"));
    let (mut server, addr) = spawn_printing_port(cmd).await;
    let ca = dir.join("ca.pem");
    let sb = sandbox_with(|c| {
        c.upstream
            .resolve
            .insert("pubsub.googleapis.com:443".into(), addr);
        c.upstream.extra_roots.push(ca);
    })
    .await;
    let proxy_ca = sb.ca_path();
    let out = tokio::process::Command::new(&python)
        .args(["-c", GRPC_CLIENT])
        .env("https_proxy", sb.proxy_url())
        .env("grpc_proxy", sb.proxy_url())
        .env_remove("no_proxy")
        .env_remove("NO_PROXY")
        .env("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", &proxy_ca)
        .env("SSL_CERT_FILE", &proxy_ca)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "grpcio client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let token_of = |s: &str| {
        let (auth, rest) = s.split_once('|').unwrap();
        let token = auth.strip_prefix("Bearer ").unwrap().to_string();
        (token, rest.to_string())
    };
    let (token, echoed) = token_of(v["unary"].as_str().unwrap());
    assert_eq!(echoed, "hello");
    assert_eq!(sb.emulator.token_info(&token).unwrap().principal, DEV);
    assert_eq!(v["unary_trailers"]["x-trailer"], "unary-done");
    let stream: Vec<(String, String)> = v["stream"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| token_of(s.as_str().unwrap()))
        .collect();
    assert_eq!(
        stream.iter().map(|(_, m)| m.as_str()).collect::<Vec<_>>(),
        ["one", "two", "three"]
    );
    assert!(stream.iter().all(|(t, _)| *t == token));
    assert_eq!(v["stream_trailers"]["x-trailer"], "stream-done");
    assert_eq!(v["fail"][0], "NOT_FOUND");
    assert_eq!(v["fail"][1], "no such topic: fail");
    assert_eq!(v["fail"][2]["x-why"], "asked-to-fail");

    sb.shutdown().await;
    let _ = server.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
}
