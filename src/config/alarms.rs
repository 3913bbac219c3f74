//! `alarms:`: the stack's CloudWatch alarms (target health, the instance's memory and disk
//! through the CloudWatch agent, EFS burst credits and I/O limit), their thresholds, the optional
//! mail topic, and how long deploy watches them after an update (its rollback triggers).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlarmsConfig {
    /// The alarms, the agent's metrics and deploy's rollback triggers; false: none of them.
    pub enabled: bool,
    /// An address an SNS topic mails every alarm state change to (it must confirm the first
    /// mail). Unset: no topic; the alarms are only seen in `imgbuild status` and CloudWatch.
    pub email: Option<String>,
    /// Memory in use on the instance, percent, for five minutes.
    pub memory_percent: u32,
    /// Root volume in use, percent, for five minutes.
    pub disk_percent: u32,
    /// EFS burst credits below this many bytes (bursting throughput only).
    pub efs_burst_credit_bytes: u64,
    /// EFS PercentIOLimit at or above this, for five minutes.
    pub efs_io_limit_percent: u32,
    /// After an update, how long CloudFormation keeps watching the alarms before it calls the
    /// update done (0 to 180): an alarm in that time rolls the update back.
    pub rollback_monitoring_minutes: u32,
}

impl Default for AlarmsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            email: None,
            memory_percent: 90,
            disk_percent: 85,
            efs_burst_credit_bytes: 192_000_000_000,
            efs_io_limit_percent: 95,
            rollback_monitoring_minutes: 10,
        }
    }
}

/// One address, the shape SNS's email protocol takes; not a full RFC 5322 parser.
fn check_email(e: &str) -> Result<(), String> {
    let ok = e.split_once('@').is_some_and(|(local, domain)| {
        !local.is_empty() && domain.contains('.') && !domain.starts_with('.') && !domain.ends_with('.') && !domain.contains('@')
    }) && !e.chars().any(|c| c.is_whitespace() || c.is_control() || c == ',');
    if ok { Ok(()) } else { Err(format!("`{e}` is not one email address (such as ops@example.com)")) }
}

pub(super) fn check(a: &AlarmsConfig) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut bad = |field: &str, message: String| out.push((format!("alarms.{field}"), message));
    if let Some(e) = &a.email {
        if let Err(m) = check_email(e) {
            bad("email", m);
        } else if !a.enabled {
            bad("email", "needs alarms.enabled: true; with the alarms off there is nothing to mail".into());
        }
    }
    for (field, v) in [("memory_percent", a.memory_percent), ("disk_percent", a.disk_percent), ("efs_io_limit_percent", a.efs_io_limit_percent)] {
        if !(1..=100).contains(&v) {
            bad(field, format!("{v}: a percentage from 1 to 100"));
        }
    }
    // CloudFormation's MonitoringTimeInMinutes takes 0 to 180 (RollbackConfiguration, API reference).
    if a.rollback_monitoring_minutes > 180 {
        bad("rollback_monitoring_minutes", format!("{} minutes: CloudFormation watches rollback triggers for 0 to 180", a.rollback_monitoring_minutes));
    }
    out
}
