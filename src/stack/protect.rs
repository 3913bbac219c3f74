//! Protection of a deployed stack: termination protection, the stack policy that keeps the data
//! from being replaced or deleted by an update, and the way out of UPDATE_ROLLBACK_FAILED.

use aws_sdk_cloudformation::Client;
use aws_sdk_cloudformation::types::{ResourceStatus, Stack};
use serde::Serialize;
use serde_json::json;

use crate::aws;
use crate::error::{Error, Result};
use crate::stack::changeset::Confirmer;
use crate::stack::{self, Change, EventFollower, Waits};
use crate::ui::progress::Progress;

/// The resource types whose replacement or removal loses Chroma's data (or its backups).
pub const DATA_TYPES: [&str; 2] = ["AWS::EFS::FileSystem", "AWS::Backup::BackupVault"];

/// What deploy asks of the stack besides its template.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Protection {
    /// Termination protection wanted on the stack (`stack.termination_protection`); None leaves
    /// it as it is.
    pub termination: Option<bool>,
    /// The stack policy to set: `stack_policy(protect_data)`; None leaves whatever the stack has.
    pub protect_data: Option<bool>,
    /// ExecuteChangeSet's DisableRollback: keep what failed, for debugging.
    pub disable_rollback: bool,
    /// Detect drift before an update and warn about drifted resources it overwrites.
    pub drift_check: bool,
}

/// The stack policy: every update allowed, except replacing or deleting the data's resources.
/// A stack policy cannot be removed, only replaced, so `protect_data: false` sets one that allows
/// everything. Shape and the ResourceType condition: "Prevent updates to stack resources"
/// (CloudFormation User Guide); once a policy is set, anything it does not allow is denied, hence
/// the Allow statement.
pub fn stack_policy(protect_data: bool) -> String {
    let allow = json!({ "Effect": "Allow", "Principal": "*", "Action": "Update:*", "Resource": "*" });
    let statements = if protect_data {
        vec![
            json!({
                "Effect": "Deny",
                "Principal": "*",
                "Action": ["Update:Replace", "Update:Delete"],
                "Resource": "*",
                "Condition": { "StringEquals": { "ResourceType": DATA_TYPES } }
            }),
            allow,
        ]
    } else {
        vec![allow]
    };
    json!({ "Statement": statements }).to_string()
}

/// The changes of a diff the data policy refuses: a data resource removed or certainly replaced.
pub fn refused_by_policy(changes: &[Change]) -> Vec<&Change> {
    changes.iter().filter(|c| DATA_TYPES.contains(&c.resource_type.as_str()) && (c.action == '-' || c.replacement.as_deref() == Some("True"))).collect()
}

/// Changes of a data resource that CloudFormation may or may not replace.
pub fn may_be_refused(changes: &[Change]) -> Vec<&Change> {
    changes.iter().filter(|c| DATA_TYPES.contains(&c.resource_type.as_str()) && c.replacement.as_deref() == Some("Conditional")).collect()
}

pub async fn set_policy(cfn: &Client, stack: &str, body: &str) -> Result<()> {
    cfn.set_stack_policy().stack_name(stack).stack_policy_body(body).send().await.map_err(|e| aws::err("SetStackPolicy", format!("stack {stack}"), e))?;
    Ok(())
}

pub fn termination_protected(s: &Stack) -> bool {
    s.enable_termination_protection() == Some(true)
}

/// Sets termination protection to `on` when the stack has it otherwise; says what it did.
pub async fn set_termination(cfn: &Client, s: &Stack, on: bool, progress: &Progress) -> Result<Option<String>> {
    if termination_protected(s) == on {
        return Ok(None);
    }
    let name = s.stack_name().unwrap_or_default();
    cfn.update_termination_protection()
        .stack_name(name)
        .enable_termination_protection(on)
        .send()
        .await
        .map_err(|e| aws::err("UpdateTerminationProtection", format!("stack {name}"), e))?;
    let said = if on {
        format!("termination protection turned on for stack {name}: DeleteStack now fails until it is turned off (`imgbuild destroy` does that, after asking)")
    } else {
        format!("termination protection turned off for stack {name}")
    };
    progress.line(&said);
    Ok(Some(said))
}

