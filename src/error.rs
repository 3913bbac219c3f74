//! The one error type of imgbuild, and the exit code each kind maps to.
//!
//! Exit codes (documented in the README and `--help`):
//! - 0: success
//! - 1: the operation failed (I/O, an external tool, AWS)
//! - 2: usage error or invalid input (flags, config, templates, rendered output that fails validation)
//! - 3: the stack operation failed and CloudFormation rolled it back
//! - 4: declined at a confirmation prompt; nothing was changed
//! - 130: interrupted (Ctrl-C); what was cleaned up is said
//! - 141: stdout or stderr was a closed pipe (`| head -1`); nothing more is said

use std::fmt;
use std::path::PathBuf;

pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_INVALID: u8 = 2;
pub const EXIT_STACK_FAILED: u8 = 3;
pub const EXIT_DECLINED: u8 = 4;
pub const EXIT_INTERRUPTED: u8 = 130;

/// One problem in a config file, located by field path and (where known) line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FieldError {
    /// Dotted path of the field, e.g. `chroma.port`; empty for the document itself.
    pub field: String,
    pub line: Option<usize>,
    pub message: String,
}

/// Every problem found in one config file, reported together.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConfigErrors {
    pub file: String,
    pub errors: Vec<FieldError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        write!(f, "{} has {n} error{}:", self.file, if n == 1 { "" } else { "s" })?;
        for e in &self.errors {
            let at = match (e.line, e.field.is_empty()) {
                (Some(line), false) => format!("line {line}, `{}`", e.field),
                (Some(line), true) => format!("line {line}"),
                (None, false) => format!("`{}`", e.field),
                (None, true) => "document".to_string(),
            };
            write!(f, "\n  {}:{at}: {}", self.file, e.message)?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(ConfigErrors),

    /// A flag or value the user gave is not acceptable.
    #[error("{0}")]
    Invalid(String),

    /// Rendered output failed validation; the report names each failing check.
    #[error("{0}")]
    Validation(String),

    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// An external tool (a validator) could not be run or misbehaved.
    #[error("{0}")]
    Tool(String),

    /// An AWS call failed; `code` is the service's error code.
    #[error("{operation} on {resource} failed: {code}: {message}")]
    Aws { operation: &'static str, resource: String, code: String, message: String },

    /// The stack operation failed; CloudFormation rolled back. `failures` are the resources that
    /// failed, with CloudFormation's reason for each.
    #[error("stack {stack} ended in {status}{}", failures_text(failures))]
    StackFailed { stack: String, status: String, failures: Vec<String> },

    /// The bake's automation execution ended without an image.
    #[error("bake execution {execution} ended {status}: {detail}")]
    BakeFailed { execution: String, status: String, detail: String },

    /// The smoke test ran and a step failed.
    #[error("{0}")]
    SmokeFailed(String),

    /// A bounded wait ran out.
    #[error("gave up waiting for {what} after {secs}s ({hint})")]
    Timeout { what: String, secs: u64, hint: String },

    /// The user answered no at a confirmation prompt: not a usage error, nothing changed.
    #[error("{0}")]
    Declined(String),

    /// Ctrl-C. `cleaned` says what was removed on the way out.
    #[error("interrupted{}", cleaned_text(cleaned))]
    Interrupted { cleaned: Vec<String> },

    /// A template failed to render: a bug in imgbuild's templates, not in the user's input.
    #[error("template {template} failed to render: {source}")]
    Template {
        template: &'static str,
        #[source]
        source: askama::Error,
    },
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Invalid(_) | Error::Validation(_) => EXIT_INVALID,
            Error::Io { .. }
            | Error::Tool(_)
            | Error::Template { .. }
            | Error::Aws { .. }
            | Error::Timeout { .. }
            | Error::SmokeFailed(_)
            | Error::BakeFailed { .. } => EXIT_FAILURE,
            Error::StackFailed { .. } => EXIT_STACK_FAILED,
            Error::Declined(_) => EXIT_DECLINED,
            Error::Interrupted { .. } => EXIT_INTERRUPTED,
        }
    }

    /// A short stable name for `--output json`.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Config(_) => "config",
            Error::Invalid(_) => "invalid_input",
            Error::Validation(_) => "validation",
            Error::Io { .. } => "io",
            Error::Tool(_) => "tool",
            Error::Template { .. } => "template",
            Error::Aws { .. } => "aws",
            Error::SmokeFailed(_) => "smoke_failed",
            Error::BakeFailed { .. } => "bake_failed",
            Error::StackFailed { .. } => "stack_failed",
            Error::Timeout { .. } => "timeout",
            Error::Declined(_) => "declined",
            Error::Interrupted { .. } => "interrupted",
        }
    }

    /// A write to stdout found the pipe closed (`imgbuild man | head -1`).
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::BrokenPipe)
    }

    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { action, path: path.into(), source }
    }
}

fn failures_text(failures: &[String]) -> String {
    if failures.is_empty() { String::new() } else { format!(":\n  {}", failures.join("\n  ")) }
}

fn cleaned_text(cleaned: &[String]) -> String {
    if cleaned.is_empty() { "; nothing needed cleaning up".to_string() } else { format!("; cleaned up: {}", cleaned.join("; ")) }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
