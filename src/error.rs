//! The one error type of imgbuild, and the exit code each kind maps to.
//!
//! Exit codes (documented in the README and `--help`):
//! - 0: success
//! - 1: the operation failed (I/O, an external tool, AWS)
//! - 2: usage error or invalid input (flags, config, templates, rendered output that fails validation)

use std::fmt;
use std::path::PathBuf;

pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_INVALID: u8 = 2;

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
            Error::Io { .. } | Error::Tool(_) | Error::Template { .. } => EXIT_FAILURE,
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
        }
    }

    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { action, path: path.into(), source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
