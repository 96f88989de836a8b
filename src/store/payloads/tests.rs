//! Task payloads kept in the store: written as entries apply, read back
//! after a restart and from an installed snapshot, deleted only once a
//! stored snapshot no longer names their task and no copy is pinned, and
//! a snapshot's payload section checked as it is read.

use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, RaftSnapshotBuilder};

use super::*;
use crate::fsm::{Batch, Command, Payload, Reply, Request, SessionKey, SubmitTask, Tenant};
use crate::raft::TypeConfig;
use crate::store::db::{Meta, Replace};
use crate::store::{StateMachine, Store};

const WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn entry(index: u64, commands: Vec<Command>) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Request::Batch(Batch::unaudited(
            1_000 + index,
            index,
            commands,
        ))),
    }
}

fn submit(n: u64, session: bool) -> Command {
    Command::Submit(SubmitTask {
        tenant: Tenant("acme".into()),
        payload: text(n),
        session_key: session.then(|| SessionKey(format!("s{n}"))),
        ..Default::default()
    })
}

fn text(n: u64) -> String {
    format!(r#"{{"n":{n},"pad":"{}"}}"#, "x".repeat(40))
}

/// Cancels task `n`.
fn cancel(n: u64) -> Command {
    Command::Cancel {
        id: TaskId(n),
        reason: None,
        keep_children: false,
    }
}

/// Forgets every finished task (up to 10).
fn purge() -> Command {
    Command::Purge {
        finished_before_ms: u64::MAX,
        keep: 0,
        max: 10,
        dead_before_ms: 0,
    }
}

/// Task `n`'s payload as this state machine's readers get it.
fn read(sm: &StateMachine, n: u64) -> String {
    let shared = sm.shared();
    let task = shared.read(|s| s.task_shared(TaskId(n))).expect("the task");
    shared.payload(&task).expect("its payload").to_string()
}

async fn build(sm: &mut StateMachine) {
    let mut builder = sm.get_snapshot_builder().await;
    builder.build_snapshot().await.unwrap();
}

#[tokio::test]
async fn applied_payloads_are_stored_and_read_back_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (_log, mut sm) = Store::open(dir.path()).unwrap();
        let responses = sm
            .apply([entry(1, vec![submit(1, false), submit(2, true)])])
            .await
            .unwrap();
        sm.shared().read(|s| {
            assert_eq!(s.task(TaskId(1)).unwrap().payload, Payload::Stored);
            // A session's task quotes its prompt at apply: it keeps it.
            assert_eq!(s.task(TaskId(2)).unwrap().payload, Payload::from(text(2)));
        });
        assert_eq!(sm.db.payload(1).unwrap().as_deref(), Some(text(1).as_str()));
        assert_eq!(sm.db.payload(2).unwrap(), None);
        assert_eq!((read(&sm, 1), read(&sm, 2)), (text(1), text(2)));
        // A reply carries the payload, read from the store, to hold.
        let mut outcomes = responses[0].outcomes.clone();
        let stored = |o: &fsm::Outcome| match o {
            Ok(Reply::Submitted { task, .. }) => task.payload.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(stored(&outcomes[0]), Payload::Stored);
        sm.shared().hold_reply_payloads(&mut outcomes);
        assert_eq!(stored(&outcomes[0]), Payload::from(text(1)));
        assert_eq!(stored(&outcomes[1]), Payload::from(text(2)));
        // The state's own copy is untouched.
        sm.shared()
            .read(|s| assert_eq!(s.task(TaskId(1)).unwrap().payload, Payload::Stored));
        build(&mut sm).await;
        // Applied after the snapshot: only the log has it at a restart.
        sm.apply([entry(2, vec![submit(3, false)])]).await.unwrap();
    }
    let (_log, mut sm) = Store::open_waiting(dir.path(), WAIT).unwrap();
    assert_eq!(
        sm.shared().last_applied().map(|l| l.index),
        Some(1),
        "restored from the snapshot; the log replays the rest"
    );
    assert_eq!((read(&sm, 1), read(&sm, 2)), (text(1), text(2)));
    // Entry 2 applied again, as the log replays it: its payload was
    // stored the first time (the mark says so), and reads back.
    assert_eq!(sm.db.payloads_through().unwrap(), 2);
    sm.apply([entry(2, vec![submit(3, false)])]).await.unwrap();
    assert_eq!(read(&sm, 3), text(3));
    // A new entry's payloads are stored, and the mark moves with them.
    sm.apply([entry(3, vec![submit(4, false)])]).await.unwrap();
    assert_eq!(
        (read(&sm, 4), sm.db.payloads_through().unwrap()),
        (text(4), 3)
    );
}

