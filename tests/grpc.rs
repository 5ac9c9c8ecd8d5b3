//! gRPC through the proxy: a real tonic client and server (messages and service plumbing written
//! by hand, no protoc), and Python's grpcio as a non-Rust client. Unary, server-streaming,
//! client-streaming and bidi calls; trailers and error statuses; per-method routes; cancellation;
//! an unreachable origin; a large bidi stream with flat memory; a stream across token refreshes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Code, Request, Response, Status, Streaming};

use common::*;
use impersonate_proxy::config::{Config, RouteConfig};
use impersonate_proxy::demo::Sandbox;

const HOST: &str = "pubsub.googleapis.com";
const PUBLISH: &str = "/google.pubsub.v1.Publisher/Publish";

#[derive(Clone, PartialEq, prost::Message)]
pub struct Msg {
    #[prost(string, tag = "1")]
    pub text: String,
    #[prost(bytes = "vec", tag = "2")]
    pub data: Vec<u8>,
    #[prost(uint64, tag = "3")]
    pub n: u64,
}

type MsgStream = Pin<Box<dyn Stream<Item = Result<Msg, Status>> + Send>>;

/// What the gRPC origin saw.
#[derive(Default)]
struct Seen {
    /// (method path, bearer token) per call.
    calls: Mutex<Vec<(String, String)>>,
    cancelled: AtomicBool,
    streamed_bytes: AtomicU64,
}

fn msg(text: &str, n: u64, data: Vec<u8>) -> Msg {
    Msg {
        text: text.into(),
        data,
        n,
    }
}

async fn grpc_origin() -> (SocketAddr, String, Arc<Seen>) {
    let (tls, ca_pem) = impersonate_proxy::origin::tls_config(&[HOST]).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let seen = s.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| dispatch(req, seen.clone()));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .http2_only()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, ca_pem, seen)
}

async fn dispatch(
    req: http::Request<hyper::body::Incoming>,
    seen: Arc<Seen>,
) -> Result<http::Response<tonic::body::Body>, std::convert::Infallible> {
    let path = req.uri().path().to_string();
    let bearer = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim_start_matches("Bearer ")
        .to_string();
    seen.calls
        .lock()
        .unwrap()
        .push((path.clone(), bearer.clone()));
    let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<Msg, Msg>::default());
    let resp = match path.as_str() {
        PUBLISH => {
            let svc = tower::service_fn(move |r: Request<Msg>| {
                let bearer = bearer.clone();
                async move { Ok::<_, Status>(Response::new(msg(&bearer, r.into_inner().n + 1, vec![]))) }
            });
            grpc.unary(svc, req).await
        }
        "/google.pubsub.v1.Publisher/Fail" => {
            let svc = tower::service_fn(|_r: Request<Msg>| async {
                Err::<Response<Msg>, _>(Status::permission_denied("topic is closed to you"))
            });
            grpc.unary(svc, req).await
        }
        "/google.pubsub.v1.Subscriber/Pull" => {
            // Server streaming: `n` messages, or forever (every 10 ms) when n == 0.
            let seen = seen.clone();
            let svc = tower::service_fn(move |r: Request<Msg>| {
                let n = r.into_inner().n;
                let seen = seen.clone();
                async move {
                    let (tx, rx) = tokio::sync::mpsc::channel(4);
                    tokio::spawn(async move {
                        let mut i = 0;
                        while n == 0 || i < n {
                            if tx.send(Ok(msg("pulled", i, vec![]))).await.is_err() {
                                seen.cancelled.store(true, Ordering::SeqCst);
                                return;
                            }
                            i += 1;
                            if n == 0 {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        }
                    });
                    let s: MsgStream = Box::pin(tokio_stream_from(rx));
                    Ok::<_, Status>(Response::new(s))
                }
            });
            grpc.server_streaming(svc, req).await
        }
        "/google.pubsub.v1.Publisher/PublishMany" => {
            let svc = tower::service_fn(|r: Request<Streaming<Msg>>| async move {
                let mut s = r.into_inner();
                let (mut count, mut bytes) = (0u64, 0u64);
                while let Some(m) = s.next().await {
                    let m = m?;
                    count += 1;
                    bytes += m.data.len() as u64;
                }
                Ok::<_, Status>(Response::new(msg(
                    "published",
                    count,
                    bytes.to_le_bytes().to_vec(),
                )))
            });
            grpc.client_streaming(svc, req).await
        }
        "/google.pubsub.v1.Subscriber/StreamingPull" => {
            // Bidi echo, message by message.
            let seen = seen.clone();
            let svc = tower::service_fn(move |r: Request<Streaming<Msg>>| {
                let seen = seen.clone();
                async move {
                    let s: MsgStream = Box::pin(r.into_inner().map(move |m| {
                        let m = m?;
                        seen.streamed_bytes
                            .fetch_add(m.data.len() as u64, Ordering::Relaxed);
                        Ok(m)
                    }));
                    Ok::<_, Status>(Response::new(s))
                }
            });
            grpc.streaming(svc, req).await
        }
        _ => {
            let svc = tower::service_fn(|_r: Request<Msg>| async {
                Err::<Response<Msg>, _>(Status::unimplemented("no such method"))
            });
            grpc.unary(svc, req).await
        }
    };
    Ok(resp)
}

