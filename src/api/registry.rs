//! Registry endpoints: agents (register, list, get, status, deregister) and
//! the node registry.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::Api;
use super::auth::Caller;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::json::Body;
use crate::clock;
use crate::fsm::{
    AgentId, AgentRecord, AuditTarget, Command, GatewayId, GatewayRecord, TaskStatus,
};
use crate::gateway::{DriverPolicy, GatewaySpec};

/// `POST /agents` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentBody {
    /// The agent's name.
    #[schema(schema_with = super::view::name_schema)]
    id: String,
    /// A registered gateway.
    gateway: String,
    /// What it can run.
    #[serde(default)]
    #[schema(schema_with = super::view::names_schema)]
    capabilities: Vec<String>,
    /// Default `worker`: a built-in role (`coordinator`, `worker`,
    /// `reviewer`, `monitor`) or one of the config's `[roles]`; its
    /// capabilities join the agent's, its tools and prompt are copied in.
    #[serde(default = "default_role")]
    #[schema(schema_with = super::view::name_schema)]
    role: String,
    /// Tasks at once, 1 to 1000 (default 1).
    #[serde(default = "one")]
    #[schema(minimum = 1, maximum = 1000)]
    capacity: u32,
}

fn default_role() -> String {
    "worker".into()
}

fn one() -> u32 {
    1
}

/// An agent as the API shows it.
#[derive(Serialize, ToSchema)]
#[schema(as = Agent)]
pub struct AgentView {
    id: String,
    gateway: String,
    capabilities: Vec<String>,
    role: String,
    /// The tools it may call, from its role (`null`: any).
    tools: Option<Vec<String>>,
    /// Given to the model ahead of each task's message, from its role.
    prompt: Option<String>,
    capacity: u32,
    current_load: u32,
    /// The node running its actor, while online.
    online_on: Option<u64>,
    status: AgentStatus,
    /// Its own circuit breaker: `open` after attempts kept failing on it
    /// (no work until it cools down), `half_open` (one trial task at a
    /// time), `closed`.
    circuit: crate::fsm::Circuit,
    /// Since when its actor has been silent (no heartbeat): it takes no
    /// work until heard again. `null` when heard.
    #[schema(format = DateTime)]
    silent_since: Option<String>,
    #[schema(format = DateTime)]
    registered_at: String,
}

/// Busy (has leases), idle (online, none) or offline.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    /// Holds at least one lease.
    Busy,
    /// Online, holds none.
    Idle,
    /// No node runs it.
    Offline,
}

/// An agent as the API shows it; `loads` are the live leases per agent over
/// every queue group ([`Node::agent_loads`](crate::node::Node::agent_loads)).
fn agent_view(a: &AgentRecord, loads: &HashMap<AgentId, u32>) -> AgentView {
    let load = loads.get(&a.reg.id).copied().unwrap_or(0);
    AgentView {
        id: a.reg.id.0.clone(),
        gateway: a.reg.gateway.0.clone(),
        capabilities: a.reg.capabilities.clone(),
        role: a.reg.role.clone(),
        tools: a.reg.tools.clone(),
        prompt: a.reg.prompt.clone(),
        capacity: a.reg.capacity,
        current_load: load,
        online_on: a.online_on,
        status: match (load, a.online_on.is_some()) {
            (1.., _) => AgentStatus::Busy,
            (0, true) => AgentStatus::Idle,
            (0, false) => AgentStatus::Offline,
        },
        circuit: a.circuit,
        silent_since: a.silent_since_ms.map(clock::rfc3339),
        registered_at: clock::rfc3339(a.registered_at_ms),
    }
}

/// Every agent's live leases over the queue groups, read after a barrier
/// on every group (the meta group's too: the callers then read the
/// registry, so one round of barriers serves both reads).
async fn loads(api: &Api) -> ApiResult<HashMap<AgentId, u32>> {
    api.node.read_barrier_all().await?;
    Ok(api.node.agent_loads())
}

