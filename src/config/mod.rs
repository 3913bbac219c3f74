//! `imgbuild.yaml`: the typed schema, its defaults, a loader that reports every error with its
//! line (`lines`), the syntax of every id a user types (names, regions, AMI and file system ids),
//! and the validated [`Context`] commands work from (`plan`). Imports only `error` and the Chroma
//! table: never render, AWS, or the command line.

mod alarms;
mod api;
mod fleet;
pub mod lines;
mod plan;

pub use alarms::AlarmsConfig;
pub use api::{ApiAuth, ApiConfig};
pub use fleet::{Amount, FleetConfig, FleetOverride, GrantsFrom, OrgTarget, PermissionModel, RegionConcurrency, check_account_id, org_target};

pub use plan::Context;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::chroma;
use crate::config::lines::LineIndex;
use crate::error::{ConfigErrors, Error, FieldError, Result};

/// The file looked for in the working directory when `--config` is not given.
pub const DEFAULT_FILE: &str = "imgbuild.yaml";

/// The commented starter `imgbuild init` writes; it parses to exactly the defaults.
pub const STARTER: &str = include_str!("imgbuild.starter.yaml");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The project's name; stack, document, image and parameter names derive from it.
    pub name: String,
    /// AWS region; `--region` wins over it. Unset: decided at deploy time.
    pub region: Option<String>,
    pub chroma: ChromaConfig,
    pub storage: StorageConfig,
    pub efs: EfsConfig,
    pub compose: ComposeConfig,
    pub stack: StackConfig,
    pub bake: BakeConfig,
    pub aws: AwsConfig,
    pub fleet: FleetConfig,
    pub backup: BackupConfig,
    pub api: ApiConfig,
    pub alarms: AlarmsConfig,
    /// Where the monthly cost shown by deploy and bake takes its prices: `auto` asks the AWS Price
    /// List API and falls back to the dated table shipped with imgbuild; `table` makes no call.
    pub prices: PriceSource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PriceSource {
    /// The AWS Price List API (GetProducts), the shipped table for any price it does not give.
    #[default]
    Auto,
    /// Only the price table shipped with imgbuild: no call.
    Table,
}

/// `imgbuild backup` and the stack's daily AWS Backup plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackupConfig {
    /// Days AWS Backup keeps each recovery point, on-demand and scheduled alike.
    pub retention_days: u32,
    /// When the daily plan runs: an AWS Backup `cron(...)` or `rate(...)` expression, UTC.
    pub schedule: String,
}

impl Default for BackupConfig {
    fn default() -> Self {
        Self { retention_days: 35, schedule: "cron(0 5 ? * * *)".into() }
    }
}

/// `imgbuild bake`: the base image, where the build instance runs, and where the result goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BakeConfig {
    /// Pin the base image; unset: AWS's public AL2023 parameter, recorded in the manifest and
    /// kept until `--update-base`.
    pub base_ami: Option<String>,
    /// Build instance type; defaults to `stack.instance_type` (the same architecture).
    pub instance_type: Option<String>,
    /// Build instance types to try in order (one architecture): when the launch step of one
    /// fails (say, EC2 has no capacity for it), bake starts again with the next. Instead of
    /// `instance_type`, which is the one-type case.
    pub instance_types: Vec<String>,
    /// Prerequisites made elsewhere; unset, bake deploys a small stack `<name>-bake` for them.
    /// Give all four or none.
    pub subnet_id: Option<String>,
    pub security_group_id: Option<String>,
    pub instance_profile: Option<String>,
    pub automation_role_arn: Option<String>,
    /// Longest bake follows the automation, in seconds; unset: the runbook's own success budget
    /// and some slack (a shorter bound cancels a bake the runbook still allows to finish).
    pub timeout_secs: Option<u64>,
    /// More regions to copy the image to (the handoff parameter is written there too).
    pub regions: Vec<String>,
    /// The manifest bake writes (and reads the recorded base image from).
    pub manifest: String,
    /// A customer-managed KMS key (id, ARN or alias/...) for the image's snapshots. An image
    /// encrypted with the AWS managed `aws/ebs` key cannot be shared with another account, so a
    /// fleet that spans accounts needs one.
    pub kms_key_id: Option<String>,
    /// The key to use in a region where `kms_key_id` does not exist: KMS keys are regional, so
    /// a single-region key needs a key of its own in each other region (a multi-region key,
    /// `mrk-...`, has a replica with the same id instead, and an alias name is looked up in each
    /// region). Region to key id, ARN or alias.
    pub kms_key_ids: BTreeMap<String, String>,
}

