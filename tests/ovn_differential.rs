//! Differential: random insert/modify/delete sequences of `Port_Binding`
//! and `Datapath_Binding` rows, sent to the replica as the `update2` diffs
//! ovsdb-server sends (symmetric set differences, toggled map pairs, bare
//! atoms for one-element sets, defaults omitted on insert), against two
//! oracles: a replica rebuilt from the full rows (tables and indexes must
//! be equal), and Neutron's scan (`get_network_port_bindings_by_ip`, with
//! its string comparisons) over the true rows for every query.

use std::collections::BTreeMap;
use std::net::IpAddr;

use metaproxy::ovn::ovsdb::datum::{Schema, Uuid};
use metaproxy::ovn::replica::{Lookup, Replica};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

const LOCAL: &str = "chassis-local";
const L: u128 = 0xc1;
const O: u128 = 0xc2;

fn schema() -> Schema {
    let map = json!({"key": "string", "value": "string", "min": 0, "max": "unlimited"});
    let opt_ref = json!({"key": {"type": "uuid", "refTable": "Chassis", "refType": "weak"}, "min": 0, "max": 1});
    Schema::from_json(&json!({
        "name": "OVN_Southbound", "version": "20.27.0",
        "tables": {
            "Chassis": {"columns": {"name": {"type": "string"}, "hostname": {"type": "string"}, "external_ids": {"type": map}}},
            "Chassis_Private": {"columns": {"name": {"type": "string"}, "chassis": {"type": opt_ref}, "external_ids": {"type": map}, "nb_cfg": {"type": {"key": "integer"}}}},
            "Datapath_Binding": {"columns": {"tunnel_key": {"type": {"key": {"type": "integer", "minInteger": 1, "maxInteger": 16777215}}}, "external_ids": {"type": map}}},
            "Port_Binding": {"columns": {
                "logical_port": {"type": "string"}, "type": {"type": "string"},
                "datapath": {"type": {"key": {"type": "uuid", "refTable": "Datapath_Binding"}}},
                "chassis": {"type": opt_ref},
                "additional_chassis": {"type": {"key": {"type": "uuid", "refTable": "Chassis", "refType": "weak"}, "min": 0, "max": "unlimited"}},
                "mac": {"type": {"key": "string", "min": 0, "max": "unlimited"}},
                "external_ids": {"type": map}, "options": {"type": map},
                "up": {"type": {"key": "boolean", "min": 0, "max": 1}}}},
            "SB_Global": {"columns": {"nb_cfg": {"type": {"key": "integer"}}, "external_ids": {"type": map}, "options": {"type": map}}}
        }
    }))
    .unwrap()
}

const MACS: &[&str] = &[
    "fa:16:3e:00:00:01 10.0.0.1",
    "fa:16:3e:00:00:02 10.0.0.1 fd00::2",
    "fa:16:3e:00:00:03 10.0.0.3",
    "fa:16:3e:00:00:01 10.0.0.4",
    "unknown",
    "fa:16:3e:00:00:05",
    "fa:16:3e:00:00:06 10.0.0.6 10.0.0.6",
    "router",
];
const NAMES: &[&str] = &[
    "neutron-n1",
    "neutron-n2",
    "xneutron-n1",
    "neutron-neutron-n3",
];
const TYPES: &[&str] = &["", "localport", "external", "virtual"];
const QUERY_NETS: &[&str] = &["n1", "n2", "n3", "neutron-n3", "xn1"];
const QUERY_IPS: &[&str] = &[
    "10.0.0.1",
    "10.0.0.3",
    "10.0.0.4",
    "10.0.0.6",
    "fd00::2",
    "::ffff:10.0.0.3",
    "fe80::f816:3eff:fe00:1",
    "fe80::f816:3eff:fe00:5",
    "fe80::f816:3eff:fe00:2",
];

#[derive(Debug, Clone, PartialEq)]
struct Port {
    kind: usize,
    chassis: Option<u128>,
    additional: Vec<u128>,
    macs: Vec<usize>,
    dp: usize,
    tag: u8,
}

#[derive(Debug, Clone)]
enum Op {
    SetPort(usize, Port),
    DeletePort(usize),
    SetDp(usize, Option<usize>),
}

