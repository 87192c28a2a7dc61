use super::*;

const EXAMPLE: &str = include_str!("../../examples/inventory.toml");
const NET: &str = "d0d0d0d0-0000-4000-8000-00000000a001";
const DEMO: &str = "d0d0d0d0-0000-4000-8000-000000000001";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn loads_the_example() {
    let inv = Inventory::from_toml_str(EXAMPLE).unwrap();
    assert_eq!(inv.dhcp_domain(), "novalocal");
    let demo = inv.instance(DEMO).unwrap();
    assert_eq!(demo.name, "demo");
    assert_eq!(demo.keys[0].name, "demo-key");
    assert!(demo
        .user_data
        .as_deref()
        .unwrap()
        .starts_with(b"#cloud-config\n"));
    assert_eq!(demo.meta["role"], "demo");
    assert_eq!(demo.first_fixed_ipv4(), Some(ip("127.0.0.1")));
    assert_eq!(demo.ports[0].devname, "tapd0d0d0d0-00");
    let net = inv.network(NET).unwrap();
    assert_eq!(net.subnets[0].ip_version, 4);
    assert!(!net.subnets[0].dhcp);
    assert_eq!(
        inv.router_networks("d0d0d0d0-0000-4000-8000-00000000c001"),
        [NET.to_owned()]
    );
    assert!(inv.router_networks("nope").is_empty());
    let demo2 = inv
        .instance("d0d0d0d0-0000-4000-8000-000000000002")
        .unwrap();
    assert_eq!(demo2.name, "demo2");
    assert_eq!(demo2.security_groups, ["default"]);
    assert_eq!(demo2.reservation_id, "r-00000002");
    assert!(demo2.user_data.is_none());
    assert_eq!(inv.instances().count(), 2);
}

#[test]
fn example_file_loads_from_disk() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/inventory.toml");
    Inventory::load(&path).unwrap();
    let err = Inventory::load(Path::new("/nonexistent/inventory.toml")).unwrap_err();
    assert!(matches!(err, InventoryError::Io { .. }), "{err}");
}

#[test]
fn lookups() {
    let inv = Inventory::from_toml_str(EXAMPLE).unwrap();
    let hits = inv.ports_by_ip(&[NET], ip("127.0.0.2"));
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].instance.name, "demo2");
    assert_eq!(hits[0].port.id, "d0d0d0d0-0000-4000-8000-00000000e002");
    assert!(inv.ports_by_ip(&["other"], ip("127.0.0.2")).is_empty());
    assert!(inv.ports_by_ip(&[NET], ip("127.0.0.9")).is_empty());
    // IPv4-mapped IPv6 is not converted by the inventory.
    assert!(inv.ports_by_ip(&[NET], ip("::ffff:127.0.0.2")).is_empty());
    let hits = inv.ports_by_mac(&[NET], [0xfa, 0x16, 0x3e, 0, 0, 1]);
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].instance.uuid, DEMO);
    assert_eq!(inv.instance_by_ip(ip("127.0.0.1")).len(), 1);
    assert!(inv.instance_by_ip(ip("127.0.0.3")).is_empty());
    assert_eq!(inv.network_ports(NET).len(), 2);
    assert!(inv.network_ports("x").is_empty());
    assert!(inv.instance("x").is_none());
}

const BASE: &str = r#"
[[network]]
id = "n1"
project = "p"
[[network.subnet]]
id = "s1"
cidr = "10.0.0.0/24"
[[network]]
id = "n2"
project = "p"
"#;

fn inst(uuid: &str, port: &str) -> String {
    format!("[[instance]]\nuuid = \"{uuid}\"\nhostname = \"h\"\nproject = \"p\"\n{port}\n")
}

fn port(id: &str, net: &str, mac: &str, ips: &str) -> String {
    format!(
        "[[instance.port]]\nid = \"{id}\"\nnetwork = \"{net}\"\nmac = \"{mac}\"\nfixed_ips = {ips}\n"
    )
}

