//! What the log carries (`Request`), what applying it returns (`Response`), and
//! the events it emits.
//!
//! These types are persisted in the Raft log and sent between nodes with
//! bincode, which has no schema evolution: variants are only ever appended,
//! never reordered, renamed or removed, and no field uses `serde_json::Value`,
//! `untagged`, `flatten` or `skip_serializing_if`.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::audit::{Audit, AuditCaller, AuditMark, AuditRecord};
use super::auth::{ApiKeyId, ApiKeyRecord, NewApiKey, TenantPatch, TenantRecord};
use super::registry::{AgentRegistration, Circuit, GatewayId, GatewayRegistration, Health, NodeId};
use super::retry::Backoff;
use super::session::{OpenSession, SessionId, SessionRecord, SessionState};
use super::task::{
    AgentId, FencingToken, Limits, Priority, SessionKey, Task, TaskId, TaskStatus, Tenant,
};
use super::usage::ReportedUsage;

/// One Raft log entry's application payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Many client commands sharing one entry (and so one fsync).
    Batch(Batch),
}

/// Commands stamped by the leader with the time and a jitter seed.
///
/// Commands proposed on behalf of an API caller carry an [`AuditMark`] at
/// their index in `audit`: which caller asked (an index into `callers`,
/// where each caller of the batch appears once, so the hundred submissions
/// of one client in an entry share one record), whether the command is
/// confined to the caller's tenant, and what it is about. Applying such a
/// command appends its audit entry in the same step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// Leader wall-clock time, ms since the epoch. The state's clock never goes back.
    pub now_ms: u64,
    /// Entropy for backoff jitter; each command derives its own from it.
    pub seed: u64,
    /// The commands, applied in order.
    pub commands: Vec<Command>,
    /// The API callers of the audited commands, each once.
    pub callers: Vec<AuditCaller>,
    /// `audit[i]` marks `commands[i]` as asked for by an API caller; shorter
    /// than `commands` (or empty) when the rest are the runtime's own.
    pub audit: Vec<Option<AuditMark>>,
}

impl Batch {
    /// A batch of the runtime's own commands (nothing to audit).
    pub fn unaudited(now_ms: u64, seed: u64, commands: Vec<Command>) -> Self {
        Batch {
            now_ms,
            seed,
            commands,
            callers: Vec::new(),
            audit: Vec::new(),
        }
    }

    /// A batch of `writes`, each caller recorded once.
    pub fn of(now_ms: u64, seed: u64, writes: Vec<Write>) -> Self {
        let (commands, callers, audit) = pack(writes);
        Batch {
            now_ms,
            seed,
            commands,
            callers,
            audit,
        }
    }
}

/// A command on its way to the log, with the API caller it is audited for
/// (none: the runtime's own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    /// The command.
    pub command: Command,
    /// Who asked for it, if an API caller did.
    pub audit: Option<Audit>,
}

impl From<Command> for Write {
    fn from(command: Command) -> Self {
        Write {
            command,
            audit: None,
        }
    }
}

/// Writes packed for the wire: commands, their callers each once, and the
/// marks tying them (what [`Batch`] carries, and what a follower forwards).
pub fn pack(writes: Vec<Write>) -> (Vec<Command>, Vec<AuditCaller>, Vec<Option<AuditMark>>) {
    let mut commands = Vec::with_capacity(writes.len());
    let mut callers: Vec<AuditCaller> = Vec::new();
    let mut audit = Vec::new();
    for (i, w) in writes.into_iter().enumerate() {
        commands.push(w.command);
        let Some(a) = w.audit else { continue };
        let caller = match callers.iter().position(|c| *c == a.caller) {
            Some(k) => k,
            None => {
                callers.push(a.caller);
                callers.len() - 1
            }
        };
        audit.resize(i, None);
        audit.push(Some(AuditMark {
            caller: caller as u32,
            scoped: a.scoped,
            target: a.target,
        }));
    }
    (commands, callers, audit)
}

/// The inverse of [`pack`]: each command with its caller (shared, not
/// copied). Marks naming no caller are dropped, as apply would refuse them.
pub fn unpack(
    commands: Vec<Command>,
    callers: &[AuditCaller],
    audit: Vec<Option<AuditMark>>,
) -> Vec<Write> {
    let mut marks = audit.into_iter();
    commands
        .into_iter()
        .map(|command| {
            let audit = marks.next().flatten().and_then(|m| {
                callers.get(m.caller as usize).map(|c| Audit {
                    caller: c.clone(),
                    scoped: m.scoped,
                    target: m.target,
                })
            });
            Write { command, audit }
        })
        .collect()
}

