//! Nova-compatible metadata API as a pure handler: request in, response out.
//!
//! [`MetadataApi::handle`] (inventory and request in) does what Nova's `MetadataRequestHandler` does
//! (`shared/spec/metadata-api.md` §1): normalise the path, answer `/` without identity,
//! identify the instance (signed `X-Instance-ID` from the agent, or the TCP
//! peer in direct mode), then render the EC2 tree (`ec2.rs`) or the OpenStack
//! tree (`openstack.rs`) from the [`Inventory`]. There are no sockets here so
//! the server glue can run it on any runtime, and tests drive it directly.
//!
//! Differences from Nova, all deliberate:
//! - an extra segment below a leaf is 404 (Nova: 500);
//! - a leading `//` is collapsed like other repeated slashes (Nova's
//!   `posixpath.normpath` keeps it and answers the version list);
//! - the load-balancer path (`X-Metadata-Provider`) is not supported: 400;
//! - a non-UTF-8 password body is 400 (Nova: 500);
//! - error bodies always use webob's plain-text format (Nova picks HTML for
//!   `Accept: */*`); clients only look at the status.
//!
//! Only statuses Neutron relays are produced: 200, 400, 403, 404, 409, 500.
//! There is no render cache: rendering is microseconds (Nova: ~50 ms), and a
//! cache would have to be invalidated on inventory reload and password POSTs.
#![warn(missing_docs)]

pub mod config;
mod ec2;
mod json;
pub mod metrics;
pub mod nova;
mod openstack;
mod password;
pub(crate) mod path;
pub mod server;
pub mod vendordata;

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

use crate::inventory::{Instance, Inventory};
use crate::log;
use crate::sign::Signer;

pub use password::{PasswordError, PasswordStore, PASSWORD_LOG_NAME};

/// `Content-Type` of listings, EC2 values, `user_data`, `network_data.json`.
pub const CONTENT_TYPE_TEXT: &str = "text/plain; charset=UTF-8";
/// `Content-Type` of `meta_data.json` and `vendor_data*.json`.
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// `Content-Type` of `password` (webob's default).
pub const CONTENT_TYPE_HTML: &str = "text/html; charset=UTF-8";

/// Nova's password cap: 4 system_metadata chunks of 255 characters.
pub const MAX_PASSWORD_BYTES: usize = 1020;

/// Settings of the API (from `[api]`/`[neutron]` in Nova terms).
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// `metadata_proxy_shared_secret`; empty is allowed (HMAC with an empty key).
    pub shared_secret: Vec<u8>,
    /// true: identify by signed `X-Instance-ID` (behind the agent); false:
    /// identify by the TCP peer address.
    pub service_metadata_proxy: bool,
    /// Static vendor JSON (`None` → `{}`). Rendered in the `Value`'s key
    /// order, which is sorted unless serde_json's `preserve_order` is enabled.
    pub vendor_data: Option<serde_json::Value>,
    /// Overrides the inventory's `dhcp_domain` (`Some("")` = no suffix).
    pub dhcp_domain_override: Option<String>,
    /// Nova's `vendordata_providers` and dynamic targets.
    pub vendordata: vendordata::VendordataConfig,
}

impl Default for ApiSettings {
    fn default() -> Self {
        ApiSettings {
            shared_secret: Vec::new(),
            service_metadata_proxy: true,
            vendor_data: None,
            dhcp_domain_override: None,
            vendordata: vendordata::VendordataConfig::default(),
        }
    }
}

/// One request, as received by the server glue.
#[derive(Debug, Clone, Copy)]
pub struct ApiRequest<'a> {
    /// `GET`, `HEAD`, `POST`, `PUT`, ... (compared by value, case-sensitive as HTTP).
    pub method: &'a str,
    /// Raw request-target including any query.
    pub target: &'a [u8],
    /// All headers as received: names in any case, duplicates kept.
    pub headers: &'a [(&'a [u8], &'a [u8])],
    /// The body, de-chunked (empty when there is none).
    pub body: &'a [u8],
    /// TCP peer (used in direct mode and as the `local-ipv4` fallback there).
    pub peer: IpAddr,
}

