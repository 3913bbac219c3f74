//! Deploy at a real prompt: the binary runs under `script`, which gives it a pseudo-terminal, so
//! it asks before executing; the test answers, or types Ctrl-C (the terminal turns ^C into
//! SIGINT for the process, as a keyboard does). What exists afterwards is read from moto.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::services;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/moto-stack.yaml");

struct Session {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    output: Arc<Mutex<String>>,
    /// Reads the terminal until `script` ends; joined, so the output is complete when read.
    reader: std::thread::JoinHandle<()>,
}

/// Starts `imgbuild deploy` on a pseudo-terminal for project `name`.
fn deploy_on_a_terminal(name: &str, url: &str) -> Option<(Session, tempfile::TempDir)> {
    let script = crate::support::tool("script")?;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("imgbuild.yaml"), format!("name: {name}\nregion: us-east-1\naws:\n  poll_interval_secs: 1\n")).unwrap();
    let run = dir.path().join("run.sh");
    std::fs::write(&run, format!("exec '{}' --endpoint-url '{url}' deploy --no-tools --template '{FIXTURE}'\n", env!("CARGO_BIN_EXE_imgbuild"))).unwrap();
    let mut child = crate::support::hermetic(&mut Command::new(script))
        .args(["-qefc", &format!("bash '{}'", run.display()), "/dev/null"])
        .current_dir(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let output = Arc::new(Mutex::new(String::new()));
    let sink = output.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    Some((Session { child, stdin, output, reader }, dir))
}

impl Session {
    fn wait_for(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.output.lock().unwrap().contains(text) {
            assert!(Instant::now() < deadline, "never saw {text:?}:\n{}", self.output.lock().unwrap());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn type_in(&mut self, bytes: &[u8]) {
        self.stdin.write_all(bytes).unwrap();
        self.stdin.flush().unwrap();
    }

    fn finish(mut self) -> (Option<i32>, String) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "deploy did not end:\n{}", self.output.lock().unwrap());
            std::thread::sleep(Duration::from_millis(50));
        };
        drop(self.stdin);
        self.reader.join().expect("the terminal reader");
        let out = self.output.lock().unwrap().clone();
        (status.code(), out)
    }
}

fn stack_status(url: &str, stack: &str) -> Option<String> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
        let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(url)
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_cloudformation::config::Credentials::new("testing", "testing", None, None, "tests"))
            .load()
            .await;
        let cfn = aws_sdk_cloudformation::Client::new(&conf);
        imgbuild::stack::describe(&cfn, stack).await.unwrap().map(|s| imgbuild::stack::status_of(&s))
    })
}

#[test]
fn ctrl_c_at_the_prompt_deletes_the_pending_change_set_and_the_empty_stack() {
    let Some(moto) = services::moto() else { return };
    let Some((mut s, _dir)) = deploy_on_a_terminal("ctrlc", &moto.url) else { return };
    s.wait_for("[y/N]");
    assert_eq!(stack_status(&moto.url, "ctrlc").as_deref(), Some("REVIEW_IN_PROGRESS"), "the change set is pending");
    s.type_in(b"\x03");
    let (code, out) = s.finish();
    assert_eq!(code, Some(130), "{out}");
    assert!(out.contains("interrupted; cleaned up: deleted change set"), "{out}");
    assert!(out.contains("deleted the empty stack ctrlc (REVIEW_IN_PROGRESS)"), "{out}");
    assert_eq!(stack_status(&moto.url, "ctrlc"), None);
}

#[test]
fn no_at_the_prompt_changes_nothing_and_yes_deploys() {
    let Some(moto) = services::moto() else { return };
    let Some((mut s, _dir)) = deploy_on_a_terminal("answered", &moto.url) else { return };
    s.wait_for("[y/N]");
    s.type_in(b"n\r");
    let (code, out) = s.finish();
    // Declining is a decision, not a usage error: the documented exit 4.
    assert_eq!(code, Some(4), "{out}");
    assert!(out.contains("declined: the change set was deleted and nothing changed"), "{out}");
    assert_eq!(stack_status(&moto.url, "answered"), None);

    let Some((mut s, _dir)) = deploy_on_a_terminal("answered", &moto.url) else { return };
    s.wait_for("[y/N]");
    s.type_in(b"y\r");
    let (code, out) = s.finish();
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(stack_status(&moto.url, "answered").as_deref(), Some("CREATE_COMPLETE"));
}