/// One state change request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Add a task.
    Submit(SubmitTask),
    /// Lease up to `max` ready tasks to an agent.
    Lease {
        /// The leasing agent.
        agent_id: AgentId,
        /// What the agent can do; a task's required capabilities must all be here.
        capabilities: Vec<String>,
        /// Most tasks to lease.
        max: u32,
        /// Lease length, in ms.
        lease_ms: u64,
    },
    /// Extend a live lease; marks a leased task running.
    Renew {
        /// The lease.
        token: FencingToken,
        /// New lease length from now, in ms.
        lease_ms: u64,
    },
    /// Finish an attempt successfully.
    Complete {
        /// The lease.
        token: FencingToken,
        /// The result, as JSON text.
        result: String,
    },
    /// Finish an attempt unsuccessfully.
    Fail {
        /// The lease.
        token: FencingToken,
        /// What went wrong.
        error: String,
        /// False sends the task straight to the dead-letter queue.
        retryable: bool,
        /// What the failed attempt used, when the worker reports it (each
        /// count capped at [`super::usage::MAX_REPORTED_TOKENS`]).
        usage: Option<ReportedUsage>,
    },
    /// Cancel a task that has not ended.
    Cancel {
        /// The task.
        id: TaskId,
        /// Why, for the record.
        reason: Option<String>,
        /// Leave its unfinished children (tasks whose `parent_id` it is)
        /// alone; by default they are cancelled too, and theirs after them.
        keep_children: bool,
    },
    /// Make a failed or dead-lettered task ready now.
    Retry {
        /// The task.
        id: TaskId,
    },
    /// Move dead letters back to the queue with fresh attempts.
    Replay {
        /// Which ones.
        selector: ReplaySelector,
        /// Most to move in this command.
        limit: u32,
    },
    /// Set a tenant's round-robin weight (default 1).
    SetTenantWeight {
        /// The tenant.
        tenant: Tenant,
        /// Consecutive leases the tenant may take per turn, 1..=1000.
        weight: u32,
    },
    /// Only advance the clock: fires due timers.
    Tick,
    /// Register a node, or refresh its heartbeat (at the batch's time).
    NodeHeartbeat {
        /// The node.
        id: u64,
        /// Its region.
        region: String,
        /// Its API address.
        api_addr: String,
    },
    /// Set or clear a node's drain flag.
    SetDrain {
        /// The node.
        id: u64,
        /// Draining or not.
        draining: bool,
    },
    /// Register or update a gateway.
    RegisterGateway(GatewayRegistration),
    /// Remove a gateway no agent is bound to.
    DeregisterGateway {
        /// The gateway.
        id: GatewayId,
    },
    /// Record a gateway's probed health and breaker state.
    ReportGateway {
        /// The gateway.
        id: GatewayId,
        /// Health.
        health: Health,
        /// Breaker state.
        circuit: Circuit,
    },
    /// Record which node runs a gateway.
    PlaceGateway {
        /// The gateway.
        id: GatewayId,
        /// The owner node, or none.
        owner: Option<u64>,
    },
    /// Register or update an agent.
    RegisterAgent(AgentRegistration),
    /// Remove an agent.
    DeregisterAgent {
        /// The agent.
        id: AgentId,
    },
    /// Record a new session on a gateway.
    OpenSession(OpenSession),
    /// Move a session along its lifecycle.
    MoveSession {
        /// The session.
        id: SessionId,
        /// The state to move to.
        to: SessionState,
        /// The task it runs (for `running`).
        task: Option<TaskId>,
        /// Why (kept for failures, kills and timeouts).
        reason: Option<String>,
    },
    /// The shard leader's matching of ready tasks to agents with free
    /// capacity, applied against the committed state (see `fsm::dispatch`).
    Dispatch(DispatchSpec),
    /// Extend many live leases at once (an agent's batched heartbeat).
    RenewMany {
        /// The leases.
        tokens: Vec<FencingToken>,
        /// New lease length from now, in ms.
        lease_ms: u64,
    },
    /// Give leases back: their tasks are ready again at once, without
    /// spending an attempt (an agent that restarted or left its node).
    Release {
        /// The leases; stale ones are skipped.
        tokens: Vec<FencingToken>,
    },
    /// End a live session as `cancelled`; its running attempt fails (retryable).
    KillSession {
        /// The session.
        id: SessionId,
        /// Why, for the record.
        reason: Option<String>,
    },
    /// An agent's actor is running on `node` and takes work from now on;
    /// the leases it names (its agent's, from an earlier incarnation that
    /// nobody runs any more) are given back first.
    AgentOnline {
        /// The agent.
        agent: AgentId,
        /// The node its actor runs on.
        node: u64,
        /// Leases to give back; only the agent's own live ones are.
        release: Vec<FencingToken>,
    },
    /// Record a new API key (its hash, never the key).
    CreateApiKey(NewApiKey),
    /// Record the first admin key, only if the cluster has never had a key
    /// (replies `Done` and changes nothing otherwise).
    BootstrapApiKey(NewApiKey),
    /// Revoke an API key (idempotent).
    RevokeApiKey {
        /// The key.
        id: ApiKeyId,
    },
    /// Record that nodes saw these keys used (at the batch's time).
    TouchApiKeys {
        /// The keys.
        ids: Vec<ApiKeyId>,
    },
    /// Create a tenant record with settings.
    CreateTenant {
        /// The tenant.
        tenant: Tenant,
        /// Its settings (unset fields: defaults).
        patch: TenantPatch,
    },
    /// Change a tenant's settings.
    UpdateTenant {
        /// The tenant.
        tenant: Tenant,
        /// The change.
        patch: TenantPatch,
    },
    /// Remove a tenant's record (refused while it has live keys or
    /// unfinished tasks).
    DeleteTenant {
        /// The tenant.
        tenant: Tenant,
    },
    /// Refuse JWTs carrying this `jti` until `until_ms` (their expiry).
    RevokeJti {
        /// The JWT id.
        jti: String,
        /// When the revocation may be forgotten, ms since the epoch.
        until_ms: u64,
    },
    /// Append an audit entry for a call refused before it became a command.
    Audit(AuditRecord),
    /// Record how many queue shards the cluster has (`cluster.shards`):
    /// set once, by the meta group's first leader; the same count again
    /// changes nothing, another is refused (the count is fixed at creation).
    DefineShards {
        /// Queue shards, 1..=64.
        count: u32,
        /// Where each shard's voters go; fixed with the count.
        #[serde(default)]
        placement: ShardPlacement,
    },
    /// A node's pull for its own agents: a dispatch round (see
    /// `fsm::dispatch`) in which only the agents it names take turns, each
    /// at most `free` tasks of at least `min_priority`.
    Pull(PullSpec),
    /// Make this state a queue shard's: the first command a shard group
    /// applies (proposed by its first leader). From then on it mints task
    /// ids, fencing tokens and session ids that carry the shard in their
    /// low byte, and refuses cluster-wide commands. Only a state that has
    /// minted nothing may become a shard; the same shard again changes
    /// nothing.
    DefineGroup {
        /// The shard, 1..=64.
        group: u32,
    },
    /// In a queue shard, after the meta group deregistered `agent`: give
    /// back every live lease it holds here (no attempt spent) and end its
    /// sessions here, as `DeregisterAgent` does in a one-group cluster.
    /// Refused where the agent is still registered.
    ReleaseAgent {
        /// The deregistered agent.
        agent: AgentId,
    },
    /// Grow the cluster's queue shards to `count` (more than it has, when
    /// it has more than one: a one-shard cluster's queue is the meta
    /// group's). Proposed by the meta leader once every node hosts the new
    /// groups; new tasks go to them only after an [`Command::OpenRoute`].
    /// The same count again changes nothing; fewer is refused (shards are
    /// not removed).
    GrowShards {
        /// Queue shards from now on, up to 64.
        count: u32,
        /// The meta group's voters as the proposing leader sees them: the
        /// voters each added shard's group is initialized with, by
        /// whichever meta leader gets there. Recorded with the first
        /// growth past the routed shards and kept until an epoch routes to
        /// them (a repeat, or a further growth before that, keeps them).
        voters: BTreeMap<NodeId, Member>,
    },
    /// Routing epoch `epoch`: new tasks go to shards `1..=count`. In the
    /// meta group, it opens the epoch (the next one, over every shard the
    /// cluster has); in a queue shard, it records that the epoch exists,
    /// so submissions routed by an earlier one are refused
    /// ([`Rejection::StaleRoute`]). `docs/shards.md`, "Changing the number
    /// of shards".
    OpenRoute {
        /// The epoch, from 2 (epoch 1 is the shards the cluster was
        /// created with).
        epoch: u32,
        /// The shards it routes over.
        count: u32,
        /// In the meta group: the revision of the weights and kill switches
        /// the added shards were brought up to; refused when a change came
        /// since (the leader syncs them again and retries), so no change
        /// misses a shard that tasks are about to reach. Ignored by a shard.
        sync_rev: u64,
    },
    /// A submission to a queue shard, routed by a node under routing
    /// epoch `epoch`. Refused when the shard has seen a later epoch (the
    /// node re-routes). With `lookback`, the shard takes the task only when
    /// it already holds its idempotency key (answering with that task) or
    /// its session (a live session, or an unfinished task, with its session
    /// key); otherwise it answers [`Reply::NotHere`] and changes nothing
    /// but its epoch.
    SubmitRouted {
        /// The routing epoch the node routed by.
        epoch: u32,
        /// Take it only if the key or session is here.
        lookback: bool,
        /// The task.
        task: SubmitTask,
    },
    /// Where queue shard `shard`'s voters go from now on, instead of the
    /// cluster's `shard_placement` (`None`: back to it). The shard's leader
    /// moves its voters to match, one membership change at a time.
    PlaceShard {
        /// The shard, `1..=` the cluster's count.
        shard: u32,
        /// Its placement; `None` to follow the cluster's again.
        rule: Option<ShardRule>,
    },
    /// Approve a task awaiting approval: it goes on (waiting on its
    /// dependencies, or ready, or scheduled).
    Approve {
        /// The task.
        id: TaskId,
        /// Who approves (the caller's audit name).
        by: String,
        /// Why, for the record.
        reason: Option<String>,
    },
    /// Reject a task awaiting approval: it is cancelled, with its children
    /// and, by their policy, its dependents.
    Reject {
        /// The task.
        id: TaskId,
        /// Who rejects (the caller's audit name).
        by: String,
        /// Why.
        reason: String,
    },
    /// Sets (or with `None` lifts) kill switch `name`: matching ready work
    /// is held (not leased) while it is on. Applied by the meta group (the
    /// record); queue shards take it by [`Command::SyncShard`].
    SetSwitch {
        /// The switch's name.
        name: String,
        /// What it stops; `None` lifts it.
        switch: Option<KillSwitch>,
    },
    /// In a queue shard: brings the shard's copy of what the meta group
    /// records for every shard (tenants' weights, kill switches) up to the
    /// meta group's. Each item carries the meta group's revision of its
    /// key; an item no newer than the revision the shard has already
    /// applied for that key changes nothing, so copies sent late or twice
    /// (the API's, the meta leader's reconciling) never undo a later one.
    SyncShard {
        /// Tenants' round-robin weights (`None`: back to the default).
        weights: Vec<SyncWeight>,
        /// Kill switches (`None`: lifted).
        switches: Vec<SyncSwitch>,
    },
    /// A tenant's budget limit crossed its soft share or was used up in a
    /// period, as the meta leader saw it: recorded once per tenant,
    /// period, unit and level, with an event (a repeat changes nothing).
    BudgetAlert(super::usage::BudgetAlert),
    /// Pause a live session: now if idle, once its task ends if one runs.
    PauseSession {
        /// The session.
        id: SessionId,
    },
    /// Resume a paused session (or call off a pause not done yet).
    ResumeSession {
        /// The session.
        id: SessionId,
    },
    /// Take a checkpoint of a live session.
    CheckpointSession {
        /// The session.
        id: SessionId,
        /// Its name, for the record.
        name: Option<String>,
    },
    /// Move a live session to another gateway (or any that takes its next
    /// task), from its last checkpoint: now if idle, once its task ends if
    /// one runs.
    MigrateSession {
        /// The session.
        id: SessionId,
        /// The gateway it must go to.
        gateway: Option<GatewayId>,
    },
    /// In a queue shard (which holds no registry): the meta group found
    /// `gateway` unusable (breaker open, or unhealthy), so the shard's
    /// sessions on it move on from their last checkpoint, as the meta
    /// group's own do when it applies the report.
    MoveSessionsOff {
        /// The gateway.
        gateway: GatewayId,
        /// Why, for the sessions' record.
        why: String,
    },
    /// Sets (or with `None` removes) feature flag `name`. Meta group only:
    /// agents read it from their node's replica when an attempt starts.
    SetFlag {
        /// The flag's name.
        name: String,
        /// The flag; `None` removes it.
        flag: Option<super::flags::FeatureFlag>,
    },
    /// A managed gateway's process, reported by its owner.
    ReportManaged {
        /// The gateway.
        id: GatewayId,
        /// The reporting node.
        node: NodeId,
        /// The process.
        status: super::registry::ManagedStatus,
    },
    /// An agent's own state, reported by the node it is online on: its
    /// breaker (by its actor) and whether its actor is silent (by the
    /// node's watch of its heartbeats). Each field given changes; from a
    /// node the agent is not online on, nothing does.
    ReportAgent {
        /// The agent.
        agent: AgentId,
        /// The reporting node.
        node: NodeId,
        /// Its breaker's state, if reported.
        circuit: Option<Circuit>,
        /// Silent (`true`) or heard again (`false`), if reported.
        silent: Option<bool>,
    },
    /// Forgets finished (completed or cancelled) tasks, oldest finished
    /// first: those that finished before `finished_before_ms`, and past
    /// those the oldest while more than `keep` remain; then dead letters
    /// dead-lettered (or last changed) before `dead_before_ms`, oldest
    /// first; at most `max` (1 to [`Limits::MAX_PURGE`]) in all in one
    /// command. Their idempotency keys are freed. A task that a waiting
    /// task still depends on is kept, and so is a dead letter with
    /// unfinished children (replayed and then cancelled, it cancels them).
    /// Proposed by a group's leader from `queue.retain_finished`,
    /// `queue.retain_finished_max` and `queue.retain_dead_letters`.
    Purge {
        /// Tasks that finished before this time go (ms since the epoch).
        finished_before_ms: u64,
        /// Past those, the oldest go while more than this many remain.
        keep: u64,
        /// Most tasks this command forgets.
        max: u32,
        /// Dead letters dead-lettered before this time go (0: none).
        dead_before_ms: u64,
    },
}