fn port_strategy() -> impl Strategy<Value = Port> {
    (
        0..TYPES.len(),
        prop_oneof![Just(None), Just(Some(L)), Just(Some(O))],
        proptest::sample::subsequence(vec![L, O], 0..=2),
        proptest::sample::subsequence((0..MACS.len()).collect::<Vec<_>>(), 0..=3),
        0..3usize,
        0..3u8,
    )
        .prop_map(|(kind, chassis, additional, macs, dp, tag)| Port {
            kind,
            chassis,
            additional,
            macs,
            dp,
            tag,
        })
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..8usize, port_strategy()).prop_map(|(i, p)| Op::SetPort(i, p)),
        2 => (0..8usize).prop_map(Op::DeletePort),
        1 => (0..3usize, proptest::option::of(0..NAMES.len())).prop_map(|(i, n)| Op::SetDp(i, n)),
    ]
}

fn uuid(n: u128) -> String {
    Uuid(n).to_string()
}
fn port_uuid(i: usize) -> u128 {
    0x100 + i as u128
}
fn dp_uuid(i: usize) -> u128 {
    0x10 + i as u128
}

/// A column's full value in wire form, or `None` for the default.
type Cols = BTreeMap<&'static str, (char, Vec<Value>)>; // kind: 's' scalar, 'S' set, 'M' map (pairs)

fn port_cols(i: usize, p: &Port) -> Cols {
    let mut c = Cols::new();
    c.insert("logical_port", ('s', vec![json!(format!("p{i}"))]));
    c.insert("type", ('s', vec![json!(TYPES[p.kind])]));
    c.insert(
        "datapath",
        ('s', vec![json!(["uuid", uuid(dp_uuid(p.dp))])]),
    );
    c.insert(
        "chassis",
        (
            'S',
            p.chassis
                .iter()
                .map(|u| json!(["uuid", uuid(*u)]))
                .collect(),
        ),
    );
    c.insert(
        "additional_chassis",
        (
            'S',
            p.additional
                .iter()
                .map(|u| json!(["uuid", uuid(*u)]))
                .collect(),
        ),
    );
    c.insert(
        "mac",
        ('S', p.macs.iter().map(|m| json!(MACS[*m])).collect()),
    );
    c.insert(
        "external_ids",
        (
            'M',
            vec![
                json!(["neutron:device_id", format!("d{}", p.tag)]),
                json!(["tag", p.tag.to_string()]),
            ],
        ),
    );
    c.insert("options", ('M', vec![]));
    c.insert("up", ('S', vec![]));
    c
}

fn dp_cols(name: Option<usize>, key: i64) -> Cols {
    let mut c = Cols::new();
    c.insert("tunnel_key", ('s', vec![json!(key)]));
    c.insert(
        "external_ids",
        (
            'M',
            name.iter().map(|n| json!(["name", NAMES[*n]])).collect(),
        ),
    );
    c
}

fn wire(kind: char, v: &[Value]) -> Value {
    match kind {
        's' => v[0].clone(),
        'M' => json!(["map", v]),
        _ if v.len() == 1 => v[0].clone(),
        _ => json!(["set", v]),
    }
}

fn is_default(kind: char, v: &[Value]) -> bool {
    match kind {
        's' => v[0] == json!("") || v[0] == json!(0),
        _ => v.is_empty(),
    }
}

/// The row of an `initial`/`insert`: defaults omitted.
fn insert_row(c: &Cols) -> Value {
    let mut m = Map::new();
    for (name, (kind, v)) in c {
        if !is_default(*kind, v) {
            m.insert(name.to_string(), wire(*kind, v));
        }
    }
    Value::Object(m)
}

/// The row of a `modify`: only changed columns, as differences.
fn modify_row(old: &Cols, new: &Cols) -> Value {
    let mut m = Map::new();
    for (name, (kind, nv)) in new {
        let ov = &old[name].1;
        if ov == nv {
            continue;
        }
        let diff = match kind {
            's' => nv[0].clone(),
            'S' => {
                let mut d: Vec<Value> = ov.iter().filter(|x| !nv.contains(x)).cloned().collect();
                d.extend(nv.iter().filter(|x| !ov.contains(x)).cloned());
                wire('S', &d)
            }
            _ => {
                let key = |p: &Value| p[0].clone();
                let mut d: Vec<Value> = ov
                    .iter()
                    .filter(|p| !nv.iter().any(|q| key(q) == key(p)))
                    .cloned()
                    .collect();
                d.extend(nv.iter().filter(|q| !ov.contains(q)).cloned());
                json!(["map", d])
            }
        };
        m.insert(name.to_string(), diff);
    }
    Value::Object(m)
}

#[derive(Default)]
struct Truth {
    ports: BTreeMap<usize, Port>,
    dps: BTreeMap<usize, Option<usize>>,
}

