//! `[proxy]` → validated [`ProxyConfig`], once, at start.
//!
//! The proxy's file structs ([`ProxyFile`] and its tables), the runtime
//! [`ProxyConfig`] and its conversion, beside `agent::config` and
//! `api::config`; the shared plumbing (errors, durations, limits, reading the
//! file) is [`crate::config`], which names nothing of the proxy's.
//!
//! `[proxy]` is parsed typed as part of the whole file ([`load_file`]), not
//! from a raw table as the agent's and the API's sections are: its errors
//! then carry toml's line, column and the offending line, and every daemon
//! loading the file refuses a malformed `[proxy]`, as before the split.
//!
//! Reload needs to know whether anything but the static namespaces changed:
//! [`ProxyConfig::settings`] is that part, a borrowed view that derives
//! `PartialEq`. Rejected: comparing `Debug` strings (a field whose `Debug`
//! hides a difference, or prints one that is not, decides a reload), and
//! nesting the settings in their own struct (it changes the effective config
//! printed at start and by `up --check`, and every `cfg.field` in the proxy).

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::{
    dur, invalid, limits, nonzero, ConfigError, DurationFile, FileConfig, OneOrMany,
    DEFAULT_AGENT_SOCKET, DEFAULT_BACKLOG, DEFAULT_CLIENT_TIMEOUT, DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_HTTP_REQUEST_TIMEOUT, DEFAULT_KEEP_ALIVE_TIMEOUT, DEFAULT_MAX_CONNECTIONS,
};
use crate::http::Limits;

/// haproxy's `timeout connect`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// haproxy's `timeout server`.
pub const DEFAULT_SERVER_TIMEOUT: Duration = Duration::from_secs(32);
/// Pooled agent connections per loop.
pub const DEFAULT_POOL_SIZE: usize = 4;
/// Largest agent response relayed (user-data is at most 64 KiB in Nova).
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 4 * 1024 * 1024;
/// Where `metaproxy ctl` finds the proxy.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/metaproxy/proxy.ctl";

/// `[proxy.timeouts]`: haproxy's five timeouts.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsFile {
    /// Whole request head must arrive within this.
    pub http_request: Option<DurationFile>,
    /// Connecting to the agent.
    pub connect: Option<DurationFile>,
    /// Client inactivity while reading a body or writing a response.
    pub client: Option<DurationFile>,
    /// Agent's response must start within this.
    pub server: Option<DurationFile>,
    /// Idle keep-alive connection lifetime.
    pub keep_alive: Option<DurationFile>,
}

/// `[proxy.limits]`
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// Request head bytes (431 beyond).
    pub max_head_bytes: Option<usize>,
    /// Request headers (431 beyond).
    pub max_headers: Option<usize>,
    /// Request body bytes (413 beyond).
    pub max_body_bytes: Option<u64>,
    /// Agent response bytes relayed (502 beyond).
    pub max_response_bytes: Option<u64>,
}

/// `[proxy]`
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct ProxyFile {
    /// Event loops; 0 or absent = one per core.
    pub workers: Option<usize>,
    /// The agent's Unix socket.
    pub agent_socket: Option<PathBuf>,
    /// listen(2) backlog of every TCP listener.
    pub backlog: Option<i32>,
    /// Concurrent client connections per namespace; at the cap the
    /// namespace stops accepting until one closes.
    pub max_connections: Option<usize>,
    /// Ignored (accepted so that old files still load): the pool dials up
    /// to `upstream_pool_size` before it pipelines.
    pub upstream_pipeline_depth: Option<usize>,
    /// Pooled agent connections per loop.
    pub upstream_pool_size: Option<usize>,
    /// SIGTERM drain bound.
    pub drain_timeout: Option<DurationFile>,
    /// One line per request (haproxy's `option httplog`); off by default.
    pub access_log: Option<bool>,
    /// `host:port` of the Prometheus endpoint; off when absent.
    pub metrics_listen: Option<String>,
    /// Directory of named namespaces.
    pub netns_dir: Option<PathBuf>,
    /// Timeouts.
    #[serde(default)]
    pub timeouts: TimeoutsFile,
    /// Limits.
    #[serde(default)]
    pub limits: LimitsFile,
    /// Control socket for `metaproxy ctl` (root-only, mode 0600).
    pub control_socket: Option<PathBuf>,
    /// Namespace auto-discovery.
    #[serde(default)]
    pub discover: DiscoverFile,
    /// IMDSv2 session tokens.
    #[serde(default)]
    pub imdsv2: Imdsv2File,
    /// Per-client rate limiting.
    #[serde(default)]
    pub rate_limit: RateLimitFile,
    /// Static namespaces.
    #[serde(default)]
    pub namespace: Vec<NamespaceFile>,
}

