//! `imgbuild deploy`: picks the image, renders the user-data for it, and hands the template and
//! parameters to the change-set engine in `stack`; prints the outcome.

use std::collections::BTreeMap;
use std::future::Future;

use base64::Engine;
use serde_json::json;

use super::*;
use crate::aws::{self, Clients};
use crate::bake::images::{self, Choice};
use crate::check::userdata as validate;
use crate::cli::DeployArgs;
use crate::config::{Config, Context, NatGateways, PriceSource};
use crate::error::{Error, Result};
use crate::render::{self, Format, Inputs};
use crate::stack;
use crate::stack::changeset::{self, Cleanup, Confirm, Confirmer, TtyConfirmer};
use crate::stack::protect::Protection;
use crate::stack::template::Template;
use crate::ui::Ui;
use crate::ui::progress::Progress;

/// The template parameters deploy sets, limited to those the template declares.
pub fn stack_parameters(template: &Template, config: &Config, choice: &Choice) -> Result<BTreeMap<String, String>> {
    let profile = profile_of(config)?;
    let wanted = [
        ("VpcCidr", config.stack.vpc_cidr.clone()),
        (
            "NatGateways",
            match config.stack.nat_gateways {
                NatGateways::One => "One",
                NatGateways::PerAz => "PerAz",
            }
            .to_string(),
        ),
        ("AllowedClientCidr", config.stack.allowed_client_cidr.clone().unwrap_or_default()),
        ("ImageId", choice.ami.clone()),
        ("InstanceType", config.stack.instance_type.clone()),
        ("ChromaPort", config.chroma.port.to_string()),
        ("HeartbeatPath", profile.heartbeat_path.to_string()),
        ("StorageMode", config.storage.mode.as_str().to_string()),
        ("FileSystemId", config.efs.file_system_id.clone().unwrap_or_default()),
        ("LogRetentionDays", config.stack.log_retention_days.to_string()),
        ("IntegrationTimeoutMs", config.stack.integration_timeout_ms.to_string()),
        ("BackupRetentionDays", config.backup.retention_days.to_string()),
        ("BackupSchedule", config.backup.schedule.trim().to_string()),
        ("ChromaVersion", config.chroma.version.strip_prefix('v').unwrap_or(&config.chroma.version).to_string()),
        ("ApiAuth", config.api.auth.authorization_type().to_string()),
        ("ApiAllowedPrincipals", config.api.allowed_principals.join(",")),
        ("AlarmsEnabled", config.alarms.enabled.to_string()),
        ("AlarmEmail", config.alarms.email.clone().unwrap_or_default()),
        ("MemoryAlarmPercent", config.alarms.memory_percent.to_string()),
        ("DiskAlarmPercent", config.alarms.disk_percent.to_string()),
        ("EfsBurstCreditAlarmBytes", config.alarms.efs_burst_credit_bytes.to_string()),
        ("EfsIoLimitAlarmPercent", config.alarms.efs_io_limit_percent.to_string()),
    ];
    let declared = template.parameter_names();
    Ok(wanted.into_iter().filter(|(k, _)| declared.iter().any(|d| d == k)).map(|(k, v)| (k.to_string(), v)).collect())
}

/// The deploy another command runs (restore, upgrade, rollback): the image and mode as deploy
/// chooses them, every check and protection on, asking unless `yes`, not waiting for a busy stack.
pub fn plain_deploy_args(yes: bool, timeout: Option<u64>) -> DeployArgs {
    DeployArgs {
        ami: None,
        mode: None,
        template: None,
        update_base: false,
        disable_rollback: false,
        no_drift_check: false,
        no_rollback_triggers: false,
        yes,
        no_execute: false,
        wait: crate::cli::WaitArgs { wait: false, timeout },
        tools: crate::cli::ToolArgs { require_tools: false, no_tools: false },
    }
}

