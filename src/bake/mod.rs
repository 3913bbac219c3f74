//! `imgbuild bake`: the bootstrap baked into an AMI through an SSM Automation execution, keyed
//! by a digest of everything that goes into it, so the same inputs give the same image (and the
//! second bake with them launches nothing).
//!
//! Like Packer's builders, the bake records each thing it makes the moment it exists (typed, in
//! `Made`), and on failure or Ctrl-C removes it in reverse: stops the execution, confirms the
//! build instance is gone, and deregisters a half-made image with its snapshots.
//!
//! `images` owns which AMI an instance boots and the project's images (list, prune, in use);
//! `share` hands the image to other accounts and `grants` lets their Auto Scaling groups use its key.

pub mod gc;
pub mod grants;
pub mod images;
pub mod share;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use askama::Template;
use aws_sdk_ec2::types::{Filter, Image};
use aws_sdk_ssm::types::{AutomationExecutionStatus, DocumentFormat, DocumentType, StepExecution};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::aws::{self, Clients, code};
use crate::chroma::Profile;
use crate::config::{Config, StorageMode};
use crate::error::{Error, Result};
use crate::render::compose::{self, PullPolicy};
use crate::render::{self, COMPOSE_PATH, ENV_FILE, Inputs, Mode, SCRIPT_DIR, UNIT_PATH};
use crate::ui::progress::Progress;
use images::{Arch, TAG_BAKE_TOKEN, TAG_CHROMA_DIGEST, TAG_DIGEST, TAG_PROJECT};

/// Bumped when what a recipe means changes (so old images stop matching).
pub const RECIPE_FORMAT: u32 = 1;

/// The automation document as shipped; `document()` fills in the bake script.
pub const DOCUMENT_TEMPLATE: &str = include_str!("../../images/bake.yaml");
pub const DOCUMENT_TEMPLATE_NAME: &str = "images/bake.yaml";
/// The step whose commands carry the bake script, and the placeholder it ships with.
pub const SCRIPT_STEP: &str = "runBakeScript";
pub const SCRIPT_PLACEHOLDER: &str = "IMGBUILD_BAKE_SCRIPT";
/// The step whose Output is the RepoDigest of the Chroma image the instance pulled.
pub const DIGEST_STEP: &str = "readChromaDigest";

#[derive(Template)]
#[template(path = "bake.sh", escape = "none")]
struct BakeScript<'a> {
    chroma_version: &'a str,
    image: &'a str,
    compose_version: &'a str,
    storage_package: &'a str,
    script_dir: &'a str,
    compose_path: &'a str,
    unit_path: &'a str,
    env_file: &'a str,
    install_script: &'a str,
    compose_yaml: &'a str,
    unit: &'a str,
}

/// Everything that decides what the image holds. Its digest names the image.
#[derive(Debug, Clone, Serialize)]
pub struct Recipe {
    pub format: u32,
    pub base_ami: String,
    pub arch: Arch,
    pub image: String,
    pub compose_version: String,
    pub compose_sha256: BTreeMap<String, String>,
    pub bake_script: String,
    pub compose_yaml: String,
    /// The automation document exactly as registered.
    pub document: String,
    /// `bake.kms_key_id` as the build volume (and so the image's snapshots) is encrypted under.
    /// Left out when unset, so images baked without a key keep their digest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kms_key_id: Option<String>,
}

impl Recipe {
    pub fn digest(&self) -> String {
        // Field order is the struct's, so the JSON (and the digest) is stable.
        let canonical = serde_json::to_vec(self).expect("recipes serialise");
        format!("sha256:{}", render::hex(&Sha256::digest(&canonical)))
    }
}

/// The bake script for this config, and the compose file it writes (the same one baked-mode
/// user-data writes at boot).
pub fn bake_script(config: &Config, profile: &'static Profile) -> Result<(String, String)> {
    let inputs = Inputs::new(config, None, Mode::Baked, render::Format::CloudConfig, false)?;
    let rendered = render::render(&inputs)?;
    let install = render::install_script(&inputs)?;
    let compose_yaml = compose::build(config, profile, None, Some(PullPolicy::Never)).to_yaml();
    let script = BakeScript {
        chroma_version: &config.chroma.version,
        image: &compose::image_reference(config),
        compose_version: &config.compose.version,
        storage_package: storage_package(config),
        script_dir: SCRIPT_DIR,
        compose_path: COMPOSE_PATH,
        unit_path: UNIT_PATH,
        env_file: ENV_FILE,
        install_script: &install,
        compose_yaml: &compose_yaml,
        unit: &rendered.unit,
    }
    .render()
    .map_err(|source| Error::Template { template: "bake.sh", source })?;
    for part in [&install, &compose_yaml, &rendered.unit] {
        if part.lines().any(|l| l == "IMGBUILD_EOF") {
            return Err(Error::Invalid("a rendered file contains the bake script's heredoc delimiter IMGBUILD_EOF".into()));
        }
    }
    Ok((ensure_newline(script), compose_yaml))
}

/// The package the storage mode needs on the image (the runbook's verify checks it by name).
pub fn storage_package(config: &Config) -> &'static str {
    match config.storage.mode {
        StorageMode::EfsTls => "amazon-efs-utils",
        StorageMode::DockerNfs => "nfs-utils",
    }
}

fn ensure_newline(mut s: String) -> String {
    if !s.ends_with('\n') {
        s.push('\n');
    }
    s
}

