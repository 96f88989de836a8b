//! Godel: a self-hosted, fault-tolerant control plane for AI coding agents.
//!
//! Modules follow DESIGN.md's nouns: [`fsm`] is the deterministic replicated
//! state machine; [`raft`] replicates it; [`store`] keeps the log and the
//! state machine in sled; [`transport`] carries node-to-node traffic; [`node`]
//! assembles them with the write pipeline and linearizable reads;
//! [`placement`] decides which node runs each gateway; [`gateway`] holds the
//! drivers that run tasks on agent gateways; [`actors`] is the supervision
//! tree (restart policy); [`fabric`] joins the nodes' actor systems for lease
//! hints; [`api`] and [`cli`] are the operator's interfaces, and [`backup`]
//! copies the replicated state out of a cluster and seeds a new one with it;
//! [`config`], [`metrics`], [`clock`], [`codec`], [`tls`] and [`trace`]
//! (W3C trace context) are shared plumbing.
#![warn(missing_docs)]
// openraft's error types (StorageError, RaftError) are large by design and
// appear in most storage and network signatures.
#![allow(clippy::result_large_err)]

pub mod actors;
pub mod api;
pub mod backup;
pub mod budget;
pub mod cli;
pub mod clock;
pub mod codec;
pub mod config;
pub mod events;
pub mod fabric;
pub mod fsm;
pub mod gateway;
pub mod metrics;
pub mod node;
pub mod otel;
pub mod placement;
pub mod raft;
pub mod roles;
pub mod store;
pub mod tls;
pub mod trace;
pub mod transport;