#[tokio::test]
async fn an_installed_snapshot_brings_its_payloads() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (_log, mut leader) = Store::open(a.path()).unwrap();
    leader
        .apply([entry(1, (1..=50).map(|n| submit(n, n == 7)).collect())])
        .await
        .unwrap();
    build(&mut leader).await;
    let snapshot = leader.get_current_snapshot().await.unwrap().unwrap();
    {
        let follower = install_into(b.path(), snapshot).await;
        for n in 1..=50 {
            assert_eq!(read(&follower, n), text(n));
        }
        assert_eq!(follower.db.payload(7).unwrap(), None, "held in the state");
    }
    let (_log, follower) = Store::open_waiting(b.path(), WAIT).unwrap();
    for n in [1, 7, 50] {
        assert_eq!(read(&follower, n), text(n));
    }
}

#[tokio::test]
async fn a_forgotten_task_s_payload_goes_after_the_next_snapshot_unless_a_copy_is_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = Store::open(dir.path()).unwrap();
    sm.apply([entry(1, (1..=3).map(|n| submit(n, false)).collect())])
        .await
        .unwrap();
    // A copy of the state while task 2 is still there.
    let capture = sm.shared().capture();
    sm.apply([entry(2, vec![cancel(2)]), entry(3, vec![purge()])])
        .await
        .unwrap();
    assert!(sm.shared().read(|s| s.task(TaskId(2)).is_none()));
    assert!(sm.db.payload(2).unwrap().is_some(), "not before a snapshot");
    build(&mut sm).await;
    assert!(
        sm.db.payload(2).unwrap().is_some(),
        "the copy still names it"
    );
    let mut out = Vec::new();
    capture.write_payload(&mut out).unwrap();
    let restored = crate::store::Restored::read_payload(&mut &out[..]).unwrap();
    assert_eq!(
        restored.state().task(TaskId(2)).unwrap().payload,
        Payload::from(text(2))
    );
    drop(capture);
    build(&mut sm).await;
    assert_eq!(sm.db.payload(2).unwrap(), None);
    assert_eq!((read(&sm, 1), read(&sm, 3)), (text(1), text(3)));
}

#[tokio::test]
async fn a_payload_section_that_does_not_match_its_state_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = Store::open(dir.path()).unwrap();
    sm.apply([entry(1, (1..=3).map(|n| submit(n, false)).collect())])
        .await
        .unwrap();
    let shared = sm.shared();
    let state = shared.read(|s| s.clone());
    let mut section = Vec::new();
    write_section(Some(&sm.db), &state, &mut section).unwrap();
    let mut read = Vec::new();
    read_section(&mut &section[..], &state, |id, text| {
        read.push((id.0, text.to_string()));
        Ok(())
    })
    .unwrap();
    assert_eq!(read, (1..=3).map(|n| (n, text(n))).collect::<Vec<_>>());
    let refused = |bytes: &[u8]| {
        read_section(&mut &bytes[..], &state, |_, _| Ok(()))
            .unwrap_err()
            .to_string()
    };
    // Task 3's record names task 9: the state has no task 9.
    let third = section.len() - 1 - (1 + 8 + 4 + text(3).len());
    let mut unknown = section.clone();
    unknown[third + 1..third + 9].copy_from_slice(&9u64.to_le_bytes());
    assert!(refused(&unknown).contains("task 9 has no stored payload"));
    // Task 3's record missing.
    let mut short = section[..third].to_vec();
    short.push(0);
    assert!(refused(&short).contains("2 payloads for 3 tasks"));
    // Cut off in the middle.
    assert!(refused(&section[..third + 5]).contains("read task payloads"));
    // Without a store, a state that does not hold its payloads has none to
    // write.
    let err = write_section(None, &state, &mut Vec::new()).unwrap_err();
    assert!(
        err.to_string().contains("is stored but not in the store"),
        "{err}"
    );
}

