//! The boot-storm load generator: N VMs booting within a ramp window, each
//! replaying cloud-init's request sequence from its own source address, every
//! answer checked against the VM that asked.
//!
//! Shape:
//! - **Open loop.** VM `i` starts at `t0 + i * ramp / N` whatever the server
//!   is doing; a slow server piles up VMs instead of slowing arrivals, as a
//!   real boot storm would. Per-VM completion time is measured from the
//!   *scheduled* start, so client-side queueing cannot hide server latency
//!   (no coordinated omission).
//! - **Thread per core.** VMs are dealt round-robin over `workers` pinned
//!   loops ([`rt::run_loops`]); each loop owns its VMs, histograms and
//!   buffers (`Rc`, no locks). The only cross-thread state is one padded block
//!   of relaxed atomics per loop for the progress display, and each loop's
//!   final [`stats::LoopStats`], sent back once over a channel.
//! - **One address per VM.** Every connection binds the VM's inventory fixed
//!   IP (127.16.0.0/12 from `inventory synth`, which the kernel accepts on
//!   loopback without configuration), so the proxy, agent and API see distinct
//!   VMs, and a wrong-VM answer is a real identity bug, not a test artefact.
//! - **New connection per request**, like cloud-init, except in the
//!   `keepalive` micro-profile.
//! - **Bounded memory.** A VM owns no buffer while it waits: read buffers
//!   come from a per-loop pool with the connection and go back with it. Open
//!   connections per loop are capped from `RLIMIT_NOFILE` (raised to the hard
//!   limit at start); a VM waiting for a slot still has the wait in its
//!   completion time, and the waits are counted (`fd_waits`).
//!
//! Rejected: a closed-loop "N concurrent clients" model (hides server
//! latency under load, the opposite of a storm), and reqwest/hyper clients
//! (a second runtime, and they hide connection reuse from us).

#![warn(missing_docs)]

mod check;
mod client;
mod profile;
pub mod stats;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::inventory::Inventory;
use crate::log;
use crate::rt;

pub use stats::{ErrorCounts, ErrorKind, Summary};

/// Default number of VMs.
pub const DEFAULT_VMS: usize = 1000;
/// Default ramp window.
pub const DEFAULT_RAMP: Duration = Duration::from_secs(5);
/// Default per-request timeout (cloud-init's OpenStack datasource uses 10 s).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// File descriptors kept back from the connection cap (stdio, rings, logs).
const RESERVED_FDS: u64 = 256;
/// Delay before VM 0 starts, so every loop is up and pinned first.
const START_LEAD: Duration = Duration::from_millis(100);

/// Errors that stop a storm from running at all (per-request failures are
/// counted in the report instead).
#[derive(Debug, thiserror::Error)]
pub enum StormError {
    /// No instance to run (empty inventory or `--vms 0`).
    #[error("no VMs to run (the inventory has no instance with a fixed IPv4 address)")]
    NoVms,
    /// `--profile` is not one of the four.
    #[error("unknown profile {0:?}: expected cloud-init, openstack, ec2 or keepalive")]
    UnknownProfile(String),
    /// The loop threads could not be started.
    #[error("starting the storm loops: {0}")]
    Loops(#[source] io::Error),
    /// A loop ended with an error or panicked.
    #[error("a storm loop failed: {0}")]
    LoopFailed(String),
}

/// Which request sequence each VM replays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    /// cloud-init 22.4 on OpenStack: the OpenStack datasource sequence, then
    /// its EC2 crawl of `latest/meta-data/` (about 30 requests).
    CloudInit,
    /// The OpenStack datasource: `/openstack` twice, then five files at 2018-08-27.
    Openstack,
    /// The EC2 datasource: readiness probe, version probes (404s), user-data,
    /// and the `meta-data/` crawl at 2009-04-04.
    Ec2,
    /// 20 × `meta_data.json` on one keep-alive connection (raw throughput).
    Keepalive,
}

impl Profile {
    /// The `--profile` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::CloudInit => "cloud-init",
            Profile::Openstack => "openstack",
            Profile::Ec2 => "ec2",
            Profile::Keepalive => "keepalive",
        }
    }
}