/// The document as registered: the shipped one with the bake script in its run-command step.
/// The script travels base64-encoded so it reaches the instance byte for byte, and runs under
/// bash whatever shell AWS-RunShellScript uses; one command line, so a failed decode never runs
/// half a script (the commands run without `set -e`).
pub fn document(script: &str) -> Result<String> {
    use base64::Engine;
    let mut doc: serde_yaml::Value =
        serde_yaml::from_str(DOCUMENT_TEMPLATE).map_err(|e| Error::Invalid(format!("{DOCUMENT_TEMPLATE_NAME}: not valid YAML: {e}")))?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(script);
    let commands = vec![serde_yaml::Value::String(format!("echo '{b64}' | base64 -d > /root/imgbuild-bake.sh && bash /root/imgbuild-bake.sh"))];
    let steps = doc.get_mut("mainSteps").and_then(|s| s.as_sequence_mut()).ok_or_else(|| Error::Invalid(format!("{DOCUMENT_TEMPLATE_NAME}: no mainSteps")))?;
    let step = steps
        .iter_mut()
        .find(|s| s.get("name").and_then(|n| n.as_str()) == Some(SCRIPT_STEP))
        .ok_or_else(|| Error::Invalid(format!("{DOCUMENT_TEMPLATE_NAME}: no step named {SCRIPT_STEP}")))?;
    let slot = step
        .get_mut("inputs")
        .and_then(|i| i.get_mut("Parameters"))
        .and_then(|p| p.get_mut("commands"))
        .ok_or_else(|| Error::Invalid(format!("{DOCUMENT_TEMPLATE_NAME}: step {SCRIPT_STEP} has no inputs.Parameters.commands")))?;
    let placeholder = slot.as_sequence().is_some_and(|c| c.len() == 1 && c[0].as_str() == Some(SCRIPT_PLACEHOLDER));
    if !placeholder {
        return Err(Error::Invalid(format!("{DOCUMENT_TEMPLATE_NAME}: step {SCRIPT_STEP}'s commands must be [{SCRIPT_PLACEHOLDER}]")));
    }
    *slot = serde_yaml::Value::Sequence(commands);
    Ok(serde_yaml::to_string(&doc).expect("YAML values serialise"))
}

/// The document with the build instance's root volume encrypted under `kms_key`, so the image
/// made from it is too: RunInstances takes `KmsKeyId` in a block device mapping ("Identifier
/// (key ID, key alias, key ARN, or alias ARN) of the customer managed KMS key to use for EBS
/// encryption. This parameter is only supported on BlockDeviceMapping objects called by
/// CreateFleet, RequestSpotInstances, and RunInstances", EbsBlockDevice, EC2 API Reference), and
/// a snapshot of an encrypted volume is encrypted under the volume's key, so CreateImage needs
/// nothing more. A copy under the key afterwards would cost a second image and its snapshots.
pub fn encrypt_build_volume(document: &str, kms_key: &str) -> Result<String> {
    let mut doc: serde_yaml::Value = serde_yaml::from_str(document).map_err(|e| Error::Invalid(format!("{DOCUMENT_TEMPLATE_NAME}: not valid YAML: {e}")))?;
    let where_ = format!("{DOCUMENT_TEMPLATE_NAME}: step {LAUNCH_STEP}'s inputs.BlockDeviceMappings[0].Ebs");
    let ebs = doc
        .get_mut("mainSteps")
        .and_then(|s| s.as_sequence_mut())
        .and_then(|steps| steps.iter_mut().find(|s| s.get("name").and_then(|n| n.as_str()) == Some(LAUNCH_STEP)))
        .and_then(|step| step.get_mut("inputs"))
        .and_then(|i| i.get_mut("BlockDeviceMappings"))
        .and_then(|m| m.as_sequence_mut())
        .and_then(|m| m.first_mut())
        .and_then(|m| m.get_mut("Ebs"))
        .and_then(|e| e.as_mapping_mut())
        .ok_or_else(|| Error::Invalid(format!("{where_} is missing")))?;
    // "If KmsKeyId is specified, the encrypted state must be true" (EC2 API Reference).
    if ebs.get("Encrypted").and_then(|e| e.as_bool()) != Some(true) {
        return Err(Error::Invalid(format!("{where_}.Encrypted must be true for the volume to be encrypted under bake.kms_key_id")));
    }
    ebs.insert("KmsKeyId".into(), kms_key.into());
    Ok(serde_yaml::to_string(&doc).expect("YAML values serialise"))
}

/// The image's name: project, digest prefix and a time stamp, checked against EC2's rules for
/// AMI names (CreateImage `Name`: 3-128 characters of letters, digits, spaces and `()[]./'@_-`)
/// before anything is made: the runbook's allowedPattern would refuse it only after the
/// prerequisites stack and the document exist.
pub fn image_name(config: &Config, digest: &str, stamp: &str) -> Result<String> {
    let short = digest.strip_prefix("sha256:").unwrap_or(digest);
    let name = format!("imgbuild-{}-{}-{stamp}", config.name, &short[..short.len().min(12)]);
    let allowed = |c: char| c.is_ascii_alphanumeric() || " ()[]./'@_-".contains(c);
    if name.len() > 128 {
        let room = 128 - (name.len() - config.name.len());
        return Err(Error::Invalid(format!(
            "name: `{}` makes the image name {} characters long, and EC2 allows 128 for an AMI name; use a name of at most {room} characters",
            config.name,
            name.len()
        )));
    }
    if name.len() < 3 || !name.chars().all(allowed) {
        return Err(Error::Invalid(format!("name: the image name `{name}` is not a valid AMI name (3-128 of letters, digits, spaces and ()[]./'@_-)")));
    }
    Ok(name)
}

/// The CloudWatch Logs group the runbook's Run Command steps write to (the prerequisites stack
/// makes it under this name).
pub fn log_group(config: &Config) -> String {
    format!("/imgbuild/{}/bake", config.name)
}

pub fn document_name(config: &Config) -> String {
    format!("imgbuild-{}-bake", config.name)
}

/// The manifest bake writes: what was baked where, and the base image it recorded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub name: String,
    pub region: String,
    pub ami: String,
    pub digest: String,
    pub base_ami: String,
    pub arch: Arch,
    pub chroma_version: String,
    pub image: String,
    /// The digest of the Chroma image baked in, as pulled (also the image's
    /// imgbuild:chroma-digest tag); none for images baked before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chroma_digest: Option<String>,
    /// Seconds since the Unix epoch.
    pub time: u64,
    pub cached: bool,
    /// Copies in other regions.
    #[serde(default)]
    pub copies: BTreeMap<String, String>,
}