/// The handler's answer. For `HEAD` the body is still filled in (so the glue
/// can send the right `Content-Length`); the server must not send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiResponse {
    /// HTTP status: 200, 400, 403, 404, 409 or 500.
    pub status: u16,
    /// `Content-Type` to send (one of the `CONTENT_TYPE_*` constants).
    pub content_type: &'static str,
    /// The rendered body (also for `HEAD`: its length is the `Content-Length`).
    pub body: Vec<u8>,
}

impl ApiResponse {
    pub(crate) fn ok(content_type: &'static str, body: impl Into<Vec<u8>>) -> ApiResponse {
        ApiResponse {
            status: 200,
            content_type,
            body: body.into(),
        }
    }

    /// webob's plain-text error page: `"<status>\n\n<explanation>\n\n   "`.
    fn error(status: u16, explanation: &str) -> ApiResponse {
        let reason = match status {
            400 => "Bad Request",
            403 => "Forbidden",
            404 => "Not Found",
            409 => "Conflict",
            _ => "Internal Server Error",
        };
        ApiResponse {
            status,
            content_type: CONTENT_TYPE_TEXT,
            body: format!("{status} {reason}\n\n{explanation}\n\n   ").into_bytes(),
        }
    }

    pub(crate) fn not_found() -> ApiResponse {
        Self::error(404, "The resource could not be found.")
    }

    pub(crate) fn conflict() -> ApiResponse {
        Self::error(
            409,
            "There was a conflict when trying to complete your request.",
        )
    }

    pub(crate) fn internal() -> ApiResponse {
        Self::error(
            500,
            "The server has either erred or is incapable of performing the requested operation.",
        )
    }
}

/// What a renderer needs about the identified instance.
pub(crate) struct RenderCtx<'a> {
    pub(crate) inventory: &'a Inventory,
    pub(crate) instance: &'a Instance,
    /// `hostname[.dhcp_domain]` (borrowed when there is no domain).
    pub(crate) hostname: Cow<'a, str>,
    /// X-Forwarded-For (proxy mode) or the peer (direct mode); `local-ipv4`
    /// fallback for instances without a fixed IPv4.
    pub(crate) remote_address: &'a str,
    pub(crate) vendor_data: Option<&'a serde_json::Value>,
    /// The providers, in order.
    pub(crate) providers: &'a [vendordata::Provider],
    /// The dynamic targets' answers for this instance (fetched only for a
    /// `vendor_data2.json` request).
    pub(crate) dynamic: Option<&'a [(String, json::Json)]>,
}

/// Where the password of the identified instance is, for one request.
#[derive(Clone, Copy)]
pub(crate) enum Passwords<'a> {
    /// The durable password log (inventory source): POSTs are stored inline.
    Log,
    /// Read with the instance (Nova's `instance_system_metadata`): a POST
    /// that passes the checks is handed back as [`Handled::StorePassword`].
    Row(Option<&'a str>),
}

/// A request's outcome when the password lives in a database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Handled {
    /// Send this.
    Answer(ApiResponse),
    /// Store this password (if none is set: else 409), then answer 200.
    StorePassword(String),
}

/// The metadata API. `Sync`: share it behind an `Arc` across workers.
pub struct MetadataApi {
    settings: ApiSettings,
    /// HMAC keyed once with `settings.shared_secret`.
    signer: Signer,
    /// `None` when passwords live with the instance (the Nova source).
    passwords: Option<Arc<PasswordStore>>,
}

impl std::fmt::Debug for MetadataApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetadataApi")
            .field(
                "service_metadata_proxy",
                &self.settings.service_metadata_proxy,
            )
            .finish_non_exhaustive()
    }
}

/// One header's occurrences.
enum Header<'a> {
    Missing,
    One(&'a [u8]),
    Many,
}

fn header<'a>(req: &ApiRequest<'a>, name: &str) -> Header<'a> {
    let mut found = Header::Missing;
    for (k, v) in req.headers {
        if k.eq_ignore_ascii_case(name.as_bytes()) {
            found = match found {
                Header::Missing => Header::One(v.trim_ascii()),
                _ => return Header::Many,
            };
        }
    }
    found
}

/// Who is asking, once identified.
pub(crate) struct Identity<'a, 'r> {
    pub(crate) instance: &'a Instance,
    /// `X-Forwarded-For` as sent (borrowed from the request), or the peer.
    remote_address: Cow<'r, str>,
}

