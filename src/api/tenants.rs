//! Tenant endpoints (admin): records with a round-robin weight and a quota
//! (most unfinished tasks, request rate per node). A tenant without a
//! record works with the defaults; deleting a record is refused while the
//! tenant has live keys or unfinished tasks.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::Caller;
use super::error::{ApiError, ApiResult};
use super::json::Body;
use super::{Api, unexpected};
use crate::clock;
use crate::fsm::{AuditTarget, Command, Reply, State as Fsm, Tenant, TenantPatch, TenantRecord};

/// `POST /tenants` and `PATCH /tenants/{tenant}` body. In a patch, an
/// absent field is left as it is and `null` clears a limit.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantBody {
    /// The tenant (create only).
    name: Option<String>,
    weight: Option<u32>,
    #[serde(default, deserialize_with = "present")]
    max_queued: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    rate_per_second: Option<Option<u32>>,
    #[serde(default, deserialize_with = "present")]
    burst: Option<Option<u32>>,
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

impl TenantBody {
    fn patch(&self) -> TenantPatch {
        TenantPatch {
            weight: self.weight,
            max_queued: self.max_queued,
            rate_per_second: self.rate_per_second,
            burst: self.burst,
        }
    }
}

/// A tenant record as the API shows it.
pub fn tenant_view(r: &TenantRecord, weight: u32, queued: Option<u64>) -> Value {
    let mut v = json!({
        "name": r.name.0,
        "weight": weight,
        "max_queued": r.settings.max_queued,
        "rate_per_second": r.settings.rate_per_second,
        "burst": r.settings.burst,
        "created_at": clock::rfc3339(r.created_at_ms),
        "updated_at": clock::rfc3339(r.updated_at_ms),
    });
    if let Some(q) = queued {
        v["queued"] = json!(q);
    }
    v
}

fn tenant_reply(reply: Reply) -> ApiResult<Value> {
    match reply {
        Reply::Tenant { record, weight } => Ok(tenant_view(&record, weight, None)),
        other => Err(unexpected(other)),
    }
}

fn parse_tenant(s: &str) -> ApiResult<Tenant> {
    let t = Tenant(s.to_owned());
    t.validate()
        .map_err(|p| ApiError::invalid(format!("invalid field `tenant`: {p}")))?;
    Ok(t)
}

/// `POST /tenants`: 201 with the record; 409 if it exists.
pub async fn create(
    State(api): State<Api>,
    caller: Caller,
    Body(b): Body<TenantBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let name = b
        .name
        .as_deref()
        .ok_or_else(|| ApiError::invalid("missing field `name`"))?;
    let tenant = parse_tenant(name)?;
    let cmd = Command::CreateTenant {
        tenant: tenant.clone(),
        patch: b.patch(),
    };
    let reply = api
        .write_as(
            &caller,
            cmd,
            Some(AuditTarget::text(format!("tenant/{tenant}"))),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(tenant_reply(reply)?)))
}

/// `PATCH /tenants/{tenant}`: changes the named settings.
pub async fn update(
    State(api): State<Api>,
    caller: Caller,
    Path(name): Path<String>,
    Body(b): Body<TenantBody>,
) -> ApiResult<Json<Value>> {
    let tenant = parse_tenant(&name)?;
    if b.name.as_ref().is_some_and(|n| *n != name) {
        return Err(ApiError::invalid(
            "invalid field `name`: a tenant cannot be renamed",
        ));
    }
    let cmd = Command::UpdateTenant {
        tenant: tenant.clone(),
        patch: b.patch(),
    };
    let reply = api
        .write_as(
            &caller,
            cmd,
            Some(AuditTarget::text(format!("tenant/{tenant}"))),
        )
        .await?;
    Ok(Json(tenant_reply(reply)?))
}

/// `PUT /tenants/{tenant}/weight`: the weight alone (creates the record if
/// there is none).
pub async fn set_weight(
    State(api): State<Api>,
    caller: Caller,
    Path(name): Path<String>,
    Body(b): Body<WeightBody>,
) -> ApiResult<Json<Value>> {
    let tenant = parse_tenant(&name)?;
    let cmd = Command::SetTenantWeight {
        tenant: tenant.clone(),
        weight: b.weight,
    };
    api.write_as(
        &caller,
        cmd,
        Some(AuditTarget::text(format!("tenant/{tenant}"))),
    )
    .await?;
    Ok(Json(json!({ "tenant": tenant.0, "weight": b.weight })))
}

/// `PUT /tenants/{tenant}/weight` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightBody {
    weight: u32,
}

/// `DELETE /tenants/{tenant}`.
pub async fn remove(
    State(api): State<Api>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let tenant = parse_tenant(&name)?;
    let cmd = Command::DeleteTenant {
        tenant: tenant.clone(),
    };
    api.write_as(
        &caller,
        cmd,
        Some(AuditTarget::text(format!("tenant/{tenant}"))),
    )
    .await?;
    Ok(Json(json!({ "deleted": tenant.0 })))
}

fn view_of(s: &Fsm, r: &TenantRecord) -> Value {
    let weight = s.tenant_weights().get(&r.name).copied().unwrap_or(1);
    tenant_view(r, weight, Some(s.queued_of(&r.name)))
}

/// `GET /tenants`: every record, with its unfinished tasks.
pub async fn list(State(api): State<Api>) -> ApiResult<Json<Value>> {
    api.node.read_barrier().await?;
    let items: Vec<Value> = api
        .node
        .state()
        .read(|s| s.auth().tenants().map(|r| view_of(s, r)).collect());
    Ok(Json(json!({ "items": items })))
}

/// `GET /tenants/{tenant}`.
pub async fn get(State(api): State<Api>, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    let tenant = parse_tenant(&name)?;
    api.node.read_barrier().await?;
    api.node
        .state()
        .read(|s| s.auth().tenant(&tenant).map(|r| view_of(s, r)))
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("tenant `{tenant}` has no record")))
}
