//! `imgbuild bake` end to end against an SSM Automation simulator (`tests/sim/ssm_automation.py`)
//! in front of moto: the registered document is played step by step, and its RunInstances,
//! StopInstances, CreateImage and TerminateInstances really happen in moto. Success, a failure at
//! each step, Ctrl-C at each step and a `--force` rebake; after each, no build instance is left
//! running and no image or snapshot is left that the user did not get.
//!
//! What the simulator answers follows the service's documented shapes (the placeholder output of
//! a step that has not succeeded, aws-cli `examples/ssm/get-automation-execution.rst`; onCancel's
//! two-minute cap, Automation actions reference "Properties shared by all actions"); see the
//! simulator's docstring.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use aws_sdk_ec2::types::Filter;
use serde_json::{Value, json};

use crate::services;

const SIM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sim/ssm_automation.py");

struct Sim {
    url: String,
    moto: String,
    _child: Child,
    _stdin: ChildStdin,
}

/// A simulator of our own (its test controls are per process) in front of the shared moto.
fn sim() -> Option<Sim> {
    let moto = services::moto()?;
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log = std::env::temp_dir().join(format!("imgbuild-test-ssm-sim-{port}.log"));
    // Killed when this test process goes away (its stdin closes), as services.rs does.
    let script = format!("\"$0\" \"$@\" >'{}' 2>&1 & pid=$!; cat >/dev/null; kill $pid 2>/dev/null; wait $pid 2>/dev/null", log.display());
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(&python)
        .args([SIM, &port.to_string(), &moto.url, "0.01"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("starting the simulator");
    let stdin = child.stdin.take().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "the simulator did not listen: {}", std::fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(Sim { url: format!("http://{addr}"), moto: moto.url.clone(), _child: child, _stdin: stdin })
}

impl Sim {
    fn post(&self, path: &str, body: Value) -> Value {
        ureq::post(format!("{}{path}", self.url)).send_json(body).unwrap().body_mut().read_json().unwrap()
    }

    fn control(&self, body: Value) {
        self.post("/sim/control", body);
    }

    fn state(&self) -> Value {
        ureq::get(format!("{}/sim/state", self.url)).call().unwrap().body_mut().read_json().unwrap()
    }

    /// A project directory whose config names the simulator's prerequisites.
    fn project(&self, name: &str, extra: &str) -> tempfile::TempDir {
        let pre = self.post("/sim/setup", json!({ "project": name }));
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "name: {name}\nregion: us-east-1\naws:\n  poll_interval_secs: 1\nbake:\n  subnet_id: {}\n  security_group_id: {}\n  instance_profile: {}\n  automation_role_arn: {}\n{extra}",
            pre["subnet_id"].as_str().unwrap(),
            pre["security_group_id"].as_str().unwrap(),
            pre["instance_profile"].as_str().unwrap(),
            pre["automation_role_arn"].as_str().unwrap(),
        );
        std::fs::write(dir.path().join("imgbuild.yaml"), config).unwrap();
        dir
    }

    fn bake(&self, dir: &Path, extra: &[&str]) -> Child {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_imgbuild"));
        crate::support::hermetic(&mut cmd)
            .current_dir(dir)
            .args(["--endpoint-url", &self.url, "--output", "json", "bake", "--no-tools"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.spawn().unwrap()
    }
}

struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

fn wait(child: Child) -> Outcome {
    let out = child.wait_with_output().unwrap();
    Outcome { code: out.status.code().unwrap_or(-1), stdout: String::from_utf8_lossy(&out.stdout).into(), stderr: String::from_utf8_lossy(&out.stderr).into() }
}

/// What exists in moto for a project: live build instances, images, snapshots (with the image
/// each belongs to, if any).
struct Left {
    live: Vec<String>,
    images: Vec<String>,
    stray_snapshots: Vec<String>,
}

fn left(moto: &str, project: &str) -> Left {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let conf = aws_config::defaults(BehaviorVersion::latest())
            .endpoint_url(moto)
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_ec2::config::Credentials::new("testing", "testing", None, None, "tests"))
            .load()
            .await;
        let ec2 = aws_sdk_ec2::Client::new(&conf);
        let tag = || Filter::builder().name("tag:imgbuild:project").values(project).build();
        let instances = ec2.describe_instances().filters(tag()).send().await.unwrap();
        let live = instances
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter(|i| !matches!(i.state().and_then(|s| s.name()).map(|n| n.as_str()), Some("terminated")))
            .filter_map(|i| i.instance_id().map(String::from))
            .collect();
        let images = ec2.describe_images().owners("self").filters(tag()).send().await.unwrap();
        let kept: Vec<String> =
            images.images().iter().flat_map(|i| i.block_device_mappings()).filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()).map(String::from)).collect();
        let snaps = ec2.describe_snapshots().owner_ids("self").filters(tag()).send().await.unwrap();
        Left {
            live,
            images: images.images().iter().filter_map(|i| i.image_id().map(String::from)).collect(),
            stray_snapshots: snaps.snapshots().iter().filter_map(|s| s.snapshot_id().map(String::from)).filter(|s| !kept.contains(s)).collect(),
        }
    })
}

