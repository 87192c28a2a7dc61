//! `[agent]` → validated [`AgentConfig`], once, at start.
//!
//! The top-level [`crate::config::FileConfig`] keeps `[agent]` as a raw TOML
//! table so that each daemon validates only its own section; this module
//! parses it into [`AgentFile`] (`deny_unknown_fields`, every key optional)
//! and converts it with `TryFrom`, naming the key on the first error. Option
//! names follow `metadata_agent.ini` where one exists (spec §3.7), so an
//! operator can copy values across.
//!
//! Not built yet, and refused loudly rather than ignored: HTTPS to the
//! metadata API (`nova_metadata_protocol = "https"`). Neutron and Keystone
//! may be `https://` (rustls; `insecure`, `ca_file`).
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

use crate::config::{
    dur, dur_or_zero, invalid, nonzero, ConfigError, DurationFile, DEFAULT_AGENT_SOCKET,
};
use crate::http::{self, Limits};

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
/// Whole-exchange timeout of one Neutron or Keystone call (python-neutronclient's
/// default is 30 s; a guest waits behind this, so shorter).
pub const DEFAULT_NEUTRON_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the first miss on a network set waits for company before its
/// batch goes to Neutron.
pub const DEFAULT_BATCH_WINDOW: Duration = Duration::from_millis(2);
/// Largest prefetch of one network set's ports; a bigger network is looked up
/// key by key (batched) instead of being held in the cache whole.
pub const DEFAULT_PREFETCH_MAX_PORTS: usize = 5000;
/// Idle Neutron connections kept per loop.
pub const NEUTRON_POOL_SIZE: usize = 4;

/// `[agent.neutron]`: where Neutron and Keystone are.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct NeutronFile {
    /// Neutron API endpoint, e.g. `http://127.0.0.1:9696`.
    pub url: Option<String>,
    /// `keystone` (default) | `noauth`.
    pub auth_strategy: Option<String>,
    /// Keystone v3 endpoint, e.g. `http://127.0.0.1:5000/v3`.
    pub auth_url: Option<String>,
    /// Password auth: user name.
    pub username: Option<String>,
    /// Password auth: password.
    pub password: Option<String>,
    /// Password auth: project to scope the token to.
    pub project_name: Option<String>,
    /// Password auth: the user's domain (default `Default`).
    pub user_domain_name: Option<String>,
    /// Password auth: the project's domain (default `Default`).
    pub project_domain_name: Option<String>,
    /// Application-credential auth: id.
    pub application_credential_id: Option<String>,
    /// Application-credential auth: secret.
    pub application_credential_secret: Option<String>,
    /// Region (informational: `url` is configured, the catalog is not read).
    pub region_name: Option<String>,
    /// Whole-exchange timeout per call.
    pub timeout: Option<DurationFile>,
    /// Accept any certificate from Neutron and Keystone.
    pub insecure: Option<bool>,
    /// CA bundle (PEM) for Neutron and Keystone; default: the Mozilla roots.
    pub ca_file: Option<PathBuf>,
}

/// `[agent.nova]`: where the metadata API is.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct NovaFile {
    /// Host name or address of the metadata API.
    pub nova_metadata_host: Option<String>,
    /// Its port.
    pub nova_metadata_port: Option<u16>,
    /// `http` or `https`.
    pub nova_metadata_protocol: Option<String>,
    /// `https`: accept any server certificate.
    pub nova_metadata_insecure: Option<bool>,
    /// `https`: CA bundle (PEM) to verify the API with (default: Mozilla roots).
    pub auth_ca_cert: Option<PathBuf>,
    /// `https`: client certificate (PEM) presented to the API.
    pub nova_client_cert: Option<PathBuf>,
    /// `https`: its private key (PEM).
    pub nova_client_priv_key: Option<PathBuf>,
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
    /// Open connections on the socket; at the cap the agent stops accepting
    /// until one closes.
    pub max_connections: Option<usize>,
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
    /// Misses on one network set within this window share one Neutron query.
    pub batch_window: Option<DurationFile>,
    /// ... or this many keys, whichever comes first.
    pub batch_max: Option<usize>,
    /// Fetch all ports of a network set on its first miss (default true).
    pub prefetch_network: Option<bool>,
    /// Largest network set prefetched, in ports.
    pub prefetch_max_ports: Option<usize>,
    /// `host:port` for the Prometheus endpoint (off when absent).
    pub metrics_listen: Option<String>,
    /// One line per request: client, scope, the instance it resolved to.
    pub access_log: Option<bool>,
    /// How long `stop` (SIGTERM) waits for requests in flight.
    pub drain_timeout: Option<DurationFile>,
    /// `[agent.timeouts]`
    #[serde(default)]
    pub timeouts: AgentTimeoutsFile,
    /// `[agent.limits]`
    #[serde(default)]
    pub limits: AgentLimitsFile,
    /// `[agent.nova]`
    #[serde(default)]
    pub nova: NovaFile,
    /// `[agent.neutron]`
    #[serde(default)]
    pub neutron: NeutronFile,
    /// oslo.messaging URL of RabbitMQ for `report_state` (no reporting when absent).
    pub transport_url: Option<String>,
    /// The host name reported to Neutron (default: the hostname).
    pub host: Option<String>,
    /// Between state reports (default 30 s; 0 disables reporting).
    pub report_interval: Option<DurationFile>,
    /// `[agent.oslo_messaging_rabbit]`
    #[serde(default)]
    pub oslo_messaging_rabbit: RabbitFile,
}

