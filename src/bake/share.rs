//! Handing a baked image to other accounts: launch permission on the image and create-volume
//! permission on its snapshots ("Share an AMI with specific AWS accounts", Amazon EC2 User
//! Guide: an AMI with encrypted snapshots needs both, and the snapshots' key must be a
//! customer-managed key whose policy lets those accounts use it; one under the AWS managed
//! `aws/ebs` key cannot be shared).

use aws_sdk_ec2::types::{CreateVolumePermission, CreateVolumePermissionModifications, LaunchPermission, LaunchPermissionModifications, SnapshotAttributeName};

use std::time::Instant;

use crate::aws::{self, Clients};
use crate::config::OrgTarget;
use crate::error::{Error, Result};
use crate::stack::Waits;
use crate::ui::progress::Progress;

/// On a copy made under the fleet's key: the image it copies and the key, so the next deploy
/// finds it instead of copying again.
pub const TAG_ENCRYPTED_FROM: &str = "imgbuild:encrypted-from";
pub const TAG_KMS_KEY: &str = "imgbuild:kms-key";

/// The account that owns (baked) the image, as EC2 reports it.
pub async fn owner(clients: &Clients, image: &str) -> Result<Option<String>> {
    let out = clients.ec2.describe_images().image_ids(image).send().await.map_err(|e| aws::err("DescribeImages", format!("image {image}"), e))?;
    Ok(out.images().first().and_then(|i| i.owner_id()).map(String::from))
}

/// Whether a snapshot's key (EC2 reports the key ARN) is the configured one. An alias cannot be
/// resolved without KMS, so it never matches here.
fn same_key(snapshot_key: &str, configured: &str) -> bool {
    if configured.starts_with("alias/") || configured.contains(":alias/") {
        return false;
    }
    let id = |k: &str| k.rsplit_once(":key/").map(|(_, id)| id.to_string()).unwrap_or_else(|| k.to_string());
    id(snapshot_key) == id(configured)
}

/// Shares `image` (in the clients' region, already under the fleet's key: `under_key`) with
/// `accounts` and `orgs`: launch permission, and for accounts create-volume permission on each
/// of its EBS snapshots (ModifySnapshotAttribute takes account ids only).
pub async fn share(clients: &Clients, image: &str, accounts: &[String], orgs: &[OrgTarget], owner: Option<&str>) -> Result<Vec<String>> {
    let accounts: Vec<String> = accounts.iter().filter(|a| Some(a.as_str()) != owner).cloned().collect();
    if accounts.is_empty() && orgs.is_empty() {
        return Ok(Vec::new());
    }
    let snapshots = snapshots_of(clients, image).await?;
    modify(clients, image, &snapshots, &accounts, orgs, Op::Add).await?;
    Ok(accounts)
}

