//! Debian's nginx as a third-party origin: a TLS server for `*.googleapis.com` on loopback,
//! with a certificate from a throwaway CA, offering h2 and HTTP/1.1 or HTTP/1.1 only.
//!
//! - `/echo/…` is passed to a small backend in this process, which answers with what it
//!   received from nginx: method, path, every header line (duplicates kept) and the body's
//!   length and SHA-256.
//! - `/files/…` is nginx's own static serving (ranges, HEAD, `ETag` and 304), from a
//!   directory the test fills.
//! - `/empty` is a 204.
//! - Every request is logged as one JSON line with what nginx itself saw: its authority, the
//!   `Authorization` value, each hop-by-hop field, its connection serial number. A request
//!   nginx refuses (two authorities, a connection-specific field on h2) is logged with 400.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};

pub const NGINX: &str = "/usr/sbin/nginx";

/// What nginx logs per request; see the module documentation.
const LOG_FORMAT: &str = r#"'{"method":"$request_method","uri":"$request_uri","protocol":"$server_protocol","status":"$status","host":"$http_host","authorization":"$http_authorization","connection":"$http_connection","keep_alive":"$http_keep_alive","proxy_connection":"$http_proxy_connection","proxy_authorization":"$http_proxy_authorization","te":"$http_te","upgrade":"$http_upgrade","transfer_encoding":"$http_transfer_encoding","content_length":"$http_content_length","cookie":"$http_cookie","conn":"$connection","conn_requests":"$connection_requests"}'"#;

pub struct Nginx {
    child: tokio::process::Child,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    /// The CA that signed nginx's certificate, as a file for `upstream.extra_roots`.
    pub ca_file: PathBuf,
    backend: Echo,
}

impl Nginx {
    /// Start nginx (h2 and HTTP/1.1 when `h2`, else HTTP/1.1 only) for `names`, with its
    /// backend. Panics, with nginx's own error log, if it does not come up.
    pub async fn start(h2: bool, names: &[&str]) -> Nginx {
        Nginx::start_with(h2, names, None).await
    }

    /// As [`Nginx::start`], with every other path passed to `app` (a plain-http server such as
    /// `gcp-storage-emulator`), which sees the client's `Host`; its `http://` redirects are
    /// rewritten to `https://`, as they would be behind Google's own front end.
    pub async fn start_with(h2: bool, names: &[&str], app: Option<SocketAddr>) -> Nginx {
        Nginx::start_conf(h2, names, app, 100_000).await
    }

    /// As [`Nginx::start`], ending each client connection after `keepalive_requests` requests:
    /// on h2, with a GOAWAY once the last one has come (nginx 1.19.7 and later).
    pub async fn start_closing_after(h2: bool, names: &[&str], keepalive_requests: u32) -> Nginx {
        Nginx::start_conf(h2, names, None, keepalive_requests).await
    }

    async fn start_conf(
        h2: bool,
        names: &[&str],
        app: Option<SocketAddr>,
        keepalive_requests: u32,
    ) -> Nginx {
        assert!(
            Path::new(NGINX).exists(),
            "{NGINX} is missing: the interop tests need Debian's nginx \
             (`apt-get install nginx-light`, which `.ci/run` does)"
        );
        let dir = super::cert_dir("ip-nginx", names);
        for sub in ["tmp", "www/files"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let ca_file = dir.join("ca.pem");

        let backend = Echo::start().await;
        let backend_addr = backend.addr;
        // nginx takes a port number, not port 0: take a free one and hand it over.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let d = dir.display();
        let listen = if h2 {
            format!("listen {addr} ssl http2;")
        } else {
            format!("listen {addr} ssl;")
        };
        let conf = format!(
            r#"
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 1024; }}
http {{
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    default_type application/octet-stream;
    log_format seen escape=json {LOG_FORMAT};
    server {{
        {listen}
        server_name {names};
        ssl_certificate {d}/chain.pem;
        ssl_certificate_key {d}/key.pem;
        access_log {d}/access.log seen;
        client_max_body_size 0;
        keepalive_requests {keepalive_requests};
        location /echo/ {{
            proxy_pass http://{backend_addr};
            proxy_http_version 1.1;
            proxy_request_buffering off;
            proxy_buffering off;
        }}
        location /files/ {{ root {d}/www; }}
        location = /empty {{ return 204; }}
        {app}
    }}
}}
"#,
            names = names.join(" "),
            // gsutil opens resumable uploads at /resumable/upload/…, which Google serves
            // and gcp-storage-emulator does not: the stand-in gets them at /upload/….
            app = app.map_or(String::new(), |a| {
                let pass = format!(
                    "proxy_pass http://{a}; proxy_http_version 1.1; \
                     proxy_request_buffering off; proxy_set_header Host $host; \
                     proxy_redirect http://$host/ https://$host/;"
                );
                format!(
                    "location / {{ {pass} }}\n        \
                     location /resumable/ {{ rewrite ^/resumable(/.*)$ $1 break; {pass} }}"
                )
            }),
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let mut child = tokio::process::Command::new(NGINX)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("nginx starts");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
                panic!("nginx exited ({status}): {log}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nginx did not listen on {addr} within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Nginx {
            child,
            addr,
            dir,
            ca_file,
            backend,
        }
    }

