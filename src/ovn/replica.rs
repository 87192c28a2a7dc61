//! The slice of the OVN Southbound database a compute node needs, kept up
//! to date from a conditional monitor, with the indexes that resolve a
//! guest's address in O(1).
//!
//! What is monitored (clauses of one `where` are ORed by ovsdb-server):
//! - `Port_Binding` rows that are `localport`s (each network's metadata
//!   port), or whose `chassis` or `additional_chassis` is this chassis;
//! - every `Datapath_Binding` (network names), this node's `Chassis` and
//!   `Chassis_Private` (by `name`), and `SB_Global`.
//!
//! The chassis' row UUID is only known once its `Chassis` row arrives, so
//! the first monitor asks for localports only and a `monitor_cond_change`
//! adds the chassis clauses when the row appears (and again if it is
//! recreated). Against a server without conditional monitoring (plain
//! `monitor`), every row arrives and the same filter is applied here.
//!
//! The indexes answer as Neutron's `get_network_port_bindings_by_ip` scan
//! does (`impl_idl_ovn.py`, called from `server_socket.py`), restricted to
//! the rows above:
//! - a row counts only if its `chassis` is set and it has a `mac` entry;
//! - the first `mac` entry (sets are sorted, as the Python IDL sorts them)
//!   is split on spaces; every token that is an IP address is indexed under
//!   (network, IP), every token that is a MAC under (network, MAC);
//! - the network is `Datapath_Binding.external_ids:name` with the first
//!   `neutron-` removed (`ovn_utils.get_neutron_name`, a `str.replace` of
//!   the first occurrence, not a prefix strip);
//! - a source that is IPv6 link-local also matches the port whose MAC is
//!   the address' EUI-64 (`netutils.get_mac_addr_by_ipv6`); an IPv4-mapped
//!   IPv6 source is looked up as the IPv4 address (`proxy_base.py`);
//! - zero matching ports, or more than one, is not found.
//!
//! One difference, on purpose: tokens are compared as parsed addresses, not
//! as strings, so `fd00::05` in a row matches a request from `fd00::5`
//! (Neutron and northd write the canonical form, where the two agree).
//!
//! A port's index entries are recomputed when it changes; a change of a
//! network's name or of this chassis' UUID reindexes every port (both are
//! rare, and the local port count is small). [`SbMonitor`] runs the
//! connection on its own thread ([`crate::ovn::ovsdb`] explains why) and
//! publishes an immutable [`Replica`] behind an `Arc` after every batch of
//! updates, which readers clone cheaply.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use smallvec::SmallVec;

use super::ovsdb::datum::{
    apply_table_update, Atom, ColumnType, DatumError, Row, Schema, Table, Uuid,
};
use super::ovsdb::{Conn, ConnOptions, Event, OvsdbError, Remote};
use crate::log;

/// The Southbound database's name.
pub const SB_DB: &str = "OVN_Southbound";
/// Our monitor's `<json-value>`.
const MONITOR_ID: &str = "metaproxy";
/// First reconnect delay (OVS `reconnect`'s minimum backoff).
pub const BACKOFF_FIRST: Duration = Duration::from_secs(1);
/// Largest reconnect delay (OVS `reconnect`'s default maximum backoff).
pub const BACKOFF_MAX: Duration = Duration::from_secs(8);

/// Distinct connection failures logged per outage.
const OUTAGE_LOG_LINES: usize = 8;

/// The columns we monitor, per table; those the server's schema lacks are
/// left out (`additional_chassis` before OVN 22.06, `nb_uuid` before 25.09).
pub const MONITORED: &[(&str, &[&str])] = &[
    ("Chassis", &["name", "hostname", "external_ids"]),
    (
        "Chassis_Private",
        &["name", "chassis", "external_ids", "nb_cfg"],
    ),
    (
        "Datapath_Binding",
        &["tunnel_key", "external_ids", "nb_uuid"],
    ),
    (
        "Port_Binding",
        &[
            "logical_port",
            "type",
            "datapath",
            "chassis",
            "additional_chassis",
            "mac",
            "external_ids",
            "options",
            "up",
        ],
    ),
    ("SB_Global", &["nb_cfg", "external_ids", "options"]),
];

