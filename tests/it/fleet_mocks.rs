//! `imgbuild fleet` where moto cannot go, with scripted answers (aws-smithy-mocks): service-managed
//! targets (organizational units), an operation that ends beyond its failure tolerance (exit 3),
//! partial success, sharing the image across accounts, drift detection, and the planning test at
//! scale (200 accounts x 4 regions). Every answer's shape follows the CloudFormation API Reference
//! (the page named next to it) or an aws-cli example.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_smithy_mocks::{Rule, mock};
use aws_smithy_types::error::ErrorMetadata;
use aws_smithy_types::retry::RetryConfig;

use aws_sdk_cloudformation::operation::create_stack_instances::{CreateStackInstancesInput, CreateStackInstancesOutput};
use aws_sdk_cloudformation::operation::create_stack_set::{CreateStackSetInput, CreateStackSetOutput};
use aws_sdk_cloudformation::operation::describe_stack_instance::DescribeStackInstanceOutput;
use aws_sdk_cloudformation::operation::describe_stack_set::{DescribeStackSetError, DescribeStackSetOutput};
use aws_sdk_cloudformation::operation::describe_stack_set_operation::DescribeStackSetOperationOutput;
use aws_sdk_cloudformation::operation::detect_stack_set_drift::{DetectStackSetDriftInput, DetectStackSetDriftOutput};
use aws_sdk_cloudformation::operation::list_stack_instances::ListStackInstancesOutput;
use aws_sdk_cloudformation::operation::list_stack_set_operation_results::ListStackSetOperationResultsOutput;
use aws_sdk_cloudformation::operation::list_stack_set_operations::ListStackSetOperationsOutput;
use aws_sdk_cloudformation::operation::update_stack_instances::{UpdateStackInstancesInput, UpdateStackInstancesOutput};
use aws_sdk_cloudformation::types::{
    PermissionModels, StackDriftStatus, StackInstanceStatus, StackInstanceSummary, StackSet, StackSetDriftDetectionDetails, StackSetDriftStatus,
    StackSetOperation, StackSetOperationAction, StackSetOperationResultStatus, StackSetOperationResultSummary, StackSetOperationStatus,
    StackSetOperationStatusDetails, StackSetOperationSummary, StackSetStatus,
};
use aws_sdk_ec2::operation::describe_images::DescribeImagesOutput;
use aws_sdk_ec2::operation::describe_snapshots::DescribeSnapshotsOutput;
use aws_sdk_ec2::operation::modify_image_attribute::{ModifyImageAttributeInput, ModifyImageAttributeOutput};
use aws_sdk_ec2::operation::modify_snapshot_attribute::{ModifySnapshotAttributeInput, ModifySnapshotAttributeOutput};
use aws_sdk_ec2::types::{BlockDeviceMapping, EbsBlockDevice, Image, Snapshot};
use aws_sdk_ssm::operation::get_parameter::GetParameterOutput;

use aws_sdk_kms::operation::create_grant::{CreateGrantInput, CreateGrantOutput};
use aws_sdk_kms::operation::describe_key::DescribeKeyOutput;
use aws_sdk_kms::operation::list_grants::ListGrantsOutput;
use aws_sdk_kms::operation::revoke_grant::{RevokeGrantInput, RevokeGrantOutput};
use aws_sdk_kms::types::{GrantListEntry, KeyManagerType, KeyMetadata};
use aws_sdk_sts::operation::assume_role::{AssumeRoleError, AssumeRoleInput, AssumeRoleOutput};
use aws_sdk_sts::types::{AssumedRoleUser, Credentials as StsCredentials};

use imgbuild::Error;
use imgbuild::aws::{Clients, KmsAs};
use imgbuild::cli::{FleetDeployArgs, FleetDestroyArgs, FleetStatusArgs, FleetTargetArgs, ToolArgs};
use imgbuild::config::Context;
use imgbuild::stack::changeset::Confirmer;

type Seen<T> = Arc<Mutex<Vec<T>>>;

macro_rules! capturing {
    ($rule:expr, $seen:expr) => {{
        let s = $seen.clone();
        $rule.match_requests(move |r| {
            s.lock().unwrap().push(r.clone());
            true
        })
    }};
}

const SET: &str = "vectordb";
const OWNER: &str = "111111111111";
const OU: &str = "ou-ab12-cd34ef56";
const OU_ARN: &str = "arn:aws:organizations::111111111111:ou/o-abcd1234ef/ou-ab12-cd34ef56";
const KEY: &str = "arn:aws:kms:us-east-1:111111111111:key/1234abcd-12ab-34cd-56ef-1234567890ab";
/// A multi-region key: its replica in each region has the same id (a fleet of several regions
/// needs a key in each: KMS keys are regional).
const MRK: &str = "arn:aws:kms:us-east-1:111111111111:key/mrk-1234abcd12ab34cd56ef1234567890ab";
const AMI: &str = "ami-0123456789abcdef0";
const SNAPSHOT: &str = "snap-0123456789abcdef0";

fn clients(cfn: &[&Rule], ec2: &[&Rule], ssm: &[&Rule]) -> Clients {
    let grants: Seen<CreateGrantInput> = Default::default();
    clients_kms(cfn, ec2, ssm, &[&describe_key(), &list_grants(vec![]), &create_grant(&grants)])
}

fn clients_kms(cfn: &[&Rule], ec2: &[&Rule], ssm: &[&Rule], kms: &[&Rule]) -> Clients {
    let own = |rules: &[&Rule]| rules.iter().map(|r| (*r).clone()).collect::<Vec<Rule>>();
    let retry = RetryConfig::standard().with_initial_backoff(Duration::from_millis(1));
    let none: Vec<Rule> = Vec::new();
    Clients {
        cfn: mocked!(aws_sdk_cloudformation, own(cfn), retry.clone()),
        ec2: mocked!(aws_sdk_ec2, own(ec2), retry.clone()),
        efs: mocked!(aws_sdk_efs, none, retry.clone()),
        ssm: mocked!(aws_sdk_ssm, own(ssm), retry.clone()),
        elb: mocked!(aws_sdk_elasticloadbalancingv2, none, retry.clone()),
        apigw: mocked!(aws_sdk_apigateway, none, retry.clone()),
        backup: mocked!(aws_sdk_backup, Vec::<Rule>::new(), retry.clone()),
        kms: mocked!(aws_sdk_kms, own(kms), retry),
        // Self-managed fleets make each grant from the target account (fleet.grants_from:
        // target-account, the default): any execution role is assumed, and each account's KMS
        // client answers CreateGrant. Tests that count or refuse replace these two.
        sts: mocked!(aws_sdk_sts, [assume_role(&Default::default())], RetryConfig::disabled()),
        kms_as: kms_as(&Default::default()),
        ..crate::mock_client::unscripted()
    }
}

/// STS AssumeRole answers AssumedRoleUser and Credentials (aws-cli examples/sts/assume-role.rst),
/// in the role's account; the access key names the account, so a test sees whose credentials a
/// client was built with. Expiration is an hour ahead (the example's 2016 date would hand the
/// SDK expired credentials).
fn assume_role(seen: &Seen<AssumeRoleInput>) -> Rule {
    capturing!(mock!(aws_sdk_sts::Client::assume_role), seen).then_compute_output(|r| {
        let role = r.role_arn().unwrap_or_default();
        let account = role.split(':').nth(4).unwrap_or_default().to_string();
        let (name, session) = (role.rsplit('/').next().unwrap_or_default(), r.role_session_name().unwrap_or_default());
        let in_an_hour = std::time::SystemTime::now() + Duration::from_secs(3600);
        AssumeRoleOutput::builder()
            .assumed_role_user(
                AssumedRoleUser::builder()
                    .assumed_role_id(format!("AROA3XFRBF535PLBIFPI4:{session}"))
                    .arn(format!("arn:aws:sts::{account}:assumed-role/{name}/{session}"))
                    .build()
                    .unwrap(),
            )
            .credentials(
                StsCredentials::builder()
                    .access_key_id(format!("ASIA{account}"))
                    .secret_access_key("9drTJvcXLB89EXAMPLELB8923FB892xMFI")
                    .session_token("AQoXdzELDDY//////////wEaoAK1wvxJY12r2IrDFT2IvAzTCn3zHoZ7YNtpiQLF0MqZye/qwjzP2iEXAMPLE")
                    .expiration(aws_smithy_types::DateTime::from(in_an_hour))
                    .build()
                    .unwrap(),
            )
            .build()
    })
}

/// What a grant-making KMS client saw: the account and region it was built for, the access key
/// of its credentials, and the CreateGrant request.
type MadeAs = Seen<(String, String, String, CreateGrantInput)>;

/// The KMS clients `fleet deploy` makes with an account's assumed credentials: each answers
/// CreateGrant (aws-cli examples/kms/create-grant.rst) and records who it was built for.
fn kms_as(made: &MadeAs) -> KmsAs {
    let made = made.clone();
    KmsAs::new(move |account, region, credentials| {
        let who = (account.to_string(), region.to_string(), credentials.access_key_id().to_string());
        let seen = made.clone();
        let rule = mock!(aws_sdk_kms::Client::create_grant)
            .match_requests(move |r| {
                seen.lock().unwrap().push((who.0.clone(), who.1.clone(), who.2.clone(), r.clone()));
                true
            })
            .then_output(|| {
                CreateGrantOutput::builder()
                    .grant_id("1a2b3c4d2f5e69f440bae30eaec9570bb1fb7358824f9ddfa1aa5a0dab1a59b2")
                    .grant_token("<grant token here>")
                    .build()
            });
        mocked!(aws_sdk_kms, [rule], RetryConfig::disabled())
    })
}

fn context(yaml: &str) -> (tempfile::TempDir, Context) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("imgbuild.yaml");
    // The table's prices unless a test scripts the Price List and says `prices: auto`.
    let prices = if yaml.contains("prices:") { "" } else { "prices: table\n" };
    std::fs::write(&path, format!("aws:\n  poll_interval_secs: 1\n{prices}{yaml}")).unwrap();
    let ctx = Context::load(Some(&path), Some("us-east-1"), None, None).unwrap_or_else(|e| panic!("{e}"));
    (dir, ctx)
}

