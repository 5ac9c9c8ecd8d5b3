//! A local TLS origin standing in for `*.googleapis.com` in the demo, the tests and the load
//! tool. It has its own CA (so clients and the proxy must be told to trust it, as they would a
//! private endpoint), serves HTTP/1.1 and h2 by ALPN, and records what it receives.
//!
//! - `/download?bytes=N`: N bytes, streamed in 64 KiB chunks.
//! - `/upload`: counts a streamed request body without keeping it.
//! - `/status/NNN`: answers that status.
//! - `/stall`: headers and one byte of body, then silence (for the proxy's body idle timeout).
//! - anything else: a small JSON echo: method, path, host, HTTP version, the bearer token's
//!   fingerprint and, when the origin knows a tokeninfo URL, whose token it is.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;

type Body = BoxBody<Bytes, std::io::Error>;

/// How many requests the origin remembers, most recent last; older ones are forgotten, so a
/// long demo or load run does not grow its memory.
pub const SEEN_KEPT: usize = 10_000;

/// One request as the origin saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    /// `Host`, or the h2 `:authority`.
    pub host: String,
    pub version: Version,
    pub headers: HeaderMap,
}

impl Seen {
    /// The bearer token the request carried, if any.
    pub fn bearer(&self) -> Option<&str> {
        self.headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
    }
}

struct Shared {
    /// The most recent [`SEEN_KEPT`] requests.
    seen: Mutex<VecDeque<Seen>>,
    connections: AtomicU64,
    /// Connections ended so far (the client's close, the origin's own, or an error).
    closed: AtomicU64,
    /// After this many requests a connection is ended gracefully (h2 GOAWAY, HTTP/1.1
    /// `Connection: close`), as front ends do at a maximum connection age; 0 for never.
    requests_per_connection: AtomicU64,
    uploaded: AtomicU64,
    tokeninfo: Option<String>,
    http: reqwest::Client,
}

pub struct Origin {
    addr: SocketAddr,
    ca_pem: String,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
}

impl Origin {
    /// Serve on 127.0.0.1:0 with a certificate for `names`. With `tokeninfo` (the emulator's
    /// base URL), the echo says whose token each request carried.
    pub async fn start(names: &[&str], tokeninfo: Option<String>) -> Result<Origin, String> {
        let (config, ca_pem) = tls_config(names)?;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("origin bind: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let shared = Arc::new(Shared {
            seen: Mutex::new(VecDeque::new()),
            connections: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            requests_per_connection: AtomicU64::new(0),
            uploaded: AtomicU64::new(0),
            tokeninfo,
            http: reqwest::Client::new(),
        });
        let (stop, mut stopped) = watch::channel(false);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let sh = shared.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    _ = stopped.wait_for(|s| *s) => return,
                    r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let sh = sh.clone();
                let mut stop_conn = stopped.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    sh.connections.fetch_add(1, Ordering::SeqCst);
                    let enough = Arc::new(tokio::sync::Notify::new());
                    let svc_sh = sh.clone();
                    let (svc_served, svc_enough) = (Arc::new(AtomicU64::new(0)), enough.clone());
                    let svc = service_fn(move |req| {
                        let sh = svc_sh.clone();
                        let limit = sh.requests_per_connection.load(Ordering::SeqCst);
                        if limit > 0 && svc_served.fetch_add(1, Ordering::SeqCst) + 1 == limit {
                            svc_enough.notify_one();
                        }
                        async move { Ok::<_, std::convert::Infallible>(answer(req, &sh).await) }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
                    tokio::pin!(conn);
                    let retire = tokio::select! {
                        _ = conn.as_mut() => false,
                        _ = stop_conn.wait_for(|s| *s) => false,
                        _ = enough.notified() => true,
                    };
                    if retire {
                        conn.as_mut().graceful_shutdown();
                        tokio::select! {
                            _ = conn.as_mut() => {}
                            _ = stop_conn.wait_for(|s| *s) => {}
                        }
                    }
                    sh.closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Ok(Origin {
            addr,
            ca_pem,
            shared,
            stop,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The origin's CA certificate (PEM), for `upstream.extra_roots` or a client.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The requests seen so far, oldest first: all of them, or the last [`SEEN_KEPT`].
    pub fn seen(&self) -> Vec<Seen> {
        self.shared
            .seen
            .lock()
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// TLS connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// TLS connections that have ended so far.
    pub fn closed(&self) -> u64 {
        self.shared.closed.load(Ordering::SeqCst)
    }

    /// End each connection gracefully after `n` requests (0: never), as front ends that cap
    /// a connection's age do: h2 gets a GOAWAY, HTTP/1.1 a `Connection: close`.
    pub fn set_requests_per_connection(&self, n: u64) {
        self.shared
            .requests_per_connection
            .store(n, Ordering::SeqCst);
    }

    /// Bytes received on `/upload` so far.
    pub fn uploaded(&self) -> u64 {
        self.shared.uploaded.load(Ordering::SeqCst)
    }

    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Keeps `seen` as the newest of at most [`SEEN_KEPT`] records.
fn remember(list: &mut VecDeque<Seen>, seen: Seen) {
    if list.len() >= SEEN_KEPT {
        list.pop_front();
    }
    list.push_back(seen);
}

async fn answer(req: Request<Incoming>, sh: &Shared) -> Response<Body> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(String::from)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let seen = Seen {
        method: req.method().clone(),
        path: req.uri().path().to_string(),
        host: host.clone(),
        version: req.version(),
        headers: req.headers().clone(),
    };
    if let Ok(mut s) = sh.seen.lock() {
        remember(&mut s, seen.clone());
    }
    let path = req.uri().path().to_string();
    if let Some(code) = path.strip_prefix("/status/") {
        let code = code.parse().ok().and_then(|c| StatusCode::from_u16(c).ok());
        return json(
            code.unwrap_or(StatusCode::BAD_REQUEST),
            serde_json::json!({"status": code.map(|c| c.as_u16())}),
        );
    }
    if path == "/download" {
        let n: u64 = req
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("bytes="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        return download(n);
    }
    if path == "/stall" {
        let first = futures_util::stream::once(async {
            Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"x")))
        });
        let stream = futures_util::StreamExt::chain(first, futures_util::stream::pending());
        return Response::new(BodyExt::boxed(StreamBody::new(stream)));
    }
    if path == "/upload" {
        let mut body = req.into_body();
        let mut total = 0u64;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Some(d) = f.data_ref() {
                        total += d.len() as u64;
                    }
                }
                Err(_) => break,
            }
        }
        sh.uploaded.fetch_add(total, Ordering::SeqCst);
        return json(StatusCode::OK, serde_json::json!({"received": total}));
    }
    let identity = match (&sh.tokeninfo, seen.bearer()) {
        (Some(url), Some(token)) => whose(&sh.http, url, token).await,
        _ => None,
    };
    json(
        StatusCode::OK,
        serde_json::json!({
            "method": seen.method.as_str(),
            "path": seen.path,
            "host": host,
            "version": format!("{:?}", seen.version),
            "token": seen.bearer().map(crate::tokens::fingerprint),
            "identity": identity,
            "user_project": seen.headers.get("x-goog-user-project").and_then(|v| v.to_str().ok()),
        }),
    )
}

