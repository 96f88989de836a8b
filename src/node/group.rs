//! One Raft group as a node hosts it: its openraft instance, its replica of
//! the state machine and its write queue. The meta group and every queue
//! shard are each one of these (`docs/shards.md`); the node's write path
//! (`proposer.rs`), reads and RPC server take the group they act on.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::ServerState;

use super::proposer;
use crate::raft::{GroupId, NodeId, NodeInfo, Raft};
use crate::store::SharedState;

/// A Raft group hosted on this node. Cheap to clone.
#[derive(Clone)]
pub struct Group {
    inner: Arc<Inner>,
}

struct Inner {
    id: GroupId,
    me: NodeId,
    raft: Raft,
    state: SharedState,
    queue: proposer::Queue,
    /// When this replica last took a message from a leader of the group:
    /// ms after `born`, plus one (0: never).
    leader_contact: AtomicU64,
    /// The dead leader a lease-timed election is pending for, so the
    /// several connections a dead process drops start one, not several.
    electing: Mutex<Option<NodeId>>,
    born: Instant,
}

impl Group {
    /// Wraps a started Raft; the receiver of `queue` must be handed to
    /// [`proposer::run`] for writes to go anywhere.
    pub(super) fn new(
        id: GroupId,
        me: NodeId,
        raft: Raft,
        state: SharedState,
        queue: proposer::Queue,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                id,
                me,
                raft,
                state,
                queue,
                leader_contact: AtomicU64::new(0),
                electing: Mutex::new(None),
                born: Instant::now(),
            }),
        }
    }

    /// The group's id.
    pub fn id(&self) -> GroupId {
        self.inner.id
    }

    /// This node's Raft instance of the group.
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// This node's replica of the group's state machine.
    pub fn state(&self) -> &SharedState {
        &self.inner.state
    }

    pub(super) fn queue(&self) -> &proposer::Queue {
        &self.inner.queue
    }

    /// Records that a leader of the group reached this replica now (an
    /// append or snapshot it accepted as coming from a current leader).
    pub(super) fn saw_leader(&self) {
        let ms = self.inner.born.elapsed().as_millis() as u64 + 1;
        self.inner.leader_contact.fetch_max(ms, Ordering::Relaxed);
    }

    /// Whether a leader of the group reached this replica within `d`.
    pub(super) fn heard_from_leader_within(&self, d: Duration) -> bool {
        self.since_leader_contact().is_some_and(|since| since <= d)
    }

    /// How long ago a leader of the group last reached this replica (`None`:
    /// never), to the millisecond.
    pub(super) fn since_leader_contact(&self) -> Option<Duration> {
        match self.inner.leader_contact.load(Ordering::Relaxed) {
            0 => None,
            at => {
                let now = self.inner.born.elapsed().as_millis() as u64 + 1;
                Some(Duration::from_millis(now.saturating_sub(at)))
            }
        }
    }

    /// Claims the group's lease-timed election after the death of
    /// `leader`; false when one is already pending for that leader (one for
    /// a leader before it gives way). [`Group::end_electing`] gives it back.
    pub(super) fn start_electing(&self, leader: NodeId) -> bool {
        let mut pending = self
            .inner
            .electing
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        pending.replace(leader) != Some(leader)
    }

    /// Ends the election claimed for `leader`, unless a later one took over.
    pub(super) fn end_electing(&self, leader: NodeId) {
        let mut pending = self
            .inner
            .electing
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if *pending == Some(leader) {
            *pending = None;
        }
    }

    /// The group's leader as this node knows it, with its addresses.
    pub fn leader(&self) -> Option<(NodeId, NodeInfo)> {
        // Borrowed, not cloned: this runs on every write and read.
        let rx = self.inner.raft.metrics();
        let m = rx.borrow();
        let id = m.current_leader?;
        let info = m
            .membership_config
            .membership()
            .get_node(&id)
            .cloned()
            .unwrap_or_default();
        Some((id, info))
    }

    /// Whether this node believes it leads the group.
    pub fn is_leader(&self) -> bool {
        let rx = self.inner.raft.metrics();
        let m = rx.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.inner.me)
    }

    /// The group's membership: voters, and every member with its addresses.
    pub fn members(&self) -> (Vec<NodeId>, BTreeMap<NodeId, NodeInfo>) {
        let rx = self.inner.raft.metrics();
        let m = rx.borrow();
        let membership = m.membership_config.membership();
        let voters = membership.voter_ids().collect();
        let nodes = membership.nodes().map(|(id, n)| (*id, n.clone())).collect();
        (voters, nodes)
    }

    /// How this node sees the group, for `GET /cluster` and the metrics.
    pub fn status(&self) -> GroupStatus {
        let m = self.inner.raft.metrics().borrow().clone();
        GroupStatus {
            group: self.inner.id,
            state: format!("{:?}", m.state).to_lowercase(),
            leader: m.current_leader,
            term: m.current_term,
            voters: m.membership_config.membership().voter_ids().collect(),
            learners: m.membership_config.membership().learner_ids().collect(),
            last_log_index: m.last_log_index,
            applied_index: m.last_applied.map(|l| l.index),
        }
    }
}

/// One Raft group as a node sees it.
#[derive(Clone, Debug, serde::Serialize, utoipa::ToSchema)]
pub struct GroupStatus {
    /// The group: 0 is the meta group, 1 and up the queue shards.
    pub group: GroupId,
    /// This node's role in it: `leader`, `follower`, `candidate` or `learner`.
    pub state: String,
    /// The leader this node knows of.
    #[schema(value_type = Option<u64>)]
    pub leader: Option<NodeId>,
    /// The group's term as this node knows it.
    pub term: u64,
    /// The group's voters.
    #[schema(value_type = Vec<u64>)]
    pub voters: Vec<NodeId>,
    /// Its learners (catching up before they become voters).
    #[schema(value_type = Vec<u64>)]
    pub learners: Vec<NodeId>,
    /// The last index of this node's log of the group.
    pub last_log_index: Option<u64>,
    /// The last index this node's replica applied.
    pub applied_index: Option<u64>,
}
