//! End to end through real namespaces: `metaproxy proxy`, `agent` and `api`
//! as three separate processes of the real binary, a `qrouter-<R>` namespace
//! with two VMs behind it and a `qdhcp-<N>` namespace serving an isolated
//! network (layout in `tests/common/netns.rs`). Inside each VM namespace,
//! cloud-init's own readers (Debian's package) must get that VM's metadata
//! and nobody else's, whatever trust headers the VM sends.
//! Needs root, `ip`, `curl` and cloud-init; otherwise prints SKIPPED.

mod common;

use std::time::Instant;

use common::netns::*;

#[test]
fn cloud_init_in_each_vm_reads_only_its_own_metadata() {
    if let Err(why) = can_run(&[]) {
        eprintln!("SKIPPED cloud_init_in_each_vm_reads_only_its_own_metadata: {why}");
        return;
    }
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let topo = Topology::build(1);
    let backend = Backend::start(&topo, dir.path());
    let mut proxy = start_our_proxy(&topo, &backend, dir.path());
    eprintln!("topology and daemons up in {:?}", t0.elapsed());

    // All three guests boot at once, like a small storm.
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = topo
            .vms
            .iter()
            .map(|vm| s.spawn(|| cloud_init_read(&vm.ns, "http://169.254.169.254")))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (vm, got) in topo.vms.iter().zip(&results) {
        assert_own_metadata(got, vm, &topo.vms);
    }
    proxy.assert_running();
    eprintln!("cloud-init read all three in {:?}", t0.elapsed());
}

#[test]
fn spoofed_trust_headers_still_get_only_the_callers_metadata() {
    if let Err(why) = can_run(&[]) {
        eprintln!("SKIPPED spoofed_trust_headers_still_get_only_the_callers_metadata: {why}");
        return;
    }
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let topo = Topology::build(2);
    let backend = Backend::start(&topo, dir.path());
    let mut proxy = start_our_proxy(&topo, &backend, dir.path());

    let [vm1, vm2, vm3] = &topo.vms;
    // Each VM claims, in every header it can, to be another one.
    for (me, victim) in [(vm1, vm2), (vm2, vm1), (vm3, vm1), (vm1, vm3)] {
        let headers = spoofed_headers(&topo, victim);
        for path in [
            "/openstack/latest/meta_data.json",
            "/2009-04-04/meta-data/instance-id",
            "/latest/meta-data/local-ipv4",
        ] {
            let url = format!("http://169.254.169.254{path}");
            let (status, body) = curl_in(&me.ns, &url, &header_args(&headers));
            assert_eq!(status, 200, "{} {path}: {body}", me.ns);
            assert!(
                !body.contains(&victim.uuid),
                "{} got {}'s metadata: {body}",
                me.ns,
                victim.ns
            );
            assert!(
                !body.contains(victim.ip),
                "{} got {}'s address: {body}",
                me.ns,
                victim.ns
            );
            match path {
                "/openstack/latest/meta_data.json" => {
                    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                    assert_eq!(v["uuid"], me.uuid.as_str(), "{body}");
                    assert_eq!(v["public_keys"][&me.key_name], me.key_data.as_str());
                }
                "/latest/meta-data/local-ipv4" => assert_eq!(body, me.ip),
                _ => assert!(body.starts_with("i-"), "{body}"),
            }
        }
        // The user-data of the victim never leaks either.
        let (status, body) = curl_in(
            &me.ns,
            "http://169.254.169.254/openstack/latest/user_data",
            &header_args(&headers),
        );
        assert_eq!((status, body.as_str()), (200, me.user_data.as_str()));
    }
    proxy.assert_running();
    eprintln!("spoofing matrix in {:?}", t0.elapsed());
}
