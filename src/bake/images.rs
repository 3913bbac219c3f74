//! Which AMI an instance boots, and which user-data mode goes with it.

use serde::Serialize;

use crate::aws::{self, Clients, code};
use crate::config::{Config, check_ami_id};
use crate::error::{Error, Result};
use crate::render::Mode;

/// Tag names on baked images.
pub const TAG_DIGEST: &str = "imgbuild:digest";
pub const TAG_CHROMA_VERSION: &str = "imgbuild:chroma-version";
/// The image reference the bake pulled (`repository:version` or `repository@digest`).
pub const TAG_CHROMA_IMAGE: &str = "imgbuild:chroma-image";
pub const TAG_PROJECT: &str = "imgbuild:project";
pub const TAG_BASE_AMI: &str = "imgbuild:base-ami";
/// The digest of the Chroma image the bake actually pulled (`sha256:...`).
pub const TAG_CHROMA_DIGEST: &str = "imgbuild:chroma-digest";
/// On the build instance, so a bake can find (and terminate) what it launched.
pub const TAG_BAKE_TOKEN: &str = "imgbuild:bake-token";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    X86_64,
    Arm64,
}

/// Graviton families carry a `g` among the letters after their generation digit
/// (t4g, m7g, c7gn, x2gd, is4gen); everything else here is x86_64.
pub fn arch_of(instance_type: &str) -> Arch {
    let family = instance_type.split('.').next().unwrap_or_default();
    let after_digit = family.find(|c: char| c.is_ascii_digit()).map(|i| &family[i..]).unwrap_or("");
    let attributes = after_digit.trim_start_matches(|c: char| c.is_ascii_digit());
    if attributes.contains('g') { Arch::Arm64 } else { Arch::X86_64 }
}

/// The public parameter AWS keeps pointed at the latest AL2023 AMI.
pub fn base_parameter(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64",
        Arch::Arm64 => "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64",
    }
}

