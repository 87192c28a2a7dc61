//! Durable store for the instance passwords guests POST to
//! `/openstack/<v>/password` (Nova keeps them in system_metadata).
//!
//! Shape: one append-only log file, `passwords.log`, replayed into a map at
//! open. A record is
//!
//! ```text
//! u32 LE payload length | 32-byte SHA-256(payload) | payload
//! payload = u16 LE id length | instance id | password (UTF-8)
//! ```
//!
//! An empty password is a tombstone (the operator cleared it). `set_once`
//! writes the record and `fsync`s before returning, and the directory is
//! `fsync`ed when the file is created, so a 200 to the guest means the
//! password survives a crash. At open, replay stops at the first short or
//! corrupt record (a torn write from a crash) and the file is truncated back
//! to the last good record, so later appends stay reachable.
//!
//! The passwords are plaintext, so the file is `0600` and the state
//! directory `0700` whatever the umask: both are set explicitly at open
//! (which also repairs a file an older version created `0644`), not left
//! to the systemd unit's `UMask`.
//!
//! A `Mutex` rather than per-core state: POSTs are rare (once per instance
//! lifetime), and they must be serialised for the write-then-insert order.
//! Rejected: one file per instance (a directory fsync per POST and a directory
//! scan at start) and SQLite (a dependency for a few kilobytes).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// Name of the log file inside the state directory.
pub const PASSWORD_LOG_NAME: &str = "passwords.log";
const HEADER_BYTES: usize = 4 + 32;
/// Upper bound on one record's payload; far above Nova's 1020-byte password cap.
const MAX_PAYLOAD_BYTES: usize = 64 * 1024;
/// Mode of `passwords.log`: plaintext passwords, owner only.
pub const PASSWORD_LOG_MODE: u32 = 0o600;
/// Mode of the state directory.
pub const STATE_DIR_MODE: u32 = 0o700;

/// Errors from the password store.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    /// Reading, writing or syncing the log failed.
    #[error("password store {path}: {source}")]
    Io {
        /// The log file.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// A non-empty password is already stored for this instance (→ 409).
    #[error("password already set")]
    AlreadySet,
    /// Instance id or password too large for a record.
    #[error("password record too large")]
    TooLarge,
}

struct State {
    file: File,
    /// Length of the valid prefix of the log (end of the last good record).
    len: u64,
    passwords: HashMap<String, String>,
}