pub fn read_manifest(path: &str) -> Result<Option<Manifest>> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            serde_json::from_str(&text).map(Some).map_err(|e| Error::Invalid(format!("{path}: not an imgbuild bake manifest ({e}); move it away or fix it")))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("reading", path, e)),
    }
}

/// Which base image: the pinned one, else the one the manifest recorded for this region and
/// architecture (unless `update_base`), else AWS's public parameter now.
pub async fn resolve_base(clients: &Clients, config: &Config, region: &str, manifest: Option<&Manifest>, update_base: bool) -> Result<(String, &'static str)> {
    if let Some(ami) = &config.bake.base_ami {
        return Ok((ami.clone(), "pinned in bake.base_ami"));
    }
    let arch = images::arch_of(config.bake_instance_type());
    if let Some(m) = manifest.filter(|m| !update_base && m.region == region && m.arch == arch && m.name == config.name) {
        return Ok((m.base_ami.clone(), "recorded in the manifest (--update-base moves it on)"));
    }
    let parameter = images::base_parameter(arch);
    let id = images::get_parameter(clients, parameter)
        .await?
        .ok_or_else(|| Error::Invalid(format!("the public parameter {parameter} does not exist in {region}; pin bake.base_ami")))?;
    Ok((id, "read from AWS's public AL2023 parameter"))
}

/// An available image of this project that carries this digest. Two bakes racing on one digest
/// can leave two images: the oldest wins, every time. The cache is per project: another
/// project's image is not this project's to prune or protect.
pub async fn find_cached(clients: &Clients, project: &str, digest: &str) -> Result<Option<Image>> {
    Ok(images_with_digest(clients, project, digest).await?.into_iter().next())
}

