//! Worker endpoints: lease tasks, then renew, complete or fail each lease by
//! its fencing token.

use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::auth::Caller;
use super::error::{ApiError, ApiResult};
use super::json::Body;
use super::tasks::task_reply;
use super::view::TaskView;
use super::{Api, view};
use crate::fsm::{AgentId, AuditTarget, Command, FencingToken, Limits, Reply};

/// `POST /leases` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseBody {
    /// The worker asking: a name, as agents are registered under.
    #[schema(schema_with = view::name_schema)]
    agent_id: String,
    /// What it can run (matched against tasks' capabilities as given).
    #[serde(default)]
    capabilities: Vec<String>,
    /// Most tasks to lease (default 1).
    #[schema(minimum = 1, maximum = 1000)]
    max: Option<u32>,
    /// Lease length in ms (default `queue.default_lease`).
    #[schema(minimum = 100, maximum = 3_600_000)]
    lease_ms: Option<u64>,
}

/// `POST /leases` answer: the leases granted, possibly none.
#[derive(Serialize, ToSchema)]
pub struct LeasesView {
    leases: Vec<view::LeaseView>,
}

/// `POST /leases`: up to `max` (default 1) tasks for the agent.
#[utoipa::path(
    post,
    path = "/leases",
    request_body = LeaseBody,
    responses((status = 200, description = "The leases granted (none when nothing is pending for it)", body = LeasesView))
)]
pub async fn acquire(
    State(api): State<Api>,
    caller: Caller,
    Body(b): Body<LeaseBody>,
) -> ApiResult<Json<LeasesView>> {
    let lease_ms = lease_ms(&api, b.lease_ms)?;
    // The same rule as a registration's id: no agent has another name.
    crate::fsm::check_name("agent_id", &b.agent_id, false)
        .map_err(|(f, p)| ApiError::invalid(format!("invalid field `{f}`: {p}")))?;
    let max = Limits::MAX_LEASES_PER_REQUEST;
    if b.max.is_some_and(|m| !(1..=max).contains(&m)) {
        return Err(ApiError::invalid(format!(
            "invalid field `max`: must be 1..={max}"
        )));
    }
    let target = AuditTarget::text(format!("agent/{}", b.agent_id));
    let group = lease_shard(&api, &caller, &b.capabilities).await?;
    let cmd = Command::Lease {
        agent_id: AgentId(b.agent_id),
        capabilities: b.capabilities,
        max: b.max.unwrap_or(1),
        lease_ms,
    };
    match api.write_in(group, &caller, cmd, Some(target)).await? {
        Reply::Leased(grants) => {
            // The flags live in the meta group: this node's replica.
            let leases = api.node.state().read(|s| {
                grants
                    .iter()
                    .map(|g| view::lease(&api.node, g, s.flags_on(&g.task, None, None)))
                    .collect()
            });
            Ok(Json(LeasesView { leases }))
        }
        other => Err(super::unexpected(other)),
    }
}

/// `POST /leases/{token}/renew` body.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenewBody {
    /// New lease length from now, in ms (default `queue.default_lease`).
    #[schema(minimum = 100, maximum = 3_600_000)]
    lease_ms: Option<u64>,
}

/// `POST /leases/{token}/renew`.
#[utoipa::path(
    post,
    path = "/leases/{token}/renew",
    params(("token" = u64, Path, description = "The lease's fencing token")),
    request_body(content = Option<RenewBody>, description = "Optional"),
    responses((status = 200, description = "The task, lease extended", body = TaskView))
)]
pub async fn renew(
    State(api): State<Api>,
    caller: Caller,
    Path(token): Path<String>,
    Body(b): Body<RenewBody>,
) -> ApiResult<Json<TaskView>> {
    let token = parse_token(&token)?;
    let lease_ms = lease_ms(&api, b.lease_ms)?;
    let cmd = Command::Renew { token, lease_ms };
    write_lease(&api, &caller, token, cmd).await
}

/// `POST /leases/{token}/complete` body.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteBody {
    /// Any JSON (up to 256 KiB as text); `null` when absent.
    #[serde(default)]
    #[schema(value_type = Value)]
    result: Value,
}

/// `POST /leases/{token}/complete`.
#[utoipa::path(
    post,
    path = "/leases/{token}/complete",
    params(("token" = u64, Path, description = "The lease's fencing token")),
    request_body(content = Option<CompleteBody>, description = "Optional"),
    responses((status = 200, description = "The completed task", body = TaskView))
)]
pub async fn complete(
    State(api): State<Api>,
    caller: Caller,
    Path(token): Path<String>,
    Body(b): Body<CompleteBody>,
) -> ApiResult<Json<TaskView>> {
    let token = parse_token(&token)?;
    let cmd = Command::Complete {
        token,
        result: b.result.to_string(),
    };
    write_lease(&api, &caller, token, cmd).await
}

