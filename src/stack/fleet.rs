//! The fleet engine: one CloudFormation StackSet and its stack instances, one per account and
//! region. CloudFormation runs the rollout (concurrency, failure tolerance, region order); this
//! module plans what each target gets, starts one operation at a time (a StackSet runs one
//! operation at a time), and follows it with one DescribeStackSetOperation per poll, whatever
//! the number of targets, reading the per-target results once, when it ends.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use aws_sdk_cloudformation::Client;
use aws_sdk_cloudformation::types::{
    AutoDeployment, Capability, DeploymentTargets, Parameter, PermissionModels, RegionConcurrencyType, StackSetOperationPreferences, StackSetOperationStatus,
    Tag,
};
use serde::Serialize;

use crate::aws::{self, code};
use crate::config::Amount;
use crate::error::{Error, Result};
use crate::stack::Waits;
use crate::ui::progress::Progress;

/// Who deploys the stack instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Permission {
    /// Administration role here, execution role in each target account; targets are accounts.
    SelfManaged { administration_role_arn: Option<String>, execution_role_name: Option<String> },
    /// AWS Organizations; targets are organizational units, and accounts that join them later
    /// get the stack too.
    ServiceManaged,
}

/// Operation preferences, as StackSetOperationPreferences takes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefs {
    pub max_concurrent: Amount,
    pub failure_tolerance: Amount,
    pub parallel_regions: bool,
    pub region_order: Vec<String>,
}

/// Parameter values for some targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override {
    pub accounts: Vec<String>,
    pub regions: Vec<String>,
    pub parameters: BTreeMap<String, String>,
}

/// What the StackSet and its instances should be.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: String,
    pub template_body: String,
    pub parameters: BTreeMap<String, String>,
    pub tags: BTreeMap<String, String>,
    pub permission: Permission,
    /// Self-managed targets.
    pub accounts: Vec<String>,
    /// Service-managed targets.
    pub organizational_units: Vec<String>,
    pub regions: Vec<String>,
    pub overrides: Vec<Override>,
    pub prefs: Prefs,
}

/// The StackSet as CloudFormation has it.
#[derive(Debug, Clone, Serialize)]
pub struct SetState {
    pub arn: Option<String>,
    pub status: String,
    pub template_body: String,
    pub parameters: BTreeMap<String, String>,
    pub drift_status: Option<String>,
    pub last_drift_check: Option<String>,
}

impl SetState {
    /// The account that administers the StackSet, from its ARN.
    pub fn account(&self) -> Option<&str> {
        self.arn.as_deref()?.split(':').nth(4).filter(|a| !a.is_empty())
    }
}

/// One stack instance, from ListStackInstances.
#[derive(Debug, Clone, Serialize)]
pub struct Instance {
    pub account: String,
    pub region: String,
    pub organizational_unit: Option<String>,
    /// CURRENT, OUTDATED or INOPERABLE.
    pub status: String,
    pub reason: Option<String>,
    /// PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED, INOPERABLE, SKIPPED_SUSPENDED_ACCOUNT.
    pub detailed_status: Option<String>,
    pub drift_status: Option<String>,
    pub last_drift_check: Option<String>,
    pub last_operation: Option<String>,
    pub stack_id: Option<String>,
}

/// Accounts (self-managed) or organizational units (service-managed), in regions.
#[derive(Debug, Clone, Default)]
pub struct Targets {
    pub accounts: Vec<String>,
    pub organizational_units: Vec<String>,
    pub regions: Vec<String>,
}

/// What a target would get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Create,
    Update,
    NoChange,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TargetPlan {
    /// An account id, or for a service-managed target not yet deployed, the organizational unit
    /// (each of its accounts gets the stack).
    pub target: String,
    pub region: String,
    pub action: Action,
}

/// One target's result in an operation.
#[derive(Debug, Clone, Serialize)]
pub struct TargetResult {
    pub account: String,
    pub region: String,
    pub status: String,
    pub reason: Option<String>,
}

