//! Process signals and service-manager readiness.
//!
//! SIGTERM, SIGINT and SIGHUP are blocked in the main thread before any loop
//! starts (threads inherit the mask), and the main thread waits for them with
//! `sigwait`: no async signal handler ever runs on a loop.

use std::io;

use nix::sys::signal::{SigSet, Signal};

/// The blocked set, waited on by the main thread.
pub struct Signals(SigSet);

/// A signal [`Signals::wait_next`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// SIGTERM or SIGINT (by name): drain and exit.
    Terminate(&'static str),
    /// SIGHUP: reload what can be reloaded.
    Hangup,
}

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

impl Signals {
    /// Wait for the next of SIGTERM, SIGINT or SIGHUP.
    pub fn wait_next(&self) -> Received {
        loop {
            match self.0.wait() {
                Ok(Signal::SIGTERM) => return Received::Terminate("SIGTERM"),
                Ok(Signal::SIGINT) => return Received::Terminate("SIGINT"),
                Ok(Signal::SIGHUP) => return Received::Hangup,
                Ok(_) | Err(_) => {}
            }
        }
    }

    /// Wait for SIGTERM or SIGINT (returned by name). SIGHUP is logged:
    /// live reconfiguration is not built yet, so the running config stays.
    pub fn wait_terminate(&self) -> &'static str {
        loop {
            match self.0.wait() {
                Ok(Signal::SIGTERM) => return "SIGTERM",
                Ok(Signal::SIGINT) => return "SIGINT",
                Ok(Signal::SIGHUP) => crate::log::warn(format_args!(
                    "SIGHUP received: live reload is not supported by this build; keeping the running configuration"
                )),
                Ok(_) | Err(_) => {}
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
