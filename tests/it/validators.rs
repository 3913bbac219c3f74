//! The real validators on the real output: cloud-init's schema, shellcheck, docker-compose,
//! and Python's MIME parser (what cloud-init itself uses). Each also gets a broken input, to
//! show the integration notices failures rather than passing everything.

use std::process::Command;

use imgbuild::check::userdata::{self as validate, Status, Tools};
use imgbuild::chroma;
use imgbuild::config::Config;
use imgbuild::render::{Format, Mode};

use crate::support::*;

fn profile_of(config: &Config) -> &'static chroma::Profile {
    chroma::profile(&chroma::parse_version(&config.chroma.version).unwrap()).unwrap()
}

#[test]
fn cloud_init_schema_and_shellcheck_pass_on_every_variant() {
    if tool("cloud-init").is_none() | tool("shellcheck").is_none() {
        return;
    }
    for (name, config, region) in configs() {
        for mode in MODES {
            for format in FORMATS {
                let r = render_with(&config, region, mode, format, false);
                let report = validate::validate(&r, &config, profile_of(&config), Tools::Required);
                for c in &report.checks {
                    assert_ne!(c.status, Status::Fail, "{name} {mode:?} {format:?}: {}: {}", c.name, c.detail);
                }
                let ran: Vec<_> = report.checks.iter().filter(|c| c.name.starts_with("shellcheck ") || c.name == "cloud-init schema").collect();
                // The cloud-init scripts, chroma-start.sh (the unit's ExecStart) and the cloud-config.
                let expected_scripts = if mode == Mode::Full { 2 } else { 1 };
                assert_eq!(ran.len(), expected_scripts + 2, "{name}: every script and the cloud-config were checked");
                assert!(ran.iter().all(|c| c.status == Status::Pass));
            }
        }
    }
}

#[test]
fn cloud_init_schema_rejects_a_broken_document() {
    if tool("cloud-init").is_none() {
        return;
    }
    let config = Config::default();
    let mut r = render_with(&config, None, Mode::Baked, Format::CloudConfig, false);
    // Structurally fine for the built-in check, but `encoding` has a fixed set of values.
    r.cloud_config = r.cloud_config.replacen("  owner: root:root\n", "  owner: root:root\n  encoding: rot13\n", 1);
    let report = validate::validate(&r, &config, profile_of(&config), Tools::Required);
    let schema = report.checks.iter().find(|c| c.name == "cloud-init schema").unwrap();
    assert_eq!(schema.status, Status::Fail, "{}", schema.detail);
    assert!(schema.detail.contains("encoding"), "{}", schema.detail);
}

#[test]
fn shellcheck_findings_fail_the_render() {
    if tool("shellcheck").is_none() {
        return;
    }
    let config = Config::default();
    let mut r = render_with(&config, None, Mode::Baked, Format::CloudConfig, false);
    r.scripts[0].text.push_str("rm -rf $UNQUOTED/*\n");
    let report = validate::validate(&r, &config, profile_of(&config), Tools::Required);
    let sc = report.checks.iter().find(|c| c.name == "shellcheck 20-boot.sh").unwrap();
    assert_eq!(sc.status, Status::Fail);
    assert!(sc.detail.contains("SC2086"), "{}", sc.detail);
}

#[test]
fn docker_compose_accepts_every_compose_file() {
    let Some(exe) = tool("docker-compose") else { return };
    let dir = tempfile::tempdir().unwrap();
    for (name, config, region) in configs() {
        for mode in MODES {
            let r = render_with(&config, region, mode, Format::CloudConfig, false);
            let path = dir.path().join(format!("{name}-{}.yaml", mode.as_str()));
            // docker-compose 1.29's schema predates `bind.create_host_path`, which compose v2 (the
            // version installed) reads (Docker docs, Compose file reference "services": volumes,
            // long syntax, `bind: create_host_path`); the crate model above checks that key.
            let yaml = r.compose_yaml.replace("      bind:\n        create_host_path: false\n", "");
            std::fs::write(&path, yaml).unwrap();
            let out = Command::new(&exe)
                .arg("-f")
                .arg(&path)
                .args(["config", "-q"])
                .env("EFS_DNS_NAME", "fs-0123456789abcdef0.efs.us-east-1.amazonaws.com")
                .output()
                .unwrap();
            assert!(out.status.success(), "{name} {mode:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    // And it does reject what compose cannot run.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "services:\n  chroma:\n    image: x\n    pull_policy: sometimes\n").unwrap();
    let out = Command::new(&exe).arg("-f").arg(&bad).args(["config", "-q"]).output().unwrap();
    assert!(!out.status.success());
}

#[test]
fn mime_parts_parse_as_cloud_init_reads_them() {
    let Some(python) = tool("python3") else { return };
    let config = Config::default();
    let r = render_with(&config, None, Mode::Full, Format::Mime, false);
    let script = r#"
import email, sys
msg = email.message_from_bytes(sys.stdin.buffer.read())
assert msg.is_multipart(), "not multipart"
for part in msg.get_payload():
    print(part.get_content_type(), part.get_filename(), len(part.get_payload(decode=True)))
"#;
    let mut child = Command::new(python).args(["-c", script]).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).spawn().unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&r.raw).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let lines: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(|l| l.rsplit_once(' ').unwrap().0.to_string()).collect();
    assert_eq!(lines, ["text/cloud-config cloud-config.yaml", "text/x-shellscript 10-install.sh", "text/x-shellscript 20-boot.sh"]);
}
