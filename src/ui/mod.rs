//! Where output goes: human text on stderr (quiet, normal, verbose), one JSON document on stdout,
//! and progress on long work (`progress`). Knows the shape of a validation report, nothing of AWS
//! or the command line.

pub mod progress;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::check::userdata::{Report, Status};
use crate::error::Error;

/// Set once the command's JSON document is out: the process writes exactly one.
static DOCUMENT_WRITTEN: AtomicBool = AtomicBool::new(false);
/// Set when stdout or stderr turned out to be a closed pipe (`| head -1`).
static PIPE_BROKEN: AtomicBool = AtomicBool::new(false);

/// Whether a write found stdout or stderr closed. The command then ends with the code a shell
/// gives a program killed by SIGPIPE (128 + 13), after finishing what it was doing: an AWS
/// operation half done because a reader went away would be worse than a lost message.
pub fn pipe_broken() -> bool {
    PIPE_BROKEN.load(Ordering::SeqCst)
}

/// The exit code of a command whose output pipe was closed.
pub const EXIT_BROKEN_PIPE: u8 = 141;

/// Notes a failed write; a closed pipe is remembered, nothing else is worth more than dropping
/// the message (there is nowhere left to report it).
pub fn note_write(result: std::io::Result<()>) {
    if let Err(e) = result
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        PIPE_BROKEN.store(true, Ordering::SeqCst);
    }
}

/// One line on stderr, never a panic (`eprintln!` panics when stderr is closed).
pub fn stderr_line(line: &str) {
    let mut err = std::io::stderr().lock();
    note_write(writeln!(err, "{line}").and_then(|_| err.flush()));
}

/// The `error` member of a JSON document for a failed command.
pub fn error_json(err: &Error) -> serde_json::Value {
    serde_json::json!({ "kind": err.kind(), "message": err.to_string(), "exit_code": err.exit_code() })
}

/// Text for people (stderr only), or one JSON document on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy)]
pub struct Ui {
    pub format: OutputFormat,
    /// -1 quiet, 0 normal, 1+ verbose.
    pub verbosity: i8,
}

impl Ui {
    pub fn new(format: OutputFormat, verbose: u8, quiet: bool) -> Self {
        let verbosity = if quiet { -1 } else { verbose.min(3) as i8 };
        Self { format, verbosity }
    }

    pub fn json(&self) -> bool {
        self.format == OutputFormat::Json
    }

    /// A line for people, on stderr.
    pub fn info(&self, msg: impl AsRef<str>) {
        if self.verbosity >= 0 {
            stderr_line(msg.as_ref());
        }
    }

    /// Detail shown with -v.
    pub fn detail(&self, msg: impl AsRef<str>) {
        if self.verbosity >= 1 {
            stderr_line(msg.as_ref());
        }
    }

    pub fn warn(&self, msg: impl AsRef<str>) {
        if self.verbosity >= 0 {
            stderr_line(&format!("warning: {}", msg.as_ref()));
        }
    }

    /// The machine-readable result, on stdout. A failed command puts its `error` (see
    /// [`error_json`]) in this same document: [`Ui::error`] then adds none of its own.
    pub fn emit_json(&self, value: &serde_json::Value) {
        DOCUMENT_WRITTEN.store(true, Ordering::SeqCst);
        let mut out = std::io::stdout().lock();
        note_write(serde_json::to_writer_pretty(&mut out, value).map_err(std::io::Error::from).and_then(|_| writeln!(out)).and_then(|_| out.flush()));
    }

    /// Prints a validation report: failures always, the rest unless quiet (passes only with -v).
    pub fn report(&self, title: &str, report: &Report) {
        for c in &report.checks {
            let (mark, show) = match c.status {
                Status::Pass => ("ok  ", self.verbosity >= 1),
                Status::Warn => ("warn", self.verbosity >= 0),
                Status::Skip => ("skip", self.verbosity >= 0),
                Status::Fail => ("FAIL", true),
            };
            if show {
                stderr_line(&format!("{title}: {mark} {}: {}", c.name, c.detail.replace('\n', "\n      ")));
            }
        }
    }

    /// The last word on a failed command. In JSON, the error is the document unless the
    /// command already wrote one (with the error in it): one document, always.
    pub fn error(&self, err: &Error) {
        if self.json() && !DOCUMENT_WRITTEN.load(Ordering::SeqCst) {
            self.emit_json(&serde_json::json!({ "ok": false, "error": error_json(err) }));
        }
        stderr_line(&format!("error: {err}"));
    }
}
