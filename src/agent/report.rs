//! `report_state`: the agent's row in `openstack network agent list`.
//!
//! Neutron has no REST call that creates an agent; a `Metadata agent` row
//! exists, and stays alive (`:-)`), only while something sends the
//! oslo.messaging RPC that neutron-metadata-agent sends every
//! `[agent] report_interval` (`neutron/agent/metadata/agent.py`
//! `_report_state`, `neutron/agent/rpc.py` `PluginReportStateAPI`). This
//! module sends exactly that, so operators' monitoring sees our agent where
//! it expects the Python one.
//!
//! What goes on the wire (oslo.messaging's rabbit driver, `amqpdriver.py`
//! `_send`, `impl_rabbit.py` `topic_send`/`declare_direct_consumer`):
//! - an AMQP publish to the topic exchange `neutron` with routing key
//!   `q-reports-plugin`, `content_type application/json`, `delivery_mode 2`;
//! - the body is the 2.0 envelope `{"oslo.version": "2.0", "oslo.message":
//!   "<json>"}`; the inner JSON has `method: report_state`, `version: 1.4`,
//!   `args`, `_unique_id` and the admin request context as `_context_*`
//!   keys, and no `namespace` (neutron_lib's `RPC_NAMESPACE_STATE` is
//!   `None`; the server's dispatcher refuses a message whose namespace its
//!   endpoint does not have, as `UnsupportedVersion`);
//! - the first report (and every report until one succeeded) is a *call*:
//!   it adds `_msg_id`, `_reply_q` and `_timeout`, and the server answers on
//!   the default exchange with routing key `_reply_q`, a queue
//!   `reply_<uuid hex>` we declare (non-durable, `x-expires` 30 min, as
//!   oslo.messaging does). Later reports are casts, as in Neutron.
//!
//! The module is split in two: the pure part here ([`TransportUrl`],
//! [`message`], [`envelope`], [`utc_time`]) is unit-tested; [`Reporter`] is
//! the IO, in `report/amqp.rs`, the Cargo feature `amqp-report` (default;
//! without it the config refuses `transport_url`,
//! [`crate::config::AMQP_REPORT`], and `report/no_amqp.rs` stands in). It
//! runs on a thread of its own with a current-thread tokio runtime, because
//! `lapin` (a maintained AMQP 0-9-1 client) needs a tokio-compatible
//! executor and the serving loops are compio: nothing of it touches them,
//! so a broker outage cannot slow a guest's request. It reconnects with
//! backoff (1 s doubling to 30 s, oslo's `rabbit_retry_interval`,
//! `rabbit_retry_backoff`, `rabbit_interval_max`), going round the hosts of
//! the URL in order (oslo's `kombu_failover_strategy = round-robin`), and
//! logs an outage once, when it starts, and once when reporting recovers.
//!
//! The `neutron` exchange is declared *passively*: neutron-server owns it,
//! and an active declare with other flags than the cloud's (durable
//! exchanges, quorum-queue clouds) would fail or, worse, succeed with ours
//! before neutron-server's. Until it exists we report nothing and retry.
//!
//! Rejected: speaking AMQP ourselves on compio (a second protocol stack to
//! own for one message every 30 s); a Python sidecar running
//! oslo.messaging (a second runtime and venv on every network node); lapin's
//! own connection recovery (it does not fail over across hosts, and we need
//! to know when an outage starts and ends to log it once). The decision is
//! `docs/adr/0002-report-state-over-lapin.md`.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

#[cfg(feature = "amqp-report")]
mod amqp;
#[cfg(not(feature = "amqp-report"))]
#[path = "report/no_amqp.rs"]
mod amqp;

pub use amqp::{start, Reporter};

