//! Liveness as Neutron reads it: the keys an OVN compute-node agent keeps
//! in its `Chassis_Private.external_ids`, from which neutron-server
//! (`plugins/ml2/drivers/ovn/agent/neutron_agent.py`) lists the agent and
//! decides whether it is alive.
//!
//! What Neutron's two agents do, and what [`Liveness`] does the same way
//! (`neutron/agent/ovn/agent/ovn_neutron_agent.py` for `neutron-ovn-agent`,
//! `neutron/agent/ovn/metadata/agent.py` for the deprecated
//! `neutron-ovn-metadata-agent`, key names from
//! `neutron/common/ovn/constants.py`):
//!
//! - At start, remove the *other* agent's keys (`_cleanup_previous_tags`),
//!   add the agent id if it is not there yet (`db_add`, which keeps an id
//!   already set), set `neutron:ovn-bridge` and set the sb-cfg key to this
//!   `Chassis_Private` row's own `nb_cfg`.
//! - The agent id is `uuid5(chassis_id, "ovn_agent")` (legacy:
//!   `"metadata_agent"`), where `chassis_id` is the chassis name read as a
//!   UUID the way Python's `uuid.UUID()` reads it, or else
//!   `uuid5(NAMESPACE, chassis name)`, with a namespace of each agent's own
//!   ([`AgentKind::namespace`]).
//! - On every `SB_Global` update, echo `SB_Global.nb_cfg` into the sb-cfg
//!   key. The first time since start at once; afterwards after
//!   `randint(0, max_delay)` whole seconds, `max_delay` being
//!   `agent_down_time // 3` clamped to 3..=10 ([`max_delay_secs`]): with
//!   Neutron's default `agent_down_time` of 75 s, 0 to 10 s.
//! - When the `Chassis_Private` row is created again (ovn-controller
//!   restarted), register again.
//!
//! Every write is one `transact` of `mutate` operations on
//! `Chassis_Private.external_ids` that delete and insert only our keys, as
//! the Python IDL's `setkey`/`delkey` do, so keys other writers keep in the
//! same map (ovn-controller, neutron-server, an operator) are never
//! rewritten from a stale copy.
//!
//! Differences, on purpose:
//! - Bumps that arrive while an echo is pending are folded into it: the
//!   pending echo writes the latest `nb_cfg` when it fires. Neutron arms one
//!   timer per event, each writing the `nb_cfg` of the row it was handed;
//!   ours is never older than theirs and is written no later than the
//!   first of their timers would.
//! - `neutron:ovn-bridge` is written in both modes. Neutron's metadata
//!   agent writes it and `neutron-ovn-agent` does not; neutron-server reads
//!   it (`get_ovn_bridge_from_chassis_private`, falling back to `br-int`),
//!   so writing the real bridge is right for both.
//!
//! The work runs on a thread of its own, reading the [`SbMonitor`]'s
//! published replica and writing over its own connection, never on a
//! serving loop. Nothing starts it from the command line yet: a node must
//! not look alive to Neutron while nothing serves its guests, so it comes
//! with `metaproxy ovn`.
//!
//! [`SbMonitor`]: super::replica::SbMonitor

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::ovsdb::datum::{Atom, Uuid};
use super::ovsdb::{Conn, ConnOptions, OvsdbError, Remote};
use super::replica::{Replica, Shared, BACKOFF_FIRST, BACKOFF_MAX, SB_DB};
use crate::log;

/// `OVN_AGENT_NEUTRON_ID_KEY`.
pub const OVN_AGENT_ID_KEY: &str = "neutron:ovn-neutron-agent-id";
/// `OVN_AGENT_NEUTRON_SB_CFG_KEY`.
pub const OVN_AGENT_SB_CFG_KEY: &str = "neutron:ovn-neutron-agent-sb-cfg";
/// `OVN_AGENT_NEUTRON_DESC_KEY`.
pub const OVN_AGENT_DESC_KEY: &str = "neutron:description-neutron-agent";
/// `OVN_AGENT_METADATA_ID_KEY`.
pub const METADATA_AGENT_ID_KEY: &str = "neutron:ovn-metadata-id";
/// `OVN_AGENT_METADATA_SB_CFG_KEY`.
pub const METADATA_AGENT_SB_CFG_KEY: &str = "neutron:ovn-metadata-sb-cfg";
/// `OVN_AGENT_METADATA_DESC_KEY`.
pub const METADATA_AGENT_DESC_KEY: &str = "neutron:description-metadata";
/// `OVN_AGENT_OVN_BRIDGE`.
pub const OVN_BRIDGE_KEY: &str = "neutron:ovn-bridge";
/// Neutron's `agent_down_time` default.
pub const DEFAULT_AGENT_DOWN_TIME: Duration = Duration::from_secs(75);

