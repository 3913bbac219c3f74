//! Where output goes: human text on stderr (quiet, normal, verbose), one JSON document on stdout,
//! and progress on long work (`progress`). Knows the shape of a validation report, nothing of AWS
//! or the command line.

pub mod progress;

use std::io::Write;

use crate::check::userdata::{Report, Status};
use crate::error::Error;

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
            eprintln!("{}", msg.as_ref());
        }
    }

    /// Detail shown with -v.
    pub fn detail(&self, msg: impl AsRef<str>) {
        if self.verbosity >= 1 {
            eprintln!("{}", msg.as_ref());
        }
    }

    pub fn warn(&self, msg: impl AsRef<str>) {
        if self.verbosity >= 0 {
            eprintln!("warning: {}", msg.as_ref());
        }
    }

    /// The machine-readable result, on stdout.
    pub fn emit_json(&self, value: &serde_json::Value) {
        let mut out = std::io::stdout().lock();
        // A closed pipe (`| head`) is not worth a panic.
        let _ = serde_json::to_writer_pretty(&mut out, value);
        let _ = writeln!(out);
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
                eprintln!("{title}: {mark} {}: {}", c.name, c.detail.replace('\n', "\n      "));
            }
        }
    }

    /// The last word on a failed command.
    pub fn error(&self, err: &Error) {
        if self.json() {
            self.emit_json(&serde_json::json!({
                "ok": false,
                "error": { "kind": err.kind(), "message": err.to_string(), "exit_code": err.exit_code() },
            }));
        }
        eprintln!("error: {err}");
    }
}
