//! Handler tests. The golden ones replay every request recorded from a real
//! Nova 34 metadata API (`testdata/nova_probe.json`, copied from
//! `peers/results`) against an inventory equal to the Nova fixture.

use super::*;
use crate::sign::sign_instance_id;

/// The handler bound to one inventory, as a server loop binds its copy.
struct Api {
    api: MetadataApi,
    inv: Arc<Inventory>,
}

impl Api {
    fn new(settings: ApiSettings, inv: Arc<Inventory>, passwords: Arc<PasswordStore>) -> Api {
        Api {
            api: MetadataApi::new(settings, passwords),
            inv,
        }
    }

    fn handle(&self, req: &ApiRequest<'_>) -> ApiResponse {
        self.api.handle(&self.inv, req)
    }

    fn handle_on(&self, req: &ApiRequest<'_>, today: &str) -> ApiResponse {
        self.api.handle_on(&self.inv, req, today)
    }
}

const SECRET: &[u8] = b"s3cr3t-shared";
const VM1: &str = "00000001-0000-4000-8000-000000000001";
const VM2: &str = "00000002-0000-4000-8000-000000000002";
const PA: &str = "6e1f3b0c9d6a4f0e8b7a2c1d0e9f8a7b";
const PB: &str = "0b1c2d3e4f5a4b6c8d7e9f0a1b2c3d4e";
const PROBE: &str = include_str!("testdata/nova_probe.json");
const TODAY: &str = "2026-11-24";

/// The instances `populate_nova.py` created, as an inventory.
const NOVA_FIXTURE: &str = r##"
[[network]]
id = "3636b40f-3e32-48da-8a7d-266006b19663"
name = "net1"
project = "6e1f3b0c9d6a4f0e8b7a2c1d0e9f8a7b"
mtu = 1500
[[network.subnet]]
id = "01f852e5-11e6-44b1-8094-631c35e1c0b9"
cidr = "10.10.0.0/24"
gateway = "10.10.0.1"
dns = ["10.0.0.53"]
dhcp = false

[[network]]
id = "81856d96-d47f-4782-8a78-0379124f58eb"
name = "net2"
project = "0b1c2d3e4f5a4b6c8d7e9f0a1b2c3d4e"
mtu = 1500
[[network.subnet]]
id = "090f8344-b419-47ca-b75f-d92443d351c5"
cidr = "10.10.0.0/24"
gateway = "10.10.0.1"
dns = ["10.0.0.53"]
dhcp = false

[[instance]]
uuid = "00000001-0000-4000-8000-000000000001"
name = "vm1-display"
hostname = "vm1"
project = "6e1f3b0c9d6a4f0e8b7a2c1d0e9f8a7b"
availability_zone = "nova"
flavor = "m1.peer"
ec2_id = 1
image_ec2_id = 1
reservation_id = "r-00000001"
root_device_name = "/dev/vda"
user_data = "#cloud-config\nhostname: vm1\n"
meta = { role = "peer-vm1", tier = "test" }
[[instance.key]]
name = "peer-key"
data = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx0Y2FsLXBlZXItdGVzdC1rZXktMDAwMDAwMDAwMDAw peer@test"
[[instance.port]]
id = "29dc867d-0fbe-4163-bd65-7e3546f06813"
network = "3636b40f-3e32-48da-8a7d-266006b19663"
mac = "fa:16:3e:b1:b2:36"
fixed_ips = ["10.10.0.11"]
vif_type = "ovs"

[[instance]]
uuid = "00000002-0000-4000-8000-000000000002"
name = "vm2-display"
hostname = "vm2"
project = "6e1f3b0c9d6a4f0e8b7a2c1d0e9f8a7b"
availability_zone = "nova"
flavor = "m1.peer"
reservation_id = "r-00000002"
root_device_name = "/dev/vda"
meta = { role = "peer-vm2", tier = "test" }
[[instance.port]]
id = "da54d46f-6e9d-41c0-8a80-8f363a5fea17"
network = "3636b40f-3e32-48da-8a7d-266006b19663"
mac = "fa:16:3e:ef:7f:08"
fixed_ips = ["10.10.0.12"]
vif_type = "ovs"

[[instance]]
uuid = "00000003-0000-4000-8000-000000000003"
name = "vm3-display"
hostname = "vm3"
project = "0b1c2d3e4f5a4b6c8d7e9f0a1b2c3d4e"
availability_zone = "nova"
flavor = "m1.peer"
reservation_id = "r-00000003"
root_device_name = "/dev/vda"
user_data = "#cloud-config\nhostname: vm3\n"
meta = { role = "peer-vm3", tier = "test" }
[[instance.key]]
name = "peer-key"
data = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx0Y2FsLXBlZXItdGVzdC1rZXktMDAwMDAwMDAwMDAw peer@test"
[[instance.port]]
id = "8b96a9ad-9ea7-44e0-8540-401ac9003fc2"
network = "81856d96-d47f-4782-8a78-0379124f58eb"
mac = "fa:16:3e:82:3e:bf"
fixed_ips = ["10.10.0.11"]
vif_type = "ovs"
"##;

struct Fixture {
    api: Api,
    store: Arc<PasswordStore>,
    _dir: tempfile::TempDir,
}

fn fixture_with(toml: &str, settings: ApiSettings) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(PasswordStore::open(dir.path()).unwrap());
    let inv = Arc::new(Inventory::from_toml_str(toml).unwrap());
    Fixture {
        api: Api::new(settings, inv, Arc::clone(&store)),
        store,
        _dir: dir,
    }
}

