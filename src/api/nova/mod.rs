//! `[api] source = "nova"`: serve the instances in Nova's own databases,
//! as nova-api-metadata does, and keep passwords where Nova keeps them.
//!
//! nova-api-metadata does not use Nova's REST API: it reads the API
//! database (`instance_mappings` → `cell_mappings`) and the instance's cell
//! database directly, and writes a password into `instance_system_metadata`.
//! So do we, with the same credentials (nova.conf's URLs pasted unchanged,
//! [`url`]), which makes the API stateless: several API nodes behind a load
//! balancer share the cloud's database, and a password POSTed through one
//! is a 409 through every other (and through Nova).
//!
//! The request path: the loop verifies the signature
//! (`MetadataApi::signed_instance_id`: nothing is read for an unsigned or
//! forged request), asks the database thread for the instance
//! ([`source`]: cache, single flight, `sqlx` on its own runtime), decodes
//! the rows into the renderers' model ([`rows`]: a one-instance
//! [`Inventory`]) and renders exactly as for the inventory source. A
//! password POST that passes the handler's checks is stored by the
//! database thread in one race-free transaction (`db::set_password_once`).
//!
//! Security group names come from Neutron ([`neutron`], `[api.neutron]`),
//! only for EC2 paths, as the OpenStack tree does not show them.
//!
//! A templated `cell_mappings.database_connection` (`{username}`,
//! `{password}`, `{hostname}`, … as `nova-manage cell_v2 create_cell`
//! stores one) is filled from `[api.nova] connection` as Nova fills it from
//! `[database] connection` ([`url::TemplateFields`]).
//!
//! Not yet: TLS to MySQL, and identifying guests by address
//! (`service_metadata_proxy = false`).
//!
//! The database half (`db`, [`source`]: sqlx, and the tokio runtime it
//! runs on) is the Cargo feature `nova-db`, on by default. Without it the
//! config refuses `source = "nova"` ([`crate::config::NOVA_DB`]), and
//! `source` is a stand-in with the same types, none of which can be made
//! (`no_db.rs`), so the server's Nova paths compile unchanged and no `cfg`
//! spreads past this file. The rest (URLs, rows, Neutron) has no driver
//! in it and is always built.

#[cfg(feature = "nova-db")]
pub mod db;
pub mod neutron;
pub mod rows;
#[cfg(feature = "nova-db")]
pub mod source;
#[cfg(not(feature = "nova-db"))]
#[path = "no_db.rs"]
pub mod source;
pub mod url;

use std::sync::Arc;

use crate::api::{ApiRequest, ApiResponse, Handled, MetadataApi, Passwords, CONTENT_TYPE_HTML};
use crate::inventory::Inventory;
use crate::log;

pub use source::{start, NovaClient, NovaSource};

/// One instance, loaded and decoded.
#[derive(Debug)]
pub struct Loaded {
    /// The instance and its networks, in the renderers' model.
    pub inventory: Inventory,
    /// The password stored in `instance_system_metadata`.
    pub password: Option<String>,
}

/// What a load found.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// The instance.
    Found(Arc<Loaded>),
    /// No such (non-deleted) instance.
    NotFound,
}

/// Why an instance could not be served (a 500 for that instance).
#[derive(Debug, Clone, thiserror::Error)]
pub enum NovaError {
    /// The database failed or timed out.
    #[error("database: {0}")]
    Db(String),
    /// A row could not be decoded.
    #[error("bad row: {0}")]
    Corrupt(String),
    /// The database thread is gone (shutting down).
    #[error("the database thread has stopped")]
    Gone,
}

/// What start-up found, for the log and `--check`.
#[derive(Debug, Clone)]
pub struct StartReport {
    /// (database, alembic version) of every database checked.
    pub versions: Vec<(String, String)>,
    /// (cell database, instances) of every cell checked.
    pub instances: Vec<(String, i64)>,
}

/// What a password write found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordWrite {
    /// Stored.
    Stored,
    /// A password was already set (409).
    AlreadySet,
    /// The instance is gone.
    NoInstance,
}

/// Answer one request from Nova's databases.
pub async fn answer(
    api: &MetadataApi,
    client: &NovaClient,
    groups: &neutron::SecurityGroups,
    lv: &crate::api::vendordata::LoopVendordata,
    req: &ApiRequest<'_>,
) -> ApiResponse {
    let today = crate::api::utc_today();
    let Some(uuid) = api.signed_instance_id(req) else {
        // `/`, a malformed path, or an identity error: the handler says which.
        return api.handle_on(&Inventory::empty(), req, &today);
    };
    let loaded = match client.load(&uuid).await {
        Ok(Lookup::Found(l)) => l,
        Ok(Lookup::NotFound) => return api.handle_on(&Inventory::empty(), req, &today),
        Err(e) => {
            log::error(format_args!("api: instance {uuid}: {e}"));
            return ApiResponse::internal();
        }
    };
    let password = loaded.password.as_deref();
    // The EC2 tree lists security groups: fill them in from Neutron.
    let with_groups;
    let inventory = if is_ec2_path(req.target) {
        let names = match groups.names(&uuid).await {
            Ok(n) => n,
            Err(e) => {
                log::error(format_args!(
                    "api: security groups of instance {uuid} from Neutron: {e}"
                ));
                return ApiResponse::internal();
            }
        };
        with_groups = with_security_groups(&loaded.inventory, &uuid, &names);
        &with_groups
    } else {
        &loaded.inventory
    };
    match api
        .handle_with_vendordata(inventory, req, &today, Passwords::Row(password), lv)
        .await
    {
        Handled::Answer(r) => r,
        Handled::StorePassword(pw) => match client.set_password(&uuid, &pw).await {
            Ok(PasswordWrite::Stored) => {
                log::info(format_args!("api: password stored for instance {uuid}"));
                ApiResponse::ok(CONTENT_TYPE_HTML, Vec::new())
            }
            Ok(PasswordWrite::AlreadySet) => ApiResponse::conflict(),
            Ok(PasswordWrite::NoInstance) => ApiResponse::not_found(),
            Err(e) => {
                log::error(format_args!(
                    "api: storing the password of instance {uuid}: {e}"
                ));
                ApiResponse::internal()
            }
        },
    }
}

/// Whether a (signed, non-root) request is for the EC2 tree: every path
/// not under `/openstack`.
fn is_ec2_path(target: &[u8]) -> bool {
    let mut scratch = String::new();
    let segs = crate::api::path::normalize(target, &mut scratch);
    segs.is_some_and(|segs| segs.first().is_some_and(|s| *s != "openstack"))
}

/// A copy of the one-instance inventory with the instance's security groups set.
fn with_security_groups(inv: &Inventory, uuid: &str, names: &[String]) -> Inventory {
    let networks: Vec<_> = inv.networks().cloned().collect();
    match inv.instance(uuid) {
        Some(i) => {
            let mut i = i.clone();
            i.security_groups = names.to_vec();
            Inventory::of_one(inv.dhcp_domain().to_owned(), networks, i)
        }
        None => Inventory::empty(),
    }
}
