//! Godel: a self-hosted, fault-tolerant control plane for AI coding agents.
//!
//! Modules follow DESIGN.md's nouns: [`fsm`] is the deterministic replicated
//! state machine, [`raft`] replicates it, [`store`] keeps the log and the
//! state machine in sled, [`transport`] carries node-to-node traffic, and
//! [`codec`] is the one binary encoding.
#![warn(missing_docs)]

pub mod codec;
pub mod fsm;
pub mod raft;
pub mod store;