fn nova_settings() -> ApiSettings {
    ApiSettings {
        shared_secret: SECRET.to_vec(),
        vendor_data: Some(serde_json::json!({"peer": "static-vendor-data", "answer": 42})),
        ..ApiSettings::default()
    }
}

fn nova() -> Fixture {
    fixture_with(NOVA_FIXTURE, nova_settings())
}

fn signed(iid: &str, tenant: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    vec![
        (b"X-Forwarded-For".to_vec(), b"10.10.0.11".to_vec()),
        (b"X-Instance-ID".to_vec(), iid.as_bytes().to_vec()),
        (b"X-Tenant-ID".to_vec(), tenant.as_bytes().to_vec()),
        (
            b"X-Instance-ID-Signature".to_vec(),
            sign_instance_id(SECRET, iid).into_bytes(),
        ),
    ]
}

fn call(
    api: &Api,
    method: &str,
    path: &str,
    headers: &[(Vec<u8>, Vec<u8>)],
    body: &[u8],
) -> ApiResponse {
    let hs: Vec<(&[u8], &[u8])> = headers
        .iter()
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    api.handle_on(
        &ApiRequest {
            method,
            target: path.as_bytes(),
            headers: &hs,
            body,
            peer: "10.10.0.11".parse().unwrap(),
        },
        TODAY,
    )
}

fn get(api: &Api, path: &str) -> ApiResponse {
    call(api, "GET", path, &signed(VM1, PA), b"")
}

fn text(r: &ApiResponse) -> &str {
    std::str::from_utf8(&r.body).unwrap()
}

/// Replace the base64 `random_seed` value so bodies can be compared.
fn mask_seed(s: &str) -> String {
    const K: &str = "\"random_seed\": \"";
    match s.find(K) {
        Some(i) => {
            let start = i + K.len();
            let end = start + s[start..].find('"').unwrap();
            format!("{}SEED{}", &s[..start], &s[end..])
        }
        None => s.to_owned(),
    }
}

#[test]
fn golden_replay_of_nova_probe() {
    let f = nova();
    let cases: Vec<serde_json::Value> = serde_json::from_str(PROBE).unwrap();
    assert_eq!(cases.len(), 48);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let req = &case["request"];
        let method = req["method"].as_str().unwrap();
        let path = req["path"].as_str().unwrap();
        let headers: Vec<(Vec<u8>, Vec<u8>)> = req["headers"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_bytes().to_vec(),
                    v.as_str().unwrap().as_bytes().to_vec(),
                )
            })
            .collect();
        let body = req["body"].as_str().unwrap_or("");
        let resp = call(&f.api, method, path, &headers, body.as_bytes());

        let status = case["status"].as_u64().unwrap();
        assert_eq!(u64::from(resp.status), status, "{name}: status");
        let hdr = |n: &str| {
            case["headers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|h| h[0].as_str().unwrap().eq_ignore_ascii_case(n))
                .map(|h| h[1].as_str().unwrap().to_owned())
        };
        assert_eq!(
            Some(resp.content_type.to_owned()),
            hdr("Content-Type"),
            "{name}: content type"
        );
        let want = case["body"].as_str().unwrap();
        let got = text(&resp);
        match name {
            // HEAD: Nova sends no body; ours is dropped by the server, but the
            // length must match what GET would send.
            "head_meta_data_json" => {
                assert_eq!(
                    resp.body.len().to_string(),
                    hdr("Content-Length").unwrap(),
                    "{name}"
                );
            }
            _ => assert_eq!(mask_seed(got), mask_seed(want), "{name}: body"),
        }
        if want.contains("\"random_seed\"") {
            assert_eq!(got.len(), want.len(), "{name}: seed length");
        }
    }
}

#[test]
fn random_seed_is_fresh_base64_of_512_bytes() {
    use base64::Engine as _;
    let f = nova();
    let seed = |r: &ApiResponse| {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        v["random_seed"].as_str().unwrap().to_owned()
    };
    let a = seed(&get(&f.api, "/openstack/latest/meta_data.json"));
    let b = seed(&get(&f.api, "/openstack/latest/meta_data.json"));
    assert_ne!(a, b);
    let raw = base64::engine::general_purpose::STANDARD.decode(a).unwrap();
    assert_eq!(raw.len(), 512);
}

const MD_ALL: &str = "ami-id\nami-launch-index\nami-manifest-path\nblock-device-mapping/\nhostname\ninstance-action\ninstance-id\ninstance-type\nlocal-hostname\nlocal-ipv4\nplacement/\npublic-hostname\npublic-ipv4\npublic-keys/\nreservation-id\nsecurity-groups";

