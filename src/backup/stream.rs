//! Making a backup: a group's section from its state machine
//! ([`capture_group`], [`write_backup`]), and the chunk stream a node
//! serves ([`stream_backup`]).

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::format::{ClusterInfo, FORMAT, GroupRef, GroupSummary, Header, SectionMeta, Writer};
use super::{BackupError, Result};
use crate::fsm::{self, TaskStatus};
use crate::store::{Capture, SharedState};
use crate::{clock, codec};

/// Backups a node streams at once; past it the API answers 429.
pub const MAX_CONCURRENT_BACKUPS: usize = 2;
/// Bytes per piece of a streamed backup.
pub const STREAM_CHUNK_BYTES: usize = 256 * 1024;
/// Pieces encoded ahead of the client: with [`STREAM_CHUNK_BYTES`], the
/// encoded bytes a stream holds at most (besides the copy of the state).
pub const STREAM_QUEUE_CHUNKS: usize = 4;
/// How long a stream waits for its client to take a piece before it
/// gives up.
pub const STREAM_STALL: Duration = Duration::from_secs(60);

/// One group's consistent copy, ready to be written as a section.
#[derive(Clone, Debug)]
pub struct GroupCapture {
    /// The group's id.
    pub id: u32,
    /// The group's name.
    pub name: String,
    /// Its state machine at one applied log id.
    pub capture: Capture,
}

/// Copies group `id`'s state machine (`sm`, its read handle) at its last
/// applied entry: the one function a group needs to be backed up.
/// Blocking (`O(state)` under the state machine's read lock).
pub fn capture_group(id: u32, name: &str, sm: &SharedState) -> GroupCapture {
    GroupCapture {
        id,
        name: name.to_owned(),
        capture: sm.capture(),
    }
}

impl GroupCapture {
    /// The section's metadata.
    pub fn meta(&self) -> Result<SectionMeta> {
        let applied = self.capture.last_applied().ok_or_else(|| {
            BackupError::Refused(format!(
                "group {} has applied nothing yet: there is no state to back up",
                self.id
            ))
        })?;
        Ok(SectionMeta {
            group: self.id,
            name: self.name.clone(),
            applied,
            membership: self.capture.membership().clone(),
            summary: summary(self.capture.state()),
        })
    }
}

/// What a meta group's state holds.
pub(super) fn summary(state: &fsm::State) -> GroupSummary {
    let reg = state.registry();
    let audit = state.audit();
    GroupSummary {
        tasks: state.task_count() as u64,
        dead_letters: state.depth().count(None, TaskStatus::DeadLetter, None),
        gateways: reg.gateways().count() as u64,
        agents: reg.agents().count() as u64,
        last_event_seq: state.last_event_seq(),
        audit_last_seq: audit.last_seq(),
        audit_head: hex(&audit.head()),
    }
}

/// Lower-case hex.
pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Header {
    /// The header of a backup of `groups` made now.
    pub fn new(cluster: ClusterInfo, groups: &[GroupCapture]) -> Header {
        let now = clock::now_ms();
        Header {
            format: FORMAT,
            created_at_ms: now,
            created_at: clock::rfc3339(now),
            godel_version: env!("CARGO_PKG_VERSION").to_owned(),
            codec_version: codec::VERSION,
            cluster,
            groups: groups
                .iter()
                .map(|g| GroupRef {
                    id: g.id,
                    name: g.name.clone(),
                })
                .collect(),
        }
    }
}

/// Writes a whole backup of `groups` to `out`; returns the output, the
/// file's SHA-256 and its length. Blocking, `O(state)`; holds one chunk.
pub fn write_backup<W: Write>(
    out: W,
    header: &Header,
    groups: &[GroupCapture],
) -> Result<(W, [u8; 32], u64)> {
    let mut w = Writer::start(out, header)?;
    for g in groups {
        let meta = g.meta()?;
        w.section(&meta, |body| {
            g.capture
                .write_payload(&mut *body)
                .map_err(BackupError::from)
        })?;
    }
    w.finish()
}

/// A piece of a streamed backup, or why it stopped.
type Piece = std::result::Result<Bytes, BackupError>;

