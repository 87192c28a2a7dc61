//! Namespace auto-discovery: watch the netns directory with inotify and serve
//! every `qrouter-<uuid>`, `qdhcp-<uuid>` and `ovnmeta-<uuid>` that appears.
//!
//! `ip netns add` creates the file and then bind-mounts the namespace on it,
//! and the L3/DHCP/OVN agents add 169.254.169.254 (and wait for IPv6 DAD)
//! only later, so a first bind attempt often fails. Nothing is given up:
//! each namespace is retried with exponential backoff (20 ms → 5 s) until it
//! is served or deleted. A deleted namespace has its listeners closed and its
//! in-flight requests finished; no other namespace is touched.
//!
//! Runs on its own thread (inotify + poll), never on a loop.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use crate::log;
pub use crate::proxy::config::DiscoverConfig;
use crate::proxy::config::{is_uuid, NamespaceConfig, NsIdentity};
use crate::proxy::control::{ControlPlane, Origin};

/// First retry delay after a failed bind.
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
/// First check for a late fe80::a9fe:a9fe.
const V6_FIRST_CHECK: Duration = Duration::from_millis(200);
/// Longest retry delay.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Neutron's metadata IPv6 address.
pub const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0xa9fe, 0xa9fe);

impl DiscoverConfig {
    /// What a namespace name maps to, if anything.
    pub fn classify(&self, name: &str) -> Option<(NsIdentity, Vec<SocketAddr>)> {
        if let Some(id) = name.strip_prefix(&self.router_prefix) {
            return is_uuid(id).then(|| {
                (
                    NsIdentity::Router(id.to_ascii_lowercase()),
                    self.router_listen.clone(),
                )
            });
        }
        let networks = self.network_prefixes.iter().map(|p| (p, false));
        let ovn = self.ovn_prefixes.iter().map(|p| (p, true));
        for (p, is_ovn) in networks.chain(ovn) {
            if let Some(id) = name.strip_prefix(p.as_str()) {
                return is_uuid(id).then(|| {
                    let id = id.to_ascii_lowercase();
                    let identity = if is_ovn {
                        NsIdentity::OvnNetwork(id)
                    } else {
                        NsIdentity::Network(id)
                    };
                    (identity, self.network_listen.clone())
                });
            }
        }
        None
    }
}

