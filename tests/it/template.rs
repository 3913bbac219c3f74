//! The stack template in infra/: it carries the current default user-data, agrees with the boot
//! script on how deploy-time values reach the instance, passes every security policy (and each
//! policy catches the template that breaks it), stays under CloudFormation's size limit, and
//! is cfn-lint clean as deploy sends it.

use std::path::Path;
use std::process::Command;

use base64::Engine;
use imgbuild::check::guard::{self, Verdict};
use imgbuild::config::Config;
use imgbuild::render::{self, EFS_TAG, Format, Mode};
use imgbuild::stack::template::{self, STACK_TEMPLATE_NAME, Template};

use crate::support::*;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Rewrites the launch template's `UserData:` (the line and any block under it) in
/// infra/stack.yaml with `base64`, the gzipped render encoded as EC2 takes it: the raw render
/// would put the file over CloudFormation's 51,200-byte limit for a template sent inline.
fn rewrite_embedded_user_data(text: &str, base64: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().position(|l| l.trim_start().starts_with("UserData:")).expect("the launch template's user-data");
    let indent = lines[start].len() - lines[start].trim_start().len();
    let end = (start + 1..lines.len()).find(|&i| !lines[i].trim().is_empty() && lines[i].len() - lines[i].trim_start().len() <= indent).unwrap_or(lines.len());
    let mut out: Vec<String> = lines[..start].iter().map(|s| s.to_string()).collect();
    out.push(format!("{}UserData: {base64}", " ".repeat(indent)));
    out.extend(lines[end..].iter().map(|s| s.to_string()));
    out.join("\n") + "\n"
}

/// CloudFormation takes at most 51,200 bytes in `TemplateBody` ("CloudFormation quotas": template
/// body size in a request), and `aws cloudformation deploy --template-file` sends the file inline
/// unless given an S3 bucket: the file as it is must fit, so the README's promise holds.
#[test]
fn the_file_as_it_is_fits_an_inline_template_body() {
    let size = std::fs::metadata(repo().join("infra/stack.yaml")).unwrap().len() as usize;
    assert!(size <= template::BODY_LIMIT, "infra/stack.yaml is {size} bytes, over {}", template::BODY_LIMIT);
}

#[test]
fn embedded_user_data_is_the_current_default_render() {
    let expected = String::from_utf8(render_with(&Config::default(), None, Mode::Full, Format::CloudConfig, false).raw).unwrap();
    let t = Template::reference();
    let lt = t.launch_templates();
    assert_eq!(lt, ["LaunchTemplate"]);
    let embedded = t.embedded_user_data("LaunchTemplate").expect("base64 of the gzipped user-data");
    // Gzipped and encoded (a plain string), not the raw text under Fn::Base64: see the size test.
    let encoded = t.document()["Resources"]["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"].is_string();
    if embedded != expected || !encoded {
        if std::env::var("IMGBUILD_UPDATE_TEMPLATE").is_ok_and(|v| v == "1") {
            let path = repo().join("infra/stack.yaml");
            let text = std::fs::read_to_string(&path).unwrap();
            let gzipped = render_with(&Config::default(), None, Mode::Full, Format::CloudConfig, true).output;
            let b64 = base64::engine::general_purpose::STANDARD.encode(gzipped);
            std::fs::write(&path, rewrite_embedded_user_data(&text, &b64)).unwrap();
            panic!("infra/stack.yaml rewritten with the current user-data; rebuild and run again");
        }
        panic!(
            "infra/stack.yaml carries stale user-data (plain `aws cloudformation deploy` would boot it). \
             Refresh it: IMGBUILD_UPDATE_TEMPLATE=1 cargo test --test it embedded_user_data"
        );
    }
}