    /// A file nginx serves at `/files/NAME`.
    pub fn serve_file(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.dir.join("www/files").join(name), bytes).unwrap();
    }

    /// nginx's access log so far, one JSON object per request.
    pub fn seen(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("an access-log line is JSON"))
            .collect()
    }

    /// nginx's log once it holds at least `n` requests (it writes a line after the answer has
    /// gone, so a client can be done before the line is), or as it is after 10 s.
    pub async fn seen_at_least(&self, n: usize) -> Vec<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let seen = self.seen();
            if seen.len() >= n || tokio::time::Instant::now() > deadline {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every request in nginx's log, checked against the rules: nginx accepted it (it answers two
    /// authorities, or a connection-specific field on h2, with 400), it names the route's host
    /// once, it carries a token of `principal` (as the emulator says), and no hop-by-hop
    /// field reached it. `Transfer-Encoding: chunked` is allowed only as the framing of an HTTP/1.1 leg
    /// carrying a body of unknown length. Returns the log.
    pub async fn assert_clean(
        &self,
        sb: &super::Sandbox,
        principal: &str,
        min: usize,
    ) -> Vec<serde_json::Value> {
        let nginx = self;
        let seen = nginx.seen_at_least(min).await;
        assert!(seen.len() >= min, "nginx saw {} requests", seen.len());
        for s in &seen {
            let line = s.to_string();
            assert_ne!(
                s["status"],
                "400",
                "nginx refused it: {line}\n{}",
                nginx.error_log()
            );
            assert_eq!(s["host"], "storage.googleapis.com", "{line}");
            let token = s["authorization"]
                .as_str()
                .and_then(|a| a.strip_prefix("Bearer "))
                .unwrap_or_else(|| panic!("no bearer token: {line}"));
            let info = sb.emulator.token_info(token).expect("an emulator token");
            assert_eq!(info.principal, principal, "{line}");
            for field in [
                "connection",
                "keep_alive",
                "proxy_connection",
                "proxy_authorization",
                "upgrade",
            ] {
                assert_eq!(s[field], "", "{field} reached nginx: {line}");
            }
            assert!(s["te"] == "" || s["te"] == "trailers", "{line}");
            match s["transfer_encoding"].as_str() {
                Some("") => {}
                Some("chunked") => {
                    assert_eq!(s["protocol"], "HTTP/1.1", "{line}");
                    assert_eq!(s["content_length"], "", "{line}");
                }
                other => panic!("transfer-encoding {other:?}: {line}"),
            }
        }
        seen
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    /// Stop nginx (by its own process) and the backend; remove the directory.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
        self.backend.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A test that fails before `stop` still removes its directory (nginx itself is killed by
/// `kill_on_drop`).
impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The backend behind `/echo/`: HTTP/1.1 on loopback, answering with what nginx passed on.
/// Also a plain-http origin in its own right.
pub struct Echo {
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub connections: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Echo {
    pub async fn start() -> Echo {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicU64::new(0));
        let counted = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                counted.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(echo);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Echo {
            addr,
            connections,
            task,
        }
    }

    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

/// The answer: method, path, every header line (duplicates kept), the body's length and
/// SHA-256.
async fn echo(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let (parts, mut body) = req.into_parts();
    // `?delay_ms=N`: answer N ms late, for a client to give up on the request meanwhile.
    let delay = parts
        .uri
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("delay_ms=")))
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(ms) = delay {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mut hash = Sha256::new();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            len += data.len() as u64;
            hash.update(&data);
        }
    }
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let v = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.to_string(),
        "headers": headers,
        "body_len": len,
        "body_sha256": hex(&hash.finalize()),
    });
    Ok(Response::new(Full::new(Bytes::from(v.to_string()))))
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn sha256(b: &[u8]) -> String {
    hex(&Sha256::digest(b))
}

/// `n` bytes that differ from one run to the next and compress poorly.
pub fn payload(n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 32);
    let mut block = Sha256::digest(rand::random::<u64>().to_le_bytes());
    while out.len() < n {
        out.extend_from_slice(&block);
        block = Sha256::digest(block);
    }
    out.truncate(n);
    out
}
