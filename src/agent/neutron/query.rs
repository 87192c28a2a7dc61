//! Neutron REST v2.0 queries for resolving a guest: built and parsed, no IO.
//!
//! The Python agent asks `plugin.get_ports(filters=…)` over RPC; we send the
//! same filters as `GET /v2.0/ports` query strings, which reach the same
//! `_get_ports_query` on the server (verified against neutron 29.0.0, see
//! `peers/README.md` §A). Two server behaviours shape this module:
//!
//! * Repeated values of one key are OR-ed and different keys are AND-ed, so
//!   one query can look up many IPs *or* many MACs on a set of networks, but
//!   IPs and MACs cannot share a query. Hence one builder per key kind.
//! * A query with no `network_id` or no `fixed_ips` filter silently matches
//!   far more than intended (overlapping tenant networks, or every port on the
//!   network). The builders therefore return `None` for an empty network or
//!   key list instead of a query that would over-match: the answer to "which
//!   port has one of these zero addresses" is known without asking.
//!
//! Values are percent-encoded (everything but RFC 3986 unreserved bytes), so
//! `fixed_ips=ip_address%3D10.0.0.5` and `mac_address=fa%3A16%3A…`; Neutron
//! decodes both forms identically. Results are matched back to keys by
//! [`match_key`] because a batched answer mixes ports of many keys and has no
//! defined order.

use std::net::IpAddr;

use serde::Deserialize;

use crate::agent::identity::LookupKey;

/// `device_owner` values of a router's interfaces: legacy, HA and DVR.
pub const ROUTER_INTERFACE_OWNERS: &[&str] = &[
    "network:router_interface",
    "network:ha_router_replicated_interface",
    "network:router_interface_distributed",
];
/// Prefix of `device_owner` for Nova instances (`compute:<availability zone>`).
pub const COMPUTE_OWNER_PREFIX: &str = "compute:";
/// Fields requested for port lookups: enough to map each port back to a
/// (network, IP or MAC) key and to answer (instance, project), and the
/// port's `id` to name a port whose ids are refused in the log.
pub const PORT_FIELDS: &[&str] = &[
    "device_id",
    "tenant_id",
    "project_id",
    "fixed_ips",
    "network_id",
    "mac_address",
    "device_owner",
    "id",
];
/// Largest request line gunicorn accepts by default (`limit_request_line`);
/// a batched query longer than this gets a 400 from a stock neutron-server.
/// About 110 IPv4 lookups fit; callers size batches with [`query_fits`].
pub const MAX_REQUEST_LINE_BYTES: usize = 4094;

/// Query for the networks a router has interfaces on.
///
/// `/v2.0/ports?device_id=<r>&device_owner=…(×3)&fields=network_id`
pub fn router_networks_path(router_id: &str) -> String {
    let mut q = Query::new();
    q.pair("device_id", router_id);
    for owner in ROUTER_INTERFACE_OWNERS {
        q.pair("device_owner", owner);
    }
    q.pair("fields", "network_id");
    q.finish()
}

/// One query for several IPs on the given networks (ports matching any IP on
/// any of the networks). `None` if `networks` or `ips` is empty: nothing can
/// match, and the unfiltered query would over-match.
pub fn ports_by_ips_path(networks: &[&str], ips: &[IpAddr]) -> Option<String> {
    if networks.is_empty() || ips.is_empty() {
        return None;
    }
    let mut q = Query::new();
    for n in networks {
        q.pair("network_id", n);
    }
    for ip in ips {
        q.pair("fixed_ips", &format!("ip_address={ip}"));
    }
    q.fields();
    Some(q.finish())
}

/// One query for several MACs on the given networks. `None` if `networks` or
/// `macs` is empty (see [`ports_by_ips_path`]).
pub fn ports_by_macs_path(networks: &[&str], macs: &[[u8; 6]]) -> Option<String> {
    if networks.is_empty() || macs.is_empty() {
        return None;
    }
    let mut q = Query::new();
    for n in networks {
        q.pair("network_id", n);
    }
    for mac in macs {
        q.pair("mac_address", &format_mac(mac));
    }
    q.fields();
    Some(q.finish())
}

