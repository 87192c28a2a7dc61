//! Our agent in `openstack network agent list`: `report_state` over the
//! REAL RabbitMQ to the REAL neutron-rpc-server, checked through the real
//! Neutron API (`GET /v2.0/agents`), as an operator's monitoring sees it.
//!
//! `metaproxy agent` (the binary, so it can be killed) reports every second
//! as a host of its own; the row must appear as `Metadata agent`, alive, with
//! its configurations; after SIGKILL it must show dead once Neutron's
//! `agent_down_time` passed (`scripts/test.sh` starts the peers with
//! `NEUTRON_AGENT_DOWN_TIME=6`); restarted, it must be revived (the
//! server's answer to the first call, logged by the agent). Then the broker
//! drops our connections (`rabbitmqctl close_all_connections` on the test's
//! vhost only): the agent logs the outage once, reconnects, and the row
//! stays alive.
//!
//! Gated by `METAPROXY_PEERS_CHAIN=1` (source `$PEERS_DIR/chain/env`, which
//! `scripts/peers/chain.sh start` writes); otherwise prints SKIPPED.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Peers {
    neutron: SocketAddr,
    nova: SocketAddr,
    transport_url: String,
    down_time: Duration,
    /// chain.sh started the broker: the test may stop it.
    rabbit_ours: bool,
}

fn http_addr(var: &str, default: &str) -> SocketAddr {
    let url = std::env::var(var).unwrap_or_else(|_| default.to_string());
    url.strip_prefix("http://")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("{var} {url:?} is not http://ip:port"))
}

fn peers() -> Option<Peers> {
    if std::env::var("METAPROXY_PEERS_CHAIN").as_deref() != Ok("1") {
        println!("SKIPPED peers_report: METAPROXY_PEERS_CHAIN != 1 (scripts/peers/chain.sh start; . $PEERS_DIR/chain/env)");
        return None;
    }
    let var = |k: &str| {
        std::env::var(k).unwrap_or_else(|_| panic!("{k} not set: source $PEERS_DIR/chain/env"))
    };
    let neutron = http_addr("METAPROXY_PEERS_NEUTRON_URL", "http://127.0.0.1:9696");
    let nova = http_addr("METAPROXY_PEERS_NOVA_URL", "http://127.0.0.1:8775");
    let down: u64 = var("METAPROXY_PEERS_AGENT_DOWN_TIME")
        .parse()
        .expect("agent_down_time");
    Some(Peers {
        neutron,
        nova,
        transport_url: var("METAPROXY_PEERS_TRANSPORT_URL"),
        down_time: Duration::from_secs(down),
        rabbit_ours: std::env::var("METAPROXY_PEERS_RABBIT_OURS").as_deref() == Ok("1"),
    })
}

/// Our agent's row, if Neutron has one.
fn row(p: &Peers, host: &str) -> Option<Value> {
    let raw = format!(
        "GET /v2.0/agents?binary=neutron-metadata-agent&host={host} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        p.neutron
    );
    let r = common::get(p.neutron, &raw).ok()?;
    assert_eq!(r.status, 200, "GET /v2.0/agents: {}", r.text());
    let v: Value = serde_json::from_str(&r.text()).expect("agents JSON");
    let rows = v["agents"].as_array().expect("agents").clone();
    assert!(rows.len() <= 1, "one row per (type, host): {v:#}");
    rows.into_iter().next()
}

fn alive(p: &Peers, host: &str) -> Option<bool> {
    row(p, host).and_then(|r| r["alive"].as_bool())
}

fn delete(p: &Peers, id: &str) {
    let raw = format!(
        "DELETE /v2.0/agents/{id} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        p.neutron
    );
    let r = common::get(p.neutron, &raw).expect("DELETE agent");
    assert_eq!(r.status, 204, "{}", r.text());
}

fn spawn(config: &Path, log: &Path) -> Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_metaproxy"))
        .args(["agent", "--config"])
        .arg(config)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn metaproxy agent")
}

