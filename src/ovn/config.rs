//! `[ovn]` → validated [`OvnConfig`], for `metaproxy ovn`
//! ([`crate::ovn::serve`]); `metaproxy ovn-dump-replica --config FILE` reads
//! its OVSDB part, [`OvsdbSettings`].
//!
//! The keys are Neutron's, so an operator copies them from
//! `neutron_ovn_metadata_agent.ini` or the OVN agent's file; Neutron's
//! sections become tables under `[ovn]`, as every metaproxy daemon owns one
//! top-level section:
//!
//! | Neutron | here |
//! |---|---|
//! | `[ovn] ovn_sb_connection`, `ovn_sb_private_key`, `ovn_sb_certificate`, `ovn_sb_ca_cert`, `ovsdb_probe_interval` (ms), `ovsdb_connection_timeout` (s) | `[ovn]`, same keys, same units |
//! | `[ovs] ovsdb_connection`, `ovsdb_connection_timeout`, `ssl_key_file`, `ssl_cert_file`, `ssl_ca_cert_file` | `[ovn.ovs]` |
//! | `[DEFAULT] metadata_proxy_shared_secret` | `[ovn] metadata_proxy_shared_secret` |
//! | `[DEFAULT] nova_metadata_host`, `_port`, `_protocol`, `_insecure`, `auth_ca_cert`, `nova_client_cert`, `nova_client_priv_key` | `[ovn.nova]`, the agent's `[agent.nova]` keys |
//! | `[metadata_rate_limiting]` | `[ovn.metadata_rate_limiting]`, the proxy's `[proxy.rate_limit]` keys |
//! | `[DEFAULT] agent_down_time` (sets the liveness echo delay) | `[ovn] agent_down_time` (s) |
//!
//! And one of ours: `legacy_metadata_agent_keys = true` writes the
//! deprecated `neutron-ovn-metadata-agent`'s liveness keys instead of
//! `neutron-ovn-agent`'s ([`crate::ovn::liveness`]).
//!
//! Defaults are Neutron's: `ovn_sb_connection = "tcp:127.0.0.1:6642"`,
//! `ovsdb_probe_interval = 60000`, `ovsdb_connection_timeout = 180`,
//! `[ovs] ovsdb_connection = "tcp:127.0.0.1:6640"` (the OVN agent's; the old
//! metadata agent's default, `unix:/usr/local/var/run/openvswitch/db.sock`,
//! is a source-install path, Debian's socket is
//! `unix:/var/run/openvswitch/db.sock`).
//!
//! The shared secret never reaches a log: [`OvnConfig`]'s `Debug` prints
//! `<redacted>` or `<empty>`.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::liveness::{AgentKind, LivenessConfig, DEFAULT_AGENT_DOWN_TIME};
use super::ovsdb::{tls_config, ConnOptions, Remote, TlsFiles};
use crate::agent::config::{nova_config, NovaConfig, NovaFile};
use crate::config::{invalid, ConfigError};
use crate::proxy::config::{rate_limit_config, RateLimitFile};
use crate::proxy::ratelimit::RateLimitConfig;

/// Neutron's `[ovn] ovn_sb_connection` default.
pub const DEFAULT_SB_CONNECTION: &str = "tcp:127.0.0.1:6642";
/// Neutron's `[ovs] ovsdb_connection` default (`ovsdb_api.API_OPTS`).
pub const DEFAULT_OVS_CONNECTION: &str = "tcp:127.0.0.1:6640";
/// Neutron's `ovsdb_probe_interval` default, in milliseconds.
pub const DEFAULT_PROBE_INTERVAL_MS: u64 = 60_000;
/// Neutron's `ovsdb_connection_timeout` default, in seconds.
pub const DEFAULT_CONNECTION_TIMEOUT_S: u64 = 180;

/// `[ovn.ovs]`: the local Open_vSwitch database.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct OvsFile {
    /// `tcp:`, `ssl:` or `unix:` remote.
    pub ovsdb_connection: Option<String>,
    /// Seconds.
    pub ovsdb_connection_timeout: Option<u64>,
    /// `ssl:`: our private key (PEM).
    pub ssl_key_file: Option<PathBuf>,
    /// `ssl:`: our certificate (PEM).
    pub ssl_cert_file: Option<PathBuf>,
    /// `ssl:`: the CA certificate (PEM).
    pub ssl_ca_cert_file: Option<PathBuf>,
}

