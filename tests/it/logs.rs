//! `imgbuild logs` against scripted AWS answers (aws-smithy-mocks): moto implements neither SSM
//! Run Command's invocations with real output nor Automation executions (REFERENCE.md), so every
//! service answers in its documented shape, cited at each fixture. The script itself runs under
//! the boot harness (boot.rs, `diagnose_*`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_smithy_mocks::{Rule, mock};
use aws_smithy_types::retry::RetryConfig;
use base64::Engine;

use imgbuild::aws::Clients;
use imgbuild::cli::{LogsArgs, OutputFormat};
use imgbuild::ui::Ui;

use crate::support::parse;

const STACK: &str = "vectordb";
const INSTANCE: &str = "i-1234567890abcdef0";
const OLDER: &str = "i-0fedcba9876543210";
// aws-cli awscli/examples/ssm/send-command.rst: Command.CommandId.
const COMMAND: &str = "5b72ef27-0d94-4ac5-9d3c-2f43e2a1d0b1";
const FAILED_EXEC: &str = "4105a4fc-f944-11e6-9d32-8fb2db27a909";
const GOOD_EXEC: &str = "0a1b2c3d-f944-11e6-9d32-8fb2db27a909";
// The secrets a log can carry, in the shapes AWS documents them: the example keys of the IAM User
// Guide ("Manage access keys for IAM users": AKIAIOSFODNN7EXAMPLE / wJalrXUtnFEMI/...), an IMDSv2
// token and IMDS's iam/security-credentials JSON (EC2 User Guide, "Retrieve security credentials
// from instance metadata": AccessKeyId, SecretAccessKey, Token).
const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
const KEY_ID: &str = "AKIAIOSFODNN7EXAMPLE";
const SESSION: &str = "IQoJb3JpZ2luX2VjEXAMPLETOKENvalue";
const IMDS_TOKEN: &str = "AQAEAFTNrA4eEGx0AQgJ1arIq";

fn retry() -> RetryConfig {
    RetryConfig::standard().with_initial_backoff(Duration::from_millis(1))
}

type Seen<T> = Arc<Mutex<Vec<T>>>;

/// DescribeInstances filtered by the stack tag and state (aws-cli
/// awscli/examples/ec2/describe-instances.rst: Reservations[].Instances[] with InstanceId,
/// LaunchTime, State): two running during a replacement, the newer one is asked.
fn instances() -> Rule {
    mock!(aws_sdk_ec2::Client::describe_instances)
        .match_requests(|r| r.filters().iter().any(|f| f.name() == Some("tag:ImgbuildStackName") && f.values() == [STACK]))
        .then_output(|| {
            use aws_sdk_ec2::types::{Instance, InstanceState, InstanceStateName, Reservation};
            let inst = |id: &str, launched: i64| {
                Instance::builder()
                    .instance_id(id)
                    .launch_time(aws_smithy_types::DateTime::from_secs(launched))
                    .state(InstanceState::builder().name(InstanceStateName::Running).build())
                    .build()
            };
            aws_sdk_ec2::operation::describe_instances::DescribeInstancesOutput::builder()
                .reservations(Reservation::builder().instances(inst(OLDER, 1_700_000_000)).instances(inst(INSTANCE, 1_700_003_600)).build())
                .build()
        })
}

/// SendCommand (aws-cli awscli/examples/ssm/send-command.rst: Command with CommandId,
/// DocumentName, InstanceIds), capturing the request.
fn send_command(seen: Seen<aws_sdk_ssm::operation::send_command::SendCommandInput>) -> Rule {
    mock!(aws_sdk_ssm::Client::send_command)
        .match_requests(move |r| {
            seen.lock().unwrap().push(r.clone());
            true
        })
        .then_output(|| {
            aws_sdk_ssm::operation::send_command::SendCommandOutput::builder()
                .command(aws_sdk_ssm::types::Command::builder().command_id(COMMAND).document_name("AWS-RunShellScript").instance_ids(INSTANCE).build())
                .build()
        })
}

/// The token this run put in the script's environment (IMGBUILD_TOKEN='...').
fn token_of(seen: &Seen<aws_sdk_ssm::operation::send_command::SendCommandInput>) -> String {
    let line = seen.lock().unwrap()[0].parameters().unwrap()["commands"][0].clone();
    line.split("IMGBUILD_TOKEN='").nth(1).unwrap().split('\'').next().unwrap().to_string()
}

