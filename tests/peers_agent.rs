//! Our agent with `backend = "neutron"` against the REAL neutron 29.0.0 API
//! (noauth) and the REAL nova 34.0.0 metadata API from `scripts/peers/`.
//!
//! Opt-in: runs only with `METAPROXY_PEERS=1` (`scripts/peers/up.sh && .
//! /tmp/metaproxy-peers/env`), otherwise prints SKIPPED and passes. A 200
//! with the instance's own `uuid` in Nova's `meta_data.json` proves both
//! that we found the right port in Neutron and that Nova accepted our
//! signature.

mod common;

use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use common::read_response;
use metaproxy::agent::AgentConfig;
use serde_json::Value;

fn fixture() -> Option<Value> {
    if std::env::var("METAPROXY_PEERS").as_deref() != Ok("1") {
        println!("SKIPPED peers_agent: set METAPROXY_PEERS=1 (scripts/peers/up.sh; . /tmp/metaproxy-peers/env)");
        return None;
    }
    let path = std::env::var("METAPROXY_PEERS_FIXTURE")
        .unwrap_or_else(|_| "/tmp/metaproxy-peers/fixture.json".into());
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("METAPROXY_PEERS=1 but fixture {path}: {e}"));
    Some(serde_json::from_str(&text).unwrap())
}

fn setting(f: &Value, env: &str, key: &str) -> String {
    std::env::var(env).unwrap_or_else(|_| f[key].as_str().unwrap().to_string())
}

fn agent(f: &Value, dir: &Path, extra: &str) -> metaproxy::agent::AgentHandle {
    let nova = setting(f, "METAPROXY_PEERS_NOVA_URL", "nova_url");
    let (host, port) = nova
        .strip_prefix("http://")
        .unwrap()
        .trim_end_matches('/')
        .rsplit_once(':')
        .unwrap();
    let text = format!(
        r#"
socket = "{}"
socket_mode = "user"
backend = "neutron"
metadata_proxy_shared_secret = "{}"
# Long enough that a slow first round (one gunicorn worker on SQLite, a
# loaded CI machine) cannot outlive it: the test asserts caching, not the TTL.
cache_ttl = "10m"
{extra}
[nova]
nova_metadata_host = "{host}"
nova_metadata_port = {port}
timeout = "30s"
[neutron]
url = "{}"
auth_strategy = "noauth"
timeout = "20s"
"#,
        dir.join("agent.sock").display(),
        setting(f, "METAPROXY_PEERS_SECRET", "shared_secret"),
        setting(f, "METAPROXY_PEERS_NEUTRON_URL", "neutron_url"),
    );
    let t: toml::Table = toml::from_str(&text).unwrap();
    metaproxy::agent::start(AgentConfig::try_from(&t).unwrap()).unwrap()
}

fn get(sock: &Path, xff: &str, scope: &str) -> common::Resp {
    let s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut w = s.try_clone().unwrap();
    write!(
        w,
        "GET /openstack/latest/meta_data.json HTTP/1.1\r\nHost: 169.254.169.254\r\nX-Forwarded-For: {xff}\r\n{scope}\r\n"
    )
    .unwrap();
    read_response(&mut BufReader::new(s), false).unwrap()
}

fn check_every_vm(f: &Value, sock: &Path) -> usize {
    let mut checked = 0;
    for (name, vm) in f["instances"].as_object().unwrap() {
        let uuid = vm["uuid"].as_str().unwrap();
        let ip = vm["ip_address"].as_str().unwrap();
        let mut scopes = vec![format!(
            "X-Neutron-Network-ID: {}\r\n",
            vm["network_id"].as_str().unwrap()
        )];
        if let Some(r) = vm["router_id"].as_str() {
            scopes.push(format!("X-Neutron-Router-ID: {r}\r\n"));
        }
        for scope in scopes {
            let resp = get(sock, ip, &scope);
            assert_eq!(resp.status, 200, "{name} {ip} {scope:?}: {}", resp.text());
            let md: Value = serde_json::from_slice(&resp.body)
                .unwrap_or_else(|e| panic!("{name}: not JSON ({e}): {}", resp.text()));
            assert_eq!(md["uuid"], uuid, "{name} via {scope:?}");
            assert_eq!(
                md["hostname"].as_str().unwrap(),
                format!("{}.novalocal", vm["nova"]["hostname"].as_str().unwrap())
            );
            checked += 1;
        }
    }
    checked
}

