//! The EC2-compatible tree (`/<version>/meta-data/...`, `/<version>/user-data`),
//! built per request as a small dict tree and rendered like Nova's `ec2_md_print`.
//!
//! Building the whole tree and then walking it (instead of matching paths
//! directly) keeps listings and lookups consistent by construction: every name
//! a listing shows is a key the walk can find, which is the one rule metadata
//! crawlers depend on. The tree is a few dozen small strings; building it costs
//! less than parsing the request.

use std::collections::BTreeMap;

use super::RenderCtx;
use crate::inventory::{BlockDeviceKind, Instance};

/// Nova's `VERSIONS`; `latest` means the last one.
pub(crate) const EC2_VERSIONS: [&str; 9] = [
    "1.0",
    "2007-01-19",
    "2007-03-01",
    "2007-08-29",
    "2007-10-10",
    "2007-12-15",
    "2008-02-01",
    "2008-09-01",
    "2009-04-04",
];

/// `1.0\n...\n2009-04-04\nlatest` (the `/` and `/ec2` answer).
pub(crate) fn version_list() -> String {
    let mut v: Vec<&str> = EC2_VERSIONS.to_vec();
    v.push("latest");
    v.join("\n")
}

/// A node of the metadata tree, as Nova's dict/list/str values.
#[derive(Debug)]
pub(crate) enum Node {
    Dir(BTreeMap<String, Node>),
    /// A directory listed in its parent as the given text instead of `key/`
    /// (Nova's `_name` entry, used for `public-keys/` → `0=<keyname>`).
    NamedDir(String, BTreeMap<String, Node>),
    Leaf(Vec<u8>),
    /// Rendered one item per line (security groups).
    List(Vec<String>),
}

impl Node {
    fn text(s: impl Into<String>) -> Node {
        Node::Leaf(s.into().into_bytes())
    }

    /// Walk `path` below this node. An extra segment below a leaf is `None`
    /// (Nova raises an uncaught TypeError there and answers 500).
    pub(crate) fn find(&self, path: &[String]) -> Option<&Node> {
        let mut node = self;
        for seg in path {
            node = match node {
                Node::Dir(m) | Node::NamedDir(_, m) => m.get(seg.as_str())?,
                Node::Leaf(_) | Node::List(_) => return None,
            };
        }
        Some(node)
    }

    /// `ec2_md_print`: sorted keys one per line, `key/` for directories,
    /// no trailing newline.
    pub(crate) fn render(&self) -> Vec<u8> {
        match self {
            Node::Dir(m) | Node::NamedDir(_, m) => {
                let mut out = Vec::new();
                for (i, (k, v)) in m.iter().enumerate() {
                    if i > 0 {
                        out.push(b'\n');
                    }
                    match v {
                        Node::NamedDir(name, _) => out.extend_from_slice(name.as_bytes()),
                        Node::Dir(_) => {
                            out.extend_from_slice(k.as_bytes());
                            out.push(b'/');
                        }
                        Node::Leaf(_) | Node::List(_) => out.extend_from_slice(k.as_bytes()),
                    }
                }
                out
            }
            Node::Leaf(b) => b.clone(),
            Node::List(items) => items.join("\n").into_bytes(),
        }
    }
}

fn at_least(version: usize, required: &str) -> bool {
    EC2_VERSIONS
        .iter()
        .position(|v| *v == required)
        .is_some_and(|r| version >= r)
}

/// Index into [`EC2_VERSIONS`] of a requested version (`latest` = newest).
pub(crate) fn version_index(v: &str) -> Option<usize> {
    if v == "latest" {
        return Some(EC2_VERSIONS.len() - 1);
    }
    EC2_VERSIONS.iter().position(|x| *x == v)
}

/// Nova's `_dummy_mapping`, used when the instance has no root device name.
const DUMMY_MAPPING: [(&str, &str); 4] = [
    ("ami", "sda1"),
    ("ephemeral0", "sda2"),
    ("root", "/dev/sda1"),
    ("swap", "sda3"),
];

