//! Task endpoints: submit, list, get, cancel, retry.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::Api;
use super::auth::Caller;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::json::{Body, Params};
use super::view::{self, ListQuery, PageView, TaskView};
use crate::clock;
use crate::fsm::{
    AuditTarget, Backoff, Command, DependencyFailure, Limits, Priority, Rejection, Reply,
    SessionKey, SubmitTask, TaskFilter, TaskId, TaskPage, TaskRegion, Tenant,
};
use crate::trace::TraceContext;

/// `POST /tasks` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskCreate {
    /// Defaults to the credential's tenant; naming another needs an admin
    /// or operator credential.
    #[serde(default)]
    #[schema(schema_with = view::opt_name_schema)]
    pub tenant: Option<String>,
    priority: Option<Priority>,
    /// Any JSON object, up to 256 KiB as JSON text.
    #[schema(value_type = Object)]
    payload: Value,
    /// What the agent must offer (names: `A-Z a-z 0-9 . _ : / -`).
    #[serde(default)]
    #[schema(schema_with = view::names_schema)]
    capabilities: Vec<String>,
    /// Tasks with the same key run in the same gateway session (1 to 256
    /// bytes, no control characters).
    #[schema(schema_with = view::opt_text_schema)]
    session_key: Option<String>,
    /// Not before this time (RFC 3339).
    #[schema(format = DateTime)]
    scheduled_at: Option<String>,
    #[schema(minimum = 1, maximum = 100)]
    max_attempts: Option<u32>,
    /// Per attempt, in ms.
    #[schema(minimum = 100, maximum = 604_800_000)]
    timeout_ms: Option<u64>,
    backoff: Option<Backoff>,
    /// A second submission with the same key returns the first task (1 to
    /// 256 bytes, no control characters).
    #[schema(schema_with = view::opt_text_schema)]
    idempotency_key: Option<String>,
    /// An existing task (one that does not exist is refused with 400).
    parent_id: Option<u64>,
    /// The region it should run in: its agent's gateway's region. Agents
    /// elsewhere take it only when none there could take it now.
    #[serde(default)]
    #[schema(schema_with = view::opt_name_schema)]
    region: Option<String>,
    /// With `region`: it must run there, and waits (saying why) while no
    /// agent there can run it. Never sent elsewhere.
    #[serde(default)]
    region_required: bool,
    /// Tasks of the same tenant, submitted before, that must complete
    /// before this one runs (at most 64, none twice). It waits (status
    /// `waiting`) until they have. One that does not exist, is cancelled,
    /// or (with the `cancel` policy) is dead-lettered is refused with 400.
    /// With several queue shards they must be in one shard: this task goes
    /// to theirs.
    #[serde(default)]
    #[schema(max_items = 64)]
    depends_on: Vec<u64>,
    /// What a dependency that is dead-lettered or cancelled later does to
    /// this task: `cancel` (the default) cancels it, naming the dependency;
    /// `block` keeps it waiting, with the reason shown, until the
    /// dependency is replayed and completes or an operator cancels it.
    /// Only with `depends_on`.
    on_dependency_failure: Option<DependencyFailure>,
    /// Only agents of this role take it (an agent's `role` counts as the
    /// capability `role:<role>`; the task lists that capability).
    #[schema(schema_with = view::opt_name_schema)]
    agent_role: Option<String>,
    /// It waits (status `awaiting_approval`) until an operator or admin
    /// approves it (`POST /tasks/{id}/approve`) or rejects it (cancelled).
    #[serde(default)]
    requires_approval: bool,
    /// With `requires_approval`: how long the request may wait undecided
    /// before it lapses and the task is cancelled, in ms (1 s to 30 days);
    /// without: for good.
    #[schema(minimum = 1000, maximum = 2_592_000_000_u64)]
    approval_expires_in_ms: Option<u64>,
}

