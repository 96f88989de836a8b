//! The QueueShard actor: it matches ready tasks to agents with free
//! capacity by proposing dispatch rounds. The matching itself runs in the
//! state machine against the committed state (`fsm::dispatch`), so a round
//! is decided once, identically on every replica, and commits in one Raft
//! entry with the other writes of its batch.
//!
//! The actor runs on every node. With `runtime.dispatch = "push"` it acts
//! only while its node leads, with `Dispatch` rounds for every agent. With
//! `"pull"` every node's actor proposes `Pull` rounds for the agents online
//! on that node (the step toward queue shards in `docs/shards.md`: a
//! node, not a shard leader, decides its own agents' capacity); a round
//! that leased nothing is not tried again until the state has something
//! new (an event) or the fallback timer fires. Either way a round is a
//! Raft write, so a node outside the majority cannot commit one and hands
//! out no lease. It wakes on every applied change (coalesced: at most one
//! wake-up waits) and on a timer, and keeps one round in flight.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::DispatchMode;
use crate::fsm::{
    AgentId, Command, DispatchSpec, FencingToken, GatewayId, LeaseGrant, PullSpec, Reply,
};
use crate::node::Node;
use crate::raft::{GroupId, META_GROUP};

/// Name of the one shard's actor under the queue-shard supervisor.
pub const SHARD: &str = "shard-0";

/// The queue-shard actor.
pub struct QueueShardActor;

/// Messages.
pub enum ShardMsg {
    /// Something changed: dispatch if there is work and room.
    Wake,
}

// Local only: never sent to another node.
impl ractor::Message for ShardMsg {}

/// The actor's state: wake-up plumbing, and what pull rounds remember.
pub struct ShardState {
    node: Node,
    /// Pull: the last idle round, and (with shards) the grants not applied
    /// here yet.
    puller: Puller,
    wake_pending: Arc<AtomicBool>,
    _stop_watcher: DropGuard,
}

impl Actor for QueueShardActor {
    type Msg = ShardMsg;
    type State = ShardState;
    type Arguments = Node;

    async fn pre_start(
        &self,
        myself: ActorRef<ShardMsg>,
        node: Node,
    ) -> Result<ShardState, ActorProcessingErr> {
        let wake_pending = Arc::new(AtomicBool::new(false));
        let stop = CancellationToken::new();
        tokio::spawn(watch(
            node.clone(),
            myself.clone(),
            Arc::clone(&wake_pending),
            stop.clone(),
        ));
        Ok(ShardState {
            node,
            puller: Puller::default(),
            wake_pending,
            _stop_watcher: stop.drop_guard(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<ShardMsg>,
        msg: ShardMsg,
        state: &mut ShardState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ShardMsg::Wake => {
                state.wake_pending.store(false, Ordering::SeqCst);
                let full = match state.node.config().dispatch() {
                    DispatchMode::Push | DispatchMode::Auto => round(&state.node).await,
                    DispatchMode::Pull => pull_round(&state.node, &mut state.puller).await,
                };
                if full {
                    // A full round: there may be more to hand out.
                    wake(&myself, &state.wake_pending);
                }
            }
        }
        Ok(())
    }
}

fn wake(actor: &ActorRef<ShardMsg>, pending: &AtomicBool) {
    if !pending.swap(true, Ordering::SeqCst) {
        let _ = actor.send_message(ShardMsg::Wake);
    }
}

/// Wakes the actor on every applied entry of every group this node hosts
/// (the meta group's registry changes, the shards' work) and on the
/// fallback timer.
async fn watch(
    node: Node,
    actor: ActorRef<ShardMsg>,
    pending: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    for group in node.shard_groups() {
        tokio::spawn(watch_group(
            node.clone(),
            group.clone(),
            actor.clone(),
            Arc::clone(&pending),
            stop.clone(),
        ));
    }
    let mut applied = node.state().subscribe();
    let pulls = node.config().dispatch() == DispatchMode::Pull;
    // One timer for the whole loop, not one per applied entry.
    let mut fallback = tokio::time::interval(node.config().runtime.interval);
    fallback.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = node.shutdown_token().cancelled() => return,
            r = applied.recv() => {
                if matches!(r, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                    return;
                }
            }
            _ = fallback.tick() => {}
        }
        if pulls || node.is_leader() {
            wake(&actor, &pending);
        }
    }
}

/// Wakes the actor on every applied entry of one queue shard.
async fn watch_group(
    node: Node,
    group: crate::node::Group,
    actor: ActorRef<ShardMsg>,
    pending: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let mut applied = group.state().subscribe();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = node.shutdown_token().cancelled() => return,
            r = applied.recv() => {
                if matches!(r, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                    return;
                }
            }
        }
        wake(&actor, &pending);
    }
}

/// A dispatch round as this node's config describes it.
pub fn dispatch_spec(node: &Node) -> DispatchSpec {
    let cfg = &node.config().runtime;
    DispatchSpec {
        lease_ms: node.queue_config().default_lease.as_millis() as u64,
        max: cfg.max_per_round,
        policy: cfg.policy,
        node_dead_after_ms: node.queue_config().node_dead_after.as_millis() as u64,
        session_limit_ms: cfg.session_time_limit.as_millis() as u64,
        session_idle_ms: cfg.session_idle.as_millis() as u64,
        session_checkpoint_every: cfg.session_checkpoint_every,
    }
}

