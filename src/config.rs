//! Configuration plumbing shared by the three daemons: the error type,
//! durations, the request-limit check, and reading the file.
//!
//! Each daemon owns its section: [`crate::proxy::config`],
//! [`crate::agent::config`], [`crate::api::config`] and
//! [`crate::ovn::config`] turn `[proxy]`, `[agent]`, `[api]` and `[ovn]`
//! into their runtime structs, and depend on this module; this module names
//! none of them. The whole-file struct is
//! [`FileConfig`], generic over the type of its `[proxy]` section: the proxy
//! parses it typed ([`crate::proxy::config::load_file`]) so its errors carry
//! toml's line and column, as they always have; here it is a raw table.
//!
//! The file layer uses `deny_unknown_fields` and defaults so a typo is an
//! error naming the key, not a silently ignored setting. `TryFrom` turns it
//! into runtime structs with `Duration`s and `NonZero*`; workers never read
//! the file. Durations are written as `"30s"`, `"250ms"`, `"2m"` or a bare
//! number of seconds.
//!
//! Rejected: keeping the proxy's sections here (the old layout). This module
//! then named `proxy::{discover, imdsv2, ratelimit}` types while
//! `proxy::discover` imported its `NamespaceConfig`, a cycle; and one file
//! held one daemon's settings beside everyone's plumbing.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::http::Limits;

/// haproxy's `timeout http-request` as Neutron configures it.
pub const DEFAULT_HTTP_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// haproxy's `timeout client`.
pub const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(32);
/// haproxy's `timeout http-keep-alive`.
pub const DEFAULT_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long SIGTERM waits for in-flight requests.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Neutron's `metadata_backlog`.
pub const DEFAULT_BACKLOG: i32 = 4096;
/// Open connections per namespace (proxy), and for the agent's socket and
/// the API's listeners: enough for a 10 000-VM boot storm through one router
/// namespace, each VM holding a connection or two, with room to spare. The
/// process-wide fd budget ([`crate::serve::admit::fd_budget`]) bounds it
/// further. At the cap a listener stops accepting until a connection closes
/// (haproxy's `maxconn` behaviour; the excess waits in the listen backlog).
/// An open idle connection costs about 1.5 KB (BENCHMARKS.md), so the cap
/// reached costs about 96 MB.
pub const DEFAULT_MAX_CONNECTIONS: usize = 65_536;
/// Neutron's default `metadata_proxy_socket` under the default `state_path`.
pub const DEFAULT_AGENT_SOCKET: &str = "/var/lib/neutron/metadata_proxy";

/// A configuration problem, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Io {
        /// File path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// TOML syntax or type error (the message carries line, column and key).
    #[error("{path}: {message}")]
    Parse {
        /// File path.
        path: PathBuf,
        /// toml's message.
        message: String,
    },
    /// A value that parses but is not acceptable.
    #[error("invalid `{key}`: {message}")]
    Invalid {
        /// Dotted key path, e.g. `proxy.namespace[1].router_id`.
        key: String,
        /// Why.
        message: String,
    },
}

/// A [`ConfigError::Invalid`] for `key`.
pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// A capability that is a Cargo feature (`[features]` in `Cargo.toml`,
/// all in `default`): a build can leave out its dependencies, and a config
/// that asks for it is then refused, naming the key, at load time (so the
/// daemons, `--check` and `doctor` all say the same).
#[derive(Debug, Clone, Copy)]
pub struct Feature {
    /// The Cargo feature's name.
    pub name: &'static str,
    /// What it brings, for the error.
    pub what: &'static str,
    /// Whether this binary was built with it.
    pub built: bool,
}

/// `[api] source = "nova"`: Nova's databases through sqlx.
pub const NOVA_DB: Feature = Feature {
    name: "nova-db",
    what: "the Nova database source, sqlx",
    built: cfg!(feature = "nova-db"),
};

