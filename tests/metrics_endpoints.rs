//! The Prometheus endpoints of the three daemons (`proxy.metrics_listen`,
//! `agent.metrics_listen`, `api.metrics_listen`): after real traffic through
//! api + agent + proxy, and after attacks on each edge (a smuggling attempt,
//! a spoofed trust header, a head that never completes, a dead or silent
//! agent), each scrape shows the counter named after what happened.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{get, AgentMode, FakeAgent};

const SECRET: &str = "s3cret-for-metrics";
const ROUTER: &str = "d0d0d0d0-0000-4000-8000-00000000c001";

fn demo_inventory() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/inventory.toml")
}

fn scrape(addr: SocketAddr) -> String {
    let r = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Content-Type"), Some("text/plain; version=0.0.4"));
    r.text()
}

/// The value of the sample of `name` whose labels contain `labels` (all of
/// them, as `k="v"` text; empty: a sample with no labels or any).
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let (lab, v) = match rest.strip_prefix('{') {
            Some(r) => r.split_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        labels
            .iter()
            .all(|want| lab.split(',').any(|have| have == *want))
            .then(|| v.parse().ok())?
    })
}

/// Send `raw` and read until the server closes: the status of its answer.
fn exchange(addr: SocketAddr, raw: &str) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    text.get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no answer to {raw:?}: {text:?}"))
}

const SMUGGLING: &str = "POST /latest/meta-data/ HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\
                         Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n";

struct Chain {
    api: metaproxy::api::server::ApiHandle,
    agent: metaproxy::agent::AgentHandle,
    proxy: metaproxy::proxy::ProxyHandle,
    guest: SocketAddr,
    _dir: tempfile::TempDir,
}

fn start_chain() -> Chain {
    let dir = tempfile::tempdir().unwrap();
    let inv = demo_inventory();
    let text = format!(
        r#"
[api]
listen = "127.0.0.1:0"
metadata_proxy_shared_secret = "{SECRET}"
inventory = {inv:?}
state_dir = {state:?}
workers = 1
metrics_listen = "127.0.0.1:0"
"#,
        inv = inv.display().to_string(),
        state = dir.path().join("state").display().to_string(),
    );
    let f = metaproxy::config::parse_str(&text, Path::new("test.toml")).unwrap();
    let api_cfg = metaproxy::api::config::ApiConfig::from_table(f.api.as_ref().unwrap()).unwrap();
    let api = metaproxy::api::server::start(api_cfg).unwrap();
    let api_addr = api.bound[0];

    let socket = dir.path().join("agent.sock");
    let agent_text = format!(
        r#"
socket = "{}"
socket_mode = "user"
inventory = "{}"
metadata_proxy_shared_secret = "{SECRET}"
workers = 1
metrics_listen = "127.0.0.1:0"
[nova]
nova_metadata_host = "{}"
nova_metadata_port = {}
"#,
        socket.display(),
        inv.display(),
        api_addr.ip(),
        api_addr.port()
    );
    let t: toml::Table = toml::from_str(&agent_text).unwrap();
    let agent_cfg = metaproxy::agent::AgentConfig::try_from(&t).unwrap();
    let agent = metaproxy::agent::start(agent_cfg).unwrap();

    let proxy_text = format!(
        r#"
[proxy]
workers = 1
agent_socket = "{}"
metrics_listen = "127.0.0.1:0"
[proxy.timeouts]
http_request = "300ms"

[[proxy.namespace]]
router_id = "{ROUTER}"
listen = "127.0.0.1:0"
"#,
        socket.display()
    );
    let f = metaproxy::proxy::config::parse_str(&proxy_text, Path::new("test.toml")).unwrap();
    let proxy_cfg =
        metaproxy::proxy::config::ProxyConfig::try_from(f.proxy.as_ref().unwrap()).unwrap();
    let proxy = metaproxy::proxy::start(proxy_cfg).unwrap();
    let guest = proxy.bound[0][0];
    Chain {
        api,
        agent,
        proxy,
        guest,
        _dir: dir,
    }
}