/// Whose keys we write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AgentKind {
    /// `neutron-ovn-agent` (with the metadata extension), the default.
    #[default]
    OvnAgent,
    /// The deprecated `neutron-ovn-metadata-agent`.
    MetadataAgent,
}

impl AgentKind {
    /// The namespace of `uuid5(NAMESPACE, chassis)` for a chassis name
    /// that is not a UUID (`OVN_MONITOR_UUID_NAMESPACE`,
    /// `OVN_METADATA_UUID_NAMESPACE`).
    pub fn namespace(self) -> uuid::Uuid {
        match self {
            AgentKind::OvnAgent => uuid::uuid!("fd7e0970-7164-11ed-80f0-00000003158a"),
            AgentKind::MetadataAgent => uuid::uuid!("d34bf9f6-da32-4871-9af8-15a4626b41ab"),
        }
    }
    /// The name hashed under the chassis id.
    pub fn id_name(self) -> &'static str {
        match self {
            AgentKind::OvnAgent => "ovn_agent",
            AgentKind::MetadataAgent => "metadata_agent",
        }
    }
    /// The agent id key.
    pub fn id_key(self) -> &'static str {
        match self {
            AgentKind::OvnAgent => OVN_AGENT_ID_KEY,
            AgentKind::MetadataAgent => METADATA_AGENT_ID_KEY,
        }
    }
    /// The sb-cfg key.
    pub fn sb_cfg_key(self) -> &'static str {
        match self {
            AgentKind::OvnAgent => OVN_AGENT_SB_CFG_KEY,
            AgentKind::MetadataAgent => METADATA_AGENT_SB_CFG_KEY,
        }
    }
    /// The other agent's keys, removed at start.
    pub fn other_keys(self) -> [&'static str; 3] {
        match self {
            AgentKind::OvnAgent => [
                METADATA_AGENT_SB_CFG_KEY,
                METADATA_AGENT_DESC_KEY,
                METADATA_AGENT_ID_KEY,
            ],
            AgentKind::MetadataAgent => {
                [OVN_AGENT_SB_CFG_KEY, OVN_AGENT_DESC_KEY, OVN_AGENT_ID_KEY]
            }
        }
    }
}

/// The chassis name as Python's `uuid.UUID(name)` reads it, or `None`
/// where Python raises `ValueError`: `urn:` and `uuid:` removed anywhere,
/// braces stripped from the ends, hyphens removed, then exactly 32
/// characters that `int(s, 16)` accepts (surrounding whitespace, a `+`, a
/// `0x` prefix and single underscores between digits included).
pub fn python_uuid(name: &str) -> Option<uuid::Uuid> {
    let s = name.replace("urn:", "").replace("uuid:", "");
    let s = s.trim_matches(|c| c == '{' || c == '}').replace('-', "");
    if s.chars().count() != 32 {
        return None;
    }
    let t = s.trim_matches(|c: char| c.is_whitespace());
    let t = t.strip_prefix('+').unwrap_or(t);
    let (t, prefixed) = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(r) => (r, true),
        None => (t, false),
    };
    let mut chars = t.chars().peekable();
    if prefixed && chars.peek() == Some(&'_') {
        chars.next();
    }
    let mut v: u128 = 0;
    let mut digits = 0;
    let mut prev_underscore = false;
    for c in chars {
        if c == '_' {
            if digits == 0 || prev_underscore {
                return None;
            }
            prev_underscore = true;
            continue;
        }
        v = (v << 4) | u128::from(c.to_digit(16)?);
        digits += 1;
        prev_underscore = false;
    }
    if digits == 0 || prev_underscore {
        return None;
    }
    Some(uuid::Uuid::from_u128(v))
}

