//! The offline demo, and the [`Sandbox`] it runs in: the emulator playing Google, a local TLS
//! origin standing in for `*.googleapis.com`, and the proxy between them, all on loopback. The
//! integration tests and the load tool build the same sandbox, so what the demo shows is what
//! the tests check.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::Config;
use crate::emulator::{self, EmulatorHandle, Policy};
use crate::origin::Origin;
use crate::server::Server;

/// Host names the origin answers for (and the proxy resolves to it).
pub const ORIGIN_NAMES: &[&str] = &[
    "storage.googleapis.com",
    "bigquery.googleapis.com",
    "pubsub.googleapis.com",
    "locked.googleapis.com",
    "svc.a.run.app",
    "blind.example.com",
];

pub const SOURCE_USER: &str = "alice@example.com";

/// Who may impersonate whom in the sandbox: alice (credential A) holds Token Creator on `hop`,
/// `dev` and `bq-jobs`; `reader` is reachable only through `hop`; nobody may use `locked`.
pub const POLICY: &str = r#"
users:
  - email: alice@example.com
    client_id: demo-client.apps.example.com
    client_secret: demo-secret
    refresh_token: demo-refresh-token
service_accounts:
  - email: hop@demo-project.iam.gserviceaccount.com
    bindings:
      - { role: roles/iam.serviceAccountTokenCreator, members: ["user:alice@example.com"] }
  - email: reader@demo-project.iam.gserviceaccount.com
    bindings:
      - { role: roles/iam.serviceAccountTokenCreator, members: ["serviceAccount:hop@demo-project.iam.gserviceaccount.com"] }
  - email: bq-jobs@demo-project.iam.gserviceaccount.com
    bindings:
      - { role: roles/iam.serviceAccountTokenCreator, members: ["user:alice@example.com"] }
    lifetime_extension: true
  - email: dev@demo-project.iam.gserviceaccount.com
    bindings:
      - { role: roles/iam.serviceAccountTokenCreator, members: ["user:alice@example.com"] }
  - email: locked@demo-project.iam.gserviceaccount.com
metadata:
  service_account: dev@demo-project.iam.gserviceaccount.com
"#;

