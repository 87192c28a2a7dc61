//! `inventory synth`: the output loads, every VM has its own address inside
//! 127.16.0.0/12, and a 50 000-VM inventory is generated (no timing asserts).

use std::collections::HashSet;
use std::net::IpAddr;

use metaproxy::inventory::synth::{synth_toml, SynthSpec};
use metaproxy::inventory::{Cidr, Inventory};

fn load(vms: u32, networks: u32, routers: u32) -> Inventory {
    let text = synth_toml(&SynthSpec {
        vms,
        networks,
        routers,
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inventory.toml");
    std::fs::write(&path, text).unwrap();
    Inventory::load(&path).unwrap()
}

fn check(inv: &Inventory, vms: usize, networks: usize) {
    let supernet = Cidr::parse("127.16.0.0/12").unwrap();
    let mut ips = HashSet::new();
    let mut uuids = HashSet::new();
    let mut ec2 = HashSet::new();
    for (i, inst) in inv.instances().enumerate() {
        let ip = inst.first_fixed_ipv4().expect("a fixed IPv4");
        assert!(supernet.contains(ip), "{ip} outside 127.16.0.0/12");
        let IpAddr::V4(v4) = ip else { unreachable!() };
        let last = v4.octets()[3];
        assert!(last != 0 && last != 255, "{ip} is a .0/.255 host");
        assert!(ips.insert(ip), "{ip} used twice");
        assert!(uuids.insert(inst.uuid.clone()));
        assert!(ec2.insert(inst.ec2_id));
        assert_eq!(inst.hostname, format!("vm-{i}"));
        assert_eq!(inst.keys.len(), 1);
        assert!(inst.user_data.is_some());
        // The address is inside its own network's subnet (so network_data.json has it).
        let port = &inst.ports[0];
        let net = inv.network(&port.network).unwrap();
        let subnet = net.subnet_for(ip).expect("ip inside its network's subnet");
        assert!(!subnet.dhcp);
        assert_ne!(subnet.gateway, Some(ip));
        assert_eq!(inst.project, net.project);
        // The API's direct-mode lookup finds exactly this VM.
        let found = inv.instance_by_ip(ip);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].uuid, inst.uuid);
    }
    assert_eq!(ips.len(), vms);
    assert_eq!(inv.networks().count(), networks);
    // Routers share the networks: each network is on exactly one router.
    let mut attached = HashSet::new();
    for r in inv.routers() {
        for n in &r.networks {
            assert!(attached.insert(n.clone()), "network {n} on two routers");
        }
    }
    assert_eq!(attached.len(), networks);
}

#[test]
fn synth_loads_with_unique_addresses() {
    let inv = load(3000, 7, 3);
    check(&inv, 3000, 7);
    let inv = load(1, 1, 1);
    check(&inv, 1, 1);
}

#[test]
fn synth_50k_vms() {
    let inv = load(50_000, 16, 4);
    check(&inv, 50_000, 16);
}

#[test]
fn synth_rejects_what_does_not_fit() {
    assert!(synth_toml(&SynthSpec {
        vms: 10,
        networks: 0,
        routers: 1
    })
    .is_err());
    // 2^20 addresses minus .0/.255/gateway cannot hold a million VMs.
    assert!(synth_toml(&SynthSpec {
        vms: 1_041_000,
        networks: 1,
        routers: 1
    })
    .is_err());
}
