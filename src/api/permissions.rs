//! The permission table: every route, the permission it needs, the audit
//! action it records, and which roles hold each permission. The whole
//! authorization policy of the API is this file.
//!
//! The router is built from [`ROUTES`] (see `api::router`), so a route
//! cannot exist without an entry here, and `tests/auth_matrix.rs` calls
//! every route with every role and checks the answer against
//! [`Permission::granted_to`].
//!
//! | permission | admin | operator | developer | viewer |
//! |---|---|---|---|---|
//! | `tasks:read` (tasks, queue depth, dead letters, usage; own tenant unless cross-tenant) | yes | yes | yes | yes |
//! | `sessions:read` | yes | yes | yes | yes |
//! | `tasks:write` (submit, cancel, retry) | yes | yes | yes | - |
//! | `tasks:approve` (approve or reject a task awaiting approval) | yes | yes | - | - |
//! | `switches:write` (set and lift kill switches, set and remove feature flags; reading them is `registry:read`) | yes | yes | - | - |
//! | `leases:work` (lease, renew, complete, fail) | yes | yes | yes | - |
//! | `dlq:replay` | yes | yes | - | - |
//! | `sessions:write` (pause, resume, checkpoint; own tenant) | yes | yes | yes | - |
//! | `sessions:kill` (end a session, move it to another gateway) | yes | yes | - | - |
//! | `registry:read` (gateways, agents, nodes) | yes | yes | - | - |
//! | `registry:write` (register, deregister) | yes | yes | - | - |
//! | `nodes:drain` | yes | yes | - | - |
//! | `cluster:read` (cluster status, deep health) | yes | yes | - | - |
//! | `metrics:read` (only when `auth.metrics_open = false`) | yes | yes | - | yes |
//! | `cluster:admin` (join, leave, transfer, a shard's placement) | yes | - | - | - |
//! | `faults:inject` | yes | - | - | - |
//! | `keys:admin` (API keys, JWT revocations) | yes | - | - | - |
//! | `tenants:admin` | yes | - | - | - |
//! | `audit:read` | yes | - | - | - |
//! | `cluster:backup` (a backup of the whole state, every tenant's and every credential's hash) | yes | - | - | - |
//!
//! Developers and viewers act in their credential's tenant only; admins
//! and operators may name any tenant (see `auth::Caller`).

use axum::http::Method;

use crate::fsm::Role;

/// What a route needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Permission {
    /// Read tasks, queue depth and dead letters.
    TasksRead,
    /// Submit, cancel and retry tasks.
    TasksWrite,
    /// Approve or reject tasks awaiting approval.
    TasksApprove,
    /// Set and lift kill switches, set and remove feature flags.
    Switches,
    /// Lease tasks and report on leases, as a worker.
    LeasesWork,
    /// Replay dead letters in bulk.
    DlqReplay,
    /// Read sessions.
    SessionsRead,
    /// End sessions and move them to other gateways.
    SessionsKill,
    /// Pause, resume and checkpoint sessions.
    SessionsWrite,
    /// Read gateways, agents and nodes.
    RegistryRead,
    /// Register and deregister gateways and agents.
    RegistryWrite,
    /// Drain and undrain nodes.
    NodesDrain,
    /// Read cluster status and deep health.
    ClusterRead,
    /// Read Prometheus metrics (when they are not open).
    MetricsRead,
    /// Change membership and leadership.
    ClusterAdmin,
    /// Inject faults (drills).
    FaultsInject,
    /// Create, list and revoke API keys; revoke JWTs.
    KeysAdmin,
    /// Manage tenants and their quotas.
    TenantsAdmin,
    /// Read the audit log.
    AuditRead,
    /// Take a backup of the whole replicated state.
    Backup,
}

