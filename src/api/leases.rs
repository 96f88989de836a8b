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
                    .map(|g| view::lease(g, s.flags_on(&g.task, None, None)))
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
        usage: b.usage.map(|u| crate::fsm::ReportedUsage {
            input_tokens: u.input_tokens,
            output_tokens: u.output_tokens,
            model: u.model,
        }),
    };
    write_lease(&api, &caller, token, cmd).await
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
    task_reply(api.write_in(group, caller, cmd, target).await?)
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
