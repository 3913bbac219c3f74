//! Issue 16: what imgbuild promises holds against what AWS really answers, and the output
//! contract (one JSON document, quiet end on a closed pipe). Scripted answers take their shape
//! from AWS's documentation or the aws-cli examples, cited at each fixture.

use std::process::Stdio;
use std::time::Duration;

use aws_smithy_mocks::{Rule, mock};
use aws_smithy_types::error::ErrorMetadata;
use aws_smithy_types::retry::RetryConfig;

use imgbuild::Error;
use imgbuild::aws::Clients;
use imgbuild::config::Config;
use imgbuild::render::Mode;
use imgbuild::stack::Waits;
use imgbuild::ui::progress::Progress;

use crate::support::{hermetic, imgbuild};

// ---------------------------------------------------------------------------------------------
// Scripted clients

#[derive(Default)]
struct Aws {
    cfn: Vec<Rule>,
    ec2: Vec<Rule>,
    efs: Vec<Rule>,
    ssm: Vec<Rule>,
    apigw: Vec<Rule>,
}

impl Aws {
    fn cfn(mut self, rules: &[&Rule]) -> Self {
        self.cfn = rules.iter().map(|r| (*r).clone()).collect();
        self
    }
    fn ec2(mut self, rules: &[&Rule]) -> Self {
        self.ec2 = rules.iter().map(|r| (*r).clone()).collect();
        self
    }
    fn efs(mut self, rules: &[&Rule]) -> Self {
        self.efs = rules.iter().map(|r| (*r).clone()).collect();
        self
    }
    fn ssm(mut self, rules: &[&Rule]) -> Self {
        self.ssm = rules.iter().map(|r| (*r).clone()).collect();
        self
    }
    /// Deploy reads the account's API Gateway logging role first: GetAccount (aws-cli
    /// `examples/apigateway/get-account.rst`: `cloudwatchRoleArn`, `throttleSettings`).
    fn with_api_gateway_account(mut self) -> Self {
        self.apigw.push(mock!(aws_sdk_apigateway::Client::get_account).then_output(|| {
            aws_sdk_apigateway::operation::get_account::GetAccountOutput::builder()
                .cloudwatch_role_arn("arn:aws:iam::123456789012:role/APIGatewayToCloudWatchLogs")
                .throttle_settings(aws_sdk_apigateway::types::ThrottleSettings::builder().burst_limit(5000).rate_limit(10000.0).build())
                .build()
        }));
        self
    }

    fn clients(self) -> Clients {
        let retry = RetryConfig::standard().with_initial_backoff(Duration::from_millis(1));
        let none: Vec<Rule> = Vec::new();
        Clients {
            cfn: mocked!(aws_sdk_cloudformation, self.cfn, retry.clone()),
            ec2: mocked!(aws_sdk_ec2, self.ec2, retry.clone()),
            efs: mocked!(aws_sdk_efs, self.efs, retry.clone()),
            ssm: mocked!(aws_sdk_ssm, self.ssm, retry.clone()),
            elb: mocked!(aws_sdk_elasticloadbalancingv2, none, retry.clone()),
            apigw: mocked!(aws_sdk_apigateway, self.apigw, retry.clone()),
            backup: mocked!(aws_sdk_backup, Vec::<Rule>::new(), retry),
            ..crate::mock_client::unscripted()
        }
    }
}

fn quiet() -> Progress {
    Progress::new(imgbuild::ui::Ui::new(imgbuild::cli::OutputFormat::Text, 0, true), "contracts")
}

fn fast() -> Waits {
    Waits { timeout: Duration::from_secs(5), poll: Duration::from_millis(1) }
}

fn meta(code: &str, message: &str) -> ErrorMetadata {
    ErrorMetadata::builder().code(code).message(message).build()
}

const STACK: &str = "vectordb";
const STACK_ID: &str = "arn:aws:cloudformation:us-east-1:123456789012:stack/vectordb/6c1e5a30-0000-11ef-0000-0a1b2c3d4e5f";
const LT: &str = "lt-068f72b72934aff71";
const BOOTED: &str = "ami-0aaaaaaaaaaaaaaa1";
const NEWER: &str = "ami-0bbbbbbbbbbbbbbb2";
const FS_RETAINED: &str = "fs-0aaaaaaaaaaaaaaa1";
const FS_OTHER: &str = "fs-0ccccccccccccccc3";

/// DescribeStacks answering `status`, no outputs, the project tag imgbuild puts on the stack,
/// with `CreationTime` as every real answer has (aws-cli `examples/cloudformation/describe-stacks.rst`).
fn stack(status: &'static str, params: &'static [(&'static str, &'static str)]) -> aws_sdk_cloudformation::types::Stack {
    let mut b = aws_sdk_cloudformation::types::Stack::builder()
        .stack_name(STACK)
        .stack_id(STACK_ID)
        .creation_time(aws_smithy_types::DateTime::from_secs(1_700_000_000))
        .stack_status(aws_sdk_cloudformation::types::StackStatus::from(status))
        .tags(aws_sdk_cloudformation::types::Tag::builder().key("imgbuild:project").value(STACK).build());
    for (k, v) in params {
        b = b.parameters(aws_sdk_cloudformation::types::Parameter::builder().parameter_key(*k).parameter_value(*v).build());
    }
    b.build()
}

/// DescribeStacks answering each step in turn (None: the stack does not exist, which
/// CloudFormation answers with the code ValidationError), the last one from then on.
fn describe_stacks(steps: Vec<Option<aws_sdk_cloudformation::types::Stack>>) -> Rule {
    use aws_sdk_cloudformation::operation::describe_stacks::{DescribeStacksError, DescribeStacksOutput};
    let mut seq = mock!(aws_sdk_cloudformation::Client::describe_stacks).match_requests(|r| r.stack_name() == Some(STACK)).sequence();
    for step in steps {
        seq = match step {
            None => seq.error(|| DescribeStacksError::generic(meta("ValidationError", "Stack with id vectordb does not exist"))),
            Some(s) => seq.output(move || DescribeStacksOutput::builder().stacks(s.clone()).build()),
        };
    }
    seq.repeatedly().build()
}

// ---------------------------------------------------------------------------------------------
// Fault 1: prune must not delete the image the stack boots

/// The stack's resources as ListStackResources gives them (aws-cli
/// `examples/cloudformation/list-stack-resources.rst`: `StackResourceSummaries` with
/// `ResourceType`, `LogicalResourceId`, `PhysicalResourceId`); a launch template's physical id is
/// its `lt-` id.
fn stack_resources() -> Rule {
    use aws_sdk_cloudformation::types::{ResourceStatus, StackResourceSummary};
    mock!(aws_sdk_cloudformation::Client::list_stack_resources).match_requests(|r| r.stack_name() == Some(STACK)).then_output(|| {
        let row = |logical: &str, kind: &str, physical: &str| {
            StackResourceSummary::builder()
                .logical_resource_id(logical)
                .resource_type(kind)
                .physical_resource_id(physical)
                .resource_status(ResourceStatus::CreateComplete)
                .last_updated_timestamp(aws_smithy_types::DateTime::from_secs(1_700_000_000))
                .build()
        };
        aws_sdk_cloudformation::operation::list_stack_resources::ListStackResourcesOutput::builder()
            .stack_resource_summaries(row("FileSystem", "AWS::EFS::FileSystem", FS_RETAINED))
            .stack_resource_summaries(row("LaunchTemplate", "AWS::EC2::LaunchTemplate", LT))
            .build()
    })
}

/// A pulled image's digest, as `docker image inspect` prints RepoDigests entries.
const CHROMA_DIGEST: &str = "sha256:5b4a7c4e0d3f2a1b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b";

