//! Per-request costs off the wire: HMAC sign/verify (agent and API), an
//! agent cache hit, and rendering `meta_data.json` and an EC2 listing.

use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use metaproxy::agent::cache::{Lookup, SystemClock, TtlCache};
use metaproxy::api::{ApiRequest, ApiSettings, MetadataApi, PasswordStore};
use metaproxy::inventory::Inventory;

const UUID: &str = "d0d0d0d0-0000-4000-8000-000000000001";
const SECRET: &[u8] = b"change-me";

fn sign(c: &mut Criterion) {
    let sig = metaproxy::sign::sign_instance_id(SECRET, UUID);
    c.bench_function("sign/hmac_sha256_instance_id", |b| {
        b.iter(|| metaproxy::sign::sign_instance_id(black_box(SECRET), black_box(UUID)))
    });
    c.bench_function("sign/verify_constant_time", |b| {
        b.iter(|| {
            metaproxy::sign::verify_instance_signature(
                black_box(SECRET),
                black_box(UUID),
                black_box(sig.as_bytes()),
            )
        })
    });
}

fn cache(c: &mut Criterion) {
    let mut cache: TtlCache<(String, IpAddr), (String, String)> = TtlCache::new(
        100_000,
        Duration::from_secs(10),
        Duration::from_secs(1),
        SystemClock,
    );
    for i in 0..10_000u32 {
        let ip = IpAddr::from(i.to_be_bytes());
        cache.insert(
            ("net".to_string(), ip),
            (format!("uuid-{i}"), "project".to_string()),
        );
    }
    let key = ("net".to_string(), IpAddr::from(4242u32.to_be_bytes()));
    c.bench_function("agent/cache_hit", |b| {
        b.iter(|| match cache.get(black_box(&key)) {
            Lookup::Hit(v) => v,
            _ => unreachable!("warm key"),
        })
    });
}

fn render(c: &mut Criterion) {
    let inv = Arc::new(
        Inventory::load(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/inventory.toml"
        )))
        .unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let passwords = Arc::new(PasswordStore::open(dir.path()).unwrap());
    let api = MetadataApi::new(
        ApiSettings {
            shared_secret: SECRET.to_vec(),
            ..ApiSettings::default()
        },
        passwords,
    );
    let sig = metaproxy::sign::sign_instance_id(SECRET, UUID);
    let project = api_project(&api);
    let headers: Vec<(&[u8], &[u8])> = vec![
        (b"X-Instance-ID", UUID.as_bytes()),
        (b"X-Tenant-ID", project.as_bytes()),
        (b"X-Instance-ID-Signature", sig.as_bytes()),
        (b"X-Forwarded-For", b"127.0.0.1"),
    ];
    let req = |target: &'static [u8]| ApiRequest {
        method: "GET",
        target,
        headers: &headers,
        body: b"",
        peer: "127.0.0.1".parse().unwrap(),
    };
    let meta = req(b"/openstack/2018-08-27/meta_data.json");
    assert_eq!(api.handle(&inv, &meta).status, 200);
    c.bench_function("api/meta_data_json", |b| {
        b.iter(|| api.handle(&inv, black_box(&meta)))
    });
    let listing = req(b"/2009-04-04/meta-data/");
    assert_eq!(api.handle(&inv, &listing).status, 200);
    c.bench_function("api/ec2_meta_data_listing", |b| {
        b.iter(|| api.handle(&inv, black_box(&listing)))
    });
}

/// The demo instance's project, read back through the API itself.
fn api_project(_api: &MetadataApi) -> String {
    let inv = Inventory::load(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/inventory.toml"
    )))
    .unwrap();
    inv.instance(UUID).unwrap().project.clone()
}

criterion_group!(benches, sign, cache, render);
criterion_main!(benches);