/// One dispatch round if this node leads and the state has work an agent
/// can take. Returns whether the round was full.
async fn round(node: &Node) -> bool {
    if !node.is_leader() {
        return false;
    }
    let spec = dispatch_spec(node);
    if !node
        .state()
        .read(|s| s.dispatch_would_lease(spec.node_dead_after_ms))
    {
        return false;
    }
    let max = spec.max as usize;
    propose(node, META_GROUP, Command::Dispatch(spec), "dispatch")
        .await
        .is_some_and(|granted| granted.len() >= max)
}

/// Proposes a round to `group` and counts it; returns the leases it
/// granted, or `None` when it was refused or not committed.
async fn propose(
    node: &Node,
    group: GroupId,
    round: Command,
    what: &str,
) -> Option<Vec<LeaseGrant>> {
    let m = crate::metrics::global();
    match node.write_to(group, round).await {
        Ok(Ok(Reply::Dispatched(grants))) => {
            m.dispatch_rounds.with_label_values(&["committed"]).inc();
            m.dispatch_leases.inc_by(grants.len() as u64);
            Some(grants)
        }
        Ok(other) => {
            m.dispatch_rounds.with_label_values(&["refused"]).inc();
            tracing::warn!(outcome = ?other.err(), "{what} round refused");
            None
        }
        Err(e) => {
            m.dispatch_rounds
                .with_label_values(&["not_committed"])
                .inc();
            tracing::debug!(error = %e, "{what} round not committed");
            None
        }
    }
}

/// One pull round for the agents online on this node, if any of them has
/// room and a ready task it could run, and the state changed since the
/// last round that leased nothing (or the fallback period passed). Returns
/// whether the round was full.
async fn pull_round(node: &Node, p: &mut Puller) -> bool {
    if !node.shard_groups().is_empty() {
        return pull_from_shards(node, p).await;
    }
    let idle = &mut p.idle;
    let spec = dispatch_spec(node);
    let (seq, slots) = node.state().read(|s| {
        let slots = s.pull_slots(node.id(), spec.node_dead_after_ms);
        (vec![s.last_event_seq()], slots)
    });
    if slots.is_empty() {
        return false;
    }
    if idle_since(idle, &seq, node) {
        return false;
    }
    let max = spec.max as usize;
    let pull = PullSpec {
        round: spec,
        node: node.id(),
        slots,
    };
    match propose(node, META_GROUP, Command::Pull(pull), "pull").await {
        Some(granted) => {
            let granted = granted.len();
            *idle = (granted == 0).then(|| (seq, std::time::Instant::now()));
            granted >= max
        }
        None => false,
    }
}

/// Whether the last round leased nothing, nothing happened since (`seq`:
/// the groups' event counts) and the fallback period has not passed.
fn idle_since(idle: &Option<(Vec<u64>, std::time::Instant)>, seq: &[u64], node: &Node) -> bool {
    idle.as_ref().is_some_and(|(at_seq, at)| {
        at_seq.as_slice() == seq && at.elapsed() < node.config().runtime.interval
    })
}

/// What the sharded puller keeps between rounds.
#[derive(Default)]
pub struct Puller {
    /// The groups' event counts and time of the last round that leased
    /// nothing.
    idle: Option<(Vec<u64>, std::time::Instant)>,
    /// Leases this node's pulls were granted that its replica of the shard
    /// (index into the shard groups) may not have applied yet: counted
    /// against the agent's capacity until the replica has minted the token.
    ledger: Vec<(usize, AgentId, FencingToken)>,
}

