//! One loop's client to Neutron: a Keystone v3 token (cached until shortly
//! before it expires, fetched again once on a 401, one fetch at a time) and
//! the GET itself over a pooled keep-alive connection ([`forward::Pool`],
//! which re-sends once when a pooled connection turns out to be dead, as
//! gunicorn closes idle ones after ~2 s). What to ask and what the answer
//! means is [`super::query`]; when to ask is [`super::resolver`].

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::query as neutron;
use super::{from_forward, BackendError};
use crate::agent::config::{Endpoint, KeystoneMethod, NeutronAuth, NeutronConfig};
use crate::agent::forward;
use crate::agent::metrics::{inc, Call, LoopMetrics};
use crate::log;

/// Refresh a token this long before Keystone says it expires (at most half
/// its lifetime), so that a request never starts with a token about to die.
pub const TOKEN_MARGIN: Duration = Duration::from_secs(60);
/// Lifetime assumed for a token whose `expires_at` we cannot read.
const TOKEN_FALLBACK_LIFETIME: Duration = Duration::from_secs(600);

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SS[.frac][Z|+00:00]`
/// (Keystone's `expires_at`, always UTC).
fn parse_utc(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (hh, mm, ss) = (n(11..13)?, n(14..16)?, n(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

/// When to stop using a token that Keystone says expires at `expires_at`.
fn refresh_deadline(expires_at: Option<&str>, now: Instant) -> Instant {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let lifetime = expires_at
        .and_then(parse_utc)
        .map_or(TOKEN_FALLBACK_LIFETIME, |e| {
            Duration::from_secs(e.saturating_sub(wall))
        });
    now + lifetime - TOKEN_MARGIN.min(lifetime / 2)
}

fn keystone_body(method: &KeystoneMethod) -> String {
    let v = match method {
        KeystoneMethod::Password {
            username,
            password,
            user_domain_name,
            project_name,
            project_domain_name,
        } => serde_json::json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": username, "domain": {"name": user_domain_name}, "password": password}}},
            "scope": {"project": {"name": project_name, "domain": {"name": project_domain_name}}}
        }}),
        KeystoneMethod::ApplicationCredential { id, secret } => serde_json::json!({"auth": {
            "identity": {"methods": ["application_credential"],
                "application_credential": {"id": id, "secret": secret}}
        }}),
    };
    v.to_string()
}

#[derive(serde::Deserialize)]
struct TokenBody {
    token: TokenInner,
}

#[derive(serde::Deserialize)]
struct TokenInner {
    #[serde(default)]
    expires_at: Option<String>,
}

struct Token {
    value: Rc<str>,
    refresh_at: Instant,
}

/// One loop's client to Neutron (and Keystone).
pub struct NeutronClient {
    endpoint: Endpoint,
    auth: NeutronAuth,
    neutron: forward::Pool,
    keystone: Option<forward::Pool>,
    token: RefCell<Option<Token>>,
    /// Serializes token fetches: concurrent callers wait for one POST.
    token_lock: futures_util::lock::Mutex<()>,
    /// Token fetches finished, and how the last one failed: callers that
    /// queued behind a failed fetch share its error instead of each trying
    /// again in turn (N waiters × the timeout while Keystone is down).
    fetches: Cell<u64>,
    last_error: RefCell<Option<BackendError>>,
    metrics: Arc<LoopMetrics>,
}

impl NeutronClient {
    /// A client for `cfg`; connections open on demand.
    pub fn new(cfg: &NeutronConfig, metrics: Arc<LoopMetrics>) -> NeutronClient {
        let tls = |e: &Endpoint| {
            e.tls_name
                .clone()
                .and_then(|name| Some((cfg.tls.as_ref()?.0.clone(), name)))
        };
        let keystone = match &cfg.auth {
            NeutronAuth::NoAuth => None,
            NeutronAuth::Keystone { endpoint, .. } => Some(
                forward::Pool::named("Keystone", endpoint.addr, 1, cfg.timeout)
                    .with_tls(tls(endpoint)),
            ),
        };
        NeutronClient {
            endpoint: cfg.endpoint.clone(),
            auth: cfg.auth.clone(),
            neutron: forward::Pool::named(
                "Neutron",
                cfg.endpoint.addr,
                crate::agent::config::NEUTRON_POOL_SIZE,
                cfg.timeout,
            )
            .with_tls(tls(&cfg.endpoint)),
            keystone,
            token: RefCell::new(None),
            token_lock: futures_util::lock::Mutex::new(()),
            fetches: Cell::new(0),
            last_error: RefCell::new(None),
            metrics,
        }
    }

    fn cached_token(&self) -> Option<Rc<str>> {
        self.token
            .borrow()
            .as_ref()
            .filter(|t| Instant::now() < t.refresh_at)
            .map(|t| t.value.clone())
    }

    /// A valid token (`None` under noauth), fetched if needed.
    async fn token(&self) -> Result<Option<Rc<str>>, BackendError> {
        let NeutronAuth::Keystone { endpoint, method } = &self.auth else {
            return Ok(None);
        };
        if let Some(t) = self.cached_token() {
            return Ok(Some(t));
        }
        let seen = self.fetches.get();
        let _guard = self.token_lock.lock().await;
        if let Some(t) = self.cached_token() {
            return Ok(Some(t)); // fetched while we waited
        }
        if self.fetches.get() != seen {
            if let Some(e) = self.last_error.borrow().clone() {
                return Err(e); // failed while we waited
            }
        }
        let r = self.fetch_token(endpoint, method).await;
        self.fetches.set(self.fetches.get() + 1);
        *self.last_error.borrow_mut() = r.as_ref().err().cloned();
        r.map(Some)
    }

    async fn fetch_token(
        &self,
        endpoint: &Endpoint,
        method: &KeystoneMethod,
    ) -> Result<Rc<str>, BackendError> {
        let Some(pool) = &self.keystone else {
            return Err(BackendError::Cancelled);
        };
        self.metrics.call(Call::Token);
        let body = keystone_body(method);
        let req = format!(
            "POST {}/auth/tokens HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nAccept: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            endpoint.prefix,
            endpoint.host_header,
            body.len()
        );
        let resp = pool.request(req.as_bytes(), false).await.map_err(|e| {
            inc(&self.metrics.backend_errors);
            from_forward("Keystone", e)
        })?;
        if resp.head.status != 201 && resp.head.status != 200 {
            inc(&self.metrics.backend_errors);
            let payload = resp.payload();
            return Err(BackendError::Status(
                "Keystone",
                resp.head.status,
                String::from_utf8_lossy(&payload[..payload.len().min(200)]).into_owned(),
            ));
        }
        let Some(value) = resp
            .head
            .header(&resp.bytes, "X-Subject-Token")
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(Rc::<str>::from)
        else {
            inc(&self.metrics.backend_errors);
            return Err(BackendError::Garbage(
                "Keystone",
                "no X-Subject-Token header".into(),
            ));
        };
        let expires = serde_json::from_slice::<TokenBody>(&resp.payload())
            .ok()
            .and_then(|b| b.token.expires_at);
        let refresh_at = refresh_deadline(expires.as_deref(), Instant::now());
        log::info(format_args!(
            "got a Keystone token (valid until {})",
            expires.as_deref().unwrap_or("unknown")
        ));
        *self.token.borrow_mut() = Some(Token {
            value: value.clone(),
            refresh_at,
        });
        Ok(value)
    }

    /// A valid Keystone token for a call to another service (the API's
    /// dynamic vendordata targets); `None` under noauth.
    ///
    /// # Errors
    /// Keystone failed or refused the credentials.
    pub async fn service_token(&self) -> Result<Option<Rc<str>>, BackendError> {
        self.token().await
    }

    /// Forget `bad` (the service answered 401), unless a newer token replaced it already.
    pub fn forget_token(&self, bad: &Rc<str>) {
        self.drop_token(bad);
    }

    /// Forget `bad` (Neutron rejected it), unless a newer token replaced it already.
    fn drop_token(&self, bad: &Rc<str>) {
        let mut t = self.token.borrow_mut();
        if t.as_ref().is_some_and(|t| Rc::ptr_eq(&t.value, bad)) {
            *t = None;
        }
    }

    /// `GET path` on Neutron; the body of a 200.
    ///
    /// # Errors
    /// See [`BackendError`]; a 401 is retried once with a fresh token.
    pub async fn get(&self, path: &str, call: Call) -> Result<Vec<u8>, BackendError> {
        self.metrics.call(call);
        let mut refreshed = false;
        loop {
            let token = self.token().await?;
            let mut req = format!(
                "GET {}{path} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\n",
                self.endpoint.prefix, self.endpoint.host_header
            );
            if let Some(t) = &token {
                req.push_str("X-Auth-Token: ");
                req.push_str(t);
                req.push_str("\r\n");
            }
            req.push_str("\r\n");
            let resp = self
                .neutron
                .request(req.as_bytes(), false)
                .await
                .map_err(|e| {
                    inc(&self.metrics.backend_errors);
                    from_forward("Neutron", e)
                })?;
            match (resp.head.status, &token) {
                (200, _) => return Ok(resp.payload()),
                (401, Some(t)) if !refreshed => {
                    log::info(format_args!(
                        "Neutron rejected the token (401); getting a new one"
                    ));
                    refreshed = true;
                    self.drop_token(t);
                }
                (status, _) => {
                    inc(&self.metrics.backend_errors);
                    let payload = resp.payload();
                    let msg = neutron::parse_neutron_error(&payload).unwrap_or_else(|| {
                        String::from_utf8_lossy(&payload[..payload.len().min(200)]).into_owned()
                    });
                    return Err(BackendError::Status("Neutron", status, msg));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keystone_expiry_parses() {
        assert_eq!(parse_utc("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_utc("2026-11-24T12:00:00.000000Z"),
            Some(1_795_521_600)
        );
        assert_eq!(parse_utc("2000-03-01T00:00:01+00:00"), Some(951_868_801));
        assert_eq!(parse_utc("garbage"), None);
        let now = Instant::now();
        let at = refresh_deadline(Some("1970-01-01T00:00:00Z"), now);
        assert_eq!(at, now, "an expired token is refreshed at once");
        let at = refresh_deadline(None, now);
        assert_eq!(at, now + TOKEN_FALLBACK_LIFETIME - TOKEN_MARGIN);
    }

    #[test]
    fn keystone_bodies() {
        let b = keystone_body(&KeystoneMethod::ApplicationCredential {
            id: "i".into(),
            secret: "s".into(),
        });
        assert!(b.contains(r#""methods":["application_credential"]"#), "{b}");
        let b = keystone_body(&KeystoneMethod::Password {
            username: "u".into(),
            password: "p".into(),
            user_domain_name: "Default".into(),
            project_name: "service".into(),
            project_domain_name: "Default".into(),
        });
        assert!(
            b.contains(r#""scope":{"project":{"domain":{"name":"Default"},"name":"service"}}"#)
                || b.contains(r#""name":"service""#),
            "{b}"
        );
    }
}