#[test]
fn ec2_meta_data_listing_per_version() {
    let f = nova();
    let cases = [
        ("1.0", "ami-id\nami-launch-index\nami-manifest-path\nhostname\ninstance-id\nlocal-ipv4\npublic-keys/\nreservation-id\nsecurity-groups"),
        ("2007-01-19", "ami-id\nami-launch-index\nami-manifest-path\nhostname\ninstance-id\nlocal-hostname\nlocal-ipv4\npublic-hostname\npublic-ipv4\npublic-keys/\nreservation-id\nsecurity-groups"),
        ("2007-08-29", "ami-id\nami-launch-index\nami-manifest-path\nhostname\ninstance-id\ninstance-type\nlocal-hostname\nlocal-ipv4\npublic-hostname\npublic-ipv4\npublic-keys/\nreservation-id\nsecurity-groups"),
        ("2007-12-15", "ami-id\nami-launch-index\nami-manifest-path\nblock-device-mapping/\nhostname\ninstance-id\ninstance-type\nlocal-hostname\nlocal-ipv4\npublic-hostname\npublic-ipv4\npublic-keys/\nreservation-id\nsecurity-groups"),
        ("2008-02-01", "ami-id\nami-launch-index\nami-manifest-path\nblock-device-mapping/\nhostname\ninstance-id\ninstance-type\nlocal-hostname\nlocal-ipv4\nplacement/\npublic-hostname\npublic-ipv4\npublic-keys/\nreservation-id\nsecurity-groups"),
        ("2008-09-01", MD_ALL),
        ("2009-04-04", MD_ALL),
        ("latest", MD_ALL),
    ];
    for (v, want) in cases {
        let r = get(&f.api, &format!("/{v}/meta-data/"));
        assert_eq!((r.status, text(&r)), (200, want), "{v}");
        assert_eq!(r.content_type, CONTENT_TYPE_TEXT);
    }
    for v in ["2016-09-02", "2021-03-23", "1999-01-01"] {
        assert_eq!(get(&f.api, &format!("/{v}/meta-data/")).status, 404, "{v}");
    }
}

