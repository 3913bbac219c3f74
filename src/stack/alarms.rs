//! The stack's CloudWatch alarms: the rollback triggers deploy hands CloudFormation with an
//! update's change set (their ARNs come from the stack's `AlarmArns` output), their states for
//! `status` (DescribeAlarms), and which of them rolled an update back.

use aws_sdk_cloudformation::types::{RollbackConfiguration, RollbackTrigger, Stack};
use serde::Serialize;

use crate::aws::{self, Clients};
use crate::error::Result;
use crate::ui::progress::Progress;

/// CloudFormation takes at most five rollback triggers ("Monitor and Roll Back Stack
/// Operations", CloudFormation User Guide: "You can add a maximum of five rollback triggers").
pub const MAX_TRIGGERS: usize = 5;

/// The stack output listing the alarms' ARNs, comma-separated (`infra/stack.yaml`).
pub const OUTPUT: &str = "AlarmArns";
/// The trigger type for a metric alarm (RollbackTrigger, CloudFormation API reference).
pub const TRIGGER_TYPE: &str = "AWS::CloudWatch::Alarm";

/// What a deploy asks of the stack's rollback configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Rollback {
    /// Send none: CloudFormation keeps applying whatever triggers the stack has saved
    /// (the bake's prerequisites stack, which has no alarms).
    #[default]
    Untouched,
    /// `alarms.enabled: false` or `--no-rollback-triggers`: an empty trigger list, which removes
    /// saved triggers (an empty list "removes all currently specified triggers",
    /// RollbackConfiguration).
    Off,
    /// Watch the stack's alarms during the update and this long after it.
    Watch { minutes: u32 },
}

/// The triggers one change set carries, for the diff's text and `--output json`.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Watch {
    /// Alarm ARNs, each a trigger of type AWS::CloudWatch::Alarm.
    pub triggers: Vec<String>,
    /// MonitoringTimeInMinutes sent, when any.
    pub monitoring_minutes: Option<u32>,
}

impl Watch {
    pub fn configuration(&self) -> RollbackConfiguration {
        let triggers = self.triggers.iter().map(|arn| RollbackTrigger::builder().arn(arn).r#type(TRIGGER_TYPE).build()).collect();
        RollbackConfiguration::builder().set_rollback_triggers(Some(triggers)).set_monitoring_time_in_minutes(self.monitoring_minutes.map(|m| m as i32)).build()
    }
}

/// The alarm ARNs a deployed stack names in its output.
pub fn arns_of(stack: &Stack) -> Vec<String> {
    crate::stack::outputs_of(stack).get(OUTPUT).map(|v| v.split(',').map(str::trim).filter(|a| !a.is_empty()).map(String::from).collect()).unwrap_or_default()
}

/// `arn:aws:cloudwatch:REGION:ACCOUNT:alarm:NAME` -> NAME.
pub fn name_of(arn: &str) -> &str {
    arn.split_once(":alarm:").map_or(arn, |(_, n)| n)
}

/// Decides the rollback configuration of one change set. Rollback triggers must exist when the
/// operation starts: "If a specified trigger is missing, the entire stack operation fails and is
/// rolled back" (RollbackTrigger, CloudFormation API reference). So a create (the alarms are made
/// by it) and an update of a stack that has no alarms yet watch nothing, and an alarm that was
/// deleted by hand is left out, each said in `notices`.
pub async fn plan(
    clients: &Clients,
    existing: Option<&Stack>,
    is_create: bool,
    rollback: Rollback,
    progress: &Progress,
    notices: &mut Vec<String>,
) -> Option<Watch> {
    let mut say = |s: String| {
        progress.line(&s);
        notices.push(s);
    };
    match rollback {
        Rollback::Untouched => None,
        Rollback::Off if is_create => None,
        Rollback::Off => Some(Watch::default()),
        Rollback::Watch { .. } if is_create => {
            say("rollback triggers: none for a create (the stack makes its alarms); later updates are watched".into());
            None
        }
        Rollback::Watch { minutes } => {
            let arns = existing.map(arns_of).unwrap_or_default();
            if arns.is_empty() {
                say("rollback triggers: none, the deployed stack has no alarms yet (this update adds them); later updates are watched".into());
                return Some(Watch::default());
            }
            let triggers = match states(clients, &arns).await {
                Ok(found) => {
                    for s in found.iter().filter(|s| s.state == "ALARM") {
                        say(format!(
                            "warning: alarm {} is in ALARM now ({}): as a rollback trigger it rolls this update back unless it recovers first; `--no-rollback-triggers` deploys without the triggers",
                            s.name, s.reason
                        ));
                    }
                    let (present, missing): (Vec<String>, Vec<String>) =
                        arns.into_iter().partition(|a| found.iter().any(|s| s.arn == *a || s.name == name_of(a)));
                    for a in &missing {
                        say(format!(
                            "warning: alarm {} is gone (deleted outside the stack?); it is not a rollback trigger for this update, as a missing trigger fails the whole update; this update puts it back",
                            name_of(a)
                        ));
                    }
                    present
                }
                // Unverified triggers still watch: the stack made them and normally still has them.
                Err(e) => {
                    say(format!("warning: could not check the alarms exist ({e}); using them as rollback triggers anyway"));
                    arns
                }
            };
            // A template of the user's may list more alarms than CloudFormation takes: a sixth
            // trigger would make CreateChangeSet fail, so the first five watch, and it is said.
            let mut triggers = triggers;
            if triggers.len() > MAX_TRIGGERS {
                let left: Vec<String> = triggers.split_off(MAX_TRIGGERS).iter().map(|a| name_of(a).to_string()).collect();
                say(format!(
                    "warning: the stack names {} alarms; CloudFormation takes at most {MAX_TRIGGERS} rollback triggers, so {} do not watch this update",
                    MAX_TRIGGERS + left.len(),
                    left.join(", ")
                ));
            }
            let names: Vec<&str> = triggers.iter().map(|a| name_of(a)).collect();
            progress.line(&format!(
                "rollback triggers: {} (an alarm in ALARM during the update or {minutes} min after it rolls the update back)",
                if names.is_empty() { "none".to_string() } else { names.join(", ") }
            ));
            Some(Watch { triggers, monitoring_minutes: Some(minutes) })
        }
    }
}

/// One alarm as DescribeAlarms reports it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AlarmState {
    pub name: String,
    pub arn: String,
    /// OK, ALARM or INSUFFICIENT_DATA.
    pub state: String,
    pub reason: String,
    pub updated: Option<String>,
}

