//! The stream a node serves: whole when read to the end, and when its
//! reader goes away or the node shuts down, the producer stops (releasing
//! what it holds) and the stream's last item is the error.

use futures_util::StreamExt;
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};

use super::*;
use crate::backup::verify;
use crate::fsm::{Batch, Request, SubmitTask, Tenant};
use crate::raft::TypeConfig;
use crate::store::Store;

/// A state machine holding `tasks` tasks of about 100 KiB each, and its
/// store's halves (the read handle reads payloads while they are open).
async fn state_of(
    dir: &std::path::Path,
    tasks: u64,
) -> (
    SharedState,
    (crate::store::LogStore, crate::store::StateMachine),
) {
    let (log, mut sm) = Store::open(dir).unwrap();
    let pad = "p".repeat(100 * 1024);
    let entries: Vec<Entry<TypeConfig>> = (1..=tasks)
        .map(|i| Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), i),
            payload: EntryPayload::Normal(Request::Batch(Batch::unaudited(
                1_000 + i,
                i,
                vec![crate::fsm::Command::Submit(SubmitTask {
                    tenant: Tenant("acme".into()),
                    payload: format!(r#"{{"i":{i},"pad":"{pad}"}}"#),
                    ..Default::default()
                })],
            ))),
        })
        .collect();
    sm.apply(entries).await.unwrap();
    (sm.shared(), (log, sm))
}

fn start(
    sm: &SharedState,
    stop: CancellationToken,
) -> (
    impl futures_util::Stream<Item = Piece> + Send + 'static,
    impl Future<Output = ()> + Send + 'static,
    tokio::sync::oneshot::Receiver<()>,
) {
    let groups = vec![capture_group(0, "meta", sm)];
    let header = Header::new(ClusterInfo::default(), &groups);
    // Dropped when the producer ends: the receiver then sees it closed.
    let (held, released) = tokio::sync::oneshot::channel::<()>();
    let (stream, producer) = stream_backup(header, groups, stop, held);
    (stream, producer, released)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_read_to_the_end_is_a_whole_backup() {
    let dir = tempfile::tempdir().unwrap();
    let (sm, _log) = state_of(dir.path(), 30).await;
    let (stream, producer, released) = start(&sm, CancellationToken::new());
    let producer = tokio::spawn(producer);
    let pieces: Vec<Piece> = stream.collect().await;
    assert!(
        pieces.len() > STREAM_QUEUE_CHUNKS,
        "{} pieces",
        pieces.len()
    );
    let bytes: Vec<u8> = pieces
        .into_iter()
        .flat_map(|p| p.unwrap().to_vec())
        .collect();
    producer.await.unwrap();
    assert!(released.await.is_err(), "the hold is released");
    let v = verify(&bytes[..]).unwrap();
    assert_eq!(v.sections[0].meta.summary.tasks, 30);
    assert_eq!(v.sections[0].meta.applied.index, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_goes_away_stops_the_producer() {
    let dir = tempfile::tempdir().unwrap();
    let (sm, _log) = state_of(dir.path(), 30).await;
    let (stream, producer, released) = start(&sm, CancellationToken::new());
    let producer = tokio::spawn(producer);
    let mut stream = Box::pin(stream);
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.len(), STREAM_CHUNK_BYTES);
    drop(stream);
    tokio::time::timeout(Duration::from_secs(10), producer)
        .await
        .expect("the producer stops")
        .unwrap();
    assert!(released.await.is_err(), "the hold is released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_the_stream_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (sm, _log) = state_of(dir.path(), 30).await;
    let stop = CancellationToken::new();
    let (stream, producer, _released) = start(&sm, stop.clone());
    let producer = tokio::spawn(producer);
    let mut stream = Box::pin(stream);
    assert!(stream.next().await.unwrap().is_ok());
    stop.cancel();
    let mut last = None;
    while let Some(piece) = stream.next().await {
        last = Some(piece);
    }
    let err = last.expect("pieces").unwrap_err();
    assert!(
        matches!(&err, BackupError::Interrupted(why) if why.contains("shutting down")),
        "{err}"
    );
    producer.await.unwrap();
}

/// A stop while the reader takes nothing: the producer cannot queue its
/// error (the channel is full) and ends; the stream still ends with an
/// error after the queued pieces, never cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_error_could_not_be_queued_still_ends_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (sm, _log) = state_of(dir.path(), 30).await;
    let stop = CancellationToken::new();
    let (stream, producer, _released) = start(&sm, stop.clone());
    let producer = tokio::spawn(producer);
    let mut stream = Box::pin(stream);
    assert!(stream.next().await.unwrap().is_ok());
    // Let the producer fill the queue (a few pieces of a 3 MB state; 2 s
    // leaves room for a loaded machine), then stop it while nobody reads.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), producer)
        .await
        .expect("the producer stops")
        .unwrap();
    let mut pieces = Vec::new();
    while let Some(piece) = stream.next().await {
        pieces.push(piece);
    }
    assert_eq!(
        pieces.len(),
        super::STREAM_QUEUE_CHUNKS + 1,
        "the queued pieces, then the end"
    );
    assert!(
        pieces[..super::STREAM_QUEUE_CHUNKS]
            .iter()
            .all(Result::is_ok)
    );
    let err = pieces.pop().unwrap().unwrap_err();
    assert!(
        matches!(&err, BackupError::Interrupted(why) if why.contains("stopped before its end")),
        "{err}"
    );
}
