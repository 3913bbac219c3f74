//! `imgbuild bake` against in-process SDK mocks (aws-smithy-mocks): the SSM Automation execution
//! that no emulator runs. `bake::follow`'s state machine step by step, the cleanup after a
//! failure, a timeout or Ctrl-C, document registration, and the whole `remote::bake_flow` on a
//! cache hit and a miss. No network: every response is scripted and every call counted.
//!
//! The client plumbing is mocks.rs's (copied: that module is private). `mocked!` builds each
//! client by hand (`mock_client!` needs the SDK's `test-util` feature), rules are matched with
//! `RuleMode::MatchAny`, and a call no rule matches panics inside the SDK. Modeled errors carry
//! their code in `ErrorMetadata`, which is what `aws::code` reads. Requests are captured by the
//! rules' matchers so the tests can look at what was sent.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_smithy_mocks::{Rule, mock};
use aws_smithy_types::error::ErrorMetadata;
use aws_smithy_types::retry::RetryConfig;

use aws_sdk_ec2::operation::delete_snapshot::DeleteSnapshotOutput;
use aws_sdk_ec2::operation::deregister_image::DeregisterImageOutput;
use aws_sdk_ec2::operation::describe_images::{DescribeImagesInput, DescribeImagesOutput};
use aws_sdk_ec2::operation::describe_instances::{DescribeInstancesInput, DescribeInstancesOutput};
use aws_sdk_ec2::operation::describe_snapshots::{DescribeSnapshotsInput, DescribeSnapshotsOutput};
use aws_sdk_ec2::operation::run_instances::{RunInstancesError, RunInstancesInput};
use aws_sdk_ec2::operation::terminate_instances::{TerminateInstancesInput, TerminateInstancesOutput};
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Image, ImageState, Instance, InstanceState, InstanceStateName, Reservation, Snapshot, SnapshotState,
};

use aws_sdk_ssm::operation::create_document::{CreateDocumentInput, CreateDocumentOutput};
use aws_sdk_ssm::operation::describe_automation_executions::DescribeAutomationExecutionsOutput;
use aws_sdk_ssm::operation::describe_document::DescribeDocumentOutput;
use aws_sdk_ssm::operation::get_automation_execution::GetAutomationExecutionOutput;
use aws_sdk_ssm::operation::get_document::{GetDocumentError, GetDocumentOutput};
use aws_sdk_ssm::operation::get_parameter::GetParameterOutput;
use aws_sdk_ssm::operation::list_document_versions::ListDocumentVersionsOutput;
use aws_sdk_ssm::operation::put_parameter::{PutParameterInput, PutParameterOutput};
use aws_sdk_ssm::operation::start_automation_execution::{StartAutomationExecutionInput, StartAutomationExecutionOutput};
use aws_sdk_ssm::operation::stop_automation_execution::{StopAutomationExecutionError, StopAutomationExecutionOutput};
use aws_sdk_ssm::operation::update_document::{UpdateDocumentError, UpdateDocumentInput, UpdateDocumentOutput};
use aws_sdk_ssm::operation::update_document_default_version::{UpdateDocumentDefaultVersionInput, UpdateDocumentDefaultVersionOutput};
use aws_sdk_ssm::types::error::{DuplicateDocumentContent, InvalidAutomationStatusUpdateException, InvalidDocument};
use aws_sdk_ssm::types::{
    AutomationExecution, AutomationExecutionMetadata, AutomationExecutionStatus, DocumentDescription, DocumentFormat, DocumentType, DocumentVersionInfo,
    Parameter, StepExecution, StopType,
};

use imgbuild::Error;
use imgbuild::aws::Clients;
use imgbuild::bake::{self, DocumentChange, Made, Record};
use imgbuild::cli::{BakeArgs, OutputFormat, ToolArgs};
use imgbuild::config::Context;
use imgbuild::config::{Config, Source};
use imgbuild::ui::Ui;
use imgbuild::ui::progress::Progress;

// ---------------------------------------------------------------------------------------------
// Clients

/// Clients whose EC2 and SSM answer from `ec2` and `ssm`; the others have no rules and panic
/// when called. Rules share their call counters with their clones.
fn clients(ec2: &[&Rule], ssm: &[&Rule]) -> Clients {
    let ec2: Vec<Rule> = ec2.iter().map(|r| (*r).clone()).collect();
    let ssm: Vec<Rule> = ssm.iter().map(|r| (*r).clone()).collect();
    let none: Vec<Rule> = Vec::new();
    // Standard retries as in production, but with millisecond backoff.
    let retry = RetryConfig::standard().with_initial_backoff(Duration::from_millis(1));
    Clients {
        cfn: mocked!(aws_sdk_cloudformation, none, retry.clone()),
        ec2: mocked!(aws_sdk_ec2, ec2, retry.clone()),
        efs: mocked!(aws_sdk_efs, none, retry.clone()),
        ssm: mocked!(aws_sdk_ssm, ssm, retry.clone()),
        elb: mocked!(aws_sdk_elasticloadbalancingv2, none, retry.clone()),
        apigw: mocked!(aws_sdk_apigateway, none, retry.clone()),
        backup: mocked!(aws_sdk_backup, none, retry),
        ..crate::mock_client::unscripted()
    }
}

/// Requests a rule's matcher saw (and accepted).
type Seen<T> = Arc<Mutex<Vec<T>>>;

fn seen<T>() -> Seen<T> {
    Arc::new(Mutex::new(Vec::new()))
}

fn all<T: Clone>(s: &Seen<T>) -> Vec<T> {
    s.lock().unwrap().clone()
}

fn meta(code: &str, message: &str) -> ErrorMetadata {
    ErrorMetadata::builder().code(code).message(message).build()
}

// ---------------------------------------------------------------------------------------------
// Fixtures

const NAME: &str = "vectordb";
const DOC_NAME: &str = "imgbuild-vectordb-bake";
const EXEC: &str = "5d2c6f0e-8a1b-4c3d-9e7f-0a1b2c3d4e5f";
const BASE: &str = "ami-0123456789abcdef0";
const AMI: &str = "ami-0fedcba9876543210";
const SNAP: &str = "snap-0a1b2c3d4e5f60718";
const INSTANCE: &str = "i-0a1b2c3d4e5f60718";
const BASE_PARAMETER: &str = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64";
const HANDOFF: &str = "/imgbuild/vectordb/ami";
/// The digest the registry served for the unpinned Chroma image in these tests.
const PULLED: &str = "sha256:5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e";

fn quiet_ui() -> Ui {
    Ui::new(OutputFormat::Text, 0, true)
}

fn quiet() -> Progress {
    Progress::new(quiet_ui(), "bake mocks")
}

fn record() -> Record {
    Record::default()
}

fn made(r: &Record) -> Made {
    r.lock().unwrap().clone()
}

/// The step names of the shipped document, in order.
fn step_names() -> Vec<String> {
    let doc: serde_yaml::Value = serde_yaml::from_str(bake::DOCUMENT_TEMPLATE).expect("images/bake.yaml parses");
    doc["mainSteps"].as_sequence().expect("mainSteps").iter().map(|s| s["name"].as_str().expect("every step is named").to_string()).collect()
}

/// The action of a step of the shipped document (step records carry it, as in aws-cli
/// `examples/ssm/get-automation-execution.rst`).
fn action_of(name: &str) -> Option<String> {
    let doc: serde_yaml::Value = serde_yaml::from_str(bake::DOCUMENT_TEMPLATE).ok()?;
    doc["mainSteps"].as_sequence()?.iter().find(|s| s["name"].as_str() == Some(name)).and_then(|s| s["action"].as_str()).map(String::from)
}

/// What bake adds to a failed Run Command step's detail (after `message`): where its whole
/// output is.
fn log_hint(step: &str, message: &str) -> String {
    if action_of(step).as_deref() == Some("aws:runCommand") {
        let sep = if message.ends_with('.') { " " } else { ". " };
        format!(
            "{sep}The whole output of step {step} is in CloudWatch Logs group /imgbuild/vectordb/bake, streams <command-id>/{INSTANCE}/aws-runShellScript/stdout and stderr"
        )
    } else {
        String::new()
    }
}

fn step(name: &str, status: &str, failure: Option<&str>) -> StepExecution {
    let b = StepExecution::builder()
        .step_name(name)
        .set_action(action_of(name))
        .step_status(AutomationExecutionStatus::from(status))
        .set_failure_message(failure.map(String::from));
    // A launch that succeeded has its output.
    let b = if name == "launchInstance" && status == "Success" { b.outputs("InstanceId", vec![INSTANCE.to_string()]) } else { b };
    // The digest step's Output is what its command printed: the RepoDigest and a newline
    // (aws:runCommand outputs CommandId, Status, ResponseCode, Output; "aws:runCommand - Run a
    // command on a managed instance").
    let b = if name == bake::DIGEST_STEP && status == "Success" {
        b.outputs("Output", vec![format!("ghcr.io/chroma-core/chroma@{PULLED}\n")])
            .outputs("Status", vec!["Success".into()])
            .outputs("ResponseCode", vec!["0".into()])
    } else {
        b
    };
    // Finished steps carry their times (the progress line shows how long they took).
    let b = if matches!(status, "Success" | "Failed" | "TimedOut" | "Cancelled") {
        b.execution_start_time(aws_smithy_types::DateTime::from_secs(1_700_000_000)).execution_end_time(aws_smithy_types::DateTime::from_secs(1_700_000_042))
    } else if status == "InProgress" {
        b.execution_start_time(aws_smithy_types::DateTime::from_secs(1_700_000_042))
    } else {
        b
    };
    b.build()
}

/// One GetAutomationExecution answer for EXEC, shaped as the service answers (aws-cli
/// `examples/ssm/get-automation-execution.rst`): the document's outputs are always there, and
/// until createImage succeeds `createImage.ImageId` holds the placeholder sentence, not an id.
/// A createImage step that succeeded carries the id in its own outputs too.
fn execution(status: &str, steps: Vec<StepExecution>, image: Option<&str>) -> GetAutomationExecutionOutput {
    let steps = steps
        .into_iter()
        .map(|s| match (s.step_name(), s.step_status(), image) {
            (Some("createImage"), Some(AutomationExecutionStatus::Success), Some(ami)) => StepExecution::builder()
                .step_name("createImage")
                .action("aws:executeAwsApi")
                .step_status(AutomationExecutionStatus::Success)
                .set_execution_start_time(s.execution_start_time().cloned())
                .set_execution_end_time(s.execution_end_time().cloned())
                .outputs("ImageId", vec![ami.to_string()])
                .build(),
            _ => s,
        })
        .collect();
    let b = AutomationExecution::builder()
        .automation_execution_id(EXEC)
        .document_name(DOC_NAME)
        .automation_execution_status(AutomationExecutionStatus::from(status))
        .set_step_executions(Some(steps))
        .parameters("LogGroupName", vec!["/imgbuild/vectordb/bake".to_string()])
        .outputs("createImage.ImageId", vec![image.unwrap_or(bake::NO_OUTPUT_YET).to_string()]);
    GetAutomationExecutionOutput::builder().automation_execution(b.build()).build()
}

/// Steps `names` all Success, for building up an execution's history.
fn done(names: &[&str]) -> Vec<StepExecution> {
    names.iter().map(|n| step(n, "Success", None)).collect()
}

/// GetAutomationExecution for EXEC answering `answers` in order, the last one from then on.
fn get_execution(answers: Vec<GetAutomationExecutionOutput>) -> Rule {
    let mut seq = mock!(aws_sdk_ssm::Client::get_automation_execution).match_requests(|r| r.automation_execution_id() == Some(EXEC)).sequence();
    for a in answers {
        seq = seq.output(move || a.clone());
    }
    seq.repeatedly().build()
}

/// A FailureMessage for a failure of each step, in the service's own wording: "Step
/// <name> failed maximum allowed times. ..." (aws-cli `examples/ssm/get-automation-execution.rst`),
/// "Step fails when it is verifying the command has completed. Command ... returns unexpected
/// invocation result: {Status=[Failed], ResponseCode=[1], ...}" (an aws-cli
/// `examples/imagebuilder/` output: an image whose SSM execution failed at a runCommand step), "Step fails when it is
/// Poll action status for completion. ..." (aws-solutions/automated-security-response,
/// `check_ssm_execution` tests) and "Step fails when it is executing/canceling action. <error>"
/// (AWS Service Catalog troubleshooting, SSM automation failures).
fn failure_of(step: &str) -> String {
    let run_command = |id: &str| {
        format!(
            "Step fails when it is verifying the command has completed. Command {id} returns unexpected invocation result: \n{{Status=[Failed], ResponseCode=[1], Output=[\n----------ERROR-------\nfailed to run commands: exit status 1], CommandId=[{id}]}}. Please refer to Automation Service Troubleshooting Guide for more diagnosis details."
        )
    };
    match step {
        "launchInstance" => "Step launchInstance failed maximum allowed times. Value (imgbuild-bake-vectordb) for parameter iamInstanceProfile.name is invalid. Invalid IAM Instance Profile name (Service: AmazonEC2; Status Code: 400; Error Code: InvalidParameterValue; Request ID: 6a002f94-ba37-43fd-99e6-39517715fce5)".into(),
        "waitForInstance" => "Step timed out while step is verifying the instance state is running. Please refer to Automation Service Troubleshooting Guide for more diagnosis details.".into(),
        "waitForSsmAgent" => "Step timed out while step is verifying the PingStatus of the instance is Online. Please refer to Automation Service Troubleshooting Guide for more diagnosis details.".into(),
        "runBakeScript" => run_command("4f3e2d1c-5b6a-4798-8a9b-0c1d2e3f4a5b"),
        "verify" => run_command("9a8b7c6d-5e4f-4a3b-2c1d-0e9f8a7b6c5d"),
        "stopInstance" | "terminateInstance" => format!("Step {step} failed maximum allowed times. You are not authorized to perform this operation. Encoded authorization failure message: --truncated-- (Service: AmazonEC2; Status Code: 403; Error Code: UnauthorizedOperation; Request ID: 6a002f94-ba37-43fd-99e6-39517715fce5)"),
        "createImage" => "Step fails when it is executing action. An error occurred (InvalidAMIName.Duplicate) when calling the CreateImage operation: AMI name imgbuild-vectordb is already in use by AMI ami-0aaaaaaaaaaaaaaaa. Please refer to Automation Service Troubleshooting Guide for more diagnosis details.".into(),
        "waitForImage" => "Step timed out while step is verifying the image state is available. Please refer to Automation Service Troubleshooting Guide for more diagnosis details.".into(),
        other => format!("Step {other} failed maximum allowed times."),
    }
}

fn instances(state: InstanceStateName) -> DescribeInstancesOutput {
    DescribeInstancesOutput::builder()
        .reservations(
            Reservation::builder().instances(Instance::builder().instance_id(INSTANCE).state(InstanceState::builder().name(state).build()).build()).build(),
        )
        .build()
}

