//! The state and `apply`: every status change goes through `move_task`, which
//! checks the transition table and keeps every index and counter in step.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::audit::{AuditCaller, AuditLog, AuditMark, AuditTarget, outcome_text, target_of};
use super::auth::Auth;
use super::command::{
    Batch, Command, DeadLetterFilter, KillSwitch, Member, Outcome, Rejection, ReplaySelector,
    Reply, Request, Response, Scope, ShardPlacement, ShardRule, SubmitTask, SyncSwitch, SyncWeight,
    check_name, check_scope,
};
use super::event::{Event, EventKind, NodeChange, What};
use super::flags::{FeatureFlag, MAX_FLAGS};
use super::idempotency::Idempotency;
use super::queue::{ReadyQueues, normalize_caps};
use super::registry::{NodeId, Registry};
use super::retry::mix;
use super::session::Sessions;
use super::task::{
    AgentId, FencingToken, Limits, Priority, SessionKey, Task, TaskId, TaskStatus, Tenant,
};
use super::task::{Approval, ApprovalDecision, DependencyFailure, Payload, TaskExtras};
use super::usage::{BudgetAlert, BudgetLevel, BudgetPeriod, BudgetUnit, Day, Ledger};

/// Task counts per priority (rank order) and status (declaration order).
pub(crate) type Counts = [[u64; 10]; 4];

/// The whole replicated queue. Serialized as is into snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The state's clock: the latest `now_ms` applied; never goes back.
    pub(crate) clock_ms: u64,
    /// The last task id handed out.
    pub(crate) last_task_id: u64,
    /// The last fencing token handed out.
    pub(crate) last_token: u64,
    /// Tasks behind `Arc`, so a snapshot's copy of the state shares them and
    /// costs a map of pointers; a change after that copies only that task.
    pub(crate) tasks: BTreeMap<TaskId, Arc<Task>>,
    /// Which task took each tenant's idempotency key.
    pub(crate) idempotency: Idempotency,
    pub(crate) ready: ReadyQueues,
    /// Scheduled tasks by `scheduled_at`, failed tasks by next attempt.
    pub(crate) delayed: BTreeSet<(u64, TaskId)>,
    /// Leased and running tasks by lease expiry.
    pub(crate) expiries: BTreeSet<(u64, TaskId)>,
    /// Leased and running tasks by attempt deadline (lease start + timeout).
    pub(crate) deadlines: BTreeSet<(u64, TaskId)>,
    pub(crate) leases: BTreeMap<FencingToken, TaskId>,
    /// Live leases per agent: its load.
    pub(crate) agent_leases: BTreeMap<AgentId, BTreeSet<FencingToken>>,
    /// Where the next round-robin dispatch starts.
    pub(crate) dispatch_cursor: u64,
    pub(crate) dead_letters: BTreeSet<TaskId>,
    /// Completed and cancelled tasks by when they finished (terminal tasks
    /// never change again): the order [`Command::Purge`] forgets them in.
    pub(crate) finished: BTreeSet<(u64, TaskId)>,
    /// Dead letters by when they were dead-lettered (or last changed):
    /// the order [`Command::Purge`] forgets them in.
    pub(crate) dead_since: BTreeSet<(u64, TaskId)>,
    /// Per tenant, per priority, per status.
    pub(crate) counts: BTreeMap<Tenant, Counts>,
    pub(crate) weights: BTreeMap<Tenant, u32>,
    /// Nodes, gateways and agents.
    pub(crate) registry: Registry,
    /// Gateway sessions.
    pub(crate) sessions: Sessions,
    /// API keys, tenant records, revoked JWT ids.
    pub(crate) auth: Auth,
    /// The hash-chained audit log.
    pub(crate) audit: AuditLog,
    /// The last event seq handed out.
    pub(crate) last_event_seq: u64,
    /// Queue shards the cluster was created with (`DefineShards`); 0 until
    /// its first meta leader records it.
    pub(crate) shard_count: u32,
    /// Where the shards' voters go, recorded with the count.
    pub(crate) shard_placement: ShardPlacement,
    /// The queue shard this state is (`DefineGroup`); 0 for the meta group.
    /// A shard's task ids, fencing tokens and session ids carry it in their
    /// low byte (see [`mint`]).
    pub(crate) group: u32,
    /// In a queue shard: the placement token each agent was last pulled
    /// for with (see `State::pull`).
    pub(crate) placements: BTreeMap<AgentId, u64>,
    /// In the meta group: the shards each routing epoch routes new tasks
    /// over; epoch `e` is `routes[e - 1]` (the first: the count the
    /// cluster was created with). Empty until the count is recorded.
    pub(crate) routes: Vec<u32>,
    /// In a queue shard: the latest routing epoch it has seen (0: none
    /// told, as epoch 1). Submissions routed by an earlier one are refused.
    pub(crate) route_epoch: u32,
    /// Unfinished tasks (not completed or cancelled; a dead letter can be
    /// retried) per tenant and session key: where a session's work is, for a `lookback`
    /// submission ([`Command::SubmitRouted`]).
    pub(crate) session_tasks: BTreeMap<(Tenant, SessionKey), u32>,
    /// In the meta group: the shards placed otherwise than the cluster's
    /// `shard_placement` ([`Command::PlaceShard`]).
    pub(crate) shard_rules: BTreeMap<u32, ShardRule>,
    /// Per task, the waiting tasks that depend on it and have not seen it
    /// complete (kept by `index`/`unindex` from each waiting task's
    /// `waiting_on`).
    pub(crate) dependents: BTreeMap<TaskId, BTreeSet<TaskId>>,
    /// Tasks whose dependents must hear of their new status (completed,
    /// dead-lettered, cancelled, or requeued from the dead letters); worked
    /// off after each command, so it is empty between applies.
    #[serde(skip)]
    pub(crate) settle: Vec<Settle>,
    /// Per task, its children (tasks whose `parent_id` it is) that are not
    /// completed or cancelled: what cancelling it cancels.
    pub(crate) children: BTreeMap<TaskId, BTreeSet<TaskId>>,
    /// Kill switches by name ([`Command::SetSwitch`]): in the meta group
    /// the record, in a queue shard what holds its matching work.
    pub(crate) switches: BTreeMap<String, KillSwitch>,
    /// Pending tasks a kill switch holds: out of the ready queues (never
    /// leased) until no switch matches them.
    pub(crate) held: BTreeSet<TaskId>,
    /// In the meta group: the voters the shards grown past the last
    /// routing epoch start with ([`Command::GrowShards`]); empty once an
    /// epoch routes to every shard.
    pub(crate) growth_voters: BTreeMap<NodeId, Member>,
    /// In the meta group: the last revision given to a change of what
    /// every queue shard keeps a copy of (weights, kill switches).
    pub(crate) sync_rev: u64,
    /// Per tenant, the revision of its weight: in the meta group its last
    /// change's (kept after the tenant is deleted), in a queue shard the
    /// last one applied ([`Command::SyncShard`]).
    pub(crate) weight_revs: BTreeMap<Tenant, u64>,
    /// Per kill switch name, its revision, as `weight_revs` (kept after
    /// the switch is lifted).
    pub(crate) switch_revs: BTreeMap<String, u64>,
    /// Tokens and compute time used, and waits for a first lease
    /// ([`Ledger`]).
    pub(crate) ledger: Ledger,
    /// In the meta group: the budget levels already alerted, per tenant,
    /// period (its first day), unit and level ([`Command::BudgetAlert`]).
    pub(crate) budget_alerts: BTreeSet<(Tenant, BudgetPeriod, Day, BudgetUnit, BudgetLevel, u64)>,
    /// In the meta group: the feature flags by name ([`Command::SetFlag`]).
    pub(crate) flags: BTreeMap<String, FeatureFlag>,
    /// Events of the command being applied that come from code not handed
    /// the batch's event list (sessions, the registry, the audit log);
    /// moved to it after each command, so it is empty between applies.
    #[serde(skip)]
    pub(crate) outbox: Vec<What>,
    /// Where new tasks' payloads go when a store keeps them
    /// ([`State::keep_payloads_out`]); not part of the state.
    #[serde(skip)]
    pub(crate) payload_sink: PayloadSink,
    /// One copy of each capability set the tasks need; not part of the
    /// state.
    #[serde(skip)]
    pub(crate) cap_sets: CapSets,
}

/// The capability sets a state's tasks share ([`CapSets::get`]): each
/// set once, so a task's is a count, not an allocation. Sets no task holds
/// any more are dropped when the table has doubled since the last sweep.
/// Not state: equal whatever it holds, and a copy starts empty.
#[derive(Debug, Default)]
pub(crate) struct CapSets {
    sets: BTreeSet<Arc<[String]>>,
    sweep_at: usize,
}

impl Clone for CapSets {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for CapSets {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for CapSets {}

impl CapSets {
    /// Sets below this many are never swept.
    const MIN_SWEEP: usize = 1024;

    /// The shared copy of `caps` (sorted, no duplicates).
    fn get(&mut self, caps: &[String]) -> Arc<[String]> {
        if let Some(set) = self.sets.get(caps) {
            return Arc::clone(set);
        }
        if self.sets.len() >= self.sweep_at.max(Self::MIN_SWEEP) {
            self.sets.retain(|s| Arc::strong_count(s) > 1);
            self.sweep_at = self.sets.len() * 2;
        }
        let set: Arc<[String]> = caps.into();
        self.sets.insert(Arc::clone(&set));
        set
    }
}

/// The payloads a state hands to its store: off until
/// [`State::keep_payloads_out`], then the payloads of the tasks applied
/// since the last [`State::take_stored_payloads`]. Not state: equal
/// whatever it holds, and a copy starts empty (it is empty between
/// applies anyway).
#[derive(Debug, Default)]
pub(crate) struct PayloadSink(Option<Vec<(TaskId, Box<str>)>>);

impl Clone for PayloadSink {
    fn clone(&self) -> Self {
        Self(self.0.as_ref().map(|_| Vec::new()))
    }
}

impl PartialEq for PayloadSink {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for PayloadSink {}

impl State {
    /// Applies one committed request. Deterministic: the same state and request
    /// always give the same new state, response and events.
    pub fn apply(&mut self, request: &Request) -> (Response, Vec<Event>) {
        let mut events = Vec::new();
        let outcomes = match request {
            Request::Batch(batch) => self.apply_batch(batch, &mut events),
        };
        for e in &mut events {
            self.last_event_seq += 1;
            e.seq = self.last_event_seq;
        }
        (Response { outcomes }, events)
    }

    fn apply_batch(&mut self, batch: &Batch, events: &mut Vec<Event>) -> Vec<Outcome> {
        self.advance(batch.now_ms, batch.seed, events);
        self.flush_outbox(events);
        batch
            .commands
            .iter()
            .enumerate()
            .map(|(i, cmd)| {
                let entropy = mix(batch.seed ^ i as u64);
                let outcome = match batch.audit.get(i).and_then(Option::as_ref) {
                    None => self.apply_command(cmd, entropy, events),
                    Some(mark) => self.apply_audited(cmd, mark, &batch.callers, entropy, events),
                };
                self.flush_outbox(events);
                outcome
            })
            .collect()
    }

    /// Moves the outbox's events to the batch's list, after the task events
    /// of the same command.
    fn flush_outbox(&mut self, events: &mut Vec<Event>) {
        self.settle_dependencies(events);
        events.extend(self.outbox.drain(..).map(|what| Event { seq: 0, what }));
    }

    /// Records an event from code that has no event list at hand.
    pub(crate) fn notice(&mut self, what: What) {
        self.outbox.push(what);
    }

    /// Appends an audit entry and its event.
    fn append_audit(&mut self, caller: &AuditCaller, target: AuditTarget, outcome: &str) {
        self.audit.append(self.clock_ms, caller, target, outcome);
        if let Some(entry) = self.audit.last() {
            self.outbox.push(What::Audit(entry));
        }
    }

    /// Numbers the events of a change the Raft layer applies itself (a new
    /// leader's first entry, a membership change), after everything before it.
    pub fn raft_events(&mut self, changes: Vec<(NodeId, NodeChange)>) -> Vec<Event> {
        changes
            .into_iter()
            .map(|(id, change)| {
                self.last_event_seq += 1;
                Event {
                    seq: self.last_event_seq,
                    what: What::Node { id, change },
                }
            })
            .collect()
    }

    /// The last event seq handed out (0: none yet).
    pub fn last_event_seq(&self) -> u64 {
        self.last_event_seq
    }

