//! The state machine: `fsm::State` in memory, snapshots in sled, applied
//! events to local observers.

use std::collections::BTreeSet;
use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, LogId, RaftSnapshotBuilder, StorageError,
    StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::db::{Db, Entry, Meta, Replace};
use super::{Result, StoreError};
use crate::codec;
use crate::fsm::{self, NodeChange};
use crate::raft::{NodeId, NodeInfo, TypeConfig};

/// Applied entries buffered per observer before the slowest one starts
/// losing the oldest (it then gets `RecvError::Lagged` and should reconcile
/// from [`SharedState`]).
pub const EVENT_CHANNEL_CAPACITY: usize = 4096;

/// What applying one log entry, or installing a snapshot, did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedEvents {
    /// The log index applied (for a snapshot: the last index it covers).
    pub index: u64,
    /// The events the entry emitted, in order; empty for a snapshot.
    pub events: Vec<fsm::Event>,
    /// The state's clock after the entry (ms since the epoch): when the
    /// events happened.
    pub time_ms: u64,
    /// The last event seq handed out after this entry or snapshot.
    pub last_seq: u64,
    /// True when the whole state was replaced by a snapshot from the leader:
    /// observers caching state should re-read it from [`SharedState`].
    pub snapshot_installed: bool,
}

/// Everything the state machine holds, and exactly what a snapshot stores.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(super) struct Applied {
    pub(super) last_applied: Option<LogId<NodeId>>,
    pub(super) last_membership: StoredMembership<NodeId, NodeInfo>,
    pub(super) state: fsm::State,
}

/// A cheap, clonable read handle on the applied state, for the HTTP API and
/// actors. Reads take a std `RwLock` briefly: never hold one across `.await`.
#[derive(Clone, Debug)]
pub struct SharedState {
    applied: Arc<RwLock<Applied>>,
    events: broadcast::Sender<Arc<AppliedEvents>>,
    /// `fsm::Auth::version` of the applied state, readable without the
    /// lock: the API's credential cache compares it on every request.
    auth_version: Arc<AtomicU64>,
}

impl SharedState {
    /// Runs `f` on the current state under the read lock.
    pub fn read<T>(&self, f: impl FnOnce(&fsm::State) -> T) -> T {
        f(&self.read_guard().state)
    }

    /// Runs `f` on the current state and the index of the last entry it
    /// reflects (0 before the first), read together under the read lock.
    pub fn read_indexed<T>(&self, f: impl FnOnce(u64, &fsm::State) -> T) -> T {
        let g = self.read_guard();
        f(g.last_applied.map_or(0, |l| l.index), &g.state)
    }

    /// The last applied log id: the state read now reflects at least this.
    pub fn last_applied(&self) -> Option<LogId<NodeId>> {
        self.read_guard().last_applied
    }

    /// The applied state's credential version (see `fsm::Auth::version`):
    /// a change means a key, tenant or revoked JWT id changed.
    pub fn auth_version(&self) -> u64 {
        self.auth_version.load(Ordering::Acquire)
    }

    fn note_auth_version(&self, applied: &Applied) {
        self.auth_version
            .store(applied.state.auth().version(), Ordering::Release);
    }

    /// Subscribes to applied events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<AppliedEvents>> {
        self.events.subscribe()
    }

    pub(super) fn read_guard(&self) -> RwLockReadGuard<'_, Applied> {
        // Poisoned means an apply panicked mid-entry (an fsm bug): openraft's
        // state-machine worker died with it and the node stops applying.
        // Readers still get the last state rather than a panic of their own.
        self.applied.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_guard(&self) -> Result<RwLockWriteGuard<'_, Applied>> {
        self.applied.write().map_err(|_| StoreError::Poisoned)
    }

    fn publish(&self, applied: AppliedEvents) {
        // An error only means nobody listens right now; never block or fail.
        let _ = self.events.send(Arc::new(applied));
    }
}

/// The state machine openraft drives: `fsm::State` in memory, snapshots in
/// the node's sled database.
#[derive(Debug)]
pub struct StateMachine {
    pub(super) db: Db,
    shared: SharedState,
    /// The last snapshot's size in bytes: the next one's buffer starts a
    /// little past it rather than doubling its way up.
    snapshot_bytes: Arc<AtomicU64>,
}

/// Restores the state machine's contents from the stored snapshot, or an
/// empty state if there is none. Blocking.
pub(super) fn restore(db: &Db) -> Result<Applied> {
    match db.snapshot()? {
        Some((meta, data)) => decode_payload(&meta, &data),
        None => Ok(Applied::default()),
    }
}

