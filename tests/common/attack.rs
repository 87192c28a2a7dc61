//! The attacker's toolkit for the security suites: `metaproxy up` serving the
//! example inventory on loopback, a raw client bound to a chosen loopback
//! source address (a "VM"), and the checks that a byte stream carries no
//! trace of the victim.
//!
//! Raw bytes rather than an HTTP client on purpose: the point is to send
//! what no well-behaved client would, and to read *everything* the proxy
//! returns on the connection (until it closes or goes quiet), so a second,
//! smuggled response cannot hide behind the first.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use super::{read_response, Resp};

/// The victim VM: source 127.0.0.1 in examples/inventory.toml.
pub const VICTIM_IP: &str = "127.0.0.1";
/// The attacker VM: source 127.0.0.2.
pub const ATTACKER_IP: &str = "127.0.0.2";
/// Victim's instance uuid.
pub const VICTIM_UUID: &str = "d0d0d0d0-0000-4000-8000-000000000001";
/// Attacker's instance uuid.
pub const ATTACKER_UUID: &str = "d0d0d0d0-0000-4000-8000-000000000002";
/// The project both instances belong to (X-Tenant-ID).
pub const PROJECT: &str = "d0d0d0d0000040008000000000000000";
/// The router the proxy's namespace stands for.
pub const ROUTER_ID: &str = "d0d0d0d0-0000-4000-8000-00000000c001";
/// The network both instances are on.
pub const NETWORK_ID: &str = "d0d0d0d0-0000-4000-8000-00000000a001";
/// Shared secret between agent and API in the test config.
pub const SECRET: &str = "test-secret";
/// The document every case asks for: it carries the owner's uuid and hostname.
pub const META: &str = "/openstack/latest/meta_data.json";

/// Strings that only the victim's data contains (uuid, hostname, key,
/// user-data). None may ever appear in what the attacker receives.
pub const VICTIM_SECRETS: &[&str] = &[
    VICTIM_UUID,
    "demo.novalocal",
    "demo-key",
    "AAAAC3NzaC1lZDI1NTE5AAAAIGRlbW8tbWV0YXByb3h5LWtleS0wMDAwMDAwMDAwMDA",
    "/run/metaproxy-demo",
    "served by metaproxy",
];

/// Whose data a 200 carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// The attacker's own metadata (its uuid is in the body).
    Attacker,
    /// No instance data at all (an error answer).
    None,
}

/// A running `metaproxy up`; SIGTERM and reap on drop.
pub struct Up {
    _up: super::up::Up,
    /// The proxy's listening address.
    pub proxy: SocketAddr,
    _dir: tempfile::TempDir,
}

/// Start `metaproxy up` (api + agent + proxy) with the example inventory, as
/// tests/up_e2e.rs does, with short proxy timeouts so reading "until close"
/// ends quickly on a kept-alive connection. Access logs are on in all three
/// daemons, so every attack also goes through the logging paths; the
/// harness fails the test if `up` ever logs `panicked`.
pub fn start_up() -> Up {
    let dir = tempfile::tempdir().unwrap();
    let inv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/inventory.toml");
    let (up, proxy) = super::up::start_up_logged(
        dir.path(),
        &inv,
        ROUTER_ID,
        SECRET,
        "[proxy.timeouts]\nhttp_request = \"2s\"\nkeep_alive = \"2s\"\nclient = \"5s\"",
        true,
    );
    Up {
        _up: up,
        proxy,
        _dir: dir,
    }
}

/// A TCP connection to `to` from the loopback address `from` (a "VM").
pub fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&format!("{from}:0").parse::<SocketAddr>().unwrap().into())
        .unwrap();
    sock.connect(&to.into()).unwrap();
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Everything the server sends until it closes, resets, or stays quiet for
/// the read timeout. A reset is an end, not a failure: the proxy closes
/// with unread request bytes after a refusal, which the kernel turns into
/// an RST, but what arrived before it is still read here.
pub fn read_all(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return out,
        }
    }
}

