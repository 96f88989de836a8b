//! The HTTP API (axum): tasks, leases, queue, dead letters, registries,
//! sessions, cluster, credentials, tenants, audit, health and metrics,
//! under `/api/v1` (and `/api` as a deprecated alias).
//!
//! Every route but the liveness and readiness probes, the dashboard's
//! static page (`dashboard`) and the `/docs` page needs a credential and a
//! permission ([`auth`], [`permissions`]); the router is built from the
//! permission table, so a route without an entry cannot be served.
//! `GET /api/v1/openapi.json` describes every route, and is derived from
//! the handlers' own types (`openapi.rs`).
//! Writes are proposed with the caller's audit mark, confined to its tenant
//! (see `fsm::Batch`); reads filter by tenant, and another tenant's
//! object answers 404 exactly as a missing one does.
//!
//! Handlers validate everything before proposing, so bad input costs no log
//! entry and changes nothing; the state machine checks again at apply. Every
//! error has the shape `{"error": {"code", "message", "retryable"}}` and comes
//! from one mapping in `error.rs`. Reads go through a read barrier, so a read
//! on any node sees every write acknowledged before it.

mod admin;
mod audit;
pub mod auth;
mod backup;
mod cluster;
mod dashboard;
mod error;
mod events;
mod flags;
mod json;
mod keys;
mod leases;
mod openapi;
pub mod peers;
pub mod permissions;
mod queue;
mod rate;
mod registry;
mod request_trace;
mod serve;
mod sessions;
mod shards;
mod switches;
mod tasks;
mod tenants;
pub mod usage;
mod view;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::Response;
use axum::routing::{MethodRouter, delete, get, patch, post, put};
use tower_http::timeout::TimeoutLayer;

pub use auth::{Authenticator, Caller};
pub use error::{ApiError, ApiResult};
pub use openapi::document_json as openapi_document;
pub use serve::serve;

use crate::fsm::{AuditTarget, Command, Outcome, Reply};
use crate::node::{Node, NodeError};

/// Most records (tasks, sessions) one list request scans past its cursor
/// before it returns a short page with a cursor.
pub const SCAN_BUDGET: usize = 100_000;

/// Most items in one batch call (`POST /tasks:batch`, `POST /leases:batch`).
pub const MAX_BATCH_ITEMS: usize = 1000;

/// How often the API's housekeeping runs: records keys' last use, prunes
/// idle rate-limit buckets.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(10);

/// What every handler gets.
#[derive(Clone)]
pub struct Api {
    node: Node,
    auth: Arc<Authenticator>,
    /// The event stream's hubs, one per group (index = group id: the meta
    /// group's first, then each queue shard's).
    events: Arc<[Arc<crate::events::EventHub>]>,
}

impl Api {
    /// Proposes `cmd` on `caller`'s behalf (audited, confined to its
    /// tenant) and waits for its outcome.
    async fn write_as(
        &self,
        caller: &Caller,
        cmd: Command,
        target: Option<AuditTarget>,
    ) -> ApiResult<Reply> {
        self.write_in(self.node.meta(), caller, cmd, target).await
    }

    /// [`Api::write_as`] to the queue group `group` (a task's shard).
    async fn write_in(
        &self,
        group: &crate::node::Group,
        caller: &Caller,
        cmd: Command,
        target: Option<AuditTarget>,
    ) -> ApiResult<Reply> {
        outcome(
            self.node
                .write_audited_in(group, cmd, Some(caller.audit(target)))
                .await,
        )
    }

    /// After a change of what every queue shard keeps a copy of (a
    /// tenant's weight, a kill switch) in the meta group: brings each shard
    /// routed to up to the meta group's record, on the caller's behalf
    /// (the change, and anything an earlier call that failed part-way left
    /// behind). The meta leader does the same each pass (node/shards.rs),
    /// for shards this call does not reach.
    async fn sync_shards(&self, caller: &Caller, target: Option<AuditTarget>) -> ApiResult<()> {
        if self.node.shard_groups().is_empty() {
            return Ok(());
        }
        self.node.read_barrier().await?;
        self.node.fresh_routes().await?;
        let routed = self.node.queue_groups().len();
        for group in self.node.shard_groups().iter().take(routed) {
            let copy = group.state().read(|s| s.synced());
            if let Some(cmd) = self.node.state().read(|meta| meta.sync_for(&copy)) {
                self.write_in(group, caller, cmd, target.clone()).await?;
            }
        }
        Ok(())
    }

