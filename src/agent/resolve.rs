//! Resolve (scope, address) → (instance, project) from the inventory.
//!
//! The inventory is shared by every loop as an `Arc<Inventory>` behind a
//! read-write lock ([`InventoryStore`]): a reload builds a whole new
//! inventory off the loops and swaps the `Arc`, so a request sees either the
//! old or the new file, never a mix. The lock is held only to clone the
//! `Arc`, and only on a cache miss. A generation number tells each loop that
//! its cache (per loop, no locks: habit 7) belongs to an older file and must
//! be dropped.
//!
//! Reload is a std thread ([`Watcher`]) polling the file's mtime every
//! [`INVENTORY_POLL`](super::config::INVENTORY_POLL), or woken on demand. A
//! broken file keeps the old data and logs why, once per change: rejected
//! alternative was inotify, which misses editors that replace the file by
//! rename into a watched directory unless the directory is watched too, and
//! buys nothing at one stat per second.
//!
//! Matching follows Neutron (spec §3.2): router scope → the router's
//! networks, then the port by fixed IP (or by MAC for link-local IPv6) on
//! those networks; exactly one port resolves, zero or several is a 404.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::agent::identity::{LookupKey, Scope};
use crate::inventory::{Inventory, InventoryError};
use crate::log;

/// Who the guest is, as the API is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Instance UUID (Neutron's port `device_id`).
    pub instance: String,
    /// The instance's project (`X-Tenant-ID`).
    pub project: String,
}

/// The outcome of looking one guest up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Exactly one port matched.
    Found(Resolved),
    /// No port matched.
    NotFound,
    /// Several ports matched (overlapping networks behind one router).
    Ambiguous(usize),
}

/// Look a guest up in `inv`.
pub fn resolve(inv: &Inventory, scope: &Scope, key: &LookupKey) -> Resolution {
    let networks: Vec<&str> = match scope {
        Scope::Router(r) => inv.router_networks(r).iter().map(String::as_str).collect(),
        Scope::Network(n) => vec![n.as_str()],
    };
    let ports = match key {
        LookupKey::Ip(ip) => inv.ports_by_ip(&networks, *ip),
        LookupKey::Mac(mac) => inv.ports_by_mac(&networks, *mac),
    };
    match ports.as_slice() {
        [] => Resolution::NotFound,
        [one] => Resolution::Found(Resolved {
            instance: one.instance.uuid.clone(),
            project: one.instance.project.clone(),
        }),
        many => Resolution::Ambiguous(many.len()),
    }
}

/// The current inventory, shared by every loop.
#[derive(Debug)]
pub struct InventoryStore {
    path: PathBuf,
    current: RwLock<Arc<Inventory>>,
    generation: AtomicU64,
    /// The file as it was just before it was read at start-up: the watcher's
    /// baseline, so an edit between loading and the watcher starting is seen.
    loaded: crate::inventory::watch::FileVersion,
}

impl InventoryStore {
    /// Load `path` (start-up: a broken file is an error).
    ///
    /// # Errors
    /// The file cannot be read or is invalid.
    pub fn load(path: &Path) -> Result<InventoryStore, InventoryError> {
        let loaded = crate::inventory::watch::FileVersion::of(path);
        let inv = Inventory::load(path)?;
        Ok(InventoryStore {
            path: path.to_owned(),
            current: RwLock::new(Arc::new(inv)),
            generation: AtomicU64::new(0),
            loaded,
        })
    }

    /// The inventory now, and its generation.
    pub fn current(&self) -> (Arc<Inventory>, u64) {
        // Read the generation first: if a swap races us we may pair a new
        // inventory with an old generation, which only costs one more cache
        // reset later, never a stale answer cached as new.
        let generation = self.generation.load(Ordering::Acquire);
        let inv = match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        (inv, generation)
    }

