//! Real network namespaces: the proxy listens inside a router/dhcp-style
//! namespace created with `ip netns`, and a "vm" namespace reaches it over a
//! veth pair with curl. Needs root (CI is root); otherwise prints SKIPPED.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

struct Netns(Vec<String>);

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn sh(args: &[&str]) {
    let st = Command::new(args[0])
        .args(&args[1..])
        .status()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(st.success(), "{args:?} failed");
}

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

/// qrouter-style namespace + vm namespace joined by a veth pair.
fn topology(tag: &str) -> (Netns, String, String) {
    let pid = std::process::id();
    let router = format!("qrouter-mp{tag}{pid}");
    let vm = format!("mpvm{tag}{pid}");
    let guard = Netns(vec![router.clone(), vm.clone()]);
    let (a, b) = (
        format!("mpr{tag}{}", pid % 100000),
        format!("mpv{tag}{}", pid % 100000),
    );
    sh(&["ip", "netns", "add", &router]);
    sh(&["ip", "netns", "add", &vm]);
    sh(&["ip", "link", "add", &a, "type", "veth", "peer", "name", &b]);
    sh(&["ip", "link", "set", &a, "netns", &router]);
    sh(&["ip", "link", "set", &b, "netns", &vm]);
    sh(&[
        "ip",
        "-n",
        &router,
        "addr",
        "add",
        "10.77.0.1/24",
        "dev",
        &a,
    ]);
    sh(&[
        "ip",
        "-n",
        &router,
        "addr",
        "add",
        "169.254.169.254/32",
        "dev",
        &a,
    ]);
    sh(&["ip", "-n", &vm, "addr", "add", "10.77.0.5/24", "dev", &b]);
    for (ns, dev) in [(&router, &a), (&vm, &b)] {
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
    }
    sh(&[
        "ip",
        "-n",
        &vm,
        "route",
        "add",
        "169.254.169.254/32",
        "via",
        "10.77.0.1",
    ]);
    (guard, router, vm)
}

fn curl_in(vm: &str, url: &str, extra: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", vm, "curl", "-sS", "--max-time", "10"])
        .args(extra)
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn listener_inside_a_namespace_sees_the_vm_address_and_stamps_the_router() {
    if let Err(why) = can_run() {
        eprintln!(
            "SKIPPED listener_inside_a_namespace_sees_the_vm_address_and_stamps_the_router: {why}"
        );
        return;
    }
    let (_guard, router, vm) = topology("a");
    let agent = FakeAgent::start(AgentMode::KeepAlive);
    let text = format!(
        r#"
[proxy]
workers = 2
agent_socket = "{}"
[[proxy.namespace]]
netns = "{router}"
router_id = "{ROUTER}"
listen = ["0.0.0.0:9697", "169.254.169.254:80"]
"#,
        agent.path.display()
    );
    let f = metaproxy::proxy::config::parse_str(&text, Path::new("t.toml")).unwrap();
    let cfg = metaproxy::proxy::config::ProxyConfig::try_from(f.proxy.as_ref().unwrap()).unwrap();
    let h = metaproxy::proxy::start(cfg).unwrap();

    let body = curl_in(
        &vm,
        "http://10.77.0.1:9697/latest/meta-data/instance-id",
        &[],
    );
    assert!(
        body.starts_with("/latest/meta-data/instance-id for 10.77.0.5"),
        "{body}"
    );
    // The well-known address, with spoofing attempts.
    let body = curl_in(
        &vm,
        "http://169.254.169.254/openstack",
        &[
            "-H",
            "X-Forwarded-For: 10.77.0.9",
            "-H",
            "X-Neutron-Router-ID: 11111111-1111-4111-8111-111111111111",
        ],
    );
    assert!(body.starts_with("/openstack for 10.77.0.5"), "{body}");
    let seen = agent.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.all("X-Forwarded-For"), vec!["10.77.0.5".to_string()]);
        assert_eq!(s.all("X-Neutron-Router-ID"), vec![ROUTER.to_string()]);
    }
    h.stop().unwrap();
}

#[test]
fn a_missing_namespace_is_a_startup_error_naming_it() {
    if let Err(why) = can_run() {
        eprintln!("SKIPPED a_missing_namespace_is_a_startup_error_naming_it: {why}");
        return;
    }
    let agent = FakeAgent::start(AgentMode::KeepAlive);
    let text = format!(
        "[proxy]\nagent_socket = \"{}\"\n[[proxy.namespace]]\nnetns = \"qrouter-does-not-exist\"\nrouter_id = \"{ROUTER}\"\nlisten = \"0.0.0.0:9697\"\n",
        agent.path.display()
    );
    let f = metaproxy::proxy::config::parse_str(&text, Path::new("t.toml")).unwrap();
    let cfg = metaproxy::proxy::config::ProxyConfig::try_from(f.proxy.as_ref().unwrap()).unwrap();
    let err = metaproxy::proxy::start(cfg)
        .err()
        .expect("must refuse to start")
        .to_string();
    assert!(err.contains("qrouter-does-not-exist"), "{err}");
}

