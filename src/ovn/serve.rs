//! Serving guests in `ovnmeta-<network>` namespaces: `metaproxy ovn`.
//!
//! What `neutron-ovn-metadata-agent` (or `neutron-ovn-agent`'s metadata
//! extension) does on a compute node, in one process:
//! - **listeners** in every `ovnmeta-<network>` namespace, on the proxy's
//!   engine ([`crate::proxy`]): the trust headers a guest sends are
//!   stripped, `X-OVN-Network-ID: <network>` is stamped from the namespace's
//!   name, as the agent's haproxy does, and IMDSv2 and the rate limits work
//!   as in `[proxy]`;
//! - **resolution** from the Southbound replica ([`crate::ovn::replica`]):
//!   (network, client IP, or for an IPv6 link-local client the MAC of its
//!   EUI-64) → exactly one bound `Port_Binding` → its `external_ids`
//!   `neutron:device_id` and `neutron:project_id` (`server_socket.py`'s
//!   `get_port`). Zero or several matching ports, or ids that are not
//!   OpenStack ids (a tenant writes its own port's `device_id`), are a 404,
//!   never another VM's data. Before the first Southbound snapshot every
//!   request is a 503 (retry), not a 404;
//! - **signing and forwarding** with the four headers Neutron sends
//!   (`X-Forwarded-For`, `X-Instance-ID`, `X-Tenant-ID`,
//!   `X-Instance-ID-Signature`, `proxy_base.py`'s `_proxy_request`) over the
//!   agent's pooled client to the metadata API of `[ovn.nova]` (Nova's, or
//!   `metaproxy api`).
//!
//! **No socket between the listener and the resolution.** The agent
//! ([`crate::agent`]) runs with a third backend, [`OvnReplica`] (beside the
//! inventory and Neutron), as a stage on each of the proxy's loops
//! ([`crate::agent::InProcess`], [`crate::proxy::upstream::Upstream`]'s
//! `InProcess`): after the proxy's rewrite, the same thread resolves from
//! the replica, signs, and forwards over that loop's pooled API client,
//! and writes the agent's answer (its statuses, error pages, 404 retry,
//! HEAD framing and limits) straight to the guest. Resolution is an index
//! lookup on an `Arc` snapshot, O(1), with no lock on the path once a loop
//! has the current snapshot. The first version reached an agent on its own
//! loops over a private Unix socket in a runtime directory
//! (`ovn-<pid>/agent.sock`); that socket, its directory and the second
//! set of loops are gone.
//!
//! **Provisioning** ([`crate::ovn::provision`]), as the agent's `sync`: a
//! thread `ovn-provision` (it blocks on `ip` runs, so never a serving loop)
//! waits for the replica to be in sync, then reconciles the namespaces of
//! the first `[proxy.discover] ovn_prefixes` prefix (`ovnmeta-`) with
//! `desired(&snapshot)`: on every new replica generation whose plan differs
//! from the one last applied (a burst of changes is one reconcile; an
//! `nb_cfg` bump or another chassis' port is none), every
//! [`RESYNC_INTERVAL`], and with backoff (1 s doubling to 60 s) while a
//! [`Report`] is not complete. For a namespace whose `fe80::a9fe:a9fe` is
//! tentative it waits for DAD, as Neutron before its haproxy starts
//! (`wait_until_address_ready`, 30 s), and says if DAD failed (IPv4 only).
//!
//! **Which namespaces are served.** Every `ovnmeta-<uuid>` under the
//! netns directory, found by the proxy's own discovery
//! ([`crate::proxy::discover`], inotify, a bind retried until
//! 169.254.169.254 is there, `[fe80::a9fe:a9fe]` bound once the address is
//! usable, listeners closed when the namespace goes). The provisioner does
//! not add listeners itself: one path serves every namespace, so a
//! namespace is never served twice, and the ones the old agent left are
//! served at start like the ones created later. Rejected: adding the
//! created namespaces with `ControlPlane::add` at once, which races with
//! discovery's own add of the same namespace (the loser's bind fails with
//! `EADDRINUSE`, and a failed add is retried and logged as a problem), to
//! save the tens of milliseconds of discovery's first retries. `ip netns` creates
//! namespaces only in `/run/netns`; with another `[proxy] netns_dir` there
//! is no provisioning (logged at start), and what is there is served as
//! found (tests with hand-made namespaces use that).
//!
//! **Liveness** ([`crate::ovn::liveness`]): the node must not look alive to
//! Neutron unless it serves. Neutron's `start()` runs `sync()` and only
//! then registers the chassis, so the `Chassis_Private` keys are written
//! once the first provisioning pass is done and every namespace it
//! provisioned is served (at most [`SERVE_WAIT`], then a warning naming
//! the rest); on a node with no local VM, once the pass is done. Without
//! provisioning, once the first `ovnmeta-` listener is up (a thread watches
//! the control plane every [`LIVENESS_GATE_POLL`]). No longer once
//! `metaproxy ovn` stops: neutron-server then sees the sb-cfg key fall
//! behind. The namespaces stay at stop, as the agent leaves them.

