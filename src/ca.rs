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
        // `symlink_metadata`, not `exists`: a dangling symbolic link counts as present, so it
        // is reported instead of being followed into creating its target.
        let present = |p: &Path| std::fs::symlink_metadata(p).is_ok();
        let ca = match (present(cert), present(key)) {
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

    /// Create a new CA at these paths; refuses to overwrite unless `force`, and never writes
    /// through a symbolic link, dangling or not, with or without `force`: a link planted at
    /// `certs/ca-key.pem` must not receive the key.
    pub fn create(cert: &Path, key: &Path, force: bool) -> Result<CertificateAuthority, CaError> {
        for p in [cert, key] {
            match std::fs::symlink_metadata(p) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(file_err(
                        p,
                        "is a symbolic link; refusing to write through it (remove the link first)",
                    ))
                }
                Ok(_) if !force => {
                    return Err(file_err(
                        p,
                        "already exists (use --force to replace the CA)",
                    ))
                }
                _ => {}
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
        write_new_file(key, key_pair.serialize_pem().as_bytes(), 0o600, force)?;
        write_new_file(cert, cert_obj.pem().as_bytes(), 0o644, force)?;
        let cert_der = cert_obj.der().clone();
        Ok(CertificateAuthority::from_parts(
            Issuer::new(params, key_pair),
            cert_der,
            cert_obj.pem(),
        ))
    }

    fn load(cert: &Path, key: &Path) -> Result<CertificateAuthority, CaError> {
        // Loading follows links on purpose: Kubernetes mounts Secrets as symbolic links.
        for warning in permission_warnings(cert, key) {
            tracing::warn!("{warning}");
        }
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
        let renew_at = now
            .checked_add(self.leaf_lifetime.mul_f64(0.75))
            .unwrap_or(now);
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
        // Checked: `+` on a date panics on overflow, and a lifetime comes from the config.
        params.not_after = time::Duration::try_from(self.leaf_lifetime)
            .ok()
            .and_then(|d| now.checked_add(d))
            .ok_or_else(|| err("the leaf lifetime is out of range".into()))?;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| err(e.to_string()))?;
        let chain = vec![cert.der().clone(), self.cert_der.clone()];
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config = ServerConfig::builder_with_provider(server_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| err(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key_der)
            .map_err(|e| err(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // Our order, not the client's: see `server_provider`.
        config.ignore_client_order = true;
        // One TLS 1.3 ticket a connection, not rustls' two: a client resumes with one and gets
        // the next with that connection. curl and Node keep one session a host, Go's cache one
        // a server name, Python's ssl none unless asked; a rustls client keeps several but
        // spends one a connection. A second ticket was one more key derivation, two random
        // draws and a session stored here for a resumption that seldom comes.
        config.send_tls13_tickets = 1;
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
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(file_err(
                path,
                "is a symbolic link; refusing to write through it (remove the link first)",
            ));
        }
        write_new_file(path, out.as_bytes(), 0o644, true)
    }
}

/// Write `bytes` to `path` as a new file that no one else has held open and that no link
/// redirects: they go to a temporary file beside `path`, created with
/// `O_CREAT | O_EXCL | O_NOFOLLOW` and its final `mode` (so a key is never readable by others,
/// even briefly), synced, then renamed over `path` (`replace`) or hard-linked to it, which fails
/// if anything, even a dangling link, appeared there since the caller looked. Neither `rename`
/// nor `link` follows a link at the destination; they replace or refuse the link itself.
fn write_new_file(path: &Path, bytes: &[u8], mode: u32, replace: bool) -> Result<(), CaError> {
    let name = path
        .file_name()
        .ok_or_else(|| file_err(path, "not a file name"))?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(
        ".{name}.{}.{:08x}.tmp",
        std::process::id(),
        rand::random::<u32>()
    ));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode).custom_flags(libc::O_NOFOLLOW);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let written = opts.open(&tmp).and_then(|mut f| {
        #[cfg(unix)]
        {
            // The umask may have cleared bits of `mode`; set exactly what was asked for.
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        f.write_all(bytes)?;
        f.sync_all()
    });
    let placed = written.and_then(|()| {
        if replace {
            std::fs::rename(&tmp, path)
        } else {
            std::fs::hard_link(&tmp, path).or_else(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    return Err(e);
                }
                // A filesystem without hard links: rename after looking (a narrower guarantee
                // against a racing writer, but rename still never follows a link).
                match std::fs::symlink_metadata(path) {
                    Ok(_) => Err(std::io::ErrorKind::AlreadyExists.into()),
                    Err(_) => std::fs::rename(&tmp, path),
                }
            })
        }
    });
    // After a rename the temporary name is gone; after a link or a failure it is removed.
    let _ = std::fs::remove_file(&tmp);
    placed.map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => {
            file_err(path, "already exists (use --force to replace the CA)")
        }
        _ => file_err(path, e),
    })
}