/// An image of ours, with its root snapshot (and an ephemeral mapping without one).
fn image(id: &str, digest: &str) -> Image {
    image_made(id, digest, "2026-05-01T10:00:00.000Z")
}

fn image_made(id: &str, digest: &str, created: &str) -> Image {
    Image::builder()
        .image_id(id)
        .name(format!("imgbuild-{NAME}-0123456789ab-1700000000"))
        .state(ImageState::Available)
        .creation_date(created)
        .tags(aws_sdk_ec2::types::Tag::builder().key("imgbuild:digest").value(digest).build())
        .tags(aws_sdk_ec2::types::Tag::builder().key("imgbuild:chroma-version").value("1.0.0").build())
        .block_device_mappings(
            BlockDeviceMapping::builder().device_name("/dev/xvda").ebs(EbsBlockDevice::builder().snapshot_id(SNAP).volume_size(15).build()).build(),
        )
        .block_device_mappings(BlockDeviceMapping::builder().device_name("/dev/sdb").virtual_name("ephemeral0").build())
        .build()
}

fn config(dir: &tempfile::TempDir) -> Config {
    let mut c = Config::default();
    assert_eq!(c.name, NAME);
    c.bake.manifest = dir.path().join("imgbuild.bake.json").to_string_lossy().into_owned();
    // All four prerequisites given: no `<name>-bake` stack is deployed (the CloudFormation client
    // has no rules, so deploying one would fail the test).
    c.bake.subnet_id = Some("subnet-0123456789abcdef0".into());
    c.bake.security_group_id = Some("sg-0123456789abcdef0".into());
    c.bake.instance_profile = Some("imgbuild-bake-vectordb".into());
    c.bake.automation_role_arn = Some("arn:aws:iam::123456789012:role/imgbuild-bake-automation".into());
    c.aws.poll_interval_secs = 1;
    c
}

fn context(config: Config) -> Context {
    Context { config, source: Source::Defaults, region: Some("us-east-1".into()), profile: None, endpoint_url: None }
}

fn args(force: bool, timeout_secs: u64) -> BakeArgs {
    BakeArgs {
        force,
        update_base: false,
        dry_run: false,
        regions: vec![],
        keep_on_failure: false,
        timeout: Some(timeout_secs),
        tools: ToolArgs { require_tools: false, no_tools: true },
    }
}

/// The document bake registers for `config`, as bake_flow renders it.
fn rendered_document(config: &Config) -> String {
    let v = imgbuild::chroma::parse_version(&config.chroma.version).unwrap();
    let profile = imgbuild::chroma::profile(&v).unwrap();
    let (script, _) = bake::bake_script(config, profile).expect("the bake script renders");
    bake::document(&script).expect("the document renders")
}

fn read_manifest(config: &Config) -> serde_json::Value {
    let text = std::fs::read_to_string(&config.bake.manifest).expect("the manifest was written");
    serde_json::from_str(&text).expect("the manifest is JSON")
}

fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.iter().map(|p| p.len()).collect::<Vec<_>>() == [8, 4, 4, 4, 12]
        && parts.iter().all(|p| p.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// The one value of a StartAutomationExecution parameter.
fn param<'a>(start: &'a StartAutomationExecutionInput, key: &str) -> &'a str {
    let values = start.parameters().and_then(|p| p.get(key)).unwrap_or_else(|| panic!("parameter {key} was not sent: {:?}", start.parameters()));
    assert_eq!(values.len(), 1, "{key}: {values:?}");
    &values[0]
}

// ---------------------------------------------------------------------------------------------
// Every rule bake_flow may use, with the answers of a plain cache miss; tests swap rules out.

struct Bake {
    // SSM
    get_parameter: Rule,
    get_document: Rule,
    create_document: Rule,
    created: Seen<CreateDocumentInput>,
    update_document: Rule,
    update_default: Rule,
    running: Rule,
    start: Rule,
    starts: Seen<StartAutomationExecutionInput>,
    get_execution: Rule,
    /// GetAutomationExecution once StopAutomationExecution has been accepted: the execution
    /// has run its cancel path and is Cancelled.
    cancelled: Rule,
    stopped: Arc<AtomicBool>,
    stop: Rule,
    put_parameter: Rule,
    puts: Seen<PutParameterInput>,
    /// Rules for anything else a test needs (other executions).
    extra_ssm: Vec<Rule>,
    extra_ec2: Vec<Rule>,
    // EC2
    find_cached: Rule,
    cache_lookups: Seen<DescribeImagesInput>,
    describe_instances: Rule,
    instance_lookups: Seen<DescribeInstancesInput>,
    terminate: Rule,
    terminated: Seen<TerminateInstancesInput>,
    describe_image: Rule,
    deregister: Rule,
    /// What `--force` does to an older image with the digest: untag, mark superseded.
    untag: Rule,
    mark: Rule,
    /// CreateTags of imgbuild:chroma-digest on the baked image.
    tag_chroma: Rule,
    chroma_tags: Seen<aws_sdk_ec2::operation::create_tags::CreateTagsInput>,
    delete_snapshot: Rule,
    /// The RunInstances dry run that waits for the instance profile.
    dry_run: Rule,
    dry_runs: Seen<RunInstancesInput>,
    /// The cleanup's lookups by the bake token: images (any state) and snapshots.
    token_images: Rule,
    token_image_lookups: Seen<DescribeImagesInput>,
    token_snapshots: Rule,
    token_snapshot_lookups: Seen<DescribeSnapshotsInput>,
}

/// Captures every request `$rule` (a `mock!` builder) matches into `$seen`.
macro_rules! capturing {
    ($rule:expr, $seen:expr) => {{
        let s = $seen.clone();
        $rule.match_requests(move |r| {
            s.lock().unwrap().push(r.clone());
            true
        })
    }};
}

/// The cache lookup (DescribeImages of our own images): `first` on the first call, `then` from
/// then on (after a bake, the image it made carries the digest too).
fn find_cached(lookups: &Seen<DescribeImagesInput>, first: Vec<Image>, then: Vec<Image>) -> Rule {
    let s = lookups.clone();
    mock!(aws_sdk_ec2::Client::describe_images)
        .match_requests(move |r| {
            let mine = r.owners() == ["self"] && r.filters().iter().any(|f| f.name() == Some("tag:imgbuild:digest"));
            if mine {
                s.lock().unwrap().push(r.clone());
            }
            mine
        })
        .sequence()
        .output(move || DescribeImagesOutput::builder().set_images(Some(first.clone())).build())
        .output(move || DescribeImagesOutput::builder().set_images(Some(then.clone())).build())
        .repeatedly()
        .build()
}

/// The digest bake_flow looked a cached image up by.
fn looked_up_digest(lookups: &Seen<DescribeImagesInput>) -> String {
    let l = all(lookups);
    let first = l.first().expect("a cache lookup");
    let f = first.filters().iter().find(|f| f.name() == Some("tag:imgbuild:digest")).expect("a digest tag filter");
    f.values()[0].clone()
}

/// DescribeAutomationExecutions of our document's running executions, answering `executions`
/// (id, document name).
fn running(executions: &[(&'static str, &'static str)]) -> Rule {
    let list: Vec<AutomationExecutionMetadata> = executions
        .iter()
        .map(|(id, doc)| {
            AutomationExecutionMetadata::builder()
                .automation_execution_id(*id)
                .document_name(*doc)
                .automation_execution_status(AutomationExecutionStatus::Inprogress)
                .build()
        })
        .collect();
    mock!(aws_sdk_ssm::Client::describe_automation_executions)
        .match_requests(|r| {
            r.filters().iter().any(|f| f.key().as_str() == "DocumentNamePrefix" && f.values() == [DOC_NAME])
                && r.filters().iter().any(|f| f.key().as_str() == "ExecutionStatus" && f.values().iter().any(|v| v == "InProgress"))
        })
        .then_output(move || DescribeAutomationExecutionsOutput::builder().set_automation_execution_metadata_list(Some(list.clone())).build())
}

impl Bake {
    /// A cache miss (or a hit on `cached`) whose execution EXEC answers `answers`; nobody else
    /// is baking; the build instance is running when first looked at, terminated after.
    fn new(cached: Option<Image>, answers: Vec<GetAutomationExecutionOutput>) -> Self {
        let created = seen();
        let starts = seen();
        let puts = seen();
        let cache_lookups = seen();
        let instance_lookups = seen();
        let terminated = seen();
        let token_image_lookups = seen();
        let dry_runs = seen();
        let token_snapshot_lookups = seen();
        let chroma_tags = seen();
        let stopped = Arc::new(AtomicBool::new(false));
        let first: Vec<Image> = cached.iter().cloned().collect();
        let then = match cached {
            Some(c) => vec![c],
            None => vec![image_made(AMI, "sha256:ours", "2026-05-02T10:00:00.000Z")],
        };
        Self {
            get_parameter: mock!(aws_sdk_ssm::Client::get_parameter)
                .match_requests(|r| r.name() == Some(BASE_PARAMETER))
                .then_output(|| GetParameterOutput::builder().parameter(Parameter::builder().name(BASE_PARAMETER).value(BASE).build()).build()),
            get_document: mock!(aws_sdk_ssm::Client::get_document).match_requests(|r| r.name() == Some(DOC_NAME)).then_error(|| {
                let msg = "Document with name imgbuild-vectordb-bake does not exist.";
                GetDocumentError::InvalidDocument(InvalidDocument::builder().message(msg).meta(meta("InvalidDocument", msg)).build())
            }),
            create_document: capturing!(mock!(aws_sdk_ssm::Client::create_document), created).then_output(|| {
                CreateDocumentOutput::builder().document_description(DocumentDescription::builder().name(DOC_NAME).document_version("1").build()).build()
            }),
            created,
            update_document: mock!(aws_sdk_ssm::Client::update_document).then_output(|| {
                UpdateDocumentOutput::builder().document_description(DocumentDescription::builder().name(DOC_NAME).document_version("2").build()).build()
            }),
            update_default: mock!(aws_sdk_ssm::Client::update_document_default_version).then_output(|| UpdateDocumentDefaultVersionOutput::builder().build()),
            running: running(&[]),
            start: capturing!(mock!(aws_sdk_ssm::Client::start_automation_execution), starts)
                .then_output(|| StartAutomationExecutionOutput::builder().automation_execution_id(EXEC).build()),
            starts,
            get_execution: get_execution(answers),
            cancelled: cancelled_after_stop(&stopped, None),
            stop: {
                let flag = stopped.clone();
                mock!(aws_sdk_ssm::Client::stop_automation_execution)
                    .match_requests(move |r| {
                        let ok = r.automation_execution_id() == Some(EXEC) && r.r#type() == Some(&StopType::Cancel);
                        if ok {
                            flag.store(true, Ordering::SeqCst);
                        }
                        ok
                    })
                    .then_output(|| StopAutomationExecutionOutput::builder().build())
            },
            stopped,
            put_parameter: capturing!(mock!(aws_sdk_ssm::Client::put_parameter), puts).then_output(|| PutParameterOutput::builder().version(1).build()),
            puts,
            extra_ssm: Vec::new(),
            extra_ec2: Vec::new(),
            find_cached: find_cached(&cache_lookups, first, then),
            cache_lookups,
            describe_instances: capturing!(mock!(aws_sdk_ec2::Client::describe_instances), instance_lookups)
                .sequence()
                .output(|| instances(InstanceStateName::Running))
                .output(|| instances(InstanceStateName::Terminated))
                .repeatedly()
                .build(),
            instance_lookups,
            terminate: capturing!(mock!(aws_sdk_ec2::Client::terminate_instances), terminated).then_output(|| TerminateInstancesOutput::builder().build()),
            terminated,
            describe_image: mock!(aws_sdk_ec2::Client::describe_images)
                .match_requests(|r| r.image_ids() == [AMI])
                .then_output(|| DescribeImagesOutput::builder().images(image(AMI, "sha256:half-made")).build()),
            deregister: mock!(aws_sdk_ec2::Client::deregister_image)
                .match_requests(|r| r.image_id() == Some(AMI))
                .then_output(|| DeregisterImageOutput::builder().build()),
            delete_snapshot: mock!(aws_sdk_ec2::Client::delete_snapshot)
                .match_requests(|r| r.snapshot_id() == Some(SNAP))
                .then_output(|| DeleteSnapshotOutput::builder().build()),
            untag: mock!(aws_sdk_ec2::Client::delete_tags)
                .match_requests(|r| r.tags().iter().any(|t| t.key() == Some("imgbuild:digest")))
                .then_output(|| aws_sdk_ec2::operation::delete_tags::DeleteTagsOutput::builder().build()),
            mark: mock!(aws_sdk_ec2::Client::create_tags)
                .match_requests(|r| r.tags().iter().any(|t| t.key() == Some("imgbuild:superseded-by") && t.value() == Some(AMI)))
                .then_output(|| aws_sdk_ec2::operation::create_tags::CreateTagsOutput::builder().build()),
            tag_chroma: {
                let s = chroma_tags.clone();
                mock!(aws_sdk_ec2::Client::create_tags)
                    .match_requests(move |r| {
                        let ours = r.tags().iter().any(|t| t.key() == Some("imgbuild:chroma-digest"));
                        if ours {
                            s.lock().unwrap().push(r.clone());
                        }
                        ours
                    })
                    .then_output(|| aws_sdk_ec2::operation::create_tags::CreateTagsOutput::builder().build())
            },
            chroma_tags,
            dry_run: capturing!(mock!(aws_sdk_ec2::Client::run_instances), dry_runs).then_error(dry_run_would_succeed),
            dry_runs,
            token_images: token_images(&token_image_lookups, Vec::new()),
            token_image_lookups,
            token_snapshots: token_snapshots(&token_snapshot_lookups, Vec::new()),
            token_snapshot_lookups,
        }
    }

    fn clients(&self) -> Clients {
        let mut ssm = vec![
            &self.get_parameter,
            &self.get_document,
            &self.create_document,
            &self.update_document,
            &self.update_default,
            &self.running,
            &self.start,
            &self.cancelled,
            &self.get_execution,
            &self.stop,
            &self.put_parameter,
        ];
        ssm.extend(self.extra_ssm.iter());
        let mut ec2 = vec![
            &self.find_cached,
            &self.describe_instances,
            &self.terminate,
            &self.describe_image,
            &self.deregister,
            &self.delete_snapshot,
            &self.untag,
            &self.mark,
            &self.tag_chroma,
            &self.token_images,
            &self.token_snapshots,
            &self.dry_run,
        ];
        ec2.extend(self.extra_ec2.iter());
        clients(&ec2, &ssm)
    }

    fn start_request(&self) -> StartAutomationExecutionInput {
        let starts = all(&self.starts);
        assert_eq!(starts.len(), 1, "one StartAutomationExecution");
        starts[0].clone()
    }

    /// Calls that only a cleanup makes.
    fn cleanup_calls(&self) -> usize {
        self.stop.num_calls()
            + self.describe_instances.num_calls()
            + self.terminate.num_calls()
            + self.deregister.num_calls()
            + self.delete_snapshot.num_calls()
    }
}

