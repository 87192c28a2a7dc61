//! Who the guest is, whichever backend says so: the validated ids a
//! [`Resolved`] carries, and the [`Resolver`] a loop asks.
//!
//! The two backends are [`crate::agent::inventory`] (a file, reloaded in
//! place) and [`crate::agent::neutron`] (Neutron's REST API, cached, batched).
//! A loop has exactly one, so the [`Resolver`] is an enum, not a pair of
//! options with an impossible "neither" case.
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

use std::rc::Rc;

use crate::agent::identity::Identity;
pub use crate::agent::inventory::InventoryResolver;
use crate::agent::neutron::{BackendError, NeutronResolver};
use crate::http::HeaderValue;
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
    /// Whether `port_id` was reported.
    #[cfg(test)]
    pub(crate) fn reported(&self, port_id: &str) -> bool {
        self.0.borrow().contains(port_id)
    }

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

/// This loop's resolver: the configured backend, with the cache it owns.
// One per loop: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Resolver {
    /// `backend = "inventory"`.
    Inventory(InventoryResolver),
    /// `backend = "neutron"`.
    Neutron(Rc<NeutronResolver>),
    /// `metaproxy ovn`: the Southbound replica.
    Ovn(crate::ovn::serve::OvnResolver),
}

impl Resolver {
    /// Resolve a guest. `fresh` skips (and drops) the cached answer. The bool
    /// says whether the answer came from the cache.
    ///
    /// # Errors
    /// Neutron (or Keystone) failed; the inventory cannot fail.
    pub async fn lookup(
        &self,
        id: &Identity,
        fresh: bool,
    ) -> Result<(Option<Rc<Resolved>>, bool), BackendError> {
        match self {
            Resolver::Inventory(inv) => Ok(inv.lookup(id, fresh)),
            Resolver::Neutron(n) => n.lookup(&id.scope, &id.key, fresh).await,
            Resolver::Ovn(o) => o.lookup(id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn log_values_are_escaped_and_cut() {
        assert_eq!(loggable("a\r\nb\0\""), "a\\r\\nb\\u{0}\\\"");
        let l = loggable(&"x".repeat(300));
        assert_eq!(l.len(), REJECTED_LOG_CHARS + 3);
    }
}