#[test]
fn ec2_values() {
    let f = nova();
    let cases = [
        ("/latest/meta-data/ami-id", "ami-00000001"),
        ("/latest/meta-data/ami-launch-index", "0"),
        ("/latest/meta-data/ami-manifest-path", "FIXME"),
        ("/latest/meta-data/hostname", "vm1.novalocal"),
        ("/latest/meta-data/local-hostname", "vm1.novalocal"),
        ("/latest/meta-data/public-hostname", "vm1.novalocal"),
        ("/latest/meta-data/instance-id", "i-00000001"),
        ("/latest/meta-data/instance-type", "m1.peer"),
        ("/latest/meta-data/instance-action", "none"),
        ("/latest/meta-data/local-ipv4", "10.10.0.11"),
        ("/latest/meta-data/public-ipv4", ""),
        ("/latest/meta-data/reservation-id", "r-00000001"),
        ("/latest/meta-data/security-groups", "default"),
        ("/latest/meta-data/placement/", "availability-zone"),
        ("/latest/meta-data/placement/availability-zone", "nova"),
        ("/latest/meta-data/block-device-mapping/", "ami\nroot"),
        ("/latest/meta-data/block-device-mapping/ami", "vda"),
        ("/latest/meta-data/block-device-mapping/root", "/dev/vda"),
        ("/latest/meta-data/public-keys", "0=peer-key"),
        ("/latest/meta-data/public-keys/0", "openssh-key"),
        ("/1.0/meta-data/public-keys/0/openssh-key", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx0Y2FsLXBlZXItdGVzdC1rZXktMDAwMDAwMDAwMDAw peer@test"),
        ("/2007-12-15/meta-data/hostname", "vm1.novalocal"),
        ("/latest", "meta-data/\nuser-data"),
        ("/ec2/latest", "meta-data/\nuser-data"),
        ("/ec2", "1.0\n2007-01-19\n2007-03-01\n2007-08-29\n2007-10-10\n2007-12-15\n2008-02-01\n2008-09-01\n2009-04-04\nlatest"),
        ("/1.0/user-data", "#cloud-config\nhostname: vm1\n"),
    ];
    for (path, want) in cases {
        let r = get(&f.api, path);
        assert_eq!((r.status, text(&r)), (200, want), "{path}");
    }
    for path in [
        "/2007-01-19/meta-data/instance-type",
        "/2007-08-29/meta-data/block-device-mapping/",
        "/2007-12-15/meta-data/placement/availability-zone",
        "/2008-02-01/meta-data/instance-action",
        "/1.0/meta-data/public-ipv4",
        "/latest/meta-data/kernel-id",
        "/latest/meta-data/public-keys/0/_name",
        "/latest/meta-data/public-keys/1",
    ] {
        assert_eq!(get(&f.api, path).status, 404, "{path}");
    }
}

#[test]
fn ec2_defaults_for_a_bare_instance() {
    let toml = r#"
[[instance]]
uuid = "0000abcd-0000-4000-8000-000000000001"
hostname = "bare"
project = "p"
security_groups = ["web", "default"]
floating_ips = ["203.0.113.7"]
kernel_ec2_id = 5
ramdisk_ec2_id = 6
"#;
    let f = fixture_with(
        toml,
        ApiSettings {
            shared_secret: SECRET.to_vec(),
            dhcp_domain_override: Some(String::new()),
            ..ApiSettings::default()
        },
    );
    let h = signed("0000abcd-0000-4000-8000-000000000001", "p");
    let g = |p: &str| {
        let r = call(&f.api, "GET", p, &h, b"");
        (r.status, String::from_utf8(r.body).unwrap())
    };
    assert_eq!(g("/latest/meta-data/instance-id").1, "i-0000abcd");
    assert_eq!(g("/latest/meta-data/hostname").1, "bare");
    assert_eq!(g("/latest/meta-data/security-groups").1, "web\ndefault");
    assert_eq!(g("/latest/meta-data/public-ipv4").1, "203.0.113.7");
    // No fixed IPv4: X-Forwarded-For.
    assert_eq!(g("/latest/meta-data/local-ipv4").1, "10.10.0.11");
    assert_eq!(g("/latest/meta-data/placement/availability-zone").1, "None");
    assert_eq!(g("/latest/meta-data/kernel-id").1, "aki-00000005");
    assert_eq!(g("/latest/meta-data/ramdisk-id").1, "ari-00000006");
    assert_eq!(
        g("/latest/meta-data/block-device-mapping/").1,
        "ami\nephemeral0\nroot\nswap"
    );
    assert_eq!(
        g("/latest/meta-data/block-device-mapping/root").1,
        "/dev/sda1"
    );
    assert_eq!(g("/latest/meta-data/public-keys/").0, 404);
    assert_eq!(g("/latest/user-data").0, 404);
    assert_eq!(g("/latest").1, "meta-data/");
    assert_eq!(g("/openstack/latest/network_data.json").1, "{}");
    let md = g("/openstack/2013-04-04/meta_data.json").1;
    assert_eq!(
        mask_seed(&md),
        r#"{"uuid": "0000abcd-0000-4000-8000-000000000001", "hostname": "bare", "name": "bare", "launch_index": 0, "availability_zone": null, "random_seed": "SEED"}"#
    );
}

/// Fetch every name every listing shows, like cloud-init's EC2 crawler.
#[test]
fn every_listed_name_is_fetchable() {
    let f = nova();
    for v in [
        "1.0",
        "2007-01-19",
        "2007-12-15",
        "2008-02-01",
        "2009-04-04",
        "latest",
    ] {
        let mut todo = vec![format!("/{v}/")];
        let mut seen = 0;
        while let Some(dir) = todo.pop() {
            let r = get(&f.api, &dir);
            assert_eq!(r.status, 200, "{dir}");
            for line in text(&r).lines() {
                seen += 1;
                if let Some((idx, _name)) = line.split_once('=') {
                    let p = format!("{dir}{idx}/openssh-key");
                    assert_eq!(get(&f.api, &p).status, 200, "{p}");
                } else if line.ends_with('/') {
                    todo.push(format!("{dir}{line}"));
                } else {
                    let p = format!("{dir}{line}");
                    assert_eq!(get(&f.api, &p).status, 200, "{p}");
                }
            }
        }
        assert!(seen > 8, "{v}");
    }
    for v in [
        "2012-08-10",
        "2013-04-04",
        "2015-10-15",
        "2016-10-06",
        "latest",
    ] {
        let r = get(&f.api, &format!("/openstack/{v}"));
        for line in text(&r).lines() {
            let p = format!("/openstack/{v}/{line}");
            assert_eq!(get(&f.api, &p).status, 200, "{p}");
        }
    }
}

#[test]
fn openstack_version_list_hides_future_versions() {
    let f = nova();
    let h = signed(VM1, PA);
    let hs: Vec<(&[u8], &[u8])> = h
        .iter()
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    let req = ApiRequest {
        method: "GET",
        target: b"/openstack/",
        headers: &hs,
        body: b"",
        peer: "10.10.0.11".parse().unwrap(),
    };
    let r = f.api.handle_on(&req, "2020-10-13");
    assert_eq!(
        text(&r),
        "2012-08-10\n2013-04-04\n2013-10-17\n2015-10-15\n2016-06-30\n2016-10-06\n2017-02-22\n2018-08-27\nlatest"
    );
    let r = f.api.handle_on(&req, "2020-10-14");
    assert!(text(&r).ends_with("2018-08-27\n2020-10-14\nlatest"));
    // Hidden versions can still be requested.
    let req = ApiRequest {
        target: b"/openstack/2025-04-04/meta_data.json",
        ..req
    };
    assert_eq!(f.api.handle_on(&req, "2020-01-01").status, 200);
    // The real clock: every version is in the past by now.
    let r = f.api.handle(&ApiRequest {
        target: b"/openstack",
        ..req
    });
    assert!(text(&r).contains("2025-04-04\nlatest"));
}

#[test]
fn openstack_version_dirs() {
    let f = nova();
    let cases = [
        ("2012-08-10", "meta_data.json\nuser_data"),
        ("2013-04-04", "meta_data.json\nuser_data\npassword"),
        ("2013-10-17", "meta_data.json\nuser_data\npassword\nvendor_data.json"),
        ("2015-10-15", "meta_data.json\nuser_data\npassword\nvendor_data.json\nnetwork_data.json"),
        ("2016-10-06", "meta_data.json\nuser_data\npassword\nvendor_data.json\nnetwork_data.json\nvendor_data2.json"),
    ];
    for (v, want) in cases {
        let r = get(&f.api, &format!("/openstack/{v}/"));
        assert_eq!((r.status, text(&r)), (200, want), "{v}");
    }
    let r = call(&f.api, "GET", "/openstack/latest", &signed(VM2, PA), b"");
    assert_eq!(
        text(&r),
        "meta_data.json\npassword\nvendor_data.json\nnetwork_data.json\nvendor_data2.json"
    );
    for p in [
        "/openstack/2012-08-10/password",
        "/openstack/2012-08-10/vendor_data.json",
        "/openstack/2016-06-30/vendor_data2.json",
        "/openstack/2015-10-14/meta_data.json",
        "/openstack/content",
        "/openstack/content/0000",
        "/openstack/latest/meta_data.json/x",
        "/openstack/latest/nope",
    ] {
        assert_eq!(get(&f.api, p).status, 404, "{p}");
    }
    // network_data.json is served for any version (Nova quirk).
    assert_eq!(
        get(&f.api, "/openstack/2012-08-10/network_data.json").status,
        200
    );
    let r = call(
        &f.api,
        "GET",
        "/openstack/latest/user_data",
        &signed(VM2, PA),
        b"",
    );
    assert_eq!(r.status, 404);
}

#[test]
fn meta_data_json_version_gates() {
    let f = nova();
    let cases: Vec<serde_json::Value> = serde_json::from_str(PROBE).unwrap();
    let body = |n: &str| {
        cases.iter().find(|c| c["name"] == n).unwrap()["body"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let folsom = body("os_2012_meta_data_json");
    let latest = mask_seed(&body("os_meta_data_json"));
    let base = folsom.trim_end_matches('}');
    let grizzly = format!("{base}, \"random_seed\": \"SEED\"}}");
    let liberty = format!("{base}, \"random_seed\": \"SEED\", \"project_id\": \"{PA}\"}}");
    let newton =
        format!("{base}, \"random_seed\": \"SEED\", \"project_id\": \"{PA}\", \"devices\": []}}");
    let cases = [
        ("2012-08-10", folsom.clone()),
        ("2013-04-04", grizzly.clone()),
        ("2013-10-17", grizzly),
        ("2015-10-15", liberty),
        ("2016-06-30", newton.clone()),
        ("2018-08-27", newton),
        ("2020-10-14", latest.clone()),
        ("2025-04-04", latest.clone()),
        ("latest", latest),
    ];
    for (v, want) in cases {
        let r = get(&f.api, &format!("/openstack/{v}/meta_data.json"));
        assert_eq!(r.content_type, CONTENT_TYPE_JSON);
        assert_eq!(mask_seed(text(&r)), want, "{v}");
    }
}

const NET_TOML: &str = r#"
[[network]]
id = "n1"
project = "p"
mtu = 9000
[[network.subnet]]
id = "s4"
cidr = "10.0.0.0/24"
gateway = "10.0.0.1"
dns = ["10.0.0.53", "10.0.0.54"]
dhcp = false
routes = [{ destination = "192.168.0.0/16", nexthop = "10.0.0.254" }]
[[network.subnet]]
id = "s6"
cidr = "fd00:10::/64"
gateway = "fd00:10::1"
dns = ["10.0.0.53", "fd00::53"]
dhcp = false
ipv6_mode = "slaac"
[[network]]
id = "n2"
project = "p"
mtu = 1450
[[network.subnet]]
id = "s2"
cidr = "172.16.0.0/24"
dns = ["10.0.0.53"]
[[instance]]
uuid = "u1"
hostname = "h"
project = "p"
[[instance.port]]
id = "0123456789abcdef"
network = "n1"
mac = "FA:16:3E:00:00:01"
fixed_ips = ["10.0.0.5", "fd00:10::5"]
vif_type = "ovs"
[[instance.port]]
id = "p2"
network = "n2"
mac = "fa:16:3e:00:00:02"
fixed_ips = ["172.16.0.5"]
vif_type = "unbound"
devname = "eth1"
[[instance.port]]
id = "p3"
network = "n2"
mac = "fa:16:3e:00:00:03"
fixed_ips = ["192.0.2.1"]
"#;

#[test]
fn network_data_json_shapes() {
    let f = fixture_with(
        NET_TOML,
        ApiSettings {
            shared_secret: SECRET.to_vec(),
            ..ApiSettings::default()
        },
    );
    let r = call(
        &f.api,
        "GET",
        "/openstack/latest/network_data.json",
        &signed("u1", "p"),
        b"",
    );
    assert_eq!(r.content_type, CONTENT_TYPE_TEXT);
    let want = concat!(
        r#"{"links": ["#,
        r#"{"id": "tap0123456789a", "vif_id": "0123456789abcdef", "type": "ovs", "mtu": 9000, "ethernet_mac_address": "fa:16:3e:00:00:01"}, "#,
        r#"{"id": "eth1", "vif_id": "p2", "type": "phy", "mtu": null, "ethernet_mac_address": "fa:16:3e:00:00:02"}], "#,
        r#""networks": ["#,
        r#"{"id": "network0", "type": "ipv4", "link": "tap0123456789a", "ip_address": "10.0.0.5", "netmask": "255.255.255.0", "routes": [{"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": "10.0.0.1"}, {"network": "192.168.0.0", "netmask": "255.255.0.0", "gateway": "10.0.0.254"}], "network_id": "n1", "services": [{"type": "dns", "address": "10.0.0.53"}, {"type": "dns", "address": "10.0.0.54"}]}, "#,
        r#"{"id": "network1", "type": "ipv6_slaac", "link": "tap0123456789a", "ip_address": "fd00:10::5", "netmask": "ffff:ffff:ffff:ffff::", "routes": [{"network": "::", "netmask": "::", "gateway": "fd00:10::1"}], "network_id": "n1", "services": [{"type": "dns", "address": "10.0.0.53"}, {"type": "dns", "address": "fd00::53"}]}, "#,
        r#"{"id": "network2", "type": "ipv4_dhcp", "link": "eth1", "network_id": "n2"}], "#,
        r#""services": [{"type": "dns", "address": "10.0.0.53"}, {"type": "dns", "address": "10.0.0.54"}, {"type": "dns", "address": "fd00::53"}]}"#
    );
    assert_eq!(text(&r), want);
    serde_json::from_slice::<serde_json::Value>(&r.body).unwrap();
}

/// Nova's `_get_nets`: an `ipv6_address_mode` wins over a DHCP server (a
/// SLAAC subnet with Neutron's DHCP on stays `ipv6_slaac`, with its address);
/// the DHCP server still nulls the link's `mtu`.
#[test]
fn an_ipv6_mode_wins_over_dhcp() {
    let slaac = "dhcp = false\nipv6_mode = \"slaac\"";
    assert!(NET_TOML.contains(slaac));
    let f = fixture_with(
        &NET_TOML.replace(slaac, "dhcp = true\nipv6_mode = \"slaac\""),
        ApiSettings {
            shared_secret: SECRET.to_vec(),
            ..ApiSettings::default()
        },
    );
    let r = call(
        &f.api,
        "GET",
        "/openstack/latest/network_data.json",
        &signed("u1", "p"),
        b"",
    );
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["links"][0]["mtu"], serde_json::Value::Null, "{v}");
    let n1 = &v["networks"][1];
    assert_eq!(n1["type"], "ipv6_slaac", "{v}");
    assert_eq!(n1["ip_address"], "fd00:10::5", "{v}");
}

#[test]
fn head_post_put_on_data_paths_return_data() {
    let f = nova();
    let g = get(&f.api, "/latest/meta-data/hostname");
    for m in ["HEAD", "POST", "PUT", "DELETE"] {
        let r = call(
            &f.api,
            m,
            "/latest/meta-data/hostname",
            &signed(VM1, PA),
            b"x",
        );
        assert_eq!(r, g, "{m}");
    }
    // No IMDSv2 in Nova: the token PUT is an EC2 lookup of `api`.
    let r = call(&f.api, "PUT", "/latest/api/token", &signed(VM1, PA), b"");
    assert_eq!(r.status, 404);
}

#[test]
fn unknown_paths_and_extra_segments_are_404() {
    let f = nova();
    for p in [
        "/latest/meta-data/nope",
        "/latest/meta-data/hostname/x",
        "/latest/meta-data/hostname/x/y",
        "/latest/meta-data/security-groups/default",
        "/latest/meta-data/public-keys/0/openssh-key/x",
        "/latest/user-data/x",
        "/latest/dynamic/instance-identity/document",
        "/latest/meta-data/iam/",
        "/nope",
        "/openstack/nope",
        "/latest/meta%ff",
    ] {
        let r = get(&f.api, p);
        assert_eq!(r.status, 404, "{p}");
        assert_eq!(
            text(&r),
            "404 Not Found\n\nThe resource could not be found.\n\n   "
        );
    }
}

#[test]
fn path_normalisation() {
    let f = nova();
    let md = get(&f.api, "/latest/meta-data/");
    for p in [
        "//latest///meta-data/",
        "/latest/meta-data",
        "/ec2/latest/meta-data/",
        "/ec2//latest/./meta-data",
        "/latest/meta-data/?foo=bar",
        "/latest/x/../meta-data",
    ] {
        assert_eq!(get(&f.api, p), md, "{p}");
    }
    assert_eq!(
        text(&get(&f.api, "/latest/meta-data/../meta-data/hostname")),
        "vm1.novalocal"
    );
    assert_eq!(
        text(&get(&f.api, "/ec2/latest/meta-data/instance-id")),
        "i-00000001"
    );
    // Anything normalising to `/` answers the version list without identity.
    for p in ["/", "/foo/../", "/..", "//", "/?x=1", "/./"] {
        let r = call(&f.api, "GET", p, &[], b"");
        assert_eq!(r.status, 200, "{p}");
        assert!(text(&r).starts_with("1.0\n2007-01-19"), "{p}");
        assert!(text(&r).ends_with("2009-04-04\nlatest"), "{p}");
    }
    // ... but `/ec2` and `/openstack` need identity, as in Nova.
    assert_eq!(call(&f.api, "GET", "/ec2", &[], b"").status, 400);
    assert_eq!(call(&f.api, "GET", "/openstack", &[], b"").status, 400);
}

fn without(h: &[(Vec<u8>, Vec<u8>)], name: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    h.iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case(name.as_bytes()))
        .cloned()
        .collect()
}

#[test]
fn identity_errors() {
    let f = nova();
    let good = signed(VM1, PA);
    let check = |h: &[(Vec<u8>, Vec<u8>)], status: u16, msg: &str| {
        let r = call(&f.api, "GET", "/latest/meta-data/instance-id", h, b"");
        assert_eq!(r.status, status, "{msg}");
        assert!(text(&r).contains(msg), "{} vs {msg}", text(&r));
    };
    check(&good, 200, "i-00000001");
    check(
        &without(&good, "x-instance-id"),
        400,
        "X-Instance-ID header is missing",
    );
    check(
        &without(&good, "X-Instance-ID-Signature"),
        400,
        "X-Instance-ID-Signature header is missing",
    );
    check(
        &without(&good, "X-Tenant-ID"),
        400,
        "X-Tenant-ID header is missing",
    );
    check(&[], 400, "X-Instance-ID header is missing");
    let dup = |name: &str, value: &[u8]| {
        let mut h = good.clone();
        h.push((name.as_bytes().to_vec(), value.to_vec()));
        h
    };
    check(
        &dup("x-instance-id", VM1.as_bytes()),
        400,
        "Multiple X-Instance-ID headers",
    );
    check(
        &dup("X-TENANT-ID", PA.as_bytes()),
        400,
        "Multiple X-Tenant-ID headers",
    );
    check(
        &dup(
            "X-Instance-ID-Signature",
            sign_instance_id(SECRET, VM1).as_bytes(),
        ),
        400,
        "Multiple X-Instance-ID-Signature",
    );
    check(
        &dup("X-Metadata-Provider", b"lb"),
        400,
        "X-Metadata-Provider",
    );
    let mut bad_sig = without(&good, "X-Instance-ID-Signature");
    bad_sig.push((b"X-Instance-ID-Signature".to_vec(), vec![b'0'; 64]));
    check(&bad_sig, 403, "Invalid proxy request signature.");
    let mut upper = without(&good, "X-Instance-ID-Signature");
    upper.push((
        b"X-Instance-ID-Signature".to_vec(),
        sign_instance_id(SECRET, VM1).to_uppercase().into_bytes(),
    ));
    check(&upper, 403, "Invalid proxy request signature.");
    let mut empty = without(&good, "X-Instance-ID-Signature");
    empty.push((b"X-Instance-ID-Signature".to_vec(), Vec::new()));
    check(&empty, 403, "Invalid proxy request signature.");
    check(&signed(VM1, PB), 404, "could not be found");
    check(
        &signed("99999999-0000-4000-8000-000000000099", PA),
        404,
        "could not be found",
    );
    let mut non_utf8 = without(&good, "X-Instance-ID");
    non_utf8.push((b"X-Instance-ID".to_vec(), vec![0xff]));
    check(&non_utf8, 400, "UTF-8");
    // Surrounding whitespace in header values is not part of the value.
    let padded: Vec<_> = good
        .iter()
        .map(|(k, v)| (k.clone(), [b" ", v.as_slice(), b"\t"].concat()))
        .collect();
    check(&padded, 200, "i-00000001");
    // X-Forwarded-For is optional.
    check(&without(&good, "X-Forwarded-For"), 200, "i-00000001");
}

#[test]
fn empty_secret_still_checks_signatures() {
    let f = fixture_with(NOVA_FIXTURE, ApiSettings::default());
    let mut h = without(&signed(VM1, PA), "X-Instance-ID-Signature");
    h.push((
        b"X-Instance-ID-Signature".to_vec(),
        sign_instance_id(b"", VM1).into_bytes(),
    ));
    assert_eq!(
        call(&f.api, "GET", "/latest/meta-data/", &h, b"").status,
        200
    );
    let r = call(&f.api, "GET", "/latest/meta-data/", &signed(VM1, PA), b"");
    assert_eq!(r.status, 403);
}

#[test]
fn direct_mode_identifies_by_peer() {
    let f = fixture_with(
        NOVA_FIXTURE,
        ApiSettings {
            service_metadata_proxy: false,
            ..ApiSettings::default()
        },
    );
    let at = |peer: &str| {
        f.api.handle_on(
            &ApiRequest {
                method: "GET",
                target: b"/latest/meta-data/instance-id",
                // Stray identity headers are ignored in direct mode.
                headers: &[(b"X-Instance-ID", VM2.as_bytes())],
                body: b"",
                peer: peer.parse().unwrap(),
            },
            TODAY,
        )
    };
    assert_eq!(text(&at("10.10.0.12")), "i-00000002");
    assert_eq!(text(&at("::ffff:10.10.0.12")), "i-00000002");
    // 10.10.0.11 is on two overlapping networks (vm1 and vm3): ambiguous.
    assert_eq!(at("10.10.0.11").status, 500);
    assert_eq!(at("10.10.0.99").status, 404);
    assert_eq!(at("0.0.0.0").status, 500);
}

#[test]
fn the_inventory_is_the_one_passed_in() {
    let f = nova();
    assert_eq!(get(&f.api, "/latest/meta-data/hostname").status, 200);
    let empty = Arc::new(Inventory::from_toml_str("").unwrap());
    let other = Api::new(nova_settings(), empty, Arc::clone(&f.store));
    assert_eq!(get(&other, "/latest/meta-data/hostname").status, 404);
}

#[test]
fn password_matrix() {
    let f = nova();
    let h = signed(VM1, PA);
    let pw =
        |method: &str, body: &[u8]| call(&f.api, method, "/openstack/latest/password", &h, body);
    let r = pw("GET", b"");
    assert_eq!(
        (r.status, r.content_type, text(&r)),
        (200, CONTENT_TYPE_HTML, "")
    );
    for m in ["HEAD", "PUT", "DELETE", "PATCH"] {
        let r = pw(m, b"x");
        assert_eq!(r.status, 400, "{m}");
        assert!(text(&r).contains("GET and POST only are supported."));
    }
    let r = pw("POST", &[b'a'; MAX_PASSWORD_BYTES + 1]);
    assert_eq!(r.status, 400);
    assert!(text(&r).contains("Request is too large."));
    let mut big_cl = h.clone();
    big_cl.push((b"Content-Length".to_vec(), b"1021".to_vec()));
    let r = call(&f.api, "POST", "/openstack/latest/password", &big_cl, b"x");
    assert_eq!(r.status, 400);
    assert_eq!(pw("POST", &[0xff, 0xfe]).status, 400);
    // An empty POST stores nothing and does not block a later one.
    assert_eq!(pw("POST", b"").status, 200);
    let max = vec![b'p'; MAX_PASSWORD_BYTES];
    let r = pw("POST", &max);
    assert_eq!(
        (r.status, r.content_type, r.body.len()),
        (200, CONTENT_TYPE_HTML, 0)
    );
    let r = pw("GET", b"");
    assert_eq!(r.body, max);
    let r = pw("POST", b"other");
    assert_eq!(r.status, 409);
    // Conflict is checked before size, as in Nova.
    assert_eq!(pw("POST", &[b'a'; 2000]).status, 409);
    // Before Grizzly there is no password.
    let r = call(&f.api, "GET", "/openstack/2012-08-10/password", &h, b"");
    assert_eq!(r.status, 404);
    // Another instance is independent.
    let r = call(
        &f.api,
        "GET",
        "/openstack/2013-04-04/password",
        &signed(VM2, PA),
        b"",
    );
    assert_eq!((r.status, text(&r)), (200, ""));
}

#[test]
fn password_storage_error_is_500() {
    let f = nova();
    f.store
        .fail_writes
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let h = signed(VM1, PA);
    let r = call(&f.api, "POST", "/openstack/latest/password", &h, b"pw");
    assert_eq!(r.status, 500);
    f.store
        .fail_writes
        .store(false, std::sync::atomic::Ordering::Relaxed);
    let r = call(&f.api, "GET", "/openstack/latest/password", &h, b"");
    assert_eq!(text(&r), "");
    let r = call(&f.api, "POST", "/openstack/latest/password", &h, b"pw");
    assert_eq!(r.status, 200);
}

#[test]
fn password_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let inv = Arc::new(Inventory::from_toml_str(NOVA_FIXTURE).unwrap());
    let h = signed(VM1, PA);
    {
        let store = Arc::new(PasswordStore::open(dir.path()).unwrap());
        let api = Api::new(nova_settings(), Arc::clone(&inv), store);
        let r = call(&api, "POST", "/openstack/latest/password", &h, b"s3cret");
        assert_eq!(r.status, 200);
    }
    let store = Arc::new(PasswordStore::open(dir.path()).unwrap());
    let api = Api::new(nova_settings(), inv, store);
    let r = call(&api, "GET", "/openstack/latest/password", &h, b"");
    assert_eq!(text(&r), "s3cret");
    let r = call(&api, "POST", "/openstack/latest/password", &h, b"again");
    assert_eq!(r.status, 409);
}