/// `[agent.oslo_messaging_rabbit]`: TLS to RabbitMQ, oslo.messaging's names.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RabbitFile {
    /// Connect over TLS (`amqps`).
    pub ssl: Option<bool>,
    /// CA bundle (PEM) trusted for the broker's certificate, besides the Mozilla roots.
    pub ssl_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) presented to the broker.
    pub ssl_cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    pub ssl_key_file: Option<PathBuf>,
}

/// `[agent] transport_url`, `host`, `report_interval` and
/// `[agent.oslo_messaging_rabbit]` → the reporter's settings; `None` when
/// reporting is off (no `transport_url`, or `report_interval = 0`).
///
/// # Errors
/// A bad value, naming its key (never the URL's password).
pub fn report_config(f: &AgentFile) -> Result<Option<super::report::ReportConfig>, ConfigError> {
    let r = &f.oslo_messaging_rabbit;
    let Some(url) = &f.transport_url else {
        if r.ssl.is_some()
            || r.ssl_ca_file.is_some()
            || r.ssl_cert_file.is_some()
            || r.ssl_key_file.is_some()
        {
            return Err(invalid(
                "agent.oslo_messaging_rabbit",
                "set without agent.transport_url",
            ));
        }
        return Ok(None);
    };
    let transport = super::report::TransportUrl::parse(url)
        .map_err(|e| invalid("agent.transport_url", e.to_string()))?;
    let interval = dur_or_zero(
        "agent.report_interval",
        &f.report_interval,
        super::report::DEFAULT_REPORT_INTERVAL,
    )?;
    let host = match &f.host {
        Some(h) if h.trim().is_empty() || h.len() > 255 => {
            return Err(invalid("agent.host", "must be 1 to 255 characters"))
        }
        Some(h) => h.clone(),
        None => nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .filter(|h| !h.is_empty())
            .ok_or_else(|| invalid("agent.host", "not set and the hostname is unknown"))?,
    };
    let read = |key: &str, p: &PathBuf| {
        std::fs::read(p).map_err(|e| {
            invalid(
                format!("agent.oslo_messaging_rabbit.{key}"),
                format!("{}: {e}", p.display()),
            )
        })
    };
    let tls = if r.ssl.unwrap_or(false) {
        let identity = match (&r.ssl_cert_file, &r.ssl_key_file) {
            (Some(c), Some(k)) => Some((read("ssl_cert_file", c)?, read("ssl_key_file", k)?)),
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "agent.oslo_messaging_rabbit.ssl_cert_file",
                    "set both ssl_cert_file and ssl_key_file, or neither",
                ))
            }
        };
        let ca_pem = match &r.ssl_ca_file {
            None => None,
            Some(p) => Some(std::fs::read_to_string(p).map_err(|e| {
                invalid(
                    "agent.oslo_messaging_rabbit.ssl_ca_file",
                    format!("{}: {e}", p.display()),
                )
            })?),
        };
        Some(super::report::RabbitTls { ca_pem, identity })
    } else {
        for (key, set) in [
            ("ssl_ca_file", r.ssl_ca_file.is_some()),
            ("ssl_cert_file", r.ssl_cert_file.is_some()),
            ("ssl_key_file", r.ssl_key_file.is_some()),
        ] {
            if set {
                return Err(invalid(
                    format!("agent.oslo_messaging_rabbit.{key}"),
                    "set but ssl is not true",
                ));
            }
        }
        None
    };
    if interval.is_zero() {
        return Ok(None);
    }
    crate::config::AMQP_REPORT.require(
        "agent.transport_url",
        &format!("{:?}", transport.redacted()),
    )?;
    Ok(Some(super::report::ReportConfig {
        transport,
        tls,
        host,
        interval,
    }))
}

/// `[agent.timeouts]`: the client-side haproxy timeouts, as in
/// `[proxy.timeouts]` and `[api.timeouts]` (the agent's upstream timeout is
/// `[agent.nova] timeout`).
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct AgentTimeoutsFile {
    /// From the first byte of a request to its complete head.
    pub http_request: Option<DurationFile>,
    /// Each body read and each response write.
    pub client: Option<DurationFile>,
    /// Idle time allowed between requests on a kept-alive connection.
    pub keep_alive: Option<DurationFile>,
}

/// `[agent.limits]`: request limits, as in `[proxy.limits]`.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct AgentLimitsFile {
    /// Request head bytes (431 beyond).
    pub max_head_bytes: Option<usize>,
    /// Request headers (431 beyond).
    pub max_headers: Option<usize>,
    /// Request body bytes (413 beyond).
    pub max_body_bytes: Option<u64>,
}