/// Every available image of this project with this digest, oldest first.
pub async fn images_with_digest(clients: &Clients, project: &str, digest: &str) -> Result<Vec<Image>> {
    let out = clients
        .ec2
        .describe_images()
        .owners("self")
        .filters(Filter::builder().name(format!("tag:{TAG_DIGEST}")).values(digest).build())
        .filters(Filter::builder().name(format!("tag:{TAG_PROJECT}")).values(project).build())
        .filters(Filter::builder().name("state").values("available").build())
        .send()
        .await
        .map_err(|e| aws::err("DescribeImages", format!("images tagged {TAG_DIGEST}={digest}"), e))?;
    let mut found = out.images().to_vec();
    found.sort_by(|a, b| a.creation_date().cmp(&b.creation_date()).then(a.image_id().cmp(&b.image_id())));
    Ok(found)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DocumentChange {
    Created,
    Updated,
    /// An earlier version had this content; it is the default again.
    Restored,
    Unchanged,
}

async fn set_default(clients: &Clients, name: &str, version: &str) -> Result<()> {
    clients
        .ssm
        .update_document_default_version()
        .name(name)
        .document_version(version)
        .send()
        .await
        .map_err(|e| aws::err("UpdateDocumentDefaultVersion", format!("document {name}"), e))?;
    Ok(())
}

/// The version of `name` whose content is `content`.
async fn version_with(clients: &Clients, name: &str, content: &str) -> Result<String> {
    let mut token = None;
    loop {
        let page = clients
            .ssm
            .list_document_versions()
            .name(name)
            .set_next_token(token)
            .send()
            .await
            .map_err(|e| aws::err("ListDocumentVersions", format!("document {name}"), e))?;
        for v in page.document_versions() {
            let Some(version) = v.document_version() else { continue };
            let doc = clients
                .ssm
                .get_document()
                .name(name)
                .document_version(version)
                .send()
                .await
                .map_err(|e| aws::err("GetDocument", format!("document {name} version {version}"), e))?;
            if doc.content().is_some_and(|c| same_document(c, content)) {
                return Ok(version.to_string());
            }
        }
        token = page.next_token().map(String::from);
        if token.is_none() {
            return Err(Error::Tool(format!("SSM says document {name} already has this content, but no version of it does")));
        }
    }
}

/// Keeps the document registered under its name, with a new version only when its content
/// changed. Returns what happened and the version that is now the default.
pub async fn ensure_document(clients: &Clients, name: &str, content: &str, project: &str) -> Result<(DocumentChange, String)> {
    match clients.ssm.get_document().name(name).send().await {
        Ok(current) => {
            if current.content().is_some_and(|c| same_document(c, content)) {
                return Ok((DocumentChange::Unchanged, current.document_version().unwrap_or("1").to_string()));
            }
            let out = match clients
                .ssm
                .update_document()
                .name(name)
                .content(content)
                .document_format(DocumentFormat::Yaml)
                .document_version("$LATEST")
                .send()
                .await
            {
                Ok(o) => o,
                // SSM compares documents by meaning, not bytes: a difference only in layout or
                // comments is the same document.
                Err(e) if e.as_service_error().and_then(code) == Some("DuplicateDocumentContent") => {
                    // An earlier version already holds this content (a config changed back, or a
                    // bake stopped between update and default): that version becomes the default.
                    let version = version_with(clients, name, content).await?;
                    set_default(clients, name, &version).await?;
                    return Ok((DocumentChange::Restored, version));
                }
                Err(e) => return Err(aws::err("UpdateDocument", format!("document {name}"), e)),
            };
            let version = out.document_description().and_then(|d| d.document_version()).unwrap_or("$LATEST").to_string();
            set_default(clients, name, &version).await?;
            Ok((DocumentChange::Updated, version))
        }
        Err(e) if e.as_service_error().and_then(code) == Some("InvalidDocument") => {
            let out = clients
                .ssm
                .create_document()
                .name(name)
                .content(content)
                .document_format(DocumentFormat::Yaml)
                .document_type(DocumentType::Automation)
                .tags(aws_sdk_ssm::types::Tag::builder().key(TAG_PROJECT).value(project).build().expect("key and value set"))
                .send()
                .await
                .map_err(|e| aws::err("CreateDocument", format!("document {name}"), e))?;
            Ok((DocumentChange::Created, out.document_description().and_then(|d| d.document_version()).unwrap_or("1").to_string()))
        }
        Err(e) => Err(aws::err("GetDocument", format!("document {name}"), e)),
    }
}

/// SSM hands documents back as JSON by default and judges them by meaning: compare parsed
/// values (YAML reads JSON too), not bytes.
fn same_document(a: &str, b: &str) -> bool {
    match (serde_yaml::from_str::<serde_yaml::Value>(a), serde_yaml::from_str::<serde_yaml::Value>(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// Where the build instance runs.
#[derive(Debug, Clone, Serialize)]
pub struct Prereqs {
    pub subnet_id: String,
    pub security_group_id: String,
    pub instance_profile: String,
    pub automation_role_arn: String,
}

/// Waits (bounded) until EC2 accepts the build instance's instance profile. A just-created
/// profile takes a while to reach EC2 ("Invalid IAM Instance Profile name"), and the runbook's
/// launch retries come at once, so they cannot ride that out. A RunInstances dry run with the
/// launch's own profile, subnet and image answers DryRunOperation once it would launch. Any
/// other answer (the caller may not run instances, say) is left for the runbook to report.
pub async fn wait_for_instance_profile(
    clients: &Clients,
    pre: &Prereqs,
    base: &str,
    instance_type: &str,
    waits: crate::stack::Waits,
    progress: &Progress,
) -> Result<()> {
    let deadline = Instant::now() + waits.timeout;
    loop {
        let err = match clients
            .ec2
            .run_instances()
            .dry_run(true)
            .image_id(base)
            .instance_type(aws_sdk_ec2::types::InstanceType::from(instance_type))
            .min_count(1)
            .max_count(1)
            .subnet_id(&pre.subnet_id)
            .security_group_ids(&pre.security_group_id)
            .iam_instance_profile(aws_sdk_ec2::types::IamInstanceProfileSpecification::builder().name(&pre.instance_profile).build())
            .send()
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        match err.as_service_error().and_then(code) {
            Some("DryRunOperation") => return Ok(()),
            Some("InvalidParameterValue") if Instant::now() < deadline => {
                progress.set(&format!("waiting for EC2 to see instance profile {}", pre.instance_profile));
                tokio::time::sleep(waits.poll).await;
            }
            Some("InvalidParameterValue") => {
                return Err(Error::Timeout {
                    what: format!("EC2 to accept instance profile {} for the build instance", pre.instance_profile),
                    secs: waits.timeout.as_secs(),
                    hint: aws::err("RunInstances (dry run)", pre.instance_profile.clone(), err).to_string(),
                });
            }
            _ => return Ok(()),
        }
    }
}

/// An availability zone of the region where `instance_type` is offered (the first by name, so
/// the prerequisites stack stays put from one bake to the next). Not every type is offered in
/// every zone, and a launch in one that lacks it fails with Unsupported.
pub async fn zone_offering(clients: &Clients, instance_type: &str) -> Result<String> {
    use aws_sdk_ec2::types::LocationType;
    let mut zones = Vec::new();
    let mut token = None;
    loop {
        let out = clients
            .ec2
            .describe_instance_type_offerings()
            .location_type(LocationType::AvailabilityZone)
            .filters(Filter::builder().name("instance-type").values(instance_type).build())
            .set_next_token(token)
            .send()
            .await
            .map_err(|e| aws::err("DescribeInstanceTypeOfferings", format!("instance type {instance_type}"), e))?;
        zones.extend(out.instance_type_offerings().iter().filter_map(|o| o.location().map(String::from)));
        token = out.next_token().map(String::from);
        if token.is_none() {
            break;
        }
    }
    zones.sort();
    zones.into_iter().next().ok_or_else(|| Error::Invalid(format!("bake.instance_type: {instance_type} is offered in no availability zone of this region")))
}

/// What this bake has made so far, recorded the moment each exists.
#[derive(Debug, Default, Clone)]
pub struct Made {
    /// A start request went out: even without an id, an execution may exist.
    pub start_sent: bool,
    pub execution: Option<String>,
    /// The document the execution runs, to find an execution whose id never arrived.
    pub document: Option<String>,
    pub image: Option<String>,
    pub finished: bool,
    /// `--keep-on-failure` after a failed step: the runbook stopped the build instance for
    /// debugging; the cleanup leaves it and says how to remove it.
    pub keep_instance: bool,
    /// What the digest step printed (its Output), once it succeeded.
    pub pulled: Option<String>,
    /// The first step that failed or timed out, once the execution is over: which step, not
    /// its message, decides whether another build instance type is worth a try.
    pub failed_step: Option<String>,
}

/// The step that launches the build instance: an execution that failed there made nothing
/// else, so another instance type can be tried with a new execution.
pub const LAUNCH_STEP: &str = "launchInstance";

pub type Record = Arc<Mutex<Made>>;

/// One step's state, for progress and failure reports.
#[derive(Debug, Clone, Serialize)]
pub struct StepState {
    pub name: String,
    pub status: String,
    pub seconds: Option<i64>,
    pub failure: Option<String>,
}

fn step_state(s: &StepExecution) -> StepState {
    let seconds = match (s.execution_start_time(), s.execution_end_time()) {
        (Some(a), Some(b)) => Some(b.secs() - a.secs()),
        _ => None,
    };
    StepState {
        name: s.step_name().unwrap_or_default().to_string(),
        status: s.step_status().map(|x| x.as_str().to_string()).unwrap_or_default(),
        seconds,
        failure: s.failure_message().map(String::from),
    }
}

/// A running execution of `document` baking the same digest, if any: joining it beats starting
/// a second build of the same image.
pub async fn running_with_digest(clients: &Clients, document: &str, digest: &str) -> Result<Option<String>> {
    running_with(clients, document, "Digest", digest).await
}

/// A running execution of `document` whose parameter `key` is `value`.
pub async fn running_with(clients: &Clients, document: &str, key: &str, value: &str) -> Result<Option<String>> {
    use aws_sdk_ssm::types::{AutomationExecutionFilter, AutomationExecutionFilterKey};
    let filter = |k: AutomationExecutionFilterKey, v: &[&str]| {
        AutomationExecutionFilter::builder().key(k).set_values(Some(v.iter().map(|s| s.to_string()).collect())).build().expect("key and values set")
    };
    let out = clients
        .ssm
        .describe_automation_executions()
        .filters(filter(AutomationExecutionFilterKey::DocumentNamePrefix, &[document]))
        .filters(filter(AutomationExecutionFilterKey::ExecutionStatus, &["Pending", "InProgress", "Waiting"]))
        .send()
        .await
        .map_err(|e| aws::err("DescribeAutomationExecutions", format!("executions of {document}"), e))?;
    for meta in out.automation_execution_metadata_list() {
        if meta.document_name() != Some(document) {
            continue;
        }
        let Some(id) = meta.automation_execution_id() else { continue };
        let exec = clients
            .ssm
            .get_automation_execution()
            .automation_execution_id(id)
            .send()
            .await
            .map_err(|e| aws::err("GetAutomationExecution", format!("execution {id}"), e))?;
        let same = exec.automation_execution().and_then(|e| e.parameters()).and_then(|p| p.get(key)).is_some_and(|v| v.iter().any(|d| d == value));
        if same {
            return Ok(Some(id.to_string()));
        }
    }
    Ok(None)
}

/// After a bake: if another image with the digest is older (a race between two bakes), that
/// one stays and ours goes, so one digest keeps one image. Returns the image to hand over.
pub async fn settle_duplicates(clients: &Clients, project: &str, digest: &str, ours: &str, progress: &Progress) -> Result<String> {
    match find_cached(clients, project, digest).await? {
        Some(oldest) if oldest.image_id().is_some_and(|id| id != ours) => {
            let keep = oldest.image_id().unwrap_or_default().to_string();
            let snaps = deregister(clients, ours).await?;
            progress.line(&format!("another bake made {keep} with the same digest first: deregistered ours, {ours} (snapshots {})", snaps.join(", ")));
            Ok(keep)
        }
        _ => Ok(ours.to_string()),
    }
}

/// After `--force`: the new image is the digest's image from now on. Earlier images with the
/// digest lose the digest tag (and say which image superseded them); nothing is deleted, so an
/// image in use stays usable. Returns the superseded image ids.
pub async fn supersede(clients: &Clients, project: &str, digest: &str, keep: &str) -> Result<Vec<String>> {
    let mut superseded = Vec::new();
    for old in images_with_digest(clients, project, digest).await? {
        let Some(id) = old.image_id().filter(|id| *id != keep).map(String::from) else { continue };
        clients
            .ec2
            .delete_tags()
            .resources(&id)
            .tags(aws_sdk_ec2::types::Tag::builder().key(TAG_DIGEST).build())
            .send()
            .await
            .map_err(|e| aws::err("DeleteTags", format!("image {id}"), e))?;
        clients
            .ec2
            .create_tags()
            .resources(&id)
            .tags(aws_sdk_ec2::types::Tag::builder().key("imgbuild:superseded-by").value(keep).build())
            .send()
            .await
            .map_err(|e| aws::err("CreateTags", format!("image {id}"), e))?;
        superseded.push(id);
    }
    Ok(superseded)
}

/// Starts the execution; the id is recorded before anything else can fail.
pub async fn start(clients: &Clients, document: &str, version: &str, parameters: BTreeMap<String, String>, token: &str, record: &Record) -> Result<String> {
    let params = parameters.into_iter().map(|(k, v)| (k, vec![v])).collect();
    {
        let mut made = record.lock().expect("bake record");
        made.start_sent = true;
        made.document = Some(document.to_string());
    }
    let out = clients
        .ssm
        .start_automation_execution()
        .document_name(document)
        // The version just checked and registered, not whatever is the default by now.
        .document_version(version)
        .set_parameters(Some(params))
        .client_token(token)
        .send()
        .await
        .map_err(|e| aws::err("StartAutomationExecution", format!("document {document}"), e))?;
    let id = out.automation_execution_id().ok_or_else(|| Error::Tool("StartAutomationExecution returned no execution id".into()))?.to_string();
    record.lock().expect("bake record").execution = Some(id.clone());
    Ok(id)
}

/// What GetAutomationExecution reports for an output of a step that has not succeeded (aws-cli
/// `examples/ssm/get-automation-execution.rst`): a sentence, not an id.
pub const NO_OUTPUT_YET: &str = "No output available yet because the step is not successfully executed";

/// The image the execution made, if it made one: only a `createImage` step that succeeded has
/// an image id, and whatever the outputs say must read as an AMI id before anything is done
/// with it (until then the output is the placeholder sentence, which cleanup once sent to
/// DescribeImages and DeregisterImage).
pub fn image_made(exec: &aws_sdk_ssm::types::AutomationExecution) -> Option<String> {
    let from_step = exec.step_executions().iter().filter(|s| s.step_name() == Some("createImage")).find_map(|s| s.outputs().and_then(|o| o.get("ImageId")));
    let from_outputs = exec.outputs().and_then(|o| o.get("createImage.ImageId"));
    from_step.into_iter().chain(from_outputs).flatten().find(|id| crate::config::check_ami_id(id).is_ok()).cloned()
}

/// What the digest step printed, once it succeeded (before, its Output is the placeholder
/// sentence). The runCommand action's `Output` output holds the command's output
/// ("aws:runCommand - Run a command on a managed instance", Output).
pub fn digest_output(exec: &aws_sdk_ssm::types::AutomationExecution) -> Option<String> {
    exec.step_executions()
        .iter()
        .filter(|s| s.step_name() == Some(DIGEST_STEP) && s.step_status() == Some(&AutomationExecutionStatus::Success))
        .find_map(|s| s.outputs().and_then(|o| o.get("Output")).and_then(|v| v.first()).cloned())
}

/// The digest (`sha256:...`) in what the digest step printed: exactly one line
/// `<chroma.image>@sha256:<64 hex>`, the repository being the configured one, and the digest the
/// pinned one when `chroma.digest` is set. Anything else means the image holds something other
/// than what the config asked for, and must not be handed over.
pub fn check_pulled(config: &Config, printed: Option<&str>, execution: &str) -> Result<String> {
    let fail = |why: String| Error::BakeFailed { execution: execution.to_string(), status: "Success".into(), detail: why };
    let printed = printed.ok_or_else(|| fail(format!("step {DIGEST_STEP} gave no Output: which Chroma image was pulled is unknown")))?;
    let line = printed.trim();
    let digest =
        line.strip_prefix(config.chroma.image.as_str()).and_then(|rest| rest.strip_prefix('@')).filter(|d| crate::config::is_sha256_digest(d)).ok_or_else(
            || fail(format!("step {DIGEST_STEP} printed `{line}`, not {}@sha256:<64 hex digits> (the RepoDigest of chroma.image)", config.chroma.image)),
        )?;
    if let Some(want) = &config.chroma.digest
        && want != digest
    {
        return Err(fail(format!("the build instance pulled {} {digest}, but chroma.digest pins {want}", config.chroma.image)));
    }
    Ok(digest.to_string())
}

/// Records the pulled Chroma digest on the image, where `images` and the next cached bake read it.
pub async fn tag_chroma_digest(clients: &Clients, image: &str, digest: &str) -> Result<()> {
    clients
        .ec2
        .create_tags()
        .resources(image)
        .tags(aws_sdk_ec2::types::Tag::builder().key(TAG_CHROMA_DIGEST).value(digest).build())
        .send()
        .await
        .map_err(|e| aws::err("CreateTags", format!("image {image}"), e))?;
    Ok(())
}

/// Where the whole output of a failed Run Command step is: the step's FailureMessage holds only a
/// part of it, and Run Command itself keeps the first 48,000 characters.
fn command_log(exec: &aws_sdk_ssm::types::AutomationExecution) -> Option<String> {
    let failed = exec.step_executions().iter().find(|s| {
        s.action() == Some("aws:runCommand")
            && s.step_status() != Some(&AutomationExecutionStatus::Success)
            && s.step_status().is_some_and(|st| st.as_str() != "InProgress" && st.as_str() != "Pending")
    })?;
    let group = exec.parameters().and_then(|p| p.get("LogGroupName")).and_then(|v| v.first())?;
    let instance = exec
        .step_executions()
        .iter()
        .find(|s| s.step_name() == Some("launchInstance"))
        .and_then(|s| s.outputs())
        .and_then(|o| o.get("InstanceId"))
        .and_then(|v| v.first())
        .map(String::as_str)
        .unwrap_or("<instance-id>");
    let command = failed.outputs().and_then(|o| o.get("CommandId")).and_then(|v| v.first()).map(String::as_str).unwrap_or("<command-id>");
    Some(format!(
        "The whole output of step {} is in CloudWatch Logs group {group}, streams {command}/{instance}/aws-runShellScript/stdout and stderr",
        failed.step_name().unwrap_or_default()
    ))
}

/// Slack over the runbook's own success budget: the wait before the first step runs, and polling.
pub const TIMEOUT_SLACK_SECS: u64 = 600;

/// How long bake follows an execution unless told otherwise: the document's own success budget
/// (every step's timeoutSeconds times its attempts) and some slack. A shorter bound would cancel
/// a bake the runbook still allows to succeed.
pub fn default_timeout(document: &str) -> Result<Duration> {
    let budget = crate::check::automation::success_budget(document).map_err(|m| Error::Invalid(format!("{DOCUMENT_TEMPLATE_NAME}: {m}")))?;
    Ok(Duration::from_secs(budget + TIMEOUT_SLACK_SECS))
}

/// Follows the execution step by step until it ends, within `timeout`. Returns the image id.
pub async fn follow(clients: &Clients, id: &str, timeout: Duration, poll: Duration, progress: &Progress, record: &Record) -> Result<String> {
    let deadline = Instant::now() + timeout;
    let mut shown: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let out = clients
            .ssm
            .get_automation_execution()
            .automation_execution_id(id)
            .send()
            .await
            .map_err(|e| aws::err("GetAutomationExecution", format!("execution {id}"), e))?;
        let exec = out.automation_execution().ok_or_else(|| Error::Tool(format!("execution {id} has no details")))?;
        let steps: Vec<StepState> = exec.step_executions().iter().map(step_state).collect();
        for s in &steps {
            if shown.get(&s.name) != Some(&s.status) {
                let took = s.seconds.map(|x| format!(" ({x}s)")).unwrap_or_default();
                progress.line(&format!("step {:<18} {}{took}", s.name, s.status));
                shown.insert(s.name.clone(), s.status.clone());
            }
        }
        if let Some(image) = image_made(exec) {
            record.lock().expect("bake record").image = Some(image);
        }
        if let Some(out) = digest_output(exec) {
            record.lock().expect("bake record").pulled = Some(out);
        }
        let status = exec.automation_execution_status().cloned();
        match status {
            Some(AutomationExecutionStatus::Success | AutomationExecutionStatus::CompletedWithSuccess) => {
                let image = record.lock().expect("bake record").image.clone();
                return image.ok_or_else(|| Error::Tool(format!("execution {id} succeeded without a createImage.ImageId output")));
            }
            // Every other final status (Exited and Rejected too) ends the bake: following an
            // execution that changes no more would only spin until the timeout.
            Some(s) if is_final(&s) => {
                record.lock().expect("bake record").failed_step =
                    steps.iter().find(|st| matches!(st.status.as_str(), "Failed" | "TimedOut")).map(|st| st.name.clone());
                let failed: Vec<String> = steps
                    .iter()
                    .filter(|st| matches!(st.status.as_str(), "Failed" | "TimedOut" | "Cancelled"))
                    .map(|st| format!("step {} {}: {}", st.name, st.status, st.failure.as_deref().unwrap_or("no message")))
                    .collect();
                let reason = exec.failure_message().unwrap_or_default();
                let mut detail = if failed.is_empty() { reason.to_string() } else { failed.join("; ") };
                if let Some(log) = command_log(exec) {
                    detail.push_str(if detail.ends_with('.') { " " } else { ". " });
                    detail.push_str(&log);
                }
                return Err(Error::BakeFailed { execution: id.to_string(), status: s.as_str().to_string(), detail });
            }
            other => {
                let current = steps.iter().rev().find(|s| s.status == "InProgress").map(|s| s.name.as_str()).unwrap_or("starting");
                progress.set(&format!("bake {id}: {} at {current}", other.map(|s| s.as_str().to_string()).unwrap_or_default()));
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!("automation execution {id}"),
                secs: timeout.as_secs(),
                hint: "bake stops the executions it started and says so; raise bake.timeout_secs for slow bakes".into(),
            });
        }
        tokio::time::sleep(poll).await;
    }
}

/// Statuses after which an execution changes nothing more (AutomationExecution,
/// AutomationExecutionStatus in the SSM API reference).
fn is_final(status: &AutomationExecutionStatus) -> bool {
    use AutomationExecutionStatus as S;
    matches!(status, S::Success | S::Failed | S::Timedout | S::Cancelled | S::CompletedWithSuccess | S::CompletedWithFailure | S::Exited | S::Rejected)
}

/// Waits (bounded) until a stopped execution is over, then reads the image it made. Until then
/// a cancelled createImage may still register an image, and the outputs are not final.
async fn settle(clients: &Clients, id: &str, waits: crate::stack::Waits, progress: &Progress) -> Result<Option<String>> {
    let deadline = Instant::now() + waits.timeout;
    loop {
        let out = clients
            .ssm
            .get_automation_execution()
            .automation_execution_id(id)
            .send()
            .await
            .map_err(|e| aws::err("GetAutomationExecution", format!("execution {id}"), e))?;
        let exec = out.automation_execution().ok_or_else(|| Error::Tool(format!("execution {id} has no details")))?;
        let status = exec.automation_execution_status().cloned();
        if status.as_ref().is_some_and(is_final) {
            return Ok(image_made(exec));
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!("automation execution {id} to stop"),
                secs: waits.timeout.as_secs(),
                hint: "its cancel path runs at most two minutes; look at it in the Systems Manager console".into(),
            });
        }
        progress.set(&format!("waiting for execution {id} to stop ({})", status.map(|s| s.as_str().to_string()).unwrap_or_default()));
        tokio::time::sleep(waits.poll).await;
    }
}

