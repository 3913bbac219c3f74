//! Which AMI an instance boots, and which user-data mode goes with it.

use serde::Serialize;

use crate::aws::{self, Clients, code};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::render::Mode;

/// Tag names on baked images.
pub const TAG_DIGEST: &str = "imgbuild:digest";
pub const TAG_CHROMA_VERSION: &str = "imgbuild:chroma-version";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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

pub fn check_ami_id(id: &str) -> std::result::Result<(), String> {
    match id.strip_prefix("ami-") {
        Some(hex) if (hex.len() == 8 || hex.len() == 17) && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) => Ok(()),
        _ => Err(format!("`{id}` is not an AMI id (ami- followed by 8 or 17 lowercase hex digits)")),
    }
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
                let id = get_parameter(clients, &parameter).await?.ok_or_else(|| {
                    Error::Invalid(format!("the public parameter {parameter} does not exist in this region; pass --ami"))
                })?;
                Choice { ami: id, source: Source::Stock { parameter }, mode: mode.unwrap_or(Mode::Full) }
            }
        }
    };
    if choice.mode == Mode::Baked {
        check_baked(clients, config, &choice.ami).await?;
    }
    Ok(choice)
}

/// A baked boot pulls nothing, so the image must hold the Chroma version the config names.
async fn check_baked(clients: &Clients, config: &Config, ami: &str) -> Result<()> {
    let out = clients
        .ec2
        .describe_images()
        .image_ids(ami)
        .send()
        .await
        .map_err(|e| aws::err("DescribeImages", format!("image {ami}"), e))?;
    let image = out.images().first().ok_or_else(|| Error::Invalid(format!("image {ami} does not exist or is not visible to this account")))?;
    let tagged = image.tags().iter().find(|t| t.key() == Some(TAG_CHROMA_VERSION)).and_then(|t| t.value());
    match tagged {
        Some(v) if v != config.chroma.version => Err(Error::Invalid(format!(
            "image {ami} was baked with Chroma {v} but the config names {}; bake again (`imgbuild bake`) or deploy with --mode full",
            config.chroma.version
        ))),
        _ => Ok(()),
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
