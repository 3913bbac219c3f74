//! `imgbuild backup` against scripted AWS answers (aws-smithy-mocks): moto does not implement
//! AWS Backup's StartBackupJob (REFERENCE.md, "AWS Backup: vaults work, StartBackupJob is not
//! implemented"), so every service here answers in its documented shape, cited at each fixture.
//! The quiesce script itself runs under the boot harness (boot.rs).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_smithy_mocks::{Rule, mock};
use aws_smithy_types::retry::RetryConfig;

use imgbuild::aws::Clients;
use imgbuild::backup;
use imgbuild::cli::{BackupArgs, BackupCommand, OutputFormat, WaitArgs};
use imgbuild::config::{Config, Context, Source};
use imgbuild::ui::Ui;

const STACK: &str = "vectordb";
const FS_ID: &str = "fs-12345678";
// ARN shapes from aws-cli awscli/examples/backup/list-backup-jobs.rst (EFS ResourceArn,
// RecoveryPointArn, IamRoleArn, BackupJobId).
const FS_ARN: &str = "arn:aws:elasticfilesystem:us-east-1:123456789012:file-system/fs-12345678";
const VAULT: &str = "vectordb-chroma";
const ROLE: &str = "arn:aws:iam::123456789012:role/vectordb-BackupRole-1A2B3C";
const JOB: &str = "a1b2c3d4-5678-90ab-cdef-EXAMPLE22222";
const POINT: &str = "arn:aws:backup:us-east-1:123456789012:recovery-point:a1b2c3d4-5678-90ab-cdef-EXAMPLE33333";
const INSTANCE: &str = "i-1234567890abcdef0";
const COMMAND: &str = "ef7fdfd8-9b57-4151-a15c-db9a12345678";
const TOKEN: &str = "1700000000-000000001";

fn retry() -> RetryConfig {
    RetryConfig::standard().with_initial_backoff(Duration::from_millis(1))
}

struct Rules {
    cfn: Vec<Rule>,
    efs: Vec<Rule>,
    ec2: Vec<Rule>,
    ssm: Vec<Rule>,
    backup: Vec<Rule>,
}

fn clients(r: &Rules) -> Clients {
    let none: Vec<Rule> = Vec::new();
    Clients {
        cfn: mocked!(aws_sdk_cloudformation, r.cfn, retry()),
        ec2: mocked!(aws_sdk_ec2, r.ec2, retry()),
        efs: mocked!(aws_sdk_efs, r.efs, retry()),
        ssm: mocked!(aws_sdk_ssm, r.ssm, retry()),
        elb: mocked!(aws_sdk_elasticloadbalancingv2, none, retry()),
        apigw: mocked!(aws_sdk_apigateway, none, retry()),
        backup: mocked!(aws_sdk_backup, r.backup, retry()),
        ..crate::mock_client::unscripted()
    }
}

/// DescribeStacks of the deployed stack with the outputs the template declares (infra/stack.yaml
/// Outputs: FileSystemId, BackupVaultName, BackupRoleArn).
fn stack(status: &'static str) -> Rule {
    mock!(aws_sdk_cloudformation::Client::describe_stacks).match_requests(|r| r.stack_name() == Some(STACK)).then_output(move || {
        let out = |k: &str, v: &str| aws_sdk_cloudformation::types::Output::builder().output_key(k).output_value(v).build();
        aws_sdk_cloudformation::operation::describe_stacks::DescribeStacksOutput::builder()
            .stacks(
                aws_sdk_cloudformation::types::Stack::builder()
                    .stack_name(STACK)
                    .stack_status(aws_sdk_cloudformation::types::StackStatus::from(status))
                    .creation_time(aws_smithy_types::DateTime::from_secs(1_700_000_000))
                    .outputs(out("FileSystemId", FS_ID))
                    .outputs(out("BackupVaultName", VAULT))
                    .outputs(out("BackupRoleArn", ROLE))
                    .build(),
            )
            .build()
    })
}

/// aws-cli awscli/examples/efs/describe-file-systems.rst: FileSystemId and FileSystemArn.
fn file_system() -> Rule {
    mock!(aws_sdk_efs::Client::describe_file_systems).match_requests(|r| r.file_system_id() == Some(FS_ID)).then_output(|| {
        aws_sdk_efs::operation::describe_file_systems::DescribeFileSystemsOutput::builder()
            .file_systems(
                aws_sdk_efs::types::FileSystemDescription::builder()
                    .file_system_id(FS_ID)
                    .file_system_arn(FS_ARN)
                    .owner_id("123456789012")
                    .creation_token("console-d7f56c5f")
                    .creation_time(aws_smithy_types::DateTime::from_secs(1_700_000_000))
                    .life_cycle_state(aws_sdk_efs::types::LifeCycleState::Available)
                    .number_of_mount_targets(2)
                    .size_in_bytes(aws_sdk_efs::types::FileSystemSize::builder().value(6144).build())
                    .performance_mode(aws_sdk_efs::types::PerformanceMode::GeneralPurpose)
                    .tags(aws_sdk_efs::types::Tag::builder().key("Name").value(STACK).build().unwrap())
                    .build()
                    .unwrap(),
            )
            .build()
    })
}

/// aws-cli awscli/examples/ec2/describe-instances.rst, filtered by tag and state.
fn instance() -> Rule {
    mock!(aws_sdk_ec2::Client::describe_instances)
        .match_requests(|r| r.filters().iter().any(|f| f.name() == Some("tag:ImgbuildStackName") && f.values() == [STACK]))
        .then_output(|| {
            aws_sdk_ec2::operation::describe_instances::DescribeInstancesOutput::builder()
                .reservations(
                    aws_sdk_ec2::types::Reservation::builder()
                        .instances(
                            aws_sdk_ec2::types::Instance::builder()
                                .instance_id(INSTANCE)
                                .state(aws_sdk_ec2::types::InstanceState::builder().name(aws_sdk_ec2::types::InstanceStateName::Running).build())
                                .build(),
                        )
                        .build(),
                )
                .build()
        })
}

type Seen<T> = Arc<Mutex<Vec<T>>>;

/// SendCommand (aws-cli awscli/examples/ssm/send-command.rst: Command.CommandId), capturing the
/// request.
fn send_command(seen: Seen<aws_sdk_ssm::operation::send_command::SendCommandInput>) -> Rule {
    mock!(aws_sdk_ssm::Client::send_command)
        .match_requests(move |r| {
            seen.lock().unwrap().push(r.clone());
            true
        })
        .then_compute_output(|r| {
            // The inspect script's invocation gets an id of its own, answered by `inspected()`.
            let script = r.parameters().and_then(|p| p.get("commands")).map(|c| c[0].clone()).unwrap_or_default();
            let id = if script.contains("IMGBUILD_SOURCE_PATH=") {
                INSPECT_COMMAND
            } else if script.contains("IMGBUILD_RESTORE_MOUNT=") {
                PROMOTE_COMMAND
            } else {
                COMMAND
            };
            aws_sdk_ssm::operation::send_command::SendCommandOutput::builder()
                .command(aws_sdk_ssm::types::Command::builder().command_id(id).document_name("AWS-RunShellScript").instance_ids(INSTANCE).build())
                .build()
        })
}

const INSPECT_COMMAND: &str = "0b1d2e3f-9b57-4151-a15c-db9a87654321";
const PROMOTE_COMMAND: &str = "5c6d7e8f-9b57-4151-a15c-db9a11223344";

/// The inspect script's output for the copy: three collections (GetCommandInvocation shape as
/// above).
fn inspected() -> Rule {
    mock!(aws_sdk_ssm::Client::get_command_invocation).match_requests(|r| r.command_id() == Some(INSPECT_COMMAND)).then_output(|| {
        aws_sdk_ssm::operation::get_command_invocation::GetCommandInvocationOutput::builder()
            .command_id(INSPECT_COMMAND)
            .instance_id(INSTANCE)
            .status(aws_sdk_ssm::types::CommandInvocationStatus::Success)
            .response_code(0)
            .standard_output_content(
                "IMGBUILD_COLLECTION 3 docs\nIMGBUILD_COLLECTION 0 empty\nIMGBUILD_COLLECTION 5 notes\nIMGBUILD_RESULT status=ok token=1700000000-000000001\n",
            )
            .build()
    })
}

/// GetCommandInvocation (aws-cli awscli/examples/ssm/get-command-invocation.rst: Status,
/// ResponseCode, StandardOutputContent): InProgress once, then Success with the script's output.
fn invocation(stdout: &'static str) -> Rule {
    invocation_of(COMMAND, stdout)
}

fn invocation_of(id: &'static str, stdout: &'static str) -> Rule {
    mock!(aws_sdk_ssm::Client::get_command_invocation)
        .match_requests(move |r| r.command_id() == Some(id) && r.instance_id() == Some(INSTANCE))
        .sequence()
        .output(move || {
            aws_sdk_ssm::operation::get_command_invocation::GetCommandInvocationOutput::builder()
                .command_id(id)
                .instance_id(INSTANCE)
                .status(aws_sdk_ssm::types::CommandInvocationStatus::InProgress)
                .response_code(-1)
                .build()
        })
        .output(move || {
            aws_sdk_ssm::operation::get_command_invocation::GetCommandInvocationOutput::builder()
                .command_id(id)
                .instance_id(INSTANCE)
                .status(aws_sdk_ssm::types::CommandInvocationStatus::Success)
                .response_code(0)
                .standard_output_content(stdout)
                .standard_error_content("")
                .build()
        })
        .repeatedly()
        .build()
}

/// StartBackupJob (AWS Backup API Reference, "StartBackupJob": response BackupJobId,
/// RecoveryPointArn, CreationDate), capturing the request.
fn start_job(seen: Seen<aws_sdk_backup::operation::start_backup_job::StartBackupJobInput>) -> Rule {
    mock!(aws_sdk_backup::Client::start_backup_job)
        .match_requests(move |r| {
            seen.lock().unwrap().push(r.clone());
            true
        })
        .then_output(|| {
            aws_sdk_backup::operation::start_backup_job::StartBackupJobOutput::builder()
                .backup_job_id(JOB)
                .recovery_point_arn(POINT)
                .creation_date(aws_smithy_types::DateTime::from_secs(1_700_000_100))
                .build()
        })
}