/// What GetAutomationExecution answers once a stop was accepted: Cancelled, the cancel path
/// (cancelTerminate) run, and the image output as it stands (`image`, else the placeholder).
fn cancelled_after_stop(stopped: &Arc<AtomicBool>, image: Option<&'static str>) -> Rule {
    let flag = stopped.clone();
    mock!(aws_sdk_ssm::Client::get_automation_execution)
        .match_requests(move |r| r.automation_execution_id() == Some(EXEC) && flag.load(Ordering::SeqCst))
        .then_output(move || {
            let mut steps = done(&["launchInstance", "waitForInstance"]);
            steps.push(step("waitForSsmAgent", "Cancelled", None));
            steps.push(step("cancelTerminate", "Success", None));
            execution("Cancelled", steps, image)
        })
}

/// The cleanup's DescribeImages by the bake token (our images, any state): answers `found`.
fn token_images(lookups: &Seen<DescribeImagesInput>, found: Vec<Image>) -> Rule {
    let s = lookups.clone();
    mock!(aws_sdk_ec2::Client::describe_images)
        .match_requests(move |r| {
            let mine = r.filters().iter().any(|f| f.name() == Some("tag:imgbuild:bake-token"));
            if mine {
                s.lock().unwrap().push(r.clone());
            }
            mine
        })
        .then_output(move || DescribeImagesOutput::builder().set_images(Some(found.clone())).build())
}

/// The cleanup's DescribeSnapshots by the bake token: answers `found` (snapshot ids).
fn token_snapshots(lookups: &Seen<DescribeSnapshotsInput>, found: Vec<&'static str>) -> Rule {
    let s = lookups.clone();
    mock!(aws_sdk_ec2::Client::describe_snapshots)
        .match_requests(move |r| {
            s.lock().unwrap().push(r.clone());
            true
        })
        .then_output(move || {
            DescribeSnapshotsOutput::builder()
                .set_snapshots(Some(found.iter().map(|id| Snapshot::builder().snapshot_id(*id).state(SnapshotState::Completed).build()).collect()))
                .build()
        })
}

/// EC2's answer to a dry run that would have succeeded: an error with the code DryRunOperation
/// (EC2 API reference, "Error codes": DryRunOperation).
fn dry_run_would_succeed() -> RunInstancesError {
    RunInstancesError::generic(meta("DryRunOperation", "Request would have succeeded, but DryRun flag is set."))
}

/// EC2's answer while a new instance profile has not reached it yet (the FailureMessage of a
/// launch in aws-cli `examples/ssm/get-automation-execution.rst` has the same shape).
fn profile_not_yet_visible() -> RunInstancesError {
    RunInstancesError::generic(meta(
        "InvalidParameterValue",
        "Value (imgbuild-bake-vectordb) for parameter iamInstanceProfile.name is invalid. Invalid IAM Instance Profile name",
    ))
}

/// The execution is already over: StopAutomationExecution says so.
fn stop_already_over() -> Rule {
    mock!(aws_sdk_ssm::Client::stop_automation_execution).match_requests(|r| r.automation_execution_id() == Some(EXEC)).then_error(|| {
        let msg = "The execution 5d2c6f0e-8a1b-4c3d-9e7f-0a1b2c3d4e5f is already in a terminal status Failed.";
        StopAutomationExecutionError::InvalidAutomationStatusUpdateException(
            InvalidAutomationStatusUpdateException::builder().message(msg).meta(meta("InvalidAutomationStatusUpdateException", msg)).build(),
        )
    })
}

/// Resolves once `rule` has answered `n` times (the tests' Ctrl-C).
async fn after_calls(rule: Rule, n: usize) {
    while rule.num_calls() < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// bake::follow

#[tokio::test]
async fn follow_returns_the_image_of_a_successful_execution_and_records_it() {
    let get = get_execution(vec![
        execution("Pending", vec![], None),
        execution(
            "InProgress",
            vec![
                step("launchInstance", "Success", None),
                step("waitForInstance", "Success", None),
                step("waitForSsmAgent", "Success", None),
                step("runBakeScript", "InProgress", None),
            ],
            None,
        ),
        execution("Success", step_names().iter().map(|n| step(n, "Success", None)).collect(), Some(AMI)),
    ]);
    let clients = clients(&[], &[&get]);
    let rec = record();

    let ami = bake::follow(&clients, EXEC, Duration::from_secs(5), Duration::from_millis(1), &quiet(), &rec).await.unwrap();

    assert_eq!(ami, AMI);
    assert_eq!(get.num_calls(), 3, "Pending, InProgress, Success");
    let m = made(&rec);
    assert_eq!(m.image.as_deref(), Some(AMI));
    assert!(!m.finished, "finishing is bake_flow's call, after the handoff is possible");
}

#[tokio::test]
async fn follow_records_the_image_as_soon_as_the_output_appears() {
    // The image id appears while waitForImage still runs; then the execution stays InProgress
    // until the deadline. The record holds the image for the cleanup to remove.
    let get = get_execution(vec![execution("InProgress", vec![step("createImage", "Success", None), step("waitForImage", "InProgress", None)], Some(AMI))]);
    let clients = clients(&[], &[&get]);
    let rec = record();

    let err = bake::follow(&clients, EXEC, Duration::from_millis(30), Duration::from_millis(1), &quiet(), &rec).await.unwrap_err();

    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert_eq!(made(&rec).image.as_deref(), Some(AMI));
}

#[test]
fn the_document_has_the_steps_the_tests_and_the_code_rely_on() {
    assert_eq!(
        step_names(),
        [
            "launchInstance",
            "waitForInstance",
            "assertInstanceRunning",
            "waitForSsmAgent",
            bake::SCRIPT_STEP,
            "verify",
            bake::DIGEST_STEP,
            "stopInstance",
            "createImage",
            "waitForImage",
            "assertImageAvailable",
            "terminateInstance",
            "onFailure",
            "keepInstance",
            "cancelTerminate"
        ]
    );
}

fn shipped_steps() -> Vec<serde_yaml::Value> {
    let doc: serde_yaml::Value = serde_yaml::from_str(bake::DOCUMENT_TEMPLATE).expect("images/bake.yaml parses");
    doc["mainSteps"].as_sequence().expect("mainSteps").clone()
}

fn step_named<'a>(steps: &'a [serde_yaml::Value], name: &str) -> &'a serde_yaml::Value {
    steps.iter().find(|s| s["name"].as_str() == Some(name)).unwrap_or_else(|| panic!("no step {name}"))
}

/// AWS runs the onCancel path "for a maximum of two minutes", ignoring the target step's own
/// timeoutSeconds and maxAttempts (Automation actions reference, "Properties shared by all
/// actions", onCancel). aws:changeInstanceState waits for the state it sets, so the cancel path
/// must only call TerminateInstances; the success and failure paths keep the waiting terminate.
#[test]
fn cancel_goes_to_a_terminate_that_does_not_wait_and_failure_to_one_that_does() {
    let steps = shipped_steps();
    let mut cancel_targets = std::collections::BTreeSet::new();
    for s in &steps[1..] {
        let name = s["name"].as_str().unwrap();
        let on_cancel = s["onCancel"].as_str().unwrap_or_else(|| panic!("{name} has no onCancel"));
        if name != "cancelTerminate" {
            cancel_targets.insert(on_cancel.to_string());
        }
        if let Some(target) = s["onFailure"].as_str().and_then(|f| f.strip_prefix("step:")) {
            // The failure path: the branch that keeps the instance only when asked, else the
            // waiting terminate.
            let t = step_named(&steps, target);
            let t = if t["action"].as_str() == Some("aws:branch") { step_named(&steps, t["inputs"]["Default"].as_str().unwrap()) } else { t };
            assert_eq!((t["action"].as_str(), t["inputs"]["DesiredState"].as_str()), (Some("aws:changeInstanceState"), Some("terminated")), "{name}");
        }
    }
    assert_eq!(cancel_targets.into_iter().collect::<Vec<_>>(), ["step:cancelTerminate"], "every step after the launch cancels to one terminate");
    let t = step_named(&steps, "cancelTerminate");
    assert_eq!(
        (t["action"].as_str(), t["inputs"]["Service"].as_str(), t["inputs"]["Api"].as_str()),
        (Some("aws:executeAwsApi"), Some("ec2"), Some("TerminateInstances"))
    );
    assert_eq!(t["isEnd"].as_bool(), Some(true));
    assert!(steps.iter().all(|s| s["nextStep"].as_str() != Some("cancelTerminate")), "only a cancel leads to cancelTerminate");
    assert_eq!(imgbuild::check::automation::check(bake::DOCUMENT_TEMPLATE), Vec::new(), "and the checker's onCancel rules accept it");
}

/// "Handling timeouts in runbooks": wait for the good or the bad state, then assert the good one,
/// so an image that goes `failed` or an instance that dies at launch ends the bake at once
/// instead of at the wait's timeout (an hour for the image).
#[test]
fn every_wait_stops_at_a_bad_state_too_and_the_next_step_asserts_the_good_one() {
    let steps = shipped_steps();
    let waits: Vec<&serde_yaml::Value> = steps.iter().filter(|s| s["action"].as_str() == Some("aws:waitForAwsResourceProperty")).collect();
    let bad_states = [("DescribeInstances", "terminated"), ("DescribeImages", "failed")];
    for (api, bad) in bad_states {
        let w = waits.iter().find(|w| w["inputs"]["Api"].as_str() == Some(api)).unwrap_or_else(|| panic!("a wait on {api}"));
        let name = w["name"].as_str().unwrap();
        let desired: Vec<&str> = w["inputs"]["DesiredValues"].as_sequence().unwrap().iter().filter_map(|v| v.as_str()).collect();
        assert!(desired.contains(&bad), "{name} waits for {desired:?}: it must stop at {bad}");
        let next = step_named(&steps, w["nextStep"].as_str().unwrap());
        assert_eq!(next["action"].as_str(), Some("aws:assertAwsResourceProperty"), "{name} is followed by an assertion");
        assert_eq!(next["inputs"]["Api"], w["inputs"]["Api"]);
        assert_eq!(next["inputs"]["PropertySelector"], w["inputs"]["PropertySelector"]);
        let good: Vec<&str> = next["inputs"]["DesiredValues"].as_sequence().unwrap().iter().filter_map(|v| v.as_str()).collect();
        assert_eq!(good.len(), 1, "{good:?}");
        assert_ne!(good[0], bad);
        assert!(desired.contains(&good[0]));
    }
}

/// The budgets must not contradict each other: bake's own default bound covers the runbook's
/// success path (each step's timeoutSeconds times maxAttempts, as the service bounds it), a
/// Run Command step outlasts its command's executionTimeout, and waits are not retried
/// (`maxAttempts` retries at once and only doubles the time to failure).
#[test]
fn the_default_timeout_covers_the_runbooks_budget_and_every_bound_outlasts_what_it_bounds() {
    let steps = shipped_steps();
    let secs = |v: &serde_yaml::Value| v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok()));
    // The success path, walked here independently of the code under test.
    let mut at = 0;
    let mut success = 0;
    loop {
        let s = &steps[at];
        success += secs(&s["timeoutSeconds"]).unwrap() * secs(&s["maxAttempts"]).unwrap_or(1);
        if s["isEnd"].as_bool() == Some(true) {
            break;
        }
        at = steps.iter().position(|x| x["name"] == s["nextStep"]).unwrap();
    }
    assert_eq!(success, 12_300, "images/README.md gives this bound in its time budget table: update both together");
    let cfg = Config::default();
    let document = bake::document("echo baked\n").unwrap();
    let default = bake::default_timeout(&document).unwrap();
    assert!(default.as_secs() > success, "bake's default bound {default:?} must cover the runbook's success budget {success}s");
    assert_eq!(cfg.bake.timeout_secs, None, "no fixed default that could undercut the runbook");
    for s in &steps {
        let name = s["name"].as_str().unwrap();
        if s["action"].as_str() == Some("aws:runCommand") {
            let command = secs(&s["inputs"]["Parameters"]["executionTimeout"]).unwrap();
            assert!(secs(&s["timeoutSeconds"]).unwrap() > command, "{name}: the step must outlast its command ({command}s)");
        }
        if matches!(s["action"].as_str(), Some("aws:waitForAwsResourceProperty" | "aws:changeInstanceState")) && name != "terminateInstance" {
            assert_eq!(secs(&s["maxAttempts"]), Some(1), "{name}: a retried wait doubles the time to failure");
        }
    }
}

/// Image hygiene. The SSM agent starts before cloud-init ends and can hold the RPM lock
/// (amazon-linux-2023 #397): the script waits for cloud-init before installing. The image keeps
/// no machine id (AL2023's cloud-init has no `clean --machine-id`; systemd makes a new one when
/// the file is empty) and no dnf cache. verify requires the storage mode's own package (efs-tls
/// mounts with the `efs` helper of amazon-efs-utils; nfs-utils alone is no proof) and an enabled
/// chroma.service.
#[tokio::test]
async fn the_bake_script_waits_for_cloud_init_and_leaves_no_machine_id_and_verify_checks_the_mode() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir);
    let (script, _) = bake::bake_script(&cfg, imgbuild::chroma::profile(&imgbuild::chroma::parse_version(&cfg.chroma.version).unwrap()).unwrap()).unwrap();
    let at = |needle: &str| script.find(needle).unwrap_or_else(|| panic!("the bake script has no {needle:?}:\n{script}"));
    assert!(at("cloud-init status --wait") < at("10-install.sh"), "cloud-init is waited for before the install");
    assert!(at("dnf clean all") > at("10-install.sh"));
    assert!(at("truncate -s 0 /etc/machine-id") > at("cloud-init clean"));

    let steps = shipped_steps();
    let verify: Vec<&str> = step_named(&steps, "verify")["inputs"]["Parameters"]["commands"].as_sequence().unwrap().iter().filter_map(|c| c.as_str()).collect();
    assert!(verify.contains(&"rpm -q '{{ StoragePackage }}'"), "{verify:?}");
    assert!(!verify.iter().any(|c| c.contains("||") && c.contains("rpm")), "no either-package check: {verify:?}");
    assert!(verify.contains(&"systemctl is-enabled chroma.service"), "{verify:?}");
    assert!(verify.contains(&"test ! -s /etc/machine-id"), "{verify:?}");
    // The stack's memory and disk alarms need the CloudWatch agent, which a baked boot cannot
    // download: the install step puts it in and verify proves it is there.
    assert!(at("dnf_install docker amazon-efs-utils amazon-cloudwatch-agent") > at("cloud-init status --wait"), "{script}");
    assert!(verify.contains(&"rpm -q amazon-cloudwatch-agent"), "{verify:?}");

    for (mode, package) in [(imgbuild::config::StorageMode::EfsTls, "amazon-efs-utils"), (imgbuild::config::StorageMode::DockerNfs, "nfs-utils")] {
        cfg.storage.mode = mode;
        let b = Bake::new(None, successful_execution());
        bake_flow(&b, &cfg, &args(false, 3600), std::future::pending()).await.unwrap();
        assert_eq!(param(&b.start_request(), "StoragePackage"), package);
    }
}

