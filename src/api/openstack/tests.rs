//! `meta_data.json` against the renderer it replaced: a tree of owned
//! `Json` values built, then written (`oracle`, the code as it was before
//! the document was written straight into its buffer). Byte for byte the
//! same but for the random seed, for instances with and without keys,
//! metadata, devices of every kind and pinned CPUs, at every version.

use base64::Engine as _;

use super::OPENSTACK_VERSIONS;
use crate::api::RenderCtx;
use crate::inventory::{BusKind, Device, DeviceBus, DeviceKind, Instance, Inventory};

mod oracle {
    use base64::Engine as _;

    use super::super::{
        at_least, EPOXY, GRIZZLY, LIBERTY, NEWTON_ONE, OCATA, RANDOM_SEED_BYTES, ROCKY, VICTORIA,
    };
    use crate::api::json::Json;
    use crate::api::RenderCtx;
    use crate::inventory::{Device, DeviceKind};

    /// `meta_data.json`. Fails only if the OS random source fails.
    pub(super) fn meta_data(
        ctx: &RenderCtx<'_>,
        version: usize,
    ) -> Result<String, getrandom::Error> {
        let inst = ctx.instance;
        let mut md: Vec<(String, Json)> = Vec::with_capacity(12);
        md.push(("uuid".into(), Json::str(&inst.uuid)));
        if !inst.meta.is_empty() {
            let meta = inst
                .meta
                .iter()
                .map(|(k, v)| (k.clone(), Json::str(v)))
                .collect();
            md.push(("meta".into(), Json::Obj(meta)));
        }
        if let Some(key) = inst.keys.first() {
            md.push((
                "public_keys".into(),
                Json::Obj(vec![(key.name.clone(), Json::str(&key.data))]),
            ));
            md.push((
                "keys".into(),
                Json::Arr(vec![Json::Obj(vec![
                    ("name".into(), Json::str(&key.name)),
                    ("type".into(), Json::str(&key.kind)),
                    ("data".into(), Json::str(&key.data)),
                ])]),
            ));
        }
        md.push(("hostname".into(), Json::str(&*ctx.hostname)));
        md.push(("name".into(), Json::str(&inst.name)));
        md.push((
            "launch_index".into(),
            Json::Int(i64::from(inst.launch_index)),
        ));
        md.push((
            "availability_zone".into(),
            inst.availability_zone
                .as_deref()
                .map_or(Json::Null, Json::str),
        ));
        if at_least(version, GRIZZLY) {
            let mut seed = [0u8; RANDOM_SEED_BYTES];
            crate::rt::fill_random(&mut seed)?;
            md.push((
                "random_seed".into(),
                Json::Str(base64::engine::general_purpose::STANDARD.encode(seed)),
            ));
        }
        if at_least(version, LIBERTY) {
            md.push(("project_id".into(), Json::str(&inst.project)));
        }
        if at_least(version, NEWTON_ONE) {
            md.push(("devices".into(), devices(&inst.devices, version)));
        }
        if at_least(version, VICTORIA) {
            let cpus = inst.dedicated_cpus.iter().map(|c| Json::Int(*c)).collect();
            md.push(("dedicated_cpus".into(), Json::Arr(cpus)));
        }
        Ok(Json::Obj(md).to_python_string())
    }

    /// `devices` (`InstanceMetadata._get_device_metadata`): per device, the
    /// keys in Nova's order; a device on an unknown bus or of an unknown type is
    /// left out, and so is a NIC with nothing to show (no tags, and no `vlan` or
    /// `vf_trusted` at this version). `vlan` shows from Ocata, `vf_trusted` from
    /// Rocky, shares from Epoxy.
    fn devices(devs: &[Device], version: usize) -> Json {
        let mut out = Vec::with_capacity(devs.len());
        for d in devs {
            let (bus, address) = match &d.bus {
                None => ("none", "none"),
                Some(b) => match b.kind.name() {
                    Some(name) => (name, b.address.as_deref().unwrap_or("none")),
                    None => continue,
                },
            };
            let mut m: Vec<(String, Json)> = Vec::with_capacity(8);
            let opt = |v: &Option<String>| v.as_deref().map_or(Json::Null, Json::str);
            match &d.kind {
                DeviceKind::Nic {
                    mac,
                    vlan,
                    vf_trusted,
                } => {
                    if let (true, Some(v)) = (at_least(version, OCATA), vlan) {
                        m.push(("vlan".into(), Json::Int(*v)));
                    }
                    if at_least(version, ROCKY) {
                        m.push((
                            "vf_trusted".into(),
                            Json::Value(serde_json::Value::Bool(*vf_trusted)),
                        ));
                    }
                    // Shown only with something to show (m holds vlan/vf_trusted).
                    if d.tags.is_none() && m.is_empty() {
                        continue;
                    }
                    m.push(("type".into(), Json::str("nic")));
                    m.push(("mac".into(), Json::str(mac)));
                }
                DeviceKind::Disk { serial, path } => {
                    m.push(("type".into(), Json::str("disk")));
                    if let Some(s) = serial {
                        m.push(("serial".into(), opt(s)));
                    }
                    if let Some(p) = path {
                        m.push(("path".into(), opt(p)));
                    }
                }
                DeviceKind::Share { share_id, tag } if at_least(version, EPOXY) => {
                    m.push(("type".into(), Json::str("share")));
                    m.push(("share_id".into(), opt(share_id)));
                    m.push(("tag".into(), opt(tag)));
                }
                DeviceKind::Share { .. } | DeviceKind::Unknown => continue,
            }
            m.push(("bus".into(), Json::str(bus)));
            m.push(("address".into(), Json::str(address)));
            if let Some(tags) = &d.tags {
                m.push((
                    "tags".into(),
                    Json::Arr(tags.iter().map(Json::str).collect()),
                ));
            }
            out.push(Json::Obj(m));
        }
        Json::Arr(out)
    }
}