/// The answer of an index lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Exactly one port.
    Found(Uuid),
    /// No port.
    NotFound,
    /// Several ports (Neutron logs "More than one port found" and answers 404).
    Ambiguous(usize),
}

type Ports = SmallVec<[Uuid; 1]>;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct NetIndex {
    by_ip: HashMap<IpAddr, Ports>,
    by_mac: HashMap<[u8; 6], Ports>,
}

/// What one port put into the index, to take it out again.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Contribution {
    net: Arc<str>,
    ips: Vec<IpAddr>,
    macs: Vec<[u8; 6]>,
}

/// The replica. Cloning it is how a snapshot is published.
#[derive(Debug, Clone, PartialEq)]
pub struct Replica {
    chassis_name: String,
    cols: BTreeMap<String, BTreeMap<String, ColumnType>>,
    tables: BTreeMap<String, Table>,
    chassis_uuid: Option<Uuid>,
    nets: HashMap<Uuid, Arc<str>>,
    index: HashMap<Arc<str>, NetIndex>,
    contrib: HashMap<Uuid, Contribution>,
}

/// Neutron's `get_neutron_name`: the first `neutron-` removed, wherever it is.
pub fn neutron_name(ovn_name: &str) -> String {
    ovn_name.replacen("neutron-", "", 1)
}

/// The MAC an IPv6 address' EUI-64 interface id encodes
/// (`oslo_utils.netutils.get_mac_addr_by_ipv6`: the U/L bit flipped back,
/// the middle `ff:fe` dropped, not checked).
pub fn mac_from_eui64(a: Ipv6Addr) -> [u8; 6] {
    let o = a.octets();
    [o[8] ^ 0x02, o[9], o[10], o[13], o[14], o[15]]
}

pub use crate::inventory::net::parse_mac;

fn is_link_local(a: &Ipv6Addr) -> bool {
    (a.segments()[0] & 0xffc0) == 0xfe80
}

fn str_col<'a>(row: &'a Row, col: &str) -> Option<&'a str> {
    row.get(col)?.atoms().first()?.as_str()
}

fn uuids<'a>(row: &'a Row, col: &str) -> impl Iterator<Item = Uuid> + 'a {
    row.get(col)
        .into_iter()
        .flat_map(|d| d.atoms().iter().filter_map(Atom::as_uuid))
}

impl Replica {
    /// An empty replica for chassis `chassis_name`, monitoring the columns
    /// of [`MONITORED`] that `schema` has.
    pub fn new(chassis_name: &str, schema: &Schema) -> Replica {
        let mut cols = BTreeMap::new();
        for (table, wanted) in MONITORED {
            let mut c = BTreeMap::new();
            if let Some(ts) = schema.tables.get(*table) {
                for w in *wanted {
                    if let Some(t) = ts.columns.get(*w) {
                        c.insert((*w).to_string(), t.clone());
                    }
                }
            }
            cols.insert((*table).to_string(), c);
        }
        Replica {
            chassis_name: chassis_name.to_string(),
            tables: cols.keys().map(|t| (t.clone(), Table::new())).collect(),
            cols,
            chassis_uuid: None,
            nets: HashMap::new(),
            index: HashMap::new(),
            contrib: HashMap::new(),
        }
    }

    /// The chassis this replica is for.
    pub fn chassis_name(&self) -> &str {
        &self.chassis_name
    }

    /// This chassis' `Chassis` row UUID, once known.
    pub fn chassis_uuid(&self) -> Option<Uuid> {
        self.chassis_uuid
    }