/// EC2 allows 128 characters for an AMI name (CreateImage, `Name`). A long project name once
/// made a name the runbook's allowedPattern refused only at StartAutomationExecution, after the
/// prerequisites stack and the document existed. Now nothing is made.
#[tokio::test]
async fn a_name_that_makes_the_image_name_too_long_fails_before_anything_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir);
    cfg.name = format!("v{}", "x".repeat(99));
    assert!(imgbuild::config::check_name(&cfg.name).is_ok(), "a name the config accepts");
    let b = Bake::new(None, successful_execution());

    let err = bake_flow(&b, &cfg, &args(false, 3600), std::future::pending()).await.unwrap_err();

    match &err {
        Error::Invalid(m) => assert!(m.starts_with("name: ") && m.contains("128") && m.contains("at most 95 characters"), "{m}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert_eq!(err.exit_code(), 2);
    assert_eq!(b.create_document.num_calls() + b.update_document.num_calls() + b.start.num_calls(), 0, "nothing made");
    // The longest name that fits bakes, with a name EC2 takes.
    cfg.name = format!("v{}", "x".repeat(94));
    let long = imgbuild::bake::image_name(&cfg, &format!("sha256:{}", "a".repeat(64)), "1700000000").unwrap();
    assert_eq!(long.len(), 128);
}

/// A just-created instance profile takes a while to reach EC2, and the runbook's launch retries
/// come at once (`maxAttempts` has no back-off, Automation actions reference). bake waits until
/// a RunInstances dry run with the launch's own profile says it would succeed before starting.
#[tokio::test]
async fn bake_waits_until_ec2_accepts_the_instance_profile_before_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir);
    let mut b = Bake::new(None, successful_execution());
    b.dry_run = capturing!(mock!(aws_sdk_ec2::Client::run_instances), b.dry_runs)
        .sequence()
        .error(profile_not_yet_visible)
        .error(profile_not_yet_visible)
        .error(dry_run_would_succeed)
        .build();

    bake_flow(&b, &cfg, &args(false, 3600), std::future::pending()).await.unwrap();

    let runs = all(&b.dry_runs);
    assert_eq!(runs.len(), 3, "asked until EC2 accepts the profile");
    for r in &runs {
        assert_eq!(r.dry_run(), Some(true), "never a real launch");
        assert_eq!(r.iam_instance_profile().and_then(|p| p.name()), Some("imgbuild-bake-vectordb"));
        assert_eq!(r.subnet_id(), Some("subnet-0123456789abcdef0"));
        assert_eq!(r.image_id(), Some(BASE));
    }
    assert_eq!(b.start.num_calls(), 1);
}

/// Not every instance type is offered in every zone (DescribeInstanceTypeOfferings with
/// LocationType availability-zone; aws-cli `examples/ec2/describe-instance-type-offerings.rst`):
/// the bake subnet goes where the build type is offered, whatever zone comes first in the region.
#[tokio::test]
async fn the_bake_subnet_goes_to_a_zone_that_offers_the_build_instance_type() {
    use aws_sdk_ec2::operation::describe_instance_type_offerings::DescribeInstanceTypeOfferingsOutput;
    use aws_sdk_ec2::types::{InstanceTypeOffering, LocationType};
    let offer =
        |zone: &str| InstanceTypeOffering::builder().instance_type("t3a.small".into()).location_type(LocationType::AvailabilityZone).location(zone).build();
    let (a, b) = (offer("us-east-1f"), offer("us-east-1b"));
    let pages = mock!(aws_sdk_ec2::Client::describe_instance_type_offerings)
        .match_requests(|r| {
            r.location_type() == Some(&LocationType::AvailabilityZone)
                && r.filters().iter().any(|f| f.name() == Some("instance-type") && f.values() == ["t3a.small"])
        })
        .sequence()
        .output(move || DescribeInstanceTypeOfferingsOutput::builder().instance_type_offerings(a.clone()).next_token("page-2").build())
        .output(move || DescribeInstanceTypeOfferingsOutput::builder().instance_type_offerings(b.clone()).build())
        .build();
    let c = clients(&[&pages], &[]);
    assert_eq!(bake::zone_offering(&c, "t3a.small").await.unwrap(), "us-east-1b", "the first offering zone by name, over every page");

    let none = mock!(aws_sdk_ec2::Client::describe_instance_type_offerings).then_output(|| DescribeInstanceTypeOfferingsOutput::builder().build());
    let c = clients(&[&none], &[]);
    match bake::zone_offering(&c, "t3a.small").await.unwrap_err() {
        Error::Invalid(m) => assert!(m.starts_with("bake.instance_type: t3a.small is offered in no availability zone"), "{m}"),
        other => panic!("{other:?}"),
    }
    // The template puts the subnet in the zone given.
    let template: serde_yaml::Value = serde_yaml::from_str(include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/infra/bake-prereqs.yaml"))).unwrap();
    let zone = serde_yaml::to_string(&template["Resources"]["PublicSubnet"]["Properties"]["AvailabilityZone"]).unwrap();
    assert!(zone.contains("ZoneGiven") && zone.contains("AvailabilityZone"), "{zone}");
}

/// Run Command keeps only the first 48,000 characters of a command's output unless it goes to
/// CloudWatch Logs or S3 (SendCommand, CloudWatchOutputConfig): both Run Command steps send
/// their whole output to the bake's log group, which the prerequisites stack makes and lets the
/// build instance write to, and bake says where it is when such a step fails.
#[tokio::test]
async fn run_command_output_goes_to_cloudwatch_logs_and_bake_says_where() {
    let steps = shipped_steps();
    for s in steps.iter().filter(|s| s["action"].as_str() == Some("aws:runCommand")) {
        let cw = &s["inputs"]["CloudWatchOutputConfig"];
        assert_eq!(
            (cw["CloudWatchLogGroupName"].as_str(), cw["CloudWatchOutputEnabled"].as_bool()),
            (Some("{{ LogGroupName }}"), Some(true)),
            "{:?}",
            s["name"]
        );
    }
    let prereqs: serde_yaml::Value = serde_yaml::from_str(include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/infra/bake-prereqs.yaml"))).unwrap();
    assert_eq!(prereqs["Resources"]["BakeLogGroup"]["Type"].as_str(), Some("AWS::Logs::LogGroup"));
    let role = serde_yaml::to_string(&prereqs["Resources"]["BuildInstanceRole"]).unwrap();
    assert!(role.contains("logs:PutLogEvents") && role.contains("BakeLogGroup.Arn"), "the instance may write to the group: {role}");
    assert!(prereqs["Outputs"]["LogGroupName"].is_mapping());

    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir);
    let b = Bake::new(None, successful_execution());
    bake_flow(&b, &cfg, &args(false, 3600), std::future::pending()).await.unwrap();
    assert_eq!(param(&b.start_request(), "LogGroupName"), "/imgbuild/vectordb/bake");

    // A failed runBakeScript: the error names the group and the streams.
    let mut failed = done(&["launchInstance", "waitForInstance", "assertInstanceRunning", "waitForSsmAgent"]);
    failed.push(step("runBakeScript", "Failed", Some(&failure_of("runBakeScript"))));
    let get = get_execution(vec![execution("Failed", failed, None)]);
    let c = clients(&[], &[&get]);
    let err = bake::follow(&c, EXEC, Duration::from_secs(5), Duration::from_millis(1), &quiet(), &record()).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&format!("CloudWatch Logs group /imgbuild/vectordb/bake, streams <command-id>/{INSTANCE}/aws-runShellScript/stdout")), "{text}");
}

/// An image or snapshot whose id bake never saw is still this bake's: both carry its token.
#[test]
fn the_image_and_its_snapshot_carry_the_bake_token() {
    let steps = shipped_steps();
    let create = step_named(&steps, "createImage");
    for spec in create["inputs"]["TagSpecifications"].as_sequence().unwrap() {
        let tags = spec["Tags"].as_sequence().unwrap();
        assert!(
            tags.iter().any(|t| t["Key"].as_str() == Some("imgbuild:bake-token") && t["Value"].as_str() == Some("{{ BakeToken }}")),
            "{:?} has no bake token tag",
            spec["ResourceType"]
        );
    }
}

#[tokio::test]
async fn clean_up_removes_what_carries_the_bake_token_though_it_never_saw_an_id() {
    // Interrupted between two polls: CreateImage ran, but no answer naming the image arrived.
    // The image (any state) and an orphan snapshot carry the token; the cleanup finds both.
    const ORPHAN: &str = "snap-0ffffffffffffffff";
    let mut b = Bake::new(None, vec![execution("InProgress", vec![], None)]);
    b.token_images = token_images(&b.token_image_lookups, vec![image(AMI, "sha256:half-made")]);
    b.token_snapshots = token_snapshots(&b.token_snapshot_lookups, vec![SNAP, ORPHAN]);
    let deleted = seen();
    b.delete_snapshot = capturing!(mock!(aws_sdk_ec2::Client::delete_snapshot), deleted).then_output(|| DeleteSnapshotOutput::builder().build());
    let c = b.clients();
    let rec = record();
    *rec.lock().unwrap() = Made { execution: Some(EXEC.into()), start_sent: true, ..Made::default() };

    let lines = bake::clean_up(&c, &rec, "tok-3", imgbuild::stack::Waits { timeout: Duration::from_secs(5), poll: Duration::from_millis(1) }, &quiet()).await;

    let lookup = &all(&b.token_image_lookups)[0];
    assert_eq!(lookup.owners(), ["self"]);
    assert_eq!(lookup.filters().len(), 1, "any state: a pending image is removed too: {:?}", lookup.filters());
    assert_eq!(lookup.filters()[0].values(), ["tok-3"]);
    assert_eq!(all(&b.token_snapshot_lookups)[0].filters()[0].values(), ["tok-3"]);
    assert_eq!(b.deregister.num_calls(), 1);
    let deleted: Vec<String> =
        all(&deleted).iter().filter_map(|d: &aws_sdk_ec2::operation::delete_snapshot::DeleteSnapshotInput| d.snapshot_id().map(String::from)).collect();
    assert_eq!(deleted, [SNAP, ORPHAN], "the image's snapshot once, then the orphan");
    assert!(lines.iter().any(|l| l.contains(&format!("deregistered the unfinished image {AMI}"))), "{lines:?}");
    assert!(lines.iter().any(|l| l == &format!("deleted the unfinished snapshot {ORPHAN}")), "{lines:?}");
}

#[tokio::test]
async fn clean_up_waits_for_the_stopped_execution_to_end_before_reading_its_image() {
    // Stopped during createImage: Cancelling first (no image yet), then Cancelled with the
    // step's image. Reading the outputs right after the stop would miss it.
    let mut b = Bake::new(None, vec![execution("InProgress", vec![], None)]);
    let pre = ["launchInstance", "waitForInstance", "assertInstanceRunning", "waitForSsmAgent", "runBakeScript", "verify", "stopInstance"];
    let mut cancelling = done(&pre);
    cancelling.push(step("createImage", "InProgress", None));
    let mut cancelled = done(&pre);
    cancelled.push(step("createImage", "Success", None));
    cancelled.push(step("waitForImage", "Cancelled", None));
    cancelled.push(step("cancelTerminate", "Success", None));
    let flag = b.stopped.clone();
    let mut seq = mock!(aws_sdk_ssm::Client::get_automation_execution)
        .match_requests(move |r| r.automation_execution_id() == Some(EXEC) && flag.load(Ordering::SeqCst))
        .sequence();
    for a in [execution("Cancelling", cancelling.clone(), None), execution("Cancelling", cancelling, None), execution("Cancelled", cancelled, Some(AMI))] {
        seq = seq.output(move || a.clone());
    }
    b.cancelled = seq.repeatedly().build();
    let c = b.clients();
    let rec = record();
    *rec.lock().unwrap() = Made { execution: Some(EXEC.into()), start_sent: true, ..Made::default() };

    let lines = bake::clean_up(&c, &rec, "tok-4", imgbuild::stack::Waits { timeout: Duration::from_secs(5), poll: Duration::from_millis(1) }, &quiet()).await;

    assert_eq!(b.cancelled.num_calls(), 3, "polled until Cancelled");
    assert_eq!(b.deregister.num_calls(), 1, "{lines:?}");
    assert!(lines.iter().any(|l| l.starts_with(&format!("deregistered the unfinished image {AMI}"))), "{lines:?}");
}

#[tokio::test]
async fn follow_names_the_failed_step_and_its_message_for_a_failure_at_every_step() {
    let names = step_names();
    let create_image = names.iter().position(|n| n == "createImage").unwrap();
    for (i, name) in names.iter().enumerate() {
        let message = failure_of(name);
        let before: Vec<&str> = names[..i].iter().map(String::as_str).collect();
        // Once the image exists (createImage succeeded), the outputs carry its id.
        let image = (i > create_image).then_some(AMI);
        // The running step, then its failure; every step after launchInstance sends a failure
        // on to terminateInstance, which succeeds.
        let mut running = done(&before);
        running.push(step(name, "InProgress", None));
        let mut failed = done(&before);
        failed.push(step(name, "Failed", Some(&message)));
        if i > 0 && name != "terminateInstance" {
            failed.push(step("terminateInstance", "Success", None));
        }
        let get = get_execution(vec![execution("InProgress", running, image), execution("Failed", failed, image)]);
        let clients = clients(&[], &[&get]);
        let rec = record();

        let err = bake::follow(&clients, EXEC, Duration::from_secs(5), Duration::from_millis(1), &quiet(), &rec).await.unwrap_err();

        match &err {
            Error::BakeFailed { execution, status, detail } => {
                assert_eq!(execution, EXEC, "{name}");
                assert_eq!(status, "Failed", "{name}");
                // Only the failed step is named, not the terminateInstance that cleaned up.
                assert_eq!(detail, &format!("step {name} Failed: {message}{}", log_hint(name, &message)), "{name}");
            }
            other => panic!("{name}: expected BakeFailed, got {other:?}"),
        }
        assert_eq!(err.exit_code(), 1, "{name}");
        assert_eq!(err.kind(), "bake_failed");
        let text = err.to_string();
        assert!(text.contains(EXEC) && text.contains(name.as_str()) && text.contains(&message), "{text}");
        assert_eq!(get.num_calls(), 2, "{name}");
        assert_eq!(made(&rec).image.as_deref(), image, "{name}: the record holds the image exactly when one was made");
    }
}

#[tokio::test]
async fn follow_reports_a_timed_out_execution_as_a_failed_bake() {
    let msg = "Step timed out while step is verifying the command has completed.";
    let mut steps = done(&["launchInstance", "waitForInstance", "waitForSsmAgent"]);
    steps.push(step("runBakeScript", "TimedOut", Some(msg)));
    steps.push(step("terminateInstance", "Success", None));
    let get = get_execution(vec![execution("TimedOut", steps, None)]);
    let clients = clients(&[], &[&get]);

    let err = bake::follow(&clients, EXEC, Duration::from_secs(5), Duration::from_millis(1), &quiet(), &record()).await.unwrap_err();

    match &err {
        Error::BakeFailed { status, detail, .. } => {
            assert_eq!(status, "TimedOut");
            assert_eq!(detail, &format!("step runBakeScript TimedOut: {msg}{}", log_hint("runBakeScript", msg)));
        }
        other => panic!("expected BakeFailed, got {other:?}"),
    }
    assert_eq!(err.exit_code(), 1);
    assert_eq!(get.num_calls(), 1);
}