/// `POST /leases/{token}/fail` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailBody {
    /// What went wrong (up to 4 KiB).
    #[schema(max_length = 1024)]
    error: String,
    /// Whether another attempt may succeed (default `true`).
    #[serde(default = "yes")]
    retryable: bool,
    /// What the attempt used before it failed: counted in `GET /usage`
    /// and the tenant's budgets like a completed attempt's.
    usage: Option<FailUsage>,
}

/// Tokens a failed attempt used.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailUsage {
    /// Tokens in (counts over 10^12 are taken as 10^12).
    #[serde(default)]
    input_tokens: u64,
    /// Tokens out.
    #[serde(default)]
    output_tokens: u64,
    /// The model (cut to 128 bytes).
    model: Option<String>,
}

impl FailUsage {
    /// As the state machine records it.
    fn reported(self) -> crate::fsm::ReportedUsage {
        crate::fsm::ReportedUsage {
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            model: self.model,
        }
    }
}

fn yes() -> bool {
    true
}

/// `POST /leases/{token}/fail`.
#[utoipa::path(
    post,
    path = "/leases/{token}/fail",
    params(("token" = u64, Path, description = "The lease's fencing token")),
    request_body = FailBody,
    responses((status = 200, description = "The task: pending again, or dead-lettered", body = TaskView))
)]
pub async fn fail(
    State(api): State<Api>,
    caller: Caller,
    Path(token): Path<String>,
    Body(b): Body<FailBody>,
) -> ApiResult<Json<TaskView>> {
    let token = parse_token(&token)?;
    let cmd = Command::Fail {
        token,
        error: b.error,
        retryable: b.retryable,
        usage: b.usage.map(FailUsage::reported),
    };
    write_lease(&api, &caller, token, cmd).await
}

/// One lease's result in `POST /leases:batch`: `error` fails the attempt,
/// otherwise it completes with `result`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportItem {
    /// The lease's fencing token.
    fencing_token: u64,
    /// With no `error`: the task's result, any JSON (up to 256 KiB as
    /// text); `null` when absent.
    #[serde(default)]
    #[schema(value_type = Value)]
    result: Value,
    /// What went wrong: the attempt failed (cut to 4 KiB, as
    /// `POST /leases/{token}/fail` does).
    error: Option<String>,
    /// With `error`: whether another attempt may succeed (default `true`).
    retryable: Option<bool>,
    /// With `error`: what the attempt used before it failed.
    usage: Option<FailUsage>,
}

/// `POST /leases:batch` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportBatch {
    /// 1 to 1,000 results, applied in order (a lease named again after it
    /// ended answers 409, as a second single call would).
    #[schema(min_items = 1, max_items = 1000)]
    results: Vec<ReportItem>,
}

/// `POST /leases:batch` answer.
#[derive(Serialize, ToSchema)]
pub struct ReportView {
    /// One per result sent, in the same order: status 200 with the task as
    /// `POST /leases/{token}/complete` or `/fail` would answer it, else
    /// the error that call would have had (nothing changed for it).
    items: Vec<super::tasks::BatchItem>,
    /// Items that took effect.
    done: u32,
    /// Items refused.
    failed: u32,
}

