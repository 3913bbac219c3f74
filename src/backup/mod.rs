//! Chroma's data kept safe: the consistent copy taken on the instance through SSM Run Command
//! (the quiesce script), the on-demand AWS Backup job of the file system that carries it, the
//! tags every recovery point gets, and the listing of recovery points. `diagnose` is the other
//! read-only script run the same way, for `imgbuild logs`; `follow` polls Chroma's container log
//! the same way for `imgbuild logs --follow`. No command line here: the `cmd` layer
//! turns flags into these calls.

pub mod diagnose;
pub mod follow;
pub mod inventory;
pub mod restore;
pub mod runcommand;
pub mod upgrade;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use base64::Engine;
use serde::Serialize;

use crate::aws::{self, Clients};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::render;
use crate::stack::{self, Waits};
use crate::ui::progress::Progress;

/// The script Run Command executes to take the consistent copy.
pub const QUIESCE_SCRIPT: &str = include_str!("../../backup/quiesce.sh");
/// Where on the file system the consistent copy lives, next to the live `data` directory.
pub const COPY_NAME: &str = ".imgbuild-backup";

/// Recovery point tags: which project, which Chroma version wrote the data, how it was taken.
pub const TAG_PROJECT: &str = "ImgbuildProject";
pub const TAG_VERSION: &str = "ImgbuildChromaVersion";
pub const TAG_KIND: &str = "ImgbuildBackupKind";
pub const KIND_CONSISTENT: &str = "consistent";
pub const KIND_SCHEDULED: &str = "scheduled";
/// Set on a recovery point once a restore of it was verified: the run that verified it.
pub const TAG_VERIFIED: &str = "ImgbuildVerified";

/// Longest the quiesce script may run on the instance (Run Command's own timeout too).
pub const QUIESCE_TIMEOUT_SECS: u64 = 900;

/// What a backup works on, read from the deployed stack and the instance running it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub stack: String,
    pub file_system_id: String,
    pub file_system_arn: String,
    pub vault: String,
    pub role_arn: String,
    pub instance_id: String,
}

/// Finds the stack's file system, vault, role and running instance. A stack that is not
/// deployed, is in the middle of an operation, or predates the backup resources is refused as
/// bad input: nothing is changed.
pub async fn target(clients: &Clients, stack_name: &str) -> Result<Target> {
    let st = stack::describe(&clients.cfn, stack_name)
        .await?
        .ok_or_else(|| Error::Invalid(format!("stack {stack_name} is not deployed: there is nothing to back up (run `imgbuild deploy`)")))?;
    let status = stack::status_of(&st);
    if status.ends_with("_IN_PROGRESS") {
        return Err(Error::Invalid(format!(
            "stack {stack_name} is {status}: a deploy or destroy is running; wait for it (`imgbuild status`) and try again. Nothing was changed"
        )));
    }
    let outputs = stack::outputs_of(&st);
    let get = |key: &str| {
        outputs.get(key).cloned().ok_or_else(|| {
            Error::Invalid(format!(
                "stack {stack_name} has no {key} output: deploy this version of imgbuild's stack first (`imgbuild deploy`), it adds the backup vault and role"
            ))
        })
    };
    let file_system_id = get("FileSystemId")?;
    let vault = get("BackupVaultName")?;
    let role_arn = get("BackupRoleArn")?;
    let fs = clients
        .efs
        .describe_file_systems()
        .file_system_id(&file_system_id)
        .send()
        .await
        .map_err(|e| aws::err("DescribeFileSystems", file_system_id.clone(), e))?;
    let file_system_arn = fs
        .file_systems()
        .first()
        .and_then(|f| f.file_system_arn())
        .map(String::from)
        .ok_or_else(|| Error::Invalid(format!("file system {file_system_id} of stack {stack_name} was not found")))?;
    let instance_id = running_instance(clients, stack_name).await?;
    Ok(Target { stack: stack_name.to_string(), file_system_id, file_system_arn, vault, role_arn, instance_id })
}

/// The stack's running instance, found by the stack tag its launch template sets.
async fn running_instance(clients: &Clients, stack_name: &str) -> Result<String> {
    let filter = |name: &str, value: &str| aws_sdk_ec2::types::Filter::builder().name(name).values(value).build();
    let out = clients
        .ec2
        .describe_instances()
        .filters(filter(&format!("tag:{}", render::STACK_TAG), stack_name))
        .filters(filter("instance-state-name", "running"))
        .send()
        .await
        .map_err(|e| aws::err("DescribeInstances", format!("the instances of stack {stack_name}"), e))?;
    let mut ids: Vec<String> = out.reservations().iter().flat_map(|r| r.instances()).filter_map(|i| i.instance_id().map(String::from)).collect();
    ids.sort();
    match ids.len() {
        1 => Ok(ids.remove(0)),
        0 => Err(Error::Invalid(format!("stack {stack_name} has no running instance: Chroma is not running, so no consistent copy can be taken"))),
        _ => Err(Error::Invalid(format!(
            "stack {stack_name} has {} running instances ({}): an instance replacement is under way; wait for it and try again",
            ids.len(),
            ids.join(", ")
        ))),
    }
}

