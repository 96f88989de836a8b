//! The messages nodes send each other over the transport, encoded with
//! [`crate::codec`]. Variants are only ever appended (bincode tags by index).

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use super::{GroupId, NodeId, NodeInfo, TypeConfig};
use crate::fsm;

/// A request from one node to another.
#[derive(Debug, Serialize, Deserialize)]
pub enum RpcRequest {
    /// Raft log replication and heartbeats.
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// Raft election.
    Vote(VoteRequest<NodeId>),
    /// Raft snapshot chunk.
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// Client commands forwarded to the leader, with the API callers they
    /// are audited for (packed as in a batch: each caller once).
    Forward(Forwarded),
    /// Ask the leader for a read index (confirms leadership with a quorum).
    ReadIndex,
    /// Ask the leader to add a node (learner, then voter).
    Join {
        /// The new node.
        id: NodeId,
        /// Its addresses and region.
        info: NodeInfo,
    },
    /// Ask the leader to remove a node from the voters and learners.
    Leave {
        /// The node.
        id: NodeId,
    },
    /// Ask a node to start an election now (the receiving end of a
    /// leadership transfer).
    Elect,
    /// Check that the node answers over the transport (TLS and the secret
    /// handshake included); the leader asks before adding a node.
    Ping,
    /// A message for a group other than [`META_GROUP`](super::META_GROUP),
    /// whose messages travel unwrapped: a Raft message (`AppendEntries`,
    /// `Vote`, `InstallSnapshot`), or a write forwarded to, a read index
    /// asked of, or an election asked of that group's replica.
    Group {
        /// The group.
        group: GroupId,
        /// The message.
        request: Box<RpcRequest>,
    },
    /// Would the receiver vote for a new leader now? Asked by a voter that
    /// has not heard from a leader before it lets itself campaign, so a
    /// node cut off from the majority never raises its term (openraft 0.9
    /// has no pre-vote of its own; see `node/prevote.rs`).
    PreVote,
}

impl RpcRequest {
    /// `request` addressed to group `group`: as it is for the
    /// [`META_GROUP`](super::META_GROUP), wrapped in [`RpcRequest::Group`]
    /// for any other.
    pub fn for_group(group: GroupId, request: RpcRequest) -> RpcRequest {
        if group == super::META_GROUP {
            request
        } else {
            RpcRequest::Group {
                group,
                request: Box::new(request),
            }
        }
    }
}

/// Commands a follower forwards to the leader (see `fsm::pack`).
#[derive(Debug, Serialize, Deserialize)]
pub struct Forwarded {
    /// The commands, in order.
    pub commands: Vec<fsm::Command>,
    /// Their API callers, each once.
    pub callers: Vec<fsm::AuditCaller>,
    /// Which command each caller asked for.
    pub audit: Vec<Option<fsm::AuditMark>>,
}

/// Why a forwarded request did not run on the receiver.
#[derive(Clone, Debug, Serialize, Deserialize, thiserror::Error)]
pub enum RemoteFailure {
    /// The receiver is not the leader; it names the one it knows of.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The leader the receiver knows of.
        leader: Option<NodeId>,
    },
    /// The receiver could not serve it now (no quorum, timeout, shutting down).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The request was refused as invalid.
    #[error("invalid: {0}")]
    Invalid(String),
}

/// The answer to an [`RpcRequest`], same variant order.
#[derive(Debug, Serialize, Deserialize)]
pub enum RpcReply {
    /// See [`RpcRequest::AppendEntries`].
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// See [`RpcRequest::Vote`].
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// See [`RpcRequest::InstallSnapshot`].
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    /// See [`RpcRequest::Forward`]: the batch refused as a whole (nothing
    /// was proposed), or one result per command.
    Forward(Result<Vec<Result<fsm::Outcome, RemoteFailure>>, RemoteFailure>),
    /// See [`RpcRequest::ReadIndex`]: the log index to wait for.
    ReadIndex(Result<u64, RemoteFailure>),
    /// See [`RpcRequest::Join`] and [`RpcRequest::Leave`].
    Membership(Result<(), RemoteFailure>),
    /// See [`RpcRequest::Elect`].
    Elect(Result<(), RemoteFailure>),
    /// See [`RpcRequest::Ping`].
    Pong,
    /// The request could not be decoded.
    Undecodable(String),
    /// See [`RpcRequest::Group`]: the receiver hosts no replica of that
    /// group, or the message is not one a group takes.
    NoSuchGroup(GroupId),
    /// See [`RpcRequest::PreVote`]: true when the receiver has no working
    /// leader (it has not heard from one within the election timeout's
    /// lower bound, or it leads without a fresh quorum).
    PreVote(bool),
}
