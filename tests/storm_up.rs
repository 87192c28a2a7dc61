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
