//! What applying the log emits: every change an observer may care about
//! (tasks, sessions, gateways, agents, nodes, audit entries), numbered in
//! commit order.
//!
//! Events are made by `apply`, so every node makes the same events with the
//! same `seq` from the same log: the event stream (`GET /api/v1/events`)
//! served by any node is the cluster's, each event once, in commit order.
//! They live in memory only (the log is their source); a snapshot carries
//! the last `seq` handed out.

use super::audit::AuditEntry;
use super::registry::{Circuit, GatewayId, Health, NodeId};
use super::session::{SessionId, SessionState};
use super::task::{AgentId, FencingToken, Priority, TaskId, Tenant};

/// One thing that happened, and its place in the cluster's history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// 1, 2, 3, … over the cluster's life, the same on every node.
    pub seq: u64,
    /// What happened.
    pub what: What,
}

/// The kinds of thing that happen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum What {
    /// To a task.
    Task {
        /// The task.
        task: TaskId,
        /// Its tenant.
        tenant: Tenant,
        /// Its priority (a metrics label).
        priority: Priority,
        /// What happened.
        kind: EventKind,
    },
    /// A gateway session moved to `state`.
    Session {
        /// The session.
        id: SessionId,
        /// Its tenant.
        tenant: Tenant,
        /// Its gateway.
        gateway: GatewayId,
        /// Its new state.
        state: SessionState,
        /// Why, for an end.
        reason: Option<String>,
    },
    /// To a gateway.
    Gateway {
        /// The gateway.
        id: GatewayId,
        /// What changed.
        change: GatewayChange,
    },
    /// To an agent.
    Agent {
        /// The agent.
        id: AgentId,
        /// What changed.
        change: AgentChange,
    },
    /// To a node.
    Node {
        /// The node.
        id: NodeId,
        /// What changed.
        change: NodeChange,
    },
    /// An audit entry was appended.
    Audit(AuditEntry),
    /// A tenant's budget limit crossed a level.
    Budget(super::usage::BudgetAlert),
    /// A session's checkpoint was taken.
    Checkpoint {
        /// The session.
        session: SessionId,
        /// Its tenant.
        tenant: Tenant,
        /// The checkpoint's number.
        seq: u64,
        /// Its name, if an operator gave one.
        name: Option<String>,
    },
}

/// The kinds of task events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Accepted into the queue (pending or scheduled).
    Submitted,
    /// A scheduled or failed task became ready.
    Ready,
    /// Leased to an agent.
    Leased {
        /// The lease.
        token: FencingToken,
        /// The agent.
        agent: AgentId,
    },
    /// The agent reported it running.
    Started,
    /// Completed.
    Completed,
    /// An attempt failed; the task waits until `retry_at_ms`.
    Failed {
        /// Next attempt.
        retry_at_ms: u64,
    },
    /// Out of attempts, or failed as not retryable.
    DeadLettered,
    /// Cancelled.
    Cancelled,
    /// The lease lapsed without renewal; the task is ready again.
    LeaseExpired {
        /// The lapsed lease.
        token: FencingToken,
    },
    /// An attempt ran past the task's timeout (counts as a failure).
    TimedOut {
        /// The attempt's lease.
        token: FencingToken,
    },
    /// Made ready by an operator (retry or replay).
    Requeued,
    /// The agent gave the lease back; the task is ready again.
    Released {
        /// The released lease.
        token: FencingToken,
    },
    /// Every task it depends on completed: it left `waiting` (pending, or
    /// scheduled until its `scheduled_at`).
    DependenciesMet,
    /// A task it depends on was dead-lettered or cancelled and its policy
    /// is `block`: it keeps waiting, with the reason.
    Blocked {
        /// The dependency.
        dependency: TaskId,
    },
    /// An operator or admin approved it.
    Approved {
        /// Who.
        by: String,
    },
    /// An operator or admin rejected it: it is cancelled.
    Rejected {
        /// Who.
        by: String,
    },
    /// Its approval request lapsed undecided: it is cancelled.
    ApprovalExpired,
}

/// What changed about a gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GatewayChange {
    /// Registered anew.
    Registered,
    /// Its registration was replaced.
    Updated,
    /// Removed.
    Deregistered,
    /// Its probed health or breaker state changed.
    Health {
        /// The new health.
        health: Health,
        /// The new breaker state.
        circuit: Circuit,
    },
    /// A node (or none) now runs it.
    Placed {
        /// The new owner.
        owner: Option<NodeId>,
        /// Its fencing token now (raised when placed on a node).
        token: u64,
    },
    /// A managed gateway's process changed state.
    Process {
        /// The new state.
        state: super::registry::ManagedState,
    },
}

