//! The stack's alarms (issue 15, item 3): the rollback triggers an update's change set carries,
//! captured as the bytes CloudFormation receives; none on a first create; a vanished alarm left
//! out; the alarm that rolled an update back named; `status` showing the alarms' states; the
//! `alarms:` config's checks. AWS answers in their documented shapes (aws-smithy-mocks).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_cloudformation::operation::create_change_set::CreateChangeSetOutput;
use aws_sdk_cloudformation::operation::describe_change_set::DescribeChangeSetOutput;
use aws_sdk_cloudformation::operation::describe_stack_events::DescribeStackEventsOutput;
use aws_sdk_cloudformation::operation::describe_stacks::{DescribeStacksError, DescribeStacksOutput};
use aws_sdk_cloudformation::operation::execute_change_set::ExecuteChangeSetOutput;
use aws_sdk_cloudformation::types::{ChangeAction, ChangeSetStatus, ChangeType, Replacement, ResourceStatus, StackEvent, StackStatus};
use aws_sdk_cloudwatch::operation::describe_alarms::DescribeAlarmsOutput;
use aws_sdk_cloudwatch::types::{MetricAlarm, StateValue};
use aws_smithy_mocks::{Rule, mock};
use aws_smithy_types::error::ErrorMetadata;
use aws_smithy_types::retry::RetryConfig;

use imgbuild::Error;
use imgbuild::aws::Clients;
use imgbuild::stack::Waits;
use imgbuild::stack::alarms::{Rollback, Watch};
use imgbuild::stack::changeset::{self, Cleanup, Confirm, Confirmer, Plan};
use imgbuild::stack::protect::Protection;
use imgbuild::ui::progress::Progress;

const STACK: &str = "vectordb";
const STACK_ID: &str = "arn:aws:cloudformation:us-east-1:123456789012:stack/vectordb/6c1e5a30-0000-11ef-0000-0a1b2c3d4e5f";
const CS_ID: &str = "arn:aws:cloudformation:us-east-1:123456789012:changeSet/imgbuild-tok3/9f8e7d6c-0000-11ef-0000-0a1b2c3d4e5f";
const TEMPLATE: &str = "AWSTemplateFormatVersion: '2010-09-09'\nResources: {}\n";
/// The alarms infra/stack.yaml names `${AWS::StackName}-...`, as its AlarmArns output lists them
/// (ARN shape: aws-cli `examples/cloudwatch/describe-alarms.rst`, `AlarmArn`).
const NAMES: [&str; 5] = ["vectordb-unhealthy-hosts", "vectordb-memory", "vectordb-disk", "vectordb-efs-burst-credits", "vectordb-efs-io-limit"];

fn arn(name: &str) -> String {
    format!("arn:aws:cloudwatch:us-east-1:123456789012:alarm:{name}")
}

fn alarm_arns() -> String {
    NAMES.iter().map(|n| arn(n)).collect::<Vec<_>>().join(",")
}

/// Records the body of every CreateChangeSet request as it leaves for CloudFormation (after
/// serialisation: the bytes, not the SDK's input struct).
#[derive(Debug, Clone, Default)]
struct Wire(Arc<Mutex<Vec<String>>>);

impl aws_sdk_cloudformation::config::Intercept for Wire {
    fn name(&self) -> &'static str {
        "wire"
    }

    fn read_before_transmit(
        &self,
        context: &aws_sdk_cloudformation::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _: &aws_sdk_cloudformation::config::RuntimeComponents,
        _: &mut aws_sdk_cloudformation::config::ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let body = context.request().body().bytes().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
        if body.contains("Action=CreateChangeSet") {
            self.0.lock().unwrap().push(body);
        }
        Ok(())
    }
}