impl FromStr for Profile {
    type Err = StormError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cloud-init" => Ok(Profile::CloudInit),
            "openstack" => Ok(Profile::Openstack),
            "ec2" => Ok(Profile::Ec2),
            "keepalive" => Ok(Profile::Keepalive),
            _ => Err(StormError::UnknownProfile(s.to_owned())),
        }
    }
}

impl std::fmt::Display for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a VM is expected to be told: everything a wrong-VM answer would get wrong.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Source address of every connection (the instance's first fixed IPv4).
    pub ip: IpAddr,
    /// Instance UUID (`meta_data.json` `uuid`).
    pub uuid: String,
    /// Bare hostname; answers may carry `.<dhcp_domain>`.
    pub hostname: String,
    /// EC2 `instance-id`.
    pub instance_id: String,
    /// EC2 `reservation-id`.
    pub reservation_id: String,
    /// EC2 `ami-launch-index`.
    pub launch_index: u32,
    /// Raw user-data (`None`: the API answers 404).
    pub user_data: Option<Vec<u8>>,
    /// The first key's data (EC2 `public-keys/0/openssh-key`).
    pub ssh_key: Option<String>,
}

/// EC2 `instance-id` of an EC2 id: `i-%08x`, as `api::ec2` renders it.
pub fn ec2_instance_id(ec2_id: u32) -> String {
    format!("i-{ec2_id:08x}")
}

impl VmSpec {
    /// The first `max` instances of `inv` that have a fixed IPv4 address, in file order.
    pub fn from_inventory(inv: &Inventory, max: usize) -> Vec<VmSpec> {
        inv.instances()
            .filter_map(|inst| {
                let ip = inst.first_fixed_ipv4()?;
                Some(VmSpec {
                    ip,
                    uuid: inst.uuid.clone(),
                    hostname: inst.hostname.clone(),
                    instance_id: ec2_instance_id(inst.ec2_id),
                    reservation_id: inst.reservation_id.clone(),
                    launch_index: inst.launch_index,
                    user_data: inst.user_data.clone(),
                    ssh_key: inst.keys.first().map(|k| k.data.clone()),
                })
            })
            .take(max)
            .collect()
    }
}

/// A validated storm.
#[derive(Debug, Clone)]
pub struct StormConfig {
    /// Where the VMs send their requests (the proxy, `up`, or haproxy).
    pub target: SocketAddr,
    /// The VMs, in start order.
    pub vms: Vec<VmSpec>,
    /// VM `i` starts at `i * ramp / vms.len()`.
    pub ramp: Duration,
    /// Request sequence every VM replays.
    pub profile: Profile,
    /// Pinned loops; VMs are dealt over them round-robin.
    pub workers: NonZeroUsize,
    /// Per request: connect + send + complete response.
    pub timeout: Duration,
    /// Cap on open connections over all loops; `None` = from `RLIMIT_NOFILE`.
    pub max_connections: Option<usize>,
    /// Show progress on stderr (a bar on a terminal, lines otherwise).
    pub progress: bool,
}

impl StormConfig {
    /// A config with the defaults (cloud-init profile, 5 s ramp, 10 s timeout,
    /// one loop per core, progress off).
    pub fn new(target: SocketAddr, vms: Vec<VmSpec>) -> Self {
        StormConfig {
            target,
            vms,
            ramp: DEFAULT_RAMP,
            profile: Profile::CloudInit,
            workers: NonZeroUsize::new(rt::available_cpus()).unwrap_or(NonZeroUsize::MIN),
            timeout: DEFAULT_TIMEOUT,
            max_connections: None,
            progress: false,
        }
    }
}

/// Progress counters of one loop, written only by that loop (relaxed), read
/// by the display. Padded so two loops never share a cache line.
#[repr(align(128))]
#[derive(Debug, Default)]
pub(crate) struct LoopProgress {
    pub(crate) started: AtomicU64,
    pub(crate) completed: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) requests: AtomicU64,
    pub(crate) errors: AtomicU64,
}

