//! The emulator's metadata instance: the policy's `metadata` account behind the shared
//! [`crate::metadata`] protocol, minting tokens the rest of the emulator accepts.

use serde_json::json;

use super::google::{count_metadata_token, effective_lifetime, issue, DEFAULT_LIFETIME};
use super::iam::{id_token_claims, ServiceAccountRef};
use super::{Emulator, Policy};
use crate::metadata::{
    self, AccessToken, Account, BoxFuture, IdTokenFormat, Instance, MetadataError,
};

pub(super) struct EmulatedInstance<'a>(pub &'a Emulator);

impl EmulatedInstance<'_> {
    fn account_ref(&self) -> Option<ServiceAccountRef<'_>> {
        let email = &self.0.policy.metadata.as_ref()?.service_account;
        let unique_id = self
            .0
            .policy
            .account(email)
            .map(Policy::unique_id)
            .unwrap_or_else(|| Policy::derived_unique_id(email));
        Some(ServiceAccountRef { email, unique_id })
    }
}

impl Instance for EmulatedInstance<'_> {
    fn project_id(&self) -> String {
        self.0.policy.project_id().to_string()
    }

    fn numeric_project_id(&self) -> String {
        self.0.policy.project_number().to_string()
    }

    fn service_account(&self) -> Option<Account> {
        let inst = self.0.policy.metadata.as_ref()?;
        let scopes = if inst.scopes.is_empty() {
            vec![crate::config::CLOUD_PLATFORM_SCOPE.to_string()]
        } else {
            inst.scopes.clone()
        };
        Some(Account {
            email: inst.service_account.clone(),
            scopes,
        })
    }

    fn access_token(
        &self,
        scopes: Option<Vec<String>>,
    ) -> BoxFuture<'_, Result<AccessToken, MetadataError>> {
        Box::pin(async move {
            count_metadata_token(self.0);
            let (Some(account), Some(sa)) = (self.service_account(), self.account_ref()) else {
                return Err(MetadataError::NotFound);
            };
            let secs = effective_lifetime(self.0, DEFAULT_LIFETIME);
            let token = issue(
                self.0,
                &account.email,
                scopes.unwrap_or(account.scopes),
                secs,
                &sa.unique_id,
            );
            Ok(AccessToken {
                access_token: token,
                expires_in: secs,
            })
        })
    }

    fn id_token<'a>(
        &'a self,
        audience: &'a str,
        format: IdTokenFormat,
    ) -> BoxFuture<'a, Result<String, MetadataError>> {
        Box::pin(async move {
            let Some(sa) = self.account_ref() else {
                return Err(MetadataError::NotFound);
            };
            let full = format == IdTokenFormat::Full;
            let mut claims = id_token_claims(self.0, &sa, audience, full);
            if full {
                // "Verify the identity of instances": the full format adds the instance.
                claims["google"] = json!({"compute_engine": {
                    "instance_id": metadata::instance_id(self),
                    "instance_name": "emulated-instance",
                    "project_id": self.project_id(),
                    "project_number": self.numeric_project_id().parse::<u64>().unwrap_or(0),
                    "zone": "us-central1-a",
                }});
            }
            self.0
                .oidc_signer()
                .and_then(|s| s.jwt(&claims))
                .map_err(|e| MetadataError::Unavailable(e.to_string()))
        })
    }
}