    pub(crate) fn apply_command(
        &mut self,
        cmd: &Command,
        entropy: u64,
        events: &mut Vec<Event>,
    ) -> Outcome {
        self.check_scope(cmd)?;
        match cmd {
            // A shard that has seen a later routing epoch refuses a
            // submission that carries none (as routed by epoch 1).
            Command::Submit(_) if self.group > 0 && self.route_epoch() > 1 => {
                Err(Rejection::StaleRoute {
                    sent: 1,
                    seen: self.route_epoch(),
                })
            }
            Command::Submit(spec) => self.submit(spec, events),
            Command::Lease {
                agent_id,
                capabilities,
                max,
                lease_ms,
            } => self.lease(agent_id, capabilities, *max, *lease_ms, None, events),
            Command::Renew { token, lease_ms } => self.renew(*token, *lease_ms, events),
            Command::Complete { token, result } => self.complete(*token, result, events),
            Command::Fail {
                token,
                error,
                retryable,
                usage,
            } => self.fail(*token, error, *retryable, usage.as_ref(), entropy, events),
            Command::Cancel {
                id,
                reason,
                keep_children,
            } => self.cancel(*id, reason.as_deref(), *keep_children, events),
            Command::Approve { id, by, reason } => self.approve(*id, by, reason.as_deref(), events),
            Command::Reject { id, by, reason } => self.reject(*id, by, reason, events),
            Command::SetSwitch { name, switch } => self.set_switch(name, switch.as_ref(), events),
            Command::SetFlag { name, flag } => self.set_flag(name, flag.as_ref()),
            Command::ReportAgent {
                agent,
                node,
                circuit,
                silent,
            } => self.report_agent(agent, *node, *circuit, *silent),
            Command::ReportManaged { id, node, status } => self.report_managed(id, *node, status),
            Command::SyncShard { weights, switches } => self.sync_shard(weights, switches, events),
            Command::BudgetAlert(alert) => self.budget_alert(alert),
            Command::Retry { id } => self.retry(*id, events),
            Command::Replay { selector, limit } => self.replay(selector, *limit, events),
            Command::SetTenantWeight { tenant, weight } => self.set_weight(tenant, *weight),
            Command::Tick => Ok(Reply::Done),
            Command::Purge {
                finished_before_ms,
                keep,
                max,
                dead_before_ms,
            } => self.purge(
                Horizon {
                    finished_before_ms: *finished_before_ms,
                    keep: *keep,
                    dead_before_ms: *dead_before_ms,
                },
                *max,
            ),
            Command::NodeHeartbeat {
                id,
                region,
                api_addr,
            } => self.node_heartbeat(*id, region, api_addr),
            Command::SetDrain { id, draining } => self.set_drain(*id, *draining),
            Command::RegisterGateway(reg) => self.register_gateway(reg),
            Command::DeregisterGateway { id } => self.deregister_gateway(id),
            Command::ReportGateway {
                id,
                health,
                circuit,
            } => self.report_gateway(id, *health, *circuit),
            Command::PlaceGateway { id, owner } => self.place_gateway(id, *owner, events),
            Command::RegisterAgent(reg) => self.register_agent(reg, events),
            Command::DeregisterAgent { id } => self.deregister_agent(id, events),
            Command::ReleaseAgent { agent } => self.release_agent(agent, events),
            Command::OpenSession(open) => self.open_session(open),
            Command::MoveSession {
                id,
                to,
                task,
                reason,
            } => self.move_session(*id, *to, *task, reason.as_deref()),
            Command::Dispatch(spec) => self.dispatch(spec, events),
            Command::Pull(spec) => self.pull(spec, events),
            Command::RenewMany { tokens, lease_ms } => self.renew_many(tokens, *lease_ms, events),
            Command::Release { tokens } => self.release(tokens, events),
            Command::KillSession { id, reason } => {
                self.kill_session(*id, reason.as_deref(), entropy, events)
            }
            Command::PauseSession { id } => self.pause_session(*id),
            Command::ResumeSession { id } => self.resume_session(*id),
            Command::CheckpointSession { id, name } => {
                self.checkpoint_session(*id, name.as_deref())
            }
            Command::MigrateSession { id, gateway } => self.migrate_session(*id, gateway.as_ref()),
            Command::MoveSessionsOff { gateway, why } => self.move_sessions_off(gateway, why),
            Command::AgentOnline {
                agent,
                node,
                release,
            } => self.agent_online(agent, *node, release, events),
            Command::CreateApiKey(new) => self.create_api_key(new, false),
            Command::BootstrapApiKey(new) => self.create_api_key(new, true),
            Command::RevokeApiKey { id } => self.revoke_api_key(id),
            Command::TouchApiKeys { ids } => self.touch_api_keys(ids),
            Command::CreateTenant { tenant, patch } => self.create_tenant(tenant, patch),
            Command::UpdateTenant { tenant, patch } => self.update_tenant(tenant, patch),
            Command::DeleteTenant { tenant } => self.delete_tenant(tenant),
            Command::RevokeJti { jti, until_ms } => self.revoke_jti(jti, *until_ms),
            Command::Audit(rec) => {
                let target = rec.target.clone().unwrap_or_default();
                self.append_audit(&rec.caller, target, &rec.outcome);
                Ok(Reply::Done)
            }
            Command::DefineShards { count, placement } => self.define_shards(*count, *placement),
            Command::DefineGroup { group } => self.define_group(*group),
            Command::GrowShards { count, voters } => self.grow_shards(*count, voters),
            Command::OpenRoute {
                epoch,
                count,
                sync_rev,
            } => self.open_route(*epoch, *count, *sync_rev),
            Command::SubmitRouted {
                epoch,
                lookback,
                task,
            } => self.submit_routed(*epoch, *lookback, task, events),
            Command::PlaceShard { shard, rule } => self.place_shard(*shard, rule.as_ref()),
        }
    }

    /// Refuses a command this group does not apply: a shard applies no
    /// cluster-wide command.
    fn check_scope(&self, cmd: &Command) -> Result<(), Rejection> {
        if self.group > 0 && cmd.scope() == Scope::Meta {
            return Err(Rejection::invalid(
                "command",
                format!(
                    "queue shard {} applies only queue commands; this one is cluster-wide (the meta group's)",
                    self.group
                ),
            ));
        }
        Ok(())
    }

    /// Makes this state queue shard `group`'s, once, before it mints anything.
    fn define_group(&mut self, group: u32) -> Outcome {
        let max = crate::config::MAX_SHARDS;
        if !(1..=max).contains(&group) {
            return Err(Rejection::invalid("group", format!("must be 1..={max}")));
        }
        if self.group == group {
            return Ok(Reply::Done);
        }
        if self.group != 0 {
            return Err(Rejection::invalid(
                "group",
                format!("this state is queue shard {}'s already", self.group),
            ));
        }
        if self.last_task_id != 0 || self.last_token != 0 || self.sessions.last_id() != 0 {
            return Err(Rejection::invalid(
                "group",
                "this state has minted ids already; only a new group becomes a shard",
            ));
        }
        self.group = group;
        Ok(Reply::Done)
    }

    /// The queue shard this state is (0: the meta group).
    pub fn group(&self) -> u32 {
        self.group
    }

    /// Records the cluster's queue-shard count and placement, once.
    fn define_shards(&mut self, count: u32, placement: ShardPlacement) -> Outcome {
        let max = crate::config::MAX_SHARDS;
        if !(1..=max).contains(&count) {
            return Err(Rejection::invalid("count", format!("must be 1..={max}")));
        }
        match self.shard_count {
            0 => {
                self.shard_count = count;
                self.shard_placement = placement;
                self.routes = vec![count];
                Ok(Reply::Done)
            }
            n if n != count => Err(Rejection::invalid(
                "count",
                format!(
                    "the cluster has {n} queue shards; the count is recorded once (more are added with cluster.shards on every node: docs/shards.md)"
                ),
            )),
            _ if placement != self.shard_placement => Err(Rejection::invalid(
                "placement",
                format!(
                    "the cluster was created with shard placement `{}`; it cannot change",
                    self.shard_placement
                ),
            )),
            _ => Ok(Reply::Done),
        }
    }

    /// Where the shards' voters go (as recorded with the count).
    pub fn shard_placement(&self) -> ShardPlacement {
        self.shard_placement
    }

    /// Queue shards the cluster has (0: not recorded yet).
    pub fn shard_count(&self) -> u32 {
        self.shard_count
    }

    /// The shards of each routing epoch, oldest first (the last is the
    /// current one); empty until the count is recorded.
    pub fn routes(&self) -> &[u32] {
        &self.routes
    }

    /// In a queue shard: the latest routing epoch it has seen (at least 1).
    pub fn route_epoch(&self) -> u32 {
        self.route_epoch.max(1)
    }

    /// Adds queue shards: the count grows; routing does not change until
    /// an `OpenRoute` opens an epoch over them.
    fn grow_shards(&mut self, count: u32, voters: &BTreeMap<NodeId, Member>) -> Outcome {
        let max = crate::config::MAX_SHARDS;
        let now = self.shard_count;
        if voters.is_empty() || voters.values().any(|m| m.raft_addr.is_empty()) {
            return Err(Rejection::invalid(
                "voters",
                "the voters the added shards' groups start with, each with its address",
            ));
        }
        if now <= 1 {
            return Err(Rejection::invalid(
                "count",
                "only a cluster created with several queue shards can add more (with one, the queue is the meta group's)",
            ));
        }
        if count > max {
            return Err(Rejection::invalid(
                "count",
                format!("must be at most {max}"),
            ));
        }
        if count < now {
            return Err(Rejection::invalid(
                "count",
                format!("the cluster has {now} queue shards; shards are not removed"),
            ));
        }
        let routed = self.routes.last().copied().unwrap_or(now);
        if count > routed && self.growth_voters.is_empty() {
            self.growth_voters = voters.clone();
        }
        self.shard_count = count;
        Ok(Reply::Done)
    }

    /// In the meta group: the voters each shard grown past the last
    /// routing epoch is initialized with (empty when none is).
    pub fn growth_voters(&self) -> &BTreeMap<NodeId, Member> {
        &self.growth_voters
    }

    /// Routing epoch `epoch` over `count` shards: opened in the meta group
    /// (the next epoch, over every shard), recorded in a queue shard.
    fn open_route(&mut self, epoch: u32, count: u32, sync_rev: u64) -> Outcome {
        if self.group > 0 {
            self.route_epoch = self.route_epoch.max(epoch);
            return Ok(Reply::Done);
        }
        let current = self.routes.len() as u32;
        if current == 0 {
            return Err(Rejection::invalid(
                "epoch",
                "the cluster's shard count is not recorded yet",
            ));
        }
        if epoch == current && self.routes.last() == Some(&count) {
            return Ok(Reply::Done);
        }
        if epoch != current + 1 {
            return Err(Rejection::invalid(
                "epoch",
                format!(
                    "the current routing epoch is {current}; the next is {}",
                    current + 1
                ),
            ));
        }
        if count != self.shard_count || Some(&count) <= self.routes.last() {
            return Err(Rejection::invalid(
                "count",
                format!(
                    "a new epoch routes over every shard the cluster has ({}), more than the last ({})",
                    self.shard_count,
                    self.routes.last().copied().unwrap_or(0)
                ),
            ));
        }
        if sync_rev != self.sync_rev {
            return Err(Rejection::Conflict(format!(
                "the added shards were brought up to revision {sync_rev} of the weights and kill switches; they are at {} now: sync them again",
                self.sync_rev
            )));
        }
        self.routes.push(count);
        self.growth_voters.clear();
        Ok(Reply::Done)
    }

    /// Shard `shard`'s own placement, or none (the cluster's again).
    fn place_shard(&mut self, shard: u32, rule: Option<&ShardRule>) -> Outcome {
        if self.shard_count <= 1 || !(1..=self.shard_count).contains(&shard) {
            return Err(Rejection::Unknown {
                what: "queue shard".into(),
                name: shard.to_string(),
            });
        }
        let Some(rule) = rule else {
            self.shard_rules.remove(&shard);
            return Ok(Reply::Done);
        };
        if let Some(home) = &rule.home {
            if rule.placement != ShardPlacement::Regional {
                return Err(Rejection::invalid(
                    "home",
                    "a home region is for the `regional` placement only",
                ));
            }
            check_name("home", home, false).map_err(|(f, p)| Rejection::invalid(f, p))?;
            if !self.registry.nodes().any(|n| n.region == *home) {
                return Err(Rejection::invalid(
                    "home",
                    format!("no node of the cluster is in region `{home}`"),
                ));
            }
        }
        self.shard_rules.insert(shard, rule.clone());
        Ok(Reply::Done)
    }

    /// Where shard `shard`'s voters go: its own placement, else the
    /// cluster's.
    pub fn shard_rule(&self, shard: u32) -> ShardRule {
        self.shard_rules.get(&shard).cloned().unwrap_or(ShardRule {
            placement: self.shard_placement,
            home: None,
        })
    }

    /// Whether shard `shard` has a placement of its own.
    pub fn shard_placed_apart(&self, shard: u32) -> bool {
        self.shard_rules.contains_key(&shard)
    }

    /// A submission routed by epoch `epoch` (see [`Command::SubmitRouted`]).
    fn submit_routed(
        &mut self,
        epoch: u32,
        lookback: bool,
        spec: &SubmitTask,
        events: &mut Vec<Event>,
    ) -> Outcome {
        let seen = self.route_epoch();
        if epoch < seen {
            return Err(Rejection::StaleRoute { sent: epoch, seen });
        }
        self.route_epoch = epoch;
        if lookback && !self.holds_key_of(spec) {
            return Ok(Reply::NotHere);
        }
        self.submit(spec, events)
    }

    /// Whether this group holds `spec`'s idempotency key, or its session
    /// (live, or with unfinished tasks).
    fn holds_key_of(&self, spec: &SubmitTask) -> bool {
        let keyed = spec
            .idempotency_key
            .as_ref()
            .is_some_and(|k| self.by_idempotency_key(&spec.tenant, k).is_some());
        let session = spec.session_key.as_ref().is_some_and(|k| {
            self.sessions.by_key(&spec.tenant, k).is_some()
                || self
                    .session_tasks
                    .contains_key(&(spec.tenant.clone(), k.clone()))
        });
        keyed || session
    }

    /// Whether a task still counts for its session's place: everything but
    /// completed and cancelled. A dead letter counts, since a retry or
    /// replay makes it pending again in this shard.
    fn holds_session(t: &Task) -> bool {
        !matches!(t.status, TaskStatus::Completed | TaskStatus::Cancelled)
    }

    /// From now on a new task's payload goes to the store: the task keeps
    /// [`Payload::Stored`] and the text waits for
    /// [`State::take_stored_payloads`]. The payloads the state holds go
    /// the same way now (a state from a backup, or written before
    /// payloads were stored). A task with a session key keeps its own: a
    /// durable session's turn quotes its prompt at apply.
    pub fn keep_payloads_out(&mut self) {
        let mut out = self.payload_sink.0.take().unwrap_or_default();
        for (id, slot) in &mut self.tasks {
            if slot.session_key.is_none() && matches!(slot.payload, Payload::Held(_)) {
                let task = Arc::make_mut(slot);
                if let Payload::Held(text) = std::mem::replace(&mut task.payload, Payload::Stored) {
                    out.push((*id, text));
                }
            }
        }
        self.payload_sink.0 = Some(out);
    }

