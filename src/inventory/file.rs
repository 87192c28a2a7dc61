//! The TOML file layer: serde structs that mirror `examples/inventory.toml`
//! one to one. Everything is a string or a number here; parsing into
//! addresses, defaults that depend on other fields and cross-references are
//! checked in [`super::Inventory::from_file`], which names the key at fault.

use std::collections::BTreeMap;

use serde::Deserialize;

fn default_dhcp_domain() -> String {
    "novalocal".to_owned()
}

fn default_true() -> bool {
    true
}

fn default_device_owner() -> String {
    "compute:nova".to_owned()
}

fn default_security_groups() -> Vec<String> {
    vec!["default".to_owned()]
}

fn default_key_type() -> String {
    "ssh".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct InventoryFile {
    #[serde(default = "default_dhcp_domain")]
    pub dhcp_domain: String,
    #[serde(default)]
    pub network: Vec<NetworkFile>,
    #[serde(default)]
    pub router: Vec<RouterFile>,
    #[serde(default)]
    pub instance: Vec<InstanceFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NetworkFile {
    pub id: String,
    #[serde(default)]
    pub name: String,
    pub project: String,
    pub mtu: Option<u32>,
    #[serde(default)]
    pub subnet: Vec<SubnetFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SubnetFile {
    pub id: String,
    pub cidr: String,
    pub gateway: Option<String>,
    #[serde(default)]
    pub dns: Vec<String>,
    pub ip_version: Option<u8>,
    #[serde(default = "default_true")]
    pub dhcp: bool,
    pub ipv6_mode: Option<String>,
    #[serde(default)]
    pub routes: Vec<RouteFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RouteFile {
    pub destination: String,
    pub nexthop: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RouterFile {
    pub id: String,
    #[serde(default)]
    pub networks: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct InstanceFile {
    pub uuid: String,
    pub name: Option<String>,
    pub hostname: String,
    pub project: String,
    pub availability_zone: Option<String>,
    #[serde(default)]
    pub launch_index: u32,
    #[serde(default = "default_flavor")]
    pub flavor: String,
    pub ec2_id: Option<u32>,
    #[serde(default)]
    pub image_ec2_id: u32,
    pub kernel_ec2_id: Option<u32>,
    pub ramdisk_ec2_id: Option<u32>,
    pub reservation_id: Option<String>,
    pub root_device_name: Option<String>,
    #[serde(default = "default_security_groups")]
    pub security_groups: Vec<String>,
    pub user_data: Option<String>,
    pub user_data_b64: Option<String>,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    pub image_ref: Option<String>,
    pub boot_roles: Option<String>,
    #[serde(default)]
    pub floating_ips: Vec<String>,
    #[serde(default)]
    pub key: Vec<KeyFile>,
    #[serde(default)]
    pub port: Vec<PortFile>,
}

fn default_flavor() -> String {
    "m1.small".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KeyFile {
    pub name: String,
    #[serde(rename = "type", default = "default_key_type")]
    pub kind: String,
    pub data: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PortFile {
    pub id: String,
    pub network: String,
    pub mac: String,
    #[serde(default)]
    pub fixed_ips: Vec<String>,
    #[serde(default = "default_device_owner")]
    pub device_owner: String,
    pub vif_type: Option<String>,
    pub devname: Option<String>,
}
