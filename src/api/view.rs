//! JSON views of state-machine values, and parsing of the shared query
//! parameters (cursor pagination and filters).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::{IntoParams, ToSchema};

use super::error::ApiError;
use crate::clock::rfc3339;
use crate::fsm::{LeaseGrant, Priority, Task, TaskId, TaskPage, TaskStatus};

/// A task as the API shows it. Serialized straight from the shared task:
/// payload and result are stored JSON text and pass through unparsed.
pub struct TaskView {
    task: Arc<Task>,
    /// The payload, read from this node's store when the task does not
    /// hold it (`None`: unreadable, shown as `null`; the read logged why).
    payload: Option<Arc<str>>,
}

impl TaskView {
    /// The view of `task`, its payload read from `node`'s store if the
    /// task does not hold it (a task read from this node's replica; one a
    /// write's reply carries holds its own).
    pub fn of(node: &crate::node::Node, task: Arc<Task>) -> TaskView {
        let payload = match task.payload.held() {
            Some(_) => None,
            None => node.payload_of(&task).ok(),
        };
        TaskView { task, payload }
    }
}

/// The borrowed shape of [`TaskView`]; its schema is the OpenAPI `Task`.
#[derive(Serialize, ToSchema)]
#[schema(as = Task)]
struct TaskJson<'a> {
    id: u64,
    tenant: &'a str,
    #[schema(value_type = Priority)]
    priority: &'static str,
    #[schema(value_type = TaskStatus)]
    status: &'static str,
    /// The submitted payload, as submitted.
    #[schema(value_type = Object)]
    payload: Raw<'a>,
    #[schema(value_type = Vec<String>)]
    capabilities: &'a [String],
    session_key: Option<&'a str>,
    #[schema(format = DateTime)]
    scheduled_at: Option<String>,
    max_attempts: u32,
    attempt_count: u32,
    lease_count: u32,
    timeout_ms: u64,
    #[schema(value_type = crate::fsm::Backoff)]
    backoff: &'a crate::fsm::Backoff,
    idempotency_key: Option<&'a str>,
    parent_id: Option<u64>,
    /// The region it should run in (see `region_required`).
    region: Option<&'a str>,
    /// Whether it must run in `region`.
    region_required: bool,
    /// The W3C trace id its submission carried (or was derived).
    #[schema(value_type = String, pattern = "^[0-9a-f]{32}$")]
    trace_id: TraceHex,
    /// The live lease, while leased or running.
    lease: Option<LeaseJson<'a>>,
    /// The agent of its last lease.
    agent_id: Option<&'a str>,
    /// What the last completion reported: any JSON.
    #[schema(value_type = Value)]
    result: Option<Raw<'a>>,
    /// The last failure's error text.
    error: Option<&'a str>,
    #[schema(format = DateTime)]
    next_attempt_at: Option<String>,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    updated_at: String,
    /// The tasks it runs after, as submitted.
    depends_on: Vec<u64>,
    /// While `waiting`: those of `depends_on` that have not completed yet.
    waiting_on: Vec<u64>,
    /// With `depends_on`: what a dependency dead-lettered or cancelled does
    /// to it.
    #[schema(value_type = Option<crate::fsm::DependencyFailure>)]
    on_dependency_failure: Option<&'static str>,
    /// While `waiting`: why it cannot go on (a dependency dead-lettered or
    /// cancelled, under the `block` policy).
    blocked: Option<&'a str>,
    /// For a task submitted with `requires_approval`: when an undecided
    /// request lapses, and the decision once made.
    approval: Option<ApprovalJson<'a>>,
    /// What its completed attempt used, when its result reported tokens
    /// (a `usage` object: `GET /usage` adds them up).
    usage: Option<UsageJson<'a>>,
}

/// What a task's completed attempt used.
#[derive(Serialize, ToSchema)]
#[schema(as = TaskUsage)]
struct UsageJson<'a> {
    input_tokens: u64,
    output_tokens: u64,
    /// The model its result named.
    model: Option<&'a str>,
    /// From its lease to its completion, in ms.
    compute_ms: u64,
}