/// `"random_seed": "<base64>"` → `"random_seed": "SEED"`, after checking
/// the seed is 512 bytes of base64.
fn mask_seed(doc: &str) -> String {
    const AT: &str = "\"random_seed\": \"";
    let Some(i) = doc.find(AT) else {
        return doc.to_owned();
    };
    let start = i + AT.len();
    let len = doc[start..].find('"').unwrap();
    let seed = base64::engine::general_purpose::STANDARD
        .decode(&doc[start..start + len])
        .unwrap();
    assert_eq!(seed.len(), 512);
    format!("{}SEED{}", &doc[..start], &doc[start + len..])
}

fn instances() -> (Inventory, Vec<Instance>) {
    let inv = Inventory::from_toml_str(
        r##"
[[instance]]
uuid = "00000001-0000-4000-8000-000000000001"
name = "full \"quoted\" \u00e9"
hostname = "full"
project = "p"
availability_zone = "az-1"
launch_index = 3
meta = { role = "web", "k\\ey" = "v\n\u2603", empty = "" }
[[instance.key]]
name = "key-1"
data = "ssh-ed25519 AAAA key@one"
[[instance.key]]
name = "second"
data = "ssh-ed25519 BBBB key@two"

[[instance]]
uuid = "00000002-0000-4000-8000-000000000002"
hostname = "bare"
project = "p"
"##,
    )
    .unwrap();
    let full = inv
        .instance("00000001-0000-4000-8000-000000000001")
        .unwrap()
        .clone();
    let bare = inv
        .instance("00000002-0000-4000-8000-000000000002")
        .unwrap()
        .clone();
    let bus = |kind, address: Option<&str>| {
        Some(DeviceBus {
            kind,
            address: address.map(str::to_owned),
        })
    };
    let nic = |vlan, vf_trusted| DeviceKind::Nic {
        mac: "fa:16:3e:00:00:01".into(),
        vlan,
        vf_trusted,
    };
    let tags = |t: &[&str]| Some(t.iter().map(|s| (*s).to_owned()).collect());
    let mut devices = full.clone();
    devices.dedicated_cpus = vec![2, 3, 3];
    devices.devices = vec![
        Device {
            bus: bus(BusKind::Pci, Some("0000:00:02.0")),
            kind: nic(Some(100), true),
            tags: tags(&["nic1", "t\u{e9}g"]),
        },
        // No tags: shown only from Ocata (vlan) or Rocky (vf_trusted).
        Device {
            bus: bus(BusKind::Pci, None),
            kind: nic(Some(7), false),
            tags: None,
        },
        Device {
            bus: None,
            kind: nic(None, false),
            tags: None,
        },
        Device {
            bus: bus(BusKind::Scsi, Some("0:0:0:1")),
            kind: DeviceKind::Disk {
                serial: Some(Some("disk-1".into())),
                path: Some(None),
            },
            tags: tags(&[]),
        },
        Device {
            bus: bus(BusKind::Ide, None),
            kind: DeviceKind::Disk {
                serial: None,
                path: Some(Some("/dev/sdb".into())),
            },
            tags: None,
        },
        Device {
            bus: bus(BusKind::Unknown, None),
            kind: DeviceKind::Disk {
                serial: None,
                path: None,
            },
            tags: None,
        },
        Device {
            bus: bus(BusKind::Usb, Some("1")),
            kind: DeviceKind::Share {
                share_id: Some("share-1".into()),
                tag: None,
            },
            tags: None,
        },
        Device {
            bus: None,
            kind: DeviceKind::Unknown,
            tags: tags(&["x"]),
        },
    ];
    let mut no_az = devices.clone();
    no_az.availability_zone = None;
    no_az.keys.clear();
    no_az.meta.clear();
    (inv, vec![full, bare, devices, no_az])
}

#[test]
fn meta_data_json_is_what_the_tree_wrote() {
    let (inv, instances) = instances();
    for inst in &instances {
        for hostname in ["full.example.org", "h\u{e9}"] {
            let ctx = RenderCtx {
                inventory: &inv,
                instance: inst,
                hostname: hostname.into(),
                remote_address: "",
                vendor_data: None,
                providers: &[],
                dynamic: None,
            };
            for (version, name) in OPENSTACK_VERSIONS.iter().enumerate() {
                let want = mask_seed(&oracle::meta_data(&ctx, version).unwrap());
                let got = mask_seed(&super::meta_data(&ctx, version).unwrap());
                assert_eq!(got, want, "{} at {}", inst.name, name);
            }
        }
    }
}
