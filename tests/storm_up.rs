//! Small storms through the whole path: `metaproxy up` (api + agent + proxy
//! in one process, the real binary) serving a synthesized inventory, 200 VMs
//! per profile, each from its own 127.16/12 address. The CI correctness check
//! of issue 6: zero errors and zero wrong-VM answers, not a speed test.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use metaproxy::inventory::synth::{synth_toml, SynthSpec};
use metaproxy::inventory::Inventory;
use metaproxy::storm::{self, Profile, StormConfig, VmSpec};

const VMS: u32 = 200;
/// `inventory synth`'s router 0, which gets every network when `--routers 1`.
const ROUTER: &str = "5707ae75-0000-4000-8002-000000000000";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Up(Child);
impl Drop for Up {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

fn start_up(dir: &std::path::Path, inv: &std::path::Path) -> (Up, SocketAddr) {
    let (proxy_port, api_port) = (free_port(), free_port());
    let sock = dir.join("agent.sock");
    let cfg = dir.join("up.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[api]
listen = "127.0.0.1:{api_port}"
metadata_proxy_shared_secret = "storm-secret"
inventory = "{inv}"
state_dir = "{state}"

[agent]
socket = "{sock}"
inventory = "{inv}"
metadata_proxy_shared_secret = "storm-secret"
[agent.nova]
nova_metadata_port = {api_port}

[proxy]
agent_socket = "{sock}"
control_socket = "{ctl}"
[[proxy.namespace]]
router_id = "{ROUTER}"
listen = "127.0.0.1:{proxy_port}"
"#,
            inv = inv.display(),
            state = dir.join("state").display(),
            sock = sock.display(),
            ctl = dir.join("ctl.sock").display(),
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_metaproxy"))
        .args(["up", "--config"])
        .arg(&cfg)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let t0 = Instant::now();
    loop {
        let mut line = String::new();
        assert!(err.read_line(&mut line).unwrap() > 0, "up exited early");
        if line.contains("up: api, agent and proxy are serving") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "up did not start");
    }
    std::thread::spawn(move || for _ in err.lines() {});
    (
        Up(child),
        format!("127.0.0.1:{proxy_port}").parse().unwrap(),
    )
}

#[test]
fn storm_through_up_is_clean_for_every_profile() {
    let dir = tempfile::tempdir().unwrap();
    let text = synth_toml(&SynthSpec {
        vms: VMS,
        networks: 4,
        routers: 1,
    })
    .unwrap();
    let inv_path = dir.path().join("inventory.toml");
    std::fs::write(&inv_path, &text).unwrap();
    let vms = VmSpec::from_inventory(&Inventory::load(&inv_path).unwrap(), VMS as usize);
    let (_up, proxy) = start_up(dir.path(), &inv_path);
    for profile in [
        Profile::CloudInit,
        Profile::Openstack,
        Profile::Ec2,
        Profile::Keepalive,
    ] {
        let mut cfg = StormConfig::new(proxy, vms.clone());
        cfg.profile = profile;
        cfg.ramp = Duration::from_millis(500);
        cfg.workers = NonZeroUsize::new(1).unwrap();
        let r = storm::run(cfg).unwrap();
        eprintln!("{r}");
        assert_eq!(r.errors.wrong_vm, 0, "{r}");
        assert_eq!(r.errors.total(), 0, "{r}");
        assert_eq!(r.vms_completed, u64::from(VMS), "{r}");
        assert!(r.passed);
    }
}
