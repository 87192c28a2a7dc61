//! Every configuration file the project ships is accepted by the daemon that
//! reads it (`--check` validates exactly as start-up does). A key renamed in
//! the code but not in `deploy/` would otherwise surface only on an
//! operator's node, as a daemon that refuses to start.

mod common;

use std::path::Path;
use std::process::Command;

fn check(kind: &str, config: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_metaproxy"))
        .args([kind, "--check", "--config"])
        .arg(config)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "metaproxy {kind} --check --config {}:\n{}{}",
        config.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_embedded_default_config_is_valid_for_all_three() {
    for kind in ["api", "agent", "proxy", "up"] {
        check(kind, Path::new("config.toml"));
    }
}

#[test]
fn the_network_node_example_is_valid() {
    for kind in ["agent", "proxy"] {
        check(kind, Path::new("deploy/network-node.toml"));
    }
}

#[test]
fn the_ovn_compute_node_example_is_valid() {
    for kind in ["ovn", "ovn-dump-replica"] {
        check(kind, Path::new("deploy/compute-node-ovn.toml"));
    }
}

#[test]
fn the_controller_example_is_valid() {
    // It names /etc/metaproxy/inventory.toml, which `--check` loads: point it
    // at the example inventory, change nothing else.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("deploy/controller.toml")).unwrap();
    let inv = root.join("examples/inventory.toml");
    assert!(text.contains("\"/etc/metaproxy/inventory.toml\""));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("controller.toml");
    std::fs::write(
        &cfg,
        text.replace(
            "\"/etc/metaproxy/inventory.toml\"",
            &format!("\"{}\"", inv.display()),
        ),
    )
    .unwrap();
    check("api", &cfg);
}

#[test]
fn a_bad_key_is_refused_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[proxy]\nagent_sockett = \"/tmp/x\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_metaproxy"))
        .args(["proxy", "--check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("agent_sockett"), "{err}");
}

#[test]
fn up_check_refuses_a_chain_that_is_not_wired_together() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("config.toml")).unwrap();
    let secret = text
        .lines()
        .find_map(|l| l.strip_prefix("metadata_proxy_shared_secret = "))
        .expect("config.toml has a shared secret");
    // The agent's copy of the secret differs from the API's: every request
    // would get 403, so `up` refuses to start, and says why.
    let first = text.find(secret).unwrap() + secret.len();
    let (head, tail) = text.split_at(first);
    let broken = format!("{head}{}", tail.replacen(secret, "\"another-secret\"", 1));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("up.toml");
    std::fs::write(
        &cfg,
        broken.replace("examples/", &format!("{}/examples/", root.display())),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_metaproxy"))
        .args(["up", "--check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("metadata_proxy_shared_secret"), "{err}");
    assert!(
        !err.contains("another-secret"),
        "a secret reached the log: {err}"
    );
}

/// `config.toml` with both shared secrets empty: accepted (Nova and Neutron
/// accept it, refusing would break drop-in), but `--check` flags it for each
/// daemon that has the key, and each warns at start.
#[test]
fn an_empty_shared_secret_is_flagged_by_check_and_at_start() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("config.toml")).unwrap();
    let secret = text
        .lines()
        .find_map(|l| l.strip_prefix("metadata_proxy_shared_secret = "))
        .expect("config.toml has a shared secret");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("empty.toml");
    std::fs::write(
        &cfg,
        text.replace(secret, "\"\"")
            .replace("examples/", &format!("{}/examples/", root.display())),
    )
    .unwrap();
    let check_out = |kind: &str, config: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_metaproxy"))
            .args([kind, "--check", "--config"])
            .arg(config)
            .output()
            .unwrap();
        assert!(out.status.success(), "{kind}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let api = "warning: api.metadata_proxy_shared_secret is empty";
    let agent = "warning: agent.metadata_proxy_shared_secret is empty";
    let up = check_out("up", &cfg);
    assert!(up.contains(api) && up.contains(agent), "{up}");
    assert!(check_out("api", &cfg).contains(api));
    assert!(check_out("agent", &cfg).contains(agent));
    // The shipped secret is not flagged.
    let shipped = check_out("up", Path::new("config.toml"));
    assert!(!shipped.contains("is empty"), "{shipped}");

    // At start: each daemon with the key warns.
    let inv = root.join("examples/inventory.toml");
    let (up, _) = common::up::start_up_with(dir.path(), &inv, common::up::EXAMPLE_ROUTER, "", "");
    let log = up.start_log();
    for key in ["api", "agent"] {
        let w = format!("WARN [main] {key}.metadata_proxy_shared_secret is empty");
        assert!(log.contains(&w), "{log}");
    }
}

/// `[proxy.limits]` above what the agent accepts is reported by `up --check`
/// and `proxy --check` (which compares with the file's `[agent]` section, or
/// with the agent's defaults when the file has none, and says which).
#[test]
fn a_proxy_limit_above_the_agents_is_reported_by_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("config.toml")).unwrap();
    assert!(text.contains("max_head_bytes = 8192"));
    let dir = tempfile::tempdir().unwrap();
    let stdout = |kind: &str, cfg: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_metaproxy"))
            .args([kind, "--check", "--config"])
            .arg(cfg)
            .current_dir(root)
            .output()
            .unwrap();
        assert!(out.status.success(), "{kind}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let warning = "warning: proxy.limits.max_head_bytes = 32768 exceeds what the agent accepts";
    let big = dir.path().join("big.toml");
    std::fs::write(
        &big,
        text.replace("max_head_bytes = 8192", "max_head_bytes = 32768")
            .replace("examples/", &format!("{}/examples/", root.display())),
    )
    .unwrap();
    for kind in ["up", "proxy"] {
        let out = stdout(kind, &big);
        assert!(out.contains(warning), "{kind}: {out}");
        assert!(out.contains("[agent.limits]"), "{kind}: {out}");
    }
    // Raised in [agent.limits] too: nothing to report.
    let both = dir.path().join("both.toml");
    let big_text = std::fs::read_to_string(&big).unwrap();
    assert!(big_text.contains("max_head_bytes = 8704"));
    std::fs::write(
        &both,
        big_text.replace("max_head_bytes = 8704", "max_head_bytes = 33280"),
    )
    .unwrap();
    for kind in ["up", "proxy"] {
        assert!(!stdout(kind, &both).contains("warning:"), "{kind}");
    }
    // A proxy-only file: compared with the agent's defaults, and says so.
    let proxy_only = dir.path().join("proxy.toml");
    let proxy_text = &text[..text.find("[agent]").expect("config.toml has [agent]")];
    std::fs::write(
        &proxy_only,
        proxy_text.replace("max_head_bytes = 8192", "max_head_bytes = 32768"),
    )
    .unwrap();
    let out = stdout("proxy", &proxy_only);
    assert!(
        out.contains(warning) && out.contains("the agent's defaults"),
        "{out}"
    );
    // The shipped files report nothing.
    for kind in ["up", "proxy"] {
        let out = stdout(kind, Path::new("config.toml"));
        assert!(!out.contains("warning:"), "{kind}: {out}");
    }
}

