//! `[agent]` → validated [`AgentConfig`], once, at start.
//!
//! The top-level [`crate::config::FileConfig`] keeps `[agent]` as a raw TOML
//! table so that each daemon validates only its own section; this module
//! parses it into [`AgentFile`] (`deny_unknown_fields`, every key optional)
//! and converts it with `TryFrom`, naming the key on the first error. Option
//! names follow `metadata_agent.ini` where one exists (spec §3.7), so an
//! operator can copy values across.
//!
//! Not built yet, and refused loudly rather than ignored: the Neutron backend
//! (`backend = "neutron"`) and HTTPS to the metadata API
//! (`nova_metadata_protocol = "https"`).
//!
//! The shared secret never reaches a log line: [`AgentConfig`]'s `Debug` is
//! written by hand and prints `<redacted>` (or `<empty>`, which is worth
//! knowing: Neutron's default is the empty string, and Nova then rejects
//! nothing but signs with an empty key).

use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{parse_duration, ConfigError, DurationFile, DEFAULT_AGENT_SOCKET};

/// Neutron's `metadata_backlog`.
pub const DEFAULT_BACKLOG: i32 = 4096;
/// Neutron's `nova_metadata_port`.
pub const DEFAULT_NOVA_PORT: u16 = 8775;
/// Neutron's `nova_metadata_host`.
pub const DEFAULT_NOVA_HOST: &str = "127.0.0.1";
/// Neutron's hard-coded `requests` timeout for the call to Nova.
pub const DEFAULT_NOVA_TIMEOUT: Duration = Duration::from_secs(60);
/// Loops serving the socket.
pub const DEFAULT_WORKERS: usize = 1;
/// Idle keep-alive connections to the metadata API kept per loop.
pub const DEFAULT_POOL_SIZE: usize = 8;
/// How often the inventory file's mtime is checked.
pub const INVENTORY_POLL: Duration = Duration::from_secs(1);

/// `[agent.nova]`: where the metadata API is.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct NovaFile {
    /// Host name or address of the metadata API.
    pub nova_metadata_host: Option<String>,
    /// Its port.
    pub nova_metadata_port: Option<u16>,
    /// `http` (only value built so far).
    pub nova_metadata_protocol: Option<String>,
    /// Whole-exchange timeout per request.
    pub timeout: Option<DurationFile>,
}

/// `[agent]` as written in the file.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    /// Unix socket the namespace proxies connect to.
    pub socket: Option<PathBuf>,
    /// `user` | `group` | `all` | `deduce`.
    pub socket_mode: Option<String>,
    /// listen(2) backlog.
    pub backlog: Option<i32>,
    /// `inventory` (only value built so far).
    pub backend: Option<String>,
    /// Inventory file for `backend = "inventory"`.
    pub inventory: Option<PathBuf>,
    /// HMAC key shared with the metadata API.
    pub metadata_proxy_shared_secret: Option<String>,
    /// Positive cache lifetime (0 disables the cache).
    pub cache_ttl: Option<DurationFile>,
    /// Negative ("no such port") cache lifetime (0 disables negative caching).
    pub negative_cache_ttl: Option<DurationFile>,
    /// Largest number of cached resolutions per loop.
    pub cache_capacity: Option<usize>,
    /// Loops.
    pub workers: Option<usize>,
    /// Idle API connections kept per loop.
    pub pool_size: Option<usize>,
    /// `[agent.nova]`
    #[serde(default)]
    pub nova: NovaFile,
}

/// Permissions of the agent socket (Neutron's `metadata_proxy_socket_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketMode {
    /// 0644: only the agent's user may connect.
    User,
    /// 0664: the agent's group may connect too.
    Group,
    /// 0666: anyone may connect.
    All,
}

impl SocketMode {
    /// The file mode bits.
    pub fn bits(self) -> u32 {
        match self {
            SocketMode::User => 0o644,
            SocketMode::Group => 0o664,
            SocketMode::All => 0o666,
        }
    }

    /// `deduce`, simplified: Neutron compares the proxy's configured user
    /// and group with the agent's own; metaproxy's proxy runs as the same
    /// user when the agent is root, and otherwise is assumed to share its
    /// group. So: root → `user`, anyone else → `group`.
    pub fn deduce() -> SocketMode {
        if nix::unistd::geteuid().is_root() {
            SocketMode::User
        } else {
            SocketMode::Group
        }
    }
}

/// Where resolutions come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// A local inventory file, reloaded when it changes.
    Inventory(PathBuf),
}

/// The metadata API endpoint.
#[derive(Debug, Clone)]
pub struct NovaConfig {
    /// Host as configured (used in the `Host` header).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Resolved address (resolved once, at start).
    pub addr: SocketAddr,
    /// Whole-exchange timeout: connect, send, full response.
    pub timeout: Duration,
}

impl NovaConfig {
    /// `Host` header value: `host:port`, an IPv6 literal bracketed.
    pub fn host_header(&self) -> String {
        match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) => format!("[{v6}]:{}", self.port),
            _ => format!("{}:{}", self.host, self.port),
        }
    }
}

