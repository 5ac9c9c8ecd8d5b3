//! The emulator's policy file: who exists, who may impersonate whom, and test knobs.
//!
//! ```yaml
//! users:                                  # authorized_user credentials (refresh-token grant)
//!   - email: alice@example.com
//!     client_id: demo-client
//!     client_secret: demo-secret
//!     refresh_token: demo-refresh-token
//! service_accounts:
//!   - email: hop@demo.iam.gserviceaccount.com
//!     token_creators: [user:alice@example.com]        # roles/iam.serviceAccountTokenCreator
//!   - email: reader@demo.iam.gserviceaccount.com
//!     token_creators: []
//!     implicit_delegators: [serviceAccount:hop@demo.iam.gserviceaccount.com]  # implicitDelegation only
//!     lifetime_extension: false                       # may tokens live past 3600 s (max 43200)?
//!     public_keys: { key-id-1: "-----BEGIN PUBLIC KEY-----..." }  # for key-file credentials
//! external_subjects:                      # STS token exchange (external_account)
//!   - subject_token: opaque-oidc-token
//!     principal: principal://iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/subject/ci
//! metadata:
//!   service_account: vm@demo.iam.gserviceaccount.com   # who the "instance" runs as
//! token_lifetime: 1h                      # optional: cap every issued token (e.g. 5s in tests)
//! faults: { error_rate: 0.0, latency: 0ms, burst_429: 0, down: false }
//! ```
//!
//! Principals are written as Google writes them in IAM policies: `user:EMAIL`,
//! `serviceAccount:EMAIL`, `principal://…`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::EmulatorError;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    pub users: Vec<User>,
    pub service_accounts: Vec<ServiceAccount>,
    pub external_subjects: Vec<ExternalSubject>,
    pub metadata: Option<MetadataInstance>,
    #[serde(deserialize_with = "de_opt_duration")]
    pub token_lifetime: Option<Duration>,
    pub faults: FaultSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub email: String,
    pub client_id: String,
    pub client_secret: String,
    pub refresh_token: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceAccount {
    pub email: String,
    /// Google's numeric unique id; derived from the email when absent.
    pub unique_id: Option<String>,
    /// Principals holding Token Creator (getAccessToken, getOpenIdToken, signJwt, signBlob and
    /// implicitDelegation) on this account.
    pub token_creators: Vec<String>,
    /// Principals holding only `iam.serviceAccounts.implicitDelegation` on this account.
    pub implicit_delegators: Vec<String>,
    /// The org-policy constraint that allows lifetimes up to 43200 s.
    pub lifetime_extension: bool,
    /// key id → PEM public key (SubjectPublicKeyInfo), for key-file credentials.
    pub public_keys: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalSubject {
    pub subject_token: String,
    pub principal: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetadataInstance {
    pub service_account: String,
    #[serde(default)]
    pub scopes: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultSettings {
    /// Fraction of IAM and token calls answered 503.
    pub error_rate: f64,
    #[serde(deserialize_with = "de_opt_duration")]
    pub latency: Option<Duration>,
    /// The next N calls are answered 429 RESOURCE_EXHAUSTED.
    pub burst_429: u64,
    /// Every call answered 503 until cleared.
    pub down: bool,
}

fn de_opt_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    crate::config::de_opt_duration(d)
}

impl Policy {
    pub fn from_yaml(yaml: &str) -> Result<Policy, EmulatorError> {
        let p: Policy = crate::config::yaml_from_str(yaml).map_err(EmulatorError::Policy)?;
        for sa in &p.service_accounts {
            if !crate::config::is_service_account_email(&sa.email) {
                return Err(EmulatorError::Policy(format!(
                    "service_accounts: `{}` is not an email",
                    sa.email
                )));
            }
            for who in sa.token_creators.iter().chain(&sa.implicit_delegators) {
                if !(who.starts_with("user:")
                    || who.starts_with("serviceAccount:")
                    || who.starts_with("principal://")
                    || who.starts_with("principalSet://"))
                {
                    return Err(EmulatorError::Policy(format!(
                        "service_accounts[{}]: `{who}` must be user:EMAIL, serviceAccount:EMAIL or principal://…",
                        sa.email
                    )));
                }
            }
        }
        if !(0.0..=1.0).contains(&p.faults.error_rate) {
            return Err(EmulatorError::Policy(
                "faults.error_rate must be between 0 and 1".into(),
            ));
        }
        Ok(p)
    }

    pub fn load(path: &Path) -> Result<Policy, EmulatorError> {
        let text = crate::config::read_bounded(path)
            .map_err(|e| EmulatorError::Policy(format!("{}: {e}", path.display())))?;
        Policy::from_yaml(&text)
            .map_err(|e| EmulatorError::Policy(format!("{}: {e}", path.display())))
    }

    pub fn account(&self, email: &str) -> Option<&ServiceAccount> {
        self.service_accounts
            .iter()
            .find(|s| s.email.eq_ignore_ascii_case(email))
    }

    pub fn unique_id(sa: &ServiceAccount) -> String {
        sa.unique_id.clone().unwrap_or_else(|| {
            use sha2::Digest;
            let h = sha2::Sha256::digest(sa.email.as_bytes());
            let mut n: u128 = 0;
            for b in &h[..12] {
                n = (n << 8) | u128::from(*b);
            }
            format!("1{:020}", n % 100_000_000_000_000_000_000)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_unknown_keys_and_bad_principals() {
        let p = Policy::from_yaml(
            "service_accounts:\n  - email: a@p.iam.gserviceaccount.com\n    token_creators: [user:x@y.com]\ntoken_lifetime: 5s\n",
        )
        .unwrap();
        assert_eq!(p.token_lifetime, Some(Duration::from_secs(5)));
        assert!(p.account("A@p.iam.gserviceaccount.com").is_some());
        assert!(Policy::from_yaml("servce_accounts: []\n").is_err());
        assert!(Policy::from_yaml(
            "service_accounts:\n  - email: a@p.iam.gserviceaccount.com\n    token_creators: [x@y.com]\n"
        )
        .is_err());
    }
}
