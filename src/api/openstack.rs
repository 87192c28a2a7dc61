//! The OpenStack tree (`/openstack/<version>/...`): version gates, the
//! `meta_data.json` and `network_data.json` documents in Nova's key order, and
//! the vendor-data files. `password` is dispatched from `mod.rs` because it is
//! the one path that looks at the method and body.

use std::net::IpAddr;

use base64::Engine as _;

use super::json::{self, Arr, Json, Obj};
use super::vendordata::Provider;
use super::RenderCtx;
use crate::inventory::{Device, DeviceKind};

/// Nova's `OPENSTACK_VERSIONS`; `latest` means the last one.
pub(crate) const OPENSTACK_VERSIONS: [&str; 10] = [
    "2012-08-10", // Folsom
    "2013-04-04", // Grizzly
    "2013-10-17", // Havana
    "2015-10-15", // Liberty
    "2016-06-30", // Newton one
    "2016-10-06", // Newton two
    "2017-02-22", // Ocata
    "2018-08-27", // Rocky
    "2020-10-14", // Victoria
    "2025-04-04", // Epoxy
];

pub(crate) const GRIZZLY: &str = "2013-04-04";
const HAVANA: &str = "2013-10-17";
const LIBERTY: &str = "2015-10-15";
const NEWTON_ONE: &str = "2016-06-30";
pub(crate) const NEWTON_TWO: &str = "2016-10-06";
const OCATA: &str = "2017-02-22";
const ROCKY: &str = "2018-08-27";
const VICTORIA: &str = "2020-10-14";
const EPOXY: &str = "2025-04-04";

/// Size of the per-response `random_seed`, in bytes before base64.
const RANDOM_SEED_BYTES: usize = 512;

/// Nova's `LEGACY_EXPOSED_VIF_TYPES`: shown as the link type; anything else is `phy`.
const LEGACY_EXPOSED_VIF_TYPES: [&str; 8] = [
    "bridge",
    "dvs",
    "hw_veb",
    "hyperv",
    "ovs",
    "tap",
    "vhostuser",
    "vif",
];

/// The `/openstack` listing: versions not after `today` (`YYYY-MM-DD`, UTC),
/// then `latest`. Later versions stay requestable explicitly.
pub(crate) fn version_list(today: &str) -> String {
    let mut v: Vec<&str> = OPENSTACK_VERSIONS
        .iter()
        .copied()
        .filter(|v| *v <= today)
        .collect();
    v.push("latest");
    v.join("\n")
}

/// Index of a requested version (`latest` = newest).
pub(crate) fn version_index(v: &str) -> Option<usize> {
    if v == "latest" {
        return Some(OPENSTACK_VERSIONS.len() - 1);
    }
    OPENSTACK_VERSIONS.iter().position(|x| *x == v)
}

pub(crate) fn at_least(version: usize, required: &str) -> bool {
    OPENSTACK_VERSIONS
        .iter()
        .position(|v| *v == required)
        .is_some_and(|r| version >= r)
}

/// The `/openstack/<version>` listing (`_handle_version`), in Nova's order.
pub(crate) fn version_dir(ctx: &RenderCtx<'_>, version: usize) -> String {
    let mut ret = vec!["meta_data.json"];
    if ctx.instance.user_data.is_some() {
        ret.push("user_data");
    }
    if at_least(version, GRIZZLY) {
        ret.push("password");
    }
    if at_least(version, HAVANA) {
        ret.push("vendor_data.json");
    }
    if at_least(version, LIBERTY) {
        ret.push("network_data.json");
    }
    if at_least(version, NEWTON_TWO) {
        ret.push("vendor_data2.json");
    }
    ret.join("\n")
}

