//! Tenant endpoints (admin): records with a round-robin weight and a quota
//! (most unfinished tasks, request rate per node). A tenant without a
//! record works with the defaults; deleting a record is refused while the
//! tenant has live keys or unfinished tasks.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::Caller;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::json::Body;
use super::{Api, unexpected};
use crate::clock;
use crate::fsm::{
    AuditTarget, Budget, Command, Reply, State as Fsm, Tenant, TenantPatch, TenantRecord,
};

/// `POST /tenants` body: the name and any settings.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantCreate {
    /// The tenant.
    #[schema(schema_with = super::view::name_schema)]
    name: String,
    /// Round-robin weight, 1 to 1000 (default 1).
    #[schema(minimum = 1, maximum = 1000)]
    weight: Option<u32>,
    /// Most unfinished tasks; `null` or absent: no limit.
    max_queued: Option<u64>,
    /// Requests per second per node; `null` or absent: the node's default.
    #[schema(minimum = 1)]
    rate_per_second: Option<u32>,
    /// Rate bucket size per node; `null` or absent: the node's default.
    #[schema(minimum = 1)]
    burst: Option<u32>,
    /// Spending limits; `null` or absent: none.
    budget: Option<BudgetBody>,
}

/// A tenant's spending limits per UTC day and calendar month: tokens (in
/// and out) and cost in USD at the nodes' `[prices]`. Past a limit, new
/// tasks are refused (429, code `budget`) until the period ends; running
/// ones finish. Past `soft_percent` of a limit, the metric
/// `godel_tenant_budget_used_ratio` crosses `godel_tenant_budget_soft_ratio`
/// (the shipped rule `GodelTenantBudgetSoftLimit` alerts).
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BudgetBody {
    /// Tokens a day.
    #[schema(minimum = 1)]
    daily_tokens: Option<u64>,
    /// Tokens a month.
    #[schema(minimum = 1)]
    monthly_tokens: Option<u64>,
    /// USD a day.
    #[schema(exclusive_minimum = 0.0, maximum = 1000000000.0)]
    daily_cost_usd: Option<f64>,
    /// USD a month.
    #[schema(exclusive_minimum = 0.0, maximum = 1000000000.0)]
    monthly_cost_usd: Option<f64>,
    /// The share of a limit, in percent, from which it alerts (default 80).
    #[schema(minimum = 1, maximum = 100)]
    soft_percent: Option<u8>,
}

impl BudgetBody {
    fn budget(&self) -> ApiResult<Budget> {
        let micros = |field: &str, usd: Option<f64>| -> ApiResult<Option<u64>> {
            match usd {
                None => Ok(None),
                Some(v) if v.is_finite() && v > 0.0 && v <= 1e9 => {
                    Ok(Some(((v * 1e6).round() as u64).max(1)))
                }
                Some(v) => Err(ApiError::invalid(format!(
                    "invalid field `budget.{field}`: {v} is not a cost in USD (> 0, at most 1e9)"
                ))),
            }
        };
        let b = Budget {
            daily_tokens: self.daily_tokens,
            monthly_tokens: self.monthly_tokens,
            daily_cost_micros: micros("daily_cost_usd", self.daily_cost_usd)?,
            monthly_cost_micros: micros("monthly_cost_usd", self.monthly_cost_usd)?,
            soft_percent: self.soft_percent.unwrap_or(80),
        };
        b.check()
            .map_err(|p| ApiError::invalid(format!("invalid field `budget`: {p}")))?;
        Ok(b)
    }

    /// The view of a stored budget.
    fn of(b: &Budget) -> Self {
        let usd = |m: Option<u64>| m.map(|m| m as f64 / 1e6);
        BudgetBody {
            daily_tokens: b.daily_tokens,
            monthly_tokens: b.monthly_tokens,
            daily_cost_usd: usd(b.daily_cost_micros),
            monthly_cost_usd: usd(b.monthly_cost_micros),
            soft_percent: Some(b.soft_percent),
        }
    }
}

