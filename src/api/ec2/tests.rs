//! The EC2 tree against the renderer it replaced: Nova's whole dict built
//! per request and walked (`oracle`, the code as it was before the walk
//! became lazy). Every path of the oracle's tree, and paths next to them
//! that name nothing, must answer byte for byte the same, for instances
//! with and without keys, user data, block devices, images, addresses and
//! zones, at every version.

use super::{Tree, EC2_VERSIONS};
use crate::api::RenderCtx;
use crate::inventory::{BlockDevice, BlockDeviceKind, Instance, Inventory};

/// The renderer as it was: build `get_ec2_metadata(version)`, then walk it.
mod oracle {
    use std::collections::BTreeMap;

    use super::super::at_least;
    use crate::api::RenderCtx;
    use crate::inventory::{BlockDeviceKind, Instance};

    /// Nova's `_dummy_mapping`, used when the instance has no root device name.
    const DUMMY_MAPPING: [(&str, &str); 4] = [
        ("ami", "sda1"),
        ("ephemeral0", "sda2"),
        ("root", "/dev/sda1"),
        ("swap", "sda3"),
    ];

    /// A node of the metadata tree, as Nova's dict/list/str values.
    #[derive(Debug)]
    pub(super) enum Node {
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
        pub(super) fn find(&self, path: &[String]) -> Option<&Node> {
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
        pub(super) fn render(&self) -> Vec<u8> {
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
    pub(super) fn build(ctx: &RenderCtx<'_>, version: usize) -> Node {
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
}

fn inventory() -> Inventory {
    Inventory::from_toml_str(
        r##"
[[network]]
id = "3636b40f-3e32-48da-8a7d-266006b19663"
name = "net1"
project = "p"
[[network.subnet]]
id = "01f852e5-11e6-44b1-8094-631c35e1c0b9"
cidr = "10.10.0.0/24"

[[instance]]
uuid = "00000001-0000-4000-8000-000000000001"
name = "full"
hostname = "full"
project = "p"
availability_zone = "az-1"
flavor = "m1.small"
ec2_id = 7
image_ec2_id = 3
kernel_ec2_id = 5
ramdisk_ec2_id = 6
launch_index = 2
reservation_id = "r-00000001"
root_device_name = "/dev/vda"
security_groups = ["web", "default"]
floating_ips = ["203.0.113.7", "203.0.113.8"]
user_data = "#cloud-config\nhostname: full\n"
[[instance.key]]
name = "k=1"
data = "ssh-ed25519 AAAA key@one"
[[instance.key]]
name = "second"
data = "ssh-ed25519 BBBB key@two"
[[instance.port]]
id = "29dc867d-0fbe-4163-bd65-7e3546f06813"
network = "3636b40f-3e32-48da-8a7d-266006b19663"
mac = "fa:16:3e:b1:b2:36"
fixed_ips = ["10.10.0.11"]

[[instance]]
uuid = "00000002-0000-4000-8000-000000000002"
hostname = "bare"
project = "p"
"##,
    )
    .unwrap()
}

/// The inventory's instances, and variants of them with what TOML cannot
/// say (block devices, as the Nova source reads them; no image).
fn instances(inv: &Inventory) -> Vec<Instance> {
    let full = inv
        .instance("00000001-0000-4000-8000-000000000001")
        .unwrap()
        .clone();
    let bare = inv
        .instance("00000002-0000-4000-8000-000000000002")
        .unwrap()
        .clone();
    let dev = |kind, name: Option<&str>| BlockDevice {
        kind,
        device_name: name.map(str::to_owned),
    };
    let mut disks = full.clone();
    disks.image_ec2_id = None;
    disks.default_ephemeral_device = Some("/dev/vdb".into());
    disks.default_swap_device = Some("/dev/vdc".into());
    disks.block_devices = vec![
        dev(BlockDeviceKind::Volume, Some("/dev/vdf")),
        dev(BlockDeviceKind::Volume, None),
        dev(BlockDeviceKind::Volume, Some("/dev/vdd")),
        dev(BlockDeviceKind::Ephemeral, Some("/dev/vde")),
        dev(BlockDeviceKind::Ephemeral, None),
        dev(BlockDeviceKind::Swap, Some("/dev/vdg")),
        dev(BlockDeviceKind::Swap, Some("/dev/vdh")),
    ];
    let mut defaults_only = bare.clone();
    defaults_only.root_device_name = Some("vda".into());
    defaults_only.default_ephemeral_device = Some(String::new());
    defaults_only.security_groups.clear();
    let mut no_root = disks.clone();
    no_root.root_device_name = None;
    vec![full, bare, disks, defaults_only, no_root]
}

/// Every path of `node` (below `at`), directories with and without the
/// listing's slash, and names next to them that name nothing.
fn paths(node: &oracle::Node, at: &[String], out: &mut Vec<Vec<String>>) {
    out.push(at.to_vec());
    let with = |seg: &str| {
        let mut p = at.to_vec();
        p.push(seg.to_owned());
        p
    };
    out.push(with("no-such-name"));
    out.push(with(""));
    match node {
        oracle::Node::Dir(m) | oracle::Node::NamedDir(_, m) => {
            for (k, child) in m {
                if let oracle::Node::NamedDir(name, _) = child {
                    out.push(with(name));
                }
                paths(child, &with(k), out);
            }
        }
        oracle::Node::Leaf(_) | oracle::Node::List(_) => {}
    }
}

#[test]
fn every_path_answers_as_the_whole_tree_did() {
    let inv = inventory();
    let mut compared = 0;
    for inst in instances(&inv) {
        for (hostname, remote) in [("full.example.org", "192.0.2.9"), ("h", "")] {
            let ctx = RenderCtx {
                inventory: &inv,
                instance: &inst,
                hostname: hostname.into(),
                remote_address: remote,
                vendor_data: None,
                providers: &[],
                dynamic: None,
            };
            for (version, name) in EC2_VERSIONS.iter().enumerate() {
                let whole = oracle::build(&ctx, version);
                let tree = Tree::new(&ctx, version);
                let mut all = Vec::new();
                paths(&whole, &[], &mut all);
                for path in all {
                    let want = whole.find(&path).map(oracle::Node::render);
                    let got = tree.find(&path).map(|n| {
                        let mut out = Vec::new();
                        tree.render(n, &mut out);
                        out
                    });
                    assert_eq!(
                        got.as_deref().map(String::from_utf8_lossy),
                        want.as_deref().map(String::from_utf8_lossy),
                        "{} at {}: {path:?}",
                        inst.name,
                        name
                    );
                    compared += 1;
                }
            }
        }
    }
    // The tree is not trivially small: listings, leaves and misses.
    assert!(compared > 2000, "{compared}");
}
