//! Namespace discovery through real `ip netns add/del` (root; CI is root).
//! Each test uses its own name prefixes so nothing else on the host matches.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn can_run() -> Result<(), String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err(
            "not root (network namespaces need CAP_SYS_ADMIN; CI runs this as root)".into(),
        );
    }
    for tool in ["ip", "curl"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Err(format!(
                "`{tool}` not installed (scripts/test.sh installs it)"
            ));
        }
    }
    Ok(())
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().unwrap();
    assert!(st.success(), "ip {args:?}");
}

fn uuid(i: u32) -> String {
    format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), i)
}

fn start(agent: &FakeAgent, tag: &str) -> metaproxy::proxy::ProxyHandle {
    start_in(agent, tag, "/run/netns")
}

fn start_in(agent: &FakeAgent, tag: &str, dir: &str) -> metaproxy::proxy::ProxyHandle {
    let text = format!(
        r#"
[proxy]
workers = 2
netns_dir = "{dir}"
agent_socket = "{}"
[proxy.discover]
enabled = true
router_prefix = "{tag}r-"
network_prefixes = ["{tag}d-"]
ovn_prefixes = ["{tag}o-"]
router_listen = "0.0.0.0:9697"
[proxy.timeouts]
keep_alive = "2s"
[[proxy.namespace]]
router_id = "{ROUTER}"
listen = "127.0.0.1:0"
"#,
        agent.path.display()
    );
    let f = metaproxy::proxy::config::parse_str(&text, Path::new("t.toml")).unwrap();
    let cfg = metaproxy::proxy::config::ProxyConfig::try_from(f.proxy.as_ref().unwrap()).unwrap();
    let d = cfg.discover.clone().unwrap();
    let h = metaproxy::proxy::start(cfg).unwrap();
    // The watcher lives as long as the test (dropped without stop at the end).
    std::mem::forget(metaproxy::proxy::discover::start(d, h.control.clone()).unwrap());
    h
}

fn served(h: &metaproxy::proxy::ProxyHandle, name: &str) -> bool {
    h.control.status().iter().any(|s| s.name == name)
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    t0.elapsed()
}

