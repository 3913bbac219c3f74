//! The validated context every command works from: the config and the global settings, each
//! checked once here, so commands work on values that are already known to be good. Takes plain
//! values (the command layer passes the flags in); knows nothing of the command line.

use std::path::Path;

use crate::config::{self, Config, Source};
use crate::error::{Error, Result};

/// What every command that reads the config works from.
#[derive(Debug, Clone)]
pub struct Context {
    pub config: Config,
    pub source: Source,
    /// `--region`, else `region:`; unset means "decided at deploy time".
    pub region: Option<String>,
    pub profile: Option<String>,
    pub endpoint_url: Option<String>,
}

impl Context {
    /// `path`: the config file asked for (`--config`), else `./imgbuild.yaml` when present, else
    /// the built-in defaults. `region`, `profile`, `endpoint_url`: the global flags.
    pub fn load(path: Option<&Path>, region: Option<&str>, profile: Option<&str>, endpoint_url: Option<&str>) -> Result<Self> {
        let (config, source) = config::load(path)?;
        if let Some(r) = region {
            config::check_region(r).map_err(|m| Error::Invalid(format!("--region: {m}")))?;
        }
        if let Some(url) = endpoint_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(Error::Invalid(format!("--endpoint-url: `{url}` is not an http:// or https:// URL")));
        }
        let region = region.map(str::to_string).or_else(|| config.region.clone());
        Ok(Self { config, source, region, profile: profile.map(str::to_string), endpoint_url: endpoint_url.map(str::to_string) })
    }
}
