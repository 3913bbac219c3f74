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
use crate::config::{self, Config, NatGateways};
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

/// Ctrl-C, heard from the moment this is called (tokio's `ctrl_c()` would only listen once first
/// polled, and a signal before that would kill the process without its cleanup or message).
pub fn interrupt_listener() -> Result<impl Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    {
        let mut sig = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .map_err(|e| Error::Tool(format!("could not listen for Ctrl-C: {e}")))?;
        Ok(async move {
            sig.recv().await;
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

/// Runs `f` to completion on a fresh runtime. The runtime is shut down without waiting for
/// blocking tasks: after Ctrl-C at a prompt, the thread reading the terminal never returns, and
/// waiting for it would hang the exit.
pub fn block_on<T>(f: impl Future<Output = Result<T>>) -> Result<T> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Tool(format!("could not start the async runtime: {e}")))?;
    let result = rt.block_on(f);
    rt.shutdown_background();
    result
}

/// Runs `f` with clients built from the context, on a fresh runtime.
fn with_clients<T, F, Fut>(ctx: &Context, f: F) -> Result<T>
where
    F: FnOnce(Clients) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    block_on(async {
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
    tokio::pin!(interrupt);
    // Nothing exists before the change set: Ctrl-C here just stops.
    let choice = tokio::select! {
        c = images::choose(clients, config, args.ami.as_deref(), args.mode) => c?,
        _ = &mut interrupt => return Err(Error::Interrupted { cleaned: Vec::new() }),
    };
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
        _ = &mut interrupt => Err(Error::Interrupted { cleaned: Vec::new() }),
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
    let cleaned = deploy::remove_created(&clients.for_cleanup(), cleanup).await;
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
    let doc = block_on(async {
        let interrupt = interrupt_listener()?;
        let conf = aws::load(ctx).await?;
        let clients = Clients::from_conf(&conf);
        deploy_flow(&clients, &args, ctx, ui, &TtyConfirmer, interrupt).await
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
        let interrupt = interrupt_listener()?;
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
            _ = interrupt => Err(Error::Interrupted { cleaned: vec![format!(
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

/// A UUID-shaped token (StartAutomationExecution's ClientToken must be one), unique per run.
pub fn uuid_token() -> String {
    use sha2::{Digest, Sha256};
    let seed = format!("{}-{}", run_token(), std::process::id());
    let h = crate::render::hex(&Sha256::digest(seed.as_bytes()));
    format!("{}-{}-4{}-a{}-{}", &h[0..8], &h[8..12], &h[13..16], &h[17..20], &h[20..32])
}

/// The bake's prerequisites: given in the config, or the `<name>-bake` stack, deployed through
/// the same engine as the product's stack when it is missing.
async fn prereqs(clients: &Clients, ctx: &Context, progress: &Progress) -> Result<crate::bake::Prereqs> {
    let b = &ctx.config.bake;
    if let (Some(subnet), Some(sg), Some(profile), Some(role)) = (&b.subnet_id, &b.security_group_id, &b.instance_profile, &b.automation_role_arn) {
        return Ok(crate::bake::Prereqs {
            subnet_id: subnet.clone(),
            security_group_id: sg.clone(),
            instance_profile: profile.clone(),
            automation_role_arn: role.clone(),
        });
    }
    let name = format!("{}-bake", ctx.config.name);
    let template = Template::parse(PREREQS_TEMPLATE, "infra/bake-prereqs.yaml")?;
    template.check_policies()?;
    let plan = deploy::Plan {
        stack: name.clone(),
        template_body: template.body()?,
        parameters: BTreeMap::from([("ProjectName".to_string(), ctx.config.name.clone())]),
        tags: BTreeMap::from([("imgbuild:project".to_string(), ctx.config.name.clone())]),
        confirm: Confirm::Yes,
        wait_if_busy: true,
        waits: waits(&ctx.config, &WaitArgs { wait: true, timeout: None }),
        token: run_token(),
    };
    progress.line(&format!("bake prerequisites: stack {name} (subnet with egress, security group, instance profile, automation role)"));
    let cleanup = Cleanup::default();
    let outcome = match deploy::run(clients, &plan, progress, &cleanup, &TtyConfirmer).await {
        Ok(o) => o,
        Err(e) => return Err(clean_after(clients, &cleanup, progress, e).await),
    };
    let get = |k: &str| {
        outcome.outputs.get(k).cloned().ok_or_else(|| {
            Error::Invalid(format!("stack {name} has no output {k}; give bake.subnet_id, security_group_id, instance_profile and automation_role_arn instead"))
        })
    };
    Ok(crate::bake::Prereqs {
        subnet_id: get("SubnetId")?,
        security_group_id: get("SecurityGroupId")?,
        instance_profile: get("InstanceProfileName")?,
        automation_role_arn: get("AutomationRoleArn")?,
    })
}

pub const PREREQS_TEMPLATE: &str = include_str!("../infra/bake-prereqs.yaml");

/// Everything bake does after the clients exist. `region` is the one the clients talk to.
pub async fn bake_flow(
    clients: &Clients,
    region: &str,
    args: &crate::cli::BakeArgs,
    ctx: &Context,
    ui: Ui,
    interrupt: impl Future<Output = ()>,
) -> Result<serde_json::Value> {
    use crate::bake;
    let config = &ctx.config;
    tokio::pin!(interrupt);
    // Every flag is checked before anything is looked up or made.
    for r in &args.regions {
        config::check_region(r).map_err(|m| Error::Invalid(format!("--regions: {m}")))?;
    }
    let profile = profile_of(config)?;
    let progress = Progress::new(ui, "resolving the base image");
    let manifest = bake::read_manifest(&config.bake.manifest)?;
    // Until an execution starts nothing exists: Ctrl-C here just stops.
    let (base, why) = tokio::select! {
        r = bake::resolve_base(clients, config, region, manifest.as_ref(), args.update_base) => r?,
        _ = &mut interrupt => return Err(Error::Interrupted { cleaned: Vec::new() }),
    };
    progress.line(&format!("base image {base} ({why})"));

    let (script, compose_yaml) = bake::bake_script(config, profile)?;
    let document = bake::document(&script)?;
    let findings = crate::automation::check(&document);
    if !findings.is_empty() {
        let lines: Vec<String> = findings.iter().map(|f| format!("{}: {}", f.at, f.message)).collect();
        return Err(Error::Validation(format!("{}: {}", bake::DOCUMENT_TEMPLATE_NAME, lines.join("; "))));
    }
    let report = validate::validate_script("bake.sh", &script, plan::tools(&args.tools));
    ui.report("bake script", &report);
    if !report.ok() {
        return Err(Error::Validation("the bake script failed shellcheck".into()));
    }
    let recipe = bake::Recipe {
        format: bake::RECIPE_FORMAT,
        base_ami: base.clone(),
        arch: images::arch_of(config.bake_instance_type()),
        image: crate::compose::image_reference(config),
        compose_version: config.compose.version.clone(),
        compose_sha256: BTreeMap::from([
            ("aarch64".to_string(), config.compose.sha256.aarch64.clone()),
            ("x86_64".to_string(), config.compose.sha256.x86_64.clone()),
        ]),
        bake_script: script.clone(),
        compose_yaml,
        document: document.clone(),
    };
    let digest = recipe.digest();
    let cached = if args.force {
        None
    } else {
        tokio::select! {
            r = bake::find_cached(clients, &config.name, &digest) => r?,
            _ = &mut interrupt => return Err(Error::Interrupted { cleaned: Vec::new() }),
        }
    };
    progress.line(&format!(
        "digest {digest}: {}",
        match (&cached, args.force) {
            (Some(i), _) => format!("image {} has it, nothing to build", i.image_id().unwrap_or("?")),
            (None, true) => "--force: baking anyway".into(),
            (None, false) => "no image has it yet".into(),
        }
    ));
    let doc_name = bake::document_name(config);

    if args.dry_run {
        drop(progress);
        let plan_doc = json!({
            "ok": true,
            "dry_run": true,
            "base_ami": base,
            "base_from": why,
            "digest": digest,
            "cached": cached.as_ref().and_then(|i| i.image_id()),
            "document_name": doc_name,
            "document": document,
            "bake_script": script,
        });
        if !ui.json() {
            ui.info(format!("--dry-run: would {} (document {doc_name}); the document follows on stdout", if cached.is_some() { "reuse the cached image" } else { "bake" }));
            print!("{document}");
        }
        return Ok(plan_doc);
    }

    let (ami, fresh) = match cached {
        Some(image) => (image.image_id().unwrap_or_default().to_string(), false),
        None => {
            let pre = prereqs(clients, ctx, &progress).await?;
            let (change, version) = bake::ensure_document(clients, &doc_name, &document, &config.name).await?;
            progress.line(&format!("document {doc_name}: {change:?} (version {version})"));
            let token = uuid_token();
            let params = BTreeMap::from([
                ("AutomationAssumeRole".to_string(), pre.automation_role_arn.clone()),
                ("BaseAmiId".to_string(), base.clone()),
                ("InstanceType".to_string(), config.bake_instance_type().to_string()),
                ("SubnetId".to_string(), pre.subnet_id.clone()),
                ("SecurityGroupId".to_string(), pre.security_group_id.clone()),
                ("InstanceProfileName".to_string(), pre.instance_profile.clone()),
                ("ImageName".to_string(), format!("imgbuild-{}-{}-{}", config.name, &digest[7..19], run_token().split('-').next().unwrap_or("0"))),
                ("Digest".to_string(), digest.clone()),
                ("BakeToken".to_string(), token.clone()),
                ("ProjectName".to_string(), config.name.clone()),
                ("ChromaVersion".to_string(), config.chroma.version.clone()),
                ("ChromaImage".to_string(), crate::compose::image_reference(config)),
                ("ComposeVersion".to_string(), config.compose.version.clone()),
            ]);
            let record = bake::Record::default();
            let timeout = Duration::from_secs(args.timeout.unwrap_or(config.bake.timeout_secs));
            let poll = Duration::from_secs(config.aws.poll_interval_secs);
            // Someone already baking this digest: follow that execution instead of a second one
            // (it is theirs: an interrupt here does not stop it).
            let joined = if args.force { None } else { bake::running_with_digest(clients, &doc_name, &digest).await? };
            let result = tokio::select! {
                r = async {
                    let id = match &joined {
                        Some(id) => {
                            progress.line(&format!("execution {id} is already baking this digest: following it"));
                            id.clone()
                        }
                        None => {
                            let id = bake::start(clients, &doc_name, &version, params, &token, &record).await?;
                            progress.line(&format!("automation execution {id} started"));
                            id
                        }
                    };
                    // What a joined execution makes is not ours to clean up.
                    let mine = if joined.is_some() { bake::Record::default() } else { record.clone() };
                    bake::follow(clients, &id, timeout, poll, &progress, &mine).await
                } => r,
                _ = &mut interrupt => Err(Error::Interrupted { cleaned: Vec::new() }),
            };
            match result {
                Ok(ami) => {
                    record.lock().expect("bake record").finished = true;
                    if args.force {
                        // A forced rebuild replaces the digest's image rather than losing to it.
                        for old in bake::supersede(clients, &config.name, &digest, &ami).await? {
                            progress.line(&format!("{old} had this digest; it is marked superseded by {ami} (not deleted)"));
                        }
                        (ami, true)
                    } else {
                        (bake::settle_duplicates(clients, &config.name, &digest, &ami, &progress).await?, true)
                    }
                }
                Err(e) => {
                    let cleanup_waits = crate::stack::Waits { timeout: Duration::from_secs(600), poll };
                    let cleaned = bake::clean_up(&clients.for_cleanup(), &record, &token, cleanup_waits, &progress).await;
                    return Err(match e {
                        Error::Interrupted { .. } => Error::Interrupted { cleaned },
                        other => {
                            for c in cleaned {
                                progress.line(&format!("cleanup: {c}"));
                            }
                            other
                        }
                    });
                }
            }
        }
    };

    let parameter = bake::hand_off(clients, config, &ami).await?;
    progress.line(&format!("{parameter} = {ami}"));
    let mut copies = BTreeMap::new();
    let mut regions: Vec<String> = config.bake.regions.iter().chain(args.regions.iter()).cloned().collect();
    regions.sort();
    regions.dedup();
    regions.retain(|r| r != region);
    for r in &regions {
        config::check_region(r).map_err(|m| Error::Invalid(format!("--regions: {m}")))?;
        let copy = copy_to(ctx, &ami, region, r, &digest, &progress).await?;
        copies.insert(r.clone(), copy);
    }
    let manifest = bake::Manifest {
        name: config.name.clone(),
        region: region.to_string(),
        ami: ami.clone(),
        digest: digest.clone(),
        base_ami: base.clone(),
        arch: recipe.arch,
        chroma_version: config.chroma.version.clone(),
        image: recipe.image.clone(),
        time: SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs(),
        cached: !fresh,
        copies,
    };
    let text = serde_json::to_string_pretty(&manifest).expect("manifests serialise") + "\n";
    crate::commands::write_file(std::path::Path::new(&config.bake.manifest), text.as_bytes())?;
    drop(progress);
    ui.info(format!("{} {ami} (digest {digest}); manifest {}", if fresh { "baked" } else { "reused" }, config.bake.manifest));
    Ok(json!({ "ok": true, "ami": ami, "cached": !fresh, "digest": digest, "base_ami": base, "parameter": parameter, "manifest": manifest }))
}

async fn clients_in(ctx: &Context, region: &str) -> Result<Clients> {
    let mut there = ctx.clone();
    there.region = Some(region.to_string());
    Ok(Clients::from_conf(&aws::load(&there).await?))
}

/// Copies the image into another region (or finds the copy made before), waits until it is
/// available, and points that region's handoff parameter at it.
async fn copy_to(ctx: &Context, ami: &str, from: &str, to: &str, digest: &str, progress: &Progress) -> Result<String> {
    let clients = clients_in(ctx, to).await?;
    let copy = match crate::bake::find_cached(&clients, &ctx.config.name, digest).await? {
        Some(i) => i.image_id().unwrap_or_default().to_string(),
        None => {
            let out = clients
                .ec2
                .copy_image()
                .source_image_id(ami)
                .source_region(from)
                .name(format!("imgbuild-{}-{}", ctx.config.name, &digest[7..19]))
                .copy_image_tags(true)
                .encrypted(true)
                .send()
                .await
                .map_err(|e| aws::err("CopyImage", format!("image {ami} to {to}"), e))?;
            let copy = out.image_id().unwrap_or_default().to_string();
            // The digest tag is what finds this copy next time: set the source's tags
            // explicitly rather than trusting CopyImageTags alone.
            let source = clients_in(ctx, from).await?;
            let described = source.ec2.describe_images().image_ids(ami).send().await.map_err(|e| aws::err("DescribeImages", format!("image {ami}"), e))?;
            let tags: Vec<aws_sdk_ec2::types::Tag> = described.images().iter().flat_map(|i| i.tags()).cloned().collect();
            if !tags.is_empty() {
                clients
                    .ec2
                    .create_tags()
                    .resources(&copy)
                    .set_tags(Some(tags))
                    .send()
                    .await
                    .map_err(|e| aws::err("CreateTags", format!("image {copy} in {to}"), e))?;
            }
            copy
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(ctx.config.bake.timeout_secs);
    loop {
        let out = clients.ec2.describe_images().image_ids(&copy).send().await.map_err(|e| aws::err("DescribeImages", format!("image {copy} in {to}"), e))?;
        match out.images().first().and_then(|i| i.state()).map(|s| s.as_str()) {
            Some("available") => break,
            Some("failed") | Some("error") | Some("invalid") => return Err(Error::Tool(format!("the copy {copy} in {to} failed"))),
            _ if std::time::Instant::now() > deadline => {
                return Err(Error::Timeout { what: format!("copy {copy} in {to}"), secs: ctx.config.bake.timeout_secs, hint: "it goes on in EC2; bake again to finish the handoff".into() });
            }
            s => progress.set(&format!("copy {copy} in {to}: {}", s.unwrap_or("pending"))),
        }
        tokio::time::sleep(Duration::from_secs(ctx.config.aws.poll_interval_secs)).await;
    }
    let parameter = crate::bake::hand_off(&clients, &ctx.config, &copy).await?;
    progress.line(&format!("{to}: {copy}, {parameter} set"));
    Ok(copy)
}

pub fn bake(args: crate::cli::BakeArgs, ctx: &Context, ui: Ui) -> Result<()> {
    let doc = block_on(async {
        let interrupt = interrupt_listener()?;
        let conf = aws::load(ctx).await?;
        let region = conf.region().map(|r| r.to_string()).unwrap_or_default();
        let clients = Clients::from_conf(&conf);
        bake_flow(&clients, &region, &args, ctx, ui, interrupt).await
    })?;
    if ui.json() {
        ui.emit_json(&doc);
    }
    Ok(())
}

pub fn images_cmd(cmd: crate::cli::ImagesCommand, ctx: &Context, ui: Ui) -> Result<()> {
    use crate::cli::ImagesCommand;
    let config = ctx.config.clone();
    let doc = with_clients(ctx, |clients| async move {
        let rows = images::list(&clients, &config).await?;
        match cmd {
            ImagesCommand::List => {
                if !ui.json() {
                    if rows.is_empty() {
                        ui.info(format!("no images of project {} (run `imgbuild bake`)", config.name));
                    }
                    for r in &rows {
                        ui.info(format!(
                            "{}  {}  {:<9}  Chroma {:<7}  {}{}",
                            r.ami,
                            r.created,
                            r.state,
                            r.chroma_version.as_deref().unwrap_or("?"),
                            r.digest.as_deref().map(|d| &d[..d.len().min(19)]).unwrap_or("no digest"),
                            if r.in_use.is_empty() { String::new() } else { format!("  in use: {}", r.in_use.join(", ")) }
                        ));
                    }
                }
                Ok(json!({ "ok": true, "images": rows }))
            }
            ImagesCommand::Prune(p) => {
                let doomed: Vec<images::Row> = images::prune_plan(&rows, p.keep).into_iter().cloned().collect();
                let kept_in_use = rows.iter().skip(p.keep).filter(|r| !r.in_use.is_empty()).count();
                for r in &doomed {
                    ui.info(format!("{} {} ({}, snapshots {})", if p.dry_run { "would prune" } else { "prune" }, r.ami, r.created, r.snapshots.join(", ")));
                }
                if kept_in_use > 0 {
                    ui.info(format!("keeping {kept_in_use} older image(s) that are in use"));
                }
                if doomed.is_empty() || p.dry_run {
                    return Ok(json!({ "ok": true, "dry_run": p.dry_run, "pruned": [], "would_prune": doomed }));
                }
                if !p.yes && !TtyConfirmer.confirm(&format!("Deregister {} image(s) and delete their snapshots?", doomed.len())).await? {
                    return Err(Error::Invalid("not confirmed: nothing was pruned".into()));
                }
                let mut pruned = Vec::new();
                for r in &doomed {
                    let snaps = crate::bake::deregister(&clients, &r.ami).await?;
                    ui.info(format!("deregistered {} and deleted {}", r.ami, if snaps.is_empty() { "no snapshots".to_string() } else { snaps.join(", ") }));
                    pruned.push(json!({ "ami": r.ami, "snapshots": snaps }));
                }
                Ok(json!({ "ok": true, "pruned": pruned }))
            }
        }
    })?;
    if ui.json() {
        ui.emit_json(&doc);
    }
    Ok(())
}