/// A list of agents.
#[derive(Serialize, ToSchema)]
pub struct AgentsView {
    items: Vec<AgentView>,
}

/// `GET /agents/{id}/status` answer.
#[derive(Serialize, ToSchema)]
pub struct AgentStatusView {
    agent: AgentView,
    active_tasks: u32,
    /// Pending tasks in the queue it draws from.
    queue_depth: u64,
}

/// What a deregistration removed.
#[derive(Serialize, ToSchema)]
pub struct RemovedView {
    /// The id removed.
    removed: String,
}

/// `POST /agents`: registers (or updates) an agent on a registered gateway.
#[utoipa::path(
    post,
    path = "/agents",
    request_body = AgentBody,
    responses(
        (status = 201, description = "Registered (or updated)", body = AgentView),
        (status = 404, description = "No such gateway, or no such role (`GET /roles`)", body = ErrorBody),
    )
)]
pub async fn register(
    State(api): State<Api>,
    caller: Caller,
    Body(b): Body<AgentBody>,
) -> ApiResult<(StatusCode, Json<AgentView>)> {
    let target = Some(AuditTarget::text(format!("agent/{}", b.id)));
    let id = AgentId(b.id);
    crate::fsm::check_name("role", &b.role, false)
        .map_err(|(f, p)| ApiError::invalid(format!("invalid field `{f}`: {p}")))?;
    let roles = crate::roles::all(&api.node.config().roles);
    let reg = crate::roles::registration(
        id.clone(),
        GatewayId(b.gateway),
        b.capabilities,
        &b.role,
        b.capacity,
        &roles,
    )
    .map_err(ApiError::not_found)?;
    api.write_as(&caller, Command::RegisterAgent(reg), target)
        .await?;
    // The write may have been applied on the leader only so far.
    let loads = loads(&api).await?;
    let view = api
        .node
        .state()
        .read(|s| s.registry().agent(&id).map(|a| agent_view(a, &loads)));
    let view =
        view.ok_or_else(|| ApiError::not_found(format!("agent `{id}` was removed meanwhile")))?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// `GET /agents`.
#[utoipa::path(
    get,
    path = "/agents",
    responses((status = 200, description = "Every agent", body = AgentsView))
)]
pub async fn list(State(api): State<Api>) -> ApiResult<Json<AgentsView>> {
    let loads = loads(&api).await?;
    let items = api.node.state().read(|s| {
        s.registry()
            .agents()
            .map(|a| agent_view(a, &loads))
            .collect()
    });
    Ok(Json(AgentsView { items }))
}

/// `GET /agents/{id}`.
#[utoipa::path(
    get,
    path = "/agents/{id}",
    params(("id" = String, Path, description = "Agent id")),
    responses(
        (status = 200, description = "The agent", body = AgentView),
        (status = 404, description = "Not registered", body = ErrorBody),
    )
)]
pub async fn get(State(api): State<Api>, Path(id): Path<String>) -> ApiResult<Json<AgentView>> {
    let loads = loads(&api).await?;
    let id = AgentId(id);
    let view = api
        .node
        .state()
        .read(|s| s.registry().agent(&id).map(|a| agent_view(a, &loads)));
    view.map(Json)
        .ok_or_else(|| ApiError::not_found(format!("agent `{id}` is not registered")))
}

/// `GET /agents/{id}/status`: load, capacity and the queue it draws from.
#[utoipa::path(
    get,
    path = "/agents/{id}/status",
    params(("id" = String, Path, description = "Agent id")),
    responses(
        (status = 200, description = "The agent's load", body = AgentStatusView),
        (status = 404, description = "Not registered", body = ErrorBody),
    )
)]
pub async fn status(
    State(api): State<Api>,
    Path(id): Path<String>,
) -> ApiResult<Json<AgentStatusView>> {
    let loads = loads(&api).await?;
    // Read under the barriers `loads` made.
    let pending: u64 = api
        .node
        .queue_groups()
        .iter()
        .map(|g| {
            g.state()
                .read(|s| s.depth().count(None, TaskStatus::Pending, None))
        })
        .sum();
    let id = AgentId(id);
    let view = api.node.state().read(|s| {
        s.registry().agent(&id).map(|a| AgentStatusView {
            agent: agent_view(a, &loads),
            active_tasks: loads.get(&id).copied().unwrap_or(0),
            queue_depth: pending,
        })
    });
    view.map(Json)
        .ok_or_else(|| ApiError::not_found(format!("agent `{id}` is not registered")))
}

