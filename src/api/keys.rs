//! Credential endpoints (admin): API keys (create, list, get, revoke) and
//! revoked JWT ids.
//!
//! A key is shown once, in the answer to its creation; the state keeps its
//! SHA-256 only. Revoking is idempotent and reaches every node as it
//! applies the entry (see `auth`: every cached credential is checked again
//! after a change).

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::{self, Caller};
use super::error::{ApiError, ApiResult, ErrorBody};
use super::json::{Body, Params};
use super::{Api, unexpected};
use crate::clock;
use crate::fsm::{ApiKeyId, ApiKeyRecord, AuditTarget, Command, NewApiKey, Reply, Role};

/// Longest `expires_in` a key may be given: ten years.
const MAX_KEY_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a JWT revocation is kept when the token's expiry is not
/// given: 30 days (longer-lived tokens must give `expires_at`).
const DEFAULT_JTI_KEEP: Duration = Duration::from_secs(30 * 24 * 3600);

/// `POST /api-keys` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyBody {
    /// What it is for (1 to 256 bytes, no control characters).
    #[schema(schema_with = super::view::text_schema)]
    name: String,
    role: Role,
    /// Defaults to the caller's tenant.
    #[schema(schema_with = super::view::opt_name_schema)]
    tenant: Option<String>,
    /// `"90d"`, `"12h"`: the key stops working after this long (1 s to 10
    /// years).
    #[schema(example = "90d", pattern = "^[1-9][0-9]{0,2}[smhd]$")]
    expires_in: Option<String>,
    /// A `dk_test_` key instead of `dk_live_` (same powers; marked as test).
    #[serde(default)]
    test: bool,
}

/// A key record as the API shows it (never the key, but in the answer to
/// its creation).
#[derive(Serialize, ToSchema)]
#[schema(as = ApiKey)]
pub struct KeyView {
    id: String,
    name: String,
    role: Role,
    tenant: String,
    /// The key's first characters, to recognise it.
    prefix: String,
    /// The actor that created it.
    created_by: String,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    expires_at: Option<String>,
    #[schema(format = DateTime)]
    revoked_at: Option<String>,
    #[schema(format = DateTime)]
    last_used_at: Option<String>,
    /// Neither revoked nor expired.
    live: bool,
    /// The key itself: only in the answer to `POST /api-keys`.
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
}

/// The view of a key record.
pub fn key_view(k: &ApiKeyRecord) -> KeyView {
    KeyView {
        id: k.id.0.clone(),
        name: k.name.clone(),
        role: k.role,
        tenant: k.tenant.to_string(),
        prefix: k.prefix.clone(),
        created_by: k.created_by.clone(),
        created_at: clock::rfc3339(k.created_at_ms),
        expires_at: k.expires_at_ms.map(clock::rfc3339),
        revoked_at: k.revoked_at_ms.map(clock::rfc3339),
        last_used_at: k.last_used_ms.map(clock::rfc3339),
        live: k.is_live(clock::now_ms()),
        key: None,
    }
}

/// A list of keys.
#[derive(Serialize, ToSchema)]
pub struct KeysView {
    items: Vec<KeyView>,
}

/// `POST /api-keys`: 201 with the record and, this once, the key.
#[utoipa::path(
    post,
    path = "/api-keys",
    request_body = KeyBody,
    responses((status = 201, description = "Created; `key` is shown this once", body = KeyView))
)]
pub async fn create(
    State(api): State<Api>,
    caller: Caller,
    Body(b): Body<KeyBody>,
) -> ApiResult<(StatusCode, Json<KeyView>)> {
    let tenant = caller.tenant_named(b.tenant)?;
    tenant
        .validate()
        .map_err(|p| ApiError::invalid(format!("invalid field `tenant`: {p}")))?;
    let expires_at_ms = match &b.expires_in {
        None => None,
        Some(text) => {
            let d = humantime::parse_duration(text)
                .map_err(|e| ApiError::invalid(format!("invalid field `expires_in`: {e}")))?;
            if d.is_zero() || d > MAX_KEY_LIFETIME {
                return Err(ApiError::invalid(
                    "invalid field `expires_in`: must be between 1s and 10 years",
                ));
            }
            Some(clock::now_ms().saturating_add(d.as_millis() as u64))
        }
    };
    let key = auth::generate_key(b.test);
    let id = ApiKeyId(format!("k_{:016x}", rand::random::<u64>()));
    let new = NewApiKey {
        id: id.clone(),
        name: b.name,
        role: b.role,
        tenant,
        hash: auth::hash_key(&key),
        prefix: auth::key_prefix(&key),
        expires_at_ms,
        created_by: caller.actor().to_string(),
    };
    let reply = api
        .write_as(
            &caller,
            Command::CreateApiKey(new),
            Some(AuditTarget::text(format!("api_key/{id}"))),
        )
        .await?;
    let Reply::ApiKey(rec) = reply else {
        return Err(unexpected(reply));
    };
    let mut view = key_view(&rec);
    view.key = Some(key);
    Ok((StatusCode::CREATED, Json(view)))
}