/// What a user should fix about who else may touch the CA files: a directory or certificate
/// writable by group or others (whoever can replace the certificate can make clients trust
/// their own CA, and whoever can write the directory can swap either file or plant links), and
/// a key readable by group or others. Empty when all is well or off Unix.
pub fn permission_warnings(cert: &Path, key: &Path) -> Vec<String> {
    let mut out = Vec::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).ok().map(|m| m.permissions().mode());
        let mut dirs: Vec<&Path> = Vec::new();
        for p in [cert, key] {
            let dir = p
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
        for dir in dirs {
            if mode(dir).is_some_and(|m| m & 0o022 != 0) {
                out.push(format!(
                    "{}: the CA directory is writable by group or others; chmod go-w it",
                    dir.display()
                ));
            }
        }
        if mode(cert).is_some_and(|m| m & 0o022 != 0) {
            out.push(format!(
                "{}: the CA certificate is writable by group or others; chmod go-w it",
                cert.display()
            ));
        }
        if mode(key).is_some_and(|m| m & 0o077 != 0) {
            out.push(format!(
                "{}: the CA key is readable by group or others; chmod 600 it",
                key.display()
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = (cert, key);
    out
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

/// The crypto provider of the intercepting TLS server: aws-lc-rs's defaults (key exchange
/// groups, the post-quantum hybrid first, and suites) with `TLS13_AES_128_GCM_SHA256` moved to
/// the front. Clients built on rustls (oha, reqwest) list `TLS13_AES_256_GCM_SHA384` first, and
/// honouring that makes every handshake run TLS 1.3's key schedule on SHA-384, which has no
/// hardware instructions: in a profile of new connections through the proxy it was 13% of the
/// proxy's CPU (`sha512_block_data_order`). AES-128-GCM with SHA-256 (SHA-NI) is the suite
/// RFC 8446 makes mandatory and the one Go's and BoringSSL's servers pick first; the other
/// suites stay on offer, in rustls' order, for clients that lack it.
fn server_provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<rustls::crypto::CryptoProvider>> =
        std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut provider = rustls::crypto::aws_lc_rs::default_provider();
            let first = rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256;
            provider
                .cipher_suites
                .sort_by_key(|suite| suite.suite() != first.suite());
            Arc::new(provider)
        })
        .clone()
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
    use rustls::pki_types::ServerName;
    use std::sync::Arc;

    /// A test's own directory, removed when it goes out of scope, a failed test's too.
    struct TempDir(std::path::PathBuf);

    impl std::ops::Deref for TempDir {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl AsRef<Path> for TempDir {
        fn as_ref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn temp_dir(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!(
            "ip-ca-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
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

    #[cfg(unix)]
    #[test]
    fn force_never_writes_through_a_symlinked_key_or_cert() {
        crate::install_crypto_provider();
        let dir = temp_dir("symlink");
        let c = cfg(&dir);
        let victim = dir.join("someone-elses-file");
        std::fs::write(&victim, "precious\n").unwrap();
        std::os::unix::fs::symlink(&victim, &c.key).unwrap();
        let err = CertificateAuthority::create(&c.cert, &c.key, true)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        assert!(!c.cert.exists(), "nothing written when one path is refused");
        // The same for the certificate, with a real key file beside it.
        std::fs::remove_file(&c.key).unwrap();
        std::os::unix::fs::symlink(&victim, &c.cert).unwrap();
        assert!(CertificateAuthority::create(&c.cert, &c.key, true).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_dangling_symlink_is_reported_not_followed() {
        crate::install_crypto_provider();
        let dir = temp_dir("dangling");
        let c = cfg(&dir);
        let target = dir.join("created-through-the-link");
        std::os::unix::fs::symlink(&target, &c.key).unwrap();
        for force in [false, true] {
            assert!(CertificateAuthority::create(&c.cert, &c.key, force).is_err());
            assert!(
                !target.exists(),
                "force={force}: the link's target was created"
            );
        }
        // Start-up (`run`, `env`) takes the same care when it creates the CA.
        let err = CertificateAuthority::load_or_create(&c)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("ca.pem") && err.contains("missing"), "{err}");
        assert!(!target.exists());
        // Nothing but the link and no temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("ca-key.pem")]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn force_replaces_a_lax_key_with_a_private_file_and_no_leftovers() {
        use std::os::unix::fs::PermissionsExt;
        crate::install_crypto_provider();
        let dir = temp_dir("force");
        let c = cfg(&dir);
        std::fs::write(&c.key, "old").unwrap();
        std::fs::set_permissions(&c.key, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(&c.cert, "old").unwrap();
        let ca = CertificateAuthority::create(&c.cert, &c.key, true).unwrap();
        let mode = std::fs::metadata(&c.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&c.cert).unwrap(), ca.cert_pem());
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            2,
            "no temporary files left"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_group_writable_ca_directory_or_cert_is_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        crate::install_crypto_provider();
        let dir = temp_dir("perms");
        let c = cfg(&dir);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        CertificateAuthority::create(&c.cert, &c.key, false).unwrap();
        assert_eq!(permission_warnings(&c.cert, &c.key), Vec::<String>::new());
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o775)).unwrap();
        std::fs::set_permissions(&c.cert, std::fs::Permissions::from_mode(0o666)).unwrap();
        let w = permission_warnings(&c.cert, &c.key).join("\n");
        assert!(w.contains("CA directory is writable"), "{w}");
        assert!(w.contains("CA certificate is writable"), "{w}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_huge_leaf_lifetime_is_an_error_not_a_panic() {
        crate::install_crypto_provider();
        let dir = temp_dir("huge");
        let ca = CertificateAuthority::load_or_create(&cfg(&dir))
            .unwrap()
            .with_leaf_settings(Duration::from_secs(9_000_000_000_000_000_000), 4);
        assert!(ca.server_config("a.googleapis.com").is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A TLS client that trusts `ca` and nothing else.
    fn client_trusting(ca: &CertificateAuthority) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(first_pem_cert(ca.cert_pem()).unwrap()).unwrap();
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth()
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
            let mut client_cfg = client_trusting(&ca);
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

    /// A client session store that counts the TLS 1.3 tickets it is given.
    #[derive(Debug)]
    struct CountingStore {
        inner: rustls::client::ClientSessionMemoryCache,
        tickets: std::sync::atomic::AtomicUsize,
    }

    impl rustls::client::ClientSessionStore for CountingStore {
        fn set_kx_hint(&self, name: ServerName<'static>, group: rustls::NamedGroup) {
            self.inner.set_kx_hint(name, group)
        }
        fn kx_hint(&self, name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
            self.inner.kx_hint(name)
        }
        fn set_tls12_session(
            &self,
            name: ServerName<'static>,
            value: rustls::client::Tls12ClientSessionValue,
        ) {
            self.inner.set_tls12_session(name, value)
        }
        fn tls12_session(
            &self,
            name: &ServerName<'_>,
        ) -> Option<rustls::client::Tls12ClientSessionValue> {
            self.inner.tls12_session(name)
        }
        fn remove_tls12_session(&self, name: &ServerName<'static>) {
            self.inner.remove_tls12_session(name)
        }
        fn insert_tls13_ticket(
            &self,
            name: ServerName<'static>,
            value: rustls::client::Tls13ClientSessionValue,
        ) {
            self.tickets
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.inner.insert_tls13_ticket(name, value)
        }
        fn take_tls13_ticket(
            &self,
            name: &ServerName<'static>,
        ) -> Option<rustls::client::Tls13ClientSessionValue> {
            self.inner.take_tls13_ticket(name)
        }
    }

    /// One TLS 1.3 ticket a connection (rustls' default is two), and it is enough for a client
    /// that opens one connection after another: each resumes with the ticket of the one before.
    #[tokio::test]
    async fn one_ticket_a_connection_and_each_next_connection_resumes() {
        use rustls::HandshakeKind;
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        crate::install_crypto_provider();
        let dir = temp_dir("tickets");
        let ca = CertificateAuthority::load_or_create(&cfg(&dir)).unwrap();
        let server_cfg = ca.server_config("storage.googleapis.com").unwrap();
        let mut client_cfg = client_trusting(&ca);
        let store = Arc::new(CountingStore {
            inner: rustls::client::ClientSessionMemoryCache::new(16),
            tickets: Default::default(),
        });
        client_cfg.resumption = rustls::client::Resumption::store(store.clone());
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
        for (round, kind) in [
            HandshakeKind::Full,
            HandshakeKind::Resumed,
            HandshakeKind::Resumed,
        ]
        .into_iter()
        .enumerate()
        {
            let (a, b) = tokio::io::duplex(64 * 1024);
            let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg.clone());
            let server = tokio::spawn(async move {
                let mut tls = acceptor.accept(b).await.unwrap();
                tls.write_all(b"pong").await.unwrap();
                tls.shutdown().await.unwrap();
            });
            let name = ServerName::try_from("storage.googleapis.com").unwrap();
            let mut tls = connector.connect(name, a).await.unwrap();
            // Reading the answer reads the tickets that came before it.
            let mut pong = Vec::new();
            tls.read_to_end(&mut pong).await.unwrap();
            assert_eq!(pong, b"pong");
            assert_eq!(
                tls.get_ref().1.handshake_kind(),
                Some(kind),
                "round {round}"
            );
            assert_eq!(store.tickets.load(Ordering::Relaxed), round + 1);
            server.await.unwrap();
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
