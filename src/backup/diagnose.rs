//! `imgbuild logs`: diagnostics without SSH. The read-only script run on the instance through SSM
//! Run Command (backup/diagnose.sh), the split of its output into sections, the first failing
//! stack event, a failed bake's failing step, and the redaction every piece passes before it is
//! shown or written to a bundle.

use std::collections::BTreeMap;

use base64::Engine;
use serde::Serialize;

use crate::aws::{self, Clients, code};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::render;

/// The script Run Command executes to collect the instance's side.
pub const DIAGNOSE_SCRIPT: &str = include_str!("../../backup/diagnose.sh");
/// The marker line heading each section of the script's output.
const SECTION: &str = "===== imgbuild-logs ";
const END: &str = "IMGBUILD_LOGS_END ";

/// The one Run Command line that runs the script (base64, as the quiesce script travels: Run
/// Command runs `commands` with /bin/sh), its settings as environment variables.
pub fn diagnose_commands(config: &Config, token: &str, lines: u32) -> Vec<String> {
    let b64 = base64::engine::general_purpose::STANDARD.encode(DIAGNOSE_SCRIPT);
    let lines = lines.to_string();
    let env = [
        ("IMGBUILD_MOUNT_POINT", config.storage.mount_point.as_str()),
        ("IMGBUILD_LOCK_NAME", render::LOCK_NAME),
        ("IMGBUILD_VERSION_NAME", render::VERSION_MARKER),
        ("IMGBUILD_COMPOSE", render::COMPOSE_PATH),
        ("IMGBUILD_REFUSED", render::REFUSED_FILE),
        ("IMGBUILD_INSTALL_MARKER", render::INSTALL_MARKER),
        ("IMGBUILD_LINES", lines.as_str()),
        ("IMGBUILD_TOKEN", token),
    ];
    let env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={}", super::shell_quote(v))).collect();
    vec![format!("echo {b64} | base64 -d | {} bash -s", env.join(" "))]
}

/// The script's output by section name, and whether the end line of this run (its token) came:
/// GetCommandInvocation's StandardOutputContent stops at 24,000 characters (SSM API Reference,
/// GetCommandInvocation), so a long report arrives cut short.
pub fn sections(stdout: &str, token: &str) -> (BTreeMap<String, String>, bool) {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut complete = false;
    for line in stdout.lines() {
        if let Some(name) = line.strip_prefix(SECTION).and_then(|r| r.strip_suffix(" =====")) {
            current = Some(name.to_string());
            out.entry(name.to_string()).or_default();
            continue;
        }
        if line.strip_prefix(END).and_then(|r| r.strip_prefix("token=")) == Some(token) {
            complete = true;
            continue;
        }
        if let Some(c) = &current {
            let text = out.entry(c.clone()).or_default();
            text.push_str(line);
            text.push('\n');
        }
    }
    (out, complete)
}

/// Masks what must never leave the machine in a bug report: values of `AWS_*` variables, the
/// shared credentials file's keys, JSON credential fields (IMDS's security-credentials answer,
/// STS), access key ids, IMDSv2 tokens and Authorization headers.
pub fn redact(text: &str) -> String {
    text.lines().map(redact_line).collect::<Vec<_>>().join("\n") + if text.ends_with('\n') { "\n" } else { "" }
}

const MASK: &str = "<redacted>";