use std::cell::RefCell;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::agent::config::{AgentConfig, AgentFile, Backend};
use crate::agent::identity::{Identity, Scope};
use crate::agent::inventory::Resolution;
use crate::agent::neutron::BackendError;
use crate::agent::resolve::{BadId, RejectedPorts, Resolved};
use crate::config::{invalid, ConfigError};
use crate::log;
use crate::ovn::config::OvnConfig;
use crate::ovn::ovsdb::read_local_chassis;
use crate::ovn::provision::{desired, Desired, Provisioner, ProvisionerConfig, Report, V6State};
use crate::ovn::replica::{self, Lookup, Replica, SbConfig, SbMonitor};
use crate::proxy::config::{DiscoverFile, ProxyConfig, ProxyFile};

/// The `external_ids` key holding the port's instance (`OVN_DEVID_EXT_ID_KEY`).
pub const DEVICE_ID_KEY: &str = "neutron:device_id";
/// The `external_ids` key holding the port's project (`OVN_PROJID_EXT_ID_KEY`).
pub const PROJECT_ID_KEY: &str = "neutron:project_id";
/// The namespace prefix the OVN agents use (`NS_PREFIX`).
pub const NS_PREFIX: &str = "ovnmeta-";
/// A router prefix no namespace name can have (a name under the netns
/// directory is a file name, never containing `/`): `metaproxy ovn`
/// serves no router namespaces.
const NO_ROUTER_PREFIX: &str = "/";
/// How often the liveness gate looks for the first listener.
pub const LIVENESS_GATE_POLL: Duration = Duration::from_millis(100);

/// The agent backend that resolves from the Southbound replica. Compared by
/// identity (two configs are equal when they read the same replica).
#[derive(Clone)]
pub struct OvnReplica(pub Arc<replica::Shared>);

impl std::fmt::Debug for OvnReplica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.0.stats();
        write!(
            f,
            "ovn southbound replica (synced: {}, connected: {})",
            s.synced, s.connected
        )
    }
}

impl PartialEq for OvnReplica {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for OvnReplica {}

/// The (instance, project) of the guest at `addr` on `network`, as
/// `server_socket.py`'s `get_port` answers it from
/// `get_network_port_bindings_by_ip`. A port whose ids are missing or not
/// OpenStack ids resolves to nothing (reported to `rejected`); Neutron
/// raises `KeyError` for a missing key, which its handler turns into a 500.
pub fn resolve(r: &Replica, network: &str, addr: IpAddr, rejected: &RejectedPorts) -> Resolution {
    let uuid = match r.lookup(network, addr) {
        Lookup::Found(u) => u,
        Lookup::NotFound => return Resolution::NotFound,
        Lookup::Ambiguous(n) => return Resolution::Ambiguous(n),
    };
    let Some(row) = r.port(uuid) else {
        return Resolution::NotFound;
    };
    let ext = |key: &str| {
        row.get("external_ids")
            .and_then(|d| d.map_get(key))
            .and_then(|a| a.as_str())
            .unwrap_or("")
    };
    let (instance, project) = (ext(DEVICE_ID_KEY), ext(PROJECT_ID_KEY));
    match Resolved::new(instance, project) {
        Ok(found) => Resolution::Found(found),
        Err(which) => {
            let port = row
                .get("logical_port")
                .and_then(|d| d.atoms().first())
                .and_then(|a| a.as_str())
                .map_or_else(|| format!("{uuid:?}"), str::to_owned);
            let value = match which {
                BadId::Instance => instance,
                BadId::Project => project,
            };
            rejected.report(&port, which, value);
            Resolution::NotFound
        }
    }
}

/// One agent loop's view of the replica: the last snapshot it saw, replaced
/// when the monitor publishes a new generation. No cache of answers: the
/// index is the cache, and it is never stale by more than one update.
pub struct OvnResolver {
    shared: Arc<replica::Shared>,
    snapshot: RefCell<(u64, Arc<Replica>)>,
    rejected: RejectedPorts,
}

impl OvnResolver {
    /// A resolver over `backend`'s replica.
    pub fn new(backend: &OvnReplica) -> OvnResolver {
        let shared = backend.0.clone();
        let snapshot = RefCell::new((shared.generation(), shared.snapshot()));
        OvnResolver {
            shared,
            snapshot,
            rejected: RejectedPorts::default(),
        }
    }