/// Neutron's `[agent] report_interval`.
pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(30);
/// AMQP's default port (oslo.messaging's `host.port or 5672`).
pub const DEFAULT_AMQP_PORT: u16 = 5672;
/// The control exchange neutron-server declares (`[DEFAULT] control_exchange`).
pub const EXCHANGE: &str = "neutron";
/// `neutron_lib.agent.topics.REPORTS` + `PLUGIN`.
pub const TOPIC: &str = "q-reports-plugin";
/// `PluginReportStateAPI`'s target version.
pub const RPC_VERSION: &str = "1.4";
/// `neutron_lib.constants.AGENT_PROCESS_METADATA`.
pub const BINARY: &str = "neutron-metadata-agent";
/// `neutron_lib.constants.AGENT_TYPE_METADATA`.
pub const AGENT_TYPE: &str = "Metadata agent";
/// First reconnect delay (oslo's `rabbit_retry_interval`).
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Largest reconnect delay (oslo's `rabbit_interval_max`).
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// Connecting to one broker host, TCP and AMQP handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// What stopping waits for work left on the reporter's blocking pool.
pub const SHUTDOWN_WAIT: Duration = Duration::from_millis(100);
/// Reply queues expire this long after their last consumer went
/// (oslo's `rabbit_transient_queues_ttl`, 1800 s).
pub const REPLY_QUEUE_TTL_MS: u32 = 1_800_000;
/// The call's reply wait when `report_interval` is shorter (Neutron waits
/// `report_interval`).
pub const MIN_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A `transport_url` that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct UrlError(String);

/// One broker of a `transport_url`.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerHost {
    /// Host name or address (an IPv6 literal without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// User name, percent-decoded (`guest` when the URL has none, as oslo).
    pub username: String,
    /// Password, percent-decoded. Never logged.
    pub password: String,
}

impl fmt::Debug for BrokerHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.redacted())
    }
}

impl BrokerHost {
    /// `user:***@host:port`, for logs.
    pub fn redacted(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("{}:***@{host}:{}", self.username, self.port)
    }
}

/// A parsed oslo.messaging `transport_url` for the rabbit driver:
/// `rabbit://user:pass@host:port[,user:pass@host2:port]/vhost`.
#[derive(Clone, PartialEq, Eq)]
pub struct TransportUrl {
    /// The brokers, in the URL's order (tried round-robin).
    pub hosts: Vec<BrokerHost>,
    /// The virtual host, percent-decoded; `/` when the path is empty.
    pub vhost: String,
}

impl fmt::Debug for TransportUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Decode `%XX` escapes (oslo unquotes user, password and vhost).
fn percent_decode(s: &str) -> Result<String, UrlError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| UrlError(format!("bad %-escape in {s:?}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| UrlError(format!("{s:?} is not UTF-8 once decoded")))
}

/// Escape what may not stand in a URL's authority or path.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

impl TransportUrl {
    /// Parse `rabbit://…`. Only the rabbit driver is spoken; `amqp://` is
    /// oslo's AMQP 1.0 driver and `kafka://` is not for RPC.
    ///
    /// # Errors
    /// Another scheme, no host, a bad port or %-escape. The message never
    /// contains the password.
    pub fn parse(url: &str) -> Result<TransportUrl, UrlError> {
        let rest = url
            .strip_prefix("rabbit://")
            .or_else(|| url.strip_prefix("kombu+rabbit://"))
            .ok_or_else(|| {
                let scheme = url.split_once("://").map_or("none", |(s, _)| s);
                UrlError(format!(
                    "scheme {scheme:?} is not supported: only rabbit:// (oslo.messaging's \
                     RabbitMQ driver); TLS is [agent.oslo_messaging_rabbit] ssl = true"
                ))
            })?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        if let Some(q) = query.filter(|q| !q.is_empty()) {
            let keys: Vec<&str> = q
                .split('&')
                .map(|kv| kv.split('=').next().unwrap_or(""))
                .collect();
            return Err(UrlError(format!(
                "query options are not supported ({}): use [agent.oslo_messaging_rabbit]",
                keys.join(", ")
            )));
        }
        let (hosts, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let vhost = match percent_decode(path)? {
            v if v.is_empty() => "/".to_string(),
            v => v,
        };
        let mut out = Vec::new();
        for (n, part) in hosts.split(',').enumerate() {
            // The last '@' separates the userinfo: a password may hold one escaped.
            let (userinfo, hostport) = match part.rfind('@') {
                Some(i) => (Some(&part[..i]), &part[i + 1..]),
                None => (None, part),
            };
            let (username, password) = match userinfo {
                None => ("guest".to_string(), "guest".to_string()),
                Some(u) => match u.split_once(':') {
                    Some((user, pass)) => (percent_decode(user)?, percent_decode(pass)?),
                    None => (percent_decode(u)?, String::new()),
                },
            };
            let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
                let (h, after) = v6
                    .split_once(']')
                    .ok_or_else(|| UrlError(format!("host {}: unclosed [", n + 1)))?;
                (h, after.strip_prefix(':'))
            } else {
                match hostport.rsplit_once(':') {
                    Some((h, p)) => (h, Some(p)),
                    None => (hostport, None),
                }
            };
            if host.is_empty() {
                return Err(UrlError(format!("host {} is empty", n + 1)));
            }
            let port = match port {
                None | Some("") => DEFAULT_AMQP_PORT,
                Some(p) => match p.parse::<u16>() {
                    Ok(p) if p != 0 => p,
                    _ => return Err(UrlError(format!("host {}: bad port {p:?}", n + 1))),
                },
            };
            out.push(BrokerHost {
                host: host.to_string(),
                port,
                username,
                password,
            });
        }
        Ok(TransportUrl { hosts: out, vhost })
    }

    /// The URL with every password replaced by `***`: the only form logged.
    pub fn redacted(&self) -> String {
        let hosts: Vec<String> = self.hosts.iter().map(BrokerHost::redacted).collect();
        let vhost = if self.vhost == "/" {
            String::new()
        } else {
            percent_encode(&self.vhost)
        };
        format!("rabbit://{}/{vhost}", hosts.join(","))
    }
}

/// TLS to the broker (`[agent.oslo_messaging_rabbit] ssl`).
#[derive(Clone, PartialEq, Eq)]
pub struct RabbitTls {
    /// PEM bundle trusted for the broker's certificate (`ssl_ca_file`), in
    /// addition to the Mozilla roots (lapin's rustls connector adds it).
    pub ca_pem: Option<String>,
    /// Client certificate chain and key, PEM (`ssl_cert_file`,
    /// `ssl_key_file`). Never logged.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for RabbitTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let roots = match &self.ca_pem {
            Some(p) => format!("ssl_ca_file, {} bytes", p.len()),
            None => "Mozilla roots".into(),
        };
        let client = if self.identity.is_some() {
            ", client certificate"
        } else {
            ""
        };
        write!(f, "RabbitTls({roots}{client})")
    }
}