impl TaskCreate {
    /// Validates and converts into the state machine's submission for
    /// `tenant` (resolved from the credential).
    pub fn into_submit(self, tenant: Tenant) -> ApiResult<SubmitTask> {
        if !self.payload.is_object() {
            return Err(ApiError::invalid(
                "invalid field `payload`: must be a JSON object",
            ));
        }
        let payload = self.payload.to_string();
        if payload.len() > Limits::MAX_PAYLOAD_BYTES {
            return Err(ApiError::too_large(format!(
                "`payload` is {} bytes; the limit is {}",
                payload.len(),
                Limits::MAX_PAYLOAD_BYTES
            )));
        }
        let scheduled_at_ms = self
            .scheduled_at
            .as_deref()
            .map(clock::parse_rfc3339)
            .transpose()
            .map_err(|e| ApiError::invalid(format!("invalid field `scheduled_at`: {e}")))?;
        if self.region_required && self.region.is_none() {
            return Err(ApiError::invalid(
                "invalid field `region_required`: needs `region`",
            ));
        }
        let mut capabilities = self.capabilities;
        if let Some(role) = self.agent_role {
            crate::fsm::check_name("agent_role", &role, false)
                .map_err(|(f, p)| ApiError::invalid(format!("invalid field `{f}`: {p}")))?;
            capabilities.push(format!("role:{role}"));
        }
        let spec = SubmitTask {
            tenant,
            priority: self.priority,
            payload,
            capabilities,
            session_key: self.session_key.map(SessionKey),
            scheduled_at_ms,
            max_attempts: self.max_attempts,
            timeout_ms: self.timeout_ms,
            backoff: self.backoff,
            idempotency_key: self.idempotency_key,
            parent_id: self.parent_id.map(TaskId),
            trace: None,
            region: self.region.map(|name| TaskRegion {
                name,
                required: self.region_required,
            }),
            depends_on: self.depends_on.into_iter().map(TaskId).collect(),
            on_dependency_failure: self.on_dependency_failure,
            requires_approval: self.requires_approval,
            approval_expires_in_ms: self.approval_expires_in_ms,
        };
        spec.validate().map_err(|(field, problem)| {
            ApiError::invalid(format!("invalid field `{field}`: {problem}"))
        })?;
        Ok(spec)
    }
}

static TRACEPARENT: axum::http::HeaderName = axum::http::HeaderName::from_static("traceparent");

/// The request's W3C trace context: its `traceparent` header; `None` when
/// it has none or a malformed one (which the spec says to ignore), and the
/// task then gets a trace derived from its id ([`crate::fsm::Task::trace`]).
pub struct Traceparent(pub Option<TraceContext>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Traceparent {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        let sent = parts
            .headers
            .get(&TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(TraceContext::parse);
        Ok(Traceparent(sent))
    }
}

/// `POST /tasks`: 201 with the new task, or 200 with the earlier one when the
/// idempotency key matched.
#[utoipa::path(
    post,
    path = "/tasks",
    request_body = TaskCreate,
    params(("traceparent" = Option<String>, Header, description = "W3C trace context the task carries (ignored when malformed)")),
    responses(
        (status = 201, description = "Submitted", body = TaskView),
        (status = 200, description = "An earlier task with the same idempotency key", body = TaskView),
        (status = 429, description = "Over a rate limit or quota, shed under load by priority (code `shed`), or the tenant's budget is used up (code `budget`: `Retry-After` is the time to the limit's reset)", body = super::error::ErrorBody),
    )
)]
pub async fn create(
    State(api): State<Api>,
    caller: Caller,
    Traceparent(trace): Traceparent,
    Body(mut body): Body<TaskCreate>,
) -> ApiResult<(StatusCode, Json<TaskView>)> {
    let tenant = caller.tenant_named(body.tenant.take())?;
    let mut spec = body.into_submit(tenant)?;
    spec.trace = trace;
    admit(&api, &spec, 0).await?;
    if api.node.shard_groups().len() > 1 {
        check_quota(&api, &spec.tenant, 0).await?;
    }
    match submit(&api, &caller, spec).await? {
        Reply::Submitted { task, created } => {
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok((status, Json(TaskView::of(&api.node, task))))
        }
        other => Err(super::unexpected(other)),
    }
}

