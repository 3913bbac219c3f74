//! `imgbuild status` and `imgbuild destroy`: reading the deployed stack, and removing it while
//! keeping the data unless told otherwise.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use crate::aws::{self, Clients, code};
use crate::error::{Error, Result};
use crate::stack::alarms;
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
    /// The stack's alarms (its `AlarmArns` output) with their states; `missing` for one that no
    /// longer exists.
    pub alarms: Vec<alarms::AlarmState>,
    /// Why the alarms' states could not be read (a refused DescribeAlarms); the rest still shows.
    pub alarms_error: Option<String>,
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
            alarms: Vec::new(),
            alarms_error: None,
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
    let arns = alarms::arns_of(&s);
    let (alarms, alarms_error) = if arns.is_empty() {
        (Vec::new(), None)
    } else {
        match alarms::states(clients, &arns).await {
            Ok(found) => (
                arns.iter()
                    .map(|a| {
                        found.iter().find(|f| f.arn == *a || f.name == alarms::name_of(a)).cloned().unwrap_or_else(|| alarms::AlarmState {
                            name: alarms::name_of(a).to_string(),
                            arn: a.clone(),
                            state: "missing".into(),
                            reason: "DescribeAlarms does not know it (deleted outside the stack?); the next deploy puts it back".into(),
                            updated: None,
                        })
                    })
                    .collect(),
                None,
            ),
            Err(e) => (Vec::new(), Some(e.to_string())),
        }
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
        alarms,
        alarms_error,
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
    /// The stack's current file system (its `FileSystemId` output), kept or deleted.
    pub file_system: Option<String>,
    /// Every file system of the stack, the current one and those earlier attempts retained
    /// (a create that rolled back keeps its file system but leaves no outputs): kept without
    /// --delete-data, deleted with it.
    pub file_systems: Vec<String>,
    pub data_deleted: bool,
}

pub async fn destroy(clients: &Clients, name: &str, delete_data: bool, wait_if_busy: bool, waits: Waits, progress: &Progress) -> Result<Destroyed> {
    let Some(s) = stack::describe(&clients.cfn, name).await? else {
        let retained = retained_or_warn(clients, name, None, progress).await;
        if retained.is_empty() {
            progress.line(&format!("stack {name} does not exist: nothing to destroy"));
        } else {
            progress.line(&format!("stack {name} does not exist, but earlier attempts retained file systems"));
        }
        let data_deleted = settle_file_systems(clients, &retained, delete_data, waits, progress).await?;
        return Ok(Destroyed { stack: name.into(), existed: false, file_system: None, file_systems: retained, data_deleted });
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
    let project = s.tags().iter().find(|t| t.key() == Some(PROJECT_TAG)).and_then(|t| t.value()).map(String::from);
    // DeleteStack fails on a protected stack; the command asked before getting here.
    stack::protect::set_termination(&clients.cfn, &s, false, progress).await?;
    progress.set(&format!("deleting stack {name}"));
    stack::delete_and_wait(&clients.cfn, name, waits, progress).await?;
    progress.line(&format!("stack {name} deleted"));

    let mut file_systems: Vec<String> = file_system.iter().cloned().collect();
    file_systems.extend(retained_or_warn(clients, name, project.as_deref(), progress).await);
    file_systems.sort();
    file_systems.dedup();
    let data_deleted = settle_file_systems(clients, &file_systems, delete_data, waits, progress).await?;
    Ok(Destroyed { stack: name.into(), existed: true, file_system, file_systems, data_deleted })
}

/// The retained file systems, or none with a warning when EFS cannot be asked (no permission):
/// the stack is gone by then, and the one its outputs named is still reported.
async fn retained_or_warn(clients: &Clients, name: &str, project: Option<&str>, progress: &Progress) -> Vec<String> {
    match stack_file_systems(clients, name, project).await {
        Ok(found) => found,
        Err(e) => {
            progress.line(&format!("warning: could not look for file systems stack {name} retained ({e}); check with `aws efs describe-file-systems`"));
            Vec::new()
        }
    }
}

/// Deletes a stack that holds no data (the bake's prerequisites): no file systems are looked
/// for, since that stack shares the project tag with the product's stack and its data.
pub async fn destroy_stack_only(clients: &Clients, name: &str, wait_if_busy: bool, waits: Waits, progress: &Progress) -> Result<bool> {
    let Some(s) = stack::describe(&clients.cfn, name).await? else {
        progress.line(&format!("stack {name} does not exist: nothing to destroy"));
        return Ok(false);
    };
    let status = stack::status_of(&s);
    if stack::phase(&status) == Phase::InProgress {
        if !wait_if_busy {
            return Err(Error::Invalid(format!("stack {name} is {status}: wait for it to finish (or pass --wait)")));
        }
        let mut f = stack::EventFollower::start(&clients.cfn, name).await?;
        stack::wait_stable(&clients.cfn, name, &mut f, waits, progress).await?;
    }
    progress.set(&format!("deleting stack {name}"));
    stack::delete_and_wait(&clients.cfn, name, waits, progress).await?;
    progress.line(&format!("stack {name} deleted"));
    Ok(true)
}

/// The tag imgbuild puts on the stack; CloudFormation propagates stack tags to the resources it
/// creates.
const PROJECT_TAG: &str = "imgbuild:project";

/// Deletes the file systems with --delete-data, else says each is kept and how to reuse or
/// remove it. True when something was deleted.
async fn settle_file_systems(clients: &Clients, file_systems: &[String], delete_data: bool, waits: Waits, progress: &Progress) -> Result<bool> {
    for fs in file_systems {
        if delete_data {
            delete_file_system(clients, fs, waits, progress).await?;
            progress.line(&format!("EFS file system {fs} and all Chroma data on it deleted (--delete-data)"));
        } else {
            progress.line(&format!(
                "kept EFS file system {fs} with the Chroma data (the stack retains it). A new deploy does not reuse it by itself: \
                 set efs.file_system_id: {fs} to reattach it. To delete it for good: aws efs delete-file-system --file-system-id {fs}"
            ));
        }
    }
    Ok(delete_data && !file_systems.is_empty())
}

/// File systems the stack (under this name, now or in an earlier attempt) created and retained,
/// found by the tags CloudFormation puts on what it creates: `aws:cloudformation:stack-name`, and
/// the stack's own `imgbuild:project` tag. The stack's outputs are not enough: a create that
/// rolled back has none, yet `DeletionPolicy: Retain` kept its file system. DescribeFileSystems
/// takes no tag filter, so every page is read (EFS API reference, DescribeFileSystems: `Tags`
/// and `LifeCycleState` on each `FileSystemDescription`, `NextMarker` to page).
pub async fn stack_file_systems(clients: &Clients, stack_name: &str, project: Option<&str>) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for fs in stack::efs::every_file_system(clients, &format!("file systems of stack {stack_name}")).await? {
        let tag = |key: &str| fs.tags().iter().find(|t| t.key() == key).map(|t| t.value());
        let ours = tag("aws:cloudformation:stack-name") == Some(stack_name) || (project.is_some() && tag(PROJECT_TAG) == project);
        let gone = matches!(fs.life_cycle_state().as_str(), "deleting" | "deleted");
        if ours && !gone {
            found.push(fs.file_system_id().to_string());
        }
    }
    found.sort();
    Ok(found)
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
