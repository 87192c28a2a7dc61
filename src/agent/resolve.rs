//! Resolve (scope, address) → (instance, project) from the inventory.
//!
//! The inventory itself, its reload and each loop's copy of it are
//! [`crate::inventory::store`], shared with the API; this module only
//! matches a lookup against one loaded [`Inventory`].
//!
//! Matching follows Neutron (spec §3.2): router scope → the router's
//! networks, then the port by fixed IP (or by MAC for link-local IPv6) on
//! those networks; exactly one port resolves, zero or several is a 404.
//!
//! What a backend returns is untrusted: a tenant sets its own port's
//! `device_id` (up to 255 characters, any bytes Neutron's API accepts), and
//! that value used to reach the API as raw `X-Instance-ID` bytes. So a
//! [`Resolved`] can only be made by [`Resolved::new`], which parses the
//! instance and project ids into [`InstanceId`] / [`ProjectId`]: what Nova
//! and Keystone issue (a UUID, with or without hyphens; a 32-hex-digit id).
//! Anything else is "no instance" (404), logged once per port by
//! [`RejectedPorts`]. Rejected: escaping the value (a mangled id would still
//! be signed and sent as someone's) and refusing only CR/LF (a NUL, a space
//! or 255 bytes of anything is not an instance either).

use std::cell::RefCell;
use std::collections::HashSet;

use crate::agent::identity::{LookupKey, Scope};
use crate::http::HeaderValue;
use crate::inventory::Inventory;
use crate::log;

/// Whether `s` looks like an id Nova or Keystone issues: a UUID
/// (8-4-4-4-12 hex digits) or 32 hex digits (a UUID without hyphens, which
/// is also Keystone's project id format). Either case.
pub fn is_openstack_id(s: &str) -> bool {
    let b = s.as_bytes();
    match b.len() {
        32 => b.iter().all(u8::is_ascii_hexdigit),
        36 => b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        }),
        _ => false,
    }
}

macro_rules! openstack_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub struct $name(String);

        impl $name {
            /// Parse an id from a backend: `None` unless [`is_openstack_id`].
            pub fn parse(s: &str) -> Option<$name> {
                is_openstack_id(s).then(|| $name(s.to_owned()))
            }

            /// The id (hex digits and hyphens only).
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The id as a header value. Cannot fail: only hex digits and
            /// hyphens get past [`Self::parse`].
            pub fn header_value(&self) -> HeaderValue<'_> {
                HeaderValue::new(self.0.as_bytes()).unwrap_or(HeaderValue::from_static(""))
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

openstack_id!(
    /// A Nova instance id (Neutron's port `device_id`), validated.
    InstanceId
);
openstack_id!(
    /// A Keystone project id (the port's `project_id`), validated.
    ProjectId
);

/// Which id of a port was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadId {
    /// `device_id` (the instance).
    Instance,
    /// `project_id` / `tenant_id`.
    Project,
}

/// Who the guest is, as the API is told. Only [`Resolved::new`] makes one,
/// so every `Resolved` carries ids that are safe to sign and to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Instance UUID (Neutron's port `device_id`).
    pub instance: InstanceId,
    /// The instance's project (`X-Tenant-ID`).
    pub project: ProjectId,
}

impl Resolved {
    /// Parse what a backend returned for a port.
    ///
    /// # Errors
    /// The id that is not an OpenStack id (the instance is checked first).
    pub fn new(instance: &str, project: &str) -> Result<Resolved, BadId> {
        Ok(Resolved {
            instance: InstanceId::parse(instance).ok_or(BadId::Instance)?,
            project: ProjectId::parse(project).ok_or(BadId::Project)?,
        })
    }
}

/// Ports remembered as already logged before the memory is cleared (and
/// each is logged once more): bounds the set, and rate-limits a tenant who
/// keeps creating such ports.
const REJECTED_PORTS_REMEMBERED: usize = 1024;
/// Longest part of a port id or bad value a log line carries.
const REJECTED_LOG_CHARS: usize = 64;

/// Logs each port whose ids were refused once (per loop), escaped and cut.
#[derive(Default)]
pub struct RejectedPorts(RefCell<HashSet<String>>);

