//! Reattaching a retained EFS file system (`efs.file_system_id`): the stack puts its mount
//! targets on it, and deploy sets its file system policy, which no stack resource can own on a
//! file system the stack did not create.

use serde_json::json;

use crate::aws::{self, Clients, code};
use crate::error::{Error, Result};
use crate::ui::progress::Progress;

/// Checks that `fs` can take this stack's mount targets and sets its policy to admit this
/// stack's instance roles (under the IAM path `/imgbuild/<stack>/`). `ours` is true when the
/// deployed stack already uses `fs` (its mount targets are then the stack's own).
pub async fn reattach(clients: &Clients, fs: &str, stack: &str, efs_tls: bool, ours: bool, progress: &Progress) -> Result<String> {
    let field = "efs.file_system_id";
    let out = match clients.efs.describe_file_systems().file_system_id(fs).send().await {
        Ok(o) => o,
        Err(e) if e.as_service_error().and_then(code) == Some("FileSystemNotFound") => {
            return Err(Error::Invalid(format!("{field}: file system {fs} does not exist in this region (or this account cannot see it)")));
        }
        Err(e) => return Err(aws::err("DescribeFileSystems", format!("file system {fs}"), e)),
    };
    let desc = out.file_systems().first().ok_or_else(|| Error::Invalid(format!("{field}: file system {fs} does not exist in this region")))?;
    let state = desc.life_cycle_state().as_str().to_string();
    if state != "available" {
        return Err(Error::Invalid(format!("{field}: file system {fs} is {state}, not available")));
    }
    if desc.encrypted() != Some(true) {
        return Err(Error::Invalid(format!(
            "{field}: file system {fs} is not encrypted at rest; Chroma's data belongs on an encrypted one (copy it to a new encrypted file system)"
        )));
    }
    let arn = desc.file_system_arn().map(String::from).ok_or_else(|| Error::Invalid(format!("{field}: DescribeFileSystems gave no ARN for {fs}")))?;
    if !ours {
        let targets = clients
            .efs
            .describe_mount_targets()
            .file_system_id(fs)
            .send()
            .await
            .map_err(|e| aws::err("DescribeMountTargets", format!("file system {fs}"), e))?;
        let held: Vec<String> =
            targets.mount_targets().iter().map(|t| format!("{} in {} ({})", t.mount_target_id(), t.subnet_id(), t.vpc_id().unwrap_or("?"))).collect();
        if !held.is_empty() {
            return Err(Error::Invalid(format!(
                "{field}: file system {fs} still has mount targets: {}. EFS allows mount targets in one VPC only and one per zone, so the stack cannot add its own; \
                 if nothing uses them, delete them (aws efs delete-mount-target --mount-target-id ...) and deploy again",
                held.join(", ")
            )));
        }
    }
    let policy = file_system_policy(&arn, stack, efs_tls)?;
    clients
        .efs
        .put_file_system_policy()
        .file_system_id(fs)
        .policy(&policy)
        .send()
        .await
        .map_err(|e| aws::err("PutFileSystemPolicy", format!("file system {fs}"), e))?;
    progress.line(&format!("reattaching EFS file system {fs}: its policy now admits this stack's instance role (IAM path /imgbuild/{stack}/)"));
    Ok(policy)
}

/// The same statements the stack gives a file system it creates, with the instance role named
/// by its path (the role is created later, by the stack).
pub fn file_system_policy(arn: &str, stack: &str, efs_tls: bool) -> Result<String> {
    // arn:PARTITION:elasticfilesystem:REGION:ACCOUNT:file-system/fs-...
    let parts: Vec<&str> = arn.split(':').collect();
    let (Some(partition), Some(account)) = (parts.get(1), parts.get(4)) else {
        return Err(Error::Invalid(format!("efs.file_system_id: unexpected file system ARN {arn}")));
    };
    let actions = ["elasticfilesystem:ClientMount", "elasticfilesystem:ClientWrite", "elasticfilesystem:ClientRootAccess"];
    let statements = if efs_tls {
        json!([
            {
                "Sid": "InstanceRoleMountsOverMountTargets",
                "Effect": "Allow",
                "Principal": {"AWS": format!("arn:{partition}:iam::{account}:root")},
                "Action": actions,
                "Resource": arn,
                "Condition": {
                    "Bool": {"elasticfilesystem:AccessedViaMountTarget": "true"},
                    "ArnLike": {"aws:PrincipalArn": format!("arn:{partition}:iam::{account}:role/imgbuild/{stack}/*")}
                }
            },
            {
                "Sid": "DenyUnencryptedTransport",
                "Effect": "Deny",
                "Principal": {"AWS": "*"},
                "Action": "*",
                "Resource": arn,
                "Condition": {"Bool": {"aws:SecureTransport": "false"}}
            }
        ])
    } else {
        // docker-nfs: Docker's NFS driver sends no IAM identity and no TLS; the EFS security
        // group does the gating, as in the stack's own policy.
        json!([
            {
                "Sid": "MountTargetClients",
                "Effect": "Allow",
                "Principal": {"AWS": "*"},
                "Action": actions,
                "Resource": arn,
                "Condition": {"Bool": {"elasticfilesystem:AccessedViaMountTarget": "true"}}
            }
        ])
    };
    Ok(json!({"Version": "2012-10-17", "Statement": statements}).to_string())
}

/// Every file system in the region, all pages: DescribeFileSystems takes no tag filter, so finding
/// a project's file systems by tag means reading them all (EFS API reference, DescribeFileSystems:
/// `Tags` and `LifeCycleState` on each `FileSystemDescription`, `NextMarker` to page). `about`
/// names what was being looked for in an error.
pub async fn every_file_system(clients: &Clients, about: &str) -> Result<Vec<aws_sdk_efs::types::FileSystemDescription>> {
    let mut all = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let page =
            clients.efs.describe_file_systems().set_marker(marker.take()).send().await.map_err(|e| aws::err("DescribeFileSystems", about.to_string(), e))?;
        all.extend(page.file_systems().iter().cloned());
        match page.next_marker() {
            Some(m) if !m.is_empty() => marker = Some(m.to_string()),
            _ => break,
        }
    }
    Ok(all)
}