impl BakeConfig {
    /// The key that encrypts the image in `region` (bake runs in `home`), or None without
    /// `kms_key_id`. Errors name the field to set.
    pub fn kms_key_in(&self, region: &str, home: &str) -> std::result::Result<Option<String>, String> {
        if let Some(k) = self.kms_key_ids.get(region) {
            return Ok(Some(k.clone()));
        }
        let Some(k) = &self.kms_key_id else { return Ok(None) };
        let missing = |in_region: &str| {
            format!(
                "bake.kms_key_id is a key of {in_region}, and KMS keys are regional: set bake.kms_key_ids.{region} to the key for {region} \
                 (or use a multi-region key, mrk-..., replicated there)"
            )
        };
        let parts: Vec<&str> = k.split(':').collect();
        if parts.len() == 6 && parts[0] == "arn" {
            let key_region = parts[3];
            if key_region == region {
                return Ok(Some(k.clone()));
            }
            // A multi-region key's replicas share its id; only the ARN's region differs.
            if parts[5].starts_with("key/mrk-") {
                let mut p = parts.clone();
                p[3] = region;
                return Ok(Some(p.join(":")));
            }
            return Err(missing(key_region));
        }
        // An alias name is resolved in each region; a multi-region key id is the same in each.
        if k.starts_with("alias/") || k.starts_with("mrk-") || region == home {
            return Ok(Some(k.clone()));
        }
        Err(missing(home))
    }
}

impl Default for BakeConfig {
    fn default() -> Self {
        Self {
            base_ami: None,
            instance_type: None,
            instance_types: Vec::new(),
            subnet_id: None,
            security_group_id: None,
            instance_profile: None,
            automation_role_arn: None,
            timeout_secs: None,
            regions: Vec::new(),
            manifest: "imgbuild.bake.json".into(),
            kms_key_id: None,
            kms_key_ids: BTreeMap::new(),
        }
    }
}

/// The CloudFormation stack `deploy` manages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StackConfig {
    /// Stack name; defaults to `name`.
    pub name: Option<String>,
    pub instance_type: String,
    pub vpc_cidr: String,
    pub nat_gateways: NatGateways,
    /// A CIDR allowed to reach the API endpoint besides the client security group. Unset: none.
    pub allowed_client_cidr: Option<String>,
    pub log_retention_days: u32,
    /// How long API Gateway waits for Chroma (ms); 29000 is the REST API default and limit.
    pub integration_timeout_ms: u32,
    /// Termination protection on the stack: DeleteStack fails until it is turned off.
    pub termination_protection: bool,
    /// A stack policy refusing updates that replace or delete the file system or backup vault.
    pub protect_data: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NatGateways {
    One,
    PerAz,
}

/// How imgbuild talks to AWS: retries and waits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AwsConfig {
    pub retry_mode: RetryMode,
    /// Attempts per API call, the first included.
    pub max_attempts: u32,
    /// Longest a single API call may take, retries included, in seconds.
    pub operation_timeout_secs: u64,
    /// Longest a stack operation may run before imgbuild stops waiting, in seconds.
    pub stack_timeout_secs: u64,
    /// Seconds between polls of a running operation.
    pub poll_interval_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RetryMode {
    Standard,
    Adaptive,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChromaConfig {
    /// A pinned release; what it implies comes from the table in `chroma.rs`.
    #[serde(deserialize_with = "version_text")]
    pub version: String,
    /// Image repository, without tag.
    pub image: String,
    /// Optional `sha256:...` manifest digest to pin the image by content.
    pub digest: Option<String>,
    /// The port Chroma listens on, on the host and in the container.
    pub port: u16,
    /// Extra, non-secret environment for the container.
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum StorageMode {
    /// EFS mounted on the host by amazon-efs-utils with TLS and IAM, bind-mounted into Chroma.
    EfsTls,
    /// Docker's local volume driver mounts EFS over plain NFS (the reference article's way).
    DockerNfs,
}

impl StorageMode {
    pub fn as_str(self) -> &'static str {
        match self {
            StorageMode::EfsTls => "efs-tls",
            StorageMode::DockerNfs => "docker-nfs",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub mode: StorageMode,
    /// Where the host mounts EFS in `efs-tls` mode.
    pub mount_point: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EfsConfig {
    /// `fs-` + hex. Unset: the instance reads it at boot from its `ImgbuildFileSystemId` tag,
    /// which the stack sets.
    pub file_system_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ComposeConfig {
    /// The docker compose release downloaded in `full` mode and baked into images.
    #[serde(deserialize_with = "version_text")]
    pub version: String,
    /// sha256 of `docker-compose-linux-<arch>` for that release, checked before use.
    pub sha256: ComposeChecksums,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComposeChecksums {
    pub x86_64: String,
    pub aarch64: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            name: "vectordb".into(),
            region: None,
            chroma: ChromaConfig::default(),
            storage: StorageConfig::default(),
            efs: EfsConfig::default(),
            compose: ComposeConfig::default(),
            stack: StackConfig::default(),
            bake: BakeConfig::default(),
            aws: AwsConfig::default(),
            fleet: FleetConfig::default(),
            backup: BackupConfig::default(),
            api: ApiConfig::default(),
            prices: PriceSource::Auto,
            alarms: AlarmsConfig::default(),
        }
    }
}

impl Default for StackConfig {
    fn default() -> Self {
        Self {
            name: None,
            instance_type: "t3a.small".into(),
            vpc_cidr: "10.0.0.0/16".into(),
            nat_gateways: NatGateways::One,
            allowed_client_cidr: None,
            log_retention_days: 30,
            integration_timeout_ms: 29_000,
            termination_protection: true,
            protect_data: true,
        }
    }
}

impl Default for AwsConfig {
    fn default() -> Self {
        Self { retry_mode: RetryMode::Standard, max_attempts: 5, operation_timeout_secs: 60, stack_timeout_secs: 3600, poll_interval_secs: 5 }
    }
}

impl Config {
    /// The build instance type (the first to try).
    pub fn bake_instance_type(&self) -> &str {
        self.bake_instance_types()[0]
    }

    /// The build instance types to try, in order; never empty.
    pub fn bake_instance_types(&self) -> Vec<&str> {
        if self.bake.instance_types.is_empty() {
            vec![self.bake.instance_type.as_deref().unwrap_or(&self.stack.instance_type)]
        } else {
            self.bake.instance_types.iter().map(String::as_str).collect()
        }
    }

    /// The stack `deploy`, `status` and `destroy` work on.
    pub fn stack_name(&self) -> &str {
        self.stack.name.as_deref().unwrap_or(&self.name)
    }
}

impl Default for ChromaConfig {
    fn default() -> Self {
        Self { version: chroma::DEFAULT_VERSION.into(), image: chroma::IMAGE_REPOSITORY.into(), digest: None, port: 8000, env: BTreeMap::new() }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self { mode: StorageMode::EfsTls, mount_point: "/mnt/chroma".into() }
    }
}

impl Default for ComposeConfig {
    fn default() -> Self {
        // Published checksums of the v2.32.4 release assets.
        Self {
            version: "2.32.4".into(),
            sha256: ComposeChecksums {
                x86_64: "ed1917fb54db184192ea9d0717bcd59e3662ea79db48bff36d3475516c480a6b".into(),
                aarch64: "0c4591cf3b1ed039adcd803dbbeddf757375fc08c11245b0154135f838495a2f".into(),
            },
        }
    }
}

/// YAML reads `version: 1.5` as a number; take it as the text the user typed, so the
/// version check can say what is wrong with it.
fn version_text<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    struct Text;
    impl serde::de::Visitor<'_> for Text {
        type Value = String;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a version such as 1.5.9")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(Text)
}

/// The names an enum setting takes, for messages serde words around its own types.
fn enum_names(field: &str) -> Option<&'static str> {
    Some(match field {
        "storage.mode" => "efs-tls or docker-nfs",
        "stack.nat_gateways" => "one or per-az",
        "aws.retry_mode" => "standard or adaptive",
        "fleet.permission_model" => "self-managed or service-managed",
        "fleet.region_concurrency" => "sequential or parallel",
        "fleet.grants_from" => "target-account or key-account",
        _ => return None,
    })
}

/// Where a config came from, for messages and reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Defaults,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Defaults => f.write_str("built-in defaults"),
        }
    }
}

