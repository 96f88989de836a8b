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

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::DispatchMode;
use crate::fsm::{Command, DispatchSpec, PullSpec, Reply};
use crate::node::Node;

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

/// The actor's state: wake-up plumbing only.
pub struct ShardState {
    node: Node,
    /// Pull: the event seq and time of the last round that leased nothing.
    idle: Option<(u64, std::time::Instant)>,
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
            idle: None,
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
                let full = match state.node.config().runtime.dispatch {
                    DispatchMode::Push => round(&state.node).await,
                    DispatchMode::Pull => pull_round(&state.node, &mut state.idle).await,
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

/// Wakes the actor on every applied entry and on the fallback timer.
async fn watch(
    node: Node,
    actor: ActorRef<ShardMsg>,
    pending: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let mut applied = node.state().subscribe();
    let pulls = node.config().runtime.dispatch == DispatchMode::Pull;
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
    propose(node, Command::Dispatch(spec), "dispatch")
        .await
        .is_some_and(|granted| granted >= max)
}

/// Proposes a round and counts it; returns how many leases it granted, or
/// `None` when it was refused or not committed.
async fn propose(node: &Node, round: Command, what: &str) -> Option<usize> {
    let m = crate::metrics::global();
    match node.write(round).await {
        Ok(Ok(Reply::Dispatched(grants))) => {
            m.dispatch_rounds.with_label_values(&["committed"]).inc();
            m.dispatch_leases.inc_by(grants.len() as u64);
            Some(grants.len())
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
async fn pull_round(node: &Node, idle: &mut Option<(u64, std::time::Instant)>) -> bool {
    let spec = dispatch_spec(node);
    let (seq, slots) = node.state().read(|s| {
        let slots = s.pull_slots(node.id(), spec.node_dead_after_ms);
        (s.last_event_seq(), slots)
    });
    if slots.is_empty() {
        return false;
    }
    if let Some((at_seq, at)) = *idle
        && at_seq == seq
        && at.elapsed() < node.config().runtime.interval
    {
        return false;
    }
    let max = spec.max as usize;
    let pull = PullSpec {
        round: spec,
        node: node.id(),
        slots,
    };
    match propose(node, Command::Pull(pull), "pull").await {
        Some(granted) => {
            *idle = (granted == 0).then(|| (seq, std::time::Instant::now()));
            granted >= max
        }
        None => false,
    }
}
