//! `[api] source = "nova"` on a SQLite database with Nova 34's tables (the
//! columns we read, the alembic version Nova's migrations leave), written
//! here with sqlx: runs everywhere, without the peers. The differential
//! with the real Nova on its own databases is `peers_nova_source.rs`.
//!
//! - a malformed row is a 500 for that instance only, with a log line
//!   naming the column; the others are served;
//! - a password is stored as Nova stores it (`password_0..3` rows) once,
//!   then 409;
//! - an untested schema version, or a missing column, refuses the start
//!   naming it; `--check` counts the instances;
//! - tagged devices, dedicated CPUs, EC2 block device mappings (ephemeral,
//!   swap, volumes) and a volume-backed instance's `ami-id` render as Nova
//!   renders them: checked against Nova's own functions run on the same
//!   rows (`scripts/peers/nova/render_oracle.py`) when the peers' Nova venv
//!   exists, and always against the bodies derived from Nova 34's code
//!   written out below.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

const SECRET: &str = "s3cr3t";
const GOOD: &str = "11111111-0000-4000-8000-000000000001";
const BROKEN: &str = "11111111-0000-4000-8000-000000000002";
const PROJECT: &str = "6e1f3b0c9d6a4f0e8b7a2c1d0e9f8a7b";
const FLAVOR: &str = r#"{"cur": {"nova_object.name": "Flavor", "nova_object.namespace": "nova", "nova_object.version": "1.2", "nova_object.data": {"name": "m1.small"}}, "old": null, "new": null}"#;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn exec(pool: &sqlx::SqlitePool, sql: &str) {
    sqlx::query(sql)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// A cell database with Nova 34's version and the columns we read.
fn make_db(path: &Path, version: &str, without_column: Option<&str>) {
    rt().block_on(async {
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true);
        let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
        let mut keypairs_col = "keypairs TEXT,";
        if without_column == Some("keypairs") {
            keypairs_col = "";
        }
        for sql in [
            "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)".to_owned(),
            format!("INSERT INTO alembic_version VALUES ('{version}')"),
            "CREATE TABLE instances (id INTEGER PRIMARY KEY AUTOINCREMENT, uuid VARCHAR(36), deleted INTEGER, \
             project_id VARCHAR(255), hostname VARCHAR(255), display_name VARCHAR(255), launch_index INTEGER, \
             availability_zone VARCHAR(255), reservation_id VARCHAR(255), image_ref VARCHAR(255), \
             kernel_id VARCHAR(255), ramdisk_id VARCHAR(255), key_name VARCHAR(255), user_data MEDIUMTEXT, \
             root_device_name VARCHAR(255), default_ephemeral_device VARCHAR(255), \
             default_swap_device VARCHAR(255))".to_owned(),
            "CREATE TABLE block_device_mapping (id INTEGER PRIMARY KEY AUTOINCREMENT, instance_uuid VARCHAR(36), \
             deleted INTEGER, source_type VARCHAR(255), destination_type VARCHAR(255), \
             guest_format VARCHAR(255), device_name VARCHAR(255), boot_index INTEGER)".to_owned(),
            format!("CREATE TABLE instance_extra (id INTEGER PRIMARY KEY, instance_uuid VARCHAR(36), deleted INTEGER, \
             flavor TEXT, {keypairs_col} device_metadata TEXT, numa_topology TEXT)"),
            "CREATE TABLE instance_metadata (id INTEGER PRIMARY KEY, instance_uuid VARCHAR(36), deleted INTEGER, \
             `key` VARCHAR(255), value VARCHAR(255))".to_owned(),
            "CREATE TABLE instance_system_metadata (id INTEGER PRIMARY KEY, created_at DATETIME, updated_at DATETIME, \
             instance_uuid VARCHAR(36) NOT NULL, deleted INTEGER, `key` VARCHAR(255) NOT NULL, value VARCHAR(255))".to_owned(),
            "CREATE TABLE instance_info_caches (id INTEGER PRIMARY KEY, instance_uuid VARCHAR(36), deleted INTEGER, \
             network_info MEDIUMTEXT)".to_owned(),
            "CREATE TABLE instance_id_mappings (id INTEGER PRIMARY KEY AUTOINCREMENT, created_at DATETIME, \
             uuid VARCHAR(36) NOT NULL, deleted INTEGER)".to_owned(),
            "CREATE TABLE s3_images (id INTEGER PRIMARY KEY AUTOINCREMENT, created_at DATETIME, \
             uuid VARCHAR(36) NOT NULL, deleted INTEGER)".to_owned(),
        ] {
            exec(&pool, &sql).await;
        }
        for (uuid, host, flavor) in [(GOOD, "good", FLAVOR), (BROKEN, "broken", "{not json")] {
            exec(&pool, &format!(
                "INSERT INTO instances (uuid, deleted, project_id, hostname, display_name, launch_index, \
                 availability_zone, reservation_id, image_ref, kernel_id, ramdisk_id, root_device_name) \
                 VALUES ('{uuid}', 0, '{PROJECT}', '{host}', '{host} vm', 0, 'nova', 'r-1', \
                 '22222222-0000-4000-8000-000000000000', '', '', '/dev/vda')"
            )).await;
            exec(&pool, &format!(
                "INSERT INTO instance_extra (instance_uuid, deleted, flavor) VALUES ('{uuid}', 0, '{flavor}')"
            )).await;
            exec(&pool, &format!(
                "INSERT INTO instance_info_caches (instance_uuid, deleted, network_info) VALUES ('{uuid}', 0, '[]')"
            )).await;
        }
        // A soft-deleted instance is not served.
        exec(&pool, "INSERT INTO instances (uuid, deleted, project_id, hostname) VALUES \
             ('11111111-0000-4000-8000-000000000003', 7, 'p', 'gone')").await;
        pool.close().await;
    });
}