/// The one Run Command line that runs the quiesce script: the script travels base64-encoded
/// (Run Command runs `commands` with /bin/sh, and the script is bash), its settings as
/// environment variables, each a value the config check already restricted.
pub fn quiesce_commands(config: &Config, token: &str) -> Vec<String> {
    let b64 = base64::engine::general_purpose::STANDARD.encode(QUIESCE_SCRIPT);
    let env = [
        ("IMGBUILD_MOUNT_POINT", config.storage.mount_point.as_str()),
        ("IMGBUILD_DATA_SUBDIR", render::compose::EFS_DATA_SUBDIR),
        ("IMGBUILD_LOCK_NAME", render::LOCK_NAME),
        ("IMGBUILD_VERSION_NAME", render::VERSION_MARKER),
        ("IMGBUILD_COPY_NAME", COPY_NAME),
        ("IMGBUILD_TOKEN", token),
    ];
    let env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={}", shell_quote(v))).collect();
    vec![format!("echo {b64} | base64 -d | {} bash -s", env.join(" "))]
}

fn shell_quote(v: &str) -> String {
    format!("'{}'", v.replace('\'', r"'\''"))
}

/// What the quiesce script reported on its last line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Quiesced {
    pub token: String,
    /// The Chroma version recorded in the version marker ("" when Chroma never wrote one).
    pub chroma_version: String,
    /// How long Chroma was unavailable.
    pub paused_ms: u64,
    pub bytes: u64,
    pub was_running: bool,
}

/// Reads the `IMGBUILD_RESULT` line; the token proves it is this run's copy.
pub fn parse_quiesced(stdout: &str, token: &str) -> Result<Quiesced> {
    let line = stdout.lines().rev().find(|l| l.starts_with("IMGBUILD_RESULT "));
    let fields: HashMap<&str, &str> = line.map(|l| l.split_whitespace().skip(1).filter_map(|kv| kv.split_once('=')).collect()).unwrap_or_default();
    let bad = |what: &str| Error::Tool(format!("the quiesce script's output has {what}; output was: {}", stdout.trim()));
    if fields.get("status") != Some(&"ok") {
        return Err(bad("no successful result line"));
    }
    if fields.get("token") != Some(&token) {
        return Err(bad(&format!("a result of another run (expected token {token})")));
    }
    let num = |k: &str| fields.get(k).and_then(|v| v.parse::<u64>().ok()).ok_or_else(|| bad(&format!("no number for {k}")));
    Ok(Quiesced {
        token: token.to_string(),
        chroma_version: fields.get("version").copied().unwrap_or_default().to_string(),
        paused_ms: num("paused_ms")?,
        bytes: num("bytes")?,
        was_running: fields.get("was_running") == Some(&"1"),
    })
}

/// The tags of a recovery point imgbuild takes.
pub fn recovery_point_tags(project: &str, chroma_version: &str, kind: &str) -> HashMap<String, String> {
    HashMap::from([
        (TAG_PROJECT.to_string(), project.to_string()),
        (TAG_VERSION.to_string(), chroma_version.to_string()),
        (TAG_KIND.to_string(), kind.to_string()),
    ])
}

/// An on-demand backup job, started.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub job_id: String,
    pub recovery_point_arn: String,
    pub state: String,
    pub size_bytes: Option<i64>,
}

/// Starts the AWS Backup job of the file system into the stack's vault, tagged, kept
/// `retention_days`. The idempotency token makes a retried call the same job.
pub async fn start_job(clients: &Clients, t: &Target, tags: HashMap<String, String>, retention_days: u32, token: &str) -> Result<Job> {
    let out = clients
        .backup
        .start_backup_job()
        .backup_vault_name(&t.vault)
        .resource_arn(&t.file_system_arn)
        .iam_role_arn(&t.role_arn)
        .idempotency_token(token)
        .set_recovery_point_tags(Some(tags))
        .lifecycle(aws_sdk_backup::types::Lifecycle::builder().delete_after_days(i64::from(retention_days)).build())
        .send()
        .await
        .map_err(|e| aws::err("StartBackupJob", t.file_system_id.clone(), e))?;
    let job_id = out.backup_job_id().ok_or_else(|| Error::Tool("StartBackupJob answered without a BackupJobId".into()))?.to_string();
    Ok(Job { job_id, recovery_point_arn: out.recovery_point_arn().unwrap_or_default().to_string(), state: "CREATED".into(), size_bytes: None })
}