/// How one operation ended.
#[derive(Debug, Clone, Serialize)]
pub struct OperationOutcome {
    pub operation_id: String,
    pub action: String,
    pub status: String,
    pub reason: Option<String>,
    pub results: Vec<TargetResult>,
}

impl OperationOutcome {
    pub fn failed_targets(&self) -> impl Iterator<Item = &TargetResult> {
        self.results.iter().filter(|r| r.status == "FAILED")
    }
}

/// What an operation run found in CloudFormation: how many calls it made, for the scale test.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Calls {
    pub describe_operation: usize,
    pub list_results_pages: usize,
}

pub fn preferences(p: &Prefs) -> StackSetOperationPreferences {
    let mut b = StackSetOperationPreferences::builder().region_concurrency_type(if p.parallel_regions {
        RegionConcurrencyType::Parallel
    } else {
        RegionConcurrencyType::Sequential
    });
    b = match p.max_concurrent {
        Amount::Count(n) => b.max_concurrent_count(n),
        Amount::Percent(n) => b.max_concurrent_percentage(n),
    };
    b = match p.failure_tolerance {
        Amount::Count(n) => b.failure_tolerance_count(n),
        Amount::Percent(n) => b.failure_tolerance_percentage(n),
    };
    b.set_region_order((!p.region_order.is_empty()).then(|| p.region_order.clone())).build()
}

/// The preferences for an operation on `regions`: the region order keeps the fleet's order but
/// names only those regions (RegionOrder is "the order of the Regions where you want to perform
/// the stack operation", StackSetOperationPreferences).
fn preferences_for(p: &Prefs, regions: &[String]) -> StackSetOperationPreferences {
    let mut order: Vec<String> = p.region_order.iter().filter(|r| regions.contains(r)).cloned().collect();
    let rest: Vec<String> = regions.iter().filter(|r| !order.contains(r)).cloned().collect();
    order.extend(rest);
    preferences(&Prefs { region_order: order, ..p.clone() })
}

fn params(map: &BTreeMap<String, String>) -> Vec<Parameter> {
    map.iter().map(|(k, v)| Parameter::builder().parameter_key(k).parameter_value(v).build()).collect()
}

fn time(t: Option<&aws_smithy_types::DateTime>) -> Option<String> {
    t.map(|t| t.to_string())
}

/// The StackSet, or None when there is none by that name (code StackSetNotFoundException).
pub async fn describe_set(cfn: &Client, name: &str) -> Result<Option<SetState>> {
    match cfn.describe_stack_set().stack_set_name(name).send().await {
        Ok(out) => Ok(out.stack_set().filter(|s| s.status().map(|s| s.as_str()) != Some("DELETED")).map(|s| SetState {
            arn: s.stack_set_arn().map(String::from),
            status: s.status().map(|s| s.as_str().to_string()).unwrap_or_default(),
            template_body: s.template_body().unwrap_or_default().to_string(),
            parameters: s
                .parameters()
                .iter()
                .filter_map(|p| Some((p.parameter_key()?.to_string(), p.parameter_value().unwrap_or_default().to_string())))
                .collect(),
            drift_status: s.stack_set_drift_detection_details().and_then(|d| d.drift_status()).map(|d| d.as_str().to_string()),
            last_drift_check: time(s.stack_set_drift_detection_details().and_then(|d| d.last_drift_check_timestamp())),
        })),
        Err(e) if e.as_service_error().and_then(code) == Some("StackSetNotFoundException") => Ok(None),
        Err(e) => Err(aws::err("DescribeStackSet", format!("stack set {name}"), e)),
    }
}