#[test]
fn template_tags_the_instance_the_way_the_boot_script_reads_it() {
    let t = Template::reference();
    let data = &t.document()["Resources"]["LaunchTemplate"]["Properties"]["LaunchTemplateData"];
    assert_eq!(data["MetadataOptions"]["HttpTokens"].as_str(), Some("required"), "IMDSv2 only");
    assert_eq!(data["MetadataOptions"]["InstanceMetadataTags"].as_str(), Some("enabled"), "the boot script reads a tag over IMDS");
    let specs = data["TagSpecifications"].as_sequence().unwrap();
    let instance = specs.iter().find(|s| s["ResourceType"].as_str() == Some("instance")).unwrap();
    let tag = instance["Tags"].as_sequence().unwrap().iter().find(|t| t["Key"].as_str() == Some(EFS_TAG)).expect("the EFS id tag");
    assert_eq!(guard::long_form(&tag["Value"]), serde_json::json!({ "Fn::If": ["CreatesFileSystem", { "Ref": "FileSystem" }, { "Ref": "FileSystemId" }] }));
    let boot = render_with(&Config::default(), None, Mode::Baked, Format::CloudConfig, false);
    assert!(boot.scripts[0].text.contains(&format!("tags/instance/{EFS_TAG}")));
}

#[test]
fn the_parameters_deploy_sets_exist_in_the_template() {
    let names = Template::reference().parameter_names();
    for p in ["VpcCidr", "NatGateways", "AllowedClientCidr", "ImageId", "InstanceType", "ChromaPort", "HeartbeatPath", "StorageMode", "LogRetentionDays"] {
        assert!(names.iter().any(|n| n == p), "{p} missing from {names:?}");
    }
}

#[test]
fn every_policy_passes_on_the_stack_as_deploy_sends_it() {
    for mode in [Mode::Full, Mode::Baked] {
        let mut t = Template::reference();
        let r = render_with(&Config::default(), None, mode, Format::CloudConfig, true);
        assert_eq!(t.set_user_data(&base64::engine::general_purpose::STANDARD.encode(&r.output)).unwrap(), 1);
        let body = t.body().unwrap();
        assert!(body.len() < template::BODY_LIMIT, "{} bytes", body.len());
        let outcomes = t.check_policies().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(outcomes.len(), 21, "{outcomes:?}");
        assert!(outcomes.iter().all(|o| o.verdict == Verdict::Pass), "{outcomes:?}");
    }
}

#[test]
fn each_policy_catches_the_template_that_breaks_it() {
    let dir = repo().join("tests/fixtures/guard");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_str().unwrap().to_string();
        let Some(rule) = file.strip_suffix("-violation.yaml") else { continue };
        let t = Template::parse(&std::fs::read_to_string(&path).unwrap(), &file).unwrap();
        let outcomes = guard::evaluate(&t.name, t.document()).unwrap();
        let failing: Vec<&str> = outcomes.iter().filter(|o| o.verdict == Verdict::Fail).map(|o| o.rule.as_str()).collect();
        assert_eq!(failing, [rule], "{file} must fail exactly its own rule");
        assert!(t.check_policies().is_err());
        seen += 1;
    }
    let rules = guard::evaluate(STACK_TEMPLATE_NAME, Template::reference().document()).unwrap().len();
    assert_eq!(seen, rules, "one violation fixture per rule");
}

#[test]
fn oversized_templates_are_refused_before_cloudformation_sees_them() {
    let mut t = Template::reference();
    t.set_user_data(&"A".repeat(template::BODY_LIMIT)).unwrap();
    let err = t.body().unwrap_err().to_string();
    assert!(err.contains("51200-byte limit"), "{err}");
}

