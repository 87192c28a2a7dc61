//! `[api]`: the metadata API server's section, file layer → validated [`ApiConfig`].
//!
//! The top-level [`crate::config::FileConfig`] keeps `[api]` as a raw TOML
//! table so each daemon validates only its own section; [`ApiConfig::from_table`]
//! parses it into [`ApiFile`] (`deny_unknown_fields`, so a typo is an error
//! naming the key) and validates once. The static vendor JSON is read and
//! parsed here, at start, so a broken file refuses the start instead of
//! turning every `vendor_data.json` into a 500. The inventory is only named
//! here; the server loads it (and reloads it on SIGHUP or when it changes).
//!
//! `metadata_proxy_shared_secret` never reaches a log: [`ApiConfig`]'s
//! `Debug` is written by hand and redacts it.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::api::nova::url::DbUrl;
use crate::api::vendordata::{Provider, VendordataConfig};
use crate::config::{
    dur, invalid, ConfigError, DurationFile, OneOrMany, DEFAULT_BACKLOG, DEFAULT_CLIENT_TIMEOUT,
    DEFAULT_DRAIN_TIMEOUT, DEFAULT_HTTP_REQUEST_TIMEOUT, DEFAULT_KEEP_ALIVE_TIMEOUT,
};
use crate::http::Limits;

/// Nova's `metadata_listen` / `metadata_listen_port` on loopback.
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:8775";
/// Where the password log lives.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/metaproxy";
/// Event loops serving the API (it is behind the agent's pooled connections,
/// so one loop is plenty).
pub const DEFAULT_API_WORKERS: usize = 1;
/// Upper bound on `api.workers`.
pub const MAX_API_WORKERS: usize = 1024;
/// Largest `vendor_data_json` file read, in bytes.
pub const MAX_VENDOR_DATA_BYTES: u64 = 1024 * 1024;

/// `[api.timeouts]`: the three client-side haproxy timeouts (the API has no upstream).
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct ApiTimeoutsFile {
    /// Whole request head must arrive within this.
    pub http_request: Option<DurationFile>,
    /// Client inactivity while reading a body or writing a response.
    pub client: Option<DurationFile>,
    /// Idle keep-alive connection lifetime.
    pub keep_alive: Option<DurationFile>,
}

/// `[api]` as written in the file.
#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct ApiFile {
    /// One address or a list (`"127.0.0.1:8775"`, `["[::]:8775"]`).
    pub listen: Option<OneOrMany>,
    /// Nova's `[neutron] metadata_proxy_shared_secret`; must equal the agent's.
    pub metadata_proxy_shared_secret: Option<String>,
    /// Nova's `[neutron] service_metadata_proxy`: identify by signed headers
    /// (true) or by the TCP peer address (false).
    pub service_metadata_proxy: Option<bool>,
    /// The inventory file (required).
    pub inventory: Option<PathBuf>,
    /// Directory of the password log.
    pub state_dir: Option<PathBuf>,
    /// Static JSON served as `vendor_data.json`.
    pub vendor_data_json: Option<PathBuf>,
    /// Overrides the inventory's `dhcp_domain` (`""` = bare hostnames).
    pub dhcp_domain: Option<String>,
    /// Event loops.
    pub workers: Option<usize>,
    /// listen(2) backlog.
    pub backlog: Option<i32>,
    /// Open connections over all listeners; at the cap the API stops
    /// accepting until one closes.
    pub max_connections: Option<usize>,
    /// How long SIGTERM waits for in-flight requests.
    pub drain_timeout: Option<DurationFile>,
    /// One line per request (off by default).
    pub access_log: Option<bool>,
    /// `host:port` of the Prometheus endpoint; off when absent.
    pub metrics_listen: Option<String>,
    /// `[api.timeouts]`
    #[serde(default)]
    pub timeouts: ApiTimeoutsFile,
    /// Where instances come from: `"inventory"` (default) or `"nova"`.
    pub source: Option<String>,
    /// `[api.nova]`: Nova's databases (with `source = "nova"`).
    pub nova: Option<NovaFile>,
    /// `[api.neutron]`: where security group names come from (with
    /// `source = "nova"`); the same keys as `[agent.neutron]`.
    pub neutron: Option<crate::agent::config::NeutronFile>,
    /// nova.conf `[api] vendordata_providers`: `StaticJSON`, `DynamicJSON`.
    pub vendordata_providers: Option<OneOrMany>,
    /// nova.conf `[api] vendordata_dynamic_targets`: `name@url` items.
    pub vendordata_dynamic_targets: Option<OneOrMany>,
    /// nova.conf `[api] vendordata_dynamic_connect_timeout`, seconds (at least 3).
    pub vendordata_dynamic_connect_timeout: Option<u64>,
    /// nova.conf `[api] vendordata_dynamic_read_timeout`, seconds.
    pub vendordata_dynamic_read_timeout: Option<u64>,
    /// nova.conf `[api] vendordata_dynamic_failure_fatal`.
    pub vendordata_dynamic_failure_fatal: Option<bool>,
    /// nova.conf `[api] vendordata_dynamic_ssl_certfile`: the CA bundle
    /// `https://` targets are verified against.
    pub vendordata_dynamic_ssl_certfile: Option<PathBuf>,
    /// nova.conf `[vendordata_dynamic_auth]`: Keystone credentials for a
    /// token on the dynamic vendordata POSTs.
    pub vendordata_dynamic_auth: Option<crate::api::vendordata::AuthFile>,
}