/// `POST /leases:batch`: completes and fails many leases in one call (one
/// Raft entry per queue shard they are in), a result per item, in order.
#[utoipa::path(
    post,
    path = "/leases:batch",
    request_body = ReportBatch,
    responses(
        (status = 200, description = "A result per item, in order (some may have failed)", body = ReportView),
        (status = 400, description = "Not 1 to 1,000 well-formed results; nothing changed", body = super::error::ErrorBody),
    )
)]
pub async fn report_batch(
    State(api): State<Api>,
    caller: Caller,
    Body(b): Body<ReportBatch>,
) -> ApiResult<Json<ReportView>> {
    let n = b.results.len();
    let most = super::MAX_BATCH_ITEMS;
    if !(1..=most).contains(&n) {
        return Err(ApiError::invalid(format!(
            "invalid field `results`: {n} results; a batch holds 1 to {most}"
        )));
    }
    // Each item's shard (tokens carry it), then one write per shard.
    let mut results: Vec<Option<ApiResult<Reply>>> = Vec::with_capacity(n);
    let mut by_group: Vec<(&crate::node::Group, Vec<(usize, crate::fsm::Write)>)> = Vec::new();
    for (i, item) in b.results.into_iter().enumerate() {
        let token = FencingToken(item.fencing_token);
        let cmd = match item.error {
            Some(_) if !item.result.is_null() => {
                results.push(Some(Err(ApiError::invalid(
                    "invalid field `result`: a failed attempt has no result (send `error` or `result`)",
                ))));
                continue;
            }
            Some(error) => Command::Fail {
                token,
                error,
                retryable: item.retryable.unwrap_or(true),
                usage: item.usage.map(FailUsage::reported),
            },
            None if item.retryable.is_some() || item.usage.is_some() => {
                results.push(Some(Err(ApiError::invalid(
                    "invalid field `retryable`/`usage`: only with `error`",
                ))));
                continue;
            }
            None => Command::Complete {
                token,
                result: item.result.to_string(),
            },
        };
        match api.queue_group_of(token.0, "lease").await {
            Err(e) => results.push(Some(Err(e))),
            Ok(group) => {
                results.push(None);
                let write = crate::fsm::Write {
                    command: cmd,
                    audit: Some(caller.audit(Some(AuditTarget::Lease(token.0)))),
                };
                match by_group.iter_mut().find(|(g, _)| g.id() == group.id()) {
                    Some((_, writes)) => writes.push((i, write)),
                    None => by_group.push((group, vec![(i, write)])),
                }
            }
        }
    }
    let each = by_group.into_iter().map(|(group, writes)| {
        let api = &api;
        async move {
            let (at, writes): (Vec<usize>, Vec<_>) = writes.into_iter().unzip();
            let written: Vec<ApiResult<Reply>> = match api.node.write_many_in(group, writes).await {
                Ok(each) => each.into_iter().map(super::outcome).collect(),
                Err(e) => at.iter().map(|_| Err(ApiError::from(e.clone()))).collect(),
            };
            at.into_iter()
                .zip(written)
                .collect::<Vec<(usize, ApiResult<Reply>)>>()
        }
    });
    for (i, r) in futures_util::future::join_all(each)
        .await
        .into_iter()
        .flatten()
    {
        results[i] = Some(r);
    }
    let (mut done, mut failed) = (0, 0);
    let mut items = Vec::with_capacity(n);
    for r in results {
        let r = r.unwrap_or_else(|| {
            Err(ApiError::from(crate::node::NodeError::Internal(
                "no result for an item of the batch".into(),
            )))
        });
        match r {
            Ok(Reply::Task(task)) => {
                done += 1;
                items.push(super::tasks::BatchItem::task(&api.node, 200, task));
            }
            Ok(other) => return Err(super::unexpected(other)),
            Err(e) => {
                failed += 1;
                items.push(super::tasks::BatchItem::error(e));
            }
        }
    }
    Ok(Json(ReportView {
        items,
        done,
        failed,
    }))
}

/// Where a worker's lease call goes: with several shards, the one that
/// holds the most urgent ready task the worker could take (read on every
/// shard's replica after a read barrier), so strict priority holds over
/// the shards; that shard's first one when none has any.
async fn lease_shard<'a>(
    api: &'a Api,
    caller: &Caller,
    capabilities: &[String],
) -> ApiResult<&'a crate::node::Group> {
    api.node.fresh_routes().await?;
    let groups = api.node.queue_groups();
    if groups.len() == 1 {
        return Ok(&groups[0]);
    }
    let best = api
        .read_queue(|s| s.best_ready_for_worker(capabilities, |t| caller.sees(&t.tenant)))
        .await?;
    let at = (0..groups.len().min(best.len()))
        .max_by_key(|&i| (best[i], std::cmp::Reverse(i)))
        .unwrap_or(0);
    Ok(&groups[at])
}

/// Proposes `cmd` about lease `token` in the shard that holds it (tokens
/// carry it; one naming no shard has no lease), audited against the
/// lease; the task it answers with.
async fn write_lease(
    api: &Api,
    caller: &Caller,
    token: FencingToken,
    cmd: Command,
) -> ApiResult<Json<TaskView>> {
    let group = api.queue_group_of(token.0, "lease").await?;
    let target = Some(AuditTarget::Lease(token.0));
    task_reply(api, api.write_in(group, caller, cmd, target).await?)
}

/// The requested lease length, or the configured default; checked here so a
/// bad request costs no log entry.
fn lease_ms(api: &Api, asked: Option<u64>) -> ApiResult<u64> {
    let ms = asked.unwrap_or(api.node.queue_config().default_lease.as_millis() as u64);
    let (lo, hi) = Limits::LEASE_MS_RANGE;
    if !(lo..=hi).contains(&ms) {
        return Err(ApiError::invalid(format!(
            "invalid field `lease_ms`: must be {lo}..={hi}"
        )));
    }
    Ok(ms)
}

fn parse_token(s: &str) -> ApiResult<FencingToken> {
    s.parse()
        .map(FencingToken)
        .map_err(|_| ApiError::invalid(format!("invalid field `fencing_token`: `{s}`")))
}