/// Everything deploy does after the clients exist; `interrupt` resolves on Ctrl-C (tests pass
/// their own).
pub async fn deploy_flow(
    clients: &Clients,
    args: &DeployArgs,
    ctx: &Context,
    ui: Ui,
    confirmer: &dyn Confirmer,
    interrupt: impl Future<Output = ()>,
) -> Result<serde_json::Value> {
    let config = &ctx.config;
    let progress = Progress::new(ui, "choosing the image");
    tokio::pin!(interrupt);
    // Nothing exists before the change set: Ctrl-C here just stops.
    let (choice, logging_role, deployed) = tokio::select! {
        r = async {
            let choice = images::choose(clients, config, args.ami.as_deref(), args.mode).await?;
            let deployed = stack::describe(&clients.cfn, config.stack_name()).await?;
            let choice = keep_base_image(clients, choice, deployed.as_ref(), args.update_base, &progress).await?;
            let logging_role = api_gateway_logging_role(clients, deployed.as_ref()).await?;
            Ok::<_, Error>((choice, logging_role, deployed))
        } => r?,
        _ = &mut interrupt => return Err(Error::Interrupted { cleaned: Vec::new() }),
    };
    progress.line(&format!("image {} ({}), user-data mode {}", choice.ami, source_text(&choice.source), choice.mode.as_str()));

    // The user-data this AMI needs, validated like render-userdata does, compressed to keep
    // the template well under CloudFormation's size limit.
    let inputs = Inputs::new(config, ctx.region.as_deref(), choice.mode, Format::CloudConfig, true)?;
    let rendered = render::render(&inputs)?;
    let report = validate::validate(&rendered, config, inputs.profile, tools(&args.tools));
    ui.report("user-data", &report);
    if !report.ok() {
        let names: Vec<_> = report.failures().map(|c| c.name.clone()).collect();
        return Err(Error::Validation(format!("the user-data for this deploy failed: {}", names.join(", "))));
    }

    let mut template = Template::load(args.template.as_deref())?;
    // A template without a launch template would deploy without the user-data: nothing boots.
    if template.set_user_data(&base64::engine::general_purpose::STANDARD.encode(&rendered.output))? == 0 {
        return Err(Error::Invalid(format!(
            "template {}: no AWS::EC2::LaunchTemplate to carry the user-data, so no instance would boot Chroma",
            template.name
        )));
    }
    let mut parameters = stack_parameters(&template, config, &choice)?;
    // A stack running on a given file system (a restore, or an earlier efs.file_system_id) keeps
    // it when the config names none: an empty FileSystemId would make the stack create a new,
    // empty file system and Chroma would come back serving nothing. The stack's own parameter is
    // the record, as for the base image.
    let mut notices = Vec::new();
    if config.efs.file_system_id.is_none()
        && parameters.contains_key("FileSystemId")
        && let Some(attached) = deployed.as_ref().map(stack::parameters_of).and_then(|p| p.get("FileSystemId").cloned()).filter(|f| !f.is_empty())
    {
        let note = format!(
            "the stack runs on file system {attached} (reattached or restored); keeping it, as the config names none (set efs.file_system_id to choose another)"
        );
        progress.line(&note);
        notices.push(note);
        parameters.insert("FileSystemId".into(), attached);
    }
    if template.parameter_names().iter().any(|p| p == "ApiGatewayCloudWatchRoleArn") {
        if logging_role.is_empty() {
            progress.line("API Gateway: the account has no CloudWatch logging role; the stack creates one and sets it (account-wide, this region)");
        } else {
            progress.line(&format!("API Gateway: the account logs with {logging_role}; the stack leaves that setting alone"));
        }
        parameters.insert("ApiGatewayCloudWatchRoleArn".into(), logging_role);
    }
    template.pin_api_deployments(&parameters);
    template.check_policies()?;
    let mut plan = changeset::Plan {
        stack: config.stack_name().to_string(),
        template_body: template.body()?,
        parameters,
        tags: BTreeMap::from([("imgbuild:project".to_string(), config.name.clone())]),
        confirm: if args.yes {
            Confirm::Yes
        } else if args.no_execute {
            Confirm::NoExecute
        } else {
            Confirm::Prompt
        },
        wait_if_busy: args.wait.wait,
        waits: waits(config, &args.wait),
        token: run_token(),
        annotate: None,
        rollback: if config.alarms.enabled && !args.no_rollback_triggers {
            stack::alarms::Rollback::Watch { minutes: config.alarms.rollback_monitoring_minutes }
        } else {
            stack::alarms::Rollback::Off
        },
    };
    let cost_inputs = cost_inputs(clients, &template, &plan.parameters, deployed.as_ref()).await;
    let prices: PriceSlot = PriceSlot::default();
    plan.annotate = Some(cost_annotation(clients, config.prices, cost_inputs.clone(), prices.clone()));

    for (resource, secs) in template.signal_waits() {
        progress.line(&format!(
            "{resource} waits up to {} for the instance to signal that Chroma answers on it; a FAILURE signal, or none in time, rolls the stack back (the boot writes its reason to /var/log/cloud-init-output.log on the instance)",
            minutes(secs)
        ));
    }
    if plan.waits.timeout.as_secs() < template.signal_waits().iter().map(|(_, s)| *s).max().unwrap_or(0) {
        progress.line(&format!(
            "note: deploy stops following the stack after {}; the stack itself goes on waiting for the signal",
            minutes(plan.waits.timeout.as_secs())
        ));
    }

    template.check_instance_tags(&plan.tags)?;
    if let Some(fs) = &config.efs.file_system_id
        && plan.parameters.contains_key("FileSystemId")
    {
        let ours = deployed.as_ref().map(stack::parameters_of).and_then(|p| p.get("FileSystemId").cloned()).as_deref() == Some(fs.as_str());
        let efs_tls = config.storage.mode.as_str() == "efs-tls";
        tokio::select! {
            r = stack::efs::reattach(clients, fs, &plan.stack, efs_tls, ours, &progress) => { r?; }
            _ = &mut interrupt => return Err(Error::Interrupted { cleaned: Vec::new() }),
        }
    }

    let protection = Protection {
        termination: Some(config.stack.termination_protection),
        protect_data: Some(config.stack.protect_data),
        disable_rollback: args.disable_rollback,
        drift_check: !args.no_drift_check,
    };
    let cleanup = Cleanup::default();
    let result = tokio::select! {
        r = changeset::run_protected(clients, &plan, &protection, &progress, &cleanup, confirmer) => r,
        _ = &mut interrupt => Err(Error::Interrupted { cleaned: Vec::new() }),
    };
    let mut outcome = match result {
        Ok(o) => o,
        Err(e) => return Err(clean_after(clients, &cleanup, &progress, e).await),
    };
    notices.append(&mut outcome.notices);
    outcome.notices = notices;
    // The prices the diff was shown with: the Price List is asked once a deploy.
    let book = prices.lock().expect("prices").take().unwrap_or_default();
    let cost = (!outcome.no_changes).then(|| crate::cost::estimate_with(&outcome.changes, &cost_inputs, &book));
    let took = progress.elapsed();
    drop(progress);

    if outcome.executed {
        ui.info(format!("stack {}: {} in {}s", outcome.stack, outcome.status, took.as_secs()));
    }
    print_outputs(ui, &outcome.outputs);
    Ok(json!({
        "ok": true,
        "ami": choice,
        "userdata_sha256": rendered.sha256(),
        "deploy": outcome,
        "cost": cost,
        "protection": {
            "termination_protection": protection.termination,
            "stack_policy": if config.stack.protect_data { "protect-data" } else { "allow-all" },
            "disable_rollback": protection.disable_rollback,
            "drift_check": protection.drift_check,
        },
    }))
}

