//! Replication: the openraft type configuration, the network that carries Raft
//! RPCs over the node-to-node transport, and the server side that feeds them
//! to the local Raft.
//!
//! The log and the state machine live in [`crate::store`]; the transport in
//! [`crate::transport`]. Every mutation of the queue is a Raft write, so a node
//! cut off from the majority cannot change anything.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::fsm;

pub mod network;
pub mod rpc;

/// A node's identity in the cluster: stable across restarts.
pub type NodeId = u64;

/// A Raft group's identity: [`META_GROUP`], and the queue shards' groups
/// `1..=cluster.shards` when there is more than one shard
/// (`docs/shards.md`), each its own openraft instance whose RPCs share the
/// node-to-node transport.
pub type GroupId = u32;

/// The group every node hosts.
pub const META_GROUP: GroupId = 0;

/// What the cluster membership records about a node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeInfo {
    /// Where its node-to-node transport listens (`host:port`).
    pub raft_addr: String,
    /// Where its HTTP API listens (`host:port`).
    pub api_addr: String,
    /// Its region label.
    pub region: String,
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "raft={} api={} region={}",
            self.raft_addr, self.api_addr, self.region
        )
    }
}

openraft::declare_raft_types!(
    /// Godel's openraft types.
    pub TypeConfig:
        D = fsm::Request,
        R = fsm::Response,
        NodeId = NodeId,
        Node = NodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        // A snapshot's payload is a file: built, sent, received and
        // restored without being held whole in memory.
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft handle of this node.
pub type Raft = openraft::Raft<TypeConfig>;
