//! The binary as a user runs it: check (and its dry run), ca init, token, demo --once, and the
//! exit codes for a bad config.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Output;

const BIN: &str = env!("CARGO_BIN_EXE_impersonate-proxy");

async fn run(args: &[&str]) -> Output {
    tokio::process::Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test]
async fn check_prints_the_table_and_dry_runs_urls() {
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/config.yaml");
    let o = run(&["check", "--config", cfg]).await;
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("prod-buckets-read") && t.contains("reader@my-project.iam.gserviceaccount.com"),
        "{t}"
    );
    // Token timing, and whether the margin was configured or derived.
    assert!(
        t.contains("renewed 6m before expiry (derived), never served with less than 1m left")
            && t.contains("tokens: derived margins"),
        "{t}"
    );
    let o = run(&[
        "check",
        "--config",
        cfg,
        "--url",
        "https://storage.googleapis.com/storage/v1/b/prod-logs/o",
    ])
    .await;
    assert!(
        text(&o).contains("route `prod-buckets-read`") && text(&o).contains("`reader`"),
        "{}",
        text(&o)
    );
    let o = run(&[
        "check",
        "--config",
        cfg,
        "--url",
        "https://storage.googleapis.com/storage/v1/b/prod-logs/o",
        "--method",
        "DELETE",
    ])
    .await;
    assert!(text(&o).contains("route `everything-else`"), "{}", text(&o));
    let o = run(&["check", "--config", cfg, "--url", "https://example.org/"]).await;
    assert!(text(&o).contains("tunnelled blind"), "{}", text(&o));
}