/// GetCommandInvocation (aws-cli awscli/examples/ssm/get-command-invocation.rst: Status,
/// ResponseCode, StandardOutputContent): InProgress once, then Success with what the script
/// prints, here with secrets that reached the logs past the script's own masking.
fn invocation(seen: Seen<aws_sdk_ssm::operation::send_command::SendCommandInput>) -> Rule {
    let seen2 = seen.clone();
    mock!(aws_sdk_ssm::Client::get_command_invocation)
        .match_requests(|r| r.command_id() == Some(COMMAND) && r.instance_id() == Some(INSTANCE))
        .sequence()
        .output(|| {
            aws_sdk_ssm::operation::get_command_invocation::GetCommandInvocationOutput::builder()
                .command_id(COMMAND)
                .instance_id(INSTANCE)
                .status(aws_sdk_ssm::types::CommandInvocationStatus::InProgress)
                .response_code(-1)
                .build()
        })
        .output(move || {
            let token = token_of(&seen2);
            let stdout = format!(
                "===== imgbuild-logs cloud-init-status =====\n/run/cloud-init/result.json:\n{{\"v1\": {{\"errors\": []}}}}\n\
                 ===== imgbuild-logs chroma-journal =====\nimgbuild-start: env AWS_SESSION_TOKEN={SESSION} AWS_REGION=us-east-1\n\
                 curl -H 'X-aws-ec2-metadata-token: {IMDS_TOKEN}' http://169.254.169.254/latest/meta-data/iam/security-credentials/role\n\
                 {{\"Code\": \"Success\", \"AccessKeyId\": \"ASIAIOSFODNN7EXAMPLE\", \"SecretAccessKey\": \"{SECRET}\", \"Token\": \"{SESSION}\"}}\n\
                 aws_access_key_id = {KEY_ID}\naws_secret_access_key={SECRET}\n\
                 ===== imgbuild-logs mount =====\nmounted: /mnt/chroma\n\
                 ===== imgbuild-logs writer-lock =====\nheld: /mnt/chroma/.imgbuild-writer.lock\n\
                 ===== imgbuild-logs boot-guard =====\ninstall: complete (ghcr.io/chroma-core/chroma:1.5.9)\nno refusal\nchroma.service: active\n\
                 IMGBUILD_LOGS_END token={token}\n"
            );
            aws_sdk_ssm::operation::get_command_invocation::GetCommandInvocationOutput::builder()
                .command_id(COMMAND)
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

/// DescribeStackEvents, newest first (aws-cli awscli/examples/cloudformation/describe-stack-events.rst:
/// StackEvents[] with LogicalResourceId, ResourceType, ResourceStatus, ResourceStatusReason,
/// Timestamp): the latest update failed on the launch template first, the group second; an older
/// operation's failure lies before the update's start and is not the answer.
fn stack_events() -> Rule {
    mock!(aws_sdk_cloudformation::Client::describe_stack_events).match_requests(|r| r.stack_name() == Some(STACK)).then_output(|| {
        use aws_sdk_cloudformation::types::{ResourceStatus, StackEvent};
        let ev = |id: &str, logical: &str, kind: &str, status: ResourceStatus, reason: &str, at: i64| {
            StackEvent::builder()
                .stack_id(format!("arn:aws:cloudformation:us-east-1:123456789012:stack/{STACK}/6b8f1a20-0000-11ef-9d32-0a1b2c3d4e5f"))
                .event_id(id)
                .stack_name(STACK)
                .logical_resource_id(logical)
                .resource_type(kind)
                .resource_status(status)
                .resource_status_reason(reason)
                .timestamp(aws_smithy_types::DateTime::from_secs(at))
                .build()
        };
        aws_sdk_cloudformation::operation::describe_stack_events::DescribeStackEventsOutput::builder()
            .stack_events(ev(
                "e6",
                STACK,
                "AWS::CloudFormation::Stack",
                ResourceStatus::UpdateRollbackInProgress,
                "The following resource(s) failed to update: [LaunchTemplate, AutoScalingGroup].",
                1_700_000_600,
            ))
            .stack_events(ev(
                "e5",
                "AutoScalingGroup",
                "AWS::AutoScaling::AutoScalingGroup",
                ResourceStatus::UpdateFailed,
                "Resource update cancelled",
                1_700_000_500,
            ))
            .stack_events(ev(
                "e4",
                "LaunchTemplate",
                "AWS::EC2::LaunchTemplate",
                ResourceStatus::UpdateFailed,
                "Resource handler returned message: \"The image id '[ami-0abcdef1234567890]' does not exist\"",
                1_700_000_400,
            ))
            .stack_events(ev("e3", STACK, "AWS::CloudFormation::Stack", ResourceStatus::UpdateInProgress, "User Initiated", 1_700_000_300))
            .stack_events(ev("e2", "FileSystem", "AWS::EFS::FileSystem", ResourceStatus::CreateFailed, "an older operation's failure", 1_600_000_200))
            .stack_events(ev("e1", STACK, "AWS::CloudFormation::Stack", ResourceStatus::CreateInProgress, "User Initiated", 1_600_000_100))
            .build()
    })
}

/// DescribeAutomationExecutions (aws-cli awscli/examples/ssm/describe-automation-executions.rst:
/// AutomationExecutionMetadataList[] with AutomationExecutionId, DocumentName,
/// AutomationExecutionStatus, ExecutionStartTime): the latest bake failed, an older one succeeded.
fn executions() -> Rule {
    mock!(aws_sdk_ssm::Client::describe_automation_executions).then_output(|| {
        use aws_sdk_ssm::types::{AutomationExecutionMetadata, AutomationExecutionStatus};
        let meta = |id: &str, status: AutomationExecutionStatus, at: i64| {
            AutomationExecutionMetadata::builder()
                .automation_execution_id(id)
                .document_name(format!("imgbuild-{STACK}-bake"))
                .automation_execution_status(status)
                .execution_start_time(aws_smithy_types::DateTime::from_secs(at))
                .build()
        };
        aws_sdk_ssm::operation::describe_automation_executions::DescribeAutomationExecutionsOutput::builder()
            .automation_execution_metadata_list(meta(GOOD_EXEC, AutomationExecutionStatus::Success, 1_700_000_000))
            .automation_execution_metadata_list(meta(FAILED_EXEC, AutomationExecutionStatus::Failed, 1_700_100_000))
            .build()
    })
}

/// GetAutomationExecution (aws-cli awscli/examples/ssm/get-automation-execution.rst:
/// AutomationExecution.StepExecutions[] with StepName, Action, StepStatus, FailureMessage,
/// Outputs): the install step (aws:runCommand, whose Outputs carry `Output`) failed.
fn failed_execution() -> Rule {
    mock!(aws_sdk_ssm::Client::get_automation_execution).match_requests(|r| r.automation_execution_id() == Some(FAILED_EXEC)).then_output(|| {
        use aws_sdk_ssm::types::{AutomationExecution, AutomationExecutionStatus, StepExecution};
        let step = |name: &str, action: &str, status: AutomationExecutionStatus| StepExecution::builder().step_name(name).action(action).step_status(status);
        aws_sdk_ssm::operation::get_automation_execution::GetAutomationExecutionOutput::builder()
            .automation_execution(
                AutomationExecution::builder()
                    .automation_execution_id(FAILED_EXEC)
                    .automation_execution_status(AutomationExecutionStatus::Failed)
                    .step_executions(step("launch", "aws:runInstances", AutomationExecutionStatus::Success).build())
                    .step_executions(
                        step("install", "aws:runCommand", AutomationExecutionStatus::Failed)
                            .failure_message("Step fails when it is Poll action status for runCommand. Command failed with exit code 1.")
                            .outputs("Output", vec![format!("imgbuild-install: docker pull failed\nAWS_SECRET_ACCESS_KEY={SECRET}")])
                            .build(),
                    )
                    .build(),
            )
            .build()
    })
}

fn clients(seen: &Seen<aws_sdk_ssm::operation::send_command::SendCommandInput>) -> Clients {
    let none: Vec<Rule> = Vec::new();
    Clients {
        cfn: mocked!(aws_sdk_cloudformation, [stack_events()], retry()),
        ec2: mocked!(aws_sdk_ec2, [instances()], retry()),
        efs: mocked!(aws_sdk_efs, none, retry()),
        ssm: mocked!(aws_sdk_ssm, [send_command(seen.clone()), invocation(seen.clone()), executions(), failed_execution()], retry()),
        elb: mocked!(aws_sdk_elasticloadbalancingv2, none, retry()),
        apigw: mocked!(aws_sdk_apigateway, none, retry()),
        backup: mocked!(aws_sdk_backup, none, retry()),
        ..crate::mock_client::unscripted()
    }
}

fn config() -> imgbuild::config::Config {
    parse(&format!("name: {STACK}\naws:\n  poll_interval_secs: 1\n"))
}

/// The whole report: the newest instance asked through AWS-RunShellScript with exactly the
/// diagnose script, its sections, the first failure of the latest stack operation, the failed
/// bake's step and output; the bundle holds all of it, private to its owner, and no credential
/// or token in any form appears in the report or the bundle.
#[tokio::test]
async fn logs_collects_every_part_and_the_bundle_carries_no_credentials() {
    let seen: Seen<aws_sdk_ssm::operation::send_command::SendCommandInput> = Arc::default();
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    let args = LogsArgs { out: Some(bundle.clone()), lines: 200, instance: None, timeout: 60, follow: false, interval: 5, duration: None };
    let doc = imgbuild::cmd::logs_flow(&clients(&seen), &config(), &args, Ui::new(OutputFormat::Json, 0, true)).await.unwrap();

    let sent = seen.lock().unwrap().clone();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].document_name(), Some("AWS-RunShellScript"));
    assert_eq!(sent[0].instance_ids(), [INSTANCE], "the newest of the two running instances");
    let line = &sent[0].parameters().unwrap()["commands"][0];
    let b64 = line.strip_prefix("echo ").unwrap().split(' ').next().unwrap();
    assert_eq!(base64::engine::general_purpose::STANDARD.decode(b64).unwrap(), imgbuild::backup::diagnose::DIAGNOSE_SCRIPT.as_bytes());
    assert!(line.contains("IMGBUILD_LINES='200'") && line.ends_with("bash -s"), "{line}");

    assert_eq!(doc["instance"]["instance"], INSTANCE);
    assert_eq!(doc["instance"]["complete"], true);
    assert_eq!(doc["instance"]["sections"]["mount"], "mounted: /mnt/chroma\n");
    assert_eq!(doc["instance"]["sections"]["boot-guard"], "install: complete (ghcr.io/chroma-core/chroma:1.5.9)\nno refusal\nchroma.service: active\n");
    assert!(doc["notes"][0].as_str().unwrap().contains("2 running instances"), "{doc}");
    assert_eq!(doc["stack_failure"]["logical_id"], "LaunchTemplate", "{doc}");
    assert_eq!(doc["stack_failure"]["status"], "UPDATE_FAILED");
    assert_eq!(doc["bake_failure"]["execution"], FAILED_EXEC);
    assert_eq!(doc["bake_failure"]["step"], "install");
    assert_eq!(doc["bake_failure"]["action"], "aws:runCommand");
    assert!(doc["bake_failure"]["output"].as_str().unwrap().starts_with("imgbuild-install: docker pull failed\nAWS_SECRET_ACCESS_KEY=<redacted>"));

    let journal = doc["instance"]["sections"]["chroma-journal"].as_str().unwrap();
    assert!(journal.contains("AWS_SESSION_TOKEN=<redacted>") && journal.contains("X-aws-ec2-metadata-token: <redacted>"), "{journal}");
    assert!(journal.contains("\"SecretAccessKey\": \"<redacted>\"") && journal.contains("aws_secret_access_key=<redacted>"), "{journal}");

    let text = std::fs::read_to_string(bundle.join("logs.txt")).unwrap();
    let json = std::fs::read_to_string(bundle.join("logs.json")).unwrap();
    assert!(text.contains("UPDATE_FAILED LaunchTemplate (AWS::EC2::LaunchTemplate)") && text.contains("### boot-guard"), "{text}");
    let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(parsed["stack_failure"]["logical_id"], "LaunchTemplate");
    for content in [&text, &json, &doc.to_string()] {
        for secret in [SECRET, KEY_ID, "ASIAIOSFODNN7EXAMPLE", SESSION, IMDS_TOKEN] {
            assert!(!content.contains(secret), "{secret} leaked:\n{content}");
        }
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&bundle).unwrap().permissions().mode() & 0o777, 0o700);
    assert_eq!(std::fs::metadata(bundle.join("logs.json")).unwrap().permissions().mode() & 0o777, 0o600);
}

