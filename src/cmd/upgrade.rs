//! `imgbuild upgrade --to VERSION` and `imgbuild rollback`: a consistent backup before anything
//! changes, the new version baked (for baked images) and deployed, smoke; the way back recorded
//! for one command.

use std::future::Future;
use std::path::PathBuf;

use serde_json::{Value, json};

use super::*;
use crate::backup::{self, upgrade};
use crate::bake::images;
use crate::cli::{BakeArgs, RestoreArgs, RollbackArgs, UpgradeArgs};
use crate::config::{Context, Source};
use crate::error::{Error, Result};
use crate::stack::changeset::{Confirmer, TtyConfirmer};
use crate::ui::Ui;
use crate::ui::progress::Progress;

pub(super) fn upgrade_cmd(args: UpgradeArgs, ctx: &Context, ui: Ui) -> Result<()> {
    run_flow(ctx, ui, |clients, region, interrupt| async move { upgrade_flow(&clients, &region, &args, ctx, ui, &TtyConfirmer, interrupt, &run_token()).await })
}

pub(super) fn rollback_cmd(args: RollbackArgs, ctx: &Context, ui: Ui) -> Result<()> {
    run_flow(ctx, ui, |clients, _, interrupt| async move { rollback_flow(&clients, &args, ctx, ui, &TtyConfirmer, interrupt, &run_token()).await })
}

/// Where the rollback record lives: next to the config file, else in the working directory.
pub fn rollback_path(ctx: &Context) -> PathBuf {
    match &ctx.source {
        Source::File(p) => p.parent().map(|d| d.join(upgrade::ROLLBACK_FILE)).unwrap_or_else(|| PathBuf::from(upgrade::ROLLBACK_FILE)),
        Source::Defaults => PathBuf::from(upgrade::ROLLBACK_FILE),
    }
}

fn with_version(ctx: &Context, version: &str) -> Context {
    let mut c = ctx.clone();
    c.config.chroma.version = version.to_string();
    c
}

#[allow(clippy::too_many_arguments)]
pub async fn upgrade_flow(
    clients: &Clients,
    region: &str,
    args: &UpgradeArgs,
    ctx: &Context,
    ui: Ui,
    confirmer: &dyn Confirmer,
    interrupt: impl Future<Output = ()>,
    token: &str,
) -> Result<Value> {
    let config = &ctx.config;
    // An unknown version is refused before any AWS call.
    upgrade::check(&args.to, None)?;
    let t = backup::target(clients, config.stack_name()).await?;
    let poll = waits(config, &args.wait).poll;
    let data_version = upgrade::data_version(clients, config, &t, poll).await?;
    let size = clients
        .efs
        .describe_file_systems()
        .file_system_id(&t.file_system_id)
        .send()
        .await
        .map_err(|e| aws::err("DescribeFileSystems", t.file_system_id.clone(), e))?
        .file_systems()
        .first()
        .and_then(|f| f.size_in_bytes())
        .map(|s| s.value())
        .unwrap_or(0);
    let choice = images::choose(clients, config, None, None).await?;
    let bakes = matches!(choice.source, images::Source::Baked { .. });
    // The way back is the image the stack runs: its ImageId parameter, which CloudFormation keeps
    // with the stack. The choice answers what a deploy would pick today, and the public AL2023
    // parameter moves with every release (deploy keeps the running one until --update-base).
    let running = crate::stack::describe(&clients.cfn, &t.stack)
        .await?
        .map(|s| crate::stack::parameters_of(&s))
        .and_then(|p| p.get("ImageId").cloned())
        .filter(|a| !a.is_empty());
    let plan = upgrade::plan(config, &t.stack, data_version.as_deref(), &args.to, size, bakes)?;
    print_plan(ui, &plan);
    if args.dry_run {
        return Ok(json!({ "ok": true, "dry_run": true, "plan": plan }));
    }

    let progress = Progress::new(ui, "backing up before the upgrade");
    let taken = backup::take(clients, config, token, waits(config, &args.wait), true, &progress).await?;
    drop(progress);
    let record = upgrade::RollbackRecord {
        stack: t.stack.clone(),
        from_version: data_version.clone().unwrap_or_else(|| config.chroma.version.clone()),
        to_version: args.to.clone(),
        previous_image: running.unwrap_or_else(|| choice.ami.clone()),
        previous_mode: Some(choice.mode),
        recovery_point: taken.job.recovery_point_arn.clone(),
    };
    let path = rollback_path(ctx);
    write_file(&path, serde_json::to_string_pretty(&record).map_err(|e| Error::Tool(e.to_string()))?.as_bytes())?;
    ui.info(format!(
        "pre-upgrade recovery point {} (Chroma paused {:.1} s); the way back is recorded in {}",
        record.recovery_point,
        taken.quiesced.paused_ms as f64 / 1000.0,
        path.display()
    ));

    let next = with_version(ctx, &args.to);
    tokio::pin!(interrupt);
    if bakes {
        let bake_args = BakeArgs {
            force: false,
            update_base: false,
            dry_run: false,
            keep_on_failure: false,
            regions: Vec::new(),
            timeout: None,
            tools: crate::cli::ToolArgs { require_tools: false, no_tools: false },
        };
        bake_flow(clients, region, &bake_args, &next, ui, &mut interrupt).await?;
    }
    let deploy_args = plain_deploy_args(args.yes, args.wait.timeout);
    let deployed = deploy_flow(clients, &deploy_args, &next, ui, confirmer, &mut interrupt).await?;
    if !deployed["deploy"]["executed"].as_bool().unwrap_or(false) {
        ui.info(format!("not deployed: Chroma {} still serves; set chroma.version: {} and deploy when ready", record.from_version, args.to));
        return Ok(json!({ "ok": true, "plan": plan, "rollback": record, "deploy": deployed["deploy"] }));
    }
    let api = deployed["deploy"]["outputs"]["ApiId"].as_str().map(String::from);
    let profile = profile_of(&next.config)?;
    let report = match api {
        Some(api) => crate::smoke::through_api_gateway(clients, &api, profile).await?,
        None => return Err(Error::Invalid(format!("stack {} has no ApiId output: cannot run smoke after the upgrade", t.stack))),
    };
    after_smoke(&report, &record)?;
    ui.info(format!("upgraded to Chroma {}; set chroma.version: {} in your imgbuild.yaml so later deploys keep it", args.to, args.to));
    Ok(json!({ "ok": true, "plan": plan, "rollback": record, "deploy": deployed["deploy"], "smoke": report }))
}

