//! The API's OpenAPI 3.1 document (`GET /api/v1/openapi.json`) and the page
//! that renders it (`GET /docs`).
//!
//! The document is derived, not written: each handler carries a
//! `#[utoipa::path]` with its status codes, and its request, query and
//! response types derive `ToSchema`/`IntoParams`, so a field added to a
//! type is in the document on the next build. [`document`] then adds what
//! every route shares, from the same tables the router is built from:
//!
//! - paths under `/api/v1` unless `api::at_root`, or public;
//! - the operation id, tag and permission from [`permissions::ROUTES`]
//!   (the audit action is the operation id: `tasks.submit`);
//! - the bearer security scheme on every guarded route, none on the public
//!   ones ([`permissions::PUBLIC`]);
//! - the errors the guard and the server answer on any guarded route (401,
//!   403, 429, 500, 503, 504), those of any route that reads a body (408,
//!   413), that takes parameters (400), and that proposes a command (400,
//!   404 and 409: the state machine's rejections).
//!
//! `tests/openapi.rs` checks that the document's paths and the router's
//! routes are the same set, and that every `$ref` resolves.
//!
//! The `/docs` page is one HTML file with its script inline, embedded in
//! the binary (no CDN): it asks for an API key, keeps it in the tab's
//! `sessionStorage`, fetches the document with it and renders every
//! operation. The page holds no data, so it is public: a browser cannot
//! send a bearer header when it navigates to it.

use std::sync::LazyLock;

use axum::http::{Method, header};
use axum::response::IntoResponse;
use utoipa::OpenApi;
use utoipa::openapi::path::Operation;
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{Schema, SchemaType, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Content, Ref, RefOr, Required};

use super::error::ErrorBody;
use super::{admin, audit, backup, cluster, dashboard, events, keys, leases, permissions, queue};
use super::{flags, switches, tasks, tenants, usage};
use super::{registry, sessions, shards};

/// The name of the security scheme.
const BEARER: &str = "bearer";

/// The derived part of the document: every handler's own annotation.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Godel API",
        description = "Godel's control-plane API: tasks, leases, queue, dead letters, \
                       registries, sessions, cluster, credentials, tenants, audit, health \
                       and metrics. Send `Authorization: Bearer <API key or JWT>` on every \
                       route but the probes. Every error has the shape \
                       `{\"error\": {\"code\", \"message\", \"retryable\"}}`."
    ),
    paths(
        tasks::create,
        tasks::create_batch,
        tasks::list,
        tasks::get,
        tasks::cancel,
        tasks::retry,
        tasks::approve,
        tasks::reject,
        usage::get,
        usage::export,
        switches::list,
        switches::set,
        switches::lift,
        flags::list,
        flags::set,
        flags::remove,
        registry::roles,
        leases::acquire,
        leases::report_batch,
        leases::renew,
        leases::complete,
        leases::fail,
        queue::depth,
        queue::list,
        queue::export,
        queue::replay,
        tenants::set_weight,
        tenants::create,
        tenants::list,
        tenants::get,
        tenants::update,
        tenants::remove,
        registry::register,
        registry::list,
        registry::get,
        registry::deregister,
        registry::status,
        registry::nodes,
        registry::register_gateway,
        registry::list_gateways,
        registry::get_gateway,
        registry::deregister_gateway,
        sessions::list,
        sessions::get,
        sessions::kill,
        sessions::pause,
        sessions::resume,
        sessions::checkpoint,
        sessions::migrate,
        sessions::checkpoints,
        admin::drain,
        admin::progress,
        admin::undrain,
        admin::crash_agent,
        admin::stall_agent,
        admin::faults,
        admin::partition,
        admin::heal,
        backup::download,
        cluster::status,
        cluster::join,
        cluster::leave,
        cluster::transfer,
        shards::place,
        shards::unplace,
        keys::create,
        keys::list,
        keys::get,
        keys::revoke,
        keys::revoke_jwt,
        keys::jwt_revocations,
        audit::list,
        events::subscribe,
        cluster::deep,
        super::metrics,
        get_document,
        cluster::live,
        cluster::ready,
        docs,
        dashboard::index,
        dashboard::app_js,
        dashboard::style_css,
    ),
    components(schemas(ErrorBody))
)]
struct Derived;