fn quiet() -> imgbuild::ui::Ui {
    imgbuild::ui::Ui::new(imgbuild::cli::OutputFormat::Text, 0, true)
}

fn targets() -> FleetTargetArgs {
    FleetTargetArgs {
        accounts: vec![],
        organizational_units: vec![],
        regions: vec![],
        max_concurrent: None,
        failure_tolerance: None,
        parallel_regions: false,
        timeout: None,
    }
}

fn deploy_args(t: FleetTargetArgs) -> FleetDeployArgs {
    FleetDeployArgs { targets: t, template: None, yes: true, dry_run: false, no_execute: false, tools: ToolArgs { require_tools: false, no_tools: true } }
}

struct Never;
impl Confirmer for Never {
    fn confirm<'a>(&'a self, _: &'a str) -> std::pin::Pin<Box<dyn std::future::Future<Output = imgbuild::Result<bool>> + Send + 'a>> {
        panic!("--yes was given: nothing may be asked")
    }
}

fn never() -> std::future::Pending<()> {
    std::future::pending()
}

// ---------------------------------------------------------------------------------------------
// Answers

/// DescribeKey of the fleet's key: customer managed, with its ARN (KeyMetadata: AWSAccountId,
/// KeyId, Arn, KeyManager CUSTOMER; aws-cli examples/kms/describe-key.rst).
fn describe_key() -> Rule {
    mock!(aws_sdk_kms::Client::describe_key).then_output(|| {
        DescribeKeyOutput::builder()
            .key_metadata(
                KeyMetadata::builder()
                    .aws_account_id(OWNER)
                    .key_id("1234abcd-12ab-34cd-56ef-1234567890ab")
                    .arn(KEY)
                    .enabled(true)
                    .key_manager(KeyManagerType::Customer)
                    .build()
                    .unwrap(),
            )
            .build()
    })
}

/// The Auto Scaling service-linked role of `account`, the grantee of the User Guide's example.
fn slr(account: &str) -> String {
    format!("arn:aws:iam::{account}:role/aws-service-role/autoscaling.amazonaws.com/AWSServiceRoleForAutoScaling")
}

/// ListGrants on the key, one page (Truncated false): a grant this fleet made for each
/// (account, grant id), and one another service made (Grants[]: KeyId, GrantId, Name,
/// GranteePrincipal, IssuingAccount, Operations; aws-cli examples/kms/list-grants.rst).
fn list_grants(ours: Vec<(&'static str, &'static str)>) -> Rule {
    mock!(aws_sdk_kms::Client::list_grants).then_output(move || {
        let mut b = ListGrantsOutput::builder().truncated(false).grants(
            GrantListEntry::builder()
                .key_id(KEY)
                .grant_id("1667b97d27cf748cf05b487217dd4179526c949d14fb3903858e25193253fe59")
                .name("8276b9a6-6cf0-46f1-b2f0-7993a7f8c89a")
                .grantee_principal("dynamodb.us-east-1.amazonaws.com")
                .issuing_account(format!("arn:aws:iam::{OWNER}:root"))
                .build(),
        );
        for (account, id) in &ours {
            b = b.grants(
                GrantListEntry::builder()
                    .key_id(KEY)
                    .grant_id(*id)
                    .name(format!("imgbuild-{SET}-{account}"))
                    .grantee_principal(slr(account))
                    .issuing_account(format!("arn:aws:iam::{OWNER}:root"))
                    .build(),
            );
        }
        b.build()
    })
}

/// CreateGrant answers GrantId and GrantToken (aws-cli examples/kms/create-grant.rst).
fn create_grant(seen: &Seen<CreateGrantInput>) -> Rule {
    capturing!(mock!(aws_sdk_kms::Client::create_grant), seen).then_output(|| {
        CreateGrantOutput::builder().grant_id("1a2b3c4d2f5e69f440bae30eaec9570bb1fb7358824f9ddfa1aa5a0dab1a59b2").grant_token("<grant token here>").build()
    })
}

/// RevokeGrant "produces no output" (aws-cli examples/kms/revoke-grant.rst).
fn revoke_grant(seen: &Seen<RevokeGrantInput>) -> Rule {
    capturing!(mock!(aws_sdk_kms::Client::revoke_grant), seen).then_output(|| RevokeGrantOutput::builder().build())
}

/// GetParameter for the handoff parameter, in any region.
fn handoff() -> Rule {
    mock!(aws_sdk_ssm::Client::get_parameter).match_requests(|r| r.name() == Some("/imgbuild/vectordb/ami")).then_output(|| {
        GetParameterOutput::builder().parameter(aws_sdk_ssm::types::Parameter::builder().name("/imgbuild/vectordb/ami").value(AMI).build()).build()
    })
}

/// DescribeImages: the baked image, owned by OWNER, its root snapshot encrypted with `key`
/// (DescribeImages / DescribeSnapshots, Amazon EC2 API Reference: BlockDeviceMappings[].Ebs.SnapshotId,
/// Snapshot.Encrypted and KmsKeyId, the full key ARN).
fn image(key: &'static str) -> (Rule, Rule) {
    let images = mock!(aws_sdk_ec2::Client::describe_images).then_output(|| {
        DescribeImagesOutput::builder()
            .images(
                Image::builder()
                    .image_id(AMI)
                    .owner_id(OWNER)
                    .block_device_mappings(
                        BlockDeviceMapping::builder()
                            .device_name("/dev/xvda")
                            .ebs(EbsBlockDevice::builder().snapshot_id(SNAPSHOT).encrypted(true).build())
                            .build(),
                    )
                    .build(),
            )
            .build()
    });
    let snapshots = mock!(aws_sdk_ec2::Client::describe_snapshots).then_output(move || {
        DescribeSnapshotsOutput::builder().snapshots(Snapshot::builder().snapshot_id(SNAPSHOT).encrypted(true).kms_key_id(key).owner_id(OWNER).build()).build()
    });
    (images, snapshots)
}

/// DescribeStackSet of a set that does not exist: error code StackSetNotFoundException
/// (DescribeStackSet, CloudFormation API Reference, Errors).
fn no_set() -> Rule {
    mock!(aws_sdk_cloudformation::Client::describe_stack_set).then_error(|| {
        DescribeStackSetError::generic(ErrorMetadata::builder().code("StackSetNotFoundException").message(format!("StackSet {SET} not found")).build())
    })
}

/// CreateStackSet answers the StackSetId (aws-cli examples/cloudformation/create-stack-set.rst).
fn create_set(seen: &Seen<CreateStackSetInput>) -> Rule {
    capturing!(mock!(aws_sdk_cloudformation::Client::create_stack_set), seen)
        .then_output(|| CreateStackSetOutput::builder().stack_set_id(format!("{SET}:8d0f160b-d157-4a1b-a8e6-c0ce8e5d8cc1")).build())
}

/// CreateStackInstances / UpdateStackInstances answer the OperationId (aws-cli
/// examples/cloudformation/create-stack-instances.rst); it is the one the request named.
fn create_instances(seen: &Seen<CreateStackInstancesInput>) -> Rule {
    let s = seen.clone();
    capturing!(mock!(aws_sdk_cloudformation::Client::create_stack_instances), seen).then_output(move || {
        CreateStackInstancesOutput::builder().set_operation_id(s.lock().unwrap().last().and_then(|r| r.operation_id().map(String::from))).build()
    })
}

fn update_instances(seen: &Seen<UpdateStackInstancesInput>) -> Rule {
    let s = seen.clone();
    capturing!(mock!(aws_sdk_cloudformation::Client::update_stack_instances), seen).then_output(move || {
        UpdateStackInstancesOutput::builder().set_operation_id(s.lock().unwrap().last().and_then(|r| r.operation_id().map(String::from))).build()
    })
}

/// DescribeStackSetOperation answering `steps` in order, the last from then on
/// (StackSetOperation: Status RUNNING | SUCCEEDED | FAILED | STOPPING | STOPPED | QUEUED,
/// StatusReason, StatusDetails.FailedStackInstancesCount; DescribeStackSetOperation, API Reference).
fn operation(steps: Vec<(&'static str, StackSetOperationStatus, Option<&'static str>, i32)>) -> Rule {
    let mut seq = mock!(aws_sdk_cloudformation::Client::describe_stack_set_operation).sequence();
    for (action, status, reason, failed) in steps {
        seq = seq.output(move || {
            DescribeStackSetOperationOutput::builder()
                .stack_set_operation(
                    StackSetOperation::builder()
                        .operation_id("op")
                        .action(StackSetOperationAction::from(action))
                        .status(status.clone())
                        .set_status_reason(reason.map(String::from))
                        .status_details(StackSetOperationStatusDetails::builder().failed_stack_instances_count(failed).build())
                        .build(),
                )
                .build()
        });
    }
    seq.repeatedly().build()
}

fn result(account: &str, region: &str, status: &str, reason: Option<&str>) -> StackSetOperationResultSummary {
    StackSetOperationResultSummary::builder()
        .account(account)
        .region(region)
        .status(StackSetOperationResultStatus::from(status))
        .set_status_reason(reason.map(String::from))
        .build()
}

/// ListStackSetOperationResults, one page (StackSetOperationResultSummary: Account, Region,
/// Status CANCELLED | FAILED | RUNNING | PENDING | SUCCEEDED, StatusReason, OrganizationalUnitId).
fn results(rows: Vec<StackSetOperationResultSummary>) -> Rule {
    mock!(aws_sdk_cloudformation::Client::list_stack_set_operation_results)
        .then_output(move || ListStackSetOperationResultsOutput::builder().set_summaries(Some(rows.clone())).build())
}

fn instance(account: &str, region: &str, ou: Option<&str>, drift: StackDriftStatus) -> StackInstanceSummary {
    StackInstanceSummary::builder()
        .account(account)
        .region(region)
        .set_organizational_unit_id(ou.map(String::from))
        .status(StackInstanceStatus::Current)
        .drift_status(drift)
        .stack_set_id(format!("{SET}:8d0f160b"))
        .build()
}

