//! Liveness as neutron-server reads it, against a real Debian Southbound
//! `ovsdb-server`: after start this chassis' `Chassis_Private.external_ids`
//! holds the agent id (the uuid5 Neutron derives, as fixed vectors computed
//! with Python's `uuid` and Neutron's formula), the OVN bridge and the
//! sb-cfg key; bumping `SB_Global.nb_cfg` with `ovn-sbctl` makes the sb-cfg
//! key follow; keys of other writers survive, the other agent's keys are
//! removed, an id already set is kept (Neutron's `db_add`), echoes resume
//! after the server restarts, a re-created row is registered again, and the legacy switch writes the metadata
//! agent's keys. The delay unit is shortened to milliseconds for the suite
//! (the real window is checked as a unit in `src/ovn/liveness.rs`).
//! Without the packages: `SKIPPED`.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::ovsdb::{available, Kind, Server};
use common::wait_until;
use metaproxy::ovn::liveness::{AgentKind, Liveness, LivenessConfig};
use metaproxy::ovn::ovsdb::{ConnOptions, Remote};
use metaproxy::ovn::replica::{SbConfig, SbMonitor};
use serde_json::{json, Value};

const LOCAL: &str = "chassis-local";
const OTHER: &str = "chassis-other";
/// `uuid5(uuid5(OVN_MONITOR_UUID_NAMESPACE, "chassis-local"), "ovn_agent")`.
const OVN_AGENT_ID: &str = "cc02354b-e7cd-57f3-9fca-c14f0ad314d6";
/// `uuid5(uuid5(OVN_METADATA_UUID_NAMESPACE, "chassis-local"), "metadata_agent")`.
const METADATA_AGENT_ID: &str = "5dfadb38-706c-5fc5-8b7a-e0982207f6af";
const LIMIT: Duration = Duration::from_secs(20);

fn opts() -> ConnOptions {
    ConnOptions {
        connect_timeout: Duration::from_secs(5),
        ..ConnOptions::default()
    }
}

/// `SB_Global` and both chassis, as northd and ovn-controller leave them;
/// our `Chassis_Private` row carries `ids` already.
fn cloud(sb: &Server, nb_cfg: i64, ids: &[(&str, &str)]) {
    sb.sbctl(&["init"]);
    sb.sbctl(&["set", "SB_Global", ".", &format!("nb_cfg={nb_cfg}")]);
    for (ch, ip) in [(LOCAL, "192.0.2.1"), (OTHER, "192.0.2.2")] {
        sb.sbctl(&["chassis-add", ch, "geneve", ip]);
        private_row(sb, ch, nb_cfg, if ch == LOCAL { ids } else { &[] });
    }
}

fn private_row(sb: &Server, ch: &str, nb_cfg: i64, ids: &[(&str, &str)]) {
    let id = sb.sbctl(&[
        "--bare",
        "--columns=_uuid",
        "find",
        "Chassis",
        &format!("name={ch}"),
    ]);
    let ids: Vec<Value> = ids.iter().map(|(k, v)| json!([k, v])).collect();
    sb.transact(json!([{"op": "insert", "table": "Chassis_Private",
        "row": {"name": ch, "chassis": ["uuid", id.trim()], "nb_cfg": nb_cfg,
                "external_ids": ["map", ids]}}]));
}