/// The whole document, built once.
static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
    let mut json = serde_json::to_value(document()).expect("invariant: the document serializes");
    unsigned_integers(&mut json);
    json.to_string()
});

/// utoipa writes Rust's unsigned integers as `int32`/`int64` with a
/// minimum (0 or more: no handler takes a signed integer), which says `u32` stops at 2^31 - 1 and `u64` at 2^63 - 1;
/// the handlers accept up to `u32::MAX` and `u64::MAX`. Such a schema gets
/// that maximum (unless it has a tighter one) instead of the format.
fn unsigned_integers(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            let min = map.get("minimum").and_then(serde_json::Value::as_f64);
            let unsigned = min.is_some_and(|m| m >= 0.0);
            let max = match map.get("format").and_then(serde_json::Value::as_str) {
                Some("int32") if unsigned => Some(u64::from(u32::MAX)),
                Some("int64") if unsigned => Some(u64::MAX),
                _ => None,
            };
            if let Some(max) = max {
                map.remove("format");
                map.entry("maximum").or_insert(max.into());
            }
            map.values_mut().for_each(unsigned_integers);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(unsigned_integers),
        _ => {}
    }
}

/// The document as JSON text (what `GET /api/v1/openapi.json` answers).
pub fn document_json() -> &'static str {
    &DOCUMENT
}

/// The OpenAPI document: the handlers' annotations, with the paths, ids,
/// security and shared errors added from the router's tables.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = Derived::openapi();
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        BEARER,
        SecurityScheme::Http(
            Http::builder()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "An API key (`dk_live_...`, `dk_test_...`) or an HS256 JWT, as \
                 `Authorization: Bearer <credential>`",
                ))
                .build(),
        ),
    );
    for (name, description) in SHARED_ERRORS {
        components
            .responses
            .insert((*name).to_owned(), RefOr::T(error_response(description)));
    }
    // The timeout layer answers with an empty body, not the error shape.
    components.responses.insert(
        "Timeout".to_owned(),
        RefOr::T(
            ResponseBuilder::new()
                .description("The request took longer than `api.request_timeout` (empty body)")
                .build(),
        ),
    );
    let paths = std::mem::take(&mut doc.paths.paths);
    for (path, mut item) in paths {
        let public = permissions::PUBLIC.iter().any(|(_, p)| *p == path);
        let full = if public || super::at_root(&path) {
            path.clone()
        } else {
            format!("/api/v1{path}")
        };
        for (method, op) in operations(&mut item) {
            let Some(op) = op else { continue };
            if public {
                finish_public(op, &path);
            } else {
                let spec = permissions::spec(&method, &path).unwrap_or_else(|| {
                    panic!("{method} {path} is documented but not in permissions::ROUTES")
                });
                finish_guarded(op, spec);
            }
        }
        doc.paths.paths.insert(full, item);
    }
    doc
}

/// Shared error responses, by component name.
const SHARED_ERRORS: &[(&str, &str)] = &[
    (
        "InvalidRequest",
        "Invalid request: a parameter, path segment or body field (named in the message)",
    ),
    (
        "Unauthenticated",
        "No usable credential (`WWW-Authenticate: Bearer`)",
    ),
    (
        "Forbidden",
        "The credential's role lacks the route's permission, or names another tenant",
    ),
    (
        "NotFound",
        "No such object (another tenant's object answers the same)",
    ),
    (
        "RequestTimeout",
        "The request body was not received within `api.body_timeout`",
    ),
    (
        "Conflict",
        "The state machine refused the change (stale token, illegal transition, exists)",
    ),
    (
        "PayloadTooLarge",
        "The body (or a field of it) is over its limit",
    ),
    (
        "RateLimited",
        "Over a rate limit or quota, or shed under load by priority (code `shed`) (`Retry-After`)",
    ),
    ("Internal", "An unexpected failure"),
    (
        "Unavailable",
        "No leader or no quorum just now (`Retry-After`)",
    ),
];

fn error_response(description: &str) -> Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            Content::new(Some(Ref::from_schema_name("Error"))),
        )
        .build()
}

/// Adds `status` answering the shared error `name` unless the handler
/// documented it itself.
fn shared(op: &mut Operation, status: u16, name: &str) {
    op.responses
        .responses
        .entry(status.to_string())
        .or_insert_with(|| RefOr::Ref(Ref::from_response_name(name)));
}

