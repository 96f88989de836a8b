//! A copy of a state machine written out, read back and seeded into a
//! fresh store: the store opens through its checks with the same state,
//! a membership of the new node alone and a vote in the copy's term; a
//! stopped node's store is copied up to its commit index or its log's end.

use std::collections::BTreeMap;

use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Membership};

use super::*;
use crate::fsm::{AgentId, AuditCaller, AuditRecord, Batch, Command, Request, SubmitTask, Tenant};
use crate::raft::TypeConfig;

const WAIT: Duration = Duration::from_secs(5);

fn info(n: u64) -> NodeInfo {
    NodeInfo {
        raft_addr: format!("127.0.0.1:{}", 7400 + n),
        api_addr: format!("127.0.0.1:{}", 7300 + n),
        region: "local".into(),
    }
}

fn id(term: u64, index: u64) -> LogId<NodeId> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn submit(n: u64) -> Command {
    Command::Submit(SubmitTask {
        tenant: Tenant("acme".into()),
        payload: format!(r#"{{"n":{n}}}"#),
        ..Default::default()
    })
}

fn audit(n: u64) -> Command {
    Command::Audit(AuditRecord {
        caller: AuditCaller {
            actor: format!("key:k{n}").into(),
            tenant: "acme".into(),
            action: "tasks.submit".into(),
        },
        target: Some(crate::fsm::AuditTarget::Task(n)),
        outcome: "ok".into(),
    })
}

/// The entries of a small history: a three-node membership, tasks, a
/// lease held by an agent, audit entries.
fn history() -> Vec<Entry<TypeConfig>> {
    let members = Membership::new(
        vec![[1, 2, 3].into()],
        (1..=3).map(|n| (n, info(n))).collect::<BTreeMap<_, _>>(),
    );
    let normal = |index, commands| Entry {
        log_id: id(2, index),
        payload: EntryPayload::Normal(Request::Batch(Batch::unaudited(
            1_000 + index,
            index,
            commands,
        ))),
    };
    let lease = Command::Lease {
        agent_id: AgentId("old-agent".into()),
        capabilities: vec![],
        max: 2,
        lease_ms: 30_000,
    };
    vec![
        Entry {
            log_id: id(2, 1),
            payload: EntryPayload::Membership(members),
        },
        normal(2, (1..=5).map(submit).chain([audit(1)]).collect()),
        normal(3, vec![lease, audit(2)]),
        normal(4, vec![submit(6), audit(3)]),
    ]
}

/// A store in `dir` with `history` appended and applied through `applied`.
async fn store_with_history(dir: &Path, applied: u64, committed: u64) {
    let (mut log, mut sm) = Store::open(dir).unwrap();
    let entries = history();
    log.blocking_append(entries.clone()).await.unwrap();
    log.save_committed(Some(id(2, committed))).await.unwrap();
    sm.apply(entries.into_iter().take(applied as usize))
        .await
        .unwrap();
}

/// `capture`'s state with every payload held, as a copy read back holds
/// them (the live one's are in its store).
fn holding(capture: &Capture) -> crate::fsm::State {
    let mut state = capture.state().clone();
    if let Some((db, _)) = &capture.payloads {
        super::payloads::hold_all(db, &mut state).unwrap();
    }
    state
}

#[tokio::test]
async fn a_seeded_store_opens_with_the_copy_and_this_node_alone() {
    let (old, new) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (mut old_log, mut sm) = Store::open(old.path()).unwrap();
    old_log.blocking_append(history()).await.unwrap();
    sm.apply(history()).await.unwrap();
    let capture = sm.shared().capture();
    assert_eq!(capture.last_applied(), Some(id(2, 4)));
    assert_eq!(capture.state().task_count(), 6);
    let mut payload = Vec::new();
    capture.write_payload(&mut payload).unwrap();
    let restored = Restored::read_payload(&mut &payload[..]).unwrap();
    assert_eq!(restored.state(), &holding(&capture));

    let dir = new.path().join("raft");
    let seeded = seed(&dir, restored, 9, info(9)).unwrap();
    assert_eq!(seeded.snapshot, id(2, 4));
    assert_eq!(seeded.vote, Vote::new(2, 9));

    let (mut log, mut sm2) = Store::open_waiting(&dir, WAIT).unwrap();
    let state = sm2.shared();
    assert_eq!(state.read(|s| s.clone()), *capture.state());
    let (applied, membership) = sm2.applied_state().await.unwrap();
    assert_eq!(applied, Some(id(2, 4)));
    let voters: Vec<NodeId> = membership.membership().voter_ids().collect();
    assert_eq!(voters, [9]);
    assert_eq!(membership.membership().get_node(&9), Some(&info(9)));
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(2, 9)));
    let st = log.get_log_state().await.unwrap();
    assert_eq!(
        (st.last_purged_log_id, st.last_log_id),
        (Some(id(2, 4)), Some(id(2, 4)))
    );
    assert_eq!(log.read_committed().await.unwrap(), Some(id(2, 4)));
    let snap = sm2.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(snap.meta.last_log_id, Some(id(2, 4)));
    // The old agent's lease is kept, to expire by leader time.
    assert_eq!(
        state.read(|s| s.agent_leases(&AgentId("old-agent".into())).len()),
        2
    );
}

