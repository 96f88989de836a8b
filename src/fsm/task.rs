//! Tasks, their identities and their lifecycle.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::retry::Backoff;

/// A task's identity: assigned at apply time from a counter, so ids are dense
/// and follow submission order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(pub u64);

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A lease's fencing token: one counter for the whole queue, only ever grows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FencingToken(pub u64);

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }
    };
}

/// The tenant a task belongs to; dispatch is fair across tenants.
///
/// Shared text (`Arc<str>`): the state hands every task of a tenant the
/// same copy of its name (see `State::tenant_named`), and a clone is a
/// count, not an allocation.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Tenant(pub std::sync::Arc<str>);

impl fmt::Display for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Tenant {
    fn from(s: &str) -> Self {
        Self(s.into())
    }
}

impl From<String> for Tenant {
    fn from(s: String) -> Self {
        Self(s.into())
    }
}

impl Tenant {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
string_id!(
    /// The worker that holds a lease.
    AgentId
);
string_id!(
    /// Session affinity: tasks with the same key run in the same gateway session.
    SessionKey
);

/// Task priority. `Ord` follows urgency: `Critical` is the greatest.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Served last.
    Low,
    /// The default.
    #[default]
    Medium,
    /// Served before medium and low.
    High,
    /// Served before everything else.
    Critical,
}

impl Priority {
    /// All priorities, most urgent first: the order the dispatcher walks.
    pub const URGENT_FIRST: [Priority; 4] = [
        Priority::Critical,
        Priority::High,
        Priority::Medium,
        Priority::Low,
    ];

    /// Index into per-priority arrays (0 = critical).
    pub fn rank(self) -> usize {
        match self {
            Priority::Critical => 0,
            Priority::High => 1,
            Priority::Medium => 2,
            Priority::Low => 3,
        }
    }

    /// The lowercase name used in the API and in metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::High => "high",
            Priority::Medium => "medium",
            Priority::Low => "low",
        }
    }
}

impl std::str::FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Priority::URGENT_FIRST
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                format!("unknown priority `{s}` (expected critical, high, medium or low)")
            })
    }
}

/// Where a task is in its life. Every legal move is listed in
/// [`TaskStatus::can_become`]; nothing else changes a status.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Ready to be leased.
    Pending,
    /// Waiting for its `scheduled_at`.
    Scheduled,
    /// Leased to an agent that has not reported it running yet ("assigned").
    #[serde(alias = "assigned")]
    Leased,
    /// Leased, and the agent has renewed the lease at least once.
    Running,
    /// Done, with a result. Terminal.
    Completed,
    /// The last attempt failed; waiting out the backoff before the next one.
    Failed,
    /// Cancelled by an operator. Terminal.
    Cancelled,
    /// Out of attempts; waits in the dead-letter queue for a replay.
    DeadLetter,
    /// Waits for the tasks it depends on to complete (`depends_on`).
    Waiting,
    /// Waits for an operator or admin to approve or reject it; it may
    /// lapse (cancelled) at `approval.expires_at_ms`.
    AwaitingApproval,
}

impl TaskStatus {
    /// Every status, in declaration order.
    pub const ALL: [TaskStatus; 10] = [
        TaskStatus::Pending,
        TaskStatus::Scheduled,
        TaskStatus::Leased,
        TaskStatus::Running,
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
        TaskStatus::DeadLetter,
        TaskStatus::Waiting,
        TaskStatus::AwaitingApproval,
    ];

    /// Whether the task holds a live lease (`leased` or `running`).
    pub fn is_leased(self) -> bool {
        matches!(self, TaskStatus::Leased | TaskStatus::Running)
    }

    /// The one table of legal transitions.
    pub fn can_become(self, to: TaskStatus) -> bool {
        use TaskStatus::*;
        matches!(
            (self, to),
            (Pending, Leased | Cancelled)
                | (Scheduled, Pending | Cancelled)
                | (
                    Leased,
                    Running | Pending | Completed | Failed | DeadLetter | Cancelled
                )
                | (
                    Running,
                    Pending | Completed | Failed | DeadLetter | Cancelled
                )
                | (Failed, Pending | Cancelled)
                | (DeadLetter, Pending | Cancelled)
                | (Waiting, Pending | Scheduled | Cancelled)
                | (AwaitingApproval, Pending | Scheduled | Waiting | Cancelled)
        )
    }

    /// Completed and cancelled tasks never change again.
    pub fn is_terminal(self) -> bool {
        matches!(self, TaskStatus::Completed | TaskStatus::Cancelled)
    }