    /// The queue group that holds `what` `id` (a task, lease or session:
    /// ids carry their shard); one that names no shard routed to is not
    /// found, one in a shard this node does not host is a 503. A shard this
    /// node hosts but its meta replica does not route to yet is looked up
    /// again after a meta read barrier (an `OpenRoute` not applied here yet).
    async fn queue_group_of(&self, id: u64, what: &str) -> ApiResult<&crate::node::Group> {
        let not_found = || ApiError::not_found(format!("{what} {id} not found"));
        let group = self.node.queue_group_of(id).map_err(|e| match e {
            NodeError::Invalid(_) => not_found(),
            other => other.into(),
        })?;
        let routed = |g: &crate::node::Group| {
            let groups = self.node.queue_groups();
            groups.iter().any(|r| r.id() == g.id())
        };
        if routed(group) {
            return Ok(group);
        }
        self.node.read_barrier().await?;
        if routed(group) {
            Ok(group)
        } else {
            Err(not_found())
        }
    }

    /// Every queue group's replica, read at once after a read barrier on
    /// each (the merged reads: lists, depth, dead letters).
    async fn read_queue<R>(&self, f: impl Fn(&crate::fsm::State) -> R) -> ApiResult<Vec<R>> {
        self.node.read_barrier_queue().await?;
        Ok(self
            .node
            .queue_groups()
            .iter()
            .map(|g| g.state().read(&f))
            .collect())
    }

    /// Records, for a change that is not a state-machine command
    /// (membership, faults), that `caller` made it and how it ended.
    async fn record(&self, caller: &Caller, target: Option<AuditTarget>, ok: bool) {
        self.append_audit(caller, target, if ok { "ok" } else { "failed" })
            .await;
    }

    /// Records a call refused by a check the API makes before proposing
    /// (a gateway spec this node's policy refuses, say).
    async fn record_rejected(&self, caller: &Caller, target: Option<AuditTarget>, code: &str) {
        self.append_audit(caller, target, &format!("rejected:{code}"))
            .await;
    }

    async fn append_audit(&self, caller: &Caller, target: Option<AuditTarget>, outcome: &str) {
        let rec = crate::fsm::AuditRecord {
            caller: caller.audit_caller(),
            target,
            outcome: outcome.to_owned(),
        };
        if !matches!(self.node.write(Command::Audit(rec)).await, Ok(Ok(_))) {
            tracing::warn!(action = caller.action, "could not record an audit entry");
        }
    }
}

