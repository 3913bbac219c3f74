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