/// All ports of a network, for prefetching a network's instances.
///
/// `/v2.0/ports?network_id=<n>&fields=…`. Neutron filters `device_owner` by
/// exact match only and instance ports are `compute:<az>` with an AZ we do
/// not know, so we do not filter on the server: fetch every port and keep
/// those for which [`is_compute_owner`] holds. Non-instance ports (router,
/// DHCP) are few per network, so the extra bytes are cheap; filtering by
/// `compute:nova` would silently miss every instance outside the default AZ.
pub fn network_ports_path(network: &str) -> String {
    let mut q = Query::new();
    q.pair("network_id", network);
    q.fields();
    q.finish()
}

/// All ports of a set of networks (OR-ed), at most `limit` of them: the
/// prefetch query. Same reasoning as [`network_ports_path`] for the missing
/// `device_owner` filter; `limit` (Neutron's pagination, always on since
/// Queens) bounds what one answer can cost, and the caller asks for one more
/// port than it will keep to learn that the set was too big. `None` for no
/// networks (the query would list every port of the cloud).
pub fn networks_ports_path(networks: &[&str], limit: usize) -> Option<String> {
    if networks.is_empty() {
        return None;
    }
    let mut q = Query::new();
    for n in networks {
        q.pair("network_id", n);
    }
    q.fields();
    q.pair("limit", &limit.to_string());
    Some(q.finish())
}

/// Whether a `device_owner` denotes a Nova instance port.
pub fn is_compute_owner(device_owner: &str) -> bool {
    device_owner.starts_with(COMPUTE_OWNER_PREFIX)
}

/// Whether `path` fits a default neutron-server request line
/// (`GET <path> HTTP/1.1`).
pub fn query_fits(path: &str) -> bool {
    "GET ".len() + path.len() + " HTTP/1.1".len() <= MAX_REQUEST_LINE_BYTES
}

/// `fa:16:3e:12:34:56`: the lowercase form Neutron stores and filters on.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

pub use crate::inventory::net::parse_mac;

/// One port from a `GET /v2.0/ports` answer. Missing fields are empty;
/// `project_id` falls back to `tenant_id`; unparsable fixed IPs are dropped.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(from = "RawPort")]
pub struct PortInfo {
    /// The port's own id (for logs).
    pub id: String,
    /// Instance (or router, DHCP agent…) owning the port.
    pub device_id: String,
    /// Owning project (`tenant_id` on older servers).
    pub project_id: String,
    /// Network the port is on.
    pub network_id: String,
    /// MAC as Neutron stores it.
    pub mac_address: String,
    /// Fixed IPs of the port.
    pub fixed_ips: Vec<IpAddr>,
    /// `compute:<az>`, `network:dhcp`, `network:router_interface`, …
    pub device_owner: String,
}

impl PortInfo {
    /// The port's MAC, if Neutron returned a well-formed one.
    pub fn mac(&self) -> Option<[u8; 6]> {
        parse_mac(&self.mac_address)
    }
}

#[derive(Deserialize)]
struct RawPort {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    device_id: Option<String>,
    #[serde(default)]
    project_id: Option<String>,
    #[serde(default)]
    tenant_id: Option<String>,
    #[serde(default)]
    network_id: Option<String>,
    #[serde(default)]
    mac_address: Option<String>,
    #[serde(default)]
    fixed_ips: Option<Vec<RawFixedIp>>,
    #[serde(default)]
    device_owner: Option<String>,
}

#[derive(Deserialize)]
struct RawFixedIp {
    #[serde(default)]
    ip_address: Option<String>,
}