/// `meta_data.json`, written straight into its buffer in Nova's key order.
/// Fails only if the OS random source fails.
pub(crate) fn meta_data(ctx: &RenderCtx<'_>, version: usize) -> Result<String, getrandom::Error> {
    let inst = ctx.instance;
    let key = inst.keys.first();
    // Room for everything but a long key list or many devices, so the
    // buffer is allocated once: the seed alone is 684 characters.
    let mut out = String::with_capacity(
        1024 + key.map_or(0, |k| 2 * k.data.len())
            + inst
                .meta
                .iter()
                .map(|(k, v)| k.len() + v.len() + 8)
                .sum::<usize>()
            + 160 * inst.devices.len(),
    );
    let mut md = Obj::new(&mut out);
    json::str_to(md.key("uuid"), &inst.uuid);
    if !inst.meta.is_empty() {
        let mut meta = Obj::new(md.key("meta"));
        for (k, v) in &inst.meta {
            json::str_to(meta.key(k), v);
        }
        meta.end();
    }
    if let Some(key) = key {
        let mut public = Obj::new(md.key("public_keys"));
        json::str_to(public.key(&key.name), &key.data);
        public.end();
        let mut keys = Arr::new(md.key("keys"));
        let mut k = Obj::new(keys.item());
        json::str_to(k.key("name"), &key.name);
        json::str_to(k.key("type"), &key.kind);
        json::str_to(k.key("data"), &key.data);
        k.end();
        keys.end();
    }
    json::str_to(md.key("hostname"), &ctx.hostname);
    json::str_to(md.key("name"), &inst.name);
    json::int_to(md.key("launch_index"), i64::from(inst.launch_index));
    json::opt_str_to(
        md.key("availability_zone"),
        inst.availability_zone.as_deref(),
    );
    if at_least(version, GRIZZLY) {
        let mut seed = [0u8; RANDOM_SEED_BYTES];
        crate::rt::fill_random(&mut seed)?;
        // Base64 is plain ASCII (no quote, backslash or control): no
        // escaping pass over its 684 characters.
        let o = md.key("random_seed");
        o.push('"');
        base64::engine::general_purpose::STANDARD.encode_string(seed, o);
        o.push('"');
    }
    if at_least(version, LIBERTY) {
        json::str_to(md.key("project_id"), &inst.project);
    }
    if at_least(version, NEWTON_ONE) {
        devices(md.key("devices"), &inst.devices, version);
    }
    if at_least(version, VICTORIA) {
        let mut cpus = Arr::new(md.key("dedicated_cpus"));
        for c in &inst.dedicated_cpus {
            json::int_to(cpus.item(), *c);
        }
        cpus.end();
    }
    md.end();
    Ok(out)
}

/// `devices` (`InstanceMetadata._get_device_metadata`): per device, the
/// keys in Nova's order; a device on an unknown bus or of an unknown type is
/// left out, and so is a NIC with nothing to show (no tags, and no `vlan` or
/// `vf_trusted` at this version). `vlan` shows from Ocata, `vf_trusted` from
/// Rocky, shares from Epoxy.
fn devices(out: &mut String, devs: &[Device], version: usize) {
    let mut arr = Arr::new(out);
    for d in devs {
        let (bus, address) = match &d.bus {
            None => ("none", "none"),
            Some(b) => match b.kind.name() {
                Some(name) => (name, b.address.as_deref().unwrap_or("none")),
                None => continue,
            },
        };
        // Decided before anything is written: which devices show at all.
        let shown = match &d.kind {
            DeviceKind::Nic { vlan, .. } => {
                d.tags.is_some()
                    || (at_least(version, OCATA) && vlan.is_some())
                    || at_least(version, ROCKY)
            }
            DeviceKind::Disk { .. } => true,
            DeviceKind::Share { .. } => at_least(version, EPOXY),
            DeviceKind::Unknown => false,
        };
        if !shown {
            continue;
        }
        let mut m = Obj::new(arr.item());
        match &d.kind {
            DeviceKind::Nic {
                mac,
                vlan,
                vf_trusted,
            } => {
                if let (true, Some(v)) = (at_least(version, OCATA), vlan) {
                    json::int_to(m.key("vlan"), *v);
                }
                if at_least(version, ROCKY) {
                    m.key("vf_trusted")
                        .push_str(if *vf_trusted { "true" } else { "false" });
                }
                json::str_to(m.key("type"), "nic");
                json::str_to(m.key("mac"), mac);
            }
            DeviceKind::Disk { serial, path } => {
                json::str_to(m.key("type"), "disk");
                if let Some(s) = serial {
                    json::opt_str_to(m.key("serial"), s.as_deref());
                }
                if let Some(p) = path {
                    json::opt_str_to(m.key("path"), p.as_deref());
                }
            }
            DeviceKind::Share { share_id, tag } => {
                json::str_to(m.key("type"), "share");
                json::opt_str_to(m.key("share_id"), share_id.as_deref());
                json::opt_str_to(m.key("tag"), tag.as_deref());
            }
            // Not shown (above).
            DeviceKind::Unknown => {}
        }
        json::str_to(m.key("bus"), bus);
        json::str_to(m.key("address"), address);
        if let Some(tags) = &d.tags {
            let mut t = Arr::new(m.key("tags"));
            for tag in tags {
                json::str_to(t.item(), tag);
            }
            t.end();
        }
        m.end();
    }
    arr.end();
}