    /// Statuses that end an acknowledged task's journey (DESIGN non-negotiable 1).
    pub fn is_final(self) -> bool {
        self.is_terminal() || self == TaskStatus::DeadLetter
    }

    /// Index into per-status arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The snake_case name used in the API and in metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::Scheduled => "scheduled",
            TaskStatus::Leased => "leased",
            TaskStatus::Running => "running",
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
            TaskStatus::DeadLetter => "dead_letter",
            TaskStatus::Waiting => "waiting",
            TaskStatus::AwaitingApproval => "awaiting_approval",
        }
    }
}

impl std::str::FromStr for TaskStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "assigned" {
            return Ok(TaskStatus::Leased);
        }
        TaskStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown status `{s}`"))
    }
}

/// Where a task's payload (JSON object text) is.
///
/// A node's state machine keeps payloads out of memory: a task it applies
/// hands its payload to the store (written beside the state, under the
/// task's id) and keeps [`Payload::Stored`]; a snapshot carries the stored
/// payloads after the state. A state used on its own (tests, tools) and a
/// task in a durable session (whose turns quote its prompt at apply) hold
/// theirs. Persisted: never reorder the variants.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    /// In the state.
    Held(Box<str>),
    /// In the node's store, under the task's id.
    Stored,
}

impl Payload {
    /// The text, when the state holds it.
    pub fn held(&self) -> Option<&str> {
        match self {
            Payload::Held(text) => Some(text),
            Payload::Stored => None,
        }
    }
}

impl From<&str> for Payload {
    fn from(text: &str) -> Self {
        Payload::Held(text.into())
    }
}

impl From<String> for Payload {
    fn from(text: String) -> Self {
        Payload::Held(text.into_boxed_str())
    }
}

/// The live lease of a leased or running task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    /// The fencing token every report about this attempt must carry.
    pub token: FencingToken,
    /// Who holds it.
    pub agent_id: AgentId,
    /// When the lease was granted (start of the attempt).
    pub leased_at_ms: u64,
    /// When it lapses unless renewed.
    pub expires_at_ms: u64,
    /// The gateway of the agent that holds it (none: a worker that leased
    /// by itself and is not registered on one), for the accounting.
    pub gateway: Option<super::registry::GatewayId>,
}

/// A task and everything the queue knows about it.
///
/// The fields most tasks never set live in [`TaskExtras`] and those an
/// attempt's end sets in [`TaskOutcome`], each boxed and absent until one
/// of its fields is set, so a plain pending task carries neither's space
/// (a queue's depth is mostly such tasks). Read them through
/// [`Task::extras`] and [`Task::outcome`], change them through the `_mut`
/// forms.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// Identity, in submission order.
    pub id: TaskId,
    /// Owner, for fairness and filtering.
    pub tenant: Tenant,
    /// Dispatch priority.
    pub priority: Priority,
    /// Current status.
    pub status: TaskStatus,
    /// What a dependency that is dead-lettered or cancelled does to it.
    pub on_dependency_failure: DependencyFailure,
    /// Failed attempts allowed before the dead-letter queue.
    pub max_attempts: u32,
    /// Failed attempts so far (an expired lease does not count).
    pub attempts: u32,
    /// Leases granted so far, including expired ones.
    pub lease_count: u32,
    /// The work, as JSON object text (validated at submit): in the state,
    /// or kept by the node's store beside it (see [`Payload`]).
    pub payload: Payload,
    /// Capabilities an agent must have, sorted and without duplicates;
    /// shared by the tasks of a state that need the same set
    /// ([`crate::fsm::State`] hands out one copy of each).
    pub capabilities: std::sync::Arc<[String]>,
    /// Session affinity key.
    pub session_key: Option<SessionKey>,
    /// Longest one attempt may take, from lease to report.
    pub timeout_ms: u64,
    /// Retry backoff policy.
    pub backoff: Backoff,
    /// Client key that makes submission idempotent within the tenant.
    pub idempotency_key: Option<Box<str>>,
    /// The live lease, while leased or running.
    pub lease: Option<Box<LeaseInfo>>,
    /// Submission time.
    pub created_at_ms: u64,
    /// Time of the last change.
    pub updated_at_ms: u64,
    /// What most tasks leave unset (see [`Task::extras`]).
    pub extras: Option<Box<TaskExtras>>,
    /// What its attempts' ends recorded (see [`Task::outcome`]).
    pub outcome: Option<Box<TaskOutcome>>,
}

