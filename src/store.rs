//! Storage: the Raft log, the vote and the state machine's snapshots in one
//! sled database per node, behind openraft's storage-v2 traits.
//!
//! [`Store::open`] returns the two halves openraft wants: a [`LogStore`]
//! (`RaftLogStorage`) and a [`StateMachine`] (`RaftStateMachine`). Both share
//! one `sled::Db`, so sled keeps a single ordered log of every write: a flush
//! made for the Raft log also persists any earlier snapshot or metadata write,
//! and after a crash sled recovers a prefix of the writes, never a hole.
//!
//! # Layout
//!
//! | tree | key | value (always `crate::codec`, bincode in a version envelope) |
//! | --- | --- | --- |
//! | `logs` | log index, big-endian `u64` (so key order is index order) | `openraft::Entry` |
//! | `log_meta` | `vote`, `committed`, `last_purged` | `Vote`, `LogId`, `LogId` |
//! | `snapshot` | `meta`, `data` | `SnapshotMeta`; the encoded snapshot payload |
//!
//! The snapshot payload is `{last_applied, last_membership, state}`: exactly
//! what the state machine holds, so a snapshot restores it completely.
//!
//! # The design: state in memory, snapshot in sled, replay from the log
//!
//! The replicated [`fsm::State`](crate::fsm::State) lives in memory behind one
//! `std::sync::RwLock`, together with the last applied log id and membership.
//! `apply` changes it in memory only and does no I/O. The state is made
//! durable two ways: by snapshots, which are written to sled and flushed
//! before openraft learns of them (openraft purges the log entries a snapshot
//! covers), and by the log itself. On restart the state machine is restored
//! from the stored snapshot, and openraft re-applies the committed entries
//! after it, `(snapshot, committed]`, which it can only do because the log
//! store persists the committed log id ([`LogStore`]'s `save_committed`).
//!
//! Trade-offs, taken on purpose:
//!
//! - **Cheap apply, slower start.** No write per applied entry (the state is
//!   not a sled tree), so apply costs no I/O and cannot half-fail on disk. The
//!   price is a restart that decodes a whole snapshot and replays up to
//!   `snapshot_policy` entries (openraft's default: 5000).
//! - **The whole state fits in memory**, several times over: the live state,
//!   a copy taken for each snapshot build (`get_snapshot_builder` clones it,
//!   `O(state)`, while `apply` waits), and the encoded snapshot
//!   (`SnapshotData = Cursor<Vec<u8>>`). Fine for a queue of up to millions of
//!   tasks; beyond that the state needs persistent data structures or a
//!   chunked snapshot format.
//! - **`committed` is written but not flushed** on its own. It becomes
//!   durable with the next append or vote flush (same sled log). Losing the
//!   latest value in a crash only means replaying fewer entries at start; the
//!   node learns the commit index again from the leader. It never points past
//!   the durable log: openraft 0.9 issues it after the append that wrote
//!   those entries, and `append` returns only once its flush is done.
//! - **Readers see applied, not durable-on-this-node state**: an entry is
//!   applied only once committed, i.e. fsynced on a majority.
//!
//! # Invariants
//!
//! - **Fsync before ack.** `save_vote` returns, and `append` calls its
//!   callback, only after `flush_async` has completed: exactly one flush per
//!   append call. (CRATES.md measured acknowledged writes lost under plain
//!   `kill -9` with sled otherwise.)
//! - **The log has no holes**: entries are written in one atomic sled batch;
//!   `truncate` removes a suffix and `purge` a prefix, and `purge` writes
//!   `last_purged` before it removes anything.
//! - **A stored snapshot never goes back.** A snapshot build that finishes
//!   after a newer snapshot was installed is returned to openraft but not
//!   stored. [`Store::open`] refuses a store whose log was purged past its
//!   snapshot (the state in between would be unrecoverable).
//! - **Corrupt bytes are errors, never panics or skips**: every decoding
//!   failure becomes an openraft `StorageError`, which stops the node rather
//!   than letting it diverge. So does applying an entry at or below the last
//!   applied index.
//! - **Observers never slow apply.** Applied events go out on a bounded
//!   `tokio::sync::broadcast` channel ([`EVENT_CHANNEL_CAPACITY`]); a lagging
//!   receiver loses the oldest messages (and gets `RecvError::Lagged`), an
//!   absent one costs nothing.
//!
//! # Shortcuts
//!
//! - sled 0.34 is frozen upstream and its space amplification under queue
//!   churn is 4-5x (CRATES.md §3). Only this module touches it, so swapping in
//!   redb costs this module only.
//! - Events are at-least-once: re-applying committed entries after a restart
//!   publishes their events again. Each carries its log index for dedupe.
//! - Blocking sled calls (`get`, `insert`, `apply_batch`) run on the async
//!   path; they hit sled's in-memory cache and IO buffers. Only the flush, and
//!   the snapshot encoding, decoding and reads/writes of the snapshot bytes,
//!   which scale with the state, are moved off the runtime.

mod db;
mod log;
mod state_machine;

use std::path::Path;
use std::time::Duration;

