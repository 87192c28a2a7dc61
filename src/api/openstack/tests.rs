//! `meta_data.json` against the renderer it replaced: a tree of owned
//! `Json` values built, then written (`oracle`, the code as it was before
//! the document was written straight into its buffer). Byte for byte the
//! same but for the random seed, for instances with and without keys,
//! metadata, devices of every kind and pinned CPUs, at every version; and
//! `network_data.json` the same way, over ports on IPv4, IPv6 (every
//! mode), DHCP, routes, shared DNS servers and networks Nova would not show.

use base64::Engine as _;

use super::OPENSTACK_VERSIONS;
use crate::api::RenderCtx;
use crate::inventory::{BusKind, Device, DeviceBus, DeviceKind, Instance, Inventory};

mod oracle {
    use base64::Engine as _;

    use super::super::{
        at_least, EPOXY, GRIZZLY, LIBERTY, NEWTON_ONE, OCATA, RANDOM_SEED_BYTES, ROCKY, VICTORIA,
    };
    use std::net::IpAddr;

    use super::super::LEGACY_EXPOSED_VIF_TYPES;
    use crate::api::json::Json;
    use crate::api::RenderCtx;
    use crate::inventory::{Device, DeviceKind};

    /// `meta_data.json`. Fails only if the OS random source fails.
    pub(super) fn meta_data(
        ctx: &RenderCtx<'_>,
        version: usize,
    ) -> Result<String, getrandom::Error> {
        let inst = ctx.instance;
        let mut md: Vec<(String, Json)> = Vec::with_capacity(12);
        md.push(("uuid".into(), Json::str(&inst.uuid)));
        if !inst.meta.is_empty() {
            let meta = inst
                .meta
                .iter()
                .map(|(k, v)| (k.clone(), Json::str(v)))
                .collect();
            md.push(("meta".into(), Json::Obj(meta)));
        }
        if let Some(key) = inst.keys.first() {
            md.push((
                "public_keys".into(),
                Json::Obj(vec![(key.name.clone(), Json::str(&key.data))]),
            ));
            md.push((
                "keys".into(),
                Json::Arr(vec![Json::Obj(vec![
                    ("name".into(), Json::str(&key.name)),
                    ("type".into(), Json::str(&key.kind)),
                    ("data".into(), Json::str(&key.data)),
                ])]),
            ));
        }
        md.push(("hostname".into(), Json::str(&*ctx.hostname)));
        md.push(("name".into(), Json::str(&inst.name)));
        md.push((
            "launch_index".into(),
            Json::Int(i64::from(inst.launch_index)),
        ));
        md.push((
            "availability_zone".into(),
            inst.availability_zone
                .as_deref()
                .map_or(Json::Null, Json::str),
        ));
        if at_least(version, GRIZZLY) {
            let mut seed = [0u8; RANDOM_SEED_BYTES];
            crate::rt::fill_random(&mut seed)?;
            md.push((
                "random_seed".into(),
                Json::Str(base64::engine::general_purpose::STANDARD.encode(seed)),
            ));
        }
        if at_least(version, LIBERTY) {
            md.push(("project_id".into(), Json::str(&inst.project)));
        }
        if at_least(version, NEWTON_ONE) {
            md.push(("devices".into(), devices(&inst.devices, version)));
        }
        if at_least(version, VICTORIA) {
            let cpus = inst.dedicated_cpus.iter().map(|c| Json::Int(*c)).collect();
            md.push(("dedicated_cpus".into(), Json::Arr(cpus)));
        }
        Ok(Json::Obj(md).to_python_string())
    }

