//! Deploy orchestration against a moto server: change sets, stack states, outputs, no-change
//! deploys, refusals, cleanup, destroy, and the AMI handoff. moto cannot run the product's own
//! template (its CloudFormation turns a network load balancer into an application one), so
//! executions use tests/fixtures/moto-stack.yaml; the real template goes as far as moto takes it:
//! a computed change set.

use imgbuild::cli::{DeployArgs, ToolArgs, WaitArgs};
use imgbuild::error::Error;
use imgbuild::stack::changeset::Confirmer;

use crate::services;
use crate::support::imgbuild;
use crate::support::{moto_cmd as cmd, moto_project as project, rt};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/moto-stack.yaml");

async fn sdk(url: &str) -> aws_config::SdkConfig {
    crate::support::moto_sdk(url, "us-east-1").await
}

/// Change sets waiting on a stack, not executed (none may outlive an operation unless
/// --no-execute kept one). moto lists every stack's change sets and keeps executed ones, so
/// this filters by stack name and execution status itself.
fn pending_change_sets(url: &str, stack: &str) -> Vec<String> {
    rt().block_on(async {
        let cfn = aws_sdk_cloudformation::Client::new(&sdk(url).await);
        match cfn.list_change_sets().stack_name(stack).send().await {
            Ok(o) => o
                .summaries()
                .iter()
                .filter(|s| s.stack_name() == Some(stack))
                .filter(|s| s.execution_status().map(|e| e.as_str()) != Some("EXECUTE_COMPLETE"))
                .filter_map(|s| s.change_set_name().map(String::from))
                .collect(),
            Err(_) => Vec::new(),
        }
    })
}

fn stack_parameter(url: &str, stack: &str, key: &str) -> Option<String> {
    rt().block_on(async {
        let cfn = aws_sdk_cloudformation::Client::new(&sdk(url).await);
        let s = imgbuild::stack::describe(&cfn, stack).await.unwrap()?;
        imgbuild::stack::parameters_of(&s).get(key).cloned()
    })
}

fn stack_status(url: &str, stack: &str) -> Option<String> {
    rt().block_on(async {
        let cfn = aws_sdk_cloudformation::Client::new(&sdk(url).await);
        imgbuild::stack::describe(&cfn, stack).await.unwrap().map(|s| imgbuild::stack::status_of(&s))
    })
}

#[test]
fn create_update_no_change_and_destroy() {
    let Some(moto) = services::moto() else { return };
    let dir = project("lifecycle", "");
    let url = &moto.url;

    let out = cmd(dir.path(), url).args(["deploy", "--yes", "--no-tools", "--template", FIXTURE]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("creating CREATE change set for lifecycle"), "{err}");
    assert!(err.contains("+ Vpc (AWS::EC2::VPC)") && err.contains("+ ServiceSecurityGroup (AWS::EC2::SecurityGroup)"), "{err}");
    assert!(err.contains("stack lifecycle: CREATE_COMPLETE"), "{err}");
    assert_eq!(stack_status(url, "lifecycle").as_deref(), Some("CREATE_COMPLETE"));
    assert!(pending_change_sets(url, "lifecycle").is_empty());
    assert_eq!(stack_parameter(url, "lifecycle", "ChromaPort").as_deref(), Some("8000"));

    // A changed port is an UPDATE. (moto lists no changes for UPDATE change sets; the diff
    // rows of updates are tested with scripted responses in mocks.rs.)
    std::fs::write(dir.path().join("imgbuild.yaml"), "name: lifecycle\nregion: us-east-1\naws:\n  poll_interval_secs: 1\nchroma:\n  port: 8080\n").unwrap();
    let out = cmd(dir.path(), url).args(["--output", "json", "deploy", "--yes", "--no-tools", "--template", FIXTURE]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["deploy"]["executed"], true);
    assert_eq!(doc["deploy"]["status"], "UPDATE_COMPLETE");
    assert_eq!(stack_parameter(url, "lifecycle", "ChromaPort").as_deref(), Some("8080"));
    assert_eq!(doc["ami"]["source"]["kind"], "stock");
    assert_eq!(doc["ami"]["mode"], "full");

    // The same again: no changes is success, and the failed change set is not left behind.
    let out = cmd(dir.path(), url).args(["--output", "json", "deploy", "--yes", "--no-tools", "--template", FIXTURE]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["deploy"]["no_changes"], true);
    assert_eq!(doc["deploy"]["executed"], false);
    assert!(pending_change_sets(url, "lifecycle").is_empty(), "{:?}", pending_change_sets(url, "lifecycle"));

    let out = cmd(dir.path(), url).arg("status").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("stack lifecycle: UPDATE_COMPLETE"));

    cmd(dir.path(), url).args(["destroy", "--yes"]).assert().success();
    assert_eq!(stack_status(url, "lifecycle"), None);
    let out = cmd(dir.path(), url).args(["--output", "json", "status"]).output().unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["status"]["exists"], false);
    cmd(dir.path(), url).args(["destroy", "--yes"]).assert().success().stderr(predicates::str::contains("nothing to destroy"));
}