/// The fields of a [`Task`] most tasks never set: a schedule, a parent, a
/// trace, a region, dependencies, an approval.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskExtras {
    /// When the task may first run (ms since the epoch).
    pub scheduled_at_ms: Option<u64>,
    /// The task that spawned this one.
    pub parent_id: Option<TaskId>,
    /// The trace its submission carried, if it carried one (see
    /// [`Task::trace`]); each attempt is a span in it.
    pub trace: Option<crate::trace::TraceContext>,
    /// The region it should (or must) run in: its agent's gateway's region.
    pub region: Option<TaskRegion>,
    /// The tasks it runs after (each must complete first), as submitted.
    pub depends_on: Vec<TaskId>,
    /// Those of `depends_on` that have not completed yet, while waiting.
    pub waiting_on: Vec<TaskId>,
    /// While waiting: why it cannot go on (a dependency dead-lettered or
    /// cancelled, under [`DependencyFailure::Block`]).
    pub blocked: Option<String>,
    /// For a task submitted with `requires_approval`: when the request
    /// lapses, and the decision once made.
    pub approval: Option<Box<Approval>>,
    /// When it became ready to lease after waiting, before its first
    /// lease: for its scheduled time, approval or dependencies (`None`:
    /// ready from submission). Its queue wait counts from here.
    pub ready_at_ms: Option<u64>,
}

impl TaskExtras {
    /// All unset: what [`Task::extras`] reads for a task without any.
    pub const NONE: TaskExtras = TaskExtras {
        scheduled_at_ms: None,
        parent_id: None,
        trace: None,
        region: None,
        depends_on: Vec::new(),
        waiting_on: Vec::new(),
        blocked: None,
        approval: None,
        ready_at_ms: None,
    };
}

/// The fields of a [`Task`] its attempts' ends set: who ran it last, its
/// result or last error, when it retries, what it used.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskOutcome {
    /// The agent of the last lease, kept after it ends.
    pub last_agent: Option<AgentId>,
    /// When the next attempt becomes ready, while failed.
    pub next_attempt_at_ms: Option<u64>,
    /// The result reported by the completing agent (JSON text).
    pub result: Option<String>,
    /// The last error reported or recorded.
    pub last_error: Option<String>,
    /// What its completed attempt used, when its result reported tokens
    /// ([`super::usage`]).
    pub usage: Option<super::usage::TaskUsage>,
}

impl TaskOutcome {
    /// All unset: what [`Task::outcome`] reads for a task without any.
    pub const NONE: TaskOutcome = TaskOutcome {
        last_agent: None,
        next_attempt_at_ms: None,
        result: None,
        last_error: None,
        usage: None,
    };
}

/// A task's approval: asked at submission, decided by an operator or
/// admin (`POST /tasks/{id}/approve` or `/reject`), or lapsed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// When an undecided request lapses and the task is cancelled (ms
    /// since the epoch); `None`: it waits for a decision for good.
    pub expires_at_ms: Option<u64>,
    /// The decision, once made.
    pub decision: Option<ApprovalDecision>,
}

/// Who decided a task's approval, how, why and when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalDecision {
    /// Approved (it goes on) or rejected (cancelled).
    pub approved: bool,
    /// The credential that decided (its audit name).
    pub by: String,
    /// The reason given.
    pub reason: Option<String>,
    /// When (ms since the epoch).
    pub at_ms: u64,
}

/// What a task does when a task it depends on is dead-lettered or
/// cancelled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DependencyFailure {
    /// It is cancelled, with the dependency named as the reason (and its
    /// own dependents after it, by their policies).
    #[default]
    Cancel,
    /// It keeps waiting, blocked, with the reason shown: a replay or retry
    /// of the dependency that then completes lets it go on; an operator may
    /// cancel it.
    Block,
}

impl DependencyFailure {
    /// The name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            DependencyFailure::Cancel => "cancel",
            DependencyFailure::Block => "block",
        }
    }
}

/// Where a task runs: the region of the gateway its agent is on.
///
/// - **required**: only agents of gateways in `name` take it. With none
///   that can, it waits (its view says why); it is never sent elsewhere.
/// - **preferred**: agents outside `name` take it only when no agent of a
///   gateway in `name` that could run it (online, usable, capabilities)
///   has free capacity in the dispatch round. Strict priority holds among
///   the tasks an agent may take, so an agent outside the region may take
///   a lower-priority task while a higher one waits for a free agent of
///   its own region in the same round.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRegion {
    /// The region label (as on nodes and gateways).
    pub name: String,
    /// Whether it must run there (else it only prefers to).
    pub required: bool,
}

impl Task {
    /// Its rarely set fields (all unset when it has none).
    pub fn extras(&self) -> &TaskExtras {
        static NONE: TaskExtras = TaskExtras::NONE;
        self.extras.as_deref().unwrap_or(&NONE)
    }

