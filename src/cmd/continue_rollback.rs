//! `imgbuild continue-rollback`: the way out of UPDATE_ROLLBACK_FAILED, through
//! `stack::protect::continue_rollback`.

use serde_json::json;

use super::*;
use crate::cli::{ContinueRollbackArgs, WaitArgs};
use crate::config::Context;
use crate::error::{Error, Result};
use crate::stack::changeset::TtyConfirmer;
use crate::ui::Ui;
use crate::ui::progress::Progress;

pub(super) fn continue_rollback(args: ContinueRollbackArgs, ctx: &Context, ui: Ui) -> Result<()> {
    let name = ctx.config.stack_name().to_string();
    let waits = waits(&ctx.config, &WaitArgs { wait: true, timeout: args.timeout });
    let done = with_clients(ctx, |clients| async move {
        let interrupt = interrupt_listener()?;
        let progress = Progress::new(ui, &format!("continuing the rollback of {name}"));
        tokio::select! {
            r = crate::stack::protect::continue_rollback(&clients.cfn, &name, &args.skip, args.yes, &TtyConfirmer, waits, &progress) => r,
            _ = interrupt => Err(Error::Interrupted { cleaned: vec![format!(
                "nothing: if it started, the rollback of {name} goes on in CloudFormation (follow it with `imgbuild status`)"
            )] }),
        }
    })?;
    ui.info(format!("stack {}: {}", done.stack, done.status));
    if ui.json() {
        ui.emit_json(&json!({ "ok": true, "continue_rollback": done }));
    }
    Ok(())
}