/// `GET /api-keys` filters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct KeyQuery {
    /// Only this tenant's keys.
    tenant: Option<String>,
    /// Only keys of this role.
    role: Option<Role>,
    /// Only live keys (`true`) or only revoked and expired ones (`false`).
    live: Option<bool>,
}

/// `GET /api-keys`: every key matching the filters, by id, without secrets.
#[utoipa::path(
    get,
    path = "/api-keys",
    params(KeyQuery),
    responses((status = 200, description = "The keys, by id", body = KeysView))
)]
pub async fn list(
    State(api): State<Api>,
    Params(q): Params<KeyQuery>,
) -> ApiResult<Json<KeysView>> {
    api.node.read_barrier().await?;
    let now = clock::now_ms();
    let items = api.node.state().read(|s| {
        s.auth()
            .keys()
            .filter(|k| {
                q.tenant
                    .as_ref()
                    .is_none_or(|t| k.tenant.as_str() == t.as_str())
            })
            .filter(|k| q.role.is_none_or(|r| k.role == r))
            .filter(|k| q.live.is_none_or(|l| k.is_live(now) == l))
            .map(|k| key_view(k))
            .collect()
    });
    Ok(Json(KeysView { items }))
}

/// `GET /api-keys/{id}`.
#[utoipa::path(
    get,
    path = "/api-keys/{id}",
    params(("id" = String, Path, description = "Key id (`k_...`)")),
    responses(
        (status = 200, description = "The key's record", body = KeyView),
        (status = 404, description = "No such key", body = ErrorBody),
    )
)]
pub async fn get(State(api): State<Api>, Path(id): Path<String>) -> ApiResult<Json<KeyView>> {
    api.node.read_barrier().await?;
    let id = ApiKeyId(id);
    api.node
        .state()
        .read(|s| s.auth().key(&id).map(|k| key_view(k)))
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("api key `{id}` not found")))
}

/// `DELETE /api-keys/{id}`: revokes the key (idempotent); the record stays,
/// for the audit trail.
#[utoipa::path(
    delete,
    path = "/api-keys/{id}",
    params(("id" = String, Path, description = "Key id (`k_...`)")),
    responses((status = 200, description = "The key's record, revoked", body = KeyView))
)]
pub async fn revoke(
    State(api): State<Api>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<KeyView>> {
    let id = ApiKeyId(id);
    let target = Some(AuditTarget::text(format!("api_key/{id}")));
    match api
        .write_as(&caller, Command::RevokeApiKey { id }, target)
        .await?
    {
        Reply::ApiKey(rec) => Ok(Json(key_view(&rec))),
        other => Err(unexpected(other)),
    }
}

/// `POST /jwt/revocations` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JtiBody {
    /// The token id: 1 to 256 bytes of UTF-8 (the schema counts
    /// characters, so a long non-ASCII id it allows may still be refused).
    #[schema(min_length = 1, max_length = 256)]
    jti: String,
    /// The token's expiry (RFC 3339); the revocation is kept until then.
    /// Default: 30 days from now.
    #[schema(format = DateTime)]
    expires_at: Option<String>,
}

/// A revoked token id.
#[derive(Serialize, ToSchema)]
pub struct JtiView {
    jti: String,
    /// Kept until then.
    #[schema(format = DateTime)]
    until: String,
}

/// A list of revoked token ids.
#[derive(Serialize, ToSchema)]
pub struct JtisView {
    items: Vec<JtiView>,
}

/// `POST /jwt/revocations`: tokens carrying this `jti` are refused on every
/// node from when it applies the entry.
#[utoipa::path(
    post,
    path = "/jwt/revocations",
    request_body = JtiBody,
    responses((status = 201, description = "Revoked", body = JtiView))
)]
pub async fn revoke_jwt(
    State(api): State<Api>,
    caller: Caller,
    Body(b): Body<JtiBody>,
) -> ApiResult<(StatusCode, Json<JtiView>)> {
    let until_ms = match &b.expires_at {
        Some(t) => clock::parse_rfc3339(t)
            .map_err(|e| ApiError::invalid(format!("invalid field `expires_at`: {e}")))?,
        None => clock::now_ms() + DEFAULT_JTI_KEEP.as_millis() as u64,
    };
    let cmd = Command::RevokeJti {
        jti: b.jti.clone(),
        until_ms,
    };
    api.write_as(
        &caller,
        cmd,
        Some(AuditTarget::text(format!("jwt/{}", b.jti))),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(JtiView {
            jti: b.jti,
            until: clock::rfc3339(until_ms),
        }),
    ))
}

/// `GET /jwt/revocations`.
#[utoipa::path(
    get,
    path = "/jwt/revocations",
    responses((status = 200, description = "Every revoked token id still kept", body = JtisView))
)]
pub async fn jwt_revocations(State(api): State<Api>) -> ApiResult<Json<JtisView>> {
    api.node.read_barrier().await?;
    let items = api.node.state().read(|s| {
        s.auth()
            .revoked_jtis()
            .map(|(jti, until)| JtiView {
                jti: jti.to_string(),
                until: clock::rfc3339(*until),
            })
            .collect()
    });
    Ok(Json(JtisView { items }))
}