#[test]
fn cfn_lint_is_clean_on_the_template_and_on_what_deploy_sends() {
    let Some(lint) = tool_in_venv("cfn-lint") else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut t = Template::reference();
    let r = render_with(&Config::default(), None, Mode::Baked, Format::CloudConfig, true);
    t.set_user_data(&base64::engine::general_purpose::STANDARD.encode(&r.output)).unwrap();
    let sent = dir.path().join("sent.yaml");
    std::fs::write(&sent, t.body().unwrap()).unwrap();
    let fixtures = repo().join("tests/fixtures");
    let mut files = vec![repo().join("infra/stack.yaml"), sent];
    for f in std::fs::read_dir(fixtures.join("guard")).unwrap() {
        files.push(f.unwrap().path());
    }
    files.push(fixtures.join("moto-stack.yaml"));
    files.push(repo().join("infra/bake-prereqs.yaml"));
    let out = Command::new(lint).args(&files).output().unwrap();
    assert!(out.status.success(), "cfn-lint found errors or warnings:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // And it is a real check: a template with a bad property fails.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "Resources:\n  Vpc:\n    Type: AWS::EC2::VPC\n    Properties:\n      CidrBlok: 10.0.0.0/16\n").unwrap();
    assert!(!Command::new(tool_in_venv("cfn-lint").unwrap()).arg(&bad).status().unwrap().success());
}

#[test]
fn user_data_mode_and_render_constants_agree() {
    // The deploy path compresses; what EC2 inflates must be what render-userdata prints.
    let plain = render_with(&Config::default(), None, Mode::Full, Format::CloudConfig, false);
    let zipped = render_with(&Config::default(), None, Mode::Full, Format::CloudConfig, true);
    assert_eq!(plain.raw, zipped.raw);
    assert_eq!(render::gzip(&plain.raw), zipped.output);
}

#[test]
fn checkov_finds_nothing_and_every_suppression_is_justified() {
    let Some(checkov) = tool_in_venv("checkov") else { return };
    let out =
        Command::new(checkov).args(["-d", "infra", "--framework", "cloudformation", "--skip-download", "-o", "json"]).current_dir(repo()).output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("checkov JSON: {e} (exit {:?}): {}\nstderr: {}", out.status.code(), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    });
    let summary = &report["summary"];
    assert_eq!(summary["failed"], 0, "checkov failed checks: {}", report["results"]["failed_checks"]);
    assert!(summary["passed"].as_u64().unwrap() >= 60, "{summary}");
    let skipped = report["results"]["skipped_checks"].as_array().cloned().unwrap_or_default();
    for s in &skipped {
        let comment = s["check_result"]["suppress_comment"].as_str().unwrap_or_default();
        assert!(comment.len() > 40, "suppression of {} on {} needs a real justification: {comment:?}", s["check_id"], s["resource"]);
    }
    assert_eq!(skipped.len(), 5, "a new suppression needs a look: {skipped:?}");
}

fn depends_on(t: &Template, id: &str) -> Vec<String> {
    match &t.document()["Resources"][id]["DependsOn"] {
        serde_yaml::Value::String(s) => vec![s.clone()],
        serde_yaml::Value::Sequence(s) => s.iter().filter_map(|v| v.as_str().map(String::from)).collect(),
        _ => Vec::new(),
    }
}

