//! The commands that talk to AWS: deploy, status, destroy, smoke. Each loads the AWS config
//! once, makes the clients, and hands them to a flow that tests can drive with moto or mocks.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde_json::json;

use crate::aws::{self, Clients};
use crate::chroma;
use crate::cli::{DeployArgs, DestroyArgs, SmokeArgs, StatusArgs, WaitArgs};
use crate::config::{Config, NatGateways};
use crate::deploy::{self, Cleanup, Confirm, Confirmer, TtyConfirmer};
use crate::error::{Error, Result};
use crate::images::{self, Choice};
use crate::plan::{self, Context};
use crate::progress::Progress;
use crate::render::{self, Format, Inputs};
use crate::smoke;
use crate::stack::Waits;
use crate::template::Template;
use crate::ui::Ui;
use crate::validate;

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Tool(format!("could not start the async runtime: {e}")))
}

/// Runs `f` with clients built from the context, on a fresh runtime.
fn with_clients<T, F, Fut>(ctx: &Context, f: F) -> Result<T>
where
    F: FnOnce(Clients) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    runtime()?.block_on(async {
        let conf = aws::load(ctx).await?;
        f(Clients::from_conf(&conf)).await
    })
}

pub fn waits(config: &Config, args: &WaitArgs) -> Waits {
    Waits {
        timeout: Duration::from_secs(args.timeout.unwrap_or(config.aws.stack_timeout_secs)),
        poll: Duration::from_secs(config.aws.poll_interval_secs),
    }
}

/// Unique enough for a change set name and a client token: seconds and nanoseconds now.
pub fn run_token() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    format!("{}-{:09}", now.as_secs(), now.subsec_nanos())
}

fn profile_of(config: &Config) -> Result<&'static chroma::Profile> {
    let v = chroma::parse_version(&config.chroma.version).map_err(Error::Invalid)?;
    chroma::profile(&v).map_err(Error::Invalid)
}

/// The template parameters deploy sets, limited to those the template declares.
pub fn stack_parameters(template: &Template, config: &Config, choice: &Choice) -> Result<BTreeMap<String, String>> {
    let profile = profile_of(config)?;
    let wanted = [
        ("VpcCidr", config.stack.vpc_cidr.clone()),
        ("NatGateways", match config.stack.nat_gateways { NatGateways::One => "One", NatGateways::PerAz => "PerAz" }.to_string()),
        ("AllowedClientCidr", config.stack.allowed_client_cidr.clone().unwrap_or_default()),
        ("ImageId", choice.ami.clone()),
        ("InstanceType", config.stack.instance_type.clone()),
        ("ChromaPort", config.chroma.port.to_string()),
        ("HeartbeatPath", profile.heartbeat_path.to_string()),
        ("StorageMode", config.storage.mode.as_str().to_string()),
        ("LogRetentionDays", config.stack.log_retention_days.to_string()),
    ];
    let declared = template.parameter_names();
    Ok(wanted.into_iter().filter(|(k, _)| declared.iter().any(|d| d == k)).map(|(k, v)| (k.to_string(), v)).collect())
}

/// Everything deploy does after the clients exist; `interrupt` resolves on Ctrl-C (tests pass
/// their own).
pub async fn deploy_flow(
    clients: &Clients,
    args: &DeployArgs,
    ctx: &Context,
    ui: Ui,
    confirmer: &dyn Confirmer,
    interrupt: impl Future<Output = ()>,
) -> Result<serde_json::Value> {
    let config = &ctx.config;
    let progress = Progress::new(ui, "choosing the image");
    let choice = images::choose(clients, config, args.ami.as_deref(), args.mode).await?;
    progress.line(&format!("image {} ({}), user-data mode {}", choice.ami, source_text(&choice.source), choice.mode.as_str()));

    // The user-data this AMI needs, validated like render-userdata does, compressed to keep
    // the template well under CloudFormation's size limit.
    let inputs = Inputs::new(config, ctx.region.as_deref(), choice.mode, Format::CloudConfig, true)?;
    let rendered = render::render(&inputs)?;
    let report = validate::validate(&rendered, config, inputs.profile, plan::tools(&args.tools));
    ui.report("user-data", &report);
    if !report.ok() {
        let names: Vec<_> = report.failures().map(|c| c.name.clone()).collect();
        return Err(Error::Validation(format!("the user-data for this deploy failed: {}", names.join(", "))));
    }

    let mut template = Template::load(args.template.as_deref())?;
    template.set_user_data(&base64::engine::general_purpose::STANDARD.encode(&rendered.output));
    template.check_policies()?;
    let plan = deploy::Plan {
        stack: config.stack_name().to_string(),
        template_body: template.body()?,
        parameters: stack_parameters(&template, config, &choice)?,
        tags: BTreeMap::from([("imgbuild:project".to_string(), config.name.clone())]),
        confirm: if args.yes {
            Confirm::Yes
        } else if args.no_execute {
            Confirm::NoExecute
        } else {
            Confirm::Prompt
        },
        wait_if_busy: args.wait.wait,
        waits: waits(config, &args.wait),
        token: run_token(),
    };

    let cleanup = Cleanup::default();
    let result = tokio::select! {
        r = deploy::run(clients, &plan, &progress, &cleanup, confirmer) => r,
        _ = interrupt => Err(Error::Interrupted { cleaned: Vec::new() }),
    };
    let outcome = match result {
        Ok(o) => o,
        Err(e) => return Err(clean_after(clients, &cleanup, &progress, e).await),
    };
    let took = progress.elapsed();
    drop(progress);

    if outcome.executed {
        ui.info(format!("stack {}: {} in {}s", outcome.stack, outcome.status, took.as_secs()));
    }
    print_outputs(ui, &outcome.outputs);
    Ok(json!({
        "ok": true,
        "ami": choice,
        "userdata_sha256": rendered.sha256(),
        "deploy": outcome,
    }))
}

