//! Queue endpoints: depth and dead letters (list, export, replay), within
//! the caller's tenant unless it is cross-tenant.

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{Value, json};

use super::Api;
use super::auth::Caller;
use super::error::{ApiError, ApiResult};
use super::json::{Body, Params};
use super::view::{self, ListQuery};
use crate::fsm::{
    Command, DeadLetterFilter, Limits, Priority, ReplaySelector, Reply, TaskId, TaskStatus,
};

/// `GET /queue/depth`: exact counts per priority, status and tenant. The
/// queue has one shard, so the shard view is the total.
pub async fn depth(State(api): State<Api>, caller: Caller) -> ApiResult<Json<Value>> {
    api.node.read_barrier().await?;
    let mut d = api.node.state().read(|s| s.depth());
    d.by_tenant.retain(|t, _| caller.sees(t));
    let pending = d.pending();
    let by_tenant: serde_json::Map<String, Value> = d
        .by_tenant
        .keys()
        .map(|t| (t.0.clone(), view::per_status(|s| d.count(None, s, Some(t)))))
        .collect();
    Ok(Json(json!({
        "pending": pending,
        "by_priority": view::per_priority(|p| d.count(Some(p), TaskStatus::Pending, None)),
        "by_status": view::per_status(|s| d.count(None, s, None)),
        "by_tenant": by_tenant,
        "shards": [{ "shard": 0, "pending": pending, "leader": api.node.leader().map(|(id, _)| id) }],
    })))
}

fn dead_letter_filter(caller: &Caller, q: &ListQuery) -> ApiResult<DeadLetterFilter> {
    Ok(DeadLetterFilter {
        tenant: caller.tenant_filter(q.tenant.clone())?,
        priority: q.priority()?,
        error_contains: q.error_contains.clone(),
    })
}

/// `GET /dead-letter`.
pub async fn list(
    State(api): State<Api>,
    caller: Caller,
    Params(q): Params<ListQuery>,
) -> ApiResult<Json<view::PageView>> {
    let limit = q.limit(api.node.config().api.max_page_size)?;
    let filter = dead_letter_filter(&caller, &q)?;
    let after = q.after()?;
    api.node.read_barrier().await?;
    let page = api
        .node
        .state()
        .read(|s| s.dead_letter_page(&filter, after, limit));
    Ok(Json(view::page(page)))
}

/// `GET /dead-letter/export`: every matching dead letter (up to
/// [`Limits::MAX_REPLAY`]) as newline-delimited JSON.
pub async fn export(
    State(api): State<Api>,
    caller: Caller,
    Params(q): Params<ListQuery>,
) -> ApiResult<impl IntoResponse> {
    let filter = dead_letter_filter(&caller, &q)?;
    api.node.read_barrier().await?;
    let page = api
        .node
        .state()
        .read(|s| s.dead_letter_page(&filter, None, Limits::MAX_REPLAY));
    let mut out = String::new();
    for t in &page.items {
        out.push_str(&serde_json::to_string(&view::TaskView(t.clone())).unwrap_or_default());
        out.push('\n');
    }
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], out))
}

/// `POST /dead-letter/replay` body: either `ids` or a filter.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayBody {
    ids: Option<Vec<u64>>,
    tenant: Option<String>,
    priority: Option<Priority>,
    error_contains: Option<String>,
    limit: Option<u32>,
}

/// `POST /dead-letter/replay`: moves dead letters back to the queue with
/// fresh attempts; returns the ids moved.
pub async fn replay(
    State(api): State<Api>,
    caller: Caller,
    Body(b): Body<ReplayBody>,
) -> ApiResult<Json<Value>> {
    let limit = b.limit.unwrap_or(Limits::MAX_REPLAY as u32);
    let selector = match b.ids {
        Some(ids) if b.tenant.is_none() && b.priority.is_none() && b.error_contains.is_none() => {
            ReplaySelector::Ids(ids.into_iter().map(TaskId).collect())
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "give either `ids` or filters (`tenant`, `priority`, `error_contains`), not both",
            ));
        }
        None => ReplaySelector::Filter(DeadLetterFilter {
            tenant: caller.tenant_filter(b.tenant)?,
            priority: b.priority,
            error_contains: b.error_contains,
        }),
    };
    match api
        .write_as(&caller, Command::Replay { selector, limit }, None)
        .await?
    {
        Reply::Replayed(ids) => Ok(Json(
            json!({ "replayed": ids.iter().map(|i| i.0).collect::<Vec<_>>() }),
        )),
        other => Err(super::unexpected(other)),
    }
}