/// The steps of the success path, in order (following nextStep until isEnd).
fn main_path_steps() -> Vec<String> {
    let doc: serde_yaml::Value = serde_yaml::from_str(imgbuild::bake::DOCUMENT_TEMPLATE).unwrap();
    let steps = doc["mainSteps"].as_sequence().unwrap();
    let mut path = Vec::new();
    let mut at = &steps[0];
    loop {
        path.push(at["name"].as_str().unwrap().to_string());
        if at["isEnd"].as_bool() == Some(true) {
            return path;
        }
        at = steps.iter().find(|s| s["name"] == at["nextStep"]).unwrap();
    }
}

#[test]
fn sim_success_then_a_forced_rebake_leave_exactly_the_images_handed_over() {
    let Some(sim) = sim() else { return };
    let dir = sim.project("simok", "");

    let first = wait(sim.bake(dir.path(), &[]));
    assert_eq!(first.code, 0, "{}", first.stderr);
    let out: Value = serde_json::from_str(&first.stdout).unwrap();
    let ami = out["ami"].as_str().unwrap().to_string();
    let l = left(&sim.moto, "simok");
    assert_eq!(l.live, Vec::<String>::new(), "the build instance is terminated");
    assert_eq!(l.images, std::slice::from_ref(&ami));
    assert_eq!(l.stray_snapshots, Vec::<String>::new());

    let again = wait(sim.bake(dir.path(), &["--force"]));
    assert_eq!(again.code, 0, "{}", again.stderr);
    let forced: Value = serde_json::from_str(&again.stdout).unwrap();
    let new = forced["ami"].as_str().unwrap().to_string();
    assert_ne!(new, ami, "--force bakes a new image");
    let l = left(&sim.moto, "simok");
    assert_eq!(l.live, Vec::<String>::new());
    let mut want = vec![ami, new];
    want.sort();
    let mut got = l.images.clone();
    got.sort();
    assert_eq!(got, want, "the old image stays (superseded, maybe in use), the new one is handed over; nothing else");
    assert_eq!(l.stray_snapshots, Vec::<String>::new());
}

#[test]
fn sim_a_failure_at_each_step_leaves_nothing_behind() {
    let Some(sim) = sim() else { return };
    for (i, step) in main_path_steps().iter().enumerate() {
        let project = format!("simfail{i}");
        let dir = sim.project(&project, "");
        sim.control(json!({ "fail_at": step }));
        let out = wait(sim.bake(dir.path(), &[]));
        assert_eq!(out.code, 1, "{step}: {}", out.stderr);
        assert!(out.stderr.contains(step.as_str()), "{step}: the failure names the step:\n{}", out.stderr);
        assert!(!out.stderr.contains("No output available yet"), "{step}: the placeholder is not an image:\n{}", out.stderr);
        let l = left(&sim.moto, &project);
        assert_eq!(l.live, Vec::<String>::new(), "{step}: no build instance left running");
        assert_eq!(l.images, Vec::<String>::new(), "{step}: no image the user did not get");
        assert_eq!(l.stray_snapshots, Vec::<String>::new(), "{step}: no snapshot either");
    }
}

