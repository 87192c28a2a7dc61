//! Vendor data providers, as Nova's `[api] vendordata_providers`:
//! `StaticJSON` (the operator's file, `api.vendor_data_json`) and
//! `DynamicJSON` (a POST to each of `vendordata_dynamic_targets`, whose
//! answers go under the targets' names in `vendor_data2.json`).
//!
//! The dynamic request is Nova's `DynamicVendorData._do_request`, byte for
//! byte in its body: `jsonutils.dumps` of `project-id`, `instance-id`,
//! `image-id`, `user-data` (the base64 text, `null` without user data),
//! `hostname`, `metadata` and `boot-roles`, in that order, with
//! `Content-Type` and `Accept: application/json` and
//! `User-Agent: openstack-nova-vendordata`. Nova puts whatever JSON the
//! target answers under its name; a failure (connect error, timeout, a
//! status that is not 2xx, a body that is not JSON, and here also a body
//! over [`MAX_DYNAMIC_VENDOR_DATA_BYTES`]) is `{}` under the name and a
//! warning naming the target, or a 500 with `vendordata_dynamic_failure_fatal`.
//! An empty 2xx body is `{}`, as in Nova.
//!
//! When: only for a `vendor_data2.json` that Nova would render (Newton
//! and later), after the request's signature and project were checked, on
//! the serving loop's runtime (async connect, TLS, read: the loop never
//! waits on the target's socket), the targets of one request concurrently.
//! Nova does not cache these answers (its cached `InstanceMetadata` calls
//! the provider on every `vendor_data2.json`), and neither do we: each
//! request for it is one POST per target, for that instance only.
//!
//! Differences from Nova, deliberate:
//! - a bad target (`name@url` without a name, a duplicate name, a name
//!   that collides with `static`) refuses the start; Nova skips it with a
//!   warning at every request;
//! - the URL's host is resolved once at start (Nova: at every request);
//! - redirects are not followed (keystoneauth follows them): a 3xx is a
//!   failure;
//! - the read timeout bounds the whole answer, not each socket read (no
//!   target can hold a request by trickling bytes);
//! - `[vendordata_dynamic_auth]` (`[api.vendordata_dynamic_auth]` here)
//!   takes keystoneauth's `password`/`v3password` and
//!   `v3applicationcredential` plugins only, with Keystone v3; the token
//!   comes from the agent's Keystone client (one per loop, cached until
//!   shortly before it expires, fetched again once when a target answers
//!   401, as keystoneauth re-authenticates). Without the section no token
//!   is sent, as in Nova (which then logs "Passing insecure dynamic
//!   vendordata requests").
//!
//! Rejected: the agent's pooled client ([`crate::agent::forward::Pool`]):
//! it has one deadline for connect and answer, its logs speak of 503s, and
//! Nova itself opens a connection per `InstanceMetadata`; a vendordata
//! request is rare (once per boot), so one connection per POST costs
//! nothing that matters.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::api::json::Json;
use crate::config::{invalid, ConfigError};
use crate::http::write::{put_content_length, put_header, HeaderName, HeaderValue};
use crate::http::{self, Limits, ResponseBody};
use crate::inventory::Instance;
use crate::log;
use crate::rt::{self, TcpConn};

/// Largest answer body taken from a dynamic target, in bytes (the same
/// bound as the static file's; Nova has none).
pub const MAX_DYNAMIC_VENDOR_DATA_BYTES: u64 = 1024 * 1024;
/// Nova's `vendordata_dynamic_connect_timeout` default, seconds.
pub const DEFAULT_CONNECT_TIMEOUT_SECS: u64 = 5;
/// Nova's `vendordata_dynamic_read_timeout` default, seconds.
pub const DEFAULT_READ_TIMEOUT_SECS: u64 = 5;
/// Nova's lower bound on `vendordata_dynamic_connect_timeout` (the TCP
/// retransmission timeout), seconds.
pub const MIN_CONNECT_TIMEOUT_SECS: u64 = 3;
/// Read size for a target's answer.
const READ_BYTES: usize = 16 * 1024;

/// One of Nova's vendordata providers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// `StaticJSON`: `api.vendor_data_json`, in `vendor_data.json` and as
    /// `static` in `vendor_data2.json`.
    StaticJson,
    /// `DynamicJSON`: the answers of `vendordata_dynamic_targets`.
    DynamicJson,
}

