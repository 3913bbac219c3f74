//! `imgbuild images list` and `images prune`: the project's images and their removal.

use serde_json::json;

use super::*;
use crate::bake::images::{self};
use crate::config::Context;
use crate::error::{Error, Result};
use crate::ui::Ui;

pub(super) fn images_cmd(cmd: crate::cli::ImagesCommand, ctx: &Context, ui: Ui) -> Result<()> {
    use crate::cli::ImagesCommand;
    let config = ctx.config.clone();
    let doc = with_clients(ctx, |clients| async move {
        let rows = images::list(&clients, &config).await?;
        match cmd {
            ImagesCommand::List => {
                if !ui.json() {
                    if rows.is_empty() {
                        ui.info(format!("no images of project {} (run `imgbuild bake`)", config.name));
                    }
                    for r in &rows {
                        ui.info(format!(
                            "{}  {}  {:<9}  Chroma {:<7} {:<19}  {}{}",
                            r.ami,
                            r.created,
                            r.state,
                            r.chroma_version.as_deref().unwrap_or("?"),
                            r.chroma_digest.as_deref().map(|d| &d[..d.len().min(19)]).unwrap_or("(digest not recorded)"),
                            r.digest.as_deref().map(|d| &d[..d.len().min(19)]).unwrap_or("no digest"),
                            if r.in_use.is_empty() { String::new() } else { format!("  in use: {}", r.in_use.join(", ")) }
                        ));
                    }
                }
                Ok(json!({ "ok": true, "images": rows }))
            }
            ImagesCommand::Prune(p) => {
                let doomed: Vec<images::Row> = images::prune_plan(&rows, p.keep).into_iter().cloned().collect();
                let kept_in_use = rows.iter().skip(p.keep).filter(|r| !r.in_use.is_empty()).count();
                for r in &doomed {
                    ui.info(format!("{} {} ({}, snapshots {})", if p.dry_run { "would prune" } else { "prune" }, r.ami, r.created, r.snapshots.join(", ")));
                }
                if kept_in_use > 0 {
                    ui.info(format!("keeping {kept_in_use} older image(s) that are in use"));
                }
                let saving = prune_saving(&clients, config.prices, &doomed).await;
                if !doomed.is_empty() {
                    for l in crate::cost::lines(&saving) {
                        ui.info(l);
                    }
                }
                // One shape for every case (README, "Machine-readable output"): what went, what
                // would go, and how many in-use images were kept.
                if doomed.is_empty() || p.dry_run {
                    return Ok(json!({ "ok": true, "dry_run": p.dry_run, "pruned": [], "would_prune": doomed, "kept_in_use": kept_in_use, "cost": saving }));
                }
                let mut interrupt = Box::pin(interrupt_listener()?);
                if !p.yes {
                    super::need_terminal("pass --yes to prune without asking, or --dry-run to see what would go")?;
                    if !super::confirm_or_interrupt(&format!("Deregister {} image(s) and delete their snapshots?", doomed.len()), &mut interrupt).await? {
                        return Err(Error::Declined("declined: nothing was pruned".into()));
                    }
                }
                let mut pruned = Vec::new();
                for r in &doomed {
                    // Ctrl-C stops between images, never inside one (an image deregistered
                    // without its snapshots deleted would leave them behind unnamed).
                    tokio::select! {
                        biased;
                        _ = &mut interrupt => {
                            return Err(Error::Interrupted { cleaned: pruned.iter().map(|p: &serde_json::Value| format!("pruned {}", p["ami"].as_str().unwrap_or_default())).collect() });
                        }
                        _ = std::future::ready(()) => {}
                    }
                    let snaps = crate::bake::deregister(&clients, &r.ami).await?;
                    ui.info(format!("deregistered {} and deleted {}", r.ami, if snaps.is_empty() { "no snapshots".to_string() } else { snaps.join(", ") }));
                    pruned.push(json!({ "ami": r.ami, "snapshots": snaps }));
                }
                Ok(json!({ "ok": true, "dry_run": false, "pruned": pruned, "would_prune": [], "kept_in_use": kept_in_use, "cost": saving }))
            }
        }
    })?;
    if ui.json() {
        ui.emit_json(&doc);
    }
    Ok(())
}

/// What removing these images' snapshots saves a month, in the region the clients talk to, at the
/// snapshot price of the Price List API (bounded, asked only when something goes) or the table.
pub(super) async fn prune_saving(clients: &crate::aws::Clients, source: crate::config::PriceSource, doomed: &[images::Row]) -> crate::cost::Estimate {
    let region = clients.ec2.config().region().map(|r| r.to_string()).unwrap_or_default();
    let removed: Vec<(String, i64)> = doomed.iter().map(|r| (r.ami.clone(), r.snapshot_gib)).collect();
    let book = if removed.is_empty() {
        crate::cost::Book::table()
    } else {
        crate::cost::book(&clients.pricing, source, &region, &[crate::cost::Product::SnapshotGbMonth].into()).await
    };
    crate::cost::snapshots_with(&region, &[], &removed, &book)
}