/// What cannot be read is said, and the rest still comes: a stack with no running instance
/// sends no command.
#[tokio::test]
async fn logs_without_a_running_instance_reports_it_and_still_reads_the_stack_and_bake() {
    let seen: Seen<aws_sdk_ssm::operation::send_command::SendCommandInput> = Arc::default();
    let mut c = clients(&seen);
    // aws-cli awscli/examples/ec2/describe-instances.rst, nothing matching: no reservations.
    c.ec2 = mocked!(
        aws_sdk_ec2,
        [mock!(aws_sdk_ec2::Client::describe_instances).then_output(|| aws_sdk_ec2::operation::describe_instances::DescribeInstancesOutput::builder().build())],
        retry()
    );
    let args = LogsArgs { out: None, lines: 50, instance: None, timeout: 60, follow: false, interval: 5, duration: None };
    let doc = imgbuild::cmd::logs_flow(&c, &config(), &args, Ui::new(OutputFormat::Json, 0, true)).await.unwrap();
    assert!(seen.lock().unwrap().is_empty());
    assert!(doc["instance"].is_null());
    assert!(doc["notes"][0].as_str().unwrap().contains("has no running instance"), "{doc}");
    assert_eq!(doc["stack_failure"]["logical_id"], "LaunchTemplate");
    assert_eq!(doc["bake_failure"]["step"], "install");
}