/// A running watcher; dropping it does not stop it, [`Watcher::stop`] does.
pub struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    /// Stop watching (served namespaces stay served).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Start watching `cfg.dir`.
///
/// # Errors
/// The directory cannot be created or watched.
pub fn start(cfg: DiscoverConfig, control: Arc<ControlPlane>) -> io::Result<Watcher> {
    std::fs::create_dir_all(&cfg.dir)?;
    let ino =
        Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(io::Error::from)?;
    ino.add_watch(
        &cfg.dir,
        AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM,
    )
    .map_err(io::Error::from)?;
    // A list left empty (`metaproxy ovn` serves no router or DHCP
    // namespaces; its router prefix holds a `/`, which no name can) is not
    // named.
    let routers = std::slice::from_ref(&cfg.router_prefix);
    let routers = if cfg.router_prefix.contains('/') {
        &[][..]
    } else {
        routers
    };
    let what: Vec<String> = [
        (routers, "router id"),
        (&cfg.network_prefixes[..], "network id"),
        (&cfg.ovn_prefixes[..], "OVN network id"),
    ]
    .iter()
    .filter(|(list, _)| !list.is_empty())
    .map(|(list, id)| format!("{}* ({id})", list.join("*, ")))
    .collect();
    log::info(format_args!(
        "discovery: watching {} for {}",
        cfg.dir.display(),
        what.join(", ")
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name("discover".into())
        .spawn(move || run(cfg, control, ino, s2))?;
    Ok(Watcher {
        stop,
        thread: Some(thread),
    })
}

struct Pending {
    due: Instant,
    backoff: Duration,
    failures: u32,
}

fn run(cfg: DiscoverConfig, control: Arc<ControlPlane>, ino: Inotify, stop: Arc<AtomicBool>) {
    let mut pending: HashMap<String, Pending> = HashMap::new();
    // Served network namespaces whose fe80::a9fe:a9fe has not appeared yet
    // (DAD, or the agent adds it later): checked with backoff, and served on
    // it as a second registration once it is there.
    let mut v6_watch: HashMap<String, Pending> = HashMap::new();
    let now = Instant::now();
    if let Ok(rd) = std::fs::read_dir(&cfg.dir) {
        for e in rd.flatten() {
            if let Some(name) = e.file_name().to_str() {
                if cfg.classify(name).is_some() {
                    pending.insert(
                        name.to_string(),
                        Pending {
                            due: now,
                            backoff: FIRST_BACKOFF,
                            failures: 0,
                        },
                    );
                }
            }
        }
    }
    while !stop.load(Ordering::Relaxed) {
        // Sleep until the next retry is due, an event arrives, or 200 ms (stop check).
        let wait = pending
            .values()
            .chain(v6_watch.values())
            .map(|p| p.due.saturating_duration_since(Instant::now()))
            .min()
            .unwrap_or(Duration::from_millis(200))
            .min(Duration::from_millis(200));
        let mut fds = [nix::poll::PollFd::new(
            ino.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ms = u16::try_from(wait.as_millis()).unwrap_or(200);
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms));
        if let Ok(events) = ino.read_events() {
            for ev in events {
                let Some(name) = ev.name.as_ref().and_then(|n| n.to_str()) else {
                    continue;
                };
                if cfg.classify(name).is_none() {
                    continue;
                }
                if ev
                    .mask
                    .intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
                {
                    pending.insert(
                        name.to_string(),
                        Pending {
                            due: Instant::now(),
                            backoff: FIRST_BACKOFF,
                            failures: 0,
                        },
                    );
                } else if ev
                    .mask
                    .intersects(AddWatchFlags::IN_DELETE | AddWatchFlags::IN_MOVED_FROM)
                {
                    pending.remove(name);
                    v6_watch.remove(name);
                    for id in control.find(Origin::Discovered, name) {
                        control.remove(id);
                    }
                }
            }
        }
        let now = Instant::now();
        let due: Vec<String> = pending
            .iter()
            .filter(|(_, p)| p.due <= now)
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            if !control.find(Origin::Discovered, &name).is_empty() {
                pending.remove(&name);
                continue;
            }
            match try_serve(&cfg, &control, &name) {
                Ok(watch_v6) => {
                    pending.remove(&name);
                    if watch_v6 {
                        v6_watch.insert(
                            name.clone(),
                            Pending {
                                due: now + V6_FIRST_CHECK,
                                backoff: V6_FIRST_CHECK,
                                failures: 0,
                            },
                        );
                    }
                }
                Err(e) => {
                    let p = pending.get_mut(&name).expect("due entry exists");
                    p.failures += 1;
                    // The first few failures are the normal race with `ip netns add`
                    // (file before mount) and with the agent adding its address:
                    // debug only. Then a line every 10th try: no log flood.
                    if p.failures < 5 {
                        log::debug(format_args!(
                            "discovery: {name} not served yet (attempt {}): {e}",
                            p.failures
                        ));
                    } else if p.failures == 5 || p.failures % 10 == 0 {
                        log::warn(format_args!(
                            "discovery: {name} not served yet (attempt {}): {e}; retrying",
                            p.failures
                        ));
                    }
                    p.due = now + p.backoff;
                    p.backoff = (p.backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        let due_v6: Vec<String> = v6_watch
            .iter()
            .filter(|(_, p)| p.due <= now)
            .map(|(n, _)| n.clone())
            .collect();
        for name in due_v6 {
            match serve_v6(&cfg, &control, &name) {
                Ok(true) => {
                    v6_watch.remove(&name);
                }
                Ok(false) | Err(_) => {
                    let p = v6_watch.get_mut(&name).expect("due entry exists");
                    p.due = now + p.backoff;
                    p.backoff = (p.backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

/// Add the `[fe80::a9fe:a9fe%if]` listener of an already served network
/// namespace, if the address is there now.
fn serve_v6(cfg: &DiscoverConfig, control: &ControlPlane, name: &str) -> io::Result<bool> {
    let (Some((identity, _)), Some(port)) = (cfg.classify(name), cfg.network_v6_port) else {
        return Ok(true);
    };
    let path = cfg.dir.join(name);
    let Some(ifindex) = v6_metadata_ifindex(&path) else {
        return Ok(false);
    };
    let ns = NamespaceConfig {
        name: name.to_string(),
        netns: Some(path),
        identity,
        listen: vec![SocketAddr::V6(SocketAddrV6::new(
            METADATA_V6,
            port,
            0,
            ifindex,
        ))],
    };
    control.add(ns, Origin::Discovered).map(|_| true)
}

/// Serve `name`; `Ok(true)` when a network namespace still lacks its IPv6
/// listener (fe80::a9fe:a9fe not there yet) and should be watched for it.
fn try_serve(cfg: &DiscoverConfig, control: &ControlPlane, name: &str) -> io::Result<bool> {
    let Some((identity, mut listen)) = cfg.classify(name) else {
        return Ok(false);
    };
    let path = cfg.dir.join(name);
    if !path.exists() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "namespace file is gone",
        ));
    }
    let mut want_v6 = false;
    if identity.is_network() {
        if let Some(port) = cfg.network_v6_port {
            match v6_metadata_ifindex(&path) {
                Some(ifindex) => listen.push(SocketAddr::V6(SocketAddrV6::new(
                    METADATA_V6,
                    port,
                    0,
                    ifindex,
                ))),
                None => want_v6 = true,
            }
        }
    }
    let ns = NamespaceConfig {
        name: name.to_string(),
        netns: Some(path.clone()),
        identity: identity.clone(),
        listen: listen.clone(),
    };
    match control.add(ns, Origin::Discovered) {
        Ok(_) => Ok(want_v6),
        Err(e)
            if matches!(identity, NsIdentity::Router(_))
                && listen
                    .iter()
                    .any(|a| a.ip().is_unspecified() && a.is_ipv6()) =>
        {
            // IPv6 disabled in the namespace: serve v4 only, as Neutron's `bind 0.0.0.0:9697`.
            let v4: Vec<SocketAddr> = listen
                .iter()
                .map(|a| {
                    if a.is_ipv6() && a.ip().is_unspecified() {
                        SocketAddr::from(([0, 0, 0, 0], a.port()))
                    } else {
                        *a
                    }
                })
                .collect();
            let ns = NamespaceConfig {
                name: name.to_string(),
                netns: Some(path),
                identity,
                listen: v4,
            };
            control
                .add(ns, Origin::Discovered)
                .map(|_| false)
                .map_err(|e2| io::Error::new(e2.kind(), format!("{e}; v4 fallback: {e2}")))
        }
        Err(e) => Err(e),
    }
}

/// The interface index holding fe80::a9fe:a9fe inside the namespace, if any.
fn v6_metadata_ifindex(netns: &Path) -> Option<u32> {
    crate::rt::netns::in_namespace(Some(netns), || {
        let text = std::fs::read_to_string("/proc/thread-self/net/if_inet6")?;
        Ok(text.lines().find_map(|l| {
            let mut f = l.split_whitespace();
            let addr = f.next()?;
            let idx = u32::from_str_radix(f.next()?, 16).ok()?;
            (addr == "fe8000000000000000000000a9fea9fe").then_some(idx)
        }))
    })
    .ok()
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DiscoverConfig {
        DiscoverConfig {
            dir: std::path::PathBuf::from("/run/netns"),
            router_prefix: "qrouter-".into(),
            network_prefixes: vec!["qdhcp-".into()],
            ovn_prefixes: vec!["ovnmeta-".into()],
            router_listen: vec!["[::]:9697".parse().unwrap()],
            network_listen: vec!["169.254.169.254:80".parse().unwrap()],
            network_v6_port: Some(80),
        }
    }

    #[test]
    fn names_map_to_identities() {
        let c = cfg();
        let u = "6e1f3b0c-9d6a-4f0e-8b7a-2c1d0e9f8a7b";
        assert_eq!(
            c.classify(&format!("qrouter-{u}")).unwrap().0,
            NsIdentity::Router(u.into())
        );
        assert_eq!(
            c.classify(&format!("qdhcp-{u}")).unwrap().0,
            NsIdentity::Network(u.into())
        );
        assert_eq!(
            c.classify(&format!("ovnmeta-{u}")).unwrap().0,
            NsIdentity::OvnNetwork(u.into())
        );
        assert!(c.classify("qrouter-not-a-uuid").is_none());
        assert!(c.classify(&format!("snat-{u}")).is_none());
        assert!(c.classify(&format!("fip-{u}")).is_none());
    }
}