/// `[api.nova]` as written in the file: nova.conf's options of the same
/// names, values pasted unchanged.
#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct NovaFile {
    /// nova.conf `[database] connection`: the (local) cell database.
    pub connection: Option<String>,
    /// nova.conf `[api_database] connection`: the API database.
    pub api_connection: Option<String>,
    /// nova.conf `[api] local_metadata_per_cell`.
    pub local_metadata_per_cell: Option<bool>,
    /// nova.conf `[api] metadata_cache_expiration`, seconds (0 = no cache).
    pub metadata_cache_expiration: Option<u64>,
}

impl std::fmt::Debug for NovaFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URLs carry passwords: never print them raw.
        let url = |u: &Option<String>| {
            u.as_deref().map(|u| {
                DbUrl::parse(u).map_or_else(|_| "<unparsable>".to_owned(), |u| u.redacted())
            })
        };
        f.debug_struct("NovaFile")
            .field("connection", &url(&self.connection))
            .field("api_connection", &url(&self.api_connection))
            .field("local_metadata_per_cell", &self.local_metadata_per_cell)
            .field("metadata_cache_expiration", &self.metadata_cache_expiration)
            .finish()
    }
}

/// Nova's `[api] metadata_cache_expiration` default.
pub const DEFAULT_METADATA_CACHE_EXPIRATION: Duration = Duration::from_secs(15);

/// Validated `[api.nova]`. `Debug` redacts the passwords in the URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NovaSettings {
    /// The local cell database (`[database] connection`).
    pub connection: DbUrl,
    /// The API database; `None` only with `local_metadata_per_cell`.
    pub api_connection: Option<DbUrl>,
    /// `[database] connection`'s parts, for a templated
    /// `cell_mappings.database_connection` (as Nova fills one).
    pub templates: crate::api::nova::url::TemplateFields,
    /// Read the local cell only (no `instance_mappings` lookup).
    pub local_metadata_per_cell: bool,
    /// How long a loaded instance is served before it is read again.
    pub metadata_cache_expiration: Duration,
    /// Neutron, for the security group names (`[api.neutron]`).
    pub neutron: crate::agent::config::NeutronConfig,
}

/// Where the API's instances come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiSource {
    /// The inventory file (`api.inventory`).
    Inventory,
    /// Nova's databases (boxed: the settings are large, the enum is copied around).
    Nova(Box<NovaSettings>),
}

impl std::fmt::Debug for ApiFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiFile")
            .field("listen", &self.listen)
            .field(
                "metadata_proxy_shared_secret",
                &self.metadata_proxy_shared_secret.as_ref().map(|_| Redacted),
            )
            .field("service_metadata_proxy", &self.service_metadata_proxy)
            .field("inventory", &self.inventory)
            .field("state_dir", &self.state_dir)
            .field("vendor_data_json", &self.vendor_data_json)
            .field("dhcp_domain", &self.dhcp_domain)
            .field("workers", &self.workers)
            .field("backlog", &self.backlog)
            .field("max_connections", &self.max_connections)
            .field("drain_timeout", &self.drain_timeout)
            .field("access_log", &self.access_log)
            .field("metrics_listen", &self.metrics_listen)
            .field("timeouts", &self.timeouts)
            .field("source", &self.source)
            .field("nova", &self.nova)
            .field("neutron", &self.neutron.as_ref().map(|_| "<set>"))
            .field("vendordata_providers", &self.vendordata_providers)
            .field(
                "vendordata_dynamic_targets",
                &self.vendordata_dynamic_targets.as_ref().map(|_| "<set>"),
            )
            .field(
                "vendordata_dynamic_connect_timeout",
                &self.vendordata_dynamic_connect_timeout,
            )
            .field(
                "vendordata_dynamic_read_timeout",
                &self.vendordata_dynamic_read_timeout,
            )
            .field(
                "vendordata_dynamic_failure_fatal",
                &self.vendordata_dynamic_failure_fatal,
            )
            .field(
                "vendordata_dynamic_ssl_certfile",
                &self.vendordata_dynamic_ssl_certfile,
            )
            .field("vendordata_dynamic_auth", &self.vendordata_dynamic_auth)
            .finish()
    }
}