/// A failed smoke after the upgrade is an error that hands over the way back: the previous image
/// and the pre-upgrade recovery point, together, in one command.
pub fn after_smoke(report: &crate::smoke::Report, record: &upgrade::RollbackRecord) -> Result<()> {
    if report.ok() {
        return Ok(());
    }
    let failed: Vec<_> = report.steps.iter().filter(|s| !s.ok).map(|s| format!("{}: {}", s.name, s.detail)).collect();
    Err(Error::SmokeFailed(format!(
        "Chroma {} is deployed but smoke failed ({}). Go back with `imgbuild rollback`: image {} and recovery point {} (Chroma {}), together",
        record.to_version,
        failed.join("; "),
        record.previous_image,
        record.recovery_point,
        record.from_version
    )))
}

fn print_plan(ui: Ui, p: &upgrade::Plan) {
    ui.info(format!("upgrade plan for {}: Chroma {} -> {}", p.stack, p.data_version.as_deref().unwrap_or("(no marker)"), p.to));
    ui.info(format!("  1. consistent backup: Chroma down about {} s while {} bytes are copied", p.pause_secs_estimate, p.data_bytes));
    if p.bakes {
        ui.info("  2. bake an image with the new version (Chroma keeps serving)");
    }
    ui.info(format!(
        "  {}. deploy: the instance is replaced; Chroma is down until the new one signals (at most {} s)",
        if p.bakes { 3 } else { 2 },
        p.replace_secs_max
    ));
    ui.info(format!("  {}. smoke; on failure `imgbuild rollback` restores the pre-upgrade point with the previous image", if p.bakes { 4 } else { 3 }));
    ui.info(format!("  cannot be undone in place: {}", p.one_way));
    ui.info(format!(
        "  the extra recovery point: about ${:.2} for its {} days (AWS Backup EFS warm storage, ${}/GB-month list price)",
        p.extra_point_usd,
        p.retention_days,
        upgrade::BACKUP_USD_PER_GB_MONTH
    ));
}

pub async fn rollback_flow(
    clients: &Clients,
    args: &RollbackArgs,
    ctx: &Context,
    ui: Ui,
    confirmer: &dyn Confirmer,
    interrupt: impl Future<Output = ()>,
    token: &str,
) -> Result<Value> {
    let path = rollback_path(ctx);
    let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            Error::Invalid(format!("{} does not exist: there is no upgrade to roll back (imgbuild upgrade writes it)", path.display()))
        }
        _ => Error::io("reading", &path, e),
    })?;
    let record: upgrade::RollbackRecord =
        serde_json::from_str(&text).map_err(|e| Error::Invalid(format!("{}: not a rollback record imgbuild wrote: {e}", path.display())))?;
    if record.stack != ctx.config.stack_name() {
        return Err(Error::Invalid(format!(
            "{} is the record of stack {}, not {}; nothing was changed",
            path.display(),
            record.stack,
            ctx.config.stack_name()
        )));
    }
    ui.info(format!(
        "rolling back {} to Chroma {} on image {} with recovery point {}",
        record.stack, record.from_version, record.previous_image, record.recovery_point
    ));
    let restore_args = RestoreArgs {
        recovery_point: record.recovery_point.clone(),
        yes: args.yes,
        ami: Some(record.previous_image.clone()),
        mode: record.previous_mode,
        verify: false,
        wait: crate::cli::WaitArgs { wait: false, timeout: args.wait.timeout },
    };
    let doc = restore_flow(clients, &restore_args, &with_version(ctx, &record.from_version), ui, confirmer, interrupt, token).await?;
    Ok(json!({ "ok": true, "rollback": record, "restore": doc }))
}
