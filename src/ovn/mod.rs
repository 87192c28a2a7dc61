//! The OVN compute-node metadata service (issue 16), built bottom-up.
//!
//! [`ovsdb`] is the OVSDB client; [`replica`] keeps the slice of the
//! Southbound database a compute node needs, with the (network, IP) and
//! (network, MAC) indexes that answer a guest's request without Neutron's
//! scan of every `Port_Binding`. [`liveness`] keeps the keys in this
//! chassis' `Chassis_Private` row from which neutron-server judges the
//! agent alive; [`config`] holds the `[ovn]` options in Neutron's terms.
//! [`provision`] computes the `ovnmeta-<network>` namespaces a replica
//! calls for and makes the host match. [`serve`] is `metaproxy ovn`:
//! provisioning on a thread of its own after every replica change,
//! listeners in every `ovnmeta-` namespace, guests resolved from the
//! replica, liveness once the first provisioning pass is done and served.
//! `metaproxy ovn-dump-replica` prints the replica.

pub mod config;
pub mod liveness;
pub mod ovsdb;
pub mod provision;
pub mod replica;
pub mod serve;
