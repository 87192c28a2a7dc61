//! The shipped `deploy/systemd/metaproxy-ovn.service`, run as systemd
//! would run it (no systemd here or in CI, so its settings are replayed, as
//! `scripts/package-check.sh` does for the proxy unit): `ExecStart=` with
//! the unit's user (root: no `User=`), `CapabilityBoundingSet=`,
//! `NoNewPrivileges=`, `UMask=` and `RuntimeDirectory=`, applied with
//! setpriv, against real Debian Southbound and Open_vSwitch `ovsdb-server`s.
//! It must provision an `ovnmeta-` namespace the HOST sees (in /run/netns,
//! with its addresses) and serve a VM its own instance through it: the
//! capability set is enough for `ip netns add`, veths, addresses and the
//! port-80 listener.
//!
//! And the unit must give the daemon no mount namespace of its own: `ip
//! netns add` bind-mounts each namespace on /run/netns/<name>, and in a
//! systemd mount namespace (a slave of the host's) that mount would never
//! reach the host. So none of the options that imply one may be set.
//!
//! Without root, `ip`, `curl`, `setpriv`, cloud-init or the OVN packages:
//! `SKIPPED`.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use common::netns::{can_run, in_ns, sh, Daemon, Namespaces, SECRET};
use common::ovn::{
    api_port, init_chassis, poll_daemon, route_metadata_via, start_api, vswitch_with_br_int,
};
use common::ovsdb::{available, Kind, Server};
use metaproxy::ovn::provision::veth_names;
use serde_json::{json, Value};

const UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/systemd/metaproxy-ovn.service"
);
const CHASSIS: &str = "compute-unit";
const LIMIT: Duration = Duration::from_secs(20);

/// Every `KEY=value` of the unit's `[Service]` section, in order.
fn service_keys(text: &str) -> Vec<(String, String)> {
    let mut section = "";
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
        } else if section == "[Service]" && !line.starts_with('#') {
            if let Some((k, v)) = line.split_once('=') {
                out.push((k.to_string(), v.to_string()));
            }
        }
    }
    out
}

/// The last value of `key` (later assignments win, as in systemd).
fn last<'a>(keys: &'a [(String, String)], key: &str) -> Option<&'a str> {
    keys.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// systemd options that give the unit its own mount namespace
/// (systemd.exec(5): "implies a new mount namespace" / "file system
/// namespacing").
const MOUNT_NAMESPACE_OPTIONS: &[&str] = &[
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateDevices",
    "PrivateMounts",
    "PrivateNetwork",
    "PrivateUsers",
    "PrivateIPC",
    "ReadWritePaths",
    "ReadOnlyPaths",
    "InaccessiblePaths",
    "ExecPaths",
    "NoExecPaths",
    "TemporaryFileSystem",
    "BindPaths",
    "BindReadOnlyPaths",
    "RootDirectory",
    "RootImage",
    "MountAPIVFS",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectProc",
    "ProcSubset",
    "ProtectHostname",
    "MountFlags",
    "DynamicUser",
    "StateDirectory",
    "CacheDirectory",
    "LogsDirectory",
    "ConfigurationDirectory",
];

#[test]
fn the_ovn_unit_has_no_mount_namespace_and_runs_as_root_with_three_capabilities() {
    let text = std::fs::read_to_string(UNIT).unwrap();
    let keys = service_keys(&text);
    for (k, v) in &keys {
        assert!(
            !MOUNT_NAMESPACE_OPTIONS.contains(&k.as_str()),
            "{UNIT}: {k}={v} gives the unit a mount namespace; `ip netns add`'s mounts would not reach the host"
        );
    }
    assert_eq!(last(&keys, "User"), None, "root: the owner of /run/netns");
    let caps: BTreeSet<&str> = last(&keys, "CapabilityBoundingSet")
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        caps,
        BTreeSet::from(["CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"])
    );
    assert_eq!(last(&keys, "NoNewPrivileges"), Some("yes"));
    assert_eq!(
        last(&keys, "ExecStart"),
        Some("/usr/bin/metaproxy ovn --config /etc/metaproxy/metaproxy.toml")
    );
}

/// `CAP_NET_ADMIN` → the bit's number in `/proc/PID/status`'s masks.
fn cap_bit(name: &str) -> u32 {
    match name {
        "CAP_NET_BIND_SERVICE" => 10,
        "CAP_NET_ADMIN" => 12,
        "CAP_SYS_ADMIN" => 21,
        other => panic!("teach the test {other}'s number"),
    }
}

fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

fn addrs(ns: &str, dev: &str) -> BTreeSet<String> {
    let out = Command::new("ip")
        .args(["-n", ns, "-j", "addr", "show", "dev", dev])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v[0]["addr_info"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|a| format!("{}/{}", a["local"].as_str().unwrap_or(""), a["prefixlen"]))
                .collect()
        })
        .unwrap_or_default()
}

