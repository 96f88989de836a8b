//! The Raft log and vote: openraft's `RaftLogStorage` over the sled trees.

use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    ErrorSubject, ErrorVerb, LogId, LogState, OptionalSend, RaftLogReader, StorageError, Vote,
};

use super::db::{Db, Entry};
use super::watermark::{Mark, Watermark};
use crate::raft::{NodeId, TypeConfig};

/// The log store: entries, vote, committed and last purged log ids, and the
/// watermark of what was acknowledged. Cheap to clone; clones share the
/// database (openraft's replication tasks read through clones while the
/// core writes).
#[derive(Clone, Debug)]
pub struct LogStore {
    pub(super) db: Db,
    watermark: Watermark,
}

impl LogStore {
    pub(super) fn new(db: Db, watermark: Watermark) -> Self {
        Self { db, watermark }
    }
}

fn logs_err(verb: ErrorVerb) -> impl FnOnce(super::StoreError) -> StorageError<NodeId> {
    move |e| e.into_storage(ErrorSubject::Logs, verb)
}

fn vote_err(verb: ErrorVerb) -> impl FnOnce(super::StoreError) -> StorageError<NodeId> {
    move |e| e.into_storage(ErrorSubject::Vote, verb)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError<NodeId>> {
        self.db.entries(range).map_err(logs_err(ErrorVerb::Read))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last_purged_log_id = self.db.last_purged().map_err(logs_err(ErrorVerb::Read))?;
        let last_log_id = self.db.last_log_id().map_err(logs_err(ErrorVerb::Read))?;
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last_log_id.or(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    /// Durable before it returns, in sled and then in the watermark.
    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.db.set_vote(vote).map_err(vote_err(ErrorVerb::Write))?;
        self.db.flush().await.map_err(vote_err(ErrorVerb::Write))?;
        let vote = *vote;
        self.watermark
            .set_async(move |m| Mark {
                vote: Some(vote),
                ..m
            })
            .await
            .map_err(vote_err(ErrorVerb::Write))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.db.vote().map_err(vote_err(ErrorVerb::Read))
    }

    /// Written, not flushed: durable with the next append or vote (see the
    /// module essay).
    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        self.db
            .set_committed(committed.as_ref())
            .map_err(|e| e.into_storage(ErrorSubject::Store, ErrorVerb::Write))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        self.db
            .committed()
            .map_err(|e| e.into_storage(ErrorSubject::Store, ErrorVerb::Read))
    }

    /// Writes the entries (readable on return), flushes once, raises the
    /// watermark to the last entry (written, not fsynced: see the `store`
    /// essay), and only then acknowledges through `callback`.
    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let last = self
            .db
            .append(entries)
            .map_err(logs_err(ErrorVerb::Write))?;
        let flushed = match self.db.flush().await {
            Ok(()) => match last {
                // Through the page cache, inline: a 512-byte pwrite.
                Some(last) => self.watermark.set_cached(move |m| Mark {
                    last: Some(last),
                    ..m
                }),
                None => Ok(()),
            },
            Err(e) => Err(e),
        };
        match flushed {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(io::Error::other(e.to_string())));
                Err(logs_err(ErrorVerb::Write)(e))
            }
        }
    }

    /// Lowers the watermark below `log_id` (fsynced) if it was at or past
    /// it, then removes `[log_id.index, ..)` and flushes (rare, so the fsync
    /// is cheap insurance against a conflicting suffix coming back after a
    /// crash). In this order a crash in between leaves the watermark below
    /// the log, never past it.
    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let before = match log_id.index.checked_sub(1) {
            Some(prev) => {
                let stored = self.db.log_id_at(prev).map_err(logs_err(ErrorVerb::Read))?;
                let purged = self.db.last_purged().map_err(logs_err(ErrorVerb::Read))?;
                stored.or(purged.filter(|p| p.index == prev))
            }
            None => None,
        };
        self.watermark
            .set_async(move |m| match m.last {
                Some(last) if last.index >= log_id.index => Mark { last: before, ..m },
                _ => m,
            })
            .await
            .map_err(logs_err(ErrorVerb::Delete))?;
        self.db
            .remove_entries(log_id.index..)
            .map_err(logs_err(ErrorVerb::Delete))?;
        self.db.flush().await.map_err(logs_err(ErrorVerb::Delete))
    }

    /// Records `last_purged` first, then removes `..=log_id.index`. Not
    /// flushed: after a crash the purge may be undone, never half-done in a
    /// way that hides the purge point.
    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.db
            .set_last_purged(&log_id)
            .map_err(logs_err(ErrorVerb::Write))?;
        self.db
            .remove_entries(..=log_id.index)
            .map_err(logs_err(ErrorVerb::Delete))
    }
}
