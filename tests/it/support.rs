//! Shared helpers: running the binary hermetically, and knowing whether validators must run.

use std::path::Path;

use imgbuild::config::{self, Config};
use imgbuild::render::{self, Format, Inputs, Mode, Rendered};

/// No ambient config or AWS settings, and nothing that could reach AWS: for every process a test
/// starts (the binary, or `script` running it).
pub fn hermetic(cmd: &mut std::process::Command) -> &mut std::process::Command {
    // The developer's ~/.aws (profiles, SSO, credential_process) must not reach a test: an
    // empty home of the tests' own, and shared files that do not exist.
    let home = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hermetic-home");
    let _ = std::fs::create_dir_all(&home);
    cmd.env("HOME", &home)
        .env("AWS_CONFIG_FILE", home.join(".aws/no-config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", home.join(".aws/no-credentials"))
        .env_remove("IMGBUILD_CONFIG")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_ENDPOINT_URL")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
}

/// The binary, run hermetically in `dir`.
pub fn imgbuild(dir: &Path) -> assert_cmd::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_imgbuild"));
    hermetic(cmd.current_dir(dir));
    assert_cmd::Command::from_std(cmd)
}

/// Whether a validator or service that is not installed fails its test. It does unless the
/// run asks for skips with `IMGBUILD_ALLOW_SKIPS=1` (and `tests/run` forbids them with
/// `IMGBUILD_REQUIRE_VALIDATORS=1`): a test harness reports a skipped test as `ok`, so a skip
/// must be asked for, never the silent default.
pub fn validators_required() -> bool {
    std::env::var("IMGBUILD_REQUIRE_VALIDATORS").is_ok_and(|v| v == "1") || !std::env::var("IMGBUILD_ALLOW_SKIPS").is_ok_and(|v| v == "1")
}

/// The path of `program`, or None after saying why the caller skips (failing when required).
pub fn tool(program: &str) -> Option<std::path::PathBuf> {
    match imgbuild::check::userdata::which(program) {
        Some(p) => Some(p),
        None if validators_required() => panic!("{program} is not installed: run tests/run, which installs it (or set IMGBUILD_ALLOW_SKIPS=1 to skip)"),
        None => {
            eprintln!("skipping (IMGBUILD_ALLOW_SKIPS=1): {program} is not installed");
            None
        }
    }
}

pub fn parse(yaml: &str) -> Config {
    config::parse(yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}"))
}

pub fn render_with(config: &Config, region: Option<&str>, mode: Mode, format: Format, gzip: bool) -> Rendered {
    let inputs = Inputs::new(config, region, mode, format, gzip).expect("valid inputs");
    render::render(&inputs).expect("renders")
}

/// The configurations the product promises to render: the default, the article's, and the
/// 0.5.16-0.6.x generation, in both storage modes.
pub fn configs() -> Vec<(&'static str, Config, Option<&'static str>)> {
    vec![
        ("default", Config::default(), None),
        (
            "article-0.4.13-docker-nfs",
            parse("chroma:\n  version: 0.4.13\nstorage:\n  mode: docker-nfs\nefs:\n  file_system_id: fs-0123456789abcdef0\n"),
            Some("eu-west-1"),
        ),
        ("v0.6.3-efs-tls", parse("chroma:\n  version: 0.6.3\n  port: 8080\n  env:\n    ALLOW_RESET: 'FALSE'\n"), None),
        ("v1-docker-nfs-deploy-time", parse("storage:\n  mode: docker-nfs\n"), None),
    ]
}

pub const MODES: [Mode; 2] = [Mode::Full, Mode::Baked];
pub const FORMATS: [Format; 2] = [Format::CloudConfig, Format::Mime];

/// A tool from the project's Python venv (`.venv`, made by tests/run), else from PATH.
pub fn tool_in_venv(program: &str) -> Option<std::path::PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin").join(program);
    if venv.is_file() {
        return Some(venv);
    }
    tool(program)
}

/// A current-thread runtime for the synchronous tests that call the SDK.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// A working dir whose imgbuild.yaml names a project of its own (so parallel tests against one
/// moto never share a stack or a handoff parameter), in us-east-1, polling every second, with
/// `extra` YAML appended.
pub fn moto_project(name: &str, extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("imgbuild.yaml"), format!("name: {name}\nregion: us-east-1\naws:\n  poll_interval_secs: 1\n{extra}")).unwrap();
    dir
}

/// The binary, run hermetically in `dir`, talking to the moto server at `url`.
pub fn moto_cmd(dir: &Path, url: &str) -> assert_cmd::Command {
    let mut c = imgbuild(dir);
    c.args(["--endpoint-url", url]);
    c
}

/// The tests' own SDK config for the moto server at `url`, in `region`, with moto's test
/// credentials: to set up and inspect what the binary sees.
pub async fn moto_sdk(url: &str, region: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(url)
        .region(aws_config::Region::new(region.to_string()))
        .credentials_provider(aws_sdk_cloudformation::config::Credentials::new("testing", "testing", None, None, "tests"))
        .load()
        .await
}