/// A mistyped --instance is bad input, named, before any call.
#[tokio::test]
async fn logs_refuses_an_instance_id_that_is_not_one() {
    let seen: Seen<aws_sdk_ssm::operation::send_command::SendCommandInput> = Arc::default();
    let args = LogsArgs { out: None, lines: 50, instance: Some("i-xyz; reboot".into()), timeout: 60, follow: false, interval: 5, duration: None };
    let err = imgbuild::cmd::logs_flow(&clients(&seen), &config(), &args, Ui::new(OutputFormat::Json, 0, true)).await.unwrap_err();
    assert!(matches!(err, imgbuild::Error::Invalid(ref m) if m.starts_with("--instance: `i-xyz; reboot`")), "{err}");
    assert!(seen.lock().unwrap().is_empty());
}

#[test]
fn redaction_masks_each_documented_credential_shape_and_keeps_the_rest() {
    use imgbuild::backup::diagnose::redact;
    assert_eq!(redact("AWS_SECRET_ACCESS_KEY=abc/def+g x=1\n"), "AWS_SECRET_ACCESS_KEY=<redacted> x=1\n");
    assert_eq!(redact("[default]\naws_secret_access_key = abc\nregion = us-east-1"), "[default]\naws_secret_access_key = <redacted>\nregion = us-east-1");
    assert_eq!(redact("Authorization: AWS4-HMAC-SHA256 Credential=x"), "Authorization: <redacted> Credential=x");
    assert_eq!(redact("key AKIAIOSFODNN7EXAMPLE used"), "key <redacted> used");
    assert_eq!(redact("\"Token\" : \"abc==\""), "\"Token\" : \"<redacted>\"");
    assert_eq!(redact("MY_AWS_THING=keep NOTAKIAIOSFODNN7EXAMPLE"), "MY_AWS_THING=keep NOTAKIAIOSFODNN7EXAMPLE");
}

