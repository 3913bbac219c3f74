//! Handing a baked image to other accounts: launch permission on the image and create-volume
//! permission on its snapshots ("Share an AMI with specific AWS accounts", Amazon EC2 User
//! Guide: an AMI with encrypted snapshots needs both, and the snapshots' key must be a
//! customer-managed key whose policy lets those accounts use it; one under the AWS managed
//! `aws/ebs` key cannot be shared).

use aws_sdk_ec2::types::{CreateVolumePermission, CreateVolumePermissionModifications, LaunchPermission, LaunchPermissionModifications, SnapshotAttributeName};

use crate::aws::{self, Clients};
use crate::config::OrgTarget;
use crate::error::{Error, Result};

/// The account that owns (baked) the image, as EC2 reports it.
pub async fn owner(clients: &Clients, image: &str) -> Result<Option<String>> {
    let out = clients.ec2.describe_images().image_ids(image).send().await.map_err(|e| aws::err("DescribeImages", format!("image {image}"), e))?;
    Ok(out.images().first().and_then(|i| i.owner_id()).map(String::from))
}

/// Whether a snapshot's key (EC2 reports the key ARN) is the configured one. An alias cannot
/// be resolved without KMS, so it is taken on trust.
fn same_key(snapshot_key: &str, configured: &str) -> bool {
    if configured.starts_with("alias/") || configured.contains(":alias/") {
        return true;
    }
    let id = |k: &str| k.rsplit_once(":key/").map(|(_, id)| id.to_string()).unwrap_or_else(|| k.to_string());
    id(snapshot_key) == id(configured)
}

/// Shares `image` (in the clients' region) with `accounts` and `orgs`: launch permission, and
/// for accounts create-volume permission on each of its EBS snapshots (ModifySnapshotAttribute
/// takes account ids only). `kms_key`: `bake.kms_key_id`; an encrypted snapshot under another
/// key (such as aws/ebs) is refused before anything changes.
pub async fn share(clients: &Clients, image: &str, kms_key: &str, accounts: &[String], orgs: &[OrgTarget], owner: Option<&str>) -> Result<Vec<String>> {
    let accounts: Vec<String> = accounts.iter().filter(|a| Some(a.as_str()) != owner).cloned().collect();
    if accounts.is_empty() && orgs.is_empty() {
        return Ok(Vec::new());
    }
    let out = clients.ec2.describe_images().image_ids(image).send().await.map_err(|e| aws::err("DescribeImages", format!("image {image}"), e))?;
    let img = out.images().first().ok_or_else(|| Error::Invalid(format!("image {image} does not exist or is not visible to this account")))?;
    let snapshots: Vec<String> = img.block_device_mappings().iter().filter_map(|m| m.ebs()?.snapshot_id().map(String::from)).collect();
    if !snapshots.is_empty() {
        let described = clients
            .ec2
            .describe_snapshots()
            .set_snapshot_ids(Some(snapshots.clone()))
            .send()
            .await
            .map_err(|e| aws::err("DescribeSnapshots", format!("snapshots of image {image}"), e))?;
        for s in described.snapshots() {
            let sid = s.snapshot_id().unwrap_or_default();
            // Unencrypted snapshots share as they are; an encrypted one only under the key the
            // target accounts are allowed to use.
            match (s.encrypted(), s.kms_key_id()) {
                (Some(true), Some(k)) if !same_key(k, kms_key) => {
                    return Err(Error::Invalid(format!(
                        "image {image}: snapshot {sid} is encrypted with {k}, not bake.kms_key_id ({kms_key}); an image under another key \
                         (such as the AWS managed aws/ebs) cannot be shared with other accounts. Bake again with bake.kms_key_id set"
                    )));
                }
                _ => {}
            }
        }
    }
    if !orgs.is_empty() {
        let mut perms = LaunchPermissionModifications::builder();
        for o in orgs {
            let p = if o.organization {
                LaunchPermission::builder().organization_arn(&o.share_arn)
            } else {
                LaunchPermission::builder().organizational_unit_arn(&o.share_arn)
            };
            perms = perms.add(p.build());
        }
        clients
            .ec2
            .modify_image_attribute()
            .image_id(image)
            .launch_permission(perms.build())
            .send()
            .await
            .map_err(|e| aws::err("ModifyImageAttribute", format!("image {image}"), e))?;
    }
    for chunk in accounts.chunks(100) {
        let mut perms = LaunchPermissionModifications::builder();
        for a in chunk {
            perms = perms.add(LaunchPermission::builder().user_id(a).build());
        }
        clients
            .ec2
            .modify_image_attribute()
            .image_id(image)
            .launch_permission(perms.build())
            .send()
            .await
            .map_err(|e| aws::err("ModifyImageAttribute", format!("image {image}"), e))?;
        for sid in &snapshots {
            let mut vols = CreateVolumePermissionModifications::builder();
            for a in chunk {
                vols = vols.add(CreateVolumePermission::builder().user_id(a).build());
            }
            clients
                .ec2
                .modify_snapshot_attribute()
                .snapshot_id(sid)
                .attribute(SnapshotAttributeName::CreateVolumePermission)
                .create_volume_permission(vols.build())
                .send()
                .await
                .map_err(|e| aws::err("ModifySnapshotAttribute", format!("snapshot {sid} of image {image}"), e))?;
        }
    }
    Ok(accounts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_by_id() {
        let arn = "arn:aws:kms:us-east-1:111111111111:key/1234abcd-12ab-34cd-56ef-1234567890ab";
        assert!(same_key(arn, "1234abcd-12ab-34cd-56ef-1234567890ab"));
        assert!(same_key(arn, arn));
        assert!(!same_key("arn:aws:kms:us-east-1:111111111111:key/0000abcd-12ab-34cd-56ef-1234567890ab", arn));
    }
}