/// `vendor_data.json`: the static document or `{}`; `None` before Havana
/// or without `StaticJSON` in the providers (Nova: a `KeyError`, 404).
pub(crate) fn vendor_data(ctx: &RenderCtx<'_>, version: usize) -> Option<String> {
    (at_least(version, HAVANA) && ctx.providers.contains(&Provider::StaticJson))
        .then(|| static_vendor(ctx).to_python_string())
}

/// `vendor_data2.json` (`_vendor_data2`): per provider in order,
/// `"static": ...` for `StaticJSON`, each target's answer under its name
/// for `DynamicJSON` (a name already present is dropped, as Nova removes
/// duplicate keys); `None` before Newton.
pub(crate) fn vendor_data2(ctx: &RenderCtx<'_>, version: usize) -> Option<String> {
    if !at_least(version, NEWTON_TWO) {
        return None;
    }
    let mut j: Vec<(String, Json)> = Vec::new();
    for p in ctx.providers {
        match p {
            Provider::StaticJson => {
                let v = static_vendor(ctx);
                match j.iter_mut().find(|(k, _)| k == "static") {
                    Some(slot) => slot.1 = v,
                    None => j.push(("static".into(), v)),
                }
            }
            Provider::DynamicJson => {
                for (name, v) in ctx.dynamic.unwrap_or_default() {
                    if !j.iter().any(|(k, _)| k == name) {
                        j.push((name.clone(), v.clone()));
                    }
                }
            }
        }
    }
    Some(Json::Obj(j).to_python_string())
}

fn static_vendor(ctx: &RenderCtx<'_>) -> Json {
    ctx.vendor_data
        .map_or(Json::Obj(Vec::new()), |v| Json::Value(v.clone()))
}

/// A value written with its `Display` (addresses), quoted: nothing in an
/// address needs escaping.
fn display_str_to(out: &mut String, v: impl std::fmt::Display) {
    use std::fmt::Write as _;
    out.push('"');
    let _ = write!(out, "{v}");
    out.push('"');
}

fn dns_service_to(out: &mut String, ip: IpAddr) {
    let mut o = Obj::new(out);
    json::str_to(o.key("type"), "dns");
    display_str_to(o.key("address"), ip);
    o.end();
}

/// The subnets of `network` a port has addresses in, each with the port's
/// first address there, in the network's order: Nova's VIF carries these.
fn port_subnets<'a>(
    port: &'a crate::inventory::Port,
    network: &'a crate::inventory::Network,
) -> impl Iterator<Item = (&'a crate::inventory::Subnet, IpAddr)> + Clone + 'a {
    network.subnets.iter().filter_map(|s| {
        port.fixed_ips
            .iter()
            .copied()
            .find(|ip| s.cidr.contains(*ip))
            .map(|ip| (s, ip))
    })
}

/// The ports Nova shows, with their network: on a known network, with an
/// address in one of its subnets.
fn shown_ports<'a>(
    ctx: &'a RenderCtx<'_>,
) -> impl Iterator<Item = (&'a crate::inventory::Port, &'a crate::inventory::Network)> + 'a {
    ctx.instance.ports.iter().filter_map(|port| {
        let network = ctx.inventory.network(&port.network)?;
        port_subnets(port, network)
            .next()
            .is_some()
            .then_some((port, network))
    })
}