/// `POST /tasks:batch` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskBatch {
    /// 1 to 1,000 tasks, each as `POST /tasks` takes one. A task that is
    /// not valid as `POST /tasks` would check it (its shape or a field's
    /// value) refuses the whole batch (400, naming it); one refused for
    /// what the cluster holds (a missing parent or dependency, a quota, a
    /// shed priority, a budget) fails alone in `items`.
    #[schema(min_items = 1, max_items = 1000)]
    tasks: Vec<TaskCreate>,
}

/// One task's result in a batch.
#[derive(Serialize, ToSchema)]
pub struct BatchItem {
    /// As `POST /tasks` would have answered it: 201 submitted, 200 an
    /// earlier task with the same idempotency key, else the error's.
    status: u16,
    /// The task (201 and 200).
    #[serde(skip_serializing_if = "Option::is_none")]
    task: Option<TaskView>,
    /// Why it was refused (any other status); nothing was submitted for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ItemError>,
}

/// A refused item's error, as an error body's `error`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ItemError {
    /// Stable machine-readable code.
    #[schema(example = "invalid_request", pattern = "^[a-z_]+$")]
    code: &'static str,
    /// Human-readable message.
    message: String,
    /// Whether sending the task again may succeed (with its idempotency
    /// key, a resent batch is safe).
    retryable: bool,
}

/// `POST /tasks:batch` answer.
#[derive(Serialize, ToSchema)]
pub struct BatchView {
    /// One per task sent, in the same order.
    items: Vec<BatchItem>,
    /// Items submitted now (201).
    created: u32,
    /// Items answered with an earlier task of the same idempotency key (200).
    existing: u32,
    /// Items refused.
    failed: u32,
}

impl BatchItem {
    /// An item that took effect, with its task.
    pub(super) fn task(
        node: &crate::node::Node,
        status: u16,
        task: std::sync::Arc<crate::fsm::Task>,
    ) -> BatchItem {
        BatchItem {
            status,
            task: Some(TaskView::of(node, task)),
            error: None,
        }
    }

    /// An item refused with `e`.
    pub(super) fn error(e: ApiError) -> BatchItem {
        BatchItem {
            status: e.status.as_u16(),
            task: None,
            error: Some(ItemError {
                code: e.code,
                message: e.message,
                retryable: e.retryable,
            }),
        }
    }
}

impl BatchView {
    fn of(node: &crate::node::Node, results: Vec<ApiResult<Reply>>) -> ApiResult<BatchView> {
        let mut view = BatchView {
            items: Vec::with_capacity(results.len()),
            created: 0,
            existing: 0,
            failed: 0,
        };
        for r in results {
            let item = match r {
                Ok(Reply::Submitted {
                    task,
                    created: true,
                }) => {
                    view.created += 1;
                    BatchItem::task(node, StatusCode::CREATED.as_u16(), task)
                }
                Ok(Reply::Submitted { task, .. }) => {
                    view.existing += 1;
                    BatchItem::task(node, StatusCode::OK.as_u16(), task)
                }
                Ok(other) => return Err(super::unexpected(other)),
                Err(e) => {
                    view.failed += 1;
                    BatchItem::error(e)
                }
            };
            view.items.push(item);
        }
        Ok(view)
    }
}

