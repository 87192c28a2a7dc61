//! The instance / port / network / router model shared by the agent and the API.
//!
//! An [`Inventory`] is loaded once from a TOML file (see `examples/inventory.toml`),
//! validated as a whole, and then never mutated: a reload builds a new one and
//! swaps the `Arc`. Every lookup the hot path needs (router → networks,
//! (network, ip) → port, (network, mac) → port, ip → instance) is answered from a
//! hash index built at load, so lookups are O(1) and borrow from the inventory.
//!
//! Two layers, as everywhere in metaproxy: `file` holds the serde structs
//! (`deny_unknown_fields`, defaults), and [`Inventory::from_toml_str`] converts
//! them into parsed types, naming the offending key (`instance[2].port[0].fixed_ips[1]`)
//! on the first error. Rejected alternative: validating lazily at lookup time,
//! which would turn a typo in the file into a 404 for one guest at 3 am.
//!
//! Derived values (documented here because guests see them):
//! - `ec2_id` (EC2 `instance-id` = `i-%08x`) defaults to the first 8 hex digits
//!   of the UUID (its `time_low` field), or, if those are not hex, the first four
//!   bytes of SHA-256(uuid). Two instances ending up with the same EC2 id is an
//!   error: set `ec2_id` explicitly.
//! - `reservation_id` defaults to `r-%08x` of the EC2 id.
//! - `name` (display name) defaults to `hostname`.
//! - `subnet.ip_version` is derived from the CIDR; `subnet.dhcp` defaults to
//!   true (Neutron's `enable_dhcp` default).
//! - `port.devname` (the `network_data.json` link id) defaults to `tap` + the
//!   first 11 characters of the port id, which is what Nova/os-vif name the tap.
//! - A fixed IP outside every subnet of its network is accepted (lookups and
//!   `local-ipv4` use it), but it contributes nothing to `network_data.json`.
#![warn(missing_docs)]

mod file;
pub mod net;
pub mod store;
pub mod synth;
pub mod watch;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use sha2::{Digest, Sha256};

pub use net::Cidr;
pub use store::Store;

/// Errors from loading an inventory file.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// The file could not be read.
    #[error("reading inventory {path}: {source}")]
    Io {
        /// The inventory file.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// The TOML did not parse or did not match the schema; the message carries
    /// toml's line/column and a snippet of the offending line.
    #[error("inventory parse error: {message}")]
    Parse {
        /// toml's message, with line and column.
        message: String,
    },
    /// A value parsed but is not acceptable; `key` names it, e.g. `instance[2].port[0].mac`.
    #[error("inventory: {key}: {message}")]
    Invalid {
        /// Dotted key path of the bad value.
        key: String,
        /// Why it is refused.
        message: String,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> InventoryError {
    InventoryError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// IPv6 address mode of a subnet (Neutron's `ipv6_address_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ipv6Mode {
    /// `slaac`
    Slaac,
    /// `dhcpv6-stateful`
    Dhcpv6Stateful,
    /// `dhcpv6-stateless`
    Dhcpv6Stateless,
}

impl Ipv6Mode {
    /// Neutron's spelling, used in `network_data.json` as `ipv6_<mode>`.
    pub fn as_str(self) -> &'static str {
        match self {
            Ipv6Mode::Slaac => "slaac",
            Ipv6Mode::Dhcpv6Stateful => "dhcpv6-stateful",
            Ipv6Mode::Dhcpv6Stateless => "dhcpv6-stateless",
        }
    }
}

/// A host route of a subnet.
#[derive(Debug, Clone)]
pub struct Route {
    /// Destination prefix.
    pub destination: Cidr,
    /// Next hop on the subnet.
    pub nexthop: IpAddr,
}

#[derive(Debug, Clone)]
/// A Neutron subnet.
pub struct Subnet {
    /// Subnet UUID.
    pub id: String,
    /// Prefix of the subnet.
    pub cidr: Cidr,
    /// Gateway address, if the subnet has one.
    pub gateway: Option<IpAddr>,
    /// DNS servers handed to the instance.
    pub dns: Vec<IpAddr>,
    /// 4 or 6.
    pub ip_version: u8,
    /// Nova renders this subnet `ipv4_dhcp`/`ipv6_dhcp` (unless it has an
    /// `ipv6_mode`): a DHCP server serves it, or Neutron's `enable_dhcp`.
    pub dhcp: bool,
    /// A DHCP port serves this subnet (Nova's info cache `dhcp_server`):
    /// Nova then leaves the link's `mtu` null (DHCP hands it out). The
    /// inventory's `dhcp` sets both.
    pub dhcp_server: bool,
    /// `ipv6_address_mode`, for IPv6 subnets that set it.
    pub ipv6_mode: Option<Ipv6Mode>,
    /// Host routes.
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone)]
/// A Neutron network with its subnets.
pub struct Network {
    /// Network UUID.
    pub id: String,
    /// Network name.
    pub name: String,
    /// Owning project (tenant) id.
    pub project: String,
    /// MTU, when known (rendered in `network_data.json`).
    pub mtu: Option<u32>,
    /// Subnets in file order.
    pub subnets: Vec<Subnet>,
}

