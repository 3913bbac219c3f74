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
use crate::config::{Config, Context, NatGateways};
use crate::error::{Error, Result};
use crate::render::{self, Format, Inputs};
use crate::stack::changeset::{self, Cleanup, Confirm, Confirmer, TtyConfirmer};
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
        ("LogRetentionDays", config.stack.log_retention_days.to_string()),
        ("BackupRetentionDays", config.backup.retention_days.to_string()),
        ("BackupSchedule", config.backup.schedule.trim().to_string()),
        ("ChromaVersion", config.chroma.version.strip_prefix('v').unwrap_or(&config.chroma.version).to_string()),
    ];
    let declared = template.parameter_names();
    Ok(wanted.into_iter().filter(|(k, _)| declared.iter().any(|d| d == k)).map(|(k, v)| (k.to_string(), v)).collect())
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
    let choice = tokio::select! {
        c = images::choose(clients, config, args.ami.as_deref(), args.mode) => c?,
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
    template.set_user_data(&base64::engine::general_purpose::STANDARD.encode(&rendered.output));
    template.check_policies()?;
    let plan = changeset::Plan {
        stack: config.stack_name().to_string(),
        template_body: template.body()?,
        parameters: stack_parameters(&template, config, &choice)?,
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
    };

    let cleanup = Cleanup::default();
    let result = tokio::select! {
        r = changeset::run(clients, &plan, &progress, &cleanup, confirmer) => r,
        _ = &mut interrupt => Err(Error::Interrupted { cleaned: Vec::new() }),
    };
    let outcome = match result {
        Ok(o) => o,
        Err(e) => return Err(clean_after(clients, &cleanup, &progress, e).await),
    };
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
    }))
}

fn source_text(s: &images::Source) -> String {
    match s {
        images::Source::Flag => "--ami".into(),
        images::Source::Baked { parameter } => format!("baked, from {parameter}"),
        images::Source::Stock { parameter } => format!("stock AL2023, from {parameter}"),
    }
}

pub(super) fn deploy(args: DeployArgs, ctx: &Context, ui: Ui) -> Result<()> {
    let doc = block_on(async {
        let interrupt = interrupt_listener()?;
        let conf = aws::load(&aws_settings(ctx)).await?;
        let clients = Clients::from_conf(&conf);
        deploy_flow(&clients, &args, ctx, ui, &TtyConfirmer, interrupt).await
    })?;
    if ui.json() {
        ui.emit_json(&doc);
    }
    Ok(())
}