/// `[agent] transport_url`: the agent's `report_state` over RabbitMQ.
pub const AMQP_REPORT: Feature = Feature {
    name: "amqp-report",
    what: "state reports to Neutron over RabbitMQ, lapin",
    built: cfg!(feature = "amqp-report"),
};

impl Feature {
    /// `Ok` in a build with this feature; otherwise [`Feature::refusal`].
    ///
    /// # Errors
    /// The build lacks the feature: `key` asks for it.
    pub fn require(self, key: &str, asked: &str) -> Result<(), ConfigError> {
        if self.built {
            return Ok(());
        }
        Err(self.refusal(key, asked))
    }

    /// The error for `key` (set to `asked`, never a secret) in a build
    /// without this feature.
    pub fn refusal(self, key: &str, asked: &str) -> ConfigError {
        invalid(
            key,
            format!(
                "{asked}: this metaproxy was built without the \"{}\" feature ({}); \
                 build it with `--features {}` (a default feature)",
                self.name, self.what, self.name
            ),
        )
    }
}

/// A duration as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum DurationFile {
    /// Seconds.
    Secs(u64),
    /// `"30s"`, `"250ms"`, `"2m"`.
    Text(String),
}

impl DurationFile {
    /// The duration, which must be non-zero.
    ///
    /// # Errors
    /// Unparseable or zero; the error names `key`.
    pub fn parse(&self, key: &str) -> Result<Duration, ConfigError> {
        let d = self.parse_or_zero(key)?;
        if d.is_zero() {
            return Err(invalid(key, "must be greater than zero"));
        }
        Ok(d)
    }

    /// The duration, which may be zero (a setting where 0 means "off").
    ///
    /// # Errors
    /// Unparseable; the error names `key`.
    pub fn parse_or_zero(&self, key: &str) -> Result<Duration, ConfigError> {
        Ok(match self {
            DurationFile::Secs(s) => Duration::from_secs(*s),
            DurationFile::Text(t) => parse_duration(t).ok_or_else(|| {
                invalid(
                    key,
                    format!("{t:?} is not a duration like \"30s\" or \"250ms\""),
                )
            })?,
        })
    }
}

