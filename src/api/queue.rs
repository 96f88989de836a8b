//! Queue endpoints: depth and dead letters (list, export, replay), within
//! the caller's tenant unless it is cross-tenant.

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::{PartialSchema, ToSchema};

use super::Api;
use super::auth::Caller;
use super::error::{ApiError, ApiResult};
use super::json::{Body, Params};
use super::view::{self, DeadLetterQuery};
use crate::fsm::{
    Command, DeadLetterFilter, Depth, Limits, Priority, ReplaySelector, Reply, TaskId, TaskPage,
    TaskStatus,
};

/// `GET /queue/depth` answer.
#[derive(Serialize, ToSchema)]
pub struct DepthView {
    /// Pending tasks.
    pending: u64,
    /// Pending tasks per priority.
    #[schema(value_type = BTreeMap<String, u64>)]
    by_priority: view::Counts,
    /// Tasks per status.
    #[schema(value_type = BTreeMap<String, u64>)]
    by_status: view::Counts,
    /// Tasks per status, per tenant the caller sees.
    #[schema(value_type = BTreeMap<String, BTreeMap<String, u64>>)]
    by_tenant: BTreeMap<String, view::Counts>,
    /// One entry: the queue has one shard.
    shards: Vec<ShardDepth>,
}

/// One shard's depth.
#[derive(Serialize, ToSchema)]
pub struct ShardDepth {
    shard: u32,
    pending: u64,
    /// The node leading it, if one is known.
    leader: Option<u64>,
}

/// `GET /queue/depth`: exact counts per priority, status and tenant. The
/// queue has one shard, so the shard view is the total.
#[utoipa::path(
    get,
    path = "/queue/depth",
    responses((status = 200, description = "Counts (the caller's tenant only, unless cross-tenant)", body = DepthView))
)]
pub async fn depth(State(api): State<Api>, caller: Caller) -> ApiResult<Json<DepthView>> {
    let mut d = Depth::default();
    for shard in api.read_queue(|s| s.depth()).await? {
        d.add(shard);
    }
    d.by_tenant.retain(|t, _| caller.sees(t));
    let pending = d.pending();
    let by_tenant = d
        .by_tenant
        .keys()
        .map(|t| {
            (
                t.to_string(),
                view::per_status(|s| d.count(None, s, Some(t))),
            )
        })
        .collect();
    Ok(Json(DepthView {
        pending,
        by_priority: view::per_priority(|p| d.count(Some(p), TaskStatus::Pending, None)),
        by_status: view::per_status(|s| d.count(None, s, None)),
        by_tenant,
        shards: vec![ShardDepth {
            shard: 0,
            pending,
            leader: api.node.leader().map(|(id, _)| id),
        }],
    }))
}

/// The filter of a dead-letter query; `None` when it matches nothing (a
/// status other than `dead_letter`).
fn dead_letter_filter(caller: &Caller, q: &DeadLetterQuery) -> ApiResult<Option<DeadLetterFilter>> {
    let list = q.list();
    let status = list.status()?;
    let filter = DeadLetterFilter {
        tenant: caller.tenant_filter(list.tenant.clone())?,
        priority: list.priority()?,
        error_contains: q.error_contains.clone(),
    };
    Ok(status
        .is_none_or(|s| s == TaskStatus::DeadLetter)
        .then_some(filter))
}

/// `GET /dead-letter`.
#[utoipa::path(
    get,
    path = "/dead-letter",
    params(DeadLetterQuery),
    responses((status = 200, description = "One page of dead letters, by id", body = view::PageView))
)]
pub async fn list(
    State(api): State<Api>,
    caller: Caller,
    Params(q): Params<DeadLetterQuery>,
) -> ApiResult<Json<view::PageView>> {
    let limit = q.list().limit(api.node.config().api.max_page_size)?;
    let filter = dead_letter_filter(&caller, &q)?;
    let after = q.list().after()?;
    let page = match filter {
        Some(f) => TaskPage::merge(
            api.read_queue(|s| s.dead_letter_page(&f, after, limit))
                .await?,
            limit,
        ),
        None => TaskPage {
            items: Vec::new(),
            next: None,
        },
    };
    Ok(Json(view::page(&api.node, page)))
}

/// `GET /dead-letter/export`: every matching dead letter (up to
/// [`Limits::MAX_REPLAY`]) as newline-delimited JSON.
#[utoipa::path(
    get,
    path = "/dead-letter/export",
    params(DeadLetterQuery),
    responses((status = 200, description = "One task (as `Task`) per line", content_type = "application/x-ndjson", body = String))
)]
pub async fn export(
    State(api): State<Api>,
    caller: Caller,
    Params(q): Params<DeadLetterQuery>,
) -> ApiResult<impl IntoResponse> {
    let list = q.list();
    list.limit(api.node.config().api.max_page_size)?;
    list.after()?;
    let filter = dead_letter_filter(&caller, &q)?;
    let page = match filter {
        Some(f) => TaskPage::merge(
            api.read_queue(|s| s.dead_letter_page(&f, None, Limits::MAX_REPLAY))
                .await?,
            Limits::MAX_REPLAY,
        ),
        None => TaskPage {
            items: Vec::new(),
            next: None,
        },
    };
    let mut out = String::new();
    for t in &page.items {
        out.push_str(
            &serde_json::to_string(&view::TaskView::of(&api.node, t.clone())).unwrap_or_default(),
        );
        out.push('\n');
    }
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], out))
}