/// `up` (and `up --check`) refuses a chain in which every guest would be
/// served as one instance, naming the key: `[api] service_metadata_proxy =
/// false` (the API's TCP peer is always the agent), or an agent resolving
/// from another inventory than the API serves.
#[test]
fn up_refuses_a_chain_where_identity_collapses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("config.toml")).unwrap();
    let abs = text.replace("examples/", &format!("{}/examples/", root.display()));
    assert!(abs.contains("service_metadata_proxy = true"));
    let dir = tempfile::tempdir().unwrap();
    let refused = |name: &str, cfg_text: String, key: &str| {
        let cfg = dir.path().join(name);
        std::fs::write(&cfg, cfg_text).unwrap();
        for args in [&["up", "--check"][..], &["up"]] {
            let mut child = Command::new(env!("CARGO_BIN_EXE_metaproxy"))
                .args(args)
                .arg("--config")
                .arg(&cfg)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            // A refusal exits at once; an accepted `up` would serve forever.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            let status = loop {
                if let Some(st) = child.try_wait().unwrap() {
                    break st;
                }
                if std::time::Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("{args:?} {name}: accepted and serving");
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            };
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            assert!(!status.success(), "{args:?} {name} accepted: {err}");
            assert!(err.contains(key), "{args:?} {name}: {err}");
        }
    };
    refused(
        "direct.toml",
        abs.replace(
            "service_metadata_proxy = true",
            "service_metadata_proxy = false",
        ),
        "api.service_metadata_proxy",
    );
    // The agent's copy of the inventory is another file (same content today).
    let copy = dir.path().join("agent-inventory.toml");
    std::fs::copy(root.join("examples/inventory.toml"), &copy).unwrap();
    let inv_line = format!("inventory = \"{}/examples/inventory.toml\"", root.display());
    let agent_at = abs.find("[agent]").unwrap();
    let (head, tail) = abs.split_at(agent_at);
    let other = format!(
        "{head}{}",
        tail.replacen(&inv_line, &format!("inventory = \"{}\"", copy.display()), 1)
    );
    assert_ne!(other, abs);
    refused("two-inventories.toml", other, "agent.inventory");
    // The standalone API may identify guests by peer (Nova's direct mode).
    let direct = dir.path().join("direct.toml");
    check("api", &direct);
}

#[test]
fn the_nova_controller_example_parses_and_hides_its_passwords() {
    // Its databases are on "controller": `--check` gets past the config and
    // fails connecting, naming the database without the password. Neutron's
    // and Keystone's URLs are resolved while the config is read: point them
    // at loopback, change nothing else.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("deploy/controller-nova.toml")).unwrap();
    assert!(text.contains("\"http://controller:9696\""));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("controller-nova.toml");
    std::fs::write(
        &cfg,
        text.replace("http://controller:", "http://127.0.0.1:"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_metaproxy"))
        .args(["api", "--check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("api.nova.connection mysql://nova:***@controller:3306/nova"),
        "{text}"
    );
    assert!(
        !text.contains("NOVA_DBPASS") && !text.contains("NOVA_PASS"),
        "{text}"
    );
}
