//! Session endpoints: list, get and kill the gateway sessions the state
//! machine records. Sessions are opened by the runtime (a task with a
//! `session_key` dispatched to an agent), not through the API; an operator
//! only looks at them and ends them.

use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::Caller;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::json::{Body, Params};
use super::{Api, view};
use crate::fsm::{
    AuditTarget, Command, Reply, SessionId, SessionRecord, SessionState, Sessions, Tenant,
};

/// `GET /sessions` query: pagination as for tasks, and filters; an absent
/// filter matches everything.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SessionQuery {
    /// Page size: 1 to `api.max_page_size` (default 1000); 50 when absent.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// `next_cursor` of the previous page.
    #[param(pattern = "^[0-9]{1,19}$")]
    cursor: Option<String>,
    /// Only sessions on this gateway.
    gateway: Option<String>,
    /// Only sessions in this state.
    state: Option<SessionState>,
    /// Only sessions with this session key (live or ended).
    key: Option<String>,
    /// Only live (`true`) or only ended (`false`) sessions.
    live: Option<bool>,
    /// Only this tenant's sessions (a developer or viewer sees only its own).
    tenant: Option<String>,
}

impl SessionQuery {
    fn matches(&self, r: &SessionRecord, tenant: Option<&Tenant>) -> bool {
        tenant.is_none_or(|t| *t == r.tenant)
            && self.gateway.as_deref().is_none_or(|g| g == r.gateway.0)
            && self.state.is_none_or(|s| s == r.state)
            && self
                .key
                .as_deref()
                .is_none_or(|k| r.session_key.as_ref().is_some_and(|x| x.0 == k))
            && self.live.is_none_or(|l| l == is_live(r))
    }
}

fn is_live(r: &SessionRecord) -> bool {
    !r.state.is_terminal()
}

/// A session as the API shows it.
#[derive(Serialize, ToSchema)]
#[schema(as = Session)]
pub struct SessionView {
    id: u64,
    gateway: String,
    tenant: String,
    session_key: Option<String>,
    agent: Option<String>,
    state: SessionState,
    /// The task it runs or last ran.
    task: Option<u64>,
    /// When it times out, ms since the epoch.
    deadline_ms: Option<u64>,
    /// Why it ended.
    reason: Option<String>,
    /// How long it may stay idle, in ms.
    idle_ms: u64,
    created_at_ms: u64,
    updated_at_ms: u64,
    /// Not yet ended.
    live: bool,
}

/// `GET /sessions` answer.
#[derive(Serialize, ToSchema)]
pub struct SessionPage {
    items: Vec<SessionView>,
    /// Pass as `cursor` for the next page; `null` at the end.
    next_cursor: Option<String>,
}

fn session_view(r: &SessionRecord) -> SessionView {
    SessionView {
        id: r.id,
        gateway: r.gateway.0.clone(),
        tenant: r.tenant.0.clone(),
        session_key: r.session_key.as_ref().map(|k| k.0.clone()),
        agent: r.agent.as_ref().map(|a| a.0.clone()),
        state: r.state,
        task: r.task.map(|t| t.0),
        deadline_ms: r.deadline_ms,
        reason: r.reason.clone(),
        idle_ms: r.idle_ms,
        created_at_ms: r.created_at_ms,
        updated_at_ms: r.updated_at_ms,
        live: is_live(r),
    }
}

