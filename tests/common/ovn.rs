//! Fixtures the OVN integration tests share: this chassis' Open_vSwitch
//! database with its integration bridge, `metaproxy api` on an inventory,
//! the `metaproxy ovn` config the namespace tests run, the test's network
//! namespaces, and `metaproxy ovn-dump-replica`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::netns::{Daemon, SECRET};
use super::ovsdb::Server;

/// The network namespaces in `/run/netns` whose name starts with `prefix`.
pub fn namespaces(prefix: &str) -> BTreeSet<String> {
    std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// The Open_vSwitch database of chassis `chassis`, with its integration
/// bridge `br-int`.
pub fn vswitch_with_br_int(chassis: &str) -> Server {
    let ovs = Server::vswitch(chassis, None);
    ovs.transact(json!([
        {"op": "insert", "table": "Bridge", "uuid-name": "b", "row": {"name": "br-int"}},
        {"op": "mutate", "table": "Open_vSwitch", "where": [],
         "mutations": [["bridges", "insert", ["set", [["named-uuid", "b"]]]]]}
    ]));
    ovs
}

/// `metaproxy api` serving the inventory `inv` on an ephemeral loopback
/// port, with its config (`api.toml`) and state under `dir`.
pub fn start_api(dir: &Path, inv: &Path) -> Daemon {
    let api_cfg = dir.join("api.toml");
    std::fs::write(
        &api_cfg,
        format!(
            "[api]\nlisten = \"127.0.0.1:0\"\nmetadata_proxy_shared_secret = \"{SECRET}\"\n\
             inventory = \"{}\"\nstate_dir = \"{}\"\n",
            inv.display(),
            dir.join("state").display()
        ),
    )
    .unwrap();
    Daemon::start("api", &["api", "--config", api_cfg.to_str().unwrap()], dir)
}

/// The port `api` (from [`start_api`]) says in its log it listens on.
pub fn api_port(api: &Daemon) -> u16 {
    api.log_text()
        .lines()
        .find_map(super::bound_addr)
        .expect("api listener up")
        .port()
}

/// Which network namespaces the `metaproxy ovn` of [`write_ovn_config`]
/// serves.
pub enum Netns<'a> {
    /// It discovers and adopts the namespaces named `prefix…`
    /// (`[proxy.discover] ovn_prefixes`).
    Discover(&'a str),
    /// It keeps its namespaces in this directory (`[proxy] netns_dir`).
    Dir(&'a Path),
}

/// Writes `dir/ovn.toml`: `metaproxy ovn` on `sb` and `ovs`, sending to
/// the API on `api_port`, one worker, its control socket `dir/ctl.sock`,
/// serving the namespaces `netns` says. Returns the path.
pub fn write_ovn_config(
    dir: &Path,
    sb: &Server,
    ovs: &Server,
    api_port: u16,
    netns: Netns,
) -> PathBuf {
    let (netns_dir, discover) = match netns {
        Netns::Discover(prefix) => (
            String::new(),
            format!("[proxy.discover]\novn_prefixes = [\"{prefix}\"]\n"),
        ),
        Netns::Dir(path) => (
            format!("netns_dir = \"{}\"\n", path.display()),
            String::new(),
        ),
    };
    let cfg = dir.join("ovn.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[ovn]
ovn_sb_connection = "{sb}"
metadata_proxy_shared_secret = "{SECRET}"
[ovn.ovs]
ovsdb_connection = "{ovs}"
[ovn.nova]
nova_metadata_host = "127.0.0.1"
nova_metadata_port = {api_port}

[proxy]
workers = 1
{netns_dir}control_socket = "{ctl}"
{discover}"#,
            sb = sb.remote(),
            ovs = ovs.remote(),
            ctl = dir.join("ctl.sock").display(),
        ),
    )
    .unwrap();
    cfg
}

/// `metaproxy ovn-dump-replica` on `sb` and `ovs`: a fresh replica's
/// tables and index, as JSON. Fails the test if the command fails.
pub fn dump_replica(sb: &Server, ovs: &Server) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_metaproxy"))
        .args([
            "ovn-dump-replica",
            "--ovn-sb-connection",
            &sb.remote(),
            "--ovsdb-connection",
            &ovs.remote(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Polls `ready` every 50 ms until `limit`; on timeout, fails with `what`
/// and the daemon's log.
pub fn poll_daemon(d: &Daemon, limit: Duration, what: &str, mut ready: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ready() {
        assert!(
            t0.elapsed() < limit,
            "not within {limit:?}: {what}; log:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Initialises `sb` with the chassis `chassis` (geneve, 192.0.2.1) and
/// its `Chassis_Private` row, as ovn-controller leaves them. Returns the
/// `Chassis` row's UUID.
pub fn init_chassis(sb: &Server, chassis: &str) -> String {
    sb.sbctl(&["init"]);
    sb.sbctl(&["chassis-add", chassis, "geneve", "192.0.2.1"]);
    let uuid = sb
        .sbctl(&[
            "--bare",
            "--columns=_uuid",
            "find",
            "Chassis",
            &format!("name={chassis}"),
        ])
        .trim()
        .to_string();
    sb.transact(json!([{"op": "insert", "table": "Chassis_Private",
        "row": {"name": chassis, "chassis": ["uuid", uuid.as_str()]}}]));
    uuid
}

/// Gives the VM in namespace `vm` the host route Neutron's DHCP gives for
/// the metadata address: 169.254.169.254/32 via `md_ip`, the metadata port.
pub fn route_metadata_via(vm: &str, md_ip: &str) {
    super::netns::sh(&[
        "ip",
        "-n",
        vm,
        "route",
        "add",
        "169.254.169.254/32",
        "via",
        md_ip,
    ]);
}

/// The UUID of the row the first operation of an OVSDB `transact` result
/// inserted.
pub fn uuid_of(result: &Value) -> String {
    result[0]["uuid"][1]
        .as_str()
        .expect("insert uuid")
        .to_string()
}
