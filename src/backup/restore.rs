//! `imgbuild restore`: a recovery point of this project into a new file system (never over the
//! live one), the restored data moved to where Chroma's boot serves it, and both file systems
//! named. Every check runs before anything is created, so bad input changes nothing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine;
use serde::Serialize;

use super::inventory::{self, Inventory};
use super::{COPY_NAME, TAG_KIND, TAG_PROJECT, TAG_VERSION, Target, runcommand};
use crate::aws::{self, Clients};
use crate::config::{Config, StorageMode};
use crate::error::{Error, Result};
use crate::render;
use crate::stack::Waits;
use crate::ui::progress::Progress;

/// The script Run Command executes to move the restored data into place.
pub const PROMOTE_SCRIPT: &str = include_str!("../../backup/promote.sh");

/// `arn:<partition>:backup:<region>:<account>:recovery-point:<id>`, the shape AWS Backup gives
/// (aws-cli awscli/examples/backup/list-backup-jobs.rst).
pub fn check_arn(arn: &str) -> Result<()> {
    let parts: Vec<&str> = arn.splitn(7, ':').collect();
    let ok = parts.len() == 7
        && parts[0] == "arn"
        && parts[1].starts_with("aws")
        && parts[2] == "backup"
        && !parts[3].is_empty()
        && parts[4].len() == 12
        && parts[4].bytes().all(|b| b.is_ascii_digit())
        && parts[5] == "recovery-point"
        && !parts[6].is_empty();
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "`{arn}` is not a recovery point ARN (arn:aws:backup:<region>:<account>:recovery-point:<id>); `imgbuild backup list` shows this project's"
        )))
    }
}

/// What the recovery point says about itself.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub arn: String,
    pub kind: Option<String>,
    pub chroma_version: Option<String>,
    pub source_file_system_arn: String,
    /// What the tags recorded of the collections (None: the point has no inventory).
    pub recorded: Option<inventory::Recorded>,
}

/// The recovery point must be in the stack's vault, completed, of an EFS file system, and tagged
/// with this project. Each failure is bad input (exit 2), found before anything is created.
pub async fn check_point(clients: &Clients, t: &Target, arn: &str) -> Result<Point> {
    check_arn(arn)?;
    let d = match clients.backup.describe_recovery_point().backup_vault_name(&t.vault).recovery_point_arn(arn).send().await {
        Ok(d) => d,
        Err(e) if matches!(aws::code(&e), Some("ResourceNotFoundException") | Some("InvalidParameterValueException")) => {
            return Err(Error::Invalid(format!(
                "recovery point {arn} is not in vault {} of stack {}: `imgbuild backup list` shows the ones there. Nothing was changed",
                t.vault, t.stack
            )));
        }
        Err(e) => return Err(aws::err("DescribeRecoveryPoint", arn.to_string(), e)),
    };
    if d.resource_type() != Some("EFS") {
        return Err(Error::Invalid(format!("recovery point {arn} is of a {} resource, not an EFS file system", d.resource_type().unwrap_or("unknown"))));
    }
    let status = d.status().map(|s| s.as_str().to_string()).unwrap_or_default();
    if status != "COMPLETED" {
        return Err(Error::Invalid(format!("recovery point {arn} is {status}, not COMPLETED: only a completed recovery point can be restored")));
    }
    let tags = clients.backup.list_tags().resource_arn(arn).send().await.map_err(|e| aws::err("ListTags", arn.to_string(), e))?;
    let tags = tags.tags().cloned().unwrap_or_default();
    match tags.get(TAG_PROJECT) {
        Some(p) if p == &t.stack => {}
        other => {
            return Err(Error::Invalid(format!(
                "recovery point {arn} belongs to {}, not to stack {}: restoring it would serve another project's data. Nothing was changed",
                other.map(|p| format!("project {p}")).unwrap_or_else(|| "no imgbuild project (it has no ImgbuildProject tag)".into()),
                t.stack
            )));
        }
    }
    Ok(Point {
        arn: arn.to_string(),
        kind: tags.get(TAG_KIND).cloned(),
        chroma_version: tags.get(TAG_VERSION).cloned(),
        source_file_system_arn: d.resource_arn().unwrap_or_default().to_string(),
        recorded: inventory::from_tags(&tags),
    })
}