/// What the change set's cost is sized by: the template, the instance type set and the one the
/// stack runs, and its file system's metered size. The size is advisory: a failed lookup leaves
/// it out of the estimate, never fails the deploy.
async fn cost_inputs(
    clients: &Clients,
    template: &Template,
    parameters: &BTreeMap<String, String>,
    deployed: Option<&aws_sdk_cloudformation::types::Stack>,
) -> crate::cost::Inputs {
    let region = clients.cfn.config().region().map(|r| r.to_string()).unwrap_or_default();
    let mut inputs = crate::cost::Inputs::from_template(template, &region, parameters.get("InstanceType").map(String::as_str).unwrap_or_default());
    inputs.previous_instance_type = deployed.map(stack::parameters_of).and_then(|p| p.get("InstanceType").cloned());
    // The stack's own file system, from its output (the parameter names one only when given).
    if let Some(fs) = deployed.map(stack::outputs_of).and_then(|o| o.get("FileSystemId").cloned()).filter(|f| !f.is_empty()) {
        match clients.efs.describe_file_systems().file_system_id(&fs).send().await {
            Ok(out) => inputs.efs_bytes = out.file_systems().first().and_then(|f| f.size_in_bytes()).map(|s| s.value().max(0) as u64),
            Err(e) => inputs.notes.push(format!("the file system's size: {}", aws::err("DescribeFileSystems", format!("file system {fs}"), e))),
        }
    }
    inputs
}

/// The prices a deploy's cost was shown with, kept for its JSON.
type PriceSlot = std::sync::Arc<std::sync::Mutex<Option<crate::cost::Book>>>;

