//! Has the inventory file changed since we loaded it?
//!
//! Polling (mtime, size, inode) alone misses an edit that keeps the size and
//! lands within the same filesystem timestamp tick as the previous write (a
//! tool that rewrites `10.0.0.6` as `10.0.0.8` right after start-up). So the
//! content's SHA-256 is also compared while the file's mtime is recent
//! (within [`AMBIGUOUS`] of the check), which is exactly when a same-tick
//! edit can hide; older files are compared by metadata only, so a large
//! inventory is not re-read every second.

use std::path::Path;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

/// How recent an mtime must be for metadata alone not to be trusted.
pub const AMBIGUOUS: Duration = Duration::from_secs(2);

/// A file's identity as last seen.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FileVersion {
    meta: Option<(SystemTime, u64, u64)>,
    hash: Option<[u8; 32]>,
}

fn meta(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

fn hash(path: &Path) -> Option<[u8; 32]> {
    let bytes = std::fs::read(path).ok()?;
    Some(Sha256::digest(&bytes).into())
}

impl FileVersion {
    /// The file as it is now (taken when it is loaded).
    pub fn of(path: &Path) -> FileVersion {
        FileVersion {
            meta: meta(path),
            hash: hash(path),
        }
    }

    /// Whether the file differs from this version; if so, `self` becomes the
    /// new version. A missing file (mid-rename, deleted) is not a change: the
    /// running inventory stays.
    pub fn changed(&mut self, path: &Path) -> bool {
        let Some(now) = meta(path) else { return false };
        let recent = SystemTime::now()
            .duration_since(now.0)
            .map_or(true, |age| age < AMBIGUOUS);
        if Some(now) == self.meta && !recent {
            return false;
        }
        let h = hash(path);
        let changed = Some(now) != self.meta || h != self.hash;
        if changed {
            self.meta = Some(now);
            self.hash = h;
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_edit_in_the_same_tick_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("inv.toml");
        std::fs::write(&p, "ip = \"10.0.0.6\"\n").unwrap();
        let mut v = FileVersion::of(&p);
        assert!(!v.changed(&p));
        let before = std::fs::metadata(&p).unwrap().modified().unwrap();
        std::fs::write(&p, "ip = \"10.0.0.8\"\n").unwrap();
        // Force the same mtime: the case metadata alone cannot see.
        let f = std::fs::File::options().write(true).open(&p).unwrap();
        f.set_modified(before).unwrap();
        assert!(v.changed(&p), "content changed, metadata identical");
        assert!(!v.changed(&p), "and only once");
        std::fs::remove_file(&p).unwrap();
        assert!(!v.changed(&p), "a vanished file is not a change");
    }
}
