//! `imgbuild init`: a commented starter config.

use serde_json::json;

use super::*;
use crate::cli::InitArgs;
use crate::config::{self};
use crate::error::{Error, Result};
use crate::ui::Ui;

pub(super) fn init(args: InitArgs, global: &crate::cli::GlobalArgs, ui: Ui) -> Result<()> {
    let path = init_path(args.path, global);
    if path.exists() && !args.force {
        return Err(Error::Invalid(format!("{} already exists; pass --force to overwrite it", path.display())));
    }
    write_atomically(&path, config::STARTER.as_bytes())?;
    ui.info(format!("wrote {}; check it with `imgbuild validate`", path.display()));
    if ui.json() {
        ui.emit_json(&json!({ "ok": true, "path": path }));
    }
    Ok(())
}
