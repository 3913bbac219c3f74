//! `imgbuild fleet deploy | status | destroy`: the stack in many accounts and regions through one
//! CloudFormation StackSet (`stack::fleet`). Deploy renders the user-data once (it reads every
//! deploy-time value from instance metadata, so one template serves every instance), checks that
//! each region has the baked image, shares it with other accounts (`bake::share`), shows what each
//! target gets, asks, and runs one StackSet operation at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;

use base64::Engine;
use serde::Serialize;
use serde_json::json;

use super::*;
use crate::aws::Clients;
use crate::bake::images::{self, Choice, Source};
use crate::bake::{grants, share};
use crate::check::userdata as validate;
use crate::cli::{FleetCommand, FleetDeployArgs, FleetDestroyArgs, FleetStatusArgs, FleetTargetArgs};
use crate::config::{Amount, Context, OrgTarget, PermissionModel, RegionConcurrency, check_account_id, check_region, org_target};
use crate::error::{Error, Result};
use crate::render::{self, Format, Inputs, Mode};
use crate::stack::Waits;
use crate::stack::changeset::{Confirmer, TtyConfirmer};
use crate::stack::fleet::{self, Action, Calls, Instance, OperationOutcome, Override, Permission, Prefs, Spec, TargetPlan};
use crate::stack::template::Template;
use crate::ui::Ui;
use crate::ui::progress::Progress;

pub(super) fn fleet_cmd(cmd: FleetCommand, ctx: &Context, ui: Ui) -> Result<()> {
    run_flow(ctx, ui, |clients, _, interrupt| async move {
        match cmd {
            FleetCommand::Deploy(args) => fleet_deploy_flow(&clients, &args, ctx, ui, &TtyConfirmer, interrupt).await,
            FleetCommand::Status(args) => fleet_status_flow(&clients, &args, ctx, ui).await,
            FleetCommand::Destroy(args) => fleet_destroy_flow(&clients, &args, ctx, ui, &TtyConfirmer, interrupt).await,
        }
    })
}

/// The same clients, talking to another region (same credentials and endpoint).
pub fn clients_in(c: &Clients, region: &str) -> Clients {
    let r = aws_sdk_cloudformation::config::Region::new(region.to_string());
    Clients {
        cfn: aws_sdk_cloudformation::Client::from_conf(c.cfn.config().to_builder().region(r.clone()).build()),
        ec2: aws_sdk_ec2::Client::from_conf(c.ec2.config().to_builder().region(r.clone()).build()),
        efs: aws_sdk_efs::Client::from_conf(c.efs.config().to_builder().region(r.clone()).build()),
        ssm: aws_sdk_ssm::Client::from_conf(c.ssm.config().to_builder().region(r.clone()).build()),
        elb: aws_sdk_elasticloadbalancingv2::Client::from_conf(c.elb.config().to_builder().region(r.clone()).build()),
        apigw: aws_sdk_apigateway::Client::from_conf(c.apigw.config().to_builder().region(r.clone()).build()),
        backup: aws_sdk_backup::Client::from_conf(c.backup.config().to_builder().region(r.clone()).build()),
        kms: aws_sdk_kms::Client::from_conf(c.kms.config().to_builder().region(r.clone()).build()),
        cloudwatch: aws_sdk_cloudwatch::Client::from_conf(c.cloudwatch.config().to_builder().region(r.clone()).build()),
        // The Price List API stays where it answers.
        pricing: c.pricing.clone(),
        sts: aws_sdk_sts::Client::from_conf(c.sts.config().to_builder().region(r).build()),
        kms_as: c.kms_as.clone(),
    }
}

/// Parameter values, in key order, as a map key.
type Values = Vec<(String, String)>;

/// The fleet's name, targets and preferences: the flags over the config, each checked.
struct Fleet {
    name: String,
    permission: Permission,
    accounts: Vec<String>,
    organizational_units: Vec<String>,
    /// The organizational units (or roots) to share the image with.
    orgs: Vec<OrgTarget>,
    regions: Vec<String>,
    prefs: Prefs,
    waits: Waits,
    notice: Option<String>,
}

impl Fleet {
    /// Whether the fleet's targets include this stack instance: its region, and its account (or,
    /// service-managed, its organizational unit).
    fn targets(&self, i: &Instance) -> bool {
        self.regions.contains(&i.region)
            && match self.permission {
                Permission::SelfManaged { .. } => self.accounts.contains(&i.account),
                Permission::ServiceManaged => i.organizational_unit.as_ref().is_some_and(|o| self.organizational_units.contains(o)),
            }
    }
}

fn resolve(ctx: &Context, t: &FleetTargetArgs) -> Result<Fleet> {
    let f = &ctx.config.fleet;
    let accounts = if t.accounts.is_empty() { f.accounts.clone() } else { t.accounts.clone() };
    let organizational_units = if t.organizational_units.is_empty() { f.organizational_units.clone() } else { t.organizational_units.clone() };
    let regions = if t.regions.is_empty() { f.regions.clone() } else { t.regions.clone() };
    for a in &accounts {
        check_account_id(a).map_err(|m| Error::Invalid(format!("--accounts: {m}")))?;
    }
    for r in &regions {
        check_region(r).map_err(|m| Error::Invalid(format!("--regions: {m}")))?;
    }
    let permission = match f.permission_model {
        PermissionModel::SelfManaged => {
            if !organizational_units.is_empty() {
                return Err(Error::Invalid(
                    "organizational units need fleet.permission_model: service-managed (a self-managed StackSet targets accounts)".into(),
                ));
            }
            if accounts.is_empty() {
                return Err(Error::Invalid("no target accounts: set fleet.accounts or pass --accounts".into()));
            }
            Permission::SelfManaged { administration_role_arn: f.administration_role_arn.clone(), execution_role_name: f.execution_role_name.clone() }
        }
        PermissionModel::ServiceManaged => {
            if !accounts.is_empty() {
                return Err(Error::Invalid(
                    "a service-managed StackSet targets organizational units: set fleet.organizational_units or pass --organizational-units".into(),
                ));
            }
            if organizational_units.is_empty() {
                return Err(Error::Invalid("no target organizational units: set fleet.organizational_units or pass --organizational-units".into()));
            }
            Permission::ServiceManaged
        }
    };
    let orgs =
        organizational_units.iter().map(|o| org_target(o).map_err(|m| Error::Invalid(format!("organizational unit: {m}")))).collect::<Result<Vec<_>>>()?;
    let organizational_units: Vec<String> = orgs.iter().map(|o| o.id.clone()).collect();
    if regions.is_empty() {
        return Err(Error::Invalid("no target regions: set fleet.regions or pass --regions".into()));
    }
    let max = t.max_concurrent.as_deref().unwrap_or(&f.max_concurrent);
    let tolerance = t.failure_tolerance.as_deref().unwrap_or(&f.failure_tolerance);
    let max_concurrent = Amount::parse(max, 1).map_err(|m| Error::Invalid(format!("--max-concurrent: {m}")))?;
    let failure_tolerance = Amount::parse(tolerance, 0).map_err(|m| Error::Invalid(format!("--failure-tolerance: {m}")))?;
    // In the default STRICT_FAILURE_TOLERANCE mode CloudFormation runs at most the failure
    // tolerance + 1 targets at once, whatever MaxConcurrentCount says
    // (StackSetOperationPreferences, ConcurrencyMode): say so rather than let it surprise.
    let notice = match (max_concurrent, failure_tolerance) {
        (Amount::Count(m), Amount::Count(ft)) if m > ft + 1 => Some(format!(
            "max concurrent {m} with a failure tolerance of {ft}: CloudFormation deploys at most {} target(s) at once per region (strict failure tolerance)",
            ft + 1
        )),
        _ => None,
    };
    let parallel = t.parallel_regions || f.region_concurrency == RegionConcurrency::Parallel;
    Ok(Fleet {
        name: f.stack_set.clone().unwrap_or_else(|| ctx.config.stack_name().to_string()),
        permission,
        accounts,
        organizational_units,
        orgs,
        prefs: Prefs { max_concurrent, failure_tolerance, parallel_regions: parallel, region_order: regions.clone() },
        regions,
        waits: Waits {
            timeout: std::time::Duration::from_secs(t.timeout.unwrap_or(ctx.config.aws.stack_timeout_secs)),
            poll: std::time::Duration::from_secs(ctx.config.aws.poll_interval_secs),
        },
        notice,
    })
}

