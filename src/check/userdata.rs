//! Checks on rendered user-data: built-in structural checks always, and the real validators
//! (`cloud-init schema`, `shellcheck`) when they are installed.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde::Serialize;

use crate::chroma::Profile;
use crate::config::Config;
use crate::render::compose::{self, VolumeKind};
use crate::render::{self, Mode, Rendered, USERDATA_LIMIT};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Skip,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.status != Status::Fail)
    }

    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.status == Status::Fail)
    }

    fn push(&mut self, name: impl Into<String>, status: Status, detail: impl Into<String>) {
        self.checks.push(Check { name: name.into(), status, detail: detail.into() });
    }

    fn result(&mut self, name: impl Into<String>, r: Result<String, String>) {
        match r {
            Ok(d) => self.push(name, Status::Pass, d),
            Err(d) => self.push(name, Status::Fail, d),
        }
    }
}

/// Whether the external validators run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tools {
    /// Run them when installed; a missing tool is a skipped check.
    IfInstalled,
    /// A missing tool is a failed check (CI).
    Required,
    /// Built-in checks only (benchmarks, quick renders).
    Off,
}

pub fn validate(rendered: &Rendered, config: &Config, profile: &Profile, tools: Tools) -> Report {
    let mut report = Report::default();
    report.result("cloud-config structure", cloud_config_structure(&rendered.cloud_config));
    external(&mut report, tools, "cloud-init schema", "cloud-init", |exe| cloud_init_schema(exe, &rendered.cloud_config));
    for script in &rendered.scripts {
        let name = format!("shellcheck {}", script.name);
        external(&mut report, tools, &name, "shellcheck", |exe| shellcheck(exe, &script.text));
    }
    external(&mut report, tools, "shellcheck chroma-start.sh", "shellcheck", |exe| shellcheck(exe, &rendered.start));
    report.result("network calls bounded", network_calls_bounded(rendered));
    report.result("compose document", compose_document(rendered));
    report.result("version cross-check", version_cross_check(rendered, config, profile));
    size(&mut report, rendered);
    if rendered.mode == Mode::Baked {
        report.result("baked boot downloads nothing", downloads_nothing(rendered));
    }
    report.result("no secrets", no_secrets(&rendered.raw));
    report
}

/// shellcheck on one script outside a rendered user-data (the bake script).
pub fn validate_script(name: &str, text: &str, tools: Tools) -> Report {
    let mut report = Report::default();
    external(&mut report, tools, &format!("shellcheck {name}"), "shellcheck", |exe| shellcheck(exe, text));
    report
}

fn external(report: &mut Report, tools: Tools, name: &str, program: &str, run: impl FnOnce(PathBuf) -> Result<String, String>) {
    if tools == Tools::Off {
        return;
    }
    match which(program) {
        Some(exe) => report.result(name, run(exe)),
        None if tools == Tools::Required => {
            report.push(name, Status::Fail, format!("{program} is not installed (required; install it or drop --require-tools)"))
        }
        None => report.push(name, Status::Skip, format!("{program} is not installed; built-in checks only")),
    }
}

/// Looks a program up on PATH without running a shell.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file())
}

const KNOWN_MODULES: &[&str] = &["write_files", "runcmd"];