/// `network_data.json` (`nova.virt.netutils.get_network_metadata`): served for
/// every version, `{}` when the instance has no ports. Written straight
/// into its buffer: the links in one pass over the ports, the networks
/// (and the services they add) in a second.
pub(crate) fn network_data(ctx: &RenderCtx<'_>) -> String {
    let inst = ctx.instance;
    if inst.ports.is_empty() {
        return "{}".to_owned();
    }
    let mut out = String::with_capacity(512 + 640 * inst.ports.len());
    let mut root = Obj::new(&mut out);
    let mut links = Arr::new(root.key("links"));
    for (port, network) in shown_ports(ctx) {
        let nic_type = port
            .vif_type
            .as_deref()
            .filter(|t| LEGACY_EXPOSED_VIF_TYPES.contains(t))
            .unwrap_or("phy");
        let mut link = Obj::new(links.item());
        json::str_to(link.key("id"), &port.devname);
        json::str_to(link.key("vif_id"), &port.id);
        json::str_to(link.key("type"), nic_type);
        // nova.virt.netutils._get_link_mtu: null when a DHCP port serves it.
        let mtu = link.key("mtu");
        match network.mtu {
            Some(m) if !port_subnets(port, network).any(|(s, _)| s.dhcp_server) => {
                json::int_to(mtu, i64::from(m));
            }
            _ => mtu.push_str("null"),
        }
        display_str_to(
            link.key("ethernet_mac_address"),
            crate::inventory::net::Mac(&port.mac),
        );
        link.end();
    }
    links.end();
    let mut services: Vec<IpAddr> = Vec::new();
    let mut net_num = 0usize;
    let mut nets = Arr::new(root.key("networks"));
    for (port, network) in shown_ports(ctx) {
        let link_id = port.devname.as_str();
        for version in [4u8, 6] {
            let Some((subnet, ip)) =
                port_subnets(port, network).find(|(s, _)| s.ip_version == version)
            else {
                continue;
            };
            let mut net = Obj::new(nets.item());
            display_str_to(net.key("id"), format_args!("network{net_num}"));
            net_num += 1;
            // As Nova: checked against the list before this subnet's entries
            // are added, so duplicates within one subnet survive.
            let known = services.len();
            for ip in &subnet.dns {
                if !services[..known].contains(ip) {
                    services.push(*ip);
                }
            }
            // _get_nets: an ipv6_address_mode wins over DHCP.
            if subnet.dhcp && subnet.ipv6_mode.is_none() {
                display_str_to(net.key("type"), format_args!("ipv{version}_dhcp"));
                json::str_to(net.key("link"), link_id);
                json::str_to(net.key("network_id"), &network.id);
                net.end();
                continue;
            }
            match subnet.ipv6_mode {
                Some(mode) if version == 6 => {
                    display_str_to(net.key("type"), format_args!("ipv6_{}", mode.as_str()));
                }
                _ => display_str_to(net.key("type"), format_args!("ipv{version}")),
            }
            json::str_to(net.key("link"), link_id);
            display_str_to(net.key("ip_address"), ip);
            display_str_to(net.key("netmask"), subnet.cidr.netmask());
            let mut routes = Arr::new(net.key("routes"));
            if let Some(gw) = subnet.gateway {
                let any = if version == 4 { "0.0.0.0" } else { "::" };
                let mut r = Obj::new(routes.item());
                json::str_to(r.key("network"), any);
                json::str_to(r.key("netmask"), any);
                display_str_to(r.key("gateway"), gw);
                r.end();
            }
            for route in &subnet.routes {
                let mut r = Obj::new(routes.item());
                display_str_to(r.key("network"), route.destination.network());
                display_str_to(r.key("netmask"), route.destination.netmask());
                display_str_to(r.key("gateway"), route.nexthop);
                r.end();
            }
            routes.end();
            json::str_to(net.key("network_id"), &network.id);
            let mut dns = Arr::new(net.key("services"));
            for ip in &subnet.dns {
                dns_service_to(dns.item(), *ip);
            }
            dns.end();
            net.end();
        }
    }
    nets.end();
    let mut all = Arr::new(root.key("services"));
    for ip in services {
        dns_service_to(all.item(), ip);
    }
    all.end();
    root.end();
    out
}

#[cfg(test)]
mod tests;