/// Polls the job until it ends, within `waits.timeout`. A job that ends in any state but
/// COMPLETED is an error naming the state and AWS Backup's message.
pub async fn wait_job(clients: &Clients, mut job: Job, waits: Waits, progress: &Progress) -> Result<Job> {
    let started = Instant::now();
    let mut last = String::new();
    loop {
        let d =
            clients.backup.describe_backup_job().backup_job_id(&job.job_id).send().await.map_err(|e| aws::err("DescribeBackupJob", job.job_id.clone(), e))?;
        let state = d.state().map(|s| s.as_str().to_string()).unwrap_or_else(|| "UNKNOWN".into());
        if state != last {
            progress.line(&format!("backup job {}: {state}{}", job.job_id, d.percent_done().map(|p| format!(" ({p}%)")).unwrap_or_default()));
            last = state.clone();
        }
        job.state = state.clone();
        job.size_bytes = d.backup_size_in_bytes();
        if let Some(arn) = d.recovery_point_arn() {
            job.recovery_point_arn = arn.to_string();
        }
        match state.as_str() {
            "COMPLETED" => return Ok(job),
            "ABORTED" | "FAILED" | "EXPIRED" | "PARTIAL" | "ABORTING" => {
                return Err(Error::Tool(format!("backup job {} ended {state}: {}", job.job_id, d.status_message().unwrap_or("AWS Backup gave no reason"))));
            }
            _ => {}
        }
        if started.elapsed() + waits.poll > waits.timeout {
            return Err(Error::Timeout {
                what: format!("backup job {}", job.job_id),
                secs: waits.timeout.as_secs(),
                hint: "the job goes on in AWS Backup; `imgbuild backup list` shows its recovery point once it completes".into(),
            });
        }
        tokio::time::sleep(waits.poll).await;
    }
}

/// A recovery point of this project, as `backup list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RecoveryPoint {
    pub arn: String,
    pub created: String,
    pub status: String,
    pub size_bytes: Option<i64>,
    pub chroma_version: Option<String>,
    /// `consistent` (taken by `imgbuild backup` after the quiesce) or `scheduled` (the daily
    /// plan, while Chroma was serving).
    pub kind: Option<String>,
    /// The run that restored and verified it; None: never restored, so not called verified.
    pub verified: Option<String>,
    pub tags: BTreeMap<String, String>,
}

impl RecoveryPoint {
    pub fn consistent(&self) -> bool {
        self.kind.as_deref() == Some(KIND_CONSISTENT)
    }
}

/// The vault's recovery points of this file system that carry this project's tag, newest first.
pub async fn list(clients: &Clients, vault: &str, file_system_arn: Option<&str>, project: &str) -> Result<Vec<RecoveryPoint>> {
    let mut points = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let out = clients
            .backup
            .list_recovery_points_by_backup_vault()
            .backup_vault_name(vault)
            .set_by_resource_arn(file_system_arn.map(String::from))
            .set_next_token(next.take())
            .send()
            .await
            .map_err(|e| aws::err("ListRecoveryPointsByBackupVault", vault.to_string(), e))?;
        for rp in out.recovery_points() {
            let Some(arn) = rp.recovery_point_arn() else { continue };
            let tags = tags_of(clients, arn).await?;
            if tags.get(TAG_PROJECT).map(String::as_str) != Some(project) {
                continue;
            }
            points.push(RecoveryPoint {
                arn: arn.to_string(),
                created: rp.creation_date().map(|d| d.to_string()).unwrap_or_default(),
                status: rp.status().map(|s| s.as_str().to_string()).unwrap_or_default(),
                size_bytes: rp.backup_size_in_bytes(),
                chroma_version: tags.get(TAG_VERSION).cloned(),
                kind: tags.get(TAG_KIND).cloned(),
                verified: tags.get(TAG_VERIFIED).cloned(),
                tags,
            });
        }
        match out.next_token() {
            Some(t) if !t.is_empty() => next = Some(t.to_string()),
            _ => break,
        }
    }
    points.sort_by(|a, b| b.created.cmp(&a.created));
    Ok(points)
}

