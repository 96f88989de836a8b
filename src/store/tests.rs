//! Corruption: stored bytes that fail their checksum or do not decode become
//! errors, never panics; a store that lost acknowledged writes is refused.

use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, RaftLogReader, Vote};

use super::{Store, StoreError, db};
use crate::raft::TypeConfig;

/// How long a reopen waits for a dropped handle to release sled's lock.
const WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn blank(index: u64) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 0), index),
        payload: EntryPayload::Blank,
    }
}

#[tokio::test]
async fn corrupt_log_entry_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _sm) = Store::open(dir.path()).unwrap();
    log.blocking_append((1..=3).map(blank)).await.unwrap();

    log.db.overwrite_entry(2, b"\x01garbage").unwrap();
    let err = log.try_get_log_entries(1..=3).await.unwrap_err();
    assert!(err.to_string().contains("corrupt log entry 2"), "{err}");
    assert!(log.try_get_log_entries(1..2).await.is_ok());

    // the last entry is read by get_log_state
    log.db.overwrite_entry(3, b"").unwrap();
    let err = log.get_log_state().await.unwrap_err();
    assert!(err.to_string().contains("log entry 3"), "{err}");
}

#[tokio::test]
async fn entry_under_the_wrong_index_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _sm) = Store::open(dir.path()).unwrap();
    let moved = crate::codec::encode(&blank(7)).unwrap();
    log.db.overwrite_entry_checksummed(1, &moved).unwrap();
    let err = log.try_get_log_entries(..).await.unwrap_err();
    assert!(err.to_string().contains("stored under index 1"), "{err}");
    // without a matching checksum it is caught earlier
    log.db.overwrite_entry(1, &moved).unwrap();
    let err = log.try_get_log_entries(..).await.unwrap_err();
    assert!(err.to_string().contains("bad checksum"), "{err}");
}

#[tokio::test]
async fn bytes_with_a_good_checksum_that_do_not_decode_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _sm) = Store::open(dir.path()).unwrap();
    log.blocking_append([blank(1)]).await.unwrap();
    log.db
        .overwrite_entry_checksummed(1, b"\xffgarbage")
        .unwrap();
    let err = log.try_get_log_entries(..).await.unwrap_err();
    assert!(
        err.to_string().contains("unsupported encoding version 255"),
        "{err}"
    );
}

/// A store with entries 1..=10 appended and vote T3 saved, closed again.
async fn acknowledged_store(dir: &std::path::Path) {
    let (mut log, _sm) = Store::open(dir).unwrap();
    log.save_vote(&Vote::new_committed(3, 0)).await.unwrap();
    log.blocking_append((1..=10).map(blank)).await.unwrap();
}

/// Changes the closed store in `dir` behind the watermark's back, the way
/// a disk that loses fsynced writes would.
fn tamper(dir: &std::path::Path, f: impl FnOnce(&db::Db)) {
    let db = super::while_locked(WAIT, || db::Db::open(dir)).unwrap();
    f(&db);
    db.flush_blocking().unwrap();
}

fn refused(dir: &std::path::Path) -> String {
    let err = Store::open_waiting(dir, WAIT).unwrap_err();
    assert!(matches!(err, StoreError::LostWrites(_)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("godel cluster leave"),
        "names the recovery: {msg}"
    );
    msg
}

#[tokio::test]
async fn a_log_shorter_than_acknowledged_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    acknowledged_store(dir.path()).await;
    tamper(dir.path(), |db| db.remove_entries(8..).unwrap());
    let msg = refused(dir.path());
    assert!(
        msg.contains("the log ends at index 7") && msg.contains("up to T1-N0-10"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_vote_older_than_saved_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    acknowledged_store(dir.path()).await;
    tamper(dir.path(), |db| db.set_vote(&Vote::new(2, 1)).unwrap());
    let msg = refused(dir.path());
    assert!(msg.contains("the stored vote is"), "{msg}");
}

#[tokio::test]
async fn a_damaged_or_missing_entry_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    acknowledged_store(dir.path()).await;
    tamper(dir.path(), |db| db.overwrite_entry(4, b"\x02torn").unwrap());
    let msg = refused(dir.path());
    assert!(msg.contains("corrupt log entry 4: bad checksum"), "{msg}");

    tamper(dir.path(), |db| db.remove_entries(4..=4).unwrap());
    let msg = refused(dir.path());
    assert!(msg.contains("entry 5 follows entry 3"), "{msg}");
}

#[tokio::test]
async fn truncation_and_restart_are_not_mistaken_for_loss() {
    let dir = tempfile::tempdir().unwrap();
    acknowledged_store(dir.path()).await;
    {
        let (mut log, _sm) = Store::open_waiting(dir.path(), WAIT).unwrap();
        log.truncate(blank(6).log_id).await.unwrap();
    }
    {
        let (mut log, _sm) = Store::open_waiting(dir.path(), WAIT).unwrap();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(blank(5).log_id));
        let later = |i| Entry {
            log_id: LogId::new(CommittedLeaderId::new(2, 0), i),
            ..blank(i)
        };
        log.blocking_append((6..=7).map(later)).await.unwrap();
    }
    // Entries written but not yet covered by the watermark (a crash between
    // the flush and the watermark write) are taken in at open.
    tamper(dir.path(), |db| {
        db.append([Entry {
            log_id: LogId::new(CommittedLeaderId::new(2, 0), 8),
            ..blank(8)
        }])
        .unwrap();
    });
    let (mut log, _sm) = Store::open_waiting(dir.path(), WAIT).unwrap();
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id.map(|l| l.index), Some(8));
    drop((log, _sm));
    tamper(dir.path(), |db| db.remove_entries(8..).unwrap());
    refused(dir.path());
}