#[derive(Debug, Clone, Serialize)]
struct RegionImage {
    region: String,
    image: String,
    parameter: String,
}

/// The baked image of each region, from the parameter `bake --regions` writes there.
async fn region_images(clients: &Clients, ctx: &Context, regions: &[String]) -> Result<Vec<RegionImage>> {
    let parameter = images::handoff_parameter(&ctx.config);
    let mut out = Vec::new();
    for r in regions {
        let image = images::get_parameter(&clients_in(clients, r), &parameter).await?.ok_or_else(|| {
            Error::Invalid(format!(
                "region {r} has no baked image: {parameter} does not exist there. Run `imgbuild bake --regions {r}` (it copies the image and writes the parameter)"
            ))
        })?;
        out.push(RegionImage { region: r.clone(), image, parameter: parameter.clone() });
    }
    Ok(out)
}

/// The parameter overrides each (account, region) should have; targets with none are absent.
/// `image_by_region`: set when the fleet spans accounts, where the shared image id goes in
/// ImageId; `owner`: the account that baked it.
fn desired_overrides(
    ctx: &Context,
    declared: &[String],
    accounts: &[String],
    regions: &[String],
    image_by_region: Option<&BTreeMap<String, String>>,
    owner: Option<&str>,
) -> BTreeMap<(String, String), BTreeMap<String, String>> {
    let mut out: BTreeMap<(String, String), BTreeMap<String, String>> = BTreeMap::new();
    for region in regions {
        for account in accounts {
            let mut m = match image_by_region.and_then(|i| i.get(region)) {
                Some(ami) => image_overrides(ctx, declared, ami, Some(account.as_str()) != owner),
                None => BTreeMap::new(),
            };
            for o in &ctx.config.fleet.overrides {
                let hits = o.accounts.contains(account) && (o.regions.is_empty() || o.regions.contains(region));
                if hits
                    && let Some(c) = &o.allowed_client_cidr
                    && declared.iter().any(|d| d == "AllowedClientCidr")
                {
                    m.insert("AllowedClientCidr".to_string(), c.clone());
                }
            }
            if !m.is_empty() {
                out.insert((account.clone(), region.clone()), m);
            }
        }
    }
    out
}

/// How an instance of a fleet that spans accounts gets its image: the shared id as ImageId. In
/// another account the handoff parameter does not exist, and CloudFormation resolves a Systems
/// Manager parameter type (the value is a Parameter Store key, read in the stack's own account
/// and region when the stack is created or updated: "Specify existing resources at runtime with
/// CloudFormation-supplied parameter types", CloudFormation User Guide) before it creates
/// anything, so ImageParameter there names AWS's public AL2023 parameter (it exists in every
/// account and region, and is not used while ImageId is set), and ImageParameterName has the stack write the handoff
/// parameter in that account (the template's ImageHandoff). The baking account's own parameter,
/// written by bake, is never claimed by a stack.
fn image_overrides(ctx: &Context, declared: &[String], ami: &str, other_account: bool) -> BTreeMap<String, String> {
    let has = |p: &str| declared.iter().any(|d| d == p);
    let mut m = BTreeMap::new();
    if !has("ImageId") {
        return m;
    }
    m.insert("ImageId".to_string(), ami.to_string());
    if other_account && has("ImageParameterName") && has("ImageParameter") {
        m.insert("ImageParameter".to_string(), images::base_parameter(images::arch_of(&ctx.config.stack.instance_type)).to_string());
        m.insert("ImageParameterName".to_string(), images::handoff_parameter(&ctx.config));
    }
    m
}

/// Overrides grouped into as few UpdateStackInstances calls as possible: per region, the
/// accounts that want the same values.
fn override_groups(wanted: &BTreeMap<(String, String), BTreeMap<String, String>>, only: &BTreeSet<(String, String)>) -> Vec<Override> {
    let mut groups: BTreeMap<(String, Values), Vec<String>> = BTreeMap::new();
    // A target in `only` that wants no override gets an empty list: "To set an overridden
    // parameter back to the value specified in the stack set, specify a parameter list but do
    // not include the parameter in the list" (UpdateStackInstances, ParameterOverrides).
    for (account, region) in only {
        let params = wanted.get(&(account.clone(), region.clone())).cloned().unwrap_or_default();
        let key = (region.clone(), params.into_iter().collect());
        groups.entry(key).or_default().push(account.clone());
    }
    groups.into_iter().map(|((region, params), accounts)| Override { accounts, regions: vec![region], parameters: params.into_iter().collect() }).collect()
}

async fn follow(clients: &Clients, f: &Fleet, op: String, progress: &Progress, calls: &mut Calls, ui: Ui) -> Result<OperationOutcome> {
    let outcome = fleet::wait_operation(&clients.cfn, &f.name, &op, f.waits, progress, calls).await?;
    if let Some(e) = fleet::failure(&f.name, &outcome) {
        return Err(e);
    }
    // Within the tolerance, the operation succeeds with some targets failed: say which.
    for r in outcome.failed_targets() {
        ui.warn(format!("{} in {} failed (within the failure tolerance): {}", r.account, r.region, r.reason.as_deref().unwrap_or("no reason given")));
    }
    progress.line(&format!("stack set {}: {} {} ({} target(s))", f.name, outcome.action, outcome.status, outcome.results.len()));
    Ok(outcome)
}

