//! Feature flags: `GET /flags`, `PUT /flags/{name}`, `DELETE
//! /flags/{name}`. A flag is on for the work it matches (a tenant, a
//! capability, a gateway kind or model, a share of the tasks); each attempt
//! hands the names of the flags on for its task to the gateway, and a
//! worker gets them with its lease (`fsm::FeatureFlag`). The meta group
//! keeps them, audited.

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
use crate::fsm::{AuditTarget, Command, FeatureFlag, Tenant};

/// A feature flag as the API shows it.
#[derive(Serialize, ToSchema)]
pub struct FlagView {
    /// Its name.
    name: String,
    /// On or off.
    enabled: bool,
    /// Only this tenant's tasks (`null`: every tenant's).
    tenant: Option<String>,
    /// Only tasks that need this capability (`null`: any).
    capability: Option<String>,
    /// Only on agents of gateways of this driver kind (`null`: any).
    gateway_kind: Option<String>,
    /// Only on agents of gateways that declare this model (`null`: any).
    model: Option<String>,
    /// The share of the matching work it is on for, 1 to 100 (`null`: all).
    percent: Option<u8>,
    /// What it is for.
    description: Option<String>,
    /// Who set it last.
    set_by: String,
    /// When.
    #[schema(format = DateTime)]
    set_at: String,
}

impl FlagView {
    fn of(name: &str, f: &FeatureFlag) -> Self {
        FlagView {
            name: name.to_owned(),
            enabled: f.enabled,
            tenant: f.tenant.as_ref().map(|t| t.to_string()),
            capability: f.capability.clone(),
            gateway_kind: f.gateway_kind.clone(),
            model: f.model.clone(),
            percent: f.percent,
            description: f.description.clone(),
            set_by: f.by.clone(),
            set_at: clock::rfc3339(f.at_ms),
        }
    }
}

/// `GET /flags` answer.
#[derive(Serialize, ToSchema)]
pub struct FlagsView {
    items: Vec<FlagView>,
}

/// `PUT /flags/{name}` body: the whole flag (it replaces any flag of that
/// name). Every scope field left out matches all.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FlagBody {
    /// On or off (required: a PUT says the whole flag).
    enabled: bool,
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
    /// Only this share of the matching work, 1 to 100: by a hash of the
    /// flag's name and the task's session (tenant and key) or, without a
    /// key, its id, so every turn of a conversation sees the same flags.
    #[schema(minimum = 1, maximum = 100)]
    percent: Option<u8>,
    /// What it is for.
    #[schema(max_length = 4096)]
    description: Option<String>,
}

/// The flag's name in the path.
#[derive(Debug, Deserialize, IntoParams)]
pub struct FlagName {
    /// Its name (`A-Z a-z 0-9 . _ : / -`, 1 to 256).
    #[param(pattern = "^[A-Za-z0-9._:/-]{1,256}$")]
    name: String,
}

/// `GET /flags`: every feature flag, on or off.
#[utoipa::path(
    get,
    path = "/flags",
    responses((status = 200, description = "The feature flags", body = FlagsView))
)]
pub async fn list(State(api): State<Api>) -> ApiResult<Json<FlagsView>> {
    api.node.read_barrier().await?;
    let items = api
        .node
        .state()
        .read(|s| s.flags().iter().map(|(n, f)| FlagView::of(n, f)).collect());
    Ok(Json(FlagsView { items }))
}

/// `PUT /flags/{name}`: sets (or replaces) a feature flag. Attempts that
/// start after this returns see it.
#[utoipa::path(
    put,
    path = "/flags/{name}",
    params(FlagName),
    request_body = FlagBody,
    responses(
        (status = 200, description = "The flag", body = FlagView),
        (status = 400, description = "A bad scope or share", body = ErrorBody),
    )
)]
pub async fn set(
    State(api): State<Api>,
    caller: Caller,
    Path(FlagName { name }): Path<FlagName>,
    Body(b): Body<FlagBody>,
) -> ApiResult<Json<FlagView>> {
    let flag = FeatureFlag {
        enabled: b.enabled,
        tenant: b.tenant.map(Tenant::from),
        capability: b.capability,
        gateway_kind: b.gateway_kind,
        model: b.model,
        percent: b.percent,
        description: b.description,
        by: caller.actor().to_string(),
        at_ms: 0,
    };
    let target = Some(AuditTarget::text(format!("flag/{name}")));
    let cmd = Command::SetFlag {
        name: name.clone(),
        flag: Some(flag),
    };
    api.write_as(&caller, cmd, target).await?;
    // Written through the leader: this node's replica reads it once it
    // has applied as far.
    api.node.read_barrier().await?;
    let view = api
        .node
        .state()
        .read(|s| s.flags().get(&name).map(|f| FlagView::of(&name, f)));
    view.map(Json)
        .ok_or_else(|| ApiError::unavailable("the flag was removed meanwhile"))
}

/// `DELETE /flags/{name}`: removes a feature flag.
#[utoipa::path(
    delete,
    path = "/flags/{name}",
    params(FlagName),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "No such flag", body = ErrorBody),
    )
)]
pub async fn remove(
    State(api): State<Api>,
    caller: Caller,
    Path(FlagName { name }): Path<FlagName>,
) -> ApiResult<StatusCode> {
    api.node.read_barrier().await?;
    if api.node.state().read(|s| !s.flags().contains_key(&name)) {
        return Err(ApiError::not_found(format!("no feature flag `{name}`")));
    }
    let target = Some(AuditTarget::text(format!("flag/{name}")));
    let cmd = Command::SetFlag { name, flag: None };
    api.write_as(&caller, cmd, target).await?;
    Ok(StatusCode::NO_CONTENT)
}