/// DescribeBackupJob: RUNNING, then COMPLETED with PercentDone and BackupSizeInBytes as in
/// aws-cli awscli/examples/backup/list-backup-jobs.rst's completed EFS job.
fn job_states(last: &'static str) -> Rule {
    let job = |state: &str, done: &str| {
        aws_sdk_backup::operation::describe_backup_job::DescribeBackupJobOutput::builder()
            .backup_job_id(JOB)
            .backup_vault_name(VAULT)
            .recovery_point_arn(POINT)
            .resource_arn(FS_ARN)
            .resource_type("EFS")
            .state(aws_sdk_backup::types::BackupJobState::from(state))
            .percent_done(done)
            .backup_size_in_bytes(71)
            .status_message(if state == "FAILED" { "Access denied to the file system" } else { "" })
            .build()
    };
    mock!(aws_sdk_backup::Client::describe_backup_job)
        .match_requests(|r| r.backup_job_id() == Some(JOB))
        .sequence()
        .output(move || job("RUNNING", "40.0"))
        .output(move || job(last, "100.0"))
        .repeatedly()
        .build()
}

const QUIESCED: &str =
    "imgbuild-quiesce: copying\nIMGBUILD_RESULT status=ok token=1700000000-000000001 version=1.5.9 paused_ms=2350 bytes=73728 was_running=1\n";

fn ctx() -> Context {
    let mut config = Config::default();
    config.backup.retention_days = 14;
    Context { config, source: Source::Defaults, region: Some("us-east-1".into()), profile: None, endpoint_url: None }
}

fn args(command: Option<BackupCommand>) -> BackupArgs {
    BackupArgs { command, no_wait: false, verify: false, wait: WaitArgs { wait: false, timeout: Some(60) } }
}

fn ui() -> Ui {
    Ui::new(OutputFormat::Text, 0, true)
}

fn poll_fast(mut c: Context) -> Context {
    c.config.aws.poll_interval_secs = 1;
    c
}

