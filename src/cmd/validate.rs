//! `imgbuild validate`: the config, every user-data variant, the stack template and the bake
//! document, each with every check that applies.

use std::path::Path;

use base64::Engine;
use serde_json::json;

use super::render::summary_json;
use super::*;
use crate::check::userdata::{self as validate};
use crate::cli::ValidateArgs;
use crate::config::Context;
use crate::error::{Error, Result};
use crate::render::{self, Format, Inputs, Mode};
use crate::ui::Ui;

pub(super) fn validate_all(args: ValidateArgs, ctx: &Context, ui: Ui) -> Result<()> {
    ui.info(format!("config: {} is valid", ctx.source));
    let tools = tools(&args.tools);
    let mut variants = Vec::new();
    let mut failed = Vec::new();
    for mode in [Mode::Full, Mode::Baked] {
        for format in [Format::CloudConfig, Format::Mime] {
            let inputs = Inputs::new(&ctx.config, ctx.region.as_deref(), mode, format, false)?;
            let rendered = render::render(&inputs)?;
            let report = validate::validate(&rendered, &ctx.config, inputs.profile, tools);
            let title = format!("user-data {}/{}", mode.as_str(), format.as_str());
            ui.report(&title, &report);
            let passed = report.checks.iter().filter(|c| c.status == validate::Status::Pass).count();
            ui.info(format!(
                "{title}: {} ({passed} of {} checks passed, {} bytes)",
                if report.ok() { "ok" } else { "FAILED" },
                report.checks.len(),
                rendered.output.len()
            ));
            if !report.ok() {
                failed.extend(report.failures().map(|c| format!("{title}: {}", c.name)));
            }
            let sha = rendered.sha256();
            variants.push(summary_json(&rendered, &sha, &report));
        }
    }
    let template = check_template(args.template.as_deref(), ctx, ui, &mut failed)?;
    let document = check_document(args.document.as_deref(), ctx, ui, tools, &mut failed)?;
    let result = if failed.is_empty() { Ok(()) } else { Err(Error::Validation(format!("validation failed {} check(s): {}", failed.len(), failed.join("; ")))) };
    if ui.json() {
        let mut doc =
            json!({ "ok": failed.is_empty(), "config": ctx.source.to_string(), "userdata": variants, "template": template, "bake_document": document });
        if let Err(e) = &result {
            doc["error"] = crate::ui::error_json(e);
        }
        ui.emit_json(&doc);
    }
    result
}

/// The automation document as bake registers it (the bake script inside), checked statically,
/// and the bake script through shellcheck.
fn check_document(path: Option<&Path>, ctx: &Context, ui: Ui, tools: validate::Tools, failed: &mut Vec<String>) -> Result<serde_json::Value> {
    let profile = crate::chroma::profile(&crate::chroma::parse_version(&ctx.config.chroma.version).map_err(Error::Invalid)?).map_err(Error::Invalid)?;
    let (script, _) = crate::bake::bake_script(&ctx.config, profile)?;
    let (document, title) = match path {
        Some(p) => (
            std::fs::read_to_string(p).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Error::Invalid(format!("document {} does not exist", p.display())),
                _ => Error::io("reading document", p, e),
            })?,
            format!("document {}", p.display()),
        ),
        None => {
            let doc = crate::bake::document(&script)?;
            // Without a region the key is shown as configured; bake resolves it for its region.
            let key = match ctx.region.as_deref() {
                Some(home) => ctx.config.bake.kms_key_in(home, home).map_err(Error::Invalid)?,
                None => ctx.config.bake.kms_key_id.clone(),
            };
            let doc = match key {
                Some(k) => crate::bake::encrypt_build_volume(&doc, &k)?,
                None => doc,
            };
            (doc, format!("document {}", crate::bake::DOCUMENT_TEMPLATE_NAME))
        }
    };
    let findings = crate::check::automation::check(&document);
    for f in &findings {
        let at = match (f.line, f.field.is_empty()) {
            (Some(l), false) => format!("line {l}, `{}`", f.field),
            (Some(l), true) => format!("line {l}"),
            (None, false) => format!("`{}`", f.field),
            (None, true) => "document".to_string(),
        };
        ui.info(format!("{title}:{at}: FAIL {}: {}", f.at, f.message));
        failed.push(format!("{title}: {}", f.at));
    }
    let report = validate::validate_script("bake.sh", &script, tools);
    ui.report("bake script", &report);
    failed.extend(report.failures().map(|c| format!("bake script: {}", c.name)));
    ui.info(format!(
        "{title}: {} ({} bytes with the bake script); bake script: {}",
        if findings.is_empty() {
            "references, step targets, outputs and required inputs check out".to_string()
        } else {
            format!("{} problem(s)", findings.len())
        },
        document.len(),
        if report.ok() { "ok" } else { "FAILED" }
    ));
    Ok(json!({ "findings": findings, "bytes": document.len(), "script_checks": report.checks }))
}

/// The stack template as deploy would send it (default full-mode user-data inside): size and
/// the security policies.
fn check_template(path: Option<&Path>, ctx: &Context, ui: Ui, failed: &mut Vec<String>) -> Result<serde_json::Value> {
    let mut template = crate::stack::template::Template::load(path)?;
    let inputs = Inputs::new(&ctx.config, ctx.region.as_deref(), Mode::Full, Format::CloudConfig, true)?;
    let rendered = render::render(&inputs)?;
    template.set_user_data(&base64::engine::general_purpose::STANDARD.encode(&rendered.output))?;
    let title = format!("template {}", template.name);
    let size = match template.body() {
        Ok(body) => {
            ui.detail(format!("{title}: ok   size: {} bytes of {}", body.len(), crate::stack::template::BODY_LIMIT));
            json!({ "ok": true, "bytes": body.len() })
        }
        Err(e) => {
            ui.info(format!("{title}: FAIL size: {e}"));
            failed.push(format!("{title}: size"));
            json!({ "ok": false, "error": e.to_string() })
        }
    };
    let rules = crate::check::guard::evaluate(&template.name, template.document())?;
    for r in &rules {
        match r.verdict {
            crate::check::guard::Verdict::Fail => {
                let at = template.locate(&r.detail).map(|l| format!(":{l}")).unwrap_or_default();
                ui.info(format!("{title}{at}: FAIL policy {} ({}): {}", r.rule, r.file, r.detail));
                failed.push(format!("{title}: policy {}", r.rule));
            }
            crate::check::guard::Verdict::Pass => ui.detail(format!("{title}: ok   policy {} ({})", r.rule, r.file)),
            crate::check::guard::Verdict::Skip => ui.detail(format!("{title}: skip policy {} ({}): {}", r.rule, r.file, r.detail)),
        }
    }
    let passed = rules.iter().filter(|r| r.verdict == crate::check::guard::Verdict::Pass).count();
    ui.info(format!("{title}: {passed} of {} security policies pass", rules.len()));
    Ok(json!({ "name": template.name, "size": size, "policies": rules }))
}
