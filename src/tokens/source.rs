//! Credential A: the source credential the proxy holds, in every Application Default
//! Credentials form, and its own cached access token.
//!
//! Written by hand rather than with `google-cloud-auth`: each form is one short HTTP exchange,
//! and this way every endpoint it calls (token_uri, the STS token_url, the impersonation URL,
//! the metadata host) comes from the credential file or `GCE_METADATA_HOST`, so the emulator
//! stands in for Google without process-wide environment changes in tests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::iam::{self, Minted};
use super::TokenError;
use crate::config::{SourceConfig, CLOUD_PLATFORM_SCOPE};

const GOOGLE_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
const DEFAULT_METADATA_HOST: &str = "metadata.google.internal";

enum Kind {
    ServiceAccount {
        email: String,
        key: aws_lc_rs::rsa::KeyPair,
        key_id: String,
        token_uri: String,
    },
    AuthorizedUser {
        client_id: String,
        client_secret: String,
        refresh_token: String,
        token_uri: String,
    },
    Impersonated {
        source: Box<Source>,
        url: String,
        delegates: Vec<String>,
    },
    External {
        audience: String,
        subject_token_type: String,
        token_url: String,
        subject_file: PathBuf,
        /// A JSON subject file's field holding the token (`format.subject_token_field_name`).
        json_field: Option<String>,
        impersonation_url: Option<String>,
    },
    Metadata {
        base: String,
    },
}

pub struct Source {
    kind: Kind,
    principal: String,
    http: reqwest::Client,
    /// Serialises refreshes of the source token: one fetch at a time, others wait and reuse.
    cached: Mutex<Option<(String, Instant)>>,
}

impl Source {
    pub fn from_config(cfg: &SourceConfig, http: reqwest::Client) -> Result<Source, TokenError> {
        let kind = match cfg {
            SourceConfig::File(path) => from_file(path, &http)?,
            SourceConfig::Metadata { host } => metadata(host.clone()),
            SourceConfig::Adc {} => adc(&http)?,
        };
        Ok(Source::new(kind, http))
    }

    fn new(kind: Kind, http: reqwest::Client) -> Source {
        let principal = match &kind {
            Kind::ServiceAccount { email, .. } => email.clone(),
            Kind::AuthorizedUser { .. } => "user (authorized_user ADC)".to_string(),
            Kind::Impersonated { url, .. } => target_of_impersonation_url(url)
                .unwrap_or_else(|| "impersonated_service_account".into()),
            Kind::External {
                impersonation_url,
                audience,
                ..
            } => impersonation_url
                .as_deref()
                .and_then(target_of_impersonation_url)
                .unwrap_or_else(|| format!("external_account ({audience})")),
            Kind::Metadata { .. } => "metadata server default account".to_string(),
        };
        Source {
            kind,
            principal,
            http,
            cached: Mutex::new(None),
        }
    }

    /// Who credential A is, for audit lines.
    pub fn principal(&self) -> &str {
        &self.principal
    }

    /// A source access token, refetched when less than 5 minutes (or a quarter of its
    /// lifetime) is left.
    pub async fn token(&self) -> Result<String, TokenError> {
        let mut cached = self.cached.lock().await;
        if let Some((token, refresh_at)) = cached.as_ref() {
            if Instant::now() < *refresh_at {
                return Ok(token.clone());
            }
        }
        let minted = Box::pin(self.fetch()).await?;
        let margin = (minted.expires_in / 4).min(Duration::from_secs(300));
        let refresh_at = Instant::now() + minted.expires_in.saturating_sub(margin);
        *cached = Some((minted.token.clone(), refresh_at));
        Ok(minted.token)
    }