/// Printed in place of a secret.
struct Redacted;

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The API's client-side timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiTimeouts {
    /// Whole request head, from its first byte (or the accept).
    pub http_request: Duration,
    /// Each body read and each response write.
    pub client: Duration,
    /// Idle time between keep-alive requests.
    pub keep_alive: Duration,
}

impl Default for ApiTimeouts {
    fn default() -> Self {
        ApiTimeouts {
            http_request: DEFAULT_HTTP_REQUEST_TIMEOUT,
            client: DEFAULT_CLIENT_TIMEOUT,
            keep_alive: DEFAULT_KEEP_ALIVE_TIMEOUT,
        }
    }
}

/// Validated `[api]` configuration. `Debug` redacts the shared secret.
#[derive(Clone)]
pub struct ApiConfig {
    /// Listen addresses (at least one).
    pub listen: Vec<SocketAddr>,
    /// HMAC key for `X-Instance-ID-Signature` (may be empty, as in Nova).
    pub shared_secret: String,
    /// Identify by signed headers (true) or by TCP peer (false).
    pub service_metadata_proxy: bool,
    /// Inventory file, loaded at start and on reload (empty with
    /// `source = "nova"`, which reads no file).
    pub inventory: PathBuf,
    /// Where instances come from.
    pub source: ApiSource,
    /// Password log directory (created if missing).
    pub state_dir: PathBuf,
    /// Where `vendor_data` came from, for the effective-config log.
    pub vendor_data_json: Option<PathBuf>,
    /// The parsed vendor JSON.
    pub vendor_data: Option<serde_json::Value>,
    /// Nova's vendordata providers and dynamic targets.
    pub vendordata: crate::api::vendordata::VendordataConfig,
    /// `dhcp_domain` override.
    pub dhcp_domain: Option<String>,
    /// Event loops.
    pub workers: NonZeroUsize,
    /// listen(2) backlog.
    pub backlog: i32,
    /// Connection cap (accept pauses at it).
    pub max_connections: NonZeroUsize,
    /// SIGTERM drain bound.
    pub drain_timeout: Duration,
    /// Client timeouts.
    pub timeouts: ApiTimeouts,
    /// Request size limits.
    pub limits: Limits,
    /// One line per request.
    pub access_log: bool,
    /// The Prometheus endpoint, when enabled.
    pub metrics_listen: Option<SocketAddr>,
}

impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secret: &dyn std::fmt::Debug = if self.shared_secret.is_empty() {
            &"<empty>"
        } else {
            &Redacted
        };
        f.debug_struct("ApiConfig")
            .field("listen", &self.listen)
            .field("shared_secret", secret)
            .field("service_metadata_proxy", &self.service_metadata_proxy)
            .field("inventory", &self.inventory)
            .field("source", &self.source)
            .field("state_dir", &self.state_dir)
            .field("vendor_data_json", &self.vendor_data_json)
            .field("vendordata", &self.vendordata)
            .field("dhcp_domain", &self.dhcp_domain)
            .field("workers", &self.workers)
            .field("backlog", &self.backlog)
            .field("max_connections", &self.max_connections)
            .field("drain_timeout", &self.drain_timeout)
            .field("timeouts", &self.timeouts)
            .field("limits", &self.limits)
            .field("access_log", &self.access_log)
            .field("metrics_listen", &self.metrics_listen)
            .finish()
    }
}