/// What changed about an agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentChange {
    /// Registered anew.
    Registered {
        /// Its gateway.
        gateway: GatewayId,
    },
    /// Its registration was replaced.
    Updated {
        /// Its gateway.
        gateway: GatewayId,
    },
    /// Removed.
    Deregistered,
    /// Its actor announced itself on a node.
    Online {
        /// The node.
        node: NodeId,
    },
    /// Its own circuit breaker changed state.
    Circuit {
        /// The new state.
        circuit: super::registry::Circuit,
    },
    /// Its actor fell silent: it takes no work until heard again.
    Silent,
    /// Its actor is heard again after being silent.
    Heard,
}

/// What changed about a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeChange {
    /// Became a member of the Raft group.
    Joined {
        /// A voter (else a learner).
        voter: bool,
    },
    /// Left the Raft group.
    Left,
    /// Marked draining.
    Draining,
    /// Its drain was lifted.
    Undrained,
    /// Became the leader, for `term`.
    LeaderChanged {
        /// The new term.
        term: u64,
    },
}

impl What {
    /// The event's type on the stream: `<subject>.<verb>`, the segments a
    /// subscription pattern matches.
    pub fn name(&self) -> &'static str {
        match self {
            What::Task { kind, .. } => match kind {
                EventKind::Submitted => "task.created",
                EventKind::Ready => "task.ready",
                EventKind::Leased { .. } => "task.leased",
                EventKind::Started => "task.started",
                EventKind::Completed => "task.completed",
                EventKind::Failed { .. } => "task.failed",
                EventKind::DeadLettered => "task.dead_lettered",
                EventKind::Cancelled => "task.cancelled",
                EventKind::LeaseExpired { .. } => "task.lease_expired",
                EventKind::TimedOut { .. } => "task.timed_out",
                EventKind::Requeued => "task.retried",
                EventKind::Released { .. } => "task.released",
                EventKind::DependenciesMet => "task.dependencies_met",
                EventKind::Blocked { .. } => "task.blocked",
                EventKind::Approved { .. } => "task.approved",
                EventKind::Rejected { .. } => "task.rejected",
                EventKind::ApprovalExpired => "task.approval_expired",
            },
            What::Session { state, .. } => match state {
                SessionState::Created => "session.created",
                SessionState::Initializing => "session.initializing",
                SessionState::Ready => "session.ready",
                SessionState::Running => "session.running",
                SessionState::Completing => "session.completing",
                SessionState::Completed => "session.completed",
                SessionState::Failed => "session.failed",
                SessionState::Cancelled => "session.cancelled",
                SessionState::Timeout => "session.timeout",
                SessionState::Error => "session.error",
                SessionState::Paused => "session.paused",
                SessionState::Resuming => "session.resuming",
                SessionState::Migrating => "session.migrating",
                SessionState::Archived => "session.archived",
            },
            What::Checkpoint { .. } => "session.checkpoint",
            What::Gateway { change, .. } => match change {
                GatewayChange::Registered => "gateway.registered",
                GatewayChange::Updated => "gateway.updated",
                GatewayChange::Deregistered => "gateway.deregistered",
                GatewayChange::Health { .. } => "gateway.health",
                GatewayChange::Placed { .. } => "gateway.placed",
                GatewayChange::Process { .. } => "gateway.process",
            },
            What::Agent { change, .. } => match change {
                AgentChange::Registered { .. } => "agent.registered",
                AgentChange::Updated { .. } => "agent.updated",
                AgentChange::Deregistered => "agent.deregistered",
                AgentChange::Online { .. } => "agent.online",
                AgentChange::Circuit { .. } => "agent.circuit",
                AgentChange::Silent => "agent.silent",
                AgentChange::Heard => "agent.heard",
            },
            What::Node { change, .. } => match change {
                NodeChange::Joined { .. } => "node.joined",
                NodeChange::Left => "node.left",
                NodeChange::Draining => "node.draining",
                NodeChange::Undrained => "node.undrained",
                NodeChange::LeaderChanged { .. } => "node.leader_changed",
            },
            What::Audit(_) => "audit.entry",
            What::Budget(a) => match a.level {
                super::usage::BudgetLevel::Soft => "tenant.budget_soft_limit",
                super::usage::BudgetLevel::Exhausted => "tenant.budget_exhausted",
            },
        }
    }

    /// The tenant the event belongs to; `None` for the cluster's own
    /// objects (gateways, agents, nodes).
    pub fn tenant(&self) -> Option<&str> {
        match self {
            What::Task { tenant, .. }
            | What::Session { tenant, .. }
            | What::Checkpoint { tenant, .. } => Some(&tenant.0),
            What::Audit(e) => Some(&e.tenant),
            What::Budget(a) => Some(&a.tenant.0),
            What::Gateway { .. } | What::Agent { .. } | What::Node { .. } => None,
        }
    }
}