/// Everything `fleet deploy` does once the clients exist; `interrupt` resolves on Ctrl-C.
pub async fn fleet_deploy_flow(
    clients: &Clients,
    args: &FleetDeployArgs,
    ctx: &Context,
    ui: Ui,
    confirmer: &dyn Confirmer,
    interrupt: impl Future<Output = ()>,
) -> Result<serde_json::Value> {
    let f = resolve(ctx, &args.targets)?;
    let config = &ctx.config;
    let progress = Progress::new(ui, &format!("planning stack set {}", f.name));
    tokio::pin!(interrupt);
    if let Some(n) = &f.notice {
        ui.warn(n);
    }

    // One user-data for every instance: baked mode, no region (read at boot from metadata).
    let inputs = Inputs::new(config, None, Mode::Baked, Format::CloudConfig, true)?;
    let rendered = render::render(&inputs)?;
    let report = validate::validate(&rendered, config, inputs.profile, tools(&args.tools));
    ui.report("user-data", &report);
    if !report.ok() {
        let names: Vec<_> = report.failures().map(|c| c.name.clone()).collect();
        return Err(Error::Validation(format!("the user-data for this fleet failed: {}", names.join(", "))));
    }
    let mut template = Template::load(args.template.as_deref())?;
    template.set_user_data(&base64::engine::general_purpose::STANDARD.encode(&rendered.output))?;
    template.check_policies()?;
    let declared = template.parameter_names();

    let images = region_images(clients, ctx, &f.regions).await?;
    let set = fleet::describe_set(&clients.cfn, &f.name).await?;
    let instances = match &set {
        Some(_) => fleet::list_instances(&clients.cfn, &f.name).await?,
        None => Vec::new(),
    };
    // The image owner is the account that baked it; any other target account needs it shared.
    let owner = share::owner(&clients_in(clients, &images[0].region), &images[0].image).await?;
    let other_accounts: Vec<String> = match f.permission {
        Permission::SelfManaged { .. } => f.accounts.iter().filter(|a| Some(a.as_str()) != owner.as_deref()).cloned().collect(),
        Permission::ServiceManaged => {
            let mut known: Vec<String> = instances.iter().map(|i| i.account.clone()).filter(|a| Some(a.as_str()) != owner.as_deref()).collect();
            known.sort();
            known.dedup();
            known
        }
    };
    let cross_account = !other_accounts.is_empty() || f.permission == Permission::ServiceManaged;
    if cross_account && config.bake.kms_key_id.is_none() {
        return Err(Error::Invalid(
            "the fleet spans accounts, and an image encrypted with the AWS managed aws/ebs key cannot be shared with another account: \
             set bake.kms_key_id to a customer-managed KMS key whose policy lets the fleet's accounts use it"
                .into(),
        ));
    }
    // Other accounts launch only an image under the fleet's key: this one, or the copy of it an
    // earlier deploy made; the rest are copied once confirmed.
    // KMS keys are regional: each region's image is under that region's key (bake.kms_key_ids,
    // a multi-region key's replica, or an alias of that region).
    let home = ctx.region.clone().unwrap_or_else(|| f.regions[0].clone());
    let mut keys: BTreeMap<String, String> = BTreeMap::new();
    if cross_account {
        for r in &f.regions {
            if let Some(k) = config.bake.kms_key_in(r, &home).map_err(Error::Invalid)? {
                keys.insert(r.clone(), k);
            }
        }
    }
    let key_of = |region: &str| keys.get(region).cloned().unwrap_or_default();
    let mut images = images;
    let mut needs_copy = Vec::new();
    if cross_account {
        for img in images.iter_mut() {
            match share::under_key(&clients_in(clients, &img.region), &img.image, &key_of(&img.region)).await? {
                share::UnderKey::Ready(id) => img.image = id,
                share::UnderKey::NeedsCopy => needs_copy.push(img.region.clone()),
            }
        }
    }

    // The other accounts' Auto Scaling groups need a grant on each region's key (bake::grants).
    // A service-managed fleet's accounts are known once deployed: those ListStackInstances
    // reports get one; accounts that join an organizational unit later need the key policy
    // (README, Fleet).
    let mut grant_plan: Vec<grants::Grant> = Vec::new();
    if cross_account && !other_accounts.is_empty() {
        for r in &f.regions {
            if let Some(k) = keys.get(r) {
                let key = grants::read(&clients_in(clients, r), k, r).await?;
                grant_plan.extend(grants::plan(&key, &f.name, r, &other_accounts, config.fleet.grants_from(), config.fleet.execution_role()));
            }
        }
    }

    let choice = Choice { ami: String::new(), source: Source::Baked { parameter: images[0].parameter.clone() }, mode: Mode::Baked };
    let mut parameters = stack_parameters(&template, config, &choice)?;
    if declared.iter().any(|d| d == "ImageParameter") {
        parameters.insert("ImageParameter".into(), images[0].parameter.clone());
    }
    let mut image_by_region: BTreeMap<String, String> = images.iter().map(|i| (i.region.clone(), i.image.clone())).collect();
    let spec = Spec {
        name: f.name.clone(),
        template_body: template.body()?,
        parameters,
        tags: BTreeMap::from([("imgbuild:project".to_string(), config.name.clone())]),
        permission: f.permission.clone(),
        accounts: f.accounts.clone(),
        organizational_units: f.organizational_units.clone(),
        regions: f.regions.clone(),
        overrides: Vec::new(),
        prefs: f.prefs.clone(),
    };

    // Overrides: known accounts only (a service-managed fleet's accounts are known once deployed).
    let override_accounts: Vec<String> = match f.permission {
        Permission::SelfManaged { .. } => f.accounts.clone(),
        Permission::ServiceManaged => instances.iter().map(|i| i.account.clone()).collect::<BTreeSet<_>>().into_iter().collect(),
    };
    let mut wanted = desired_overrides(ctx, &declared, &override_accounts, &f.regions, cross_account.then_some(&image_by_region), owner.as_deref());
    let existing: BTreeSet<(String, String)> = instances.iter().map(|i| (i.account.clone(), i.region.clone())).collect();
    // Every existing target is asked what overrides it has now: one whose override was deleted
    // from the config wants none, and only DescribeStackInstance says it still has one.
    let mut changed_overrides = BTreeSet::new();
    for i in &instances {
        let key = (i.account.clone(), i.region.clone());
        if f.targets(i) && fleet::instance_overrides(&clients.cfn, &f.name, &i.account, &i.region).await? != wanted.get(&key).cloned().unwrap_or_default() {
            changed_overrides.insert(key);
        }
    }
    let plan = fleet::plan(&spec, set.as_ref(), &instances, &changed_overrides);
    show_plan(&plan, &progress);
    let cost = fleet_cost(&clients.pricing, ctx.config.prices, &template, &spec.parameters, &plan, &progress).await;
    // Instances the config no longer names stay as they are (and follow StackSet updates):
    // removing them is destroy's to do, asked for by name.
    let left_alone: Vec<&Instance> = instances.iter().filter(|i| !f.targets(i)).collect();
    for i in &left_alone {
        ui.warn(format!(
            "{} in {} is an instance of stack set {} but not among the fleet's targets: left as it is (`imgbuild fleet destroy --accounts {} --regions {}` removes it)",
            i.account, i.region, f.name, i.account, i.region
        ));
    }
    let set_changed = set.as_ref().is_none_or(|s| s.template_body != spec.template_body || s.parameters != spec.parameters);
    let to_create: Vec<&TargetPlan> = plan.iter().filter(|p| p.action == Action::Create).collect();
    show_grants(&grant_plan, &progress);
    let doc = |images: &[RegionImage], plan: &[TargetPlan], ops: &[OperationOutcome], grants: &[grants::Grant], executed: bool| {
        json!({
            "grants": grants,
            "ok": true,
            "stack_set": f.name,
            "images": images,
            "userdata_sha256": rendered.sha256(),
            "executed": executed,
            "targets": plan,
            "operations": ops,
            "cost": cost,
        })
    };
    let grants_to_make = grant_plan.iter().filter(|g| g.state == "create").count();
    if plan.iter().all(|p| p.action == Action::NoChange) && grants_to_make == 0 {
        ui.info(format!("stack set {}: no changes", f.name));
        return Ok(doc(&images, &plan, &[], &grant_plan, false));
    }
    if args.dry_run || args.no_execute {
        ui.info(if args.no_execute { "--no-execute: the plan above was not started" } else { "dry run: nothing changed" });
        return Ok(doc(&images, &plan, &[], &grant_plan, false));
    }
    if !args.yes {
        let n = |a: Action| plan.iter().filter(|p| p.action == a).count();
        let question = format!(
            "Stack set {}: create {} target(s), update {}, leave {} unchanged{}. Go ahead?",
            f.name,
            n(Action::Create),
            n(Action::Update),
            n(Action::NoChange),
            if grants_to_make > 0 {
                let from = if grant_plan.iter().any(|g| g.state == "create" && g.from_role.is_some()) {
                    format!(", each made from its account as {}", config.fleet.execution_role())
                } else {
                    ", made from the key's account".to_string()
                };
                format!("; {grants_to_make} KMS grant(s) to other accounts' Auto Scaling role{from}")
            } else {
                String::new()
            }
        );
        progress.pause();
        let yes = tokio::select! {
            r = confirmer.confirm(&question) => r?,
            _ = &mut interrupt => return Err(Error::Interrupted { cleaned: vec!["nothing: no operation was started".into()] }),
        };
        progress.resume();
        if !yes {
            return Err(Error::Invalid("not confirmed: nothing was changed".into()));
        }
    }

    // Grants made from the target accounts: one AssumeRole per account (its credentials serve
    // every region), all before anything changes, so a refused role stops the run before any
    // copy, grant, sharing or StackSet operation.
    let mut assumed: BTreeMap<String, aws_sdk_kms::config::Credentials> = BTreeMap::new();
    for g in grant_plan.iter().filter(|g| g.state == "create") {
        if let Some(role) = &g.from_role
            && !assumed.contains_key(&g.from_account)
        {
            progress.set(&format!("assuming {role} to make {}'s grant from that account", g.from_account));
            let credentials = assume_for_grant(&clients.sts, role, &g.from_account, &f.name).await?;
            assumed.insert(g.from_account.clone(), credentials);
        }
    }

    if cross_account {
        if !needs_copy.is_empty() {
            let token = run_token();
            for img in images.iter_mut().filter(|i| needs_copy.contains(&i.region)) {
                progress.set(&format!("copying {} in {} under the fleet's key", img.image, img.region));
                let here = clients_in(clients, &img.region);
                let kms = key_of(&img.region);
                let copy = tokio::select! {
                    r = share::copy_under_key(&here, &img.image, &img.region, &kms, &token, f.waits, &progress) => r?,
                    _ = &mut interrupt => return Err(Error::Interrupted { cleaned: vec!["nothing: an image copy under way goes on in EC2 and is found by the next deploy".into()] }),
                };
                progress.line(&format!("{} in {}: copied under {kms} as {copy}", img.image, img.region));
                img.image = copy;
            }
            image_by_region = images.iter().map(|i| (i.region.clone(), i.image.clone())).collect();
            wanted = desired_overrides(ctx, &declared, &override_accounts, &f.regions, Some(&image_by_region), owner.as_deref());
        }
        for g in grant_plan.iter_mut().filter(|g| g.state == "create") {
            progress.set(&format!("granting {} use of {} in {} (from {})", g.account, g.key, g.region, g.from_account));
            // From the target account with its credentials, in the key's region; else from here.
            let kms = match (&g.from_role, assumed.get(&g.from_account)) {
                (Some(_), Some(credentials)) => clients.kms_as.client(&g.from_account, &g.region, credentials.clone()),
                _ => clients_in(clients, &g.region).kms,
            };
            grants::create(&kms, g).await?;
            progress.line(&format!(
                "granted {}'s Auto Scaling role use of {} in {} (grant {}, made from {})",
                g.account,
                g.key,
                g.region,
                g.grant_id.as_deref().unwrap_or("?"),
                g.from_account
            ));
        }
        let grantees: Vec<String> = match f.permission {
            Permission::SelfManaged { .. } => other_accounts.clone(),
            // Organizations: the image goes to the organizational units themselves (f.orgs).
            Permission::ServiceManaged => Vec::new(),
        };
        for img in &images {
            progress.set(&format!("sharing {} in {} with the fleet", img.image, img.region));
            share::share(&clients_in(clients, &img.region), &img.image, &grantees, &f.orgs, owner.as_deref()).await?;
        }
    }

    let mut calls = Calls::default();
    let mut ops = Vec::new();
    let token = run_token();
    // What this run started, for the word on Ctrl-C: nothing here can be undone from the client.
    // The grants and sharing made before it stay too: `fleet destroy` takes them back.
    let mut prepared: Vec<String> = Vec::new();
    let made = grant_plan.iter().filter(|g| g.state == "created").count();
    if made > 0 {
        prepared.push(format!("{made} KMS grant(s) to other accounts were made"));
    }
    if cross_account {
        prepared.push("the image was shared with the fleet's other accounts".into());
    }
    let started: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let note = |what: String| started.lock().expect("started lock").push(what);
    let run = async {
        let mut n = 0;
        let mut next_id = || {
            n += 1;
            format!("imgbuild-{token}-{n}")
        };
        if set.is_none() {
            progress.set(&format!("creating stack set {}", f.name));
            fleet::create_set(&clients.cfn, &spec, &token).await?;
            note(format!("stack set {} was created (remove it with `imgbuild fleet destroy`)", f.name));
        } else if set_changed {
            let mut present: Vec<String> = f.regions.iter().filter(|r| instances.iter().any(|i| &i.region == *r)).cloned().collect();
            for i in &instances {
                if !present.contains(&i.region) {
                    present.push(i.region.clone());
                }
            }
            let op = fleet::update_set(&clients.cfn, &spec, &present, &next_id()).await?;
            note(format!("operation {op} (update of every instance)"));
            ops.push(follow(clients, &f, op, &progress, &mut calls, ui).await?);
        }
        // New instances get their overrides in the create call itself. Per region, the accounts
        // that want the same values; then regions that want the same for the same accounts go
        // together (one operation for a fleet without overrides).
        // A service-managed StackSet never deploys to the management account, where it runs
        // ("StackSets doesn't deploy stack instances to the organization management account",
        // DeploymentTargets, API Reference): every account of an organizational unit is another
        // account.
        let region_level = |region: &str| -> BTreeMap<String, String> {
            match (cross_account, image_by_region.get(region)) {
                (true, Some(ami)) => image_overrides(ctx, &declared, ami, true),
                _ => BTreeMap::new(),
            }
        };
        let mut per_region: BTreeMap<(String, Values), Vec<String>> = BTreeMap::new();
        for p in &to_create {
            let values = match f.permission {
                Permission::SelfManaged { .. } => wanted.get(&(p.target.clone(), p.region.clone())).cloned().unwrap_or_default(),
                // The organizational units' accounts are not known yet: what the whole region wants.
                Permission::ServiceManaged => region_level(&p.region),
            };
            let target = match f.permission {
                Permission::SelfManaged { .. } => p.target.clone(),
                Permission::ServiceManaged => String::new(),
            };
            let entry = per_region.entry((p.region.clone(), values.into_iter().collect())).or_default();
            if !target.is_empty() {
                entry.push(target);
            }
        }
        let mut groups: Vec<(Vec<String>, Values, Vec<String>)> = Vec::new();
        for region in &f.regions {
            for ((r, values), accounts) in &per_region {
                if r != region {
                    continue;
                }
                match groups.iter_mut().find(|(a, v, _)| a == accounts && v == values) {
                    Some((_, _, regions)) => regions.push(region.clone()),
                    None => groups.push((accounts.clone(), values.clone(), vec![region.clone()])),
                }
            }
        }
        for (accounts, values, regions) in groups {
            progress.set(&format!("creating {} stack instance(s) in {}", accounts.len().max(1) * regions.len(), regions.join(",")));
            let values: BTreeMap<String, String> = values.into_iter().collect();
            let op = fleet::create_instances(&clients.cfn, &spec, &accounts, &regions, &values, &next_id()).await?;
            note(format!("operation {op} (creating instances in {})", regions.join(",")));
            ops.push(follow(clients, &f, op, &progress, &mut calls, ui).await?);
        }
        // Overrides that changed on existing instances; and on a service-managed fleet's new
        // accounts (known only now), those that want more than their region's values.
        let mut wanted = wanted.clone();
        let mut apply: BTreeSet<(String, String)> = changed_overrides.clone();
        if f.permission == Permission::ServiceManaged && !to_create.is_empty() && !ctx.config.fleet.overrides.is_empty() {
            let now = fleet::list_instances(&clients.cfn, &f.name).await?;
            let accounts: Vec<String> = now.iter().map(|i| i.account.clone()).collect::<BTreeSet<_>>().into_iter().collect();
            wanted = desired_overrides(ctx, &declared, &accounts, &f.regions, cross_account.then_some(&image_by_region), owner.as_deref());
            for i in &now {
                let key = (i.account.clone(), i.region.clone());
                if !existing.contains(&key) && wanted.get(&key).cloned().unwrap_or_default() != region_level(&i.region) {
                    apply.insert(key);
                }
            }
        }
        for o in override_groups(&wanted, &apply) {
            progress.set(&format!("setting parameter overrides on {} instance(s) in {}", o.accounts.len(), o.regions.join(",")));
            let op = fleet::update_instances(&clients.cfn, &spec, &o, &next_id()).await?;
            note(format!("operation {op} (overrides in {})", o.regions.join(",")));
            ops.push(follow(clients, &f, op, &progress, &mut calls, ui).await?);
        }
        Ok::<_, Error>(())
    };
    let result = tokio::select! {
        r = run => r,
        _ = &mut interrupt => {
            let started = started.lock().expect("started lock").clone();
            let mut cleaned = if started.is_empty() {
                vec!["nothing: no StackSet operation had started".to_string()]
            } else {
                vec![format!(
                    "nothing: StackSet operations cannot be undone from here and go on in CloudFormation (follow them with `imgbuild fleet status`): {}",
                    started.join("; ")
                )]
            };
            if !prepared.is_empty() {
                cleaned.push(format!("kept: {} (`imgbuild fleet destroy` takes them back)", prepared.join("; ")));
            }
            Err(Error::Interrupted { cleaned })
        }
    };
    result?;
    let took = progress.elapsed();
    drop(progress);
    ui.info(format!("stack set {}: {} operation(s) in {}s", f.name, ops.len(), took.as_secs()));
    let mut d = doc(&images, &plan, &ops, &grant_plan, true);
    d["calls"] = json!(calls);
    Ok(d)
}

