//! `imgbuild backup` and `imgbuild backup list`: a consistent copy through Run Command, then an
//! on-demand AWS Backup job; the project's recovery points.

use serde_json::{Value, json};

use super::*;
use crate::backup;
use crate::cli::{BackupArgs, BackupCommand};
use crate::config::Context;
use crate::error::Result;
use crate::ui::Ui;
use crate::ui::progress::Progress;

pub(super) fn backup_cmd(args: BackupArgs, ctx: &Context, ui: Ui) -> Result<()> {
    let doc = with_clients(ctx, |clients| async move { backup_flow(&clients, &args, ctx, ui, &run_token()).await })?;
    if ui.json() {
        ui.emit_json(&doc);
    }
    Ok(())
}

/// Everything `backup` does once the clients exist; `token` names this run (Run Command's
/// result line, the job's idempotency token).
pub async fn backup_flow(clients: &Clients, args: &BackupArgs, ctx: &Context, ui: Ui, token: &str) -> Result<Value> {
    let config = &ctx.config;
    match args.command {
        Some(BackupCommand::List) => {
            let t = backup::target(clients, config.stack_name()).await;
            // Listing needs neither a running instance nor an idle stack: only the vault.
            let (vault, fs_arn) = match t {
                Ok(t) => (t.vault, Some(t.file_system_arn)),
                Err(_) => {
                    let st = crate::stack::describe(&clients.cfn, config.stack_name())
                        .await?
                        .ok_or_else(|| Error::Invalid(format!("stack {} is not deployed: it has no backup vault", config.stack_name())))?;
                    let vault = crate::stack::outputs_of(&st).get("BackupVaultName").cloned().ok_or_else(|| {
                        Error::Invalid(format!("stack {} has no BackupVaultName output: deploy this version of the stack first", config.stack_name()))
                    })?;
                    (vault, None)
                }
            };
            let points = backup::list(clients, &vault, fs_arn.as_deref(), config.stack_name()).await?;
            print_points(ui, &vault, &points);
            Ok(json!({ "ok": true, "vault": vault, "recovery_points": points }))
        }
        None => {
            let progress = Progress::new(ui, &format!("backing up {}", config.stack_name()));
            let taken = backup::take(clients, config, token, waits(config, &args.wait), !args.no_wait, &progress).await?;
            let q = &taken.quiesced;
            if q.was_running {
                ui.info(format!("Chroma was unavailable for {:.1} s (stopped, {} bytes copied, started again)", q.paused_ms as f64 / 1000.0, q.bytes));
            } else {
                ui.info(format!("Chroma was not running; {} bytes copied without a pause", q.bytes));
            }
            ui.info(format!(
                "recovery point {} ({}): Chroma {}, consistent, kept {} days",
                if taken.job.recovery_point_arn.is_empty() { "pending" } else { &taken.job.recovery_point_arn },
                taken.job.state,
                if q.chroma_version.is_empty() { "unknown" } else { &q.chroma_version },
                config.backup.retention_days
            ));
            let verified = if args.verify {
                let progress = Progress::new(ui, "verifying the recovery point");
                let checks = backup::verify_taken(clients, config, &taken, token, waits(config, &args.wait), &progress).await?;
                drop(progress);
                super::restore::print_checks(ui, &checks);
                if checks.iter().any(|c| !c.ok) {
                    return Err(Error::Tool(format!(
                        "verify failed: a restore of {} does not hold what the backup recorded; the point is not tagged verified",
                        taken.job.recovery_point_arn
                    )));
                }
                ui.info(format!("verified: a restore of {} holds every collection with its count", taken.job.recovery_point_arn));
                Some(checks)
            } else {
                None
            };
            Ok(json!({ "ok": true, "backup": taken, "verified": verified }))
        }
    }
}

fn print_points(ui: Ui, vault: &str, points: &[backup::RecoveryPoint]) {
    if points.is_empty() {
        ui.info(format!("no recovery points of this project in vault {vault}"));
        return;
    }
    ui.info(format!("recovery points in vault {vault} (newest first):"));
    for p in points {
        ui.info(format!(
            "  {}  {:<10} {:>12}  Chroma {:<8} {}{}  {}",
            p.created,
            p.status,
            p.size_bytes.map(|b| format!("{b} B")).unwrap_or_else(|| "?".into()),
            p.chroma_version.as_deref().filter(|v| !v.is_empty()).unwrap_or("?"),
            if p.consistent() { "consistent" } else { "scheduled (taken while Chroma served)" },
            if p.verified.is_some() { "  verified" } else { "" },
            p.arn
        ));
    }
}