/// The agent's client-side timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentTimeouts {
    /// From the first byte of a request to its complete head.
    pub http_request: Duration,
    /// Each body read and each response write.
    pub client: Duration,
    /// Idle time between requests on a kept-alive connection.
    pub keep_alive: Duration,
}

impl Default for AgentTimeouts {
    fn default() -> Self {
        AgentTimeouts {
            http_request: DEFAULT_HTTP_REQUEST_TIMEOUT,
            client: DEFAULT_CLIENT_TIMEOUT,
            keep_alive: DEFAULT_KEEP_ALIVE_TIMEOUT,
        }
    }
}

/// `[agent.timeouts] http_request` by default.
pub const DEFAULT_HTTP_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// `[agent.timeouts] client` by default.
pub const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(32);
/// `[agent.timeouts] keep_alive` by default: longer than the proxy's, so
/// the proxy (the client) is the side that closes an idle pooled connection.
pub const DEFAULT_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(120);
/// `agent.drain_timeout` by default.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Head bytes a proxy in front may add to a request it accepted: metaproxy's
/// rewrite appends `X-Forwarded-For` (an IPv6 address, at most 39
/// characters) and one router or network id (a 36-character uuid), about
/// 130 bytes; haproxy's Neutron config adds the same two. Rounded up.
pub const PROXY_ADDED_HEAD_BYTES: usize = 512;
/// Header fields a proxy in front may add (the same two, rounded up).
pub const PROXY_ADDED_HEADERS: usize = 4;
/// `[agent.limits]` by default: the proxy's defaults plus what the proxy
/// adds, so a head the proxy accepted at its limit (8 KiB, 64 fields) is not
/// refused here with a 431 after the rewrite grew it. The body limit is the
/// proxy's: the rewrite does not touch the body.
pub const DEFAULT_AGENT_LIMITS: Limits = Limits {
    max_head_bytes: http::DEFAULT_MAX_HEAD_BYTES + PROXY_ADDED_HEAD_BYTES,
    max_headers: http::DEFAULT_MAX_HEADERS + PROXY_ADDED_HEADERS,
    max_body_bytes: http::DEFAULT_MAX_BODY_BYTES,
};

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
    /// The Neutron REST API (boxed: it is much larger than a path).
    Neutron(Box<NeutronConfig>),
    /// The OVN Southbound replica (`metaproxy ovn` only; no file key
    /// selects it).
    Ovn(crate::ovn::serve::OvnReplica),
}

/// An `http(s)://host:port[/prefix]` endpoint, resolved once at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `Some(name to verify)` for `https://`.
    pub tls_name: Option<rustls::pki_types::ServerName<'static>>,
    /// Resolved address.
    pub addr: SocketAddr,
    /// `Host` header value.
    pub host_header: String,
    /// Path prefix without a trailing slash (`""` or `/identity/v3`).
    pub prefix: String,
}

impl Endpoint {
    /// Parse and resolve `url`; `key` names the option in errors.
    ///
    /// # Errors
    /// Not `http(s)://host[:port][/path]`, or the host does not resolve.
    pub fn parse(key: &str, url: &str) -> Result<Endpoint, ConfigError> {
        let (rest, https) = if let Some(r) = url.strip_prefix("http://") {
            (r, false)
        } else if let Some(r) = url.strip_prefix("https://") {
            (r, true)
        } else {
            return Err(invalid(
                key,
                format!("{url:?} is not an http:// or https:// URL"),
            ));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| invalid(key, format!("{url:?}: unclosed [")))?;
            (h, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let port: u16 = match port {
            None if https => 443,
            None => 80,
            Some(p) => p
                .parse()
                .map_err(|_| invalid(key, format!("{url:?}: bad port")))?,
        };
        if host.is_empty() {
            return Err(invalid(key, format!("{url:?}: no host")));
        }
        let addr = match host.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, port),
            Err(_) => (host, port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| invalid(key, format!("{host:?} does not resolve")))?,
        };
        let host_header = match host.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
            _ => format!("{host}:{port}"),
        };
        let tls_name = if https {
            Some(
                rustls::pki_types::ServerName::try_from(host.to_string())
                    .map_err(|e| invalid(key, format!("{host:?}: {e}")))?,
            )
        } else {
            None
        };
        Ok(Endpoint {
            tls_name,
            addr,
            host_header,
            prefix: path.trim_end_matches('/').to_string(),
        })
    }
}

/// How the agent authenticates to Neutron.
#[derive(Clone, PartialEq, Eq)]
pub enum NeutronAuth {
    /// No token (Neutron's `auth_strategy = noauth`).
    NoAuth,
    /// A Keystone v3 token.
    Keystone {
        /// The Keystone v3 endpoint (`…/v3`), boxed: `NoAuth` is empty.
        endpoint: Box<Endpoint>,
        /// What to authenticate with.
        method: KeystoneMethod,
    },
}

/// Keystone v3 credentials. `Debug` redacts the secrets.
#[derive(Clone, PartialEq, Eq)]
pub enum KeystoneMethod {
    /// `password` with a project scope.
    Password {
        /// User name.
        username: String,
        /// Password. Never logged.
        password: String,
        /// The user's domain name.
        user_domain_name: String,
        /// Project name.
        project_name: String,
        /// The project's domain name.
        project_domain_name: String,
    },
    /// `application_credential`.
    ApplicationCredential {
        /// Credential id.
        id: String,
        /// Credential secret. Never logged.
        secret: String,
    },
}