/// `POST /dead-letter/replay` body: either `ids` or a filter.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayBody {
    /// These dead letters (not with the filters).
    ids: Option<Vec<u64>>,
    /// Filter: this tenant's.
    tenant: Option<String>,
    /// Filter: this priority.
    priority: Option<Priority>,
    /// Filter: error text containing this.
    error_contains: Option<String>,
    /// Most to replay (default and limit 10000).
    limit: Option<u32>,
}

// Written out: `ids` and the filters exclude each other, which the derive
// cannot say. The fields are those of `ReplayBody`.
impl utoipa::PartialSchema for ReplayBody {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        let limit = serde_json::json!({
            "type": ["integer", "null"], "minimum": 1, "maximum": Limits::MAX_REPLAY,
            "description": "Most to replay (default and limit 10000)",
        });
        let text = serde_json::json!({ "type": ["string", "null"] });
        let schema = serde_json::json!({
            "description": "Either `ids`, or filters (none: every dead letter the caller sees)",
            "oneOf": [
                {
                    "type": "object",
                    "required": ["ids"],
                    "properties": {
                        "ids": {
                            "type": "array",
                            "items": { "type": "integer", "minimum": 0 },
                            "minItems": 1,
                            "maxItems": Limits::MAX_REPLAY,
                        },
                        "limit": limit,
                    },
                    "additionalProperties": false,
                },
                {
                    "type": "object",
                    "properties": {
                        "ids": { "type": "null" },
                        "tenant": text,
                        "priority": { "oneOf": [{ "type": "null" }, { "$ref": "#/components/schemas/Priority" }] },
                        "error_contains": text,
                        "limit": limit,
                    },
                    "additionalProperties": false,
                },
            ],
        });
        utoipa::openapi::RefOr::T(
            serde_json::from_value(schema).expect("invariant: a valid schema object"),
        )
    }
}

impl ToSchema for ReplayBody {
    fn schemas(
        schemas: &mut Vec<(
            String,
            utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>,
        )>,
    ) {
        schemas.push((Priority::name().into(), Priority::schema()));
    }
}

/// `POST /dead-letter/replay` answer.
#[derive(Serialize, ToSchema)]
pub struct ReplayedView {
    /// The tasks moved back to the queue.
    replayed: Vec<u64>,
}

/// `POST /dead-letter/replay`: moves dead letters back to the queue with
/// fresh attempts; returns the ids moved.
#[utoipa::path(
    post,
    path = "/dead-letter/replay",
    request_body(content = Option<ReplayBody>, description = "`ids`, or filters; none: every dead letter the caller sees"),
    responses((status = 200, description = "The ids replayed", body = ReplayedView))
)]
pub async fn replay(
    State(api): State<Api>,
    caller: Caller,
    Body(b): Body<ReplayBody>,
) -> ApiResult<Json<ReplayedView>> {
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
    api.node.fresh_routes().await?;
    if let [group] = api.node.queue_groups() {
        let replayed = replay_in(&api, group, &caller, selector, limit).await?;
        return Ok(Json(ReplayedView { replayed }));
    }
    // Several shards: each replays its own. Ids are checked on every
    // shard's replica first, so a bad one changes nothing (a task that
    // leaves the dead letters between the check and its shard's replay is
    // refused there alone).
    let mut per_shard: Vec<(&crate::node::Group, ReplaySelector)> = Vec::new();
    match selector {
        ReplaySelector::Ids(ids) => {
            let mut by_group: BTreeMap<u32, Vec<TaskId>> = BTreeMap::new();
            for id in ids {
                let group = api.queue_group_of(id.0, "task").await?;
                by_group.entry(group.id()).or_default().push(id);
            }
            for ids in by_group.into_values() {
                let group = api.queue_group_of(ids[0].0, "task").await?;
                api.node.read_barrier_in(group).await?;
                group
                    .state()
                    .read(|s| s.check_dead_letters(&ids, limit))
                    .map_err(ApiError::from)?;
                per_shard.push((group, ReplaySelector::Ids(ids)));
            }
        }
        filter @ ReplaySelector::Filter(_) => {
            for group in api.node.queue_groups() {
                per_shard.push((group, filter.clone()));
            }
        }
    }
    let mut replayed = Vec::new();
    for (group, selector) in per_shard {
        let left = limit.saturating_sub(replayed.len() as u32);
        if left == 0 {
            break;
        }
        replayed.extend(replay_in(&api, group, &caller, selector, left).await?);
    }
    replayed.sort_unstable();
    Ok(Json(ReplayedView { replayed }))
}

async fn replay_in(
    api: &Api,
    group: &crate::node::Group,
    caller: &Caller,
    selector: ReplaySelector,
    limit: u32,
) -> ApiResult<Vec<u64>> {
    match api
        .write_in(group, caller, Command::Replay { selector, limit }, None)
        .await?
    {
        Reply::Replayed(ids) => Ok(ids.iter().map(|i| i.0).collect()),
        other => Err(super::unexpected(other)),
    }
}