impl Network {
    /// The first subnet (in file order) containing `ip`.
    pub fn subnet_for(&self, ip: IpAddr) -> Option<&Subnet> {
        self.subnets.iter().find(|s| s.cidr.contains(ip))
    }
}

#[derive(Debug, Clone)]
/// A Neutron router and the networks attached to it.
pub struct Router {
    /// Router UUID.
    pub id: String,
    /// Networks with an interface on this router.
    pub networks: Vec<String>,
}

/// A keypair exposed to the instance (Nova shows only the first).
#[derive(Debug, Clone)]
pub struct Key {
    /// Keypair name.
    pub name: String,
    /// `ssh` or `x509`.
    pub kind: String,
    /// Public key material.
    pub data: String,
}

#[derive(Debug, Clone)]
/// A Neutron port of an instance.
pub struct Port {
    /// Port UUID.
    pub id: String,
    /// Network UUID the port is on.
    pub network: String,
    /// MAC address.
    pub mac: [u8; 6],
    /// Fixed IPs, in file order.
    pub fixed_ips: Vec<IpAddr>,
    /// Neutron `device_owner` (default `compute:nova`).
    pub device_owner: String,
    /// Neutron `binding:vif_type` (`ovs`, `bridge`, ...).
    pub vif_type: Option<String>,
    /// Tap device name (`network_data.json` link id).
    pub devname: String,
}

impl Port {
    /// Neutron's notion of a compute port (`device_owner` = `compute:*`).
    pub fn is_compute(&self) -> bool {
        self.device_owner.starts_with("compute:")
    }
}

#[derive(Debug, Clone)]
/// A Nova instance: what the metadata trees are rendered from.
pub struct Instance {
    /// Instance UUID (Nova's `X-Instance-ID`).
    pub uuid: String,
    /// Display name.
    pub name: String,
    /// Hostname without the DHCP domain.
    pub hostname: String,
    /// Owning project (Nova's `X-Tenant-ID`).
    pub project: String,
    /// Availability zone (EC2 `placement/availability-zone`).
    pub availability_zone: Option<String>,
    /// `ami-launch-index`.
    pub launch_index: u32,
    /// Flavor name (EC2 `instance-type`).
    pub flavor: String,
    /// Numeric EC2 id (`instance-id` = `i-%08x`).
    pub ec2_id: u32,
    /// EC2 id of the image (`ami-id` = `ami-%08x`); `None` for an instance
    /// booted from a volume (no image), which Nova shows as `None`.
    pub image_ec2_id: Option<u32>,
    /// EC2 id of the kernel image (`kernel-id`), if any.
    pub kernel_ec2_id: Option<u32>,
    /// EC2 id of the ramdisk image (`ramdisk-id`), if any.
    pub ramdisk_ec2_id: Option<u32>,
    /// EC2 `reservation-id`.
    pub reservation_id: String,
    /// Root device (`block-device-mapping/root`), if known.
    pub root_device_name: Option<String>,
    /// Nova's `instances.default_ephemeral_device` (`block-device-mapping/ephemeral0`
    /// unless a blank BDM names it).
    pub default_ephemeral_device: Option<String>,
    /// Nova's `instances.default_swap_device` (`block-device-mapping/swap`
    /// unless a swap BDM names it).
    pub default_swap_device: Option<String>,
    /// Block device mappings, in Nova's row order (EC2 `ebsN`, `ephemeralN`, `swap`).
    pub block_devices: Vec<BlockDevice>,
    /// Tagged devices (`meta_data.json` `devices`), in Nova's order.
    pub devices: Vec<Device>,
    /// Host CPUs pinned to this instance (`meta_data.json` `dedicated_cpus`),
    /// sorted; a CPU in two NUMA cells appears twice, as in Nova.
    pub dedicated_cpus: Vec<i64>,
    /// Security group names.
    pub security_groups: Vec<String>,
    /// Raw user data, if any.
    pub user_data: Option<Vec<u8>>,
    /// Instance metadata key/value pairs (`meta` in `meta_data.json`).
    pub meta: BTreeMap<String, String>,
    /// Nova's `image_ref` (the Glance image UUID; empty for a volume-backed
    /// instance): `image-id` of a dynamic vendordata request.
    pub image_ref: String,
    /// The `boot_roles` system metadata (the roles of the user who booted
    /// it, comma-separated): `boot-roles` of a dynamic vendordata request.
    pub boot_roles: String,
    /// Floating IPs (EC2 `public-ipv4` is the first).
    pub floating_ips: Vec<IpAddr>,
    /// Keypairs; Nova exposes the first.
    pub keys: Vec<Key>,
    /// Ports in file order.
    pub ports: Vec<Port>,
}