#[test]
fn only_relayable_statuses() {
    let f = nova();
    let paths = [
        "/",
        "/latest",
        "/latest/meta-data/hostname/x",
        "/openstack/latest/password",
        "/openstack/latest/meta_data.json",
        "/x/y/z",
        "/latest/api/token",
    ];
    let hs = [signed(VM1, PA), signed(VM1, PB), Vec::new()];
    for p in paths {
        for h in &hs {
            for m in ["GET", "HEAD", "POST", "PUT", "OPTIONS"] {
                let r = call(&f.api, m, p, h, b"");
                assert!(
                    [200, 400, 403, 404, 409, 500].contains(&r.status),
                    "{m} {p}: {}",
                    r.status
                );
            }
        }
    }
}

#[test]
fn utc_date() {
    assert_eq!(civil_from_days(0), (1970, 1, 1));
    assert_eq!(civil_from_days(20_416), (2025, 11, 24));
    assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    assert_eq!(utc_today().len(), 10);
    assert_eq!(&*Today::of(civil_from_days(20_416)), "2025-11-24");
    assert_eq!(&*Today::of((900, 3, 7)), "0900-03-07");
    assert_eq!(&*Today::of((12_000, 1, 1)), "9999-12-31");
}

#[test]
fn example_inventory_through_the_api() {
    let toml = include_str!("../../examples/inventory.toml");
    let f = fixture_with(
        toml,
        ApiSettings {
            service_metadata_proxy: false,
            ..ApiSettings::default()
        },
    );
    let r = f.api.handle_on(
        &ApiRequest {
            method: "GET",
            target: b"/openstack/latest/meta_data.json",
            headers: &[],
            body: b"",
            peer: "127.0.0.1".parse().unwrap(),
        },
        TODAY,
    );
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["uuid"], "d0d0d0d0-0000-4000-8000-000000000001");
    assert_eq!(v["hostname"], "demo.novalocal");
}