/// A task's approval.
#[derive(Serialize, ToSchema)]
#[schema(as = TaskApproval)]
struct ApprovalJson<'a> {
    /// When an undecided request lapses (the task is then cancelled).
    #[schema(format = DateTime)]
    expires_at: Option<String>,
    /// The decision, once made.
    decision: Option<DecisionJson<'a>>,
}

/// Who decided a task's approval.
#[derive(Serialize, ToSchema)]
#[schema(as = TaskApprovalDecision)]
struct DecisionJson<'a> {
    approved: bool,
    /// The deciding credential (`key:<id>` or `jwt:<sub>`).
    by: &'a str,
    reason: Option<&'a str>,
    #[schema(format = DateTime)]
    at: String,
}

/// A task's live lease.
#[derive(Serialize, ToSchema)]
#[schema(as = TaskLease)]
struct LeaseJson<'a> {
    fencing_token: u64,
    agent_id: &'a str,
    #[schema(format = DateTime)]
    leased_at: String,
    #[schema(format = DateTime)]
    expires_at: String,
}

impl utoipa::PartialSchema for TaskView {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        TaskJson::schema()
    }
}

impl ToSchema for TaskView {
    fn name() -> std::borrow::Cow<'static, str> {
        TaskJson::name()
    }

    fn schemas(
        schemas: &mut Vec<(
            String,
            utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>,
        )>,
    ) {
        TaskJson::schemas(schemas);
    }
}

/// A trace id's hex digits, written as a JSON string without allocating.
struct TraceHex([u8; 32]);

impl Serialize for TraceHex {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(std::str::from_utf8(&self.0).unwrap_or_default())
    }
}

/// Stored JSON text, written as JSON (it was validated on the way in; if it
/// is somehow not JSON, it is written as a string rather than corrupting the
/// response).
struct Raw<'a>(&'a str);

impl Serialize for Raw<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match serde_json::from_str::<&RawValue>(self.0) {
            Ok(raw) => raw.serialize(s),
            Err(_) => s.serialize_str(self.0),
        }
    }
}

impl Serialize for TaskView {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let t = &*self.task;
        let (x, o) = (t.extras(), t.outcome());
        TaskJson {
            id: t.id.0,
            tenant: &t.tenant.0,
            priority: t.priority.as_str(),
            status: t.status.as_str(),
            payload: Raw(t
                .payload
                .held()
                .or(self.payload.as_deref())
                .unwrap_or("null")),
            capabilities: &t.capabilities,
            session_key: t.session_key.as_ref().map(|k| k.0.as_str()),
            scheduled_at: x.scheduled_at_ms.map(rfc3339),
            max_attempts: t.max_attempts,
            attempt_count: t.attempts,
            lease_count: t.lease_count,
            timeout_ms: t.timeout_ms,
            backoff: &t.backoff,
            idempotency_key: t.idempotency_key.as_deref(),
            parent_id: x.parent_id.map(|p| p.0),
            region: x.region.as_ref().map(|r| r.name.as_str()),
            region_required: x.region.as_ref().is_some_and(|r| r.required),
            trace_id: TraceHex(t.trace().trace_hex_bytes()),
            lease: t.lease.as_ref().map(|l| LeaseJson {
                fencing_token: l.token.0,
                agent_id: &l.agent_id.0,
                leased_at: rfc3339(l.leased_at_ms),
                expires_at: rfc3339(l.expires_at_ms),
            }),
            agent_id: o.last_agent.as_ref().map(|a| a.0.as_str()),
            result: o.result.as_deref().map(Raw),
            error: o.last_error.as_deref(),
            next_attempt_at: o.next_attempt_at_ms.map(rfc3339),
            created_at: rfc3339(t.created_at_ms),
            updated_at: rfc3339(t.updated_at_ms),
            depends_on: x.depends_on.iter().map(|d| d.0).collect(),
            waiting_on: x.waiting_on.iter().map(|d| d.0).collect(),
            on_dependency_failure: (!x.depends_on.is_empty())
                .then(|| t.on_dependency_failure.as_str()),
            blocked: x.blocked.as_deref(),
            approval: x.approval.as_ref().map(|a| ApprovalJson {
                expires_at: a.expires_at_ms.map(rfc3339),
                decision: a.decision.as_ref().map(|d| DecisionJson {
                    approved: d.approved,
                    by: &d.by,
                    reason: d.reason.as_deref(),
                    at: rfc3339(d.at_ms),
                }),
            }),
            usage: o.usage.as_ref().map(|u| UsageJson {
                input_tokens: u.input_tokens,
                output_tokens: u.output_tokens,
                model: u.model.as_deref(),
                compute_ms: u.compute_ms,
            }),
        }
        .serialize(s)
    }
}