/// What a block device mapping is, for EC2's `block-device-mapping`
/// (`nova.block_device.instance_block_mapping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockDeviceKind {
    /// `destination_type = volume`: an `ebsN` entry.
    Volume,
    /// A blank local disk with `guest_format = swap`: `swap`.
    Swap,
    /// Any other blank local disk: an `ephemeralN` entry.
    Ephemeral,
    /// Anything else (the image itself, a snapshot copied locally): not shown.
    Other,
}

/// One row of Nova's `block_device_mapping`, as far as the metadata shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    /// What it is.
    pub kind: BlockDeviceKind,
    /// `device_name` (`/dev/vdb`); Nova shows a missing one as `None`.
    pub device_name: Option<String>,
}

/// The bus of a tagged device (Nova's `DeviceBus` subclasses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusKind {
    /// `PCIDeviceBus`
    Pci,
    /// `USBDeviceBus`
    Usb,
    /// `SCSIDeviceBus`
    Scsi,
    /// `IDEDeviceBus`
    Ide,
    /// `XenDeviceBus`
    Xen,
    /// The base `DeviceBus`: Nova leaves such a device out.
    Unknown,
}

impl BusKind {
    /// The `bus` value of `meta_data.json`; `None` for [`BusKind::Unknown`].
    pub fn name(self) -> Option<&'static str> {
        match self {
            BusKind::Pci => Some("pci"),
            BusKind::Usb => Some("usb"),
            BusKind::Scsi => Some("scsi"),
            BusKind::Ide => Some("ide"),
            BusKind::Xen => Some("xen"),
            BusKind::Unknown => None,
        }
    }
}

/// A device bus and its address, if set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceBus {
    /// Which bus.
    pub kind: BusKind,
    /// The address on it (`0000:00:01.0`, `0:0:0:1`), if set.
    pub address: Option<String>,
}

/// What a tagged device is (Nova's `DeviceMetadata` subclasses). A field
/// that is `None` was not set on the object; `Some(None)` was set to null.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceKind {
    /// `NetworkInterfaceMetadata`
    Nic {
        /// MAC address, lower case.
        mac: String,
        /// VLAN, if set.
        vlan: Option<i64>,
        /// `vf_trusted` (false when not set).
        vf_trusted: bool,
    },
    /// `DiskMetadata`
    Disk {
        /// `serial`, if set.
        serial: Option<Option<String>>,
        /// `path`, if set.
        path: Option<Option<String>>,
    },
    /// `ShareMetadata` (shown from the 2025-04-04 version on).
    Share {
        /// `share_id`
        share_id: Option<String>,
        /// `tag`
        tag: Option<String>,
    },
    /// The base `DeviceMetadata`: Nova leaves it out.
    Unknown,
}