    /// Whether the server's schema has `table.column` and we monitor it.
    pub fn monitors(&self, table: &str, column: &str) -> bool {
        self.cols.get(table).is_some_and(|c| c.contains_key(column))
    }

    /// A table's rows.
    pub fn table(&self, name: &str) -> Option<&Table> {
        self.tables.get(name)
    }

    /// One `Port_Binding` row.
    pub fn port(&self, uuid: Uuid) -> Option<&Row> {
        self.tables.get("Port_Binding")?.get(&uuid)
    }

    /// A network's name (`Datapath_Binding.external_ids:name` minus `neutron-`).
    pub fn network_of(&self, datapath: Uuid) -> Option<&str> {
        self.nets.get(&datapath).map(|s| &**s)
    }

    /// Drop every row (before a full snapshot).
    pub fn clear(&mut self) {
        for t in self.tables.values_mut() {
            t.clear();
        }
        self.chassis_uuid = None;
        self.nets.clear();
        self.index.clear();
        self.contrib.clear();
    }

    /// Whether a `Port_Binding` row is one the monitor asks for.
    pub fn is_monitored_port(&self, row: &Row) -> bool {
        if str_col(row, "type") == Some("localport") {
            return true;
        }
        let Some(me) = self.chassis_uuid else {
            return false;
        };
        uuids(row, "chassis").any(|u| u == me) || uuids(row, "additional_chassis").any(|u| u == me)
    }

    /// The monitor requests (`<monitor-cond-requests>`, or with `plain`
    /// the RFC 7047 `<monitor-requests>` without conditions).
    pub fn monitor_requests(&self, plain: bool) -> Value {
        let mut out = Map::new();
        for (table, cols) in &self.cols {
            if cols.is_empty() {
                continue;
            }
            let columns: Vec<&String> = cols.keys().collect();
            if plain {
                out.insert(table.clone(), json!({"columns": columns}));
                continue;
            }
            let mut req = json!({"columns": columns});
            if let Some(w) = self.where_clause(table) {
                req["where"] = w;
            }
            out.insert(table.clone(), json!([req]));
        }
        Value::Object(out)
    }

    /// The `where` for `table`, or `None` for every row.
    fn where_clause(&self, table: &str) -> Option<Value> {
        match table {
            "Chassis" | "Chassis_Private" => Some(json!([["name", "==", self.chassis_name]])),
            "Port_Binding" => {
                let mut w = vec![json!(["type", "==", "localport"])];
                if let Some(u) = self.chassis_uuid {
                    w.push(json!(["chassis", "==", ["uuid", u.to_string()]]));
                    if self.monitors("Port_Binding", "additional_chassis") {
                        w.push(json!([
                            "additional_chassis",
                            "includes",
                            ["uuid", u.to_string()]
                        ]));
                    }
                }
                Some(Value::Array(w))
            }
            _ => None,
        }
    }

    /// The `monitor_cond_change` requests for the current chassis UUID.
    pub fn cond_change_requests(&self) -> Value {
        json!({"Port_Binding": [{"where": self.where_clause("Port_Binding")}]})
    }