/// Names (tenants, capabilities, gateway ids): 1 to 256 of
/// `A-Z a-z 0-9 . _ : / -` (`fsm::check_name`).
const NAME_PATTERN: &str = "^[A-Za-z0-9._:/-]{1,256}$";
/// Free-text keys (session and idempotency keys): 1 to 256 bytes without
/// control characters; the schema says 64 characters, which any UTF-8
/// fits in 256 bytes.
const TEXT_PATTERN: &str = "^[^\\x00-\\x1f\\x7f-\\x9f]{1,64}$";

/// The schema of a name field.
pub fn name_schema() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::Type::String)
        .pattern(Some(NAME_PATTERN))
        .build()
}

/// The schema of a free-text key field.
pub fn text_schema() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::Type::String)
        .pattern(Some(TEXT_PATTERN))
        .build()
}

/// The schema of an optional name field: a name or `null`.
pub fn opt_name_schema() -> utoipa::openapi::Object {
    nullable(name_schema())
}

/// The schema of an optional free-text key field: one or `null`.
pub fn opt_text_schema() -> utoipa::openapi::Object {
    nullable(text_schema())
}

fn nullable(mut o: utoipa::openapi::Object) -> utoipa::openapi::Object {
    use utoipa::openapi::{Type, schema::SchemaType};
    o.schema_type = SchemaType::from_iter([Type::String, Type::Null]);
    o
}

/// The schema of a list of capability names (at most 32).
pub fn names_schema() -> utoipa::openapi::schema::Array {
    utoipa::openapi::schema::ArrayBuilder::new()
        .items(name_schema())
        .max_items(Some(crate::fsm::Limits::MAX_CAPABILITIES))
        .build()
}

/// A page as the API shows it.
#[derive(Serialize, ToSchema)]
#[schema(as = TaskPage)]
pub struct PageView {
    items: Vec<TaskView>,
    /// Pass as `cursor` for the next page; `null` at the end.
    next_cursor: Option<String>,
}

/// The view of a page.
pub fn page(node: &crate::node::Node, p: TaskPage) -> PageView {
    PageView {
        items: p.items.into_iter().map(|t| TaskView::of(node, t)).collect(),
        next_cursor: p.next.map(|id| id.0.to_string()),
    }
}

/// One granted lease as `POST /leases` shows it.
#[derive(Serialize, ToSchema)]
#[schema(as = Lease)]
pub struct LeaseView {
    task_id: u64,
    fencing_token: u64,
    #[schema(format = DateTime)]
    expires_at: String,
    task: TaskView,
    /// The feature flags on for this task (a worker has no gateway, so
    /// flags scoped to a gateway kind or model are never on here).
    flags: Vec<String>,
}

/// The view of a granted lease, with the feature flags `flags` on for it.
pub fn lease(node: &crate::node::Node, g: &LeaseGrant, flags: Vec<String>) -> LeaseView {
    LeaseView {
        task_id: g.task.id.0,
        fencing_token: g.token.0,
        expires_at: rfc3339(g.expires_at_ms),
        task: TaskView::of(node, Arc::clone(&g.task)),
        flags,
    }
}