/// Streams a backup of `groups`: returns the stream of body pieces and the
/// producer, which the caller spawns (and so owns). The producer encodes
/// on a blocking thread at most [`STREAM_QUEUE_CHUNKS`] pieces ahead of
/// the stream's reader; it stops when `stop` is cancelled (the node shuts
/// down), when the reader is dropped, or after [`STREAM_STALL`] without
/// the reader taking a piece. Stopped early, the stream yields the error
/// as its last item (so an HTTP body ends with an error, never cleanly).
/// `hold` (a concurrency permit) is kept until the producer ends.
pub fn stream_backup<H: Send + 'static>(
    header: Header,
    groups: Vec<GroupCapture>,
    stop: CancellationToken,
    hold: H,
) -> (
    impl futures_util::Stream<Item = Piece> + Send + 'static,
    impl Future<Output = ()> + Send + 'static,
) {
    let (tx, rx) = mpsc::channel::<Piece>(STREAM_QUEUE_CHUNKS);
    let errors = tx.clone();
    // Set once the whole backup is queued: a channel that closes without
    // it (the error could not be queued to a stalled reader) still ends
    // the stream with an error.
    let whole = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let whole_set = Arc::clone(&whole);
    let applied = groups.first().and_then(|g| g.capture.last_applied());
    let producer = async move {
        let encode = tokio::task::spawn_blocking(move || {
            let sink = ChannelSink {
                tx,
                buf: Vec::with_capacity(STREAM_CHUNK_BYTES),
                rt: tokio::runtime::Handle::current(),
                stop,
            };
            write_backup(sink, &header, &groups).map(|(_, hash, len)| (hash, len))
        });
        let result = match encode.await {
            Ok(r) => r,
            Err(e) => Err(BackupError::Interrupted(format!("the encoder failed: {e}"))),
        };
        let metrics = crate::metrics::global();
        match result {
            Ok((hash, bytes)) => {
                whole_set.store(true, std::sync::atomic::Ordering::Release);
                metrics.backups.with_label_values(&["ok"]).inc();
                metrics.backup_bytes.inc_by(bytes);
                tracing::info!(?applied, bytes, sha256 = %hex(&hash), "backup streamed");
            }
            Err(e) => {
                let outcome = match e {
                    BackupError::Interrupted(_) => "interrupted",
                    _ => "failed",
                };
                metrics.backups.with_label_values(&[outcome]).inc();
                tracing::warn!(?applied, error = %e, "backup stream stopped");
                // Ends the body with an error; a reader that is gone or
                // stalled does not hold the producer up.
                let _ = tokio::time::timeout(Duration::from_secs(1), errors.send(Err(e))).await;
            }
        }
        drop(hold);
    };
    let stream = futures_util::stream::unfold(Some(rx), move |rx| {
        let whole = Arc::clone(&whole);
        async move {
            let mut rx = rx?;
            match rx.recv().await {
                // An error is the last item.
                Some(Err(e)) => Some((Err(e), None)),
                Some(piece) => Some((piece, Some(rx))),
                None if whole.load(std::sync::atomic::Ordering::Acquire) => None,
                None => Some((
                    Err(BackupError::Interrupted(
                        "the backup stopped before its end".into(),
                    )),
                    None,
                )),
            }
        }
    });
    (stream, producer)
}

/// `std::io::Write` into the stream's channel, in [`STREAM_CHUNK_BYTES`]
/// pieces; runs on a blocking thread.
struct ChannelSink {
    tx: mpsc::Sender<Piece>,
    buf: Vec<u8>,
    rt: tokio::runtime::Handle,
    stop: CancellationToken,
}

impl ChannelSink {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(STREAM_CHUNK_BYTES),
        ));
        let (tx, stop) = (&self.tx, &self.stop);
        let sent = self.rt.block_on(async {
            tokio::select! {
                () = stop.cancelled() => Err("the node is shutting down".to_owned()),
                r = tokio::time::timeout(STREAM_STALL, tx.send(Ok(piece))) => match r {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(_)) => Err("the client went away".to_owned()),
                    Err(_) => Err(format!("the client took nothing for {STREAM_STALL:?}")),
                },
            }
        });
        sent.map_err(|why| BackupError::Interrupted(why).into_io())
    }
}

impl Write for ChannelSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(STREAM_CHUNK_BYTES - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == STREAM_CHUNK_BYTES {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

#[cfg(test)]
mod tests;
