//! What `imgbuild deploy` sends, judged by what CloudFormation, API Gateway, Auto Scaling and
//! EC2 do with it (issue 10). Each test names the documented behaviour it encodes. The AWS side
//! is scripted with aws-smithy-mocks; the requests deploy makes are captured and read back.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_smithy_mocks::{Rule, mock};
use aws_smithy_types::error::ErrorMetadata;
use aws_smithy_types::retry::RetryConfig;

use aws_sdk_cloudformation::operation::create_change_set::CreateChangeSetOutput;
use aws_sdk_cloudformation::operation::describe_change_set::DescribeChangeSetOutput;
use aws_sdk_cloudformation::operation::describe_stacks::{DescribeStacksError, DescribeStacksOutput};
use aws_sdk_cloudformation::types::{ChangeSetStatus, StackStatus};

use imgbuild::aws::Clients;
use imgbuild::cli::{DeployArgs, ToolArgs, WaitArgs};
use imgbuild::config::Context;
use imgbuild::stack::changeset::Confirmer;

use crate::support::tool_in_venv;

const STACK: &str = "vectordb";
const STACK_ID: &str = "arn:aws:cloudformation:us-east-1:123456789012:stack/vectordb/6c1e5a30-0000-11ef-0000-0a1b2c3d4e5f";
const CS_ID: &str = "arn:aws:cloudformation:us-east-1:123456789012:changeSet/imgbuild-x/9f8e7d6c-0000-11ef-0000-0a1b2c3d4e5f";
const STOCK_PARAMETER: &str = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64";
const STOCK_AMI: &str = "ami-0fedcba9876543210";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn meta(code: &str, message: &str) -> ErrorMetadata {
    ErrorMetadata::builder().code(code).message(message).build()
}

/// What one `deploy_flow` run sent: the CreateChangeSet request's body and parameters.
#[derive(Default, Clone)]
struct Sent {
    body: Arc<Mutex<Option<String>>>,
    parameters: Arc<Mutex<BTreeMap<String, String>>>,
}

/// The scripted account deploy talks to.
struct Account {
    /// The deployed stack's parameters, or None when the stack does not exist.
    deployed: Option<BTreeMap<String, String>>,
    /// The deployed stack's outputs.
    outputs: BTreeMap<String, String>,
    extra_cfn: Vec<Rule>,
    ec2: Vec<Rule>,
    apigw: Vec<Rule>,
    efs: Vec<Rule>,
}

impl Account {
    fn new() -> Self {
        Self { deployed: None, outputs: BTreeMap::new(), extra_cfn: Vec::new(), ec2: Vec::new(), apigw: vec![account_without_logging_role()], efs: Vec::new() }
    }

    /// An account whose stack exists, deployed with these parameters.
    fn deployed(parameters: &[(&str, &str)]) -> Self {
        Self { deployed: Some(parameters.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()), ..Self::new() }
    }
}

/// GetParameter, shaped like aws-cli `examples/ssm/get-parameter.rst` (Parameter.Name/Value).
fn parameter(name: &'static str, value: &'static str) -> Rule {
    mock!(aws_sdk_ssm::Client::get_parameter).match_requests(move |r| r.name() == Some(name)).then_output(move || {
        aws_sdk_ssm::operation::get_parameter::GetParameterOutput::builder()
            .parameter(aws_sdk_ssm::types::Parameter::builder().name(name).value(value).build())
            .build()
    })
}

/// A parameter that does not exist: error code ParameterNotFound (SSM API reference, GetParameter errors).
fn parameter_missing() -> Rule {
    use aws_sdk_ssm::operation::get_parameter::GetParameterError;
    mock!(aws_sdk_ssm::Client::get_parameter).match_requests(|r| r.name().is_some_and(|n| n.starts_with("/imgbuild/"))).then_error(|| {
        GetParameterError::ParameterNotFound(aws_sdk_ssm::types::error::ParameterNotFound::builder().meta(meta("ParameterNotFound", "")).build())
    })
}

/// GetAccount of an account that never set an API Gateway CloudWatch role: aws-cli
/// `examples/apigateway/get-account.rst` shows `cloudwatchRoleArn` only when one is set.
fn account_without_logging_role() -> Rule {
    mock!(aws_sdk_apigateway::Client::get_account).then_output(|| {
        aws_sdk_apigateway::operation::get_account::GetAccountOutput::builder()
            .throttle_settings(aws_sdk_apigateway::types::ThrottleSettings::builder().burst_limit(5000).rate_limit(10000.0).build())
            .build()
    })
}

/// GetAccount of an account whose API Gateway logs with `role` (aws-cli
/// `examples/apigateway/get-account.rst`).
fn account_with_logging_role(role: &'static str) -> Rule {
    mock!(aws_sdk_apigateway::Client::get_account).then_output(move || {
        aws_sdk_apigateway::operation::get_account::GetAccountOutput::builder()
            .cloudwatch_role_arn(role)
            .throttle_settings(aws_sdk_apigateway::types::ThrottleSettings::builder().burst_limit(1000).rate_limit(500.0).build())
            .build()
    })
}

fn deployed_stack(parameters: &BTreeMap<String, String>, outputs: &BTreeMap<String, String>) -> aws_sdk_cloudformation::types::Stack {
    let mut b = aws_sdk_cloudformation::types::Stack::builder().stack_name(STACK).stack_id(STACK_ID).stack_status(StackStatus::UpdateComplete);
    for (k, v) in parameters {
        b = b.parameters(aws_sdk_cloudformation::types::Parameter::builder().parameter_key(k).parameter_value(v).build());
    }
    for (k, v) in outputs {
        b = b.outputs(aws_sdk_cloudformation::types::Output::builder().output_key(k).output_value(v).build());
    }
    b.build()
}

