//! Recovery: what a node finds after closing and reopening its store, and how
//! the state machine is rebuilt from the stored snapshot plus the log.

use std::collections::{BTreeMap, BTreeSet};

use godel::fsm::{self, Batch, Command, EventKind, Request, SubmitTask, Tenant, What};
use godel::raft::{NodeInfo, TypeConfig};
use godel::store::{EVENT_CHANNEL_CAPACITY, LogStore, StateMachine, Store};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::{
    CommittedLeaderId, Entry, EntryPayload, LogId, LogState, Membership, RaftLogReader,
    RaftSnapshotBuilder, StorageHelper, Vote,
};
use tokio::sync::broadcast::error::TryRecvError;

type E = Entry<TypeConfig>;

fn log_id(term: u64, index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

/// A batch of `n` real task submissions.
fn submits(index: u64, n: u32) -> Request {
    let commands = (0..n)
        .map(|i| {
            Command::Submit(SubmitTask {
                tenant: Tenant::from("acme"),
                payload: format!("{{\"entry\":{index},\"n\":{i}}}"),
                ..SubmitTask::default()
            })
        })
        .collect();
    Request::Batch(Batch::unaudited(1_700_000_000_000 + index, index, commands))
}

fn normal(index: u64, n: u32) -> E {
    E {
        log_id: log_id(1, index),
        payload: EntryPayload::Normal(submits(index, n)),
    }
}

fn membership(index: u64) -> E {
    let node = NodeInfo {
        raft_addr: "127.0.0.1:7001".into(),
        api_addr: "127.0.0.1:8001".into(),
        region: "eu".into(),
    };
    E {
        log_id: log_id(1, index),
        payload: EntryPayload::Membership(Membership::new(
            vec![BTreeSet::from([1])],
            BTreeMap::from([(1, node)]),
        )),
    }
}

/// Entry 1 is a membership change, 2..=last each submit `index % 3 + 1` tasks.
fn history(last: u64) -> Vec<E> {
    std::iter::once(membership(1))
        .chain((2..=last).map(|i| normal(i, (i % 3 + 1) as u32)))
        .collect()
}

/// The state a node must reach: every request applied in order.
fn reference(entries: &[E]) -> fsm::State {
    let mut state = fsm::State::default();
    let mut members = openraft::Membership::default();
    for e in entries {
        match &e.payload {
            EntryPayload::Normal(req) => {
                state.apply(req);
            }
            // A new leader's first entry: its event is numbered too.
            EntryPayload::Blank => {
                let change = fsm::NodeChange::LeaderChanged {
                    term: e.log_id.leader_id.term,
                };
                state.raft_events(vec![(e.log_id.leader_id.node_id, change)]);
            }
            EntryPayload::Membership(m) => {
                state.raft_events(godel::store::membership_changes(&members, m));
                members = m.clone();
            }
        }
    }
    state
}

/// Opens the store, waiting (up to 5 s) while a dropped instance's sled
/// background thread still holds the file lock for a moment.
fn open(dir: &tempfile::TempDir) -> (LogStore, StateMachine) {
    Store::open_waiting(dir.path(), std::time::Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("open store: {e}"))
}

#[tokio::test]
async fn vote_log_and_committed_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let entries = history(5);
    let vote = Vote::new_committed(3, 1);
    {
        let (mut log, _sm) = open(&dir);
        log.save_vote(&vote).await.unwrap();
        log.blocking_append(entries[..2].to_vec()).await.unwrap();
        log.blocking_append(entries[2..].to_vec()).await.unwrap();
        log.save_committed(Some(log_id(1, 4))).await.unwrap();
    }
    let (mut log, _sm) = open(&dir);
    assert_eq!(log.read_vote().await.unwrap(), Some(vote));
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 4)));
    assert_eq!(
        log.get_log_state().await.unwrap(),
        LogState {
            last_purged_log_id: None,
            last_log_id: Some(log_id(1, 5)),
        }
    );
    assert_eq!(log.try_get_log_entries(..).await.unwrap(), entries);
    assert_eq!(log.try_get_log_entries(2..4).await.unwrap(), entries[1..3]);

    // a truncated suffix stays gone
    log.truncate(log_id(1, 4)).await.unwrap();
    drop((log, _sm)); // sled keeps its lock until every handle is gone
    let (mut log, _sm) = open(&dir);
    assert_eq!(
        log.get_log_state().await.unwrap().last_log_id,
        Some(log_id(1, 3))
    );
    assert_eq!(log.try_get_log_entries(..).await.unwrap(), entries[..3]);
}

