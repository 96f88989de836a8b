//! The receiving end of node-to-node RPCs: Raft messages go to the local
//! Raft; forwarded writes, read-index and membership requests are served if
//! this node is the leader, else answered with "not the leader".

use std::time::Duration;

use super::membership;
use super::proposer::accept_forwarded;
use super::{Group, Node};
use crate::codec;
use crate::raft::NodeId;
use crate::raft::rpc::{RemoteFailure, RpcReply, RpcRequest};
use crate::transport::Handler;
use openraft::raft::AppendEntriesResponse;

/// Serves [`RpcRequest`]s for one node.
pub(super) struct RpcHandler {
    pub(super) node: Node,
}

/// How long to wait for the leader's port to answer before assuming it is alive.
const LEADER_PROBE_TIMEOUT: Duration = Duration::from_millis(100);
/// A port that still accepts is asked again this often, this many times
/// (within the leader lease, so the election is not later for it).
const LEADER_PROBE_EVERY: Duration = Duration::from_millis(20);
const LEADER_PROBES: usize = 8;
/// Added to the leader lease before electing, for clock and delivery skew.
const LEASE_MARGIN: Duration = Duration::from_millis(20);
/// Delay between followers of successive rank, so one candidate goes first.
const ELECTION_STAGGER: Duration = Duration::from_millis(60);

impl Handler for RpcHandler {
    async fn disconnected(&self, peer: NodeId) {
        let node = self.node.clone();
        // The hint must not hold up the transport's connection task.
        self.node.spawn(Self::leader_disconnected(node, peer));
    }

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
    /// A connection from the leader ended. If the leader's port now refuses
    /// connections, its process is gone (killed or stopped): rather than wait
    /// for the randomized election timer, which may fire while the other
    /// followers still honour the dead leader's lease and so need a second
    /// round, start an election as soon as every lease has run out. Followers
    /// stagger by rank so they do not split the vote. A disconnect from a
    /// live leader (idle close, transient break) finds its port open and does
    /// nothing.
    /// Every group led by `peer` as this node knows it gets the same
    /// treatment, at once: a dead process led them all.
    async fn leader_disconnected(node: Node, peer: NodeId) {
        let led: Vec<Group> = node
            .groups()
            .filter(|g| g.leader().is_some_and(|(id, _)| id == peer) && !g.is_leader())
            .cloned()
            .collect();
        let Some((_, info)) = led.first().and_then(Group::leader) else {
            tracing::debug!(
                peer,
                "connection from a node that leads no group here closed"
            );
            return;
        };
        if !port_closed(&info.raft_addr).await {
            tracing::debug!(peer, "leader's connection closed; its port still answers");
            return;
        }
        let elections = led
            .into_iter()
            .map(|group| Self::elect_after_lease(node.clone(), group, peer));
        futures_util::future::join_all(elections).await;
    }

    /// Starts an election in `group` once every follower's lease on the
    /// dead `leader` has run out, unless a new leader came first.
    async fn elect_after_lease(node: Node, group: Group, leader: NodeId) {
        let (voters, _) = group.members();
        let Some(rank) = voters
            .iter()
            .filter(|v| **v != leader)
            .position(|v| *v == node.id())
        else {
            return;
        };
        // A dead process drops every connection it had: the first to close
        // starts the election, the others find it pending.
        if !group.start_electing(leader) {
            return;
        }
        let raft = &node.config().raft;
        // The lease runs from the leader's last message, which every
        // follower took within a few milliseconds of this one (the margin);
        // this replica noted its own after openraft did, so never early.
        let lease_left = (raft.election_timeout_max + LEASE_MARGIN)
            .saturating_sub(group.since_leader_contact().unwrap_or_default());
        let wait = lease_left + ELECTION_STAGGER * rank as u32;
        tracing::info!(
            group = group.id(),
            leader,
            wait_ms = wait.as_millis() as u64,
            "leader's port is closed; electing after its lease"
        );
        tokio::time::sleep(wait).await;
        let still_gone = group.leader().map(|(id, _)| id) == Some(leader) && !group.is_leader();
        if still_gone && let Err(e) = group.raft().trigger().elect().await {
            tracing::warn!(group = group.id(), error = %e, "could not start an election");
        }
        group.end_electing(leader);
    }

    async fn serve(&self, peer: NodeId, req: RpcRequest) -> RpcReply {
        match req {
            RpcRequest::Join { id, info } => {
                RpcReply::Membership(membership::add_member(&self.node, id, info).await)
            }
            RpcRequest::Leave { id } => {
                RpcReply::Membership(membership::remove_member(&self.node, id).await)
            }
            RpcRequest::Ping => RpcReply::Pong,
            RpcRequest::Group { group, request } => match self.node.group(group) {
                Some(g) if is_group_message(&request) => {
                    let g = g.clone();
                    self.serve_group(peer, &g, *request).await
                }
                // Not hosted here, or not a message a group takes.
                _ => RpcReply::NoSuchGroup(group),
            },
            other => {
                let meta = self.node.meta().clone();
                self.serve_group(peer, &meta, other).await
            }
        }
    }