/// One pull round over the queue shards (`docs/shards.md`, "Dispatch
/// across shards"): this node's agents that may take work, with their
/// profiles from the meta group's replica; each agent's free count and
/// each gateway's session room taken over every shard's replica plus the
/// grants of this node's pulls a replica has not applied yet (the node is
/// the only one that leases to its agents, so its count is exact); each
/// agent named in the pull to one shard holding the most urgent ready
/// task it could take, with that priority as its floor
/// ([`crate::fsm::plan_from`]); the pulls go to their shards at once.
///
/// The plan is made twice. First on the replicas as they are: when it
/// pulls nothing, the round ends there (a replica that has not applied a
/// change yet wakes the puller again when it does). Then after a read
/// barrier on every shard at once, each bounded by the election timeout
/// (a shard without a leader is left out of the round, so it does not stop
/// dispatch in the others: its tasks wait for it), so the floors are from
/// linearizable reads. Without the first plan every applied entry cost
/// each node a barrier per shard (a heartbeat round of each shard leader),
/// even with every agent busy. Returns whether it leased anything.
async fn pull_from_shards(node: &Node, p: &mut Puller) -> bool {
    let spec = dispatch_spec(node);
    let (profiles, agents_of) = node.state().read(|s| {
        let mut slots = s.pull_profiles(node.id(), spec.node_dead_after_ms);
        // An agent whose own breaker opened here takes nothing, even
        // before the registry has heard (its leases would go back unrun).
        let directory = node.agent_directory();
        slots.retain(|slot| !directory.breaker_open(&slot.agent));
        let reg = s.registry();
        let mut agents_of: BTreeMap<GatewayId, Vec<AgentId>> = BTreeMap::new();
        for slot in &slots {
            let gw = &slot
                .profile
                .as_ref()
                .expect("pull_profiles gives one")
                .gateway;
            agents_of.entry(gw.clone()).or_insert_with(|| {
                reg.agents()
                    .filter(|a| a.reg.gateway == *gw)
                    .map(|a| a.reg.id.clone())
                    .collect()
            });
        }
        (slots, agents_of)
    });
    if profiles.is_empty() {
        return false;
    }
    // The shards routed to: one being added holds no task yet, and its
    // group may have no leader to answer a barrier.
    let groups = node.queue_groups();
    let every = vec![true; groups.len()];
    let (seq, plans) = plan_round(node, p, groups, &profiles, &agents_of, &every);
    if plans.is_empty() {
        if !seq.is_empty() {
            p.idle = Some((seq, std::time::Instant::now()));
        }
        return false;
    }
    let bound = node.config().raft.election_timeout_max;
    let barriers = groups
        .iter()
        .map(|g| tokio::time::timeout(bound, node.read_barrier_in(g)));
    let readable: Vec<bool> = futures_util::future::join_all(barriers)
        .await
        .into_iter()
        .map(|r| matches!(r, Ok(Ok(()))))
        .collect();
    if !readable.iter().any(|r| *r) {
        tracing::debug!("pull: no shard readable now");
        return false;
    }
    let (seq, plans) = plan_round(node, p, groups, &profiles, &agents_of, &readable);
    if plans.is_empty() {
        if !seq.is_empty() {
            p.idle = Some((seq, std::time::Instant::now()));
        }
        return false;
    }
    let pulls = plans.into_iter().map(|plan| {
        let pull = PullSpec {
            round: spec.clone(),
            node: node.id(),
            slots: plan.slots,
        };
        let group = groups[plan.shard].id();
        async move {
            let grants = propose(node, group, Command::Pull(pull), "pull").await;
            (plan.shard, grants)
        }
    });
    let mut leased = false;
    for (shard, grants) in futures_util::future::join_all(pulls).await {
        for g in grants.iter().flatten() {
            if let Some(l) = &g.task.lease {
                p.ledger.push((shard, l.agent_id.clone(), g.token));
                leased = true;
            }
        }
    }
    p.idle = (!leased).then(|| (seq, std::time::Instant::now()));
    leased
}

/// The pulls for `profiles` (this node's agents) on the replicas of
/// `groups` (the shards routed to) as they are now (the shards not
/// `readable` left out), and the groups'
/// event counts they were made at: empty counts when the round should not
/// be recorded as idle (no agent has room, or the last idle round saw the
/// same counts within the fallback period: nothing to plan either way).
fn plan_round(
    node: &Node,
    p: &mut Puller,
    groups: &[crate::node::Group],
    profiles: &[crate::fsm::PullSlot],
    agents_of: &BTreeMap<GatewayId, Vec<AgentId>>,
    readable: &[bool],
) -> (Vec<u64>, Vec<crate::fsm::PullPlan>) {
    let mut slots = profiles.to_vec();
    let mut seq = vec![node.state().read(|s| s.last_event_seq())];
    let mut sessions: BTreeMap<&GatewayId, u32> = BTreeMap::new();
    let mut loads: BTreeMap<AgentId, u32> = BTreeMap::new();
    for (i, g) in groups.iter().enumerate() {
        g.state().read(|s| {
            seq.push(s.last_event_seq());
            // Grants the replica has minted are in its counts now.
            p.ledger
                .retain(|(at, _, token)| *at != i || s.last_token() < token.0);
            for (gw, agents) in agents_of {
                *sessions.entry(gw).or_default() += s.session_load(gw, agents);
            }
            for slot in &slots {
                *loads.entry(slot.agent.clone()).or_default() += s.agent_load(&slot.agent);
            }
        });
    }
    for (_, agent, _) in &p.ledger {
        if let Some(n) = loads.get_mut(agent) {
            *n += 1;
        }
    }
    for slot in &mut slots {
        let profile = slot.profile.as_mut().expect("pull_profiles gives one");
        slot.free = profile.capacity.saturating_sub(loads[&slot.agent]);
        profile.session_room = crate::fsm::new_session_room(
            sessions.get(&profile.gateway).copied().unwrap_or(0),
            profile.session_room,
        );
    }
    slots.retain(|s| s.free > 0);
    if slots.is_empty() || idle_since(&p.idle, &seq, node) {
        return (Vec::new(), Vec::new());
    }
    let best: Vec<_> = groups
        .iter()
        .zip(readable)
        .map(|(g, ok)| match ok {
            true => g.state().read(|s| crate::fsm::best_of(s, &slots)),
            false => vec![None; slots.len()],
        })
        .collect();
    let plans = crate::fsm::plan_from(&best, &slots);
    (seq, plans)
}