/// Validated reporting settings (present only with `transport_url`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportConfig {
    /// The brokers.
    pub transport: TransportUrl,
    /// TLS, when `ssl = true`.
    pub tls: Option<RabbitTls>,
    /// The agent's `host` (Neutron's `[DEFAULT] host`).
    pub host: String,
    /// Between reports; never zero (0 in the file means no reporting).
    pub interval: Duration,
}

/// What the state report says about this agent (its `configurations`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentFacts {
    /// `metadata_proxy_socket`.
    pub socket: String,
    /// `nova_metadata_host`.
    pub nova_host: String,
    /// `nova_metadata_port`.
    pub nova_port: u16,
}

/// Neutron's `agent_state` dict for this agent.
pub fn agent_state(host: &str, facts: &AgentFacts, start_flag: bool, uuid: &str) -> Value {
    let mut s = json!({
        "binary": BINARY,
        "host": host,
        "topic": "N/A",
        "configurations": {
            "metadata_proxy_socket": facts.socket,
            "nova_metadata_host": facts.nova_host,
            "nova_metadata_port": facts.nova_port,
            "log_agent_heartbeats": false,
        },
        "agent_type": AGENT_TYPE,
        "uuid": uuid,
    });
    if start_flag {
        s["start_flag"] = Value::Bool(true);
    }
    s
}

/// A call's reply address: the message id and the reply queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallIds<'a> {
    /// `_msg_id` (uuid hex).
    pub msg_id: &'a str,
    /// `_reply_q` (`reply_<uuid hex>`).
    pub reply_q: &'a str,
}

