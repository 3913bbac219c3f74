//! `imgbuild gc`: what earlier runs left behind, found by the project's tags. Against moto where
//! it emulates the calls (EC2 snapshots and images, CloudFormation stacks and change sets, EFS);
//! the build-instance check asks SSM Automation, which moto does not implement (REFERENCE.md,
//! "Does not: SSM Automation executions"), so that part answers from scripted shapes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_smithy_mocks::{Rule, mock};
use aws_smithy_types::retry::RetryConfig;

use imgbuild::aws::Clients;
use imgbuild::bake::gc::{self, Kind, Scope};

use crate::services;
use crate::support::imgbuild;
use crate::support::{moto_cmd as cmd, rt};

/// A trivial stack whose FileSystemId parameter names a file system it uses, as the product's
/// stack does when it reattaches one (infra/stack.yaml, Parameters: FileSystemId).
const TEMPLATE: &str = r#"{"Parameters": {"FileSystemId": {"Type": "String", "Default": ""}},
 "Resources": {"Topic": {"Type": "AWS::SNS::Topic"}}}"#;

fn project(name: &str) -> tempfile::TempDir {
    crate::support::moto_project(name, "")
}

async fn sdk(url: &str) -> aws_config::SdkConfig {
    crate::support::moto_sdk(url, "us-east-1").await
}

fn ec2_tags(kind: aws_sdk_ec2::types::ResourceType, project: &str) -> aws_sdk_ec2::types::TagSpecification {
    aws_sdk_ec2::types::TagSpecification::builder()
        .resource_type(kind)
        .tags(aws_sdk_ec2::types::Tag::builder().key("imgbuild:project").value(project).build())
        .build()
}

struct Made {
    orphan_snapshot: String,
    image_snapshot: String,
    foreign_snapshot: String,
    change_set: String,
    kept_fs: String,
    used_fs: String,
}

/// What earlier runs of `p` leave: a snapshot whose image was deregistered, a snapshot an image
/// still uses, another project's snapshot, a live stack with a change set nobody executed (its
/// FileSystemId parameter naming a file system), the bake stack stuck in REVIEW_IN_PROGRESS
/// (a create change set never executed), and a file system destroy kept.
fn leave_behind(url: &str, p: &str) -> Made {
    rt().block_on(async {
        let conf = sdk(url).await;
        let ec2 = aws_sdk_ec2::Client::new(&conf);
        let cfn = aws_sdk_cloudformation::Client::new(&conf);
        let efs = aws_sdk_efs::Client::new(&conf);
        let snapshot = |project: String| {
            let ec2 = ec2.clone();
            async move {
                let vol = ec2.create_volume().availability_zone("us-east-1a").size(8).send().await.unwrap();
                let s = ec2
                    .create_snapshot()
                    .volume_id(vol.volume_id().unwrap())
                    .tag_specifications(ec2_tags(aws_sdk_ec2::types::ResourceType::Snapshot, &project))
                    .send()
                    .await
                    .unwrap();
                s.snapshot_id().unwrap().to_string()
            }
        };
        let orphan_snapshot = snapshot(p.to_string()).await;
        let foreign_snapshot = snapshot(format!("{p}-other")).await;
        // moto's RegisterImage makes the image's snapshot itself (ignoring the mappings sent);
        // it gets the project tag as bake's tag-on-create gives it (images/bake.yaml).
        let image = ec2.register_image().name(format!("{p}-image")).root_device_name("/dev/xvda").send().await.unwrap();
        let described = ec2.describe_images().image_ids(image.image_id().unwrap()).send().await.unwrap();
        let image_snapshot =
            described.images()[0].block_device_mappings()[0].ebs().and_then(|e| e.snapshot_id()).expect("moto gives the image a snapshot").to_string();
        ec2.create_tags().resources(&image_snapshot).tags(aws_sdk_ec2::types::Tag::builder().key("imgbuild:project").value(p).build()).send().await.unwrap();

        let fs = |creation: &str| {
            let efs = efs.clone();
            let creation = creation.to_string();
            let p = p.to_string();
            async move {
                efs.create_file_system()
                    .creation_token(creation)
                    .encrypted(true)
                    .tags(aws_sdk_efs::types::Tag::builder().key("imgbuild:project").value(p).build().unwrap())
                    .send()
                    .await
                    .unwrap()
                    .file_system_id()
                    .to_string()
            }
        };
        let kept_fs = fs(&format!("{p}-kept")).await;
        let used_fs = fs(&format!("{p}-used")).await;

        let tag = aws_sdk_cloudformation::types::Tag::builder().key("imgbuild:project").value(p).build();
        let param = |v: &str| aws_sdk_cloudformation::types::Parameter::builder().parameter_key("FileSystemId").parameter_value(v).build();
        cfn.create_stack().stack_name(p).template_body(TEMPLATE).parameters(param(&used_fs)).tags(tag.clone()).send().await.unwrap();
        let cs = cfn
            .create_change_set()
            .stack_name(p)
            .change_set_name(format!("imgbuild-{p}-left"))
            .change_set_type(aws_sdk_cloudformation::types::ChangeSetType::Update)
            .template_body(TEMPLATE.replace("Topic", "Topic2"))
            .parameters(param(&used_fs))
            .tags(tag.clone())
            .send()
            .await
            .unwrap();
        cfn.create_change_set()
            .stack_name(format!("{p}-bake"))
            .change_set_name(format!("imgbuild-{p}-bake"))
            .change_set_type(aws_sdk_cloudformation::types::ChangeSetType::Create)
            .template_body(TEMPLATE)
            .tags(tag)
            .send()
            .await
            .unwrap();
        Made { orphan_snapshot, image_snapshot, foreign_snapshot, change_set: cs.id().unwrap().to_string(), kept_fs, used_fs }
    })
}

