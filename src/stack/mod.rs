//! The CloudFormation engine, shared by deploy, bake's prerequisites stack and status/destroy:
//! reading a stack's state, change sets and their diff, following events, bounded waits (this
//! file); the template and its one edit (`template`); the change-set flow with its cleanup
//! (`changeset`); status and destroy (`ops`); the alarms that are an update's rollback triggers
//! (`alarms`). Knows AWS and the UI's progress, not the CLI.

pub mod alarms;
pub mod changeset;
pub mod drift;
pub mod efs;
pub mod fleet;
pub mod ops;
pub mod protect;
pub mod template;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use aws_sdk_cloudformation::Client;
use aws_sdk_cloudformation::types::{ChangeAction, ChangeSetStatus, Replacement, Stack};
use serde::Serialize;

use crate::aws::{self, code};
use crate::error::{Error, Result};
use crate::ui::progress::Progress;

/// How long and how often to wait.
#[derive(Debug, Clone, Copy)]
pub struct Waits {
    pub timeout: Duration,
    pub poll: Duration,
}

/// What a stack status means for the next operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Created and stable: updates go through an UPDATE change set.
    Stable,
    /// Exists only as the target of a CREATE change set that was never executed.
    ReviewInProgress,
    /// Creation failed and rolled back: nothing is left but the empty stack, which can only be
    /// deleted.
    RollbackComplete,
    /// An operation is running.
    InProgress,
    /// A failed state that needs a person (UPDATE_ROLLBACK_FAILED, DELETE_FAILED, ...).
    Failed,
    Deleted,
}

pub fn phase(status: &str) -> Phase {
    match status {
        "REVIEW_IN_PROGRESS" => Phase::ReviewInProgress,
        "ROLLBACK_COMPLETE" => Phase::RollbackComplete,
        "DELETE_COMPLETE" => Phase::Deleted,
        s if s.ends_with("_IN_PROGRESS") => Phase::InProgress,
        s if s.ends_with("_FAILED") => Phase::Failed,
        _ => Phase::Stable,
    }
}

/// Statuses that end an operation successfully.
pub fn succeeded(status: &str) -> bool {
    matches!(status, "CREATE_COMPLETE" | "UPDATE_COMPLETE" | "IMPORT_COMPLETE" | "DELETE_COMPLETE")
}

/// Statuses that end an operation in failure (rolled back, or failed outright).
pub fn failed(status: &str) -> bool {
    matches!(status, "ROLLBACK_COMPLETE" | "UPDATE_ROLLBACK_COMPLETE" | "IMPORT_ROLLBACK_COMPLETE") || status.ends_with("_FAILED")
}

/// The stack, or None when CloudFormation has none by that name. DescribeStacks answers a
/// missing stack with the code ValidationError; the name was validated before, so that code
/// means "no such stack" here.
pub async fn describe(cfn: &Client, name: &str) -> Result<Option<Stack>> {
    match cfn.describe_stacks().stack_name(name).send().await {
        Ok(out) => Ok(out.stacks().first().cloned().filter(|s| s.stack_status().is_some_and(|st| st.as_str() != "DELETE_COMPLETE"))),
        Err(e) if e.as_service_error().and_then(code) == Some("ValidationError") => Ok(None),
        Err(e) => Err(aws::err("DescribeStacks", format!("stack {name}"), e)),
    }
}

pub fn status_of(stack: &Stack) -> String {
    stack.stack_status().map(|s| s.as_str().to_string()).unwrap_or_default()
}

pub fn outputs_of(stack: &Stack) -> BTreeMap<String, String> {
    stack.outputs().iter().filter_map(|o| Some((o.output_key()?.to_string(), o.output_value().unwrap_or_default().to_string()))).collect()
}

/// One row of the diff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// `+` add, `~` modify, `-` remove, `>` import, `?` dynamic.
    pub action: char,
    pub logical_id: String,
    pub resource_type: String,
    /// For modifications: `True`, `Conditional` or `False`.
    pub replacement: Option<String>,
}

impl Change {
    pub fn line(&self) -> String {
        let replace = match self.replacement.as_deref() {
            Some("True") => "  (REPLACEMENT)",
            Some("Conditional") => "  (may be replaced)",
            _ => "",
        };
        format!("  {} {} ({}){replace}", self.action, self.logical_id, self.resource_type)
    }
}

/// The outcome of waiting for a change set to be computed.
#[derive(Debug, Clone)]
pub enum ChangeSetReady {
    Changes(Vec<Change>),
    /// CloudFormation could not make it; its reason, and whether it listed any change.
    Failed {
        reason: String,
        any_changes: bool,
    },
}