    /// The payloads handed to the store since the last call (see
    /// [`State::keep_payloads_out`]), by task id.
    pub fn take_stored_payloads(&mut self) -> Vec<(TaskId, Box<str>)> {
        self.payload_sink
            .0
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Gives task `id` its payload back to hold (a copy of a state read
    /// with its stored payloads); false if there is no such task.
    pub fn hold_payload(&mut self, id: TaskId, text: Box<str>) -> bool {
        match self.tasks.get_mut(&id) {
            Some(slot) => {
                Arc::make_mut(slot).payload = Payload::Held(text);
                true
            }
            None => false,
        }
    }

    /// The ids of the tasks whose payloads the store keeps.
    pub fn stored_payloads(&self) -> impl Iterator<Item = TaskId> + '_ {
        self.tasks
            .values()
            .filter(|t| t.payload == Payload::Stored)
            .map(|t| t.id)
    }

    /// The last task id handed out: every id at or below it that names no
    /// task will never name one.
    pub fn last_task_id(&self) -> u64 {
        self.last_task_id
    }

    /// Run on a state decoded from storage (a snapshot or a backup):
    /// rebuilds what is derived from the tasks and gives every task of a
    /// tenant the state's one copy of its name, which decoding made one
    /// per task.
    pub fn decoded(&mut self) {
        self.recount_session_tasks();
        self.share_tenant_names();
        self.share_cap_sets();
    }

    /// Tasks that need the same capabilities share one copy of the set,
    /// as new tasks do.
    fn share_cap_sets(&mut self) {
        for slot in self.tasks.values_mut() {
            let shared = self.cap_sets.get(&slot.capabilities);
            if !Arc::ptr_eq(&shared, &slot.capabilities) {
                Arc::make_mut(slot).capabilities = shared;
            }
        }
    }

    /// Every task of a tenant holds the name [`State::counts`] is keyed
    /// by, as a new task gets it ([`State::tenant_named`]).
    fn share_tenant_names(&mut self) {
        for slot in self.tasks.values_mut() {
            if let Some((name, _)) = self.counts.get_key_value(&slot.tenant)
                && !Arc::ptr_eq(&name.0, &slot.tenant.0)
            {
                Arc::make_mut(slot).tenant = name.clone();
            }
        }
    }

    /// The state's copy of a tenant's name, once it has counted a task of
    /// the tenant (a clone of it is a count, not an allocation).
    fn tenant_named(&self, tenant: &Tenant) -> Tenant {
        self.counts
            .get_key_value(tenant)
            .map_or_else(|| tenant.clone(), |(name, _)| name.clone())
    }

    /// Rebuilds [`State::session_tasks`] from the tasks: the counts are
    /// derived, and an older build counted dead letters out.
    fn recount_session_tasks(&mut self) {
        let mut counts: BTreeMap<(Tenant, SessionKey), u32> = BTreeMap::new();
        for t in self.tasks.values().filter(|t| Self::holds_session(t)) {
            if let Some(key) = &t.session_key {
                *counts.entry((t.tenant.clone(), key.clone())).or_default() += 1;
            }
        }
        self.session_tasks = counts;
    }

    /// Counts a task in or out of its session's unfinished tasks.
    fn count_session_task(&mut self, id: TaskId, delta: i32) {
        let t = &self.tasks[&id];
        let Some(key) = t.session_key.as_ref().filter(|_| Self::holds_session(t)) else {
            return;
        };
        let k = (t.tenant.clone(), key.clone());
        let n = self.session_tasks.entry(k.clone()).or_default();
        *n = n
            .checked_add_signed(delta)
            .expect("invariant: session task counts never go negative");
        if *n == 0 {
            self.session_tasks.remove(&k);
        }
    }

    /// Applies an API caller's command (confined to its tenant when the
    /// mark is scoped) and appends its audit entry with the outcome, in the
    /// same step. A mark naming no caller of the batch is refused, unaudited.
    fn apply_audited(
        &mut self,
        cmd: &Command,
        mark: &AuditMark,
        callers: &[AuditCaller],
        entropy: u64,
        events: &mut Vec<Event>,
    ) -> Outcome {
        let Some(caller) = callers.get(mark.caller as usize) else {
            return Err(Rejection::invalid("audit", "names no caller of the batch"));
        };
        let outcome = match (cmd, mark.scoped) {
            _ if let Err(refused) = self.check_scope(cmd) => Err(refused),
            (Command::Audit(_), _) => Err(Rejection::invalid(
                "command",
                "an audit record is not audited again",
            )),
            (cmd, true) => self.apply_scoped(cmd, &caller.tenant, entropy, events),
            (cmd, false) => self.apply_command(cmd, entropy, events),
        };
        let target = target_of(&mark.target, &outcome);
        self.append_audit(caller, target, outcome_text(&outcome));
        outcome
    }

    /// The audit log.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// Test support: the audit log, writable, so tests can prove that a
    /// verifier finds a changed entry. Nothing in Godel calls it.
    #[doc(hidden)]
    pub fn audit_mut(&mut self) -> &mut AuditLog {
        &mut self.audit
    }

    /// Applies one command as its own batch (unit tests of the fsm modules).
    #[cfg(test)]
    pub(crate) fn apply_one(&mut self, now_ms: u64, cmd: Command) -> Outcome {
        let req = Request::Batch(Batch::unaudited(now_ms, 1, vec![cmd]));
        self.apply(&req).0.outcomes.remove(0)
    }

    /// The state's clock, ms since the epoch.
    pub fn clock_ms(&self) -> u64 {
        self.clock_ms
    }

    /// The earliest time a timer fires, if any: the leader proposes a tick then.
    pub fn next_due_ms(&self) -> Option<u64> {
        [
            self.delayed.first(),
            self.expiries.first(),
            self.deadlines.first(),
        ]
        .into_iter()
        .flatten()
        .map(|(due, _)| *due)
        .chain(self.sessions.next_deadline())
        .min()
    }

    /// Moves the clock to `now_ms` (never back) and fires every due timer in
    /// time order; at the same time, by task id, and for one task a lease
    /// expiry before a timeout.
    fn advance(&mut self, now_ms: u64, seed: u64, events: &mut Vec<Event>) {
        self.clock_ms = self.clock_ms.max(now_ms);
        self.prune_jtis();
        loop {
            let clock = self.clock_ms;
            let due = |timers: &BTreeSet<(u64, TaskId)>, timer: Timer| {
                timers
                    .first()
                    .filter(|(at, _)| *at <= clock)
                    .map(|&(at, id)| (at, id, timer))
            };
            let next = [
                due(&self.delayed, Timer::Ready),
                due(&self.expiries, Timer::LeaseExpiry),
                due(&self.deadlines, Timer::Deadline),
            ]
            .into_iter()
            .flatten()
            .min();
            // Session timers interleave in time order; at the same time a
            // task's timer fires first.
            let session = self.sessions.next_due().filter(|(at, _)| *at <= clock);
            if let Some((at, _)) = session
                && next.is_none_or(|(task_at, _, _)| at < task_at)
            {
                self.fire_session_timer(seed, events);
                continue;
            }
            match next {
                None => break,
                Some((_, id, Timer::Ready))
                    if self.tasks[&id].status == TaskStatus::AwaitingApproval =>
                {
                    self.expire_approval(id, events);
                }
                Some((_, id, Timer::Ready)) => {
                    self.move_task(id, TaskStatus::Pending, |t| t.clear_next_attempt())
                        .expect("invariant: delayed tasks are scheduled or failed");
                    self.emit(events, id, EventKind::Ready);
                }
                Some((_, id, Timer::LeaseExpiry)) => self.expire_lease(id, events),
                Some((_, id, Timer::Deadline)) => self.time_out(id, seed, events),
            }
        }
    }

    fn expire_lease(&mut self, id: TaskId, events: &mut Vec<Event>) {
        let token = self.live_token(id);
        self.emit(events, id, EventKind::LeaseExpired { token });
        self.lease_lost(id, events);
    }

    /// A lease of leased task `id` ended without a result and without
    /// spending an attempt (it expired, or was given back): the task is
    /// ready again, or dead-lettered once [`Limits::MAX_LOST_LEASES`] of
    /// its leases have ended so.
    pub(crate) fn lease_lost(&mut self, id: TaskId, events: &mut Vec<Event>) {
        self.count_lost_attempt(id, TaskStatus::Pending);
        let t = &self.tasks[&id];
        let lost = t.lease_count.saturating_sub(t.attempts);
        if lost < Limits::MAX_LOST_LEASES {
            self.move_task(id, TaskStatus::Pending, |t| t.lease = None)
                .expect("invariant: leased tasks can go back to pending");
            return;
        }
        let error = format!(
            "{lost} leases ended without a result (expired or given back); \
             the task may be killing or hanging its agents"
        );
        self.move_task(id, TaskStatus::DeadLetter, |t| {
            t.lease = None;
            t.outcome_mut().last_error = Some(error);
            t.clear_next_attempt();
        })
        .expect("invariant: leased tasks can be dead-lettered");
        self.emit(events, id, EventKind::DeadLettered);
    }

    fn time_out(&mut self, id: TaskId, seed: u64, events: &mut Vec<Event>) {
        let token = self.live_token(id);
        self.emit(events, id, EventKind::TimedOut { token });
        let entropy = mix(seed ^ id.0.rotate_left(32));
        self.fail_attempt(id, "attempt timed out".into(), true, entropy, events);
    }

    pub(crate) fn live_token(&self, id: TaskId) -> FencingToken {
        self.tasks[&id]
            .lease
            .as_ref()
            .expect("invariant: leased tasks have a lease")
            .token
    }

    fn submit(&mut self, spec: &SubmitTask, events: &mut Vec<Event>) -> Outcome {
        spec.validate().map_err(|(field, problem)| {
            if field == "payload" && spec.payload.len() > Limits::MAX_PAYLOAD_BYTES {
                Rejection::TooLarge {
                    field: field.into(),
                    problem,
                }
            } else {
                Rejection::invalid(field, problem)
            }
        })?;
        if let Some(key) = &spec.idempotency_key
            && let Some(id) = self.by_idempotency_key(&spec.tenant, key)
        {
            let task = self.boxed(id);
            return Ok(Reply::Submitted {
                task,
                created: false,
            });
        }
        self.check_quota(&spec.tenant)?;
        let parent_priority = match spec.parent_id {
            // Another tenant's task is not a parent (the same answer as none).
            Some(pid) => match self.tasks.get(&pid).filter(|p| p.tenant == spec.tenant) {
                Some(parent) => Some(parent.priority),
                None => {
                    return Err(Rejection::invalid(
                        "parent_id",
                        format!("task {pid} does not exist"),
                    ));
                }
            },
            None => None,
        };
        let waiting_on = self.check_dependencies(spec)?;
        let mut task = self.new_task(spec, parent_priority);
        if spec.requires_approval {
            task.status = TaskStatus::AwaitingApproval;
        } else if !waiting_on.is_empty() {
            task.status = TaskStatus::Waiting;
        }
        let blocked = self.blocked_reason(&waiting_on);
        task.set_waiting(waiting_on, blocked);
        let id = task.id;
        if let Some(key) = &spec.idempotency_key {
            self.idempotency.insert(&spec.tenant, key, id);
        }
        self.count(&task.tenant, task.priority, task.status, 1);
        self.tasks.insert(id, Arc::new(task));
        self.index(id);
        self.emit(events, id, EventKind::Submitted);
        Ok(Reply::Submitted {
            task: self.boxed(id),
            created: true,
        })
    }

    /// A new task's payload (its id is `last_task_id`): handed to the store
    /// when one keeps them (see [`State::keep_payloads_out`]).
    fn place_payload(&mut self, spec: &SubmitTask) -> Payload {
        let text: Box<str> = spec.payload.as_str().into();
        match &mut self.payload_sink.0 {
            Some(out) if spec.session_key.is_none() => {
                out.push((TaskId(self.last_task_id), text));
                Payload::Stored
            }
            _ => Payload::Held(text),
        }
    }

    fn new_task(&mut self, spec: &SubmitTask, parent_priority: Option<Priority>) -> Task {
        self.last_task_id = mint(self.last_task_id, self.group);
        let capabilities = self.cap_sets.get(&normalize_caps(&spec.capabilities));
        let scheduled = spec.scheduled_at_ms.filter(|at| *at > self.clock_ms);
        let approval = spec.requires_approval.then(|| {
            Box::new(Approval {
                expires_at_ms: spec
                    .approval_expires_in_ms
                    .map(|ms| self.clock_ms.saturating_add(ms)),
                decision: None,
            })
        });
        let extras = TaskExtras {
            scheduled_at_ms: spec.scheduled_at_ms,
            parent_id: spec.parent_id,
            trace: spec.trace,
            region: spec.region.clone(),
            depends_on: spec.depends_on.clone(),
            approval,
            ..TaskExtras::NONE
        };
        Task {
            id: TaskId(self.last_task_id),
            tenant: self.tenant_named(&spec.tenant),
            priority: spec.priority.or(parent_priority).unwrap_or_default(),
            status: if scheduled.is_some() {
                TaskStatus::Scheduled
            } else {
                TaskStatus::Pending
            },
            on_dependency_failure: spec.on_dependency_failure.unwrap_or_default(),
            max_attempts: spec
                .max_attempts
                .unwrap_or(SubmitTask::DEFAULT_MAX_ATTEMPTS),
            attempts: 0,
            lease_count: 0,
            payload: self.place_payload(spec),
            capabilities,
            session_key: spec.session_key.clone(),
            timeout_ms: spec.timeout_ms.unwrap_or(SubmitTask::DEFAULT_TIMEOUT_MS),
            backoff: spec.backoff.unwrap_or_default(),
            idempotency_key: spec.idempotency_key.as_deref().map(Box::from),
            lease: None,
            created_at_ms: self.clock_ms,
            updated_at_ms: self.clock_ms,
            extras: (extras != TaskExtras::NONE).then(|| Box::new(extras)),
            outcome: None,
        }
    }

    /// The dependencies of a new task that have not completed (it waits for
    /// them), or why it is refused: a dependency that does not exist here
    /// (or is another tenant's: the same answer), or that can never
    /// complete while the task would be cancelled for it (cancelled, or
    /// dead-lettered under the `cancel` policy). A cycle cannot form: a
    /// task names only tasks submitted before it, and never changes them.
    fn check_dependencies(&self, spec: &SubmitTask) -> Result<Vec<TaskId>, Rejection> {
        let policy = spec.on_dependency_failure.unwrap_or_default();
        let mut waiting = Vec::new();
        for d in &spec.depends_on {
            let Some(dep) = self.tasks.get(d).filter(|t| t.tenant == spec.tenant) else {
                return Err(Rejection::invalid("depends_on", self.no_such_task(*d)));
            };
            match dep.status {
                TaskStatus::Completed => continue,
                TaskStatus::Cancelled => {
                    return Err(Rejection::invalid(
                        "depends_on",
                        format!("task {} is cancelled: it will never complete", d.0),
                    ));
                }
                TaskStatus::DeadLetter if policy == DependencyFailure::Cancel => {
                    return Err(Rejection::invalid(
                        "depends_on",
                        format!(
                            "task {} is dead-lettered: replay it first, or submit with on_dependency_failure = block",
                            d.0
                        ),
                    ));
                }
                _ => waiting.push(*d),
            }
        }
        Ok(waiting)
    }

    /// Why `id` names no task the caller may use: the same answer whether
    /// it was never given out, is another tenant's, or was purged once
    /// finished.
    fn no_such_task(&self, id: TaskId) -> String {
        format!(
            "task {} does not exist (a finished task is purged after queue.retain_finished)",
            id.0
        )
    }

    /// Whether a [`Command::Purge`] with these bounds would forget a task
    /// now: what a leader checks before it proposes one.
    pub fn purge_due(&self, horizon: Horizon) -> bool {
        !self.purgeable(horizon, 1).is_empty()
    }

    /// The tasks a purge forgets: finished ones, oldest finished first,
    /// then dead letters, oldest first; at most `max`. Each index is looked
    /// at most `max` + [`PURGE_SKIP`] deep, so tasks kept for their
    /// dependents or children cost a bounded scan.
    fn purgeable(&self, horizon: Horizon, max: usize) -> Vec<TaskId> {
        let over = (self.finished.len() as u64).saturating_sub(horizon.keep);
        let mut ids = Vec::new();
        for (i, &(at, id)) in self.finished.iter().enumerate() {
            if ids.len() >= max || i >= max + PURGE_SKIP {
                break;
            }
            if at >= horizon.finished_before_ms && i as u64 >= over {
                break;
            }
            if !self.dependents.contains_key(&id) {
                ids.push(id);
            }
        }
        for (i, &(at, id)) in self.dead_since.iter().enumerate() {
            if ids.len() >= max || i >= max + PURGE_SKIP || at >= horizon.dead_before_ms {
                break;
            }
            if !self.dependents.contains_key(&id) && !self.children.contains_key(&id) {
                ids.push(id);
            }
        }
        ids
    }

    /// How many dead letters were dead-lettered before `before_ms`,
    /// counting at most `max`.
    pub fn dead_letters_before(&self, before_ms: u64, max: usize) -> usize {
        self.dead_since
            .iter()
            .take(max)
            .take_while(|(at, _)| *at < before_ms)
            .count()
    }

    /// [`Command::Purge`].
    fn purge(&mut self, horizon: Horizon, max: u32) -> Outcome {
        if max == 0 || max > Limits::MAX_PURGE {
            return Err(Rejection::invalid(
                "max",
                format!("must be 1..={}", Limits::MAX_PURGE),
            ));
        }
        let ids = self.purgeable(horizon, max as usize);
        for &id in &ids {
            self.forget(id);
        }
        Ok(Reply::Purged(ids.len() as u32))
    }

    /// Removes a finished task or a dead letter from the state and every
    /// index that names it: its status's, its count, its idempotency key,
    /// its entry as a parent. Nothing depends on it (checked by the
    /// caller).
    fn forget(&mut self, id: TaskId) {
        self.unindex(id);
        let t = self
            .tasks
            .remove(&id)
            .expect("invariant: the purge indexes name live tasks");
        self.count(&t.tenant, t.priority, t.status, -1);
        if let Some(key) = &t.idempotency_key {
            self.idempotency.remove(&t.tenant, key, id);
        }
        self.children.remove(&id);
    }

    /// The task tenant `tenant` submitted with idempotency key `key`, if
    /// this state holds it.
    pub fn by_idempotency_key(&self, tenant: &Tenant, key: &str) -> Option<TaskId> {
        self.idempotency.get(&self.tasks, tenant, key)
    }

    /// Why a waiting task cannot go on: the first of `waiting_on` that is
    /// dead-lettered or cancelled.
    fn blocked_reason(&self, waiting_on: &[TaskId]) -> Option<String> {
        waiting_on.iter().find_map(|d| {
            let status = self.tasks.get(d)?.status;
            matches!(status, TaskStatus::DeadLetter | TaskStatus::Cancelled)
                .then(|| format!("dependency {} is {}", d.0, status.as_str()))
        })
    }

    /// Tells the dependents of the tasks in [`State::settle`] of their new
    /// status, until none is left (a cancel may cascade):
    ///
    /// - completed: it leaves their `waiting_on`; one waiting on nothing
    ///   more goes on (pending, or scheduled until its `scheduled_at`);
    /// - dead-lettered or cancelled: a dependent with the `cancel` policy is
    ///   cancelled, naming it; one with `block` keeps waiting, blocked;
    /// - requeued from the dead letters: a blocked dependent's reason is
    ///   looked at again.
    fn settle_dependencies(&mut self, events: &mut Vec<Event>) {
        while let Some(next) = self.settle.pop() {
            let dep = match next {
                Settle::Dependents(dep) => dep,
                Settle::Children(parent) => {
                    self.cancel_children(parent, events);
                    continue;
                }
            };
            let Some(waiting) = self.dependents.get(&dep).cloned() else {
                continue;
            };
            let status = self.tasks[&dep].status;
            for w in waiting {
                if !matches!(
                    self.tasks[&w].status,
                    TaskStatus::Waiting | TaskStatus::AwaitingApproval
                ) {
                    continue;
                }
                match status {
                    TaskStatus::Completed => self.dependency_completed(w, dep, events),
                    TaskStatus::DeadLetter | TaskStatus::Cancelled => {
                        self.dependency_failed(w, dep, status, events)
                    }
                    _ => {
                        let reason = {
                            let t = &self.tasks[&w];
                            self.blocked_reason(&t.extras().waiting_on)
                        };
                        self.edit_in_place(w, |t| t.set_blocked(reason));
                    }
                }
            }
        }
    }

    /// Cancels the unfinished children of a cancelled task, naming it, and
    /// theirs after them.
    fn cancel_children(&mut self, parent: TaskId, events: &mut Vec<Event>) {
        let Some(children) = self.children.get(&parent).cloned() else {
            return;
        };
        let reason = format!("parent {} was cancelled", parent.0);
        for c in children {
            self.count_lost_attempt(c, TaskStatus::Cancelled);
            let cancelled = self.move_task(c, TaskStatus::Cancelled, |t| {
                t.lease = None;
                t.clear_next_attempt();
                t.stop_waiting();
                t.outcome_mut().last_error = Some(reason.clone());
            });
            if cancelled.is_ok() {
                self.emit(events, c, EventKind::Cancelled);
                self.settle.push(Settle::Children(c));
            }
        }
    }

    fn dependency_completed(&mut self, w: TaskId, dep: TaskId, events: &mut Vec<Event>) {
        let t = &self.tasks[&w];
        let left: Vec<TaskId> = t
            .extras()
            .waiting_on
            .iter()
            .copied()
            .filter(|d| *d != dep)
            .collect();
        // A task awaiting approval keeps count, and goes on when approved.
        if !left.is_empty() || t.status == TaskStatus::AwaitingApproval {
            let reason = self.blocked_reason(&left);
            self.edit_in_place(w, |t| {
                t.set_waiting(left, reason);
            });
            return;
        }
        let scheduled = t
            .extras()
            .scheduled_at_ms
            .is_some_and(|at| at > self.clock_ms);
        let to = if scheduled {
            TaskStatus::Scheduled
        } else {
            TaskStatus::Pending
        };
        self.move_task(w, to, |t| {
            t.stop_waiting();
        })
        .expect("invariant: a waiting task may become pending or scheduled");
        self.emit(events, w, EventKind::DependenciesMet);
    }

    fn dependency_failed(
        &mut self,
        w: TaskId,
        dep: TaskId,
        status: TaskStatus,
        events: &mut Vec<Event>,
    ) {
        let reason = format!("dependency {} is {}", dep.0, status.as_str());
        match self.tasks[&w].on_dependency_failure {
            DependencyFailure::Cancel => {
                self.move_task(w, TaskStatus::Cancelled, |t| {
                    t.stop_waiting();
                    t.outcome_mut().last_error = Some(reason);
                })
                .expect("invariant: a waiting task may be cancelled");
                self.emit(events, w, EventKind::Cancelled);
                self.settle.push(Settle::Children(w));
            }
            DependencyFailure::Block => {
                // The reason names the first failed dependency as it is
                // now (one dead-lettered, then cancelled, says so).
                let t = &self.tasks[&w];
                let reason = self.blocked_reason(&t.extras().waiting_on);
                if reason != t.extras().blocked {
                    self.edit_in_place(w, |t| t.set_blocked(reason));
                    self.emit(events, w, EventKind::Blocked { dependency: dep });
                }
            }
        }
    }

    /// Approves task `id`, awaiting approval: it goes on, waiting on the
    /// dependencies it still has, else ready (or scheduled).
    fn approve(
        &mut self,
        id: TaskId,
        by: &str,
        reason: Option<&str>,
        events: &mut Vec<Event>,
    ) -> Outcome {
        let t = self.awaiting_approval(id)?;
        let to = if !t.extras().waiting_on.is_empty() {
            TaskStatus::Waiting
        } else if t
            .extras()
            .scheduled_at_ms
            .is_some_and(|at| at > self.clock_ms)
        {
            TaskStatus::Scheduled
        } else {
            TaskStatus::Pending
        };
        let decision = self.decision(true, by, reason);
        self.move_task(id, to, |t| {
            if let Some(a) = t.extras.as_mut().and_then(|x| x.approval.as_mut()) {
                a.decision = Some(decision);
            }
        })?;
        self.emit(events, id, EventKind::Approved { by: by.into() });
        Ok(Reply::Task(self.boxed(id)))
    }

    /// Rejects task `id`, awaiting approval: it is cancelled, naming who
    /// and why; its children and dependents follow as for a cancel.
    fn reject(&mut self, id: TaskId, by: &str, reason: &str, events: &mut Vec<Event>) -> Outcome {
        if reason.trim().is_empty() {
            return Err(Rejection::invalid("reason", "a rejection needs a reason"));
        }
        self.awaiting_approval(id)?;
        let decision = self.decision(false, by, Some(reason));
        let error = truncate(
            &format!("rejected by {by}: {reason}"),
            Limits::MAX_ERROR_BYTES,
        );
        self.move_task(id, TaskStatus::Cancelled, |t| {
            t.stop_waiting();
            t.outcome_mut().last_error = Some(error);
            if let Some(a) = t.extras.as_mut().and_then(|x| x.approval.as_mut()) {
                a.decision = Some(decision);
            }
        })?;
        self.emit(events, id, EventKind::Rejected { by: by.into() });
        self.emit(events, id, EventKind::Cancelled);
        self.settle.push(Settle::Children(id));
        Ok(Reply::Task(self.boxed(id)))
    }

    /// An undecided approval request lapsed: the task is cancelled.
    fn expire_approval(&mut self, id: TaskId, events: &mut Vec<Event>) {
        self.move_task(id, TaskStatus::Cancelled, |t| {
            t.stop_waiting();
            t.outcome_mut().last_error = Some("approval expired undecided".into());
        })
        .expect("invariant: a task awaiting approval may be cancelled");
        self.emit(events, id, EventKind::ApprovalExpired);
        self.emit(events, id, EventKind::Cancelled);
        self.settle.push(Settle::Children(id));
    }

    /// The kill switch holding task `t`, if one matches it.
    pub fn switch_holding(&self, t: &Task) -> Option<&str> {
        self.switches
            .iter()
            .find(|(n, s)| s.holds(n, t))
            .map(|(n, _)| n.as_str())
    }

    /// The feature flags, by name.
    pub fn flags(&self) -> &BTreeMap<String, FeatureFlag> {
        &self.flags
    }

    /// The names of the feature flags on for `task` on an agent of a
    /// gateway of `kind` declaring `model` (`None`: an external worker).
    pub fn flags_on(&self, task: &Task, kind: Option<&str>, model: Option<&str>) -> Vec<String> {
        self.flags
            .iter()
            .filter(|(n, f)| f.on_for(n, task, kind, model))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Sets or removes feature flag `name`.
    fn set_flag(&mut self, name: &str, flag: Option<&FeatureFlag>) -> Outcome {
        if self.group != 0 {
            return Err(Rejection::invalid(
                "command",
                "feature flags live in the meta group",
            ));
        }
        FeatureFlag::check(name, flag)?;
        match flag {
            Some(f) => {
                if !self.flags.contains_key(name) && self.flags.len() >= MAX_FLAGS {
                    return Err(Rejection::invalid(
                        "name",
                        format!("at most {MAX_FLAGS} flags; remove one first"),
                    ));
                }
                let mut f = f.clone();
                f.at_ms = self.clock_ms;
                f.by = truncate(&f.by, Limits::MAX_NAME_BYTES);
                self.flags.insert(name.to_owned(), f);
            }
            None => {
                self.flags.remove(name);
            }
        }
        Ok(Reply::Done)
    }

    /// The kill switches, by name.
    pub fn switches(&self) -> &BTreeMap<String, KillSwitch> {
        &self.switches
    }

    /// Sets or lifts kill switch `name`. Pending work is filed again under
    /// the new switches (held or ready); with `cancel_leased`, matching
    /// leased work is cancelled, naming the switch.
    fn set_switch(
        &mut self,
        name: &str,
        switch: Option<&KillSwitch>,
        events: &mut Vec<Event>,
    ) -> Outcome {
        check_switch(name, switch)?;
        if switch.is_none() && !self.switches.contains_key(name) {
            return Ok(Reply::Done);
        }
        if self.group == 0 {
            self.sync_rev += 1;
            self.switch_revs.insert(name.to_owned(), self.sync_rev);
        }
        let pending: Vec<TaskId> = self
            .tasks
            .values()
            .filter(|t| t.status == TaskStatus::Pending)
            .map(|t| t.id)
            .collect();
        for id in &pending {
            self.unindex(*id);
        }
        let switch = switch.map(|sw| {
            let mut sw = sw.clone();
            sw.at_ms = self.clock_ms;
            sw.reason = sw.reason.map(|r| truncate(&r, Limits::MAX_ERROR_BYTES));
            if self.group == 0 {
                // The gateways it stops work on now, from the registry
                // (a queue shard keeps the list its copy came with).
                sw.gateways = self
                    .registry
                    .gateways
                    .values()
                    .filter(|g| sw.on_gateway(&g.reg.kind, g.reg.model.as_deref()))
                    .map(|g| g.reg.id.clone())
                    .take(MAX_SWITCH_GATEWAYS)
                    .collect();
            }
            sw
        });
        match &switch {
            Some(sw) => {
                self.switches.insert(name.to_owned(), sw.clone());
            }
            None => {
                self.switches.remove(name);
            }
        }
        for id in &pending {
            self.index(*id);
        }
        if let Some(sw) = switch.filter(|s| s.cancel_leased) {
            let stops = |t: &Task| {
                if !sw.on_agents() {
                    return sw.covers(name, t);
                }
                let on = t.lease.as_ref().and_then(|l| l.gateway.as_ref());
                on.is_some_and(|g| sw.gateways.contains(g)) && sw.covers(name, t)
            };
            let leased: Vec<TaskId> = self
                .tasks
                .values()
                .filter(|t| t.status.is_leased() && stops(t))
                .map(|t| t.id)
                .collect();
            let reason = format!("kill switch {name}");
            for id in leased {
                self.count_lost_attempt(id, TaskStatus::Cancelled);
                self.move_task(id, TaskStatus::Cancelled, |t| {
                    t.lease = None;
                    t.outcome_mut().last_error = Some(reason.clone());
                })
                .expect("invariant: a leased task may be cancelled");
                // Its children go on unless the switch matches them too:
                // a switch stops the work it names, no more.
                self.emit(events, id, EventKind::Cancelled);
            }
        }
        Ok(Reply::Done)
    }

    /// Task `id`, if it awaits approval; else why not.
    fn awaiting_approval(&self, id: TaskId) -> Result<&Task, Rejection> {
        let t = self.tasks.get(&id).ok_or(Rejection::NotFound(id))?;
        if t.status != TaskStatus::AwaitingApproval {
            return Err(Rejection::Conflict(format!(
                "task {} is {}, not awaiting approval",
                id.0,
                t.status.as_str()
            )));
        }
        Ok(t)
    }

    fn decision(&self, approved: bool, by: &str, reason: Option<&str>) -> ApprovalDecision {
        ApprovalDecision {
            approved,
            by: truncate(by, Limits::MAX_NAME_BYTES),
            reason: reason.map(|r| truncate(r, Limits::MAX_ERROR_BYTES)),
            at_ms: self.clock_ms,
        }
    }

    fn cancel(
        &mut self,
        id: TaskId,
        reason: Option<&str>,
        keep_children: bool,
        events: &mut Vec<Event>,
    ) -> Outcome {
        let reason = reason.map(|r| truncate(r, Limits::MAX_ERROR_BYTES));
        self.count_lost_attempt(id, TaskStatus::Cancelled);
        self.move_task(id, TaskStatus::Cancelled, |t| {
            t.lease = None;
            t.clear_next_attempt();
            t.stop_waiting();
            if reason.is_some() {
                t.outcome_mut().last_error = reason;
            }
        })?;
        self.emit(events, id, EventKind::Cancelled);
        if !keep_children {
            self.settle.push(Settle::Children(id));
        }
        Ok(Reply::Task(self.boxed(id)))
    }

    fn retry(&mut self, id: TaskId, events: &mut Vec<Event>) -> Outcome {
        let status = self.tasks.get(&id).ok_or(Rejection::NotFound(id))?.status;
        if !matches!(status, TaskStatus::Failed | TaskStatus::DeadLetter) {
            return Err(Rejection::IllegalTransition {
                id,
                from: status,
                to: TaskStatus::Pending,
            });
        }
        self.requeue(id, events);
        Ok(Reply::Task(self.boxed(id)))
    }

    /// Makes a failed or dead-lettered task ready; a dead letter gets fresh attempts.
    fn requeue(&mut self, id: TaskId, events: &mut Vec<Event>) {
        self.move_task(id, TaskStatus::Pending, |t| {
            if t.status == TaskStatus::DeadLetter {
                t.attempts = 0;
            }
            t.clear_next_attempt();
        })
        .expect("invariant: caller checked the task is failed or dead-lettered");
        self.emit(events, id, EventKind::Requeued);
    }

    pub(crate) fn replay(
        &mut self,
        selector: &ReplaySelector,
        limit: u32,
        events: &mut Vec<Event>,
    ) -> Outcome {
        if limit == 0 || limit as usize > Limits::MAX_REPLAY {
            return Err(Rejection::invalid(
                "limit",
                format!("must be 1..={}", Limits::MAX_REPLAY),
            ));
        }
        let ids = match selector {
            ReplaySelector::Ids(ids) => self.check_dead_letters(ids, limit)?,
            ReplaySelector::Filter(filter) => self.matching_dead_letters(filter, limit as usize),
        };
        for &id in &ids {
            self.requeue(id, events);
        }
        Ok(Reply::Replayed(ids))
    }

    /// The dead letters `ids` (deduplicated), or why they cannot be
    /// replayed.
    pub fn check_dead_letters(&self, ids: &[TaskId], limit: u32) -> Result<Vec<TaskId>, Rejection> {
        if ids.is_empty() || ids.len() > limit as usize {
            return Err(Rejection::invalid(
                "ids",
                format!("give 1..={limit} task ids"),
            ));
        }
        let unique: BTreeSet<TaskId> = ids.iter().copied().collect();
        for &id in &unique {
            let task = self.tasks.get(&id).ok_or(Rejection::NotFound(id))?;
            if task.status != TaskStatus::DeadLetter {
                let (from, to) = (task.status, TaskStatus::Pending);
                return Err(Rejection::IllegalTransition { id, from, to });
            }
        }
        Ok(unique.into_iter().collect())
    }

    pub(crate) fn matching_dead_letters(&self, f: &DeadLetterFilter, limit: usize) -> Vec<TaskId> {
        self.dead_letters
            .iter()
            .copied()
            .filter(|id| f.matches(&self.tasks[id]))
            .take(limit)
            .collect()
    }

    fn set_weight(&mut self, tenant: &Tenant, weight: u32) -> Outcome {
        check_name("tenant", &tenant.0, false).map_err(|(f, p)| Rejection::invalid(f, p))?;
        if !(1..=1000).contains(&weight) {
            return Err(Rejection::invalid("weight", "must be 1..=1000"));
        }
        self.weights.insert(tenant.clone(), weight);
        self.weight_changed(tenant);
        Ok(Reply::Done)
    }

    /// In the meta group: tenant `tenant`'s weight changed (set, or gone
    /// with its record): a new revision for the shards' copies.
    pub(crate) fn weight_changed(&mut self, tenant: &Tenant) {
        if self.group == 0 {
            self.sync_rev += 1;
            self.weight_revs.insert(tenant.clone(), self.sync_rev);
        }
    }

    /// In the meta group: the last revision given to a change of the
    /// weights and kill switches.
    pub fn sync_rev(&self) -> u64 {
        self.sync_rev
    }

    /// Tokens and compute time used, and waits for a first lease.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The revisions of this shard's copy of the weights and kill switches
    /// ([`State::sync_for`]).
    pub fn synced(&self) -> Synced {
        Synced {
            weight_revs: self.weight_revs.clone(),
            switch_revs: self.switch_revs.clone(),
        }
    }

    /// Records a budget alert once per limit (a repeat changes nothing; a
    /// limit changed and reached again alerts again), with its event;
    /// alerts of periods that began over 62 days before this one are
    /// forgotten.
    fn budget_alert(&mut self, a: &BudgetAlert) -> Outcome {
        check_name("tenant", &a.tenant.0, false).map_err(|(f, p)| Rejection::invalid(f, p))?;
        if a.limit == 0 {
            return Err(Rejection::invalid("limit", "must be > 0"));
        }
        let key = (
            a.tenant.clone(),
            a.period,
            a.start_day,
            a.unit,
            a.level,
            a.limit,
        );
        if !self.budget_alerts.insert(key) {
            return Ok(Reply::Done);
        }
        let oldest = a.start_day.saturating_sub(62);
        self.budget_alerts.retain(|k| k.2 >= oldest);
        self.outbox.push(What::Budget(a.clone()));
        Ok(Reply::Done)
    }

    /// Whether this budget level of this limit was alerted in this period
    /// already.
    pub fn budget_alerted(
        &self,
        tenant: &Tenant,
        period: BudgetPeriod,
        start_day: Day,
        unit: BudgetUnit,
        level: BudgetLevel,
        limit: u64,
    ) -> bool {
        self.budget_alerts
            .contains(&(tenant.clone(), period, start_day, unit, level, limit))
    }

    /// In a restored meta group: gives every weight and kill switch a new
    /// revision above any the restored shards hold, and one to each key a
    /// shard holds that the meta group does not know (as none). A backup
    /// copies the groups one after another, so a shard may hold a later
    /// change than the meta group, or revisions the meta group has not
    /// handed out yet; after this, `sync_for` brings every shard back to
    /// the meta group's record.
    pub fn restamp_after_restore(&mut self, shards: &[Synced]) {
        for s in shards {
            let top = s.weight_revs.values().chain(s.switch_revs.values()).max();
            self.sync_rev = self.sync_rev.max(top.copied().unwrap_or(0));
            for t in s.weight_revs.keys() {
                self.weight_revs.entry(t.clone()).or_insert(0);
            }
            for n in s.switch_revs.keys() {
                self.switch_revs.entry(n.clone()).or_insert(0);
            }
        }
        for rev in self
            .weight_revs
            .values_mut()
            .chain(self.switch_revs.values_mut())
        {
            self.sync_rev += 1;
            *rev = self.sync_rev;
        }
    }

    /// What the meta group records for every queue shard, as a
    /// [`Command::SyncShard`] bringing a shard whose copy is `shard` up to
    /// it: the weights and switches whose revision here is newer than the
    /// shard's (`None`: nothing to bring).
    pub fn sync_for(&self, shard: &Synced) -> Option<Command> {
        let weights: Vec<SyncWeight> = self
            .weight_revs
            .iter()
            .filter(|(t, rev)| shard.weight_revs.get(*t) < Some(*rev))
            .map(|(t, rev)| SyncWeight {
                tenant: t.clone(),
                weight: self.weights.get(t).copied(),
                rev: *rev,
            })
            .collect();
        let switches: Vec<SyncSwitch> = self
            .switch_revs
            .iter()
            .filter(|(n, rev)| shard.switch_revs.get(*n) < Some(*rev))
            .map(|(n, rev)| SyncSwitch {
                name: n.clone(),
                switch: self.switches.get(n).cloned(),
                rev: *rev,
            })
            .collect();
        (!weights.is_empty() || !switches.is_empty())
            .then_some(Command::SyncShard { weights, switches })
    }

    /// In a queue shard: takes the meta group's weights and kill switches
    /// newer than its copy ([`Command::SyncShard`]). All or nothing: one bad
    /// item refuses the command.
    fn sync_shard(
        &mut self,
        weights: &[SyncWeight],
        switches: &[SyncSwitch],
        events: &mut Vec<Event>,
    ) -> Outcome {
        if self.group == 0 {
            return Err(Rejection::invalid(
                "command",
                "only a queue shard takes a copy of the meta group's weights and kill switches",
            ));
        }
        for w in weights {
            check_name("tenant", &w.tenant.0, false).map_err(|(f, p)| Rejection::invalid(f, p))?;
            if w.weight.is_some_and(|v| !(1..=1000).contains(&v)) {
                return Err(Rejection::invalid("weight", "must be 1..=1000"));
            }
        }
        for sw in switches {
            check_switch(&sw.name, sw.switch.as_ref())?;
        }
        for w in weights {
            if self.weight_revs.get(&w.tenant) >= Some(&w.rev) {
                continue;
            }
            match w.weight {
                Some(v) => self.weights.insert(w.tenant.clone(), v),
                None => self.weights.remove(&w.tenant),
            };
            self.weight_revs.insert(w.tenant.clone(), w.rev);
        }
        for sw in switches {
            if self.switch_revs.get(&sw.name) >= Some(&sw.rev) {
                continue;
            }
            self.set_switch(&sw.name, sw.switch.as_ref(), events)?;
            self.switch_revs.insert(sw.name.clone(), sw.rev);
        }
        Ok(Reply::Done)
    }

    /// The one way a task's status changes: checks the transition, takes the
    /// task out of the indexes of its old status, edits it, and files it under
    /// the new one.
    pub(crate) fn move_task(
        &mut self,
        id: TaskId,
        to: TaskStatus,
        edit: impl FnOnce(&mut Task),
    ) -> Result<(), Rejection> {
        let from = self.tasks.get(&id).ok_or(Rejection::NotFound(id))?.status;
        if !from.can_become(to) {
            return Err(Rejection::IllegalTransition { id, from, to });
        }
        self.edit_in_place(id, |t| {
            edit(t);
            t.status = to;
        });
        Ok(())
    }

    /// Edits a task while keeping indexes and counters right, whatever changes.
    pub(crate) fn edit_in_place(&mut self, id: TaskId, edit: impl FnOnce(&mut Task)) {
        self.unindex(id);
        let clock = self.clock_ms;
        let slot = self
            .tasks
            .get_mut(&id)
            .expect("invariant: caller checked the task exists");
        let task = Arc::make_mut(slot);
        let (tenant, priority, from) = (task.tenant.clone(), task.priority, task.status);
        edit(task);
        task.updated_at_ms = clock;
        let to = task.status;
        if to == TaskStatus::Pending && from != to && task.lease_count == 0 {
            // A scheduled task was ready at its time, however late the
            // timer fired.
            let due = (from == TaskStatus::Scheduled)
                .then_some(task.extras().scheduled_at_ms)
                .flatten();
            task.extras_mut().ready_at_ms = Some(due.map_or(clock, |d| d.min(clock)));
        }
        if from != to {
            self.count(&tenant, priority, from, -1);
            self.count(&tenant, priority, to, 1);
        }
        self.index(id);
        if from.is_leased() && !to.is_leased() {
            self.session_task_ended(id);
        }
        let dependents_care = to.is_final() || from == TaskStatus::DeadLetter;
        if from != to && dependents_care && self.dependents.contains_key(&id) {
            self.settle.push(Settle::Dependents(id));
        }
    }

    fn count(&mut self, tenant: &Tenant, p: Priority, s: TaskStatus, delta: i64) {
        let counts = self.counts.entry(tenant.clone()).or_default();
        let c = &mut counts[p.rank()][s.index()];
        *c = c
            .checked_add_signed(delta)
            .expect("invariant: counts never go negative");
    }

    /// Removes a task from the indexes its status puts it in.
    fn unindex(&mut self, id: TaskId) {
        self.count_session_task(id, -1);
        let t = &self.tasks[&id];
        if let Some(p) = t.extras().parent_id.filter(|_| !t.status.is_terminal())
            && let Some(c) = self.children.get_mut(&p)
        {
            c.remove(&id);
            if c.is_empty() {
                self.children.remove(&p);
            }
        }
        match t.status {
            TaskStatus::Pending => {
                if !self.held.remove(&id) {
                    self.ready
                        .remove(t.priority, &t.tenant, &t.capabilities, id);
                }
            }
            TaskStatus::Scheduled | TaskStatus::Failed => {
                self.delayed.remove(&(delayed_due(t), id));
            }
            TaskStatus::Leased | TaskStatus::Running => {
                let lease = t
                    .lease
                    .as_ref()
                    .expect("invariant: leased tasks have a lease");
                self.leases.remove(&lease.token);
                if let Some(held) = self.agent_leases.get_mut(&lease.agent_id) {
                    held.remove(&lease.token);
                    if held.is_empty() {
                        self.agent_leases.remove(&lease.agent_id);
                    }
                }
                self.expiries.remove(&(lease.expires_at_ms, id));
                self.deadlines
                    .remove(&(lease.leased_at_ms.saturating_add(t.timeout_ms), id));
            }
            TaskStatus::DeadLetter => {
                self.dead_letters.remove(&id);
                self.dead_since.remove(&(t.updated_at_ms, id));
            }
            TaskStatus::Waiting | TaskStatus::AwaitingApproval => {
                for d in &t.extras().waiting_on {
                    if let Some(w) = self.dependents.get_mut(d) {
                        w.remove(&id);
                        if w.is_empty() {
                            self.dependents.remove(d);
                        }
                    }
                }
                if let Some(at) = approval_due(t) {
                    self.delayed.remove(&(at, id));
                }
            }
            TaskStatus::Completed | TaskStatus::Cancelled => {
                self.finished.remove(&(t.updated_at_ms, id));
            }
        }
    }

    /// Files a task under the indexes of its status.
    fn index(&mut self, id: TaskId) {
        self.count_session_task(id, 1);
        let t = &self.tasks[&id];
        if let Some(p) = t.extras().parent_id.filter(|_| !t.status.is_terminal()) {
            self.children.entry(p).or_default().insert(id);
        }
        match t.status {
            TaskStatus::Pending if self.switch_holding(t).is_some() => {
                self.held.insert(id);
            }
            TaskStatus::Pending => self
                .ready
                .insert(t.priority, &t.tenant, &t.capabilities, id),
            TaskStatus::Scheduled | TaskStatus::Failed => {
                self.delayed.insert((delayed_due(t), id));
            }
            TaskStatus::Leased | TaskStatus::Running => {
                let lease = t
                    .lease
                    .as_ref()
                    .expect("invariant: leased tasks have a lease");
                self.leases.insert(lease.token, id);
                self.agent_leases
                    .entry(lease.agent_id.clone())
                    .or_default()
                    .insert(lease.token);
                self.expiries.insert((lease.expires_at_ms, id));
                self.deadlines
                    .insert((lease.leased_at_ms.saturating_add(t.timeout_ms), id));
            }
            TaskStatus::DeadLetter => {
                self.dead_letters.insert(id);
                self.dead_since.insert((t.updated_at_ms, id));
            }
            TaskStatus::Waiting | TaskStatus::AwaitingApproval => {
                for d in &t.extras().waiting_on {
                    self.dependents.entry(*d).or_default().insert(id);
                }
                if let Some(at) = approval_due(t) {
                    self.delayed.insert((at, id));
                }
            }
            TaskStatus::Completed | TaskStatus::Cancelled => {
                self.finished.insert((t.updated_at_ms, id));
            }
        }
    }

    /// A task for a reply: shares the state's copy (a later change to the
    /// task copies it instead of changing the reply).
    pub(crate) fn boxed(&self, id: TaskId) -> Arc<Task> {
        Arc::clone(&self.tasks[&id])
    }

    pub(crate) fn emit(&self, events: &mut Vec<Event>, id: TaskId, kind: EventKind) {
        let task = &self.tasks[&id];
        events.push(Event {
            seq: 0,
            what: What::Task {
                task: id,
                tenant: task.tenant.clone(),
                priority: task.priority,
                kind,
            },
        });
    }
}

/// The kinds of timer, in the order they fire when due at the same time for
/// the same task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// A scheduled task's time, or a failed task's next attempt.
    Ready,
    /// A lease lapses.
    LeaseExpiry,
    /// An attempt's deadline (lease start + timeout).
    Deadline,
}

/// When a scheduled or failed task becomes ready.
/// When an undecided approval request of task `t` lapses, while it
/// awaits approval (it is then in the delayed timers).
fn approval_due(t: &Task) -> Option<u64> {
    (t.status == TaskStatus::AwaitingApproval)
        .then(|| t.extras().approval.as_ref().and_then(|a| a.expires_at_ms))
        .flatten()
}

fn delayed_due(t: &Task) -> u64 {
    match t.status {
        TaskStatus::Failed => t
            .outcome()
            .next_attempt_at_ms
            .expect("invariant: failed tasks have a next attempt"),
        _ => t
            .extras()
            .scheduled_at_ms
            .expect("invariant: scheduled tasks have a time"),
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary.
/// A queue shard's revisions of its copy of the meta group's weights and
/// kill switches ([`State::synced`]).
#[derive(Clone, Debug, Default)]
pub struct Synced {
    weight_revs: BTreeMap<Tenant, u64>,
    switch_revs: BTreeMap<String, u64>,
}

/// Most gateways a kill switch by kind or model lists.
const MAX_SWITCH_GATEWAYS: usize = 10_000;

/// What a [`Command::Purge`] forgets: finished tasks that finished before
/// `finished_before_ms`, or past the newest `keep`; dead letters
/// dead-lettered before `dead_before_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Horizon {
    /// Finished tasks that finished before this time go.
    pub finished_before_ms: u64,
    /// Past those, the oldest finished go while more than this many remain.
    pub keep: u64,
    /// Dead letters dead-lettered before this time go (0: none).
    pub dead_before_ms: u64,
}

/// How many finished tasks kept for their dependents a purge looks past.
const PURGE_SKIP: usize = 64;

/// A kill switch's name and what it matches, checked.
fn check_switch(name: &str, switch: Option<&KillSwitch>) -> Result<(), Rejection> {
    check_name("name", name, false).map_err(|(f, p)| Rejection::invalid(f, p))?;
    if let Some(sw) = switch {
        check_scope(
            sw.tenant.as_ref(),
            sw.capability.as_deref(),
            sw.gateway_kind.as_deref(),
            sw.model.as_deref(),
            sw.percent,
        )?;
        if sw.gateways.len() > MAX_SWITCH_GATEWAYS {
            let problem = format!("at most {MAX_SWITCH_GATEWAYS}");
            return Err(Rejection::invalid("gateways", problem));
        }
        for g in &sw.gateways {
            check_name("gateways", &g.0, false).map_err(|(f, p)| Rejection::invalid(f, p))?;
        }
    }
    Ok(())
}

pub(crate) fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// The id after `last` in `group`: plain counting in the meta group; in a
/// queue shard, the shard's own count shifted left by 8 bits plus the shard,
/// so an id names the shard that holds it ([`group_of`]).
pub(crate) fn mint(last: u64, group: u32) -> u64 {
    if group == 0 {
        last + 1
    } else {
        (((last >> 8) + 1) << 8) | u64::from(group)
    }
}

/// Work left by a command for after it (see [`State::settle`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settle {
    /// The task's waiting dependents hear of its new status.
    Dependents(TaskId),
    /// The cancelled task's unfinished children are cancelled.
    Children(TaskId),
}

/// The queue shard that minted `id` in a cluster of `shards` shards: 0 (the
/// meta group, which mints plain ids) when the cluster has one; else the
/// id's low byte, or `None` when that names no shard of the cluster.
pub fn group_of(id: u64, shards: u32) -> Option<u32> {
    if shards <= 1 {
        return Some(0);
    }
    let g = (id & 0xff) as u32;
    (1..=shards).contains(&g).then_some(g)
}

/// The queue shard a task with `key` (its session key, else its
/// idempotency key) of `tenant` goes to in a cluster of `shards` shards:
/// 0 with one shard, else `1 + h(tenant, key) mod shards`, with `h` 64-bit
/// FNV-1a over the tenant, a zero byte and the key. It is fixed: every
/// node and every version must route a key alike, so a session's tasks stay
/// in one shard and a retried submission finds its idempotency key.
pub fn route(tenant: &str, key: &str, shards: u32) -> u32 {
    if shards <= 1 {
        return 0;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tenant.bytes().chain([0]).chain(key.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    1 + (h % u64::from(shards)) as u32
}

#[cfg(test)]
mod tests {
    use super::{State, group_of, mint, route};
    use crate::fsm::{Command, Reply, SubmitTask, TaskFilter, TaskPage};

    /// A queue shard brought up to the meta group by `sync_for` holds the
    /// same weights and kill switches, whatever order the changes came in
    /// and whichever copies arrived late or twice; then `sync_for` has
    /// nothing to send.
    #[test]
    fn shard_copies_converge_on_the_meta_group() {
        use crate::fsm::{KillSwitch, Synced, Tenant};
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for _ in 0..200 {
            let mut meta = State::default();
            let mut shard = State::default();
            shard
                .apply_one(0, Command::DefineGroup { group: 2 })
                .unwrap();
            let mut sent = Vec::new();
            for step in 0..20 {
                let tenant = Tenant::from(format!("t{}", next(3)));
                let cmd = match next(3) {
                    0 => Command::SetTenantWeight {
                        tenant,
                        weight: 1 + next(5) as u32,
                    },
                    1 => Command::SetSwitch {
                        name: format!("s{}", next(3)),
                        switch: Some(KillSwitch {
                            tenant: Some(tenant),
                            ..KillSwitch::default()
                        }),
                    },
                    _ => Command::SetSwitch {
                        name: format!("s{}", next(3)),
                        switch: None,
                    },
                };
                meta.apply_one(step, cmd).unwrap();
                // A copy taken now, against an empty shard: sent now, late,
                // or never.
                if let Some(copy) = meta.sync_for(&Synced::default()) {
                    sent.push(copy);
                }
                if next(2) == 0 && !sent.is_empty() {
                    let i = next(sent.len() as u64) as usize;
                    shard.apply_one(step, sent.remove(i)).unwrap();
                }
            }
            while !sent.is_empty() && next(2) == 0 {
                let i = next(sent.len() as u64) as usize;
                shard.apply_one(99, sent.remove(i)).unwrap();
            }
            if let Some(rest) = meta.sync_for(&shard.synced()) {
                shard.apply_one(100, rest).unwrap();
            }
            // Late copies after the last sync change nothing either.
            for copy in sent {
                shard.apply_one(101, copy).unwrap();
            }
            assert_eq!(shard.weights, meta.weights);
            assert_eq!(switches_of(&shard), switches_of(&meta));
            assert!(meta.sync_for(&shard.synced()).is_none());
        }
    }

    /// A kill switch as it stops work (not when or by whom it was set).
    fn switches_of(s: &State) -> Vec<(String, Option<crate::fsm::Tenant>, Option<String>, bool)> {
        s.switches
            .iter()
            .map(|(n, w)| {
                (
                    n.clone(),
                    w.tenant.clone(),
                    w.capability.clone(),
                    w.cancel_leased,
                )
            })
            .collect()
    }

    /// After a restore whose shard holds later changes than its meta group
    /// (a lifted switch, one the meta copy never saw), the shard is brought
    /// back to the meta group's record.
    #[test]
    fn a_restored_meta_group_wins_over_its_shards() {
        use crate::fsm::{KillSwitch, Synced};
        let set = |name: &str| Command::SetSwitch {
            name: name.into(),
            switch: Some(KillSwitch::default()),
        };
        let mut meta = State::default();
        meta.apply_one(0, set("s")).unwrap();
        let mut shard = State::default();
        shard
            .apply_one(0, Command::DefineGroup { group: 1 })
            .unwrap();
        shard
            .apply_one(0, meta.sync_for(&Synced::default()).unwrap())
            .unwrap();
        // Later changes the meta copy in the backup does not hold.
        let mut later = meta.clone();
        later
            .apply_one(
                1,
                Command::SetSwitch {
                    name: "s".into(),
                    switch: None,
                },
            )
            .unwrap();
        later.apply_one(1, set("x")).unwrap();
        shard
            .apply_one(1, later.sync_for(&shard.synced()).unwrap())
            .unwrap();
        assert!(
            meta.sync_for(&shard.synced()).is_none(),
            "stale revisions: nothing sent"
        );
        meta.restamp_after_restore(&[shard.synced()]);
        shard
            .apply_one(2, meta.sync_for(&shard.synced()).unwrap())
            .unwrap();
        assert_eq!(switches_of(&shard), switches_of(&meta));
        assert_eq!(switches_of(&shard).len(), 1, "s on, x gone");
        // And later changes go through.
        meta.apply_one(
            3,
            Command::SetSwitch {
                name: "s".into(),
                switch: None,
            },
        )
        .unwrap();
        shard
            .apply_one(3, meta.sync_for(&shard.synced()).unwrap())
            .unwrap();
        assert!(shard.switches.is_empty());
    }

    /// Pages merged from shards, read page by page with each merged
    /// page's cursor, list every task exactly once in id order, whatever the
    /// page size and scan budget.
    #[test]
    fn merged_pages_list_every_shard_in_id_order() {
        let mut shards: Vec<State> = (1..=3).map(|_| State::default()).collect();
        for (i, s) in shards.iter_mut().enumerate() {
            s.apply_one(
                0,
                Command::DefineGroup {
                    group: i as u32 + 1,
                },
            )
            .expect("a new state becomes a shard");
        }
        // Uneven: shard 1 gets most, shard 3 few.
        for n in 0..40u64 {
            let shard = [0, 0, 0, 1, 1, 2][(n % 6) as usize];
            let submit = SubmitTask {
                tenant: if n % 5 == 0 { "b" } else { "a" }.into(),
                payload: "{}".into(),
                ..Default::default()
            };
            shards[shard]
                .apply_one(n + 1, Command::Submit(submit))
                .expect("submitted");
        }
        let mut all: Vec<u64> = shards
            .iter()
            .flat_map(|s| s.tasks.keys().map(|t| t.0))
            .collect();
        all.sort();
        for tenant in [None, Some("a"), Some("b")] {
            let filter = TaskFilter {
                tenant: tenant.map(Into::into),
                ..Default::default()
            };
            let want: Vec<u64> = all
                .iter()
                .copied()
                .filter(|id| {
                    let t = shards
                        .iter()
                        .find_map(|s| s.task(crate::fsm::TaskId(*id)))
                        .expect("listed");
                    tenant.is_none_or(|x| t.tenant.as_str() == x)
                })
                .collect();
            for (limit, budget) in [(1, 100), (3, 100), (7, 2), (100, 5), (100, 1000)] {
                let mut got = Vec::new();
                let mut after = None;
                for _ in 0..200 {
                    let pages = shards
                        .iter()
                        .map(|s| s.list(&filter, after, limit, budget))
                        .collect();
                    let page = TaskPage::merge(pages, limit);
                    assert!(page.items.len() <= limit);
                    got.extend(page.items.iter().map(|t| t.id.0));
                    match page.next {
                        Some(n) => after = Some(n),
                        None => break,
                    }
                }
                assert_eq!(got, want, "tenant {tenant:?} limit {limit} budget {budget}");
            }
        }
    }

    #[test]
    fn routing_is_fixed_and_spreads() {
        assert_eq!(route("acme", "s-1", 1), 0, "one shard: the meta group");
        // Fixed values: a change here moves keys between shards of a running
        // cluster, so it must never happen.
        assert_eq!(route("acme", "s-1", 3), route("acme", "s-1", 3));
        assert_eq!(
            [
                route("acme", "a", 7),
                route("acme", "b", 7),
                route("t2", "a", 7)
            ],
            [6, 1, 1],
            "64-bit FNV-1a, as computed independently"
        );
        let mut hits = [0u32; 4];
        for i in 0..3000 {
            hits[route("acme", &format!("session-{i}"), 3) as usize] += 1;
        }
        assert_eq!(hits[0], 0);
        for h in &hits[1..] {
            assert!((900..=1100).contains(h), "uneven spread {hits:?}");
        }
    }

    #[test]
    fn ids_name_their_shard() {
        assert_eq!((mint(0, 0), mint(41, 0)), (1, 42), "the meta group counts");
        let mut last = 0;
        for n in 1..=300u64 {
            last = mint(last, 7);
            assert_eq!(last, (n << 8) | 7);
            assert_eq!(group_of(last, 8), Some(7));
        }
        assert_eq!(group_of(last, 1), Some(0), "one shard: the meta group");
        assert_eq!(group_of(last, 6), None, "shard 7 of a 6-shard cluster");
        assert_eq!(group_of(256, 3), None, "low byte 0 is no shard");
    }

    /// A state that minted a task id (or a token, or a session id) cannot
    /// become a shard: its ids would not name it.
    #[test]
    fn only_a_new_state_becomes_a_shard() {
        let mut s = State::default();
        let submit = SubmitTask {
            tenant: "t".into(),
            payload: "{}".into(),
            ..Default::default()
        };
        assert!(matches!(
            s.apply_one(0, Command::Submit(submit)),
            Ok(Reply::Submitted { .. })
        ));
        let before = s.clone();
        let refused = s.apply_one(1, Command::DefineGroup { group: 2 });
        assert!(
            refused
                .unwrap_err()
                .to_string()
                .contains("minted ids already")
        );
        assert_eq!(s.group(), 0);
        assert_eq!(s.tasks, before.tasks);
    }

    /// The count of each session's unfinished tasks (what a lookback
    /// submission asks) stays equal to a recount over the tasks through
    /// submissions, leases, completions, failures to dead letter,
    /// replays, cancels and lease expiries.
    #[test]
    fn session_task_counts_match_a_recount() {
        use crate::fsm::{
            AgentId, FencingToken, ReplaySelector, SessionKey, TaskId, TaskStatus, Tenant,
        };
        use std::collections::BTreeMap;
        let recount = |s: &State| {
            let mut m: BTreeMap<(Tenant, SessionKey), u32> = BTreeMap::new();
            for t in s.tasks.values() {
                let done = matches!(t.status, TaskStatus::Completed | TaskStatus::Cancelled);
                if let (Some(k), false) = (&t.session_key, done) {
                    *m.entry((t.tenant.clone(), k.clone())).or_default() += 1;
                }
            }
            m
        };
        let mut s = State::default();
        let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: u64| {
            rng = rng
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (rng >> 33) % n
        };
        let mut now = 0;
        for _ in 0..2_000 {
            now += next(5_000);
            let ids: Vec<TaskId> = s.tasks.keys().copied().collect();
            let tokens: Vec<FencingToken> = s.leases.keys().copied().collect();
            let any_id = |k: u64| ids.get(k as usize % ids.len().max(1)).copied();
            let any_token = |k: u64| tokens.get(k as usize % tokens.len().max(1)).copied();
            let cmd = match next(7) {
                0 | 1 => Some(Command::Submit(SubmitTask {
                    tenant: Tenant(["a", "b"][next(2) as usize].into()),
                    payload: "{}".into(),
                    session_key: (next(3) > 0).then(|| SessionKey(format!("s{}", next(4)))),
                    max_attempts: Some(2),
                    ..Default::default()
                })),
                2 => Some(Command::Lease {
                    agent_id: AgentId("w".into()),
                    capabilities: vec![],
                    max: 3,
                    lease_ms: 10_000,
                }),
                3 => any_token(next(100)).map(|token| Command::Complete {
                    token,
                    result: "{}".into(),
                }),
                4 => any_token(next(100)).map(|token| Command::Fail {
                    token,
                    error: "e".into(),
                    retryable: next(2) == 0,
                    usage: None,
                }),
                5 => any_id(next(100)).map(|id| Command::Cancel {
                    id,
                    reason: None,
                    keep_children: false,
                }),
                _ => any_id(next(100)).map(|id| Command::Replay {
                    selector: ReplaySelector::Ids(vec![id]),
                    limit: 10,
                }),
            };
            if let Some(cmd) = cmd {
                let _ = s.apply_one(now, cmd);
            }
            assert_eq!(s.session_tasks, recount(&s));
        }
        assert!(s.tasks.len() > 300, "the run made tasks");
        assert!(
            s.tasks.values().any(|t| t.status == TaskStatus::DeadLetter),
            "the run dead-lettered some"
        );
    }

    /// Dependencies and the parent tree, over random runs of submissions
    /// (with dependencies on earlier tasks, either policy, and parents),
    /// leases, completions, failures to dead letter, replays, cancels (with
    /// and without the children) and lease expiries. After every command:
    ///
    /// - no task has been leased, run or completed before each task it
    ///   depends on completed (a dependency never un-completes, so: every
    ///   task past `waiting` has all its dependencies completed);
    /// - a waiting task waits on exactly its dependencies that have not
    ///   completed, and is blocked exactly when one of them is
    ///   dead-lettered or cancelled (under `cancel` it would have been
    ///   cancelled: none is left waiting so);
    /// - the dependents and children indexes equal a recount;
    /// - a cancel that does not keep the children (or a rejection) leaves
    ///   none unfinished;
    /// - no task that asked for approval goes on without one;
    /// - kill switches: the held tasks are exactly the pending ones a switch
    ///   matches, and nothing is leased while one stops all the work.
    #[test]
    fn dependencies_children_and_approvals_hold_their_invariants() {
        use crate::fsm::{
            AgentId, Batch, DependencyFailure, EventKind, FencingToken, ReplaySelector, Request,
            TaskId, TaskStatus, Tenant, What,
        };
        use std::collections::{BTreeMap, BTreeSet};
        let mut runs_with = (0usize, 0usize, 0usize); // (released, blocked, cascaded)
        for seed in 1..=24u64 {
            let mut s = State::default();
            let mut rng: u64 = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let mut next = |n: u64| {
                rng = rng
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (rng >> 33) % n
            };
            let mut now = 0;
            for _ in 0..600 {
                now += next(3_000);
                let ids: Vec<TaskId> = s.tasks.keys().copied().collect();
                let tokens: Vec<FencingToken> = s.leases.keys().copied().collect();
                let any_id = |k: u64| ids.get(k as usize % ids.len().max(1)).copied();
                let any_token = |k: u64| tokens.get(k as usize % tokens.len().max(1)).copied();
                let cmd = match next(12) {
                    0..=2 => {
                        let deps: BTreeSet<TaskId> =
                            (0..next(4)).filter_map(|_| any_id(next(1000))).collect();
                        let deps: Vec<TaskId> = deps.into_iter().collect();
                        let policy = (!deps.is_empty()).then(|| {
                            [DependencyFailure::Cancel, DependencyFailure::Block][next(2) as usize]
                        });
                        Some(Command::Submit(SubmitTask {
                            tenant: Tenant("a".into()),
                            payload: "{}".into(),
                            max_attempts: Some(1 + next(2) as u32),
                            parent_id: if next(3) == 0 {
                                any_id(next(1000))
                            } else {
                                None
                            },
                            depends_on: deps,
                            on_dependency_failure: policy,
                            requires_approval: next(4) == 0,
                            ..Default::default()
                        }))
                    }
                    9 => any_id(next(1000)).map(|id| Command::Approve {
                        id,
                        by: "key:op".into(),
                        reason: None,
                    }),
                    10 => any_id(next(1000)).map(|id| Command::Reject {
                        id,
                        by: "key:op".into(),
                        reason: "no".into(),
                    }),
                    3 => Some(Command::Lease {
                        agent_id: AgentId("w".into()),
                        capabilities: vec![],
                        max: 3,
                        lease_ms: 10_000,
                    }),
                    4 | 5 => any_token(next(100)).map(|token| Command::Complete {
                        token,
                        result: "{}".into(),
                    }),
                    6 => any_token(next(100)).map(|token| Command::Fail {
                        token,
                        error: "e".into(),
                        retryable: next(2) == 0,
                        usage: (next(2) == 0).then(|| crate::fsm::ReportedUsage {
                            input_tokens: next(u64::MAX),
                            output_tokens: 1,
                            model: None,
                        }),
                    }),
                    7 => any_id(next(1000)).map(|id| Command::Cancel {
                        id,
                        reason: None,
                        keep_children: next(2) == 0,
                    }),
                    8 => any_id(next(1000)).map(|id| Command::Replay {
                        selector: ReplaySelector::Ids(vec![id]),
                        limit: 10,
                    }),
                    11 => Some(Command::SetSwitch {
                        name: "stop-a".into(),
                        switch: (next(2) == 0).then(|| crate::fsm::KillSwitch {
                            tenant: Some(Tenant("a".into())),
                            cancel_leased: next(2) == 0,
                            by: "key:op".into(),
                            ..Default::default()
                        }),
                    }),
                    _ => unreachable!(),
                };
                let Some(cmd) = cmd else { continue };
                let cascading = match &cmd {
                    Command::Cancel {
                        id,
                        keep_children: false,
                        ..
                    }
                    | Command::Reject { id, .. } => Some(*id),
                    _ => None,
                };
                let (response, events) =
                    s.apply(&Request::Batch(Batch::unaudited(now, 7, vec![cmd])));
                runs_with.0 += events
                    .iter()
                    .filter(|e| {
                        matches!(
                            &e.what,
                            What::Task {
                                kind: EventKind::DependenciesMet,
                                ..
                            }
                        )
                    })
                    .count();
                runs_with.1 += events
                    .iter()
                    .filter(|e| {
                        matches!(
                            &e.what,
                            What::Task {
                                kind: EventKind::Blocked { .. },
                                ..
                            }
                        )
                    })
                    .count();
                let mut dependents: BTreeMap<TaskId, BTreeSet<TaskId>> = BTreeMap::new();
                let mut children: BTreeMap<TaskId, BTreeSet<TaskId>> = BTreeMap::new();
                for t in s.tasks.values() {
                    let open: Vec<TaskId> = t
                        .extras()
                        .depends_on
                        .iter()
                        .copied()
                        .filter(|d| s.tasks[d].status != TaskStatus::Completed)
                        .collect();
                    match t.status {
                        TaskStatus::Waiting | TaskStatus::AwaitingApproval => {
                            let waiting = t.status == TaskStatus::Waiting;
                            assert!(!waiting || !open.is_empty(), "#{} waits on nothing", t.id);
                            assert_eq!(
                                t.extras().waiting_on,
                                open,
                                "#{} waits on the open deps",
                                t.id
                            );
                            let failed = open.iter().any(|d| {
                                matches!(
                                    s.tasks[d].status,
                                    TaskStatus::DeadLetter | TaskStatus::Cancelled
                                )
                            });
                            assert_eq!(
                                t.extras().blocked.is_some(),
                                failed,
                                "#{} blocked iff a dep failed",
                                t.id
                            );
                            if failed {
                                assert_eq!(t.on_dependency_failure, DependencyFailure::Block);
                            }
                            for d in &open {
                                dependents.entry(*d).or_default().insert(t.id);
                            }
                        }
                        TaskStatus::Cancelled => {}
                        other => assert!(
                            open.is_empty(),
                            "#{} is {} before its dependencies {open:?} completed",
                            t.id,
                            other.as_str()
                        ),
                    }
                    if let Some(p) = t.extras().parent_id.filter(|_| !t.status.is_terminal()) {
                        children.entry(p).or_default().insert(t.id);
                    }
                    if let Some(a) = &t.extras().approval
                        && !matches!(
                            t.status,
                            TaskStatus::AwaitingApproval | TaskStatus::Cancelled
                        )
                    {
                        assert!(
                            a.decision.as_ref().is_some_and(|d| d.approved),
                            "#{} is {} without an approval",
                            t.id,
                            t.status.as_str()
                        );
                    }
                }
                if let (Some(id), Some(Ok(_))) = (cascading, response.outcomes.first()) {
                    assert!(
                        !s.children.contains_key(&id),
                        "cancelling #{id} left unfinished children"
                    );
                }
                let held: BTreeSet<TaskId> = s
                    .tasks
                    .values()
                    .filter(|t| t.status == TaskStatus::Pending && s.switch_holding(t).is_some())
                    .map(|t| t.id)
                    .collect();
                assert_eq!(
                    s.held, held,
                    "held: exactly the pending tasks a switch matches"
                );
                if !s.switches.is_empty() {
                    assert!(
                        events.iter().all(|e| !matches!(
                            &e.what,
                            What::Task {
                                kind: EventKind::Leased { .. },
                                ..
                            }
                        )),
                        "nothing is leased while every task is switched off"
                    );
                }
                assert_eq!(s.dependents, dependents);
                assert_eq!(s.children, children);
                assert!(s.settle.is_empty());
                runs_with.2 += s
                    .tasks
                    .values()
                    .filter(|t| {
                        t.outcome()
                            .last_error
                            .as_deref()
                            .is_some_and(|e| e.starts_with("parent "))
                    })
                    .count()
                    .min(1);
            }
        }
        let (released, blocked, cascaded) = runs_with;
        assert!(released > 50, "dependencies were met often ({released})");
        assert!(blocked > 5, "some dependents blocked ({blocked})");
        assert!(cascaded > 5, "some cancels cascaded ({cascaded})");
    }
}

/// What a task holds in memory: the boxes of its rare fields and outcome
/// are allocated only when something goes in them (a deep queue of plain
/// tasks carries neither), and its tenant's name is shared.
#[cfg(test)]
mod task_memory {
    use super::{CapSets, State};
    use crate::fsm::{Command, FencingToken, Reply, SubmitTask, TaskId, TaskStatus};
    use std::sync::Arc;

    fn submit(s: &mut State, at: u64, spec: SubmitTask) -> TaskId {
        match s.apply_one(at, Command::Submit(spec)).unwrap() {
            Reply::Submitted { task, .. } => task.id,
            other => panic!("{other:?}"),
        }
    }

    fn lease(s: &mut State, at: u64) -> FencingToken {
        let lease = Command::Lease {
            agent_id: "a".into(),
            capabilities: vec![],
            max: 1,
            lease_ms: 10_000,
        };
        match s.apply_one(at, lease).unwrap() {
            Reply::Leased(grants) => grants[0].token,
            other => panic!("{other:?}"),
        }
    }

    fn plain() -> SubmitTask {
        SubmitTask {
            tenant: "t".into(),
            payload: "{}".into(),
            ..Default::default()
        }
    }

    #[test]
    fn only_what_is_set_is_boxed() {
        let mut s = State::default();
        let plain_id = submit(&mut s, 1, plain());
        let t = s.task_shared(plain_id).unwrap();
        assert!(t.extras.is_none() && t.outcome.is_none(), "{t:?}");

        // Leased, failed and retried, then cancelled: no extras appear.
        let token = lease(&mut s, 2);
        assert!(s.task_shared(plain_id).unwrap().extras.is_none());
        let fail = Command::Fail {
            token,
            error: "boom".into(),
            retryable: true,
            usage: None,
        };
        s.apply_one(3, fail).unwrap();
        s.apply_one(4, Command::Retry { id: plain_id }).unwrap();
        let cancel = Command::Cancel {
            id: plain_id,
            reason: None,
            keep_children: true,
        };
        s.apply_one(5, cancel).unwrap();
        let t = s.task_shared(plain_id).unwrap();
        assert_eq!(t.status, TaskStatus::Cancelled);
        assert!(t.extras.is_none(), "{t:?}");
        let o = t.outcome.as_deref().expect("the failure was recorded");
        assert_eq!(
            (
                o.last_agent.as_ref().map(|a| a.0.as_str()),
                o.last_error.as_deref()
            ),
            (Some("a"), Some("boom"))
        );
        assert_eq!(o.next_attempt_at_ms, None, "retried, so none is due");

        // A completed task: its result, no extras.
        let done = submit(&mut s, 6, plain());
        let token = lease(&mut s, 7);
        let complete = Command::Complete {
            token,
            result: r#"{"ok":true}"#.into(),
        };
        s.apply_one(8, complete).unwrap();
        let t = s.task_shared(done).unwrap();
        assert!(t.extras.is_none(), "{t:?}");
        assert_eq!(t.outcome().result.as_deref(), Some(r#"{"ok":true}"#));

        // What a submission sets goes in the extras, and reads back.
        let scheduled = submit(
            &mut s,
            9,
            SubmitTask {
                scheduled_at_ms: Some(1_000),
                parent_id: Some(done),
                ..plain()
            },
        );
        let t = s.task_shared(scheduled).unwrap();
        assert_eq!(t.status, TaskStatus::Scheduled);
        let x = t.extras.as_deref().expect("boxed");
        assert_eq!((x.scheduled_at_ms, x.parent_id), (Some(1_000), Some(done)));
        assert!(t.outcome.is_none());
    }

    #[test]
    fn payloads_kept_out_leave_the_rest_of_the_state_alike() {
        let spec = |n: u64, session: bool| SubmitTask {
            payload: format!(r#"{{"n":{n}}}"#),
            session_key: session.then(|| crate::fsm::SessionKey(format!("s{n}"))),
            ..plain()
        };
        let run = |s: &mut State| -> Vec<(TaskId, Box<str>)> {
            let mut taken = Vec::new();
            for n in 1..=6 {
                submit(s, n, spec(n, n == 4));
                taken.extend(s.take_stored_payloads());
            }
            let token = lease(s, 7);
            let complete = Command::Complete {
                token,
                result: "{}".into(),
            };
            s.apply_one(8, complete).unwrap();
            taken.extend(s.take_stored_payloads());
            taken
        };
        let mut held = State::default();
        assert!(run(&mut held).is_empty(), "nothing leaves by default");
        let mut out = State::default();
        out.keep_payloads_out();
        let taken = run(&mut out);
        // Every task but the session's handed its payload over, in order.
        let ids: Vec<u64> = taken.iter().map(|(id, _)| id.0).collect();
        assert_eq!(ids, [1, 2, 3, 5, 6]);
        assert_eq!(&*taken[0].1, r#"{"n":1}"#);
        assert_eq!(out.stored_payloads().count(), 5);
        assert_eq!(
            out.task(TaskId(4)).unwrap().payload,
            crate::fsm::Payload::from(r#"{"n":4}"#)
        );
        assert_ne!(out, held);
        for (id, text) in taken {
            assert!(out.hold_payload(id, text));
        }
        assert_eq!(out, held, "the same state once the payloads are back");
        assert!(!out.hold_payload(TaskId(99), "{}".into()));

        // A state that held its payloads hands them all over at once.
        let mut later = held.clone();
        later.keep_payloads_out();
        assert_eq!(later.take_stored_payloads().len(), 5);
        assert_eq!(later.stored_payloads().count(), 5);
    }

    #[test]
    fn tasks_of_a_tenant_share_its_name() {
        let mut s = State::default();
        let a = submit(&mut s, 1, plain());
        let b = submit(&mut s, 2, plain());
        let other = submit(
            &mut s,
            3,
            SubmitTask {
                tenant: "u".into(),
                ..plain()
            },
        );
        let name = |s: &State, id| s.task_shared(id).unwrap().tenant.0.clone();
        assert!(Arc::ptr_eq(&name(&s, a), &name(&s, b)));
        assert_eq!(&*name(&s, other), "u");

        // Decoding makes one copy per task; `decoded` shares them again.
        let bytes = crate::codec::encode(&s).unwrap();
        let mut d: State = crate::codec::decode_state(&bytes).unwrap();
        assert!(!Arc::ptr_eq(&name(&d, a), &name(&d, b)));
        d.decoded();
        assert!(Arc::ptr_eq(&name(&d, a), &name(&d, b)));
        assert_eq!(d, s);
    }

    #[test]
    fn tasks_that_need_the_same_capabilities_share_one_set() {
        let mut s = State::default();
        let with = |caps: &[&str]| SubmitTask {
            capabilities: caps.iter().map(|c| c.to_string()).collect(),
            ..plain()
        };
        let a = submit(&mut s, 1, with(&["git", "rust"]));
        // Normalized first: the same set, written in another order.
        let b = submit(&mut s, 2, with(&["rust", "git", "rust"]));
        let c = submit(&mut s, 3, with(&["git"]));
        let caps = |s: &State, id| s.task_shared(id).unwrap().capabilities.clone();
        assert!(Arc::ptr_eq(&caps(&s, a), &caps(&s, b)));
        assert_eq!(&*caps(&s, b), ["git".to_string(), "rust".to_string()]);
        assert_eq!(&*caps(&s, c), ["git".to_string()]);

        let bytes = crate::codec::encode(&s).unwrap();
        let mut d: State = crate::codec::decode_state(&bytes).unwrap();
        assert!(!Arc::ptr_eq(&caps(&d, a), &caps(&d, b)));
        d.decoded();
        assert!(Arc::ptr_eq(&caps(&d, a), &caps(&d, b)));
        assert_eq!(d, s);
    }

    #[test]
    fn capability_sets_no_task_holds_are_swept_once_the_table_doubles() {
        let mut sets = CapSets::default();
        let set = |i: usize| vec![format!("c{i}")];
        let kept: Vec<_> = (0..10).map(|i| sets.get(&set(i))).collect();
        for i in 10..CapSets::MIN_SWEEP {
            drop(sets.get(&set(i)));
        }
        assert_eq!(sets.sets.len(), CapSets::MIN_SWEEP);
        // The next new set sweeps the ones nobody holds.
        let new = sets.get(&set(5000));
        assert_eq!(sets.sets.len(), kept.len() + 1);
        assert!(Arc::ptr_eq(&sets.get(&set(3)), &kept[3]));
        assert!(Arc::ptr_eq(&sets.get(&set(5000)), &new));
        // Not again until it has doubled.
        for i in 0..5 {
            drop(sets.get(&set(6000 + i)));
        }
        assert_eq!(sets.sets.len(), kept.len() + 1 + 5);
    }
}
