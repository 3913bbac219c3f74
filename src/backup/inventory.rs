//! What a recovery point holds, as Chroma itself reports it: every collection and its record
//! count, read by the inspect script through a throw-away Chroma on a copy of the data. Recorded
//! in the recovery point's tags at backup time; compared after a restore (`--verify`).

use std::collections::{BTreeMap, HashMap};

use base64::Engine;
use serde::Serialize;

use crate::chroma;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::render::compose;

/// The script Run Command executes to list collections and counts.
pub const INSPECT_SCRIPT: &str = include_str!("../../backup/inspect.sh");
/// The loopback port of the throw-away Chroma (never the configured one, which the live Chroma
/// holds).
pub const INSPECT_PORT: u16 = 18_765;

/// Collection name → record count.
pub type Inventory = BTreeMap<String, u64>;

pub const TAG_COLLECTIONS: &str = "ImgbuildCollections";
pub const TAG_RECORDS: &str = "ImgbuildRecords";
/// `ImgbuildInventory1`, `ImgbuildInventory2`, ...: `name=count` pairs, space-separated.
pub const TAG_INVENTORY: &str = "ImgbuildInventory";
/// AWS Backup tag values hold at most 256 characters; a resource takes at most 50 tags, and the
/// project, version, kind and totals need some.
const TAG_VALUE_MAX: usize = 256;
const INVENTORY_TAGS_MAX: usize = 40;