/// A device of Nova's `InstanceDeviceMetadata`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// The bus, if set (Nova shows `none` / `none` without one).
    pub bus: Option<DeviceBus>,
    /// What it is.
    pub kind: DeviceKind,
    /// Its tags, if set.
    pub tags: Option<Vec<String>>,
}

impl Instance {
    /// The first fixed IPv4 over all ports, in file order (EC2 `local-ipv4`).
    pub fn first_fixed_ipv4(&self) -> Option<IpAddr> {
        self.ports
            .iter()
            .flat_map(|p| p.fixed_ips.iter())
            .copied()
            .find(IpAddr::is_ipv4)
    }
}

/// A port together with the instance owning it (`device_id` = `instance.uuid`,
/// tenant = `instance.project`).
#[derive(Debug, Clone, Copy)]
pub struct PortRef<'a> {
    /// The owning instance.
    pub instance: &'a Instance,
    /// The port.
    pub port: &'a Port,
}

/// (instance index, port index) into `Inventory::instances`.
type Slot = (usize, usize);

/// The loaded, validated, indexed inventory. Immutable after load.
#[derive(Debug)]
pub struct Inventory {
    dhcp_domain: String,
    networks: Vec<Network>,
    routers: Vec<Router>,
    instances: Vec<Instance>,
    by_uuid: HashMap<String, usize>,
    by_network: HashMap<String, usize>,
    by_router: HashMap<String, usize>,
    by_net_ip: HashMap<(String, IpAddr), Slot>,
    by_net_mac: HashMap<(String, [u8; 6]), Vec<Slot>>,
    by_ip: HashMap<IpAddr, Vec<usize>>,
    ports_of_network: HashMap<String, Vec<Slot>>,
}

impl Inventory {
    /// Read and validate an inventory file.
    ///
    /// An empty (or whitespace-only) file is refused although it is valid
    /// TOML for "no instances": it is what a reload sees between a writer's
    /// `O_TRUNC` and its first `write(2)`, and accepting it would answer 404
    /// to every VM until the next poll. A deliberately empty inventory needs
    /// one key, e.g. `instance = []`.
    ///
    /// # Errors
    /// [`InventoryError::Io`] if the file cannot be read,
    /// [`InventoryError::Parse`] if it is empty, otherwise as
    /// [`Inventory::from_toml_str`].
    pub fn load(path: &Path) -> Result<Inventory, InventoryError> {
        let text = std::fs::read_to_string(path).map_err(|source| InventoryError::Io {
            path: path.to_owned(),
            source,
        })?;
        if text.trim().is_empty() {
            return Err(InventoryError::Parse {
                message: format!("{} is empty (being rewritten?)", path.display()),
            });
        }
        Self::from_toml_str(&text)
    }

    /// Parse and validate inventory TOML.
    ///
    /// # Errors
    /// [`InventoryError::Parse`] for TOML/schema errors (with line and column),
    /// [`InventoryError::Invalid`] naming the first key that fails validation.
    pub fn from_toml_str(s: &str) -> Result<Inventory, InventoryError> {
        let f: file::InventoryFile = toml::from_str(s).map_err(|e| InventoryError::Parse {
            message: e.to_string(),
        })?;
        Self::from_file(f)
    }