#[tokio::test]
async fn an_old_layout_and_a_missing_watermark_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    tamper(dir.path(), |db| db.overwrite_entry(1, b"old").unwrap());
    let err = Store::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::Layout(_)), "{err:?}");
    assert!(err.to_string().contains("no layout version"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    acknowledged_store(dir.path()).await;
    std::fs::remove_file(dir.path().join(super::watermark::FILE_NAME)).unwrap();
    let msg = refused(dir.path());
    assert!(msg.contains("watermark file"), "{msg}");
}

/// Builds and stores a snapshot of what `sm` has applied.
async fn build_snapshot(sm: &mut super::StateMachine) {
    let mut builder = sm.get_snapshot_builder().await;
    openraft::RaftSnapshotBuilder::build_snapshot(&mut builder)
        .await
        .unwrap();
}

#[tokio::test]
async fn corrupt_snapshot_fails_open_and_reads() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (_log, mut sm) = Store::open(dir.path()).unwrap();
        sm.apply([blank(1)]).await.unwrap();
        build_snapshot(&mut sm).await;
        sm.db.overwrite_snapshot_data(b"\x01\xff\xff").unwrap();
        // reading it back is fine (bytes are opaque here) ...
        assert!(sm.get_current_snapshot().await.unwrap().is_some());
    }
    // ... restoring from it is not
    let err = Store::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("corrupt snapshot"), "{err}");
}

/// The snapshot payload files in `dir`'s store.
fn snapshot_files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("godel-snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A new snapshot's file replaces the last one's (deleted once the new
/// metadata is durable); files the stored metadata does not name, left by
/// a crash, are removed at the next open, and the state restores from the
/// one it names.
#[tokio::test]
async fn snapshot_files_are_replaced_and_strays_removed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (_log, mut sm) = Store::open(dir.path()).unwrap();
        for i in 1..=2 {
            sm.apply([blank(i)]).await.unwrap();
            build_snapshot(&mut sm).await;
            let files = snapshot_files(dir.path());
            assert!(files.len() == 1 && files[0].ends_with(".snap"), "{files:?}");
        }
    }
    let kept = snapshot_files(dir.path());
    for stray in ["g0-00000000000000aa.tmp", "g0-00000000000000bb.snap"] {
        std::fs::write(dir.path().join("godel-snapshots").join(stray), b"x").unwrap();
    }
    // Another group's file is not this group's to remove.
    std::fs::write(
        dir.path().join("godel-snapshots/g1-00000000000000cc.snap"),
        b"x",
    )
    .unwrap();
    let (_log, mut sm) = Store::open_waiting(dir.path(), WAIT).unwrap();
    let mut expected = kept.clone();
    expected.insert(0, "g1-00000000000000cc.snap".into());
    expected.sort();
    assert_eq!(snapshot_files(dir.path()), expected);
    let (last, _) = sm.applied_state().await.unwrap();
    assert_eq!(last.map(|l| l.index), Some(2));
}

/// Stored metadata whose payload file is gone: the store is refused,
/// naming the file.
#[tokio::test]
async fn a_missing_snapshot_file_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (_log, mut sm) = Store::open(dir.path()).unwrap();
        sm.apply([blank(1)]).await.unwrap();
        build_snapshot(&mut sm).await;
    }
    for name in snapshot_files(dir.path()) {
        std::fs::remove_file(dir.path().join("godel-snapshots").join(name)).unwrap();
    }
    let err = Store::open_waiting(dir.path(), WAIT)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("open snapshot") && err.contains(".snap"),
        "{err}"
    );
}