fn clients(cfn: &[&Rule], cloudwatch: &[&Rule], wire: &Wire) -> Clients {
    let retry = RetryConfig::standard().with_initial_backoff(Duration::from_millis(1));
    let mut interceptor = aws_smithy_mocks::MockResponseInterceptor::new().rule_mode(aws_smithy_mocks::RuleMode::MatchAny);
    for rule in cfn {
        interceptor = interceptor.with_rule(rule);
    }
    let cfn = aws_sdk_cloudformation::Client::from_conf(
        aws_sdk_cloudformation::config::Builder::new()
            .behavior_version(aws_sdk_cloudformation::config::BehaviorVersion::latest())
            .region(aws_sdk_cloudformation::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_cloudformation::config::Credentials::new("AKIDMOCKS", "mocks", None, None, "aws-smithy-mocks"))
            .http_client(aws_smithy_mocks::create_mock_http_client())
            .retry_config(retry.clone())
            .interceptor(interceptor)
            .interceptor(wire.clone())
            .build(),
    );
    let cloudwatch: Vec<Rule> = cloudwatch.iter().map(|r| (*r).clone()).collect();
    Clients { cfn, cloudwatch: mocked!(aws_sdk_cloudwatch, cloudwatch, retry), ..crate::mock_client::unscripted() }
}

fn quiet() -> Progress {
    Progress::new(imgbuild::ui::Ui::new(imgbuild::cli::OutputFormat::Text, 0, true), "alarms")
}

fn plan(rollback: Rollback) -> Plan {
    Plan {
        stack: STACK.into(),
        template_body: TEMPLATE.into(),
        parameters: BTreeMap::from([("InstanceType".to_string(), "t3a.small".to_string())]),
        tags: BTreeMap::new(),
        confirm: Confirm::Yes,
        wait_if_busy: false,
        waits: Waits { timeout: Duration::from_secs(5), poll: Duration::from_millis(1) },
        token: "tok3".into(),
        annotate: None,
        rollback,
    }
}

/// No stack policy, no termination protection, no drift check: only the triggers are at stake.
fn bare() -> Protection {
    Protection { termination: None, protect_data: None, disable_rollback: false, drift_check: false }
}

struct Never;

impl Confirmer for Never {
    fn confirm<'a>(&'a self, q: &'a str) -> Pin<Box<dyn Future<Output = imgbuild::Result<bool>> + Send + 'a>> {
        panic!("--yes asks nothing, asked {q}")
    }
}

/// A stack as DescribeStacks returns it (aws-cli `examples/cloudformation/describe-stacks.rst`),
/// with the template's AlarmArns output when `alarms`.
fn stack(status: &str, alarms: bool) -> aws_sdk_cloudformation::types::Stack {
    let mut b = aws_sdk_cloudformation::types::Stack::builder()
        .stack_name(STACK)
        .stack_id(STACK_ID)
        .stack_status(StackStatus::from(status))
        .parameters(aws_sdk_cloudformation::types::Parameter::builder().parameter_key("InstanceType").parameter_value("t3a.small").build());
    if alarms {
        b = b.outputs(aws_sdk_cloudformation::types::Output::builder().output_key("AlarmArns").output_value(alarm_arns()).build());
    }
    b.build()
}