/// `[ovn]` as written in the file.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct OvnFile {
    /// Comma-separated Southbound remotes, tried in turn.
    pub ovn_sb_connection: Option<String>,
    /// `ssl:`: our private key (PEM).
    pub ovn_sb_private_key: Option<PathBuf>,
    /// `ssl:`: our certificate (PEM).
    pub ovn_sb_certificate: Option<PathBuf>,
    /// `ssl:`: the CA certificate (PEM).
    pub ovn_sb_ca_cert: Option<PathBuf>,
    /// Inactivity probe, milliseconds (0 disables), as Neutron.
    pub ovsdb_probe_interval: Option<u64>,
    /// Connect timeout, seconds (at least 1), as Neutron.
    pub ovsdb_connection_timeout: Option<u64>,
    /// HMAC key shared with the metadata API.
    pub metadata_proxy_shared_secret: Option<String>,
    /// Seconds; sets the liveness echo's delay window.
    pub agent_down_time: Option<u64>,
    /// Write `neutron-ovn-metadata-agent`'s liveness keys.
    pub legacy_metadata_agent_keys: Option<bool>,
    /// `[ovn.ovs]`
    #[serde(default)]
    pub ovs: OvsFile,
    /// `[ovn.nova]`
    #[serde(default)]
    pub nova: NovaFile,
    /// `[ovn.metadata_rate_limiting]`
    #[serde(default)]
    pub metadata_rate_limiting: RateLimitFile,
}

impl OvnFile {
    /// Parse the raw `[ovn]` table.
    ///
    /// # Errors
    /// An unknown key or a value of the wrong type, named.
    pub fn from_table(t: &toml::Table) -> Result<OvnFile, ConfigError> {
        OvnFile::deserialize(toml::Value::Table(t.clone())).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("[ovn]"),
            message: e.to_string().trim_end().to_string(),
        })
    }
}

/// The two OVSDB connections.
#[derive(Debug, Clone)]
pub struct OvsdbSettings {
    /// Southbound remotes.
    pub sb_remotes: Vec<Remote>,
    /// Southbound timeouts, probe, TLS.
    pub sb_conn: ConnOptions,
    /// The local Open_vSwitch database.
    pub ovs_remote: Remote,
    /// Its timeouts and TLS (no probe: it is read at start).
    pub ovs_conn: ConnOptions,
}

/// Three TLS files that go together: all or none, and needed by `ssl:`.
fn tls_files(
    section: &str,
    names: [&str; 3],
    files: [&Option<PathBuf>; 3],
    needed_by: Option<&Remote>,
) -> Result<Option<std::sync::Arc<rustls::ClientConfig>>, ConfigError> {
    let key = |k: &str| format!("{section}.{k}");
    let (private_key, certificate, ca_cert) = match files {
        [Some(k), Some(c), Some(a)] => (k.clone(), c.clone(), a.clone()),
        [None, None, None] => {
            if let Some(r) = needed_by {
                return Err(invalid(
                    key(names[0]),
                    format!(
                        "{r} is an ssl: remote: set {}, {} and {}",
                        names[0], names[1], names[2]
                    ),
                ));
            }
            return Ok(None);
        }
        _ => {
            let missing = names
                .iter()
                .zip(files)
                .find(|(_, f)| f.is_none())
                .map_or(names[0], |(n, _)| *n);
            return Err(invalid(
                key(missing),
                format!("set {}, {} and {} together", names[0], names[1], names[2]),
            ));
        }
    };
    // Name the file at fault: each must be readable.
    for (n, p) in names.iter().zip([&private_key, &certificate, &ca_cert]) {
        std::fs::metadata(p).map_err(|e| invalid(key(n), format!("{}: {e}", p.display())))?;
    }
    let files = TlsFiles {
        private_key,
        certificate,
        ca_cert,
    };
    tls_config(&files).map(Some).map_err(|e| {
        let msg = e.to_string();
        let at = [&files.private_key, &files.certificate, &files.ca_cert]
            .iter()
            .position(|p| msg.contains(&*p.display().to_string()))
            .unwrap_or(0);
        invalid(key(names[at]), msg)
    })
}