/// The snapshot files in store `dir`.
fn snapshot_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir.join("godel-snapshots"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".snap")
        })
        .count()
}

/// Sends `snapshot` to a new store in `dir` and returns its state machine.
async fn install_into(
    dir: &std::path::Path,
    snapshot: openraft::storage::Snapshot<TypeConfig>,
) -> StateMachine {
    let mut bytes = Vec::new();
    let mut file = snapshot.snapshot.into_std().await;
    std::io::Read::read_to_end(&mut file, &mut bytes).unwrap();
    let (_log, mut follower) = Store::open(dir).unwrap();
    let mut receiving = follower.begin_receiving_snapshot().await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut *receiving, &bytes)
        .await
        .unwrap();
    follower
        .install_snapshot(&snapshot.meta, receiving)
        .await
        .unwrap();
    follower
}

#[tokio::test]
async fn a_snapshot_stored_before_its_payloads_is_restored_from_and_the_last_whole_one_sent() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let at = |i: u64| Some(LogId::new(CommittedLeaderId::new(1, 1), i));
    let before = {
        let (_log, mut sm) = Store::open(dirs[0].path()).unwrap();
        sm.apply([entry(1, (1..=6).map(|n| submit(n, n == 5)).collect())])
            .await
            .unwrap();
        build(&mut sm).await;
        assert!(!sm.db.snapshot_unsent().unwrap());
        sm.apply([entry(2, (7..=9).map(|n| submit(n, false)).collect())])
            .await
            .unwrap();
        // A build that stopped once the state was stored, as a node killed
        // while it writes the payloads.
        let view = sm.shared().read_guard().clone();
        let meta = Meta {
            last_log_id: view.last_applied,
            last_membership: view.last_membership.clone(),
            snapshot_id: "T1-N1-2".into(),
        };
        let tmp = sm
            .db
            .write_snapshot_file(|out| {
                crate::codec::encode_to_writer(&view, out).map_err(|source| StoreError::Encode {
                    what: "test snapshot".into(),
                    source,
                })
            })
            .unwrap();
        sm.db.flush_blocking().unwrap();
        let stored = sm
            .db
            .set_snapshot_file(&meta, &tmp, Replace::IfNotOlder, true);
        assert!(stored.unwrap().is_some());
        sm.db.flush_blocking().unwrap();
        sm.shared().state_with_payloads().unwrap()
    };
    // A restart restores the newer state; the last whole snapshot is sent.
    let (_log, mut sm) = Store::open_waiting(dirs[0].path(), WAIT).unwrap();
    assert_eq!(sm.shared().state_with_payloads().unwrap(), before);
    assert!(sm.db.snapshot_unsent().unwrap());
    assert_eq!(snapshot_files(dirs[0].path()), 2, "both kept at open");
    let sent = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(sent.meta.last_log_id, at(1));
    let follower = install_into(dirs[1].path(), sent).await;
    for n in 1..=6 {
        assert_eq!(read(&follower, n), text(n));
    }
    assert!(follower.shared().read(|s| s.task(TaskId(7)).is_none()));
    // The next build makes the newest whole, and the older files go.
    build(&mut sm).await;
    assert!(!sm.db.snapshot_unsent().unwrap());
    assert_eq!(snapshot_files(dirs[0].path()), 1);
    let sent = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(sent.meta.last_log_id, at(2));
    let follower = install_into(dirs[2].path(), sent).await;
    assert_eq!(follower.shared().state_with_payloads().unwrap(), before);
}

