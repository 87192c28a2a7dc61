//! DynamicJSON vendor data (Nova's `vendordata_providers = DynamicJSON`):
//! the API POSTs Nova's body to each `name@url` target and serves the
//! answers under their names in `vendor_data2.json`.
//!
//! The targets are a fake HTTP server in this test (port 0) that records
//! every request and answers by path: JSON naming the instance it was
//! asked about, a 500, HTML, an oversize body, a chunked body, a slow
//! answer. Both sources are covered: the inventory (the binary, whose log
//! is read) and Nova's database (SQLite with the columns we read).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{get, Resp};
use metaproxy::api::config::ApiConfig;

const SECRET: &str = "vd-secret";
const VM_A: &str = "aaaaaaaa-0000-4000-8000-000000000001";
const VM_B: &str = "aaaaaaaa-0000-4000-8000-000000000002";
const PROJECT: &str = "aaaaaaaa000040008000000000000000";
const IMAGE: &str = "11111111-2222-4333-8444-555555555555";

/// What Nova's `DynamicVendorData._do_request` POSTs for VM_A: its
/// `jsonutils.dumps`, checked with Nova 34's own code (`body` dict in
/// Nova's order, `user-data` the base64 text, `metadata` the instance's).
const BODY_A: &str = "{\"project-id\": \"aaaaaaaa000040008000000000000000\", \
\"instance-id\": \"aaaaaaaa-0000-4000-8000-000000000001\", \
\"image-id\": \"11111111-2222-4333-8444-555555555555\", \
\"user-data\": \"I2Nsb3VkLWNvbmZpZwo=\", \"hostname\": \"vm-a\", \
\"metadata\": {\"a\": \"caf\\u00e9\", \"b\": \"2\"}, \"boot-roles\": \"member,reader\"}";
/// VM_B: no user data (`null`), no image (volume-backed: `""`), no metadata.
const BODY_B: &str = "{\"project-id\": \"aaaaaaaa000040008000000000000000\", \
\"instance-id\": \"aaaaaaaa-0000-4000-8000-000000000002\", \"image-id\": \"\", \
\"user-data\": null, \"hostname\": \"vm-b\", \"metadata\": {}, \"boot-roles\": \"\"}";

/// One request the fake target received.
#[derive(Clone, Debug)]
struct Seen {
    request_line: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A fake vendordata service on 127.0.0.1:0.
struct Target {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

/// Tokens the fake Keystone (`POST /v3/auth/tokens` on the same server)
/// has issued: `tok-1`, `tok-2`, …
static TOKENS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Target {
    fn start() -> Target {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { return };
                let s = s.clone();
                std::thread::spawn(move || serve(c, &s));
            }
        });
        Target { addr, seen }
    }

    /// The same, over TLS with `server`'s certificate.
    fn start_tls(server: Arc<rustls::ServerConfig>) -> Target {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { return };
                let (s, server) = (s.clone(), server.clone());
                std::thread::spawn(move || {
                    let Ok(tls) = rustls::ServerConnection::new(server) else {
                        return;
                    };
                    serve(rustls::StreamOwned::new(tls, c), &s);
                });
            }
        });
        Target { addr, seen }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Requests for `path` so far.
    fn to(&self, path: &str) -> Vec<Seen> {
        let line = format!("POST {path} HTTP/1.1");
        self.seen()
            .into_iter()
            .filter(|s| s.request_line == line)
            .collect()
    }
}

