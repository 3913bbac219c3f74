//! The README's examples, run as written: every `imgbuild ...` line in its code blocks is either
//! walked here (offline, or against moto where moto can answer it) or listed with the reason it
//! needs real AWS, so a new example cannot go unchecked. The error example is compared byte for
//! byte with what imgbuild prints.

use std::path::Path;

use crate::services;
use crate::support::imgbuild;

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap()
}

/// The lines of the README's fenced code blocks.
fn code_lines(text: &str) -> Vec<String> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with("```") {
            inside = !inside;
        } else if inside {
            out.push(line.to_string());
        }
    }
    out
}

/// Every `imgbuild ...` command in the README's code blocks, without its trailing comment.
fn examples() -> Vec<String> {
    code_lines(&readme()).iter().filter(|l| l.starts_with("imgbuild ")).map(|l| l.split(" #").next().unwrap().trim().to_string()).collect()
}

/// Examples that need real AWS, and why moto cannot stand in (REFERENCE: what moto 5.2.5 does).
const NEEDS_AWS: &[(&str, &str)] = &[
    ("imgbuild bake", "SSM Automation executions are not implemented in moto"),
    ("imgbuild bake --force", "SSM Automation executions are not implemented in moto"),
    ("imgbuild bake --update-base", "SSM Automation executions are not implemented in moto"),
    ("imgbuild bake --regions eu-west-1,us-west-2", "SSM Automation executions are not implemented in moto"),
    ("imgbuild deploy", "moto cannot execute the real template (it makes the NLB an application LB)"),
    ("imgbuild deploy --yes", "moto cannot execute the real template (it makes the NLB an application LB)"),
    ("imgbuild deploy --ami ami-0123456789abcdef0 --mode baked", "the example's image exists only in an account that baked it"),
    ("imgbuild smoke", "API Gateway test-invoke is not implemented in moto"),
    ("imgbuild bake --regions us-west-2,eu-west-1", "SSM Automation executions are not implemented in moto"),
    ("imgbuild destroy", "asks on a terminal first; tests/it/contracts.rs walks its prompt"),
    (
        "imgbuild fleet deploy --max-concurrent 20 --failure-tolerance 5%",
        "needs a `fleet:` section and a baked image in each region; tests/it/fleet.rs runs the fleet against moto",
    ),
    ("imgbuild fleet status --drift", "needs a deployed StackSet; moto fails DetectStackSetDrift"),
    ("imgbuild deploy --disable-rollback", "moto cannot execute the real template; tests/it/protection.rs scripts DisableRollback"),
    ("imgbuild deploy --no-rollback-triggers", "moto cannot execute the real template; tests/it/alarms.rs scripts the triggers"),
    ("imgbuild continue-rollback", "needs a stack in UPDATE_ROLLBACK_FAILED, which moto never reaches; tests/it/protection.rs scripts it"),
    (
        "imgbuild continue-rollback --skip AutoScalingGroup",
        "needs a stack in UPDATE_ROLLBACK_FAILED, which moto never reaches; tests/it/protection.rs scripts it",
    ),
    (
        "imgbuild logs --follow --for 10m",
        "moto runs no SSM Run Command script; tests/it/logs.rs scripts the polls and runs the poll's shell under a stand-in docker",
    ),
    (
        "imgbuild --output json logs -f | jq -r .line",
        "moto runs no SSM Run Command script; tests/it/logs.rs scripts the polls (NDJSON) and runs the poll's shell under a stand-in docker",
    ),
    (
        "imgbuild logs --out bug-report",
        "moto runs no SSM Run Command script and has no Automation executions; tests/it/logs.rs scripts them and boot.rs runs the script",
    ),
    ("imgbuild fleet destroy", "needs a deployed StackSet and a `fleet:` section; tests/it/fleet.rs covers it against moto"),
    ("imgbuild fleet deploy --no-execute", "needs a `fleet:` section and a baked image in each region; tests/it/fleet_mocks.rs scripts --no-execute"),
    (
        "imgbuild fleet destroy --accounts 333333333333 --keep-grants",
        "needs a deployed StackSet with that account; tests/it/fleet_mocks.rs scripts the revocation and --keep-grants, fleet.rs the revocation against moto",
    ),
];

#[test]
fn every_readme_example_is_walked_or_says_why_not() {
    let walked = walked_examples();
    for e in examples() {
        let known = walked.contains(&e.as_str()) || NEEDS_AWS.iter().any(|(c, _)| *c == e);
        assert!(known, "README example `{e}` is neither walked in tests/it/readme.rs nor listed in NEEDS_AWS with a reason");
    }
}

fn walked_examples() -> Vec<&'static str> {
    vec![
        "imgbuild init",
        "imgbuild validate",
        "imgbuild render-userdata",
        "imgbuild render-userdata --mode baked --format mime",
        "imgbuild render-userdata --gzip --base64 --out ud.b64",
        "imgbuild --output json render-userdata | jq .sha256",
        "imgbuild doctor",
        "imgbuild bake --dry-run",
        "imgbuild deploy --no-execute",
        "imgbuild status",
        "imgbuild gc --dry-run",
    ]
}