fn cloud_config_structure(doc: &str) -> Result<String, String> {
    if !doc.starts_with("#cloud-config\n") {
        return Err("does not start with the #cloud-config header line".into());
    }
    let value: serde_yaml::Value = serde_yaml::from_str(doc).map_err(|e| format!("not valid YAML: {e}"))?;
    let map = value.as_mapping().ok_or("the document is not a mapping")?;
    for key in map.keys() {
        let k = key.as_str().unwrap_or_default();
        if !KNOWN_MODULES.contains(&k) {
            return Err(format!("unexpected top-level key `{k}`"));
        }
    }
    let files = map.get("write_files").and_then(|v| v.as_sequence()).ok_or("write_files is missing or not a list")?;
    for (i, f) in files.iter().enumerate() {
        let path = f.get("path").and_then(|p| p.as_str()).ok_or(format!("write_files[{i}] has no path"))?;
        if !path.starts_with('/') {
            return Err(format!("write_files[{i}].path `{path}` is not absolute"));
        }
        f.get("content").and_then(|c| c.as_str()).ok_or(format!("write_files[{i}] ({path}) has no content"))?;
        let perms = f.get("permissions").and_then(|p| p.as_str()).unwrap_or("0644");
        if !(perms.len() == 4 && perms.starts_with('0') && perms.bytes().all(|b| (b'0'..=b'7').contains(&b))) {
            return Err(format!("write_files[{i}] ({path}) permissions `{perms}` are not octal like 0644"));
        }
    }
    if let Some(cmds) = map.get("runcmd") {
        let cmds = cmds.as_sequence().ok_or("runcmd is not a list")?;
        for (i, c) in cmds.iter().enumerate() {
            let ok = c.as_sequence().is_some_and(|argv| !argv.is_empty() && argv.iter().all(|a| a.is_string()));
            if !ok {
                return Err(format!("runcmd[{i}] is not a non-empty list of strings"));
            }
        }
    }
    Ok(format!("{} files written, modules: {}", files.len(), map.keys().filter_map(|k| k.as_str()).collect::<Vec<_>>().join(", ")))
}

fn run_with_stdin(mut cmd: Command, stdin: &[u8]) -> Result<std::process::Output, String> {
    let mut child =
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(|e| format!("could not run {:?}: {e}", cmd.get_program()))?;
    child.stdin.take().expect("stdin is piped").write_all(stdin).map_err(|e| e.to_string())?;
    child.wait_with_output().map_err(|e| e.to_string())
}

fn cloud_init_schema(exe: PathBuf, doc: &str) -> Result<String, String> {
    // cloud-init schema reads a file, not stdin.
    let mut file = tempfile::Builder::new().prefix("imgbuild-").suffix(".yaml").tempfile().map_err(|e| e.to_string())?;
    file.write_all(doc.as_bytes()).map_err(|e| e.to_string())?;
    let out = Command::new(&exe).args(["schema", "-c"]).arg(file.path()).output().map_err(|e| format!("could not run {}: {e}", exe.display()))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let text = text.replace(&file.path().display().to_string(), "<user-data>");
    if out.status.success() { Ok(text.lines().find(|l| !l.trim().is_empty()).unwrap_or("valid").trim().to_string()) } else { Err(text.trim().to_string()) }
}

fn shellcheck(exe: PathBuf, script: &str) -> Result<String, String> {
    let mut cmd = Command::new(&exe);
    cmd.args(["--shell=bash", "--format=gcc", "-"]);
    let out = run_with_stdin(cmd, script.as_bytes())?;
    if out.status.success() {
        Ok("no findings".into())
    } else {
        Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)).trim().to_string())
    }
}

fn compose_document(r: &Rendered) -> Result<String, String> {
    // An independent model of the Compose Specification that rejects unknown keys.
    serde_yaml::from_str::<docker_compose_types::Compose>(&r.compose_yaml).map_err(|e| format!("the Compose Specification model rejects it: {e}"))?;
    let svc = r.compose.service().ok_or("no chroma service")?;
    if svc.image.is_empty() {
        return Err("the chroma service has no image".into());
    }
    if svc.ports.is_empty() {
        return Err("the chroma service publishes no port".into());
    }
    for v in &svc.volumes {
        match v.kind {
            VolumeKind::Volume if !r.compose.volumes.contains_key(&v.source) => {
                return Err(format!("service volume `{}` is not declared under volumes:", v.source));
            }
            VolumeKind::Bind if !v.source.starts_with('/') => {
                return Err(format!("bind source `{}` is not an absolute path", v.source));
            }
            _ => {}
        }
    }
    Ok(format!("image {}, ports {}", svc.image, svc.ports.join(", ")))
}

