//! What Google's client libraries need from the proxy to run unchanged: a credential to find
//! before their first request. They look for a key file, gcloud's file, then the metadata
//! server, and stop if there is none (google-auth's `DefaultCredentialsError`). The proxy
//! offers them placeholders (from its metadata-server facade, or as the answer to their
//! token-endpoint call) and puts the route's real token on the wire itself.
//!
//! A placeholder is recognisably not a token: `ya29.impersonate-proxy-placeholder`, and ID
//! tokens that are JWTs with a real `exp` (Python's google-auth decodes the payload for the
//! expiry) and a signature nobody can verify. Sent to a host no route names, a placeholder
//! fails there with Google's 401; `facade.metadata.tokens: real` is for those clients.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::config::{FacadeTokens, IdentityConfig, MetadataFacadeConfig};
use crate::metadata::{
    self, AccessToken, Account, BoxFuture, IdTokenFormat, Instance, MetadataError,
};
use crate::tokens::{TokenEngine, TokenSlot, TokenSpec};

/// The access token the facade hands out; routes replace it on the wire.
pub const PLACEHOLDER_ACCESS_TOKEN: &str = "ya29.impersonate-proxy-placeholder";

/// How long a placeholder says it lives: clients ask again when it runs out, which costs
/// nothing.
pub const PLACEHOLDER_LIFETIME: Duration = Duration::from_secs(3599);

/// An ID token placeholder for `audience`: a JWT whose claims are what a client reads (`aud`,
/// `exp`, `iat`, `iss`, and `email` when given), with a signature that verifies nowhere.
pub fn placeholder_id_token(audience: &str, email: Option<&str>) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let header = serde_json::json!({
        "alg": "RS256",
        "typ": "JWT",
        "kid": "impersonate-proxy-placeholder",
    });
    let mut claims = serde_json::json!({
        "iss": "https://accounts.google.com",
        "aud": audience,
        "azp": "impersonate-proxy-placeholder",
        "sub": "impersonate-proxy-placeholder",
        "iat": now,
        "exp": now + PLACEHOLDER_LIFETIME.as_secs(),
    });
    if let Some(email) = email {
        claims["email"] = email.into();
        claims["email_verified"] = true.into();
    }
    let part = |v: &serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.{}",
        part(&header),
        part(&claims),
        URL_SAFE_NO_PAD.encode("impersonate-proxy-placeholder")
    )
}

/// How many `?scopes=` sets and ID-token audiences a facade with real tokens mints for: each
/// becomes a cache entry with a refresher, and clients choose them.
const MAX_REAL_SPECS: usize = 16;

/// The proxy's metadata-server facade: the configured identity behind
/// `service-accounts/default`, handing out placeholders or (`tokens: real`) its real tokens.
pub struct MetadataFacade {
    config: MetadataFacadeConfig,
    identity: IdentityConfig,
    engine: Arc<TokenEngine>,
    /// Real mode: the slots minted for clients' scopes and audiences, bounded.
    slots: Mutex<HashMap<TokenSpec, Arc<TokenSlot>>>,
}

impl MetadataFacade {
    pub fn new(
        config: MetadataFacadeConfig,
        identity: IdentityConfig,
        engine: Arc<TokenEngine>,
    ) -> MetadataFacade {
        MetadataFacade {
            config,
            identity,
            engine,
            slots: Mutex::default(),
        }
    }

    /// The engine's slot for `spec`, if this facade may have one more.
    fn slot(&self, spec: TokenSpec) -> Result<Arc<TokenSlot>, MetadataError> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slots.get(&spec) {
            return Ok(s.clone());
        }
        if slots.len() >= MAX_REAL_SPECS {
            return Err(MetadataError::Unavailable(format!(
                "the metadata facade mints for at most {MAX_REAL_SPECS} scope sets and audiences"
            )));
        }
        let slot = self.engine.slot(spec.clone());
        slots.insert(spec, slot.clone());
        Ok(slot)
    }

    async fn real(&self, spec: TokenSpec) -> Result<(String, Duration), MetadataError> {
        let slot = self.slot(spec)?;
        let (header, left) = slot
            .authorization_for()
            .await
            .map_err(|e| MetadataError::Unavailable(e.to_string()))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| MetadataError::Unavailable("the minted token is not printable".into()))?
            .to_string();
        Ok((token, left))
    }
}

impl Instance for MetadataFacade {
    fn project_id(&self) -> String {
        self.config.project_id.clone()
    }

    fn numeric_project_id(&self) -> String {
        self.config.numeric_project_id.clone()
    }

    fn service_account(&self) -> Option<Account> {
        Some(Account {
            email: self.identity.service_account.clone(),
            scopes: self.identity.scopes.clone(),
        })
    }

    fn access_token(
        &self,
        scopes: Option<Vec<String>>,
    ) -> BoxFuture<'_, Result<AccessToken, MetadataError>> {
        Box::pin(async move {
            if self.config.tokens == FacadeTokens::Placeholder {
                return Ok(AccessToken {
                    access_token: PLACEHOLDER_ACCESS_TOKEN.to_string(),
                    expires_in: PLACEHOLDER_LIFETIME.as_secs(),
                });
            }
            let mut id = self.identity.clone();
            if let Some(scopes) = scopes.filter(|s| !s.is_empty()) {
                id.scopes = scopes;
            }
            let (access_token, left) = self.real(TokenSpec::access(&id)).await?;
            Ok(AccessToken {
                access_token,
                expires_in: left.as_secs(),
            })
        })
    }

    fn id_token<'a>(
        &'a self,
        audience: &'a str,
        format: IdTokenFormat,
    ) -> BoxFuture<'a, Result<String, MetadataError>> {
        Box::pin(async move {
            let full = format == IdTokenFormat::Full;
            if self.config.tokens == FacadeTokens::Placeholder {
                let email = full.then_some(self.identity.service_account.as_str());
                return Ok(placeholder_id_token(audience, email));
            }
            let spec = TokenSpec::id_token(&self.identity, audience, full);
            Ok(self.real(spec).await?.0)
        })
    }
}

/// Serve the facade on `listener` until `shutdown`: plain HTTP/1.1, as the metadata server
/// speaks; one access line per request (never the token).
pub async fn serve(
    listener: TcpListener,
    facade: Arc<MetadataFacade>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "metadata facade: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let facade = facade.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let facade = facade.clone();
                async move {
                    let resp =
                        metadata::serve(&*facade, req.method(), req.uri(), req.headers()).await;
                    log(peer, req.uri().path(), resp.status().as_u16());
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn log(peer: SocketAddr, path: &str, status: u16) {
    tracing::info!(target: "impersonate_proxy::access", client = %peer, path, status, "metadata facade");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_placeholder_id_token_decodes_with_a_future_exp() {
        let t = placeholder_id_token(
            "https://svc.a.run.app",
            Some("dev@p.iam.gserviceaccount.com"),
        );
        let parts: Vec<&str> = t.split('.').collect();
        assert_eq!(parts.len(), 3);
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["aud"], "https://svc.a.run.app");
        assert_eq!(claims["email"], "dev@p.iam.gserviceaccount.com");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let exp = claims["exp"].as_u64().unwrap();
        assert!(exp > now + 3000 && exp <= now + 3600, "{exp} vs {now}");
    }
}