fn finish_guarded(op: &mut Operation, spec: &permissions::RouteSpec) {
    op.operation_id = Some(spec.action.to_owned());
    let tag = spec.action.split('.').next().unwrap_or(spec.action);
    op.tags = Some(vec![tag.to_owned()]);
    let needs = format!("Needs `{}`.", spec.permission.as_str());
    op.description = Some(match op.description.take() {
        Some(d) => format!("{d}\n\n{needs}"),
        None => needs,
    });
    let bearer = SecurityRequirement::new(BEARER, Vec::<String>::new());
    op.security = Some(if spec.permission == permissions::Permission::MetricsRead {
        // Open by default (`auth.metrics_open`): no credential, or a bearer.
        vec![SecurityRequirement::default(), bearer]
    } else {
        vec![bearer]
    });
    for (status, name) in [
        (401, "Unauthenticated"),
        (403, "Forbidden"),
        (429, "RateLimited"),
        (500, "Internal"),
        (503, "Unavailable"),
        (504, "Timeout"),
    ] {
        shared(op, status, name);
    }
    optional_body(op);
    let has_params = op.parameters.as_ref().is_some_and(|p| !p.is_empty());
    if op.request_body.is_some() {
        shared(op, 408, "RequestTimeout");
        shared(op, 413, "PayloadTooLarge");
    }
    if has_params || op.request_body.is_some() || spec.method != Method::GET {
        shared(op, 400, "InvalidRequest");
    }
    if spec.method != Method::GET {
        shared(op, 404, "NotFound");
        shared(op, 409, "Conflict");
    }
}

/// An optional body (`Option<T>` in the annotation) is described as the
/// body type itself, not required: an absent or empty body is `{}`, while
/// a JSON `null` is refused like any other non-object.
fn optional_body(op: &mut Operation) {
    let Some(body) = op.request_body.as_mut() else {
        return;
    };
    if body.required == Some(Required::True) {
        return;
    }
    for content in body.content.values_mut() {
        let Some(RefOr::T(Schema::OneOf(one))) = &content.schema else {
            continue;
        };
        let not_null: Vec<_> = one.items.iter().filter(|s| !is_null(s)).cloned().collect();
        if let [only] = not_null.as_slice() {
            content.schema = Some(only.clone());
        }
    }
}

fn is_null(s: &RefOr<Schema>) -> bool {
    matches!(s, RefOr::T(Schema::Object(o)) if o.schema_type == SchemaType::Type(Type::Null))
}

fn finish_public(op: &mut Operation, path: &str) {
    let id = path.trim_start_matches('/').replace('/', ".");
    op.operation_id = Some(id);
    op.tags = Some(vec!["public".to_owned()]);
    // An empty list: no credential needed (the document's default is bearer).
    op.security = Some(Vec::new());
}

/// The operations of a path item, with their methods.
fn operations(item: &mut utoipa::openapi::PathItem) -> [(Method, Option<&mut Operation>); 5] {
    [
        (Method::GET, item.get.as_mut()),
        (Method::POST, item.post.as_mut()),
        (Method::PUT, item.put.as_mut()),
        (Method::PATCH, item.patch.as_mut()),
        (Method::DELETE, item.delete.as_mut()),
    ]
}

/// `GET /api/v1/openapi.json`: this document.
///
/// It needs `tasks:read`, the permission every role holds: the document
/// describes the API's shape and holds no data, so any credential may read
/// it, but a caller without one learns nothing about the surface either.
#[utoipa::path(
    get,
    path = "/openapi.json",
    responses((status = 200, description = "This document (OpenAPI 3.1)", content_type = "application/json", body = Object))
)]
pub async fn get_document() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOCUMENT.as_str(),
    )
}

/// The `/docs` page, embedded at build time.
const DOCS_HTML: &str = include_str!("openapi/docs.html");

/// `GET /docs`: a page that renders the document. Public: it holds no data,
/// and fetches the document with a key the user pastes.
#[utoipa::path(
    get,
    path = "/docs",
    responses((status = 200, description = "The documentation page", content_type = "text/html", body = String))
)]
pub async fn docs() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            ),
        ],
        DOCS_HTML,
    )
}
