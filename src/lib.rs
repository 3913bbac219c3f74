//! imgbuild: renders, bakes and deploys a private ChromaDB on AWS.
//!
//! The binary is a thin shell over [`commands::run`]; everything is testable in-process.

pub mod chroma;
pub mod cli;
pub mod commands;
pub mod compose;
pub mod config;
pub mod error;
pub mod plan;
pub mod render;
pub mod ui;
pub mod validate;
mod yaml_lines;

pub use error::{Error, Result};