/// An audit chain in a stored snapshot: verified offline, and one flipped
/// byte of one stored entry is named by its seq.
#[tokio::test]
async fn offline_audit_verify_names_the_tampered_entry() {
    use crate::fsm::{AuditCaller, AuditRecord, Batch, Command, Request};
    let dir = tempfile::tempdir().unwrap();
    let record = |i: u64| {
        Command::Audit(AuditRecord {
            caller: AuditCaller {
                actor: format!("key:k{i}-marker").into(),
                tenant: "acme".into(),
                action: "tasks.submit".into(),
            },
            target: Some(crate::fsm::AuditTarget::Task(i)),
            outcome: "ok".into(),
        })
    };
    let normal = |index: u64, commands| Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 0), index),
        payload: EntryPayload::Normal(Request::Batch(Batch::unaudited(
            1000 + index,
            index,
            commands,
        ))),
    };
    {
        let (mut log, mut sm) = Store::open(dir.path()).unwrap();
        let first = normal(1, (1..=5).map(record).collect());
        let second = normal(2, (6..=7).map(record).collect());
        log.blocking_append([first.clone(), second.clone()])
            .await
            .unwrap();
        log.save_committed(Some(second.log_id)).await.unwrap();
        sm.apply([first]).await.unwrap();
        build_snapshot(&mut sm).await;
    }
    let state = super::offline_state(dir.path()).unwrap();
    let log = state.audit();
    assert_eq!(
        log.last_seq(),
        7,
        "snapshot (5) plus the committed entry (2)"
    );
    assert_eq!(
        crate::fsm::verify_audit_chain(log.anchor(), log.entries()),
        Ok(7)
    );

    // Flip one byte of entry 3's actor in the stored snapshot.
    {
        let (_log, sm) = Store::open_waiting(dir.path(), WAIT).unwrap();
        let (_, mut data) = sm.db.snapshot().unwrap().unwrap();
        let needle = b"key:k3-marker";
        let at = data
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("entry 3 is in the snapshot");
        data[at + 4] ^= 0x20;
        sm.db.overwrite_snapshot_data(&data).unwrap();
    }
    let state = super::offline_state(dir.path()).unwrap();
    let err = crate::fsm::verify_audit_chain(state.audit().anchor(), state.audit().entries())
        .unwrap_err();
    assert_eq!(err.seq, 3, "{err}");
}

/// Opens groups 0 and 3 of the store in `dir` (waiting for a dropped
/// handle's lock), in that order.
fn two_groups(
    dir: &std::path::Path,
) -> Result<Vec<(crate::raft::GroupId, super::LogStore, super::StateMachine)>, StoreError> {
    super::while_locked(WAIT, || Store::open_groups(dir, &[0, 3]))
}

#[tokio::test]
async fn groups_share_one_database_and_keep_apart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut groups = two_groups(dir.path()).unwrap();
        let (g, log, _) = &mut groups[1];
        assert_eq!(*g, 3);
        log.save_vote(&Vote::new_committed(4, 2)).await.unwrap();
        log.blocking_append((1..=5).map(blank)).await.unwrap();
        let (g, meta, _) = &mut groups[0];
        assert_eq!(*g, 0);
        meta.blocking_append([blank(1)]).await.unwrap();
    }
    for name in ["godel-watermark", "godel-watermark-g3"] {
        assert!(dir.path().join(name).exists(), "{name}");
    }
    let mut groups = two_groups(dir.path()).unwrap();
    let (_, log, _) = &mut groups[1];
    assert_eq!(
        log.read_vote().await.unwrap(),
        Some(Vote::new_committed(4, 2))
    );
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id.map(|l| l.index), Some(5));
    let (_, meta, _) = &mut groups[0];
    assert_eq!(meta.read_vote().await.unwrap(), None);
    let state = meta.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id.map(|l| l.index), Some(1));
    assert_eq!(meta.try_get_log_entries(..).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_group_that_lost_writes_is_refused_and_the_others_still_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut groups = two_groups(dir.path()).unwrap();
        groups[1]
            .1
            .blocking_append((1..=6).map(blank))
            .await
            .unwrap();
        groups[0]
            .1
            .blocking_append((1..=2).map(blank))
            .await
            .unwrap();
    }
    tamper(dir.path(), |db| {
        db.group(3).unwrap().remove_entries(5..).unwrap();
    });
    let err = two_groups(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::LostWrites(_)), "{err:?}");
    assert!(err.to_string().contains("the log ends at index 4"), "{err}");
    // The meta group lost nothing and opens on its own.
    let (log, _) = Store::open_waiting(dir.path(), WAIT).unwrap();
    drop(log);
}
