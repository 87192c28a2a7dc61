//! Real clients: Debian's cloud-init reads `metaproxy up` with its own code.
//!
//! `tests/cloudinit/read_metadata.py` runs under Debian's `/usr/bin/python3`
//! (the `cloud-init` package; a pyenv `python3` earlier on PATH does not have
//! `cloudinit`) and calls cloud-init's readers directly, so nothing touches the
//! host's own cloud-init configuration:
//! `cloudinit.sources.helpers.openstack.MetadataReader(base).read_v2()` (which
//! also crawls EC2 `latest`), then `ec2.get_instance_metadata` and
//! `ec2.get_instance_userdata` with `api_version = "2009-04-04"`. The script
//! binds every connection to a loopback source address, so it is read once as
//! the demo VM (127.0.0.1) and once as demo2 (127.0.0.2), and each must get its
//! own instance from `examples/inventory.toml`, with no retry and no log
//! record at WARNING or above.
//!
//! Without cloud-init the test prints SKIPPED and passes; `scripts/test.sh`
//! installs the package.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::up::start_example;
use serde_json::{json, Value};

/// Debian's interpreter: the one the `cloud-init` package installs into.
const PYTHON: &str = "/usr/bin/python3";
const DEMO: &str = "d0d0d0d0-0000-4000-8000-000000000001";
const DEMO2: &str = "d0d0d0d0-0000-4000-8000-000000000002";
const PROJECT: &str = "d0d0d0d0000040008000000000000000";
const DEMO_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGRlbW8tbWV0YXByb3h5LWtleS0wMDAwMDAwMDAwMDA demo@metaproxy";
const DEMO_USER_DATA: &str =
    "#cloud-config\nwrite_files:\n  - path: /run/metaproxy-demo\n    content: \"served by metaproxy\\n\"\n";
/// How long one cloud-init run may take (it does ~40 requests).
const READ_TIMEOUT: Duration = Duration::from_secs(60);