impl fmt::Debug for NeutronAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NeutronAuth::NoAuth => f.write_str("NoAuth"),
            NeutronAuth::Keystone { endpoint, method } => {
                let how = match method {
                    KeystoneMethod::Password {
                        username,
                        project_name,
                        ..
                    } => format!("password user={username} project={project_name} <redacted>"),
                    KeystoneMethod::ApplicationCredential { id, .. } => {
                        format!("application_credential id={id} <redacted>")
                    }
                };
                write!(f, "Keystone({} {how})", endpoint.addr)
            }
        }
    }
}

/// A built rustls client config (compared by identity).
#[derive(Clone)]
pub struct TlsClient(pub std::sync::Arc<rustls::ClientConfig>);

impl PartialEq for TlsClient {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for TlsClient {}

impl fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TlsClient")
    }
}

/// The Neutron backend's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeutronConfig {
    /// TLS for `https://` endpoints (Neutron and Keystone share it).
    pub tls: Option<TlsClient>,
    /// The Neutron API.
    pub endpoint: Endpoint,
    /// Token source.
    pub auth: NeutronAuth,
    /// Region (informational).
    pub region_name: Option<String>,
    /// Whole-exchange timeout per call (Neutron and Keystone).
    pub timeout: Duration,
    /// Batching window.
    pub batch_window: Duration,
    /// Keys per batched query.
    pub batch_max: NonZeroUsize,
    /// Prefetch a network set's ports on its first miss.
    pub prefetch_network: bool,
    /// Largest prefetch, in ports.
    pub prefetch_max_ports: usize,
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
    /// `https`: client config and the name to verify.
    pub tls: Option<super::forward::TlsTarget>,
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
    /// Connection cap (accept pauses at it).
    pub max_connections: NonZeroUsize,
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
    /// Prometheus endpoint, if any.
    pub metrics_listen: Option<SocketAddr>,
    /// One line per request.
    pub access_log: bool,
    /// How long `stop` waits for requests in flight.
    pub drain_timeout: Duration,
    /// Client-side timeouts (`[agent.timeouts]`).
    pub timeouts: AgentTimeouts,
    /// Request limits (`[agent.limits]`).
    pub limits: Limits,
    /// `report_state` to Neutron over RabbitMQ, when configured.
    pub report: Option<super::report::ReportConfig>,
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
            .field("max_connections", &self.max_connections)
            .field("backend", &self.backend)
            .field("shared_secret", &secret)
            .field("nova", &self.nova)
            .field("cache_ttl", &self.cache_ttl)
            .field("negative_cache_ttl", &self.negative_cache_ttl)
            .field("cache_capacity", &self.cache_capacity)
            .field("workers", &self.workers)
            .field("pool_size", &self.pool_size)
            .field("metrics_listen", &self.metrics_listen)
            .field("access_log", &self.access_log)
            .field("drain_timeout", &self.drain_timeout)
            .field("timeouts", &self.timeouts)
            .field("limits", &self.limits)
            .field("report", &self.report)
            .finish()
    }
}

/// Where a proxy's limits exceed what the agent accepts (`agent`, described
/// by `whose`, e.g. "[agent.limits]" or "the agent's defaults"), one
/// sentence each: a request the proxy accepts near its limit is then
/// refused by the agent (431/413) after the proxy's rewrite added up to
/// [`PROXY_ADDED_HEAD_BYTES`] and [`PROXY_ADDED_HEADERS`].
pub fn proxy_limit_warnings(proxy: &Limits, agent: &Limits, whose: &str) -> Vec<String> {
    let mut w = Vec::new();
    let head = proxy.max_head_bytes + PROXY_ADDED_HEAD_BYTES;
    if head > agent.max_head_bytes {
        w.push(format!(
            "proxy.limits.max_head_bytes = {} exceeds what the agent accepts ({whose}: \
             agent.limits.max_head_bytes = {}, and the proxy adds up to {PROXY_ADDED_HEAD_BYTES} \
             bytes): heads near the proxy's limit get 431 from the agent; set \
             agent.limits.max_head_bytes to at least {head}",
            proxy.max_head_bytes, agent.max_head_bytes
        ));
    }
    let headers = proxy.max_headers + PROXY_ADDED_HEADERS;
    if headers > agent.max_headers {
        w.push(format!(
            "proxy.limits.max_headers = {} exceeds what the agent accepts ({whose}: \
             agent.limits.max_headers = {}, and the proxy adds up to {PROXY_ADDED_HEADERS}): \
             set agent.limits.max_headers to at least {headers}",
            proxy.max_headers, agent.max_headers
        ));
    }
    if proxy.max_body_bytes > agent.max_body_bytes {
        w.push(format!(
            "proxy.limits.max_body_bytes = {} exceeds what the agent accepts ({whose}: \
             agent.limits.max_body_bytes = {}): larger bodies get 413 from the agent",
            proxy.max_body_bytes, agent.max_body_bytes
        ));
    }
    w
}

