//! The command line as a user meets it: exit codes, messages on bad input, json, files.

use predicates::prelude::*;
use sha2::{Digest, Sha256};

use crate::support::*;

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn renders_on_built_in_defaults_with_no_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = imgbuild(dir.path()).args(["render-userdata", "--no-tools"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    assert!(stdout.starts_with("#cloud-config\n"));
    let sha = imgbuild::render::hex(&Sha256::digest(stdout.as_bytes()));
    assert!(stderr_of(&out).contains(&format!("sha256 {sha}")), "reports the sha256 of what it printed");
}

#[test]
fn json_output_is_machine_readable_and_matches_the_content() {
    let dir = tempfile::tempdir().unwrap();
    let out = imgbuild(dir.path()).args(["--output", "json", "render-userdata", "--no-tools", "--mode", "baked"]).output().unwrap();
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON document");
    assert_eq!(doc["ok"], true);
    assert_eq!(doc["mode"], "baked");
    let content = doc["content"].as_str().unwrap();
    assert_eq!(doc["sha256"], imgbuild::render::hex(&Sha256::digest(content.as_bytes())));
    assert_eq!(doc["bytes"], content.len());
    assert_eq!(doc["margin"], 16384 - content.len() as i64);
    assert!(doc["checks"].as_array().unwrap().iter().any(|c| c["name"] == "size" && c["status"] == "pass"));
}

#[test]
fn out_file_and_base64_gzip_round_trip() {
    use base64::Engine;
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    imgbuild(dir.path()).args(["render-userdata", "--no-tools", "--out", "plain.txt"]).assert().success().stdout("");
    imgbuild(dir.path()).args(["render-userdata", "--no-tools", "--gzip", "--base64", "--out", "ud.b64"]).assert().success();
    let b64 = std::fs::read_to_string(dir.path().join("ud.b64")).unwrap();
    let gz = base64::engine::general_purpose::STANDARD.decode(b64.trim()).unwrap();
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut raw).unwrap();
    assert_eq!(raw, std::fs::read(dir.path().join("plain.txt")).unwrap());
}

