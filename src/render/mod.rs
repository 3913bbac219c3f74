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
/// What chroma.service runs on every start: mount, guards, lock, compose.
pub const START_SCRIPT: &str = "/usr/local/libexec/imgbuild/chroma-start.sh";
/// The instance tags the stack sets for the readiness signal (the contract with the stack).
pub const STACK_TAG: &str = "ImgbuildStackName";
pub const SIGNAL_TAG: &str = "ImgbuildSignalResource";
/// Written last by the install (full mode, and the bake); the boot refuses to start without it.
pub const INSTALL_MARKER: &str = "/var/lib/imgbuild/installed";
/// A guard's refusal, left by the start script for the boot script to signal.
pub const REFUSED_FILE: &str = "/run/imgbuild/refused";
/// On EFS: the Chroma version that last opened the data (its migrations only go forward).
pub const VERSION_MARKER: &str = ".imgbuild-chroma-version";
/// The CloudWatch agent's configuration, written by the boot when `alarms.enabled`: memory and
/// root-disk use for the stack's alarms (no credentials: the agent uses the instance role).
pub const AGENT_CONFIG: &str = "/etc/imgbuild/cloudwatch-agent.json";
/// Where the AL2023 package puts the agent's control script (CloudWatch User Guide, "Start the
/// CloudWatch agent": `/opt/aws/amazon-cloudwatch-agent/bin/amazon-cloudwatch-agent-ctl`).
pub const AGENT_CTL: &str = "/opt/aws/amazon-cloudwatch-agent/bin/amazon-cloudwatch-agent-ctl";
/// The boot's verdict on the agent (running, missing, failed), which `imgbuild logs` shows.
pub const AGENT_STATUS_FILE: &str = "/run/imgbuild/cloudwatch-agent";
/// The boot script gives up (and signals FAILURE) this long after it starts: longer than the
/// start script's mount retries and its wait for another instance's writer lock (600 s).
pub const BOOT_BUDGET_SECS: u32 = 900;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
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
        downloads.push(Download { kind: "package", what: "amazon-cloudwatch-agent".into(), from: "Amazon Linux 2023 repositories (dnf)".into() });
        downloads.push(Download {
            kind: "binary",
            what: format!("docker compose {} (sha256-checked)", c.compose.version),
            from: format!("https://github.com/docker/compose/releases/download/v{}/", c.compose.version),
        });
        downloads.push(Download { kind: "image", what: image.clone(), from: registry });
        steps.push(format!("dnf install docker {storage_package} amazon-cloudwatch-agent (retried on the RPM lock)"));
        steps.push("systemctl enable --now docker".into());
        steps.push("download docker compose, check its sha256, install it".into());
        steps.push(format!("docker pull {image}"));
    }
    let mp = &c.storage.mount_point;
    steps.push(format!("read the region, instance id, file system id and the stack's {STACK_TAG} / {SIGNAL_TAG} tags over IMDSv2 (5 s a call)"));
    steps.push(format!("refuse to go on without the install marker {INSTALL_MARKER}"));
    let how = if efs_tls { "efs, TLS and IAM" } else { "nfs4" };
    steps.push(format!("write the fstab line for {mp} ({how}, nofail) and {ENV_FILE}"));
    steps.push(format!("systemctl enable --now chroma.service, whose every start runs {START_SCRIPT}:"));
    steps.push(format!("  mount EFS on {mp} (8 tries, back-off 5 to 30 s, 90 s each; then systemd starts again)"));
    steps.push(format!("  take the writer lock {} on EFS (waits up to 600 s for another instance)", lock_file(c)));
    steps.push(format!("  guard: {} is on the EFS mount, else refuse", compose::host_data_dir(c)));
    steps.push("  guard: no chroma.sqlite3 elsewhere on EFS while the data directory has none, else refuse".into());
    steps.push(format!("  guard: {mp}/{VERSION_MARKER} names no newer Chroma than {}, else refuse; then record it", c.chroma.version));
    steps.push("  docker compose up --force-recreate (restart: no, systemd is the only supervisor)".into());
    if c.alarms.enabled {
        steps.push(format!(
            "start the CloudWatch agent with {AGENT_CONFIG} (memory, root disk; 120 s at most); missing or failing, it is a warning in the boot log and {AGENT_STATUS_FILE}, never a reason to stop Chroma"
        ));
    }
    steps.push(format!("wait for {} (the boot ends within {BOOT_BUDGET_SECS} s)", inputs.profile.heartbeat_path));
    steps.push(format!(
        "signal the stack once: aws cloudformation signal-resource SUCCESS when Chroma answers, FAILURE with the reason in the journal when the boot gives up (skipped without the {STACK_TAG} / {SIGNAL_TAG} tags)"
    ));
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
    /// The script chroma.service runs on every start, written by write_files in every format.
    pub start: String,
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
    marker_dir: &'a str,
    install_marker: &'a str,
}

#[derive(Template)]
#[template(path = "boot.sh", escape = "none")]
struct BootScript<'a> {
    efs_tls: bool,
    boot_secs: u32,
    stack_tag: &'a str,
    signal_tag: &'a str,
    install_marker: &'a str,
    refused_file: &'a str,
    nfs_options: &'a str,
    file_system_id: &'a str,
    efs_tag: &'a str,
    region: &'a str,
    env_file: &'a str,
    efs_dns_var: &'a str,
    mount_point: &'a str,
    port: u16,
    heartbeat_path: &'a str,
    chroma_version: &'a str,
    cloudwatch_agent: bool,
    agent_ctl: &'a str,
    agent_config: &'a str,
    agent_status: &'a str,
    status_dir: &'a str,
}

