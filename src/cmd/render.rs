//! `imgbuild render-userdata`: render, validate, print or write the user-data.

use std::io::{IsTerminal, Write};

use base64::Engine;
use serde_json::json;

use super::*;
use crate::check::userdata::{self as validate, Report};
use crate::cli::RenderArgs;
use crate::config::Context;
use crate::error::{Error, Result};
use crate::render::{self, Inputs, Rendered, USERDATA_LIMIT};
use crate::ui::Ui;

pub(super) fn failed_checks(what: &str, report: &Report) -> Error {
    let names: Vec<_> = report.failures().map(|c| c.name.as_str()).collect();
    Error::Validation(format!("{what} failed {} check(s): {}", names.len(), names.join(", ")))
}

pub(super) fn render_userdata(args: RenderArgs, ctx: &Context, ui: Ui) -> Result<()> {
    if args.gzip && !args.base64 && args.out.is_none() && !ui.json() && std::io::stdout().is_terminal() {
        return Err(Error::Invalid("refusing to write gzip to a terminal: add --out FILE or --base64".into()));
    }
    let inputs = Inputs::new(&ctx.config, ctx.region.as_deref(), args.mode, args.format, args.gzip)?;
    let rendered = render::render(&inputs)?;
    let report = validate::validate(&rendered, &ctx.config, inputs.profile, tools(&args.tools));
    ui.report("validate", &report);
    if !report.ok() {
        return Err(failed_checks("the rendered user-data", &report));
    }

    let payload: Vec<u8> = if args.base64 { base64::engine::general_purpose::STANDARD.encode(&rendered.output).into_bytes() } else { rendered.output.clone() };
    let sha = rendered.sha256();
    ui.info(summary(&rendered, &sha, ctx));
    for note in &rendered.deploy_notes {
        ui.detail(format!("deploy-time value: {note}"));
    }
    if rendered.budget.downloads.is_empty() {
        ui.detail("boot downloads: nothing");
    }
    for d in &rendered.budget.downloads {
        ui.detail(format!("boot downloads: {} {} from {}", d.kind, d.what, d.from));
    }
    for (i, step) in rendered.budget.steps.iter().enumerate() {
        ui.detail(format!("boot step {}: {step}", i + 1));
    }

    if let Some(out) = &args.out {
        write_atomically(out, &payload)?;
        ui.info(format!("wrote {}", out.display()));
    }
    if ui.json() {
        let mut doc = summary_json(&rendered, &sha, &report);
        doc["config"] = json!(ctx.source.to_string());
        match (&args.out, args.base64 || rendered.gzip) {
            (Some(out), _) => doc["out"] = json!(out),
            (None, true) => doc["content_base64"] = json!(base64::engine::general_purpose::STANDARD.encode(&rendered.output)),
            (None, false) => doc["content"] = json!(String::from_utf8_lossy(&rendered.output)),
        }
        ui.emit_json(&doc);
    } else if args.out.is_none() {
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(&payload).and_then(|_| stdout.flush()).map_err(|e| Error::io("writing", "stdout", e))?;
        if args.base64 {
            let _ = writeln!(stdout);
        }
    }
    Ok(())
}

fn summary(r: &Rendered, sha: &str, ctx: &Context) -> String {
    let size = if r.gzip { format!("{} bytes gzipped ({} raw)", r.output.len(), r.raw.len()) } else { format!("{} bytes", r.raw.len()) };
    format!(
        "user-data: {} mode, {}, Chroma {}, storage {}: {size} of {USERDATA_LIMIT}, margin {}; sha256 {sha}",
        r.mode.as_str(),
        r.format.as_str(),
        ctx.config.chroma.version,
        ctx.config.storage.mode.as_str(),
        USERDATA_LIMIT.saturating_sub(r.output.len()),
    )
}

pub(super) fn summary_json(r: &Rendered, sha: &str, report: &Report) -> serde_json::Value {
    json!({
        "ok": report.ok(),
        "mode": r.mode,
        "format": r.format,
        "gzip": r.gzip,
        "bytes_raw": r.raw.len(),
        "bytes": r.output.len(),
        "limit": USERDATA_LIMIT,
        "margin": USERDATA_LIMIT as i64 - r.output.len() as i64,
        "sha256": sha,
        "deploy_time_values": r.deploy_notes,
        "boot": r.budget,
        "checks": report.checks,
    })
}