/// The parameter `bake` writes and `deploy` reads.
pub fn handoff_parameter(config: &Config) -> String {
    format!("/imgbuild/{}/ami", config.name)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// `--ami`.
    Flag,
    /// The image `imgbuild bake` handed over through an SSM parameter.
    Baked { parameter: String },
    /// Stock AL2023 from AWS's public parameter.
    Stock { parameter: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct Choice {
    pub ami: String,
    pub source: Source,
    pub mode: Mode,
}

/// A parameter's value, or None when it does not exist (code ParameterNotFound).
pub async fn get_parameter(clients: &Clients, name: &str) -> Result<Option<String>> {
    match clients.ssm.get_parameter().name(name).send().await {
        Ok(out) => Ok(out.parameter().and_then(|p| p.value()).map(String::from)),
        Err(e) if e.as_service_error().and_then(code) == Some("ParameterNotFound") => Ok(None),
        Err(e) => Err(aws::err("GetParameter", format!("parameter {name}"), e)),
    }
}

/// `--ami`, else the baked image, else stock AL2023 with the full bootstrap. `mode` overrides
/// the mode that goes with the source.
pub async fn choose(clients: &Clients, config: &Config, flag: Option<&str>, mode: Option<Mode>) -> Result<Choice> {
    let choice = if let Some(id) = flag {
        check_ami_id(id).map_err(|m| Error::Invalid(format!("--ami: {m}")))?;
        Choice { ami: id.into(), source: Source::Flag, mode: mode.unwrap_or(Mode::Baked) }
    } else {
        let handoff = handoff_parameter(config);
        match get_parameter(clients, &handoff).await? {
            Some(id) => Choice { ami: id, source: Source::Baked { parameter: handoff }, mode: mode.unwrap_or(Mode::Baked) },
            None => {
                let parameter = base_parameter(arch_of(&config.stack.instance_type)).to_string();
                let id = get_parameter(clients, &parameter)
                    .await?
                    .ok_or_else(|| Error::Invalid(format!("the public parameter {parameter} does not exist in this region; pass --ami")))?;
                Choice { ami: id, source: Source::Stock { parameter }, mode: mode.unwrap_or(Mode::Full) }
            }
        }
    };
    // AWS keeps the stock parameter per architecture; anything else is checked before a
    // change set exists.
    if !matches!(choice.source, Source::Stock { .. }) {
        check_image(clients, config, &choice.ami, choice.mode, mode.is_some()).await?;
    }
    Ok(choice)
}

/// The image must run on the instance type in any mode. A baked boot pulls and installs
/// nothing, so in baked mode the image must be one imgbuild baked (no Docker otherwise: Chroma
/// never starts) with the Chroma version and image reference the config names.
async fn check_image(clients: &Clients, config: &Config, ami: &str, mode: Mode, mode_explicit: bool) -> Result<()> {
    let out = clients.ec2.describe_images().image_ids(ami).send().await.map_err(|e| aws::err("DescribeImages", format!("image {ami}"), e))?;
    let image = out.images().first().ok_or_else(|| Error::Invalid(format!("image {ami} does not exist or is not visible to this account")))?;
    let wanted = arch_of(&config.stack.instance_type);
    let wanted_name = match wanted {
        Arch::X86_64 => "x86_64",
        Arch::Arm64 => "arm64",
    };
    if let Some(arch) = image.architecture().map(|a| a.as_str())
        && arch != wanted_name
    {
        return Err(Error::Invalid(format!(
            "image {ami} is {arch} but stack.instance_type {} is {wanted_name}: pick an image of that architecture (bake one with this config) or change stack.instance_type",
            config.stack.instance_type
        )));
    }
    if mode != Mode::Baked {
        return Ok(());
    }
    let tagged = |key: &str| image.tags().iter().find(|t| t.key() == Some(key)).and_then(|t| t.value());
    let override_hint = if mode_explicit { "deploy with --mode full" } else { "deploy it with --mode full (installs Docker and pulls Chroma at boot)" };
    let Some(version) = tagged(TAG_CHROMA_VERSION) else {
        return Err(Error::Invalid(format!(
            "image {ami} has no {TAG_CHROMA_VERSION} tag: it was not baked by imgbuild, so a baked-mode boot finds no Docker and Chroma never starts; \
             bake one (`imgbuild bake`) or {override_hint}"
        )));
    };
    if version != config.chroma.version {
        return Err(Error::Invalid(format!(
            "image {ami} was baked with Chroma {version} but the config names {}; bake again (`imgbuild bake`) or {override_hint}",
            config.chroma.version
        )));
    }
    let reference = crate::render::compose::image_reference(config);
    match tagged(TAG_CHROMA_IMAGE) {
        Some(baked) if baked == reference => Ok(()),
        baked => Err(Error::Invalid(format!(
            "image {ami} was baked with {} but the config names {reference} (chroma.image / chroma.digest); bake again (`imgbuild bake`) or {override_hint}",
            baked.map(|b| format!("Chroma image {b}")).unwrap_or_else(|| format!("no {TAG_CHROMA_IMAGE} tag"))
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graviton_types_are_arm64() {
        for t in ["t4g.small", "m7g.large", "c7gn.xlarge", "x2gd.medium", "is4gen.large", "g5g.xlarge", "hpc7g.4xlarge"] {
            assert_eq!(arch_of(t), Arch::Arm64, "{t}");
        }
        for t in ["t3a.small", "m7i.large", "g5.xlarge", "c6in.2xlarge", "inf2.xlarge", "m5.large"] {
            assert_eq!(arch_of(t), Arch::X86_64, "{t}");
        }
    }

    #[test]
    fn ami_ids() {
        assert!(check_ami_id("ami-0123456789abcdef0").is_ok());
        assert!(check_ami_id("ami-12345678").is_ok());
        assert!(check_ami_id("ami-123").is_err());
        assert!(check_ami_id("img-12345678").is_err());
    }
}

/// One of the project's images, as `images list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub ami: String,
    pub name: String,
    pub created: String,
    pub state: String,
    pub digest: Option<String>,
    pub chroma_version: Option<String>,
    /// The Chroma container image digest the bake pulled (`imgbuild:chroma-digest`): what
    /// exactly the image serves, where a tag such as `1.0.0` could have moved.
    pub chroma_digest: Option<String>,
    /// Why it must not be pruned, if it must not.
    pub in_use: Vec<String>,
    pub snapshots: Vec<String>,
    /// The EBS volumes the snapshots were taken of, GiB (BlockDeviceMappings[].Ebs.VolumeSize):
    /// what the snapshots may bill at most.
    pub snapshot_gib: i64,
}

pub fn tag<'a>(image: &'a aws_sdk_ec2::types::Image, key: &str) -> Option<&'a str> {
    image.tags().iter().find(|t| t.key() == Some(key)).and_then(|t| t.value())
}

/// The project's images (owned by this account, tagged with the project), newest first.
pub async fn list(clients: &Clients, config: &Config) -> Result<Vec<Row>> {
    let out = clients
        .ec2
        .describe_images()
        .owners("self")
        .filters(aws_sdk_ec2::types::Filter::builder().name(format!("tag:{}", TAG_PROJECT)).values(&config.name).build())
        .send()
        .await
        .map_err(|e| aws::err("DescribeImages", format!("images of project {}", config.name), e))?;
    let used = in_use(clients, config).await?;
    let mut rows: Vec<Row> = out
        .images()
        .iter()
        .map(|i| {
            let ami = i.image_id().unwrap_or_default().to_string();
            Row {
                in_use: used.get(&ami).cloned().unwrap_or_default(),
                ami,
                name: i.name().unwrap_or_default().to_string(),
                created: i.creation_date().unwrap_or_default().to_string(),
                state: i.state().map(|s| s.as_str().to_string()).unwrap_or_default(),
                digest: tag(i, TAG_DIGEST).map(String::from),
                chroma_version: tag(i, TAG_CHROMA_VERSION).map(String::from),
                chroma_digest: tag(i, TAG_CHROMA_DIGEST).map(String::from),
                snapshots: i.block_device_mappings().iter().filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()).map(String::from)).collect(),
                snapshot_gib: i.block_device_mappings().iter().filter_map(|m| m.ebs().and_then(|e| e.volume_size())).map(i64::from).sum(),
            }
        })
        .collect();
    rows.sort_by(|a, b| b.created.cmp(&a.created).then(b.ami.cmp(&a.ami)));
    Ok(rows)
}

/// Images something depends on, with what: the deployed stack (its `ImageId` parameter and the
/// launch template among its resources), launch templates tagged with the project, its running
/// instances, and the handoff parameter deploy reads.
///
/// The stack's own resources are the authority: CloudFormation does not copy stack tags onto an
/// `AWS::EC2::LaunchTemplate` (aws-cloudformation/cloudformation-coverage-roadmap#184, #2227),
/// so a stack deployed before the template tagged its launch template has an untagged one.
pub async fn in_use(clients: &Clients, config: &Config) -> Result<std::collections::BTreeMap<String, Vec<String>>> {
    use aws_sdk_ec2::types::Filter;
    let mut used: std::collections::BTreeMap<String, Vec<String>> = std::collections::BTreeMap::new();
    let stack_name = config.stack_name();
    let mut template_ids = stack_launch_templates(clients, stack_name, &mut used).await?;
    // The template tags its launch template with the stack's name; that is the project name
    // unless `stack.name` overrides it.
    let project = Filter::builder().name(format!("tag:{}", TAG_PROJECT)).values(&config.name).build();
    let tagged = Filter::builder().name(format!("tag:{}", TAG_PROJECT)).values(&config.name).values(stack_name).build();
    let templates = clients
        .ec2
        .describe_launch_templates()
        .filters(tagged)
        .send()
        .await
        .map_err(|e| aws::err("DescribeLaunchTemplates", format!("launch templates of project {}", config.name), e))?;
    template_ids.extend(templates.launch_templates().iter().filter_map(|lt| lt.launch_template_id().map(String::from)));
    template_ids.sort();
    template_ids.dedup();
    for id in &template_ids {
        let id = id.as_str();
        let versions = clients
            .ec2
            .describe_launch_template_versions()
            .launch_template_id(id)
            .versions("$Latest")
            .versions("$Default")
            .send()
            .await
            .map_err(|e| aws::err("DescribeLaunchTemplateVersions", format!("launch template {id}"), e))?;
        for v in versions.launch_template_versions() {
            if let Some(ami) = v.launch_template_data().and_then(|d| d.image_id()) {
                used.entry(ami.to_string()).or_default().push(format!("launch template {id}"));
            }
        }
    }
    let instances = clients
        .ec2
        .describe_instances()
        .filters(project)
        .filters(Filter::builder().name("instance-state-name").values("pending").values("running").values("stopping").values("stopped").build())
        .send()
        .await
        .map_err(|e| aws::err("DescribeInstances", format!("instances of project {}", config.name), e))?;
    for i in instances.reservations().iter().flat_map(|r| r.instances()) {
        if let (Some(ami), Some(id)) = (i.image_id(), i.instance_id()) {
            used.entry(ami.to_string()).or_default().push(format!("instance {id}"));
        }
    }
    let handoff = handoff_parameter(config);
    if let Some(ami) = get_parameter(clients, &handoff).await? {
        used.entry(ami).or_default().push(format!("parameter {handoff}"));
    }
    for v in used.values_mut() {
        v.sort();
        v.dedup();
    }
    Ok(used)
}

/// The launch templates among the stack's resources (ids), recording the stack's `ImageId`
/// parameter as in use on the way. No stack: none.
async fn stack_launch_templates(clients: &Clients, stack_name: &str, used: &mut std::collections::BTreeMap<String, Vec<String>>) -> Result<Vec<String>> {
    let Some(stack) = crate::stack::describe(&clients.cfn, stack_name).await? else { return Ok(Vec::new()) };
    if let Some(ami) = crate::stack::parameters_of(&stack).get("ImageId").filter(|a| !a.is_empty()) {
        used.entry(ami.clone()).or_default().push(format!("stack {stack_name} (parameter ImageId)"));
    }
    let mut ids = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = clients
            .cfn
            .list_stack_resources()
            .stack_name(stack_name)
            .set_next_token(token.take())
            .send()
            .await
            .map_err(|e| aws::err("ListStackResources", format!("stack {stack_name}"), e))?;
        ids.extend(
            page.stack_resource_summaries()
                .iter()
                .filter(|r| r.resource_type() == Some("AWS::EC2::LaunchTemplate"))
                .filter_map(|r| r.physical_resource_id().filter(|id| !id.is_empty()).map(String::from)),
        );
        match page.next_token() {
            Some(t) if !t.is_empty() => token = Some(t.to_string()),
            _ => return Ok(ids),
        }
    }
}

/// What prune removes: all but the newest `keep`, never one in use.
pub fn prune_plan(rows: &[Row], keep: usize) -> Vec<&Row> {
    rows.iter().skip(keep).filter(|r| r.in_use.is_empty()).collect()
}