#[tokio::test]
async fn backup_quiesces_through_run_command_then_starts_a_tagged_job_and_reports_the_pause() {
    let sent = Arc::new(Mutex::new(Vec::new()));
    let started = Arc::new(Mutex::new(Vec::new()));
    let rules = Rules {
        cfn: vec![stack("UPDATE_COMPLETE")],
        efs: vec![file_system()],
        ec2: vec![instance()],
        ssm: vec![send_command(sent.clone()), invocation(QUIESCED), inspected()],
        backup: vec![start_job(started.clone()), job_states("COMPLETED")],
    };
    let doc = imgbuild::cmd::backup_flow(&clients(&rules), &args(None), &poll_fast(ctx()), ui(), TOKEN).await.unwrap();

    // Run Command: AWS-RunShellScript on the stack's instance, the quiesce script inside.
    let sent = sent.lock().unwrap();
    assert_eq!(sent.len(), 2, "the quiesce, then the inspect of the copy");
    assert_eq!(sent[0].document_name(), Some("AWS-RunShellScript"));
    assert_eq!(sent[0].instance_ids(), [INSTANCE]);
    let commands = &sent[0].parameters().unwrap()["commands"];
    assert_eq!(commands, &backup::quiesce_commands(&ctx().config, TOKEN));
    assert!(commands[0].contains("IMGBUILD_TOKEN='1700000000-000000001'") && commands[0].ends_with("bash -s"), "{commands:?}");

    // The job: the stack's vault and role, the file system's ARN, retention and the three tags.
    let started = started.lock().unwrap();
    assert_eq!(started.len(), 1, "one job");
    let j = &started[0];
    assert_eq!((j.backup_vault_name(), j.resource_arn(), j.iam_role_arn()), (Some(VAULT), Some(FS_ARN), Some(ROLE)));
    assert_eq!(j.idempotency_token(), Some(TOKEN));
    assert_eq!(j.lifecycle().and_then(|l| l.delete_after_days()), Some(14));
    let tags = j.recovery_point_tags().unwrap();
    // The inspect reads the copy, not the live data; its counts are recorded on the point.
    let inspect = &sent[1].parameters().unwrap()["commands"][0];
    assert!(inspect.contains("IMGBUILD_SOURCE_ROOT='/mnt/chroma'") && inspect.contains("IMGBUILD_SOURCE_PATH='.imgbuild-backup/data'"), "{inspect}");
    assert!(inspect.contains("IMGBUILD_IMAGE='ghcr.io/chroma-core/chroma:1.5.9'") && inspect.contains("IMGBUILD_INSPECT_PORT='18765'"), "{inspect}");
    let want: HashMap<String, String> = [
        ("ImgbuildProject", STACK),
        ("ImgbuildChromaVersion", "1.5.9"),
        ("ImgbuildBackupKind", "consistent"),
        ("ImgbuildCollections", "3"),
        ("ImgbuildRecords", "8"),
        ("ImgbuildInventory1", "docs=3 empty=0 notes=5"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(tags, &want);

    assert_eq!(doc["backup"]["quiesced"]["paused_ms"], 2350);
    assert_eq!(doc["backup"]["job"]["state"], "COMPLETED");
    assert_eq!(doc["backup"]["job"]["recovery_point_arn"], POINT);
}

#[tokio::test]
async fn a_backup_job_that_fails_is_an_error_with_aws_backups_reason() {
    let rules = Rules {
        cfn: vec![stack("CREATE_COMPLETE")],
        efs: vec![file_system()],
        ec2: vec![instance()],
        ssm: vec![send_command(Arc::default()), invocation(QUIESCED), inspected()],
        backup: vec![start_job(Arc::default()), job_states("FAILED")],
    };
    let err = imgbuild::cmd::backup_flow(&clients(&rules), &args(None), &poll_fast(ctx()), ui(), TOKEN).await.unwrap_err();
    assert!(err.to_string().contains("ended FAILED: Access denied to the file system"), "{err}");
    assert_eq!(err.exit_code(), 1);
}

#[tokio::test]
async fn a_backup_while_a_deploy_runs_is_refused_with_exit_2_and_nothing_is_sent() {
    // A stack operation may be replacing the instance or the file system: neither Run Command nor
    // a job is started (the rules would count a call).
    let send = send_command(Arc::default());
    let start = start_job(Arc::default());
    let rules = Rules { cfn: vec![stack("UPDATE_IN_PROGRESS")], efs: vec![], ec2: vec![], ssm: vec![send.clone()], backup: vec![start.clone()] };
    let err = imgbuild::cmd::backup_flow(&clients(&rules), &args(None), &ctx(), ui(), TOKEN).await.unwrap_err();
    assert_eq!(err.exit_code(), 2, "{err}");
    assert!(err.to_string().contains("UPDATE_IN_PROGRESS") && err.to_string().contains("Nothing was changed"), "{err}");
    assert_eq!((send.num_calls(), start.num_calls()), (0, 0));
}

#[tokio::test]
async fn a_failed_quiesce_starts_no_job_and_says_what_the_instance_said() {
    // GetCommandInvocation Status Failed with the script's stderr (aws-cli
    // awscli/examples/ssm/get-command-invocation.rst shape; "Failed" is a documented status).
    let failed = mock!(aws_sdk_ssm::Client::get_command_invocation).then_output(|| {
        aws_sdk_ssm::operation::get_command_invocation::GetCommandInvocationOutput::builder()
            .command_id(COMMAND)
            .instance_id(INSTANCE)
            .status(aws_sdk_ssm::types::CommandInvocationStatus::Failed)
            .response_code(1)
            .standard_output_content("IMGBUILD_RESULT status=failed token=1700000000-000000001\n")
            .standard_error_content("imgbuild-quiesce: another instance holds the writer lock /mnt/chroma/.imgbuild-writer.lock after 120s; no copy made\n")
            .build()
    });
    let start = start_job(Arc::default());
    let rules = Rules {
        cfn: vec![stack("UPDATE_COMPLETE")],
        efs: vec![file_system()],
        ec2: vec![instance()],
        ssm: vec![send_command(Arc::default()), failed],
        backup: vec![start.clone()],
    };
    let err = imgbuild::cmd::backup_flow(&clients(&rules), &args(None), &poll_fast(ctx()), ui(), TOKEN).await.unwrap_err();
    assert!(err.to_string().contains("another instance holds the writer lock"), "{err}");
    assert_eq!(start.num_calls(), 0, "no backup job of an inconsistent file system");
}

#[test]
fn the_quiesce_result_must_be_this_runs_and_successful() {
    assert_eq!(backup::parse_quiesced(QUIESCED, TOKEN).unwrap().paused_ms, 2350);
    assert!(backup::parse_quiesced(QUIESCED, "other-token").is_err(), "a stale result of another run");
    assert!(backup::parse_quiesced("IMGBUILD_RESULT status=failed token=1700000000-000000001", TOKEN).is_err());
    assert!(backup::parse_quiesced("", TOKEN).is_err());
}

/// ListRecoveryPointsByBackupVault (AWS Backup API Reference: RecoveryPoints[] with
/// RecoveryPointArn, CreationDate, Status, BackupSizeInBytes) and ListTags (Tags map).
fn recovery_points() -> Vec<Rule> {
    let point = |n: &str, secs: i64| {
        aws_sdk_backup::types::RecoveryPointByBackupVault::builder()
            .recovery_point_arn(format!("arn:aws:backup:us-east-1:123456789012:recovery-point:a1b2c3d4-5678-90ab-cdef-EXAMPLE{n}"))
            .backup_vault_name(VAULT)
            .resource_arn(FS_ARN)
            .resource_type("EFS")
            .status(aws_sdk_backup::types::RecoveryPointStatus::Completed)
            .creation_date(aws_smithy_types::DateTime::from_secs(secs))
            .backup_size_in_bytes(71)
            .build()
    };
    let list =
        mock!(aws_sdk_backup::Client::list_recovery_points_by_backup_vault).match_requests(|r| r.backup_vault_name() == Some(VAULT)).then_output(move || {
            aws_sdk_backup::operation::list_recovery_points_by_backup_vault::ListRecoveryPointsByBackupVaultOutput::builder()
                .recovery_points(point("11111", 1_700_000_000))
                .recovery_points(point("22222", 1_700_100_000))
                .recovery_points(point("33333", 1_700_200_000))
                .build()
        });
    let tags = mock!(aws_sdk_backup::Client::list_tags).then_compute_output(|r| {
        let arn = r.resource_arn().unwrap_or_default();
        let (project, kind) = if arn.ends_with("11111") {
            (STACK, "scheduled")
        } else if arn.ends_with("22222") {
            ("someone-else", "consistent")
        } else {
            (STACK, "consistent")
        };
        aws_sdk_backup::operation::list_tags::ListTagsOutput::builder()
            .tags("ImgbuildProject", project)
            .tags("ImgbuildChromaVersion", "1.5.9")
            .tags("ImgbuildBackupKind", kind)
            .build()
    });
    vec![list, tags]
}

#[tokio::test]
async fn backup_list_shows_only_this_projects_points_newest_first_with_version_and_kind() {
    let rules = Rules { cfn: vec![stack("UPDATE_COMPLETE")], efs: vec![file_system()], ec2: vec![instance()], ssm: vec![], backup: recovery_points() };
    let doc = imgbuild::cmd::backup_flow(&clients(&rules), &args(Some(BackupCommand::List)), &ctx(), ui(), TOKEN).await.unwrap();
    let points = doc["recovery_points"].as_array().unwrap();
    assert_eq!(points.len(), 2, "another project's point is left out: {points:?}");
    assert!(points[0]["arn"].as_str().unwrap().ends_with("33333"));
    assert_eq!(points[0]["kind"], "consistent");
    assert_eq!(points[1]["kind"], "scheduled");
    assert_eq!(points[0]["chroma_version"], "1.5.9");
    assert_eq!(points[0]["size_bytes"], 71);
}

// ---------------------------------------------------------------------------------------------
// The stack's vault, role and plan, and the config that drives them.

/// The vault outlives the stack like the file system (DeletionPolicy Retain), is encrypted with
/// a key of its own that is retained too (a deleted key makes every recovery point unreadable),
/// and its access policy denies deleting points by hand without a vault lock. The plan's schedule
/// and retention are the stack parameters deploy sets from `backup:`; its points are tagged
/// `scheduled` (AWS::Backup::BackupPlan BackupRuleResourceType: RecoveryPointTags, Lifecycle
/// DeleteAfterDays, ScheduleExpression, in the CloudFormation resource reference).
#[test]
fn the_stack_keeps_the_vault_and_its_key_and_the_plan_follows_the_config() {
    let t = imgbuild::stack::template::Template::reference();
    let doc = t.document();
    let res = &doc["Resources"];
    for id in ["BackupVault", "BackupKey"] {
        assert_eq!(res[id]["DeletionPolicy"].as_str(), Some("Retain"), "{id}");
        assert_eq!(res[id]["UpdateReplacePolicy"].as_str(), Some("Retain"), "{id}");
    }
    let denied: Vec<&str> =
        res["BackupVault"]["Properties"]["AccessPolicy"]["Statement"][0]["Action"].as_sequence().unwrap().iter().filter_map(|a| a.as_str()).collect();
    assert!(denied.contains(&"backup:DeleteRecoveryPoint") && denied.contains(&"backup:DeleteBackupVault"), "{denied:?}");
    assert!(res["BackupVault"]["Properties"].get("LockConfiguration").is_none(), "lock-free: retention stays changeable");
    let rule = &res["BackupPlan"]["Properties"]["BackupPlan"]["BackupPlanRule"][0];
    assert_eq!(rule["RecoveryPointTags"]["ImgbuildBackupKind"].as_str(), Some("scheduled"));
    assert_eq!(serde_yaml::to_string(&rule["ScheduleExpression"]).unwrap().trim(), "!Ref BackupSchedule");
    assert_eq!(serde_yaml::to_string(&rule["Lifecycle"]["DeleteAfterDays"]).unwrap().trim(), "!Ref BackupRetentionDays");
    for o in ["BackupVaultName", "BackupRoleArn"] {
        assert!(doc["Outputs"].get(o).is_some(), "backup reads the {o} output");
    }

    let config = crate::support::parse("backup:\n  retention_days: 90\n  schedule: rate(12 hours)\n");
    let choice = imgbuild::bake::images::Choice { ami: String::new(), source: imgbuild::bake::images::Source::Flag, mode: imgbuild::render::Mode::Full };
    let params = imgbuild::cmd::stack_parameters(&t, &config, &choice).unwrap();
    assert_eq!(params["BackupRetentionDays"], "90");
    assert_eq!(params["BackupSchedule"], "rate(12 hours)");
    assert_eq!(params["ChromaVersion"], "1.5.9");
}

#[test]
fn backup_settings_out_of_range_name_the_field() {
    for (yaml, field) in [
        ("backup:\n  retention_days: 0\n", "backup.retention_days"),
        ("backup:\n  retention_days: 40000\n", "backup.retention_days"),
        ("backup:\n  schedule: daily\n", "backup.schedule"),
        ("backup:\n  schedule: cron(0 5 * * ? *\n", "backup.schedule"),
    ] {
        let err = imgbuild::config::parse(yaml, "c.yaml").expect_err(yaml);
        assert!(err.errors.iter().any(|e| e.field == field && e.line == Some(2)), "{yaml}: {err}");
    }
    let ok = imgbuild::config::parse(imgbuild::config::STARTER, "starter.yaml").unwrap();
    assert_eq!((ok.backup.retention_days, ok.backup.schedule.as_str()), (35, "cron(0 5 ? * * *)"));
}

// ---------------------------------------------------------------------------------------------
// restore

use imgbuild::cli::RestoreArgs;
use imgbuild::stack::changeset::Confirmer;

/// Never asked in these tests: every case stops before the deploy.
struct NoConfirm;
impl Confirmer for NoConfirm {
    fn confirm<'a>(&'a self, _question: &'a str) -> std::pin::Pin<Box<dyn std::future::Future<Output = imgbuild::Result<bool>> + Send + 'a>> {
        panic!("no deploy may be reached")
    }
}

fn restore_args(point: &str) -> RestoreArgs {
    RestoreArgs { recovery_point: point.into(), yes: false, ami: None, mode: None, verify: false, wait: WaitArgs { wait: false, timeout: Some(60) } }
}

/// DescribeRecoveryPoint (AWS Backup API Reference: ResourceType, Status, ResourceArn) answering
/// for POINT, and ResourceNotFoundException (HTTP 400, the documented error of the call) for any
/// other ARN.
fn describe_point(status: &'static str) -> Vec<Rule> {
    let found = mock!(aws_sdk_backup::Client::describe_recovery_point).match_requests(|r| r.recovery_point_arn() == Some(POINT)).then_output(move || {
        aws_sdk_backup::operation::describe_recovery_point::DescribeRecoveryPointOutput::builder()
            .recovery_point_arn(POINT)
            .backup_vault_name(VAULT)
            .resource_arn(FS_ARN)
            .resource_type("EFS")
            .status(aws_sdk_backup::types::RecoveryPointStatus::from(status))
            .build()
    });
    let missing = mock!(aws_sdk_backup::Client::describe_recovery_point).match_requests(|r| r.recovery_point_arn() != Some(POINT)).then_error(|| {
        aws_sdk_backup::operation::describe_recovery_point::DescribeRecoveryPointError::generic(
            aws_smithy_types::error::ErrorMetadata::builder().code("ResourceNotFoundException").message("Cannot find recovery point").build(),
        )
    });
    vec![found, missing]
}

fn point_tags(project: &'static str, version: &'static str) -> Rule {
    mock!(aws_sdk_backup::Client::list_tags).match_requests(|r| r.resource_arn() == Some(POINT)).then_output(move || {
        aws_sdk_backup::operation::list_tags::ListTagsOutput::builder()
            .tags("ImgbuildProject", project)
            .tags("ImgbuildChromaVersion", version)
            .tags("ImgbuildBackupKind", "consistent")
            .build()
    })
}

fn start_restore(seen: Seen<aws_sdk_backup::operation::start_restore_job::StartRestoreJobInput>) -> Rule {
    mock!(aws_sdk_backup::Client::start_restore_job)
        .match_requests(move |r| {
            seen.lock().unwrap().push(r.clone());
            true
        })
        .then_output(|| {
            aws_sdk_backup::operation::start_restore_job::StartRestoreJobOutput::builder().restore_job_id("44444444-5555-6666-7777-888888888888").build()
        })
}

async fn refused(rules: Rules, point: &str) -> imgbuild::Error {
    let ctx = poll_fast(ctx());
    imgbuild::cmd::restore_flow(&clients(&rules), &restore_args(point), &ctx, ui(), &NoConfirm, std::future::pending(), TOKEN).await.unwrap_err()
}

#[tokio::test]
async fn restore_refuses_bad_input_with_exit_2_and_starts_nothing() {
    // A malformed ARN: no AWS call at all (clients without rules panic when called).
    let err = refused(Rules { cfn: vec![], efs: vec![], ec2: vec![], ssm: vec![], backup: vec![] }, "rp-123").await;
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("`rp-123` is not a recovery point ARN"), "{err}");

    let cases: [(&str, &'static str, &'static str, &'static str, &str); 4] = [
        // (case, stack status, project tag, version tag, ARN)
        ("unknown point", "UPDATE_COMPLETE", STACK, "1.5.9", "arn:aws:backup:us-east-1:123456789012:recovery-point:ffffffff-0000-0000-0000-000000000000"),
        ("another project's point", "UPDATE_COMPLETE", "someone-else", "1.5.9", POINT),
        ("a deploy running", "UPDATE_IN_PROGRESS", STACK, "1.5.9", POINT),
        ("data newer than the configured Chroma", "UPDATE_COMPLETE", STACK, "9.0.0", POINT),
    ];
    for (case, status, project, version, arn) in cases {
        let start = start_restore(Arc::default());
        let mut backup_rules = describe_point("COMPLETED");
        backup_rules.push(point_tags(project, version));
        backup_rules.push(start.clone());
        let rules = Rules { cfn: vec![stack(status)], efs: vec![file_system()], ec2: vec![instance()], ssm: vec![], backup: backup_rules };
        let err = refused(rules, arn).await;
        assert_eq!(err.exit_code(), 2, "{case}: {err}");
        assert_eq!(start.num_calls(), 0, "{case}: no restore job");
        let msg = err.to_string();
        let said = match case {
            "unknown point" => msg.contains("is not in vault vectordb-chroma"),
            "another project's point" => msg.contains("belongs to project someone-else"),
            "a deploy running" => msg.contains("UPDATE_IN_PROGRESS"),
            _ => msg.contains("written by Chroma 9.0.0, newer than chroma.version 1.5.9"),
        };
        assert!(said, "{case}: {msg}");
    }
}

/// The restore itself, up to the deploy: a new encrypted file system from the point, temporary
/// mount targets in the live one's subnets and security groups, the promote script through Run
/// Command, the mount targets removed again (the stack makes its own on reattach).
#[tokio::test]
async fn restore_makes_a_new_file_system_promotes_the_data_and_removes_its_mount_targets() {
    let World { rules, restore_seen, created, delete_mt, tagged, sent } = restore_world(point_tags(STACK, "1.5.9"));
    let c = clients(&rules);
    let config = poll_fast(ctx()).config;
    let t = backup::target(&c, STACK).await.unwrap();
    let point = backup::restore::check_point(&c, &t, POINT).await.unwrap();
    let progress = imgbuild::ui::progress::Progress::new(ui(), "test");
    let waits = imgbuild::stack::Waits { timeout: Duration::from_secs(60), poll: Duration::from_millis(10) };
    let (_, new_fs) = backup::restore::restore_into_new(&c, &t, &point, TOKEN, waits, &progress).await.unwrap();
    assert_eq!(new_fs, "fs-0fedcba9876543210");
    let (p, found) = backup::restore::promote(&c, &config, &t, &new_fs, TOKEN, false, Duration::from_millis(10), &progress).await.unwrap();
    assert_eq!(found, None, "no verify asked");
    assert_eq!(p.kind, "consistent");

    // Never over the live one: a new, encrypted file system.
    let r = &restore_seen.lock().unwrap()[0];
    let meta = r.metadata().unwrap();
    assert_eq!(meta["newFileSystem"], "true");
    assert_eq!(meta["Encrypted"], "true");
    assert_eq!(meta["file-system-id"], FS_ID);
    assert_eq!(meta["CreationToken"], format!("imgbuild-restore-{TOKEN}"));
    assert_eq!((r.iam_role_arn(), r.resource_type()), (Some(ROLE), Some("EFS")));
    assert_eq!(*created.lock().unwrap(), [("fs-0fedcba9876543210".to_string(), "subnet-0a1b2c3d".to_string(), vec!["sg-0efs1234".to_string()])]);
    assert_eq!(delete_mt.num_calls(), 1, "the temporary mount target is removed");
    let cmd = sent.lock().unwrap()[0].parameters().unwrap()["commands"][0].clone();
    assert!(
        cmd.contains("IMGBUILD_FILE_SYSTEM_ID='fs-0fedcba9876543210'") && cmd.contains("IMGBUILD_MOUNT_ARGS='-t efs -o tls,iam fs-0fedcba9876543210:/'"),
        "{cmd}"
    );

    // The redeploy reattaches the restored file system (issue 10's efs.file_system_id).
    let re = imgbuild::cmd::reattach_context(&ctx(), &new_fs);
    assert_eq!(re.config.efs.file_system_id.as_deref(), Some("fs-0fedcba9876543210"));
    assert!(tagged.lock().unwrap().is_empty(), "nothing is named before the deploy decides");
}

struct World {
    rules: Rules,
    restore_seen: Seen<aws_sdk_backup::operation::start_restore_job::StartRestoreJobInput>,
    created: Seen<(String, String, Vec<String>)>,
    delete_mt: Rule,
    tagged: Seen<(String, String)>,
    sent: Seen<aws_sdk_ssm::operation::send_command::SendCommandInput>,
}

/// A deployed stack, the point (tagged by `tags`), and every answer a restore needs: the restore
/// job, the temporary mount targets, the promote and inspect Run Commands.
fn restore_world(tags: Rule) -> World {
    let restore_seen = Arc::new(Mutex::new(Vec::new()));
    let mut backup_rules = describe_point("COMPLETED");
    backup_rules.push(tags);
    backup_rules.push(start_restore(restore_seen.clone()));
    // GetRecoveryPointRestoreMetadata (API Reference: RestoreMetadata map with file-system-id).
    backup_rules.push(mock!(aws_sdk_backup::Client::get_recovery_point_restore_metadata).then_output(|| {
        aws_sdk_backup::operation::get_recovery_point_restore_metadata::GetRecoveryPointRestoreMetadataOutput::builder()
            .recovery_point_arn(POINT)
            .restore_metadata("file-system-id", FS_ID)
            .restore_metadata("Encrypted", "false")
            .restore_metadata("PerformanceMode", "generalPurpose")
            .build()
    }));
    // DescribeRestoreJob (API Reference: Status PENDING|RUNNING|COMPLETED|ABORTED|FAILED,
    // CreatedResourceArn of the new file system).
    backup_rules.push(
        mock!(aws_sdk_backup::Client::describe_restore_job)
            .sequence()
            .output(|| {
                aws_sdk_backup::operation::describe_restore_job::DescribeRestoreJobOutput::builder()
                    .status(aws_sdk_backup::types::RestoreJobStatus::Running)
                    .build()
            })
            .output(|| {
                aws_sdk_backup::operation::describe_restore_job::DescribeRestoreJobOutput::builder()
                    .status(aws_sdk_backup::types::RestoreJobStatus::Completed)
                    .created_resource_arn("arn:aws:elasticfilesystem:us-east-1:123456789012:file-system/fs-0fedcba9876543210")
                    .build()
            })
            .repeatedly()
            .build(),
    );

    // EFS: the live file system's mount target and its security group (aws-cli
    // awscli/examples/efs/describe-mount-targets.rst and describe-mount-target-security-groups.rst).
    let mt = |fs: &str, id: &str, state: aws_sdk_efs::types::LifeCycleState| {
        aws_sdk_efs::types::MountTargetDescription::builder()
            .mount_target_id(id)
            .file_system_id(fs)
            .subnet_id("subnet-0a1b2c3d")
            .life_cycle_state(state)
            .build()
            .unwrap()
    };
    let live_mts = mock!(aws_sdk_efs::Client::describe_mount_targets).match_requests(|r| r.file_system_id() == Some(FS_ID)).then_output(move || {
        aws_sdk_efs::operation::describe_mount_targets::DescribeMountTargetsOutput::builder()
            .mount_targets(mt(FS_ID, "fsmt-live", aws_sdk_efs::types::LifeCycleState::Available))
            .build()
    });
    let new_mts = mock!(aws_sdk_efs::Client::describe_mount_targets)
        .match_requests(|r| r.file_system_id() == Some("fs-0fedcba9876543210"))
        .sequence()
        .output(move || {
            aws_sdk_efs::operation::describe_mount_targets::DescribeMountTargetsOutput::builder()
                .mount_targets(mt("fs-0fedcba9876543210", "fsmt-tmp", aws_sdk_efs::types::LifeCycleState::Creating))
                .build()
        })
        .output(move || {
            aws_sdk_efs::operation::describe_mount_targets::DescribeMountTargetsOutput::builder()
                .mount_targets(mt("fs-0fedcba9876543210", "fsmt-tmp", aws_sdk_efs::types::LifeCycleState::Available))
                .build()
        })
        .output(|| aws_sdk_efs::operation::describe_mount_targets::DescribeMountTargetsOutput::builder().build())
        .repeatedly()
        .build();
    let sgs = mock!(aws_sdk_efs::Client::describe_mount_target_security_groups).then_output(|| {
        aws_sdk_efs::operation::describe_mount_target_security_groups::DescribeMountTargetSecurityGroupsOutput::builder()
            .security_groups("sg-0efs1234")
            .build()
            .unwrap()
    });
    let created: Seen<(String, String, Vec<String>)> = Arc::default();
    let created_in = created.clone();
    let create_mt = mock!(aws_sdk_efs::Client::create_mount_target)
        .match_requests(move |r| {
            created_in.lock().unwrap().push((r.file_system_id().unwrap().into(), r.subnet_id().unwrap().into(), r.security_groups().to_vec()));
            true
        })
        .then_output(|| {
            aws_sdk_efs::operation::create_mount_target::CreateMountTargetOutput::builder()
                .mount_target_id("fsmt-tmp")
                .file_system_id("fs-0fedcba9876543210")
                .subnet_id("subnet-0a1b2c3d")
                .life_cycle_state(aws_sdk_efs::types::LifeCycleState::Creating)
                .build()
                .unwrap()
        });
    let delete_mt = mock!(aws_sdk_efs::Client::delete_mount_target)
        .match_requests(|r| r.mount_target_id() == Some("fsmt-tmp"))
        .then_output(|| aws_sdk_efs::operation::delete_mount_target::DeleteMountTargetOutput::builder().build());
    let tagged: Seen<(String, String)> = Arc::default();
    let tagged_in = tagged.clone();
    let tag = mock!(aws_sdk_efs::Client::tag_resource)
        .match_requests(move |r| {
            tagged_in.lock().unwrap().push((r.resource_id().unwrap().into(), r.tags()[0].value().into()));
            true
        })
        .then_output(|| aws_sdk_efs::operation::tag_resource::TagResourceOutput::builder().build());

    let sent = Arc::new(Mutex::new(Vec::new()));
    let promoted = "IMGBUILD_RESULT status=ok token=1700000000-000000001 kind=consistent version=1.5.9 from=aws-backup-restore_2026\n";
    let rules = Rules {
        cfn: vec![stack("UPDATE_COMPLETE")],
        efs: vec![file_system(), live_mts, new_mts, sgs, create_mt, delete_mt.clone(), tag],
        ec2: vec![instance()],
        ssm: vec![send_command(sent.clone()), invocation_of(PROMOTE_COMMAND, promoted), inspected()],
        backup: backup_rules,
    };
    World { rules, restore_seen, created, delete_mt, tagged, sent }
}

fn tags_recording(inventory: &'static str) -> Rule {
    tags_recording_n(inventory, "9")
}

fn tags_recording_n(inventory: &'static str, records: &'static str) -> Rule {
    mock!(aws_sdk_backup::Client::list_tags).match_requests(|r| r.resource_arn() == Some(POINT)).then_output(move || {
        aws_sdk_backup::operation::list_tags::ListTagsOutput::builder()
            .tags("ImgbuildProject", STACK)
            .tags("ImgbuildChromaVersion", "1.5.9")
            .tags("ImgbuildBackupKind", "consistent")
            .tags("ImgbuildCollections", "3")
            .tags("ImgbuildRecords", records)
            .tags("ImgbuildInventory1", inventory)
            .build()
    })
}

/// The restored copy holds notes=5 where the backup recorded notes=6: verify fails on that
/// collection, before the deploy (NoConfirm would panic, and the deploy's first call has no
/// rule), and the live file system is never renamed.
#[tokio::test]
async fn restore_verify_that_finds_other_counts_stops_before_anything_switches() {
    let w = restore_world(tags_recording("docs=3 empty=0 notes=6"));
    let mut args = restore_args(POINT);
    args.verify = true;
    let err = imgbuild::cmd::restore_flow(&clients(&w.rules), &args, &poll_fast(ctx()), ui(), &NoConfirm, std::future::pending(), TOKEN).await.unwrap_err();
    assert!(err.to_string().starts_with("verify failed: the restored copy fs-0fedcba9876543210"), "{err}");
    assert!(err.to_string().contains("Chroma still serves fs-12345678"), "{err}");
    let sent = w.sent.lock().unwrap();
    let verify = &sent[1].parameters().unwrap()["commands"][0];
    assert!(verify.contains("IMGBUILD_MOUNT_ARGS='-t efs -o tls,iam fs-0fedcba9876543210:/'") && verify.contains("IMGBUILD_SOURCE_PATH='data'"), "{verify}");
    assert_eq!(w.delete_mt.num_calls(), 1, "the temporary mount target is removed after a failed verify too");
    let tagged = w.tagged.lock().unwrap();
    assert_eq!(*tagged, [("fs-0fedcba9876543210".to_string(), format!("{STACK}-restored-{TOKEN}"))], "only the copy is named");
}

/// A point without a record of its collections cannot be verified: said before any job starts.
#[tokio::test]
async fn restore_verify_of_a_point_without_a_record_is_refused_before_anything_starts() {
    let w = restore_world(point_tags(STACK, "1.5.9"));
    let mut args = restore_args(POINT);
    args.verify = true;
    let err = imgbuild::cmd::restore_flow(&clients(&w.rules), &args, &poll_fast(ctx()), ui(), &NoConfirm, std::future::pending(), TOKEN).await.unwrap_err();
    assert_eq!(err.exit_code(), 2, "{err}");
    assert!(err.to_string().contains("has no record of its collections"), "{err}");
    assert!(w.restore_seen.lock().unwrap().is_empty() && w.sent.lock().unwrap().is_empty(), "nothing started");
}

/// `backup --verify`: after the job, a restore into a scratch file system, verified against what
/// the backup recorded, the scratch file system deleted, and the point tagged verified
/// (AWS Backup API Reference, TagResource on a recovery point ARN; EFS DeleteFileSystem once it
/// has no mount targets, aws-cli awscli/examples/efs/delete-file-system.rst).
#[tokio::test]
async fn backup_verify_restores_a_scratch_copy_compares_deletes_it_and_tags_the_point() {
    let mut w = restore_world(tags_recording_n("docs=3 empty=0 notes=5", "8"));
    w.rules.ssm.push(invocation(QUIESCED));
    w.rules.backup.push(start_job(Arc::default()));
    w.rules.backup.push(job_states("COMPLETED"));
    let verified_tag: Seen<(String, HashMap<String, String>)> = Arc::default();
    let seen = verified_tag.clone();
    w.rules.backup.push(
        mock!(aws_sdk_backup::Client::tag_resource)
            .match_requests(move |r| {
                seen.lock().unwrap().push((r.resource_arn().unwrap().into(), r.tags().unwrap().clone()));
                true
            })
            .then_output(|| aws_sdk_backup::operation::tag_resource::TagResourceOutput::builder().build()),
    );
    let deleted = mock!(aws_sdk_efs::Client::delete_file_system)
        .match_requests(|r| r.file_system_id() == Some("fs-0fedcba9876543210"))
        .then_output(|| aws_sdk_efs::operation::delete_file_system::DeleteFileSystemOutput::builder().build());
    w.rules.efs.push(deleted.clone());
    let mut a = args(None);
    a.verify = true;
    let doc = imgbuild::cmd::backup_flow(&clients(&w.rules), &a, &poll_fast(ctx()), ui(), TOKEN).await.unwrap();
    assert_eq!(doc["verified"].as_array().unwrap().len(), 3);
    assert_eq!(deleted.num_calls(), 1, "the scratch file system is deleted");
    assert_eq!(w.delete_mt.num_calls(), 1);
    let tagged = verified_tag.lock().unwrap();
    assert_eq!(tagged.len(), 1);
    assert_eq!(tagged[0].0, POINT);
    assert_eq!(tagged[0].1["ImgbuildVerified"], TOKEN);
    // The live file system is never the one restored over or named.
    assert!(w.tagged.lock().unwrap().iter().all(|(fs, _)| fs != FS_ID));
}

// ---------------------------------------------------------------------------------------------
// upgrade and rollback

use imgbuild::cli::{RollbackArgs, UpgradeArgs};

fn upgrade_args(to: &str, dry_run: bool) -> UpgradeArgs {
    UpgradeArgs { to: to.into(), dry_run, yes: false, wait: WaitArgs { wait: false, timeout: Some(60) } }
}

/// SSM GetParameter: the handoff parameter of a baked image does not exist (ParameterNotFound,
/// the documented error code), AL2023's public parameter answers an AMI (aws-cli
/// awscli/examples/ssm/get-parameter.rst shape).
fn parameters() -> Rule {
    mock!(aws_sdk_ssm::Client::get_parameter).then_compute_response(|r| {
        let name = r.name().unwrap_or_default().to_string();
        if name.starts_with("/aws/service/ami-amazon-linux-latest/") {
            aws_smithy_mocks::MockResponse::Output(
                aws_sdk_ssm::operation::get_parameter::GetParameterOutput::builder()
                    .parameter(
                        aws_sdk_ssm::types::Parameter::builder()
                            .name(name)
                            .value("ami-0123456789abcdef0")
                            .r#type(aws_sdk_ssm::types::ParameterType::String)
                            .build(),
                    )
                    .build(),
            )
        } else {
            aws_smithy_mocks::MockResponse::Error(aws_sdk_ssm::operation::get_parameter::GetParameterError::generic(
                aws_smithy_types::error::ErrorMetadata::builder().code("ParameterNotFound").message(format!("{name} not found")).build(),
            ))
        }
    })
}

/// The marker read answers `marker` (its own command id: the command is not the quiesce).
fn marker_read(marker: &'static str) -> Vec<Rule> {
    let send = mock!(aws_sdk_ssm::Client::send_command)
        // Only the read: the quiesce's command names the marker too (IMGBUILD_VERSION_NAME).
        .match_requests(|r| {
            r.parameters().and_then(|p| p.get("commands")).is_some_and(|c| c[0].starts_with("if [ -s ") && c[0].contains(".imgbuild-chroma-version"))
        })
        .then_output(|| {
            aws_sdk_ssm::operation::send_command::SendCommandOutput::builder()
                .command(aws_sdk_ssm::types::Command::builder().command_id("7a8b9c0d-9b57-4151-a15c-db9a55667788").build())
                .build()
        });
    vec![send, invocation_of("7a8b9c0d-9b57-4151-a15c-db9a55667788", marker)]
}

#[tokio::test]
async fn upgrade_to_an_unknown_version_is_refused_before_any_call() {
    let rules = Rules { cfn: vec![], efs: vec![], ec2: vec![], ssm: vec![], backup: vec![] };
    for to in ["latest", "3.0.0", "0.3.9"] {
        let err = imgbuild::cmd::upgrade_flow(&clients(&rules), "us-east-1", &upgrade_args(to, false), &ctx(), ui(), &NoConfirm, std::future::pending(), TOKEN)
            .await
            .unwrap_err();
        assert_eq!(err.exit_code(), 2, "{to}: {err}");
        assert!(err.to_string().starts_with("--to: "), "{to}: {err}");
    }
}

/// The marker the boot writes on EFS says 1.5.9 opened the data: an older --to cannot read it
/// (Chroma's migrations run one way, chroma#2615). Refused after reading the marker, with no
/// backup and no deploy; the same version is refused too.
#[tokio::test]
async fn upgrade_refuses_a_downgrade_of_the_data_with_exit_2_and_changes_nothing() {
    for (to, says) in [("1.0.0", "older than Chroma 1.5.9"), ("1.5.9", "already at Chroma 1.5.9")] {
        let start = start_job(Arc::default());
        let mut ssm = marker_read("1.5.9\n");
        ssm.push(parameters());
        let rules = Rules { cfn: vec![stack("UPDATE_COMPLETE")], efs: vec![file_system()], ec2: vec![instance()], ssm, backup: vec![start.clone()] };
        let err = imgbuild::cmd::upgrade_flow(
            &clients(&rules),
            "us-east-1",
            &upgrade_args(to, false),
            &poll_fast(ctx()),
            ui(),
            &NoConfirm,
            std::future::pending(),
            TOKEN,
        )
        .await
        .unwrap_err();
        assert_eq!(err.exit_code(), 2, "{err}");
        assert!(err.to_string().contains(says), "{err}");
        assert_eq!(start.num_calls(), 0);
    }
}

/// --dry-run: the plan (one-way migration, the pause, the instance replacement, the cost of the
/// extra point) and nothing else: no quiesce, no job, no deploy.
#[tokio::test]
async fn upgrade_dry_run_says_what_would_happen_and_changes_nothing() {
    let start = start_job(Arc::default());
    let mut ssm = marker_read("0.6.3\n");
    ssm.push(parameters());
    let rules = Rules { cfn: vec![stack("UPDATE_COMPLETE")], efs: vec![file_system()], ec2: vec![instance()], ssm, backup: vec![start.clone()] };
    let mut c = poll_fast(ctx());
    c.config.chroma.version = "0.6.3".into();
    let doc = imgbuild::cmd::upgrade_flow(&clients(&rules), "us-east-1", &upgrade_args("1.5.9", true), &c, ui(), &NoConfirm, std::future::pending(), TOKEN)
        .await
        .unwrap();
    let plan = &doc["plan"];
    assert_eq!(plan["data_version"], "0.6.3");
    assert_eq!(plan["bakes"], false);
    assert!(
        plan["one_way"].as_str().unwrap().contains("0.6.3 cannot open it afterwards") && plan["one_way"].as_str().unwrap().contains("chroma#4217"),
        "{plan}"
    );
    // 6144 bytes (DescribeFileSystems SizeInBytes): a one-second copy plus the stop and start.
    assert_eq!(plan["pause_secs_estimate"], 11);
    assert_eq!(plan["replace_secs_max"], 900);
    let usd = plan["extra_point_usd"].as_f64().unwrap();
    assert!((usd - 6144.0 / 1e9 * 0.05 * 14.0 / 30.0).abs() < 1e-12, "{usd}");
    assert_eq!(start.num_calls(), 0);
}

#[tokio::test]
async fn rollback_without_a_record_or_of_another_stack_is_refused_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = ctx();
    c.source = Source::File(dir.path().join("imgbuild.yaml"));
    let rules = Rules { cfn: vec![], efs: vec![], ec2: vec![], ssm: vec![], backup: vec![] };
    let args = RollbackArgs { yes: false, wait: WaitArgs { wait: false, timeout: None } };
    let err = imgbuild::cmd::rollback_flow(&clients(&rules), &args, &c, ui(), &NoConfirm, std::future::pending(), TOKEN).await.unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("there is no upgrade to roll back"), "{err}");

    let record = imgbuild::backup::upgrade::RollbackRecord {
        stack: "other".into(),
        from_version: "1.0.0".into(),
        to_version: "1.5.9".into(),
        previous_image: "ami-0123456789abcdef0".into(),
        previous_mode: None,
        recovery_point: POINT.into(),
    };
    std::fs::write(imgbuild::cmd::rollback_path(&c), serde_json::to_string(&record).unwrap()).unwrap();
    let err = imgbuild::cmd::rollback_flow(&clients(&rules), &args, &c, ui(), &NoConfirm, std::future::pending(), TOKEN).await.unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("is the record of stack other, not vectordb"), "{err}");
}

