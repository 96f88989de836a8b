//! Worker endpoints: lease tasks, then renew, complete or fail each lease by
//! its fencing token.

use axum::Json;
use axum::extract::{Path, State};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::Caller;
use super::error::{ApiError, ApiResult};
use super::json::Body;
use super::tasks::task_reply;
use super::view::TaskView;
use super::{Api, view};
use crate::fsm::{AgentId, AuditTarget, Command, FencingToken, Limits, Reply};

/// `POST /leases` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseBody {
    agent_id: String,
    #[serde(default)]
    capabilities: Vec<String>,
    max: Option<u32>,
    lease_ms: Option<u64>,
}

/// `POST /leases`: up to `max` (default 1) tasks for the agent.
pub async fn acquire(
    State(api): State<Api>,
    caller: Caller,
    Body(b): Body<LeaseBody>,
) -> ApiResult<Json<Value>> {
    let lease_ms = lease_ms(&api, b.lease_ms)?;
    if b.agent_id.is_empty() || b.agent_id.len() > Limits::MAX_NAME_BYTES {
        let max = Limits::MAX_NAME_BYTES;
        return Err(ApiError::invalid(format!(
            "invalid field `agent_id`: must be 1..={max} bytes"
        )));
    }
    let max = Limits::MAX_LEASES_PER_REQUEST;
    if b.max.is_some_and(|m| !(1..=max).contains(&m)) {
        return Err(ApiError::invalid(format!(
            "invalid field `max`: must be 1..={max}"
        )));
    }
    let target = AuditTarget::text(format!("agent/{}", b.agent_id));
    let cmd = Command::Lease {
        agent_id: AgentId(b.agent_id),
        capabilities: b.capabilities,
        max: b.max.unwrap_or(1),
        lease_ms,
    };
    match api.write_as(&caller, cmd, Some(target)).await? {
        Reply::Leased(grants) => {
            let leases: Vec<view::LeaseView> = grants.iter().map(view::lease).collect();
            Ok(Json(json!({ "leases": leases })))
        }
        other => Err(super::unexpected(other)),
    }
}

/// `POST /leases/{token}/renew` body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewBody {
    lease_ms: Option<u64>,
}

/// `POST /leases/{token}/renew`.
pub async fn renew(
    State(api): State<Api>,
    caller: Caller,
    Path(token): Path<String>,
    Body(b): Body<RenewBody>,
) -> ApiResult<Json<TaskView>> {
    let token = parse_token(&token)?;
    let lease_ms = lease_ms(&api, b.lease_ms)?;
    let cmd = Command::Renew { token, lease_ms };
    task_reply(
        api.write_as(&caller, cmd, Some(lease_target(token)))
            .await?,
    )
}

/// `POST /leases/{token}/complete` body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompleteBody {
    #[serde(default)]
    result: Value,
}

/// `POST /leases/{token}/complete`.
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
    task_reply(
        api.write_as(&caller, cmd, Some(lease_target(token)))
            .await?,
    )
}

/// `POST /leases/{token}/fail` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailBody {
    error: String,
    #[serde(default = "yes")]
    retryable: bool,
}

fn yes() -> bool {
    true
}

/// `POST /leases/{token}/fail`.
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
    };
    task_reply(
        api.write_as(&caller, cmd, Some(lease_target(token)))
            .await?,
    )
}

fn lease_target(token: FencingToken) -> AuditTarget {
    AuditTarget::Lease(token.0)
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