/// Every route and its handler: paths under `/api/v1`, except `/health`
/// and `/metrics` at the root. Each must have an entry in
/// [`permissions::ROUTES`].
fn handlers() -> Vec<(Method, &'static str, MethodRouter<Api>)> {
    use Method as M;
    vec![
        (M::POST, "/tasks", post(tasks::create)),
        (M::POST, "/tasks:batch", post(tasks::create_batch)),
        (M::GET, "/tasks", get(tasks::list)),
        (M::GET, "/tasks/{id}", get(tasks::get)),
        (M::POST, "/tasks/{id}/cancel", post(tasks::cancel)),
        (M::POST, "/tasks/{id}/retry", post(tasks::retry)),
        (M::POST, "/tasks/{id}/approve", post(tasks::approve)),
        (M::POST, "/tasks/{id}/reject", post(tasks::reject)),
        (M::GET, "/usage", get(usage::get)),
        (M::GET, "/usage/export", get(usage::export)),
        (M::GET, "/switches", get(switches::list)),
        (M::PUT, "/switches/{name}", put(switches::set)),
        (M::DELETE, "/switches/{name}", delete(switches::lift)),
        (M::GET, "/flags", get(flags::list)),
        (M::GET, "/roles", get(registry::roles)),
        (M::PUT, "/flags/{name}", put(flags::set)),
        (M::DELETE, "/flags/{name}", delete(flags::remove)),
        (M::POST, "/leases", post(leases::acquire)),
        (M::POST, "/leases:batch", post(leases::report_batch)),
        (M::POST, "/leases/{token}/renew", post(leases::renew)),
        (M::POST, "/leases/{token}/complete", post(leases::complete)),
        (M::POST, "/leases/{token}/fail", post(leases::fail)),
        (M::GET, "/queue/depth", get(queue::depth)),
        (M::GET, "/dead-letter", get(queue::list)),
        (M::GET, "/dead-letter/export", get(queue::export)),
        (M::POST, "/dead-letter/replay", post(queue::replay)),
        (M::PUT, "/tenants/{tenant}/weight", put(tenants::set_weight)),
        (M::POST, "/tenants", post(tenants::create)),
        (M::GET, "/tenants", get(tenants::list)),
        (M::GET, "/tenants/{tenant}", get(tenants::get)),
        (M::PATCH, "/tenants/{tenant}", patch(tenants::update)),
        (M::DELETE, "/tenants/{tenant}", delete(tenants::remove)),
        (M::POST, "/agents", post(registry::register)),
        (M::GET, "/agents", get(registry::list)),
        (M::GET, "/agents/{id}", get(registry::get)),
        (M::DELETE, "/agents/{id}", delete(registry::deregister)),
        (M::GET, "/agents/{id}/status", get(registry::status)),
        (M::GET, "/nodes", get(registry::nodes)),
        (M::POST, "/gateways", post(registry::register_gateway)),
        (M::GET, "/gateways", get(registry::list_gateways)),
        (M::GET, "/gateways/{id}", get(registry::get_gateway)),
        (
            M::DELETE,
            "/gateways/{id}",
            delete(registry::deregister_gateway),
        ),
        (M::GET, "/sessions", get(sessions::list)),
        (M::GET, "/sessions/{id}", get(sessions::get)),
        (M::POST, "/sessions/{id}/kill", post(sessions::kill)),
        (M::POST, "/sessions/{id}/pause", post(sessions::pause)),
        (M::POST, "/sessions/{id}/resume", post(sessions::resume)),
        (
            M::POST,
            "/sessions/{id}/checkpoint",
            post(sessions::checkpoint),
        ),
        (M::POST, "/sessions/{id}/migrate", post(sessions::migrate)),
        (
            M::GET,
            "/sessions/{id}/checkpoints",
            get(sessions::checkpoints),
        ),
        (M::POST, "/admin/nodes/{id}/drain", post(admin::drain)),
        (M::GET, "/admin/nodes/{id}/drain", get(admin::progress)),
        (M::POST, "/admin/nodes/{id}/undrain", post(admin::undrain)),
        (
            M::POST,
            "/admin/agents/{id}/crash",
            post(admin::crash_agent),
        ),
        (
            M::POST,
            "/admin/agents/{id}/stall",
            post(admin::stall_agent),
        ),
        (M::GET, "/admin/faults", get(admin::faults)),
        (M::POST, "/admin/faults/partition", post(admin::partition)),
        (M::POST, "/admin/faults/heal", post(admin::heal)),
        (M::GET, "/admin/backup", get(backup::download)),
        (M::GET, "/cluster", get(cluster::status)),
        (M::POST, "/cluster/join", post(cluster::join)),
        (M::POST, "/cluster/leave", post(cluster::leave)),
        (M::POST, "/cluster/transfer-leader", post(cluster::transfer)),
        (M::PUT, "/shards/{id}/placement", put(shards::place)),
        (M::DELETE, "/shards/{id}/placement", delete(shards::unplace)),
        (M::POST, "/api-keys", post(keys::create)),
        (M::GET, "/api-keys", get(keys::list)),
        (M::GET, "/api-keys/{id}", get(keys::get)),
        (M::DELETE, "/api-keys/{id}", delete(keys::revoke)),
        (M::POST, "/jwt/revocations", post(keys::revoke_jwt)),
        (M::GET, "/jwt/revocations", get(keys::jwt_revocations)),
        (M::GET, "/audit", get(audit::list)),
        (M::GET, "/events", get(events::subscribe)),
        (M::GET, "/openapi.json", get(openapi::get_document)),
        (M::GET, "/health", get(cluster::deep)),
        (M::GET, "/metrics", get(metrics)),
    ]
}

/// Whether a route lives at the root rather than under `/api/v1`.
fn at_root(path: &str) -> bool {
    path == "/health" || path == "/metrics"
}

/// Every route the router serves with a credential, as `(method, full
/// path)`: what the permission matrix test walks.
pub fn route_list() -> Vec<(Method, String)> {
    handlers()
        .into_iter()
        .map(|(m, p, _)| {
            let full = if at_root(p) {
                p.to_owned()
            } else {
                format!("/api/v1{p}")
            };
            (m, full)
        })
        .collect()
}

