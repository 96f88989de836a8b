//! Backup and restore: a consistent, checksummed copy of every Raft group's
//! state machine, streamed out of a running cluster (`GET
//! /api/v1/admin/backup`, `godel backup --out FILE`), checked offline
//! (`godel backup verify FILE`), and seeded into a fresh node's data
//! directory (`godel restore FILE`) from which a new cluster grows.
//!
//! # The file
//!
//! A sequence of per-group sections between a header and a trailer, so
//! that a cluster of several Raft groups (a meta group and queue shards)
//! writes one section each: the meta group (id 0, `meta`), then each queue
//! shard's (`shard-<id>`) when `cluster.shards > 1`.
//! Integers are little-endian; every checksum is SHA-256.
//!
//! ```text
//! file    = header section* trailer
//! header  = "GODELBAK" | format: u32 (= 1) | n: u32 | n bytes of JSON (Header)
//!           | sha256 of everything before it
//! section = "SECT" | n: u32 | n bytes of JSON (SectionMeta) | chunk* | 0: u32
//!           | sha256 of the section from "SECT" through the 0
//! chunk   = n: u32 (1..=4 MiB) | n bytes of the group's state
//! trailer = "DONE" | sections: u32 | sha256 of every byte of the file before it
//! ```
//!
//! The header names the format version, when and by which node and build
//! it was made, the cluster (leader, term, members) and the groups. Each
//! section names its group, the applied log id it was taken at, its Raft
//! membership there, a summary (tasks, dead letters, gateways, agents, the
//! audit chain's head) and then carries the group's state bytes: exactly
//! the snapshot payload its state machine stores (`store::Capture`): the
//! state in `crate::codec`'s versioned encoding, then the task payloads
//! the node's store keeps apart (`store/payloads.rs`; read back, the state
//! holds them all). The state is chunked because it is
//! written as it is encoded, so its length is not known up front. JSON
//! for the metadata: an operator can read it with `head -c`, and a later
//! format can add fields. Bounds: header and section metadata up to
//! [`MAX_META_BYTES`], chunks up to [`MAX_CHUNK_BYTES`], at most
//! [`MAX_GROUPS`] sections; a file past any of them is refused as
//! malformed, before anything is allocated for it.
//!
//! # Consistency under load
//!
//! A backup is taken on any node, follower or leader: the node passes a
//! linearizable read barrier, records the request in the audit log (a Raft
//! write: no quorum, no backup), passes a second barrier, so its replica
//! holds every write acknowledged before the request, that audit entry
//! included, and then copies its state machine under the state machine's
//! read lock (as the snapshot builder does: the tasks are shared pointers,
//! so the copy costs a map of pointers while apply waits). That copy is the state at exactly one applied log id,
//! recorded in the section. Writes go on while it streams: they change
//! the live state, never the copy. With several groups each section is
//! consistent at its own applied index; the groups are not cut at one
//! instant, and the header says so by naming each section's index.
//!
//! # Streaming, bounded
//!
//! The copy is encoded progressively on a blocking thread straight into
//! [`STREAM_CHUNK_BYTES`] pieces handed to the HTTP body through a channel
//! of [`STREAM_QUEUE_CHUNKS`]: the node holds the copy and at most a few
//! MiB of encoded bytes, never a second encoded copy of the state. A
//! client that takes nothing for [`STREAM_STALL`] ends the stream, and so
//! does the node's shutdown; the body then ends with an error (the
//! connection is cut, never closed cleanly), so a cut-off download cannot
//! pass for a whole one, and the trailer would be missing anyway. At most
//! [`MAX_CONCURRENT_BACKUPS`] backups run on a node at once; past it the
//! answer is 429. The CLI writes to a temporary file next to `--out`,
//! checks every checksum while it streams, fsyncs, and renames it into
//! place only when the trailer verified: a failed download leaves no file.
//!
//! # Restore
//!
//! `godel restore FILE` first verifies the whole file, then creates the
//! node's data directory (which must be missing or empty) in a staging
//! directory beside it, renamed into place at the end. The store is
//! written through the store's own code (`store::seed_groups`, every
//! group of the file, which must be the groups a node with the config's
//! `cluster.shards` hosts: layout version,
//! watermark, snapshot, purged and committed log ids), exactly as a node
//! that installed the backup's snapshot from a leader holds it, with one
//! change: the Raft membership is this node alone, and its vote is for
//! itself in the snapshot's term, so it elects itself for the next term
//! and leads a one-node cluster; others join it as any new node does.
//!
//! What in the state belongs to the old cluster, and what becomes of it:
//!
//! - **Node records** of the old nodes stay in the registry, as those of
//!   nodes that left do; they stop heartbeating and are dead once
//!   `queue.node_dead_after` has passed since their last heartbeat.
//! - **Gateways** placed on old nodes move, by the leader's placement
//!   loop, once their owner is dead (as when a node dies).
//! - **Leases** held by agents of the old cluster are kept with their
//!   expiry; they expire by leader time like any lease, or are given back
//!   when their gateway moves, and the tasks are leased again with a new
//!   fencing token. No task is lost: every task of the copy is in the
//!   restored state with its status.
//! - **Event seq and the audit chain** go on from where they were: the
//!   chain verifies (`godel audit verify`) with the same head; the next
//!   events and entries follow the copied ones.
//! - **API keys, tenants and revoked JWTs** are the copy's: the old keys
//!   work on the new cluster. The cluster secret and TLS files are not in
//!   the backup (they are the operator's config, not replicated state).
//!
//! # Unsafe recovery
//!
//! A cluster that has lost its majority for good cannot commit anything.
//! `godel backup --data-dir DIR --out FILE` copies a stopped node's store
//! offline: its snapshot and then every entry of its log, committed or not
//! (`--committed-only` stops at the commit index it knew), applied as the
//! node would apply them; restore that into a new one-node cluster. The
//! store itself is left untouched (`store::offline_captures` reads a copy,
//! every group it holds).
//! Entries a majority acknowledged but this node never received are lost,
//! and entries it holds that were never committed come back; the old nodes
//! must never be started again. `docs/recovery.md` has the procedure.

