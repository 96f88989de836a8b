//! Cluster and health endpoints.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::Api;
use super::auth::Caller;
use super::error::{ApiError, ApiResult};
use super::json::Body;
use crate::fsm::AuditTarget;
use crate::raft::{NodeId, NodeInfo};

/// `GET /cluster`: this node's view of the cluster.
pub async fn status(State(api): State<Api>) -> Json<Value> {
    let m = api.node.raft().metrics().borrow().clone();
    Json(json!({
        "node_id": api.node.id(),
        "region": api.node.info().region,
        "state": format!("{:?}", m.state).to_lowercase(),
        "leader": m.current_leader,
        "term": m.current_term,
        "last_log_index": m.last_log_index,
        "applied_index": m.last_applied.map(|l| l.index),
        "snapshot_index": m.snapshot.map(|l| l.index),
        "millis_since_quorum_ack": m.millis_since_quorum_ack,
        "members": api.node.member_statuses(),
        "shards": [{ "shard": 0, "leader": m.current_leader }],
    }))
}

/// `POST /cluster/join` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinBody {
    id: NodeId,
    raft_addr: String,
    api_addr: String,
    #[serde(default = "local")]
    region: String,
}

fn local() -> String {
    "local".into()
}

/// `POST /cluster/join`: adds a node as a learner, then a voter.
pub async fn join(
    State(api): State<Api>,
    caller: Caller,
    Body(b): Body<JoinBody>,
) -> ApiResult<Json<Value>> {
    let info = NodeInfo {
        raft_addr: b.raft_addr,
        api_addr: b.api_addr,
        region: b.region,
    };
    let result = api.node.join(b.id, info).await;
    api.record(&caller, Some(AuditTarget::Node(b.id)), result.is_ok())
        .await;
    result?;
    Ok(Json(json!({ "joined": b.id })))
}

/// `POST /cluster/leave` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaveBody {
    id: NodeId,
}

/// `POST /cluster/leave`: removes a node from the membership.
pub async fn leave(
    State(api): State<Api>,
    caller: Caller,
    Body(b): Body<LeaveBody>,
) -> ApiResult<Json<Value>> {
    let result = api.node.leave(b.id).await;
    api.record(&caller, Some(AuditTarget::Node(b.id)), result.is_ok())
        .await;
    result?;
    Ok(Json(json!({ "removed": b.id })))
}

/// `POST /cluster/transfer-leader` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferBody {
    to: NodeId,
}

/// `POST /cluster/transfer-leader`: hands leadership to a voter. Sent to a
/// follower, it is relayed to the leader's API and the leader's answer
/// (status and body) is passed back unchanged.
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
    Ok(Json(json!({ "leader": b.to })).into_response())
}

/// `GET /health/live`: the process answers.
pub async fn live() -> Json<Value> {
    Json(json!({ "status": "alive" }))
}

/// `GET /health/ready`: 200 only when this node is in a quorum.
pub async fn ready(State(api): State<Api>) -> (StatusCode, Json<Value>) {
    if api.node.is_draining() {
        let body = json!({ "status": "not_ready", "reason": "draining" });
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body));
    }
    match api.node.read_barrier().await {
        Ok(()) => (StatusCode::OK, Json(json!({ "status": "ready" }))),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not_ready", "reason": e.to_string() })),
        ),
    }
}

/// `GET /health`: quorum and storage.
pub async fn deep(State(api): State<Api>) -> (StatusCode, Json<Value>) {
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
        Json(json!({
            "status": if healthy { "healthy" } else { "unhealthy" },
            "checks": {
                "raft": { "status": if quorum.is_ok() { "ok" } else { "no_quorum" }, "detail": quorum.err().map(|e| e.to_string()) },
                "storage": { "status": if storage_ok { "ok" } else { "failed" }, "detail": m.running_state.err().map(|e| e.to_string()) },
            },
            "timestamp": crate::clock::rfc3339(crate::clock::now_ms()),
        })),
    )
}