/// `DELETE /agents/{id}`: its live leases are given back (no attempt
/// spent) and its sessions end. With queue shards the meta group
/// deregisters it, then each shard lets it go (`ReleaseAgent`); a shard
/// that cannot take the write now keeps the leases until they lapse and
/// the sessions until they idle out (logged).
#[utoipa::path(
    delete,
    path = "/agents/{id}",
    params(("id" = String, Path, description = "Agent id")),
    responses((status = 200, description = "Deregistered", body = RemovedView))
)]
pub async fn deregister(
    State(api): State<Api>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<RemovedView>> {
    let cmd = Command::DeregisterAgent {
        id: AgentId(id.clone()),
    };
    api.write_as(&caller, cmd, Some(AuditTarget::text(format!("agent/{id}"))))
        .await?;
    api.node.fresh_routes().await?;
    for group in api
        .node
        .shard_groups()
        .iter()
        .take(api.node.queue_groups().len())
    {
        let cmd = Command::ReleaseAgent {
            agent: AgentId(id.clone()),
        };
        let target = Some(AuditTarget::text(format!("agent/{id}")));
        if let Err(e) = api.write_in(group, &caller, cmd, target).await {
            tracing::warn!(
                agent = %id,
                group = group.id(),
                error = ?e,
                "deregistered agent's leases and sessions in this shard not given back: they lapse"
            );
        }
    }
    Ok(Json(RemovedView { removed: id }))
}

/// A node of the registry as the API shows it.
#[derive(Serialize, ToSchema)]
#[schema(as = Node)]
pub struct NodeView {
    id: u64,
    region: String,
    api_addr: String,
    draining: bool,
    #[schema(format = DateTime)]
    last_heartbeat: String,
    heartbeat_age_ms: u64,
}

/// `GET /nodes` answer.
#[derive(Serialize, ToSchema)]
pub struct NodesView {
    items: Vec<NodeView>,
}

/// `GET /nodes`: the node registry, with heartbeat ages.
#[utoipa::path(
    get,
    path = "/nodes",
    responses((status = 200, description = "Every registered node", body = NodesView))
)]
pub async fn nodes(State(api): State<Api>) -> ApiResult<Json<NodesView>> {
    api.node.read_barrier().await?;
    let now = clock::now_ms();
    let items = api.node.state().read(|s| {
        s.registry()
            .nodes()
            .map(|n| NodeView {
                id: n.id,
                region: n.region.clone(),
                api_addr: n.api_addr.clone(),
                draining: n.draining,
                last_heartbeat: clock::rfc3339(n.last_heartbeat_ms),
                heartbeat_age_ms: now.saturating_sub(n.last_heartbeat_ms),
            })
            .collect()
    });
    Ok(Json(NodesView { items }))
}

/// A gateway as the API shows it.
#[derive(Serialize, ToSchema)]
#[schema(as = Gateway)]
pub struct GatewayView {
    id: String,
    /// Driver kind.
    kind: String,
    region: String,
    capabilities: Vec<String>,
    max_sessions: u32,
    /// The spec it was registered with (`GatewaySpec`).
    #[schema(value_type = Object)]
    spec: Value,
    health: crate::fsm::Health,
    circuit: crate::fsm::Circuit,
    /// The node that runs it.
    owner: Option<u64>,
    /// Its fencing token: raised each time it is placed on a node, and
    /// sent with every call to it along with the owner.
    placement_token: u64,
    #[schema(format = DateTime)]
    registered_at: String,
    #[schema(format = DateTime)]
    updated_at: String,
    /// Its live sessions now (over every queue shard), of `max_sessions`.
    live_sessions: u32,
    /// Leases its agents hold now.
    active_tasks: u32,
    /// The model its agents run, as declared.
    model: Option<String>,
    /// When Godel runs its process (`managed` in its spec): where that
    /// process is, as its owner reports it. `null`: not managed.
    process: Option<ProcessView>,
}