    /// Serves a message addressed to one group ([`is_group_message`]).
    async fn serve_group(&self, peer: NodeId, group: &Group, req: RpcRequest) -> RpcReply {
        let raft = group.raft();
        match req {
            RpcRequest::AppendEntries(r) => {
                let reply = raft.append_entries(r).await;
                if matches!(&reply, Ok(r) if !matches!(r, AppendEntriesResponse::HigherVote(_))) {
                    group.saw_leader();
                }
                RpcReply::AppendEntries(reply)
            }
            RpcRequest::Vote(r) => RpcReply::Vote(raft.vote(r).await),
            RpcRequest::InstallSnapshot(r) => {
                let reply = raft.install_snapshot(r).await;
                if reply.is_ok() {
                    group.saw_leader();
                }
                RpcReply::InstallSnapshot(reply)
            }
            RpcRequest::PreVote => RpcReply::PreVote(super::prevote::would_vote(&self.node, group)),
            RpcRequest::Forward(f) => {
                let n = f.commands.len();
                // A follower's batch: up to `batch_max_commands`, or one
                // API batch if bigger, and the pull round it may end with.
                let max = self
                    .node
                    .queue_config()
                    .batch_max_commands
                    .max(crate::api::MAX_BATCH_ITEMS)
                    + 1;
                if n == 0 || n > max {
                    return RpcReply::Forward(Err(RemoteFailure::Invalid(format!(
                        "batch of {n} commands (1..={max})"
                    ))));
                }
                tracing::trace!(peer, group = group.id(), n, "forwarded batch");
                let writes = crate::fsm::unpack(f.commands, &f.callers, f.audit);
                RpcReply::Forward(accept_forwarded(&self.node, group, writes).await)
            }
            RpcRequest::ReadIndex => {
                if !group.is_leader() {
                    let leader = group.leader().map(|(id, _)| id);
                    return RpcReply::ReadIndex(Err(RemoteFailure::NotLeader { leader }));
                }
                RpcReply::ReadIndex(self.node.leader_read_index(group).await)
            }
            RpcRequest::Leave { id } => {
                RpcReply::Membership(membership::remove_from_group(group, id).await)
            }
            RpcRequest::Elect => RpcReply::Elect(
                raft.trigger()
                    .elect()
                    .await
                    .map_err(|e| RemoteFailure::Unavailable(e.to_string())),
            ),
            other => {
                tracing::warn!(peer, group = group.id(), request = ?other, "not a group message");
                RpcReply::NoSuchGroup(group.id())
            }
        }
    }
}

/// Whether a message is one a group takes: Raft's own, and the writes,
/// read indexes, elections, pre-votes and removals asked of a group's
/// replica. Joins, pings and nested groups are the node's.
fn is_group_message(req: &RpcRequest) -> bool {
    matches!(
        req,
        RpcRequest::AppendEntries(_)
            | RpcRequest::Vote(_)
            | RpcRequest::InstallSnapshot(_)
            | RpcRequest::Forward(_)
            | RpcRequest::ReadIndex
            | RpcRequest::Elect
            | RpcRequest::PreVote
            | RpcRequest::Leave { .. }
    )
}

/// Whether the process at `addr` is gone: its port refuses connections, or
/// resets one it had queued (its listening socket closed under it). A
/// process killed with SIGKILL may drop its connections a moment before its
/// listening socket, so a port that still accepts is asked again a few
/// times; one that keeps accepting, or does not answer, is alive (paused or
/// cut off: the election timer decides those).
async fn port_closed(addr: &str) -> bool {
    use std::io::ErrorKind::{ConnectionRefused, ConnectionReset};
    for probe in 0..LEADER_PROBES {
        if probe > 0 {
            tokio::time::sleep(LEADER_PROBE_EVERY).await;
        }
        let connect = tokio::net::TcpStream::connect(addr);
        match tokio::time::timeout(LEADER_PROBE_TIMEOUT, connect).await {
            Ok(Err(e)) if matches!(e.kind(), ConnectionRefused | ConnectionReset) => return true,
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::port_closed;
    use std::time::Duration;

    #[tokio::test]
    async fn a_port_that_refuses_is_closed() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        assert!(port_closed(&addr).await);
    }

    #[tokio::test]
    async fn a_port_that_keeps_accepting_is_open() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accept = tokio::spawn(async move {
            loop {
                let _ = listener.accept().await;
            }
        });
        assert!(!port_closed(&addr).await);
        accept.abort();
    }

    /// A killed process's connections close a moment before its listening
    /// socket: a port that still accepts then closes is found closed.
    #[tokio::test]
    async fn a_port_that_closes_after_its_connections_is_closed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(listener);
        });
        assert!(port_closed(&addr).await);
    }
}