    /// Resolve a guest. Never from a cache, so the bool (answered from a
    /// cache) is always false and an API 404 is not retried.
    ///
    /// # Errors
    /// No Southbound snapshot yet (503: the guest retries; a 404 would tell
    /// cloud-init there is no metadata).
    pub fn lookup(&self, id: &Identity) -> Result<(Option<Rc<Resolved>>, bool), BackendError> {
        let generation = self.shared.generation();
        if self.snapshot.borrow().0 != generation {
            *self.snapshot.borrow_mut() = (generation, self.shared.snapshot());
        }
        // Generation 0: nothing published, no snapshot yet.
        if generation == 0 {
            return Err(BackendError::Unreachable(
                "OVN Southbound",
                "no snapshot yet".into(),
            ));
        }
        let Scope::Network(network) = &id.scope else {
            // The OVN agent has no router namespaces (`ROUTER_ID_HEADER = ''`).
            return Ok((None, false));
        };
        // The identity parser validated it as one address.
        let Ok(addr) = id.xff.parse::<IpAddr>() else {
            return Ok((None, false));
        };
        let snap = self.snapshot.borrow().1.clone();
        match resolve(&snap, network, addr, &self.rejected) {
            Resolution::Found(r) => Ok((Some(Rc::new(r)), false)),
            Resolution::NotFound => {
                // Neutron's wording, at warning as there.
                log::warn(format_args!(
                    "No port found in network {network} with IP address {}",
                    id.xff
                ));
                Ok((None, false))
            }
            Resolution::Ambiguous(n) => {
                log::error(format_args!(
                    "More than one port ({n}) found in network {network} with IP address {}; \
                     answering 404. Please run the neutron-ovn-db-sync-util script as there \
                     seems to be inconsistent data between Neutron and OVN databases.",
                    id.xff
                ));
                Ok((None, false))
            }
        }
    }
}

/// Everything `metaproxy ovn` runs with, validated.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// `[ovn]`.
    pub ovn: OvnConfig,
    /// The listeners: `[proxy]` (optional) with discovery of `ovnmeta-`
    /// namespaces only and the rate limits of `[ovn.metadata_rate_limiting]`.
    pub proxy: ProxyConfig,
}

/// Read `metaproxy ovn`'s file: `[ovn]` (required) and `[proxy]`
/// (optional: workers, limits, timeouts, IMDSv2, `netns_dir`,
/// `control_socket`, `[proxy.discover] ovn_prefixes`, `network_listen`,
/// `network_v6_port`). Keys that would serve something other than
/// `ovnmeta-` namespaces, or a second rate-limit table, are refused by name.
///
/// # Errors
/// The file, a missing `[ovn]`, or a refused key.
pub fn load(path: &Path) -> Result<ServeConfig, ConfigError> {
    let file = crate::proxy::config::load_file(path)?;
    let Some(t) = file.ovn.as_ref() else {
        return Err(invalid("ovn", "the [ovn] section is required"));
    };
    let ovn = OvnConfig::try_from(t)?;
    let mut p: ProxyFile = file.proxy.unwrap_or_default();
    let refuse = |key: &str, why: &str| Err(invalid(format!("proxy.{key}"), why.to_string()));
    if !p.namespace.is_empty() {
        return refuse(
            "namespace",
            "metaproxy ovn serves the ovnmeta- namespaces it finds; remove the static namespaces",
        );
    }
    if p.agent_socket.is_some() {
        return refuse(
            "agent_socket",
            "metaproxy ovn resolves in-process, with no agent socket; remove it",
        );
    }
    if p.rate_limit.enabled.unwrap_or(false) {
        return refuse(
            "rate_limit",
            "use [ovn.metadata_rate_limiting] (Neutron's section) with metaproxy ovn",
        );
    }
    let d = &p.discover;
    if d.enabled == Some(false) {
        return refuse(
            "discover.enabled",
            "metaproxy ovn always discovers ovnmeta- namespaces",
        );
    }
    for (key, set) in [
        ("discover.router_prefix", d.router_prefix.is_some()),
        ("discover.network_prefixes", d.network_prefixes.is_some()),
        ("discover.router_listen", d.router_listen.is_some()),
    ] {
        if set {
            return refuse(key, "metaproxy ovn serves only ovnmeta- namespaces");
        }
    }
    p.discover = DiscoverFile {
        enabled: Some(true),
        router_prefix: Some(NO_ROUTER_PREFIX.into()),
        network_prefixes: Some(Vec::new()),
        ovn_prefixes: Some(
            d.ovn_prefixes
                .clone()
                .unwrap_or_else(|| vec![NS_PREFIX.into()]),
        ),
        ..d.clone()
    };
    let mut proxy = ProxyConfig::try_from(&p)?;
    proxy.rate_limit = ovn.rate_limit;
    Ok(ServeConfig { ovn, proxy })
}

/// The agent's settings for the in-process OVN backend: Neutron's metadata
/// options from `[ovn]` and `[ovn.nova]`, the agent's defaults otherwise.
fn agent_config(cfg: &OvnConfig, backend: OvnReplica) -> Result<AgentConfig, ConfigError> {
    // The defaults need a backend to validate; it is replaced below.
    let f = AgentFile {
        inventory: Some(PathBuf::from("unused")),
        ..AgentFile::default()
    };
    let mut a = AgentConfig::try_from(&f)?;
    a.backend = Backend::Ovn(backend);
    a.shared_secret = cfg.shared_secret.clone();
    a.nova = cfg.nova.clone();
    Ok(a)
}

/// A running `metaproxy ovn`.
pub struct OvnServe {
    monitor: SbMonitor,
    agent: crate::agent::InProcess,
    proxy: crate::proxy::ProxyHandle,
    watcher: crate::proxy::discover::Watcher,
    ctl: Option<crate::proxy::control::CtlServer>,
    liveness: LivenessGate,
    provisioning: Option<Provisioning>,
    /// This chassis (`Open_vSwitch external_ids:system-id`).
    pub chassis: String,
    /// Its integration bridge (`external_ids:ovn-bridge`, default `br-int`).
    pub bridge: String,
}

