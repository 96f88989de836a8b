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
//! | tree | key | value (`crate::codec`, bincode in a version envelope, but for payloads) |
//! | --- | --- | --- |
//! | `logs` | log index, big-endian `u64` (so key order is index order) | `openraft::Entry`, then a CRC-32 (little-endian) of the index and those bytes |
//! | `log_meta` | `vote`, `committed`, `last_purged`, `layout` | `Vote`, `LogId`, `LogId`, `u32` |
//! | `snapshot` | `meta`, `file`, `unsent`, `sendable` | `SnapshotMeta`; the name of the snapshot's file in `godel-snapshots/`; present while that file lacks its payloads; meanwhile, the last whole snapshot's meta and file name |
//! | `payloads` | task id, big-endian `u64` | the task's payload, UTF-8 JSON text as submitted |
//!
//! Those are the meta group's trees. Another Raft group `g` (see
//! `docs/shards.md`) has the same four prefixed `g<g>.` (`g1.logs`, ...)
//! in the same database, and its own watermark file
//! `godel-watermark-g<g>` ([`Store::open_groups`]).
//!
//! Next to sled's files, outside sled, the directory holds the watermark
//! file `godel-watermark` (format in `watermark.rs`). `layout` is written
//! when the store is created (currently 2: checksums and watermark); a
//! store without it that holds data was written by an earlier build (layout
//! 1, never deployed) and is refused with [`StoreError::Layout`], not
//! migrated.
//!
//! The snapshot payload is `{last_applied, last_membership, state}`: exactly
//! what the state machine holds, so a snapshot restores it completely;
//! then the payloads of its tasks that the `payloads` tree keeps (format
//! and rules in `payloads.rs`). A build stores the snapshot once its state
//! is written and flushed, marked `unsent`, then appends the payloads and
//! clears the mark: a restart, which reads only the state, uses the new
//! snapshot as early as it can (at ten million tasks the payloads take
//! several times as long as the state). Until the mark is cleared the last
//! whole snapshot is kept and is the one sent to a follower (and the one
//! openraft is told of at start, so it purges no entry the newer state
//! covers that a follower may still need after the older one).
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
//! - **Task payloads out of memory.** A new task's payload is written to the
//!   `payloads` tree as its entry applies (not flushed: a restart replays
//!   the entry and writes it again, and a snapshot build flushes before
//!   storing the snapshot that names it); the state keeps only that it is
//!   stored. So a deep queue's memory does not grow with its prompts. A
//!   task in a durable session keeps its own (its turns quote it at
//!   apply).
//! - **Cheap apply, slower start.** No write per applied entry but the
//!   payloads' (the state is not a sled tree), so apply cannot half-fail on disk. The
//!   price is a restart that decodes a whole snapshot and replays up to
//!   `snapshot_policy` entries (openraft's default: 5000).
//! - **The whole state fits in memory**, with a copy taken for each
//!   snapshot build (`get_snapshot_builder` clones it while `apply` waits;
//!   tasks are shared behind `Arc`, so the copy is a map of pointers, about
//!   80 bytes a task). The encoded snapshot is not held: it is a file of its
//!   own (`SnapshotData = tokio::fs::File`, in `godel-snapshots/` inside
//!   the sled directory, its name stored with its metadata), encoded into
//!   the file as it is built, decoded from it as it is read at start, sent
//!   to a follower in chunks read from it, and received into one. A new
//!   snapshot's file replaces the last one's, which is deleted only once
//!   the metadata naming the new one is durable; files no metadata names
//!   (a crash's leftovers) are removed at open.
//! - **`committed` is written but not flushed** on its own. It becomes
//!   durable with the next append or vote flush (same sled log). Losing the
//!   latest value in a crash only means replaying fewer entries at start; the
//!   node learns the commit index again from the leader. It never points past
//!   the durable log: openraft 0.9 issues it after the append that wrote
//!   those entries, and `append` returns only once its flush is done.
//! - **Readers see applied, not durable-on-this-node state**: an entry is
//!   applied only once committed, i.e. fsynced on a majority.
//!
//! # Lost writes: the watermark
//!
//! A disk can lose writes it had fsynced (a lying write cache on power
//! loss, a truncated or restored file). sled then recovers a shorter prefix
//! of its log *without any error*: nothing inside sled can tell a complete
//! log from one that lost its tail, because whatever recorded the tail was
//! in the lost tail too. A node that came back that way would present a
//! log shorter than what it acknowledged, and a vote older than one it
//! cast. That breaks Raft's assumptions (an entry it acknowledged may have
//! counted towards a commit that no longer has a majority; it may vote
//! twice in a term), and openraft 0.9's leader panics on it in debug builds
//! (`progress/entry/mod.rs`: "follower log reversion is not allowed").
//!
//! So the node keeps a **watermark** outside sled: its vote and the id of
//! the last log entry it acknowledged, in a small file with two
//! checksummed slots written alternately. The write path:
//!
//! - `append`: sled batch, sled flush (fsync), watermark := last entry
//!   (a `pwrite` through the page cache), *then* the acknowledgement.
//!   `save_vote`: sled flush, then the watermark's vote (fdatasync), then
//!   return.
//! - `truncate` (a follower's conflicting suffix): the watermark is lowered
//!   to the entry before the cut (fsynced) *before* sled removes anything.
//!
//! Each step writes the watermark after sled is durable and before anything
//! is acknowledged, so the watermark never claims more than sled had made
//! durable (no false alarm after a crash) and never less than what was
//! acknowledged. [`Store::open`] then checks that the stored vote is at
//! least the watermark's and that the log still holds the watermark's entry
//! *with the same log id* (or that a snapshot covers it); by Raft's log
//! matching property that entry vouches for every entry before it. It also
//! checks every entry's checksum and that no index is missing, which catches
//! bytes sled hands back changed (a checksum is also checked on every read).
//! If any check fails the node **refuses to start**
//! ([`StoreError::LostWrites`]), naming what was lost and the way back:
//! remove the node from the membership, wipe its data, join it again as a
//! new member. It never presents the shorter log to a leader, so no leader
//! trips on it. When the checks pass, the watermark is raised to what the
//! store holds (after an fsync of sled's file): entries written and
//! flushed by a process that died before updating the watermark are
//! acknowledged by this one.
//!
//! Why refuse rather than repair: a node that lost acknowledged entries
//! could rejoin safely only as a non-voter that re-fetches them before
//! acknowledging or voting again, and openraft 0.9 has no such mode for an
//! existing voter; the membership change the operator makes (leave, then
//! join afresh) is exactly that, done with openraft's own tools.
//!
//! Why an append's watermark is not fsynced: the write is in the page
//! cache before the acknowledgement, so it survives the process dying
//! (`kill -9`) and a log file that loses its tail while the machine runs
//! (what the `torn-tail` drill does). After the machine itself crashes it
//! may be older than sled's log, which is only a missed detection if sled
//! also lost fsynced writes in that crash: a disk whose cache ignores
//! flushes, which would as well drop an fsynced watermark. An fsync there
//! cost a second flush per append (measured on the shared 2-core VM,
//! debug build, 3000 one-entry appends back to back: 350-620 us per append
//! without the watermark, 1000-2200 us with an fsynced one, 360-750 us with
//! a `pwrite` alone) and bought nothing against such a disk. Votes and
//! truncations are rare and fsync their watermark: a truncation lowers it
//! durably before sled drops anything, so a crash in between is no false
//! alarm. Limits: a disk that drops *both* the sled tail and the
//! watermark's last write shows an older watermark and the loss of the
//! entries after it goes unnoticed; so does a wiped directory (no
//! watermark: a new node). The watermark guards against a log file that
//! loses its tail or is changed, not against every failing disk.
//!
//! # Backups
//!
//! `capture.rs` gives `crate::backup` what it needs and keeps sled here: a
//! copy of the state machine taken as a snapshot build takes one, the same
//! read from a stopped node's store (a copy of its files, so the store is
//! never written), and a fresh store seeded with a copy as its snapshot,
//! through the layout, watermark and open checks above.
//!
//! # Invariants
//!
//! - **Fsync before ack.** `save_vote` returns, and `append` calls its
//!   callback, only after a database flush that started after its writes
//!   has completed and the watermark was written (fsynced for a vote): one
//!   sled flush per append call, or another group's that covers it.
//!   (CRATES.md measured acknowledged writes lost under plain `kill -9` with
//!   sled otherwise.)
//! - **The watermark is never ahead of sled and never behind an ack**
//!   (above).
//! - **The log has no holes**: entries are written in one atomic sled batch;
//!   `truncate` removes a suffix and `purge` a prefix, and `purge` writes
//!   `last_purged` before it removes anything.
//! - **A stored snapshot never goes back.** A snapshot build that finishes
//!   after a newer snapshot was installed is returned to openraft but not
//!   stored. [`Store::open`] refuses a store whose log was purged past its
//!   snapshot (the state in between would be unrecoverable).
//! - **Corrupt bytes are errors, never panics or skips**: every checksum or
//!   decoding failure becomes an openraft `StorageError`, which stops the node rather
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

