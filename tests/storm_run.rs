//! The storm against an in-test metadata server: a std TcpListener whose
//! threads answer with the real API handler in direct mode, identifying the
//! VM by the TCP peer address. A clean run therefore proves the storm binds
//! each VM's own address; a server that answers VM k's data to VM k+1 must be
//! caught as wrong-VM and fail the run.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metaproxy::api::{ApiRequest, ApiSettings, MetadataApi, PasswordStore};
use metaproxy::inventory::synth::{synth_toml, SynthSpec};
use metaproxy::inventory::Inventory;
use metaproxy::storm::{self, Profile, StormConfig, StormReport, VmSpec};

const VMS: u32 = 200;

struct FakeServer {
    addr: SocketAddr,
    peers: Arc<Mutex<HashSet<IpAddr>>>,
    _dir: tempfile::TempDir,
}

/// `shift`: answer as if the peer were the VM `shift` places earlier.
fn start_server(inv: Inventory, shift: usize) -> FakeServer {
    let dir = tempfile::tempdir().unwrap();
    let ips: Vec<IpAddr> = inv
        .instances()
        .map(|i| i.first_fixed_ipv4().unwrap())
        .collect();
    let index: HashMap<IpAddr, usize> = ips.iter().enumerate().map(|(k, ip)| (*ip, k)).collect();
    let passwords = Arc::new(PasswordStore::open(dir.path()).unwrap());
    let settings = ApiSettings {
        service_metadata_proxy: false,
        ..ApiSettings::default()
    };
    let api = Arc::new(MetadataApi::new(settings, passwords));
    let inv = Arc::new(inv);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let peers = Arc::new(Mutex::new(HashSet::new()));
    let seen = Arc::clone(&peers);
    let map = Arc::new((ips, index));
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(s) = s else { continue };
            let api = Arc::clone(&api);
            let inv = Arc::clone(&inv);
            let map = Arc::clone(&map);
            let seen = Arc::clone(&seen);
            std::thread::spawn(move || {
                let peer = s.peer_addr().unwrap().ip();
                seen.lock().unwrap().insert(peer);
                let (ips, index) = &*map;
                let as_peer = match index.get(&peer) {
                    Some(&k) => ips[(k + ips.len() - shift % ips.len()) % ips.len()],
                    None => peer,
                };
                serve(s, &api, &inv, as_peer);
            });
        }
    });
    FakeServer {
        addr,
        peers,
        _dir: dir,
    }
}

/// HTTP/1.1 with keep-alive, GET only, Content-Length framing.
fn serve(mut s: TcpStream, api: &MetadataApi, inv: &Inventory, peer: IpAddr) {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let head_len = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        assert!(req.parse(&buf[..head_len]).unwrap().is_complete());
        let hdrs: Vec<(&[u8], &[u8])> = req
            .headers
            .iter()
            .map(|h| (h.name.as_bytes(), h.value))
            .collect();
        let close = hdrs.iter().any(|(k, v)| {
            k.eq_ignore_ascii_case(b"connection") && v.eq_ignore_ascii_case(b"close")
        });
        let resp = api.handle(
            inv,
            &ApiRequest {
                method: req.method.unwrap(),
                target: req.path.unwrap().as_bytes(),
                headers: &hdrs,
                body: b"",
                peer,
            },
        );
        let mut out = format!(
            "HTTP/1.1 {} X\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n",
            resp.status,
            resp.content_type,
            resp.body.len()
        )
        .into_bytes();
        out.extend_from_slice(&resp.body);
        if s.write_all(&out).is_err() || close {
            return;
        }
        buf.drain(..head_len);
    }
}

fn inventory() -> Inventory {
    Inventory::from_toml_str(
        &synth_toml(&SynthSpec {
            vms: VMS,
            networks: 4,
            routers: 2,
        })
        .unwrap(),
    )
    .unwrap()
}

fn storm(server: &FakeServer, profile: Profile) -> StormReport {
    let vms = VmSpec::from_inventory(&inventory(), VMS as usize);
    let mut cfg = StormConfig::new(server.addr, vms);
    cfg.profile = profile;
    cfg.ramp = Duration::from_millis(500);
    cfg.workers = NonZeroUsize::new(2).unwrap();
    cfg.timeout = Duration::from_secs(20);
    storm::run(cfg).unwrap()
}

fn assert_clean(r: &StormReport, server: &FakeServer) {
    eprintln!("{r}");
    assert_eq!(r.errors.total(), 0, "{r}");
    assert_eq!(r.errors.wrong_vm, 0);
    assert_eq!(r.vms_completed, u64::from(VMS), "{r}");
    assert!(r.passed, "{r}");
    assert_eq!(r.request_latency_us.count, r.requests);
    assert_eq!(r.vm_complete_us.count, u64::from(VMS));
    // Every VM connected from its own inventory address.
    assert_eq!(server.peers.lock().unwrap().len(), VMS as usize);
}

