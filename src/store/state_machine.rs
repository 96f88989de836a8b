//! The state machine: `fsm::State` in memory, task payloads and snapshots
//! in the store (`payloads.rs`), applied events to local observers.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use tokio::io::AsyncWriteExt;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, LogId, RaftSnapshotBuilder, StorageError,
    StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::db::{Db, Entry, Meta, Replace};
use super::payloads;
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
    /// Commands applied since the state the last snapshot captured (built
    /// or installed; since the start, for a restored one): what a restart
    /// would replay, read by the node's snapshot trigger.
    since_snapshot: Arc<AtomicU64>,
    /// Where the stored task payloads are, while the state machine lives:
    /// a read handle must not keep the store open (and locked) after it.
    db: std::sync::Weak<Db>,
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

    /// Task `task`'s payload (JSON object text), read from the store
    /// unless the state holds it. Blocking (a sled read: microseconds).
    pub fn payload(&self, task: &fsm::Task) -> Result<Arc<str>> {
        if let Some(text) = task.payload.held() {
            return Ok(Arc::from(text));
        }
        match self.store()?.payload(task.id.0)? {
            Some(text) => Ok(Arc::from(text)),
            None => Err(StoreError::Inconsistent(format!(
                "task {}'s payload is stored but not in the store",
                task.id
            ))),
        }
    }

    /// Gives every task the replies carry its payload to hold, read from
    /// the store: a reply then stands on its own wherever it goes (the node
    /// that forwarded the write, or one running the agent a lease went to,
    /// may not have applied the entry yet). For the leader, right after
    /// its entry applied; a payload that cannot be read is logged and the
    /// task left as it is.
    pub fn hold_reply_payloads(&self, outcomes: &mut [fsm::Outcome]) {
        for outcome in outcomes {
            match outcome {
                Ok(fsm::Reply::Submitted { task, .. } | fsm::Reply::Task(task)) => {
                    self.hold_payload(task);
                }
                Ok(fsm::Reply::Leased(grants) | fsm::Reply::Dispatched(grants)) => {
                    for g in grants {
                        self.hold_payload(&mut g.task);
                    }
                }
                _ => {}
            }
        }
    }

    fn hold_payload(&self, task: &mut Arc<fsm::Task>) {
        if task.payload != fsm::Payload::Stored {
            return;
        }
        match self.store().and_then(|db| db.payload(task.id.0)) {
            Ok(Some(text)) => Arc::make_mut(task).payload = fsm::Payload::Held(text),
            Ok(None) => {
                tracing::error!(task = %task.id, "a replied task's payload is not in the store");
            }
            Err(e) => {
                tracing::error!(task = %task.id, error = %e, "a replied task's payload is not readable");
            }
        }
    }

    /// A copy of the state in which every task holds its payload (read from
    /// the store): what a state machine without a store would hold.
    /// Blocking, `O(state)`.
    pub fn state_with_payloads(&self) -> Result<fsm::State> {
        let mut state = self.read_guard().state.clone();
        // Outside the lock: a payload is deleted only once its task is
        // gone from a state no newer than this copy, so none it names is.
        payloads::hold_all(&*self.store()?, &mut state)?;
        Ok(state)
    }

    /// The state machine's store, while it is open.
    pub(super) fn store(&self) -> Result<Arc<Db>> {
        self.db.upgrade().ok_or_else(|| {
            StoreError::Inconsistent("the state machine is closed: its store is gone".into())
        })
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

    /// Commands applied since the state the last snapshot captured (built
    /// or installed here), or since the node started: about what a restart
    /// now would apply again after restoring the snapshot.
    pub fn commands_since_snapshot(&self) -> u64 {
        self.since_snapshot.load(Ordering::Relaxed)
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
    /// The handle read handles reach the store through (weakly).
    _readers: Arc<Db>,
    /// The last entry whose payloads the store holds (see
    /// [`Db::payloads_through`]): applied again after a restart, an entry
    /// up to it has its payloads stored already. Since sled recovers a
    /// prefix of its writes, the mark, written in the same batch as the
    /// payloads of the entries it covers, never runs ahead of them.
    stored_through: u64,
    /// The payload section of the last snapshot built here, for the next
    /// build to copy from; none after a restart, an install, or a build
    /// whose garbage could not be deleted (the next build then reads every
    /// payload from the tree, and finds that garbage again).
    pub(super) last_section: Arc<std::sync::Mutex<Option<payloads::Section>>>,
    shared: SharedState,
}

/// Restores the state machine's contents from the stored snapshot, or an
/// empty state if there is none. Blocking.
pub(super) fn restore(db: &Db) -> Result<Applied> {
    match db.open_snapshot()? {
        Some((meta, file)) => decode_file(&meta, file),
        None => Ok(Applied::default()),
    }
}

/// Decodes the state of a snapshot file as it reads it (never holding it
/// whole) and checks it against its metadata; the task payloads after it
/// are not read (the store that wrote it has them). Blocking.
fn decode_file(meta: &Meta, file: std::fs::File) -> Result<Applied> {
    let mut input = std::io::BufReader::with_capacity(1 << 20, file);
    decode_state(meta, &mut input)
}

fn decode_state(meta: &Meta, input: &mut impl std::io::Read) -> Result<Applied> {
    let corrupt = |source| StoreError::Corrupt {
        what: format!("snapshot {}", meta.snapshot_id),
        source,
    };
    let applied: Applied = codec::decode_state_from_reader(input).map_err(corrupt)?;
    checked(meta, applied)
}

/// Decodes a whole snapshot file from the leader: the state, checked
/// against its metadata, and its task payloads, written to `db`'s tree
/// (not durable until the next flush). Blocking.
fn install_file(meta: &Meta, file: std::fs::File, db: &Db) -> Result<Applied> {
    let corrupt = |source| StoreError::Corrupt {
        what: format!("snapshot {}", meta.snapshot_id),
        source,
    };
    let io = |source| StoreError::Io {
        what: format!("read snapshot {}", meta.snapshot_id),
        source,
    };
    let mut input = std::io::BufReader::with_capacity(1 << 20, file);
    let applied = decode_state(meta, &mut input)?;
    payloads::install_section(&mut input, &applied.state, db)?;
    let mut rest = [0u8; 1];
    if std::io::Read::read(&mut input, &mut rest).map_err(io)? != 0 {
        return Err(corrupt(codec::CodecError::Decode(
            bincode::error::DecodeError::OtherString("trailing bytes after the payloads".into()),
        )));
    }
    Ok(applied)
}

/// Counts a snapshot written (`how`: built or installed) and its size.
fn note_snapshot(how: &str, file: &std::fs::File) {
    let m = crate::metrics::global();
    m.snapshots.with_label_values(&[how]).inc();
    if let Ok(meta) = file.metadata() {
        m.snapshot_bytes.set(meta.len() as i64);
    }
}

/// A decoded snapshot, checked against its metadata, after
/// [`crate::fsm::State::decoded`].
fn checked(meta: &Meta, mut applied: Applied) -> Result<Applied> {
    applied.state.decoded();
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
    /// The state machine over `applied` (restored from `db`'s snapshot),
    /// its task payloads kept in `db` from now on. Blocking.
    pub(super) fn new(db: Db, mut applied: Applied) -> Result<Self> {
        payloads::keep_out(&db, &mut applied)?;
        let (events, _) = broadcast::channel(EVENT_CHANNEL_CAPACITY);
        let auth_version = Arc::new(AtomicU64::new(applied.state.auth().version()));
        let readers = Arc::new(db.clone());
        let stored_through = db.payloads_through()?;
        let shared = SharedState {
            applied: Arc::new(RwLock::new(applied)),
            events,
            auth_version,
            since_snapshot: Arc::new(AtomicU64::new(0)),
            db: Arc::downgrade(&readers),
        };
        Ok(Self {
            db,
            _readers: readers,
            stored_through,
            last_section: Arc::default(),
            shared,
        })
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
            let (mut payloads, mut last, mut commands) = (Vec::new(), 0, 0);
            for entry in entries {
                let log_id = entry.log_id;
                if let EntryPayload::Normal(fsm::Request::Batch(batch)) = &entry.payload {
                    commands += batch.commands.len() as u64;
                }
                let (response, events) = apply_entry(&mut applied, entry)
                    .map_err(|e| e.into_storage(ErrorSubject::Apply(log_id), ErrorVerb::Write))?;
                responses.push(response);
                published.extend(events);
                let taken = payloads::take(&mut applied.state);
                // Applied again after a restart: stored the first time.
                if log_id.index > self.stored_through && !taken.is_empty() {
                    payloads.extend(taken);
                    last = log_id.index;
                }
            }
            // Before the lock is released: a reader that sees a task finds
            // its payload.
            if !payloads.is_empty() {
                self.db
                    .put_payloads(&payloads, Some(last))
                    .map_err(|e| e.into_storage(ErrorSubject::StateMachine, ErrorVerb::Write))?;
            }
            self.shared.note_auth_version(&applied);
            // Under the lock: a snapshot's view taken later resets it after.
            self.shared
                .since_snapshot
                .fetch_add(commands, Ordering::Relaxed);
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
        let view = Arc::new(self.shared.read_guard().clone());
        // A restart after this build replays only what applies after the
        // view. (A build that fails leaves the count low until the next
        // one; openraft's entry count still bounds it.)
        self.shared.since_snapshot.store(0, Ordering::Relaxed);
        SnapshotBuilder {
            db: self.db.clone(),
            view,
            last_section: Arc::clone(&self.last_section),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<tokio::fs::File>, StorageError<NodeId>> {
        let db = self.db.clone();
        let file = blocking(move || db.receiving_file())
            .await
            .map_err(snapshot_err(None, ErrorVerb::Write))?;
        Ok(Box::new(tokio::fs::File::from_std(file)))
    }

    /// Decodes and checks the snapshot, stores it and flushes, and only then
    /// swaps the in-memory state: readers never see state that is not yet
    /// durable here.
    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError<NodeId>> {
        let mut file = *snapshot;
        // Chunks written through tokio may still be in flight.
        file.flush()
            .await
            .map_err(|source| StoreError::Io {
                what: format!("write snapshot {}", meta.snapshot_id),
                source,
            })
            .map_err(snapshot_err(Some(meta), ErrorVerb::Write))?;
        let file = file.into_std().await;
        let (db, owned_meta) = (self.db.clone(), meta.clone());
        let applied = blocking(move || {
            let rewind = |mut f: &std::fs::File| {
                std::io::Seek::rewind(&mut f).map_err(|source| StoreError::Io {
                    what: format!("read snapshot {}", owned_meta.snapshot_id),
                    source,
                })
            };
            rewind(&file)?;
            let mut applied = install_file(
                &owned_meta,
                file.try_clone().map_err(|source| StoreError::Io {
                    what: "reopen snapshot".into(),
                    source,
                })?,
                &db,
            )?;
            payloads::keep_out(&db, &mut applied)?;
            // The payloads are durable before the snapshot naming them is.
            db.flush_blocking()?;
            rewind(&file)?;
            db.set_snapshot(&owned_meta, &mut &file, Replace::Always)?;
            note_snapshot("installed", &file);
            Ok(applied)
        })
        .await
        .map_err(snapshot_err(Some(meta), ErrorVerb::Write))?;
        self.db
            .retire_snapshots()
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
            self.shared.since_snapshot.store(0, Ordering::Relaxed);
        }
        *lock(&self.last_section) = None;
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
        // While the stored snapshot lacks its payloads, the last whole one.
        let stored = blocking(move || db.open_sendable_snapshot())
            .await
            .map_err(snapshot_err(None, ErrorVerb::Read))?;
        Ok(stored.map(|(meta, file)| Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        }))
    }
}

/// Builds a snapshot from the view captured by `get_snapshot_builder`; runs
/// concurrently with `apply`.
#[derive(Debug)]
pub struct SnapshotBuilder {
    db: Db,
    view: Arc<Applied>,
    last_section: Arc<std::sync::Mutex<Option<payloads::Section>>>,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    /// Encodes the view into a file, stores it (unless a newer snapshot
    /// was installed meanwhile) and flushes before returning: openraft
    /// purges the log entries the snapshot covers as soon as it has it.
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let meta = Meta {
            last_log_id: self.view.last_applied,
            last_membership: self.view.last_membership.clone(),
            snapshot_id: snapshot_id(self.view.last_applied),
        };
        let (db, view, owned_meta) = (self.db.clone(), Arc::clone(&self.view), meta.clone());
        let previous = lock(&self.last_section).clone();
        let started = std::time::Instant::now();
        let (file, garbage, state_len, state_secs) = blocking(move || {
            // The state first, encoded straight into its file: never held
            // whole in memory.
            let tmp = db.write_snapshot_file(|out| {
                codec::encode_to_writer(&*view, out).map_err(|source| StoreError::Encode {
                    what: format!("snapshot {}", owned_meta.snapshot_id),
                    source,
                })
            })?;
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&tmp)
                .map_err(|source| StoreError::Io {
                    what: format!("open {}", tmp.display()),
                    source,
                })?;
            let state_len = file
                .metadata()
                .map_err(|source| StoreError::Io {
                    what: format!("read {}", tmp.display()),
                    source,
                })?
                .len();
            // Every payload the state names is durable before the snapshot
            // naming it is (they were written as their entries applied).
            db.flush_blocking()?;
            // Opened before it is renamed into place (or, older than the
            // stored one, deleted): the handle reads it either way.
            let Some(name) = db.set_snapshot_file(&owned_meta, &tmp, Replace::IfNotOlder, true)?
            else {
                // Older than the stored one: not stored, but returned whole.
                payloads::append_section(&db, &file, state_len, &view.state, previous.as_ref())?;
                return Ok((file, Vec::new(), None, 0.0));
            };
            // A restart restores this state from here on, without
            // replaying the entries it covers.
            db.flush_blocking()?;
            let state_secs = started.elapsed().as_secs_f64();
            // Then its payloads, for a follower that needs the snapshot.
            let garbage =
                payloads::append_section(&db, &file, state_len, &view.state, previous.as_ref())?;
            db.mark_sendable(&name)?;
            note_snapshot("built", &file);
            Ok((file, garbage, Some(state_len), state_secs))
        })
        .await
        .map_err(snapshot_err(Some(&meta), ErrorVerb::Write))?;
        self.db
            .retire_snapshots()
            .await
            .map_err(snapshot_err(Some(&meta), ErrorVerb::Write))?;
        // The stored snapshot (durable now) no longer names these tasks,
        // and no restart goes back to an older one.
        let removed = garbage.len();
        let mut collected = true;
        if !garbage.is_empty() {
            let db = self.db.clone();
            collected = blocking(move || db.remove_payloads(&garbage))
                .await
                .map_err(snapshot_err(Some(&meta), ErrorVerb::Write))?;
        }
        // The next build copies this one's payloads, unless this one was
        // not stored, or its garbage is still in the tree (pinned by a
        // copy being written out): only a walk of the whole tree finds
        // that again.
        if let Some(start) = state_len {
            *lock(&self.last_section) = match (collected, file.try_clone()) {
                (true, Ok(copy)) => Some(payloads::Section {
                    file: Arc::new(copy),
                    start,
                    last_task_id: self.view.state.last_task_id(),
                }),
                _ => None,
            };
        }
        tracing::info!(
            group = self.db.group_id(),
            snapshot = %meta.snapshot_id,
            bytes = file.metadata().map(|m| m.len()).unwrap_or(0),
            payloads_removed = removed,
            state_secs,
            secs = started.elapsed().as_secs_f64(),
            "snapshot built"
        );
        Ok(Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
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