impl OvnServe {
    /// Read this chassis' name from the local Open_vSwitch database, start
    /// the Southbound monitor, the agent stage on the listeners' loops and
    /// the listeners with `ovnmeta-` discovery.
    ///
    /// # Errors
    /// The local Open_vSwitch database cannot be read, or a piece fails to
    /// start (each message says which).
    pub fn start(cfg: ServeConfig) -> io::Result<OvnServe> {
        let o = &cfg.ovn.ovsdb;
        let (chassis, bridge) = read_local_chassis(&o.ovs_remote, &o.ovs_conn).map_err(|e| {
            io::Error::other(format!(
                "reading this chassis' name (external_ids:system-id) from the local \
                 Open_vSwitch database {}: {e}",
                o.ovs_remote
            ))
        })?;
        let sb = o
            .sb_remotes
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        log::info(format_args!(
            "ovn: chassis {chassis} (bridge {bridge}); monitoring the Southbound database at {sb}"
        ));
        let monitor = SbMonitor::start(SbConfig {
            remotes: o.sb_remotes.clone(),
            conn: o.sb_conn.clone(),
            chassis: chassis.clone(),
        })?;
        let backend = OvnReplica(monitor.shared().clone());
        let agent_cfg = agent_config(&cfg.ovn, backend)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let proxy_cfg = cfg.proxy;
        let agent = crate::agent::start_in_process(agent_cfg, None, proxy_cfg.workers.get())?;
        let ctl_path = proxy_cfg.control_socket.clone();
        let Some(discover) = proxy_cfg.discover.clone() else {
            return Err(io::Error::other("ovnmeta- discovery is not configured"));
        };
        let link = crate::proxy::upstream::AgentLink::InProcess(agent.stage());
        let proxy = crate::proxy::start_with(proxy_cfg, link)?;
        let ctl = crate::proxy::control::serve_ctl(&ctl_path, proxy.control.clone())
            .map_err(|e| {
                log::warn(format_args!(
                    "control socket {}: {e}; `metaproxy ctl` will not work",
                    ctl_path.display()
                ))
            })
            .ok();
        log::info(format_args!(
            "ovn: serving every {} namespace under {} on {}",
            discover.ovn_prefixes.join(", "),
            discover.dir.display(),
            discover
                .network_listen
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let v6_port = discover.network_v6_port.is_some();
        let netns_dir = discover.dir.clone();
        let prefix = discover.ovn_prefixes.first().cloned();
        let watcher = crate::proxy::discover::start(discover, proxy.control.clone())?;
        // Invariant: discovery runs before provisioning, so every namespace
        // the provisioner creates is seen (inotify) and served by it alone.
        let (provisioning, gate) = match prefix {
            Some(prefix) if is_ip_netns_dir(&netns_dir) => {
                let mut pc =
                    ProvisionerConfig::new(vec![o.ovs_remote.clone()], o.ovs_conn.clone(), &bridge);
                pc.ns_prefix = prefix.clone();
                pc.netns_dir = netns_dir.clone();
                log::info(format_args!(
                    "ovn: provisioning {prefix}<network> namespaces under {} for the networks with a port on this chassis (bridge {bridge}, Open_vSwitch database {})",
                    netns_dir.display(),
                    o.ovs_remote
                ));
                let ready = Arc::new(AtomicBool::new(false));
                let p = Provisioning::start(ProvisionCtx {
                    provisioner: Provisioner::new(pc),
                    sb: monitor.shared().clone(),
                    control: proxy.control.clone(),
                    v6_port,
                    stop: Arc::new(AtomicBool::new(false)),
                    ready: ready.clone(),
                })?;
                (Some(p), GateOn::Provisioned(ready))
            }
            _ => {
                log::warn(format_args!(
                    "ovn: not provisioning namespaces: `ip netns` creates them only in {} and netns_dir is {}; serving the ovnmeta- namespaces found there (liveness once the first is served)",
                    crate::rt::netns::DEFAULT_NETNS_DIR,
                    netns_dir.display()
                ));
                (None, GateOn::FirstListener(proxy.control.clone()))
            }
        };
        let liveness = LivenessGate::start(
            cfg.ovn.liveness(&chassis, &bridge),
            monitor.shared().clone(),
            gate,
        )?;
        Ok(OvnServe {
            monitor,
            agent,
            proxy,
            watcher,
            ctl,
            liveness,
            provisioning,
            chassis,
            bridge,
        })
    }

    /// The listeners' control plane: where a provisioner adds (and removes)
    /// the namespace it has just created.
    pub fn control(&self) -> &Arc<crate::proxy::control::ControlPlane> {
        &self.proxy.control
    }

    /// The replica readers use.
    pub fn replica(&self) -> &Arc<replica::Shared> {
        self.monitor.shared()
    }

    /// Stop front to back: liveness (so Neutron stops seeing the node
    /// alive first), provisioning (after its current `ip` run; the
    /// namespaces stay, as the OVN agent leaves them), discovery, listeners
    /// (draining, each loop's agent stage with them), the agent's shared
    /// pieces, the monitor.
    ///
    /// # Errors
    /// A loop failed while draining.
    pub fn stop(self) -> io::Result<()> {
        self.liveness.stop();
        if let Some(p) = self.provisioning {
            p.stop();
        }
        self.watcher.stop();
        drop(self.ctl);
        let proxy = self.proxy.stop();
        self.agent.stop();
        drop(self.monitor);
        proxy
    }
}

/// How often provisioning reconciles with nothing changed (Neutron resyncs
/// on reconnects only; a periodic pass also repairs what someone else
/// changed on the host, as `ip netns del` by hand).
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(60);
/// First retry after a reconcile that did not complete; doubled up to
/// [`RESYNC_INTERVAL`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// How often the provisioning thread looks for a new replica generation.
const PROVISION_POLL: Duration = Duration::from_millis(100);
/// How long the first reconcile's namespaces may take to be served before
/// this chassis is reported alive anyway (with a warning naming them), as
/// Neutron registers after its `sync` even when a haproxy failed.
pub const SERVE_WAIT: Duration = crate::ovn::provision::DAD_WAIT;

/// Whether `dir` is where `ip netns` (iproute2's `NETNS_RUN_DIR`, and
/// Neutron's pyroute2) creates named namespaces: the only directory the
/// provisioner can create them in.
pub fn is_ip_netns_dir(dir: &Path) -> bool {
    let real = |p: &Path| std::fs::canonicalize(p).ok();
    let run = Path::new(crate::rt::netns::DEFAULT_NETNS_DIR);
    dir == run
        || dir == Path::new("/var/run/netns")
        || real(dir).is_some_and(|d| Some(d) == real(run))
}

/// Whether every namespace in `names` has an IPv4 listener, and an IPv6 one
/// where `v6` says its `fe80::a9fe:a9fe` is usable; the ones that do not.
fn unserved(
    control: &crate::proxy::control::ControlPlane,
    names: &[(String, bool)],
) -> Vec<String> {
    let status = control.status();
    names
        .iter()
        .filter(|(ns, v6)| {
            let addrs: Vec<std::net::SocketAddr> = status
                .iter()
                .filter(|s| &s.name == ns)
                .flat_map(|s| s.listeners.iter().copied())
                .collect();
            !(addrs.iter().any(std::net::SocketAddr::is_ipv4)
                && (!v6 || addrs.iter().any(std::net::SocketAddr::is_ipv6)))
        })
        .map(|(ns, _)| ns.clone())
        .collect()
}

/// The `ovn-provision` thread: reconciles the `ovnmeta-` namespaces with
/// the replica (see the module doc), and says when the first pass is done
/// and served.
struct Provisioning {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What the provisioning thread works with.
struct ProvisionCtx {
    provisioner: Provisioner,
    sb: Arc<replica::Shared>,
    control: Arc<crate::proxy::control::ControlPlane>,
    /// Whether discovery binds `[fe80::a9fe:a9fe]` (`network_v6_port`).
    v6_port: bool,
    stop: Arc<AtomicBool>,
    /// Set once the first reconcile is done and its namespaces are served.
    ready: Arc<AtomicBool>,
}

impl Provisioning {
    fn start(ctx: ProvisionCtx) -> io::Result<Provisioning> {
        let stop = ctx.stop.clone();
        let thread = std::thread::Builder::new()
            .name("ovn-provision".into())
            .spawn(move || ctx.run())?;
        Ok(Provisioning {
            stop,
            thread: Some(thread),
        })
    }

    /// Stop after the current step (an `ip` run, or one DAD/serve poll).
    fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            drop(t.join());
        }
    }
}

impl ProvisionCtx {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Sleep `d` in [`PROVISION_POLL`] steps; false if stopped meanwhile.
    fn pause(&self, d: Duration) -> bool {
        let until = Instant::now() + d;
        while !self.stopped() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            std::thread::sleep(left.min(PROVISION_POLL));
        }
        false
    }

