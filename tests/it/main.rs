//! The one integration-test binary: `cargo test --test it`.

mod cli;
mod render;
mod support;
mod validators;