fn list_instances(rows: Vec<StackInstanceSummary>) -> Rule {
    mock!(aws_sdk_cloudformation::Client::list_stack_instances)
        .then_output(move || ListStackInstancesOutput::builder().set_summaries(Some(rows.clone())).build())
}

// ---------------------------------------------------------------------------------------------
// Tests

/// Service-managed targets go as DeploymentTargets.OrganizationalUnitIds with no Accounts
/// ("[Service-managed permissions] The Organizations accounts for which to create stack
/// instances", CreateStackInstances, API Reference), the StackSet with PermissionModel
/// SERVICE_MANAGED and AutoDeployment; an operation that ends FAILED (failure tolerance
/// exceeded: "FAILED: The operation in the specified account and Region failed. If the StackSet
/// operation fails in enough accounts within a Region, the failure tolerance ... might be
/// exceeded", StackSetOperationResultSummary) exits 3 naming every failed target and its reason.
#[tokio::test]
async fn service_managed_operation_beyond_the_tolerance_exits_3_naming_each_failed_target() {
    let yaml = format!(
        "bake:\n  kms_key_id: {MRK}\nfleet:\n  permission_model: service-managed\n  organizational_units: [\"{OU_ARN}\"]\n  regions: [us-east-1, eu-west-1]\n  failure_tolerance: 1\n  max_concurrent: 2\n"
    );
    let (_d, ctx) = context(&yaml);
    let sets: Seen<CreateStackSetInput> = Default::default();
    let creates: Seen<CreateStackInstancesInput> = Default::default();
    let op = operation(vec![
        ("CREATE", StackSetOperationStatus::Running, None, 1),
        ("CREATE", StackSetOperationStatus::Failed, Some("The Operation failed because the failure tolerance was exceeded"), 2),
    ]);
    let res = results(vec![
        result(
            "222222222222",
            "us-east-1",
            "FAILED",
            Some("ResourceLogicalId:FileSystem, ResourceType:AWS::EFS::FileSystem, ResourceStatusReason:Resource handler returned message: \"Access denied\""),
        ),
        result(
            "333333333333",
            "us-east-1",
            "FAILED",
            Some(
                "Account 333333333333 should have 'AWSCloudFormationStackSetExecutionRole' role with trust relationship to Role 'AWSCloudFormationStackSetAdministrationRole'.",
            ),
        ),
        result("444444444444", "us-east-1", "SUCCEEDED", None),
        result("555555555555", "us-east-1", "CANCELLED", Some("Cancelled since failure tolerance has exceeded")),
    ]);
    let (images, snapshots) = image(MRK);
    let launch: Seen<ModifyImageAttributeInput> = Default::default();
    let modify_image = capturing!(mock!(aws_sdk_ec2::Client::modify_image_attribute), launch).then_output(|| ModifyImageAttributeOutput::builder().build());
    let clients = clients(&[&no_set(), &create_set(&sets), &create_instances(&creates), &op, &res], &[&images, &snapshots, &modify_image], &[&handoff()]);

    let err = imgbuild::cmd::fleet_deploy_flow(&clients, &deploy_args(targets()), &ctx, quiet(), &Never, never()).await.unwrap_err();
    assert_eq!(err.exit_code(), 3, "{err}");
    // The image goes to the organizational unit by ARN (LaunchPermission.OrganizationalUnitArn,
    // ModifyImageAttribute, Amazon EC2 API Reference), in each region, before any instance.
    let shared: Vec<String> = launch
        .lock()
        .unwrap()
        .iter()
        .flat_map(|m| m.launch_permission().unwrap().add().iter().filter_map(|p| p.organizational_unit_arn().map(String::from)))
        .collect();
    assert_eq!(shared, [OU_ARN, OU_ARN]);
    let text = err.to_string();
    assert!(text.contains("222222222222 in us-east-1: ResourceLogicalId:FileSystem"), "{text}");
    assert!(text.contains("333333333333 in us-east-1: Account 333333333333 should have"), "{text}");
    assert!(!text.contains("444444444444") && !text.contains("555555555555"), "only failed targets are named: {text}");
    assert!(matches!(err, Error::StackFailed { .. }));

    let set = sets.lock().unwrap()[0].clone();
    assert_eq!(set.permission_model(), Some(&PermissionModels::ServiceManaged));
    assert_eq!(set.auto_deployment().and_then(|a| a.enabled()), Some(true));
    assert!(set.parameters().iter().any(|p| p.parameter_key() == Some("ImageParameter") && p.parameter_value() == Some("/imgbuild/vectordb/ami")));
    let create = creates.lock().unwrap()[0].clone();
    assert!(create.accounts().is_empty());
    assert_eq!(create.deployment_targets().unwrap().organizational_unit_ids(), [OU]);
    assert_eq!(create.regions(), ["us-east-1", "eu-west-1"]);
    let prefs = create.operation_preferences().unwrap();
    assert_eq!((prefs.failure_tolerance_count(), prefs.max_concurrent_count()), (Some(1), Some(2)));
    assert_eq!(prefs.region_order(), ["us-east-1", "eu-west-1"]);
    // The member accounts have no handoff parameter: the shared image goes in from the start.
    assert!(create.parameter_overrides().iter().any(|p| p.parameter_key() == Some("ImageId") && p.parameter_value() == Some(AMI)), "{create:?}");
    // Only the failing operation ran: no override update after it.
    assert_eq!(op.num_calls(), 2);
}

/// Self-managed across accounts: the image is shared with the other account only (launch
/// permission and create-volume permission on its snapshot, "Share an AMI with specific AWS
/// accounts", Amazon EC2 User Guide), the instances get that region's image as an ImageId
/// override (the handoff parameter exists only in the baking account), and an operation that
/// SUCCEEDED with one target failed within the tolerance is success (partial success).
#[tokio::test]
async fn cross_account_fleet_shares_the_image_and_partial_success_is_success() {
    let yaml = format!(
        "bake:\n  kms_key_id: {KEY}\nfleet:\n  accounts: [\"{OWNER}\", \"222222222222\", \"333333333333\"]\n  regions: [us-east-1]\n  failure_tolerance: 1\n  \
         overrides:\n    - accounts: [\"333333333333\"]\n      allowed_client_cidr: 10.8.0.0/16\n"
    );
    let (_d, ctx) = context(&yaml);
    let sets: Seen<CreateStackSetInput> = Default::default();
    let creates: Seen<CreateStackInstancesInput> = Default::default();
    let updates: Seen<UpdateStackInstancesInput> = Default::default();
    let launch: Seen<ModifyImageAttributeInput> = Default::default();
    let volumes: Seen<ModifySnapshotAttributeInput> = Default::default();
    let op = operation(vec![("CREATE", StackSetOperationStatus::Succeeded, None, 1)]);
    let res = results(vec![
        result(OWNER, "us-east-1", "SUCCEEDED", None),
        result("222222222222", "us-east-1", "SUCCEEDED", None),
        result("333333333333", "us-east-1", "FAILED", Some("Quota exceeded for NAT gateways")),
    ]);
    let now = list_instances(vec![
        instance(OWNER, "us-east-1", None, StackDriftStatus::NotChecked),
        instance("222222222222", "us-east-1", None, StackDriftStatus::NotChecked),
        instance("333333333333", "us-east-1", None, StackDriftStatus::NotChecked),
    ]);
    let (images, snapshots) = image(KEY);
    let modify_image = capturing!(mock!(aws_sdk_ec2::Client::modify_image_attribute), launch).then_output(|| ModifyImageAttributeOutput::builder().build());
    let modify_snapshot =
        capturing!(mock!(aws_sdk_ec2::Client::modify_snapshot_attribute), volumes).then_output(|| ModifySnapshotAttributeOutput::builder().build());
    let clients = clients(
        &[&no_set(), &create_set(&sets), &create_instances(&creates), &update_instances(&updates), &op, &res, &now],
        &[&images, &snapshots, &modify_image, &modify_snapshot],
        &[&handoff()],
    );

    let doc = imgbuild::cmd::fleet_deploy_flow(&clients, &deploy_args(targets()), &ctx, quiet(), &Never, never()).await.unwrap_or_else(|e| panic!("{e}"));
    let shared: Vec<String> = launch.lock().unwrap()[0].launch_permission().unwrap().add().iter().filter_map(|p| p.user_id().map(String::from)).collect();
    assert_eq!(shared, ["222222222222", "333333333333"], "never the owner itself");
    let v = volumes.lock().unwrap()[0].clone();
    assert_eq!(v.snapshot_id(), Some(SNAPSHOT));
    assert_eq!(v.create_volume_permission().unwrap().add().iter().filter_map(|p| p.user_id()).collect::<Vec<_>>(), ["222222222222", "333333333333"]);
    // Each instance is created with the region's shared image as its ImageId, in the create call
    // itself. The other accounts have no handoff parameter: their ImageParameter names AWS's
    // public AL2023 parameter (CloudFormation resolves it in that account before anything is
    // made) and ImageParameterName has their stack write /imgbuild/<name>/ami there; the baking
    // account's own parameter is bake's, never a stack's. The account with its own client
    // network gets a call of its own (ParameterOverrides apply to every account and region of a
    // CreateStackInstances call, API Reference).
    let creates = creates.lock().unwrap().clone();
    let overrides = |c: &CreateStackInstancesInput| -> Vec<(String, String)> {
        c.parameter_overrides().iter().map(|p| (p.parameter_key().unwrap().to_string(), p.parameter_value().unwrap().to_string())).collect()
    };
    assert_eq!(creates.len(), 3, "{creates:?}");
    let by_accounts = |a: &[&str]| creates.iter().find(|c| c.accounts() == a).unwrap_or_else(|| panic!("no create for {a:?}: {creates:?}"));
    let kv = |k: &str, v: &str| (k.to_string(), v.to_string());
    let public = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64";
    assert_eq!(overrides(by_accounts(&[OWNER])), [kv("ImageId", AMI)]);
    assert_eq!(
        overrides(by_accounts(&["222222222222"])),
        [kv("ImageId", AMI), kv("ImageParameter", public), kv("ImageParameterName", "/imgbuild/vectordb/ami")]
    );
    assert_eq!(
        overrides(by_accounts(&["333333333333"])),
        [kv("AllowedClientCidr", "10.8.0.0/16"), kv("ImageId", AMI), kv("ImageParameter", public), kv("ImageParameterName", "/imgbuild/vectordb/ami")]
    );
    assert!(updates.lock().unwrap().is_empty(), "no second operation for the overrides");
    assert_eq!(doc["operations"][0]["results"][2]["status"], "FAILED", "partial success is reported");
    // Cost (issue 15, item 1): each target created is a whole new stack (one NAT gateway,
    // t3a.small, five alarms, the backup key) in us-east-1, $83.95 a month in the price table of
    // 2026-11-29.
    let cost = &doc["cost"];
    assert_eq!(cost["targets"].as_array().map(Vec::len), Some(3), "{cost}");
    assert_eq!(cost["targets"][0]["estimate"]["monthly_usd"], 83.95);
    assert_eq!(cost["monthly_usd"], 251.85);
    assert_eq!(doc["executed"], true);
}

