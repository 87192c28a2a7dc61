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
//!   naming it; `--check` counts the instances.

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
             root_device_name VARCHAR(255))".to_owned(),
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
    let cfg = dir.join("api.toml");
    std::fs::write(
        &cfg,
        format!(
            "[api]\nlisten = \"127.0.0.1:{port}\"\nmetadata_proxy_shared_secret = \"{SECRET}\"\nsource = \"nova\"\n\
             [api.nova]\nconnection = \"sqlite:///{}\"\nlocal_metadata_per_cell = true\n\
             [api.neutron]\nurl = \"http://127.0.0.1:9\"\nauth_strategy = \"noauth\"\n",
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

#[test]
fn a_malformed_row_is_that_instances_500_and_passwords_land_in_system_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("nova.db");
    make_db(&db, "ab450ba04102", None);
    let port = common::free_port();
    let log = dir.path().join("api.log");
    let child = Command::new(env!("CARGO_BIN_EXE_metaproxy"))
        .args(["api", "--config"])
        .arg(config(dir.path(), &db, port))
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let _child = Child(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let t0 = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "metaproxy api did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
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
