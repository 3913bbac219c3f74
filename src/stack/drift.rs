//! Drift: what changed in the stack's resources outside CloudFormation (DetectStackDrift), and
//! which of those changes a change set is about to overwrite with the template's values.

use std::time::Instant;

use aws_sdk_cloudformation::Client;
use aws_sdk_cloudformation::types::{StackDriftDetectionStatus, StackResourceDriftStatus};
use serde::Serialize;

use crate::aws;
use crate::error::{Error, Result};
use crate::stack::{Change, Waits};
use crate::ui::progress::Progress;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PropertyDifference {
    pub path: String,
    pub expected: Option<String>,
    pub actual: Option<String>,
    /// ADD, REMOVE or NOT_EQUAL.
    pub kind: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Drifted {
    pub logical_id: String,
    pub resource_type: String,
    /// MODIFIED or DELETED.
    pub status: String,
    pub differences: Vec<PropertyDifference>,
}

impl Drifted {
    pub fn line(&self) -> String {
        let what: Vec<String> = self
            .differences
            .iter()
            .map(|d| format!("{} {} -> {}", d.path, d.expected.as_deref().unwrap_or("(none)"), d.actual.as_deref().unwrap_or("(none)")))
            .collect();
        let detail = if what.is_empty() { String::new() } else { format!(": {}", what.join("; ")) };
        format!("{} ({}) {}{detail}", self.logical_id, self.resource_type, self.status)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Drift {
    pub stack: String,
    /// IN_SYNC, DRIFTED, NOT_CHECKED or UNKNOWN.
    pub status: String,
    /// DETECTION_COMPLETE, or DETECTION_FAILED when some resources could not be checked.
    pub detection: String,
    pub reason: Option<String>,
    pub drifted: Vec<Drifted>,
}

/// Runs drift detection on the stack and waits for it, within `waits.timeout`; then reads the
/// resources found MODIFIED or DELETED. Shapes: aws-cli examples/cloudformation/
/// detect-stack-drift.rst, describe-stack-drift-detection-status.rst,
/// describe-stack-resource-drifts.rst.
pub async fn detect(cfn: &Client, stack: &str, waits: Waits, progress: &Progress) -> Result<Drift> {
    let started = cfn.detect_stack_drift().stack_name(stack).send().await.map_err(|e| aws::err("DetectStackDrift", format!("stack {stack}"), e))?;
    let id = started.stack_drift_detection_id().unwrap_or_default().to_string();
    let deadline = Instant::now() + waits.timeout;
    let status = loop {
        let out = cfn
            .describe_stack_drift_detection_status()
            .stack_drift_detection_id(&id)
            .send()
            .await
            .map_err(|e| aws::err("DescribeStackDriftDetectionStatus", format!("drift detection {id} of stack {stack}"), e))?;
        if out.detection_status() != Some(&StackDriftDetectionStatus::DetectionInProgress) {
            break out;
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!("drift detection {id} of stack {stack}"),
                secs: waits.timeout.as_secs(),
                hint: "it goes on in CloudFormation; `aws cloudformation describe-stack-drift-detection-status` follows it".into(),
            });
        }
        progress.set(&format!("detecting drift of stack {stack}"));
        tokio::time::sleep(waits.poll).await;
    };
    let mut drifted = Vec::new();
    let mut token = None;
    loop {
        let out = cfn
            .describe_stack_resource_drifts()
            .stack_name(stack)
            .stack_resource_drift_status_filters(StackResourceDriftStatus::Modified)
            .stack_resource_drift_status_filters(StackResourceDriftStatus::Deleted)
            .set_next_token(token)
            .send()
            .await
            .map_err(|e| aws::err("DescribeStackResourceDrifts", format!("stack {stack}"), e))?;
        drifted.extend(out.stack_resource_drifts().iter().map(|d| {
            Drifted {
                logical_id: d.logical_resource_id().unwrap_or_default().to_string(),
                resource_type: d.resource_type().unwrap_or_default().to_string(),
                status: d.stack_resource_drift_status().map(|s| s.as_str().to_string()).unwrap_or_default(),
                differences: d
                    .property_differences()
                    .iter()
                    .map(|p| PropertyDifference {
                        path: p.property_path().unwrap_or_default().to_string(),
                        expected: p.expected_value().map(String::from),
                        actual: p.actual_value().map(String::from),
                        kind: p.difference_type().map(|k| k.as_str().to_string()).unwrap_or_default(),
                    })
                    .collect(),
            }
        }));
        token = out.next_token().map(String::from);
        if token.is_none() {
            break;
        }
    }
    Ok(Drift {
        stack: stack.into(),
        status: status.stack_drift_status().map(|s| s.as_str().to_string()).unwrap_or_else(|| "UNKNOWN".into()),
        detection: status.detection_status().map(|s| s.as_str().to_string()).unwrap_or_default(),
        reason: status.detection_status_reason().map(String::from),
        drifted,
    })
}

/// The drifted resources a change set modifies or removes: CloudFormation puts the template's
/// values back on those, undoing whatever was changed by hand. Resources the change set does not
/// touch keep their drift.
pub fn overwritten<'a>(drift: &'a Drift, changes: &[Change]) -> Vec<&'a Drifted> {
    drift.drifted.iter().filter(|d| changes.iter().any(|c| c.logical_id == d.logical_id && matches!(c.action, '~' | '-'))).collect()
}
