//! `imgbuild status` and `imgbuild destroy`: reading the deployed stack, and removing it while
//! keeping the data unless told otherwise.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use crate::aws::{self, Clients, code};
use crate::error::{Error, Result};
use crate::stack::{self, Phase, Waits};
use crate::ui::progress::Progress;

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub time: String,
    pub logical_id: String,
    pub resource_type: String,
    pub status: String,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub instance_id: String,
    pub health: String,
    pub reason: Option<String>,
    pub instance_state: Option<String>,
    pub image_id: Option<String>,
    pub instance_type: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub stack: String,
    pub exists: bool,
    pub status: Option<String>,
    pub reason: Option<String>,
    pub updated: Option<String>,
    pub outputs: BTreeMap<String, String>,
    pub events: Vec<Event>,
    pub targets: Vec<Target>,
}

pub async fn status(clients: &Clients, name: &str, events: usize) -> Result<Status> {
    let Some(s) = stack::describe(&clients.cfn, name).await? else {
        return Ok(Status {
            stack: name.into(),
            exists: false,
            status: None,
            reason: None,
            updated: None,
            outputs: BTreeMap::new(),
            events: Vec::new(),
            targets: Vec::new(),
        });
    };
    let outputs = stack::outputs_of(&s);
    let recent = clients.cfn.describe_stack_events().stack_name(name).send().await.map_err(|e| aws::err("DescribeStackEvents", format!("stack {name}"), e))?;
    let events = recent
        .stack_events()
        .iter()
        .take(events)
        .map(|e| Event {
            time: e.timestamp().map(|t| t.to_string()).unwrap_or_default(),
            logical_id: e.logical_resource_id().unwrap_or_default().into(),
            resource_type: e.resource_type().unwrap_or_default().into(),
            status: e.resource_status().map(|s| s.as_str().to_string()).unwrap_or_default(),
            reason: e.resource_status_reason().map(String::from),
        })
        .collect();
    let targets = match outputs.get("TargetGroupArn") {
        Some(arn) => targets(clients, arn).await?,
        None => Vec::new(),
    };
    Ok(Status {
        stack: name.into(),
        exists: true,
        status: Some(stack::status_of(&s)),
        reason: s.stack_status_reason().map(String::from),
        updated: s.last_updated_time().or(s.creation_time()).map(|t| t.to_string()),
        outputs,
        events,
        targets,
    })
}

/// The target group's view of the instances, joined with EC2's.
async fn targets(clients: &Clients, target_group: &str) -> Result<Vec<Target>> {
    let health = clients
        .elb
        .describe_target_health()
        .target_group_arn(target_group)
        .send()
        .await
        .map_err(|e| aws::err("DescribeTargetHealth", format!("target group {target_group}"), e))?;
    let mut out: Vec<Target> = health
        .target_health_descriptions()
        .iter()
        .filter_map(|d| {
            let id = d.target()?.id()?.to_string();
            let th = d.target_health();
            Some(Target {
                instance_id: id,
                health: th.and_then(|h| h.state()).map(|s| s.as_str().to_string()).unwrap_or_else(|| "unknown".into()),
                reason: th.and_then(|h| h.description()).map(String::from),
                instance_state: None,
                image_id: None,
                instance_type: None,
            })
        })
        .collect();
    if out.is_empty() {
        return Ok(out);
    }
    let described = clients
        .ec2
        .describe_instances()
        .set_instance_ids(Some(out.iter().map(|t| t.instance_id.clone()).collect()))
        .send()
        .await
        .map_err(|e| aws::err("DescribeInstances", "the stack's instances", e))?;
    for inst in described.reservations().iter().flat_map(|r| r.instances()) {
        if let Some(t) = out.iter_mut().find(|t| Some(t.instance_id.as_str()) == inst.instance_id()) {
            t.instance_state = inst.state().and_then(|s| s.name()).map(|n| n.as_str().to_string());
            t.image_id = inst.image_id().map(String::from);
            t.instance_type = inst.instance_type().map(|t| t.as_str().to_string());
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize)]
pub struct Destroyed {
    pub stack: String,
    pub existed: bool,
    /// The file system that was kept (without --delete-data) or deleted (with it).
    pub file_system: Option<String>,
    pub data_deleted: bool,
}

pub async fn destroy(clients: &Clients, name: &str, delete_data: bool, wait_if_busy: bool, waits: Waits, progress: &Progress) -> Result<Destroyed> {
    let Some(s) = stack::describe(&clients.cfn, name).await? else {
        progress.line(&format!("stack {name} does not exist: nothing to destroy"));
        return Ok(Destroyed { stack: name.into(), existed: false, file_system: None, data_deleted: false });
    };
    let status = stack::status_of(&s);
    if stack::phase(&status) == Phase::InProgress {
        if !wait_if_busy {
            return Err(Error::Invalid(format!("stack {name} is {status}: wait for it to finish (or pass --wait)")));
        }
        let mut f = stack::EventFollower::start(&clients.cfn, name).await?;
        stack::wait_stable(&clients.cfn, name, &mut f, waits, progress).await?;
    }
    let file_system = stack::outputs_of(&s).get("FileSystemId").cloned();
    // DeleteStack fails on a protected stack; the command asked before getting here.
    stack::protect::set_termination(&clients.cfn, &s, false, progress).await?;
    progress.set(&format!("deleting stack {name}"));
    stack::delete_and_wait(&clients.cfn, name, waits, progress).await?;
    progress.line(&format!("stack {name} deleted"));

    let mut data_deleted = false;
    if let Some(fs) = &file_system {
        if delete_data {
            delete_file_system(clients, fs, waits, progress).await?;
            data_deleted = true;
            progress.line(&format!("EFS file system {fs} and all Chroma data on it deleted (--delete-data)"));
        } else {
            progress.line(&format!(
                "kept EFS file system {fs} with the Chroma data (the stack retains it). A new deploy does not reuse it by itself: \
                 set efs.file_system_id: {fs} to reattach it. To delete it for good: aws efs delete-file-system --file-system-id {fs}"
            ));
        }
    }
    Ok(Destroyed { stack: name.into(), existed: true, file_system, data_deleted })
}

/// Deletes a file system once its mount targets (removed with the stack) are gone.
async fn delete_file_system(clients: &Clients, fs: &str, waits: Waits, progress: &Progress) -> Result<()> {
    let deadline = Instant::now() + waits.timeout;
    loop {
        match clients.efs.delete_file_system().file_system_id(fs).send().await {
            Ok(_) => return Ok(()),
            Err(e) if e.as_service_error().and_then(code) == Some("FileSystemNotFound") => return Ok(()),
            Err(e) if e.as_service_error().and_then(code) == Some("FileSystemInUse") && Instant::now() < deadline => {
                progress.set(&format!("waiting for the mount targets of {fs} to go"));
                tokio::time::sleep(waits.poll).await;
            }
            Err(e) => return Err(aws::err("DeleteFileSystem", format!("file system {fs}"), e)),
        }
    }
}