impl MetadataApi {
    /// A handler over `passwords`; see [`ApiSettings`]. The inventory is
    /// passed per request (each server loop holds its own copy, see
    /// [`crate::inventory::store`]).
    pub fn new(settings: ApiSettings, passwords: Arc<PasswordStore>) -> Self {
        MetadataApi {
            signer: Signer::new(&settings.shared_secret),
            settings,
            passwords: Some(passwords),
        }
    }

    /// A handler without a password log: for a source that keeps passwords
    /// with the instance ([`nova`]); the inventory path's POSTs are 500 here.
    pub fn without_password_log(settings: ApiSettings) -> Self {
        MetadataApi {
            signer: Signer::new(&settings.shared_secret),
            settings,
            passwords: None,
        }
    }

    /// Answer one request from `inventory`. Never panics on guest input; the
    /// status is one of 200/400/403/404/409/500.
    pub fn handle(&self, inventory: &Inventory, req: &ApiRequest<'_>) -> ApiResponse {
        self.handle_on(inventory, req, &utc_today())
    }

    /// [`MetadataApi::handle`] with an explicit "today" (`YYYY-MM-DD`) for the
    /// OpenStack future-version hiding.
    pub(crate) fn handle_on(
        &self,
        inventory: &Inventory,
        req: &ApiRequest<'_>,
        today: &str,
    ) -> ApiResponse {
        match self.handle_with(inventory, req, today, Passwords::Log) {
            Handled::Answer(r) => r,
            // The log stores inline; nothing is ever handed back.
            Handled::StorePassword(_) => ApiResponse::internal(),
        }
    }

    /// The signed `X-Instance-ID` of a request that will need an instance:
    /// a path below `/`, exactly one of each identity header and a valid
    /// signature. `None` for everything [`MetadataApi::handle`] answers
    /// without one (or refuses), so a source that reads a database reads
    /// nothing for an unsigned or forged request.
    pub(crate) fn signed_instance_id(&self, req: &ApiRequest<'_>) -> Option<String> {
        if !self.settings.service_metadata_proxy {
            return None;
        }
        let mut scratch = String::new();
        let segs = path::normalize(req.target, &mut scratch)?;
        if segs.is_empty() || !matches!(header(req, "X-Metadata-Provider"), Header::Missing) {
            return None;
        }
        let (Header::One(id), Header::One(sig), Header::One(_)) = (
            header(req, "X-Instance-ID"),
            header(req, "X-Instance-ID-Signature"),
            header(req, "X-Tenant-ID"),
        ) else {
            return None;
        };
        let id = std::str::from_utf8(id).ok()?;
        self.signer.verify(id, sig).then(|| id.to_owned())
    }

    pub(crate) fn handle_with(
        &self,
        inventory: &Inventory,
        req: &ApiRequest<'_>,
        today: &str,
        passwords: Passwords<'_>,
    ) -> Handled {
        self.handle_fetched(inventory, req, today, passwords, None)
    }

    /// [`MetadataApi::handle`] for the server loops: a `vendor_data2.json`
    /// with dynamic targets is answered after their POSTs (on the loop's
    /// runtime: it awaits sockets, never blocks).
    pub async fn handle_async(
        &self,
        inventory: &Inventory,
        req: &ApiRequest<'_>,
        lv: &vendordata::LoopVendordata,
    ) -> ApiResponse {
        let today = utc_today();
        match self
            .handle_with_vendordata(inventory, req, &today, Passwords::Log, lv)
            .await
        {
            Handled::Answer(r) => r,
            Handled::StorePassword(_) => ApiResponse::internal(),
        }
    }

    /// Whether `req` is for a `vendor_data2.json` Nova renders (Newton and
    /// later) and dynamic targets are configured.
    fn wants_dynamic(&self, req: &ApiRequest<'_>) -> bool {
        if !self.settings.vendordata.is_dynamic() {
            return false;
        }
        let mut scratch = String::new();
        let segs = path::normalize(req.target, &mut scratch);
        match segs.as_deref() {
            Some([os, v, leaf]) if *os == "openstack" && *leaf == "vendor_data2.json" => {
                openstack::version_index(v)
                    .is_some_and(|v| openstack::at_least(v, openstack::NEWTON_TWO))
            }
            _ => false,
        }
    }

