//! Arbitrary Neutron port JSON through the agent's resolution into the
//! request it writes to the metadata API (issue 11: a tenant's `device_id`
//! with CR LF smuggled requests onto the pooled connection). Whatever the
//! ports say, the output is exactly one complete request (httparse consumes
//! every byte) with exactly one of each of the four identity headers, and
//! the instance id it carries is the port's, signed.
//!
//! Input: `<guest token bytes> 0xff <ports JSON>`, or just the JSON (no token).
#![no_main]

use libfuzzer_sys::fuzz_target;
use metaproxy::agent::neutron::resolved_from_port;
use metaproxy::agent::forward::{write_api_request, GuestRequest};
use metaproxy::agent::identity::{IdText, Identity, LookupKey, Scope};
use metaproxy::agent::neutron::{match_key, parse_ports, PortMatch};
use metaproxy::agent::resolve::RejectedPorts;
use metaproxy::http::Method;

const IDENTITY: [&str; 4] = [
    "x-forwarded-for",
    "x-instance-id",
    "x-tenant-id",
    "x-instance-id-signature",
];
const SECRET: &[u8] = b"fuzz-secret";

fuzz_target!(|data: &[u8]| {
    metaproxy::log::set_level(metaproxy::log::Level::Error);
    let (token, json) = match data.iter().position(|&b| b == 0xff) {
        Some(i) => (Some(&data[..i]), &data[i + 1..]),
        None => (None, data),
    };
    let Ok(ports) = parse_ports(json) else {
        return;
    };
    let rejected = RejectedPorts::default();
    let signer = metaproxy::sign::Signer::new(SECRET);
    for p in &ports {
        // Ask for each port the way a guest on its network would.
        let key = match (p.fixed_ips.first(), p.mac()) {
            (Some(ip), _) => LookupKey::Ip(*ip),
            (None, Some(mac)) => LookupKey::Mac(mac),
            (None, None) => continue,
        };
        let xff = match p.fixed_ips.first() {
            Some(ip) => ip.to_string(),
            None => "fe80::1".to_string(),
        };
        let networks = [p.network_id.as_str()];
        let PortMatch::Found(found) = match_key(&ports, &networks, &key) else {
            continue;
        };
        let Some(r) = resolved_from_port(found, &rejected) else {
            continue;
        };
        // What the agent's identity parser would accept: an id of at most
        // `MAX_ID_CHARS` (a longer one never reaches a lookup).
        let (Some(network), Some(xff)) = (IdText::new(&p.network_id), IdText::new(&xff)) else {
            continue;
        };
        let id = Identity {
            scope: Scope::Network(network),
            key,
            xff,
        };
        for method in [Method::Get, Method::Head, Method::Post] {
            let body: &[u8] = if method == Method::Post { b"pw" } else { b"" };
            let guest = GuestRequest {
                method,
                target: b"/openstack/latest/meta_data.json",
                token,
                body,
            };
            let mut out = Vec::new();
            if write_api_request(&mut out, &guest, "127.0.0.1:8775", &id, &r, &signer).is_err() {
                assert!(out.is_empty(), "nothing written for a refused request");
                continue;
            }
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut req = httparse::Request::new(&mut headers);
            let n = match req.parse(&out) {
                Ok(httparse::Status::Complete(n)) => n,
                other => panic!("not one complete request: {other:?}: {out:?}"),
            };
            assert_eq!(
                n + body.len(),
                out.len(),
                "bytes after the request: {out:?}"
            );
            assert_eq!(req.method, Some(method.as_str()));
            for name in IDENTITY {
                let n = req
                    .headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case(name))
                    .count();
                assert_eq!(n, 1, "{name} x{n}: {out:?}");
            }
            let value = |name: &str| {
                req.headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| h.value)
                    .unwrap()
            };
            assert_eq!(value("x-instance-id"), r.instance.as_str().as_bytes());
            assert_eq!(value("x-instance-id"), found.device_id.as_bytes());
            assert_eq!(value("x-tenant-id"), r.project.as_str().as_bytes());
            let sig = metaproxy::sign::sign_instance_id(SECRET, &found.device_id);
            assert_eq!(value("x-instance-id-signature"), sig.as_bytes());
        }
    }
});