    fn run(mut self) {
        // The plan of the last reconcile that completed.
        let mut applied: Option<Desired> = None;
        let mut seen_generation = None;
        let mut due = Instant::now();
        let mut backoff = RETRY_FIRST;
        let mut waiting_logged = false;
        while !self.stopped() {
            if !self.sb.stats().synced {
                if !waiting_logged {
                    waiting_logged = true;
                    log::info(format_args!(
                        "ovn: provisioning waits for the Southbound replica to be in sync"
                    ));
                }
                self.pause(PROVISION_POLL);
                continue;
            }
            waiting_logged = false;
            let generation = self.sb.generation();
            let moved = seen_generation != Some(generation);
            let now = Instant::now();
            if !moved && now < due {
                self.pause(PROVISION_POLL);
                continue;
            }
            seen_generation = Some(generation);
            let want = desired(&self.sb.snapshot());
            // Coalesced: a Southbound change that changes no plan (another
            // chassis' port, an nb_cfg bump) costs no `ip` run.
            if now < due && applied.as_ref() == Some(&want) {
                continue;
            }
            match self.provisioner.reconcile(&want) {
                Ok(report) => {
                    if !want.chassis_known {
                        // The provisioner logged that it waits; the Chassis
                        // row's arrival is a new generation.
                        applied = None;
                        due = now + RESYNC_INTERVAL;
                        continue;
                    }
                    self.after(&report);
                    if report.complete() {
                        backoff = RETRY_FIRST;
                        due = Instant::now() + RESYNC_INTERVAL;
                        applied = Some(want);
                    } else {
                        log::warn(format_args!(
                            "ovn: provisioning incomplete ({} network(s) failed, {} teardown(s) failed{}); retrying in {}s",
                            report.failed.len(),
                            report.teardown_failed.len(),
                            report
                                .ovs_error
                                .as_ref()
                                .map_or(String::new(), |e| format!(", Open_vSwitch: {e}")),
                            backoff.as_secs()
                        ));
                        due = Instant::now() + backoff;
                        backoff = (backoff * 2).min(RESYNC_INTERVAL);
                        applied = None;
                    }
                }
                Err(e) => {
                    log::error(format_args!(
                        "ovn: provisioning failed: {e}; retrying in {}s",
                        backoff.as_secs()
                    ));
                    due = Instant::now() + backoff;
                    backoff = (backoff * 2).min(RESYNC_INTERVAL);
                    applied = None;
                }
            }
        }
    }

