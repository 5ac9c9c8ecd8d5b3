//! The local CA: load or create it in `certs/`, mint a leaf certificate per SNI name, and hand
//! out cached rustls server configs (ALPN `h2`, `http/1.1`).
//!
//! Leaves use ECDSA P-256 (minting takes well under a millisecond) and are short-lived; a leaf
//! is re-minted once less than a quarter of its lifetime is left. The cache is bounded: when it
//! is full, the entry closest to expiry goes.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::ServerConfig;

use crate::config::CaConfig;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("cannot mint a certificate for `{name}`: {message}")]
    Mint { name: String, message: String },
}

fn file_err(path: &Path, message: impl std::fmt::Display) -> CaError {
    CaError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

struct Leaf {
    config: Arc<ServerConfig>,
    /// Re-mint after this instant.
    renew_at: Instant,
}

pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    leaf_lifetime: Duration,
    capacity: usize,
    /// A std mutex: held only for a map lookup or insert, never across minting or an await.
    leaves: Mutex<HashMap<String, Leaf>>,
}

impl CertificateAuthority {
    /// Load `ca.cert`/`ca.key`, creating both (key mode 0600) if neither exists.
    pub fn load_or_create(cfg: &CaConfig) -> Result<CertificateAuthority, CaError> {
        let (cert, key) = (cfg.cert.as_path(), cfg.key.as_path());
        let ca = match (cert.exists(), key.exists()) {
            (true, true) => CertificateAuthority::load(cert, key)?,
            (false, false) => {
                tracing::info!(cert = %cert.display(), "creating a new local CA");
                CertificateAuthority::create(cert, key, false)?
            }
            (true, false) => return Err(file_err(key, "missing, but the CA certificate exists")),
            (false, true) => return Err(file_err(cert, "missing, but the CA key exists")),
        };
        Ok(ca.with_leaf_settings(cfg.leaf_lifetime, cfg.leaf_cache))
    }

    /// Create a new CA at these paths; refuses to overwrite unless `force`.
    pub fn create(cert: &Path, key: &Path, force: bool) -> Result<CertificateAuthority, CaError> {
        if !force {
            for p in [cert, key] {
                if p.exists() {
                    return Err(file_err(
                        p,
                        "already exists (use --force to replace the CA)",
                    ));
                }
            }
        }
        let key_pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| file_err(key, format!("cannot generate a key: {e}")))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("impersonate-proxy local CA ({})", hostname()),
        );
        dn.push(DnType::OrganizationName, "impersonate-proxy");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        params.serial_number = Some(random_serial());
        let cert_obj = params
            .self_signed(&key_pair)
            .map_err(|e| file_err(cert, format!("cannot sign the CA certificate: {e}")))?;

        for p in [cert, key] {
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
            }
        }
        write_private(key, key_pair.serialize_pem().as_bytes())?;
        std::fs::write(cert, cert_obj.pem()).map_err(|e| file_err(cert, e))?;
        let cert_der = cert_obj.der().clone();
        Ok(CertificateAuthority::from_parts(
            Issuer::new(params, key_pair),
            cert_der,
            cert_obj.pem(),
        ))
    }

    fn load(cert: &Path, key: &Path) -> Result<CertificateAuthority, CaError> {
        warn_if_readable_by_others(key);
        let key_pem = std::fs::read_to_string(key).map_err(|e| file_err(key, e))?;
        // rcgen's error text never includes key material.
        let key_pair = KeyPair::from_pem(&key_pem)
            .map_err(|e| file_err(key, format!("not a PEM key: {e}")))?;
        let cert_pem = std::fs::read_to_string(cert).map_err(|e| file_err(cert, e))?;
        let der = first_pem_cert(&cert_pem).ok_or_else(|| file_err(cert, "no PEM certificate"))?;
        let issuer = Issuer::from_ca_cert_der(&der, key_pair)
            .map_err(|e| file_err(cert, format!("not a usable CA certificate: {e}")))?;
        Ok(CertificateAuthority::from_parts(issuer, der, cert_pem))
    }

    fn from_parts(
        issuer: Issuer<'static, KeyPair>,
        cert_der: CertificateDer<'static>,
        cert_pem: String,
    ) -> CertificateAuthority {
        let defaults = CaConfig::default();
        CertificateAuthority {
            issuer,
            cert_der,
            cert_pem,
            leaf_lifetime: defaults.leaf_lifetime,
            capacity: defaults.leaf_cache,
            leaves: Mutex::new(HashMap::new()),
        }
    }

    fn with_leaf_settings(mut self, lifetime: Duration, capacity: usize) -> Self {
        self.leaf_lifetime = lifetime.max(Duration::from_secs(60));
        self.capacity = capacity.max(1);
        self
    }

    /// The CA certificate, PEM, for clients to trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// How many leaf configs are cached (for metrics and tests).
    pub fn cached_leaves(&self) -> usize {
        self.leaves.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// A server config for this SNI name (leaf minted on first use, then cached), ALPN
    /// `h2` + `http/1.1`.
    pub fn server_config(&self, name: &str) -> Result<Arc<ServerConfig>, CaError> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let now = Instant::now();
        if let Ok(leaves) = self.leaves.lock() {
            if let Some(leaf) = leaves.get(&name).filter(|l| l.renew_at > now) {
                return Ok(leaf.config.clone());
            }
        }
        // Two first requests for one name may both mint; the loser's leaf is simply dropped.
        // That costs a fraction of a millisecond once and keeps the lock out of minting.
        let config = Arc::new(self.mint(&name)?);
        let renew_at = now + self.leaf_lifetime.mul_f64(0.75);
        if let Ok(mut leaves) = self.leaves.lock() {
            if leaves.len() >= self.capacity && !leaves.contains_key(&name) {
                let oldest = leaves
                    .iter()
                    .min_by_key(|(_, l)| l.renew_at)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    leaves.remove(&k);
                }
            }
            leaves.insert(
                name,
                Leaf {
                    config: config.clone(),
                    renew_at,
                },
            );
        }
        Ok(config)
    }

    /// Mint a leaf for `name` and build its server config.
    pub fn mint(&self, name: &str) -> Result<ServerConfig, CaError> {
        let err = |message: String| CaError::Mint {
            name: name.to_string(),
            message,
        };
        let san = match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => {
                if !is_dns_name(name) {
                    return Err(err("not a DNS name or IP address".into()));
                }
                SanType::DnsName(
                    name.to_string()
                        .try_into()
                        .map_err(|e| err(format!("{e}")))?,
                )
            }
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| err(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![san];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after =
            now + time::Duration::try_from(self.leaf_lifetime).map_err(|e| err(e.to_string()))?;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| err(e.to_string()))?;
        let chain = vec![cert.der().clone(), self.cert_der.clone()];
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config = ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key_der)
            .map_err(|e| err(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }

    /// Write a merged bundle: the system roots followed by this CA, for clients whose CA
    /// variable replaces their trust store instead of adding to it.
    pub fn write_bundle(&self, path: &Path) -> Result<(), CaError> {
        let mut out = String::new();
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            out.push_str(&pem_encode("CERTIFICATE", cert.as_ref()));
        }
        let _ = writeln!(out, "# impersonate-proxy local CA");
        out.push_str(&self.cert_pem);
        std::fs::write(path, out).map_err(|e| file_err(path, e))
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CaError> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // The mode is set at creation, so the key is never readable by others, even briefly.
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|e| file_err(path, e))?;
    #[cfg(unix)]
    {
        // `mode` only applies to new files; a --force over an existing file tightens it here.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| file_err(path, e))?;
    }
    f.write_all(bytes).map_err(|e| file_err(path, e))
}