/// Credentials of `role` in `account`, to make that account's grant from it: STS AssumeRole
/// with a session named after the StackSet (cut to RoleSessionName's 64 characters; StackSet
/// names are letters, digits and hyphens, which it takes) for 900 seconds: "The value specified
/// can range from 900 seconds (15 minutes) up to the maximum session duration set for the role"
/// (AssumeRole, DurationSeconds), and a few CreateGrant calls need no more. A refusal
/// (AccessDenied) says what to fix.
async fn assume_for_grant(sts: &aws_sdk_sts::Client, role: &str, account: &str, set: &str) -> Result<aws_sdk_kms::config::Credentials> {
    let session: String = format!("imgbuild-grant-{set}").chars().take(64).collect();
    let out = sts.assume_role().role_arn(role).role_session_name(session).duration_seconds(900).send().await.map_err(|e| {
        let denied = matches!(&e, aws_sdk_sts::error::SdkError::ServiceError(s) if crate::aws::code(s.err()) == Some("AccessDenied"));
        let mut err = crate::aws::err("AssumeRole", format!("role {role} in account {account}"), e);
        if denied && let Error::Aws { message, .. } = &mut err {
            message.push_str(&format!(
                ". imgbuild makes account {account}'s KMS grant from that account (fleet.grants_from: target-account) through its StackSet execution role: \
                 let that role's trust policy allow this (the administration) account, as AWS's AWSCloudFormationStackSetExecutionRole template does, \
                 allow sts:AssumeRole on it to whoever runs imgbuild, set fleet.execution_role_name if the role has another name, \
                 or set fleet.grants_from: key-account to make the grants from the key's account. No StackSet operation was started"
            ));
        }
        err
    })?;
    let c = out.credentials().ok_or_else(|| Error::Tool(format!("AssumeRole of {role} answered without Credentials")))?;
    Ok(aws_sdk_kms::config::Credentials::new(
        c.access_key_id(),
        c.secret_access_key(),
        Some(c.session_token().to_string()),
        std::time::SystemTime::try_from(*c.expiration()).ok(),
        "imgbuild-assume-role",
    ))
}

