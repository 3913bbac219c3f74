//! No credential reaches stdout, stderr or `--output json`: every kind of command runs with
//! distinctive secret values in its environment, verbose and in JSON, and none may show up.

use crate::services;
use crate::support::imgbuild;

const SECRET: &str = "imgbuildSecretKey0NeverPrintMe0xyzzy";
const SESSION: &str = "imgbuildSessionToken0NeverPrintMe0plugh";

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/moto-stack.yaml");

#[test]
fn credentials_never_appear_in_any_output() {
    let Some(moto) = services::moto() else { return };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("imgbuild.yaml"), "name: secrets\nregion: us-east-1\naws:\n  poll_interval_secs: 1\n").unwrap();
    let url = moto.url.as_str();
    let runs: Vec<Vec<&str>> = vec![
        vec!["-vv", "render-userdata", "--no-tools"],
        vec!["--output", "json", "render-userdata", "--no-tools", "--mode", "baked"],
        vec!["-vv", "validate", "--no-tools"],
        vec!["-vv", "--endpoint-url", url, "deploy", "--yes", "--no-tools", "--template", FIXTURE],
        vec!["--output", "json", "--endpoint-url", url, "deploy", "--yes", "--no-tools", "--template", FIXTURE],
        vec!["-vv", "--output", "json", "--endpoint-url", url, "status"],
        vec!["--output", "json", "--endpoint-url", url, "bake", "--dry-run", "--no-tools"],
        vec!["--output", "json", "--endpoint-url", url, "images", "list"],
        vec!["-vv", "--endpoint-url", url, "destroy", "--yes"],
        // A failing call: AWS errors are reported, credentials are not.
        vec!["-vv", "--output", "json", "--endpoint-url", "http://127.0.0.1:9", "status"],
    ];
    for args in runs {
        let out = imgbuild(dir.path())
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env("AWS_SESSION_TOKEN", SESSION)
            .env("AWS_MAX_ATTEMPTS", "1")
            .args(&args)
            .output()
            .unwrap();
        let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!all.contains(SECRET) && !all.contains(SESSION), "{args:?} printed a credential:\n{all}");
        assert!(!all.contains("panicked"), "{args:?}:\n{all}");
        if args.contains(&"http://127.0.0.1:9") {
            assert_eq!(out.status.code(), Some(1), "{all}");
            assert!(all.contains("DescribeStacks on stack secrets failed"), "{all}");
        }
    }
}
