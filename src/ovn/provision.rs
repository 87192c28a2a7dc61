//! Provisioning the `ovnmeta-<network>` namespaces of a compute node, as
//! Neutron's OVN metadata agent does it (`neutron/agent/ovn/metadata/agent.py`:
//! `sync`, `provision_datapath`, `teardown_datapath`, `_get_provision_params`,
//! `_process_cidrs`).
//!
//! Two steps, so the decision can be tested without root and replayed:
//! - [`desired`] reads a [`Replica`] snapshot and computes what should exist
//!   ([`Desired`]): one [`NetworkPlan`] per network with a local VIF port
//!   (`Port_Binding.type` `""`, `external` or `localport`, bound here through
//!   `chassis` or, during a live migration, `additional_chassis`, as
//!   Neutron's `get_ports_on_chassis(..., include_additional_chassis=True)`).
//!   The network's metadata port is its `localport` with
//!   `external_ids:neutron:device_owner=network:distributed`
//!   (`get_metadata_port`); its first `mac` entry gives the MAC of the
//!   namespace end, `neutron:mtu` the MTU of both ends (0 or absent: left
//!   alone, as Neutron does), `neutron:cidrs` the candidate addresses.
//!   The addresses are `169.254.169.254/32` plus each `neutron:cidrs` entry
//!   whose subnet holds an IPv4 address of a local VIF
//!   (`_active_subnets_cidrs`: only IPv4 VIF addresses are matched, so an
//!   IPv6 subnet's CIDR is never assigned, in Neutron either). If any local
//!   VIF has an IPv6 address, also `fe80::a9fe:a9fe/128` and the EUI-64
//!   link-local `/64` of the metadata MAC (`get_ipv6_lladdr`). A network
//!   whose metadata port is missing or has no valid MAC, or whose local VIFs
//!   have no address, is not in the plan, so it is torn down, as Neutron does.
//! - [`Provisioner::reconcile`] makes the host match: the namespace (with
//!   `lo` up, `ensure_namespace`), the veth pair `tap<net[:10]>0` (root end)
//!   / `tap<net[:10]>1` (namespace end, `_get_veth_name`), MAC, MTU, both
//!   ends up, addresses added and stale ones removed, and the root end as an
//!   OVS `Port` + `Interface` with `external_ids:iface-id=<metadata
//!   logical_port>` on the OVN bridge, removed from any other bridge. Every
//!   managed namespace (`ovnmeta-<uuid>`) whose network is not in the plan
//!   is torn down: OVS port, root veth, then the namespace if nothing else
//!   is left in it (`garbage_collect_namespace`).
//!
//! Reconcile is one function for start, change and restart: whatever the old
//! agent or a crash left is read back and adopted (a namespace, a paired
//! veth, an OVS port are kept and fixed up) or removed (an unpaired veth end
//! is deleted and the pair recreated, as `provision_datapath` does; a port on
//! another bridge is moved; a port whose `iface-id` is a metadata port but
//! that is not wanted is removed). Names are the keys, so nothing is ever
//! duplicated; OVSDB's name indexes on `Port` and `Interface` enforce it
//! for the OVS side too. Applying the same [`Desired`] twice changes
//! nothing: every step compares first, and [`Report`] lists what changed.
//!
//! Differences from Neutron, on purpose:
//! - On an IPv4-only network the kernel's own link-local address of the
//!   namespace end (the same EUI-64 `/64` it would get on an IPv6 network)
//!   is left alone. Neutron deletes it on its next `sync`; the kernel adds
//!   it again at every link up, and deleting it right after creation races
//!   with the kernel, which would make a second reconcile not a no-op.
//! - A `fe80::a9fe:a9fe` whose DAD failed is left in place and reported
//!   ([`V6State::DadFailed`]); Neutron deletes it when its haproxy starts
//!   and re-adds it at the next `sync`, which just fails DAD again.
//! - Bad values from OVSDB skip the one item with a problem line
//!   ([`Desired::problems`], logged once by [`Provisioner::reconcile`]): a
//!   bad `neutron:mtu` leaves the MTU alone, a bad `neutron:cidrs` entry
//!   is not assigned, a network id that is not a UUID or a bad MAC skips the
//!   network. Neutron raises on some of these and skips that network's sync.
//! - `_ensure_datapath_checksum` (an iptables `CHECKSUM --checksum-fill`
//!   rule when the bridge's `datapath_type` is `netdev`, i.e. DPDK) is not
//!   done; [`Provisioner::reconcile`] logs a warning on such a bridge.
//!
//! DAD. Neutron adds the addresses without `nodad` and, before its haproxy
//! binds `fe80::a9fe:a9fe`, waits up to 30 s for the address to leave the
//! `tentative` state (`driver_base.py`, `wait_until_address_ready`); if DAD
//! fails it serves IPv4 only. We add them the same way (with `nodad` a
//! duplicate would go unnoticed) and report each namespace's
//! [`V6State`]; [`Provisioner::wait_v6`] is that wait, for the server to
//! call before binding the IPv6 listener.
//!
//! Netlink work goes through iproute2's `ip` (`-j` JSON to read, checked exit
//! status with its stderr in the error to write), not a netlink crate.
//! Provisioning is rare and off the request path (a few `ip` runs per
//! network and reconcile); `ip netns add` makes the `/run/netns` bind mount
//! exactly as Neutron's pyroute2 and `ip netns` do, which the proxy's
//! discovery watches; and iproute2 is on every Neutron node and in CI.
//! Rejected: `rtnetlink` (async on tokio, and the namespace creation,
//! veth-peer-in-netns and address flags would each be our code on top of
//! `netlink-packet-route`, where `ip` is tested by everyone). The OVS side
//! uses our own OVSDB client's `transact` ([`crate::ovn::ovsdb`]), one
//! transaction per reconcile, guarded by a `wait` on the bridge's `ports`
//! so a concurrent `ovs-vsctl` cannot be overwritten.
//!
//! Everything from OVSDB is untrusted: network ids must be UUIDs before they
//! become a namespace or interface name, the logical port is bounded and
//! printable, MACs must be unicast, MTUs in 68..=65535, at most
//! [`MAX_CIDRS`] CIDRs per port are read.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use super::ovsdb::datum::{Atom, Row, Uuid};
use super::ovsdb::{Conn, ConnOptions, OvsdbError, Remote};
use super::replica::{parse_mac, Replica};
use crate::log;
use crate::proxy::config::is_uuid;

/// Neutron's `OVN_METADATA_PREFIX`.
pub const NS_PREFIX: &str = "ovnmeta-";
/// Neutron's `TAP_DEVICE_PREFIX`.
pub const TAP_PREFIX: &str = "tap";
/// The bridge when `Open_vSwitch.external_ids:ovn-bridge` is not set.
pub const DEFAULT_BRIDGE: &str = "br-int";
/// Neutron's `OVN_VIF_PORT_TYPES`.
pub const VIF_PORT_TYPES: &[&str] = &["", "external", "localport"];
/// Neutron's `METADATA_CIDR`.
pub const METADATA_V4: Cidr = Cidr {
    addr: IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
    prefix: 32,
};
/// Neutron's `METADATA_V6_CIDR`.
pub const METADATA_V6: Cidr = Cidr {
    addr: IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0xa9fe, 0xa9fe)),
    prefix: 128,
};
/// Most `neutron:cidrs` entries read from one metadata port.
pub const MAX_CIDRS: usize = 64;
/// Longest `logical_port` accepted as an `iface-id`.
pub const MAX_LOGICAL_PORT_BYTES: usize = 255;
/// Smallest MTU accepted from `neutron:mtu` (IPv4's minimum).
pub const MIN_MTU: u32 = 68;
/// Largest MTU accepted from `neutron:mtu` (a veth's maximum).
pub const MAX_MTU: u32 = 65535;
/// Neutron's wait for `fe80::a9fe:a9fe` to leave `tentative`.
pub const DAD_WAIT: Duration = Duration::from_secs(30);
/// Poll interval of [`Provisioner::wait_v6`].
const DAD_POLL: Duration = Duration::from_millis(100);
/// The Open_vSwitch database's name.
const OVS_DB: &str = "Open_vSwitch";