/// The agent id Neutron derives for `chassis`.
pub fn agent_id(kind: AgentKind, chassis: &str) -> String {
    let chassis_id = python_uuid(chassis)
        .unwrap_or_else(|| uuid::Uuid::new_v5(&kind.namespace(), chassis.as_bytes()));
    uuid::Uuid::new_v5(&chassis_id, kind.id_name().as_bytes()).to_string()
}

/// Neutron's `max(min(agent_down_time // 3, 10), 3)`, in seconds.
pub fn max_delay_secs(agent_down_time: Duration) -> u64 {
    (agent_down_time.as_secs() / 3).clamp(3, 10)
}

/// `randint(0, max_units)` units (both ends included) from `random`.
pub fn pick_delay(max_units: u64, unit: Duration, random: u64) -> Duration {
    let n = random % (max_units + 1);
    unit.saturating_mul(u32::try_from(n).unwrap_or(u32::MAX))
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // A failed read of the OS RNG only makes the delay less spread out.
    let _ = getrandom::fill(&mut b);
    u64::from_ne_bytes(b)
}

/// How [`Liveness`] runs.
#[derive(Debug, Clone)]
pub struct LivenessConfig {
    /// `ovn_sb_connection`, tried in turn, for the writes.
    pub remotes: Vec<Remote>,
    /// Timeouts, probe, TLS.
    pub conn: ConnOptions,
    /// This chassis' name (`Open_vSwitch.external_ids:system-id`).
    pub chassis: String,
    /// The OVN bridge (`Open_vSwitch.external_ids:ovn-bridge`).
    pub bridge: String,
    /// Whose keys.
    pub kind: AgentKind,
    /// Neutron's `agent_down_time`, which sets the delay window.
    pub agent_down_time: Duration,
    /// The delay's unit: one second, as Neutron. For tests only, shorter,
    /// so a suite does not wait up to 10 s per bump.
    pub delay_unit: Duration,
}

impl LivenessConfig {
    /// Neutron's defaults for `chassis` on `bridge` over `remotes`.
    pub fn new(remotes: Vec<Remote>, conn: ConnOptions, chassis: &str, bridge: &str) -> Self {
        Self {
            remotes,
            conn,
            chassis: chassis.to_string(),
            bridge: bridge.to_string(),
            kind: AgentKind::default(),
            agent_down_time: DEFAULT_AGENT_DOWN_TIME,
            delay_unit: Duration::from_secs(1),
        }
    }
}

/// What [`Liveness`] has done, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LivenessStats {
    /// Registrations done (start, and each re-created `Chassis_Private`).
    pub registrations: u64,
    /// sb-cfg echoes written after an `SB_Global.nb_cfg` change.
    pub echoes: u64,
    /// The last value written into the sb-cfg key.
    pub last_sb_cfg: Option<i64>,
    /// The delays chosen for echoes, latest last (at most 64 kept).
    pub delays: Vec<Duration>,
    /// The last write error.
    pub last_error: Option<String>,
}

