//! Debian's haproxy, configured exactly as Neutron renders it
//! (`../shared/spec/metadata-path.md` §1.3), in front of OUR agent's Unix
//! socket: the drop-in claim for the agent half.
//!
//! - In the namespace topology of `tests/common/netns.rs`, one haproxy per
//!   namespace (`ip netns exec qrouter-<R> haproxy -f cfg -db` behind the L3
//!   agent's REDIRECT 169.254.169.254:80 → 9697, and one in `qdhcp-<N>` bound
//!   to 169.254.169.254:80) must give cloud-init in each VM exactly what our
//!   own proxy gives it. Needs root, `haproxy` and cloud-init; nftables for
//!   the redirect (without `nft` the VMs ask port 9697 directly).
//! - On the host's loopback, haproxy → our agent → our api reaches the right
//!   instance for two source addresses. Needs only `haproxy`.
//!
//! Otherwise each test prints SKIPPED.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::free_port;
use common::netns::*;

/// Which Neutron agent renders the file.
enum Kind<'a> {
    /// L3 agent: `X-Neutron-Router-ID`, listening on 9697.
    Router(&'a str),
    /// DHCP agent: `X-Neutron-Network-ID`, on 169.254.169.254:80.
    Network(&'a str),
}

/// Neutron's haproxy config, rendered as `neutron/agent/metadata/driver_base.py`
/// does on master (rate limiting off, default timeouts). Only the paths and
/// the user differ: Neutron writes its own user (`neutron`) and state dir;
/// we write ours.
fn neutron_haproxy_cfg(kind: &Kind, bind: &str, socket: &Path, dir: &Path) -> String {
    let uid = nix::unistd::getuid();
    let gid = nix::unistd::getgid();
    let user = nix::unistd::User::from_uid(uid).unwrap().unwrap().name;
    let group = nix::unistd::Group::from_gid(gid).unwrap().unwrap().name;
    let (id, headers) = match kind {
        Kind::Router(r) => (
            *r,
            format!(
                "    http-request del-header X-Neutron-Network-ID\n    http-request set-header X-Neutron-Router-ID {r}\n"
            ),
        ),
        Kind::Network(n) => (
            *n,
            format!(
                "    http-request del-header X-Neutron-Router-ID\n    http-request set-header X-Neutron-Network-ID {n}\n"
            ),
        ),
    };
    format!(
        "
global
    log         /dev/log local0 info
    log-tag     haproxy-metadata-proxy-{id}
    user        {user}
    group       {group}
    maxconn     1024
    nbthread    2
    pidfile     {pid}
    daemon

defaults
    log global
    mode http
    option httplog
    option dontlognull
    option http-server-close
    option forwardfor
    retries                 3
    timeout http-request    30s
    timeout connect         30s
    timeout client          32s
    timeout server          32s
    timeout http-keep-alive 30s

listen listener
    bind {bind}
    
    server metadata {sock}

{headers}",
        pid = dir.join(format!("{id}.pid.haproxy")).display(),
        sock = socket.display(),
    )
}

/// haproxy in namespace `ns` (None: the host's), in the foreground (`-db`).
fn start_haproxy(name: &str, ns: Option<&str>, cfg_text: &str, dir: &Path) -> Daemon {
    let cfg = dir.join(format!("{name}.cfg"));
    std::fs::write(&cfg, cfg_text).unwrap();
    let mut cmd = match ns {
        Some(ns) => in_ns(ns, "haproxy"),
        None => Command::new("haproxy"),
    };
    cmd.arg("-f").arg(&cfg).arg("-db");
    Daemon::spawn_unnotified(name, &mut cmd, dir)
}

/// What cloud-init read, without the one field that differs per request.
fn comparable(mut v: serde_json::Value) -> serde_json::Value {
    if let Some(md) = v["openstack"]["metadata"].as_object_mut() {
        assert!(md.remove("random_seed").is_some(), "no random_seed");
    }
    v
}

#[test]
fn neutrons_haproxy_in_front_of_our_agent_matches_our_proxy() {
    if let Err(why) = can_run(&["haproxy"]) {
        eprintln!("SKIPPED neutrons_haproxy_in_front_of_our_agent_matches_our_proxy: {why}");
        return;
    }
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let topo = Topology::build(3);
    let backend = Backend::start(&topo, dir.path());
    let read_all = |port: Option<u16>| -> Vec<serde_json::Value> {
        std::thread::scope(|s| {
            let hs: Vec<_> = topo
                .vms
                .iter()
                .map(|vm| s.spawn(|| cloud_init_read(&vm.ns, &base_for(vm, &topo, port))))
                .collect();
            hs.into_iter()
                .map(|h| comparable(h.join().unwrap()))
                .collect()
        })
    };

    // 1. Our proxy.
    let ours = {
        let _proxy = start_our_proxy(&topo, &backend, dir.path());
        read_all(None)
    };
    for (vm, got) in topo.vms.iter().zip(&ours) {
        assert_own_metadata(got, vm, &topo.vms);
    }
    eprintln!("our proxy: {:?}", t0.elapsed());

    // 2. The same namespaces with Neutron's haproxies (our proxy is gone and
    //    its listeners with it).
    let port = if have("nft") {
        // The L3 agent's nat PREROUTING rule (§2.1), in nftables spelling.
        sh(&[
            "ip", "netns", "exec", &topo.router_ns, "nft",
            "add table ip nat; \
             add chain ip nat pre { type nat hook prerouting priority dstnat; }; \
             add rule ip nat pre ip daddr 169.254.169.254 iifname \"qr-*\" tcp dport 80 redirect to :9697",
        ]);
        None
    } else {
        eprintln!(
            "note: `nft` not installed, VMs behind the router ask 169.254.169.254:9697 directly"
        );
        Some(9697)
    };
    // The L3 agent binds :::9697 (one dual-stack socket) when the host has
    // IPv6, 0.0.0.0:9697 otherwise.
    let v6 = Path::new("/proc/sys/net/ipv6").exists();
    let router_bind = if v6 { ":::9697" } else { "0.0.0.0:9697" };
    let mut hr = start_haproxy(
        "haproxy-router",
        Some(&topo.router_ns),
        &neutron_haproxy_cfg(
            &Kind::Router(&topo.router_id),
            router_bind,
            &backend.sock,
            dir.path(),
        ),
        dir.path(),
    );
    let mut hd = start_haproxy(
        "haproxy-dhcp",
        Some(&topo.dhcp_ns),
        &neutron_haproxy_cfg(
            &Kind::Network(&topo.isolated_net),
            "169.254.169.254:80",
            &backend.sock,
            dir.path(),
        ),
        dir.path(),
    );
    for vm in &topo.vms {
        wait_http(&vm.ns, &base_for(vm, &topo, port));
    }
    let theirs = read_all(port);
    hr.assert_running();
    hd.assert_running();
    for ((vm, a), b) in topo.vms.iter().zip(&ours).zip(&theirs) {
        assert_eq!(a, b, "{}: our proxy and Neutron's haproxy disagree", vm.ns);
    }
    eprintln!("haproxy: {:?}", t0.elapsed());

    // Spoofing through haproxy: it appends its own X-Forwarded-For and lets
    // X-OVN-Network-ID through, so our agent refuses (fails closed, like
    // Neutron's agent does with 500/502); never another VM's metadata.
    let [vm1, vm2, vm3] = &topo.vms;
    for (me, victim) in [(vm1, vm2), (vm2, vm1), (vm3, vm1)] {
        let headers = spoofed_headers(&topo, victim);
        let url = format!(
            "{}/openstack/latest/meta_data.json",
            base_for(me, &topo, port)
        );
        let (status, body) = curl_in(&me.ns, &url, &header_args(&headers));
        assert!(
            !body.contains(&victim.uuid),
            "{} got {}'s metadata: {body}",
            me.ns,
            victim.ns
        );
        if status == 200 {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["uuid"], me.uuid.as_str());
        } else {
            assert_eq!(status, 400, "{body}");
        }
        // A header haproxy does replace, alone: the request goes through.
        let spoof = format!("X-Neutron-Router-ID: {}", topo.router_id);
        let (status, body) = curl_in(&me.ns, &url, &["-H", &spoof]);
        assert_eq!(status, 200, "{}: {body}", me.ns);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["uuid"], me.uuid.as_str());
    }
    eprintln!("total: {:?}", t0.elapsed());
}