mod capture;
mod db;
mod log;
mod payloads;
mod recover;
mod state_machine;
mod watermark;

use std::path::Path;
use std::time::{Duration, Instant};

use openraft::{AnyError, ErrorSubject, ErrorVerb, StorageError, StorageIOError};

use crate::codec::CodecError;
use crate::raft::{GroupId, META_GROUP, NodeId};

pub use capture::{
    Capture, Restored, Seeded, Through, offline_capture, offline_captures, seed, seed_groups,
};
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
    /// A stored log entry's checksum does not match its bytes.
    #[error("corrupt log entry {index}: bad checksum ({why})")]
    Checksum {
        /// The entry's log index.
        index: u64,
        /// What was found.
        why: String,
    },
    /// The stored pieces contradict each other.
    #[error("inconsistent store: {0}")]
    Inconsistent(String),
    /// The log or vote lost writes this node had acknowledged, or a stored
    /// entry is damaged: found at [`Store::open`], which refuses to start.
    #[error("{0}; {REJOIN}")]
    LostWrites(String),
    /// The data directory was written with a layout this build does not read.
    #[error("unsupported store layout: {0}")]
    Layout(String),
    /// A file outside sled (the watermark) could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, and to which file.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A store was to be created where something already is.
    #[error("refusing to create a store: {0}")]
    NotFresh(String),
    /// A previous apply panicked while holding the state lock.
    #[error("state machine lock poisoned by an earlier panic")]
    Poisoned,
    /// A blocking storage task panicked or was cancelled.
    #[error("blocking storage task failed: {0}")]
    Blocking(#[from] tokio::task::JoinError),
}