impl Permission {
    /// The name errors and docs use (`tasks:write`).
    pub fn as_str(self) -> &'static str {
        use Permission::*;
        match self {
            TasksRead => "tasks:read",
            TasksWrite => "tasks:write",
            TasksApprove => "tasks:approve",
            Switches => "switches:write",
            LeasesWork => "leases:work",
            DlqReplay => "dlq:replay",
            SessionsRead => "sessions:read",
            SessionsKill => "sessions:kill",
            SessionsWrite => "sessions:write",
            RegistryRead => "registry:read",
            RegistryWrite => "registry:write",
            NodesDrain => "nodes:drain",
            ClusterRead => "cluster:read",
            MetricsRead => "metrics:read",
            ClusterAdmin => "cluster:admin",
            FaultsInject => "faults:inject",
            KeysAdmin => "keys:admin",
            TenantsAdmin => "tenants:admin",
            AuditRead => "audit:read",
            Backup => "cluster:backup",
        }
    }

    /// The role table.
    pub fn granted_to(self, role: Role) -> bool {
        use Permission::*;
        match role {
            Role::Admin => true,
            Role::Operator => !matches!(
                self,
                ClusterAdmin | FaultsInject | KeysAdmin | TenantsAdmin | AuditRead | Backup
            ),
            Role::Developer => matches!(
                self,
                TasksRead | SessionsRead | SessionsWrite | TasksWrite | LeasesWork
            ),
            Role::Viewer => matches!(self, TasksRead | SessionsRead | MetricsRead),
        }
    }
}

/// One route: method and path (under `/api/v1` unless it starts with
/// `/health` or `/metrics`), the permission it needs, and the action its
/// audit entries record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteSpec {
    /// HTTP method.
    pub method: Method,
    /// Path pattern, axum syntax.
    pub path: &'static str,
    /// What the caller needs.
    pub permission: Permission,
    /// The audit action (`tasks.submit`).
    pub action: &'static str,
    /// A connection upgrade without an `Authorization` header passes the
    /// guard, and the handler checks the credential the client sends
    /// first (`auth::in_band`): browsers cannot set headers on a
    /// WebSocket, and a credential in the URL would be logged.
    pub credential_in_band: bool,
}

const fn r(
    method: Method,
    path: &'static str,
    permission: Permission,
    action: &'static str,
) -> RouteSpec {
    RouteSpec {
        method,
        path,
        permission,
        action,
        credential_in_band: false,
    }
}

/// A WebSocket route whose credential may come in its first message.
const fn ws(path: &'static str, permission: Permission, action: &'static str) -> RouteSpec {
    RouteSpec {
        method: Method::GET,
        path,
        permission,
        action,
        credential_in_band: true,
    }
}

use Permission as P;

const GET: Method = Method::GET;
const POST: Method = Method::POST;
const PUT: Method = Method::PUT;
const PATCH: Method = Method::PATCH;
const DELETE: Method = Method::DELETE;