    async fn fetch(&self) -> Result<Minted, TokenError> {
        match &self.kind {
            Kind::ServiceAccount {
                email,
                key,
                key_id,
                token_uri,
            } => {
                let assertion = sign_assertion(email, key, key_id, token_uri)?;
                let form = [
                    ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                    ("assertion", assertion.as_str()),
                ];
                oauth(&self.http, token_uri, &form).await
            }
            Kind::AuthorizedUser {
                client_id,
                client_secret,
                refresh_token,
                token_uri,
            } => {
                let form = [
                    ("grant_type", "refresh_token"),
                    ("client_id", client_id.as_str()),
                    ("client_secret", client_secret.as_str()),
                    ("refresh_token", refresh_token.as_str()),
                ];
                oauth(&self.http, token_uri, &form).await
            }
            Kind::Impersonated {
                source,
                url,
                delegates,
            } => {
                let bearer = source.token().await?;
                let body = json!({"scope": [CLOUD_PLATFORM_SCOPE], "delegates": delegates, "lifetime": "3600s"});
                iam::post_access_token(&self.http, url, &bearer, &body, "source credential").await
            }
            Kind::External {
                audience,
                subject_token_type,
                token_url,
                subject_file,
                json_field,
                impersonation_url,
            } => {
                let raw = std::fs::read_to_string(subject_file).map_err(|e| {
                    source_err(format!(
                        "external_account subject {}: {e}",
                        subject_file.display()
                    ))
                })?;
                let subject = match json_field {
                    Some(field) => serde_json::from_str::<Value>(&raw)
                        .ok()
                        .and_then(|v| v.get(field).and_then(Value::as_str).map(String::from))
                        .ok_or_else(|| {
                            source_err(format!("external_account subject file has no `{field}`"))
                        })?,
                    None => raw.trim().to_string(),
                };
                let form = [
                    (
                        "grant_type",
                        "urn:ietf:params:oauth:grant-type:token-exchange",
                    ),
                    ("audience", audience.as_str()),
                    ("scope", CLOUD_PLATFORM_SCOPE),
                    (
                        "requested_token_type",
                        "urn:ietf:params:oauth:token-type:access_token",
                    ),
                    ("subject_token", subject.as_str()),
                    ("subject_token_type", subject_token_type.as_str()),
                ];
                let federated = oauth(&self.http, token_url, &form).await?;
                match impersonation_url {
                    None => Ok(federated),
                    Some(url) => {
                        let body = json!({"scope": [CLOUD_PLATFORM_SCOPE], "lifetime": "3600s"});
                        iam::post_access_token(
                            &self.http,
                            url,
                            &federated.token,
                            &body,
                            "source credential",
                        )
                        .await
                    }
                }
            }
            Kind::Metadata { base } => {
                let url =
                    format!("{base}/computeMetadata/v1/instance/service-accounts/default/token");
                let resp = self
                    .http
                    .get(&url)
                    .header("Metadata-Flavor", "Google")
                    .send()
                    .await
                    .map_err(|e| {
                        source_err(format!(
                            "metadata server {base}: {}",
                            crate::error_chain(&e)
                        ))
                    })?;
                oauth_answer(resp, "metadata server").await
            }
        }
    }
}

fn source_err(message: String) -> TokenError {
    TokenError::Source { message }
}

fn metadata(host: Option<String>) -> Kind {
    let host = host
        .or_else(|| std::env::var("GCE_METADATA_HOST").ok())
        .unwrap_or_else(|| DEFAULT_METADATA_HOST.to_string());
    let base = if host.starts_with("http://") || host.starts_with("https://") {
        host
    } else {
        format!("http://{host}")
    };
    Kind::Metadata { base }
}

/// ADC discovery: `GOOGLE_APPLICATION_CREDENTIALS`, then gcloud's well-known file, then the
/// metadata server.
fn adc(http: &reqwest::Client) -> Result<Kind, TokenError> {
    if let Ok(path) = std::env::var("GOOGLE_APPLICATION_CREDENTIALS") {
        if !path.is_empty() {
            return from_file(Path::new(&path), http);
        }
    }
    let well_known = std::env::var("CLOUDSDK_CONFIG")
        .map(PathBuf::from)
        .ok()
        .or_else(|| {
            std::env::var("HOME")
                .ok()
                .map(|h| Path::new(&h).join(".config/gcloud"))
        })
        .map(|d| d.join("application_default_credentials.json"));
    if let Some(p) = well_known.filter(|p| p.exists()) {
        return from_file(&p, http);
    }
    Ok(metadata(None))
}

fn from_file(path: &Path, http: &reqwest::Client) -> Result<Kind, TokenError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| source_err(format!("{}: {e}", path.display())))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| source_err(format!("{}: not JSON: {e}", path.display())))?;
    from_json(&v, http).map_err(|m| source_err(format!("{}: {m}", path.display())))
}