fn ids(doc: &serde_json::Value, key: &str) -> Vec<(String, String)> {
    doc[key].as_array().unwrap().iter().map(|o| (o["kind"].as_str().unwrap().to_string(), o["id"].as_str().unwrap().to_string())).collect()
}

fn snapshot_exists(url: &str, id: &str) -> bool {
    rt().block_on(async {
        let ec2 = aws_sdk_ec2::Client::new(&sdk(url).await);
        ec2.describe_snapshots().snapshot_ids(id).send().await.is_ok_and(|o| !o.snapshots().is_empty())
    })
}

fn fs_exists(url: &str, id: &str) -> bool {
    rt().block_on(async {
        let efs = aws_sdk_efs::Client::new(&sdk(url).await);
        efs.describe_file_systems().file_system_id(id).send().await.is_ok_and(|o| !o.file_systems().is_empty())
    })
}

fn stack_exists(url: &str, name: &str) -> bool {
    rt().block_on(async {
        let cfn = aws_sdk_cloudformation::Client::new(&sdk(url).await);
        cfn.describe_stacks()
            .stack_name(name)
            .send()
            .await
            .is_ok_and(|o| o.stacks().iter().any(|s| s.stack_status().map(|x| x.as_str()) != Some("DELETE_COMPLETE")))
    })
}

fn change_set_exists(url: &str, stack: &str, id: &str) -> bool {
    rt().block_on(async {
        let cfn = aws_sdk_cloudformation::Client::new(&sdk(url).await);
        cfn.describe_change_set().stack_name(stack).change_set_name(id).send().await.is_ok()
    })
}

