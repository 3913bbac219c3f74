//! Loopback services the tests start themselves: a moto server (AWS APIs) and a Chroma server.
//! Each runs under a shell that kills it when this test process goes away (its stdin pipe
//! closes), so nothing outlives the tests.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::support::validators_required;

pub struct Service {
    pub url: String,
    _child: Mutex<Child>,
    _stdin: Mutex<ChildStdin>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Where the server listens: a port the test chose, or one the server bound itself (port 0) and
/// announced in its log as `Running on http://127.0.0.1:PORT` (werkzeug, moto's server).
enum Port {
    Chosen(u16),
    Announced,
}

fn start(name: &str, program: PathBuf, args: &[String], port: Port, ready: Duration) -> Service {
    let tag = match port {
        Port::Chosen(p) => p.to_string(),
        Port::Announced => format!("pid{}-{}", std::process::id(), name),
    };
    let log = std::env::temp_dir().join(format!("imgbuild-test-{name}-{tag}.log"));
    let script = format!("\"$0\" \"$@\" >'{}' 2>&1 & pid=$!; cat >/dev/null; kill $pid 2>/dev/null; wait $pid 2>/dev/null", log.display());
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(&program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        // moto's request recorder would write `moto_recording` into the work tree.
        .env("MOTO_RECORDER_FILEPATH", Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("moto_recording-{tag}")))
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
    let stdin = child.stdin.take().unwrap();
    let deadline = Instant::now() + ready;
    let log_text = || std::fs::read(&log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let port = match port {
        Port::Chosen(p) => p,
        Port::Announced => loop {
            let announced = log_text().lines().find_map(|l| l.split("Running on http://127.0.0.1:").nth(1).and_then(|p| p.trim().parse::<u16>().ok()));
            if let Some(p) = announced {
                break p;
            }
            if Instant::now() > deadline {
                panic!("{name} did not announce its port within {ready:?}:\n{}", log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        },
    };
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline {
            let text = std::fs::read(&log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
            panic!("{name} did not listen on {addr} within {ready:?}:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Service { url: format!("http://{addr}"), _child: Mutex::new(child), _stdin: Mutex::new(stdin) }
}

fn unavailable(program: &str) -> Option<&'static Service> {
    if validators_required() {
        panic!("{program} is not installed: run tests/run, which installs it into .venv (or set IMGBUILD_ALLOW_SKIPS=1 to skip)");
    }
    eprintln!("skipping (IMGBUILD_ALLOW_SKIPS=1): {program} is not installed (tests/run installs it into .venv)");
    None
}

/// The shared moto server, or None (skip) when moto is not installed and not required.
pub fn moto() -> Option<&'static Service> {
    static MOTO: OnceLock<Option<Service>> = OnceLock::new();
    MOTO.get_or_init(|| {
        let exe = tool_in_venv_quiet("moto_server")?;
        // Port 0: the server binds a free port itself, so no other process can take it between
        // choosing and binding.
        Some(start("moto", exe, &["-H".into(), "127.0.0.1".into(), "-p".into(), "0".into()], Port::Announced, Duration::from_secs(30)))
    })
    .as_ref()
    .or_else(|| unavailable("moto_server"))
}

/// A real Chroma server (PyPI chromadb, the default version) on loopback, with its own data dir.
pub fn chroma() -> Option<&'static Service> {
    static CHROMA: OnceLock<Option<Service>> = OnceLock::new();
    CHROMA
        .get_or_init(|| {
            let exe = tool_in_venv_quiet("chroma")?;
            let port = free_port();
            let dir = tempfile::tempdir().unwrap().keep();
            let args = ["run".into(), "--path".into(), dir.display().to_string(), "--host".into(), "127.0.0.1".into(), "--port".into(), port.to_string()];
            // Chroma announces the port it was given, not the one bound for port 0, so this one
            // is chosen here (a small window in which another process could take it).
            Some(start("chroma", exe, &args, Port::Chosen(port), Duration::from_secs(60)))
        })
        .as_ref()
        .or_else(|| unavailable("chroma"))
}

fn tool_in_venv_quiet(program: &str) -> Option<PathBuf> {
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin").join(program);
    if venv.is_file() {
        return Some(venv);
    }
    imgbuild::check::userdata::which(program)
}

/// A Chroma server of its own on `dir` (None: skip, as for `chroma()`); it stops when dropped.
pub fn chroma_on(dir: &Path) -> Option<Service> {
    let Some(exe) = tool_in_venv_quiet("chroma") else {
        unavailable("chroma");
        return None;
    };
    let port = free_port();
    let args = ["run".into(), "--path".into(), dir.display().to_string(), "--host".into(), "127.0.0.1".into(), "--port".into(), port.to_string()];
    Some(start("chroma", exe, &args, Port::Chosen(port), Duration::from_secs(60)))
}
