//! Everything that depends on the Chroma version, in one table.
//!
//! Chroma changed its HTTP API, data directory and auth story across releases; every other module
//! asks this table instead of comparing versions itself, so a new row here is the whole change
//! when Chroma moves again.

use semver::Version;
use serde::Serialize;

/// Which HTTP API generations a release serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiVersions {
    V1Only,
    V1AndV2,
    /// v1 still answers, but with 410 Gone.
    V2Only,
}

/// One row of the table: a half-open version range and what it implies.
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    /// Lowest release in the row, inclusive.
    pub from: &'static str,
    /// First release past the row, exclusive.
    pub until: &'static str,
    pub api: ApiVersions,
    /// The API prefix clients should use (the newest the release serves).
    pub api_prefix: &'static str,
    pub heartbeat_path: &'static str,
    /// Where the server keeps its data inside the container.
    pub data_dir: &'static str,
    /// Whether the server has built-in authentication (1.x has none).
    pub builtin_auth: bool,
    /// Environment the container needs for persistence on the data dir.
    pub persistence_env: &'static [(&'static str, &'static str)],
}

const TABLE: &[Profile] = &[
    Profile {
        from: "0.4.0",
        until: "0.5.16",
        api: ApiVersions::V1Only,
        api_prefix: "/api/v1",
        heartbeat_path: "/api/v1/heartbeat",
        data_dir: "/chroma/chroma",
        builtin_auth: true,
        persistence_env: &[("IS_PERSISTENT", "TRUE"), ("PERSIST_DIRECTORY", "/chroma/chroma"), ("ANONYMIZED_TELEMETRY", "FALSE")],
    },
    Profile {
        from: "0.5.16",
        until: "0.7.0",
        api: ApiVersions::V1AndV2,
        api_prefix: "/api/v2",
        heartbeat_path: "/api/v2/heartbeat",
        data_dir: "/chroma/chroma",
        builtin_auth: true,
        persistence_env: &[("IS_PERSISTENT", "TRUE"), ("PERSIST_DIRECTORY", "/chroma/chroma"), ("ANONYMIZED_TELEMETRY", "FALSE")],
    },
    Profile {
        from: "1.0.0",
        until: "2.0.0",
        api: ApiVersions::V2Only,
        api_prefix: "/api/v2",
        heartbeat_path: "/api/v2/heartbeat",
        data_dir: "/data",
        builtin_auth: false,
        // The Rust server reads `persist_path` from /config.yaml, overlaid by CHROMA_* variables;
        // /data is its default, stated so the mount and the server cannot drift apart.
        persistence_env: &[("CHROMA_PERSIST_PATH", "/data")],
    },
];

/// A current 1.x release: the default when the config names none.
pub const DEFAULT_VERSION: &str = "1.5.9";

/// The image repository Chroma publishes to.
pub const IMAGE_REPOSITORY: &str = "ghcr.io/chroma-core/chroma";

/// The table row for `version`, or a sentence saying which versions exist.
pub fn profile(version: &Version) -> Result<&'static Profile, String> {
    TABLE
        .iter()
        .find(|row| {
            let from = Version::parse(row.from).expect("table bounds are valid versions");
            let until = Version::parse(row.until).expect("table bounds are valid versions");
            // Compare without pre-release tags so 1.0.0-rc1 lands in the 1.x row.
            let plain = Version::new(version.major, version.minor, version.patch);
            plain >= from && plain < until
        })
        .ok_or_else(|| format!("Chroma {version} is not supported; supported releases are {}", supported_ranges()))
}

/// The supported ranges as text, for error messages and `--help`.
pub fn supported_ranges() -> String {
    TABLE.iter().map(|row| format!("{} to before {}", row.from, row.until)).collect::<Vec<_>>().join(", ")
}

/// Parses a pinned release (`1.5.9`, `v0.4.13`); tags like `latest` are rejected because the
/// whole point of the table is to know what the image serves.
pub fn parse_version(text: &str) -> Result<Version, String> {
    let trimmed = text.strip_prefix('v').unwrap_or(text);
    // semver's own reason ("unexpected character 'l' while parsing major version number")
    // adds nothing the expected form does not say.
    Version::parse(trimmed).map_err(|_| format!("`{text}` is not a pinned Chroma release (expected MAJOR.MINOR.PATCH such as {DEFAULT_VERSION})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(v: &str) -> &'static Profile {
        profile(&parse_version(v).unwrap()).unwrap()
    }

    #[test]
    fn boundaries_follow_the_release_history() {
        assert_eq!(row("0.4.13").api, ApiVersions::V1Only);
        assert_eq!(row("0.5.15").api, ApiVersions::V1Only);
        assert_eq!(row("0.5.16").api, ApiVersions::V1AndV2);
        assert_eq!(row("0.6.3").api, ApiVersions::V1AndV2);
        assert_eq!(row("1.0.0").api, ApiVersions::V2Only);
        assert_eq!(row("1.5.9").data_dir, "/data");
        assert_eq!(row("0.4.13").data_dir, "/chroma/chroma");
        assert_eq!(row("0.4.13").heartbeat_path, "/api/v1/heartbeat");
        assert_eq!(row("1.0.0-rc.1").api, ApiVersions::V2Only);
        assert!(!row("1.5.9").builtin_auth);
    }

    #[test]
    fn unknown_and_unpinned_versions_are_refused() {
        assert!(profile(&parse_version("0.3.29").unwrap()).is_err());
        assert!(profile(&parse_version("0.7.0").unwrap()).is_err());
        assert!(profile(&parse_version("2.0.0").unwrap()).is_err());
        assert!(parse_version("latest").is_err());
        assert!(parse_version("1.5").is_err());
        assert_eq!(parse_version("v1.5.9").unwrap(), Version::new(1, 5, 9));
    }

    #[test]
    fn every_row_keeps_heartbeat_under_its_prefix() {
        for row in TABLE {
            assert!(row.heartbeat_path.starts_with(row.api_prefix), "{row:?}");
        }
    }
}