/// A meta group voter's addresses, as a growth records them
/// ([`Command::GrowShards`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Where its node-to-node transport listens.
    pub raft_addr: String,
    /// Where its HTTP API listens.
    pub api_addr: String,
    /// Its region.
    pub region: String,
}

/// One tenant's weight in a [`Command::SyncShard`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncWeight {
    /// The tenant.
    pub tenant: Tenant,
    /// Its weight (`None`: no record, the default).
    pub weight: Option<u32>,
    /// The meta group's revision of it.
    pub rev: u64,
}

/// One kill switch in a [`Command::SyncShard`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncSwitch {
    /// The switch's name.
    pub name: String,
    /// The switch (`None`: lifted).
    pub switch: Option<KillSwitch>,
    /// The meta group's revision of it.
    pub rev: u64,
}

/// A kill switch: stops dispatch of the work it matches at once.
///
/// A switch on tasks alone (a tenant, a capability, a share of them) holds
/// the matching ready tasks (still `pending`, never leased) until it is
/// lifted. A switch that also names a gateway kind or a model stops that
/// work from going to the agents of such gateways only: their turn passes
/// it by, and any other agent may take it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KillSwitch {
    /// Only this tenant's tasks (none: every tenant's).
    pub tenant: Option<Tenant>,
    /// Only tasks that need this capability (none: any).
    pub capability: Option<String>,
    /// Cancel matching tasks already leased (otherwise they finish).
    pub cancel_leased: bool,
    /// Why, for the record.
    pub reason: Option<String>,
    /// Who set it (the caller's audit name).
    pub by: String,
    /// When (ms since the epoch; set by the state machine).
    pub at_ms: u64,
    /// Only on agents of gateways of this driver kind (none: any).
    pub gateway_kind: Option<String>,
    /// Only on agents of gateways that run this model (their `model`;
    /// none: any).
    pub model: Option<String>,
    /// Only this share of the matching tasks, 1 to 100 (none: all): a task
    /// is in it by a hash of its id and the switch's name, the same on
    /// every replica and for the task's whole life.
    pub percent: Option<u8>,
    /// With a gateway kind or model: the gateways it matched when set (the
    /// meta group fills it from its registry), whose leased work
    /// `cancel_leased` cancels; a queue shard, which has no registry, takes
    /// it from its copy.
    pub gateways: Vec<GatewayId>,
}