/// `[proxy.discover]`
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct DiscoverFile {
    /// Off by default.
    pub enabled: Option<bool>,
    /// Router namespace prefix (default `qrouter-`).
    pub router_prefix: Option<String>,
    /// Network namespace prefixes stamped `X-Neutron-Network-ID` (default `qdhcp-`).
    pub network_prefixes: Option<Vec<String>>,
    /// OVN metadata namespace prefixes stamped `X-OVN-Network-ID` (default `ovnmeta-`).
    pub ovn_prefixes: Option<Vec<String>>,
    /// Router listeners (default `[::]:9697`, falling back to `0.0.0.0:9697`).
    pub router_listen: Option<OneOrMany>,
    /// Network listeners (default `169.254.169.254:80`).
    pub network_listen: Option<OneOrMany>,
    /// Port for `[fe80::a9fe:a9fe]` in network namespaces that have it (default 80; 0 = off).
    pub network_v6_port: Option<u16>,
}

/// `[proxy.imdsv2]`
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct Imdsv2File {
    /// `off`, `optional` (default) or `required`.
    pub mode: Option<crate::proxy::imdsv2::Mode>,
    /// IP TTL / hop limit of the token response (1..=64, default 1).
    pub hop_limit: Option<u32>,
}

/// `[proxy.rate_limit]` (Neutron's `[metadata_rate_limiting]`).
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RateLimitFile {
    /// Off by default.
    pub enabled: Option<bool>,
    /// `base_window_duration` (default 10 s).
    pub base_window: Option<DurationFile>,
    /// `base_query_rate_limit` (default 10).
    pub base_limit: Option<u32>,
    /// `burst_window_duration` (default 10 s).
    pub burst_window: Option<DurationFile>,
    /// `burst_query_rate_limit` (default 10).
    pub burst_limit: Option<u32>,
    /// Clients tracked at most (default 10 000).
    pub table_size: Option<usize>,
}

/// `[[proxy.namespace]]`
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct NamespaceFile {
    /// A name under the netns dir, or a path; absent = the daemon's own namespace.
    pub netns: Option<String>,
    /// Router UUID (qrouter namespaces).
    pub router_id: Option<String>,
    /// Network UUID (qdhcp namespaces): stamped as `X-Neutron-Network-ID`.
    pub network_id: Option<String>,
    /// Network UUID (ovnmeta namespaces): stamped as `X-OVN-Network-ID`, the
    /// header the OVN metadata agent reads.
    pub ovn_network_id: Option<String>,
    /// Addresses to listen on.
    pub listen: OneOrMany,
}

/// Which id the proxy stamps on requests from a namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NsIdentity {
    /// `X-Neutron-Router-ID`
    Router(String),
    /// `X-Neutron-Network-ID`
    Network(String),
    /// `X-OVN-Network-ID` (what OVN's haproxy adds for the OVN metadata agent)
    OvnNetwork(String),
}