pub async fn wait_change_set(cfn: &Client, id: &str, waits: Waits, progress: &Progress) -> Result<ChangeSetReady> {
    let deadline = Instant::now() + waits.timeout;
    loop {
        let out = cfn.describe_change_set().change_set_name(id).send().await.map_err(|e| aws::err("DescribeChangeSet", format!("change set {id}"), e))?;
        let status = out.status().cloned();
        match status {
            Some(ChangeSetStatus::CreateComplete) => return Ok(ChangeSetReady::Changes(all_changes(cfn, id, out).await?)),
            Some(ChangeSetStatus::Failed) => {
                return Ok(ChangeSetReady::Failed {
                    reason: out.status_reason().unwrap_or("no reason given").to_string(),
                    any_changes: !out.changes().is_empty(),
                });
            }
            other => progress.set(&format!("change set: {}", other.map(|s| s.as_str().to_string()).unwrap_or_default())),
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!("change set {id}"),
                secs: waits.timeout.as_secs(),
                hint: "raise aws.stack_timeout_secs or --timeout".into(),
            });
        }
        tokio::time::sleep(waits.poll).await;
    }
}

async fn all_changes(cfn: &Client, id: &str, first: aws_sdk_cloudformation::operation::describe_change_set::DescribeChangeSetOutput) -> Result<Vec<Change>> {
    let mut changes = Vec::new();
    let mut page = first;
    loop {
        for c in page.changes() {
            let Some(rc) = c.resource_change() else { continue };
            let action = match rc.action() {
                Some(ChangeAction::Add) => '+',
                Some(ChangeAction::Modify) => '~',
                Some(ChangeAction::Remove) => '-',
                Some(ChangeAction::Import) => '>',
                _ => '?',
            };
            let replacement = match (rc.action(), rc.replacement()) {
                (Some(ChangeAction::Modify), Some(r)) => Some(match r {
                    Replacement::True => "True",
                    Replacement::Conditional => "Conditional",
                    _ => "False",
                }),
                _ => None,
            };
            changes.push(Change {
                action,
                logical_id: rc.logical_resource_id().unwrap_or_default().to_string(),
                resource_type: rc.resource_type().unwrap_or_default().to_string(),
                replacement: replacement.map(String::from),
            });
        }
        let Some(token) = page.next_token().map(String::from) else { break };
        page = cfn
            .describe_change_set()
            .change_set_name(id)
            .next_token(token)
            .send()
            .await
            .map_err(|e| aws::err("DescribeChangeSet", format!("change set {id}"), e))?;
    }
    Ok(changes)
}

pub async fn delete_change_set(cfn: &Client, id: &str) -> Result<()> {
    match cfn.delete_change_set().change_set_name(id).send().await {
        Ok(_) => Ok(()),
        // Already gone (executed or deleted): nothing to clean.
        Err(e) if e.as_service_error().and_then(code) == Some("ChangeSetNotFound") => Ok(()),
        Err(e) => Err(aws::err("DeleteChangeSet", format!("change set {id}"), e)),
    }
}

/// Follows a stack's events from the moment it is made, printing each new one once.
pub struct EventFollower {
    stack: String,
    seen: HashSet<String>,
    /// Resources that failed, with CloudFormation's reason.
    pub failures: Vec<String>,
    /// The reasons the stack's own events gave (a rollback trigger's alarm is named there).
    pub stack_reasons: Vec<String>,
}

impl EventFollower {
    /// Marks every event that already exists as seen, so only this operation's are shown.
    pub async fn start(cfn: &Client, stack: &str) -> Result<Self> {
        let mut f = Self { stack: stack.into(), seen: HashSet::new(), failures: Vec::new(), stack_reasons: Vec::new() };
        for e in f.fetch(cfn).await? {
            if let Some(id) = e.event_id() {
                f.seen.insert(id.to_string());
            }
        }
        Ok(f)
    }

    async fn fetch(&self, cfn: &Client) -> Result<Vec<aws_sdk_cloudformation::types::StackEvent>> {
        // The newest page is enough between two polls a few seconds apart.
        match cfn.describe_stack_events().stack_name(&self.stack).send().await {
            Ok(out) => Ok(out.stack_events().to_vec()),
            Err(e) if e.as_service_error().and_then(code) == Some("ValidationError") => Ok(Vec::new()),
            Err(e) => Err(aws::err("DescribeStackEvents", format!("stack {}", self.stack), e)),
        }
    }

    /// Prints the events that are new since the last call, oldest first.
    pub async fn poll(&mut self, cfn: &Client, progress: &Progress) -> Result<()> {
        let events = self.fetch(cfn).await?;
        for e in events.iter().rev() {
            let Some(id) = e.event_id() else { continue };
            if !self.seen.insert(id.to_string()) {
                continue;
            }
            let status = e.resource_status().map(|s| s.as_str()).unwrap_or_default();
            let logical = e.logical_resource_id().unwrap_or_default();
            let kind = e.resource_type().unwrap_or_default();
            let reason = e.resource_status_reason().unwrap_or_default();
            let mut line = format!("{status:<28} {logical} ({kind})");
            if !reason.is_empty() {
                line.push_str(&format!(": {reason}"));
            }
            progress.line(&line);
            let is_stack_itself = kind == "AWS::CloudFormation::Stack";
            if is_stack_itself && !reason.is_empty() {
                self.stack_reasons.push(reason.to_string());
            }
            if status.ends_with("_FAILED") && !is_stack_itself && !reason.is_empty() {
                self.failures.push(format!("{logical} ({kind}): {reason}"));
            }
        }
        Ok(())
    }
}