impl KillSwitch {
    /// Whether it names a gateway kind or a model: it stops work on some
    /// agents rather than holding the work.
    pub fn on_agents(&self) -> bool {
        self.gateway_kind.is_some() || self.model.is_some()
    }

    /// Whether `task` is work it names (tenant, capability and share),
    /// whatever agent would take it; `name` is the switch's name.
    pub fn covers(&self, name: &str, task: &Task) -> bool {
        self.tenant.as_ref().is_none_or(|t| *t == task.tenant)
            && self
                .capability
                .as_ref()
                .is_none_or(|c| task.capabilities.contains(c))
            && self
                .percent
                .is_none_or(|p| rollout_bucket(name, task.id.0) < p)
    }

    /// Whether it holds `task` wherever it would run (a switch on tasks
    /// alone that covers it).
    pub fn holds(&self, name: &str, task: &Task) -> bool {
        !self.on_agents() && self.covers(name, task)
    }

    /// Whether it applies to agents of a gateway of `kind` running `model`.
    pub fn on_gateway(&self, kind: &str, model: Option<&str>) -> bool {
        self.on_agents()
            && self.gateway_kind.as_deref().is_none_or(|k| k == kind)
            && self.model.as_deref().is_none_or(|m| Some(m) == model)
    }

    /// Whether it stops every task on the agents it applies to.
    pub fn covers_all(&self) -> bool {
        self.tenant.is_none() && self.capability.is_none() && self.percent.is_none()
    }
}