/// Every stack instance, page by page (100 a page at most).
pub async fn list_instances(cfn: &Client, name: &str) -> Result<Vec<Instance>> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = cfn
            .list_stack_instances()
            .stack_set_name(name)
            .set_next_token(token.take())
            .max_results(100)
            .send()
            .await
            .map_err(|e| aws::err("ListStackInstances", format!("stack set {name}"), e))?;
        for s in page.summaries() {
            out.push(Instance {
                account: s.account().unwrap_or_default().to_string(),
                region: s.region().unwrap_or_default().to_string(),
                organizational_unit: s.organizational_unit_id().map(String::from),
                status: s.status().map(|s| s.as_str().to_string()).unwrap_or_default(),
                reason: s.status_reason().map(String::from),
                detailed_status: s.stack_instance_status().and_then(|d| d.detailed_status()).map(|d| d.as_str().to_string()),
                drift_status: s.drift_status().map(|d| d.as_str().to_string()),
                last_drift_check: time(s.last_drift_check_timestamp()),
                last_operation: s.last_operation_id().map(String::from),
                stack_id: s.stack_id().map(String::from),
            });
        }
        match page.next_token() {
            Some(t) if !t.is_empty() => token = Some(t.to_string()),
            _ => break,
        }
    }
    Ok(out)
}

/// What each target would get: no StackSet change sets exist, so this compares the template and
/// parameters with the StackSet's, and the targets with its instances.
pub fn plan(spec: &Spec, set: Option<&SetState>, instances: &[Instance], changed_overrides: &BTreeSet<(String, String)>) -> Vec<TargetPlan> {
    let set_changed = set.is_none_or(|s| s.template_body != spec.template_body || s.parameters != spec.parameters);
    let existing: BTreeSet<(&str, &str)> = instances.iter().map(|i| (i.account.as_str(), i.region.as_str())).collect();
    let mut out = Vec::new();
    for region in &spec.regions {
        match spec.permission {
            Permission::SelfManaged { .. } => {
                for account in &spec.accounts {
                    let action = if !existing.contains(&(account.as_str(), region.as_str())) {
                        Action::Create
                    } else if set_changed || changed_overrides.contains(&(account.clone(), region.clone())) {
                        Action::Update
                    } else {
                        Action::NoChange
                    };
                    out.push(TargetPlan { target: account.clone(), region: region.clone(), action });
                }
            }
            Permission::ServiceManaged => {
                for ou in &spec.organizational_units {
                    let members: Vec<&Instance> =
                        instances.iter().filter(|i| &i.region == region && i.organizational_unit.as_deref() == Some(ou.as_str())).collect();
                    if members.is_empty() {
                        out.push(TargetPlan { target: ou.clone(), region: region.clone(), action: Action::Create });
                    }
                    for i in members {
                        let changed = set_changed || changed_overrides.contains(&(i.account.clone(), i.region.clone()));
                        out.push(TargetPlan {
                            target: i.account.clone(),
                            region: region.clone(),
                            action: if changed { Action::Update } else { Action::NoChange },
                        });
                    }
                }
            }
        }
    }
    out
}

fn targets(spec: &Spec, accounts: &[String]) -> (Option<Vec<String>>, Option<DeploymentTargets>) {
    match spec.permission {
        Permission::SelfManaged { .. } => (Some(accounts.to_vec()), None),
        Permission::ServiceManaged if accounts.is_empty() => {
            (None, Some(DeploymentTargets::builder().set_organizational_unit_ids(Some(spec.organizational_units.clone())).build()))
        }
        // Some accounts within the organizational units.
        Permission::ServiceManaged => (
            None,
            Some(
                DeploymentTargets::builder()
                    .set_organizational_unit_ids(Some(spec.organizational_units.clone()))
                    .set_accounts(Some(accounts.to_vec()))
                    .account_filter_type(aws_sdk_cloudformation::types::AccountFilterType::Intersection)
                    .build(),
            ),
        ),
    }
}