/// An image under another key than bake.kms_key_id (such as the AWS managed aws/ebs, which
/// "cannot be shared", Amazon EC2 User Guide, "Share an AMI with specific AWS accounts") is
/// copied under the fleet's key (CopyImage with Encrypted and KmsKeyId, "Copy an AMI", Amazon
/// EC2 User Guide), and the copy, once available, is what is shared and deployed.
#[tokio::test]
async fn an_image_under_another_key_is_copied_under_the_fleet_key_and_the_copy_deployed() {
    const COPY: &str = "ami-0fedcba9876543210";
    let yaml = format!("bake:\n  kms_key_id: {KEY}\nfleet:\n  accounts: [\"{OWNER}\", \"222222222222\"]\n  regions: [us-east-1]\n");
    let (_d, ctx) = context(&yaml);
    let copies: Seen<aws_sdk_ec2::operation::copy_image::CopyImageInput> = Default::default();
    let launch: Seen<ModifyImageAttributeInput> = Default::default();
    let creates: Seen<CreateStackInstancesInput> = Default::default();
    let sets: Seen<CreateStackSetInput> = Default::default();
    let (images, snapshots) = image("arn:aws:kms:us-east-1:111111111111:key/0e0e0e0e-aaaa-bbbb-cccc-dddddddddddd");
    // No copy made before (DescribeImages of our own images by tag finds none); the copy, once
    // asked for, is available at the first look.
    let no_copy_yet = mock!(aws_sdk_ec2::Client::describe_images)
        .match_requests(|r| r.owners().contains(&"self".to_string()))
        .then_output(|| DescribeImagesOutput::builder().build());
    let the_copy = mock!(aws_sdk_ec2::Client::describe_images).match_requests(|r| r.image_ids() == [COPY]).then_output(|| {
        DescribeImagesOutput::builder()
            .images(
                Image::builder()
                    .image_id(COPY)
                    .owner_id(OWNER)
                    .state(aws_sdk_ec2::types::ImageState::Available)
                    .block_device_mappings(BlockDeviceMapping::builder().ebs(EbsBlockDevice::builder().snapshot_id("snap-0fedcba9876543210").build()).build())
                    .build(),
            )
            .build()
    });
    let copy = capturing!(mock!(aws_sdk_ec2::Client::copy_image), copies)
        .then_output(|| aws_sdk_ec2::operation::copy_image::CopyImageOutput::builder().image_id(COPY).build());
    let modify_image = capturing!(mock!(aws_sdk_ec2::Client::modify_image_attribute), launch).then_output(|| ModifyImageAttributeOutput::builder().build());
    let modify_snapshot = mock!(aws_sdk_ec2::Client::modify_snapshot_attribute).then_output(|| ModifySnapshotAttributeOutput::builder().build());
    let op = operation(vec![("CREATE", StackSetOperationStatus::Succeeded, None, 0)]);
    let res = results(vec![result(OWNER, "us-east-1", "SUCCEEDED", None), result("222222222222", "us-east-1", "SUCCEEDED", None)]);
    let clients = clients(
        &[&no_set(), &create_set(&sets), &create_instances(&creates), &op, &res],
        &[&no_copy_yet, &the_copy, &images, &snapshots, &copy, &modify_image, &modify_snapshot],
        &[&handoff()],
    );
    let doc = imgbuild::cmd::fleet_deploy_flow(&clients, &deploy_args(targets()), &ctx, quiet(), &Never, never()).await.unwrap_or_else(|e| panic!("{e}"));

    let c = copies.lock().unwrap()[0].clone();
    assert_eq!((c.source_image_id(), c.source_region(), c.encrypted(), c.kms_key_id()), (Some(AMI), Some("us-east-1"), Some(true), Some(KEY)));
    let tags: Vec<(&str, &str)> = c.tag_specifications().iter().flat_map(|t| t.tags()).map(|t| (t.key().unwrap(), t.value().unwrap())).collect();
    assert!(tags.contains(&("imgbuild:encrypted-from", AMI)) && tags.contains(&("imgbuild:kms-key", KEY)), "{tags:?}");
    assert_eq!(launch.lock().unwrap()[0].image_id(), Some(COPY), "the copy is shared, not the original");
    let create = creates.lock().unwrap()[0].clone();
    assert!(create.parameter_overrides().iter().any(|p| p.parameter_key() == Some("ImageId") && p.parameter_value() == Some(COPY)), "{create:?}");
    assert_eq!(doc["images"][0]["image"], COPY);
}

/// `fleet status --drift` starts DetectStackSetDrift ("returns the OperationId of the StackSet
/// drift detection operation. Use this operation id with DescribeStackSetOperation to monitor
/// the progress"; then "Use ListStackInstances to return ... the drift status ... of each
/// instance", DetectStackSetDrift, API Reference), waits for that operation, and reports each
/// instance's drift and the StackSet's (StackSetDriftDetectionDetails.DriftStatus).
#[tokio::test]
async fn status_with_drift_runs_detection_and_reports_each_instance() {
    let (_d, ctx) = context("fleet:\n  accounts: [\"111111111111\"]\n  regions: [us-east-1, eu-west-1]\n  max_concurrent: 10%\n");
    let drifts: Seen<DetectStackSetDriftInput> = Default::default();
    let s2 = drifts.clone();
    let detect = capturing!(mock!(aws_sdk_cloudformation::Client::detect_stack_set_drift), drifts).then_output(move || {
        DetectStackSetDriftOutput::builder().set_operation_id(s2.lock().unwrap().last().and_then(|r| r.operation_id().map(String::from))).build()
    });
    let describe = mock!(aws_sdk_cloudformation::Client::describe_stack_set).then_output(|| {
        DescribeStackSetOutput::builder()
            .stack_set(
                StackSet::builder()
                    .stack_set_name(SET)
                    .stack_set_arn(format!("arn:aws:cloudformation:us-east-1:{OWNER}:stackset/{SET}:8d0f160b"))
                    .status(StackSetStatus::Active)
                    .parameters(
                        aws_sdk_cloudformation::types::Parameter::builder().parameter_key("ImageParameter").parameter_value("/imgbuild/vectordb/ami").build(),
                    )
                    .stack_set_drift_detection_details(
                        StackSetDriftDetectionDetails::builder().drift_status(StackSetDriftStatus::Drifted).drifted_stack_instances_count(1).build(),
                    )
                    .build(),
            )
            .build()
    });
    let op = operation(vec![("DETECT_DRIFT", StackSetOperationStatus::Running, None, 0), ("DETECT_DRIFT", StackSetOperationStatus::Succeeded, None, 0)]);
    let res = results(vec![result(OWNER, "us-east-1", "SUCCEEDED", None), result(OWNER, "eu-west-1", "SUCCEEDED", None)]);
    let list =
        list_instances(vec![instance(OWNER, "us-east-1", None, StackDriftStatus::Drifted), instance(OWNER, "eu-west-1", None, StackDriftStatus::InSync)]);
    let ops = mock!(aws_sdk_cloudformation::Client::list_stack_set_operations).then_output(|| {
        ListStackSetOperationsOutput::builder()
            .summaries(
                StackSetOperationSummary::builder()
                    .operation_id("imgbuild-drift")
                    .action(StackSetOperationAction::DetectDrift)
                    .status(StackSetOperationStatus::Succeeded)
                    .creation_timestamp(aws_smithy_types::DateTime::from_secs(1_700_000_100))
                    .build(),
            )
            .summaries(
                StackSetOperationSummary::builder()
                    .operation_id("older")
                    .action(StackSetOperationAction::Create)
                    .status(StackSetOperationStatus::Succeeded)
                    .creation_timestamp(aws_smithy_types::DateTime::from_secs(1_700_000_000))
                    .build(),
            )
            .build()
    });
    let clients = clients(&[&detect, &describe, &op, &res, &list, &ops], &[], &[&handoff()]);
    let args = FleetStatusArgs { drift: true, timeout: None };
    let doc = imgbuild::cmd::fleet_status_flow(&clients, &args, &ctx, quiet()).await.unwrap_or_else(|e| panic!("{e}"));

    let sent = drifts.lock().unwrap()[0].clone();
    assert_eq!(sent.stack_set_name(), Some(SET));
    assert_eq!(sent.operation_preferences().and_then(|p| p.max_concurrent_percentage()), Some(10));
    assert_eq!(doc["drift_detection"]["status"], "SUCCEEDED", "{doc:#}");
    assert_eq!(doc["drift_status"], "DRIFTED");
    assert_eq!(doc["instances"][0]["drift_status"], "DRIFTED");
    assert_eq!(doc["instances"][1]["drift_status"], "IN_SYNC");
    assert_eq!(doc["instances"][0]["image"], AMI);
    assert_eq!(doc["last_operation"]["operation_id"], "imgbuild-drift", "the newest by creation time");
}

