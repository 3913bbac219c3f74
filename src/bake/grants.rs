//! KMS grants that let another account's Auto Scaling group launch the shared image: its volumes
//! are encrypted under the fleet's customer-managed key, and the service-linked role
//! AWSServiceRoleForAutoScaling of the target account has no access to a customer-managed key
//! of its own ("Required AWS KMS key policy for use with encrypted volumes", Amazon EC2 Auto
//! Scaling User Guide: "[service-linked roles] do not include access to your customer managed
//! keys"; its cross-account example grants that role "Encrypt" "Decrypt" "ReEncryptFrom"
//! "ReEncryptTo" "GenerateDataKey" "GenerateDataKeyWithoutPlaintext" "DescribeKey" "CreateGrant",
//! awsdocs/amazon-ec2-auto-scaling-user-guide doc_source/key-policy-requirements-EBS-encryption.md).
//!
//! KMS keys are regional, so a grant is per key and region. Each grant carries a Name made of
//! the StackSet and the account: the name finds it again in ListGrants (so a second deploy
//! creates nothing), and "Use this value to prevent the unintended creation of duplicate grants
//! when retrying this request" (CreateGrant, KMS API Reference).
//!
//! Where a grant is made: AWS says from the account that owns the Auto Scaling group ("You must
//! create AWS KMS grants from the account that owns the Amazon EC2 Auto Scaling group, not the
//! AWS KMS account", AWS Knowledge Center, kms-launch-ec2-instance; the User Guide's example 2:
//! "from the external account, create a grant that delegates the relevant permissions to the
//! appropriate service-linked role ... The `key-id` is the ARN of the CMK"). `fleet.grants_from:
//! target-account` does that with the target's StackSet execution role (`create` takes that
//! account's KMS client); `key-account` makes it with the caller's. ListGrants and RevokeGrant
//! stay in the key's account, which sees every grant on its key whoever issued it.

use aws_sdk_kms::types::{GrantOperation, KeyManagerType};
use serde::Serialize;

use crate::aws::{self, Clients};
use crate::config::GrantsFrom;
use crate::error::{Error, Result};

/// What the grant lets the role do: the operations of the User Guide's cross-account example.
pub const OPERATIONS: [&str; 8] =
    ["Encrypt", "Decrypt", "ReEncryptFrom", "ReEncryptTo", "GenerateDataKey", "GenerateDataKeyWithoutPlaintext", "DescribeKey", "CreateGrant"];

/// The Auto Scaling service-linked role of `account`, in the key's partition.
pub fn grantee(partition: &str, account: &str) -> String {
    format!("arn:{partition}:iam::{account}:role/aws-service-role/autoscaling.amazonaws.com/AWSServiceRoleForAutoScaling")
}

/// The role assumed in `account` to make its grant there: the StackSet execution role, which
/// AWS's template for it has trust the administration account ("Grant self-managed
/// permissions", CloudFormation User Guide).
pub fn execution_role_arn(partition: &str, account: &str, role_name: &str) -> String {
    format!("arn:{partition}:iam::{account}:role/{role_name}")
}

/// The grant's Name (`^[a-zA-Z0-9:/_-]+$`, at most 256 characters): StackSet names are letters,
/// digits and hyphens.
pub fn grant_name(stack_set: &str, account: &str) -> String {
    format!("imgbuild-{stack_set}-{account}")
}

/// One grant: to be made, already there, made, or revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grant {
    pub account: String,
    pub region: String,
    /// The key's ARN (grants name the key by id or ARN, never by alias).
    pub key: String,
    pub grantee: String,
    pub name: String,
    /// The account the grant is (to be) made from: the target itself (`grants_from:
    /// target-account`) or the key's account; for a grant already there, the account ListGrants
    /// says issued it.
    pub from_account: String,
    /// The role assumed in `from_account` to make it (target-account only).
    pub from_role: Option<String>,
    /// `exists`, `create` (planned), `created` or `revoked`.
    pub state: String,
    pub grant_id: Option<String>,
}

/// The key in one region, as KMS describes it, and the grants on it.
#[derive(Debug, Clone)]
pub struct KeyGrants {
    pub arn: String,
    partition: String,
    /// The key's account (its ARN's).
    pub account: String,
    /// (Name, GranteePrincipal, GrantId, issuing account) of every grant on the key.
    grants: Vec<(String, String, String, String)>,
}

impl KeyGrants {
    /// The grant's id and the account that issued it (the key's own when ListGrants did not say).
    fn found(&self, stack_set: &str, account: &str) -> Option<(&str, &str)> {
        let (name, who) = (grant_name(stack_set, account), grantee(&self.partition, account));
        self.grants
            .iter()
            .find(|(n, g, _, _)| *n == name && *g == who)
            .map(|(_, _, id, by)| (id.as_str(), if by.is_empty() { self.account.as_str() } else { by.as_str() }))
    }
}