/// Creates the StackSet (no instances yet).
pub async fn create_set(cfn: &Client, spec: &Spec, token: &str) -> Result<()> {
    let mut req = cfn
        .create_stack_set()
        .stack_set_name(&spec.name)
        .template_body(&spec.template_body)
        .set_parameters(Some(params(&spec.parameters)))
        .capabilities(Capability::CapabilityIam)
        .set_tags(Some(spec.tags.iter().map(|(k, v)| Tag::builder().key(k).value(v).build()).collect()))
        .client_request_token(token);
    req = match &spec.permission {
        Permission::SelfManaged { administration_role_arn, execution_role_name } => req
            .permission_model(PermissionModels::SelfManaged)
            .set_administration_role_arn(administration_role_arn.clone())
            .set_execution_role_name(execution_role_name.clone()),
        // Accounts that join an organizational unit later get the stack; one that leaves keeps
        // nothing but its retained file system.
        Permission::ServiceManaged => req
            .permission_model(PermissionModels::ServiceManaged)
            .auto_deployment(AutoDeployment::builder().enabled(true).retain_stacks_on_account_removal(false).build()),
    };
    req.send().await.map_err(|e| aws::err("CreateStackSet", format!("stack set {}", spec.name), e))?;
    Ok(())
}

/// Updates the StackSet's template and parameters, and with them every instance (in
/// `instance_regions`, the regions it has instances in).
pub async fn update_set(cfn: &Client, spec: &Spec, instance_regions: &[String], operation_id: &str) -> Result<String> {
    let mut req = cfn
        .update_stack_set()
        .stack_set_name(&spec.name)
        .template_body(&spec.template_body)
        .set_parameters(Some(params(&spec.parameters)))
        .capabilities(Capability::CapabilityIam)
        .operation_preferences(preferences_for(&spec.prefs, instance_regions))
        .operation_id(operation_id);
    if let Permission::SelfManaged { administration_role_arn, execution_role_name } = &spec.permission {
        req = req.set_administration_role_arn(administration_role_arn.clone()).set_execution_role_name(execution_role_name.clone());
    }
    let out = req.send().await.map_err(|e| aws::err("UpdateStackSet", format!("stack set {}", spec.name), e))?;
    Ok(out.operation_id().unwrap_or(operation_id).to_string())
}

/// Creates instances for `accounts` (all organizational units when service-managed and empty)
/// in `regions`, with `overrides` from the start (an instance in another account cannot boot
/// from the handoff parameter, which exists only in the baking account).
pub async fn create_instances(
    cfn: &Client,
    spec: &Spec,
    accounts: &[String],
    regions: &[String],
    overrides: &BTreeMap<String, String>,
    operation_id: &str,
) -> Result<String> {
    let (accts, deployment) = targets(spec, accounts);
    let out = cfn
        .create_stack_instances()
        .stack_set_name(&spec.name)
        .set_accounts(accts)
        .set_deployment_targets(deployment)
        .set_regions(Some(regions.to_vec()))
        .set_parameter_overrides((!overrides.is_empty()).then(|| params(overrides)))
        .operation_preferences(preferences_for(&spec.prefs, regions))
        .operation_id(operation_id)
        .send()
        .await
        .map_err(|e| aws::err("CreateStackInstances", format!("stack set {}", spec.name), e))?;
    Ok(out.operation_id().unwrap_or(operation_id).to_string())
}

/// Sets parameter overrides on some instances.
pub async fn update_instances(cfn: &Client, spec: &Spec, o: &Override, operation_id: &str) -> Result<String> {
    let (accts, deployment) = targets(spec, &o.accounts);
    let regions = if o.regions.is_empty() { spec.regions.clone() } else { o.regions.clone() };
    let prefs = preferences_for(&spec.prefs, &regions);
    let out = cfn
        .update_stack_instances()
        .stack_set_name(&spec.name)
        .set_accounts(accts)
        .set_deployment_targets(deployment)
        .set_regions(Some(regions))
        .set_parameter_overrides(Some(params(&o.parameters)))
        .operation_preferences(prefs)
        .operation_id(operation_id)
        .send()
        .await
        .map_err(|e| aws::err("UpdateStackInstances", format!("stack set {}", spec.name), e))?;
    Ok(out.operation_id().unwrap_or(operation_id).to_string())
}

