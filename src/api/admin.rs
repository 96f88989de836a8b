//! Admin endpoints: draining a node, and fault injection for drills.
//!
//! Draining marks a node in the replicated registry. A draining node reports
//! not-ready, and a draining leader hands leadership to another voter. Two
//! drains are refused unless forced, because an operator draining before a
//! shutdown would otherwise lose something: the last non-draining node of a
//! region (the region would lose its workers), and a node whose drain leaves
//! fewer non-draining voters than a majority (shutting the draining nodes
//! down would then stop the cluster).

use std::collections::BTreeSet;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::Api;
use super::auth::Caller;
use super::error::{ApiError, ApiResult};
use super::json::Body;
use crate::fsm::{AuditTarget, Command, State as Fsm};
use crate::raft::NodeId;

/// `POST /admin/nodes/{id}/drain` body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainBody {
    /// Drain even if it empties a region or leaves too few voters.
    #[serde(default)]
    force: bool,
}

fn parse_node(s: &str) -> ApiResult<NodeId> {
    s.parse()
        .map_err(|_| ApiError::invalid(format!("invalid field `id`: `{s}` is not a node id")))
}

/// Why draining `id` would hurt, if it would.
fn drain_hazard(s: &Fsm, voters: &[NodeId], id: NodeId) -> Option<String> {
    let reg = s.registry();
    let me = reg.nodes().find(|n| n.id == id)?;
    let region_left = reg
        .nodes()
        .filter(|n| n.region == me.region && n.id != id && !n.draining)
        .count();
    if region_left == 0 {
        return Some(format!(
            "node {id} is the last non-draining node of region `{}`",
            me.region
        ));
    }
    let draining: BTreeSet<NodeId> = reg
        .nodes()
        .filter(|n| n.draining)
        .map(|n| n.id)
        .chain([id])
        .collect();
    let remaining = voters.iter().filter(|v| !draining.contains(v)).count();
    let majority = voters.len() / 2 + 1;
    if voters.contains(&id) && remaining < majority {
        return Some(format!(
            "draining node {id} leaves {remaining} of {} voters not draining; a majority is {majority}",
            voters.len()
        ));
    }
    None
}

/// `POST /admin/nodes/{id}/drain`.
pub async fn drain(
    State(api): State<Api>,
    caller: Caller,
    Path(id): Path<String>,
    Body(b): Body<DrainBody>,
) -> ApiResult<Json<Value>> {
    let id = parse_node(&id)?;
    api.node.read_barrier().await?;
    let (voters, _) = api.node.members();
    let (known, hazard) = api.node.state().read(|s| {
        (
            s.registry().nodes().any(|n| n.id == id),
            drain_hazard(s, &voters, id),
        )
    });
    if !known {
        return Err(ApiError::not_found(format!("node {id} is not registered")));
    }
    if let Some(why) = hazard.filter(|_| !b.force) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("{why}; repeat with {{\"force\": true}} to drain anyway"),
        ));
    }
    let cmd = Command::SetDrain { id, draining: true };
    api.write_as(&caller, cmd, Some(AuditTarget::Node(id)))
        .await?;
    api.node.read_barrier().await?;
    status_of(&api, id).await.map(Json)
}

/// `POST /admin/agents/{id}/crash`: makes the agent's actor on this node
/// fail as a panic would, so its supervisor restarts it (drills and tests;
/// only with `runtime.fault_injection = true`). Call the node that runs it.
pub async fn crash_agent(
    State(api): State<Api>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let node = &api.node;
    fault_injection_on(&api)?;
    api.record(
        &caller,
        Some(AuditTarget::text(format!("agent/{id}"))),
        true,
    )
    .await;
    let agent = crate::fsm::AgentId(id);
    let actor = node.agent_directory().get(&agent).ok_or_else(|| {
        ApiError::not_found(format!(
            "agent `{agent}` has no actor on node {}; call the node that owns its gateway",
            node.id()
        ))
    })?;
    actor
        .send_message(crate::actors::AgentMsg::Crash)
        .map_err(|e| ApiError::unavailable(format!("agent actor is stopping: {e}")))?;
    tracing::warn!(%agent, "agent actor crash requested (fault injection)");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "agent": agent.0, "node": node.id(), "crashed": true })),
    ))
}