/// A `name@url` of `vendordata_dynamic_targets`, parsed and resolved.
#[derive(Clone, PartialEq, Eq)]
pub struct Target {
    /// The key its answer goes under.
    pub name: String,
    /// The URL without any `user:password@`, for logs.
    pub shown: String,
    addr: SocketAddr,
    tls_name: Option<rustls::pki_types::ServerName<'static>>,
    host_header: String,
    /// Request target: the URL's path and query, `/` when it has none.
    path: String,
    /// `Basic` credentials from the URL's `user:password@` (python-requests
    /// sends them so), already base64.
    basic: Option<String>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("name", &self.name)
            .field("url", &self.shown)
            .field("basic_auth", &self.basic.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Percent-decoding of URL userinfo (python-requests unquotes it).
fn unquote(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| char::from(c).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

impl Target {
    /// Parse one `name@url` (`key` names the option in errors). As in
    /// Nova, the name ends at the first `@`; the URL may hold more.
    ///
    /// # Errors
    /// No `@`, an empty name, not `http(s)://host[:port][/path]`, a host
    /// that does not resolve, or a path with spaces or control bytes.
    pub fn parse(key: &str, item: &str) -> Result<Target, ConfigError> {
        let Some((name, url)) = item.split_once('@') else {
            return Err(invalid(
                key,
                format!(
                    "{:?} is not name@url (the name is the key its answer goes under)",
                    redact(item)
                ),
            ));
        };
        let name = name.trim();
        let url = url.trim();
        if name.contains("://") {
            // `http://user:pw@host`: a URL with credentials and no name.
            return Err(invalid(
                key,
                format!("{:?} is not name@url (it has no name)", redact(item)),
            ));
        }
        if name.is_empty() {
            return Err(invalid(
                key,
                format!("{:?}: the name before @ is empty", redact(item)),
            ));
        }
        let (scheme, rest) = if let Some(r) = url.strip_prefix("http://") {
            ("http://", r)
        } else if let Some(r) = url.strip_prefix("https://") {
            ("https://", r)
        } else {
            return Err(invalid(
                key,
                format!("target {name:?}: the URL is not http:// or https://"),
            ));
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        // A fragment is not sent (python-requests drops it).
        let path = path.split('#').next().unwrap_or_default();
        let path = match path {
            "" => "/".to_owned(),
            p if p.starts_with('?') => format!("/{p}"),
            p => p.to_owned(),
        };
        if path.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(invalid(
                key,
                format!("target {name:?}: the URL's path has a space or a control byte"),
            ));
        }
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let shown = format!("{scheme}{hostport}{path}");
        let endpoint = crate::agent::config::Endpoint::parse(key, &format!("{scheme}{hostport}"))
            .map_err(|e| match e {
            ConfigError::Invalid { message, .. } => {
                invalid(key, format!("target {name:?} ({shown}): {message}"))
            }
            other => other,
        })?;
        let basic = userinfo.map(|u| {
            let (user, pass) = u.split_once(':').unwrap_or((u, ""));
            let mut creds = unquote(user);
            creds.push(b':');
            creds.extend(unquote(pass));
            base64::engine::general_purpose::STANDARD.encode(creds)
        });
        Ok(Target {
            name: name.to_owned(),
            shown,
            addr: endpoint.addr,
            tls_name: endpoint.tls_name,
            host_header: endpoint.host_header,
            path,
            basic,
        })
    }

    /// Whether the target is `https://`.
    pub fn is_https(&self) -> bool {
        self.tls_name.is_some()
    }
}

/// `name@scheme://user:password@host` with the password cut, for errors.
fn redact(item: &str) -> String {
    match item.split_once("://") {
        Some((head, rest)) => {
            let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            match rest[..authority_end].rsplit_once('@') {
                Some((_, host)) => format!("{head}://<redacted>@{host}{}", &rest[authority_end..]),
                None => item.to_owned(),
            }
        }
        None => item.to_owned(),
    }
}

/// The validated vendordata options.
#[derive(Debug, Clone)]
pub struct VendordataConfig {
    /// `vendordata_providers`, in order (their order is the order of
    /// `vendor_data2.json`'s keys).
    pub providers: Vec<Provider>,
    /// `vendordata_dynamic_targets`, in order.
    pub targets: Vec<Target>,
    /// `vendordata_dynamic_connect_timeout`.
    pub connect_timeout: Duration,
    /// `vendordata_dynamic_read_timeout`.
    pub read_timeout: Duration,
    /// `vendordata_dynamic_failure_fatal`.
    pub failure_fatal: bool,
    /// `vendordata_dynamic_ssl_certfile`.
    pub ssl_certfile: Option<PathBuf>,
    /// Built when a target is `https://`.
    pub(crate) tls: Option<crate::agent::config::TlsClient>,
    /// `[vendordata_dynamic_auth]`: the Keystone credentials (as a Neutron
    /// client's, whose token code they reuse; its endpoint is Keystone's).
    pub auth: Option<crate::agent::config::NeutronConfig>,
}

impl Default for VendordataConfig {
    /// Nova's defaults: `StaticJSON` only.
    fn default() -> Self {
        VendordataConfig {
            providers: vec![Provider::StaticJson],
            targets: Vec::new(),
            connect_timeout: Duration::from_secs(DEFAULT_CONNECT_TIMEOUT_SECS),
            read_timeout: Duration::from_secs(DEFAULT_READ_TIMEOUT_SECS),
            failure_fatal: false,
            ssl_certfile: None,
            tls: None,
            auth: None,
        }
    }
}

impl VendordataConfig {
    /// Whether `provider` is listed.
    pub fn has(&self, provider: Provider) -> bool {
        self.providers.contains(&provider)
    }

    /// Whether a `vendor_data2.json` makes requests.
    pub fn is_dynamic(&self) -> bool {
        self.has(Provider::DynamicJson) && !self.targets.is_empty()
    }
}

/// The items of a Nova `ListOpt` as written in our file: a list, or one
/// string with commas (nova.conf's value pasted unchanged).
pub(crate) fn list_items(v: &crate::config::OneOrMany) -> Vec<String> {
    match v {
        crate::config::OneOrMany::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        crate::config::OneOrMany::Many(v) => v.iter().map(|s| s.trim().to_owned()).collect(),
    }
}

/// `vendordata_providers` → providers; errors name `key[i]`.
///
/// # Errors
/// An unknown or repeated provider.
pub(crate) fn parse_providers(key: &str, items: &[String]) -> Result<Vec<Provider>, ConfigError> {
    let mut out = Vec::new();
    for (i, p) in items.iter().enumerate() {
        let provider = match p.as_str() {
            "StaticJSON" => Provider::StaticJson,
            "DynamicJSON" => Provider::DynamicJson,
            other => {
                return Err(invalid(
                    format!("{key}[{i}]"),
                    format!("{other:?}: expected \"StaticJSON\" or \"DynamicJSON\""),
                ))
            }
        };
        if out.contains(&provider) {
            return Err(invalid(
                format!("{key}[{i}]"),
                format!("{p} is listed twice"),
            ));
        }
        out.push(provider);
    }
    Ok(out)
}

/// `[api.vendordata_dynamic_auth]` as written: keystoneauth's option
/// names (`[vendordata_dynamic_auth]` in nova.conf), the plugins we speak.
#[derive(serde::Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    /// `password`, `v3password` or `v3applicationcredential`.
    pub auth_type: Option<String>,
    /// Keystone v3, e.g. `http://controller:5000/v3`.
    pub auth_url: Option<String>,
    /// Password plugins: the user.
    pub username: Option<String>,
    /// Password plugins: the password. Never logged.
    pub password: Option<String>,
    /// Password plugins: the project to scope to.
    pub project_name: Option<String>,
    /// Password plugins: the user's domain (default `Default`).
    pub user_domain_name: Option<String>,
    /// Password plugins: the project's domain (default `Default`).
    pub project_domain_name: Option<String>,
    /// `v3applicationcredential`: the id.
    pub application_credential_id: Option<String>,
    /// `v3applicationcredential`: the secret. Never logged.
    pub application_credential_secret: Option<String>,
    /// Session: CA bundle for Keystone.
    pub cafile: Option<PathBuf>,
    /// Session: accept any certificate from Keystone.
    pub insecure: Option<bool>,
    /// Session: timeout of a token request, seconds.
    pub timeout: Option<u64>,
}

impl std::fmt::Debug for AuthFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthFile")
            .field("auth_type", &self.auth_type)
            .field("auth_url", &self.auth_url)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Keystone token requests' timeout without `timeout` (the Neutron client's).
const DEFAULT_AUTH_TIMEOUT: Duration = Duration::from_secs(10);

/// `[api.vendordata_dynamic_auth]` → the Keystone settings; errors name
/// `api.vendordata_dynamic_auth.<key>`.
///
/// # Errors
/// A missing, unknown or invalid key.
pub(crate) fn parse_auth(
    f: &AuthFile,
) -> Result<Option<crate::agent::config::NeutronConfig>, ConfigError> {
    const P: &str = "api.vendordata_dynamic_auth";
    let k = |key: &str| format!("{P}.{key}");
    let application = match f.auth_type.as_deref() {
        // Nova loads no plugin without auth_type, and sends no token.
        None => {
            return Err(invalid(
                k("auth_type"),
                "required (password, v3password or v3applicationcredential); without it \
                 Nova sends no token: remove the section instead",
            ))
        }
        Some("password" | "v3password") => false,
        Some("v3applicationcredential") => true,
        Some(other) => {
            return Err(invalid(
                k("auth_type"),
                format!(
                    "{other:?} is not supported: password, v3password or v3applicationcredential"
                ),
            ))
        }
    };
    let Some(auth_url) = f.auth_url.clone().filter(|u| !u.is_empty()) else {
        return Err(invalid(k("auth_url"), "required (Keystone v3, …/v3)"));
    };
    crate::agent::config::Endpoint::parse(&k("auth_url"), &auth_url)?;
    let (password_keys, app_keys) = (
        f.username.is_some() || f.password.is_some() || f.project_name.is_some(),
        f.application_credential_id.is_some() || f.application_credential_secret.is_some(),
    );
    if application && password_keys {
        return Err(invalid(
            k("auth_type"),
            "v3applicationcredential takes application_credential_id and _secret, not a username",
        ));
    }
    if !application && app_keys {
        return Err(invalid(
            k("auth_type"),
            "application_credential_* need auth_type = \"v3applicationcredential\"",
        ));
    }
    if application && f.application_credential_id.is_none() {
        return Err(invalid(
            k("application_credential_id"),
            "required with auth_type = \"v3applicationcredential\"",
        ));
    }
    // The Neutron client's section, whose Keystone code this reuses.
    let section = crate::agent::config::NeutronFile {
        url: Some(auth_url.clone()),
        auth_strategy: Some("keystone".into()),
        auth_url: Some(auth_url),
        username: f.username.clone(),
        password: f.password.clone(),
        project_name: f.project_name.clone(),
        user_domain_name: f.user_domain_name.clone(),
        project_domain_name: f.project_domain_name.clone(),
        application_credential_id: f.application_credential_id.clone(),
        application_credential_secret: f.application_credential_secret.clone(),
        region_name: None,
        timeout: None,
        insecure: f.insecure,
        ca_file: f.cafile.clone(),
    };
    let mut cfg =
        crate::agent::config::neutron_section(P, &section, "in [api.vendordata_dynamic_auth]")
            .map_err(|e| match e {
                // keystoneauth's name for the Neutron section's `ca_file`.
                ConfigError::Invalid { key, message } if key == k("ca_file") => {
                    invalid(k("cafile"), message)
                }
                other => other,
            })?;
    cfg.timeout = f.timeout.map_or(DEFAULT_AUTH_TIMEOUT, Duration::from_secs);
    Ok(Some(cfg))
}

/// One loop's vendordata state: the Keystone client, when a token is sent.
pub struct LoopVendordata {
    keystone: Option<crate::agent::neutron::NeutronClient>,
}

impl std::fmt::Debug for LoopVendordata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopVendordata")
            .field("keystone", &self.keystone.is_some())
            .finish()
    }
}