impl TryFrom<&OvnFile> for OvsdbSettings {
    type Error = ConfigError;

    fn try_from(f: &OvnFile) -> Result<Self, ConfigError> {
        let sb = f
            .ovn_sb_connection
            .as_deref()
            .unwrap_or(DEFAULT_SB_CONNECTION);
        let sb_remotes =
            Remote::parse_list(sb).map_err(|e| invalid("ovn.ovn_sb_connection", e.to_string()))?;
        let secs = |key: &str, v: Option<u64>| match v.unwrap_or(DEFAULT_CONNECTION_TIMEOUT_S) {
            0 => Err(invalid(key, "must be at least 1 (seconds)")),
            n => Ok(Duration::from_secs(n)),
        };
        let sb_tls = tls_files(
            "ovn",
            ["ovn_sb_private_key", "ovn_sb_certificate", "ovn_sb_ca_cert"],
            [
                &f.ovn_sb_private_key,
                &f.ovn_sb_certificate,
                &f.ovn_sb_ca_cert,
            ],
            sb_remotes.iter().find(|r| matches!(r, Remote::Ssl(..))),
        )?;
        let sb_conn = ConnOptions {
            connect_timeout: secs("ovn.ovsdb_connection_timeout", f.ovsdb_connection_timeout)?,
            probe_interval: Duration::from_millis(
                f.ovsdb_probe_interval.unwrap_or(DEFAULT_PROBE_INTERVAL_MS),
            ),
            tls: sb_tls,
            ..ConnOptions::default()
        };
        let o = &f.ovs;
        let ovs = o
            .ovsdb_connection
            .as_deref()
            .unwrap_or(DEFAULT_OVS_CONNECTION);
        let ovs_remote =
            Remote::parse(ovs).map_err(|e| invalid("ovn.ovs.ovsdb_connection", e.to_string()))?;
        let ovs_tls = tls_files(
            "ovn.ovs",
            ["ssl_key_file", "ssl_cert_file", "ssl_ca_cert_file"],
            [&o.ssl_key_file, &o.ssl_cert_file, &o.ssl_ca_cert_file],
            matches!(ovs_remote, Remote::Ssl(..)).then_some(&ovs_remote),
        )?;
        let ovs_conn = ConnOptions {
            connect_timeout: secs(
                "ovn.ovs.ovsdb_connection_timeout",
                o.ovsdb_connection_timeout,
            )?,
            probe_interval: Duration::ZERO,
            tls: ovs_tls,
            ..ConnOptions::default()
        };
        Ok(OvsdbSettings {
            sb_remotes,
            sb_conn,
            ovs_remote,
            ovs_conn,
        })
    }
}

/// Validated `[ovn]`.
#[derive(Clone)]
pub struct OvnConfig {
    /// The OVSDB connections.
    pub ovsdb: OvsdbSettings,
    /// HMAC key shared with the metadata API (Neutron's default: empty).
    pub shared_secret: String,
    /// The metadata API.
    pub nova: NovaConfig,
    /// Per-client rate limits, `None` when off.
    pub rate_limit: Option<RateLimitConfig>,
    /// Whose liveness keys.
    pub agent_kind: AgentKind,
    /// Neutron's `agent_down_time`.
    pub agent_down_time: Duration,
}

impl fmt::Debug for OvnConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secret = if self.shared_secret.is_empty() {
            "<empty>"
        } else {
            "<redacted>"
        };
        f.debug_struct("OvnConfig")
            .field("ovsdb", &self.ovsdb)
            .field("shared_secret", &secret)
            .field("nova", &self.nova)
            .field("rate_limit", &self.rate_limit)
            .field("agent_kind", &self.agent_kind)
            .field("agent_down_time", &self.agent_down_time)
            .finish()
    }
}

impl OvnConfig {
    /// The liveness writer's settings for `chassis` on `bridge` (read from
    /// the local Open_vSwitch database at start).
    pub fn liveness(&self, chassis: &str, bridge: &str) -> LivenessConfig {
        let mut l = LivenessConfig::new(
            self.ovsdb.sb_remotes.clone(),
            self.ovsdb.sb_conn.clone(),
            chassis,
            bridge,
        );
        l.kind = self.agent_kind;
        l.agent_down_time = self.agent_down_time;
        l
    }
}

