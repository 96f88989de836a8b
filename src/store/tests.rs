//! Corruption: stored bytes that do not decode become errors, never panics.

use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, RaftLogReader};

use super::Store;
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
    log.db.overwrite_entry(1, &moved).unwrap();
    let err = log.try_get_log_entries(..).await.unwrap_err();
    assert!(err.to_string().contains("stored under index 1"), "{err}");
}

#[tokio::test]
async fn corrupt_snapshot_fails_open_and_reads() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (_log, mut sm) = Store::open(dir.path()).unwrap();
        sm.apply([blank(1)]).await.unwrap();
        let mut builder = sm.get_snapshot_builder().await;
        openraft::RaftSnapshotBuilder::build_snapshot(&mut builder)
            .await
            .unwrap();
        sm.db.overwrite_snapshot_data(b"\x01\xff\xff").unwrap();
        // reading it back is fine (bytes are opaque here) ...
        assert!(sm.get_current_snapshot().await.unwrap().is_some());
    }
    // ... restoring from it is not
    let err = Store::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("corrupt snapshot"), "{err}");
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
        let mut builder = sm.get_snapshot_builder().await;
        openraft::RaftSnapshotBuilder::build_snapshot(&mut builder)
            .await
            .unwrap();
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
