//! `imgbuild bake`: plan the recipe, reuse a cached image or run the automation, hand the image
//! over (parameter, manifest, region copies). The domain steps live in `crate::bake`.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;

use super::*;
use crate::aws::{self, Clients};
use crate::bake::images::{self};
use crate::check::userdata as validate;
use crate::cli::WaitArgs;
use crate::config::{self, Context};
use crate::error::{Error, Result};
use crate::stack::changeset::{self, Cleanup, Confirm, TtyConfirmer};
use crate::stack::template::Template;
use crate::ui::Ui;
use crate::ui::progress::Progress;

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
    let name = super::bake_prereqs_stack(&ctx.config);
    let template = Template::parse(PREREQS_TEMPLATE, "infra/bake-prereqs.yaml")?;
    template.check_policies()?;
    let plan = changeset::Plan {
        stack: name.clone(),
        template_body: template.body()?,
        parameters: BTreeMap::from([
            ("ProjectName".to_string(), ctx.config.name.clone()),
            ("AvailabilityZone".to_string(), crate::bake::zone_offering(clients, ctx.config.bake_instance_type()).await?),
        ]),
        tags: BTreeMap::from([("imgbuild:project".to_string(), ctx.config.name.clone())]),
        confirm: Confirm::Yes,
        wait_if_busy: true,
        waits: waits(&ctx.config, &WaitArgs { wait: true, timeout: None }),
        token: run_token(),
        annotate: None,
        rollback: Default::default(),
    };
    progress.line(&format!(
        "bake prerequisites: stack {name} (subnet with egress, security group, instance profile, automation role); it stays for the next bake, `imgbuild destroy --bake-prereqs` removes it"
    ));
    let cleanup = Cleanup::default();
    let outcome = match changeset::run(clients, &plan, progress, &cleanup, &TtyConfirmer).await {
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

pub const PREREQS_TEMPLATE: &str = include_str!("../../infra/bake-prereqs.yaml");

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
    // The key of each region the image goes to, checked before anything is looked up or made.
    let mut copy_regions: Vec<String> = config.bake.regions.iter().chain(args.regions.iter()).cloned().collect();
    copy_regions.sort();
    copy_regions.dedup();
    copy_regions.retain(|r| r != region);
    let kms_key = config.bake.kms_key_in(region, region).map_err(Error::Invalid)?;
    let mut copy_keys: BTreeMap<String, Option<String>> = BTreeMap::new();
    for r in &copy_regions {
        copy_keys.insert(r.clone(), config.bake.kms_key_in(r, region).map_err(Error::Invalid)?);
    }
    let profile = profile_of(config)?;
    // One base image and one recipe serve every type tried, so they share an architecture.
    let types = config.bake_instance_types();
    if let Some(t) = types.iter().find(|t| images::arch_of(t) != images::arch_of(types[0])) {
        return Err(Error::Invalid(format!("bake.instance_types: {t} is not of the architecture of {} (one base image serves every type tried)", types[0])));
    }
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
    let document = match &kms_key {
        Some(k) => bake::encrypt_build_volume(&document, k)?,
        None => document,
    };
    let findings = crate::check::automation::check(&document);
    if !findings.is_empty() {
        let lines: Vec<String> = findings.iter().map(|f| format!("{}: {}", f.at, f.message)).collect();
        return Err(Error::Validation(format!("{}: {}", bake::DOCUMENT_TEMPLATE_NAME, lines.join("; "))));
    }
    let report = validate::validate_script("bake.sh", &script, tools(&args.tools));
    ui.report("bake script", &report);
    if !report.ok() {
        return Err(Error::Validation("the bake script failed shellcheck".into()));
    }
    let recipe = bake::Recipe {
        format: bake::RECIPE_FORMAT,
        base_ami: base.clone(),
        arch: images::arch_of(config.bake_instance_type()),
        image: crate::render::compose::image_reference(config),
        compose_version: config.compose.version.clone(),
        compose_sha256: BTreeMap::from([
            ("aarch64".to_string(), config.compose.sha256.aarch64.clone()),
            ("x86_64".to_string(), config.compose.sha256.x86_64.clone()),
        ]),
        bake_script: script.clone(),
        compose_yaml,
        document: document.clone(),
        kms_key_id: kms_key.clone(),
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
    // Checked before anything is made (and in --dry-run), not when the execution starts.
    let image_name = if cached.is_none() { Some(bake::image_name(config, &digest, run_token().split('-').next().unwrap_or("0"))?) } else { None };

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
            let b = &config.bake;
            let given = b.subnet_id.is_some() && b.security_group_id.is_some() && b.instance_profile.is_some() && b.automation_role_arn.is_some();
            ui.info(format!(
                "--dry-run: would {}{} (document {doc_name}); the document follows on stdout",
                if cached.is_some() { "reuse the cached image" } else { "bake" },
                if cached.is_none() && !given {
                    format!(
                        ", deploying the prerequisites stack {} first unless it exists (`imgbuild destroy --bake-prereqs` removes it)",
                        super::bake_prereqs_stack(config)
                    )
                } else {
                    String::new()
                }
            ));
            // print! panics on a closed stdout (`| head -1`); ui notes the pipe instead.
            crate::ui::note_write(std::io::stdout().lock().write_all(document.as_bytes()));
        }
        return Ok(plan_doc);
    }

    let (ami, fresh, chroma_digest) = match cached {
        Some(image) => (image.image_id().unwrap_or_default().to_string(), false, images::tag(&image, images::TAG_CHROMA_DIGEST).map(String::from)),
        None => {
            let pre = prereqs(clients, ctx, &progress).await?;
            let profile_waits =
                crate::stack::Waits { timeout: Duration::from_secs(PROFILE_WAIT_SECS), poll: Duration::from_secs(config.aws.poll_interval_secs) };
            bake::wait_for_instance_profile(clients, &pre, &base, config.bake_instance_type(), profile_waits, &progress).await?;
            let (change, version) = bake::ensure_document(clients, &doc_name, &document, &config.name).await?;
            progress.line(&format!("document {doc_name}: {change:?} (version {version})"));
            let token = uuid_token();
            let mut params = BTreeMap::from([
                ("AutomationAssumeRole".to_string(), pre.automation_role_arn.clone()),
                ("BaseAmiId".to_string(), base.clone()),
                ("InstanceType".to_string(), config.bake_instance_type().to_string()),
                ("SubnetId".to_string(), pre.subnet_id.clone()),
                ("SecurityGroupId".to_string(), pre.security_group_id.clone()),
                ("InstanceProfileName".to_string(), pre.instance_profile.clone()),
                ("ImageName".to_string(), image_name.clone().unwrap_or_default()),
                ("Digest".to_string(), digest.clone()),
                ("BakeToken".to_string(), token.clone()),
                ("ProjectName".to_string(), config.name.clone()),
                ("ChromaVersion".to_string(), config.chroma.version.clone()),
                ("ChromaImage".to_string(), crate::render::compose::image_reference(config)),
                ("ComposeVersion".to_string(), config.compose.version.clone()),
                ("StoragePackage".to_string(), bake::storage_package(config).to_string()),
                ("LogGroupName".to_string(), bake::log_group(config)),
                ("KeepOnFailure".to_string(), args.keep_on_failure.to_string()),
            ]);
            let record = bake::Record::default();
            let budget = bake::default_timeout(&document)?;
            let timeout = args.timeout.or(config.bake.timeout_secs).map(Duration::from_secs).unwrap_or(budget);
            if timeout < budget {
                progress.line(&format!(
                    "timeout {}s is shorter than the runbook's own budget ({}s): a slow but valid bake will be cancelled",
                    timeout.as_secs(),
                    budget.as_secs()
                ));
            }
            let poll = Duration::from_secs(config.aws.poll_interval_secs);
            // Someone already baking this digest: follow that execution instead of a second one
            // (it is theirs: an interrupt here does not stop it).
            let joined = if args.force { None } else { bake::running_with_digest(clients, &doc_name, &digest).await? };
            let cleanup_waits = crate::stack::Waits { timeout: Duration::from_secs(600), poll };
            // Each try of an instance type is an execution of its own, with its own token.
            let token = std::sync::Mutex::new(token);
            let result = tokio::select! {
                r = async {
                    // What a joined execution makes is not ours to clean up.
                    let theirs = bake::Record::default();
                    let (id, ami, mine) = match &joined {
                        Some(id) => {
                            progress.line(&format!("execution {id} is already baking this digest: following it"));
                            (id.clone(), bake::follow(clients, id, timeout, poll, &progress, &theirs).await?, &theirs)
                        }
                        None => {
                            let mut at = 0;
                            loop {
                                let (this, t) = (types[at], token.lock().expect("bake token").clone());
                                params.insert("InstanceType".to_string(), this.to_string());
                                params.insert("BakeToken".to_string(), t.clone());
                                let id = bake::start(clients, &doc_name, &version, params.clone(), &t, &record).await?;
                                progress.line(&format!("automation execution {id} started (build instance type {this})"));
                                match bake::follow(clients, &id, timeout, poll, &progress, &record).await {
                                    Ok(ami) => break (id, ami, &record),
                                    // Which step failed is structure; why (say, no capacity for the
                                    // type) is only message text, shown but never matched.
                                    Err(e @ Error::BakeFailed { .. })
                                        if at + 1 < types.len() && record.lock().expect("bake record").failed_step.as_deref() == Some(bake::LAUNCH_STEP) =>
                                    {
                                        progress.line(&format!("build instance type {this} did not launch ({e}); trying {}", types[at + 1]));
                                        for c in bake::clean_up(&clients.for_cleanup(), &record, &t, cleanup_waits, &progress).await {
                                            progress.line(&format!("cleanup: {c}"));
                                        }
                                        *token.lock().expect("bake token") = uuid_token();
                                        at += 1;
                                    }
                                    Err(e) => return Err(e),
                                }
                            }
                        }
                    };
                    // Checked before the image is handed over: a mismatch fails the bake, and the
                    // cleanup below removes the image.
                    let pulled = mine.lock().expect("bake record").pulled.clone();
                    let chroma = bake::check_pulled(config, pulled.as_deref(), &id)?;
                    bake::tag_chroma_digest(clients, &ami, &chroma).await?;
                    progress.line(&format!("{ami}: Chroma image {} pulled as {chroma}", config.chroma.image));
                    Ok((ami, chroma))
                } => r,
                _ = &mut interrupt => Err(Error::Interrupted { cleaned: Vec::new() }),
            };
            match result {
                Ok((ami, chroma)) => {
                    record.lock().expect("bake record").finished = true;
                    if args.force {
                        // A forced rebuild replaces the digest's image rather than losing to it.
                        for old in bake::supersede(clients, &config.name, &digest, &ami).await? {
                            progress.line(&format!("{old} had this digest; it is marked superseded by {ami} (not deleted)"));
                        }
                        (ami, true, Some(chroma))
                    } else {
                        let kept = bake::settle_duplicates(clients, &config.name, &digest, &ami, &progress).await?;
                        // The older image another bake made was pulled on its own: its tag says what.
                        let chroma = if kept == ami { Some(chroma) } else { None };
                        (kept, true, chroma)
                    }
                }
                Err(e) => {
                    // Only a failed step keeps the instance: after a timeout or Ctrl-C the
                    // execution is cancelled, and the cancel path terminates it.
                    if args.keep_on_failure && matches!(e, Error::BakeFailed { .. }) && joined.is_none() {
                        record.lock().expect("bake record").keep_instance = true;
                    }
                    let token = token.lock().expect("bake token").clone();
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
    let cost = bake_cost(clients, config.prices, &document, region, &ami, fresh, &progress).await;
    let mut copies = BTreeMap::new();
    for r in &copy_regions {
        config::check_region(r).map_err(|m| Error::Invalid(format!("--regions: {m}")))?;
        let key = copy_keys.get(r).cloned().flatten();
        let copy = copy_to(clients, ctx, (&ami, region), r, &digest, key.as_deref(), &progress).await?;
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
        chroma_digest,
        time: SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs(),
        cached: !fresh,
        copies,
    };
    let text = serde_json::to_string_pretty(&manifest).expect("manifests serialise") + "\n";
    super::write_file(std::path::Path::new(&config.bake.manifest), text.as_bytes())?;
    drop(progress);
    ui.info(format!("{} {ami} (digest {digest}); manifest {}", if fresh { "baked" } else { "reused" }, config.bake.manifest));
    Ok(json!({ "ok": true, "ami": ami, "cached": !fresh, "digest": digest, "base_ami": base, "parameter": parameter, "manifest": manifest, "cost": cost }))
}

/// What the new image's snapshots add a month: at most the build instance's volumes, which the
/// automation document sizes, at the snapshot price of the Price List API (bounded, asked only
/// for a new image) or the table.
async fn bake_cost(
    clients: &Clients,
    source: crate::config::PriceSource,
    document: &str,
    region: &str,
    ami: &str,
    fresh: bool,
    progress: &Progress,
) -> crate::cost::Estimate {
    let added: Vec<(String, i64)> = if fresh { vec![(ami.to_string(), crate::cost::volume_gib(document))] } else { Vec::new() };
    let book = if fresh {
        crate::cost::book(&clients.pricing, source, region, &[crate::cost::Product::SnapshotGbMonth].into()).await
    } else {
        crate::cost::Book::table()
    };
    let cost = crate::cost::snapshots_with(region, &added, &[], &book);
    if fresh {
        for l in crate::cost::lines(&cost) {
            progress.line(&l);
        }
        progress.line("`imgbuild images prune --dry-run` says what removing older images would save");
    }
    cost
}

/// How long EC2 may take to see a new instance profile (IAM is eventually consistent; minutes
/// at worst in practice).
const PROFILE_WAIT_SECS: u64 = 300;

/// How long a copy to another region may take unless bake.timeout_secs says otherwise.
const COPY_TIMEOUT_SECS: u64 = 5400;

/// Copies the image into another region (or finds the copy made before), waits until it is
/// available, and points that region's handoff parameter at it.
/// With `kms_key` (that region's key: KMS keys are regional), the copy's snapshots are encrypted
/// under it ("KmsKeyId ... If you specify a KMS key, you must also set the encrypted state to
/// true", CopyImage, EC2 API Reference).
/// `source`: the image and its region.
async fn copy_to(here: &Clients, ctx: &Context, source: (&str, &str), to: &str, digest: &str, kms_key: Option<&str>, progress: &Progress) -> Result<String> {
    let (ami, from) = source;
    // The same credentials and endpoint, in the other region.
    let clients = super::fleet::clients_in(here, to);
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
                .set_kms_key_id(kms_key.map(String::from))
                .send()
                .await
                .map_err(|e| aws::err("CopyImage", format!("image {ami} to {to}"), e))?;
            let copy = out.image_id().unwrap_or_default().to_string();
            // The digest tag is what finds this copy next time: set the source's tags
            // explicitly rather than trusting CopyImageTags alone.
            let source = super::fleet::clients_in(here, from);
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
    let copy_secs = ctx.config.bake.timeout_secs.unwrap_or(COPY_TIMEOUT_SECS);
    let deadline = std::time::Instant::now() + Duration::from_secs(copy_secs);
    loop {
        let out = clients.ec2.describe_images().image_ids(&copy).send().await.map_err(|e| aws::err("DescribeImages", format!("image {copy} in {to}"), e))?;
        match out.images().first().and_then(|i| i.state()).map(|s| s.as_str()) {
            Some("available") => break,
            Some("failed") | Some("error") | Some("invalid") => return Err(Error::Tool(format!("the copy {copy} in {to} failed"))),
            _ if std::time::Instant::now() > deadline => {
                return Err(Error::Timeout {
                    what: format!("copy {copy} in {to}"),
                    secs: copy_secs,
                    hint: "it goes on in EC2; bake again to finish the handoff".into(),
                });
            }
            s => progress.set(&format!("copy {copy} in {to}: {}", s.unwrap_or("pending"))),
        }
        tokio::time::sleep(Duration::from_secs(ctx.config.aws.poll_interval_secs)).await;
    }
    let parameter = crate::bake::hand_off(&clients, &ctx.config, &copy).await?;
    progress.line(&format!("{to}: {copy}, {parameter} set"));
    Ok(copy)
}

pub(super) fn bake(args: crate::cli::BakeArgs, ctx: &Context, ui: Ui) -> Result<()> {
    run_flow(ctx, ui, |clients, region, interrupt| async move { bake_flow(&clients, &region, &args, ctx, ui, interrupt).await })
}