/// After a failure, timeout or Ctrl-C: stop the execution (its cancel path terminates the build
/// instance) and wait until it is over, make sure the instance is gone, and remove every image
/// and snapshot this bake made: the one the execution names, and any carrying the bake's token
/// (an image registered while nobody was looking still would become available and keep its
/// digest tag, and the next bake would reuse an image the user saw fail). Says what it did.
pub async fn clean_up(clients: &Clients, record: &Record, token: &str, waits: crate::stack::Waits, progress: &Progress) -> Vec<String> {
    let made = std::mem::take(&mut *record.lock().expect("bake record"));
    let mut done = Vec::new();
    if made.finished {
        return done;
    }
    let mut execution = made.execution.clone();
    if execution.is_none() && made.start_sent {
        // Interrupted while the start was in flight: find it by this bake's token.
        if let Some(document) = &made.document {
            execution = running_with(clients, document, "BakeToken", token).await.ok().flatten();
        }
    }
    if let Some(id) = &execution {
        match clients.ssm.stop_automation_execution().automation_execution_id(id).r#type(aws_sdk_ssm::types::StopType::Cancel).send().await {
            Ok(_) => done.push(format!("stopped automation execution {id}")),
            // Already over: nothing to stop.
            Err(e) if e.as_service_error().and_then(code) == Some("InvalidAutomationStatusUpdateException") => {}
            Err(e) => done.push(format!("could not stop execution {id}: {}", aws::err("StopAutomationExecution", id.clone(), e))),
        }
    }
    let mut images: Vec<String> = made.image.iter().cloned().collect();
    if let Some(id) = &execution {
        match settle(clients, id, waits, progress).await {
            Ok(found) => images.extend(found),
            Err(e) => done.push(format!("could not see execution {id} end: {e}")),
        }
    }
    if made.keep_instance {
        match kept_instances(clients, token).await {
            Ok(ids) if !ids.is_empty() => done.push(format!(
                "kept build instance {} (stopped) for debugging; when done, remove it with: aws ec2 terminate-instances --instance-ids {}",
                ids.join(", "),
                ids.join(" ")
            )),
            Ok(_) => {}
            Err(e) => done.push(format!("could not look for the kept build instance: {e}")),
        }
    } else {
        match terminate_build_instances(clients, token, waits, progress).await {
            Ok(lines) => done.extend(lines),
            Err(e) => done.push(format!("could not confirm the build instance is gone: {e}")),
        }
    }
    match images_with_token(clients, token).await {
        Ok(found) => images.extend(found),
        Err(e) => done.push(format!("could not look for images tagged {TAG_BAKE_TOKEN}={token}: {e}")),
    }
    images.sort();
    images.dedup();
    let mut deleted = Vec::new();
    for image in &images {
        match deregister(clients, image).await {
            Ok(snaps) => {
                done.push(format!("deregistered the unfinished image {image} and deleted its snapshots {}", snaps.join(", ")));
                deleted.extend(snaps);
            }
            Err(e) => done.push(format!("could not remove the unfinished image {image}: {e}")),
        }
    }
    // A snapshot whose image never registered, or was deregistered without it, still costs.
    match snapshots_with_token(clients, token).await {
        Ok(snaps) => {
            for s in snaps.into_iter().filter(|s| !deleted.contains(s)) {
                match clients.ec2.delete_snapshot().snapshot_id(&s).send().await {
                    Ok(_) => done.push(format!("deleted the unfinished snapshot {s}")),
                    Err(e) => done.push(format!("could not delete the unfinished snapshot {s}: {}", aws::err("DeleteSnapshot", s.clone(), e))),
                }
            }
        }
        Err(e) => done.push(format!("could not look for snapshots tagged {TAG_BAKE_TOKEN}={token}: {e}")),
    }
    done
}