/// Loads `explicit` (which must exist), else `./imgbuild.yaml` if present, else the defaults.
pub fn load(explicit: Option<&Path>) -> Result<(Config, Source)> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => {
            let p = PathBuf::from(DEFAULT_FILE);
            if !p.exists() {
                return Ok((Config::default(), Source::Defaults));
            }
            p
        }
    };
    let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
        // clap fills --config from IMGBUILD_CONFIG too; name what the user actually set.
        std::io::ErrorKind::NotFound if std::env::var_os("IMGBUILD_CONFIG").is_some_and(|v| Path::new(&v) == path) => Error::Invalid(format!(
            "config file {} (named by the environment variable IMGBUILD_CONFIG) does not exist \
             (run `imgbuild init` to write it, or unset IMGBUILD_CONFIG to use ./imgbuild.yaml or the defaults)",
            path.display()
        )),
        std::io::ErrorKind::NotFound => Error::Invalid(format!(
            "config file {} does not exist (run `imgbuild init` to write a starter, or drop --config to use the defaults)",
            path.display()
        )),
        _ => Error::io("reading config", &path, e),
    })?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|b| **b == b'\n').count() + 1;
        Error::Config(ConfigErrors {
            file: path.display().to_string(),
            errors: vec![FieldError { field: String::new(), line: Some(line), message: format!("not UTF-8 text (byte {at} is not valid UTF-8)") }],
        })
    })?;
    let config = parse(&text, &path.display().to_string()).map_err(Error::Config)?;
    Ok((config, Source::File(path)))
}

