//! `access_log = true` in `[proxy]`, `[agent]` and `[api]`: one line per
//! request in each daemon, saying who asked for what and, in the agent, which
//! instance the address resolved to. Never a header value (tokens, the
//! signature) or the shared secret. Off by default: no line at all.

mod common;

use std::time::Duration;

use common::daemons::{chain_config, request_from, Daemon, Daemons, SECRET};
use metaproxy::inventory::synth::{synth_toml, SynthSpec};
use metaproxy::inventory::Inventory;
use metaproxy::storm::VmSpec;

const ROUTER: &str = "5707ae75-0000-4000-8002-000000000000";
const TOKEN: &str = "AQAEAbogus-token-value-for-the-log-test";

struct Chain {
    _dir: tempfile::TempDir,
    to: std::net::SocketAddr,
    vms: Vec<VmSpec>,
    api_addr: std::net::SocketAddr,
    agent_socket: std::path::PathBuf,
    api: Daemon,
    agent: Daemon,
    proxy: Daemon,
}

fn chain(access_log: bool) -> Chain {
    chain_with(access_log, "")
}

/// [`chain`] with `tail` appended to the config file (it may open tables).
fn chain_with(access_log: bool, tail: &str) -> Chain {
    let dir = tempfile::tempdir().unwrap();
    let text = synth_toml(&SynthSpec {
        vms: 4,
        networks: 1,
        routers: 1,
    })
    .unwrap();
    let inv = dir.path().join("inventory.toml");
    std::fs::write(&inv, &text).unwrap();
    let vms = VmSpec::from_inventory(&Inventory::from_toml_str(&text).unwrap(), 4);
    let extra = if access_log { "access_log = true" } else { "" };
    let c = chain_config(dir.path(), &inv, ROUTER, extra);
    if access_log {
        let cfg = std::fs::read_to_string(&c.config).unwrap();
        let cfg = cfg
            .replacen("[api]\n", "[api]\naccess_log = true\n", 1)
            .replacen("[agent]\n", "[agent]\naccess_log = true\n", 1);
        std::fs::write(&c.config, cfg).unwrap();
    }
    let cfg = std::fs::read_to_string(&c.config).unwrap();
    std::fs::write(&c.config, cfg + tail).unwrap();
    let Daemons { api, agent, proxy } = Daemons::start(&c);
    Chain {
        _dir: dir,
        to: c.proxy,
        api_addr: c.api,
        agent_socket: c.agent_socket.clone(),
        vms,
        api,
        agent,
        proxy,
    }
}

fn traffic(c: &Chain) {
    let status = |from: std::net::IpAddr, path: &str, headers: &str| {
        request_from(
            from,
            c.to,
            "GET",
            path,
            headers,
            b"",
            Duration::from_secs(5),
        )
        .unwrap()
        .status
    };
    let vm = c.vms[0].ip;
    for _ in 0..2 {
        assert_eq!(status(vm, "/openstack/latest/meta_data.json", ""), 200);
    }
    // A token the proxy cannot have issued: refused, and never logged.
    let token = format!("X-aws-ec2-metadata-token: {TOKEN}\r\n");
    assert_eq!(status(vm, "/latest/meta-data/", &token), 401);
    // An address no instance has.
    let stranger = "127.16.9.9".parse().unwrap();
    assert_eq!(
        status(stranger, "/openstack/latest/meta_data.json", ""),
        404
    );
    // A head that is not HTTP.
    let r = common::get(c.to, "GARBAGE\r\n\r\n").unwrap();
    assert_eq!(r.status, 400);
    // Let the daemons flush their last lines.
    std::thread::sleep(Duration::from_millis(200));
}

fn access_lines(d: &Daemon) -> Vec<String> {
    d.log_text()
        .lines()
        .filter(|l| l.contains(" ACCESS "))
        .map(str::to_string)
        .collect()
}

