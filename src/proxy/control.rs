//! The proxy's control plane: the registry of served namespaces and the only
//! place that changes it (start-up, SIGHUP reload, discovery, `ctl`).
//!
//! It runs on ordinary threads, never on a loop: binding inside a namespace
//! blocks (setns on a helper thread), and a reload must not stall traffic.
//! Loops learn about changes only through their control channels.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::log;
use crate::proxy::config::{NamespaceConfig, ProxyConfig};
use crate::proxy::{bind_namespace, Control, NamespaceListeners, ProxyCounterSnapshot};
use crate::rt::sync::UnboundedSender;
use crate::serve::admit::Gate;

/// Where a namespace registration came from; reload and discovery each
/// manage only their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `[[proxy.namespace]]` in the config file.
    Static,
    /// Found by watching the netns directory.
    Discovered,
}

#[derive(Debug)]
struct Entry {
    origin: Origin,
    listeners: Arc<NamespaceListeners>,
}

/// Registry of served namespaces plus the loops' control channels.
pub struct ControlPlane {
    cfg: Mutex<Arc<ProxyConfig>>,
    loops: Vec<UnboundedSender<Control>>,
    entries: Mutex<BTreeMap<u64, Entry>>,
    next_id: AtomicU64,
}

/// One namespace in a status report.
#[derive(Debug, Clone)]
pub struct NamespaceStatus {
    /// Registration id.
    pub id: u64,
    /// Namespace name.
    pub name: String,
    /// Static or discovered.
    pub origin: Origin,
    /// `X-Neutron-Router-ID: …` or `X-Neutron-Network-ID: …`.
    pub identity: String,
    /// Bound addresses.
    pub listeners: Vec<SocketAddr>,
    /// Open client connections.
    pub connections: usize,
    /// Times an accept loop paused at `max_connections`.
    pub accept_paused: u64,
    /// Counters summed over loops.
    pub counters: ProxyCounterSnapshot,
}

impl ControlPlane {
    /// A control plane for loops reachable through `loops`.
    pub fn new(cfg: Arc<ProxyConfig>, loops: Vec<UnboundedSender<Control>>) -> ControlPlane {
        ControlPlane {
            cfg: Mutex::new(cfg),
            loops,
            entries: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
        }
    }

    fn broadcast(&self, make: impl Fn() -> Control) {
        for l in &self.loops {
            let _ = l.unbounded_send(make());
        }
    }

    /// Tell every loop to drain and exit; every listener stops at once.
    pub fn broadcast_stop(&self) {
        self.broadcast(|| Control::Stop);
        if let Ok(e) = self.entries.lock() {
            for en in e.values() {
                en.listeners
                    .sockets
                    .iter()
                    .for_each(crate::rt::shutdown_listener);
            }
        }
    }

