//! RS256 JWTs for the emulator: signing ID tokens and signJwt payloads with its own key,
//! verifying key-file assertions and self-signed JWTs against policy public keys, and making
//! service-account key files for tests and the demo.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize};
use aws_lc_rs::signature::{self, KeyPair as _};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::SubjectPublicKeyInfoDer;
use serde_json::Value;

use super::EmulatorError;

pub fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// An RSA signing key with its key id and a self-signed certificate naming its owner: the
/// emulator's OIDC key, or one service account's Google-managed key.
pub struct Signer {
    key: RsaKeyPair,
    pub kid: String,
    /// The public key in an X.509 v3 certificate, as `…/metadata/x509/{EMAIL}` serves it.
    pub certificate_pem: String,
    rng: SystemRandom,
}

impl Signer {
    /// A new key for `owner` (an email, the certificate's common name).
    pub fn generate(owner: &str) -> Result<Signer, EmulatorError> {
        let key = RsaKeyPair::generate(KeySize::Rsa2048)
            .map_err(|_| EmulatorError::Crypto("RSA key generation failed".into()))?;
        let kid = {
            use sha2::Digest;
            let d = sha2::Sha256::digest(key.public_key().as_ref());
            hex(&d[..20])
        };
        let certificate_pem = certificate(&key, owner)?;
        Ok(Signer {
            key,
            kid,
            certificate_pem,
            rng: SystemRandom::new(),
        })
    }

    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, EmulatorError> {
        let mut sig = vec![0; self.key.public_modulus_len()];
        self.key
            .sign(&signature::RSA_PKCS1_SHA256, &self.rng, msg, &mut sig)
            .map_err(|_| EmulatorError::Crypto("signing failed".into()))?;
        Ok(sig)
    }

    /// `header.payload.signature` with `alg: RS256` and this key's `kid`.
    pub fn jwt(&self, claims: &Value) -> Result<String, EmulatorError> {
        let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": self.kid});
        let input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let sig = self.sign(input.as_bytes())?;
        Ok(format!("{input}.{}", b64url(&sig)))
    }

    /// One JWK (RFC 7517) for this key.
    pub fn jwk(&self) -> Value {
        let pk = self.key.public_key();
        serde_json::json!({
            "kty": "RSA", "alg": "RS256", "use": "sig", "kid": self.kid,
            "n": b64url(pk.modulus().big_endian_without_leading_zero()),
            "e": b64url(pk.exponent().big_endian_without_leading_zero()),
        })
    }

    pub fn jwks(&self) -> Value {
        serde_json::json!({"keys": [self.jwk()]})
    }

    /// The `raw` format of `…/metadata/raw/{EMAIL}`: standard base64, the modulus with its
    /// leading zero byte, as Google's `keyvalues` entries have it.
    pub fn raw(&self) -> Value {
        let pk = self.key.public_key();
        let n = pk.modulus().big_endian_without_leading_zero();
        let mut modulus = Vec::with_capacity(n.len() + 1);
        if n.first().is_some_and(|b| b & 0x80 != 0) {
            modulus.push(0);
        }
        modulus.extend_from_slice(n);
        serde_json::json!({
            "algorithm": "RSA",
            "modulus": STANDARD.encode(&modulus),
            "exponent": STANDARD.encode(pk.exponent().big_endian_without_leading_zero()),
            "keyid": self.kid,
        })
    }

    pub fn sign_blob(&self, blob: &[u8]) -> Result<String, EmulatorError> {
        Ok(STANDARD.encode(self.sign(blob)?))
    }
}

/// A self-signed certificate for `key`, valid from now for the emulator's lifetime.
fn certificate(key: &RsaKeyPair, owner: &str) -> Result<String, EmulatorError> {
    let crypto = |e: &dyn std::fmt::Display| EmulatorError::Crypto(format!("certificate: {e}"));
    let pkcs8 = key.as_der().map_err(|e| crypto(&e))?;
    let der = rustls::pki_types::PrivatePkcs8KeyDer::from(pkcs8.as_ref());
    let kp = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_RSA_SHA256)
        .map_err(|e| crypto(&e))?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, owner);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(14);
    let cert = params.self_signed(&kp).map_err(|e| crypto(&e))?;
    Ok(cert.pem())
}

/// A decoded but unverified JWT.
pub struct Jwt<'a> {
    pub header: Value,
    pub claims: Value,
    signed: &'a str,
    signature: Vec<u8>,
}

pub fn decode(token: &str) -> Option<Jwt<'_>> {
    let mut it = token.splitn(3, '.');
    let (h, c, s) = (it.next()?, it.next()?, it.next()?);
    let header = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).ok()?).ok()?;
    let claims = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(c).ok()?).ok()?;
    let signature = URL_SAFE_NO_PAD.decode(s).ok()?;
    Some(Jwt {
        header,
        claims,
        signed: &token[..h.len() + 1 + c.len()],
        signature,
    })
}

impl Jwt<'_> {
    /// RS256 check against a PEM SubjectPublicKeyInfo.
    pub fn verify_pem(&self, public_pem: &str) -> bool {
        if self.header.get("alg").and_then(Value::as_str) != Some("RS256") {
            return false;
        }
        let Ok(spki) = SubjectPublicKeyInfoDer::from_pem_slice(public_pem.as_bytes()) else {
            return false;
        };
        signature::UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, spki.as_ref())
            .verify(self.signed.as_bytes(), &self.signature)
            .is_ok()
    }

    pub fn kid(&self) -> Option<&str> {
        self.header.get("kid").and_then(Value::as_str)
    }

    pub fn verify_with(&self, signer: &Signer) -> bool {
        signature::UnparsedPublicKey::new(
            &signature::RSA_PKCS1_2048_8192_SHA256,
            signer.key.public_key().as_ref(),
        )
        .verify(self.signed.as_bytes(), &self.signature)
        .is_ok()
    }
}

/// A new service-account key: the ADC JSON key file and what the policy needs to accept it.
pub struct ServiceAccountKey {
    /// `{"type": "service_account", "client_email", "private_key", "private_key_id", "token_uri", …}`
    pub key_file_json: String,
    pub key_id: String,
    pub public_key_pem: String,
}

pub fn new_service_account_key(
    email: &str,
    token_uri: &str,
) -> Result<ServiceAccountKey, EmulatorError> {
    let key = RsaKeyPair::generate(KeySize::Rsa2048)
        .map_err(|_| EmulatorError::Crypto("RSA key generation failed".into()))?;
    let pkcs8 = key
        .as_der()
        .map_err(|_| EmulatorError::Crypto("PKCS#8 encoding failed".into()))?;
    let spki = key
        .public_key()
        .as_der()
        .map_err(|_| EmulatorError::Crypto("public key encoding failed".into()))?;
    let key_id = hex(&rand::random::<[u8; 20]>());
    let key_file = serde_json::json!({
        "type": "service_account",
        "project_id": email.split('@').nth(1).and_then(|d| d.split('.').next()).unwrap_or("emulated"),
        "private_key_id": key_id,
        "private_key": pem("PRIVATE KEY", pkcs8.as_ref()),
        "client_email": email,
        "client_id": "100000000000000000001",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
    });
    Ok(ServiceAccountKey {
        key_file_json: key_file.to_string(),
        key_id,
        public_key_pem: pem("PUBLIC KEY", spki.as_ref()),
    })
}

pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        s.push_str(&String::from_utf8_lossy(chunk));
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
