//! Kill switches: `GET /switches`, `PUT /switches/{name}`, `DELETE
//! /switches/{name}`. A switch stops dispatch of the work it matches (a
//! tenant, a capability, a share of the tasks, or these together) at once:
//! matching ready tasks are held, still `pending`, until it is lifted. A
//! switch that names a gateway kind or a model stops that work on the
//! agents of such gateways only (other agents may take it). With
//! `cancel_leased`, matching leased work is cancelled, else it finishes. The meta group keeps the
//! record (audited); every queue shard takes a copy by revision
//! (`SyncShard`), since it holds the work.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::Caller;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::json::Body;
use super::{Api, view};
use crate::clock;
use crate::fsm::{AuditTarget, Command, KillSwitch, Tenant};

/// A kill switch as the API shows it.
#[derive(Serialize, ToSchema)]
pub struct SwitchView {
    /// Its name.
    name: String,
    /// Only this tenant's tasks (`null`: every tenant's).
    tenant: Option<String>,
    /// Only tasks that need this capability (`null`: any).
    capability: Option<String>,
    /// Only on agents of gateways of this driver kind (`null`: any).
    gateway_kind: Option<String>,
    /// Only on agents of gateways that declare this model (`null`: any).
    model: Option<String>,
    /// The share of the matching tasks it stops, 1 to 100 (`null`: all).
    percent: Option<u8>,
    /// With a gateway kind or model: the gateways it matched when set.
    gateways: Vec<String>,
    /// Whether matching leased work was cancelled when it was set.
    cancel_leased: bool,
    /// Why.
    reason: Option<String>,
    /// Who set it.
    set_by: String,
    /// When.
    #[schema(format = DateTime)]
    set_at: String,
}

impl SwitchView {
    fn of(name: &str, s: &KillSwitch) -> Self {
        SwitchView {
            name: name.to_owned(),
            tenant: s.tenant.as_ref().map(|t| t.to_string()),
            capability: s.capability.clone(),
            gateway_kind: s.gateway_kind.clone(),
            model: s.model.clone(),
            percent: s.percent,
            gateways: s.gateways.iter().map(|g| g.0.clone()).collect(),
            cancel_leased: s.cancel_leased,
            reason: s.reason.clone(),
            set_by: s.by.clone(),
            set_at: clock::rfc3339(s.at_ms),
        }
    }
}

/// `GET /switches` answer.
#[derive(Serialize, ToSchema)]
pub struct SwitchesView {
    items: Vec<SwitchView>,
}

/// `PUT /switches/{name}` body: what it stops (at least one of `tenant`,
/// `capability`, `gateway_kind`, `model` and `percent`; a switch that
/// stops everything names none and says `all`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SwitchBody {
    /// Only this tenant's tasks.
    #[schema(schema_with = view::opt_name_schema)]
    tenant: Option<String>,
    /// Only tasks that need this capability.
    #[schema(schema_with = view::opt_name_schema)]
    capability: Option<String>,
    /// Only on agents of gateways of this driver kind.
    #[schema(value_type = Option<String>, pattern = "^(sim|command|http|openclaw)$")]
    gateway_kind: Option<String>,
    /// Only on agents of gateways that declare this model.
    #[schema(schema_with = view::opt_name_schema)]
    model: Option<String>,
    /// Only this share of the matching tasks, 1 to 100 (a task is in it by
    /// a hash of its id and the switch's name).
    #[schema(minimum = 1, maximum = 100)]
    percent: Option<u8>,
    /// Stop every task (required, and alone, to match all work).
    #[serde(default)]
    all: bool,
    /// Cancel matching tasks already leased (default: let them finish).
    #[serde(default)]
    cancel_leased: bool,
    /// Why, for the record.
    reason: Option<String>,
}

/// The switch's name in the path.
#[derive(Debug, Deserialize, IntoParams)]
pub struct SwitchName {
    /// Its name (`A-Z a-z 0-9 . _ : / -`, 1 to 256).
    #[param(pattern = "^[A-Za-z0-9._:/-]{1,256}$")]
    name: String,
}

/// `GET /switches`: the kill switches that are on.
#[utoipa::path(
    get,
    path = "/switches",
    responses((status = 200, description = "The switches that are on", body = SwitchesView))
)]
pub async fn list(State(api): State<Api>) -> ApiResult<Json<SwitchesView>> {
    api.node.read_barrier().await?;
    let items = api.node.state().read(|s| {
        s.switches()
            .iter()
            .map(|(n, sw)| SwitchView::of(n, sw))
            .collect()
    });
    Ok(Json(SwitchesView { items }))
}

/// `PUT /switches/{name}`: sets (or replaces) a kill switch. Matching ready
/// work stops being leased as soon as this returns.
#[utoipa::path(
    put,
    path = "/switches/{name}",
    params(SwitchName),
    request_body = SwitchBody,
    responses(
        (status = 200, description = "The switch, on", body = SwitchView),
        (status = 400, description = "It matches nothing, or everything without `all`", body = ErrorBody),
    )
)]
pub async fn set(
    State(api): State<Api>,
    caller: Caller,
    Path(SwitchName { name }): Path<SwitchName>,
    Body(b): Body<SwitchBody>,
) -> ApiResult<Json<SwitchView>> {
    let narrowed = b.tenant.is_some()
        || b.capability.is_some()
        || b.gateway_kind.is_some()
        || b.model.is_some()
        || b.percent.is_some();
    if narrowed == b.all {
        return Err(ApiError::invalid(
            "a switch names some of `tenant`, `capability`, `gateway_kind`, `model` and `percent`; to stop all work say `all: true` alone",
        ));
    }
    let switch = KillSwitch {
        tenant: b.tenant.map(Tenant::from),
        capability: b.capability,
        cancel_leased: b.cancel_leased,
        reason: b.reason,
        by: caller.actor().to_string(),
        at_ms: 0,
        gateway_kind: b.gateway_kind,
        model: b.model,
        percent: b.percent,
        gateways: Vec::new(),
    };
    spread(&api, &caller, &name, Some(switch)).await?;
    let view = api
        .node
        .state()
        .read(|s| s.switches().get(&name).map(|sw| SwitchView::of(&name, sw)));
    view.map(Json)
        .ok_or_else(|| ApiError::unavailable("the switch was lifted meanwhile"))
}

/// `DELETE /switches/{name}`: lifts a kill switch; held work is ready again.
#[utoipa::path(
    delete,
    path = "/switches/{name}",
    params(SwitchName),
    responses(
        (status = 204, description = "Lifted"),
        (status = 404, description = "No such switch", body = ErrorBody),
    )
)]
pub async fn lift(
    State(api): State<Api>,
    caller: Caller,
    Path(SwitchName { name }): Path<SwitchName>,
) -> ApiResult<StatusCode> {
    api.node.read_barrier().await?;
    if api.node.state().read(|s| !s.switches().contains_key(&name)) {
        return Err(ApiError::not_found(format!("no kill switch `{name}`")));
    }
    spread(&api, &caller, &name, None).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Writes the switch to the meta group (the record), then brings every
/// queue shard routed to up to it (they hold the work).
async fn spread(
    api: &Api,
    caller: &Caller,
    name: &str,
    switch: Option<KillSwitch>,
) -> ApiResult<()> {
    let target = Some(AuditTarget::text(format!("switch/{name}")));
    let cmd = Command::SetSwitch {
        name: name.to_owned(),
        switch,
    };
    api.write_as(caller, cmd, target.clone()).await?;
    api.sync_shards(caller, target).await
}
