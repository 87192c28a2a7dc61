//! `metaproxy inventory synth`: a synthetic inventory for boot storms.
//!
//! VM `i` gets a fixed IP in [`SYNTH_SUPERNET`] (127.16.0.0/12, loopback, so the
//! storm can `bind(2)` it as a source address without configuring anything),
//! UUID, hostname `vm-<i>`, MAC, port id, ssh key and user-data all derived
//! from `i`, so the storm and the daemons agree on who is who and any answer
//! can be checked against the VM that asked. Every value that a guest sees
//! (uuid, hostname, key, user-data, address) differs between VMs, so a
//! wrong-VM answer is detectable on every request.
//!
//! Layout: VMs are dealt round-robin over `networks` (VM `i` is on network
//! `i % networks`), so consecutive boots hit different networks as in a real
//! storm. Each network owns one aligned block of the supernet, at least a /24,
//! large enough for its share; host numbers skip `.0` and `.255` in every /24
//! and `.1` of the block (the gateway). Routers take networks round-robin
//! (router `r` gets every network `j` with `j % routers == r`). Subnets have
//! `dhcp = false`: Neutron refuses DHCP on loopback subnets.
//!
//! The TOML is written with `format!` rather than through serde: the schema is
//! fixed, every string is generated here (no escaping needed), and it keeps
//! 50 000 VMs well under a second. Rejected: serialising `file::InventoryFile`,
//! which would need `Serialize` on the loader's structs for this one tool.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use base64::Engine as _;

/// The block VM addresses are carved from.
pub const SYNTH_SUPERNET: (Ipv4Addr, u8) = (Ipv4Addr::new(127, 16, 0, 0), 12);
/// Usable host numbers per /24 (`.1` ..= `.254`).
const HOSTS_PER_24: u32 = 254;
/// Smallest block per network: a /24.
const MIN_BLOCK_BITS: u32 = 8;

/// What to generate.
#[derive(Debug, Clone, Copy)]
pub struct SynthSpec {
    /// Instances, `vm-0` .. `vm-<vms-1>`.
    pub vms: u32,
    /// Networks the VMs are dealt over (at least 1).
    pub networks: u32,
    /// Routers; each takes every `routers`-th network (0 = none).
    pub routers: u32,
}

/// Why a spec cannot be generated.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// `networks` is 0.
    #[error("--networks must be at least 1")]
    NoNetworks,
    #[error("{vms} VMs on {networks} networks do not fit in 127.16.0.0/12 (each network needs a /{prefix})")]
    /// The per-network blocks exceed the supernet.
    DoesNotFit {
        /// VMs asked for.
        vms: u32,
        /// Networks asked for.
        networks: u32,
        /// Prefix length each network's block would need.
        prefix: u32,
    },
}

/// The address plan: one aligned block of `2^block_bits` addresses per network.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Number of networks.
    pub networks: u32,
    /// log2 of each network's block size (at least 8: a /24).
    pub block_bits: u32,
}

impl Plan {
    /// Size the per-network block for `spec`.
    ///
    /// # Errors
    /// [`SynthError`] when there are no networks or the blocks exceed the supernet.
    pub fn new(spec: &SynthSpec) -> Result<Plan, SynthError> {
        if spec.networks == 0 {
            return Err(SynthError::NoNetworks);
        }
        let per_net = spec.vms.div_ceil(spec.networks);
        // +1: the gateway takes the block's first usable host number.
        let rows = (per_net + 1).div_ceil(HOSTS_PER_24).max(1);
        let block_bits = MIN_BLOCK_BITS + rows.next_power_of_two().trailing_zeros();
        let total_bits = 32 - u32::from(SYNTH_SUPERNET.1);
        let fits = block_bits <= total_bits
            && u64::from(spec.networks) << block_bits <= 1u64 << total_bits;
        if !fits {
            return Err(SynthError::DoesNotFit {
                vms: spec.vms,
                networks: spec.networks,
                prefix: 32 - block_bits.min(32),
            });
        }
        Ok(Plan {
            networks: spec.networks,
            block_bits,
        })
    }

    fn block_start(&self, net: u32) -> u32 {
        u32::from(SYNTH_SUPERNET.0) + (net << self.block_bits)
    }

    /// `n`-th usable host of a network's block (0 = gateway).
    fn host(&self, net: u32, n: u32) -> Ipv4Addr {
        let row = n / HOSTS_PER_24;
        let col = n % HOSTS_PER_24 + 1;
        Ipv4Addr::from(self.block_start(net) + row * 256 + col)
    }

    /// Network of VM `i`.
    pub fn network_of(&self, i: u32) -> u32 {
        i % self.networks
    }

    /// Fixed IP of VM `i`.
    pub fn vm_ip(&self, i: u32) -> Ipv4Addr {
        self.host(self.network_of(i), i / self.networks + 1)
    }

    /// Gateway of network `net`.
    pub fn gateway(&self, net: u32) -> Ipv4Addr {
        self.host(net, 0)
    }

    /// CIDR of network `net`.
    pub fn cidr(&self, net: u32) -> String {
        format!(
            "{}/{}",
            Ipv4Addr::from(self.block_start(net)),
            32 - self.block_bits
        )
    }
}