/// `POST /tasks:batch`: up to 1,000 tasks in one request and, with one
/// queue group, one Raft entry; a result per task, in order. Safe to send
/// again with idempotency keys: tasks already created are answered with
/// status 200 and the earlier task.
#[utoipa::path(
    post,
    path = "/tasks:batch",
    request_body = TaskBatch,
    params(("traceparent" = Option<String>, Header, description = "W3C trace context every task of the batch carries (ignored when malformed)")),
    responses(
        (status = 200, description = "A result per task, in order (some may have failed)", body = BatchView),
        (status = 400, description = "Not a batch of 1 to 1,000 valid tasks (the message names the first bad one); nothing was submitted", body = super::error::ErrorBody),
        (status = 429, description = "The write queue has no room for the batch (nothing was submitted), or over a rate limit", body = super::error::ErrorBody),
    )
)]
pub async fn create_batch(
    State(api): State<Api>,
    caller: Caller,
    Traceparent(trace): Traceparent,
    Body(body): Body<TaskBatch>,
) -> ApiResult<Json<BatchView>> {
    let n = body.tasks.len();
    let most = super::MAX_BATCH_ITEMS;
    if !(1..=most).contains(&n) {
        return Err(ApiError::invalid(format!(
            "invalid field `tasks`: {n} tasks; a batch holds 1 to {most}"
        )));
    }
    // Naming a tenant the credential may not is the request's fault, not
    // an item's: refused whole (and audited), before anything is written.
    let mut tasks = Vec::with_capacity(n);
    for mut t in body.tasks {
        let tenant = caller.tenant_named(t.tenant.take())?;
        tasks.push((tenant, t));
    }
    // Every task valid before any is admitted: a bad one is the request's
    // fault, refused whole and naming it.
    let mut valid = Vec::with_capacity(n);
    for (i, (tenant, t)) in tasks.into_iter().enumerate() {
        let mut spec = t.into_submit(tenant).map_err(|mut e| {
            e.message = format!("tasks[{i}]: {}", e.message);
            e
        })?;
        spec.trace = trace;
        valid.push(spec);
    }
    let mut results: Vec<Option<ApiResult<Reply>>> = Vec::with_capacity(n);
    let mut specs = Vec::with_capacity(n);
    let sharded = api.node.shard_groups().len() > 1;
    // Tasks of this batch admitted so far, in all and per tenant: load the
    // limits must count before any of them is written.
    let mut per_tenant: std::collections::BTreeMap<Tenant, u64> = Default::default();
    for spec in valid {
        let ahead = specs.len() as u64;
        let checked = async {
            admit(&api, &spec, ahead).await?;
            if sharded {
                let mine = per_tenant.get(&spec.tenant).copied().unwrap_or(0);
                check_quota(&api, &spec.tenant, mine).await?;
            }
            Ok(spec)
        }
        .await;
        match checked {
            Ok(spec) => {
                *per_tenant.entry(spec.tenant.clone()).or_default() += 1;
                results.push(None);
                specs.push(spec);
            }
            Err(e) => results.push(Some(Err(e))),
        }
    }
    let mut written = if sharded {
        let each = specs.into_iter().map(|spec| submit(&api, &caller, spec));
        futures_util::future::join_all(each).await
    } else {
        let writes = specs
            .into_iter()
            .map(|spec| crate::fsm::Write {
                command: Command::Submit(spec),
                audit: Some(caller.audit(None)),
            })
            .collect();
        api.node
            .write_many_in(api.node.meta(), writes)
            .await?
            .into_iter()
            .map(super::outcome)
            .collect()
    }
    .into_iter();
    let results = results
        .into_iter()
        .map(|r| {
            r.or_else(|| written.next()).unwrap_or_else(|| {
                Err(ApiError::from(crate::node::NodeError::Internal(
                    "no result for a task of the batch".into(),
                )))
            })
        })
        .collect();
    Ok(Json(BatchView::of(&api.node, results)?))
}

