//! The AWS-facing flows (deploy, status, destroy, smoke via test-invoke, AMI choice) against
//! in-process SDK mocks (aws-smithy-mocks): no network, every response scripted, every call
//! counted.
//!
//! `aws_smithy_mocks::mock_client!` needs the SDK crates' `test-util` feature (for
//! `with_test_defaults_v2`), which Cargo.toml does not enable, so `mocked!` below builds the same
//! client by hand: region, static credentials, the mock HTTP client and the rule interceptor.
//! Rules are matched with `RuleMode::MatchAny`; a call no rule matches panics inside the SDK, so a
//! client built with no rules fails the test the moment it is used.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use aws_smithy_mocks::{Rule, mock};
use aws_smithy_types::error::ErrorMetadata;
use aws_smithy_types::retry::RetryConfig;

use aws_sdk_cloudformation::operation::create_change_set::CreateChangeSetOutput;
use aws_sdk_cloudformation::operation::delete_change_set::DeleteChangeSetOutput;
use aws_sdk_cloudformation::operation::delete_stack::DeleteStackOutput;
use aws_sdk_cloudformation::operation::describe_change_set::DescribeChangeSetOutput;
use aws_sdk_cloudformation::operation::describe_stack_events::{DescribeStackEventsError, DescribeStackEventsOutput};
use aws_sdk_cloudformation::operation::describe_stacks::{DescribeStacksError, DescribeStacksOutput};
use aws_sdk_cloudformation::operation::execute_change_set::ExecuteChangeSetOutput;
use aws_sdk_cloudformation::operation::get_template::GetTemplateOutput;
use aws_sdk_cloudformation::types::{
    Capability, ChangeAction, ChangeSetStatus, ChangeSetType, ChangeType, Replacement, ResourceStatus, StackStatus, TemplateStage,
};

use imgbuild::Error;
use imgbuild::aws::Clients;
use imgbuild::config::Config;
use imgbuild::render::Mode;
use imgbuild::stack::changeset::{self as deploy, Cleanup, Confirm, Confirmer, Created, Plan};
use imgbuild::stack::{Change, Waits};
use imgbuild::ui::progress::Progress;

// ---------------------------------------------------------------------------------------------
// Clients

/// The rules each client answers from; a client with none panics when called.
#[derive(Default)]
struct Aws {
    cfn: Vec<Rule>,
    ec2: Vec<Rule>,
    efs: Vec<Rule>,
    ssm: Vec<Rule>,
    elb: Vec<Rule>,
    apigw: Vec<Rule>,
    retry: Option<RetryConfig>,
}

/// Rules share their call counters with their clones, so the test keeps its own handle.
fn owned(rules: &[&Rule]) -> Vec<Rule> {
    rules.iter().map(|r| (*r).clone()).collect()
}