#[tokio::test]
async fn seeding_refuses_a_directory_that_holds_anything() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keep-me"), b"x").unwrap();
    let (_log, sm) = Store::open(tempfile::tempdir().unwrap().path()).unwrap();
    let mut payload = Vec::new();
    sm.shared().capture().write_payload(&mut payload).unwrap();
    let restored = Restored::read_payload(&mut &payload[..]).unwrap();
    let err = seed(dir.path(), restored, 1, info(1)).unwrap_err();
    assert!(
        matches!(&err, StoreError::NotFresh(m) if m.contains("keep-me")),
        "{err}"
    );
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1, "nothing was added");
}

#[tokio::test]
async fn an_offline_copy_applies_the_log_to_the_commit_or_to_its_end() {
    let dir = tempfile::tempdir().unwrap();
    store_with_history(dir.path(), 2, 3).await;
    let scratch = tempfile::tempdir().unwrap();
    let before = std::fs::read(dir.path().join("db")).unwrap();
    let committed = offline_capture(dir.path(), Through::Committed, scratch.path()).unwrap();
    assert_eq!(committed.last_applied(), Some(id(2, 3)));
    assert_eq!(committed.state().task_count(), 5);
    let all = offline_capture(dir.path(), Through::LogEnd, scratch.path()).unwrap();
    // The store was copied, not opened: its bytes are as they were, and
    // the copy is gone.
    assert_eq!(std::fs::read(dir.path().join("db")).unwrap(), before);
    assert_eq!(std::fs::read_dir(scratch.path()).unwrap().count(), 0);
    assert_eq!(all.last_applied(), Some(id(2, 4)));
    assert_eq!(all.state().task_count(), 6);
    assert_eq!(all.state().audit().last_seq(), 3);
    assert_eq!(all.membership().membership().voter_ids().count(), 3);
    // The same state the node would have applied.
    let live = tempfile::tempdir().unwrap();
    let (_log, mut sm) = Store::open(live.path()).unwrap();
    sm.apply(history()).await.unwrap();
    assert_eq!(all.state(), &holding(&sm.shared().capture()));
    let none = tempfile::tempdir().unwrap();
    assert!(offline_capture(none.path(), Through::LogEnd, scratch.path()).is_err());
    // A store a node holds open is refused (after waiting for it a while).
    let (_log, _sm) = Store::open_waiting(dir.path(), WAIT).unwrap();
    let err = offline_capture(dir.path(), Through::LogEnd, scratch.path()).unwrap_err();
    assert!(err.to_string().contains("stop it first"), "{err}");
}