impl NsIdentity {
    /// The header name injected upstream.
    pub fn header_name(&self) -> &'static str {
        match self {
            NsIdentity::Router(_) => "X-Neutron-Router-ID",
            NsIdentity::Network(_) => "X-Neutron-Network-ID",
            NsIdentity::OvnNetwork(_) => "X-OVN-Network-ID",
        }
    }
    /// The id value.
    pub fn id(&self) -> &str {
        match self {
            NsIdentity::Router(id) | NsIdentity::Network(id) | NsIdentity::OvnNetwork(id) => id,
        }
    }
    /// A network namespace (qdhcp or ovnmeta): listens on 169.254.169.254.
    pub fn is_network(&self) -> bool {
        matches!(self, NsIdentity::Network(_) | NsIdentity::OvnNetwork(_))
    }
}

/// Validated `[proxy.discover]` (its watcher is [`crate::proxy::discover`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoverConfig {
    /// Directory to watch (the proxy's `netns_dir`).
    pub dir: PathBuf,
    /// Router namespace prefix (`qrouter-`).
    pub router_prefix: String,
    /// Network namespace prefixes (`qdhcp-`): `X-Neutron-Network-ID`.
    pub network_prefixes: Vec<String>,
    /// OVN metadata namespace prefixes (`ovnmeta-`): `X-OVN-Network-ID`.
    pub ovn_prefixes: Vec<String>,
    /// Router listeners; an IPv6 wildcard falls back to `0.0.0.0` when the
    /// namespace has IPv6 disabled.
    pub router_listen: Vec<SocketAddr>,
    /// Network listeners.
    pub network_listen: Vec<SocketAddr>,
    /// Also bind `[fe80::a9fe:a9fe]:<port>` on the interface holding it, when present.
    pub network_v6_port: Option<u16>,
}

/// haproxy's five timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Whole request head.
    pub http_request: Duration,
    /// Agent connect.
    pub connect: Duration,
    /// Client body read / response write.
    pub client: Duration,
    /// Agent response.
    pub server: Duration,
    /// Idle keep-alive.
    pub keep_alive: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            http_request: DEFAULT_HTTP_REQUEST_TIMEOUT,
            connect: DEFAULT_CONNECT_TIMEOUT,
            client: DEFAULT_CLIENT_TIMEOUT,
            server: DEFAULT_SERVER_TIMEOUT,
            keep_alive: DEFAULT_KEEP_ALIVE_TIMEOUT,
        }
    }
}

/// One served namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceConfig {
    /// Human name for logs (`qrouter-…` or `host`).
    pub name: String,
    /// Namespace file; `None` = own namespace.
    pub netns: Option<PathBuf>,
    /// Stamped identity.
    pub identity: NsIdentity,
    /// Listen addresses.
    pub listen: Vec<SocketAddr>,
}

/// Validated proxy configuration.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Loops.
    pub workers: NonZeroUsize,
    /// Agent socket.
    pub agent_socket: PathBuf,
    /// listen backlog.
    pub backlog: i32,
    /// Per-namespace connection cap (accept pauses at it).
    pub max_connections: NonZeroUsize,
    /// `upstream_pipeline_depth` as set in the file: ignored, logged at start.
    pub ignored_pipeline_depth: Option<usize>,
    /// Agent connections per loop.
    pub pool_size: NonZeroUsize,
    /// SIGTERM drain bound.
    pub drain_timeout: Duration,
    /// One line per request.
    pub access_log: bool,
    /// The Prometheus endpoint, when enabled.
    pub metrics_listen: Option<SocketAddr>,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Request limits.
    pub limits: Limits,
    /// Largest relayed response.
    pub max_response_bytes: u64,
    /// `metaproxy ctl` socket.
    pub control_socket: PathBuf,
    /// Discovery, when enabled.
    pub discover: Option<DiscoverConfig>,
    /// IMDSv2 mode.
    pub imdsv2: crate::proxy::imdsv2::Mode,
    /// IP TTL of token responses.
    pub hop_limit: u32,
    /// Rate limits, when enabled.
    pub rate_limit: Option<crate::proxy::ratelimit::RateLimitConfig>,
    /// Static namespaces.
    pub namespaces: Vec<NamespaceConfig>,
}

