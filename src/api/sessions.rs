//! Session endpoints: list, get, kill, pause, resume, checkpoint and
//! migrate the gateway sessions the state machine records, and read a
//! session's checkpoints. Sessions are opened by the runtime (a task with
//! a `session_key` dispatched to an agent), not through the API.

use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::Caller;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::json::{Body, Params};
use super::{Api, view};
use crate::fsm::{
    AfterTask, AuditTarget, Checkpoint, Command, GatewayId, Reply, SessionId, SessionRecord,
    SessionState, Sessions, Tenant,
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
    /// Its gateway-side conversations so far, less one (each move to
    /// another gateway starts the next).
    generation: u32,
    /// The key of its current gateway-side conversation (for OpenClaw,
    /// where its transcript is).
    gateway_key: Option<String>,
    /// Tasks completed in it.
    turns: u64,
    /// Tokens its tasks' attempts reported, in.
    input_tokens: u64,
    /// And out.
    output_tokens: u64,
    /// Its last checkpoint's number (0: none yet).
    checkpoint_seq: u64,
    /// A checkpoint after every this many turns (0: only when asked).
    checkpoint_every: u32,
    /// Waiting to open on another gateway (its next task opens it there).
    moving: bool,
    /// While moving: the gateway it must go to (`null`: any).
    target_gateway: Option<String>,
    /// The checkpoint its next task carries to the new gateway.
    carry: Option<u64>,
    /// What it does once the task it runs ends: `pause` or `migrate`.
    #[schema(pattern = "^(pause|migrate)$")]
    then: Option<&'static str>,
    /// Once archived: how it ended.
    ended_as: Option<SessionState>,
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
        tenant: r.tenant.to_string(),
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
        generation: r.generation,
        gateway_key: r.gateway_key().map(|k| k.0),
        turns: r.turns,
        input_tokens: r.input_tokens,
        output_tokens: r.output_tokens,
        checkpoint_seq: r.checkpoint_seq,
        checkpoint_every: r.checkpoint_every,
        moving: r.moving,
        target_gateway: r.target.as_ref().map(|g| g.0.clone()),
        carry: r.carry,
        then: r.after_task.as_ref().map(|a| match a {
            AfterTask::Pause => "pause",
            AfterTask::Migrate(_) => "migrate",
        }),
        ended_as: r.ended_as,
    }
}

/// One turn a checkpoint keeps.
#[derive(Serialize, ToSchema)]
pub struct TurnView {
    /// The task.
    task: u64,
    /// When it completed, ms since the epoch.
    at_ms: u64,
    /// What it asked (its payload's `message`, or the payload), up to 1 KiB.
    prompt: String,
    /// What it answered (its result's `text`, or the result), up to 1 KiB.
    reply: String,
}

/// A session's checkpoint: what another gateway needs to continue it.
#[derive(Serialize, ToSchema)]
#[schema(as = Checkpoint)]
pub struct CheckpointView {
    /// Its number in the session, from 1.
    seq: u64,
    /// The name it was given (`null`: taken every N turns).
    name: Option<String>,
    /// When it was taken, ms since the epoch.
    at_ms: u64,
    /// The session's turns then.
    turns: u64,
    /// Its tokens then, in.
    input_tokens: u64,
    /// And out.
    output_tokens: u64,
    /// The gateway it ran on.
    gateway: String,
    /// Where that gateway keeps the conversation (its gateway-side
    /// session key; for OpenClaw, the transcript's key).
    transcript_ref: Option<String>,
    /// Its latest turns (up to 8), oldest first: what a new gateway is
    /// given to continue. Only a live session's latest checkpoint keeps
    /// them (empty in the others).
    transcript: Vec<TurnView>,
}

fn checkpoint_view(c: &Checkpoint) -> CheckpointView {
    CheckpointView {
        seq: c.seq,
        name: c.name.clone(),
        at_ms: c.at_ms,
        turns: c.turns,
        input_tokens: c.input_tokens,
        output_tokens: c.output_tokens,
        gateway: c.gateway.0.clone(),
        transcript_ref: c.transcript_ref.as_ref().map(|k| k.0.clone()),
        transcript: c
            .transcript
            .iter()
            .map(|t| TurnView {
                task: t.task.0,
                at_ms: t.at_ms,
                prompt: t.prompt.clone(),
                reply: t.reply.clone(),
            })
            .collect(),
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
    read_session(&api, &caller, id, |_, r| session_view(r))
        .await
        .map(Json)
}

/// Reads session `id` (after a read barrier in its group) through `f`;
/// 404 when it does not exist or the caller may not see its tenant.
async fn read_session<R>(
    api: &Api,
    caller: &Caller,
    id: SessionId,
    f: impl FnOnce(&crate::fsm::State, &SessionRecord) -> R,
) -> ApiResult<R> {
    let group = api.queue_group_of(id, "session").await?;
    api.node.read_barrier_in(group).await?;
    group
        .state()
        .read(|s| {
            s.sessions()
                .get(id)
                .filter(|r| caller.sees(&r.tenant))
                .map(|r| f(s, r))
        })
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
    session_reply(session_write(&api, &caller, id, cmd).await?)
}

/// Applies a session command in the session's queue group, audited.
async fn session_write(
    api: &Api,
    caller: &Caller,
    id: SessionId,
    cmd: Command,
) -> ApiResult<Reply> {
    let group = api.queue_group_of(id, "session").await?;
    api.write_in(group, caller, cmd, Some(AuditTarget::Session(id)))
        .await
}

/// The session after a command.
fn session_reply(reply: Reply) -> ApiResult<Json<SessionView>> {
    match reply {
        Reply::Session(r) => Ok(Json(session_view(&r))),
        other => Err(super::unexpected(other)),
    }
}

/// `POST /sessions/{id}/pause`: no task runs in the session until it is
/// resumed; one running now finishes first (the session shows `then:
/// "pause"` meanwhile). Its conversation and checkpoints stay.
#[utoipa::path(
    post,
    path = "/sessions/{id}/pause",
    params(("id" = u64, Path, description = "Session id")),
    responses(
        (status = 200, description = "The session: paused, or pausing after its task", body = SessionView),
        (status = 409, description = "The session has ended", body = ErrorBody),
    )
)]
pub async fn pause(
    State(api): State<Api>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<SessionView>> {
    let id = parse_id(&id)?;
    session_reply(session_write(&api, &caller, id, Command::PauseSession { id }).await?)
}

/// `POST /sessions/{id}/resume`: a paused session takes its next task
/// again, where it was, or from its last checkpoint on another gateway if
/// it was moving or its gateway cannot serve it; a pause asked while a
/// task runs is called off.
#[utoipa::path(
    post,
    path = "/sessions/{id}/resume",
    params(("id" = u64, Path, description = "Session id")),
    responses(
        (status = 200, description = "The session: resuming or migrating", body = SessionView),
        (status = 409, description = "The session is not paused, or has ended", body = ErrorBody),
    )
)]
pub async fn resume(
    State(api): State<Api>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<SessionView>> {
    let id = parse_id(&id)?;
    session_reply(session_write(&api, &caller, id, Command::ResumeSession { id }).await?)
}

/// `POST /sessions/{id}/checkpoint` body (optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointBody {
    /// A name for the record (cut to 256 bytes).
    #[schema(min_length = 1)]
    name: Option<String>,
}

