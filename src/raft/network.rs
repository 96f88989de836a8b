//! openraft's network: Raft RPCs as [`RpcRequest`]s over the transport.

use std::time::Duration;

use openraft::RPCTypes;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use super::rpc::{RpcReply, RpcRequest};
use super::{GroupId, META_GROUP, NodeId, NodeInfo, TypeConfig};
use crate::codec;
use crate::transport::{Client, TransportError};

/// Creates a connection handle per peer for one Raft group; every group
/// and peer shares one transport client (one connection per peer node).
#[derive(Clone)]
pub struct Network {
    client: Client,
    me: NodeId,
    group: GroupId,
}

impl Network {
    /// The [`META_GROUP`]'s network, sending as node `me` through `client`.
    pub fn new(client: Client, me: NodeId) -> Self {
        Self::for_group(client, me, META_GROUP)
    }

    /// Group `group`'s network: its Raft messages travel wrapped in
    /// [`RpcRequest::Group`] (the meta group's unwrapped).
    pub fn for_group(client: Client, me: NodeId, group: GroupId) -> Self {
        Self { client, me, group }
    }
}

/// The Raft side of one peer, for one group.
pub struct PeerConn {
    client: Client,
    me: NodeId,
    group: GroupId,
    target: NodeId,
    addr: String,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConn;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> PeerConn {
        PeerConn {
            client: self.client.clone(),
            me: self.me,
            group: self.group,
            target,
            addr: node.raft_addr.clone(),
        }
    }
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>;

impl PeerConn {
    async fn call<E: std::error::Error>(
        &self,
        req: RpcRequest,
        action: RPCTypes,
        ttl: Duration,
    ) -> Result<RpcReply, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>> {
        let req = RpcRequest::for_group(self.group, req);
        let bytes = codec::encode(&req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        self.send(bytes, action, ttl).await
    }

    /// Sends an encoded request and decodes the reply.
    async fn send<E: std::error::Error>(
        &self,
        bytes: Vec<u8>,
        action: RPCTypes,
        ttl: Duration,
    ) -> Result<RpcReply, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>> {
        let timeout = Timeout {
            action,
            id: self.me,
            target: self.target,
            timeout: ttl,
        };
        let reply = self
            .client
            .call(self.target, &self.addr, bytes, ttl)
            .await
            .map_err(|e| match e {
                TransportError::Timeout { .. } => RPCError::Timeout(timeout),
                TransportError::Unreachable { .. }
                | TransportError::Auth { .. }
                | TransportError::Tls { .. } => RPCError::Unreachable(Unreachable::new(&e)),
                other => RPCError::Network(NetworkError::new(&other)),
            })?;
        match codec::decode(&reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))? {
            // Like a peer that is down: openraft backs off and retries.
            RpcReply::NoSuchGroup(g) => Err(RPCError::Unreachable(Unreachable::new(
                &std::io::Error::other(format!(
                    "node {} hosts no replica of group {g}",
                    self.target
                )),
            ))),
            other => Ok(other),
        }
    }

    fn unexpected<E: std::error::Error>(
        reply: RpcReply,
    ) -> RPCError<NodeId, NodeInfo, RaftError<NodeId, E>> {
        let msg = format!("unexpected reply {reply:?}");
        RPCError::Network(NetworkError::new(&std::io::Error::other(msg)))
    }

    fn remote<E: std::error::Error>(
        &self,
        e: RaftError<NodeId, E>,
    ) -> RPCError<NodeId, NodeInfo, RaftError<NodeId, E>> {
        RPCError::RemoteError(RemoteError::new(self.target, e))
    }
}

/// The AppendEntries request in `req`, wrapped for a group or not.
fn append_request(req: &mut RpcRequest) -> Option<&mut AppendEntriesRequest<TypeConfig>> {
    match req {
        RpcRequest::AppendEntries(rpc) => Some(rpc),
        RpcRequest::Group { request, .. } => append_request(request),
        _ => None,
    }
}

impl RaftNetwork<TypeConfig> for PeerConn {
    /// Sends the entries, or as many of the first ones as fit in half a
    /// transport frame: openraft sends up to `max_payload_entries` (300) at
    /// once whatever their size, and a follower catching up on entries of
    /// a thousand tasks each was sent more than a frame holds, refused
    /// before any I/O, again and again: it never caught up. The rest go
    /// in the next call (`PartialSuccess` tells openraft how far this one
    /// got). A request is encoded once; only one found too large is
    /// encoded again, with half its entries.
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let budget = self.client.max_frame_bytes() / 2;
        let mut req = RpcRequest::for_group(self.group, RpcRequest::AppendEntries(rpc));
        let mut cut = false;
        let bytes = loop {
            let bytes =
                codec::encode(&req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
            match append_request(&mut req) {
                Some(rpc) if bytes.len() > budget && rpc.entries.len() > 1 => {
                    let keep = rpc.entries.len() / 2;
                    rpc.entries.truncate(keep);
                    cut = true;
                }
                _ => break bytes,
            }
        };
        let last = append_request(&mut req).and_then(|rpc| rpc.entries.last().map(|e| e.log_id));
        match self
            .send(bytes, RPCTypes::AppendEntries, option.hard_ttl())
            .await?
        {
            RpcReply::AppendEntries(Ok(AppendEntriesResponse::Success)) if cut => {
                Ok(AppendEntriesResponse::PartialSuccess(last))
            }
            RpcReply::AppendEntries(r) => r.map_err(|e| self.remote(e)),
            other => Err(Self::unexpected(other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        match self
            .call(
                RpcRequest::InstallSnapshot(rpc),
                RPCTypes::InstallSnapshot,
                option.hard_ttl(),
            )
            .await?
        {
            RpcReply::InstallSnapshot(r) => r.map_err(|e| self.remote(e)),
            other => Err(Self::unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        match self
            .call(RpcRequest::Vote(rpc), RPCTypes::Vote, option.hard_ttl())
            .await?
        {
            RpcReply::Vote(r) => r.map_err(|e| self.remote(e)),
            other => Err(Self::unexpected(other)),
        }
    }
}