/// After a failure or Ctrl-C: remove what this run created and not yet handed over, and say so.
async fn clean_after(clients: &Clients, cleanup: &Cleanup, progress: &Progress, err: Error) -> Error {
    let executed = cleanup.lock().expect("cleanup lock").executed;
    let cleaned = deploy::remove_created(clients, cleanup).await;
    match (err, cleaned) {
        (Error::Interrupted { .. }, Ok(mut cleaned)) => {
            if executed {
                cleaned.push("nothing to remove: the change set was already executing, and the stack operation goes on in CloudFormation (follow it with `imgbuild status`)".into());
            }
            Error::Interrupted { cleaned }
        }
        (e, Ok(cleaned)) => {
            for c in cleaned {
                progress.line(&format!("cleanup: {c}"));
            }
            e
        }
        (e, Err(ce)) => {
            progress.line(&format!("cleanup failed, remove it by hand: {ce}"));
            e
        }
    }
}

fn source_text(s: &images::Source) -> String {
    match s {
        images::Source::Flag => "--ami".into(),
        images::Source::Baked { parameter } => format!("baked, from {parameter}"),
        images::Source::Stock { parameter } => format!("stock AL2023, from {parameter}"),
    }
}

fn print_outputs(ui: Ui, outputs: &BTreeMap<String, String>) {
    if outputs.is_empty() {
        return;
    }
    let width = outputs.keys().map(String::len).max().unwrap_or(0);
    ui.info("outputs:");
    for (k, v) in outputs {
        ui.info(format!("  {k:<width$}  {v}"));
    }
}

pub fn deploy(args: DeployArgs, ctx: &Context, ui: Ui) -> Result<()> {
    let doc = with_clients(ctx, |clients| async move {
        deploy_flow(&clients, &args, ctx, ui, &TtyConfirmer, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
    })?;
    if ui.json() {
        ui.emit_json(&doc);
    }
    Ok(())
}

pub fn status(args: StatusArgs, ctx: &Context, ui: Ui) -> Result<()> {
    let name = ctx.config.stack_name().to_string();
    let st = with_clients(ctx, |clients| async move { crate::ops::status(&clients, &name, args.events).await })?;
    if ui.json() {
        ui.emit_json(&json!({ "ok": true, "status": st }));
        return Ok(());
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

pub fn destroy(args: DestroyArgs, ctx: &Context, ui: Ui) -> Result<()> {
    let name = ctx.config.stack_name().to_string();
    let waits = waits(&ctx.config, &args.wait);
    let done = with_clients(ctx, |clients| async move {
        if !args.yes {
            let question = if args.delete_data {
                format!("Delete stack {name} AND its EFS file system with every collection on it? This cannot be undone.")
            } else {
                format!("Delete stack {name}? (its EFS file system and data are kept)")
            };
            if !TtyConfirmer.confirm(&question).await? {
                return Err(Error::Invalid("not confirmed: nothing was deleted".into()));
            }
        }
        let progress = Progress::new(ui, &format!("destroying {name}"));
        tokio::select! {
            r = crate::ops::destroy(&clients, &name, args.delete_data, args.wait.wait, waits, &progress) => r,
            _ = tokio::signal::ctrl_c() => Err(Error::Interrupted { cleaned: vec![format!(
                "nothing: the deletion of {name} goes on in CloudFormation (follow it with `imgbuild status`)"
            )] }),
        }
    })?;
    if ui.json() {
        ui.emit_json(&json!({ "ok": true, "destroy": done }));
    }
    Ok(())
}

pub fn smoke_cmd(args: SmokeArgs, ctx: &Context, ui: Ui) -> Result<()> {
    let profile = profile_of(&ctx.config)?;
    let report = match &args.url {
        // A URL needs no AWS: the config is not loaded at all.
        Some(url) => {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(Error::Invalid(format!("--url: `{url}` is not an http:// or https:// URL")));
            }
            smoke::over_http(url, profile, Duration::from_secs(args.timeout), &run_token())
        }
        None => {
            let name = ctx.config.stack_name().to_string();
            with_clients(ctx, |clients| async move {
                let st = crate::stack::describe(&clients.cfn, &name)
                    .await?
                    .ok_or_else(|| Error::Invalid(format!("stack {name} is not deployed; deploy it, or pass --url")))?;
                let outputs = crate::stack::outputs_of(&st);
                let api = outputs
                    .get("ApiId")
                    .ok_or_else(|| Error::Invalid(format!("stack {name} has no ApiId output: is it an imgbuild stack?")))?;
                smoke::through_api_gateway(&clients, api, profile).await
            })?
        }
    };
    print_smoke(ui, &report);
    if ui.json() {
        ui.emit_json(&json!({ "ok": report.ok(), "smoke": report }));
    }
    if report.ok() {
        Ok(())
    } else {
        let failed: Vec<_> = report.steps.iter().filter(|s| !s.ok).map(|s| format!("{}: {}", s.name, s.detail)).collect();
        Err(Error::SmokeFailed(format!("smoke test against {} failed: {}", report.target, failed.join("; "))))
    }
}

fn print_smoke(ui: Ui, report: &smoke::Report) {
    ui.info(format!("smoke test against {}", report.target));
    for s in &report.steps {
        ui.info(format!(
            "  {} {:<18} {:>8.1} ms  {}{}",
            if s.ok { "ok  " } else { "FAIL" },
            s.name,
            s.millis,
            s.status.map(|c| format!("HTTP {c}  ")).unwrap_or_default(),
            s.detail
        ));
    }
}