fn config(dir: &Path, db: &Path, port: u16) -> std::path::PathBuf {
    config_with_neutron(dir, db, port, 9)
}

fn config_with_neutron(dir: &Path, db: &Path, port: u16, neutron: u16) -> std::path::PathBuf {
    let cfg = dir.join("api.toml");
    std::fs::write(
        &cfg,
        format!(
            "[api]\nlisten = \"127.0.0.1:{port}\"\nmetadata_proxy_shared_secret = \"{SECRET}\"\nsource = \"nova\"\n\
             [api.nova]\nconnection = \"sqlite:///{}\"\nlocal_metadata_per_cell = true\n\
             [api.neutron]\nurl = \"http://127.0.0.1:{neutron}\"\nauth_strategy = \"noauth\"\n",
            db.display()
        ),
    )
    .unwrap();
    cfg
}

fn headers(uuid: &str) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    m.update(uuid.as_bytes());
    let sig: String = m
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("X-Instance-ID: {uuid}\r\nX-Tenant-ID: {PROJECT}\r\nX-Instance-ID-Signature: {sig}\r\nX-Forwarded-For: 10.0.0.5\r\n")
}

fn send(to: SocketAddr, method: &str, path: &str, uuid: &str, body: &str) -> common::Resp {
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        headers(uuid),
        body.len()
    );
    common::get(to, &raw).unwrap()
}

struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `metaproxy api --config cfg`, its stderr in `log`, once it accepts on
/// `port` (20 s at most).
fn start_api(cfg: &Path, port: u16, log: &Path) -> (Child, SocketAddr) {
    let child = Command::new(env!("CARGO_BIN_EXE_metaproxy"))
        .args(["api", "--config"])
        .arg(cfg)
        .stderr(std::fs::File::create(log).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let child = Child(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let t0 = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "metaproxy api did not start: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, addr)
}

#[test]
fn a_malformed_row_is_that_instances_500_and_passwords_land_in_system_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("nova.db");
    make_db(&db, "ab450ba04102", None);
    let port = common::free_port();
    let log = dir.path().join("api.log");
    let (_child, addr) = start_api(&config(dir.path(), &db, port), port, &log);
    let md = "/openstack/latest/meta_data.json";
    let r = send(addr, "GET", md, GOOD, "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("\"name\": \"good vm\""), "{}", r.text());
    let r = send(addr, "GET", "/2009-04-04/meta-data/instance-type", GOOD, "");
    // EC2 needs Neutron's security groups, and Neutron is down here: a 500, as Nova's.
    assert_eq!(r.status, 500, "{}", r.text());
    let r = send(addr, "GET", md, BROKEN, "");
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(!r.text().contains("good"), "{}", r.text());
    let r = send(addr, "GET", md, "11111111-0000-4000-8000-000000000003", "");
    assert_eq!(r.status, 404, "a deleted instance: {}", r.text());
    // The broken row did not take the good one down.
    assert_eq!(send(addr, "GET", md, GOOD, "").status, 200);
    common::wait_until(
        "the log names the broken column",
        Duration::from_secs(5),
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(&format!(
                    "instance {BROKEN}: bad row: instance_extra.flavor: not valid JSON"
                ))
        },
    );

    let pw = "y".repeat(600);
    assert_eq!(
        send(addr, "POST", "/openstack/latest/password", GOOD, &pw).status,
        200
    );
    assert_eq!(
        send(addr, "POST", "/openstack/latest/password", GOOD, "again").status,
        409
    );
    let r = send(addr, "GET", "/openstack/latest/password", GOOD, "");
    assert_eq!((r.status, r.text()), (200, pw.clone()));
    // Where Nova keeps it: four chunks of 255 characters.
    let rows: Vec<(String, String)> = rt().block_on(async {
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT `key`, value FROM instance_system_metadata WHERE instance_uuid = ? ORDER BY `key`",
        )
        .bind(GOOD)
        .fetch_all(&pool)
        .await
        .unwrap();
        pool.close().await;
        rows
    });
    let lens: Vec<(&str, usize)> = rows.iter().map(|(k, v)| (k.as_str(), v.len())).collect();
    assert_eq!(
        lens,
        [
            ("password_0", 255),
            ("password_1", 255),
            ("password_2", 90),
            ("password_3", 0)
        ]
    );
}

fn refused(version: &str, without: Option<&str>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("nova.db");
    make_db(&db, version, without);
    let out = Command::new(env!("CARGO_BIN_EXE_metaproxy"))
        .args(["api", "--check", "--config"])
        .arg(config(dir.path(), &db, 1))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        return format!("OK {text}");
    }
    text
}

#[test]
fn the_schema_is_checked_at_start() {
    let ok = refused("ab450ba04102", None);
    assert!(
        ok.starts_with("OK ") && ok.contains("(2 instance(s) in 1 cell database(s))"),
        "{ok}"
    );
    let e = refused("0123456789ab", None);
    assert!(
        e.contains("0123456789ab") && e.contains("supported: ab450ba04102"),
        "{e}"
    );
    let e = refused("ab450ba04102", Some("keypairs"));
    assert!(e.contains("instance_extra.keypairs"), "{e}");
}

/// `metaproxy doctor` on a controller's file: the `nova schema` line is OK on
/// a supported database (with its instance count) and FAIL, naming the
/// version, on one the API would refuse; the exit status follows.
#[test]
fn doctor_checks_the_nova_schema() {
    let doctor = |version: &str| {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("nova.db");
        make_db(&db, version, None);
        let out = Command::new(env!("CARGO_BIN_EXE_metaproxy"))
            .args(["doctor", "--config"])
            .arg(config(dir.path(), &db, 1))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = text
            .lines()
            .find(|l| l.contains("nova schema"))
            .unwrap_or_else(|| panic!("no nova schema line in {text}"))
            .to_owned();
        (out.status.success(), line)
    };
    let (ok, line) = doctor("ab450ba04102");
    assert!(ok, "{line}");
    assert!(
        line.starts_with("OK") && line.contains("ab450ba04102") && line.contains("2 instance(s)"),
        "{line}"
    );
    let (ok, line) = doctor("0123456789ab");
    assert!(!ok, "{line}");
    assert!(
        line.starts_with("FAIL") && line.contains("0123456789ab"),
        "{line}"
    );
}

const TAGGED: &str = "11111111-0000-4000-8000-000000000004";
const VOLUME: &str = "11111111-0000-4000-8000-000000000005";
const BAD_DEVICE: &str = "11111111-0000-4000-8000-000000000006";

/// An o.vo primitive as Nova's `obj_to_primitive` writes it.
fn ovo(name: &str, version: &str, data: &str) -> String {
    format!(
        r#"{{"nova_object.name": "{name}", "nova_object.namespace": "nova", "nova_object.version": "{version}", "nova_object.data": {{{data}}}}}"#
    )
}