/// Parses and checks a config, collecting every error: a broken section is reported and set
/// aside so the others are still checked.
pub fn parse(text: &str, file: &str) -> std::result::Result<Config, ConfigErrors> {
    let lines = LineIndex::new(text);
    let mut errors = Vec::new();
    let at = |field: String, message: String| FieldError { line: lines.line_of(&field), field, message };

    let mut value: serde_yaml::Value = match serde_yaml::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            // serde_yaml places a duplicate key at its mapping; the line index knows the repeat.
            let errors = if lines.duplicates.is_empty() {
                // libyaml ends a file without a final newline with a line break of its own, and
                // can place an error there: keep the line inside the file.
                let last = text.lines().count().max(1);
                vec![FieldError {
                    field: String::new(),
                    line: e.location().map(|l| l.line().min(last)),
                    message: format!("not valid YAML: {}", strip_location(&e.to_string())),
                }]
            } else {
                lines
                    .duplicates
                    .iter()
                    .map(|(field, line, first)| FieldError {
                        line: Some(*line),
                        message: format!("duplicate entry with key \"{}\" (first at line {first}); keep one", field.rsplit('.').next().unwrap_or(field)),
                        field: field.clone(),
                    })
                    .collect()
            };
            return Err(ConfigErrors { file: file.into(), errors });
        }
    };
    if value.is_null() {
        value = serde_yaml::Value::Mapping(Default::default());
    }
    if !value.is_mapping() {
        return Err(ConfigErrors { file: file.into(), errors: vec![at(String::new(), "the top level must be a mapping of settings".into())] });
    }
    for (field, message) in remove_non_text_keys(&mut value, "") {
        errors.push(at(field, message));
    }

    // Each error's field is set aside (the defaults take its place) and the rest is read again,
    // so every wrong field in the file is reported, not only the first of each section.
    let mut aside: Vec<String> = Vec::new();
    let config = loop {
        match serde_path_to_error::deserialize::<_, Config>(value.clone()) {
            Ok(c) => break c,
            Err(e) => {
                let field = e.path().to_string();
                let field = if field == "." { String::new() } else { field };
                // An error on a mapping whose field was set aside (a required field now
                // missing) is a consequence, not another mistake: set the mapping aside too.
                let consequence = aside.iter().any(|a| a.starts_with(&format!("{field}.")));
                if !consequence {
                    let mut message = strip_location(&e.inner().to_string());
                    // serde_yaml words a wrong type on an enum as its own internals.
                    if message.contains("Value::Tagged enum")
                        && let Some(names) = enum_names(&field)
                    {
                        message = format!("{}expected {names}", message.split("expected").next().unwrap_or_default());
                    }
                    errors.push(at(field.clone(), plain_words(&message)));
                }
                aside.push(field.clone());
                if !set_aside(&mut value, &field) {
                    // Nothing left to set aside: the remaining errors cannot be separated.
                    return Err(ConfigErrors { file: file.into(), errors });
                }
            }
        }
    };

    errors.extend(config.check().into_iter().map(|(field, message)| at(field, message)));
    // In file order, as a person reads them.
    errors.sort_by_key(|e| (e.line.unwrap_or(usize::MAX), e.field.clone()));
    if errors.is_empty() { Ok(config) } else { Err(ConfigErrors { file: file.into(), errors }) }
}

/// Removes mapping keys that are not text (`8000: x`), returning each as (field, message).
fn remove_non_text_keys(value: &mut serde_yaml::Value, path: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    if let Some(map) = value.as_mapping_mut() {
        let bad: Vec<serde_yaml::Value> = map.keys().filter(|k| !k.is_string()).cloned().collect();
        for k in bad {
            let text = serde_yaml::to_string(&k).unwrap_or_default().trim().to_string();
            let field = if path.is_empty() { text.clone() } else { format!("{path}.{text}") };
            found.push((field, format!("`{text}` is not a setting name (keys are words such as `name` or `chroma`)")));
            map.remove(&k);
        }
        for (k, v) in map.iter_mut() {
            if let Some(k) = k.as_str() {
                let child = if path.is_empty() { k.to_string() } else { format!("{path}.{k}") };
                found.extend(remove_non_text_keys(v, &child));
            }
        }
    }
    found
}

/// Removes the value at a dotted field path (the deepest part that exists), so the defaults
/// stand in for it. False when nothing could be removed.
fn set_aside(value: &mut serde_yaml::Value, field: &str) -> bool {
    fn remove_at(value: &mut serde_yaml::Value, parts: &[&str]) -> bool {
        match parts {
            [] => false,
            [last] => value.as_mapping_mut().is_some_and(|m| m.remove(serde_yaml::Value::String(last.to_string())).is_some()),
            [first, rest @ ..] => value.get_mut(*first).is_some_and(|v| remove_at(v, rest)),
        }
    }
    let parts: Vec<&str> = field.split('.').filter(|p| !p.is_empty()).collect();
    (1..=parts.len()).rev().any(|depth| remove_at(value, &parts[..depth]))
}

