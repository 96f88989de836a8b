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
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::Api;
use super::auth::Caller;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::json::Body;
use crate::fsm::{AuditTarget, Command, State as Fsm};
use crate::raft::NodeId;

/// `POST /admin/nodes/{id}/drain` body.
#[derive(Debug, Default, Deserialize, ToSchema)]
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

/// A node's drain as the API shows it.
#[derive(Serialize, ToSchema)]
pub struct DrainView {
    #[schema(value_type = u64)]
    node: NodeId,
    draining: bool,
    is_leader: bool,
    /// Gateways it still runs.
    gateways_owned: usize,
    /// Live leases on those gateways.
    leases_held: u32,
    /// Leader time the drain began, ms since the epoch.
    draining_since_ms: Option<u64>,
    /// When its gateways are handed over regardless, ms since the epoch.
    handover_deadline_ms: Option<u64>,
    /// Draining, owns no gateway and does not lead.
    done: bool,
}

/// `POST /admin/nodes/{id}/drain`.
#[utoipa::path(
    post,
    path = "/admin/nodes/{id}/drain",
    params(("id" = u64, Path, description = "Node id")),
    request_body(content = Option<DrainBody>, description = "Optional"),
    responses(
        (status = 200, description = "The drain's progress", body = DrainView),
        (status = 409, description = "It would empty a region or leave too few voters (repeat with `force`)", body = ErrorBody),
    )
)]
pub async fn drain(
    State(api): State<Api>,
    caller: Caller,
    Path(id): Path<String>,
    Body(b): Body<DrainBody>,
) -> ApiResult<Json<DrainView>> {
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
#[utoipa::path(
    post,
    path = "/admin/agents/{id}/crash",
    params(("id" = String, Path, description = "Agent id")),
    responses(
        (status = 202, description = "The crash was sent to the agent's actor", body = CrashView),
        (status = 403, description = "Fault injection is off on this node, or the role lacks the permission", body = ErrorBody),
        (status = 404, description = "The agent has no actor on this node", body = ErrorBody),
    )
)]
pub async fn crash_agent(
    State(api): State<Api>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<CrashView>)> {
    let agent = send_fault(&api, &caller, id, crate::actors::AgentMsg::Crash).await?;
    tracing::warn!(%agent, "agent actor crash requested (fault injection)");
    Ok((
        StatusCode::ACCEPTED,
        Json(CrashView {
            agent: agent.0,
            node: api.node.id(),
            crashed: true,
        }),
    ))
}

/// Sends fault `msg` to agent `id`'s actor on this node, audited: 403 when
/// fault injection is off here, 404 when this node runs no such actor.
async fn send_fault(
    api: &Api,
    caller: &Caller,
    id: String,
    msg: crate::actors::AgentMsg,
) -> ApiResult<crate::fsm::AgentId> {
    fault_injection_on(api)?;
    api.record(caller, Some(AuditTarget::text(format!("agent/{id}"))), true)
        .await;
    let agent = crate::fsm::AgentId(id);
    let actor = api.node.agent_directory().get(&agent).ok_or_else(|| {
        ApiError::not_found(format!(
            "agent `{agent}` has no actor on node {}; call the node that owns its gateway",
            api.node.id()
        ))
    })?;
    actor
        .send_message(msg)
        .map_err(|e| ApiError::unavailable(format!("agent actor is stopping: {e}")))?;
    Ok(agent)
}

/// `POST /admin/agents/{id}/stall` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StallBody {
    /// How long the actor hangs, in ms (1 to 600000).
    #[schema(minimum = 1, maximum = 600_000)]
    ms: u64,
}

/// `POST /admin/agents/{id}/stall`: makes the agent's actor on this node
/// hang in a handler for `ms`, as one stuck on a call would: it neither
/// beats nor renews, so the node reports it silent after
/// `runtime.agent_silent_after` and dispatch passes it by until it is
/// heard again (drills and tests; only with `runtime.fault_injection =
/// true`). Call the node that runs it.
#[utoipa::path(
    post,
    path = "/admin/agents/{id}/stall",
    params(("id" = String, Path, description = "Agent id")),
    request_body = StallBody,
    responses(
        (status = 202, description = "The stall was sent to the agent's actor", body = CrashView),
        (status = 400, description = "`ms` out of range", body = ErrorBody),
        (status = 403, description = "Fault injection is off on this node, or the role lacks the permission", body = ErrorBody),
        (status = 404, description = "The agent has no actor on this node", body = ErrorBody),
    )
)]
pub async fn stall_agent(
    State(api): State<Api>,
    caller: Caller,
    Path(id): Path<String>,
    Body(b): Body<StallBody>,
) -> ApiResult<(StatusCode, Json<CrashView>)> {
    fault_injection_on(&api)?;
    if !(1..=600_000).contains(&b.ms) {
        return Err(ApiError::invalid("invalid field `ms`: must be 1..=600000"));
    }
    let stall = crate::actors::AgentMsg::Stall(std::time::Duration::from_millis(b.ms));
    let agent = send_fault(&api, &caller, id, stall).await?;
    tracing::warn!(%agent, ms = b.ms, "agent actor stall requested (fault injection)");
    Ok((
        StatusCode::ACCEPTED,
        Json(CrashView {
            agent: agent.0,
            node: api.node.id(),
            crashed: false,
        }),
    ))
}