#[test]
fn real_neutron_and_nova_through_our_agent() {
    let Some(f) = fixture() else { return };
    for extra in ["", "prefetch_network = false"] {
        let dir = tempfile::tempdir().unwrap();
        let h = agent(&f, dir.path(), extra);
        let sock = dir.path().join("agent.sock");
        let checked = check_every_vm(&f, &sock);
        assert!(checked >= 6, "{checked} lookups checked");

        // An address no port has: 404 with Neutron's message, both scopes.
        let vm1 = &f["instances"]["vm1"];
        let net = vm1["network_id"].as_str().unwrap();
        let resp = get(
            &sock,
            "10.10.0.250",
            &format!("X-Neutron-Network-ID: {net}\r\n"),
        );
        assert_eq!(resp.status, 404, "{}", resp.text());
        assert!(resp
            .text()
            .contains(&format!("Instance was not found on network {net}.")));
        let router = vm1["router_id"].as_str().unwrap();
        let resp = get(
            &sock,
            "10.10.0.250",
            &format!("X-Neutron-Router-ID: {router}\r\n"),
        );
        assert_eq!(resp.status, 404, "{}", resp.text());

        // Everything again: now from the cache.
        let before = h.stats().neutron_calls;
        check_every_vm(&f, &sock);
        let st = h.stats();
        assert_eq!(st.neutron_calls, before, "second round served from cache");
        println!(
            "peers_agent [{extra}]: {checked} lookups, {} Neutron calls, stats {st:?}",
            st.neutron_calls
        );
        h.stop().unwrap();
    }
}

/// A small storm (the peers run one gunicorn worker on SQLite, so tens of
/// requests, not thousands): 40 concurrent requests for the router1 VMs
/// through a fresh agent cost 2 Neutron calls (router → networks, one
/// prefetch of the router's networks).
#[test]
fn small_storm_against_real_neutron() {
    let Some(f) = fixture() else { return };
    let dir = tempfile::tempdir().unwrap();
    let h = agent(&f, dir.path(), "");
    let sock = dir.path().join("agent.sock");
    let vms: Vec<(String, String, String)> = f["instances"]
        .as_object()
        .unwrap()
        .values()
        .filter(|vm| vm["router"] == "router1")
        .map(|vm| {
            (
                vm["uuid"].as_str().unwrap().to_string(),
                vm["ip_address"].as_str().unwrap().to_string(),
                vm["router_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(vms.len() >= 2);
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(40));
    let threads: Vec<_> = (0..40)
        .map(|i| {
            let (uuid, ip, router) = vms[i % vms.len()].clone();
            let (sock, barrier) = (sock.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                // The Nova peer is one gunicorn worker on SQLite and answers
                // some concurrent requests with 500 ("database is locked");
                // cloud-init retries 5xx, and so does this client. Retries
                // are served from the agent's cache: no extra Neutron calls.
                let mut resp = get(&sock, &ip, &format!("X-Neutron-Router-ID: {router}\r\n"));
                for _ in 0..5 {
                    if resp.status != 500 {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    resp = get(&sock, &ip, &format!("X-Neutron-Router-ID: {router}\r\n"));
                }
                assert_eq!(resp.status, 200, "{ip}: {}", resp.text());
                let md: Value = serde_json::from_slice(&resp.body).unwrap();
                assert_eq!(md["uuid"], uuid.as_str());
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let calls = h.stats().neutron_calls;
    println!(
        "peers_agent storm: 40 concurrent requests, {} VMs: {calls} Neutron calls",
        vms.len()
    );
    assert!(calls <= 3, "{calls} Neutron calls");

    // gunicorn closes idle keep-alive connections after ~2 s: a lookup on
    // the pooled (now dead) connection is re-sent on a fresh one.
    std::thread::sleep(Duration::from_millis(2500));
    let router = &vms[0].2;
    let resp = get(
        &sock,
        "10.10.0.251",
        &format!("X-Neutron-Router-ID: {router}\r\n"),
    );
    assert_eq!(resp.status, 404, "{}", resp.text());
    assert_eq!(h.stats().neutron_calls, calls + 1);
    assert_eq!(h.stats().backend_unavailable, 0);
    h.stop().unwrap();
}
