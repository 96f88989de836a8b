//! Reads over every group that holds tasks (`Node::queue_groups`): an
//! agent's leases and load, a gateway's leases. With one shard that is the
//! meta group alone; with several, each shard's replica holds the leases
//! of the tasks routed to it, and the registry (which agent belongs to
//! which gateway) stays in the meta group.

use std::collections::HashMap;

use super::Node;
use crate::fsm::{AgentId, FencingToken, GatewayId, TaskId};

impl Node {
    /// `agent`'s live leases on this node's replicas of every queue group.
    pub fn agent_leases(&self, agent: &AgentId) -> Vec<(FencingToken, TaskId)> {
        self.queue_groups()
            .iter()
            .flat_map(|g| g.state().read(|s| s.agent_leases(agent)))
            .collect()
    }

    /// Every agent's live leases over the queue groups' replicas, counted.
    pub fn agent_loads(&self) -> HashMap<AgentId, u32> {
        let mut loads: HashMap<AgentId, u32> = HashMap::new();
        for g in self.queue_groups() {
            g.state().read(|s| {
                for (agent, n) in s.agent_loads() {
                    *loads.entry(agent.clone()).or_default() += n;
                }
            });
        }
        loads
    }

    /// Live leases of `gateway`'s agents over the queue groups' replicas.
    pub fn gateway_leases(&self, gateway: &GatewayId) -> u32 {
        let loads = self.agent_loads();
        self.state()
            .read(|s| s.gateway_leases_in(gateway, |a| loads.get(a).copied().unwrap_or(0)))
    }
}
