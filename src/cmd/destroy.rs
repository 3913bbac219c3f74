//! `imgbuild destroy`: asks, then removes the stack through `stack::ops`, keeping the data unless
//! told otherwise.

use serde_json::json;

use super::*;
use crate::cli::DestroyArgs;
use crate::config::Context;
use crate::error::{Error, Result};
use crate::ui::Ui;
use crate::ui::progress::Progress;

pub(super) fn destroy(args: DestroyArgs, ctx: &Context, ui: Ui) -> Result<()> {
    if args.bake_prereqs {
        return destroy_bake_prereqs(args, ctx, ui);
    }
    let name = ctx.config.stack_name().to_string();
    let waits = waits(&ctx.config, &args.wait);
    let done = with_clients(ctx, |clients| async move {
        let mut interrupt = Box::pin(interrupt_listener()?);
        if !args.yes {
            super::need_terminal("pass --yes to delete without asking")?;
            let question = if args.delete_data {
                format!("Delete stack {name} AND its EFS file systems with every collection on them? This cannot be undone.")
            } else {
                format!("Delete stack {name}? (its EFS file systems and data are kept)")
            };
            // Asked before any AWS call: a refusal or a "no" needs no credentials and reads nothing.
            let question = format!("{question} Termination protection, when on, is turned off first.");
            if !super::confirm_or_interrupt(&question, &mut interrupt).await? {
                return Err(Error::Declined("declined: nothing was deleted".into()));
            }
        }
        let protected = crate::stack::describe(&clients.cfn, &name).await?.is_some_and(|s| crate::stack::protect::termination_protected(&s));
        if protected {
            ui.info(format!("stack {name} has termination protection on: destroy turns it off (UpdateTerminationProtection) before deleting it"));
        }
        let progress = Progress::new(ui, &format!("destroying {name}"));
        tokio::select! {
            r = crate::stack::ops::destroy(&clients, &name, args.delete_data, args.wait.wait, waits, &progress) => r.map(|d| (d, protected)),
            _ = interrupt => Err(Error::Interrupted { cleaned: vec![format!(
                "nothing: the deletion of {name} goes on in CloudFormation (check on it with `imgbuild status`)"
            )] }),
        }
    })?;
    if ui.json() {
        let (done, protected) = done;
        ui.emit_json(&json!({ "ok": true, "destroy": done, "termination_protection_turned_off": protected }));
    }
    Ok(())
}

/// `destroy --bake-prereqs`: the `<name>-bake` stack bake deployed (a subnet, a security group, an
/// instance profile and a role; no data).
fn destroy_bake_prereqs(args: DestroyArgs, ctx: &Context, ui: Ui) -> Result<()> {
    let name = super::bake_prereqs_stack(&ctx.config);
    let waits = waits(&ctx.config, &args.wait);
    let existed = with_clients(ctx, |clients| async move {
        let mut interrupt = Box::pin(interrupt_listener()?);
        if !args.yes {
            super::need_terminal("pass --yes to delete without asking")?;
            if !super::confirm_or_interrupt(
                &format!("Delete the bake prerequisites stack {name}? (`imgbuild bake` deploys it again when needed)"),
                &mut interrupt,
            )
            .await?
            {
                return Err(Error::Declined("declined: nothing was deleted".into()));
            }
        }
        let protected = crate::stack::describe(&clients.cfn, &name).await?.is_some_and(|s| crate::stack::protect::termination_protected(&s));
        if protected {
            ui.info(format!("stack {name} has termination protection on: destroy turns it off (UpdateTerminationProtection) before deleting it"));
        }
        let progress = Progress::new(ui, &format!("destroying {name}"));
        tokio::select! {
            r = crate::stack::ops::destroy_stack_only(&clients, &name, args.wait.wait, waits, &progress) => r.map(|existed| (name.clone(), existed)),
            _ = interrupt => Err(Error::Interrupted { cleaned: vec![format!(
                "nothing: the deletion of {name} goes on in CloudFormation (check on it with `imgbuild status`)"
            )] }),
        }
    })?;
    if ui.json() {
        ui.emit_json(
            &json!({ "ok": true, "destroy": { "stack": existed.0, "existed": existed.1, "file_system": null, "file_systems": [], "data_deleted": false } }),
        );
    }
    Ok(())
}
