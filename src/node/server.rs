//! The receiving end of node-to-node RPCs: Raft messages go to the local
//! Raft; forwarded writes, read-index and membership requests are served if
//! this node is the leader, else answered with "not the leader".

use super::Node;
use super::membership;
use super::proposer::accept_forwarded;
use crate::codec;
use crate::raft::NodeId;
use crate::raft::rpc::{RemoteFailure, RpcReply, RpcRequest};
use crate::transport::Handler;

/// Serves [`RpcRequest`]s for one node.
pub(super) struct RpcHandler {
    pub(super) node: Node,
}

impl Handler for RpcHandler {
    async fn handle(&self, peer: NodeId, request: Vec<u8>) -> Vec<u8> {
        let reply = match codec::decode::<RpcRequest>(&request) {
            Ok(req) => self.serve(peer, req).await,
            Err(e) => {
                tracing::warn!(peer, error = %e, "undecodable request");
                RpcReply::Undecodable(e.to_string())
            }
        };
        codec::encode(&reply).unwrap_or_else(|e| {
            tracing::error!(error = %e, "unencodable reply");
            codec::encode(&RpcReply::Undecodable(e.to_string())).unwrap_or_default()
        })
    }
}

impl RpcHandler {
    async fn serve(&self, peer: NodeId, req: RpcRequest) -> RpcReply {
        let raft = self.node.raft();
        match req {
            RpcRequest::AppendEntries(r) => RpcReply::AppendEntries(raft.append_entries(r).await),
            RpcRequest::Vote(r) => RpcReply::Vote(raft.vote(r).await),
            RpcRequest::InstallSnapshot(r) => {
                RpcReply::InstallSnapshot(raft.install_snapshot(r).await)
            }
            RpcRequest::Forward(cmds) => {
                let n = cmds.len();
                let max = self.node.queue_config().batch_max_commands;
                if n == 0 || n > max {
                    return RpcReply::Forward(Err(RemoteFailure::Invalid(format!(
                        "batch of {n} commands (1..={max})"
                    ))));
                }
                tracing::trace!(peer, n, "forwarded batch");
                RpcReply::Forward(accept_forwarded(&self.node, cmds).await)
            }
            RpcRequest::ReadIndex => {
                if !self.node.is_leader() {
                    let leader = self.node.leader().map(|(id, _)| id);
                    return RpcReply::ReadIndex(Err(RemoteFailure::NotLeader { leader }));
                }
                RpcReply::ReadIndex(self.node.leader_read_index().await)
            }
            RpcRequest::Join { id, info } => {
                RpcReply::Membership(membership::add_member(&self.node, id, info).await)
            }
            RpcRequest::Leave { id } => {
                RpcReply::Membership(membership::remove_member(&self.node, id).await)
            }
            RpcRequest::Elect => RpcReply::Elect(
                raft.trigger()
                    .elect()
                    .await
                    .map_err(|e| RemoteFailure::Unavailable(e.to_string())),
            ),
        }
    }
}
