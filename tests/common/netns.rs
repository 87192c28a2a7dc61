//! Real namespace topologies for the end-to-end tests, built with `ip netns`,
//! veth pairs and a bridge, plus the real `metaproxy` binary as separate
//! `api`, `agent` and `proxy` processes and cloud-init's own readers run
//! inside the "VM" namespaces.
//!
//! Layout (one per test; every name carries the test tag and the pid, and
//! veths are created directly inside their namespaces, so nothing is ever
//! left in the host namespace):
//!
//! ```text
//!  vm1 10.90.0.11 ─┐                    qrouter-<R>: qr-br 10.90.0.1/24,
//!  vm2 10.90.0.12 ─┴─ qr-vm1/qr-vm2 ──  169.254.169.254/32 on lo
//!  vm3 10.91.0.13 ─── tap ─────────────  qdhcp-<N>: tap 10.91.0.2/24 + 169.254.169.254/32
//! ```
//!
//! VMs 1 and 2 route everything via the router (default route), like a guest
//! behind a Neutron router; VM 3 has only the host route to 169.254.169.254
//! via the DHCP port, like dnsmasq's option 121 on an isolated network.
//! Readiness of the daemons is taken from their sd_notify `READY=1` (a
//! datagram socket in the test's tempdir), not from polling.

use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Debian's interpreter, where the `cloud-init` package installs `cloudinit`.
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";
/// Shared secret between agent and api in these tests.
pub const SECRET: &str = "netns-e2e-secret";
/// How long a daemon may take to report `READY=1`.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a daemon may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Why this environment cannot run the namespace tests, if it cannot.
///
/// # Errors
/// Not root, a missing tool, or `cloudinit` not importable by Debian's Python.
pub fn can_run(tools: &[&str]) -> Result<(), String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err(
            "not root (network namespaces need CAP_SYS_ADMIN; CI runs this as root)".into(),
        );
    }
    for tool in ["ip", "curl"].iter().chain(tools) {
        if !have(tool) {
            return Err(format!(
                "`{tool}` not installed (scripts/test.sh installs it)"
            ));
        }
    }
    let ok = Command::new(SYSTEM_PYTHON)
        .args([
            "-c",
            "import cloudinit.sources.helpers.openstack, cloudinit.sources.helpers.ec2",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        return Err(format!(
            "`import cloudinit` fails in {SYSTEM_PYTHON} (Debian package cloud-init; scripts/test.sh installs it)"
        ));
    }
    Ok(())
}

/// Whether `tool` is on PATH.
pub fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// Run a command; panic with its stderr if it fails.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Network namespaces deleted (with every veth and bridge in them) on drop,
/// newest first.
#[derive(Default)]
pub struct Namespaces(Vec<String>);

