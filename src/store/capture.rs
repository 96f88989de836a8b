//! The store's half of backup and restore (`crate::backup`): a consistent
//! copy of the state machine to stream out ([`Capture`]), the same copy
//! read back ([`Restored`]), and a fresh store seeded with it ([`seed`]).
//!
//! A capture is the snapshot payload, `{last_applied, last_membership,
//! state}`, taken the way the snapshot builder takes it: a clone under the
//! state machine's read lock, so it is the state at exactly one applied
//! log id. Its bytes are the snapshot payload's bytes, so a restored store
//! holds them as its snapshot and opens through the usual checks.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::{LogId, Membership, StoredMembership, Vote};

use super::db::{Db, Meta, PayloadPin, Replace};
use super::payloads;
use super::state_machine::{Applied, SharedState, apply_entry};
use super::{Result, Store, StoreError, recover, while_locked};
use crate::codec;
use crate::fsm;
use crate::raft::{GroupId, META_GROUP, NodeId, NodeInfo};

/// How long opening a stopped node's store waits for its lock.
const OFFLINE_LOCK_WAIT: Duration = Duration::from_secs(2);

/// A copy of a state machine at one applied log id, shared (cloning it is
/// cheap). Holding one holds a copy of the state (tasks are shared with the
/// live state until they change).
#[derive(Clone, Debug)]
pub struct Capture {
    view: Arc<Applied>,
    /// The store holding the payloads the copy does not (none: it holds
    /// them all), and its pin keeping them there while the copy lives.
    payloads: Option<(Db, Arc<PayloadPin>)>,
}

impl SharedState {
    /// A consistent copy of the state machine at its last applied entry:
    /// a clone under the read lock (`O(state)` pointers; apply waits
    /// meanwhile), as the snapshot builder takes one. Blocking for a large
    /// state: call it off the async runtime.
    pub fn capture(&self) -> Capture {
        // Pinned before the copy is taken: no payload it names is deleted
        // from then until it is dropped.
        let db = self.store().ok().map(|db| (*db).clone());
        let pin = db.as_ref().map(|db| Arc::new(db.pin_payloads()));
        Capture {
            view: Arc::new(self.read_guard().clone()),
            payloads: db.zip(pin),
        }
    }
}

impl Capture {
    /// The last log id the copy reflects.
    pub fn last_applied(&self) -> Option<LogId<NodeId>> {
        self.view.last_applied
    }

    /// The membership as of that log id.
    pub fn membership(&self) -> &StoredMembership<NodeId, NodeInfo> {
        &self.view.last_membership
    }

    /// The replicated state.
    pub fn state(&self) -> &fsm::State {
        &self.view.state
    }

    /// Writes the snapshot payload to `out` as it is encoded (never whole
    /// in memory): the state, then the task payloads the store keeps for
    /// it. Blocking, `O(state)`.
    pub fn write_payload(&self, out: &mut impl Write) -> Result<()> {
        codec::encode_to_writer(&*self.view, out).map_err(|source| StoreError::Encode {
            what: "state machine copy".into(),
            source,
        })?;
        let db = self.payloads.as_ref().map(|(db, _)| db);
        payloads::write_section(db, &self.view.state, out).map(|_| ())
    }
}

/// Up to where [`offline_capture`] applies a stopped node's log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Through {
    /// The entries the node knew were committed.
    Committed,
    /// Every entry in its log, committed or not (unsafe recovery: the
    /// node may not have learnt that its last entries were committed).
    LogEnd,
}

/// The state machine a stopped node's store holds, as a [`Capture`]: its
/// snapshot, then its log entries applied in order as the node would
/// apply them, up to `through`; every stored entry's checksum is checked.
/// The store in `dir` is not touched: it is copied (holding sled's own
/// lock on it, so a node that runs on it is refused, and none can start
/// meanwhile) into a temporary directory under `scratch`, which is read
/// and removed (sled rewrites its files when it opens them). Needs room
/// under `scratch` for a copy of the store. Blocking.
pub fn offline_capture(dir: &Path, through: Through, scratch: &Path) -> Result<Capture> {
    let mut groups = offline_captures(dir, through, scratch)?;
    Ok(groups.remove(0).1)
}

