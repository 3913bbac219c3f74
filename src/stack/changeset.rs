//! `imgbuild deploy`: check the stack's state, create a change set, show the diff, confirm,
//! execute, follow events, print outputs. "No changes" is success. What it creates is recorded
//! the moment it exists, so Ctrl-C or a failure removes it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aws_sdk_cloudformation::types::{Capability, ChangeSetType, Parameter, Tag};
use serde::Serialize;

use crate::aws::{self, Clients, code};
use crate::error::{Error, Result};
use crate::stack::alarms::{self, Watch};
use crate::stack::protect::{self, Protection};
use crate::stack::{self, Change, ChangeSetReady, EventFollower, Phase, Waits};
use crate::ui::progress::Progress;

/// How the user agreed to execute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirm {
    /// `--yes`.
    Yes,
    /// Ask on the terminal (refused without one).
    Prompt,
    /// `--no-execute`: leave the change set for review.
    NoExecute,
}

/// A validated deploy: everything decided, nothing left to look up but the stack itself.
#[derive(Debug, Clone)]
pub struct Plan {
    pub stack: String,
    pub template_body: String,
    pub parameters: BTreeMap<String, String>,
    pub tags: BTreeMap<String, String>,
    pub confirm: Confirm,
    /// Wait for an operation already running instead of refusing.
    pub wait_if_busy: bool,
    pub waits: Waits,
    /// Makes the change set name unique and the create call idempotent on retry.
    pub token: String,
    /// Lines printed under the diff, before the question (the cost of the change, from a layer
    /// above this one).
    pub annotate: Option<Annotate>,
    /// The stack's alarms as the update's rollback triggers (`alarms`).
    pub rollback: alarms::Rollback,
}

/// What the caller says about a computed change set; it runs between the diff and the
/// confirmation, and may ask AWS (the cost's prices), so it must bound its own time.
#[derive(Clone)]
pub struct Annotate(pub Arc<AnnotateFn>);

pub type AnnotateFn = dyn Fn(Vec<Change>) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<String>> + Send>> + Send + Sync;

impl std::fmt::Debug for Annotate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Annotate(..)")
    }
}

/// What exists because of this run and must not outlive a failure or Ctrl-C.
#[derive(Debug, Default, Clone)]
pub struct Created {
    /// The change set, until it is executed or deleted.
    pub change_set: Option<String>,
    /// (stack, name) of a change set whose create request went out before its id came back.
    pub requested: Option<(String, String)>,
    /// The stack, when this run created it in REVIEW_IN_PROGRESS (an empty shell that only
    /// holds the change set).
    pub review_stack: Option<String>,
    pub executed: bool,
}

pub type Cleanup = Arc<Mutex<Created>>;

#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub stack: String,
    pub status: String,
    pub change_set: Option<String>,
    pub changes: Vec<Change>,
    pub no_changes: bool,
    pub executed: bool,
    pub outputs: BTreeMap<String, String>,
    /// Notices given on the way (e.g. a failed empty stack was replaced).
    pub notices: Vec<String>,
    /// The rollback configuration the change set carried (null: none was sent).
    pub rollback: Option<Watch>,
}

/// Asks the user; separate so tests can answer. Async, so Ctrl-C is heard while it waits.
pub trait Confirmer: Send + Sync {
    fn confirm<'a>(&'a self, question: &'a str) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool>> + Send + 'a>>;
}

/// Asks on the terminal; refuses where there is none (CI, pipes), so nothing hangs.
pub struct TtyConfirmer;

