//! The metadata agent: resolve → sign → forward.
//!
//! The namespace proxy hands the agent a request that carries exactly one
//! `X-Forwarded-For` (the guest's address, as the proxy saw it) and one of
//! `X-Neutron-Router-ID` / `X-Neutron-Network-ID` / `X-OVN-Network-ID`. The
//! agent:
//!
//! 1. **resolves** the guest: [`identity`] turns those headers into a
//!    [`identity::Scope`] (router or network) and a [`identity::LookupKey`]
//!    (IP, or MAC for link-local IPv6), failing closed with 400 on anything
//!    ambiguous; the key is looked up in a [`cache::TtlCache`] and, on a miss,
//!    against Neutron with the REST queries built and parsed by
//!    [`neutron::query`].
//!    Concurrent misses are single-flighted and batched per network set by
//!    [`batch::Batcher`], so a boot storm costs a handful of Neutron queries
//!    instead of one per guest request;
//! 2. **signs** the instance id with [`crate::sign::sign_instance_id`];
//! 3. **forwards** to the Nova-compatible metadata API.
//!
//! The IO layer: [`daemon`] (start, bind, loops), [`conn`] (one pipelined
//! connection on the engine), [`handler`] (one request: resolve → sign →
//! forward → relay), [`resolve`] (the validated ids and the loop's
//! [`resolve::Resolver`], one of two backends: [`inventory`], the file
//! through a per-loop cache, or [`neutron`]: its [`neutron::resolver`] with
//! cache, prefetch, single flight and batching over its [`neutron::client`]
//! with Keystone), [`forward`] (the pooled client to the API and to
//! Neutron), [`link`] (that client, or the API stage on the same loop in
//! `metaproxy up`), [`metrics`] (per-loop counters, Prometheus), configured by
//! [`config`]; [`report`] sends Neutron's `report_state` over RabbitMQ
//! on a thread of its own, so the agent shows in `openstack network agent
//! list`.
//!
//! Everything in the other submodules is pure: no sockets, timers or runtime
//! types, so each step is unit-tested in isolation and the async layer only
//! wires them together. Time enters through [`cache::Clock`] and through the
//! caller driving [`batch::Batcher`]; that is why neither owns a timer.

pub mod batch;
pub mod cache;
pub mod config;
pub mod conn;
pub mod daemon;
pub mod forward;
pub mod handler;
pub mod identity;
pub mod inventory;
pub mod link;
pub mod metrics;
pub mod neutron;
pub mod report;
pub mod resolve;
pub mod tls;

pub use config::AgentConfig;
pub use daemon::{start, start_in_process, start_sharing, AgentHandle, AgentStats, InProcess};
