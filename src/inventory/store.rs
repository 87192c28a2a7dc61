//! The running inventory, reloaded in place: one [`Store`] per file, one
//! [`Watcher`] thread per store, a [`Local`] copy per loop.
//!
//! The agent (`backend = "inventory"`) and the API serve from the same kind
//! of store. A reload builds a whole new [`Inventory`] off the loops and
//! swaps the `Arc`, then bumps an atomic generation, so a request sees either
//! the old or the new file, never a mix. A loop holds its own [`Local`]: on
//! each use it reads the generation (one atomic load) and takes the store's
//! lock only when that changed, to clone the new `Arc`. Nothing on the
//! request path locks otherwise (habit 7: per-loop state, cores talk only
//! through the store's generation). The agent also uses the generation to
//! drop a resolution cache filled from an older file.
//!
//! Reload happens on a file change ([`Watcher`], polling
//! [`FileVersion`] every [`POLL_INTERVAL`]) and on demand
//! ([`Store::reload`]: SIGHUP, the handles' `reload_inventory`). A broken file
//! keeps the old inventory and logs the error, which names the line or key;
//! the watcher logs it once per change. Reloads are serialized, so the
//! inventory installed last is always one read after the latest completed
//! edit that any reload saw (two racing reloads cannot put an older read
//! back).
//!
//! Rejected: a `RwLock<Arc<Inventory>>` read on every request (the API had
//! one; it is a shared cache line written by every reader on every core);
//! and inotify instead of polling: inotify watches an inode, so editors and
//! config management that replace the file by rename need the directory
//! watched and the events filtered, while one `stat` a second is trivially
//! correct and costs nothing.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::watch::FileVersion;
use super::{Inventory, InventoryError};
use crate::log;

/// How often the watcher looks at the file.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// One inventory file, loaded, shared by every loop of a daemon.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    /// Written only under `reloading`; read by a [`Local`] whose generation
    /// is behind.
    current: Mutex<Arc<Inventory>>,
    /// Bumped after every swap of `current`.
    generation: AtomicU64,
    /// Held for a whole reload (read, parse, swap), so reloads are serialized.
    reloading: Mutex<()>,
    /// The file as it was just before it was read at start-up: the watcher's
    /// baseline, so an edit between loading and the watcher starting is seen.
    loaded: FileVersion,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Store {
    /// Load `path` (start-up: a broken file is an error).
    ///
    /// # Errors
    /// The file cannot be read or is invalid.
    pub fn load(path: &Path) -> Result<Store, InventoryError> {
        let loaded = FileVersion::of(path);
        let inv = Inventory::load(path)?;
        Ok(Store {
            path: path.to_owned(),
            current: Mutex::new(Arc::new(inv)),
            generation: AtomicU64::new(0),
            reloading: Mutex::new(()),
            loaded,
        })
    }

    /// The file this store reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Generation of the current inventory (0 at start, bumped by every
    /// successful reload).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The inventory now, and its generation. Takes the lock: loops use a
    /// [`Local`] instead.
    pub fn current(&self) -> (Arc<Inventory>, u64) {
        // Invariant: the generation is read before the inventory, and a
        // reload swaps before it bumps. A race can only pair a newer
        // inventory with an older generation (one more refresh later), never
        // an older inventory with a newer generation.
        let generation = self.generation();
        (lock(&self.current).clone(), generation)
    }

    /// Re-read the file and swap it in; requests in flight finish on the old
    /// one. Logs the outcome either way.
    ///
    /// # Errors
    /// The file could not be read or is not a valid inventory (the error
    /// names the line or key); the old inventory stays.
    pub fn reload(&self) -> Result<(), InventoryError> {
        let _serial = lock(&self.reloading);
        match Inventory::load(&self.path) {
            Ok(inv) => {
                let instances = inv.instances().count();
                *lock(&self.current) = Arc::new(inv);
                let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
                log::info(format_args!(
                    "inventory {} reloaded (generation {generation}): {instances} instance(s)",
                    self.path.display()
                ));
                Ok(())
            }
            Err(e) => {
                log::error(format_args!(
                    "inventory {} not reloaded, keeping the previous one: {e}",
                    self.path.display()
                ));
                Err(e)
            }
        }
    }

    /// A copy for one loop.
    pub fn local(self: &Arc<Self>) -> Local {
        let (inv, generation) = self.current();
        Local {
            store: self.clone(),
            copy: RefCell::new(Rc::new(inv)),
            generation: Cell::new(generation),
        }
    }
}

