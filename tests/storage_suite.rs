//! openraft's own storage conformance suite against the sled store, one fresh
//! database per test case.

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