/// vm —veth— mid (a forwarding hop) —veth— router (the proxy). The token
/// response leaves with IP TTL = hop_limit: 1 dies at the middle hop, 2 arrives.
#[test]
fn token_responses_do_not_survive_more_hops_than_hop_limit() {
    if let Err(why) = can_run() {
        eprintln!("SKIPPED token_responses_do_not_survive_more_hops_than_hop_limit: {why}");
        return;
    }
    let pid = std::process::id();
    let (router, mid, vm) = (
        format!("qrouter-mph{pid}"),
        format!("mpmid{pid}"),
        format!("mpvmh{pid}"),
    );
    let _guard = Netns(vec![router.clone(), mid.clone(), vm.clone()]);
    let p = pid % 100000;
    let (r1, m1, m2, v1) = (
        format!("mphr{p}"),
        format!("mphm{p}"),
        format!("mphn{p}"),
        format!("mphv{p}"),
    );
    for n in [&router, &mid, &vm] {
        sh(&["ip", "netns", "add", n]);
        sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
    }
    sh(&[
        "ip", "link", "add", &r1, "type", "veth", "peer", "name", &m1,
    ]);
    sh(&[
        "ip", "link", "add", &m2, "type", "veth", "peer", "name", &v1,
    ]);
    sh(&["ip", "link", "set", &r1, "netns", &router]);
    sh(&["ip", "link", "set", &m1, "netns", &mid]);
    sh(&["ip", "link", "set", &m2, "netns", &mid]);
    sh(&["ip", "link", "set", &v1, "netns", &vm]);
    sh(&[
        "ip",
        "-n",
        &router,
        "addr",
        "add",
        "10.78.1.1/24",
        "dev",
        &r1,
    ]);
    sh(&["ip", "-n", &mid, "addr", "add", "10.78.1.2/24", "dev", &m1]);
    sh(&["ip", "-n", &mid, "addr", "add", "10.78.2.1/24", "dev", &m2]);
    sh(&["ip", "-n", &vm, "addr", "add", "10.78.2.5/24", "dev", &v1]);
    for (n, d) in [(&router, &r1), (&mid, &m1), (&mid, &m2), (&vm, &v1)] {
        sh(&["ip", "-n", n, "link", "set", d, "up"]);
    }
    sh(&[
        "ip",
        "netns",
        "exec",
        &mid,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ]);
    sh(&[
        "ip",
        "-n",
        &router,
        "route",
        "add",
        "10.78.2.0/24",
        "via",
        "10.78.1.2",
    ]);
    sh(&[
        "ip",
        "-n",
        &vm,
        "route",
        "add",
        "default",
        "via",
        "10.78.2.1",
    ]);

    let agent = FakeAgent::start(AgentMode::KeepAlive);
    for (hop_limit, reachable) in [(1, false), (2, true)] {
        let text = format!(
            "[proxy]\nagent_socket = \"{}\"\n[proxy.imdsv2]\nhop_limit = {hop_limit}\n[[proxy.namespace]]\nnetns = \"{router}\"\nrouter_id = \"{ROUTER}\"\nlisten = \"10.78.1.1:9697\"\n",
            agent.path.display()
        );
        let f = metaproxy::proxy::config::parse_str(&text, Path::new("t.toml")).unwrap();
        let h = metaproxy::proxy::start(
            metaproxy::proxy::config::ProxyConfig::try_from(f.proxy.as_ref().unwrap()).unwrap(),
        )
        .unwrap();
        // An ordinary request crosses both hops either way.
        let body = curl_in(&vm, "http://10.78.1.1:9697/openstack", &[]);
        assert!(body.starts_with("/openstack for 10.78.2.5"), "{body}");
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &vm,
                "curl",
                "-sS",
                "--max-time",
                "2",
                "-X",
                "PUT",
                "-H",
                "X-aws-ec2-metadata-token-ttl-seconds: 60",
            ])
            .arg("http://10.78.1.1:9697/latest/api/token")
            .output()
            .unwrap();
        assert_eq!(
            out.status.success(),
            reachable,
            "hop_limit {hop_limit}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        h.stop().unwrap();
    }
}