    /// [`MetadataApi::handle_with`], fetching the dynamic vendordata first
    /// when the request is for it and its identity checks pass (a forged or
    /// foreign request makes no POST).
    pub(crate) async fn handle_with_vendordata(
        &self,
        inventory: &Inventory,
        req: &ApiRequest<'_>,
        today: &str,
        passwords: Passwords<'_>,
        lv: &vendordata::LoopVendordata,
    ) -> Handled {
        if self.wants_dynamic(req) {
            if let Ok(id) = self.identify(req, inventory) {
                return match vendordata::fetch_all(&self.settings.vendordata, lv, id.instance).await
                {
                    Ok(d) => self.handle_fetched(inventory, req, today, passwords, Some(&d)),
                    Err(vendordata::Fatal) => Handled::Answer(ApiResponse::internal()),
                };
            }
        }
        self.handle_fetched(inventory, req, today, passwords, None)
    }

    fn handle_fetched(
        &self,
        inventory: &Inventory,
        req: &ApiRequest<'_>,
        today: &str,
        passwords: Passwords<'_>,
        dynamic: Option<&[(String, json::Json)]>,
    ) -> Handled {
        let mut scratch = String::new();
        let Some(segs) = path::normalize(req.target, &mut scratch) else {
            return Handled::Answer(ApiResponse::not_found());
        };
        if segs.is_empty() {
            return Handled::Answer(ApiResponse::ok(CONTENT_TYPE_TEXT, ec2::version_list()));
        }
        let id = match self.identify(req, inventory) {
            Ok(id) => id,
            Err(resp) => return Handled::Answer(resp),
        };
        let domain = self
            .settings
            .dhcp_domain_override
            .as_deref()
            .unwrap_or(inventory.dhcp_domain());
        let hostname = if domain.is_empty() {
            Cow::Borrowed(id.instance.hostname.as_str())
        } else {
            let mut h = String::with_capacity(id.instance.hostname.len() + 1 + domain.len());
            h.push_str(&id.instance.hostname);
            h.push('.');
            h.push_str(domain);
            Cow::Owned(h)
        };
        let ctx = RenderCtx {
            inventory,
            instance: id.instance,
            hostname,
            remote_address: &id.remote_address,
            vendor_data: self.settings.vendor_data.as_ref(),
            providers: &self.settings.vendordata.providers,
            dynamic,
        };
        match segs[0] {
            "openstack" => self.openstack(req, &ctx, &segs[1..], today, passwords),
            "ec2" => Handled::Answer(Self::ec2(&ctx, &segs[1..])),
            _ => Handled::Answer(Self::ec2(&ctx, &segs)),
        }
    }

    pub(crate) fn identify<'i, 'r>(
        &self,
        req: &ApiRequest<'r>,
        inventory: &'i Inventory,
    ) -> Result<Identity<'i, 'r>, ApiResponse> {
        if !self.settings.service_metadata_proxy {
            return Self::identify_by_peer(req, inventory);
        }
        if !matches!(header(req, "X-Metadata-Provider"), Header::Missing) {
            return Err(ApiResponse::error(
                400,
                "X-Metadata-Provider requests are not supported.",
            ));
        }
        let instance_id = header(req, "X-Instance-ID");
        let signature = header(req, "X-Instance-ID-Signature");
        let tenant_id = header(req, "X-Tenant-ID");
        let bad = |msg: &str| Err(ApiResponse::error(400, msg));
        // Same order of checks (and messages) as Nova.
        let (instance_id, signature, tenant_id) = match (instance_id, signature, tenant_id) {
            (Header::Missing, _, _) => return bad("X-Instance-ID header is missing from request."),
            (_, Header::Missing, _) => {
                return bad("X-Instance-ID-Signature header is missing from request.")
            }
            (_, _, Header::Missing) => return bad("X-Tenant-ID header is missing from request."),
            (Header::Many, _, _) => {
                return bad("Multiple X-Instance-ID headers found within request.")
            }
            (_, _, Header::Many) => {
                return bad("Multiple X-Tenant-ID headers found within request.")
            }
            (_, Header::Many, _) => {
                return bad("Multiple X-Instance-ID-Signature headers found within request.")
            }
            (Header::One(i), Header::One(s), Header::One(t)) => (i, s, t),
        };
        let Ok(instance_id) = std::str::from_utf8(instance_id) else {
            return bad("X-Instance-ID header is not valid UTF-8.");
        };
        if !self.signer.verify(instance_id, signature) {
            return Err(ApiResponse::error(403, "Invalid proxy request signature."));
        }
        let Some(instance) = inventory.instance(instance_id) else {
            return Err(ApiResponse::not_found());
        };
        // A tenant mismatch is a 404, not a 403: do not confirm the instance exists.
        if tenant_id != instance.project.as_bytes() {
            return Err(ApiResponse::not_found());
        }
        let remote_address = match header(req, "X-Forwarded-For") {
            Header::One(v) => String::from_utf8_lossy(v),
            _ => Cow::Borrowed(""),
        };
        Ok(Identity {
            instance,
            remote_address,
        })
    }