    /// `devices` (`InstanceMetadata._get_device_metadata`): per device, the
    /// keys in Nova's order; a device on an unknown bus or of an unknown type is
    /// left out, and so is a NIC with nothing to show (no tags, and no `vlan` or
    /// `vf_trusted` at this version). `vlan` shows from Ocata, `vf_trusted` from
    /// Rocky, shares from Epoxy.
    fn devices(devs: &[Device], version: usize) -> Json {
        let mut out = Vec::with_capacity(devs.len());
        for d in devs {
            let (bus, address) = match &d.bus {
                None => ("none", "none"),
                Some(b) => match b.kind.name() {
                    Some(name) => (name, b.address.as_deref().unwrap_or("none")),
                    None => continue,
                },
            };
            let mut m: Vec<(String, Json)> = Vec::with_capacity(8);
            let opt = |v: &Option<String>| v.as_deref().map_or(Json::Null, Json::str);
            match &d.kind {
                DeviceKind::Nic {
                    mac,
                    vlan,
                    vf_trusted,
                } => {
                    if let (true, Some(v)) = (at_least(version, OCATA), vlan) {
                        m.push(("vlan".into(), Json::Int(*v)));
                    }
                    if at_least(version, ROCKY) {
                        m.push((
                            "vf_trusted".into(),
                            Json::Value(serde_json::Value::Bool(*vf_trusted)),
                        ));
                    }
                    // Shown only with something to show (m holds vlan/vf_trusted).
                    if d.tags.is_none() && m.is_empty() {
                        continue;
                    }
                    m.push(("type".into(), Json::str("nic")));
                    m.push(("mac".into(), Json::str(mac)));
                }
                DeviceKind::Disk { serial, path } => {
                    m.push(("type".into(), Json::str("disk")));
                    if let Some(s) = serial {
                        m.push(("serial".into(), opt(s)));
                    }
                    if let Some(p) = path {
                        m.push(("path".into(), opt(p)));
                    }
                }
                DeviceKind::Share { share_id, tag } if at_least(version, EPOXY) => {
                    m.push(("type".into(), Json::str("share")));
                    m.push(("share_id".into(), opt(share_id)));
                    m.push(("tag".into(), opt(tag)));
                }
                DeviceKind::Share { .. } | DeviceKind::Unknown => continue,
            }
            m.push(("bus".into(), Json::str(bus)));
            m.push(("address".into(), Json::str(address)));
            if let Some(tags) = &d.tags {
                m.push((
                    "tags".into(),
                    Json::Arr(tags.iter().map(Json::str).collect()),
                ));
            }
            out.push(Json::Obj(m));
        }
        Json::Arr(out)
    }

    fn dns_service(ip: IpAddr) -> Json {
        Json::Obj(vec![
            ("type".into(), Json::str("dns")),
            ("address".into(), Json::Str(ip.to_string())),
        ])
    }