/// rollback goes back with the recorded point and image together: the restore is checked (here
/// the recorded point is another project's, so it stops with exit 2 before anything starts).
#[tokio::test]
async fn rollback_restores_the_recorded_point_with_the_recorded_version() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = poll_fast(ctx());
    c.source = Source::File(dir.path().join("imgbuild.yaml"));
    let record = imgbuild::backup::upgrade::RollbackRecord {
        stack: STACK.into(),
        from_version: "1.0.0".into(),
        to_version: "1.5.9".into(),
        previous_image: "ami-0123456789abcdef0".into(),
        previous_mode: None,
        recovery_point: POINT.into(),
    };
    std::fs::write(imgbuild::cmd::rollback_path(&c), serde_json::to_string(&record).unwrap()).unwrap();
    // The pre-upgrade point records Chroma 1.5.9 data: newer than the 1.0.0 the rollback deploys,
    // so the restore refuses it rather than serving data an older Chroma cannot read.
    let mut backup_rules = describe_point("COMPLETED");
    backup_rules.push(point_tags(STACK, "1.5.9"));
    let start = start_restore(Arc::default());
    backup_rules.push(start.clone());
    let rules = Rules { cfn: vec![stack("UPDATE_COMPLETE")], efs: vec![file_system()], ec2: vec![instance()], ssm: vec![], backup: backup_rules };
    let args = RollbackArgs { yes: true, wait: WaitArgs { wait: false, timeout: None } };
    let err = imgbuild::cmd::rollback_flow(&clients(&rules), &args, &c, ui(), &NoConfirm, std::future::pending(), TOKEN).await.unwrap_err();
    assert!(err.to_string().contains("written by Chroma 1.5.9, newer than chroma.version 1.0.0"), "{err}");
    assert_eq!(start.num_calls(), 0);
}

