//! `imgbuild gc`: what earlier runs of a project left behind in a region, found by the tags
//! imgbuild and CloudFormation put on what they make, and its removal one item at a time.
//!
//! Everything here errs towards keeping: a build instance whose bake still runs, a snapshot any
//! image of the account references, a change set being created or executed, a file system with
//! mount targets or named by a live stack are never candidates.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use aws_sdk_ec2::types::Filter;
use serde::Serialize;

use super::images::{TAG_BAKE_TOKEN, TAG_PROJECT};
use crate::aws::{self, Clients, code};
use crate::error::Result;
use crate::stack::{self, Waits};
use crate::ui::progress::Progress;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    BuildInstance,
    Snapshot,
    ChangeSet,
    EmptyStack,
    FileSystem,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::BuildInstance => "build instance",
            Kind::Snapshot => "snapshot",
            Kind::ChangeSet => "change set",
            Kind::EmptyStack => "empty stack",
            Kind::FileSystem => "file system",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Orphan {
    pub kind: Kind,
    /// The instance, snapshot, change set (ARN), stack or file system id.
    pub id: String,
    /// The stack a change set belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stack: Option<String>,
    /// Why it counts as left behind, for the listing.
    pub detail: String,
}

/// What belongs to the project, and what must stay.
#[derive(Debug, Clone)]
pub struct Scope {
    pub project: String,
    /// The project's stack names (the product's and the bake prerequisites'), also matched when
    /// a stack lost its tags.
    pub stacks: Vec<String>,
    /// The bake's automation document: a build instance whose bake still runs is its own.
    pub document: String,
    /// `efs.file_system_id` from the config: the next deploy reattaches it.
    pub keep_file_system: Option<String>,
    /// File systems created more recently than this are not candidates.
    pub older_than: Duration,
    pub now: SystemTime,
}

/// Everything left behind, build instances first and file systems last.
pub async fn find(clients: &Clients, scope: &Scope) -> Result<Vec<Orphan>> {
    let mut found = build_instances(clients, scope).await?;
    found.extend(snapshots(clients, scope).await?);
    let stacks = all_stacks(clients).await?;
    let ours: Vec<&aws_sdk_cloudformation::types::Stack> = stacks.iter().filter(|s| is_ours(s, scope)).collect();
    for s in &ours {
        found.extend(stack_leftovers(clients, s).await?);
    }
    found.extend(file_systems(clients, scope, &stacks).await?);
    Ok(found)
}

/// Build instances the project's bakes launched (tagged with the project and a bake token) that
/// no running automation execution owns: a bake that ended, failed or was killed before its
/// clean-up. DescribeAutomationExecutions is only asked when there is a candidate.
async fn build_instances(clients: &Clients, scope: &Scope) -> Result<Vec<Orphan>> {
    let mut candidates = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let page = clients
            .ec2
            .describe_instances()
            .filters(Filter::builder().name(format!("tag:{TAG_PROJECT}")).values(&scope.project).build())
            .filters(Filter::builder().name("tag-key").values(TAG_BAKE_TOKEN).build())
            .filters(
                Filter::builder()
                    .name("instance-state-name")
                    .set_values(Some(["pending", "running", "stopping", "stopped"].map(String::from).to_vec()))
                    .build(),
            )
            .set_next_token(next.take())
            .send()
            .await
            .map_err(|e| aws::err("DescribeInstances", format!("build instances tagged {TAG_PROJECT}={}", scope.project), e))?;
        for i in page.reservations().iter().flat_map(|r| r.instances()) {
            let token = i.tags().iter().find(|t| t.key() == Some(TAG_BAKE_TOKEN)).and_then(|t| t.value()).unwrap_or_default().to_string();
            let state = i.state().and_then(|s| s.name()).map(|n| n.as_str().to_string()).unwrap_or_default();
            if let Some(id) = i.instance_id() {
                candidates.push((id.to_string(), token, state));
            }
        }
        match page.next_token() {
            Some(t) if !t.is_empty() => next = Some(t.to_string()),
            _ => break,
        }
    }
    let mut found = Vec::new();
    for (id, token, state) in candidates {
        if super::running_with(clients, &scope.document, "BakeToken", &token).await?.is_some() {
            continue;
        }
        found.push(Orphan { kind: Kind::BuildInstance, id, stack: None, detail: format!("{state}, bake token {token}, no bake running with it") });
    }
    Ok(found)
}