/// The liveness writer: a thread. Dropping it stops the thread (the keys
/// stay, as when Neutron's agent stops; neutron-server then sees the
/// sb-cfg key fall behind).
#[derive(Debug)]
pub struct Liveness {
    stats: Arc<Mutex<LivenessStats>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Liveness {
    /// Start writing, following `sb` (the [`SbMonitor`]'s shared state).
    ///
    /// # Errors
    /// The thread cannot be spawned.
    ///
    /// [`SbMonitor`]: super::replica::SbMonitor
    pub fn start(cfg: LivenessConfig, sb: Arc<Shared>) -> std::io::Result<Liveness> {
        let stats = Arc::new(Mutex::new(LivenessStats::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st2, stop2) = (stats.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("ovn-liveness".into())
            .spawn(move || run(&cfg, &sb, &st2, &stop2))?;
        Ok(Liveness {
            stats,
            stop,
            thread: Some(thread),
        })
    }

    /// The counters.
    pub fn stats(&self) -> LivenessStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Liveness {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// This chassis' `Chassis_Private` row (the lowest UUID if the name is
/// briefly duplicated) and its `nb_cfg`.
fn own_row(r: &Replica) -> Option<(Uuid, i64)> {
    let t = r.table("Chassis_Private")?;
    let (u, row) = t
        .iter()
        .filter(|(_, row)| {
            row.get("name")
                .and_then(|d| d.atoms().first())
                .and_then(Atom::as_str)
                == Some(r.chassis_name())
        })
        .min_by_key(|(u, _)| **u)?;
    let nb = row
        .get("nb_cfg")
        .and_then(|d| d.atoms().first())
        .and_then(Atom::as_integer)
        .unwrap_or(0);
    Some((*u, nb))
}

fn sb_nb_cfg(r: &Replica) -> Option<i64> {
    let t = r.table("SB_Global")?;
    let row = t.iter().min_by_key(|(u, _)| **u)?.1;
    row.get("nb_cfg")?.atoms().first()?.as_integer()
}

fn keys_set(keys: &[&str]) -> Value {
    json!(["set", keys])
}

fn pairs_map(pairs: &[(&str, String)]) -> Value {
    json!([
        "map",
        pairs.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>()
    ])
}

/// Set `pairs` (delete their keys, then insert), touching nothing else.
fn set_keys(row: Uuid, pairs: &[(&str, String)]) -> Value {
    let keys: Vec<&str> = pairs.iter().map(|(k, _)| *k).collect();
    json!({
        "op": "mutate", "table": "Chassis_Private",
        "where": [["_uuid", "==", ["uuid", row.to_string()]]],
        "mutations": [
            ["external_ids", "delete", keys_set(&keys)],
            ["external_ids", "insert", pairs_map(pairs)],
        ],
    })
}

/// The registration transaction: the other agent's keys removed, our id
/// added unless present, bridge and sb-cfg set.
pub fn register_ops(cfg: &LivenessConfig, row: Uuid, nb_cfg: i64) -> Vec<Value> {
    let w = json!([["_uuid", "==", ["uuid", row.to_string()]]]);
    let id = agent_id(cfg.kind, &cfg.chassis);
    vec![
        json!({"op": "mutate", "table": "Chassis_Private", "where": w,
               "mutations": [["external_ids", "delete", keys_set(&cfg.kind.other_keys())]]}),
        // `insert` into a map adds only keys not present: Neutron's db_add.
        json!({"op": "mutate", "table": "Chassis_Private", "where": w,
               "mutations": [["external_ids", "insert", pairs_map(&[(cfg.kind.id_key(), id)])]]}),
        set_keys(
            row,
            &[
                (OVN_BRIDGE_KEY, cfg.bridge.clone()),
                (cfg.kind.sb_cfg_key(), nb_cfg.to_string()),
            ],
        ),
    ]
}

/// Why a write did not happen.
enum WriteError {
    /// The row is gone (deleted or re-created): wait for the replica.
    RowGone,
    /// Connection or server trouble: reconnect with backoff.
    Ovsdb(OvsdbError),
}

struct Writer<'a> {
    cfg: &'a LivenessConfig,
    conn: Option<Conn>,
    next_remote: usize,
}

impl Writer<'_> {
    /// Run `ops`. A connection kept from an earlier write may have been
    /// dropped by the server meanwhile (we do not read while idle, so its
    /// inactivity probe goes unanswered): on an IO failure of a reused
    /// connection, retry once on a fresh one.
    fn transact(&mut self, ops: Vec<Value>, stop: &dyn Fn() -> bool) -> Result<(), WriteError> {
        let reused = self.conn.is_some();
        match self.transact_once(ops.clone(), stop) {
            Err(WriteError::Ovsdb(e)) if reused && self.conn.is_none() => {
                log::debug(format_args!(
                    "ovn: liveness: idle southbound connection gone ({e}); reconnecting"
                ));
                self.transact_once(ops, stop)
            }
            other => other,
        }
    }

    fn transact_once(
        &mut self,
        ops: Vec<Value>,
        stop: &dyn Fn() -> bool,
    ) -> Result<(), WriteError> {
        let conn = match &mut self.conn {
            Some(c) => c,
            None => {
                let remote = &self.cfg.remotes[self.next_remote % self.cfg.remotes.len()];
                self.next_remote += 1;
                let c = Conn::open(remote, &self.cfg.conn).map_err(WriteError::Ovsdb)?;
                self.conn.insert(c)
            }
        };
        match conn.transact(SB_DB, ops, stop) {
            Ok(results) => {
                if results
                    .iter()
                    .any(|r| r.get("count").and_then(Value::as_u64) == Some(0))
                {
                    return Err(WriteError::RowGone);
                }
                Ok(())
            }
            Err(e) => {
                if !matches!(e, OvsdbError::Transaction(_)) {
                    self.conn = None;
                }
                Err(WriteError::Ovsdb(e))
            }
        }
    }
}

const TICK: Duration = Duration::from_millis(50);

struct Retry {
    at: Instant,
    backoff: Duration,
}

impl Retry {
    fn fail(
        &mut self,
        cfg: &LivenessConfig,
        stats: &Mutex<LivenessStats>,
        e: WriteError,
        what: &str,
        registered: &mut Option<Uuid>,
    ) {
        match e {
            WriteError::RowGone => {
                *registered = None;
                log::info(format_args!(
                    "ovn: liveness: Chassis_Private {} went away while writing {what}; waiting for it",
                    cfg.chassis
                ));
            }
            WriteError::Ovsdb(e) => {
                let msg = e.to_string();
                log::warn(format_args!(
                    "ovn: liveness: cannot write {what} for chassis {}: {msg}; retrying in {}s",
                    cfg.chassis,
                    self.backoff.as_secs()
                ));
                stats.lock().unwrap_or_else(|e| e.into_inner()).last_error = Some(msg);
                self.at = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

fn run(cfg: &LivenessConfig, sb: &Shared, stats: &Mutex<LivenessStats>, stop: &AtomicBool) {
    let stopped = || stop.load(Ordering::Acquire);
    let with = |f: &mut dyn FnMut(&mut LivenessStats)| {
        f(&mut stats.lock().unwrap_or_else(|e| e.into_inner()))
    };
    let mut w = Writer {
        cfg,
        conn: None,
        next_remote: 0,
    };
    let max_units = max_delay_secs(cfg.agent_down_time);
    // The row we registered on, and the SB_Global.nb_cfg we last acted on.
    let mut registered: Option<Uuid> = None;
    let mut seen: Option<i64> = None;
    let mut first_echo = true;
    let mut due: Option<Instant> = None;
    let mut retry = Retry {
        at: Instant::now(),
        backoff: BACKOFF_FIRST,
    };
    let mut waiting_logged = false;
    while !stopped() {
        std::thread::sleep(TICK);
        if Instant::now() < retry.at || !sb.stats().synced {
            continue;
        }
        let snap = sb.snapshot();
        let Some((row, row_nb_cfg)) = own_row(&snap) else {
            if !waiting_logged {
                waiting_logged = true;
                log::info(format_args!(
                    "ovn: liveness: no Chassis_Private row named {} yet (ovn-controller creates it); waiting",
                    cfg.chassis
                ));
            }
            registered = None;
            continue;
        };
        waiting_logged = false;
        let global = sb_nb_cfg(&snap);
        if registered != Some(row) {
            match w.transact(register_ops(cfg, row, row_nb_cfg), &stopped) {
                Ok(()) => {
                    registered = Some(row);
                    seen = global;
                    retry.backoff = BACKOFF_FIRST;
                    with(&mut |s| {
                        s.registrations += 1;
                        s.last_sb_cfg = Some(row_nb_cfg);
                    });
                    log::info(format_args!(
                        "ovn: liveness: registered as {:?} agent {} on chassis {} (bridge {}, {}={row_nb_cfg}, removed the other agent's keys)",
                        cfg.kind,
                        agent_id(cfg.kind, &cfg.chassis),
                        cfg.chassis,
                        cfg.bridge,
                        cfg.kind.sb_cfg_key(),
                    ));
                }
                Err(e) => retry.fail(cfg, stats, e, "the agent keys", &mut registered),
            }
            continue;
        }
        if global != seen {
            seen = global;
            if due.is_none() {
                let d = if first_echo {
                    Duration::ZERO
                } else {
                    pick_delay(max_units, cfg.delay_unit, random_u64())
                };
                first_echo = false;
                due = Some(Instant::now() + d);
                with(&mut |s| {
                    s.delays.push(d);
                    if s.delays.len() > 64 {
                        s.delays.remove(0);
                    }
                });
            }
        }
        let (Some(at), Some(nb)) = (due, seen) else {
            continue;
        };
        if Instant::now() < at {
            continue;
        }
        match w.transact(
            vec![set_keys(row, &[(cfg.kind.sb_cfg_key(), nb.to_string())])],
            &stopped,
        ) {
            Ok(()) => {
                due = None;
                retry.backoff = BACKOFF_FIRST;
                with(&mut |s| {
                    s.echoes += 1;
                    s.last_sb_cfg = Some(nb);
                });
            }
            Err(e) => retry.fail(cfg, stats, e, "the sb-cfg key", &mut registered),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors from Python's `uuid` with Neutron's formula.
    #[test]
    fn agent_ids_match_neutron() {
        for (name, ovn, meta) in [
            (
                "chassis-local",
                "cc02354b-e7cd-57f3-9fca-c14f0ad314d6",
                "5dfadb38-706c-5fc5-8b7a-e0982207f6af",
            ),
            (
                "compute-1.example.org",
                "7d3c7709-79e7-59fa-bffc-257d24d539da",
                "6fcd1b7c-2afa-570f-beed-ffccbff89eaf",
            ),
            (
                "8f2b4a6e-1d2c-4e3f-9a8b-7c6d5e4f3a21",
                "99d7fd1d-faf4-5882-a539-9344c3929e72",
                "4bc2f746-5b97-5339-a21f-ac9279337c1f",
            ),
            (
                "{8F2B4A6E-1D2C-4E3F-9A8B-7C6D5E4F3A21}",
                "99d7fd1d-faf4-5882-a539-9344c3929e72",
                "4bc2f746-5b97-5339-a21f-ac9279337c1f",
            ),
        ] {
            assert_eq!(agent_id(AgentKind::OvnAgent, name), ovn, "{name}");
            assert_eq!(agent_id(AgentKind::MetadataAgent, name), meta, "{name}");
        }
    }

    #[test]
    fn python_uuid_parsing() {
        let u = "8f2b4a6e-1d2c-4e3f-9a8b-7c6d5e4f3a21";
        let want = uuid::Uuid::parse_str(u).unwrap();
        for ok in [
            u,
            "urn:uuid:8f2b4a6e-1d2c-4e3f-9a8b-7c6d5e4f3a21",
            "8f2b4a6e1d2c4e3f9a8b7c6d5e4f3a21",
            "{8f2b4a6e1d2c4e3f9a8b7c6d5e4f3a21}",
        ] {
            assert_eq!(python_uuid(ok), Some(want), "{ok}");
        }
        // int('0x' + 30 digits, 16) is valid Python: a UUID with leading zeros.
        assert_eq!(
            python_uuid("0x2b4a6e1d2c4e3f9a8b7c6d5e4f3a21"),
            Some(uuid::Uuid::from_u128(0x2b4a6e1d2c4e3f9a8b7c6d5e4f3a21))
        );
        for bad in [
            "chassis-local",
            "8f2b4a6e-1d2c-4e3f-9a8b-7c6d5e4f3a2",
            "8f2b4a6e-1d2c-4e3f-9a8b-7c6d5e4f3a2g",
            "_f2b4a6e1d2c4e3f9a8b7c6d5e4f3a21",
            "8f2b4a6e1d2c4e3f9a8b7c6d5e4f3a2_",
            "8f2b4a6e1d2c4e3f9a8b7c6d5e4f__21",
            "",
        ] {
            assert_eq!(python_uuid(bad), None, "{bad}");
        }
    }

    #[test]
    fn delay_window_is_neutrons() {
        // max(min(agent_down_time // 3, 10), 3)
        assert_eq!(max_delay_secs(DEFAULT_AGENT_DOWN_TIME), 10);
        assert_eq!(max_delay_secs(Duration::from_secs(5)), 3);
        assert_eq!(max_delay_secs(Duration::from_secs(15)), 5);
        assert_eq!(max_delay_secs(Duration::from_secs(3600)), 10);
        // randint(0, 10): both ends reachable, nothing past them.
        let s = Duration::from_secs(1);
        assert_eq!(pick_delay(10, s, 0), Duration::ZERO);
        assert_eq!(pick_delay(10, s, 10), Duration::from_secs(10));
        assert_eq!(pick_delay(10, s, 11), Duration::ZERO);
        assert_eq!(
            pick_delay(10, s, u64::MAX),
            Duration::from_secs(u64::MAX % 11)
        );
        let seen: std::collections::BTreeSet<Duration> =
            (0..2000).map(|_| pick_delay(10, s, random_u64())).collect();
        assert_eq!(seen.len(), 11, "{seen:?}");
        assert!(seen.iter().all(|d| *d <= Duration::from_secs(10)));
    }
}