/// `POST /sessions/{id}/checkpoint`: takes a checkpoint of a live session
/// now (its latest turns and tokens, and where its conversation is).
#[utoipa::path(
    post,
    path = "/sessions/{id}/checkpoint",
    params(("id" = u64, Path, description = "Session id")),
    request_body(content = Option<CheckpointBody>, description = "Optional"),
    responses(
        (status = 201, description = "The checkpoint taken", body = CheckpointView),
        (status = 409, description = "The session has ended", body = ErrorBody),
    )
)]
pub async fn checkpoint(
    State(api): State<Api>,
    caller: Caller,
    Path(id): Path<String>,
    Body(b): Body<CheckpointBody>,
) -> ApiResult<(axum::http::StatusCode, Json<CheckpointView>)> {
    let id = parse_id(&id)?;
    let cmd = Command::CheckpointSession { id, name: b.name };
    match session_write(&api, &caller, id, cmd).await? {
        Reply::Checkpoint(c) => Ok((axum::http::StatusCode::CREATED, Json(checkpoint_view(&c)))),
        other => Err(super::unexpected(other)),
    }
}

/// `POST /sessions/{id}/migrate` body (optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateBody {
    /// The gateway it must go to (registered); absent: whichever gateway
    /// takes its next task.
    gateway: Option<String>,
}

/// `POST /sessions/{id}/migrate`: the session continues on another
/// gateway from its last checkpoint: its next task opens it there (a new
/// gateway-side conversation, given the checkpoint's turns). A session
/// running a task moves once the task ends; a paused one once resumed.
#[utoipa::path(
    post,
    path = "/sessions/{id}/migrate",
    params(("id" = u64, Path, description = "Session id")),
    request_body(content = Option<MigrateBody>, description = "Optional"),
    responses(
        (status = 200, description = "The session: migrating, or moving after its task", body = SessionView),
        (status = 404, description = "No such session, or no such gateway", body = ErrorBody),
        (status = 409, description = "The session has ended or is completing", body = ErrorBody),
    )
)]
pub async fn migrate(
    State(api): State<Api>,
    caller: Caller,
    Path(id): Path<String>,
    Body(b): Body<MigrateBody>,
) -> ApiResult<Json<SessionView>> {
    let id = parse_id(&id)?;
    let gateway = b.gateway.map(GatewayId);
    if let Some(g) = &gateway {
        // The registry is the meta group's (queue shards hold none).
        let known = api.node.state().read(|s| s.registry().gateway(g).is_some());
        if !known {
            return Err(ApiError::not_found(format!("gateway `{g}` not found")));
        }
    }
    session_reply(session_write(&api, &caller, id, Command::MigrateSession { id, gateway }).await?)
}

/// `GET /sessions/{id}/checkpoints` answer.
#[derive(Serialize, ToSchema)]
pub struct CheckpointList {
    /// The session's checkpoints (the last 8), oldest first; none once
    /// archived.
    items: Vec<CheckpointView>,
}

/// `GET /sessions/{id}/checkpoints`.
#[utoipa::path(
    get,
    path = "/sessions/{id}/checkpoints",
    params(("id" = u64, Path, description = "Session id")),
    responses(
        (status = 200, description = "Its checkpoints", body = CheckpointList),
        (status = 404, description = "No such session (in this credential's tenant)", body = ErrorBody),
    )
)]
pub async fn checkpoints(
    State(api): State<Api>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<CheckpointList>> {
    let id = parse_id(&id)?;
    let items = read_session(&api, &caller, id, |s, _| {
        s.sessions()
            .checkpoints(id)
            .iter()
            .map(|c| checkpoint_view(c))
            .collect()
    })
    .await?;
    Ok(Json(CheckpointList { items }))
}

fn parse_id(s: &str) -> ApiResult<SessionId> {
    s.parse()
        .map_err(|_| ApiError::invalid(format!("invalid field `id`: `{s}` is not a session id")))
}