    fn from_file(f: file::InventoryFile) -> Result<Inventory, InventoryError> {
        let mut networks = Vec::with_capacity(f.network.len());
        let mut by_network = HashMap::new();
        for (ni, n) in f.network.into_iter().enumerate() {
            let key = format!("network[{ni}]");
            let network = convert_network(&key, n)?;
            if by_network.insert(network.id.clone(), ni).is_some() {
                return Err(invalid(format!("{key}.id"), "duplicate network id"));
            }
            networks.push(network);
        }

        let mut routers = Vec::with_capacity(f.router.len());
        let mut by_router = HashMap::new();
        for (ri, r) in f.router.into_iter().enumerate() {
            let key = format!("router[{ri}]");
            require_id(&format!("{key}.id"), &r.id)?;
            for (i, n) in r.networks.iter().enumerate() {
                if !by_network.contains_key(n) {
                    return Err(invalid(
                        format!("{key}.networks[{i}]"),
                        format!("unknown network {n:?}"),
                    ));
                }
            }
            if by_router.insert(r.id.clone(), ri).is_some() {
                return Err(invalid(format!("{key}.id"), "duplicate router id"));
            }
            routers.push(Router {
                id: r.id,
                networks: r.networks,
            });
        }

        let mut instances = Vec::with_capacity(f.instance.len());
        let mut by_uuid = HashMap::new();
        let mut ec2_ids: HashMap<u32, usize> = HashMap::new();
        let mut port_ids: HashMap<String, String> = HashMap::new();
        let mut by_net_ip = HashMap::new();
        let mut by_net_mac: HashMap<(String, [u8; 6]), Vec<Slot>> = HashMap::new();
        let mut by_ip: HashMap<IpAddr, Vec<usize>> = HashMap::new();
        let mut ports_of_network: HashMap<String, Vec<Slot>> = HashMap::new();
        for (ii, inst) in f.instance.into_iter().enumerate() {
            let key = format!("instance[{ii}]");
            let instance = convert_instance(&key, inst, &by_network)?;
            if by_uuid.insert(instance.uuid.clone(), ii).is_some() {
                return Err(invalid(format!("{key}.uuid"), "duplicate instance uuid"));
            }
            if let Some(other) = ec2_ids.insert(instance.ec2_id, ii) {
                return Err(invalid(
                    format!("{key}.ec2_id"),
                    format!(
                        "EC2 id {:#010x} also used by instance[{other}]; set ec2_id explicitly",
                        instance.ec2_id
                    ),
                ));
            }
            for (pi, p) in instance.ports.iter().enumerate() {
                let pkey = format!("{key}.port[{pi}]");
                if let Some(prev) = port_ids.insert(p.id.clone(), pkey.clone()) {
                    return Err(invalid(
                        format!("{pkey}.id"),
                        format!("duplicate port id (also {prev})"),
                    ));
                }
                for (xi, ip) in p.fixed_ips.iter().enumerate() {
                    if by_net_ip
                        .insert((p.network.clone(), *ip), (ii, pi))
                        .is_some()
                    {
                        return Err(invalid(
                            format!("{pkey}.fixed_ips[{xi}]"),
                            format!("{ip} is already used on network {}", p.network),
                        ));
                    }
                    if !p.is_compute() {
                        continue;
                    }
                    let owners = by_ip.entry(*ip).or_default();
                    if !owners.contains(&ii) {
                        owners.push(ii);
                    }
                }
                let macs = by_net_mac.entry((p.network.clone(), p.mac)).or_default();
                if !macs.is_empty() {
                    return Err(invalid(
                        format!("{pkey}.mac"),
                        format!("MAC already used on network {}", p.network),
                    ));
                }
                macs.push((ii, pi));
                if p.is_compute() {
                    ports_of_network
                        .entry(p.network.clone())
                        .or_default()
                        .push((ii, pi));
                }
            }
            instances.push(instance);
        }
        // Non-compute ports took part in the duplicate checks but are not
        // answers to lookups.
        by_net_ip.retain(|_, (ii, pi)| instances[*ii].ports[*pi].is_compute());
        by_net_mac.retain(|_, v| {
            v.retain(|(ii, pi)| instances[*ii].ports[*pi].is_compute());
            !v.is_empty()
        });

        Ok(Inventory {
            dhcp_domain: f.dhcp_domain,
            networks,
            routers,
            instances,
            by_uuid,
            by_network,
            by_router,
            by_net_ip,
            by_net_mac,
            by_ip,
            ports_of_network,
        })
    }

    /// A view of one instance and the networks its ports are on, for the
    /// API's per-request rendering from another source (Nova's database).
    /// Only the lookups the API makes are indexed (by instance UUID and by
    /// network id); the agent's port lookups and `instance_by_ip` see nothing.
    /// Ports naming a network not in `networks` render no `network_data.json`
    /// entry, as the inventory file's validation would have refused them.
    pub fn of_one(dhcp_domain: String, networks: Vec<Network>, instance: Instance) -> Inventory {
        let mut by_network = HashMap::new();
        for (i, n) in networks.iter().enumerate() {
            by_network.entry(n.id.clone()).or_insert(i);
        }
        let mut by_uuid = HashMap::new();
        by_uuid.insert(instance.uuid.clone(), 0);
        Inventory {
            dhcp_domain,
            networks,
            routers: Vec::new(),
            instances: vec![instance],
            by_uuid,
            by_network,
            by_router: HashMap::new(),
            by_net_ip: HashMap::new(),
            by_net_mac: HashMap::new(),
            by_ip: HashMap::new(),
            ports_of_network: HashMap::new(),
        }
    }