/// Fault 3. Without a CreationPolicy, CREATE_COMPLETE only means an instance exists. With
/// `CreationPolicy.ResourceSignal` on the group and `WaitOnResourceSignals` on its rolling update
/// the stack waits for the instance's own signal and rolls back on FAILURE or timeout
/// (CloudFormation user guide: "CreationPolicy attribute", "UpdatePolicy attribute",
/// AutoScalingRollingUpdate: WaitOnResourceSignals, PauseTime, SuspendProcesses). The boot
/// finds where to signal in the instance tags of the stack/boot contract, and the role may
/// signal only this stack (`cloudformation:SignalResource` on `AWS::StackId`).
#[test]
fn the_group_waits_for_the_instance_signal_and_may_signal_only_its_stack() {
    let t = Template::reference();
    let r = &t.document()["Resources"];
    let asg = &r["AutoScalingGroup"];
    assert_eq!(asg["Type"].as_str(), Some("AWS::AutoScaling::AutoScalingGroup"));
    assert_eq!(asg["CreationPolicy"]["ResourceSignal"]["Count"].as_u64(), Some(1));
    let update = &asg["UpdatePolicy"]["AutoScalingRollingUpdate"];
    assert_eq!(update["WaitOnResourceSignals"].as_bool(), Some(true));
    assert_eq!(update["PauseTime"], asg["CreationPolicy"]["ResourceSignal"]["Timeout"], "one wait for create and update");
    let suspended: Vec<&str> = update["SuspendProcesses"].as_sequence().unwrap().iter().filter_map(|v| v.as_str()).collect();
    for p in ["HealthCheck", "ReplaceUnhealthy", "AZRebalance", "AlarmNotification", "ScheduledActions"] {
        assert!(suspended.contains(&p), "{p} not suspended during the rolling update: {suspended:?}");
    }
    assert_eq!(t.signal_waits(), [("AutoScalingGroup".to_string(), 20 * 60)]);

    let data = &r["LaunchTemplate"]["Properties"]["LaunchTemplateData"];
    let instance = data["TagSpecifications"].as_sequence().unwrap().iter().find(|s| s["ResourceType"].as_str() == Some("instance")).unwrap();
    let tag = |k: &str| instance["Tags"].as_sequence().unwrap().iter().find(|t| t["Key"].as_str() == Some(k)).map(|t| guard::long_form(&t["Value"]));
    assert_eq!(tag("ImgbuildStackName"), Some(serde_json::json!({ "Ref": "AWS::StackName" })));
    assert_eq!(tag("ImgbuildSignalResource"), Some(serde_json::json!("AutoScalingGroup")));

    let signal: Vec<_> = t
        .resources_of_type("AWS::IAM::RolePolicy")
        .into_iter()
        .map(|id| guard::long_form(&r[id.as_str()]["Properties"]))
        .filter(|p| p.to_string().contains("cloudformation:"))
        .collect();
    assert_eq!(signal.len(), 1, "{signal:?}");
    assert_eq!(signal[0]["RoleName"], serde_json::json!({ "Ref": "InstanceRole" }));
    let statements = signal[0]["PolicyDocument"]["Statement"].as_array().unwrap();
    assert_eq!(statements.len(), 1);
    assert_eq!(statements[0]["Action"], "cloudformation:SignalResource");
    assert_eq!(statements[0]["Resource"], serde_json::json!({ "Ref": "AWS::StackId" }));
}

/// Fault 6. CloudFormation creates resources in parallel unless a reference or DependsOn
/// orders them ("DependsOn attribute", CloudFormation user guide). The group must wait for the
/// private routes and their subnet associations (a full-mode boot downloads over the NAT), the
/// signal permission and the listener; the VPC link must wait for the listener, or it fails
/// with "NLB is not in active state" (aws-cloudformation/cloudformation-coverage-roadmap #1951).
#[test]
fn the_group_and_the_vpc_link_wait_for_what_they_use() {
    let t = Template::reference();
    let asg = depends_on(&t, "AutoScalingGroup");
    for needed in [
        "PrivateDefaultRouteA",
        "PrivateDefaultRouteB",
        "PrivateSubnetARouteTableAssociation",
        "PrivateSubnetBRouteTableAssociation",
        "Listener",
        "InstanceRoleEfsPolicy",
        "InstanceRoleSignalPolicy",
        "MountTargetA",
        "MountTargetB",
    ] {
        assert!(asg.iter().any(|d| d == needed), "AutoScalingGroup must depend on {needed}: {asg:?}");
    }
    assert!(depends_on(&t, "VpcLink").iter().any(|d| d == "Listener"), "VpcLink must depend on Listener");
}