/// DescribeStacks answering each state in turn (None: the stack does not exist, which is code
/// ValidationError, DescribeStacks API reference), the last one repeatedly.
fn describe_stacks(steps: &[Option<(&'static str, bool)>]) -> Rule {
    let mut seq = mock!(aws_sdk_cloudformation::Client::describe_stacks).sequence();
    for step in steps.iter().copied() {
        seq = match step {
            None => seq.error(|| {
                DescribeStacksError::generic(ErrorMetadata::builder().code("ValidationError").message("Stack with id vectordb does not exist").build())
            }),
            Some((status, alarms)) => seq.output(move || DescribeStacksOutput::builder().stacks(stack(status, alarms)).build()),
        };
    }
    seq.repeatedly().build()
}

fn create_change_set() -> Rule {
    // CreateChangeSet answers Id and StackId (aws-cli examples/cloudformation/create-change-set.rst).
    mock!(aws_sdk_cloudformation::Client::create_change_set).then_output(|| CreateChangeSetOutput::builder().id(CS_ID).stack_id(STACK_ID).build())
}

fn change_set_ready() -> Rule {
    mock!(aws_sdk_cloudformation::Client::describe_change_set).then_output(|| {
        DescribeChangeSetOutput::builder()
            .change_set_id(CS_ID)
            .stack_id(STACK_ID)
            .status(ChangeSetStatus::CreateComplete)
            .changes(
                aws_sdk_cloudformation::types::Change::builder()
                    .r#type(ChangeType::Resource)
                    .resource_change(
                        aws_sdk_cloudformation::types::ResourceChange::builder()
                            .action(ChangeAction::Modify)
                            .logical_resource_id("LaunchTemplate")
                            .resource_type("AWS::EC2::LaunchTemplate")
                            .replacement(Replacement::False)
                            .build(),
                    )
                    .build(),
            )
            .build()
    })
}

fn execute() -> Rule {
    mock!(aws_sdk_cloudformation::Client::execute_change_set).then_output(|| ExecuteChangeSetOutput::builder().build())
}

/// The first read (EventFollower::start) sees none; later reads see `events`, newest first, as
/// DescribeStackEvents lists them (aws-cli `examples/cloudformation/describe-stack-events.rst`).
fn events(events: Vec<StackEvent>) -> Rule {
    mock!(aws_sdk_cloudformation::Client::describe_stack_events)
        .sequence()
        .output(|| DescribeStackEventsOutput::builder().build())
        .output(move || DescribeStackEventsOutput::builder().set_stack_events(Some(events.clone())).build())
        .repeatedly()
        .build()
}

fn stack_event(id: &str, status: &str, reason: &str) -> StackEvent {
    StackEvent::builder()
        .stack_id(STACK_ID)
        .event_id(id)
        .stack_name(STACK)
        .logical_resource_id(STACK)
        .physical_resource_id(STACK_ID)
        .resource_type("AWS::CloudFormation::Stack")
        .timestamp(aws_smithy_types::DateTime::from_secs(1_700_000_000))
        .resource_status(ResourceStatus::from(status))
        .resource_status_reason(reason)
        .build()
}

/// One alarm as DescribeAlarms lists it (aws-cli `examples/cloudwatch/describe-alarms.rst`:
/// `MetricAlarms[]` with `AlarmName`, `AlarmArn`, `StateValue`, `StateReason`,
/// `StateUpdatedTimestamp`).
fn metric_alarm(name: &str, state: StateValue, reason: &str) -> MetricAlarm {
    MetricAlarm::builder()
        .alarm_name(name)
        .alarm_arn(arn(name))
        .state_value(state)
        .state_reason(reason)
        .state_updated_timestamp(aws_smithy_types::DateTime::from_secs(1_700_000_000))
        .build()
}

/// DescribeAlarms by name answering the named alarms that exist (`existing`), in `state`.
fn describe_alarms(existing: &'static [&'static str], state: StateValue) -> Rule {
    mock!(aws_sdk_cloudwatch::Client::describe_alarms).then_compute_output(move |r| {
        let alarms = r
            .alarm_names()
            .iter()
            .filter(|n| existing.contains(&n.as_str()))
            .map(|n| metric_alarm(n, state.clone(), "Threshold Crossed: 5 datapoints were not greater than or equal to the threshold (90.0)."))
            .collect();
        DescribeAlarmsOutput::builder().set_metric_alarms(Some(alarms)).build()
    })
}

/// The rollback configuration as the CloudFormation Query API takes it (awsQuery: list members
/// numbered from 1; RollbackConfiguration, RollbackTrigger in the API reference), URL-encoded.
fn rollback_wire(names: &[&str], minutes: u32) -> String {
    let mut s = String::new();
    for (i, n) in names.iter().enumerate() {
        let i = i + 1;
        s.push_str(&format!(
            "&RollbackConfiguration.RollbackTriggers.member.{i}.Arn=arn%3Aaws%3Acloudwatch%3Aus-east-1%3A123456789012%3Aalarm%3A{n}&RollbackConfiguration.RollbackTriggers.member.{i}.Type=AWS%3A%3ACloudWatch%3A%3AAlarm"
        ));
    }
    s.push_str(&format!("&RollbackConfiguration.MonitoringTimeInMinutes={minutes}"));
    s
}

/// An update of a stack that has its alarms: the change set names each as a trigger of type
/// AWS::CloudWatch::Alarm, with the configured monitoring time, in the request CloudFormation
/// receives; the outcome (deploy's `--output json`) says so.
#[tokio::test]
async fn an_update_carries_the_stacks_alarms_as_rollback_triggers_on_the_wire() {
    let wire = Wire::default();
    let ds = describe_stacks(&[Some(("UPDATE_COMPLETE", true)), Some(("UPDATE_IN_PROGRESS", true)), Some(("UPDATE_COMPLETE", true))]);
    let (create, dcs, exec, ev) = (create_change_set(), change_set_ready(), execute(), events(Vec::new()));
    let da = describe_alarms(&NAMES, StateValue::Ok);
    let c = clients(&[&ds, &create, &dcs, &exec, &ev], &[&da], &wire);

    let out = changeset::run_protected(&c, &plan(Rollback::Watch { minutes: 10 }), &bare(), &quiet(), &Cleanup::default(), &Never).await.unwrap();

    let sent = wire.0.lock().unwrap().clone();
    assert_eq!(sent.len(), 1);
    assert!(sent[0].contains(&rollback_wire(&NAMES, 10)), "{}", sent[0]);
    assert_eq!(sent[0].matches("RollbackConfiguration").count(), 11, "five triggers, two fields each, and the monitoring time: {}", sent[0]);
    assert_eq!(out.rollback, Some(Watch { triggers: NAMES.iter().map(|n| arn(n)).collect(), monitoring_minutes: Some(10) }));
    let doc = serde_json::to_value(&out).unwrap();
    assert_eq!(doc["rollback"]["monitoring_minutes"], 10);
    assert_eq!(doc["rollback"]["triggers"][1], arn("vectordb-memory"));
}

/// A first create: the alarms are made by this very operation, and "if a specified trigger is
/// missing, the entire stack operation fails and is rolled back" (RollbackTrigger, API
/// reference): no RollbackConfiguration at all, and no DescribeAlarms (cloudwatch unscripted).
#[tokio::test]
async fn a_first_create_sends_no_rollback_configuration() {
    let wire = Wire::default();
    let ds = describe_stacks(&[None, Some(("CREATE_IN_PROGRESS", false)), Some(("CREATE_COMPLETE", true))]);
    let (create, dcs, exec, ev) = (create_change_set(), change_set_ready(), execute(), events(Vec::new()));
    let c = clients(&[&ds, &create, &dcs, &exec, &ev], &[], &wire);

    let out = changeset::run_protected(&c, &plan(Rollback::Watch { minutes: 10 }), &bare(), &quiet(), &Cleanup::default(), &Never).await.unwrap();

    let sent = wire.0.lock().unwrap().clone();
    assert!(sent[0].contains("ChangeSetType=CREATE"), "{}", sent[0]);
    assert!(!sent[0].contains("RollbackConfiguration"), "{}", sent[0]);
    assert_eq!(out.rollback, None);
    assert!(out.notices.iter().any(|n| n.contains("none for a create")), "{:?}", out.notices);
}

/// A stack deployed before it had alarms: the update that adds them cannot watch them; it sends
/// an empty trigger list (which also drops triggers saved by an earlier update) and says so.
#[tokio::test]
async fn an_update_of_a_stack_without_alarms_yet_watches_nothing_and_says_so() {
    let wire = Wire::default();
    let ds = describe_stacks(&[Some(("UPDATE_COMPLETE", false)), Some(("UPDATE_COMPLETE", true))]);
    let (create, dcs, exec, ev) = (create_change_set(), change_set_ready(), execute(), events(Vec::new()));
    let c = clients(&[&ds, &create, &dcs, &exec, &ev], &[], &wire);

    let out = changeset::run_protected(&c, &plan(Rollback::Watch { minutes: 10 }), &bare(), &quiet(), &Cleanup::default(), &Never).await.unwrap();

    let sent = wire.0.lock().unwrap().clone();
    // awsQuery writes an empty list as the bare member name.
    assert!(sent[0].contains("&RollbackConfiguration.RollbackTriggers=&") || sent[0].ends_with("&RollbackConfiguration.RollbackTriggers="), "{}", sent[0]);
    assert!(!sent[0].contains("MonitoringTimeInMinutes"), "{}", sent[0]);
    assert!(out.notices.iter().any(|n| n.contains("has no alarms yet")), "{:?}", out.notices);
}

/// An alarm deleted by hand is not a trigger (it would fail the whole update); the others are.
#[tokio::test]
async fn an_alarm_deleted_outside_the_stack_is_left_out_of_the_triggers() {
    let wire = Wire::default();
    let ds = describe_stacks(&[Some(("UPDATE_COMPLETE", true)), Some(("UPDATE_COMPLETE", true))]);
    let (create, dcs, exec, ev) = (create_change_set(), change_set_ready(), execute(), events(Vec::new()));
    static SOME: [&str; 4] = ["vectordb-unhealthy-hosts", "vectordb-memory", "vectordb-efs-burst-credits", "vectordb-efs-io-limit"];
    let da = describe_alarms(&SOME, StateValue::InsufficientData);
    let c = clients(&[&ds, &create, &dcs, &exec, &ev], &[&da], &wire);

    let out = changeset::run_protected(&c, &plan(Rollback::Watch { minutes: 5 }), &bare(), &quiet(), &Cleanup::default(), &Never).await.unwrap();

    let sent = wire.0.lock().unwrap().clone();
    assert!(sent[0].contains(&rollback_wire(&SOME, 5)), "{}", sent[0]);
    assert!(!sent[0].contains("vectordb-disk"), "{}", sent[0]);
    assert!(out.notices.iter().any(|n| n.contains("alarm vectordb-disk is gone")), "{:?}", out.notices);
}

/// alarms.enabled: false removes the triggers an earlier update saved (CloudFormation applies
/// saved triggers to later updates unless told otherwise, RollbackConfiguration): an empty list.
#[tokio::test]
async fn alarms_off_clears_the_saved_triggers() {
    let wire = Wire::default();
    let ds = describe_stacks(&[Some(("UPDATE_COMPLETE", true)), Some(("UPDATE_COMPLETE", false))]);
    let (create, dcs, exec, ev) = (create_change_set(), change_set_ready(), execute(), events(Vec::new()));
    let c = clients(&[&ds, &create, &dcs, &exec, &ev], &[], &wire);

    let out = changeset::run_protected(&c, &plan(Rollback::Off), &bare(), &quiet(), &Cleanup::default(), &Never).await.unwrap();

    let sent = wire.0.lock().unwrap().clone();
    assert!(sent[0].contains("RollbackConfiguration.RollbackTriggers="), "{}", sent[0]);
    assert!(!sent[0].contains("RollbackTriggers.member"), "{}", sent[0]);
    assert_eq!(out.rollback, Some(Watch::default()));
}

/// An update rolled back by a trigger: the stack's own event names the alarm, and deploy's error
/// (exit 3) says which one. The reason's wording here is this test's (the API reference does not
/// give it); imgbuild only looks for the trigger's ARN or name in it.
#[tokio::test]
async fn an_update_rolled_back_by_an_alarm_names_the_alarm() {
    let wire = Wire::default();
    let ds = describe_stacks(&[Some(("UPDATE_COMPLETE", true)), Some(("UPDATE_ROLLBACK_IN_PROGRESS", true)), Some(("UPDATE_ROLLBACK_COMPLETE", true))]);
    let (create, dcs, exec) = (create_change_set(), change_set_ready(), execute());
    let ev = events(vec![
        stack_event("e3", "UPDATE_ROLLBACK_COMPLETE", ""),
        stack_event("e2", "UPDATE_ROLLBACK_IN_PROGRESS", &format!("Alarm {} is in ALARM state; rolling back", arn("vectordb-memory"))),
        stack_event("e1", "UPDATE_IN_PROGRESS", "User Initiated"),
    ]);
    let da = describe_alarms(&NAMES, StateValue::Ok);
    let c = clients(&[&ds, &create, &dcs, &exec, &ev], &[&da], &wire);

    let err = changeset::run_protected(&c, &plan(Rollback::Watch { minutes: 10 }), &bare(), &quiet(), &Cleanup::default(), &Never).await.unwrap_err();

    assert_eq!(err.exit_code(), 3);
    match &err {
        Error::StackFailed { status, failures, .. } => {
            assert_eq!(status, "UPDATE_ROLLBACK_COMPLETE");
            assert_eq!(failures, &["rollback trigger: alarm vectordb-memory went to ALARM, so CloudFormation rolled the update back".to_string()]);
        }
        e => panic!("{e:?}"),
    }
}

/// When the events do not name it, the triggers in ALARM now are the answer.
#[tokio::test]
async fn without_the_alarm_in_the_events_the_triggers_in_alarm_are_named() {
    let wire = Wire::default();
    let ds = describe_stacks(&[Some(("UPDATE_COMPLETE", true)), Some(("UPDATE_ROLLBACK_COMPLETE", true))]);
    let (create, dcs, exec) = (create_change_set(), change_set_ready(), execute());
    let ev = events(vec![stack_event("e2", "UPDATE_ROLLBACK_IN_PROGRESS", "Rollback requested")]);
    // DescribeAlarms: first the existence check (all OK), then the question after the rollback.
    let da = mock!(aws_sdk_cloudwatch::Client::describe_alarms)
        .sequence()
        .output(|| DescribeAlarmsOutput::builder().set_metric_alarms(Some(NAMES.iter().map(|n| metric_alarm(n, StateValue::Ok, "ok")).collect())).build())
        .output(|| DescribeAlarmsOutput::builder().metric_alarms(metric_alarm("vectordb-unhealthy-hosts", StateValue::Alarm, "Threshold Crossed")).build())
        .build();
    let c = clients(&[&ds, &create, &dcs, &exec, &ev], &[&da], &wire);

    let err = changeset::run_protected(&c, &plan(Rollback::Watch { minutes: 10 }), &bare(), &quiet(), &Cleanup::default(), &Never).await.unwrap_err();

    match &err {
        Error::StackFailed { failures, .. } => {
            assert!(failures.iter().any(|f| f.contains("alarm vectordb-unhealthy-hosts (Threshold Crossed) went to ALARM")), "{failures:?}")
        }
        e => panic!("{e:?}"),
    }
}

/// `status`: each alarm the stack lists with its state and reason; one deleted by hand shows as
/// missing (DescribeAlarms simply leaves it out).
#[tokio::test]
async fn status_shows_each_alarm_with_its_state() {
    let wire = Wire::default();
    let ds = describe_stacks(&[Some(("UPDATE_COMPLETE", true))]);
    let ev = mock!(aws_sdk_cloudformation::Client::describe_stack_events).then_output(|| DescribeStackEventsOutput::builder().build());
    static SOME: [&str; 4] = ["vectordb-unhealthy-hosts", "vectordb-memory", "vectordb-efs-burst-credits", "vectordb-efs-io-limit"];
    let da = describe_alarms(&SOME, StateValue::Alarm);
    let c = clients(&[&ds, &ev], &[&da], &wire);

    let st = imgbuild::stack::ops::status(&c, STACK, 5).await.unwrap();

    let states: Vec<(&str, &str)> = st.alarms.iter().map(|a| (a.name.as_str(), a.state.as_str())).collect();
    assert_eq!(
        states,
        [
            ("vectordb-unhealthy-hosts", "ALARM"),
            ("vectordb-memory", "ALARM"),
            ("vectordb-disk", "missing"),
            ("vectordb-efs-burst-credits", "ALARM"),
            ("vectordb-efs-io-limit", "ALARM")
        ]
    );
    assert!(st.alarms[0].reason.starts_with("Threshold Crossed"));
    assert_eq!(st.alarms[0].updated.as_deref(), Some("2023-11-14T22:13:20Z"));
    let doc = serde_json::to_value(&st).unwrap();
    assert_eq!(doc["alarms"][2]["state"], "missing");
    assert_eq!(doc["alarms_error"], serde_json::Value::Null);
}

/// A refused DescribeAlarms (no cloudwatch:DescribeAlarms) leaves the rest of the status.
#[tokio::test]
async fn status_without_describe_alarms_permission_still_reports_the_stack() {
    let wire = Wire::default();
    let ds = describe_stacks(&[Some(("UPDATE_COMPLETE", true))]);
    let ev = mock!(aws_sdk_cloudformation::Client::describe_stack_events).then_output(|| DescribeStackEventsOutput::builder().build());
    let da = mock!(aws_sdk_cloudwatch::Client::describe_alarms).then_error(|| {
        aws_sdk_cloudwatch::operation::describe_alarms::DescribeAlarmsError::generic(
            ErrorMetadata::builder().code("AccessDenied").message("User is not authorized to perform: cloudwatch:DescribeAlarms").build(),
        )
    });
    let c = clients(&[&ds, &ev], &[&da], &wire);

    let st = imgbuild::stack::ops::status(&c, STACK, 5).await.unwrap();

    assert!(st.alarms.is_empty());
    assert!(st.alarms_error.as_deref().is_some_and(|e| e.contains("DescribeAlarms") && e.contains("AccessDenied")), "{:?}", st.alarms_error);
}

/// The `alarms:` section: bad values are refused naming the field.
#[test]
fn the_alarms_config_refuses_bad_values_naming_the_field() {
    let cases = [
        ("alarms:\n  email: not-an-address\n", "alarms.email"),
        ("alarms:\n  email: a@b.example, c@d.example\n", "alarms.email"),
        ("alarms:\n  enabled: false\n  email: ops@example.com\n", "alarms.email"),
        ("alarms:\n  memory_percent: 0\n", "alarms.memory_percent"),
        ("alarms:\n  disk_percent: 101\n", "alarms.disk_percent"),
        ("alarms:\n  efs_io_limit_percent: 0\n", "alarms.efs_io_limit_percent"),
        ("alarms:\n  rollback_monitoring_minutes: 181\n", "alarms.rollback_monitoring_minutes"),
    ];
    for (yaml, field) in cases {
        let config: imgbuild::config::Config = serde_yaml::from_str(yaml).unwrap();
        let errors = config.check();
        assert_eq!(errors.iter().map(|(f, _)| f.as_str()).collect::<Vec<_>>(), [field], "{yaml}: {errors:?}");
    }
    let ok: imgbuild::config::Config = serde_yaml::from_str("alarms:\n  email: ops@example.com\n  rollback_monitoring_minutes: 180\n").unwrap();
    assert!(ok.check().is_empty(), "{:?}", ok.check());
}

/// A trigger already in ALARM would roll the update back at once: deploy warns before asking,
/// naming the alarm and the way out (`--no-rollback-triggers`).
#[tokio::test]
async fn a_trigger_already_in_alarm_is_warned_about_before_the_update() {
    let wire = Wire::default();
    let ds = describe_stacks(&[Some(("UPDATE_COMPLETE", true)), Some(("UPDATE_COMPLETE", true))]);
    let (create, dcs, exec, ev) = (create_change_set(), change_set_ready(), execute(), events(Vec::new()));
    let da = describe_alarms(&NAMES, StateValue::Alarm);
    let c = clients(&[&ds, &create, &dcs, &exec, &ev], &[&da], &wire);

    let out = changeset::run_protected(&c, &plan(Rollback::Watch { minutes: 10 }), &bare(), &quiet(), &Cleanup::default(), &Never).await.unwrap();

    let warned: Vec<&String> = out.notices.iter().filter(|n| n.contains("is in ALARM now") && n.contains("--no-rollback-triggers")).collect();
    assert_eq!(warned.len(), 5, "{:?}", out.notices);
    assert!(warned[1].contains("alarm vectordb-memory is in ALARM now (Threshold Crossed"), "{}", warned[1]);
}

/// The flag and what the alarms do are in `--help`.
#[test]
fn deploy_and_status_help_name_the_alarms() {
    let dir = tempfile::tempdir().unwrap();
    let deploy = crate::support::imgbuild(dir.path()).args(["deploy", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&deploy.stdout);
    assert!(text.contains("--no-rollback-triggers") && text.contains("rollback triggers"), "{text}");
    let status = crate::support::imgbuild(dir.path()).args(["status", "--help"]).output().unwrap();
    assert!(String::from_utf8_lossy(&status.stdout).contains("alarms' states"), "{}", String::from_utf8_lossy(&status.stdout));
}

/// A template of the user's that lists six alarms in AlarmArns: CloudFormation takes at most five
/// rollback triggers ("You can add a maximum of five rollback triggers", "Monitor and Roll Back
/// Stack Operations", CloudFormation User Guide), so a sixth would fail CreateChangeSet. The
/// first five watch; the sixth is named in a warning.
#[tokio::test]
async fn more_alarms_than_cloudformation_takes_watch_with_the_first_five() {
    static SIX: [&str; 6] =
        ["vectordb-unhealthy-hosts", "vectordb-memory", "vectordb-disk", "vectordb-efs-burst-credits", "vectordb-efs-io-limit", "vectordb-latency"];
    let six = || {
        aws_sdk_cloudformation::types::Stack::builder()
            .stack_name(STACK)
            .stack_id(STACK_ID)
            .stack_status(StackStatus::UpdateComplete)
            .outputs(
                aws_sdk_cloudformation::types::Output::builder()
                    .output_key("AlarmArns")
                    .output_value(SIX.iter().map(|n| arn(n)).collect::<Vec<_>>().join(","))
                    .build(),
            )
            .build()
    };
    let ds = mock!(aws_sdk_cloudformation::Client::describe_stacks).then_output(move || DescribeStacksOutput::builder().stacks(six()).build());
    let wire = Wire::default();
    let (create, dcs, exec, ev) = (create_change_set(), change_set_ready(), execute(), events(Vec::new()));
    let da = describe_alarms(&SIX, StateValue::Ok);
    let c = clients(&[&ds, &create, &dcs, &exec, &ev], &[&da], &wire);

    let out = changeset::run_protected(&c, &plan(Rollback::Watch { minutes: 10 }), &bare(), &quiet(), &Cleanup::default(), &Never).await.unwrap();

    let sent = wire.0.lock().unwrap().clone();
    assert!(sent[0].contains(&rollback_wire(&SIX[..5], 10)), "{}", sent[0]);
    assert!(!sent[0].contains("vectordb-latency") && !sent[0].contains("member.6"), "{}", sent[0]);
    assert!(out.notices.iter().any(|n| n.contains("at most 5 rollback triggers") && n.contains("vectordb-latency")), "{:?}", out.notices);
}