fn serve(mut c: impl Read + Write, seen: &Mutex<Vec<Seen>>) {
    let mut r = BufReader::new(&mut c);
    let mut request_line = String::new();
    if r.read_line(&mut request_line).unwrap_or(0) == 0 {
        return;
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':').unwrap();
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, v)| v.parse().unwrap());
    let mut body = vec![0; len];
    r.read_exact(&mut body).unwrap();
    drop(r);
    let body = String::from_utf8(body).unwrap();
    let path = request_line
        .split(' ')
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    seen.lock().unwrap().push(Seen {
        request_line: request_line.trim_end().to_owned(),
        headers,
        body: body.clone(),
    });
    let instance = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["instance-id"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let ok = |b: &str| {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )
    };
    let answer = match path.as_str() {
        // Key order as sent (zeta first), kept as Nova keeps it.
        "/ok" => ok(&format!(
            r#"{{"zeta": 1, "for": "{instance}", "list": [true, null, "x\u00e9"]}}"#
        )),
        "/empty" => ok(""),
        "/chunked" => {
            let b = format!(r#"{{"chunked": "{instance}"}}"#);
            format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                b.len()
            )
        }
        "/v3/auth/tokens" => {
            let n = TOKENS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            let b = r#"{"token": {"expires_at": "2099-01-01T00:00:00.000000Z"}}"#;
            format!(
                "HTTP/1.1 201 Created\r\nX-Subject-Token: tok-{n}\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            )
        }
        // Accepts only the second token Keystone issued: the first is
        // refused with a 401, as after a revocation.
        "/needs-token" => {
            let tok = seen
                .lock()
                .unwrap()
                .last()
                .and_then(|s| s.header("X-Auth-Token").map(str::to_owned));
            if tok.as_deref() == Some("tok-2") {
                ok(&format!(r#"{{"authorized": "{instance}"}}"#))
            } else {
                "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n".into()
            }
        }
        "/500" => "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\n\r\noops!".into(),
        "/html" => {
            "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 6\r\n\r\n<html>".into()
        }
        "/big" => {
            // A valid JSON string of 2 MiB: refused for its size alone.
            let b = format!("\"{}\"", "x".repeat(2 * 1024 * 1024));
            ok(&b)
        }
        "/slow" => {
            // The target being slow is the behaviour under test: it answers
            // after the API's 1 s read timeout.
            std::thread::sleep(Duration::from_secs(3));
            ok("{\"late\": true}")
        }
        _ => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".into(),
    };
    let _ = c.write_all(answer.as_bytes());
    let _ = c.flush();
}

fn write_inventory(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("inventory.toml");
    std::fs::write(
        &p,
        format!(
            r##"
dhcp_domain = "novalocal"

[[network]]
id = "aaaaaaaa-0000-4000-8000-00000000a001"
name = "net"
project = "{PROJECT}"

[[network.subnet]]
id = "aaaaaaaa-0000-4000-8000-00000000b001"
cidr = "10.9.0.0/24"
gateway = "10.9.0.1"

[[instance]]
uuid = "{VM_A}"
hostname = "vm-a"
project = "{PROJECT}"
ec2_id = 1
image_ref = "{IMAGE}"
boot_roles = "member,reader"
user_data = "#cloud-config\n"
meta = {{ b = "2", a = "café" }}

[[instance.port]]
id = "aaaaaaaa-0000-4000-8000-00000000e001"
network = "aaaaaaaa-0000-4000-8000-00000000a001"
mac = "fa:16:3e:00:00:01"
fixed_ips = ["10.9.0.5"]

[[instance]]
uuid = "{VM_B}"
hostname = "vm-b"
project = "{PROJECT}"
ec2_id = 2

[[instance.port]]
id = "aaaaaaaa-0000-4000-8000-00000000e002"
network = "aaaaaaaa-0000-4000-8000-00000000a001"
mac = "fa:16:3e:00:00:02"
fixed_ips = ["10.9.0.6"]
"##
        ),
    )
    .unwrap();
    p
}

fn signed(path: &str, instance: &str, tenant: &str) -> String {
    let sig = metaproxy::sign::sign_instance_id(SECRET.as_bytes(), instance);
    format!(
        "GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nX-Forwarded-For: 10.9.0.5\r\n\
         X-Instance-ID: {instance}\r\nX-Instance-ID-Signature: {sig}\r\nX-Tenant-ID: {tenant}\r\n\
         Connection: close\r\n\r\n"
    )
}

fn ask(addr: SocketAddr, path: &str, instance: &str) -> Resp {
    get(addr, &signed(path, instance, PROJECT)).unwrap()
}

/// `metaproxy api` as a child on port 0, its stderr collected.
struct Api {
    child: std::process::Child,
    log: Arc<Mutex<Vec<String>>>,
    addr: SocketAddr,
}

impl Api {
    fn start(cfg: &Path) -> Api {
        let mut child = Command::new(env!("CARGO_BIN_EXE_metaproxy"))
            .args(["api", "--config"])
            .arg(cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                l.lock().unwrap().push(line);
            }
        });
        let mut addr = None;
        common::wait_until("the API's listener", Duration::from_secs(30), || {
            addr = log
                .lock()
                .unwrap()
                .iter()
                .find_map(|l| common::bound_addr(l));
            if let Ok(Some(st)) = child.try_wait() {
                std::thread::sleep(Duration::from_millis(100)); // the last log lines
                panic!(
                    "metaproxy api exited ({st}): {}",
                    log.lock().unwrap().join("\n")
                );
            }
            addr.is_some()
        });
        Api {
            child,
            log,
            addr: addr.unwrap(),
        }
    }

    fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let inv = write_inventory(dir);
    let stat = dir.join("static.json");
    std::fs::write(&stat, r#"{"from": "file"}"#).unwrap();
    let p = dir.join("api.toml");
    std::fs::write(
        &p,
        format!(
            "[api]\nlisten = \"127.0.0.1:0\"\nmetadata_proxy_shared_secret = \"{SECRET}\"\n\
             inventory = {:?}\nstate_dir = {:?}\nvendor_data_json = {:?}\n{extra}",
            inv.display().to_string(),
            dir.join("state").display().to_string(),
            stat.display().to_string(),
        ),
    )
    .unwrap();
    p
}

#[test]
fn targets_get_novas_post_and_their_answers_go_under_their_names() {
    let t = Target::start();
    let dir = tempfile::tempdir().unwrap();
    // nova.conf's comma-separated list form, pasted; one target has
    // credentials in its URL, which must not reach the log.
    let cfg = write_config(
        dir.path(),
        &format!(
            "vendordata_providers = \"StaticJSON,DynamicJSON\"\n\
             vendordata_dynamic_targets = [\"first@{}\", \"empty@{}\", \"chunked@{}\", \
             \"failing@{}\", \"html@{}\", \"big@{}\", \"down@http://127.0.0.1:9/\", \
             \"withpw@http://vd:hunter2@{}/500\"]\n",
            t.url("/ok"),
            t.url("/empty"),
            t.url("/chunked"),
            t.url("/500"),
            t.url("/html"),
            t.url("/big"),
            t.addr,
        ),
    );
    let api = Api::start(&cfg);

    let r = ask(api.addr, "/openstack/latest/vendor_data2.json", VM_A);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    // Nova's rendering: providers in order, each target under its name in
    // target order, its answer in its own key order; every failure is {}.
    assert_eq!(
        r.text(),
        format!(
            "{{\"static\": {{\"from\": \"file\"}}, \
             \"first\": {{\"zeta\": 1, \"for\": \"{VM_A}\", \"list\": [true, null, \"x\\u00e9\"]}}, \
             \"empty\": {{}}, \"chunked\": {{\"chunked\": \"{VM_A}\"}}, \"failing\": {{}}, \
             \"html\": {{}}, \"big\": {{}}, \"down\": {{}}, \"withpw\": {{}}}}"
        )
    );

    // The request Nova sends, to every target.
    let first = t.to("/ok");
    assert_eq!(first.len(), 1, "{first:?}");
    let s = &first[0];
    assert_eq!(s.body, BODY_A);
    assert_eq!(s.header("Content-Type"), Some("application/json"));
    assert_eq!(s.header("Accept"), Some("application/json"));
    assert_eq!(s.header("User-Agent"), Some("openstack-nova-vendordata"));
    assert_eq!(s.header("Content-Length"), Some(&*BODY_A.len().to_string()));
    assert_eq!(s.header("X-Auth-Token"), None);
    // python-requests sends URL credentials as Basic auth.
    let pw = t.to("/500");
    let basic = pw
        .iter()
        .find_map(|s| s.header("Authorization"))
        .expect("the credentials of withpw's URL");
    assert_eq!(basic, "Basic dmQ6aHVudGVyMg==");
    assert_eq!(t.to("/500").len(), 2, "failing and withpw");

    // Each failure is logged naming the target and the instance; the
    // URL's password never.
    common::wait_until("the failures are logged", Duration::from_secs(5), || {
        let log = api.log_text();
        ["failing", "html", "big", "down", "withpw"]
            .iter()
            .all(|n| log.contains(&format!("dynamic vendordata target {n:?}")))
    });
    let log = api.log_text();
    assert!(!log.contains("hunter2"), "{log}");
    assert!(
        log.contains(&format!(
            "target \"failing\" at {} for instance {VM_A}: answered HTTP 500",
            t.url("/500")
        )),
        "{log}"
    );
    assert!(
        log.contains("target \"html\"") && log.contains("not JSON"),
        "{log}"
    );

    // The other instance gets its own answers (no cross-instance cache);
    // and each vendor_data2.json is asked again, as in Nova.
    let r = ask(api.addr, "/openstack/2016-10-06/vendor_data2.json", VM_B);
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["first"]["for"], VM_B);
    assert_eq!(v["chunked"]["chunked"], VM_B);
    let first = t.to("/ok");
    assert_eq!(first.len(), 2, "{first:?}");
    assert_eq!(first[1].body, BODY_B);
    let r = ask(api.addr, "/openstack/latest/vendor_data2.json", VM_A);
    assert_eq!(r.status, 200);
    assert_eq!(t.to("/ok").len(), 3, "asked again: Nova keeps no answer");

    // Versions without vendor_data2.json, other paths, and requests that
    // fail the identity checks make no POST.
    let before = t.seen().len();
    let r = ask(api.addr, "/openstack/2016-06-30/vendor_data2.json", VM_A);
    assert_eq!(r.status, 404);
    let r = ask(api.addr, "/openstack/latest/vendor_data.json", VM_A);
    assert_eq!((r.status, r.text().as_str()), (200, "{\"from\": \"file\"}"));
    assert_eq!(
        ask(api.addr, "/openstack/latest/meta_data.json", VM_A).status,
        200
    );
    let r = get(
        api.addr,
        &signed("/openstack/latest/vendor_data2.json", VM_A, "someone-else"),
    )
    .unwrap();
    assert_eq!(r.status, 404, "another project's instance");
    let forged = signed("/openstack/latest/vendor_data2.json", VM_A, PROJECT).replace(
        &metaproxy::sign::sign_instance_id(SECRET.as_bytes(), VM_A),
        &metaproxy::sign::sign_instance_id(b"wrong", VM_A),
    );
    assert_eq!(get(api.addr, &forged).unwrap().status, 403);
    assert_eq!(t.seen().len(), before, "{:?}", &t.seen()[before..]);
}