/// The states of these alarms (DescribeAlarms by name, 100 names a call, paginated by NextToken).
/// Alarms that no longer exist are simply absent.
pub async fn states(clients: &Clients, arns: &[String]) -> Result<Vec<AlarmState>> {
    let mut out = Vec::new();
    for chunk in arns.chunks(100) {
        let names: Vec<String> = chunk.iter().map(|a| name_of(a).to_string()).collect();
        let mut token: Option<String> = None;
        loop {
            let page = clients
                .cloudwatch
                .describe_alarms()
                .set_alarm_names(Some(names.clone()))
                .set_next_token(token.clone())
                .send()
                .await
                .map_err(|e| aws::err("DescribeAlarms", format!("alarms {}", names.join(", ")), e))?;
            for a in page.metric_alarms() {
                out.push(AlarmState {
                    name: a.alarm_name().unwrap_or_default().to_string(),
                    arn: a.alarm_arn().unwrap_or_default().to_string(),
                    state: a.state_value().map(|s| s.as_str().to_string()).unwrap_or_default(),
                    reason: a.state_reason().unwrap_or_default().to_string(),
                    updated: a.state_updated_timestamp().and_then(|t| t.fmt(aws_smithy_types::date_time::Format::DateTime).ok()),
                });
            }
            token = page.next_token().map(String::from);
            if token.is_none() {
                break;
            }
        }
    }
    Ok(out)
}

/// After an update that rolled back: the trigger alarms that caused it. The stack's own events
/// name the alarm (its ARN or name in the reason, whatever the wording); failing that, the
/// triggers that are in ALARM now.
pub async fn fired(clients: &Clients, watch: &Watch, stack_reasons: &[String]) -> Vec<String> {
    let named: Vec<&String> = watch.triggers.iter().filter(|a| stack_reasons.iter().any(|r| r.contains(a.as_str()) || r.contains(name_of(a)))).collect();
    let mut out: Vec<String> = named.iter().map(|a| name_of(a).to_string()).collect();
    if out.is_empty()
        && let Ok(states) = states(clients, &watch.triggers).await
    {
        out = states.into_iter().filter(|s| s.state == "ALARM").map(|s| format!("{} ({})", s.name, s.reason)).collect();
    }
    out
}