fn err_key(toml: &str) -> String {
    match Inventory::from_toml_str(toml) {
        Err(InventoryError::Invalid { key, .. }) => key,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn each_validation_error_names_its_key() {
    let ok_port = port("p1", "n1", "fa:16:3e:00:00:01", r#"["10.0.0.5"]"#);
    let good = format!("{BASE}{}", inst("00000001-aaaa", &ok_port));
    Inventory::from_toml_str(&good).unwrap();

    let cases: Vec<(String, &str)> = vec![
        (
            format!("{BASE}{}", inst("", &ok_port)),
            "instance[0].uuid",
        ),
        (
            format!(
                "{BASE}{}{}",
                inst("u1", &ok_port),
                inst("u1", &port("p2", "n2", "fa:16:3e:00:00:02", "[]"))
            ),
            "instance[1].uuid",
        ),
        (
            format!(
                "{BASE}{}",
                inst(
                    "u1",
                    &format!(
                        "{ok_port}{}",
                        port("p2", "n1", "fa:16:3e:00:00:02", r#"["10.0.0.6", "10.0.0.x"]"#)
                    )
                )
            ),
            "instance[0].port[1].fixed_ips[1]",
        ),
        (
            format!(
                "{BASE}{}",
                inst("u1", &port("p1", "nX", "fa:16:3e:00:00:01", "[]"))
            ),
            "instance[0].port[0].network",
        ),
        (
            format!(
                "{BASE}{}",
                inst("u1", &port("p1", "n1", "fa:16:3e:00:00", "[]"))
            ),
            "instance[0].port[0].mac",
        ),
        (
            // duplicate (network, ip) across instances
            format!(
                "{BASE}{}{}",
                inst("u1", &ok_port),
                inst(
                    "u2",
                    &port("p2", "n1", "fa:16:3e:00:00:02", r#"["10.0.0.5"]"#)
                )
            ),
            "instance[1].port[0].fixed_ips[0]",
        ),
        (
            format!("{BASE}[[router]]\nid = \"r\"\nnetworks = [\"n1\", \"n3\"]\n"),
            "router[0].networks[1]",
        ),
        (
            BASE.replace("10.0.0.0/24", "10.0.0.0/40"),
            "network[0].subnet[0].cidr",
        ),
        (
            BASE.replace("cidr = \"10.0.0.0/24\"", "cidr = \"10.0.0.0/24\"\ngateway = \"fd00::1\""),
            "network[0].subnet[0].gateway",
        ),
        (
            BASE.replace("cidr = \"10.0.0.0/24\"", "cidr = \"10.0.0.0/24\"\ndns = [\"8.8.8.8\", \"x\"]"),
            "network[0].subnet[0].dns[1]",
        ),
        (
            BASE.replace("cidr = \"10.0.0.0/24\"", "cidr = \"10.0.0.0/24\"\nip_version = 6"),
            "network[0].subnet[0].ip_version",
        ),
        (
            BASE.replace(
                "cidr = \"10.0.0.0/24\"",
                "cidr = \"10.0.0.0/24\"\nroutes = [{ destination = \"10.1.0.0/16\", nexthop = \"nope\" }]",
            ),
            "network[0].subnet[0].routes[0].nexthop",
        ),
        (BASE.replace("id = \"n2\"", "id = \"n1\""), "network[1].id"),
        (
            format!(
                "{BASE}{}",
                inst("u1", &format!("user_data = \"a\"\nuser_data_b64 = \"YQ==\"\n{ok_port}"))
            ),
            "instance[0].user_data_b64",
        ),
        (
            format!(
                "{BASE}[[instance]]\nuuid = \"u1\"\nhostname = \"h\"\nproject = \"p\"\n[[instance.key]]\nname = \"k\"\ntype = \"rsa\"\ndata = \"x\"\n"
            ),
            "instance[0].key[0].type",
        ),
        (
            format!(
                "{BASE}{}{}",
                inst("00000001-0000", ""),
                inst("00000001-1111", "")
            ),
            "instance[1].ec2_id",
        ),
    ];
    for (toml, key) in cases {
        assert_eq!(err_key(&toml), key, "for:\n{toml}");
    }
}

#[test]
fn parse_errors_carry_line_and_column() {
    let err = Inventory::from_toml_str("[[network]]\nid = \"n\"\nproject = \"p\"\nbogus = 1\n")
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, InventoryError::Parse { .. }));
    assert!(msg.contains("line 4"), "{msg}");
    assert!(msg.contains("bogus"), "{msg}");
}

#[test]
fn defaults_and_derivations() {
    let toml = format!(
        "{BASE}{}",
        inst(
            "0000abcd-0000-4000-8000-000000000001",
            &port("p1", "n1", "fa:16:3e:00:00:01", r#"["10.0.0.5"]"#)
        )
    );
    let inv = Inventory::from_toml_str(&toml).unwrap();
    let i = inv.instances().next().unwrap();
    assert_eq!(i.ec2_id, 0xabcd);
    assert_eq!(i.reservation_id, "r-0000abcd");
    assert_eq!(i.name, "h");
    assert_eq!(i.flavor, "m1.small");
    assert_eq!(i.availability_zone, None);
    assert_eq!(i.ports[0].device_owner, "compute:nova");
    assert!(inv.network("n1").unwrap().subnets[0].dhcp);
    // Non-hex UUID prefixes hash instead.
    assert_eq!(derive_ec2_id("zzzzzzzz"), derive_ec2_id("zzzzzzzz"));
}

#[test]
fn non_compute_ports_are_not_lookup_answers() {
    let toml = format!(
        "{BASE}{}",
        inst(
            "u1",
            &format!(
                "{}device_owner = \"network:dhcp\"\n",
                port("p1", "n1", "fa:16:3e:00:00:01", r#"["10.0.0.5"]"#)
            )
        )
    );
    let inv = Inventory::from_toml_str(&toml).unwrap();
    assert!(inv.ports_by_ip(&["n1"], ip("10.0.0.5")).is_empty());
    assert!(inv
        .ports_by_mac(&["n1"], [0xfa, 0x16, 0x3e, 0, 0, 1])
        .is_empty());
    assert!(inv.instance_by_ip(ip("10.0.0.5")).is_empty());
    assert!(inv.network_ports("n1").is_empty());
}

#[test]
fn load_refuses_an_empty_file_but_not_an_explicitly_empty_inventory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inventory.toml");
    for text in ["", "\n  \n\t"] {
        std::fs::write(&path, text).unwrap();
        let err = Inventory::load(&path).unwrap_err();
        assert!(matches!(err, InventoryError::Parse { .. }), "{err}");
        assert!(err.to_string().contains("is empty"), "{err}");
    }
    std::fs::write(&path, "instance = []\n").unwrap();
    assert_eq!(Inventory::load(&path).unwrap().instances().count(), 0);
}