fn redact_line(line: &str) -> String {
    let mut s = line.to_string();
    // KEY=VALUE with an AWS_ name.
    s = mask_after(&s, |rest| {
        let name_len = rest.find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')).unwrap_or(rest.len());
        (rest.starts_with("AWS_") && rest[name_len..].starts_with('=')).then_some(name_len + 1)
    });
    // ini / yaml / header style: name, optional spaces, = or :, optional spaces.
    for key in ["aws_secret_access_key", "aws_session_token", "aws_access_key_id", "x-aws-ec2-metadata-token", "authorization"] {
        s = mask_after(&s, |rest| {
            let lower = rest.get(..key.len())?.to_ascii_lowercase();
            if lower != key {
                return None;
            }
            let after = &rest[key.len()..];
            let spaced = after.len() - after.trim_start().len();
            let sep = after.trim_start().chars().next()?;
            if sep != '=' && sep != ':' {
                return None;
            }
            let value = &after.trim_start()[1..];
            Some(key.len() + spaced + 1 + (value.len() - value.trim_start().len()))
        });
    }
    // JSON: "SecretAccessKey": "...", "Token": "...", "SessionToken": "...", "AccessKeyId": "...".
    for key in ["\"SecretAccessKey\"", "\"SessionToken\"", "\"Token\"", "\"AccessKeyId\""] {
        s = mask_after(&s, |rest| {
            let after = rest.strip_prefix(key)?;
            let t = after.trim_start().strip_prefix(':')?;
            let t2 = t.trim_start().strip_prefix('"')?;
            Some(rest.len() - t2.len())
        });
    }
    // Access key ids anywhere (AKIA / ASIA and 16 more).
    let mut out = String::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < s.len() {
        let id = (s[i..].starts_with("AKIA") || s[i..].starts_with("ASIA"))
            && bytes.len() >= i + 20
            && bytes[i + 4..i + 20].iter().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
            && (i == 0 || !bytes[i - 1].is_ascii_alphanumeric());
        if id {
            out.push_str(MASK);
            i += 20;
        } else {
            let c = s[i..].chars().next().unwrap_or(' ');
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// Replaces, wherever `at` matches (returning where the value starts, relative to the match),
/// the value that follows: up to whitespace, a quote or a comma.
fn mask_after(line: &str, at: impl Fn(&str) -> Option<usize>) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < line.len() {
        let rest = &line[i..];
        let boundary = i == 0 || !line.as_bytes()[i - 1].is_ascii_alphanumeric() && line.as_bytes()[i - 1] != b'_';
        if let Some(start) = boundary.then(|| at(rest)).flatten() {
            let value = &rest[start..];
            let len = value.find(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == ',').unwrap_or(value.len());
            if len > 0 && &value[..len] != MASK {
                out.push_str(&rest[..start]);
                out.push_str(MASK);
                i += start + len;
                continue;
            }
        }
        let c = rest.chars().next().unwrap_or(' ');
        out.push(c);
        i += c.len_utf8();
    }
    out
}

/// The first event of the stack's last operation that failed, oldest first: the cause, where
/// the later failures are its consequences (DescribeStackEvents lists newest first).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FailedEvent {
    pub logical_id: String,
    pub resource_type: String,
    pub status: String,
    pub reason: String,
    pub time: String,
}

/// Reads up to `max_pages` pages of events, back to the start of the latest operation (the
/// stack's own `*_IN_PROGRESS` event), and returns its first failure.
pub async fn first_failed_event(clients: &Clients, stack: &str, max_pages: usize) -> Result<Option<FailedEvent>> {
    let mut events = Vec::new();
    let mut next: Option<String> = None;
    for _ in 0..max_pages {
        let page = match clients.cfn.describe_stack_events().stack_name(stack).set_next_token(next.take()).send().await {
            Ok(p) => p,
            // The stack does not exist.
            Err(e) if e.as_service_error().and_then(code) == Some("ValidationError") => return Ok(None),
            Err(e) => return Err(aws::err("DescribeStackEvents", format!("stack {stack}"), e)),
        };
        let mut start_seen = false;
        for e in page.stack_events() {
            let own = e.logical_resource_id() == Some(stack) && e.resource_type() == Some("AWS::CloudFormation::Stack");
            let status = e.resource_status().map(|s| s.as_str()).unwrap_or_default();
            events.push(e.clone());
            if own && matches!(status, "CREATE_IN_PROGRESS" | "UPDATE_IN_PROGRESS" | "DELETE_IN_PROGRESS" | "IMPORT_IN_PROGRESS") {
                start_seen = true;
                break;
            }
        }
        match page.next_token() {
            Some(t) if !t.is_empty() && !start_seen => next = Some(t.to_string()),
            _ => break,
        }
    }
    Ok(events.iter().rev().find(|e| e.resource_status().is_some_and(|s| s.as_str().ends_with("_FAILED"))).map(|e| FailedEvent {
        logical_id: e.logical_resource_id().unwrap_or_default().to_string(),
        resource_type: e.resource_type().unwrap_or_default().to_string(),
        status: e.resource_status().map(|s| s.as_str().to_string()).unwrap_or_default(),
        reason: e.resource_status_reason().unwrap_or_default().to_string(),
        time: e.timestamp().map(|t| t.to_string()).unwrap_or_default(),
    }))
}

/// The latest execution of the bake's document, when it did not succeed: its failing step, the
/// step's failure message and, for a Run Command step, its output.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FailedBake {
    pub execution: String,
    pub status: String,
    pub step: String,
    pub action: String,
    pub failure: String,
    pub output: String,
}