impl Truth {
    fn all_rows(&self) -> Value {
        let mut pb = Map::new();
        for (i, p) in &self.ports {
            pb.insert(
                uuid(port_uuid(*i)),
                json!({"initial": insert_row(&port_cols(*i, p))}),
            );
        }
        let mut dp = Map::new();
        for (i, n) in &self.dps {
            dp.insert(
                uuid(dp_uuid(*i)),
                json!({"initial": insert_row(&dp_cols(*n, *i as i64 + 1))}),
            );
        }
        json!({
            "Chassis": {uuid(L): {"initial": {"name": LOCAL}}, uuid(O): {"initial": {"name": "chassis-other"}}},
            "SB_Global": {uuid(0x5b): {"initial": {"nb_cfg": 3}}},
            "Datapath_Binding": dp,
            "Port_Binding": pb,
        })
    }

    /// Neutron's scan, strings and all (`impl_idl_ovn.py`), over the rows
    /// the monitor would have.
    fn scan(&self, net: &str, addr: &str) -> Lookup {
        let ip: IpAddr = addr.parse().unwrap();
        let mut ip_s = addr.to_string();
        let mut mac = None;
        if let IpAddr::V6(a) = ip {
            if let Some(v4) = a.to_ipv4_mapped() {
                ip_s = v4.to_string();
            }
            if a.segments()[0] & 0xffc0 == 0xfe80 {
                let o = a.octets();
                mac = Some(format!(
                    "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                    o[8] ^ 2,
                    o[9],
                    o[10],
                    o[13],
                    o[14],
                    o[15]
                ));
            }
        }
        let mut hits = Vec::new();
        for (i, p) in &self.ports {
            let monitored =
                TYPES[p.kind] == "localport" || p.chassis == Some(L) || p.additional.contains(&L);
            if !monitored || p.chassis.is_none() || p.macs.is_empty() {
                continue;
            }
            let mut strs: Vec<&str> = p.macs.iter().map(|m| MACS[*m]).collect();
            strs.sort();
            let toks: Vec<&str> = strs[0].split(' ').collect();
            let m =
                mac.as_deref().is_some_and(|m| toks.contains(&m)) || toks.contains(&ip_s.as_str());
            let name = self
                .dps
                .get(&p.dp)
                .copied()
                .flatten()
                .map(|n| NAMES[n].replacen("neutron-", "", 1));
            if m && name.as_deref() == Some(net) {
                hits.push(Uuid(port_uuid(*i)));
            }
        }
        match hits.len() {
            0 => Lookup::NotFound,
            1 => Lookup::Found(hits[0]),
            n => Lookup::Ambiguous(n),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn replica_matches_a_rebuild_and_neutrons_scan(ops in proptest::collection::vec(op_strategy(), 1..40)) {
        let schema = schema();
        let mut truth = Truth::default();
        for i in 0..3 {
            truth.dps.insert(i, Some(i % 2));
        }
        let mut replica = Replica::new(LOCAL, &schema);
        replica.apply(&truth.all_rows(), false).unwrap();
        for op in ops {
            let update = match &op {
                Op::SetPort(i, p) => {
                    let new = port_cols(*i, p);
                    let ru = match truth.ports.get(i) {
                        None => json!({"insert": insert_row(&new)}),
                        Some(old) => json!({"modify": modify_row(&port_cols(*i, old), &new)}),
                    };
                    truth.ports.insert(*i, p.clone());
                    json!({"Port_Binding": {uuid(port_uuid(*i)): ru}})
                }
                Op::DeletePort(i) => {
                    if truth.ports.remove(i).is_none() {
                        continue;
                    }
                    json!({"Port_Binding": {uuid(port_uuid(*i)): {"delete": null}}})
                }
                Op::SetDp(i, n) => {
                    let old = dp_cols(truth.dps[i], *i as i64 + 1);
                    truth.dps.insert(*i, *n);
                    json!({"Datapath_Binding": {uuid(dp_uuid(*i)): {"modify": modify_row(&old, &dp_cols(*n, *i as i64 + 1))}}})
                }
            };
            replica.apply(&update, false).unwrap();
            let mut rebuilt = Replica::new(LOCAL, &schema);
            rebuilt.apply(&truth.all_rows(), false).unwrap();
            prop_assert_eq!(&replica, &rebuilt, "after {:?}", op);
            for net in QUERY_NETS {
                for addr in QUERY_IPS {
                    prop_assert_eq!(replica.lookup(net, addr.parse().unwrap()), truth.scan(net, addr), "{} {} after {:?}", net, addr, op);
                }
            }
        }
    }
}