/// The parameter overrides an instance has now (DescribeStackInstance).
pub async fn instance_overrides(cfn: &Client, name: &str, account: &str, region: &str) -> Result<BTreeMap<String, String>> {
    let out = cfn
        .describe_stack_instance()
        .stack_set_name(name)
        .stack_instance_account(account)
        .stack_instance_region(region)
        .send()
        .await
        .map_err(|e| aws::err("DescribeStackInstance", format!("stack set {name}, {account} in {region}"), e))?;
    Ok(out
        .stack_instance()
        .map(|i| {
            i.parameter_overrides().iter().filter_map(|p| Some((p.parameter_key()?.to_string(), p.parameter_value().unwrap_or_default().to_string()))).collect()
        })
        .unwrap_or_default())
}

/// Deletes the instances. `retain_stacks` false: the stacks go, and what their template retains
/// (the file system, DeletionPolicy Retain) stays.
pub async fn delete_instances(cfn: &Client, name: &str, permission: &Permission, targets: &Targets, prefs: &Prefs, operation_id: &str) -> Result<String> {
    let Targets { accounts, organizational_units, regions } = targets;
    let mut req = cfn
        .delete_stack_instances()
        .stack_set_name(name)
        .set_regions(Some(regions.to_vec()))
        .retain_stacks(false)
        .operation_preferences(preferences(prefs))
        .operation_id(operation_id);
    req = match permission {
        Permission::SelfManaged { .. } => req.set_accounts(Some(accounts.to_vec())),
        // Some accounts of the organizational units only, when named.
        Permission::ServiceManaged if !accounts.is_empty() => req.deployment_targets(
            DeploymentTargets::builder()
                .set_organizational_unit_ids(Some(organizational_units.to_vec()))
                .set_accounts(Some(accounts.to_vec()))
                .account_filter_type(aws_sdk_cloudformation::types::AccountFilterType::Intersection)
                .build(),
        ),
        Permission::ServiceManaged => {
            req.deployment_targets(DeploymentTargets::builder().set_organizational_unit_ids(Some(organizational_units.to_vec())).build())
        }
    };
    let out = req.send().await.map_err(|e| aws::err("DeleteStackInstances", format!("stack set {name}"), e))?;
    Ok(out.operation_id().unwrap_or(operation_id).to_string())
}

pub async fn delete_set(cfn: &Client, name: &str) -> Result<()> {
    match cfn.delete_stack_set().stack_set_name(name).send().await {
        Ok(_) => Ok(()),
        Err(e) if e.as_service_error().and_then(code) == Some("StackSetNotFoundException") => Ok(()),
        Err(e) => Err(aws::err("DeleteStackSet", format!("stack set {name}"), e)),
    }
}

/// Starts drift detection on every instance.
pub async fn detect_drift(cfn: &Client, name: &str, prefs: &Prefs, operation_id: &str) -> Result<String> {
    let out = cfn
        .detect_stack_set_drift()
        .stack_set_name(name)
        .operation_preferences(preferences(prefs))
        .operation_id(operation_id)
        .send()
        .await
        .map_err(|e| aws::err("DetectStackSetDrift", format!("stack set {name}"), e))?;
    Ok(out.operation_id().unwrap_or(operation_id).to_string())
}

/// The newest operation on the first page of ListStackSetOperations (by creation time: the API
/// promises no order).
pub async fn last_operation(cfn: &Client, name: &str) -> Result<Option<(String, String, String, Option<String>)>> {
    let out =
        cfn.list_stack_set_operations().stack_set_name(name).send().await.map_err(|e| aws::err("ListStackSetOperations", format!("stack set {name}"), e))?;
    Ok(out.summaries().iter().max_by_key(|s| s.creation_timestamp().map(|t| (t.secs(), t.subsec_nanos()))).map(|s| {
        (
            s.operation_id().unwrap_or_default().to_string(),
            s.action().map(|a| a.as_str().to_string()).unwrap_or_default(),
            s.status().map(|a| a.as_str().to_string()).unwrap_or_default(),
            s.status_reason().map(String::from),
        )
    }))
}