#[tokio::test]
async fn follow_reports_a_cancelled_or_partly_failed_execution_as_a_failed_bake() {
    for status in ["Cancelled", "CompletedWithFailure"] {
        let mut steps = done(&["launchInstance", "waitForInstance"]);
        steps.push(step("waitForSsmAgent", "Cancelled", None));
        let get = get_execution(vec![execution(status, steps, None)]);
        let clients = clients(&[], &[&get]);

        let err = bake::follow(&clients, EXEC, Duration::from_secs(5), Duration::from_millis(1), &quiet(), &record()).await.unwrap_err();

        match &err {
            Error::BakeFailed { status: s, detail, .. } => {
                assert_eq!(s, status);
                assert_eq!(detail, "step waitForSsmAgent Cancelled: no message");
            }
            other => panic!("{status}: expected BakeFailed, got {other:?}"),
        }
    }
}

/// Exited and Rejected are final statuses too (AutomationExecution.AutomationExecutionStatus in
/// the SSM API reference); CompletedWithSuccess is a success. None of them may leave bake
/// following an execution that changes no more until its timeout.
#[tokio::test]
async fn follow_ends_at_every_final_status() {
    for (status, ok) in [("Exited", false), ("Rejected", false), ("CompletedWithSuccess", true)] {
        let steps = if ok { done(&["launchInstance", "createImage"]) } else { done(&["launchInstance"]) };
        let get = get_execution(vec![execution(status, steps, ok.then_some(AMI))]);
        let c = clients(&[], &[&get]);
        let r = bake::follow(&c, EXEC, Duration::from_secs(5), Duration::from_millis(1), &quiet(), &record()).await;
        match (r, ok) {
            (Ok(ami), true) => assert_eq!(ami, AMI),
            (Err(Error::BakeFailed { status: s, .. }), false) => assert_eq!(s, status),
            (other, _) => panic!("{status}: {other:?}"),
        }
        assert_eq!(get.num_calls(), 1, "{status}: one look is enough");
    }
}

#[tokio::test]
async fn follow_falls_back_to_the_executions_own_failure_message() {
    // A failure before any step ran (a parameter the document rejects) names no step.
    let reason = "Parameter \"BaseAmiId\" has value \"ami-bad\" not matching \"^ami-([0-9a-f]{8}|[0-9a-f]{17})$\".";
    let out = GetAutomationExecutionOutput::builder()
        .automation_execution(
            AutomationExecution::builder()
                .automation_execution_id(EXEC)
                .automation_execution_status(AutomationExecutionStatus::Failed)
                .failure_message(reason)
                .build(),
        )
        .build();
    let get = get_execution(vec![out]);
    let clients = clients(&[], &[&get]);

    let err = bake::follow(&clients, EXEC, Duration::from_secs(5), Duration::from_millis(1), &quiet(), &record()).await.unwrap_err();

    match &err {
        Error::BakeFailed { status, detail, .. } => {
            assert_eq!(status, "Failed");
            assert_eq!(detail, reason);
        }
        other => panic!("expected BakeFailed, got {other:?}"),
    }
}

#[tokio::test]
async fn follow_gives_up_on_an_execution_that_never_ends() {
    let mut steps = done(&["launchInstance", "waitForInstance", "waitForSsmAgent"]);
    steps.push(step("runBakeScript", "InProgress", None));
    let get = get_execution(vec![execution("InProgress", steps, None)]);
    let clients = clients(&[], &[&get]);
    let rec = record();

    let err = bake::follow(&clients, EXEC, Duration::from_millis(50), Duration::from_millis(1), &quiet(), &rec).await.unwrap_err();

    match &err {
        Error::Timeout { what, .. } => assert!(what.contains(EXEC), "{what}"),
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert_eq!(err.exit_code(), 1);
    assert!(get.num_calls() >= 2, "polled until the deadline: {}", get.num_calls());
    assert_eq!(made(&rec).image, None);
}

#[tokio::test]
async fn follow_refuses_a_success_without_an_image() {
    let get = get_execution(vec![execution("Success", done(&["launchInstance"]), None)]);
    let clients = clients(&[], &[&get]);

    let err = bake::follow(&clients, EXEC, Duration::from_secs(5), Duration::from_millis(1), &quiet(), &record()).await.unwrap_err();

    match &err {
        Error::Tool(m) => assert!(m.contains("createImage.ImageId"), "{m}"),
        other => panic!("expected Tool, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// bake::start and bake::clean_up

#[tokio::test]
async fn start_sends_the_client_token_and_records_the_execution() {
    let b = Bake::new(None, vec![execution("Pending", vec![], None)]);
    let clients = b.clients();
    let rec = record();
    let params = BTreeMap::from([("BaseAmiId".to_string(), BASE.to_string()), ("ProjectName".to_string(), NAME.to_string())]);

    let id = bake::start(&clients, DOC_NAME, "1", params, "8c0e3f4a-1b2c-4d3e-a4f5-061728394a5b", &rec).await.unwrap();

    assert_eq!(id, EXEC);
    assert_eq!(made(&rec).execution.as_deref(), Some(EXEC));
    let sent = b.start_request();
    assert_eq!(sent.document_name(), Some(DOC_NAME));
    assert_eq!(sent.client_token(), Some("8c0e3f4a-1b2c-4d3e-a4f5-061728394a5b"));
    assert_eq!(param(&sent, "BaseAmiId"), BASE);
    assert_eq!(param(&sent, "ProjectName"), NAME);
}

#[tokio::test]
async fn clean_up_after_a_finished_bake_touches_nothing() {
    let b = Bake::new(None, vec![execution("Pending", vec![], None)]);
    let clients = b.clients();
    let rec = record();
    *rec.lock().unwrap() = Made { execution: Some(EXEC.into()), image: Some(AMI.into()), finished: true, ..Made::default() };

    let lines =
        bake::clean_up(&clients, &rec, "tok", imgbuild::stack::Waits { timeout: Duration::from_secs(5), poll: Duration::from_millis(1) }, &quiet()).await;

    assert!(lines.is_empty(), "{lines:?}");
    assert_eq!(b.stop.num_calls() + b.describe_instances.num_calls() + b.deregister.num_calls(), 0);
}

#[tokio::test]
async fn clean_up_stops_terminates_and_deregisters_in_that_order() {
    let b = Bake::new(None, vec![execution("Pending", vec![], None)]);
    let clients = b.clients();
    let rec = record();
    *rec.lock().unwrap() = Made { execution: Some(EXEC.into()), image: Some(AMI.into()), finished: false, ..Made::default() };

    let lines =
        bake::clean_up(&clients, &rec, "tok-1", imgbuild::stack::Waits { timeout: Duration::from_secs(5), poll: Duration::from_millis(1) }, &quiet()).await;

    assert_eq!(
        lines,
        vec![
            format!("stopped automation execution {EXEC}"),
            format!("terminated build instance {INSTANCE}"),
            format!("build instance {INSTANCE} is terminated"),
            format!("deregistered the unfinished image {AMI} and deleted its snapshots {SNAP}"),
        ]
    );
    assert_eq!((b.stop.num_calls(), b.terminate.num_calls(), b.deregister.num_calls(), b.delete_snapshot.num_calls()), (1, 1, 1, 1));
    assert_eq!(all(&b.instance_lookups)[0].filters()[0].values(), ["tok-1"]);
    // The record is emptied: a second cleanup does nothing more.
    assert_eq!(made(&rec).execution, None);
}

#[tokio::test]
async fn clean_up_finds_and_stops_an_execution_whose_start_was_in_flight() {
    // Ctrl-C landed while StartAutomationExecution was on the wire: no id came back, but AWS
    // may have started it. The cleanup finds it by this bake's token and stops it.
    let mut b = Bake::new(None, vec![execution("InProgress", vec![], None)]);
    b.running = running(&[(EXEC, DOC_NAME)]);
    b.get_execution = mock!(aws_sdk_ssm::Client::get_automation_execution).match_requests(|r| r.automation_execution_id() == Some(EXEC)).then_output(|| {
        let exec = aws_sdk_ssm::types::AutomationExecution::builder()
            .automation_execution_id(EXEC)
            .document_name(DOC_NAME)
            .automation_execution_status(AutomationExecutionStatus::Inprogress)
            .parameters("BakeToken", vec!["tok-2".to_string()])
            .build();
        GetAutomationExecutionOutput::builder().automation_execution(exec).build()
    });
    let clients = b.clients();
    let rec = record();
    *rec.lock().unwrap() = Made { start_sent: true, document: Some(DOC_NAME.into()), ..Made::default() };

    let lines =
        bake::clean_up(&clients, &rec, "tok-2", imgbuild::stack::Waits { timeout: Duration::from_secs(5), poll: Duration::from_millis(1) }, &quiet()).await;

    assert_eq!(b.stop.num_calls(), 1, "{lines:?}");
    assert_eq!(lines[0], format!("stopped automation execution {EXEC}"));
    assert!(lines.iter().any(|l| l == &format!("build instance {INSTANCE} is terminated")), "{lines:?}");
}

// ---------------------------------------------------------------------------------------------
// remote::bake_flow

/// bake_flow in us-east-1 with `args`, interrupted when `interrupt` resolves.
async fn bake_flow(b: &Bake, cfg: &Config, args: &BakeArgs, interrupt: impl std::future::Future<Output = ()>) -> imgbuild::Result<serde_json::Value> {
    let clients = b.clients();
    imgbuild::cmd::bake_flow(&clients, "us-east-1", args, &context(cfg.clone()), quiet_ui(), interrupt).await
}

fn no_manifest(cfg: &Config) -> bool {
    !std::path::Path::new(&cfg.bake.manifest).exists()
}

fn running_script() -> Vec<StepExecution> {
    let mut steps = done(&["launchInstance", "waitForInstance", "waitForSsmAgent"]);
    steps.push(step("runBakeScript", "InProgress", None));
    steps
}

#[tokio::test]
async fn bake_interrupted_after_start_stops_the_execution_and_terminates_the_build_instance() {
    let b = Bake::new(None, vec![execution("InProgress", running_script(), None)]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir);

    // Ctrl-C once the execution has been looked at (follow then sleeps its 1 s poll).
    let err = bake_flow(&b, &cfg, &args(false, 3600), after_calls(b.get_execution.clone(), 1)).await.unwrap_err();

    let cleaned = match &err {
        Error::Interrupted { cleaned } => cleaned.clone(),
        other => panic!("expected Interrupted, got {other:?}"),
    };
    assert_eq!(err.exit_code(), 130);
    assert_eq!(err.kind(), "interrupted");
    assert_eq!(
        cleaned,
        vec![
            format!("stopped automation execution {EXEC}"),
            format!("terminated build instance {INSTANCE}"),
            format!("build instance {INSTANCE} is terminated"),
        ]
    );
    let text = err.to_string();
    assert!(text.starts_with("interrupted; cleaned up: ") && text.contains(INSTANCE), "{text}");

    assert_eq!(b.running.num_calls(), 1, "looked for a running bake of the digest first");
    assert_eq!(b.start.num_calls(), 1);
    assert_eq!(b.get_execution.num_calls(), 1);
    assert_eq!(b.stop.num_calls(), 1, "StopAutomationExecution, Type=Cancel");
    assert_eq!(b.describe_instances.num_calls(), 2, "running, then terminated");
    assert_eq!(b.terminate.num_calls(), 1);
    assert_eq!(all(&b.terminated)[0].instance_ids(), [INSTANCE]);
    // The instances looked for are this bake's: tagged with the token it started the execution with.
    let start = b.start_request();
    let token = param(&start, "BakeToken");
    assert_eq!(start.client_token(), Some(token));
    for lookup in all(&b.instance_lookups) {
        let f = lookup.filters();
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].name(), Some("tag:imgbuild:bake-token"));
        assert_eq!(f[0].values(), [token]);
    }
    // Nothing made, nothing handed over.
    assert_eq!(b.describe_image.num_calls() + b.deregister.num_calls(), 0);
    assert_eq!(b.put_parameter.num_calls(), 0);
    assert!(no_manifest(&cfg), "no manifest after an interrupted bake");
}

#[tokio::test]
async fn bake_interrupted_after_the_execution_ended_stops_nothing_and_terminates_nothing() {
    let mut steps = done(&["launchInstance", "waitForInstance"]);
    steps.push(step("waitForSsmAgent", "InProgress", None));
    let mut over = done(&["launchInstance", "waitForInstance"]);
    over.push(step("waitForSsmAgent", "Failed", Some(&failure_of("waitForSsmAgent"))));
    over.push(step("terminateInstance", "Success", None));
    // Seen InProgress, then over by the time the cleanup asks (StopAutomationExecution says so).
    let mut b = Bake::new(None, vec![execution("InProgress", steps, None), execution("Failed", over, None)]);
    b.stop = stop_already_over();
    b.describe_instances = mock!(aws_sdk_ec2::Client::describe_instances).then_output(|| instances(InstanceStateName::Terminated));
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir);

    let err = bake_flow(&b, &cfg, &args(false, 3600), after_calls(b.get_execution.clone(), 1)).await.unwrap_err();

    match &err {
        Error::Interrupted { cleaned } => assert_eq!(cleaned, &vec![format!("build instance {INSTANCE} is terminated")]),
        other => panic!("expected Interrupted, got {other:?}"),
    }
    assert_eq!(err.exit_code(), 130);
    assert_eq!(b.stop.num_calls(), 1, "asked once; InvalidAutomationStatusUpdateException means it is over");
    assert_eq!(b.describe_instances.num_calls(), 1);
    assert_eq!(b.terminate.num_calls(), 0, "an instance that is already terminated is not terminated again");
    assert!(no_manifest(&cfg));
}

#[tokio::test]
async fn bake_that_times_out_stops_the_execution_it_says_it_stopped() {
    let b = Bake::new(None, vec![execution("InProgress", running_script(), None)]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir);

    let err = bake_flow(&b, &cfg, &args(false, 1), std::future::pending()).await.unwrap_err();

    match &err {
        Error::Timeout { what, secs, hint } => {
            assert!(what.contains(EXEC), "{what}");
            assert_eq!(*secs, 1);
            assert!(hint.contains("bake stops the executions it started and says so"), "{hint}");
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert_eq!(err.exit_code(), 1);
    assert!(b.get_execution.num_calls() >= 2);
    assert_eq!(b.stop.num_calls(), 1, "the hint says it has been stopped: it has");
    assert_eq!(b.terminate.num_calls(), 1);
    assert_eq!(b.put_parameter.num_calls(), 0);
    assert!(no_manifest(&cfg));
}

/// A bake that fails at the bake script, answered as SSM answers: the document output
/// `createImage.ImageId` is the sentence "No output available yet because the step is not
/// successfully executed" (aws-cli `examples/ssm/get-automation-execution.rst`). That is not an
/// image: the cleanup must not look it up or deregister it (it once sent it to DescribeImages and
/// reported "could not remove the unfinished image No output available yet ...").
#[tokio::test]
async fn bake_that_fails_before_create_image_takes_no_placeholder_for_an_image() {
    let before = ["launchInstance", "waitForInstance", "waitForSsmAgent"];
    let mut running = done(&before);
    running.push(step("runBakeScript", "InProgress", None));
    let mut failed = done(&before);
    failed.push(step("runBakeScript", "Failed", Some(&failure_of("runBakeScript"))));
    failed.push(step("terminateInstance", "Success", None));
    let mut b = Bake::new(None, vec![execution("InProgress", running, None), execution("Failed", failed, None)]);
    b.stop = stop_already_over();
    b.describe_instances = mock!(aws_sdk_ec2::Client::describe_instances).then_output(|| instances(InstanceStateName::Terminated));
    // Any DescribeImages by id or DeregisterImage: the placeholder would land here.
    b.describe_image =
        mock!(aws_sdk_ec2::Client::describe_images).match_requests(|r| !r.image_ids().is_empty()).then_output(|| DescribeImagesOutput::builder().build());
    b.deregister = mock!(aws_sdk_ec2::Client::deregister_image).then_output(|| DeregisterImageOutput::builder().build());
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir);

    let err = bake_flow(&b, &cfg, &args(false, 3600), std::future::pending()).await.unwrap_err();

    match &err {
        Error::BakeFailed { status, detail, .. } => {
            assert_eq!(status, "Failed");
            assert_eq!(
                detail,
                &format!("step runBakeScript Failed: {}{}", failure_of("runBakeScript"), log_hint("runBakeScript", &failure_of("runBakeScript")))
            );
        }
        other => panic!("expected BakeFailed, got {other:?}"),
    }
    assert_eq!(b.describe_image.num_calls(), 0, "the placeholder is not an image to look up");
    assert_eq!(b.deregister.num_calls(), 0, "nor one to deregister");
    assert!(no_manifest(&cfg));
}

#[tokio::test]
async fn follow_never_records_the_placeholder_as_the_image() {
    // Cancelled at createImage: the step records and the outputs as SSM hands them back.
    let before = ["launchInstance", "waitForInstance", "waitForSsmAgent", "runBakeScript", "verify", "stopInstance"];
    let mut steps = done(&before);
    steps.push(step("createImage", "Cancelled", None));
    let get = get_execution(vec![execution("Cancelled", steps, None)]);
    let c = clients(&[], &[&get]);
    let rec = record();
    let err = bake::follow(&c, EXEC, Duration::from_secs(5), Duration::from_millis(1), &quiet(), &rec).await.unwrap_err();
    assert!(matches!(err, Error::BakeFailed { .. }), "{err:?}");
    assert_eq!(made(&rec).image, None);
}

#[tokio::test]
async fn bake_that_fails_after_create_image_deregisters_the_image_and_deletes_its_snapshot() {
    let before = ["launchInstance", "waitForInstance", "waitForSsmAgent", "runBakeScript", "verify", "stopInstance", "createImage"];
    let mut running = done(&before);
    running.push(step("waitForImage", "InProgress", None));
    let mut failed = done(&before);
    failed.push(step("waitForImage", "Failed", Some(&failure_of("waitForImage"))));
    failed.push(step("terminateInstance", "Success", None));
    let mut b = Bake::new(None, vec![execution("InProgress", running, Some(AMI)), execution("Failed", failed, Some(AMI))]);
    // The execution is over by the time the cleanup runs, and its terminateInstance step ran.
    b.stop = stop_already_over();
    b.describe_instances = mock!(aws_sdk_ec2::Client::describe_instances).then_output(|| instances(InstanceStateName::Terminated));
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir);

    let err = bake_flow(&b, &cfg, &args(false, 3600), std::future::pending()).await.unwrap_err();

    match &err {
        Error::BakeFailed { execution, status, detail } => {
            assert_eq!(execution, EXEC);
            assert_eq!(status, "Failed");
            assert_eq!(detail, &format!("step waitForImage Failed: {}", failure_of("waitForImage")));
        }
        other => panic!("expected BakeFailed, got {other:?}"),
    }
    assert_eq!(err.exit_code(), 1);
    assert_eq!(b.get_execution.num_calls(), 3, "two while following, one in the cleanup to see it is over");
    assert_eq!(b.stop.num_calls(), 1);
    assert_eq!(b.terminate.num_calls(), 0);
    assert_eq!(b.describe_image.num_calls(), 1, "the half-made image is looked up for its snapshots");
    assert_eq!(b.deregister.num_calls(), 1);
    assert_eq!(b.delete_snapshot.num_calls(), 1);
    assert_eq!(b.put_parameter.num_calls(), 0, "a failed bake hands nothing over");
    assert!(no_manifest(&cfg));
}

#[tokio::test]
async fn bake_reuses_a_cached_image_without_starting_an_execution() {
    let mut b = Bake::new(Some(image(AMI, "sha256:whatever-the-filter-asked")), vec![execution("Pending", vec![], None)]);
    // Nothing of the automation may be touched on a hit.
    b.get_document = mock!(aws_sdk_ssm::Client::get_document).then_output(|| GetDocumentOutput::builder().build());
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir);

    let out = bake_flow(&b, &cfg, &args(false, 3600), std::future::pending()).await.unwrap();

    // The lookup: our images, available, tagged with the recipe's digest.
    let lookups = all(&b.cache_lookups);
    assert_eq!(lookups.len(), 1);
    let filters = lookups[0].filters();
    let digest = looked_up_digest(&b.cache_lookups);
    assert!(digest.starts_with("sha256:") && digest.len() == 7 + 64, "{digest}");
    assert!(filters.iter().any(|f| f.name() == Some("state") && f.values() == ["available"]), "{filters:?}");

    assert_eq!(b.get_parameter.num_calls(), 1, "the base image from AWS's public parameter");
    assert_eq!(b.get_document.num_calls() + b.create_document.num_calls() + b.update_document.num_calls(), 0);
    assert_eq!(b.running.num_calls(), 0);
    assert_eq!(b.start.num_calls(), 0, "no StartAutomationExecution on a cache hit");
    assert_eq!(b.get_execution.num_calls(), 0);
    assert_eq!(b.cleanup_calls(), 0);
    let puts = all(&b.puts);
    assert_eq!(puts.len(), 1);
    assert_eq!(puts[0].name(), Some(HANDOFF));
    assert_eq!(puts[0].value(), Some(AMI));
    assert_eq!(puts[0].overwrite(), Some(true));

    let manifest = read_manifest(&cfg);
    assert_eq!(manifest["cached"], true);
    assert_eq!(manifest["ami"], AMI);
    assert_eq!(manifest["digest"], digest.as_str());
    assert_eq!(manifest["base_ami"], BASE);
    assert_eq!(manifest["region"], "us-east-1");
    assert_eq!(manifest["name"], NAME);
    assert_eq!(out["cached"], true);
    assert_eq!(out["ami"], AMI);
    assert_eq!(out["parameter"], HANDOFF);
}