#[tokio::test]
async fn prune_keeps_the_image_in_the_stacks_untagged_launch_template() {
    use aws_sdk_ec2::types::{Image, ImageState, LaunchTemplateVersion, ResponseLaunchTemplateData, Tag};
    // Two baked images of the project (aws-cli `examples/ec2/describe-images.rst`), the older one
    // booted by the stack.
    let images = mock!(aws_sdk_ec2::Client::describe_images).match_requests(|r| r.owners() == ["self".to_string()]).then_output(|| {
        let image = |id: &str, created: &str| {
            Image::builder()
                .image_id(id)
                .name(format!("imgbuild-vectordb-{id}"))
                .creation_date(created)
                .state(ImageState::Available)
                .tags(Tag::builder().key("imgbuild:project").value(STACK).build())
        };
        aws_sdk_ec2::operation::describe_images::DescribeImagesOutput::builder()
            .images(image(BOOTED, "2026-11-01T10:00:00.000Z").tags(Tag::builder().key("imgbuild:chroma-digest").value(CHROMA_DIGEST).build()).build())
            .images(image(NEWER, "2026-11-20T10:00:00.000Z").build())
            .build()
    });
    // CloudFormation does not copy stack tags onto AWS::EC2::LaunchTemplate
    // (cloudformation-coverage-roadmap #184, #2227): a stack deployed from a template without
    // TagSpecifications on it has an untagged launch template, so the tag filter finds nothing.
    let tagged = mock!(aws_sdk_ec2::Client::describe_launch_templates)
        .then_output(|| aws_sdk_ec2::operation::describe_launch_templates::DescribeLaunchTemplatesOutput::builder().build());
    // aws-cli `examples/ec2/describe-launch-template-versions.rst`.
    let versions = mock!(aws_sdk_ec2::Client::describe_launch_template_versions).match_requests(|r| r.launch_template_id() == Some(LT)).then_output(|| {
        aws_sdk_ec2::operation::describe_launch_template_versions::DescribeLaunchTemplateVersionsOutput::builder()
            .launch_template_versions(
                LaunchTemplateVersion::builder()
                    .launch_template_id(LT)
                    .version_number(1)
                    .default_version(true)
                    .launch_template_data(ResponseLaunchTemplateData::builder().image_id(BOOTED).instance_type("t3a.small".into()).build())
                    .build(),
            )
            .build()
    });
    let instances =
        mock!(aws_sdk_ec2::Client::describe_instances).then_output(|| aws_sdk_ec2::operation::describe_instances::DescribeInstancesOutput::builder().build());
    let handoff = mock!(aws_sdk_ssm::Client::get_parameter).then_error(|| {
        aws_sdk_ssm::operation::get_parameter::GetParameterError::ParameterNotFound(
            aws_sdk_ssm::types::error::ParameterNotFound::builder().meta(meta("ParameterNotFound", "")).build(),
        )
    });
    // The stack booted from the public parameter path: its ImageId parameter is empty, only the
    // launch template knows the image.
    let ds = describe_stacks(vec![Some(stack("UPDATE_COMPLETE", &[("ImageId", "")]))]);
    let resources = stack_resources();
    let clients = Aws::default().ec2(&[&images, &tagged, &versions, &instances]).ssm(&[&handoff]).cfn(&[&ds, &resources]).clients();

    let rows = imgbuild::bake::images::list(&clients, &Config::default()).await.unwrap();
    let doomed: Vec<&str> = imgbuild::bake::images::prune_plan(&rows, 0).iter().map(|r| r.ami.as_str()).collect();

    assert_eq!(doomed, vec![NEWER], "the booted image is in use: {rows:?}");
    let booted = rows.iter().find(|r| r.ami == BOOTED).unwrap();
    assert_eq!(booted.in_use, vec![format!("launch template {LT}")]);
    assert_eq!(resources.num_calls(), 1);
    // What the image serves, as bake recorded it; none for an image baked before that.
    assert_eq!(booted.chroma_digest.as_deref(), Some(CHROMA_DIGEST));
    assert_eq!(rows.iter().find(|r| r.ami == NEWER).unwrap().chroma_digest, None);
}