    /// `network_data.json` (`nova.virt.netutils.get_network_metadata`): served for
    /// every version, `{}` when the instance has no ports.
    pub(super) fn network_data(ctx: &RenderCtx<'_>) -> String {
        let inst = ctx.instance;
        if inst.ports.is_empty() {
            return "{}".to_owned();
        }
        let mut links = Vec::new();
        let mut nets = Vec::new();
        let mut services: Vec<IpAddr> = Vec::new();
        let mut net_num = 0usize;
        for port in &inst.ports {
            let Some(network) = ctx.inventory.network(&port.network) else {
                continue;
            };
            // Nova's VIF carries the subnets the port has addresses in, each with
            // the port's addresses there.
            let mut subnets: Vec<(&crate::inventory::Subnet, Vec<IpAddr>)> = Vec::new();
            for s in &network.subnets {
                let ips: Vec<IpAddr> = port
                    .fixed_ips
                    .iter()
                    .copied()
                    .filter(|ip| s.cidr.contains(*ip))
                    .collect();
                if !ips.is_empty() {
                    subnets.push((s, ips));
                }
            }
            if subnets.is_empty() {
                continue;
            }
            let link_id = port.devname.clone();
            let nic_type = port
                .vif_type
                .as_deref()
                .filter(|t| LEGACY_EXPOSED_VIF_TYPES.contains(t))
                .unwrap_or("phy");
            // nova.virt.netutils._get_link_mtu: null when a DHCP port serves it.
            let mtu = if subnets.iter().any(|(s, _)| s.dhcp_server) {
                Json::Null
            } else {
                network.mtu.map_or(Json::Null, |m| Json::Int(i64::from(m)))
            };
            links.push(Json::Obj(vec![
                ("id".into(), Json::str(&link_id)),
                ("vif_id".into(), Json::str(&port.id)),
                ("type".into(), Json::str(nic_type)),
                ("mtu".into(), mtu),
                (
                    "ethernet_mac_address".into(),
                    Json::Str(crate::inventory::net::format_mac(&port.mac)),
                ),
            ]));
            for version in [4u8, 6] {
                let Some((subnet, ips)) = subnets.iter().find(|(s, _)| s.ip_version == version)
                else {
                    continue;
                };
                let id = format!("network{net_num}");
                net_num += 1;
                // As Nova: checked against the list before this subnet's entries
                // are added, so duplicates within one subnet survive.
                let fresh: Vec<IpAddr> = subnet
                    .dns
                    .iter()
                    .copied()
                    .filter(|ip| !services.contains(ip))
                    .collect();
                services.extend(fresh);
                // _get_nets: an ipv6_address_mode wins over DHCP.
                if subnet.dhcp && subnet.ipv6_mode.is_none() {
                    nets.push(Json::Obj(vec![
                        ("id".into(), Json::Str(id)),
                        ("type".into(), Json::Str(format!("ipv{version}_dhcp"))),
                        ("link".into(), Json::str(&link_id)),
                        ("network_id".into(), Json::str(&network.id)),
                    ]));
                    continue;
                }
                let kind = match subnet.ipv6_mode {
                    Some(mode) if version == 6 => format!("ipv6_{}", mode.as_str()),
                    _ => format!("ipv{version}"),
                };
                let mut routes = Vec::new();
                if let Some(gw) = subnet.gateway {
                    let any = if version == 4 { "0.0.0.0" } else { "::" };
                    routes.push(Json::Obj(vec![
                        ("network".into(), Json::str(any)),
                        ("netmask".into(), Json::str(any)),
                        ("gateway".into(), Json::Str(gw.to_string())),
                    ]));
                }
                for r in &subnet.routes {
                    routes.push(Json::Obj(vec![
                        (
                            "network".into(),
                            Json::Str(r.destination.network().to_string()),
                        ),
                        (
                            "netmask".into(),
                            Json::Str(r.destination.netmask().to_string()),
                        ),
                        ("gateway".into(), Json::Str(r.nexthop.to_string())),
                    ]));
                }
                let dns: Vec<Json> = subnet.dns.iter().map(|ip| dns_service(*ip)).collect();
                nets.push(Json::Obj(vec![
                    ("id".into(), Json::Str(id)),
                    ("type".into(), Json::Str(kind)),
                    ("link".into(), Json::str(&link_id)),
                    ("ip_address".into(), Json::Str(ips[0].to_string())),
                    (
                        "netmask".into(),
                        Json::Str(subnet.cidr.netmask().to_string()),
                    ),
                    ("routes".into(), Json::Arr(routes)),
                    ("network_id".into(), Json::str(&network.id)),
                    ("services".into(), Json::Arr(dns)),
                ]));
            }
        }
        Json::Obj(vec![
            ("links".into(), Json::Arr(links)),
            ("networks".into(), Json::Arr(nets)),
            (
                "services".into(),
                Json::Arr(services.into_iter().map(dns_service).collect()),
            ),
        ])
        .to_python_string()
    }
}

/// `"random_seed": "<base64>"` → `"random_seed": "SEED"`, after checking
/// the seed is 512 bytes of base64.
fn mask_seed(doc: &str) -> String {
    const AT: &str = "\"random_seed\": \"";
    let Some(i) = doc.find(AT) else {
        return doc.to_owned();
    };
    let start = i + AT.len();
    let len = doc[start..].find('"').unwrap();
    let seed = base64::engine::general_purpose::STANDARD
        .decode(&doc[start..start + len])
        .unwrap();
    assert_eq!(seed.len(), 512);
    format!("{}SEED{}", &doc[..start], &doc[start + len..])
}

