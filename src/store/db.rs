//! The sled layout: one `Db`, four trees per Raft group, every value
//! through `crate::codec` but task payloads (JSON text as it is).
//! The only file that names sled types.

use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use openraft::{LogId, SnapshotMeta, Vote};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Result, StoreError};
use crate::codec;
use crate::raft::{GroupId, META_GROUP, NodeId, NodeInfo, TypeConfig};

/// A log entry as openraft hands it over.
pub(super) type Entry = openraft::Entry<TypeConfig>;
/// Snapshot metadata.
pub(super) type Meta = SnapshotMeta<NodeId, NodeInfo>;

const LOGS: &str = "logs";
const LOG_META: &str = "log_meta";
const SNAPSHOT: &str = "snapshot";
/// Task payloads by task id (big-endian), as UTF-8 text.
const PAYLOADS: &str = "payloads";
/// In `payloads`: the last log index whose entry's payloads are stored.
/// Nine bytes, so no task id's key, and after every one of them.
const PAYLOADS_THROUGH: &[u8] = &[0xff; 9];

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";
const LAYOUT: &[u8] = b"layout";
const SNAPSHOT_META: &[u8] = b"meta";
/// The name of the file holding the stored snapshot's payload.
const SNAPSHOT_FILE: &[u8] = b"file";
/// Present while the stored snapshot's file holds its state but not yet
/// the task payloads after it: restored from, never sent.
const SNAPSHOT_UNSENT: &[u8] = b"unsent";
/// While the stored snapshot is unsent: the metadata and file name of the
/// last whole one, which is what is sent meanwhile.
const SNAPSHOT_SENDABLE: &[u8] = b"sendable";
/// The directory, inside sled's, of the snapshot payload files (inside,
/// so a copy of the store's directory copies them too).
const SNAPSHOT_DIR: &str = "godel-snapshots";

/// The on-disk layout this build writes and reads, stored under `layout` in
/// `log_meta` when the store is created.
///
/// 2: every log entry ends with a CRC-32, and the directory holds the
/// watermark file.
/// 3: a snapshot's payload is a file of its own (`godel-snapshots/`), its
/// name stored with its metadata, rather than a sled value.
/// 4: task payloads live in their own tree, not in the state, and a
/// snapshot's file carries them after the state.
/// 5: a stored snapshot's file may hold only its state while `unsent` says
/// so; `sendable` then names the last whole one.
/// Earlier layouts were never deployed: such a store is refused with
/// [`StoreError::Layout`] rather than migrated.
pub(super) const LAYOUT_VERSION: u32 = 5;

/// Bytes of the checksum after each stored entry.
const CRC_LEN: usize = 4;

/// Group `group`'s name for tree `base`: the meta group keeps the names
/// the store had before groups existed; another group's are prefixed
/// `g<group>.`.
fn tree_name(group: GroupId, base: &str) -> String {
    if group == META_GROUP {
        base.to_owned()
    } else {
        format!("g{group}.{base}")
    }
}

/// Whether a snapshot write may replace a newer stored snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Replace {
    /// Installed from the leader: always replaces.
    Always,
    /// Built locally from an older view: skipped if the stored one is newer.
    IfNotOlder,
}

/// Handles on one Raft group's trees in the node's sled database; cheap to
/// clone.
#[derive(Clone, Debug)]
pub(super) struct Db {
    db: sled::Db,
    /// Whose trees these are.
    group: GroupId,
    logs: sled::Tree,
    log_meta: sled::Tree,
    snapshot: sled::Tree,
    payloads: sled::Tree,
    /// Copies of the state being written out with their payloads (a
    /// backup's capture): while there are any, no payload is deleted.
    payload_pins: Arc<Mutex<usize>>,
    /// Makes reading or replacing the snapshot keys atomic (the snapshot
    /// is written from the builder task and the state-machine worker).
    snapshot_lock: Arc<Mutex<()>>,
    /// Where snapshot payload files go.
    snapshot_dir: Arc<PathBuf>,
    /// Payload files replaced since the last [`Db::retire_snapshots`]: each
    /// is deleted once the metadata naming its successor is durable.
    retired: Arc<Mutex<Vec<String>>>,
    /// Shared by every group's handle on the database: one flush at a time.
    flushes: Arc<FlushGate>,
}