impl LoopVendordata {
    /// For one loop (on its thread: the client is per loop).
    pub fn new(cfg: &VendordataConfig) -> LoopVendordata {
        LoopVendordata {
            keystone: cfg.auth.as_ref().map(|a| {
                crate::agent::neutron::NeutronClient::new(
                    a,
                    std::sync::Arc::new(crate::agent::metrics::LoopMetrics::default()),
                )
            }),
        }
    }
}

/// Nova's request body for `inst`: `jsonutils.dumps` of the dict it builds.
pub(crate) fn request_body(inst: &Instance) -> String {
    let user_data = inst.user_data.as_ref().map_or(Json::Null, |u| {
        Json::Str(base64::engine::general_purpose::STANDARD.encode(u))
    });
    let meta = inst
        .meta
        .iter()
        .map(|(k, v)| (k.clone(), Json::str(v)))
        .collect();
    Json::Obj(vec![
        ("project-id".into(), Json::str(&inst.project)),
        ("instance-id".into(), Json::str(&inst.uuid)),
        ("image-id".into(), Json::str(&inst.image_ref)),
        ("user-data".into(), user_data),
        ("hostname".into(), Json::str(&inst.hostname)),
        ("metadata".into(), Json::Obj(meta)),
        ("boot-roles".into(), Json::str(&inst.boot_roles)),
    ])
    .to_python_string()
}