/// Load shedding by priority (`queue.shed_at`): refuses a new task whose
/// priority is shed at the current load, with 429 and code `shed`. Two
/// loads count: this node's write queue, and the cluster's unfinished tasks
/// against `queue.max_unfinished_tasks` (read on this node's replicas).
/// `critical` is refused only at the limit itself. A task without a
/// priority counts as its parent's, else `medium`. `ahead`: tasks of the
/// same batch admitted before this one (not written yet), counted as load.
async fn admit(api: &Api, spec: &SubmitTask, ahead: u64) -> ApiResult<()> {
    // A resend of a task already created is answered with it, not shed
    // (as this node's replicas know it: one behind sheds the resend, and
    // the client's retry finds it).
    if let Some(key) = &spec.idempotency_key {
        let known = api.node.queue_groups().iter().any(|g| {
            g.state()
                .read(|s| s.by_idempotency_key(&spec.tenant, key).is_some())
        });
        if known {
            return Ok(());
        }
    }
    // A tenant past a budget limit: no new work until the period ends.
    let budget = api.node.state().read(|s| {
        s.auth()
            .tenant(&spec.tenant)
            .and_then(|r| r.settings.budget.clone())
    });
    if let Some(budget) = budget {
        let node = &api.node;
        let visit = |f: &mut dyn FnMut(&crate::fsm::State)| crate::budget::for_groups(node, f);
        let uses = crate::budget::uses(
            &visit,
            node.config(),
            &spec.tenant,
            &budget,
            clock::now_ms(),
        );
        if let Some(u) = uses.iter().find(|u| u.exhausted()) {
            let (used, limit) = match u.unit {
                crate::budget::Unit::Tokens => {
                    (format!("{} tokens", u.used), format!("{} tokens", u.limit))
                }
                crate::budget::Unit::Cost => (
                    format!("${:.2}", u.used as f64 / 1e6),
                    format!("${:.2}", u.limit as f64 / 1e6),
                ),
            };
            let now = clock::now_ms();
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "budget",
                format!(
                    "tenant `{}` has used {used} of its {} budget of {limit}: new tasks are refused until {} (running ones finish)",
                    spec.tenant,
                    u.period.as_str(),
                    clock::rfc3339(u.resets_at_ms)
                ),
            )
            .retry_after(u.resets_at_ms.saturating_sub(now).div_ceil(1000)));
        }
    }
    let priority = match (spec.priority, spec.parent_id) {
        (Some(p), _) => p,
        (None, Some(parent)) => match api.node.queue_group_of(parent.0) {
            Ok(g) => g
                .state()
                .read(|s| {
                    s.task(parent)
                        .filter(|t| t.tenant == spec.tenant)
                        .map(|t| t.priority)
                })
                .unwrap_or_default(),
            Err(_) => Priority::default(),
        },
        (None, None) => Priority::default(),
    };
    let config = &api.node.config().queue;
    let shed = config.shed_at;
    let refuse = |what: String| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "shed",
            format!(
                "{what}: {} tasks are refused from {:.0}% of it; retry later, or submit at a higher priority",
                priority.as_str(),
                shed.of(priority) * 100.0
            ),
        )
    };
    let (backlog, capacity) = api.node.write_backlog();
    let backlog = backlog + ahead;
    if priority != Priority::Critical && !shed.admits(priority, backlog, capacity) {
        return Err(refuse(format!(
            "this node's write queue holds {backlog} of {capacity} commands"
        )));
    }
    if let Some(limit) = config.max_unfinished_tasks {
        let unfinished: u64 = api
            .node
            .queue_groups()
            .iter()
            .map(|g| g.state().read(|s| s.unfinished()))
            .sum::<u64>()
            + ahead;
        if !shed.admits(priority, unfinished, limit) {
            return Err(refuse(format!(
                "the cluster holds {unfinished} unfinished tasks of its limit of {limit}"
            )));
        }
    }
    Ok(())
}

/// How many times a submission routes again when a shard says the node's
/// routing epochs are behind (each after a read barrier on the meta group,
/// which brings them up to date).
const ROUTE_ATTEMPTS: usize = 3;

/// Submits `spec`: in the meta group with one shard; with several, to the
/// shard its key routes to now, after asking each shard an earlier routing
/// epoch routed the key to whether it holds the key or its session
/// (`docs/shards.md`, "Changing the number of shards").
async fn submit(api: &Api, caller: &Caller, spec: SubmitTask) -> ApiResult<Reply> {
    if api.node.shard_groups().is_empty() {
        return api
            .write_in(api.node.meta(), caller, Command::Submit(spec), None)
            .await;
    }
    let key = spec
        .session_key
        .as_ref()
        .map(|k| k.0.clone())
        .or(spec.idempotency_key.clone());
    let with_deps = dependencies_shard(api, &spec).await?;
    for _ in 0..ROUTE_ATTEMPTS {
        let mut route = api.node.submission_route(&spec.tenant.0, key.as_deref())?;
        if let Some(g) = with_deps {
            let session_elsewhere =
                spec.session_key.is_some() && (route.target != g || !route.lookback.is_empty());
            if session_elsewhere {
                return Err(ApiError::invalid(format!(
                    "invalid field `depends_on`: its tasks are in queue shard {g} and the session key routes to another; a task with dependencies runs in their shard (submit it without session_key, or give the dependencies its session key)"
                )));
            }
            route.target = g;
            route.lookback.clear();
        }
        let asks = route.lookback.iter().map(|g| (*g, true));
        let mut stale = false;
        for (g, lookback) in asks.chain([(route.target, false)]) {
            let group = api.node.group(g).ok_or_else(|| {
                ApiError::unavailable(format!("queue shard {g} is not hosted here"))
            })?;
            let cmd = Command::SubmitRouted {
                epoch: route.epoch,
                lookback,
                task: spec.clone(),
            };
            let written = api
                .node
                .write_audited_in(group, cmd, Some(caller.audit(None)))
                .await;
            match written {
                Ok(Ok(Reply::NotHere)) => continue,
                Ok(Err(Rejection::StaleRoute { .. })) => {
                    stale = true;
                    break;
                }
                other => return super::outcome(other),
            }
        }
        if !stale {
            return Err(ApiError::unavailable(
                "every shard answered \"not here\", the current route's included",
            ));
        }
        api.node.read_barrier().await?;
    }
    Err(ApiError::unavailable(
        "this node's queue-shard routing stayed behind the shards' after a read barrier; retry",
    ))
}