    /// Generation of the current inventory (bumped by every successful reload).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Re-read the file; keep the old data if the new file is broken.
    ///
    /// # Errors
    /// The new file could not be loaded (the old inventory stays).
    pub fn reload(&self) -> Result<(), InventoryError> {
        let inv = Arc::new(Inventory::load(&self.path)?);
        match self.current.write() {
            Ok(mut g) => *g = inv,
            Err(poisoned) => *poisoned.into_inner() = inv,
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// The file this store reads.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Messages to the watcher thread.
enum WatchMsg {
    Reload(mpsc::Sender<Result<(), String>>),
}

/// The reload thread: polls the inventory's mtime, reloads on change or on demand.
pub struct Watcher {
    tx: Option<mpsc::Sender<WatchMsg>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    /// Start polling `store`'s file every `every`.
    ///
    /// # Errors
    /// The thread could not be spawned.
    pub fn start(store: Arc<InventoryStore>, every: Duration) -> std::io::Result<Watcher> {
        let (tx, rx) = mpsc::channel::<WatchMsg>();
        let thread = std::thread::Builder::new()
            .name("agent-inventory".into())
            .spawn(move || {
                let mut seen = store.loaded.clone();
                loop {
                    let reply = match rx.recv_timeout(every) {
                        Ok(WatchMsg::Reload(reply)) => Some(reply),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => return,
                    };
                    if !seen.changed(store.path()) && reply.is_none() {
                        continue;
                    }
                    let r = store.reload().map_err(|e| e.to_string());
                    match &r {
                        Ok(()) => {
                            log::info(format_args!(
                                "inventory {} reloaded (generation {})",
                                store.path().display(),
                                store.generation()
                            ));
                        }
                        Err(e) => {
                            log::error(format_args!(
                                "inventory {} not reloaded, keeping the previous one: {e}",
                                store.path().display()
                            ));
                        }
                    }
                    if let Some(reply) = reply {
                        let _ = reply.send(r);
                    }
                }
            })?;
        Ok(Watcher {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Reload now and wait for the outcome.
    ///
    /// # Errors
    /// The new file is broken (the message says why); the old data stays.
    pub fn reload(&self) -> Result<(), String> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .as_ref()
            .ok_or("watcher stopped")?
            .send(WatchMsg::Reload(tx))
            .map_err(|_| "watcher stopped".to_string())?;
        rx.recv().map_err(|_| "watcher stopped".to_string())?
    }

    /// Stop the thread and wait for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    const INV: &str = r#"
[[network]]
id = "aaaaaaaa-0000-4000-8000-000000000001"
name = "n1"
project = "p1"
[[network.subnet]]
id = "aaaaaaaa-0000-4000-8000-0000000000b1"
cidr = "10.0.0.0/24"

[[network]]
id = "aaaaaaaa-0000-4000-8000-000000000002"
name = "n2"
project = "p1"
[[network.subnet]]
id = "aaaaaaaa-0000-4000-8000-0000000000b2"
cidr = "10.0.0.0/24"

[[router]]
id = "aaaaaaaa-0000-4000-8000-0000000000c1"
networks = ["aaaaaaaa-0000-4000-8000-000000000001", "aaaaaaaa-0000-4000-8000-000000000002"]

[[instance]]
uuid = "f1aaaaaa-0000-4000-8000-0000000000f1"
hostname = "vm1"
project = "p1"
[[instance.port]]
id = "aaaaaaaa-0000-4000-8000-0000000000e1"
network = "aaaaaaaa-0000-4000-8000-000000000001"
mac = "fa:16:3e:00:00:01"
fixed_ips = ["10.0.0.5"]

[[instance]]
uuid = "f2aaaaaa-0000-4000-8000-0000000000f2"
hostname = "vm2"
project = "p1"
[[instance.port]]
id = "aaaaaaaa-0000-4000-8000-0000000000e2"
network = "aaaaaaaa-0000-4000-8000-000000000002"
mac = "fa:16:3e:00:00:02"
fixed_ips = ["10.0.0.5"]
"#;

    fn ip(s: &str) -> LookupKey {
        LookupKey::Ip(s.parse::<IpAddr>().unwrap())
    }

    #[test]
    fn one_port_resolves_zero_or_several_do_not() {
        let inv = Inventory::from_toml_str(INV).unwrap();
        let n1 = Scope::Network("aaaaaaaa-0000-4000-8000-000000000001".into());
        let r = Scope::Router("aaaaaaaa-0000-4000-8000-0000000000c1".into());
        assert_eq!(
            resolve(&inv, &n1, &ip("10.0.0.5")),
            Resolution::Found(Resolved {
                instance: "f1aaaaaa-0000-4000-8000-0000000000f1".into(),
                project: "p1".into()
            })
        );
        assert_eq!(resolve(&inv, &n1, &ip("10.0.0.6")), Resolution::NotFound);
        assert_eq!(resolve(&inv, &r, &ip("10.0.0.5")), Resolution::Ambiguous(2));
        let unknown = Scope::Router("bbbb".into());
        assert_eq!(
            resolve(&inv, &unknown, &ip("10.0.0.5")),
            Resolution::NotFound
        );
        let mac = LookupKey::Mac([0xfa, 0x16, 0x3e, 0, 0, 2]);
        assert!(matches!(
            resolve(&inv, &r, &mac),
            Resolution::Found(Resolved { ref instance, .. }) if instance.ends_with("f2")
        ));
    }
}