/// Errors of provisioning.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// `ip` could not be run at all.
    #[error("cannot run `ip {args}`: {source} (iproute2 is needed)")]
    Spawn {
        /// The arguments.
        args: String,
        /// What happened.
        source: std::io::Error,
    },
    /// `ip` failed.
    #[error("`ip {args}` failed ({status}): {stderr}")]
    Ip {
        /// The arguments.
        args: String,
        /// Its exit status.
        status: String,
        /// Its stderr, trimmed.
        stderr: String,
    },
    /// `ip -j` printed something we cannot read.
    #[error("`ip {args}` printed JSON we cannot read: {why}")]
    IpOutput {
        /// The arguments.
        args: String,
        /// Why.
        why: String,
    },
    /// The namespace directory cannot be read.
    #[error("cannot list {dir}: {source}")]
    NetnsDir {
        /// The directory.
        dir: PathBuf,
        /// What happened.
        source: std::io::Error,
    },
    /// The Open_vSwitch database.
    #[error("Open_vSwitch database: {0}")]
    Ovs(String),
    /// The host is not in a state we can fix (named in the message).
    #[error("{0}")]
    State(String),
}

impl From<OvsdbError> for ProvisionError {
    fn from(e: OvsdbError) -> Self {
        ProvisionError::Ovs(e.to_string())
    }
}

/// An address with its prefix length, as `ip addr` and `neutron:cidrs` write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    /// The address (not masked: `10.0.0.2/24` is the port's own address).
    pub addr: IpAddr,
    /// The prefix length, at most 32 or 128.
    pub prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in this address' subnet.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let m = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(a) & m == u32::from(b) & m
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let m = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(a) & m == u128::from(b) & m
            }
            _ => false,
        }
    }

    /// The EUI-64 link-local `/64` of `mac` (`netaddr.EUI(mac).ipv6_link_local()`).
    pub fn link_local(mac: [u8; 6]) -> Cidr {
        let seg = |a: u8, b: u8| (u16::from(a) << 8) | u16::from(b);
        let addr = Ipv6Addr::new(
            0xfe80,
            0,
            0,
            0,
            seg(mac[0] ^ 0x02, mac[1]),
            seg(mac[2], 0xff),
            seg(0xfe, mac[3]),
            seg(mac[4], mac[5]),
        );
        Cidr {
            addr: IpAddr::V6(addr),
            prefix: 64,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (a, p) = s.split_once('/').ok_or("no /prefix")?;
        let addr: IpAddr = a.parse().map_err(|_| "not an IP address")?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        // `u8::from_str` alone would accept a sign ("+3").
        let prefix: u8 = Some(p)
            .filter(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse().ok())
            .filter(|p| *p <= max)
            .ok_or("bad prefix length")?;
        Ok(Cidr { addr, prefix })
    }
}

/// The veth names of a network: `tap<net[:10]>0` (root end, on the bridge)
/// and `tap<net[:10]>1` (in the namespace), Neutron's `_get_veth_name`.
/// `network` must be a validated id (ASCII).
pub fn veth_names(network: &str) -> [String; 2] {
    let head = network.get(..10).unwrap_or(network);
    [
        format!("{TAP_PREFIX}{head}0"),
        format!("{TAP_PREFIX}{head}1"),
    ]
}

/// What one network's namespace should look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkPlan {
    /// The network id (the datapath's name minus `neutron-`), a UUID.
    pub network: String,
    /// Its `Datapath_Binding`.
    pub datapath: Uuid,
    /// The metadata port's `logical_port`: the root end's `iface-id`.
    pub logical_port: String,
    /// The metadata port's MAC: the namespace end's address.
    pub mac: [u8; 6],
    /// `neutron:mtu`, for both ends; `None` leaves the MTU as it is.
    pub mtu: Option<u32>,
    /// Exactly the addresses of the namespace end.
    pub addresses: BTreeSet<Cidr>,
    /// Whether a local VIF has an IPv6 address (so `fe80::a9fe:a9fe` is served).
    pub ipv6: bool,
}

/// What should exist on this chassis.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Whether this chassis' `Chassis` row is in the replica. Until it is,
    /// no port can be known to be bound here, and [`Provisioner::reconcile`]
    /// changes nothing rather than tear everything down.
    pub chassis_known: bool,
    /// By network id.
    pub networks: BTreeMap<String, NetworkPlan>,
    /// Every metadata port's `logical_port` in the replica: an OVS interface
    /// with one of these `iface-id`s that is not wanted is ours to remove.
    pub metadata_ports: BTreeSet<String>,
    /// Values that were skipped, one line each, naming the row.
    pub problems: Vec<String>,
}

fn str_col<'a>(row: &'a Row, col: &str) -> Option<&'a str> {
    row.get(col)?.atoms().first()?.as_str()
}

fn ext_id<'a>(row: &'a Row, key: &str) -> Option<&'a str> {
    row.get("external_ids")?.map_get(key)?.as_str()
}

fn has_uuid(row: &Row, col: &str, u: Uuid) -> bool {
    row.get(col)
        .is_some_and(|d| d.atoms().iter().any(|a| a.as_uuid() == Some(u)))
}

fn first_mac_entry(row: &Row) -> Option<&str> {
    row.get("mac")?.atoms().first().and_then(Atom::as_str)
}

fn fmt_mac(m: &[u8; 6]) -> String {
    crate::inventory::net::format_mac(m)
}

/// Compute the [`Desired`] state from a replica snapshot (see the module doc
/// for the rules, which are Neutron's).
pub fn desired(replica: &Replica) -> Desired {
    let mut out = Desired::default();
    let Some(me) = replica.chassis_uuid() else {
        return out;
    };
    out.chassis_known = true;
    let Some(ports) = replica.table("Port_Binding") else {
        return out;
    };
    let mut sorted: Vec<(&Uuid, &Row)> = ports.iter().collect();
    sorted.sort_by_key(|(u, _)| **u);
    let mut metadata: HashMap<Uuid, Vec<(Uuid, &Row)>> = HashMap::new();
    let mut vifs: BTreeMap<Uuid, Vec<(Uuid, &Row)>> = BTreeMap::new();
    for (u, row) in sorted {
        let kind = str_col(row, "type").unwrap_or("");
        let Some(dp) = row
            .get("datapath")
            .and_then(|d| d.atoms().first())
            .and_then(Atom::as_uuid)
        else {
            continue;
        };
        if kind == "localport" && ext_id(row, "neutron:device_owner") == Some("network:distributed")
        {
            metadata.entry(dp).or_default().push((*u, row));
            if let Some(lp) = str_col(row, "logical_port") {
                out.metadata_ports.insert(lp.to_string());
            }
        }
        if VIF_PORT_TYPES.contains(&kind)
            && (has_uuid(row, "chassis", me) || has_uuid(row, "additional_chassis", me))
        {
            vifs.entry(dp).or_default().push((*u, row));
        }
    }
    // veth root name -> network: names are cut to ten characters of the id.
    let mut veths: HashMap<String, String> = HashMap::new();
    for (dp, local) in vifs {
        let Some(plan) = plan_network(replica, dp, &local, metadata.get(&dp), &mut out.problems)
        else {
            continue;
        };
        if out.networks.contains_key(&plan.network) {
            out.problems.push(format!(
                "network {}: two datapaths carry its name; {} ignored",
                plan.network, plan.datapath
            ));
            continue;
        }
        let [v0, _] = veth_names(&plan.network);
        if let Some(other) = veths.get(&v0) {
            out.problems.push(format!(
                "network {}: its veth name {v0} is network {other}'s too (the same first ten characters); not provisioned",
                plan.network
            ));
            continue;
        }
        veths.insert(v0, plan.network.clone());
        out.networks.insert(plan.network.clone(), plan);
    }
    out
}