    /// Apply a `<table-updates2>` (or with `v1` a `<table-updates>`).
    ///
    /// # Errors
    /// A malformed update, a table we did not monitor, or a row we do not
    /// have; the replica must then be rebuilt from a full snapshot.
    pub fn apply(&mut self, updates: &Value, v1: bool) -> Result<(), DatumError> {
        let obj = updates
            .as_object()
            .ok_or_else(|| DatumError("table updates are not an object".into()))?;
        let mut ports: Vec<Uuid> = Vec::new();
        let mut datapaths: Vec<Uuid> = Vec::new();
        let mut chassis_changed = false;
        for (table, tu) in obj {
            let cols = self
                .cols
                .get(table)
                .ok_or_else(|| DatumError(format!("update for unmonitored table {table}")))?;
            let rows = self.tables.entry(table.clone()).or_default();
            let changes = apply_table_update(rows, cols, tu, v1)?;
            let touched = changes.into_iter().map(|(u, _, _)| u);
            match table.as_str() {
                "Port_Binding" => ports.extend(touched),
                "Datapath_Binding" => datapaths.extend(touched),
                "Chassis" => chassis_changed = true,
                _ => {}
            }
        }
        let mut reindex_all = false;
        for u in datapaths {
            let name = self.tables["Datapath_Binding"]
                .get(&u)
                .and_then(|r| r.get("external_ids"))
                .and_then(|d| d.map_get("name"))
                .and_then(Atom::as_str)
                .map(|n| Arc::<str>::from(neutron_name(n)));
            let before = match name {
                Some(n) => self.nets.insert(u, n),
                None => self.nets.remove(&u),
            };
            if before.as_deref() != self.nets.get(&u).map(|n| &**n) {
                reindex_all = true;
            }
        }
        if chassis_changed {
            // The lowest UUID if a name is (briefly) duplicated, so every
            // replica picks the same row.
            let me = self.tables["Chassis"]
                .iter()
                .filter(|(_, r)| str_col(r, "name") == Some(self.chassis_name.as_str()))
                .map(|(u, _)| *u)
                .min();
            if me != self.chassis_uuid {
                self.chassis_uuid = me;
                reindex_all = true;
            }
        }
        if reindex_all {
            self.index.clear();
            self.contrib.clear();
            let all: Vec<Uuid> = self.tables["Port_Binding"].keys().copied().collect();
            for u in all {
                self.reindex(u);
            }
        } else {
            for u in ports {
                self.reindex(u);
            }
        }
        Ok(())
    }

    fn unindex(&mut self, u: Uuid) {
        let Some(c) = self.contrib.remove(&u) else {
            return;
        };
        let Some(ni) = self.index.get_mut(&c.net) else {
            return;
        };
        for ip in &c.ips {
            if let Some(v) = ni.by_ip.get_mut(ip) {
                v.retain(|x| *x != u);
                if v.is_empty() {
                    ni.by_ip.remove(ip);
                }
            }
        }
        for m in &c.macs {
            if let Some(v) = ni.by_mac.get_mut(m) {
                v.retain(|x| *x != u);
                if v.is_empty() {
                    ni.by_mac.remove(m);
                }
            }
        }
        if ni.by_ip.is_empty() && ni.by_mac.is_empty() {
            self.index.remove(&c.net);
        }
    }

    fn contribution(&self, row: &Row) -> Option<Contribution> {
        if !self.is_monitored_port(row) || uuids(row, "chassis").next().is_none() {
            return None;
        }
        let first = row.get("mac")?.atoms().first()?.as_str()?;
        let dp = uuids(row, "datapath").next()?;
        let net = self.nets.get(&dp)?.clone();
        let mut ips = Vec::new();
        let mut macs = Vec::new();
        for tok in first.split(' ') {
            if let Ok(ip) = tok.parse::<IpAddr>() {
                ips.push(ip);
            } else if let Some(m) = parse_mac(tok) {
                macs.push(m);
            }
        }
        ips.sort();
        ips.dedup();
        macs.sort();
        macs.dedup();
        Some(Contribution { net, ips, macs })
    }

    fn reindex(&mut self, u: Uuid) {
        self.unindex(u);
        let Some(c) = self.port(u).and_then(|r| self.contribution(r)) else {
            return;
        };
        let ni = self.index.entry(c.net.clone()).or_default();
        let add = |v: &mut Ports| {
            if let Err(pos) = v.binary_search(&u) {
                v.insert(pos, u);
            }
        };
        for ip in &c.ips {
            add(ni.by_ip.entry(*ip).or_default());
        }
        for m in &c.macs {
            add(ni.by_mac.entry(*m).or_default());
        }
        if c.ips.is_empty() && c.macs.is_empty() {
            if ni.by_ip.is_empty() && ni.by_mac.is_empty() {
                self.index.remove(&c.net);
            }
            return;
        }
        self.contrib.insert(u, c);
    }