impl RejectedPorts {
    /// A port `port_id` resolved to `value`, which is not a valid `which`:
    /// log it unless this port was logged already.
    pub fn report(&self, port_id: &str, which: BadId, value: &str) {
        let mut seen = self.0.borrow_mut();
        if seen.contains(port_id) {
            return;
        }
        if seen.len() >= REJECTED_PORTS_REMEMBERED {
            seen.clear();
        }
        seen.insert(port_id.to_owned());
        let field = match which {
            BadId::Instance => "device_id",
            BadId::Project => "project_id",
        };
        log::warn(format_args!(
            "port {} has a {field} that is not an OpenStack id ({} bytes: \"{}\"); \
             answering 404 for it",
            loggable(port_id),
            value.len(),
            loggable(value)
        ));
    }
}

/// `s` escaped (no control bytes, quotes or non-ASCII reach the log) and cut.
fn loggable(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(REJECTED_LOG_CHARS)
        .flat_map(char::escape_default)
        .collect();
    if s.chars().count() > REJECTED_LOG_CHARS {
        out.push_str("...");
    }
    out
}

/// The outcome of looking one guest up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Exactly one port matched.
    Found(Resolved),
    /// No port matched.
    NotFound,
    /// Several ports matched (overlapping networks behind one router).
    Ambiguous(usize),
}