#[tokio::test]
async fn bake_takes_the_base_image_the_manifest_recorded() {
    const RECORDED: &str = "ami-0aaaaaaaaaaaaaaaa";
    let b = Bake::new(Some(image(AMI, "sha256:x")), vec![execution("Pending", vec![], None)]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir);
    let earlier = serde_json::json!({
        "name": NAME, "region": "us-east-1", "ami": "ami-0bbbbbbbbbbbbbbbb", "digest": "sha256:old", "base_ami": RECORDED,
        "arch": "x86_64", "chroma_version": cfg.chroma.version, "image": "ghcr.io/chroma-core/chroma", "time": 1_700_000_000u64, "cached": false
    });
    std::fs::write(&cfg.bake.manifest, serde_json::to_string_pretty(&earlier).unwrap()).unwrap();

    let out = bake_flow(&b, &cfg, &args(false, 3600), std::future::pending()).await.unwrap();

    assert_eq!(b.get_parameter.num_calls(), 0, "the recorded base is kept until --update-base");
    assert_eq!(out["base_ami"], RECORDED);
    assert_eq!(read_manifest(&cfg)["base_ami"], RECORDED);
}

/// Asserts a fresh bake started EXEC with everything the document needs, cleaned nothing up
/// and handed `handed` over.
fn assert_fresh_bake(b: &Bake, cfg: &Config, out: &serde_json::Value, handed: &str) {
    let start = b.start_request();
    assert_eq!(start.document_name(), Some(DOC_NAME));
    let token = start.client_token().expect("a ClientToken");
    assert!(is_uuid(token), "StartAutomationExecution's ClientToken must be a UUID: {token}");
    let digest = param(&start, "Digest").to_string();
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{digest}");
    assert_eq!(param(&start, "BaseAmiId"), BASE);
    assert_eq!(param(&start, "BakeToken"), token, "the build instance is tagged with the token cleanup looks for");
    assert_eq!(param(&start, "ProjectName"), NAME);
    assert_eq!(param(&start, "AutomationAssumeRole"), "arn:aws:iam::123456789012:role/imgbuild-bake-automation");
    assert_eq!(param(&start, "SubnetId"), "subnet-0123456789abcdef0");
    assert_eq!(param(&start, "SecurityGroupId"), "sg-0123456789abcdef0");
    assert_eq!(param(&start, "InstanceProfileName"), "imgbuild-bake-vectordb");
    assert_eq!(param(&start, "ChromaVersion"), cfg.chroma.version);
    let image_name = param(&start, "ImageName");
    assert!(image_name.starts_with(&format!("imgbuild-{NAME}-{}-", &digest[7..19])), "{image_name}");
    // Every parameter the document declares is sent, and nothing else.
    let doc: serde_yaml::Value = serde_yaml::from_str(bake::DOCUMENT_TEMPLATE).unwrap();
    let mut declared: Vec<String> = doc["parameters"].as_mapping().unwrap().keys().map(|k| k.as_str().unwrap().to_string()).collect();
    declared.sort();
    let mut sent: Vec<String> = start.parameters().unwrap().keys().cloned().collect();
    sent.sort();
    assert_eq!(sent, declared);

    assert_eq!(b.get_execution.num_calls(), 2);
    assert_eq!(b.stop.num_calls() + b.describe_instances.num_calls() + b.terminate.num_calls(), 0, "no cleanup after a success");
    let puts = all(&b.puts);
    assert_eq!(puts.len(), 1);
    assert_eq!((puts[0].name(), puts[0].value()), (Some(HANDOFF), Some(handed)));

    let manifest = read_manifest(cfg);
    assert_eq!(manifest["cached"], false);
    assert_eq!(manifest["ami"], handed);
    assert_eq!(manifest["base_ami"], BASE);
    assert_eq!(manifest["digest"], digest.as_str());
    assert_eq!(manifest["arch"], "x86_64");
    assert_eq!(manifest["copies"], serde_json::json!({}));
    assert_eq!(out["cached"], false);
    assert_eq!(out["ami"], handed);
    assert_eq!(out["digest"], digest.as_str());
}

fn successful_execution() -> Vec<GetAutomationExecutionOutput> {
    let names = step_names();
    let mut running: Vec<StepExecution> = names[..3].iter().map(|n| step(n, "Success", None)).collect();
    running.push(step(&names[3], "InProgress", None));
    vec![execution("InProgress", running, None), execution("Success", names.iter().map(|n| step(n, "Success", None)).collect(), Some(AMI))]
}

#[tokio::test]
async fn bake_on_a_miss_registers_the_document_starts_follows_and_hands_over() {
    let b = Bake::new(None, successful_execution());
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir);

    let out = bake_flow(&b, &cfg, &args(false, 3600), std::future::pending()).await.unwrap();

    assert_eq!(b.find_cached.num_calls(), 2, "the lookup, and the check for an older duplicate after the bake");
    assert_eq!(b.get_document.num_calls(), 1);
    assert_eq!(b.update_document.num_calls() + b.update_default.num_calls(), 0);
    let created = all(&b.created);
    assert_eq!(created.len(), 1, "InvalidDocument: the document is created");
    let c = &created[0];
    assert_eq!(c.name(), Some(DOC_NAME));
    assert_eq!(c.document_type(), Some(&DocumentType::Automation));
    assert_eq!(c.document_format(), Some(&DocumentFormat::Yaml));
    assert_eq!(c.content(), Some(rendered_document(&cfg).as_str()));
    assert!(!c.content().unwrap().contains(bake::SCRIPT_PLACEHOLDER));
    assert!(c.tags().iter().any(|t| t.key() == "imgbuild:project" && t.value() == NAME), "{:?}", c.tags());
    assert_eq!(b.running.num_calls(), 1);
    assert_eq!(b.start.num_calls(), 1);
    // The digest looked up is the one baked.
    assert_eq!(param(&b.start_request(), "Digest"), looked_up_digest(&b.cache_lookups));
    assert_eq!(b.deregister.num_calls(), 0, "no older image with the digest: ours stays");
    assert_fresh_bake(&b, &cfg, &out, AMI);
    // Cost (issue 15, item 1): the new image's snapshots, at most the document's 15 GiB root
    // volume at the table's $0.05/GB-month; no AWS call for it.
    assert_eq!((out["cost"]["items"][0]["resource"].as_str(), out["cost"]["items"][0]["monthly_usd"].as_f64()), (Some(AMI), Some(0.75)), "{}", out["cost"]);
}

#[tokio::test]
async fn bake_that_loses_a_race_hands_over_the_older_image_and_deregisters_its_own() {
    const THEIRS: &str = "ami-0ddddddddddddddd0";
    let mut b = Bake::new(None, successful_execution());
    // Another bake of the same digest finished first (its image is older).
    b.find_cached = find_cached(
        &b.cache_lookups,
        vec![],
        vec![image_made(AMI, "sha256:same", "2026-05-02T11:00:00.000Z"), image_made(THEIRS, "sha256:same", "2026-05-02T10:59:00.000Z")],
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir);

    let out = bake_flow(&b, &cfg, &args(false, 3600), std::future::pending()).await.unwrap();

    assert_eq!(b.start.num_calls(), 1);
    assert_eq!(b.deregister.num_calls(), 1, "ours goes: one digest keeps one image");
    assert_eq!(b.delete_snapshot.num_calls(), 1);
    let puts = all(&b.puts);
    assert_eq!(puts.len(), 1);
    assert_eq!(puts[0].value(), Some(THEIRS));
    assert_eq!(out["ami"], THEIRS);
    assert_eq!(read_manifest(&cfg)["ami"], THEIRS);
}

