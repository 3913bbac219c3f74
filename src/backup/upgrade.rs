//! `imgbuild upgrade --to VERSION`: the checks and the plan (pure), the data version read from
//! the marker the boot writes on EFS, and the record `imgbuild rollback` reads to go back.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Target, runcommand};
use crate::aws::Clients;
use crate::chroma;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::render;

/// AWS Backup's list price for EFS warm backup storage in us-east-1, USD per GB-month (AWS Backup
/// pricing page); other regions differ a little.
pub const BACKUP_USD_PER_GB_MONTH: f64 = 0.05;
/// A conservative copy rate for the quiesce's `cp -a` within one EFS file system, bytes a second.
pub const COPY_BYTES_PER_SEC: u64 = 50 * 1024 * 1024;

/// The record of an upgrade, kept next to the config: what `imgbuild rollback` goes back to.
pub const ROLLBACK_FILE: &str = "imgbuild.rollback.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RollbackRecord {
    pub stack: String,
    pub from_version: String,
    pub to_version: String,
    /// The image the stack ran before the upgrade.
    pub previous_image: String,
    /// How that image boots: a stock image only in full mode (an `--ami` alone means baked).
    /// None in records written before it was kept: deploy's default then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_mode: Option<render::Mode>,
    /// The consistent recovery point taken just before.
    pub recovery_point: String,
}

/// What an upgrade would do, for `--dry-run` and for the confirmation.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub stack: String,
    pub data_version: Option<String>,
    pub to: String,
    pub one_way: String,
    pub data_bytes: i64,
    pub pause_secs_estimate: u64,
    pub replace_secs_max: u32,
    pub retention_days: u32,
    pub extra_point_usd: f64,
    pub bakes: bool,
}

/// Checks `to` against the table and the data's version. Unknown, older, or the same version:
/// bad input (exit 2), nothing changed.
pub fn check(to: &str, data_version: Option<&str>) -> Result<(semver::Version, String)> {
    let want = chroma::parse_version(to).map_err(|m| Error::Invalid(format!("--to: {m}")))?;
    chroma::profile(&want).map_err(|m| Error::Invalid(format!("--to: {m}")))?;
    let Some(have) = data_version.filter(|v| !v.is_empty()) else {
        return Ok((want, "the data carries no version marker yet (Chroma never started on it): nothing to migrate".into()));
    };
    let have_v = chroma::parse_version(have).map_err(|m| Error::Invalid(format!("the version marker on EFS reads `{have}`: {m}")))?;
    if want < have_v {
        return Err(Error::Invalid(format!(
            "--to {to} is older than Chroma {have}, which last opened the data: Chroma's migrations only go forward, so {to} cannot read it. Restore a recovery point taken before {have} instead (`imgbuild backup list`). Nothing was changed"
        )));
    }
    if want == have_v {
        return Err(Error::Invalid(format!("the data is already at Chroma {have}; nothing to upgrade")));
    }
    let crosses = chroma::profile(&have_v).map(|p| p.from) != chroma::profile(&want).map(|p| p.from);
    let one_way = format!(
        "Chroma {to} migrates the data written by {have} on its first start (chroma#2615); {have} cannot open it afterwards{}. The way back is the recovery point taken before the upgrade",
        if crosses { ", and this upgrade crosses a storage-format line (0.x to 1.x has open migration bugs, chroma#4217)" } else { "" }
    );
    Ok((want, one_way))
}

pub fn plan(config: &Config, stack: &str, data_version: Option<&str>, to: &str, data_bytes: i64, bakes: bool) -> Result<Plan> {
    let (_, one_way) = check(to, data_version)?;
    let bytes = data_bytes.max(0) as u64;
    let gb = bytes as f64 / 1e9;
    Ok(Plan {
        stack: stack.to_string(),
        data_version: data_version.map(String::from),
        to: to.to_string(),
        one_way,
        data_bytes,
        pause_secs_estimate: bytes.div_ceil(COPY_BYTES_PER_SEC).max(1) + 10,
        replace_secs_max: render::BOOT_BUDGET_SECS,
        retention_days: config.backup.retention_days,
        extra_point_usd: gb * BACKUP_USD_PER_GB_MONTH * f64::from(config.backup.retention_days) / 30.0,
        bakes,
    })
}

/// The first line of the version marker on EFS, read on the instance (None: no marker yet).
pub async fn data_version(clients: &Clients, config: &Config, t: &Target, poll: Duration) -> Result<Option<String>> {
    let file = format!("{}/{}", config.storage.mount_point, render::VERSION_MARKER);
    let command = format!("if [ -s '{file}' ]; then head -n 1 '{file}'; fi");
    let inv =
        runcommand::run(clients, &t.instance_id, vec![command], "imgbuild upgrade: read the data's version marker", Duration::from_secs(60), poll).await?;
    let v = inv.stdout.trim().to_string();
    Ok((!v.is_empty()).then_some(v))
}
