//! Conformance: Google's own google-auth-library-python against the emulator, sending its
//! requests with its bodies as it sends them (`"delegates": null`, `"lifetime": "3600s"`,
//! `"includeEmail": false`, a key-file source scoped to `…/auth/iam`, the metadata server's
//! ping, `?recursive=true`, `token`, `identity?format=full`).
//!
//! The library is installed from PyPI into a venv under target/ (once), as the grpcio interop
//! test does; nothing else leaves the machine. It is pointed at the emulator through its
//! documented knobs: `token_uri` in the key file, `iam_endpoint_override` for
//! generateAccessToken, `GCE_METADATA_HOST` / `GCE_METADATA_IP` for the metadata server.
//! generateIdToken and signBlob have no endpoint override in the library (their URL is
//! `https://iamcredentials.googleapis.com/…`), so the script sends requests for that host to the
//! emulator at the transport (requests' `HTTPAdapter.send`), the way a hosts-file entry
//! would: what reaches the emulator is the library's request, unchanged.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use serde_json::Value;

use impersonate_proxy::emulator::{self, EmulatorHandle, Policy, Stats};

const KEYED: &str = "keyed@p.iam.gserviceaccount.com";
const TARGET: &str = "target@p.iam.gserviceaccount.com";
const VM: &str = "vm@p.iam.gserviceaccount.com";

fn policy(key_id: &str, public_pem: &str) -> String {
    format!(
        r#"
project_id: conformance-project
project_number: "424242424242"
service_accounts:
  - email: {KEYED}
    public_keys: {{ {key_id}: {public_pem:?} }}
  - email: {TARGET}
    bindings:
      - role: roles/iam.serviceAccountTokenCreator
        members: ["serviceAccount:{KEYED}", "serviceAccount:{VM}"]
metadata:
  service_account: {VM}
"#
    )
}

/// A venv with google-auth and requests, under target/ so it is made once per machine.
async fn python() -> PathBuf {
    common::python_venv(
        "pyenv-google-auth",
        "google.auth, requests",
        &["google-auth", "requests"],
    )
    .await
}

struct World {
    emu: EmulatorHandle,
    dir: PathBuf,
}