#[test]
fn bad_config_gets_every_error_with_file_line_and_field_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("imgbuild.yaml"),
        "name: vectordb\nchroma:\n  version: latest\nstorage:\n  mount_point: relative/path\nefs:\n  file_system_id: fs-nothex!\ncompose:\n  versoin: 2.0.0\n",
    )
    .unwrap();
    let out = imgbuild(dir.path()).args(["render-userdata", "--no-tools"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty(), "nothing is printed when the input is bad");
    let err = stderr_of(&out);
    assert!(!err.contains("panicked"));
    for needle in [
        "imgbuild.yaml has 4 errors",
        "imgbuild.yaml:line 3, `chroma.version`: `latest` is not a pinned Chroma release",
        "imgbuild.yaml:line 5, `storage.mount_point`",
        "imgbuild.yaml:line 7, `efs.file_system_id`: `fs-nothex!` is not an EFS file system id",
        "imgbuild.yaml:line 9, `compose.versoin`: unknown field `versoin`",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
}

#[test]
fn each_kind_of_bad_input_exits_2_without_panicking() {
    let cases: &[(&str, &str)] = &[
        ("bogus: 1\n", "unknown field `bogus`"),
        ("chroma:\n  port: eighty\n", "`chroma.port`: invalid type"),
        ("chroma:\n  port: 70000\n", "`chroma.port`: invalid value: the number `70000`, expected a whole number from 0 to 65535"),
        ("chroma:\n  port: 0\n", "port 0 is not a port"),
        ("chroma:\n  version: 0.3.1\n", "Chroma 0.3.1 is not supported"),
        ("chroma:\n  version: 1.5\n", "`1.5` is not a pinned Chroma release"),
        ("chroma:\n  env:\n    AUTH_TOKEN: x\n", "looks like a secret"),
        ("efs:\n  file_system_id: fs-12\n", "is not an EFS file system id"),
        ("name: 1st\n", "must be a valid CloudFormation stack name"),
        ("region: Mars\n", "is not an AWS region code"),
        ("storage:\n  mode: tmpfs\n", "unknown variant `tmpfs`"),
        ("[1, 2]\n", "the top level must be a mapping"),
        ("chroma: [\n", "not valid YAML"),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (yaml, expected) in cases {
        std::fs::write(dir.path().join("c.yaml"), yaml).unwrap();
        let out = imgbuild(dir.path()).args(["--config", "c.yaml", "validate", "--no-tools"]).output().unwrap();
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(2), "{yaml:?}: {err}");
        assert!(err.contains(expected), "{yaml:?}: expected {expected:?} in {err}");
        assert!(err.contains("c.yaml"), "the error names the file: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn bad_flags_and_missing_files_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    imgbuild(dir.path()).args(["render-userdata", "--mode", "half"]).assert().code(2);
    imgbuild(dir.path()).args(["--region", "nowhere", "render-userdata"]).assert().code(2).stderr(predicate::str::contains("--region"));
    imgbuild(dir.path()).args(["--config", "missing.yaml", "validate"]).assert().code(2).stderr(predicate::str::contains("missing.yaml does not exist"));
    imgbuild(dir.path())
        .args(["--output", "json", "--config", "missing.yaml", "validate"])
        .assert()
        .code(2)
        .stdout(predicate::str::contains("\"exit_code\": 2"));
}

/// A user's `--template` is read before cfn-lint sees it: a launch template without
/// `LaunchTemplateData` is refused by name with exit 2 (it panicked in validate, deploy and fleet
/// deploy). A template with no launch template at all is still checked by validate (the corpus
/// cases are such); deploy refuses it.
#[test]
fn a_template_that_cannot_carry_the_user_data_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "AWSTemplateFormatVersion: '2010-09-09'\nResources:\n  Lt:\n    Type: AWS::EC2::LaunchTemplate\n    Properties:\n      LaunchTemplateName: x\n",
            "launch template `Lt` has no `Properties.LaunchTemplateData`",
        ),
        ("AWSTemplateFormatVersion: '2010-09-09'\nResources:\n  Lt:\n    Type: AWS::EC2::LaunchTemplate\n", "launch template `Lt` has no"),
    ];
    for (template, expected) in cases {
        std::fs::write(dir.path().join("t.yaml"), template).unwrap();
        let out = imgbuild(dir.path()).args(["validate", "--no-tools", "--template", "t.yaml"]).output().unwrap();
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(2), "{template}: {err}");
        assert!(err.contains(expected) && err.contains("t.yaml"), "{template}: expected {expected:?} naming t.yaml in {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn init_writes_a_starter_that_validates_and_never_clobbers() {
    let dir = tempfile::tempdir().unwrap();
    imgbuild(dir.path()).arg("init").assert().success();
    let written = std::fs::read_to_string(dir.path().join("imgbuild.yaml")).unwrap();
    assert!(written.contains("# imgbuild configuration"));
    imgbuild(dir.path()).args(["validate", "--no-tools"]).assert().success().stderr(predicate::str::contains("imgbuild.yaml is valid"));
    imgbuild(dir.path()).arg("init").assert().code(2).stderr(predicate::str::contains("already exists"));
    std::fs::write(dir.path().join("imgbuild.yaml"), "name: mine\n").unwrap();
    imgbuild(dir.path()).arg("init").assert().code(2);
    assert_eq!(std::fs::read_to_string(dir.path().join("imgbuild.yaml")).unwrap(), "name: mine\n", "the user's file is untouched");
    imgbuild(dir.path()).args(["init", "--force"]).assert().success();
}

#[test]
fn region_flag_wins_over_config_and_lands_in_the_user_data() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("imgbuild.yaml"), "region: eu-west-1\n").unwrap();
    let out = imgbuild(dir.path()).args(["--region", "ap-south-1", "render-userdata", "--no-tools", "--mode", "baked"]).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("region=\"ap-south-1\""));
    assert!(!text.contains("eu-west-1"));
}