/// `nova.block_device.instance_block_mapping`: the dummy mapping without a
/// root device name; else `ami`/`root`, the instance's default ephemeral and
/// swap devices, `ebsN` for volumes sorted by device name (a missing name
/// first), the last swap BDM as `swap`, and the other blank disks as
/// `ephemeralN` in row order. A missing device name prints as Nova's `None`.
fn block_device_mapping(inst: &Instance) -> BTreeMap<String, Node> {
    let mut bdm = BTreeMap::new();
    let Some(root) = &inst.root_device_name else {
        for (k, v) in DUMMY_MAPPING {
            bdm.insert(k.to_owned(), Node::text(v));
        }
        return bdm;
    };
    let name = |d: &Option<String>| Node::text(d.as_deref().unwrap_or("None"));
    let ami = root.strip_prefix("/dev/").unwrap_or(root);
    bdm.insert("ami".to_owned(), Node::text(ami));
    bdm.insert("root".to_owned(), Node::text(root.clone()));
    if let Some(d) = inst
        .default_ephemeral_device
        .as_ref()
        .filter(|d| !d.is_empty())
    {
        bdm.insert("ephemeral0".to_owned(), Node::text(d.clone()));
    }
    if let Some(d) = inst.default_swap_device.as_ref().filter(|d| !d.is_empty()) {
        bdm.insert("swap".to_owned(), Node::text(d.clone()));
    }
    let of = |k: BlockDeviceKind| {
        inst.block_devices
            .iter()
            .filter(move |b| b.kind == k)
            .map(|b| &b.device_name)
    };
    // Python sorts with the key (x is not None, x): None first.
    let mut ebs: Vec<&Option<String>> = of(BlockDeviceKind::Volume).collect();
    ebs.sort();
    for (n, d) in ebs.into_iter().enumerate() {
        bdm.insert(format!("ebs{n}"), name(d));
    }
    if let Some(d) = of(BlockDeviceKind::Swap).next_back() {
        bdm.insert("swap".to_owned(), name(d));
    }
    for (n, d) in of(BlockDeviceKind::Ephemeral).enumerate() {
        bdm.insert(format!("ephemeral{n}"), name(d));
    }
    bdm
}

/// The `{meta-data, user-data}` dict of `get_ec2_metadata(version)`.
pub(crate) fn build(ctx: &RenderCtx<'_>, version: usize) -> Node {
    let inst = ctx.instance;
    let hostname = ctx.hostname.clone();
    let mut md: BTreeMap<String, Node> = BTreeMap::new();
    let mut put = |k: &str, n: Node| {
        md.insert(k.to_owned(), n);
    };
    // No image (booted from a volume): Nova's `ec2_ids.ami_id` is None,
    // printed by `ec2_md_print` as `str(None)`.
    let ami = inst
        .image_ec2_id
        .map_or_else(|| "None".to_owned(), |i| format!("ami-{i:08x}"));
    put("ami-id", Node::text(ami));
    put(
        "ami-launch-index",
        Node::text(inst.launch_index.to_string()),
    );
    put("ami-manifest-path", Node::text("FIXME"));
    put("instance-id", Node::text(format!("i-{:08x}", inst.ec2_id)));
    put("hostname", Node::text(hostname.clone()));
    let local_ipv4 = match inst.first_fixed_ipv4() {
        Some(ip) => ip.to_string(),
        None => ctx.remote_address.to_owned(),
    };
    put("local-ipv4", Node::text(local_ipv4));
    put("reservation-id", Node::text(inst.reservation_id.clone()));
    put("security-groups", Node::List(inst.security_groups.clone()));
    if let Some(key) = inst.keys.first() {
        let mut zero = BTreeMap::new();
        zero.insert("openssh-key".to_owned(), Node::text(key.data.clone()));
        let mut keys = BTreeMap::new();
        keys.insert(
            "0".to_owned(),
            Node::NamedDir(format!("0={}", key.name), zero),
        );
        put("public-keys", Node::Dir(keys));
    }
    if at_least(version, "2007-01-19") {
        put("local-hostname", Node::text(hostname.clone()));
        put("public-hostname", Node::text(hostname));
        let public = inst
            .floating_ips
            .first()
            .map(ToString::to_string)
            .unwrap_or_default();
        put("public-ipv4", Node::text(public));
    }
    if at_least(version, "2007-08-29") {
        put("instance-type", Node::text(inst.flavor.clone()));
    }
    if at_least(version, "2007-12-15") {
        put(
            "block-device-mapping",
            Node::Dir(block_device_mapping(inst)),
        );
        if let Some(k) = inst.kernel_ec2_id {
            put("kernel-id", Node::text(format!("aki-{k:08x}")));
        }
        if let Some(r) = inst.ramdisk_ec2_id {
            put("ramdisk-id", Node::text(format!("ari-{r:08x}")));
        }
    }
    if at_least(version, "2008-02-01") {
        let mut placement = BTreeMap::new();
        let az = inst.availability_zone.as_deref().unwrap_or("None");
        placement.insert("availability-zone".to_owned(), Node::text(az));
        put("placement", Node::Dir(placement));
    }
    if at_least(version, "2008-09-01") {
        put("instance-action", Node::text("none"));
    }
    let mut top = BTreeMap::new();
    top.insert("meta-data".to_owned(), Node::Dir(md));
    if let Some(ud) = &inst.user_data {
        top.insert("user-data".to_owned(), Node::Leaf(ud.clone()));
    }
    Node::Dir(top)
}