#[test]
fn failure_fatal_is_a_500_and_a_slow_target_is_empty() {
    let t = Target::start();
    let dir = tempfile::tempdir().unwrap();
    let fatal = write_config(
        dir.path(),
        &format!(
            "vendordata_providers = [\"DynamicJSON\"]\n\
             vendordata_dynamic_targets = [\"good@{}\", \"bad@{}\"]\n\
             vendordata_dynamic_failure_fatal = true\n",
            t.url("/ok"),
            t.url("/500")
        ),
    );
    let api = Api::start(&fatal);
    let r = ask(api.addr, "/openstack/latest/vendor_data2.json", VM_A);
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(!r.text().contains(VM_A), "{}", r.text());
    // Without StaticJSON there is no vendor_data.json (Nova: 404).
    let r = ask(api.addr, "/openstack/latest/vendor_data.json", VM_A);
    assert_eq!(r.status, 404, "{}", r.text());
    drop(api);

    let dir = tempfile::tempdir().unwrap();
    let slow = write_config(
        dir.path(),
        &format!(
            "vendordata_providers = [\"DynamicJSON\"]\n\
             vendordata_dynamic_targets = [\"slow@{}\", \"good@{}\"]\n\
             vendordata_dynamic_read_timeout = 1\n",
            t.url("/slow"),
            t.url("/ok")
        ),
    );
    let api = Api::start(&slow);
    let r = ask(api.addr, "/openstack/latest/vendor_data2.json", VM_B);
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["slow"], serde_json::json!({}), "{v}");
    assert_eq!(v["good"]["for"], VM_B, "{v}");
    assert!(v.get("static").is_none(), "{v}");
    common::wait_until("the timeout is logged", Duration::from_secs(5), || {
        api.log_text()
            .contains("target \"slow\" at http://127.0.0.1")
            && api.log_text().contains("no complete answer within 1s")
    });
}