/// A resource an update rollback could not put back.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FailedResource {
    pub logical_id: String,
    pub resource_type: String,
    pub reason: Option<String>,
}

/// The resources in UPDATE_FAILED, the only ones ContinueUpdateRollback accepts to skip
/// (ContinueUpdateRollback, ResourcesToSkip: "Specify only resources that are in the
/// UPDATE_FAILED state").
pub async fn update_failed_resources(cfn: &Client, stack: &str) -> Result<Vec<FailedResource>> {
    let mut failed = Vec::new();
    let mut token = None;
    loop {
        let out = cfn
            .list_stack_resources()
            .stack_name(stack)
            .set_next_token(token)
            .send()
            .await
            .map_err(|e| aws::err("ListStackResources", format!("stack {stack}"), e))?;
        failed.extend(out.stack_resource_summaries().iter().filter(|r| r.resource_status() == Some(&ResourceStatus::UpdateFailed)).map(|r| FailedResource {
            logical_id: r.logical_resource_id().unwrap_or_default().to_string(),
            resource_type: r.resource_type().unwrap_or_default().to_string(),
            reason: r.resource_status_reason().map(String::from),
        }));
        token = out.next_token().map(String::from);
        if token.is_none() {
            return Ok(failed);
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RollbackContinued {
    pub stack: String,
    pub failed: Vec<FailedResource>,
    pub skipped: Vec<String>,
    pub status: String,
}

/// Resumes the rollback of a stack in UPDATE_ROLLBACK_FAILED, skipping the named resources once
/// the user confirmed them (CloudFormation then marks them UPDATE_COMPLETE without rolling them
/// back, so their real state may differ from the template's), and waits for it to settle.
pub async fn continue_rollback(
    cfn: &Client,
    name: &str,
    skip: &[String],
    yes: bool,
    confirmer: &dyn Confirmer,
    waits: Waits,
    progress: &Progress,
) -> Result<RollbackContinued> {
    let Some(s) = stack::describe(cfn, name).await? else {
        return Err(Error::Invalid(format!("stack {name} does not exist")));
    };
    let status = stack::status_of(&s);
    if matches!(status.as_str(), "CREATE_FAILED" | "UPDATE_FAILED") {
        if !skip.is_empty() {
            return Err(Error::Invalid(format!(
                "--skip: stack {name} is {status}, which rolls back whole (RollbackStack takes no resources to skip); run without --skip"
            )));
        }
        let what = if status == "CREATE_FAILED" {
            "its creation never completed, so CloudFormation deletes what it made, except what the template retains (the file system and the backup vault)"
        } else {
            "back to the last update that completed"
        };
        confirmed(yes, confirmer, progress, &format!("Roll back stack {name} from {status}: {what}?")).await?;
        return roll_back_failed(cfn, name, &status, waits, progress).await;
    }
    if status != "UPDATE_ROLLBACK_FAILED" {
        return Err(Error::Invalid(format!(
            "stack {name} is {status}, not UPDATE_ROLLBACK_FAILED (or CREATE_FAILED / UPDATE_FAILED after --disable-rollback): there is no rollback to continue"
        )));
    }
    let failed = update_failed_resources(cfn, name).await?;
    for f in &failed {
        progress.line(&format!("UPDATE_FAILED {} ({}): {}", f.logical_id, f.resource_type, f.reason.as_deref().unwrap_or("no reason given")));
    }
    let unknown: Vec<&String> = skip.iter().filter(|k| !failed.iter().any(|f| &f.logical_id == *k)).collect();
    if !unknown.is_empty() {
        let listed: Vec<&str> = failed.iter().map(|f| f.logical_id.as_str()).collect();
        return Err(Error::Invalid(format!(
            "--skip {}: not a resource of stack {name} in UPDATE_FAILED; the ones that can be skipped: {}",
            unknown.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
            if listed.is_empty() { "none".to_string() } else { listed.join(", ") }
        )));
    }
    let question = if skip.is_empty() {
        format!("Retry the rollback of stack {name} without skipping any resource?")
    } else {
        format!(
            "Continue the rollback of stack {name}, skipping {}? CloudFormation marks them rolled back without touching them: fix them by hand afterwards.",
            skip.join(", ")
        )
    };
    confirmed(yes, confirmer, progress, &question).await?;
    let mut follower = EventFollower::start(cfn, name).await?;
    cfn.continue_update_rollback()
        .stack_name(name)
        .set_resources_to_skip((!skip.is_empty()).then(|| skip.to_vec()))
        .send()
        .await
        .map_err(|e| aws::err("ContinueUpdateRollback", format!("stack {name}"), e))?;
    let status = stack::wait_stable(cfn, name, &mut follower, waits, progress).await?;
    if status != "UPDATE_ROLLBACK_COMPLETE" {
        return Err(Error::StackFailed { stack: name.into(), status, failures: follower.failures });
    }
    Ok(RollbackContinued { stack: name.into(), failed, skipped: skip.to_vec(), status })
}

/// `--yes`, or the user's yes to `question`; anything else leaves the stack alone.
async fn confirmed(yes: bool, confirmer: &dyn Confirmer, progress: &Progress, question: &str) -> Result<()> {
    if yes {
        return Ok(());
    }
    progress.pause();
    let answer = confirmer.confirm(question).await;
    progress.resume();
    if answer? { Ok(()) } else { Err(Error::Invalid("not confirmed: the stack was left as it is".into())) }
}

/// What `deploy --disable-rollback` left in CREATE_FAILED or UPDATE_FAILED, rolled back with
/// RollbackStack (CloudFormation API reference: "Rolls back the specified stack to the last known
/// stable state from CREATE_FAILED or UPDATE_FAILED stack statuses. This operation will delete a
/// stack if it doesn't contain a last known stable state"). RetainExceptOnCreate is sent false:
/// true would delete newly created resources even under a Retain deletion policy, the file system
/// and the backup vault included.
async fn roll_back_failed(cfn: &Client, name: &str, status: &str, waits: Waits, progress: &Progress) -> Result<RollbackContinued> {
    // From CREATE_FAILED there is no stable state to return to: the API reference says the stack
    // is deleted, which reads as ROLLBACK_COMPLETE (resources gone, the stack kept, as after a
    // create that rolled back) or as the stack gone: either is the end asked for.
    let ends: &[&str] = if status == "CREATE_FAILED" { &["ROLLBACK_COMPLETE", "DELETE_COMPLETE"] } else { &["UPDATE_ROLLBACK_COMPLETE"] };
    let mut follower = EventFollower::start(cfn, name).await?;
    cfn.rollback_stack().stack_name(name).retain_except_on_create(false).send().await.map_err(|e| aws::err("RollbackStack", format!("stack {name}"), e))?;
    let settled = stack::wait_stable(cfn, name, &mut follower, waits, progress).await?;
    if !ends.contains(&settled.as_str()) {
        return Err(Error::StackFailed { stack: name.into(), status: settled, failures: follower.failures });
    }
    Ok(RollbackContinued { stack: name.into(), failed: Vec::new(), skipped: Vec::new(), status: settled })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(action: char, kind: &str, replacement: Option<&str>) -> Change {
        Change { action, logical_id: "X".into(), resource_type: kind.into(), replacement: replacement.map(String::from) }
    }

    #[test]
    fn only_removal_or_certain_replacement_of_data_is_refused() {
        let changes = [
            change('-', "AWS::EFS::FileSystem", None),
            change('~', "AWS::Backup::BackupVault", Some("True")),
            change('~', "AWS::EFS::FileSystem", Some("False")),
            change('~', "AWS::EFS::FileSystem", Some("Conditional")),
            change('-', "AWS::EC2::Instance", None),
        ];
        assert_eq!(refused_by_policy(&changes).len(), 2);
        assert_eq!(may_be_refused(&changes).len(), 1);
    }
}