/// Look a guest up in `inv`. A port whose instance or project id is not an
/// OpenStack id resolves to nothing (reported to `rejected`).
pub fn resolve(
    inv: &Inventory,
    scope: &Scope,
    key: &LookupKey,
    rejected: &RejectedPorts,
) -> Resolution {
    let networks: Vec<&str> = match scope {
        Scope::Router(r) => inv.router_networks(r).iter().map(String::as_str).collect(),
        Scope::Network(n) => vec![n.as_str()],
    };
    let ports = match key {
        LookupKey::Ip(ip) => inv.ports_by_ip(&networks, *ip),
        LookupKey::Mac(mac) => inv.ports_by_mac(&networks, *mac),
    };
    match ports.as_slice() {
        [] => Resolution::NotFound,
        [one] => match Resolved::new(&one.instance.uuid, &one.instance.project) {
            Ok(r) => Resolution::Found(r),
            Err(which) => {
                let value = match which {
                    BadId::Instance => &one.instance.uuid,
                    BadId::Project => &one.instance.project,
                };
                rejected.report(&one.port.id, which, value);
                Resolution::NotFound
            }
        },
        many => Resolution::Ambiguous(many.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    const INV: &str = r#"
[[network]]
id = "aaaaaaaa-0000-4000-8000-000000000001"
name = "n1"
project = "p1"
[[network.subnet]]
id = "aaaaaaaa-0000-4000-8000-0000000000b1"
cidr = "10.0.0.0/24"

[[network]]
id = "aaaaaaaa-0000-4000-8000-000000000002"
name = "n2"
project = "p1"
[[network.subnet]]
id = "aaaaaaaa-0000-4000-8000-0000000000b2"
cidr = "10.0.0.0/24"

[[router]]
id = "aaaaaaaa-0000-4000-8000-0000000000c1"
networks = ["aaaaaaaa-0000-4000-8000-000000000001", "aaaaaaaa-0000-4000-8000-000000000002"]

[[instance]]
uuid = "f1aaaaaa-0000-4000-8000-0000000000f1"
hostname = "vm1"
project = "0f1aaaaa000040008000000000000001"
[[instance.port]]
id = "aaaaaaaa-0000-4000-8000-0000000000e1"
network = "aaaaaaaa-0000-4000-8000-000000000001"
mac = "fa:16:3e:00:00:01"
fixed_ips = ["10.0.0.5"]

[[instance]]
uuid = "f2aaaaaa-0000-4000-8000-0000000000f2"
hostname = "vm2"
project = "0f1aaaaa000040008000000000000001"
[[instance.port]]
id = "aaaaaaaa-0000-4000-8000-0000000000e2"
network = "aaaaaaaa-0000-4000-8000-000000000002"
mac = "fa:16:3e:00:00:02"
fixed_ips = ["10.0.0.5"]
"#;

    fn ip(s: &str) -> LookupKey {
        LookupKey::Ip(s.parse::<IpAddr>().unwrap())
    }

    #[test]
    fn one_port_resolves_zero_or_several_do_not() {
        let inv = Inventory::from_toml_str(INV).unwrap();
        let rej = RejectedPorts::default();
        let n1 = Scope::Network("aaaaaaaa-0000-4000-8000-000000000001".into());
        let r = Scope::Router("aaaaaaaa-0000-4000-8000-0000000000c1".into());
        assert_eq!(
            resolve(&inv, &n1, &ip("10.0.0.5"), &rej),
            Resolution::Found(
                Resolved::new(
                    "f1aaaaaa-0000-4000-8000-0000000000f1",
                    "0f1aaaaa000040008000000000000001"
                )
                .unwrap()
            )
        );
        assert_eq!(
            resolve(&inv, &n1, &ip("10.0.0.6"), &rej),
            Resolution::NotFound
        );
        assert_eq!(
            resolve(&inv, &r, &ip("10.0.0.5"), &rej),
            Resolution::Ambiguous(2)
        );
        let unknown = Scope::Router("bbbb".into());
        assert_eq!(
            resolve(&inv, &unknown, &ip("10.0.0.5"), &rej),
            Resolution::NotFound
        );
        let mac = LookupKey::Mac([0xfa, 0x16, 0x3e, 0, 0, 2]);
        assert!(matches!(
            resolve(&inv, &r, &mac, &rej),
            Resolution::Found(Resolved { ref instance, .. }) if instance.as_str().ends_with("f2")
        ));
    }

    #[test]
    fn only_openstack_ids_are_ids() {
        for good in [
            "f1aaaaaa-0000-4000-8000-0000000000f1",
            "F1AAAAAA-0000-4000-8000-0000000000F1",
            "f1aaaaaa000040008000000000000001",
        ] {
            assert!(is_openstack_id(good), "{good}");
        }
        let long = "a".repeat(255);
        for bad in [
            "",
            "dup-a",
            "f1aaaaaa-0000-4000-8000-0000000000f",
            "f1aaaaaa-0000-4000-8000-0000000000f1\r\nX-Evil: 1",
            "f1aaaaaa-0000-4000-8000-0000000000g1",
            "f1aaaaaa00004000800000000000000\0",
            "f1aaaaaa-0000-4000-8000_0000000000f1",
            "-f1aaaaa-0000-4000-8000-0000000000f1",
            "f1aaaaaa0000400080000000000000011",
            " f1aaaaaa000040008000000000000001",
            long.as_str(),
        ] {
            assert!(!is_openstack_id(bad), "{bad:?}");
        }
        assert_eq!(
            Resolved::new("x", "0f1aaaaa000040008000000000000001"),
            Err(BadId::Instance)
        );
        assert_eq!(
            Resolved::new("f1aaaaaa-0000-4000-8000-0000000000f1", "p1"),
            Err(BadId::Project)
        );
    }

    #[test]
    fn inventory_ports_with_bad_ids_resolve_to_nothing() {
        let bad = INV.replace(
            "project = \"0f1aaaaa000040008000000000000001\"\n[[instance.port]]\nid = \"aaaaaaaa-0000-4000-8000-0000000000e1\"",
            "project = \"p1\"\n[[instance.port]]\nid = \"aaaaaaaa-0000-4000-8000-0000000000e1\"",
        );
        assert_ne!(bad, INV);
        let inv = Inventory::from_toml_str(&bad).unwrap();
        let n1 = Scope::Network("aaaaaaaa-0000-4000-8000-000000000001".into());
        let rej = RejectedPorts::default();
        assert_eq!(
            resolve(&inv, &n1, &ip("10.0.0.5"), &rej),
            Resolution::NotFound
        );
        assert!(rej
            .0
            .borrow()
            .contains("aaaaaaaa-0000-4000-8000-0000000000e1"));
    }

    #[test]
    fn log_values_are_escaped_and_cut() {
        assert_eq!(loggable("a\r\nb\0\""), "a\\r\\nb\\u{0}\\\"");
        let l = loggable(&"x".repeat(300));
        assert_eq!(l.len(), REJECTED_LOG_CHARS + 3);
    }
}