/// Where a grant is (to be) made, for the plan.
fn made_from(g: &grants::Grant) -> String {
    match &g.from_role {
        Some(role) => format!("from {} as {}", g.from_account, role.rsplit('/').next().unwrap_or(role)),
        None => format!("from the key's account {}", g.from_account),
    }
}

/// The grants the run makes (those already there are counted, not listed), and from which
/// account each is made.
fn show_grants(plan: &[grants::Grant], progress: &Progress) {
    const LISTED: usize = 10;
    let mut regions: Vec<&str> = plan.iter().map(|g| g.region.as_str()).collect();
    regions.dedup();
    for r in regions {
        let new: Vec<&grants::Grant> = plan.iter().filter(|g| g.region == r && g.state == "create").collect();
        let there = plan.iter().filter(|g| g.region == r && g.state == "exists").count();
        if new.len() <= LISTED {
            for g in &new {
                progress.line(&format!("+ grant  {} in {r}: use of {} to its AWSServiceRoleForAutoScaling, {}", g.account, g.key, made_from(g)));
            }
        } else {
            let from = match &new[0].from_role {
                Some(role) => format!("each from its own account as {}", role.rsplit('/').next().unwrap_or(role)),
                None => format!("from the key's account {}", new[0].from_account),
            };
            progress.line(&format!(
                "+ grant  {} accounts in {r} ({}, ... {}): use of {}, {from}",
                new.len(),
                new[0].account,
                new[new.len() - 1].account,
                new[0].key
            ));
        }
        if there > 0 {
            progress.line(&format!("  {there} grant(s) in {r} already there"));
        }
    }
}