/// Everything in a [`ProxyConfig`] but its static namespaces: the part a
/// reload cannot apply, only report as needing a restart. Borrowed, so
/// building one copies nothing.
#[derive(Debug, PartialEq)]
pub struct ProxySettings<'a> {
    /// [`ProxyConfig::workers`].
    pub workers: &'a NonZeroUsize,
    /// [`ProxyConfig::agent_socket`].
    pub agent_socket: &'a PathBuf,
    /// [`ProxyConfig::backlog`].
    pub backlog: &'a i32,
    /// [`ProxyConfig::max_connections`].
    pub max_connections: &'a NonZeroUsize,
    /// [`ProxyConfig::ignored_pipeline_depth`].
    pub ignored_pipeline_depth: &'a Option<usize>,
    /// [`ProxyConfig::pool_size`].
    pub pool_size: &'a NonZeroUsize,
    /// [`ProxyConfig::drain_timeout`].
    pub drain_timeout: &'a Duration,
    /// [`ProxyConfig::access_log`].
    pub access_log: &'a bool,
    /// [`ProxyConfig::metrics_listen`].
    pub metrics_listen: &'a Option<SocketAddr>,
    /// [`ProxyConfig::timeouts`].
    pub timeouts: &'a Timeouts,
    /// [`ProxyConfig::limits`].
    pub limits: &'a Limits,
    /// [`ProxyConfig::max_response_bytes`].
    pub max_response_bytes: &'a u64,
    /// [`ProxyConfig::control_socket`].
    pub control_socket: &'a PathBuf,
    /// [`ProxyConfig::discover`].
    pub discover: &'a Option<DiscoverConfig>,
    /// [`ProxyConfig::imdsv2`].
    pub imdsv2: &'a crate::proxy::imdsv2::Mode,
    /// [`ProxyConfig::hop_limit`].
    pub hop_limit: &'a u32,
    /// [`ProxyConfig::rate_limit`].
    pub rate_limit: &'a Option<crate::proxy::ratelimit::RateLimitConfig>,
}

impl ProxyConfig {
    /// The settings outside `[[proxy.namespace]]`, to compare old and new
    /// at a reload.
    pub fn settings(&self) -> ProxySettings<'_> {
        // Destructured without `..`: a field added to ProxyConfig does not
        // compile here until it is sorted into the settings or the namespaces.
        let ProxyConfig {
            workers,
            agent_socket,
            backlog,
            max_connections,
            ignored_pipeline_depth,
            pool_size,
            drain_timeout,
            access_log,
            metrics_listen,
            timeouts,
            limits,
            max_response_bytes,
            control_socket,
            discover,
            imdsv2,
            hop_limit,
            rate_limit,
            namespaces: _,
        } = self;
        ProxySettings {
            workers,
            agent_socket,
            backlog,
            max_connections,
            ignored_pipeline_depth,
            pool_size,
            drain_timeout,
            access_log,
            metrics_listen,
            timeouts,
            limits,
            max_response_bytes,
            control_socket,
            discover,
            imdsv2,
            hop_limit,
            rate_limit,
        }
    }
}

/// Check the canonical 8-4-4-4-12 hex UUID form Neutron uses for ids.
pub fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

impl TryFrom<&ProxyFile> for ProxyConfig {
    type Error = ConfigError;