fn running(status: &StackSetOperationStatus) -> bool {
    matches!(status, StackSetOperationStatus::Running | StackSetOperationStatus::Queued | StackSetOperationStatus::Stopping)
}

/// Follows one operation until it ends, within `waits.timeout`: one DescribeStackSetOperation a
/// poll, then its per-target results, page by page.
pub async fn wait_operation(cfn: &Client, name: &str, operation_id: &str, waits: Waits, progress: &Progress, calls: &mut Calls) -> Result<OperationOutcome> {
    let deadline = Instant::now() + waits.timeout;
    let op = loop {
        calls.describe_operation += 1;
        let out = cfn
            .describe_stack_set_operation()
            .stack_set_name(name)
            .operation_id(operation_id)
            .send()
            .await
            .map_err(|e| aws::err("DescribeStackSetOperation", format!("stack set {name}, operation {operation_id}"), e))?;
        let op = out.stack_set_operation().cloned().unwrap_or_else(|| aws_sdk_cloudformation::types::StackSetOperation::builder().build());
        let status = op.status().cloned().unwrap_or(StackSetOperationStatus::Running);
        if !running(&status) {
            break op;
        }
        let failed = op.status_details().and_then(|d| d.failed_stack_instances_count()).unwrap_or(0);
        let action = op.action().map(|a| a.as_str()).unwrap_or("operation");
        progress.set(&format!("stack set {name}: {action} {} ({failed} target(s) failed so far)", status.as_str()));
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!("stack set {name} operation {operation_id} (still {})", status.as_str()),
                secs: waits.timeout.as_secs(),
                hint: "the operation goes on in CloudFormation; follow it with `imgbuild fleet status`, or raise aws.stack_timeout_secs / --timeout".into(),
            });
        }
        tokio::time::sleep(waits.poll).await;
    };
    let results = operation_results(cfn, name, operation_id, calls).await?;
    Ok(OperationOutcome {
        operation_id: operation_id.to_string(),
        action: op.action().map(|a| a.as_str().to_string()).unwrap_or_default(),
        status: op.status().map(|s| s.as_str().to_string()).unwrap_or_default(),
        reason: op.status_reason().map(String::from),
        results,
    })
}

async fn operation_results(cfn: &Client, name: &str, operation_id: &str, calls: &mut Calls) -> Result<Vec<TargetResult>> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        calls.list_results_pages += 1;
        let page = cfn
            .list_stack_set_operation_results()
            .stack_set_name(name)
            .operation_id(operation_id)
            .max_results(100)
            .set_next_token(token.take())
            .send()
            .await
            .map_err(|e| aws::err("ListStackSetOperationResults", format!("stack set {name}, operation {operation_id}"), e))?;
        for r in page.summaries() {
            out.push(TargetResult {
                account: r.account().unwrap_or_default().to_string(),
                region: r.region().unwrap_or_default().to_string(),
                status: r.status().map(|s| s.as_str().to_string()).unwrap_or_default(),
                reason: r.status_reason().map(String::from),
            });
        }
        match page.next_token() {
            Some(t) if !t.is_empty() => token = Some(t.to_string()),
            _ => break,
        }
    }
    Ok(out)
}

/// An operation that ended FAILED (beyond the failure tolerance) or STOPPED, as the error that
/// exits 3, naming every failed target and CloudFormation's reason.
pub fn failure(name: &str, outcome: &OperationOutcome) -> Option<Error> {
    if outcome.status == "SUCCEEDED" {
        return None;
    }
    let mut failures: Vec<String> =
        outcome.failed_targets().map(|r| format!("{} in {}: {}", r.account, r.region, r.reason.as_deref().unwrap_or("no reason given"))).collect();
    if failures.is_empty()
        && let Some(r) = &outcome.reason
    {
        failures.push(r.clone());
    }
    Some(Error::StackFailed {
        stack: format!("set {name}"),
        status: format!("{} (operation {} {})", outcome.status, outcome.action, outcome.operation_id),
        failures,
    })
}