fn clients(account: &Account, sent: &Sent) -> Clients {
    let deployed = account.deployed.clone();
    let outputs = account.outputs.clone();
    // DescribeStacks: the stack, or the ValidationError "Stack with id X does not exist"
    // (aws-cli examples/cloudformation/describe-stacks.rst; CloudFormation API, DescribeStacks).
    let describe =
        mock!(aws_sdk_cloudformation::Client::describe_stacks).match_requests(|r| r.stack_name() == Some(STACK)).then_compute_response(
            move |_| match &deployed {
                Some(p) => aws_smithy_mocks::MockResponse::Output(DescribeStacksOutput::builder().stacks(deployed_stack(p, &outputs)).build()),
                None => aws_smithy_mocks::MockResponse::Error(DescribeStacksError::generic(meta("ValidationError", "Stack with id vectordb does not exist"))),
            },
        );
    let capture = sent.clone();
    // CreateChangeSet answers Id and StackId (aws-cli examples/cloudformation/create-change-set.rst).
    let create = mock!(aws_sdk_cloudformation::Client::create_change_set)
        .match_requests(move |r| {
            *capture.body.lock().unwrap() = r.template_body().map(String::from);
            *capture.parameters.lock().unwrap() = r
                .parameters()
                .iter()
                .map(|p| (p.parameter_key().unwrap_or_default().to_string(), p.parameter_value().unwrap_or_default().to_string()))
                .collect();
            true
        })
        .then_output(|| CreateChangeSetOutput::builder().id(CS_ID).stack_id(STACK_ID).build());
    // DescribeChangeSet: CREATE_COMPLETE with no changes listed (aws-cli examples/cloudformation/describe-change-set.rst).
    let ready = mock!(aws_sdk_cloudformation::Client::describe_change_set)
        .then_output(|| DescribeChangeSetOutput::builder().change_set_id(CS_ID).stack_id(STACK_ID).status(ChangeSetStatus::CreateComplete).build());
    let mut cfn = vec![describe, create, ready];
    cfn.extend(account.extra_cfn.iter().cloned());
    let ssm = [parameter_missing(), parameter(STOCK_PARAMETER, STOCK_AMI)];
    let retry = RetryConfig::standard().with_initial_backoff(Duration::from_millis(1));
    let none: Vec<Rule> = Vec::new();
    Clients {
        cfn: mocked!(aws_sdk_cloudformation, cfn, retry.clone()),
        ec2: mocked!(aws_sdk_ec2, account.ec2, retry.clone()),
        efs: mocked!(aws_sdk_efs, account.efs, retry.clone()),
        ssm: mocked!(aws_sdk_ssm, ssm, retry.clone()),
        elb: mocked!(aws_sdk_elasticloadbalancingv2, none, retry.clone()),
        apigw: mocked!(aws_sdk_apigateway, account.apigw, retry.clone()),
        backup: mocked!(aws_sdk_backup, Vec::<Rule>::new(), retry),
        ..crate::mock_client::unscripted()
    }
}

struct Never;

impl Confirmer for Never {
    fn confirm<'a>(&'a self, _: &'a str) -> std::pin::Pin<Box<dyn std::future::Future<Output = imgbuild::Result<bool>> + Send + 'a>> {
        Box::pin(async { panic!("--no-execute never asks") })
    }
}

fn args() -> DeployArgs {
    DeployArgs {
        ami: None,
        mode: None,
        template: None,
        yes: false,
        no_execute: true,
        update_base: false,
        disable_rollback: false,
        no_drift_check: false,
        no_rollback_triggers: false,
        wait: WaitArgs { wait: false, timeout: Some(60) },
        tools: ToolArgs { require_tools: false, no_tools: true },
    }
}

fn context(config: &str) -> (tempfile::TempDir, Context) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("imgbuild.yaml");
    std::fs::write(&path, format!("name: {STACK}\nregion: us-east-1\n{config}")).unwrap();
    let ctx = Context::load(Some(&path), None, None, None).unwrap();
    (dir, ctx)
}

/// Runs deploy (`--no-execute`) against `account` with `config`; what it sent, or its error.
fn deploy_with(account: &Account, config: &str, args: DeployArgs) -> (imgbuild::Result<serde_json::Value>, Sent) {
    let (_dir, ctx) = context(config);
    let sent = Sent::default();
    let clients = clients(account, &sent);
    let ui = imgbuild::ui::Ui::new(imgbuild::cli::OutputFormat::Text, 0, true);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let out = rt.block_on(imgbuild::cmd::deploy_flow(&clients, &args, &ctx, ui, &Never, std::future::pending()));
    (out, sent)
}

fn deploy(account: &Account, config: &str) -> Sent {
    let (out, sent) = deploy_with(account, config, args());
    out.unwrap_or_else(|e| panic!("deploy failed: {e}"));
    sent
}

fn body_of(sent: &Sent) -> String {
    sent.body.lock().unwrap().clone().expect("CreateChangeSet was called with a TemplateBody")
}

/// Reads a template the way CloudFormation does (YAML 1.1, PyYAML), short-form tags as their
/// long forms, and prints it as JSON with every scalar's YAML 1.1 type next to it.
const YAML11: &str = r#"
import json, sys, yaml

class Loader(yaml.SafeLoader):
    pass