// ---- imgbuild logs --follow ----
//
// Each poll is SendCommand (aws-cli awscli/examples/ssm/send-command.rst: Command.CommandId) then
// GetCommandInvocation (aws-cli awscli/examples/ssm/get-command-invocation.rst: Status,
// ResponseCode, StandardOutputContent, StandardErrorContent); a poll cut short is CancelCommand
// (aws-cli awscli/examples/ssm/cancel-command.rst: CommandId, no output). The instance's side is
// `docker logs --timestamps`, which prefixes each entry with an RFC3339Nano timestamp such as
// 2014-09-16T06:17:46.000000000Z (Docker CLI reference, docker container logs).

use std::sync::atomic::{AtomicUsize, Ordering};

use imgbuild::backup::follow::{self, Event, Follower, LogLine};

fn ll(time: &str, line: &str) -> LogLine {
    LogLine { time: time.into(), line: line.into() }
}

const T1: &str = "2026-11-29T15:00:01.000000001Z";
const T2: &str = "2026-11-29T15:00:02.500000000Z";
const T3: &str = "2026-11-29T15:00:03.000000000Z";
const T4: &str = "2026-11-29T15:00:04.123456789Z";

/// `--since` names the newest instant shown, so entries at that instant come again; two entries
/// may share an instant; a poll's output may be cut at a line's end. Across all of it each line
/// is shown once, in order.
#[test]
fn the_follower_neither_loses_nor_repeats_lines_across_polls() {
    let mut f = Follower::default();
    let first = f.command(50);
    assert!(first[0].contains("docker logs --timestamps --tail 50 'chroma'"), "{first:?}");
    assert_eq!(f.take(&format!("{T1} started\n{T2} a\n{T2} b\n")), [ll(T1, "started"), ll(T2, "a"), ll(T2, "b")]);
    assert!(f.command(50)[0].contains(&format!("docker logs --timestamps --since '{T2}' 'chroma'")), "{:?}", f.command(50));
    // The instant itself again, then a new entry at the same instant, then later ones (this poll
    // stopped early: the next goes on from T3).
    assert_eq!(f.take(&format!("{T2} a\n{T2} b\n{T2} c\n{T3} d\n")), [ll(T2, "c"), ll(T3, "d")]);
    assert!(f.command(50)[0].contains(&format!("--since '{T3}'")));
    assert_eq!(f.take(&format!("{T3} d\n{T4} e\n")), [ll(T4, "e")]);
    assert_eq!(f.take(&format!("{T4} e\n")), []);
    // An identical line at a new instant is a new line; an older one is not shown again.
    assert_eq!(f.take(&format!("{T1} started\n{T4} e\n2026-11-29T15:00:05Z e\n")), [ll("2026-11-29T15:00:05Z", "e")]);
    // Each poll keeps its output under what GetCommandInvocation returns (24,000 characters).
    assert!(f.command(1)[0].contains("awk -v max=20000"));
}