/// A smoke that fails after the upgrade (here a real one, against a port nothing listens on)
/// ends the upgrade with the smoke's exit status and the way back in one command: the previous
/// image and the pre-upgrade recovery point, together.
#[test]
fn a_failed_smoke_after_the_upgrade_hands_over_the_rollback() {
    let record = imgbuild::backup::upgrade::RollbackRecord {
        stack: STACK.into(),
        from_version: "1.0.0".into(),
        to_version: "1.5.9".into(),
        previous_image: "ami-0123456789abcdef0".into(),
        previous_mode: None,
        recovery_point: POINT.into(),
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let profile = imgbuild::chroma::profile(&imgbuild::chroma::parse_version("1.5.9").unwrap()).unwrap();
    let report = imgbuild::smoke::over_http(&format!("http://127.0.0.1:{port}"), profile, Duration::from_secs(5), "t");
    assert!(!report.ok());
    let err = imgbuild::cmd::after_smoke(&report, &record).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, imgbuild::Error::SmokeFailed(_)), "{err:?}");
    assert!(msg.contains("`imgbuild rollback`") && msg.contains("ami-0123456789abcdef0") && msg.contains(POINT) && msg.contains("heartbeat"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// The restore's temporary mount targets against moto's EFS and EC2 (moto 5.2.5 implements
// CreateMountTarget, DescribeMountTargets, DescribeMountTargetSecurityGroups and
// DeleteMountTarget); Run Command stays scripted, moto's SendCommand runs nothing.

#[test]
fn restore_mount_targets_against_moto_copy_the_live_ones_and_are_gone_afterwards() {
    let Some(moto) = crate::services::moto() else { return };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(&moto.url)
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_cloudformation::config::Credentials::new("testing", "testing", None, None, "tests"))
            .load()
            .await;
        let ec2 = aws_sdk_ec2::Client::new(&conf);
        let efs = aws_sdk_efs::Client::new(&conf);
        let vpc = ec2.create_vpc().cidr_block("10.42.0.0/16").send().await.unwrap().vpc.unwrap().vpc_id.unwrap();
        let subnet = ec2.create_subnet().vpc_id(&vpc).cidr_block("10.42.1.0/24").send().await.unwrap().subnet.unwrap().subnet_id.unwrap();
        let sg = ec2.create_security_group().group_name(format!("efs-{TOKEN}")).description("efs").vpc_id(&vpc).send().await.unwrap().group_id.unwrap();
        let fs = |token: &'static str| {
            let efs = efs.clone();
            async move { efs.create_file_system().creation_token(token).encrypted(true).send().await.unwrap() }
        };
        let live = fs("imgbuild-moto-live").await;
        efs.create_mount_target().file_system_id(live.file_system_id()).subnet_id(&subnet).security_groups(&sg).send().await.unwrap();
        let restored = fs("imgbuild-moto-restored").await;

        let promoted = "IMGBUILD_RESULT status=ok token=1700000000-000000001 kind=consistent version=1.5.9 from=aws-backup-restore_2026\n";
        let sent = Arc::new(Mutex::new(Vec::new()));
        let ssm_rules = [send_command(sent.clone()), invocation_of(PROMOTE_COMMAND, promoted)];
        let none: Vec<Rule> = Vec::new();
        let clients = Clients {
            cfn: aws_sdk_cloudformation::Client::new(&conf),
            ec2,
            efs: efs.clone(),
            ssm: mocked!(aws_sdk_ssm, ssm_rules, retry()),
            elb: aws_sdk_elasticloadbalancingv2::Client::new(&conf),
            apigw: aws_sdk_apigateway::Client::new(&conf),
            backup: mocked!(aws_sdk_backup, none, retry()),
            ..crate::mock_client::unscripted()
        };
        let t = backup::Target {
            stack: STACK.into(),
            file_system_id: live.file_system_id().into(),
            file_system_arn: live.file_system_arn().unwrap_or_default().into(),
            vault: VAULT.into(),
            role_arn: ROLE.into(),
            instance_id: INSTANCE.into(),
        };
        let progress = imgbuild::ui::progress::Progress::new(ui(), "moto");
        let (p, _) =
            backup::restore::promote(&clients, &ctx().config, &t, restored.file_system_id(), TOKEN, false, Duration::from_millis(50), &progress).await.unwrap();
        assert_eq!(p.kind, "consistent");
        assert_eq!(sent.lock().unwrap().len(), 1, "the promote ran once");
        let left = efs.describe_mount_targets().file_system_id(restored.file_system_id()).send().await.unwrap();
        assert!(left.mount_targets().is_empty(), "the temporary mount targets are gone: {left:?}");
        let kept = efs.describe_mount_targets().file_system_id(live.file_system_id()).send().await.unwrap();
        assert_eq!(kept.mount_targets().len(), 1, "the live file system's mount target is untouched");
    });
}