async fn tags_of(clients: &Clients, arn: &str) -> Result<BTreeMap<String, String>> {
    let out = clients.backup.list_tags().resource_arn(arn).send().await.map_err(|e| aws::err("ListTags", arn.to_string(), e))?;
    Ok(out.tags().map(|t| t.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default())
}

/// The whole consistent backup: quiesce through Run Command, then the tagged backup job.
#[derive(Debug, Clone, Serialize)]
pub struct Taken {
    pub target: Target,
    pub quiesced: Quiesced,
    /// Collections and counts of the copy, as recorded in the tags (None: could not be read).
    pub inventory: Option<inventory::Inventory>,
    pub job: Job,
}

pub async fn take(clients: &Clients, config: &Config, token: &str, waits: Waits, wait: bool, progress: &Progress) -> Result<Taken> {
    let t = target(clients, config.stack_name()).await?;
    progress.line(&format!("stopping Chroma on {} for a consistent copy of {}", t.instance_id, t.file_system_id));
    let inv = runcommand::run(
        clients,
        &t.instance_id,
        quiesce_commands(config, token),
        "imgbuild backup: consistent copy of Chroma's data",
        Duration::from_secs(QUIESCE_TIMEOUT_SECS),
        waits.poll,
    )
    .await?;
    let quiesced = parse_quiesced(&inv.stdout, token)?;
    progress.line(&format!("Chroma was unavailable for {:.1} s while {} bytes were copied", quiesced.paused_ms as f64 / 1000.0, quiesced.bytes));
    let mut tags = recovery_point_tags(&t.stack, &quiesced.chroma_version, KIND_CONSISTENT);
    // What the copy holds, read by a throw-away Chroma while the live one serves again; a
    // failure here costs the later verify, not the backup.
    let inventory = match inspect_copy(clients, config, &t, token, waits.poll).await {
        Ok(inv) => {
            progress.line(&format!("the copy holds {} collections, {} records", inv.len(), inv.values().sum::<u64>()));
            tags.extend(inventory::to_tags(&inv));
            Some(inv)
        }
        Err(e) => {
            progress.line(&format!("could not list the copy's collections ({e}); this recovery point cannot be verified later"));
            None
        }
    };
    let job = start_job(clients, &t, tags, config.backup.retention_days, token).await?;
    progress.line(&format!("backup job {} started into vault {}", job.job_id, t.vault));
    let job = if wait { wait_job(clients, job, waits, progress).await? } else { job };
    Ok(Taken { target: t, quiesced, inventory, job })
}

async fn inspect_copy(clients: &Clients, config: &Config, t: &Target, token: &str, poll: Duration) -> Result<inventory::Inventory> {
    let path = format!("{COPY_NAME}/{}", render::compose::EFS_DATA_SUBDIR);
    let commands = inventory::inspect_commands(config, inventory::Source::Live { path: &path }, token)?;
    let inv =
        runcommand::run(clients, &t.instance_id, commands, "imgbuild backup: list the copy's collections", Duration::from_secs(QUIESCE_TIMEOUT_SECS), poll)
            .await?;
    inventory::parse(&inv.stdout, token)
}

/// Restores the point just taken into a throw-away file system, verifies it against the
/// inventory recorded, deletes the throw-away file system, and tags the point verified when
/// every collection matches.
pub async fn verify_taken(clients: &Clients, config: &Config, taken: &Taken, token: &str, waits: Waits, progress: &Progress) -> Result<Vec<inventory::Check>> {
    let t = &taken.target;
    let point = restore::check_point(clients, t, &taken.job.recovery_point_arn).await?;
    let recorded = point.recorded.clone().ok_or_else(|| {
        Error::Tool(format!("recovery point {} has no record of its collections (the copy could not be listed): it cannot be verified", point.arn))
    })?;
    let (_, scratch) = restore::restore_into_new(clients, t, &point, token, waits, progress).await?;
    restore::name_file_system(clients, &scratch, &format!("{}-verify-{token}", t.stack)).await?;
    let verified = restore::promote(clients, config, t, &scratch, token, true, waits.poll, progress).await;
    // The scratch copy goes whatever the outcome: its mount targets are already removed.
    if let Err(e) = clients.efs.delete_file_system().file_system_id(&scratch).send().await {
        progress.line(&format!("could not delete the scratch file system {scratch}, delete it by hand: {}", aws::err("DeleteFileSystem", scratch.clone(), e)));
    }
    let (_, found) = verified?;
    let checks = inventory::compare(&recorded, &found.unwrap_or_default());
    if checks.iter().all(|c| c.ok) {
        clients
            .backup
            .tag_resource()
            .resource_arn(&point.arn)
            .tags(TAG_VERIFIED, token)
            .send()
            .await
            .map_err(|e| aws::err("TagResource", point.arn.clone(), e))?;
    }
    Ok(checks)
}