    /// The port a guest at `addr` on `network` is, as Neutron resolves it.
    pub fn lookup(&self, network: &str, addr: IpAddr) -> Lookup {
        let (ip, mac) = match addr {
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => (IpAddr::V4(v4), None),
                None if is_link_local(&a) => (addr, Some(mac_from_eui64(a))),
                None => (addr, None),
            },
            IpAddr::V4(_) => (addr, None),
        };
        let Some(ni) = self.index.get(network) else {
            return Lookup::NotFound;
        };
        let by_ip = ni.by_ip.get(&ip).map(|v| v.as_slice()).unwrap_or(&[]);
        let by_mac = mac
            .and_then(|m| ni.by_mac.get(&m))
            .map(|v| v.as_slice())
            .unwrap_or(&[]);
        let mut distinct: SmallVec<[Uuid; 2]> = SmallVec::new();
        for u in by_ip.iter().chain(by_mac) {
            if !distinct.contains(u) {
                distinct.push(*u);
            }
        }
        match distinct.len() {
            0 => Lookup::NotFound,
            1 => Lookup::Found(distinct[0]),
            n => Lookup::Ambiguous(n),
        }
    }

    /// The networks that have at least one indexed (bound, addressed) port.
    pub fn indexed_networks(&self) -> HashSet<&str> {
        self.index.keys().map(|k| &**k).collect()
    }

    /// Everything, as JSON (for `metaproxy ovn-dump-replica`): rows per
    /// table with UUIDs, and the index.
    pub fn dump(&self) -> Value {
        let mut tables = Map::new();
        for (name, rows) in &self.tables {
            let mut sorted: Vec<_> = rows.iter().collect();
            sorted.sort_by_key(|(u, _)| **u);
            let rows: Map<String, Value> = sorted
                .into_iter()
                .map(|(u, r)| {
                    let cols: Map<String, Value> =
                        r.iter().map(|(c, d)| (c.clone(), d.to_json())).collect();
                    (u.to_string(), Value::Object(cols))
                })
                .collect();
            tables.insert(name.clone(), Value::Object(rows));
        }
        let mut index = Map::new();
        let mut nets: Vec<_> = self.index.iter().collect();
        nets.sort_by(|a, b| a.0.cmp(b.0));
        for (net, ni) in nets {
            let mut ips: Vec<_> = ni.by_ip.iter().map(|(ip, p)| (ip.to_string(), p)).collect();
            ips.sort();
            let mut macs: Vec<_> = ni
                .by_mac
                .iter()
                .map(|(m, p)| {
                    let s = m
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":");
                    (s, p)
                })
                .collect();
            macs.sort();
            let show = |p: &Ports| Value::Array(p.iter().map(|u| json!(u.to_string())).collect());
            index.insert(
                net.to_string(),
                json!({
                    "ip": ips.into_iter().map(|(k, p)| (k, show(p))).collect::<Map<_, _>>(),
                    "mac": macs.into_iter().map(|(k, p)| (k, show(p))).collect::<Map<_, _>>(),
                }),
            );
        }
        json!({
            "chassis": self.chassis_name,
            "chassis_uuid": self.chassis_uuid.map(|u| u.to_string()),
            "tables": tables,
            "index": index,
        })
    }
}

/// How [`SbMonitor`] connects.
#[derive(Debug, Clone)]
pub struct SbConfig {
    /// `ovn_sb_connection`, tried in turn.
    pub remotes: Vec<Remote>,
    /// Timeouts, probe, TLS.
    pub conn: ConnOptions,
    /// This chassis' name (`Open_vSwitch.external_ids:system-id`).
    pub chassis: String,
}

/// The monitor method a session ended up with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `monitor_cond_since` (resumable).
    CondSince,
    /// `monitor_cond`.
    Cond,
    /// RFC 7047 `monitor`.
    Plain,
}