/// A managed gateway's process.
#[derive(Serialize, ToSchema)]
pub struct ProcessView {
    /// `starting` (up, not answering yet), `running`, `backoff` (exited,
    /// started again after a pause) or `failed` (exited too often in a row:
    /// not started again until the gateway is placed again). While it is
    /// not `running`, the gateway takes no work and its tasks wait.
    state: crate::fsm::ManagedState,
    /// Its process id on the owner, while it runs.
    pid: Option<u32>,
    /// Starts again since it was placed on its owner.
    restarts: u32,
    /// How its last run ended.
    last_exit: Option<String>,
}

/// A gateway's live load: sessions and its agents' leases.
#[derive(Default)]
struct GatewayLoad {
    sessions: u32,
    active: u32,
}

/// Every gateway's live load, read after barriers on every group.
async fn gateway_loads(api: &Api) -> ApiResult<HashMap<GatewayId, GatewayLoad>> {
    let agent_loads = loads(api).await?;
    let mut out: HashMap<GatewayId, GatewayLoad> = HashMap::new();
    api.node.state().read(|s| {
        for a in s.registry().agents() {
            let load = agent_loads.get(&a.reg.id).copied().unwrap_or(0);
            out.entry(a.reg.gateway.clone()).or_default().active += load;
        }
        for g in s.registry().gateways() {
            out.entry(g.reg.id.clone()).or_default();
        }
    });
    for group in api.node.queue_groups() {
        group.state().read(|s| {
            for (id, l) in out.iter_mut() {
                l.sessions += s.sessions().live_on(id);
            }
        });
    }
    Ok(out)
}

/// `GET /gateways` answer.
#[derive(Serialize, ToSchema)]
pub struct GatewaysView {
    items: Vec<GatewayView>,
}

fn gateway_view(g: &GatewayRecord, loads: &HashMap<GatewayId, GatewayLoad>) -> GatewayView {
    let load = loads.get(&g.reg.id);
    GatewayView {
        live_sessions: load.map_or(0, |l| l.sessions),
        active_tasks: load.map_or(0, |l| l.active),
        id: g.reg.id.0.clone(),
        kind: g.reg.kind.clone(),
        region: g.reg.region.clone(),
        capabilities: g.reg.capabilities.clone(),
        max_sessions: g.reg.max_sessions,
        spec: serde_json::from_str::<Value>(&g.reg.spec).unwrap_or(Value::Null),
        health: g.health,
        circuit: g.circuit,
        owner: g.owner,
        placement_token: g.placement_token,
        registered_at: clock::rfc3339(g.registered_at_ms),
        updated_at: clock::rfc3339(g.updated_at_ms),
        model: g.reg.model.clone(),
        process: g.managed.as_ref().map(|m| ProcessView {
            state: m.state,
            pid: m.pid,
            restarts: m.restarts,
            last_exit: m.last_exit.clone(),
        }),
    }
}

