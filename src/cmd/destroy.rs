//! `imgbuild destroy`: asks, then removes the stack through `stack::ops`, keeping the data unless
//! told otherwise.

use serde_json::json;

use super::*;
use crate::cli::DestroyArgs;
use crate::config::Context;
use crate::error::{Error, Result};
use crate::stack::changeset::{Confirmer, TtyConfirmer};
use crate::ui::Ui;
use crate::ui::progress::Progress;

pub(super) fn destroy(args: DestroyArgs, ctx: &Context, ui: Ui) -> Result<()> {
    let name = ctx.config.stack_name().to_string();
    let waits = waits(&ctx.config, &args.wait);
    let done = with_clients(ctx, |clients| async move {
        let interrupt = interrupt_listener()?;
        let protected = crate::stack::describe(&clients.cfn, &name).await?.is_some_and(|s| crate::stack::protect::termination_protected(&s));
        if protected {
            ui.info(format!("stack {name} has termination protection on: destroy turns it off (UpdateTerminationProtection) before deleting it"));
        }
        if !args.yes {
            let question = if args.delete_data {
                format!("Delete stack {name} AND its EFS file system with every collection on it? This cannot be undone.")
            } else {
                format!("Delete stack {name}? (its EFS file system and data are kept)")
            };
            let question = if protected { format!("{question} Its termination protection is turned off first.") } else { question };
            if !TtyConfirmer.confirm(&question).await? {
                return Err(Error::Invalid("not confirmed: nothing was deleted".into()));
            }
        }
        let progress = Progress::new(ui, &format!("destroying {name}"));
        tokio::select! {
            r = crate::stack::ops::destroy(&clients, &name, args.delete_data, args.wait.wait, waits, &progress) => r.map(|d| (d, protected)),
            _ = interrupt => Err(Error::Interrupted { cleaned: vec![format!(
                "nothing: the deletion of {name} goes on in CloudFormation (follow it with `imgbuild status`)"
            )] }),
        }
    })?;
    if ui.json() {
        let (done, protected) = done;
        ui.emit_json(&json!({ "ok": true, "destroy": done, "termination_protection_turned_off": protected }));
    }
    Ok(())
}