/// What each target gets: a line per target, or per region and action past a few targets, so a
/// fleet of hundreds of accounts reads in a screen (`--output json` keeps every target).
fn show_plan(plan: &[TargetPlan], progress: &Progress) {
    const LISTED: usize = 10;
    let mut groups: Vec<((&str, Action), Vec<&str>)> = Vec::new();
    for p in plan {
        match groups.iter_mut().find(|(k, _)| *k == (p.region.as_str(), p.action)) {
            Some((_, v)) => v.push(&p.target),
            None => groups.push(((&p.region, p.action), vec![&p.target])),
        }
    }
    for ((region, action), targets) in groups {
        let what = match action {
            Action::Create => "+ create",
            Action::Update => "~ update",
            Action::NoChange => "  no change",
        };
        if targets.len() <= LISTED {
            for t in targets {
                progress.line(&format!("{what}  {t} in {region}"));
            }
        } else {
            progress.line(&format!("{what}  {} targets in {region} ({}, ... {})", targets.len(), targets[0], targets[targets.len() - 1]));
        }
    }
}

#[derive(Debug, Clone, Serialize)]
struct InstanceRow {
    #[serde(flatten)]
    instance: Instance,
    /// The image the instance was given, as deploy gives it: the one its region's handoff
    /// parameter names; in a fleet that spans accounts, that image's copy under bake.kms_key_id
    /// (or the image itself when it already was under the key).
    image: Option<String>,
}

pub async fn fleet_status_flow(clients: &Clients, args: &FleetStatusArgs, ctx: &Context, ui: Ui) -> Result<serde_json::Value> {
    let name = ctx.config.fleet.stack_set.clone().unwrap_or_else(|| ctx.config.stack_name().to_string());
    let Some(set) = fleet::describe_set(&clients.cfn, &name).await? else {
        ui.info(format!("stack set {name} does not exist (run `imgbuild fleet deploy`)"));
        return Ok(json!({ "ok": true, "stack_set": name, "exists": false, "instances": [] }));
    };
    let mut drift_op = None;
    if args.drift {
        let progress = Progress::new(ui, &format!("detecting drift on stack set {name}"));
        let prefs = Prefs {
            max_concurrent: Amount::parse(&ctx.config.fleet.max_concurrent, 1).map_err(Error::Invalid)?,
            failure_tolerance: Amount::parse(&ctx.config.fleet.failure_tolerance, 0).map_err(Error::Invalid)?,
            parallel_regions: ctx.config.fleet.region_concurrency == RegionConcurrency::Parallel,
            region_order: Vec::new(),
        };
        let waits = Waits {
            timeout: std::time::Duration::from_secs(args.timeout.unwrap_or(ctx.config.aws.stack_timeout_secs)),
            poll: std::time::Duration::from_secs(ctx.config.aws.poll_interval_secs),
        };
        let op = fleet::detect_drift(&clients.cfn, &name, &prefs, &format!("imgbuild-drift-{}", run_token())).await?;
        let mut calls = Calls::default();
        drift_op = Some(fleet::wait_operation(&clients.cfn, &name, &op, waits, &progress, &mut calls).await?);
    }
    let set = if args.drift { fleet::describe_set(&clients.cfn, &name).await?.unwrap_or(set) } else { set };
    let instances = fleet::list_instances(&clients.cfn, &name).await?;
    let last = fleet::last_operation(&clients.cfn, &name).await?;

    // A few calls per region, never per instance.
    let image_parameter = set.parameters.get("ImageParameter").cloned().filter(|p| !p.is_empty());
    let set_image = set.parameters.get("ImageId").cloned().filter(|i| !i.is_empty());
    let own = set.account().map(String::from);
    let home = ctx.region.clone().unwrap_or_default();
    // Deploy gives every instance of a fleet that spans accounts the shared image as ImageId.
    let cross_account = instances.iter().any(|x| Some(x.account.as_str()) != own.as_deref());
    let mut by_region: BTreeMap<String, (Option<String>, Option<String>)> = BTreeMap::new();
    for i in &instances {
        if by_region.contains_key(&i.region) {
            continue;
        }
        let here = clients_in(clients, &i.region);
        let image = match (&set_image, &image_parameter) {
            (Some(id), _) => Some(id.clone()),
            (None, Some(p)) => images::get_parameter(&here, p).await?,
            (None, None) => None,
        };
        let kms = ctx.config.bake.kms_key_in(&i.region, &home).ok().flatten();
        let shared = match (&image, &kms) {
            (Some(img), Some(k)) if cross_account => match share::under_key(&here, img, k).await? {
                share::UnderKey::Ready(id) => Some(id),
                share::UnderKey::NeedsCopy => None,
            },
            _ => None,
        };
        by_region.insert(i.region.clone(), (image, shared));
    }
    let image_of = |i: &Instance| -> Option<String> {
        let (image, shared) = by_region.get(&i.region)?;
        if cross_account { shared.clone() } else { image.clone() }
    };
    let rows: Vec<InstanceRow> = instances.iter().map(|i| InstanceRow { image: image_of(i), instance: i.clone() }).collect();

    ui.info(format!("stack set {name}: {}{}", set.status, set.drift_status.as_deref().map(|d| format!(", drift {d}")).unwrap_or_default()));
    if let Some((id, action, status, reason)) = &last {
        ui.info(format!("last operation: {action} {status} ({id}){}", reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default()));
    }
    for r in &rows {
        let i = &r.instance;
        ui.info(format!(
            "  {} {:<15} {:<9} {:<10} drift {:<11} image {}{}",
            i.account,
            i.region,
            i.status,
            i.detailed_status.as_deref().unwrap_or("?"),
            i.drift_status.as_deref().unwrap_or("UNKNOWN"),
            r.image.as_deref().unwrap_or("?"),
            i.reason.as_deref().map(|x| format!(": {x}")).unwrap_or_default()
        ));
    }
    let last_doc = last.map(|(id, action, status, reason)| json!({ "operation_id": id, "action": action, "status": status, "reason": reason }));
    Ok(json!({
        "ok": true,
        "stack_set": name,
        "exists": true,
        "status": set.status,
        "drift_status": set.drift_status,
        "last_drift_check": set.last_drift_check,
        "drift_detection": drift_op,
        "last_operation": last_doc,
        "instances": rows,
    }))
}

