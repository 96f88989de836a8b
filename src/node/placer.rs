//! The leader's placement loop: gateways without a live, non-draining owner
//! get one (see [`crate::placement`]), proposed as `PlaceGateway` commands.
//!
//! A draining owner that is alive keeps a gateway while the gateway's
//! agents still hold leases (dispatch gives them no new ones), so running
//! tasks finish where they run; at `runtime.drain_deadline` after the drain
//! began the gateway moves anyway and its unfinished tasks are leased again
//! on the new owner.

use std::time::Duration;

use super::Node;
use crate::clock;
use crate::fsm::{AgentId, Command, GatewayId, GatewayRecord, NodeRecord};
use crate::placement::reassignment;

/// How often the leader checks placement.
const PLACEMENT_INTERVAL: Duration = Duration::from_millis(500);

/// Runs on every node; acts only while this node is the leader.
pub(super) async fn placement_loop(node: Node) {
    let shutdown = node.shutdown_token().clone();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(PLACEMENT_INTERVAL) => {}
        }
        if !node.is_leader() {
            continue;
        }
        for (id, owner) in moves(&node) {
            match node
                .write(Command::PlaceGateway {
                    id: id.clone(),
                    owner,
                })
                .await
            {
                Ok(Ok(_)) => tracing::info!(gateway = %id, ?owner, "gateway placed"),
                Ok(Err(rejected)) => {
                    tracing::warn!(gateway = %id, error = %rejected, "placement rejected")
                }
                Err(e) => tracing::debug!(gateway = %id, error = %e, "placement not committed"),
            }
        }
    }
}

/// The gateways that must move now, and where.
fn moves(node: &Node) -> Vec<(GatewayId, Option<u64>)> {
    let dead_after = node.queue_config().node_dead_after.as_millis() as u64;
    let deadline = node.config().runtime.drain_deadline.as_millis() as u64;
    let now = clock::now_ms();
    let loads = node.agent_loads();
    let load = |a: &AgentId| loads.get(a).copied().unwrap_or(0);
    node.state().read(|s| {
        let reg = s.registry();
        let nodes: Vec<NodeRecord> = reg.nodes().cloned().collect();
        reg.gateways()
            .filter(|g| !held_by_draining_owner(s, g, &nodes, (now, dead_after, deadline), &load))
            .filter_map(|g| {
                reassignment(g, &nodes, now, dead_after).map(|to| (g.reg.id.clone(), to))
            })
            .collect()
    })
}

/// Whether `g`'s owner is draining but alive, its agents still hold
/// leases, and the drain deadline has not passed: the gateway stays.
fn held_by_draining_owner(
    s: &crate::fsm::State,
    g: &GatewayRecord,
    nodes: &[NodeRecord],
    (now, dead_after, deadline): (u64, u64, u64),
    load: &impl Fn(&AgentId) -> u32,
) -> bool {
    let Some(owner) = g.owner.and_then(|o| nodes.iter().find(|n| n.id == o)) else {
        return false;
    };
    let alive = now.saturating_sub(owner.last_heartbeat_ms) <= dead_after;
    let within = owner
        .draining_since_ms
        .is_some_and(|since| now < since.saturating_add(deadline));
    owner.draining && alive && within && s.gateway_leases_in(&g.reg.id, load) > 0
}
