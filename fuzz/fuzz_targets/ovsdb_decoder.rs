//! The OVSDB client's input path over arbitrary bytes from a Southbound
//! server: the streaming JSON-RPC framing (fed in chunks of every size),
//! then any `params` that decode applied to a replica as `update2`/`update`
//! table updates, then index lookups. Never a panic; every framed message
//! is an object; a failed update leaves a replica that a full snapshot
//! (clear) recovers; every index hit is a row the replica holds.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use metaproxy::ovn::ovsdb::datum::Schema;
use metaproxy::ovn::ovsdb::frame::Decoder;
use metaproxy::ovn::replica::{Lookup, Replica};
use serde_json::json;

const IPS: [&str; 5] = ["10.0.0.1", "10.0.0.5", "fd00::5", "fe80::f816:3eff:fe00:1", "::"];

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
    .expect("schema")
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, data)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk % 64) + 1;
    let v1 = chunk % 2 == 0;
    let mut dec = Decoder::new(64 * 1024);
    let mut replica = Replica::new("chassis-local", &schema());
    'feed: for piece in data.chunks(chunk) {
        if dec.feed(piece).is_err() {
            break;
        }
        loop {
            let value = match dec.next_value() {
                Ok(Some(v)) => v,
                Ok(None) => break,
                // The connection is dropped on any framing error.
                Err(_) => break 'feed,
            };
            assert!(value.is_object(), "framed a non-object: {value}");
            let Some(updates) = value["params"].as_array().and_then(|p| p.last()) else {
                continue;
            };
            if replica.apply(updates, v1).is_err() {
                // What the session does next: a full snapshot.
                replica.clear();
                assert!(replica.indexed_networks().is_empty());
            }
            let nets: Vec<String> = replica.indexed_networks().into_iter().map(String::from).collect();
            for net in &nets {
                for ip in IPS {
                    let ip: IpAddr = ip.parse().unwrap();
                    if let Lookup::Found(u) = replica.lookup(net, ip) {
                        assert!(replica.port(u).is_some(), "index names a row the replica lacks");
                    }
                }
            }
            let _ = replica.dump();
        }
    }
});
