//! openraft's own storage conformance suite against the sled store, one fresh
//! database per test case: on the meta group's trees, and on another
//! group's trees in a database where the meta group holds entries (groups
//! share one sled database and must not see each other's data).

use godel::raft::{NodeId, TypeConfig};
use godel::store::{LogStore, StateMachine, Store};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{AnyError, StorageError, StorageIOError};
use tempfile::TempDir;

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for SledBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<NodeId>> {
        let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(AnyError::new(&e)))?;
        let (log, sm) =
            Store::open(dir.path()).map_err(|e| StorageIOError::write(AnyError::new(&e)))?;
        // the guard keeps the directory alive until the case ends
        Ok((dir, log, sm))
    }
}

/// Plain `#[test]`: the suite builds its own tokio runtime per case.
#[test]
fn openraft_storage_suite() {
    Suite::test_all(SledBuilder).unwrap();
}

/// A Raft group other than the meta group, beside a meta group that holds
/// a vote and entries.
struct SecondGroupBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for SecondGroupBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<NodeId>> {
        use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
        let io = |e: &dyn std::error::Error| StorageIOError::write(AnyError::error(e.to_string()));
        let dir = tempfile::tempdir().map_err(|e| io(&e))?;
        let mut groups = Store::open_groups(dir.path(), &[0, 2]).map_err(|e| io(&e))?;
        let (_, second_log, second_sm) = groups.pop().expect("two groups opened");
        let (_, mut meta, _) = groups.pop().expect("two groups opened");
        meta.save_vote(&openraft::Vote::new_committed(9, 9)).await?;
        let entries = (1..=3).map(|i| openraft::Entry::<TypeConfig> {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(9, 9), i),
            payload: openraft::EntryPayload::Blank,
        });
        meta.blocking_append(entries).await?;
        Ok((dir, second_log, second_sm))
    }
}

#[test]
fn openraft_storage_suite_on_a_second_group() {
    Suite::test_all(SecondGroupBuilder).unwrap();
}
