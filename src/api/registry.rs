//! Registry endpoints: agents (register, list, get, status, deregister) and
//! the node registry.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::Api;
use super::auth::Caller;
use super::error::{ApiError, ApiResult};
use super::json::Body;
use crate::clock;
use crate::fsm::{
    AgentId, AgentRecord, AgentRegistration, AuditTarget, Command, GatewayId, GatewayRecord,
    State as Fsm, TaskStatus,
};
use crate::gateway::{DriverPolicy, GatewaySpec};

/// `POST /agents` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentBody {
    id: String,
    gateway: String,
    #[serde(default)]
    capabilities: Vec<String>,
    #[serde(default = "default_role")]
    role: String,
    #[serde(default = "one")]
    capacity: u32,
}

fn default_role() -> String {
    "worker".into()
}

fn one() -> u32 {
    1
}

fn agent_view(s: &Fsm, a: &AgentRecord) -> Value {
    let load = s.agent_load(&a.reg.id);
    json!({
        "id": a.reg.id.0,
        "gateway": a.reg.gateway.0,
        "capabilities": a.reg.capabilities,
        "role": a.reg.role,
        "capacity": a.reg.capacity,
        "current_load": load,
        "online_on": a.online_on,
        "status": match (load, a.online_on.is_some()) {
            (1.., _) => "busy",
            (0, true) => "idle",
            (0, false) => "offline",
        },
        "registered_at": clock::rfc3339(a.registered_at_ms),
    })
}