#[tokio::test]
async fn a_bad_config_exits_3_naming_file_and_key() {
    let dir = std::env::temp_dir().join(format!("ip-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("bad.yaml");
    std::fs::write(
        &f,
        "identities:\n  a: { service_account: a@p.iam.gserviceaccount.com, lifetime: 20h }\n",
    )
    .unwrap();
    let o = run(&["check", "--config", f.to_str().unwrap()]).await;
    assert_eq!(o.status.code(), Some(3));
    assert!(
        text(&o).contains("bad.yaml") && text(&o).contains("identities.a.lifetime"),
        "{}",
        text(&o)
    );
    let o = run(&[
        "run",
        "--config",
        dir.join("missing.yaml").to_str().unwrap(),
    ])
    .await;
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    // --workers obeys the bounds of limits.workers, before anything is bound.
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/config.yaml");
    let o = run(&["--workers", "5000", "run", "--config", cfg]).await;
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(
        text(&o).contains("--workers") && text(&o).contains("limits.workers"),
        "{}",
        text(&o)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn ca_init_creates_once_and_refuses_to_overwrite() {
    let dir = std::env::temp_dir().join(format!("ip-cli-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            "ca: {{ cert: {0}/ca.pem, key: {0}/ca-key.pem }}\n",
            dir.display()
        ),
    )
    .unwrap();
    let o = run(&["ca", "init", "--config", cfg.to_str().unwrap()]).await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(dir.join("ca-key.pem").exists());
    let o = run(&["ca", "init", "--config", cfg.to_str().unwrap()]).await;
    assert_eq!(o.status.code(), Some(4));
    assert!(text(&o).contains("already exists"), "{}", text(&o));
    assert!(!text(&o).contains("PRIVATE KEY"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[cfg(unix)]
#[tokio::test]
async fn ca_init_force_refuses_a_symlinked_key_and_warns_about_a_shared_directory() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("ip-cli-ca-link-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            "ca: {{ cert: {0}/ca.pem, key: {0}/ca-key.pem }}\n",
            dir.display()
        ),
    )
    .unwrap();
    let victim = dir.join("victim.txt");
    std::fs::write(&victim, "not yours\n").unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("ca-key.pem")).unwrap();
    let o = run(&["ca", "init", "--force", "--config", cfg.to_str().unwrap()]).await;
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(text(&o).contains("symbolic link"), "{}", text(&o));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "not yours\n");
    // A group-writable directory: created, with a warning on stderr.
    std::fs::remove_file(dir.join("ca-key.pem")).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o775)).unwrap();
    let o = run(&["ca", "init", "--config", cfg.to_str().unwrap()]).await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("writable by group or others"),
        "{}",
        text(&o)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_prints_a_token_of_the_identity() {
    let sb = common::sandbox().await;
    let cfg = sb.dir.join("cli.yaml");
    std::fs::write(
        &cfg,
        format!(
            "source: {{ file: \"{}/adc.json\" }}\niam: {{ endpoint: \"{}\" }}\nidentities:\n  reader: {{ service_account: reader@demo-project.iam.gserviceaccount.com, delegates: [hop@demo-project.iam.gserviceaccount.com] }}\n  locked: {{ service_account: locked@demo-project.iam.gserviceaccount.com }}\n",
            sb.dir.display(),
            sb.emulator.url()
        ),
    )
    .unwrap();
    let o = run(&["token", "reader", "--config", cfg.to_str().unwrap()]).await;
    assert!(o.status.success(), "{}", text(&o));
    let token = String::from_utf8(o.stdout).unwrap();
    let info = sb.emulator.token_info(token.trim()).unwrap();
    assert_eq!(info.principal, common::READER);
    let o = run(&[
        "token",
        "reader",
        "--id-token",
        "--audience",
        "https://x.run.app",
        "--config",
        cfg.to_str().unwrap(),
    ])
    .await;
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8(o.stdout)
            .unwrap()
            .trim()
            .split('.')
            .count(),
        3,
        "a JWT"
    );
    let o = run(&["token", "locked", "--config", cfg.to_str().unwrap()]).await;
    assert_eq!(o.status.code(), Some(5));
    assert!(text(&o).contains("PERMISSION_DENIED"), "{}", text(&o));
    let o = run(&["token", "nobody", "--config", cfg.to_str().unwrap()]).await;
    assert!(text(&o).contains("no identity `nobody`"), "{}", text(&o));
    sb.shutdown().await;
}

#[tokio::test]
async fn the_demo_runs_offline_and_shows_each_identity() {
    // The demo writes its log to the temp directory: one of this test's own, removed after.
    let tmp = std::env::temp_dir().join(format!(
        "impersonate-proxy-demo-test-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&tmp).unwrap();
    let o = tokio::process::Command::new(BIN)
        .args(["demo", "--once", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .env("TMPDIR", &tmp)
        .output()
        .await
        .unwrap();
    assert!(
        tmp.join("impersonate-proxy-demo.log").exists(),
        "the demo's log went elsewhere"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let t = String::from_utf8(o.stdout.clone()).unwrap();
    for want in [
        "reached the origin as reader@demo-project.iam.gserviceaccount.com",
        "reached the origin as bq-jobs@demo-project.iam.gserviceaccount.com (x-goog-user-project: demo-project)",
        "reached the origin as dev@demo-project.iam.gserviceaccount.com",
        "503    impersonate-proxy: no token for route `locked`",
        "export HTTPS_PROXY='http://127.0.0.1:",
        "export GCE_METADATA_HOST='127.0.0.1:",
        "export BOTO_CONFIG=",
    ] {
        assert!(t.contains(want), "missing {want:?} in:\n{t}");
    }
    // A clean table: the logs went to their file, not between the rows.
    let all = text(&o);
    assert!(
        !all.contains(" WARN ") && !all.contains(" INFO "),
        "log lines in the demo's output:\n{all}"
    );
}

/// The proxy's own calls to Google (here the OAuth2 refresh and generateAccessToken, made by
/// `token`) ignore `HTTPS_PROXY`, `HTTP_PROXY` and `ALL_PROXY` in its environment: a shell
/// that ran `eval "$(impersonate-proxy env)"` points them at the proxy itself. Only
/// `outbound_proxy` in the config sends them through a proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_calls_to_google_ignore_the_proxy_environment() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt;
    let sb = common::sandbox().await;
    // A proxy that counts who came and serves nobody.
    let trap = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let trap_url = format!("http://{}", trap.local_addr().unwrap());
    let came = Arc::new(AtomicU64::new(0));
    let counted = came.clone();
    let trap_task = tokio::spawn(async move {
        while let Ok((mut s, _)) = trap.accept().await {
            counted.fetch_add(1, Ordering::Relaxed);
            let _ = s
                .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
                .await;
        }
    });
    let config = |extra: &str| {
        let path = sb.dir.join(format!("token-{}.yaml", extra.len()));
        std::fs::write(
            &path,
            format!(
                "source: {{ file: {dir}/adc.json }}\niam: {{ endpoint: \"{iam}\" }}\nidentities:\n  dev: {{ service_account: {sa} }}\n{extra}",
                dir = sb.dir.display(),
                iam = sb.emulator.url(),
                sa = common::DEV,
            ),
        )
        .unwrap();
        path
    };
    let token = |path: std::path::PathBuf| {
        let mut cmd = tokio::process::Command::new(BIN);
        cmd.args(["token", "dev", "--config"])
            .arg(path)
            .env("RUST_LOG", "warn")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy");
        for var in [
            "HTTPS_PROXY",
            "https_proxy",
            "HTTP_PROXY",
            "http_proxy",
            "ALL_PROXY",
            "all_proxy",
        ] {
            cmd.env(var, &trap_url);
        }
        cmd
    };
    let o = token(config("")).output().await.unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let minted = String::from_utf8(o.stdout.clone()).unwrap();
    assert_eq!(
        sb.emulator.token_info(minted.trim()).unwrap().principal,
        common::DEV
    );
    assert_eq!(
        came.load(Ordering::Relaxed),
        0,
        "nothing went to the env's proxy"
    );

    // Named in the config, the outbound proxy is used (and here fails the mint).
    let o = token(config(&format!("outbound_proxy: \"{trap_url}\"\n")))
        .output()
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(came.load(Ordering::Relaxed) >= 1);
    trap_task.abort();
    sb.shutdown().await;
}

/// `env` as a user runs it: every line parses in its format, and the files it names exist
/// (the merged bundle, gsutil's boto file, and Java's truststore when a JDK is on PATH).
#[tokio::test]
async fn env_prints_every_client_familys_lines_and_writes_their_files() {
    let dir = std::env::temp_dir().join(format!("ip-cli-env-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listen: 127.0.0.1:18080\nca: {{ cert: {0}/ca.pem, key: {0}/ca-key.pem }}\nidentities: {{ dev: {{ service_account: {1} }} }}\nfacade: {{ metadata: {{ identity: dev, project_id: env-proj, listen: 127.0.0.1:18181 }} }}\n",
            dir.display(),
            common::DEV
        ),
    )
    .unwrap();
    let o = run(&[
        "env",
        "--config",
        cfg.to_str().unwrap(),
        "--format",
        "dotenv",
    ])
    .await;
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    let vars: std::collections::BTreeMap<&str, &str> = out
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split_once('=').expect("NAME=value"))
        .collect();
    assert_eq!(vars["HTTPS_PROXY"], "http://127.0.0.1:18080");
    assert_eq!(vars["GCE_METADATA_HOST"], "127.0.0.1:18181");
    assert_eq!(vars["METADATA_SERVER_DETECTION"], "assume-present");
    assert_eq!(vars["GOOGLE_CLOUD_PROJECT"], "env-proj");
    let bundle = std::fs::read_to_string(vars["SSL_CERT_FILE"]).unwrap();
    let ca = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
    assert!(
        bundle.trim_end().ends_with(ca.trim_end()),
        "the bundle ends with the CA"
    );
    let boto = std::fs::read_to_string(vars["BOTO_CONFIG"]).unwrap();
    assert!(boto.contains("proxy_port = 18080") && boto.contains(vars["SSL_CERT_FILE"]));
    let keytool = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("keytool").is_file()))
        .unwrap_or(false);
    if keytool {
        let opts = vars["JAVA_TOOL_OPTIONS"];
        assert!(opts.contains("-Dhttps.proxyPort=18080"), "{opts}");
        let list = std::process::Command::new("keytool")
            .args(["-list", "-storepass", "changeit", "-keystore"])
            .arg(dir.join("truststore.p12"))
            .output()
            .unwrap();
        let list = String::from_utf8_lossy(&list.stdout);
        assert!(list.contains("impersonate-proxy"), "{list}");
    } else {
        assert!(out.contains("# Java: no truststore was written"), "{out}");
    }
    // The same lines for fish and sh.
    for (format, line) in [
        ("fish", "set -gx HTTPS_PROXY 'http://127.0.0.1:18080'"),
        ("sh", "export HTTPS_PROXY='http://127.0.0.1:18080'"),
    ] {
        let o = run(&["env", "--config", cfg.to_str().unwrap(), "--format", format]).await;
        assert!(
            String::from_utf8_lossy(&o.stdout).contains(line),
            "{}",
            text(&o)
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}