fn version_cross_check(r: &Rendered, config: &Config, profile: &Profile) -> Result<String, String> {
    let svc = r.compose.service().ok_or("no chroma service")?;
    let probe = svc.healthcheck.test.join(" ");
    if !probe.contains(&format!("GET {} ", profile.heartbeat_path)) {
        return Err(format!("the health check does not probe {} (Chroma {})", profile.heartbeat_path, config.chroma.version));
    }
    if !profile.heartbeat_path.starts_with(profile.api_prefix) {
        return Err(format!("heartbeat {} is outside the API prefix {}", profile.heartbeat_path, profile.api_prefix));
    }
    if !svc.volumes.iter().any(|v| v.target == profile.data_dir) {
        return Err(format!("no volume is mounted on Chroma {}'s data directory {}", config.chroma.version, profile.data_dir));
    }
    let boot = r.scripts.iter().find(|s| s.name == "20-boot.sh").ok_or("no boot script")?;
    if !boot.text.contains(profile.heartbeat_path) {
        return Err(format!("the boot script does not wait on {}", profile.heartbeat_path));
    }
    Ok(format!("Chroma {}: API {}, heartbeat {}, data {}", config.chroma.version, profile.api_prefix, profile.heartbeat_path, profile.data_dir))
}

fn size(report: &mut Report, r: &Rendered) {
    let raw = r.raw.len();
    let sent = r.output.len();
    let limit = USERDATA_LIMIT;
    if sent <= limit {
        let how = if r.gzip { format!("{sent} bytes gzipped ({raw} raw)") } else { format!("{raw} bytes") };
        report.push("size", Status::Pass, format!("{how} of {limit}, margin {}", limit - sent));
        return;
    }
    let gz = if r.gzip { sent } else { render::gzip(&r.raw).len() };
    let detail = if !r.gzip && gz <= limit {
        format!("{raw} bytes is over the {limit}-byte EC2 limit by {}; with --gzip it is {gz} bytes", raw - limit)
    } else {
        format!("{raw} bytes ({gz} gzipped) is over the {limit}-byte EC2 limit even compressed")
    };
    report.push("size", Status::Fail, detail);
}

/// Baked images carry everything; a boot that reaches out would be slow and could fail.
fn downloads_nothing(r: &Rendered) -> Result<String, String> {
    let svc = r.compose.service().ok_or("no chroma service")?;
    if svc.pull_policy != Some(compose::PullPolicy::Never) {
        return Err("the compose service may pull its image at boot (pull_policy is not never)".into());
    }
    for s in &r.scripts {
        for (n, code) in logical_lines(&s.text) {
            let fetches = ["dnf ", "yum ", "docker pull", "wget ", "pip ", "https://"].iter().find(|w| code.contains(*w));
            if let Some(w) = fetches {
                return Err(format!("{} line {n}: `{}` downloads at boot", s.name, w.trim()));
            }
            if code.contains("curl ") && !code.contains("\"${imds_endpoint}/") && !code.contains("\"${chroma_endpoint}") {
                return Err(format!("{} line {n}: curl to an address that is neither instance metadata nor this host", s.name));
            }
        }
    }
    let boot = r.scripts.iter().find(|s| s.name == "20-boot.sh").ok_or("no boot script")?;
    for (var, default) in [("imds_endpoint", "http://169.254.169.254}\""), ("chroma_endpoint", "http://127.0.0.1:")] {
        if !boot.text.lines().any(|l| l.starts_with(&format!("readonly {var}=")) && l.contains(&format!(":-{default}"))) {
            return Err(format!("20-boot.sh: {var} does not default to {}", default.trim_end_matches(['}', '"'])));
        }
    }
    Ok("no package install, image pull or download in the boot path".into())
}