impl From<RawPort> for PortInfo {
    fn from(r: RawPort) -> Self {
        let project_id = match r.project_id {
            Some(p) if !p.is_empty() => p,
            _ => r.tenant_id.unwrap_or_default(),
        };
        PortInfo {
            id: r.id.unwrap_or_default(),
            device_id: r.device_id.unwrap_or_default(),
            project_id,
            network_id: r.network_id.unwrap_or_default(),
            mac_address: r.mac_address.unwrap_or_default(),
            fixed_ips: r
                .fixed_ips
                .unwrap_or_default()
                .into_iter()
                .filter_map(|f| f.ip_address?.parse().ok())
                .collect(),
            device_owner: r.device_owner.unwrap_or_default(),
        }
    }
}

#[derive(Deserialize)]
struct PortsBody<T> {
    ports: Vec<T>,
}

#[derive(Deserialize)]
struct NetworkOnly {
    #[serde(default)]
    network_id: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(rename = "NeutronError")]
    neutron_error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    message: String,
}

/// Why a Neutron answer could not be used.
#[derive(Debug, thiserror::Error)]
pub enum NeutronParseError {
    /// The body is not JSON of the shape `{"ports": [...]}`.
    #[error("neutron answer is not a ports list: {0}")]
    NotPortsList(#[from] serde_json::Error),
}

/// Network ids from a [`router_networks_path`] answer, sorted and
/// deduplicated (a router may have several interfaces on one network, and a
/// canonical order makes the set usable as a cache or batch key).
///
/// # Errors
///
/// [`NeutronParseError::NotPortsList`] if the body is not a ports list.
pub fn parse_router_networks(body: &[u8]) -> Result<Vec<String>, NeutronParseError> {
    let parsed: PortsBody<NetworkOnly> = serde_json::from_slice(body)?;
    let mut nets: Vec<String> = parsed
        .ports
        .into_iter()
        .filter_map(|p| p.network_id.filter(|n| !n.is_empty()))
        .collect();
    nets.sort_unstable();
    nets.dedup();
    Ok(nets)
}

/// Ports from a port query answer, in Neutron's (unspecified) order.
///
/// # Errors
///
/// [`NeutronParseError::NotPortsList`] if the body is not a ports list.
pub fn parse_ports(body: &[u8]) -> Result<Vec<PortInfo>, NeutronParseError> {
    let parsed: PortsBody<PortInfo> = serde_json::from_slice(body)?;
    Ok(parsed.ports)
}

/// The `message` of a `{"NeutronError": {...}}` body, for logs.
pub fn parse_neutron_error(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<ErrorBody>(body)
        .ok()
        .map(|e| e.neutron_error.message)
}

/// Outcome of matching one key against a (batched) port list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortMatch<'p> {
    /// Exactly one port: its `device_id` / `project_id` answer the lookup.
    Found(&'p PortInfo),
    /// No port on these networks has this IP or MAC.
    NotFound,
    /// Several ports match; Neutron's agent answers 404 for this too.
    Ambiguous(usize),
}

/// Find the port for `key` among `ports`, counting only ports on `networks`.
///
/// Like Neutron's agent, this does not filter on `device_owner`: a router or
/// DHCP port's own address resolves to that device, and Nova then 404s it.
pub fn match_key<'p>(ports: &'p [PortInfo], networks: &[&str], key: &LookupKey) -> PortMatch<'p> {
    let mut found = None;
    let mut count = 0usize;
    for p in ports {
        if !networks.contains(&p.network_id.as_str()) {
            continue;
        }
        let hit = match key {
            LookupKey::Ip(ip) => p.fixed_ips.contains(ip),
            LookupKey::Mac(mac) => p.mac() == Some(*mac),
        };
        if hit {
            count += 1;
            found = Some(p);
        }
    }
    match (count, found) {
        (1, Some(p)) => PortMatch::Found(p),
        (0, _) => PortMatch::NotFound,
        (n, _) => PortMatch::Ambiguous(n),
    }
}

