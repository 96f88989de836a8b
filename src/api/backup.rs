//! `GET /admin/backup` (admin): a consistent, checksummed backup of every
//! Raft group, streamed from whichever node is asked (see `crate::backup`
//! for the format and `godel backup` for the client that checks it).
//!
//! Before the first byte: a concurrency permit (429 past
//! `backup::MAX_CONCURRENT_BACKUPS`), a read barrier, the request's audit
//! entry (a Raft write: no quorum, no backup), a second read barrier so
//! this node's replica holds that entry too, and the copy of each group's
//! state machine. Any failure until then is an ordinary JSON error; after
//! it, a failure cuts the stream off before its trailer.

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use super::Api;
use super::auth::Caller;
use super::error::{ApiError, ApiResult, ErrorBody};
use crate::backup::{self, ClusterInfo, Header, META_GROUP};
use crate::fsm::{AuditRecord, AuditTarget, Command};
use crate::node::NodeError;

/// Backups streaming from this node.
static STREAMING: Semaphore = Semaphore::const_new(backup::MAX_CONCURRENT_BACKUPS);

/// The backup file as the OpenAPI document describes it: bytes.
#[derive(utoipa::ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)] // a schema only: the body is streamed, never built
pub struct BackupFile(Vec<u8>);

/// `GET /admin/backup`: the backup file, streamed.
#[utoipa::path(
    get,
    path = "/admin/backup",
    responses(
        (status = 200, description = "The backup (format: `docs/recovery.md`), streamed as it is encoded from one consistent copy of each group; a body that ends before its trailer, or with a cut connection, is not a backup. `x-godel-backup-index` names the meta group's applied log index", content_type = "application/octet-stream", body = BackupFile),
        (status = 429, description = "This node already streams its most backups at once", body = ErrorBody),
    )
)]
pub async fn download(State(api): State<Api>, caller: Caller) -> ApiResult<Response> {
    let permit = STREAMING.try_acquire().map_err(|_| {
        ApiError::rate_limited(format!(
            "{} backups are already streaming from this node; try again when one ends",
            backup::MAX_CONCURRENT_BACKUPS
        ))
    })?;
    api.node.read_barrier().await?;
    let record = AuditRecord {
        caller: caller.audit_caller(),
        target: Some(AuditTarget::text(format!("backup/{}", META_GROUP.1))),
        // Written before the copy (so the backup holds its own record):
        // whether the stream then completes, the client's file says.
        outcome: "started".into(),
    };
    super::outcome(api.node.write(Command::Audit(record)).await)?;
    api.node.read_barrier().await?;
    // Each queue shard's group too (none with one shard), each after a
    // read barrier of its own: every section is consistent at its own
    // applied index.
    let mut states = vec![(
        META_GROUP.0,
        META_GROUP.1.to_owned(),
        api.node.state().clone(),
    )];
    // The cluster's shards: not one this node hosts ahead of an add
    // (`docs/shards.md`) that the cluster does not have yet.
    let hosted = api.node.shard_groups();
    let count = match api.node.state().read(|s| s.shard_count()) as usize {
        0 => hosted.len(),
        n => n.min(hosted.len()),
    };
    for group in &hosted[..count] {
        api.node.read_barrier_of(group.id()).await?;
        states.push((
            group.id(),
            format!("shard-{}", group.id()),
            group.state().clone(),
        ));
    }
    let groups = tokio::task::spawn_blocking(move || {
        states
            .iter()
            .map(|(id, name, state)| backup::capture_group(*id, name, state))
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| NodeError::Internal(format!("copying the state machine: {e}")))?;
    let applied = groups[0].meta()?.applied;
    for g in &groups[1..] {
        g.meta()?;
    }
    let header = Header::new(cluster_info(&api), &groups);
    let (stream, producer) =
        backup::stream_backup(header, groups, api.node.shutdown_token().clone(), permit);
    api.node.spawn(producer);
    tracing::info!(actor = %caller.actor(), %applied, "backup started");
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"godel-{}.backup\"", applied.index),
            ),
            (header::CACHE_CONTROL, "no-store".to_owned()),
            (
                header::HeaderName::from_static("x-godel-backup-index"),
                applied.index.to_string(),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// The cluster as this node sees it.
fn cluster_info(api: &Api) -> ClusterInfo {
    let term = api.node.raft().metrics().borrow().current_term;
    ClusterInfo {
        source: "api".into(),
        node: Some(api.node.id()),
        leader: api.node.leader().map(|(id, _)| id),
        term: Some(term),
        members: api.node.members().1,
    }
}