pub async fn failed_bake(clients: &Clients, document: &str) -> Result<Option<FailedBake>> {
    use aws_sdk_ssm::types::{AutomationExecutionFilter, AutomationExecutionFilterKey};
    let filter =
        AutomationExecutionFilter::builder().key(AutomationExecutionFilterKey::DocumentNamePrefix).values(document).build().expect("key and values set");
    let out = clients
        .ssm
        .describe_automation_executions()
        .filters(filter)
        .send()
        .await
        .map_err(|e| aws::err("DescribeAutomationExecutions", format!("executions of {document}"), e))?;
    let latest = out
        .automation_execution_metadata_list()
        .iter()
        .filter(|m| m.document_name() == Some(document))
        .max_by_key(|m| m.execution_start_time().map(|t| (t.secs(), t.subsec_nanos())).unwrap_or_default());
    let Some(latest) = latest else { return Ok(None) };
    let status = latest.automation_execution_status().map(|s| s.as_str().to_string()).unwrap_or_default();
    if !matches!(status.as_str(), "Failed" | "TimedOut" | "Cancelled") {
        return Ok(None);
    }
    let id = latest.automation_execution_id().unwrap_or_default().to_string();
    let exec = clients
        .ssm
        .get_automation_execution()
        .automation_execution_id(&id)
        .send()
        .await
        .map_err(|e| aws::err("GetAutomationExecution", format!("execution {id}"), e))?;
    let steps = exec.automation_execution().map(|e| e.step_executions()).unwrap_or_default();
    let failed = steps.iter().find(|s| s.step_status().is_some_and(|st| matches!(st.as_str(), "Failed" | "TimedOut" | "Cancelled")));
    let Some(step) = failed else {
        let failure = exec.automation_execution().and_then(|e| e.failure_message()).unwrap_or_default().to_string();
        return Ok(Some(FailedBake { execution: id, status, step: String::new(), action: String::new(), failure, output: String::new() }));
    };
    // aws:runCommand's outputs: CommandId, Status, ResponseCode, Output (AWS Systems Manager
    // User Guide, "aws:runCommand – Run a command on a managed instance", Outputs).
    let output = step.outputs().and_then(|o| o.get("Output")).map(|v| v.join("\n")).unwrap_or_default();
    Ok(Some(FailedBake {
        execution: id,
        status,
        step: step.step_name().unwrap_or_default().to_string(),
        action: step.action().unwrap_or_default().to_string(),
        failure: step.failure_message().unwrap_or_default().to_string(),
        output,
    }))
}

/// The stack's instances in service, newest first: every running one tagged with the stack
/// (the launch template's ImgbuildStackName tag).
pub async fn stack_instances(clients: &Clients, stack: &str) -> Result<Vec<String>> {
    let filter = |name: &str, value: &str| aws_sdk_ec2::types::Filter::builder().name(name).values(value).build();
    let out = clients
        .ec2
        .describe_instances()
        .filters(filter(&format!("tag:{}", render::STACK_TAG), stack))
        .filters(filter("instance-state-name", "running"))
        .send()
        .await
        .map_err(|e| aws::err("DescribeInstances", format!("the instances of stack {stack}"), e))?;
    let mut found: Vec<(i64, String)> = out
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter_map(|i| Some((i.launch_time().map(|t| t.secs()).unwrap_or(0), i.instance_id()?.to_string())))
        .collect();
    found.sort_by(|a, b| b.cmp(a));
    if found.is_empty() {
        return Err(Error::Invalid(format!("stack {stack} has no running instance to collect logs from (`imgbuild status` shows why)")));
    }
    Ok(found.into_iter().map(|(_, id)| id).collect())
}
