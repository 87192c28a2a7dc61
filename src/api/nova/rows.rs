//! Nova's rows for one instance → the model the renderers use
//! ([`crate::inventory::Instance`] and its networks), as
//! `nova.api.metadata.base.InstanceMetadata` reads them.
//!
//! Everything here is untrusted input: a cell database is written by many
//! services, and `instance_extra` holds oslo.versionedobjects JSON that
//! other releases may shape differently. Every decode names the column and
//! what was wrong ([`DecodeError`]); the caller turns it into a 500 for that
//! one instance and a log line. Nothing here panics on a row's content.
//!
//! What comes from where (Nova 34):
//! - `instances`: uuid, project_id, hostname, display_name, launch_index,
//!   availability_zone, reservation_id, root_device_name, key_name,
//!   user_data (base64, decoded as Nova's `base64.decode_as_bytes`);
//! - `instance_extra.flavor` (`{"cur": Flavor}`): the EC2 `instance-type`;
//! - `instance_extra.keypairs` (`KeyPairList`): the first keypair, shown
//!   when `instances.key_name` is set (Nova's `meta_data.json` rule);
//! - `instance_metadata` (not deleted): `meta`;
//! - `instance_system_metadata` `password_*`: the password, the chunks
//!   concatenated in key order (`password.extract_password`);
//! - `instance_info_caches.network_info`: ports, networks, subnets, floating
//!   IPs (Nova's `network.model.NetworkInfo` as JSON);
//! - `instance_id_mappings`/`s3_images` ids: the EC2 ids;
//! - `instance_extra.device_metadata` (`InstanceDeviceMetadata`): the tagged
//!   `devices`; `instance_extra.numa_topology` (`InstanceNUMATopology`): the
//!   `dedicated_cpus`, after the same upgrade of old cells Nova applies on
//!   load (`_migrate_legacy_dedicated_instance_cpuset`);
//! - `block_device_mapping` and `instances.default_{ephemeral,swap}_device`:
//!   EC2's `block-device-mapping`.
//!
//! o.vo objects are checked as `obj_from_primitive` checks them: the name
//! (a subclass where Nova allows one), the `nova` namespace, and a version
//! this Nova can read (same major, minor not newer); a value is validated as
//! its field's `coerce` does (MAC and bus addresses by Nova's patterns).
//! Where Nova would coerce a value of the wrong JSON type (`"7"` as a CPU,
//! `1` as `vf_trusted`), we refuse the row instead: no Nova writes those, and
//! a 500 is safer than a guess.

use std::collections::BTreeMap;
use std::net::IpAddr;

use base64::Engine as _;
use serde_json::Value;

use crate::inventory::{
    self, BlockDevice, BlockDeviceKind, BusKind, Cidr, Device, DeviceBus, DeviceKind, Instance,
    Ipv6Mode, Key, Network, Port, Route, Subnet,
};

/// A row of `instances`, the columns the metadata uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceRow {
    /// `id`: the cell-local integer id (not the EC2 id).
    pub id: i64,
    /// `uuid`
    pub uuid: String,
    /// `project_id`
    pub project_id: Option<String>,
    /// `hostname`
    pub hostname: Option<String>,
    /// `display_name`
    pub display_name: Option<String>,
    /// `launch_index`
    pub launch_index: Option<i64>,
    /// `availability_zone`
    pub availability_zone: Option<String>,
    /// `reservation_id`
    pub reservation_id: Option<String>,
    /// `image_ref` (a Glance UUID, or empty for volume-backed)
    pub image_ref: Option<String>,
    /// `kernel_id`
    pub kernel_id: Option<String>,
    /// `ramdisk_id`
    pub ramdisk_id: Option<String>,
    /// `key_name`
    pub key_name: Option<String>,
    /// `user_data` (base64 text)
    pub user_data: Option<String>,
    /// `root_device_name`
    pub root_device_name: Option<String>,
    /// `default_ephemeral_device`
    pub default_ephemeral_device: Option<String>,
    /// `default_swap_device`
    pub default_swap_device: Option<String>,
}

/// A row of `block_device_mapping` (not deleted), the columns EC2 shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BdmRow {
    /// `source_type` (`blank`, `image`, `snapshot`, `volume`)
    pub source_type: Option<String>,
    /// `destination_type` (`local`, `volume`)
    pub destination_type: Option<String>,
    /// `guest_format` (`swap` for a swap disk)
    pub guest_format: Option<String>,
    /// `device_name`
    pub device_name: Option<String>,
}

/// The `instance_extra` columns the metadata uses (JSON text each).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtraRow {
    /// `flavor`
    pub flavor: Option<String>,
    /// `keypairs`
    pub keypairs: Option<String>,
    /// `device_metadata`
    pub device_metadata: Option<String>,
    /// `numa_topology`
    pub numa_topology: Option<String>,
}

/// The EC2 integer ids (`instance_id_mappings.id`, `s3_images.id`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ec2Ids {
    /// `i-%08x`
    pub instance: i64,
    /// `ami-%08x`; `None` without an image (a volume-backed instance: Nova
    /// then shows `None` as the `ami-id`).
    pub image: Option<i64>,
    /// `aki-%08x`
    pub kernel: Option<i64>,
    /// `ari-%08x`
    pub ramdisk: Option<i64>,
}

/// Everything read for one instance.
#[derive(Debug, Clone, Default)]
pub struct Rows {
    /// `instances`
    pub instance: InstanceRow,
    /// `instance_extra` (Nova creates it with the instance).
    pub extra: Option<ExtraRow>,
    /// `instance_metadata` (key, value), not deleted, in id order.
    pub metadata: Vec<(String, Option<String>)>,
    /// `instance_system_metadata` (key, value), not deleted.
    pub system_metadata: Vec<(String, Option<String>)>,
    /// `instance_info_caches.network_info`
    pub network_info: Option<String>,
    /// `block_device_mapping`, not deleted, in id order.
    pub block_devices: Vec<BdmRow>,
    /// EC2 ids.
    pub ec2: Ec2Ids,
    /// Security group names.
    pub security_groups: Vec<String>,
}

/// One instance, ready to render.
#[derive(Debug)]
pub struct Decoded {
    /// The instance and the networks its ports are on.
    pub instance: Instance,
    /// The networks, one per network id in `network_info`.
    pub networks: Vec<Network>,
    /// The stored password, if one is set.
    pub password: Option<String>,
}

/// A row that cannot be rendered; names the column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{column}: {message}")]
pub struct DecodeError {
    /// `table.column` (plus a JSON path where useful).
    pub column: String,
    /// What is wrong.
    pub message: String,
}

fn bad(column: impl Into<String>, message: impl Into<String>) -> DecodeError {
    DecodeError {
        column: column.into(),
        message: message.into(),
    }
}