impl ApiConfig {
    /// Accepted but unsafe settings, one sentence each: logged at start and
    /// printed by `--check`.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        let vd = &self.vendordata;
        if !vd.targets.is_empty() && !vd.has(Provider::DynamicJson) {
            w.push(
                "api.vendordata_dynamic_targets is set but vendordata_providers does not list \
                 DynamicJSON: the targets are never asked"
                    .to_owned(),
            );
        }
        if vd.is_dynamic() && vd.auth.is_none() {
            w.push(
                "api.vendordata_dynamic_targets are POSTed without a Keystone token \
                 ([api.vendordata_dynamic_auth] is not set; Nova: \"Passing insecure dynamic \
                 vendordata requests\")"
                    .to_owned(),
            );
        }
        if vd.has(Provider::DynamicJson) && vd.targets.is_empty() {
            w.push(
                "api.vendordata_providers lists DynamicJSON but vendordata_dynamic_targets is \
                 empty: vendor_data2.json has no dynamic entries"
                    .to_owned(),
            );
        }
        // With service_metadata_proxy = false no signature is checked.
        if self.service_metadata_proxy && self.shared_secret.is_empty() {
            w.push(crate::sign::empty_secret_warning(
                "api.metadata_proxy_shared_secret",
            ));
        }
        w
    }

    /// Parse and validate the raw `[api]` table.
    ///
    /// # Errors
    /// An unknown key, a wrong type or an unacceptable value; the error names
    /// the key (e.g. `api.listen[1]`).
    pub fn from_table(table: &toml::Table) -> Result<ApiConfig, ConfigError> {
        let file: ApiFile = toml::Value::Table(table.clone())
            .try_into()
            .map_err(|e: toml::de::Error| invalid("api", e.message().trim_end().to_string()))?;
        ApiConfig::try_from(&file)
    }
}

/// Read the `[api]` section of a config file. Unlike [`ApiConfig::from_table`],
/// a type error carries toml's line, column and the offending line.
///
/// # Errors
/// The file is unreadable or invalid (see [`crate::config::load_file`]; a
/// raw `[proxy]` there, which the command line checks typed with
/// [`crate::proxy::config::load_file`] first), or `[api]` is; `Ok(None)` when
/// the file has no `[api]` section.
pub fn load(path: &Path) -> Result<Option<ApiConfig>, ConfigError> {
    /// Only `[api]`, parsed from the text so errors keep their spans; the
    /// whole file was checked by `parse_str` and the rest is ignored here.
    #[derive(Deserialize)]
    struct Section {
        #[serde(default)]
        api: Option<ApiFile>,
    }
    let text = crate::config::read(path)?;
    crate::config::parse_str(&text, path)?;
    let section: Section = crate::config::parse_as(&text, path)?;
    section.api.as_ref().map(ApiConfig::try_from).transpose()
}

fn nova_settings(
    f: Option<&NovaFile>,
    neutron: Option<&crate::agent::config::NeutronFile>,
) -> Result<NovaSettings, ConfigError> {
    let Some(f) = f else {
        return Err(invalid(
            "api.nova",
            "is required with api.source = \"nova\" (connection, api_connection)",
        ));
    };
    let url = |key: &str, v: &str| {
        DbUrl::parse(v).map_err(|e| invalid(format!("api.nova.{key}"), e.to_string()))
    };
    let (connection, templates) = match f.connection.as_deref() {
        Some(c) => (
            url("connection", c)?,
            crate::api::nova::url::TemplateFields::of(c)
                .map_err(|e| invalid("api.nova.connection", e.to_string()))?,
        ),
        None => {
            return Err(invalid(
                "api.nova.connection",
                "is required (nova.conf [database] connection)",
            ))
        }
    };
    let local = f.local_metadata_per_cell.unwrap_or(false);
    let api_connection = match f.api_connection.as_deref() {
        Some(c) => Some(url("api_connection", c)?),
        None if local => None,
        None => {
            return Err(invalid(
                "api.nova.api_connection",
                "is required (nova.conf [api_database] connection) unless local_metadata_per_cell = true",
            ))
        }
    };
    let neutron = crate::agent::config::neutron_section(
        "api.neutron",
        neutron.ok_or_else(|| {
            invalid(
                "api.neutron",
                "is required with api.source = \"nova\": security group names come from Neutron, \
                 as Nova reads them (the same keys as [agent.neutron])",
            )
        })?,
        "with api.source = \"nova\"",
    )?;
    Ok(NovaSettings {
        neutron,
        connection,
        api_connection,
        templates,
        local_metadata_per_cell: local,
        metadata_cache_expiration: f
            .metadata_cache_expiration
            .map_or(DEFAULT_METADATA_CACHE_EXPIRATION, Duration::from_secs),
    })
}

