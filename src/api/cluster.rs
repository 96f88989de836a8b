//! Cluster and health endpoints.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::Api;
use super::auth::Caller;
use super::error::{ApiError, ApiResult};
use super::json::Body;
use crate::fsm::AuditTarget;
use crate::node::{GroupStatus, MemberStatus};
use crate::raft::{NodeId, NodeInfo};

/// `GET /cluster` answer: this node's view of the cluster.
#[derive(Serialize, ToSchema)]
pub struct ClusterView {
    #[schema(value_type = u64)]
    node_id: NodeId,
    region: String,
    /// Its Raft state: `leader`, `follower`, `candidate`, `learner`, `shutdown`.
    state: String,
    #[schema(value_type = Option<u64>)]
    leader: Option<NodeId>,
    term: u64,
    last_log_index: Option<u64>,
    applied_index: Option<u64>,
    snapshot_index: Option<u64>,
    /// On the leader: since a quorum last acknowledged it.
    millis_since_quorum_ack: Option<u64>,
    members: Vec<MemberStatus>,
    /// The queue shards and their leaders: one entry, shard 0, when the
    /// meta group is the one shard (`cluster.shards = 1`); else shards
    /// `1..=N`, each its own Raft group.
    shards: Vec<ShardLeader>,
    /// The queue-shard count the cluster records (0: not recorded yet).
    shard_count: u32,
    /// The shards each routing epoch routes new tasks over, oldest first:
    /// the last is the current epoch's (it trails `shard_count` while
    /// added shards are made ready; `docs/shards.md`).
    routes: Vec<u32>,
    /// The queue shards whose keeper actor (their timers) runs on this
    /// node: the ones it leads, once its runtime has caught up.
    keepers: Vec<u32>,
    /// Every Raft group this node hosts, the meta group (0) first, as this
    /// node sees it.
    groups: Vec<GroupStatus>,
}

/// A shard, its leader and where its voters go.
#[derive(Serialize, ToSchema)]
pub struct ShardLeader {
    shard: u32,
    #[schema(value_type = Option<u64>)]
    leader: Option<NodeId>,
    /// Its placement: its own (`PUT /shards/{id}/placement`), else the
    /// cluster's `shard_placement`.
    placement: String,
    /// Its home region, when placed `regional` in one.
    home: Option<String>,
}

/// `GET /cluster`: this node's view of the cluster.
#[utoipa::path(
    get,
    path = "/cluster",
    responses((status = 200, description = "This node's view", body = ClusterView))
)]
pub async fn status(State(api): State<Api>) -> Json<ClusterView> {
    let m = api.node.raft().metrics().borrow().clone();
    Json(ClusterView {
        node_id: api.node.id(),
        region: api.node.info().region.clone(),
        state: format!("{:?}", m.state).to_lowercase(),
        leader: m.current_leader,
        term: m.current_term,
        last_log_index: m.last_log_index,
        applied_index: m.last_applied.map(|l| l.index),
        snapshot_index: m.snapshot.map(|l| l.index),
        millis_since_quorum_ack: m.millis_since_quorum_ack,
        members: api.node.member_statuses(),
        shards: shard_leaders(&api.node),
        shard_count: api.node.state().read(|s| s.shard_count()),
        routes: api.node.state().read(|s| s.routes().to_vec()),
        keepers: api.node.keepers().await,
        groups: api.node.groups().map(|g| g.status()).collect(),
    })
}

/// Each queue shard's leader as this node knows it.
fn shard_leaders(node: &crate::node::Node) -> Vec<ShardLeader> {
    let shards = node.shard_groups();
    if shards.is_empty() {
        return vec![ShardLeader {
            shard: 0,
            leader: node.leader().map(|(id, _)| id),
            placement: "every".into(),
            home: None,
        }];
    }
    shards
        .iter()
        .map(|g| {
            let rule = node.state().read(|s| s.shard_rule(g.id()));
            ShardLeader {
                shard: g.id(),
                leader: g.leader().map(|(id, _)| id),
                placement: rule.placement.to_string(),
                home: rule.home,
            }
        })
        .collect()
}