fn json(column: &str, text: &str) -> Result<Value, DecodeError> {
    serde_json::from_str(text).map_err(|e| bad(column, format!("not valid JSON: {e}")))
}

/// `nova_object.data` of an oslo.versionedobjects primitive named `name`.
fn ovo_data<'v>(column: &str, v: &'v Value, name: &str) -> Result<&'v Value, DecodeError> {
    match v.get("nova_object.name").and_then(Value::as_str) {
        Some(n) if n == name => {}
        Some(n) => return Err(bad(column, format!("a {n} where a {name} was expected"))),
        None => return Err(bad(column, format!("not a {name} object"))),
    }
    v.get("nova_object.data")
        .filter(|d| d.is_object())
        .ok_or_else(|| bad(column, format!("{name} without nova_object.data")))
}

fn ec2_id(column: &str, id: i64) -> Result<u32, DecodeError> {
    u32::try_from(id).map_err(|_| bad(column, format!("id {id} does not fit i-%08x")))
}

/// The flavor name from `instance_extra.flavor` (`{"cur": Flavor, …}`).
pub fn flavor_name(text: &str) -> Result<String, DecodeError> {
    const COL: &str = "instance_extra.flavor";
    let v = json(COL, text)?;
    let cur = v.get("cur").ok_or_else(|| bad(COL, "no \"cur\" flavor"))?;
    let data = ovo_data(COL, cur, "Flavor")?;
    data.get("name")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| bad(COL, "the flavor has no name"))
}

/// The first keypair of `instance_extra.keypairs` (a `KeyPairList`), if any.
pub fn first_keypair(text: &str) -> Result<Option<Key>, DecodeError> {
    const COL: &str = "instance_extra.keypairs";
    let v = json(COL, text)?;
    let data = ovo_data(COL, &v, "KeyPairList")?;
    let objects = data
        .get("objects")
        .and_then(Value::as_array)
        .ok_or_else(|| bad(COL, "KeyPairList without objects"))?;
    let Some(first) = objects.first() else {
        return Ok(None);
    };
    let kp = ovo_data(COL, first, "KeyPair")?;
    let field = |k: &str| {
        kp.get(k)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| bad(COL, format!("keypair without {k}")))
    };
    Ok(Some(Key {
        name: field("name")?,
        // KeyPair.type defaults to ssh (keypair_type_ssh) in old rows.
        kind: kp
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("ssh")
            .to_owned(),
        data: field("public_key")?,
    }))
}

/// `password.extract_password`: the `password_*` values in key order,
/// concatenated; `None` when that is empty.
///
/// `system_metadata` is in row id order. A key may have several rows: the
/// table has no unique key, and a nova-api-metadata POST racing another
/// writer (two Nova workers, or Nova and us) inserts its chunks unlocked
/// (`docs/nova-source.md`). Nova loads the rows into a dict
/// (`utils.metadata_to_dict`), so the last row of a key wins, and so it
/// does here: never both values glued together.
pub fn extract_password(system_metadata: &[(String, Option<String>)]) -> Option<String> {
    let chunks: std::collections::BTreeMap<&str, &str> = system_metadata
        .iter()
        .filter(|(k, _)| k.starts_with("password_"))
        .map(|(k, v)| (k.as_str(), v.as_deref().unwrap_or("")))
        .collect();
    let pw: String = chunks.into_values().collect();
    (!pw.is_empty()).then_some(pw)
}