/// `POST /agents`: registers (or updates) an agent on a registered gateway.
pub async fn register(
    State(api): State<Api>,
    caller: Caller,
    Body(b): Body<AgentBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let target = Some(AuditTarget::text(format!("agent/{}", b.id)));
    let id = AgentId(b.id);
    let reg = AgentRegistration {
        id: id.clone(),
        gateway: GatewayId(b.gateway),
        capabilities: b.capabilities,
        role: b.role,
        capacity: b.capacity,
    };
    api.write_as(&caller, Command::RegisterAgent(reg), target)
        .await?;
    // The write may have been applied on the leader only so far.
    api.node.read_barrier().await?;
    let view = api
        .node
        .state()
        .read(|s| s.registry().agent(&id).map(|a| agent_view(s, a)));
    let view =
        view.ok_or_else(|| ApiError::not_found(format!("agent `{id}` was removed meanwhile")))?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// `GET /agents`.
pub async fn list(State(api): State<Api>) -> ApiResult<Json<Value>> {
    api.node.read_barrier().await?;
    let items: Vec<Value> = api
        .node
        .state()
        .read(|s| s.registry().agents().map(|a| agent_view(s, a)).collect());
    Ok(Json(json!({ "items": items })))
}

/// `GET /agents/{id}`.
pub async fn get(State(api): State<Api>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    api.node.read_barrier().await?;
    let id = AgentId(id);
    let view = api
        .node
        .state()
        .read(|s| s.registry().agent(&id).map(|a| agent_view(s, a)));
    view.map(Json)
        .ok_or_else(|| ApiError::not_found(format!("agent `{id}` is not registered")))
}

/// `GET /agents/{id}/status`: load, capacity and the queue it draws from.
pub async fn status(State(api): State<Api>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    api.node.read_barrier().await?;
    let id = AgentId(id);
    let view = api.node.state().read(|s| {
        s.registry().agent(&id).map(|a| {
            let pending = s.depth().count(None, TaskStatus::Pending, None);
            json!({ "agent": agent_view(s, a), "active_tasks": s.agent_load(&id), "queue_depth": pending })
        })
    });
    view.map(Json)
        .ok_or_else(|| ApiError::not_found(format!("agent `{id}` is not registered")))
}

/// `DELETE /agents/{id}`: its live leases run on until they end or lapse.
pub async fn deregister(
    State(api): State<Api>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let cmd = Command::DeregisterAgent {
        id: AgentId(id.clone()),
    };
    api.write_as(&caller, cmd, Some(AuditTarget::text(format!("agent/{id}"))))
        .await?;
    Ok(Json(json!({ "removed": id })))
}

/// `GET /nodes`: the node registry, with heartbeat ages.
pub async fn nodes(State(api): State<Api>) -> ApiResult<Json<Value>> {
    api.node.read_barrier().await?;
    let now = clock::now_ms();
    let items: Vec<Value> = api.node.state().read(|s| {
        s.registry()
            .nodes()
            .map(|n| {
                json!({
                    "id": n.id,
                    "region": n.region,
                    "api_addr": n.api_addr,
                    "draining": n.draining,
                    "last_heartbeat": clock::rfc3339(n.last_heartbeat_ms),
                    "heartbeat_age_ms": now.saturating_sub(n.last_heartbeat_ms),
                })
            })
            .collect()
    });
    Ok(Json(json!({ "items": items })))
}

fn gateway_view(g: &GatewayRecord) -> Value {
    json!({
        "id": g.reg.id.0,
        "kind": g.reg.kind,
        "region": g.reg.region,
        "capabilities": g.reg.capabilities,
        "max_sessions": g.reg.max_sessions,
        "spec": serde_json::from_str::<Value>(&g.reg.spec).unwrap_or(Value::Null),
        "health": g.health,
        "circuit": g.circuit,
        "owner": g.owner,
        "registered_at": clock::rfc3339(g.registered_at_ms),
        "updated_at": clock::rfc3339(g.updated_at_ms),
    })
}

/// `POST /gateways`: registers (or updates) a gateway described by a
/// [`GatewaySpec`] (validated here, every problem named). Secrets appear in
/// the spec only as references (an environment variable or a file).
pub async fn register_gateway(
    State(api): State<Api>,
    caller: Caller,
    Body(spec): Body<GatewaySpec>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let id = spec.id.clone();
    let target = Some(AuditTarget::text(format!("gateway/{id}")));
    // Checked against this node's policy too: a spec it would not run is
    // refused here, every problem named, before it reaches the log.
    let mut problems = match spec.validate() {
        Err(crate::gateway::DriverError::InvalidSpec(p)) => p,
        Err(e) => vec![e.to_string()],
        Ok(()) => Vec::new(),
    };
    problems.extend(DriverPolicy::from_config(api.node.config()).problems(&spec));
    if !problems.is_empty() {
        // Refused before a command exists: recorded as a rejected call.
        api.record_rejected(&caller, target, "invalid_request")
            .await;
        let e = crate::gateway::DriverError::InvalidSpec(problems);
        return Err(ApiError::invalid(e.to_string()));
    }
    let reg = spec.to_registration();
    api.write_as(&caller, Command::RegisterGateway(reg), target)
        .await?;
    // The write may have been applied on the leader only so far.
    api.node.read_barrier().await?;
    let view = api
        .node
        .state()
        .read(|s| s.registry().gateway(&id).map(gateway_view));
    let view =
        view.ok_or_else(|| ApiError::not_found(format!("gateway `{id}` was removed meanwhile")))?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// `GET /gateways`.
pub async fn list_gateways(State(api): State<Api>) -> ApiResult<Json<Value>> {
    api.node.read_barrier().await?;
    let items: Vec<Value> = api
        .node
        .state()
        .read(|s| s.registry().gateways().map(gateway_view).collect());
    Ok(Json(json!({ "items": items })))
}

/// `GET /gateways/{id}`.
pub async fn get_gateway(State(api): State<Api>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    api.node.read_barrier().await?;
    let id = GatewayId(id);
    let view = api
        .node
        .state()
        .read(|s| s.registry().gateway(&id).map(gateway_view));
    view.map(Json)
        .ok_or_else(|| ApiError::not_found(format!("gateway `{id}` is not registered")))
}

/// `DELETE /gateways/{id}`: refused while agents are bound to it.
pub async fn deregister_gateway(
    State(api): State<Api>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let cmd = Command::DeregisterGateway {
        id: GatewayId(id.clone()),
    };
    api.write_as(
        &caller,
        cmd,
        Some(AuditTarget::text(format!("gateway/{id}"))),
    )
    .await?;
    Ok(Json(json!({ "removed": id })))
}