/// The chaos `torn-tail` fault, in miniature: the last 4 KiB of sled's
/// data file (fsynced, acknowledged appends) cut off while the node is
/// down. sled itself recovers the shorter prefix without complaint; the
/// store must refuse it, naming what was lost and the way back.
#[tokio::test]
async fn a_data_file_that_lost_its_tail_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let entries = history(40);
    {
        let (mut log, _sm) = open(&dir);
        log.save_vote(&Vote::new_committed(1, 1)).await.unwrap();
        for e in &entries {
            log.blocking_append([e.clone()]).await.unwrap();
        }
    }
    let file = dir.path().join("db");
    let len = std::fs::metadata(&file).unwrap().len();
    assert!(len > 8192, "sled's data file holds the log: {len} bytes");
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.set_len(len - 4096).unwrap();
    drop(f);
    let Err(err) = Store::open_waiting(dir.path(), std::time::Duration::from_secs(5)) else {
        panic!("the cut went unnoticed");
    };
    let msg = err.to_string();
    assert!(
        msg.contains("but this node had acknowledged entries up to T1-N1-40"),
        "{msg}"
    );
    assert!(msg.contains("godel cluster leave"), "{msg}");
}

#[tokio::test]
async fn snapshot_purge_reopen_restores_state_and_replays_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let entries = history(11);
    {
        let (mut log, mut sm) = open(&dir);
        log.save_vote(&Vote::new_committed(1, 1)).await.unwrap();
        log.blocking_append(entries.clone()).await.unwrap();
        sm.apply(entries[..8].to_vec()).await.unwrap();
        let snap = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(snap.meta.last_log_id, Some(log_id(1, 8)));
        log.purge(log_id(1, 6)).await.unwrap();
        sm.apply(entries[8..].to_vec()).await.unwrap();
        log.save_committed(Some(log_id(1, 11))).await.unwrap();
        assert_eq!(
            sm.shared().state_with_payloads().unwrap(),
            reference(&entries)
        );
    }

    let (mut log, mut sm) = open(&dir);
    // the state machine comes back as the snapshot left it ...
    let (applied, members) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(1, 8)));
    assert_eq!(members.log_id(), &Some(log_id(1, 1)));
    assert_eq!(members.voter_ids().collect::<Vec<_>>(), vec![1]);
    assert_eq!(
        sm.shared().state_with_payloads().unwrap(),
        reference(&entries[..8])
    );
    assert!(sm.shared().read(|s| s.task_count()) > 0);
    // ... the log state is consistent with it ...
    assert_eq!(
        log.get_log_state().await.unwrap(),
        LogState {
            last_purged_log_id: Some(log_id(1, 6)),
            last_log_id: Some(log_id(1, 11)),
        }
    );
    assert_eq!(log.try_get_log_entries(..).await.unwrap(), entries[6..]);
    let current = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta.last_log_id, Some(log_id(1, 8)));

    // ... and openraft's start-up replays (8, committed] on top of it.
    StorageHelper::new(&mut log, &mut sm)
        .get_initial_state()
        .await
        .unwrap();
    assert_eq!(sm.shared().last_applied(), Some(log_id(1, 11)));
    assert_eq!(
        sm.shared().state_with_payloads().unwrap(),
        reference(&entries)
    );
}

