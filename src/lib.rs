//! metaproxy: OpenStack's metadata path in one binary.
//!
//! A guest's request to `169.254.169.254` is accepted by the namespace proxy
//! ([`proxy`]) inside the router or network namespace, parsed without IO by
//! [`http`], stripped of every client-supplied trust header, stamped with the
//! proxy's own `X-Forwarded-For` and router/network id, and multiplexed over
//! pooled Unix-socket connections to the metadata agent ([`agent`]). The agent
//! resolves (address, router|network) to (instance, project), signs the
//! instance id ([`sign`]) and forwards to the Nova-compatible metadata API
//! ([`api`]), which renders the EC2 and OpenStack trees from the
//! [`inventory`]. Everything that touches io_uring lives in [`rt`].
#![deny(unsafe_code)]

pub mod agent;
pub mod api;
pub mod config;
pub mod doctor;
pub mod http;
pub mod inventory;
pub mod log;
pub mod metrics;
pub mod ovn;
pub mod proxy;
pub mod rt;
pub mod serve;
pub mod sign;
pub mod signals;
pub mod storm;