/// An o.vo primitive as `obj_from_primitive` accepts it: one of `allowed`
/// (name, newest minor version of major 1 this Nova has), in the `nova`
/// namespace. Returns the name, the minor version and `nova_object.data`.
fn ovo<'v>(
    column: &str,
    v: &'v Value,
    allowed: &[(&'static str, u32)],
) -> Result<(&'static str, u32, &'v Value), DecodeError> {
    let expected = || {
        allowed
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(" or ")
    };
    let Some(name) = v.get("nova_object.name").and_then(Value::as_str) else {
        return Err(bad(column, format!("not a {} object", expected())));
    };
    let Some(&(name, newest)) = allowed.iter().find(|(n, _)| *n == name) else {
        return Err(bad(
            column,
            format!("a {name} where a {} was expected", expected()),
        ));
    };
    if v.get("nova_object.namespace").and_then(Value::as_str) != Some("nova") {
        return Err(bad(column, format!("{name} not in the nova namespace")));
    }
    let version = v
        .get("nova_object.version")
        .and_then(Value::as_str)
        .unwrap_or("");
    let minor = match version.split_once('.') {
        Some(("1", m)) => m.parse::<u32>().ok().filter(|m| *m <= newest),
        _ => None,
    }
    .ok_or_else(|| {
        bad(
            column,
            format!("{name} version {version:?}; this Nova reads 1.0 to 1.{newest}"),
        )
    })?;
    let data = v
        .get("nova_object.data")
        .filter(|d| d.is_object())
        .ok_or_else(|| bad(column, format!("{name} without nova_object.data")))?;
    Ok((name, minor, data))
}

/// `fields.MACAddress.coerce`: lower case, `-` as `:`, six pairs of hex digits.
fn mac_field(column: &str, v: &Value) -> Result<String, DecodeError> {
    let s = v
        .as_str()
        .ok_or_else(|| bad(column, format!("mac {v} is not a string")))?;
    let m = s.to_ascii_lowercase().replace('-', ":");
    let b = m.as_bytes();
    let ok = b.len() == 17
        && b.iter().enumerate().all(|(i, c)| {
            if i % 3 == 2 {
                *c == b':'
            } else {
                matches!(c, b'0'..=b'9' | b'a'..=b'f')
            }
        });
    if !ok {
        return Err(bad(column, format!("malformed MAC {s:?}")));
    }
    Ok(m)
}

/// `groups` runs of `[a-f0-9]+` joined by `:` at the start of `s` (Nova's
/// address patterns are matched with `re.match`: a prefix).
fn hex_groups_prefix(s: &str, groups: usize) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    for g in 0..groups {
        if g > 0 {
            if b.get(i) != Some(&b':') {
                return false;
            }
            i += 1;
        }
        let start = i;
        while b
            .get(i)
            .is_some_and(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
        {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    true
}

/// A bus address, validated as its field's `coerce` does.
fn bus_address(column: &str, kind: BusKind, v: &Value) -> Result<String, DecodeError> {
    let s = v
        .as_str()
        .ok_or_else(|| bad(column, format!("address {v} is not a string")))?;
    let digit = |c: Option<&u8>| c.is_some_and(u8::is_ascii_digit);
    let (ok, value) = match kind {
        // oslo's PCIAddress: ^[0-9a-f]{4}:[0-9a-f]{2}:[0-1][0-9a-f].[0-7]$ on
        // the lower-cased value (the `.` is any character).
        BusKind::Pci => {
            let l = s.to_ascii_lowercase();
            let c: Vec<char> = l.chars().collect();
            let hex = |i: usize| c.get(i).is_some_and(|c| matches!(c, '0'..='9' | 'a'..='f'));
            let ok = c.len() == 12
                && (0..4).all(hex)
                && c[4] == ':'
                && (5..7).all(hex)
                && c[7] == ':'
                && matches!(c[8], '0' | '1')
                && hex(9)
                && c[10] != '\n'
                && matches!(c[11], '0'..='7');
            (ok, l)
        }
        BusKind::Usb => (hex_groups_prefix(s, 2), s.to_owned()),
        BusKind::Scsi => (hex_groups_prefix(s, 4), s.to_owned()),
        // [0-1]:[0-1]
        BusKind::Ide => {
            let b = s.as_bytes();
            let bit = |i: usize| matches!(b.get(i), Some(b'0' | b'1'));
            (bit(0) && b.get(1) == Some(&b':') && bit(2), s.to_owned())
        }
        // (00[0-9]{2}00)|[1-9][0-9]+
        BusKind::Xen => {
            let b = s.as_bytes();
            let six = b.len() >= 6
                && b.starts_with(b"00")
                && digit(b.get(2))
                && digit(b.get(3))
                && b[4..6] == *b"00";
            let num = matches!(b.first(), Some(b'1'..=b'9')) && digit(b.get(1));
            (six || num, s.to_owned())
        }
        BusKind::Unknown => (true, s.to_owned()),
    };
    if !ok {
        return Err(bad(column, format!("malformed bus address {s:?}")));
    }
    Ok(value)
}

/// A nullable string field: `None` unset, `Some(None)` null.
fn opt_string(column: &str, v: &Value, key: &str) -> Result<Option<Option<String>>, DecodeError> {
    match v.get(key) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(Value::String(s)) => Ok(Some(Some(s.clone()))),
        Some(other) => Err(bad(column, format!("{key} {other} is not a string"))),
    }
}

/// The devices of `instance_extra.device_metadata` (`InstanceDeviceMetadata`).
///
/// # Errors
/// Not JSON, an object Nova would not load, or a field it would refuse.
pub fn device_metadata(text: &str) -> Result<Vec<Device>, DecodeError> {
    const COL: &str = "instance_extra.device_metadata";
    const DEVICES: &[(&str, u32)] = &[
        ("NetworkInterfaceMetadata", 2),
        ("DiskMetadata", 0),
        ("ShareMetadata", 0),
        ("DeviceMetadata", 0),
    ];
    const BUSES: &[(&str, u32)] = &[
        ("PCIDeviceBus", 0),
        ("USBDeviceBus", 0),
        ("SCSIDeviceBus", 0),
        ("IDEDeviceBus", 0),
        ("XenDeviceBus", 0),
        ("DeviceBus", 0),
    ];
    let v = json(COL, text)?;
    let (_, _, data) = ovo(COL, &v, &[("InstanceDeviceMetadata", 0)])?;
    let list = data
        .get("devices")
        .and_then(Value::as_array)
        .ok_or_else(|| bad(COL, "InstanceDeviceMetadata without a devices list"))?;
    let mut out = Vec::with_capacity(list.len());
    for (i, d) in list.iter().enumerate() {
        let col = format!("{COL}.devices[{i}]");
        let (name, _, dd) = ovo(&col, d, DEVICES)?;
        let bus = match dd.get("bus") {
            None => None,
            Some(b) => {
                let bcol = format!("{col}.bus");
                let (bname, _, bd) = ovo(&bcol, b, BUSES)?;
                let kind = match bname {
                    "PCIDeviceBus" => BusKind::Pci,
                    "USBDeviceBus" => BusKind::Usb,
                    "SCSIDeviceBus" => BusKind::Scsi,
                    "IDEDeviceBus" => BusKind::Ide,
                    "XenDeviceBus" => BusKind::Xen,
                    _ => BusKind::Unknown,
                };
                // The base DeviceBus has no address field: one is ignored.
                let address = match (kind, bd.get("address")) {
                    (BusKind::Unknown, _) | (_, None) => None,
                    (_, Some(a)) => Some(bus_address(&bcol, kind, a)?),
                };
                Some(DeviceBus { kind, address })
            }
        };
        let tags = match dd.get("tags") {
            None => None,
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|t| {
                        t.as_str()
                            .map(str::to_owned)
                            .ok_or_else(|| bad(&col, format!("tag {t} is not a string")))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            Some(other) => return Err(bad(&col, format!("tags {other} is not a list"))),
        };
        let kind = match name {
            "NetworkInterfaceMetadata" => DeviceKind::Nic {
                mac: mac_field(
                    &col,
                    dd.get("mac")
                        .ok_or_else(|| bad(&col, "a NIC without a mac"))?,
                )?,
                vlan: match dd.get("vlan") {
                    None => None,
                    Some(v) => Some(
                        v.as_i64()
                            .ok_or_else(|| bad(&col, format!("vlan {v} is not an integer")))?,
                    ),
                },
                // Not nullable, with a default: null coerces to False.
                vf_trusted: match dd.get("vf_trusted") {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => *b,
                    Some(other) => {
                        return Err(bad(&col, format!("vf_trusted {other} is not a boolean")))
                    }
                },
            },
            "DiskMetadata" => DeviceKind::Disk {
                serial: opt_string(&col, dd, "serial")?,
                path: opt_string(&col, dd, "path")?,
            },
            "ShareMetadata" => {
                let field = |k: &str| {
                    opt_string(&col, dd, k)?
                        .ok_or_else(|| bad(&col, format!("a share without {k}")))
                };
                DeviceKind::Share {
                    share_id: field("share_id")?,
                    tag: field("tag")?,
                }
            }
            _ => DeviceKind::Unknown,
        };
        out.push(Device { bus, kind, tags });
    }
    Ok(out)
}

/// `dedicated_cpus` from `instance_extra.numa_topology`: every cell's
/// `pcpuset`, sorted, after Nova's load-time upgrade of cells older than
/// 1.6 (`InstanceNUMATopology._migrate_legacy_dedicated_instance_cpuset`).
/// A pre-Liberty topology (no o.vo envelope) has none (Nova converts it
/// with an empty `pcpuset`).
///
/// # Errors
/// Not JSON, an object Nova would not load, or a CPU set it could not read.
pub fn dedicated_cpus(text: &str) -> Result<Vec<i64>, DecodeError> {
    const COL: &str = "instance_extra.numa_topology";
    let v = json(COL, text)?;
    if !v.is_object() {
        return Err(bad(COL, "not a NUMA topology object"));
    }
    if v.get("nova_object.name").is_none() {
        return Ok(Vec::new());
    }
    let (_, _, data) = ovo(COL, &v, &[("InstanceNUMATopology", 3)])?;
    let cells = data
        .get("cells")
        .and_then(Value::as_array)
        .ok_or_else(|| bad(COL, "InstanceNUMATopology without a cells list"))?;
    let mut out = Vec::new();
    for (i, c) in cells.iter().enumerate() {
        let col = format!("{COL}.cells[{i}]");
        let (_, minor, cd) = ovo(&col, c, &[("InstanceNUMACell", 6)])?;
        let set = |k: &str| -> Result<Option<Vec<i64>>, DecodeError> {
            match cd.get(k) {
                None => Ok(None),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|x| {
                        x.as_i64()
                            .ok_or_else(|| bad(&col, format!("{k} holds {x}, not a CPU number")))
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(Some),
                Some(other) => Err(bad(&col, format!("{k} {other} is not a set"))),
            }
        };
        let need = |s: Option<Vec<i64>>, k: &str| {
            s.ok_or_else(|| bad(&col, format!("a cell without {k}")))
        };
        let (cpuset, pcpuset) = (set("cpuset")?, set("pcpuset")?);
        let pcpus = if minor < 4 {
            // Too old to upgrade: Nova keeps it as it is.
            need(pcpuset, "pcpuset")?
        } else {
            // An ephemeral object: an unset cpu_policy is its default, None.
            let policy = match cd.get("cpu_policy") {
                None | Some(Value::Null) => None,
                Some(Value::String(p))
                    if matches!(p.as_str(), "dedicated" | "shared" | "mixed") =>
                {
                    Some(p.as_str())
                }
                Some(other) => return Err(bad(&col, format!("cpu_policy {other} is unknown"))),
            };
            let dedicated = policy == Some("dedicated");
            if minor >= 6 {
                need(pcpuset, "pcpuset")?
            } else if minor == 5
                && dedicated
                && (!need(cpuset.clone(), "cpuset")?.is_empty()
                    || pcpuset.as_ref().is_none_or(Vec::is_empty))
            {
                // Inconsistent; Nova logs it and leaves the cell as it is.
                need(pcpuset, "pcpuset")?
            } else if dedicated {
                match pcpuset {
                    Some(p) if !p.is_empty() => p,
                    _ => need(cpuset, "cpuset")?,
                }
            } else if policy == Some("mixed") {
                need(pcpuset, "pcpuset")?
            } else {
                Vec::new()
            }
        };
        out.extend(pcpus);
    }
    out.sort_unstable();
    Ok(out)
}

/// `block_device_mapping` rows → what EC2 shows, with the enum values
/// Nova's `BlockDeviceMapping` fields accept.
///
/// # Errors
/// A `source_type` or `destination_type` Nova does not know.
pub fn block_devices(rows: &[BdmRow]) -> Result<Vec<BlockDevice>, DecodeError> {
    rows.iter()
        .map(|r| {
            let check = |col: &str, v: &Option<String>, ok: &[&str]| match v.as_deref() {
                None => Ok(()),
                Some(x) if ok.contains(&x) => Ok(()),
                Some(x) => Err(bad(col, format!("{x:?} is not one of {}", ok.join(", ")))),
            };
            check(
                "block_device_mapping.source_type",
                &r.source_type,
                &["blank", "image", "snapshot", "volume"],
            )?;
            check(
                "block_device_mapping.destination_type",
                &r.destination_type,
                &["local", "volume"],
            )?;
            let kind = if r.destination_type.as_deref() == Some("volume") {
                BlockDeviceKind::Volume
            } else if r.source_type.as_deref() != Some("blank") {
                BlockDeviceKind::Other
            } else if r.guest_format.as_deref() == Some("swap") {
                BlockDeviceKind::Swap
            } else {
                BlockDeviceKind::Ephemeral
            };
            Ok(BlockDevice {
                kind,
                device_name: r.device_name.clone(),
            })
        })
        .collect()
}

fn str_at<'v>(v: &'v Value, key: &str) -> Option<&'v str> {
    v.get(key).and_then(Value::as_str)
}

fn ip_at(col: &str, v: &Value) -> Result<Option<IpAddr>, DecodeError> {
    match v.get("address") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => s
            .parse()
            .map(Some)
            .map_err(|_| bad(col, format!("{s:?} is not an IP address"))),
        Some(other) => Err(bad(col, format!("address {other} is not a string"))),
    }
}

fn array<'v>(col: &str, v: &'v Value, key: &str) -> Result<&'v [Value], DecodeError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(_) => Err(bad(col, format!("{key} is not a list"))),
    }
}