fn warn_if_readable_by_others(key: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(key) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(key = %key.display(), "the CA key is readable by group or others; chmod 600 it");
            }
        }
    }
}

fn first_pem_cert(pem: &str) -> Option<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .and_then(Result::ok)
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        s.push_str(&String::from_utf8_lossy(chunk));
        s.push('\n');
    }
    let _ = writeln!(s, "-----END {label}-----");
    s
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "ip-ca-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn cfg(dir: &Path) -> CaConfig {
        CaConfig {
            cert: dir.join("ca.pem"),
            key: dir.join("ca-key.pem"),
            ..CaConfig::default()
        }
    }

    #[test]
    fn creates_then_loads_the_same_ca_with_a_private_key_file() {
        crate::install_crypto_provider();
        let dir = temp_dir("create");
        let c = cfg(&dir);
        let first = CertificateAuthority::load_or_create(&c).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&c.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let again = CertificateAuthority::load_or_create(&c).unwrap();
        assert_eq!(first.cert_pem(), again.cert_pem());
        let err = CertificateAuthority::create(&c.cert, &c.key, false)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("already exists"), "{err}");
        std::fs::remove_file(&c.key).unwrap();
        let err = CertificateAuthority::load_or_create(&c)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("ca-key.pem") && err.contains("missing"),
            "{err}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_client_trusting_only_the_ca_completes_a_handshake_with_alpn() {
        crate::install_crypto_provider();
        let dir = temp_dir("hs");
        let ca = CertificateAuthority::load_or_create(&cfg(&dir)).unwrap();
        let server_cfg = ca.server_config("storage.googleapis.com").unwrap();
        for (offer, expect) in [
            (vec![b"h2".to_vec(), b"http/1.1".to_vec()], b"h2".to_vec()),
            (vec![b"http/1.1".to_vec()], b"http/1.1".to_vec()),
        ] {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(first_pem_cert(ca.cert_pem()).unwrap()).unwrap();
            let mut client_cfg = rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth();
            client_cfg.alpn_protocols = offer;
            let (a, b) = tokio::io::duplex(64 * 1024);
            let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg.clone());
            let server = tokio::spawn(async move { acceptor.accept(b).await.map(|_| ()) });
            let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
            let name = rustls::pki_types::ServerName::try_from("storage.googleapis.com").unwrap();
            let tls = connector.connect(name, a).await.unwrap();
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(expect.as_slice()));
            server.await.unwrap().unwrap();
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn leaves_are_cached_bounded_and_names_validated() {
        crate::install_crypto_provider();
        let dir = temp_dir("cache");
        let mut c = cfg(&dir);
        c.leaf_cache = 2;
        let ca = CertificateAuthority::load_or_create(&c).unwrap();
        let a1 = ca.server_config("a.googleapis.com").unwrap();
        let a2 = ca.server_config("A.googleapis.com.").unwrap();
        assert!(Arc::ptr_eq(&a1, &a2), "same name, same cached config");
        ca.server_config("b.googleapis.com").unwrap();
        ca.server_config("c.googleapis.com").unwrap();
        assert_eq!(ca.cached_leaves(), 2);
        assert!(ca.server_config("127.0.0.1").is_ok());
        for bad in ["", "bad name", "-x.com", "a..b"] {
            assert!(ca.server_config(bad).is_err(), "{bad:?}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bundle_ends_with_the_ca() {
        crate::install_crypto_provider();
        let dir = temp_dir("bundle");
        let ca = CertificateAuthority::load_or_create(&cfg(&dir)).unwrap();
        let path = dir.join("bundle.pem");
        ca.write_bundle(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.trim_end().ends_with(ca.cert_pem().trim_end()));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