/// The project's snapshots that no image of this account references (an image deregistered
/// without its snapshots, or a create-image that failed after the snapshot). Only `completed`
/// ones: a `pending` snapshot belongs to an image being made.
async fn snapshots(clients: &Clients, scope: &Scope) -> Result<Vec<Orphan>> {
    let mut used = BTreeSet::new();
    let mut next: Option<String> = None;
    loop {
        let page = clients
            .ec2
            .describe_images()
            .owners("self")
            .set_next_token(next.take())
            .send()
            .await
            .map_err(|e| aws::err("DescribeImages", "images owned by this account", e))?;
        for img in page.images() {
            for m in img.block_device_mappings() {
                if let Some(s) = m.ebs().and_then(|e| e.snapshot_id()) {
                    used.insert(s.to_string());
                }
            }
        }
        match page.next_token() {
            Some(t) if !t.is_empty() => next = Some(t.to_string()),
            _ => break,
        }
    }
    let mut found = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let page = clients
            .ec2
            .describe_snapshots()
            .owner_ids("self")
            .filters(Filter::builder().name(format!("tag:{TAG_PROJECT}")).values(&scope.project).build())
            .set_next_token(next.take())
            .send()
            .await
            .map_err(|e| aws::err("DescribeSnapshots", format!("snapshots tagged {TAG_PROJECT}={}", scope.project), e))?;
        for s in page.snapshots() {
            let Some(id) = s.snapshot_id() else { continue };
            let completed = s.state().map(|x| x.as_str()) == Some("completed");
            if completed && !used.contains(id) {
                found.push(Orphan {
                    kind: Kind::Snapshot,
                    id: id.to_string(),
                    stack: None,
                    detail: format!("{} GiB, no image uses it", s.volume_size().unwrap_or(0)),
                });
            }
        }
        match page.next_token() {
            Some(t) if !t.is_empty() => next = Some(t.to_string()),
            _ => break,
        }
    }
    Ok(found)
}

/// Every live stack of the region (DescribeStacks without a name lists them all, tags included;
/// deleted ones are not listed).
async fn all_stacks(clients: &Clients) -> Result<Vec<aws_sdk_cloudformation::types::Stack>> {
    let mut all = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let page = clients.cfn.describe_stacks().set_next_token(next.take()).send().await.map_err(|e| aws::err("DescribeStacks", "the region's stacks", e))?;
        all.extend(page.stacks().iter().cloned());
        match page.next_token() {
            Some(t) if !t.is_empty() => next = Some(t.to_string()),
            _ => break,
        }
    }
    Ok(all)
}

fn is_ours(s: &aws_sdk_cloudformation::types::Stack, scope: &Scope) -> bool {
    let tagged = s.tags().iter().any(|t| t.key() == Some(TAG_PROJECT) && t.value() == Some(scope.project.as_str()));
    tagged || scope.stacks.iter().any(|n| s.stack_name() == Some(n.as_str()))
}

/// A stack in REVIEW_IN_PROGRESS (a create change set never executed: the stack has no
/// resources) goes whole, its change sets with it; on any other stable stack, the change sets
/// nobody executed. A stack busy with an operation, or a change set still being created (a
/// deploy running now), keeps everything.
async fn stack_leftovers(clients: &Clients, s: &aws_sdk_cloudformation::types::Stack) -> Result<Vec<Orphan>> {
    let name = s.stack_name().unwrap_or_default().to_string();
    let status = stack::status_of(s);
    let review = status == "REVIEW_IN_PROGRESS";
    if !review && stack::phase(&status) == stack::Phase::InProgress {
        return Ok(Vec::new());
    }
    let mut sets = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let page = clients
            .cfn
            .list_change_sets()
            .stack_name(&name)
            .set_next_token(next.take())
            .send()
            .await
            .map_err(|e| aws::err("ListChangeSets", format!("stack {name}"), e))?;
        // Summaries carry their stack's name; checked, as some emulators list every stack's.
        sets.extend(page.summaries().iter().filter(|c| c.stack_name() == Some(name.as_str())).cloned());
        match page.next_token() {
            Some(t) if !t.is_empty() => next = Some(t.to_string()),
            _ => break,
        }
    }
    let busy = |c: &aws_sdk_cloudformation::types::ChangeSetSummary| {
        let st = c.status().map(|x| x.as_str()).unwrap_or_default();
        let ex = c.execution_status().map(|x| x.as_str()).unwrap_or_default();
        matches!(st, "CREATE_PENDING" | "CREATE_IN_PROGRESS" | "DELETE_PENDING" | "DELETE_IN_PROGRESS") || ex == "EXECUTE_IN_PROGRESS"
    };
    if sets.iter().any(busy) {
        return Ok(Vec::new());
    }
    if review {
        let detail = format!("REVIEW_IN_PROGRESS, no resources, {} change set(s) never executed", sets.len());
        return Ok(vec![Orphan { kind: Kind::EmptyStack, id: name, stack: None, detail }]);
    }
    Ok(sets
        .iter()
        // CloudFormation deletes a stack's change sets once one is executed; EXECUTE_COMPLETE
        // ones are history, not left behind.
        .filter(|c| c.execution_status().map(|x| x.as_str()) != Some("EXECUTE_COMPLETE"))
        .filter_map(|c| {
            let id = c.change_set_id().or(c.change_set_name())?.to_string();
            let detail = format!(
                "{} ({}, {})",
                c.change_set_name().unwrap_or_default(),
                c.status().map(|x| x.as_str()).unwrap_or("?"),
                c.execution_status().map(|x| x.as_str()).unwrap_or("?")
            );
            Some(Orphan { kind: Kind::ChangeSet, id, stack: Some(name.clone()), detail })
        })
        .collect())
}

