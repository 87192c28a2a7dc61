//! The OVN compute-node metadata service (issue 16), built bottom-up.
//!
//! [`ovsdb`] is the OVSDB client; [`replica`] keeps the slice of the
//! Southbound database a compute node needs, with the (network, IP) and
//! (network, MAC) indexes that answer a guest's request without Neutron's
//! scan of every `Port_Binding`. Provisioning `ovnmeta-` namespaces,
//! serving in them and the agent's liveness keys come next; until then
//! nothing here is reachable from the command line except
//! `metaproxy ovn-dump-replica`, which prints the replica.

pub mod ovsdb;
pub mod replica;