fn poll(d: &Daemon, what: &str, ready: impl FnMut() -> bool) {
    poll_daemon(d, LIMIT, what, ready);
}

/// Deletes on drop the test's namespaces, the network's veths and links.
struct Guard {
    ns: Vec<String>,
    links: Vec<String>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        for ns in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        for l in &self.links {
            let _ = Command::new("ip").args(["link", "del", l]).output();
        }
    }
}

#[test]
fn the_ovn_unit_provisions_and_serves_a_namespace_the_host_sees() {
    let name = "the_ovn_unit_provisions_and_serves_a_namespace_the_host_sees";
    if let Err(why) = can_run(&["setpriv"]) {
        eprintln!("SKIPPED {name}: {why}");
        return;
    }
    if !available(name) {
        return;
    }
    let keys = service_keys(&std::fs::read_to_string(UNIT).unwrap());
    let caps: Vec<&str> = last(&keys, "CapabilityBoundingSet")
        .unwrap()
        .split_whitespace()
        .collect();
    let exec: Vec<&str> = last(&keys, "ExecStart")
        .unwrap()
        .split_whitespace()
        .collect();
    let umask = last(&keys, "UMask").unwrap_or("0022");
    let runtime = last(&keys, "RuntimeDirectory").unwrap();
    let runtime_mode = last(&keys, "RuntimeDirectoryMode").unwrap_or("0755");

    let pid = std::process::id();
    let net = format!("0a{:06x}-5a43-4b7b-8b8b-5dcd3b1b0a01", pid & 0xff_ffff);
    let inst = format!("0a110001-0000-4000-8000-{pid:012x}");
    let project = format!("0a11{pid:028x}");
    let prefix = format!("ovnunit{pid:x}-");
    let ns = format!("{prefix}{net}");
    let [tap0, tap1] = veth_names(&net);
    let (bridge, vm_root, vm) = (
        format!("brun{pid:x}"),
        format!("vmun{pid:x}"),
        format!("mpunit{pid}vm"),
    );
    let guard = Guard {
        ns: vec![ns.clone()],
        links: vec![tap0.clone(), bridge.clone(), vm_root.clone()],
    };
    let dir = tempfile::tempdir().unwrap();

    let sb = Server::southbound(Kind::Standalone);
    let ch = init_chassis(&sb, CHASSIS);
    let dp = sb.transact(json!([{"op": "insert", "table": "Datapath_Binding",
        "row": {"tunnel_key": 1, "external_ids": ["map", [["name", format!("neutron-{net}")]]]}}]));
    let dp = dp[0]["uuid"][1].as_str().unwrap().to_string();
    sb.transact(json!([
        {"op": "insert", "table": "Port_Binding", "row": {
            "datapath": ["uuid", dp.as_str()], "logical_port": "md-port", "tunnel_key": 1,
            "type": "localport", "mac": "fa:16:3e:0a:00:02 10.79.0.2",
            "external_ids": ["map", [["neutron:cidrs", "10.79.0.2/24"],
                                      ["neutron:device_owner", "network:distributed"]]]}},
        {"op": "insert", "table": "Port_Binding", "row": {
            "datapath": ["uuid", dp.as_str()], "logical_port": "vm-port", "tunnel_key": 2,
            "type": "", "mac": "fa:16:3e:0a:00:05 10.79.0.5", "chassis": ["uuid", ch.as_str()],
            "external_ids": ["map", [["neutron:device_id", inst.as_str()],
                                      ["neutron:project_id", project.as_str()]]]}}
    ]));
    let ovs = vswitch_with_br_int(CHASSIS);

    let inv = dir.path().join("inventory.toml");
    std::fs::write(
        &inv,
        format!(
            "[[network]]\nid = \"{net}\"\nname = \"unit\"\nproject = \"{project}\"\n\
             [[network.subnet]]\nid = \"0a110000-0000-4000-8000-00000000000a\"\ncidr = \"10.79.0.0/24\"\n\n\
             [[instance]]\nuuid = \"{inst}\"\nname = \"vm-unit\"\nhostname = \"vm-unit\"\nproject = \"{project}\"\n\
             [[instance.port]]\nid = \"0a110002-0000-4000-8000-00000000000a\"\nnetwork = \"{net}\"\n\
             mac = \"fa:16:3e:0a:00:05\"\nfixed_ips = [\"10.79.0.5\"]\n"
        ),
    )
    .unwrap();
    let api = start_api(dir.path(), &inv);
    let api_port = api_port(&api);
    // The compute node's config, in the file ExecStart= names (here a temp
    // path; the daemon reads it as root, its owner).
    let cfg = dir.path().join("metaproxy.toml");
    std::fs::write(
        &cfg,
        format!(
            "[ovn]\novn_sb_connection = \"{}\"\nmetadata_proxy_shared_secret = \"{SECRET}\"\n\
             [ovn.ovs]\novsdb_connection = \"{}\"\n[ovn.nova]\nnova_metadata_host = \"127.0.0.1\"\n\
             nova_metadata_port = {api_port}\n\n[proxy]\ncontrol_socket = \"{}\"\n\
             [proxy.discover]\novn_prefixes = [\"{prefix}\"]\n",
            sb.remote(),
            ovs.remote(),
            dir.path().join("ctl.sock").display()
        ),
    )
    .unwrap();

    // What systemd does: ExecStartPre= (the "+" line, as root), the
    // RuntimeDirectory= (its path in $RUNTIME_DIRECTORY), then ExecStart=
    // with the unit's user, bounding set, no_new_privs and umask.
    for (k, v) in &keys {
        if k == "ExecStartPre" {
            let line = v.trim_start_matches(['+', '-', '@', ':', '!']);
            let argv: Vec<&str> = line.split_whitespace().collect();
            sh(&argv);
        }
    }
    let run_dir = dir.path().join(runtime);
    std::fs::create_dir(&run_dir).unwrap();
    let mode = u32::from_str_radix(runtime_mode, 8).unwrap();
    std::fs::set_permissions(
        &run_dir,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(mode),
    )
    .unwrap();
    assert_eq!(exec[0], "/usr/bin/metaproxy", "{exec:?}");
    let args: Vec<String> = exec[1..]
        .iter()
        .map(|a| {
            if *a == "/etc/metaproxy/metaproxy.toml" {
                cfg.display().to_string()
            } else {
                (*a).to_string()
            }
        })
        .collect();
    let bounding = std::iter::once("-all".to_string())
        .chain(
            caps.iter()
                .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase())),
        )
        .collect::<Vec<_>>()
        .join(",");
    let mut setpriv = Command::new("sh");
    setpriv
        .args([
            "-c",
            &format!("umask {umask} && exec \"$@\""),
            "sh",
            "setpriv",
        ])
        .args(["--bounding-set", &bounding, "--inh-caps", "-all"]);
    if last(&keys, "NoNewPrivileges") == Some("yes") {
        setpriv.arg("--no-new-privs");
    }
    setpriv
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_metaproxy"))
        .args(&args)
        .env("RUNTIME_DIRECTORY", &run_dir);
    let ovn = Daemon::start_cmd("ovn-unit", &mut setpriv, dir.path());

    // The namespace, as the host sees it, with its addresses (and the
    // kernel's own link-local).
    let want = BTreeSet::from(["169.254.169.254/32".to_string(), "10.79.0.2/24".to_string()]);
    poll(&ovn, "namespace provisioned, seen from the host", || {
        std::path::Path::new("/run/netns").join(&ns).exists()
            && addrs(&ns, &tap1).is_superset(&want)
    });
    // The process is the unit's: exactly the bounding set, no_new_privs.
    let pid_ovn = {
        let out = Command::new("pgrep")
            .args(["-f", &format!("ovn --config {}", cfg.display())])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<u32>().ok())
            .expect("the daemon's pid")
    };
    let mask: u64 = caps.iter().map(|c| 1u64 << cap_bit(c)).sum();
    assert_eq!(status_field(pid_ovn, "CapEff"), format!("{mask:016x}"));
    assert_eq!(status_field(pid_ovn, "CapBnd"), format!("{mask:016x}"));
    assert_eq!(status_field(pid_ovn, "NoNewPrivs"), "1");

    // A VM through the provisioned namespace gets its own instance.
    let mut nss = Namespaces::default();
    nss.add(&vm);
    sh(&["ip", "link", "add", &bridge, "type", "bridge"]);
    sh(&[
        "ip", "link", "add", &vm_root, "type", "veth", "peer", "name", "eth0", "netns", &vm,
    ]);
    for dev in [&vm_root, &tap0] {
        sh(&["ip", "link", "set", dev, "master", &bridge]);
    }
    for dev in [&bridge, &vm_root] {
        sh(&["ip", "link", "set", dev, "up"]);
    }
    sh(&[
        "ip",
        "-n",
        &vm,
        "addr",
        "add",
        "10.79.0.5/24",
        "dev",
        "eth0",
    ]);
    sh(&["ip", "-n", &vm, "link", "set", "eth0", "up"]);
    route_metadata_via(&vm, "10.79.0.2");
    let mut body = String::new();
    poll(&ovn, "the VM's meta_data.json", || {
        let out = in_ns(&vm, "curl")
            .args([
                "-sf",
                "--max-time",
                "5",
                "http://169.254.169.254/openstack/latest/meta_data.json",
            ])
            .output()
            .unwrap();
        body = String::from_utf8_lossy(&out.stdout).into_owned();
        out.status.success()
    });
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["uuid"], inst.as_str(), "{body}");
    let log = ovn.log_text();
    assert!(!log.contains("provisioning failed"), "{log}");
    drop(ovn);
    drop(nss);
    drop(api);
    drop(guard);
}