/// DescribeKey (it takes an alias too, which ListGrants and CreateGrant do not), then every page
/// of ListGrants. A key KMS does not find, or an AWS managed one, is refused here with the field
/// that names it: no grant on it could make a shared image launchable.
pub async fn read(clients: &Clients, key: &str, region: &str) -> Result<KeyGrants> {
    let described =
        clients.kms.describe_key().key_id(key).send().await.map_err(|e| aws::err("DescribeKey", format!("key {key} in {region} (bake.kms_key_id)"), e))?;
    let meta = described.key_metadata().ok_or_else(|| Error::Tool(format!("DescribeKey of {key} in {region} answered without KeyMetadata")))?;
    if meta.key_manager() == Some(&KeyManagerType::Aws) {
        return Err(Error::Invalid(format!(
            "bake.kms_key_id: {key} in {region} is an AWS managed key; images under it cannot be shared with other accounts: name a customer-managed key"
        )));
    }
    let arn = meta.arn().unwrap_or(key).to_string();
    let partition = arn.split(':').nth(1).filter(|p| p.starts_with("aws")).unwrap_or("aws").to_string();
    let account = arn.split(':').nth(4).filter(|a| !a.is_empty()).or(meta.aws_account_id()).unwrap_or_default().to_string();
    let mut grants = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let page = clients
            .kms
            .list_grants()
            .key_id(&arn)
            .limit(100)
            .set_marker(marker.take())
            .send()
            .await
            .map_err(|e| aws::err("ListGrants", format!("key {arn}"), e))?;
        for g in page.grants() {
            if let (Some(name), Some(who), Some(id)) = (g.name(), g.grantee_principal(), g.grant_id()) {
                // IssuingAccount reads `arn:aws:iam::111122223333:root` (aws-cli examples/kms/list-grants.rst).
                let by = g.issuing_account().map(|a| a.split(':').nth(4).unwrap_or(a).to_string()).unwrap_or_default();
                grants.push((name.to_string(), who.to_string(), id.to_string(), by));
            }
        }
        // "Truncated: A flag that indicates whether there are more items in the list. When this
        // value is true, the list in this response is truncated. To get more items, pass the
        // value of the NextMarker element in this response to the Marker parameter" (ListGrants).
        match (page.truncated(), page.next_marker()) {
            (true, Some(m)) if !m.is_empty() => marker = Some(m.to_string()),
            _ => break,
        }
    }
    Ok(KeyGrants { arn, partition, account, grants })
}

/// What `accounts` need in this region: a grant each, found or to be made from `from` (with
/// `execution_role`, the StackSet execution role's name, when that is the target account).
pub fn plan(key: &KeyGrants, stack_set: &str, region: &str, accounts: &[String], from: GrantsFrom, execution_role: &str) -> Vec<Grant> {
    accounts
        .iter()
        .map(|a| {
            let found = key.found(stack_set, a);
            let (from_account, from_role) = match (found, from) {
                (Some((_, by)), _) => (by.to_string(), None),
                (None, GrantsFrom::TargetAccount) => (a.clone(), Some(execution_role_arn(&key.partition, a, execution_role))),
                (None, GrantsFrom::KeyAccount) => (key.account.clone(), None),
            };
            Grant {
                account: a.clone(),
                region: region.to_string(),
                key: key.arn.clone(),
                grantee: grantee(&key.partition, a),
                name: grant_name(stack_set, a),
                from_account,
                from_role,
                state: if found.is_some() { "exists" } else { "create" }.into(),
                grant_id: found.map(|(id, _)| id.to_string()),
            }
        })
        .collect()
}

/// Makes a planned grant (CreateGrant with KeyId, GranteePrincipal, Operations and Name) with
/// `kms`: the client of the account it is made from, in the key's region. The key is named by
/// its ARN: "To specify a KMS key in a different Amazon Web Services account, you must use the
/// key ARN" (CreateGrant, KeyId, KMS API Reference).
pub async fn create(kms: &aws_sdk_kms::Client, g: &mut Grant) -> Result<()> {
    let out = kms
        .create_grant()
        .key_id(&g.key)
        .grantee_principal(&g.grantee)
        .set_operations(Some(OPERATIONS.iter().map(|o| GrantOperation::from(*o)).collect()))
        .name(&g.name)
        .send()
        .await
        .map_err(|e| aws::err("CreateGrant", format!("key {} for {} in {} (from account {})", g.key, g.grantee, g.region, g.from_account), e))?;
    g.grant_id = out.grant_id().map(String::from);
    g.state = "created".into();
    Ok(())
}

/// Revokes this fleet's grant to `account` on the key, if there is one ("RevokeGrant: Deletes the
/// specified grant", KMS API Reference). Returns what was revoked.
pub async fn revoke(clients: &Clients, key: &KeyGrants, stack_set: &str, region: &str, account: &str) -> Result<Option<Grant>> {
    let Some((id, by)) = key.found(stack_set, account) else { return Ok(None) };
    clients.kms.revoke_grant().key_id(&key.arn).grant_id(id).send().await.map_err(|e| aws::err("RevokeGrant", format!("grant {id} on key {}", key.arn), e))?;
    Ok(Some(Grant {
        account: account.to_string(),
        region: region.to_string(),
        key: key.arn.clone(),
        grantee: grantee(&key.partition, account),
        name: grant_name(stack_set, account),
        from_account: by.to_string(),
        from_role: None,
        state: "revoked".into(),
        grant_id: Some(id.to_string()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_grant_name_pattern() {
        let n = grant_name("vectordb", "222222222222");
        assert!(n.len() <= 256 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b":/_-".contains(&b)), "{n}");
        assert_eq!(grantee("aws", "222222222222"), "arn:aws:iam::222222222222:role/aws-service-role/autoscaling.amazonaws.com/AWSServiceRoleForAutoScaling");
    }
}