/// `PATCH /tenants/{tenant}` body: an absent field is left as it is, and
/// `null` clears a limit.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantBody {
    /// Not part of the documented body: a tenant cannot be renamed, and
    /// the tenant's own name is accepted for older clients.
    #[schema(ignore)]
    name: Option<String>,
    /// Round-robin weight, 1 to 1000 (default 1).
    #[schema(minimum = 1, maximum = 1000)]
    weight: Option<u32>,
    /// Most unfinished tasks; `null`: no limit.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u64>)]
    max_queued: Option<Option<u64>>,
    /// Requests per second per node; `null`: the node's default.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u32>, minimum = 1)]
    rate_per_second: Option<Option<u32>>,
    /// Rate bucket size per node; `null`: the node's default.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u32>, minimum = 1)]
    burst: Option<Option<u32>>,
    /// Spending limits (replaced whole); `null`: none.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<BudgetBody>)]
    budget: Option<Option<BudgetBody>>,
}

/// A field that is present (`Some`), possibly `null` (`Some(None)`);
/// absent fields stay `None` through `#[serde(default)]`.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

impl TenantCreate {
    fn patch(&self) -> ApiResult<TenantPatch> {
        Ok(TenantPatch {
            weight: self.weight,
            max_queued: Some(self.max_queued),
            rate_per_second: Some(self.rate_per_second),
            burst: Some(self.burst),
            budget: Some(self.budget.as_ref().map(BudgetBody::budget).transpose()?),
        })
    }
}

impl TenantBody {
    fn patch(&self) -> ApiResult<TenantPatch> {
        let budget = match &self.budget {
            None => None,
            Some(b) => Some(b.as_ref().map(BudgetBody::budget).transpose()?),
        };
        Ok(TenantPatch {
            weight: self.weight,
            max_queued: self.max_queued,
            rate_per_second: self.rate_per_second,
            burst: self.burst,
            budget,
        })
    }
}

/// A tenant record as the API shows it.
#[derive(Serialize, ToSchema)]
#[schema(as = Tenant)]
pub struct TenantView {
    name: String,
    weight: u32,
    max_queued: Option<u64>,
    rate_per_second: Option<u32>,
    burst: Option<u32>,
    /// Spending limits, if any.
    budget: Option<BudgetBody>,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    updated_at: String,
    /// Its unfinished tasks (reads only).
    #[serde(skip_serializing_if = "Option::is_none")]
    queued: Option<u64>,
}

/// The view of a tenant record.
pub fn tenant_view(r: &TenantRecord, weight: u32, queued: Option<u64>) -> TenantView {
    TenantView {
        name: r.name.to_string(),
        weight,
        max_queued: r.settings.max_queued,
        rate_per_second: r.settings.rate_per_second,
        burst: r.settings.burst,
        budget: r.settings.budget.as_ref().map(BudgetBody::of),
        created_at: clock::rfc3339(r.created_at_ms),
        updated_at: clock::rfc3339(r.updated_at_ms),
        queued,
    }
}

/// `GET /tenants` answer.
#[derive(Serialize, ToSchema)]
pub struct TenantsView {
    items: Vec<TenantView>,
}

/// `PUT /tenants/{tenant}/weight` answer.
#[derive(Serialize, ToSchema)]
pub struct WeightView {
    tenant: String,
    weight: u32,
}

/// `DELETE /tenants/{tenant}` answer.
#[derive(Serialize, ToSchema)]
pub struct DeletedView {
    /// The tenant whose record was deleted.
    deleted: String,
}

fn tenant_reply(reply: Reply) -> ApiResult<TenantView> {
    match reply {
        Reply::Tenant { record, weight } => Ok(tenant_view(&record, weight, None)),
        other => Err(unexpected(other)),
    }
}

