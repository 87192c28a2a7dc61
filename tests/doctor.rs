//! `metaproxy doctor`, the real binary, against the namespace topology of
//! `common::netns` (our api, agent and proxy as processes; the router
//! namespace served on 0.0.0.0:9697 behind an nft REDIRECT, as on an
//! ML2/OVS node) and against a fake Keystone + Neutron. Each check is seen
//! passing and failing: the REDIRECT and INPUT rules removed, a mismatched
//! secret, a stopped agent, a namespace without a listener, a wrong Neutron
//! password, an unreachable API, a dead agent in Neutron's list and a low fd
//! limit. The exit status is 1 exactly when some line is FAIL.

mod common;

use std::path::Path;
use std::process::Command;

use common::netns::{self, Backend, Daemon, Namespaces, Topology};

/// `metaproxy doctor --config cfg args…`: (exit code, stdout).
fn doctor(cfg: &Path, args: &[&str]) -> (i32, String) {
    doctor_cmd(
        &mut Command::new(env!("CARGO_BIN_EXE_metaproxy")),
        cfg,
        args,
    )
}

fn doctor_cmd(cmd: &mut Command, cfg: &Path, args: &[&str]) -> (i32, String) {
    let out = cmd
        .args(["--log-level", "warn", "doctor", "--config"])
        .arg(cfg)
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    eprintln!(
        "doctor {args:?}:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// The one line whose check is `name` (the text before the first ": ").
fn line<'a>(report: &'a str, name: &str) -> &'a str {
    let found: Vec<&str> = report
        .lines()
        .filter(|l| l.get(5..).and_then(|r| r.split_once(": ")).map(|(n, _)| n) == Some(name))
        .collect();
    assert_eq!(found.len(), 1, "one `{name}` line in:\n{report}");
    found[0]
}

fn assert_status(report: &str, name: &str, status: &str) {
    let l = line(report, name);
    assert!(
        l.starts_with(&format!("{status:<4} ")),
        "`{name}` is not {status}:\n{report}"
    );
}

fn skip(why: &str) -> bool {
    eprintln!("SKIPPED doctor: {why}");
    true
}

fn nft(ns: &str, rules: &str) {
    let out = netns::in_ns(ns, "nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn();
    let mut child = out.unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "nft in {ns}: {rules}");
}

/// The L3 agent's mangle MARK of metadata traffic (which stays after the
/// cut-over), in nft syntax.
fn add_mark_rule(ns: &str) {
    nft(
        ns,
        r#"table ip mangle {
  chain PREROUTING {
    type filter hook prerouting priority mangle; policy accept;
    ip daddr 169.254.169.254 iifname "qr-*" tcp dport 80 meta mark set 0x1
  }
}
"#,
    );
}

/// Neutron's two router rules in nft syntax (what iptables-nft writes).
fn add_router_rules(ns: &str) {
    nft(
        ns,
        r#"table ip nat {
  chain PREROUTING {
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr 169.254.169.254 iifname "qr-*" tcp dport 80 redirect to :9697
  }
}
table ip filter {
  chain INPUT {
    type filter hook input priority filter; policy accept;
    tcp dport 9697 meta mark and 0x0000ffff != 0x00000001 drop
  }
}
"#,
    );
}

/// The proxy's section: the router namespace on 9697 (behind the
/// REDIRECT), the DHCP namespace on 169.254.169.254:80, as Neutron has them.
fn proxy_section(topo: &Topology, sock: &Path, dir: &Path, extra_ns: &str) -> String {
    format!(
        r#"
[proxy]
workers = 1
agent_socket = "{sock}"
control_socket = "{ctl}"

[[proxy.namespace]]
netns = "{rns}"
router_id = "{r}"
listen = "0.0.0.0:9697"

[[proxy.namespace]]
netns = "{dns}"
network_id = "{n}"
listen = "169.254.169.254:80"
{extra_ns}"#,
        sock = sock.display(),
        ctl = dir.join("ctl.sock").display(),
        rns = topo.router_ns,
        r = topo.router_id,
        dns = topo.dhcp_ns,
        n = topo.isolated_net,
    )
}