/// The planning test at scale: 200 accounts x 4 regions, --max-concurrent 20, --failure-tolerance
/// 5%. CloudFormation runs the rollout; imgbuild makes one CreateStackInstances for the 200
/// targets of a region (each region's image is its own ImageId override), one DescribeStackSetOperation per poll (never one
/// per target) and reads the results 100 a page (ListStackSetOperationResults MaxResults, API
/// Reference: 1-100). The counts are what BENCHMARKS.md reports.
#[tokio::test]
async fn two_hundred_accounts_in_four_regions_stay_bounded() {
    let accounts: Vec<String> = (0..200).map(|i| format!("{:012}", 100_000_000_000u64 + i)).collect();
    let regions = ["us-east-1", "us-west-2", "eu-west-1", "ap-southeast-2"];
    let yaml = format!("prices: auto\nbake:\n  kms_key_id: {MRK}\nfleet:\n  accounts: [{}]\n  regions: [{}]\n", accounts.join(", "), regions.join(", "));
    let (_d, ctx) = context(&yaml);
    let sets: Seen<CreateStackSetInput> = Default::default();
    let creates: Seen<CreateStackInstancesInput> = Default::default();
    let updates: Seen<UpdateStackInstancesInput> = Default::default();
    // Each operation: RUNNING at the first poll, SUCCEEDED at the second.
    let mut steps = Vec::new();
    for _ in 0..5 {
        steps.push(("CREATE", StackSetOperationStatus::Running, None, 0));
        steps.push(("CREATE", StackSetOperationStatus::Succeeded, None, 0));
    }
    let op = operation(steps);
    // Results and instances, 100 a page, chained by NextToken.
    let all: Vec<(String, String)> = regions.iter().flat_map(|r| accounts.iter().map(move |a| (a.clone(), r.to_string()))).collect();
    let pages = all.len().div_ceil(100);
    let mut page_rules = Vec::new();
    for p in 0..pages {
        let rows: Vec<StackSetOperationResultSummary> =
            all[p * 100..((p + 1) * 100).min(all.len())].iter().map(|(a, r)| result(a, r, "SUCCEEDED", None)).collect();
        let inst: Vec<StackInstanceSummary> =
            all[p * 100..((p + 1) * 100).min(all.len())].iter().map(|(a, r)| instance(a, r, None, StackDriftStatus::NotChecked)).collect();
        let token = (p > 0).then(|| format!("t{p}"));
        let next = (p + 1 < pages).then(|| format!("t{}", p + 1));
        let (t1, n1) = (token.clone(), next.clone());
        page_rules.push(
            mock!(aws_sdk_cloudformation::Client::list_stack_set_operation_results)
                .match_requests(move |r| r.next_token().map(String::from) == t1 && r.max_results() == Some(100))
                .then_output(move || ListStackSetOperationResultsOutput::builder().set_summaries(Some(rows.clone())).set_next_token(n1.clone()).build()),
        );
        page_rules.push(
            mock!(aws_sdk_cloudformation::Client::list_stack_instances)
                .match_requests(move |r| r.next_token().map(String::from) == token)
                .then_output(move || ListStackInstancesOutput::builder().set_summaries(Some(inst.clone())).set_next_token(next.clone()).build()),
        );
    }
    let (images, snapshots) = image(MRK);
    let modify_image = mock!(aws_sdk_ec2::Client::modify_image_attribute).then_output(|| ModifyImageAttributeOutput::builder().build());
    let modify_snapshot = mock!(aws_sdk_ec2::Client::modify_snapshot_attribute).then_output(|| ModifySnapshotAttributeOutput::builder().build());
    // Each region's own copy of the image, in the order the regions are read.
    let mut seq = mock!(aws_sdk_ssm::Client::get_parameter).sequence();
    for i in 0..regions.len() {
        seq = seq.output(move || {
            GetParameterOutput::builder()
                .parameter(aws_sdk_ssm::types::Parameter::builder().name("/imgbuild/vectordb/ami").value(format!("ami-0123456789abcdef{i}")).build())
                .build()
        });
    }
    let handoff = seq.build();
    let (no_set, create_set, create_instances, update_instances) = (no_set(), create_set(&sets), create_instances(&creates), update_instances(&updates));
    let mut cfn: Vec<&Rule> = vec![&no_set, &create_set, &create_instances, &update_instances, &op];
    cfn.extend(page_rules.iter());
    let (key, listed) = (describe_key(), list_grants(vec![]));
    let mut clients = clients_kms(&cfn, &[&images, &snapshots, &modify_image, &modify_snapshot], &[&handoff], &[&key, &listed]);
    // Each account's grants are made from that account (fleet.grants_from: target-account).
    let (assumed, made_as): (Seen<AssumeRoleInput>, MadeAs) = Default::default();
    let assume = assume_role(&assumed);
    clients.sts = mocked!(aws_sdk_sts, [assume.clone()], RetryConfig::disabled());
    clients.kms_as = kms_as(&made_as);
    // The Price List answers in its documented shape (see cost::answer_for).
    let prices = mock!(aws_sdk_pricing::Client::get_products).then_compute_output(crate::cost::answer_for);
    clients.pricing = mocked!(aws_sdk_pricing, [prices.clone()], RetryConfig::disabled());
    let t = FleetTargetArgs { max_concurrent: Some("20".into()), failure_tolerance: Some("5%".into()), ..targets() };

    let started = Instant::now();
    let doc = imgbuild::cmd::fleet_deploy_flow(&clients, &deploy_args(t), &ctx, quiet(), &Never, never()).await.unwrap_or_else(|e| panic!("{e}"));
    let took = started.elapsed();

    let create = creates.lock().unwrap().clone();
    assert_eq!(create.len(), 4, "one CreateStackInstances per region (each its own image)");
    assert!(create.iter().all(|c| c.accounts().len() == 200 && c.regions().len() == 1));
    // Each operation's RegionOrder names only its own regions, in the fleet's order.
    assert!(create.iter().all(|c| c.operation_preferences().unwrap().region_order() == c.regions()), "{create:?}");
    assert_eq!(create.iter().map(|c| c.regions()[0].as_str()).collect::<Vec<_>>(), regions);
    let prefs = create[0].operation_preferences().unwrap();
    assert_eq!((prefs.max_concurrent_count(), prefs.failure_tolerance_percentage()), (Some(20), Some(5)));
    assert!(updates.lock().unwrap().is_empty(), "overrides go in with the create");
    let operations = doc["operations"].as_array().unwrap().len();
    assert_eq!(operations, 4);
    assert_eq!(doc["calls"]["describe_operation"], 8, "two polls per operation, whatever the targets: {doc:#}");
    assert_eq!(doc["calls"]["list_results_pages"], 4 * pages, "{doc:#}");
    let cfn_calls: usize = cfn.iter().map(|r| r.num_calls()).sum();
    let ec2_calls = images.num_calls() + snapshots.num_calls() + modify_image.num_calls() + modify_snapshot.num_calls();
    let ssm_calls = handoff.num_calls();
    // 800 targets: 1 DescribeStackSet, 1 CreateStackSet, 4 CreateStackInstances, 8
    // DescribeStackSetOperation, 4 x 8 result pages.
    assert_eq!(cfn_calls, 1 + 1 + 4 + 8 + 4 * pages, "cfn calls");
    // Per region: DescribeImages and DescribeSnapshots (is it under the key?), DescribeImages
    // (its snapshots, to share), and per 100 accounts one ModifyImageAttribute and one
    // ModifySnapshotAttribute; one more DescribeImages for the owner.
    assert_eq!(ec2_calls, 1 + 4 * (3 + 2 * 2), "ec2 calls");
    assert_eq!(ssm_calls, 4, "one handoff parameter per region");
    // Per region, in the key's account: DescribeKey and one page of ListGrants. Then one
    // CreateGrant per other account and region (a grant names one grantee principal:
    // CreateGrant, KMS API Reference), each with that account's client, whose credentials come
    // from one AssumeRole per account, whatever the regions.
    let grants = made_as.lock().unwrap().len();
    let kms_calls = key.num_calls() + listed.num_calls() + grants;
    assert_eq!((key.num_calls(), listed.num_calls(), grants), (4, 4, 4 * 200), "kms calls: the image owner is none of the 200");
    let sts_calls = assume.num_calls();
    assert_eq!(sts_calls, 200, "one AssumeRole per account, not per region");
    let roles: std::collections::BTreeSet<String> = assumed.lock().unwrap().iter().map(|r| r.role_arn().unwrap().to_string()).collect();
    assert_eq!(roles.len(), 200);
    assert!(made_as.lock().unwrap().iter().all(|(a, _, key, g)| *key == format!("ASIA{a}") && g.grantee_principal() == Some(slr(a).as_str())));
    // The cost of 800 new stacks: the Price List asked once a region for each product a stack
    // prices (instance, NAT gateway, endpoint, NLB, EFS, gp3, alarm), not once a target.
    assert_eq!(prices.num_calls(), 4 * 7, "GetProducts calls");
    assert_eq!(doc["cost"]["targets"].as_array().map(Vec::len), Some(800));
    assert!(doc["cost"]["sources"]["us-east-1"].as_str().unwrap().starts_with("AWS Price List API, "), "{}", doc["cost"]["sources"]);
    eprintln!(
        "fleet scale: 200 accounts x 4 regions: {operations} operations, cfn {cfn_calls} calls, ec2 {ec2_calls}, ssm {ssm_calls}, kms {kms_calls}, sts {sts_calls}, \
         pricing {}, DescribeStackSetOperation {}, result pages {}, in {:.1}s (1 s poll interval)",
        prices.num_calls(),
        doc["calls"]["describe_operation"],
        doc["calls"]["list_results_pages"],
        took.as_secs_f64()
    );
}