    /// After a reconcile: a summary line if it changed something, Neutron's
    /// DAD wait for the new `fe80::a9fe:a9fe`s, and on the first pass the
    /// wait for every provisioned namespace to be served, then `ready`.
    fn after(&self, report: &Report) {
        if report.changed() || !report.complete() {
            let nets = |l: &[crate::ovn::provision::Provisioned]| {
                l.iter().map(|p| p.namespace.clone()).collect::<Vec<_>>()
            };
            log::info(format_args!(
                "ovn: reconciled: created [{}], updated [{}], removed [{}], failed [{}], {} unchanged",
                nets(&report.created).join(", "),
                nets(&report.updated).join(", "),
                report.removed.join(", "),
                report
                    .failed
                    .iter()
                    .map(|f| f.namespace.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                report.unchanged.len()
            ));
        }
        // Discovery binds [fe80::a9fe:a9fe] once the address is usable
        // (a bind of a tentative one fails and is retried); this is the wait
        // Neutron does before its haproxy starts, so that the first pass is
        // "done" only after DAD, and a failed DAD is said once.
        let mut v6_ok: Vec<(String, bool)> = Vec::new();
        let until = Instant::now() + crate::ovn::provision::DAD_WAIT;
        for p in report.serving() {
            let mut state = p.v6;
            while state == V6State::Tentative && Instant::now() < until && !self.stopped() {
                std::thread::sleep(PROVISION_POLL);
                // A namespace that cannot be read now is the next
                // reconcile's business, not a reason to wait.
                let Ok(now) = self.provisioner.v6_state(&p.network) else {
                    break;
                };
                state = now;
            }
            match (p.v6, state) {
                (before, V6State::DadFailed)
                    if before == V6State::Tentative || !p.changes.is_empty() =>
                {
                    log::warn(format_args!(
                        "ovn: {}: DAD failed for fe80::a9fe:a9fe (another node answers for it); serving IPv4 only, as Neutron does",
                        p.namespace
                    ));
                }
                (V6State::Tentative, V6State::Tentative) => log::warn(format_args!(
                    "ovn: {}: fe80::a9fe:a9fe still tentative after {}s; IPv6 served once DAD ends",
                    p.namespace,
                    crate::ovn::provision::DAD_WAIT.as_secs()
                )),
                _ => {}
            }
            v6_ok.push((p.namespace.clone(), self.v6_port && state == V6State::Ready));
        }
        if self.ready.load(Ordering::Acquire) {
            return;
        }
        let t0 = Instant::now();
        loop {
            let left = unserved(&self.control, &v6_ok);
            if left.is_empty() {
                log::info(format_args!(
                    "ovn: first provisioning pass done: {} namespace(s) provisioned and served",
                    v6_ok.len()
                ));
                break;
            }
            if t0.elapsed() >= SERVE_WAIT {
                log::warn(format_args!(
                    "ovn: first provisioning pass done, but not served after {}s: {}",
                    SERVE_WAIT.as_secs(),
                    left.join(", ")
                ));
                break;
            }
            if !self.pause(PROVISION_POLL) {
                return;
            }
        }
        self.ready.store(true, Ordering::Release);
    }
}

/// When [`LivenessGate`] starts the liveness writer.
enum GateOn {
    /// Once the provisioning thread's first pass is done and served
    /// (Neutron's `start()`: `sync()`, then register), even with no
    /// namespace at all on a node without local VMs.
    Provisioned(Arc<AtomicBool>),
    /// Once the first listener is up (no provisioning: someone else makes
    /// the namespaces).
    FirstListener(Arc<crate::proxy::control::ControlPlane>),
}

/// Starts [`crate::ovn::liveness::Liveness`] once [`GateOn`] says so.
struct LivenessGate {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Option<crate::ovn::liveness::Liveness>>>,
}

impl LivenessGate {
    fn start(
        cfg: crate::ovn::liveness::LivenessConfig,
        sb: Arc<replica::Shared>,
        on: GateOn,
    ) -> io::Result<LivenessGate> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ovn-liveness-gate".into())
            .spawn(move || loop {
                if stopped.load(Ordering::Acquire) {
                    return None;
                }
                let why = match &on {
                    GateOn::Provisioned(ready) => ready
                        .load(Ordering::Acquire)
                        .then(|| "the first provisioning pass is done".to_string()),
                    GateOn::FirstListener(control) => control
                        .status()
                        .into_iter()
                        .find(|s| !s.listeners.is_empty())
                        .map(|ns| format!("{} serves", ns.name)),
                };
                if let Some(why) = why {
                    log::info(format_args!(
                        "ovn: {why}; reporting this chassis alive to Neutron \
                         (Chassis_Private {} external_ids {}, {})",
                        cfg.chassis,
                        cfg.kind.id_key(),
                        cfg.kind.sb_cfg_key()
                    ));
                    return match crate::ovn::liveness::Liveness::start(cfg, sb) {
                        Ok(l) => Some(l),
                        Err(e) => {
                            log::error(format_args!("ovn: liveness not started: {e}"));
                            None
                        }
                    };
                }
                std::thread::sleep(LIVENESS_GATE_POLL);
            })?;
        Ok(LivenessGate {
            stop,
            thread: Some(thread),
        })
    }