def tagged(loader, suffix, node):
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if suffix in ("Ref", "Condition"):
        return {suffix: value}
    if suffix == "GetAtt" and isinstance(value, str):
        return {"Fn::GetAtt": value.split(".", 1)}
    return {"Fn::" + suffix: value}

Loader.add_multi_constructor("!", tagged)

def typed(v):
    if isinstance(v, dict):
        return {str(k): typed(x) for k, x in v.items()}
    if isinstance(v, list):
        return [typed(x) for x in v]
    return [type(v).__name__, str(v)]

print(json.dumps(typed(yaml.load(open(sys.argv[1]), Loader=Loader))))
"#;

fn read_as_yaml11(path: &Path) -> Option<serde_json::Value> {
    let python = tool_in_venv("python")?;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("yaml11.py");
    std::fs::write(&script, YAML11).unwrap();
    let out = Command::new(python).arg(&script).arg(path).output().unwrap();
    assert!(out.status.success(), "PyYAML could not read {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

/// Every scalar of `file` has the same YAML 1.1 type at the same place in `sent`. Deploy's own
/// edits are allowed: the user-data slot, and resources it renames (the API deployment).
fn same_types(file: &serde_json::Value, sent: &serde_json::Value, at: &str, bad: &mut Vec<String>) {
    use serde_json::Value as J;
    if at.ends_with("/LaunchTemplateData/UserData") {
        return;
    }
    match (file, sent) {
        (J::Object(f), J::Object(s)) => {
            for (k, fv) in f {
                let sv = s.get(k).or_else(|| {
                    // A renamed resource keeps its name as a prefix (`Deployment` -> `Deployment1a2b...`).
                    (at == "/Resources").then(|| s.iter().find(|(sk, _)| sk.starts_with(k.as_str()) && !f.contains_key(sk.as_str())).map(|(_, v)| v)).flatten()
                });
                match sv {
                    Some(sv) => same_types(fv, sv, &format!("{at}/{k}"), bad),
                    None => bad.push(format!("{at}/{k}: missing from the body sent")),
                }
            }
        }
        (J::Array(f), J::Array(s)) if f.len() == 2 && f[0].is_string() && s.len() == 2 && s[0].is_string() && !f[1].is_array() => {
            // A typed scalar: [type, text].
            if f[0] != s[0] {
                bad.push(format!("{at}: the file means {} {} but CloudFormation reads {} {}", f[0], f[1], s[0], s[1]));
            }
        }
        (J::Array(f), J::Array(s)) if f.len() == s.len() => {
            for (i, (fv, sv)) in f.iter().zip(s).enumerate() {
                same_types(fv, sv, &format!("{at}/{i}"), bad);
            }
        }
        _ => bad.push(format!("{at}: shape differs ({file} vs {sent})")),
    }
}

/// Fault 1. CloudFormation reads YAML templates as YAML 1.1, where plain `on`/`off`/`yes`/`no`
/// are booleans (aws-cli PR #5257 "Always quote YAML boolean strings for cloudformation
/// package"; aws-cloudformation/rain issue #480). The body deploy sends, read that way, must
/// mean what infra/stack.yaml means: `EnforceSecurityGroupInboundRulesOnPrivateLinkTraffic`
/// stays the string "off", not `false`.
#[test]
fn the_body_sent_means_to_a_yaml_1_1_reader_what_the_file_means() {
    let sent = deploy(&Account::new(), "");
    let dir = tempfile::tempdir().unwrap();
    let body_path = dir.path().join("sent-body");
    std::fs::write(&body_path, body_of(&sent)).unwrap();
    let Some(file) = read_as_yaml11(&repo().join("infra/stack.yaml")) else { return };
    let body = read_as_yaml11(&body_path).unwrap();
    let nlb = &body["Resources"]["LoadBalancer"]["Properties"]["EnforceSecurityGroupInboundRulesOnPrivateLinkTraffic"];
    assert_eq!(nlb, &serde_json::json!(["str", "off"]), "the NLB attribute as CloudFormation reads it");
    let mut bad = Vec::new();
    same_types(&file, &body, "", &mut bad);
    assert!(bad.is_empty(), "the body sent differs from infra/stack.yaml for a YAML 1.1 reader:\n  {}", bad.join("\n  "));
}

/// The API deployment of a body sent: its logical id, and the id the stage points at.
fn deployment_of(sent: &Sent) -> (String, String) {
    let body: serde_json::Value = serde_json::from_str(&body_of(sent)).unwrap();
    let resources = body["Resources"].as_object().unwrap();
    let ids: Vec<&String> = resources.iter().filter(|(_, r)| r["Type"] == "AWS::ApiGateway::Deployment").map(|(k, _)| k).collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let stage = resources.values().find(|r| r["Type"] == "AWS::ApiGateway::Stage").unwrap();
    (ids[0].clone(), stage["Properties"]["DeploymentId"]["Ref"].as_str().unwrap().to_string())
}

/// Fault 2. A change to a method's integration (here its URI, through `chroma.port`) reaches
/// clients only through a new deployment: "Updates to REST APIs that require redeployment"
/// (API Gateway developer guide). CloudFormation creates one only for a new logical id, so the
/// id must follow the API's inputs, and stay put when they do not change ("no changes").
#[test]
fn the_api_deployment_id_follows_what_feeds_the_api() {
    let account = Account::new();
    let (first, stage) = deployment_of(&deploy(&account, ""));
    assert_eq!(first, stage, "the stage serves the deployment deploy made");
    assert_ne!(first, "Deployment", "a fixed id never redeploys");
    let (again, _) = deployment_of(&deploy(&account, ""));
    assert_eq!(first, again, "equal inputs, equal deployment");
    let (ported, stage) = deployment_of(&deploy(&account, "chroma:\n  port: 8080\n"));
    assert_ne!(first, ported, "a new integration URI needs a new deployment");
    assert_eq!(ported, stage);
    // The instance's own settings do not feed the API: no redeployment for them.
    let (resized, _) = deployment_of(&deploy(&account, "stack:\n  instance_type: t3a.medium\n"));
    assert_eq!(first, resized);
}

fn sent_parameter(sent: &Sent, key: &str) -> Option<String> {
    sent.parameters.lock().unwrap().get(key).cloned()
}

/// Fault 5. `AWS::ApiGateway::Account` sets the one CloudWatch role of every REST API in the
/// account and region ("Set up CloudWatch logging for REST APIs in API Gateway": the role is
/// an account-level setting), so the stack sets it only when GetAccount reports none, or when
/// the role set is the one this stack created (its output). aws-cli
/// `examples/apigateway/get-account.rst` is the answer's shape.
#[test]
fn the_account_logging_role_is_set_only_when_the_account_has_none() {
    let sent = deploy(&Account::new(), "");
    assert_eq!(sent_parameter(&sent, "ApiGatewayCloudWatchRoleArn").as_deref(), Some(""));
    let body: serde_json::Value = serde_json::from_str(&body_of(&sent)).unwrap();
    assert_eq!(body["Resources"]["ApiGatewayAccount"]["Condition"], "CreatesApiGatewayAccount");
    assert_eq!(body["Conditions"]["CreatesApiGatewayAccount"], serde_json::json!({"Fn::Equals": [{"Ref": "ApiGatewayCloudWatchRoleArn"}, ""]}));

    let theirs = "arn:aws:iam::123412341234:role/APIGatewayToCloudWatchLogsRole";
    let mut account = Account::new();
    account.apigw = vec![account_with_logging_role(theirs)];
    let sent = deploy(&account, "");
    assert_eq!(sent_parameter(&sent, "ApiGatewayCloudWatchRoleArn").as_deref(), Some(theirs), "another API's role is left alone");

    // The role this stack set earlier: the stack keeps owning it.
    let ours = "arn:aws:iam::123456789012:role/vectordb-ApiGatewayCloudWatchRole-1A2B3C4D5E6F";
    let mut account = Account::deployed(&[("ImageId", STOCK_AMI)]);
    account.outputs.insert("ApiGatewayCloudWatchRoleArn".into(), ours.into());
    account.apigw = vec![account_with_logging_role(ours)];
    let sent = deploy(&account, "");
    assert_eq!(sent_parameter(&sent, "ApiGatewayCloudWatchRoleArn").as_deref(), Some(""));
}

const RUNNING_AMI: &str = "ami-0aaaaaaaaaaaaaaa1";

/// DescribeImages of the AMI the stack runs, a stock one (no imgbuild tags), shaped like
/// aws-cli `examples/ec2/describe-images.rst`.
fn running_image(tags: &'static [(&'static str, &'static str)]) -> Rule {
    mock!(aws_sdk_ec2::Client::describe_images).match_requests(|r| r.image_ids() == [RUNNING_AMI.to_string()]).then_output(move || {
        let mut image = aws_sdk_ec2::types::Image::builder()
            .image_id(RUNNING_AMI)
            .name("al2023-ami-2023.6.20241010.0-kernel-6.1-x86_64")
            .state(aws_sdk_ec2::types::ImageState::Available);
        for (k, v) in tags {
            image = image.tags(aws_sdk_ec2::types::Tag::builder().key(*k).value(*v).build());
        }
        aws_sdk_ec2::operation::describe_images::DescribeImagesOutput::builder().images(image.build()).build()
    })
}

/// Fault 4. AWS's public AL2023 parameter moves to each new release ("Query for the latest
/// Amazon Linux AMI IDs using AWS Systems Manager Parameter Store"), and a new ImageId in the
/// launch template makes the group's rolling update replace the instance
/// (AutoScalingRollingUpdate, "UpdatePolicy attribute"). An unrelated deploy keeps the image
/// the stack runs; `--update-base` moves, and says the instance will be replaced.
#[test]
fn a_new_al2023_release_does_not_replace_the_instance_until_asked() {
    let mut account = Account::deployed(&[("ImageId", RUNNING_AMI)]);
    let image = running_image(&[]);
    account.ec2 = vec![image.clone()];
    let sent = deploy(&account, "");
    assert_eq!(sent_parameter(&sent, "ImageId").as_deref(), Some(RUNNING_AMI), "the running base image is kept");
    assert_eq!(image.num_calls(), 1, "its existence was checked");

    let (out, sent) = deploy_with(&account, "", DeployArgs { update_base: true, ..args() });
    out.unwrap();
    assert_eq!(sent_parameter(&sent, "ImageId").as_deref(), Some(STOCK_AMI), "--update-base moves to the published release");

    // A baked image the stack ran (handoff gone) is not a stock base to keep.
    let mut account = Account::deployed(&[("ImageId", RUNNING_AMI)]);
    account.ec2 = vec![running_image(&[("imgbuild:chroma-version", "1.5.9")])];
    assert_eq!(sent_parameter(&deploy(&account, ""), "ImageId").as_deref(), Some(STOCK_AMI));
}

/// Fault 7. With instance metadata tags on (the boot reads its deploy-time values from them),
/// "instance tag keys can't contain spaces or /" and every launch with such a key fails
/// ("View tags for your EC2 instances using instance metadata", EC2 user guide). Deploy refuses
/// the template before any change set exists, naming the key and where it comes from.
#[test]
fn instance_tag_keys_that_break_metadata_tags_are_refused_before_deploying() {
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("stack.yaml");
    let text = std::fs::read_to_string(repo().join("infra/stack.yaml")).unwrap();
    let broken = text.replacen(
        "              - {Key: Name, Value: !Ref AWS::StackName}\n",
        "              - {Key: Name, Value: !Ref AWS::StackName}\n              - {Key: team/owner, Value: search}\n",
        1,
    );
    assert_ne!(broken, text);
    std::fs::write(&template, broken).unwrap();
    let (out, sent) = deploy_with(&Account::new(), "", DeployArgs { template: Some(template), ..args() });
    let err = out.unwrap_err().to_string();
    assert!(err.contains("\"team/owner\"") && err.contains("LaunchTemplate") && err.contains("space or '/'"), "{err}");
    assert!(sent.body.lock().unwrap().is_none(), "no change set was created");
    // The reference template and deploy's own stack tag pass.
    deploy(&Account::new(), "");
}

const RETAINED_FS: &str = "fs-0123456789abcdef0";
const RETAINED_FS_ARN: &str = "arn:aws:elasticfilesystem:us-east-1:123456789012:file-system/fs-0123456789abcdef0";

/// DescribeFileSystems of the file system a destroyed stack retained: available, encrypted
/// (EFS API reference, DescribeFileSystems / FileSystemDescription).
fn retained_file_system() -> Rule {
    use aws_sdk_efs::types::{FileSystemDescription, FileSystemSize, LifeCycleState, PerformanceMode};
    mock!(aws_sdk_efs::Client::describe_file_systems).match_requests(|r| r.file_system_id() == Some(RETAINED_FS)).then_output(|| {
        aws_sdk_efs::operation::describe_file_systems::DescribeFileSystemsOutput::builder()
            .file_systems(
                FileSystemDescription::builder()
                    .owner_id("123456789012")
                    .creation_token("vectordb-FileSystem-1A2B3C")
                    .file_system_id(RETAINED_FS)
                    .file_system_arn(RETAINED_FS_ARN)
                    .creation_time(aws_smithy_types::DateTime::from_secs(1_700_000_000))
                    .life_cycle_state(LifeCycleState::Available)
                    .number_of_mount_targets(0)
                    .size_in_bytes(FileSystemSize::builder().value(6144).build())
                    .performance_mode(PerformanceMode::GeneralPurpose)
                    .encrypted(true)
                    .tags(aws_sdk_efs::types::Tag::builder().key("Name").value("vectordb").build().unwrap())
                    .build()
                    .unwrap(),
            )
            .build()
    })
}

/// DescribeMountTargets: `targets` as (id, subnet, vpc), shaped like aws-cli
/// `examples/efs/create-mount-target.rst`.
fn mount_targets(targets: &'static [(&'static str, &'static str, &'static str)]) -> Rule {
    mock!(aws_sdk_efs::Client::describe_mount_targets).match_requests(|r| r.file_system_id() == Some(RETAINED_FS)).then_output(move || {
        let mut out = aws_sdk_efs::operation::describe_mount_targets::DescribeMountTargetsOutput::builder();
        for (id, subnet, vpc) in targets {
            out = out.mount_targets(
                aws_sdk_efs::types::MountTargetDescription::builder()
                    .mount_target_id(*id)
                    .file_system_id(RETAINED_FS)
                    .subnet_id(*subnet)
                    .vpc_id(*vpc)
                    .life_cycle_state(aws_sdk_efs::types::LifeCycleState::Available)
                    .build()
                    .unwrap(),
            );
        }
        out.build()
    })
}

