//! Network namespaces: create a socket inside a namespace, keep it after leaving.
//!
//! A socket keeps the namespace it was created in, so one process can serve
//! every router and network namespace: a short-lived helper thread enters the
//! namespace with `setns(CLONE_NEWNET)`, creates and binds the socket, and
//! exits. Using a throwaway thread (rather than setns-and-back on a loop
//! thread) means a failure half-way can never leave a loop thread stranded
//! in the wrong namespace.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// Where `ip netns add` puts named namespaces.
pub const DEFAULT_NETNS_DIR: &str = "/run/netns";

/// Resolve a namespace given as a name (`qrouter-…`, looked up under `dir`) or a path.
pub fn resolve(netns: &str, dir: &Path) -> PathBuf {
    if netns.contains('/') {
        PathBuf::from(netns)
    } else {
        dir.join(netns)
    }
}

/// Run `f` with the calling context inside the network namespace at `netns`
/// (or the process's own namespace for `None`) and return its result.
///
/// # Errors
/// The namespace file cannot be opened or entered, or `f` failed.
pub fn in_namespace<T, F>(netns: Option<&Path>, f: F) -> io::Result<T>
where
    T: Send,
    F: FnOnce() -> io::Result<T> + Send,
{
    let Some(path) = netns else {
        return f();
    };
    let file = File::open(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("network namespace {}: {e}", path.display()),
        )
    })?;
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                io::Error::new(
                    io::Error::from(e).kind(),
                    format!("setns into {}: {e} (needs CAP_SYS_ADMIN)", path.display()),
                )
            })?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("namespace helper thread panicked")))
    })
}
