//! Issue 7, item 3: daemons dying under a boot storm. The real binary runs
//! as three processes (`api`, `agent`, `proxy`) over a synthesized inventory
//! of a few hundred VMs; the storm runs in a thread while one daemon is
//! SIGKILLed and restarted. A probe VM asks every few milliseconds and records
//! each status, which gives the statuses during the outage and the time to
//! the first 200 after the daemon accepts again. Whatever fails, no VM may
//! ever get another VM's data (`wrong_vm` is always zero).
//!
//! Neutron faults (slow, 500s, duplicate ports) are not here: main has no
//! fake Neutron (`tests/agent_neutron.rs`) to drive them with.

mod common;

use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use common::daemons::{chain_config, recovery, statuses_between, Chain, Daemon, Probe, Ready};
use metaproxy::inventory::synth::{synth_toml, SynthSpec};
use metaproxy::inventory::Inventory;
use metaproxy::storm::{self, Profile, StormConfig, StormReport, VmSpec};

const VMS: u32 = 300;
/// `inventory synth`'s router 0, which gets every network when `--routers 1`.
const ROUTER: &str = "5707ae75-0000-4000-8002-000000000000";
/// Spread of the storm's arrivals: long enough to hold the whole outage.
const RAMP: Duration = Duration::from_secs(4);
/// How long a daemon stays dead.
const OUTAGE: Duration = Duration::from_millis(600);
/// Issue 7: the proxy serves again within 1 s of the agent's return.
const MAX_RECOVERY: Duration = Duration::from_secs(1);

struct Setup {
    _dir: tempfile::TempDir,
    chain: Chain,
    vms: Vec<VmSpec>,
    api: Daemon,
    agent: Daemon,
    proxy: Daemon,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let text = synth_toml(&SynthSpec {
        vms: VMS,
        networks: 4,
        routers: 1,
    })
    .unwrap();
    let inv = dir.path().join("inventory.toml");
    std::fs::write(&inv, &text).unwrap();
    let vms = VmSpec::from_inventory(&Inventory::from_toml_str(&text).unwrap(), VMS as usize);
    let chain = chain_config(dir.path(), &inv, ROUTER, "");
    let api = Daemon::start("api", &chain.config, Ready::Tcp(chain.api));
    let agent = Daemon::start(
        "agent",
        &chain.config,
        Ready::Unix(chain.agent_socket.clone()),
    );
    let proxy = Daemon::start("proxy", &chain.config, Ready::Tcp(chain.proxy));
    Setup {
        _dir: dir,
        chain,
        vms,
        api,
        agent,
        proxy,
    }
}

fn storm_in_thread(
    target: std::net::SocketAddr,
    vms: Vec<VmSpec>,
    ramp: Duration,
) -> std::thread::JoinHandle<StormReport> {
    std::thread::spawn(move || {
        let mut cfg = StormConfig::new(target, vms);
        cfg.profile = Profile::Openstack;
        cfg.ramp = ramp;
        cfg.workers = NonZeroUsize::new(1).unwrap();
        cfg.timeout = Duration::from_secs(5);
        storm::run(cfg).unwrap()
    })
}

/// Kill `which` mid-storm, keep it dead for [`OUTAGE`], restart it; returns
/// the storm report and the probe's view.
fn kill_and_restart(s: &mut Setup, which: &str) -> (StormReport, Vec<u16>, Duration, Duration) {
    let probe_vm = s.vms.last().unwrap().clone();
    let storm = storm_in_thread(s.chain.proxy, s.vms.clone(), RAMP);
    let probe = Probe::start(probe_vm.ip, &probe_vm.uuid, s.chain.proxy);
    std::thread::sleep(RAMP / 4);
    let daemon = match which {
        "agent" => &mut s.agent,
        "api" => &mut s.api,
        _ => unreachable!(),
    };
    let killed = Instant::now();
    daemon.kill9();
    std::thread::sleep(OUTAGE);
    let respawned = Instant::now();
    let back = daemon.spawn();
    std::thread::sleep(Duration::from_millis(1200));
    let (samples, wrong_vm) = probe.finish();
    let report = storm.join().unwrap();
    eprintln!("{report}");
    assert_eq!(wrong_vm, 0, "the probe VM got another VM's data");
    assert_eq!(report.errors.wrong_vm, 0, "{report}");
    // The outage proper: from shortly after the kill until the restart began.
    let during = statuses_between(&samples, killed + Duration::from_millis(50), respawned);
    let from_ready = recovery(&samples, back).expect("never served again");
    let from_spawn = recovery(&samples, respawned).expect("never served again");
    eprintln!(
        "{which} down {OUTAGE:?}: {} probe answers during the outage; first 200 {from_ready:?} \
         after it accepted again ({from_spawn:?} after the restart began)",
        during.len()
    );
    (report, during, from_ready, from_spawn)
}

