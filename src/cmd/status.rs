//! `imgbuild status`: the stack's state, outputs, alarms, events and targets, as text or JSON.

use serde_json::json;

use super::*;
use crate::cli::StatusArgs;
use crate::config::Context;
use crate::error::Result;
use crate::ui::Ui;

pub(super) fn status(args: StatusArgs, ctx: &Context, ui: Ui) -> Result<()> {
    let name = ctx.config.stack_name().to_string();
    let drift_waits = waits(&ctx.config, &crate::cli::WaitArgs { wait: true, timeout: args.timeout });
    let (st, drift) = with_clients(ctx, |clients| async move {
        let st = crate::stack::ops::status(&clients, &name, args.events).await?;
        let drift = if args.drift && st.exists {
            let progress = crate::ui::progress::Progress::new(ui, &format!("detecting drift of stack {name}"));
            Some(crate::stack::drift::detect(&clients.cfn, &name, drift_waits, &progress).await?)
        } else {
            None
        };
        Ok((st, drift))
    })?;
    if ui.json() {
        ui.emit_json(&json!({ "ok": true, "status": st, "drift": drift }));
        return Ok(());
    }
    if let Some(d) = &drift {
        ui.info(format!("drift: {} ({}{})", d.status, d.detection, d.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default()));
        for r in &d.drifted {
            ui.info(format!("  {}", r.line()));
        }
    }
    if !st.exists {
        ui.info(format!("stack {} is not deployed (run `imgbuild deploy`)", st.stack));
        return Ok(());
    }
    ui.info(format!(
        "stack {}: {}{} (last change {})",
        st.stack,
        st.status.as_deref().unwrap_or("?"),
        st.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default(),
        st.updated.as_deref().unwrap_or("?")
    ));
    print_outputs(ui, &st.outputs);
    if !st.targets.is_empty() {
        ui.info("instances behind the load balancer:");
        for t in &st.targets {
            ui.info(format!(
                "  {}  target {}{}  instance {}  {} {}",
                t.instance_id,
                t.health,
                t.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default(),
                t.instance_state.as_deref().unwrap_or("?"),
                t.instance_type.as_deref().unwrap_or(""),
                t.image_id.as_deref().unwrap_or("")
            ));
        }
    }
    if !st.alarms.is_empty() {
        ui.info("alarms (CloudWatch):");
        for a in &st.alarms {
            ui.info(format!("  {:<17} {}{}", a.state, a.name, if a.reason.is_empty() { String::new() } else { format!(": {}", a.reason) }));
        }
    }
    if let Some(e) = &st.alarms_error {
        ui.info(format!("alarms: could not read their states: {e}"));
    }
    if !st.events.is_empty() {
        ui.info("recent events (newest first):");
        for e in &st.events {
            ui.info(format!(
                "  {}  {:<28} {} ({}){}",
                e.time,
                e.status,
                e.logical_id,
                e.resource_type,
                e.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default()
            ));
        }
    }
    Ok(())
}
