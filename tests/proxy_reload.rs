//! Live reconfiguration through the real binary: SIGHUP adds, removes and
//! keeps namespaces; an invalid file keeps the running config and names the
//! key; `metaproxy ctl status` reports namespaces and counters.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const NET: &str = "7a7a7a7a-0000-4000-8000-000000000002";

fn write_config(path: &Path, agent: &Path, ctl: &Path, ports: &[(u16, bool)]) {
    let mut t = format!(
        "[proxy]\nworkers = 2\nagent_socket = \"{}\"\ncontrol_socket = \"{}\"\n",
        agent.display(),
        ctl.display()
    );
    for (port, router) in ports {
        let id = if *router {
            format!("router_id = \"{ROUTER}\"")
        } else {
            format!("network_id = \"{NET}\"")
        };
        t.push_str(&format!(
            "[[proxy.namespace]]\n{id}\nlisten = \"127.0.0.1:{port}\"\n"
        ));
    }
    std::fs::write(path, t).unwrap();
}

struct Daemon {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    fn start(cfg: &Path) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_metaproxy"))
            .args(["proxy", "--config"])
            .arg(cfg)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let l2 = log.clone();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                l2.lock().unwrap().push(line);
            }
        });
        let d = Daemon { child, log };
        d.wait_log("proxy starting");
        d
    }
    fn wait_log(&self, needle: &str) -> String {
        let t0 = Instant::now();
        loop {
            if let Some(l) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "no log line containing {needle:?}: {:?}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    fn hup(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

fn addr(port: u16) -> SocketAddr {
    format!("127.0.0.1:{port}").parse().unwrap()
}

fn ctl(sock: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_metaproxy"))
        .args(["ctl", "--socket"])
        .arg(sock)
        .arg("status")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn sighup_adds_removes_and_keeps_namespaces() {
    let agent = FakeAgent::start(AgentMode::KeepAlive);
    let dir = tempfile::tempdir().unwrap();
    let (cfg, ctl_sock) = (dir.path().join("p.toml"), dir.path().join("ctl.sock"));
    let (p1, p2) = (free_port(), free_port());
    write_config(&cfg, &agent.path, &ctl_sock, &[(p1, true)]);
    let d = Daemon::start(&cfg);

    // A keep-alive client on the namespace that will survive every reload.
    let mut kept = TcpStream::connect(addr(p1)).unwrap();
    kept.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut kept_r = BufReader::new(kept.try_clone().unwrap());
    let mut ask_kept = |path: &str| {
        kept.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        read_response(&mut kept_r, false).unwrap()
    };
    assert_eq!(ask_kept("/before").status, 200);

    // Add a network namespace.
    write_config(&cfg, &agent.path, &ctl_sock, &[(p1, true), (p2, false)]);
    d.hup();
    d.wait_log("1 namespace(s) added, 0 removed");
    assert_eq!(
        get(addr(p2), "GET /n HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap()
            .status,
        200
    );
    let last = agent.seen().last().cloned().unwrap();
    assert_eq!(last.all("X-Neutron-Network-ID"), vec![NET.to_string()]);
    assert_eq!(
        ask_kept("/after-add").status,
        200,
        "unchanged listener kept its connection"
    );

    // An invalid file: nothing changes, the key at fault is logged.
    std::fs::write(
        &cfg,
        "[[proxy.namespace]]\nrouter_id = \"nope\"\nlisten = \"127.0.0.1:1\"\n",
    )
    .unwrap();
    d.hup();
    let line = d.wait_log("keeping the running configuration");
    assert!(line.contains("proxy.namespace[0].router_id"), "{line}");
    assert_eq!(
        get(addr(p2), "GET /still HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap()
            .status,
        200
    );
    assert_eq!(ask_kept("/after-invalid").status, 200);

    // ctl status lists both with counters.
    let st = ctl(&ctl_sock);
    assert!(
        st.contains(&format!("127.0.0.1:{p1}")) && st.contains(&format!("127.0.0.1:{p2}")),
        "{st}"
    );
    assert!(st.contains("2 namespace(s)"), "{st}");

    // Remove the router namespace: its listener goes, the other stays.
    write_config(&cfg, &agent.path, &ctl_sock, &[(p2, false)]);
    d.hup();
    d.wait_log("0 namespace(s) added, 1 removed");
    wait_until("removed listener closed", Duration::from_secs(5), || {
        TcpStream::connect(addr(p1)).is_err()
    });
    assert_eq!(
        get(addr(p2), "GET /n2 HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap()
            .status,
        200
    );
}