    /// Register already-bound listeners and start serving them on every loop.
    pub fn install(
        &self,
        cfg: NamespaceConfig,
        sockets: Vec<std::net::TcpListener>,
        origin: Origin,
    ) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        for s in &sockets {
            log::info(format_args!(
                "listener up: {} {} -> {} {}",
                cfg.name,
                s.local_addr()
                    .map_or_else(|_| "?".into(), |a| a.to_string()),
                cfg.identity.header_name(),
                cfg.identity.id()
            ));
        }
        let gate = Arc::new(Gate::new(
            format!("ns {}", cfg.name),
            "max_connections",
            self.config().max_connections.get(),
        ));
        let listeners = Arc::new(NamespaceListeners {
            id,
            cfg,
            sockets,
            gate,
            counters: (0..self.loops.len()).map(|_| Arc::default()).collect(),
        });
        self.broadcast(|| Control::Add(listeners.clone()));
        if let Ok(mut e) = self.entries.lock() {
            e.insert(id, Entry { origin, listeners });
        }
        id
    }

    /// Bind `cfg` inside its namespace and serve it.
    ///
    /// # Errors
    /// The namespace cannot be entered or an address bound.
    pub fn add(&self, cfg: NamespaceConfig, origin: Origin) -> io::Result<u64> {
        let backlog = self.config().backlog;
        let sockets = bind_namespace(&cfg, backlog)?;
        Ok(self.install(cfg, sockets, origin))
    }

    /// Stop serving registration `id`: its listeners close, its in-flight
    /// requests finish, no other namespace is touched.
    pub fn remove(&self, id: u64) -> bool {
        let gone = self.entries.lock().ok().and_then(|mut e| e.remove(&id));
        let Some(gone) = gone else { return false };
        self.broadcast(|| Control::Remove(id));
        gone.listeners
            .sockets
            .iter()
            .for_each(crate::rt::shutdown_listener);
        log::info(format_args!(
            "listener down: {} ({} address(es), {} open connection(s) finishing)",
            gone.listeners.cfg.name,
            gone.listeners.sockets.len(),
            gone.listeners.gate.open()
        ));
        true
    }

    /// Registration ids of `origin` whose namespace is `name`.
    pub fn find(&self, origin: Origin, name: &str) -> Vec<u64> {
        self.entries.lock().map_or_else(
            |_| Vec::new(),
            |e| {
                e.iter()
                    .filter(|(_, en)| en.origin == origin && en.listeners.cfg.name == name)
                    .map(|(id, _)| *id)
                    .collect()
            },
        )
    }

    /// The running configuration.
    pub fn config(&self) -> Arc<ProxyConfig> {
        self.cfg
            .lock()
            .map_or_else(|e| e.into_inner().clone(), |c| c.clone())
    }

    /// Apply a new (already validated) configuration: static namespaces are
    /// added, removed or changed; unchanged ones keep their listeners and
    /// connections. Other settings need a restart and are reported as such.
    /// Returns a one-line summary.
    pub fn reload(&self, new: ProxyConfig) -> String {
        let old = self.config();
        let mut restart_needed = Vec::new();
        if old.settings() != new.settings() {
            restart_needed.push("settings outside [[proxy.namespace]]");
        }
        let current: Vec<(u64, NamespaceConfig)> = self.entries.lock().map_or_else(
            |_| Vec::new(),
            |e| {
                e.iter()
                    .filter(|(_, en)| en.origin == Origin::Static)
                    .map(|(id, en)| (*id, en.listeners.cfg.clone()))
                    .collect()
            },
        );
        let (mut removed, mut added, mut failed) = (0, 0, 0);
        for (id, ns) in &current {
            if !new.namespaces.contains(ns) {
                self.remove(*id);
                removed += 1;
            }
        }
        for ns in &new.namespaces {
            if current.iter().any(|(_, c)| c == ns) {
                continue;
            }
            match self.add(ns.clone(), Origin::Static) {
                Ok(_) => added += 1,
                Err(e) => {
                    failed += 1;
                    log::error(format_args!("reload: cannot serve {}: {e}", ns.name));
                }
            }
        }
        let mut kept = (*old).clone();
        kept.namespaces = new.namespaces;
        if let Ok(mut c) = self.cfg.lock() {
            *c = Arc::new(kept);
        }
        let mut msg =
            format!("reload: {added} namespace(s) added, {removed} removed, {failed} failed");
        if !restart_needed.is_empty() {
            let _ = write!(
                msg,
                "; changes to {} take effect after a restart",
                restart_needed.join(", ")
            );
        }
        msg
    }

    /// Per-namespace status, counters summed over every loop.
    pub fn status(&self) -> Vec<NamespaceStatus> {
        let entries = self.entries.lock();
        let Ok(entries) = entries else {
            return Vec::new();
        };
        entries
            .iter()
            .map(|(id, e)| {
                let l = &e.listeners;
                NamespaceStatus {
                    id: *id,
                    name: l.cfg.name.clone(),
                    origin: e.origin,
                    identity: format!("{}: {}", l.cfg.identity.header_name(), l.cfg.identity.id()),
                    listeners: l
                        .sockets
                        .iter()
                        .filter_map(|s| s.local_addr().ok())
                        .collect(),
                    connections: l.gate.open(),
                    accept_paused: l.gate.pauses(),
                    counters: l.counter_totals(),
                }
            })
            .collect()
    }

    /// The Prometheus text `proxy.metrics_listen` serves: every event
    /// counter of every namespace served now, summed over loops, labelled
    /// with the namespace and its router or network id; then the
    /// connections open and the accept pauses per namespace.
    pub fn metrics_text(&self) -> String {
        use crate::metrics::{self as m, label_value};
        let st = self.status();
        let labels = |s: &NamespaceStatus| -> String {
            let (key, id) = match s.identity.split_once(": ") {
                Some(("X-Neutron-Router-ID", id)) => ("router_id", id),
                Some((_, id)) => ("network_id", id),
                None => ("network_id", ""),
            };
            format!(
                "namespace=\"{}\",{key}=\"{}\"",
                label_value(&s.name),
                label_value(id)
            )
        };
        let rows: Vec<(String, ProxyCounterSnapshot)> =
            st.iter().map(|s| (labels(s), s.counters)).collect();
        let mut o = String::new();
        m::write_counters(&mut o, "metaproxy_proxy", &rows);
        let rows = |f: fn(&NamespaceStatus) -> u64| -> Vec<(String, u64)> {
            st.iter().map(|s| (labels(s), f(s))).collect()
        };
        m::write_rows(
            &mut o,
            "metaproxy_proxy_connections_open",
            "Client connections open now.",
            "gauge",
            &rows(|s| s.connections as u64),
        );
        m::write_rows(
            &mut o,
            "metaproxy_proxy_accept_paused_total",
            "Times accepting paused at max_connections or the fd budget.",
            "counter",
            &rows(|s| s.accept_paused),
        );
        m::write_gauge(
            &mut o,
            "metaproxy_proxy_namespaces",
            "Namespaces served now.",
            st.len() as u64,
        );
        o
    }

    /// `status()` as the text `metaproxy ctl status` prints.
    pub fn status_text(&self) -> String {
        let st = self.status();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<44} {:<10} {:<60} {:>6} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "NAMESPACE",
            "ORIGIN",
            "LISTENERS -> IDENTITY",
            "CONNS",
            "ACCEPTED",
            "REQUESTS",
            "UP_ERR",
            "PAUSED",
            "408",
            "429",
            "TOKENS",
            "401"
        );
        for s in &st {
            let listeners: Vec<String> = s.listeners.iter().map(ToString::to_string).collect();
            let _ = writeln!(
                out,
                "{:<44} {:<10} {:<60} {:>6} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
                s.name,
                format!("{:?}", s.origin).to_lowercase(),
                format!("{} -> {}", listeners.join(","), s.identity),
                s.connections,
                s.counters.connections_accepted,
                s.counters.requests,
                s.counters.upstream_errors(),
                s.accept_paused,
                s.counters.rx_timeout,
                s.counters.rate_limited,
                s.counters.tokens_issued,
                s.counters.token_rejected
            );
        }
        let _ = writeln!(out, "{} namespace(s)", st.len());
        out
    }
}