fn parse_tenant(s: &str) -> ApiResult<Tenant> {
    let t = Tenant::from(s);
    t.validate()
        .map_err(|p| ApiError::invalid(format!("invalid field `tenant`: {p}")))?;
    Ok(t)
}

/// `POST /tenants`: 201 with the record; 409 if it exists.
#[utoipa::path(
    post,
    path = "/tenants",
    request_body = TenantCreate,
    responses((status = 201, description = "Created", body = TenantView))
)]
pub async fn create(
    State(api): State<Api>,
    caller: Caller,
    Body(b): Body<TenantCreate>,
) -> ApiResult<(StatusCode, Json<TenantView>)> {
    let tenant = parse_tenant(&b.name)?;
    let cmd = Command::CreateTenant {
        tenant: tenant.clone(),
        patch: b.patch()?,
    };
    let reply = api
        .write_as(
            &caller,
            cmd,
            Some(AuditTarget::text(format!("tenant/{tenant}"))),
        )
        .await?;
    spread_weight(&api, &caller, &tenant, b.weight).await?;
    Ok((StatusCode::CREATED, Json(tenant_reply(reply)?)))
}

/// `PATCH /tenants/{tenant}`: changes the named settings.
#[utoipa::path(
    patch,
    path = "/tenants/{tenant}",
    params(("tenant" = String, Path, pattern = "^[A-Za-z0-9._:/-]{1,256}$", description = "Tenant name")),
    request_body(content = Option<TenantBody>, description = "Optional: absent changes nothing"),
    responses((status = 200, description = "The record after the change", body = TenantView))
)]
pub async fn update(
    State(api): State<Api>,
    caller: Caller,
    Path(name): Path<String>,
    Body(b): Body<TenantBody>,
) -> ApiResult<Json<TenantView>> {
    let tenant = parse_tenant(&name)?;
    if b.name.as_ref().is_some_and(|n| *n != name) {
        return Err(ApiError::invalid(
            "invalid field `name`: a tenant cannot be renamed",
        ));
    }
    let cmd = Command::UpdateTenant {
        tenant: tenant.clone(),
        patch: b.patch()?,
    };
    let reply = api
        .write_as(
            &caller,
            cmd,
            Some(AuditTarget::text(format!("tenant/{tenant}"))),
        )
        .await?;
    spread_weight(&api, &caller, &tenant, b.weight).await?;
    Ok(Json(tenant_reply(reply)?))
}

/// `PUT /tenants/{tenant}/weight`: the weight alone (creates the record if
/// there is none).
#[utoipa::path(
    put,
    path = "/tenants/{tenant}/weight",
    params(("tenant" = String, Path, pattern = "^[A-Za-z0-9._:/-]{1,256}$", description = "Tenant name")),
    request_body = WeightBody,
    responses((status = 200, description = "The weight set", body = WeightView))
)]
pub async fn set_weight(
    State(api): State<Api>,
    caller: Caller,
    Path(name): Path<String>,
    Body(b): Body<WeightBody>,
) -> ApiResult<Json<WeightView>> {
    let tenant = parse_tenant(&name)?;
    let cmd = Command::SetTenantWeight {
        tenant: tenant.clone(),
        weight: b.weight,
    };
    // The meta group keeps it for the tenant's view; the shards' dispatch
    // needs it too.
    let target = AuditTarget::text(format!("tenant/{tenant}"));
    api.write_as(&caller, cmd, Some(target)).await?;
    spread_weight(&api, &caller, &tenant, Some(b.weight)).await?;
    Ok(Json(WeightView {
        tenant: tenant.to_string(),
        weight: b.weight,
    }))
}

/// `PUT /tenants/{tenant}/weight` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WeightBody {
    /// Round-robin weight, 1 to 1000.
    #[schema(minimum = 1, maximum = 1000)]
    weight: u32,
}

