//! imgbuild: renders, bakes and deploys a private ChromaDB on AWS.
//!
//! The binary is a thin shell over [`cmd::run`]; everything is testable in-process.
//!
//! Layers, lowest first; a module imports only from the layers before it:
//! - `error`, `chroma` (the version table): leaves.
//! - `config`: the file format, defaults, line numbers, ids, and the validated [`config::Context`].
//! - `render`: the pure renderer (user-data, compose); no I/O, no AWS.
//! - `check`: every validator (user-data, automation document, guard policies).
//! - `ui`: text vs JSON output, progress.
//! - `aws`: clients, retries, error codes, built from plain [`aws::Settings`].
//! - `stack`: the CloudFormation engine (template, change set, events, waits, outputs).
//! - `bake`, `smoke`, `backup`: the image pipeline and images; the acceptance test; Chroma's data
//!   (consistent copies, AWS Backup jobs, recovery points). `cost`, beside them: the monthly cost
//!   of a change set, at the AWS Price List API's prices (asked, bounded) or a dated table's.
//! - `cli`: the raw arguments; `cmd`: one file per command, the only layer that sees both.

pub mod aws;
pub mod backup;
pub mod bake;
pub mod check;
pub mod chroma;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod cost;
pub mod error;
pub mod render;
pub mod smoke;
pub mod stack;
pub mod ui;

pub use error::{Error, Result};