/// Every authenticated route.
pub const ROUTES: &[RouteSpec] = &[
    r(POST, "/tasks", P::TasksWrite, "tasks.submit"),
    r(POST, "/tasks:batch", P::TasksWrite, "tasks.submit_batch"),
    r(GET, "/tasks", P::TasksRead, "tasks.list"),
    r(GET, "/tasks/{id}", P::TasksRead, "tasks.get"),
    r(POST, "/tasks/{id}/cancel", P::TasksWrite, "tasks.cancel"),
    r(POST, "/tasks/{id}/retry", P::TasksWrite, "tasks.retry"),
    r(
        POST,
        "/tasks/{id}/approve",
        P::TasksApprove,
        "tasks.approve",
    ),
    r(POST, "/tasks/{id}/reject", P::TasksApprove, "tasks.reject"),
    r(GET, "/usage", P::TasksRead, "usage.read"),
    r(GET, "/usage/export", P::TasksRead, "usage.export"),
    r(GET, "/switches", P::RegistryRead, "switches.list"),
    r(PUT, "/switches/{name}", P::Switches, "switches.set"),
    r(DELETE, "/switches/{name}", P::Switches, "switches.lift"),
    r(GET, "/flags", P::RegistryRead, "flags.list"),
    r(GET, "/roles", P::RegistryRead, "roles.list"),
    r(PUT, "/flags/{name}", P::Switches, "flags.set"),
    r(DELETE, "/flags/{name}", P::Switches, "flags.remove"),
    r(POST, "/leases", P::LeasesWork, "leases.acquire"),
    r(POST, "/leases:batch", P::LeasesWork, "leases.report_batch"),
    r(POST, "/leases/{token}/renew", P::LeasesWork, "leases.renew"),
    r(
        POST,
        "/leases/{token}/complete",
        P::LeasesWork,
        "leases.complete",
    ),
    r(POST, "/leases/{token}/fail", P::LeasesWork, "leases.fail"),
    r(GET, "/queue/depth", P::TasksRead, "queue.depth"),
    r(GET, "/dead-letter", P::TasksRead, "dead_letter.list"),
    r(
        GET,
        "/dead-letter/export",
        P::TasksRead,
        "dead_letter.export",
    ),
    r(
        POST,
        "/dead-letter/replay",
        P::DlqReplay,
        "dead_letter.replay",
    ),
    r(
        PUT,
        "/tenants/{tenant}/weight",
        P::TenantsAdmin,
        "tenants.weight",
    ),
    r(POST, "/tenants", P::TenantsAdmin, "tenants.create"),
    r(GET, "/tenants", P::TenantsAdmin, "tenants.list"),
    r(GET, "/tenants/{tenant}", P::TenantsAdmin, "tenants.get"),
    r(
        PATCH,
        "/tenants/{tenant}",
        P::TenantsAdmin,
        "tenants.update",
    ),
    r(
        DELETE,
        "/tenants/{tenant}",
        P::TenantsAdmin,
        "tenants.delete",
    ),
    r(POST, "/agents", P::RegistryWrite, "agents.register"),
    r(GET, "/agents", P::RegistryRead, "agents.list"),
    r(GET, "/agents/{id}", P::RegistryRead, "agents.get"),
    r(
        DELETE,
        "/agents/{id}",
        P::RegistryWrite,
        "agents.deregister",
    ),
    r(GET, "/agents/{id}/status", P::RegistryRead, "agents.status"),
    r(GET, "/nodes", P::RegistryRead, "nodes.list"),
    r(POST, "/gateways", P::RegistryWrite, "gateways.register"),
    r(GET, "/gateways", P::RegistryRead, "gateways.list"),
    r(GET, "/gateways/{id}", P::RegistryRead, "gateways.get"),
    r(
        DELETE,
        "/gateways/{id}",
        P::RegistryWrite,
        "gateways.deregister",
    ),
    r(GET, "/sessions", P::SessionsRead, "sessions.list"),
    r(GET, "/sessions/{id}", P::SessionsRead, "sessions.get"),
    r(
        POST,
        "/sessions/{id}/kill",
        P::SessionsKill,
        "sessions.kill",
    ),
    r(
        POST,
        "/sessions/{id}/pause",
        P::SessionsWrite,
        "sessions.pause",
    ),
    r(
        POST,
        "/sessions/{id}/resume",
        P::SessionsWrite,
        "sessions.resume",
    ),
    r(
        POST,
        "/sessions/{id}/checkpoint",
        P::SessionsWrite,
        "sessions.checkpoint",
    ),
    r(
        POST,
        "/sessions/{id}/migrate",
        P::SessionsKill,
        "sessions.migrate",
    ),
    r(
        GET,
        "/sessions/{id}/checkpoints",
        P::SessionsRead,
        "sessions.checkpoints",
    ),
    r(
        POST,
        "/admin/nodes/{id}/drain",
        P::NodesDrain,
        "nodes.drain",
    ),
    r(
        GET,
        "/admin/nodes/{id}/drain",
        P::NodesDrain,
        "nodes.drain_status",
    ),
    r(
        POST,
        "/admin/nodes/{id}/undrain",
        P::NodesDrain,
        "nodes.undrain",
    ),
    r(
        POST,
        "/admin/agents/{id}/crash",
        P::FaultsInject,
        "faults.crash_agent",
    ),
    r(
        POST,
        "/admin/agents/{id}/stall",
        P::FaultsInject,
        "faults.stall_agent",
    ),
    r(GET, "/admin/faults", P::FaultsInject, "faults.list"),
    r(
        POST,
        "/admin/faults/partition",
        P::FaultsInject,
        "faults.partition",
    ),
    r(POST, "/admin/faults/heal", P::FaultsInject, "faults.heal"),
    r(GET, "/admin/backup", P::Backup, "backup.create"),
    r(GET, "/cluster", P::ClusterRead, "cluster.status"),
    r(POST, "/cluster/join", P::ClusterAdmin, "cluster.join"),
    r(POST, "/cluster/leave", P::ClusterAdmin, "cluster.leave"),
    r(
        POST,
        "/cluster/transfer-leader",
        P::ClusterAdmin,
        "cluster.transfer_leader",
    ),
    r(
        PUT,
        "/shards/{id}/placement",
        P::ClusterAdmin,
        "shards.place",
    ),
    r(
        DELETE,
        "/shards/{id}/placement",
        P::ClusterAdmin,
        "shards.unplace",
    ),
    r(POST, "/api-keys", P::KeysAdmin, "api_keys.create"),
    r(GET, "/api-keys", P::KeysAdmin, "api_keys.list"),
    r(GET, "/api-keys/{id}", P::KeysAdmin, "api_keys.get"),
    r(DELETE, "/api-keys/{id}", P::KeysAdmin, "api_keys.revoke"),
    r(POST, "/jwt/revocations", P::KeysAdmin, "jwt.revoke"),
    r(GET, "/jwt/revocations", P::KeysAdmin, "jwt.revocations"),
    r(GET, "/audit", P::AuditRead, "audit.list"),
    // Connecting needs tasks:read (every role); each event also needs what
    // reading its object over REST needs, in the caller's tenant
    // (`api::events`).
    ws("/events", P::TasksRead, "events.subscribe"),
    // The OpenAPI document: any role may read it (see `api::openapi`).
    r(GET, "/openapi.json", P::TasksRead, "openapi.read"),
    r(GET, "/health", P::ClusterRead, "health.deep"),
    r(GET, "/metrics", P::MetricsRead, "metrics.read"),
];