/// What a kill switch or feature flag is scoped to, checked: names of the
/// right form, a known gateway kind, a share of 1 to 100.
pub(crate) fn check_scope(
    tenant: Option<&Tenant>,
    capability: Option<&str>,
    gateway_kind: Option<&str>,
    model: Option<&str>,
    percent: Option<u8>,
) -> Result<(), Rejection> {
    let bad = |(f, p): (&'static str, String)| Rejection::invalid(f, p);
    if let Some(t) = tenant {
        check_name("tenant", &t.0, false).map_err(bad)?;
    }
    if let Some(c) = capability {
        check_name("capability", c, false).map_err(bad)?;
    }
    if let Some(k) = gateway_kind
        && !super::registry::GATEWAY_KINDS.contains(&k)
    {
        return Err(Rejection::invalid(
            "gateway_kind",
            "must be sim, command, http or openclaw",
        ));
    }
    if let Some(m) = model {
        check_name("model", m, false).map_err(bad)?;
    }
    if percent.is_some_and(|p| !(1..=100).contains(&p)) {
        return Err(Rejection::invalid("percent", "must be 1..=100"));
    }
    Ok(())
}

/// Where `id` falls in 0..100 for a rollout named `salt`: FNV-1a of the
/// name, mixed with the id ([`mix`]), so every replica puts a task in the
/// same place and rollouts of different names pick independent shares.
///
/// [`mix`]: super::retry::mix
pub fn rollout_bucket(salt: &str, id: u64) -> u8 {
    let h = fnv1a(salt.bytes());
    (super::retry::mix(h ^ super::retry::mix(id)) % 100) as u8
}

/// FNV-1a of `bytes`: a fixed hash, the same on every replica.
pub(crate) fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A queue shard's own placement ([`Command::PlaceShard`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRule {
    /// Where its voters go.
    pub placement: ShardPlacement,
    /// With `regional`: the region its voters are in (one that has nodes);
    /// `None`: the shard's turn among the regions, as by default.
    pub home: Option<String>,
}

/// Where a queue shard's voters go (`cluster.shard_placement`). Every node
/// of the cluster keeps a replica of every shard; the others are learners.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardPlacement {
    /// `spread` when the cluster's voters are more than five and span three
    /// or more regions, else `every`.
    #[default]
    Auto,
    /// Every voter of the cluster.
    Every,
    /// Three voters in as many regions as there are (up to three), so a
    /// shard survives the loss of a region when there are three.
    Spread,
    /// Up to three voters in the shard's home region (the regions in name
    /// order, taken in turn by shard): low latency there, lost with it.
    Regional,
}

impl std::fmt::Display for ShardPlacement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ShardPlacement::Auto => "auto",
            ShardPlacement::Every => "every",
            ShardPlacement::Spread => "spread",
            ShardPlacement::Regional => "regional",
        })
    }
}

impl std::str::FromStr for ShardPlacement {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(ShardPlacement::Auto),
            "every" => Ok(ShardPlacement::Every),
            "spread" => Ok(ShardPlacement::Spread),
            "regional" => Ok(ShardPlacement::Regional),
            other => Err(format!(
                "unknown shard placement `{other}`: give auto, every, spread or regional"
            )),
        }
    }
}

/// Which groups apply a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Cluster-wide state: only the meta group.
    Meta,
    /// Tasks, leases and sessions: the meta group while the cluster has
    /// one shard, else the queue shards.
    Queue,
    /// Any group.
    Any,
}

impl Command {
    /// Which groups apply this command.
    pub fn scope(&self) -> Scope {
        match self {
            Command::Submit(_)
            | Command::Lease { .. }
            | Command::Renew { .. }
            | Command::Complete { .. }
            | Command::Fail { .. }
            | Command::Cancel { .. }
            | Command::Approve { .. }
            | Command::Reject { .. }
            | Command::Retry { .. }
            | Command::Replay { .. }
            | Command::OpenSession(_)
            | Command::MoveSession { .. }
            | Command::Dispatch(_)
            | Command::Pull(_)
            | Command::RenewMany { .. }
            | Command::Release { .. }
            | Command::KillSession { .. }
            | Command::PauseSession { .. }
            | Command::ResumeSession { .. }
            | Command::CheckpointSession { .. }
            | Command::MigrateSession { .. }
            | Command::MoveSessionsOff { .. }
            | Command::ReleaseAgent { .. }
            | Command::SubmitRouted { .. }
            | Command::SyncShard { .. } => Scope::Queue,
            Command::Tick
            | Command::Purge { .. }
            | Command::Audit(_)
            | Command::DefineGroup { .. }
            | Command::OpenRoute { .. } => Scope::Any,
            Command::NodeHeartbeat { .. }
            | Command::SetDrain { .. }
            | Command::RegisterGateway(_)
            | Command::DeregisterGateway { .. }
            | Command::ReportGateway { .. }
            | Command::PlaceGateway { .. }
            | Command::RegisterAgent(_)
            | Command::DeregisterAgent { .. }
            | Command::AgentOnline { .. }
            | Command::CreateApiKey(_)
            | Command::BootstrapApiKey(_)
            | Command::RevokeApiKey { .. }
            | Command::TouchApiKeys { .. }
            | Command::CreateTenant { .. }
            | Command::UpdateTenant { .. }
            | Command::DeleteTenant { .. }
            | Command::RevokeJti { .. }
            | Command::DefineShards { .. }
            | Command::GrowShards { .. }
            | Command::PlaceShard { .. }
            | Command::SetTenantWeight { .. }
            | Command::SetSwitch { .. }
            | Command::SetFlag { .. }
            | Command::ReportAgent { .. }
            | Command::ReportManaged { .. }
            | Command::BudgetAlert(_) => Scope::Meta,
        }
    }
}