/// Another execution of the document (OTHER) is baking; `answers` are its GetAutomationExecution
/// answers, each carrying the digest bake_flow looked up as its Digest parameter. A third
/// execution of the document bakes another digest, and one of a document whose name merely
/// starts the same is never looked at.
const OTHER: &str = "7e6d5c4b-3a29-4817-8f6e-5d4c3b2a1908";
const ANOTHER_DIGEST: &str = "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d";
const PREFIX_ONLY: &str = "9f8e7d6c-5b4a-4938-a7b6-c5d4e3f2a1b0";

fn join(b: &mut Bake, answers: Vec<(&'static str, Option<&'static str>)>) -> (Rule, Rule, Rule) {
    b.running = running(&[(PREFIX_ONLY, "imgbuild-vectordb-bake-old"), (ANOTHER_DIGEST, DOC_NAME), (OTHER, DOC_NAME)]);
    let with_digest = |id: &str, status: &str, digest: String, image: Option<&str>| {
        let mut e = AutomationExecution::builder()
            .automation_execution_id(id)
            .document_name(DOC_NAME)
            .automation_execution_status(AutomationExecutionStatus::from(status))
            .parameters("Digest", vec![digest]);
        if let Some(ami) = image {
            // A finished execution lists its steps, the digest step's Output among them.
            e = e.outputs("createImage.ImageId", vec![ami.to_string()]).step_executions(step(bake::DIGEST_STEP, "Success", None));
        }
        GetAutomationExecutionOutput::builder().automation_execution(e.build()).build()
    };
    let lookups = b.cache_lookups.clone();
    let mut seq = mock!(aws_sdk_ssm::Client::get_automation_execution).match_requests(|r| r.automation_execution_id() == Some(OTHER)).sequence();
    for (status, image) in answers {
        let lookups = lookups.clone();
        seq = seq.output(move || with_digest(OTHER, status, looked_up_digest(&lookups), image));
    }
    let other = seq.repeatedly().build();
    let another = mock!(aws_sdk_ssm::Client::get_automation_execution)
        .match_requests(|r| r.automation_execution_id() == Some(ANOTHER_DIGEST))
        .then_output(move || with_digest(ANOTHER_DIGEST, "InProgress", "sha256:0000000000000000000000000000000000000000000000000000000000000000".into(), None));
    let prefix_only = mock!(aws_sdk_ssm::Client::get_automation_execution)
        .match_requests(|r| r.automation_execution_id() == Some(PREFIX_ONLY))
        .then_output(|| GetAutomationExecutionOutput::builder().build());
    b.extra_ssm = vec![other.clone(), another.clone(), prefix_only.clone()];
    (other, another, prefix_only)
}

#[tokio::test]
async fn bake_joins_an_execution_already_baking_the_digest() {
    let mut b = Bake::new(None, vec![execution("Pending", vec![], None)]);
    let (other, another, prefix_only) = join(&mut b, vec![("InProgress", None), ("Success", Some(AMI))]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir);

    let out = bake_flow(&b, &cfg, &args(false, 3600), std::future::pending()).await.unwrap();

    assert_eq!(b.running.num_calls(), 1);
    assert_eq!(prefix_only.num_calls(), 0, "another document's execution is not ours to join");
    assert_eq!(another.num_calls(), 1, "looked at, and left: another digest");
    assert_eq!(other.num_calls(), 2, "looked at, then followed to Success");
    assert_eq!(b.start.num_calls(), 0, "no second execution of the same digest");
    assert_eq!(b.cleanup_calls(), 0);
    assert_eq!(all(&b.puts)[0].value(), Some(AMI));
    assert_eq!(out["ami"], AMI);
    assert_eq!(read_manifest(&cfg)["ami"], AMI);
}

#[tokio::test]
async fn bake_interrupted_while_following_someone_elses_execution_leaves_it_running() {
    let mut b = Bake::new(None, vec![execution("Pending", vec![], None)]);
    let (other, _, _) = join(&mut b, vec![("InProgress", None)]);
    // This bake launched nothing: no instance carries its token.
    b.describe_instances =
        capturing!(mock!(aws_sdk_ec2::Client::describe_instances), b.instance_lookups).then_output(|| DescribeInstancesOutput::builder().build());
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir);

    // Ctrl-C after the join lookup and the first poll of follow.
    let err = bake_flow(&b, &cfg, &args(false, 3600), after_calls(other.clone(), 2)).await.unwrap_err();

    match &err {
        Error::Interrupted { cleaned } => assert!(cleaned.is_empty(), "{cleaned:?}"),
        other => panic!("expected Interrupted, got {other:?}"),
    }
    assert_eq!(err.exit_code(), 130);
    assert_eq!(err.to_string(), "interrupted; nothing needed cleaning up");
    assert_eq!(b.start.num_calls(), 0);
    assert_eq!(b.stop.num_calls(), 0, "the joined execution is theirs: not stopped");
    assert_eq!(b.terminate.num_calls() + b.deregister.num_calls(), 0);
}

#[tokio::test]
async fn bake_with_force_bakes_even_when_a_cached_image_exists() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir);
    let mut b = Bake::new(Some(image_made("ami-0cccccccccccccccc", "sha256:cached", "2026-04-01T10:00:00.000Z")), successful_execution());
    // The document is registered already, with this content: it is left alone.
    let content = rendered_document(&cfg);
    b.get_document = mock!(aws_sdk_ssm::Client::get_document).match_requests(|r| r.name() == Some(DOC_NAME)).then_output(move || {
        GetDocumentOutput::builder()
            .name(DOC_NAME)
            .document_version("3")
            .document_type(DocumentType::Automation)
            .document_format(DocumentFormat::Yaml)
            .content(content.clone())
            .build()
    });

    bake_flow(&b, &cfg, &args(true, 3600), std::future::pending()).await.unwrap();

    assert!(b.find_cached.num_calls() <= 1, "--force does not look for a cached image before baking (only, at most, after)");
    assert_eq!(b.running.num_calls(), 0, "--force does not join a running execution either");
    assert_eq!(b.get_document.num_calls(), 1);
    assert_eq!(b.create_document.num_calls() + b.update_document.num_calls() + b.update_default.num_calls(), 0, "same content: no new version");
    assert_eq!(b.start.num_calls(), 1, "an execution is started");
    assert_eq!(b.get_execution.num_calls(), 2);
    assert_eq!(param(&b.start_request(), "BaseAmiId"), BASE);
}

/// `bake --force` is "bake even if an image has the digest", but settle_duplicates (run after
/// every fresh bake) then finds the older cached image, deregisters the image just baked and
/// hands over the old one: the forced rebuild is thrown away.
#[tokio::test]
async fn bake_with_force_hands_over_the_image_it_baked() {
    const OLD: &str = "ami-0cccccccccccccccc";
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir);
    let mut b = Bake::new(None, successful_execution());
    // The old image with the digest is there before and after the forced bake.
    b.find_cached = find_cached(
        &b.cache_lookups,
        vec![image_made(OLD, "sha256:same", "2026-04-01T10:00:00.000Z")],
        vec![image_made(OLD, "sha256:same", "2026-04-01T10:00:00.000Z"), image_made(AMI, "sha256:same", "2026-05-02T10:00:00.000Z")],
    );

    let out = bake_flow(&b, &cfg, &args(true, 3600), std::future::pending()).await.unwrap();

    assert_eq!(b.start.num_calls(), 1);
    assert_eq!(b.deregister.num_calls(), 0, "the image --force just baked must stay");
    assert_eq!((b.untag.num_calls(), b.mark.num_calls()), (1, 1), "the old image is marked superseded, not deleted");
    assert_eq!(out["ami"], AMI, "--force hands over the image it baked");
    assert_fresh_bake(&b, &cfg, &out, AMI);
}

// ---------------------------------------------------------------------------------------------
// bake::ensure_document

fn get_document_with(content: &'static str, version: &'static str) -> Rule {
    mock!(aws_sdk_ssm::Client::get_document).match_requests(|r| r.name() == Some(DOC_NAME) && r.document_version().is_none()).then_output(move || {
        GetDocumentOutput::builder().name(DOC_NAME).document_version(version).document_format(DocumentFormat::Yaml).content(content).build()
    })
}

const CONTENT_A: &str = "schemaVersion: '0.3'\ndescription: a\nmainSteps: []\n";
const CONTENT_B: &str = "schemaVersion: '0.3'\ndescription: b\nmainSteps: []\n";

#[tokio::test]
async fn ensure_document_leaves_the_same_content_alone() {
    let get = get_document_with(CONTENT_A, "3");
    let update = mock!(aws_sdk_ssm::Client::update_document).then_output(|| UpdateDocumentOutput::builder().build());
    let default = mock!(aws_sdk_ssm::Client::update_document_default_version).then_output(|| UpdateDocumentDefaultVersionOutput::builder().build());
    let create = mock!(aws_sdk_ssm::Client::create_document).then_output(|| CreateDocumentOutput::builder().build());
    let clients = clients(&[], &[&get, &update, &default, &create]);

    let (change, version) = bake::ensure_document(&clients, DOC_NAME, CONTENT_A, NAME).await.unwrap();

    assert_eq!((change, version.as_str()), (DocumentChange::Unchanged, "3"));
    assert_eq!(get.num_calls(), 1);
    assert_eq!(update.num_calls() + default.num_calls() + create.num_calls(), 0);
}

#[tokio::test]
async fn ensure_document_adds_a_version_for_new_content_and_makes_it_the_default() {
    let get = get_document_with(CONTENT_A, "3");
    let updates: Seen<UpdateDocumentInput> = seen();
    let defaults: Seen<UpdateDocumentDefaultVersionInput> = seen();
    let update = capturing!(mock!(aws_sdk_ssm::Client::update_document), updates).then_output(|| {
        UpdateDocumentOutput::builder().document_description(DocumentDescription::builder().name(DOC_NAME).document_version("4").build()).build()
    });
    let default =
        capturing!(mock!(aws_sdk_ssm::Client::update_document_default_version), defaults).then_output(|| UpdateDocumentDefaultVersionOutput::builder().build());
    let create = mock!(aws_sdk_ssm::Client::create_document).then_output(|| CreateDocumentOutput::builder().build());
    let clients = clients(&[], &[&get, &update, &default, &create]);

    let (change, version) = bake::ensure_document(&clients, DOC_NAME, CONTENT_B, NAME).await.unwrap();

    assert_eq!((change, version.as_str()), (DocumentChange::Updated, "4"));
    let u = all(&updates);
    assert_eq!(u.len(), 1);
    assert_eq!(u[0].name(), Some(DOC_NAME));
    assert_eq!(u[0].content(), Some(CONTENT_B));
    assert_eq!(u[0].document_version(), Some("$LATEST"));
    assert_eq!(u[0].document_format(), Some(&DocumentFormat::Yaml));
    let d = all(&defaults);
    assert_eq!(d.len(), 1);
    assert_eq!((d[0].name(), d[0].document_version()), (Some(DOC_NAME), Some("4")), "the version UpdateDocument returned");
    assert_eq!(create.num_calls(), 0);
}

#[tokio::test]
async fn ensure_document_takes_the_same_document_handed_back_as_json_as_unchanged() {
    let get = get_document_with("{\"schemaVersion\": \"0.3\", \"description\": \"a\", \"mainSteps\": []}", "3");
    let update = mock!(aws_sdk_ssm::Client::update_document).then_output(|| UpdateDocumentOutput::builder().build());
    let clients = clients(&[], &[&get, &update]);

    let (change, version) = bake::ensure_document(&clients, DOC_NAME, CONTENT_A, NAME).await.unwrap();

    assert_eq!((change, version.as_str()), (DocumentChange::Unchanged, "3"));
    assert_eq!(update.num_calls(), 0);
}

/// SSM refuses an UpdateDocument whose content equals any existing version's
/// (DuplicateDocumentContent; moto models the same). That happens whenever the wanted content is
/// a version that is not the default: a config changed back (A, then B, then A again), or a bake
/// interrupted between UpdateDocument and UpdateDocumentDefaultVersion. ensure_document then
/// answers Unchanged with the current default version, whose content is the other one, so
/// bake_flow starts the stale default (StartAutomationExecution names no version) and tags the
/// image it makes with the new digest: a cached image that does not hold what its digest says.
/// ensure_document should make the version with this content the default (its contract: "the
/// version that is now the default").
#[tokio::test]
async fn ensure_document_returns_to_an_existing_version_with_the_same_content() {
    // Version 1 holds B, version 2 (the default) holds A; B is wanted again.
    let get = get_document_with(CONTENT_A, "2");
    let get_v1 = mock!(aws_sdk_ssm::Client::get_document)
        .match_requests(|r| r.name() == Some(DOC_NAME) && r.document_version() == Some("1"))
        .then_output(|| GetDocumentOutput::builder().name(DOC_NAME).document_version("1").document_format(DocumentFormat::Yaml).content(CONTENT_B).build());
    let get_v2 = mock!(aws_sdk_ssm::Client::get_document)
        .match_requests(|r| r.name() == Some(DOC_NAME) && r.document_version() == Some("2"))
        .then_output(|| GetDocumentOutput::builder().name(DOC_NAME).document_version("2").document_format(DocumentFormat::Yaml).content(CONTENT_A).build());
    let sha = |s: &str| {
        use sha2::Digest;
        sha2::Sha256::digest(s.as_bytes()).iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let (hash_a, hash_b) = (sha(CONTENT_A), sha(CONTENT_B));
    let describe = mock!(aws_sdk_ssm::Client::describe_document).match_requests(|r| r.name() == Some(DOC_NAME)).then_compute_output(move |r| {
        let (version, hash) = if r.document_version() == Some("1") { ("1", hash_b.clone()) } else { ("2", hash_a.clone()) };
        DescribeDocumentOutput::builder().document(DocumentDescription::builder().name(DOC_NAME).document_version(version).hash(hash).build()).build()
    });
    let list = mock!(aws_sdk_ssm::Client::list_document_versions).match_requests(|r| r.name() == Some(DOC_NAME)).then_output(|| {
        ListDocumentVersionsOutput::builder()
            .document_versions(DocumentVersionInfo::builder().name(DOC_NAME).document_version("2").is_default_version(true).build())
            .document_versions(DocumentVersionInfo::builder().name(DOC_NAME).document_version("1").is_default_version(false).build())
            .build()
    });
    let update = mock!(aws_sdk_ssm::Client::update_document).then_error(|| {
        let msg = "The content of the association document matches another document. Change the content of the document and try again.";
        UpdateDocumentError::DuplicateDocumentContent(DuplicateDocumentContent::builder().message(msg).meta(meta("DuplicateDocumentContent", msg)).build())
    });
    let defaults: Seen<UpdateDocumentDefaultVersionInput> = seen();
    let default =
        capturing!(mock!(aws_sdk_ssm::Client::update_document_default_version), defaults).then_output(|| UpdateDocumentDefaultVersionOutput::builder().build());
    let clients = clients(&[], &[&get, &get_v1, &get_v2, &describe, &list, &update, &default]);

    let result = bake::ensure_document(&clients, DOC_NAME, CONTENT_B, NAME).await;

    let (_, version) = result.unwrap_or_else(|e| panic!("ensure_document failed: {e}"));
    assert_eq!(version, "1", "the version that holds this content, not the stale default");
    let d = all(&defaults);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].document_version(), Some("1"));
}