/// One flush at a time per database, and none for a caller whose writes a
/// flush that started after them has already made durable (group commit
/// across the node's Raft groups).
///
/// The flush itself is sled's blocking `flush()` on tokio's blocking pool,
/// not `flush_async()`: in sled 0.34, concurrent `flush_async` calls can
/// deadlock (sled issues 1241, 1308 and 1357, fixed on its main branch but
/// never released). Seen here: six nodes of three shard groups each in one
/// test process hung with every `sled-io` thread blocked in `make_stable`;
/// with this gate and the blocking flush the same test passed 8 runs in 8.
#[derive(Debug, Default)]
struct FlushGate {
    lock: tokio::sync::Mutex<()>,
    /// Flushes started so far.
    started: std::sync::atomic::AtomicU64,
    /// The number of the last flush that completed.
    done: std::sync::atomic::AtomicU64,
}

/// sled's page cache, in bytes. sled's default (1 GiB) would dominate a
/// node's memory; the log is read back rarely (followers catching up,
/// restarts), so a small cache costs little.
pub const SLED_CACHE_BYTES: u64 = 64 * 1024 * 1024;

impl Db {
    /// Opens or creates the database in `dir`, with the meta group's
    /// trees. Blocking.
    pub(super) fn open(dir: &Path) -> Result<Self> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(SLED_CACHE_BYTES)
            .open()?;
        let snapshot_dir = dir.join(SNAPSHOT_DIR);
        std::fs::create_dir_all(&snapshot_dir).map_err(|source| StoreError::Io {
            what: format!("create {}", snapshot_dir.display()),
            source,
        })?;
        Self::trees(db, META_GROUP, Arc::new(snapshot_dir))
    }

    /// The Raft groups this database holds trees of: the meta group, and
    /// every group with a log tree, in id order.
    pub(super) fn group_ids(&self) -> Result<Vec<GroupId>> {
        let mut ids = vec![META_GROUP];
        for name in self.db.tree_names() {
            let name = String::from_utf8_lossy(&name);
            if let Some(id) = name
                .strip_prefix('g')
                .and_then(|rest| rest.strip_suffix(&format!(".{LOGS}")))
                .and_then(|n| n.parse::<GroupId>().ok())
                && id != META_GROUP
            {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    /// Group `group`'s trees in the same database (created if missing).
    /// All groups share one sled log, so a flush for one group's append
    /// persists every group's earlier writes too.
    pub(super) fn group(&self, group: GroupId) -> Result<Self> {
        Ok(Self {
            flushes: Arc::clone(&self.flushes),
            ..Self::trees(self.db.clone(), group, Arc::clone(&self.snapshot_dir))?
        })
    }

    fn trees(db: sled::Db, group: GroupId, snapshot_dir: Arc<PathBuf>) -> Result<Self> {
        Ok(Self {
            flushes: Arc::default(),
            logs: db.open_tree(tree_name(group, LOGS))?,
            log_meta: db.open_tree(tree_name(group, LOG_META))?,
            snapshot: db.open_tree(tree_name(group, SNAPSHOT))?,
            payloads: db.open_tree(tree_name(group, PAYLOADS))?,
            payload_pins: Arc::default(),
            db,
            group,
            snapshot_lock: Arc::default(),
            snapshot_dir,
            retired: Arc::default(),
        })
    }

    /// The group whose trees these are.
    pub(super) fn group_id(&self) -> GroupId {
        self.group
    }

    /// Takes the lock sled takes on its `db` file (an exclusive `flock`),
    /// without opening the store: held until the file is dropped.
    pub(super) fn lock_unopened(dir: &Path) -> Result<std::fs::File> {
        let path = dir.join("db");
        let file = std::fs::File::open(&path).map_err(|source| StoreError::Io {
            what: format!(
                "open {} (is {} a node's store?)",
                path.display(),
                dir.display()
            ),
            source,
        })?;
        // SAFETY: flock on a file descriptor this function owns, valid until
        // `file` is dropped (which releases the lock).
        let rc = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        };
        if rc == 0 {
            return Ok(file);
        }
        let err = std::io::Error::last_os_error();
        // The same error sled gives, so `while_locked` waits on it.
        Err(StoreError::Sled(sled::Error::Io(std::io::Error::other(
            format!(
                "could not acquire lock on {}: {err} (a node runs on it: stop it first)",
                path.display()
            ),
        ))))
    }

    /// Writes everything written so far to disk and fsyncs it (see
    /// [`FlushGate`]).
    pub(super) async fn flush(&self) -> Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        let gate = &self.flushes;
        // Every flush numbered above this one starts after our writes.
        let before = gate.started.load(SeqCst);
        let _one_at_a_time = gate.lock.lock().await;
        if gate.done.load(SeqCst) > before {
            return Ok(());
        }
        let n = gate.started.fetch_add(1, SeqCst) + 1;
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| {
                sled::Error::Io(std::io::Error::other(format!("flush task failed: {e}")))
            })??;
        gate.done.store(n, SeqCst);
        Ok(())
    }

    /// [`Db::flush`], blocking the calling thread (for [`Store::open`]).
    ///
    /// [`Store::open`]: super::Store::open
    pub(super) fn flush_blocking(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    // ---- task payloads ----

    /// Stores task payloads (not durable until the next flush); with
    /// `through`, in the same atomic batch, that every payload of the
    /// entries up to that log index is stored ([`Db::payloads_through`]).
    pub(super) fn put_payloads(
        &self,
        payloads: &[(u64, Box<str>)],
        through: Option<u64>,
    ) -> Result<()> {
        let mut batch = sled::Batch::default();
        for (id, text) in payloads {
            batch.insert(&id.to_be_bytes(), text.as_bytes());
        }
        if let Some(index) = through {
            batch.insert(PAYLOADS_THROUGH, &index.to_be_bytes());
        }
        self.payloads.apply_batch(batch)?;
        Ok(())
    }

    /// The last log index whose entry's payloads [`Db::put_payloads`]
    /// stored (0: none).
    pub(super) fn payloads_through(&self) -> Result<u64> {
        match self.payloads.get(PAYLOADS_THROUGH)? {
            None => Ok(0),
            Some(v) => {
                let bytes: [u8; 8] = v.as_ref().try_into().map_err(|_| {
                    StoreError::Inconsistent("a payloads-through mark not of 8 bytes".into())
                })?;
                Ok(u64::from_be_bytes(bytes))
            }
        }
    }

    /// Task `id`'s stored payload.
    pub(super) fn payload(&self, id: u64) -> Result<Option<Box<str>>> {
        self.payloads
            .get(id.to_be_bytes())?
            .map(|v| payload_text(id, &v))
            .transpose()
    }

    /// Calls `each` with every stored payload of a task id in `ids` (up
    /// to a last task id), in id order, until it fails.
    pub(super) fn each_payload(
        &self,
        ids: std::ops::RangeInclusive<u64>,
        mut each: impl FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let (first, last) = ids.into_inner();
        if first > last {
            return Ok(());
        }
        for kv in self
            .payloads
            .range(first.to_be_bytes()..=last.to_be_bytes())
        {
            let (k, v) = kv?;
            each(payload_id(&k)?, &v)?;
        }
        Ok(())
    }

    /// Deletes the payloads of tasks `ids`, unless a copy of the state is
    /// pinned ([`Db::pin_payloads`]): then nothing, and false.
    pub(super) fn remove_payloads(&self, ids: &[u64]) -> Result<bool> {
        let pins = self
            .payload_pins
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *pins > 0 {
            return Ok(false);
        }
        let mut batch = sled::Batch::default();
        for id in ids {
            batch.remove(&id.to_be_bytes());
        }
        self.payloads.apply_batch(batch)?;
        Ok(true)
    }

    /// Keeps every stored payload until the pin is dropped.
    pub(super) fn pin_payloads(&self) -> PayloadPin {
        *self
            .payload_pins
            .lock()
            .unwrap_or_else(PoisonError::into_inner) += 1;
        PayloadPin(Arc::clone(&self.payload_pins))
    }

    // ---- layout ----

    /// Whether nothing was ever written: no layout, vote, log or snapshot.
    pub(super) fn is_new(&self) -> Result<bool> {
        Ok(self.log_meta.is_empty()
            && self.logs.is_empty()
            && self.snapshot.is_empty()
            && self.payloads.is_empty())
    }

    /// The stored layout version, if any.
    pub(super) fn layout(&self) -> Result<Option<u32>> {
        get(&self.log_meta, LAYOUT, "layout version")
    }

    /// Records [`LAYOUT_VERSION`] (not durable until the next flush).
    pub(super) fn set_layout(&self) -> Result<()> {
        put(&self.log_meta, LAYOUT, &LAYOUT_VERSION, "layout version")
    }

    // ---- log metadata ----

    pub(super) fn vote(&self) -> Result<Option<Vote<NodeId>>> {
        get(&self.log_meta, VOTE, "vote")
    }

    /// Not durable until the next [`Db::flush`].
    pub(super) fn set_vote(&self, vote: &Vote<NodeId>) -> Result<()> {
        put(&self.log_meta, VOTE, vote, "vote")
    }

    pub(super) fn committed(&self) -> Result<Option<LogId<NodeId>>> {
        get(&self.log_meta, COMMITTED, "committed log id")
    }

    pub(super) fn set_committed(&self, committed: Option<&LogId<NodeId>>) -> Result<()> {
        match committed {
            Some(c) => put(&self.log_meta, COMMITTED, c, "committed log id"),
            None => self
                .log_meta
                .remove(COMMITTED)
                .map(drop)
                .map_err(Into::into),
        }
    }

    pub(super) fn last_purged(&self) -> Result<Option<LogId<NodeId>>> {
        get(&self.log_meta, LAST_PURGED, "last purged log id")
    }

    pub(super) fn set_last_purged(&self, log_id: &LogId<NodeId>) -> Result<()> {
        put(&self.log_meta, LAST_PURGED, log_id, "last purged log id")
    }

    // ---- log entries ----

    /// Writes `entries` in one atomic batch, each value followed by its
    /// checksum: readable on return, durable after the next [`Db::flush`].
    /// Returns the last entry's id.
    pub(super) fn append(
        &self,
        entries: impl IntoIterator<Item = Entry>,
    ) -> Result<Option<LogId<NodeId>>> {
        let mut batch = sled::Batch::default();
        let mut last = None;
        for entry in entries {
            let index = entry.log_id.index;
            let mut value = codec::encode(&entry).map_err(|source| StoreError::Encode {
                what: format!("log entry {index}"),
                source,
            })?;
            let crc = entry_crc(index, &value);
            value.extend_from_slice(&crc.to_le_bytes());
            batch.insert(&index.to_be_bytes()[..], value);
            last = Some(entry.log_id);
        }
        self.logs.apply_batch(batch)?;
        Ok(last)
    }

    /// Checks every stored entry's checksum and that the indexes follow
    /// each other with no hole, without decoding the entries; returns the
    /// first and last index. Blocking: reads the whole log.
    pub(super) fn verify_log(&self) -> Result<Option<(u64, u64)>> {
        let mut span: Option<(u64, u64)> = None;
        for kv in self.logs.iter() {
            let (key, value) = kv?;
            let index = key_index(&key)?;
            checked_body(index, &value)?;
            span = match span {
                None => Some((index, index)),
                Some((first, last)) if index == last + 1 => Some((first, index)),
                Some((_, last)) => {
                    return Err(StoreError::Inconsistent(format!(
                        "the log has a hole: entry {index} follows entry {last}"
                    )));
                }
            };
        }
        Ok(span)
    }

    /// The id of the stored entry at `index`, if there is one.
    pub(super) fn log_id_at(&self, index: u64) -> Result<Option<LogId<NodeId>>> {
        match self.logs.get(index.to_be_bytes())? {
            Some(value) => Ok(Some(decode_entry(&index.to_be_bytes(), &value)?.log_id)),
            None => Ok(None),
        }
    }

    /// The stored entries with an index in `range`, in index order.
    pub(super) fn entries(&self, range: impl RangeBounds<u64>) -> Result<Vec<Entry>> {
        let Some((start, end)) = key_range(&range) else {
            return Ok(Vec::new());
        };
        let iter = match end {
            Some(end) => self.logs.range(start..end),
            None => self.logs.range(start..),
        };
        iter.map(|kv| {
            let (key, value) = kv?;
            decode_entry(&key, &value)
        })
        .collect()
    }

    /// The id of the last stored entry.
    pub(super) fn last_log_id(&self) -> Result<Option<LogId<NodeId>>> {
        match self.logs.last()? {
            Some((key, value)) => Ok(Some(decode_entry(&key, &value)?.log_id)),
            None => Ok(None),
        }
    }

    /// Removes the entries with an index in `range`, in one atomic batch.
    pub(super) fn remove_entries(&self, range: impl RangeBounds<u64>) -> Result<()> {
        let Some((start, end)) = key_range(&range) else {
            return Ok(());
        };
        let keys = match end {
            Some(end) => self.logs.range(start..end),
            None => self.logs.range(start..),
        }
        .keys();
        let mut batch = sled::Batch::default();
        for key in keys {
            batch.remove(key?);
        }
        self.logs.apply_batch(batch)?;
        Ok(())
    }

    // ---- snapshot ----

    /// The stored snapshot's metadata and the path of its payload file.
    /// Blocking.
    #[cfg(test)]
    pub(super) fn snapshot_file(&self) -> Result<Option<(Meta, PathBuf)>> {
        let _guard = self.lock_snapshot();
        self.snapshot_file_locked()
    }

    fn snapshot_file_locked(&self) -> Result<Option<(Meta, PathBuf)>> {
        let meta: Option<Meta> = get(&self.snapshot, SNAPSHOT_META, "snapshot meta")?;
        let name: Option<String> = get(&self.snapshot, SNAPSHOT_FILE, "snapshot file name")?;
        match (meta, name) {
            (Some(meta), Some(name)) => Ok(Some((meta, self.snapshot_dir.join(name)))),
            (None, None) => Ok(None),
            (meta, name) => Err(StoreError::Inconsistent(format!(
                "snapshot meta present: {}, file name present: {}",
                meta.is_some(),
                name.is_some()
            ))),
        }
    }

    /// The stored snapshot's metadata and its payload file, opened for
    /// reading. Opened while no other snapshot can replace it: a replaced
    /// file is deleted later, and an open one stays readable. Blocking.
    pub(super) fn open_snapshot(&self) -> Result<Option<(Meta, std::fs::File)>> {
        let _guard = self.lock_snapshot();
        let Some((meta, path)) = self.snapshot_file_locked()? else {
            return Ok(None);
        };
        let file = std::fs::File::open(&path).map_err(|source| StoreError::Io {
            what: format!("open snapshot {}", path.display()),
            source,
        })?;
        Ok(Some((meta, file)))
    }

    /// The stored snapshot's metadata and payload bytes. Blocking: reads the
    /// whole payload.
    #[cfg(test)]
    pub(super) fn snapshot(&self) -> Result<Option<(Meta, Vec<u8>)>> {
        let Some((meta, mut file)) = self.open_snapshot()? else {
            return Ok(None);
        };
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut data).map_err(|source| StoreError::Io {
            what: "read snapshot".into(),
            source,
        })?;
        Ok(Some((meta, data)))
    }

    /// An anonymous file in the snapshot directory (deleted as soon as it
    /// is created, so a crash leaves nothing): where a snapshot received
    /// from the leader is written, chunk by chunk. Blocking.
    pub(super) fn receiving_file(&self) -> Result<std::fs::File> {
        let path = self.snapshot_dir.join(format!(
            "g{}-{:016x}.recv",
            self.group,
            rand::random::<u64>()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| StoreError::Io {
                what: format!("create {}", path.display()),
                source,
            })?;
        let _ = std::fs::remove_file(&path);
        Ok(file)
    }

    /// Writes a snapshot payload to a new temporary file through `write`,
    /// flushed and fsynced; its path, for [`Db::set_snapshot_file`].
    /// Blocking.
    pub(super) fn write_snapshot_file(
        &self,
        write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<()>,
    ) -> Result<PathBuf> {
        let path = self.snapshot_dir.join(format!(
            "g{}-{:016x}.tmp",
            self.group,
            rand::random::<u64>()
        ));
        let io = |what: &str, source| StoreError::Io {
            what: format!("{what} {}", path.display()),
            source,
        };
        let file = std::fs::File::create(&path).map_err(|e| io("create", e))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        let written = write(&mut out).and_then(|()| {
            let file = out.into_inner().map_err(|e| io("write", e.into_error()))?;
            file.sync_all().map_err(|e| io("fsync", e))
        });
        if let Err(e) = written {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(path)
    }

    /// Stores a snapshot: its payload file `tmp` (from
    /// [`Db::write_snapshot_file`]) takes its final name and the metadata
    /// naming it replaces the stored one, unless `replace` forbids
    /// replacing a newer one (then `tmp` is deleted); returns the file's
    /// name if it was stored. `unsent`: the file holds the state only, so
    /// far: it is restored from but not sent, and the last whole snapshot
    /// is kept to be sent until [`Db::mark_sendable`]. Not durable until
    /// the next [`Db::flush`]; a replaced file goes at the next
    /// [`Db::retire_snapshots`]. Blocking.
    pub(super) fn set_snapshot_file(
        &self,
        meta: &Meta,
        tmp: &Path,
        replace: Replace,
        unsent: bool,
    ) -> Result<Option<String>> {
        let _guard = self.lock_snapshot();
        let stored = self.snapshot_file_locked()?;
        if replace == Replace::IfNotOlder {
            let index = |m: &Meta| m.last_log_id.map(|l| l.index);
            if stored.as_ref().is_some_and(|(s, _)| index(s) > index(meta)) {
                let _ = std::fs::remove_file(tmp);
                return Ok(None);
            }
        }
        let name = format!("g{}-{:016x}.snap", self.group, rand::random::<u64>());
        let path = self.snapshot_dir.join(&name);
        let io = |what: String| move |source| StoreError::Io { what, source };
        std::fs::rename(tmp, &path).map_err(io(format!("rename {}", tmp.display())))?;
        // The rename is durable once the directory is.
        std::fs::File::open(&*self.snapshot_dir)
            .and_then(|d| d.sync_all())
            .map_err(io(format!("fsync {}", self.snapshot_dir.display())))?;
        let was_unsent = self.snapshot.contains_key(SNAPSHOT_UNSENT)?;
        let sendable = self.sendable_locked()?;
        let mut batch = sled::Batch::default();
        batch.insert(SNAPSHOT_META, encoded(meta, "snapshot meta")?);
        batch.insert(SNAPSHOT_FILE, encoded(&name, "snapshot file name")?);
        let mut retire = Vec::new();
        let stored = stored.and_then(|(m, p)| Some((m, file_name(&p)?)));
        if unsent {
            batch.insert(SNAPSHOT_UNSENT, encoded(&true, "snapshot's unsent mark")?);
            match stored {
                // The last whole snapshot stays, to be sent meanwhile.
                Some(last_whole) if !was_unsent => batch.insert(
                    SNAPSHOT_SENDABLE,
                    encoded(&last_whole, "sendable snapshot")?,
                ),
                Some((_, old)) => retire.push(old),
                None => {}
            }
        } else {
            batch.remove(SNAPSHOT_UNSENT);
            batch.remove(SNAPSHOT_SENDABLE);
            retire.extend(stored.map(|(_, old)| old));
            retire.extend(sendable.map(|(_, old)| old));
        }
        self.snapshot.apply_batch(batch)?;
        self.retired
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(retire);
        Ok(Some(name))
    }

    /// Whether the stored snapshot's file holds only its state so far
    /// ([`Db::set_snapshot_file`]). Blocking.
    #[cfg(test)]
    pub(super) fn snapshot_unsent(&self) -> Result<bool> {
        Ok(self.snapshot.contains_key(SNAPSHOT_UNSENT)?)
    }

    fn sendable_locked(&self) -> Result<Option<(Meta, String)>> {
        get(&self.snapshot, SNAPSHOT_SENDABLE, "sendable snapshot")
    }

    /// Records that snapshot file `name` holds its payloads now, if it is
    /// still the stored one: it is sent from now on, and the last whole
    /// one kept meanwhile goes at the next [`Db::retire_snapshots`].
    /// Returns whether it was. Not durable until the next [`Db::flush`].
    /// Blocking.
    pub(super) fn mark_sendable(&self, name: &str) -> Result<bool> {
        let _guard = self.lock_snapshot();
        let current = self
            .snapshot_file_locked()?
            .and_then(|(_, p)| file_name(&p));
        if current.as_deref() != Some(name) {
            return Ok(false);
        }
        let sendable = self.sendable_locked()?;
        let mut batch = sled::Batch::default();
        batch.remove(SNAPSHOT_UNSENT);
        batch.remove(SNAPSHOT_SENDABLE);
        self.snapshot.apply_batch(batch)?;
        if let Some((_, old)) = sendable {
            self.retired
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(old);
        }
        Ok(true)
    }

    /// The snapshot to send a follower, its file opened for reading: the
    /// stored one, or while that is unsent the last whole one (None if
    /// there is none). Blocking.
    pub(super) fn open_sendable_snapshot(&self) -> Result<Option<(Meta, std::fs::File)>> {
        let _guard = self.lock_snapshot();
        let (meta, path) = match self.sendable_locked()? {
            Some((meta, name)) => (meta, self.snapshot_dir.join(name)),
            None if self.snapshot.contains_key(SNAPSHOT_UNSENT)? => return Ok(None),
            None => match self.snapshot_file_locked()? {
                Some(stored) => stored,
                None => return Ok(None),
            },
        };
        let file = std::fs::File::open(&path).map_err(|source| StoreError::Io {
            what: format!("open snapshot {}", path.display()),
            source,
        })?;
        Ok(Some((meta, file)))
    }

    /// [`Db::write_snapshot_file`] of everything `data` reads, then
    /// [`Db::set_snapshot_file`].
    pub(super) fn set_snapshot(
        &self,
        meta: &Meta,
        data: &mut impl std::io::Read,
        replace: Replace,
    ) -> Result<bool> {
        let tmp = self.write_snapshot_file(|out| {
            std::io::copy(data, out)
                .map(|_| ())
                .map_err(|source| StoreError::Io {
                    what: "write snapshot".into(),
                    source,
                })
        })?;
        Ok(self
            .set_snapshot_file(meta, &tmp, replace, false)?
            .is_some())
    }

    /// Flushes, then deletes the payload files replaced before it: the
    /// metadata naming their successors is durable by then, so a crash
    /// never finds stored metadata whose file is gone.
    pub(super) async fn retire_snapshots(&self) -> Result<()> {
        let retired =
            std::mem::take(&mut *self.retired.lock().unwrap_or_else(PoisonError::into_inner));
        self.flush().await?;
        for name in retired {
            let _ = std::fs::remove_file(self.snapshot_dir.join(name));
        }
        Ok(())
    }

    /// At start: deletes this group's payload files that the stored
    /// metadata does not name (temporary ones a crash left, replaced ones
    /// not yet deleted). Blocking.
    pub(super) fn remove_stray_snapshots(&self) -> Result<()> {
        let _guard = self.lock_snapshot();
        let current = self
            .snapshot_file_locked()?
            .and_then(|(_, p)| p.file_name().map(|n| n.to_owned()));
        let sendable = self.sendable_locked()?.map(|(_, name)| name);
        let prefix = format!("g{}-", self.group);
        let entries = std::fs::read_dir(&*self.snapshot_dir).map_err(|source| StoreError::Io {
            what: format!("read {}", self.snapshot_dir.display()),
            source,
        })?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let text = name.to_string_lossy();
            if text.starts_with(&prefix)
                && current.as_deref() != Some(name.as_os_str())
                && sendable.as_deref() != Some(&*text)
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    fn lock_snapshot(&self) -> std::sync::MutexGuard<'_, ()> {
        // The mutex guards no data, only the order of sled calls, so a
        // poisoned lock (a panic inside sled) leaves nothing inconsistent.
        self.snapshot_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Test hook: overwrites a stored log entry with `bytes`, as they are
    /// (no checksum added).
    #[cfg(test)]
    pub(super) fn overwrite_entry(&self, index: u64, bytes: &[u8]) -> Result<()> {
        self.logs.insert(index.to_be_bytes(), bytes)?;
        Ok(())
    }

    /// Test hook: overwrites a stored log entry with `bytes` and a valid
    /// checksum (bytes that pass the checksum but not decoding).
    #[cfg(test)]
    pub(super) fn overwrite_entry_checksummed(&self, index: u64, bytes: &[u8]) -> Result<()> {
        let mut value = bytes.to_vec();
        value.extend_from_slice(&entry_crc(index, bytes).to_le_bytes());
        self.overwrite_entry(index, &value)
    }

    /// Test hook: overwrites the stored snapshot payload with `bytes`.
    #[cfg(test)]
    pub(super) fn overwrite_snapshot_data(&self, bytes: &[u8]) -> Result<()> {
        let (_, path) = self.snapshot_file()?.expect("a stored snapshot");
        std::fs::write(&path, bytes).map_err(|source| StoreError::Io {
            what: format!("write {}", path.display()),
            source,
        })
    }
}

/// A file's name, as the snapshot records keep it.
fn file_name(path: &Path) -> Option<String> {
    path.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// Holds every stored payload while it lives ([`Db::pin_payloads`]).
#[derive(Debug)]
pub(super) struct PayloadPin(Arc<Mutex<usize>>);

impl Drop for PayloadPin {
    fn drop(&mut self) {
        let mut pins = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *pins = pins.saturating_sub(1);
    }
}

fn payload_id(key: &[u8]) -> Result<u64> {
    let bytes: [u8; 8] = key.try_into().map_err(|_| {
        StoreError::Inconsistent(format!("a payload key of {} bytes, not 8", key.len()))
    })?;
    Ok(u64::from_be_bytes(bytes))
}

fn payload_text(id: u64, bytes: &[u8]) -> Result<Box<str>> {
    std::str::from_utf8(bytes)
        .map(Box::from)
        .map_err(|e| StoreError::Inconsistent(format!("task {id}'s stored payload: {e}")))
}

fn get<T: DeserializeOwned>(tree: &sled::Tree, key: &[u8], what: &str) -> Result<Option<T>> {
    match tree.get(key)? {
        Some(bytes) => codec::decode(&bytes)
            .map(Some)
            .map_err(|source| StoreError::Corrupt {
                what: what.to_owned(),
                source,
            }),
        None => Ok(None),
    }
}

fn put<T: Serialize>(tree: &sled::Tree, key: &[u8], value: &T, what: &str) -> Result<()> {
    tree.insert(key, encoded(value, what)?)?;
    Ok(())
}

fn encoded<T: Serialize + ?Sized>(value: &T, what: &str) -> Result<Vec<u8>> {
    codec::encode(value).map_err(|source| StoreError::Encode {
        what: what.to_owned(),
        source,
    })
}

/// The checksum stored after an entry: CRC-32 of its index (big-endian)
/// and its encoded bytes, so an entry copied under another index fails too.
fn entry_crc(index: u64, body: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&index.to_be_bytes());
    crc.update(body);
    crc.finalize()
}

/// The log index a key stands for.
fn key_index(key: &[u8]) -> Result<u64> {
    <[u8; 8]>::try_from(key)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Inconsistent(format!("log key of {} bytes", key.len())))
}

/// A stored entry's encoded bytes, once its checksum matches.
fn checked_body(index: u64, value: &[u8]) -> Result<&[u8]> {
    let bad = |why: String| StoreError::Checksum { index, why };
    let split = value
        .len()
        .checked_sub(CRC_LEN)
        .ok_or_else(|| bad(format!("{} bytes, shorter than a checksum", value.len())))?;
    let (body, crc) = value.split_at(split);
    let stored = u32::from_le_bytes(crc.try_into().expect("invariant: CRC_LEN bytes"));
    let actual = entry_crc(index, body);
    if stored != actual {
        return Err(bad(format!(
            "stored {stored:#010x}, computed {actual:#010x}"
        )));
    }
    Ok(body)
}

/// Checks and decodes a stored entry, and checks that it sits under its
/// own index.
fn decode_entry(key: &[u8], value: &[u8]) -> Result<Entry> {
    let index = key_index(key)?;
    let body = checked_body(index, value)?;
    let entry: Entry = codec::decode(body).map_err(|source| StoreError::Corrupt {
        what: format!("log entry {index}"),
        source,
    })?;
    if entry.log_id.index != index {
        return Err(StoreError::Inconsistent(format!(
            "log entry {} stored under index {index}",
            entry.log_id
        )));
    }
    Ok(entry)
}

/// The sled key range for an index range: `(start, end)` with an exclusive
/// `end` (`None`: unbounded), or `None` if the range is empty.
fn key_range(range: &impl RangeBounds<u64>) -> Option<([u8; 8], Option<[u8; 8]>)> {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.checked_add(1)?,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.checked_add(1),
        Bound::Excluded(&e) => Some(e),
        Bound::Unbounded => None,
    };
    if end.is_some_and(|end| end <= start) {
        return None;
    }
    Some((start.to_be_bytes(), end.map(u64::to_be_bytes)))
}
