//! `imgbuild gc`: lists what earlier runs left behind (`bake::gc`), asks, removes, says what
//! went. File systems hold Chroma's data: they go only with --delete-data, and the question
//! names each one.

use serde_json::json;

use super::*;
use crate::bake::gc::{self, Kind, Orphan, Scope};
use crate::cli::GcArgs;
use crate::config::Context;
use crate::error::{Error, Result};
use crate::ui::Ui;
use crate::ui::progress::Progress;

pub(super) fn gc(args: GcArgs, ctx: &Context, ui: Ui) -> Result<()> {
    // Refused before any AWS call: without a terminal nothing can be confirmed.
    if !args.dry_run && !args.yes {
        super::need_terminal("pass --dry-run to see what was left behind, then --yes to remove it")?;
    }
    let config = ctx.config.clone();
    let scope = Scope {
        project: config.name.clone(),
        stacks: vec![config.stack_name().to_string(), super::bake_prereqs_stack(&config)],
        document: crate::bake::document_name(&config),
        keep_file_system: config.efs.file_system_id.clone(),
        older_than: args.older_than,
        now: SystemTime::now(),
    };
    let waits = waits(&config, &WaitArgs { wait: false, timeout: None });
    let doc = with_clients(ctx, |clients| async move {
        let found = gc::find(&clients, &scope).await?;
        let (doomed, kept): (Vec<Orphan>, Vec<Orphan>) = found.into_iter().partition(|o| o.kind != Kind::FileSystem || args.delete_data);
        if doomed.is_empty() && kept.is_empty() {
            ui.info(format!("nothing left behind by project {} in this region", scope.project));
        }
        for o in &doomed {
            ui.info(format!("{} {} {}: {}", if args.dry_run { "would remove" } else { "left behind:" }, o.kind.label(), o.id, o.detail));
        }
        for o in &kept {
            ui.info(format!("kept {} {}: {} (pass --delete-data to delete it with its data)", o.kind.label(), o.id, o.detail));
        }
        let report = |removed: &[Orphan], would: &[Orphan]| json!({ "ok": true, "dry_run": args.dry_run, "older_than_secs": scope.older_than.as_secs(), "removed": removed, "would_remove": would, "kept": kept });
        if doomed.is_empty() || args.dry_run {
            return Ok(report(&[], &doomed));
        }
        let mut interrupt = Box::pin(interrupt_listener()?);
        if !args.yes {
            let data: Vec<&str> = doomed.iter().filter(|o| o.kind == Kind::FileSystem).map(|o| o.id.as_str()).collect();
            let question = if data.is_empty() {
                format!("Remove these {} item(s)?", doomed.len())
            } else {
                format!(
                    "Remove these {} item(s), INCLUDING file system(s) {} and every collection on them? This cannot be undone.",
                    doomed.len(),
                    data.join(", ")
                )
            };
            if !super::confirm_or_interrupt(&question, &mut interrupt).await? {
                return Err(Error::Declined("declined: nothing was removed".into()));
            }
        }
        let progress = Progress::new(ui, "removing what was left behind");
        let mut removed: Vec<Orphan> = Vec::new();
        for o in &doomed {
            // Ctrl-C stops between items, never inside one.
            tokio::select! {
                biased;
                _ = &mut interrupt => {
                    return Err(Error::Interrupted { cleaned: removed.iter().map(|r| format!("removed {} {}", r.kind.label(), r.id)).collect() });
                }
                _ = std::future::ready(()) => {}
            }
            if let Err(e) = gc::remove(&clients, o, waits, &progress).await {
                let done: Vec<String> = removed.iter().map(|r| format!("{} {}", r.kind.label(), r.id)).collect();
                progress.line(&format!("removed before the failure: {}", if done.is_empty() { "nothing".to_string() } else { done.join(", ") }));
                return Err(e);
            }
            progress.line(&format!("removed {} {}", o.kind.label(), o.id));
            removed.push(o.clone());
        }
        Ok(report(&removed, &[]))
    })?;
    if ui.json() {
        ui.emit_json(&doc);
    }
    Ok(())
}