/// A stalled call must not hang the boot: cloud-final has no timeout of its own.
fn network_calls_bounded(r: &Rendered) -> Result<String, String> {
    let boot = r.scripts.iter().filter(|s| s.name != "10-install.sh");
    let texts = boot.map(|s| (s.name, s.text.as_str())).chain([("chroma-start.sh", r.start.as_str())]);
    let mut n = 0;
    for (name, text) in texts {
        for (line, code) in logical_lines(text) {
            for command in commands(&code) {
                let unbounded = match command.split_whitespace().next() {
                    Some("curl") => !command.contains(" --max-time "),
                    Some("aws" | "mount") => true,
                    _ => continue,
                };
                if unbounded {
                    return Err(format!("{name} line {line}: a network call without a time limit: `{}`", code.trim()));
                }
                n += 1;
            }
        }
    }
    Ok(format!("{n} network calls, each with a time limit"))
}

/// The simple commands of a shell line, roughly: split at `;`, `&&`, `||`, `|`, `(` and `$(`,
/// with leading keywords dropped. `timeout 60 aws ...` is a `timeout` command, so it counts as
/// bounded.
fn commands(code: &str) -> Vec<&str> {
    code.split([';', '|', '&', '(', '`'])
        .map(|c| {
            let mut c = c.trim_start();
            while let Some(rest) = ["then ", "do ", "if ", "! ", "until ", "while ", "else ", "$"].iter().find_map(|k| c.strip_prefix(k)) {
                c = rest.trim_start();
            }
            c
        })
        .filter(|c| !c.is_empty())
        .collect()
}

/// Shell lines with `\` continuations joined and comments dropped, numbered by their first line.
fn logical_lines(script: &str) -> Vec<(usize, String)> {
    let mut out: Vec<(usize, String)> = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (i, line) in script.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('#') && pending.is_none() {
            continue;
        }
        let (start, mut acc) = pending.take().unwrap_or((i + 1, String::new()));
        match line.strip_suffix('\\') {
            Some(head) => {
                acc.push_str(head);
                pending = Some((start, acc));
            }
            None => {
                acc.push_str(line);
                out.push((start, acc));
            }
        }
    }
    out.extend(pending);
    out
}

/// Shapes of credentials that must never be in user-data (anyone allowed
/// ec2:DescribeInstanceAttribute can read it).
fn no_secrets(raw: &[u8]) -> Result<String, String> {
    let text = String::from_utf8_lossy(raw);
    let patterns = ["-----BEGIN", "aws_secret_access_key", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"];
    if let Some(p) = patterns.iter().find(|p| text.contains(*p)) {
        return Err(format!("contains `{p}`"));
    }
    // Access key ids: AKIA or ASIA followed by 16 upper-case letters and digits.
    let bytes = text.as_bytes();
    for i in 0..bytes.len().saturating_sub(19) {
        let w = &bytes[i..i + 20];
        if (w.starts_with(b"AKIA") || w.starts_with(b"ASIA")) && w[4..].iter().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()) {
            return Err("contains what looks like an AWS access key id".into());
        }
    }
    Ok("no credentials or private keys".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_scan_finds_key_ids_and_private_keys() {
        assert!(no_secrets(b"x AKIAABCDEFGHIJKLMNOP y").is_err());
        assert!(no_secrets(b"-----BEGIN RSA PRIVATE KEY-----").is_err());
        assert!(no_secrets(b"AKIA lower-case-not-a-key").is_ok());
        assert!(no_secrets(b"plain text").is_ok());
    }

    #[test]
    fn structure_rejects_missing_header_and_unknown_modules() {
        assert!(cloud_config_structure("write_files: []\n").is_err());
        assert!(cloud_config_structure("#cloud-config\nwrite_files: []\nbogus: 1\n").is_err());
        assert!(cloud_config_structure("#cloud-config\nwrite_files:\n- path: rel\n  content: x\n").is_err());
        assert!(cloud_config_structure("#cloud-config\nwrite_files:\n- path: /a\n  content: x\nruncmd:\n- []\n").is_err());
        assert!(cloud_config_structure("#cloud-config\nwrite_files:\n- path: /a\n  content: x\nruncmd:\n- [bash, /a]\n").is_ok());
    }
}