/// Query parameters of `GET /tasks`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Page size: 1 to `api.max_page_size` (default 1000); 50 when absent.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    #[param(pattern = "^[0-9]{1,19}$")]
    pub cursor: Option<String>,
    /// Status filter.
    #[param(value_type = Option<TaskStatus>)]
    pub status: Option<String>,
    /// Priority filter.
    #[param(value_type = Option<Priority>)]
    pub priority: Option<String>,
    /// Tenant filter (a developer or viewer may name only its own).
    pub tenant: Option<String>,
}

/// Query parameters of the dead-letter lists: those of `GET /tasks` (a
/// dead letter's status is `dead_letter`, so another status matches
/// nothing), and an error text filter.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeadLetterQuery {
    /// Page size: 1 to `api.max_page_size` (default 1000); 50 when absent
    /// (the export checks it, and writes up to 10000 regardless).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page (the export checks it, and
    /// starts at the first regardless).
    #[param(pattern = "^[0-9]{1,19}$")]
    pub cursor: Option<String>,
    /// Status filter: only `dead_letter` matches.
    #[param(value_type = Option<TaskStatus>)]
    pub status: Option<String>,
    /// Priority filter.
    #[param(value_type = Option<Priority>)]
    pub priority: Option<String>,
    /// Tenant filter (a developer or viewer may name only its own).
    pub tenant: Option<String>,
    /// Error text filter.
    pub error_contains: Option<String>,
}

impl DeadLetterQuery {
    /// The parameters it shares with `GET /tasks`.
    pub fn list(&self) -> ListQuery {
        ListQuery {
            limit: self.limit,
            cursor: self.cursor.clone(),
            status: self.status.clone(),
            priority: self.priority.clone(),
            tenant: self.tenant.clone(),
        }
    }
}

impl ListQuery {
    /// The page size, defaulting to 50 and bounded by `max`.
    pub fn limit(&self, max: usize) -> Result<usize, ApiError> {
        page_limit(self.limit, max)
    }

    /// The cursor as the id to start after.
    pub fn after(&self) -> Result<Option<TaskId>, ApiError> {
        Ok(cursor(self.cursor.as_deref())?.map(TaskId))
    }

    /// The status filter.
    pub fn status(&self) -> Result<Option<TaskStatus>, ApiError> {
        self.status
            .as_deref()
            .map(|s| s.parse().map_err(field_err("status")))
            .transpose()
    }

    /// The priority filter.
    pub fn priority(&self) -> Result<Option<Priority>, ApiError> {
        self.priority
            .as_deref()
            .map(|s| s.parse().map_err(field_err("priority")))
            .transpose()
    }
}

/// A list's page size: `asked`, or 50, bounded by `max` (the configured
/// `api.max_page_size`); past the bound it is a 400 naming `limit`.
pub fn page_limit(asked: Option<usize>, max: usize) -> Result<usize, ApiError> {
    match asked {
        None => Ok(50.min(max)),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::invalid(format!(
            "invalid field `limit`: must be 1..={max}"
        ))),
    }
}

/// A list's `cursor` (the `next_cursor` of the previous page) as the id to
/// start after.
pub fn cursor(c: Option<&str>) -> Result<Option<u64>, ApiError> {
    c.map(|c| {
        c.parse()
            .map_err(|_| ApiError::invalid(format!("invalid field `cursor`: `{c}`")))
    })
    .transpose()
}

fn field_err(field: &'static str) -> impl Fn(String) -> ApiError {
    move |e| ApiError::invalid(format!("invalid field `{field}`: {e}"))
}

/// Counts keyed by priority or status name.
pub type Counts = std::collections::BTreeMap<&'static str, u64>;

/// Counts per priority, keyed by priority name.
pub fn per_priority(f: impl Fn(Priority) -> u64) -> Counts {
    Priority::URGENT_FIRST
        .iter()
        .map(|p| (p.as_str(), f(*p)))
        .collect()
}

/// Counts per status, keyed by status name.
pub fn per_status(f: impl Fn(TaskStatus) -> u64) -> Counts {
    TaskStatus::ALL
        .iter()
        .map(|s| (s.as_str(), f(*s)))
        .collect()
}
