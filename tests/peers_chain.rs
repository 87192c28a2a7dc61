//! Our proxy in front of the REAL neutron-metadata-agent: the other half of
//! the drop-in. `metaproxy proxy` listens on 169.254.169.254:80 inside two
//! router namespaces and relays to the Python agent's Unix socket, which asks
//! a real neutron-rpc-server over RabbitMQ and forwards to the real Nova
//! metadata API (`scripts/peers/up.sh`, then `scripts/peers/chain.sh start`).
//!
//! The peers' fixture has vm1 (10.10.0.11) and vm2 (10.10.0.12) behind
//! router1 and vm3 behind router2 with the SAME address 10.10.0.11 on an
//! overlapping network: only the router id stamped by our proxy tells vm1 and
//! vm3 apart. cloud-init's readers in vm1 and vm3 must each get their own
//! metadata, and so must a plain request from vm2.
//!
//! Gated by `METAPROXY_PEERS_CHAIN=1` (source `$PEERS_DIR/chain/env`); also
//! needs root and cloud-init. Otherwise prints SKIPPED.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::netns::*;
use common::nova_peers::{check_own_data, peer_vm};

#[test]
fn our_proxy_in_front_of_the_real_neutron_metadata_agent() {
    if std::env::var("METAPROXY_PEERS_CHAIN").as_deref() != Ok("1") {
        eprintln!(
            "SKIPPED our_proxy_in_front_of_the_real_neutron_metadata_agent: METAPROXY_PEERS_CHAIN != 1 \
             (scripts/peers/up.sh && scripts/peers/chain.sh start; . $PEERS_DIR/chain/env)"
        );
        return;
    }
    if let Err(why) = can_run(&[]) {
        eprintln!("SKIPPED our_proxy_in_front_of_the_real_neutron_metadata_agent: {why}");
        return;
    }
    let t0 = Instant::now();
    let var = |k: &str| {
        std::env::var(k).unwrap_or_else(|_| panic!("{k} not set: source $PEERS_DIR/chain/env"))
    };
    let sock = PathBuf::from(var("METAPROXY_PEERS_AGENT_SOCKET"));
    let fx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(var("METAPROXY_PEERS_FIXTURE")).unwrap()).unwrap();
    let pid = std::process::id();
    let vms = ["vm1", "vm2", "vm3"].map(|n| peer_vm(&fx, n, format!("mpchain-{pid}-{n}")));
    let (r1, r2) = (vms[0].router_id.clone(), vms[2].router_id.clone());
    assert_eq!(vms[1].router_id, r1);
    assert_ne!(r1, r2, "fixture: vm3 must sit behind another router");
    assert_eq!(
        vms[0].ip, vms[2].ip,
        "fixture: vm1 and vm3 share an address"
    );

    let mut nss = Namespaces::default();
    let (r1_ns, r2_ns) = (format!("qrouter-{r1}"), format!("qrouter-{r2}"));
    // Unique per run even though the router ids are the fixture's.
    let (r1_ns, r2_ns) = (format!("{r1_ns}-{pid}"), format!("{r2_ns}-{pid}"));
    for n in [&r1_ns, &r2_ns]
        .into_iter()
        .chain(vms.iter().map(|v| &v.ns))
    {
        nss.add(n);
    }
    // Both routers' networks are 10.10.0.0/24 with gateway .1.
    router_lan(
        &r1_ns,
        "10.10.0.1/24",
        &[(&vms[0].ns, &vms[0].ip), (&vms[1].ns, &vms[1].ip)],
    );
    router_lan(&r2_ns, "10.10.0.1/24", &[(&vms[2].ns, &vms[2].ip)]);

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("proxy.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[proxy]
workers = 1
agent_socket = "{sock}"
control_socket = "{ctl}"

[[proxy.namespace]]
netns = "{r1_ns}"
router_id = "{r1}"
listen = "169.254.169.254:80"

[[proxy.namespace]]
netns = "{r2_ns}"
router_id = "{r2}"
listen = "169.254.169.254:80"
"#,
            sock = sock.display(),
            ctl = dir.path().join("ctl.sock").display(),
        ),
    )
    .unwrap();
    let mut proxy = Daemon::start(
        "proxy",
        &["proxy", "--config", cfg.to_str().unwrap()],
        dir.path(),
    );

    // The Python agent's first RPC can be slow: wait for one 200 first.
    let t1 = Instant::now();
    loop {
        let (status, _) = curl_in(
            &vms[0].ns,
            "http://169.254.169.254/latest/meta-data/instance-id",
            &[],
        );
        if status == 200 {
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(30),
            "chain never answered 200 (last {status})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("chain warm after {:?}", t0.elapsed());

    // cloud-init's full crawl is ~40 requests and the Python agent serves
    // them one at a time (100 ms to 1 s each on a busy host), so the readers
    // run in the two VMs that share 10.10.0.11; vm2 gets a direct request.
    let pair = [&vms[0], &vms[2]];
    let results: Vec<serde_json::Value> = std::thread::scope(|s| {
        let hs: Vec<_> = pair
            .iter()
            .map(|vm| s.spawn(|| cloud_init_read(&vm.ns, "http://169.254.169.254")))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (vm, got) in pair.iter().zip(&results) {
        check_own_data(got, vm, &vms);
    }
    eprintln!("cloud-init in vm1 and vm3: {:?}", t0.elapsed());
    let (status, body) = curl_in(
        &vms[1].ns,
        "http://169.254.169.254/openstack/latest/meta_data.json",
        &[],
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["uuid"], vms[1].uuid.as_str(), "{body}");

    // vm3 claims to be vm1 (same address, router1): still vm3.
    let spoof = [
        format!("X-Neutron-Router-ID: {r1}"),
        format!("X-Instance-ID: {}", vms[0].uuid),
        format!("X-Forwarded-For: {}", vms[1].ip),
    ];
    let (status, body) = curl_in(
        &vms[2].ns,
        "http://169.254.169.254/openstack/latest/meta_data.json",
        &header_args(&spoof),
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["uuid"], vms[2].uuid.as_str(), "{body}");
    proxy.assert_running();
    eprintln!("real chain: {:?}", t0.elapsed());
}
