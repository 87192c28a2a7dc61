//! A fake neutron-server (`auth_strategy = "noauth"`) serving the ports of an
//! inventory, switchable at run time into the faults of issue 7: slow, failing
//! with 500s, or answering every IP lookup with duplicate ports. It counts the
//! port queries it answered. `GET /v2.0/ports` only, with the filters the
//! agent uses (repeated values OR-ed, keys AND-ed).
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metaproxy::inventory::Inventory;

/// How the fake answers port queries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NeutronMode {
    Up,
    /// Answer correctly, after this long.
    Slow(Duration),
    /// 500 with Neutron's error body.
    Fail500,
    /// Every instance port comes back twice, the copy on another device.
    Duplicates,
}

/// One port as a fake Neutron stores it.
#[derive(Clone, Debug)]
pub struct FakePort {
    pub device_id: String,
    pub device_owner: String,
    pub network_id: String,
    pub project: String,
    pub mac: String,
    pub ips: Vec<String>,
}

pub struct FakeNeutron {
    pub addr: SocketAddr,
    pub mode: Arc<Mutex<NeutronMode>>,
    /// Port queries answered (any status).
    pub queries: Arc<AtomicUsize>,
}

impl FakeNeutron {
    /// Serve `inv`'s instance ports and one router interface per router network.
    pub fn start(inv: &Inventory, routers: &[&str]) -> FakeNeutron {
        let mut db = Vec::new();
        for i in inv.instances() {
            for p in &i.ports {
                db.push(FakePort {
                    device_id: i.uuid.clone(),
                    device_owner: "compute:nova".into(),
                    network_id: p.network.clone(),
                    project: i.project.clone(),
                    mac: mac(&p.mac),
                    ips: p.fixed_ips.iter().map(|ip| ip.to_string()).collect(),
                });
            }
        }
        for (k, r) in routers.iter().enumerate() {
            for (j, n) in inv.router_networks(r).iter().enumerate() {
                db.push(FakePort {
                    device_id: r.to_string(),
                    device_owner: "network:router_interface".into(),
                    network_id: n.clone(),
                    project: String::new(),
                    mac: format!("fa:16:3e:ff:{k:02x}:{j:02x}"),
                    ips: vec![],
                });
            }
        }
        let db = Arc::new(db);
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mode = Arc::new(Mutex::new(NeutronMode::Up));
        let queries = Arc::new(AtomicUsize::new(0));
        let (m, q) = (mode.clone(), queries.clone());
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let (db, m, q) = (db.clone(), m.clone(), q.clone());
                std::thread::spawn(move || serve(c, &db, &m, &q));
            }
        });
        FakeNeutron {
            addr,
            mode,
            queries,
        }
    }

    pub fn set(&self, mode: NeutronMode) {
        *self.mode.lock().unwrap() = mode;
    }
}

fn mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// `GET /v2.0/ports?…` over `db` as Neutron answers it: (status, body).
/// Filters with Neutron's semantics (repeated values OR-ed, keys AND-ed,
/// `fields`, `limit`); an unknown filter is Neutron's 400. With
/// `duplicates`, every instance port comes back twice, the copy on another
/// device.
pub fn query(target: &str, db: &[FakePort], duplicates: bool) -> (u16, String) {
    let (path, q) = target.split_once('?').unwrap_or((target, ""));
    if path != "/v2.0/ports" {
        return (404, r#"{"NeutronError": {"message": "not found"}}"#.into());
    }
    let mut f: HashMap<String, Vec<String>> = HashMap::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        f.entry(decode(k)).or_default().push(decode(v));
    }
    const KNOWN: [&str; 7] = [
        "device_id",
        "device_owner",
        "network_id",
        "fixed_ips",
        "mac_address",
        "fields",
        "limit",
    ];
    if let Some(k) = f.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return (
            400,
            format!(
                r#"{{"NeutronError": {{"type": "HTTPBadRequest", "message": "['{k}'] is invalid attribute for filtering", "detail": ""}}}}"#
            ),
        );
    }
    let any = |k: &str, v: &str| f.get(k).is_none_or(|vs| vs.iter().any(|x| x == v));
    let ips: Option<Vec<String>> = f.get("fixed_ips").map(|vs| {
        vs.iter()
            .filter_map(|v| v.strip_prefix("ip_address=").map(str::to_string))
            .collect()
    });
    let limit: usize = f
        .get("limit")
        .and_then(|v| v[0].parse().ok())
        .unwrap_or(usize::MAX);
    let fields = f.get("fields").cloned().unwrap_or_default();
    let mut out = Vec::new();
    for p in db {
        if !any("device_id", &p.device_id)
            || !any("device_owner", &p.device_owner)
            || !any("network_id", &p.network_id)
            || !any("mac_address", &p.mac)
            || ips
                .as_ref()
                .is_some_and(|w| !p.ips.iter().any(|ip| w.contains(ip)))
        {
            continue;
        }
        let copies = if duplicates && p.device_owner.starts_with("compute:") {
            2
        } else {
            1
        };
        for c in 0..copies {
            let device = if c == 0 {
                p.device_id.clone()
            } else {
                format!("dup-{}", p.device_id)
            };
            let mut obj = serde_json::json!({
                "id": format!("port-{}-{c}", p.mac),
                "device_id": device,
                "device_owner": p.device_owner,
                "network_id": p.network_id,
                "mac_address": p.mac,
                "project_id": p.project,
                "tenant_id": p.project,
                "fixed_ips": p.ips.iter().map(|ip| serde_json::json!({"subnet_id": "s", "ip_address": ip})).collect::<Vec<_>>(),
            });
            if !fields.is_empty() {
                obj.as_object_mut()
                    .unwrap()
                    .retain(|k, _| fields.contains(k));
            }
            out.push(obj);
        }
        if out.len() >= limit {
            break;
        }
    }
    (200, serde_json::json!({ "ports": out }).to_string())
}