fn pci(address: &str) -> String {
    ovo("PCIDeviceBus", "1.0", &format!(r#""address": "{address}""#))
}

/// `instance_extra.device_metadata` of TAGGED, one device of each case
/// `_get_device_metadata` distinguishes:
/// a. a tagged NIC with vlan and vf_trusted (upper-case MAC: Nova lowers it);
/// b. an untagged NIC with neither (shown only from Rocky, for vf_trusted);
/// c. an untagged NIC with a vlan (shown from Ocata);
/// d. a tagged disk on SCSI with serial and path;
/// e. a tagged disk without a bus (`none`/`none`);
/// f. an untagged disk on USB without an address (no `tags` key);
/// g. a share (shown only from Epoxy);
/// h. a device on the base DeviceBus (never shown).
fn device_metadata() -> String {
    let devices = [
        ovo(
            "NetworkInterfaceMetadata",
            "1.2",
            &format!(
                r#""bus": {}, "tags": ["nic1"], "mac": "FA:16:3E:00:00:01", "vlan": 1000, "vf_trusted": true"#,
                pci("0000:00:03.0")
            ),
        ),
        ovo(
            "NetworkInterfaceMetadata",
            "1.2",
            &format!(
                r#""bus": {}, "mac": "fa:16:3e:00:00:02""#,
                pci("0000:00:04.0")
            ),
        ),
        ovo(
            "NetworkInterfaceMetadata",
            "1.1",
            &format!(
                r#""bus": {}, "mac": "fa:16:3e:00:00:03", "vlan": 200"#,
                pci("0000:00:05.0")
            ),
        ),
        ovo(
            "DiskMetadata",
            "1.0",
            &format!(
                r#""bus": {}, "serial": "vol-serial", "path": "/dev/sdb", "tags": ["db"]"#,
                ovo("SCSIDeviceBus", "1.0", r#""address": "0:0:0:1""#)
            ),
        ),
        ovo("DiskMetadata", "1.0", r#""tags": ["x"]"#),
        ovo(
            "DiskMetadata",
            "1.0",
            &format!(r#""bus": {}"#, ovo("USBDeviceBus", "1.0", "")),
        ),
        ovo(
            "ShareMetadata",
            "1.0",
            r#""share_id": "s1", "tag": "share-tag""#,
        ),
        ovo(
            "DeviceMetadata",
            "1.0",
            &format!(
                r#""bus": {}, "tags": ["hidden"]"#,
                ovo("DeviceBus", "1.0", "")
            ),
        ),
    ];
    ovo(
        "InstanceDeviceMetadata",
        "1.0",
        &format!(r#""devices": [{}]"#, devices.join(", ")),
    )
}

/// `instance_extra.numa_topology` of TAGGED: a 1.6 cell pinned to host
/// CPUs 3 and 1, and a 1.4 dedicated cell (before `pcpuset` existed) on
/// 6 and 4, which Nova's load upgrades (`pcpuset = cpuset`).
fn numa_topology() -> String {
    let cell0 = ovo(
        "InstanceNUMACell",
        "1.6",
        r#""id": 0, "cpuset": [], "pcpuset": [3, 1], "cpuset_reserved": null, "memory": 512, "pagesize": null, "cpu_topology": null, "cpu_pinning_raw": {"0": 3, "1": 1}, "cpu_policy": "dedicated", "cpu_thread_policy": null"#,
    );
    let cell1 = ovo(
        "InstanceNUMACell",
        "1.4",
        r#""id": 1, "cpuset": [6, 4], "cpuset_reserved": null, "memory": 512, "pagesize": null, "cpu_topology": null, "cpu_pinning_raw": {"2": 6, "3": 4}, "cpu_policy": "dedicated", "cpu_thread_policy": null"#,
    );
    ovo(
        "InstanceNUMATopology",
        "1.3",
        &format!(
            r#""instance_uuid": "{TAGGED}", "cells": [{cell0}, {cell1}], "emulator_threads_policy": null"#
        ),
    )
}

/// TAGGED (image-backed: devices, CPUs, ephemeral/swap/volume BDMs),
/// VOLUME (booted from a volume: no image_ref) and BAD_DEVICE (a NIC with a
/// malformed MAC).
fn add_feature_instances(path: &Path) {
    rt().block_on(async {
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        let bad = ovo(
            "InstanceDeviceMetadata",
            "1.0",
            &format!(
                r#""devices": [{}]"#,
                ovo(
                    "NetworkInterfaceMetadata",
                    "1.2",
                    r#""mac": "not-a-mac", "tags": ["t"]"#
                )
            ),
        );
        type Inst<'a> = (&'a str, &'a str, Option<&'a str>, Option<&'a str>, Option<String>, Option<String>);
        let instances: [Inst; 3] = [
            (TAGGED, "33333333-0000-4000-8000-000000000000", Some("/dev/vdb"), Some("/dev/vdc"), Some(device_metadata()), Some(numa_topology())),
            (VOLUME, "", None, None, None, None),
            (BAD_DEVICE, "33333333-0000-4000-8000-000000000000", None, None, Some(bad), None),
        ];
        for (uuid, image, eph, swap, devices, numa) in instances {
            sqlx::query(
                "INSERT INTO instances (uuid, deleted, project_id, hostname, display_name, launch_index, \
                 availability_zone, reservation_id, image_ref, kernel_id, ramdisk_id, root_device_name, \
                 default_ephemeral_device, default_swap_device) \
                 VALUES (?, 0, ?, 'feat', 'feat vm', 0, 'nova', 'r-2', ?, '', '', '/dev/vda', ?, ?)",
            )
            .bind(uuid)
            .bind(PROJECT)
            .bind(image)
            .bind(eph)
            .bind(swap)
            .execute(&pool)
            .await
            .unwrap();
            sqlx::query(
                "INSERT INTO instance_extra (instance_uuid, deleted, flavor, device_metadata, numa_topology) \
                 VALUES (?, 0, ?, ?, ?)",
            )
            .bind(uuid)
            .bind(FLAVOR)
            .bind(devices)
            .bind(numa)
            .execute(&pool)
            .await
            .unwrap();
            exec(&pool, &format!(
                "INSERT INTO instance_info_caches (instance_uuid, deleted, network_info) VALUES ('{uuid}', 0, '[]')"
            )).await;
        }
        // (instance, deleted, source, destination, guest_format, device), in id order.
        type Bdm<'a> = (&'a str, i64, &'a str, &'a str, Option<&'a str>, Option<&'a str>);
        let bdms: [Bdm; 9] = [
            (TAGGED, 0, "image", "local", None, Some("/dev/vda")),
            (TAGGED, 0, "blank", "local", None, Some("/dev/vdb")),
            (TAGGED, 0, "blank", "local", Some("swap"), Some("/dev/vdc")),
            (TAGGED, 0, "volume", "volume", None, Some("/dev/vdf")),
            (TAGGED, 0, "blank", "local", Some("ext4"), Some("/dev/vdd")),
            (TAGGED, 0, "volume", "volume", None, Some("/dev/vde")),
            (TAGGED, 7, "blank", "local", Some("swap"), Some("/dev/vdz")),
            (VOLUME, 0, "volume", "volume", None, Some("/dev/vda")),
            (VOLUME, 0, "blank", "local", Some("swap"), None),
        ];
        for (uuid, deleted, src, dst, fmt, dev) in bdms {
            sqlx::query(
                "INSERT INTO block_device_mapping (instance_uuid, deleted, source_type, destination_type, \
                 guest_format, device_name) VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(uuid)
            .bind(deleted)
            .bind(src)
            .bind(dst)
            .bind(fmt)
            .bind(dev)
            .execute(&pool)
            .await
            .unwrap();
        }
        pool.close().await;
    });
}

/// A Neutron that knows no ports: every instance has no security groups.
fn fake_neutron() -> u16 {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let body = r#"{"ports": []}"#;
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if c.write_all(resp.as_bytes()).is_err() {
                            return;
                        }
                    }
                    match c.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    port
}

/// The OpenStack versions, as Nova's `OPENSTACK_VERSIONS`, and `latest`.
const OS_VERSIONS: [&str; 11] = [
    "2012-08-10",
    "2013-04-04",
    "2013-10-17",
    "2015-10-15",
    "2016-06-30",
    "2016-10-06",
    "2017-02-22",
    "2018-08-27",
    "2020-10-14",
    "2025-04-04",
    "latest",
];

// What Nova 34 renders for TAGGED's devices, by reading
// nova/api/metadata/base.py `_get_device_metadata`:
// - per device, a dict filled in this order: for a NIC `vlan` (if set and
//   the version >= OCATA 2017-02-22), `vf_trusted` (if the version >= ROCKY
//   2018-08-27; False when unset), `type` "nic", `mac`; for a disk `type`
//   "disk", `serial` and `path` when set; for a share (only if the version
//   >= EPOXY 2025-04-04) `type` "share", `share_id`, `tag`; then `bus`
//   ("pci"/"usb"/"scsi"/"ide"/"xen" by bus class, "none" without a bus),
//   `address` ("none" when the bus has none), `tags` when set;
// - a NIC with no tags and neither vlan nor vf_trusted in its dict is
//   skipped (b before Rocky; c before Ocata); a device on the base
//   DeviceBus (h) is skipped; a share before Epoxy is skipped;
// - the MAC is lower-cased by MACAddressField.coerce on load (a);
// - `devices` is in meta_data.json from NEWTON_ONE (2016-06-30) on, and
//   `dedicated_cpus` (sorted chain of every cell's pcpuset, after the 1.4
//   cell's load-time upgrade pcpuset = cpuset) from VICTORIA (2020-10-14);
//   both are the last keys of the document, in that order, and
//   `jsonutils.dumps` joins with ", " and ": ".
const DISKS: &str = r#"{"type": "disk", "serial": "vol-serial", "path": "/dev/sdb", "bus": "scsi", "address": "0:0:0:1", "tags": ["db"]}, {"type": "disk", "bus": "none", "address": "none", "tags": ["x"]}, {"type": "disk", "bus": "usb", "address": "none"}"#;
const NIC_A_NEWTON: &str = r#"{"type": "nic", "mac": "fa:16:3e:00:00:01", "bus": "pci", "address": "0000:00:03.0", "tags": ["nic1"]}"#;
const NICS_OCATA: &str = r#"{"vlan": 1000, "type": "nic", "mac": "fa:16:3e:00:00:01", "bus": "pci", "address": "0000:00:03.0", "tags": ["nic1"]}, {"vlan": 200, "type": "nic", "mac": "fa:16:3e:00:00:03", "bus": "pci", "address": "0000:00:05.0"}"#;
const NICS_ROCKY: &str = r#"{"vlan": 1000, "vf_trusted": true, "type": "nic", "mac": "fa:16:3e:00:00:01", "bus": "pci", "address": "0000:00:03.0", "tags": ["nic1"]}, {"vf_trusted": false, "type": "nic", "mac": "fa:16:3e:00:00:02", "bus": "pci", "address": "0000:00:04.0"}, {"vlan": 200, "vf_trusted": false, "type": "nic", "mac": "fa:16:3e:00:00:03", "bus": "pci", "address": "0000:00:05.0"}"#;
const SHARE: &str =
    r#"{"type": "share", "share_id": "s1", "tag": "share-tag", "bus": "none", "address": "none"}"#;

/// The tail of TAGGED's meta_data.json at `version` (None: no devices key).
fn expected_tail(version: &str) -> Option<String> {
    let devices = match version {
        "2016-06-30" | "2016-10-06" => format!("[{NIC_A_NEWTON}, {DISKS}]"),
        "2017-02-22" => format!("[{NICS_OCATA}, {DISKS}]"),
        "2018-08-27" | "2020-10-14" => format!("[{NICS_ROCKY}, {DISKS}]"),
        "2025-04-04" | "latest" => format!("[{NICS_ROCKY}, {DISKS}, {SHARE}]"),
        _ => return None,
    };
    Some(match version {
        "2020-10-14" | "2025-04-04" | "latest" => {
            format!(r#""devices": {devices}, "dedicated_cpus": [1, 3, 4, 6]}}"#)
        }
        _ => format!(r#""devices": {devices}}}"#),
    })
}

/// Nova's own answers for these instances, if the peers' Nova venv exists.
fn nova_oracle(db: &Path) -> Option<serde_json::Value> {
    let venv =
        std::env::var("NOVA_VENV").unwrap_or_else(|_| "/tmp/metaproxy-peers/nova-venv".into());
    let python = Path::new(&venv).join("bin/python");
    if !python.exists() {
        eprintln!(
            "SKIPPED the Nova oracle: no {}; checking the bodies derived from Nova's code only",
            python.display()
        );
        return None;
    }
    let out = Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/peers/nova/render_oracle.py"
        ))
        .arg(db)
        .args([TAGGED, VOLUME])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "render_oracle.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

#[test]
fn devices_dedicated_cpus_block_devices_and_no_image_render_as_nova_does() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("nova.db");
    make_db(&db, "ab450ba04102", None);
    add_feature_instances(&db);
    let oracle = nova_oracle(&db);
    let port = common::free_port();
    let log = dir.path().join("api.log");
    let (_child, addr) = start_api(
        &config_with_neutron(dir.path(), &db, port, fake_neutron()),
        port,
        &log,
    );
    let get = |path: &str, uuid: &str| {
        let r = send(addr, "GET", path, uuid, "");
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        r.text()
    };

    for v in OS_VERSIONS {
        let body = get(&format!("/openstack/{v}/meta_data.json"), TAGGED);
        match expected_tail(v) {
            Some(tail) => assert!(
                body.ends_with(&tail),
                "{v}: {body}\nexpected the tail {tail}"
            ),
            None => assert!(!body.contains("devices"), "{v}: {body}"),
        }
        let nv = if v == "latest" { "2025-04-04" } else { v };
        if let Some(o) = &oracle {
            let md = &o[TAGGED]["meta_data"][nv];
            let devices = md["devices"].as_str().unwrap();
            let cpus = md["dedicated_cpus"].as_str().unwrap();
            if nv >= "2020-10-14" {
                let tail = format!(r#""devices": {devices}, "dedicated_cpus": {cpus}}}"#);
                assert!(body.ends_with(&tail), "{v}: {body}\nNova: {tail}");
            } else if nv >= "2016-06-30" {
                let tail = format!(r#""devices": {devices}}}"#);
                assert!(body.ends_with(&tail), "{v}: {body}\nNova: {tail}");
            }
        }
        // No device metadata, no NUMA topology.
        let body = get(&format!("/openstack/{v}/meta_data.json"), VOLUME);
        if nv >= "2020-10-14" {
            assert!(
                body.ends_with(r#""devices": [], "dedicated_cpus": []}"#),
                "{v}: {body}"
            );
        }
    }

    // EC2 block-device-mapping (nova.block_device.instance_block_mapping):
    // TAGGED: ami = root without /dev/, root, ephemeral0 and swap from the
    // instance's defaults (the BDMs name the same devices), ebsN for the
    // volumes sorted by device name, the ext4 blank disk as ephemeral1
    // (blank non-swap disks in row order), the deleted swap BDM not read.
    // VOLUME: the boot volume is ebs0, the swap BDM has no device name and
    // Nova prints None for it.
    let tagged: &[(&str, &str)] = &[
        ("ami", "vda"),
        ("ebs0", "/dev/vde"),
        ("ebs1", "/dev/vdf"),
        ("ephemeral0", "/dev/vdb"),
        ("ephemeral1", "/dev/vdd"),
        ("root", "/dev/vda"),
        ("swap", "/dev/vdc"),
    ];
    let volume: &[(&str, &str)] = &[
        ("ami", "vda"),
        ("ebs0", "/dev/vda"),
        ("root", "/dev/vda"),
        ("swap", "None"),
    ];
    for (uuid, expected) in [(TAGGED, tagged), (VOLUME, volume)] {
        let bdm = "/latest/meta-data/block-device-mapping";
        let listing = get(&format!("{bdm}/"), uuid);
        let names: Vec<&str> = expected.iter().map(|(k, _)| *k).collect();
        assert_eq!(listing, names.join("\n"), "{uuid}");
        if let Some(o) = &oracle {
            assert_eq!(
                listing,
                o[uuid]["bdm"]["listing"].as_str().unwrap(),
                "{uuid}"
            );
        }
        for (k, v) in expected {
            let got = get(&format!("{bdm}/{k}"), uuid);
            assert_eq!(got, *v, "{uuid} {k}");
            if let Some(o) = &oracle {
                assert_eq!(
                    got,
                    o[uuid]["bdm"]["entries"][k].as_str().unwrap(),
                    "{uuid} {k}"
                );
            }
        }
    }
    // A volume-backed instance has no image: Nova's ami_id is None, printed
    // as "None" (ec2_md_print's str()); one with an image has an ami- id.
    let ami = get("/latest/meta-data/ami-id", VOLUME);
    assert_eq!(ami, "None");
    if let Some(o) = &oracle {
        assert_eq!(ami, o[VOLUME]["ami_id"].as_str().unwrap());
    }
    assert!(get("/latest/meta-data/ami-id", TAGGED).starts_with("ami-0000000"));

    // A malformed device row: that instance's 500, named in the log.
    let r = send(
        addr,
        "GET",
        "/openstack/latest/meta_data.json",
        BAD_DEVICE,
        "",
    );
    assert_eq!(r.status, 500, "{}", r.text());
    common::wait_until(
        "the log names the device column",
        Duration::from_secs(5),
        || {
            std::fs::read_to_string(&log).unwrap_or_default().contains(&format!(
            "instance {BAD_DEVICE}: bad row: instance_extra.device_metadata.devices[0]: malformed MAC"
        ))
        },
    );
    assert_eq!(
        send(addr, "GET", "/openstack/latest/meta_data.json", TAGGED, "").status,
        200
    );
}

/// A cell whose `cell_mappings.database_connection` is a template, as
/// `nova-manage cell_v2 create_cell --database_connection '{scheme}://…'`
/// stores one to keep credentials out of the API database: its fields are
/// filled from `[database] connection` (Nova's `CellMapping.format_db_url`),
/// so the instance mapped to it is read from that other file.
#[test]
fn a_templated_cell_connection_is_filled_from_database_connection() {
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("cell1.db");
    make_db(&local, "ab450ba04102", None);
    // The second cell: `{path}` is the local file's path without its
    // leading '/', so `{scheme}:////{path}-cell2` is the file next to it.
    let cell2 = dir.path().join("cell1.db-cell2");
    make_db(&cell2, "ab450ba04102", None);
    let api = dir.path().join("api.db");
    rt().block_on(async {
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&cell2)
            .create_if_missing(false);
        let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
        exec(
            &pool,
            &format!("UPDATE instances SET display_name = 'in cell2' WHERE uuid = '{GOOD}'"),
        )
        .await;
        pool.close().await;
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&api)
            .create_if_missing(true);
        let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
        for sql in [
            "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)".to_owned(),
            "INSERT INTO alembic_version VALUES ('cdeec0c85668')".to_owned(),
            "CREATE TABLE cell_mappings (id INTEGER PRIMARY KEY, name VARCHAR(255), \
             database_connection TEXT)"
                .to_owned(),
            "CREATE TABLE instance_mappings (id INTEGER PRIMARY KEY, instance_uuid VARCHAR(36), \
             cell_id INTEGER)"
                .to_owned(),
            format!(
                "INSERT INTO cell_mappings VALUES (1, 'cell1', 'sqlite:///{}'), \
                 (2, 'cell2', '{{scheme}}:////{{path}}-cell2')",
                local.display()
            ),
            format!("INSERT INTO instance_mappings VALUES (1, '{GOOD}', 2), (2, '{BROKEN}', 1)"),
        ] {
            exec(&pool, &sql).await;
        }
        pool.close().await;
    });
    let port = common::free_port();
    let cfg = dir.path().join("api.toml");
    std::fs::write(
        &cfg,
        format!(
            "[api]\nlisten = \"127.0.0.1:{port}\"\nmetadata_proxy_shared_secret = \"{SECRET}\"\nsource = \"nova\"\n\
             [api.nova]\nconnection = \"sqlite:///{}\"\napi_connection = \"sqlite:///{}\"\n\
             [api.neutron]\nurl = \"http://127.0.0.1:9\"\nauth_strategy = \"noauth\"\n",
            local.display(),
            api.display()
        ),
    )
    .unwrap();
    // --check reads both cells at start: the template is filled, not refused.
    let out = Command::new(env!("CARGO_BIN_EXE_metaproxy"))
        .args(["api", "--check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("cell1.db-cell2"),
        "the filled cell URL is checked: {text}"
    );
    let log = dir.path().join("api.log");
    let (_child, addr) = start_api(&cfg, port, &log);
    let r = send(addr, "GET", "/openstack/latest/meta_data.json", GOOD, "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.text().contains("\"name\": \"in cell2\""),
        "read from the templated cell: {}",
        r.text()
    );
}