/// `POST /cluster/join` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinBody {
    #[schema(value_type = u64)]
    id: NodeId,
    raft_addr: String,
    api_addr: String,
    #[serde(default = "local")]
    region: String,
    /// The joining node's `cluster.shards`; refused when it differs from
    /// the cluster's.
    #[serde(default)]
    shards: Option<u32>,
}

fn local() -> String {
    "local".into()
}

/// `POST /cluster/join` answer.
#[derive(Serialize, ToSchema)]
pub struct JoinedView {
    #[schema(value_type = u64)]
    joined: NodeId,
}

/// `POST /cluster/join`: adds a node as a learner, then a voter.
#[utoipa::path(
    post,
    path = "/cluster/join",
    request_body = JoinBody,
    responses((status = 200, description = "The node is a voter", body = JoinedView))
)]
pub async fn join(
    State(api): State<Api>,
    caller: Caller,
    Body(b): Body<JoinBody>,
) -> ApiResult<Json<JoinedView>> {
    let info = NodeInfo {
        raft_addr: b.raft_addr,
        api_addr: b.api_addr,
        region: b.region,
    };
    let ours = match api.node.state().read(|s| s.shard_count()) {
        0 => api.node.config().cluster.shards,
        recorded => recorded,
    };
    let result = match b.shards {
        Some(theirs) if theirs != ours => Err(crate::node::NodeError::Invalid(format!(
            "node {} is configured with cluster.shards = {theirs} but this cluster has {ours} \
             queue shards: every node must say the same",
            b.id
        ))),
        _ => api.node.join(b.id, info).await,
    };
    api.record(&caller, Some(AuditTarget::Node(b.id)), result.is_ok())
        .await;
    result?;
    Ok(Json(JoinedView { joined: b.id }))
}

/// `POST /cluster/leave` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaveBody {
    #[schema(value_type = u64)]
    id: NodeId,
}

/// `POST /cluster/leave` answer.
#[derive(Serialize, ToSchema)]
pub struct LeftView {
    #[schema(value_type = u64)]
    removed: NodeId,
}

/// `POST /cluster/leave`: removes a node from the membership.
#[utoipa::path(
    post,
    path = "/cluster/leave",
    request_body = LeaveBody,
    responses((status = 200, description = "Removed from the membership", body = LeftView))
)]
pub async fn leave(
    State(api): State<Api>,
    caller: Caller,
    Body(b): Body<LeaveBody>,
) -> ApiResult<Json<LeftView>> {
    let result = api.node.leave(b.id).await;
    api.record(&caller, Some(AuditTarget::Node(b.id)), result.is_ok())
        .await;
    result?;
    Ok(Json(LeftView { removed: b.id }))
}

/// `POST /cluster/transfer-leader` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferBody {
    #[schema(value_type = u64)]
    to: NodeId,
}

/// `POST /cluster/transfer-leader` answer.
#[derive(Serialize, ToSchema)]
pub struct TransferredView {
    /// The new leader.
    #[schema(value_type = u64)]
    leader: NodeId,
}

/// `POST /cluster/transfer-leader`: hands leadership to a voter. Sent to a
/// follower, it is relayed to the leader's API and the leader's answer
/// (status and body) is passed back unchanged.
#[utoipa::path(
    post,
    path = "/cluster/transfer-leader",
    request_body = TransferBody,
    responses((status = 200, description = "Leadership moved", body = TransferredView))
)]
pub async fn transfer(
    State(api): State<Api>,
    caller: Caller,
    headers: HeaderMap,
    Body(b): Body<TransferBody>,
) -> ApiResult<Response> {
    if !api.node.is_leader() {
        let (_, leader) = api
            .node
            .leader()
            .ok_or_else(|| ApiError::unavailable("no leader known"))?;
        let peers = api.node.peer_api();
        let url = peers.url(&leader.api_addr, "/api/v1/cluster/transfer-leader");
        // The caller's own credential goes along: the leader checks it and
        // records the transfer itself.
        let mut req = peers.http().post(url);
        if let Some(auth) = headers.get(header::AUTHORIZATION) {
            req = req.header(header::AUTHORIZATION, auth.clone());
        }
        let resp = req
            .json(&json!({ "to": b.to }))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| ApiError::unavailable(format!("leader unreachable: {e}")))?;
        let status =
            StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        let body: Value = resp
            .json()
            .await
            .map_err(|e| ApiError::unavailable(format!("leader's answer: {e}")))?;
        return Ok((status, Json(body)).into_response());
    }
    let result = api.node.transfer_leadership(b.to).await;
    api.record(&caller, Some(AuditTarget::Node(b.to)), result.is_ok())
        .await;
    result?;
    Ok(Json(TransferredView { leader: b.to }).into_response())
}