/// One loop's view of a [`Store`]: its own copy of the inventory, refreshed
/// when the store's generation moved. Not `Sync`: one per loop.
///
/// The copy is an `Rc` around the store's `Arc`, so handing it to a request
/// is a plain increment on this core, not an atomic one on a counter every
/// loop shares.
#[derive(Debug)]
pub struct Local {
    store: Arc<Store>,
    // Not `Arc<Inventory>` alone: cloning that per request would write the
    // one reference count every loop shares. The extra box is made once per
    // reload per loop.
    #[allow(clippy::redundant_allocation)]
    copy: RefCell<Rc<Arc<Inventory>>>,
    generation: Cell<u64>,
}

impl Local {
    /// The current inventory and its generation: an atomic load, plus the
    /// store's lock once after each reload.
    #[allow(clippy::redundant_allocation)] // see `copy`
    pub fn get(&self) -> (Rc<Arc<Inventory>>, u64) {
        if self.store.generation() != self.generation.get() {
            let (inv, generation) = self.store.current();
            *self.copy.borrow_mut() = Rc::new(inv);
            self.generation.set(generation);
        }
        (self.copy.borrow().clone(), self.generation.get())
    }

    /// The store it copies.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }
}

/// The thread that polls a store's file and reloads it when it changed.
/// Stopped (and joined) by [`Watcher::stop`] or on drop.
#[derive(Debug)]
pub struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    /// Poll `store`'s file every `every` on a thread named `name`.
    ///
    /// # Errors
    /// The thread could not be spawned.
    pub fn start(store: Arc<Store>, every: Duration, name: &str) -> std::io::Result<Watcher> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let mut seen = store.loaded.clone();
                while !flag.load(Ordering::Acquire) {
                    std::thread::park_timeout(every);
                    if flag.load(Ordering::Acquire) {
                        break;
                    }
                    // A vanished file (mid-rename, or deleted) keeps the old inventory.
                    if seen.changed(store.path()) {
                        let _ = store.reload();
                    }
                }
            })?;
        Ok(Watcher {
            stop,
            thread: Some(thread),
        })
    }

    /// Stop the thread and wait for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
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

    const ONE: &str = r#"
[[network]]
id = "aaaaaaaa-0000-4000-8000-000000000001"
name = "n1"
project = "p1"
[[network.subnet]]
id = "aaaaaaaa-0000-4000-8000-0000000000b1"
cidr = "10.0.0.0/24"

[[instance]]
uuid = "11111111-1111-4111-8111-111111111111"
hostname = "vm1"
project = "p1"
[[instance.port]]
id = "aaaaaaaa-0000-4000-8000-0000000000c1"
network = "aaaaaaaa-0000-4000-8000-000000000001"
mac = "fa:16:3e:00:00:01"
fixed_ips = ["10.0.0.5"]
"#;

    /// `ONE` without its instance.
    fn none() -> &'static str {
        ONE.split("[[instance]]").next().unwrap()
    }

    fn count(l: &Local) -> usize {
        l.get().0.instances().count()
    }

    #[test]
    fn a_local_copy_follows_reloads_and_a_broken_file_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("inv.toml");
        std::fs::write(&p, ONE).unwrap();
        let store = Arc::new(Store::load(&p).unwrap());
        let local = store.local();
        assert_eq!((count(&local), local.get().1), (1, 0));

        std::fs::write(&p, "[[instance]\n").unwrap();
        let e = store.reload().unwrap_err().to_string();
        assert!(e.contains("line 1"), "the error names the line: {e}");
        assert_eq!((count(&local), store.generation()), (1, 0));

        std::fs::write(&p, none()).unwrap();
        store.reload().unwrap();
        assert_eq!((count(&local), local.get().1), (0, 1));
        // Another loop's copy, made before the reload, sees it too.
        let other = store.local();
        std::fs::write(&p, ONE).unwrap();
        store.reload().unwrap();
        assert_eq!((count(&other), other.get().1), (1, 2));
    }

    #[test]
    fn the_watcher_reloads_a_changed_file_and_stops_promptly() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("inv.toml");
        std::fs::write(&p, ONE).unwrap();
        let store = Arc::new(Store::load(&p).unwrap());
        let w = Watcher::start(store.clone(), Duration::from_millis(10), "test-watch").unwrap();
        std::fs::write(&p, none()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while store.generation() == 0 {
            assert!(std::time::Instant::now() < deadline, "not reloaded");
            std::thread::yield_now();
        }
        assert_eq!(store.current().0.instances().count(), 0);
        let t = std::time::Instant::now();
        w.stop();
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