#[tokio::test]
async fn open_refuses_a_log_purged_past_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, mut sm) = open(&dir);
        let entries = history(6);
        log.blocking_append(entries.clone()).await.unwrap();
        sm.apply(entries[..3].to_vec()).await.unwrap();
        sm.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        log.purge(log_id(1, 5)).await.unwrap();
    }
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let err = loop {
        let err = Store::open(dir.path()).unwrap_err();
        if !err.to_string().contains("could not acquire lock")
            || std::time::Instant::now() > give_up
        {
            break err;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(err.to_string().contains("purged"), "{err}");
}

#[tokio::test]
async fn builder_view_is_fixed_and_never_replaces_a_newer_snapshot() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let entries = history(6);
    let (_log_a, mut a) = open(&dir_a);
    let (_log_b, mut b) = open(&dir_b);

    a.apply(entries[..3].to_vec()).await.unwrap();
    let mut stale = a.get_snapshot_builder().await; // view at 3
    a.apply(entries[3..4].to_vec()).await.unwrap(); // applied after the view

    b.apply(entries.clone()).await.unwrap();
    let newer = b
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    let mut rx = a.subscribe();
    a.install_snapshot(&newer.meta, newer.snapshot)
        .await
        .unwrap();
    assert_eq!(
        a.shared().state_with_payloads().unwrap(),
        reference(&entries)
    );
    let installed = rx.try_recv().unwrap();
    assert!(installed.snapshot_installed && installed.index == 6);

    // the stale build describes exactly its view ...
    let old = stale.build_snapshot().await.unwrap();
    assert_eq!(old.meta.last_log_id, Some(log_id(1, 3)));
    let dir_c = tempfile::tempdir().unwrap();
    let (_log_c, mut c) = open(&dir_c);
    c.install_snapshot(&old.meta, old.snapshot).await.unwrap();
    assert_eq!(
        c.shared().state_with_payloads().unwrap(),
        reference(&entries[..3])
    );
    // ... but does not replace the newer stored snapshot
    let current = a.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, newer.meta);
    drop((_log_a, a, stale)); // the builder holds a handle too
    let (_log_a, mut a) = open(&dir_a);
    assert_eq!(a.applied_state().await.unwrap().0, Some(log_id(1, 6)));
}

#[tokio::test]
async fn applying_at_or_below_last_applied_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(&dir);
    let entries = history(3);
    sm.apply(entries.clone()).await.unwrap();
    let before = sm.shared().read(|s| s.clone());
    assert!(sm.apply([entries[2].clone()]).await.is_err());
    assert_eq!(sm.shared().read(|s| s.clone()), before);
}

#[tokio::test]
async fn events_are_published_and_slow_observers_never_block_apply() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(&dir);
    let entries = history(EVENT_CHANNEL_CAPACITY as u64 + 20);

    // no receiver at all: apply still works
    sm.apply(entries[..2].to_vec()).await.unwrap();

    let mut rx = sm.subscribe();
    let mut never_read = sm.shared().subscribe();
    sm.apply(entries[2..4].to_vec()).await.unwrap();
    let first = rx.try_recv().unwrap();
    assert_eq!(first.index, 3);
    assert!(!first.snapshot_installed);
    assert_eq!(first.events.len(), 1); // history: entry 3 submits 3 % 3 + 1 tasks
    assert!(matches!(
        first.events[0].what,
        What::Task {
            kind: EventKind::Submitted,
            ..
        }
    ));
    assert_eq!(rx.try_recv().unwrap().index, 4);
    assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Empty);

    // overflow the channel: apply neither blocks nor fails; the slow one lags
    sm.apply(entries[4..].to_vec()).await.unwrap();
    assert!(matches!(
        never_read.try_recv(),
        Err(TryRecvError::Lagged(_))
    ));
    assert_eq!(
        sm.shared().state_with_payloads().unwrap(),
        reference(&entries)
    );
}