/// Routes that answer without a credential: liveness and readiness probes,
/// the dashboard's static page and assets, the `/docs` page (no data: it
/// fetches the document with a key the user pastes), and `/metrics` while
/// `auth.metrics_open` is true.
pub const PUBLIC: &[(Method, &str)] = &[
    (GET, "/health/live"),
    (GET, "/health/ready"),
    // The dashboard's page and assets: static, no data (`api::dashboard`).
    (GET, "/"),
    (GET, "/ui/app.js"),
    (GET, "/ui/style.css"),
    (GET, "/docs"),
];

/// The table entry of a route.
pub fn spec(method: &Method, path: &str) -> Option<&'static RouteSpec> {
    ROUTES
        .iter()
        .find(|r| r.method == *method && r.path == path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_listed_once_with_an_action() {
        let mut seen = std::collections::BTreeSet::new();
        for r in ROUTES {
            assert!(
                seen.insert((r.method.as_str(), r.path)),
                "{} {} listed twice",
                r.method,
                r.path
            );
            assert!(r.action.contains('.'), "{} {}: action", r.method, r.path);
        }
    }

    #[test]
    fn the_role_table_nests() {
        // Whatever a viewer may do, a developer may do (but metrics), and
        // so on up; an admin may do everything.
        for r in ROUTES {
            let p = r.permission;
            assert!(p.granted_to(Role::Admin));
            if p.granted_to(Role::Developer) {
                assert!(p.granted_to(Role::Operator), "{p:?}");
            }
        }
        assert!(!P::KeysAdmin.granted_to(Role::Operator));
        assert!(!P::TasksWrite.granted_to(Role::Viewer));
        assert!(!P::RegistryWrite.granted_to(Role::Developer));
        assert!(!P::Backup.granted_to(Role::Operator));
    }
}