/// The proxy config of the sandbox; `{…}` fields are filled in at start.
const CONFIG: &str = r#"
listen: {listen}
admin: null
ca: { cert: "{dir}/ca.pem", key: "{dir}/ca-key.pem" }
source: { file: "{dir}/adc.json" }
iam: { endpoint: "{emulator}" }
identities:
  reader:
    service_account: reader@demo-project.iam.gserviceaccount.com
    delegates: [hop@demo-project.iam.gserviceaccount.com]
    scopes: [https://www.googleapis.com/auth/devstorage.read_only]
  jobs:
    service_account: bq-jobs@demo-project.iam.gserviceaccount.com
    quota_project: demo-project
    lifetime: 2h
  dev:
    service_account: dev@demo-project.iam.gserviceaccount.com
  locked:
    service_account: locked@demo-project.iam.gserviceaccount.com
routes:
  - { name: prod-buckets-read, host: storage.googleapis.com, path: "/storage/v1/b/prod-*", methods: [GET, HEAD], identity: reader }
  - { name: bigquery, host: bigquery.googleapis.com, identity: jobs }
  - { name: locked, host: locked.googleapis.com, identity: locked }
  - { name: cloud-run, host: svc.a.run.app, id_token: { identity: dev, audience: "https://svc.a.run.app" } }
  - { name: everything-else, host: "*.googleapis.com", identity: dev }
other_hosts: tunnel
upstream:
  system_roots: false
  extra_roots: ["{dir}/origin-ca.pem"]
tokens:
  jitter: 1s
  safety_window: 5s
"#;

/// The emulator, the origin and the proxy, with their files in a private temp dir.
pub struct Sandbox {
    pub emulator: EmulatorHandle,
    pub origin: Origin,
    pub server: Server,
    pub config: Config,
    pub dir: PathBuf,
    /// Removes `dir` (the CA key and credentials in it included) however the sandbox ends:
    /// by `shutdown`, or dropped by a test that stops early.
    _remove_dir: RemoveDir,
}

/// A directory removed when this drops.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Sandbox {
    /// Start everything; `tweak` may change the proxy config before the proxy starts.
    pub async fn start(
        listen: SocketAddr,
        policy_yaml: &str,
        tweak: impl FnOnce(&mut Config),
    ) -> Result<Sandbox, String> {
        crate::install_crypto_provider();
        let dir = std::env::temp_dir().join(format!(
            "impersonate-proxy-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let policy = Policy::from_yaml(policy_yaml).map_err(|e| e.to_string())?;
        let emu_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let emulator = emulator::start(emu_listener, policy)
            .await
            .map_err(|e| e.to_string())?;
        let origin = Origin::start(ORIGIN_NAMES, Some(emulator.url())).await?;
        write(&dir.join("origin-ca.pem"), origin.ca_pem())?;
        let adc = serde_json::json!({
            "type": "authorized_user",
            "client_id": "demo-client.apps.example.com",
            "client_secret": "demo-secret",
            "refresh_token": "demo-refresh-token",
            "token_uri": format!("{}/token", emulator.url()),
        });
        write(&dir.join("adc.json"), &adc.to_string())?;

        let yaml = CONFIG
            .replace("{listen}", &listen.to_string())
            .replace("{dir}", &dir.display().to_string())
            .replace("{emulator}", &emulator.url());
        let mut config = Config::from_yaml(&yaml, "sandbox").map_err(|e| e.to_string())?;
        for name in ORIGIN_NAMES {
            config
                .upstream
                .resolve
                .insert(format!("{name}:443"), origin.addr());
        }
        tweak(&mut config);
        config.validate("sandbox").map_err(|e| e.to_string())?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
        let admin = match config.admin {
            Some(a) => Some(
                tokio::net::TcpListener::bind(a)
                    .await
                    .map_err(|e| format!("cannot listen on {a}: {e}"))?,
            ),
            None => None,
        };
        let server = Server::start_on(config.clone(), listener, admin)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Sandbox {
            emulator,
            origin,
            server,
            config,
            _remove_dir: RemoveDir(dir.clone()),
            dir,
        })
    }

    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.server.proxy_addr())
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A reqwest client that uses the proxy and trusts only the proxy's CA.
    pub fn client(&self) -> Result<reqwest::Client, String> {
        let pem = std::fs::read(self.ca_path()).map_err(|e| e.to_string())?;
        let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| e.to_string())?;
        let proxy = reqwest::Proxy::all(self.proxy_url()).map_err(|e| e.to_string())?;
        reqwest::Client::builder()
            .proxy(proxy)
            .tls_certs_only([cert])
            .build()
            .map_err(|e| e.to_string())
    }

    /// `impersonate-proxy env`'s lines (sh) for this sandbox: its listener, CA and facade as
    /// they are bound, with the bundle and boto file written beside the CA. (No Java
    /// truststore: `env` itself writes that.)
    pub fn env_lines(&self) -> Result<String, String> {
        use crate::onboard;
        let mut config = self.config.clone();
        config.listen = self.server.proxy_addr();
        if let (Some(m), Some(addr)) = (&mut config.facade.metadata, self.server.metadata_addr()) {
            m.listen = addr;
        }
        let files = onboard::Files::beside(&self.ca_path());
        let ca = crate::ca::CertificateAuthority::load_or_create(&config.ca)
            .map_err(|e| e.to_string())?;
        ca.write_bundle(&files.bundle).map_err(|e| e.to_string())?;
        write(&files.boto, &onboard::boto(&config, &files))?;
        let java = Err("the demo skips it".to_string());
        Ok(onboard::render(
            &onboard::lines(&config, &files, &java),
            onboard::Format::Sh,
        ))
    }

    /// Stop the proxy (draining), the origin and the emulator; remove the temp dir.
    pub async fn shutdown(self) {
        self.server.shutdown().await;
        self.origin.shutdown();
        self.emulator.shutdown().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The demo's proxy also offers Google's libraries a credential: the metadata facade (on a
/// free port) and the token-endpoint answer.
fn with_facade(c: &mut Config) {
    c.facade.metadata = Some(crate::config::MetadataFacadeConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        identity: "dev".into(),
        project_id: "demo-project".into(),
        numeric_project_id: "123456789012".into(),
        tokens: crate::config::FacadeTokens::Placeholder,
    });
    c.facade.token_endpoint = true;
}

/// `impersonate-proxy demo`.
pub async fn run(listen: SocketAddr, once: bool) -> Result<(), String> {
    let sandbox = match Sandbox::start(listen, POLICY, with_facade).await {
        Ok(s) => s,
        Err(e) if e.contains("cannot listen") => {
            println!("{listen} is busy; using a free port instead");
            Sandbox::start(SocketAddr::from(([127, 0, 0, 1], 0)), POLICY, with_facade).await?
        }
        Err(e) => return Err(e),
    };
    println!("impersonate-proxy demo: everything below runs on this machine, offline.\n");
    println!("  Google (emulated)   {}", sandbox.emulator.url());
    println!(
        "  origin (stand-in)   https://{{storage,bigquery,pubsub,locked}}.googleapis.com -> {}",
        sandbox.origin.addr()
    );
    println!("  proxy               {}", sandbox.proxy_url());
    if let Some(m) = sandbox.server.metadata_addr() {
        println!("  metadata facade     http://{m} (for Google's client libraries)");
    }
    println!("  credential A        {SOURCE_USER} (authorized_user ADC)\n");

    let client = sandbox.client()?;
    let requests = [
        (
            "GET",
            "https://storage.googleapis.com/storage/v1/b/prod-logs/o",
        ),
        (
            "POST",
            "https://storage.googleapis.com/upload/storage/v1/b/prod-logs/o",
        ),
        (
            "GET",
            "https://storage.googleapis.com/storage/v1/b/dev-scratch/o",
        ),
        (
            "POST",
            "https://bigquery.googleapis.com/bigquery/v2/projects/demo-project/jobs",
        ),
        ("GET", "https://svc.a.run.app/hello"),
        ("GET", "https://locked.googleapis.com/v1/secrets"),
    ];
    println!("Each request is sent with `Authorization: Bearer user-supplied-junk`:\n");
    println!("  {:<6} {:<72} {:<6} result", "method", "url", "status");
    println!("  {}", "-".repeat(110));
    for (method, url) in requests {
        let m = http::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
        let resp = client
            .request(m, url)
            .bearer_auth("user-supplied-junk")
            .timeout(Duration::from_secs(20))
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await.unwrap_or(serde_json::Value::Null);
        let outcome = if status == 200 {
            let who = body["identity"].as_str().unwrap_or("an ID token");
            let quota = body["user_project"]
                .as_str()
                .map(|q| format!(" (x-goog-user-project: {q})"))
                .unwrap_or_default();
            format!("reached the origin as {who}{quota}")
        } else {
            body.pointer("/error/message")
                .and_then(|m| m.as_str())
                .unwrap_or("error")
                .to_string()
        };
        println!("  {method:<6} {url:<72} {status:<6} {outcome}");
    }
    println!("\nTry it yourself in another shell: these are `impersonate-proxy env`'s lines for");
    println!(
        "this demo, so curl, Python's and Node's Google SDKs and gsutil find the proxy, trust"
    );
    println!("it, and get their credential from the metadata facade:\n");
    print!("{}", sandbox.env_lines()?);
    println!("\n  curl -s https://storage.googleapis.com/storage/v1/b/prod-logs/o");
    println!("  impersonate-proxy check --url https://bigquery.googleapis.com/x   # with your own config\n");
    if once {
        sandbox.shutdown().await;
        return Ok(());
    }
    println!("Serving until Ctrl-C.");
    crate::cli::wait_for_ctrl_c().await;
    sandbox.shutdown().await;
    Ok(())
}