/// How agents are chosen among those that can take a task.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DispatchPolicy {
    /// The agent with the fewest live leases first (ties by agent id).
    #[default]
    LeastLoaded,
    /// Agents take turns, one task each per round, from a rotating start.
    RoundRobin,
}

/// One dispatch round, stamped by the shard leader.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispatchSpec {
    /// Lease length, in ms.
    pub lease_ms: u64,
    /// Most leases in this round.
    pub max: u32,
    /// How agents are chosen.
    pub policy: DispatchPolicy,
    /// A node whose last heartbeat is older than this gets no leases.
    pub node_dead_after_ms: u64,
    /// Time limit of sessions opened by this round (0: none).
    pub session_limit_ms: u64,
    /// An idle session (no task) is closed after this long (0: never).
    pub session_idle_ms: u64,
    /// Sessions opened by this round take a checkpoint after every this
    /// many turns (0: only when asked).
    pub session_checkpoint_every: u32,
}

/// A node's pull for the agents it runs (`Command::Pull`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullSpec {
    /// The round's settings, as a dispatch round's.
    pub round: DispatchSpec,
    /// The pulling node: only agents online on it take turns.
    pub node: u64,
    /// The agents it pulls for.
    pub slots: Vec<PullSlot>,
}

/// One agent a node pulls for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullSlot {
    /// The agent.
    pub agent: AgentId,
    /// Most tasks to grant it: its free capacity as its node counts it.
    pub free: u32,
    /// Grant it only tasks of this priority or higher (another shard has
    /// one of this priority for it).
    pub min_priority: Priority,
    /// What a queue shard, which holds no registry, needs to know of the
    /// agent (the meta group checks its registry instead and ignores it).
    #[serde(default)]
    pub profile: Option<AgentProfile>,
}

/// An agent as its node's replica of the registry shows it, for a pull from
/// a queue shard.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentProfile {
    /// What it can do.
    pub capabilities: Vec<String>,
    /// Its gateway.
    pub gateway: GatewayId,
    /// Its gateway's region.
    pub region: String,
    /// Its capacity: the shard grants no more than this minus the leases
    /// the agent holds there.
    pub capacity: u32,
    /// New sessions its gateway may still open (below 90% of its limit,
    /// counted by the node over every shard).
    pub session_room: u32,
    /// Its gateway's placement token (`PlaceGateway`): a pull with an older
    /// one than the shard has seen for the agent is a stale owner's and
    /// leases nothing; a newer one first gives back the agent's leases
    /// granted under the older placement.
    pub placement_token: u64,
    /// Its gateway's driver kind (kill switches by kind).
    pub kind: String,
    /// The model its gateway runs, if it says (kill switches by model).
    pub model: Option<String>,
}

/// A task submission, as validated by the API and checked again at apply.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitTask {
    /// Owner.
    pub tenant: Tenant,
    /// Priority; `None` inherits the parent's, else medium.
    pub priority: Option<Priority>,
    /// JSON object text.
    pub payload: String,
    /// Required capabilities.
    pub capabilities: Vec<String>,
    /// Session affinity.
    pub session_key: Option<SessionKey>,
    /// Earliest start, ms since the epoch.
    pub scheduled_at_ms: Option<u64>,
    /// Attempts before dead letter (default 3).
    pub max_attempts: Option<u32>,
    /// Attempt timeout in ms (default 10 minutes).
    pub timeout_ms: Option<u64>,
    /// Retry backoff (default 1 s, x2, cap 30 s).
    pub backoff: Option<Backoff>,
    /// Makes the submission idempotent within the tenant.
    pub idempotency_key: Option<String>,
    /// The spawning task.
    pub parent_id: Option<TaskId>,
    /// The trace the submission belongs to (its `traceparent`).
    #[serde(default)]
    pub trace: Option<crate::trace::TraceContext>,
    /// The region it should or must run in.
    #[serde(default)]
    pub region: Option<super::task::TaskRegion>,
    /// Tasks (of the same tenant, already submitted) that must complete
    /// before it may run.
    #[serde(default)]
    pub depends_on: Vec<TaskId>,
    /// What a dependency dead-lettered or cancelled does to it (default:
    /// cancel).
    #[serde(default)]
    pub on_dependency_failure: Option<super::task::DependencyFailure>,
    /// It waits for an operator's or admin's approval before anything else.
    #[serde(default)]
    pub requires_approval: bool,
    /// With `requires_approval`: how long the request may wait before it
    /// lapses and the task is cancelled (ms); `None`: for good.
    #[serde(default)]
    pub approval_expires_in_ms: Option<u64>,
}

impl SubmitTask {
    /// Default attempts before dead letter.
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
    /// Default attempt timeout, in ms.
    pub const DEFAULT_TIMEOUT_MS: u64 = 10 * 60 * 1000;