/// `vendor_data2.json` follows `vendordata_providers`' order (Nova's
/// `_vendor_data2`), and a synchronous handler never renders it without the
/// targets' answers.
#[test]
fn vendor_data2_follows_the_providers_order() {
    use vendordata::{Provider, Target, VendordataConfig};
    let with = |providers: Vec<Provider>| {
        let mut s = nova_settings();
        s.vendordata = VendordataConfig {
            providers,
            targets: vec![Target::parse("t", "vd@http://127.0.0.1:9/").unwrap()],
            ..VendordataConfig::default()
        };
        fixture_with(NOVA_FIXTURE, s)
    };
    let answers = vec![(
        "vd".to_owned(),
        json::Json::Obj(vec![("k".into(), json::Json::Int(1))]),
    )];
    let render = |f: &Fixture| {
        let hs = signed(VM1, PA);
        let hs: Vec<(&[u8], &[u8])> = hs.iter().map(|(k, v)| (&k[..], &v[..])).collect();
        let req = ApiRequest {
            method: "GET",
            target: b"/openstack/latest/vendor_data2.json",
            headers: &hs,
            body: b"",
            peer: "10.10.0.11".parse().unwrap(),
        };
        let sync = f.api.handle_on(&req, TODAY);
        let fetched =
            match f
                .api
                .api
                .handle_fetched(&f.api.inv, &req, TODAY, Passwords::Log, Some(&answers))
            {
                Handled::Answer(r) => r,
                Handled::StorePassword(_) => panic!(),
            };
        (sync.status, String::from_utf8(fetched.body).unwrap())
    };
    let statik = r#""static": {"peer": "static-vendor-data", "answer": 42}"#;
    assert_eq!(
        render(&with(vec![Provider::StaticJson, Provider::DynamicJson])),
        (500, format!("{{{statik}, \"vd\": {{\"k\": 1}}}}"))
    );
    assert_eq!(
        render(&with(vec![Provider::DynamicJson, Provider::StaticJson])),
        (500, format!("{{\"vd\": {{\"k\": 1}}, {statik}}}"))
    );
    // Targets without DynamicJSON are never asked; no providers: `{}`.
    assert_eq!(
        render(&with(vec![Provider::StaticJson])),
        (200, format!("{{{statik}}}"))
    );
    assert_eq!(render(&with(Vec::new())), (200, "{}".to_owned()));
}