    fn identify_by_peer<'i, 'r>(
        req: &ApiRequest<'r>,
        inventory: &'i Inventory,
    ) -> Result<Identity<'i, 'r>, ApiResponse> {
        // A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d.
        let peer = req.peer.to_canonical();
        if peer.is_unspecified() {
            return Err(ApiResponse::internal());
        }
        match inventory.instance_by_ip(peer).as_slice() {
            [] => Err(ApiResponse::not_found()),
            [instance] => Ok(Identity {
                instance,
                remote_address: Cow::Owned(peer.to_string()),
            }),
            // Overlapping networks: Nova raises FixedIpAssociatedWithMultipleInstances.
            _ => Err(ApiResponse::internal()),
        }
    }

    fn ec2(ctx: &RenderCtx<'_>, segs: &[&str]) -> ApiResponse {
        let Some((version, rest)) = segs.split_first() else {
            return ApiResponse::ok(CONTENT_TYPE_TEXT, ec2::version_list());
        };
        let Some(version) = ec2::version_index(version) else {
            return ApiResponse::not_found();
        };
        let tree = ec2::Tree::new(ctx, version);
        match tree.find(rest) {
            Some(node) => {
                // Enough for the `meta-data/` listing (about 250 bytes) and
                // every value but user data: one allocation.
                let mut body = Vec::with_capacity(ec2::BODY_CAPACITY);
                tree.render(node, &mut body);
                ApiResponse::ok(CONTENT_TYPE_TEXT, body)
            }
            None => ApiResponse::not_found(),
        }
    }

    fn openstack(
        &self,
        req: &ApiRequest<'_>,
        ctx: &RenderCtx<'_>,
        segs: &[&str],
        today: &str,
        passwords: Passwords<'_>,
    ) -> Handled {
        let Some((version, rest)) = segs.split_first() else {
            return Handled::Answer(ApiResponse::ok(
                CONTENT_TYPE_TEXT,
                openstack::version_list(today),
            ));
        };
        // `content/NNNN` holds injected files, which only config drives have.
        let Some(version) = openstack::version_index(version) else {
            return Handled::Answer(ApiResponse::not_found());
        };
        let leaf = match rest {
            [] => {
                return Handled::Answer(ApiResponse::ok(
                    CONTENT_TYPE_TEXT,
                    openstack::version_dir(ctx, version),
                ))
            }
            [leaf] => *leaf,
            _ => return Handled::Answer(ApiResponse::not_found()),
        };
        if leaf == "password" && openstack::at_least(version, openstack::GRIZZLY) {
            return self.password(req, ctx.instance, passwords);
        }
        Handled::Answer(match leaf {
            "meta_data.json" => match openstack::meta_data(ctx, version) {
                Ok(body) => ApiResponse::ok(CONTENT_TYPE_JSON, body),
                Err(_) => ApiResponse::internal(),
            },
            "user_data" => match &ctx.instance.user_data {
                Some(ud) => ApiResponse::ok(CONTENT_TYPE_TEXT, ud.clone()),
                None => ApiResponse::not_found(),
            },
            "vendor_data.json" => openstack::vendor_data(ctx, version)
                .map_or_else(ApiResponse::not_found, |b| {
                    ApiResponse::ok(CONTENT_TYPE_JSON, b)
                }),
            "vendor_data2.json" => {
                if ctx.dynamic.is_none()
                    && self.settings.vendordata.is_dynamic()
                    && openstack::at_least(version, openstack::NEWTON_TWO)
                {
                    // Only `handle_with_vendordata` can answer this one:
                    // rendering without the targets would hide them.
                    log::error(format_args!(
                        "api: vendor_data2.json with dynamic targets asked through a \
                         synchronous handler; answering 500"
                    ));
                    return Handled::Answer(ApiResponse::internal());
                }
                openstack::vendor_data2(ctx, version).map_or_else(ApiResponse::not_found, |b| {
                    ApiResponse::ok(CONTENT_TYPE_JSON, b)
                })
            }
            "network_data.json" => ApiResponse::ok(CONTENT_TYPE_TEXT, openstack::network_data(ctx)),
            _ => ApiResponse::not_found(),
        })
    }