/// What the monitor has done, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MonitorStats {
    /// Sessions that got their initial reply.
    pub sessions: u64,
    /// Initial replies that were full snapshots.
    pub full_snapshots: u64,
    /// `monitor_cond_since` replies with `found = true` (resumed from our txn id).
    pub resumed: u64,
    /// The method of the current or last session.
    pub method: Option<Method>,
    /// Whether a session is up.
    pub connected: bool,
    /// Whether the replica holds everything the monitor asks for: a session
    /// is up and no condition change (this chassis' clauses) is pending.
    pub synced: bool,
    /// The last transaction id seen.
    pub last_txn: Option<Uuid>,
    /// Echo probes sent, over all sessions.
    pub echoes_sent: u64,
    /// Sessions dropped because a probe went unanswered.
    pub probe_timeouts: u64,
    /// The last error that ended a session.
    pub last_error: Option<String>,
}

/// What the monitor shares with readers.
#[derive(Debug)]
pub struct Shared {
    snapshot: RwLock<Arc<Replica>>,
    generation: AtomicU64,
    stats: Mutex<MonitorStats>,
    echoes: Arc<AtomicU64>,
}

impl Shared {
    /// The current replica.
    pub fn snapshot(&self) -> Arc<Replica> {
        self.snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Bumped on every publish; a reader caches until it moves.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The counters.
    pub fn stats(&self) -> MonitorStats {
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
        s.echoes_sent = self.echoes.load(Ordering::Relaxed);
        s
    }

    fn publish(&self, r: &Replica) {
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(r.clone());
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn with_stats(&self, f: impl FnOnce(&mut MonitorStats)) {
        f(&mut self.stats.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// The Southbound monitor: a thread that keeps a [`Replica`] current and
/// reconnects (remotes in turn, backoff 1 s doubling to 8 s) when the
/// connection fails. Dropping it stops the thread.
#[derive(Debug)]
pub struct SbMonitor {
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SbMonitor {
    /// Start monitoring.
    ///
    /// # Errors
    /// The thread cannot be spawned.
    pub fn start(cfg: SbConfig) -> std::io::Result<SbMonitor> {
        let shared = Arc::new(Shared {
            snapshot: RwLock::new(Arc::new(Replica::new(&cfg.chassis, &Schema::default()))),
            generation: AtomicU64::new(0),
            stats: Mutex::new(MonitorStats::default()),
            echoes: Arc::new(AtomicU64::new(0)),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, st2) = (shared.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("ovsdb-sb".into())
            .spawn(move || run(cfg, &s2, &st2))?;
        Ok(SbMonitor {
            shared,
            stop,
            thread: Some(thread),
        })
    }

    /// What readers use.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

impl Drop for SbMonitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// State kept across sessions for `monitor_cond_since`.
struct Resume {
    replica: Option<Replica>,
    txn: Uuid,
    /// The conditions the replica is consistent with at `txn`.
    acked: Option<Value>,
}

fn run(cfg: SbConfig, shared: &Shared, stop: &AtomicBool) {
    let stopped = || stop.load(Ordering::Acquire);
    let mut resume = Resume {
        replica: None,
        txn: Uuid::ZERO,
        acked: None,
    };
    let mut backoff = BACKOFF_FIRST;
    let mut i = 0usize;
    // Each distinct failure is logged once per outage (a remote list can
    // fail in several ways at once), at most OUTAGE_LOG_LINES of them.
    let mut logged: Vec<String> = Vec::new();
    while !stopped() {
        let remote = &cfg.remotes[i % cfg.remotes.len()];
        i += 1;
        let mut got_initial = false;
        let err = match Conn::open(remote, &cfg.conn) {
            Ok(mut conn) => {
                conn.echo_counter = Some(shared.echoes.clone());
                let r = session(
                    &mut conn,
                    &cfg,
                    &mut resume,
                    shared,
                    &stopped,
                    &mut got_initial,
                );
                shared.with_stats(|s| {
                    s.connected = false;
                    s.synced = false;
                });
                r.err()
            }
            Err(e) => Some(e),
        };
        let Some(err) = err else { break };
        if matches!(err, OvsdbError::Stopped) {
            break;
        }
        if matches!(err, OvsdbError::ProbeTimeout(_)) {
            shared.with_stats(|s| s.probe_timeouts += 1);
        }
        let msg = err.to_string();
        shared.with_stats(|s| s.last_error = Some(msg.clone()));
        if got_initial {
            backoff = BACKOFF_FIRST;
            logged.clear();
            log::warn(format_args!(
                "ovn: southbound session ended: {msg}; reconnecting"
            ));
        } else if !logged.contains(&msg) && logged.len() < OUTAGE_LOG_LINES {
            logged.push(msg.clone());
            log::warn(format_args!(
                "ovn: cannot reach the southbound database: {msg}; retrying with backoff {}s to {}s, remotes in turn",
                BACKOFF_FIRST.as_secs(),
                BACKOFF_MAX.as_secs()
            ));
        }
        let until = Instant::now() + backoff;
        while !stopped() && Instant::now() < until {
            std::thread::sleep(
                Duration::from_millis(50).min(until.saturating_duration_since(Instant::now())),
            );
        }
        if !got_initial {
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

fn proto(conn: &Conn, e: impl std::fmt::Display) -> OvsdbError {
    OvsdbError::Protocol(conn.remote().to_string(), e.to_string())
}

fn unknown_method(e: &OvsdbError) -> bool {
    matches!(e, OvsdbError::Rpc { error, .. } if error.as_str().is_some_and(|s| s.contains("unknown method")) || error.to_string().contains("unknown method"))
}

fn session(
    conn: &mut Conn,
    cfg: &SbConfig,
    resume: &mut Resume,
    shared: &Shared,
    stopped: &dyn Fn() -> bool,
    got_initial: &mut bool,
) -> Result<(), OvsdbError> {
    let schema = conn.get_schema(SB_DB, stopped)?;
    let fresh = Replica::new(&cfg.chassis, &schema);
    let mut replica = match resume.replica.take() {
        Some(r) if r.cols == fresh.cols => r,
        _ => {
            resume.txn = Uuid::ZERO;
            resume.acked = None;
            fresh
        }
    };
    let conds = replica.monitor_requests(false);
    let last = if resume.acked.as_ref() == Some(&conds) {
        resume.txn
    } else {
        Uuid::ZERO
    };
    let (method, reply) = match conn.call(
        "monitor_cond_since",
        json!([SB_DB, MONITOR_ID, conds, last.to_string()]),
        stopped,
    ) {
        Ok(v) => (Method::CondSince, v),
        Err(e) if unknown_method(&e) => {
            match conn.call("monitor_cond", json!([SB_DB, MONITOR_ID, conds]), stopped) {
                Ok(v) => (Method::Cond, v),
                Err(e) if unknown_method(&e) => {
                    let plain = replica.monitor_requests(true);
                    (
                        Method::Plain,
                        conn.call("monitor", json!([SB_DB, MONITOR_ID, plain]), stopped)?,
                    )
                }
                Err(e) => return Err(e),
            }
        }
        Err(e) => return Err(e),
    };
    let v1 = method == Method::Plain;
    let mut found = false;
    let updates = match method {
        Method::CondSince => {
            let a = reply.as_array().filter(|a| a.len() == 3).ok_or_else(|| {
                proto(
                    conn,
                    "monitor_cond_since reply is not [found, txn, updates]",
                )
            })?;
            found = a[0]
                .as_bool()
                .ok_or_else(|| proto(conn, "found is not a boolean"))?;
            resume.txn = a[1]
                .as_str()
                .and_then(Uuid::parse)
                .ok_or_else(|| proto(conn, "bad last-txn-id"))?;
            a[2].clone()
        }
        _ => reply,
    };
    // `found = false` (or no resume at all) is a full snapshot.
    let resumed = found && last != Uuid::ZERO;
    if !resumed {
        replica.clear();
    }
    let applied = replica.apply(&updates, v1);
    if let Err(e) = applied {
        resume.acked = None;
        return Err(proto(conn, e));
    }
    resume.acked = (method != Method::Plain).then(|| conds.clone());
    *got_initial = true;
    // Invariant: the snapshot is published before the session is counted,
    // so a reader that saw `sessions` move sees that session's snapshot.
    shared.publish(&replica);
    let txn = resume.txn;
    shared.with_stats(|s| {
        s.sessions += 1;
        s.connected = true;
        s.method = Some(method);
        if resumed {
            s.resumed += 1;
        } else {
            s.full_snapshots += 1;
        }
        s.last_txn = (method == Method::CondSince).then_some(txn);
    });
    // The chassis clauses follow the Chassis row's UUID.
    let mut cond_change: Option<(u64, Value)> = None;
    let mut synced = false;
    let result = loop {
        if !v1 && cond_change.is_none() {
            let want = replica.monitor_requests(false);
            if resume.acked.as_ref() != Some(&want) {
                match conn.request(
                    "monitor_cond_change",
                    json!([MONITOR_ID, MONITOR_ID, replica.cond_change_requests()]),
                ) {
                    Ok(id) => cond_change = Some((id, want)),
                    Err(e) => break Err(e),
                }
                if synced {
                    synced = false;
                    shared.with_stats(|s| s.synced = false);
                }
            }
        }
        if cond_change.is_none() && !synced {
            synced = true;
            shared.with_stats(|s| s.synced = true);
            log::info(format_args!(
                "ovn: southbound {} in sync via {method:?}: {} ports, {} datapaths{}",
                conn.remote(),
                replica.tables["Port_Binding"].len(),
                replica.tables["Datapath_Binding"].len(),
                if resumed {
                    " (resumed)"
                } else {
                    " (full snapshot)"
                }
            ));
        }
        let ev = match conn.next_event(stopped) {
            Ok(ev) => ev,
            Err(e) => break Err(e),
        };
        let applied = match ev {
            Event::Notify(m, p) if m == "update3" && method == Method::CondSince => {
                match p
                    .as_array()
                    .filter(|a| a.len() == 3)
                    .and_then(|a| a[1].as_str().and_then(Uuid::parse).map(|t| (t, &a[2])))
                {
                    Some((t, u)) => replica.apply(u, false).map(|()| Some(t)),
                    None => break Err(proto(conn, "malformed update3")),
                }
            }
            Event::Notify(m, p)
                if (m == "update2" && method == Method::Cond) || (m == "update" && v1) =>
            {
                match p.as_array().filter(|a| a.len() == 2) {
                    Some(a) => replica.apply(&a[1], v1).map(|()| None),
                    None => break Err(proto(conn, format!("malformed {m}"))),
                }
            }
            Event::Reply(id, r) if cond_change.as_ref().is_some_and(|(c, _)| *c == id) => {
                let (_, want) = cond_change.take().unwrap_or_default();
                if let Err(e) = r {
                    break Err(proto(conn, format!("monitor_cond_change failed: {e}")));
                }
                resume.acked = Some(want);
                continue;
            }
            _ => continue,
        };
        match applied {
            Ok(t) => {
                if let Some(t) = t {
                    resume.txn = t;
                }
                shared.publish(&replica);
                let txn = resume.txn;
                shared.with_stats(|s| {
                    if method == Method::CondSince {
                        s.last_txn = Some(txn);
                    }
                });
            }
            Err(e) => {
                resume.acked = None;
                break Err(proto(conn, e));
            }
        }
    };
    if cond_change.is_some() {
        // Unacknowledged: the server may or may not have applied it.
        resume.acked = None;
    }
    resume.replica = Some(replica);
    result
}
