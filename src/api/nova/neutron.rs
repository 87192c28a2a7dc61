//! Security group names for the EC2 `security-groups` leaf, from Neutron,
//! as Nova's `security_group_api.get_instance_security_groups` gets them:
//! the instance's ports (`device_id`), then the names of their groups, in
//! port order, one entry per (port, group), a nameless group by its id.
//!
//! It runs on the API loop with the agent's Neutron client (pooled
//! connections, Keystone token), and only for EC2 paths: the OpenStack tree
//! does not show security groups, so cloud-init's OpenStack reader costs
//! Neutron nothing. Each loop keeps the answer for
//! `metadata_cache_expiration`, as Nova keeps the whole metadata object.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::agent::config::NeutronConfig;
use crate::agent::metrics::{Call, LoopMetrics};
use crate::agent::neutron::NeutronClient;

/// Cached instances per loop at most (then the expired ones are dropped,
/// and if that is not enough, all).
const MAX_CACHED: usize = 100_000;

/// Names per instance, with when they were read.
type Cache = HashMap<String, (Instant, Rc<Vec<String>>)>;

/// One loop's security-group reader.
pub struct SecurityGroups {
    client: NeutronClient,
    expiration: Duration,
    cache: RefCell<Cache>,
}

impl std::fmt::Debug for SecurityGroups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecurityGroups").finish_non_exhaustive()
    }
}

/// Percent-encode a query value (unreserved characters stay).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `GET /v2.0/ports` for one instance.
pub fn ports_path(uuid: &str) -> String {
    format!(
        "/v2.0/ports?device_id={}&fields=id&fields=security_groups",
        encode(uuid)
    )
}

/// `GET /v2.0/security-groups` for these ids.
pub fn groups_path(ids: &[String]) -> String {
    let mut p = String::from("/v2.0/security-groups?fields=id&fields=name");
    for id in ids {
        p.push_str("&id=");
        p.push_str(&encode(id));
    }
    p
}

/// The group ids of every port, in port order (duplicates kept).
///
/// # Errors
/// The body is not Neutron's `{"ports": [...]}`.
pub fn parse_port_groups(body: &[u8]) -> Result<Vec<String>, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("ports: not JSON: {e}"))?;
    let ports = v
        .get("ports")
        .and_then(Value::as_array)
        .ok_or("ports: no \"ports\" list")?;
    let mut ids = Vec::new();
    for p in ports {
        if let Some(groups) = p.get("security_groups").and_then(Value::as_array) {
            ids.extend(groups.iter().filter_map(Value::as_str).map(str::to_owned));
        }
    }
    Ok(ids)
}

/// Names for `ids` from a `{"security_groups": [...]}` body, in `ids`'
/// order; a group Neutron did not return is left out (Nova: one the user
/// cannot see), a nameless one shows its id.
///
/// # Errors
/// The body is not Neutron's `{"security_groups": [...]}`.
pub fn parse_group_names(ids: &[String], body: &[u8]) -> Result<Vec<String>, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("security-groups: not JSON: {e}"))?;
    let groups = v
        .get("security_groups")
        .and_then(Value::as_array)
        .ok_or("security-groups: no \"security_groups\" list")?;
    let mut names: HashMap<&str, &str> = HashMap::new();
    for g in groups {
        if let Some(id) = g.get("id").and_then(Value::as_str) {
            let name = g
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .unwrap_or(id);
            names.insert(id, name);
        }
    }
    Ok(ids
        .iter()
        .filter_map(|id| names.get(id.as_str()).map(|n| (*n).to_owned()))
        .collect())
}

impl SecurityGroups {
    /// A reader for one loop.
    pub fn new(cfg: &NeutronConfig, expiration: Duration) -> SecurityGroups {
        SecurityGroups {
            client: NeutronClient::new(cfg, Arc::new(LoopMetrics::default())),
            expiration,
            cache: RefCell::default(),
        }
    }

    /// The names for instance `uuid`.
    ///
    /// # Errors
    /// Neutron failed or answered something else than ports / groups.
    pub async fn names(&self, uuid: &str) -> Result<Rc<Vec<String>>, String> {
        if let Some((at, v)) = self.cache.borrow().get(uuid) {
            if at.elapsed() < self.expiration {
                return Ok(v.clone());
            }
        }
        let body = self
            .client
            .get(&ports_path(uuid), Call::Ports)
            .await
            .map_err(|e| e.to_string())?;
        let ids = parse_port_groups(&body)?;
        let names = if ids.is_empty() {
            Vec::new()
        } else {
            let mut unique = ids.clone();
            unique.sort_unstable();
            unique.dedup();
            let body = self
                .client
                .get(&groups_path(&unique), Call::Ports)
                .await
                .map_err(|e| e.to_string())?;
            parse_group_names(&ids, &body)?
        };
        let names = Rc::new(names);
        if !self.expiration.is_zero() {
            let mut c = self.cache.borrow_mut();
            if c.len() >= MAX_CACHED {
                let exp = self.expiration;
                c.retain(|_, (at, _)| at.elapsed() < exp);
                if c.len() >= MAX_CACHED {
                    c.clear();
                }
            }
            c.insert(uuid.to_owned(), (Instant::now(), names.clone()));
        }
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_ports_and_fall_back_to_the_id() {
        let ports = br#"{"ports": [{"id": "p1", "security_groups": ["sg-b", "sg-a"]},
                                   {"id": "p2", "security_groups": ["sg-a", "sg-hidden"]}]}"#;
        let ids = parse_port_groups(ports).unwrap();
        assert_eq!(ids, ["sg-b", "sg-a", "sg-a", "sg-hidden"]);
        let groups = br#"{"security_groups": [{"id": "sg-a", "name": "default"},
                                              {"id": "sg-b", "name": ""}]}"#;
        assert_eq!(
            parse_group_names(&ids, groups).unwrap(),
            ["sg-b", "default", "default"]
        );
    }

    #[test]
    fn garbage_from_neutron_is_an_error() {
        assert!(parse_port_groups(b"<html>").is_err());
        assert!(parse_port_groups(br#"{"port": []}"#).is_err());
        assert!(parse_group_names(&[], br#"{"security_groups": 1}"#).is_err());
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(
            ports_path("a b&c"),
            "/v2.0/ports?device_id=a%20b%26c&fields=id&fields=security_groups"
        );
        assert_eq!(
            groups_path(&["x".into(), "y".into()]),
            "/v2.0/security-groups?fields=id&fields=name&id=x&id=y"
        );
    }
}