/// Fault 10. A shared group gives every member everything any member needs: a future member
/// of a group shared by the NLB and the instance would get NFS to EFS and Chroma's port. So the
/// NLB and the instance have their own groups ("Security groups for your Network Load
/// Balancer": targets admit the load balancer's group), and the instance admits Chroma's port
/// from the NLB's group only. The execute-api endpoint carries calls to this account's APIs
/// only ("Control access to VPC endpoints using endpoint policies", AWS PrivateLink guide;
/// API Gateway: "Use VPC endpoint policies for private APIs").
#[test]
fn the_nlb_and_the_instance_have_their_own_groups_and_the_endpoint_a_policy() {
    let t = Template::reference();
    let doc = guard::long_form(t.document());
    let r = &doc["Resources"];
    let refs = |v: &serde_json::Value| -> Vec<String> { v.as_array().unwrap().iter().map(|g| g["Ref"].as_str().unwrap().to_string()).collect() };
    let nlb = refs(&r["LoadBalancer"]["Properties"]["SecurityGroups"]);
    let instance = refs(&r["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["SecurityGroupIds"]);
    assert!(nlb.iter().all(|g| !instance.contains(g)), "NLB {nlb:?} and instance {instance:?} share a group");
    for (id, res) in r.as_object().unwrap() {
        if res["Type"] == "AWS::EC2::SecurityGroupIngress" {
            let p = &res["Properties"];
            assert_ne!(p["SourceSecurityGroupId"], p["GroupId"], "{id}: a group that admits its own members is a shared group");
            if instance.iter().any(|g| p["GroupId"]["Ref"] == g.as_str()) {
                assert!(nlb.iter().any(|g| p["SourceSecurityGroupId"]["Ref"] == g.as_str()), "{id}: the instance admits only the NLB: {p}");
            }
        }
    }
    let policy = &r["ApiVpcEndpoint"]["Properties"]["PolicyDocument"];
    let statements = policy["Statement"].as_array().expect("the execute-api endpoint has a policy");
    for s in statements {
        assert_eq!(s["Effect"], "Allow");
        let resource = s["Resource"]["Fn::Sub"].as_str().unwrap_or_default();
        assert!(resource.starts_with("arn:${AWS::Partition}:execute-api:${AWS::Region}:${AWS::AccountId}:"), "scoped to this account: {s}");
    }
}

/// Faults 3, 5, 6, 10 cannot come back unnoticed: undoing each fix in the reference stack
/// breaks exactly the guard policy that encodes it, with a readable finding.
#[test]
fn the_policies_catch_each_issue_10_regression_in_the_reference_stack() {
    let text = std::fs::read_to_string(repo().join("infra/stack.yaml")).unwrap();
    let cases = [
        ("asg_waits_for_signal", "        WaitOnResourceSignals: true\n", ""),
        ("asg_waits_for_signal", "    CreationPolicy:\n      ResourceSignal:\n        Count: 1\n        Timeout: PT20M\n", ""),
        ("create_order", "      - PrivateDefaultRouteB\n", ""),
        ("create_order", "      - PrivateSubnetBRouteTableAssociation\n      - Listener\n", "      - PrivateSubnetBRouteTableAssociation\n"),
        ("create_order", "    DependsOn: Listener\n    Properties:\n      Name", "    Properties:\n      Name"),
        ("apigw_account_conditional", "    Type: AWS::ApiGateway::Account\n    Condition: CreatesApiGatewayAccount\n", "    Type: AWS::ApiGateway::Account\n"),
        (
            "execute_api_endpoint_policy",
            "      PolicyDocument:\n        Version: \"2012-10-17\"\n        Statement:\n          - Sid: ThisAccountsApisOnly\n",
            "      Tags: []\n      X:\n        Version: \"2012-10-17\"\n        Statement:\n          - Sid: ThisAccountsApisOnly\n",
        ),
        (
            "nlb_instance_separate_groups",
            "SecurityGroupIds: [!Ref ServiceSecurityGroup]",
            "SecurityGroupIds: [!Ref ServiceSecurityGroup, !Ref LoadBalancerSecurityGroup]",
        ),
        (
            "nlb_instance_separate_groups",
            "      SourceSecurityGroupId: !Ref LoadBalancerSecurityGroup\n",
            "      SourceSecurityGroupId: !Ref ServiceSecurityGroup\n",
        ),
    ];
    for (rule, from, to) in cases {
        assert_eq!(text.matches(from).count(), 1, "{rule}: {from:?} must occur once in infra/stack.yaml");
        let t = Template::parse(&text.replacen(from, to, 1), "regressed.yaml").unwrap();
        let outcomes = guard::evaluate(&t.name, t.document()).unwrap_or_else(|e| panic!("{rule}: {e}"));
        let failing: Vec<&str> = outcomes.iter().filter(|o| o.verdict == Verdict::Fail).map(|o| o.rule.as_str()).collect();
        assert!(failing.contains(&rule), "{rule} must catch {from:?} -> {to:?}: failing {failing:?}");
    }
}
