//! Pre-vote, by hand: a voter campaigns only when a majority of its group
//! has no working leader either.
//!
//! openraft 0.9 has no pre-vote. A voter cut off from the others (a
//! partition) keeps timing out and starting elections it cannot win, each
//! one a higher term; when the cut heals, its first message carries that
//! term and deposes a healthy leader (chaos/README.md, finding 5). So every
//! group starts with openraft's election timer off (`enable_elect = false`)
//! and [`gate_loop`] turns it on only for a voter that has not heard from a
//! leader within the election timeout's lower bound *and* has asked the
//! other voters ([`RpcRequest::PreVote`]) and found a majority, itself
//! included, that has not either. A cut-off node finds no majority and
//! never raises its term; a follower whose leader died finds the others in
//! the same state and campaigns one pass (a heartbeat interval) later than
//! before. Elections asked for outright (leadership hand-over, a leader
//! whose port refuses connections) do not go through the gate: they are
//! started on purpose when the leader is known to be gone or leaving.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{Group, Node};
use crate::raft::rpc::{RpcReply, RpcRequest};
use crate::raft::{GroupId, NodeId};

/// On a voter asked for a pre-vote: true when it has no working leader.
/// A leader with a fresh quorum says no; a follower that heard from its
/// leader within the election timeout's lower bound says no.
pub(super) fn would_vote(node: &Node, group: &Group) -> bool {
    let raft = &node.config().raft;
    if group.is_leader() {
        let since = group.raft().metrics().borrow().millis_since_quorum_ack;
        return since.is_none_or(|ms| ms > raft.election_timeout_max.as_millis() as u64);
    }
    !group.heard_from_leader_within(raft.election_timeout_min)
}

/// Sets each group's election timer every heartbeat interval, until
/// shutdown.
pub(super) async fn gate_loop(node: Node) {
    let shutdown = node.shutdown_token().clone();
    let every = node.config().raft.heartbeat_interval;
    let mut enabled: BTreeMap<GroupId, bool> = BTreeMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
        }
        let passes = node.groups().map(|g| gate(&node, g));
        let decisions = futures_util::future::join_all(passes).await;
        for (group, decision) in node.groups().zip(decisions) {
            let Some(on) = decision else { continue };
            // Set every pass: a leadership hand-over turns it back on when
            // it ends.
            group.raft().runtime_config().elect(on);
            if enabled.insert(group.id(), on) != Some(on) {
                tracing::debug!(
                    group = group.id(),
                    elect = on,
                    "election timer set by pre-vote"
                );
            }
        }
    }
}

/// Whether `group`'s election timer should run on this node now; `None`
/// when it does not matter (this node leads the group, or is not one of
/// its voters).
async fn gate(node: &Node, group: &Group) -> Option<bool> {
    if group.is_leader() {
        return None;
    }
    let (voters, nodes) = group.members();
    if !voters.contains(&node.id()) {
        return None;
    }
    let raft = &node.config().raft;
    if group.heard_from_leader_within(raft.election_timeout_min) {
        return Some(false);
    }
    let majority = voters.len() / 2 + 1;
    let asks = voters.iter().filter(|v| **v != node.id()).map(|v| {
        let addr = nodes
            .get(v)
            .map(|i| i.raft_addr.clone())
            .unwrap_or_default();
        ask(node, group, *v, addr, raft.election_timeout_min)
    });
    let yes = 1 + futures_util::future::join_all(asks)
        .await
        .into_iter()
        .filter(|granted| *granted)
        .count();
    let on = yes >= majority;
    crate::metrics::prevote(on);
    Some(on)
}

/// Asks voter `to` for a pre-vote in `group`; no answer in `timeout` is a no.
async fn ask(node: &Node, group: &Group, to: NodeId, addr: String, timeout: Duration) -> bool {
    let req = RpcRequest::for_group(group.id(), RpcRequest::PreVote);
    matches!(
        node.call_peer(to, &addr, req, timeout).await,
        Ok(RpcReply::PreVote(true))
    )
}