#[test]
fn doctor_in_the_netns_topology() {
    if let Err(why) = netns::can_run(&["nft"]) {
        if skip(&why) {
            return;
        }
    }
    let topo = Topology::build(0xd);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Backend {
        sock,
        config,
        agent,
        api: _api,
        ..
    } = Backend::start(&topo, d);
    let base = std::fs::read_to_string(&config).unwrap();
    let cfg = d.join("node.toml");
    std::fs::write(&cfg, base.clone() + &proxy_section(&topo, &sock, d, "")).unwrap();
    let _proxy = Daemon::start("proxy", &["proxy", "--config", cfg.to_str().unwrap()], d);
    add_mark_rule(&topo.router_ns);
    add_router_rules(&topo.router_ns);
    let rns = topo.router_ns.as_str();
    let vm1 = &topo.vms[0];
    // The rules are the real path: the VM gets its metadata through them.
    let (code, body) = netns::curl_in(
        &vm1.ns,
        "http://169.254.169.254/openstack/latest/meta_data.json",
        &[],
    );
    assert_eq!(code, 200, "{body}");

    // Everything passes.
    let (code, report) = doctor(&cfg, &[]);
    for name in [
        "config".to_string(),
        format!("listener {rns}"),
        format!("listener {}", topo.dhcp_ns),
        format!("redirect {rns}"),
        format!("input rule {rns}"),
        "agent socket".into(),
        "backend inventory".into(),
        "metadata API".into(),
        "shared secret".into(),
        "fd budget".into(),
        "agent registration".into(),
    ] {
        assert_status(&report, &name, "OK");
    }
    assert!(
        line(&report, "fd budget").contains("the running proxy (pid"),
        "{report}"
    );
    assert!(
        !report.contains(netns::SECRET),
        "the secret is printed:\n{report}"
    );
    assert_eq!(code, 0, "{report}");

    // One request as vm1, through the router namespace.
    let ip = vm1.ip;
    let (code, report) = doctor(&cfg, &["--namespace", rns, "--vm", ip]);
    assert_status(&report, &format!("vm {ip} listener"), "OK");
    assert_status(&report, &format!("vm {ip} agent"), "OK");
    assert_status(&report, &format!("vm {ip} api"), "OK");
    assert!(
        line(&report, &format!("vm {ip} agent")).contains(&vm1.uuid),
        "{report}"
    );
    assert!(
        !report.contains(&topo.dhcp_ns),
        "--namespace checks only that one:\n{report}"
    );
    assert_eq!(code, 0, "{report}");
    // And as vm3, through the DHCP namespace (listener on 169.254.169.254:80).
    let vm3 = &topo.vms[2];
    let (code, report) = doctor(&cfg, &["--namespace", &topo.dhcp_ns, "--vm", vm3.ip]);
    assert_status(&report, &format!("vm {} listener", vm3.ip), "OK");
    assert!(
        line(&report, &format!("vm {} agent", vm3.ip)).contains(&vm3.uuid),
        "{report}"
    );
    assert_status(&report, &format!("vm {} api", vm3.ip), "OK");
    assert_eq!(code, 0, "{report}");
    // An address no VM has: the agent hop fails and says so.
    let (code, report) = doctor(&cfg, &["--namespace", rns, "--vm", "10.90.0.99"]);
    assert_status(&report, "vm 10.90.0.99 agent", "FAIL");
    assert_eq!(code, 1);

    // A namespace this config does not serve.
    let (code, report) = doctor(&cfg, &["--namespace", "qrouter-nope"]);
    assert_status(&report, "namespace qrouter-nope", "FAIL");
    assert_eq!(code, 1, "{report}");

    // --json: the same checks as objects.
    let (code, json) = doctor(&cfg, &["--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let secret = v
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "shared secret")
        .unwrap();
    assert_eq!(secret["status"], "OK", "{json}");
    assert!(
        secret["detail"].is_string() && secret["hint"].is_string(),
        "{json}"
    );

    // The REDIRECT and the INPUT rule removed.
    nft(rns, "delete table ip nat\ndelete table ip filter\n");
    let (code, report) = doctor(&cfg, &[]);
    assert_status(&report, &format!("redirect {rns}"), "FAIL");
    assert_status(&report, &format!("input rule {rns}"), "FAIL");
    assert!(
        line(&report, &format!("redirect {rns}")).contains("--to-ports 9697"),
        "{report}"
    );
    assert_eq!(code, 1, "{report}");
    // A DROP of 9697 that does not spare the marked, redirected traffic.
    add_router_rules(rns);
    nft(
        rns,
        "flush chain ip filter INPUT\nadd rule ip filter INPUT tcp dport 9697 drop\n",
    );
    let (code, report) = doctor(&cfg, &[]);
    assert_status(&report, &format!("redirect {rns}"), "OK");
    assert_status(&report, &format!("input rule {rns}"), "FAIL");
    assert!(
        line(&report, &format!("input rule {rns}")).contains("before redirected"),
        "{report}"
    );
    assert_eq!(code, 1, "{report}");
    nft(rns, "delete table ip nat\ndelete table ip filter\n");
    add_router_rules(rns);

    // A namespace no proxy listens in.
    let mut extra = Namespaces::default();
    let lonely = format!(
        "qrouter-d0c70000-0000-4000-8000-{:012x}",
        std::process::id()
    );
    extra.add(&lonely);
    let more = d.join("more.toml");
    let ns = format!(
        "\n[[proxy.namespace]]\nnetns = \"{lonely}\"\nrouter_id = \"{}\"\nlisten = \"0.0.0.0:9697\"\n",
        &lonely["qrouter-".len()..]
    );
    std::fs::write(&more, base.clone() + &proxy_section(&topo, &sock, d, &ns)).unwrap();
    let (code, report) = doctor(&more, &[]);
    assert_status(&report, &format!("listener {lonely}"), "FAIL");
    assert_status(&report, &format!("listener {rns}"), "OK");
    assert_eq!(code, 1, "{report}");

    // The same namespace found by discovery (a netns directory of its own,
    // so that other tests' namespaces stay out of it) rather than configured.
    let ns_dir = d.join("netns");
    std::fs::create_dir(&ns_dir).unwrap();
    std::os::unix::fs::symlink(format!("/run/netns/{lonely}"), ns_dir.join(&lonely)).unwrap();
    std::os::unix::fs::symlink(format!("/run/netns/{}", vm1.ns), ns_dir.join(&vm1.ns)).unwrap();
    let discovered = d.join("discovered.toml");
    let section = proxy_section(&topo, &sock, d, "\n[proxy.discover]\nenabled = true\n")
        .replace("netns = \"", "netns = \"/run/netns/")
        .replace(
            "workers = 1\n",
            &format!("workers = 1\nnetns_dir = \"{}\"\n", ns_dir.display()),
        );
    std::fs::write(&discovered, base.clone() + &section).unwrap();
    let (code, report) = doctor(&discovered, &[]);
    assert!(line(&report, "config").contains("discovery on"), "{report}");
    assert_status(&report, &format!("listener {lonely}"), "FAIL");
    assert_status(&report, &format!("listener /run/netns/{rns}"), "OK");
    assert!(
        !report.contains(&format!("listener {}", vm1.ns)),
        "not a Neutron name:\n{report}"
    );
    assert_eq!(code, 1, "{report}");

    // The agent's secret differs from the API's.
    let wrong = d.join("wrong-secret.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let agent_at = text.find("[agent]").unwrap();
    let (api_part, agent_part) = text.split_at(agent_at);
    std::fs::write(
        &wrong,
        format!(
            "{api_part}{}",
            agent_part.replacen(netns::SECRET, "not-the-api-secret", 1)
        ),
    )
    .unwrap();
    let (code, report) = doctor(&wrong, &[]);
    assert_status(&report, "shared secret", "FAIL");
    assert_status(&report, "metadata API", "OK");
    assert!(!report.contains("not-the-api-secret"), "{report}");
    assert_eq!(code, 1, "{report}");

    // The agent stopped.
    drop(agent);
    let (code, report) = doctor(&cfg, &[]);
    assert_status(&report, "agent socket", "FAIL");
    assert_eq!(code, 1, "{report}");
    // The proxy answers the VM's hop with its 503 now.
    let (_, report) = doctor(&cfg, &["--namespace", rns, "--vm", ip]);
    assert_status(&report, &format!("vm {ip} listener"), "FAIL");
    assert_status(&report, &format!("vm {ip} agent"), "FAIL");
}

/// A config with only `[proxy]`, its namespaces in the doctor's own
/// namespace: the fd budget against `ulimit -n`.
#[test]
fn fd_budget_against_the_fd_limit() {
    if !common::netns::have("sh") && skip("no sh") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("fd.toml");
    let mut text = "[proxy]\nworkers = 8\nmax_connections = 1000\n".to_string();
    for port in 1..=3 {
        text += &format!(
            "[[proxy.namespace]]\nrouter_id = \"fd000000-0000-4000-8000-00000000000{port}\"\nlisten = \"127.0.0.1:{port}\"\n"
        );
    }
    std::fs::write(&cfg, text).unwrap();
    let run = |limit: u32| {
        let mut sh = Command::new("sh");
        sh.args([
            "-c",
            &format!("ulimit -n {limit} && exec \"$0\" \"$@\""),
            env!("CARGO_BIN_EXE_metaproxy"),
        ]);
        doctor_cmd(&mut sh, &cfg, &[])
    };
    // 40 fds: 20 kept out of the budget, but 8 loops x 3 listeners need 24.
    let (code, report) = run(40);
    assert_status(&report, "fd budget", "FAIL");
    assert_eq!(code, 1);
    // 400: 336 connections, 112 per namespace.
    let (_, report) = run(400);
    assert_status(&report, "fd budget", "OK");
    // 200: 136 over 3 namespaces is 45 each, below 64.
    let (_, report) = run(200);
    assert_status(&report, "fd budget", "WARN");
}

/// `[agent]` with backend neutron against a fake Keystone + Neutron.
#[test]
#[cfg(feature = "amqp-report")]
fn neutron_credentials_registration_and_an_unreachable_api() {
    let neutron = common::neutron::FakeKeystoneNeutron::start("pw", Vec::new());
    let dir = tempfile::tempdir().unwrap();
    let dead_api = common::free_port();
    let config = |password: &str| {
        let cfg = dir.path().join(format!("agent-{}.toml", password.len()));
        std::fs::write(
            &cfg,
            format!(
                r#"
[agent]
socket = "{sock}"
backend = "neutron"
metadata_proxy_shared_secret = "s"
transport_url = "rabbit://guest:guest@127.0.0.1:1/"
host = "net-7"
[agent.nova]
nova_metadata_host = "127.0.0.1"
nova_metadata_port = {dead_api}
[agent.neutron]
url = "http://{n}"
timeout = "2s"
auth_strategy = "keystone"
auth_url = "http://{n}/v3"
username = "metaproxy"
password = "{password}"
project_name = "service"
"#,
                sock = dir.path().join("agent.sock").display(),
                n = neutron.addr,
            ),
        )
        .unwrap();
        cfg
    };
    let good = config("pw");
    neutron.set_agents(
        serde_json::json!([{"agent_type": "Metadata agent", "host": "net-7",
        "alive": true, "heartbeat_timestamp": "2026-12-02 03:00:00"}]),
    );
    let (code, report) = doctor(&good, &[]);
    assert_status(&report, "neutron", "OK");
    assert_status(&report, "agent registration", "OK");
    // Nothing answers on the API's port, and no agent on the socket.
    assert_status(&report, "metadata API", "FAIL");
    assert_status(&report, "shared secret", "WARN");
    assert_status(&report, "agent socket", "FAIL");
    assert_eq!(code, 1);

    neutron.set_agents(
        serde_json::json!([{"agent_type": "Metadata agent", "host": "net-7",
        "alive": false, "heartbeat_timestamp": "2026-12-01 03:00:00"}]),
    );
    let (_, report) = doctor(&good, &[]);
    assert_status(&report, "agent registration", "FAIL");
    assert!(
        line(&report, "agent registration").contains("down"),
        "{report}"
    );
    // No row: unregistered, or hidden from a non-admin user by policy.
    neutron.set_agents(serde_json::json!([]));
    let (_, report) = doctor(&good, &[]);
    assert_status(&report, "agent registration", "WARN");

    let (code, report) = doctor(&config("wr0ng-pw"), &[]);
    assert_status(&report, "neutron", "FAIL");
    assert!(
        line(&report, "neutron").contains("Keystone refused"),
        "{report}"
    );
    assert!(
        !report.contains("wr0ng-pw"),
        "the password is printed:\n{report}"
    );
    assert_eq!(code, 1);
}
