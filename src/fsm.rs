//! The replicated state machine: Godel's task queue as a pure function of its log.
//!
//! Every node applies the same committed [`Request`]s in the same order and so
//! holds the same [`State`]. Nothing here does I/O, reads a clock or draws a
//! random number: the leader stamps the time (`now_ms`) and a jitter seed into
//! each [`Batch`] before it proposes it, and [`State::apply`] derives all time
//! and randomness from those two fields. The same log always yields the same
//! state, byte for byte.
//!
//! # What the state holds
//!
//! - **Tasks**, keyed by [`TaskId`], assigned from a counter at apply time, so
//!   ids are dense, unique and in submission order (FIFO is id order).
//! - **The ready queue**: for each [`Priority`], for each tenant, for each
//!   distinct set of required capabilities, the ids of the `pending` tasks.
//!   Leasing walks priorities from critical to low and stops at the first
//!   priority with a task whose capabilities the agent has, so a lower priority
//!   is never leased while a matching higher one waits (strict priority).
//!   Within a priority, tenants are served by weighted round robin (each tenant
//!   takes up to its weight of consecutive leases before the turn moves on);
//!   within a tenant, the oldest matching task goes first.
//! - **Timers** as ordered sets of `(due_ms, task)`: scheduled tasks, failed
//!   tasks waiting out their backoff, lease expiries and attempt deadlines.
//!   Every batch first advances the state's clock to the batch's `now_ms`
//!   (never backwards) and fires what is due.
//! - **Leases** by [`FencingToken`]. Tokens come from one counter that only
//!   grows; a renew, complete or fail carrying a token that is not the task's
//!   live lease is rejected and changes nothing.
//!
//! # Invariants (checked by the property tests)
//!
//! - A task is in the ready queue iff its status is `pending`; the queue depth
//!   is exactly the number of pending tasks, per priority, tenant and status.
//! - A task has at most one live lease, and only while `leased` or `running`.
//! - An expired lease returns the task to `pending` without spending an
//!   attempt; a failure spends one and either waits out the backoff (`failed`)
//!   or, with no attempts left, goes to `dead_letter`.
//! - Terminal states (`completed`, `cancelled`) never change again;
//!   `dead_letter` changes only by an explicit replay (back to `pending`) or a
//!   cancel (an operator giving up on it for good).
//!
//! # Rejections
//!
//! Input that cannot be applied (stale token, unknown task, illegal
//! transition, bad field) is returned as a [`Rejection`] value and leaves the
//! state unchanged. There is no other failure mode: apply never returns an
//! error and never panics on input.
//!
//! # Shortcuts taken on purpose
//!
//! - One shard: the whole queue is one state, which gives strict global
//!   priority order. Sharding would partition by tenant later.
//! - Terminal tasks stay in the state until a [`Command::Purge`] forgets
//!   them (the leader proposes one from `queue.retain_finished` and
//!   `queue.retain_finished_max`): memory grows with the history kept.
//! - Listing with filters scans from the cursor; it is `O(scanned)`, not
//!   indexed by status.

mod audit;
mod auth;
mod command;
mod dispatch;
mod event;
mod flags;
mod idempotency;
mod lease;
mod plan;
mod query;
mod queue;
mod registry;
mod retry;
mod session;
mod state;
mod task;
mod usage;

pub use audit::{
    Audit, AuditAnchor, AuditCaller, AuditEntry, AuditFilter, AuditLog, AuditMark, AuditRecord,
    AuditTarget, ChainBroken, MAX_AUDIT_ENTRIES, verify as verify_audit_chain,
};
pub use auth::{
    ApiKeyId, ApiKeyRecord, Auth, Budget, KEY_TOUCH_EVERY_MS, KeyHash, NewApiKey, Role,
    TenantPatch, TenantRecord, TenantSettings,
};
pub(crate) use command::check_name;
pub use command::{
    AgentProfile, Batch, Command, DeadLetterFilter, DispatchPolicy, DispatchSpec, KillSwitch,
    LeaseGrant, Member, Outcome, PullSlot, PullSpec, Rejection, ReplaySelector, Reply, Request,
    Response, Scope, ShardPlacement, ShardRule, SubmitTask, SyncSwitch, SyncWeight, Write, pack,
    unpack,
};
pub use event::{AgentChange, Event, EventKind, GatewayChange, NodeChange, What};
pub use flags::{FeatureFlag, MAX_FLAGS};
pub use plan::{PullPlan, best_of, plan_from, plan_pull};
pub use query::{Depth, TaskFilter, TaskPage, merge_pages};
pub use registry::{
    AgentRecord, AgentRegistration, BACKPRESSURE_PERCENT, Circuit, GatewayId, GatewayRecord,
    GatewayRegistration, Health, MAX_AGENT_CAPACITY, MAX_SESSIONS_PER_GATEWAY, ManagedState,
    ManagedStatus, NodeRecord, Registry, accepts_new_session, new_session_room,
};
pub use retry::{Backoff, backoff_delay_ms};
pub use session::{
    AfterTask, Checkpoint, OpenSession, SessionId, SessionRecord, SessionState, Sessions, Turn,
    carried_context, gateway_session_key, payload_message,
};
pub(crate) use state::truncate;
pub use state::{Horizon, State, Synced, group_of, route};
pub use task::{
    AgentId, DependencyFailure, FencingToken, LeaseInfo, Limits, Payload, Priority, SessionKey,
    Task, TaskExtras, TaskId, TaskOutcome, TaskRegion, TaskStatus, Tenant,
};
pub use usage::{
    BudgetAlert, BudgetLevel, BudgetPeriod, BudgetUnit, Day, Ledger, ReportedUsage, TaskUsage,
    UsageKey, UsageTotals, WaitKey, WaitTotals, day_of, month_of, parse_usage,
};
