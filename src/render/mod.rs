//! Renders the cloud-init user-data: askama templates for the text files, typed structs and
//! serde_yaml for the YAML documents, deterministic to the byte. Pure: no I/O, no AWS; the
//! compose document lives in `compose`, the Chroma version facts in `crate::chroma`.

pub mod compose;

use std::io::Write;

use askama::Template;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::chroma::{self, Profile};
use crate::config::{Config, StorageMode};
use crate::error::{Error, Result};
use compose::{ComposeFile, PullPolicy};

/// EC2 accepts at most this many bytes of user-data, before base64.
pub const USERDATA_LIMIT: usize = 16_384;

/// The instance tag the stack sets to the EFS file system id, read at boot over IMDS.
pub const EFS_TAG: &str = "ImgbuildFileSystemId";

pub const COMPOSE_PATH: &str = "/etc/imgbuild/compose.yaml";
pub const ENV_FILE: &str = "/etc/imgbuild/chroma.env";
pub const UNIT_PATH: &str = "/etc/systemd/system/chroma.service";
pub const SCRIPT_DIR: &str = "/usr/local/libexec/imgbuild";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// The whole bootstrap: installs docker, compose and the EFS helper, pulls Chroma, starts it.
    Full,
    /// Boot-time part only, for an AMI baked by `imgbuild bake`: downloads nothing.
    Baked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// One `#cloud-config` document; the scripts are written files run by `runcmd`.
    CloudConfig,
    /// MIME multipart: a `text/cloud-config` part and one `text/x-shellscript` part per script.
    Mime,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::Baked => "baked",
        }
    }
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::CloudConfig => "cloud-config",
            Format::Mime => "mime",
        }
    }
}

/// Everything a render depends on, already validated.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    pub config: &'a Config,
    pub profile: &'static Profile,
    /// `--region` or `region:`; unset means read at boot.
    pub region: Option<&'a str>,
    pub mode: Mode,
    pub format: Format,
    pub gzip: bool,
}

impl<'a> Inputs<'a> {
    /// Looks the version up in the table; the config has been checked, so this only fails for a
    /// config built in code without `Config::check`.
    pub fn new(config: &'a Config, region: Option<&'a str>, mode: Mode, format: Format, gzip: bool) -> Result<Self> {
        let version = chroma::parse_version(&config.chroma.version).map_err(Error::Invalid)?;
        let profile = chroma::profile(&version).map_err(Error::Invalid)?;
        Ok(Self { config, profile, region, mode, format, gzip })
    }
}

/// A shell script of the user-data, kept apart so validators can check it on its own.
#[derive(Debug, Clone, Serialize)]
pub struct Script {
    /// File name: the MIME part's name, and the file under `SCRIPT_DIR`.
    pub name: &'static str,
    pub text: String,
}

/// Something a boot fetches from the network.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Download {
    /// `package`, `binary` or `image`.
    pub kind: &'static str,
    pub what: String,
    pub from: String,
}

/// What a boot in this mode downloads and does: the baked mode's promise is an empty download
/// list.
#[derive(Debug, Clone, Serialize)]
pub struct BootBudget {
    pub downloads: Vec<Download>,
    pub steps: Vec<String>,
}

fn boot_budget(inputs: &Inputs) -> BootBudget {
    let c = inputs.config;
    let efs_tls = c.storage.mode == StorageMode::EfsTls;
    let storage_package = if efs_tls { "amazon-efs-utils" } else { "nfs-utils" };
    let image = compose::image_reference(c);
    let registry = image.split('/').next().unwrap_or_default().to_string();
    let mut downloads = Vec::new();
    let mut steps = Vec::new();
    if inputs.mode == Mode::Full {
        downloads.push(Download { kind: "package", what: "docker (and its dependencies)".into(), from: "Amazon Linux 2023 repositories (dnf)".into() });
        downloads.push(Download { kind: "package", what: storage_package.into(), from: "Amazon Linux 2023 repositories (dnf)".into() });
        downloads.push(Download {
            kind: "binary",
            what: format!("docker compose {} (sha256-checked)", c.compose.version),
            from: format!("https://github.com/docker/compose/releases/download/v{}/", c.compose.version),
        });
        downloads.push(Download { kind: "image", what: image.clone(), from: registry });
        steps.push(format!("dnf install docker {storage_package} (retried on the RPM lock)"));
        steps.push("systemctl enable --now docker".into());
        steps.push("download docker compose, check its sha256, install it".into());
        steps.push(format!("docker pull {image}"));
    }
    steps.push("read the file system id and region over IMDSv2 (unless the config names them)".into());
    if efs_tls {
        steps.push(format!("mount EFS on {} with TLS and IAM (fstab, _netdev)", c.storage.mount_point));
    }
    steps.push(format!("write {ENV_FILE}"));
    steps.push("systemctl enable --now chroma.service (docker compose up under the EFS writer lock)".into());
    steps.push(format!("wait for {} (up to 5 minutes, for the log)", inputs.profile.heartbeat_path));
    BootBudget { downloads, steps }
}