fn plan_network(
    replica: &Replica,
    dp: Uuid,
    local: &[(Uuid, &Row)],
    metadata: Option<&Vec<(Uuid, &Row)>>,
    problems: &mut Vec<String>,
) -> Option<NetworkPlan> {
    let Some(net) = replica.network_of(dp) else {
        problems.push(format!(
            "datapath {dp}: local ports but no external_ids:name; not provisioned"
        ));
        return None;
    };
    if !is_uuid(net) {
        problems.push(format!(
            "datapath {dp}: network name {:?} is not a UUID; not provisioned",
            net.chars().take(64).collect::<String>()
        ));
        return None;
    }
    let Some(md) = metadata.and_then(|m| m.first()) else {
        log::debug(format_args!(
            "ovn: network {net} has local ports but no metadata port (localport with neutron:device_owner=network:distributed)"
        ));
        return None;
    };
    if let Some(n) = metadata.map(Vec::len).filter(|n| *n > 1) {
        problems.push(format!(
            "network {net}: {n} metadata ports; using {} (the lowest row UUID)",
            md.0
        ));
    }
    let (md_uuid, md) = (md.0, md.1);
    let Some(lp) = str_col(md, "logical_port")
        .filter(|s| !s.is_empty() && s.len() <= MAX_LOGICAL_PORT_BYTES)
        .filter(|s| !s.chars().any(char::is_control))
    else {
        problems.push(format!(
            "network {net}: metadata port {md_uuid} has an empty, overlong or unprintable logical_port; not provisioned"
        ));
        return None;
    };
    let mac_tok = first_mac_entry(md).and_then(|e| e.split(' ').next());
    let Some(mac) = mac_tok
        .and_then(parse_mac)
        .filter(|m| m[0] & 1 == 0 && *m != [0; 6])
    else {
        problems.push(format!(
            "network {net}: metadata port {lp} has no valid unicast MAC ({:?}); not provisioned",
            mac_tok.unwrap_or("").chars().take(40).collect::<String>()
        ));
        return None;
    };
    // `_get_port_ip4_ips_and_ip6_flag` over the local VIFs of this datapath.
    let mut ip4 = Vec::new();
    let mut any_ip6 = false;
    for (u, row) in local {
        let Some(entry) = first_mac_entry(row) else {
            continue;
        };
        if entry == "unknown" {
            continue;
        }
        for tok in entry.split(' ').skip(1).filter(|t| !t.is_empty()) {
            match tok.parse::<IpAddr>() {
                Ok(IpAddr::V4(a)) => ip4.push(a),
                Ok(IpAddr::V6(_)) => any_ip6 = true,
                Err(_) => problems.push(format!(
                    "network {net}: port {u}: {:?} in its mac column is not an IP address; ignored",
                    tok.chars().take(64).collect::<String>()
                )),
            }
        }
    }
    if ip4.is_empty() && !any_ip6 {
        log::debug(format_args!(
            "ovn: network {net}: no local port has an address; not provisioned"
        ));
        return None;
    }
    let mut addresses = BTreeSet::from([METADATA_V4]);
    let cidrs = ext_id(md, "neutron:cidrs").unwrap_or("");
    for tok in cidrs.split(' ').filter(|t| !t.is_empty()).take(MAX_CIDRS) {
        match tok.parse::<Cidr>() {
            Ok(c) if ip4.iter().any(|a| c.contains(IpAddr::V4(*a))) => {
                addresses.insert(c);
            }
            Ok(_) => {}
            Err(why) => problems.push(format!(
                "network {net}: metadata port {lp}: neutron:cidrs entry {:?}: {why}; not assigned",
                tok.chars().take(64).collect::<String>()
            )),
        }
    }
    if any_ip6 {
        addresses.insert(METADATA_V6);
        addresses.insert(Cidr::link_local(mac));
    }
    let mtu = match ext_id(md, "neutron:mtu") {
        None => None,
        Some(s) => match s.parse::<u32>() {
            Ok(0) => None,
            Ok(m) if (MIN_MTU..=MAX_MTU).contains(&m) => Some(m),
            _ => {
                problems.push(format!(
                    "network {net}: metadata port {lp}: neutron:mtu {:?} is not in {MIN_MTU}..={MAX_MTU}; MTU left as it is",
                    s.chars().take(20).collect::<String>()
                ));
                None
            }
        },
    };
    Some(NetworkPlan {
        network: net.to_string(),
        datapath: dp,
        logical_port: lp.to_string(),
        mac,
        mtu,
        addresses,
        ipv6: any_ip6,
    })
}

/// How [`Provisioner`] works.
#[derive(Debug, Clone)]
pub struct ProvisionerConfig {
    /// The local Open_vSwitch database (`[ovn.ovs] ovsdb_connection`), tried in turn.
    pub ovs_remotes: Vec<Remote>,
    /// Its connection options.
    pub ovs_conn: ConnOptions,
    /// The OVN bridge (`Open_vSwitch.external_ids:ovn-bridge`, default `br-int`).
    pub bridge: String,
    /// The namespace prefix, [`NS_PREFIX`]. Every namespace named with it and
    /// a UUID is managed: torn down when not wanted. Tests use a prefix of
    /// their own so that they never touch another's namespaces.
    pub ns_prefix: String,
    /// Where `ip netns` keeps named namespaces.
    pub netns_dir: PathBuf,
}

impl ProvisionerConfig {
    /// The defaults for `remotes` and `bridge`.
    pub fn new(ovs_remotes: Vec<Remote>, ovs_conn: ConnOptions, bridge: &str) -> Self {
        ProvisionerConfig {
            ovs_remotes,
            ovs_conn,
            bridge: bridge.to_string(),
            ns_prefix: NS_PREFIX.to_string(),
            netns_dir: PathBuf::from(crate::rt::netns::DEFAULT_NETNS_DIR),
        }
    }
}

/// The state of a namespace's `fe80::a9fe:a9fe`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V6State {
    /// Not assigned (an IPv4-only network, or IPv6 disabled on the host).
    Off,
    /// DAD is running: a bind would fail with `EADDRNOTAVAIL`.
    Tentative,
    /// Usable.
    Ready,
    /// Another node answers for it: serve IPv4 only (Neutron does the same).
    DadFailed,
}

/// One provisioned namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioned {
    /// The network id (what the server stamps as `X-OVN-Network-ID`).
    pub network: String,
    /// The namespace name.
    pub namespace: String,
    /// The namespace end of the veth, to bind listeners to.
    pub interface: String,
    /// `fe80::a9fe:a9fe` on it.
    pub v6: V6State,
    /// What this reconcile changed, for the log (empty: nothing).
    pub changes: Vec<String>,
}

/// A network whose provisioning failed (its namespace may exist in part;
/// the next reconcile retries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The network id.
    pub network: String,
    /// Its namespace.
    pub namespace: String,
    /// What failed.
    pub error: String,
}