/// The launch template the real template creates carries the project tag itself
/// (`AWS::EC2::LaunchTemplate` `TagSpecifications`, `ResourceType: launch-template`), since the
/// stack's tags never reach it (coverage roadmap #184, #2227).
#[test]
fn the_real_template_tags_its_launch_template_with_the_project() {
    let t = imgbuild::stack::template::Template::load(None).unwrap();
    let lt = &t.document()["Resources"]["LaunchTemplate"];
    assert_eq!(lt["Type"].as_str(), Some("AWS::EC2::LaunchTemplate"));
    let specs = lt["Properties"]["TagSpecifications"].as_sequence().expect("TagSpecifications on the launch template itself");
    let spec = specs.iter().find(|s| s["ResourceType"].as_str() == Some("launch-template")).expect("a launch-template tag specification");
    let tags = spec["Tags"].as_sequence().unwrap();
    let project = tags.iter().find(|t| t["Key"].as_str() == Some("imgbuild:project")).expect("imgbuild:project tag");
    // The stack's name: the project's unless stack.name overrides it, and images::in_use looks
    // for both.
    match &project["Value"] {
        serde_yaml::Value::Tagged(t) => assert!(t.tag == "!Ref" && t.value.as_str() == Some("AWS::StackName"), "{t:?}"),
        other => panic!("expected !Ref AWS::StackName, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Fault 2: deploy --ami checks the image against the config and the mode

const FLAG_AMI: &str = "ami-0123456789abcdef0";

/// DescribeImages for FLAG_AMI: `Architecture` is on every image (aws-cli
/// `examples/ec2/describe-images.rst`), tags only on what someone tagged: a stock AL2023 image has
/// none of imgbuild's.
fn image(arch: &'static str, tags: &'static [(&'static str, &'static str)]) -> Rule {
    mock!(aws_sdk_ec2::Client::describe_images).match_requests(|r| r.image_ids() == [FLAG_AMI.to_string()]).then_output(move || {
        let mut b = aws_sdk_ec2::types::Image::builder().image_id(FLAG_AMI).architecture(arch.into()).state(aws_sdk_ec2::types::ImageState::Available);
        for (k, v) in tags {
            b = b.tags(aws_sdk_ec2::types::Tag::builder().key(*k).value(*v).build());
        }
        aws_sdk_ec2::operation::describe_images::DescribeImagesOutput::builder().images(b.build()).build()
    })
}

const BAKED_TAGS: &[(&str, &str)] =
    &[("imgbuild:project", "vectordb"), ("imgbuild:chroma-version", "1.5.9"), ("imgbuild:chroma-image", "ghcr.io/chroma-core/chroma:1.5.9")];

async fn choose(config: &Config, rule: &Rule, mode: Option<Mode>) -> imgbuild::Result<imgbuild::bake::images::Choice> {
    let clients = Aws::default().ec2(&[rule]).clients();
    imgbuild::bake::images::choose(&clients, config, Some(FLAG_AMI), mode).await
}

fn invalid(r: imgbuild::Result<imgbuild::bake::images::Choice>) -> String {
    match r {
        Err(Error::Invalid(m)) => m,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn ami_flag_refuses_a_stock_image_in_baked_mode_and_takes_it_with_mode_full() {
    let stock = image("x86_64", &[]);
    let m = invalid(choose(&Config::default(), &stock, None).await);
    assert!(m.contains(FLAG_AMI) && m.contains("imgbuild:chroma-version") && m.contains("--mode full"), "{m}");

    let c = choose(&Config::default(), &stock, Some(Mode::Full)).await.unwrap();
    assert_eq!((c.ami.as_str(), c.mode), (FLAG_AMI, Mode::Full));
}

#[tokio::test]
async fn ami_flag_refuses_an_image_of_the_other_architecture_in_any_mode() {
    let mut config = Config::default();
    config.stack.instance_type = "t4g.small".into();
    let x86 = image("x86_64", BAKED_TAGS);
    for mode in [None, Some(Mode::Full)] {
        let m = invalid(choose(&config, &x86, mode).await);
        assert!(m.contains("x86_64") && m.contains("arm64") && m.contains("t4g.small"), "{m}");
    }
}

#[tokio::test]
async fn ami_flag_refuses_an_image_baked_with_another_chroma_image() {
    let mut config = Config::default();
    config.chroma.image = "registry.example.com/mirror/chroma".into();
    let baked = image("x86_64", BAKED_TAGS);
    let m = invalid(choose(&config, &baked, None).await);
    assert!(m.contains("ghcr.io/chroma-core/chroma:1.5.9") && m.contains("registry.example.com/mirror/chroma:1.5.9"), "{m}");

    let c = choose(&Config::default(), &baked, None).await.unwrap();
    assert_eq!(c.mode, Mode::Baked, "the image the config describes is taken");
}

// ---------------------------------------------------------------------------------------------
// Fault 3: destroy finds every file system the stack retained

/// DescribeFileSystems (EFS API reference, DescribeFileSystems; `FileSystemDescription` with
/// `Tags` and `LifeCycleState`; the call takes no tag filter). CloudFormation tags what it
/// creates with `aws:cloudformation:stack-name` and the stack's own tags.
fn file_systems() -> Rule {
    use aws_sdk_efs::types::{FileSystemDescription, FileSystemSize, LifeCycleState, PerformanceMode, Tag};
    mock!(aws_sdk_efs::Client::describe_file_systems).then_output(|| {
        let fs = |id: &str, tags: &[(&str, &str)]| {
            let mut b = FileSystemDescription::builder()
                .owner_id("123456789012")
                .creation_token(format!("vectordb-FileSystem-{id}"))
                .file_system_id(id)
                .creation_time(aws_smithy_types::DateTime::from_secs(1_700_000_000))
                .life_cycle_state(LifeCycleState::Available)
                .number_of_mount_targets(0)
                .size_in_bytes(FileSystemSize::builder().value(6144).build())
                .performance_mode(PerformanceMode::GeneralPurpose);
            for (k, v) in tags {
                b = b.tags(Tag::builder().key(*k).value(*v).build().unwrap());
            }
            b.build().unwrap()
        };
        aws_sdk_efs::operation::describe_file_systems::DescribeFileSystemsOutput::builder()
            .file_systems(fs(
                FS_RETAINED,
                &[("Name", STACK), ("aws:cloudformation:stack-name", STACK), ("aws:cloudformation:logical-id", "FileSystem"), ("imgbuild:project", STACK)],
            ))
            .file_systems(fs(FS_OTHER, &[("Name", "someone-else"), ("aws:cloudformation:stack-name", "someone-else")]))
            .build()
    })
}

fn deleted_stack_events() -> Rule {
    mock!(aws_sdk_cloudformation::Client::describe_stack_events).then_error(|| {
        aws_sdk_cloudformation::operation::describe_stack_events::DescribeStackEventsError::generic(meta("ValidationError", "Stack [vectordb] does not exist"))
    })
}

#[tokio::test]
async fn destroy_with_delete_data_deletes_the_file_system_a_rolled_back_create_retained() {
    // A create that rolled back: ROLLBACK_COMPLETE, no outputs, but DeletionPolicy: Retain kept
    // the file system.
    let ds = describe_stacks(vec![Some(stack("ROLLBACK_COMPLETE", &[])), None]);
    let events = deleted_stack_events();
    let del = mock!(aws_sdk_cloudformation::Client::delete_stack)
        .then_output(|| aws_sdk_cloudformation::operation::delete_stack::DeleteStackOutput::builder().build());
    let listed = file_systems();
    let del_fs = mock!(aws_sdk_efs::Client::delete_file_system)
        .match_requests(|r| r.file_system_id() == Some(FS_RETAINED))
        .then_output(|| aws_sdk_efs::operation::delete_file_system::DeleteFileSystemOutput::builder().build());
    let clients = Aws::default().cfn(&[&ds, &events, &del]).efs(&[&listed, &del_fs]).clients();

    let d = imgbuild::stack::ops::destroy(&clients, STACK, true, false, fast(), &quiet()).await.unwrap();

    assert!(d.existed && d.data_deleted, "{d:?}");
    assert_eq!(del_fs.num_calls(), 1, "the retained file system, and only ours");
    assert_eq!(del.num_calls(), 1);
}

#[tokio::test]
async fn destroy_reports_every_retained_file_system_even_without_a_stack() {
    // The stack itself is gone (deleted after its failed create, or by hand); what it retained is not.
    let ds = describe_stacks(vec![None]);
    let listed = file_systems();
    let clients = Aws::default().cfn(&[&ds]).efs(&[&listed]).clients();

    let d = imgbuild::stack::ops::destroy(&clients, STACK, false, false, fast(), &quiet()).await.unwrap();

    assert!(!d.existed && !d.data_deleted);
    assert_eq!(d.file_systems, vec![FS_RETAINED.to_string()]);
}

// ---------------------------------------------------------------------------------------------
// Fault 4: one JSON document on failure

/// Parses stdout as a stream of JSON documents.
fn documents(stdout: &[u8]) -> Vec<serde_json::Value> {
    serde_json::Deserializer::from_slice(stdout).into_iter::<serde_json::Value>().collect::<Result<_, _>>().expect("stdout is JSON")
}

fn one_failed_document(out: &std::process::Output, code: i32) -> serde_json::Value {
    let docs = documents(&out.stdout);
    assert_eq!(docs.len(), 1, "exactly one document: {docs:#?}");
    assert_eq!(out.status.code(), Some(code), "{}", String::from_utf8_lossy(&out.stderr));
    let doc = docs.into_iter().next().unwrap();
    assert_eq!(doc["ok"], false);
    assert_eq!(doc["error"]["exit_code"], code);
    doc
}

#[test]
fn validate_doctor_and_smoke_print_one_json_document_when_they_fail() {
    let dir = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let bad = format!("{root}/tests/fixtures/guard/efs_encrypted-violation.yaml");
    let out = imgbuild(dir.path()).args(["--output", "json", "validate", "--no-tools", "--template", &bad]).output().unwrap();
    let doc = one_failed_document(&out, 2);
    assert_eq!(doc["error"]["kind"], "validation");
    assert!(doc["template"]["policies"].is_array(), "the report is the document");

    let out = imgbuild(dir.path())
        .env_remove("AWS_REGION")
        .env_remove("AWS_DEFAULT_REGION")
        .args(["--output", "json", "--config", "/dev/null", "doctor"])
        .output()
        .unwrap();
    let doc = one_failed_document(&out, 1);
    assert!(doc["checks"].is_array());

    // Port 9 on loopback (discard) answers nothing here: the connection is refused at once.
    let out = imgbuild(dir.path()).args(["--output", "json", "smoke", "--url", "http://127.0.0.1:9", "--timeout", "5"]).output().unwrap();
    let doc = one_failed_document(&out, 1);
    assert_eq!(doc["error"]["kind"], "smoke_failed");
    assert!(doc["smoke"]["steps"].is_array());
}

// ---------------------------------------------------------------------------------------------
// Fault 5: a closed pipe ends the command quietly

/// Runs imgbuild with stdout and/or stderr a pipe whose reading end is already closed, the way
/// `| head -1` leaves it once head has its line.
fn with_closed(args: &[&str], close_stdout: bool, close_stderr: bool) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_imgbuild"));
    hermetic(cmd.current_dir(dir.path()).args(args));
    cmd.stdin(Stdio::null());
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    if close_stdout {
        drop(stdout);
    } else {
        std::thread::spawn(move || std::io::copy(&mut { stdout }, &mut std::io::sink()));
    }
    let mut said = String::new();
    if close_stderr {
        drop(stderr);
    } else {
        std::io::Read::read_to_string(&mut stderr, &mut said).unwrap();
    }
    (child.wait().unwrap().code(), said)
}

#[test]
fn a_closed_stdout_or_stderr_ends_with_141_and_no_panic() {
    // `imgbuild man | head -1`: the man page meets a closed stdout.
    let (code, said) = with_closed(&["man"], true, false);
    assert_eq!(code, Some(141), "{said}");
    assert_eq!(said, "", "quietly");
    let (code, said) = with_closed(&["completions", "bash"], true, false);
    assert_eq!((code, said.as_str()), (Some(141), ""));
    // `imgbuild validate 2>&1 | head -1`: the report meets a closed stderr (Rust's eprintln!
    // panics there, exit 101).
    let (code, _) = with_closed(&["validate", "--no-tools"], true, true);
    assert_eq!(code, Some(141));
    // JSON on a closed stdout, failing command: still no second attempt, no panic.
    let (code, _) = with_closed(&["--output", "json", "render-userdata", "--no-tools"], true, true);
    assert_eq!(code, Some(141));
}

// ---------------------------------------------------------------------------------------------
// Faults 6 and 7: messages that send the user the right way

#[test]
fn a_missing_file_named_by_imgbuild_config_is_blamed_on_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let out = imgbuild(dir.path()).env("IMGBUILD_CONFIG", "nowhere.yaml").args(["validate", "--no-tools"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nowhere.yaml") && err.contains("IMGBUILD_CONFIG"), "{err}");
    assert!(!err.contains("drop --config"), "{err}");
    // Given as a flag, the flag is named.
    let out = imgbuild(dir.path()).args(["--config", "nowhere.yaml", "validate", "--no-tools"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("drop --config"));
}

#[test]
fn destroy_without_a_terminal_names_its_own_flag() {
    let dir = tempfile::tempdir().unwrap();
    let out = imgbuild(dir.path()).args(["--endpoint-url", "http://127.0.0.1:9", "destroy"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--yes") && !err.contains("--no-execute"), "destroy has no --no-execute: {err}");
}

#[test]
fn doctor_without_credentials_says_what_is_missing_in_plain_words() {
    let dir = tempfile::tempdir().unwrap();
    let out = imgbuild(dir.path())
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("HOME", dir.path())
        .env("AWS_CONFIG_FILE", dir.path().join("no-config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", dir.path().join("no-credentials"))
        .args(["--output", "json", "--config", "/dev/null", "--endpoint-url", "http://127.0.0.1:9", "doctor"])
        .output()
        .unwrap();
    let doc = one_failed_document(&out, 1);
    let creds = doc["checks"].as_array().unwrap().iter().find(|c| c["check"] == "credentials").expect("a credentials check").clone();
    assert_eq!(creds["verdict"], "fail");
    let detail = creds["detail"].as_str().unwrap();
    assert!(detail.contains("no AWS credentials found"), "{detail}");
    assert!(!detail.contains("not enabled"), "SDK wording: {detail}");
    assert!(creds["fix"].as_str().unwrap().contains("aws configure"));
}

/// imgbuild on a pseudo-terminal (`script` gives it one), run in a fresh directory with a closed
/// loopback endpoint (were anything sent to AWS, it could not leave the machine).
struct Terminal {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    seen: std::sync::mpsc::Receiver<String>,
    reader: std::thread::JoinHandle<String>,
    _dir: tempfile::TempDir,
}

impl Terminal {
    fn start(args: &str) -> Option<Terminal> {
        let script = crate::support::tool("script")?;
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run.sh");
        std::fs::write(&run, format!("exec '{}' --endpoint-url http://127.0.0.1:9 {args}\n", env!("CARGO_BIN_EXE_imgbuild"))).unwrap();
        let mut child = hermetic(&mut std::process::Command::new(script))
            .args(["-qefc", &format!("bash '{}'", run.display()), "/dev/null"])
            .current_dir(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let (tx, seen) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            let mut all = String::new();
            let mut buf = [0u8; 1024];
            while let Ok(n) = std::io::Read::read(&mut stdout, &mut buf) {
                if n == 0 {
                    break;
                }
                all.push_str(&String::from_utf8_lossy(&buf[..n]));
                let _ = tx.send(all.clone());
            }
            all
        });
        Some(Terminal { child, stdin, seen, reader, _dir: dir })
    }

    /// Waits (bounded) until the terminal shows `text`.
    fn wait_for(&self, text: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let all = self.seen.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())).unwrap_or_else(|_| panic!("never saw {text:?}"));
            if all.contains(text) {
                return;
            }
        }
    }

    fn type_in(&mut self, bytes: &[u8]) {
        std::io::Write::write_all(&mut self.stdin, bytes).unwrap();
        std::io::Write::flush(&mut self.stdin).unwrap();
    }

    /// The exit code and everything the terminal showed, once the process has ended (bounded).
    fn finish(mut self) -> (Option<i32>, String) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("imgbuild did not end within 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        drop(self.stdin);
        (status.code(), self.reader.join().unwrap())
    }
}

/// Answering "n" at destroy's prompt is a decision, not a usage error: exit 4, nothing deleted.
#[test]
fn destroy_declined_at_the_prompt_exits_4() {
    let Some(mut t) = Terminal::start("destroy") else { return };
    t.wait_for("[y/N]");
    t.type_in(b"n\n");
    let (code, seen) = t.finish();
    assert_eq!(code, Some(4), "{seen}");
    assert!(seen.contains("declined: nothing was deleted"), "{seen}");
}

/// Ctrl-C at destroy's prompt ends it at once with 130 and nothing deleted (the terminal turns
/// ^C into SIGINT, as a keyboard does); the Ctrl-C handler must not leave the prompt deaf to it.
#[test]
fn ctrl_c_at_the_destroy_prompt_exits_130() {
    let Some(mut t) = Terminal::start("destroy") else { return };
    t.wait_for("[y/N]");
    t.type_in(b"\x03");
    let (code, seen) = t.finish();
    assert_eq!(code, Some(130), "{seen}");
    assert!(seen.contains("interrupted"), "{seen}");
}

/// Files imgbuild writes hold no secret: a new one follows the umask like any program's (it was
/// 0600 whatever the umask), a replaced one keeps its mode.
#[cfg(unix)]
#[test]
fn written_files_follow_the_umask_and_keep_an_existing_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_imgbuild");
    let run = |umask: &str, out: &str| {
        let status = hermetic(&mut std::process::Command::new("sh"))
            .current_dir(dir.path())
            .args(["-c", &format!("umask {umask} && exec '{bin}' -q render-userdata --no-tools --out {out}")])
            .status()
            .unwrap();
        assert!(status.success());
        std::fs::metadata(dir.path().join(out)).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(run("022", "open.yaml"), 0o644);
    assert_eq!(run("077", "private.yaml"), 0o600);
    std::fs::set_permissions(dir.path().join("open.yaml"), std::fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(run("022", "open.yaml"), 0o640, "a replaced file keeps its mode");
}

// ---------------------------------------------------------------------------------------------
// What deploy sends: the CreateChangeSet request itself, with the real template

const CS: &str = "arn:aws:cloudformation:us-east-1:123456789012:changeSet/imgbuild-1/9f8e7d6c-0000-11ef-0000-0a1b2c3d4e5f";
const STOCK: &str = "ami-0fedcba9876543210";

/// Deploys (with --no-execute) a config that moves every parameter off its default, captures
/// the CreateChangeSet request, and returns it with the config.
async fn captured_create_change_set() -> (aws_sdk_cloudformation::operation::create_change_set::CreateChangeSetInput, Config) {
    use aws_sdk_cloudformation::types::{ChangeAction, ChangeSetStatus, ExecutionStatus, ResourceChange};
    let config = crate::support::parse(
        "name: vectordb\nchroma:\n  version: 0.4.13\n  port: 8080\nstorage:\n  mode: docker-nfs\nstack:\n  instance_type: m7i.large\n  nat_gateways: per-az\n  vpc_cidr: 10.20.0.0/16\n  allowed_client_cidr: 192.168.10.0/24\n  log_retention_days: 90\n  integration_timeout_ms: 15000\nbackup:\n  retention_days: 14\n  schedule: rate(12 hours)\napi:\n  auth: iam\n  allowed_principals: [\"arn:aws:iam::123456789012:role/rag-app\"]\nalarms:\n  email: ops@example.com\n  memory_percent: 80\n  disk_percent: 70\n  efs_burst_credit_bytes: 1000000000\n  efs_io_limit_percent: 90\n",
    );
    let ctx = imgbuild::config::Context {
        config: config.clone(),
        source: imgbuild::config::Source::Defaults,
        region: Some("eu-west-1".into()),
        profile: None,
        endpoint_url: None,
    };
    let handoff = mock!(aws_sdk_ssm::Client::get_parameter).match_requests(|r| r.name() == Some("/imgbuild/vectordb/ami")).then_error(|| {
        aws_sdk_ssm::operation::get_parameter::GetParameterError::ParameterNotFound(
            aws_sdk_ssm::types::error::ParameterNotFound::builder().meta(meta("ParameterNotFound", "")).build(),
        )
    });
    // aws-cli `examples/ssm/get-parameter.rst`: `Parameter` with `Name`, `Type`, `Value`.
    let stock = mock!(aws_sdk_ssm::Client::get_parameter)
        .match_requests(|r| r.name() == Some("/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"))
        .then_output(|| {
            aws_sdk_ssm::operation::get_parameter::GetParameterOutput::builder()
                .parameter(
                    aws_sdk_ssm::types::Parameter::builder()
                        .name("/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64")
                        .r#type(aws_sdk_ssm::types::ParameterType::String)
                        .value(STOCK)
                        .build(),
                )
                .build()
        });
    let ds = describe_stacks(vec![None]);
    let sent = std::sync::Arc::new(std::sync::Mutex::new(None));
    let keep = sent.clone();
    // CreateChangeSet answers `Id` and `StackId` (CloudFormation API reference, CreateChangeSet).
    let create = mock!(aws_sdk_cloudformation::Client::create_change_set).then_compute_output(move |r| {
        *keep.lock().unwrap() = Some(r.clone());
        aws_sdk_cloudformation::operation::create_change_set::CreateChangeSetOutput::builder().id(CS).stack_id(STACK_ID).build()
    });
    // DescribeChangeSet (CloudFormation API reference): `Status` CREATE_COMPLETE with
    // `ExecutionStatus` AVAILABLE once computed, `Changes[].ResourceChange`.
    let described = mock!(aws_sdk_cloudformation::Client::describe_change_set).then_output(|| {
        aws_sdk_cloudformation::operation::describe_change_set::DescribeChangeSetOutput::builder()
            .change_set_id(CS)
            .change_set_name("imgbuild-1")
            .stack_id(STACK_ID)
            .stack_name(STACK)
            .status(ChangeSetStatus::CreateComplete)
            .execution_status(ExecutionStatus::Available)
            .creation_time(aws_smithy_types::DateTime::from_secs(1_700_000_000))
            .changes(
                aws_sdk_cloudformation::types::Change::builder()
                    .r#type(aws_sdk_cloudformation::types::ChangeType::Resource)
                    .resource_change(
                        ResourceChange::builder()
                            .action(ChangeAction::Add)
                            .logical_resource_id("LaunchTemplate")
                            .resource_type("AWS::EC2::LaunchTemplate")
                            .build(),
                    )
                    .build(),
            )
            .build()
    });
    let clients = Aws::default().ssm(&[&handoff, &stock]).cfn(&[&ds, &create, &described]).with_api_gateway_account().clients();
    let args = imgbuild::cli::DeployArgs {
        no_execute: true,
        tools: imgbuild::cli::ToolArgs { require_tools: false, no_tools: true },
        ..imgbuild::cmd::plain_deploy_args(false, Some(30))
    };
    let ui = imgbuild::ui::Ui::new(imgbuild::cli::OutputFormat::Text, 0, true);
    struct Never;
    impl imgbuild::stack::changeset::Confirmer for Never {
        fn confirm<'a>(&'a self, q: &'a str) -> std::pin::Pin<Box<dyn std::future::Future<Output = imgbuild::Result<bool>> + Send + 'a>> {
            panic!("--no-execute asks nothing, asked {q}")
        }
    }
    let doc = imgbuild::cmd::deploy_flow(&clients, &args, &ctx, ui, &Never, std::future::pending()).await.unwrap();
    assert_eq!(doc["deploy"]["executed"], false);
    assert_eq!(create.num_calls(), 1);
    let input = sent.lock().unwrap().take().unwrap();
    (input, config)
}

#[tokio::test]
async fn deploy_sends_every_parameter_and_the_rendered_user_data_in_the_real_template() {
    use base64::Engine;
    let (input, config) = captured_create_change_set().await;
    let params: std::collections::BTreeMap<String, String> =
        input.parameters().iter().map(|p| (p.parameter_key().unwrap().to_string(), p.parameter_value().unwrap().to_string())).collect();
    let expected: std::collections::BTreeMap<String, String> = [
        ("VpcCidr", "10.20.0.0/16"),
        ("NatGateways", "PerAz"),
        ("AllowedClientCidr", "192.168.10.0/24"),
        ("ImageId", STOCK),
        ("InstanceType", "m7i.large"),
        ("ChromaPort", "8080"),
        ("HeartbeatPath", "/api/v1/heartbeat"),
        ("StorageMode", "docker-nfs"),
        ("LogRetentionDays", "90"),
        ("IntegrationTimeoutMs", "15000"),
        // The account already logs with a role of its own (GetAccount): kept, not replaced.
        ("ApiGatewayCloudWatchRoleArn", "arn:aws:iam::123456789012:role/APIGatewayToCloudWatchLogs"),
        // No efs.file_system_id: the stack makes its own file system.
        ("FileSystemId", ""),
        // The daily backup plan and the version its recovery points are tagged with.
        ("BackupRetentionDays", "14"),
        ("BackupSchedule", "rate(12 hours)"),
        ("ChromaVersion", "0.4.13"),
        // api.auth: iam puts AWS_IAM on the proxy method and names the principals.
        ("ApiAuth", "AWS_IAM"),
        ("ApiAllowedPrincipals", "arn:aws:iam::123456789012:role/rag-app"),
        // alarms: the thresholds, and the address the stack's topic mails.
        ("AlarmsEnabled", "true"),
        ("AlarmEmail", "ops@example.com"),
        ("MemoryAlarmPercent", "80"),
        ("DiskAlarmPercent", "70"),
        ("EfsBurstCreditAlarmBytes", "1000000000"),
        ("EfsIoLimitAlarmPercent", "90"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(params, expected);
    assert_eq!(input.stack_name(), Some(STACK));
    assert_eq!(input.change_set_type(), Some(&aws_sdk_cloudformation::types::ChangeSetType::Create));
    // A first create has no alarms to watch yet (RollbackTrigger: a missing trigger fails the operation).
    assert!(input.rollback_configuration().is_none());
    assert!(input.tags().iter().any(|t| t.key() == Some("imgbuild:project") && t.value() == Some("vectordb")));

    // Every launch template in the body carries the user-data deploy rendered for this image:
    // stock AL2023, so full mode, gzip, cloud-config, with the region given.
    let body: serde_yaml::Value = serde_yaml::from_str(input.template_body().unwrap()).unwrap();
    let sent = body["Resources"]["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"].as_str().expect("UserData as base64 text");
    let gz = base64::engine::general_purpose::STANDARD.decode(sent).unwrap();
    let expected = crate::support::render_with(&config, Some("eu-west-1"), Mode::Full, imgbuild::render::Format::CloudConfig, true);
    assert_eq!(gz, expected.output, "the gzip stream deploy rendered");
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut raw).unwrap();
    assert_eq!(raw, expected.raw);
    assert!(String::from_utf8_lossy(&raw).contains("/api/v1/heartbeat"));
}

// CloudFormation refuses some requests synchronously, with an error of the call itself rather
// than a FAILED change set.

fn stock_parameters() -> [Rule; 2] {
    let handoff = mock!(aws_sdk_ssm::Client::get_parameter).match_requests(|r| r.name() == Some("/imgbuild/vectordb/ami")).then_error(|| {
        aws_sdk_ssm::operation::get_parameter::GetParameterError::ParameterNotFound(
            aws_sdk_ssm::types::error::ParameterNotFound::builder().meta(meta("ParameterNotFound", "")).build(),
        )
    });
    let stock = mock!(aws_sdk_ssm::Client::get_parameter).match_requests(|r| r.name().is_some_and(|n| n.starts_with("/aws/service/"))).then_output(|| {
        aws_sdk_ssm::operation::get_parameter::GetParameterOutput::builder()
            .parameter(
                aws_sdk_ssm::types::Parameter::builder().name("/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64").value(STOCK).build(),
            )
            .build()
    });
    [handoff, stock]
}

async fn deploy_yes(cfn: &[&Rule]) -> imgbuild::Result<serde_json::Value> {
    deploy_yes_with(cfn, None).await
}

async fn deploy_yes_with(cfn: &[&Rule], template: Option<std::path::PathBuf>) -> imgbuild::Result<serde_json::Value> {
    let [handoff, stock] = stock_parameters();
    let clients = Aws::default().ssm(&[&handoff, &stock]).cfn(cfn).with_api_gateway_account().clients();
    let ctx =
        imgbuild::config::Context { config: Config::default(), source: imgbuild::config::Source::Defaults, region: None, profile: None, endpoint_url: None };
    let args = imgbuild::cli::DeployArgs {
        template,
        tools: imgbuild::cli::ToolArgs { require_tools: false, no_tools: true },
        ..imgbuild::cmd::plain_deploy_args(true, Some(5))
    };
    let ui = imgbuild::ui::Ui::new(imgbuild::cli::OutputFormat::Text, 0, true);
    struct Unused;
    impl imgbuild::stack::changeset::Confirmer for Unused {
        fn confirm<'a>(&'a self, q: &'a str) -> std::pin::Pin<Box<dyn std::future::Future<Output = imgbuild::Result<bool>> + Send + 'a>> {
            panic!("--yes asks nothing, asked {q}")
        }
    }
    imgbuild::cmd::deploy_flow(&clients, &args, &ctx, ui, &Unused, std::future::pending()).await
}

#[tokio::test]
async fn a_parameter_constraint_refused_by_create_change_set_is_an_aws_error_and_leaves_nothing() {
    // CloudFormation checks parameter constraints when the change set is requested and answers
    // the call with ValidationError (CloudFormation API reference, CreateChangeSet, Errors; the
    // message names the parameter), so no change set and no REVIEW_IN_PROGRESS stack exist.
    let ds = describe_stacks(vec![None]);
    let create = mock!(aws_sdk_cloudformation::Client::create_change_set).then_error(|| {
        aws_sdk_cloudformation::operation::create_change_set::CreateChangeSetError::generic(meta(
            "ValidationError",
            "Parameter 'VpcCidr' must match pattern ^(\\d{1,3}\\.){3}\\d{1,3}/(1[6-9]|20)$",
        ))
    });
    let del_cs = mock!(aws_sdk_cloudformation::Client::delete_change_set)
        .then_output(|| aws_sdk_cloudformation::operation::delete_change_set::DeleteChangeSetOutput::builder().build());
    let del = mock!(aws_sdk_cloudformation::Client::delete_stack)
        .then_output(|| aws_sdk_cloudformation::operation::delete_stack::DeleteStackOutput::builder().build());

    let err = deploy_yes(&[&ds, &create, &del_cs, &del]).await.unwrap_err();

    match &err {
        Error::Aws { operation, code, .. } => assert_eq!((*operation, code.as_str()), ("CreateChangeSet", "ValidationError")),
        other => panic!("expected the refusal as an AWS error, got {other:?}"),
    }
    assert_eq!(err.exit_code(), 1);
    assert_eq!((create.num_calls(), del_cs.num_calls(), del.num_calls()), (1, 0, 0), "nothing was made, nothing to remove");
}

#[tokio::test]
async fn execute_change_set_refused_with_invalid_change_set_status_removes_what_the_run_made() {
    use aws_sdk_cloudformation::types::{ChangeSetStatus, ExecutionStatus};
    // A CREATE change set makes a REVIEW_IN_PROGRESS stack at once (CloudFormation User Guide,
    // "Create a change set"); executing a change set that is not AVAILABLE is refused with
    // InvalidChangeSetStatus (CloudFormation API reference, ExecuteChangeSet, Errors).
    let create = mock!(aws_sdk_cloudformation::Client::create_change_set)
        .then_output(|| aws_sdk_cloudformation::operation::create_change_set::CreateChangeSetOutput::builder().id(CS).stack_id(STACK_ID).build());
    // No stack until the change set is requested, then the empty REVIEW_IN_PROGRESS one.
    let made = create.clone();
    let before = mock!(aws_sdk_cloudformation::Client::describe_stacks).match_requests(move |_| made.num_calls() == 0).then_error(|| {
        aws_sdk_cloudformation::operation::describe_stacks::DescribeStacksError::generic(meta("ValidationError", "Stack with id vectordb does not exist"))
    });
    let made = create.clone();
    let after = mock!(aws_sdk_cloudformation::Client::describe_stacks)
        .match_requests(move |_| made.num_calls() > 0)
        .then_output(|| aws_sdk_cloudformation::operation::describe_stacks::DescribeStacksOutput::builder().stacks(stack("REVIEW_IN_PROGRESS", &[])).build());
    let described = mock!(aws_sdk_cloudformation::Client::describe_change_set).then_output(|| {
        aws_sdk_cloudformation::operation::describe_change_set::DescribeChangeSetOutput::builder()
            .change_set_id(CS)
            .stack_id(STACK_ID)
            .status(ChangeSetStatus::CreateComplete)
            .execution_status(ExecutionStatus::Unavailable)
            .changes(
                aws_sdk_cloudformation::types::Change::builder()
                    .r#type(aws_sdk_cloudformation::types::ChangeType::Resource)
                    .resource_change(
                        aws_sdk_cloudformation::types::ResourceChange::builder()
                            .action(aws_sdk_cloudformation::types::ChangeAction::Add)
                            .logical_resource_id("Vpc")
                            .resource_type("AWS::EC2::VPC")
                            .build(),
                    )
                    .build(),
            )
            .build()
    });
    let events = mock!(aws_sdk_cloudformation::Client::describe_stack_events)
        .then_output(|| aws_sdk_cloudformation::operation::describe_stack_events::DescribeStackEventsOutput::builder().build());
    let execute = mock!(aws_sdk_cloudformation::Client::execute_change_set).then_error(|| {
        aws_sdk_cloudformation::operation::execute_change_set::ExecuteChangeSetError::InvalidChangeSetStatusException(
            aws_sdk_cloudformation::types::error::InvalidChangeSetStatusException::builder()
                .message("ChangeSet [imgbuild-1] cannot be executed in its current execution status of [UNAVAILABLE]")
                .meta(meta("InvalidChangeSetStatus", "ChangeSet cannot be executed in its current execution status"))
                .build(),
        )
    });
    let del_cs = mock!(aws_sdk_cloudformation::Client::delete_change_set)
        .match_requests(|r| r.change_set_name() == Some(CS))
        .then_output(|| aws_sdk_cloudformation::operation::delete_change_set::DeleteChangeSetOutput::builder().build());
    let del = mock!(aws_sdk_cloudformation::Client::delete_stack)
        .match_requests(|r| r.stack_name() == Some(STACK))
        .then_output(|| aws_sdk_cloudformation::operation::delete_stack::DeleteStackOutput::builder().build());

    let err = deploy_yes(&[&before, &after, &create, &described, &events, &execute, &del_cs, &del]).await.unwrap_err();

    match &err {
        Error::Aws { operation, code, .. } => assert_eq!((*operation, code.as_str()), ("ExecuteChangeSet", "InvalidChangeSetStatus")),
        other => panic!("expected the refusal as an AWS error, got {other:?}"),
    }
    assert_eq!((execute.num_calls(), del_cs.num_calls(), del.num_calls()), (1, 1, 1), "the change set and the empty review stack are removed");
}

// ---------------------------------------------------------------------------------------------
// A current compose validator

/// dclint from .tools/ (tests/run installs the pinned version there), else PATH.
fn dclint() -> Option<std::path::PathBuf> {
    let local = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/dclint/node_modules/.bin/dclint");
    if local.is_file() { Some(local) } else { crate::support::tool("dclint") }
}

/// Every rendered compose file passes dclint, which checks the Compose Specification's current
/// JSON schema (Debian's docker-compose is Compose v1, 1.29; the instance runs v2.32). One rule is
/// off, for a stated reason: `no-unbound-port-interfaces` wants the published port bound to one
/// interface, but the load balancer reaches Chroma on the instance's own address, and the
/// security group admits only the load balancer.
#[test]
fn dclint_accepts_every_rendered_compose_file_and_rejects_an_unknown_key() {
    let Some(exe) = dclint() else { return };
    let dir = tempfile::tempdir().unwrap();
    let lint = |path: &std::path::Path| {
        std::process::Command::new(&exe).arg(path).args(["--quiet", "--no-color", "--disable-rule", "no-unbound-port-interfaces"]).output().unwrap()
    };
    for (name, config, region) in crate::support::configs() {
        for mode in crate::support::MODES {
            let r = crate::support::render_with(&config, region, mode, imgbuild::render::Format::CloudConfig, false);
            let path = dir.path().join(format!("{name}-{}.yaml", mode.as_str()));
            std::fs::write(&path, &r.compose_yaml).unwrap();
            let out = lint(&path);
            assert!(out.status.success(), "{name} {mode:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
    }
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "services:\n  chroma:\n    image: x\n    restart_policy: always\n").unwrap();
    let out = lint(&bad);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("invalid-schema"), "{}", String::from_utf8_lossy(&out.stdout));
}

/// Config errors speak of the field's expected form, not of the parser's internals.
#[test]
fn config_errors_carry_no_parser_jargon() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("imgbuild.yaml"), "chroma:\n  version: latest\n  port: eighty\naws: true\n").unwrap();
    let out = imgbuild(dir.path()).args(["validate", "--no-tools"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`latest` is not a pinned Chroma release (expected MAJOR.MINOR.PATCH such as 1.5.9)"), "{err}");
    assert!(err.contains("expected a whole number from 0 to 65535") && err.contains("expected a section"), "{err}");
    for jargon in ["unexpected character", "while parsing", "expected u16", "expected struct", "AwsConfig"] {
        assert!(!err.contains(jargon), "{jargon:?} in {err}");
    }
}

// ---------------------------------------------------------------------------------------------
// The bake prerequisites stack: said before it is made, and removable

#[test]
fn bake_dry_run_says_it_would_deploy_the_prerequisites_stack_and_how_to_remove_it() {
    let Some(moto) = crate::services::moto() else { return };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("imgbuild.yaml"), "name: prereqsaid\nregion: us-east-1\n").unwrap();
    let out = imgbuild(dir.path()).args(["--endpoint-url", &moto.url, "bake", "--dry-run", "--no-tools"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("deploying the prerequisites stack prereqsaid-bake") && err.contains("imgbuild destroy --bake-prereqs"), "{err}");
}

#[test]
fn destroy_bake_prereqs_refuses_delete_data() {
    let dir = tempfile::tempdir().unwrap();
    let out = imgbuild(dir.path()).args(["destroy", "--bake-prereqs", "--delete-data", "--yes"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn destroy_bake_prereqs_deletes_that_stack_and_looks_for_no_file_system() {
    // The prerequisites stack carries the project tag like the product's stack: a file-system
    // search by tag would find the product's data, so none is made (no EFS rules here: any EFS
    // call fails the test).
    let name = "vectordb-bake";
    let ds = mock!(aws_sdk_cloudformation::Client::describe_stacks)
        .match_requests(move |r| r.stack_name() == Some(name))
        .sequence()
        .output(move || {
            aws_sdk_cloudformation::operation::describe_stacks::DescribeStacksOutput::builder()
                .stacks(
                    aws_sdk_cloudformation::types::Stack::builder()
                        .stack_name(name)
                        .stack_id("arn:aws:cloudformation:us-east-1:123456789012:stack/vectordb-bake/1")
                        .creation_time(aws_smithy_types::DateTime::from_secs(1_700_000_000))
                        .stack_status(aws_sdk_cloudformation::types::StackStatus::CreateComplete)
                        .build(),
                )
                .build()
        })
        .error(|| {
            aws_sdk_cloudformation::operation::describe_stacks::DescribeStacksError::generic(meta(
                "ValidationError",
                "Stack with id vectordb-bake does not exist",
            ))
        })
        .repeatedly()
        .build();
    let events = deleted_stack_events();
    let del = mock!(aws_sdk_cloudformation::Client::delete_stack)
        .match_requests(move |r| r.stack_name() == Some(name))
        .then_output(|| aws_sdk_cloudformation::operation::delete_stack::DeleteStackOutput::builder().build());
    let clients = Aws::default().cfn(&[&ds, &events, &del]).clients();

    assert!(imgbuild::stack::ops::destroy_stack_only(&clients, name, false, fast(), &quiet()).await.unwrap());
    assert_eq!(del.num_calls(), 1);
}

// ---------------------------------------------------------------------------------------------
// Untested paths

#[tokio::test]
async fn destroy_that_ends_delete_failed_exits_3_with_the_reason_and_deletes_no_data() {
    use aws_sdk_cloudformation::types::{ResourceStatus, StackEvent};
    // DescribeStackEvents (aws-cli `examples/cloudformation/describe-stack-events.rst`): newest
    // first, each with `ResourceStatus` and, on failure, `ResourceStatusReason`.
    let ds = describe_stacks(vec![Some(stack("UPDATE_COMPLETE", &[])), Some(stack("DELETE_IN_PROGRESS", &[])), Some(stack("DELETE_FAILED", &[]))]);
    let ev = |id: &str, logical: &str, kind: &str, status: ResourceStatus, reason: Option<&str>| {
        StackEvent::builder()
            .event_id(id)
            .stack_id(STACK_ID)
            .stack_name(STACK)
            .logical_resource_id(logical)
            .resource_type(kind)
            .resource_status(status)
            .set_resource_status_reason(reason.map(String::from))
            .timestamp(aws_smithy_types::DateTime::from_secs(1_700_000_100))
            .build()
    };
    let events = mock!(aws_sdk_cloudformation::Client::describe_stack_events)
        .sequence()
        .output(|| aws_sdk_cloudformation::operation::describe_stack_events::DescribeStackEventsOutput::builder().build())
        .output(move || {
            aws_sdk_cloudformation::operation::describe_stack_events::DescribeStackEventsOutput::builder()
                .stack_events(ev(
                    "e3",
                    STACK,
                    "AWS::CloudFormation::Stack",
                    ResourceStatus::DeleteFailed,
                    Some("The following resource(s) failed to delete: [ServiceSecurityGroup]. "),
                ))
                .stack_events(ev(
                    "e2",
                    "ServiceSecurityGroup",
                    "AWS::EC2::SecurityGroup",
                    ResourceStatus::DeleteFailed,
                    Some("resource sg-0123456789abcdef0 has a dependent object (Service: Ec2, Status Code: 400)"),
                ))
                .stack_events(ev("e1", STACK, "AWS::CloudFormation::Stack", ResourceStatus::DeleteInProgress, Some("User Initiated")))
                .build()
        })
        .repeatedly()
        .build();
    let del = mock!(aws_sdk_cloudformation::Client::delete_stack)
        .then_output(|| aws_sdk_cloudformation::operation::delete_stack::DeleteStackOutput::builder().build());
    // No EFS rules: a failed stack deletion must not go on to the data.
    let clients = Aws::default().cfn(&[&ds, &events, &del]).clients();

    let err = imgbuild::stack::ops::destroy(&clients, STACK, true, false, fast(), &quiet()).await.unwrap_err();

    match &err {
        Error::StackFailed { status, failures, .. } => {
            assert_eq!(status, "DELETE_FAILED");
            assert!(failures.iter().any(|f| f.contains("ServiceSecurityGroup") && f.contains("dependent object")), "{failures:?}");
        }
        other => panic!("expected StackFailed, got {other:?}"),
    }
    assert_eq!(err.exit_code(), 3);
}

/// The bake script passes shellcheck for every configuration the product renders (validate
/// checks only the config it is given).
#[test]
fn the_bake_script_passes_shellcheck_for_every_config_variant() {
    if crate::support::tool("shellcheck").is_none() {
        return;
    }
    for (name, config, _) in crate::support::configs() {
        let profile = imgbuild::chroma::profile(&imgbuild::chroma::parse_version(&config.chroma.version).unwrap()).unwrap();
        let (script, _) = imgbuild::bake::bake_script(&config, profile).unwrap();
        let report = imgbuild::check::userdata::validate_script("bake.sh", &script, imgbuild::check::userdata::Tools::Required);
        let failures: Vec<_> = report.failures().map(|c| format!("{}: {}", c.name, c.detail)).collect();
        assert!(failures.is_empty(), "{name}: {failures:?}");
        assert!(report.checks.iter().any(|c| c.name.contains("shellcheck")), "{name}: shellcheck ran: {:?}", report.checks);
    }
}

// ---------------------------------------------------------------------------------------------
// Each doctor check, against scripted answers

struct Doctor {
    ec2: Vec<Rule>,
    cfn: Vec<Rule>,
    config: Config,
}

impl Doctor {
    /// An account where everything is fine: GetCallerIdentity (aws-cli
    /// `examples/sts/get-caller-identity.rst`: `UserId`, `Account`, `Arn`), both parameters,
    /// few VPCs and addresses, no stack.
    fn fine() -> Doctor {
        Doctor { ec2: vec![vpcs(1), addresses(0)], cfn: vec![describe_stacks(vec![None])], config: Config::default() }
    }

    async fn run(self) -> Vec<imgbuild::cmd::doctor::Finding> {
        let retry = RetryConfig::standard().with_initial_backoff(Duration::from_millis(1));
        let identity = mock!(aws_sdk_sts::Client::get_caller_identity).then_output(|| {
            aws_sdk_sts::operation::get_caller_identity::GetCallerIdentityOutput::builder()
                .user_id("AIDASAMPLEUSERID")
                .account("123456789012")
                .arn("arn:aws:iam::123456789012:user/DevAdmin")
                .build()
        });
        let sts = mocked!(aws_sdk_sts, [identity], retry.clone());
        let [_, stock] = stock_parameters();
        let handoff = mock!(aws_sdk_ssm::Client::get_parameter).match_requests(|r| r.name() == Some("/imgbuild/vectordb/ami")).then_output(|| {
            aws_sdk_ssm::operation::get_parameter::GetParameterOutput::builder()
                .parameter(aws_sdk_ssm::types::Parameter::builder().name("/imgbuild/vectordb/ami").value(FLAG_AMI).build())
                .build()
        });
        let mut aws = Aws::default().ssm(&[&handoff, &stock]);
        aws.ec2 = self.ec2;
        aws.cfn = self.cfn;
        let clients = aws.clients();
        let conf = aws_config::SdkConfig::builder()
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_credential_types::provider::SharedCredentialsProvider::new(aws_credential_types::Credentials::new(
                "AKIAIOSFODNN7EXAMPLE",
                "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                None,
                None,
                "test",
            )))
            .behavior_version(aws_config::BehaviorVersion::latest())
            .build();
        let ctx =
            imgbuild::config::Context { config: self.config, source: imgbuild::config::Source::Defaults, region: None, profile: None, endpoint_url: None };
        imgbuild::cmd::doctor::checks(&conf, &clients, &ctx, &sts).await
    }
}

/// DescribeVpcs with `n` VPCs (aws-cli `examples/ec2/describe-vpcs.rst`).
fn vpcs(n: usize) -> Rule {
    mock!(aws_sdk_ec2::Client::describe_vpcs).then_output(move || {
        let mut b = aws_sdk_ec2::operation::describe_vpcs::DescribeVpcsOutput::builder();
        for i in 0..n {
            b = b.vpcs(aws_sdk_ec2::types::Vpc::builder().vpc_id(format!("vpc-0a60eb65b4{i:07}")).cidr_block("10.0.0.0/16").build());
        }
        b.build()
    })
}

/// DescribeAddresses with `n` Elastic IPs (aws-cli `examples/ec2/describe-addresses.rst`).
fn addresses(n: usize) -> Rule {
    mock!(aws_sdk_ec2::Client::describe_addresses).then_output(move || {
        let mut b = aws_sdk_ec2::operation::describe_addresses::DescribeAddressesOutput::builder();
        for i in 0..n {
            b = b.addresses(aws_sdk_ec2::types::Address::builder().public_ip(format!("203.0.113.{i}")).allocation_id(format!("eipalloc-0{i:016}")).build());
        }
        b.build()
    })
}

fn finding<'a>(all: &'a [imgbuild::cmd::doctor::Finding], check: &str) -> &'a imgbuild::cmd::doctor::Finding {
    all.iter().find(|f| f.check == check).unwrap_or_else(|| panic!("no {check} in {all:?}"))
}

fn verdict(f: &imgbuild::cmd::doctor::Finding) -> String {
    serde_json::to_value(f.verdict).unwrap().as_str().unwrap().to_string()
}

#[tokio::test]
async fn doctor_passes_every_check_on_a_ready_account() {
    let all = Doctor::fine().run().await;
    for check in ["region", "credentials", "account", "AL2023 image", "baked image", "build subnet", "VPC quota", "Elastic IP quota", "stack"] {
        assert_eq!(verdict(finding(&all, check)), "ok", "{check}: {all:?}");
    }
    assert_eq!(finding(&all, "credentials").detail, "found (access key AKIA...)", "the key id's first four characters, never the secret");
    assert!(!format!("{all:?}").contains("wJalr"), "the secret never shows");
    assert!(finding(&all, "account").detail.starts_with("123456789012 as arn:aws:iam::123456789012:user/DevAdmin"));
}

#[tokio::test]
async fn doctor_warns_on_the_vpc_and_elastic_ip_quotas_a_deploy_would_exceed() {
    let mut d = Doctor::fine();
    d.config.stack.nat_gateways = imgbuild::config::NatGateways::PerAz;
    d.ec2 = vec![vpcs(4), addresses(4)];
    let all = d.run().await;
    let vpc = finding(&all, "VPC quota");
    assert_eq!(verdict(vpc), "warn");
    assert!(vpc.detail.contains("4 VPCs") && vpc.fix.as_deref().unwrap().contains("L-F678F1CE"), "{vpc:?}");
    let eip = finding(&all, "Elastic IP quota");
    assert_eq!(verdict(eip), "warn");
    assert!(eip.detail.contains("needs 2 more") && eip.fix.as_deref().unwrap().contains("nat_gateways: one"), "{eip:?}");
}

#[tokio::test]
async fn doctor_tells_a_missing_build_subnet_from_one_it_may_not_read() {
    use aws_sdk_ec2::operation::describe_subnets::DescribeSubnetsError;
    let mut d = Doctor::fine();
    d.config.bake.subnet_id = Some("subnet-0123456789abcdef0".into());
    // EC2 answers an unknown subnet id with InvalidSubnetID.NotFound (EC2 API reference, "Error
    // codes for the Amazon EC2 API").
    d.ec2.push(
        mock!(aws_sdk_ec2::Client::describe_subnets)
            .then_error(|| DescribeSubnetsError::generic(meta("InvalidSubnetID.NotFound", "The subnet ID 'subnet-0123456789abcdef0' does not exist"))),
    );
    let all = d.run().await;
    let f = finding(&all, "build subnet");
    assert_eq!(verdict(f), "fail");
    assert!(f.detail.contains("does not exist"), "{f:?}");

    let mut d = Doctor::fine();
    d.config.bake.subnet_id = Some("subnet-0123456789abcdef0".into());
    // No permission is UnauthorizedOperation: it says nothing about the subnet.
    d.ec2.push(
        mock!(aws_sdk_ec2::Client::describe_subnets)
            .then_error(|| DescribeSubnetsError::generic(meta("UnauthorizedOperation", "You are not authorized to perform this operation."))),
    );
    let all = d.run().await;
    let f = finding(&all, "build subnet");
    assert_eq!(verdict(f), "warn");
    assert!(!f.detail.contains("does not exist") && f.detail.contains("UnauthorizedOperation"), "{f:?}");
    assert!(f.fix.as_deref().unwrap().contains("ec2:DescribeSubnets"));
}

#[tokio::test]
async fn doctor_warns_about_a_failed_stack() {
    let mut d = Doctor::fine();
    d.cfn = vec![describe_stacks(vec![Some(stack("UPDATE_ROLLBACK_FAILED", &[]))])];
    let all = d.run().await;
    let f = finding(&all, "stack");
    assert_eq!(verdict(f), "warn");
    assert!(f.detail.contains("UPDATE_ROLLBACK_FAILED") && f.fix.is_some(), "{f:?}");
}

/// A template in which the user-data replaced nothing (no launch template) would deploy
/// instances that never boot Chroma: refused before CloudFormation sees it (the only
/// CloudFormation rule is DescribeStacks: any other call fails the test).
#[tokio::test]
async fn a_template_without_a_launch_template_is_refused_before_any_change_set() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-launch-template.yaml");
    std::fs::write(
        &path,
        "AWSTemplateFormatVersion: '2010-09-09'\nResources:\n  Vpc:\n    Type: AWS::EC2::VPC\n    Properties:\n      CidrBlock: 10.0.0.0/16\n",
    )
    .unwrap();
    let ds = describe_stacks(vec![None]);
    let err = deploy_yes_with(&[&ds], Some(path)).await.unwrap_err();
    match &err {
        Error::Invalid(m) => assert!(m.contains("no-launch-template.yaml") && m.contains("AWS::EC2::LaunchTemplate"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// `imgbuild bake --dry-run | head -1`: the document meets a closed stdout; no panic (101).
#[test]
fn bake_dry_run_on_a_closed_stdout_ends_with_141() {
    let Some(moto) = crate::services::moto() else { return };
    let (code, said) = with_closed(&["--endpoint-url", &moto.url, "bake", "--dry-run", "--no-tools"], true, false);
    assert_eq!(code, Some(141), "{said}");
    assert!(!said.contains("panicked"), "{said}");
}

/// Without efs:DescribeFileSystems, destroy still deletes the stack and reports the file system
/// its outputs named (the search for retained ones only warns).
#[tokio::test]
async fn destroy_without_permission_to_list_file_systems_still_reports_the_stacks_own() {
    let mut with_output = stack("UPDATE_COMPLETE", &[]);
    with_output.outputs = Some(vec![aws_sdk_cloudformation::types::Output::builder().output_key("FileSystemId").output_value(FS_RETAINED).build()]);
    let ds = describe_stacks(vec![Some(with_output), None]);
    let events = deleted_stack_events();
    let del = mock!(aws_sdk_cloudformation::Client::delete_stack)
        .then_output(|| aws_sdk_cloudformation::operation::delete_stack::DeleteStackOutput::builder().build());
    // EFS answers a missing permission with AccessDeniedException (HTTP 403).
    let listed = mock!(aws_sdk_efs::Client::describe_file_systems).then_error(|| {
        aws_sdk_efs::operation::describe_file_systems::DescribeFileSystemsError::generic(meta(
            "AccessDeniedException",
            "User is not authorized to perform: elasticfilesystem:DescribeFileSystems",
        ))
    });
    let clients = Aws::default().cfn(&[&ds, &events, &del]).efs(&[&listed]).clients();

    let d = imgbuild::stack::ops::destroy(&clients, STACK, false, false, fast(), &quiet()).await.unwrap();

    assert!(d.existed && !d.data_deleted);
    assert_eq!(d.file_systems, vec![FS_RETAINED.to_string()]);
    assert_eq!(del.num_calls(), 1);
}

// ---------------------------------------------------------------------------------------------
// Deploy's cost: the Price List asked once, for exactly what the change set prices

/// `deploy --no-execute` of a change set adding a NAT gateway and an alarm, with `prices:` as
/// given; returns deploy's JSON and the GetProducts requests. GetProducts answers in its
/// documented shape (tests/it/cost.rs, `entry`): $0.05 a NAT gateway hour (not the table's
/// $0.045, so whose figure is used shows), $0.10 a standard alarm.
async fn priced_no_execute(prices: &str) -> (serde_json::Value, Vec<aws_sdk_pricing::operation::get_products::GetProductsInput>) {
    use aws_sdk_cloudformation::types::{ChangeAction, ChangeSetStatus, ExecutionStatus, ResourceChange};
    let config = crate::support::parse(&format!("name: vectordb\nprices: {prices}\n"));
    let ctx =
        imgbuild::config::Context { config, source: imgbuild::config::Source::Defaults, region: Some("us-east-1".into()), profile: None, endpoint_url: None };
    let handoff = mock!(aws_sdk_ssm::Client::get_parameter).match_requests(|r| r.name() == Some("/imgbuild/vectordb/ami")).then_error(|| {
        aws_sdk_ssm::operation::get_parameter::GetParameterError::ParameterNotFound(
            aws_sdk_ssm::types::error::ParameterNotFound::builder().meta(meta("ParameterNotFound", "")).build(),
        )
    });
    // aws-cli `examples/ssm/get-parameter.rst`: `Parameter` with `Name`, `Type`, `Value`.
    let stock = mock!(aws_sdk_ssm::Client::get_parameter).match_requests(|r| r.name().is_some_and(|n| n.starts_with("/aws/service/"))).then_output(|| {
        aws_sdk_ssm::operation::get_parameter::GetParameterOutput::builder()
            .parameter(
                aws_sdk_ssm::types::Parameter::builder()
                    .name("/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64")
                    .r#type(aws_sdk_ssm::types::ParameterType::String)
                    .value(STOCK)
                    .build(),
            )
            .build()
    });
    let ds = describe_stacks(vec![None]);
    // CreateChangeSet answers `Id` and `StackId` (CloudFormation API reference, CreateChangeSet).
    let create = mock!(aws_sdk_cloudformation::Client::create_change_set)
        .then_output(|| aws_sdk_cloudformation::operation::create_change_set::CreateChangeSetOutput::builder().id(CS).stack_id(STACK_ID).build());
    // DescribeChangeSet (CloudFormation API reference): CREATE_COMPLETE, AVAILABLE, `Changes[]`.
    let described = mock!(aws_sdk_cloudformation::Client::describe_change_set).then_output(|| {
        let add = |id: &str, kind: &str| {
            aws_sdk_cloudformation::types::Change::builder()
                .r#type(aws_sdk_cloudformation::types::ChangeType::Resource)
                .resource_change(ResourceChange::builder().action(ChangeAction::Add).logical_resource_id(id).resource_type(kind).build())
                .build()
        };
        aws_sdk_cloudformation::operation::describe_change_set::DescribeChangeSetOutput::builder()
            .change_set_id(CS)
            .change_set_name("imgbuild-1")
            .stack_id(STACK_ID)
            .stack_name(STACK)
            .status(ChangeSetStatus::CreateComplete)
            .execution_status(ExecutionStatus::Available)
            .creation_time(aws_smithy_types::DateTime::from_secs(1_700_000_000))
            .changes(add("NatGatewayA", "AWS::EC2::NatGateway"))
            .changes(add("ChromaUnhealthyAlarm", "AWS::CloudWatch::Alarm"))
            .build()
    });
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = seen.clone();
    let price_list = mock!(aws_sdk_pricing::Client::get_products).then_compute_output(move |r| {
        keep.lock().unwrap().push(r.clone());
        let family = r.filters().iter().find(|f| f.field() == "productFamily").map(|f| f.value().to_string()).unwrap_or_default();
        let loc = "US East (N. Virginia)";
        let list = match family.as_str() {
            "NAT Gateway" => vec![crate::cost::entry("NATH", "NAT Gateway", "NatGateway-Hours", loc, "Hrs", "0.0500000000")],
            "Alarm" => vec![crate::cost::entry("ALRM", "Alarm", "CW:AlarmMonitorUsage", loc, "Alarms", "0.1000000000")],
            _ => vec![],
        };
        aws_sdk_pricing::operation::get_products::GetProductsOutput::builder().format_version("aws_v1").set_price_list(Some(list)).build()
    });
    let mut clients = Aws::default().ssm(&[&handoff, &stock]).cfn(&[&ds, &create, &described]).with_api_gateway_account().clients();
    clients.pricing = mocked!(aws_sdk_pricing, [price_list], RetryConfig::disabled());
    let args = imgbuild::cli::DeployArgs {
        no_execute: true,
        tools: imgbuild::cli::ToolArgs { require_tools: false, no_tools: true },
        ..imgbuild::cmd::plain_deploy_args(false, Some(30))
    };
    struct Never;
    impl imgbuild::stack::changeset::Confirmer for Never {
        fn confirm<'a>(&'a self, q: &'a str) -> std::pin::Pin<Box<dyn std::future::Future<Output = imgbuild::Result<bool>> + Send + 'a>> {
            panic!("--no-execute asks nothing, asked {q}")
        }
    }
    let ui = imgbuild::ui::Ui::new(imgbuild::cli::OutputFormat::Text, 0, true);
    let doc = imgbuild::cmd::deploy_flow(&clients, &args, &ctx, ui, &Never, std::future::pending()).await.unwrap();
    let sent = seen.lock().unwrap().clone();
    (doc, sent)
}

fn cost_item<'a>(doc: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    doc["cost"]["items"].as_array().unwrap().iter().find(|i| i["resource"] == id).unwrap_or_else(|| panic!("{id} not in {doc}"))
}

/// The diff's cost asks GetProducts once a deploy, for the two products the change set prices
/// (not the template's every product), and the JSON carries the API's figures with their source.
#[tokio::test]
async fn deploy_prices_its_change_set_from_the_price_list_once() {
    let (doc, sent) = priced_no_execute("auto").await;
    let asked: Vec<(String, String)> = sent
        .iter()
        .map(|r| (r.service_code().unwrap().to_string(), r.filters().iter().find(|f| f.field() == "productFamily").unwrap().value().to_string()))
        .collect();
    assert_eq!(asked.len(), 2, "once each, the diff's lines and the JSON from one lookup: {asked:?}");
    assert!(asked.contains(&("AmazonEC2".into(), "NAT Gateway".into())) && asked.contains(&("AmazonCloudWatch".into(), "Alarm".into())), "{asked:?}");
    assert_eq!(cost_item(&doc, "NatGatewayA")["monthly_usd"], 36.5);
    assert!(cost_item(&doc, "NatGatewayA")["source"].as_str().unwrap().starts_with("AWS Price List API, "), "{doc}");
    assert_eq!(cost_item(&doc, "ChromaUnhealthyAlarm")["monthly_usd"], 0.1);
    assert!(doc["cost"]["source"].as_str().unwrap().starts_with("AWS Price List API, "));
    assert!(doc["cost"]["fallback"].is_null(), "{doc}");
}

/// `prices: table` asks nothing: the table's figures, said as such.
#[tokio::test]
async fn deploy_with_the_table_choice_makes_no_price_list_call() {
    let (doc, sent) = priced_no_execute("table").await;
    assert!(sent.is_empty(), "{sent:?}");
    assert_eq!(cost_item(&doc, "NatGatewayA")["monthly_usd"], 32.85);
    assert_eq!(cost_item(&doc, "NatGatewayA")["source"], "price table dated 2026-11-29");
    assert_eq!(doc["cost"]["source"], "price table dated 2026-11-29");
}
