//! The watermark: the last vote and the last log id this node has
//! acknowledged, in a small file of its own next to sled's, so that a sled
//! log that lost its tail can be told from a complete one (see the module
//! essay of `store`, "Lost writes").
//!
//! # File format
//!
//! [`FILE_LEN`] bytes: two [`SLOT_LEN`]-byte slots, written alternately
//! (record `seq` goes to slot `seq % 2`) with `pwrite` (and `fdatasync`,
//! but for appends) over blocks allocated when the file was created. A write torn by a crash
//! damages one slot only; the other still holds the previous record, which
//! is what the node had acknowledged before the torn write (a record is
//! written before the acknowledgement it covers).
//!
//! | bytes | field |
//! | --- | --- |
//! | 8 | [`MAGIC`] |
//! | 4 | format version, little-endian `u32` ([`FORMAT`]) |
//! | 8 | `seq`, little-endian `u64` |
//! | 4 | payload length, little-endian `u32` |
//! | n | payload: [`Mark`] through `crate::codec` |
//! | 4 | CRC-32 of everything before it, little-endian |
//!
//! An all-zero slot is empty. Reading takes the valid record with the
//! highest `seq`; a file whose slots are neither empty nor valid is an
//! error.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use openraft::{LogId, Vote};
use serde::{Deserialize, Serialize};

use super::{Result, StoreError};
use crate::codec;
use crate::raft::NodeId;

/// The file's name, inside the store's directory.
pub(super) const FILE_NAME: &str = "godel-watermark";

/// The watermark file of Raft group `group`: [`FILE_NAME`] for the meta
/// group (as before groups existed), `godel-watermark-g<group>` for others.
pub(super) fn file_name(group: crate::raft::GroupId) -> String {
    if group == crate::raft::META_GROUP {
        FILE_NAME.to_owned()
    } else {
        format!("{FILE_NAME}-g{group}")
    }
}
/// First bytes of every written slot.
pub(super) const MAGIC: [u8; 8] = *b"GODELWM\0";
/// The slot format this build writes and reads.
pub(super) const FORMAT: u32 = 1;
/// Bytes per slot: one disk sector, so a slot never straddles two.
pub(super) const SLOT_LEN: usize = 512;
/// The whole file.
const FILE_LEN: u64 = 2 * SLOT_LEN as u64;
/// Magic, format, seq and length.
const HEADER_LEN: usize = 8 + 4 + 8 + 4;

/// What the node has acknowledged: its vote, and the last entry of its log
/// at the time of its last acknowledged append (or truncation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Mark {
    pub(super) vote: Option<Vote<NodeId>>,
    pub(super) last: Option<LogId<NodeId>>,
}

/// The open watermark file; cheap to clone (clones share it).
#[derive(Clone, Debug)]
pub(super) struct Watermark {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug)]
struct Inner {
    file: File,
    path: PathBuf,
    seq: u64,
    mark: Mark,
}

fn io_err(path: &Path, what: &str) -> impl FnOnce(io::Error) -> StoreError {
    let what = format!("{what} {}", path.display());
    move |source| StoreError::Io { what, source }
}

impl Watermark {
    /// Whether `dir` has the watermark file `name` ([`file_name`]).
    pub(super) fn exists_named(dir: &Path, name: &str) -> bool {
        dir.join(name).exists()
    }

    /// Opens the watermark file `name` ([`file_name`]) in `dir`, creating
    /// it (empty, fsynced, and the directory entry too) if it is missing.
    /// Blocking.
    pub(super) fn open_named(dir: &Path, name: &str) -> Result<Self> {
        let path = dir.join(name);
        let created = !path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(&path, "open"))?;
        if created {
            // Zeros written, not a hole: the blocks are allocated now, so an
            // fdatasync of a later overwrite has no metadata to commit.
            file.write_all_at(&[0; FILE_LEN as usize], 0)
                .map_err(io_err(&path, "write"))?;
            file.sync_all().map_err(io_err(&path, "fsync"))?;
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(dir, "fsync directory"))?;
        }
        let mut bytes = vec![0u8; FILE_LEN as usize];
        file.read_exact_at(&mut bytes, 0)
            .map_err(io_err(&path, "read"))?;
        let (seq, mark) = read(&bytes).map_err(|why| {
            StoreError::Inconsistent(format!("watermark file {}: {why}", path.display()))
        })?;
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                file,
                path,
                seq,
                mark,
            })),
        })
    }

    /// The last mark written.
    pub(super) fn get(&self) -> Mark {
        self.lock().mark
    }

    /// Writes `update(current mark)` and fsyncs it. Blocking: call through
    /// `spawn_blocking` on the async path.
    pub(super) fn set(&self, update: impl FnOnce(Mark) -> Mark) -> Result<()> {
        self.write(update, true)
    }

    /// Writes the updated record through the page cache only: it survives
    /// the process (a `kill -9`) but not the machine. What `append` uses;
    /// see the module essay of `store`.
    pub(super) fn set_cached(&self, update: impl FnOnce(Mark) -> Mark) -> Result<()> {
        self.write(update, false)
    }

    fn write(&self, update: impl FnOnce(Mark) -> Mark, durable: bool) -> Result<()> {
        let mut inner = self.lock();
        let mark = update(inner.mark);
        if mark == inner.mark {
            return Ok(());
        }
        let seq = inner.seq + 1;
        let slot = encode_slot(seq, &mark)?;
        let at = (seq % 2) * SLOT_LEN as u64;
        let path = inner.path.clone();
        inner
            .file
            .write_all_at(&slot, at)
            .map_err(io_err(&path, "write"))?;
        if durable {
            inner.file.sync_data().map_err(io_err(&path, "fsync"))?;
        }
        inner.seq = seq;
        inner.mark = mark;
        Ok(())
    }

    /// [`Watermark::set`] off the async runtime.
    pub(super) async fn set_async(
        &self,
        update: impl FnOnce(Mark) -> Mark + Send + 'static,
    ) -> Result<()> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.set(update)).await?
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding it can only come from inside `set`, before
        // `seq` and `mark` are updated: the in-memory record is still the
        // last one fully written.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One slot's bytes for record `seq`.