/// The `vendordata_*` keys of `[api]`, as Nova's options of the same names.
fn vendordata(f: &ApiFile) -> Result<VendordataConfig, ConfigError> {
    use crate::api::vendordata::{
        list_items, parse_providers, Target, DEFAULT_CONNECT_TIMEOUT_SECS,
        DEFAULT_READ_TIMEOUT_SECS, MIN_CONNECT_TIMEOUT_SECS,
    };
    let mut cfg = VendordataConfig::default();
    if let Some(a) = &f.vendordata_dynamic_auth {
        cfg.auth = crate::api::vendordata::parse_auth(a)?;
    }
    if let Some(p) = &f.vendordata_providers {
        cfg.providers = parse_providers("api.vendordata_providers", &list_items(p))?;
    }
    let key = "api.vendordata_dynamic_targets";
    for (i, item) in f
        .vendordata_dynamic_targets
        .as_ref()
        .map(list_items)
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let k = format!("{key}[{i}]");
        let t = Target::parse(&k, item)?;
        if cfg.targets.iter().any(|o| o.name == t.name) {
            return Err(invalid(k, format!("the name {:?} is used twice", t.name)));
        }
        if t.name == "static" && cfg.has(Provider::StaticJson) {
            return Err(invalid(
                k,
                "the name \"static\" is StaticJSON's key in vendor_data2.json",
            ));
        }
        cfg.targets.push(t);
    }
    let connect = f
        .vendordata_dynamic_connect_timeout
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT_SECS);
    if connect < MIN_CONNECT_TIMEOUT_SECS {
        return Err(invalid(
            "api.vendordata_dynamic_connect_timeout",
            format!("{connect}: at least {MIN_CONNECT_TIMEOUT_SECS} (seconds), as in Nova"),
        ));
    }
    cfg.connect_timeout = Duration::from_secs(connect);
    cfg.read_timeout = Duration::from_secs(
        f.vendordata_dynamic_read_timeout
            .unwrap_or(DEFAULT_READ_TIMEOUT_SECS),
    );
    cfg.failure_fatal = f.vendordata_dynamic_failure_fatal.unwrap_or(false);
    cfg.ssl_certfile = match &f.vendordata_dynamic_ssl_certfile {
        Some(p) if p.as_os_str().is_empty() => None, // Nova's default ''
        other => other.clone(),
    };
    let certfile = cfg.ssl_certfile.clone().unwrap_or_default();
    let bundle = |e: std::io::Error| {
        let path = &certfile;
        invalid(
            "api.vendordata_dynamic_ssl_certfile",
            format!("{}: {e}", path.display()),
        )
    };
    if cfg.targets.iter().any(Target::is_https) {
        let tls =
            crate::agent::tls::client_config(false, cfg.ssl_certfile.as_deref()).map_err(bundle)?;
        cfg.tls = Some(crate::agent::config::TlsClient(tls));
    } else if let Some(p) = &cfg.ssl_certfile {
        // Checked even when unused, so a typo is found before a target turns https.
        crate::agent::tls::client_config(false, Some(p)).map_err(bundle)?;
    }
    Ok(cfg)
}

fn read_vendor_data(path: &Path) -> Result<serde_json::Value, ConfigError> {
    const KEY: &str = "api.vendor_data_json";
    let meta = std::fs::metadata(path)
        .map_err(|e| invalid(KEY, format!("cannot read {}: {e}", path.display())))?;
    if meta.len() > MAX_VENDOR_DATA_BYTES {
        return Err(invalid(
            KEY,
            format!(
                "{} is larger than {MAX_VENDOR_DATA_BYTES} bytes",
                path.display()
            ),
        ));
    }
    let text = std::fs::read(path)
        .map_err(|e| invalid(KEY, format!("cannot read {}: {e}", path.display())))?;
    let value: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| invalid(KEY, format!("{} is not valid JSON: {e}", path.display())))?;
    if !value.is_object() {
        return Err(invalid(
            KEY,
            format!("{} must hold a JSON object", path.display()),
        ));
    }
    Ok(value)
}

impl TryFrom<&ApiFile> for ApiConfig {
    type Error = ConfigError;

