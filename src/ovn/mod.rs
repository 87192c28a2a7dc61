//! The OVN compute-node metadata service (issue 16), built bottom-up.
//!
//! [`ovsdb`] is the OVSDB client; [`replica`] keeps the slice of the
//! Southbound database a compute node needs, with the (network, IP) and
//! (network, MAC) indexes that answer a guest's request without Neutron's
//! scan of every `Port_Binding`. [`liveness`] keeps the keys in this
//! chassis' `Chassis_Private` row from which neutron-server judges the
//! agent alive; [`config`] holds the `[ovn]` options in Neutron's terms.
//! Provisioning `ovnmeta-` namespaces and serving in
//! them come next; until then nothing here is reachable from the command
//! line except `metaproxy ovn-dump-replica`, which prints the replica (and
//! liveness is started by nothing: a node must not look alive to Neutron
//! while nothing serves).

pub mod config;
pub mod liveness;
pub mod ovsdb;
pub mod replica;
pub mod serve;