/// The inner oslo message of one report: `state` from [`agent_state`],
/// `time` from [`utc_time`], `call` for a call (else a cast).
pub fn message(
    state: Value,
    time: &str,
    unique_id: &str,
    request_id: &str,
    call: Option<CallIds<'_>>,
) -> Value {
    let mut m = Map::new();
    m.insert("method".into(), "report_state".into());
    m.insert("version".into(), RPC_VERSION.into());
    m.insert(
        "args".into(),
        json!({"agent_state": {"agent_state": state}, "time": time}),
    );
    if let Some(c) = call {
        m.insert("_msg_id".into(), c.msg_id.into());
        m.insert("_reply_q".into(), c.reply_q.into());
        // call_monitor_timeout: None in PluginReportStateAPI.
        m.insert("_timeout".into(), Value::Null);
    }
    m.insert("_unique_id".into(), unique_id.into());
    // neutron_lib get_admin_context_without_session().to_dict(), packed by
    // oslo.messaging's pack_context.
    let ctx = json!({
        "user": null, "project_id": null, "system_scope": null, "domain": null,
        "user_domain": null, "project_domain": null, "is_admin": true,
        "read_only": false, "show_deleted": false, "auth_token": null,
        "request_id": request_id, "global_request_id": null,
        "resource_uuid": null, "roles": [], "user_identity": "- - - - -",
        "is_admin_project": true, "user_id": null, "tenant_id": null,
        "project_name": null, "tenant_name": null, "user_name": null,
        "timestamp": time.replace('T', " "), "has_global_access": false,
        "can_set_project_id": false,
    });
    if let Value::Object(c) = ctx {
        for (k, v) in c {
            m.insert(format!("_context_{k}"), v);
        }
    }
    Value::Object(m)
}

/// The oslo 2.0 envelope around `msg` (`common.serialize_msg`).
pub fn envelope(msg: &Value) -> Vec<u8> {
    let inner = msg.to_string();
    json!({"oslo.version": "2.0", "oslo.message": inner})
        .to_string()
        .into_bytes()
}