// ---------------------------------------------------------------------------------------------
// upgrade, end to end, then rollback from its record (issue 13's done-when: "upgrade and
// rollback shown against mocks, including a failed smoke that rolls back"). moto implements
// neither StartBackupJob (REFERENCE.md) nor executing the real template (its CloudFormation makes
// the NLB an application LB), so every call is scripted, in the shape cited at its fixture.

const STACK_ID: &str = "arn:aws:cloudformation:us-east-1:123456789012:stack/vectordb/6c1e5a30-0000-11ef-0000-0a1b2c3d4e5f";
const CS_ID: &str = "arn:aws:cloudformation:us-east-1:123456789012:changeSet/imgbuild-x/9f8e7d6c-0000-11ef-0000-0a1b2c3d4e5f";
/// The stock AL2023 image the stack runs before the upgrade (its ImageId parameter); the public
/// parameter has since moved on to `parameters()`'s ami-0123456789abcdef0.
const RUNNING_AMI: &str = "ami-0a1b2c3d4e5f60718";
const API_ID: &str = "a1b2c3d4e5";
const RESTORED_FS: &str = "fs-0fedcba9876543210";

/// The quiesce of the pre-upgrade data: Chroma 1.0.0 wrote it.
const QUIESCED_OLD: &str =
    "imgbuild-quiesce: copying\nIMGBUILD_RESULT status=ok token=1700000000-000000001 version=1.0.0 paused_ms=2350 bytes=73728 was_running=1\n";

