//! Placement: which node runs each gateway's actors.
//!
//! Rendezvous (highest-random-weight) hashing over the nodes that are live
//! (heartbeat newer than a bound) and not draining, restricted to the
//! gateway's region when that region has such a node. Rendezvous hashing
//! means a node's loss moves only the gateways it owned, each to the node
//! that scores next. The leader computes placement and proposes it
//! (`Command::PlaceGateway`), so every node agrees on the owner.
//!
//! Shortcut taken on purpose: a gateway whose owner is live and not draining
//! stays where it is even when a new node would now score higher (no
//! rebalancing on join: moving a gateway interrupts its sessions).

use crate::fsm::{GatewayRecord, NodeRecord};
use crate::raft::NodeId;

/// FNV-1a, 64 bits: a small hash that is the same on every build, so a new
/// leader computes the placement its predecessor did.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// Whether a node can own gateways at `now_ms`.
pub fn is_eligible(n: &NodeRecord, now_ms: u64, dead_after_ms: u64) -> bool {
    !n.draining && now_ms.saturating_sub(n.last_heartbeat_ms) <= dead_after_ms
}

/// The node that should own `g`, among `nodes`.
pub fn choose_owner(
    g: &GatewayRecord,
    nodes: &[NodeRecord],
    now_ms: u64,
    dead_after_ms: u64,
) -> Option<NodeId> {
    let eligible: Vec<&NodeRecord> = nodes
        .iter()
        .filter(|n| is_eligible(n, now_ms, dead_after_ms))
        .collect();
    let in_region: Vec<&NodeRecord> = eligible
        .iter()
        .copied()
        .filter(|n| n.region == g.reg.region)
        .collect();
    let pool = if in_region.is_empty() {
        eligible
    } else {
        in_region
    };
    pool.into_iter()
        .max_by_key(|n| (fnv1a(&[g.reg.id.0.as_bytes(), &n.id.to_le_bytes()]), n.id))
        .map(|n| n.id)
}

/// The new owner for `g` if it must move: it has none, or its owner is gone,
/// dead or draining. `Some(None)` means no node can take it now.
pub fn reassignment(
    g: &GatewayRecord,
    nodes: &[NodeRecord],
    now_ms: u64,
    dead_after_ms: u64,
) -> Option<Option<NodeId>> {
    let owner_ok = g
        .owner
        .and_then(|o| nodes.iter().find(|n| n.id == o))
        .is_some_and(|n| is_eligible(n, now_ms, dead_after_ms));
    if owner_ok {
        return None;
    }
    let next = choose_owner(g, nodes, now_ms, dead_after_ms);
    (next != g.owner).then_some(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::{Circuit, GatewayId, GatewayRegistration, Health};

    fn node(id: NodeId, region: &str, hb: u64) -> NodeRecord {
        NodeRecord {
            id,
            region: region.into(),
            api_addr: format!("127.0.0.1:{}", 7000 + id),
            draining: false,
            last_heartbeat_ms: hb,
            registered_at_ms: 0,
            draining_since_ms: None,
        }
    }

    fn gw(id: &str, region: &str, owner: Option<NodeId>) -> GatewayRecord {
        GatewayRecord {
            reg: GatewayRegistration {
                id: GatewayId(id.into()),
                region: region.into(),
                ..Default::default()
            },
            health: Health::Unknown,
            circuit: Circuit::Closed,
            owner,
            placement_token: 0,
            registered_at_ms: 0,
            updated_at_ms: 0,
            unhealthy_since_ms: None,
            managed: None,
        }
    }

    #[test]
    fn prefers_region_then_any_live_node() {
        let nodes = vec![
            node(1, "eu", 1000),
            node(2, "us", 1000),
            node(3, "us", 1000),
        ];
        for i in 0..20 {
            let owner = choose_owner(&gw(&format!("g{i}"), "us", None), &nodes, 1000, 500);
            assert!(matches!(owner, Some(2 | 3)), "us gateway went to {owner:?}");
            assert!(choose_owner(&gw(&format!("g{i}"), "ap", None), &nodes, 1000, 500).is_some());
        }
        // No us node live: falls back to eu.
        let stale = vec![node(1, "eu", 1000), node(2, "us", 0), node(3, "us", 0)];
        assert_eq!(
            choose_owner(&gw("g", "us", None), &stale, 1000, 500),
            Some(1)
        );
    }

    #[test]
    fn a_lost_node_moves_only_its_own_gateways() {
        let nodes: Vec<NodeRecord> = (1..=4).map(|i| node(i, "eu", 1000)).collect();
        let gws: Vec<GatewayRecord> = (0..200)
            .map(|i| {
                gw(
                    &format!("g{i}"),
                    "eu",
                    choose_owner(&gw(&format!("g{i}"), "eu", None), &nodes, 1000, 500),
                )
            })
            .collect();
        let spread: std::collections::BTreeSet<_> = gws.iter().map(|g| g.owner).collect();
        assert_eq!(spread.len(), 4, "200 gateways should land on all 4 nodes");
        let mut after = nodes.clone();
        after[1].last_heartbeat_ms = 0; // node 2 stops heartbeating
        for g in &gws {
            match reassignment(g, &after, 1000, 500) {
                None => assert_ne!(g.owner, Some(2), "{} stayed on the dead node", g.reg.id),
                Some(next) => {
                    assert_eq!(
                        g.owner,
                        Some(2),
                        "{} moved although its owner lives",
                        g.reg.id
                    );
                    assert!(matches!(next, Some(1 | 3 | 4)));
                }
            }
        }
    }

    #[test]
    fn draining_owner_hands_over_and_unplaced_gateways_get_one() {
        let mut nodes = vec![node(1, "eu", 1000), node(2, "eu", 1000)];
        let g = gw("g", "eu", Some(1));
        assert_eq!(reassignment(&g, &nodes, 1000, 500), None);
        nodes[0].draining = true;
        assert_eq!(reassignment(&g, &nodes, 1000, 500), Some(Some(2)));
        assert!(reassignment(&gw("new", "eu", None), &nodes, 1000, 500).is_some());
        nodes[1].draining = true;
        assert_eq!(
            reassignment(&g, &nodes, 1000, 500),
            Some(None),
            "nowhere to go"
        );
    }
}