/// Fails with 403 unless `runtime.fault_injection = true` on this node.
fn fault_injection_on(api: &Api) -> ApiResult<()> {
    if api.node.config().runtime.fault_injection {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "fault injection is off on this node (set runtime.fault_injection = true)",
        ))
    }
}

/// `POST /admin/faults/partition` body: the peers to cut this node off from.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionBody {
    /// Node ids; replaces the set blocked before (empty: heal).
    peers: Vec<NodeId>,
}

fn faults_view(api: &Api) -> Value {
    json!({ "node": api.node.id(), "blocked": api.node.faults().blocked() })
}

/// `GET /admin/faults`: the peers this node's transport is cut off from.
pub async fn faults(State(api): State<Api>) -> ApiResult<Json<Value>> {
    fault_injection_on(&api)?;
    Ok(Json(faults_view(&api)))
}

/// `POST /admin/faults/partition`: cuts this node's transport off from
/// `peers` (drills; only with `runtime.fault_injection = true`). One side
/// only: a full partition blocks each side on the other's nodes.
pub async fn partition(
    State(api): State<Api>,
    caller: Caller,
    Body(b): Body<PartitionBody>,
) -> ApiResult<Json<Value>> {
    fault_injection_on(&api)?;
    if b.peers.contains(&api.node.id()) {
        return Err(ApiError::invalid(format!(
            "invalid field `peers`: node {} cannot block itself",
            api.node.id()
        )));
    }
    // Recorded before the cut: after it, this node may not reach a quorum.
    let target = AuditTarget::text(format!("node/{} peers={:?}", api.node.id(), b.peers));
    api.record(&caller, Some(target), true).await;
    api.node.faults().set(b.peers);
    tracing::warn!(blocked = ?api.node.faults().blocked(), "transport partition set (fault injection)");
    Ok(Json(faults_view(&api)))
}

/// `POST /admin/faults/heal`: unblocks every peer.
pub async fn heal(State(api): State<Api>, caller: Caller) -> ApiResult<Json<Value>> {
    fault_injection_on(&api)?;
    api.node.faults().heal();
    api.record(&caller, Some(AuditTarget::Node(api.node.id())), true)
        .await;
    tracing::warn!("transport partition healed (fault injection)");
    Ok(Json(faults_view(&api)))
}

/// `POST /admin/nodes/{id}/undrain`.
pub async fn undrain(
    State(api): State<Api>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let id = parse_node(&id)?;
    let cmd = Command::SetDrain {
        id,
        draining: false,
    };
    api.write_as(&caller, cmd, Some(AuditTarget::Node(id)))
        .await?;
    api.node.read_barrier().await?;
    status_of(&api, id).await.map(Json)
}

/// `GET /admin/nodes/{id}/drain`: the drain's progress.
pub async fn progress(State(api): State<Api>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let id = parse_node(&id)?;
    api.node.read_barrier().await?;
    status_of(&api, id).await.map(Json)
}

async fn status_of(api: &Api, id: NodeId) -> ApiResult<Value> {
    let leader = api.node.leader().map(|(l, _)| l);
    let view = api.node.state().read(|s| {
        let reg = s.registry();
        reg.nodes().find(|n| n.id == id).map(|n| {
            let owned: Vec<_> = reg.gateways().filter(|g| g.owner == Some(id)).collect();
            let leases: u32 = owned.iter().map(|g| s.gateway_leases(&g.reg.id)).sum();
            let deadline = api.node.config().runtime.drain_deadline.as_millis() as u64;
            json!({
                "node": id,
                "draining": n.draining,
                "is_leader": leader == Some(id),
                "gateways_owned": owned.len(),
                "leases_held": leases,
                "draining_since_ms": n.draining_since_ms,
                "handover_deadline_ms": n.draining_since_ms.map(|t| t + deadline),
                "done": n.draining && owned.is_empty() && leader != Some(id),
            })
        })
    });
    view.ok_or_else(|| ApiError::not_found(format!("node {id} is not registered")))
}
