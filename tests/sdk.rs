//! Google's own client libraries and CLIs through the proxy, unchanged: each runs with only
//! the lines `impersonate-proxy env --format dotenv` prints (no credentials in code, no key
//! file, none of the machine's own CA or proxy variables), and the origin sees only the
//! route's token.
//!
//! - Python google-cloud-storage and @google-cloud/storage (Node) against
//!   `gcp-storage-emulator` behind Debian's nginx (TLS for storage.googleapis.com);
//! - Python google-cloud-pubsub over gRPC against a grpcio stand-in that uses the library's
//!   own message types (`tests/sdk/pubsub_server.py`);
//! - gsutil from PyPI.
//!
//! The clients live in venvs and a node_modules under `target/`, installed on first use from
//! PyPI and npm. Node comes from the machine (`.ci/run` installs Debian's when it is missing).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::nginx::Nginx;
use common::*;
use impersonate_proxy::config::{FacadeTokens, MetadataFacadeConfig};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_impersonate-proxy");
const SDK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk");

/// The sandbox with the metadata facade on, and `tweak`'s origins.
async fn sdk_sandbox(tweak: impl FnOnce(&mut impersonate_proxy::config::Config)) -> Sandbox {
    sandbox_with(|c| {
        c.facade.metadata = Some(MetadataFacadeConfig {
            listen: any_port(),
            identity: "dev".into(),
            project_id: "demo-project".into(),
            numeric_project_id: "123456789012".into(),
            tokens: FacadeTokens::Placeholder,
        });
        tweak(c);
    })
    .await
}