#[test]
fn sim_ctrl_c_at_each_step_leaves_nothing_behind() {
    let Some(sim) = sim() else { return };
    for (i, step) in main_path_steps().iter().enumerate() {
        let project = format!("simcancel{i}");
        let dir = sim.project(&project, "");
        sim.control(json!({ "hold_at": step }));
        let child = sim.bake(dir.path(), &[]);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let state = sim.state();
            let held = state.as_object().unwrap().values().any(|e| e["holding"].as_str() == Some(step) && e["status"] == "InProgress");
            if held {
                break;
            }
            assert!(Instant::now() < deadline, "{step}: the execution never reached the step: {state}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
        let out = wait(child);
        assert_eq!(out.code, 130, "{step}: {}", out.stderr);
        assert!(!out.stderr.contains("No output available yet"), "{step}: {}", out.stderr);
        let l = left(&sim.moto, &project);
        assert_eq!(l.live, Vec::<String>::new(), "{step}: no build instance left running:\n{}", out.stderr);
        assert_eq!(l.images, Vec::<String>::new(), "{step}: no image the user did not get:\n{}", out.stderr);
        assert_eq!(l.stray_snapshots, Vec::<String>::new(), "{step}: no snapshot either");
    }
}

/// The cancel path runs "for a maximum of two minutes" and ignores the step's own timeout
/// (Automation actions reference, "Properties shared by all actions", onCancel). With instances
/// that take five minutes to reach `terminated`, a cancel path that waits for it would be cut
/// off; one that only calls TerminateInstances finishes well inside the cap.
#[test]
fn sim_the_cancel_path_finishes_inside_its_two_minutes_when_termination_is_slow() {
    let Some(sim) = sim() else { return };
    let dir = sim.project("simslow", "");
    sim.control(json!({ "hold_at": "runBakeScript", "terminate_secs": 300 }));
    let child = sim.bake(dir.path(), &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let id = loop {
        let state = sim.state();
        if let Some((id, _)) = state.as_object().unwrap().iter().find(|(_, e)| e["holding"] == "runBakeScript" && e["status"] == "InProgress") {
            break id.clone();
        }
        assert!(Instant::now() < deadline, "never reached runBakeScript: {state}");
        std::thread::sleep(Duration::from_millis(50));
    };
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let out = wait(child);
    assert_eq!(out.code, 130, "{}", out.stderr);
    let exec = &sim.state()[&id];
    assert_eq!(exec["status"], "Cancelled");
    let steps = exec["steps"].as_array().unwrap();
    let cancelled = steps.iter().position(|s| s["StepName"] == "runBakeScript" && s["StepStatus"] == "Cancelled").expect("runBakeScript was cancelled");
    let path: Vec<(&str, &str)> = steps[cancelled + 1..].iter().map(|s| (s["StepName"].as_str().unwrap(), s["StepStatus"].as_str().unwrap())).collect();
    assert_eq!(path.len(), 1, "{path:?}");
    assert_eq!(path[0].1, "Success", "the cancel path's terminate ran to its end inside the cap: {path:?}");
    assert_eq!(left(&sim.moto, "simslow").live, Vec::<String>::new());
}

/// `--keep-on-failure`: a failed step stops the build instance instead of terminating it, bake
/// prints its id and the command that removes it, and still removes any image the bake made.
#[test]
fn sim_keep_on_failure_leaves_the_instance_stopped_and_says_how_to_remove_it() {
    let Some(sim) = sim() else { return };
    let dir = sim.project("simkeep", "");
    sim.control(json!({ "fail_at": "verify" }));
    let out = wait(sim.bake(dir.path(), &["--keep-on-failure"]));
    assert_eq!(out.code, 1, "{}", out.stderr);
    let l = left(&sim.moto, "simkeep");
    assert_eq!(l.live.len(), 1, "the instance is kept: {}", out.stderr);
    let id = &l.live[0];
    assert!(out.stderr.contains(&format!("aws ec2 terminate-instances --instance-ids {id}")), "{}", out.stderr);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let state = rt.block_on(async {
        let conf = aws_config::defaults(BehaviorVersion::latest())
            .endpoint_url(&sim.moto)
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_ec2::config::Credentials::new("testing", "testing", None, None, "tests"))
            .load()
            .await;
        let ec2 = aws_sdk_ec2::Client::new(&conf);
        let d = ec2.describe_instances().instance_ids(id).send().await.unwrap();
        let state = d.reservations()[0].instances()[0].state().and_then(|s| s.name()).map(|n| n.as_str().to_string());
        // The printed command, as the user would run it afterwards.
        ec2.terminate_instances().instance_ids(id).send().await.unwrap();
        state
    });
    assert_eq!(state.as_deref(), Some("stopped"), "stopped, not running: it costs only its disk");
    assert_eq!(l.images, Vec::<String>::new());
    assert_eq!(left(&sim.moto, "simkeep").live, Vec::<String>::new());

    // Without the flag the same failure terminates it.
    let dir = sim.project("simnokeep", "");
    let out = wait(sim.bake(dir.path(), &[]));
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert_eq!(left(&sim.moto, "simnokeep").live, Vec::<String>::new());
}

/// The Chroma digest tag on an image in moto.
fn chroma_digest_tag(moto: &str, ami: &str) -> Option<String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let conf = aws_config::defaults(BehaviorVersion::latest())
            .endpoint_url(moto)
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_ec2::config::Credentials::new("testing", "testing", None, None, "tests"))
            .load()
            .await;
        let out = aws_sdk_ec2::Client::new(&conf).describe_images().image_ids(ami).send().await.unwrap();
        out.images().first()?.tags().iter().find(|t| t.key() == Some("imgbuild:chroma-digest")).and_then(|t| t.value()).map(String::from)
    })
}

