//! From raw arguments and config to a validated plan: every check on user input happens here,
//! so commands work on values that are already known to be good.

use std::path::PathBuf;

use crate::cli::{GlobalArgs, ToolArgs};
use crate::config::{self, Config, Source};
use crate::error::{Error, Result};
use crate::validate::Tools;

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
    pub fn load(global: &GlobalArgs) -> Result<Self> {
        let (config, source) = config::load(global.config.as_deref())?;
        if let Some(r) = &global.region {
            config::check_region(r).map_err(|m| Error::Invalid(format!("--region: {m}")))?;
        }
        if let Some(url) = &global.endpoint_url
            && !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(Error::Invalid(format!("--endpoint-url: `{url}` is not an http:// or https:// URL")));
            }
        let region = global.region.clone().or_else(|| config.region.clone());
        Ok(Self { config, source, region, profile: global.profile.clone(), endpoint_url: global.endpoint_url.clone() })
    }
}

pub fn tools(args: &ToolArgs) -> Tools {
    if args.no_tools {
        Tools::Off
    } else if args.require_tools {
        Tools::Required
    } else {
        Tools::IfInstalled
    }
}

/// Where `init` writes: its argument, else `--config`, else `./imgbuild.yaml`.
pub fn init_path(arg: Option<PathBuf>, global: &GlobalArgs) -> PathBuf {
    arg.or_else(|| global.config.clone()).unwrap_or_else(|| PathBuf::from(config::DEFAULT_FILE))
}
