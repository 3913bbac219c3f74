//! imgbuild: renders, bakes and deploys a private ChromaDB on AWS.
//!
//! The binary is a thin shell over [`commands::run`]; everything is testable in-process.

pub mod automation;
pub mod aws;
pub mod bake;
pub mod chroma;
pub mod cli;
pub mod commands;
pub mod compose;
pub mod config;
pub mod deploy;
pub mod doctor;
pub mod error;
pub mod guard;
pub mod images;
pub mod ops;
pub mod plan;
pub mod progress;
pub mod remote;
pub mod render;
pub mod smoke;
pub mod stack;
pub mod template;
pub mod ui;
pub mod validate;
pub(crate) mod yaml_lines;

pub use error::{Error, Result};