    fn try_from(f: &ProxyFile) -> Result<Self, ConfigError> {
        let workers = match f.workers {
            None | Some(0) => {
                NonZeroUsize::new(crate::rt::available_cpus()).unwrap_or(NonZeroUsize::MIN)
            }
            Some(n) if n > 1024 => return Err(invalid("proxy.workers", "at most 1024")),
            Some(n) => NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN),
        };
        let backlog = f.backlog.unwrap_or(DEFAULT_BACKLOG);
        if backlog < 1 {
            return Err(invalid("proxy.backlog", "must be at least 1"));
        }
        let t = &f.timeouts;
        let timeouts = Timeouts {
            http_request: dur(
                "proxy.timeouts.http_request",
                &t.http_request,
                DEFAULT_HTTP_REQUEST_TIMEOUT,
            )?,
            connect: dur(
                "proxy.timeouts.connect",
                &t.connect,
                DEFAULT_CONNECT_TIMEOUT,
            )?,
            client: dur("proxy.timeouts.client", &t.client, DEFAULT_CLIENT_TIMEOUT)?,
            server: dur("proxy.timeouts.server", &t.server, DEFAULT_SERVER_TIMEOUT)?,
            keep_alive: dur(
                "proxy.timeouts.keep_alive",
                &t.keep_alive,
                DEFAULT_KEEP_ALIVE_TIMEOUT,
            )?,
        };
        let l = &f.limits;
        let limits = limits(
            "proxy.limits",
            (l.max_head_bytes, l.max_headers, l.max_body_bytes),
            Limits::default(),
        )?;
        let netns_dir = f
            .netns_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(crate::rt::netns::DEFAULT_NETNS_DIR));
        let mut namespaces = Vec::with_capacity(f.namespace.len());
        for (i, ns) in f.namespace.iter().enumerate() {
            namespaces.push(namespace_config(i, ns, &netns_dir)?);
        }
        let mut seen = std::collections::HashSet::new();
        for (i, ns) in namespaces.iter().enumerate() {
            // Port 0 asks the kernel for a free port: never a conflict.
            for a in ns.listen.iter().filter(|a| a.port() != 0) {
                if !seen.insert((ns.netns.clone(), *a)) {
                    return Err(invalid(
                        format!("proxy.namespace[{i}].listen"),
                        format!("{a} is already used by another entry in the same namespace"),
                    ));
                }
            }
        }
        let hop_limit = f.imdsv2.hop_limit.unwrap_or(1);
        if !(1..=64).contains(&hop_limit) {
            return Err(invalid(
                "proxy.imdsv2.hop_limit",
                "must be between 1 and 64",
            ));
        }
        let rate_limit = rate_limit_config("proxy.rate_limit", &f.rate_limit)?;
        let discover = discover_config(&f.discover, &netns_dir)?;
        Ok(ProxyConfig {
            control_socket: f
                .control_socket
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTROL_SOCKET)),
            discover,
            imdsv2: f
                .imdsv2
                .mode
                .unwrap_or(crate::proxy::imdsv2::Mode::Optional),
            hop_limit,
            rate_limit,
            workers,
            agent_socket: f
                .agent_socket
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_AGENT_SOCKET)),
            backlog,
            max_connections: nonzero(
                "proxy.max_connections",
                f.max_connections,
                DEFAULT_MAX_CONNECTIONS,
            )?,
            ignored_pipeline_depth: f.upstream_pipeline_depth,
            pool_size: nonzero(
                "proxy.upstream_pool_size",
                f.upstream_pool_size,
                DEFAULT_POOL_SIZE,
            )?,
            drain_timeout: dur(
                "proxy.drain_timeout",
                &f.drain_timeout,
                DEFAULT_DRAIN_TIMEOUT,
            )?,
            access_log: f.access_log.unwrap_or(false),
            metrics_listen: crate::config::socket_addr("proxy.metrics_listen", &f.metrics_listen)?,
            timeouts,
            limits,
            max_response_bytes: l.max_response_bytes.unwrap_or(DEFAULT_MAX_RESPONSE_BYTES),
            namespaces,
        })
    }
}

