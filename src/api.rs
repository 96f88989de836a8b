//! The HTTP API (axum): tasks, leases, queue, dead letters, registries,
//! sessions, cluster, health and metrics, under `/api/v1` (and `/api` as a
//! deprecated alias).
//!
//! Handlers validate everything before proposing, so bad input costs no log
//! entry and changes nothing; the state machine checks again at apply. Every
//! error has the shape `{"error": {"code", "message", "retryable"}}` and comes
//! from one mapping in `error.rs`. Reads go through a read barrier, so a read
//! on any node sees every write acknowledged before it.

mod admin;
mod cluster;
mod error;
mod json;
mod leases;
mod queue;
mod registry;
mod sessions;
mod tasks;
mod view;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::{get, post, put};
use tower_http::timeout::TimeoutLayer;

pub use error::{ApiError, ApiResult};

use crate::fsm::{Outcome, Reply};
use crate::node::{Node, NodeError};

/// Most records (tasks, sessions) one list request scans past its cursor
/// before it returns a short page with a cursor.
pub const SCAN_BUDGET: usize = 100_000;

/// What every handler gets.
#[derive(Clone)]
pub struct Api {
    node: Node,
}

/// The whole router for `node`.
pub fn router(node: Node) -> Router {
    let cfg = node.config().api.clone();
    let api = Api { node };
    let v1 = Router::new()
        .route("/tasks", post(tasks::create).get(tasks::list))
        .route("/tasks/{id}", get(tasks::get))
        .route("/tasks/{id}/cancel", post(tasks::cancel))
        .route("/tasks/{id}/retry", post(tasks::retry))
        .route("/leases", post(leases::acquire))
        .route("/leases/{token}/renew", post(leases::renew))
        .route("/leases/{token}/complete", post(leases::complete))
        .route("/leases/{token}/fail", post(leases::fail))
        .route("/queue/depth", get(queue::depth))
        .route("/dead-letter", get(queue::list))
        .route("/dead-letter/export", get(queue::export))
        .route("/dead-letter/replay", post(queue::replay))
        .route("/tenants/{tenant}/weight", put(queue::set_weight))
        .route("/agents", post(registry::register).get(registry::list))
        .route(
            "/agents/{id}",
            get(registry::get).delete(registry::deregister),
        )
        .route("/agents/{id}/status", get(registry::status))
        .route("/nodes", get(registry::nodes))
        .route(
            "/gateways",
            post(registry::register_gateway).get(registry::list_gateways),
        )
        .route(
            "/gateways/{id}",
            get(registry::get_gateway).delete(registry::deregister_gateway),
        )
        .route("/sessions", get(sessions::list))
        .route("/sessions/{id}", get(sessions::get))
        .route("/sessions/{id}/kill", post(sessions::kill))
        .route(
            "/admin/nodes/{id}/drain",
            post(admin::drain).get(admin::progress),
        )
        .route("/admin/nodes/{id}/undrain", post(admin::undrain))
        .route("/admin/agents/{id}/crash", post(admin::crash_agent))
        .route("/admin/faults", get(admin::faults))
        .route("/admin/faults/partition", post(admin::partition))
        .route("/admin/faults/heal", post(admin::heal))
        .route("/cluster", get(cluster::status))
        .route("/cluster/join", post(cluster::join))
        .route("/cluster/leave", post(cluster::leave))
        .route("/cluster/transfer-leader", post(cluster::transfer))
        .with_state(api.clone());
    let deprecated = v1
        .clone()
        .layer(axum::middleware::map_response(deprecation_headers));
    Router::new()
        .nest("/api/v1", v1)
        .nest("/api", deprecated)
        .route("/health", get(cluster::deep))
        .route("/health/live", get(cluster::live))
        .route("/health/ready", get(cluster::ready))
        .route("/metrics", get(metrics))
        .with_state(api)
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(DefaultBodyLimit::max(cfg.max_body_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            cfg.request_timeout,
        ))
}

async fn metrics(
    axum::extract::State(api): axum::extract::State<Api>,
) -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        crate::metrics::encode(&api.node),
    )
}

async fn deprecation_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert("deprecation", HeaderValue::from_static("true"));
    h.insert(
        "sunset",
        HeaderValue::from_static("Sat, 01 Jan 2028 00:00:00 GMT"),
    );
    h.insert(
        "link",
        HeaderValue::from_static("</api/v1>; rel=\"successor-version\""),
    );
    resp
}

/// A write's outcome as an API result.
fn outcome(r: Result<Outcome, NodeError>) -> ApiResult<Reply> {
    Ok(r??)
}

fn unexpected(reply: Reply) -> ApiError {
    ApiError::from(NodeError::Internal(format!("unexpected reply {reply:?}")))
}