/// [`offline_capture`] of every Raft group the store holds (the meta
/// group first, then the queue shards' groups in id order), from one copy.
pub fn offline_captures(
    dir: &Path,
    through: Through,
    scratch: &Path,
) -> Result<Vec<(GroupId, Capture)>> {
    let copy = ScratchDir::create(scratch)?;
    {
        let _locked = while_locked(OFFLINE_LOCK_WAIT, || Db::lock_unopened(dir))?;
        copy_tree(dir, &copy.0)?;
    }
    let ids = Db::open(&copy.0)?.group_ids()?;
    // Every check the node itself makes before it uses its store (lost
    // writes against the watermark, checksums, holes, a purged prefix the
    // snapshot covers): a survivor the node would refuse gives no backup.
    let stores = while_locked(OFFLINE_LOCK_WAIT, || {
        super::Store::open_groups(&copy.0, &ids)
    })?;
    stores
        .into_iter()
        .map(|(group, log, _sm)| {
            let db = log.db.clone();
            drop(log);
            Ok((group, capture_db(&db, through)?))
        })
        .collect()
}

/// One group's state as its store would restore it: snapshot, then the
/// log applied up to `through`.
fn capture_db(db: &Db, through: Through) -> Result<Capture> {
    let span = db.verify_log()?;
    let mut applied = super::state_machine::restore(db)?;
    // The copy's store goes with the scratch directory: the state holds
    // every payload itself.
    payloads::hold_all(db, &mut applied.state)?;
    let end = match through {
        Through::Committed => db.committed()?.map(|c| c.index),
        Through::LogEnd => span.map(|(_, last)| last),
    };
    if let Some(end) = end {
        let from = applied.last_applied.map_or(0, |l| l.index + 1);
        if let (Some((first, _)), Some(_)) = (span, applied.last_applied)
            && first > from
            && end >= from
        {
            return Err(StoreError::Inconsistent(format!(
                "the snapshot ends before index {from} but the log starts at {first}"
            )));
        }
        for entry in db.entries(from..=end)? {
            apply_entry(&mut applied, entry)?;
        }
    }
    Ok(Capture {
        view: Arc::new(applied),
        payloads: None,
    })
}

/// Copies the files and directories under `from` into `to` (existing).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let io = |what: String| move |source| StoreError::Io { what, source };
    let entries = std::fs::read_dir(from).map_err(io(format!("read {}", from.display())))?;
    for entry in entries {
        let entry = entry.map_err(io(format!("read {}", from.display())))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry
            .file_type()
            .map_err(io(format!("stat {}", src.display())))?;
        if kind.is_dir() {
            std::fs::create_dir(&dst).map_err(io(format!("create {}", dst.display())))?;
            copy_tree(&src, &dst)?;
        } else if kind.is_file() {
            std::fs::copy(&src, &dst).map_err(io(format!("copy {}", src.display())))?;
        }
    }
    Ok(())
}