/// Takes back what `share` gave `accounts` on `image`: launch permission, and create-volume
/// permission on each of its snapshots (the same calls with `Remove`, "Modify AMI permissions" /
/// ModifySnapshotAttribute OperationType remove). An image already gone has nothing to revoke.
/// `orgs`: organizational units (or organizations) to take launch permission back from too.
pub async fn unshare(clients: &Clients, image: &str, accounts: &[String], orgs: &[OrgTarget]) -> Result<Vec<String>> {
    if accounts.is_empty() && orgs.is_empty() {
        return Ok(Vec::new());
    }
    let snapshots = match snapshots_of(clients, image).await {
        Ok(s) => s,
        Err(Error::Invalid(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    modify(clients, image, &snapshots, accounts, orgs, Op::Remove).await?;
    Ok(accounts.iter().cloned().chain(orgs.iter().map(|o| o.share_arn.clone())).collect())
}

#[derive(Clone, Copy)]
enum Op {
    Add,
    Remove,
}

/// The permission calls of `share` and `unshare`, which differ only in Add or Remove: launch
/// permission for the organizations in one call, then per 100 accounts launch permission on the
/// image and create-volume permission on each snapshot.
async fn modify(clients: &Clients, image: &str, snapshots: &[String], accounts: &[String], orgs: &[OrgTarget], op: Op) -> Result<()> {
    let launch = |p: Vec<LaunchPermission>| match op {
        Op::Add => LaunchPermissionModifications::builder().set_add(Some(p)),
        Op::Remove => LaunchPermissionModifications::builder().set_remove(Some(p)),
    };
    let modify_image = |perms: LaunchPermissionModifications| async move {
        clients
            .ec2
            .modify_image_attribute()
            .image_id(image)
            .launch_permission(perms)
            .send()
            .await
            .map_err(|e| aws::err("ModifyImageAttribute", format!("image {image}"), e))
    };
    if !orgs.is_empty() {
        let perms = orgs
            .iter()
            .map(|o| {
                if o.organization {
                    LaunchPermission::builder().organization_arn(&o.share_arn).build()
                } else {
                    LaunchPermission::builder().organizational_unit_arn(&o.share_arn).build()
                }
            })
            .collect();
        modify_image(launch(perms).build()).await?;
    }
    for chunk in accounts.chunks(100) {
        let perms = chunk.iter().map(|a| LaunchPermission::builder().user_id(a).build()).collect();
        modify_image(launch(perms).build()).await?;
        for sid in snapshots {
            let vols: Vec<CreateVolumePermission> = chunk.iter().map(|a| CreateVolumePermission::builder().user_id(a).build()).collect();
            let vols = match op {
                Op::Add => CreateVolumePermissionModifications::builder().set_add(Some(vols)),
                Op::Remove => CreateVolumePermissionModifications::builder().set_remove(Some(vols)),
            };
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
    Ok(())
}

async fn snapshots_of(clients: &Clients, image: &str) -> Result<Vec<String>> {
    let out = clients.ec2.describe_images().image_ids(image).send().await.map_err(|e| aws::err("DescribeImages", format!("image {image}"), e))?;
    let img = out.images().first().ok_or_else(|| Error::Invalid(format!("image {image} does not exist or is not visible to this account")))?;
    Ok(img.block_device_mappings().iter().filter_map(|m| m.ebs()?.snapshot_id().map(String::from)).collect())
}

/// Where the image stands with the fleet's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnderKey {
    /// This image (the one given, or the copy an earlier deploy made) is under the key.
    Ready(String),
    /// Its snapshots are unencrypted or under another key (such as the AWS managed aws/ebs):
    /// other accounts could not launch it, so it must be copied under the key first.
    NeedsCopy,
}

/// Read-only: is `image` under `kms_key`, or is there a copy of it that is? A key given as an
/// alias cannot be compared without KMS, so only a copy this tool made under that alias counts.
pub async fn under_key(clients: &Clients, image: &str, kms_key: &str) -> Result<UnderKey> {
    let snapshots = snapshots_of(clients, image).await?;
    if !snapshots.is_empty() {
        let described = clients
            .ec2
            .describe_snapshots()
            .set_snapshot_ids(Some(snapshots.clone()))
            .send()
            .await
            .map_err(|e| aws::err("DescribeSnapshots", format!("snapshots of image {image}"), e))?;
        let all_under = described.snapshots().iter().all(|s| s.encrypted() == Some(true) && s.kms_key_id().is_some_and(|k| same_key(k, kms_key)));
        if all_under && !described.snapshots().is_empty() {
            return Ok(UnderKey::Ready(image.to_string()));
        }
    }
    let copies = clients
        .ec2
        .describe_images()
        .owners("self")
        .filters(aws_sdk_ec2::types::Filter::builder().name(format!("tag:{TAG_ENCRYPTED_FROM}")).values(image).build())
        .filters(aws_sdk_ec2::types::Filter::builder().name(format!("tag:{TAG_KMS_KEY}")).values(kms_key).build())
        .send()
        .await
        .map_err(|e| aws::err("DescribeImages", format!("copies of image {image}"), e))?;
    let ready = copies.images().iter().find(|i| i.state().map(|s| s.as_str()) == Some("available")).and_then(|i| i.image_id());
    Ok(ready.map(|id| UnderKey::Ready(id.to_string())).unwrap_or(UnderKey::NeedsCopy))
}

/// Copies `image` within `region` with its snapshots encrypted under `kms_key` (CopyImage with
/// Encrypted and KmsKeyId), tagged so `under_key` finds it, and waits until it is available.
pub async fn copy_under_key(clients: &Clients, image: &str, region: &str, kms_key: &str, token: &str, waits: Waits, progress: &Progress) -> Result<String> {
    use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
    let name = format!("{image}-{}", token.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect::<String>());
    let out = clients
        .ec2
        .copy_image()
        .source_image_id(image)
        .source_region(region)
        .name(name)
        .encrypted(true)
        .kms_key_id(kms_key)
        .copy_image_tags(true)
        .client_token(format!("{image}-{token}"))
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Image)
                .tags(Tag::builder().key(TAG_ENCRYPTED_FROM).value(image).build())
                .tags(Tag::builder().key(TAG_KMS_KEY).value(kms_key).build())
                .build(),
        )
        .send()
        .await
        .map_err(|e| aws::err("CopyImage", format!("image {image} in {region}"), e))?;
    let copy = out.image_id().ok_or_else(|| Error::Tool(format!("CopyImage of {image} in {region} answered without an image id")))?.to_string();
    let deadline = Instant::now() + waits.timeout;
    loop {
        let d = clients.ec2.describe_images().image_ids(&copy).send().await.map_err(|e| aws::err("DescribeImages", format!("image {copy}"), e))?;
        let state = d.images().first().and_then(|i| i.state()).map(|s| s.as_str().to_string()).unwrap_or_else(|| "pending".into());
        match state.as_str() {
            "available" => return Ok(copy),
            "pending" => progress.set(&format!("copying {image} under the fleet's key in {region}: {copy} pending")),
            other => return Err(Error::Tool(format!("the copy {copy} of {image} under {kms_key} in {region} ended {other}"))),
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!("image {copy} (the copy of {image} under the fleet's key in {region})"),
                secs: waits.timeout.as_secs(),
                hint: "the copy goes on in EC2; run fleet deploy again once it is available".into(),
            });
        }
        tokio::time::sleep(waits.poll).await;
    }
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
        assert!(!same_key(arn, "alias/fleet"));
    }
}