use openraft::{AnyError, ErrorSubject, ErrorVerb, StorageError, StorageIOError};

use crate::codec::CodecError;
use crate::raft::NodeId;

pub use log::LogStore;
pub use state_machine::{
    AppliedEvents, EVENT_CHANNEL_CAPACITY, SharedState, SnapshotBuilder, StateMachine,
    membership_changes,
};

/// Why the store failed. Every variant means the node's storage cannot be
/// trusted or reached: the node should stop, not retry.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed (I/O, or its own corruption check).
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    /// Stored bytes do not decode.
    #[error("corrupt {what}: {source}")]
    Corrupt {
        /// What was being read.
        what: String,
        /// The decoding error.
        source: CodecError,
    },
    /// A value could not be encoded.
    #[error("cannot encode {what}: {source}")]
    Encode {
        /// What was being written.
        what: String,
        /// The encoding error.
        source: CodecError,
    },
    /// The stored pieces contradict each other.
    #[error("inconsistent store: {0}")]
    Inconsistent(String),
    /// A previous apply panicked while holding the state lock.
    #[error("state machine lock poisoned by an earlier panic")]
    Poisoned,
    /// A blocking storage task panicked or was cancelled.
    #[error("blocking storage task failed: {0}")]
    Blocking(#[from] tokio::task::JoinError),
}

/// Storage results.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    /// The API error code: storage failures are always internal.
    pub fn code(&self) -> &'static str {
        "internal_error"
    }

    /// Never retryable: the node stops on a storage error.
    pub fn is_retryable(&self) -> bool {
        false
    }

    /// Wraps this error for openraft, which stops the node on it.
    pub(crate) fn into_storage(
        self,
        subject: ErrorSubject<NodeId>,
        verb: ErrorVerb,
    ) -> StorageError<NodeId> {
        StorageIOError::new(subject, verb, AnyError::new(&self)).into()
    }
}

/// Opens a node's storage.
#[derive(Debug)]
pub struct Store;

impl Store {
    /// Opens (or creates) the sled database in `dir` and returns the log store
    /// and the state machine, the latter restored from the stored snapshot.
    ///
    /// Blocking (sled recovery, snapshot decoding): call it before starting
    /// Raft, from `main` or `tokio::task::spawn_blocking`. sled holds an
    /// exclusive lock on `dir` until every handle is dropped: both halves,
    /// their clones, and any snapshot builder. After `Raft::shutdown` the
    /// last ones drop asynchronously, so reopening in the same process may
    /// have to retry briefly.
    pub fn open(dir: &Path) -> Result<(LogStore, StateMachine)> {
        let db = db::Db::open(dir)?;
        let applied = state_machine::restore(&db)?;
        let last_purged = db.last_purged()?;
        if last_purged.map(|l| l.index) > applied.last_applied.map(|l| l.index) {
            return Err(StoreError::Inconsistent(format!(
                "log purged up to {last_purged:?} but the snapshot only covers {:?}",
                applied.last_applied
            )));
        }
        Ok((LogStore::new(db.clone()), StateMachine::new(db, applied)))
    }

    /// [`Store::open`], waiting up to `wait` while sled's lock on `dir` is
    /// still held: a handle dropped in this process releases it only when
    /// sled's background writer lets go, and a process that just exited may
    /// not be reaped yet. Any other error returns at once.
    pub fn open_waiting(dir: &Path, wait: Duration) -> Result<(LogStore, StateMachine)> {
        while_locked(wait, || Self::open(dir))
    }
}

/// Whether `e` is sled refusing a directory another handle holds.
fn is_locked(e: &StoreError) -> bool {
    matches!(e, StoreError::Sled(sled::Error::Io(io)) if io.to_string().contains("could not acquire lock"))
}

/// Runs `open` until it succeeds, fails otherwise than on sled's directory
/// lock, or `wait` has passed.
fn while_locked<T>(wait: Duration, mut open: impl FnMut() -> Result<T>) -> Result<T> {
    let give_up = std::time::Instant::now() + wait;
    loop {
        match open() {
            Err(e) if is_locked(&e) && std::time::Instant::now() < give_up => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// The replicated state as a stopped node's data directory holds it: the
/// stored snapshot, then every committed log entry after it applied in
/// order (what the node would apply on restart). For offline inspection
/// (`godel audit verify --data-dir`); blocking; the node must not be
/// running (sled locks its directory).
pub fn offline_state(dir: &Path) -> Result<crate::fsm::State> {
    // A node stopped a moment ago may still hold the lock.
    let db = while_locked(Duration::from_secs(2), || db::Db::open(dir))?;
    let mut applied = state_machine::restore(&db)?;
    let from = applied.last_applied.map_or(0, |l| l.index + 1);
    let Some(committed) = db.committed()? else {
        return Ok(applied.state);
    };
    for entry in db.entries(from..=committed.index)? {
        if let openraft::EntryPayload::Normal(request) = &entry.payload {
            applied.state.apply(request);
        }
        applied.last_applied = Some(entry.log_id);
    }
    Ok(applied.state)
}

#[cfg(test)]
mod tests;