/// Checks what the API needs from the config before the node starts (a
/// JWT secret that is missing or too short stops the node with a clear
/// message).
pub fn check_config(config: &crate::config::Config) -> anyhow::Result<()> {
    auth::check_configured_key(config)?;
    auth::JwtVerifier::from_config(&config.auth).map(|_| ())
}

/// The whole router for `node`, every route behind its guard; spawns the
/// API's housekeeping and, on a cluster that never had a key, the
/// bootstrap of its first admin key. Fails if the JWT secret is unusable.
///
/// # Panics
///
/// If a route has no entry in the permission table (a programming error
/// every test that builds the router catches).
pub fn router(node: Node) -> anyhow::Result<Router> {
    let cfg = node.config().api.clone();
    let secret = crate::node::cluster_secret(node.config())?;
    let auth = Arc::new(Authenticator::new(
        node.config(),
        node.state().clone(),
        &secret,
    )?);
    // One hub per group: the meta group's, then each queue shard's.
    let mut hubs = Vec::new();
    for group in node.groups() {
        // Subscribed first: an event applied before the hub exists is in
        // `last_seq`, one applied after reaches the feed (a hub that started
        // its feed later reported the events between as missed).
        let rx = group.state().subscribe();
        let last_seq = group.state().read(|s| s.last_event_seq());
        let hub = Arc::new(crate::events::EventHub::for_group(
            group.id(),
            cfg.events_buffer,
            cfg.events_queue,
            last_seq,
        ));
        let feed = crate::events::run(Arc::clone(&hub), rx, node.shutdown_token().clone());
        node.spawn(feed);
        hubs.push(hub);
    }
    let events: Arc<[Arc<crate::events::EventHub>]> = hubs.into();
    let api = Api { node, auth, events };
    api.node.spawn(housekeeping(api.clone()));
    api.node.spawn(auth::bootstrap_admin_key(api.node.clone()));
    let (mut v1, mut root) = (Router::new(), Router::new());
    for (method, path, handler) in handlers() {
        let spec = permissions::spec(&method, path)
            .unwrap_or_else(|| panic!("{method} {path} has no entry in api::permissions::ROUTES"));
        let open = path == "/metrics" && api.auth.metrics_open();
        let handler = if open {
            handler
        } else {
            handler.route_layer(auth::GuardLayer::new(api.clone(), spec))
        };
        if at_root(path) {
            root = root.route(path, handler);
        } else {
            v1 = v1.route(path, handler);
        }
    }
    let v1 = v1.with_state(api.clone());
    let deprecated = v1
        .clone()
        .layer(axum::middleware::map_response(deprecation_headers));
    Ok(Router::new()
        .nest("/api/v1", v1)
        .nest("/api", deprecated)
        .merge(root.with_state(api.clone()))
        .route("/health/live", get(cluster::live))
        .route("/health/ready", get(cluster::ready))
        .route("/", get(dashboard::index))
        .route("/ui/app.js", get(dashboard::app_js))
        .route("/ui/style.css", get(dashboard::style_css))
        .route("/docs", get(openapi::docs))
        .with_state(api)
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(DefaultBodyLimit::max(cfg.max_body_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            cfg.request_timeout,
        ))
        .layer(request_trace::RequestTraceLayer))
}

/// Records the keys seen in use (coarsely) and prunes idle rate buckets,
/// until the node shuts down.
async fn housekeeping(api: Api) {
    let shutdown = api.node.shutdown_token().clone();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(HOUSEKEEPING_EVERY) => {}
        }
        api.auth.rates.prune();
        if api.node.is_leader() {
            crate::budget::alert(&api.node).await;
        }
        let ids = api.auth.take_touches();
        if !ids.is_empty()
            && !matches!(
                api.node.write(Command::TouchApiKeys { ids }).await,
                Ok(Ok(_))
            )
        {
            tracing::debug!("could not record API keys' last use; later uses will");
        }
    }
}

/// `GET /metrics`: Prometheus text.
#[utoipa::path(
    get,
    path = "/metrics",
    responses((status = 200, description = "Prometheus text exposition (open without a credential while `auth.metrics_open`)", content_type = "text/plain", body = String))
)]
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