#[test]
fn storm_openstack_profile_is_clean() {
    let server = start_server(inventory(), 0);
    let r = storm(&server, Profile::Openstack);
    assert_clean(&r, &server);
    assert_eq!(r.requests, 7 * u64::from(VMS));
    assert_eq!(r.connections, r.requests, "a new connection per request");
}

#[test]
fn storm_ec2_profile_is_clean() {
    let server = start_server(inventory(), 0);
    let r = storm(&server, Profile::Ec2);
    assert_clean(&r, &server);
    // Probe + 3 version probes + user-data + crawl.
    assert!(r.requests > 20 * u64::from(VMS), "{r}");
}

#[test]
fn storm_cloud_init_profile_is_clean() {
    let server = start_server(inventory(), 0);
    let r = storm(&server, Profile::CloudInit);
    assert_clean(&r, &server);
    let per_vm = r.requests / u64::from(VMS);
    assert!((25..=40).contains(&per_vm), "{per_vm} requests per VM\n{r}");
    assert_eq!(r.connections, r.requests);
}

#[test]
fn storm_keepalive_profile_is_clean() {
    let server = start_server(inventory(), 0);
    let r = storm(&server, Profile::Keepalive);
    assert_clean(&r, &server);
    assert_eq!(r.requests, 20 * u64::from(VMS));
    assert_eq!(r.connections, u64::from(VMS), "one connection per VM");
}

#[test]
fn storm_catches_a_server_that_answers_for_the_wrong_vm() {
    let server = start_server(inventory(), 1);
    let r = storm(&server, Profile::CloudInit);
    assert!(r.errors.wrong_vm > 0, "{r}");
    assert!(!r.passed);
    assert_eq!(r.vms_completed, 0, "{r}");
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["passed"], false);
    assert!(json["errors"]["wrong_vm"].as_u64().unwrap() > 0);
}

#[test]
fn storm_under_a_connection_cap_waits_instead_of_failing() {
    let server = start_server(inventory(), 0);
    let vms = VmSpec::from_inventory(&inventory(), VMS as usize);
    let mut cfg = StormConfig::new(server.addr, vms);
    cfg.profile = Profile::Openstack;
    cfg.ramp = Duration::from_millis(100);
    cfg.workers = NonZeroUsize::new(2).unwrap();
    cfg.max_connections = Some(4);
    let r = storm::run(cfg).unwrap();
    assert_clean(&r, &server);
    assert_eq!(r.connections_per_loop, 2);
    assert!(r.fd_waits > 0, "{r}");
}

#[test]
fn storm_counts_timeouts_and_refused_connections() {
    // Accepts and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in silent.incoming() {
            held.push(s);
        }
    });
    let vms = VmSpec::from_inventory(&inventory(), 10);
    let mut cfg = StormConfig::new(silent_addr, vms.clone());
    cfg.profile = Profile::Openstack;
    cfg.ramp = Duration::from_millis(50);
    cfg.timeout = Duration::from_millis(200);
    let r = storm::run(cfg).unwrap();
    assert_eq!(r.errors.timeout, 70, "{r}");
    assert_eq!(r.vms_failed, 10);
    assert!(!r.passed);

    // Nobody listens on a port we just released.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut cfg = StormConfig::new(closed, vms);
    cfg.profile = Profile::Openstack;
    cfg.ramp = Duration::from_millis(50);
    let r = storm::run(cfg).unwrap();
    assert_eq!(r.errors.connect, 70, "{r}");
    assert_eq!(r.requests, 0);
    assert!(!r.passed);
}

#[test]
fn storm_arrivals_do_not_wait_for_a_slow_server() {
    // Accepts, notes when each VM first arrived, never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let first_seen = Arc::new(Mutex::new(HashMap::<IpAddr, std::time::Instant>::new()));
    let seen = Arc::clone(&first_seen);
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in silent.incoming().flatten() {
            let peer = s.peer_addr().unwrap().ip();
            seen.lock()
                .unwrap()
                .entry(peer)
                .or_insert_with(std::time::Instant::now);
            held.push(s);
        }
    });
    let vms = VmSpec::from_inventory(&inventory(), 20);
    let mut cfg = StormConfig::new(addr, vms);
    cfg.profile = Profile::Openstack;
    cfg.ramp = Duration::from_millis(200);
    cfg.timeout = Duration::from_millis(500);
    cfg.workers = NonZeroUsize::new(1).unwrap();
    let r = storm::run(cfg).unwrap();
    assert!(!r.passed);
    let seen = first_seen.lock().unwrap();
    assert_eq!(seen.len(), 20, "every VM arrived");
    let first = seen.values().min().unwrap();
    let last = seen.values().max().unwrap();
    // A closed loop would space arrivals by a VM's 7 timeouts (3.5 s); open loop by the ramp.
    assert!(
        last.duration_since(*first) < Duration::from_millis(1000),
        "arrivals spread over {:?}",
        last.duration_since(*first)
    );
}