impl AgentConfig {
    /// Accepted but unsafe settings, one sentence each: logged at start and
    /// printed by `--check`.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.shared_secret.is_empty() {
            w.push(crate::sign::empty_secret_warning(
                "agent.metadata_proxy_shared_secret",
            ));
        }
        w
    }
}

impl AgentFile {
    /// The validated `[agent.limits]` (defaults: [`DEFAULT_AGENT_LIMITS`]).
    ///
    /// # Errors
    /// A limit out of range, naming its key.
    pub fn limits(&self) -> Result<Limits, ConfigError> {
        let l = &self.limits;
        crate::config::limits(
            "agent.limits",
            (l.max_head_bytes, l.max_headers, l.max_body_bytes),
            DEFAULT_AGENT_LIMITS,
        )
    }

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
            "neutron" => Backend::Neutron(Box::new(neutron_config(f)?)),
            other => {
                return Err(invalid(
                    "agent.backend",
                    format!("{other:?} is not a backend (inventory, neutron)"),
                ))
            }
        };
        let nova = nova_config("agent.nova", &f.nova)?;
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
            max_connections: NonZeroUsize::new(
                f.max_connections
                    .unwrap_or(crate::config::DEFAULT_MAX_CONNECTIONS),
            )
            .ok_or_else(|| invalid("agent.max_connections", "must be at least 1"))?,
            backend,
            shared_secret: f.metadata_proxy_shared_secret.clone().unwrap_or_default(),
            nova,
            cache_ttl: dur_or_zero(
                "agent.cache_ttl",
                &f.cache_ttl,
                super::cache::DEFAULT_POSITIVE_TTL,
            )?,
            negative_cache_ttl: dur_or_zero(
                "agent.negative_cache_ttl",
                &f.negative_cache_ttl,
                super::cache::DEFAULT_NEGATIVE_TTL,
            )?,
            cache_capacity: f.cache_capacity.unwrap_or(super::cache::DEFAULT_CAPACITY),
            workers,
            pool_size: nonzero("agent.pool_size", f.pool_size, DEFAULT_POOL_SIZE)?,
            metrics_listen: crate::config::socket_addr("agent.metrics_listen", &f.metrics_listen)?,
            access_log: f.access_log.unwrap_or(false),
            drain_timeout: dur(
                "agent.drain_timeout",
                &f.drain_timeout,
                DEFAULT_DRAIN_TIMEOUT,
            )?,
            timeouts: AgentTimeouts {
                http_request: dur(
                    "agent.timeouts.http_request",
                    &f.timeouts.http_request,
                    DEFAULT_HTTP_REQUEST_TIMEOUT,
                )?,
                client: dur(
                    "agent.timeouts.client",
                    &f.timeouts.client,
                    DEFAULT_CLIENT_TIMEOUT,
                )?,
                keep_alive: dur(
                    "agent.timeouts.keep_alive",
                    &f.timeouts.keep_alive,
                    DEFAULT_KEEP_ALIVE_TIMEOUT,
                )?,
            },
            limits: f.limits()?,
            report: report_config(f)?,
        })
    }
}

/// The metadata API options (`nova_metadata_host`, `_port`, `_protocol`,
/// the TLS files, `timeout`) of `section` (`agent.nova`, `ovn.nova`), as
/// Neutron reads them; errors name `<section>.<key>`.
///
/// # Errors
/// A bad protocol, a zero port, a host that does not resolve, TLS options
/// that do not fit together or cannot be loaded.
pub fn nova_config(section: &str, n: &NovaFile) -> Result<NovaConfig, ConfigError> {
    let key = |k: &str| format!("{section}.{k}");
    let https = match n.nova_metadata_protocol.as_deref().unwrap_or("http") {
        "http" => false,
        "https" => true,
        other => {
            return Err(invalid(
                key("nova_metadata_protocol"),
                format!("{other:?} is not http or https"),
            ))
        }
    };
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
        return Err(invalid(key("nova_metadata_port"), "must not be 0"));
    }
    let addr = match host.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port),
        Err(_) => (host.as_str(), port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| {
                invalid(
                    key("nova_metadata_host"),
                    format!("{host:?} does not resolve"),
                )
            })?,
    };
    let tls = if https {
        // Neutron's rule: verify with auth_ca_cert unless insecure; a client
        // certificate when both nova_client_cert and nova_client_priv_key are set.
        let client = match (&n.nova_client_cert, &n.nova_client_priv_key) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            (None, None) => None,
            _ => {
                return Err(invalid(
                    key("nova_client_cert"),
                    "set both nova_client_cert and nova_client_priv_key, or neither",
                ))
            }
        };
        let cfg = super::tls::client_config_with_cert(
            n.nova_metadata_insecure.unwrap_or(false),
            n.auth_ca_cert.as_deref(),
            client,
        )
        .map_err(|e| invalid(key("auth_ca_cert"), e.to_string()))?;
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|e| invalid(key("nova_metadata_host"), e.to_string()))?;
        Some((cfg, name))
    } else {
        if n.nova_metadata_insecure.is_some()
            || n.auth_ca_cert.is_some()
            || n.nova_client_cert.is_some()
        {
            return Err(invalid(
                key("nova_metadata_protocol"),
                "TLS options are set but the protocol is http",
            ));
        }
        None
    };
    Ok(NovaConfig {
        host,
        port,
        addr,
        tls,
        timeout: dur(&key("timeout"), &n.timeout, DEFAULT_NOVA_TIMEOUT)?,
    })
}