/// In a fleet that spans accounts, `fleet status` shows the image each instance was given: the
/// region's copy under bake.kms_key_id (found by its tags, as deploy finds it), not the
/// handoff parameter's image, which other accounts cannot launch.
#[tokio::test]
async fn status_of_a_cross_account_fleet_shows_the_shared_copy() {
    const COPY: &str = "ami-0fedcba9876543210";
    let (_d, ctx) = context(&format!("bake:\n  kms_key_id: {KEY}\nfleet:\n  accounts: [\"{OWNER}\", \"222222222222\"]\n  regions: [us-east-1]\n"));
    let describe = mock!(aws_sdk_cloudformation::Client::describe_stack_set).then_output(|| {
        DescribeStackSetOutput::builder()
            .stack_set(
                StackSet::builder()
                    .stack_set_name(SET)
                    .stack_set_arn(format!("arn:aws:cloudformation:us-east-1:{OWNER}:stackset/{SET}:8d0f160b"))
                    .status(StackSetStatus::Active)
                    .parameters(
                        aws_sdk_cloudformation::types::Parameter::builder().parameter_key("ImageParameter").parameter_value("/imgbuild/vectordb/ami").build(),
                    )
                    .build(),
            )
            .build()
    });
    let list = list_instances(vec![
        instance(OWNER, "us-east-1", None, StackDriftStatus::NotChecked),
        instance("222222222222", "us-east-1", None, StackDriftStatus::NotChecked),
    ]);
    let ops = mock!(aws_sdk_cloudformation::Client::list_stack_set_operations).then_output(|| ListStackSetOperationsOutput::builder().build());
    let (images, snapshots) = image("arn:aws:kms:us-east-1:111111111111:key/0e0e0e0e-aaaa-bbbb-cccc-dddddddddddd");
    let copies = mock!(aws_sdk_ec2::Client::describe_images).match_requests(|r| r.owners().contains(&"self".to_string())).then_output(|| {
        DescribeImagesOutput::builder().images(Image::builder().image_id(COPY).state(aws_sdk_ec2::types::ImageState::Available).build()).build()
    });
    let clients = clients(&[&describe, &list, &ops], &[&copies, &images, &snapshots], &[&handoff()]);
    let doc =
        imgbuild::cmd::fleet_status_flow(&clients, &FleetStatusArgs { drift: false, timeout: None }, &ctx, quiet()).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(doc["instances"][0]["image"], COPY, "{doc:#}");
    assert_eq!(doc["instances"][1]["image"], COPY, "{doc:#}");
    assert!(doc["last_operation"].is_null());
}

