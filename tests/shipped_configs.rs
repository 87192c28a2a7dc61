//! Every configuration file the project ships is accepted by the daemon that
//! reads it (`--check` validates exactly as start-up does). A key renamed in
//! the code but not in `deploy/` would otherwise surface only on an
//! operator's node, as a daemon that refuses to start.

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
    for kind in ["api", "agent", "proxy"] {
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