/// The password store; `Sync`, cheap to share behind an `Arc`.
pub struct PasswordStore {
    path: PathBuf,
    state: Mutex<State>,
    /// Test hook: make the next appends fail as if the disk were full.
    #[cfg(test)]
    pub(crate) fail_writes: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for PasswordStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl PasswordStore {
    /// Open (or create) `state_dir/passwords.log` and replay it; make the
    /// directory 0700 and the file 0600 (`STATE_DIR_MODE`, `PASSWORD_LOG_MODE`).
    ///
    /// # Errors
    /// [`PasswordError::Io`] if the directory or file cannot be opened, read,
    /// truncated, synced or made private (e.g. a directory owned by another
    /// user).
    pub fn open(state_dir: &Path) -> Result<PasswordStore, PasswordError> {
        let path = state_dir.join(PASSWORD_LOG_NAME);
        let io = |source| PasswordError::Io {
            path: path.clone(),
            source,
        };
        std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(STATE_DIR_MODE))
            .map_err(|source| PasswordError::Io {
                path: state_dir.to_path_buf(),
                source,
            })?;
        let existed = path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(PASSWORD_LOG_MODE)
            .open(&path)
            .map_err(io)?;
        // `mode` only applies when the file is created (and under the
        // umask); an existing one is made private too.
        file.set_permissions(std::fs::Permissions::from_mode(PASSWORD_LOG_MODE))
            .map_err(io)?;
        if !existed {
            file.sync_all().map_err(io)?;
            File::open(state_dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        let (passwords, good) = replay(&bytes);
        let len = good as u64;
        if good != bytes.len() {
            // Torn tail: drop it so the next record lands right after the last good one.
            file.set_len(len).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        Ok(PasswordStore {
            path,
            state: Mutex::new(State {
                file,
                len,
                passwords,
            }),
            #[cfg(test)]
            fail_writes: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the map ahead of the
        // file (insert happens after sync), so poisoning is safe to ignore.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stored password, if any (never `Some("")`).
    pub fn get(&self, instance: &str) -> Option<String> {
        self.lock().passwords.get(instance).cloned()
    }

    /// Store `password` unless one is already set. Durable before `Ok`.
    /// Storing an empty password is a no-op, as in Nova (an empty value does
    /// not block a later POST).
    ///
    /// # Errors
    /// [`PasswordError::AlreadySet`] (→ 409), [`PasswordError::TooLarge`],
    /// [`PasswordError::Io`] when the record could not be written and synced.
    pub fn set_once(&self, instance: &str, password: &str) -> Result<(), PasswordError> {
        let mut st = self.lock();
        if st.passwords.contains_key(instance) {
            return Err(PasswordError::AlreadySet);
        }
        if password.is_empty() {
            return Ok(());
        }
        self.append(&mut st, instance, password)?;
        st.passwords
            .insert(instance.to_owned(), password.to_owned());
        Ok(())
    }

    /// Forget the password (Nova's operator "clear password"); durable before `Ok`.
    ///
    /// # Errors
    /// As [`PasswordStore::set_once`], without `AlreadySet`.
    pub fn clear(&self, instance: &str) -> Result<(), PasswordError> {
        let mut st = self.lock();
        if !st.passwords.contains_key(instance) {
            return Ok(());
        }
        self.append(&mut st, instance, "")?;
        st.passwords.remove(instance);
        Ok(())
    }

    fn append(&self, st: &mut State, instance: &str, password: &str) -> Result<(), PasswordError> {
        let record = encode(instance, password)?;
        let io = |source| PasswordError::Io {
            path: self.path.clone(),
            source,
        };
        let start = st.len;
        #[cfg(test)]
        if self.fail_writes.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(io(std::io::Error::other("injected write failure")));
        }
        let res = st
            .file
            .seek(SeekFrom::Start(start))
            .and_then(|_| st.file.write_all(&record))
            .and_then(|()| st.file.sync_data());
        if let Err(e) = res {
            // Roll back a partial write so later records stay reachable; if
            // even that fails, replay at the next open drops the torn tail.
            let _ = st.file.set_len(start);
            return Err(io(e));
        }
        st.len = start + record.len() as u64;
        Ok(())
    }
}

fn encode(instance: &str, password: &str) -> Result<Vec<u8>, PasswordError> {
    let id_len = u16::try_from(instance.len()).map_err(|_| PasswordError::TooLarge)?;
    let payload_len = 2 + instance.len() + password.len();
    if payload_len > MAX_PAYLOAD_BYTES {
        return Err(PasswordError::TooLarge);
    }
    let mut payload = Vec::with_capacity(payload_len);
    payload.extend_from_slice(&id_len.to_le_bytes());
    payload.extend_from_slice(instance.as_bytes());
    payload.extend_from_slice(password.as_bytes());
    let mut rec = Vec::with_capacity(HEADER_BYTES + payload_len);
    let len = u32::try_from(payload_len).map_err(|_| PasswordError::TooLarge)?;
    rec.extend_from_slice(&len.to_le_bytes());
    rec.extend_from_slice(&Sha256::digest(&payload));
    rec.extend_from_slice(&payload);
    Ok(rec)
}

/// Replay records; returns the map and the byte length of the valid prefix.
fn replay(bytes: &[u8]) -> (HashMap<String, String>, usize) {
    let mut map = HashMap::new();
    let mut pos = 0;
    while let Some((id, pw, next)) = decode_at(bytes, pos) {
        if pw.is_empty() {
            map.remove(id);
        } else {
            map.insert(id.to_owned(), pw.to_owned());
        }
        pos = next;
    }
    (map, pos)
}

fn decode_at(bytes: &[u8], pos: usize) -> Option<(&str, &str, usize)> {
    let header = bytes.get(pos..pos.checked_add(HEADER_BYTES)?)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if !(2..=MAX_PAYLOAD_BYTES).contains(&len) {
        return None;
    }
    let start = pos + HEADER_BYTES;
    let payload = bytes.get(start..start + len)?;
    if Sha256::digest(payload).as_slice() != &header[4..] {
        return None;
    }
    let id_len = usize::from(u16::from_le_bytes([payload[0], payload[1]]));
    let id = std::str::from_utf8(payload.get(2..2 + id_len)?).ok()?;
    let pw = std::str::from_utf8(&payload[2 + id_len..]).ok()?;
    Some((id, pw, start + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_once_get_and_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let s = PasswordStore::open(dir.path()).unwrap();
        assert_eq!(s.get("a"), None);
        s.set_once("a", "").unwrap();
        assert_eq!(s.get("a"), None);
        s.set_once("a", "pw1").unwrap();
        assert_eq!(s.get("a").as_deref(), Some("pw1"));
        assert!(matches!(
            s.set_once("a", "pw2"),
            Err(PasswordError::AlreadySet)
        ));
        s.clear("a").unwrap();
        assert_eq!(s.get("a"), None);
        s.set_once("a", "pw3").unwrap();
        assert_eq!(s.get("a").as_deref(), Some("pw3"));
    }

    #[test]
    fn durable_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = PasswordStore::open(dir.path()).unwrap();
            s.set_once("a", "pw-a").unwrap();
            s.set_once("b", "pw-b ü").unwrap();
            s.set_once("c", "pw-c").unwrap();
            s.clear("c").unwrap();
        }
        let s = PasswordStore::open(dir.path()).unwrap();
        assert_eq!(s.get("a").as_deref(), Some("pw-a"));
        assert_eq!(s.get("b").as_deref(), Some("pw-b ü"));
        assert_eq!(s.get("c"), None);
    }

    #[test]
    fn torn_tail_is_ignored_and_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join(PASSWORD_LOG_NAME);
        {
            let s = PasswordStore::open(dir.path()).unwrap();
            s.set_once("a", "pw-a").unwrap();
            s.set_once("b", "pw-b").unwrap();
        }
        let full = std::fs::read(&log).unwrap();
        let first_len = encode("a", "pw-a").unwrap().len();
        // Cut the second record at every possible byte.
        for cut in first_len..full.len() {
            std::fs::write(&log, &full[..cut]).unwrap();
            let s = PasswordStore::open(dir.path()).unwrap();
            assert_eq!(s.get("a").as_deref(), Some("pw-a"), "cut {cut}");
            assert_eq!(s.get("b"), None, "cut {cut}");
            assert_eq!(
                std::fs::metadata(&log).unwrap().len(),
                first_len as u64,
                "torn tail truncated"
            );
            // A later record lands after the good prefix and survives reopen.
            s.set_once("c", "pw-c").unwrap();
            drop(s);
            let s = PasswordStore::open(dir.path()).unwrap();
            assert_eq!(s.get("c").as_deref(), Some("pw-c"), "cut {cut}");
        }
    }

    #[test]
    fn corrupt_record_stops_replay() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join(PASSWORD_LOG_NAME);
        {
            let s = PasswordStore::open(dir.path()).unwrap();
            s.set_once("a", "pw-a").unwrap();
            s.set_once("b", "pw-b").unwrap();
        }
        let mut bytes = std::fs::read(&log).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&log, &bytes).unwrap();
        let s = PasswordStore::open(dir.path()).unwrap();
        assert_eq!(s.get("a").as_deref(), Some("pw-a"));
        assert_eq!(s.get("b"), None);
    }

    #[test]
    fn log_is_0600_and_state_dir_0700_whatever_the_umask() {
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        // The usual umask, which left the log world-readable (0644).
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let s = PasswordStore::open(dir.path()).unwrap();
        s.set_once("a", "pw-a").unwrap();
        drop(s);
        let log = dir.path().join(PASSWORD_LOG_NAME);
        assert_eq!(mode(&log), 0o600);
        assert_eq!(mode(dir.path()), 0o700);
        // A log an older version created 0644 is repaired at open.
        std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(PasswordStore::open(dir.path()).unwrap());
        assert_eq!(mode(&log), 0o600);
        nix::sys::stat::umask(old);
    }

    #[test]
    fn open_fails_on_missing_dir() {
        let dir = tempfile::tempdir().unwrap();
        let err = PasswordStore::open(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(err, PasswordError::Io { .. }));
    }
}
