//! The differential against the real Nova metadata API (`scripts/peers/`):
//! the peers' settings, signing, the request helper, and the comparison of
//! every path cloud-init and the EC2 crawl request ([`compare_everything`]),
//! shared by `peers_nova_diff.rs` (our API on an inventory) and
//! `peers_nova_source.rs` (our API on Nova's own databases).
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use super::Resp;

/// cloud-init's OpenStack reader picks the newest version it knows (Rocky).
pub const CLOUD_INIT_OS_VERSION: &str = "2018-08-27";
pub const VENDOR_JSON: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/scripts/peers/nova/vendor_data.json"
);
/// Nova (SQLite, one gunicorn worker) can be slow on a busy machine.
pub const NOVA_TIMEOUT: Duration = Duration::from_secs(30);
/// The DNS server `scripts/peers/nova/populate_nova.py` puts in every subnet.
pub const NOVA_DNS: &str = "10.0.0.53";

pub struct Peers {
    pub fixture: Value,
    pub nova: SocketAddr,
    pub secret: String,
    /// Where `scripts/peers/nova.sh` keeps Nova's state (and, on SQLite, its databases).
    pub nova_dir: PathBuf,
    /// nova.conf's `[database] connection` (the cell), an oslo.db URL:
    /// `sqlite:///…/nova.db`, or `mysql+pymysql://…` with `NOVA_DB=mariadb`.
    pub nova_connection: String,
    /// nova.conf's `[api_database] connection`.
    pub nova_api_connection: String,
    /// The Nova venv's python (SQLAlchemy and PyMySQL), for test set-up
    /// writes into Nova's databases whatever their engine.
    pub nova_python: PathBuf,
}

/// `None` (after printing SKIPPED) unless `METAPROXY_PEERS=1`.
pub fn peers(test: &str) -> Option<Peers> {
    if std::env::var("METAPROXY_PEERS").as_deref() != Ok("1") {
        println!("SKIPPED {test}: METAPROXY_PEERS not set (scripts/peers/up.sh, then . /tmp/metaproxy-peers/env)");
        return None;
    }
    let path = std::env::var("METAPROXY_PEERS_FIXTURE")
        .unwrap_or_else(|_| "/tmp/metaproxy-peers/fixture.json".into());
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("METAPROXY_PEERS=1 but the fixture {path} is unreadable: {e}"));
    let fixture: Value = serde_json::from_str(&text).unwrap();
    let url = std::env::var("METAPROXY_PEERS_NOVA_URL")
        .unwrap_or_else(|_| fixture["nova_url"].as_str().unwrap().to_owned());
    let nova = url
        .strip_prefix("http://")
        .unwrap_or(&url)
        .trim_end_matches('/')
        .parse()
        .unwrap_or_else(|e| panic!("nova url {url}: {e}"));
    let secret = std::env::var("METAPROXY_PEERS_SECRET")
        .unwrap_or_else(|_| fixture["shared_secret"].as_str().unwrap().to_owned());
    let nova_dir = std::env::var("METAPROXY_PEERS_NOVA_DIR").map_or_else(
        |_| {
            std::path::Path::new(&path)
                .parent()
                .unwrap_or(std::path::Path::new("/tmp/metaproxy-peers"))
                .join("nova")
        },
        PathBuf::from,
    );
    // Env files of up.sh before NOVA_DB existed name no URLs: SQLite in nova_dir.
    let url = |var: &str, file: &str| {
        std::env::var(var)
            .unwrap_or_else(|_| format!("sqlite:///{}", nova_dir.join(file).display()))
    };
    let nova_connection = url("METAPROXY_PEERS_NOVA_CONNECTION", "nova.db");
    let nova_api_connection = url("METAPROXY_PEERS_NOVA_API_CONNECTION", "nova_api.db");
    let nova_python = std::env::var("METAPROXY_PEERS_NOVA_PYTHON").map_or_else(
        |_| {
            nova_dir
                .parent()
                .unwrap_or(std::path::Path::new("/tmp/metaproxy-peers"))
                .join("nova-venv/bin/python")
        },
        PathBuf::from,
    );
    Some(Peers {
        fixture,
        nova,
        secret,
        nova_dir,
        nova_connection,
        nova_api_connection,
        nova_python,
    })
}

