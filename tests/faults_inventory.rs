//! Issue 7, item 3: the inventory file goes bad under a boot storm. The agent
//! and the API (separate processes of the real binary) both watch the file;
//! it is overwritten with garbage, then emptied, then removed, while a few
//! hundred VMs boot. Both must keep the data they have (the storm sees no
//! error at all), and a later valid file, with VMs the old one lacked, renamed
//! into place, must be picked up.
//!
//! Not covered: a file cut short at a record boundary is a *valid* smaller
//! inventory and is loaded as such; only writing by rename avoids that.

mod common;

use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use common::daemons::{chain_config, request_from, Daemon, Ready};
use metaproxy::inventory::synth::{synth_toml, SynthSpec};
use metaproxy::inventory::Inventory;
use metaproxy::storm::{self, Profile, StormConfig, VmSpec};

const VMS: u32 = 300;
/// The later, valid file adds these VMs.
const ADDED: u32 = 20;
const ROUTER: &str = "5707ae75-0000-4000-8002-000000000000";
/// Longer than the watchers' one-second poll, so each bad version is seen.
const HOLD: Duration = Duration::from_millis(1500);

fn synth(vms: u32) -> String {
    synth_toml(&SynthSpec {
        vms,
        networks: 4,
        routers: 1,
    })
    .unwrap()
}

#[test]
fn garbage_inventory_mid_storm_keeps_old_data_and_a_valid_file_is_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let old = synth(VMS);
    let new = synth(VMS + ADDED);
    let inv = dir.path().join("inventory.toml");
    std::fs::write(&inv, &old).unwrap();
    let vms = VmSpec::from_inventory(&Inventory::from_toml_str(&old).unwrap(), VMS as usize);
    let grown = VmSpec::from_inventory(
        &Inventory::from_toml_str(&new).unwrap(),
        (VMS + ADDED) as usize,
    );
    // The grown file keeps every old VM as it was.
    for (a, b) in vms.iter().zip(&grown) {
        assert_eq!((a.ip, &a.uuid), (b.ip, &b.uuid));
    }
    let newcomer = grown.last().unwrap().clone();

    let chain = chain_config(dir.path(), &inv, ROUTER, "");
    let api = Daemon::start("api", &chain.config, Ready::Tcp(chain.api));
    let agent = Daemon::start(
        "agent",
        &chain.config,
        Ready::Unix(chain.agent_socket.clone()),
    );
    let _proxy = Daemon::start("proxy", &chain.config, Ready::Tcp(chain.proxy));
    let ask = |vm: &VmSpec| {
        request_from(
            vm.ip,
            chain.proxy,
            "GET",
            "/openstack/latest/meta_data.json",
            "",
            b"",
            Duration::from_secs(5),
        )
        .unwrap()
    };
    assert_eq!(ask(&newcomer).status, 404, "not in the first file");

    let target = chain.proxy;
    let storm = std::thread::spawn(move || {
        let mut cfg = StormConfig::new(target, vms);
        cfg.profile = Profile::Openstack;
        cfg.ramp = 4 * HOLD;
        cfg.workers = NonZeroUsize::new(1).unwrap();
        cfg.timeout = Duration::from_secs(5);
        storm::run(cfg).unwrap()
    });
    std::thread::sleep(HOLD / 3);
    std::fs::write(&inv, b"[[instance]\nthis is \x00 not an inventory \xff\n").unwrap();
    std::thread::sleep(HOLD);
    // What a truncate-then-write looks like between the two calls.
    std::fs::write(&inv, b"").unwrap();
    std::thread::sleep(HOLD);
    std::fs::remove_file(&inv).unwrap();
    std::thread::sleep(HOLD);
    let report = storm.join().unwrap();
    eprintln!("{report}");
    assert_eq!(report.errors.wrong_vm, 0, "{report}");
    assert_eq!(report.errors.total(), 0, "{report}");
    assert!(report.passed, "{report}");

    // Both daemons saw the broken versions and said they kept the old data.
    let agent_log = agent.log_text();
    assert!(
        agent_log.contains("not reloaded, keeping the previous one"),
        "{agent_log}"
    );
    let api_log = api.log_text();
    assert!(
        api_log.contains("not reloaded, keeping the previous one"),
        "{api_log}"
    );

    // A valid file again, with VMs the old one lacked: picked up by both.
    // Written aside and renamed into place, as config management does.
    let aside = dir.path().join("inventory.toml.new");
    std::fs::write(&aside, &new).unwrap();
    let written = Instant::now();
    std::fs::rename(&aside, &inv).unwrap();
    let picked_up = loop {
        let r = ask(&newcomer);
        if r.status == 200 {
            assert!(r.text().contains(&newcomer.uuid), "{}", r.text());
            break written.elapsed();
        }
        assert_eq!(r.status, 404, "{}", r.text());
        assert!(
            written.elapsed() < Duration::from_secs(5),
            "the valid file was not picked up"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("valid inventory picked up {picked_up:?} after it was written");
    assert_eq!(ask(&grown[0]).status, 200);
}
