//! `GET /audit` (admin): the hash-chained audit log, oldest first, with
//! cursor pagination and filters. Every page also names the chain's anchor
//! (where the kept entries start) and head (the newest entry), so a client
//! can verify the whole chain page by page (`godel audit verify`) and
//! compare heads across nodes.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::Api;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::json::Params;
use super::view::page_limit;
use crate::clock;
use crate::fsm::{AuditEntry, AuditFilter};

/// Query parameters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Page size: 1 to `api.max_page_size` (default 1000); 50 when absent.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// The previous page's `next_cursor` (a seq).
    #[param(pattern = "^[0-9]{1,19}$")]
    cursor: Option<String>,
    /// Only this actor's (`key:<id>`, `jwt:<sub>`, `node:<id>`).
    actor: Option<String>,
    /// Only this tenant's.
    tenant: Option<String>,
    /// A prefix: `tasks.` or `tasks.submit`.
    action: Option<String>,
    /// A prefix: `ok`, `rejected`, `denied`.
    outcome: Option<String>,
    /// Whose chain: 0, the meta group (default: credentials, tenants,
    /// the registry, and with one shard every write), or a queue shard
    /// `1..=shards`, which chains the task, lease and session writes it
    /// applied. Each group's chain verifies on its own.
    #[param(minimum = 0, maximum = 255)]
    group: Option<u32>,
}

/// Lower-case hex of a hash.
pub fn hex(h: &[u8; 32]) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// One entry as the API shows it: every field the hash covers.
#[derive(Serialize, ToSchema)]
#[schema(as = AuditEntry)]
pub struct EntryView {
    seq: u64,
    #[schema(format = DateTime)]
    time: String,
    time_ms: u64,
    actor: String,
    tenant: String,
    /// The route's audit action (`tasks.submit`).
    action: String,
    target: String,
    /// `ok`, `failed`, `rejected:<code>`, `denied:<why>`.
    outcome: String,
    /// Hex SHA-256.
    prev_hash: String,
    /// Hex SHA-256.
    hash: String,
}

/// The view of an entry.
pub fn entry_view(e: &AuditEntry) -> EntryView {
    EntryView {
        seq: e.seq,
        time: clock::rfc3339(e.time_ms),
        time_ms: e.time_ms,
        actor: e.actor.to_string(),
        tenant: e.tenant.to_string(),
        action: e.action.to_string(),
        target: e.target.to_string(),
        outcome: e.outcome.to_string(),
        prev_hash: hex(&e.prev_hash),
        hash: hex(&e.hash),
    }
}

/// A point of the chain.
#[derive(Serialize, ToSchema)]
pub struct ChainPoint {
    seq: u64,
    /// Hex SHA-256.
    hash: String,
}

/// `GET /audit` answer.
#[derive(Serialize, ToSchema)]
pub struct AuditPage {
    items: Vec<EntryView>,
    /// Pass as `cursor` for the next page; `null` at the end.
    next_cursor: Option<String>,
    /// Where the kept entries start (older ones were dropped), if anywhere.
    anchor: Option<ChainPoint>,
    /// The newest entry.
    head: ChainPoint,
}

/// `GET /audit`.
#[utoipa::path(
    get,
    path = "/audit",
    params(AuditQuery),
    responses(
        (status = 200, description = "One page of entries, oldest first", body = AuditPage),
        (status = 404, description = "The cluster has no such Raft group", body = ErrorBody),
    )
)]
pub async fn list(
    State(api): State<Api>,
    Params(q): Params<AuditQuery>,
) -> ApiResult<Json<AuditPage>> {
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
    let g = q.group.unwrap_or(crate::raft::META_GROUP);
    // A group the cluster does not have is a chain that does not exist:
    // 404, as for any id that names nothing.
    let group = api.node.group(g).ok_or_else(|| {
        ApiError::not_found(format!(
            "no Raft group {g}: this cluster has groups 0..={}",
            api.node.shard_groups().len()
        ))
    })?;
    api.node.read_barrier_in(group).await?;
    let body = group.state().read(|s| {
        let log = s.audit();
        let (items, next) = log.page(&filter, after, limit);
        AuditPage {
            items: items.iter().map(entry_view).collect(),
            next_cursor: next.map(|n| n.to_string()),
            anchor: log.anchor().map(|a| ChainPoint {
                seq: a.seq,
                hash: hex(&a.hash),
            }),
            head: ChainPoint {
                seq: log.last_seq(),
                hash: hex(&log.head()),
            },
        }
    });
    Ok(Json(body))
}
