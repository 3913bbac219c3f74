//! The docker compose file, as typed structs serialised with serde_yaml.
//!
//! Only the subset of the Compose Specification this product uses is modelled; field names are
//! the specification's, so the output is read by docker compose v2 and by the offline
//! `docker-compose config` used in tests.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::chroma::Profile;
use crate::config::{Config, StorageMode};

/// Name of the compose service (and of the container docker compose creates).
pub const SERVICE: &str = "chroma";
/// The port every Chroma image listens on inside the container; `chroma.port` is the host side.
pub const CONTAINER_PORT: u16 = 8000;
/// Named volume used in `docker-nfs` mode.
pub const NFS_VOLUME: &str = "chroma-data";
/// Chroma's data on EFS, in both storage modes: `<mount_point>/data` on the host, `:/data` for
/// Docker's NFS volume. One location, so switching modes keeps the collections.
pub const EFS_DATA_SUBDIR: &str = "data";
/// Compose variable filled at boot from the env file the boot script writes.
pub const EFS_DNS_VAR: &str = "EFS_DNS_NAME";

/// The NFS options AWS recommends for EFS.
pub const EFS_NFS_OPTIONS: &str = "nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComposeFile {
    pub services: BTreeMap<String, Service>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub volumes: BTreeMap<String, Volume>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Service {
    pub image: String,
    pub container_name: String,
    /// Unset (compose's default, `missing`) when the boot may download the image; `never` for
    /// baked images, so a boot whose image is not baked in fails loudly instead of downloading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_policy: Option<PullPolicy>,
    /// `no`: systemd is the only supervisor. With `unless-stopped`, dockerd starts Chroma by
    /// itself after an unclean restart, before EFS is mounted and outside the writer lock.
    pub restart: String,
    pub ports: Vec<String>,
    pub environment: BTreeMap<String, String>,
    pub volumes: Vec<ServiceVolume>,
    pub healthcheck: Healthcheck,
    pub stop_grace_period: String,
    pub logging: Logging,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PullPolicy {
    Never,
}

/// Long-form service volume (`type`, `source`, `target`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceVolume {
    #[serde(rename = "type")]
    pub kind: VolumeKind,
    pub source: String,
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind: Option<BindOptions>,
}

/// `create_host_path: false` makes compose use the Mounts API, which fails on a missing source;
/// without it compose uses the legacy Binds API, which creates the missing directory on the root
/// volume (docker/compose v2.32.4 `pkg/compose/create.go` buildContainerVolumes; Docker docs
/// "Differences between -v and --mount behavior").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BindOptions {
    pub create_host_path: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeKind {
    Bind,
    Volume,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Volume {
    pub driver: String,
    pub driver_opts: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Healthcheck {
    pub test: Vec<String>,
    pub interval: String,
    pub timeout: String,
    pub retries: u32,
    pub start_period: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Logging {
    pub driver: String,
    pub options: BTreeMap<String, String>,
}

/// The image reference: `repo:version`, plus `@digest` when pinned by content.
pub fn image_reference(config: &Config) -> String {
    let tag = config.chroma.version.strip_prefix('v').unwrap_or(&config.chroma.version);
    match &config.chroma.digest {
        Some(d) => format!("{}:{tag}@{d}", config.chroma.image),
        None => format!("{}:{tag}", config.chroma.image),
    }
}

/// The host directory bind-mounted as Chroma's data dir in `efs-tls` mode.
pub fn host_data_dir(config: &Config) -> String {
    format!("{}/{EFS_DATA_SUBDIR}", config.storage.mount_point)
}

/// The file system's DNS name when config and flags know it; otherwise a compose variable the
/// boot script fills from instance metadata.
pub fn efs_address(config: &Config, region: Option<&str>) -> String {
    match (&config.efs.file_system_id, region) {
        (Some(id), Some(region)) => {
            let domain = if region.starts_with("cn-") { "amazonaws.com.cn" } else { "amazonaws.com" };
            format!("{id}.efs.{region}.{domain}")
        }
        _ => format!("${{{EFS_DNS_VAR}}}"),
    }
}

/// Compose interpolates `$` in every string; literal dollars must be doubled.
fn escape_interpolation(s: &str) -> String {
    s.replace('$', "$$")
}

/// An HTTP probe that needs only bash: Chroma's images (Python slim for 0.x, Debian slim for
/// 1.x) ship bash but not curl.
pub fn heartbeat_probe(port: u16, path: &str) -> Vec<String> {
    vec![
        "CMD".into(),
        "bash".into(),
        "-c".into(),
        format!("exec 3<>/dev/tcp/127.0.0.1/{port} && printf 'GET {path} HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"),
    ]
}

pub fn build(config: &Config, profile: &Profile, region: Option<&str>, pull_policy: Option<PullPolicy>) -> ComposeFile {
    let port = config.chroma.port;
    let mut environment: BTreeMap<String, String> = config.chroma.env.iter().map(|(k, v)| (k.clone(), escape_interpolation(v))).collect();
    for (k, v) in profile.persistence_env {
        environment.insert((*k).into(), (*v).into());
    }
    let (data_volume, volumes) = match config.storage.mode {
        StorageMode::EfsTls => (
            ServiceVolume {
                kind: VolumeKind::Bind,
                source: host_data_dir(config),
                target: profile.data_dir.into(),
                bind: Some(BindOptions { create_host_path: false }),
            },
            BTreeMap::new(),
        ),
        StorageMode::DockerNfs => {
            let driver_opts = BTreeMap::from([
                ("type".to_string(), "nfs".to_string()),
                ("o".to_string(), format!("addr={},{EFS_NFS_OPTIONS}", efs_address(config, region))),
                ("device".to_string(), format!(":/{EFS_DATA_SUBDIR}")),
            ]);
            (
                ServiceVolume { kind: VolumeKind::Volume, source: NFS_VOLUME.into(), target: profile.data_dir.into(), bind: None },
                BTreeMap::from([(NFS_VOLUME.to_string(), Volume { driver: "local".into(), driver_opts })]),
            )
        }
    };

    let service = Service {
        image: image_reference(config),
        container_name: SERVICE.into(),
        pull_policy,
        restart: "no".into(),
        ports: vec![format!("{port}:{CONTAINER_PORT}")],
        environment,
        volumes: vec![data_volume],
        healthcheck: Healthcheck {
            test: heartbeat_probe(CONTAINER_PORT, profile.heartbeat_path),
            interval: "30s".into(),
            timeout: "5s".into(),
            retries: 3,
            start_period: "60s".into(),
        },
        stop_grace_period: "60s".into(),
        logging: Logging { driver: "json-file".into(), options: BTreeMap::from([("max-size".into(), "10m".into()), ("max-file".into(), "5".into())]) },
    };
    ComposeFile { services: BTreeMap::from([(SERVICE.to_string(), service)]), volumes }
}

impl ComposeFile {
    pub fn to_yaml(&self) -> String {
        let yaml = serde_yaml::to_string(self).expect("compose structs always serialise");
        // serde_yaml writes YAML 1.2 and leaves `no` bare; YAML 1.1 readers (PyYAML, so
        // docker-compose 1.x) take a bare `no` for false, which compose rejects as a restart
        // policy. Compose's own documentation quotes it.
        yaml.replace("\n    restart: no\n", "\n    restart: 'no'\n")
    }

    pub fn service(&self) -> Option<&Service> {
        self.services.get(SERVICE)
    }
}