fn serve(conn: std::net::TcpStream, db: &[FakePort], mode: &Mutex<NeutronMode>, n: &AtomicUsize) {
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut cl = 0usize;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end_matches(['\r', '\n']);
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    cl = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; cl];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let m = *mode.lock().unwrap();
        n.fetch_add(1, Ordering::SeqCst);
        let (status, out) = match m {
            NeutronMode::Up => query(&target, db, false),
            NeutronMode::Slow(d) => {
                std::thread::sleep(d);
                query(&target, db, false)
            }
            NeutronMode::Fail500 => (
                500,
                r#"{"NeutronError": {"type": "HTTPInternalServerError", "message": "Request Failed: internal server error while processing your request.", "detail": ""}}"#.into(),
            ),
            NeutronMode::Duplicates => query(&target, db, true),
        };
        let resp = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{out}",
            out.len()
        );
        let w = r.get_mut();
        if w.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

/// A fake Keystone + Neutron on one address (Keystone at `/v3`), as the
/// agent's `auth_strategy = "keystone"` sees them: a token for `password`
/// only (401 for any other, as Keystone answers a wrong password), `GET
/// /v2.0/ports` over `db` and `GET /v2.0/agents` answering `agents` (a JSON
/// array, switchable at run time), both with a valid token only.
pub struct FakeKeystoneNeutron {
    pub addr: SocketAddr,
    pub agents: Arc<Mutex<serde_json::Value>>,
}

impl FakeKeystoneNeutron {
    pub fn start(password: &str, db: Vec<FakePort>) -> FakeKeystoneNeutron {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let agents = Arc::new(Mutex::new(serde_json::json!([])));
        let (db, a, password) = (Arc::new(db), agents.clone(), password.to_string());
        let tokens = Arc::new(Mutex::new(Vec::<String>::new()));
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let (db, a, pw, t) = (db.clone(), a.clone(), password.clone(), tokens.clone());
                std::thread::spawn(move || serve_keystone(c, &db, &a, &pw, &t));
            }
        });
        FakeKeystoneNeutron { addr, agents }
    }

    pub fn set_agents(&self, agents: serde_json::Value) {
        *self.agents.lock().unwrap() = agents;
    }
}

fn serve_keystone(
    conn: std::net::TcpStream,
    db: &[FakePort],
    agents: &Mutex<serde_json::Value>,
    password: &str,
    tokens: &Mutex<Vec<String>>,
) {
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("").to_string();
        let (mut cl, mut token) = (0usize, String::new());
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end_matches(['\r', '\n']);
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    cl = v.trim().parse().unwrap_or(0);
                } else if k.eq_ignore_ascii_case("x-auth-token") {
                    token = v.trim().to_string();
                }
            }
        }
        let mut body = vec![0u8; cl];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let mut extra = String::new();
        let (status, out) = if method == "POST" && target == "/v3/auth/tokens" {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            if v["auth"]["identity"]["password"]["user"]["password"] == password {
                let mut t = tokens.lock().unwrap();
                let tok = format!("tok-{}", t.len() + 1);
                t.push(tok.clone());
                extra = format!("X-Subject-Token: {tok}\r\n");
                (
                    201,
                    r#"{"token":{"expires_at":"2099-01-01T00:00:00.000000Z"}}"#.to_string(),
                )
            } else {
                (
                    401,
                    r#"{"error":{"code":401,"title":"Unauthorized","message":"The request you have made requires authentication."}}"#
                        .to_string(),
                )
            }
        } else if !tokens.lock().unwrap().contains(&token) {
            (401, r#"{"error": {"code": 401}}"#.to_string())
        } else if target.starts_with("/v2.0/agents?") {
            let rows = agents.lock().unwrap().clone();
            (200, serde_json::json!({ "agents": rows }).to_string())
        } else {
            query(&target, db, false)
        };
        let resp = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{out}",
            out.len()
        );
        if r.get_mut().write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}