type Sent = Arc<Mutex<Vec<aws_sdk_ssm::operation::send_command::SendCommandInput>>>;

/// SendCommand answering a new CommandId each poll (cmd-1, cmd-2, ...), capturing the request.
fn sends(seen: Sent) -> Rule {
    let n = Arc::new(AtomicUsize::new(0));
    mock!(aws_sdk_ssm::Client::send_command)
        .match_requests(move |r| {
            seen.lock().unwrap().push(r.clone());
            true
        })
        .then_compute_output(move |_| {
            let id = format!("cmd-{}", n.fetch_add(1, Ordering::SeqCst) + 1);
            aws_sdk_ssm::operation::send_command::SendCommandOutput::builder()
                .command(aws_sdk_ssm::types::Command::builder().command_id(id).document_name("AWS-RunShellScript").instance_ids(INSTANCE).build())
                .build()
        })
}

/// GetCommandInvocation answering each poll by its CommandId from `script` (status, stdout):
/// polls past the script succeed with no new output.
fn invocations(script: Vec<(&'static str, String)>) -> Rule {
    mock!(aws_sdk_ssm::Client::get_command_invocation).then_compute_output(move |r| {
        use aws_sdk_ssm::types::CommandInvocationStatus as S;
        let i: usize = r.command_id().unwrap().trim_start_matches("cmd-").parse().unwrap();
        let (status, stdout) = script.get(i - 1).cloned().unwrap_or(("Success", String::new()));
        let b = aws_sdk_ssm::operation::get_command_invocation::GetCommandInvocationOutput::builder()
            .command_id(r.command_id().unwrap())
            .instance_id(INSTANCE)
            .document_name("AWS-RunShellScript");
        match status {
            "Success" => b.status(S::Success).response_code(0).standard_output_content(stdout).standard_error_content(""),
            "InProgress" => b.status(S::InProgress).response_code(-1),
            _ => b.status(S::Failed).response_code(1).standard_output_content("").standard_error_content(stdout),
        }
        .build()
    })
}

type Cancelled = Arc<Mutex<Vec<(String, Vec<String>)>>>;

fn cancels(seen: Cancelled) -> Rule {
    mock!(aws_sdk_ssm::Client::cancel_command)
        .match_requests(move |r| {
            seen.lock().unwrap().push((r.command_id().unwrap_or_default().to_string(), r.instance_ids().to_vec()));
            true
        })
        .then_output(|| aws_sdk_ssm::operation::cancel_command::CancelCommandOutput::builder().build())
}

fn follow_clients(rules: Vec<Rule>) -> Clients {
    Clients { ec2: mocked!(aws_sdk_ec2, [instances()], retry()), ssm: mocked!(aws_sdk_ssm, rules, retry()), ..crate::mock_client::unscripted() }
}

fn opts(interval_ms: u64, until_ms: Option<u64>) -> follow::Options {
    follow::Options {
        interval: Duration::from_millis(interval_ms),
        until: until_ms.map(Duration::from_millis),
        tail: 20,
        command_timeout: Duration::from_secs(30),
        invocation_poll: Duration::from_millis(10),
    }
}

/// The whole command: the newest instance's log as NDJSON, each line once, credentials masked,
/// every poll after the first asking from the last timestamp shown, ended by --for.
#[tokio::test]
async fn logs_follow_prints_each_new_line_once_as_ndjson_until_the_duration_ends() {
    let seen: Sent = Arc::default();
    let c = follow_clients(vec![
        sends(seen.clone()),
        invocations(vec![
            ("Success", format!("{T1} chroma up\n{T2} env AWS_SECRET_ACCESS_KEY={SECRET}\n")),
            ("Success", format!("{T2} env AWS_SECRET_ACCESS_KEY={SECRET}\n{T3} GET /api/v2/heartbeat 200\n")),
        ]),
    ]);
    let args = LogsArgs { out: None, lines: 20, instance: None, timeout: 60, follow: true, interval: 1, duration: Some(Duration::from_millis(2500)) };
    let mut out: Vec<u8> = Vec::new();
    let ended = imgbuild::cmd::follow_flow(&c, &config(), &args, Ui::new(OutputFormat::Json, 0, true), std::future::pending(), &mut out).await.unwrap();
    assert_eq!((ended.reason, ended.cancelled.is_none()), ("duration", true), "{ended:?}");
    let text = String::from_utf8(out).unwrap();
    assert!(!text.contains(SECRET), "{text}");
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let got: Vec<(&str, &str)> = lines.iter().map(|v| (v["time"].as_str().unwrap(), v["line"].as_str().unwrap())).collect();
    assert_eq!(got, [(T1, "chroma up"), (T2, "env AWS_SECRET_ACCESS_KEY=<redacted>"), (T3, "GET /api/v2/heartbeat 200")]);
    assert!(lines.iter().all(|v| v["instance"] == INSTANCE), "the newest running instance");
    let sent = seen.lock().unwrap().clone();
    assert!(sent.len() >= 2, "{}", sent.len());
    assert!(sent.iter().all(|s| s.document_name() == Some("AWS-RunShellScript") && s.instance_ids() == [INSTANCE]));
    assert!(sent[0].parameters().unwrap()["commands"][0].contains("--tail 20"));
    assert!(sent[1].parameters().unwrap()["commands"][0].contains(&format!("--since '{T2}'")));
}

/// A failed poll (the instance answered Failed) is reported with its attempt number and retried;
/// the lines after it are neither lost nor repeated. Five failures in a row end the follow with
/// the last reason.
#[tokio::test]
async fn a_failed_poll_is_reported_and_retried_within_bounds() {
    let seen: Sent = Arc::default();
    let c = follow_clients(vec![
        sends(seen.clone()),
        invocations(vec![
            ("Success", format!("{T1} one\n")),
            ("Failed", "Cannot connect to the Docker daemon at unix:///var/run/docker.sock".into()),
            ("Success", format!("{T1} one\n{T2} two\n")),
        ]),
    ]);
    let mut events = Vec::new();
    let ended = follow::follow(&c, INSTANCE, &opts(10, Some(1500)), std::future::pending(), |e| {
        events.push(e);
        true
    })
    .await
    .unwrap();
    assert_eq!(ended.reason, "duration");
    assert_eq!(events[0], Event::Lines(vec![ll(T1, "one")]));
    match &events[1] {
        Event::PollFailed { attempt: 1, error, retry_in } => {
            assert!(error.contains("ended Failed") && error.contains("Cannot connect to the Docker daemon"), "{error}");
            assert_eq!(*retry_in, Duration::from_millis(10));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(events[2], Event::Lines(vec![ll(T2, "two")]));
    assert_eq!(events.len(), 3, "{events:?}");
    // The poll after a failure asks from the last line shown, not from where the failure was.
    assert!(seen.lock().unwrap()[2].parameters().unwrap()["commands"][0].contains(&format!("--since '{T1}'")));

    let failing: Vec<(&'static str, String)> = (0..10).map(|_| ("Failed", "imgbuild-follow: no container named chroma on this instance".to_string())).collect();
    let c = follow_clients(vec![sends(Arc::default()), invocations(failing)]);
    let mut failures = 0;
    let err = follow::follow(&c, INSTANCE, &opts(5, Some(60_000)), std::future::pending(), |e| {
        failures += matches!(e, Event::PollFailed { .. }) as u32;
        true
    })
    .await
    .unwrap_err();
    assert_eq!(failures, follow::MAX_FAILED_POLLS - 1, "each retried one is reported; the last ends it");
    assert!(err.to_string().contains("5 polls in a row failed") && err.to_string().contains("no container named chroma"), "{err}");
}

/// Ctrl-C while a poll runs on the instance cancels that command: nothing is left running.
#[tokio::test]
async fn ctrl_c_cancels_the_poll_in_flight() {
    let cancelled: Cancelled = Arc::default();
    let c = follow_clients(vec![sends(Arc::default()), invocations(vec![("InProgress", String::new())]), cancels(cancelled.clone())]);
    let ctrl_c = tokio::time::sleep(Duration::from_millis(200));
    let ended = follow::follow(&c, INSTANCE, &opts(10, None), ctrl_c, |_| true).await.unwrap();
    assert_eq!(ended.reason, "interrupted");
    assert_eq!(ended.cancelled.as_deref(), Some("cmd-1"));
    assert_eq!(ended.cancel_error, None);
    assert_eq!(cancelled.lock().unwrap().clone(), [("cmd-1".to_string(), vec![INSTANCE.to_string()])]);
}

#[test]
fn the_follow_flags_parse_and_refuse_what_makes_no_sense() {
    use clap::Parser;
    use imgbuild::cli::{Cli, Command};
    let parsed = Cli::try_parse_from(["imgbuild", "logs", "--follow", "--interval", "2", "--for", "10m"]).unwrap();
    let Command::Logs(a) = parsed.command else { panic!() };
    assert_eq!((a.follow, a.interval, a.duration), (true, 2, Some(Duration::from_secs(600))));
    for bad in [
        vec!["imgbuild", "logs", "--for", "10m"],
        vec!["imgbuild", "logs", "--follow", "--interval", "0"],
        vec!["imgbuild", "logs", "--follow", "--for", "10d"],
        vec!["imgbuild", "logs", "--follow", "--for", "0s"],
        vec!["imgbuild", "logs", "--follow", "--out", "dir"],
    ] {
        assert!(Cli::try_parse_from(&bad).is_err(), "{bad:?}");
    }
    assert_eq!(imgbuild::cli::parse_duration("90"), Ok(Duration::from_secs(90)));
    assert_eq!(imgbuild::cli::parse_duration("2h"), Ok(Duration::from_secs(7200)));
}

/// The poll's shell itself, under a stand-in `docker` (as the boot harness stubs commands): a
/// burst of output is cut at a line's end under 20,000 characters, so GetCommandInvocation (which
/// keeps 24,000) never truncates a line, and the next poll goes on from the last line shown; a
/// missing container is a failed poll with the reason on stderr.
#[test]
fn a_poll_stays_under_what_run_command_returns_and_cuts_at_a_line_end() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let docker = dir.path().join("docker");
    std::fs::write(
        &docker,
        "#!/bin/sh\ncase \"$1\" in\n  inspect) [ -z \"$NO_CONTAINER\" ] ;;\n  logs) i=0; while [ $i -lt 1000 ]; do printf '2026-11-29T15:00:01.%09dZ %s\\n' $i 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'; i=$((i+1)); done ;;\nesac\n",
    )
    .unwrap();
    std::fs::set_permissions(&docker, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", dir.path().display(), std::env::var("PATH").unwrap());
    let mut f = Follower::default();
    let run = |cmd: &str, no_container: bool| {
        let mut c = std::process::Command::new("sh");
        c.arg("-c").arg(cmd).env("PATH", &path);
        if no_container {
            c.env("NO_CONTAINER", "1");
        }
        c.output().unwrap()
    };
    let out = run(&f.command(20)[0], false);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.len() <= follow::MAX_POLL_CHARS && text.len() > 19_000, "{}", text.len());
    assert!(text.ends_with('\n'));
    let shown = f.take(&text);
    assert!(shown.iter().all(|l| l.line.len() == 86), "every line whole");
    let last = shown.last().unwrap().time.clone();
    assert!(f.command(20)[0].contains(&format!("--since '{last}'")));
    let missing = run(&f.command(20)[0], true);
    assert_eq!(missing.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no container named chroma"));
}