/// serde_yaml appends " at line N column M" to messages; we print the line ourselves.
fn strip_location(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

impl Config {
    /// Semantic checks that types cannot express, as (field, message) pairs.
    pub fn check(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut bad = |field: &str, message: String| out.push((field.to_string(), message));

        if let Err(m) = check_name(&self.name) {
            bad("name", m);
        }
        if let Some(region) = &self.region
            && let Err(m) = check_region(region)
        {
            bad("region", m);
        }
        match chroma::parse_version(&self.chroma.version) {
            Ok(v) => {
                if let Err(m) = chroma::profile(&v) {
                    bad("chroma.version", m);
                }
            }
            Err(m) => bad("chroma.version", m),
        }
        if let Err(m) = check_image_repository(&self.chroma.image) {
            bad("chroma.image", m);
        }
        if let Some(d) = &self.chroma.digest
            && !is_sha256_digest(d)
        {
            bad("chroma.digest", format!("`{d}` is not an image digest (expected sha256: followed by 64 lowercase hex digits)"));
        }
        if self.chroma.port == 0 {
            bad("chroma.port", "port 0 is not a port Chroma can listen on (use 1024-65535; the default is 8000)".into());
        } else if self.chroma.port < 1024 {
            // The stack's ChromaPort parameter takes 1024-65535: below, the host's own services
            // (sshd on 22, ...) live, and CloudFormation would refuse the deploy.
            bad("chroma.port", format!("port {} is a privileged port the stack refuses (ChromaPort takes 1024-65535; the default is 8000)", self.chroma.port));
        }
        for key in self.chroma.env.keys() {
            let field = format!("chroma.env.{key}");
            if let Err(m) = check_env_key(key) {
                bad(&field, m);
            }
        }
        if let Err(m) = check_mount_point(&self.storage.mount_point) {
            bad("storage.mount_point", m);
        }
        if let Some(id) = &self.efs.file_system_id
            && let Err(m) = check_file_system_id(id)
        {
            bad("efs.file_system_id", m);
        }
        let compose_default = ComposeConfig::default();
        if semver::Version::parse(&self.compose.version).is_err() {
            bad(
                "compose.version",
                format!("`{}` is not a compose release (expected MAJOR.MINOR.PATCH such as {})", self.compose.version, compose_default.version),
            );
        } else if self.compose.version != compose_default.version
            && (self.compose.sha256.x86_64 == compose_default.sha256.x86_64 || self.compose.sha256.aarch64 == compose_default.sha256.aarch64)
        {
            // The boot checks the download against these: stale ones fail every instance at
            // boot, an hour after a deploy that passed.
            bad(
                "compose.sha256",
                format!(
                    "still holds the checksums of compose {} but compose.version is {}: set compose.sha256.x86_64 and compose.sha256.aarch64 \
                     to the sha256 of docker-compose-linux-x86_64 and docker-compose-linux-aarch64 published with release {}",
                    compose_default.version, self.compose.version, self.compose.version
                ),
            );
        }
        for (arch, sum) in [("x86_64", &self.compose.sha256.x86_64), ("aarch64", &self.compose.sha256.aarch64)] {
            if !is_hex(sum, 64) {
                bad(&format!("compose.sha256.{arch}"), format!("`{sum}` is not a sha256 (expected 64 lowercase hex digits)"));
            }
        }
        if let Some(n) = &self.stack.name
            && let Err(m) = check_name(n)
        {
            bad("stack.name", m);
        }
        if let Err(m) = check_instance_type(&self.stack.instance_type) {
            bad("stack.instance_type", m);
        }
        match parse_cidr(&self.stack.vpc_cidr) {
            Ok((_, prefix)) if (16..=20).contains(&prefix) => {}
            Ok((_, prefix)) if prefix < 16 => {
                bad("stack.vpc_cidr", format!("/{prefix} is larger than a VPC may be (AWS allows /16 to /28; the stack needs /16 to /20)"))
            }
            Ok((_, prefix)) => {
                bad("stack.vpc_cidr", format!("/{prefix} leaves too little room for the four subnets the stack carves (use a prefix from /16 to /20)"))
            }
            Err(m) => bad("stack.vpc_cidr", m),
        }
        if let Some(c) = &self.stack.allowed_client_cidr {
            match parse_cidr(c) {
                Ok((_, 0)) => bad("stack.allowed_client_cidr", "0.0.0.0/0 would open the API endpoint to every address; name the clients' network".into()),
                // The stack's AllowedClientCidr parameter refuses /1 to /7 too.
                Ok((_, prefix)) if prefix < 8 => {
                    bad("stack.allowed_client_cidr", format!("/{prefix} spans a large share of all addresses and the stack refuses it (use /8 to /32)"))
                }
                Ok(_) => {}
                Err(m) => bad("stack.allowed_client_cidr", m),
            }
        }
        if self.stack.integration_timeout_ms < 50 {
            bad(
                "stack.integration_timeout_ms",
                format!("{} ms is below API Gateway's 50 ms minimum (the default is 29000)", self.stack.integration_timeout_ms),
            );
        }
        // The retention periods CloudWatch Logs accepts.
        const RETENTION: &[u32] = &[1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653];
        if !RETENTION.contains(&self.stack.log_retention_days) {
            bad("stack.log_retention_days", format!("{} is not a CloudWatch Logs retention period (one of {RETENTION:?})", self.stack.log_retention_days));
        }
        if let Some(ami) = &self.bake.base_ami
            && let Err(m) = check_ami_id(ami)
        {
            bad("bake.base_ami", m);
        }
        if let Some(t) = &self.bake.instance_type
            && let Err(m) = check_instance_type(t)
        {
            bad("bake.instance_type", m);
        }
        if self.bake.instance_type.is_some() && !self.bake.instance_types.is_empty() {
            bad("bake.instance_types", "give bake.instance_type or bake.instance_types (the ordered list to try), not both".into());
        }
        for (i, t) in self.bake.instance_types.iter().enumerate() {
            if let Err(m) = check_instance_type(t) {
                bad(&format!("bake.instance_types[{i}]"), m);
            } else if self.bake.instance_types[..i].contains(t) {
                bad(&format!("bake.instance_types[{i}]"), format!("{t} is already in the list"));
            }
        }
        let given = [&self.bake.subnet_id, &self.bake.security_group_id, &self.bake.instance_profile, &self.bake.automation_role_arn];
        let n = given.iter().filter(|g| g.is_some()).count();
        if n != 0 && n != given.len() {
            bad("bake", "give subnet_id, security_group_id, instance_profile and automation_role_arn together, or none (bake then makes them)".into());
        }
        type IdCheck<'a> = (&'a str, &'a Option<String>, &'a str, fn(&str) -> bool);
        let id_checks: [IdCheck; 4] = [
            ("bake.subnet_id", &self.bake.subnet_id, "a subnet id (subnet- followed by hex)", |v| {
                v.strip_prefix("subnet-").is_some_and(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()))
            }),
            ("bake.security_group_id", &self.bake.security_group_id, "a security group id (sg- followed by hex)", |v| {
                v.strip_prefix("sg-").is_some_and(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()))
            }),
            ("bake.instance_profile", &self.bake.instance_profile, "an instance profile name (letters, digits and +=,.@_-, at most 128)", |v| {
                !v.is_empty() && v.len() <= 128 && v.chars().all(|c| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c))
            }),
            ("bake.automation_role_arn", &self.bake.automation_role_arn, "an IAM role ARN (arn:aws:iam::<account>:role/<name>)", |v| {
                v.starts_with("arn:aws") && v.contains(":iam::") && v.contains(":role/")
            }),
        ];
        for (field, value, what, ok) in id_checks {
            if let Some(v) = value
                && !ok(v)
            {
                bad(field, format!("`{v}` is not {what}"));
            }
        }
        if let Some(t) = self.bake.timeout_secs
            && t < 600
        {
            bad("bake.timeout_secs", format!("{t}s is too short for a bake (at least 600)"));
        }
        for (i, r) in self.bake.regions.iter().enumerate() {
            if let Err(m) = check_region(r) {
                bad(&format!("bake.regions[{i}]"), m);
            }
        }
        if self.bake.manifest.trim().is_empty() {
            bad("bake.manifest", "must name a file".into());
        }
        if !(1..=20).contains(&self.aws.max_attempts) {
            bad("aws.max_attempts", format!("{} attempts: use 1 to 20", self.aws.max_attempts));
        }
        if self.aws.operation_timeout_secs == 0 {
            bad("aws.operation_timeout_secs", "must be at least 1 second".into());
        }
        if self.aws.stack_timeout_secs < 60 {
            bad("aws.stack_timeout_secs", format!("{}s is too short for any stack operation (at least 60)", self.aws.stack_timeout_secs));
        }
        if !(1..=300).contains(&self.aws.poll_interval_secs) {
            bad("aws.poll_interval_secs", format!("{}s: use 1 to 300", self.aws.poll_interval_secs));
        }
        if let Some(k) = &self.bake.kms_key_id
            && let Err(m) = check_kms_key(k)
        {
            bad("bake.kms_key_id", m);
        }
        for (r, k) in &self.bake.kms_key_ids {
            if let Err(m) = check_region(r) {
                bad(&format!("bake.kms_key_ids.{r}"), m);
            }
            if let Err(m) = check_kms_key(k) {
                bad(&format!("bake.kms_key_ids.{r}"), m);
            }
        }
        // A key ARN says its region: every region the image goes to (bake's copies, the
        // fleet's regions) needs its own key there, found before anything is baked.
        if let Some(key_region) = self.bake.kms_key_id.as_deref().and_then(|k| k.strip_prefix("arn:")).and_then(|k| k.split(':').nth(2)) {
            let mut regions: Vec<&String> = self.bake.regions.iter().chain(self.fleet.regions.iter()).collect();
            regions.sort();
            regions.dedup();
            for r in regions {
                if let Err(m) = self.bake.kms_key_in(r, key_region) {
                    bad(&format!("bake.kms_key_ids.{r}"), m);
                }
            }
        }
        if !self.bake.kms_key_ids.is_empty() && self.bake.kms_key_id.is_none() {
            bad("bake.kms_key_ids", "set bake.kms_key_id too: it is the key of the region bake runs in, and what the fleet checks for".into());
        }
        // AWS Backup's lifecycle takes whole days; a century is far beyond any real retention.
        if !(1..=36_500).contains(&self.backup.retention_days) {
            bad("backup.retention_days", format!("{} days: use 1 to 36500", self.backup.retention_days));
        }
        let sched = self.backup.schedule.trim();
        let expr_ok = (sched.starts_with("cron(") || sched.starts_with("rate(")) && sched.ends_with(')') && sched.len() > 6 && sched.is_ascii();
        if !expr_ok {
            bad("backup.schedule", format!("`{sched}` is not an AWS Backup schedule expression such as cron(0 5 ? * * *) or rate(12 hours)"));
        }
        out.extend(fleet::check(&self.fleet, self.bake.kms_key_id.is_some()));
        out.extend(api::check(&self.api));
        out.extend(alarms::check(&self.alarms));
        out
    }
}