/// Runs `example` (as written, a `| jq .KEY` tail read here) in `dir`, optionally against moto.
fn run(example: &str, dir: &Path, endpoint: Option<&str>) -> std::process::Output {
    let (cmd, jq) = match example.split_once(" | jq .") {
        Some((c, key)) => (c, Some(key)),
        None => (example, None),
    };
    let args: Vec<&str> = cmd.split_whitespace().skip(1).collect();
    let mut c = imgbuild(dir);
    if let Some(url) = endpoint {
        c.args(["--endpoint-url", url]);
    }
    let out = c.args(&args).output().unwrap();
    assert!(out.status.success(), "README example `{example}` failed (exit {:?}):\n{}", out.status.code(), String::from_utf8_lossy(&out.stderr));
    if let Some(key) = jq {
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(doc[key].is_string(), "`{example}`: no {key} in {doc}");
    }
    out
}

#[test]
fn the_offline_readme_examples_do_what_the_readme_says() {
    let dir = tempfile::tempdir().unwrap();
    run("imgbuild init", dir.path(), None);
    assert!(dir.path().join("imgbuild.yaml").is_file(), "init writes imgbuild.yaml");
    run("imgbuild validate", dir.path(), None);
    let out = run("imgbuild render-userdata", dir.path(), None);
    assert!(out.stdout.starts_with(b"#cloud-config\n"), "full mode, #cloud-config, to stdout");
    let out = run("imgbuild render-userdata --mode baked --format mime", dir.path(), None);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Content-Type: multipart/mixed"), "multipart");
    run("imgbuild render-userdata --gzip --base64 --out ud.b64", dir.path(), None);
    use base64::Engine;
    let b64 = std::fs::read_to_string(dir.path().join("ud.b64")).unwrap();
    let gz = base64::engine::general_purpose::STANDARD.decode(b64.trim()).unwrap();
    assert_eq!(&gz[..2], &[0x1f, 0x8b], "gzip, then base64: what the EC2 API takes");
    run("imgbuild --output json render-userdata | jq .sha256", dir.path(), None);
}

#[test]
fn the_readme_examples_moto_can_answer_do_what_the_readme_says() {
    let Some(moto) = services::moto() else { return };
    let dir = tempfile::tempdir().unwrap();
    // A project of its own, so parallel tests share no stack.
    std::fs::write(dir.path().join("imgbuild.yaml"), "name: readme-walk\nregion: us-east-1\naws:\n  poll_interval_secs: 1\n").unwrap();
    run("imgbuild doctor", dir.path(), Some(&moto.url));
    let out = run("imgbuild bake --dry-run", dir.path(), Some(&moto.url));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--dry-run: would bake"), "base image, digest, cached or not");
    let out = run("imgbuild deploy --no-execute", dir.path(), Some(&moto.url));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is left for review"), "the change set is left for review");
    let out = run("imgbuild status", dir.path(), Some(&moto.url));
    assert!(String::from_utf8_lossy(&out.stderr).contains("REVIEW_IN_PROGRESS"), "{}", String::from_utf8_lossy(&out.stderr));
    // The review stack deploy --no-execute just left is what gc lists, and --dry-run keeps it.
    let out = run("imgbuild gc --dry-run", dir.path(), Some(&moto.url));
    assert!(String::from_utf8_lossy(&out.stderr).contains("would remove empty stack readme-walk"), "{}", String::from_utf8_lossy(&out.stderr));
    // Leave moto as found: the change set and the review stack deploy --no-execute left.
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
        let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(&moto.url)
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_cloudformation::config::Credentials::new("testing", "testing", None, None, "tests"))
            .load()
            .await;
        let cfn = aws_sdk_cloudformation::Client::new(&conf);
        let _ = cfn.delete_stack().stack_name("readme-walk").send().await;
    });
}

/// The configuration error the README shows is what imgbuild prints for that file.
#[test]
fn the_readme_error_example_is_what_imgbuild_prints() {
    let lines = code_lines(&readme());
    let start = lines.iter().position(|l| l.starts_with("error: imgbuild.yaml has 2 errors:")).expect("the README's error example");
    let shown = lines[start..start + 3].join("\n");
    let dir = tempfile::tempdir().unwrap();
    // Line 3 `chroma.version`, line 7 `efs.file_system_id`, as the example says.
    std::fs::write(
        dir.path().join("imgbuild.yaml"),
        "name: vectordb\nchroma:\n  version: latest\nstorage:\n  mode: efs-tls\nefs:\n  file_system_id: fs-nothex!\n",
    )
    .unwrap();
    let out = imgbuild(dir.path()).args(["validate", "--no-tools"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim_end(), shown);
}
