//! `imgbuild restore RECOVERY_POINT`: checks, restore into a new file system, the restored data
//! moved into place, then the deploy (with its diff and confirmation) onto the new file system
//! through the reattach path (`efs.file_system_id`). The old file system is kept and named.

use std::future::Future;

use serde_json::{Value, json};

use super::*;
use crate::backup::{self, inventory, restore};
use crate::cli::{DeployArgs, RestoreArgs};
use crate::config::Context;
use crate::error::{Error, Result};
use crate::stack::changeset::{Confirmer, TtyConfirmer};
use crate::ui::Ui;
use crate::ui::progress::Progress;

pub(super) fn restore_cmd(args: RestoreArgs, ctx: &Context, ui: Ui) -> Result<()> {
    run_flow(ctx, ui, |clients, _, interrupt| async move { restore_flow(&clients, &args, ctx, ui, &TtyConfirmer, interrupt, &run_token()).await })
}

/// The context the redeploy runs with: the same config, reattaching `file_system_id`.
pub fn reattach_context(ctx: &Context, file_system_id: &str) -> Context {
    let mut c = ctx.clone();
    c.config.efs.file_system_id = Some(file_system_id.to_string());
    c
}

pub async fn restore_flow(
    clients: &Clients,
    args: &RestoreArgs,
    ctx: &Context,
    ui: Ui,
    confirmer: &dyn Confirmer,
    interrupt: impl Future<Output = ()>,
    token: &str,
) -> Result<Value> {
    let config = &ctx.config;
    // Every check first: a bad recovery point, another project's, or a busy stack changes nothing.
    restore::check_arn(&args.recovery_point)?;
    let t = backup::target(clients, config.stack_name()).await?;
    let point = restore::check_point(clients, &t, &args.recovery_point).await?;
    if let Some(v) = point.chroma_version.as_deref().filter(|v| !v.is_empty())
        && newer(v, &config.chroma.version)
    {
        return Err(Error::Invalid(format!(
            "recovery point {} holds data written by Chroma {v}, newer than chroma.version {}; Chroma's migrations only go forward: set chroma.version to {v} or newer first. Nothing was changed",
            point.arn, config.chroma.version
        )));
    }
    if point.kind.as_deref() != Some(backup::KIND_CONSISTENT) {
        ui.warn(format!("recovery point {} was taken by the daily plan while Chroma served: its SQLite database may need Chroma's own recovery", point.arn));
    }

    // A verify compares with what the backup recorded: without a record there is nothing to
    // verify against, and that is said before anything is created.
    let recorded = match (&point.recorded, args.verify) {
        (None, true) => {
            return Err(Error::Invalid(format!(
                "recovery point {} has no record of its collections (taken by the daily plan, or before imgbuild recorded them): it cannot be verified; restore it without --verify",
                point.arn
            )));
        }
        (r, _) => r.clone(),
    };

    let progress = Progress::new(ui, "restoring");
    let waits = waits(config, &args.wait);
    let (job, new_fs) = restore::restore_into_new(clients, &t, &point, token, waits, &progress).await?;
    restore::name_file_system(clients, &new_fs, &format!("{}-restored-{token}", t.stack)).await?;
    let (promoted, found) = restore::promote(clients, config, &t, &new_fs, token, args.verify, waits.poll, &progress).await?;
    progress.line(&format!(
        "restored {} data (Chroma {}) onto {new_fs}",
        promoted.kind,
        if promoted.chroma_version.is_empty() { "?" } else { &promoted.chroma_version }
    ));
    drop(progress);
    let verdict = match (recorded, found) {
        (Some(recorded), Some(found)) => {
            let checks = inventory::compare(&recorded, &found);
            print_checks(ui, &checks);
            if checks.iter().any(|c| !c.ok) {
                return Err(Error::Tool(format!(
                    "verify failed: the restored copy {new_fs} does not hold what recovery point {} recorded; nothing was switched, Chroma still serves {}. The copy is kept for inspection (named {}-restored-{token})",
                    point.arn, t.file_system_id, t.stack
                )));
            }
            Some(checks)
        }
        _ => None,
    };

    let deploy_args = DeployArgs { ami: args.ami.clone(), mode: args.mode, ..plain_deploy_args(args.yes, args.wait.timeout) };
    let deployed = deploy_flow(clients, &deploy_args, &reattach_context(ctx, &new_fs), ui, confirmer, interrupt).await?;
    let executed = deployed["deploy"]["executed"].as_bool().unwrap_or(false);
    let old_name = format!("{}-before-restore-{token}", t.stack);
    if executed {
        restore::name_file_system(clients, &t.file_system_id, &old_name).await?;
        ui.info(format!("Chroma now serves {new_fs}, restored from {}. The old file system {} is kept, named {old_name}.", point.arn, t.file_system_id));
        if ctx.config.efs.file_system_id.is_some() {
            ui.info(format!(
                "Your imgbuild.yaml names a file system: set `efs.file_system_id: {new_fs}` there, or the next deploy goes back to {}.",
                t.file_system_id
            ));
        } else {
            ui.info(format!("Later deploys keep {new_fs}: the stack's own FileSystemId is the record while imgbuild.yaml names none."));
        }
    } else {
        ui.info(format!(
            "not deployed: Chroma still serves {}. The restored copy {new_fs} is kept; deploy onto it with efs.file_system_id: {new_fs}, or delete it.",
            t.file_system_id
        ));
    }
    Ok(json!({
        "ok": true,
        "recovery_point": point,
        "restore_job": job,
        "new_file_system": new_fs,
        "old_file_system": t.file_system_id,
        "old_file_system_name": if executed { Some(old_name) } else { None },
        "promoted": promoted,
        "verified": verdict,
        "deploy": deployed["deploy"],
    }))
}

/// One line per collection: recorded count, found count, pass or fail.
pub fn print_checks(ui: Ui, checks: &[inventory::Check]) {
    ui.info("verify (collection: recorded / found in the restored copy):");
    for c in checks {
        let n = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "missing".into());
        ui.info(format!("  {} {}: {} / {}", if c.ok { "pass" } else { "FAIL" }, c.collection, n(c.recorded), n(c.found)));
    }
}

/// Whether version `a` is newer than `b` (both as the config writes them).
fn newer(a: &str, b: &str) -> bool {
    match (chroma::parse_version(a), chroma::parse_version(b)) {
        (Ok(a), Ok(b)) => a > b,
        _ => false,
    }
}
