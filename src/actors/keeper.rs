//! The queue-shard keeper: one actor per queue shard, under the
//! queue-shard supervisor of the node that leads the shard's Raft group.
//! The runtime reconciler starts it when this node takes the group's
//! leadership and stops it when the node loses it, so it moves with the
//! leadership (within one reconcile interval); a crash restarts it under
//! the supervisor's policy.
//!
//! It keeps the shard's timers: whenever a state-machine timer is due
//! (a lease or attempt deadline, a retry's backoff, a scheduled task, a
//! session's limits) it proposes a `Tick` to the shard, as the meta group's
//! tick loop does for the meta group. Dispatch across shards is the
//! node's (`actors/shard.rs`: each node pulls for its own agents), so the
//! keeper holds no queue of its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::supervisor::SupervisorRef;
use crate::node::{Group, Node};
use crate::raft::GroupId;

/// The keeper's name for shard `group` under the queue-shard supervisor.
pub fn keeper_name(group: GroupId) -> String {
    format!("keeper-{group}")
}

/// The shard a keeper's name is for.
fn keeper_of(name: &str) -> Option<GroupId> {
    name.strip_prefix("keeper-")?.parse().ok()
}

/// The shards whose keepers run under `root`'s queue-shard supervisor.
pub async fn keepers_under(root: &SupervisorRef) -> Vec<GroupId> {
    let Ok(Some(cell)) = root.child(super::QUEUE_SHARDS).await else {
        return Vec::new();
    };
    let shards = SupervisorRef::from_cell(super::QUEUE_SHARDS, cell);
    let mut out: Vec<GroupId> = shards
        .children()
        .await
        .unwrap_or_default()
        .iter()
        .filter_map(|n| keeper_of(n))
        .collect();
    out.sort_unstable();
    out
}

/// The keeper actor.
pub struct ShardKeeper;

/// Messages.
pub enum KeeperMsg {
    /// Look at the shard's timers.
    Tick,
}

// Local only: never sent to another node.
impl ractor::Message for KeeperMsg {}

/// The keeper's state.
pub struct KeeperState {
    node: Node,
    group: Group,
    /// Set while a timer tick waits in the mailbox.
    queued: Arc<AtomicBool>,
    _timer: DropGuard,
}

impl Actor for ShardKeeper {
    type Msg = KeeperMsg;
    type State = KeeperState;
    type Arguments = (Node, GroupId);

    async fn pre_start(
        &self,
        myself: ActorRef<KeeperMsg>,
        (node, id): (Node, GroupId),
    ) -> Result<KeeperState, ActorProcessingErr> {
        let group = node
            .group(id)
            .cloned()
            .ok_or_else(|| format!("this node hosts no queue shard {id}"))?;
        let stop = CancellationToken::new();
        let every = node.queue_config().tick_interval;
        let cancelled = stop.clone();
        // One tick waits in the mailbox at most: while a tick's write is
        // blocked (no quorum, say), the timer does not queue more behind it.
        let queued = Arc::new(AtomicBool::new(false));
        let queued_by_timer = Arc::clone(&queued);
        tokio::spawn(async move {
            let mut timer = tokio::time::interval(every);
            timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancelled.cancelled() => break,
                    _ = timer.tick() => {}
                }
                if queued_by_timer.swap(true, Ordering::AcqRel) {
                    continue;
                }
                if myself.send_message(KeeperMsg::Tick).is_err() {
                    break;
                }
            }
        });
        tracing::info!(
            group = id,
            "queue-shard keeper started on the shard's leader"
        );
        Ok(KeeperState {
            node,
            group,
            queued,
            _timer: stop.drop_guard(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<KeeperMsg>,
        msg: KeeperMsg,
        state: &mut KeeperState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            KeeperMsg::Tick => {
                state.queued.store(false, Ordering::Release);
                // A tick that did not commit is tried at the next one.
                state.node.tick_if_due(&state.group).await;
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<KeeperMsg>,
        state: &mut KeeperState,
    ) -> Result<(), ActorProcessingErr> {
        tracing::info!(group = state.group.id(), "queue-shard keeper stopped");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{keeper_name, keeper_of};

    #[test]
    fn a_keepers_name_names_its_shard() {
        for g in [1, 7, 64] {
            assert_eq!(keeper_of(&keeper_name(g)), Some(g));
        }
        assert_eq!(keeper_of("shard-0"), None);
        assert_eq!(keeper_of("keeper-x"), None);
    }
}