mod format;
mod offline;
mod stream;

use crate::store::StoreError;

pub use crate::store::Through;
pub use format::{
    ClusterInfo, FORMAT, GroupRef, GroupSummary, Header, MAX_CHUNK_BYTES, MAX_GROUPS,
    MAX_META_BYTES, Reader, SectionBody, SectionMeta, SectionWriter, Writer,
};
pub use offline::{
    PartialFile, Restore, RestoreReport, Verified, VerifiedSection, offline_backup, restore_into,
    verify, verify_file, verify_file_deep, write_file,
};
pub use stream::{
    GroupCapture, MAX_CONCURRENT_BACKUPS, STREAM_CHUNK_BYTES, STREAM_QUEUE_CHUNKS, STREAM_STALL,
    capture_group, stream_backup, write_backup,
};

/// The group id and name of the one Raft group a cluster has today.
pub const META_GROUP: (u32, &str) = (0, "meta");

/// Why a backup could not be made, read or restored.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The input is not a backup at all.
    #[error("not a Godel backup: it does not start with `GODELBAK`")]
    NotABackup,
    /// A backup in a format this build does not read.
    #[error("backup format {0} is not supported: this build reads format {FORMAT}")]
    Format(u32),
    /// The input ends before the backup does.
    #[error("truncated: the backup ends after {at} bytes, inside {within}")]
    Truncated {
        /// Bytes read.
        at: u64,
        /// The part being read.
        within: String,
    },
    /// A checksum does not match the bytes it covers.
    #[error("damaged: the checksum of {what} does not match its bytes (read up to byte {at})")]
    Checksum {
        /// The part it covers.
        what: String,
        /// Bytes read when the mismatch was found.
        at: u64,
    },
    /// The bytes do not follow the format, or break one of its bounds.
    #[error("malformed backup: {0}")]
    Malformed(String),
    /// The backup is sound but cannot be used as asked.
    #[error("{0}")]
    Refused(String),
    /// Reading or writing a file or the stream failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The store could not copy, decode or seed a state machine.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A streamed backup stopped before its end.
    #[error("backup stream stopped: {0}")]
    Interrupted(String),
}

/// Backup results.
pub type Result<T, E = BackupError> = std::result::Result<T, E>;

impl BackupError {
    /// The API error code.
    pub fn code(&self) -> &'static str {
        match self {
            BackupError::NotABackup
            | BackupError::Format(_)
            | BackupError::Truncated { .. }
            | BackupError::Checksum { .. }
            | BackupError::Malformed(_)
            | BackupError::Refused(_) => "invalid_request",
            BackupError::Interrupted(_) => "service_unavailable",
            BackupError::Io { .. } | BackupError::Store(_) => "internal_error",
        }
    }

    /// Whether trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, BackupError::Interrupted(_))
    }

    /// An I/O error with what was being done.
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BackupError {
        let what = what.into();
        move |source| BackupError::Io { what, source }
    }

    /// This error carried through `std::io` (readers and writers), for
    /// [`BackupError::from_io`] to take back out.
    pub(crate) fn into_io(self) -> std::io::Error {
        std::io::Error::other(self)
    }

    /// The backup error an `std::io` error carries, if it carries one;
    /// otherwise the I/O error itself, with what was being done.
    pub(crate) fn from_io(e: std::io::Error, what: &str) -> BackupError {
        if e.get_ref().is_some_and(|inner| inner.is::<BackupError>()) {
            let inner = e.into_inner().expect("invariant: checked just above");
            return *inner
                .downcast::<BackupError>()
                .expect("invariant: checked just above");
        }
        BackupError::Io {
            what: what.to_owned(),
            source: e,
        }
    }
}