/// `DELETE /tenants/{tenant}`.
#[utoipa::path(
    delete,
    path = "/tenants/{tenant}",
    params(("tenant" = String, Path, pattern = "^[A-Za-z0-9._:/-]{1,256}$", description = "Tenant name")),
    responses((status = 200, description = "Deleted", body = DeletedView))
)]
pub async fn remove(
    State(api): State<Api>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<DeletedView>> {
    let tenant = parse_tenant(&name)?;
    if !api.node.shard_groups().is_empty() {
        // The meta group counts no task with several shards: they do.
        let n = queued(&api).await?.get(&tenant).copied().unwrap_or(0);
        if n > 0 {
            return Err(ApiError::from(crate::fsm::Rejection::Conflict(format!(
                "tenant `{tenant}` has {n} unfinished tasks: drain them first"
            ))));
        }
    }
    let cmd = Command::DeleteTenant {
        tenant: tenant.clone(),
    };
    let target = AuditTarget::text(format!("tenant/{tenant}"));
    api.write_as(&caller, cmd, Some(target.clone())).await?;
    // Its weight goes back to the default in the shards too.
    api.sync_shards(&caller, Some(target)).await?;
    Ok(Json(DeletedView {
        deleted: tenant.to_string(),
    }))
}

fn view_of(s: &Fsm, r: &TenantRecord, queued: &BTreeMap<Tenant, u64>) -> TenantView {
    let weight = s.tenant_weights().get(&r.name).copied().unwrap_or(1);
    let queued = queued.get(&r.name).copied().unwrap_or(0);
    tenant_view(r, weight, Some(queued))
}

/// Every tenant's unfinished tasks over the queue groups (read after a
/// barrier on each).
async fn queued(api: &Api) -> ApiResult<BTreeMap<Tenant, u64>> {
    let mut out: BTreeMap<Tenant, u64> = BTreeMap::new();
    let per_group = api
        .read_queue(|s| {
            s.depth()
                .by_tenant
                .keys()
                .map(|t| (t.clone(), s.queued_of(t)))
                .collect::<Vec<_>>()
        })
        .await?;
    for (t, n) in per_group.into_iter().flatten() {
        *out.entry(t).or_default() += n;
    }
    Ok(out)
}

/// With several shards, a tenant's weight set in the meta group goes to
/// the shards' copies (their dispatch uses it).
async fn spread_weight(
    api: &Api,
    caller: &Caller,
    tenant: &Tenant,
    weight: Option<u32>,
) -> ApiResult<()> {
    if weight.is_none() {
        return Ok(());
    }
    let target = AuditTarget::text(format!("tenant/{tenant}"));
    api.sync_shards(caller, Some(target)).await
}

/// `GET /tenants`: every record, with its unfinished tasks.
#[utoipa::path(
    get,
    path = "/tenants",
    responses((status = 200, description = "Every tenant record", body = TenantsView))
)]
pub async fn list(State(api): State<Api>) -> ApiResult<Json<TenantsView>> {
    api.node.read_barrier().await?;
    let queued = queued(&api).await?;
    let items = api
        .node
        .state()
        .read(|s| s.auth().tenants().map(|r| view_of(s, r, &queued)).collect());
    Ok(Json(TenantsView { items }))
}

/// `GET /tenants/{tenant}`.
#[utoipa::path(
    get,
    path = "/tenants/{tenant}",
    params(("tenant" = String, Path, pattern = "^[A-Za-z0-9._:/-]{1,256}$", description = "Tenant name")),
    responses(
        (status = 200, description = "The record", body = TenantView),
        (status = 404, description = "The tenant has no record", body = ErrorBody),
    )
)]
pub async fn get(State(api): State<Api>, Path(name): Path<String>) -> ApiResult<Json<TenantView>> {
    let tenant = parse_tenant(&name)?;
    api.node.read_barrier().await?;
    let queued = queued(&api).await?;
    api.node
        .state()
        .read(|s| s.auth().tenant(&tenant).map(|r| view_of(s, r, &queued)))
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("tenant `{tenant}` has no record")))
}