fn encode_slot(seq: u64, mark: &Mark) -> Result<Vec<u8>> {
    let payload = codec::encode(mark).map_err(|source| StoreError::Encode {
        what: "watermark".into(),
        source,
    })?;
    let mut slot = Vec::with_capacity(SLOT_LEN);
    slot.extend_from_slice(&MAGIC);
    slot.extend_from_slice(&FORMAT.to_le_bytes());
    slot.extend_from_slice(&seq.to_le_bytes());
    let len = u32::try_from(payload.len()).expect("invariant: a mark is a few dozen bytes");
    slot.extend_from_slice(&len.to_le_bytes());
    slot.extend_from_slice(&payload);
    let crc = crc32fast::hash(&slot);
    slot.extend_from_slice(&crc.to_le_bytes());
    assert!(slot.len() <= SLOT_LEN, "invariant: a mark fits its slot");
    slot.resize(SLOT_LEN, 0);
    Ok(slot)
}

/// A slot's record: `Ok(None)` if the slot is empty, `Err` if it is
/// damaged or of another format.
fn decode_slot(slot: &[u8]) -> std::result::Result<Option<(u64, Mark)>, String> {
    if slot.iter().all(|b| *b == 0) {
        return Ok(None);
    }
    if slot[..8] != MAGIC {
        return Err("bad magic".into());
    }
    let u32_at = |at: usize| u32::from_le_bytes(slot[at..at + 4].try_into().expect("4 bytes"));
    let format = u32_at(8);
    if format != FORMAT {
        return Err(format!("format {format}, this build reads {FORMAT}"));
    }
    let seq = u64::from_le_bytes(slot[12..20].try_into().expect("8 bytes"));
    let len = u32_at(20) as usize;
    let end = HEADER_LEN + len;
    if end + 4 > slot.len() {
        return Err(format!("payload length {len} overruns the slot"));
    }
    if crc32fast::hash(&slot[..end]) != u32_at(end) {
        return Err("checksum mismatch".into());
    }
    let mark = codec::decode(&slot[HEADER_LEN..end]).map_err(|e| e.to_string())?;
    Ok(Some((seq, mark)))
}

/// The newest valid record in the file's bytes; `(0, empty)` for a new file.
fn read(bytes: &[u8]) -> std::result::Result<(u64, Mark), String> {
    let slots = [
        decode_slot(&bytes[..SLOT_LEN]),
        decode_slot(&bytes[SLOT_LEN..]),
    ];
    let valid = slots
        .iter()
        .filter_map(|s| s.as_ref().ok().copied().flatten());
    if let Some(newest) = valid.max_by_key(|(seq, _)| *seq) {
        return Ok(newest);
    }
    match slots {
        [Ok(None), Ok(None)] => Ok((0, Mark::default())),
        [Err(a), Err(b)] => Err(format!("no valid record (slot 0: {a}; slot 1: {b})")),
        [Err(e), _] | [_, Err(e)] => Err(format!("no valid record ({e})")),
        _ => unreachable!("a valid slot returned above"),
    }
}

#[cfg(test)]
mod tests {
    use openraft::CommittedLeaderId;

    use super::*;

    fn mark(term: u64, index: u64) -> Mark {
        Mark {
            vote: Some(Vote::new_committed(term, 1)),
            last: Some(LogId::new(CommittedLeaderId::new(term, 1), index)),
        }
    }

    #[test]
    fn newest_record_survives_reopen_and_a_torn_slot() {
        let dir = tempfile::tempdir().unwrap();
        let wm = Watermark::open_named(dir.path(), FILE_NAME).unwrap();
        assert_eq!(wm.get(), Mark::default());
        wm.set(|_| mark(1, 5)).unwrap();
        wm.set(|_| mark(2, 9)).unwrap();
        drop(wm);
        let wm = Watermark::open_named(dir.path(), FILE_NAME).unwrap();
        assert_eq!(wm.get(), mark(2, 9));
        drop(wm);

        // Tear the newest record (seq 2, slot 0): the previous one is read.
        let path = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[30] ^= 0xFF;
        std::fs::write(&path, &bytes).unwrap();
        let wm = Watermark::open_named(dir.path(), FILE_NAME).unwrap();
        assert_eq!(wm.get(), mark(1, 5));
        drop(wm);

        // Both slots damaged: an error naming the file.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[SLOT_LEN + 30] ^= 0xFF;
        std::fs::write(&path, &bytes).unwrap();
        let err = Watermark::open_named(dir.path(), FILE_NAME).unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
    }

    #[test]
    fn another_format_is_refused() {
        let mut slot = encode_slot(1, &mark(1, 1)).unwrap();
        slot[8] = 9;
        let err = decode_slot(&slot).unwrap_err();
        assert!(err.contains("format 9"), "{err}");
    }
}