impl Drop for World {
    /// The key file goes even when an assertion fails.
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn world() -> World {
    impersonate_proxy::install_crypto_provider();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let key = emulator::new_service_account_key(KEYED, &format!("{url}/token")).unwrap();
    let emu = emulator::start(
        l,
        Policy::from_yaml(&policy(&key.key_id, &key.public_key_pem)).unwrap(),
    )
    .await
    .unwrap();
    let dir = std::env::temp_dir().join(format!(
        "ip-conformance-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("key.json"), key.key_file_json).unwrap();
    World { emu, dir }
}

/// Run `script` with the emulator's address in the environment; its stdout is one JSON object.
async fn run(python: &Path, w: &World, script: &str) -> Value {
    let host = w.emu.addr().to_string();
    let out = tokio::process::Command::new(python)
        .args(["-c", script])
        .env("EMULATOR", w.emu.url())
        .env("KEY_FILE", w.dir.join("key.json"))
        .env("GCE_METADATA_HOST", &host)
        .env("GCE_METADATA_IP", &host)
        .env("NO_PROXY", "127.0.0.1")
        .env("no_proxy", "127.0.0.1")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env_remove("GOOGLE_APPLICATION_CREDENTIALS")
        .env_remove("GCE_METADATA_ROOT")
        .env_remove("NO_GCE_CHECK")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn claims(jwt: &str) -> Value {
    use base64::Engine as _;
    let part = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap(),
    )
    .unwrap()
}

/// Sends requests for iamcredentials.googleapis.com to the emulator (see the module doc).
const REDIRECT_IAM: &str = r#"
import os, requests.adapters
_emulator = os.environ["EMULATOR"]
_send = requests.adapters.HTTPAdapter.send
def _to_emulator(self, request, **kw):
    prefix = "https://iamcredentials.googleapis.com"
    if request.url.startswith(prefix):
        request.url = _emulator + request.url[len(prefix):]
    return _send(self, request, **kw)
requests.adapters.HTTPAdapter.send = _to_emulator
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn google_auth_python_impersonated_credentials() {
    let python = python().await;
    let w = world().await;
    let script = format!(
        r#"{REDIRECT_IAM}
import json, os
from google.auth import impersonated_credentials
from google.auth.transport.requests import Request
from google.oauth2 import service_account

source = service_account.Credentials.from_service_account_file(os.environ["KEY_FILE"])
target = "{TARGET}"
creds = impersonated_credentials.Credentials(
    source_credentials=source,
    target_principal=target,
    target_scopes=["https://www.googleapis.com/auth/cloud-platform"],
    lifetime=3600,
    iam_endpoint_override=os.environ["EMULATOR"]
        + "/v1/projects/-/serviceAccounts/" + target + ":generateAccessToken",
)
request = Request()
creds.refresh(request)
id_creds = impersonated_credentials.IDTokenCredentials(
    creds, target_audience="https://svc.example.com", include_email=True)
id_creds.refresh(request)
signature = creds.sign_bytes(b"bytes to sign")
# Google's own verifiers, fed from the emulator's key endpoints: the signature with the
# account's certificate, the ID token with the OIDC certificates.
import requests
from google.auth import crypt
from google.oauth2 import id_token
certs = requests.get(os.environ["EMULATOR"] + "/service_accounts/v1/metadata/x509/" + target).json()
blob_verified = any(
    crypt.RSAVerifier.from_string(pem).verify(b"bytes to sign", signature)
    for pem in certs.values())
verified = id_token.verify_token(
    id_creds.token, request, audience="https://svc.example.com",
    certs_url=os.environ["EMULATOR"] + "/oauth2/v1/certs")
# An ID token straight from the key file: the JWT-bearer grant with target_audience.
key_id_creds = service_account.IDTokenCredentials.from_service_account_file(
    os.environ["KEY_FILE"], target_audience="https://key.example.com")
key_id_creds.refresh(request)
print(json.dumps({{
    "key_id_token": key_id_creds.token,
    "blob_verified": blob_verified,
    "verified_email": verified["email"],
    "access_token": creds.token,
    "expiry": creds.expiry.isoformat(),
    "source_token": creds._source_credentials.token,
    "id_token": id_creds.token,
    "signature_len": len(signature),
}}))
"#
    );
    let out = run(&python, &w, &script).await;
    // The key-file source went through the JWT-bearer grant, scoped to …/auth/iam as the
    // library asks; the emulator's scope check let it through.
    let source = w
        .emu
        .token_info(out["source_token"].as_str().unwrap())
        .unwrap();
    assert_eq!(source.principal, KEYED);
    assert_eq!(source.scopes, ["https://www.googleapis.com/auth/iam"]);
    let access = w
        .emu
        .token_info(out["access_token"].as_str().unwrap())
        .unwrap();
    assert_eq!(access.principal, TARGET);
    let id = claims(out["id_token"].as_str().unwrap());
    assert_eq!(id["aud"], "https://svc.example.com");
    assert_eq!(id["email"], TARGET);
    assert_eq!(out["signature_len"], 256);
    assert_eq!(
        out["blob_verified"], true,
        "the account's x509 key verifies signBlob"
    );
    assert_eq!(
        out["verified_email"], TARGET,
        "google.oauth2.id_token verifies it"
    );
    let stats = w.emu.stats();
    assert_eq!(Stats::get(&stats.generate_access_token), 1);
    assert_eq!(Stats::get(&stats.generate_id_token), 1);
    assert_eq!(Stats::get(&stats.sign_blob), 1);
    drop(w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn google_auth_python_compute_engine_credentials() {
    let python = python().await;
    let w = world().await;
    let script = r#"
import json
from google.auth import compute_engine
from google.auth.compute_engine import _metadata
from google.auth.transport.requests import Request

request = Request()
on_gce = _metadata.is_on_gce(request)
project = _metadata.get_project_id(request)
creds = compute_engine.Credentials()
creds.refresh(request)
id_creds = compute_engine.IDTokenCredentials(
    request, "https://svc.example.com", use_metadata_identity_endpoint=True)
id_creds.refresh(request)
print(json.dumps({
    "on_gce": on_gce,
    "project": project,
    "email": creds.service_account_email,
    "scopes": list(creds.scopes or []),
    "token": creds.token,
    "id_token": id_creds.token,
}))
"#;
    let out = run(&python, &w, script).await;
    assert_eq!(
        out["on_gce"], true,
        "the library's ping accepts the emulator"
    );
    assert_eq!(out["project"], "conformance-project");
    assert_eq!(out["email"], VM);
    let info = w.emu.token_info(out["token"].as_str().unwrap()).unwrap();
    assert_eq!(info.principal, VM);
    let id = claims(out["id_token"].as_str().unwrap());
    assert_eq!(id["aud"], "https://svc.example.com");
    assert_eq!(id["email"], VM, "format=full carries the email");
    assert_eq!(
        id["google"]["compute_engine"]["project_id"],
        "conformance-project"
    );
    assert!(Stats::get(&w.emu.stats().metadata_token) >= 1);
    drop(w);
}