/// Unpinned, the image is pulled by tag: what the registry served is read back from the
/// readChromaDigest step's Output (aws:runCommand's `Output`, "aws:runCommand - Run a command on a
/// managed instance") and recorded on the image and in the manifest. Pinned, the recorded digest
/// is the pinned one.
#[test]
fn sim_the_pulled_chroma_digest_is_recorded_on_the_image_and_in_the_manifest() {
    let Some(sim) = sim() else { return };
    let served = format!("sha256:{}", "ab".repeat(32));
    let dir = sim.project("simdigest", "");
    sim.control(json!({ "pulled_digest": served }));
    let out = wait(sim.bake(dir.path(), &[]));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let doc: Value = serde_json::from_str(&out.stdout).unwrap();
    let ami = doc["ami"].as_str().unwrap();
    assert_eq!(doc["manifest"]["chroma_digest"], served.as_str());
    let written: Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("imgbuild.bake.json")).unwrap()).unwrap();
    assert_eq!(written["chroma_digest"], served.as_str());
    assert_eq!(chroma_digest_tag(&sim.moto, ami).as_deref(), Some(served.as_str()));

    let pinned = format!("sha256:{}", "cd".repeat(32));
    let dir = sim.project("simpinned", &format!("chroma:\n  digest: {pinned}\n"));
    sim.control(json!({}));
    let out = wait(sim.bake(dir.path(), &[]));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let doc: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(doc["manifest"]["chroma_digest"], pinned.as_str());
    assert_eq!(chroma_digest_tag(&sim.moto, doc["ami"].as_str().unwrap()).as_deref(), Some(pinned.as_str()));
}

/// EC2 may have no capacity for a type (InsufficientInstanceCapacity, "Troubleshoot Amazon EC2
/// instance launch issues"). The error code is only in the step's FailureMessage text; the
/// step that failed (launchInstance) is structure, and bake then starts a new execution with
/// the next type of bake.instance_types. When every type fails, the bake fails naming each.
#[test]
fn sim_a_type_without_capacity_is_followed_by_the_next_type_in_the_list() {
    let Some(sim) = sim() else { return };
    let dir = sim.project("simtypes", "  instance_types: [t3a.small, t3.small]\n");
    sim.control(json!({ "launch_fails_for": ["t3a.small"] }));
    let out = wait(sim.bake(dir.path(), &[]));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("build instance type t3a.small did not launch") && out.stderr.contains("trying t3.small"), "{}", out.stderr);
    let state = sim.state();
    let mut runs: Vec<(String, String, String)> = state
        .as_object()
        .unwrap()
        .values()
        .map(|e| {
            (e["steps"][0]["StepStatus"].as_str().unwrap().to_string(), e["status"].as_str().unwrap().to_string(), e["token"].as_str().unwrap().to_string())
        })
        .collect();
    runs.sort();
    assert_eq!(runs.len(), 2, "{state}");
    assert_eq!((runs[0].0.as_str(), runs[0].1.as_str()), ("Failed", "Failed"), "the first execution failed at its launch");
    assert_eq!((runs[1].0.as_str(), runs[1].1.as_str()), ("Success", "Success"));
    assert_ne!(runs[0].2, runs[1].2, "each try has its own bake token (RunInstances client token)");
    let l = left(&sim.moto, "simtypes");
    assert_eq!(l.live, Vec::<String>::new());
    assert_eq!(l.images.len(), 1);
    let ami: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(ami["ami"].as_str(), Some(l.images[0].as_str()));

    let dir = sim.project("simnotype", "  instance_types: [t3a.small, t3.small]\n");
    sim.control(json!({ "launch_fails_for": ["t3a.small", "t3.small"] }));
    let out = wait(sim.bake(dir.path(), &[]));
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("t3a.small did not launch") && out.stderr.contains("launchInstance"), "{}", out.stderr);
    let l = left(&sim.moto, "simnotype");
    assert_eq!((l.live.len(), l.images.len()), (0, 0));
}