/// What one [`Provisioner::reconcile`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Namespaces that did not exist before.
    pub created: Vec<Provisioned>,
    /// Namespaces that existed and were changed.
    pub updated: Vec<Provisioned>,
    /// Namespaces that were already right.
    pub unchanged: Vec<Provisioned>,
    /// Namespaces torn down.
    pub removed: Vec<String>,
    /// Networks that could not be provisioned.
    pub failed: Vec<Failure>,
    /// Changes to the Open_vSwitch database.
    pub ovs_changes: Vec<String>,
    /// Why the Open_vSwitch part failed, if it did (the namespaces were
    /// still provisioned; the next reconcile retries).
    pub ovs_error: Option<String>,
    /// Teardowns that failed (namespace, error).
    pub teardown_failed: Vec<(String, String)>,
}

impl Report {
    /// Whether anything was changed.
    pub fn changed(&self) -> bool {
        !(self.created.is_empty()
            && self.updated.is_empty()
            && self.removed.is_empty()
            && self.ovs_changes.is_empty())
    }

    /// Whether everything succeeded (else reconcile again later).
    pub fn complete(&self) -> bool {
        self.failed.is_empty() && self.ovs_error.is_none() && self.teardown_failed.is_empty()
    }

    /// Every namespace that is provisioned now (created, updated or unchanged).
    pub fn serving(&self) -> impl Iterator<Item = &Provisioned> {
        self.created
            .iter()
            .chain(&self.updated)
            .chain(&self.unchanged)
    }
}

/// Creates, fixes and removes the `ovnmeta-` namespaces. Not thread-safe
/// on purpose: one provisioner per node, called from one thread.
#[derive(Debug)]
pub struct Provisioner {
    cfg: ProvisionerConfig,
    ipv6_enabled: bool,
    logged_problems: BTreeSet<String>,
    warned_netdev: bool,
    warned_no_chassis: bool,
}

#[derive(Debug, Clone, Deserialize)]
struct IpAddrInfo {
    local: String,
    prefixlen: u8,
    #[serde(default)]
    tentative: bool,
    #[serde(default)]
    dadfailed: bool,
}