/// Ask tokeninfo whose token this is: the email, or the `sub` of a federated identity.
async fn whose(http: &reqwest::Client, base: &str, token: &str) -> Option<String> {
    let v: serde_json::Value = http
        .post(format!("{base}/tokeninfo"))
        .form(&[("access_token", token)])
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    v.get("email")
        .or_else(|| v.get("sub"))
        .and_then(|e| e.as_str())
        .map(String::from)
}

fn download(n: u64) -> Response<Body> {
    const CHUNK: u64 = 64 * 1024;
    let chunk = Bytes::from(vec![b'x'; CHUNK as usize]);
    let stream = futures_util::stream::unfold(n, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                return None;
            }
            let take = left.min(CHUNK);
            Some((
                Ok::<_, std::io::Error>(Frame::data(chunk.slice(..take as usize))),
                left - take,
            ))
        }
    });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    if let Ok(v) = http::HeaderValue::from_str(&n.to_string()) {
        resp.headers_mut().insert(header::CONTENT_LENGTH, v);
    }
    resp
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(v.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

/// A throwaway CA and a leaf it signed, for test servers of every kind: this origin, the
/// gRPC origins, and third-party servers (nginx, grpcio) that read PEM files.
pub struct TestCertificates {
    /// The CA, which clients of these servers trust.
    pub ca_pem: String,
    /// The leaf, then the CA.
    pub chain_pem: String,
    /// The leaf's private key (PKCS#8).
    pub key_pem: String,
    chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
}

/// A CA and a leaf for `names` (DNS names or IP addresses).
pub fn test_certificates(names: &[&str]) -> Result<TestCertificates, String> {
    let err = |e: rcgen::Error| format!("origin certificate: {e}");
    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "impersonate-proxy test origin CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(err)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf_key = KeyPair::generate().map_err(err)?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "origin");
    for n in names {
        let san = match n.parse() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName((*n).to_string().try_into().map_err(err)?),
        };
        params.subject_alt_names.push(san);
    }
    let leaf = params.signed_by(&leaf_key, &issuer).map_err(err)?;
    Ok(TestCertificates {
        ca_pem: ca_cert.pem(),
        chain_pem: format!("{}{}", leaf.pem(), ca_cert.pem()),
        key_pem: leaf_key.serialize_pem(),
        chain: vec![leaf.der().clone(), ca_cert.der().clone()],
        key_der: leaf_key.serialize_der(),
    })
}

/// A throwaway CA and a leaf for `names`, as a rustls server config with ALPN h2 + http/1.1,
/// and the CA's PEM. Also used by test servers of other kinds (the gRPC origin).
pub fn tls_config(names: &[&str]) -> Result<(rustls::ServerConfig, String), String> {
    let certs = test_certificates(names)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certs.key_der));
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs.chain, key)
        .map_err(|e| format!("origin TLS config: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((config, certs.ca_pem))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_of_requests_keeps_only_the_newest() {
        let mut list = VecDeque::new();
        for i in 0..SEEN_KEPT + 5 {
            let seen = Seen {
                method: Method::GET,
                path: format!("/{i}"),
                host: "h".into(),
                version: Version::HTTP_11,
                headers: HeaderMap::new(),
            };
            remember(&mut list, seen);
        }
        assert_eq!(list.len(), SEEN_KEPT);
        assert_eq!(list.front().map(|s| s.path.as_str()), Some("/5"));
        let last = format!("/{}", SEEN_KEPT + 4);
        assert_eq!(list.back().map(|s| s.path.as_str()), Some(last.as_str()));
    }
}