fn assert_outage(which: &str, report: &StormReport, during: &[u16], from_ready: Duration) {
    assert!(
        during.len() > 10,
        "too few probes during the outage: {during:?}"
    );
    assert!(
        during.iter().all(|&s| s == 503),
        "{which} down: the proxy must answer 503, got {during:?}"
    );
    assert!(
        from_ready < MAX_RECOVERY,
        "{which} back: first 200 after {from_ready:?}"
    );
    // Failures are 503s (status errors), never a hang, a reset or a bad body.
    assert!(
        report.errors.status > 0,
        "the outage was not seen: {report}"
    );
    assert_eq!(report.errors.connect, 0, "{report}");
    assert_eq!(report.errors.timeout, 0, "{report}");
    assert_eq!(report.errors.io, 0, "{report}");
    assert_eq!(report.errors.body, 0, "{report}");
    // VMs that arrived after the recovery completed.
    assert!(report.vms_completed > u64::from(VMS) / 4, "{report}");
}

/// After the fault, a fresh storm over the same chain is clean.
fn assert_clean_after(s: &Setup) {
    let report = storm_in_thread(s.chain.proxy, s.vms[..100].to_vec(), RAMP / 4)
        .join()
        .unwrap();
    assert_eq!(report.errors.total(), 0, "{report}");
    assert!(report.passed, "{report}");
}

#[test]
fn agent_sigkilled_mid_storm_gives_503_then_serves_within_1s() {
    let mut s = setup();
    let (report, during, from_ready, _) = kill_and_restart(&mut s, "agent");
    assert_outage("agent", &report, &during, from_ready);
    assert_clean_after(&s);
    let log = s.proxy.log_text();
    assert!(log.contains("answering 503 until it is back"), "{log}");
    assert!(log.contains("reachable again"), "{log}");
}

#[test]
fn api_sigkilled_mid_storm_gives_503_then_recovers() {
    let mut s = setup();
    let (report, during, from_ready, _) = kill_and_restart(&mut s, "api");
    assert_outage("api", &report, &during, from_ready);
    assert_clean_after(&s);
    let log = s.agent.log_text();
    assert!(log.contains("answering 503 until it is back"), "{log}");
}

/// A supervisor may restart a crashed daemon at once. The dead process's
/// listeners linger a few milliseconds after SIGKILL (its io_uring is torn
/// down asynchronously) and still complete connects; a restart must wait
/// that out rather than refuse to start or fail to bind.
#[test]
fn daemons_restart_immediately_after_sigkill() {
    let mut s = setup();
    let vm = s.vms[0].clone();
    for round in 0..10 {
        for which in ["agent", "api", "proxy"] {
            let d = match which {
                "agent" => &mut s.agent,
                "api" => &mut s.api,
                _ => &mut s.proxy,
            };
            d.kill9();
            d.spawn_only();
            let t0 = Instant::now();
            d.wait_ready();
            eprintln!(
                "round {round}: {which} ready {:?} after SIGKILL",
                t0.elapsed()
            );
        }
        let r = common::daemons::request_from(
            vm.ip,
            s.chain.proxy,
            "GET",
            "/openstack/latest/meta_data.json",
            "",
            b"",
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(r.status, 200, "round {round}: {}", r.text());
        assert!(r.text().contains(&vm.uuid));
    }
}