/// With several queue shards, the shard a task with `depends_on` goes to:
/// its dependencies' (they must share one, since a shard's state machine
/// sees only its own tasks). `None` without dependencies.
async fn dependencies_shard(api: &Api, spec: &SubmitTask) -> ApiResult<Option<u32>> {
    let Some(first) = spec.depends_on.first() else {
        return Ok(None);
    };
    let group = match api.queue_group_of(first.0, "task").await {
        Ok(g) => g.id(),
        Err(e) if e.status == StatusCode::NOT_FOUND => {
            return Err(ApiError::invalid(format!(
                "invalid field `depends_on`: task {first} does not exist"
            )));
        }
        Err(e) => return Err(e),
    };
    if let Some(other) = spec
        .depends_on
        .iter()
        .find(|d| (d.0 & 0xff) as u32 != group)
    {
        return Err(ApiError::invalid(format!(
            "invalid field `depends_on`: tasks {first} and {other} are in different queue shards; a task's dependencies must be in one (tasks with one session key share a shard)"
        )));
    }
    Ok(Some(group))
}

/// `GET /tasks`.
#[utoipa::path(
    get,
    path = "/tasks",
    params(ListQuery),
    responses((status = 200, description = "One page of tasks, by id", body = PageView))
)]
pub async fn list(
    State(api): State<Api>,
    caller: Caller,
    Params(q): Params<ListQuery>,
) -> ApiResult<Json<PageView>> {
    let limit = q.limit(api.node.config().api.max_page_size)?;
    let filter = TaskFilter {
        status: q.status()?,
        priority: q.priority()?,
        tenant: caller.tenant_filter(q.tenant.clone())?,
    };
    let after = q.after()?;
    let pages = api
        .read_queue(|s| s.list(&filter, after, limit, super::SCAN_BUDGET))
        .await?;
    Ok(Json(view::page(&api.node, TaskPage::merge(pages, limit))))
}