    /// An inventory with nothing in it (every identified request is a 404).
    pub fn empty() -> Inventory {
        Inventory {
            dhcp_domain: String::new(),
            networks: Vec::new(),
            routers: Vec::new(),
            instances: Vec::new(),
            by_uuid: HashMap::new(),
            by_network: HashMap::new(),
            by_router: HashMap::new(),
            by_net_ip: HashMap::new(),
            by_net_mac: HashMap::new(),
            by_ip: HashMap::new(),
            ports_of_network: HashMap::new(),
        }
    }

    /// The `dhcp_domain` appended to hostnames (`""` = none).
    pub fn dhcp_domain(&self) -> &str {
        &self.dhcp_domain
    }

    /// The instance with this UUID.
    pub fn instance(&self, uuid: &str) -> Option<&Instance> {
        self.by_uuid.get(uuid).map(|&i| &self.instances[i])
    }

    /// The network with this UUID.
    pub fn network(&self, id: &str) -> Option<&Network> {
        self.by_network.get(id).map(|&i| &self.networks[i])
    }

    /// Networks a router is attached to (empty if unknown router).
    pub fn router_networks(&self, router_id: &str) -> &[String] {
        self.by_router
            .get(router_id)
            .map_or(&[], |&i| self.routers[i].networks.as_slice())
    }

    fn port_ref(&self, (ii, pi): Slot) -> PortRef<'_> {
        let instance = &self.instances[ii];
        PortRef {
            instance,
            port: &instance.ports[pi],
        }
    }

    /// Compute ports on any of `networks` carrying fixed IP `ip` (IPv4-mapped
    /// v6 is NOT converted here). At most one per network.
    pub fn ports_by_ip(&self, networks: &[&str], ip: IpAddr) -> Vec<PortRef<'_>> {
        networks
            .iter()
            .filter_map(|n| self.by_net_ip.get(&((*n).to_owned(), ip)))
            .map(|&s| self.port_ref(s))
            .collect()
    }

    /// Compute ports on any of `networks` with this MAC.
    pub fn ports_by_mac(&self, networks: &[&str], mac: [u8; 6]) -> Vec<PortRef<'_>> {
        networks
            .iter()
            .filter_map(|n| self.by_net_mac.get(&((*n).to_owned(), mac)))
            .flatten()
            .map(|&s| self.port_ref(s))
            .collect()
    }

    /// Instances with a compute port carrying this IP on any network (API
    /// direct mode). More than one means overlapping networks: ambiguous.
    pub fn instance_by_ip(&self, ip: IpAddr) -> Vec<&Instance> {
        self.by_ip
            .get(&ip)
            .map(|v| v.iter().map(|&i| &self.instances[i]).collect())
            .unwrap_or_default()
    }

    /// All compute ports of a network.
    pub fn network_ports(&self, network: &str) -> Vec<PortRef<'_>> {
        self.ports_of_network
            .get(network)
            .map(|v| v.iter().map(|&s| self.port_ref(s)).collect())
            .unwrap_or_default()
    }

    /// All instances, in file order.
    pub fn instances(&self) -> impl Iterator<Item = &Instance> {
        self.instances.iter()
    }

    /// All networks, in file order.
    pub fn networks(&self) -> impl Iterator<Item = &Network> {
        self.networks.iter()
    }

    /// All routers, in file order.
    pub fn routers(&self) -> impl Iterator<Item = &Router> {
        self.routers.iter()
    }
}

fn require_id(key: &str, id: &str) -> Result<(), InventoryError> {
    if id.trim().is_empty() {
        return Err(invalid(key, "must not be empty"));
    }
    if id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(key, "must not contain whitespace"));
    }
    Ok(())
}