#[derive(Debug, Clone, Deserialize)]
struct IpLinkInfo {
    info_kind: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct IpLink {
    ifindex: u32,
    ifname: String,
    #[serde(default)]
    link_index: Option<u32>,
    #[serde(default)]
    flags: Vec<String>,
    #[serde(default)]
    mtu: u32,
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    linkinfo: Option<IpLinkInfo>,
    #[serde(default)]
    addr_info: Vec<IpAddrInfo>,
}

impl IpLink {
    fn is_veth(&self) -> bool {
        self.linkinfo.as_ref().and_then(|l| l.info_kind.as_deref()) == Some("veth")
    }
    fn up(&self) -> bool {
        self.flags.iter().any(|f| f == "UP")
    }
    fn cidrs(&self) -> Vec<(Cidr, &IpAddrInfo)> {
        self.addr_info
            .iter()
            .filter_map(|a| {
                let addr = a.local.parse().ok()?;
                Some((
                    Cidr {
                        addr,
                        prefix: a.prefixlen,
                    },
                    a,
                ))
            })
            .collect()
    }
}

/// Run `ip [-n ns] args`; its stdout.
fn ip(ns: Option<&str>, args: &[&str]) -> Result<String, ProvisionError> {
    let mut all: Vec<&str> = Vec::with_capacity(args.len() + 2);
    if let Some(ns) = ns {
        all.extend(["-n", ns]);
    }
    all.extend(args);
    let shown = all.join(" ");
    let out = Command::new("ip")
        .args(&all)
        .output()
        .map_err(|source| ProvisionError::Spawn {
            args: shown.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(ProvisionError::Ip {
            args: shown,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip -j -d [-n ns] addr show [dev D]`: links with their addresses.
fn links(ns: Option<&str>, dev: Option<&str>) -> Result<Vec<IpLink>, ProvisionError> {
    let mut args = vec!["-j", "-d", "addr", "show"];
    if let Some(d) = dev {
        args.extend(["dev", d]);
    }
    let text = ip(ns, &args)?;
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(&text).map_err(|e| ProvisionError::IpOutput {
        args: args.join(" "),
        why: e.to_string(),
    })
}

fn find<'a>(links: &'a [IpLink], name: &str) -> Option<&'a IpLink> {
    links.iter().find(|l| l.ifname == name)
}

/// The OVS rows we read, by UUID.
#[derive(Debug, Default)]
struct OvsState {
    /// name -> (uuid, ports, datapath_type)
    bridges: BTreeMap<String, (String, Vec<String>, String)>,
    /// uuid -> (name, interfaces)
    ports: HashMap<String, (String, Vec<String>)>,
    /// uuid -> (name, iface-id)
    ifaces: HashMap<String, (String, Option<String>)>,
}

fn uuid_list(v: &Value) -> Vec<String> {
    match v {
        Value::Array(a) if a.len() == 2 && a[0] == "uuid" => a[1]
            .as_str()
            .map(|s| vec![s.to_string()])
            .unwrap_or_default(),
        Value::Array(a) if a.len() == 2 && a[0] == "set" => a[1]
            .as_array()
            .map(|s| s.iter().flat_map(uuid_list).collect())
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

fn map_get(v: &Value, key: &str) -> Option<String> {
    let pairs = v.as_array().filter(|a| a.len() == 2 && a[0] == "map")?[1].as_array()?;
    pairs.iter().find_map(|p| {
        let p = p.as_array()?;
        (p.first()?.as_str()? == key).then(|| p.get(1)?.as_str().map(str::to_string))?
    })
}

fn row_uuid(r: &Value) -> Option<String> {
    uuid_list(&r["_uuid"]).into_iter().next()
}

impl OvsState {
    fn read(conn: &mut Conn) -> Result<OvsState, ProvisionError> {
        let never = || false;
        let res = conn.transact(
            OVS_DB,
            vec![
                json!({"op": "select", "table": "Bridge", "where": [],
                       "columns": ["_uuid", "name", "ports", "datapath_type"]}),
                json!({"op": "select", "table": "Port", "where": [],
                       "columns": ["_uuid", "name", "interfaces"]}),
                json!({"op": "select", "table": "Interface", "where": [],
                       "columns": ["_uuid", "name", "external_ids"]}),
            ],
            &never,
        )?;
        let rows = |i: usize| -> Result<&Vec<Value>, ProvisionError> {
            res.get(i)
                .and_then(|r| r["rows"].as_array())
                .ok_or_else(|| ProvisionError::Ovs("select without rows".into()))
        };
        let mut st = OvsState::default();
        for r in rows(0)? {
            let (Some(u), Some(name)) = (row_uuid(r), r["name"].as_str()) else {
                continue;
            };
            let dt = r["datapath_type"].as_str().unwrap_or("").to_string();
            st.bridges
                .insert(name.to_string(), (u, uuid_list(&r["ports"]), dt));
        }
        for r in rows(1)? {
            let (Some(u), Some(name)) = (row_uuid(r), r["name"].as_str()) else {
                continue;
            };
            st.ports
                .insert(u, (name.to_string(), uuid_list(&r["interfaces"])));
        }
        for r in rows(2)? {
            let (Some(u), Some(name)) = (row_uuid(r), r["name"].as_str()) else {
                continue;
            };
            st.ifaces.insert(
                u,
                (name.to_string(), map_get(&r["external_ids"], "iface-id")),
            );
        }
        Ok(st)
    }

    /// (bridge name, port uuid) of every port named `name`.
    fn ports_named(&self, name: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (br, (_, ports, _)) in &self.bridges {
            for p in ports {
                if self.ports.get(p).is_some_and(|(n, _)| n == name) {
                    out.push((br.clone(), p.clone()));
                }
            }
        }
        out
    }
}

impl Provisioner {
    /// A provisioner. Nothing is touched until [`Provisioner::reconcile`].
    pub fn new(cfg: ProvisionerConfig) -> Provisioner {
        // `netutils.is_ipv6_enabled()`.
        let ipv6_enabled = std::fs::read_to_string("/proc/sys/net/ipv6/conf/default/disable_ipv6")
            .map(|s| s.trim() == "0")
            .unwrap_or(false);
        Provisioner {
            cfg,
            ipv6_enabled,
            logged_problems: BTreeSet::new(),
            warned_netdev: false,
            warned_no_chassis: false,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ProvisionerConfig {
        &self.cfg
    }

    /// The namespace of `network`: `<prefix><network>`.
    pub fn namespace(&self, network: &str) -> String {
        format!("{}{network}", self.cfg.ns_prefix)
    }

    /// The managed namespaces that exist now, by network id.
    ///
    /// # Errors
    /// The namespace directory cannot be read (absent is fine: none).
    pub fn existing(&self) -> Result<BTreeMap<String, String>, ProvisionError> {
        let dir = &self.cfg.netns_dir;
        let mut out = BTreeMap::new();
        let rd = match std::fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(source) => {
                return Err(ProvisionError::NetnsDir {
                    dir: dir.clone(),
                    source,
                })
            }
        };
        for e in rd.flatten() {
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if let Some(net) = name.strip_prefix(&self.cfg.ns_prefix) {
                if is_uuid(net) {
                    out.insert(net.to_string(), name);
                }
            }
        }
        Ok(out)
    }

    /// Make the host match `want`: see the module doc. Per-network failures
    /// are in the [`Report`], not an error, so one bad network never stops
    /// the others.
    ///
    /// # Errors
    /// `ip` cannot be run or the namespace directory cannot be read.
    pub fn reconcile(&mut self, want: &Desired) -> Result<Report, ProvisionError> {
        let mut report = Report::default();
        let fresh: BTreeSet<String> = want.problems.iter().cloned().collect();
        for p in fresh.difference(&self.logged_problems) {
            log::warn(format_args!("ovn: provisioning: {p}"));
        }
        self.logged_problems = fresh;
        if !want.chassis_known {
            if !self.warned_no_chassis {
                self.warned_no_chassis = true;
                log::info(format_args!(
                    "ovn: provisioning waits: this chassis' Chassis row is not in the replica yet; nothing is created or removed"
                ));
            }
            return Ok(report);
        }
        self.warned_no_chassis = false;
        let existing = self.existing()?;
        let root = links(None, None)?;
        // Teardown first: a stale root veth could hold a name we need.
        for (net, ns) in &existing {
            if want.networks.contains_key(net) {
                continue;
            }
            let keep_veth = want
                .networks
                .keys()
                .any(|w| veth_names(w)[0] == veth_names(net)[0]);
            match teardown(ns, net, keep_veth) {
                Ok(()) => {
                    log::info(format_args!(
                        "ovn: removed namespace {ns}: no local port on network {net} any more"
                    ));
                    report.removed.push(ns.clone());
                }
                Err(e) => {
                    log::warn(format_args!("ovn: cannot remove namespace {ns}: {e}"));
                    report.teardown_failed.push((ns.clone(), e.to_string()));
                }
            }
        }
        for (net, plan) in &want.networks {
            let ns = self.namespace(net);
            match self.apply(plan, &ns, existing.contains_key(net), &root) {
                Ok(p) => {
                    if !existing.contains_key(net) {
                        log::info(format_args!(
                            "ovn: provisioned namespace {ns} for network {net}: {}",
                            p.changes.join("; ")
                        ));
                        report.created.push(p);
                    } else if !p.changes.is_empty() {
                        log::info(format_args!(
                            "ovn: updated namespace {ns}: {}",
                            p.changes.join("; ")
                        ));
                        report.updated.push(p);
                    } else {
                        report.unchanged.push(p);
                    }
                }
                Err(e) => {
                    log::warn(format_args!(
                        "ovn: cannot provision namespace {ns} for network {net}: {e}"
                    ));
                    report.failed.push(Failure {
                        network: net.clone(),
                        namespace: ns,
                        error: e.to_string(),
                    });
                }
            }
        }
        let torn: Vec<&str> = existing
            .keys()
            .filter(|n| !want.networks.contains_key(*n))
            .map(String::as_str)
            .collect();
        match self.ovs(want, &torn) {
            Ok(changes) => {
                for c in &changes {
                    log::info(format_args!("ovn: open_vswitch: {c}"));
                }
                report.ovs_changes = changes;
            }
            Err(e) => {
                log::warn(format_args!("ovn: provisioning: {e}"));
                report.ovs_error = Some(e.to_string());
            }
        }
        Ok(report)
    }

    fn apply(
        &self,
        plan: &NetworkPlan,
        ns: &str,
        existed: bool,
        root: &[IpLink],
    ) -> Result<Provisioned, ProvisionError> {
        let [v0, v1] = veth_names(&plan.network);
        let mut changes = Vec::new();
        if !existed {
            ip(None, &["netns", "add", ns])?;
            changes.push("namespace created".to_string());
        }
        let mut inside = match links(Some(ns), None) {
            Ok(l) => l,
            Err(e) if existed => {
                // A namespace file without its mount (a crash during
                // `ip netns del`): start it again.
                log::warn(format_args!(
                    "ovn: namespace {ns} cannot be entered ({e}); recreating it"
                ));
                let _ = ip(None, &["netns", "del", ns]);
                ip(None, &["netns", "add", ns])?;
                changes.push("unusable namespace recreated".to_string());
                links(Some(ns), None)?
            }
            Err(e) => return Err(e),
        };
        if find(&inside, "lo").is_some_and(|l| !l.up()) {
            ip(Some(ns), &["link", "set", "lo", "up"])?;
            changes.push("lo up".to_string());
        }
        let mut outside = find(root, &v0).cloned();
        let paired = match (find(&inside, &v1), &outside) {
            (Some(n), Some(r)) => {
                n.is_veth()
                    && r.is_veth()
                    && n.link_index == Some(r.ifindex)
                    && r.link_index == Some(n.ifindex)
            }
            _ => false,
        };
        if !paired {
            if find(&inside, &v1).is_some() {
                ip(Some(ns), &["link", "del", &v1])?;
            }
            // `links(None, ..)` was read before teardowns; check again.
            if outside.is_some() || !links(None, Some(&v0)).unwrap_or_default().is_empty() {
                ip(None, &["link", "del", &v0])?;
                changes.push(format!("unpaired {v0} deleted"));
            }
            ip(
                None,
                &[
                    "link", "add", &v0, "type", "veth", "peer", "name", &v1, "netns", ns,
                ],
            )?;
            changes.push(format!("veth {v0}/{v1} created"));
            inside = links(Some(ns), None)?;
            outside = links(None, Some(&v0))?.into_iter().next();
        }
        let end = find(&inside, &v1)
            .ok_or_else(|| {
                ProvisionError::State(format!("{v1} vanished from {ns} while provisioning"))
            })?
            .clone();
        let outside = outside
            .ok_or_else(|| ProvisionError::State(format!("{v0} vanished while provisioning")))?;
        let mac = fmt_mac(&plan.mac);
        if end.address.as_deref().map(str::to_ascii_lowercase) != Some(mac.clone()) {
            ip(Some(ns), &["link", "set", "dev", &v1, "address", &mac])?;
            changes.push(format!("{v1} MAC {mac}"));
        }
        if let Some(mtu) = plan.mtu {
            let m = mtu.to_string();
            if outside.mtu != mtu {
                ip(None, &["link", "set", "dev", &v0, "mtu", &m])?;
                changes.push(format!("{v0} MTU {mtu}"));
            }
            if end.mtu != mtu {
                ip(Some(ns), &["link", "set", "dev", &v1, "mtu", &m])?;
                changes.push(format!("{v1} MTU {mtu}"));
            }
        }
        if !outside.up() {
            ip(None, &["link", "set", "dev", &v0, "up"])?;
            changes.push(format!("{v0} up"));
        }
        if !end.up() {
            ip(Some(ns), &["link", "set", "dev", &v1, "up"])?;
            changes.push(format!("{v1} up"));
        }
        // Addresses: read again if the link changed (a MAC change or link up
        // changes the kernel's own); else what was read is current.
        let link_changed = !changes.is_empty();
        let now = if link_changed {
            links(Some(ns), Some(&v1))?
        } else {
            vec![end.clone()]
        };
        let current: Vec<Cidr> = now
            .first()
            .map(|l| l.cidrs().into_iter().map(|(c, _)| c).collect())
            .unwrap_or_default();
        let before = changes.len();
        let kernel_ll = Cidr::link_local(plan.mac);
        let mut want: BTreeSet<Cidr> = plan.addresses.clone();
        if !self.ipv6_enabled {
            want.retain(|c| c.addr.is_ipv4());
        }
        for c in &current {
            // The kernel's own link-local stays on an IPv4-only network (module doc).
            let kernels = *c == kernel_ll && !want.contains(&METADATA_V6);
            if !want.contains(c) && !kernels {
                let s = c.to_string();
                ip(Some(ns), &["addr", "del", &s, "dev", &v1])?;
                changes.push(format!("{s} removed"));
            }
        }
        for c in &want {
            if !current.contains(c) {
                let s = c.to_string();
                if c.addr.is_ipv4() && c.prefix < 31 {
                    ip(Some(ns), &["addr", "add", &s, "brd", "+", "dev", &v1])?;
                } else {
                    ip(Some(ns), &["addr", "add", &s, "dev", &v1])?;
                }
                changes.push(format!("{s} added"));
            }
        }
        let v6 = if changes.len() == before {
            v6_of(&now)
        } else {
            v6_of(&links(Some(ns), Some(&v1))?)
        };
        Ok(Provisioned {
            network: plan.network.clone(),
            namespace: ns.to_string(),
            interface: v1,
            v6,
            changes,
        })
    }

    fn ovs(&mut self, want: &Desired, torn: &[&str]) -> Result<Vec<String>, ProvisionError> {
        let mut last = None;
        let mut conn = None;
        for r in &self.cfg.ovs_remotes {
            match Conn::open(r, &self.cfg.ovs_conn) {
                Ok(c) => {
                    conn = Some(c);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let Some(mut conn) = conn else {
            return Err(last.map_or_else(
                || ProvisionError::Ovs("no ovsdb_connection remote".into()),
                ProvisionError::from,
            ));
        };
        let st = OvsState::read(&mut conn)?;
        let br = &self.cfg.bridge;
        let mut ops: Vec<Value> = Vec::new();
        let mut changes = Vec::new();
        // (bridge, port uuid) to take off a bridge.
        let mut remove: BTreeSet<(String, String)> = BTreeSet::new();
        // Wanted (port name, iface-id).
        let mut wanted: BTreeMap<String, &str> = BTreeMap::new();
        for (net, plan) in &want.networks {
            wanted.insert(veth_names(net)[0].clone(), &plan.logical_port);
        }
        for net in torn {
            let v0 = &veth_names(net)[0];
            if !wanted.contains_key(v0) {
                remove.extend(st.ports_named(v0));
            }
        }
        // A port whose interface carries a metadata port's iface-id but is
        // not one we want (an old agent's, a crash's, a renamed network's).
        for (bname, (_, ports, _)) in &st.bridges {
            for p in ports {
                let Some((pname, ifs)) = st.ports.get(p) else {
                    continue;
                };
                let theirs = ifs.iter().any(|i| {
                    st.ifaces.get(i).is_some_and(|(_, id)| {
                        id.as_ref()
                            .is_some_and(|id| want.metadata_ports.contains(id))
                    })
                });
                let ok = wanted.contains_key(pname);
                if (theirs && !ok) || (ok && bname != br) {
                    remove.insert((bname.clone(), p.clone()));
                }
            }
        }
        let ours = st.bridges.get(br);
        if let Some((_, _, dt)) = ours {
            if dt == "netdev" && !self.warned_netdev {
                self.warned_netdev = true;
                log::warn(format_args!(
                    "ovn: bridge {br} has datapath_type=netdev (DPDK); Neutron adds an iptables CHECKSUM --checksum-fill rule in each namespace for it, metaproxy does not"
                ));
            }
        }
        let mut add_to_ours: Vec<Value> = Vec::new();
        let mut moved: BTreeSet<String> = BTreeSet::new();
        if let Some((_, our_ports, _)) = ours {
            for (pname, lp) in &wanted {
                let here = our_ports
                    .iter()
                    .find(|p| st.ports.get(*p).is_some_and(|(n, _)| n == pname));
                let elsewhere = st
                    .ports_named(pname)
                    .into_iter()
                    .find(|(b, _)| b != br)
                    .map(|(_, p)| p);
                let port = match (here, elsewhere) {
                    (Some(p), _) => Some(p.clone()),
                    (None, Some(p)) => {
                        // Moving the row keeps the Interface's name index intact.
                        add_to_ours.push(json!(["uuid", p]));
                        moved.insert(p.clone());
                        changes.push(format!("port {pname} moved to {br}"));
                        Some(p)
                    }
                    (None, None) => None,
                };
                match port {
                    Some(p) => {
                        let ifs = &st.ports[&p].1;
                        let iface = ifs
                            .iter()
                            .find(|i| st.ifaces.get(*i).is_some_and(|(n, _)| n == pname));
                        match iface {
                            Some(i) if st.ifaces[i].1.as_deref() == Some(*lp) => {}
                            Some(i) => {
                                ops.push(json!({"op": "mutate", "table": "Interface",
                                    "where": [["_uuid", "==", ["uuid", i]]],
                                    "mutations": [["external_ids", "delete", ["set", ["iface-id"]]],
                                                  ["external_ids", "insert", ["map", [["iface-id", lp]]]]]}));
                                changes.push(format!("interface {pname} iface-id={lp}"));
                            }
                            None => {
                                return Err(ProvisionError::Ovs(format!(
                                    "port {pname} has no interface named {pname}; remove it (ovs-vsctl del-port {pname}) and reconcile again"
                                )));
                            }
                        }
                    }
                    None => {
                        let (iu, pu) = (format!("i{}", ops.len()), format!("p{}", ops.len()));
                        ops.push(
                            json!({"op": "insert", "table": "Interface", "uuid-name": iu,
                            "row": {"name": pname, "external_ids": ["map", [["iface-id", lp]]]}}),
                        );
                        ops.push(json!({"op": "insert", "table": "Port", "uuid-name": pu,
                            "row": {"name": pname, "interfaces": ["named-uuid", iu]}}));
                        add_to_ours.push(json!(["named-uuid", pu]));
                        changes.push(format!("port {pname} added to {br} with iface-id={lp}"));
                    }
                }
            }
        }
        let mut by_bridge: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
        for (b, p) in &remove {
            let name = st.ports.get(p).map_or("?", |(n, _)| n.as_str());
            if moved.contains(p) {
                changes.push(format!("port {name} taken off {b}"));
            } else {
                changes.push(format!("port {name} removed from {b}"));
            }
            by_bridge
                .entry(b.as_str())
                .or_default()
                .push(json!(["uuid", p]));
        }
        for (b, ports) in by_bridge {
            let bu = &st.bridges[b].0;
            ops.push(json!({"op": "mutate", "table": "Bridge",
                "where": [["_uuid", "==", ["uuid", bu]]],
                "mutations": [["ports", "delete", ["set", ports]]]}));
        }
        if let Some((bu, our_ports, _)) = ours {
            if !add_to_ours.is_empty() {
                ops.push(json!({"op": "mutate", "table": "Bridge",
                    "where": [["_uuid", "==", ["uuid", bu]]],
                    "mutations": [["ports", "insert", ["set", add_to_ours]]]}));
            }
            if !ops.is_empty() {
                // Invariant: the guard goes first, so a concurrent change of
                // our bridge's ports aborts the whole transaction.
                let set: Vec<Value> = our_ports.iter().map(|p| json!(["uuid", p])).collect();
                ops.insert(
                    0,
                    json!({"op": "wait", "table": "Bridge", "timeout": 0,
                        "where": [["_uuid", "==", ["uuid", bu]]], "columns": ["ports"],
                        "until": "==", "rows": [{"ports": ["set", set]}]}),
                );
            }
        }
        if !ops.is_empty() {
            let never = || false;
            conn.transact(OVS_DB, ops, &never)?;
        }
        if ours.is_none() && !want.networks.is_empty() {
            return Err(ProvisionError::Ovs(format!(
                "the OVN bridge {br} is not in the Open_vSwitch database (ovn-bridge in Open_vSwitch external_ids, default br-int)"
            )));
        }
        Ok(changes)
    }

    /// The state of `fe80::a9fe:a9fe` in `network`'s namespace now.
    ///
    /// # Errors
    /// The namespace or its interface cannot be read.
    pub fn v6_state(&self, network: &str) -> Result<V6State, ProvisionError> {
        let [_, v1] = veth_names(network);
        Ok(v6_of(&links(Some(&self.namespace(network)), Some(&v1))?))
    }

    /// Wait up to `limit` (Neutron: [`DAD_WAIT`]) for `fe80::a9fe:a9fe` to
    /// leave `tentative`; the state then. Call before binding the IPv6
    /// listener, off the serving loops (it sleeps).
    ///
    /// # Errors
    /// As [`Provisioner::v6_state`].
    pub fn wait_v6(&self, network: &str, limit: Duration) -> Result<V6State, ProvisionError> {
        let until = Instant::now() + limit;
        loop {
            let s = self.v6_state(network)?;
            if s != V6State::Tentative || Instant::now() >= until {
                return Ok(s);
            }
            std::thread::sleep(DAD_POLL);
        }
    }

    /// The netns directory as a path, for callers that enter namespaces.
    pub fn netns_path(&self, namespace: &str) -> PathBuf {
        Path::new(&self.cfg.netns_dir).join(namespace)
    }
}

fn v6_of(l: &[IpLink]) -> V6State {
    let Some(a) = l.first().and_then(|l| {
        l.cidrs()
            .into_iter()
            .find(|(c, _)| *c == METADATA_V6)
            .map(|(_, a)| a.clone())
    }) else {
        return V6State::Off;
    };
    if a.dadfailed {
        V6State::DadFailed
    } else if a.tentative {
        V6State::Tentative
    } else {
        V6State::Ready
    }
}

/// `teardown_datapath` without the OVS part (done in the one transaction):
/// the root veth, then the namespace if nothing else is in it (our veth's
/// namespace end goes with its root end).
fn teardown(ns: &str, net: &str, keep_veth: bool) -> Result<(), ProvisionError> {
    let [v0, v1] = veth_names(net);
    // `keep_veth`: a wanted network has the same veth name (and the pair is
    // recreated for it if it was this namespace's).
    if !keep_veth && !links(None, Some(&v0)).unwrap_or_default().is_empty() {
        ip(None, &["link", "del", &v0])?;
    }
    // A namespace that cannot be entered is a leftover file; deleting it
    // is the cleanup.
    if let Ok(l) = links(Some(ns), None) {
        let others: Vec<&str> = l
            .iter()
            .map(|l| l.ifname.as_str())
            .filter(|n| *n != "lo" && *n != v1)
            .collect();
        if !others.is_empty() {
            return Err(ProvisionError::State(format!(
                "left in place: it holds devices metaproxy did not create ({})",
                others.join(", ")
            )));
        }
    }
    ip(None, &["netns", "del", ns])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ovn::ovsdb::datum::Schema;

    const ME: u128 = 0xc1;
    const OTHER: u128 = 0xc2;
    const NET: &str = "5f0ee41c-5a43-4b7b-8b8b-5dcd3b1b0a01";

    fn schema() -> Schema {
        let map = json!({"key": "string", "value": "string", "min": 0, "max": "unlimited"});
        let opt_ref = json!({"key": {"type": "uuid", "refTable": "Chassis", "refType": "weak"}, "min": 0, "max": 1});
        Schema::from_json(&json!({
            "name": "OVN_Southbound", "version": "20.27.0",
            "tables": {
                "Chassis": {"columns": {"name": {"type": "string"}, "hostname": {"type": "string"}, "external_ids": {"type": map}}},
                "Datapath_Binding": {"columns": {"tunnel_key": {"type": {"key": "integer"}}, "external_ids": {"type": map}}},
                "Port_Binding": {"columns": {
                    "logical_port": {"type": "string"}, "type": {"type": "string"},
                    "datapath": {"type": {"key": {"type": "uuid", "refTable": "Datapath_Binding"}}},
                    "chassis": {"type": opt_ref},
                    "additional_chassis": {"type": {"key": {"type": "uuid", "refTable": "Chassis", "refType": "weak"}, "min": 0, "max": "unlimited"}},
                    "mac": {"type": {"key": "string", "min": 0, "max": "unlimited"}},
                    "external_ids": {"type": map}, "options": {"type": map},
                    "up": {"type": {"key": "boolean", "min": 0, "max": 1}}}},
            }
        }))
        .unwrap()
    }

    fn u(n: u128) -> String {
        Uuid(n).to_string()
    }

    struct Sb {
        rows: serde_json::Map<String, Value>,
        next: u128,
    }

    impl Sb {
        fn new() -> Sb {
            let mut s = Sb {
                rows: Default::default(),
                next: 0x1000,
            };
            for (c, name) in [(ME, "me"), (OTHER, "other")] {
                s.put("Chassis", c, json!({"name": name}));
            }
            s
        }
        fn put(&mut self, table: &str, id: u128, row: Value) {
            self.rows
                .entry(table.to_string())
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .unwrap()
                .insert(u(id), json!({"initial": row}));
        }
        fn net(&mut self, name: &str) -> u128 {
            self.next += 1;
            let id = self.next;
            self.put(
                "Datapath_Binding",
                id,
                json!({"tunnel_key": id as i64, "external_ids": ["map", [["name", name]]]}),
            );
            id
        }
        fn metadata(&mut self, dp: u128, mac: &str, ids: &[(&str, &str)]) {
            self.next += 1;
            let mut m = vec![json!(["neutron:device_owner", "network:distributed"])];
            m.extend(ids.iter().map(|(k, v)| json!([k, v])));
            self.put(
                "Port_Binding",
                self.next,
                json!({"logical_port": format!("md-{dp:x}"), "type": "localport",
                       "datapath": ["uuid", u(dp)], "mac": mac, "external_ids": ["map", m]}),
            );
        }
        fn vif(&mut self, dp: u128, mac: &str, chassis: Option<u128>, additional: &[u128]) {
            self.next += 1;
            let mut row = json!({"logical_port": format!("vif-{:x}", self.next), "type": "",
                "datapath": ["uuid", u(dp)], "mac": mac,
                "additional_chassis": ["set", additional.iter().map(|c| json!(["uuid", u(*c)])).collect::<Vec<_>>()]});
            if let Some(c) = chassis {
                row["chassis"] = json!(["uuid", u(c)]);
            }
            self.put("Port_Binding", self.next, row);
        }
        fn replica(&self) -> Replica {
            let mut r = Replica::new("me", &schema());
            r.apply(&Value::Object(self.rows.clone()), false).unwrap();
            r
        }
    }

    fn cidrs(list: &[&str]) -> BTreeSet<Cidr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn names_are_neutrons() {
        assert_eq!(
            veth_names(NET),
            ["tap5f0ee41c-50".to_string(), "tap5f0ee41c-51".to_string()]
        );
        assert_eq!(NS_PREFIX, "ovnmeta-");
        assert_eq!(
            Cidr::link_local([0xfa, 0x16, 0x3e, 0x11, 0x22, 0x33]).to_string(),
            "fe80::f816:3eff:fe11:2233/64"
        );
        let c: Cidr = "10.0.0.2/24".parse().unwrap();
        assert!(c.contains("10.0.0.200".parse().unwrap()));
        assert!(!c.contains("10.0.1.2".parse().unwrap()));
        assert!(!c.contains("fd00::1".parse().unwrap()));
        let z: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(z.contains("192.0.2.1".parse().unwrap()));
        for bad in [
            "10.0.0.2",
            "10.0.0.2/33",
            "fd00::1/129",
            "x/24",
            "10.0.0.2/",
            "10.0.0.2/+3",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn plans_local_networks_as_neutron_does() {
        let mut sb = Sb::new();
        let a = sb.net(&format!("neutron-{NET}"));
        sb.metadata(
            a,
            "fa:16:3e:00:00:01 10.0.0.2 10.1.0.2",
            &[
                ("neutron:cidrs", "10.0.0.2/24 10.1.0.2/24 fd00::2/64"),
                ("neutron:mtu", "1442"),
            ],
        );
        sb.vif(a, "fa:16:3e:00:00:10 10.0.0.10", Some(ME), &[]);
        // Bound elsewhere: not local.
        let b = sb.net("neutron-6f0ee41c-5a43-4b7b-8b8b-5dcd3b1b0a02");
        sb.metadata(b, "fa:16:3e:00:00:02", &[("neutron:cidrs", "10.2.0.2/24")]);
        sb.vif(b, "fa:16:3e:00:00:20 10.2.0.10", Some(OTHER), &[]);
        // Live migration to here: local through additional_chassis; IPv6 only.
        let c = sb.net("neutron-7f0ee41c-5a43-4b7b-8b8b-5dcd3b1b0a03");
        sb.metadata(c, "fa:16:3e:00:00:03", &[("neutron:cidrs", "fd00:3::2/64")]);
        sb.vif(c, "fa:16:3e:00:00:30 fd00:3::10", Some(OTHER), &[ME]);
        let d = desired(&sb.replica());
        assert!(d.chassis_known);
        assert_eq!(d.problems, Vec::<String>::new());
        assert_eq!(d.networks.len(), 2, "{:?}", d.networks.keys());
        let pa = &d.networks[NET];
        assert_eq!(pa.mac, [0xfa, 0x16, 0x3e, 0, 0, 1]);
        assert_eq!(pa.mtu, Some(1442));
        assert_eq!(pa.logical_port, format!("md-{a:x}"));
        assert_eq!(pa.addresses, cidrs(&["169.254.169.254/32", "10.0.0.2/24"]));
        assert!(!pa.ipv6);
        let pc = &d.networks["7f0ee41c-5a43-4b7b-8b8b-5dcd3b1b0a03"];
        assert!(pc.ipv6);
        assert_eq!(pc.mtu, None);
        assert_eq!(
            pc.addresses,
            cidrs(&[
                "169.254.169.254/32",
                "fe80::a9fe:a9fe/128",
                "fe80::f816:3eff:fe00:3/64"
            ])
        );
        assert_eq!(d.metadata_ports.len(), 3);
    }

    #[test]
    fn untrusted_values_skip_the_item_with_a_line() {
        let mut sb = Sb::new();
        let a = sb.net(&format!("neutron-{NET}"));
        sb.metadata(
            a,
            "fa:16:3e:00:00:01",
            &[
                ("neutron:cidrs", "10.0.0.2/24 10.0.0.3/99 bogus"),
                ("neutron:mtu", "9000000"),
            ],
        );
        sb.vif(a, "fa:16:3e:00:00:10 10.0.0.10 not-an-ip", Some(ME), &[]);
        // Not a UUID: would become a namespace and interface name.
        let b = sb.net("neutron-../../etc");
        sb.metadata(b, "fa:16:3e:00:00:02", &[]);
        sb.vif(b, "fa:16:3e:00:00:20 10.2.0.10", Some(ME), &[]);
        // Multicast MAC.
        let c = sb.net("neutron-5f0ee41c-5a43-4b7b-8b8b-5dcd3b1b0a03");
        sb.metadata(c, "01:00:5e:00:00:01", &[]);
        sb.vif(c, "fa:16:3e:00:00:30 10.3.0.10", Some(ME), &[]);
        // No address on the local port, no metadata port: silently not provisioned.
        let e = sb.net("neutron-5f0ee41c-5a43-4b7b-8b8b-5dcd3b1b0a05");
        sb.metadata(e, "fa:16:3e:00:00:05", &[]);
        sb.vif(e, "unknown", Some(ME), &[]);
        let f = sb.net("neutron-5f0ee41c-5a43-4b7b-8b8b-5dcd3b1b0a06");
        sb.vif(f, "fa:16:3e:00:00:60 10.6.0.10", Some(ME), &[]);
        // The same veth names as NET (Neutron keeps ten characters).
        let g = sb.net("neutron-5f0ee41c-5b00-4b7b-8b8b-5dcd3b1b0a07");
        sb.metadata(g, "fa:16:3e:00:00:07", &[]);
        sb.vif(g, "fa:16:3e:00:00:70 10.7.0.10", Some(ME), &[]);
        let d = desired(&sb.replica());
        assert_eq!(d.networks.keys().collect::<Vec<_>>(), vec![NET]);
        let p = &d.networks[NET];
        assert_eq!(p.mtu, None);
        assert_eq!(p.addresses, cidrs(&["169.254.169.254/32", "10.0.0.2/24"]));
        let all = d.problems.join("\n");
        for needle in [
            "10.0.0.3/99",
            "bogus",
            "9000000",
            "not-an-ip",
            "../../etc",
            "same first ten",
            "01:00:5e:00:00:01",
        ] {
            assert!(all.contains(needle), "no line for {needle}: {all}");
        }
        assert_eq!(d.problems.len(), 7, "{all}");
    }

    #[test]
    fn unknown_chassis_plans_nothing() {
        let mut sb = Sb::new();
        sb.rows.remove("Chassis");
        let a = sb.net(&format!("neutron-{NET}"));
        sb.metadata(a, "fa:16:3e:00:00:01", &[]);
        let d = desired(&sb.replica());
        assert!(!d.chassis_known);
        assert!(d.networks.is_empty());
    }
}