fn ext_ids(sb: &Server, ch: &str) -> BTreeMap<String, String> {
    let v = sb.transact(json!([{"op": "select", "table": "Chassis_Private",
        "where": [["name", "==", ch]], "columns": ["external_ids"]}]));
    let rows = v[0]["rows"].as_array().expect("rows");
    let Some(row) = rows.first() else {
        return BTreeMap::new();
    };
    row["external_ids"][1]
        .as_array()
        .expect("map")
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap().to_string(),
                p[1].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Another writer (an operator, neutron-server) setting one key the way
/// ovn-sbctl does, by mutating the map.
fn other_writer(sb: &Server, ch: &str, k: &str, v: &str) {
    sb.transact(json!([{"op": "mutate", "table": "Chassis_Private",
        "where": [["name", "==", ch]],
        "mutations": [["external_ids", "delete", ["set", [k]]],
                      ["external_ids", "insert", ["map", [[k, v]]]]]}]));
}

fn start(sb: &Server, kind: AgentKind) -> (SbMonitor, Liveness) {
    let remotes = Remote::parse_list(&sb.remote()).unwrap();
    let mon = SbMonitor::start(SbConfig {
        remotes: remotes.clone(),
        conn: opts(),
        chassis: LOCAL.to_string(),
    })
    .unwrap();
    let mut cfg = LivenessConfig::new(remotes, opts(), LOCAL, "br-int");
    cfg.kind = kind;
    // For tests: a delay of 0..=10 units of 20 ms instead of 0..=10 s.
    cfg.delay_unit = Duration::from_millis(20);
    let live = Liveness::start(cfg, mon.shared().clone()).unwrap();
    (mon, live)
}

fn wait_key(sb: &Server, key: &str, want: &str) {
    wait_until(&format!("{key}={want}"), LIMIT, || {
        ext_ids(sb, LOCAL).get(key).map(String::as_str) == Some(want)
    });
}

#[test]
fn ovn_agent_keys_follow_nb_cfg() {
    if !available("ovn_agent_keys_follow_nb_cfg") {
        return;
    }
    let sb = Server::southbound(Kind::Clustered);
    cloud(
        &sb,
        5,
        &[
            ("neutron:ovn-metadata-id", "old-metadata-agent"),
            ("neutron:ovn-metadata-sb-cfg", "4"),
            ("neutron:description-metadata", "old"),
            ("neutron:host", "compute-1"),
        ],
    );
    let (_mon, live) = start(&sb, AgentKind::OvnAgent);
    // At start: the Chassis_Private row's own nb_cfg.
    wait_key(&sb, "neutron:ovn-neutron-agent-sb-cfg", "5");
    let ids = ext_ids(&sb, LOCAL);
    assert_eq!(ids["neutron:ovn-neutron-agent-id"], OVN_AGENT_ID);
    assert_eq!(ids["neutron:ovn-bridge"], "br-int");
    assert_eq!(ids["neutron:host"], "compute-1", "another writer's key");
    for gone in [
        "neutron:ovn-metadata-id",
        "neutron:ovn-metadata-sb-cfg",
        "neutron:description-metadata",
    ] {
        assert!(!ids.contains_key(gone), "{gone} left: {ids:?}");
    }
    assert!(
        ext_ids(&sb, OTHER).is_empty(),
        "another chassis' row touched"
    );

    // Every bump is echoed, with writes of other keys in between kept.
    for n in 6..=9 {
        sb.sbctl(&["set", "SB_Global", ".", &format!("nb_cfg={n}")]);
        other_writer(&sb, LOCAL, "operator:note", &format!("bump {n}"));
        wait_key(&sb, "neutron:ovn-neutron-agent-sb-cfg", &n.to_string());
    }
    let ids = ext_ids(&sb, LOCAL);
    assert_eq!(ids["operator:note"], "bump 9");
    assert_eq!(ids["neutron:host"], "compute-1");
    assert_eq!(ids["neutron:ovn-neutron-agent-id"], OVN_AGENT_ID);
    let st = live.stats();
    assert_eq!(st.registrations, 1, "{st:?}");
    // The first echo at once, later ones within randint(0, 10) units.
    assert_eq!(st.delays.first(), Some(&Duration::ZERO), "{st:?}");
    assert!(
        st.delays.iter().all(|d| *d <= Duration::from_millis(200)),
        "{st:?}"
    );

    // The server restarts: the monitor resumes and the next bump is
    // echoed over a new connection.
    sb.kill();
    sb.start();
    sb.sbctl(&["set", "SB_Global", ".", "nb_cfg=10"]);
    wait_key(&sb, "neutron:ovn-neutron-agent-sb-cfg", "10");
    assert_eq!(live.stats().registrations, 1, "same row, not re-registered");

    // ovn-controller re-creates the row (a restart): registered again.
    sb.transact(json!([{"op": "delete", "table": "Chassis_Private",
        "where": [["name", "==", LOCAL]]}]));
    private_row(&sb, LOCAL, 10, &[("neutron:host", "compute-1")]);
    wait_key(&sb, "neutron:ovn-neutron-agent-id", OVN_AGENT_ID);
    wait_key(&sb, "neutron:ovn-neutron-agent-sb-cfg", "10");
    assert_eq!(ext_ids(&sb, LOCAL)["neutron:ovn-bridge"], "br-int");
}

#[test]
fn legacy_switch_writes_metadata_agent_keys() {
    if !available("legacy_switch_writes_metadata_agent_keys") {
        return;
    }
    let sb = Server::southbound(Kind::Standalone);
    cloud(
        &sb,
        3,
        &[
            ("neutron:ovn-neutron-agent-id", "old-ovn-agent"),
            ("neutron:ovn-neutron-agent-sb-cfg", "2"),
            ("neutron:description-neutron-agent", "old"),
            ("neutron:ovn-bridge", "br-old"),
        ],
    );
    let (_mon, _live) = start(&sb, AgentKind::MetadataAgent);
    wait_key(&sb, "neutron:ovn-metadata-sb-cfg", "3");
    let ids = ext_ids(&sb, LOCAL);
    assert_eq!(ids["neutron:ovn-metadata-id"], METADATA_AGENT_ID);
    assert_eq!(
        ids["neutron:ovn-bridge"], "br-int",
        "overwritten, as db_set"
    );
    for gone in [
        "neutron:ovn-neutron-agent-id",
        "neutron:ovn-neutron-agent-sb-cfg",
        "neutron:description-neutron-agent",
    ] {
        assert!(!ids.contains_key(gone), "{gone} left: {ids:?}");
    }
    sb.sbctl(&["set", "SB_Global", ".", "nb_cfg=4"]);
    wait_key(&sb, "neutron:ovn-metadata-sb-cfg", "4");
}

#[test]
fn an_agent_id_already_set_is_kept() {
    if !available("an_agent_id_already_set_is_kept") {
        return;
    }
    // Neutron's db_add does not overwrite the id (the agent's identity in
    // `openstack network agent list`).
    let sb = Server::southbound(Kind::Standalone);
    cloud(&sb, 1, &[("neutron:ovn-neutron-agent-id", "kept-id")]);
    let (_mon, _live) = start(&sb, AgentKind::OvnAgent);
    wait_key(&sb, "neutron:ovn-neutron-agent-sb-cfg", "1");
    assert_eq!(
        ext_ids(&sb, LOCAL)["neutron:ovn-neutron-agent-id"],
        "kept-id"
    );
}
