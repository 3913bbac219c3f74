//! imgbuild against moto, in one run on one server, with wall time and API calls (moto's
//! request recorder):
//! - one deploy next to `aws cloudformation deploy` (PyPI awscli) on the same template, then a
//!   no-change redeploy of each;
//! - a cache-hit bake (an image with the recipe's digest exists, so nothing is launched).
//!
//! ```text
//! python3 -m venv .venv && .venv/bin/pip install -r tests/requirements.txt   # tests/run does this
//! cargo bench --bench aws --profile dev   # API-bound: the dev build measures the same
//! ```
//!
//! Needs .venv/bin/moto_server and .venv/bin/aws. Talks to loopback only.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const RUNS: usize = 5;

fn venv(tool: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin").join(tool)
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` probes benches this way; nothing to list.
    }
    for tool in ["moto_server", "aws"] {
        if !venv(tool).is_file() {
            eprintln!("{} is missing: install tests/requirements.txt into .venv first", venv(tool).display());
            std::process::exit(2);
        }
    }
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut moto = Command::new(venv("moto_server"))
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        // moto's request recorder writes `moto_recording` into its working directory unless told
        // otherwise: keep it under target/, out of the work tree.
        .env("MOTO_RECORDER_FILEPATH", Path::new(env!("CARGO_TARGET_TMPDIR")).join("moto_recording"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/moto-stack.yaml");
    let work = tempfile::tempdir().unwrap();

    let mut rows = Vec::new();
    // The second pair redeploys the stacks the first pair made: the no-change path.
    for tool in ["imgbuild deploy", "aws cloudformation deploy", "imgbuild deploy (no changes)", "aws cloudformation deploy (no changes)"] {
        let mut times = Vec::new();
        let mut calls = Vec::new();
        for run in 0..RUNS {
            let stack = format!("{}-{run}", if tool.starts_with("imgbuild") { "imgb" } else { "awscli" });
            let mut cmd = if tool.starts_with("imgbuild") {
                std::fs::write(work.path().join("imgbuild.yaml"), format!("name: {stack}\naws:\n  poll_interval_secs: 1\n")).unwrap();
                let mut c = Command::new(env!("CARGO_BIN_EXE_imgbuild"));
                c.current_dir(work.path()).args(["-q", "--endpoint-url", &url, "deploy", "--yes", "--no-tools", "--template"]).arg(&template);
                c
            } else {
                let mut c = Command::new(venv("aws"));
                c.args(["--endpoint-url", &url, "cloudformation", "deploy", "--no-fail-on-empty-changeset", "--stack-name", &stack, "--template-file"])
                    .arg(&template)
                    .args(["--parameter-overrides", "ChromaPort=8000", "HeartbeatPath=/api/v2/heartbeat", "VpcCidr=10.0.0.0/16"]);
                c
            };
            cmd.envs(aws_env()).stdout(Stdio::null()).stderr(Stdio::null());
            recorder(&url, "reset-recording");
            recorder(&url, "start-recording");
            let t = Instant::now();
            let status = cmd.status().unwrap();
            times.push(t.elapsed());
            recorder(&url, "stop-recording");
            assert!(status.success(), "{tool} run {run} failed");
            calls.push(recorder(&url, "download-recording").lines().filter(|l| !l.trim().is_empty()).count());
        }
        times.sort();
        calls.sort();
        rows.push((tool, times[RUNS / 2], times[0], times[RUNS - 1], calls[RUNS / 2]));
    }
    let bake = bake_cache_hit(&url, work.path());
    let _ = moto.kill();
    let _ = moto.wait();
    println!("| deploy against moto ({RUNS} runs each, fresh stacks, then a no-change redeploy of each) | median | min | max | API calls |");
    println!("|---|---|---|---|---|");
    for (tool, med, min, max, calls) in rows {
        println!("| {tool} | {:.0} ms | {:.0} ms | {:.0} ms | {calls} |", ms(med), ms(min), ms(max));
    }
    let (med, min, max, calls) = bake;
    println!();
    println!("| bake against moto ({RUNS} runs) | median | min | max | API calls |");
    println!("|---|---|---|---|---|");
    println!("| imgbuild bake, cache hit | {:.0} ms | {:.0} ms | {:.0} ms | {calls} |", ms(med), ms(min), ms(max));
}

/// A bake whose digest an image already carries: resolve, render, digest, find, hand off.
fn bake_cache_hit(url: &str, work: &Path) -> (Duration, Duration, Duration, usize) {
    std::fs::write(work.join("imgbuild.yaml"), format!("name: benchbake\nbake:\n  manifest: {}\n", work.join("bake.json").display())).unwrap();
    let run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_imgbuild"))
            .current_dir(work)
            .args(["-q", "--output", "json", "--endpoint-url", url, "bake", "--no-tools"])
            .args(extra)
            .envs(aws_env())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let digest = run(&["--dry-run"])["digest"].as_str().unwrap().to_string();
    tag_an_image(url, &digest);
    let mut times = Vec::new();
    let mut calls = Vec::new();
    for _ in 0..RUNS {
        recorder(url, "reset-recording");
        recorder(url, "start-recording");
        let t = Instant::now();
        let doc = run(&[]);
        times.push(t.elapsed());
        recorder(url, "stop-recording");
        assert_eq!(doc["cached"], true);
        calls.push(recorder(url, "download-recording").lines().filter(|l| !l.trim().is_empty()).count());
    }
    times.sort();
    calls.sort();
    (times[RUNS / 2], times[0], times[RUNS - 1], calls[RUNS / 2])
}

/// Makes an image in moto and tags it with the digest, as a finished bake would have.
fn tag_an_image(url: &str, digest: &str) {
    let aws = |args: &[&str]| {
        let out = Command::new(venv("aws")).arg("--endpoint-url").arg(url).args(args).envs(aws_env()).output().unwrap();
        assert!(out.status.success(), "aws {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let base = aws(&[
        "ssm",
        "get-parameter",
        "--name",
        "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64",
        "--query",
        "Parameter.Value",
        "--output",
        "text",
    ]);
    let instance = aws(&["ec2", "run-instances", "--image-id", &base, "--count", "1", "--query", "Instances[0].InstanceId", "--output", "text"]);
    let ami = aws(&["ec2", "create-image", "--instance-id", &instance, "--name", "benchbake", "--query", "ImageId", "--output", "text"]);
    aws(&["ec2", "create-tags", "--resources", &ami, "--tags", &format!("Key=imgbuild:digest,Value={digest}"), "Key=imgbuild:project,Value=benchbake"]);
}

fn aws_env() -> [(&'static str, &'static str); 5] {
    [
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
    ]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// moto's request recorder (`/moto-api/recorder/<action>`).
fn recorder(url: &str, action: &str) -> String {
    let res = if action == "download-recording" {
        ureq::get(format!("{url}/moto-api/recorder/{action}")).call()
    } else {
        ureq::post(format!("{url}/moto-api/recorder/{action}")).send_empty()
    };
    res.unwrap().body_mut().read_to_string().unwrap()
}