    /// Stop waiting, and stop the writer if it started.
    fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            drop(t.join());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::identity::IdText;
    use crate::ovn::ovsdb::datum::Schema;
    use serde_json::json;

    const CH: &str = "00000000-0000-4000-8000-0000000000c1";
    const DP: &str = "00000000-0000-4000-8000-0000000000d1";
    const NET: &str = "5f0ee41c-5a43-4b7b-8b8b-5dcd3b1b0a01";
    const VM: &str = "c0ffee00-0000-4000-8000-000000000001";
    const PROJECT: &str = "0b3cfd5e3d9f4d1e9c0a1f6b1c2d3e4f";

    fn replica(ports: &[(&str, &str, &str, &str)]) -> Replica {
        let map = json!({"key": "string", "value": "string", "min": 0, "max": "unlimited"});
        let opt_ref = json!({"key": {"type": "uuid", "refTable": "Chassis", "refType": "weak"}, "min": 0, "max": 1});
        let schema = Schema::from_json(&json!({
            "name": "OVN_Southbound", "version": "20.27.0",
            "tables": {
                "Chassis": {"columns": {"name": {"type": "string"}}},
                "Datapath_Binding": {"columns": {"tunnel_key": {"type": "integer"}, "external_ids": {"type": map}}},
                "Port_Binding": {"columns": {
                    "logical_port": {"type": "string"}, "type": {"type": "string"},
                    "datapath": {"type": {"key": {"type": "uuid", "refTable": "Datapath_Binding"}}},
                    "chassis": {"type": opt_ref},
                    "mac": {"type": {"key": "string", "min": 0, "max": "unlimited"}},
                    "external_ids": {"type": map}}}
            }
        }))
        .unwrap();
        let mut r = Replica::new("local", &schema);
        let mut pb = serde_json::Map::new();
        for (i, (name, mac, device, project)) in ports.iter().enumerate() {
            pb.insert(
                format!("00000000-0000-4000-8000-{:012x}", 0x100 + i),
                json!({"initial": {
                    "logical_port": name, "datapath": ["uuid", DP], "chassis": ["uuid", CH],
                    "mac": mac,
                    "external_ids": ["map", [["neutron:device_id", device], ["neutron:project_id", project]]]
                }}),
            );
        }
        r.apply(
            &json!({
                "Chassis": {CH: {"initial": {"name": "local"}}},
                "Datapath_Binding": {DP: {"initial": {"tunnel_key": 1,
                    "external_ids": ["map", [["name", format!("neutron-{NET}")]]]}}},
                "Port_Binding": pb,
            }),
            false,
        )
        .unwrap();
        r
    }

    fn at(r: &Replica, addr: &str) -> Resolution {
        resolve(r, NET, addr.parse().unwrap(), &RejectedPorts::default())
    }

    #[test]
    fn the_port_s_device_and_project_ids_are_the_instance_and_tenant() {
        let r = replica(&[("p1", "fa:16:3e:00:00:01 10.0.0.5", VM, PROJECT)]);
        assert_eq!(
            at(&r, "10.0.0.5"),
            Resolution::Found(Resolved::new(VM, PROJECT).unwrap())
        );
        // Link-local: by the MAC of its EUI-64.
        assert_eq!(
            at(&r, "fe80::f816:3eff:fe00:1"),
            Resolution::Found(Resolved::new(VM, PROJECT).unwrap())
        );
        assert_eq!(at(&r, "10.0.0.6"), Resolution::NotFound);
        assert_eq!(
            resolve(
                &r,
                "other",
                "10.0.0.5".parse().unwrap(),
                &RejectedPorts::default()
            ),
            Resolution::NotFound
        );
    }

