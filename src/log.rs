//! Logging to stderr: one line per event that matters.
//!
//! A tiny leveled logger instead of a framework: the daemon logs start,
//! listeners up and down, upstream errors and reloads, never one line per
//! request at the default level, and never a secret. Per-request lines come
//! only from [`access`], when a daemon's `access_log` is on.

use std::fmt::Arguments;
use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};

/// Log levels, most severe first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Level {
    /// Something failed.
    Error = 0,
    /// Something is wrong but service continues.
    Warn = 1,
    /// Lifecycle events (default).
    Info = 2,
    /// Per-connection detail.
    Debug = 3,
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);

/// Set the process-wide level.
pub fn set_level(l: Level) {
    LEVEL.store(l as u8, Ordering::Relaxed);
}

/// Whether `l` is enabled.
pub fn enabled(l: Level) -> bool {
    (l as u8) <= LEVEL.load(Ordering::Relaxed)
}

/// Write one line at level `l`.
pub fn log(l: Level, args: Arguments<'_>) {
    if !enabled(l) {
        return;
    }
    let tag = match l {
        Level::Error => "ERROR",
        Level::Warn => "WARN",
        Level::Info => "INFO",
        Level::Debug => "DEBUG",
    };
    emit(tag, args);
}

/// Format the whole line first, then hand it to stderr in one `write(2)`.
/// stderr is unbuffered: writing `format_args!` to it directly costs one
/// syscall per piece (strace of `metaproxy api` start-up: 156 writes for 6
/// lines before, 6 after), and lets the lines of two processes that share
/// a file interleave mid-line.
fn emit(tag: &str, args: Arguments<'_>) {
    use std::fmt::Write as _;
    thread_local! {
        static LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    }
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("main");
    LINE.with(|line| {
        let Ok(mut line) = line.try_borrow_mut() else {
            // Logging from inside a Display impl that logs: skip rather than panic.
            return;
        };
        line.clear();
        let _ = writeln!(line, "metaproxy {tag} [{name}] {args}");
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
        if line.capacity() > 64 * 1024 {
            *line = String::new();
        }
    });
}

/// Write one access-log line, whatever the level: `access_log = true` in a
/// daemon's section asks for them explicitly.
pub fn access(args: Arguments<'_>) {
    emit("ACCESS", args);
}

/// Log at error level.
pub fn error(args: Arguments<'_>) {
    log(Level::Error, args);
}
/// Log at warn level.
pub fn warn(args: Arguments<'_>) {
    log(Level::Warn, args);
}
/// Log at info level.
pub fn info(args: Arguments<'_>) {
    log(Level::Info, args);
}
/// Log at debug level.
pub fn debug(args: Arguments<'_>) {
    log(Level::Debug, args);
}
