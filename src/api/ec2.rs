//! The EC2-compatible tree (`/<version>/meta-data/...`, `/<version>/user-data`),
//! walked per request and rendered like Nova's `ec2_md_print`.
//!
//! Each directory is one function that visits its children in sorted order
//! (`Tree::each`); a listing prints every child it visits and a lookup is
//! the same visit stopped at the name asked for. Listings and lookups are
//! consistent by construction: every name a listing shows is a name the walk
//! finds, which is the one rule metadata crawlers depend on. A child is a
//! small borrowed [`Node`] and a leaf's text is written only when that leaf
//! is the answer, so a request builds only its own path.
//!
//! Rejected: building Nova's whole dict (a `BTreeMap` of owned strings) per
//! request and walking it, as this module first did. The storm's cloud-init
//! crawl is 23 of a VM's 30 requests (listings and small leaves), and the
//! tree cost 58 allocations and most of the API's instructions for each of
//! them (BENCHMARKS.md, issue 13). That renderer is kept as the tests'
//! oracle (`ec2/tests.rs`), and every path of its tree is compared with
//! this one.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::IpAddr;
use std::ops::ControlFlow;

use super::RenderCtx;
use crate::inventory::{BlockDeviceKind, Instance, Key};

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

/// Bytes to reserve for an answer (the largest listing is `meta-data/`'s,
/// about 250 bytes).
pub(crate) const BODY_CAPACITY: usize = 384;

/// Nova's `_dummy_mapping`, used when the instance has no root device name.
const DUMMY_MAPPING: [(&str, &str); 4] = [
    ("ami", "sda1"),
    ("ephemeral0", "sda2"),
    ("root", "/dev/sda1"),
    ("swap", "sda3"),
];

/// What the walk needs about the identified instance, borrowed.
#[derive(Clone, Copy)]
pub(crate) struct Tree<'a> {
    inst: &'a Instance,
    /// `hostname[.dhcp_domain]`.
    hostname: &'a str,
    /// `local-ipv4` of an instance without a fixed IPv4.
    remote_address: &'a str,
    /// Index into [`EC2_VERSIONS`].
    version: usize,
}

