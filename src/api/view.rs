//! JSON views of state-machine values, and parsing of the shared query
//! parameters (cursor pagination and filters).

use serde::Deserialize;
use serde_json::{Value, json};

use super::error::ApiError;
use crate::clock::rfc3339;
use crate::fsm::{Priority, Task, TaskId, TaskPage, TaskStatus};

/// A task as the API shows it.
pub fn task(t: &Task) -> Value {
    let lease = t.lease.as_ref().map(|l| {
        json!({
            "fencing_token": l.token.0,
            "agent_id": l.agent_id.0,
            "leased_at": rfc3339(l.leased_at_ms),
            "expires_at": rfc3339(l.expires_at_ms),
        })
    });
    json!({
        "id": t.id.0,
        "tenant": t.tenant.0,
        "priority": t.priority.as_str(),
        "status": t.status.as_str(),
        "payload": json_text(&t.payload),
        "capabilities": t.capabilities,
        "session_key": t.session_key.as_ref().map(|k| &k.0),
        "scheduled_at": t.scheduled_at_ms.map(rfc3339),
        "max_attempts": t.max_attempts,
        "attempt_count": t.attempts,
        "lease_count": t.lease_count,
        "timeout_ms": t.timeout_ms,
        "backoff": t.backoff,
        "idempotency_key": t.idempotency_key,
        "parent_id": t.parent_id.map(|p| p.0),
        "lease": lease,
        "agent_id": t.last_agent.as_ref().map(|a| &a.0),
        "result": t.result.as_deref().map(json_text),
        "error": t.last_error,
        "next_attempt_at": t.next_attempt_at_ms.map(rfc3339),
        "created_at": rfc3339(t.created_at_ms),
        "updated_at": rfc3339(t.updated_at_ms),
    })
}

/// Stored JSON text back to a value (it was validated on the way in).
fn json_text(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.to_owned()))
}

/// A page as the API shows it.
pub fn page(p: &TaskPage) -> Value {
    json!({
        "items": p.items.iter().map(task).collect::<Vec<_>>(),
        "next_cursor": p.next.map(|id| id.0.to_string()),
    })
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
        match self.limit {
            None => Ok(50.min(max)),
            Some(n) if (1..=max).contains(&n) => Ok(n),
            Some(_) => Err(ApiError::invalid(format!(
                "invalid field `limit`: must be 1..={max}"
            ))),
        }
    }

    /// The cursor as the id to start after.
    pub fn after(&self) -> Result<Option<TaskId>, ApiError> {
        self.cursor
            .as_deref()
            .map(|c| {
                c.parse()
                    .map(TaskId)
                    .map_err(|_| ApiError::invalid(format!("invalid field `cursor`: `{c}`")))
            })
            .transpose()
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
