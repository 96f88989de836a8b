//! A queue shard's own placement (`docs/shards.md`, "Placement and
//! regions"): `PUT` and `DELETE /shards/{id}/placement`. The cluster's
//! `shard_placement` applies to every shard without one.

use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::Api;
use super::auth::Caller;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::json::Body;
use crate::fsm::{AuditTarget, Command, ShardPlacement, ShardRule};

/// `PUT /shards/{id}/placement` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlacementBody {
    /// `auto`, `every`, `spread` or `regional`.
    #[schema(pattern = "^(auto|every|spread|regional)$")]
    placement: String,
    /// With `regional`: the region its voters go to (one the cluster has
    /// nodes in). Without it, the shard's turn among the regions.
    #[serde(default)]
    home: Option<String>,
}

/// A queue shard's placement.
#[derive(Debug, Serialize, ToSchema)]
pub struct PlacementView {
    shard: u32,
    /// Where its voters go.
    placement: String,
    /// Its home region, with `regional`.
    home: Option<String>,
    /// Whether it has a placement of its own (else the cluster's).
    own: bool,
}

/// The shard a path names: a number; one the cluster lacks is a 404 from
/// the state machine.
fn parse_shard(s: &str) -> ApiResult<u32> {
    s.parse()
        .map_err(|_| ApiError::not_found(format!("no queue shard `{s}`")))
}

/// `PUT /shards/{id}/placement`: where shard `id`'s voters go from now on;
/// its leader moves them, one membership change at a time.
#[utoipa::path(
    put,
    path = "/shards/{id}/placement",
    params(("id" = u32, Path, minimum = 1, maximum = 64, description = "Queue shard")),
    request_body = PlacementBody,
    responses(
        (status = 200, description = "The shard's placement", body = PlacementView),
        (status = 400, description = "A home with a placement other than `regional`, or a region no node is in", body = ErrorBody),
        (status = 404, description = "The cluster has no such queue shard", body = ErrorBody),
    )
)]
pub async fn place(
    State(api): State<Api>,
    caller: Caller,
    Path(id): Path<String>,
    Body(b): Body<PlacementBody>,
) -> ApiResult<Json<PlacementView>> {
    let shard = parse_shard(&id)?;
    let placement: ShardPlacement = b
        .placement
        .parse()
        .map_err(|e: String| ApiError::invalid(format!("invalid field `placement`: {e}")))?;
    let rule = ShardRule {
        placement,
        home: b.home,
    };
    let cmd = Command::PlaceShard {
        shard,
        rule: Some(rule.clone()),
    };
    let target = AuditTarget::text(format!("shard/{shard}"));
    api.write_as(&caller, cmd, Some(target)).await?;
    Ok(Json(PlacementView {
        shard,
        placement: rule.placement.to_string(),
        home: rule.home,
        own: true,
    }))
}

/// `DELETE /shards/{id}/placement`: shard `id` follows the cluster's
/// `shard_placement` again.
#[utoipa::path(
    delete,
    path = "/shards/{id}/placement",
    params(("id" = u32, Path, minimum = 1, maximum = 64, description = "Queue shard")),
    responses(
        (status = 200, description = "The shard's placement: the cluster's", body = PlacementView),
        (status = 404, description = "The cluster has no such queue shard", body = ErrorBody),
    )
)]
pub async fn unplace(
    State(api): State<Api>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<PlacementView>> {
    let shard = parse_shard(&id)?;
    let cmd = Command::PlaceShard { shard, rule: None };
    let target = AuditTarget::text(format!("shard/{shard}"));
    api.write_as(&caller, cmd, Some(target)).await?;
    let placement = api.node.state().read(|s| s.shard_placement());
    Ok(Json(PlacementView {
        shard,
        placement: placement.to_string(),
        home: None,
        own: false,
    }))
}