/// PutFileSystemPolicy, capturing the policy sent; answers FileSystemId and Policy (EFS API
/// reference, PutFileSystemPolicy).
fn put_policy(into: Arc<Mutex<Option<String>>>) -> Rule {
    mock!(aws_sdk_efs::Client::put_file_system_policy)
        .match_requests(move |r| {
            *into.lock().unwrap() = r.policy().map(String::from);
            r.file_system_id() == Some(RETAINED_FS)
        })
        .then_output(|| aws_sdk_efs::operation::put_file_system_policy::PutFileSystemPolicyOutput::builder().file_system_id(RETAINED_FS).build())
}

/// Fault 8. `destroy` retains the file system (DeletionPolicy Retain) but its mount targets go
/// with the stack's VPC, and its policy names a role that no longer exists. With
/// `efs.file_system_id` the stack must create no file system, put its mount targets on the
/// given one (EFS: mount targets of one file system live in one VPC, one per zone, "Managing
/// mount targets"), and the policy must admit the new instance role, so the instance mounts
/// the same file system and Chroma finds its data. The boot learns the id from the
/// ImgbuildFileSystemId tag, which must name the given file system.
#[test]
fn a_retained_file_system_is_reattached_with_its_policy_for_the_new_role() {
    let policy = Arc::new(Mutex::new(None));
    let put = put_policy(policy.clone());
    let mut account = Account::new();
    account.efs = vec![retained_file_system(), mount_targets(&[]), put.clone()];
    let sent = deploy(&account, &format!("efs:\n  file_system_id: {RETAINED_FS}\n"));

    assert_eq!(sent_parameter(&sent, "FileSystemId").as_deref(), Some(RETAINED_FS));
    let body: serde_json::Value = serde_json::from_str(&body_of(&sent)).unwrap();
    let r = &body["Resources"];
    assert_eq!(r["FileSystem"]["Condition"], "CreatesFileSystem", "no new file system when one is given");
    let given = serde_json::json!({"Fn::If": ["CreatesFileSystem", {"Ref": "FileSystem"}, {"Ref": "FileSystemId"}]});
    assert_eq!(r["MountTargetA"]["Properties"]["FileSystemId"], given);
    assert_eq!(r["MountTargetB"]["Properties"]["FileSystemId"], given);
    let tags = r["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["TagSpecifications"][0]["Tags"].as_array().unwrap();
    assert_eq!(tags.iter().find(|t| t["Key"] == "ImgbuildFileSystemId").unwrap()["Value"], given, "the boot mounts the given file system");
    assert_eq!(r["InstanceRole"]["Properties"]["Path"], serde_json::json!({"Fn::Sub": "/imgbuild/${AWS::StackName}/"}));
    assert_eq!(body["Outputs"]["FileSystemId"]["Value"], given, "a later destroy names the same file system");

    assert_eq!(put.num_calls(), 1);
    let policy: serde_json::Value = serde_json::from_str(policy.lock().unwrap().as_deref().unwrap()).unwrap();
    let allow = &policy["Statement"][0];
    assert_eq!(allow["Effect"], "Allow");
    assert_eq!(allow["Resource"], RETAINED_FS_ARN);
    assert_eq!(allow["Condition"]["ArnLike"]["aws:PrincipalArn"], "arn:aws:iam::123456789012:role/imgbuild/vectordb/*");
    assert_eq!(allow["Condition"]["Bool"]["elasticfilesystem:AccessedViaMountTarget"], "true");
    assert_eq!(policy["Statement"][1]["Effect"], "Deny", "TLS stays required");
    assert_eq!(policy["Statement"][1]["Condition"]["Bool"]["aws:SecureTransport"], "false");
}

/// Fault 8, the refusal: a file system that still has mount targets (another stack's VPC) cannot
/// take this stack's, so deploy stops before touching its policy or creating a change set.
#[test]
fn a_file_system_still_mounted_elsewhere_is_refused_untouched() {
    let policy = Arc::new(Mutex::new(None));
    let put = put_policy(policy.clone());
    let mut account = Account::new();
    account.efs = vec![retained_file_system(), mount_targets(&[("fsmt-0aaaabbbbcccc1111", "subnet-0abc1234def567890", "vpc-0a1b2c3d4e5f60718")]), put.clone()];
    let (out, sent) = deploy_with(&account, &format!("efs:\n  file_system_id: {RETAINED_FS}\n"), args());
    let err = out.unwrap_err().to_string();
    assert!(err.contains("efs.file_system_id") && err.contains("fsmt-0aaaabbbbcccc1111") && err.contains("vpc-0a1b2c3d4e5f60718"), "{err}");
    assert_eq!(put.num_calls(), 0);
    assert!(sent.body.lock().unwrap().is_none());
}

/// Whether `pattern` (a CloudFormation AllowedPattern: the whole value must match) accepts each
/// value, decided by Python's `re`, close to the Java regex CloudFormation uses.
fn pattern_accepts(pattern: &str, values: &[&str]) -> Option<Vec<bool>> {
    let python = tool_in_venv("python")?;
    let script = "import json, re, sys\np, vs = json.loads(sys.argv[1])\nprint(json.dumps([re.fullmatch(p, v) is not None for v in vs]))";
    let out = Command::new(python).args(["-c", script, &serde_json::json!([pattern, values]).to_string()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

/// Fault 10, the config side. CloudFormation refuses a parameter value outside MinValue/MaxValue
/// or AllowedPattern ("Parameters", CloudFormation user guide) only once the change set is
/// requested; `validate` must refuse the same `chroma.port` and `stack.allowed_client_cidr`
/// values, naming the field, and accept every value the template accepts.
#[test]
fn the_config_accepts_exactly_the_ports_and_cidrs_the_template_accepts() {
    let t = imgbuild::stack::template::Template::reference();
    let port = &t.document()["Parameters"]["ChromaPort"];
    let (min, max) = (port["MinValue"].as_u64().unwrap(), port["MaxValue"].as_u64().unwrap());
    for p in [1u64, 22, 80, 443, 1023, 1024, 8000, 8080, 65535] {
        let config = imgbuild::config::parse(&format!("chroma:\n  port: {p}\n"), "imgbuild.yaml");
        let template_ok = (min..=max).contains(&p);
        assert_eq!(config.is_ok(), template_ok, "port {p}: config {:?}, template {template_ok}", config.as_ref().err().map(|e| e.to_string()));
        if let Err(e) = config {
            assert!(e.to_string().contains("chroma.port"), "{e}");
        }
    }
    let pattern = t.document()["Parameters"]["AllowedClientCidr"]["AllowedPattern"].as_str().unwrap().to_string();
    let cidrs = ["10.0.0.0/7", "8.0.0.0/6", "128.0.0.0/1", "10.0.0.0/8", "10.20.0.0/16", "192.168.1.0/24", "192.168.1.7/32"];
    let Some(verdicts) = pattern_accepts(&pattern, &cidrs) else { return };
    for (cidr, template_ok) in cidrs.iter().zip(verdicts) {
        let config = imgbuild::config::parse(&format!("stack:\n  allowed_client_cidr: {cidr}\n"), "imgbuild.yaml");
        assert_eq!(config.is_ok(), template_ok, "{cidr}: config {:?}, template {template_ok}", config.as_ref().err().map(|e| e.to_string()));
        if let Err(e) = config {
            assert!(e.to_string().contains("stack.allowed_client_cidr"), "{e}");
        }
    }
}

/// Fault 11, smoke. TestInvokeMethod's `http_method` is the verb of the simulated request (API
/// Gateway API reference, TestInvokeMethod); on the `{proxy+}` resource whose only method is
/// `ANY`, a GET is answered by the ANY method and passed on by the HTTP_PROXY integration, as a
/// client's GET is (the stack's reference article test-invokes `--http-method GET` on such a
/// resource). Sending "ANY" would pass a verb no client sends to Chroma.
#[test]
fn smoke_test_invokes_with_the_verb_a_client_sends() {
    let verbs = Arc::new(Mutex::new(Vec::new()));
    let seen = verbs.clone();
    // GetResources: items with id and path (aws-cli examples/apigateway/get-resources.rst).
    let resources = mock!(aws_sdk_apigateway::Client::get_resources).then_output(|| {
        aws_sdk_apigateway::operation::get_resources::GetResourcesOutput::builder()
            .items(aws_sdk_apigateway::types::Resource::builder().id("root1").path("/").build())
            .items(aws_sdk_apigateway::types::Resource::builder().id("prx1").parent_id("root1").path_part("{proxy+}").path("/{proxy+}").build())
            .build()
    });
    // TestInvokeMethod: status, body, latency (aws-cli examples/apigateway/test-invoke-method.rst).
    let invoke = mock!(aws_sdk_apigateway::Client::test_invoke_method)
        .match_requests(move |r| {
            seen.lock().unwrap().push(r.http_method().unwrap_or_default().to_string());
            true
        })
        .then_output(|| aws_sdk_apigateway::operation::test_invoke_method::TestInvokeMethodOutput::builder().status(200).body("{}").latency(9).build());
    let retry = RetryConfig::standard().with_initial_backoff(Duration::from_millis(1));
    let none: Vec<Rule> = Vec::new();
    let apigw = [resources, invoke];
    let clients = Clients {
        cfn: mocked!(aws_sdk_cloudformation, none, retry.clone()),
        ec2: mocked!(aws_sdk_ec2, none, retry.clone()),
        efs: mocked!(aws_sdk_efs, none, retry.clone()),
        ssm: mocked!(aws_sdk_ssm, none, retry.clone()),
        elb: mocked!(aws_sdk_elasticloadbalancingv2, none, retry.clone()),
        apigw: mocked!(aws_sdk_apigateway, apigw, retry.clone()),
        backup: mocked!(aws_sdk_backup, Vec::<Rule>::new(), retry),
        ..crate::mock_client::unscripted()
    };
    let profile = imgbuild::chroma::profile(&imgbuild::chroma::parse_version("1.5.9").unwrap()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let report = rt.block_on(imgbuild::smoke::through_api_gateway(&clients, "abc123", profile)).unwrap();
    assert!(report.ok());
    assert_eq!(*verbs.lock().unwrap(), ["GET", "GET"]);
    assert!(report.target.contains("not the endpoint, resource policy or deployed stage"), "{}", report.target);
}

/// Fault 11, limits. A REST API integration times out after 29 s by default ("Amazon API Gateway
/// quotas": integration timeout 50 ms - 29 s, raisable for Regional and private REST APIs);
/// `stack.integration_timeout_ms` reaches the method's integration, and a change to it is an
/// API change that needs a new deployment.
#[test]
fn the_integration_timeout_is_the_config_s_and_redeploys_the_api() {
    let sent = deploy(&Account::new(), "");
    assert_eq!(sent_parameter(&sent, "IntegrationTimeoutMs").as_deref(), Some("29000"));
    let body: serde_json::Value = serde_json::from_str(&body_of(&sent)).unwrap();
    let method = body["Resources"].as_object().unwrap().values().find(|r| r["Type"] == "AWS::ApiGateway::Method").unwrap();
    assert_eq!(method["Properties"]["Integration"]["TimeoutInMillis"], serde_json::json!({"Ref": "IntegrationTimeoutMs"}));
    let longer = deploy(&Account::new(), "stack:\n  integration_timeout_ms: 60000\n");
    assert_eq!(sent_parameter(&longer, "IntegrationTimeoutMs").as_deref(), Some("60000"));
    assert_ne!(deployment_of(&sent).0, deployment_of(&longer).0);
}

/// Fault 8 on moto, end to end: deploy a stack with a retained file system, destroy it (the
/// file system stays, and destroy says how to reattach it), then deploy the real template with
/// `efs.file_system_id`: deploy puts the file system's policy for the new stack's role path and
/// CloudFormation gets a change set that uses the given file system. The boot then mounts that
/// file system where the first boot mounted it, so Chroma opens the same data directory. moto
/// cannot execute the real template (its CloudFormation makes the NLB an application LB), so the
/// last deploy stops at the computed change set.
#[test]
fn destroy_then_deploy_with_the_retained_file_system_reaches_the_same_data() {
    use imgbuild::render::{Format, Mode};
    let Some(moto) = crate::services::moto() else { return };
    let url = &moto.url;
    let dir = tempfile::tempdir().unwrap();
    let write_config = |extra: &str| {
        std::fs::write(dir.path().join("imgbuild.yaml"), format!("name: reattach\nregion: us-east-1\naws:\n  poll_interval_secs: 1\n{extra}")).unwrap()
    };
    let run = |args: &[&str]| crate::support::imgbuild(dir.path()).args(["--endpoint-url", url]).args(args).output().unwrap();
    let fixture = repo().join("tests/fixtures/moto-efs-stack.yaml");

    // The stack of an earlier deploy, with its file system. Created directly: moto fills no
    // outputs for a stack made through a change set, and destroy reads FileSystemId from them.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let conf = rt.block_on(
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(url)
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_efs::config::Credentials::new("testing", "testing", None, None, "tests"))
            .load(),
    );
    let cfn = aws_sdk_cloudformation::Client::new(&conf);
    let efs = aws_sdk_efs::Client::new(&conf);
    rt.block_on(cfn.create_stack().stack_name("reattach").template_body(std::fs::read_to_string(&fixture).unwrap()).send()).unwrap();
    let created = rt.block_on(cfn.describe_stacks().stack_name("reattach").send()).unwrap();
    let fs = created.stacks()[0]
        .outputs()
        .iter()
        .find(|o| o.output_key() == Some("FileSystemId"))
        .and_then(|o| o.output_value())
        .expect("the stack's file system")
        .to_string();

    write_config("");
    let out = run(&["destroy", "--yes"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&format!("set efs.file_system_id: {fs} to reattach it")), "{err}");

    let kept = rt.block_on(efs.describe_file_systems().file_system_id(&fs).send()).unwrap();
    assert_eq!(kept.file_systems().len(), 1, "destroy kept the file system");

    write_config(&format!("efs:\n  file_system_id: {fs}\n"));
    let out = run(&["--output", "json", "deploy", "--no-execute", "--no-tools"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&format!("reattaching EFS file system {fs}")), "{err}");
    // Fault 3, the deploy output: how long the stack waits for the signal, and what a failure means.
    assert!(err.contains("AutoScalingGroup waits up to 20 min for the instance to signal that Chroma answers on it"), "{err}");
    assert!(err.contains("a FAILURE signal, or none in time, rolls the stack back"), "{err}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let policy = rt.block_on(efs.describe_file_system_policy().file_system_id(&fs).send()).unwrap();
    let policy: serde_json::Value = serde_json::from_str(policy.policy().unwrap()).unwrap();
    assert_eq!(policy["Statement"][0]["Condition"]["ArnLike"]["aws:PrincipalArn"], "arn:aws:iam::123456789012:role/imgbuild/reattach/*", "{policy}");
    let cs = doc["deploy"]["change_set"].as_str().unwrap().to_string();
    let set = rt.block_on(cfn.describe_change_set().change_set_name(&cs).send()).unwrap();
    let given: Vec<_> = set.parameters().iter().filter(|p| p.parameter_key() == Some("FileSystemId")).filter_map(|p| p.parameter_value()).collect();
    assert_eq!(given, [fs.as_str()], "the stack is told to use the retained file system");

    // The same data: the reattached boot mounts the retained file system where the first boot
    // mounted the stack's one, and Chroma gets the same data directory.
    let first = crate::support::render_with(&imgbuild::config::Config::default(), None, Mode::Full, Format::CloudConfig, false);
    let again = crate::support::render_with(&crate::support::parse(&format!("efs:\n  file_system_id: {fs}\n")), None, Mode::Full, Format::CloudConfig, false);
    let text = |r: &imgbuild::render::Rendered| String::from_utf8(r.raw.clone()).unwrap();
    assert!(text(&again).contains(&format!("file_system_id=\"{fs}\"")), "the boot mounts {fs}");
    let mounts = |t: &str| t.lines().filter(|l| l.contains("/mnt/chroma")).map(String::from).collect::<Vec<_>>();
    assert!(mounts(&text(&first)).iter().any(|l| l.trim() == "source: /mnt/chroma/data"), "{:?}", mounts(&text(&first)));
    assert_eq!(mounts(&text(&first)), mounts(&text(&again)), "same mount point and data directory");

    rt.block_on(async {
        cfn.delete_change_set().change_set_name(&cs).send().await.unwrap();
        cfn.delete_stack().stack_name("reattach").send().await.unwrap();
    });
}

/// A stack attached to a given file system (a restore or an earlier `efs.file_system_id`) keeps
/// it when the config does not name one: with `FileSystemId` empty the template's
/// `CreatesFileSystem` condition makes a new, empty file system, the reattached one leaves the
/// stack (retained), and Chroma comes back serving an empty database. Like the base image, the
/// deployed stack's parameter (CloudFormation keeps it with the stack) is the record.
#[test]
fn a_stack_on_a_reattached_file_system_keeps_it_when_the_config_names_none() {
    let mut account = Account::deployed(&[("ImageId", RUNNING_AMI), ("FileSystemId", RETAINED_FS)]);
    account.ec2 = vec![running_image(&[])];
    let (out, sent) = deploy_with(&account, "", args());
    let doc = out.unwrap();
    assert_eq!(sent_parameter(&sent, "FileSystemId").as_deref(), Some(RETAINED_FS), "the attached file system is kept");
    let notices = doc["deploy"]["notices"].to_string();
    assert!(notices.contains(RETAINED_FS) && notices.contains("efs.file_system_id"), "the notice names it and the way to change it: {notices}");

    // A stack that made its own file system keeps making no claim on another.
    let mut account = Account::deployed(&[("ImageId", RUNNING_AMI), ("FileSystemId", "")]);
    account.ec2 = vec![running_image(&[])];
    assert_eq!(sent_parameter(&deploy(&account, ""), "FileSystemId").as_deref(), Some(""));
}
