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

/// The emulator's signing key (one per process run, published at the JWKS endpoint).
pub struct Signer {
    key: RsaKeyPair,
    pub kid: String,
    rng: SystemRandom,
}

impl Signer {
    pub fn generate() -> Result<Signer, EmulatorError> {
        let key = RsaKeyPair::generate(KeySize::Rsa2048)
            .map_err(|_| EmulatorError::Crypto("RSA key generation failed".into()))?;
        let kid = {
            use sha2::Digest;
            let d = sha2::Sha256::digest(key.public_key().as_ref());
            hex(&d[..10])
        };
        Ok(Signer {
            key,
            kid,
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

    pub fn jwks(&self) -> Value {
        let pk = self.key.public_key();
        serde_json::json!({"keys": [{
            "kty": "RSA", "alg": "RS256", "use": "sig", "kid": self.kid,
            "n": b64url(pk.modulus().big_endian_without_leading_zero()),
            "e": b64url(pk.exponent().big_endian_without_leading_zero()),
        }]})
    }

    pub fn sign_blob(&self, blob: &[u8]) -> Result<String, EmulatorError> {
        Ok(STANDARD.encode(self.sign(blob)?))
    }
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