/// The rendered user-data and the pieces it was assembled from.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub mode: Mode,
    pub format: Format,
    pub gzip: bool,
    /// The `#cloud-config` document (the whole user-data in cloud-config format, the first
    /// part in MIME format).
    pub cloud_config: String,
    pub scripts: Vec<Script>,
    pub compose: ComposeFile,
    pub compose_yaml: String,
    pub unit: String,
    /// User-data before compression.
    pub raw: Vec<u8>,
    /// What EC2 receives: `raw`, or its gzip.
    pub output: Vec<u8>,
    /// Human notes on values resolved at deploy time, also written into the header.
    pub deploy_notes: Vec<String>,
    pub budget: BootBudget,
}

impl Rendered {
    pub fn sha256(&self) -> String {
        hex(&Sha256::digest(&self.output))
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Template)]
#[template(path = "install.sh", escape = "none")]
struct InstallScript<'a> {
    compose_version: &'a str,
    compose_sha256_x86_64: &'a str,
    compose_sha256_aarch64: &'a str,
    storage_package: &'a str,
    image: &'a str,
}

#[derive(Template)]
#[template(path = "boot.sh", escape = "none")]
struct BootScript<'a> {
    efs_tls: bool,
    file_system_id: &'a str,
    efs_tag: &'a str,
    region: &'a str,
    env_file: &'a str,
    efs_dns_var: &'a str,
    mount_point: &'a str,
    host_data_dir: &'a str,
    port: u16,
    heartbeat_path: &'a str,
    chroma_version: &'a str,
}

#[derive(Template)]
#[template(path = "chroma.service", escape = "none")]
struct Unit<'a> {
    chroma_version: &'a str,
    env_file: &'a str,
    efs_tls: bool,
    mount_point: &'a str,
    lock_file: &'a str,
    compose_args: &'a str,
}

#[derive(Template)]
#[template(path = "cloud-config.yaml", escape = "none")]
struct CloudConfigDoc<'a> {
    mode: &'a str,
    chroma_version: &'a str,
    image: &'a str,
    storage: &'a str,
    deploy_notes: &'a [String],
    body: &'a str,
}

#[derive(Template)]
#[template(path = "mime.txt", escape = "none")]
struct Mime<'a> {
    boundary: &'a str,
    parts: &'a [MimePart],
}

struct MimePart {
    content_type: &'static str,
    charset: &'static str,
    encoding: &'static str,
    filename: String,
    body: String,
}

/// The cloud-config modules this product uses, typed.
#[derive(Debug, Serialize)]
struct CloudConfigBody {
    write_files: Vec<WriteFile>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    runcmd: Vec<Vec<String>>,
}

#[derive(Debug, Serialize)]
struct WriteFile {
    path: String,
    owner: &'static str,
    permissions: &'static str,
    content: String,
}

fn render_template(template: &'static str, t: &impl Template) -> Result<String> {
    let mut text = t.render().map_err(|source| Error::Template { template, source })?;
    // askama drops the template file's final newline; scripts and units want one.
    if !text.ends_with('\n') {
        text.push('\n');
    }
    Ok(text)
}

/// The lock that keeps a second Chroma from writing to the same file system.
pub fn lock_file(config: &Config) -> String {
    format!("{}/.imgbuild-writer.lock", config.storage.mount_point)
}

pub fn install_script(inputs: &Inputs) -> Result<String> {
    let c = inputs.config;
    render_template(
        "install.sh",
        &InstallScript {
            compose_version: &c.compose.version,
            compose_sha256_x86_64: &c.compose.sha256.x86_64,
            compose_sha256_aarch64: &c.compose.sha256.aarch64,
            storage_package: match c.storage.mode {
                StorageMode::EfsTls => "amazon-efs-utils",
                StorageMode::DockerNfs => "nfs-utils",
            },
            image: &compose::image_reference(c),
        },
    )
}