    fn try_from(f: &ApiFile) -> Result<Self, ConfigError> {
        let mut listen = Vec::new();
        let default_listen = OneOrMany::One(DEFAULT_API_LISTEN.to_string());
        for (i, a) in f
            .listen
            .as_ref()
            .unwrap_or(&default_listen)
            .items()
            .into_iter()
            .enumerate()
        {
            let addr: SocketAddr = a.parse().map_err(|_| {
                invalid(
                    format!("api.listen[{i}]"),
                    format!(
                        "{a:?} is not an address:port like \"127.0.0.1:8775\" or \"[::]:8775\""
                    ),
                )
            })?;
            if listen.contains(&addr) {
                return Err(invalid(
                    format!("api.listen[{i}]"),
                    format!("{addr} is listed twice"),
                ));
            }
            listen.push(addr);
        }
        if listen.is_empty() {
            return Err(invalid("api.listen", "needs at least one address"));
        }
        let source = match f.source.as_deref() {
            None | Some("inventory") => {
                if f.nova.is_some() {
                    return Err(invalid(
                        "api.nova",
                        "is only read with api.source = \"nova\"",
                    ));
                }
                if f.neutron.is_some() {
                    return Err(invalid(
                        "api.neutron",
                        "is only read with api.source = \"nova\" (the inventory names security groups)",
                    ));
                }
                ApiSource::Inventory
            }
            Some("nova") => {
                crate::config::NOVA_DB.require("api.source", "\"nova\"")?;
                ApiSource::Nova(Box::new(nova_settings(
                    f.nova.as_ref(),
                    f.neutron.as_ref(),
                )?))
            }
            Some(other) => {
                return Err(invalid(
                    "api.source",
                    format!("{other:?}: expected \"inventory\" or \"nova\""),
                ))
            }
        };
        let inventory = match (&source, &f.inventory) {
            (ApiSource::Nova(_), Some(_)) => {
                return Err(invalid(
                    "api.inventory",
                    "is not read with api.source = \"nova\" (remove it)",
                ))
            }
            (ApiSource::Nova(_), None) => PathBuf::new(),
            (ApiSource::Inventory, None) => {
                return Err(invalid("api.inventory", "is required (the inventory file)"))
            }
            (ApiSource::Inventory, Some(p)) if p.as_os_str().is_empty() => {
                return Err(invalid("api.inventory", "empty path"))
            }
            (ApiSource::Inventory, Some(p)) => p.clone(),
        };
        if matches!(source, ApiSource::Nova(_)) && f.service_metadata_proxy == Some(false) {
            return Err(invalid(
                "api.service_metadata_proxy",
                "false (identify guests by address) is not supported with api.source = \"nova\" yet",
            ));
        }
        let state_dir = match &f.state_dir {
            Some(p) if p.as_os_str().is_empty() => {
                return Err(invalid("api.state_dir", "empty path"))
            }
            Some(p) => p.clone(),
            None => PathBuf::from(DEFAULT_STATE_DIR),
        };
        let vendor_data = f
            .vendor_data_json
            .as_deref()
            .map(read_vendor_data)
            .transpose()?;
        let workers = match f.workers.unwrap_or(DEFAULT_API_WORKERS) {
            n if n > MAX_API_WORKERS => {
                return Err(invalid("api.workers", format!("at most {MAX_API_WORKERS}")))
            }
            n => {
                NonZeroUsize::new(n).ok_or_else(|| invalid("api.workers", "must be at least 1"))?
            }
        };
        let backlog = f.backlog.unwrap_or(DEFAULT_BACKLOG);
        if backlog < 1 {
            return Err(invalid("api.backlog", "must be at least 1"));
        }
        let t = &f.timeouts;
        let timeouts = ApiTimeouts {
            http_request: dur(
                "api.timeouts.http_request",
                &t.http_request,
                DEFAULT_HTTP_REQUEST_TIMEOUT,
            )?,
            client: dur("api.timeouts.client", &t.client, DEFAULT_CLIENT_TIMEOUT)?,
            keep_alive: dur(
                "api.timeouts.keep_alive",
                &t.keep_alive,
                DEFAULT_KEEP_ALIVE_TIMEOUT,
            )?,
        };
        Ok(ApiConfig {
            listen,
            shared_secret: f.metadata_proxy_shared_secret.clone().unwrap_or_default(),
            service_metadata_proxy: f.service_metadata_proxy.unwrap_or(true),
            inventory,
            source,
            state_dir,
            vendor_data_json: f.vendor_data_json.clone(),
            vendor_data,
            vendordata: vendordata(f)?,
            dhcp_domain: f.dhcp_domain.clone(),
            workers,
            backlog,
            max_connections: NonZeroUsize::new(
                f.max_connections
                    .unwrap_or(crate::config::DEFAULT_MAX_CONNECTIONS),
            )
            .ok_or_else(|| invalid("api.max_connections", "must be at least 1"))?,
            drain_timeout: dur("api.drain_timeout", &f.drain_timeout, DEFAULT_DRAIN_TIMEOUT)?,
            timeouts,
            limits: Limits::default(),
            access_log: f.access_log.unwrap_or(false),
            metrics_listen: crate::config::socket_addr("api.metrics_listen", &f.metrics_listen)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ApiConfig, ConfigError> {
        let f = crate::config::parse_str(text, Path::new("t.toml")).unwrap();
        ApiConfig::from_table(f.api.as_ref().unwrap())
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn defaults() {
        let c = parse("[api]\ninventory = \"inv.toml\"\n").unwrap();
        assert_eq!(c.listen, vec![DEFAULT_API_LISTEN.parse().unwrap()]);
        assert_eq!(c.shared_secret, "");
        assert!(c.service_metadata_proxy);
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(c.workers.get(), 1);
        assert_eq!(c.backlog, 4096);
        assert_eq!(c.max_connections.get(), 65_536);
        assert_eq!(c.timeouts, ApiTimeouts::default());
        assert!(c.vendor_data.is_none());
    }

    #[test]
    fn errors_name_the_key() {
        assert!(err("[api]\n").contains("api.inventory"));
        let e = err("[api]\ninventory = \"i\"\nlisten = [\"127.0.0.1:1\", \"nope\"]\n");
        assert!(e.contains("api.listen[1]"), "{e}");
        let e = err("[api]\ninventory = \"i\"\nlistne = \"127.0.0.1:1\"\n");
        assert!(e.contains("listne"), "{e}");
        let e = err("[api]\ninventory = \"i\"\n[api.timeouts]\nclient = \"soon\"\n");
        assert!(e.contains("api.timeouts.client"), "{e}");
        assert!(err("[api]\ninventory = \"i\"\nworkers = 0\n").contains("api.workers"));
        assert!(err("[api]\ninventory = \"i\"\nbacklog = 0\n").contains("api.backlog"));
    }

    #[test]
    fn load_reports_the_line_of_a_type_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "[proxy]\n\n[api]\ninventory = \"i\"\nworkers = \"two\"\n",
        )
        .unwrap();
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("line 5"), "{e}");
        assert!(e.contains("workers"), "{e}");
        std::fs::write(&p, "[proxy]\n").unwrap();
        assert!(load(&p).unwrap().is_none());
        std::fs::write(&p, "[api]\ninventory = \"i\"\n").unwrap();
        assert_eq!(load(&p).unwrap().unwrap().inventory, PathBuf::from("i"));
    }

    #[test]
    fn vendor_data_is_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.json");
        std::fs::write(&good, r#"{"a": 1}"#).unwrap();
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{not json").unwrap();
        let c = parse(&format!(
            "[api]\ninventory = \"i\"\nvendor_data_json = {:?}\n",
            good.display().to_string()
        ))
        .unwrap();
        assert_eq!(c.vendor_data, Some(serde_json::json!({"a": 1})));
        let e = err(&format!(
            "[api]\ninventory = \"i\"\nvendor_data_json = {:?}\n",
            bad.display().to_string()
        ));
        assert!(e.contains("api.vendor_data_json"), "{e}");
    }

    #[test]
    #[cfg(feature = "nova-db")]
    fn nova_source_takes_nova_confs_urls_unchanged() {
        let c = parse(
            "[api]\nsource = \"nova\"\n[api.nova]\n\
             connection = \"mysql+pymysql://nova:cellpw@db/nova?charset=utf8\"\n\
             api_connection = \"mysql+pymysql://nova:apipw@db/nova_api?charset=utf8\"\n\
             [api.neutron]\nurl = \"http://127.0.0.1:9696\"\nauth_strategy = \"noauth\"\n",
        )
        .unwrap();
        let ApiSource::Nova(n) = &c.source else {
            panic!("{:?}", c.source)
        };
        assert!(!n.local_metadata_per_cell);
        assert_eq!(n.metadata_cache_expiration, Duration::from_secs(15));
        assert!(n.api_connection.is_some());
        let d = format!("{c:?}");
        assert!(!d.contains("cellpw") && !d.contains("apipw"), "{d}");
        let local = parse(
            "[api]\nsource = \"nova\"\n[api.nova]\nconnection = \"sqlite:////tmp/nova.db\"\n\
             local_metadata_per_cell = true\nmetadata_cache_expiration = 0\n\
             [api.neutron]\nurl = \"http://127.0.0.1:9696\"\nauth_strategy = \"noauth\"\n",
        )
        .unwrap();
        let ApiSource::Nova(n) = &local.source else {
            panic!()
        };
        assert_eq!(n.metadata_cache_expiration, Duration::ZERO);
        assert_eq!(n.api_connection, None);
        // The file layer's Debug redacts too.
        let f: ApiFile = toml::from_str(
            "source = \"nova\"\n[nova]\nconnection = \"mysql://nova:cellpw@db/nova\"\n",
        )
        .unwrap();
        assert!(!format!("{f:?}").contains("cellpw"));
    }

    #[test]
    #[cfg(feature = "nova-db")]
    fn nova_source_errors_name_the_key() {
        let e = err("[api]\nsource = \"nova\"\n");
        assert!(e.contains("api.nova"), "{e}");
        let e = err("[api]\nsource = \"nova\"\n[api.nova]\nconnection = \"sqlite:////x\"\n");
        assert!(e.contains("api.nova.api_connection"), "{e}");
        let e = err("[api]\nsource = \"nova\"\n[api.nova]\nconnection = \"postgresql://u:secretpw@h/n\"\napi_connection = \"sqlite:////x\"\n");
        assert!(
            e.contains("api.nova.connection") && !e.contains("secretpw"),
            "{e}"
        );
        const NEUTRON: &str =
            "[api.neutron]\nurl = \"http://127.0.0.1:9696\"\nauth_strategy = \"noauth\"\n";
        let e = err(&format!("[api]\nsource = \"nova\"\ninventory = \"i\"\n[api.nova]\nconnection = \"sqlite:////x\"\nlocal_metadata_per_cell = true\n{NEUTRON}"));
        assert!(e.contains("api.inventory"), "{e}");
        let e = err("[api]\nsource = \"nova\"\n[api.nova]\nconnection = \"sqlite:////x\"\nlocal_metadata_per_cell = true\n");
        assert!(e.contains("api.neutron"), "{e}");
        let e = err("[api]\nsource = \"nova\"\n[api.nova]\nconnection = \"sqlite:////x\"\nlocal_metadata_per_cell = true\n[api.neutron]\nauth_strategy = \"noauth\"\n");
        assert!(e.contains("api.neutron.url"), "{e}");
        let e = err("[api]\ninventory = \"i\"\n[api.neutron]\nurl = \"http://h:9696\"\n");
        assert!(e.contains("api.neutron"), "{e}");
        let e = err("[api]\nsource = \"novaa\"\ninventory = \"i\"\n");
        assert!(e.contains("api.source"), "{e}");
        let e = err("[api]\ninventory = \"i\"\n[api.nova]\nconnection = \"sqlite:////x\"\n");
        assert!(e.contains("api.nova"), "{e}");
        let e = err(&format!("[api]\nsource = \"nova\"\nservice_metadata_proxy = false\n[api.nova]\nconnection = \"sqlite:////x\"\nlocal_metadata_per_cell = true\n{NEUTRON}"));
        assert!(e.contains("api.service_metadata_proxy"), "{e}");
    }

    /// A build without `nova-db` (`cargo test --no-default-features`):
    /// `source = "nova"` is refused at load, naming the key and the feature.
    #[test]
    #[cfg(not(feature = "nova-db"))]
    fn nova_source_without_the_feature_is_refused_naming_the_key() {
        let e = err(
            "[api]\nsource = \"nova\"\n[api.nova]\nconnection = \"sqlite:////x\"\n\
             local_metadata_per_cell = true\n\
             [api.neutron]\nurl = \"http://127.0.0.1:9696\"\nauth_strategy = \"noauth\"\n",
        );
        assert!(
            e.contains("`api.source`") && e.contains("built without the \"nova-db\" feature"),
            "{e}"
        );
    }

    #[test]
    fn debug_redacts_the_secret() {
        let c = parse(
            "[api]\ninventory = \"i\"\nmetadata_proxy_shared_secret = \"hunter2-very-secret\"\n",
        )
        .unwrap();
        assert_eq!(c.shared_secret, "hunter2-very-secret");
        let d = format!("{c:?}");
        assert!(!d.contains("hunter2"), "{d}");
        assert!(d.contains("<redacted>"), "{d}");
    }
}