/// A build copies from the last one's file the payloads it wrote, reads
/// only newer ones from the tree, and deletes what no task names any more,
/// among both.
#[tokio::test]
async fn a_build_copies_the_last_snapshot_s_payloads_and_reads_only_newer_ones() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (_log, mut sm) = Store::open(dirs[0].path()).unwrap();
    sm.apply([entry(1, (1..=5).map(|n| submit(n, false)).collect())])
        .await
        .unwrap();
    build(&mut sm).await;
    // Task 2 goes; 6 to 8 come, and 7 goes before the next build.
    sm.apply([
        entry(2, vec![cancel(2), purge()]),
        entry(3, (6..=8).map(|n| submit(n, false)).collect()),
        entry(4, vec![cancel(7), purge()]),
    ])
    .await
    .unwrap();
    // Only the last snapshot's file has task 3's payload now: a build that
    // read every payload from the tree would fail.
    assert!(sm.db.remove_payloads(&[3]).unwrap());
    build(&mut sm).await;
    assert_eq!(sm.db.payload(2).unwrap(), None);
    assert_eq!(sm.db.payload(7).unwrap(), None);
    let sent = sm.get_current_snapshot().await.unwrap().unwrap();
    let follower = install_into(dirs[1].path(), sent).await;
    for n in [1, 3, 4, 5, 6, 8] {
        assert_eq!(read(&follower, n), text(n));
    }
    for n in [2, 7] {
        assert!(follower.shared().read(|s| s.task(TaskId(n)).is_none()));
    }
    // No task submitted since: everything comes from the last file.
    sm.apply([entry(5, vec![cancel(8), purge()])])
        .await
        .unwrap();
    build(&mut sm).await;
    assert_eq!(sm.db.payload(8).unwrap(), None);
    let sent = sm.get_current_snapshot().await.unwrap().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let follower = install_into(dir.path(), sent).await;
    for n in [1, 3, 4, 5, 6] {
        assert_eq!(read(&follower, n), text(n));
    }
    assert!(follower.shared().read(|s| s.task(TaskId(8)).is_none()));
}

/// A last section that lacks a payload the state names, or cannot be
/// read, is not used: the build reads every payload from the tree instead.
#[tokio::test]
async fn a_build_reads_the_tree_when_the_last_snapshot_lacks_a_payload() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (_log, mut sm) = Store::open(dirs[0].path()).unwrap();
    sm.apply([entry(1, (1..=3).map(|n| submit(n, false)).collect())])
        .await
        .unwrap();
    build(&mut sm).await;
    sm.apply([entry(2, (4..=5).map(|n| submit(n, false)).collect())])
        .await
        .unwrap();
    // As if it covered tasks 4 and 5 too.
    sm.last_section
        .lock()
        .unwrap()
        .as_mut()
        .expect("the last build's section")
        .last_task_id = 5;
    build(&mut sm).await;
    let sent = sm.get_current_snapshot().await.unwrap().unwrap();
    let follower = install_into(dirs[1].path(), sent).await;
    for n in 1..=5 {
        assert_eq!(read(&follower, n), text(n));
    }
    // A last section that cannot be read (its records looked for inside
    // the state): the same.
    sm.apply([entry(3, vec![submit(6, false)])]).await.unwrap();
    sm.last_section
        .lock()
        .unwrap()
        .as_mut()
        .expect("the last build's section")
        .start = 1;
    build(&mut sm).await;
    let sent = sm.get_current_snapshot().await.unwrap().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let follower = install_into(dir.path(), sent).await;
    for n in 1..=6 {
        assert_eq!(read(&follower, n), text(n));
    }
}