#[test]
fn a_keystone_token_is_sent_and_renewed_on_a_401() {
    let t = Target::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "vendordata_providers = [\"DynamicJSON\"]\n\
             vendordata_dynamic_targets = [\"auth@{}\"]\n\
             [api.vendordata_dynamic_auth]\nauth_type = \"password\"\n\
             auth_url = \"{}\"\nusername = \"nova\"\npassword = \"ks-secret-pw\"\n\
             project_name = \"service\"\n",
            t.url("/needs-token"),
            t.url("/v3"),
        ),
    );
    let api = Api::start(&cfg);
    let r = ask(api.addr, "/openstack/latest/vendor_data2.json", VM_A);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.text(),
        format!("{{\"auth\": {{\"authorized\": \"{VM_A}\"}}}}")
    );
    let posts = t.to("/needs-token");
    let tokens: Vec<_> = posts.iter().map(|s| s.header("X-Auth-Token")).collect();
    assert_eq!(
        tokens,
        [Some("tok-1"), Some("tok-2")],
        "a 401 gets a new token, once"
    );
    let ks = t.to("/v3/auth/tokens");
    assert_eq!(ks.len(), 2);
    let auth: serde_json::Value = serde_json::from_str(&ks[0].body).unwrap();
    let user = &auth["auth"]["identity"]["password"]["user"];
    assert_eq!(
        (user["name"].as_str(), user["password"].as_str()),
        (Some("nova"), Some("ks-secret-pw"))
    );
    assert_eq!(auth["auth"]["scope"]["project"]["name"], "service");
    // The token is kept: the next request asks Keystone nothing.
    let r = ask(api.addr, "/openstack/latest/vendor_data2.json", VM_B);
    assert!(r.text().contains(VM_B), "{}", r.text());
    assert_eq!(t.to("/v3/auth/tokens").len(), 2);
    assert!(
        !api.log_text().contains("ks-secret-pw"),
        "{}",
        api.log_text()
    );
}