/// The `metaproxy ctl` endpoint: a root-only (0600) Unix socket served by a
/// plain thread. One command per connection: `status`.
pub struct CtlServer {
    path: std::path::PathBuf,
}

impl Drop for CtlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Start answering `metaproxy ctl` on `path` (a stale socket file is replaced).
///
/// # Errors
/// The directory or socket cannot be created.
pub fn serve_ctl(path: &std::path::Path, control: Arc<ControlPlane>) -> io::Result<CtlServer> {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{}: another proxy is answering on this control socket",
                path.display()
            ),
        ));
    }
    let _ = std::fs::remove_file(path);
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("ctl".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut line = String::new();
                if BufReader::new(&conn).read_line(&mut line).is_err() {
                    continue;
                }
                let answer = match line.trim() {
                    "status" => control.status_text(),
                    other => format!("unknown command {other:?}; try `status`\n"),
                };
                let _ = conn.write_all(answer.as_bytes());
            }
        })?;
    Ok(CtlServer {
        path: path.to_path_buf(),
    })
}

/// Ask a running proxy (client side of `metaproxy ctl`).
///
/// # Errors
/// The socket is missing, not ours to open (needs root), or the proxy did not answer.
pub fn ctl_request(path: &std::path::Path, command: &str) -> io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "{}: {e} (is the proxy running? ctl needs root)",
                path.display()
            ),
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("{command}\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}