#[derive(Debug, Clone, Serialize)]
struct Kept {
    account: String,
    region: String,
    /// The file system id, when its stack was readable from here (this account).
    file_system: Option<String>,
}

/// The FileSystemId output of an instance's stack, when this account can read it.
async fn file_system_of(clients: &Clients, i: &Instance) -> Option<String> {
    let id = i.stack_id.as_deref()?;
    let cfn = clients_in(clients, &i.region).cfn;
    let s = crate::stack::describe(&cfn, id).await.ok()??;
    crate::stack::outputs_of(&s).get("FileSystemId").cloned()
}

pub async fn fleet_destroy_flow(
    clients: &Clients,
    args: &FleetDestroyArgs,
    ctx: &Context,
    ui: Ui,
    confirmer: &dyn Confirmer,
    interrupt: impl Future<Output = ()>,
) -> Result<serde_json::Value> {
    let f = &ctx.config.fleet;
    let name = f.stack_set.clone().unwrap_or_else(|| ctx.config.stack_name().to_string());
    tokio::pin!(interrupt);
    let Some(set) = fleet::describe_set(&clients.cfn, &name).await? else {
        ui.info(format!("stack set {name} does not exist: nothing to destroy"));
        return Ok(json!({ "ok": true, "stack_set": name, "existed": false, "kept": [] }));
    };
    let instances = fleet::list_instances(&clients.cfn, &name).await?;
    let t = &args.targets;
    let ou_ids: Vec<String> = t.organizational_units.iter().map(|o| org_target(o).map(|x| x.id).unwrap_or_else(|_| o.clone())).collect();
    let chosen: Vec<&Instance> = instances
        .iter()
        .filter(|i| t.accounts.is_empty() || t.accounts.contains(&i.account))
        .filter(|i| t.regions.is_empty() || t.regions.contains(&i.region))
        .filter(|i| ou_ids.is_empty() || i.organizational_unit.as_ref().is_some_and(|o| ou_ids.contains(o)))
        .collect();
    let everything = chosen.len() == instances.len() && t.organizational_units.is_empty();
    if !args.yes {
        let question = format!(
            "Delete {} stack instance(s) of stack set {name}{}? (each EFS file system and its data are kept)",
            chosen.len(),
            if everything { ", then the stack set" } else { "" }
        );
        let yes = tokio::select! {
            r = confirmer.confirm(&question) => r?,
            _ = &mut interrupt => return Err(Error::Interrupted { cleaned: vec!["nothing: nothing was deleted".into()] }),
        };
        if !yes {
            return Err(Error::Invalid("not confirmed: nothing was deleted".into()));
        }
    }
    let progress = Progress::new(ui, &format!("destroying stack set {name}"));
    let own = set.account().map(String::from);
    let mut kept = Vec::new();
    for i in &chosen {
        // Another account's stack is not readable from here; its file system stays all the same.
        let fs = if own.as_deref() == Some(i.account.as_str()) { file_system_of(clients, i).await } else { None };
        kept.push(Kept { account: i.account.clone(), region: i.region.clone(), file_system: fs });
    }
    // What other accounts lose with their last instance in a region: the image (the one each
    // removed instance was given, its ImageId override, read before the instance goes) and the
    // grant on that region's key. The baking account keeps both.
    let removed_alone: Vec<&Instance> = chosen
        .iter()
        .copied()
        .filter(|c| own.as_deref() != Some(c.account.as_str()))
        .filter(|c| !instances.iter().any(|i| i.account == c.account && i.region == c.region && !chosen.iter().any(|x| std::ptr::eq(*x, i))))
        .collect();
    // Self-managed fleets share with each account; service-managed ones with the organizational
    // units, which lose it when the whole StackSet goes.
    let service_managed = f.permission_model == PermissionModel::ServiceManaged;
    let ou_unshare = everything && service_managed && !args.keep_sharing;
    let mut shared_images: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    if !args.keep_sharing {
        for c in &chosen {
            let alone = !service_managed && removed_alone.iter().any(|x| std::ptr::eq(*x, *c));
            if !alone && !ou_unshare {
                continue;
            }
            if let Some(ami) = fleet::instance_overrides(&clients.cfn, &name, &c.account, &c.region).await?.get("ImageId").filter(|a| !a.is_empty()) {
                let accounts = shared_images.entry((c.region.clone(), ami.clone())).or_default();
                if alone {
                    accounts.push(c.account.clone());
                }
            }
        }
    }
    let prefs = Prefs {
        max_concurrent: Amount::parse(t.max_concurrent.as_deref().unwrap_or(&f.max_concurrent), 1)
            .map_err(|m| Error::Invalid(format!("--max-concurrent: {m}")))?,
        failure_tolerance: Amount::parse(t.failure_tolerance.as_deref().unwrap_or(&f.failure_tolerance), 0)
            .map_err(|m| Error::Invalid(format!("--failure-tolerance: {m}")))?,
        parallel_regions: t.parallel_regions || f.region_concurrency == RegionConcurrency::Parallel,
        region_order: Vec::new(),
    };
    let waits = Waits {
        timeout: std::time::Duration::from_secs(t.timeout.unwrap_or(ctx.config.aws.stack_timeout_secs)),
        poll: std::time::Duration::from_secs(ctx.config.aws.poll_interval_secs),
    };
    let permission = match f.permission_model {
        PermissionModel::SelfManaged => Permission::SelfManaged { administration_role_arn: None, execution_role_name: None },
        PermissionModel::ServiceManaged => Permission::ServiceManaged,
    };
    let fl = Fleet {
        name: name.clone(),
        permission: permission.clone(),
        accounts: Vec::new(),
        organizational_units: Vec::new(),
        orgs: Vec::new(),
        regions: Vec::new(),
        prefs: prefs.clone(),
        waits,
        notice: None,
    };
    let mut calls = Calls::default();
    let mut ops = Vec::new();
    let token = run_token();
    let run = async {
        if !chosen.is_empty() {
            let accounts: Vec<String> = match permission {
                // Organizational units are deleted whole unless accounts were named.
                Permission::ServiceManaged if t.accounts.is_empty() => Vec::new(),
                _ => chosen.iter().map(|i| i.account.clone()).collect::<BTreeSet<_>>().into_iter().collect(),
            };
            let regions: Vec<String> = chosen.iter().map(|i| i.region.clone()).collect::<BTreeSet<_>>().into_iter().collect();
            let ous: Vec<String> = if ou_ids.is_empty() {
                chosen.iter().filter_map(|i| i.organizational_unit.clone()).collect::<BTreeSet<_>>().into_iter().collect()
            } else {
                ou_ids.clone()
            };
            let op = fleet::delete_instances(
                &clients.cfn,
                &name,
                &permission,
                &fleet::Targets { accounts, organizational_units: ous, regions },
                &prefs,
                &format!("imgbuild-{token}-delete"),
            )
            .await?;
            ops.push(follow(clients, &fl, op, &progress, &mut calls, ui).await?);
        }
        if everything {
            fleet::delete_set(&clients.cfn, &name).await?;
            progress.line(&format!("stack set {name} deleted"));
        }
        Ok::<_, Error>(())
    };
    let result = tokio::select! {
        r = run => r,
        _ = &mut interrupt => Err(Error::Interrupted { cleaned: vec![format!(
            "nothing: the deletion goes on in CloudFormation (follow it with `imgbuild fleet status`)"
        )] }),
    };
    result?;
    // Only once the instances are gone: their Auto Scaling groups no longer launch anything.
    let mut unshared = Vec::new();
    // A service-managed fleet shared each image with its organizational units: taken back when
    // the whole StackSet goes.
    let orgs: Vec<OrgTarget> = if ou_unshare { f.organizational_units.iter().filter_map(|o| org_target(o).ok()).collect() } else { Vec::new() };
    for ((region, image), accounts) in &shared_images {
        let done = share::unshare(&clients_in(clients, region), image, accounts, &orgs).await?;
        if !done.is_empty() {
            progress.line(&format!("{image} in {region}: launch and create-volume permission revoked for {}", done.join(", ")));
            unshared.push(json!({ "region": region, "image": image, "revoked_from": done }));
        }
    }
    let mut revoked = Vec::new();
    if !args.keep_grants {
        let home = ctx.region.clone().unwrap_or_default();
        let mut regions: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for c in &removed_alone {
            regions.entry(c.region.as_str()).or_default().push(c.account.clone());
        }
        for (region, accounts) in regions {
            let Some(k) = ctx.config.bake.kms_key_in(region, &home).ok().flatten() else { continue };
            let here = clients_in(clients, region);
            let key = grants::read(&here, &k, region).await?;
            for a in &accounts {
                if let Some(g) = grants::revoke(&here, &key, &name, region, a).await? {
                    progress.line(&format!("revoked grant {} ({}'s Auto Scaling role) on {} in {region}", g.grant_id.as_deref().unwrap_or("?"), a, g.key));
                    revoked.push(g);
                }
            }
        }
    }
    drop(progress);
    for k in &kept {
        match &k.file_system {
            Some(fs) => ui.info(format!("kept EFS file system {fs} with the Chroma data in {} {} (the template retains it)", k.account, k.region)),
            None => ui.info(format!(
                "kept the EFS file system of {} in {} (the template retains it; its id is in that stack's FileSystemId output, readable from that account)",
                k.account, k.region
            )),
        }
    }
    Ok(json!({
        "ok": true,
        "stack_set": name,
        "existed": true,
        "deleted_stack_set": everything,
        "operations": ops,
        "kept": kept,
        "unshared": unshared,
        "revoked_grants": revoked,
    }))
}

