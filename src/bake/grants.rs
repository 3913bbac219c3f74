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

use aws_sdk_kms::types::{GrantOperation, KeyManagerType};
use serde::Serialize;

use crate::aws::{self, Clients};
use crate::error::{Error, Result};

/// What the grant lets the role do: the operations of the User Guide's cross-account example.
pub const OPERATIONS: [&str; 8] =
    ["Encrypt", "Decrypt", "ReEncryptFrom", "ReEncryptTo", "GenerateDataKey", "GenerateDataKeyWithoutPlaintext", "DescribeKey", "CreateGrant"];

/// The Auto Scaling service-linked role of `account`, in the key's partition.
pub fn grantee(partition: &str, account: &str) -> String {
    format!("arn:{partition}:iam::{account}:role/aws-service-role/autoscaling.amazonaws.com/AWSServiceRoleForAutoScaling")
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
    /// `exists`, `create` (planned), `created` or `revoked`.
    pub state: String,
    pub grant_id: Option<String>,
}

/// The key in one region, as KMS describes it, and the grants on it.
#[derive(Debug, Clone)]
pub struct KeyGrants {
    pub arn: String,
    partition: String,
    /// (Name, GranteePrincipal, GrantId) of every grant on the key.
    grants: Vec<(String, String, String)>,
}

impl KeyGrants {
    /// The id of this fleet's grant to `account`, if there is one.
    pub fn find(&self, stack_set: &str, account: &str) -> Option<&str> {
        let (name, who) = (grant_name(stack_set, account), grantee(&self.partition, account));
        self.grants.iter().find(|(n, g, _)| *n == name && *g == who).map(|(_, _, id)| id.as_str())
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
                grants.push((name.to_string(), who.to_string(), id.to_string()));
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
    Ok(KeyGrants { arn, partition, grants })
}

/// What `accounts` need in this region: a grant each, found or to be made.
pub fn plan(key: &KeyGrants, stack_set: &str, region: &str, accounts: &[String]) -> Vec<Grant> {
    accounts
        .iter()
        .map(|a| {
            let found = key.find(stack_set, a);
            Grant {
                account: a.clone(),
                region: region.to_string(),
                key: key.arn.clone(),
                grantee: grantee(&key.partition, a),
                name: grant_name(stack_set, a),
                state: if found.is_some() { "exists" } else { "create" }.into(),
                grant_id: found.map(String::from),
            }
        })
        .collect()
}

/// Makes a planned grant (CreateGrant with KeyId, GranteePrincipal, Operations and Name).
pub async fn create(clients: &Clients, g: &mut Grant) -> Result<()> {
    let out = clients
        .kms
        .create_grant()
        .key_id(&g.key)
        .grantee_principal(&g.grantee)
        .set_operations(Some(OPERATIONS.iter().map(|o| GrantOperation::from(*o)).collect()))
        .name(&g.name)
        .send()
        .await
        .map_err(|e| aws::err("CreateGrant", format!("key {} for {} in {}", g.key, g.grantee, g.region), e))?;
    g.grant_id = out.grant_id().map(String::from);
    g.state = "created".into();
    Ok(())
}

/// Revokes this fleet's grant to `account` on the key, if there is one ("RevokeGrant: Deletes the
/// specified grant", KMS API Reference). Returns what was revoked.
pub async fn revoke(clients: &Clients, key: &KeyGrants, stack_set: &str, region: &str, account: &str) -> Result<Option<Grant>> {
    let Some(id) = key.find(stack_set, account) else { return Ok(None) };
    clients.kms.revoke_grant().key_id(&key.arn).grant_id(id).send().await.map_err(|e| aws::err("RevokeGrant", format!("grant {id} on key {}", key.arn), e))?;
    Ok(Some(Grant {
        account: account.to_string(),
        region: region.to_string(),
        key: key.arn.clone(),
        grantee: grantee(&key.partition, account),
        name: grant_name(stack_set, account),
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
