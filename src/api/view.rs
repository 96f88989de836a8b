//! JSON views of state-machine values, and parsing of the shared query
//! parameters (cursor pagination and filters).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::error::ApiError;
use crate::clock::rfc3339;
use crate::fsm::{LeaseGrant, Priority, Task, TaskId, TaskPage, TaskStatus};

/// A task as the API shows it. Serialized straight from the shared task:
/// payload and result are stored JSON text and pass through unparsed.
pub struct TaskView(pub Arc<Task>);

/// The borrowed shape of [`TaskView`].
#[derive(Serialize)]
struct TaskJson<'a> {
    id: u64,
    tenant: &'a str,
    priority: &'static str,
    status: &'static str,
    payload: Raw<'a>,
    capabilities: &'a [String],
    session_key: Option<&'a str>,
    scheduled_at: Option<String>,
    max_attempts: u32,
    attempt_count: u32,
    lease_count: u32,
    timeout_ms: u64,
    backoff: &'a crate::fsm::Backoff,
    idempotency_key: Option<&'a str>,
    parent_id: Option<u64>,
    /// The W3C trace id its submission carried (or was derived).
    trace_id: TraceHex,
    lease: Option<LeaseJson<'a>>,
    agent_id: Option<&'a str>,
    result: Option<Raw<'a>>,
    error: Option<&'a str>,
    next_attempt_at: Option<String>,
    created_at: String,
    updated_at: String,
}

#[derive(Serialize)]
struct LeaseJson<'a> {
    fencing_token: u64,
    agent_id: &'a str,
    leased_at: String,
    expires_at: String,
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
        let t = &*self.0;
        TaskJson {
            id: t.id.0,
            tenant: &t.tenant.0,
            priority: t.priority.as_str(),
            status: t.status.as_str(),
            payload: Raw(&t.payload),
            capabilities: &t.capabilities,
            session_key: t.session_key.as_ref().map(|k| k.0.as_str()),
            scheduled_at: t.scheduled_at_ms.map(rfc3339),
            max_attempts: t.max_attempts,
            attempt_count: t.attempts,
            lease_count: t.lease_count,
            timeout_ms: t.timeout_ms,
            backoff: &t.backoff,
            idempotency_key: t.idempotency_key.as_deref(),
            parent_id: t.parent_id.map(|p| p.0),
            trace_id: TraceHex(t.trace().trace_hex_bytes()),
            lease: t.lease.as_ref().map(|l| LeaseJson {
                fencing_token: l.token.0,
                agent_id: &l.agent_id.0,
                leased_at: rfc3339(l.leased_at_ms),
                expires_at: rfc3339(l.expires_at_ms),
            }),
            agent_id: t.last_agent.as_ref().map(|a| a.0.as_str()),
            result: t.result.as_deref().map(Raw),
            error: t.last_error.as_deref(),
            next_attempt_at: t.next_attempt_at_ms.map(rfc3339),
            created_at: rfc3339(t.created_at_ms),
            updated_at: rfc3339(t.updated_at_ms),
        }
        .serialize(s)
    }
}

/// A page as the API shows it.
#[derive(Serialize)]
pub struct PageView {
    items: Vec<TaskView>,
    next_cursor: Option<String>,
}

/// The view of a page.
pub fn page(p: TaskPage) -> PageView {
    PageView {
        items: p.items.into_iter().map(TaskView).collect(),
        next_cursor: p.next.map(|id| id.0.to_string()),
    }
}

/// One granted lease as `POST /leases` shows it.
#[derive(Serialize)]
pub struct LeaseView {
    task_id: u64,
    fencing_token: u64,
    expires_at: String,
    task: TaskView,
}

/// The view of a granted lease.
pub fn lease(g: &LeaseGrant) -> LeaseView {
    LeaseView {
        task_id: g.task.id.0,
        fencing_token: g.token.0,
        expires_at: rfc3339(g.expires_at_ms),
        task: TaskView(Arc::clone(&g.task)),
    }
}

/// Query parameters of list endpoints.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Page size.
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Status filter.
    pub status: Option<String>,
    /// Priority filter.
    pub priority: Option<String>,
    /// Tenant filter.
    pub tenant: Option<String>,
    /// Dead letters only: error text filter.
    pub error_contains: Option<String>,
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

/// Counts per priority as a JSON object keyed by priority name.
pub fn per_priority(f: impl Fn(Priority) -> u64) -> Value {
    let map: serde_json::Map<String, Value> = Priority::URGENT_FIRST
        .iter()
        .map(|p| (p.as_str().to_owned(), json!(f(*p))))
        .collect();
    Value::Object(map)
}

/// Counts per status as a JSON object keyed by status name.
pub fn per_status(f: impl Fn(TaskStatus) -> u64) -> Value {
    let map: serde_json::Map<String, Value> = TaskStatus::ALL
        .iter()
        .map(|s| (s.as_str().to_owned(), json!(f(*s))))
        .collect();
    Value::Object(map)
}