/// `t` as Neutron's `ISO8601_TIME_FORMAT`, `%Y-%m-%dT%H:%M:%S.%f`, in UTC.
pub fn utc_time(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// A random (v4) uuid; `hex` without dashes, as `uuid.uuid4().hex`.
pub fn uuid4(hex: bool) -> String {
    let mut b = [0u8; 16];
    // The OS generator failing leaves zeros: a duplicate id is harmless here.
    let _ = getrandom::fill(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    if hex {
        h
    } else {
        format!(
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..]
        )
    }
}

/// Start reporting for `cfg` when it has a `transport_url`.
///
/// # Errors
/// As [`start`].
pub fn start_for(cfg: &super::AgentConfig) -> std::io::Result<Option<Reporter>> {
    let Some(r) = &cfg.report else {
        return Ok(None);
    };
    let facts = AgentFacts {
        socket: cfg.socket.display().to_string(),
        nova_host: cfg.nova.host.clone(),
        nova_port: cfg.nova.port,
    };
    start(r.clone(), facts).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_host_defaults() {
        let u = TransportUrl::parse("rabbit://guest:guest@127.0.0.1:5672/").unwrap();
        assert_eq!(u.vhost, "/");
        assert_eq!(u.hosts.len(), 1);
        assert_eq!(u.hosts[0].host, "127.0.0.1");
        assert_eq!(u.hosts[0].port, 5672);
        let u = TransportUrl::parse("rabbit://u:p@rabbit").unwrap();
        assert_eq!((u.vhost.as_str(), u.hosts[0].port), ("/", 5672));
        let u = TransportUrl::parse("rabbit://rabbit:5673/").unwrap();
        assert_eq!(u.hosts[0].username, "guest");
    }

    #[test]
    fn multi_host_and_vhost() {
        let u = TransportUrl::parse("rabbit://a:x@h1:5672,b:y@h2:5673,[fd00::1]:5674/openstack")
            .unwrap();
        assert_eq!(u.vhost, "openstack");
        let hp: Vec<(&str, u16, &str)> = u
            .hosts
            .iter()
            .map(|h| (h.host.as_str(), h.port, h.username.as_str()))
            .collect();
        assert_eq!(
            hp,
            [
                ("h1", 5672, "a"),
                ("h2", 5673, "b"),
                ("fd00::1", 5674, "guest")
            ]
        );
    }

    #[test]
    fn percent_decoding() {
        let u = TransportUrl::parse("rabbit://us%40r:p%3Aa%2Fs%40s@h/%2Fneutron").unwrap();
        assert_eq!(u.hosts[0].username, "us@r");
        assert_eq!(u.hosts[0].password, "p:a/s@s");
        assert_eq!(u.vhost, "/neutron");
        assert!(TransportUrl::parse("rabbit://u:p%zz@h/").is_err());
    }

    #[test]
    fn bad_urls_do_not_leak_the_password() {
        for bad in [
            "amqp://u:hunter2@h/",
            "kafka://u:hunter2@h/",
            "rabbit://u:hunter2@h:notaport/",
            "rabbit://u:hunter2@:5672/",
            "rabbit://u:hunter2@h/?ssl=1",
            "rabbit://u:hunter2@h:0/",
        ] {
            let e = TransportUrl::parse(bad).unwrap_err().to_string();
            assert!(!e.contains("hunter2"), "{bad}: {e}");
        }
    }

    #[test]
    fn redaction() {
        let u = TransportUrl::parse("rabbit://a:s3cret@h1:5672,b:0ther@[::1]/vh%20x").unwrap();
        let r = u.redacted();
        assert_eq!(r, "rabbit://a:***@h1:5672,b:***@[::1]:5672/vh%20x");
        let d = format!("{u:?} {:?}", u.hosts[0]);
        assert!(!d.contains("s3cret") && !d.contains("0ther"), "{d}");
    }

    #[test]
    fn time_format() {
        assert_eq!(utc_time(UNIX_EPOCH), "1970-01-01T00:00:00.000000");
        let t = UNIX_EPOCH + Duration::from_micros(1_709_251_199_123_456);
        assert_eq!(utc_time(t), "2024-02-29T23:59:59.123456");
        let t = UNIX_EPOCH + Duration::from_secs(4_102_444_800);
        assert_eq!(utc_time(t), "2100-01-01T00:00:00.000000");
    }

    #[test]
    fn uuids() {
        let a = uuid4(false);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert_eq!(uuid4(true).len(), 32);
        assert_ne!(uuid4(true), uuid4(true));
    }

    fn facts() -> AgentFacts {
        AgentFacts {
            socket: "/var/lib/neutron/metadata_proxy".into(),
            nova_host: "10.0.0.5".into(),
            nova_port: 8775,
        }
    }

    #[test]
    fn first_report_is_a_call_with_start_flag() {
        let state = agent_state("net1", &facts(), true, "u-1");
        let time = "2026-12-02T01:02:03.000004";
        let call = CallIds {
            msg_id: "m1",
            reply_q: "reply_q1",
        };
        let m = message(state, time, "uid1", "req-1", Some(call));
        let want_state = json!({
            "binary": "neutron-metadata-agent",
            "host": "net1",
            "topic": "N/A",
            "configurations": {
                "metadata_proxy_socket": "/var/lib/neutron/metadata_proxy",
                "nova_metadata_host": "10.0.0.5",
                "nova_metadata_port": 8775,
                "log_agent_heartbeats": false,
            },
            "agent_type": "Metadata agent",
            "uuid": "u-1",
            "start_flag": true,
        });
        assert_eq!(
            m["args"],
            json!({"agent_state": {"agent_state": want_state}, "time": time})
        );
        assert_eq!(m["method"], "report_state");
        assert_eq!(m["version"], "1.4");
        assert!(m.get("namespace").is_none());
        assert_eq!(m["_msg_id"], "m1");
        assert_eq!(m["_reply_q"], "reply_q1");
        assert!(m["_timeout"].is_null() && m.get("_timeout").is_some());
        assert_eq!(m["_unique_id"], "uid1");
        assert_eq!(m["_context_is_admin"], true);
        assert_eq!(m["_context_request_id"], "req-1");
        let keys: Vec<&String> = m.as_object().unwrap().keys().collect();
        assert!(keys.iter().all(|k| !k.starts_with('_')
            || k.starts_with("_context_")
            || ["_msg_id", "_reply_q", "_timeout", "_unique_id"].contains(&k.as_str())));
    }

    #[test]
    fn later_reports_are_casts_without_start_flag() {
        let m = message(
            agent_state("net1", &facts(), false, "u-2"),
            "t",
            "uid2",
            "req-2",
            None,
        );
        assert!(m.get("_msg_id").is_none() && m.get("_reply_q").is_none());
        assert!(m.get("_timeout").is_none());
        assert!(m["args"]["agent_state"]["agent_state"]
            .get("start_flag")
            .is_none());
    }

    #[test]
    fn envelope_shape() {
        let m = json!({"method": "report_state", "x": "\"quoted\""});
        let e: Value = serde_json::from_slice(&envelope(&m)).unwrap();
        assert_eq!(e.as_object().unwrap().len(), 2);
        assert_eq!(e["oslo.version"], "2.0");
        let inner: Value = serde_json::from_str(e["oslo.message"].as_str().unwrap()).unwrap();
        assert_eq!(inner, m);
    }
}