/// A temporary directory, removed when dropped.
struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    fn create(under: &Path) -> Result<ScratchDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = under.join(format!(
            ".godel-offline-copy-{}-{nanos}",
            std::process::id()
        ));
        // Owner only: the copy holds every credential's hash.
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
            .create(&path)
            .map_err(|source| StoreError::Io {
                what: format!("create {}", path.display()),
                source,
            })?;
        Ok(ScratchDir(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A state machine read back from a [`Capture`]'s payload.
#[derive(Debug)]
pub struct Restored {
    applied: Applied,
}

impl Restored {
    /// Decodes a payload [`Capture::write_payload`] wrote, reading no
    /// further than its end; the state holds every task payload. Blocking,
    /// `O(state)`.
    pub fn read_payload(input: &mut impl Read) -> Result<Self> {
        let mut applied: Applied =
            codec::decode_state_from_reader(input).map_err(|source| StoreError::Corrupt {
                what: "state machine copy".into(),
                source,
            })?;
        applied.state.decoded();
        payloads::hold_section(input, &mut applied.state)?;
        Ok(Self { applied })
    }

    /// The last log id it reflects.
    pub fn last_applied(&self) -> Option<LogId<NodeId>> {
        self.applied.last_applied
    }

    /// Its membership.
    pub fn membership(&self) -> &StoredMembership<NodeId, NodeInfo> {
        &self.applied.last_membership
    }

    /// The replicated state.
    pub fn state(&self) -> &fsm::State {
        &self.applied.state
    }

    /// The replicated state, to mend before it is seeded.
    pub fn state_mut(&mut self) -> &mut fsm::State {
        &mut self.applied.state
    }
}

/// What [`seed`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seeded {
    /// The log id the store's snapshot is at (the backup's).
    pub snapshot: LogId<NodeId>,
    /// The vote it starts with: the node itself, in the snapshot's term,
    /// not committed, so its first election is for the next term.
    pub vote: Vote<NodeId>,
}

/// Creates a store in `dir`, which must be missing or empty, holding
/// `restored` as its snapshot with a membership of node `id` alone: a node
/// started on it leads a one-node cluster at once (others join it as
/// usual). Written as a node that had installed that snapshot from a
/// leader and purged its log would hold it (layout, watermark, snapshot,
/// last purged and committed log ids, a vote in the snapshot's term), then
/// opened once through [`Store::open`]'s checks. Blocking.
///
/// The state is kept as it is, event seq, audit chain and all; only the
/// Raft membership is replaced.
pub fn seed(dir: &Path, restored: Restored, id: NodeId, info: NodeInfo) -> Result<Seeded> {
    let mut seeded = seed_groups(dir, vec![(META_GROUP, restored)], id, info)?;
    Ok(seeded.remove(0).1)
}

/// [`seed`] for several Raft groups in the one store in `dir` (the meta
/// group and queue shards), each with its own copy, all with a membership
/// of node `id` alone; opened once through [`Store::open_groups`]'s checks.
pub fn seed_groups(
    dir: &Path,
    groups: Vec<(GroupId, Restored)>,
    id: NodeId,
    info: NodeInfo,
) -> Result<Vec<(GroupId, Seeded)>> {
    if let Some(entry) = first_entry(dir)? {
        return Err(StoreError::NotFresh(format!(
            "{} is not empty (it holds {entry})",
            dir.display()
        )));
    }
    let mut prepared = Vec::with_capacity(groups.len());
    for (group, restored) in groups {
        let mut applied = restored.applied;
        let snapshot = applied.last_applied.ok_or_else(|| {
            StoreError::Inconsistent(format!(
                "the copy of group {group} has applied nothing: there is no state to seed"
            ))
        })?;
        let membership = Membership::new(
            vec![BTreeSet::from([id])],
            BTreeMap::from([(id, info.clone())]),
        );
        let membership_at = *applied.last_membership.log_id();
        applied.last_membership = StoredMembership::new(membership_at, membership);
        let vote = Vote::new(snapshot.leader_id.term, id);
        let meta = Meta {
            last_log_id: Some(snapshot),
            last_membership: applied.last_membership.clone(),
            snapshot_id: format!("restored-{snapshot}"),
        };
        prepared.push((group, snapshot, vote, meta, applied));
    }
    std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
        what: format!("create {}", dir.display()),
        source,
    })?;
    {
        let base = Db::open(dir)?;
        for (group, snapshot, vote, meta, applied) in &prepared {
            let db = base.group(*group)?;
            // A new store: the layout record and an empty watermark.
            recover::check(&db, dir)?;
            db.set_vote(vote)?;
            // Encoded straight into the snapshot's file, as a node does.
            let tmp = db.write_snapshot_file(|out| {
                codec::encode_to_writer(applied, out).map_err(|source| StoreError::Encode {
                    what: format!("restored snapshot of group {group}"),
                    source,
                })?;
                // It holds every payload (`Restored`): the node stores
                // them when it opens the store.
                payloads::write_section(None, &applied.state, out).map(|_| ())
            })?;
            db.set_snapshot_file(meta, &tmp, Replace::Always, false)?;
            db.set_last_purged(snapshot)?;
            db.set_committed(Some(snapshot))?;
        }
        base.flush_blocking()?;
    }
    // The checks a starting node makes; they also raise each watermark to
    // the vote and the snapshot just written.
    let ids: Vec<GroupId> = prepared.iter().map(|p| p.0).collect();
    while_locked(OFFLINE_LOCK_WAIT, || Store::open_groups(dir, &ids))?;
    Ok(prepared
        .into_iter()
        .map(|(group, snapshot, vote, ..)| (group, Seeded { snapshot, vote }))
        .collect())
}

/// The name of some entry of `dir`, if it exists and holds any.
fn first_entry(dir: &Path) -> Result<Option<String>> {
    let io = |source| StoreError::Io {
        what: format!("read {}", dir.display()),
        source,
    };
    match std::fs::read_dir(dir) {
        Ok(mut entries) => match entries.next() {
            Some(e) => Ok(Some(e.map_err(io)?.file_name().to_string_lossy().into())),
            None => Ok(None),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests;
