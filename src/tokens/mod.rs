//! Source credential, IAM Credentials client, token cache and refresher. (Stub: owned by the
//! tokens work.)

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;

use crate::config::{Config, IdentityConfig};

#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    #[error("no token for {target}: {message}")]
    Unavailable { target: String, message: String },
}

/// What to mint: one cache entry per distinct spec.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenSpec {
    pub target: String,
    /// Normalised to `projects/-/serviceAccounts/EMAIL`.
    pub delegates: Vec<String>,
    pub kind: TokenKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TokenKind {
    Access {
        scopes: Vec<String>,
        lifetime: Duration,
    },
    Id {
        audience: String,
        include_email: bool,
    },
}

impl TokenSpec {
    pub fn access(id: &IdentityConfig) -> TokenSpec {
        TokenSpec {
            target: id.service_account.clone(),
            delegates: id.delegates.clone(),
            kind: TokenKind::Access {
                scopes: id.scopes.clone(),
                lifetime: id.lifetime,
            },
        }
    }

    pub fn id_token(id: &IdentityConfig, audience: &str, include_email: bool) -> TokenSpec {
        TokenSpec {
            target: id.service_account.clone(),
            delegates: id.delegates.clone(),
            kind: TokenKind::Id {
                audience: audience.to_string(),
                include_email,
            },
        }
    }
}

/// One cache entry, shared by every route that uses the same spec.
pub struct TokenSlot {
    spec: TokenSpec,
}

impl TokenSlot {
    /// The hot path: a ready `Bearer …` header value, or a single-flight mint when cold.
    pub async fn authorization(&self) -> Result<HeaderValue, TokenError> {
        Err(TokenError::Unavailable {
            target: self.spec.target.clone(),
            message: "not implemented".into(),
        })
    }

    pub fn spec(&self) -> &TokenSpec {
        &self.spec
    }
}

pub struct TokenEngine {}

impl TokenEngine {
    /// Build the source credential and IAM client from config. No network call.
    pub async fn from_config(_config: &Config) -> Result<Arc<TokenEngine>, TokenError> {
        Ok(Arc::new(TokenEngine {}))
    }

    /// The cache entry for a spec, created (cold) on first call and registered with the
    /// refresher.
    pub fn slot(&self, spec: TokenSpec) -> Arc<TokenSlot> {
        Arc::new(TokenSlot { spec })
    }

    /// Mint every slot created so far; one result per slot.
    pub async fn warm(&self) -> Vec<(TokenSpec, Result<(), TokenError>)> {
        Vec::new()
    }

    /// Who credential A is, for audit lines (an email, or the ADC type when unknown).
    pub fn source_principal(&self) -> &str {
        "unknown"
    }
}