    /// Its rarely set fields, to change (boxed on first use).
    pub fn extras_mut(&mut self) -> &mut TaskExtras {
        self.extras.get_or_insert_with(Box::default)
    }

    /// What its attempts' ends recorded (all unset before the first).
    pub fn outcome(&self) -> &TaskOutcome {
        static NONE: TaskOutcome = TaskOutcome::NONE;
        self.outcome.as_deref().unwrap_or(&NONE)
    }

    /// What its attempts' ends recorded, to change (boxed on first use).
    pub fn outcome_mut(&mut self) -> &mut TaskOutcome {
        self.outcome.get_or_insert_with(Box::default)
    }

    /// Sets what it waits on and why it is blocked; boxes nothing when
    /// both are empty and it has no extras.
    pub(crate) fn set_waiting(&mut self, waiting_on: Vec<TaskId>, blocked: Option<String>) {
        if waiting_on.is_empty() && blocked.is_none() && self.extras.is_none() {
            return;
        }
        let x = self.extras_mut();
        x.waiting_on = waiting_on;
        x.blocked = blocked;
    }

    /// Sets why it is blocked (see [`Task::set_waiting`]).
    pub(crate) fn set_blocked(&mut self, blocked: Option<String>) {
        if blocked.is_some() || self.extras.is_some() {
            self.extras_mut().blocked = blocked;
        }
    }

    /// It waits on nothing any more.
    pub(crate) fn stop_waiting(&mut self) {
        self.set_waiting(Vec::new(), None);
    }

    /// No next attempt is due (it left the failed state).
    pub(crate) fn clear_next_attempt(&mut self) {
        if let Some(o) = self.outcome.as_deref_mut() {
            o.next_attempt_at_ms = None;
        }
    }

    /// Whether an agent in `region` (none: a worker on no gateway) may run
    /// the task: it names no region, only prefers one, or requires this one.
    pub fn may_run_in(&self, region: Option<&str>) -> bool {
        self.extras()
            .region
            .as_ref()
            .is_none_or(|r| !r.required || region == Some(r.name.as_str()))
    }

    /// The task's trace: the one its submission carried, else one derived
    /// from its id and creation time (the same on every node).
    pub fn trace(&self) -> crate::trace::TraceContext {
        self.extras()
            .trace
            .unwrap_or_else(|| crate::trace::TraceContext::derived(self.id.0, self.created_at_ms))
    }
}

/// Bounds on what a submission may carry. Enforced at apply (so replicas agree)
/// and by the API before proposing (so bad input costs no log entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits;

impl Limits {
    /// Largest task payload, in bytes of JSON text.
    pub const MAX_PAYLOAD_BYTES: usize = 256 * 1024;
    /// Largest completion result, in bytes of JSON text.
    pub const MAX_RESULT_BYTES: usize = 256 * 1024;
    /// Longest error message kept from a failure report, in bytes.
    pub const MAX_ERROR_BYTES: usize = 4 * 1024;
    /// Longest tenant name, session key, idempotency key or capability, in bytes.
    pub const MAX_NAME_BYTES: usize = 256;
    /// Most required capabilities on one task.
    pub const MAX_CAPABILITIES: usize = 32;
    /// Most tasks one task may depend on.
    pub const MAX_DEPENDENCIES: usize = 64;
    /// Longest an approval request may wait before it lapses, in ms (30 days).
    pub const MAX_APPROVAL_MS: u64 = 30 * 24 * 3600 * 1000;
    /// Most attempts a task may be given.
    pub const MAX_ATTEMPTS: u32 = 100;
    /// Shortest and longest attempt timeout, in ms.
    pub const TIMEOUT_MS_RANGE: (u64, u64) = (100, 7 * 24 * 3600 * 1000);
    /// Most tasks one lease request may take.
    pub const MAX_LEASES_PER_REQUEST: u32 = 1000;
    /// Most leases one dispatch round grants, and most tokens in one batched
    /// renew or release.
    pub const MAX_DISPATCH: u32 = 10_000;
    /// Shortest and longest lease, in ms.
    pub const LEASE_MS_RANGE: (u64, u64) = (100, 3600 * 1000);
    /// Most dead letters one replay may move.
    pub const MAX_REPLAY: usize = 10_000;
    /// Most finished tasks one purge forgets.
    pub const MAX_PURGE: u32 = 10_000;
    /// Most leases of one task that may end without a result (expired or
    /// given back: they spend no attempt) before the task is dead-lettered,
    /// so a task that kills or hangs every agent it reaches stops looping.
    pub const MAX_LOST_LEASES: u32 = 50;
}