fn from_json(v: &Value, http: &reqwest::Client) -> Result<Kind, String> {
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(String::from);
    let need = |k: &str| s(k).ok_or_else(|| format!("missing `{k}`"));
    match s("type").as_deref() {
        Some("service_account") => {
            let pem = need("private_key")?;
            let der = rustls_pemfile_pkcs8(&pem).ok_or("`private_key` is not a PKCS#8 PEM key")?;
            // The key error's text never includes key material.
            let key = aws_lc_rs::rsa::KeyPair::from_pkcs8(&der)
                .map_err(|e| format!("`private_key` is not an RSA key: {e}"))?;
            Ok(Kind::ServiceAccount {
                email: need("client_email")?,
                key,
                key_id: s("private_key_id").unwrap_or_default(),
                token_uri: s("token_uri").unwrap_or_else(|| GOOGLE_TOKEN_URI.into()),
            })
        }
        Some("authorized_user") => Ok(Kind::AuthorizedUser {
            client_id: need("client_id")?,
            client_secret: need("client_secret")?,
            refresh_token: need("refresh_token")?,
            token_uri: s("token_uri").unwrap_or_else(|| GOOGLE_TOKEN_URI.into()),
        }),
        Some("impersonated_service_account") => {
            let src = v
                .get("source_credentials")
                .ok_or("missing `source_credentials`")?;
            let inner = from_json(src, http).map_err(|m| format!("source_credentials: {m}"))?;
            let delegates = v
                .get("delegates")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(super::normalise_delegate)
                        .collect()
                })
                .unwrap_or_default();
            Ok(Kind::Impersonated {
                source: Box::new(Source::new(inner, http.clone())),
                url: need("service_account_impersonation_url")?,
                delegates,
            })
        }
        Some("external_account") => {
            let cs = v
                .get("credential_source")
                .ok_or("missing `credential_source`")?;
            let file = cs
                .get("file")
                .and_then(Value::as_str)
                .ok_or("only file-sourced `credential_source` is supported (no `file`)")?;
            let json_field = cs
                .get("format")
                .filter(|f| f.get("type").and_then(Value::as_str) == Some("json"))
                .and_then(|f| f.get("subject_token_field_name"))
                .and_then(Value::as_str)
                .map(String::from);
            Ok(Kind::External {
                audience: need("audience")?,
                subject_token_type: need("subject_token_type")?,
                token_url: s("token_url")
                    .unwrap_or_else(|| "https://sts.googleapis.com/v1/token".into()),
                subject_file: PathBuf::from(file),
                json_field,
                impersonation_url: s("service_account_impersonation_url"),
            })
        }
        Some(other) => Err(format!("unsupported credential type `{other}`")),
        None => Err("missing `type`".into()),
    }
}

fn rustls_pemfile_pkcs8(pem: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
        .ok()
        .map(|k| k.secret_pkcs8_der().to_vec())
}

fn sign_assertion(
    email: &str,
    key: &aws_lc_rs::rsa::KeyPair,
    key_id: &str,
    token_uri: &str,
) -> Result<String, TokenError> {
    use crate::emulator::jwt::b64url;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": key_id});
    let claims = json!({"iss": email, "sub": email, "scope": CLOUD_PLATFORM_SCOPE, "aud": token_uri, "iat": now, "exp": now + 3600});
    let input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let mut sig = vec![0; key.public_modulus_len()];
    key.sign(
        &aws_lc_rs::signature::RSA_PKCS1_SHA256,
        &aws_lc_rs::rand::SystemRandom::new(),
        input.as_bytes(),
        &mut sig,
    )
    .map_err(|_| source_err("cannot sign the service-account assertion".into()))?;
    Ok(format!("{input}.{}", b64url(&sig)))
}

async fn oauth(
    http: &reqwest::Client,
    url: &str,
    form: &[(&str, &str)],
) -> Result<Minted, TokenError> {
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let resp = http
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .map_err(|e| source_err(format!("{url}: {}", crate::error_chain(&e))))?;
    oauth_answer(resp, url).await
}

/// `{"access_token", "expires_in"}` or an OAuth / Google error, carried into the message.
async fn oauth_answer(resp: reqwest::Response, who: &str) -> Result<Minted, TokenError> {
    let status = resp.status();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let msg = v
            .get("error_description")
            .and_then(Value::as_str)
            .or_else(|| v.pointer("/error/message").and_then(Value::as_str))
            .or_else(|| v.get("error").and_then(Value::as_str))
            .unwrap_or("no error message");
        return Err(source_err(format!(
            "{who} answered {}: {msg}",
            status.as_u16()
        )));
    }
    let token = v
        .get("access_token")
        .and_then(Value::as_str)
        .ok_or_else(|| source_err(format!("{who}: no access_token in the answer")))?;
    let secs = v.get("expires_in").and_then(Value::as_u64).unwrap_or(3600);
    Ok(Minted {
        token: token.to_string(),
        expires_in: Duration::from_secs(secs),
    })
}

fn target_of_impersonation_url(url: &str) -> Option<String> {
    let (_, rest) = url.split_once("/serviceAccounts/")?;
    let (email, _) = rest.split_once(':')?;
    Some(email.replace("%40", "@"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_unknown_types_and_names_missing_fields() {
        let http = reqwest::Client::new();
        let e = from_json(&json!({"type": "authorized_user", "client_id": "x"}), &http)
            .err()
            .unwrap();
        assert!(e.contains("client_secret"), "{e}");
        assert!(from_json(&json!({"type": "gdch_service_account"}), &http).is_err());
        let e = from_json(&json!({"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "client_email": "a@b.c"}), &http)
            .err()
            .unwrap();
        assert!(!e.contains("AAAA"), "key material must not be echoed: {e}");
    }

    #[test]
    fn principal_of_an_impersonated_credential_is_its_target() {
        assert_eq!(
            target_of_impersonation_url("https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/sa%40p.iam.gserviceaccount.com:generateAccessToken").as_deref(),
            Some("sa@p.iam.gserviceaccount.com")
        );
    }
}