fn curl_in(ns: &str, url: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-sS", "--max-time", "5", url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl {url} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

struct Cleanup(Vec<String>);
impl Drop for Cleanup {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

#[test]
fn router_and_network_namespaces_appear_and_disappear() {
    if let Err(why) = can_run() {
        eprintln!("SKIPPED router_and_network_namespaces_appear_and_disappear: {why}");
        return;
    }
    let tag = format!("t{}", std::process::id() % 100000);
    let agent = FakeAgent::start(AgentMode::KeepAlive);
    let h = start(&agent, &tag);
    let (rid, nid) = (uuid(1), uuid(2));
    let (rname, nname) = (format!("{tag}r-{rid}"), format!("{tag}d-{nid}"));
    let _c = Cleanup(vec![rname.clone(), nname.clone()]);

    // Router: served within 1 s of `ip netns add`.
    let t0 = Instant::now();
    ip(&["netns", "add", &rname]);
    wait_until("router namespace served", Duration::from_secs(1), || {
        served(&h, &rname)
    });
    eprintln!("ip netns add -> serving: {:?}", t0.elapsed());
    ip(&["-n", &rname, "link", "set", "lo", "up"]);
    let body = curl_in(&rname, "http://127.0.0.1:9697/latest/meta-data/");
    assert!(
        body.starts_with("/latest/meta-data/ for 127.0.0.1"),
        "{body}"
    );
    let last = agent.seen().last().cloned().unwrap();
    assert_eq!(last.all("X-Neutron-Router-ID"), vec![rid.clone()]);

    // Network namespace whose address is already there.
    ip(&["netns", "add", &nname]);
    ip(&["-n", &nname, "link", "set", "lo", "up"]);
    ip(&[
        "-n",
        &nname,
        "addr",
        "add",
        "169.254.169.254/32",
        "dev",
        "lo",
    ]);
    wait_until("network namespace served", Duration::from_secs(1), || {
        served(&h, &nname)
    });
    let body = curl_in(&nname, "http://169.254.169.254/openstack");
    assert!(body.starts_with("/openstack for 169.254.169.254"), "{body}");
    let last = agent.seen().last().cloned().unwrap();
    assert_eq!(last.all("X-Neutron-Network-ID"), vec![nid.clone()]);

    // An OVN metadata namespace: stamped X-OVN-Network-ID (what the OVN
    // metadata agent reads), whatever the VM sent.
    let oid = uuid(3);
    let oname = format!("{tag}o-{oid}");
    let _c2 = Cleanup(vec![oname.clone()]);
    ip(&["netns", "add", &oname]);
    ip(&["-n", &oname, "link", "set", "lo", "up"]);
    ip(&[
        "-n",
        &oname,
        "addr",
        "add",
        "169.254.169.254/32",
        "dev",
        "lo",
    ]);
    wait_until("OVN namespace served", Duration::from_secs(1), || {
        served(&h, &oname)
    });
    let out = Command::new("ip")
        .args(["netns", "exec", &oname, "curl", "-sS", "--max-time", "5"])
        .args([
            "-H",
            "X-OVN-Network-ID: 00000000-0000-4000-8000-000000000666",
        ])
        .args([
            "-H",
            "X-Neutron-Network-ID: 00000000-0000-4000-8000-000000000666",
        ])
        .arg("http://169.254.169.254/openstack")
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(body.starts_with("/openstack for 169.254.169.254"), "{body}");
    let last = agent.seen().last().cloned().unwrap();
    assert_eq!(last.all("X-OVN-Network-ID"), vec![oid.clone()]);
    assert!(last.all("X-Neutron-Network-ID").is_empty(), "{last:?}");
    assert!(last.all("X-Neutron-Router-ID").is_empty(), "{last:?}");

    // Deletion closes them.
    ip(&["netns", "del", &rname]);
    ip(&["netns", "del", &nname]);
    ip(&["netns", "del", &oname]);
    wait_until("namespaces removed", Duration::from_secs(1), || {
        !served(&h, &rname) && !served(&h, &nname) && !served(&h, &oname)
    });
    h.stop().unwrap();
}

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

#[test]
fn a_burst_of_200_namespaces_leaks_nothing_and_disturbs_no_one() {
    if let Err(why) = can_run() {
        eprintln!("SKIPPED a_burst_of_200_namespaces_leaks_nothing_and_disturbs_no_one: {why}");
        return;
    }
    let tag = format!("b{}", std::process::id() % 100000);
    let agent = FakeAgent::start(AgentMode::KeepAlive);
    let h = start(&agent, &tag);
    let static_addr: SocketAddr = h.bound[0][0];

    // Traffic on the static namespace throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, bad) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let traffic = {
        let (stop, ok, bad) = (stop.clone(), ok.clone(), bad.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match get(
                    static_addr,
                    "GET /static HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                ) {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => bad.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    // Baseline once the traffic has warmed the agent pools.
    std::thread::sleep(Duration::from_millis(500));
    let (fd0, th0) = (fds(), threads());
    let names: Vec<String> = (0..200)
        .map(|i| format!("{tag}r-{}", uuid(1000 + i)))
        .collect();
    let _c = Cleanup(names.clone());
    for n in &names {
        ip(&["netns", "add", n]);
    }
    wait_until("200 namespaces served", Duration::from_secs(20), || {
        h.control
            .status()
            .iter()
            .filter(|s| s.name.starts_with(&format!("{tag}r-")))
            .count()
            == 200
    });
    for n in &names {
        ip(&["netns", "del", n]);
    }
    wait_until("200 namespaces gone", Duration::from_secs(20), || {
        h.control
            .status()
            .iter()
            .all(|s| !s.name.starts_with(&format!("{tag}r-")))
    });
    std::thread::sleep(Duration::from_millis(300));
    let (fd1, th1) = (fds(), threads());
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
    assert_eq!(
        bad.load(Ordering::Relaxed),
        0,
        "static namespace traffic failed during the burst"
    );
    assert!(ok.load(Ordering::Relaxed) > 10);
    // One request in flight (2 fds) may straddle either measurement.
    assert!(fd1 <= fd0 + 4, "fds: {fd0} before, {fd1} after");
    assert!(th1 <= th0 + 1, "threads: {th0} before, {th1} after");
    h.stop().unwrap();
}

#[test]
fn an_address_that_is_not_there_yet_is_retried_until_it_is() {
    if let Err(why) = can_run() {
        eprintln!("SKIPPED an_address_that_is_not_there_yet_is_retried_until_it_is: {why}");
        return;
    }
    // The namespace appears in a watched directory the way `ip netns add`
    // makes it (file first, mount later), with lo up and no 169.254.169.254.
    let tag = format!("a{}", std::process::id() % 100000);
    let watched = tempfile::tempdir().unwrap();
    let agent = FakeAgent::start(AgentMode::KeepAlive);
    let h = start_in(&agent, &tag, watched.path().to_str().unwrap());
    let nid = uuid(3);
    let name = format!("{tag}d-{nid}");
    let prep = format!("prep{tag}");
    let _c = Cleanup(vec![prep.clone()]);
    ip(&["netns", "add", &prep]);
    ip(&["-n", &prep, "link", "set", "lo", "up"]);
    let file = watched.path().join(&name);
    std::fs::write(&file, b"").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let st = Command::new("mount")
        .args(["--bind", &format!("/run/netns/{prep}")])
        .arg(&file)
        .status()
        .unwrap();
    assert!(st.success(), "mount --bind");
    std::thread::sleep(Duration::from_millis(400));
    assert!(
        !served(&h, &name),
        "cannot be served before the address exists"
    );
    ip(&[
        "-n",
        &prep,
        "addr",
        "add",
        "169.254.169.254/32",
        "dev",
        "lo",
    ]);
    let took = wait_until(
        "served once the address appeared",
        Duration::from_secs(6),
        || served(&h, &name),
    );
    eprintln!("address added -> serving: {took:?}");
    let body = curl_in(&prep, "http://169.254.169.254/openstack");
    assert!(body.starts_with("/openstack for 169.254.169.254"), "{body}");
    let _ = Command::new("umount").arg(&file).status();
    let _ = std::fs::remove_file(&file);
    wait_until("removed with its file", Duration::from_secs(1), || {
        !served(&h, &name)
    });
    h.stop().unwrap();
}

#[test]
fn a_network_namespace_is_served_on_fe80_a9fe_a9fe_once_it_appears() {
    if let Err(why) = can_run() {
        eprintln!("SKIPPED a_network_namespace_is_served_on_fe80_a9fe_a9fe_once_it_appears: {why}");
        return;
    }
    let tag = format!("v{}", std::process::id() % 100000);
    let watched = tempfile::tempdir().unwrap();
    let agent = FakeAgent::start(AgentMode::KeepAlive);
    let h = start_in(&agent, &tag, watched.path().to_str().unwrap());
    let nid = uuid(6);
    let name = format!("{tag}d-{nid}");
    let prep = format!("prep{tag}");
    let _c = Cleanup(vec![prep.clone()]);
    ip(&["netns", "add", &prep]);
    ip(&["-n", &prep, "link", "set", "lo", "up"]);
    // A veth pair inside the namespace stands in for the DHCP tap (no dummy module here).
    ip(&[
        "-n", &prep, "link", "add", "tapmd", "type", "veth", "peer", "name", "tapmp",
    ]);
    ip(&["-n", &prep, "link", "set", "tapmp", "up"]);
    ip(&["-n", &prep, "link", "set", "tapmd", "up"]);
    ip(&[
        "-n",
        &prep,
        "addr",
        "add",
        "169.254.169.254/32",
        "dev",
        "tapmd",
    ]);
    let file = watched.path().join(&name);
    std::fs::write(&file, b"").unwrap();
    let st = Command::new("mount")
        .args(["--bind", &format!("/run/netns/{prep}")])
        .arg(&file)
        .status()
        .unwrap();
    assert!(st.success(), "mount --bind");
    wait_until("served on v4", Duration::from_secs(3), || served(&h, &name));
    let v6 = "fe80::a9fe:a9fe".parse::<std::net::IpAddr>().unwrap();
    let has_v6 = || {
        h.control
            .status()
            .iter()
            .filter(|s| s.name == name)
            .any(|s| s.listeners.iter().any(|a| a.ip() == v6))
    };
    assert!(!has_v6(), "no v6 listener before the address exists");
    // The DHCP agent adds the address later (after DAD): it is picked up.
    ip(&[
        "-n",
        &prep,
        "addr",
        "add",
        "fe80::a9fe:a9fe/128",
        "dev",
        "tapmd",
        "nodad",
    ]);
    let took = wait_until("served on fe80::a9fe:a9fe", Duration::from_secs(3), has_v6);
    eprintln!("fe80::a9fe:a9fe added -> serving on it: {took:?}");
    let body = curl_in(&prep, "http://[fe80::a9fe:a9fe%25tapmd]:80/openstack");
    assert!(body.starts_with("/openstack for fe80::a9fe:a9fe"), "{body}");
    let _ = Command::new("umount").arg(&file).status();
    let _ = std::fs::remove_file(&file);
    wait_until("both registrations removed", Duration::from_secs(1), || {
        !served(&h, &name)
    });
    h.stop().unwrap();
}