/// The CloudFormation side of a deploy that executes: DescribeStacks, the change set, drift,
/// the stack policy, termination protection, ExecuteChangeSet and the events.
struct Cfn {
    rules: Vec<Rule>,
    change_sets: Seen<aws_sdk_cloudformation::operation::create_change_set::CreateChangeSetInput>,
    execute: Rule,
}

fn cfn_deploy() -> Cfn {
    use aws_sdk_cloudformation::operation as op;
    use aws_sdk_cloudformation::types as t;
    // ExecuteChangeSet: no response elements (CloudFormation API reference, ExecuteChangeSet).
    let execute = mock!(aws_sdk_cloudformation::Client::execute_change_set)
        .match_requests(|r| r.change_set_name() == Some(CS_ID))
        .then_output(|| op::execute_change_set::ExecuteChangeSetOutput::builder().build());
    // DescribeStacks (aws-cli examples/cloudformation/describe-stacks.rst: StackStatus,
    // Parameters, Outputs): the deployed stack with the outputs infra/stack.yaml declares; once the
    // change set is executed, UPDATE_IN_PROGRESS for one read, then UPDATE_COMPLETE.
    let executed = execute.clone();
    let reads_after = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let describe = mock!(aws_sdk_cloudformation::Client::describe_stacks).match_requests(|r| r.stack_name() == Some(STACK)).then_compute_output(move |_| {
        let status = if executed.num_calls() > 0 && reads_after.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            t::StackStatus::UpdateInProgress
        } else {
            t::StackStatus::UpdateComplete
        };
        let out = |k: &str, v: &str| t::Output::builder().output_key(k).output_value(v).build();
        let param = |k: &str, v: &str| t::Parameter::builder().parameter_key(k).parameter_value(v).build();
        op::describe_stacks::DescribeStacksOutput::builder()
            .stacks(
                t::Stack::builder()
                    .stack_name(STACK)
                    .stack_id(STACK_ID)
                    .stack_status(status)
                    .creation_time(aws_smithy_types::DateTime::from_secs(1_700_000_000))
                    .enable_termination_protection(true)
                    .parameters(param("ImageId", RUNNING_AMI))
                    .parameters(param("FileSystemId", ""))
                    .parameters(param("ChromaVersion", "1.0.0"))
                    .outputs(out("FileSystemId", FS_ID))
                    .outputs(out("BackupVaultName", VAULT))
                    .outputs(out("BackupRoleArn", ROLE))
                    .outputs(out("ApiId", API_ID))
                    .build(),
            )
            .build()
    });
    let change_sets: Seen<op::create_change_set::CreateChangeSetInput> = Arc::default();
    let seen = change_sets.clone();
    // CreateChangeSet answers Id and StackId (aws-cli examples/cloudformation/create-change-set.rst).
    let create = mock!(aws_sdk_cloudformation::Client::create_change_set)
        .match_requests(move |r| {
            seen.lock().unwrap().push(r.clone());
            true
        })
        .then_output(|| op::create_change_set::CreateChangeSetOutput::builder().id(CS_ID).stack_id(STACK_ID).build());
    // DescribeChangeSet: CREATE_COMPLETE, the launch template modified in place (aws-cli
    // examples/cloudformation/describe-change-set.rst: Changes[].ResourceChange).
    let ready = mock!(aws_sdk_cloudformation::Client::describe_change_set).then_output(|| {
        op::describe_change_set::DescribeChangeSetOutput::builder()
            .change_set_id(CS_ID)
            .stack_id(STACK_ID)
            .status(t::ChangeSetStatus::CreateComplete)
            .changes(
                t::Change::builder()
                    .r#type(t::ChangeType::Resource)
                    .resource_change(
                        t::ResourceChange::builder()
                            .action(t::ChangeAction::Modify)
                            .logical_resource_id("LaunchTemplate")
                            .resource_type("AWS::EC2::LaunchTemplate")
                            .replacement(t::Replacement::False)
                            .build(),
                    )
                    .build(),
            )
            .build()
    });
    // Drift before an update (aws-cli examples/cloudformation/detect-stack-drift.rst,
    // describe-stack-drift-detection-status.rst, describe-stack-resource-drifts.rst): in sync.
    let detect = mock!(aws_sdk_cloudformation::Client::detect_stack_drift)
        .then_output(|| op::detect_stack_drift::DetectStackDriftOutput::builder().stack_drift_detection_id("1a229160-e4d9-xmpl-ab67-0a4f93df83d4").build());
    let detection = mock!(aws_sdk_cloudformation::Client::describe_stack_drift_detection_status).then_output(|| {
        op::describe_stack_drift_detection_status::DescribeStackDriftDetectionStatusOutput::builder()
            .stack_id(STACK_ID)
            .stack_drift_detection_id("1a229160-e4d9-xmpl-ab67-0a4f93df83d4")
            .stack_drift_status(t::StackDriftStatus::InSync)
            .detection_status(t::StackDriftDetectionStatus::DetectionComplete)
            .drifted_stack_resource_count(0)
            .timestamp(aws_smithy_types::DateTime::from_secs(1_700_000_000))
            .build()
    });
    let drifts = mock!(aws_sdk_cloudformation::Client::describe_stack_resource_drifts)
        .then_output(|| op::describe_stack_resource_drifts::DescribeStackResourceDriftsOutput::builder().set_stack_resource_drifts(Some(vec![])).build());
    // SetStackPolicy: no response elements; UpdateTerminationProtection: StackId (API reference).
    let policy = mock!(aws_sdk_cloudformation::Client::set_stack_policy).then_output(|| op::set_stack_policy::SetStackPolicyOutput::builder().build());
    let protection = mock!(aws_sdk_cloudformation::Client::update_termination_protection)
        .then_output(|| op::update_termination_protection::UpdateTerminationProtectionOutput::builder().stack_id(STACK_ID).build());
    // DescribeStackEvents: none new (CloudFormation API reference, DescribeStackEvents: StackEvents).
    let events =
        mock!(aws_sdk_cloudformation::Client::describe_stack_events).then_output(|| op::describe_stack_events::DescribeStackEventsOutput::builder().build());
    let rules = vec![describe, create, ready, detect, detection, drifts, policy, protection, execute.clone(), events];
    Cfn { rules, change_sets, execute }
}

/// DescribeImages of the running image: stock AL2023, no imgbuild tags (aws-cli
/// examples/ec2/describe-images.rst: ImageId, Architecture, Tags).
fn running_image() -> Rule {
    mock!(aws_sdk_ec2::Client::describe_images).match_requests(|r| r.image_ids() == [RUNNING_AMI]).then_output(|| {
        aws_sdk_ec2::operation::describe_images::DescribeImagesOutput::builder()
            .images(
                aws_sdk_ec2::types::Image::builder()
                    .image_id(RUNNING_AMI)
                    .name("al2023-ami-2023.6.20241010.0-kernel-6.1-x86_64")
                    .architecture(aws_sdk_ec2::types::ArchitectureValues::X8664)
                    .state(aws_sdk_ec2::types::ImageState::Available)
                    .owner_id("137112412989")
                    .build(),
            )
            .build()
    })
}

/// API Gateway: GetAccount without a logging role (aws-cli examples/apigateway/get-account.rst),
/// the API's resources (get-resources.rst), and test-invoke answering `status` (TestInvokeMethod,
/// API reference: status, body, latency; test-invoke-method.rst), capturing the paths.
fn apigw(status: i32, invoked: Seen<String>) -> Vec<Rule> {
    use aws_sdk_apigateway::operation as op;
    let account = mock!(aws_sdk_apigateway::Client::get_account).then_output(|| {
        op::get_account::GetAccountOutput::builder()
            .throttle_settings(aws_sdk_apigateway::types::ThrottleSettings::builder().burst_limit(5000).rate_limit(10000.0).build())
            .build()
    });
    let resources = mock!(aws_sdk_apigateway::Client::get_resources).match_requests(|r| r.rest_api_id() == Some(API_ID)).then_output(|| {
        op::get_resources::GetResourcesOutput::builder()
            .items(aws_sdk_apigateway::types::Resource::builder().id("root1").path("/").build())
            .items(aws_sdk_apigateway::types::Resource::builder().id("prx1").parent_id("root1").path_part("{proxy+}").path("/{proxy+}").build())
            .build()
    });
    let invoke = mock!(aws_sdk_apigateway::Client::test_invoke_method)
        .match_requests(move |r| {
            invoked.lock().unwrap().push(r.path_with_query_string().unwrap_or_default().to_string());
            true
        })
        .then_output(move || {
            op::test_invoke_method::TestInvokeMethodOutput::builder()
                .status(status)
                .body(if status == 200 { "{\"nanosecond heartbeat\":1}" } else { "{\"error\":\"InternalError\"}" })
                .latency(9)
                .build()
        });
    vec![account, resources, invoke]
}