/// A directory of the tree.
#[derive(Clone, Copy)]
pub(crate) enum Dir<'a> {
    /// `/<version>/`: `meta-data/` and `user-data`.
    Top,
    /// `meta-data/`.
    MetaData,
    /// `meta-data/block-device-mapping/`.
    BlockDeviceMapping,
    /// `meta-data/placement/`.
    Placement,
    /// `meta-data/public-keys/`: the first key as `0`.
    PublicKeys(&'a Key),
    /// `meta-data/public-keys/0/`, listed in its parent as `0=<keyname>`
    /// (Nova's `_name` entry) instead of `0/`.
    Key(&'a Key),
}

/// A node of the tree: a directory, or a leaf's value not yet rendered.
#[derive(Clone, Copy)]
pub(crate) enum Node<'a> {
    Dir(Dir<'a>),
    Text(&'a str),
    Bytes(&'a [u8]),
    /// `<prefix>%08x`: `ami-`, `aki-`, `ari-` and `i-` ids.
    Id(&'static str, u32),
    Int(u32),
    Ip(IpAddr),
    /// One item per line (security groups).
    Lines(&'a [String]),
}

impl<'a> Tree<'a> {
    pub(crate) fn new(ctx: &'a RenderCtx<'a>, version: usize) -> Tree<'a> {
        Tree {
            inst: ctx.instance,
            hostname: &ctx.hostname,
            remote_address: ctx.remote_address,
            version,
        }
    }

    fn at_least(&self, required: &str) -> bool {
        at_least(self.version, required)
    }

    /// Walk `path` from the version's directory. An extra segment below a
    /// leaf is `None` (Nova raises an uncaught TypeError there and answers
    /// 500).
    pub(crate) fn find<S: AsRef<str>>(&self, path: &[S]) -> Option<Node<'a>> {
        let mut node = Node::Dir(Dir::Top);
        for seg in path {
            let Node::Dir(dir) = node else {
                return None;
            };
            node = self.child(dir, seg.as_ref())?;
        }
        Some(node)
    }

    fn child(&self, dir: Dir<'a>, name: &str) -> Option<Node<'a>> {
        let mut found = None;
        let _ = self.each(dir, &mut |k, n| {
            if k == name {
                found = Some(n);
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        found
    }

    /// `ec2_md_print`: a directory's names one per line (`name/` for a
    /// directory), no trailing newline; a leaf's value.
    pub(crate) fn render(&self, node: Node<'a>, out: &mut Vec<u8>) {
        match node {
            Node::Dir(dir) => {
                let mut first = true;
                let _ = self.each(dir, &mut |k, n| {
                    if !std::mem::take(&mut first) {
                        out.push(b'\n');
                    }
                    match n {
                        Node::Dir(Dir::Key(key)) => {
                            out.extend_from_slice(k.as_bytes());
                            out.push(b'=');
                            out.extend_from_slice(key.name.as_bytes());
                        }
                        Node::Dir(_) => {
                            out.extend_from_slice(k.as_bytes());
                            out.push(b'/');
                        }
                        _ => out.extend_from_slice(k.as_bytes()),
                    }
                    ControlFlow::Continue(())
                });
            }
            Node::Text(s) => out.extend_from_slice(s.as_bytes()),
            Node::Bytes(b) => out.extend_from_slice(b),
            // Writing to a Vec cannot fail.
            Node::Id(prefix, id) => {
                let _ = write!(out, "{prefix}{id:08x}");
            }
            Node::Int(i) => {
                let _ = write!(out, "{i}");
            }
            Node::Ip(ip) => {
                let _ = write!(out, "{ip}");
            }
            Node::Lines(items) => {
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b'\n');
                    }
                    out.extend_from_slice(item.as_bytes());
                }
            }
        }
    }

    /// Visit `dir`'s children in sorted order (byte order of the names, as
    /// Nova's `sorted`), until `f` breaks. The one place that says what
    /// the tree holds: `get_ec2_metadata(version)`.
    fn each(
        &self,
        dir: Dir<'a>,
        f: &mut dyn FnMut(&str, Node<'a>) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        let inst = self.inst;
        match dir {
            Dir::Top => {
                f("meta-data", Node::Dir(Dir::MetaData))?;
                if let Some(ud) = &inst.user_data {
                    f("user-data", Node::Bytes(ud))?;
                }
            }
            Dir::MetaData => self.meta_data(f)?,
            Dir::BlockDeviceMapping => {
                for (k, v) in &block_device_mapping(inst) {
                    f(k, Node::Text(v))?;
                }
            }
            Dir::Placement => {
                let az = inst.availability_zone.as_deref().unwrap_or("None");
                f("availability-zone", Node::Text(az))?;
            }
            Dir::PublicKeys(key) => f("0", Node::Dir(Dir::Key(key)))?,
            Dir::Key(key) => f("openssh-key", Node::Text(&key.data))?,
        }
        ControlFlow::Continue(())
    }

    /// `meta-data/`, in sorted order of the names.
    fn meta_data(&self, f: &mut dyn FnMut(&str, Node<'a>) -> ControlFlow<()>) -> ControlFlow<()> {
        let inst = self.inst;
        // No image (booted from a volume): Nova's `ec2_ids.ami_id` is None,
        // printed by `ec2_md_print` as `str(None)`.
        let ami = inst
            .image_ec2_id
            .map_or(Node::Text("None"), |i| Node::Id("ami-", i));
        f("ami-id", ami)?;
        f("ami-launch-index", Node::Int(inst.launch_index))?;
        f("ami-manifest-path", Node::Text("FIXME"))?;
        let v2007_01_19 = self.at_least("2007-01-19");
        let v2007_12_15 = self.at_least("2007-12-15");
        if v2007_12_15 {
            f("block-device-mapping", Node::Dir(Dir::BlockDeviceMapping))?;
        }
        f("hostname", Node::Text(self.hostname))?;
        if self.at_least("2008-09-01") {
            f("instance-action", Node::Text("none"))?;
        }
        f("instance-id", Node::Id("i-", inst.ec2_id))?;
        if self.at_least("2007-08-29") {
            f("instance-type", Node::Text(&inst.flavor))?;
        }
        if let (true, Some(k)) = (v2007_12_15, inst.kernel_ec2_id) {
            f("kernel-id", Node::Id("aki-", k))?;
        }
        if v2007_01_19 {
            f("local-hostname", Node::Text(self.hostname))?;
        }
        let local_ipv4 = inst
            .first_fixed_ipv4()
            .map_or(Node::Text(self.remote_address), Node::Ip);
        f("local-ipv4", local_ipv4)?;
        if self.at_least("2008-02-01") {
            f("placement", Node::Dir(Dir::Placement))?;
        }
        if v2007_01_19 {
            f("public-hostname", Node::Text(self.hostname))?;
            let public = inst
                .floating_ips
                .first()
                .map_or(Node::Text(""), |ip| Node::Ip(*ip));
            f("public-ipv4", public)?;
        }
        if let Some(key) = inst.keys.first() {
            f("public-keys", Node::Dir(Dir::PublicKeys(key)))?;
        }
        if let (true, Some(r)) = (v2007_12_15, inst.ramdisk_ec2_id) {
            f("ramdisk-id", Node::Id("ari-", r))?;
        }
        f("reservation-id", Node::Text(&inst.reservation_id))?;
        f("security-groups", Node::Lines(&inst.security_groups))
    }
}

/// `nova.block_device.instance_block_mapping`: the dummy mapping without a
/// root device name; else `ami`/`root`, the instance's default ephemeral and
/// swap devices, `ebsN` for volumes sorted by device name (a missing name
/// first), the last swap BDM as `swap`, and the other blank disks as
/// `ephemeralN` in row order. A missing device name prints as Nova's `None`.
/// Built only for a request below `block-device-mapping/`.
fn block_device_mapping(inst: &Instance) -> BTreeMap<String, &str> {
    let mut bdm = BTreeMap::new();
    let Some(root) = &inst.root_device_name else {
        for (k, v) in DUMMY_MAPPING {
            bdm.insert(k.to_owned(), v);
        }
        return bdm;
    };
    fn name(d: &Option<String>) -> &str {
        d.as_deref().unwrap_or("None")
    }
    let ami = root.strip_prefix("/dev/").unwrap_or(root);
    bdm.insert("ami".to_owned(), ami);
    bdm.insert("root".to_owned(), root.as_str());
    if let Some(d) = inst
        .default_ephemeral_device
        .as_ref()
        .filter(|d| !d.is_empty())
    {
        bdm.insert("ephemeral0".to_owned(), d.as_str());
    }
    if let Some(d) = inst.default_swap_device.as_ref().filter(|d| !d.is_empty()) {
        bdm.insert("swap".to_owned(), d.as_str());
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

#[cfg(test)]
mod tests;