/// Validated agent configuration.
#[derive(Clone)]
pub struct AgentConfig {
    /// Unix socket path.
    pub socket: PathBuf,
    /// Its permissions.
    pub socket_mode: SocketMode,
    /// listen(2) backlog.
    pub backlog: i32,
    /// Resolution backend.
    pub backend: Backend,
    /// HMAC key shared with the API. Never logged.
    pub shared_secret: String,
    /// The metadata API.
    pub nova: NovaConfig,
    /// Positive cache lifetime.
    pub cache_ttl: Duration,
    /// Negative cache lifetime.
    pub negative_cache_ttl: Duration,
    /// Cached resolutions per loop.
    pub cache_capacity: usize,
    /// Loops.
    pub workers: NonZeroUsize,
    /// Idle API connections kept per loop.
    pub pool_size: NonZeroUsize,
}

impl fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secret = if self.shared_secret.is_empty() {
            "<empty>"
        } else {
            "<redacted>"
        };
        f.debug_struct("AgentConfig")
            .field("socket", &self.socket)
            .field("socket_mode", &self.socket_mode)
            .field("backlog", &self.backlog)
            .field("backend", &self.backend)
            .field("shared_secret", &secret)
            .field("nova", &self.nova)
            .field("cache_ttl", &self.cache_ttl)
            .field("negative_cache_ttl", &self.negative_cache_ttl)
            .field("cache_capacity", &self.cache_capacity)
            .field("workers", &self.workers)
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

fn duration(
    key: &str,
    v: &Option<DurationFile>,
    default: Duration,
    allow_zero: bool,
) -> Result<Duration, ConfigError> {
    let d = match v {
        None => return Ok(default),
        Some(DurationFile::Secs(s)) => Duration::from_secs(*s),
        Some(DurationFile::Text(t)) => parse_duration(t).ok_or_else(|| {
            invalid(
                key,
                format!("{t:?} is not a duration like \"30s\" or \"250ms\""),
            )
        })?,
    };
    if d.is_zero() && !allow_zero {
        return Err(invalid(key, "must be greater than zero"));
    }
    Ok(d)
}

fn nonzero(key: &str, v: Option<usize>, default: usize) -> Result<NonZeroUsize, ConfigError> {
    NonZeroUsize::new(v.unwrap_or(default)).ok_or_else(|| invalid(key, "must be at least 1"))
}

impl AgentFile {
    /// Parse the raw `[agent]` table.
    ///
    /// # Errors
    /// An unknown key or a value of the wrong type; the message names it.
    pub fn from_table(t: &toml::Table) -> Result<AgentFile, ConfigError> {
        AgentFile::deserialize(toml::Value::Table(t.clone()))
            .map_err(|e| invalid("agent", e.to_string().trim_end()))
    }
}

impl TryFrom<&AgentFile> for AgentConfig {
    type Error = ConfigError;

    fn try_from(f: &AgentFile) -> Result<Self, ConfigError> {
        let socket_mode = match f.socket_mode.as_deref().unwrap_or("deduce") {
            "user" => SocketMode::User,
            "group" => SocketMode::Group,
            "all" => SocketMode::All,
            "deduce" => SocketMode::deduce(),
            other => {
                return Err(invalid(
                    "agent.socket_mode",
                    format!("{other:?} is not one of user, group, all, deduce"),
                ))
            }
        };
        let backlog = f.backlog.unwrap_or(DEFAULT_BACKLOG);
        if backlog < 1 {
            return Err(invalid("agent.backlog", "must be at least 1"));
        }
        let backend = match f.backend.as_deref().unwrap_or("inventory") {
            "inventory" => {
                let path = f.inventory.clone().ok_or_else(|| {
                    invalid("agent.inventory", "required with backend = \"inventory\"")
                })?;
                Backend::Inventory(path)
            }
            "neutron" => {
                return Err(invalid(
                    "agent.backend",
                    "\"neutron\" is not built yet; use \"inventory\"",
                ))
            }
            other => {
                return Err(invalid(
                    "agent.backend",
                    format!("{other:?} is not a backend (inventory)"),
                ))
            }
        };
        let n = &f.nova;
        match n.nova_metadata_protocol.as_deref().unwrap_or("http") {
            "http" => {}
            "https" => {
                return Err(invalid(
                    "agent.nova.nova_metadata_protocol",
                    "\"https\" is not built yet; use \"http\"",
                ))
            }
            other => {
                return Err(invalid(
                    "agent.nova.nova_metadata_protocol",
                    format!("{other:?} is not http or https"),
                ))
            }
        }
        let host = n
            .nova_metadata_host
            .clone()
            .unwrap_or_else(|| DEFAULT_NOVA_HOST.to_string());
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .map_or(host.clone(), str::to_string);
        let port = n.nova_metadata_port.unwrap_or(DEFAULT_NOVA_PORT);
        if port == 0 {
            return Err(invalid("agent.nova.nova_metadata_port", "must not be 0"));
        }
        let addr = match host.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, port),
            Err(_) => (host.as_str(), port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| {
                    invalid(
                        "agent.nova.nova_metadata_host",
                        format!("{host:?} does not resolve"),
                    )
                })?,
        };
        let nova = NovaConfig {
            host,
            port,
            addr,
            timeout: duration(
                "agent.nova.timeout",
                &n.timeout,
                DEFAULT_NOVA_TIMEOUT,
                false,
            )?,
        };
        let workers = nonzero("agent.workers", f.workers, DEFAULT_WORKERS)?;
        if workers.get() > 1024 {
            return Err(invalid("agent.workers", "at most 1024"));
        }
        Ok(AgentConfig {
            socket: f
                .socket
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_AGENT_SOCKET)),
            socket_mode,
            backlog,
            backend,
            shared_secret: f.metadata_proxy_shared_secret.clone().unwrap_or_default(),
            nova,
            cache_ttl: duration(
                "agent.cache_ttl",
                &f.cache_ttl,
                super::cache::DEFAULT_POSITIVE_TTL,
                true,
            )?,
            negative_cache_ttl: duration(
                "agent.negative_cache_ttl",
                &f.negative_cache_ttl,
                super::cache::DEFAULT_NEGATIVE_TTL,
                true,
            )?,
            cache_capacity: f.cache_capacity.unwrap_or(super::cache::DEFAULT_CAPACITY),
            workers,
            pool_size: nonzero("agent.pool_size", f.pool_size, DEFAULT_POOL_SIZE)?,
        })
    }
}