/// The metadata base URL `vm` uses: `router_port` None = 80 (redirected
/// by nft, or served by our proxy on the address itself).
fn base_for(vm: &Vm, topo: &Topology, router_port: Option<u16>) -> String {
    match router_port.filter(|_| vm.network == topo.router_net) {
        Some(p) => format!("http://169.254.169.254:{p}"),
        None => "http://169.254.169.254".to_string(),
    }
}

/// The demo inventory's router, instances and network (examples/inventory.toml).
const DEMO_ROUTER: &str = "d0d0d0d0-0000-4000-8000-00000000c001";
const DEMO: &str = "d0d0d0d0-0000-4000-8000-000000000001";
const DEMO2: &str = "d0d0d0d0-0000-4000-8000-000000000002";

#[test]
fn host_haproxy_to_our_agent_to_our_api_reaches_the_right_instance() {
    if !have("haproxy") || !have("curl") {
        eprintln!(
            "SKIPPED host_haproxy_to_our_agent_to_our_api_reaches_the_right_instance: \
             `haproxy` or `curl` not installed (scripts/test.sh installs them)"
        );
        return;
    }
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let inv = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/inventory.toml"
    ))
    .unwrap();
    let backend = Backend::start_with(&inv, dir.path());
    let port = free_port();
    let mut h = start_haproxy(
        "haproxy-host",
        None,
        &neutron_haproxy_cfg(
            &Kind::Router(DEMO_ROUTER),
            &format!("127.0.0.1:{port}"),
            &backend.sock,
            dir.path(),
        ),
        dir.path(),
    );
    let url = format!("http://127.0.0.1:{port}/openstack/latest/meta_data.json");
    let t1 = Instant::now();
    let get = |from: &str| -> (u16, String) {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--noproxy",
                "*",
                "--max-time",
                "10",
                "--interface",
                from,
                "-w",
                "\n%{http_code}",
                &url,
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        match text.rsplit_once('\n') {
            Some((body, code)) if out.status.success() => {
                (code.trim().parse().unwrap_or(0), body.to_string())
            }
            _ => (0, String::from_utf8_lossy(&out.stderr).into_owned()),
        }
    };
    // haproxy has no readiness signal: wait for the first answer.
    let mut first = get("127.0.0.1");
    while first.0 == 0 && t1.elapsed() < std::time::Duration::from_secs(10) {
        h.assert_running();
        std::thread::sleep(std::time::Duration::from_millis(50));
        first = get("127.0.0.1");
    }
    for ((status, body), (from, uuid, host)) in [
        (first, ("127.0.0.1", DEMO, "demo.novalocal")),
        (get("127.0.0.2"), ("127.0.0.2", DEMO2, "demo2.novalocal")),
    ] {
        assert_eq!(status, 200, "from {from}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["uuid"], uuid, "from {from}: {body}");
        assert_eq!(v["hostname"], host, "from {from}: {body}");
    }
    // An address the inventory does not know: Neutron's 404 through haproxy.
    let (status, body) = get("127.0.0.9");
    assert_eq!(status, 404, "{body}");
    h.assert_running();
    eprintln!("host haproxy chain: {:?}", t0.elapsed());
}
