//! Real OVSDB servers for the OVN tests: an OVN Southbound `ovsdb-server`
//! (standalone, or a one-member Raft cluster from `ovsdb-tool
//! create-cluster`, the one that has transaction ids for
//! `monitor_cond_since`) and a local Open_vSwitch database, each on a Unix
//! socket under its own temp dir, started as a child and stopped by PID.
//! Rows are written with `ovsdb-client transact` and `ovn-sbctl`, the
//! tools Neutron's and northd's writes go through, never with our client.
//! Without the Debian packages (`ovn-central`, `ovn-common`,
//! `openvswitch-common`, `openvswitch-switch`) [`available`] prints
//! `SKIPPED` and the tests pass.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;

pub const SB_SCHEMA: &str = "/usr/share/ovn/ovn-sb.ovsschema";
pub const VSWITCH_SCHEMA: &str = "/usr/share/openvswitch/vswitch.ovsschema";

/// Whether the servers and schemas are installed; prints `SKIPPED` if not.
pub fn available(test: &str) -> bool {
    let have = |bin: &str| {
        Command::new(bin)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let ok = have("ovsdb-server")
        && have("ovsdb-tool")
        && have("ovsdb-client")
        && have("ovn-sbctl")
        && Path::new(SB_SCHEMA).exists()
        && Path::new(VSWITCH_SCHEMA).exists();
    if !ok {
        eprintln!("SKIPPED {test}: needs ovsdb-server, ovsdb-tool, ovsdb-client, ovn-sbctl and the OVN/OVS schemas (apt-get install ovn-central ovn-common openvswitch-common openvswitch-switch)");
    }
    ok
}

/// How the database file was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `ovsdb-tool create`: no transaction ids, so `monitor_cond_since`
    /// always answers `found = false`.
    Standalone,
    /// `ovsdb-tool create-cluster`, one member.
    Clustered,
}

/// A running `ovsdb-server`.
pub struct Server {
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub db: PathBuf,
    pub kind: Kind,
    pub name: &'static str,
    child: std::cell::RefCell<Option<Child>>,
    /// More server arguments (a `pssl:` remote and its key files).
    extra: std::cell::RefCell<Vec<String>>,
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Server {
    /// A Southbound server.
    pub fn southbound(kind: Kind) -> Server {
        Self::create(SB_SCHEMA, kind, "OVN_Southbound")
    }

    /// A local Open_vSwitch database with its one root row, `system-id`
    /// and `ovn-bridge` set as a compute node's are.
    pub fn vswitch(system_id: &str, bridge: Option<&str>) -> Server {
        let s = Self::create(VSWITCH_SCHEMA, Kind::Standalone, "Open_vSwitch");
        let mut ids = vec![serde_json::json!(["system-id", system_id])];
        if let Some(b) = bridge {
            ids.push(serde_json::json!(["ovn-bridge", b]));
        }
        s.transact(serde_json::json!([
            {"op": "insert", "table": "Open_vSwitch",
             "row": {"external_ids": ["map", ids]}}
        ]));
        s
    }

    fn create(schema: &str, kind: Kind, name: &'static str) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("db");
        let sock = dir.path().join("db.sock");
        match kind {
            Kind::Standalone => run(Command::new("ovsdb-tool")
                .arg("create")
                .arg(&db)
                .arg(schema)),
            Kind::Clustered => run(Command::new("ovsdb-tool")
                .arg("create-cluster")
                .arg(&db)
                .arg(schema)
                .arg(format!("unix:{}", dir.path().join("raft.sock").display()))),
        };
        let s = Server {
            dir,
            sock,
            db,
            kind,
            name,
            child: Default::default(),
            extra: Default::default(),
        };
        s.start();
        s
    }

    /// Start (or restart) the server on the same database file.
    pub fn start(&self) {
        assert!(self.child.borrow().is_none(), "already running");
        let _ = std::fs::remove_file(&self.sock);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .expect("log");
        let child = Command::new("ovsdb-server")
            .arg(format!("--remote=punix:{}", self.sock.display()))
            .arg(format!(
                "--unixctl={}",
                self.dir.path().join("ctl").display()
            ))
            .arg("-vconsole:off")
            .args(self.extra.borrow().iter())
            .arg(format!(
                "--log-file={}",
                self.dir.path().join("ovsdb-server.log").display()
            ))
            .arg(&self.db)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn ovsdb-server");
        *self.child.borrow_mut() = Some(child);
        // Ready when a client gets an answer (a clustered server answers
        // only once it has elected itself leader).
        super::wait_until("ovsdb-server answers", Duration::from_secs(20), || {
            Command::new("ovsdb-client")
                .arg("--timeout=2")
                .arg("list-tables")
                .arg(self.remote())
                .arg(self.name)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
    }

    /// Restart with `--remote=pssl:PORT:127.0.0.1` and these PEM files as
    /// well (OVS's mutual TLS: the server checks our certificate too).
    pub fn listen_ssl(&self, port: u16, key: &Path, cert: &Path, ca: &Path) {
        self.kill();
        *self.extra.borrow_mut() = vec![
            format!("--remote=pssl:{port}:127.0.0.1"),
            format!("--private-key={}", key.display()),
            format!("--certificate={}", cert.display()),
            format!("--ca-cert={}", ca.display()),
        ];
        self.start();
    }

    /// Stop it by PID (SIGKILL: a crash, not a clean shutdown).
    pub fn kill(&self) {
        if let Some(mut c) = self.child.borrow_mut().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP / SIGCONT: a server that hangs without closing its sockets.
    pub fn pause(&self, stop: bool) {
        let pid = self.child.borrow().as_ref().expect("running").id();
        let sig = if stop {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        };
        signal(pid, sig).unwrap_or_else(|e| panic!("kill({pid}, {sig}): {e}"));
    }

    /// `unix:<socket>`.
    pub fn remote(&self) -> String {
        format!("unix:{}", self.sock.display())
    }

    /// `ovsdb-client transact` on this database; the parsed results.
    pub fn transact(&self, ops: Value) -> Value {
        let mut all = vec![Value::String(self.name.to_string())];
        all.extend(ops.as_array().expect("ops array").iter().cloned());
        let out = run(Command::new("ovsdb-client")
            .arg("--timeout=10")
            .arg("transact")
            .arg(self.remote())
            .arg(Value::Array(all).to_string()));
        let v: Value = serde_json::from_str(&out).expect("transact output");
        for r in v.as_array().expect("results") {
            assert!(r.get("error").is_none(), "transaction failed: {v}");
        }
        v
    }

    /// `ovn-sbctl --db=unix:... ARGS`.
    pub fn sbctl(&self, args: &[&str]) -> String {
        run(Command::new("ovn-sbctl")
            .arg(format!("--db={}", self.remote()))
            .arg("--timeout=10")
            .args(args))
    }
}

/// A signal to our own child, by PID.
fn signal(pid: u32, sig: Signal) -> nix::Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = self.child.borrow().as_ref() {
            let _ = signal(c.id(), Signal::SIGCONT);
        }
        self.kill();
    }
}