/// A probe's answer.
#[derive(Serialize, ToSchema)]
pub struct ProbeView {
    /// `alive`, `ready` or `not_ready`.
    status: &'static str,
    /// Why not ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// `GET /health/live`: the process answers.
#[utoipa::path(
    get,
    path = "/health/live",
    responses((status = 200, description = "The process answers", body = ProbeView))
)]
pub async fn live() -> Json<ProbeView> {
    Json(ProbeView {
        status: "alive",
        reason: None,
    })
}

/// `GET /health/ready`: 200 only when this node is in a quorum.
#[utoipa::path(
    get,
    path = "/health/ready",
    responses(
        (status = 200, description = "In a quorum, not draining", body = ProbeView),
        (status = 503, description = "Draining, or no quorum", body = ProbeView),
    )
)]
pub async fn ready(State(api): State<Api>) -> (StatusCode, Json<ProbeView>) {
    let not_ready = |reason: String| {
        let body = ProbeView {
            status: "not_ready",
            reason: Some(reason),
        };
        (StatusCode::SERVICE_UNAVAILABLE, Json(body))
    };
    if api.node.is_draining() {
        return not_ready("draining".into());
    }
    match api.node.read_barrier().await {
        Ok(()) => (
            StatusCode::OK,
            Json(ProbeView {
                status: "ready",
                reason: None,
            }),
        ),
        Err(e) => not_ready(e.to_string()),
    }
}

/// `GET /health` answer.
#[derive(Serialize, ToSchema)]
pub struct DeepHealthView {
    /// `healthy` or `unhealthy`.
    status: &'static str,
    checks: DeepChecks,
    #[schema(format = DateTime)]
    timestamp: String,
}

/// The checks of `GET /health`.
#[derive(Serialize, ToSchema)]
pub struct DeepChecks {
    raft: Check,
    storage: Check,
}

/// One check.
#[derive(Serialize, ToSchema)]
pub struct Check {
    /// `ok`, or what failed (`no_quorum`, `failed`).
    status: &'static str,
    detail: Option<String>,
}

/// `GET /health`: quorum and storage.
#[utoipa::path(
    get,
    path = "/health",
    responses(
        (status = 200, description = "Healthy", body = DeepHealthView),
        (status = 503, description = "No quorum or storage failed", body = DeepHealthView),
    )
)]
pub async fn deep(State(api): State<Api>) -> (StatusCode, Json<DeepHealthView>) {
    let quorum = api.node.read_barrier().await;
    let m = api.node.raft().metrics().borrow().clone();
    let storage_ok = m.running_state.is_ok();
    let healthy = quorum.is_ok() && storage_ok;
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(DeepHealthView {
            status: if healthy { "healthy" } else { "unhealthy" },
            checks: DeepChecks {
                raft: Check {
                    status: if quorum.is_ok() { "ok" } else { "no_quorum" },
                    detail: quorum.err().map(|e| e.to_string()),
                },
                storage: Check {
                    status: if storage_ok { "ok" } else { "failed" },
                    detail: m.running_state.err().map(|e| e.to_string()),
                },
            },
            timestamp: crate::clock::rfc3339(crate::clock::now_ms()),
        }),
    )
}