impl Aws {
    fn cfn(mut self, rules: &[&Rule]) -> Self {
        self.cfn = owned(rules);
        self
    }
    fn ec2(mut self, rules: &[&Rule]) -> Self {
        self.ec2 = owned(rules);
        self
    }
    fn efs(mut self, rules: &[&Rule]) -> Self {
        self.efs = owned(rules);
        self
    }
    fn ssm(mut self, rules: &[&Rule]) -> Self {
        self.ssm = owned(rules);
        self
    }
    fn elb(mut self, rules: &[&Rule]) -> Self {
        self.elb = owned(rules);
        self
    }
    fn apigw(mut self, rules: &[&Rule]) -> Self {
        self.apigw = owned(rules);
        self
    }
    fn retry(mut self, retry: RetryConfig) -> Self {
        self.retry = Some(retry);
        self
    }
    fn clients(self) -> Clients {
        // Standard retries as in production, but with millisecond backoff.
        let retry = self.retry.unwrap_or_else(|| RetryConfig::standard().with_initial_backoff(Duration::from_millis(1)));
        Clients {
            cfn: mocked!(aws_sdk_cloudformation, self.cfn, retry.clone()),
            ec2: mocked!(aws_sdk_ec2, self.ec2, retry.clone()),
            efs: mocked!(aws_sdk_efs, self.efs, retry.clone()),
            ssm: mocked!(aws_sdk_ssm, self.ssm, retry.clone()),
            elb: mocked!(aws_sdk_elasticloadbalancingv2, self.elb, retry.clone()),
            apigw: mocked!(aws_sdk_apigateway, self.apigw, retry.clone()),
            backup: mocked!(aws_sdk_backup, Vec::<Rule>::new(), retry),
            ..crate::mock_client::unscripted()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CloudFormation fixtures

const STACK: &str = "vectordb";
const STACK_ID: &str = "arn:aws:cloudformation:us-east-1:123456789012:stack/vectordb/6c1e5a30-0000-11ef-0000-0a1b2c3d4e5f";
const TOKEN: &str = "tok123";
const CS_ID: &str = "arn:aws:cloudformation:us-east-1:123456789012:changeSet/imgbuild-tok123/9f8e7d6c-0000-11ef-0000-0a1b2c3d4e5f";
const TEMPLATE: &str = "AWSTemplateFormatVersion: '2010-09-09'\nResources: {}\n";
const STAGE_URL: &str = "https://abc123.execute-api.us-east-1.amazonaws.com/api";

fn quiet() -> Progress {
    Progress::new(imgbuild::ui::Ui::new(imgbuild::cli::OutputFormat::Text, 0, true), "mocks")
}

fn fast() -> Waits {
    Waits { timeout: Duration::from_secs(5), poll: Duration::from_millis(1) }
}

fn plan_params() -> BTreeMap<String, String> {
    BTreeMap::from([("ImageId".to_string(), "ami-0123456789abcdef0".to_string()), ("InstanceType".to_string(), "t3a.small".to_string())])
}

fn plan(confirm: Confirm) -> Plan {
    Plan {
        stack: STACK.into(),
        template_body: TEMPLATE.into(),
        parameters: plan_params(),
        tags: BTreeMap::from([("imgbuild:project".to_string(), "vectordb".to_string())]),
        confirm,
        wait_if_busy: false,
        waits: fast(),
        token: TOKEN.into(),
        annotate: None,
        rollback: Default::default(),
    }
}

fn outputs() -> Vec<(&'static str, &'static str)> {
    vec![("StageUrl", STAGE_URL), ("ApiId", "abc123"), ("FileSystemId", "fs-0123456789abcdef0")]
}

fn stack(status: &str, outputs: &[(&str, &str)]) -> aws_sdk_cloudformation::types::Stack {
    let mut b = aws_sdk_cloudformation::types::Stack::builder().stack_name(STACK).stack_id(STACK_ID).stack_status(StackStatus::from(status));
    for (k, v) in outputs {
        b = b.outputs(aws_sdk_cloudformation::types::Output::builder().output_key(*k).output_value(*v).build());
    }
    for (k, v) in plan_params() {
        b = b.parameters(aws_sdk_cloudformation::types::Parameter::builder().parameter_key(k).parameter_value(v).build());
    }
    b.build()
}

fn meta(code: &str, message: &str) -> ErrorMetadata {
    ErrorMetadata::builder().code(code).message(message).build()
}

/// What DescribeStacks answers for a stack that does not exist.
fn no_such_stack() -> DescribeStacksError {
    DescribeStacksError::generic(meta("ValidationError", &format!("Stack with id {STACK} does not exist")))
}

/// What CloudFormation (awsQuery) sends when it throttles, as raw HTTP so the SDK parses the
/// code and its retry classifier sees a throttling error.
fn throttling_body() -> String {
    "<ErrorResponse xmlns=\"http://cloudformation.amazonaws.com/doc/2010-05-15/\">\
     <Error><Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded</Message></Error>\
     <RequestId>7c3f1a2b-0000-4000-8000-000000000000</RequestId></ErrorResponse>"
        .to_string()
}

#[derive(Clone)]
enum Describe {
    Missing,
    Throttled,
    Is(&'static str, Vec<(&'static str, &'static str)>),
}
use Describe::{Is, Missing, Throttled};

/// DescribeStacks for STACK answering `steps` in order, the last one from then on.
fn describe_stacks(steps: &[Describe]) -> Rule {
    let mut seq = mock!(aws_sdk_cloudformation::Client::describe_stacks).match_requests(|r| r.stack_name() == Some(STACK)).sequence();
    for step in steps.iter().cloned() {
        seq = match step {
            Missing => seq.error(no_such_stack),
            Throttled => seq.http_status(400, Some(throttling_body())),
            Is(status, outs) => seq.output(move || DescribeStacksOutput::builder().stacks(stack(status, &outs)).build()),
        };
    }
    seq.repeatedly().build()
}

fn event(id: &str, logical: &str, kind: &str, status: &str, reason: Option<&str>) -> aws_sdk_cloudformation::types::StackEvent {
    aws_sdk_cloudformation::types::StackEvent::builder()
        .event_id(id)
        .stack_id(STACK_ID)
        .stack_name(STACK)
        .logical_resource_id(logical)
        .resource_type(kind)
        .resource_status(ResourceStatus::from(status))
        .set_resource_status_reason(reason.map(String::from))
        .timestamp(aws_smithy_types::DateTime::from_secs(1_700_000_000))
        .build()
}

/// DescribeStackEvents for STACK answering each page (newest event first) in turn, the last one
/// from then on.
fn stack_events(pages: Vec<Vec<aws_sdk_cloudformation::types::StackEvent>>) -> Rule {
    let mut seq = mock!(aws_sdk_cloudformation::Client::describe_stack_events).match_requests(|r| r.stack_name() == Some(STACK)).sequence();
    for page in pages {
        seq = seq.output(move || DescribeStackEventsOutput::builder().set_stack_events(Some(page.clone())).build());
    }
    seq.repeatedly().build()
}

/// DescribeStackEvents on a stack that is gone.
fn events_of_deleted_stack() -> Rule {
    mock!(aws_sdk_cloudformation::Client::describe_stack_events)
        .then_error(|| DescribeStackEventsError::generic(meta("ValidationError", &format!("Stack [{STACK}] does not exist"))))
}

fn no_events() -> Rule {
    stack_events(vec![vec![]])
}

/// CreateChangeSet for this plan's stack, of `kind`, with everything the plan says passed along.
fn create_change_set(kind: ChangeSetType) -> Rule {
    create_change_set_with(kind, plan_params(), None)
}

/// Like `create_change_set`, with `params`, and matching only once `after` has been called.
fn create_change_set_with(kind: ChangeSetType, params: BTreeMap<String, String>, after: Option<Rule>) -> Rule {
    mock!(aws_sdk_cloudformation::Client::create_change_set)
        .match_requests(move |r| {
            let sent: BTreeMap<String, String> = r
                .parameters()
                .iter()
                .map(|p| (p.parameter_key().unwrap_or_default().to_string(), p.parameter_value().unwrap_or_default().to_string()))
                .collect();
            after.as_ref().is_none_or(|a| a.num_calls() > 0)
                && r.stack_name() == Some(STACK)
                && r.change_set_type() == Some(&kind)
                && r.change_set_name() == Some("imgbuild-tok123")
                && r.client_token() == Some(TOKEN)
                && r.template_body() == Some(TEMPLATE)
                && r.capabilities().contains(&Capability::CapabilityIam)
                && r.tags().iter().any(|t| t.key() == Some("imgbuild:project") && t.value() == Some("vectordb"))
                && sent == params
        })
        .then_output(|| CreateChangeSetOutput::builder().id(CS_ID).stack_id(STACK_ID).build())
}

fn resource_change(action: ChangeAction, logical: &str, kind: &str, replacement: Option<Replacement>) -> aws_sdk_cloudformation::types::Change {
    aws_sdk_cloudformation::types::Change::builder()
        .r#type(ChangeType::Resource)
        .resource_change(
            aws_sdk_cloudformation::types::ResourceChange::builder()
                .action(action)
                .logical_resource_id(logical)
                .resource_type(kind)
                .set_replacement(replacement)
                .build(),
        )
        .build()
}

fn change_set(status: ChangeSetStatus, changes: Vec<aws_sdk_cloudformation::types::Change>) -> DescribeChangeSetOutput {
    DescribeChangeSetOutput::builder().change_set_id(CS_ID).stack_id(STACK_ID).status(status).set_changes(Some(changes)).build()
}

/// DescribeChangeSet for CS_ID: in progress once, then CREATE_COMPLETE with `changes`.
fn change_set_ready(changes: Vec<aws_sdk_cloudformation::types::Change>) -> Rule {
    mock!(aws_sdk_cloudformation::Client::describe_change_set)
        .match_requests(|r| r.change_set_name() == Some(CS_ID) && r.next_token().is_none())
        .sequence()
        .output(|| change_set(ChangeSetStatus::CreateInProgress, vec![]))
        .output(move || change_set(ChangeSetStatus::CreateComplete, changes.clone()))
        .repeatedly()
        .build()
}

/// DescribeChangeSet for CS_ID ending FAILED with `reason` and no changes.
fn change_set_failed(reason: &'static str) -> Rule {
    mock!(aws_sdk_cloudformation::Client::describe_change_set)
        .match_requests(|r| r.change_set_name() == Some(CS_ID))
        .sequence()
        .output(|| change_set(ChangeSetStatus::CreatePending, vec![]))
        .output(move || DescribeChangeSetOutput::builder().change_set_id(CS_ID).status(ChangeSetStatus::Failed).status_reason(reason).build())
        .repeatedly()
        .build()
}

fn execute_change_set() -> Rule {
    mock!(aws_sdk_cloudformation::Client::execute_change_set)
        .match_requests(|r| r.change_set_name() == Some(CS_ID))
        .then_output(|| ExecuteChangeSetOutput::builder().build())
}

fn delete_change_set() -> Rule {
    mock!(aws_sdk_cloudformation::Client::delete_change_set)
        .match_requests(|r| r.change_set_name() == Some(CS_ID))
        .then_output(|| DeleteChangeSetOutput::builder().build())
}

fn delete_stack() -> Rule {
    mock!(aws_sdk_cloudformation::Client::delete_stack).match_requests(|r| r.stack_name() == Some(STACK)).then_output(|| DeleteStackOutput::builder().build())
}

fn get_template(body: &'static str) -> Rule {
    mock!(aws_sdk_cloudformation::Client::get_template)
        .match_requests(|r| r.stack_name() == Some(STACK) && r.template_stage() == Some(&TemplateStage::Original))
        .then_output(move || GetTemplateOutput::builder().template_body(body).build())
}

/// Answers the prompt with `yes` and remembers the questions.
struct Answer {
    yes: bool,
    asked: Mutex<Vec<String>>,
}

impl Answer {
    fn new(yes: bool) -> Self {
        Self { yes, asked: Mutex::new(Vec::new()) }
    }
    fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }
}

impl Confirmer for Answer {
    fn confirm<'a>(&'a self, question: &'a str) -> Pin<Box<dyn Future<Output = imgbuild::Result<bool>> + Send + 'a>> {
        self.asked.lock().unwrap().push(question.to_string());
        let yes = self.yes;
        Box::pin(async move { Ok(yes) })
    }
}

fn cleanup() -> Cleanup {
    Cleanup::default()
}

fn recorded(c: &Cleanup) -> Created {
    c.lock().unwrap().clone()
}

// ---------------------------------------------------------------------------------------------
// The safety net itself

#[tokio::test]
#[should_panic(expected = "no rules matched")]
async fn a_client_without_rules_fails_the_test_when_called() {
    let clients = Aws::default().clients();
    let _ = clients.efs.describe_file_systems().send().await;
}

// ---------------------------------------------------------------------------------------------
// deploy::run

#[tokio::test]
async fn deploy_new_stack_that_rolls_back_fails_with_the_resource_and_its_reason() {
    const REASON: &str = "Resource handler returned message: \"The image id '[ami-0123456789abcdef0]' does not exist\" (Service: Ec2, Status Code: 400)";
    // Right after ExecuteChangeSet a new stack may still read REVIEW_IN_PROGRESS: not an end state.
    let ds = describe_stacks(&[
        Missing,
        Is("REVIEW_IN_PROGRESS", vec![]),
        Is("CREATE_IN_PROGRESS", vec![]),
        Is("ROLLBACK_IN_PROGRESS", vec![]),
        Is("ROLLBACK_COMPLETE", vec![]),
    ]);
    let create = create_change_set(ChangeSetType::Create);
    let dcs = change_set_ready(vec![
        resource_change(ChangeAction::Add, "Vpc", "AWS::EC2::VPC", None),
        resource_change(ChangeAction::Add, "LaunchTemplate", "AWS::EC2::LaunchTemplate", None),
    ]);
    let stack_kind = "AWS::CloudFormation::Stack";
    let before = vec![event("e0", STACK, stack_kind, "REVIEW_IN_PROGRESS", Some("User Initiated"))];
    let after = vec![
        event("e7", STACK, stack_kind, "ROLLBACK_COMPLETE", None),
        event("e6", "LaunchTemplate", "AWS::EC2::LaunchTemplate", "DELETE_COMPLETE", None),
        event("e5", "Vpc", "AWS::EC2::VPC", "DELETE_COMPLETE", None),
        event(
            "e4",
            STACK,
            stack_kind,
            "ROLLBACK_IN_PROGRESS",
            Some("The following resource(s) failed to create: [LaunchTemplate]. Rollback requested by user."),
        ),
        event("e3", "LaunchTemplate", "AWS::EC2::LaunchTemplate", "CREATE_FAILED", Some(REASON)),
        event("e2", "LaunchTemplate", "AWS::EC2::LaunchTemplate", "CREATE_IN_PROGRESS", None),
        event("e1", STACK, stack_kind, "CREATE_IN_PROGRESS", Some("User Initiated")),
        event("e0", STACK, stack_kind, "REVIEW_IN_PROGRESS", Some("User Initiated")),
    ];
    let events = stack_events(vec![before, after]);
    let exec = execute_change_set();
    let del_cs = delete_change_set();
    let del = delete_stack();
    let clients = Aws::default().cfn(&[&ds, &create, &dcs, &events, &exec, &del_cs, &del]).clients();
    let cleanup = cleanup();

    let err = deploy::run(&clients, &plan(Confirm::Yes), &quiet(), &cleanup, &Answer::new(false)).await.unwrap_err();

    match &err {
        Error::StackFailed { stack, status, failures } => {
            assert_eq!(stack, STACK);
            assert_eq!(status, "ROLLBACK_COMPLETE");
            // Events are returned on every poll; the failure is reported once.
            assert_eq!(failures, &vec![format!("LaunchTemplate (AWS::EC2::LaunchTemplate): {REASON}")]);
        }
        other => panic!("expected StackFailed, got {other:?}"),
    }
    assert_eq!(err.exit_code(), 3);
    assert!(err.to_string().contains("LaunchTemplate") && err.to_string().contains("does not exist"), "{err}");
    assert_eq!(create.num_calls(), 1);
    assert_eq!(exec.num_calls(), 1);
    assert_eq!(ds.num_calls(), 5, "one look before, four polls until ROLLBACK_COMPLETE");
    assert_eq!(del_cs.num_calls(), 0);
    assert_eq!(del.num_calls(), 0);
    // Executed: nothing is left for the cleanup on the way out to remove.
    assert!(recorded(&cleanup).executed);
    assert_eq!(deploy::remove_created(&clients, &cleanup).await.unwrap(), Vec::<String>::new());
}

#[tokio::test]
async fn deploy_replaces_a_rollback_complete_stack_with_a_create_change_set() {
    let ds = describe_stacks(&[Is("ROLLBACK_COMPLETE", vec![]), Missing, Is("CREATE_IN_PROGRESS", vec![]), Is("CREATE_COMPLETE", outputs())]);
    let del = delete_stack();
    // A CREATE change set, asked for only once the failed stack is gone.
    let create = create_change_set_with(ChangeSetType::Create, plan_params(), Some(del.clone()));
    let dcs = change_set_ready(vec![resource_change(ChangeAction::Add, "Vpc", "AWS::EC2::VPC", None)]);
    let events = no_events();
    let exec = execute_change_set();
    let clients = Aws::default().cfn(&[&ds, &del, &create, &dcs, &events, &exec]).clients();
    let cleanup = cleanup();

    let out = deploy::run(&clients, &plan(Confirm::Yes), &quiet(), &cleanup, &Answer::new(false)).await.unwrap();

    assert_eq!(del.num_calls(), 1);
    assert_eq!(create.num_calls(), 1, "a CREATE change set");
    assert_eq!(exec.num_calls(), 1);
    assert_eq!(out.status, "CREATE_COMPLETE");
    assert!(out.executed && !out.no_changes);
    assert_eq!(out.notices.len(), 1, "{:?}", out.notices);
    assert!(out.notices[0].contains("ROLLBACK_COMPLETE") && out.notices[0].contains("deleting it and creating it again"), "{:?}", out.notices);
    assert_eq!(out.outputs.get("StageUrl").map(String::as_str), Some(STAGE_URL));
}

#[tokio::test]
async fn deploy_refuses_a_busy_stack_without_wait_and_creates_no_change_set() {
    let ds = describe_stacks(&[Is("UPDATE_IN_PROGRESS", vec![])]);
    let create = create_change_set(ChangeSetType::Update);
    let clients = Aws::default().cfn(&[&ds, &create]).clients();

    let err = deploy::run(&clients, &plan(Confirm::Yes), &quiet(), &cleanup(), &Answer::new(true)).await.unwrap_err();

    match &err {
        Error::Invalid(m) => assert!(m.contains("--wait") && m.contains("UPDATE_IN_PROGRESS"), "{m}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert_eq!(err.exit_code(), 2);
    assert_eq!(ds.num_calls(), 1);
    assert_eq!(create.num_calls(), 0);
}

#[tokio::test]
async fn deploy_with_wait_times_out_on_a_stack_that_stays_busy() {
    let ds = describe_stacks(&[Is("UPDATE_IN_PROGRESS", vec![])]);
    let events = no_events();
    let create = create_change_set(ChangeSetType::Update);
    let clients = Aws::default().cfn(&[&ds, &events, &create]).clients();
    let mut p = plan(Confirm::Yes);
    p.wait_if_busy = true;
    p.waits = Waits { timeout: Duration::from_millis(30), poll: Duration::from_millis(1) };

    let err = deploy::run(&clients, &p, &quiet(), &cleanup(), &Answer::new(true)).await.unwrap_err();

    match &err {
        Error::Timeout { what, .. } => assert!(what.contains(STACK) && what.contains("still UPDATE_IN_PROGRESS"), "{what}"),
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert_eq!(err.exit_code(), 1);
    assert!(ds.num_calls() >= 3, "polled: {}", ds.num_calls());
    assert_eq!(create.num_calls(), 0);
}

#[tokio::test]
async fn deploy_with_wait_goes_on_with_an_update_once_the_stack_settles() {
    let ds = describe_stacks(&[Is("UPDATE_IN_PROGRESS", vec![]), Is("UPDATE_IN_PROGRESS", vec![]), Is("UPDATE_COMPLETE", outputs())]);
    let events = no_events();
    let create = create_change_set(ChangeSetType::Update);
    let dcs = change_set_ready(vec![resource_change(ChangeAction::Modify, "Asg", "AWS::AutoScaling::AutoScalingGroup", Some(Replacement::False))]);
    let clients = Aws::default().cfn(&[&ds, &events, &create, &dcs]).clients();
    let mut p = plan(Confirm::NoExecute);
    p.wait_if_busy = true;

    let out = deploy::run(&clients, &p, &quiet(), &cleanup(), &Answer::new(false)).await.unwrap();

    assert_eq!(create.num_calls(), 1, "an UPDATE change set once the stack is stable");
    assert_eq!(out.status, "UPDATE_COMPLETE");
    assert_eq!(out.change_set.as_deref(), Some(CS_ID));
    assert!(!out.executed);
}

#[tokio::test]
async fn deploy_with_wait_refuses_a_stack_that_settles_in_a_failed_state() {
    let ds = describe_stacks(&[Is("UPDATE_ROLLBACK_IN_PROGRESS", vec![]), Is("UPDATE_ROLLBACK_FAILED", vec![])]);
    let events = no_events();
    // What CloudFormation answers when asked for a change set on such a stack.
    let create = mock!(aws_sdk_cloudformation::Client::create_change_set).then_error(|| {
        aws_sdk_cloudformation::operation::create_change_set::CreateChangeSetError::generic(meta(
            "ValidationError",
            "Stack:arn:aws:cloudformation:us-east-1:123456789012:stack/vectordb/x is in UPDATE_ROLLBACK_FAILED state and can not be updated.",
        ))
    });
    let clients = Aws::default().cfn(&[&ds, &events, &create]).clients();
    let mut p = plan(Confirm::Yes);
    p.wait_if_busy = true;

    let err = deploy::run(&clients, &p, &quiet(), &cleanup(), &Answer::new(true)).await.unwrap_err();

    assert!(matches!(&err, Error::Invalid(m) if m.contains("needs a person")), "got {err:?}");
    assert_eq!(create.num_calls(), 0);
}

#[tokio::test]
async fn deploy_survives_throttled_describe_stacks_through_sdk_retries() {
    let ds = describe_stacks(&[Throttled, Throttled, Is("CREATE_COMPLETE", vec![]), Is("UPDATE_COMPLETE", outputs())]);
    let create = create_change_set(ChangeSetType::Update);
    let dcs = change_set_ready(vec![resource_change(ChangeAction::Modify, "Asg", "AWS::AutoScaling::AutoScalingGroup", Some(Replacement::False))]);
    let events = no_events();
    let exec = execute_change_set();
    let clients = Aws::default().cfn(&[&ds, &create, &dcs, &events, &exec]).clients();

    let out = deploy::run(&clients, &plan(Confirm::Yes), &quiet(), &cleanup(), &Answer::new(false)).await.unwrap();

    assert_eq!(out.status, "UPDATE_COMPLETE");
    assert!(out.executed);
    assert_eq!(ds.num_calls(), 5, "3 attempts for the first look, one poll, one final read");
    assert_eq!(create.num_calls(), 1);
}

#[tokio::test]
async fn deploy_with_one_attempt_reports_throttling_as_an_aws_error() {
    let ds = describe_stacks(&[Throttled, Is("CREATE_COMPLETE", vec![])]);
    let create = create_change_set(ChangeSetType::Update);
    let aws = imgbuild::aws::Settings { max_attempts: 1, ..Default::default() };
    let clients = Aws::default().cfn(&[&ds, &create]).retry(imgbuild::aws::retry_config(&aws)).clients();

    let err = deploy::run(&clients, &plan(Confirm::Yes), &quiet(), &cleanup(), &Answer::new(false)).await.unwrap_err();

    match &err {
        Error::Aws { operation, resource, code, message } => {
            assert_eq!(*operation, "DescribeStacks");
            assert_eq!(resource, "stack vectordb");
            assert_eq!(code, "Throttling");
            assert_eq!(message, "Rate exceeded");
        }
        other => panic!("expected Aws, got {other:?}"),
    }
    assert_eq!(err.exit_code(), 1);
    assert_eq!(ds.num_calls(), 1, "no retry with max_attempts 1");
    assert_eq!(create.num_calls(), 0);
}

#[tokio::test]
async fn deploy_update_reports_the_paged_diff_and_the_new_outputs() {
    let ds = describe_stacks(&[Is("CREATE_COMPLETE", vec![("StageUrl", "old")]), Is("UPDATE_IN_PROGRESS", vec![]), Is("UPDATE_COMPLETE", outputs())]);
    let create = create_change_set(ChangeSetType::Update);
    let first_page = mock!(aws_sdk_cloudformation::Client::describe_change_set)
        .match_requests(|r| r.change_set_name() == Some(CS_ID) && r.next_token().is_none())
        .sequence()
        .output(|| change_set(ChangeSetStatus::CreatePending, vec![]))
        .output(|| {
            DescribeChangeSetOutput::builder()
                .status(ChangeSetStatus::CreateComplete)
                .changes(resource_change(ChangeAction::Modify, "LaunchTemplate", "AWS::EC2::LaunchTemplate", Some(Replacement::True)))
                .changes(resource_change(ChangeAction::Modify, "Asg", "AWS::AutoScaling::AutoScalingGroup", Some(Replacement::Conditional)))
                .changes(resource_change(ChangeAction::Add, "ApiAlarm", "AWS::CloudWatch::Alarm", None))
                .next_token("page-2")
                .build()
        })
        .repeatedly()
        .build();
    let second_page = mock!(aws_sdk_cloudformation::Client::describe_change_set)
        .match_requests(|r| r.change_set_name() == Some(CS_ID) && r.next_token() == Some("page-2"))
        .then_output(|| {
            DescribeChangeSetOutput::builder()
                .status(ChangeSetStatus::CreateComplete)
                .changes(resource_change(ChangeAction::Remove, "OldLogGroup", "AWS::Logs::LogGroup", None))
                .build()
        });
    let old = event("u0", STACK, "AWS::CloudFormation::Stack", "CREATE_COMPLETE", None);
    let events = stack_events(vec![
        vec![old.clone()],
        vec![
            event("u2", "LaunchTemplate", "AWS::EC2::LaunchTemplate", "UPDATE_COMPLETE", None),
            event("u1", STACK, "AWS::CloudFormation::Stack", "UPDATE_IN_PROGRESS", Some("User Initiated")),
            old,
        ],
    ]);
    let exec = execute_change_set();
    let del_cs = delete_change_set();
    let clients = Aws::default().cfn(&[&ds, &create, &first_page, &second_page, &events, &exec, &del_cs]).clients();
    let cleanup = cleanup();
    let asked = Answer::new(true);
    let p = plan(Confirm::Prompt);

    let out = deploy::run(&clients, &p, &quiet(), &cleanup, &asked).await.unwrap();

    let want = |action, logical: &str, kind: &str, replacement: Option<&str>| Change {
        action,
        logical_id: logical.into(),
        resource_type: kind.into(),
        replacement: replacement.map(String::from),
    };
    assert_eq!(
        out.changes,
        vec![
            want('~', "LaunchTemplate", "AWS::EC2::LaunchTemplate", Some("True")),
            want('~', "Asg", "AWS::AutoScaling::AutoScalingGroup", Some("Conditional")),
            want('+', "ApiAlarm", "AWS::CloudWatch::Alarm", None),
            want('-', "OldLogGroup", "AWS::Logs::LogGroup", None),
        ]
    );
    assert_eq!(out.changes[0].line(), "  ~ LaunchTemplate (AWS::EC2::LaunchTemplate)  (REPLACEMENT)");
    assert_eq!(asked.asked(), vec!["Execute these 4 changes on stack vectordb?".to_string()]);
    assert_eq!(second_page.num_calls(), 1);
    assert_eq!(out.status, "UPDATE_COMPLETE");
    assert!(out.executed && !out.no_changes);
    assert_eq!(out.change_set.as_deref(), Some(CS_ID));
    assert!(out.notices.is_empty());
    let want_outputs: BTreeMap<String, String> = outputs().into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    assert_eq!(out.outputs, want_outputs);
    assert_eq!(exec.num_calls(), 1);
    assert_eq!(del_cs.num_calls(), 0);
    assert!(recorded(&cleanup).executed);
}

#[tokio::test]
async fn deploy_of_an_unchanged_stack_is_no_changes_and_deletes_the_change_set() {
    let ds = describe_stacks(&[Is("UPDATE_COMPLETE", outputs())]);
    let create = create_change_set(ChangeSetType::Update);
    let dcs = change_set_failed("The submitted information didn't contain changes. Submit different information to create a change set.");
    let gt = get_template(TEMPLATE);
    let exec = execute_change_set();
    let del_cs = delete_change_set();
    let clients = Aws::default().cfn(&[&ds, &create, &dcs, &gt, &exec, &del_cs]).clients();
    let cleanup = cleanup();

    let out = deploy::run(&clients, &plan(Confirm::Yes), &quiet(), &cleanup, &Answer::new(false)).await.unwrap();

    assert!(out.no_changes);
    assert!(!out.executed);
    assert!(out.changes.is_empty());
    assert_eq!(out.change_set, None);
    assert_eq!(out.status, "UPDATE_COMPLETE");
    assert_eq!(out.outputs.get("FileSystemId").map(String::as_str), Some("fs-0123456789abcdef0"));
    assert_eq!(gt.num_calls(), 1);
    assert_eq!(del_cs.num_calls(), 1);
    assert_eq!(exec.num_calls(), 0);
    assert_eq!(recorded(&cleanup).change_set, None);
}

#[tokio::test]
async fn deploy_with_an_empty_change_set_and_the_same_inputs_is_no_changes() {
    let ds = describe_stacks(&[Is("UPDATE_COMPLETE", outputs())]);
    let create = create_change_set(ChangeSetType::Update);
    let dcs = change_set_ready(vec![]);
    let gt = get_template(TEMPLATE);
    let exec = execute_change_set();
    let del_cs = delete_change_set();
    let clients = Aws::default().cfn(&[&ds, &create, &dcs, &gt, &exec, &del_cs]).clients();
    let asked = Answer::new(true);

    let out = deploy::run(&clients, &plan(Confirm::Prompt), &quiet(), &cleanup(), &asked).await.unwrap();

    assert!(out.no_changes && !out.executed);
    assert_eq!(out.change_set, None);
    assert!(asked.asked().is_empty(), "nothing to confirm");
    assert_eq!(gt.num_calls(), 1);
    assert_eq!(del_cs.num_calls(), 1);
    assert_eq!(exec.num_calls(), 0);
}

#[tokio::test]
async fn deploy_with_an_empty_change_set_but_another_template_still_executes() {
    let ds = describe_stacks(&[Is("UPDATE_COMPLETE", vec![]), Is("UPDATE_IN_PROGRESS", vec![]), Is("UPDATE_COMPLETE", outputs())]);
    let create = create_change_set(ChangeSetType::Update);
    let dcs = change_set_ready(vec![]);
    let gt = get_template("AWSTemplateFormatVersion: '2010-09-09'\nResources: {}\nOutputs: {}\n");
    let events = no_events();
    let exec = execute_change_set();
    let del_cs = delete_change_set();
    let clients = Aws::default().cfn(&[&ds, &create, &dcs, &gt, &events, &exec, &del_cs]).clients();

    let out = deploy::run(&clients, &plan(Confirm::Yes), &quiet(), &cleanup(), &Answer::new(false)).await.unwrap();

    assert!(!out.no_changes && out.executed);
    assert!(out.changes.is_empty());
    assert_eq!(out.status, "UPDATE_COMPLETE");
    assert_eq!(exec.num_calls(), 1);
    assert_eq!(del_cs.num_calls(), 0);
}

#[tokio::test]
async fn deploy_change_set_failure_with_a_different_deployed_template_is_invalid_with_the_reason() {
    const REASON: &str = "The submitted information didn't contain changes. Submit different information to create a change set.";
    let ds = describe_stacks(&[Is("UPDATE_COMPLETE", outputs())]);
    let create = create_change_set(ChangeSetType::Update);
    let dcs = change_set_failed(REASON);
    let gt = get_template("AWSTemplateFormatVersion: '2010-09-09'\nResources:\n  Other: {Type: AWS::SNS::Topic}\n");
    let exec = execute_change_set();
    let del_cs = delete_change_set();
    let clients = Aws::default().cfn(&[&ds, &create, &dcs, &gt, &exec, &del_cs]).clients();

    let err = deploy::run(&clients, &plan(Confirm::Yes), &quiet(), &cleanup(), &Answer::new(false)).await.unwrap_err();

    match &err {
        Error::Invalid(m) => assert!(m.contains("could not make a change set for vectordb") && m.contains(REASON), "{m}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert_eq!(gt.num_calls(), 1);
    assert_eq!(del_cs.num_calls(), 1);
    assert_eq!(exec.num_calls(), 0);
}

#[tokio::test]
async fn deploy_change_set_failure_with_other_parameters_skips_get_template() {
    let ds = describe_stacks(&[Is("UPDATE_COMPLETE", vec![])]);
    let dcs = change_set_failed("Parameter 'ImageId' must be one of AllowedValues");
    let gt = get_template(TEMPLATE);
    let del_cs = delete_change_set();
    let mut p = plan(Confirm::Yes);
    p.parameters.insert("ImageId".into(), "ami-0fedcba9876543210".into());
    let create = create_change_set_with(ChangeSetType::Update, p.parameters.clone(), None);
    let clients = Aws::default().cfn(&[&ds, &create, &dcs, &gt, &del_cs]).clients();

    let err = deploy::run(&clients, &p, &quiet(), &cleanup(), &Answer::new(false)).await.unwrap_err();

    assert!(matches!(&err, Error::Invalid(m) if m.contains("must be one of AllowedValues")), "{err:?}");
    assert_eq!(gt.num_calls(), 0, "other parameters: not the same as deployed, whatever the template");
    assert_eq!(del_cs.num_calls(), 1);
}

#[tokio::test]
async fn deploy_declined_at_the_prompt_removes_the_change_set_and_the_review_stack() {
    let ds = describe_stacks(&[Missing, Is("REVIEW_IN_PROGRESS", vec![])]);
    let create = create_change_set(ChangeSetType::Create);
    let dcs = change_set_ready(vec![resource_change(ChangeAction::Add, "Vpc", "AWS::EC2::VPC", None)]);
    let exec = execute_change_set();
    let del_cs = delete_change_set();
    let del = delete_stack();
    let events = no_events();
    let clients = Aws::default().cfn(&[&ds, &create, &dcs, &exec, &del_cs, &del, &events]).clients();
    let cleanup = cleanup();
    let no = Answer::new(false);

    let err = deploy::run(&clients, &plan(Confirm::Prompt), &quiet(), &cleanup, &no).await.unwrap_err();

    match &err {
        Error::Declined(m) => assert!(m.contains("declined"), "{m}"),
        other => panic!("expected Declined, got {other:?}"),
    }
    assert_eq!(no.asked(), vec!["Execute these 1 changes on stack vectordb?".to_string()]);
    assert_eq!(del_cs.num_calls(), 1);
    assert_eq!(del.num_calls(), 1, "the empty REVIEW_IN_PROGRESS stack of a first deploy");
    assert_eq!(exec.num_calls(), 0);
    let left = recorded(&cleanup);
    assert!(left.change_set.is_none() && left.review_stack.is_none() && !left.executed);
}

#[tokio::test]
async fn deploy_no_execute_keeps_the_change_set_for_review() {
    let ds = describe_stacks(&[Missing]);
    let create = create_change_set(ChangeSetType::Create);
    let dcs = change_set_ready(vec![resource_change(ChangeAction::Add, "Vpc", "AWS::EC2::VPC", None)]);
    let exec = execute_change_set();
    let del_cs = delete_change_set();
    let del = delete_stack();
    let clients = Aws::default().cfn(&[&ds, &create, &dcs, &exec, &del_cs, &del]).clients();
    let cleanup = cleanup();
    let never = Answer::new(true);

    let out = deploy::run(&clients, &plan(Confirm::NoExecute), &quiet(), &cleanup, &never).await.unwrap();

    assert_eq!(out.change_set.as_deref(), Some(CS_ID));
    assert_eq!(out.status, "REVIEW_IN_PROGRESS");
    assert!(!out.executed && !out.no_changes);
    assert_eq!(out.changes.len(), 1);
    assert!(never.asked().is_empty());
    // Handed over to the user: the cleanup on the way out has nothing to remove.
    let left = recorded(&cleanup);
    assert!(left.change_set.is_none() && left.review_stack.is_none());
    assert!(deploy::remove_created(&clients, &cleanup).await.unwrap().is_empty());
    assert_eq!(del_cs.num_calls(), 0);
    assert_eq!(del.num_calls(), 0);
    assert_eq!(exec.num_calls(), 0);
}

// ---------------------------------------------------------------------------------------------
// deploy::remove_created

#[tokio::test]
async fn remove_created_deletes_the_recorded_change_set_and_review_stack() {
    let ds = describe_stacks(&[Is("REVIEW_IN_PROGRESS", vec![])]);
    let del_cs = delete_change_set();
    let del = delete_stack();
    let clients = Aws::default().cfn(&[&ds, &del_cs, &del]).clients();
    let cleanup: Cleanup = std::sync::Arc::new(Mutex::new(Created { change_set: Some(CS_ID.into()), review_stack: Some(STACK.into()), ..Created::default() }));

    let cleaned = deploy::remove_created(&clients, &cleanup).await.unwrap();

    assert_eq!(cleaned, vec![format!("deleted change set {CS_ID}"), "deleted the empty stack vectordb (REVIEW_IN_PROGRESS)".to_string()]);
    assert_eq!(del_cs.num_calls(), 1);
    assert_eq!(del.num_calls(), 1);
    assert!(recorded(&cleanup).change_set.is_none());
}

#[tokio::test]
async fn remove_created_keeps_a_review_stack_that_has_moved_on() {
    let ds = describe_stacks(&[Is("CREATE_IN_PROGRESS", vec![])]);
    let del_cs = delete_change_set();
    let del = delete_stack();
    let clients = Aws::default().cfn(&[&ds, &del_cs, &del]).clients();
    let cleanup: Cleanup = std::sync::Arc::new(Mutex::new(Created { change_set: Some(CS_ID.into()), review_stack: Some(STACK.into()), ..Created::default() }));

    let cleaned = deploy::remove_created(&clients, &cleanup).await.unwrap();

    assert_eq!(cleaned, vec![format!("deleted change set {CS_ID}")]);
    assert_eq!(del.num_calls(), 0);
}

#[tokio::test]
async fn remove_created_after_execution_touches_nothing() {
    let clients = Aws::default().clients();
    let cleanup: Cleanup =
        std::sync::Arc::new(Mutex::new(Created { change_set: Some(CS_ID.into()), review_stack: Some(STACK.into()), executed: true, ..Created::default() }));

    let cleaned = deploy::remove_created(&clients, &cleanup).await.unwrap();

    assert!(cleaned.is_empty());
}

// ---------------------------------------------------------------------------------------------
// ops::destroy and ops::status

/// DescribeFileSystems finding no file system tagged as the stack's (destroy looks for retained
/// ones by tag; tests/it/contracts.rs has the ones it finds).
fn no_file_systems() -> Rule {
    mock!(aws_sdk_efs::Client::describe_file_systems)
        .then_output(|| aws_sdk_efs::operation::describe_file_systems::DescribeFileSystemsOutput::builder().build())
}

#[tokio::test]
async fn destroy_keeps_the_file_system_without_delete_data() {
    let ds = describe_stacks(&[Is("UPDATE_COMPLETE", outputs()), Is("DELETE_IN_PROGRESS", vec![]), Missing]);
    let events = events_of_deleted_stack();
    let del = delete_stack();
    let listed = no_file_systems();
    // No other EFS rules: deleting a file system fails the test.
    let clients = Aws::default().cfn(&[&ds, &events, &del]).efs(&[&listed]).clients();

    let d = imgbuild::stack::ops::destroy(&clients, STACK, false, false, fast(), &quiet()).await.unwrap();

    assert!(d.existed);
    assert_eq!(d.file_system.as_deref(), Some("fs-0123456789abcdef0"));
    assert!(!d.data_deleted);
    assert_eq!(del.num_calls(), 1);
    assert_eq!(ds.num_calls(), 3);
}

#[tokio::test]
async fn destroy_with_delete_data_waits_out_file_system_in_use() {
    use aws_sdk_efs::operation::delete_file_system::{DeleteFileSystemError, DeleteFileSystemOutput};
    let ds = describe_stacks(&[Is("UPDATE_COMPLETE", outputs()), Missing]);
    let events = events_of_deleted_stack();
    let del = delete_stack();
    let del_fs = mock!(aws_sdk_efs::Client::delete_file_system)
        .match_requests(|r| r.file_system_id() == Some("fs-0123456789abcdef0"))
        .sequence()
        .error(|| {
            DeleteFileSystemError::FileSystemInUse(
                aws_sdk_efs::types::error::FileSystemInUse::builder()
                    .error_code("FileSystemInUse")
                    .message("File system 'fs-0123456789abcdef0' has mount targets created in all availability zones")
                    .meta(meta("FileSystemInUse", "has mount targets"))
                    .build()
                    .unwrap(),
            )
        })
        .output(|| DeleteFileSystemOutput::builder().build())
        .build();
    let listed = no_file_systems();
    let clients = Aws::default().cfn(&[&ds, &events, &del]).efs(&[&listed, &del_fs]).clients();

    let d = imgbuild::stack::ops::destroy(&clients, STACK, true, false, fast(), &quiet()).await.unwrap();

    assert!(d.existed && d.data_deleted);
    assert_eq!(d.file_system.as_deref(), Some("fs-0123456789abcdef0"));
    assert_eq!(del.num_calls(), 1);
    assert_eq!(del_fs.num_calls(), 2);
}

#[tokio::test]
async fn destroy_of_a_missing_stack_deletes_nothing() {
    let ds = describe_stacks(&[Missing]);
    let del = delete_stack();
    let listed = no_file_systems();
    let clients = Aws::default().cfn(&[&ds, &del]).efs(&[&listed]).clients();

    let d = imgbuild::stack::ops::destroy(&clients, STACK, true, false, fast(), &quiet()).await.unwrap();

    assert!(!d.existed && !d.data_deleted);
    assert_eq!(d.file_system, None);
    assert_eq!(del.num_calls(), 0);
}

#[tokio::test]
async fn destroy_refuses_a_busy_stack_without_wait() {
    let ds = describe_stacks(&[Is("UPDATE_IN_PROGRESS", outputs())]);
    let del = delete_stack();
    let clients = Aws::default().cfn(&[&ds, &del]).clients();

    let err = imgbuild::stack::ops::destroy(&clients, STACK, false, false, fast(), &quiet()).await.unwrap_err();

    assert!(matches!(&err, Error::Invalid(m) if m.contains("--wait")), "{err:?}");
    assert_eq!(del.num_calls(), 0);
}

#[tokio::test]
async fn status_joins_target_health_with_the_instances() {
    use aws_sdk_ec2::types::{Instance, InstanceState, InstanceStateName, InstanceType, Reservation};
    use aws_sdk_elasticloadbalancingv2::types::{TargetDescription, TargetHealth, TargetHealthDescription, TargetHealthStateEnum};
    const TG: &str = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/vectordb/0123456789abcdef";
    let ds = describe_stacks(&[Is("UPDATE_COMPLETE", vec![("TargetGroupArn", TG), ("StageUrl", STAGE_URL)])]);
    let events = stack_events(vec![vec![
        event("s2", STACK, "AWS::CloudFormation::Stack", "UPDATE_COMPLETE", None),
        event("s1", "Asg", "AWS::AutoScaling::AutoScalingGroup", "UPDATE_COMPLETE", None),
        event("s0", STACK, "AWS::CloudFormation::Stack", "UPDATE_IN_PROGRESS", Some("User Initiated")),
    ]]);
    let health = mock!(aws_sdk_elasticloadbalancingv2::Client::describe_target_health).match_requests(|r| r.target_group_arn() == Some(TG)).then_output(|| {
        aws_sdk_elasticloadbalancingv2::operation::describe_target_health::DescribeTargetHealthOutput::builder()
            .target_health_descriptions(
                TargetHealthDescription::builder()
                    .target(TargetDescription::builder().id("i-0aaaaaaaaaaaaaaaa").port(8000).build())
                    .target_health(TargetHealth::builder().state(TargetHealthStateEnum::Unhealthy).description("Health checks failed").build())
                    .build(),
            )
            .build()
    });
    let instances =
        mock!(aws_sdk_ec2::Client::describe_instances).match_requests(|r| r.instance_ids() == ["i-0aaaaaaaaaaaaaaaa".to_string()]).then_output(|| {
            aws_sdk_ec2::operation::describe_instances::DescribeInstancesOutput::builder()
                .reservations(
                    Reservation::builder()
                        .instances(
                            Instance::builder()
                                .instance_id("i-0aaaaaaaaaaaaaaaa")
                                .image_id("ami-0123456789abcdef0")
                                .instance_type(InstanceType::T3aSmall)
                                .state(InstanceState::builder().name(InstanceStateName::Running).build())
                                .build(),
                        )
                        .build(),
                )
                .build()
        });
    let clients = Aws::default().cfn(&[&ds, &events]).elb(&[&health]).ec2(&[&instances]).clients();

    let s = imgbuild::stack::ops::status(&clients, STACK, 2).await.unwrap();

    assert!(s.exists);
    assert_eq!(s.status.as_deref(), Some("UPDATE_COMPLETE"));
    assert_eq!(s.events.iter().map(|e| e.logical_id.as_str()).collect::<Vec<_>>(), vec![STACK, "Asg"], "newest two");
    assert_eq!(s.targets.len(), 1);
    let t = &s.targets[0];
    assert_eq!((t.health.as_str(), t.reason.as_deref()), ("unhealthy", Some("Health checks failed")));
    assert_eq!(t.instance_state.as_deref(), Some("running"));
    assert_eq!(t.image_id.as_deref(), Some("ami-0123456789abcdef0"));
    assert_eq!(t.instance_type.as_deref(), Some("t3a.small"));
}

// ---------------------------------------------------------------------------------------------
// smoke::through_api_gateway

fn resources(paths: &[(&'static str, &'static str)]) -> Rule {
    let paths = paths.to_vec();
    mock!(aws_sdk_apigateway::Client::get_resources).match_requests(|r| r.rest_api_id() == Some("abc123")).then_output(move || {
        let mut b = aws_sdk_apigateway::operation::get_resources::GetResourcesOutput::builder();
        for (id, path) in &paths {
            b = b.items(aws_sdk_apigateway::types::Resource::builder().id(*id).path(*path).build());
        }
        b.build()
    })
}

fn invoke_output(status: i32, body: &str) -> aws_sdk_apigateway::operation::test_invoke_method::TestInvokeMethodOutput {
    aws_sdk_apigateway::operation::test_invoke_method::TestInvokeMethodOutput::builder().status(status).body(body).latency(12).build()
}

fn v2() -> &'static imgbuild::chroma::Profile {
    imgbuild::chroma::profile(&imgbuild::chroma::parse_version("1.5.9").unwrap()).unwrap()
}

#[tokio::test]
async fn smoke_through_api_gateway_passes_when_both_test_invokes_answer_200() {
    let res = resources(&[("root1", "/"), ("prx1", "/{proxy+}")]);
    let invoke = mock!(aws_sdk_apigateway::Client::test_invoke_method)
        // The verb the reference article test-invokes the `ANY` proxy method with (and aws-cli
        // `examples/apigateway/test-invoke-method.rst`): GET, as a client would send it.
        .match_requests(|r| r.rest_api_id() == Some("abc123") && r.resource_id() == Some("prx1") && r.http_method() == Some("GET"))
        .then_compute_output(|r| invoke_output(200, &format!("answer for {}", r.path_with_query_string().unwrap_or_default())));
    let clients = Aws::default().apigw(&[&res, &invoke]).clients();

    let report = imgbuild::smoke::through_api_gateway(&clients, "abc123", v2()).await.unwrap();

    assert!(report.ok(), "{report:?}");
    assert_eq!(report.steps.len(), 2);
    assert_eq!(report.steps.iter().map(|s| s.status).collect::<Vec<_>>(), vec![Some(200), Some(200)]);
    assert_eq!(report.steps[0].detail, "GET /v2/heartbeat: answer for /v2/heartbeat");
    assert!(report.steps[1].detail.starts_with("GET /v2/tenants/default_tenant/databases/default_database/collections:"), "{}", report.steps[1].detail);
    assert!(report.target.contains("prx1"));
    assert_eq!(invoke.num_calls(), 2);
}

#[tokio::test]
async fn smoke_through_api_gateway_fails_on_a_502() {
    let res = resources(&[("prx1", "/{proxy+}")]);
    let invoke = mock!(aws_sdk_apigateway::Client::test_invoke_method)
        .match_requests(|r| r.resource_id() == Some("prx1"))
        .sequence()
        .output(|| invoke_output(200, "{\"nanosecond heartbeat\":1}"))
        .output(|| invoke_output(502, "{\"message\": \"Internal server error\"}"))
        .build();
    let clients = Aws::default().apigw(&[&res, &invoke]).clients();

    let report = imgbuild::smoke::through_api_gateway(&clients, "abc123", v2()).await.unwrap();

    assert!(!report.ok());
    assert!(report.steps[0].ok);
    assert!(!report.steps[1].ok);
    assert_eq!(report.steps[1].status, Some(502));
    assert!(report.steps[1].detail.contains("Internal server error"));
}

#[tokio::test]
async fn smoke_through_api_gateway_needs_a_proxy_resource() {
    let res = resources(&[("root1", "/"), ("hb1", "/heartbeat")]);
    let invoke = mock!(aws_sdk_apigateway::Client::test_invoke_method).then_output(|| invoke_output(200, ""));
    let clients = Aws::default().apigw(&[&res, &invoke]).clients();

    let err = imgbuild::smoke::through_api_gateway(&clients, "abc123", v2()).await.unwrap_err();

    assert!(matches!(&err, Error::Invalid(m) if m.contains("abc123") && m.contains("/{proxy+}")), "{err:?}");
    assert_eq!(invoke.num_calls(), 0);
}

// ---------------------------------------------------------------------------------------------
// images::choose

const AMI: &str = "ami-0123456789abcdef0";

fn parameter(name: &'static str, value: &'static str) -> Rule {
    mock!(aws_sdk_ssm::Client::get_parameter).match_requests(move |r| r.name() == Some(name)).then_output(move || {
        aws_sdk_ssm::operation::get_parameter::GetParameterOutput::builder()
            .parameter(aws_sdk_ssm::types::Parameter::builder().name(name).value(value).build())
            .build()
    })
}

fn parameter_missing(name: &'static str) -> Rule {
    use aws_sdk_ssm::operation::get_parameter::GetParameterError;
    mock!(aws_sdk_ssm::Client::get_parameter).match_requests(move |r| r.name() == Some(name)).then_error(|| {
        GetParameterError::ParameterNotFound(aws_sdk_ssm::types::error::ParameterNotFound::builder().meta(meta("ParameterNotFound", "")).build())
    })
}

fn image_tagged(version: &'static str) -> Rule {
    mock!(aws_sdk_ec2::Client::describe_images).match_requests(|r| r.image_ids() == [AMI.to_string()]).then_output(move || {
        aws_sdk_ec2::operation::describe_images::DescribeImagesOutput::builder()
            .images(
                aws_sdk_ec2::types::Image::builder()
                    .image_id(AMI)
                    .architecture(aws_sdk_ec2::types::ArchitectureValues::X8664)
                    .tags(aws_sdk_ec2::types::Tag::builder().key("imgbuild:chroma-version").value(version).build())
                    .tags(aws_sdk_ec2::types::Tag::builder().key("imgbuild:chroma-image").value(format!("ghcr.io/chroma-core/chroma:{version}")).build())
                    .build(),
            )
            .build()
    })
}

#[tokio::test]
async fn choose_prefers_the_baked_image_from_the_handoff_parameter() {
    let config = Config::default();
    let handoff = parameter("/imgbuild/vectordb/ami", AMI);
    let image = image_tagged("1.5.9");
    let clients = Aws::default().ssm(&[&handoff]).ec2(&[&image]).clients();

    let c = imgbuild::bake::images::choose(&clients, &config, None, None).await.unwrap();

    assert_eq!(c.ami, AMI);
    assert_eq!(c.mode, Mode::Baked);
    assert_eq!(c.source, imgbuild::bake::images::Source::Baked { parameter: "/imgbuild/vectordb/ami".into() });
    assert_eq!(image.num_calls(), 1);
}

#[tokio::test]
async fn choose_refuses_a_baked_image_of_another_chroma_version() {
    let config = Config::default();
    let handoff = parameter("/imgbuild/vectordb/ami", AMI);
    let image = image_tagged("1.0.0");
    let clients = Aws::default().ssm(&[&handoff]).ec2(&[&image]).clients();

    let err = imgbuild::bake::images::choose(&clients, &config, None, None).await.unwrap_err();

    match &err {
        Error::Invalid(m) => assert!(m.contains(AMI) && m.contains("1.0.0") && m.contains("1.5.9"), "{m}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[tokio::test]
async fn choose_falls_back_to_stock_al2023_in_full_mode() {
    let config = Config::default();
    let handoff = parameter_missing("/imgbuild/vectordb/ami");
    let stock = parameter("/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64", "ami-0fedcba9876543210");
    // No EC2 rules: a stock image is not checked for a baked Chroma version.
    let clients = Aws::default().ssm(&[&handoff, &stock]).clients();

    let c = imgbuild::bake::images::choose(&clients, &config, None, None).await.unwrap();

    assert_eq!(c.ami, "ami-0fedcba9876543210");
    assert_eq!(c.mode, Mode::Full);
    assert_eq!(c.source, imgbuild::bake::images::Source::Stock { parameter: "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64".into() });
    assert_eq!(handoff.num_calls(), 1);
    assert_eq!(stock.num_calls(), 1);
}

#[tokio::test]
async fn choose_reads_the_arm64_parameter_for_graviton() {
    let mut config = Config::default();
    config.stack.instance_type = "t4g.small".into();
    let handoff = parameter_missing("/imgbuild/vectordb/ami");
    let stock = parameter("/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64", "ami-0aaaabbbbccccdddd");
    let clients = Aws::default().ssm(&[&handoff, &stock]).clients();

    let c = imgbuild::bake::images::choose(&clients, &config, None, None).await.unwrap();

    assert_eq!(c.ami, "ami-0aaaabbbbccccdddd");
    assert_eq!(c.mode, Mode::Full);
}