/// A CA (its PEM written to `dir/ca.pem`) and a server config for
/// 127.0.0.1 signed by it.
fn pki(dir: &Path) -> (std::path::PathBuf, Arc<rustls::ServerConfig>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let ca_pem = dir.join("ca.pem");
    std::fs::write(&ca_pem, ca.pem()).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    (ca_pem, Arc::new(server))
}

#[test]
fn https_targets_are_verified_against_the_ssl_certfile() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, server) = pki(dir.path());
    let t = Target::start_tls(server);
    let https = format!("https://{}/ok", t.addr);
    let trusting = write_config(
        dir.path(),
        &format!(
            "vendordata_providers = [\"DynamicJSON\"]\n\
             vendordata_dynamic_targets = [\"tls@{https}\"]\n\
             vendordata_dynamic_ssl_certfile = {:?}\n",
            ca.display().to_string()
        ),
    );
    let api = Api::start(&trusting);
    let r = ask(api.addr, "/openstack/latest/vendor_data2.json", VM_A);
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["tls"]["for"], VM_A, "{v}");
    assert_eq!(t.to("/ok")[0].body, BODY_A);
    drop(api);
    // Without the bundle the self-made CA is not trusted: {} and a log line.
    let other = tempfile::tempdir().unwrap();
    let untrusting = write_config(
        other.path(),
        &format!(
            "vendordata_providers = [\"DynamicJSON\"]\n\
             vendordata_dynamic_targets = [\"tls@{https}\"]\n"
        ),
    );
    let api = Api::start(&untrusting);
    let r = ask(api.addr, "/openstack/latest/vendor_data2.json", VM_A);
    assert_eq!((r.status, r.text().as_str()), (200, "{\"tls\": {}}"));
    common::wait_until("the TLS failure is logged", Duration::from_secs(5), || {
        let log = api.log_text();
        log.contains("target \"tls\"") && log.contains("TLS")
    });
    assert_eq!(
        t.to("/ok").len(),
        1,
        "nothing was sent to an unverified target"
    );
}

fn config_error(extra: &str) -> String {
    let text = format!("[api]\ninventory = \"i.toml\"\n{extra}");
    let f = metaproxy::config::parse_str(&text, Path::new("t.toml")).unwrap();
    ApiConfig::from_table(f.api.as_ref().unwrap())
        .unwrap_err()
        .to_string()
}

