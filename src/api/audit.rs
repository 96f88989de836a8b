//! `GET /audit` (admin): the hash-chained audit log, oldest first, with
//! cursor pagination and filters. Every page also names the chain's anchor
//! (where the kept entries start) and head (the newest entry), so a client
//! can verify the whole chain page by page (`godel audit verify`) and
//! compare heads across nodes.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use super::Api;
use super::error::{ApiError, ApiResult};
use super::json::Params;
use super::view::page_limit;
use crate::clock;
use crate::fsm::{AuditEntry, AuditFilter};

/// Query parameters.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    limit: Option<usize>,
    /// The previous page's `next_cursor` (a seq).
    cursor: Option<String>,
    actor: Option<String>,
    tenant: Option<String>,
    /// A prefix: `tasks.` or `tasks.submit`.
    action: Option<String>,
    /// A prefix: `ok`, `rejected`, `denied`.
    outcome: Option<String>,
}

/// Lower-case hex of a hash.
pub fn hex(h: &[u8; 32]) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// One entry as the API shows it: every field the hash covers.
pub fn entry_view(e: &AuditEntry) -> Value {
    json!({
        "seq": e.seq,
        "time": clock::rfc3339(e.time_ms),
        "time_ms": e.time_ms,
        "actor": &*e.actor,
        "tenant": &*e.tenant,
        "action": &*e.action,
        "target": e.target.to_string(),
        "outcome": &*e.outcome,
        "prev_hash": hex(&e.prev_hash),
        "hash": hex(&e.hash),
    })
}

/// `GET /audit`.
pub async fn list(State(api): State<Api>, Params(q): Params<AuditQuery>) -> ApiResult<Json<Value>> {
    let limit = page_limit(q.limit, api.node.config().api.max_page_size)?;
    let after = match q.cursor.as_deref() {
        None => 0,
        Some(c) => c
            .parse::<u64>()
            .map_err(|_| ApiError::invalid(format!("invalid field `cursor`: `{c}`")))?,
    };
    let filter = AuditFilter {
        actor: q.actor,
        tenant: q.tenant,
        action: q.action,
        outcome: q.outcome,
    };
    api.node.read_barrier().await?;
    let body = api.node.state().read(|s| {
        let log = s.audit();
        let (items, next) = log.page(&filter, after, limit);
        json!({
            "items": items.iter().map(entry_view).collect::<Vec<_>>(),
            "next_cursor": next.map(|n| n.to_string()),
            "anchor": log.anchor().map(|a| json!({ "seq": a.seq, "hash": hex(&a.hash) })),
            "head": { "seq": log.last_seq(), "hash": hex(&log.head()) },
        })
    });
    Ok(Json(body))
}