/// The restore metadata for a new, encrypted file system (AWS Backup API Reference,
/// StartRestoreJob: for EFS `file-system-id`, `Encrypted`, `KmsKeyId`, `PerformanceMode`,
/// `CreationToken`, `newFileSystem`), starting from what GetRecoveryPointRestoreMetadata returned.
pub fn restore_metadata(from_point: &HashMap<String, String>, token: &str) -> HashMap<String, String> {
    let mut m: HashMap<String, String> = from_point.iter().filter(|(k, _)| k.as_str() == "file-system-id").map(|(k, v)| (k.clone(), v.clone())).collect();
    m.insert("newFileSystem".into(), "true".into());
    m.insert("Encrypted".into(), "true".into());
    m.insert("PerformanceMode".into(), "generalPurpose".into());
    m.insert("CreationToken".into(), format!("imgbuild-restore-{token}"));
    m
}

/// Starts the restore job into a new file system and waits for it; returns the new file
/// system's id.
pub async fn restore_into_new(clients: &Clients, t: &Target, point: &Point, token: &str, waits: Waits, progress: &Progress) -> Result<(String, String)> {
    let meta = clients
        .backup
        .get_recovery_point_restore_metadata()
        .backup_vault_name(&t.vault)
        .recovery_point_arn(&point.arn)
        .send()
        .await
        .map_err(|e| aws::err("GetRecoveryPointRestoreMetadata", point.arn.clone(), e))?;
    let metadata = restore_metadata(&meta.restore_metadata().cloned().unwrap_or_default(), token);
    let started = clients
        .backup
        .start_restore_job()
        .recovery_point_arn(&point.arn)
        .set_metadata(Some(metadata))
        .iam_role_arn(&t.role_arn)
        .idempotency_token(token)
        .resource_type("EFS")
        .send()
        .await
        .map_err(|e| aws::err("StartRestoreJob", point.arn.clone(), e))?;
    let job = started.restore_job_id().ok_or_else(|| Error::Tool("StartRestoreJob answered without a RestoreJobId".into()))?.to_string();
    progress.line(&format!("restore job {job} started: {} into a new file system", point.arn));
    let begun = Instant::now();
    let mut last = String::new();
    loop {
        let d = clients.backup.describe_restore_job().restore_job_id(&job).send().await.map_err(|e| aws::err("DescribeRestoreJob", job.clone(), e))?;
        let status = d.status().map(|s| s.as_str().to_string()).unwrap_or_default();
        if status != last {
            progress.line(&format!("restore job {job}: {status}"));
            last = status.clone();
        }
        match status.as_str() {
            "COMPLETED" => {
                let arn = d.created_resource_arn().unwrap_or_default();
                let fs = arn.rsplit('/').next().filter(|id| id.starts_with("fs-")).ok_or_else(|| {
                    Error::Tool(format!("restore job {job} completed without naming the file system it created (CreatedResourceArn `{arn}`)"))
                })?;
                return Ok((job, fs.to_string()));
            }
            "ABORTED" | "FAILED" => {
                return Err(Error::Tool(format!(
                    "restore job {job} ended {status}: {}; the live file system was not touched",
                    d.status_message().unwrap_or("no reason given")
                )));
            }
            _ => {}
        }
        if begun.elapsed() + waits.poll > waits.timeout {
            return Err(Error::Timeout {
                what: format!("restore job {job}"),
                secs: waits.timeout.as_secs(),
                hint: "it goes on in AWS Backup; nothing was switched: run restore again once it completes".into(),
            });
        }
        tokio::time::sleep(waits.poll).await;
    }
}