/// What `impersonate-proxy env --format dotenv` prints for this sandbox: a config naming the
/// sandbox's listener, CA and facade, and nothing else.
async fn env_lines(sb: &Sandbox) -> Vec<(String, String)> {
    let cfg = sb.dir.join("env.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listen: {proxy}\nca: {{ cert: {dir}/ca.pem, key: {dir}/ca-key.pem }}\nidentities: {{ dev: {{ service_account: {DEV} }} }}\nfacade: {{ metadata: {{ listen: {meta}, identity: dev, project_id: demo-project }} }}\n",
            proxy = sb.server.proxy_addr(),
            meta = sb.server.metadata_addr().unwrap(),
            dir = sb.dir.display(),
        ),
    )
    .unwrap();
    let out = tokio::process::Command::new(BIN)
        .args(["env", "--format", "dotenv", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// `program` with `env`'s lines and nothing of the machine's: every CA, proxy and credential
/// variable it might inherit is removed first, and HOME is a fresh directory, so no gcloud or
/// ADC file of the machine's is found.
fn client(program: &Path, env: &[(String, String)], home: &Path) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(program);
    for var in [
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "NODE_EXTRA_CA_CERTS",
        "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "GOOGLE_CLOUD_PROJECT",
        "CLOUDSDK_CONFIG",
        "BOTO_CONFIG",
        "BOTO_PATH",
    ] {
        c.env_remove(var);
    }
    std::fs::create_dir_all(home).unwrap();
    c.env("HOME", home).envs(env.iter().map(|(k, v)| (k, v)));
    c
}

async fn run_ok(mut c: tokio::process::Command, what: &str) -> Value {
    let out = c.output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{what}: {e}: {stdout}"))
}

/// `gcp-storage-emulator` on a free loopback port, in memory.
async fn storage_emulator(python_bin: &Path) -> (tokio::process::Child, SocketAddr) {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let exe = python_bin.with_file_name("gcp-storage-emulator");
    let child = tokio::process::Command::new(exe)
        .args(["start", "--host", "127.0.0.1", "--in-memory", "--port"])
        .arg(port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return (child, addr);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("gcp-storage-emulator did not listen on {addr}");
}

/// `@google-cloud/storage` in `target/node-sdk`, installed from npm on first use.
async fn node_sdk() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/node-sdk");
    if !dir.join("node_modules/@google-cloud/storage").exists() {
        std::fs::create_dir_all(&dir).unwrap();
        let out = tokio::process::Command::new("npm")
            .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .arg("@google-cloud/storage")
            .output()
            .await
            .expect("npm runs (Node and npm are needed: .ci/run installs them)");
        assert!(
            out.status.success(),
            "npm install @google-cloud/storage: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_clients_run_unchanged_through_the_proxy() {
    let python = python_venv(
        "pyenv-sdk",
        "google.cloud.storage, google.cloud.pubsub_v1, gcp_storage_emulator",
        &[
            "google-cloud-storage",
            "google-cloud-pubsub",
            "gcp-storage-emulator",
        ],
    )
    .await;
    let (mut emulator, app) = storage_emulator(&python).await;
    let nginx = Nginx::start_with(true, &["storage.googleapis.com"], Some(app)).await;
    let (addr, ca) = (nginx.addr, nginx.ca_file.clone());
    let sb = sdk_sandbox(move |c| {
        c.upstream
            .resolve
            .insert("storage.googleapis.com:443".into(), addr);
        c.upstream.extra_roots.push(ca);
    })
    .await;
    let env = env_lines(&sb).await;
    let home = sb.dir.join("home");

    // Python: create a bucket, list, a resumable 10 MiB upload, download, delete.
    let mut py = client(&python, &env, &home);
    py.arg(format!("{SDK}/storage.py")).arg("sdk-bucket");
    let v = run_ok(py, "python google-cloud-storage").await;
    assert_eq!(
        v["credentials"], "google.auth.compute_engine.credentials.Credentials",
        "the library found the metadata facade: {v}"
    );
    assert_eq!(v["project"], "demo-project");
    assert!(v["buckets"]
        .as_array()
        .unwrap()
        .contains(&"sdk-bucket".into()));
    assert_eq!(v["uploaded_sha256"], v["downloaded_sha256"]);
    assert_eq!(v["listed"], serde_json::json!(["py.bin"]));
    assert_eq!(v["after_delete"], serde_json::json!([]));

    // Node: a resumable upload and a download.
    let node_dir = node_sdk().await;
    let upload = sb.dir.join("node-up.bin");
    std::fs::write(&upload, common::nginx::payload(6 * 1024 * 1024 + 7)).unwrap();
    let mut node = client(Path::new("node"), &env, &home);
    node.env("NODE_PATH", node_dir.join("node_modules"))
        .arg(format!("{SDK}/storage.js"))
        .arg("sdk-bucket")
        .arg(&upload)
        .arg(sb.dir.join("node-down.bin"));
    let v = run_ok(node, "node @google-cloud/storage").await;
    assert_eq!(v["uploaded_sha256"], v["downloaded_sha256"], "{v}");
    assert!(v["listed"].as_array().unwrap().contains(&"node.bin".into()));

    // gsutil (PyPI): cp up and back, and ls, with env's boto file.
    let gsutil = python_venv("pyenv-gsutil", "gslib", &["gsutil"])
        .await
        .with_file_name("gsutil");
    // Over gsutil's 8 MiB resumable threshold: gcp-storage-emulator answers gsutil's
    // one-shot multipart upload with a dropped connection (nginx's 502), resumable works.
    let upload = sb.dir.join("gsutil-up.bin");
    std::fs::write(&upload, common::nginx::payload(9 * 1024 * 1024 + 5)).unwrap();
    let down = sb.dir.join("gsutil-down.bin");
    for args in [
        vec![
            "cp".to_string(),
            upload.display().to_string(),
            "gs://sdk-bucket/gsutil.bin".into(),
        ],
        vec![
            "cp".into(),
            "gs://sdk-bucket/gsutil.bin".into(),
            down.display().to_string(),
        ],
        vec!["ls".into(), "gs://sdk-bucket".into()],
    ] {
        // Output to files, so a hang still shows what gsutil said before it.
        let (out_file, err_file) = (sb.dir.join("gsutil.out"), sb.dir.join("gsutil.err"));
        let mut g = client(&gsutil, &env, &home);
        if std::env::var_os("GSUTIL_DEBUG").is_some() {
            g.arg("-D");
        }
        g.args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&out_file).unwrap())
            .stderr(std::fs::File::create(&err_file).unwrap())
            .kill_on_drop(true);
        let status = tokio::time::timeout(
            std::time::Duration::from_secs(if std::env::var_os("GSUTIL_DEBUG").is_some() {
                30
            } else {
                120
            }),
            g.status(),
        )
        .await;
        let text = format!(
            "{}{}",
            std::fs::read_to_string(&out_file).unwrap_or_default(),
            std::fs::read_to_string(&err_file).unwrap_or_default()
        );
        let status = status.unwrap_or_else(|_| panic!("gsutil {args:?} hung: {text}"));
        assert!(status.unwrap().success(), "gsutil {args:?}: {text}");
        if args[0] == "ls" {
            assert!(text.contains("gs://sdk-bucket/gsutil.bin"), "{text}");
        }
    }
    assert_eq!(
        std::fs::read(&down).unwrap(),
        std::fs::read(&upload).unwrap()
    );

    // Every request nginx saw carried the route's token, never the facade's placeholder.
    let seen = nginx.assert_clean(&sb, DEV, 10).await;
    assert!(
        seen.iter()
            .any(|s| s["uri"].as_str().unwrap().contains("uploadType=resumable")),
        "a resumable upload went through"
    );
    sb.shutdown().await;
    nginx.stop().await;
    let _ = emulator.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_over_grpc_runs_unchanged_through_the_proxy() {
    let python = python_venv(
        "pyenv-sdk",
        "google.cloud.storage, google.cloud.pubsub_v1, gcp_storage_emulator",
        &[
            "google-cloud-storage",
            "google-cloud-pubsub",
            "gcp-storage-emulator",
        ],
    )
    .await;
    let dir = cert_dir("ip-pubsub", &["pubsub.googleapis.com"]);
    let seen_file = dir.join("authorization.txt");
    let mut cmd = tokio::process::Command::new(&python);
    cmd.arg(format!("{SDK}/pubsub_server.py"))
        .arg(dir.join("chain.pem"))
        .arg(dir.join("key.pem"))
        .arg(&seen_file);
    let (mut server, addr) = spawn_printing_port(cmd).await;
    let ca = dir.join("ca.pem");
    let sb = sdk_sandbox(move |c| {
        c.upstream
            .resolve
            .insert("pubsub.googleapis.com:443".into(), addr);
        c.upstream.extra_roots.push(ca);
    })
    .await;
    let env = env_lines(&sb).await;
    let mut py = client(&python, &env, &sb.dir.join("home"));
    py.arg(format!("{SDK}/pubsub.py"));
    let v = run_ok(py, "python google-cloud-pubsub").await;
    assert_eq!(v["project"], "demo-project");
    assert_eq!(v["published"], 100);
    let mut expected: Vec<String> = (0..100).map(|i| format!("message {i}")).collect();
    expected.sort();
    assert_eq!(v["received"], serde_json::json!(expected));
    // Every call reached the stand-in with the route's token, never the placeholder.
    let seen = std::fs::read_to_string(&seen_file).unwrap();
    let calls: Vec<&str> = seen.lines().collect();
    assert!(calls.len() >= 3, "{seen}");
    for auth in calls {
        let token = auth.strip_prefix("Bearer ").unwrap();
        assert_eq!(sb.emulator.token_info(token).unwrap().principal, DEV);
    }
    sb.shutdown().await;
    let _ = server.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
}