pub fn render(inputs: &Inputs) -> Result<Rendered> {
    let c = inputs.config;
    let efs_tls = c.storage.mode == StorageMode::EfsTls;
    let pull = match inputs.mode {
        Mode::Full => None,
        Mode::Baked => Some(PullPolicy::Never),
    };
    let compose = compose::build(c, inputs.profile, inputs.region, pull);
    let compose_yaml = compose.to_yaml();
    let compose_args = format!("--project-name chroma --env-file {ENV_FILE} -f {COMPOSE_PATH}");

    let unit = render_template(
        "chroma.service",
        &Unit {
            chroma_version: &c.chroma.version,
            env_file: ENV_FILE,
            efs_tls,
            mount_point: &c.storage.mount_point,
            lock_file: &lock_file(c),
            compose_args: &compose_args,
        },
    )?;
    let boot = render_template(
        "boot.sh",
        &BootScript {
            efs_tls,
            file_system_id: c.efs.file_system_id.as_deref().unwrap_or(""),
            efs_tag: EFS_TAG,
            region: inputs.region.unwrap_or(""),
            env_file: ENV_FILE,
            efs_dns_var: compose::EFS_DNS_VAR,
            mount_point: &c.storage.mount_point,
            host_data_dir: &compose::host_data_dir(c),
            port: c.chroma.port,
            heartbeat_path: inputs.profile.heartbeat_path,
            chroma_version: &c.chroma.version,
        },
    )?;

    let mut scripts = Vec::new();
    if inputs.mode == Mode::Full {
        scripts.push(Script { name: "10-install.sh", text: install_script(inputs)? });
    }
    scripts.push(Script { name: "20-boot.sh", text: boot });

    let deploy_notes = deploy_notes(inputs);
    let mut files = vec![
        WriteFile { path: COMPOSE_PATH.into(), owner: "root:root", permissions: "0644", content: compose_yaml.clone() },
        WriteFile { path: UNIT_PATH.into(), owner: "root:root", permissions: "0644", content: unit.clone() },
    ];
    let mut runcmd = Vec::new();
    if inputs.format == Format::CloudConfig {
        let mut paths = Vec::new();
        for s in &scripts {
            let path = format!("{SCRIPT_DIR}/{}", s.name);
            paths.push(path.clone());
            files.push(WriteFile { path, owner: "root:root", permissions: "0755", content: s.text.clone() });
        }
        // runcmd lines run as one `sh` script without -e: chain them, so boot never runs
        // after a failed install.
        runcmd.push(vec!["bash".to_string(), "-c".to_string(), paths.join(" && ")]);
    }
    let body = serde_yaml::to_string(&CloudConfigBody { write_files: files, runcmd }).expect("cloud-config structs always serialise");
    let cloud_config = render_template(
        "cloud-config.yaml",
        &CloudConfigDoc {
            mode: inputs.mode.as_str(),
            chroma_version: &c.chroma.version,
            image: &compose::image_reference(c),
            storage: c.storage.mode.as_str(),
            deploy_notes: &deploy_notes,
            body: body.trim_end(),
        },
    )?;

    let raw = match inputs.format {
        Format::CloudConfig => cloud_config.clone().into_bytes(),
        Format::Mime => mime(&cloud_config, &scripts)?.into_bytes(),
    };
    let output = if inputs.gzip { gzip(&raw) } else { raw.clone() };
    Ok(Rendered {
        mode: inputs.mode,
        format: inputs.format,
        gzip: inputs.gzip,
        cloud_config,
        scripts,
        compose,
        compose_yaml,
        unit,
        raw,
        output,
        deploy_notes,
        budget: boot_budget(inputs),
    })
}

fn deploy_notes(inputs: &Inputs) -> Vec<String> {
    let c = inputs.config;
    let efs = match &c.efs.file_system_id {
        Some(id) => format!("EFS file system {id} (from efs.file_system_id)"),
        None => format!("EFS file system <read at boot from the instance tag {EFS_TAG}, set by the stack>"),
    };
    let region = match inputs.region {
        Some(r) => format!("region {r}"),
        None => "region <read at boot from instance metadata>".to_string(),
    };
    vec![efs, region]
}

/// A boundary derived from the content, so the same inputs give the same bytes.
fn mime(cloud_config: &str, scripts: &[Script]) -> Result<String> {
    let mut h = Sha256::new();
    h.update(cloud_config.as_bytes());
    for s in scripts {
        h.update(s.text.as_bytes());
    }
    let boundary = format!("==imgbuild-{}==", &hex(&h.finalize())[..24]);
    let part = |content_type, filename: String, body: &str| {
        let ascii = body.is_ascii();
        MimePart {
            content_type,
            charset: if ascii { "us-ascii" } else { "utf-8" },
            encoding: if ascii { "7bit" } else { "8bit" },
            filename,
            body: body.trim_end().to_string(),
        }
    };
    let mut parts = vec![part("text/cloud-config", "cloud-config.yaml".into(), cloud_config)];
    for s in scripts {
        parts.push(part("text/x-shellscript", s.name.to_string(), &s.text));
    }
    render_template("mime.txt", &Mime { boundary: &boundary, parts: &parts })
}

/// gzip with a fixed header (no file name, mtime 0), so compressed output is reproducible too.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::GzBuilder::new().mtime(0).write(Vec::new(), flate2::Compression::best());
    enc.write_all(data).expect("writing to a Vec cannot fail");
    enc.finish().expect("writing to a Vec cannot fail")
}