fn instances() -> (Inventory, Vec<Instance>) {
    let inv = Inventory::from_toml_str(
        r##"
[[instance]]
uuid = "00000001-0000-4000-8000-000000000001"
name = "full \"quoted\" \u00e9"
hostname = "full"
project = "p"
availability_zone = "az-1"
launch_index = 3
meta = { role = "web", "k\\ey" = "v\n\u2603", empty = "" }
[[instance.key]]
name = "key-1"
data = "ssh-ed25519 AAAA key@one"
[[instance.key]]
name = "second"
data = "ssh-ed25519 BBBB key@two"

[[instance]]
uuid = "00000002-0000-4000-8000-000000000002"
hostname = "bare"
project = "p"
"##,
    )
    .unwrap();
    let full = inv
        .instance("00000001-0000-4000-8000-000000000001")
        .unwrap()
        .clone();
    let bare = inv
        .instance("00000002-0000-4000-8000-000000000002")
        .unwrap()
        .clone();
    let bus = |kind, address: Option<&str>| {
        Some(DeviceBus {
            kind,
            address: address.map(str::to_owned),
        })
    };
    let nic = |vlan, vf_trusted| DeviceKind::Nic {
        mac: "fa:16:3e:00:00:01".into(),
        vlan,
        vf_trusted,
    };
    let tags = |t: &[&str]| Some(t.iter().map(|s| (*s).to_owned()).collect());
    let mut devices = full.clone();
    devices.dedicated_cpus = vec![2, 3, 3];
    devices.devices = vec![
        Device {
            bus: bus(BusKind::Pci, Some("0000:00:02.0")),
            kind: nic(Some(100), true),
            tags: tags(&["nic1", "t\u{e9}g"]),
        },
        // No tags: shown only from Ocata (vlan) or Rocky (vf_trusted).
        Device {
            bus: bus(BusKind::Pci, None),
            kind: nic(Some(7), false),
            tags: None,
        },
        Device {
            bus: None,
            kind: nic(None, false),
            tags: None,
        },
        Device {
            bus: bus(BusKind::Scsi, Some("0:0:0:1")),
            kind: DeviceKind::Disk {
                serial: Some(Some("disk-1".into())),
                path: Some(None),
            },
            tags: tags(&[]),
        },
        Device {
            bus: bus(BusKind::Ide, None),
            kind: DeviceKind::Disk {
                serial: None,
                path: Some(Some("/dev/sdb".into())),
            },
            tags: None,
        },
        Device {
            bus: bus(BusKind::Unknown, None),
            kind: DeviceKind::Disk {
                serial: None,
                path: None,
            },
            tags: None,
        },
        Device {
            bus: bus(BusKind::Usb, Some("1")),
            kind: DeviceKind::Share {
                share_id: Some("share-1".into()),
                tag: None,
            },
            tags: None,
        },
        Device {
            bus: None,
            kind: DeviceKind::Unknown,
            tags: tags(&["x"]),
        },
    ];
    let mut no_az = devices.clone();
    no_az.availability_zone = None;
    no_az.keys.clear();
    no_az.meta.clear();
    (inv, vec![full, bare, devices, no_az])
}

#[test]
fn meta_data_json_is_what_the_tree_wrote() {
    let (inv, instances) = instances();
    for inst in &instances {
        for hostname in ["full.example.org", "h\u{e9}"] {
            let ctx = RenderCtx {
                inventory: &inv,
                instance: inst,
                hostname: hostname.into(),
                remote_address: "",
                vendor_data: None,
                providers: &[],
                dynamic: None,
            };
            for (version, name) in OPENSTACK_VERSIONS.iter().enumerate() {
                let want = mask_seed(&oracle::meta_data(&ctx, version).unwrap());
                let got = mask_seed(&super::meta_data(&ctx, version).unwrap());
                assert_eq!(got, want, "{} at {}", inst.name, name);
            }
        }
    }
}