/// serde's wording in the user's terms: what the field takes, not the Rust type behind it
/// (`expected u16`, `expected struct ChromaConfig`, `unit value`).
fn plain_words(message: &str) -> String {
    let mut m = message.to_string();
    for (jargon, plain) in [
        ("invalid type: unit value", "invalid type: nothing (null)"),
        ("invalid type: map", "invalid type: a mapping"),
        ("invalid type: sequence", "invalid type: a list"),
        ("invalid type: floating point", "invalid type: the decimal number"),
        ("invalid type: boolean", "invalid type: the boolean"),
        ("invalid type: integer", "invalid type: the number"),
        ("invalid value: integer", "invalid value: the number"),
        ("expected a sequence", "expected a list (`- item` lines, or [a, b])"),
        ("expected u16", "expected a whole number from 0 to 65535"),
        ("expected u32", "expected a whole number from 0 to 4294967295"),
        ("expected u64", "expected a whole number, 0 or more"),
    ] {
        m = m.replace(jargon, plain);
    }
    if let Some(i) = m.find("expected struct ") {
        m = format!("{}expected a section: a mapping of its keys, indented below it", &m[..i]);
    }
    m
}

/// `10.0.0.0/16` as (address, prefix length).
pub fn parse_cidr(text: &str) -> std::result::Result<(std::net::Ipv4Addr, u8), String> {
    let err = || format!("`{text}` is not an IPv4 CIDR block such as 10.0.0.0/16");
    let (addr, prefix) = text.split_once('/').ok_or_else(err)?;
    let addr: std::net::Ipv4Addr = addr.parse().map_err(|_| err())?;
    let prefix: u8 = prefix.parse().map_err(|_| err())?;
    if prefix > 32 {
        return Err(err());
    }
    let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
    if u32::from(addr) & !mask != 0 {
        return Err(format!("`{text}` has host bits set (the network is {}/{prefix})", std::net::Ipv4Addr::from(u32::from(addr) & mask)));
    }
    Ok((addr, prefix))
}