impl LoopProgress {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// What every loop reads and nobody writes.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) target: SocketAddr,
    pub(crate) vms: Vec<VmSpec>,
    pub(crate) ramp: Duration,
    pub(crate) profile: Profile,
    pub(crate) timeout: Duration,
    pub(crate) workers: usize,
    pub(crate) conns_per_loop: usize,
    pub(crate) t0: Instant,
    pub(crate) progress: Vec<LoopProgress>,
}

impl Shared {
    /// Scheduled start of VM `i` (open loop).
    pub(crate) fn start_of(&self, i: usize) -> Instant {
        let n = self.vms.len().max(1) as u128;
        let offset_ns = self.ramp.as_nanos() * i as u128 / n;
        self.t0 + Duration::from_nanos(u64::try_from(offset_ns).unwrap_or(u64::MAX))
    }
}

/// Raise the soft `RLIMIT_NOFILE` to the hard limit; returns the new soft limit.
///
/// # Errors
/// getrlimit/setrlimit failed.
pub fn raise_nofile_limit() -> io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(io::Error::from)?;
        log::info(format_args!(
            "storm: raised RLIMIT_NOFILE soft limit from {soft} to the hard limit {hard}"
        ));
    } else {
        log::info(format_args!(
            "storm: RLIMIT_NOFILE soft limit already at the hard limit {hard}"
        ));
    }
    Ok(hard)
}

/// Run a storm to completion and report. Blocks the calling thread; the
/// loops run on their own pinned threads.
///
/// # Errors
/// [`StormError`] if there are no VMs or the loops could not run; request
/// failures are in the report ([`StormReport::passed`]).
pub fn run(cfg: StormConfig) -> Result<stats::StormReport, StormError> {
    if cfg.vms.is_empty() {
        return Err(StormError::NoVms);
    }
    let workers = cfg.workers.get().min(cfg.vms.len());
    let nofile = raise_nofile_limit().unwrap_or_else(|e| {
        log::warn(format_args!("storm: cannot raise RLIMIT_NOFILE: {e}"));
        1024
    });
    let fd_budget = usize::try_from(nofile.saturating_sub(RESERVED_FDS).max(64)).unwrap_or(64);
    let total_conns = cfg.max_connections.unwrap_or(fd_budget).min(fd_budget);
    let conns_per_loop = (total_conns / workers).max(1);
    log::info(format_args!(
        "storm: {} VMs, profile {}, ramp {:?}, timeout {:?}, {workers} loops, \
         at most {conns_per_loop} connections per loop, target {}",
        cfg.vms.len(),
        cfg.profile,
        cfg.ramp,
        cfg.timeout,
        cfg.target
    ));
    let shared = Arc::new(Shared {
        target: cfg.target,
        vms: cfg.vms,
        ramp: cfg.ramp,
        profile: cfg.profile,
        timeout: cfg.timeout,
        workers,
        conns_per_loop,
        t0: Instant::now() + START_LEAD,
        progress: (0..workers).map(|_| LoopProgress::default()).collect(),
    });
    let (tx, rx) = std::sync::mpsc::channel::<stats::LoopStats>();
    let loop_shared = Arc::clone(&shared);
    let handles = rt::run_loops(workers, "storm", move |w| {
        let shared = Arc::clone(&loop_shared);
        let tx = tx.clone();
        async move {
            let stats = profile::run_loop(shared, w).await;
            // The receiver outlives every loop (it is joined below).
            let _ = tx.send(stats);
            Ok(())
        }
    })
    .map_err(StormError::Loops)?;

    let display = stats::Display::new(cfg.progress, &shared);
    while !handles.iter().all(std::thread::JoinHandle::is_finished) {
        display.tick(&shared);
        std::thread::sleep(stats::TICK);
    }
    display.finish(&shared);
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(StormError::LoopFailed(e.to_string())),
            Err(_) => return Err(StormError::LoopFailed("panicked".to_owned())),
        }
    }
    let loops: Vec<stats::LoopStats> = rx.try_iter().collect();
    if loops.len() != workers {
        return Err(StormError::LoopFailed(format!(
            "{} of {workers} loops reported",
            loops.len()
        )));
    }
    Ok(stats::StormReport::merge(&shared, loops))
}

pub use stats::StormReport;