/// Where the inspect script finds the data.
pub enum Source<'a> {
    /// The live file system, mounted at the configured mount point, at `path` below it.
    Live { path: &'a str },
    /// A restored file system, mounted read-only at a path of its own with these mount args.
    ReadOnly { mount_args: String, mount_at: String, path: &'a str },
}

pub fn inspect_commands(config: &Config, source: Source<'_>, token: &str) -> Result<Vec<String>> {
    let v = chroma::parse_version(&config.chroma.version).map_err(Error::Invalid)?;
    let profile = chroma::profile(&v).map_err(Error::Invalid)?;
    let mut env: Vec<(&str, String)> = vec![
        ("IMGBUILD_TOKEN", token.to_string()),
        ("IMGBUILD_API_PREFIX", profile.api_prefix.to_string()),
        ("IMGBUILD_HEARTBEAT_PATH", profile.heartbeat_path.to_string()),
        ("IMGBUILD_INSPECT_PORT", INSPECT_PORT.to_string()),
        ("IMGBUILD_CONTAINER_PORT", compose::CONTAINER_PORT.to_string()),
        ("IMGBUILD_CONTAINER_DATA", profile.data_dir.to_string()),
        ("IMGBUILD_IMAGE", compose::image_reference(config)),
        ("IMGBUILD_CHROMA_ENV", profile.persistence_env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")),
    ];
    match source {
        Source::Live { path } => {
            env.push(("IMGBUILD_SOURCE_ROOT", config.storage.mount_point.clone()));
            env.push(("IMGBUILD_SOURCE_PATH", path.to_string()));
        }
        Source::ReadOnly { mount_args, mount_at, path } => {
            env.push(("IMGBUILD_SOURCE_ROOT", mount_at));
            env.push(("IMGBUILD_SOURCE_PATH", path.to_string()));
            env.push(("IMGBUILD_MOUNT_ARGS", mount_args));
        }
    }
    let b64 = base64::engine::general_purpose::STANDARD.encode(INSPECT_SCRIPT);
    let env: Vec<String> = env.iter().map(|(k, v)| format!("{k}='{}'", v.replace('\'', r"'\''"))).collect();
    Ok(vec![format!("echo {b64} | base64 -d | {} bash -s", env.join(" "))])
}

/// The `IMGBUILD_COLLECTION <count> <name>` lines of a successful run of this token.
pub fn parse(stdout: &str, token: &str) -> Result<Inventory> {
    let ok = stdout.lines().rev().find(|l| l.starts_with("IMGBUILD_RESULT ")).is_some_and(|l| l == format!("IMGBUILD_RESULT status=ok token={token}"));
    if !ok {
        return Err(Error::Tool(format!("the inspect script did not report success for this run; output was: {}", stdout.trim())));
    }
    let mut inv = Inventory::new();
    for line in stdout.lines().filter_map(|l| l.strip_prefix("IMGBUILD_COLLECTION ")) {
        let (count, name) = line.split_once(' ').ok_or_else(|| Error::Tool(format!("inspect: `{line}` is not `<count> <name>`")))?;
        let count: u64 = count.parse().map_err(|_| Error::Tool(format!("inspect: `{count}` is not a count")))?;
        inv.insert(name.to_string(), count);
    }
    Ok(inv)
}

/// The tags recording an inventory: totals always, the per-collection list when it fits.
pub fn to_tags(inv: &Inventory) -> HashMap<String, String> {
    let mut tags = HashMap::from([(TAG_COLLECTIONS.to_string(), inv.len().to_string()), (TAG_RECORDS.to_string(), inv.values().sum::<u64>().to_string())]);
    let mut chunks: Vec<String> = vec![String::new()];
    for (name, count) in inv {
        let pair = format!("{name}={count}");
        let last = chunks.last_mut().expect("one chunk");
        if !last.is_empty() && last.len() + 1 + pair.len() > TAG_VALUE_MAX {
            chunks.push(pair);
        } else {
            if !last.is_empty() {
                last.push(' ');
            }
            last.push_str(&pair);
        }
    }
    if chunks.len() <= INVENTORY_TAGS_MAX && chunks.iter().all(|c| c.len() <= TAG_VALUE_MAX) {
        for (i, c) in chunks.into_iter().enumerate().filter(|(_, c)| !c.is_empty()) {
            tags.insert(format!("{TAG_INVENTORY}{}", i + 1), c);
        }
    }
    tags
}

/// What a recovery point's tags recorded: per collection when listed, else totals only.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recorded {
    pub collections: Option<Inventory>,
    pub collection_count: u64,
    pub records: u64,
}

pub fn from_tags(tags: &HashMap<String, String>) -> Option<Recorded> {
    let collection_count = tags.get(TAG_COLLECTIONS)?.parse().ok()?;
    let records = tags.get(TAG_RECORDS)?.parse().ok()?;
    let mut inv = Inventory::new();
    let mut i = 1;
    while let Some(chunk) = tags.get(&format!("{TAG_INVENTORY}{i}")) {
        for pair in chunk.split(' ').filter(|p| !p.is_empty()) {
            let (name, count) = pair.rsplit_once('=')?;
            inv.insert(name.to_string(), count.parse().ok()?);
        }
        i += 1;
    }
    let listed = inv.len() as u64 == collection_count;
    Some(Recorded { collections: listed.then_some(inv), collection_count, records })
}

/// One line of the verdict.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    pub collection: String,
    pub recorded: Option<u64>,
    pub found: Option<u64>,
    pub ok: bool,
}

/// Per collection when the tags list them, else the totals as one check.
pub fn compare(recorded: &Recorded, found: &Inventory) -> Vec<Check> {
    match &recorded.collections {
        Some(want) => {
            let names: std::collections::BTreeSet<&String> = want.keys().chain(found.keys()).collect();
            names
                .into_iter()
                .map(|n| {
                    let (r, f) = (want.get(n).copied(), found.get(n).copied());
                    Check { collection: n.clone(), recorded: r, found: f, ok: r.is_some() && r == f }
                })
                .collect()
        }
        None => {
            let total: u64 = found.values().sum();
            vec![Check {
                collection: format!("(all {} collections)", recorded.collection_count),
                recorded: Some(recorded.records),
                found: Some(total),
                ok: total == recorded.records && found.len() as u64 == recorded.collection_count,
            }]
        }
    }
}
