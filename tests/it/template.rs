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

/// Rewrites the literal block under `Fn::Base64: |` in infra/stack.yaml.
fn rewrite_embedded_user_data(text: &str, new: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().position(|l| l.trim() == "Fn::Base64: |").expect("the launch template's user-data block");
    let indent = lines[start].len() - lines[start].trim_start().len() + 2;
    let end = (start + 1..lines.len()).find(|&i| !lines[i].trim().is_empty() && lines[i].len() - lines[i].trim_start().len() < indent).unwrap_or(lines.len());
    let mut out: Vec<String> = lines[..=start].iter().map(|s| s.to_string()).collect();
    out.extend(new.lines().map(|l| if l.is_empty() { String::new() } else { format!("{}{l}", " ".repeat(indent)) }));
    out.extend(lines[end..].iter().map(|s| s.to_string()));
    out.join("\n") + "\n"
}

#[test]
fn embedded_user_data_is_the_current_default_render() {
    let expected = String::from_utf8(render_with(&Config::default(), None, Mode::Full, Format::CloudConfig, false).raw).unwrap();
    let t = Template::reference();
    let lt = t.launch_templates();
    assert_eq!(lt, ["LaunchTemplate"]);
    let embedded = t.embedded_user_data("LaunchTemplate").expect("Fn::Base64 literal");
    if embedded != expected {
        if std::env::var("IMGBUILD_UPDATE_TEMPLATE").is_ok_and(|v| v == "1") {
            let path = repo().join("infra/stack.yaml");
            let text = std::fs::read_to_string(&path).unwrap();
            std::fs::write(&path, rewrite_embedded_user_data(&text, &expected)).unwrap();
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
    assert_eq!(guard::long_form(&tag["Value"]), serde_json::json!({ "Ref": "FileSystem" }));
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
        assert_eq!(t.set_user_data(&base64::engine::general_purpose::STANDARD.encode(&r.output)), 1);
        let body = t.body().unwrap();
        assert!(body.len() < template::BODY_LIMIT, "{} bytes", body.len());
        let outcomes = t.check_policies().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(outcomes.len(), 15, "{outcomes:?}");
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
    t.set_user_data(&"A".repeat(template::BODY_LIMIT));
    let err = t.body().unwrap_err().to_string();
    assert!(err.contains("51200-byte limit"), "{err}");
}

#[test]
fn cfn_lint_is_clean_on_the_template_and_on_what_deploy_sends() {
    let Some(lint) = tool_in_venv("cfn-lint") else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut t = Template::reference();
    let r = render_with(&Config::default(), None, Mode::Baked, Format::CloudConfig, true);
    t.set_user_data(&base64::engine::general_purpose::STANDARD.encode(&r.output));
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
    assert_eq!(skipped.len(), 4, "a new suppression needs a look: {skipped:?}");
}