fn addr_list(
    key: &str,
    v: &Option<OneOrMany>,
    default: &[&str],
) -> Result<Vec<SocketAddr>, ConfigError> {
    let items: Vec<&str> = v
        .as_ref()
        .map_or_else(|| default.to_vec(), OneOrMany::items);
    let mut out = Vec::with_capacity(items.len());
    for (j, a) in items.iter().enumerate() {
        out.push(a.parse().map_err(|_| {
            invalid(
                format!("{key}[{j}]"),
                format!("{a:?} is not an address:port"),
            )
        })?);
    }
    if out.is_empty() {
        return Err(invalid(key, "needs at least one address"));
    }
    Ok(out)
}

fn discover_config(
    f: &DiscoverFile,
    netns_dir: &Path,
) -> Result<Option<DiscoverConfig>, ConfigError> {
    if !f.enabled.unwrap_or(false) {
        return Ok(None);
    }
    let router_prefix = f.router_prefix.clone().unwrap_or_else(|| "qrouter-".into());
    let network_prefixes = f
        .network_prefixes
        .clone()
        .unwrap_or_else(|| vec!["qdhcp-".into()]);
    let ovn_prefixes = f
        .ovn_prefixes
        .clone()
        .unwrap_or_else(|| vec!["ovnmeta-".into()]);
    for (key, list) in [
        (
            "proxy.discover.router_prefix",
            std::slice::from_ref(&router_prefix),
        ),
        ("proxy.discover.network_prefixes", &network_prefixes[..]),
        ("proxy.discover.ovn_prefixes", &ovn_prefixes[..]),
    ] {
        if list.iter().any(String::is_empty) {
            return Err(invalid(key, "prefixes must not be empty"));
        }
    }
    Ok(Some(DiscoverConfig {
        dir: netns_dir.to_path_buf(),
        router_prefix,
        network_prefixes,
        ovn_prefixes,
        router_listen: addr_list(
            "proxy.discover.router_listen",
            &f.router_listen,
            &["[::]:9697"],
        )?,
        network_listen: addr_list(
            "proxy.discover.network_listen",
            &f.network_listen,
            &["169.254.169.254:80"],
        )?,
        network_v6_port: match f.network_v6_port.unwrap_or(80) {
            0 => None,
            p => Some(p),
        },
    }))
}

/// `[proxy.rate_limit]` (or the same keys in another `section`, e.g.
/// `ovn.metadata_rate_limiting`) → the limiter's settings, `None` when off;
/// errors name `<section>.<key>`.
///
/// # Errors
/// A zero window, limit or table size.
pub fn rate_limit_config(
    section: &str,
    f: &RateLimitFile,
) -> Result<Option<crate::proxy::ratelimit::RateLimitConfig>, ConfigError> {
    let key = |k: &str| format!("{section}.{k}");
    use crate::proxy::ratelimit::{RateLimitConfig, Window, DEFAULT_TABLE_SIZE};
    if !f.enabled.unwrap_or(false) {
        return Ok(None);
    }
    let ten = Duration::from_secs(10);
    let limit = |key: &str, v: Option<u32>| match v.unwrap_or(10) {
        0 => Err(invalid(key, "must be at least 1")),
        n => Ok(n),
    };
    Ok(Some(RateLimitConfig {
        base: Window {
            window: dur(&key("base_window"), &f.base_window, ten)?,
            limit: limit(&key("base_limit"), f.base_limit)?,
        },
        burst: Window {
            window: dur(&key("burst_window"), &f.burst_window, ten)?,
            limit: limit(&key("burst_limit"), f.burst_limit)?,
        },
        table_size: nonzero(&key("table_size"), f.table_size, DEFAULT_TABLE_SIZE)?.get(),
    }))
}