/// `POST /admin/agents/{id}/crash` answer.
#[derive(Serialize, ToSchema)]
pub struct CrashView {
    agent: String,
    #[schema(value_type = u64)]
    node: NodeId,
    crashed: bool,
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
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PartitionBody {
    /// Node ids; replaces the set blocked before (empty: heal).
    #[schema(value_type = Vec<u64>)]
    peers: Vec<NodeId>,
}

/// The faults this node injects.
#[derive(Serialize, ToSchema)]
pub struct FaultsView {
    #[schema(value_type = u64)]
    node: NodeId,
    /// Peers its transport is cut off from.
    #[schema(value_type = Vec<u64>)]
    blocked: Vec<NodeId>,
}

fn faults_view(api: &Api) -> FaultsView {
    FaultsView {
        node: api.node.id(),
        blocked: api.node.faults().blocked(),
    }
}

/// `GET /admin/faults`: the peers this node's transport is cut off from.
#[utoipa::path(
    get,
    path = "/admin/faults",
    responses(
        (status = 200, description = "The faults set", body = FaultsView),
        (status = 403, description = "Fault injection is off on this node, or the role lacks the permission", body = ErrorBody),
    )
)]
pub async fn faults(State(api): State<Api>) -> ApiResult<Json<FaultsView>> {
    fault_injection_on(&api)?;
    Ok(Json(faults_view(&api)))
}

/// `POST /admin/faults/partition`: cuts this node's transport off from
/// `peers` (drills; only with `runtime.fault_injection = true`). One side
/// only: a full partition blocks each side on the other's nodes.
#[utoipa::path(
    post,
    path = "/admin/faults/partition",
    request_body = PartitionBody,
    responses(
        (status = 200, description = "The faults now set", body = FaultsView),
        (status = 403, description = "Fault injection is off on this node, or the role lacks the permission", body = ErrorBody),
    )
)]
pub async fn partition(
    State(api): State<Api>,
    caller: Caller,
    Body(b): Body<PartitionBody>,
) -> ApiResult<Json<FaultsView>> {
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
#[utoipa::path(
    post,
    path = "/admin/faults/heal",
    responses(
        (status = 200, description = "No peer blocked", body = FaultsView),
        (status = 403, description = "Fault injection is off on this node, or the role lacks the permission", body = ErrorBody),
    )
)]
pub async fn heal(State(api): State<Api>, caller: Caller) -> ApiResult<Json<FaultsView>> {
    fault_injection_on(&api)?;
    api.node.faults().heal();
    api.record(&caller, Some(AuditTarget::Node(api.node.id())), true)
        .await;
    tracing::warn!("transport partition healed (fault injection)");
    Ok(Json(faults_view(&api)))
}

/// `POST /admin/nodes/{id}/undrain`.
#[utoipa::path(
    post,
    path = "/admin/nodes/{id}/undrain",
    params(("id" = u64, Path, description = "Node id")),
    responses((status = 200, description = "The node, no longer draining", body = DrainView))
)]
pub async fn undrain(
    State(api): State<Api>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<DrainView>> {
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
#[utoipa::path(
    get,
    path = "/admin/nodes/{id}/drain",
    params(("id" = u64, Path, description = "Node id")),
    responses(
        (status = 200, description = "The drain's progress", body = DrainView),
        (status = 404, description = "Not registered", body = ErrorBody),
    )
)]
pub async fn progress(
    State(api): State<Api>,
    Path(id): Path<String>,
) -> ApiResult<Json<DrainView>> {
    let id = parse_node(&id)?;
    api.node.read_barrier().await?;
    status_of(&api, id).await.map(Json)
}

async fn status_of(api: &Api, id: NodeId) -> ApiResult<DrainView> {
    let leader = api.node.leader().map(|(l, _)| l);
    api.node.read_barrier_queue().await?;
    let loads = api.node.agent_loads();
    let load = |a: &crate::fsm::AgentId| loads.get(a).copied().unwrap_or(0);
    let view = api.node.state().read(|s| {
        let reg = s.registry();
        reg.nodes().find(|n| n.id == id).map(|n| {
            let owned: Vec<_> = reg.gateways().filter(|g| g.owner == Some(id)).collect();
            let leases: u32 = owned
                .iter()
                .map(|g| s.gateway_leases_in(&g.reg.id, load))
                .sum();
            let deadline = api.node.config().runtime.drain_deadline.as_millis() as u64;
            DrainView {
                node: id,
                draining: n.draining,
                is_leader: leader == Some(id),
                gateways_owned: owned.len(),
                leases_held: leases,
                draining_since_ms: n.draining_since_ms,
                handover_deadline_ms: n.draining_since_ms.map(|t| t + deadline),
                done: n.draining && owned.is_empty() && leader != Some(id),
            }
        })
    });
    view.ok_or_else(|| ApiError::not_found(format!("node {id} is not registered")))
}