/// Send `raw` from `from` in one write (write errors ignored: the proxy may
/// refuse and close before it has read everything) and return every byte
/// that comes back.
pub fn exchange(from: &str, to: SocketAddr, raw: &[u8]) -> Vec<u8> {
    let mut s = connect_from(from, to);
    let _ = s.write_all(raw);
    read_all(&mut s)
}

/// Like [`exchange`], then half-close our side so a server waiting for more
/// bytes sees EOF instead of a timeout.
pub fn exchange_then_eof(from: &str, to: SocketAddr, raw: &[u8]) -> Vec<u8> {
    let mut s = connect_from(from, to);
    let _ = s.write_all(raw);
    let _ = s.shutdown(Shutdown::Write);
    read_all(&mut s)
}

/// Split a byte stream into the responses it holds (each framed by
/// Content-Length, chunked, or close). Panics on trailing garbage.
pub fn responses(bytes: &[u8]) -> Vec<Resp> {
    let mut r = std::io::Cursor::new(bytes);
    let mut out = Vec::new();
    while (r.position() as usize) < bytes.len() {
        match read_response(&mut r, false) {
            Ok(resp) => out.push(resp),
            Err(e) => panic!(
                "unparseable response bytes ({e}): {:?}",
                String::from_utf8_lossy(bytes)
            ),
        }
    }
    out
}

/// The stream holds none of the victim's identifying strings.
pub fn assert_no_victim_data(bytes: &[u8], case: &str) {
    let text = String::from_utf8_lossy(bytes);
    for secret in VICTIM_SECRETS {
        assert!(
            !text.contains(secret),
            "{case}: victim data {secret:?} leaked to the attacker:\n{text}"
        );
    }
}

/// A 200 carries the attacker's own metadata; anything else carries none.
pub fn assert_owner(resp: &Resp, owner: Owner, case: &str) {
    let text = resp.text();
    match owner {
        Owner::Attacker => assert!(
            text.contains(ATTACKER_UUID),
            "{case}: expected the attacker's own data, got {}: {text}",
            resp.status
        ),
        Owner::None => assert!(
            !text.contains(ATTACKER_UUID) && !text.contains(VICTIM_UUID),
            "{case}: expected no instance data, got {}: {text}",
            resp.status
        ),
    }
}

/// The full check for one attack: exactly one response on the stream, with
/// `status`, owned by `owner`, and no victim data anywhere in the stream.
pub fn check_one(bytes: &[u8], status: u16, owner: Owner, case: &str) -> Resp {
    assert_no_victim_data(bytes, case);
    let mut all = responses(bytes);
    assert_eq!(
        all.len(),
        1,
        "{case}: expected exactly one response, got {}: {:?}",
        all.len(),
        String::from_utf8_lossy(bytes)
    );
    let resp = all.remove(0);
    assert_eq!(
        resp.status,
        status,
        "{case}: {:?}",
        String::from_utf8_lossy(bytes)
    );
    assert_owner(&resp, owner, case);
    resp
}

/// The victim's X-Instance-ID-Signature, as the agent would compute it: the
/// most convincing forgery an attacker could present.
pub fn victim_signature() -> String {
    metaproxy::sign::sign_instance_id(SECRET.as_bytes(), VICTIM_UUID)
}

/// Sanity check that the setup serves both VMs their own data, so that "no
/// victim data" below is meaningful (the strings do leak when asked for
/// from the victim's own address).
pub fn assert_baseline(up: &Up) {
    let req = format!("GET {META} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n");
    let v = exchange(VICTIM_IP, up.proxy, req.as_bytes());
    let text = String::from_utf8_lossy(&v);
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    assert!(text.contains(VICTIM_UUID) && text.contains("demo.novalocal"));
    let a = exchange(ATTACKER_IP, up.proxy, req.as_bytes());
    check_one(&a, 200, Owner::Attacker, "baseline");
    let ud = exchange(
        VICTIM_IP,
        up.proxy,
        b"GET /openstack/latest/user_data HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert!(String::from_utf8_lossy(&ud).contains("served by metaproxy"));
}