#[test]
fn bad_vendordata_config_is_refused_naming_the_key() {
    for (extra, key, why) in [
        (
            "vendordata_providers = [\"StaticJSON\", \"Dynamic\"]",
            "api.vendordata_providers[1]",
            "Dynamic",
        ),
        (
            "vendordata_dynamic_targets = [\"a@http://127.0.0.1:1/\", \"http://127.0.0.1:2/\"]",
            "api.vendordata_dynamic_targets[1]",
            "name@url",
        ),
        (
            "vendordata_dynamic_targets = [\"a@http://127.0.0.1:1/\", \"a@http://127.0.0.1:2/\"]",
            "api.vendordata_dynamic_targets[1]",
            "twice",
        ),
        (
            "vendordata_dynamic_targets = [\"static@http://127.0.0.1:1/\"]",
            "api.vendordata_dynamic_targets[0]",
            "StaticJSON",
        ),
        (
            "vendordata_dynamic_targets = [\"a@gopher://127.0.0.1:1/\"]",
            "api.vendordata_dynamic_targets[0]",
            "http",
        ),
        (
            "vendordata_dynamic_connect_timeout = 2",
            "api.vendordata_dynamic_connect_timeout",
            "at least 3",
        ),
        (
            "vendordata_dynamic_targets = [\"a@https://127.0.0.1:1/\"]\n\
             vendordata_dynamic_ssl_certfile = \"/nonexistent/ca.pem\"",
            "api.vendordata_dynamic_ssl_certfile",
            "/nonexistent/ca.pem",
        ),
        (
            "[api.vendordata_dynamic_auth]\nauth_type = \"token\"",
            "api.vendordata_dynamic_auth.auth_type",
            "not supported",
        ),
        (
            "[api.vendordata_dynamic_auth]\nauth_type = \"password\"\nauth_url = \"http://127.0.0.1:1/v3\"",
            "api.vendordata_dynamic_auth.username",
            "required",
        ),
        (
            "[api.vendordata_dynamic_auth]\nauth_type = \"password\"",
            "api.vendordata_dynamic_auth.auth_url",
            "required",
        ),
        (
            "[api.vendordata_dynamic_auth]\nauth_url = \"http://127.0.0.1:1/v3\"",
            "api.vendordata_dynamic_auth.auth_type",
            "required",
        ),
    ] {
        let e = config_error(extra);
        assert!(e.contains(key), "{extra}: {e}");
        assert!(e.contains(why), "{extra}: {e}");
    }
    // A password in a bad target's URL is not repeated in the error.
    let e = config_error("vendordata_dynamic_targets = [\"http://u:hunter2@127.0.0.1/\"]");
    assert!(!e.contains("hunter2"), "{e}");
    // And the binary refuses to start with one, naming the key.
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "vendordata_providers = \"StaticJSON,Nope\"\n");
    let out = Command::new(env!("CARGO_BIN_EXE_metaproxy"))
        .args(["api", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("api.vendordata_providers[1]"), "{err}");
}

#[cfg(feature = "nova-db")]
const FLAVOR: &str = r#"{"cur": {"nova_object.name": "Flavor", "nova_object.namespace": "nova", "nova_object.version": "1.2", "nova_object.data": {"name": "m1.small"}}, "old": null, "new": null}"#;

