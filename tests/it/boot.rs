//! The boot scripts executed, not just rendered: the user-data is taken apart the way cloud-init
//! does it (write_files, then runcmd or every MIME script part), and the scripts run with bash
//! under a temporary root (`IMGBUILD_ROOT`), with stub `docker`, `mount`, `mountpoint`,
//! `findmnt`, `systemctl`, `aws`, `dnf` and `sleep` (tests/fixtures/boot/bin) and an
//! instance-metadata stub on loopback (`IMDS_ENDPOINT`). `flock`, `curl`, `timeout` and `find`
//! are the real ones, so the writer lock really blocks a second instance.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use imgbuild::config::Config;
use imgbuild::render::{Format, Mode, Rendered, SCRIPT_DIR};

use crate::support::*;

const FS_ID: &str = "fs-0123456789abcdef0";
const INSTANCE_ID: &str = "i-0123456789abcdef0";
const STACK: &str = "chroma-test";
const SIGNAL_RESOURCE: &str = "AutoScalingGroup";
/// How long any one scenario step may take before the test gives up on it.
const BOUND: Duration = Duration::from_secs(60);

fn stubs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/boot/bin")
}

/// What IMDS answers on an instance the stack launched. Shapes from the EC2 User Guide, "Use the
/// Instance Metadata Service to access instance metadata" (IMDSv2: `PUT /latest/api/token` with
/// `X-aws-ec2-metadata-token-ttl-seconds`, then `GET /latest/meta-data/...` with
/// `X-aws-ec2-metadata-token`; 401 without a valid token, 404 for a path that does not exist) and
/// "View tags for your EC2 instances in instance metadata" (`tags/instance/<key>` holds the value
/// as plain text). The tag names are the contract with the stack (issue 10).
fn stack_metadata() -> HashMap<String, String> {
    HashMap::from([
        ("placement/region".into(), "us-east-1".into()),
        ("instance-id".into(), INSTANCE_ID.into()),
        ("services/domain".into(), "amazonaws.com".into()),
        ("tags/instance/ImgbuildFileSystemId".into(), FS_ID.into()),
        ("tags/instance/ImgbuildStackName".into(), STACK.into()),
        ("tags/instance/ImgbuildSignalResource".into(), SIGNAL_RESOURCE.into()),
    ])
}

/// IMDSv2 on loopback, plus Chroma's heartbeat, which answers 200 while the docker stub has a
/// container up (`<state>/chroma-up`) and 503 otherwise.
fn serve(metadata: HashMap<String, String>, heartbeat: &str, up: PathBuf) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let state = Arc::new((metadata, heartbeat.to_string(), up));
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let state = state.clone();
            std::thread::spawn(move || answer(conn, &state.0, &state.1, &state.2));
        }
    });
    port
}

fn answer(mut conn: TcpStream, metadata: &HashMap<String, String>, heartbeat: &str, up: &Path) {
    const TOKEN: &str = "AQAEAFakeImdsV2Token==";
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return;
    }
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let (status, body) = if method == "PUT" && path == "/latest/api/token" {
        if headers.contains_key("x-aws-ec2-metadata-token-ttl-seconds") { ("200 OK", TOKEN.to_string()) } else { ("400 Bad Request", String::new()) }
    } else if let Some(key) = path.strip_prefix("/latest/meta-data/") {
        if headers.get("x-aws-ec2-metadata-token").map(String::as_str) != Some(TOKEN) {
            ("401 Unauthorized", String::new())
        } else {
            match metadata.get(key) {
                Some(v) => ("200 OK", v.clone()),
                None => ("404 Not Found", String::new()),
            }
        }
    } else if method == "GET" && path == heartbeat && up.exists() {
        ("200 OK", "{\"nanosecond heartbeat\":1}".to_string())
    } else {
        ("503 Service Unavailable", String::new())
    };
    let _ = write!(conn, "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
}

/// One instance: its own root, stub state and metadata server; `efs` is the file system, shared
/// between instances by pointing each one's mount point at it.
struct Instance {
    _dir: tempfile::TempDir,
    root: PathBuf,
    state: PathBuf,
    mount_point: PathBuf,
    port: u16,
}