/// Decodes a snapshot payload and checks it against its metadata.
fn decode_payload(meta: &Meta, data: &[u8]) -> Result<Applied> {
    let mut applied: Applied = codec::decode_state(data).map_err(|source| StoreError::Corrupt {
        what: format!("snapshot {}", meta.snapshot_id),
        source,
    })?;
    applied.state.recount_session_tasks();
    if applied.last_applied != meta.last_log_id || applied.last_membership != meta.last_membership {
        return Err(StoreError::Inconsistent(format!(
            "snapshot {} payload is at {:?}, its meta says {:?}",
            meta.snapshot_id, applied.last_applied, meta.last_log_id
        )));
    }
    Ok(applied)
}

/// Runs blocking storage work (snapshot-sized encoding and copies) off the
/// async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await?
}

fn snapshot_err(
    meta: Option<&Meta>,
    verb: ErrorVerb,
) -> impl FnOnce(StoreError) -> StorageError<NodeId> {
    let subject = ErrorSubject::Snapshot(meta.map(Meta::signature));
    move |e| e.into_storage(subject, verb)
}

impl StateMachine {
    pub(super) fn new(db: Db, applied: Applied) -> Self {
        let (events, _) = broadcast::channel(EVENT_CHANNEL_CAPACITY);
        let auth_version = Arc::new(AtomicU64::new(applied.state.auth().version()));
        let shared = SharedState {
            applied: Arc::new(RwLock::new(applied)),
            events,
            auth_version,
        };
        Self {
            db,
            shared,
            snapshot_bytes: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A read handle on the applied state (clone it freely).
    pub fn shared(&self) -> SharedState {
        self.shared.clone()
    }

    /// Subscribes to applied events from now on; same as
    /// `self.shared().subscribe()`.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<AppliedEvents>> {
        self.shared.subscribe()
    }
}

/// Applies one entry to `applied`; returns the response and the events to
/// publish, if any.
pub(super) fn apply_entry(
    applied: &mut Applied,
    entry: Entry,
) -> Result<(fsm::Response, Option<AppliedEvents>)> {
    let log_id = entry.log_id;
    if applied
        .last_applied
        .is_some_and(|last| log_id.index <= last.index)
    {
        return Err(StoreError::Inconsistent(format!(
            "apply {log_id} at or below the last applied {:?}",
            applied.last_applied
        )));
    }
    applied.last_applied = Some(log_id);
    let (response, events) = match entry.payload {
        // A new leader's first entry.
        EntryPayload::Blank => {
            let change = NodeChange::LeaderChanged {
                term: log_id.leader_id.term,
            };
            let events = applied
                .state
                .raft_events(vec![(log_id.leader_id.node_id, change)]);
            (fsm::Response::default(), events)
        }
        EntryPayload::Membership(membership) => {
            let changes = membership_changes(applied.last_membership.membership(), &membership);
            applied.last_membership = StoredMembership::new(Some(log_id), membership);
            (fsm::Response::default(), applied.state.raft_events(changes))
        }
        EntryPayload::Normal(request) => applied.state.apply(&request),
    };
    let published = (!events.is_empty()).then(|| AppliedEvents {
        index: log_id.index,
        events,
        time_ms: applied.state.clock_ms(),
        last_seq: applied.state.last_event_seq(),
        snapshot_installed: false,
    });
    Ok((response, published))
}

/// The nodes that joined (as voters or learners, or became voters) and
/// left between two memberships, by id.
pub fn membership_changes(
    before: &openraft::Membership<NodeId, NodeInfo>,
    after: &openraft::Membership<NodeId, NodeInfo>,
) -> Vec<(NodeId, NodeChange)> {
    let voters = |m: &openraft::Membership<NodeId, NodeInfo>| -> BTreeSet<NodeId> {
        m.voter_ids().collect()
    };
    let members = |m: &openraft::Membership<NodeId, NodeInfo>| -> BTreeSet<NodeId> {
        m.nodes().map(|(id, _)| *id).collect()
    };
    let (voters_before, voters_after) = (voters(before), voters(after));
    let (members_before, members_after) = (members(before), members(after));
    let mut changes = Vec::new();
    for id in &members_after {
        let voter = voters_after.contains(id);
        if !members_before.contains(id) || (voter && !voters_before.contains(id)) {
            changes.push((*id, NodeChange::Joined { voter }));
        }
    }
    for id in members_before.difference(&members_after) {
        changes.push((*id, NodeChange::Left));
    }
    changes
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, NodeInfo>), StorageError<NodeId>>
    {
        let applied = self.shared.read_guard();
        Ok((applied.last_applied, applied.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<fsm::Response>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let mut responses = Vec::new();
        let mut published = Vec::new();
        {
            let mut applied = self
                .shared
                .write_guard()
                .map_err(|e| e.into_storage(ErrorSubject::StateMachine, ErrorVerb::Write))?;
            for entry in entries {
                let log_id = entry.log_id;
                let (response, events) = apply_entry(&mut applied, entry)
                    .map_err(|e| e.into_storage(ErrorSubject::Apply(log_id), ErrorVerb::Write))?;
                responses.push(response);
                published.extend(events);
            }
            self.shared.note_auth_version(&applied);
        }
        // After the lock is released, so an observer reading the state sees
        // at least what its events describe.
        for events in published {
            self.shared.publish(events);
        }
        Ok(responses)
    }

    /// Captures a consistent copy of the state. Runs on the state-machine
    /// worker, so no apply is in progress.
    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            db: self.db.clone(),
            view: Arc::new(self.shared.read_guard().clone()),
            last_bytes: Arc::clone(&self.snapshot_bytes),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    /// Decodes and checks the snapshot, stores it and flushes, and only then
    /// swaps the in-memory state: readers never see state that is not yet
    /// durable here.
    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let (db, owned_meta) = (self.db.clone(), meta.clone());
        let applied = blocking(move || {
            let applied = decode_payload(&owned_meta, &data)?;
            db.set_snapshot(&owned_meta, &data, Replace::Always)?;
            Ok(applied)
        })
        .await
        .map_err(snapshot_err(Some(meta), ErrorVerb::Write))?;
        self.db
            .flush()
            .await
            .map_err(snapshot_err(Some(meta), ErrorVerb::Write))?;
        let index = applied.last_applied.map_or(0, |l| l.index);
        let (time_ms, last_seq) = (applied.state.clock_ms(), applied.state.last_event_seq());
        {
            let mut guard = self
                .shared
                .write_guard()
                .map_err(snapshot_err(Some(meta), ErrorVerb::Write))?;
            *guard = applied;
            self.shared.note_auth_version(&guard);
        }
        self.shared.publish(AppliedEvents {
            index,
            events: Vec::new(),
            time_ms,
            last_seq,
            snapshot_installed: true,
        });
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let db = self.db.clone();
        let stored = blocking(move || db.snapshot())
            .await
            .map_err(snapshot_err(None, ErrorVerb::Read))?;
        Ok(stored.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

/// Builds a snapshot from the view captured by `get_snapshot_builder`; runs
/// concurrently with `apply`.
#[derive(Debug)]
pub struct SnapshotBuilder {
    db: Db,
    view: Arc<Applied>,
    /// [`StateMachine::snapshot_bytes`].
    last_bytes: Arc<AtomicU64>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    /// Encodes the view, stores it (unless a newer snapshot was installed
    /// meanwhile) and flushes before returning: openraft purges the log
    /// entries the snapshot covers as soon as it has it.
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let meta = Meta {
            last_log_id: self.view.last_applied,
            last_membership: self.view.last_membership.clone(),
            snapshot_id: snapshot_id(self.view.last_applied),
        };
        let (db, view, owned_meta) = (self.db.clone(), Arc::clone(&self.view), meta.clone());
        let last = self.last_bytes.load(Ordering::Relaxed) as usize;
        let data = blocking(move || {
            // A state grows or shrinks little between snapshots: start a
            // sixteenth past the last one's size (a first one, or one that
            // outgrows that, doubles as any buffer does).
            let data = codec::encode_with_capacity(&*view, last.saturating_add(last / 16))
                .map_err(|source| StoreError::Encode {
                    what: format!("snapshot {}", owned_meta.snapshot_id),
                    source,
                })?;
            db.set_snapshot(&owned_meta, &data, Replace::IfNotOlder)?;
            Ok(data)
        })
        .await
        .map_err(snapshot_err(Some(&meta), ErrorVerb::Write))?;
        self.db
            .flush()
            .await
            .map_err(snapshot_err(Some(&meta), ErrorVerb::Write))?;
        self.last_bytes.store(data.len() as u64, Ordering::Relaxed);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

/// Snapshots are a function of the log, so the last log id they cover names
/// them: two builds at the same id hold the same bytes.
fn snapshot_id(last: Option<LogId<NodeId>>) -> String {
    match last {
        Some(l) => l.to_string(),
        None => "empty".to_owned(),
    }
}