/// A Nova 34 cell database (SQLite, the columns we read) holding VM_A as
/// Nova stores it: user data as base64 text, metadata and `boot_roles`
/// rows, its image.
#[cfg(feature = "nova-db")]
fn make_nova_db(path: &Path) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true);
        let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
        for sql in [
            "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)".to_owned(),
            "INSERT INTO alembic_version VALUES ('ab450ba04102')".to_owned(),
            "CREATE TABLE instances (id INTEGER PRIMARY KEY AUTOINCREMENT, uuid VARCHAR(36), deleted INTEGER, \
             project_id VARCHAR(255), hostname VARCHAR(255), display_name VARCHAR(255), launch_index INTEGER, \
             availability_zone VARCHAR(255), reservation_id VARCHAR(255), image_ref VARCHAR(255), \
             kernel_id VARCHAR(255), ramdisk_id VARCHAR(255), key_name VARCHAR(255), user_data MEDIUMTEXT, \
             root_device_name VARCHAR(255), default_ephemeral_device VARCHAR(255), \
             default_swap_device VARCHAR(255))".to_owned(),
            "CREATE TABLE block_device_mapping (id INTEGER PRIMARY KEY AUTOINCREMENT, instance_uuid VARCHAR(36), \
             deleted INTEGER, source_type VARCHAR(255), destination_type VARCHAR(255), \
             guest_format VARCHAR(255), device_name VARCHAR(255), boot_index INTEGER)".to_owned(),
            "CREATE TABLE instance_extra (id INTEGER PRIMARY KEY, instance_uuid VARCHAR(36), deleted INTEGER, \
             flavor TEXT, keypairs TEXT, device_metadata TEXT, numa_topology TEXT)".to_owned(),
            "CREATE TABLE instance_metadata (id INTEGER PRIMARY KEY, instance_uuid VARCHAR(36), deleted INTEGER, \
             `key` VARCHAR(255), value VARCHAR(255))".to_owned(),
            "CREATE TABLE instance_system_metadata (id INTEGER PRIMARY KEY, created_at DATETIME, updated_at DATETIME, \
             instance_uuid VARCHAR(36) NOT NULL, deleted INTEGER, `key` VARCHAR(255) NOT NULL, value VARCHAR(255))".to_owned(),
            "CREATE TABLE instance_info_caches (id INTEGER PRIMARY KEY, instance_uuid VARCHAR(36), deleted INTEGER, \
             network_info MEDIUMTEXT)".to_owned(),
            "CREATE TABLE instance_id_mappings (id INTEGER PRIMARY KEY AUTOINCREMENT, created_at DATETIME, \
             uuid VARCHAR(36) NOT NULL, deleted INTEGER)".to_owned(),
            "CREATE TABLE s3_images (id INTEGER PRIMARY KEY AUTOINCREMENT, created_at DATETIME, \
             uuid VARCHAR(36) NOT NULL, deleted INTEGER)".to_owned(),
            format!(
                "INSERT INTO instances (uuid, deleted, project_id, hostname, display_name, launch_index, \
                 availability_zone, reservation_id, image_ref, kernel_id, ramdisk_id, user_data, root_device_name) \
                 VALUES ('{VM_A}', 0, '{PROJECT}', 'vm-a', 'vm a', 0, 'nova', 'r-1', '{IMAGE}', '', '', \
                 'I2Nsb3VkLWNvbmZpZwo=', '/dev/vda')"
            ),
            format!("INSERT INTO instance_extra (instance_uuid, deleted, flavor) VALUES ('{VM_A}', 0, '{FLAVOR}')"),
            format!("INSERT INTO instance_info_caches (instance_uuid, deleted, network_info) VALUES ('{VM_A}', 0, '[]')"),
            format!("INSERT INTO instance_metadata (instance_uuid, deleted, `key`, value) VALUES \
                     ('{VM_A}', 0, 'a', 'café'), ('{VM_A}', 0, 'b', '2')"),
            format!("INSERT INTO instance_system_metadata (instance_uuid, deleted, `key`, value) VALUES \
                     ('{VM_A}', 0, 'image_min_disk', '1'), ('{VM_A}', 0, 'boot_roles', 'member,reader')"),
        ] {
            sqlx::query(&sql)
                .execute(&pool)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
        pool.close().await;
    });
}

#[test]
#[cfg(feature = "nova-db")]
fn nova_source_posts_the_instance_from_novas_rows() {
    let t = Target::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("nova.db");
    make_nova_db(&db);
    // Neutron is only asked for EC2 paths: a port held here, never answered.
    let (_neutron, neutron_port) = common::held_port();
    let text = format!(
        "[api]\nlisten = \"127.0.0.1:0\"\nmetadata_proxy_shared_secret = \"{SECRET}\"\nsource = \"nova\"\n\
         vendordata_providers = [\"StaticJSON\", \"DynamicJSON\"]\n\
         vendordata_dynamic_targets = [\"vd@{}\"]\n\
         [api.nova]\nconnection = \"sqlite:///{}\"\nlocal_metadata_per_cell = true\n\
         [api.neutron]\nurl = \"http://127.0.0.1:{neutron_port}\"\nauth_strategy = \"noauth\"\n",
        t.url("/ok"),
        db.display()
    );
    let f = metaproxy::config::parse_str(&text, Path::new("t.toml")).unwrap();
    let cfg = ApiConfig::from_table(f.api.as_ref().unwrap()).unwrap();
    let handle = metaproxy::api::server::start(cfg).unwrap();
    let addr = handle.bound[0];
    let r = ask(addr, "/openstack/latest/vendor_data2.json", VM_A);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.text(),
        format!(
            "{{\"static\": {{}}, \"vd\": {{\"zeta\": 1, \"for\": \"{VM_A}\", \
             \"list\": [true, null, \"x\\u00e9\"]}}}}"
        )
    );
    let seen = t.to("/ok");
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].body, BODY_A, "the same body as from the inventory");
    // A second request is a second POST, even with the instance cached.
    assert_eq!(
        ask(addr, "/openstack/latest/vendor_data2.json", VM_A).status,
        200
    );
    assert_eq!(t.to("/ok").len(), 2);
    handle.stop().unwrap();
}