/// EC2 instance types look like `t3a.small`, `m7g.large`, `c6in.2xlarge`.
fn check_instance_type(t: &str) -> std::result::Result<(), String> {
    let ok = t.split_once('.').is_some_and(|(family, size)| {
        family.starts_with(|c: char| c.is_ascii_lowercase())
            && family.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !size.is_empty()
            && size.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    });
    if ok { Ok(()) } else { Err(format!("`{t}` is not an EC2 instance type (such as t3a.small)")) }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

pub fn is_sha256_digest(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|h| is_hex(h, 64))
}

/// CloudFormation stack names: a letter, then letters, digits and hyphens, at most 128
/// characters. We stop at 100 so the names derived from it (`<name>-bake`, …) stay valid.
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    let ok = name.len() <= 100 && name.starts_with(|c: char| c.is_ascii_alphabetic()) && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid name: it must be a valid CloudFormation stack name (a letter, then letters, digits and hyphens) of at most 100 characters"
        ))
    }
}

/// Region codes such as `us-east-1`, `us-gov-west-1`, `ap-southeast-5`.
pub fn check_region(region: &str) -> std::result::Result<(), String> {
    let parts: Vec<&str> = region.split('-').collect();
    let ok = parts.len() >= 3
        && parts[0].len() == 2
        && parts[..parts.len() - 1].iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
        && parts[parts.len() - 1].parse::<u8>().is_ok();
    if ok { Ok(()) } else { Err(format!("`{region}` is not an AWS region code (such as us-east-1)")) }
}

pub fn check_ami_id(id: &str) -> std::result::Result<(), String> {
    match id.strip_prefix("ami-") {
        Some(hex) if (hex.len() == 8 || hex.len() == 17) && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) => Ok(()),
        _ => Err(format!("`{id}` is not an AMI id (ami- followed by 8 or 17 lowercase hex digits)")),
    }
}

pub fn check_file_system_id(id: &str) -> std::result::Result<(), String> {
    match id.strip_prefix("fs-") {
        Some(hex) if (8..=40).contains(&hex.len()) && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) => Ok(()),
        _ => Err(format!("`{id}` is not an EFS file system id (expected fs- followed by lowercase hex, such as fs-0123456789abcdef0)")),
    }
}

/// A KMS key as EC2 takes it: a key id (UUID), a key ARN, an alias name or an alias ARN.
fn check_kms_key(k: &str) -> std::result::Result<(), String> {
    let uuid = |s: &str| s.len() == 36 && s.split('-').map(str::len).eq([8, 4, 4, 4, 12]) && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    let key_arn = k.starts_with("arn:aws") && k.contains(":kms:") && k.rsplit_once(":key/").is_some_and(|(_, id)| uuid(id) || id.starts_with("mrk-"));
    let alias_arn = k.starts_with("arn:aws") && k.contains(":kms:") && k.contains(":alias/");
    if k == "alias/aws/ebs" || k.ends_with(":alias/aws/ebs") {
        return Err("the AWS managed key aws/ebs cannot be shared with other accounts; name a customer-managed key".into());
    }
    if uuid(k) || k.starts_with("mrk-") || key_arn || alias_arn || k.strip_prefix("alias/").is_some_and(|a| !a.is_empty()) {
        Ok(())
    } else {
        Err(format!("`{k}` is not a KMS key (a key id, a key ARN, alias/<name> or an alias ARN)"))
    }
}