/// Names a file system (its `Name` tag) so the console and `destroy` show what it is.
pub async fn name_file_system(clients: &Clients, fs: &str, name: &str) -> Result<()> {
    let tag = aws_sdk_efs::types::Tag::builder().key("Name").value(name).build().map_err(|e| Error::Tool(format!("EFS tag: {e}")))?;
    clients.efs.tag_resource().resource_id(fs).tags(tag).send().await.map_err(|e| aws::err("TagResource", fs.to_string(), e))?;
    Ok(())
}

/// The Run Command line of the promote script for the restored file system `fs`.
pub fn promote_commands(config: &Config, region: &str, fs: &str, token: &str) -> Vec<String> {
    let b64 = base64::engine::general_purpose::STANDARD.encode(PROMOTE_SCRIPT);
    let mount_args = mount_args(config, region, fs);
    let env = [
        ("IMGBUILD_FILE_SYSTEM_ID", fs.to_string()),
        ("IMGBUILD_MOUNT_ARGS", mount_args),
        ("IMGBUILD_RESTORE_MOUNT", format!("/mnt/imgbuild-restore-{token}")),
        ("IMGBUILD_DATA_SUBDIR", render::compose::EFS_DATA_SUBDIR.to_string()),
        ("IMGBUILD_VERSION_NAME", render::VERSION_MARKER.to_string()),
        ("IMGBUILD_COPY_NAME", COPY_NAME.to_string()),
        ("IMGBUILD_TOKEN", token.to_string()),
    ];
    let env: Vec<String> = env.iter().map(|(k, v)| format!("{k}='{}'", v.replace('\'', r"'\''"))).collect();
    vec![format!("echo {b64} | base64 -d | {} bash -s", env.join(" "))]
}

/// How the instance mounts a restored file system: the boot's way for each storage mode
/// (REFERENCE.md: EFS NFS options; amazon-efs-utils only in efs-tls mode).
pub fn mount_args(config: &Config, region: &str, fs: &str) -> String {
    match config.storage.mode {
        StorageMode::EfsTls => format!("-t efs -o tls,iam {fs}:/"),
        StorageMode::DockerNfs => {
            format!("-t nfs4 -o nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport {fs}.efs.{region}.amazonaws.com:/")
        }
    }
}

/// What the promote script reported.
#[derive(Debug, Clone, Serialize)]
pub struct Promoted {
    /// `consistent` (the copy `imgbuild backup` made) or `live` (the data as a scheduled backup
    /// caught it).
    pub kind: String,
    pub chroma_version: String,
}

pub fn parse_promoted(stdout: &str, token: &str) -> Result<Promoted> {
    let line = stdout.lines().rev().find(|l| l.starts_with("IMGBUILD_RESULT "));
    let f: HashMap<&str, &str> = line.map(|l| l.split_whitespace().skip(1).filter_map(|kv| kv.split_once('=')).collect()).unwrap_or_default();
    if f.get("status") != Some(&"ok") || f.get("token") != Some(&token) {
        return Err(Error::Tool(format!("the promote script did not report success for this run; output was: {}", stdout.trim())));
    }
    Ok(Promoted { kind: f.get("kind").copied().unwrap_or_default().to_string(), chroma_version: f.get("version").copied().unwrap_or_default().to_string() })
}