/// `GET /sessions`: `{items, next_cursor}`, oldest first (id order), like
/// the task and dead-letter lists.
#[utoipa::path(
    get,
    path = "/sessions",
    params(SessionQuery),
    responses((status = 200, description = "One page of sessions, by id", body = SessionPage))
)]
pub async fn list(
    State(api): State<Api>,
    caller: Caller,
    Params(q): Params<SessionQuery>,
) -> ApiResult<Json<SessionPage>> {
    let limit = view::page_limit(q.limit, api.node.config().api.max_page_size)?;
    let after = view::cursor(q.cursor.as_deref())?;
    let tenant = caller.tenant_filter(q.tenant.clone())?;
    let scope = Scan {
        tenant: tenant.as_ref(),
        after,
        limit,
        budget: super::SCAN_BUDGET,
    };
    let pages = api.read_queue(|s| page(s.sessions(), &q, &scope)).await?;
    let (items, next) = crate::fsm::merge_pages(pages, limit, |v: &SessionView| v.id);
    Ok(Json(SessionPage {
        items,
        next_cursor: next.map(|id| id.to_string()),
    }))
}

/// Where a page starts, how long it is, and whose sessions it shows.
struct Scan<'a> {
    tenant: Option<&'a Tenant>,
    after: Option<SessionId>,
    limit: usize,
    budget: usize,
}

/// Up to `limit` sessions after `after` that match `q` (and `tenant`),
/// scanning at most `budget` sessions past the cursor (a page may come
/// back short but with a cursor); the cursor is `None` at the end.
/// Reaching the cursor walks the sessions before it: [`Sessions`] offers
/// no range read yet.
fn page(
    sessions: &Sessions,
    q: &SessionQuery,
    scan: &Scan<'_>,
) -> (Vec<SessionView>, Option<SessionId>) {
    let mut items = Vec::new();
    let mut last = None;
    let rest = sessions
        .iter()
        .skip_while(|r| scan.after.is_some_and(|a| r.id <= a));
    for (scanned, r) in rest.enumerate() {
        if items.len() == scan.limit || scanned == scan.budget {
            return (items, last);
        }
        last = Some(r.id);
        if q.matches(r, scan.tenant) {
            items.push(session_view(r));
        }
    }
    (items, None)
}

/// `GET /sessions/{id}`.
#[utoipa::path(
    get,
    path = "/sessions/{id}",
    params(("id" = u64, Path, description = "Session id")),
    responses(
        (status = 200, description = "The session", body = SessionView),
        (status = 404, description = "No such session (in this credential's tenant)", body = ErrorBody),
    )
)]
pub async fn get(
    State(api): State<Api>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<SessionView>> {
    let id = parse_id(&id)?;
    let group = api.queue_group_of(id, "session").await?;
    api.node.read_barrier_in(group).await?;
    let view = group.state().read(|s| {
        s.sessions()
            .get(id)
            .filter(|r| caller.sees(&r.tenant))
            .map(|r| session_view(r))
    });
    view.map(Json)
        .ok_or_else(|| ApiError::not_found(format!("session {id} not found")))
}

/// `POST /sessions/{id}/kill` body (optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KillBody {
    reason: Option<String>,
}

/// `POST /sessions/{id}/kill`: ends a live session as `cancelled` (the
/// attempt it runs fails, retryably); returns the session after the change.
/// An ended session stays as it is (400 on `state`).
#[utoipa::path(
    post,
    path = "/sessions/{id}/kill",
    params(("id" = u64, Path, description = "Session id")),
    request_body(content = Option<KillBody>, description = "Optional"),
    responses((status = 200, description = "The session, ended", body = SessionView))
)]
pub async fn kill(
    State(api): State<Api>,
    caller: Caller,
    Path(id): Path<String>,
    Body(b): Body<KillBody>,
) -> ApiResult<Json<SessionView>> {
    let id = parse_id(&id)?;
    let cmd = Command::KillSession {
        id,
        reason: b.reason,
    };
    let group = api.queue_group_of(id, "session").await?;
    match api
        .write_in(group, &caller, cmd, Some(AuditTarget::Session(id)))
        .await?
    {
        Reply::Session(r) => Ok(Json(session_view(&r))),
        other => Err(super::unexpected(other)),
    }
}

fn parse_id(s: &str) -> ApiResult<SessionId> {
    s.parse()
        .map_err(|_| ApiError::invalid(format!("invalid field `id`: `{s}` is not a session id")))
}