/// Unpinned, Chroma is pulled by tag: the digest the registry served is read from the
/// readChromaDigest step's Output (aws:runCommand's `Output` output, "aws:runCommand - Run a
/// command on a managed instance") and recorded as the image's imgbuild:chroma-digest tag and in
/// the manifest.
#[tokio::test]
async fn bake_records_the_pulled_chroma_digest_on_the_image_and_in_the_manifest() {
    let b = Bake::new(None, successful_execution());
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir);
    assert_eq!(cfg.chroma.digest, None);

    let out = bake_flow(&b, &cfg, &args(false, 3600), std::future::pending()).await.unwrap();

    let tags = all(&b.chroma_tags);
    assert_eq!(tags.len(), 1, "one CreateTags of the digest");
    assert_eq!(tags[0].resources(), [AMI]);
    assert_eq!(tags[0].tags().iter().map(|t| (t.key().unwrap(), t.value().unwrap())).collect::<Vec<_>>(), [("imgbuild:chroma-digest", PULLED)]);
    assert_eq!(out["manifest"]["chroma_digest"], PULLED);
    assert_eq!(read_manifest(&cfg)["chroma_digest"], PULLED);
}

/// Pinned, the digest the instance reports must be the pinned one: an image holding another
/// Chroma is not handed over, and the cleanup removes it.
#[tokio::test]
async fn bake_fails_and_removes_the_image_when_the_pulled_digest_is_not_the_pinned_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir);

    cfg.chroma.digest = Some(PULLED.to_string());
    let b = Bake::new(None, successful_execution());
    let out = bake_flow(&b, &cfg, &args(false, 3600), std::future::pending()).await.unwrap();
    assert_eq!(out["manifest"]["chroma_digest"], PULLED, "the pinned digest, as the instance reported it");

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir);
    let pinned = format!("sha256:{}", "0f".repeat(32));
    cfg.chroma.digest = Some(pinned.clone());
    let b = Bake::new(None, successful_execution());
    let err = bake_flow(&b, &cfg, &args(false, 3600), std::future::pending()).await.unwrap_err();
    assert!(matches!(err, Error::BakeFailed { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(PULLED) && text.contains(&pinned), "{text}");
    assert_eq!(err.exit_code(), 1);
    assert_eq!(b.deregister.num_calls(), 1, "the image is removed");
    assert_eq!(all(&b.chroma_tags).len(), 0);
    assert_eq!(all(&b.puts).len(), 0, "nothing handed over");
    assert!(no_manifest(&cfg));
}

/// Whatever else the step printed is not a digest: an empty output, two lines, another
/// repository, a short hash or the placeholder sentence all fail with the step named.
#[test]
fn a_digest_output_that_is_not_exactly_the_repo_digest_fails() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir);
    let good = format!("ghcr.io/chroma-core/chroma@{PULLED}\n");
    assert_eq!(bake::check_pulled(&cfg, Some(&good), EXEC).unwrap(), PULLED);
    for bad in [
        String::new(),
        format!("{good}ghcr.io/chroma-core/chroma@{PULLED}\n"),
        format!("docker.io/chroma-core/chroma@{PULLED}\n"),
        "ghcr.io/chroma-core/chroma@sha256:5e5e\n".to_string(),
        bake::NO_OUTPUT_YET.to_string(),
    ] {
        let err = bake::check_pulled(&cfg, Some(&bad), EXEC).unwrap_err();
        assert!(err.to_string().contains(bake::DIGEST_STEP), "{bad:?}: {err}");
    }
    assert!(bake::check_pulled(&cfg, None, EXEC).is_err());
}

/// The launch step's FailureMessage when EC2 has no capacity for the type, in the form
/// failure_of("launchInstance") uses; InsufficientInstanceCapacity is one of EC2's server error
/// codes (EC2 API reference, "Error codes"; "Troubleshoot Amazon EC2 instance launch issues",
/// Insufficient instance capacity, for the wording). bake never reads it: the step name decides.
fn no_capacity(instance_type: &str) -> String {
    format!(
        "Step launchInstance failed maximum allowed times. We currently do not have sufficient {instance_type} capacity in the Availability Zone you requested (us-east-1a). Our system will be working on provisioning additional capacity. (Service: AmazonEC2; Status Code: 500; Error Code: InsufficientInstanceCapacity; Request ID: 6a002f94-ba37-43fd-99e6-39517715fce5)"
    )
}

/// A bake whose first execution fails at launchInstance, then `then`. The failed execution is
/// over, so stopping it is InvalidAutomationStatusUpdateException, and it launched nothing.
fn launch_fails_then(then: Vec<GetAutomationExecutionOutput>) -> Bake {
    let failed = execution("Failed", vec![step("launchInstance", "Failed", Some(&no_capacity("t3a.small")))], None);
    // Followed to its end, then read once more by the cleanup's settle.
    let mut answers = vec![failed.clone(), failed];
    answers.extend(then);
    let mut b = Bake::new(None, answers);
    b.stop = stop_already_over();
    b.describe_instances =
        capturing!(mock!(aws_sdk_ec2::Client::describe_instances), b.instance_lookups).then_output(|| DescribeInstancesOutput::builder().build());
    b
}

#[tokio::test]
async fn bake_tries_the_next_instance_type_when_the_launch_step_fails() {
    let b = launch_fails_then(successful_execution());
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir);
    cfg.bake.instance_types = vec!["t3a.small".into(), "t3.small".into()];

    let out = bake_flow(&b, &cfg, &args(false, 3600), std::future::pending()).await.unwrap();

    let starts = all(&b.starts);
    assert_eq!(starts.len(), 2, "one execution per type tried");
    assert_eq!([param(&starts[0], "InstanceType"), param(&starts[1], "InstanceType")], ["t3a.small", "t3.small"]);
    assert_ne!(param(&starts[0], "BakeToken"), param(&starts[1], "BakeToken"), "a new RunInstances client token for the new type");
    assert_ne!(starts[0].client_token(), starts[1].client_token(), "a new execution, not the failed one again");
    assert!(is_uuid(param(&starts[1], "BakeToken")));
    assert_eq!(out["ami"], AMI);
    assert_eq!(all(&b.puts)[0].value(), Some(AMI));
}

/// Only a failure of the launch step changes the type, and only while types are left: a later
/// failure, or the last type failing, fails the bake after one execution per type tried.
#[tokio::test]
async fn bake_tries_no_other_type_after_a_later_failure_or_the_last_type() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir);
    cfg.bake.instance_types = vec!["t3a.small".into(), "t3.small".into()];
    let mut later = done(&["launchInstance"]);
    later.push(step("waitForInstance", "Failed", Some(&failure_of("waitForInstance"))));
    let b = Bake::new(None, vec![execution("Failed", later, None)]);
    let err = bake_flow(&b, &cfg, &args(false, 3600), std::future::pending()).await.unwrap_err();
    assert!(matches!(err, Error::BakeFailed { .. }), "{err:?}");
    assert_eq!(all(&b.starts).len(), 1);

    cfg.bake.instance_types = vec!["t3a.small".into()];
    let b = launch_fails_then(Vec::new());
    let err = bake_flow(&b, &cfg, &args(false, 3600), std::future::pending()).await.unwrap_err();
    assert!(err.to_string().contains("launchInstance"), "{err}");
    assert_eq!(all(&b.starts).len(), 1);

    // The one-type case: bake.instance_type alone is what is launched.
    cfg.bake.instance_types = Vec::new();
    cfg.bake.instance_type = Some("t3.medium".into());
    let b = Bake::new(None, successful_execution());
    bake_flow(&b, &cfg, &args(false, 3600), std::future::pending()).await.unwrap();
    assert_eq!(param(&b.start_request(), "InstanceType"), "t3.medium");
}

/// A list and a single type together, a repeated type or a mixed architecture are refused,
/// naming the field, before anything is looked up or made.
#[tokio::test]
async fn bad_instance_type_lists_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir);
    cfg.bake.instance_type = Some("t3a.small".into());
    cfg.bake.instance_types = vec!["t3.small".into()];
    let found = cfg.check();
    assert!(found.iter().any(|(field, _)| field == "bake.instance_types"), "{found:?}");
    cfg.bake.instance_type = None;
    cfg.bake.instance_types = vec!["t3.small".into(), "t3.small".into()];
    assert!(cfg.check().iter().any(|(field, m)| field == "bake.instance_types[1]" && m.contains("already")), "{:?}", cfg.check());

    cfg.bake.instance_types = vec!["t3.small".into(), "t4g.small".into()];
    let b = Bake::new(None, successful_execution());
    let err = bake_flow(&b, &cfg, &args(false, 3600), std::future::pending()).await.unwrap_err();
    assert_eq!(err.exit_code(), 2, "{err}");
    assert!(err.to_string().contains("bake.instance_types") && err.to_string().contains("t4g.small"), "{err}");
    assert_eq!(b.get_parameter.num_calls() + b.find_cached.num_calls(), 0, "nothing looked up");
}

// ---------------------------------------------------------------------------------------------
// bake.kms_key_id (issue 14): the image is baked under the key, not copied under it afterwards.

const KEY: &str = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";

fn launch_ebs(document: &str) -> serde_yaml::Value {
    let doc: serde_yaml::Value = serde_yaml::from_str(document).unwrap();
    let launch = doc["mainSteps"].as_sequence().unwrap().iter().find(|s| s["name"].as_str() == Some("launchInstance")).unwrap().clone();
    launch["inputs"]["BlockDeviceMappings"][0]["Ebs"].clone()
}

/// With bake.kms_key_id the build instance's root volume is encrypted under the key (RunInstances
/// BlockDeviceMappings[].Ebs.KmsKeyId, "Identifier (key ID, key alias, key ARN, or alias ARN) of
/// the customer managed KMS key to use for EBS encryption", with Encrypted true: "If KmsKeyId is
/// specified, the encrypted state must be true", EC2 API Reference), so the image's snapshots
/// are; the key is part of the digest, so an image baked under another key (or none) is not
/// reused. Without the key, the document and the digest are what they were.
#[tokio::test]
async fn with_a_kms_key_the_build_volume_is_encrypted_under_it_and_the_key_is_in_the_digest() {
    let plain = Bake::new(None, successful_execution());
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir);
    bake_flow(&plain, &cfg, &args(false, 3600), std::future::pending()).await.unwrap();
    let plain_doc = all(&plain.created)[0].content().unwrap().to_string();
    assert!(launch_ebs(&plain_doc).get("KmsKeyId").is_none(), "no key configured: the account's default EBS key, as before");

    let keyed = Bake::new(None, successful_execution());
    let dir2 = tempfile::tempdir().unwrap();
    let mut cfg2 = config(&dir2);
    cfg2.bake.kms_key_id = Some(KEY.into());
    bake_flow(&keyed, &cfg2, &args(false, 3600), std::future::pending()).await.unwrap();
    let doc = all(&keyed.created)[0].content().unwrap().to_string();
    let ebs = launch_ebs(&doc);
    assert_eq!((ebs["KmsKeyId"].as_str(), ebs["Encrypted"].as_bool()), (Some(KEY), Some(true)), "{ebs:?}");
    assert!(imgbuild::check::automation::check(&doc).is_empty(), "the document with the key passes its checker");
    assert_ne!(looked_up_digest(&keyed.cache_lookups), looked_up_digest(&plain.cache_lookups), "the key is part of the digest");
    assert_eq!(param(&keyed.start_request(), "Digest"), looked_up_digest(&keyed.cache_lookups));
}

/// `bake --regions` copies the image under that region's key: KMS keys are regional, and a
/// multi-region key's replica has the same key id with its own region in the ARN (CopyImage
/// Encrypted and KmsKeyId: "If you specify a KMS key, you must also set the encrypted state to
/// true", EC2 API Reference; the answer's shape: aws-cli examples/ec2/copy-image.rst).
#[tokio::test]
async fn a_region_copy_is_encrypted_under_that_regions_replica_of_a_multi_region_key() {
    const COPY: &str = "ami-0c0c0c0c0c0c0c0c0";
    const MRK: &str = "arn:aws:kms:us-east-1:123456789012:key/mrk-1234abcd12ab34cd56ef1234567890ab";
    let mut b = Bake::new(Some(image(AMI, "sha256:whatever-the-filter-asked")), vec![execution("Pending", vec![], None)]);
    // Cached in us-east-1; nothing with the digest in eu-west-1 yet.
    b.find_cached = find_cached(&b.cache_lookups, vec![image(AMI, "sha256:cached")], vec![]);
    let copies: Seen<aws_sdk_ec2::operation::copy_image::CopyImageInput> = seen();
    b.extra_ec2 = vec![
        capturing!(mock!(aws_sdk_ec2::Client::copy_image), copies)
            .then_output(|| aws_sdk_ec2::operation::copy_image::CopyImageOutput::builder().image_id(COPY).build()),
        mock!(aws_sdk_ec2::Client::create_tags)
            .match_requests(|r| r.resources() == [COPY])
            .then_output(|| aws_sdk_ec2::operation::create_tags::CreateTagsOutput::builder().build()),
        mock!(aws_sdk_ec2::Client::describe_images).match_requests(|r| r.image_ids() == [COPY]).then_output(|| {
            DescribeImagesOutput::builder().images(Image::builder().image_id(COPY).state(aws_sdk_ec2::types::ImageState::Available).build()).build()
        }),
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir);
    cfg.bake.kms_key_id = Some(MRK.into());
    let a = BakeArgs { regions: vec!["eu-west-1".into()], ..args(false, 3600) };
    let out = bake_flow(&b, &cfg, &a, std::future::pending()).await.unwrap_or_else(|e| panic!("{e}"));
    let c = all(&copies);
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!((c[0].encrypted(), c[0].kms_key_id()), (Some(true), Some("arn:aws:kms:eu-west-1:123456789012:key/mrk-1234abcd12ab34cd56ef1234567890ab")));
    assert_eq!(out["manifest"]["copies"]["eu-west-1"], COPY);
}

/// A single-region key cannot encrypt a copy in another region: bake refuses before anything is
/// looked up, naming the field that gives that region its key.
#[tokio::test]
async fn a_single_region_key_and_another_region_without_its_key_is_refused_first() {
    let b = Bake::new(None, successful_execution());
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir);
    cfg.bake.kms_key_id = Some(KEY.into());
    let a = BakeArgs { regions: vec!["eu-west-1".into()], ..args(false, 3600) };
    let err = bake_flow(&b, &cfg, &a, std::future::pending()).await.unwrap_err();
    assert_eq!(err.exit_code(), 2, "{err}");
    assert!(err.to_string().contains("bake.kms_key_ids.eu-west-1"), "{err}");
    assert_eq!(b.get_parameter.num_calls() + b.find_cached.num_calls() + b.start.num_calls(), 0);
}