    #[test]
    fn two_ports_with_the_address_are_ambiguous() {
        let r = replica(&[
            ("p1", "fa:16:3e:00:00:01 10.0.0.5", VM, PROJECT),
            ("p2", "fa:16:3e:00:00:02 10.0.0.5", VM, PROJECT),
        ]);
        assert_eq!(at(&r, "10.0.0.5"), Resolution::Ambiguous(2));
    }

    #[test]
    fn ids_that_are_not_openstack_ids_resolve_to_nothing() {
        for (device, project) in [
            ("vm-1\r\nX-Instance-ID: x", PROJECT),
            ("", PROJECT),
            (VM, "proj ect"),
            (VM, ""),
        ] {
            let r = replica(&[("p1", "fa:16:3e:00:00:01 10.0.0.5", device, project)]);
            let rejected = RejectedPorts::default();
            let got = resolve(&r, NET, "10.0.0.5".parse().unwrap(), &rejected);
            assert_eq!(got, Resolution::NotFound, "{device:?} {project:?}");
            assert!(rejected.reported("p1"));
        }
    }

    #[test]
    fn before_the_first_snapshot_every_guest_is_told_to_retry() {
        use crate::agent::identity::LookupKey;
        use crate::ovn::ovsdb::{ConnOptions, Remote};
        let dir = tempfile::tempdir().unwrap();
        let nowhere = format!("unix:{}", dir.path().join("no.sock").display());
        let monitor = SbMonitor::start(SbConfig {
            remotes: vec![Remote::parse(&nowhere).unwrap()],
            conn: ConnOptions::default(),
            chassis: "local".into(),
        })
        .unwrap();
        let r = OvnResolver::new(&OvnReplica(monitor.shared().clone()));
        let id = Identity {
            scope: Scope::Network(IdText::new(NET).unwrap()),
            key: LookupKey::from_addr("10.0.0.5".parse().unwrap()),
            xff: IdText::new("10.0.0.5").unwrap(),
        };
        // A 503, not a 404 (which cloud-init takes as "no metadata").
        assert!(matches!(
            r.lookup(&id),
            Err(BackendError::Unreachable("OVN Southbound", _))
        ));
    }

    fn load_str(text: &str) -> Result<ServeConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.toml");
        std::fs::write(&p, text).unwrap();
        load(&p)
    }

    #[test]
    fn config_serves_only_ovnmeta_namespaces_with_neutron_s_rate_limits() {
        let c = load_str(
            "[ovn]\n[ovn.metadata_rate_limiting]\nenabled = true\n[proxy]\nnetns_dir = \"/x\"\n",
        )
        .unwrap();
        let d = c.proxy.discover.unwrap();
        assert_eq!(d.ovn_prefixes, ["ovnmeta-"]);
        assert!(d.network_prefixes.is_empty());
        assert_eq!(d.dir, Path::new("/x"));
        assert_eq!(
            d.classify("qrouter-5f0ee41c-5a43-4b7b-8b8b-5dcd3b1b0a01"),
            None
        );
        assert!(d.classify(&format!("ovnmeta-{NET}")).is_some());
        assert!(c.proxy.rate_limit.is_some());
        assert!(load_str("[ovn]\n").unwrap().proxy.rate_limit.is_none());
    }

    #[test]
    fn only_ip_netns_own_directory_is_provisioned() {
        assert!(is_ip_netns_dir(Path::new("/run/netns")));
        assert!(is_ip_netns_dir(Path::new("/var/run/netns")));
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_ip_netns_dir(dir.path()));
        assert!(!is_ip_netns_dir(Path::new("/run/netns-private")));
    }

    #[test]
    fn config_refuses_keys_that_serve_something_else_naming_them() {
        let err = |t: &str| load_str(t).unwrap_err().to_string();
        assert!(err("[proxy]\n").contains("ovn"), "{}", err("[proxy]\n"));
        for (text, key) in [
            ("[ovn]\n[proxy]\nagent_socket = \"/a\"\n", "proxy.agent_socket"),
            (
                "[ovn]\n[[proxy.namespace]]\nnetns = \"x\"\nnetwork_id = \"5f0ee41c-5a43-4b7b-8b8b-5dcd3b1b0a01\"\nlisten = \"169.254.169.254:80\"\n",
                "proxy.namespace",
            ),
            ("[ovn]\n[proxy.rate_limit]\nenabled = true\n", "proxy.rate_limit"),
            ("[ovn]\n[proxy.discover]\nenabled = false\n", "proxy.discover.enabled"),
            (
                "[ovn]\n[proxy.discover]\nrouter_prefix = \"qrouter-\"\n",
                "proxy.discover.router_prefix",
            ),
            ("[ovn]\novsdb_probe_interval = \"x\"\n", "ovsdb_probe_interval"),
        ] {
            assert!(err(text).contains(key), "{text}: {}", err(text));
        }
    }
}