fn parse_ip(key: &str, s: &str) -> Result<IpAddr, InventoryError> {
    s.parse()
        .map_err(|_| invalid(key, format!("{s:?} is not an IP address")))
}

fn convert_network(key: &str, n: file::NetworkFile) -> Result<Network, InventoryError> {
    require_id(&format!("{key}.id"), &n.id)?;
    require_id(&format!("{key}.project"), &n.project)?;
    let mut subnets = Vec::with_capacity(n.subnet.len());
    for (si, s) in n.subnet.into_iter().enumerate() {
        let skey = format!("{key}.subnet[{si}]");
        require_id(&format!("{skey}.id"), &s.id)?;
        let cidr = Cidr::parse(&s.cidr).ok_or_else(|| {
            invalid(
                format!("{skey}.cidr"),
                format!("{:?} is not a CIDR", s.cidr),
            )
        })?;
        let version = cidr.version();
        if let Some(v) = s.ip_version {
            if v != version {
                return Err(invalid(
                    format!("{skey}.ip_version"),
                    format!("{v} does not match cidr {cidr}"),
                ));
            }
        }
        let family = |k: String, ip: IpAddr| {
            if (ip.is_ipv4() && version == 4) || (ip.is_ipv6() && version == 6) {
                Ok(ip)
            } else {
                Err(invalid(k, format!("{ip} is not IPv{version}")))
            }
        };
        let gateway = match &s.gateway {
            Some(g) => {
                let k = format!("{skey}.gateway");
                Some(family(k.clone(), parse_ip(&k, g)?)?)
            }
            None => None,
        };
        let dns = s
            .dns
            .iter()
            .enumerate()
            .map(|(i, d)| parse_ip(&format!("{skey}.dns[{i}]"), d))
            .collect::<Result<Vec<_>, _>>()?;
        let ipv6_mode = match s.ipv6_mode.as_deref() {
            None => None,
            Some(m) => {
                let k = format!("{skey}.ipv6_mode");
                if version != 6 {
                    return Err(invalid(k, "only valid on IPv6 subnets"));
                }
                Some(match m {
                    "slaac" => Ipv6Mode::Slaac,
                    "dhcpv6-stateful" => Ipv6Mode::Dhcpv6Stateful,
                    "dhcpv6-stateless" => Ipv6Mode::Dhcpv6Stateless,
                    _ => {
                        return Err(invalid(
                            k,
                            format!("{m:?}: expected slaac, dhcpv6-stateful or dhcpv6-stateless"),
                        ))
                    }
                })
            }
        };
        let mut routes = Vec::with_capacity(s.routes.len());
        for (ri, r) in s.routes.iter().enumerate() {
            let rkey = format!("{skey}.routes[{ri}]");
            let destination = Cidr::parse(&r.destination).ok_or_else(|| {
                invalid(
                    format!("{rkey}.destination"),
                    format!("{:?} is not a CIDR", r.destination),
                )
            })?;
            if destination.version() != version {
                return Err(invalid(
                    format!("{rkey}.destination"),
                    format!("{destination} is not IPv{version}"),
                ));
            }
            let k = format!("{rkey}.nexthop");
            let nexthop = family(k.clone(), parse_ip(&k, &r.nexthop)?)?;
            routes.push(Route {
                destination,
                nexthop,
            });
        }
        subnets.push(Subnet {
            id: s.id,
            cidr,
            gateway,
            dns,
            ip_version: version,
            dhcp: s.dhcp,
            dhcp_server: s.dhcp,
            ipv6_mode,
            routes,
        });
    }
    Ok(Network {
        id: n.id,
        name: n.name,
        project: n.project,
        mtu: n.mtu,
        subnets,
    })
}