fn namespace_config(
    i: usize,
    ns: &NamespaceFile,
    netns_dir: &Path,
) -> Result<NamespaceConfig, ConfigError> {
    let key = |k: &str| format!("proxy.namespace[{i}].{k}");
    let given: Vec<(&str, &String)> = [
        ("router_id", &ns.router_id),
        ("network_id", &ns.network_id),
        ("ovn_network_id", &ns.ovn_network_id),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
    .collect();
    let identity = match given[..] {
        [(k, v)] if !is_uuid(v) => return Err(invalid(key(k), format!("{v:?} is not a UUID"))),
        [("router_id", v)] => NsIdentity::Router(v.to_ascii_lowercase()),
        [("network_id", v)] => NsIdentity::Network(v.to_ascii_lowercase()),
        [(_, v)] => NsIdentity::OvnNetwork(v.to_ascii_lowercase()),
        [] => {
            return Err(invalid(
                key("router_id"),
                "set exactly one of router_id, network_id and ovn_network_id",
            ))
        }
        [(k, _), ..] => {
            return Err(invalid(
                key(k),
                "set exactly one of router_id, network_id and ovn_network_id, not several",
            ))
        }
    };
    let mut listen = Vec::new();
    for (j, a) in ns.listen.items().into_iter().enumerate() {
        let addr: SocketAddr = a.parse().map_err(|_| {
            invalid(
                format!("proxy.namespace[{i}].listen[{j}]"),
                format!("{a:?} is not an address:port like \"0.0.0.0:9697\" or \"[::]:9697\""),
            )
        })?;
        listen.push(addr);
    }
    if listen.is_empty() {
        return Err(invalid(key("listen"), "needs at least one address"));
    }
    let (name, netns) = match &ns.netns {
        None => ("host".to_string(), None),
        Some(n) if n.is_empty() => return Err(invalid(key("netns"), "empty name")),
        Some(n) => (n.clone(), Some(crate::rt::netns::resolve(n, netns_dir))),
    };
    Ok(NamespaceConfig {
        name,
        netns,
        identity,
        listen,
    })
}

/// Read and parse a config file, `[proxy]` typed (toml's line and column
/// in its errors). Every daemon's loader reads the file through this, so a
/// malformed `[proxy]` is refused by all of them.
///
/// # Errors
/// The file is unreadable or not valid TOML for [`FileConfig<ProxyFile>`].
pub fn load_file(path: &Path) -> Result<FileConfig<ProxyFile>, ConfigError> {
    parse_str(&crate::config::read(path)?, path)
}

/// Parse config text, `[proxy]` typed (`path` is only used in messages).
///
/// # Errors
/// Not valid TOML for [`FileConfig<ProxyFile>`].
pub fn parse_str(text: &str, path: &Path) -> Result<FileConfig<ProxyFile>, ConfigError> {
    crate::config::parse_as(text, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(text: &str) -> Result<ProxyConfig, ConfigError> {
        let f = parse_str(text, Path::new("t.toml"))?;
        ProxyConfig::try_from(&f.proxy.unwrap_or_default())
    }

    #[test]
    fn defaults_match_neutron_haproxy() {
        let c = proxy("[proxy]\n").unwrap();
        assert_eq!(c.timeouts, Timeouts::default());
        assert_eq!(c.timeouts.client, Duration::from_secs(32));
        assert_eq!(c.backlog, 4096);
        assert_eq!(c.max_connections.get(), 65_536);
        assert_eq!(c.pool_size.get(), DEFAULT_POOL_SIZE);
        assert_eq!(c.ignored_pipeline_depth, None);
        assert_eq!(c.agent_socket, PathBuf::from(DEFAULT_AGENT_SOCKET));
    }

    #[test]
    fn namespace_entries_validate_and_name_the_key() {
        let ok = proxy(
            "[[proxy.namespace]]\nnetns = \"qrouter-1\"\nrouter_id = \"6E1F3B0C-9D6A-4F0E-8B7A-2C1D0E9F8A7B\"\nlisten = \"0.0.0.0:9697\"\n",
        )
        .unwrap();
        assert_eq!(
            ok.namespaces[0].netns,
            Some(PathBuf::from("/run/netns/qrouter-1"))
        );
        assert_eq!(
            ok.namespaces[0].identity,
            NsIdentity::Router("6e1f3b0c-9d6a-4f0e-8b7a-2c1d0e9f8a7b".into())
        );
        let ovn = proxy(
            "[[proxy.namespace]]\novn_network_id = \"6E1F3B0C-9D6A-4F0E-8B7A-2C1D0E9F8A7B\"\nlisten = \"169.254.169.254:80\"\n",
        )
        .unwrap();
        assert_eq!(
            ovn.namespaces[0].identity,
            NsIdentity::OvnNetwork("6e1f3b0c-9d6a-4f0e-8b7a-2c1d0e9f8a7b".into())
        );
        assert_eq!(ovn.namespaces[0].identity.header_name(), "X-OVN-Network-ID");
        let cases = [
            ("router_id = \"nope\"\nlisten = \"0.0.0.0:1\"", "proxy.namespace[0].router_id"),
            ("network_id = \"nope\"\nlisten = \"0.0.0.0:1\"", "proxy.namespace[0].network_id"),
            ("ovn_network_id = \"nope\"\nlisten = \"0.0.0.0:1\"", "proxy.namespace[0].ovn_network_id"),
            (
                "network_id = \"6e1f3b0c-9d6a-4f0e-8b7a-2c1d0e9f8a7b\"\novn_network_id = \"6e1f3b0c-9d6a-4f0e-8b7a-2c1d0e9f8a7b\"\nlisten = \"0.0.0.0:1\"",
                "proxy.namespace[0].network_id",
            ),
            ("listen = \"0.0.0.0:1\"", "proxy.namespace[0].router_id"),
            (
                "router_id = \"6e1f3b0c-9d6a-4f0e-8b7a-2c1d0e9f8a7b\"\nnetwork_id = \"6e1f3b0c-9d6a-4f0e-8b7a-2c1d0e9f8a7b\"\nlisten = \"0.0.0.0:1\"",
                "proxy.namespace[0].router_id",
            ),
            (
                "router_id = \"6e1f3b0c-9d6a-4f0e-8b7a-2c1d0e9f8a7b\"\nlisten = [\"0.0.0.0:1\", \"localhost\"]",
                "proxy.namespace[0].listen[1]",
            ),
        ];
        for (body, key) in cases {
            match proxy(&format!("[[proxy.namespace]]\n{body}\n")) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{body}"),
                other => panic!("{body}: expected Invalid({key}), got {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_keys_and_bad_durations_are_refused() {
        let e = proxy("[proxy]\nworkerz = 2\n").unwrap_err().to_string();
        assert!(e.contains("workerz"), "{e}");
        let e = proxy("[proxy.timeouts]\nserver = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("proxy.timeouts.server"), "{e}");
        let e = proxy("[proxy.timeouts]\nserver = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("proxy.timeouts.server"), "{e}");
        let e = proxy("[proxy]\nupstream_pool_size = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("upstream_pool_size"), "{e}");
    }

    #[test]
    fn settings_compare_everything_but_the_namespaces() {
        let ns = "[[proxy.namespace]]\nrouter_id = \"6e1f3b0c-9d6a-4f0e-8b7a-2c1d0e9f8a7b\"\nlisten = \"127.0.0.1:1\"\n";
        let (a, b) = (proxy("[proxy]\n").unwrap(), proxy(ns).unwrap());
        assert_ne!(a.namespaces, b.namespaces);
        assert_eq!(a.settings(), b.settings());
        let c = proxy("[proxy.timeouts]\nserver = \"31s\"\n").unwrap();
        assert_ne!(a.settings(), c.settings());
        let d = proxy("[proxy.rate_limit]\nenabled = true\n").unwrap();
        assert_ne!(a.settings(), d.settings());
    }
}