fn check_image_repository(image: &str) -> std::result::Result<(), String> {
    let last = image.rsplit('/').next().unwrap_or_default();
    let ok = !image.is_empty()
        && !last.contains(':')
        && !image.contains('@')
        && image.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "./-_:".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!("`{image}` is not an image repository: give it without tag or digest (the tag comes from chroma.version, the digest from chroma.digest)"))
    }
}

fn check_env_key(key: &str) -> std::result::Result<(), String> {
    let valid = key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!("`{key}` is not an environment variable name (letters, digits and _, not starting with a digit)"));
    }
    let upper = key.to_ascii_uppercase();
    let secretish = ["TOKEN", "PASSWORD", "PASSWD", "SECRET", "CREDENTIAL", "PRIVATE_KEY", "API_KEY", "ACCESS_KEY"];
    if secretish.iter().any(|s| upper.contains(s)) {
        return Err(format!(
            "`{key}` looks like a secret; user-data is readable by anyone allowed ec2:DescribeInstanceAttribute, so secrets must not go in it. Keep it in SSM Parameter Store or Secrets Manager and read it on the instance"
        ));
    }
    if upper == "IS_PERSISTENT" || upper == "PERSIST_DIRECTORY" || upper == "CHROMA_PERSIST_PATH" {
        return Err(format!("`{key}` is set by imgbuild from the Chroma version table (the data directory must match the mounted volume)"));
    }
    Ok(())
}

fn check_mount_point(path: &str) -> std::result::Result<(), String> {
    let ok = path.starts_with('/')
        && path.len() > 1
        && !path.ends_with('/')
        && !path.contains("//")
        && !path.split('/').any(|c| c == "..")
        && path.chars().all(|c| c.is_ascii_alphanumeric() || "/_.-".contains(c));
    if ok { Ok(()) } else { Err(format!("`{path}` is not a usable mount point (an absolute path of letters, digits, / _ . -, not / itself)")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starter_parses_to_the_defaults() {
        assert_eq!(parse(STARTER, "starter").unwrap(), Config::default());
    }

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(parse("", "x").unwrap(), Config::default());
        assert_eq!(parse("# only a comment\n", "x").unwrap(), Config::default());
    }

    #[test]
    fn collects_errors_across_sections_with_lines() {
        let text = "name: 9lives\nchroma:\n  port: 70000\nstorage:\n  mode: tmpfs\nefs:\n  file_system_id: fs-XYZ\nbogus: 1\n";
        let err = parse(text, "c.yaml").unwrap_err();
        let fields: Vec<_> = err.errors.iter().map(|e| (e.field.as_str(), e.line)).collect();
        assert!(fields.contains(&("chroma.port", Some(3))), "{fields:?}");
        let two = parse("chroma:\n  port: eighty\n  image: 5\n  version: [1]\n", "c.yaml").unwrap_err();
        let f: Vec<_> = two.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(f, ["chroma.port", "chroma.image", "chroma.version"], "every wrong field of one section");
        assert!(fields.contains(&("storage.mode", Some(5))), "{fields:?}");
        assert!(fields.contains(&("bogus", Some(8))), "{fields:?}");
        assert!(fields.contains(&("name", Some(1))), "{fields:?}");
        assert!(fields.contains(&("efs.file_system_id", Some(7))), "{fields:?}");
        assert_eq!(err.errors.len(), 5, "{err}");
    }

    #[test]
    fn field_checks() {
        assert!(check_name("vectordb").is_ok());
        assert!(check_name("my-db-2").is_ok());
        assert!(check_name("2db").is_err());
        assert!(check_name("my_db").is_err());
        assert!(check_name("").is_err());
        assert!(check_region("us-east-1").is_ok());
        assert!(check_region("us-gov-west-1").is_ok());
        assert!(check_region("US-east-1").is_err());
        assert!(check_region("useast1").is_err());
        assert!(check_file_system_id("fs-0123456789abcdef0").is_ok());
        assert!(check_file_system_id("fs-12345678").is_ok());
        assert!(check_file_system_id("fs-1234").is_err());
        assert!(check_file_system_id("fsap-12345678").is_err());
        assert!(check_env_key("CHROMA_SERVER_AUTHN_CREDENTIALS").is_err());
        assert!(check_env_key("ALLOW_RESET").is_ok());
        assert!(check_env_key("1X").is_err());
        assert!(check_mount_point("/mnt/chroma").is_ok());
        assert!(check_mount_point("/").is_err());
        assert!(check_mount_point("/mnt/../etc").is_err());
        assert!(check_mount_point("mnt").is_err());
        assert!(check_image_repository("ghcr.io/chroma-core/chroma").is_ok());
        assert!(check_image_repository("localhost:5000/chroma").is_ok());
        assert!(check_image_repository("ghcr.io/chroma-core/chroma:1.0.0").is_err());
    }
}