/// Instance UUID of VM `i`: its first eight hex digits are `i + 1`, so the
/// derived EC2 id (`i-%08x`) is `i + 1` and unique.
pub fn vm_uuid(i: u32) -> String {
    format!("{:08x}-5707-4000-8000-{:012x}", u64::from(i) + 1, i)
}

/// Hostname of VM `i`.
pub fn vm_hostname(i: u32) -> String {
    format!("vm-{i}")
}

fn network_id(j: u32) -> String {
    format!("5707ae75-0000-4000-8000-{j:012x}")
}

fn subnet_id(j: u32) -> String {
    format!("5707ae75-0000-4000-8001-{j:012x}")
}

fn router_id(r: u32) -> String {
    format!("5707ae75-0000-4000-8002-{r:012x}")
}

fn port_id(i: u32) -> String {
    format!("5707ae75-0000-4000-8003-{i:012x}")
}

/// Project of network `j` (and of the VMs on it).
fn project_id(j: u32) -> String {
    format!("5707{j:028x}")
}

/// Write the inventory TOML for `spec`.
///
/// # Errors
/// As [`Plan::new`].
pub fn synth_toml(spec: &SynthSpec) -> Result<String, SynthError> {
    let plan = Plan::new(spec)?;
    let mut out = String::with_capacity(1024 * (spec.vms as usize + spec.networks as usize));
    let _ = writeln!(
        out,
        "# Synthetic boot-storm inventory: metaproxy inventory synth --vms {} --networks {} --routers {}\n\
         dhcp_domain = \"novalocal\"\n",
        spec.vms, spec.networks, spec.routers
    );
    for j in 0..spec.networks {
        let _ = writeln!(
            out,
            "[[network]]\nid = \"{}\"\nname = \"storm-net-{j}\"\nproject = \"{}\"\nmtu = 1500\n\n\
             [[network.subnet]]\nid = \"{}\"\ncidr = \"{}\"\ngateway = \"{}\"\ndhcp = false\n",
            network_id(j),
            project_id(j),
            subnet_id(j),
            plan.cidr(j),
            plan.gateway(j),
        );
    }
    for r in 0..spec.routers {
        let nets: Vec<String> = (r..spec.networks)
            .step_by(spec.routers as usize)
            .map(|j| format!("\"{}\"", network_id(j)))
            .collect();
        let _ = writeln!(
            out,
            "[[router]]\nid = \"{}\"\nnetworks = [{}]\n",
            router_id(r),
            nets.join(", ")
        );
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    for i in 0..spec.vms {
        let net = plan.network_of(i);
        let key = b64.encode(format!("metaproxy-storm-key-{i:010}"));
        let mac = [(i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff];
        let _ = writeln!(
            out,
            "[[instance]]\nuuid = \"{uuid}\"\nhostname = \"vm-{i}\"\nproject = \"{project}\"\n\
             availability_zone = \"nova\"\nuser_data = \"#cloud-config\\n# storm vm-{i}\\nhostname: vm-{i}\\n\"\n\n\
             [[instance.key]]\nname = \"storm-key\"\ndata = \"ssh-ed25519 {key} vm-{i}@storm\"\n\n\
             [[instance.port]]\nid = \"{port}\"\nnetwork = \"{network}\"\n\
             mac = \"fa:16:3e:{:02x}:{:02x}:{:02x}\"\nfixed_ips = [\"{ip}\"]\nvif_type = \"ovs\"\n",
            mac[0],
            mac[1],
            mac[2],
            uuid = vm_uuid(i),
            project = project_id(net),
            port = port_id(i),
            network = network_id(net),
            ip = plan.vm_ip(i),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_skip_network_broadcast_and_gateway() {
        let plan = Plan::new(&SynthSpec {
            vms: 1000,
            networks: 1,
            routers: 0,
        })
        .unwrap();
        assert_eq!(plan.cidr(0), "127.16.0.0/22");
        assert_eq!(plan.gateway(0), Ipv4Addr::new(127, 16, 0, 1));
        assert_eq!(plan.vm_ip(0), Ipv4Addr::new(127, 16, 0, 2));
        assert_eq!(plan.vm_ip(252), Ipv4Addr::new(127, 16, 0, 254));
        assert_eq!(plan.vm_ip(253), Ipv4Addr::new(127, 16, 1, 1));
    }

    #[test]
    fn too_many_networks_is_an_error() {
        let e = Plan::new(&SynthSpec {
            vms: 10,
            networks: 4097,
            routers: 1,
        });
        assert!(matches!(e, Err(SynthError::DoesNotFit { .. })));
        assert!(Plan::new(&SynthSpec {
            vms: 10,
            networks: 4096,
            routers: 1
        })
        .is_ok());
    }

    #[test]
    fn small_spec_loads_with_empty_router() {
        let s = synth_toml(&SynthSpec {
            vms: 3,
            networks: 2,
            routers: 3,
        })
        .unwrap();
        let inv = crate::inventory::Inventory::from_toml_str(&s).unwrap();
        assert_eq!(inv.instances().count(), 3);
        // Router 2 of 3 with 2 networks has none; that is allowed.
        assert_eq!(inv.routers().count(), 3);
    }
}