/// This bake's build instances that are not terminated.
async fn kept_instances(clients: &Clients, token: &str) -> Result<Vec<String>> {
    let out = clients
        .ec2
        .describe_instances()
        .filters(Filter::builder().name(format!("tag:{TAG_BAKE_TOKEN}")).values(token).build())
        .send()
        .await
        .map_err(|e| aws::err("DescribeInstances", format!("instances tagged {TAG_BAKE_TOKEN}={token}"), e))?;
    Ok(out
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter(|i| !matches!(i.state().and_then(|s| s.name()).map(|n| n.as_str()), Some("terminated" | "shutting-down")))
        .filter_map(|i| i.instance_id().map(String::from))
        .collect())
}

/// Our images carrying this bake's token, in any state.
async fn images_with_token(clients: &Clients, token: &str) -> Result<Vec<String>> {
    let out = clients
        .ec2
        .describe_images()
        .owners("self")
        .filters(Filter::builder().name(format!("tag:{TAG_BAKE_TOKEN}")).values(token).build())
        .send()
        .await
        .map_err(|e| aws::err("DescribeImages", format!("images tagged {TAG_BAKE_TOKEN}={token}"), e))?;
    Ok(out.images().iter().filter_map(|i| i.image_id().map(String::from)).collect())
}