/// What `network_info` holds: the ports, their networks, the floating IPs.
pub type NetworkInfo = (Vec<Port>, Vec<Network>, Vec<IpAddr>);

/// Ports, networks and floating IPs from `instance_info_caches.network_info`.
///
/// # Errors
/// Not JSON, not a list of VIFs, or a field of the wrong type.
pub fn network_info(text: &str) -> Result<NetworkInfo, DecodeError> {
    const COL: &str = "instance_info_caches.network_info";
    let v = json(COL, text)?;
    let vifs = match &v {
        Value::Null => return Ok(Default::default()),
        Value::Array(a) => a,
        _ => return Err(bad(COL, "not a list of VIFs")),
    };
    let mut ports = Vec::with_capacity(vifs.len());
    let mut networks: Vec<Network> = Vec::new();
    let mut floating = Vec::new();
    for (i, vif) in vifs.iter().enumerate() {
        let col = format!("{COL}[{i}]");
        let id = str_at(vif, "id").ok_or_else(|| bad(&col, "VIF without an id"))?;
        let mac = str_at(vif, "address")
            .and_then(inventory::net::parse_mac)
            .ok_or_else(|| bad(&col, "VIF without a MAC address"))?;
        let net = vif.get("network").filter(|n| n.is_object());
        let mut fixed_ips = Vec::new();
        let mut net_id = String::new();
        if let Some(net) = net {
            net_id = str_at(net, "id").unwrap_or_default().to_owned();
            let meta = net.get("meta");
            let mut subnets = Vec::new();
            for (si, s) in array(&col, net, "subnets")?.iter().enumerate() {
                let scol = format!("{col}.network.subnets[{si}]");
                let cidr_s = str_at(s, "cidr").ok_or_else(|| bad(&scol, "no cidr"))?;
                let cidr = Cidr::parse(cidr_s)
                    .ok_or_else(|| bad(&scol, format!("{cidr_s:?} is not a CIDR")))?;
                for ip in array(&scol, s, "ips")? {
                    if let Some(a) = ip_at(&scol, ip)? {
                        fixed_ips.push(a);
                    }
                    for f in array(&scol, ip, "floating_ips")? {
                        if let Some(a) = ip_at(&scol, f)? {
                            floating.push(a);
                        }
                    }
                }
                let mut dns = Vec::new();
                for d in array(&scol, s, "dns")? {
                    dns.extend(ip_at(&scol, d)?);
                }
                let gateway = match s.get("gateway") {
                    Some(g) if g.is_object() => ip_at(&scol, g)?,
                    _ => None,
                };
                let mut routes = Vec::new();
                for r in array(&scol, s, "routes")? {
                    let dest = str_at(r, "cidr").and_then(Cidr::parse);
                    let hop = match r.get("gateway") {
                        Some(g) if g.is_object() => ip_at(&scol, g)?,
                        _ => None,
                    };
                    if let (Some(destination), Some(nexthop)) = (dest, hop) {
                        routes.push(Route {
                            destination,
                            nexthop,
                        });
                    }
                }
                let smeta = s.get("meta");
                let dhcp_server = smeta
                    .and_then(|m| m.get("dhcp_server"))
                    .is_some_and(|d| !d.is_null());
                let ipv6_mode = match smeta.and_then(|m| str_at(m, "ipv6_address_mode")) {
                    Some("slaac") => Some(Ipv6Mode::Slaac),
                    Some("dhcpv6-stateful") => Some(Ipv6Mode::Dhcpv6Stateful),
                    Some("dhcpv6-stateless") => Some(Ipv6Mode::Dhcpv6Stateless),
                    _ => None,
                };
                subnets.push(Subnet {
                    id: cidr.to_string(),
                    ip_version: cidr.version(),
                    cidr,
                    gateway,
                    dns,
                    // nova.virt.netutils: a DHCP port Neutron has on the
                    // subnet (`dhcp_server`: ipv4_dhcp and a null link mtu),
                    // or (Nova's fix of bug 2055245, for OVN's native DHCP)
                    // the subnet's `enable_dhcp`, truthy: ipv4_dhcp only.
                    dhcp: dhcp_server
                        || smeta
                            .and_then(|m| m.get("enable_dhcp"))
                            .is_some_and(py_truthy),
                    dhcp_server,
                    ipv6_mode,
                    routes,
                });
            }
            let mtu = meta
                .and_then(|m| m.get("mtu"))
                .and_then(Value::as_u64)
                .and_then(|m| u32::try_from(m).ok());
            match networks.iter_mut().find(|n| n.id == net_id) {
                // Two ports on one network: one network, the union of their subnets.
                Some(n) => {
                    for s in subnets {
                        if !n.subnets.iter().any(|x| x.cidr == s.cidr) {
                            n.subnets.push(s);
                        }
                    }
                }
                None => networks.push(Network {
                    id: net_id.clone(),
                    name: str_at(net, "label").unwrap_or_default().to_owned(),
                    project: meta
                        .and_then(|m| str_at(m, "tenant_id"))
                        .unwrap_or_default()
                        .to_owned(),
                    mtu,
                    subnets,
                }),
            }
        }
        let devname = str_at(vif, "devname")
            .map(str::to_owned)
            .unwrap_or_else(|| format!("tap{}", id.chars().take(11).collect::<String>()));
        ports.push(Port {
            id: id.to_owned(),
            network: net_id,
            mac,
            fixed_ips,
            device_owner: "compute:nova".to_owned(),
            vif_type: str_at(vif, "type").map(str::to_owned),
            devname,
        });
    }
    Ok((ports, networks, floating))
}