impl TryFrom<&toml::Table> for AgentConfig {
    type Error = ConfigError;

    fn try_from(t: &toml::Table) -> Result<Self, ConfigError> {
        AgentConfig::try_from(&AgentFile::from_table(t)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(text: &str) -> Result<AgentConfig, ConfigError> {
        let t: toml::Table = toml::from_str(text).unwrap();
        AgentConfig::try_from(&t)
    }

    #[test]
    fn defaults_follow_neutron() {
        let c = agent("inventory = \"inv.toml\"").unwrap();
        assert_eq!(c.socket, PathBuf::from(DEFAULT_AGENT_SOCKET));
        assert_eq!(c.backend, Backend::Inventory("inv.toml".into()));
        assert_eq!(c.nova.addr, "127.0.0.1:8775".parse().unwrap());
        assert_eq!(c.nova.timeout, Duration::from_secs(60));
        assert_eq!(c.cache_ttl, Duration::from_secs(10));
        assert_eq!(c.negative_cache_ttl, Duration::from_secs(1));
        assert_eq!(c.cache_capacity, 100_000);
        assert_eq!((c.workers.get(), c.pool_size.get()), (1, 8));
        assert_eq!(c.shared_secret, "");
        assert_eq!(c.backlog, 4096);
    }

    #[test]
    fn secret_is_never_in_debug_output() {
        let c = agent(
            "inventory = \"i\"\nmetadata_proxy_shared_secret = \"s3cr3t-value\"\nsocket_mode = \"all\"",
        )
        .unwrap();
        let d = format!("{c:?}");
        assert!(!d.contains("s3cr3t-value"), "{d}");
        assert!(d.contains("<redacted>"));
        assert_eq!(c.socket_mode.bits(), 0o666);
    }

    #[test]
    fn errors_name_the_key() {
        let e = |t: &str| agent(t).unwrap_err().to_string();
        assert!(e("inventory = \"i\"\nbogus = 1").contains("bogus"));
        assert!(e("backend = \"neutron\"").contains("agent.backend"));
        assert!(e("backend = \"neutron\"").contains("not built yet"));
        assert!(e("backend = \"inventory\"").contains("agent.inventory"));
        assert!(e("inventory = \"i\"\nsocket_mode = \"x\"").contains("agent.socket_mode"));
        let https = e("inventory = \"i\"\n[nova]\nnova_metadata_protocol = \"https\"");
        assert!(
            https.contains("agent.nova.nova_metadata_protocol") && https.contains("not built yet")
        );
        assert!(e("inventory = \"i\"\n[nova]\ntimeout = \"0s\"").contains("agent.nova.timeout"));
        assert!(e("inventory = \"i\"\nworkers = 0").contains("agent.workers"));
        assert!(e("inventory = \"i\"\npool_size = 0").contains("agent.pool_size"));
        assert!(e("inventory = \"i\"\n[nova]\nnope = 1").contains("nope"));
    }

    #[test]
    fn ipv6_host_is_bracketed_in_host_header() {
        let c = agent(
            "inventory = \"i\"\n[nova]\nnova_metadata_host = \"::1\"\nnova_metadata_port = 9",
        )
        .unwrap();
        assert_eq!(c.nova.host_header(), "[::1]:9");
        assert_eq!(c.nova.addr, "[::1]:9".parse().unwrap());
        let c = agent("inventory = \"i\"\ncache_ttl = 0").unwrap();
        assert_eq!(c.cache_ttl, Duration::ZERO);
    }
}
