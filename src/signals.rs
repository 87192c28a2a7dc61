//! Process signals and service-manager readiness.
//!
//! SIGTERM, SIGINT and SIGHUP are blocked in the main thread before any loop
//! starts (threads inherit the mask), and the main thread waits for them with
//! `sigwait`: no async signal handler ever runs on a loop.

use std::io;

use nix::sys::signal::{SigSet, Signal};

/// The blocked set, waited on by the main thread.
pub struct Signals(SigSet);

/// Block the terminating signals for this thread and every thread it starts.
///
/// # Errors
/// The mask could not be changed.
pub fn block_terminating() -> io::Result<Signals> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    set.thread_block().map_err(io::Error::from)?;
    Ok(Signals(set))
}

/// A signal the daemon acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// SIGTERM or SIGINT (name given): drain and exit.
    Terminate(&'static str),
    /// SIGHUP: re-read the configuration.
    Reload,
}

impl Signals {
    /// Wait for the next SIGTERM, SIGINT or SIGHUP.
    pub fn wait(&self) -> Received {
        loop {
            match self.0.wait() {
                Ok(Signal::SIGTERM) => return Received::Terminate("SIGTERM"),
                Ok(Signal::SIGINT) => return Received::Terminate("SIGINT"),
                Ok(Signal::SIGHUP) => return Received::Reload,
                Ok(_) | Err(_) => {}
            }
        }
    }

    /// Wait for SIGTERM or SIGINT; SIGHUP is logged and ignored (for daemons
    /// without a reloadable configuration).
    pub fn wait_terminate(&self) -> &'static str {
        loop {
            match self.wait() {
                Received::Terminate(name) => return name,
                Received::Reload => crate::log::warn(format_args!(
                    "SIGHUP received: this daemon has nothing to reload; keeping the running configuration"
                )),
            }
        }
    }
}

/// Tell systemd (Type=notify) that we are serving, if it is listening.
pub fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let bytes = path.as_encoded_bytes();
    let res = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|a| sock.send_to_addr(b"READY=1", &a))
    } else {
        sock.send_to(b"READY=1", &path)
    };
    if let Err(e) = res {
        crate::log::warn(format_args!("sd_notify READY=1 failed: {e}"));
    }
}