/// Parse `"30s"`, `"250ms"`, `"2m"` or `"5"` (seconds).
pub fn parse_duration(t: &str) -> Option<Duration> {
    let t = t.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    match unit.trim() {
        "" | "s" => Some(Duration::from_secs(n)),
        "ms" => Some(Duration::from_millis(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

/// One string or a list of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// `listen = "0.0.0.0:9697"`
    One(String),
    /// `listen = ["0.0.0.0:9697", "[::]:9697"]`
    Many(Vec<String>),
}

impl OneOrMany {
    /// The items in order (one for the single form).
    pub fn items(&self) -> Vec<&str> {
        match self {
            OneOrMany::One(s) => vec![s.as_str()],
            OneOrMany::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// The whole file. `P` is the type of `[proxy]`: a raw table here, and
/// [`crate::proxy::config::ProxyFile`] when the proxy's loader parses it.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig<P = toml::Table> {
    /// `[proxy]`, parsed by `proxy::config`.
    #[serde(default)]
    pub proxy: Option<P>,
    /// `[agent]`, parsed by `agent::config` (kept raw here so each daemon
    /// validates only its own section).
    #[serde(default)]
    pub agent: Option<toml::Table>,
    /// `[api]`, parsed by `api::config`.
    #[serde(default)]
    pub api: Option<toml::Table>,
    /// `[ovn]`, parsed by `ovn::config`: for `metaproxy ovn` and
    /// `metaproxy ovn-dump-replica --config`.
    #[serde(default)]
    pub ovn: Option<toml::Table>,
}

/// `v`, or `default` when absent, as a [`NonZeroUsize`].
///
/// # Errors
/// Zero; the error names `key`.
pub fn nonzero(key: &str, v: Option<usize>, default: usize) -> Result<NonZeroUsize, ConfigError> {
    NonZeroUsize::new(v.unwrap_or(default)).ok_or_else(|| invalid(key, "must be at least 1"))
}

/// The request limits of a `[<section>]` table (`proxy.limits`,
/// `agent.limits`): head bytes, header count and body bytes as written
/// (absent = `default`'s), validated alike for every daemon.
///
/// # Errors
/// A head limit outside 256..=1 MiB or a header limit outside 1..=1024,
/// naming `<section>.<key>`.
pub fn limits(
    section: &str,
    (head, headers, body): (Option<usize>, Option<usize>, Option<u64>),
    default: Limits,
) -> Result<Limits, ConfigError> {
    let l = Limits {
        max_head_bytes: head.unwrap_or(default.max_head_bytes),
        max_headers: headers.unwrap_or(default.max_headers),
        max_body_bytes: body.unwrap_or(default.max_body_bytes),
    };
    if !(256..=1024 * 1024).contains(&l.max_head_bytes) {
        return Err(invalid(
            format!("{section}.max_head_bytes"),
            "must be between 256 and 1048576",
        ));
    }
    if !(1..=1024).contains(&l.max_headers) {
        return Err(invalid(
            format!("{section}.max_headers"),
            "must be between 1 and 1024",
        ));
    }
    Ok(l)
}

/// `v` parsed (and named `key` in errors), or `default` when absent.
///
/// # Errors
/// As for [`DurationFile::parse`].
pub fn dur(
    key: &str,
    v: &Option<DurationFile>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    v.as_ref().map_or(Ok(default), |d| d.parse(key))
}

/// `v` parsed, zero allowed (and named `key` in errors), or `default` when
/// absent.
///
/// # Errors
/// As for [`DurationFile::parse_or_zero`].
pub fn dur_or_zero(
    key: &str,
    v: &Option<DurationFile>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    v.as_ref().map_or(Ok(default), |d| d.parse_or_zero(key))
}

/// An optional `host:port` (a name is resolved once, at start): `None`
/// when absent.
///
/// # Errors
/// It is not `host:port`, or the host does not resolve; the error names `key`.
pub fn socket_addr(
    key: &str,
    v: &Option<String>,
) -> Result<Option<std::net::SocketAddr>, ConfigError> {
    use std::net::ToSocketAddrs;
    let Some(s) = v else { return Ok(None) };
    s.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .map(Some)
        .ok_or_else(|| invalid(key, format!("{s:?} is not host:port")))
}

/// Read a config file.
///
/// # Errors
/// The file is unreadable.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Read and parse a config file, `[proxy]` raw.
///
/// # Errors
/// The file is unreadable or not valid TOML for [`FileConfig`].
pub fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    parse_str(&read(path)?, path)
}

/// Parse config text (`path` is only used in messages), `[proxy]` raw.
///
/// # Errors
/// Not valid TOML for [`FileConfig`].
pub fn parse_str(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
    parse_as(text, path)
}

/// Parse config text as `T`: a [`FileConfig`] or a struct naming one
/// section. toml's message (line, column, the offending line) is kept.
///
/// # Errors
/// Not valid TOML for `T`.
pub fn parse_as<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The refusal of a build without a feature (the config paths that
    /// return it are checked end to end by `cargo test --no-default-features`:
    /// `api::config`, `agent::config`).
    #[test]
    fn a_feature_left_out_is_refused_naming_the_key_and_the_feature() {
        let off = Feature {
            built: false,
            ..NOVA_DB
        };
        let e = off
            .require("api.source", "\"nova\"")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "invalid `api.source`: \"nova\": this metaproxy was built without the \"nova-db\" \
             feature (the Nova database source, sqlx); build it with `--features nova-db` (a \
             default feature)"
        );
        let on = Feature {
            built: true,
            ..AMQP_REPORT
        };
        assert!(on.require("agent.transport_url", "\"rabbit://h/\"").is_ok());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("5 parsecs"), None);
    }
}