impl Namespaces {
    /// Create `name` (replacing a stale one of the same name) with `lo` up.
    /// It is registered before it is created, so a half-built topology is
    /// still cleaned up.
    pub fn add(&mut self, name: &str) {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        self.0.push(name.to_string());
        sh(&["ip", "netns", "add", name]);
        sh(&["ip", "-n", name, "link", "set", "lo", "up"]);
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in self.0.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// A router namespace's LAN: bridge `qr-br` holding `gw_cidr` (e.g.
/// `10.90.0.1/24`), 169.254.169.254/32 on the router's `lo`, and one veth
/// port `qr-vmN` per VM; each VM gets `eth0` with `ip` (same prefix) and a
/// default route via the gateway.
pub fn router_lan(router_ns: &str, gw_cidr: &str, vms: &[(&str, &str)]) {
    let r = router_ns;
    let (gw, prefix) = gw_cidr.split_once('/').unwrap();
    sh(&["ip", "-n", r, "link", "add", "qr-br", "type", "bridge"]);
    sh(&["ip", "-n", r, "addr", "add", gw_cidr, "dev", "qr-br"]);
    sh(&["ip", "-n", r, "link", "set", "qr-br", "up"]);
    sh(&[
        "ip",
        "-n",
        r,
        "addr",
        "add",
        "169.254.169.254/32",
        "dev",
        "lo",
    ]);
    for (i, (vm_ns, ip)) in vms.iter().enumerate() {
        let port = format!("qr-vm{}", i + 1);
        sh(&[
            "ip", "-n", r, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
            vm_ns,
        ]);
        sh(&["ip", "-n", r, "link", "set", &port, "master", "qr-br"]);
        sh(&["ip", "-n", r, "link", "set", &port, "up"]);
        sh(&[
            "ip",
            "-n",
            vm_ns,
            "addr",
            "add",
            &format!("{ip}/{prefix}"),
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", vm_ns, "link", "set", "eth0", "up"]);
        sh(&["ip", "-n", vm_ns, "route", "add", "default", "via", gw]);
    }
}

/// One guest: its namespace, address and identity in the inventory.
#[derive(Clone, Debug)]
pub struct Vm {
    pub ns: String,
    pub ip: &'static str,
    pub uuid: String,
    pub hostname: String,
    pub key_name: String,
    pub key_data: String,
    pub user_data: String,
    /// The network of its one port.
    pub network: String,
}

/// The namespaces of one test; deleted on drop.
pub struct Topology {
    pub router_id: String,
    pub router_net: String,
    pub isolated_net: String,
    pub project: String,
    pub router_ns: String,
    pub dhcp_ns: String,
    /// vm1 and vm2 behind the router, vm3 on the isolated network.
    pub vms: [Vm; 3],
    _namespaces: Namespaces,
}

impl Topology {
    /// Build the topology; `tag` (one hex digit) tells tests of one process apart.
    pub fn build(tag: u8) -> Topology {
        assert!(tag < 16);
        let pid = std::process::id();
        let id = |kind: u16| format!("e2e0{tag:x}{kind:03x}-0000-4000-8000-{pid:012x}");
        let router_id = id(0xc01);
        let router_net = id(0xa01);
        let isolated_net = id(0xa02);
        let project = format!("e2e0{tag:x}{pid:027x}");
        let router_ns = format!("qrouter-{router_id}");
        let dhcp_ns = format!("qdhcp-{isolated_net}");
        let vm = |i: u32, ip: &'static str| {
            Vm {
            ns: format!("mpe2e{tag:x}-{pid}-vm{i}"),
            ip,
            uuid: id(i as u16),
            hostname: format!("e2e-vm{i}"),
            key_name: format!("key-vm{i}"),
            key_data: format!(
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE2E{i}{pid:08x}AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA vm{i}@metaproxy"
            ),
            user_data: format!("#cloud-config\nhostname: e2e-vm{i}\n"),
            network: if i < 3 { router_net.clone() } else { isolated_net.clone() },
        }
        };
        let vms = [
            vm(1, "10.90.0.11"),
            vm(2, "10.90.0.12"),
            vm(3, "10.91.0.13"),
        ];
        let mut t = Topology {
            router_id,
            router_net,
            isolated_net,
            project,
            router_ns,
            dhcp_ns,
            vms,
            _namespaces: Namespaces::default(),
        };
        let names: Vec<String> = [t.router_ns.clone(), t.dhcp_ns.clone()]
            .into_iter()
            .chain(t.vms.iter().map(|v| v.ns.clone()))
            .collect();
        for n in &names {
            t._namespaces.add(n);
        }
        let d = t.dhcp_ns.as_str();

        // Router: a bridge carrying the gateway address, one port per VM.
        router_lan(
            &t.router_ns,
            "10.90.0.1/24",
            &[(&t.vms[0].ns, t.vms[0].ip), (&t.vms[1].ns, t.vms[1].ip)],
        );

        // Isolated network: the DHCP port holds the metadata address itself.
        let v3 = &t.vms[2];
        sh(&[
            "ip", "-n", d, "link", "add", "tap", "type", "veth", "peer", "name", "eth0", "netns",
            &v3.ns,
        ]);
        sh(&["ip", "-n", d, "addr", "add", "10.91.0.2/24", "dev", "tap"]);
        sh(&[
            "ip",
            "-n",
            d,
            "addr",
            "add",
            "169.254.169.254/32",
            "dev",
            "tap",
        ]);
        sh(&["ip", "-n", d, "link", "set", "tap", "up"]);
        sh(&[
            "ip",
            "-n",
            &v3.ns,
            "addr",
            "add",
            &format!("{}/24", v3.ip),
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", &v3.ns, "link", "set", "eth0", "up"]);
        sh(&[
            "ip",
            "-n",
            &v3.ns,
            "route",
            "add",
            "169.254.169.254/32",
            "via",
            "10.91.0.2",
        ]);
        t
    }

    /// The inventory (TOML) describing the three VMs, both networks and the router.
    pub fn inventory(&self) -> String {
        let p = &self.project;
        let mut s = format!(
            r#"dhcp_domain = "novalocal"

[[network]]
id = "{rn}"
name = "e2e-routed"
project = "{p}"
[[network.subnet]]
id = "{rn_sub}"
cidr = "10.90.0.0/24"
gateway = "10.90.0.1"

[[network]]
id = "{iso}"
name = "e2e-isolated"
project = "{p}"
[[network.subnet]]
id = "{iso_sub}"
cidr = "10.91.0.0/24"

[[router]]
id = "{r}"
networks = ["{rn}"]
"#,
            rn = self.router_net,
            rn_sub = self.router_net.replacen("a01", "b01", 1),
            iso = self.isolated_net,
            iso_sub = self.isolated_net.replacen("a02", "b02", 1),
            r = self.router_id,
        );
        for (i, v) in self.vms.iter().enumerate() {
            s += &format!(
                r#"
[[instance]]
uuid = "{uuid}"
name = "{host}"
hostname = "{host}"
project = "{p}"
user_data = """
{ud}"""

[[instance.key]]
name = "{kn}"
type = "ssh"
data = "{kd}"

[[instance.port]]
id = "{port}"
network = "{net}"
mac = "fa:16:3e:e2:e0:0{n}"
fixed_ips = ["{ip}"]
"#,
                uuid = v.uuid,
                host = v.hostname,
                ud = v.user_data,
                kn = v.key_name,
                kd = v.key_data,
                port = v.uuid.replacen("-0000-", "-0e00-", 1),
                n = i + 1,
                ip = v.ip,
                net = v.network,
            );
        }
        s
    }
}

/// A `metaproxy` child process; SIGTERM (then SIGKILL) on drop.
pub struct Daemon {
    child: Child,
    pub name: String,
    log: PathBuf,
}

impl Daemon {
    /// Spawn `metaproxy <args>` with its stderr in `dir/<name>.log` and wait
    /// for its sd_notify `READY=1`.
    pub fn start(name: &str, args: &[&str], dir: &Path) -> Daemon {
        Daemon::start_cmd(
            name,
            Command::new(env!("CARGO_BIN_EXE_metaproxy")).args(args),
            dir,
        )
    }

    /// Spawn any command that speaks sd_notify the same way.
    pub fn start_cmd(name: &str, cmd: &mut Command, dir: &Path) -> Daemon {
        Daemon::spawn(name, cmd, dir, true)
    }

    /// Spawn without waiting for `READY=1` (haproxy: the caller polls instead).
    pub fn spawn_unnotified(name: &str, cmd: &mut Command, dir: &Path) -> Daemon {
        Daemon::spawn(name, cmd, dir, false)
    }

    fn spawn(name: &str, cmd: &mut Command, dir: &Path, notify: bool) -> Daemon {
        let log = dir.join(format!("{name}.log"));
        let sock_path = dir.join(format!("{name}.notify"));
        let _ = std::fs::remove_file(&sock_path);
        let sock = UnixDatagram::bind(&sock_path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let child = cmd
            .env("NOTIFY_SOCKET", &sock_path)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join(format!("{name}.out"))).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let mut d = Daemon {
            child,
            name: name.to_string(),
            log,
        };
        if !notify {
            return d;
        }
        let t0 = Instant::now();
        let mut buf = [0u8; 256];
        loop {
            if let Ok(n) = sock.recv(&mut buf) {
                if buf[..n].split(|&b| b == b'\n').any(|l| l == b"READY=1") {
                    return d;
                }
            }
            if let Ok(Some(st)) = d.child.try_wait() {
                panic!("{name} exited before READY=1 ({st}):\n{}", d.log_text());
            }
            assert!(
                t0.elapsed() < READY_TIMEOUT,
                "{name} not ready after {READY_TIMEOUT:?}:\n{}",
                d.log_text()
            );
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Panic with the log if the daemon has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!("{} exited ({st}):\n{}", self.name, self.log_text());
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let t0 = Instant::now();
        while t0.elapsed() < STOP_TIMEOUT {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

use super::free_port;

/// `[api]` + `[agent]` sections for our api on `api_port` and our agent on
/// `sock`, both serving `inventory`.
pub fn api_agent_config(dir: &Path, inventory: &Path, sock: &Path, api_port: u16) -> String {
    format!(
        r#"
[api]
listen = "127.0.0.1:{api_port}"
metadata_proxy_shared_secret = "{SECRET}"
inventory = "{inv}"
state_dir = "{state}"

[agent]
socket = "{sock}"
inventory = "{inv}"
metadata_proxy_shared_secret = "{SECRET}"
[agent.nova]
nova_metadata_host = "127.0.0.1"
nova_metadata_port = {api_port}
"#,
        inv = inventory.display(),
        state = dir.join("state").display(),
        sock = sock.display(),
    )
}

/// Our api and agent as two separate processes, serving the topology's
/// inventory; the agent's Unix socket is `dir/agent.sock`.
pub struct Backend {
    pub sock: PathBuf,
    pub api_port: u16,
    pub config: PathBuf,
    // Declared agent first: dropped (stopped) before the api.
    pub agent: Daemon,
    pub api: Daemon,
}

impl Backend {
    pub fn start(topo: &Topology, dir: &Path) -> Backend {
        Backend::start_with(&topo.inventory(), dir)
    }

    /// The same, serving the inventory `text`.
    pub fn start_with(text: &str, dir: &Path) -> Backend {
        let inv = dir.join("inventory.toml");
        std::fs::write(&inv, text).unwrap();
        let sock = dir.join("agent.sock");
        let api_port = free_port();
        let config = dir.join("backend.toml");
        std::fs::write(&config, api_agent_config(dir, &inv, &sock, api_port)).unwrap();
        let cfg = config.to_str().unwrap();
        let api = Daemon::start("api", &["api", "--config", cfg], dir);
        let agent = Daemon::start("agent", &["agent", "--config", cfg], dir);
        Backend {
            sock,
            api_port,
            config,
            agent,
            api,
        }
    }
}

/// The proxy as its own process: 169.254.169.254:80 inside the router
/// namespace (stamped with the router id) and inside the DHCP namespace
/// (stamped with the network id).
pub fn start_our_proxy(topo: &Topology, backend: &Backend, dir: &Path) -> Daemon {
    let cfg = dir.join("proxy.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[proxy]
workers = 1
agent_socket = "{sock}"
control_socket = "{ctl}"

[[proxy.namespace]]
netns = "{rns}"
router_id = "{r}"
listen = "169.254.169.254:80"

[[proxy.namespace]]
netns = "{dns}"
network_id = "{n}"
listen = "169.254.169.254:80"
"#,
            sock = backend.sock.display(),
            ctl = dir.join("ctl.sock").display(),
            rns = topo.router_ns,
            r = topo.router_id,
            dns = topo.dhcp_ns,
            n = topo.isolated_net,
        ),
    )
    .unwrap();
    Daemon::start("proxy", &["proxy", "--config", cfg.to_str().unwrap()], dir)
}

/// The cloud-init side, run by Debian's Python in the VM's namespace: the
/// OpenStack reader (`read_v2`) and the EC2 crawl (`2009-04-04`), as JSON.
const READERS_PY: &str = r#"
import json, sys
from cloudinit.sources.helpers import openstack, ec2
base = sys.argv[1]
v2 = openstack.MetadataReader(base).read_v2()
md = ec2.get_instance_metadata(api_version="2009-04-04", metadata_address=base, retries=2, timeout=5)
ud = ec2.get_instance_userdata(api_version="2009-04-04", metadata_address=base, retries=2, timeout=5)
def text(x):
    return x.decode() if isinstance(x, bytes) else x
print(json.dumps({
    "openstack": {
        "metadata": v2["metadata"],
        "userdata": text(v2.get("userdata")),
        "networkdata": v2.get("networkdata"),
        "version": v2.get("version"),
    },
    "ec2": md,
    "ec2_userdata": text(ud),
}, default=repr))
"#;

/// A command run inside namespace `ns`, without any proxy settings of ours
/// leaking in (they would send the readers elsewhere).
pub fn in_ns(ns: &str, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, program]);
    for v in [
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "NO_PROXY",
    ] {
        c.env_remove(v);
    }
    c
}

/// Run cloud-init's real readers against `base` from inside `ns`.
pub fn cloud_init_read(ns: &str, base: &str) -> serde_json::Value {
    let out = in_ns(ns, SYSTEM_PYTHON)
        .args(["-c", READERS_PY, base])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cloud-init readers in {ns} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "readers' output: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Assert that what cloud-init read is exactly `vm`'s metadata, and
/// mentions no other VM.
pub fn assert_own_metadata(got: &serde_json::Value, vm: &Vm, all: &[Vm]) {
    let os = &got["openstack"]["metadata"];
    assert_eq!(os["uuid"], vm.uuid.as_str(), "{got:#}");
    assert_eq!(
        os["hostname"],
        format!("{}.novalocal", vm.hostname),
        "{got:#}"
    );
    assert_eq!(
        os["public_keys"][&vm.key_name],
        vm.key_data.as_str(),
        "{got:#}"
    );
    assert_eq!(
        got["openstack"]["userdata"],
        vm.user_data.as_str(),
        "{got:#}"
    );
    let ec2 = &got["ec2"];
    assert_eq!(ec2["local-ipv4"], vm.ip, "{got:#}");
    assert_eq!(
        ec2["hostname"],
        format!("{}.novalocal", vm.hostname),
        "{got:#}"
    );
    let keys = ec2["public-keys"][&vm.key_name].to_string();
    assert!(keys.contains(&vm.key_data), "ec2 public-keys: {got:#}");
    assert_eq!(got["ec2_userdata"], vm.user_data.as_str(), "{got:#}");
    let nets = &got["openstack"]["networkdata"]["networks"];
    assert_eq!(nets.as_array().map(Vec::len), Some(1), "{got:#}");
    assert_eq!(nets[0]["network_id"], vm.network.as_str(), "{got:#}");
    let text = got.to_string();
    for other in all.iter().filter(|o| o.uuid != vm.uuid) {
        assert!(
            !text.contains(&other.uuid),
            "{} saw {}: {got:#}",
            vm.ns,
            other.uuid
        );
        assert!(
            !text.contains(&other.key_data),
            "{} saw {}'s key",
            vm.ns,
            other.ns
        );
    }
}

/// `curl` from inside `ns`: (status, body).
pub fn curl_in(ns: &str, url: &str, extra: &[&str]) -> (u16, String) {
    let out = in_ns(ns, "curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(extra)
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl {url} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_string())
}

/// Every client-supplied trust header VM `from` can send, claiming to be
/// `victim` on the router and on the isolated network (curl `-H` args).
pub fn spoofed_headers(topo: &Topology, victim: &Vm) -> Vec<String> {
    vec![
        format!("X-Forwarded-For: {}", victim.ip),
        format!("X-Neutron-Router-ID: {}", topo.router_id),
        format!("X-Neutron-Network-ID: {}", topo.isolated_net),
        format!("X-OVN-Network-ID: {}", topo.router_net),
        format!("X-Instance-ID: {}", victim.uuid),
        format!("X-Instance-ID-Signature: {}", "0".repeat(64)),
        format!("X-Tenant-ID: {}", topo.project),
        format!("Forwarded: for={}", victim.ip),
    ]
}

/// curl `-H` arguments for `headers`.
pub fn header_args(headers: &[String]) -> Vec<&str> {
    headers.iter().flat_map(|h| ["-H", h.as_str()]).collect()
}

/// Wait until `url` answers from inside `ns` (haproxy has no readiness signal).
pub fn wait_http(ns: &str, url: &str) {
    let t0 = Instant::now();
    loop {
        let ok = in_ns(ns, "curl")
            .args(["-s", "-o", "/dev/null", "--max-time", "2", url])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return;
        }
        assert!(t0.elapsed() < READY_TIMEOUT, "{url} not answering in {ns}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