/// A restored file system has no mount targets. The instance reaches it through temporary ones
/// in the live file system's subnets and security groups, removed again before the stack makes
/// its own (one mount target per AZ: the stack's would conflict).
#[allow(clippy::too_many_arguments)]
pub async fn promote(
    clients: &Clients,
    config: &Config,
    t: &Target,
    new_fs: &str,
    token: &str,
    verify: bool,
    poll: Duration,
    progress: &Progress,
) -> Result<(Promoted, Option<Inventory>)> {
    let region = clients.efs.config().region().map(|r| r.to_string()).unwrap_or_default();
    let live = clients
        .efs
        .describe_mount_targets()
        .file_system_id(&t.file_system_id)
        .send()
        .await
        .map_err(|e| aws::err("DescribeMountTargets", t.file_system_id.clone(), e))?;
    let mut created = Vec::new();
    for mt in live.mount_targets() {
        let (id, subnet) = (mt.mount_target_id(), mt.subnet_id());
        let sgs = clients
            .efs
            .describe_mount_target_security_groups()
            .mount_target_id(id)
            .send()
            .await
            .map_err(|e| aws::err("DescribeMountTargetSecurityGroups", id.to_string(), e))?;
        let made = clients
            .efs
            .create_mount_target()
            .file_system_id(new_fs)
            .subnet_id(subnet)
            .set_security_groups(Some(sgs.security_groups().to_vec()))
            .send()
            .await
            .map_err(|e| aws::err("CreateMountTarget", format!("{new_fs} in {subnet}"), e))?;
        created.push(made.mount_target_id().to_string());
    }
    if created.is_empty() {
        return Err(Error::Invalid(format!("the live file system {} has no mount targets to copy: is the stack deployed?", t.file_system_id)));
    }
    let result = async {
        wait_mount_targets(clients, new_fs, Some("available"), poll).await?;
        progress.line(&format!("moving the restored data into place on {new_fs} (Run Command on {})", t.instance_id));
        let inv = runcommand::run(
            clients,
            &t.instance_id,
            promote_commands(config, &region, new_fs, token),
            "imgbuild restore: move restored data into place",
            Duration::from_secs(900),
            poll,
        )
        .await?;
        let promoted = parse_promoted(&inv.stdout, token)?;
        if !verify {
            return Ok((promoted, None));
        }
        progress.line(&format!("verifying: {new_fs} mounted read-only, a throw-away Chroma on port {} lists its collections", inventory::INSPECT_PORT));
        let source = inventory::Source::ReadOnly {
            mount_args: mount_args(config, &region, new_fs),
            mount_at: format!("/mnt/imgbuild-verify-{token}"),
            path: render::compose::EFS_DATA_SUBDIR,
        };
        let commands = inventory::inspect_commands(config, source, token)?;
        let inv = runcommand::run(clients, &t.instance_id, commands, "imgbuild restore: verify the restored data", Duration::from_secs(900), poll).await?;
        Ok((promoted, Some(inventory::parse(&inv.stdout, token)?)))
    }
    .await;
    for id in &created {
        if let Err(e) = clients.efs.delete_mount_target().mount_target_id(id).send().await {
            progress.line(&format!("could not remove the temporary mount target {id}: {}", aws::err("DeleteMountTarget", id.clone(), e)));
        }
    }
    let gone = wait_mount_targets(clients, new_fs, None, poll).await;
    let promoted = result?;
    gone?;
    Ok(promoted)
}

/// Waits (at most ten minutes) until every mount target of `fs` is `state`, or, with None,
/// until it has none.
async fn wait_mount_targets(clients: &Clients, fs: &str, state: Option<&str>, poll: Duration) -> Result<()> {
    let limit = Duration::from_secs(600);
    let begun = Instant::now();
    loop {
        let out = clients.efs.describe_mount_targets().file_system_id(fs).send().await.map_err(|e| aws::err("DescribeMountTargets", fs.to_string(), e))?;
        let done = match state {
            Some(s) => !out.mount_targets().is_empty() && out.mount_targets().iter().all(|m| m.life_cycle_state().as_str() == s),
            None => out.mount_targets().is_empty(),
        };
        if done {
            return Ok(());
        }
        if begun.elapsed() + poll > limit {
            return Err(Error::Timeout {
                what: format!("the mount targets of {fs} to be {}", state.unwrap_or("removed")),
                secs: limit.as_secs(),
                hint: "see them with `aws efs describe-mount-targets`".into(),
            });
        }
        tokio::time::sleep(poll).await;
    }
}