const USER_AGENT: HeaderName<'static> = HeaderName::from_static("User-Agent");
const ACCEPT: HeaderName<'static> = HeaderName::from_static("Accept");
const HOST: HeaderName<'static> = HeaderName::from_static("Host");
const AUTHORIZATION: HeaderName<'static> = HeaderName::from_static("Authorization");
const APPLICATION_JSON: HeaderValue<'static> = HeaderValue::from_static("application/json");

const X_AUTH_TOKEN: HeaderName<'static> = HeaderName::from_static("X-Auth-Token");

/// The whole POST to `t`.
fn request(t: &Target, body: &str, token: Option<&str>) -> Result<Vec<u8>, String> {
    let bad = |what: &str| format!("{what} cannot be sent in a header");
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(b"POST ");
    out.extend_from_slice(t.path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    put_header(
        &mut out,
        HOST,
        HeaderValue::new(t.host_header.as_bytes()).map_err(|_| bad("the host"))?,
    );
    put_header(&mut out, http::write::CONTENT_TYPE, APPLICATION_JSON);
    put_header(&mut out, ACCEPT, APPLICATION_JSON);
    put_header(
        &mut out,
        USER_AGENT,
        HeaderValue::from_static("openstack-nova-vendordata"),
    );
    if let Some(b) = &t.basic {
        let v = format!("Basic {b}");
        put_header(
            &mut out,
            AUTHORIZATION,
            HeaderValue::new(v.as_bytes()).map_err(|_| bad("the credentials"))?,
        );
    }
    if let Some(tok) = token {
        put_header(
            &mut out,
            X_AUTH_TOKEN,
            HeaderValue::new(tok.as_bytes()).map_err(|_| bad("the token"))?,
        );
    }
    put_header(
        &mut out,
        http::write::CONNECTION,
        HeaderValue::from_static("close"),
    );
    put_content_length(&mut out, body.len() as u64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
    Ok(out)
}

/// A connection to a target.
enum Conn {
    Plain(TcpConn),
    Tls(Box<crate::agent::tls::TlsConn>),
}

impl Conn {
    async fn write_all(&self, buf: Vec<u8>) -> std::io::Result<()> {
        match self {
            Conn::Plain(c) => c.write_all(buf).await.0,
            Conn::Tls(c) => c.write_all(buf).await.0,
        }
    }

    async fn read_append(&self, buf: Vec<u8>) -> (std::io::Result<usize>, Vec<u8>) {
        match self {
            Conn::Plain(c) => c.read_append(buf, READ_BYTES).await,
            Conn::Tls(c) => c.read_append(buf, READ_BYTES).await,
        }
    }
}

/// Why one target gave nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// TCP connect or TLS handshake failed.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// No connection within the connect timeout.
    #[error("no connection within {0:?}")]
    ConnectTimeout(Duration),
    /// No complete answer within the read timeout.
    #[error("no complete answer within {0:?}")]
    ReadTimeout(Duration),
    /// Sending or reading failed, or the answer is not HTTP.
    #[error("{0}")]
    Broken(String),
    /// A status other than 2xx.
    #[error("answered HTTP {0}")]
    Status(u16),
    /// The body is not JSON.
    #[error("the answer is not JSON: {0}")]
    NotJson(String),
    /// No Keystone token (`[vendordata_dynamic_auth]`).
    #[error("no Keystone token: {0}")]
    Token(String),
}

/// POST `body` to `t` with a token when configured, once more with a
/// fresh one if the target answers 401 (keystoneauth's re-authentication).
async fn fetch_one(
    cfg: &VendordataConfig,
    lv: &LoopVendordata,
    t: &Target,
    body: &str,
) -> Result<Json, TargetError> {
    let Some(ks) = &lv.keystone else {
        return post(cfg, t, body, None).await;
    };
    let mut retried = false;
    loop {
        let token = ks
            .service_token()
            .await
            .map_err(|e| TargetError::Token(e.to_string()))?;
        match post(cfg, t, body, token.as_deref()).await {
            Err(TargetError::Status(401)) if !retried => {
                retried = true;
                if let Some(tok) = &token {
                    ks.forget_token(tok);
                }
            }
            r => return r,
        }
    }
}

/// One POST of `body` to `t`; its JSON answer (`{}` for an empty body).
async fn post(
    cfg: &VendordataConfig,
    t: &Target,
    body: &str,
    token: Option<&str>,
) -> Result<Json, TargetError> {
    let req = request(t, body, token).map_err(TargetError::Broken)?;
    let connect = async {
        let tcp = TcpConn::connect(t.addr, None)
            .await
            .map_err(|e| TargetError::Connect(e.to_string()))?;
        match (&t.tls_name, &cfg.tls) {
            (None, _) => Ok(Conn::Plain(tcp)),
            (Some(name), Some(tls)) => {
                crate::agent::tls::TlsConn::connect(tcp, tls.0.clone(), name.clone())
                    .await
                    .map(|c| Conn::Tls(Box::new(c)))
                    .map_err(|e| TargetError::Connect(format!("TLS: {e}")))
            }
            (Some(_), None) => Err(TargetError::Connect("no TLS settings".into())),
        }
    };
    let conn = match rt::with_deadline(Instant::now() + cfg.connect_timeout, connect).await {
        Ok(r) => r?,
        Err(rt::Elapsed) => return Err(TargetError::ConnectTimeout(cfg.connect_timeout)),
    };
    let exchange = async {
        conn.write_all(req)
            .await
            .map_err(|e| TargetError::Broken(format!("sending the request: {e}")))?;
        let limits = Limits::default();
        let mut buf = Vec::new();
        let mut eof = false;
        loop {
            match http::frame_response(&buf, &limits, false, MAX_DYNAMIC_VENDOR_DATA_BYTES, eof) {
                Ok(Some((len, head))) => {
                    buf.truncate(len);
                    return Ok((head, buf));
                }
                Ok(None) if eof => {
                    return Err(TargetError::Broken("closed before a whole answer".into()))
                }
                Ok(None) => {}
                Err(why) => return Err(TargetError::Broken(why)),
            }
            let (r, back) = conn.read_append(buf).await;
            buf = back;
            match r {
                Ok(0) => eof = true,
                Ok(_) => {}
                Err(e) => return Err(TargetError::Broken(format!("reading the answer: {e}"))),
            }
        }
    };
    let (head, bytes) = match rt::with_deadline(Instant::now() + cfg.read_timeout, exchange).await {
        Ok(r) => r?,
        Err(rt::Elapsed) => return Err(TargetError::ReadTimeout(cfg.read_timeout)),
    };
    if !(200..300).contains(&head.status) {
        return Err(TargetError::Status(head.status));
    }
    let raw = &bytes[head.head_len..];
    let payload = match head.body {
        ResponseBody::None => Vec::new(),
        ResponseBody::Chunked => {
            let mut out = Vec::with_capacity(raw.len());
            let mut sc = http::ChunkedScanner::new(MAX_DYNAMIC_VENDOR_DATA_BYTES);
            sc.decode(raw, &mut out)
                .map_err(|e| TargetError::Broken(format!("chunked body: {e:?}")))?;
            out
        }
        ResponseBody::Length(_) | ResponseBody::UntilClose => raw.to_vec(),
    };
    // Nova: `if res and res.text: return jsonutils.loads(res.text)`, else {}.
    if payload.is_empty() {
        return Ok(Json::Obj(Vec::new()));
    }
    serde_json::from_slice::<serde_json::Value>(&payload)
        .map(Json::Value)
        .map_err(|e| TargetError::NotJson(e.to_string()))
}

/// A target failed and `vendordata_dynamic_failure_fatal` is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fatal;

/// Every target's answer for `inst`, in target order: `{}` for one that
/// failed (logged, naming the target and the instance), or [`Fatal`].
///
/// # Errors
/// [`Fatal`]: a target failed with `failure_fatal`.
pub(crate) async fn fetch_all(
    cfg: &VendordataConfig,
    lv: &LoopVendordata,
    inst: &Instance,
) -> Result<Vec<(String, Json)>, Fatal> {
    let body = request_body(inst);
    let answers =
        futures_util::future::join_all(cfg.targets.iter().map(|t| fetch_one(cfg, lv, t, &body)))
            .await;
    let mut out = Vec::with_capacity(answers.len());
    let mut fatal = false;
    for (t, a) in cfg.targets.iter().zip(answers) {
        match a {
            Ok(v) => out.push((t.name.clone(), v)),
            Err(e) => {
                log::warn(format_args!(
                    "api: dynamic vendordata target {:?} at {} for instance {}: {e}{}",
                    t.name,
                    t.shown,
                    inst.uuid,
                    if cfg.failure_fatal {
                        " (vendordata_dynamic_failure_fatal: answering 500)"
                    } else {
                        "; serving {} under its name"
                    }
                ));
                fatal |= cfg.failure_fatal;
                out.push((t.name.clone(), Json::Obj(Vec::new())));
            }
        }
    }
    if fatal {
        return Err(Fatal);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_as_nova_splits_them() {
        let t = Target::parse("k", "v1@http://127.0.0.1:9/vd/?a=1#frag").unwrap();
        assert_eq!(t.name, "v1");
        assert_eq!(t.path, "/vd/?a=1");
        assert_eq!(t.shown, "http://127.0.0.1:9/vd/?a=1");
        let t = Target::parse("k", "v2@http://us%40r:p%3Aw@127.0.0.1:9").unwrap();
        assert_eq!(t.path, "/");
        assert_eq!(t.shown, "http://127.0.0.1:9/");
        let creds = base64::engine::general_purpose::STANDARD
            .decode(t.basic.as_deref().unwrap())
            .unwrap();
        assert_eq!(creds, b"us@r:p:w");
        assert!(!format!("{t:?}").contains("p%3Aw"));
        for (bad, what) in [
            ("http://127.0.0.1/", "not name@url"),
            ("@http://127.0.0.1/", "empty"),
            ("n@ftp://127.0.0.1/", "http"),
            ("n@http://127.0.0.1/a b", "space"),
        ] {
            let e = Target::parse("api.vendordata_dynamic_targets[0]", bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains("api.vendordata_dynamic_targets[0]"), "{e}");
            assert!(e.contains(what), "{bad}: {e}");
        }
        let e = Target::parse("k", "http://user:hunter2@127.0.0.1/")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn unquote_decodes_percent_escapes_only_when_whole() {
        assert_eq!(unquote("a%20b"), b"a b");
        assert_eq!(unquote("a%2"), b"a%2");
        assert_eq!(unquote("%zz"), b"%zz");
        assert_eq!(unquote("%41"), b"A");
    }

    #[test]
    fn providers_parse_and_refuse_unknown_or_repeated() {
        let items = list_items(&crate::config::OneOrMany::One(
            "StaticJSON, DynamicJSON".into(),
        ));
        assert_eq!(
            parse_providers("p", &items).unwrap(),
            vec![Provider::StaticJson, Provider::DynamicJson]
        );
        let e = parse_providers("p", &["Static".into()]).unwrap_err();
        assert!(e.to_string().contains("p[0]"), "{e}");
        let e = parse_providers("p", &["DynamicJSON".into(), "DynamicJSON".into()]).unwrap_err();
        assert!(e.to_string().contains("p[1]"), "{e}");
    }
}
