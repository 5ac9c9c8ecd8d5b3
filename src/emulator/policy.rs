//! The emulator's policy file: who exists, who may impersonate whom, and test knobs.
//!
//! ```yaml
//! project_id: demo-project                # what the metadata server says (default: emulated-project)
//! project_number: "123456789012"
//! users:                                  # authorized_user credentials (refresh-token grant)
//!   - email: alice@example.com
//!     client_id: demo-client
//!     client_secret: demo-secret
//!     refresh_token: demo-refresh-token
//! service_accounts:
//!   - email: hop@demo.iam.gserviceaccount.com
//!     bindings:                           # the account's IAM allow policy, as Google writes it
//!       - role: roles/iam.serviceAccountTokenCreator
//!         members: [user:alice@example.com]
//!   - email: reader@demo.iam.gserviceaccount.com
//!     unique_id: "112233445566778899001"  # optional; derived from the email when absent
//!     bindings:
//!       - { role: roles/iam.workloadIdentityUser, members: [serviceAccount:hop@demo.iam.gserviceaccount.com] }
//!       - { role: projects/demo/roles/delegateOnly, members: [user:bob@example.com] }
//!     token_creators: [user:carol@example.com]          # shorthand for a Token Creator binding
//!     implicit_delegators: [user:dave@example.com]      # shorthand: implicitDelegation only
//!     lifetime_extension: false                       # may tokens live past 3600 s (max 43200)?
//!     public_keys: { key-id-1: "-----BEGIN PUBLIC KEY-----..." }  # for key-file credentials
//! custom_roles:                           # roles beyond the predefined ones: name → permissions
//!   projects/demo/roles/delegateOnly: [iam.serviceAccounts.implicitDelegation]
//! external_subjects:                      # STS token exchange (external_account)
//!   - subject_token: opaque-oidc-token
//!     principal: principal://iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/subject/ci
//! metadata:
//!   service_account: vm@demo.iam.gserviceaccount.com   # who the "instance" runs as
//!   scopes: [https://www.googleapis.com/auth/cloud-platform]
//! token_lifetime: 1h                      # optional: cap every issued token (e.g. 5s in tests)
//! faults: { error_rate: 0.0, latency: 0ms, burst_429: 0, down: false }
//! ```
//!
//! Principals are written as Google writes them in IAM policies: `user:EMAIL`,
//! `serviceAccount:EMAIL`, `principal://…`, `principalSet://…`.
//!
//! The predefined roles carry the permissions that Google's roles reference gives them
//! (`../shared/reference/004_*.txt` and <https://cloud.google.com/iam/docs/service-account-permissions>):
//! Token Creator has getAccessToken, getOpenIdToken, implicitDelegation, signBlob and signJwt;
//! Workload Identity User has getAccessToken and getOpenIdToken; OpenID Token Creator has only
//! getOpenIdToken; Service Account User has actAs (and get, list), which mints nothing.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::EmulatorError;

pub const GET_ACCESS_TOKEN: &str = "iam.serviceAccounts.getAccessToken";
pub const GET_OPEN_ID_TOKEN: &str = "iam.serviceAccounts.getOpenIdToken";
pub const IMPLICIT_DELEGATION: &str = "iam.serviceAccounts.implicitDelegation";
pub const SIGN_BLOB: &str = "iam.serviceAccounts.signBlob";
pub const SIGN_JWT: &str = "iam.serviceAccounts.signJwt";
pub const ACT_AS: &str = "iam.serviceAccounts.actAs";

pub const TOKEN_CREATOR: &str = "roles/iam.serviceAccountTokenCreator";
/// What the `implicit_delegators` shorthand grants: a custom role holding only this permission.
const IMPLICIT_DELEGATION_ONLY: &[&str] = &[IMPLICIT_DELEGATION];

/// Google's predefined roles that bear on impersonation, with the permissions the roles
/// reference lists for each.
const PREDEFINED_ROLES: &[(&str, &[&str])] = &[
    (
        TOKEN_CREATOR,
        &[
            GET_ACCESS_TOKEN,
            GET_OPEN_ID_TOKEN,
            IMPLICIT_DELEGATION,
            SIGN_BLOB,
            SIGN_JWT,
        ],
    ),
    (
        "roles/iam.workloadIdentityUser",
        &[GET_ACCESS_TOKEN, GET_OPEN_ID_TOKEN],
    ),
    (
        "roles/iam.serviceAccountOpenIdTokenCreator",
        &[GET_OPEN_ID_TOKEN],
    ),
    (
        "roles/iam.serviceAccountUser",
        &[
            ACT_AS,
            "iam.serviceAccounts.get",
            "iam.serviceAccounts.list",
        ],
    ),
];

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// The project the metadata server reports.
    pub project_id: Option<String>,
    /// Its number (`project/numeric-project-id`), a string of digits.
    pub project_number: Option<String>,
    pub users: Vec<User>,
    pub service_accounts: Vec<ServiceAccount>,
    /// Custom roles (`projects/P/roles/NAME` or `organizations/O/roles/NAME`) → permissions.
    pub custom_roles: BTreeMap<String, Vec<String>>,
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
    /// The account's IAM allow policy: who holds which role on it.
    pub bindings: Vec<Binding>,
    /// Shorthand for a `roles/iam.serviceAccountTokenCreator` binding.
    pub token_creators: Vec<String>,
    /// Shorthand for a custom role holding only `iam.serviceAccounts.implicitDelegation`.
    pub implicit_delegators: Vec<String>,
    /// The org-policy constraint that allows lifetimes up to 43200 s.
    pub lifetime_extension: bool,
    /// key id → PEM public key (SubjectPublicKeyInfo), for key-file credentials.
    pub public_keys: BTreeMap<String, String>,
}