/// Our snapshots carrying this bake's token.
async fn snapshots_with_token(clients: &Clients, token: &str) -> Result<Vec<String>> {
    let out = clients
        .ec2
        .describe_snapshots()
        .owner_ids("self")
        .filters(Filter::builder().name(format!("tag:{TAG_BAKE_TOKEN}")).values(token).build())
        .send()
        .await
        .map_err(|e| aws::err("DescribeSnapshots", format!("snapshots tagged {TAG_BAKE_TOKEN}={token}"), e))?;
    Ok(out.snapshots().iter().filter_map(|s| s.snapshot_id().map(String::from)).collect())
}

/// Finds the build instances this bake launched (by its token tag) and sees them terminated.
pub async fn terminate_build_instances(clients: &Clients, token: &str, waits: crate::stack::Waits, progress: &Progress) -> Result<Vec<String>> {
    let deadline = Instant::now() + waits.timeout;
    let mut asked = false;
    let mut lines = Vec::new();
    loop {
        let out = clients
            .ec2
            .describe_instances()
            .filters(Filter::builder().name(format!("tag:{TAG_BAKE_TOKEN}")).values(token).build())
            .send()
            .await
            .map_err(|e| aws::err("DescribeInstances", format!("instances tagged {TAG_BAKE_TOKEN}={token}"), e))?;
        let live: Vec<String> = out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter(|i| !matches!(i.state().and_then(|s| s.name()).map(|n| n.as_str()), Some("terminated")))
            .filter_map(|i| i.instance_id().map(String::from))
            .collect();
        let all: Vec<String> = out.reservations().iter().flat_map(|r| r.instances()).filter_map(|i| i.instance_id().map(String::from)).collect();
        if live.is_empty() {
            if !all.is_empty() {
                lines.push(format!("build instance {} is terminated", all.join(", ")));
            }
            return Ok(lines);
        }
        if !asked {
            clients
                .ec2
                .terminate_instances()
                .set_instance_ids(Some(live.clone()))
                .send()
                .await
                .map_err(|e| aws::err("TerminateInstances", live.join(", "), e))?;
            lines.push(format!("terminated build instance {}", live.join(", ")));
            asked = true;
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!("build instance {} to terminate", live.join(", ")),
                secs: waits.timeout.as_secs(),
                hint: "check the EC2 console".into(),
            });
        }
        progress.set(&format!("waiting for build instance {} to terminate", live.join(", ")));
        tokio::time::sleep(waits.poll).await;
    }
}