#[test]
fn oversized_render_exits_2_and_suggests_gzip() {
    let dir = tempfile::tempdir().unwrap();
    let mut yaml = String::from("chroma:\n  env:\n");
    for i in 0..20 {
        yaml.push_str(&format!("    SETTING_{i}: '{}'\n", "y".repeat(500)));
    }
    std::fs::write(dir.path().join("imgbuild.yaml"), yaml).unwrap();
    imgbuild(dir.path()).args(["render-userdata", "--no-tools"]).assert().code(2).stdout("").stderr(predicate::str::contains("with --gzip it is"));
    imgbuild(dir.path()).args(["render-userdata", "--no-tools", "--gzip", "--out", "ud.gz"]).assert().success();
}

#[test]
fn validate_checks_all_four_variants() {
    let dir = tempfile::tempdir().unwrap();
    let out = imgbuild(dir.path()).args(["--output", "json", "validate", "--no-tools"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let variants: Vec<String> =
        doc["userdata"].as_array().unwrap().iter().map(|v| format!("{}/{}", v["mode"].as_str().unwrap(), v["format"].as_str().unwrap())).collect();
    assert_eq!(variants, ["full/cloud-config", "full/mime", "baked/cloud-config", "baked/mime"]);
}

#[test]
fn out_writes_into_fifos_and_symlinks_instead_of_replacing_them() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read(fifo).unwrap())
    };
    imgbuild(dir.path()).args(["render-userdata", "--no-tools", "--mode", "baked", "--out", "pipe"]).assert().success();
    let got = reader.join().unwrap();
    assert!(got.starts_with(b"#cloud-config\n"));
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo(), "still a FIFO");

    std::fs::write(dir.path().join("target.txt"), "old").unwrap();
    std::os::unix::fs::symlink("target.txt", dir.path().join("link")).unwrap();
    imgbuild(dir.path()).args(["render-userdata", "--no-tools", "--out", "link"]).assert().success();
    assert!(std::fs::symlink_metadata(dir.path().join("link")).unwrap().file_type().is_symlink(), "still a symlink");
    assert!(std::fs::read_to_string(dir.path().join("target.txt")).unwrap().starts_with("#cloud-config"));
}

#[test]
fn completions_and_man_page_come_from_the_cli_definition_even_with_a_broken_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("imgbuild.yaml"), "chroma: [\n").unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let out = imgbuild(dir.path()).args(["completions", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8(out.stdout).unwrap();
        for sub in ["render-userdata", "deploy", "bake", "doctor"] {
            assert!(text.contains(sub), "{shell} completion lacks {sub}");
        }
    }
    let man = imgbuild(dir.path()).arg("man").output().unwrap();
    let text = String::from_utf8(man.stdout).unwrap();
    assert!(text.contains(".TH imgbuild 1"), "{text}");
    assert!(text.contains("render\\-userdata") || text.contains("render-userdata"), "{text}");
    imgbuild(dir.path()).args(["completions", "tcsh"]).assert().code(2);
}

/// `restore --ami` of a stock AL2023 image needs full mode (deploy refuses a stock image in
/// baked mode and says "deploy with --mode full"), so restore takes `--mode` as deploy does;
/// without `--ami` it means nothing and is refused. It used to be no flag at all.
#[test]
fn restore_takes_the_mode_for_its_ami() {
    use clap::Parser;
    let parsed = imgbuild::cli::Cli::try_parse_from([
        "imgbuild",
        "restore",
        "arn:aws:backup:us-east-1:123456789012:recovery-point:1EB3B5E7-9EB0-435A-A80B-108B488B0D45",
        "--ami",
        "ami-0abcdef1234567890",
        "--mode",
        "full",
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    match parsed.command {
        imgbuild::cli::Command::Restore(a) => assert_eq!(a.mode, Some(imgbuild::render::Mode::Full)),
        other => panic!("{other:?}"),
    }
    let dir = tempfile::tempdir().unwrap();
    let out = imgbuild(dir.path()).args(["restore", "arn:aws:backup:us-east-1:123456789012:recovery-point:x", "--mode", "full"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("--ami"), "{}", stderr_of(&out));
}