/// All rows of one instance → what the renderers take.
///
/// # Errors
/// The first column that cannot be decoded.
pub fn decode(rows: &Rows) -> Result<Decoded, DecodeError> {
    let r = &rows.instance;
    let extra = rows
        .extra
        .as_ref()
        .ok_or_else(|| bad("instance_extra", "no row for this instance"))?;
    let flavor = flavor_name(
        extra
            .flavor
            .as_deref()
            .ok_or_else(|| bad("instance_extra.flavor", "NULL"))?,
    )?;
    // Nova shows a keypair only when the instance was booted with a key name.
    let keys = match (&r.key_name, &extra.keypairs) {
        (Some(name), Some(text)) if !name.is_empty() => first_keypair(text)?.into_iter().collect(),
        _ => Vec::new(),
    };
    let devices = match extra.device_metadata.as_deref() {
        None => Vec::new(),
        Some(t) => device_metadata(t)?,
    };
    let dedicated_cpus = match extra.numa_topology.as_deref() {
        None => Vec::new(),
        Some(t) => dedicated_cpus(t)?,
    };
    let block_devices = block_devices(&rows.block_devices)?;
    let user_data = match r.user_data.as_deref() {
        None => None,
        Some(b64) => Some(
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|e| bad("instances.user_data", format!("not base64: {e}")))?,
        ),
    };
    let (ports, networks, floating_ips) = match rows.network_info.as_deref() {
        None | Some("") => Default::default(),
        Some(t) => network_info(t)?,
    };
    let meta: BTreeMap<String, String> = rows
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().unwrap_or_default()))
        .collect();
    let launch_index = u32::try_from(r.launch_index.unwrap_or(0))
        .map_err(|_| bad("instances.launch_index", "negative or too large"))?;
    let instance = Instance {
        uuid: r.uuid.clone(),
        name: r.display_name.clone().unwrap_or_default(),
        hostname: r.hostname.clone().unwrap_or_default(),
        project: r.project_id.clone().unwrap_or_default(),
        availability_zone: r.availability_zone.clone(),
        launch_index,
        flavor,
        ec2_id: ec2_id("instance_id_mappings.id", rows.ec2.instance)?,
        image_ec2_id: rows
            .ec2
            .image
            .map(|i| ec2_id("s3_images.id", i))
            .transpose()?,
        kernel_ec2_id: rows
            .ec2
            .kernel
            .map(|i| ec2_id("s3_images.id", i))
            .transpose()?,
        ramdisk_ec2_id: rows
            .ec2
            .ramdisk
            .map(|i| ec2_id("s3_images.id", i))
            .transpose()?,
        reservation_id: r.reservation_id.clone().unwrap_or_default(),
        // NULL is the dummy mapping; an empty name is shown empty, as Nova does.
        root_device_name: r.root_device_name.clone(),
        default_ephemeral_device: r.default_ephemeral_device.clone(),
        default_swap_device: r.default_swap_device.clone(),
        block_devices,
        devices,
        dedicated_cpus,
        security_groups: rows.security_groups.clone(),
        user_data,
        meta,
        image_ref: r.image_ref.clone().unwrap_or_default(),
        boot_roles: rows
            .system_metadata
            .iter()
            .find(|(k, _)| k == "boot_roles")
            .and_then(|(_, v)| v.clone())
            .unwrap_or_default(),
        floating_ips,
        keys,
        ports,
    };
    Ok(Decoded {
        instance,
        networks,
        password: extract_password(&rows.system_metadata),
    })
}