fn tokio_stream_from<T>(mut rx: tokio::sync::mpsc::Receiver<T>) -> impl Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// A sandbox whose pubsub.googleapis.com is the gRPC origin, with per-method routes:
/// Publisher calls act as `jobs`, Subscriber calls as `reader`.
async fn grpc_sandbox(policy: &str) -> (Sandbox, Arc<Seen>) {
    let (addr, ca, seen) = grpc_origin().await;
    let sb = Sandbox::start(any_port(), policy, move |c: &mut Config| {
        // In the sandbox's own directory (beside its CA), which it removes when it stops.
        let ca_path = c.ca.cert.with_file_name("grpc-origin-ca.pem");
        std::fs::write(&ca_path, &ca).unwrap();
        c.upstream.extra_roots.push(ca_path);
        c.upstream.resolve.insert(format!("{HOST}:443"), addr);
        // Some of these tests cap tokens at 2 s; the demo's 5 s safety window would (rightly)
        // never let such a token be served.
        c.tokens.safety_window = Duration::from_millis(500);
        let route = |path: &str, identity: &str| RouteConfig {
            name: Some(identity.into()),
            host: HOST.into(),
            path: Some(path.into()),
            methods: vec![],
            identity: Some(identity.into()),
            id_token: None,
            passthrough: false,
            clients: vec![],
        };
        c.routes
            .insert(0, route("/google.pubsub.v1.Publisher/*", "jobs"));
        c.routes
            .insert(1, route("/google.pubsub.v1.Subscriber/*", "reader"));
    })
    .await
    .unwrap();
    (sb, seen)
}