#[test]
fn gc_lists_then_removes_only_what_the_project_left_and_file_systems_only_with_delete_data() {
    let Some(moto) = services::moto() else { return };
    let p = "gcleft";
    let dir = project(p);
    let made = leave_behind(&moto.url, p);

    // Without a terminal and without --dry-run or --yes, gc refuses before any AWS call and
    // names the flags to pass.
    let out = cmd(dir.path(), &moto.url).args(["gc"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--dry-run") && err.contains("--yes"), "{err}");

    // --dry-run: the orphan snapshot, the unexecuted change set and the empty stack would go;
    // the file system is older than 0s but kept without --delete-data; the snapshot an image
    // uses, another project's snapshot and the file system a live stack names are not listed.
    let out = cmd(dir.path(), &moto.url).args(["--output", "json", "gc", "--dry-run", "--older-than", "0s"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut would = ids(&doc, "would_remove");
    would.sort();
    let mut want = vec![
        ("snapshot".to_string(), made.orphan_snapshot.clone()),
        ("change_set".to_string(), made.change_set.clone()),
        ("empty_stack".to_string(), format!("{p}-bake")),
    ];
    want.sort();
    assert_eq!(would, want, "{doc}");
    assert_eq!(ids(&doc, "kept"), vec![("file_system".to_string(), made.kept_fs.clone())], "{doc}");
    assert_eq!(ids(&doc, "removed"), vec![]);
    assert!(snapshot_exists(&moto.url, &made.orphan_snapshot), "a dry run removed something");

    // The default age (30d) leaves a file system made just now out altogether.
    let out = cmd(dir.path(), &moto.url).args(["--output", "json", "gc", "--dry-run"]).output().unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["older_than_secs"], 30 * 86_400);
    assert!(ids(&doc, "kept").is_empty(), "{doc}");

    // --yes removes what was listed, says so, and keeps the data.
    let out = cmd(dir.path(), &moto.url).args(["--output", "json", "gc", "--yes", "--older-than", "0s"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut removed = ids(&doc, "removed");
    removed.sort();
    assert_eq!(removed, want, "{doc}");
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("removed snapshot {}", made.orphan_snapshot)));
    assert!(!snapshot_exists(&moto.url, &made.orphan_snapshot));
    assert!(!change_set_exists(&moto.url, p, &made.change_set));
    assert!(!stack_exists(&moto.url, &format!("{p}-bake")));
    assert!(stack_exists(&moto.url, p), "the live stack must stay");
    assert!(snapshot_exists(&moto.url, &made.image_snapshot) && snapshot_exists(&moto.url, &made.foreign_snapshot));
    assert!(fs_exists(&moto.url, &made.kept_fs), "a file system went without --delete-data");

    // --delete-data takes the kept file system, never the one the live stack names.
    let out = cmd(dir.path(), &moto.url).args(["--output", "json", "gc", "--yes", "--delete-data", "--older-than", "0s"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ids(&doc, "removed"), vec![("file_system".to_string(), made.kept_fs.clone())], "{doc}");
    assert!(!fs_exists(&moto.url, &made.kept_fs));
    assert!(fs_exists(&moto.url, &made.used_fs));
}

#[test]
fn gc_ages_are_a_number_and_a_unit() {
    assert_eq!(gc::parse_age("30d"), Ok(Duration::from_secs(30 * 86_400)));
    assert_eq!(gc::parse_age("12h"), Ok(Duration::from_secs(12 * 3_600)));
    assert_eq!(gc::parse_age("0s"), Ok(Duration::ZERO));
    assert!(gc::parse_age("30").is_err() && gc::parse_age("d").is_err() && gc::parse_age("5w").is_err());
    let dir = project("gcage");
    let out = imgbuild(dir.path()).args(["gc", "--dry-run", "--older-than", "soon"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--older-than"));
}

// ---- build instances: scripted answers (SSM Automation is not in moto) ----

const PROJECT: &str = "vectordb";
const RUNNING_TOKEN: &str = "1700000000-000000001";
const DEAD_TOKEN: &str = "1690000000-000000002";
const EXEC: &str = "4105a4fc-f944-11e6-9d32-8fb2db27a909";

fn retry() -> RetryConfig {
    RetryConfig::standard().with_initial_backoff(Duration::from_millis(1))
}

/// DescribeInstances in the shape of aws-cli awscli/examples/ec2/describe-instances.rst
/// (Reservations[].Instances[] with InstanceId, State.Name, Tags), as bake's runInstances step
/// tags them (images/bake.yaml: imgbuild:project, imgbuild:bake-token).
fn build_instances() -> Rule {
    mock!(aws_sdk_ec2::Client::describe_instances)
        .match_requests(|r| r.filters().iter().any(|f| f.name() == Some("tag:imgbuild:project") && f.values() == [PROJECT]))
        .then_output(|| {
            use aws_sdk_ec2::types::{Instance, InstanceState, InstanceStateName, Reservation, Tag};
            let inst = |id: &str, token: &str, state: InstanceStateName| {
                Instance::builder()
                    .instance_id(id)
                    .state(InstanceState::builder().name(state).build())
                    .tags(Tag::builder().key("imgbuild:project").value(PROJECT).build())
                    .tags(Tag::builder().key("imgbuild:bake-token").value(token).build())
                    .build()
            };
            aws_sdk_ec2::operation::describe_instances::DescribeInstancesOutput::builder()
                .reservations(
                    Reservation::builder()
                        .instances(inst("i-0aaaaaaaaaaaaaaa1", RUNNING_TOKEN, InstanceStateName::Running))
                        .instances(inst("i-0bbbbbbbbbbbbbbb2", DEAD_TOKEN, InstanceStateName::Stopped))
                        .build(),
                )
                .build()
        })
}

/// aws-cli awscli/examples/ssm/describe-automation-executions.rst: AutomationExecutionMetadataList
/// with AutomationExecutionId, DocumentName, AutomationExecutionStatus.
fn running_executions() -> Rule {
    mock!(aws_sdk_ssm::Client::describe_automation_executions).then_output(|| {
        aws_sdk_ssm::operation::describe_automation_executions::DescribeAutomationExecutionsOutput::builder()
            .automation_execution_metadata_list(
                aws_sdk_ssm::types::AutomationExecutionMetadata::builder()
                    .automation_execution_id(EXEC)
                    .document_name(format!("imgbuild-{PROJECT}-bake"))
                    .automation_execution_status(aws_sdk_ssm::types::AutomationExecutionStatus::Inprogress)
                    .build(),
            )
            .build()
    })
}

/// aws-cli awscli/examples/ssm/get-automation-execution.rst: AutomationExecution.Parameters, a
/// map of parameter name to a list of values.
fn execution_parameters() -> Rule {
    mock!(aws_sdk_ssm::Client::get_automation_execution).then_output(|| {
        aws_sdk_ssm::operation::get_automation_execution::GetAutomationExecutionOutput::builder()
            .automation_execution(
                aws_sdk_ssm::types::AutomationExecution::builder()
                    .automation_execution_id(EXEC)
                    .document_name(format!("imgbuild-{PROJECT}-bake"))
                    .parameters("BakeToken", vec![RUNNING_TOKEN.to_string()])
                    .build(),
            )
            .build()
    })
}

/// A build instance goes only when no running bake carries its token: the instance of the bake
/// in progress stays, the one whose bake ended without its clean-up is terminated, and exactly
/// that id is sent.
#[tokio::test]
async fn gc_terminates_build_instances_no_running_bake_owns() {
    let terminated: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
    let seen = terminated.clone();
    // aws-cli awscli/examples/ec2/terminate-instances.rst: TerminatingInstances[], captured.
    let capture = mock!(aws_sdk_ec2::Client::terminate_instances)
        .match_requests(move |r| {
            seen.lock().unwrap().push(r.instance_ids().to_vec());
            true
        })
        .then_output(|| aws_sdk_ec2::operation::terminate_instances::TerminateInstancesOutput::builder().build());
    let none: Vec<Rule> = Vec::new();
    let ec2_rules = [
        build_instances(),
        capture,
        // aws-cli awscli/examples/ec2/describe-images.rst and describe-snapshots.rst: nothing here.
        mock!(aws_sdk_ec2::Client::describe_images).then_output(|| aws_sdk_ec2::operation::describe_images::DescribeImagesOutput::builder().build()),
        mock!(aws_sdk_ec2::Client::describe_snapshots).then_output(|| aws_sdk_ec2::operation::describe_snapshots::DescribeSnapshotsOutput::builder().build()),
    ];
    let cfn_rules = [
        // aws-cli awscli/examples/cloudformation/describe-stacks.rst: no stacks.
        mock!(aws_sdk_cloudformation::Client::describe_stacks)
            .then_output(|| aws_sdk_cloudformation::operation::describe_stacks::DescribeStacksOutput::builder().build()),
    ];
    let efs_rules = [
        // aws-cli awscli/examples/efs/describe-file-systems.rst: no file systems.
        mock!(aws_sdk_efs::Client::describe_file_systems)
            .then_output(|| aws_sdk_efs::operation::describe_file_systems::DescribeFileSystemsOutput::builder().build()),
    ];
    let ssm_rules = [running_executions(), execution_parameters()];
    let clients = Clients {
        cfn: mocked!(aws_sdk_cloudformation, cfn_rules, retry()),
        ec2: mocked!(aws_sdk_ec2, ec2_rules, retry()),
        efs: mocked!(aws_sdk_efs, efs_rules, retry()),
        ssm: mocked!(aws_sdk_ssm, ssm_rules, retry()),
        elb: mocked!(aws_sdk_elasticloadbalancingv2, none, retry()),
        apigw: mocked!(aws_sdk_apigateway, none, retry()),
        backup: mocked!(aws_sdk_backup, none, retry()),
        ..crate::mock_client::unscripted()
    };
    let scope = Scope {
        project: PROJECT.into(),
        stacks: vec![PROJECT.into(), format!("{PROJECT}-bake")],
        document: format!("imgbuild-{PROJECT}-bake"),
        keep_file_system: None,
        older_than: Duration::from_secs(30 * 86_400),
        now: std::time::SystemTime::now(),
    };
    let found = gc::find(&clients, &scope).await.unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!((found[0].kind, found[0].id.as_str()), (Kind::BuildInstance, "i-0bbbbbbbbbbbbbbb2"));
    assert!(found[0].detail.contains(DEAD_TOKEN));
    let progress = imgbuild::ui::progress::Progress::new(imgbuild::ui::Ui::new(imgbuild::cli::OutputFormat::Json, 0, true), "gc");
    let waits = imgbuild::stack::Waits { timeout: Duration::from_secs(5), poll: Duration::from_millis(10) };
    gc::remove(&clients, &found[0], waits, &progress).await.unwrap();
    assert_eq!(*terminated.lock().unwrap(), vec![vec!["i-0bbbbbbbbbbbbbbb2".to_string()]]);
}