#[test]
fn no_execute_leaves_the_change_set_for_review() {
    let Some(moto) = services::moto() else { return };
    let dir = project("review", "");
    let out = cmd(dir.path(), &moto.url).args(["deploy", "--no-execute", "--no-tools", "--template", FIXTURE]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is left for review"));
    assert_eq!(stack_status(&moto.url, "review").as_deref(), Some("REVIEW_IN_PROGRESS"));
    let pending = pending_change_sets(&moto.url, "review");
    assert_eq!(pending.len(), 1);
    // The reviewer executes it; the next deploy then finds nothing to change.
    rt().block_on(async {
        let cfn = aws_sdk_cloudformation::Client::new(&sdk(&moto.url).await);
        cfn.execute_change_set().stack_name("review").change_set_name(&pending[0]).send().await.unwrap();
    });
    assert_eq!(stack_status(&moto.url, "review").as_deref(), Some("CREATE_COMPLETE"));
    let out = cmd(dir.path(), &moto.url).args(["--output", "json", "deploy", "--yes", "--no-tools", "--template", FIXTURE]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["deploy"]["no_changes"], true);
}

#[test]
fn without_a_terminal_or_yes_nothing_is_executed_and_nothing_left() {
    let Some(moto) = services::moto() else { return };
    let dir = project("notty", "");
    let out = cmd(dir.path(), &moto.url).args(["deploy", "--no-tools", "--template", FIXTURE]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to prompt"), "{err}");
    assert!(err.contains("cleanup: deleted change set"), "{err}");
    assert!(err.contains("cleanup: deleted the empty stack notty"), "{err}");
    assert_eq!(stack_status(&moto.url, "notty"), None);
}

/// Answers the prompt by pulling the interrupt, like Ctrl-C while the change set is pending.
struct CtrlCAtPrompt(std::sync::Arc<tokio::sync::Notify>);

impl Confirmer for CtrlCAtPrompt {
    fn confirm<'a>(&'a self, _: &'a str) -> std::pin::Pin<Box<dyn std::future::Future<Output = imgbuild::Result<bool>> + Send + 'a>> {
        Box::pin(async move {
            self.0.notify_one();
            std::future::pending().await
        })
    }
}

#[test]
fn interrupt_while_the_change_set_is_pending_removes_it() {
    let Some(moto) = services::moto() else { return };
    let dir = project("interrupted", "");
    let ctx = imgbuild::cmd::context(&imgbuild::cli::GlobalArgs {
        config: Some(dir.path().join("imgbuild.yaml")),
        profile: None,
        region: None,
        endpoint_url: Some(moto.url.clone()),
        output: imgbuild::cli::OutputFormat::Text,
        verbose: 0,
        quiet: true,
        prices: None,
    })
    .unwrap();
    let args = DeployArgs {
        ami: None,
        mode: None,
        template: Some(FIXTURE.into()),
        yes: false,
        no_execute: false,
        update_base: false,
        disable_rollback: false,
        no_drift_check: false,
        no_rollback_triggers: false,
        wait: WaitArgs { wait: false, timeout: Some(120) },
        tools: ToolArgs { require_tools: false, no_tools: true },
    };
    let err = rt().block_on(async {
        let clients = imgbuild::aws::Clients::from_conf(&sdk(&moto.url).await);
        let bell = std::sync::Arc::new(tokio::sync::Notify::new());
        let ui = imgbuild::ui::Ui::new(imgbuild::cli::OutputFormat::Text, 0, true);
        let waiter = bell.clone();
        imgbuild::cmd::deploy_flow(&clients, &args, &ctx, ui, &CtrlCAtPrompt(bell), async move { waiter.notified().await }).await.unwrap_err()
    });
    let Error::Interrupted { cleaned } = &err else { panic!("{err:?}") };
    assert_eq!(err.exit_code(), 130);
    assert!(cleaned.iter().any(|c| c.starts_with("deleted change set")), "{cleaned:?}");
    assert!(cleaned.iter().any(|c| c.contains("deleted the empty stack interrupted")), "{cleaned:?}");
    assert_eq!(stack_status(&moto.url, "interrupted"), None);
}

#[test]
fn deploy_boots_the_baked_image_handed_over_and_refuses_a_mismatched_one() {
    let Some(moto) = services::moto() else { return };
    let url = moto.url.clone();
    // An image that exists in moto, handed over the way bake does, tagged with its Chroma.
    let ami = rt().block_on(async {
        let conf = sdk(&url).await;
        let ssm = aws_sdk_ssm::Client::new(&conf);
        let base = ssm.get_parameter().name("/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64").send().await.unwrap();
        let ami = base.parameter().unwrap().value().unwrap().to_string();
        let ec2 = aws_sdk_ec2::Client::new(&conf);
        // As bake tags its images (images/bake.yaml, aws:createImage TagSpecifications).
        ec2.create_tags()
            .resources(&ami)
            .tags(aws_sdk_ec2::types::Tag::builder().key("imgbuild:chroma-version").value("0.4.13").build())
            .tags(aws_sdk_ec2::types::Tag::builder().key("imgbuild:chroma-image").value("ghcr.io/chroma-core/chroma:0.4.13").build())
            .send()
            .await
            .unwrap();
        ssm.put_parameter().name("/imgbuild/handoff/ami").value(&ami).r#type(aws_sdk_ssm::types::ParameterType::String).send().await.unwrap();
        ami
    });
    let dir = project("handoff", "");
    let out = cmd(dir.path(), &url).args(["deploy", "--yes", "--no-tools", "--template", FIXTURE]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("image {ami} was baked with Chroma 0.4.13 but the config names 1.5.9")), "{err}");
    assert_eq!(stack_status(&url, "handoff"), None, "refused before any change set");

    let dir = project("handoff", "chroma:\n  version: 0.4.13\n");
    let out = cmd(dir.path(), &url).args(["deploy", "--yes", "--no-tools", "--template", FIXTURE]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&format!("image {ami} (baked, from /imgbuild/handoff/ami), user-data mode baked")), "{err}");
    cmd(dir.path(), &url).args(["destroy", "--yes"]).assert().success();
}