/// Ctrl-C while an operation runs: nothing can be undone from the client (a StackSet operation
/// goes on in CloudFormation once started; StopStackSetOperation only stops it between
/// targets), so the exit (130) says exactly what was started and how to follow it.
#[tokio::test]
async fn ctrl_c_during_an_operation_says_what_was_started() {
    let (_d, ctx) = context("fleet:\n  accounts: [\"111111111111\"]\n  regions: [us-east-1]\n");
    let sets: Seen<CreateStackSetInput> = Default::default();
    let creates: Seen<CreateStackInstancesInput> = Default::default();
    let op = operation(vec![("CREATE", StackSetOperationStatus::Running, None, 0)]);
    let (images, snapshots) = image(KEY);
    let clients = clients(&[&no_set(), &create_set(&sets), &create_instances(&creates), &op], &[&images, &snapshots], &[&handoff()]);
    let polled = op.clone();
    let interrupt = async move {
        while polled.num_calls() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let err = imgbuild::cmd::fleet_deploy_flow(&clients, &deploy_args(targets()), &ctx, quiet(), &Never, interrupt).await.unwrap_err();
    assert_eq!(err.exit_code(), 130, "{err}");
    let text = err.to_string();
    let id = creates.lock().unwrap()[0].operation_id().unwrap().to_string();
    assert!(text.contains("stack set vectordb was created") && text.contains(&format!("operation {id} (creating instances in us-east-1)")), "{text}");
}

/// A StackSet as DescribeStackSet answers it (StackSet: StackSetName, StackSetARN, Status
/// ACTIVE, TemplateBody, Parameters; DescribeStackSet, API Reference), administered by OWNER.
fn existing_set(template_body: &'static str) -> Rule {
    mock!(aws_sdk_cloudformation::Client::describe_stack_set).then_output(move || {
        DescribeStackSetOutput::builder()
            .stack_set(
                StackSet::builder()
                    .stack_set_name(SET)
                    .stack_set_arn(format!("arn:aws:cloudformation:us-east-1:{OWNER}:stackset/{SET}:8d0f160b"))
                    .status(StackSetStatus::Active)
                    .template_body(template_body)
                    .build(),
            )
            .build()
    })
}

/// DescribeStackInstance: the instance with its ParameterOverrides (StackInstance: StackSetId,
/// Region, Account, StackId, ParameterOverrides, Status; DescribeStackInstance, API Reference).
fn described_instance(overrides: &'static [(&'static str, &'static str)]) -> Rule {
    mock!(aws_sdk_cloudformation::Client::describe_stack_instance).then_output(move || {
        DescribeStackInstanceOutput::builder()
            .stack_instance(
                aws_sdk_cloudformation::types::StackInstance::builder()
                    .stack_set_id(format!("{SET}:8d0f160b"))
                    .account(OWNER)
                    .region("us-east-1")
                    .status(StackInstanceStatus::Current)
                    .set_parameter_overrides(Some(
                        overrides
                            .iter()
                            .map(|(k, v)| aws_sdk_cloudformation::types::Parameter::builder().parameter_key(*k).parameter_value(*v).build())
                            .collect(),
                    ))
                    .build(),
            )
            .build()
    })
}

/// A target whose override was deleted from the config still has it in CloudFormation (only
/// DescribeStackInstance says so): it is an update, and UpdateStackInstances gets an empty
/// ParameterOverrides list for it ("To set an overridden parameter back to the value specified
/// in the stack set, specify a parameter list but do not include the parameter in the list",
/// UpdateStackInstances, API Reference). Failed before the fix: no UpdateStackInstances at all.
#[tokio::test]
async fn an_override_removed_from_the_config_is_removed_from_the_instance() {
    let (_d, ctx) = context(&format!("fleet:\n  accounts: [\"{OWNER}\"]\n  regions: [us-east-1]\n"));
    let updates: Seen<UpdateStackInstancesInput> = Default::default();
    let set_update = mock!(aws_sdk_cloudformation::Client::update_stack_set)
        .then_output(|| aws_sdk_cloudformation::operation::update_stack_set::UpdateStackSetOutput::builder().operation_id("imgbuild-update").build());
    let op = operation(vec![("UPDATE", StackSetOperationStatus::Succeeded, None, 0)]);
    let res = results(vec![result(OWNER, "us-east-1", "SUCCEEDED", None)]);
    let list = list_instances(vec![instance(OWNER, "us-east-1", None, StackDriftStatus::NotChecked)]);
    let described = described_instance(&[("AllowedClientCidr", "10.8.0.0/16")]);
    let (images, snapshots) = image(KEY);
    let clients = clients(
        &[&existing_set("an older template"), &list, &described, &set_update, &update_instances(&updates), &op, &res],
        &[&images, &snapshots],
        &[&handoff()],
    );
    let doc = imgbuild::cmd::fleet_deploy_flow(&clients, &deploy_args(targets()), &ctx, quiet(), &Never, never()).await.unwrap_or_else(|e| panic!("{e}"));
    let updates = updates.lock().unwrap().clone();
    assert_eq!(updates.len(), 1, "{updates:?}");
    assert_eq!((updates[0].accounts(), updates[0].regions()), (&[OWNER.to_string()][..], &["us-east-1".to_string()][..]));
    assert_eq!(updates[0].parameter_overrides(), &[], "an empty list, not none (none would keep the override)");
    assert!(updates[0].parameter_overrides.is_some());
    assert_eq!(doc["targets"][0]["action"], "update");
}

/// `fleet deploy --no-execute` (which the refusal without a terminal names): the plan is shown
/// and in the JSON, nothing is asked and nothing is started.
#[tokio::test]
async fn no_execute_shows_the_plan_and_starts_nothing() {
    let (_d, ctx) = context(&format!("fleet:\n  accounts: [\"{OWNER}\"]\n  regions: [us-east-1, eu-west-1]\n"));
    let sets: Seen<CreateStackSetInput> = Default::default();
    let creates: Seen<CreateStackInstancesInput> = Default::default();
    let (images, snapshots) = image(KEY);
    let (create_set, create_instances) = (create_set(&sets), create_instances(&creates));
    let clients = clients(&[&no_set(), &create_set, &create_instances], &[&images, &snapshots], &[&handoff()]);
    let args = FleetDeployArgs { yes: false, no_execute: true, ..deploy_args(targets()) };
    let doc = imgbuild::cmd::fleet_deploy_flow(&clients, &args, &ctx, quiet(), &Never, never()).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(doc["executed"], false);
    assert_eq!(doc["targets"].as_array().map(Vec::len), Some(2), "{doc:#}");
    assert_eq!(doc["targets"][0]["action"], "create");
    assert_eq!(create_set.num_calls() + create_instances.num_calls(), 0);
}

/// A fleet that spans accounts grants each other account's Auto Scaling service-linked role use
/// of the region's key, with the operations of the User Guide's cross-account example ("Required
/// AWS KMS key policy for use with encrypted volumes", Amazon EC2 Auto Scaling User Guide,
/// `aws kms create-grant ... --grantee-principal arn:aws:iam::111122223333:role/aws-service-role/
/// autoscaling.amazonaws.com/AWSServiceRoleForAutoScaling --operations "Encrypt" "Decrypt"
/// "ReEncryptFrom" "ReEncryptTo" "GenerateDataKey" "GenerateDataKeyWithoutPlaintext"
/// "DescribeKey" "CreateGrant"`), once: a grant ListGrants shows (found by its Name and grantee)
/// is not made again, and the baking account gets none. A dry run plans the same and makes none.
#[tokio::test]
async fn a_cross_account_fleet_grants_each_other_accounts_auto_scaling_role_use_of_the_key_once() {
    // fleet.grants_from: key-account keeps the grants in the key's account: made with the
    // caller's own KMS client, no role assumed (STS is left unscripted: a call would panic).
    let yaml = format!(
        "bake:\n  kms_key_id: {KEY}\nfleet:\n  accounts: [\"{OWNER}\", \"222222222222\", \"333333333333\"]\n  regions: [us-east-1]\n  grants_from: key-account\n"
    );
    let (_d, ctx) = context(&yaml);
    let run = |dry_run: bool| {
        let made: Seen<CreateGrantInput> = Default::default();
        let (sets, creates): (Seen<CreateStackSetInput>, Seen<CreateStackInstancesInput>) = Default::default();
        let op = operation(vec![("CREATE", StackSetOperationStatus::Succeeded, None, 0)]);
        let res = results(vec![result(OWNER, "us-east-1", "SUCCEEDED", None)]);
        let (images, snapshots) = image(KEY);
        let modify_image = mock!(aws_sdk_ec2::Client::modify_image_attribute).then_output(|| ModifyImageAttributeOutput::builder().build());
        let modify_snapshot = mock!(aws_sdk_ec2::Client::modify_snapshot_attribute).then_output(|| ModifySnapshotAttributeOutput::builder().build());
        let clients = clients_kms(
            &[&no_set(), &create_set(&sets), &create_instances(&creates), &op, &res],
            &[&images, &snapshots, &modify_image, &modify_snapshot],
            &[&handoff()],
            &[&describe_key(), &list_grants(vec![("222222222222", "0c0c0c0c")]), &create_grant(&made)],
        );
        let unscripted = crate::mock_client::unscripted();
        let clients = Clients { sts: unscripted.sts, kms_as: unscripted.kms_as, ..clients };
        let args = FleetDeployArgs { dry_run, yes: !dry_run, ..deploy_args(targets()) };
        let ctx = &ctx;
        async move {
            let doc = imgbuild::cmd::fleet_deploy_flow(&clients, &args, ctx, quiet(), &Never, never()).await.unwrap_or_else(|e| panic!("{e}"));
            (doc, made.lock().unwrap().clone())
        }
    };

    let (plan, none) = run(true).await;
    assert!(none.is_empty(), "a dry run makes no grant");
    assert_eq!(plan["grants"].as_array().map(Vec::len), Some(2), "{plan:#}");
    assert_eq!((plan["grants"][0]["account"].as_str(), plan["grants"][0]["state"].as_str()), (Some("222222222222"), Some("exists")));
    assert_eq!((plan["grants"][1]["account"].as_str(), plan["grants"][1]["state"].as_str()), (Some("333333333333"), Some("create")));
    assert_eq!(
        (plan["grants"][1]["from_account"].as_str(), &plan["grants"][1]["from_role"]),
        (Some(OWNER), &serde_json::Value::Null),
        "from the key's account"
    );

    let (doc, made) = run(false).await;
    assert_eq!(made.len(), 1, "only the account without a grant: {made:?}");
    let g = &made[0];
    assert_eq!(g.key_id(), Some(KEY), "the key's ARN, as DescribeKey gave it");
    assert_eq!(g.grantee_principal(), Some(slr("333333333333").as_str()));
    let ops: Vec<&str> = g.operations().iter().map(|o| o.as_str()).collect();
    assert_eq!(ops, ["Encrypt", "Decrypt", "ReEncryptFrom", "ReEncryptTo", "GenerateDataKey", "GenerateDataKeyWithoutPlaintext", "DescribeKey", "CreateGrant"]);
    assert_eq!(g.name(), Some("imgbuild-vectordb-333333333333"));
    assert!(g.constraints().is_none() && g.retiring_principal().is_none() && g.grant_tokens().is_empty(), "{g:?}");
    assert_eq!(doc["grants"][1]["state"], "created");
    assert_eq!(doc["grants"][1]["grant_id"], "1a2b3c4d2f5e69f440bae30eaec9570bb1fb7358824f9ddfa1aa5a0dab1a59b2");
    assert_eq!(doc["grants"][0]["grant_id"], "0c0c0c0c");
}

/// The clients of a one-region deploy of a new StackSet across `OWNER` and the accounts in the
/// config, with `grants` already on the key; the key's account has no CreateGrant answer, so a
/// grant made there fails the test.
fn grant_clients(grants: Vec<(&'static str, &'static str)>, sets: &Seen<CreateStackSetInput>, launch: &Seen<ModifyImageAttributeInput>) -> Clients {
    let op = operation(vec![("CREATE", StackSetOperationStatus::Succeeded, None, 0)]);
    let res = results(vec![result(OWNER, "us-east-1", "SUCCEEDED", None)]);
    let (images, snapshots) = image(KEY);
    let modify_image = capturing!(mock!(aws_sdk_ec2::Client::modify_image_attribute), launch).then_output(|| ModifyImageAttributeOutput::builder().build());
    let modify_snapshot = mock!(aws_sdk_ec2::Client::modify_snapshot_attribute).then_output(|| ModifySnapshotAttributeOutput::builder().build());
    let creates: Seen<CreateStackInstancesInput> = Default::default();
    clients_kms(
        &[&no_set(), &create_set(sets), &create_instances(&creates), &op, &res],
        &[&images, &snapshots, &modify_image, &modify_snapshot],
        &[&handoff()],
        &[&describe_key(), &list_grants(grants)],
    )
}

/// Self-managed (fleet.grants_from: target-account, the default): each account's grant is made
/// from that account, as AWS says ("You must create AWS KMS grants from the account that owns the
/// Amazon EC2 Auto Scaling group, not the AWS KMS account", Knowledge Center
/// kms-launch-ec2-instance; User Guide, "Required AWS KMS key policy for use with encrypted
/// volumes", example 2: "from the external account, create a grant"): imgbuild assumes the
/// account's StackSet execution role (AssumeRole: RoleArn, RoleSessionName, DurationSeconds),
/// and that account's KMS client, in the key's region, calls CreateGrant with the key's ARN
/// (another account's key is named by ARN: CreateGrant, KeyId). An account whose grant exists is
/// not assumed. Failed before the change: the grants went through the key account's client.
#[tokio::test]
async fn self_managed_grants_are_made_from_each_target_account_through_its_execution_role() {
    let yaml = format!(
        "bake:\n  kms_key_id: {KEY}\nfleet:\n  accounts: [\"{OWNER}\", \"222222222222\", \"333333333333\", \"444444444444\"]\n  regions: [us-east-1]\n"
    );
    let (_d, ctx) = context(&yaml);
    let (sets, launch): (Seen<CreateStackSetInput>, Seen<ModifyImageAttributeInput>) = Default::default();
    let mut clients = grant_clients(vec![("222222222222", "0c0c0c0c")], &sets, &launch);
    let (assumed, made_as): (Seen<AssumeRoleInput>, MadeAs) = Default::default();
    clients.sts = mocked!(aws_sdk_sts, [assume_role(&assumed)], RetryConfig::disabled());
    clients.kms_as = kms_as(&made_as);

    let doc = imgbuild::cmd::fleet_deploy_flow(&clients, &deploy_args(targets()), &ctx, quiet(), &Never, never()).await.unwrap_or_else(|e| panic!("{e}"));
    let assumed = assumed.lock().unwrap().clone();
    let roles: Vec<&str> = assumed.iter().map(|r| r.role_arn().unwrap()).collect();
    assert_eq!(
        roles,
        ["arn:aws:iam::333333333333:role/AWSCloudFormationStackSetExecutionRole", "arn:aws:iam::444444444444:role/AWSCloudFormationStackSetExecutionRole"],
        "only the accounts without a grant"
    );
    assert!(assumed.iter().all(|r| r.role_session_name() == Some("imgbuild-grant-vectordb") && r.duration_seconds() == Some(900)), "{assumed:?}");
    let made = made_as.lock().unwrap().clone();
    assert_eq!(made.len(), 2, "{made:?}");
    for ((account, region, access_key, g), want) in made.iter().zip(["333333333333", "444444444444"]) {
        assert_eq!((account.as_str(), region.as_str(), access_key.as_str()), (want, "us-east-1", format!("ASIA{want}").as_str()), "that account's client");
        assert_eq!(g.key_id(), Some(KEY), "the key's ARN");
        assert_eq!(g.grantee_principal(), Some(slr(want).as_str()));
        let ops: Vec<&str> = g.operations().iter().map(|o| o.as_str()).collect();
        assert_eq!(
            ops,
            ["Encrypt", "Decrypt", "ReEncryptFrom", "ReEncryptTo", "GenerateDataKey", "GenerateDataKeyWithoutPlaintext", "DescribeKey", "CreateGrant"]
        );
        assert_eq!(g.name(), Some(format!("imgbuild-vectordb-{want}").as_str()));
        assert!(g.constraints().is_none() && g.retiring_principal().is_none() && g.grant_tokens().is_empty(), "{g:?}");
    }
    // The JSON says from where each grant is made: the existing one from the account that
    // issued it (ListGrants' IssuingAccount), the new ones from their own account and role.
    let grants = doc["grants"].as_array().unwrap();
    assert_eq!(
        (grants[0]["state"].as_str(), grants[0]["from_account"].as_str(), &grants[0]["from_role"]),
        (Some("exists"), Some(OWNER), &serde_json::Value::Null)
    );
    assert_eq!((grants[1]["state"].as_str(), grants[1]["from_account"].as_str()), (Some("created"), Some("333333333333")));
    assert_eq!(grants[1]["from_role"], "arn:aws:iam::333333333333:role/AWSCloudFormationStackSetExecutionRole");
    assert_eq!(sets.lock().unwrap().len(), 1);
}

/// Every account already has its grant: nothing to make, so no role is assumed at all (STS is
/// unscripted here: a call would panic).
#[tokio::test]
async fn existing_grants_need_no_assume_role() {
    let (_d, ctx) =
        context(&format!("bake:\n  kms_key_id: {KEY}\nfleet:\n  accounts: [\"{OWNER}\", \"222222222222\", \"333333333333\"]\n  regions: [us-east-1]\n"));
    let (sets, launch): (Seen<CreateStackSetInput>, Seen<ModifyImageAttributeInput>) = Default::default();
    let clients = grant_clients(vec![("222222222222", "0c0c0c0c"), ("333333333333", "0d0d0d0d")], &sets, &launch);
    let unscripted = crate::mock_client::unscripted();
    let clients = Clients { sts: unscripted.sts, kms_as: unscripted.kms_as, ..clients };
    let doc = imgbuild::cmd::fleet_deploy_flow(&clients, &deploy_args(targets()), &ctx, quiet(), &Never, never()).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(doc["grants"].as_array().unwrap().iter().all(|g| g["state"] == "exists"), "{doc:#}");
    assert_eq!(doc["executed"], true);
}

/// The execution role refuses (STS answers the code AccessDenied: "An error occurred
/// (AccessDenied) when calling the AssumeRole operation", AWS Knowledge Center
/// iam-assume-role-error, with the "User: ... is not authorized to perform: sts:AssumeRole on
/// resource: ..." message aws-sdk-go users quote for it): the error names the account and the
/// role, says what to fix or that key-account is the other way, and nothing was started: no
/// grant, no sharing, no StackSet.
#[tokio::test]
async fn a_refused_assume_role_names_account_and_role_and_starts_nothing() {
    let yaml = format!(
        "bake:\n  kms_key_id: {KEY}\nfleet:\n  accounts: [\"{OWNER}\", \"333333333333\"]\n  regions: [us-east-1]\n  execution_role_name: StackSetExec\n"
    );
    let (_d, ctx) = context(&yaml);
    let (sets, launch): (Seen<CreateStackSetInput>, Seen<ModifyImageAttributeInput>) = Default::default();
    let mut clients = grant_clients(vec![], &sets, &launch);
    let denied = mock!(aws_sdk_sts::Client::assume_role).then_error(|| {
        AssumeRoleError::generic(
            ErrorMetadata::builder()
                .code("AccessDenied")
                .message(
                    "User: arn:aws:iam::111111111111:user/ci is not authorized to perform: sts:AssumeRole on resource: arn:aws:iam::333333333333:role/StackSetExec",
                )
                .build(),
        )
    });
    let made_as: MadeAs = Default::default();
    clients.sts = mocked!(aws_sdk_sts, [denied], RetryConfig::disabled());
    clients.kms_as = kms_as(&made_as);
    let err = imgbuild::cmd::fleet_deploy_flow(&clients, &deploy_args(targets()), &ctx, quiet(), &Never, never()).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(&err, Error::Aws { operation: "AssumeRole", code, .. } if code == "AccessDenied"), "{err:?}");
    for want in ["333333333333", "arn:aws:iam::333333333333:role/StackSetExec", "trust policy", "fleet.execution_role_name", "fleet.grants_from: key-account"] {
        assert!(text.contains(want), "{want}: {text}");
    }
    assert!(made_as.lock().unwrap().is_empty() && launch.lock().unwrap().is_empty() && sets.lock().unwrap().is_empty(), "nothing started");
}