#[derive(Template)]
#[template(path = "chroma.service", escape = "none")]
struct Unit<'a> {
    chroma_version: &'a str,
    env_file: &'a str,
    start_script: &'a str,
    compose_args: &'a str,
}

#[derive(Template)]
#[template(path = "start.sh", escape = "none")]
struct StartScript<'a> {
    mount_point: &'a str,
    data_subdir: &'a str,
    lock_name: &'a str,
    version_name: &'a str,
    chroma_version: &'a str,
    refused_file: &'a str,
    install_marker: &'a str,
    env_file: &'a str,
    compose_path: &'a str,
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

pub const LOCK_NAME: &str = ".imgbuild-writer.lock";

/// The lock that keeps a second Chroma from writing to the same file system.
pub fn lock_file(config: &Config) -> String {
    format!("{}/{LOCK_NAME}", config.storage.mount_point)
}

/// The version Chroma images are tagged with (the config may write a leading `v`).
fn bare_version(config: &Config) -> &str {
    config.chroma.version.strip_prefix('v').unwrap_or(&config.chroma.version)
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
            marker_dir: INSTALL_MARKER.rsplit_once('/').map_or("/", |(dir, _)| dir),
            install_marker: INSTALL_MARKER,
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
        &Unit { chroma_version: &c.chroma.version, env_file: ENV_FILE, start_script: START_SCRIPT, compose_args: &compose_args },
    )?;
    let start = render_template(
        "start.sh",
        &StartScript {
            mount_point: &c.storage.mount_point,
            data_subdir: compose::EFS_DATA_SUBDIR,
            lock_name: LOCK_NAME,
            version_name: VERSION_MARKER,
            chroma_version: bare_version(c),
            refused_file: REFUSED_FILE,
            install_marker: INSTALL_MARKER,
            env_file: ENV_FILE,
            compose_path: COMPOSE_PATH,
        },
    )?;
    let boot = render_template(
        "boot.sh",
        &BootScript {
            efs_tls,
            boot_secs: BOOT_BUDGET_SECS,
            stack_tag: STACK_TAG,
            signal_tag: SIGNAL_TAG,
            install_marker: INSTALL_MARKER,
            refused_file: REFUSED_FILE,
            nfs_options: compose::EFS_NFS_OPTIONS,
            file_system_id: c.efs.file_system_id.as_deref().unwrap_or(""),
            efs_tag: EFS_TAG,
            region: inputs.region.unwrap_or(""),
            env_file: ENV_FILE,
            efs_dns_var: compose::EFS_DNS_VAR,
            mount_point: &c.storage.mount_point,
            port: c.chroma.port,
            heartbeat_path: inputs.profile.heartbeat_path,
            chroma_version: &c.chroma.version,
            cloudwatch_agent: c.alarms.enabled,
            agent_ctl: AGENT_CTL,
            agent_config: AGENT_CONFIG,
            agent_status: AGENT_STATUS_FILE,
            status_dir: AGENT_STATUS_FILE.rsplit_once('/').map_or("/", |(dir, _)| dir),
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
        WriteFile { path: START_SCRIPT.into(), owner: "root:root", permissions: "0755", content: start.clone() },
    ];
    if c.alarms.enabled {
        files.push(WriteFile { path: AGENT_CONFIG.into(), owner: "root:root", permissions: "0644", content: agent_config() });
    }
    let mut runcmd = Vec::new();
    if inputs.format == Format::CloudConfig {
        let mut paths = Vec::new();
        for s in &scripts {
            let path = format!("{SCRIPT_DIR}/{}", s.name);
            paths.push(path.clone());
            files.push(WriteFile { path, owner: "root:root", permissions: "0755", content: s.text.clone() });
        }
        // The boot runs even after a failed install, as in MIME format: it finds no install
        // marker, refuses to start Chroma and signals FAILURE, so the stack need not time out.
        runcmd.push(vec!["bash".to_string(), "-c".to_string(), paths.join("; ")]);
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
        start,
        raw,
        output,
        deploy_notes,
        budget: boot_budget(inputs),
    })
}

/// The agent's configuration (CloudWatch User Guide, "Manually create or edit the CloudWatch
/// agent configuration file"): `mem_used_percent` and the root volume's `disk_used_percent` in
/// the CWAgent namespace, each with the instance's group and id appended, plus an aggregate by
/// AutoScalingGroupName alone: the stack's alarms address the group, which outlives instances.
pub fn agent_config() -> String {
    let doc = serde_json::json!({
        "metrics": {
            "namespace": "CWAgent",
            "append_dimensions": { "AutoScalingGroupName": "${aws:AutoScalingGroupName}", "InstanceId": "${aws:InstanceId}" },
            "aggregation_dimensions": [["AutoScalingGroupName"]],
            "metrics_collected": {
                "mem": { "measurement": ["mem_used_percent"] },
                "disk": { "measurement": ["used_percent"], "resources": ["/"] },
            },
        },
    });
    // One line: the user-data's 16 KiB leave no room for indentation.
    let mut text = serde_json::to_string(&doc).expect("JSON values serialise");
    text.push('\n');
    text
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