#[test]
fn each_daemon_logs_each_request_and_no_secret() {
    let c = chain(true);
    traffic(&c);
    let vm = &c.vms[0];
    let (proxy, agent, api) = (
        access_lines(&c.proxy),
        access_lines(&c.agent),
        access_lines(&c.api),
    );
    eprintln!(
        "{}\n{}\n{}",
        proxy.join("\n"),
        agent.join("\n"),
        api.join("\n")
    );

    // The proxy: every request, with its namespace and client (the test
    // harness's readiness probe, `GET /`, is a request too).
    let probes = |v: &[String]| v.iter().filter(|l| l.contains("\"GET /\" ")).count();
    assert_eq!(proxy.len() - probes(&proxy), 5, "{proxy:#?}");
    let ok = format!("{}:", vm.ip);
    assert_eq!(
        proxy
            .iter()
            .filter(
                |l| l.contains(&ok) && l.contains("\"GET /openstack/latest/meta_data.json\" 200 ")
            )
            .count(),
        2,
        "{proxy:#?}"
    );
    assert!(proxy
        .iter()
        .any(|l| l.contains("\"GET /latest/meta-data/\" 401 ")));
    assert!(proxy.iter().any(|l| l.contains("127.16.9.9:")
        && l.contains("\"GET /openstack/latest/meta_data.json\" 404 ")));
    assert!(
        proxy.iter().any(|l| l.contains("\"- -\" 400 ")),
        "{proxy:#?}"
    );

    // The agent: who, through what, resolved to which instance.
    let resolved = format!(
        "{} via router {ROUTER} -> instance {} project ",
        vm.ip, vm.uuid
    );
    let first = agent
        .iter()
        .position(|l| l.contains(&resolved))
        .expect("resolution logged");
    assert!(agent[first].contains("(looked up)"), "{}", agent[first]);
    assert!(agent[first + 1..]
        .iter()
        .any(|l| l.contains(&resolved) && l.contains("(cached)")));
    assert!(agent.iter().any(|l| l.starts_with("metaproxy ACCESS")
        && l.contains("127.16.9.9 via router")
        && l.contains("no instance")
        && l.contains(" 404 ")));

    // The API: which instance asked for what.
    assert_eq!(
        api.iter()
            .filter(|l| l.contains(&format!(
                "as {} \"GET /openstack/latest/meta_data.json\" 200",
                vm.uuid
            )))
            .count(),
        2,
        "{api:#?}"
    );

    for log in [c.proxy.log_text(), c.agent.log_text(), c.api.log_text()] {
        assert!(!log.contains(TOKEN), "a token reached a log");
        assert!(!log.contains(SECRET), "the shared secret reached a log");
        assert!(!log.to_ascii_lowercase().contains("signature:"));
    }
}

#[test]
fn off_by_default() {
    let c = chain(false);
    traffic(&c);
    for d in [&c.proxy, &c.agent, &c.api] {
        assert!(access_lines(d).is_empty(), "{}", d.log_text());
    }
}

/// `POST` with `Content-Length: 10`, 2 bytes of body, then silence: the
/// daemon's `client` timeout answers 408 (it used to lose the read buffer on
/// the timeout and panic writing the access line).
fn body_timeout(mut s: impl std::io::Read + std::io::Write) -> u16 {
    s.write_all(
        b"POST /openstack/latest/password HTTP/1.1\r\nHost: m\r\nContent-Length: 10\r\n\r\nab",
    )
    .unwrap();
    let mut r = std::io::BufReader::new(s);
    common::read_response(&mut r, false).map_or(0, |r| r.status)
}

#[test]
fn body_timeout_is_408_with_access_log_on_in_each_daemon() {
    let c = chain_with(
        true,
        "\n[api.timeouts]\nclient = \"1s\"\n[agent.timeouts]\nclient = \"1s\"\n",
    );
    let wait = Duration::from_secs(10);
    let tcp = |to| {
        let s = std::net::TcpStream::connect(to).unwrap();
        s.set_read_timeout(Some(wait)).unwrap();
        s
    };
    assert_eq!(body_timeout(tcp(c.to)), 408, "proxy");
    assert_eq!(body_timeout(tcp(c.api_addr)), 408, "api");
    let agent = std::os::unix::net::UnixStream::connect(&c.agent_socket).unwrap();
    agent.set_read_timeout(Some(wait)).unwrap();
    assert_eq!(body_timeout(agent), 408, "agent");
    // No log said `panicked`: `Daemon`'s drop checks that.
}
