//! Small storms through the whole path: `metaproxy up` (api + agent + proxy
//! in one process, the real binary) serving a synthesized inventory, 200 VMs
//! per profile, each from its own 127.16/12 address. The CI correctness check
//! of issue 6: zero errors and zero wrong-VM answers, not a speed test.

mod common;

use std::num::NonZeroUsize;
use std::time::Duration;

use common::up::start_up;
use metaproxy::inventory::synth::{synth_toml, SynthSpec};
use metaproxy::inventory::Inventory;
use metaproxy::storm::{self, Profile, StormConfig, VmSpec};

const VMS: u32 = 200;
/// `inventory synth`'s router 0, which gets every network when `--routers 1`.
const ROUTER: &str = "5707ae75-0000-4000-8002-000000000000";

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
    let (_up, proxy) = start_up(dir.path(), &inv_path, ROUTER);
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

/// Issue 11 item 3: HEADs from addresses no port has (the agent answers 404)
/// mixed into a burst of real VMs, all through one proxy whose pooled,
/// pipelined agent connections they share. An error page with a body after
/// a HEAD left bytes on the connection that the proxy (rightly) did not
/// read as part of that answer, so they corrupted the next VM's answer.
#[test]
fn head_storm_from_unknown_addresses_leaves_every_real_vm_clean() {
    use std::sync::{Arc, Barrier};

    const REAL: u32 = 100;
    const UNKNOWN: u8 = 40;
    const ROUNDS: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let text = synth_toml(&SynthSpec {
        vms: REAL,
        networks: 2,
        routers: 1,
    })
    .unwrap();
    let inv_path = dir.path().join("inventory.toml");
    std::fs::write(&inv_path, &text).unwrap();
    let vms = VmSpec::from_inventory(&Inventory::load(&inv_path).unwrap(), REAL as usize);
    assert!(vms.iter().all(|v| !v.ip.to_string().starts_with("127.99.")));
    let (_up, proxy) = start_up(dir.path(), &inv_path, ROUTER);
    let barrier = Arc::new(Barrier::new(REAL as usize + usize::from(UNKNOWN)));
    let real: Vec<_> = vms
        .into_iter()
        .map(|vm| {
            let b = barrier.clone();
            std::thread::spawn(move || {
                b.wait();
                // ask_metadata panics if a 200 carries another VM's data.
                (0..ROUNDS)
                    .map(|_| common::daemons::ask_metadata(proxy, &vm).0)
                    .collect::<Vec<u16>>()
            })
        })
        .collect();
    let unknown: Vec<_> = (1..=UNKNOWN)
        .map(|k| {
            let b = barrier.clone();
            std::thread::spawn(move || {
                let from = std::net::IpAddr::from([127, 99, 0, k]);
                b.wait();
                (0..ROUNDS * 2)
                    .map(|_| {
                        common::daemons::request_from(
                            from,
                            proxy,
                            "HEAD",
                            "/latest/meta-data/",
                            "",
                            b"",
                            Duration::from_secs(10),
                        )
                        .map_or(0, |r| r.status)
                    })
                    .collect::<Vec<u16>>()
            })
        })
        .collect();
    let real: Vec<u16> = real.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let unknown: Vec<u16> = unknown
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let errors = real.iter().filter(|s| **s != 200).count();
    assert_eq!(errors, 0, "real VMs' statuses: {real:?}");
    assert!(unknown.iter().all(|s| *s == 404), "unknown: {unknown:?}");
}