/// A tonic client whose connections go CONNECT → proxy → TLS (trusting the proxy CA).
async fn client(sb: &Sandbox) -> tonic::client::Grpc<tonic::transport::Channel> {
    let proxy = sb.server.proxy_addr();
    let pem = std::fs::read(sb.ca_path()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tls = Arc::new(tls);
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let tls = tls.clone();
        async move {
            let mut tcp = tokio::net::TcpStream::connect(proxy).await?;
            tcp.write_all(
                format!("CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n").as_bytes(),
            )
            .await?;
            let mut buf = vec![0u8; 1024];
            let n = tcp.read(&mut buf).await?;
            if !buf[..n].starts_with(b"HTTP/1.1 200") {
                return Err(std::io::Error::other("CONNECT refused"));
            }
            let name = rustls::pki_types::ServerName::try_from(HOST).unwrap();
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    // The connector does TLS itself; tonic is told plain http so it does not try its own.
    let channel = tonic::transport::Endpoint::from_static("http://pubsub.googleapis.com")
        .connect_with_connector(connector)
        .await
        .unwrap();
    tonic::client::Grpc::new(channel)
}

use rustls::pki_types::pem::PemObject;

fn codec() -> tonic_prost::ProstCodec<Msg, Msg> {
    tonic_prost::ProstCodec::default()
}

fn path(p: &'static str) -> http::uri::PathAndQuery {
    http::uri::PathAndQuery::from_static(p)
}

async fn unary(
    c: &mut tonic::client::Grpc<tonic::transport::Channel>,
    p: &'static str,
    m: Msg,
) -> Result<Msg, Status> {
    c.ready().await.unwrap();
    c.unary(Request::new(m), path(p), codec())
        .await
        .map(Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_and_streaming_calls_each_with_their_routes_identity() {
    let (sb, seen) = grpc_sandbox(POLICY).await;
    let mut c = client(&sb).await;

    // Unary.
    let r = unary(&mut c, PUBLISH, msg("hi", 41, vec![])).await.unwrap();
    assert_eq!(r.n, 42);
    assert_eq!(sb.emulator.token_info(&r.text).unwrap().principal, JOBS);

    // Server streaming.
    c.ready().await.unwrap();
    let mut s = c
        .server_streaming(
            Request::new(msg("", 5, vec![])),
            path("/google.pubsub.v1.Subscriber/Pull"),
            codec(),
        )
        .await
        .unwrap()
        .into_inner();
    let mut got = vec![];
    while let Some(m) = s.message().await.unwrap() {
        got.push(m.n);
    }
    assert_eq!(got, vec![0, 1, 2, 3, 4]);

    // Client streaming.
    c.ready().await.unwrap();
    let out = futures_util::stream::iter((0..100).map(|i| msg("m", i, vec![1u8; 1024])));
    let r = c
        .client_streaming(
            Request::new(out),
            path("/google.pubsub.v1.Publisher/PublishMany"),
            codec(),
        )
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.n, 100);
    assert_eq!(u64::from_le_bytes(r.data.try_into().unwrap()), 102_400);

    // Bidi, message by message: each echo arrives before the next message is sent.
    let (tx, rx) = tokio::sync::mpsc::channel::<Msg>(1);
    c.ready().await.unwrap();
    let mut echoes = c
        .streaming(
            Request::new(tokio_stream_from(rx)),
            path("/google.pubsub.v1.Subscriber/StreamingPull"),
            codec(),
        )
        .await
        .unwrap()
        .into_inner();
    for i in 0..5 {
        tx.send(msg("ping", i, vec![])).await.unwrap();
        let echo = tokio::time::timeout(Duration::from_secs(5), echoes.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echo.n, i);
    }
    drop(tx);
    assert!(
        echoes.message().await.unwrap().is_none(),
        "clean end: grpc-status 0 trailer"
    );

    // Every call carried its own route's token: Publisher → jobs, Subscriber → reader.
    for (p, bearer) in seen.calls.lock().unwrap().iter() {
        let who = sb.emulator.token_info(bearer).unwrap().principal;
        let want = if p.starts_with("/google.pubsub.v1.Publisher/") {
            JOBS
        } else {
            READER
        };
        assert_eq!(who, want, "{p}");
    }
    assert_eq!(seen.calls.lock().unwrap().len(), 4);
    sb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_errors_empty_streams_and_cancellation() {
    let (sb, seen) = grpc_sandbox(POLICY).await;
    let mut c = client(&sb).await;

    // Trailers-only error response: status and message intact.
    let e = unary(
        &mut c,
        "/google.pubsub.v1.Publisher/Fail",
        msg("", 0, vec![]),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(e.message(), "topic is closed to you");
    let e = unary(
        &mut c,
        "/google.pubsub.v1.Publisher/Nope",
        msg("", 0, vec![]),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);

    // Empty server stream: no messages, OK status.
    c.ready().await.unwrap();
    let mut s = c
        .server_streaming(
            Request::new(msg("", 0, vec![]).clone()),
            path("/google.pubsub.v1.Subscriber/Pull"),
            codec(),
        )
        .await
        .unwrap()
        .into_inner();
    // n == 0 means "forever" for Pull; read three, then cancel by dropping.
    for _ in 0..3 {
        s.message().await.unwrap().unwrap();
    }
    drop(s);
    let mut cancelled = false;
    for _ in 0..100 {
        if seen.cancelled.load(Ordering::SeqCst) {
            cancelled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(cancelled, "the client's cancel reached the origin");

    // The same connection still works after a reset stream.
    let r = unary(&mut c, PUBLISH, msg("", 1, vec![])).await.unwrap();
    assert_eq!(r.n, 2);
    sb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_origin_is_unavailable_not_a_hang() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let sb = Sandbox::start(any_port(), POLICY, move |c: &mut Config| {
        c.upstream.resolve.insert(format!("{HOST}:443"), dead);
    })
    .await
    .unwrap();
    let mut c = client(&sb).await;
    let started = std::time::Instant::now();
    let e = unary(&mut c, PUBLISH, msg("", 0, vec![]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    sb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_bidi_stream_flows_with_flat_memory() {
    // 256 MiB each way by default (1 GiB with GRPC_BIDI_MIB=1024; debug builds are slow).
    let mib: u64 = std::env::var("GRPC_BIDI_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let (sb, seen) = grpc_sandbox(POLICY).await;
    let mut c = client(&sb).await;
    let chunk = 64 * 1024;
    let count = mib * 1024 * 1024 / chunk as u64;
    let before = peak_rss_kib();
    let out = futures_util::stream::iter((0..count).map(move |i| msg("", i, vec![0xA5; chunk])));
    c.ready().await.unwrap();
    let mut echoes = c
        .streaming(
            Request::new(out),
            path("/google.pubsub.v1.Subscriber/StreamingPull"),
            codec(),
        )
        .await
        .unwrap()
        .into_inner();
    let mut back = 0u64;
    while let Some(m) = echoes.message().await.unwrap() {
        back += m.data.len() as u64;
    }
    assert_eq!(back, mib * 1024 * 1024);
    assert_eq!(seen.streamed_bytes.load(Ordering::Relaxed), back);
    let growth = peak_rss_kib().saturating_sub(before) / 1024;
    eprintln!("bidi {mib} MiB each way: peak RSS growth {growth} MiB");
    assert!(
        growth < 64,
        "flow control must bound memory: grew {growth} MiB"
    );
    sb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_stream_outlives_token_refreshes() {
    let policy = format!("{POLICY}token_lifetime: 2s\n");
    let (sb, _seen) = grpc_sandbox(&policy).await;
    let mut c = client(&sb).await;
    let first = unary(&mut c, PUBLISH, msg("", 0, vec![]))
        .await
        .unwrap()
        .text;
    let (tx, rx) = tokio::sync::mpsc::channel::<Msg>(1);
    c.ready().await.unwrap();
    let mut echoes = c
        .streaming(
            Request::new(tokio_stream_from(rx)),
            path("/google.pubsub.v1.Subscriber/StreamingPull"),
            codec(),
        )
        .await
        .unwrap()
        .into_inner();
    // Five seconds: the stream's token expires twice over; the stream is not cut.
    for i in 0..20 {
        tx.send(msg("tick", i, vec![])).await.unwrap();
        assert_eq!(echoes.message().await.unwrap().unwrap().n, i);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop(tx);
    assert!(echoes.message().await.unwrap().is_none());
    let later = unary(&mut c, PUBLISH, msg("", 0, vec![]))
        .await
        .unwrap()
        .text;
    assert_ne!(first, later, "new calls use the refreshed token");
    assert!(sb.emulator.token_info(&later).is_some());
    sb.shutdown().await;
}

/// Python grpcio through `https_proxy`, trusting the proxy CA via GRPC_DEFAULT_SSL_ROOTS_FILE_PATH.
/// The venv lives under target/ so a plain `cargo test` on a fresh machine sets it up once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_through_the_proxy() {
    use prost::Message;
    let python = common::python_venv("pyenv-grpc", "grpc", &["grpcio"]).await;
    let (sb, seen) = grpc_sandbox(POLICY).await;
    let script = r#"
import os, sys, grpc
channel = grpc.secure_channel("pubsub.googleapis.com:443", grpc.ssl_channel_credentials())
call = channel.unary_unary("/google.pubsub.v1.Publisher/Publish")
reply = call(bytes.fromhex(sys.argv[1]), timeout=20)
print(reply.hex())
"#;
    let request = msg("from python", 6, vec![]).encode_to_vec();
    let ca = sb.ca_path();
    let out = tokio::process::Command::new(&python)
        .args(["-c", script, &hex(&request)])
        .env("https_proxy", sb.proxy_url())
        .env("grpc_proxy", sb.proxy_url())
        .env_remove("no_proxy")
        .env_remove("NO_PROXY")
        .env("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", &ca)
        .env("SSL_CERT_FILE", &ca)
        .env("REQUESTS_CA_BUNDLE", &ca)
        .env("CURL_CA_BUNDLE", &ca)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "grpcio call failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply_hex = String::from_utf8(out.stdout).unwrap();
    let reply = Msg::decode(unhex(reply_hex.trim()).as_slice()).unwrap();
    assert_eq!(reply.n, 7);
    assert_eq!(sb.emulator.token_info(&reply.text).unwrap().principal, JOBS);
    assert_eq!(seen.calls.lock().unwrap().len(), 1);
    sb.shutdown().await;
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}