const NETWORKS: &str = r#"
[[network]]
id = "n1"
project = "p"
mtu = 9000
[[network.subnet]]
id = "s4"
cidr = "10.0.0.0/24"
gateway = "10.0.0.1"
dns = ["10.0.0.53", "10.0.0.54", "10.0.0.53"]
dhcp = false
routes = [{ destination = "192.168.0.0/16", nexthop = "10.0.0.254" }, { destination = "10.20.0.0/20", nexthop = "10.0.0.253" }]
[[network.subnet]]
id = "s6"
cidr = "fd00:10::/64"
gateway = "fd00:10::1"
dns = ["10.0.0.53", "fd00::53"]
dhcp = false
ipv6_mode = "slaac"
routes = [{ destination = "fd99::/48", nexthop = "fd00:10::fe" }]
[[network.subnet]]
id = "s6b"
cidr = "fd00:11::/64"
dns = ["fd00::54"]
ipv6_mode = "dhcpv6-stateful"
[[network]]
id = "n2"
project = "p"
mtu = 1450
[[network.subnet]]
id = "s2"
cidr = "172.16.0.0/24"
dns = ["10.0.0.53", "172.16.0.53"]
[[network.subnet]]
id = "s2v6"
cidr = "fd00:20::/64"
[[network]]
id = "n3"
project = "p"
[[network.subnet]]
id = "s3"
cidr = "10.3.0.0/24"
dhcp = false

[[instance]]
uuid = "u1"
hostname = "h"
project = "p"
[[instance.port]]
id = "0123456789abcdef"
network = "n1"
mac = "FA:16:3E:00:00:01"
fixed_ips = ["fd00:11::5", "10.0.0.5", "10.0.0.6", "fd00:10::5"]
vif_type = "ovs"
[[instance.port]]
id = "p2"
network = "n2"
mac = "fa:16:3e:00:00:02"
fixed_ips = ["172.16.0.5", "fd00:20::5"]
vif_type = "unbound"
devname = "eth1"
[[instance.port]]
id = "p3"
network = "n2"
mac = "fa:16:3e:00:00:03"
fixed_ips = ["192.0.2.1"]
[[instance.port]]
id = "p4"
network = "n3"
mac = "fa:16:3e:00:00:04"
fixed_ips = ["10.9.0.1"]
[[instance.port]]
id = "p5"
network = "n3"
mac = "fa:16:3e:00:00:05"
fixed_ips = ["10.3.0.9"]
vif_type = "vhostuser"

[[instance]]
uuid = "u2"
hostname = "h2"
project = "p"
[[instance.port]]
id = "p6"
network = "n1"
mac = "fa:16:3e:00:00:06"
fixed_ips = ["fd00:10::6"]

[[instance]]
uuid = "u3"
hostname = "h3"
project = "p"
"#;

#[test]
fn network_data_json_is_what_the_tree_wrote() {
    let inv = Inventory::from_toml_str(NETWORKS).unwrap();
    let plain: Vec<_> = inv.networks().cloned().collect();
    // A DHCP port serving n2's IPv4 subnet: that link's mtu is null.
    let mut dhcp_server = plain.clone();
    for n in &mut dhcp_server {
        if n.id == "n2" {
            n.subnets[0].dhcp_server = true;
        }
    }
    // n3 unknown (a port on a network the Nova source did not find).
    let without_n3: Vec<_> = plain.iter().filter(|n| n.id != "n3").cloned().collect();
    let mut links = 0;
    for uuid in ["u1", "u2", "u3"] {
        let inst = inv.instance(uuid).unwrap();
        let mut reversed = inst.clone();
        reversed.ports.reverse();
        for inst in [inst.clone(), reversed] {
            for networks in [&plain, &dhcp_server, &without_n3] {
                let inv = Inventory::of_one(String::new(), networks.clone(), inst.clone());
                let ctx = RenderCtx {
                    inventory: &inv,
                    instance: &inst,
                    hostname: "h".into(),
                    remote_address: "",
                    vendor_data: None,
                    providers: &[],
                    dynamic: None,
                };
                let want = oracle::network_data(&ctx);
                assert_eq!(super::network_data(&ctx), want, "{uuid}");
                links += want.matches("\"vif_id\"").count();
            }
        }
    }
    assert!(links > 10, "{links}");
}