#[test]
fn the_real_template_gets_a_computed_change_set() {
    let Some(moto) = services::moto() else { return };
    let dir = project("reference", "");
    let out = cmd(dir.path(), &moto.url).args(["--output", "json", "deploy", "--no-execute", "--no-tools"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let changes = doc["deploy"]["changes"].as_array().unwrap();
    let ids: Vec<&str> = changes.iter().map(|c| c["logical_id"].as_str().unwrap()).collect();
    for id in ["FileSystem", "LaunchTemplate", "AutoScalingGroup", "LoadBalancer", "RestApi", "ApiVpcEndpoint"] {
        assert!(ids.contains(&id), "{id} missing from {ids:?}");
    }
    assert!(changes.iter().all(|c| c["action"] == "+"));
    // Leave moto clean for the other tests: this change set and its review stack.
    let cs = doc["deploy"]["change_set"].as_str().unwrap().to_string();
    rt().block_on(async {
        let cfn = aws_sdk_cloudformation::Client::new(&sdk(&moto.url).await);
        cfn.delete_change_set().change_set_name(&cs).send().await.unwrap();
        cfn.delete_stack().stack_name("reference").send().await.unwrap();
    });
}

#[test]
fn doctor_checks_the_account_and_says_what_to_do() {
    let Some(moto) = services::moto() else { return };
    let dir = project("doctored", "");
    let out = cmd(dir.path(), &moto.url).args(["--output", "json", "doctor"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let checks = doc["checks"].as_array().unwrap();
    let find = |name: &str| checks.iter().find(|c| c["check"] == name).unwrap_or_else(|| panic!("no {name} in {checks:?}"));
    assert!(find("account")["detail"].as_str().unwrap().starts_with("123456789012"));
    assert_eq!(find("AL2023 image")["verdict"], "ok");
    assert_eq!(find("baked image")["verdict"], "warn");
    assert!(find("baked image")["fix"].as_str().unwrap().contains("imgbuild bake"));
    assert!(checks.iter().all(|c| c["verdict"] == "ok" || c["fix"].is_string()), "every problem says what to do");
    // Without a region, doctor says so and exits 1.
    let out = imgbuild(dir.path()).env_remove("AWS_REGION").env_remove("AWS_DEFAULT_REGION").args(["--config", "/dev/null", "doctor"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("FAIL region"));
}
