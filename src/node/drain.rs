//! Draining, on the node's side: a draining node reports not-ready, and a
//! draining leader hands leadership to a voter that is not draining.

use std::collections::BTreeSet;
use std::time::Duration;

use super::Node;
use crate::raft::NodeId;

/// How often a node checks whether it must give up leadership.
const DRAIN_CHECK_INTERVAL: Duration = Duration::from_millis(500);

impl Node {
    /// Whether the registry marks this node as draining.
    pub fn is_draining(&self) -> bool {
        let me = self.id();
        self.state()
            .read(|s| s.registry().nodes().any(|n| n.id == me && n.draining))
    }

    /// The voter best placed to take over: not draining, furthest replicated.
    fn successor(&self) -> Option<NodeId> {
        let m = self.raft().metrics().borrow().clone();
        let draining: BTreeSet<NodeId> = self.state().read(|s| {
            s.registry()
                .nodes()
                .filter(|n| n.draining)
                .map(|n| n.id)
                .collect()
        });
        let replication = m.replication.as_ref()?;
        m.membership_config
            .membership()
            .voter_ids()
            .filter(|v| *v != self.id() && !draining.contains(v))
            .max_by_key(|v| replication.get(v).cloned().flatten().map(|l| l.index))
    }
}

/// While this node is a draining leader, tries to hand leadership over.
pub(super) async fn drain_loop(node: Node) {
    let shutdown = node.shutdown_token().clone();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(DRAIN_CHECK_INTERVAL) => {}
        }
        if !(node.is_leader() && node.is_draining()) {
            continue;
        }
        let Some(to) = node.successor() else {
            tracing::warn!("draining leader has no voter to hand over to");
            continue;
        };
        match node.transfer_leadership(to).await {
            Ok(()) => tracing::info!(to, "draining: handed leadership over"),
            Err(e) => tracing::info!(to, error = %e, "draining: leadership handover not done yet"),
        }
    }
}