/// Default EC2 id: the UUID's first 8 hex digits, else 4 bytes of SHA-256.
fn derive_ec2_id(uuid: &str) -> u32 {
    let head = uuid.get(..8).unwrap_or("");
    if head.len() == 8 && head.bytes().all(|b| b.is_ascii_hexdigit()) {
        if let Ok(v) = u32::from_str_radix(head, 16) {
            return v;
        }
    }
    let d = Sha256::digest(uuid.as_bytes());
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

fn convert_instance(
    key: &str,
    i: file::InstanceFile,
    networks: &HashMap<String, usize>,
) -> Result<Instance, InventoryError> {
    require_id(&format!("{key}.uuid"), &i.uuid)?;
    require_id(&format!("{key}.project"), &i.project)?;
    if i.hostname.is_empty() {
        return Err(invalid(format!("{key}.hostname"), "must not be empty"));
    }
    let user_data = match (i.user_data, i.user_data_b64) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                format!("{key}.user_data_b64"),
                "set either user_data or user_data_b64, not both",
            ))
        }
        (Some(t), None) => Some(t.into_bytes()),
        (None, Some(b)) => Some(
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .map_err(|e| invalid(format!("{key}.user_data_b64"), format!("not base64: {e}")))?,
        ),
        (None, None) => None,
    };
    let floating_ips = i
        .floating_ips
        .iter()
        .enumerate()
        .map(|(n, s)| parse_ip(&format!("{key}.floating_ips[{n}]"), s))
        .collect::<Result<Vec<_>, _>>()?;
    let mut keys = Vec::with_capacity(i.key.len());
    for (ki, k) in i.key.into_iter().enumerate() {
        let kkey = format!("{key}.key[{ki}]");
        if k.name.is_empty() {
            return Err(invalid(format!("{kkey}.name"), "must not be empty"));
        }
        if k.kind != "ssh" && k.kind != "x509" {
            return Err(invalid(
                format!("{kkey}.type"),
                format!("{:?}: expected ssh or x509", k.kind),
            ));
        }
        keys.push(Key {
            name: k.name,
            kind: k.kind,
            data: k.data,
        });
    }
    let mut ports = Vec::with_capacity(i.port.len());
    for (pi, p) in i.port.into_iter().enumerate() {
        let pkey = format!("{key}.port[{pi}]");
        require_id(&format!("{pkey}.id"), &p.id)?;
        if !networks.contains_key(&p.network) {
            return Err(invalid(
                format!("{pkey}.network"),
                format!("unknown network {:?}", p.network),
            ));
        }
        let mac = net::parse_mac(&p.mac)
            .ok_or_else(|| invalid(format!("{pkey}.mac"), format!("{:?} is not a MAC", p.mac)))?;
        let mut fixed_ips = Vec::with_capacity(p.fixed_ips.len());
        for (xi, s) in p.fixed_ips.iter().enumerate() {
            let ip = parse_ip(&format!("{pkey}.fixed_ips[{xi}]"), s)?;
            if fixed_ips.contains(&ip) {
                return Err(invalid(
                    format!("{pkey}.fixed_ips[{xi}]"),
                    format!("{ip} listed twice"),
                ));
            }
            fixed_ips.push(ip);
        }
        let devname = p
            .devname
            .unwrap_or_else(|| format!("tap{}", p.id.chars().take(11).collect::<String>()));
        ports.push(Port {
            id: p.id,
            network: p.network,
            mac,
            fixed_ips,
            device_owner: p.device_owner,
            vif_type: p.vif_type,
            devname,
        });
    }
    let ec2_id = i.ec2_id.unwrap_or_else(|| derive_ec2_id(&i.uuid));
    Ok(Instance {
        name: i.name.unwrap_or_else(|| i.hostname.clone()),
        reservation_id: i
            .reservation_id
            .unwrap_or_else(|| format!("r-{ec2_id:08x}")),
        uuid: i.uuid,
        hostname: i.hostname,
        project: i.project,
        availability_zone: i.availability_zone,
        launch_index: i.launch_index,
        flavor: i.flavor,
        ec2_id,
        image_ec2_id: Some(i.image_ec2_id),
        kernel_ec2_id: i.kernel_ec2_id,
        ramdisk_ec2_id: i.ramdisk_ec2_id,
        root_device_name: i.root_device_name,
        default_ephemeral_device: None,
        default_swap_device: None,
        block_devices: Vec::new(),
        devices: Vec::new(),
        dedicated_cpus: Vec::new(),
        security_groups: i.security_groups,
        user_data,
        meta: i.meta,
        image_ref: i.image_ref.unwrap_or_default(),
        boot_roles: i.boot_roles.unwrap_or_default(),
        floating_ips,
        keys,
        ports,
    })
}

#[cfg(test)]
mod tests;