    /// Checks every field that does not need the state; returns
    /// `(field, problem)` for the first bad one.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        check_name("tenant", &self.tenant.0, false)?;
        if self.payload.len() > Limits::MAX_PAYLOAD_BYTES {
            return Err((
                "payload",
                format!(
                    "is {} bytes; the limit is {}",
                    self.payload.len(),
                    Limits::MAX_PAYLOAD_BYTES
                ),
            ));
        }
        if !is_json_object(&self.payload) {
            return Err(("payload", "must be a JSON object".into()));
        }
        if self.capabilities.len() > Limits::MAX_CAPABILITIES {
            return Err((
                "capabilities",
                format!("at most {} allowed", Limits::MAX_CAPABILITIES),
            ));
        }
        for c in &self.capabilities {
            check_name("capabilities", c, false)?;
        }
        if let Some(k) = &self.session_key {
            check_name("session_key", &k.0, true)?;
        }
        if let Some(k) = &self.idempotency_key {
            check_name("idempotency_key", k, true)?;
        }
        if let Some(r) = &self.region {
            check_name("region", &r.name, false)?;
        }
        if let Some(n) = self.max_attempts
            && !(1..=Limits::MAX_ATTEMPTS).contains(&n)
        {
            return Err((
                "max_attempts",
                format!("must be 1..={}", Limits::MAX_ATTEMPTS),
            ));
        }
        if let Some(t) = self.timeout_ms {
            let (lo, hi) = Limits::TIMEOUT_MS_RANGE;
            if !(lo..=hi).contains(&t) {
                return Err(("timeout_ms", format!("must be {lo}..={hi}")));
            }
        }
        if let Some(b) = &self.backoff {
            b.validate().map_err(|e| ("backoff", e))?;
        }
        if self.depends_on.len() > Limits::MAX_DEPENDENCIES {
            return Err((
                "depends_on",
                format!("at most {} tasks allowed", Limits::MAX_DEPENDENCIES),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(d) = self.depends_on.iter().find(|d| !seen.insert(**d)) {
            return Err(("depends_on", format!("names task {} twice", d.0)));
        }
        if let Some(ms) = self.approval_expires_in_ms {
            if !self.requires_approval {
                return Err((
                    "approval_expires_in_ms",
                    "applies only with requires_approval".into(),
                ));
            }
            if !(1000..=Limits::MAX_APPROVAL_MS).contains(&ms) {
                return Err((
                    "approval_expires_in_ms",
                    format!("must be 1000..={}", Limits::MAX_APPROVAL_MS),
                ));
            }
        }
        if self.on_dependency_failure.is_some() && self.depends_on.is_empty() {
            return Err((
                "on_dependency_failure",
                "applies only with depends_on".into(),
            ));
        }
        Ok(())
    }
}

/// Whether `s` is exactly one JSON object (surrounding whitespace allowed).
/// Checks the syntax without building the value.
fn is_json_object(s: &str) -> bool {
    s.trim_start().starts_with('{') && serde_json::from_str::<serde::de::IgnoredAny>(s).is_ok()
}

/// Names (tenants, capabilities, keys): non-empty, bounded, printable ASCII
/// without spaces unless `free_text`.
pub(crate) fn check_name(
    field: &'static str,
    s: &str,
    free_text: bool,
) -> Result<(), (&'static str, String)> {
    if s.is_empty() {
        return Err((field, "must not be empty".into()));
    }
    if s.len() > Limits::MAX_NAME_BYTES {
        return Err((
            field,
            format!("is longer than {} bytes", Limits::MAX_NAME_BYTES),
        ));
    }
    let ok = if free_text {
        s.chars().all(|c| !c.is_control())
    } else {
        s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/".contains(c))
    };
    if !ok {
        let allowed = if free_text {
            "no control characters"
        } else {
            "only A-Z a-z 0-9 - _ . : /"
        };
        return Err((field, format!("`{s}` has a character outside {allowed}")));
    }
    Ok(())
}

/// Which dead letters a replay moves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplaySelector {
    /// These tasks (each must be a dead letter).
    Ids(Vec<TaskId>),
    /// Every dead letter matching the filter, oldest first.
    Filter(DeadLetterFilter),
}

/// A filter over dead letters; empty fields match everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterFilter {
    /// Only this tenant.
    pub tenant: Option<Tenant>,
    /// Only this priority.
    pub priority: Option<Priority>,
    /// Only tasks whose last error contains this text.
    pub error_contains: Option<String>,
}

impl DeadLetterFilter {
    /// Whether `task` matches.
    pub fn matches(&self, task: &Task) -> bool {
        self.tenant.as_ref().is_none_or(|t| *t == task.tenant)
            && self.priority.is_none_or(|p| p == task.priority)
            && self.error_contains.as_ref().is_none_or(|needle| {
                task.outcome()
                    .last_error
                    .as_deref()
                    .is_some_and(|e| e.contains(needle.as_str()))
            })
    }
}

/// What applying a [`Request`] returns: one outcome per command, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// `outcomes[i]` answers `commands[i]`.
    pub outcomes: Vec<Outcome>,
}

/// The result of one command.
pub type Outcome = Result<Reply, Rejection>;