/// `GET /tasks/{id}`.
#[utoipa::path(
    get,
    path = "/tasks/{id}",
    params(("id" = u64, Path, description = "Task id")),
    responses(
        (status = 200, description = "The task", body = TaskDetail),
        (status = 404, description = "No such task (in this credential's tenant)", body = ErrorBody),
    )
)]
pub async fn get(
    State(api): State<Api>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<TaskDetail>> {
    let id = parse_id(&id)?;
    let group = api.queue_group_of(id.0, "task").await?;
    api.node.read_barrier_in(group).await?;
    let dead_after = api.node.queue_config().node_dead_after.as_millis() as u64;
    let found = group
        .state()
        .read(|s| s.task_shared(id).filter(|t| caller.sees(&t.tenant)));
    // Why it waits is the registry's to say: the meta group's replica.
    let held_by = found.as_ref().and_then(|t| {
        (t.status == crate::fsm::TaskStatus::Pending)
            .then(|| {
                group
                    .state()
                    .read(|s| s.switch_holding(t).map(str::to_owned))
            })
            .flatten()
    });
    let found = found.map(|t| {
        let x = t.extras();
        let deps = || {
            let ids: Vec<String> = x.waiting_on.iter().map(|d| d.0.to_string()).collect();
            format!("tasks {} to complete", ids.join(", "))
        };
        let waiting_for = match (&x.blocked, x.waiting_on.as_slice()) {
            _ if held_by.is_some() => held_by.map(|n| format!("held by kill switch {n}")),
            _ if t.status == crate::fsm::TaskStatus::AwaitingApproval => {
                let mut why = format!("an approval (POST /tasks/{}/approve)", t.id.0);
                match (&x.blocked, x.waiting_on.is_empty()) {
                    (Some(blocked), _) => why.push_str(&format!("; blocked: {blocked}")),
                    (None, false) => why.push_str(&format!(", and {}", deps())),
                    (None, true) => {}
                }
                Some(why)
            }
            (Some(blocked), _) => Some(format!("blocked: {blocked}")),
            (None, []) => api
                .node
                .state()
                .read(|s| s.region_wait_reason(&t, dead_after)),
            (None, _) => Some(deps()),
        };
        (t, waiting_for)
    });
    found
        .map(|(t, waiting_for)| {
            Json(TaskDetail {
                task: TaskView::of(&api.node, t),
                waiting_for,
            })
        })
        .ok_or_else(|| {
            // The same answer for a task never given out, another tenant's
            // and one purged once finished: no oracle of which.
            let kept = api.node.queue_config().retain_finished;
            ApiError::not_found(format!(
                "task {id} not found (a finished task is purged after queue.retain_finished, {} here)",
                humantime::format_duration(kept)
            ))
        })
}

/// `GET /tasks/{id}` answer: the task, and why it waits when that is not
/// just its turn in the queue.
#[derive(Serialize, ToSchema)]
pub struct TaskDetail {
    #[serde(flatten)]
    task: TaskView,
    /// Why it cannot be leased now, when the cause is not other tasks
    /// ahead of it: a kill switch that holds it, an approval it awaits,
    /// the tasks it depends on that have not completed (or why it is
    /// blocked), or a required region with no agent that can run it.
    waiting_for: Option<String>,
}

/// `POST /tasks/{id}/cancel` body.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelBody {
    reason: Option<String>,
    /// Leave its unfinished children (tasks submitted with it as
    /// `parent_id`) alone. By default they are cancelled too (and theirs),
    /// with the reason naming it.
    #[serde(default)]
    keep_children: bool,
}

/// `POST /tasks/{id}/cancel`.
#[utoipa::path(
    post,
    path = "/tasks/{id}/cancel",
    params(("id" = u64, Path, description = "Task id")),
    request_body(content = Option<CancelBody>, description = "Optional"),
    responses((status = 200, description = "The cancelled task", body = TaskView))
)]
pub async fn cancel(
    State(api): State<Api>,
    caller: Caller,
    Path(id): Path<String>,
    Body(b): Body<CancelBody>,
) -> ApiResult<Json<TaskView>> {
    let id = parse_id(&id)?;
    let cmd = Command::Cancel {
        id,
        reason: b.reason,
        keep_children: b.keep_children,
    };
    let group = api.queue_group_of(id.0, "task").await?;
    task_reply(
        &api,
        api.write_in(group, &caller, cmd, Some(AuditTarget::Task(id.0)))
            .await?,
    )
}

/// `POST /tasks/{id}/retry`.
#[utoipa::path(
    post,
    path = "/tasks/{id}/retry",
    params(("id" = u64, Path, description = "Task id")),
    responses((status = 200, description = "The task, pending again", body = TaskView))
)]
pub async fn retry(
    State(api): State<Api>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<TaskView>> {
    let id = parse_id(&id)?;
    let group = api.queue_group_of(id.0, "task").await?;
    let cmd = Command::Retry { id };
    task_reply(
        &api,
        api.write_in(group, &caller, cmd, Some(AuditTarget::Task(id.0)))
            .await?,
    )
}

/// `POST /tasks/{id}/approve` body.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApproveBody {
    /// Why, for the record.
    reason: Option<String>,
}