/// Builder for `/v2.0/ports?k=v&k=v…` with percent-encoded values.
struct Query {
    path: String,
    has_query: bool,
}

impl Query {
    fn new() -> Self {
        Query {
            path: String::from("/v2.0/ports"),
            has_query: false,
        }
    }

    fn pair(&mut self, key: &str, value: &str) {
        self.path.push(if self.has_query { '&' } else { '?' });
        self.has_query = true;
        percent_encode_into(&mut self.path, key);
        self.path.push('=');
        percent_encode_into(&mut self.path, value);
    }

    fn fields(&mut self) {
        for f in PORT_FIELDS {
            self.pair("fields", f);
        }
    }

    fn finish(self) -> String {
        self.path
    }
}

/// Append `s` with every byte outside RFC 3986 "unreserved" as `%XX`.
fn percent_encode_into(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Raw bodies recorded from neutron 29.0.0 (peers/results/neutron_probe.json).
    const ROUTER_NETWORKS_R1: &str = r#"{"ports":[{"network_id":"001e74c4-b10d-4000-817f-4768b0f28f79"},{"network_id":"3636b40f-3e32-48da-8a7d-266006b19663"},{"network_id":"3f680bde-d13e-465f-896f-0727d0e25f14"}]}"#;
    const ROUTER_NETWORKS_HA: &str = r#"{"ports":[{"network_id":"4688182e-8aa6-4fcb-8e31-0ed695465095","device_owner":"network:ha_router_replicated_interface"}]}"#;
    const EMPTY: &str = r#"{"ports":[]}"#;
    const IP_LOOKUP_VM1: &str = r#"{"ports":[{"project_id":"6e1f3b0c9d6a4f0e8b7a2c1d0e9f8a7b","device_id":"00000001-0000-4000-8000-000000000001","tenant_id":"6e1f3b0c9d6a4f0e8b7a2c1d0e9f8a7b"}]}"#;
    const BATCHED_ACROSS_NETS: &str = r#"{"ports":[{"network_id":"001e74c4-b10d-4000-817f-4768b0f28f79","project_id":"6e1f3b0c9d6a4f0e8b7a2c1d0e9f8a7b","device_id":"00000004-0000-4000-8000-000000000004","fixed_ips":[{"subnet_id":"6c0d2040-93cd-4353-90ca-055da0c41daa","ip_address":"10.20.0.11"}],"tenant_id":"6e1f3b0c9d6a4f0e8b7a2c1d0e9f8a7b"},{"network_id":"3636b40f-3e32-48da-8a7d-266006b19663","project_id":"6e1f3b0c9d6a4f0e8b7a2c1d0e9f8a7b","device_id":"00000001-0000-4000-8000-000000000001","fixed_ips":[{"subnet_id":"01f852e5-11e6-44b1-8094-631c35e1c0b9","ip_address":"10.10.0.11"},{"subnet_id":"8ba011ef-3840-435d-98f3-8df7bb82f002","ip_address":"fd00:10::f816:3eff:feb1:b236"}],"tenant_id":"6e1f3b0c9d6a4f0e8b7a2c1d0e9f8a7b"},{"network_id":"81856d96-d47f-4782-8a78-0379124f58eb","project_id":"0b1c2d3e4f5a4b6c8d7e9f0a1b2c3d4e","device_id":"00000003-0000-4000-8000-000000000003","fixed_ips":[{"subnet_id":"090f8344-b419-47ca-b75f-d92443d351c5","ip_address":"10.10.0.11"}],"tenant_id":"0b1c2d3e4f5a4b6c8d7e9f0a1b2c3d4e"}]}"#;
    const NO_FIELDS: &str = r#"{"ports":[{"id":"29dc867d-0fbe-4163-bd65-7e3546f06813","name":"vm1-port","network_id":"3636b40f-3e32-48da-8a7d-266006b19663","project_id":"6e1f3b0c9d6a4f0e8b7a2c1d0e9f8a7b","mac_address":"fa:16:3e:b1:b2:36","admin_state_up":true,"status":"DOWN","device_id":"00000001-0000-4000-8000-000000000001","device_owner":"compute:nova","fixed_ips":[{"subnet_id":"01f852e5-11e6-44b1-8094-631c35e1c0b9","ip_address":"10.10.0.11"},{"subnet_id":"8ba011ef-3840-435d-98f3-8df7bb82f002","ip_address":"fd00:10::f816:3eff:feb1:b236"}],"allowed_address_pairs":[],"extra_dhcp_opts":[],"security_groups":["bc850b1f-5c81-4670-a77d-a5e9964fa61b"],"description":"","binding:vnic_type":"normal","binding:profile":{},"binding:host_id":"","binding:vif_type":"unbound","binding:vif_details":{},"port_security_enabled":true,"tags":[],"created_at":"2026-11-24T08:38:17Z","updated_at":"2026-11-24T08:38:17Z","revision_number":1,"tenant_id":"6e1f3b0c9d6a4f0e8b7a2c1d0e9f8a7b"}]}"#;
    const UNKNOWN_PARAM_400: &str = r#"{"NeutronError": {"type": "HTTPBadRequest", "message": "['bogus'] is invalid attribute for filtering", "detail": ""}}"#;

    const NET1: &str = "3636b40f-3e32-48da-8a7d-266006b19663";
    const NET2: &str = "81856d96-d47f-4782-8a78-0379124f58eb";
    const NET3: &str = "001e74c4-b10d-4000-817f-4768b0f28f79";
    const PROJECT_A: &str = "6e1f3b0c9d6a4f0e8b7a2c1d0e9f8a7b";

    /// Percent-decode, for comparing with recorded paths that left `:` bare.
    fn decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn router_networks_path_matches_recorded_query() {
        let r1 = "6ef9cfc2-8af2-49a4-a9d3-d7e344c927f8";
        let recorded = "/v2.0/ports?device_id=6ef9cfc2-8af2-49a4-a9d3-d7e344c927f8&device_owner=network:router_interface&device_owner=network:ha_router_replicated_interface&device_owner=network:router_interface_distributed&fields=network_id";
        let path = router_networks_path(r1);
        assert!(path.contains("device_owner=network%3Arouter_interface&"));
        assert_eq!(decode(&path), recorded);
    }

    #[test]
    fn ports_by_ips_path_shape() {
        let path = ports_by_ips_path(&[NET1, NET3], &[ip("10.10.0.11"), ip("10.20.0.11")]).unwrap();
        assert_eq!(
            path,
            format!(
                "/v2.0/ports?network_id={NET1}&network_id={NET3}\
                 &fixed_ips=ip_address%3D10.10.0.11&fixed_ips=ip_address%3D10.20.0.11\
                 &fields=device_id&fields=tenant_id&fields=project_id&fields=fixed_ips\
                 &fields=network_id&fields=mac_address&fields=device_owner&fields=id"
            )
        );
        let v6 = ports_by_ips_path(&[NET1], &[ip("fd00:10::f816:3eff:feb1:b236")]).unwrap();
        assert!(v6.contains("&fixed_ips=ip_address%3Dfd00%3A10%3A%3Af816%3A3eff%3Afeb1%3Ab236&"));
    }

    #[test]
    fn ports_by_macs_path_matches_recorded_encoding() {
        let path = ports_by_macs_path(&[NET1], &[[0xfa, 0x16, 0x3e, 0xb1, 0xb2, 0x36]]).unwrap();
        assert!(path.starts_with(&format!(
            "/v2.0/ports?network_id={NET1}&mac_address=fa%3A16%3A3e%3Ab1%3Ab2%3A36&fields=device_id&"
        )));
    }

    #[test]
    fn empty_filters_build_no_query() {
        assert_eq!(ports_by_ips_path(&[], &[ip("10.0.0.1")]), None);
        assert_eq!(ports_by_ips_path(&[NET1], &[]), None);
        assert_eq!(ports_by_macs_path(&[], &[[0; 6]]), None);
        assert_eq!(ports_by_macs_path(&[NET1], &[]), None);
    }

    #[test]
    fn network_ports_path_has_no_owner_filter() {
        let path = network_ports_path(NET1);
        assert!(path.starts_with(&format!("/v2.0/ports?network_id={NET1}&fields=device_id&")));
        assert!(!path.contains("device_owner="));
        assert!(path.ends_with("&fields=device_owner&fields=id"));
        assert!(is_compute_owner("compute:nova"));
        assert!(is_compute_owner("compute:az-2"));
        assert!(!is_compute_owner("network:dhcp"));
    }

    #[test]
    fn networks_ports_path_is_bounded() {
        let path = networks_ports_path(&[NET1, NET2], 5001).unwrap();
        assert!(path.starts_with(&format!(
            "/v2.0/ports?network_id={NET1}&network_id={NET2}&fields=device_id&"
        )));
        assert!(path.ends_with("&fields=device_owner&fields=id&limit=5001"));
        assert_eq!(networks_ports_path(&[], 1), None);
    }

    #[test]
    fn values_are_percent_encoded() {
        let path = router_networks_path("a&b=c d");
        assert!(path.starts_with("/v2.0/ports?device_id=a%26b%3Dc%20d&"));
    }

    #[test]
    fn query_length_limit() {
        let ips: Vec<IpAddr> = (0..100u8).map(|i| ip(&format!("10.10.0.{i}"))).collect();
        let path = ports_by_ips_path(&[NET1], &ips).unwrap();
        assert!(query_fits(&path), "100 IPv4s fit: {} bytes", path.len());
        let ips: Vec<IpAddr> = (0..=255u8).map(|i| ip(&format!("10.10.0.{i}"))).collect();
        assert!(!query_fits(&ports_by_ips_path(&[NET1], &ips).unwrap()));
    }

    #[test]
    fn parse_recorded_router_networks() {
        let nets = parse_router_networks(ROUTER_NETWORKS_R1.as_bytes()).unwrap();
        assert_eq!(nets, [NET3, NET1, "3f680bde-d13e-465f-896f-0727d0e25f14"]);
        let ha = parse_router_networks(ROUTER_NETWORKS_HA.as_bytes()).unwrap();
        assert_eq!(ha, ["4688182e-8aa6-4fcb-8e31-0ed695465095"]);
        assert!(parse_router_networks(EMPTY.as_bytes()).unwrap().is_empty());
        let dup = format!(
            r#"{{"ports":[{{"network_id":"{NET2}"}},{{"network_id":"{NET1}"}},{{"network_id":"{NET2}"}},{{}}]}}"#
        );
        assert_eq!(parse_router_networks(dup.as_bytes()).unwrap(), [NET1, NET2]);
    }

    #[test]
    fn parse_recorded_ports() {
        let ports = parse_ports(BATCHED_ACROSS_NETS.as_bytes()).unwrap();
        assert_eq!(ports.len(), 3);
        assert_eq!(ports[1].device_id, "00000001-0000-4000-8000-000000000001");
        assert_eq!(ports[1].project_id, PROJECT_A);
        assert_eq!(ports[1].network_id, NET1);
        assert_eq!(
            ports[1].fixed_ips,
            [ip("10.10.0.11"), ip("fd00:10::f816:3eff:feb1:b236")]
        );
        assert_eq!(ports[1].mac_address, "", "not requested in that query");

        let full = parse_ports(NO_FIELDS.as_bytes()).unwrap();
        assert_eq!(full[0].device_owner, "compute:nova");
        assert_eq!(full[0].mac(), Some([0xfa, 0x16, 0x3e, 0xb1, 0xb2, 0x36]));

        let minimal = parse_ports(IP_LOOKUP_VM1.as_bytes()).unwrap();
        assert_eq!(minimal[0].project_id, PROJECT_A);
        assert!(minimal[0].fixed_ips.is_empty());
        assert!(parse_ports(EMPTY.as_bytes()).unwrap().is_empty());
    }

    #[test]
    fn project_falls_back_to_tenant() {
        let body = br#"{"ports":[{"device_id":"d","tenant_id":"t"},{"device_id":"e","project_id":"p","tenant_id":"t"}]}"#;
        let ports = parse_ports(body).unwrap();
        assert_eq!(ports[0].project_id, "t");
        assert_eq!(ports[1].project_id, "p");
    }

    #[test]
    fn tolerant_of_odd_fixed_ips_and_nulls() {
        let body = br#"{"ports":[{"device_id":null,"fixed_ips":[{"subnet_id":"s"},{"ip_address":"bogus"},{"ip_address":"10.0.0.1"}]}]}"#;
        let ports = parse_ports(body).unwrap();
        assert_eq!(ports[0].device_id, "");
        assert_eq!(ports[0].fixed_ips, [ip("10.0.0.1")]);
    }

    #[test]
    fn error_bodies_are_not_port_lists() {
        assert!(matches!(
            parse_ports(UNKNOWN_PARAM_400.as_bytes()),
            Err(NeutronParseError::NotPortsList(_))
        ));
        assert!(parse_router_networks(b"<html>").is_err());
        assert_eq!(
            parse_neutron_error(UNKNOWN_PARAM_400.as_bytes()).as_deref(),
            Some("['bogus'] is invalid attribute for filtering")
        );
        assert_eq!(parse_neutron_error(EMPTY.as_bytes()), None);
    }

    #[test]
    fn match_keys_in_a_batched_answer() {
        let ports = parse_ports(BATCHED_ACROSS_NETS.as_bytes()).unwrap();
        let key = LookupKey::Ip(ip("10.10.0.11"));
        // Overlapping 10.10.0.11 on net1 and net2: the network set decides.
        match match_key(&ports, &[NET1, NET3], &key) {
            PortMatch::Found(p) => assert_eq!(p.device_id, "00000001-0000-4000-8000-000000000001"),
            other => panic!("{other:?}"),
        }
        match match_key(&ports, &[NET2], &key) {
            PortMatch::Found(p) => assert_eq!(p.device_id, "00000003-0000-4000-8000-000000000003"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            match_key(&ports, &[NET1, NET2], &key),
            PortMatch::Ambiguous(2)
        );
        assert_eq!(
            match_key(&ports, &[NET1], &LookupKey::Ip(ip("10.10.0.99"))),
            PortMatch::NotFound
        );
        let full = parse_ports(NO_FIELDS.as_bytes()).unwrap();
        let mac = LookupKey::Mac([0xfa, 0x16, 0x3e, 0xb1, 0xb2, 0x36]);
        assert!(matches!(
            match_key(&full, &[NET1], &mac),
            PortMatch::Found(_)
        ));
        assert_eq!(match_key(&full, &[NET2], &mac), PortMatch::NotFound);
    }

    #[test]
    fn mac_round_trip() {
        let mac = [0xfa, 0x16, 0x3e, 0x0a, 0xb2, 0x36];
        assert_eq!(format_mac(&mac), "fa:16:3e:0a:b2:36");
        assert_eq!(parse_mac("FA:16:3E:0A:B2:36"), Some(mac));
        assert_eq!(parse_mac("fa:16:3e:0a:b2"), None);
        assert_eq!(parse_mac("fa:16:3e:0a:b2:36:00"), None);
        assert_eq!(parse_mac("fa:16:3e:0a:b2:3"), None);
        assert_eq!(parse_mac("fa:16:3e:0a:b2:+3"), None);
    }
}