fn cloudinit_importable() -> bool {
    Command::new(PYTHON)
        .args([
            "-c",
            "import cloudinit.sources.helpers.openstack, cloudinit.sources.helpers.ec2",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Run cloud-init's readers against `base` from `source`; their findings as JSON.
fn read_as(base: &str, source: &str) -> Value {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/cloudinit/read_metadata.py"
    );
    let mut child = Command::new(PYTHON)
        .args([script, base, source])
        // requests honours proxy variables: never send loopback through one.
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("all_proxy")
        .env_remove("ALL_PROXY")
        .env("no_proxy", "*")
        .env("NO_PROXY", "*")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > READ_TIMEOUT {
            let _ = child.kill();
            panic!("cloud-init reader as {source} took over {READ_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "cloud-init reader as {source} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "reader output: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// No retry, no WARNING/ERROR record, and a plausible number of requests.
fn assert_clean(r: &Value, who: &str) {
    assert_eq!(
        r["warnings"],
        json!([]),
        "{who}: cloud-init logged warnings"
    );
    assert_eq!(r["retries"], json!([]), "{who}: cloud-init retried");
    assert!(
        r["requests"].as_u64().unwrap() >= 20,
        "{who}: too few requests seen: {}",
        r["requests"]
    );
}

#[test]
fn cloud_init_reads_each_vm_its_own_metadata() {
    if !cloudinit_importable() {
        println!("SKIPPED cloudinit_clients: {PYTHON} cannot import cloudinit (scripts/test.sh installs cloud-init)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_up, proxy) = start_example(dir.path());
    let base = format!("http://{proxy}");

    // ---- demo (127.0.0.1): key, user data, one OVS port on 127.0.0.0/8.
    let r = read_as(&base, "127.0.0.1");
    assert_clean(&r, "demo");
    let os = &r["openstack"];
    assert_eq!(
        os["version"], "2018-08-27",
        "cloud-init's newest known version"
    );
    assert_eq!(os["uuid"], DEMO);
    assert_eq!(os["instance-id"], DEMO, "KEY_COPIES uuid -> instance-id");
    assert_eq!(os["hostname"], "demo.novalocal");
    assert_eq!(os["local-hostname"], "demo.novalocal");
    assert_eq!(os["name"], "demo");
    assert_eq!(os["project_id"], PROJECT);
    assert_eq!(os["availability_zone"], "nova");
    assert_eq!(os["meta"], json!({"role": "demo", "owner": "metaproxy"}));
    assert_eq!(os["public_keys"], json!({"demo-key": DEMO_KEY}));
    assert_eq!(
        os["keys"],
        json!([{"name": "demo-key", "type": "ssh", "data": DEMO_KEY}])
    );
    assert_eq!(
        os["random_seed_len"], 512,
        "random_seed decodes to 512 bytes"
    );
    assert_eq!(os["userdata"], DEMO_USER_DATA);
    assert_eq!(os["vendordata"], json!({}), "no vendor data configured");
    assert_eq!(
        os["vendordata2"],
        json!({"static": {}}),
        "Nova wraps StaticJSON as static"
    );
    let nd = &os["networkdata"];
    assert_eq!(
        nd["links"],
        json!([{"id": "tapd0d0d0d0-00", "vif_id": "d0d0d0d0-0000-4000-8000-00000000e001", "type": "ovs",
                "mtu": 1500, "ethernet_mac_address": "fa:16:3e:00:00:01"}])
    );
    assert_eq!(
        nd["networks"],
        json!([{"id": "network0", "type": "ipv4", "link": "tapd0d0d0d0-00", "ip_address": "127.0.0.1",
                "netmask": "255.0.0.0",
                "routes": [{"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": "127.0.0.254"},
                           {"network": "10.1.0.0", "netmask": "255.255.0.0", "gateway": "127.0.0.253"}],
                "network_id": "d0d0d0d0-0000-4000-8000-00000000a001",
                "services": [{"type": "dns", "address": "127.0.0.53"}]}])
    );
    assert_eq!(
        nd["services"],
        json!([{"type": "dns", "address": "127.0.0.53"}])
    );
    // cloud-init turned it into a v1 network config: one physical NIC, static.
    let nc = &r["network_config"];
    assert_eq!(nc["version"], 1);
    let phys = &nc["config"][0];
    assert_eq!(phys["type"], "physical");
    assert_eq!(phys["mac_address"], "fa:16:3e:00:00:01");
    assert_eq!(phys["mtu"], 1500);
    assert_eq!(phys["subnets"][0]["type"], "static");
    assert_eq!(phys["subnets"][0]["address"], "127.0.0.1");
    assert_eq!(phys["name"], "eth0");
    assert_eq!(phys["subnets"][0]["netmask"], "255.0.0.0");
    assert_eq!(
        phys["subnets"][0]["routes"][0],
        json!({"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": "127.0.0.254"})
    );
    assert_eq!(
        nc["config"][1],
        json!({"type": "nameserver", "address": "127.0.0.53"})
    );

    // EC2, as read_v2 crawls it (latest) and as asked for 2009-04-04.
    for (what, ec2) in [
        ("read_v2 ec2-metadata", &os["ec2-metadata"]),
        ("2009-04-04", &r["ec2"]),
    ] {
        assert_eq!(ec2["instance-id"], "i-00000001", "{what}");
        assert_eq!(ec2["hostname"], "demo.novalocal", "{what}");
        assert_eq!(ec2["local-hostname"], "demo.novalocal", "{what}");
        assert_eq!(ec2["local-ipv4"], "127.0.0.1", "{what}");
        assert_eq!(ec2["ami-id"], "ami-00000001", "{what}");
        assert_eq!(ec2["reservation-id"], "r-00000001", "{what}");
        assert_eq!(ec2["public-keys"], json!({"demo-key": DEMO_KEY}), "{what}");
        assert_eq!(
            ec2["placement"],
            json!({"availability-zone": "nova"}),
            "{what}"
        );
        assert_eq!(ec2["block-device-mapping"]["root"], "/dev/vda", "{what}");
    }
    assert_eq!(r["ec2_userdata"], DEMO_USER_DATA);

    // ---- demo2 (127.0.0.2): no key, no user data, no AZ.
    let r = read_as(&base, "127.0.0.2");
    assert_clean(&r, "demo2");
    let os = &r["openstack"];
    assert_eq!(os["uuid"], DEMO2);
    assert_eq!(os["hostname"], "demo2.novalocal");
    assert_eq!(os["meta"], json!({"role": "demo"}));
    assert_eq!(os["public_keys"], Value::Null, "demo2 has no key");
    assert_eq!(os["userdata"], "", "user_data 404 -> empty, not retried");
    assert_eq!(
        os["networkdata"]["links"][0]["ethernet_mac_address"],
        "fa:16:3e:00:00:02"
    );
    assert_eq!(os["networkdata"]["networks"][0]["ip_address"], "127.0.0.2");
    for (what, ec2) in [
        ("read_v2 ec2-metadata", &os["ec2-metadata"]),
        ("2009-04-04", &r["ec2"]),
    ] {
        assert_eq!(ec2["instance-id"], "i-00000002", "{what}");
        assert_eq!(ec2["hostname"], "demo2.novalocal", "{what}");
        assert_eq!(ec2["local-ipv4"], "127.0.0.2", "{what}");
        assert!(
            ec2.get("public-keys").is_none(),
            "{what}: demo2 lists no public-keys"
        );
    }
    assert_eq!(r["ec2_userdata"], "", "user-data 404 -> empty");
    assert!(
        !r.to_string().contains(DEMO),
        "demo2 must never see demo's uuid"
    );
}