/// Waits until the stack leaves `*_IN_PROGRESS`, printing events, within `waits.timeout`.
/// Returns the final status (`DELETE_COMPLETE` when it is gone).
pub async fn wait_stable(cfn: &Client, stack: &str, follower: &mut EventFollower, waits: Waits, progress: &Progress) -> Result<String> {
    wait_until_settled(cfn, stack, follower, waits, progress, false).await
}

/// Like `wait_stable`, right after executing a change set: until the execution shows,
/// a never-created stack may still read REVIEW_IN_PROGRESS, which is not an end state then.
pub async fn wait_executed(cfn: &Client, stack: &str, follower: &mut EventFollower, waits: Waits, progress: &Progress) -> Result<String> {
    wait_until_settled(cfn, stack, follower, waits, progress, true).await
}

/// How long a just-executed stack may still read REVIEW_IN_PROGRESS before that is an answer.
pub const REVIEW_GRACE: Duration = Duration::from_secs(60);

async fn wait_until_settled(
    cfn: &Client,
    stack: &str,
    follower: &mut EventFollower,
    waits: Waits,
    progress: &Progress,
    review_pending: bool,
) -> Result<String> {
    let started = Instant::now();
    let deadline = started + waits.timeout;
    loop {
        follower.poll(cfn, progress).await?;
        let status = match describe(cfn, stack).await? {
            Some(s) => status_of(&s),
            None => "DELETE_COMPLETE".to_string(),
        };
        let running = match phase(&status) {
            Phase::InProgress => true,
            Phase::ReviewInProgress => review_pending && started.elapsed() < REVIEW_GRACE.min(waits.timeout),
            _ => false,
        };
        if !running {
            follower.poll(cfn, progress).await?;
            return Ok(status);
        }
        progress.set(&format!("stack {stack}: {status}"));
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!("stack {stack} (still {status})"),
                secs: waits.timeout.as_secs(),
                hint: "the operation goes on in CloudFormation; check on it with `imgbuild status`, or raise aws.stack_timeout_secs / --timeout".into(),
            });
        }
        tokio::time::sleep(waits.poll).await;
    }
}

/// Deletes the stack and waits until it is gone.
pub async fn delete_and_wait(cfn: &Client, stack: &str, waits: Waits, progress: &Progress) -> Result<()> {
    let mut follower = EventFollower::start(cfn, stack).await?;
    cfn.delete_stack().stack_name(stack).send().await.map_err(|e| aws::err("DeleteStack", format!("stack {stack}"), e))?;
    let status = wait_stable(cfn, stack, &mut follower, waits, progress).await?;
    if status == "DELETE_COMPLETE" { Ok(()) } else { Err(Error::StackFailed { stack: stack.into(), status, failures: follower.failures }) }
}

/// The parameters a stack was last deployed with.
pub fn parameters_of(stack: &Stack) -> BTreeMap<String, String> {
    stack.parameters().iter().filter_map(|p| Some((p.parameter_key()?.to_string(), p.parameter_value().unwrap_or_default().to_string()))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_phases() {
        assert_eq!(phase("CREATE_COMPLETE"), Phase::Stable);
        assert_eq!(phase("UPDATE_ROLLBACK_COMPLETE"), Phase::Stable);
        assert_eq!(phase("ROLLBACK_COMPLETE"), Phase::RollbackComplete);
        assert_eq!(phase("REVIEW_IN_PROGRESS"), Phase::ReviewInProgress);
        assert_eq!(phase("UPDATE_COMPLETE_CLEANUP_IN_PROGRESS"), Phase::InProgress);
        assert_eq!(phase("UPDATE_ROLLBACK_FAILED"), Phase::Failed);
        assert!(failed("ROLLBACK_COMPLETE") && failed("UPDATE_ROLLBACK_COMPLETE") && failed("CREATE_FAILED"));
        assert!(succeeded("UPDATE_COMPLETE") && !succeeded("UPDATE_ROLLBACK_COMPLETE"));
    }

    #[test]
    fn diff_lines_mark_replacements() {
        let c = Change { action: '~', logical_id: "LaunchTemplate".into(), resource_type: "AWS::EC2::LaunchTemplate".into(), replacement: Some("True".into()) };
        assert_eq!(c.line(), "  ~ LaunchTemplate (AWS::EC2::LaunchTemplate)  (REPLACEMENT)");
    }
}