/// One entry of an allow policy's `bindings`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    pub role: String,
    pub members: Vec<String>,
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

fn is_member(who: &str) -> bool {
    who.starts_with("user:")
        || who.starts_with("serviceAccount:")
        || who.starts_with("principal://")
        || who.starts_with("principalSet://")
}

impl Policy {
    pub fn from_yaml(yaml: &str) -> Result<Policy, EmulatorError> {
        let p: Policy = crate::config::yaml_from_str(yaml).map_err(EmulatorError::Policy)?;
        for name in p.custom_roles.keys() {
            if name.starts_with("roles/") {
                return Err(EmulatorError::Policy(format!(
                    "custom_roles: `{name}`: custom roles are named projects/P/roles/NAME or organizations/O/roles/NAME"
                )));
            }
        }
        for sa in &p.service_accounts {
            if !crate::config::is_service_account_email(&sa.email) {
                return Err(EmulatorError::Policy(format!(
                    "service_accounts: `{}` is not an email",
                    sa.email
                )));
            }
            if let Some(id) = &sa.unique_id {
                if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(EmulatorError::Policy(format!(
                        "service_accounts[{}]: unique_id `{id}` must be digits",
                        sa.email
                    )));
                }
            }
            for b in &sa.bindings {
                if p.role_permissions(&b.role).is_none() {
                    let known: Vec<&str> = PREDEFINED_ROLES.iter().map(|(r, _)| *r).collect();
                    return Err(EmulatorError::Policy(format!(
                        "service_accounts[{}]: unknown role `{}`; the emulator knows {} and the roles under custom_roles",
                        sa.email,
                        b.role,
                        known.join(", ")
                    )));
                }
            }
            let members = sa
                .bindings
                .iter()
                .flat_map(|b| &b.members)
                .chain(&sa.token_creators)
                .chain(&sa.implicit_delegators);
            for who in members {
                if !is_member(who) {
                    return Err(EmulatorError::Policy(format!(
                        "service_accounts[{}]: `{who}` must be user:EMAIL, serviceAccount:EMAIL, principal://… or principalSet://…",
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

    /// The account named by email (any case) or by its numeric unique id, as Google accepts
    /// both in `projects/-/serviceAccounts/{ACCOUNT_EMAIL_OR_UNIQUEID}`.
    pub fn account(&self, email_or_id: &str) -> Option<&ServiceAccount> {
        if !email_or_id.is_empty() && email_or_id.bytes().all(|b| b.is_ascii_digit()) {
            return self
                .service_accounts
                .iter()
                .find(|s| Policy::unique_id(s) == email_or_id);
        }
        self.service_accounts
            .iter()
            .find(|s| s.email.eq_ignore_ascii_case(email_or_id))
    }

    /// The permissions a role grants: predefined, or defined under `custom_roles`.
    pub fn role_permissions(&self, role: &str) -> Option<Vec<&str>> {
        if let Some((_, perms)) = PREDEFINED_ROLES.iter().find(|(r, _)| *r == role) {
            return Some(perms.to_vec());
        }
        self.custom_roles
            .get(role)
            .map(|p| p.iter().map(String::as_str).collect())
    }

    /// Does `member` (`user:…`, `serviceAccount:…`, `principal://…`) hold `permission` on `sa`?
    /// A `principalSet://` binding matches the members it contains (see [`in_principal_set`]).
    pub fn holds(&self, sa: &ServiceAccount, member: &str, permission: &str) -> bool {
        let matches = |members: &[String]| members.iter().any(|m| member_matches(m, member));
        let by_binding = sa.bindings.iter().any(|b| {
            matches(&b.members)
                && self
                    .role_permissions(&b.role)
                    .is_some_and(|p| p.contains(&permission))
        });
        by_binding
            || (matches(&sa.token_creators)
                && self
                    .role_permissions(TOKEN_CREATOR)
                    .is_some_and(|p| p.contains(&permission)))
            || (matches(&sa.implicit_delegators) && IMPLICIT_DELEGATION_ONLY.contains(&permission))
    }

    pub fn project_id(&self) -> &str {
        self.project_id.as_deref().unwrap_or("emulated-project")
    }

    pub fn project_number(&self) -> &str {
        self.project_number.as_deref().unwrap_or("123456789012")
    }

    pub fn unique_id(sa: &ServiceAccount) -> String {
        sa.unique_id
            .clone()
            .unwrap_or_else(|| Policy::derived_unique_id(&sa.email))
    }

    /// A stable 21-digit id for an email, in the shape of Google's unique ids.
    pub fn derived_unique_id(email: &str) -> String {
        use sha2::Digest;
        let h = sha2::Sha256::digest(email.to_ascii_lowercase().as_bytes());
        let mut n: u128 = 0;
        for b in &h[..12] {
            n = (n << 8) | u128::from(*b);
        }
        format!("1{:020}", n % 100_000_000_000_000_000_000)
    }
}

/// Does a binding's member entry name this caller? Emails compare without case. A
/// `principalSet://…/workloadIdentityPools/POOL/*` entry holds every `principal://…/POOL/subject/…`
/// of that pool, and `…/POOL/attribute.NAME/VALUE` is not evaluated (no attributes here), so it
/// matches nothing.
pub fn member_matches(entry: &str, member: &str) -> bool {
    if entry.eq_ignore_ascii_case(member) {
        return true;
    }
    in_principal_set(entry, member)
}

/// `principalSet://iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/POOL/*`
/// contains `principal://iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/POOL/subject/S`.
pub fn in_principal_set(set: &str, member: &str) -> bool {
    let (Some(pool), Some(who)) = (
        set.strip_prefix("principalSet://")
            .and_then(|s| s.strip_suffix("/*")),
        member.strip_prefix("principal://"),
    ) else {
        return false;
    };
    who.strip_prefix(pool)
        .is_some_and(|rest| rest.starts_with("/subject/"))
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

    #[test]
    fn roles_grant_the_permissions_the_reference_gives_them() {
        let p = Policy::from_yaml(
            r#"
custom_roles:
  projects/p/roles/delegateOnly: [iam.serviceAccounts.implicitDelegation]
service_accounts:
  - email: a@p.iam.gserviceaccount.com
    bindings:
      - { role: roles/iam.serviceAccountTokenCreator, members: ["user:tc@x.com"] }
      - { role: roles/iam.workloadIdentityUser, members: ["principalSet://iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/ci/*"] }
      - { role: roles/iam.serviceAccountOpenIdTokenCreator, members: ["user:oidc@x.com"] }
      - { role: roles/iam.serviceAccountUser, members: ["user:user@x.com"] }
      - { role: projects/p/roles/delegateOnly, members: ["user:del@x.com"] }
    implicit_delegators: ["user:short@x.com"]
"#,
        )
        .unwrap();
        let sa = p.account("a@p.iam.gserviceaccount.com").unwrap();
        for perm in [
            GET_ACCESS_TOKEN,
            GET_OPEN_ID_TOKEN,
            IMPLICIT_DELEGATION,
            SIGN_BLOB,
            SIGN_JWT,
        ] {
            assert!(p.holds(sa, "user:TC@x.com", perm), "{perm}");
        }
        let wif = "principal://iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/ci/subject/job";
        assert!(p.holds(sa, wif, GET_ACCESS_TOKEN));
        assert!(p.holds(sa, wif, GET_OPEN_ID_TOKEN));
        assert!(!p.holds(sa, wif, SIGN_BLOB));
        let other_pool = "principal://iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/cix/subject/job";
        assert!(!p.holds(sa, other_pool, GET_ACCESS_TOKEN));
        assert!(p.holds(sa, "user:oidc@x.com", GET_OPEN_ID_TOKEN));
        assert!(!p.holds(sa, "user:oidc@x.com", GET_ACCESS_TOKEN));
        assert!(p.holds(sa, "user:user@x.com", ACT_AS));
        assert!(!p.holds(sa, "user:user@x.com", GET_ACCESS_TOKEN));
        for who in ["user:del@x.com", "user:short@x.com"] {
            assert!(p.holds(sa, who, IMPLICIT_DELEGATION));
            assert!(!p.holds(sa, who, GET_ACCESS_TOKEN));
        }
        // By numeric unique id too.
        let id = Policy::unique_id(sa);
        assert!(id.bytes().all(|b| b.is_ascii_digit()) && id.len() == 21);
        assert_eq!(p.account(&id).unwrap().email, sa.email);
        // Unknown roles are refused, with the ones that exist.
        let e = Policy::from_yaml(
            "service_accounts:\n  - email: a@p.iam.gserviceaccount.com\n    bindings: [{ role: roles/owner, members: [\"user:x@y.com\"] }]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("roles/owner") && e.contains(TOKEN_CREATOR),
            "{e}"
        );
    }
}