fn log_text(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

fn wait_for(what: &str, limit: Duration, log: &Path, mut ready: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ready() {
        assert!(
            t0.elapsed() < limit,
            "not within {limit:?}: {what}\nagent log:\n{}",
            log_text(log)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Write the agent's config: reporting as `host` every second via `url`.
fn write_config(p: &Peers, dir: &Path, host: &str, url: &str) -> std::path::PathBuf {
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"[agent]
socket = "{}"
inventory = "{}/examples/inventory.toml"
metadata_proxy_shared_secret = "{secret}"
transport_url = "{url}"
host = "{host}"
report_interval = "1s"

[agent.nova]
nova_metadata_host = "{}"
nova_metadata_port = {}
timeout = "5s"
"#,
            dir.join("agent.sock").display(),
            env!("CARGO_MANIFEST_DIR"),
            p.nova.ip(),
            p.nova.port(),
            secret = std::env::var("METAPROXY_PEERS_SECRET").unwrap_or_default(),
        ),
    )
    .unwrap();
    config
}

/// One request for the demo instance through our agent's socket: its
/// status and how long it took (the answer is Nova's, whatever it is).
fn ask_agent(socket: &Path) -> (u16, Duration) {
    use std::io::{BufReader, Write};
    let t0 = Instant::now();
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("agent socket");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        b"GET /openstack/latest/meta_data.json HTTP/1.1\r\nHost: 169.254.169.254\r\n\
          X-Forwarded-For: 127.0.0.1\r\nX-Neutron-Router-ID: d0d0d0d0-0000-4000-8000-00000000c001\r\n\
          Connection: close\r\n\r\n",
    )
    .unwrap();
    let r = common::read_response(&mut BufReader::new(s), false).expect("agent answer");
    (r.status, t0.elapsed())
}

/// Slowest answer allowed while the broker is away. The answer is the real
/// Nova's, on a loaded 2-core machine; an agent that waited on the broker
/// would take its 10 s connect timeout.
const SERVING_LIMIT: Duration = Duration::from_secs(5);

/// Starts the broker's app again when dropped (also when the test fails).
struct StartApp(bool);

impl Drop for StartApp {
    fn drop(&mut self) {
        if self.0 && !rabbitmqctl(&["start_app"]) {
            eprintln!("rabbitmqctl start_app failed: the broker stays stopped");
        }
    }
}

fn rabbitmqctl(args: &[&str]) -> bool {
    Command::new("rabbitmqctl")
        .args(["-n", "rabbit@localhost"])
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn our_agent_is_listed_alive_dies_and_revives() {
    let Some(p) = peers() else { return };
    let dir = tempfile::tempdir().unwrap();
    let host = format!("metaproxy-report-{}", std::process::id());
    let socket = dir.path().join("agent.sock");
    let config = write_config(&p, dir.path(), &host, &p.transport_url);
    let log = dir.path().join("agent.log");
    let mut agent = spawn(&config, &log);
    let t0 = Instant::now();
    wait_for("row alive", Duration::from_secs(30), &log, || {
        alive(&p, &host) == Some(true)
    });
    println!("listed alive after {:?}", t0.elapsed());
    let r = row(&p, &host).unwrap();
    assert_eq!(r["agent_type"], "Metadata agent", "{r:#}");
    assert_eq!(r["binary"], "neutron-metadata-agent");
    assert_eq!(r["topic"], "N/A");
    let c = &r["configurations"];
    assert_eq!(
        c["metadata_proxy_socket"],
        socket.display().to_string().as_str()
    );
    assert_eq!(c["nova_metadata_host"], p.nova.ip().to_string().as_str());
    assert_eq!(c["nova_metadata_port"], p.nova.port());
    assert_eq!(c["log_agent_heartbeats"], false);
    let id = r["id"].as_str().unwrap().to_string();
    let text = log_text(&log);
    assert!(
        text.contains("on host \"") && text.contains("\": new"),
        "{text}"
    );
    assert!(!text.contains("guest:guest"), "password logged: {text}");
    // Casts keep the heartbeat fresh.
    let beat = r["heartbeat_timestamp"].clone();
    wait_for("a later heartbeat", Duration::from_secs(10), &log, || {
        row(&p, &host).is_some_and(|r| r["heartbeat_timestamp"] != beat)
    });

    agent.kill().unwrap();
    agent.wait().unwrap();
    let t0 = Instant::now();
    wait_for(
        "row dead",
        p.down_time + Duration::from_secs(15),
        &log,
        || alive(&p, &host) == Some(false),
    );
    println!(
        "dead {:?} after SIGKILL (agent_down_time {:?})",
        t0.elapsed(),
        p.down_time
    );

    let mut agent = spawn(&config, &log);
    wait_for("row alive again", Duration::from_secs(30), &log, || {
        alive(&p, &host) == Some(true)
    });
    wait_for("revived", Duration::from_secs(10), &log, || {
        log_text(&log).contains("\": revived")
    });
    assert_eq!(row(&p, &host).unwrap()["id"], id.as_str(), "same row");

    outage(&p, &host, &socket, &log);
    agent.kill().unwrap();
    agent.wait().unwrap();
    delete(&p, &id);
    println!("agent log:\n{}", log_text(&log));
}

/// The broker goes away while the agent serves: every request is answered
/// as before and promptly, the outage is logged once, and reports resume
/// (the row is alive again) when the broker is back. With a broker of
/// chain.sh's own: `rabbitmqctl stop_app` / `start_app` (its non-durable
/// `neutron` exchange is gone until neutron-rpc-server declares it again);
/// on a shared one only our vhost's connections are closed.
fn outage(p: &Peers, host: &str, socket: &Path, log: &Path) {
    let (before, _) = ask_agent(socket);
    let vhost = p
        .transport_url
        .rsplit_once('/')
        .map(|(_, v)| if v.is_empty() { "/" } else { v })
        .unwrap_or("/")
        .to_string();
    let stopped = p.rabbit_ours && rabbitmqctl(&["stop_app"]);
    let mut restart = StartApp(stopped);
    let mut slowest = Duration::ZERO;
    let mut serve = || {
        let (status, took) = ask_agent(socket);
        assert_eq!(status, before, "serving changed during the outage");
        assert!(took < SERVING_LIMIT, "a request took {took:?}");
        slowest = slowest.max(took);
    };
    if !stopped && !rabbitmqctl(&["close_all_connections", "--vhost", &vhost, "peers_report"]) {
        println!("SKIPPED the broker outage: rabbitmqctl failed");
        return;
    }
    let t0 = Instant::now();
    wait_for("outage logged", Duration::from_secs(15), log, || {
        serve();
        log_text(log).contains("failed:")
    });
    if stopped {
        for _ in 0..20 {
            serve();
        }
        restart.0 = false;
        assert!(rabbitmqctl(&["start_app"]), "rabbitmqctl start_app");
    }
    wait_for("recovery logged", Duration::from_secs(60), log, || {
        log_text(log).contains("work again after")
    });
    wait_for(
        "row alive after the outage",
        Duration::from_secs(30),
        log,
        || alive(p, host) == Some(true),
    );
    let text = log_text(log);
    assert_eq!(text.matches("failed:").count(), 1, "logged once: {text}");
    println!(
        "broker {} for {:?}: serving unaffected (slowest answer {slowest:?}), reports resumed",
        if stopped {
            "stopped"
        } else {
            "dropped our connections"
        },
        t0.elapsed()
    );
}

/// The first host of the URL refuses: the agent fails over to the next.
#[test]
fn a_dead_first_host_fails_over_to_the_next() {
    let Some(p) = peers() else { return };
    let dir = tempfile::tempdir().unwrap();
    let host = format!("metaproxy-report-failover-{}", std::process::id());
    let rest = p
        .transport_url
        .strip_prefix("rabbit://")
        .expect("rabbit:// URL");
    let url = format!(
        "rabbit://guest:guest@127.0.0.1:{},{rest}",
        common::free_port()
    );
    let config = write_config(&p, dir.path(), &host, &url);
    let log = dir.path().join("agent.log");
    let mut agent = spawn(&config, &log);
    wait_for(
        "row alive via the second host",
        Duration::from_secs(30),
        &log,
        || alive(&p, &host) == Some(true),
    );
    let text = log_text(&log);
    assert!(
        text.contains("failed:") && text.contains("work again after"),
        "{text}"
    );
    agent.kill().unwrap();
    agent.wait().unwrap();
    let id = row(&p, &host).unwrap()["id"].as_str().unwrap().to_string();
    delete(&p, &id);
}