#[test]
fn each_daemon_counts_real_traffic_and_attacks_on_its_endpoint() {
    let c = start_chain();
    let (proxy_m, agent_m, api_m) = (
        c.proxy.metrics_addr().expect("proxy.metrics_listen"),
        c.agent.metrics_addr().expect("agent.metrics_listen"),
        c.api.metrics_addr().expect("api.metrics_listen"),
    );
    // Nothing yet.
    let ns = format!("router_id=\"{ROUTER}\"");
    let p = scrape(proxy_m);
    assert_eq!(
        sample(&p, "metaproxy_proxy_requests_total", &[&ns]),
        Some(0),
        "{p}"
    );
    assert_eq!(
        sample(&p, "metaproxy_proxy_rx_smuggling_total", &[&ns]),
        Some(0)
    );

    // A guest's request through the whole chain (source 127.0.0.1 is "demo").
    let r = get(
        c.guest,
        "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n",
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    // One that claims to be another VM: the proxy deletes the headers (it is
    // still demo's answer) and counts the attempt.
    let r = get(
        c.guest,
        "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.9.9.9\r\n\
         X-Neutron-Router-ID: d0d0d0d0-0000-4000-8000-00000000ffff\r\n\r\n",
    )
    .unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "i-00000001"));
    // Ambiguous framing, at the proxy.
    assert_eq!(exchange(c.guest, SMUGGLING), 400);
    // A head that never completes: 408 after http_request.
    assert_eq!(
        exchange(c.guest, "GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n"),
        408
    );

    let p = scrape(proxy_m);
    let at = |name: &str| sample(&p, name, &[&ns]);
    assert_eq!(at("metaproxy_proxy_requests_total"), Some(2), "{p}");
    assert_eq!(at("metaproxy_proxy_connections_accepted_total"), Some(4));
    assert_eq!(at("metaproxy_proxy_rx_spoofed_header_total"), Some(1));
    assert_eq!(at("metaproxy_proxy_rx_smuggling_total"), Some(1));
    assert_eq!(at("metaproxy_proxy_rx_timeout_total"), Some(1));
    assert_eq!(at("metaproxy_proxy_rx_bad_request_total"), Some(0));
    assert_eq!(at("metaproxy_proxy_upstream_timeout_total"), Some(0));
    assert!(p.contains("# TYPE metaproxy_proxy_rx_smuggling_total counter\n"));

    // The agent: smuggling and a bad identity straight on its socket.
    let mut s = UnixStream::connect(&c.agent.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(SMUGGLING.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(out.starts_with(b"HTTP/1.1 400 "), "{out:?}");
    let a = scrape(agent_m);
    assert_eq!(
        sample(&a, "metaproxy_agent_requests_total", &[]),
        Some(2),
        "{a}"
    );
    assert_eq!(sample(&a, "metaproxy_agent_forwarded_total", &[]), Some(2));
    assert_eq!(
        sample(&a, "metaproxy_agent_rx_smuggling_total", &[]),
        Some(1)
    );
    assert_eq!(
        sample(&a, "metaproxy_agent_responses_total", &["status=\"200\""]),
        Some(2)
    );
    assert_eq!(
        sample(&a, "metaproxy_agent_forward_latency_seconds_count", &[]),
        Some(2)
    );

    // The API: the agent's two, then smuggling straight at it.
    assert_eq!(exchange(c.api.bound[0], SMUGGLING), 400);
    let m = scrape(api_m);
    assert_eq!(
        sample(&m, "metaproxy_api_requests_total", &[]),
        Some(2),
        "{m}"
    );
    assert_eq!(sample(&m, "metaproxy_api_rx_smuggling_total", &[]), Some(1));
    assert_eq!(
        sample(&m, "metaproxy_api_responses_total", &["status=\"200\""]),
        Some(2)
    );
    assert_eq!(
        sample(&m, "metaproxy_api_responses_total", &["status=\"400\""]),
        Some(1)
    );
    assert_eq!(
        sample(&m, "metaproxy_api_request_duration_seconds_count", &[]),
        Some(2)
    );
    assert_eq!(
        sample(
            &m,
            "metaproxy_api_request_duration_seconds_bucket",
            &["le=\"+Inf\""]
        ),
        Some(2)
    );

    // ctl status reads the same counters.
    let status = c.proxy.control.status();
    assert_eq!(status[0].counters.rx_smuggling, 1);
    assert_eq!(status[0].counters.requests, 2);
    c.proxy.stop().unwrap();
    c.agent.stop().unwrap();
    c.api.stop().unwrap();
}

fn proxy_in_front_of(agent: &Path) -> metaproxy::proxy::ProxyHandle {
    let cfg = common::proxy_config(
        agent,
        "metrics_listen = \"127.0.0.1:0\"\n[proxy.limits]\nmax_head_bytes = 1024",
    );
    metaproxy::proxy::start(cfg).unwrap()
}

#[test]
fn the_proxy_counts_agent_failures_by_what_failed() {
    let ns = format!("router_id=\"{}\"", common::ROUTER);
    // A silent agent: 504 after `server`.
    let silent = FakeAgent::start(AgentMode::Silent);
    let p = proxy_in_front_of(&silent.path);
    let r = get(p.bound[0][0], "GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(r.status, 504);
    // A head over max_head_bytes: 431.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(2000)
    );
    assert_eq!(exchange(p.bound[0][0], &big), 431);
    let text = scrape(p.metrics_addr().unwrap());
    assert_eq!(
        sample(&text, "metaproxy_proxy_upstream_timeout_total", &[&ns]),
        Some(1),
        "{text}"
    );
    assert_eq!(
        sample(&text, "metaproxy_proxy_rx_head_too_large_total", &[&ns]),
        Some(1)
    );
    assert_eq!(
        sample(&text, "metaproxy_proxy_upstream_refused_total", &[&ns]),
        Some(0)
    );
    p.stop().unwrap();

    // No agent at all: 503.
    let dir = tempfile::tempdir().unwrap();
    let p = proxy_in_front_of(&dir.path().join("nobody.sock"));
    let r = get(p.bound[0][0], "GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(r.status, 503);
    let text = scrape(p.metrics_addr().unwrap());
    assert_eq!(
        sample(&text, "metaproxy_proxy_upstream_refused_total", &[&ns]),
        Some(1),
        "{text}"
    );
    assert_eq!(sample(&text, "metaproxy_proxy_namespaces", &[]), Some(1));
    p.stop().unwrap();
}

#[test]
fn a_bad_metrics_listen_refuses_to_start_naming_the_key() {
    let proxy = metaproxy::proxy::config::parse_str(
        "[proxy]\nmetrics_listen = \"not an address\"\n",
        Path::new("t.toml"),
    )
    .unwrap();
    let e = metaproxy::proxy::config::ProxyConfig::try_from(proxy.proxy.as_ref().unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("proxy.metrics_listen"), "{e}");

    let api = metaproxy::config::parse_str(
        &format!(
            "[api]\nmetadata_proxy_shared_secret = \"x\"\ninventory = {:?}\nmetrics_listen = \"nohost\"\n",
            demo_inventory().display().to_string()
        ),
        Path::new("t.toml"),
    )
    .unwrap();
    let e = metaproxy::api::config::ApiConfig::from_table(api.api.as_ref().unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("api.metrics_listen"), "{e}");

    let t: toml::Table = toml::from_str(&format!(
        "socket = \"/tmp/x.sock\"\ninventory = {:?}\nmetadata_proxy_shared_secret = \"x\"\n\
         metrics_listen = \"127.0.0.1\"\n",
        demo_inventory().display().to_string()
    ))
    .unwrap();
    let e = metaproxy::agent::AgentConfig::try_from(&t)
        .unwrap_err()
        .to_string();
    assert!(e.contains("agent.metrics_listen"), "{e}");

    // An address that is taken refuses the start, naming the key.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let agent = FakeAgent::start(AgentMode::KeepAlive);
    let cfg = common::proxy_config(
        &agent.path,
        &format!("metrics_listen = \"{}\"", taken.local_addr().unwrap()),
    );
    let e = metaproxy::proxy::start(cfg)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("proxy.metrics_listen"), "{e}");
}