impl TryFrom<&OvnFile> for OvnConfig {
    type Error = ConfigError;

    fn try_from(f: &OvnFile) -> Result<Self, ConfigError> {
        let agent_down_time = match f.agent_down_time {
            None => DEFAULT_AGENT_DOWN_TIME,
            Some(0) => {
                return Err(invalid(
                    "ovn.agent_down_time",
                    "must be at least 1 (seconds)",
                ))
            }
            Some(s) => Duration::from_secs(s),
        };
        Ok(OvnConfig {
            ovsdb: OvsdbSettings::try_from(f)?,
            shared_secret: f.metadata_proxy_shared_secret.clone().unwrap_or_default(),
            nova: nova_config("ovn.nova", &f.nova)?,
            rate_limit: rate_limit_config("ovn.metadata_rate_limiting", &f.metadata_rate_limiting)?,
            agent_kind: if f.legacy_metadata_agent_keys.unwrap_or(false) {
                AgentKind::MetadataAgent
            } else {
                AgentKind::OvnAgent
            },
            agent_down_time,
        })
    }
}

impl TryFrom<&toml::Table> for OvnConfig {
    type Error = ConfigError;

    fn try_from(t: &toml::Table) -> Result<Self, ConfigError> {
        OvnConfig::try_from(&OvnFile::from_table(t)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<OvnConfig, ConfigError> {
        let f = crate::config::parse_str(text, std::path::Path::new("t.toml"))?;
        OvnConfig::try_from(&f.ovn.unwrap_or_default())
    }

    fn err(text: &str) -> String {
        parse(text).expect_err(text).to_string()
    }

    #[test]
    fn defaults_follow_neutron() {
        let c = parse("[ovn]\n").unwrap();
        assert_eq!(
            c.ovsdb.sb_remotes,
            vec![Remote::Tcp("127.0.0.1".into(), 6642)]
        );
        assert_eq!(c.ovsdb.ovs_remote, Remote::Tcp("127.0.0.1".into(), 6640));
        assert_eq!(c.ovsdb.sb_conn.probe_interval, Duration::from_secs(60));
        assert_eq!(c.ovsdb.sb_conn.connect_timeout, Duration::from_secs(180));
        assert_eq!(c.ovsdb.ovs_conn.connect_timeout, Duration::from_secs(180));
        assert_eq!(c.nova.addr, "127.0.0.1:8775".parse().unwrap());
        assert_eq!(c.agent_kind, AgentKind::OvnAgent);
        assert_eq!(c.agent_down_time, Duration::from_secs(75));
        assert!(c.rate_limit.is_none());
        assert!(c.shared_secret.is_empty());
    }

    #[test]
    fn neutron_keys_and_units() {
        let c = parse(
            r#"
[ovn]
ovn_sb_connection = "tcp:192.0.2.10:6642,tcp:192.0.2.11:6642"
ovsdb_probe_interval = 5000
ovsdb_connection_timeout = 20
metadata_proxy_shared_secret = "s3cret-value"
legacy_metadata_agent_keys = true
agent_down_time = 15
[ovn.ovs]
ovsdb_connection = "unix:/var/run/openvswitch/db.sock"
ovsdb_connection_timeout = 7
[ovn.nova]
nova_metadata_host = "192.0.2.20"
nova_metadata_port = 8776
[ovn.metadata_rate_limiting]
enabled = true
base_limit = 3
"#,
        )
        .unwrap();
        assert_eq!(c.ovsdb.sb_remotes.len(), 2);
        // Milliseconds and seconds, as Neutron.
        assert_eq!(c.ovsdb.sb_conn.probe_interval, Duration::from_millis(5000));
        assert_eq!(c.ovsdb.sb_conn.connect_timeout, Duration::from_secs(20));
        assert_eq!(c.ovsdb.ovs_conn.connect_timeout, Duration::from_secs(7));
        assert_eq!(
            c.ovsdb.ovs_remote,
            Remote::Unix("/var/run/openvswitch/db.sock".into())
        );
        assert_eq!(c.nova.addr, "192.0.2.20:8776".parse().unwrap());
        assert_eq!(c.rate_limit.unwrap().base.limit, 3);
        assert_eq!(c.agent_kind, AgentKind::MetadataAgent);
        assert_eq!(c.agent_down_time, Duration::from_secs(15));
        let l = c.liveness("chassis-1", "br-ex");
        assert_eq!(l.kind, AgentKind::MetadataAgent);
        assert_eq!(l.agent_down_time, Duration::from_secs(15));
        assert_eq!(l.delay_unit, Duration::from_secs(1), "Neutron's unit");
        assert_eq!(l.remotes, c.ovsdb.sb_remotes);
        assert_eq!(
            (l.chassis.as_str(), l.bridge.as_str()),
            ("chassis-1", "br-ex")
        );
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("s3cret-value"), "{dbg}");
        assert!(dbg.contains("<redacted>"), "{dbg}");
        // A probe of 0 disables it, as in Neutron.
        let c = parse("[ovn]\novsdb_probe_interval = 0\n").unwrap();
        assert!(c.ovsdb.sb_conn.probe_interval.is_zero());
    }

    #[test]
    fn ssl_files_load_and_a_bad_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca =
            rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["chassis-1".to_string()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("ca.pem"), ca.pem()).unwrap();
        std::fs::write(p("cert.pem"), cert.pem()).unwrap();
        std::fs::write(p("key.pem"), key.serialize_pem()).unwrap();
        std::fs::write(p("junk.pem"), "not a certificate").unwrap();
        let text = |ca: &str| {
            format!(
                "[ovn]\novn_sb_connection = \"ssl:192.0.2.1:6642\"\novn_sb_private_key = {:?}\novn_sb_certificate = {:?}\novn_sb_ca_cert = {:?}\n",
                p("key.pem"),
                p("cert.pem"),
                p(ca)
            )
        };
        let c = parse(&text("ca.pem")).unwrap();
        assert!(c.ovsdb.sb_conn.tls.is_some());
        let e = err(&text("junk.pem"));
        assert!(e.contains("`ovn.ovn_sb_ca_cert`"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("[ovn]\novn_sb_connection = \"ptcp:6642\"\n", "ovn.ovn_sb_connection"),
            ("[ovn]\novn_sb_connection = \" , \"\n", "ovn.ovn_sb_connection"),
            ("[ovn]\novsdb_connection_timeout = 0\n", "ovn.ovsdb_connection_timeout"),
            ("[ovn]\nagent_down_time = 0\n", "ovn.agent_down_time"),
            ("[ovn.ovs]\novsdb_connection = \"db.sock\"\n", "ovn.ovs.ovsdb_connection"),
            ("[ovn.ovs]\novsdb_connection_timeout = 0\n", "ovn.ovs.ovsdb_connection_timeout"),
            ("[ovn.nova]\nnova_metadata_protocol = \"ftp\"\n", "ovn.nova.nova_metadata_protocol"),
            ("[ovn.nova]\nnova_metadata_port = 0\n", "ovn.nova.nova_metadata_port"),
            (
                "[ovn.metadata_rate_limiting]\nenabled = true\nburst_limit = 0\n",
                "ovn.metadata_rate_limiting.burst_limit",
            ),
            (
                "[ovn]\novn_sb_connection = \"ssl:192.0.2.1:6642\"\n",
                "ovn.ovn_sb_private_key",
            ),
            (
                "[ovn]\novn_sb_private_key = \"/k\"\novn_sb_certificate = \"/c\"\n",
                "ovn.ovn_sb_ca_cert",
            ),
            (
                "[ovn]\novn_sb_private_key = \"/nonexistent/k\"\novn_sb_certificate = \"/c\"\novn_sb_ca_cert = \"/a\"\n",
                "ovn.ovn_sb_private_key",
            ),
            (
                "[ovn.ovs]\novsdb_connection = \"ssl:127.0.0.1:6640\"\n",
                "ovn.ovs.ssl_key_file",
            ),
        ] {
            let e = err(text);
            assert!(e.contains(&format!("`{key}`")), "{text}: {e}");
        }
        // Unknown keys and wrong types are refused, named.
        let e = err("[ovn]\novn_sb_conection = \"tcp:a:1\"\n");
        assert!(e.contains("ovn_sb_conection"), "{e}");
        let e = err("[ovn]\novsdb_probe_interval = \"60s\"\n");
        assert!(e.contains("ovsdb_probe_interval"), "{e}");
    }
}