impl Confirmer for TtyConfirmer {
    fn confirm<'a>(&'a self, question: &'a str) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool>> + Send + 'a>> {
        Box::pin(async move {
            use std::io::IsTerminal;
            if !std::io::stdin().is_terminal() {
                return Err(Error::Invalid(
                    "refusing to prompt: standard input is not a terminal; pass --yes to go ahead, or --no-execute to leave the change set for review".into(),
                ));
            }
            let question = question.to_string();
            tokio::task::spawn_blocking(move || {
                eprint!("{question} [y/N] ");
                let mut line = String::new();
                std::io::stdin().read_line(&mut line).map(|_| matches!(line.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
            })
            .await
            .map_err(|e| Error::Tool(format!("prompt: {e}")))?
            .map_err(|e| Error::io("reading", "stdin", e))
        })
    }
}

pub async fn run(clients: &Clients, plan: &Plan, progress: &Progress, cleanup: &Cleanup, confirmer: &dyn Confirmer) -> Result<Outcome> {
    run_protected(clients, plan, &Protection::default(), progress, cleanup, confirmer).await
}

/// `run`, with the stack's protection: the stack policy goes on before an update executes (it
/// only guards updates, so it must be there when this one runs) and right after a create (a
/// stack in REVIEW_IN_PROGRESS is ours to delete on failure); termination protection once the
/// stack exists for good; ExecuteChangeSet's DisableRollback when asked.
pub async fn run_protected(
    clients: &Clients,
    plan: &Plan,
    protection: &Protection,
    progress: &Progress,
    cleanup: &Cleanup,
    confirmer: &dyn Confirmer,
) -> Result<Outcome> {
    let cfn = &clients.cfn;
    let mut notices = Vec::new();

    // 1. Where the stack stands (again after waiting: it may settle anywhere).
    let mut existing = stack::describe(cfn, &plan.stack).await?;
    let mut waited = false;
    let mut preserve_failed = false;
    while let Some(s) = &existing {
        let status = stack::status_of(s);
        match stack::phase(&status) {
            Phase::InProgress if plan.wait_if_busy && !waited => {
                progress.line(&format!("stack {} is {status}; waiting for it to settle (--wait)", plan.stack));
                let mut f = EventFollower::start(cfn, &plan.stack).await?;
                stack::wait_stable(cfn, &plan.stack, &mut f, plan.waits, progress).await?;
                existing = stack::describe(cfn, &plan.stack).await?;
                waited = true;
            }
            Phase::InProgress => {
                return Err(Error::Invalid(format!("stack {} is {status}: another operation is running; wait for it (or pass --wait)", plan.stack)));
            }
            Phase::Failed if status == "UPDATE_ROLLBACK_FAILED" => {
                return Err(Error::Invalid(format!(
                    "stack {} is UPDATE_ROLLBACK_FAILED, which needs a person: the rollback of the last update could not put every resource back. `imgbuild continue-rollback` retries it (`--skip ID,...` for resources fixed by hand; it names the ones that failed)",
                    plan.stack
                )));
            }
            // What `--disable-rollback` left: CloudFormation takes a change set for a stack in
            // CREATE_FAILED or UPDATE_FAILED, and requires the update to preserve what was
            // provisioned too ("Stack failure options", CloudFormation User Guide: "When you update
            // a stack that's in a FAILED state, you must select Preserve successfully provisioned
            // resources"), so it executes with DisableRollback.
            Phase::Failed if matches!(status.as_str(), "CREATE_FAILED" | "UPDATE_FAILED") => {
                let notice = format!(
                    "stack {} is {status} (kept by --disable-rollback): updating it from there, keeping what was made, as CloudFormation requires; `imgbuild continue-rollback` rolls it back instead",
                    plan.stack
                );
                progress.line(&notice);
                notices.push(notice);
                preserve_failed = true;
                break;
            }
            Phase::Failed => {
                return Err(Error::Invalid(format!(
                    "stack {} is {status}, which needs a person: see its events (`imgbuild status`) and the CloudFormation console; deploy cannot continue from there",
                    plan.stack
                )));
            }
            Phase::RollbackComplete => {
                let notice =
                    format!("stack {} is ROLLBACK_COMPLETE: its creation failed and it holds no resources; deleting it and creating it again", plan.stack);
                progress.line(&notice);
                notices.push(notice);
                stack::delete_and_wait(cfn, &plan.stack, plan.waits, progress).await?;
                existing = None;
            }
            Phase::Stable | Phase::ReviewInProgress | Phase::Deleted => break,
        }
    }
    let kind = match existing.as_ref().map(stack::status_of).as_deref().map(stack::phase) {
        None | Some(Phase::ReviewInProgress) => ChangeSetType::Create,
        _ => ChangeSetType::Update,
    };
    let creates_stack = existing.is_none();
    let is_create = kind == ChangeSetType::Create;
    let watch = alarms::plan(clients, existing.as_ref(), is_create, plan.rollback, progress, &mut notices).await;

    // 2. The change set, recorded as soon as it exists.
    progress.set(&format!("creating {} change set for {}", kind.as_str(), plan.stack));
    let name = format!("imgbuild-{}", plan.token);
    {
        // Recorded before the request leaves: a Ctrl-C while it is on the wire must still find it.
        let mut c = cleanup.lock().expect("cleanup lock");
        c.requested = Some((plan.stack.clone(), name.clone()));
        if creates_stack {
            c.review_stack = Some(plan.stack.clone());
        }
    }
    let out = cfn
        .create_change_set()
        .stack_name(&plan.stack)
        .change_set_name(&name)
        .change_set_type(kind.clone())
        .template_body(&plan.template_body)
        .set_parameters(Some(plan.parameters.iter().map(|(k, v)| Parameter::builder().parameter_key(k).parameter_value(v).build()).collect()))
        .capabilities(Capability::CapabilityIam)
        .set_tags(Some(plan.tags.iter().map(|(k, v)| Tag::builder().key(k).value(v).build()).collect()))
        .client_token(&plan.token)
        .set_rollback_configuration(watch.as_ref().map(Watch::configuration))
        .description("imgbuild deploy")
        .send()
        .await
        .map_err(|e| {
            // Refused: no change set exists to look for.
            cleanup.lock().expect("cleanup lock").requested = None;
            aws::err("CreateChangeSet", format!("stack {}", plan.stack), e)
        })?;
    let id = out.id().unwrap_or(&name).to_string();
    cleanup.lock().expect("cleanup lock").change_set = Some(id.clone());

    // 3. The diff. "No changes" is decided on facts, not on CloudFormation's message text: the
    // change set lists nothing and the stack already has this template and these parameters.
    let no_changes = |existing: Option<&aws_sdk_cloudformation::types::Stack>, notices: Vec<String>| {
        let s = existing.expect("only an update can be unchanged");
        Outcome {
            stack: plan.stack.clone(),
            status: stack::status_of(s),
            change_set: None,
            changes: Vec::new(),
            no_changes: true,
            executed: false,
            outputs: stack::outputs_of(s),
            notices,
            rollback: None,
        }
    };
    let changes = match stack::wait_change_set(cfn, &id, plan.waits, progress).await? {
        ChangeSetReady::Changes(c) if c.is_empty() && !creates_stack && same_as_deployed(clients, plan, existing.as_ref()).await? => {
            stack::delete_change_set(cfn, &id).await?;
            cleanup.lock().expect("cleanup lock").change_set = None;
            progress.line(&format!("no changes: stack {} already matches", plan.stack));
            let mut outcome = no_changes(existing.as_ref(), notices);
            protect_existing(cfn, existing.as_ref(), protection, true, progress, &mut outcome.notices).await?;
            return Ok(outcome);
        }
        ChangeSetReady::Changes(c) => c,
        ChangeSetReady::Failed { reason, any_changes } => {
            let unchanged = !any_changes && !creates_stack && same_as_deployed(clients, plan, existing.as_ref()).await?;
            stack::delete_change_set(cfn, &id).await?;
            cleanup.lock().expect("cleanup lock").change_set = None;
            if unchanged {
                progress.line(&format!("no changes: stack {} already matches", plan.stack));
                let mut outcome = no_changes(existing.as_ref(), notices);
                protect_existing(cfn, existing.as_ref(), protection, true, progress, &mut outcome.notices).await?;
                return Ok(outcome);
            }
            return Err(Error::Invalid(format!("CloudFormation could not make a change set for {}: {reason}", plan.stack)));
        }
    };
    progress.line(&format!("change set {name} for {} ({} change{}):", plan.stack, changes.len(), if changes.len() == 1 { "" } else { "s" }));
    for c in &changes {
        progress.line(&c.line());
    }
    if let Some(annotate) = &plan.annotate {
        for l in (annotate.0)(changes.clone()).await {
            progress.line(&l);
        }
    }
    if protection.drift_check && !is_create && !changes.is_empty() {
        warn_overwritten_drift(cfn, &plan.stack, &changes, plan.waits, progress, &mut notices).await;
    }
    if protection.protect_data == Some(true) && !creates_stack {
        let refused = protect::refused_by_policy(&changes);
        if !refused.is_empty() {
            let names: Vec<String> = refused.iter().map(|c| format!("{} ({})", c.logical_id, c.resource_type)).collect();
            remove_created(&clients.for_cleanup(), cleanup).await?;
            return Err(Error::Invalid(format!(
                "this change set would {} {}, which holds Chroma's data; the stack policy refuses that, so nothing was executed (the change set was deleted). If that is really meant, deploy once with stack.protect_data: false",
                if refused.iter().all(|c| c.action == '-') { "delete" } else { "replace or delete" },
                names.join(", ")
            )));
        }
        for c in protect::may_be_refused(&changes) {
            progress
                .line(&format!("note: {} ({}) may be replaced; the stack policy would then refuse it and the update roll back", c.logical_id, c.resource_type));
        }
    }

    // 4. Confirm.
    let go = match plan.confirm {
        Confirm::Yes => true,
        Confirm::NoExecute => {
            progress.line(&format!(
                "--no-execute: change set {id} is left for review; execute it with `aws cloudformation execute-change-set --change-set-name {id}`"
            ));
            // The user asked to keep it: no longer ours to clean.
            *cleanup.lock().expect("cleanup lock") = Created::default();
            return Ok(Outcome {
                stack: plan.stack.clone(),
                status: existing.as_ref().map(stack::status_of).unwrap_or_else(|| "REVIEW_IN_PROGRESS".into()),
                change_set: Some(id),
                changes,
                no_changes: false,
                executed: false,
                outputs: existing.as_ref().map(stack::outputs_of).unwrap_or_default(),
                notices,
                rollback: watch,
            });
        }
        Confirm::Prompt => {
            progress.pause();
            let answer = confirmer.confirm(&format!("Execute these {} changes on stack {}?", changes.len(), plan.stack)).await;
            progress.resume();
            answer?
        }
    };
    if !go {
        remove_created(&clients.for_cleanup(), cleanup).await?;
        return Err(Error::Declined("declined: the change set was deleted and nothing changed".into()));
    }

    // 5. Execute and follow.
    if !is_create {
        protect_existing(cfn, existing.as_ref(), protection, false, progress, &mut notices).await?;
    }
    let mut follower = EventFollower::start(cfn, &plan.stack).await?;
    // From the moment the request leaves, the stack operation may be CloudFormation's: a Ctrl-C
    // while it is on the wire must not delete a stack that is being created.
    let pending = std::mem::replace(&mut *cleanup.lock().expect("cleanup lock"), Created { executed: true, ..Created::default() });
    let disable_rollback = protection.disable_rollback || preserve_failed;
    let execute = cfn.execute_change_set().change_set_name(&id).set_disable_rollback(disable_rollback.then_some(true));
    if let Err(e) = execute.send().await {
        // Refused: nothing started, so what this run made is still ours to remove.
        *cleanup.lock().expect("cleanup lock") = pending;
        return Err(aws::err("ExecuteChangeSet", format!("change set {id}"), e));
    }
    let status = stack::wait_executed(cfn, &plan.stack, &mut follower, plan.waits, progress).await?;
    if !stack::succeeded(&status) {
        if disable_rollback && matches!(status.as_str(), "CREATE_FAILED" | "UPDATE_FAILED") {
            progress.line(&format!(
                "--disable-rollback: stack {} keeps what was made, failed resources included, for debugging; deploy again once fixed, or roll it back with `imgbuild continue-rollback`",
                plan.stack
            ));
        }
        let mut failures = follower.failures;
        if let Some(w) = watch.as_ref().filter(|w| !w.triggers.is_empty() && status == "UPDATE_ROLLBACK_COMPLETE") {
            for alarm in alarms::fired(clients, w, &follower.stack_reasons).await {
                let said = format!("rollback trigger: alarm {alarm} went to ALARM, so CloudFormation rolled the update back");
                progress.line(&said);
                failures.push(said);
            }
        }
        return Err(Error::StackFailed { stack: plan.stack.clone(), status, failures });
    }
    let done = stack::describe(cfn, &plan.stack).await?;
    if is_create {
        protect_existing(cfn, done.as_ref(), protection, true, progress, &mut notices).await?;
    } else if let (Some(s), Some(on)) = (done.as_ref(), protection.termination) {
        termination_setting(cfn, s, on, progress, &mut notices).await;
    }
    Ok(Outcome {
        stack: plan.stack.clone(),
        status,
        change_set: Some(id),
        changes,
        no_changes: false,
        executed: true,
        outputs: done.as_ref().map(stack::outputs_of).unwrap_or_default(),
        notices,
        rollback: watch,
    })
}

/// Before confirming an update: the drifted resources it would overwrite, named with what was
/// changed by hand. Advisory: a detection that fails or runs too long is said and skipped, never
/// a reason to refuse the deploy.
async fn warn_overwritten_drift(
    cfn: &aws_sdk_cloudformation::Client,
    name: &str,
    changes: &[Change],
    waits: Waits,
    progress: &Progress,
    notices: &mut Vec<String>,
) {
    progress.set(&format!("detecting drift of stack {name}"));
    match stack::drift::detect(cfn, name, waits, progress).await {
        Ok(drift) => {
            for d in stack::drift::overwritten(&drift, changes) {
                let said = format!("warning: drifted, and this change set overwrites it with the template's values: {}", d.line());
                progress.line(&said);
                notices.push(said);
            }
        }
        Err(e) => {
            let said = format!("drift check skipped: {e}");
            progress.line(&said);
            notices.push(said);
        }
    }
}

/// Puts the stack policy on (when the protection has one) and, with `termination`, sets the
/// termination protection the config asks for.
async fn protect_existing(
    cfn: &aws_sdk_cloudformation::Client,
    existing: Option<&aws_sdk_cloudformation::types::Stack>,
    protection: &Protection,
    termination: bool,
    progress: &Progress,
    notices: &mut Vec<String>,
) -> Result<()> {
    let Some(s) = existing else { return Ok(()) };
    let name = s.stack_name().unwrap_or_default();
    if let Some(protect_data) = protection.protect_data {
        protect::set_policy(cfn, name, &protect::stack_policy(protect_data)).await?;
    }
    if termination && let Some(on) = protection.termination {
        termination_setting(cfn, s, on, progress, notices).await;
    }
    Ok(())
}

/// Termination protection after the stack operation succeeded: a failure here (a role without
/// cloudformation:UpdateTerminationProtection, say) must not turn a finished deploy into a failed
/// one, so it is said, with the command that does it by hand, and kept in the notices.
async fn termination_setting(
    cfn: &aws_sdk_cloudformation::Client,
    s: &aws_sdk_cloudformation::types::Stack,
    on: bool,
    progress: &Progress,
    notices: &mut Vec<String>,
) {
    match protect::set_termination(cfn, s, on, progress).await {
        Ok(Some(said)) => notices.push(said),
        Ok(None) => {}
        Err(e) => {
            let name = s.stack_name().unwrap_or_default();
            let flag = if on { "--enable-termination-protection" } else { "--no-enable-termination-protection" };
            let said = format!(
                "warning: the stack is deployed, but its termination protection could not be set ({e}); set it with `aws cloudformation update-termination-protection {flag} --stack-name {name}`"
            );
            progress.line(&said);
            notices.push(said);
        }
    }
}

/// Whether the deployed stack already has this template and these parameters. Used to tell
/// "no changes" from other change-set failures without reading CloudFormation's message text.
async fn same_as_deployed(clients: &Clients, plan: &Plan, existing: Option<&aws_sdk_cloudformation::types::Stack>) -> Result<bool> {
    let Some(s) = existing else { return Ok(false) };
    let deployed = stack::parameters_of(s);
    if plan.parameters.iter().any(|(k, v)| deployed.get(k) != Some(v)) {
        return Ok(false);
    }
    let out = clients
        .cfn
        .get_template()
        .stack_name(&plan.stack)
        .template_stage(aws_sdk_cloudformation::types::TemplateStage::Original)
        .send()
        .await
        .map_err(|e| aws::err("GetTemplate", format!("stack {}", plan.stack), e))?;
    Ok(out.template_body() == Some(plan.template_body.as_str()))
}

/// The id of a change set whose create request was sent, if it exists. The request may still
/// be arriving, so an absent one is looked for again a few times.
async fn requested_change_set(clients: &Clients, stack_name: &str, name: &str) -> Result<Option<String>> {
    for attempt in 0..4 {
        match clients.cfn.describe_change_set().stack_name(stack_name).change_set_name(name).send().await {
            Ok(out) => return Ok(Some(out.change_set_id().unwrap_or(name).to_string())),
            Err(e) if matches!(e.as_service_error().and_then(code), Some("ChangeSetNotFound") | Some("ValidationError")) => {
                if attempt < 3 {
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
            }
            Err(e) => return Err(aws::err("DescribeChangeSet", format!("change set {name}"), e)),
        }
    }
    Ok(None)
}

/// Removes what this run created and has not handed over: a pending change set, and the empty
/// REVIEW_IN_PROGRESS stack a first CREATE change set leaves behind. Returns what it removed.
pub async fn remove_created(clients: &Clients, cleanup: &Cleanup) -> Result<Vec<String>> {
    let created = std::mem::take(&mut *cleanup.lock().expect("cleanup lock"));
    let mut cleaned = Vec::new();
    if created.executed {
        return Ok(cleaned);
    }
    let mut change_set = created.change_set;
    if let (None, Some((stack_name, name))) = (&change_set, &created.requested) {
        change_set = requested_change_set(clients, stack_name, name).await?;
    }
    if let Some(id) = change_set {
        stack::delete_change_set(&clients.cfn, &id).await?;
        cleaned.push(format!("deleted change set {id}"));
    }
    if let Some(name) = created.review_stack {
        // Only a stack still in REVIEW_IN_PROGRESS is ours: it holds no resources.
        if let Some(s) = stack::describe(&clients.cfn, &name).await?
            && stack::phase(&stack::status_of(&s)) == Phase::ReviewInProgress
        {
            match clients.cfn.delete_stack().stack_name(&name).send().await {
                Ok(_) => cleaned.push(format!("deleted the empty stack {name} (REVIEW_IN_PROGRESS)")),
                Err(e) if e.as_service_error().and_then(code) == Some("ValidationError") => {}
                Err(e) => return Err(aws::err("DeleteStack", format!("stack {name}"), e)),
            }
        }
    }
    Ok(cleaned)
}