/// File systems a stack of the project made and kept (`DeletionPolicy: Retain`), older than
/// `scope.older_than`, with no mount target and named by no live stack (its creator by tag, or
/// any stack's FileSystemId output or parameter) nor by the config.
async fn file_systems(clients: &Clients, scope: &Scope, stacks: &[aws_sdk_cloudformation::types::Stack]) -> Result<Vec<Orphan>> {
    let mut in_use: BTreeSet<String> = scope.keep_file_system.iter().cloned().collect();
    let mut live: BTreeSet<String> = BTreeSet::new();
    for s in stacks {
        live.insert(s.stack_name().unwrap_or_default().to_string());
        in_use.extend(stack::outputs_of(s).get("FileSystemId").cloned());
        in_use.extend(stack::parameters_of(s).get("FileSystemId").filter(|v| !v.is_empty()).cloned());
    }
    let cutoff = scope.now.checked_sub(scope.older_than).unwrap_or(SystemTime::UNIX_EPOCH);
    let mut found = Vec::new();
    for fs in stack::efs::every_file_system(clients, &format!("file systems of project {}", scope.project)).await? {
        let tag = |key: &str| fs.tags().iter().find(|t| t.key() == key).map(|t| t.value().to_string());
        let creator = tag("aws:cloudformation:stack-name");
        let ours = tag(TAG_PROJECT).as_deref() == Some(scope.project.as_str()) || creator.as_ref().is_some_and(|c| scope.stacks.contains(c));
        let id = fs.file_system_id().to_string();
        let available = fs.life_cycle_state().as_str() == "available";
        let created = SystemTime::try_from(*fs.creation_time()).unwrap_or(scope.now);
        let used = fs.number_of_mount_targets() > 0 || in_use.contains(&id) || creator.as_ref().is_some_and(|c| live.contains(c));
        if ours && available && !used && created <= cutoff {
            let size = fs.size_in_bytes().map(|s| s.value()).unwrap_or(0);
            let detail = format!(
                "created {}, {} bytes, no mount target, no stack uses it{}",
                fs.creation_time().fmt(aws_smithy_types::date_time::Format::DateTime).unwrap_or_default(),
                size,
                creator.map(|c| format!(" (made by stack {c})")).unwrap_or_default()
            );
            found.push(Orphan { kind: Kind::FileSystem, id, stack: None, detail });
        }
    }
    Ok(found)
}

/// Removes one item. Something already gone counts as removed.
pub async fn remove(clients: &Clients, o: &Orphan, waits: Waits, progress: &Progress) -> Result<()> {
    match o.kind {
        Kind::BuildInstance => match clients.ec2.terminate_instances().instance_ids(&o.id).send().await {
            Ok(_) => Ok(()),
            Err(e) if e.as_service_error().and_then(code) == Some("InvalidInstanceID.NotFound") => Ok(()),
            Err(e) => Err(aws::err("TerminateInstances", format!("instance {}", o.id), e)),
        },
        Kind::Snapshot => match clients.ec2.delete_snapshot().snapshot_id(&o.id).send().await {
            Ok(_) => Ok(()),
            Err(e) if e.as_service_error().and_then(code) == Some("InvalidSnapshot.NotFound") => Ok(()),
            Err(e) => Err(aws::err("DeleteSnapshot", format!("snapshot {}", o.id), e)),
        },
        Kind::ChangeSet => {
            let stack = o.stack.as_deref().unwrap_or_default();
            match clients.cfn.delete_change_set().change_set_name(&o.id).stack_name(stack).send().await {
                Ok(_) => Ok(()),
                Err(e) if e.as_service_error().and_then(code) == Some("ChangeSetNotFound") => Ok(()),
                Err(e) => Err(aws::err("DeleteChangeSet", format!("change set {} of stack {stack}", o.id), e)),
            }
        }
        Kind::EmptyStack => stack::delete_and_wait(&clients.cfn, &o.id, waits, progress).await,
        Kind::FileSystem => match clients.efs.delete_file_system().file_system_id(&o.id).send().await {
            Ok(_) => Ok(()),
            Err(e) if e.as_service_error().and_then(code) == Some("FileSystemNotFound") => Ok(()),
            Err(e) => Err(aws::err("DeleteFileSystem", format!("file system {}", o.id), e)),
        },
    }
}

/// `30d`, `12h`, `45m`, `90s`: the age `--older-than` takes.
pub fn parse_age(text: &str) -> std::result::Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("`{text}` is not an age: a number and a unit, as 30d, 12h, 45m or 90s"))?;
    let secs = match unit {
        "d" => n.checked_mul(86_400),
        "h" => n.checked_mul(3_600),
        "m" => n.checked_mul(60),
        "s" => Some(n),
        _ => None,
    };
    secs.map(Duration::from_secs).ok_or_else(|| format!("`{text}` is not an age: a number and a unit, as 30d, 12h, 45m or 90s"))
}