/// A successful command's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// A submit; `created` is false when the idempotency key matched an earlier task.
    Submitted {
        /// The task (new, or the earlier one).
        task: Arc<Task>,
        /// Whether this submit created it.
        created: bool,
    },
    /// The leases granted (possibly none).
    Leased(Vec<LeaseGrant>),
    /// The task after the change.
    Task(Arc<Task>),
    /// The dead letters moved back to the queue.
    Replayed(Vec<TaskId>),
    /// Nothing to report.
    Done,
    /// The session after the change.
    Session(Arc<SessionRecord>),
    /// The checkpoint taken.
    Checkpoint(Arc<super::session::Checkpoint>),
    /// The leases a dispatch granted (each task's lease names its agent).
    Dispatched(Vec<LeaseGrant>),
    /// A batched renew: the tokens that were no longer live.
    Renewed {
        /// Tokens refused as stale (their attempts should stop).
        stale: Vec<FencingToken>,
    },
    /// The tasks whose leases were released.
    Released(Vec<TaskId>),
    /// An API key after the change.
    ApiKey(Arc<ApiKeyRecord>),
    /// A tenant record after the change, with its round-robin weight.
    Tenant {
        /// The record.
        record: TenantRecord,
        /// Its weight.
        weight: u32,
    },
    /// A `lookback` submission found neither its key nor its session in
    /// this shard: it goes on to the shard its epoch routes it to.
    NotHere,
    /// How many finished tasks a purge forgot.
    Purged(u32),
}

/// One granted lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseGrant {
    /// The fencing token.
    pub token: FencingToken,
    /// When it lapses unless renewed.
    pub expires_at_ms: u64,
    /// The leased task.
    pub task: Arc<Task>,
}

/// Why a command changed nothing. Each maps to one API error code.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    /// No such task.
    #[error("task {0} not found")]
    NotFound(TaskId),
    /// The token is not the live lease of any task.
    #[error("fencing token {0} is not a live lease (expired, superseded or finished)")]
    StaleToken(FencingToken),
    /// The task's status does not allow the change.
    #[error("task {id} is {from:?} and cannot become {to:?}")]
    IllegalTransition {
        /// The task.
        id: TaskId,
        /// Its status.
        from: TaskStatus,
        /// The status asked for.
        to: TaskStatus,
    },
    /// A field is invalid.
    #[error("invalid `{field}`: {problem}")]
    Invalid {
        /// The field.
        field: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The payload or result is over its size limit.
    #[error("`{field}` is too large: {problem}")]
    TooLarge {
        /// The field.
        field: String,
        /// By how much.
        problem: String,
    },
    /// No such node, gateway or agent.
    #[error("{what} `{name}` is not registered")]
    Unknown {
        /// What kind of thing.
        what: String,
        /// Its name.
        name: String,
    },
    /// The session's state does not allow the change (it ended, or the
    /// move is not in the lifecycle table).
    #[error("session {id} is {from} and cannot become {to}")]
    SessionTransition {
        /// The session.
        id: SessionId,
        /// Its state.
        from: SessionState,
        /// The state asked for.
        to: SessionState,
    },
    /// The change conflicts with what exists (a duplicate, or something
    /// still in use).
    #[error("{0}")]
    Conflict(String),
    /// The tenant holds as many unfinished tasks as its quota allows.
    #[error("tenant `{tenant}` has {queued} unfinished tasks; its quota is {limit}")]
    QuotaExceeded {
        /// The tenant.
        tenant: Tenant,
        /// Its unfinished tasks.
        queued: u64,
        /// Its `max_queued`.
        limit: u64,
    },
    /// The caller's scope does not allow the command.
    #[error("{0}")]
    Forbidden(String),
    /// A submission routed by an earlier routing epoch than this shard has
    /// seen: the node's shard map is behind; it re-routes.
    #[error("routed by routing epoch {sent}, but this shard has seen epoch {seen}: route again")]
    StaleRoute {
        /// The epoch the submission was routed by.
        sent: u32,
        /// The latest the shard has seen.
        seen: u32,
    },
}

impl Rejection {
    /// The API error code this rejection maps to (also the audit outcome's).
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::NotFound(_) | Rejection::Unknown { .. } => "not_found",
            Rejection::StaleToken(_)
            | Rejection::IllegalTransition { .. }
            | Rejection::SessionTransition { .. }
            | Rejection::Conflict(_)
            | Rejection::StaleRoute { .. } => "conflict",
            Rejection::Invalid { .. } => "invalid_request",
            Rejection::TooLarge { .. } => "payload_too_large",
            Rejection::QuotaExceeded { .. } => "rate_limited",
            Rejection::Forbidden(_) => "forbidden",
        }
    }

    pub(crate) fn invalid(field: &str, problem: impl Into<String>) -> Self {
        Rejection::Invalid {
            field: field.to_owned(),
            problem: problem.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::AuditTarget;

    fn audited(actor: &str, target: u64) -> Write {
        Write {
            command: Command::Retry { id: TaskId(target) },
            audit: Some(Audit {
                caller: AuditCaller {
                    actor: actor.into(),
                    tenant: "acme".into(),
                    action: "tasks.retry".into(),
                },
                scoped: actor == "key:dev",
                target: Some(AuditTarget::Task(target)),
            }),
        }
    }

    #[test]
    fn a_batch_records_each_caller_once_and_unpacks_to_the_same_writes() {
        let writes = vec![
            audited("key:dev", 1),
            Write::from(Command::Tick),
            audited("key:op", 2),
            audited("key:dev", 3),
            Write::from(Command::Tick),
        ];
        let (commands, callers, audit) = pack(writes.clone());
        assert_eq!(commands.len(), 5);
        assert_eq!(callers.len(), 2, "two distinct callers");
        assert_eq!(audit.len(), 4, "no trailing marks for unaudited commands");
        assert_eq!(audit[3].as_ref().unwrap().caller, 0);
        assert!(audit[1].is_none());
        assert_eq!(unpack(commands, &callers, audit), writes);
    }
}