    /// `password.handle_password`: the one method-sensitive path.
    fn password(&self, req: &ApiRequest<'_>, instance: &Instance, pw: Passwords<'_>) -> Handled {
        let current = || match pw {
            Passwords::Log => self.passwords.as_ref()?.get(&instance.uuid),
            Passwords::Row(p) => p.map(str::to_owned),
        };
        Handled::Answer(match req.method {
            "GET" => ApiResponse::ok(CONTENT_TYPE_HTML, current().unwrap_or_default()),
            "POST" => {
                // Nova checks the conflict before the size.
                if current().is_some() {
                    return Handled::Answer(ApiResponse::conflict());
                }
                let declared_too_large = match header(req, "Content-Length") {
                    Header::One(v) => std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok())
                        .is_some_and(|n| n > MAX_PASSWORD_BYTES as u64),
                    _ => false,
                };
                if declared_too_large || req.body.len() > MAX_PASSWORD_BYTES {
                    return Handled::Answer(ApiResponse::error(400, "Request is too large."));
                }
                let Ok(body) = std::str::from_utf8(req.body) else {
                    return Handled::Answer(ApiResponse::error(
                        400,
                        "Password is not valid UTF-8.",
                    ));
                };
                if let Passwords::Row(_) = pw {
                    return Handled::StorePassword(body.to_owned());
                }
                let Some(log) = &self.passwords else {
                    return Handled::Answer(ApiResponse::internal());
                };
                match log.set_once(&instance.uuid, body) {
                    Ok(()) => ApiResponse::ok(CONTENT_TYPE_HTML, Vec::new()),
                    Err(PasswordError::AlreadySet) => ApiResponse::conflict(),
                    Err(PasswordError::TooLarge) => {
                        ApiResponse::error(400, "Request is too large.")
                    }
                    Err(PasswordError::Io { .. }) => ApiResponse::internal(),
                }
            }
            _ => ApiResponse::error(400, "GET and POST only are supported."),
        })
    }
}

/// Today's UTC date as `YYYY-MM-DD`, on the stack (asked for on every
/// request, used by the `/openstack` listing only).
pub(crate) fn utc_today() -> Today {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    Today::of(civil_from_days(days))
}

/// A `YYYY-MM-DD` date; see [`utc_today`].
#[derive(Clone, Copy)]
pub(crate) struct Today([u8; 10]);

impl Today {
    /// Years past 9999 (a clock gone wrong) show as 9999-12-31: later than
    /// every version, as the real date would be.
    fn of((y, m, d): (i64, u32, u32)) -> Today {
        let (y, m, d) = if (0..=9999).contains(&y) {
            (y.unsigned_abs(), m, d)
        } else {
            (9999, 12, 31)
        };
        let digit = |v: u64| b'0' + u8::try_from(v % 10).unwrap_or(0);
        let (m, d) = (u64::from(m), u64::from(d));
        Today([
            digit(y / 1000),
            digit(y / 100),
            digit(y / 10),
            digit(y),
            b'-',
            digit(m / 10),
            digit(m),
            b'-',
            digit(d / 10),
            digit(d),
        ])
    }
}

impl std::ops::Deref for Today {
    type Target = str;
    fn deref(&self) -> &str {
        // Only ASCII digits and dashes are ever written into it.
        std::str::from_utf8(&self.0).unwrap_or("9999-12-31")
    }
}

/// Days since 1970-01-01 → (year, month, day); Howard Hinnant's algorithm.
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    (
        y,
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

#[cfg(test)]
mod tests;