/// The cost under the diff: the prices of exactly the products the change set's changes are
/// priced by, from the Price List API (bounded) unless `prices: table`.
fn cost_annotation(clients: &Clients, source: PriceSource, inputs: crate::cost::Inputs, slot: PriceSlot) -> changeset::Annotate {
    let pricing = clients.pricing.clone();
    changeset::Annotate(std::sync::Arc::new(move |changes| {
        let (pricing, inputs, slot) = (pricing.clone(), inputs.clone(), slot.clone());
        Box::pin(async move {
            let products = crate::cost::products(&changes, &inputs);
            let book = crate::cost::book(&pricing, source, &inputs.region, &products).await;
            let lines = crate::cost::lines(&crate::cost::estimate_with(&changes, &inputs, &book));
            *slot.lock().expect("prices") = Some(book);
            lines
        })
    }))
}

/// Stock AL2023 moves on whenever AWS publishes a release; moving replaces Chroma's instance.
/// So the base image the stack runs (its ImageId parameter: CloudFormation keeps it with the
/// stack, for every machine that deploys it) stays until `--update-base`, unless it is a baked
/// image (the handoff is gone: the baked boot does not fit a stock user-data) or no longer exists.
async fn keep_base_image(
    clients: &Clients,
    choice: Choice,
    deployed: Option<&aws_sdk_cloudformation::types::Stack>,
    update_base: bool,
    progress: &Progress,
) -> Result<Choice> {
    if !matches!(choice.source, images::Source::Stock { .. }) {
        return Ok(choice);
    }
    let Some(running) = deployed.map(stack::parameters_of).and_then(|p| p.get("ImageId").cloned()).filter(|a| !a.is_empty()) else {
        return Ok(choice);
    };
    if running == choice.ami {
        return Ok(choice);
    }
    if update_base {
        progress.line(&format!(
            "base image changes {running} -> {} (--update-base): the instance will be replaced (terminated, then launched; Chroma is down until the new one signals)",
            choice.ami
        ));
        return Ok(choice);
    }
    let out = clients.ec2.describe_images().image_ids(&running).send().await;
    let image = match out {
        Ok(o) => o.images().first().cloned(),
        // A deregistered image: DescribeImages answers InvalidAMIID.NotFound (EC2 API error codes).
        Err(e) if e.as_service_error().and_then(aws::code).is_some_and(|c| c.starts_with("InvalidAMIID")) => None,
        Err(e) => return Err(aws::err("DescribeImages", format!("image {running}"), e)),
    };
    match image {
        Some(i) if !i.tags().iter().any(|t| t.key() == Some(images::TAG_CHROMA_VERSION)) => {
            progress.line(&format!(
                "keeping base image {running}, which the stack runs; AWS now publishes {}: `imgbuild deploy --update-base` moves to it and replaces the instance",
                choice.ami
            ));
            Ok(Choice { ami: running, ..choice })
        }
        Some(_) => {
            progress.line(&format!("base image changes {running} (baked) -> {} (stock AL2023): the instance will be replaced", choice.ami));
            Ok(choice)
        }
        None => {
            progress.line(&format!("base image changes {running} (no longer available) -> {}: the instance will be replaced", choice.ami));
            Ok(choice)
        }
    }
}

/// The role the account's API Gateway already logs with, to keep; empty when the stack must set
/// one: the account has none, or it is the one this stack created (its output says so).
async fn api_gateway_logging_role(clients: &Clients, deployed: Option<&aws_sdk_cloudformation::types::Stack>) -> Result<String> {
    let out = clients.apigw.get_account().send().await.map_err(|e| aws::err("GetAccount", "the API Gateway account settings", e))?;
    let current = out.cloudwatch_role_arn().unwrap_or_default();
    let ours = deployed.map(stack::outputs_of).and_then(|o| o.get("ApiGatewayCloudWatchRoleArn").cloned());
    Ok(if current.is_empty() || ours.as_deref() == Some(current) { String::new() } else { current.to_string() })
}

fn minutes(secs: u64) -> String {
    if secs.is_multiple_of(60) { format!("{} min", secs / 60) } else { format!("{secs}s") }
}

fn source_text(s: &images::Source) -> String {
    match s {
        images::Source::Flag => "--ami".into(),
        images::Source::Baked { parameter } => format!("baked, from {parameter}"),
        images::Source::Stock { parameter } => format!("stock AL2023, from {parameter}"),
    }
}

pub(super) fn deploy(args: DeployArgs, ctx: &Context, ui: Ui) -> Result<()> {
    run_flow(ctx, ui, |clients, _, interrupt| async move { deploy_flow(&clients, &args, ctx, ui, &TtyConfirmer, interrupt).await })
}
