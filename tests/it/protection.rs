//! Protection of the deployed stack (issue 15, item 4), against aws-smithy-mocks answering in
//! CloudFormation's documented shapes: termination protection, the stack policy that keeps the
//! data, `deploy --disable-rollback`, and `continue-rollback` out of UPDATE_ROLLBACK_FAILED; and
//! drift (item 5): `status --drift` and deploy's warning before overwriting drifted resources.
//! Every request that matters is captured and its fields asserted.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_cloudformation::operation::continue_update_rollback::ContinueUpdateRollbackOutput;
use aws_sdk_cloudformation::operation::create_change_set::CreateChangeSetOutput;
use aws_sdk_cloudformation::operation::delete_change_set::DeleteChangeSetOutput;
use aws_sdk_cloudformation::operation::delete_stack::DeleteStackOutput;
use aws_sdk_cloudformation::operation::describe_change_set::DescribeChangeSetOutput;
use aws_sdk_cloudformation::operation::describe_stack_events::{DescribeStackEventsError, DescribeStackEventsOutput};
use aws_sdk_cloudformation::operation::describe_stacks::{DescribeStacksError, DescribeStacksOutput};
use aws_sdk_cloudformation::operation::execute_change_set::ExecuteChangeSetOutput;
use aws_sdk_cloudformation::operation::get_template::GetTemplateOutput;
use aws_sdk_cloudformation::operation::list_stack_resources::ListStackResourcesOutput;
use aws_sdk_cloudformation::operation::set_stack_policy::SetStackPolicyOutput;
use aws_sdk_cloudformation::operation::update_termination_protection::UpdateTerminationProtectionOutput;
use aws_sdk_cloudformation::types::{ChangeAction, ChangeSetStatus, ChangeSetType, ChangeType, Replacement, ResourceStatus, StackResourceSummary, StackStatus};
use aws_smithy_mocks::{Rule, mock};
use aws_smithy_types::error::ErrorMetadata;
use aws_smithy_types::retry::RetryConfig;

use imgbuild::Error;
use imgbuild::aws::Clients;
use imgbuild::stack::Waits;
use imgbuild::stack::changeset::{self, Cleanup, Confirm, Confirmer, Plan};
use imgbuild::stack::protect::{self, Protection};
use imgbuild::ui::progress::Progress;

const STACK: &str = "vectordb";
const STACK_ID: &str = "arn:aws:cloudformation:us-east-1:123456789012:stack/vectordb/6c1e5a30-0000-11ef-0000-0a1b2c3d4e5f";
const CS_ID: &str = "arn:aws:cloudformation:us-east-1:123456789012:changeSet/imgbuild-tok15/9f8e7d6c-0000-11ef-0000-0a1b2c3d4e5f";
const TEMPLATE: &str = "AWSTemplateFormatVersion: '2010-09-09'\nResources: {}\n";

fn clients(cfn: &[&Rule]) -> Clients {
    let retry = RetryConfig::standard().with_initial_backoff(Duration::from_millis(1));
    let cfn: Vec<Rule> = cfn.iter().map(|r| (*r).clone()).collect();
    let none: Vec<Rule> = Vec::new();
    Clients {
        cfn: mocked!(aws_sdk_cloudformation, cfn, retry.clone()),
        ec2: mocked!(aws_sdk_ec2, none, retry.clone()),
        efs: mocked!(aws_sdk_efs, none, retry.clone()),
        ssm: mocked!(aws_sdk_ssm, none, retry.clone()),
        elb: mocked!(aws_sdk_elasticloadbalancingv2, none, retry.clone()),
        apigw: mocked!(aws_sdk_apigateway, none, retry.clone()),
        backup: mocked!(aws_sdk_backup, Vec::<Rule>::new(), retry),
        ..crate::mock_client::unscripted()
    }
}

fn quiet() -> Progress {
    Progress::new(imgbuild::ui::Ui::new(imgbuild::cli::OutputFormat::Text, 0, true), "protection")
}

fn fast() -> Waits {
    Waits { timeout: Duration::from_secs(5), poll: Duration::from_millis(1) }
}

fn plan() -> Plan {
    Plan {
        stack: STACK.into(),
        template_body: TEMPLATE.into(),
        parameters: BTreeMap::from([("InstanceType".to_string(), "t3a.small".to_string())]),
        tags: BTreeMap::from([("imgbuild:project".to_string(), "vectordb".to_string())]),
        confirm: Confirm::Yes,
        wait_if_busy: false,
        waits: fast(),
        token: "tok15".into(),
        annotate: None,
        rollback: Default::default(),
    }
}

/// What deploy asks with the default config (stack.termination_protection and
/// stack.protect_data both true).
fn defaults(disable_rollback: bool) -> Protection {
    Protection { termination: Some(true), protect_data: Some(true), disable_rollback, drift_check: false }
}

/// A stack as DescribeStacks returns it (aws-cli examples/cloudformation/describe-stacks.rst;
/// EnableTerminationProtection is a field of the Stack structure, API reference "Stack").
fn stack(status: &str, protected: bool) -> aws_sdk_cloudformation::types::Stack {
    aws_sdk_cloudformation::types::Stack::builder()
        .stack_name(STACK)
        .stack_id(STACK_ID)
        .stack_status(StackStatus::from(status))
        .enable_termination_protection(protected)
        .outputs(aws_sdk_cloudformation::types::Output::builder().output_key("FileSystemId").output_value("fs-0123456789abcdef0").build())
        .parameters(aws_sdk_cloudformation::types::Parameter::builder().parameter_key("InstanceType").parameter_value("t3a.small").build())
        .build()
}