/// `POST /gateways`: registers (or updates) a gateway described by a
/// [`GatewaySpec`] (validated here, every problem named). Secrets appear in
/// the spec only as references (an environment variable or a file).
#[utoipa::path(
    post,
    path = "/gateways",
    request_body = GatewaySpec,
    responses((status = 201, description = "Registered (or updated)", body = GatewayView))
)]
pub async fn register_gateway(
    State(api): State<Api>,
    caller: Caller,
    Body(spec): Body<GatewaySpec>,
) -> ApiResult<(StatusCode, Json<GatewayView>)> {
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
    let loads = gateway_loads(&api).await?;
    let view = api
        .node
        .state()
        .read(|s| s.registry().gateway(&id).map(|g| gateway_view(g, &loads)));
    let view =
        view.ok_or_else(|| ApiError::not_found(format!("gateway `{id}` was removed meanwhile")))?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// `GET /gateways`.
#[utoipa::path(
    get,
    path = "/gateways",
    responses((status = 200, description = "Every gateway", body = GatewaysView))
)]
pub async fn list_gateways(State(api): State<Api>) -> ApiResult<Json<GatewaysView>> {
    let loads = gateway_loads(&api).await?;
    let items = api.node.state().read(|s| {
        s.registry()
            .gateways()
            .map(|g| gateway_view(g, &loads))
            .collect()
    });
    Ok(Json(GatewaysView { items }))
}

/// `GET /gateways/{id}`.
#[utoipa::path(
    get,
    path = "/gateways/{id}",
    params(("id" = String, Path, description = "Gateway id")),
    responses(
        (status = 200, description = "The gateway", body = GatewayView),
        (status = 404, description = "Not registered", body = ErrorBody),
    )
)]
pub async fn get_gateway(
    State(api): State<Api>,
    Path(id): Path<String>,
) -> ApiResult<Json<GatewayView>> {
    let loads = gateway_loads(&api).await?;
    let id = GatewayId(id);
    let view = api
        .node
        .state()
        .read(|s| s.registry().gateway(&id).map(|g| gateway_view(g, &loads)));
    view.map(Json)
        .ok_or_else(|| ApiError::not_found(format!("gateway `{id}` is not registered")))
}

/// `DELETE /gateways/{id}`: refused while agents are bound to it.
#[utoipa::path(
    delete,
    path = "/gateways/{id}",
    params(("id" = String, Path, description = "Gateway id")),
    responses((status = 200, description = "Deregistered", body = RemovedView))
)]
pub async fn deregister_gateway(
    State(api): State<Api>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<RemovedView>> {
    let cmd = Command::DeregisterGateway {
        id: GatewayId(id.clone()),
    };
    api.write_as(
        &caller,
        cmd,
        Some(AuditTarget::text(format!("gateway/{id}"))),
    )
    .await?;
    Ok(Json(RemovedView { removed: id }))
}

/// A role as `GET /roles` shows it.
#[derive(Serialize, ToSchema)]
pub struct RoleView {
    /// Its name (what an agent's `role` and a task's `agent_role` say).
    name: String,
    /// Whether it is built in (`false`: from this node's `[roles]`, which
    /// may also replace a built-in one).
    builtin: bool,
    /// What it is for.
    description: String,
    /// Capabilities every agent of the role has.
    capabilities: Vec<String>,
    /// The tools its agents may call (`null`: any).
    tools: Option<Vec<String>>,
    /// Given to the model ahead of each task's message.
    prompt: Option<String>,
}

/// `GET /roles` answer.
#[derive(Serialize, ToSchema)]
pub struct RolesView {
    items: Vec<RoleView>,
}

/// `GET /roles`: the roles an agent registered through this node may have:
/// the built-in ones and the config's `[roles]`, with the capabilities,
/// tools and prompt each gives its agents.
#[utoipa::path(
    get,
    path = "/roles",
    responses((status = 200, description = "The roles", body = RolesView))
)]
pub async fn roles(State(api): State<Api>) -> Json<RolesView> {
    let configured = &api.node.config().roles;
    let items = crate::roles::all(configured)
        .into_iter()
        .map(|(name, spec)| RoleView {
            builtin: !configured.contains_key(&name),
            name,
            description: spec.description,
            capabilities: spec.capabilities,
            tools: spec.tools,
            prompt: spec.prompt,
        })
        .collect();
    Json(RolesView { items })
}