impl Instance {
    fn new(config: &Config, efs: &Path, metadata: HashMap<String, String>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let state = dir.path().join("stub");
        std::fs::create_dir_all(&state).unwrap();
        let mount_point = root.join(config.storage.mount_point.trim_start_matches('/'));
        std::fs::create_dir_all(mount_point.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(efs, &mount_point).unwrap();
        let heartbeat = imgbuild::chroma::profile(&imgbuild::chroma::parse_version(&config.chroma.version).unwrap()).unwrap().heartbeat_path;
        let port = serve(metadata, heartbeat, state.join("chroma-up"));
        Instance { _dir: dir, root, state, mount_point, port }
    }

    /// What a baked image carries: the install marker written by the bake's install step, and
    /// the CloudWatch agent the install step puts in.
    fn baked(self) -> Self {
        let marker = self.path(imgbuild::render::INSTALL_MARKER);
        std::fs::create_dir_all(marker.parent().unwrap()).unwrap();
        std::fs::write(marker, "ghcr.io/chroma-core/chroma:1.5.9\n").unwrap();
        self.with_agent()
    }

    fn with_agent(self) -> Self {
        let ctl = self.path(imgbuild::render::AGENT_CTL);
        std::fs::create_dir_all(ctl.parent().unwrap()).unwrap();
        std::fs::copy(stubs().join("../agent/amazon-cloudwatch-agent-ctl"), &ctl).unwrap();
        self
    }

    fn without_agent(self) -> Self {
        std::fs::remove_file(self.path(imgbuild::render::AGENT_CTL)).unwrap();
        self
    }

    fn path(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }

    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        hermetic(&mut cmd);
        let path = format!("{}:{}", stubs().display(), std::env::var("PATH").unwrap_or_default());
        let real_sleep = imgbuild::check::userdata::which("sleep").expect("sleep is installed");
        cmd.env("PATH", path)
            .env("IMGBUILD_ROOT", &self.root)
            .env("IMDS_ENDPOINT", format!("http://127.0.0.1:{}", self.port))
            .env("IMGBUILD_CHROMA_ENDPOINT", format!("http://127.0.0.1:{}", self.port))
            .env("STUB_STATE", &self.state)
            .env("STUB_LOCK", self.mount_point.join(".imgbuild-writer.lock"))
            .env("STUB_MOUNT", &self.mount_point)
            .env("REAL_SLEEP", real_sleep)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// cloud-init's part: write_files, then runcmd (cloud-config) or every script part in order,
    /// each whether or not the one before failed (cloud-init's scripts_user; REFERENCE.md "MIME
    /// script parts all run even when an earlier part failed"). Returns each script's status and
    /// stderr.
    fn cloud_init(&self, r: &Rendered) -> Vec<(String, ExitStatus, String)> {
        match r.format {
            Format::CloudConfig => {
                let runcmd = self.write_files(&r.cloud_config);
                runcmd
                    .iter()
                    .map(|argv| {
                        let argv: Vec<String> = argv.iter().map(|a| a.replace(SCRIPT_DIR, &self.path(SCRIPT_DIR).display().to_string())).collect();
                        let mut cmd = self.command(&argv[0]);
                        cmd.args(&argv[1..]);
                        let (status, err) = bounded(cmd);
                        (argv.join(" "), status, err)
                    })
                    .collect()
            }
            Format::Mime => {
                let mut results = Vec::new();
                for (content_type, name, body) in mime_parts(&r.raw) {
                    if content_type == "text/cloud-config" {
                        assert!(self.write_files(&body).is_empty(), "no runcmd in MIME format");
                        continue;
                    }
                    assert_eq!(content_type, "text/x-shellscript");
                    let path = self.path("/var/lib/cloud/instance/scripts").join(&name);
                    write_file(&path, &body, 0o755);
                    let (status, err) = bounded(self.command(&path));
                    results.push((name, status, err));
                }
                results
            }
        }
    }

    /// write_files under the root; returns runcmd.
    fn write_files(&self, doc: &str) -> Vec<Vec<String>> {
        let doc: serde_yaml::Value = serde_yaml::from_str(doc).unwrap();
        for f in doc["write_files"].as_sequence().unwrap() {
            let mode = u32::from_str_radix(f["permissions"].as_str().unwrap(), 8).unwrap();
            write_file(&self.path(f["path"].as_str().unwrap()), f["content"].as_str().unwrap(), mode);
        }
        doc.get("runcmd").map(|v| serde_yaml::from_value(v.clone()).unwrap()).unwrap_or_default()
    }

    /// systemd starting the enabled unit at boot, through the systemctl stub.
    fn systemd_starts_chroma(&self) {
        let (status, err) = bounded({
            let mut c = self.command(stubs().join("systemctl"));
            c.args(["start", "chroma.service"]);
            c
        });
        assert!(status.success(), "{err}");
    }

    fn calls(&self) -> Vec<String> {
        read(&self.state.join("calls")).lines().map(str::to_string).collect()
    }

    fn signals(&self) -> Vec<String> {
        self.calls().into_iter().filter(|c| c.starts_with("aws ")).collect()
    }

    /// What the docker stub saw when compose brought the container up.
    fn up(&self) -> String {
        read(&self.state.join("up"))
    }

    fn journal(&self) -> String {
        read(&self.state.join("journal"))
    }

    fn serving(&self) -> bool {
        self.state.join("chroma-up").exists()
    }

    /// The unit's exit status once it has ended (bounded).
    fn unit_exit(&self) -> i32 {
        let rc = self.state.join("unit.rc");
        wait_for(|| rc.exists(), "chroma.service to end");
        read(&rc).trim().parse().unwrap()
    }

    /// Stops Chroma (the docker stub's `up` returns) and waits for the unit to end.
    fn stop(&self) -> i32 {
        std::fs::write(self.state.join("stop"), "").unwrap();
        let rc = self.unit_exit();
        std::fs::remove_file(self.state.join("stop")).unwrap();
        rc
    }

    /// A reboot: nothing mounted, /run emptied, a fresh call log.
    fn reboot(&self) {
        for f in ["mounted", "calls", "journal", "unit.rc", "chroma-up", "up"] {
            let _ = std::fs::remove_file(self.state.join(f));
        }
        let _ = std::fs::remove_dir_all(self.path("/run"));
    }
}

fn write_file(path: &Path, content: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn wait_for(mut done: impl FnMut() -> bool, what: &str) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < BOUND, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command to its end, killing it past the bound.
fn bounded(mut cmd: Command) -> (ExitStatus, String) {
    // A script another test thread wrote a moment ago can still be open for writing in a child
    // that thread is forking (the fd lives until that child's exec closes it): exec then fails
    // with ETXTBSY. The window is short: retry briefly.
    let mut tries = 0;
    let mut child = loop {
        match cmd.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            other => break other.unwrap(),
        }
    };
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).ok();
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > BOUND {
            child.kill().ok();
            panic!("{cmd:?} ran past {BOUND:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, reader.join().unwrap())
}

/// The parts of a MIME user-data, as cloud-init's email parser splits them: (content type,
/// file name, body).
fn mime_parts(raw: &[u8]) -> Vec<(String, String, String)> {
    let text = String::from_utf8(raw.to_vec()).unwrap();
    let boundary = text.split("boundary=\"").nth(1).unwrap().split('"').next().unwrap().to_string();
    let delimiter = format!("\n--{boundary}");
    text.split(&delimiter)
        .skip(1)
        .filter(|p| !p.starts_with("--"))
        .map(|part| {
            let (head, body) = part.split_once("\n\n").unwrap();
            let header = |name: &str| head.lines().find_map(|l| l.strip_prefix(name)).unwrap_or_default().to_string();
            let content_type = header("Content-Type: ").split(';').next().unwrap().to_string();
            let name = header("Content-Disposition: attachment; filename=").trim_matches('"').to_string();
            (content_type, name, format!("{body}\n"))
        })
        .collect()
}

fn efs_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn signal(status: &str) -> String {
    format!(
        "aws cloudformation signal-resource --region us-east-1 --stack-name {STACK} --logical-resource-id {SIGNAL_RESOURCE} --unique-id {INSTANCE_ID} --status {status} --cli-connect-timeout 10 --cli-read-timeout 20"
    )
}

fn boot_status(results: &[(String, ExitStatus, String)]) -> &(String, ExitStatus, String) {
    results.iter().find(|(name, ..)| name.contains("20-boot.sh")).expect("the boot script ran")
}

fn index(calls: &[String], prefix: &str) -> usize {
    calls.iter().position(|c| c.starts_with(prefix)).unwrap_or_else(|| panic!("no `{prefix}` in {calls:#?}"))
}

fn docker_nfs() -> Config {
    parse("storage:\n  mode: docker-nfs\n")
}

/// First boot, both storage modes and both formats: EFS mounted before the container is
/// (re-)created, under the writer lock on EFS, the version recorded on EFS, one SUCCESS signal
/// after the heartbeat answers (contract with the stack: `aws cloudformation signal-resource`,
/// AWS CLI reference `signal-resource`; the --unique-id is the instance id).
#[test]
fn first_boot_mounts_efs_locks_recreates_chroma_and_signals_success_once() {
    for (config, format, fstab) in [
        (Config::default(), Format::CloudConfig, format!("{FS_ID}:/ /mnt/chroma efs _netdev,noresvport,tls,iam,nofail 0 0")),
        (
            docker_nfs(),
            Format::Mime,
            format!(
                "{FS_ID}.efs.us-east-1.amazonaws.com:/ /mnt/chroma nfs4 nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport,_netdev,nofail 0 0"
            ),
        ),
    ] {
        let efs = efs_dir();
        let vm = Instance::new(&config, efs.path(), stack_metadata()).baked();
        let r = render_with(&config, None, Mode::Baked, format, false);
        let results = vm.cloud_init(&r);
        let (_, status, err) = boot_status(&results);
        assert!(status.success(), "{err}\n{}", vm.journal());
        assert!(vm.serving());

        let calls = vm.calls();
        let mount = index(&calls, "mount ");
        let up = index(&calls, "docker compose --project-name chroma");
        assert!(mount < up, "EFS is mounted before the container starts: {calls:#?}");
        assert!(calls[up].ends_with(" up --force-recreate --remove-orphans"), "{}", calls[up]);
        assert_eq!(vm.up(), "lock held\nefs mounted\n", "compose runs under the writer lock, on EFS");
        assert_eq!(vm.signals(), [signal("SUCCESS")], "exactly one signal, after the heartbeat answered");
        assert!(read(&vm.path("/etc/fstab")).lines().any(|l| l == fstab), "{}", read(&vm.path("/etc/fstab")));
        assert_eq!(read(&efs.path().join(".imgbuild-chroma-version")), "1.5.9\n");
        assert!(efs.path().join("data").is_dir(), "the data directory is made on EFS");
        assert!(err.contains("answers on /api/v2/heartbeat"), "{err}");
        assert_eq!(vm.stop(), 0);
    }
}

/// Fault 2: after a reboot EFS may answer late. The fstab line is `nofail`, and every start of
/// the unit retries the mount with growing pauses, so the third try still brings Chroma up.
#[test]
fn reboot_retries_the_mount_until_efs_answers_on_the_third_try() {
    let config = Config::default();
    let efs = efs_dir();
    let vm = Instance::new(&config, efs.path(), stack_metadata()).baked();
    let results = vm.cloud_init(&render_with(&config, None, Mode::Baked, Format::CloudConfig, false));
    assert!(boot_status(&results).1.success());
    vm.stop();

    vm.reboot();
    std::fs::write(vm.state.join("mount-failures"), "2").unwrap();
    vm.systemd_starts_chroma();
    wait_for(|| vm.serving(), "Chroma after the reboot");
    let calls = vm.calls();
    let mounts: Vec<_> = calls.iter().filter(|c| c.starts_with("mount ")).collect();
    assert_eq!(mounts.len(), 3, "{calls:#?}");
    let sleeps: Vec<_> = calls.iter().filter(|c| c.starts_with("sleep ")).map(String::as_str).collect();
    assert_eq!(sleeps, ["sleep 5", "sleep 10"], "a pause, growing, after each failed mount");
    let up = index(&calls, "docker compose --project-name chroma");
    assert!(index(&calls, "mount ") < up);
    assert_eq!(vm.up(), "lock held\nefs mounted\n");
    assert!(vm.signals().is_empty(), "the boot script and its signal run once per instance, not per reboot");
    assert_eq!(vm.stop(), 0);
}

/// Fault 5: the mount loop never spins without sleeping, even when mount claims success but
/// nothing is mounted; it gives up after its tries (systemd starts it again) and Chroma never
/// starts on the root volume.
#[test]
fn a_mount_that_claims_success_without_mounting_is_retried_with_pauses_and_never_served() {
    let config = Config::default();
    let efs = efs_dir();
    let vm = Instance::new(&config, efs.path(), stack_metadata()).baked();
    std::fs::write(vm.state.join("mount-lies"), "").unwrap();
    let r = render_with(&config, None, Mode::Baked, Format::CloudConfig, false);
    vm.write_files(&r.cloud_config);
    std::fs::write(vm.path(imgbuild::render::ENV_FILE), "").unwrap();
    vm.systemd_starts_chroma();
    assert_eq!(vm.unit_exit(), 1, "a failure systemd retries (Restart=always), not a guard's 3: {}", vm.journal());
    let calls = vm.calls();
    assert_eq!(calls.iter().filter(|c| c.starts_with("mount ")).count(), 8, "{calls:#?}");
    let sleeps: Vec<_> = calls.iter().filter(|c| c.starts_with("sleep ")).map(String::as_str).collect();
    assert_eq!(sleeps, ["sleep 5", "sleep 10", "sleep 15", "sleep 20", "sleep 25", "sleep 30", "sleep 30", "sleep 30"]);
    assert!(!calls.iter().any(|c| c.starts_with("docker")), "{calls:#?}");
    assert!(vm.journal().contains("EFS is not mounted on"), "{}", vm.journal());
}

/// Fault 1: after an unclean restart nothing but systemd may start Chroma. The compose service
/// has `restart: "no"` (dockerd restarts `unless-stopped` containers itself at daemon start;
/// Docker docs "Start containers automatically"), the bind fails on a missing source instead of
/// creating it on the root volume (docker/compose v2.32.4 `pkg/compose/create.go`
/// buildContainerVolumes: without `create_host_path: false` it uses the legacy Binds API), and
/// a container left from before is re-created only after the mount, under the lock.
#[test]
fn unclean_restart_recreates_the_container_after_the_mount_under_the_lock() {
    for (_, config, region) in configs() {
        for mode in MODES {
            let r = render_with(&config, region, mode, Format::CloudConfig, false);
            assert!(r.compose_yaml.contains("\n    restart: 'no'\n"), "{}", r.compose_yaml);
            let volume: serde_yaml::Value = serde_yaml::from_str::<serde_yaml::Value>(&r.compose_yaml).unwrap()["services"]["chroma"]["volumes"][0].clone();
            if volume["type"] == "bind" {
                assert_eq!(volume["bind"]["create_host_path"], serde_yaml::Value::Bool(false), "{}", r.compose_yaml);
            }
            assert!(!r.unit.lines().any(|l| l.starts_with("RequiresMountsFor=")), "a failed mount dependency is not retried by Restart=");
        }
    }

    let config = Config::default();
    let efs = efs_dir();
    let vm = Instance::new(&config, efs.path(), stack_metadata()).baked();
    assert!(boot_status(&vm.cloud_init(&render_with(&config, None, Mode::Baked, Format::Mime, false))).1.success());
    // The host dies with Chroma running: no ExecStopPost, the container is still there.
    std::fs::write(vm.state.join("stop"), "").unwrap();
    vm.unit_exit();
    std::fs::remove_file(vm.state.join("stop")).unwrap();
    vm.reboot();
    vm.systemd_starts_chroma();
    wait_for(|| vm.serving(), "Chroma after the unclean restart");
    let calls = vm.calls();
    let up = index(&calls, "docker compose --project-name chroma");
    assert!(calls[up].contains(" up --force-recreate "), "{}", calls[up]);
    assert!(index(&calls, "mount ") < up);
    assert_eq!(vm.up(), "lock held\nefs mounted\n");
    assert_eq!(vm.stop(), 0);
}

/// Fault 4: cloud-init runs the boot part of a MIME user-data after the install part failed (and
/// the cloud-config runcmd now runs it too). The boot finds no install marker, starts nothing and
/// signals FAILURE once.
#[test]
fn a_failed_install_never_starts_chroma_and_signals_failure_in_both_formats() {
    let config = Config::default();
    for format in FORMATS {
        let efs = efs_dir();
        let vm = Instance::new(&config, efs.path(), stack_metadata());
        let r = render_with(&config, None, Mode::Full, format, false);
        let results = vm.cloud_init(&r);
        if format == Format::Mime {
            assert_eq!(results.len(), 2);
            assert!(!results[0].1.success(), "the install fails: dnf cannot reach its repositories");
        }
        let (_, status, err) = boot_status(&results);
        assert!(!status.success());
        assert!(err.contains("the install did not complete (/var/lib/imgbuild/installed is missing)"), "{format:?}: {err}");
        let calls = vm.calls();
        assert!(calls.iter().any(|c| c.starts_with("dnf install")), "{calls:#?}");
        assert!(!calls.iter().any(|c| c.starts_with("systemctl")), "{format:?}: {calls:#?}");
        assert!(!calls.iter().any(|c| c.starts_with("docker")), "{calls:#?}");
        assert_eq!(vm.signals(), [signal("FAILURE")], "{format:?}");
    }
}

/// Fault 3: during a replacement (Auto Scaling "terminate and launch" may start the new instance
/// while the old one still runs) the second Chroma waits for the writer lock on EFS, in both
/// storage modes, and starts once the first lets go.
#[test]
fn a_second_instance_waits_for_the_writer_lock_in_both_storage_modes() {
    for config in [docker_nfs(), Config::default()] {
        let efs = efs_dir();
        let old = Instance::new(&config, efs.path(), stack_metadata()).baked();
        let r = render_with(&config, None, Mode::Baked, Format::CloudConfig, false);
        assert!(boot_status(&old.cloud_init(&r)).1.success());

        let new = Arc::new(Instance::new(&config, efs.path(), stack_metadata()).baked());
        let booting = {
            let (new, r) = (new.clone(), r.clone());
            std::thread::spawn(move || new.cloud_init(&r))
        };
        wait_for(|| new.journal().contains("another instance holds"), "the new instance to wait for the lock");
        std::thread::sleep(Duration::from_millis(300));
        assert!(!new.calls().iter().any(|c| c.starts_with("docker compose --project-name chroma")), "{:#?}", new.calls());
        assert!(!new.serving() && new.signals().is_empty());

        assert_eq!(old.stop(), 0);
        let results = booting.join().unwrap();
        assert!(boot_status(&results).1.success(), "{}", new.journal());
        assert_eq!(new.up(), "lock held\nefs mounted\n");
        assert_eq!(new.signals(), [signal("SUCCESS")]);
        assert_eq!(new.stop(), 0);
    }
}

/// The guards fail closed: Chroma never starts, the journal says why, the unit is not restarted
/// (exit 3, RestartPreventExitStatus) and the stack gets one FAILURE.
#[test]
fn each_guard_refuses_to_start_chroma_and_the_stack_gets_failure() {
    type Setup = fn(&Path, &Path);
    let cases: [(&str, Setup, &str); 3] = [
        (
            "data directory off EFS",
            |root, efs| {
                std::fs::create_dir_all(root.join("var/lib/elsewhere")).unwrap();
                std::os::unix::fs::symlink(root.join("var/lib/elsewhere"), efs.join("data")).unwrap();
            },
            "is on /, not on the EFS mount",
        ),
        (
            // Fault 9: docker-nfs used to keep the data at the file system's root.
            "a database elsewhere on the file system",
            |_, efs| std::fs::write(efs.join("chroma.sqlite3"), "SQLite format 3\0").unwrap(),
            "/mnt/chroma/data has no Chroma database but",
        ),
        (
            // Chroma's migrations only go forward (chroma#2615, chroma#4217).
            "data from a newer Chroma",
            |_, efs| std::fs::write(efs.join(".imgbuild-chroma-version"), "1.10.0\n").unwrap(),
            "last opened by Chroma 1.10.0, newer than this image's 1.5.9",
        ),
    ];
    let config = Config::default();
    for (name, setup, reason) in cases {
        let efs = efs_dir();
        let vm = Instance::new(&config, efs.path(), stack_metadata()).baked();
        setup(&vm.root, efs.path());
        let results = vm.cloud_init(&render_with(&config, None, Mode::Baked, Format::CloudConfig, false));
        let (_, status, err) = boot_status(&results);
        assert!(!status.success(), "{name}");
        assert_eq!(vm.unit_exit(), 3, "{name}: {}", vm.journal());
        assert!(vm.journal().contains("refusing to start Chroma: ") && vm.journal().contains(reason), "{name}: {}", vm.journal());
        assert!(err.contains("chroma.service refused to start:") && err.contains(reason), "{name}: {err}");
        assert!(!vm.calls().iter().any(|c| c.starts_with("docker compose --project-name chroma")), "{name}: {:#?}", vm.calls());
        assert_eq!(vm.signals(), [signal("FAILURE")], "{name}");
    }

    // And the version guard lets an upgrade through, recording the new version.
    let efs = efs_dir();
    std::fs::write(efs.path().join(".imgbuild-chroma-version"), "0.6.3\n").unwrap();
    let vm = Instance::new(&config, efs.path(), stack_metadata()).baked();
    assert!(boot_status(&vm.cloud_init(&render_with(&config, None, Mode::Baked, Format::CloudConfig, false))).1.success());
    assert_eq!(read(&efs.path().join(".imgbuild-chroma-version")), "1.5.9\n");
    assert_eq!(vm.stop(), 0);
}

/// Not launched by the stack (no ImgbuildStackName / ImgbuildSignalResource tags): Chroma starts
/// and the boot says it does not signal.
#[test]
fn without_the_stack_tags_the_boot_skips_the_signal_and_says_so() {
    let config = parse("efs:\n  file_system_id: fs-0123456789abcdef0\n");
    let mut metadata = stack_metadata();
    metadata.retain(|k, _| !k.starts_with("tags/"));
    let efs = efs_dir();
    let vm = Instance::new(&config, efs.path(), metadata).baked();
    let results = vm.cloud_init(&render_with(&config, Some("us-east-1"), Mode::Baked, Format::Mime, false));
    let (_, status, err) = boot_status(&results);
    assert!(status.success(), "{err}");
    assert!(vm.signals().is_empty());
    assert!(err.contains("not signalling SUCCESS: no ImgbuildStackName / ImgbuildSignalResource instance tags"), "{err}");
    assert_eq!(vm.stop(), 0);
}

/// The CLI exits 255 when the request did not get through and 254 when CloudFormation answered
/// with an error (AWS CLI user guide, "Command line return codes"): only the first is retried.
#[test]
fn the_signal_is_retried_only_when_it_did_not_reach_cloudformation() {
    let config = Config::default();
    for (rc, calls) in [("254", 1), ("255", 3)] {
        let efs = efs_dir();
        let vm = Instance::new(&config, efs.path(), stack_metadata()).baked();
        let r = render_with(&config, None, Mode::Baked, Format::CloudConfig, false);
        let runcmd = vm.write_files(&r.cloud_config);
        let script = vm.path(&runcmd[0][2]);
        let mut cmd = vm.command(&script);
        cmd.env("STUB_AWS_RC", rc);
        let (status, err) = bounded(cmd);
        assert!(status.success(), "Chroma serves; only the signal failed: {err}");
        assert_eq!(vm.signals().len(), calls, "exit {rc}");
        assert!(err.contains(&format!("the AWS CLI exited {rc}")), "{err}");
        assert_eq!(vm.stop(), 0);
    }
}

// ---------------------------------------------------------------------------------------------
// The backup's quiesce script (backup/quiesce.sh), run as Run Command would on a booted instance.

/// Runs the quiesce script on `vm` with the settings `imgbuild backup` passes.
fn quiesce(vm: &Instance, token: &str, lock_wait: &str) -> (ExitStatus, String, String) {
    let script = vm.path("/tmp/quiesce.sh");
    write_file(&script, imgbuild::backup::QUIESCE_SCRIPT, 0o755);
    let mut cmd = vm.command("bash");
    cmd.arg(&script)
        .env("IMGBUILD_MOUNT_POINT", "/mnt/chroma")
        .env("IMGBUILD_DATA_SUBDIR", "data")
        .env("IMGBUILD_LOCK_NAME", ".imgbuild-writer.lock")
        .env("IMGBUILD_VERSION_NAME", ".imgbuild-chroma-version")
        .env("IMGBUILD_COPY_NAME", imgbuild::backup::COPY_NAME)
        .env("IMGBUILD_TOKEN", token)
        .env("IMGBUILD_LOCK_WAIT_SECS", lock_wait);
    let out = cmd.output().unwrap();
    (out.status, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A consistent copy needs no writer: SQLite on NFS takes one, and AWS Backup copies an EFS file
/// system while it changes (AWS Backup Developer Guide, "Amazon EFS backups": a backup is not a
/// point-in-time snapshot of a file system in use). The script stops the unit, takes the writer
/// lock itself, copies, and starts Chroma again, reporting how long it was down.
#[test]
fn quiesce_stops_chroma_copies_the_data_under_the_writer_lock_and_starts_it_again() {
    for config in [Config::default(), docker_nfs()] {
        let efs = efs_dir();
        let vm = Instance::new(&config, efs.path(), stack_metadata()).baked();
        let r = render_with(&config, None, Mode::Baked, Format::CloudConfig, false);
        assert!(boot_status(&vm.cloud_init(&r)).1.success(), "{}", vm.journal());
        assert!(vm.serving());
        std::fs::write(efs.path().join("data/chroma.sqlite3"), "SQLite format 3\0collections").unwrap();
        std::fs::create_dir_all(efs.path().join("data/4f1e0b2c-segment")).unwrap();
        std::fs::write(efs.path().join("data/4f1e0b2c-segment/data_level0.bin"), [7u8; 4096]).unwrap();

        let (status, out, err) = quiesce(&vm, "tok-1", "10");
        assert!(status.success(), "{out}\n{err}\n{}", vm.journal());
        let result = out.lines().last().unwrap();
        let q = imgbuild::backup::parse_quiesced(&out, "tok-1").unwrap();
        assert!(q.was_running && q.chroma_version == "1.5.9", "{result}");
        assert!(q.bytes >= 4096, "{result}");

        let copy = efs.path().join(imgbuild::backup::COPY_NAME);
        assert_eq!(read(&copy.join("data/chroma.sqlite3")), "SQLite format 3\0collections");
        assert_eq!(std::fs::read(copy.join("data/4f1e0b2c-segment/data_level0.bin")).unwrap(), [7u8; 4096]);
        assert_eq!(read(&copy.join(".imgbuild-chroma-version")), "1.5.9\n");
        assert!(read(&copy.join("manifest")).starts_with("token=tok-1\nversion=1.5.9\n"));

        let calls = vm.calls();
        let stop = index(&calls, "systemctl stop chroma.service");
        let start = calls.iter().rposition(|c| c == "systemctl start chroma.service").unwrap();
        assert!(stop < start, "{calls:#?}");
        wait_for(|| vm.serving(), "Chroma to serve again after the copy");
        assert_eq!(vm.up(), "lock held\nefs mounted\n", "the restarted Chroma holds the lock again");

        // A second copy replaces the first whole.
        std::fs::write(efs.path().join("data/chroma.sqlite3"), "SQLite format 3\0more").unwrap();
        let (status, out, _) = quiesce(&vm, "tok-2", "10");
        assert!(status.success(), "{out}");
        assert_eq!(read(&copy.join("data/chroma.sqlite3")), "SQLite format 3\0more");
        assert!(!efs.path().join(format!("{}.old", imgbuild::backup::COPY_NAME)).exists());
        wait_for(|| vm.serving(), "Chroma to serve again");
        assert_eq!(vm.stop(), 0);
    }
}

/// Another instance holding the writer lock (an instance replacement under way) means a copy
/// would not be consistent: the script makes none, fails, and this instance's Chroma is started
/// again.
#[test]
fn quiesce_makes_no_copy_while_another_writer_holds_the_lock_and_restarts_chroma() {
    let config = Config::default();
    let efs = efs_dir();
    let vm = Instance::new(&config, efs.path(), stack_metadata()).baked();
    let r = render_with(&config, None, Mode::Baked, Format::CloudConfig, false);
    assert!(boot_status(&vm.cloud_init(&r)).1.success());
    assert!(vm.serving());
    // The other writer: a real flock on the same lock file, taken once this instance's Chroma is
    // stopped (the stub then lets go), held longer than the script waits.
    let lock = efs.path().join(".imgbuild-writer.lock");
    std::fs::write(vm.state.join("stop"), "").unwrap();
    vm.unit_exit();
    std::fs::remove_file(vm.state.join("stop")).unwrap();
    // One process holds it (bash execs sleep with fd 9 open), so killing it frees the lock.
    let mut other = Command::new("bash").args(["-c", r#"exec 9>>"$1"; flock 9; exec sleep 20"#, "other"]).arg(&lock).spawn().unwrap();
    wait_for(|| Command::new("flock").args(["-n"]).arg(&lock).arg("true").status().is_ok_and(|s| !s.success()), "the other writer's lock");
    // Chroma of this instance back up without the lock, as far as the stub knows.
    std::fs::write(vm.state.join("chroma-up"), "").unwrap();
    let (status, out, err) = quiesce(&vm, "tok-3", "1");
    let _ = other.kill();
    let _ = other.wait();
    assert!(!status.success(), "{out}");
    assert!(err.contains("another instance holds the writer lock"), "{err}");
    assert!(out.contains("IMGBUILD_RESULT status=failed token=tok-3"), "{out}");
    assert!(imgbuild::backup::parse_quiesced(&out, "tok-3").is_err());
    assert!(!efs.path().join(imgbuild::backup::COPY_NAME).exists(), "no copy was made");
    assert!(vm.calls().iter().any(|c| c == "systemctl start chroma.service"), "Chroma is started again: {:#?}", vm.calls());
    wait_for(|| vm.up().starts_with("lock held"), "Chroma to take the lock once the other writer is gone");
    assert_eq!(vm.stop(), 0);
}

// ---------------------------------------------------------------------------------------------
// The restore's promote script (backup/promote.sh).

/// Runs the promote script on `vm` for a restored file system whose content is `restored`.
fn promote(vm: &Instance, restored: &Path, token: &str) -> (ExitStatus, String, String) {
    // The mount stub records the mount; the directory itself is the restored file system.
    let at = vm.path(&format!("/mnt/imgbuild-restore-{token}"));
    std::fs::create_dir_all(at.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(restored, &at).unwrap();
    let script = vm.path("/tmp/promote.sh");
    write_file(&script, imgbuild::backup::restore::PROMOTE_SCRIPT, 0o755);
    let mut cmd = vm.command("bash");
    cmd.arg(&script)
        .env("IMGBUILD_FILE_SYSTEM_ID", "fs-0fedcba9876543210")
        .env("IMGBUILD_MOUNT_ARGS", "-t efs -o tls,iam fs-0fedcba9876543210:/")
        .env("IMGBUILD_RESTORE_MOUNT", format!("/mnt/imgbuild-restore-{token}"))
        .env("IMGBUILD_DATA_SUBDIR", "data")
        .env("IMGBUILD_VERSION_NAME", ".imgbuild-chroma-version")
        .env("IMGBUILD_COPY_NAME", imgbuild::backup::COPY_NAME)
        .env("IMGBUILD_TOKEN", token);
    let out = cmd.output().unwrap();
    (out.status, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// AWS Backup restores an EFS file system into `aws-backup-restore_<datetime>` off its root,
/// never over the root (AWS Backup Developer Guide, "Restore an Amazon EFS file system"). Left
/// that way, the boot's guard refuses to serve (a database outside `data`). The promote script
/// moves the consistent copy into `data`, and an instance booting on it then serves it.
#[test]
fn promote_moves_the_consistent_copy_into_place_and_the_boot_then_serves_it() {
    let config = Config::default();
    let restored = efs_dir();
    let r = restored.path().join("aws-backup-restore_2026-11-29T13-40-00-000Z");
    std::fs::create_dir_all(r.join(".imgbuild-backup/data")).unwrap();
    std::fs::create_dir_all(r.join("data")).unwrap();
    std::fs::write(r.join(".imgbuild-backup/data/chroma.sqlite3"), "consistent").unwrap();
    std::fs::write(r.join(".imgbuild-backup/.imgbuild-chroma-version"), "1.5.9\n").unwrap();
    std::fs::write(r.join("data/chroma.sqlite3"), "torn while serving").unwrap();

    let live = efs_dir();
    let vm = Instance::new(&config, live.path(), stack_metadata()).baked();
    let (status, out, err) = promote(&vm, restored.path(), "tok-r");
    assert!(status.success(), "{out}\n{err}");
    let p = imgbuild::backup::restore::parse_promoted(&out, "tok-r").unwrap();
    assert_eq!((p.kind.as_str(), p.chroma_version.as_str()), ("consistent", "1.5.9"));
    assert_eq!(read(&restored.path().join("data/chroma.sqlite3")), "consistent");
    assert_eq!(read(&restored.path().join(".imgbuild-chroma-version")), "1.5.9\n");
    let calls = vm.calls();
    assert!(calls.iter().any(|c| c.starts_with("mount -t efs -o tls,iam fs-0fedcba9876543210:/ ")), "{calls:#?}");
    assert!(calls.iter().any(|c| c.starts_with("umount ")), "the restored file system is unmounted again: {calls:#?}");
    assert!(std::fs::read_dir(live.path()).unwrap().next().is_none(), "the live file system is untouched");

    // A new instance on the restored file system passes the guards and serves the copy.
    let next = Instance::new(&config, restored.path(), stack_metadata()).baked();
    let rendered = render_with(&config, None, Mode::Baked, Format::CloudConfig, false);
    let results = next.cloud_init(&rendered);
    assert!(boot_status(&results).1.success(), "{}", next.journal());
    assert!(next.serving());
    assert_eq!(next.stop(), 0);

    // Run again on the same file system it refuses: it is no longer a fresh restore.
    let again = Instance::new(&config, live.path(), stack_metadata()).baked();
    let (status, out, err) = promote(&again, restored.path(), "tok-s");
    assert!(!status.success() && err.contains("not a fresh restore"), "{out}\n{err}");
}

/// A point of the daily plan has no consistent copy: the data directory as it was caught is used.
#[test]
fn promote_uses_the_live_data_of_a_scheduled_point() {
    let config = Config::default();
    let restored = efs_dir();
    let r = restored.path().join("aws-backup-restore_2026-11-29T05-00-00-000Z");
    std::fs::create_dir_all(r.join("data")).unwrap();
    std::fs::write(r.join("data/chroma.sqlite3"), "as served").unwrap();
    std::fs::write(r.join(".imgbuild-chroma-version"), "1.5.9\n").unwrap();
    let live = efs_dir();
    let vm = Instance::new(&config, live.path(), stack_metadata()).baked();
    let (status, out, err) = promote(&vm, restored.path(), "tok-l");
    assert!(status.success(), "{out}\n{err}");
    assert_eq!(imgbuild::backup::restore::parse_promoted(&out, "tok-l").unwrap().kind, "live");
    assert_eq!(read(&restored.path().join("data/chroma.sqlite3")), "as served");
}

// ---------------------------------------------------------------------------------------------
// backup -> restore --verify, every instance-side step executed: a real Chroma (PyPI chromadb on
// loopback) writes the data, the quiesce script copies it, AWS Backup's restore layout is laid
// down, the promote script moves it into place, and the inspect script (read-only mount, the
// throw-away Chroma's `docker run`, then Chroma's own API) lists it from a real Chroma serving
// the restored copy.

/// POSTs JSON to Chroma's v2 API; returns the answer.
fn chroma_post(base: &str, path: &str, body: serde_json::Value) -> serde_json::Value {
    let url = format!("{base}/api/v2/tenants/default_tenant/databases/default_database{path}");
    ureq::post(&url).send_json(&body).unwrap_or_else(|e| panic!("POST {url}: {e}")).body_mut().read_json().unwrap()
}

/// The inspect script on `vm`: against `url` directly, or (with `restored`) in throw-away mode on
/// a read-only mount of `restored` whose Chroma answers on `port`.
fn inspect(vm: &Instance, token: &str, url: Option<&str>, restored: Option<(&Path, u16)>) -> (ExitStatus, String, String) {
    let script = vm.path("/tmp/inspect.sh");
    write_file(&script, imgbuild::backup::inventory::INSPECT_SCRIPT, 0o755);
    let mut cmd = vm.command("bash");
    cmd.arg(&script)
        .env("IMGBUILD_TOKEN", token)
        .env("IMGBUILD_API_PREFIX", "/api/v2")
        .env("IMGBUILD_HEARTBEAT_PATH", "/api/v2/heartbeat")
        .env("IMGBUILD_CONTAINER_PORT", "8000")
        .env("IMGBUILD_CONTAINER_DATA", "/data")
        .env("IMGBUILD_IMAGE", "ghcr.io/chroma-core/chroma:1.5.9")
        .env("IMGBUILD_CHROMA_ENV", "");
    if let Some(url) = url {
        cmd.env("IMGBUILD_CHROMA_URL", url);
    }
    if let Some((dir, port)) = restored {
        let at = vm.path(&format!("/mnt/imgbuild-verify-{token}"));
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(dir, &at).unwrap();
        cmd.env("IMGBUILD_SOURCE_ROOT", format!("/mnt/imgbuild-verify-{token}"))
            .env("IMGBUILD_SOURCE_PATH", "data")
            .env("IMGBUILD_MOUNT_ARGS", "-t efs -o tls,iam fs-0fedcba9876543210:/")
            .env("IMGBUILD_INSPECT_PORT", port.to_string());
    }
    let out = cmd.output().unwrap();
    (out.status, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Waits until nothing listens on `url` any more (the server was stopped).
fn wait_stopped(url: &str) {
    let addr: std::net::SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    wait_for(|| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err(), "Chroma to stop");
}

#[test]
fn backup_then_restore_verify_finds_the_same_collections_and_counts_in_a_real_chroma() {
    use imgbuild::backup::inventory;
    let config = Config::default();
    let efs = efs_dir();
    std::fs::create_dir_all(efs.path().join("data")).unwrap();

    // Chroma writes the data on the file system: three collections, 3, 5 and 0 records.
    let Some(live) = crate::services::chroma_on(&efs.path().join("data")) else { return };
    for (name, n) in [("docs", 3usize), ("notes", 5), ("empty", 0)] {
        let c = chroma_post(&live.url, "/collections", serde_json::json!({ "name": name }));
        let id = c["id"].as_str().unwrap().to_string();
        if n > 0 {
            let ids: Vec<String> = (0..n).map(|i| format!("{name}-{i}")).collect();
            let embeddings: Vec<Vec<f32>> = (0..n).map(|i| vec![i as f32, 1.0, 0.5]).collect();
            chroma_post(&live.url, &format!("/collections/{id}/add"), serde_json::json!({ "ids": ids, "embeddings": embeddings }));
        }
    }

    // What the backup records (in production the throw-away Chroma reads the copy; the same
    // inventory function is exercised below in that mode).
    let vm = Instance::new(&config, efs.path(), stack_metadata()).baked();
    let (status, out, err) = inspect(&vm, "tok-b", Some(&live.url), None);
    assert!(status.success(), "{out}\n{err}");
    let recorded = inventory::parse(&out, "tok-b").unwrap();
    assert_eq!(recorded, [("docs".to_string(), 3), ("empty".to_string(), 0), ("notes".to_string(), 5)].into_iter().collect());
    let tags = inventory::to_tags(&recorded);
    let url = live.url.clone();
    drop(live);
    wait_stopped(&url);

    // The consistent copy, taken under the writer lock while the (stub) unit is stopped.
    let r = render_with(&config, None, Mode::Baked, Format::CloudConfig, false);
    assert!(boot_status(&vm.cloud_init(&r)).1.success(), "{}", vm.journal());
    let (status, out, err) = quiesce(&vm, "tok-b", "10");
    assert!(status.success(), "{out}\n{err}");
    wait_for(|| vm.serving(), "Chroma to serve again");
    assert_eq!(vm.stop(), 0);

    // AWS Backup's full restore into a new file system: everything under
    // aws-backup-restore_<datetime> (AWS Backup Developer Guide, "Restore an Amazon EFS file
    // system").
    let restored = efs_dir();
    let into = restored.path().join("aws-backup-restore_2026-11-29T14-00-00-000Z");
    let cp = Command::new("cp").arg("-a").arg(efs.path()).arg(&into).status().unwrap();
    assert!(cp.success());
    let (status, out, err) = promote(&vm, restored.path(), "tok-p");
    assert!(status.success(), "{out}\n{err}");

    // verify: a real Chroma serves the restored copy; the inspect script mounts it read-only,
    // starts the throw-away container (the docker stub), and reads it through Chroma's API.
    let Some(copy) = crate::services::chroma_on(&restored.path().join("data")) else { return };
    let port: u16 = copy.url.rsplit(':').next().unwrap().parse().unwrap();
    let (status, out, err) = inspect(&vm, "tok-v", None, Some((restored.path(), port)));
    assert!(status.success(), "{out}\n{err}");
    let calls = vm.calls();
    assert!(calls.iter().any(|c| c.starts_with("mount -t efs -o tls,iam fs-0fedcba9876543210:/ -o ro ")), "mounted read-only: {calls:#?}");
    assert!(
        calls.iter().any(|c| c.starts_with(&format!("docker run -d --name imgbuild-inspect-tok-v -p 127.0.0.1:{port}:8000 -v "))
            && c.ends_with("ghcr.io/chroma-core/chroma:1.5.9")),
        "{calls:#?}"
    );
    assert!(calls.iter().any(|c| c == "docker rm -f imgbuild-inspect-tok-v"), "the throw-away Chroma is removed: {calls:#?}");
    let found = inventory::parse(&out, "tok-v").unwrap();
    let checks = inventory::compare(&inventory::from_tags(&tags).unwrap(), &found);
    assert_eq!(checks.len(), 3);
    assert!(checks.iter().all(|c| c.ok), "{checks:#?}");

    // A restored copy that lost a record fails that collection, and only that one.
    let c = chroma_post(&copy.url, "/collections", serde_json::json!({ "name": "notes", "get_or_create": true }));
    chroma_post(&copy.url, &format!("/collections/{}/delete", c["id"].as_str().unwrap()), serde_json::json!({ "ids": ["notes-0"] }));
    let (_, out, _) = inspect(&vm, "tok-w", Some(&copy.url), None);
    let checks = inventory::compare(&inventory::from_tags(&tags).unwrap(), &inventory::parse(&out, "tok-w").unwrap());
    let failed: Vec<_> = checks.iter().filter(|c| !c.ok).map(|c| (c.collection.as_str(), c.recorded, c.found)).collect();
    assert_eq!(failed, [("notes", Some(5), Some(4))]);
}

// ---------------------------------------------------------------------------------------------
// `imgbuild logs`: the diagnose script (backup/diagnose.sh), run as Run Command would.

/// Runs the diagnose script on `vm` with the settings `imgbuild logs` passes; returns its
/// sections as imgbuild splits them.
fn diagnose(vm: &Instance, config: &Config, token: &str) -> std::collections::BTreeMap<String, String> {
    let script = vm.path("/tmp/diagnose.sh");
    write_file(&script, imgbuild::backup::diagnose::DIAGNOSE_SCRIPT, 0o755);
    let mut cmd = vm.command("bash");
    cmd.arg(&script)
        .env("IMGBUILD_MOUNT_POINT", &config.storage.mount_point)
        .env("IMGBUILD_LOCK_NAME", imgbuild::render::LOCK_NAME)
        .env("IMGBUILD_VERSION_NAME", ".imgbuild-chroma-version")
        .env("IMGBUILD_COMPOSE", imgbuild::render::COMPOSE_PATH)
        .env("IMGBUILD_REFUSED", imgbuild::render::REFUSED_FILE)
        .env("IMGBUILD_INSTALL_MARKER", imgbuild::render::INSTALL_MARKER)
        .env("IMGBUILD_LINES", "50")
        .env("IMGBUILD_TOKEN", token);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "the diagnose script never fails: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (sections, complete) = imgbuild::backup::diagnose::sections(&stdout, token);
    assert!(complete, "no end line for {token}: {stdout}");
    sections
}

/// The script Run Command runs passes shellcheck (bash, as the one line Run Command gets pipes
/// it to `bash -s`).
#[test]
fn the_diagnose_script_passes_shellcheck() {
    let tools = if validators_required() { imgbuild::check::userdata::Tools::Required } else { imgbuild::check::userdata::Tools::IfInstalled };
    let report = imgbuild::check::userdata::validate_script("backup/diagnose.sh", imgbuild::backup::diagnose::DIAGNOSE_SCRIPT, tools);
    assert!(report.ok(), "{:#?}", report.checks);
}

/// On a serving instance: EFS mounted, the writer lock held (by the unit, through compose), the
/// install complete, no refusal, the unit active; the journal, compose's view and the container's
/// lines are there; credentials in cloud-init's output are masked on the instance already
/// (AWS_* variables, IMDSv2 tokens: EC2 User Guide, "Use the Instance Metadata Service",
/// `X-aws-ec2-metadata-token`). Once Chroma stops, the lock shows free.
#[test]
fn diagnose_reports_mount_lock_guard_and_logs_of_a_serving_instance_with_credentials_masked() {
    for config in [Config::default(), docker_nfs()] {
        let efs = efs_dir();
        let vm = Instance::new(&config, efs.path(), stack_metadata()).baked();
        let r = render_with(&config, None, Mode::Baked, Format::CloudConfig, false);
        assert!(boot_status(&vm.cloud_init(&r)).1.success(), "{}", vm.journal());
        assert!(vm.serving());
        write_file(
            &vm.path("/var/log/cloud-init-output.log"),
            "Cloud-init v. 22.2.2 running 'modules:final'\nexport AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n\
             curl -H X-aws-ec2-metadata-token: AQAEAFTNrA4eEGx0AQgJ1arIq_Cc-t4tWt3fB0Hd8RKhXlKc5ccvhg==\nCloud-init v. 22.2.2 finished\n",
            0o644,
        );
        std::fs::write(vm.state.join("container.log"), "chroma-1  | Listening on 0.0.0.0:8000\n").unwrap();
        write_file(&vm.path("/run/cloud-init/result.json"), "{\"v1\": {\"errors\": []}}\n", 0o644);

        let before = vm.calls().len();
        let s = diagnose(&vm, &config, "tok-l1");
        // Read-only: the script asked systemd and compose, and changed nothing.
        let made: Vec<String> = vm.calls().split_off(before);
        assert!(
            made.iter().all(|c| c == "systemctl is-active --quiet chroma.service"
                || c.starts_with("mountpoint ")
                || c.starts_with("journalctl ")
                || c.ends_with(" ps --all")
                || c.contains(" logs --no-color ")),
            "{made:#?}"
        );
        assert_eq!(s["mount"], "mounted: /mnt/chroma\n");
        assert_eq!(s["writer-lock"], "held: /mnt/chroma/.imgbuild-writer.lock\ndata last opened by Chroma 1.5.9\n");
        assert_eq!(
            s["boot-guard"],
            "install: complete (ghcr.io/chroma-core/chroma:1.5.9)\nno refusal\nchroma.service: active\ncloudwatch agent: running, configured from /etc/imgbuild/cloudwatch-agent.json\n"
        );
        assert_eq!(s["compose-ps"], "chroma-chroma-1  running\n");
        assert_eq!(s["chroma-container"], "chroma-1  | Listening on 0.0.0.0:8000\n");
        assert!(s["chroma-journal"].contains("imgbuild-start: EFS mounted on"), "{}", s["chroma-journal"]);
        assert!(s["cloud-init-status"].contains("/run/cloud-init/result.json:\n{\"v1\": {\"errors\": []}}"), "{}", s["cloud-init-status"]);
        assert!(s["cloud-init-status"].contains("/run/cloud-init/status.json: missing"));
        let out = &s["cloud-init-output"];
        assert!(out.contains("AWS_SECRET_ACCESS_KEY=<redacted>") && out.contains("X-aws-ec2-metadata-token: <redacted>"), "{out}");
        assert!(!out.contains("wJalrXUtnFEMI") && !out.contains("AQAEAFTNrA4e"), "{out}");
        assert!(out.contains("finished"), "the rest of the log stays: {out}");

        assert_eq!(vm.stop(), 0);
        let s = diagnose(&vm, &config, "tok-l2");
        assert_eq!(s["writer-lock"], "free: /mnt/chroma/.imgbuild-writer.lock (no writer holds it)\ndata last opened by Chroma 1.5.9\n");
        assert!(s["boot-guard"].contains("chroma.service: not active\n"), "{}", s["boot-guard"]);
        assert_eq!(s["compose-ps"], "chroma-chroma-1  exited\n");
    }
}

/// A guard's refusal (data from a newer Chroma) is the boot guard's verdict, word for word as
/// start.sh left it in /run/imgbuild/refused.
#[test]
fn diagnose_reports_the_boot_guards_refusal() {
    let config = Config::default();
    let efs = efs_dir();
    std::fs::write(efs.path().join(".imgbuild-chroma-version"), "1.10.0\n").unwrap();
    let vm = Instance::new(&config, efs.path(), stack_metadata()).baked();
    let results = vm.cloud_init(&render_with(&config, None, Mode::Baked, Format::CloudConfig, false));
    assert!(!boot_status(&results).1.success());
    assert_eq!(vm.unit_exit(), 3);
    let s = diagnose(&vm, &config, "tok-l3");
    let guard = &s["boot-guard"];
    assert!(guard.starts_with("install: complete"), "{guard}");
    assert!(guard.contains("refused: ") && guard.contains("last opened by Chroma 1.10.0, newer than this image's 1.5.9"), "{guard}");
    assert!(guard.contains("chroma.service: not active\n"), "{guard}");
    assert!(s["writer-lock"].starts_with("free: "), "{}", s["writer-lock"]);
}

// ---------------------------------------------------------------------------------------------
// The CloudWatch agent (issue 15, alarms): started by the boot, never in Chroma's way.

fn agent_call(vm: &Instance) -> Option<String> {
    vm.calls().into_iter().find(|c| c.starts_with("amazon-cloudwatch-agent-ctl "))
}

/// Happy path, both formats: the boot writes the agent's config (memory, root disk, the group
/// dimension; no credentials) and starts the agent with fetch-config in ec2 mode (CloudWatch
/// User Guide, "Start the CloudWatch agent using the command line": `amazon-cloudwatch-agent-ctl
/// -a fetch-config -m ec2 -s -c file:PATH`); Chroma serves and the verdict says running.
#[test]
fn the_boot_starts_the_cloudwatch_agent_with_its_config_and_chroma_serves() {
    for format in FORMATS {
        let config = Config::default();
        let efs = efs_dir();
        let vm = Instance::new(&config, efs.path(), stack_metadata()).baked();
        let results = vm.cloud_init(&render_with(&config, None, Mode::Baked, format, false));
        let (_, status, err) = boot_status(&results);
        assert!(status.success(), "{err}");
        assert!(vm.serving());
        assert_eq!(vm.signals(), [signal("SUCCESS")]);
        let cfg = vm.path(imgbuild::render::AGENT_CONFIG);
        assert_eq!(agent_call(&vm).unwrap(), format!("amazon-cloudwatch-agent-ctl -a fetch-config -m ec2 -s -c file:{}", cfg.display()));
        let doc: serde_json::Value = serde_json::from_str(&read(&vm.state.join("agent-config.json"))).unwrap();
        assert_eq!(doc["metrics"]["namespace"], "CWAgent");
        assert_eq!(doc["metrics"]["metrics_collected"]["mem"]["measurement"], serde_json::json!(["mem_used_percent"]));
        assert_eq!(doc["metrics"]["metrics_collected"]["disk"]["measurement"], serde_json::json!(["used_percent"]));
        assert_eq!(doc["metrics"]["metrics_collected"]["disk"]["resources"], serde_json::json!(["/"]));
        assert_eq!(doc["metrics"]["append_dimensions"]["AutoScalingGroupName"], "${aws:AutoScalingGroupName}");
        assert_eq!(doc["metrics"]["aggregation_dimensions"], serde_json::json!([["AutoScalingGroupName"]]));
        let text = doc.to_string().to_lowercase();
        assert!(!text.contains("credential") && !text.contains("access_key") && !text.contains("secret"), "{text}");
        assert_eq!(read(&vm.path(imgbuild::render::AGENT_STATUS_FILE)), "running, configured from /etc/imgbuild/cloudwatch-agent.json\n");
        assert!(err.contains("imgbuild-boot: CloudWatch agent: running"), "{err}");
        assert_eq!(vm.stop(), 0);
    }
}

/// A missing agent (an image baked before it was added) or a failing one (no route to
/// CloudWatch, a bad config) must not keep Chroma from serving: the boot still signals SUCCESS,
/// says why the alarms get no data in the boot log (cloud-init-output.log) and leaves the verdict
/// `imgbuild logs` shows under the boot guard.
#[test]
fn a_missing_or_failing_cloudwatch_agent_is_reported_and_chroma_still_serves() {
    let config = Config::default();
    for case in ["missing", "failing"] {
        let efs = efs_dir();
        let vm = Instance::new(&config, efs.path(), stack_metadata()).baked();
        let vm = if case == "missing" { vm.without_agent() } else { vm };
        if case == "failing" {
            std::fs::write(vm.state.join("agent-fails"), "").unwrap();
        }
        let results = vm.cloud_init(&render_with(&config, None, Mode::Baked, Format::CloudConfig, false));
        let (_, status, err) = boot_status(&results);
        assert!(status.success(), "{case}: {err}");
        assert!(vm.serving(), "{case}");
        assert_eq!(vm.signals(), [signal("SUCCESS")], "{case}");
        let verdict = read(&vm.path(imgbuild::render::AGENT_STATUS_FILE));
        let expected = match case {
            "missing" => "warning: missing (no /opt/aws/amazon-cloudwatch-agent/bin/amazon-cloudwatch-agent-ctl); the memory and disk alarms get no data\n",
            _ => "warning: failed (exit 1: E! could not reach the CloudWatch endpoint); the memory and disk alarms get no data\n",
        };
        assert_eq!(verdict, expected, "{case}");
        assert!(err.contains(&format!("imgbuild-boot: CloudWatch agent: {}", expected.trim_end())), "{case}: {err}");
        assert_eq!(agent_call(&vm).is_some(), case == "failing");
        let s = diagnose(&vm, &config, "tok-cw");
        assert!(s["boot-guard"].ends_with(&format!("cloudwatch agent: {expected}")), "{case}: {}", s["boot-guard"]);
        assert_eq!(vm.stop(), 0);
    }
}

/// `alarms.enabled: false`: no agent config is written, the agent is not started, and nothing
/// about it in the boot log.
#[test]
fn with_alarms_off_the_boot_leaves_the_agent_alone() {
    let config = parse("alarms:\n  enabled: false\n");
    let efs = efs_dir();
    let vm = Instance::new(&config, efs.path(), stack_metadata()).baked();
    let r = render_with(&config, None, Mode::Baked, Format::CloudConfig, false);
    assert!(!r.cloud_config.contains(imgbuild::render::AGENT_CONFIG));
    let results = vm.cloud_init(&r);
    let (_, status, err) = boot_status(&results);
    assert!(status.success(), "{err}");
    assert!(agent_call(&vm).is_none());
    assert!(!vm.path(imgbuild::render::AGENT_STATUS_FILE).exists());
    assert!(!err.contains("CloudWatch agent"), "{err}");
    let s = diagnose(&vm, &config, "tok-cw-off");
    assert!(s["boot-guard"].contains("cloudwatch agent: not started by the boot"), "{}", s["boot-guard"]);
    assert_eq!(vm.stop(), 0);
}
