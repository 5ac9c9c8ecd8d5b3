//! The local CA. (Stub: owned by the ca+routes work.)

use std::path::Path;
use std::sync::Arc;

use crate::config::CaConfig;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("cannot mint a certificate for `{name}`: {message}")]
    Mint { name: String, message: String },
}

pub struct CertificateAuthority {}

impl CertificateAuthority {
    /// Load `ca.cert`/`ca.key`, creating both (key mode 0600) if neither exists.
    pub fn load_or_create(_cfg: &CaConfig) -> Result<CertificateAuthority, CaError> {
        Err(CaError::File {
            path: String::new(),
            message: "not implemented".into(),
        })
    }

    /// Create a new CA at these paths; refuses to overwrite unless `force`.
    pub fn create(
        _cert: &Path,
        _key: &Path,
        _force: bool,
    ) -> Result<CertificateAuthority, CaError> {
        Err(CaError::File {
            path: String::new(),
            message: "not implemented".into(),
        })
    }

    /// The CA certificate, PEM, for clients to trust.
    pub fn cert_pem(&self) -> &str {
        ""
    }

    /// A server config for this SNI name (leaf minted on first use, then cached), ALPN
    /// `h2` + `http/1.1`.
    pub fn server_config(&self, name: &str) -> Result<Arc<rustls::ServerConfig>, CaError> {
        Err(CaError::Mint {
            name: name.into(),
            message: "not implemented".into(),
        })
    }
}