/// A service-managed fleet keeps the grants in the key's account (its member accounts have no
/// role imgbuild can assume): the plan says so, and names no role.
#[tokio::test]
async fn service_managed_grants_stay_in_the_key_account() {
    let (_d, ctx) = context(&format!(
        "bake:\n  kms_key_id: {KEY}\nfleet:\n  permission_model: service-managed\n  organizational_units: [\"{OU_ARN}\"]\n  regions: [us-east-1]\n"
    ));
    let list = list_instances(vec![instance("222222222222", "us-east-1", Some(OU), StackDriftStatus::NotChecked)]);
    let (images, snapshots) = image(KEY);
    let clients = clients_kms(
        &[&existing_set("an older template"), &list, &described_instance(&[])],
        &[&images, &snapshots],
        &[&handoff()],
        &[&describe_key(), &list_grants(vec![])],
    );
    let unscripted = crate::mock_client::unscripted();
    let clients = Clients { sts: unscripted.sts, kms_as: unscripted.kms_as, ..clients };
    let args = FleetDeployArgs { yes: false, no_execute: true, ..deploy_args(targets()) };
    let doc = imgbuild::cmd::fleet_deploy_flow(&clients, &args, &ctx, quiet(), &Never, never()).await.unwrap_or_else(|e| panic!("{e}"));
    let g = &doc["grants"][0];
    assert_eq!((g["account"].as_str(), g["state"].as_str(), g["from_account"].as_str()), (Some("222222222222"), Some("create"), Some(OWNER)), "{doc:#}");
    assert_eq!(g["from_role"], serde_json::Value::Null);
}

fn destroy_args(accounts: &[&str], keep: bool) -> FleetDestroyArgs {
    FleetDestroyArgs {
        targets: FleetTargetArgs { accounts: accounts.iter().map(|a| a.to_string()).collect(), ..targets() },
        yes: true,
        keep_sharing: keep,
        keep_grants: keep,
    }
}

/// `fleet destroy --accounts 333333333333`: once that account's last instance in the region is
/// gone, the image it was given (its ImageId override, read before the deletion) is no longer
/// shared with it (ModifyImageAttribute / ModifySnapshotAttribute with Remove) and its grant on
/// the key is revoked (RevokeGrant with the key ARN and the GrantId ListGrants gave); the other
/// accounts keep theirs. With --keep-sharing and --keep-grants nothing is taken back.
#[tokio::test]
async fn destroying_an_accounts_instances_revokes_its_sharing_and_grant_unless_kept() {
    let yaml = format!("bake:\n  kms_key_id: {KEY}\nfleet:\n  accounts: [\"{OWNER}\", \"222222222222\", \"333333333333\"]\n  regions: [us-east-1]\n");
    let (_d, ctx) = context(&yaml);
    let run = |keep: bool| {
        let launch: Seen<ModifyImageAttributeInput> = Default::default();
        let volumes: Seen<ModifySnapshotAttributeInput> = Default::default();
        let revokes: Seen<RevokeGrantInput> = Default::default();
        let list = list_instances(vec![
            instance(OWNER, "us-east-1", None, StackDriftStatus::NotChecked),
            instance("222222222222", "us-east-1", None, StackDriftStatus::NotChecked),
            instance("333333333333", "us-east-1", None, StackDriftStatus::NotChecked),
        ]);
        let delete = mock!(aws_sdk_cloudformation::Client::delete_stack_instances).then_output(|| {
            aws_sdk_cloudformation::operation::delete_stack_instances::DeleteStackInstancesOutput::builder().operation_id("imgbuild-delete").build()
        });
        let op = operation(vec![("DELETE", StackSetOperationStatus::Succeeded, None, 0)]);
        let res = results(vec![result("333333333333", "us-east-1", "SUCCEEDED", None)]);
        let (images, snapshots) = image(KEY);
        let modify_image = capturing!(mock!(aws_sdk_ec2::Client::modify_image_attribute), launch).then_output(|| ModifyImageAttributeOutput::builder().build());
        let modify_snapshot =
            capturing!(mock!(aws_sdk_ec2::Client::modify_snapshot_attribute), volumes).then_output(|| ModifySnapshotAttributeOutput::builder().build());
        let clients = clients_kms(
            &[&existing_set("the template"), &list, &described_instance(&[("ImageId", AMI)]), &delete, &op, &res],
            &[&images, &snapshots, &modify_image, &modify_snapshot],
            &[],
            &[&describe_key(), &list_grants(vec![("222222222222", "0c0c0c0c"), ("333333333333", "0d0d0d0d")]), &revoke_grant(&revokes)],
        );
        let ctx = &ctx;
        async move {
            let doc = imgbuild::cmd::fleet_destroy_flow(&clients, &destroy_args(&["333333333333"], keep), ctx, quiet(), &Never, never())
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            (doc, launch.lock().unwrap().clone(), volumes.lock().unwrap().clone(), revokes.lock().unwrap().clone())
        }
    };

    let (doc, launch, volumes, revokes) = run(false).await;
    assert_eq!(launch.len(), 1, "{launch:?}");
    assert_eq!(launch[0].image_id(), Some(AMI));
    let lp = launch[0].launch_permission().unwrap();
    assert!(lp.add().is_empty());
    assert_eq!(lp.remove().iter().filter_map(|p| p.user_id()).collect::<Vec<_>>(), ["333333333333"]);
    assert_eq!(volumes[0].snapshot_id(), Some(SNAPSHOT));
    assert_eq!(volumes[0].create_volume_permission().unwrap().remove().iter().filter_map(|p| p.user_id()).collect::<Vec<_>>(), ["333333333333"]);
    assert_eq!(revokes.len(), 1);
    assert_eq!((revokes[0].key_id(), revokes[0].grant_id()), (Some(KEY), Some("0d0d0d0d")));
    assert_eq!(doc["unshared"][0]["revoked_from"][0], "333333333333");
    assert_eq!(doc["revoked_grants"][0]["grant_id"], "0d0d0d0d");
    assert_eq!(doc["deleted_stack_set"], false);

    let (doc, launch, volumes, revokes) = run(true).await;
    assert!(launch.is_empty() && volumes.is_empty() && revokes.is_empty(), "--keep-sharing --keep-grants");
    assert_eq!(doc["unshared"], serde_json::json!([]));
    assert_eq!(doc["revoked_grants"], serde_json::json!([]));
}

/// Ctrl-C in a fleet that spans accounts: the grants and the sharing made before the operations
/// stay (they are not undone from here), and the exit says so and what takes them back.
#[tokio::test]
async fn ctrl_c_after_grants_says_they_were_kept() {
    let (_d, ctx) = context(&format!("bake:\n  kms_key_id: {KEY}\nfleet:\n  accounts: [\"{OWNER}\", \"222222222222\"]\n  regions: [us-east-1]\n"));
    let sets: Seen<CreateStackSetInput> = Default::default();
    let creates: Seen<CreateStackInstancesInput> = Default::default();
    let op = operation(vec![("CREATE", StackSetOperationStatus::Running, None, 0)]);
    let (images, snapshots) = image(KEY);
    let modify_image = mock!(aws_sdk_ec2::Client::modify_image_attribute).then_output(|| ModifyImageAttributeOutput::builder().build());
    let modify_snapshot = mock!(aws_sdk_ec2::Client::modify_snapshot_attribute).then_output(|| ModifySnapshotAttributeOutput::builder().build());
    let clients =
        clients(&[&no_set(), &create_set(&sets), &create_instances(&creates), &op], &[&images, &snapshots, &modify_image, &modify_snapshot], &[&handoff()]);
    let polled = op.clone();
    let interrupt = async move {
        while polled.num_calls() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let err = imgbuild::cmd::fleet_deploy_flow(&clients, &deploy_args(targets()), &ctx, quiet(), &Never, interrupt).await.unwrap_err();
    assert_eq!(err.exit_code(), 130, "{err}");
    let text = err.to_string();
    assert!(text.contains("kept: 1 KMS grant(s) to other accounts were made; the image was shared") && text.contains("`imgbuild fleet destroy`"), "{text}");
}
