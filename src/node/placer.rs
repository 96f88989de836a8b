//! The leader's placement loop: gateways without a live, non-draining owner
//! get one (see [`crate::placement`]), proposed as `PlaceGateway` commands.

use std::time::Duration;

use super::Node;
use crate::clock;
use crate::fsm::{Command, GatewayId, NodeRecord};
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
    let now = clock::now_ms();
    node.state().read(|s| {
        let nodes: Vec<NodeRecord> = s.registry().nodes().cloned().collect();
        s.registry()
            .gateways()
            .filter_map(|g| {
                reassignment(g, &nodes, now, dead_after).map(|to| (g.reg.id.clone(), to))
            })
            .collect()
    })
}