/// What the targets the plan creates add a month: each a whole new stack in its region, priced
/// from the resources its CREATE change set would add, at the Price List API's prices (bounded,
/// asked once a region however many accounts go there) unless `prices: table`, the table filling
/// in. Updates of existing targets are not priced (a stack set shows no per-resource diff).
async fn fleet_cost(
    pricing: &aws_sdk_pricing::Client,
    source: crate::config::PriceSource,
    template: &Template,
    parameters: &BTreeMap<String, String>,
    plan: &[TargetPlan],
    progress: &Progress,
) -> serde_json::Value {
    let adds = crate::cost::new_stack(template, parameters);
    let instance_type = parameters.get("InstanceType").map(String::as_str).unwrap_or_default();
    let creates: Vec<&TargetPlan> = plan.iter().filter(|p| p.action == Action::Create).collect();
    let mut by_region = BTreeMap::new();
    for region in creates.iter().map(|p| p.region.as_str()).collect::<BTreeSet<_>>() {
        let inputs = crate::cost::Inputs::from_template(template, region, instance_type);
        let book = crate::cost::book(pricing, source, region, &crate::cost::products(&adds, &inputs)).await;
        let e = crate::cost::estimate_with(&adds, &inputs, &book);
        if let Some(why) = &e.fallback {
            progress.line(&format!("prices for {region}: {why}"));
        }
        by_region.insert(region, e);
    }
    let mut targets = Vec::new();
    let mut cents = 0i64;
    for p in creates {
        let e = &by_region[p.region.as_str()];
        cents += (e.monthly_usd * 100.0).round() as i64;
        progress.line(&format!(
            "{} in {}: a new stack, ${:.2} a month ({}){}",
            p.target,
            p.region,
            e.monthly_usd,
            e.source,
            if e.unpriced.is_empty() { String::new() } else { format!("; not priced: {}", e.unpriced.join("; ")) }
        ));
        targets.push(json!({ "target": p.target, "region": p.region, "estimate": e }));
    }
    let sources: BTreeMap<&str, &str> = by_region.iter().map(|(r, e)| (*r, e.source.as_str())).collect();
    json!({ "targets": targets, "monthly_usd": cents as f64 / 100.0, "currency": "USD", "date": crate::cost::prices::DATE, "sources": sources })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(from_account: &str, from_role: Option<&str>) -> grants::Grant {
        grants::Grant {
            account: "333333333333".into(),
            region: "us-east-1".into(),
            key: "arn:aws:kms:us-east-1:111111111111:key/1234abcd-12ab-34cd-56ef-1234567890ab".into(),
            grantee: grants::grantee("aws", "333333333333"),
            name: grants::grant_name("vectordb", "333333333333"),
            from_account: from_account.into(),
            from_role: from_role.map(String::from),
            state: "create".into(),
            grant_id: None,
        }
    }

    /// The plan line says from which account a grant is made, and as which role.
    #[test]
    fn the_plan_says_from_where_a_grant_is_made() {
        let role = grants::execution_role_arn("aws", "333333333333", "AWSCloudFormationStackSetExecutionRole");
        assert_eq!(role, "arn:aws:iam::333333333333:role/AWSCloudFormationStackSetExecutionRole");
        assert_eq!(made_from(&grant("333333333333", Some(&role))), "from 333333333333 as AWSCloudFormationStackSetExecutionRole");
        assert_eq!(made_from(&grant("111111111111", None)), "from the key's account 111111111111");
    }
}