fn required(key: &str, v: &Option<String>, why: &str) -> Result<String, ConfigError> {
    match v {
        Some(s) if !s.is_empty() => Ok(s.clone()),
        _ => Err(invalid(key, format!("required {why}"))),
    }
}

fn neutron_config(f: &AgentFile) -> Result<NeutronConfig, ConfigError> {
    let mut c = neutron_section("agent.neutron", &f.neutron, "with backend = \"neutron\"")?;
    c.batch_window = dur_or_zero("agent.batch_window", &f.batch_window, DEFAULT_BATCH_WINDOW)?;
    c.batch_max = nonzero(
        "agent.batch_max",
        f.batch_max,
        super::batch::DEFAULT_MAX_BATCH,
    )?;
    c.prefetch_network = f.prefetch_network.unwrap_or(true);
    c.prefetch_max_ports = f.prefetch_max_ports.unwrap_or(DEFAULT_PREFETCH_MAX_PORTS);
    Ok(c)
}

/// A Neutron section (`[agent.neutron]`, `[api.neutron]`: the same keys)
/// into a [`NeutronConfig`] with the agent's default batching; errors name
/// `{prefix}.key`; `when` says why `url` is required.
///
/// # Errors
/// A missing or invalid key, named.
pub fn neutron_section(
    prefix: &str,
    n: &NeutronFile,
    when: &str,
) -> Result<NeutronConfig, ConfigError> {
    let k = |key: &str| format!("{prefix}.{key}");
    let url = required(&k("url"), &n.url, when)?;
    let endpoint = Endpoint::parse(&k("url"), &url)?;
    let auth = match n.auth_strategy.as_deref().unwrap_or("keystone") {
        "noauth" => NeutronAuth::NoAuth,
        "keystone" => {
            let why = "with auth_strategy = \"keystone\"";
            let auth_url = required(&k("auth_url"), &n.auth_url, why)?;
            let endpoint = Endpoint::parse(&k("auth_url"), &auth_url)?;
            let method = if n.application_credential_id.is_some() {
                KeystoneMethod::ApplicationCredential {
                    id: required(
                        &k("application_credential_id"),
                        &n.application_credential_id,
                        why,
                    )?,
                    secret: required(
                        &k("application_credential_secret"),
                        &n.application_credential_secret,
                        "with application_credential_id",
                    )?,
                }
            } else {
                let dflt = |v: &Option<String>| v.clone().unwrap_or_else(|| "Default".into());
                KeystoneMethod::Password {
                    username: required(&k("username"), &n.username, why)?,
                    password: required(&k("password"), &n.password, why)?,
                    user_domain_name: dflt(&n.user_domain_name),
                    project_name: required(&k("project_name"), &n.project_name, why)?,
                    project_domain_name: dflt(&n.project_domain_name),
                }
            };
            NeutronAuth::Keystone {
                endpoint: Box::new(endpoint),
                method,
            }
        }
        other => {
            return Err(invalid(
                k("auth_strategy"),
                format!("{other:?} is not keystone or noauth"),
            ))
        }
    };
    let any_https = endpoint.tls_name.is_some()
        || matches!(&auth, NeutronAuth::Keystone { endpoint, .. } if endpoint.tls_name.is_some());
    let tls = if any_https {
        let cfg = super::tls::client_config(n.insecure.unwrap_or(false), n.ca_file.as_deref())
            .map_err(|e| invalid(k("ca_file"), e.to_string()))?;
        Some(TlsClient(cfg))
    } else {
        None
    };
    Ok(NeutronConfig {
        tls,
        endpoint,
        auth,
        region_name: n.region_name.clone(),
        timeout: dur(&k("timeout"), &n.timeout, DEFAULT_NEUTRON_TIMEOUT)?,
        batch_window: DEFAULT_BATCH_WINDOW,
        batch_max: NonZeroUsize::new(super::batch::DEFAULT_MAX_BATCH).unwrap_or(NonZeroUsize::MIN),
        prefetch_network: true,
        prefetch_max_ports: DEFAULT_PREFETCH_MAX_PORTS,
    })
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

    /// A build without `amqp-report` (`cargo test --no-default-features`):
    /// a `transport_url` is refused at load, naming the key and the feature
    /// and never the password; `report_interval = 0` (no reporting) is not.
    #[test]
    #[cfg(not(feature = "amqp-report"))]
    fn transport_url_without_the_feature_is_refused_naming_the_key() {
        let e = agent("inventory = \"i\"\ntransport_url = \"rabbit://u:hunter2@h/\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`agent.transport_url`")
                && e.contains("built without the \"amqp-report\" feature")
                && !e.contains("hunter2"),
            "{e}"
        );
        let off = agent("inventory = \"i\"\ntransport_url = \"rabbit://h/\"\nreport_interval = 0");
        assert_eq!(off.unwrap().report, None);
    }

    #[test]
    #[cfg(feature = "amqp-report")]
    fn report_state_settings() {
        assert_eq!(agent("inventory = \"i\"").unwrap().report, None);
        let c = agent(
            "inventory = \"i\"\ntransport_url = \"rabbit://u:pw@h1,u:pw@h2:5673/nv\"\n\
             host = \"net-1\"",
        )
        .unwrap();
        let r = c.report.unwrap();
        assert_eq!(
            (r.host.as_str(), r.interval),
            ("net-1", Duration::from_secs(30))
        );
        assert_eq!(
            (r.transport.hosts.len(), r.transport.vhost.as_str()),
            (2, "nv")
        );
        assert_eq!(r.tls, None);
        let c = agent("inventory = \"i\"\ntransport_url = \"rabbit://h/\"").unwrap();
        assert!(
            !c.report.unwrap().host.is_empty(),
            "defaults to the hostname"
        );
        let off = agent("inventory = \"i\"\ntransport_url = \"rabbit://h/\"\nreport_interval = 0");
        assert_eq!(off.unwrap().report, None);
        let tls = agent(
            "inventory = \"i\"\ntransport_url = \"rabbit://h/\"\n\
             [oslo_messaging_rabbit]\nssl = true",
        );
        assert_eq!(
            tls.unwrap().report.unwrap().tls,
            Some(crate::agent::report::RabbitTls {
                ca_pem: None,
                identity: None
            })
        );
    }

    #[test]
    fn bad_report_settings_name_their_key() {
        for (text, key) in [
            ("transport_url = \"amqp://u:hunter2@h/\"", "agent.transport_url"),
            ("transport_url = \"rabbit://u:hunter2@h:x/\"", "agent.transport_url"),
            ("transport_url = \"rabbit://h/\"\nreport_interval = \"soon\"", "agent.report_interval"),
            ("transport_url = \"rabbit://h/\"\nhost = \"\"", "agent.host"),
            (
                "transport_url = \"rabbit://h/\"\n[oslo_messaging_rabbit]\nssl = true\nssl_cert_file = \"c\"",
                "agent.oslo_messaging_rabbit.ssl_cert_file",
            ),
            (
                "transport_url = \"rabbit://h/\"\n[oslo_messaging_rabbit]\nssl = true\nssl_cert_file = \"/nonexistent\"\nssl_key_file = \"/nonexistent\"",
                "agent.oslo_messaging_rabbit.ssl_cert_file",
            ),
            (
                "transport_url = \"rabbit://h/\"\n[oslo_messaging_rabbit]\nssl_key_file = \"k\"",
                "agent.oslo_messaging_rabbit.ssl_key_file",
            ),
            (
                "transport_url = \"rabbit://h/\"\n[oslo_messaging_rabbit]\nssl_ca_file = \"c\"",
                "agent.oslo_messaging_rabbit.ssl_ca_file",
            ),
            (
                "transport_url = \"rabbit://h/\"\n[oslo_messaging_rabbit]\nssl = true\nssl_ca_file = \"/nonexistent\"",
                "agent.oslo_messaging_rabbit.ssl_ca_file",
            ),
            ("[oslo_messaging_rabbit]\nssl = true", "agent.oslo_messaging_rabbit"),
        ] {
            let e = agent(&format!("inventory = \"i\"\n{text}")).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
            assert!(!e.contains("hunter2"), "{text}: {e}");
        }
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
        assert_eq!(c.max_connections.get(), 65_536);
    }

    #[test]
    fn limits_and_timeouts_are_settings() {
        let c = agent("inventory = \"i\"").unwrap();
        assert_eq!(c.limits, DEFAULT_AGENT_LIMITS);
        assert_eq!(c.limits.max_head_bytes, 8 * 1024 + 512);
        assert_eq!(c.timeouts, AgentTimeouts::default());
        assert_eq!(c.timeouts.keep_alive, Duration::from_secs(120));
        assert_eq!(c.drain_timeout, Duration::from_secs(10));
        let c = agent(
            "inventory = \"i\"\ndrain_timeout = \"2s\"\n\
             [timeouts]\nhttp_request = \"5s\"\nclient = \"6s\"\nkeep_alive = \"7s\"\n\
             [limits]\nmax_head_bytes = 40000\nmax_headers = 100\nmax_body_bytes = 1000\n",
        )
        .unwrap();
        assert_eq!(c.drain_timeout, Duration::from_secs(2));
        assert_eq!(
            c.timeouts,
            AgentTimeouts {
                http_request: Duration::from_secs(5),
                client: Duration::from_secs(6),
                keep_alive: Duration::from_secs(7),
            }
        );
        assert_eq!(
            c.limits,
            Limits {
                max_head_bytes: 40000,
                max_headers: 100,
                max_body_bytes: 1000,
            }
        );
        let e = |t: &str| agent(t).unwrap_err().to_string();
        let i = "inventory = \"i\"\n";
        assert!(
            e(&format!("{i}[limits]\nmax_head_bytes = 10")).contains("agent.limits.max_head_bytes")
        );
        assert!(e(&format!("{i}[limits]\nmax_headers = 0")).contains("agent.limits.max_headers"));
        assert!(e(&format!("{i}[timeouts]\nclient = 0")).contains("agent.timeouts.client"));
        assert!(e(&format!("{i}[timeouts]\nserver = \"1s\"")).contains("server"));
    }

    #[test]
    fn a_proxy_limit_above_the_agents_is_reported() {
        let proxy = Limits {
            max_head_bytes: 32768,
            ..Limits::default()
        };
        let w = proxy_limit_warnings(&proxy, &DEFAULT_AGENT_LIMITS, "the agent's defaults");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("proxy.limits.max_head_bytes = 32768"),
            "{}",
            w[0]
        );
        assert!(w[0].contains("at least 33280"), "{}", w[0]);
        // The shipped defaults agree.
        assert!(proxy_limit_warnings(&Limits::default(), &DEFAULT_AGENT_LIMITS, "").is_empty());
        let agent = Limits {
            max_head_bytes: 33280,
            ..DEFAULT_AGENT_LIMITS
        };
        assert!(proxy_limit_warnings(&proxy, &agent, "").is_empty());
        let body = Limits {
            max_body_bytes: DEFAULT_AGENT_LIMITS.max_body_bytes + 1,
            max_headers: 61,
            ..Limits::default()
        };
        let w = proxy_limit_warnings(&body, &DEFAULT_AGENT_LIMITS, "");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("proxy.limits.max_body_bytes"));
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
        assert!(e("backend = \"bogus\"").contains("agent.backend"));
        assert!(e("backend = \"neutron\"").contains("agent.neutron.url"));
        let https =
            "backend = \"neutron\"\n[neutron]\nauth_strategy = \"noauth\"\nurl = \"ftp://n\"";
        assert!(e(https).contains("not an http:// or https:// URL"));
        let ca = "backend = \"neutron\"\n[neutron]\nauth_strategy = \"noauth\"\nurl = \"https://127.0.0.1\"\nca_file = \"/nonexistent.pem\"";
        assert!(e(ca).contains("agent.neutron.ca_file"));
        let ks = "backend = \"neutron\"\n[neutron]\nurl = \"http://127.0.0.1:9696\"";
        assert!(e(ks).contains("agent.neutron.auth_url"));
        assert!(e("backend = \"inventory\"").contains("agent.inventory"));
        assert!(e("inventory = \"i\"\nsocket_mode = \"x\"").contains("agent.socket_mode"));
        let plain_tls = e("inventory = \"i\"\n[nova]\nnova_metadata_insecure = true");
        assert!(
            plain_tls.contains("agent.nova.nova_metadata_protocol"),
            "{plain_tls}"
        );
        let proto = e("inventory = \"i\"\n[nova]\nnova_metadata_protocol = \"gopher\"");
        assert!(
            proto.contains("agent.nova.nova_metadata_protocol"),
            "{proto}"
        );
        assert!(e("inventory = \"i\"\n[nova]\ntimeout = \"0s\"").contains("agent.nova.timeout"));
        assert!(e("inventory = \"i\"\nworkers = 0").contains("agent.workers"));
        assert!(e("inventory = \"i\"\npool_size = 0").contains("agent.pool_size"));
        assert!(e("inventory = \"i\"\n[nova]\nnope = 1").contains("nope"));
    }

    #[test]
    fn neutron_backend() {
        let c = agent(
            "backend = \"neutron\"\n[neutron]\nurl = \"http://127.0.0.1:9696/\"\nauth_strategy = \"noauth\"",
        )
        .unwrap();
        let Backend::Neutron(n) = &c.backend else {
            panic!("{:?}", c.backend)
        };
        assert_eq!(n.endpoint.addr, "127.0.0.1:9696".parse().unwrap());
        assert_eq!(n.endpoint.prefix, "");
        assert_eq!(n.auth, NeutronAuth::NoAuth);
        assert_eq!(n.timeout, Duration::from_secs(10));
        assert_eq!(n.batch_window, Duration::from_millis(2));
        assert_eq!(n.batch_max.get(), 50);
        assert!(n.prefetch_network);
        assert_eq!(n.prefetch_max_ports, 5000);
        let c = agent(
            "backend = \"neutron\"\n[neutron]\nurl = \"http://127.0.0.1:9696\"\nauth_url = \"http://[::1]:5000/v3/\"\nusername = \"neutron\"\npassword = \"pw-SECRET\"\nproject_name = \"service\"",
        )
        .unwrap();
        let Backend::Neutron(n) = &c.backend else {
            panic!()
        };
        let NeutronAuth::Keystone { endpoint, method } = &n.auth else {
            panic!()
        };
        assert_eq!(endpoint.prefix, "/v3");
        assert_eq!(endpoint.host_header, "[::1]:5000");
        assert!(
            matches!(method, KeystoneMethod::Password { user_domain_name, .. } if user_domain_name == "Default")
        );
        assert!(!format!("{c:?}").contains("pw-SECRET"));
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