/// Python's truth value of a JSON value, as Nova tests a meta field.
fn py_truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rows Nova 34 wrote for the peers' vm1 (scripts/peers/nova/populate_nova.py).
    const FLAVOR: &str = r#"{"cur": {"nova_object.name": "Flavor", "nova_object.namespace": "nova", "nova_object.version": "1.2", "nova_object.data": {"id": 1, "name": "m1.peer", "memory_mb": 512, "vcpus": 1, "root_gb": 1, "ephemeral_gb": 0, "flavorid": "42", "swap": 0, "rxtx_factor": 1.0, "vcpu_weight": 0, "disabled": false, "is_public": true, "extra_specs": {}, "description": null}, "nova_object.changes": ["name"]}, "old": null, "new": null}"#;
    const KEYPAIRS: &str = r#"{"nova_object.name": "KeyPairList", "nova_object.namespace": "nova", "nova_object.version": "1.3", "nova_object.data": {"objects": [{"nova_object.name": "KeyPair", "nova_object.namespace": "nova", "nova_object.version": "1.4", "nova_object.data": {"name": "peer-key", "user_id": "peer-user", "fingerprint": "00:11", "public_key": "ssh-ed25519 AAAA peer@test", "type": "ssh"}, "nova_object.changes": ["name"]}]}, "nova_object.changes": ["objects"]}"#;
    const NETWORK_INFO: &str = r#"[{"id": "a0a839ec-c903-4e3a-9d20-465e964e0c41", "address": "fa:16:3e:46:d5:16", "network": {"id": "2af076c2-dfd7-4002-b268-40d5b7ed003b", "bridge": "br-int", "label": "net1", "subnets": [{"cidr": "10.10.0.0/24", "dns": [{"address": "10.0.0.53", "type": "dns", "version": 4, "meta": {}}], "gateway": {"address": "10.10.0.1", "type": "gateway", "version": 4, "meta": {}}, "ips": [{"address": "10.10.0.11", "type": "fixed", "version": 4, "meta": {}, "floating_ips": [{"address": "203.0.113.7", "type": "floating", "version": 4, "meta": {}}]}], "routes": [{"cidr": "192.168.0.0/16", "gateway": {"address": "10.10.0.254"}}], "version": 4, "meta": {}}, {"cidr": "fd00:10::/64", "dns": [], "gateway": null, "ips": [{"address": "fd00:10::11", "version": 6}], "routes": [], "version": 6, "meta": {"ipv6_address_mode": "slaac", "dhcp_server": null}}], "meta": {"injected": false, "tenant_id": "6e1f3b0c9d6a4f0e8b7a2c1d0e9f8a7b", "mtu": 1450}}, "type": "ovs", "details": {}, "devname": "tapa0a839ec-c9", "active": true, "vnic_type": "normal", "meta": {}}]"#;

    fn rows() -> Rows {
        Rows {
            instance: InstanceRow {
                id: 1,
                uuid: "00000001-0000-4000-8000-000000000001".into(),
                project_id: Some("6e1f3b0c9d6a4f0e8b7a2c1d0e9f8a7b".into()),
                hostname: Some("vm1".into()),
                display_name: Some("VM One".into()),
                launch_index: Some(0),
                availability_zone: Some("nova".into()),
                reservation_id: Some("r-00000001".into()),
                image_ref: Some("11111111-2222-4333-8444-555555555555".into()),
                kernel_id: Some(String::new()),
                ramdisk_id: Some(String::new()),
                key_name: Some("peer-key".into()),
                user_data: Some("I2Nsb3VkLWNvbmZpZw==".into()),
                root_device_name: Some("/dev/vda".into()),
                ..Default::default()
            },
            extra: Some(ExtraRow {
                flavor: Some(FLAVOR.into()),
                keypairs: Some(KEYPAIRS.into()),
                device_metadata: None,
                numa_topology: None,
            }),
            metadata: vec![("role".into(), Some("web".into()))],
            system_metadata: vec![("image_min_disk".into(), Some("1".into()))],
            network_info: Some(NETWORK_INFO.into()),
            block_devices: Vec::new(),
            ec2: Ec2Ids {
                instance: 1,
                image: Some(3),
                kernel: None,
                ramdisk: None,
            },
            security_groups: vec!["default".into()],
        }
    }

    #[test]
    fn novas_own_rows_decode_into_the_rendered_fields() {
        let d = decode(&rows()).unwrap();
        let i = &d.instance;
        assert_eq!(i.name, "VM One");
        assert_eq!(i.hostname, "vm1");
        assert_eq!(i.flavor, "m1.peer");
        assert_eq!((i.ec2_id, i.image_ec2_id), (1, Some(3)));
        assert_eq!(i.user_data.as_deref(), Some(&b"#cloud-config"[..]));
        assert_eq!(i.keys.len(), 1);
        assert_eq!(i.keys[0].name, "peer-key");
        assert_eq!(i.keys[0].data, "ssh-ed25519 AAAA peer@test");
        assert_eq!(i.meta.get("role").map(String::as_str), Some("web"));
        assert_eq!(
            i.floating_ips,
            vec!["203.0.113.7".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(i.ports.len(), 1);
        let p = &i.ports[0];
        assert_eq!(p.devname, "tapa0a839ec-c9");
        assert_eq!(p.vif_type.as_deref(), Some("ovs"));
        assert_eq!(p.fixed_ips.len(), 2);
        assert_eq!(d.networks.len(), 1);
        let n = &d.networks[0];
        assert_eq!((n.mtu, n.name.as_str()), (Some(1450), "net1"));
        assert_eq!(n.subnets[0].routes.len(), 1);
        assert!(!n.subnets[0].dhcp);
        assert_eq!(n.subnets[1].ipv6_mode, Some(Ipv6Mode::Slaac));
        assert_eq!(n.subnets[1].gateway, None);
        assert_eq!(d.password, None);
    }

    #[test]
    fn no_key_name_means_no_keys_even_with_a_keypair_row() {
        let mut r = rows();
        r.instance.key_name = None;
        assert!(decode(&r).unwrap().instance.keys.is_empty());
    }

    #[test]
    fn the_password_is_the_chunks_in_key_order() {
        let sm = |v: &[(&str, &str)]| -> Vec<(String, Option<String>)> {
            v.iter()
                .map(|(k, v)| ((*k).to_owned(), Some((*v).to_owned())))
                .collect()
        };
        assert_eq!(
            extract_password(&sm(&[
                ("password_1", "b"),
                ("password_0", "a"),
                ("password_3", ""),
                ("password_2", "c"),
                ("other", "x")
            ])),
            Some("abc".into())
        );
        // Cleared (`nova clear-password` writes four empty chunks): none set.
        assert_eq!(
            extract_password(&sm(&[("password_0", ""), ("password_1", "")])),
            None
        );
        // Duplicate rows of a key (Nova's unlocked insert racing another
        // writer): the last row wins, as in Nova's dict.
        assert_eq!(
            extract_password(&sm(&[
                ("password_0", "first"),
                ("password_1", ""),
                ("password_0", "second"),
                ("password_1", "")
            ])),
            Some("second".into())
        );
        assert_eq!(
            extract_password(&sm(&[("password_0", "set"), ("password_0", "")])),
            None
        );
    }

    #[test]
    fn malformed_rows_name_the_column_and_never_panic() {
        type Break = Box<dyn Fn(&mut Rows)>;
        let cases: Vec<(Break, &str)> = vec![
            (Box::new(|r| r.extra = None), "instance_extra"),
            (
                Box::new(|r| r.extra.as_mut().unwrap().flavor = Some("{".into())),
                "instance_extra.flavor",
            ),
            (
                Box::new(|r| {
                    r.extra.as_mut().unwrap().flavor =
                        Some(r#"{"cur": {"nova_object.name": "KeyPair"}}"#.into())
                }),
                "instance_extra.flavor",
            ),
            (
                Box::new(|r| r.extra.as_mut().unwrap().keypairs = Some("[1]".into())),
                "instance_extra.keypairs",
            ),
            (
                Box::new(|r| r.extra.as_mut().unwrap().numa_topology = Some("nope".into())),
                "instance_extra.numa_topology",
            ),
            (
                Box::new(|r| r.instance.user_data = Some("!!!".into())),
                "instances.user_data",
            ),
            (
                Box::new(|r| r.network_info = Some(r#"{"not": "a list"}"#.into())),
                "instance_info_caches.network_info",
            ),
            (
                Box::new(|r| {
                    r.network_info = Some(
                        r#"[{"id": "p", "address": "fa:16:3e:00:00:01", "network": {"id": "n", "subnets": [{"cidr": "10.0.0.0/24", "ips": [{"address": 7}]}]}}]"#
                            .into(),
                    )
                }),
                "instance_info_caches.network_info[0].network.subnets[0]",
            ),
            (
                Box::new(|r| r.ec2.instance = 1 << 40),
                "instance_id_mappings.id",
            ),
            (
                Box::new(|r| r.instance.launch_index = Some(-1)),
                "instances.launch_index",
            ),
            (
                Box::new(|r| r.extra.as_mut().unwrap().device_metadata = Some("[]".into())),
                "instance_extra.device_metadata",
            ),
            (
                Box::new(|r| {
                    r.extra.as_mut().unwrap().device_metadata = Some(devices(&[&ovo(
                        "DiskMetadata",
                        "1.0",
                        &format!(
                            r#""bus": {}"#,
                            ovo("PCIDeviceBus", "1.0", r#""address": "pci-0""#)
                        ),
                    )]))
                }),
                "instance_extra.device_metadata.devices[0].bus",
            ),
            (
                Box::new(|r| {
                    r.extra.as_mut().unwrap().numa_topology = Some(numa(&[&ovo(
                        "InstanceNUMACell",
                        "1.6",
                        r#""pcpuset": ["1"]"#,
                    )]))
                }),
                "instance_extra.numa_topology.cells[0]",
            ),
            (
                Box::new(|r| {
                    r.block_devices = vec![BdmRow {
                        destination_type: Some("cloud".into()),
                        ..Default::default()
                    }]
                }),
                "block_device_mapping.destination_type",
            ),
        ];
        for (break_it, column) in cases {
            let mut r = rows();
            break_it(&mut r);
            let e = decode(&r).unwrap_err();
            assert_eq!(e.column, column, "{e}");
        }
    }

    fn ovo(name: &str, version: &str, data: &str) -> String {
        format!(
            r#"{{"nova_object.name": "{name}", "nova_object.namespace": "nova", "nova_object.version": "{version}", "nova_object.data": {{{data}}}}}"#
        )
    }

    fn devices(list: &[&str]) -> String {
        ovo(
            "InstanceDeviceMetadata",
            "1.0",
            &format!(r#""devices": [{}]"#, list.join(", ")),
        )
    }

    fn numa(cells: &[&str]) -> String {
        ovo(
            "InstanceNUMATopology",
            "1.3",
            &format!(r#""cells": [{}]"#, cells.join(", ")),
        )
    }

    #[test]
    fn devices_are_checked_as_obj_from_primitive_checks_them() {
        let nic =
            |version: &str, data: &str| devices(&[&ovo("NetworkInterfaceMetadata", version, data)]);
        // MAC and PCI address are lower-cased as their fields' coerce does.
        let bus = ovo("PCIDeviceBus", "1.0", r#""address": "0000:0A:1F.7""#);
        let d = device_metadata(&nic(
            "1.2",
            &format!(r#""bus": {bus}, "mac": "FA-16-3E-00-00-0A""#),
        ))
        .unwrap();
        assert_eq!(
            d[0],
            Device {
                bus: Some(DeviceBus {
                    kind: BusKind::Pci,
                    address: Some("0000:0a:1f.7".into())
                }),
                kind: DeviceKind::Nic {
                    mac: "fa:16:3e:00:00:0a".into(),
                    vlan: None,
                    vf_trusted: false
                },
                tags: None,
            }
        );
        // A newer minor version than Nova 34 has, another major, another
        // namespace, a class that is not a device, a bad MAC or vlan: refused.
        for bad in [
            nic("1.3", r#""mac": "fa:16:3e:00:00:0a""#),
            nic("2.0", r#""mac": "fa:16:3e:00:00:0a""#),
            devices(&[&ovo("KeyPair", "1.4", "")]),
            devices(&[&ovo(
                "NetworkInterfaceMetadata",
                "1.2",
                r#""mac": "fa:16:3e:00:00:0a""#,
            )
            .replace("\"nova\"", "\"other\"")]),
            nic("1.2", r#""mac": "fa:16:3e:00:00""#),
            nic("1.2", r#""mac": "fa:16:3e:00:00:0a", "vlan": "7""#),
            nic("1.2", r#""mac": "fa:16:3e:00:00:0a", "vf_trusted": 1"#),
            nic("1.2", r#""mac": "fa:16:3e:00:00:0a", "tags": "t""#),
            nic("1.2", r#""tags": ["t"]"#),
            devices(&[&ovo("ShareMetadata", "1.0", r#""tag": "t""#)]),
        ] {
            let e = device_metadata(&bad).unwrap_err();
            assert!(
                e.column.starts_with("instance_extra.device_metadata"),
                "{e}"
            );
        }
        // Bus addresses: Nova's patterns (re.match: a prefix, except PCI).
        let addr = |bus: &str, a: &str| {
            let b = ovo(bus, "1.0", &format!(r#""address": "{a}""#));
            device_metadata(&devices(&[&ovo(
                "DiskMetadata",
                "1.0",
                &format!(r#""bus": {b}"#),
            )]))
            .is_ok()
        };
        assert!(addr("SCSIDeviceBus", "0:0:0:1") && addr("SCSIDeviceBus", "a:b:c:d-tail"));
        assert!(!addr("SCSIDeviceBus", "0:0:1") && !addr("SCSIDeviceBus", "A:0:0:1"));
        assert!(addr("USBDeviceBus", "1:2") && !addr("USBDeviceBus", "1:"));
        assert!(addr("IDEDeviceBus", "1:0") && !addr("IDEDeviceBus", "2:0"));
        assert!(addr("XenDeviceBus", "005100") && addr("XenDeviceBus", "51712"));
        assert!(!addr("XenDeviceBus", "5") && !addr("XenDeviceBus", "0051"));
        assert!(!addr("PCIDeviceBus", "0000:00:03.0x") && !addr("PCIDeviceBus", "0000:00:23.0"));
    }

    #[test]
    fn dedicated_cpus_follow_novas_cell_upgrade() {
        let cell = |v: &str, data: &str| ovo("InstanceNUMACell", v, data);
        let cpus = |cells: &[&str]| dedicated_cpus(&numa(cells)).unwrap();
        // 1.6: pcpuset as it is; across cells sorted, duplicates kept.
        assert_eq!(
            cpus(&[
                &cell(
                    "1.6",
                    r#""cpuset": [], "pcpuset": [5, 2], "cpu_policy": "dedicated""#
                ),
                &cell(
                    "1.6",
                    r#""cpuset": [0], "pcpuset": [2], "cpu_policy": "mixed""#
                ),
            ]),
            [2, 2, 5]
        );
        // 1.4/1.5 dedicated without pcpuset: the cpuset is the pinned set.
        assert_eq!(
            cpus(&[&cell(
                "1.4",
                r#""cpuset": [4, 1], "cpu_policy": "dedicated""#
            )]),
            [1, 4]
        );
        // 1.4/1.5 shared or no policy: no pinned CPUs, whatever pcpuset says.
        assert!(cpus(&[&cell(
            "1.5",
            r#""cpuset": [1], "pcpuset": [9], "cpu_policy": "shared""#
        )])
        .is_empty());
        assert!(cpus(&[&cell("1.4", r#""cpuset": [1], "cpu_policy": null"#)]).is_empty());
        assert!(cpus(&[&cell("1.4", r#""cpuset": [1]"#)]).is_empty());
        // 1.5 dedicated but inconsistent (cpuset set): left as it is.
        assert_eq!(
            cpus(&[&cell(
                "1.5",
                r#""cpuset": [1], "pcpuset": [7], "cpu_policy": "dedicated""#
            )]),
            [7]
        );
        // Pre-Liberty (no o.vo envelope): none; no cells: none.
        assert!(dedicated_cpus(r#"{"cells": [{"cpus": "0-3"}]}"#)
            .unwrap()
            .is_empty());
        assert!(cpus(&[]).is_empty());
        // Where Nova's load fails, ours does too (a 500).
        for bad in [
            numa(&[&cell("1.7", r#""pcpuset": []"#)]),
            numa(&[&cell("1.6", r#""cpuset": []"#)]),
            numa(&[&cell("1.6", r#""pcpuset": [], "cpu_policy": "greedy""#)]),
            "null".to_owned(),
            ovo("InstanceNUMATopology", "1.3", ""),
        ] {
            assert!(dedicated_cpus(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn block_devices_are_volumes_swap_ephemerals_or_not_shown() {
        let row = |s: &str, d: &str, f: Option<&str>| BdmRow {
            source_type: Some(s.into()),
            destination_type: Some(d.into()),
            guest_format: f.map(Into::into),
            device_name: Some("/dev/vdb".into()),
        };
        let kinds: Vec<BlockDeviceKind> = block_devices(&[
            row("volume", "volume", None),
            row("image", "volume", None),
            row("blank", "local", Some("swap")),
            row("blank", "local", None),
            row("image", "local", None),
            row("snapshot", "local", Some("swap")),
        ])
        .unwrap()
        .into_iter()
        .map(|b| b.kind)
        .collect();
        use BlockDeviceKind::*;
        assert_eq!(kinds, [Volume, Volume, Swap, Ephemeral, Other, Other]);
        let e = block_devices(&[row("tape", "local", None)]).unwrap_err();
        assert_eq!(e.column, "block_device_mapping.source_type");
    }

    /// What nova.network.neutron caches for a subnet with DHCP on and no
    /// DHCP port (OVN): `enable_dhcp` alone makes it `ipv4_dhcp`, as the
    /// peers' feature instances showed Nova rendering it.
    #[test]
    fn enable_dhcp_in_the_info_cache_is_a_dhcp_subnet() {
        for (meta, dhcp) in [
            (r#""meta": {}"#, false),
            (r#""meta": {"enable_dhcp": false}"#, false),
            (r#""meta": {"enable_dhcp": true}"#, true),
            (r#""meta": {"dhcp_server": "10.10.0.2"}"#, true),
            (
                r#""meta": {"dhcp_server": null, "enable_dhcp": true}"#,
                true,
            ),
        ] {
            let mut r = rows();
            r.network_info = Some(NETWORK_INFO.replacen(
                r#""version": 4, "meta": {}}, {"cidr""#,
                &format!(r#""version": 4, {meta}}}, {{"cidr""#),
                1,
            ));
            assert!(NETWORK_INFO.contains(r#""version": 4, "meta": {}}, {"cidr""#));
            let d = decode(&r).unwrap();
            let s = &d.networks[0].subnets[0];
            assert_eq!(s.dhcp, dhcp, "{meta}");
            assert_eq!(s.dhcp_server, meta.contains("10.10.0.2"), "{meta}");
        }
    }

    #[test]
    fn an_empty_info_cache_is_an_instance_without_ports() {
        let mut r = rows();
        r.network_info = Some("[]".into());
        let d = decode(&r).unwrap();
        assert!(d.instance.ports.is_empty() && d.networks.is_empty());
        r.network_info = None;
        assert!(decode(&r).unwrap().instance.ports.is_empty());
    }
}