/// What a node refused for lost or damaged writes must do.
const REJOIN: &str = "this node may have voted for or acknowledged entries it no longer has, \
    so it must not rejoin with this data: remove it from the cluster (`godel cluster leave \
    <id>`), wipe its data directory and join it again as a new member";

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
    ///
    /// Refuses ([`StoreError::LostWrites`]) a store whose vote or log went
    /// back past what this node acknowledged, or holds a damaged or missing
    /// entry, and ([`StoreError::Layout`]) one written with another layout.
    pub fn open(dir: &Path) -> Result<(LogStore, StateMachine)> {
        let mut groups = Self::open_groups(dir, &[META_GROUP])?;
        let (_, log, sm) = groups
            .pop()
            .expect("invariant: one group asked for, one opened");
        Ok((log, sm))
    }

    /// [`Store::open`] for several Raft groups in the one sled database in
    /// `dir`: each group's own trees, snapshot and watermark file, each
    /// checked as `open` checks the meta group's, in the order given. One
    /// sled log carries them all, so a flush for any group's append makes
    /// every group's earlier writes durable too.
    pub fn open_groups(
        dir: &Path,
        groups: &[GroupId],
    ) -> Result<Vec<(GroupId, LogStore, StateMachine)>> {
        let started = Instant::now();
        let base = db::Db::open(dir)?;
        tracing::info!(
            dir = %dir.display(),
            secs = started.elapsed().as_secs_f64(),
            "store opened"
        );
        groups
            .iter()
            .map(|&group| {
                let (log, sm) = Self::open_group(base.group(group)?, dir)?;
                Ok((group, log, sm))
            })
            .collect()
    }

    fn open_group(db: db::Db, dir: &Path) -> Result<(LogStore, StateMachine)> {
        db.remove_stray_snapshots()?;
        let started = Instant::now();
        let applied = state_machine::restore(&db)?;
        let restored = started.elapsed();
        let last_purged = db.last_purged()?;
        if last_purged.map(|l| l.index) > applied.last_applied.map(|l| l.index) {
            return Err(StoreError::Inconsistent(format!(
                "log purged up to {last_purged:?} but the snapshot only covers {:?}",
                applied.last_applied
            )));
        }
        let watermark = recover::check(&db, dir)?;
        let checked = started.elapsed();
        let tasks = applied.state.task_count();
        let last_applied = applied.last_applied.map(|l| l.index);
        let group = db.group_id();
        let sm = StateMachine::new(db.clone(), applied)?;
        // What a restart spends where, for an operator waiting on one.
        tracing::info!(
            group,
            tasks,
            last_applied,
            restore_secs = restored.as_secs_f64(),
            check_secs = (checked - restored).as_secs_f64(),
            payloads_secs = (started.elapsed() - checked).as_secs_f64(),
            "group's state restored"
        );
        Ok((LogStore::new(db, watermark), sm))
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
/// order (what the node would apply on restart), after every check the
/// node makes at start. For offline inspection (`godel audit verify
/// --data-dir`); blocking. The store is not touched: it is copied into the
/// system's temporary directory ([`offline_capture`]) and read there, so
/// that needs room for a copy of it; the node must be stopped.
pub fn offline_state(dir: &Path) -> Result<crate::fsm::State> {
    let capture = offline_capture(dir, Through::Committed, &std::env::temp_dir())?;
    Ok(capture.state().clone())
}

#[cfg(test)]
mod tests;