fn clients_of(cfn: &[Rule], ec2: &[Rule], efs: &[Rule], ssm: &[Rule], backup: &[Rule], apigw: &[Rule]) -> Clients {
    let none: Vec<Rule> = Vec::new();
    Clients {
        cfn: mocked!(aws_sdk_cloudformation, cfn, retry()),
        ec2: mocked!(aws_sdk_ec2, ec2, retry()),
        efs: mocked!(aws_sdk_efs, efs, retry()),
        ssm: mocked!(aws_sdk_ssm, ssm, retry()),
        elb: mocked!(aws_sdk_elasticloadbalancingv2, none, retry()),
        apigw: mocked!(aws_sdk_apigateway, apigw, retry()),
        backup: mocked!(aws_sdk_backup, backup, retry()),
        ..crate::mock_client::unscripted()
    }
}

/// The project: Chroma 1.0.0 in a config file (the rollback record is written next to it).
fn project(dir: &std::path::Path) -> Context {
    let mut c = poll_fast(ctx());
    c.config.chroma.version = "1.0.0".into();
    c.source = Source::File(dir.join("imgbuild.yaml"));
    c
}

struct Upgraded {
    result: imgbuild::Result<serde_json::Value>,
    change_sets: Seen<aws_sdk_cloudformation::operation::create_change_set::CreateChangeSetInput>,
    jobs: Seen<aws_sdk_backup::operation::start_backup_job::StartBackupJobInput>,
    executed: usize,
    invoked: Vec<String>,
}

/// `imgbuild upgrade --to 1.5.9 --yes` of data Chroma 1.0.0 wrote, whose smoke gets 500s.
async fn failed_upgrade(c: &Context) -> Upgraded {
    let cfn = cfn_deploy();
    let jobs: Seen<aws_sdk_backup::operation::start_backup_job::StartBackupJobInput> = Arc::default();
    let mut ssm = marker_read("1.0.0\n");
    ssm.extend([send_command(Arc::default()), invocation(QUIESCED_OLD), inspected(), parameters()]);
    let invoked: Seen<String> = Arc::default();
    let clients = clients_of(
        &cfn.rules,
        &[instance(), running_image()],
        &[file_system()],
        &ssm,
        &[start_job(jobs.clone()), job_states("COMPLETED")],
        &apigw(500, invoked.clone()),
    );
    let mut args = upgrade_args("1.5.9", false);
    args.yes = true;
    let result = imgbuild::cmd::upgrade_flow(&clients, "us-east-1", &args, c, ui(), &NoConfirm, std::future::pending(), TOKEN).await;
    let invoked = invoked.lock().unwrap().clone();
    Upgraded { result, change_sets: cfn.change_sets, jobs, executed: cfn.execute.num_calls(), invoked }
}

/// The whole upgrade: the marker read through Run Command, the consistent backup tagged with the
/// version that wrote the data, the deploy of the new version (executed), and a smoke through API
/// Gateway's test-invoke that answers 500. The upgrade ends with the smoke's error naming
/// `imgbuild rollback`, and the record holds the image the stack ran (its ImageId parameter, not
/// what the public AL2023 parameter answers today) and the pre-upgrade recovery point.
#[tokio::test]
async fn an_upgrade_whose_smoke_fails_records_the_way_back_and_names_rollback() {
    let dir = tempfile::tempdir().unwrap();
    let c = project(dir.path());
    let up = failed_upgrade(&c).await;
    let err = up.result.unwrap_err();
    assert!(matches!(err, imgbuild::Error::SmokeFailed(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("Go back with `imgbuild rollback`") && msg.contains(RUNNING_AMI) && msg.contains(POINT), "{msg}");
    assert_eq!(up.executed, 1, "the new version was deployed before the smoke");
    assert_eq!(up.invoked.first().map(String::as_str), Some("/v2/heartbeat"), "the smoke ran through API Gateway: {:?}", up.invoked);

    // The new version reached CloudFormation; the image stayed the running one.
    let sets = up.change_sets.lock().unwrap();
    assert_eq!(sets.len(), 1);
    let sent: HashMap<&str, &str> =
        sets[0].parameters().iter().map(|p| (p.parameter_key().unwrap_or_default(), p.parameter_value().unwrap_or_default())).collect();
    assert_eq!(sent.get("ChromaVersion"), Some(&"1.5.9"));
    assert_eq!(sent.get("ImageId"), Some(&RUNNING_AMI));

    // The pre-upgrade recovery point says which version wrote its data: the old one.
    let jobs = up.jobs.lock().unwrap();
    assert_eq!(jobs.len(), 1);
    let tags = jobs[0].recovery_point_tags().unwrap();
    assert_eq!(tags.get("ImgbuildChromaVersion").map(String::as_str), Some("1.0.0"));
    assert_eq!(tags.get("ImgbuildBackupKind").map(String::as_str), Some("consistent"));

    let record: imgbuild::backup::upgrade::RollbackRecord =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("imgbuild.rollback.json")).unwrap()).unwrap();
    assert_eq!((record.stack.as_str(), record.from_version.as_str(), record.to_version.as_str()), (STACK, "1.0.0", "1.5.9"));
    assert_eq!(record.previous_image, RUNNING_AMI, "the image the stack ran, not today's AL2023 release");
    assert_eq!(record.previous_mode, Some(imgbuild::render::Mode::Full), "a stock image boots in full mode");
    assert_eq!(record.recovery_point, POINT);
}

/// Then `imgbuild rollback` from the record that upgrade wrote: the pre-upgrade recovery point is
/// restored into a new file system, and the stack is deployed onto it with the previous image and
/// the previous Chroma version, together. The previous image here is stock AL2023, which boots in
/// full mode: deploy refuses a stock image in baked mode (`--ami` defaults to baked), so the
/// record must carry the mode the image boots in.
#[tokio::test]
async fn rollback_after_a_failed_upgrade_restores_the_recorded_point_and_deploys_the_previous_image() {
    let dir = tempfile::tempdir().unwrap();
    let c = project(dir.path());
    assert!(failed_upgrade(&c).await.result.is_err());

    let World { rules, restore_seen, tagged, .. } = restore_world(point_tags(STACK, "1.0.0"));
    let cfn = cfn_deploy();
    // The restored file system as reattach reads it: available, encrypted (aws-cli
    // examples/efs/describe-file-systems.rst); PutFileSystemPolicy answers FileSystemId and
    // Policy (Amazon EFS API reference, PutFileSystemPolicy).
    let restored = mock!(aws_sdk_efs::Client::describe_file_systems).match_requests(|r| r.file_system_id() == Some(RESTORED_FS)).then_output(|| {
        aws_sdk_efs::operation::describe_file_systems::DescribeFileSystemsOutput::builder()
            .file_systems(
                aws_sdk_efs::types::FileSystemDescription::builder()
                    .file_system_id(RESTORED_FS)
                    .file_system_arn(format!("arn:aws:elasticfilesystem:us-east-1:123456789012:file-system/{RESTORED_FS}"))
                    .owner_id("123456789012")
                    .creation_token(format!("imgbuild-restore-{TOKEN}"))
                    .creation_time(aws_smithy_types::DateTime::from_secs(1_700_000_500))
                    .life_cycle_state(aws_sdk_efs::types::LifeCycleState::Available)
                    .number_of_mount_targets(0)
                    .encrypted(true)
                    .size_in_bytes(aws_sdk_efs::types::FileSystemSize::builder().value(6144).build())
                    .performance_mode(aws_sdk_efs::types::PerformanceMode::GeneralPurpose)
                    .tags(aws_sdk_efs::types::Tag::builder().key("Name").value("vectordb-restored").build().unwrap())
                    .build()
                    .unwrap(),
            )
            .build()
    });
    let policy = mock!(aws_sdk_efs::Client::put_file_system_policy)
        .match_requests(|r| r.file_system_id() == Some(RESTORED_FS))
        .then_output(|| aws_sdk_efs::operation::put_file_system_policy::PutFileSystemPolicyOutput::builder().file_system_id(RESTORED_FS).build());
    let mut efs = rules.efs.clone();
    efs.extend([restored, policy]);
    let mut ec2 = rules.ec2.clone();
    ec2.push(running_image());
    let clients = clients_of(&cfn.rules, &ec2, &efs, &rules.ssm, &rules.backup, &apigw(200, Arc::default()));
    let args = RollbackArgs { yes: true, wait: WaitArgs { wait: false, timeout: Some(60) } };
    let doc = imgbuild::cmd::rollback_flow(&clients, &args, &c, ui(), &NoConfirm, std::future::pending(), TOKEN).await.unwrap();

    assert_eq!(doc["rollback"]["previous_image"], RUNNING_AMI);
    let restores = restore_seen.lock().unwrap();
    assert_eq!(restores.len(), 1);
    assert_eq!(restores[0].recovery_point_arn(), Some(POINT), "the pre-upgrade point is what is restored");
    assert_eq!(cfn.execute.num_calls(), 1);
    let sets = cfn.change_sets.lock().unwrap();
    assert_eq!(sets.len(), 1);
    let sent: HashMap<&str, &str> =
        sets[0].parameters().iter().map(|p| (p.parameter_key().unwrap_or_default(), p.parameter_value().unwrap_or_default())).collect();
    assert_eq!(sent.get("ImageId"), Some(&RUNNING_AMI), "the previous image");
    assert_eq!(sent.get("ChromaVersion"), Some(&"1.0.0"), "the version that wrote the restored data");
    assert_eq!(sent.get("FileSystemId"), Some(&RESTORED_FS), "onto the restored file system");
    assert!(tagged.lock().unwrap().iter().any(|(fs, name)| fs == FS_ID && name.contains("before-restore")), "the old file system is kept and named");
}