/// Deregisters an image and deletes its snapshots; returns the snapshot ids.
pub async fn deregister(clients: &Clients, image: &str) -> Result<Vec<String>> {
    let out = clients.ec2.describe_images().image_ids(image).send().await.map_err(|e| aws::err("DescribeImages", format!("image {image}"), e))?;
    let snapshots: Vec<String> =
        out.images().iter().flat_map(|i| i.block_device_mappings()).filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()).map(String::from)).collect();
    clients.ec2.deregister_image().image_id(image).send().await.map_err(|e| aws::err("DeregisterImage", format!("image {image}"), e))?;
    for s in &snapshots {
        clients.ec2.delete_snapshot().snapshot_id(s).send().await.map_err(|e| aws::err("DeleteSnapshot", format!("snapshot {s}"), e))?;
    }
    Ok(snapshots)
}

/// Points `/imgbuild/<name>/ami` at the image, for `imgbuild deploy`.
pub async fn hand_off(clients: &Clients, config: &Config, ami: &str) -> Result<String> {
    let name = images::handoff_parameter(config);
    clients
        .ssm
        .put_parameter()
        .name(&name)
        .value(ami)
        .r#type(aws_sdk_ssm::types::ParameterType::String)
        .overwrite(true)
        .description(format!("The AMI imgbuild bake made for {}; imgbuild deploy boots it", config.name))
        .send()
        .await
        .map_err(|e| aws::err("PutParameter", format!("parameter {name}"), e))?;
    Ok(name)
}