#[derive(Clone)]
enum At {
    Missing,
    Is(&'static str, bool),
}

fn describe_stacks(steps: &[At]) -> Rule {
    let mut seq = mock!(aws_sdk_cloudformation::Client::describe_stacks).match_requests(|r| r.stack_name() == Some(STACK)).sequence();
    for step in steps.iter().cloned() {
        seq = match step {
            // A missing stack is code ValidationError (DescribeStacks, API reference).
            At::Missing => seq.error(|| {
                DescribeStacksError::generic(ErrorMetadata::builder().code("ValidationError").message("Stack with id vectordb does not exist").build())
            }),
            At::Is(status, protected) => seq.output(move || DescribeStacksOutput::builder().stacks(stack(status, protected)).build()),
        };
    }
    seq.repeatedly().build()
}

fn no_events() -> Rule {
    mock!(aws_sdk_cloudformation::Client::describe_stack_events).then_output(|| DescribeStackEventsOutput::builder().build())
}

fn events_of_deleted_stack() -> Rule {
    mock!(aws_sdk_cloudformation::Client::describe_stack_events)
        .then_error(|| DescribeStackEventsError::generic(ErrorMetadata::builder().code("ValidationError").message("Stack [vectordb] does not exist").build()))
}

fn create_change_set() -> Rule {
    mock!(aws_sdk_cloudformation::Client::create_change_set)
        .match_requests(|r| r.stack_name() == Some(STACK))
        .then_output(|| CreateChangeSetOutput::builder().id(CS_ID).stack_id(STACK_ID).build())
}

fn change(action: ChangeAction, logical: &str, kind: &str, replacement: Option<Replacement>) -> aws_sdk_cloudformation::types::Change {
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

fn change_set_ready(changes: Vec<aws_sdk_cloudformation::types::Change>) -> Rule {
    mock!(aws_sdk_cloudformation::Client::describe_change_set).match_requests(|r| r.change_set_name() == Some(CS_ID)).then_output(move || {
        DescribeChangeSetOutput::builder()
            .change_set_id(CS_ID)
            .stack_id(STACK_ID)
            .status(ChangeSetStatus::CreateComplete)
            .set_changes(Some(changes.clone()))
            .build()
    })
}

fn delete_change_set() -> Rule {
    mock!(aws_sdk_cloudformation::Client::delete_change_set)
        .match_requests(|r| r.change_set_name() == Some(CS_ID))
        .then_output(|| DeleteChangeSetOutput::builder().build())
}

/// SetStackPolicy for STACK, keeping each body sent; answers nothing, as the API does
/// (SetStackPolicy, API reference: no response elements).
fn set_stack_policy(sent: Arc<Mutex<Vec<String>>>, after: Option<Rule>) -> Rule {
    mock!(aws_sdk_cloudformation::Client::set_stack_policy)
        .match_requests(move |r| {
            let ok = r.stack_name() == Some(STACK) && after.as_ref().is_none_or(|a| a.num_calls() > 0);
            if ok {
                sent.lock().unwrap().push(r.stack_policy_body().unwrap_or_default().to_string());
            }
            ok
        })
        .then_output(|| SetStackPolicyOutput::builder().build())
}

/// UpdateTerminationProtection for STACK with exactly `enable`; the answer carries the StackId
/// (UpdateTerminationProtection, API reference: response element StackId).
fn update_termination_protection(enable: bool, after: Option<Rule>) -> Rule {
    mock!(aws_sdk_cloudformation::Client::update_termination_protection)
        .match_requests(move |r| {
            r.stack_name() == Some(STACK) && r.enable_termination_protection() == Some(enable) && after.as_ref().is_none_or(|a| a.num_calls() > 0)
        })
        .then_output(|| UpdateTerminationProtectionOutput::builder().stack_id(STACK_ID).build())
}

/// ExecuteChangeSet of CS_ID with DisableRollback exactly `disable` (None: not sent), only once
/// `after` was called.
fn execute_change_set(disable: Option<bool>, after: Option<Rule>) -> Rule {
    mock!(aws_sdk_cloudformation::Client::execute_change_set)
        .match_requests(move |r| r.change_set_name() == Some(CS_ID) && r.disable_rollback() == disable && after.as_ref().is_none_or(|a| a.num_calls() > 0))
        .then_output(|| ExecuteChangeSetOutput::builder().build())
}

struct Answer {
    yes: bool,
    asked: Mutex<Vec<String>>,
}

impl Answer {
    fn new(yes: bool) -> Self {
        Self { yes, asked: Mutex::new(Vec::new()) }
    }
}

impl Confirmer for Answer {
    fn confirm<'a>(&'a self, question: &'a str) -> Pin<Box<dyn Future<Output = imgbuild::Result<bool>> + Send + 'a>> {
        self.asked.lock().unwrap().push(question.to_string());
        let yes = self.yes;
        Box::pin(async move { Ok(yes) })
    }
}

/// The data policy as CloudFormation reads it: updates allowed, except Update:Replace and
/// Update:Delete on the file system and backup vault types. Once a stack has a policy, anything
/// it does not allow is denied ("Prevent updates to stack resources", CloudFormation User Guide),
/// so the Allow statement must be there, or every later update fails.
#[test]
fn the_data_policy_denies_replace_and_delete_of_the_data_and_allows_the_rest() {
    let p: serde_json::Value = serde_json::from_str(&protect::stack_policy(true)).unwrap();
    let st = p["Statement"].as_array().unwrap();
    assert_eq!(st.len(), 2);
    assert_eq!(st[0]["Effect"], "Deny");
    assert_eq!(st[0]["Principal"], "*");
    assert_eq!(st[0]["Action"], serde_json::json!(["Update:Replace", "Update:Delete"]));
    assert_eq!(st[0]["Resource"], "*");
    assert_eq!(st[0]["Condition"]["StringEquals"]["ResourceType"], serde_json::json!(["AWS::EFS::FileSystem", "AWS::Backup::BackupVault"]));
    assert_eq!(st[1], serde_json::json!({ "Effect": "Allow", "Principal": "*", "Action": "Update:*", "Resource": "*" }));
    // protect_data: false still needs a policy that allows everything: a stack policy can be
    // replaced but never removed.
    let open: serde_json::Value = serde_json::from_str(&protect::stack_policy(false)).unwrap();
    assert_eq!(open["Statement"], serde_json::json!([{ "Effect": "Allow", "Principal": "*", "Action": "Update:*", "Resource": "*" }]));
}

/// A stack policy guards only updates, and only once it is set ("Prevent updates to stack
/// resources"): it must be on the stack before ExecuteChangeSet. Termination protection is off
/// by default on a stack ("Protect CloudFormation stacks from being deleted"), so deploy turns it
/// on (UpdateTerminationProtection).
#[tokio::test]
async fn deploy_update_sets_the_data_policy_before_executing_and_turns_termination_protection_on() {
    let ds = describe_stacks(&[At::Is("UPDATE_COMPLETE", false)]);
    let create = create_change_set();
    let dcs = change_set_ready(vec![change(ChangeAction::Modify, "LaunchTemplate", "AWS::EC2::LaunchTemplate", Some(Replacement::False))]);
    let sent = Arc::new(Mutex::new(Vec::new()));
    let policy = set_stack_policy(sent.clone(), None);
    let exec = execute_change_set(None, Some(policy.clone()));
    let utp = update_termination_protection(true, Some(exec.clone()));
    let events = no_events();
    let c = clients(&[&ds, &create, &dcs, &policy, &exec, &utp, &events]);

    let out = changeset::run_protected(&c, &plan(), &defaults(false), &quiet(), &Cleanup::default(), &Answer::new(false)).await.unwrap();

    assert!(out.executed);
    assert_eq!(exec.num_calls(), 1, "executed only after the policy was set");
    assert_eq!(*sent.lock().unwrap(), vec![protect::stack_policy(true)]);
    assert_eq!(utp.num_calls(), 1);
    assert!(out.notices.iter().any(|n| n.contains("termination protection turned on")), "{:?}", out.notices);
}

/// A stack that already has termination protection is left alone; a stack policy set again is
/// harmless (SetStackPolicy replaces the one there).
#[tokio::test]
async fn deploy_of_a_protected_stack_does_not_touch_termination_protection() {
    let ds = describe_stacks(&[At::Is("UPDATE_COMPLETE", true)]);
    let create = create_change_set();
    let dcs = change_set_ready(vec![change(ChangeAction::Modify, "LaunchTemplate", "AWS::EC2::LaunchTemplate", Some(Replacement::False))]);
    let sent = Arc::new(Mutex::new(Vec::new()));
    let policy = set_stack_policy(sent.clone(), None);
    let exec = execute_change_set(None, Some(policy.clone()));
    let events = no_events();
    // No UpdateTerminationProtection rule: a call fails the test.
    let c = clients(&[&ds, &create, &dcs, &policy, &exec, &events]);

    let out = changeset::run_protected(&c, &plan(), &defaults(false), &quiet(), &Cleanup::default(), &Answer::new(false)).await.unwrap();

    assert!(out.executed);
    assert_eq!(sent.lock().unwrap().len(), 1);
}

/// A new stack sits in REVIEW_IN_PROGRESS until its change set runs, and a failed run deletes it;
/// so its policy and termination protection come once it is CREATE_COMPLETE.
#[tokio::test]
async fn deploy_create_protects_the_stack_once_it_exists() {
    let ds = describe_stacks(&[At::Missing, At::Is("CREATE_IN_PROGRESS", false), At::Is("CREATE_COMPLETE", false)]);
    let create = create_change_set();
    let dcs = change_set_ready(vec![change(ChangeAction::Add, "FileSystem", "AWS::EFS::FileSystem", None)]);
    let exec = execute_change_set(None, None);
    let sent = Arc::new(Mutex::new(Vec::new()));
    let policy = set_stack_policy(sent.clone(), Some(exec.clone()));
    let utp = update_termination_protection(true, Some(exec.clone()));
    let events = no_events();
    let c = clients(&[&ds, &create, &dcs, &policy, &exec, &utp, &events]);

    let out = changeset::run_protected(&c, &plan(), &defaults(false), &quiet(), &Cleanup::default(), &Answer::new(false)).await.unwrap();

    assert_eq!(out.status, "CREATE_COMPLETE");
    assert_eq!(*sent.lock().unwrap(), vec![protect::stack_policy(true)]);
    assert_eq!(utp.num_calls(), 1);
}

/// The policy would make CloudFormation fail the update mid-way and roll it back; deploy refuses
/// a diff that removes or replaces the file system before executing anything, and deletes its
/// change set.
#[tokio::test]
async fn deploy_refuses_a_change_set_that_deletes_the_file_system() {
    let ds = describe_stacks(&[At::Is("UPDATE_COMPLETE", true)]);
    let create = create_change_set();
    let dcs = change_set_ready(vec![
        change(ChangeAction::Remove, "FileSystem", "AWS::EFS::FileSystem", None),
        change(ChangeAction::Modify, "LaunchTemplate", "AWS::EC2::LaunchTemplate", Some(Replacement::False)),
    ]);
    let del_cs = delete_change_set();
    let c = clients(&[&ds, &create, &dcs, &del_cs]);

    let err = changeset::run_protected(&c, &plan(), &defaults(false), &quiet(), &Cleanup::default(), &Answer::new(true)).await.unwrap_err();

    assert!(matches!(&err, Error::Invalid(m) if m.contains("FileSystem (AWS::EFS::FileSystem)") && m.contains("stack.protect_data: false")), "{err:?}");
    assert_eq!(err.exit_code(), 2);
    assert_eq!(del_cs.num_calls(), 1);
}

/// With protect_data off, the same diff goes ahead under an allow-all policy.
#[tokio::test]
async fn deploy_without_data_protection_executes_the_removal_under_an_allow_all_policy() {
    let ds = describe_stacks(&[At::Is("UPDATE_COMPLETE", true)]);
    let create = create_change_set();
    let dcs = change_set_ready(vec![change(ChangeAction::Remove, "FileSystem", "AWS::EFS::FileSystem", None)]);
    let sent = Arc::new(Mutex::new(Vec::new()));
    let policy = set_stack_policy(sent.clone(), None);
    let exec = execute_change_set(None, Some(policy.clone()));
    let events = no_events();
    let c = clients(&[&ds, &create, &dcs, &policy, &exec, &events]);
    let protection = Protection { protect_data: Some(false), ..defaults(false) };

    let out = changeset::run_protected(&c, &plan(), &protection, &quiet(), &Cleanup::default(), &Answer::new(false)).await.unwrap();

    assert!(out.executed);
    assert_eq!(*sent.lock().unwrap(), vec![protect::stack_policy(false)]);
}

/// ExecuteChangeSet's DisableRollback keeps a failed stack in UPDATE_FAILED instead of rolling
/// back (ExecuteChangeSet, API reference: DisableRollback). The request must carry it.
#[tokio::test]
async fn deploy_with_disable_rollback_sends_it_and_reports_the_failed_stack() {
    let ds = describe_stacks(&[At::Is("UPDATE_COMPLETE", true), At::Is("UPDATE_IN_PROGRESS", true), At::Is("UPDATE_FAILED", true)]);
    let create = create_change_set();
    let dcs = change_set_ready(vec![change(ChangeAction::Modify, "LaunchTemplate", "AWS::EC2::LaunchTemplate", Some(Replacement::False))]);
    let sent = Arc::new(Mutex::new(Vec::new()));
    let policy = set_stack_policy(sent, None);
    let exec = execute_change_set(Some(true), None);
    let events = no_events();
    let c = clients(&[&ds, &create, &dcs, &policy, &exec, &events]);

    let err = changeset::run_protected(&c, &plan(), &defaults(true), &quiet(), &Cleanup::default(), &Answer::new(false)).await.unwrap_err();

    assert!(matches!(&err, Error::StackFailed { status, .. } if status == "UPDATE_FAILED"), "{err:?}");
    assert_eq!(exec.num_calls(), 1);
}

/// Without the flag, DisableRollback is not sent at all (CloudFormation's default: roll back).
#[tokio::test]
async fn deploy_without_disable_rollback_leaves_it_out_of_the_request() {
    let ds = describe_stacks(&[At::Is("UPDATE_COMPLETE", true)]);
    let create = create_change_set();
    let dcs = change_set_ready(vec![change(ChangeAction::Modify, "LaunchTemplate", "AWS::EC2::LaunchTemplate", Some(Replacement::False))]);
    let exec = execute_change_set(None, None);
    let events = no_events();
    let c = clients(&[&ds, &create, &dcs, &exec, &events]);

    let out = changeset::run(&c, &plan(), &quiet(), &Cleanup::default(), &Answer::new(false)).await.unwrap();

    assert!(out.executed);
    assert_eq!(exec.num_calls(), 1);
}

/// A stack left unchanged still gets the protection: stacks deployed before it existed.
#[tokio::test]
async fn deploy_with_no_changes_still_protects_the_stack() {
    let ds = describe_stacks(&[At::Is("UPDATE_COMPLETE", false)]);
    let create = create_change_set();
    let dcs = change_set_ready(vec![]);
    let template = mock!(aws_sdk_cloudformation::Client::get_template).then_output(|| GetTemplateOutput::builder().template_body(TEMPLATE).build());
    let del_cs = delete_change_set();
    let sent = Arc::new(Mutex::new(Vec::new()));
    let policy = set_stack_policy(sent.clone(), None);
    let utp = update_termination_protection(true, None);
    let c = clients(&[&ds, &create, &dcs, &template, &del_cs, &policy, &utp]);

    let out = changeset::run_protected(&c, &plan(), &defaults(false), &quiet(), &Cleanup::default(), &Answer::new(false)).await.unwrap();

    assert!(out.no_changes);
    assert_eq!(sent.lock().unwrap().len(), 1);
    assert_eq!(utp.num_calls(), 1);
}

/// "If a user attempts to delete a stack with termination protection enabled, the operation
/// fails and the stack remains unchanged" (UpdateTerminationProtection, API reference): destroy
/// turns it off first, and only then deletes.
#[tokio::test]
async fn destroy_turns_termination_protection_off_before_deleting() {
    let ds = describe_stacks(&[At::Is("UPDATE_COMPLETE", true), At::Missing]);
    let utp = update_termination_protection(false, None);
    let del = mock!(aws_sdk_cloudformation::Client::delete_stack)
        .match_requests({
            let utp = utp.clone();
            move |r| r.stack_name() == Some(STACK) && utp.num_calls() > 0
        })
        .then_output(|| DeleteStackOutput::builder().build());
    let events = events_of_deleted_stack();
    let mut c = clients(&[&ds, &utp, &del, &events]);
    // Destroy also looks for the file systems the stack retains (by their CloudFormation tags):
    // none here. DescribeFileSystems' documented empty answer (EFS API reference).
    let none = mock!(aws_sdk_efs::Client::describe_file_systems)
        .then_output(|| aws_sdk_efs::operation::describe_file_systems::DescribeFileSystemsOutput::builder().build());
    c.efs = mocked!(aws_sdk_efs, [none], RetryConfig::standard().with_initial_backoff(Duration::from_millis(1)));

    let d = imgbuild::stack::ops::destroy(&c, STACK, false, false, fast(), &quiet()).await.unwrap();

    assert!(d.existed);
    assert_eq!(utp.num_calls(), 1);
    assert_eq!(del.num_calls(), 1);
}

/// ListStackResources in its documented shape (aws-cli examples/cloudformation/
/// list-stack-resources.rst), with ResourceStatusReason as the API reference's
/// StackResourceSummary has it; two pages, to follow NextToken.
fn list_stack_resources() -> Rule {
    let summary = |logical: &str, kind: &str, status: &str, reason: Option<&str>| {
        StackResourceSummary::builder()
            .logical_resource_id(logical)
            .physical_resource_id(format!("{logical}-phys"))
            .resource_type(kind)
            .resource_status(ResourceStatus::from(status))
            .set_resource_status_reason(reason.map(String::from))
            .last_updated_timestamp(aws_smithy_types::DateTime::from_secs(1_700_000_000))
            .build()
    };
    let first = vec![
        summary("Vpc", "AWS::EC2::VPC", "UPDATE_COMPLETE", None),
        summary(
            "AutoScalingGroup",
            "AWS::AutoScaling::AutoScalingGroup",
            "UPDATE_FAILED",
            Some("Resource handler returned message: \"Failed to receive 1 resource signal(s) within the specified duration\""),
        ),
    ];
    let second = vec![summary("FileSystem", "AWS::EFS::FileSystem", "UPDATE_COMPLETE", None)];
    mock!(aws_sdk_cloudformation::Client::list_stack_resources)
        .match_requests(|r| r.stack_name() == Some(STACK))
        .sequence()
        .output(move || ListStackResourcesOutput::builder().set_stack_resource_summaries(Some(first.clone())).next_token("page2").build())
        .output(move || ListStackResourcesOutput::builder().set_stack_resource_summaries(Some(second.clone())).build())
        .repeatedly()
        .build()
}

/// ContinueUpdateRollback answers nothing (aws-cli examples/cloudformation/
/// continue-update-rollback.rst: "This command produces no output"); keeps ResourcesToSkip.
fn continue_update_rollback(sent: Arc<Mutex<Vec<Vec<String>>>>) -> Rule {
    mock!(aws_sdk_cloudformation::Client::continue_update_rollback)
        .match_requests(move |r| {
            sent.lock().unwrap().push(r.resources_to_skip().to_vec());
            r.stack_name() == Some(STACK)
        })
        .then_output(|| ContinueUpdateRollbackOutput::builder().build())
}

/// ResourcesToSkip takes only resources in UPDATE_FAILED (ContinueUpdateRollback, API
/// reference); skipping marks them rolled back without touching them, so each is named and
/// confirmed, and the request carries exactly those.
#[tokio::test]
async fn continue_rollback_skips_the_confirmed_failed_resource_and_waits_for_the_rollback() {
    let ds = describe_stacks(&[At::Is("UPDATE_ROLLBACK_FAILED", true), At::Is("UPDATE_ROLLBACK_IN_PROGRESS", true), At::Is("UPDATE_ROLLBACK_COMPLETE", true)]);
    let lsr = list_stack_resources();
    let sent = Arc::new(Mutex::new(Vec::new()));
    let cur = continue_update_rollback(sent.clone());
    let events = no_events();
    let c = clients(&[&ds, &lsr, &cur, &events]);
    let answer = Answer::new(true);

    let done = protect::continue_rollback(&c.cfn, STACK, &["AutoScalingGroup".to_string()], false, &answer, fast(), &quiet()).await.unwrap();

    assert_eq!(done.status, "UPDATE_ROLLBACK_COMPLETE");
    assert_eq!(done.failed.iter().map(|f| f.logical_id.as_str()).collect::<Vec<_>>(), ["AutoScalingGroup"]);
    assert_eq!(lsr.num_calls(), 2, "both pages read");
    assert_eq!(*sent.lock().unwrap(), vec![vec!["AutoScalingGroup".to_string()]]);
    let asked = answer.asked.lock().unwrap().clone();
    assert_eq!(asked.len(), 1);
    assert!(asked[0].contains("skipping AutoScalingGroup"), "{asked:?}");
}

#[tokio::test]
async fn continue_rollback_refuses_to_skip_a_resource_that_did_not_fail() {
    let ds = describe_stacks(&[At::Is("UPDATE_ROLLBACK_FAILED", true)]);
    let lsr = list_stack_resources();
    let sent = Arc::new(Mutex::new(Vec::new()));
    let cur = continue_update_rollback(sent.clone());
    let c = clients(&[&ds, &lsr, &cur]);
    let answer = Answer::new(true);

    let err = protect::continue_rollback(&c.cfn, STACK, &["FileSystem".to_string()], true, &answer, fast(), &quiet()).await.unwrap_err();

    assert!(matches!(&err, Error::Invalid(m) if m.contains("--skip FileSystem") && m.contains("AutoScalingGroup")), "{err:?}");
    assert_eq!(cur.num_calls(), 0);
    assert!(answer.asked.lock().unwrap().is_empty());
}

#[tokio::test]
async fn continue_rollback_declined_leaves_the_stack_alone() {
    let ds = describe_stacks(&[At::Is("UPDATE_ROLLBACK_FAILED", true)]);
    let lsr = list_stack_resources();
    let sent = Arc::new(Mutex::new(Vec::new()));
    let cur = continue_update_rollback(sent);
    let c = clients(&[&ds, &lsr, &cur]);

    let err = protect::continue_rollback(&c.cfn, STACK, &[], false, &Answer::new(false), fast(), &quiet()).await.unwrap_err();

    assert!(matches!(&err, Error::Invalid(m) if m.contains("not confirmed")), "{err:?}");
    assert_eq!(cur.num_calls(), 0);
}

#[tokio::test]
async fn continue_rollback_refuses_a_stack_that_is_not_update_rollback_failed() {
    let ds = describe_stacks(&[At::Is("UPDATE_COMPLETE", true)]);
    let c = clients(&[&ds]);

    let err = protect::continue_rollback(&c.cfn, STACK, &[], true, &Answer::new(true), fast(), &quiet()).await.unwrap_err();

    assert!(matches!(&err, Error::Invalid(m) if m.contains("UPDATE_COMPLETE") && m.contains("no rollback to continue")), "{err:?}");
}

/// A stack in UPDATE_ROLLBACK_FAILED takes no update until the rollback is continued
/// (ContinueUpdateRollback, API reference); deploy says which command does that.
#[tokio::test]
async fn deploy_on_update_rollback_failed_points_at_continue_rollback() {
    let ds = describe_stacks(&[At::Is("UPDATE_ROLLBACK_FAILED", true)]);
    let c = clients(&[&ds]);

    let err = changeset::run_protected(&c, &plan(), &defaults(false), &quiet(), &Cleanup::default(), &Answer::new(true)).await.unwrap_err();

    assert!(matches!(&err, Error::Invalid(m) if m.contains("imgbuild continue-rollback")), "{err:?}");
}

/// The stack operation already succeeded when termination protection is set; a refusal then
/// (AccessDenied, a common error of every CloudFormation action: "Common Errors", API reference)
/// leaves a deployed stack, so deploy succeeds and says how to set it by hand.
#[tokio::test]
async fn a_refused_termination_protection_is_a_warning_after_a_successful_update() {
    use aws_sdk_cloudformation::operation::update_termination_protection::UpdateTerminationProtectionError;
    let ds = describe_stacks(&[At::Is("UPDATE_COMPLETE", false)]);
    let create = create_change_set();
    let dcs = change_set_ready(vec![change(ChangeAction::Modify, "LaunchTemplate", "AWS::EC2::LaunchTemplate", Some(Replacement::False))]);
    let sent = Arc::new(Mutex::new(Vec::new()));
    let policy = set_stack_policy(sent, None);
    let exec = execute_change_set(None, None);
    let utp = mock!(aws_sdk_cloudformation::Client::update_termination_protection).then_error(|| {
        UpdateTerminationProtectionError::generic(
            ErrorMetadata::builder()
                .code("AccessDenied")
                .message("User: arn:aws:iam::123456789012:user/deployer is not authorized to perform: cloudformation:UpdateTerminationProtection")
                .build(),
        )
    });
    let events = no_events();
    let c = clients(&[&ds, &create, &dcs, &policy, &exec, &utp, &events]);

    let out = changeset::run_protected(&c, &plan(), &defaults(false), &quiet(), &Cleanup::default(), &Answer::new(false)).await.unwrap();

    assert!(out.executed);
    assert!(
        out.notices
            .iter()
            .any(|n| n.contains("AccessDenied") && n.contains("update-termination-protection --enable-termination-protection --stack-name vectordb")),
        "{:?}",
        out.notices
    );
}

// ---------------------------------------------------------------------------------------------
// Drift (item 5)

/// DetectStackDrift answers the detection id (aws-cli examples/cloudformation/detect-stack-drift.rst).
fn detect_stack_drift() -> Rule {
    use aws_sdk_cloudformation::operation::detect_stack_drift::DetectStackDriftOutput;
    mock!(aws_sdk_cloudformation::Client::detect_stack_drift)
        .match_requests(|r| r.stack_name() == Some(STACK))
        .then_output(|| DetectStackDriftOutput::builder().stack_drift_detection_id("1a229160-e4d9-xmpl-ab67-0a4f93df83d4").build())
}

/// DescribeStackDriftDetectionStatus: in progress `busy` times, then `end` with DRIFTED
/// (aws-cli examples/cloudformation/describe-stack-drift-detection-status.rst).
fn detection_status(busy: usize, end: Option<(&'static str, Option<&'static str>)>) -> Rule {
    use aws_sdk_cloudformation::operation::describe_stack_drift_detection_status::DescribeStackDriftDetectionStatusOutput;
    use aws_sdk_cloudformation::types::{StackDriftDetectionStatus, StackDriftStatus};
    let answer = |detection: &str, reason: Option<&str>| {
        DescribeStackDriftDetectionStatusOutput::builder()
            .stack_id(STACK_ID)
            .stack_drift_detection_id("1a229160-e4d9-xmpl-ab67-0a4f93df83d4")
            .stack_drift_status(StackDriftStatus::Drifted)
            .detection_status(StackDriftDetectionStatus::from(detection))
            .set_detection_status_reason(reason.map(String::from))
            .drifted_stack_resource_count(2)
            .timestamp(aws_smithy_types::DateTime::from_secs(1_700_000_000))
            .build()
    };
    let mut seq = mock!(aws_sdk_cloudformation::Client::describe_stack_drift_detection_status)
        .match_requests(|r| r.stack_drift_detection_id() == Some("1a229160-e4d9-xmpl-ab67-0a4f93df83d4"))
        .sequence();
    for _ in 0..busy {
        seq = seq.output(move || answer("DETECTION_IN_PROGRESS", None));
    }
    if let Some((detection, reason)) = end {
        seq = seq.output(move || answer(detection, reason));
    }
    seq.repeatedly().build()
}

/// DescribeStackResourceDrifts, asked only for MODIFIED and DELETED, in two pages
/// (aws-cli examples/cloudformation/describe-stack-resource-drifts.rst).
fn resource_drifts() -> Rule {
    use aws_sdk_cloudformation::operation::describe_stack_resource_drifts::DescribeStackResourceDriftsOutput;
    use aws_sdk_cloudformation::types::{DifferenceType, PropertyDifference, StackResourceDrift, StackResourceDriftStatus};
    let drift = |logical: &str, kind: &str, path: &str, expected: &str, actual: &str| {
        StackResourceDrift::builder()
            .stack_id(STACK_ID)
            .logical_resource_id(logical)
            .physical_resource_id(format!("{logical}-phys"))
            .resource_type(kind)
            .stack_resource_drift_status(StackResourceDriftStatus::Modified)
            .property_differences(
                PropertyDifference::builder()
                    .property_path(path)
                    .expected_value(expected)
                    .actual_value(actual)
                    .difference_type(DifferenceType::NotEqual)
                    .build(),
            )
            .timestamp(aws_smithy_types::DateTime::from_secs(1_700_000_000))
            .build()
    };
    let first = vec![drift("LaunchTemplate", "AWS::EC2::LaunchTemplate", "/LaunchTemplateData/InstanceType", "t3a.small", "t3a.medium")];
    let second = vec![drift("ServiceSecurityGroup", "AWS::EC2::SecurityGroup", "/SecurityGroupIngress/0/FromPort", "8000", "22")];
    mock!(aws_sdk_cloudformation::Client::describe_stack_resource_drifts)
        .match_requests(|r| {
            r.stack_name() == Some(STACK) && r.stack_resource_drift_status_filters() == [StackResourceDriftStatus::Modified, StackResourceDriftStatus::Deleted]
        })
        .sequence()
        .output(move || DescribeStackResourceDriftsOutput::builder().set_stack_resource_drifts(Some(first.clone())).next_token("page2").build())
        .output(move || DescribeStackResourceDriftsOutput::builder().set_stack_resource_drifts(Some(second.clone())).build())
        .repeatedly()
        .build()
}

fn with_drift_check() -> Protection {
    Protection { drift_check: true, ..defaults(false) }
}

/// An update puts the template's values back on every resource it modifies, undoing changes
/// made by hand; drift detection ("Detect unmanaged configuration changes to stacks and
/// resources", CloudFormation User Guide) finds them. Deploy names the drifted resources this
/// change set touches, with the property changed, before asking; the drifted resource it leaves
/// alone is not named.
#[tokio::test]
async fn deploy_update_warns_about_drifted_resources_the_change_set_overwrites() {
    let ds = describe_stacks(&[At::Is("UPDATE_COMPLETE", true)]);
    let create = create_change_set();
    let dcs = change_set_ready(vec![
        change(ChangeAction::Modify, "LaunchTemplate", "AWS::EC2::LaunchTemplate", Some(Replacement::False)),
        change(ChangeAction::Add, "ApiDeployment", "AWS::ApiGateway::Deployment", None),
    ]);
    let detect = detect_stack_drift();
    let status = detection_status(2, Some(("DETECTION_COMPLETE", None)));
    let drifts = resource_drifts();
    let sent = Arc::new(Mutex::new(Vec::new()));
    let policy = set_stack_policy(sent, None);
    let exec = execute_change_set(None, Some(drifts.clone()));
    let events = no_events();
    let c = clients(&[&ds, &create, &dcs, &detect, &status, &drifts, &policy, &exec, &events]);

    let out = changeset::run_protected(&c, &plan(), &with_drift_check(), &quiet(), &Cleanup::default(), &Answer::new(false)).await.unwrap();

    assert!(out.executed);
    assert_eq!(status.num_calls(), 3, "polled until the detection completed");
    assert_eq!(drifts.num_calls(), 2, "both pages read");
    let warned: Vec<&String> = out.notices.iter().filter(|n| n.contains("drifted")).collect();
    assert_eq!(warned.len(), 1, "{:?}", out.notices);
    assert!(warned[0].contains("LaunchTemplate (AWS::EC2::LaunchTemplate) MODIFIED: /LaunchTemplateData/InstanceType t3a.small -> t3a.medium"), "{warned:?}");
}

/// The check is advisory: a refused detection (AccessDenied, "Common Errors") is said and the
/// deploy goes on.
#[tokio::test]
async fn a_refused_drift_detection_does_not_block_the_deploy() {
    use aws_sdk_cloudformation::operation::detect_stack_drift::DetectStackDriftError;
    let ds = describe_stacks(&[At::Is("UPDATE_COMPLETE", true)]);
    let create = create_change_set();
    let dcs = change_set_ready(vec![change(ChangeAction::Modify, "LaunchTemplate", "AWS::EC2::LaunchTemplate", Some(Replacement::False))]);
    let detect = mock!(aws_sdk_cloudformation::Client::detect_stack_drift).then_error(|| {
        DetectStackDriftError::generic(
            ErrorMetadata::builder().code("AccessDenied").message("not authorized to perform: cloudformation:DetectStackDrift").build(),
        )
    });
    let sent = Arc::new(Mutex::new(Vec::new()));
    let policy = set_stack_policy(sent, None);
    let exec = execute_change_set(None, None);
    let events = no_events();
    let c = clients(&[&ds, &create, &dcs, &detect, &policy, &exec, &events]);

    let out = changeset::run_protected(&c, &plan(), &with_drift_check(), &quiet(), &Cleanup::default(), &Answer::new(false)).await.unwrap();

    assert!(out.executed);
    assert!(out.notices.iter().any(|n| n.starts_with("drift check skipped") && n.contains("AccessDenied")), "{:?}", out.notices);
}

/// A new stack has nothing to drift: no detection is started (a call would fail the test).
#[tokio::test]
async fn deploy_create_runs_no_drift_detection() {
    let ds = describe_stacks(&[At::Missing, At::Is("CREATE_COMPLETE", true)]);
    let create = create_change_set();
    let dcs = change_set_ready(vec![change(ChangeAction::Add, "Vpc", "AWS::EC2::VPC", None)]);
    let exec = execute_change_set(None, None);
    let sent = Arc::new(Mutex::new(Vec::new()));
    let policy = set_stack_policy(sent, None);
    let events = no_events();
    let c = clients(&[&ds, &create, &dcs, &exec, &policy, &events]);

    let out = changeset::run_protected(&c, &plan(), &with_drift_check(), &quiet(), &Cleanup::default(), &Answer::new(false)).await.unwrap();

    assert_eq!(out.status, "CREATE_COMPLETE");
}

/// `status --drift`: every drifted resource with its differences; a detection that could not
/// check every resource ends DETECTION_FAILED with a reason, and its results are still shown.
#[tokio::test]
async fn status_drift_reports_every_drifted_resource_and_a_partial_detection() {
    let detect = detect_stack_drift();
    let status = detection_status(0, Some(("DETECTION_FAILED", Some("Failed to detect drift on resource [ApiGatewayAccount]"))));
    let drifts = resource_drifts();
    let c = clients(&[&detect, &status, &drifts]);

    let d = imgbuild::stack::drift::detect(&c.cfn, STACK, fast(), &quiet()).await.unwrap();

    assert_eq!(d.status, "DRIFTED");
    assert_eq!(d.detection, "DETECTION_FAILED");
    assert_eq!(d.reason.as_deref(), Some("Failed to detect drift on resource [ApiGatewayAccount]"));
    assert_eq!(d.drifted.iter().map(|r| r.logical_id.as_str()).collect::<Vec<_>>(), ["LaunchTemplate", "ServiceSecurityGroup"]);
    assert_eq!(d.drifted[1].differences[0].path, "/SecurityGroupIngress/0/FromPort");
    assert_eq!(d.drifted[1].differences[0].actual.as_deref(), Some("22"));
}

#[tokio::test]
async fn drift_detection_that_never_finishes_is_a_bounded_wait() {
    let detect = detect_stack_drift();
    let status = detection_status(1, None);
    let c = clients(&[&detect, &status]);
    let waits = Waits { timeout: Duration::from_millis(50), poll: Duration::from_millis(5) };

    let err = imgbuild::stack::drift::detect(&c.cfn, STACK, waits, &quiet()).await.unwrap_err();

    assert!(matches!(&err, Error::Timeout { what, .. } if what.contains("drift detection")), "{err:?}");
}

/// What `--disable-rollback` leaves is meant to be deployed again once fixed: CloudFormation
/// takes a change set for a stack in UPDATE_FAILED or CREATE_FAILED and requires that update to
/// preserve what was provisioned ("Stack failure options", CloudFormation User Guide: "You can
/// initiate a change set for a stack with a status of CREATE_FAILED or UPDATE_FAILED"; "When you
/// update a stack that's in a FAILED state, you must select Preserve successfully provisioned
/// resources"). Deploy used to refuse it ("needs a person"), though it had said "deploy again".
#[tokio::test]
async fn deploy_updates_a_stack_left_failed_by_disable_rollback_and_keeps_preserving() {
    for failed in ["UPDATE_FAILED", "CREATE_FAILED"] {
        let ds = describe_stacks(&[At::Is(failed, true), At::Is("UPDATE_IN_PROGRESS", true), At::Is("UPDATE_COMPLETE", true)]);
        let create = mock!(aws_sdk_cloudformation::Client::create_change_set)
            .match_requests(|r| r.stack_name() == Some(STACK) && r.change_set_type() == Some(&ChangeSetType::Update))
            .then_output(|| CreateChangeSetOutput::builder().id(CS_ID).stack_id(STACK_ID).build());
        let dcs = change_set_ready(vec![change(ChangeAction::Modify, "LaunchTemplate", "AWS::EC2::LaunchTemplate", Some(Replacement::False))]);
        let policy = set_stack_policy(Arc::default(), None);
        let exec = execute_change_set(Some(true), None);
        let events = no_events();
        let c = clients(&[&ds, &create, &dcs, &policy, &exec, &events]);

        let out = changeset::run_protected(&c, &plan(), &defaults(false), &quiet(), &Cleanup::default(), &Answer::new(false)).await.unwrap();

        assert!(out.executed, "{failed}");
        assert_eq!(create.num_calls(), 1, "{failed}: an UPDATE change set");
        assert_eq!(exec.num_calls(), 1, "{failed}: executed with DisableRollback=true");
        assert!(out.notices.iter().any(|n| n.contains(failed) && n.contains("imgbuild continue-rollback")), "{:?}", out.notices);
    }
}

/// RollbackStack answers the StackId ("Stack failure options", CloudFormation User Guide, "Roll
/// back stack": `aws cloudformation rollback-stack` returns {"StackId": ...}); keeps what was sent.
fn rollback_stack(sent: Arc<Mutex<Vec<Option<bool>>>>) -> Rule {
    mock!(aws_sdk_cloudformation::Client::rollback_stack)
        .match_requests(move |r| {
            sent.lock().unwrap().push(r.retain_except_on_create());
            r.stack_name() == Some(STACK)
        })
        .then_output(|| aws_sdk_cloudformation::operation::rollback_stack::RollbackStackOutput::builder().stack_id(STACK_ID).build())
}

/// The way back from CREATE_FAILED / UPDATE_FAILED is RollbackStack ("Rolls back the specified
/// stack to the last known stable state from CREATE_FAILED or UPDATE_FAILED stack statuses", API
/// reference), asked and confirmed, with RetainExceptOnCreate sent false: true deletes newly
/// created resources even under a Retain policy, which could take a new file system with it.
/// `continue-rollback` used to refuse these stacks and point at the AWS CLI.
#[tokio::test]
async fn continue_rollback_rolls_back_a_stack_left_failed_by_disable_rollback() {
    for (failed, middle, end) in
        [("UPDATE_FAILED", "UPDATE_ROLLBACK_IN_PROGRESS", "UPDATE_ROLLBACK_COMPLETE"), ("CREATE_FAILED", "ROLLBACK_IN_PROGRESS", "ROLLBACK_COMPLETE")]
    {
        let ds = describe_stacks(&[At::Is(failed, true), At::Is(middle, true), At::Is(end, true)]);
        let sent = Arc::new(Mutex::new(Vec::new()));
        let rb = rollback_stack(sent.clone());
        let events = no_events();
        let c = clients(&[&ds, &rb, &events]);
        let answer = Answer::new(true);

        let done = protect::continue_rollback(&c.cfn, STACK, &[], false, &answer, fast(), &quiet()).await.unwrap();

        assert_eq!(done.status, end);
        assert_eq!(*sent.lock().unwrap(), vec![Some(false)], "{failed}: RetainExceptOnCreate=false, explicitly");
        let asked = answer.asked.lock().unwrap().clone();
        assert!(asked.len() == 1 && asked[0].contains(failed), "{asked:?}");
    }
    // From CREATE_FAILED the API reference says the stack may be deleted: gone is the end asked for too.
    let ds = describe_stacks(&[At::Is("CREATE_FAILED", true), At::Is("ROLLBACK_IN_PROGRESS", true), At::Missing]);
    let rb = rollback_stack(Arc::default());
    let events = events_of_deleted_stack();
    let c = clients(&[&ds, &rb, &events]);
    let done = protect::continue_rollback(&c.cfn, STACK, &[], true, &Answer::new(true), fast(), &quiet()).await.unwrap();
    assert_eq!(done.status, "DELETE_COMPLETE");
    // --skip means nothing to RollbackStack: refused before anything is sent.
    let ds = describe_stacks(&[At::Is("UPDATE_FAILED", true)]);
    let sent = Arc::new(Mutex::new(Vec::new()));
    let rb = rollback_stack(sent.clone());
    let c = clients(&[&ds, &rb]);
    let err = protect::continue_rollback(&c.cfn, STACK, &["AutoScalingGroup".to_string()], true, &Answer::new(true), fast(), &quiet()).await.unwrap_err();
    assert!(matches!(&err, Error::Invalid(m) if m.contains("--skip") && m.contains("UPDATE_FAILED")), "{err:?}");
    assert_eq!(rb.num_calls(), 0);
}
