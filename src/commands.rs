//! One function per subcommand; each returns its result or an `Error`, and never exits itself.

use std::io::{IsTerminal, Write};
use std::path::Path;

use base64::Engine;
use serde_json::json;

use crate::cli::{Cli, Command, InitArgs, RenderArgs, ValidateArgs};
use crate::config;
use crate::error::{Error, Result};
use crate::plan::{self, Context};
use crate::render::{self, Format, Inputs, Mode, Rendered, USERDATA_LIMIT};
use crate::ui::Ui;
use crate::validate::{self, Report};

pub fn run(cli: Cli, ui: Ui) -> Result<()> {
    match cli.command {
        // init, completions and man must work where the config is missing or broken.
        Command::Init(args) => init(args, &cli.global, ui),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "imgbuild", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
            .render(&mut std::io::stdout())
            .map_err(|e| Error::io("writing", "stdout", e)),
        Command::Doctor => crate::doctor::run(&Context::load(&cli.global)?, ui),
        Command::RenderUserdata(args) => render_userdata(args, &Context::load(&cli.global)?, ui),
        Command::Validate(args) => validate_all(args, &Context::load(&cli.global)?, ui),
        Command::Deploy(args) => crate::remote::deploy(args, &Context::load(&cli.global)?, ui),
        Command::Status(args) => crate::remote::status(args, &Context::load(&cli.global)?, ui),
        Command::Destroy(args) => crate::remote::destroy(args, &Context::load(&cli.global)?, ui),
        Command::Smoke(args) => crate::remote::smoke_cmd(args, &Context::load(&cli.global)?, ui),
        Command::Bake(args) => crate::remote::bake(args, &Context::load(&cli.global)?, ui),
        Command::Images(cmd) => crate::remote::images_cmd(cmd, &Context::load(&cli.global)?, ui),
    }
}

fn init(args: InitArgs, global: &crate::cli::GlobalArgs, ui: Ui) -> Result<()> {
    let path = plan::init_path(args.path, global);
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

fn failed_checks(what: &str, report: &Report) -> Error {
    let names: Vec<_> = report.failures().map(|c| c.name.as_str()).collect();
    Error::Validation(format!("{what} failed {} check(s): {}", names.len(), names.join(", ")))
}

fn render_userdata(args: RenderArgs, ctx: &Context, ui: Ui) -> Result<()> {
    if args.gzip && !args.base64 && args.out.is_none() && !ui.json() && std::io::stdout().is_terminal() {
        return Err(Error::Invalid("refusing to write gzip to a terminal: add --out FILE or --base64".into()));
    }
    let inputs = Inputs::new(&ctx.config, ctx.region.as_deref(), args.mode, args.format, args.gzip)?;
    let rendered = render::render(&inputs)?;
    let report = validate::validate(&rendered, &ctx.config, inputs.profile, plan::tools(&args.tools));
    ui.report("validate", &report);
    if !report.ok() {
        return Err(failed_checks("the rendered user-data", &report));
    }

    let payload: Vec<u8> = if args.base64 {
        base64::engine::general_purpose::STANDARD.encode(&rendered.output).into_bytes()
    } else {
        rendered.output.clone()
    };
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
    let size = if r.gzip {
        format!("{} bytes gzipped ({} raw)", r.output.len(), r.raw.len())
    } else {
        format!("{} bytes", r.raw.len())
    };
    format!(
        "user-data: {} mode, {}, Chroma {}, storage {}: {size} of {USERDATA_LIMIT}, margin {}; sha256 {sha}",
        r.mode.as_str(),
        r.format.as_str(),
        ctx.config.chroma.version,
        ctx.config.storage.mode.as_str(),
        USERDATA_LIMIT.saturating_sub(r.output.len()),
    )
}

fn summary_json(r: &Rendered, sha: &str, report: &Report) -> serde_json::Value {
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

fn validate_all(args: ValidateArgs, ctx: &Context, ui: Ui) -> Result<()> {
    ui.info(format!("config: {} is valid", ctx.source));
    let tools = plan::tools(&args.tools);
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
    if ui.json() {
        ui.emit_json(&json!({ "ok": failed.is_empty(), "config": ctx.source.to_string(), "userdata": variants, "template": template, "bake_document": document }));
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Error::Validation(format!("validation failed {} check(s): {}", failed.len(), failed.join("; "))))
    }
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
        None => (crate::bake::document(&script)?, format!("document {}", crate::bake::DOCUMENT_TEMPLATE_NAME)),
    };
    let findings = crate::automation::check(&document);
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
        if findings.is_empty() { "references, step targets, outputs and required inputs check out".to_string() } else { format!("{} problem(s)", findings.len()) },
        document.len(),
        if report.ok() { "ok" } else { "FAILED" }
    ));
    Ok(json!({ "findings": findings, "bytes": document.len(), "script_checks": report.checks }))
}

/// The stack template as deploy would send it (default full-mode user-data inside): size and
/// the security policies.
fn check_template(path: Option<&Path>, ctx: &Context, ui: Ui, failed: &mut Vec<String>) -> Result<serde_json::Value> {
    let mut template = crate::template::Template::load(path)?;
    let inputs = Inputs::new(&ctx.config, ctx.region.as_deref(), Mode::Full, Format::CloudConfig, true)?;
    let rendered = render::render(&inputs)?;
    template.set_user_data(&base64::engine::general_purpose::STANDARD.encode(&rendered.output));
    let title = format!("template {}", template.name);
    let size = match template.body() {
        Ok(body) => {
            ui.detail(format!("{title}: ok   size: {} bytes of {}", body.len(), crate::template::BODY_LIMIT));
            json!({ "ok": true, "bytes": body.len() })
        }
        Err(e) => {
            ui.info(format!("{title}: FAIL size: {e}"));
            failed.push(format!("{title}: size"));
            json!({ "ok": false, "error": e.to_string() })
        }
    };
    let rules = crate::guard::evaluate(&template)?;
    for r in &rules {
        match r.verdict {
            crate::guard::Verdict::Fail => {
                let at = template.locate(&r.detail).map(|l| format!(":{l}")).unwrap_or_default();
                ui.info(format!("{title}{at}: FAIL policy {} ({}): {}", r.rule, r.file, r.detail));
                failed.push(format!("{title}: policy {}", r.rule));
            }
            crate::guard::Verdict::Pass => ui.detail(format!("{title}: ok   policy {} ({})", r.rule, r.file)),
            crate::guard::Verdict::Skip => ui.detail(format!("{title}: skip policy {} ({}): {}", r.rule, r.file, r.detail)),
        }
    }
    let passed = rules.iter().filter(|r| r.verdict == crate::guard::Verdict::Pass).count();
    ui.info(format!("{title}: {passed} of {} security policies pass", rules.len()));
    Ok(json!({ "name": template.name, "size": size, "policies": rules }))
}

pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically(path, bytes)
}

/// Writes a regular file through a temporary file in the same directory, so a failure never
/// leaves half a file. Anything else that already exists (a device such as /dev/stdout, a FIFO,
/// a symlink) is written in place: renaming over it would replace it.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let in_place = std::fs::symlink_metadata(path).is_ok_and(|m| !m.file_type().is_file());
    if in_place {
        let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(path).map_err(|e| Error::io("writing", path, e))?;
        return f.write_all(bytes).map_err(|e| Error::io("writing", path, e));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io("writing", path, e))?;
    tmp.write_all(bytes).map_err(|e| Error::io("writing", path, e))?;
    tmp.persist(path).map_err(|e| Error::io("writing", path, e.error))?;
    Ok(())
}