/// `POST /tasks/{id}/approve`: an operator or admin approves a task
/// awaiting approval; it goes on (waiting on its dependencies, ready, or
/// scheduled). The decision is audited and shown on the task.
#[utoipa::path(
    post,
    path = "/tasks/{id}/approve",
    params(("id" = u64, Path, description = "Task id")),
    request_body(content = Option<ApproveBody>, description = "Optional"),
    responses(
        (status = 200, description = "The approved task", body = TaskView),
        (status = 404, description = "No such task (in this credential's tenant)", body = ErrorBody),
        (status = 409, description = "The task is not awaiting approval", body = ErrorBody),
    )
)]
pub async fn approve(
    State(api): State<Api>,
    caller: Caller,
    Path(id): Path<String>,
    Body(b): Body<ApproveBody>,
) -> ApiResult<Json<TaskView>> {
    let id = parse_id(&id)?;
    let group = api.queue_group_of(id.0, "task").await?;
    let cmd = Command::Approve {
        id,
        by: caller.actor().to_string(),
        reason: b.reason,
    };
    task_reply(
        &api,
        api.write_in(group, &caller, cmd, Some(AuditTarget::Task(id.0)))
            .await?,
    )
}

/// `POST /tasks/{id}/reject` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RejectBody {
    /// Why (required: it is shown on the task and audited).
    #[schema(min_length = 1)]
    reason: String,
}

/// `POST /tasks/{id}/reject`: an operator or admin rejects a task awaiting
/// approval; it is cancelled (with its children; its dependents by their
/// policy), naming who and why. The decision is audited.
#[utoipa::path(
    post,
    path = "/tasks/{id}/reject",
    params(("id" = u64, Path, description = "Task id")),
    request_body = RejectBody,
    responses(
        (status = 200, description = "The rejected task, cancelled", body = TaskView),
        (status = 400, description = "No reason given", body = ErrorBody),
        (status = 404, description = "No such task (in this credential's tenant)", body = ErrorBody),
        (status = 409, description = "The task is not awaiting approval", body = ErrorBody),
    )
)]
pub async fn reject(
    State(api): State<Api>,
    caller: Caller,
    Path(id): Path<String>,
    Body(b): Body<RejectBody>,
) -> ApiResult<Json<TaskView>> {
    let id = parse_id(&id)?;
    let group = api.queue_group_of(id.0, "task").await?;
    let cmd = Command::Reject {
        id,
        by: caller.actor().to_string(),
        reason: b.reason,
    };
    task_reply(
        &api,
        api.write_in(group, &caller, cmd, Some(AuditTarget::Task(id.0)))
            .await?,
    )
}

/// A tenant's `max_queued` over every shard, checked before a submission
/// goes to one (with several shards no one group sees the tenant's whole
/// count). Submissions racing each other on different nodes may pass it
/// together, by at most one each. `ahead`: the tenant's tasks of the same
/// batch admitted before this one.
async fn check_quota(api: &Api, tenant: &Tenant, ahead: u64) -> ApiResult<()> {
    let limit = api.node.state().read(|s| s.tenant_max_queued(tenant));
    let Some(limit) = limit else {
        return Ok(());
    };
    let queued: u64 = api
        .read_queue(|s| s.queued_of(tenant))
        .await?
        .iter()
        .sum::<u64>()
        + ahead;
    if queued >= limit {
        return Err(crate::fsm::Rejection::QuotaExceeded {
            tenant: tenant.clone(),
            queued,
            limit,
        }
        .into());
    }
    Ok(())
}

/// A task id from a path segment.
pub fn parse_id(s: &str) -> ApiResult<TaskId> {
    s.parse()
        .map(TaskId)
        .map_err(|_| ApiError::invalid(format!("invalid field `id`: `{s}` is not a task id")))
}

/// The JSON of a reply that carries one task.
pub fn task_reply(api: &Api, reply: Reply) -> ApiResult<Json<TaskView>> {
    match reply {
        Reply::Task(t) => Ok(Json(TaskView::of(&api.node, t))),
        other => Err(super::unexpected(other)),
    }
}