pub fn sign(secret: &str, id: &str) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    m.update(id.as_bytes());
    m.finalize()
        .into_bytes()
        .iter()
        .fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The identity headers Neutron's agent sends.
#[derive(Clone)]
pub struct Who {
    pub instance: String,
    pub tenant: String,
    pub signature: String,
    pub forwarded_for: String,
}

impl Who {
    pub fn headers(&self) -> String {
        format!(
            "X-Forwarded-For: {}\r\nX-Instance-ID: {}\r\nX-Tenant-ID: {}\r\nX-Instance-ID-Signature: {}\r\n",
            self.forwarded_for, self.instance, self.tenant, self.signature
        )
    }
}

pub fn request(to: SocketAddr, method: &str, path: &str, headers: &str) -> Resp {
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{headers}Connection: close\r\n\r\n"
    );
    let t0 = Instant::now();
    loop {
        match super::get(to, &raw) {
            Ok(r) => return r,
            // gunicorn may drop a connection under load; one more try is what
            // a pooling client does too.
            Err(e) if t0.elapsed() < NOVA_TIMEOUT => {
                eprintln!("retrying {method} {path} to {to}: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("{method} {path} to {to}: {e}"),
        }
    }
}

/// `random_seed` is 512 fresh random bytes per response: replace its value.
pub fn mask_seed(body: &[u8]) -> Vec<u8> {
    const KEY: &[u8] = b"\"random_seed\": \"";
    let Some(at) = body.windows(KEY.len()).position(|w| w == KEY) else {
        return body.to_vec();
    };
    let start = at + KEY.len();
    let len = body[start..]
        .iter()
        .position(|&b| b == b'"')
        .expect("unterminated random_seed");
    let mut out = body[..start].to_vec();
    out.extend_from_slice(b"<masked>");
    out.extend_from_slice(&body[start + len..]);
    out
}

/// A `metaproxy api` child, stopped with SIGTERM when dropped.
pub struct Api(pub Child);
impl Drop for Api {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

/// Compares one request on both servers; collects mismatches.
pub struct Diff {
    pub nova: SocketAddr,
    pub ours: SocketAddr,
    pub compared: usize,
    pub mismatches: Vec<String>,
    /// For each mismatch, its (label, "METHOD /path").
    pub at: Vec<(String, String)>,
}

impl Diff {
    /// Send to both; on a 200 compare `Content-Type` and body too. Returns Nova's answer.
    pub fn check(&mut self, method: &str, path: &str, headers: &str, label: &str) -> Resp {
        let n = request(self.nova, method, path, headers);
        let o = request(self.ours, method, path, headers);
        self.compared += 1;
        let what = format!("{label}: {method} {path}");
        let before = self.mismatches.len();
        if n.status != o.status {
            self.mismatches.push(format!(
                "{what}: status nova {} ours {}",
                n.status, o.status
            ));
        } else if n.status == 200 {
            let (nct, oct) = (n.header("Content-Type"), o.header("Content-Type"));
            if nct != oct {
                self.mismatches
                    .push(format!("{what}: Content-Type nova {nct:?} ours {oct:?}"));
            }
            let (nb, ob) = (mask_seed(&n.body), mask_seed(&o.body));
            if nb != ob {
                self.mismatches.push(format!(
                    "{what}: body\n  nova {}\n  ours {}",
                    String::from_utf8_lossy(&nb),
                    String::from_utf8_lossy(&ob)
                ));
            }
        }
        for _ in before..self.mismatches.len() {
            self.at.push((label.to_owned(), format!("{method} {path}")));
        }
        n
    }

    /// Expect both to answer these statuses (a documented difference).
    pub fn expect(&mut self, path: &str, headers: &str, nova: u16, ours: u16) {
        let n = request(self.nova, "GET", path, headers);
        let o = request(self.ours, "GET", path, headers);
        self.compared += 1;
        if (n.status, o.status) != (nova, ours) {
            self.mismatches.push(format!(
                "GET {path}: expected nova {nova} / ours {ours}, got {} / {}",
                n.status, o.status
            ));
            self.at.push((String::new(), format!("GET {path}")));
        }
    }

    /// cloud-init's EC2 crawl, driven by Nova's listings: every line of every
    /// listing is fetched (directories with a trailing `/`, `N=name` as
    /// `N/` and `N/openssh-key`).
    pub fn crawl(&mut self, dir: &str, headers: &str, label: &str, seen: &mut BTreeSet<String>) {
        let listing = self.check("GET", dir, headers, label);
        if listing.status != 200 {
            return;
        }
        for line in listing.text().lines() {
            if let Some(sub) = line.strip_suffix('/') {
                self.crawl(&format!("{dir}{sub}/"), headers, label, seen);
            } else if let Some((idx, _name)) = line.split_once('=') {
                self.crawl(&format!("{dir}{idx}/"), headers, label, seen);
                self.check("GET", &format!("{dir}{idx}/openssh-key"), headers, label);
            } else {
                let path = format!("{dir}{line}");
                self.check("GET", &path, headers, label);
                seen.insert(path);
            }
        }
    }
}

/// The fixture's instances, by name.
pub fn instances(p: &Peers) -> Vec<(String, Value)> {
    p.fixture["instances"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The fixture's feature instances (vm5..vm12: several NICs, every subnet
/// mode, keys, device tags, pinned CPUs, BDMs, ...), by name; none in a
/// fixture written before they existed.
pub fn features(p: &Peers) -> Vec<(String, Value)> {
    p.fixture["features"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

/// The identity the agent sends for this fixture instance.
pub fn who(p: &Peers, vm: &Value) -> Who {
    Who {
        instance: vm["uuid"].as_str().unwrap().to_owned(),
        tenant: vm["project_id"].as_str().unwrap().to_owned(),
        signature: sign(&p.secret, vm["uuid"].as_str().unwrap()),
        forwarded_for: vm["ip_address"].as_str().unwrap().to_owned(),
    }
}

/// Send every request of the differential to Nova and to `ours`.
pub fn compare_everything(p: &Peers, ours: SocketAddr) -> Diff {
    let instances = instances(p);
    assert!(!instances.is_empty(), "fixture has no instances");
    let mut d = Diff {
        nova: p.nova,
        ours,
        compared: 0,
        mismatches: Vec::new(),
        at: Vec::new(),
    };

    // No identity needed.
    for path in ["/", "/foo/../", "//"] {
        d.check("GET", path, "", "anonymous");
    }

    let ec2_leaves = compare_instances(p, &mut d, &instances);
    let unknown = "ffffffff-0000-4000-8000-00000000ffff";
    let stranger = Who {
        instance: unknown.into(),
        tenant: instances[0].1["project_id"].as_str().unwrap().into(),
        signature: sign(&p.secret, unknown),
        forwarded_for: "10.10.0.99".into(),
    };
    d.check(
        "GET",
        "/openstack/latest/meta_data.json",
        &stranger.headers(),
        "unknown instance",
    );

    // The crawl really walked the tree cloud-init reads.
    for leaf in [
        "/2009-04-04/meta-data/instance-id",
        "/latest/meta-data/placement/availability-zone",
        "/latest/meta-data/block-device-mapping/root",
    ] {
        assert!(
            ec2_leaves.contains(leaf),
            "crawl missed {leaf}: {ec2_leaves:?}"
        );
    }
    d
}

/// The feature instances' differential: the paths whose answers depend on
/// what an instance has (the instance-independent ones, identity errors,
/// path normalisation and the crawl at every version, are
/// [`compare_everything`]'s, on the basic instances). For each:
/// `meta_data.json` and `network_data.json` at every OpenStack version Nova
/// lists; what cloud-init and cloudbase-init read at `latest` (`user_data`,
/// `vendor_data*.json`, `password`); the EC2 crawl of `latest/meta-data/`
/// (a superset of cloud-init's `2009-04-04`), `2009-04-04/user-data`, and
/// the `meta-data/` listing at every EC2 version.
pub fn compare_features(p: &Peers, ours: SocketAddr, features: &[(String, Value)]) -> Diff {
    let mut d = Diff {
        nova: p.nova,
        ours,
        compared: 0,
        mismatches: Vec::new(),
        at: Vec::new(),
    };
    let ec2_versions = request(p.nova, "GET", "/", "").text();
    for (name, vm) in features {
        let h = who(p, vm).headers();
        let versions = request(p.nova, "GET", "/openstack", &h).text();
        for v in versions.lines() {
            for file in ["meta_data.json", "network_data.json"] {
                d.check("GET", &format!("/openstack/{v}/{file}"), &h, name);
            }
        }
        for file in [
            "user_data",
            "vendor_data.json",
            "vendor_data2.json",
            "password",
        ] {
            d.check("GET", &format!("/openstack/latest/{file}"), &h, name);
        }
        d.check("GET", "/2009-04-04/user-data", &h, name);
        d.crawl("/latest/meta-data/", &h, name, &mut BTreeSet::new());
        for v in ec2_versions.lines() {
            d.check("GET", &format!("/{v}/meta-data/"), &h, name);
        }
    }
    d
}

/// The per-instance part of the differential; returns the EC2 leaves crawled.
fn compare_instances(p: &Peers, d: &mut Diff, instances: &[(String, Value)]) -> BTreeSet<String> {
    let who = |vm: &Value| who(p, vm);
    let mut ec2_leaves = BTreeSet::new();
    for (name, vm) in instances {
        let h = who(vm).headers();
        let h = h.as_str();
        let label = name.as_str();
        // Version lists and the OpenStack reader's probe.
        for path in [
            "/ec2",
            "/ec2/",
            "/openstack",
            "/openstack/",
            "/latest",
            "/2009-04-04",
            "/2009-04-04/",
            "/latest/",
        ] {
            d.check("GET", path, h, label);
        }
        // cloud-init's OpenStack reader, at the version it picks and at latest.
        for v in [CLOUD_INIT_OS_VERSION, "latest"] {
            d.check("GET", &format!("/openstack/{v}"), h, label);
            d.check("GET", &format!("/openstack/{v}/"), h, label);
            for file in [
                "meta_data.json",
                "user_data",
                "vendor_data.json",
                "vendor_data2.json",
                "network_data.json",
                "password",
            ] {
                d.check("GET", &format!("/openstack/{v}/{file}"), h, label);
            }
        }
        // Every OpenStack version's meta_data.json (version-gated keys).
        let versions = request(p.nova, "GET", "/openstack", h).text();
        for v in versions.lines() {
            d.check("GET", &format!("/openstack/{v}/meta_data.json"), h, label);
            d.check("GET", &format!("/openstack/{v}"), h, label);
        }
        // cloud-init's EC2 version probe, then its crawl.
        for v in ["2021-03-23", "2018-09-24", "2016-09-02"] {
            d.check("GET", &format!("/{v}/meta-data/instance-id"), h, label);
        }
        for v in ["2009-04-04", "latest"] {
            d.check("GET", &format!("/{v}/user-data"), h, label);
            let mut seen = BTreeSet::new();
            d.crawl(&format!("/{v}/meta-data/"), h, label, &mut seen);
            d.check("GET", &format!("/{v}/meta-data"), h, label);
            ec2_leaves.extend(seen);
        }
        // Every EC2 version's listing (version-gated keys).
        for v in request(p.nova, "GET", "/", "").text().lines() {
            d.check("GET", &format!("/{v}/meta-data/"), h, label);
        }
        // Path normalisation, HEAD, and unknown paths.
        for path in [
            "/openstack//latest/meta_data.json",
            "/openstack/latest/../latest/network_data.json",
            "/ec2/latest/meta-data/hostname",
            "/ec2/2009-04-04/meta-data/",
            "/latest//meta-data//placement//",
            "/latest/meta-data/public-keys/0/openssh-key/",
            "/openstack/content",
            "/openstack/2099-01-01/meta_data.json",
            "/openstack/latest/nope",
            "/latest/meta-data/nope",
            "/latest/api/token",
            "/2016-09-02/meta-data/",
            "/nope",
        ] {
            d.check("GET", path, h, label);
        }
        for path in [
            "/openstack/latest/meta_data.json",
            "/latest/meta-data/",
            "/openstack/latest/password",
        ] {
            d.check("HEAD", path, h, label);
        }
        // Nova's uncaught TypeError one segment below a leaf; two segments is 404 on both.
        d.expect("/latest/meta-data/hostname/x", h, 500, 404);
        d.check("GET", "/latest/meta-data/hostname/x/y", h, label);

        // Identity errors.
        let w = who(vm);
        let bad_sig = Who {
            signature: sign("not-the-secret", &w.instance),
            ..w.clone()
        };
        d.check(
            "GET",
            "/openstack/latest/meta_data.json",
            &bad_sig.headers(),
            label,
        );
        let upper = Who {
            signature: w.signature.to_uppercase(),
            ..w.clone()
        };
        d.check(
            "GET",
            "/openstack/latest/meta_data.json",
            &upper.headers(),
            label,
        );
        let other_tenant = Who {
            tenant: "ffffffffffffffffffffffffffffffff".into(),
            ..w.clone()
        };
        d.check(
            "GET",
            "/openstack/latest/meta_data.json",
            &other_tenant.headers(),
            label,
        );
        let no_sig = format!(
            "X-Instance-ID: {}\r\nX-Tenant-ID: {}\r\n",
            w.instance, w.tenant
        );
        d.check("GET", "/openstack/latest/meta_data.json", &no_sig, label);
        let no_tenant = format!(
            "X-Instance-ID: {}\r\nX-Instance-ID-Signature: {}\r\n",
            w.instance, w.signature
        );
        d.check("GET", "/openstack/latest/meta_data.json", &no_tenant, label);
        d.check("GET", "/openstack/latest/meta_data.json", "", label);
    }
    ec2_leaves
}

/// Fail with every mismatch, or print how many requests agreed.
pub fn assert_same(test: &str, p: &Peers, d: &Diff) {
    println!(
        "{test}: {} requests compared against {}",
        d.compared, p.nova
    );
    assert!(
        d.mismatches.is_empty(),
        "{} of {} differ from Nova:\n{}",
        d.mismatches.len(),
        d.compared,
        d.mismatches.join("\n")
    );
}

/// One fixture instance as the whole-path tests (`peers_chain.rs`,
/// `peers_nova_source.rs`) need it: what `populate_nova.py` wrote into
/// Nova's rows for it, and where it sits in Neutron.
pub struct PeerVm {
    pub name: &'static str,
    /// The VM's network namespace in the test.
    pub ns: String,
    pub ip: String,
    pub uuid: String,
    pub hostname: String,
    pub key: Option<(String, String)>,
    pub user_data: Option<String>,
    pub router_id: String,
    pub network_id: String,
}

pub fn peer_vm(fx: &Value, name: &'static str, ns: String) -> PeerVm {
    let i = &fx["instances"][name];
    let s = |v: &Value| {
        v.as_str()
            .unwrap_or_else(|| panic!("fixture {name}: {v}"))
            .to_string()
    };
    let nova = &i["nova"];
    PeerVm {
        name,
        ns,
        ip: s(&i["ip_address"]),
        uuid: s(&i["uuid"]),
        hostname: s(&nova["hostname"]),
        key: nova["key_name"]
            .as_str()
            .map(|k| (k.to_string(), s(&nova["public_key"]))),
        user_data: nova["user_data"].as_str().map(str::to_string),
        router_id: s(&i["router_id"]),
        network_id: s(&i["network_id"]),
    }
}

/// What cloud-init's readers got (`netns::cloud_init_read`) is `vm`'s own
/// data, as in Nova's rows, and names no other VM of `all`.
pub fn check_own_data(got: &Value, vm: &PeerVm, all: &[PeerVm]) {
    let os = &got["openstack"]["metadata"];
    assert_eq!(os["uuid"], vm.uuid.as_str(), "{}: {got:#}", vm.name);
    let host = os["hostname"].as_str().unwrap_or_default();
    assert!(
        host.split('.').next() == Some(vm.hostname.as_str()),
        "{}: hostname {host}",
        vm.name
    );
    assert_eq!(
        got["ec2"]["local-ipv4"],
        vm.ip.as_str(),
        "{}: {got:#}",
        vm.name
    );
    assert_eq!(
        got["ec2"]["instance-id"]
            .as_str()
            .map(|s| s.starts_with("i-")),
        Some(true),
        "{}: {got:#}",
        vm.name
    );
    match &vm.key {
        Some((name, data)) => {
            assert_eq!(
                os["public_keys"][name],
                data.as_str(),
                "{}: {got:#}",
                vm.name
            );
            assert!(got["ec2"]["public-keys"][name]
                .to_string()
                .contains(data.as_str()));
        }
        None => assert!(os
            .get("public_keys")
            .is_none_or(|k| k.as_object().is_none_or(|o| o.is_empty()))),
    }
    let ud = got["openstack"]["userdata"].as_str().unwrap_or_default();
    assert_eq!(
        ud,
        vm.user_data.as_deref().unwrap_or_default(),
        "{}: user-data",
        vm.name
    );
    let nets = &got["openstack"]["networkdata"]["networks"];
    assert!(
        nets.as_array()
            .is_some_and(|n| n.iter().any(|n| n["network_id"] == vm.network_id.as_str())),
        "{}: network_data.json without {}: {got:#}",
        vm.name,
        vm.network_id
    );
    let text = got.to_string();
    for other in all.iter().filter(|o| o.uuid != vm.uuid) {
        assert!(
            !text.contains(&other.uuid),
            "{} saw {}: {got:#}",
            vm.name,
            other.name
        );
    }
}

/// Another real nova-api-metadata on the peers' databases
/// (`scripts/peers/nova-extra.sh`), which a test may stop and start again;
/// stopped (by its PID) when dropped.
pub struct NovaExtra {
    name: String,
    peers_dir: PathBuf,
    pub addr: SocketAddr,
}

fn nova_extra(peers_dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    let out = std::process::Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/peers/nova-extra.sh"
    ))
    .args(args)
    .env("PEERS_DIR", peers_dir)
    .stderr(std::process::Stdio::inherit())
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "nova-extra.sh {args:?}: {}",
        out.status
    );
    out
}

impl NovaExtra {
    /// `cache`: `metadata_cache_expiration` in seconds, or `"default"` (15 s).
    pub fn start(p: &Peers, name: &str, workers: u32, cache: &str) -> NovaExtra {
        let peers_dir = p
            .nova_dir
            .parent()
            .unwrap_or(std::path::Path::new("/tmp/metaproxy-peers"))
            .to_owned();
        let port = super::free_port();
        nova_extra(
            &peers_dir,
            &[
                "start",
                name,
                &port.to_string(),
                &workers.to_string(),
                cache,
            ],
        );
        NovaExtra {
            name: name.to_owned(),
            peers_dir,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }
}

impl Drop for NovaExtra {
    fn drop(&mut self) {
        nova_extra(&self.peers_dir, &["stop", &self.name]);
    }
}

/// `scripts/peers/nova/sysmeta.py`: Nova's password rows, read and reset
/// directly in its cell database (SQLite or MariaDB), one long-lived
/// process for many rounds.
pub struct SysMeta {
    child: Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl SysMeta {
    pub fn open(p: &Peers) -> SysMeta {
        let mut child = std::process::Command::new(&p.nova_python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/scripts/peers/nova/sysmeta.py"
            ))
            .arg(&p.nova_connection)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        SysMeta { child, out }
    }

    fn call(&mut self, cmd: &str, uuid: &str) -> Value {
        use std::io::{BufRead, Write};
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{cmd} {uuid}").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("sysmeta.py {cmd}: {e}: {line:?}"))
    }

    /// The instance's non-deleted `password_*` rows, (key, value), by key.
    pub fn rows(&mut self, uuid: &str) -> Vec<(String, String)> {
        serde_json::from_value(self.call("rows", uuid)).unwrap()
    }

    /// Two rows per chunk key, `older-N` then `newer-N` (what a Nova POST
    /// racing another writer leaves).
    pub fn twice(&mut self, uuid: &str) {
        assert_eq!(self.call("twice", uuid), "ok");
    }

    /// Blank the chunks (`nova clear-password`), or delete the rows.
    pub fn reset(&mut self, uuid: &str, delete: bool) {
        let r = self.call(if delete { "delete" } else { "blank" }, uuid);
        assert_eq!(r, "ok");
    }
}

impl Drop for SysMeta {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}
