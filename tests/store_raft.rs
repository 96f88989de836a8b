//! The store under a real openraft `Raft`: a single-node group writes real
//! task submissions, snapshots and purges its log on its own policy, shuts
//! down and restarts from the same directory with the same state.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use godel::fsm::{Batch, Command, Reply, Request, SubmitTask, Tenant};
use godel::raft::{NodeId, NodeInfo, Raft, TypeConfig};
use godel::store::{SharedState, Store};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{Config, ServerState, SnapshotPolicy};

const WAIT: Duration = Duration::from_secs(10);

/// A single-node group never sends an RPC.
struct NoNetwork;

fn no_network<E: std::error::Error>() -> RPCError<NodeId, NodeInfo, E> {
    RPCError::Network(NetworkError::new(&io::Error::other(
        "single node: no peers",
    )))
}

impl RaftNetworkFactory<TypeConfig> for NoNetwork {
    type Network = NoNetwork;
    async fn new_client(&mut self, _target: NodeId, _node: &NodeInfo) -> NoNetwork {
        NoNetwork
    }
}

impl RaftNetwork<TypeConfig> for NoNetwork {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        Err(no_network())
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, NodeInfo, RaftError<NodeId, InstallSnapshotError>>,
    > {
        Err(no_network())
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        Err(no_network())
    }
}

fn config() -> Arc<Config> {
    let config = Config {
        snapshot_policy: SnapshotPolicy::LogsSinceLast(10),
        max_in_snapshot_log_to_keep: 3,
        purge_batch_size: 1,
        ..Config::default()
    };
    Arc::new(config.validate().unwrap())
}

/// Opens the store (retrying while the previous instance still releases
/// sled's lock) and starts Raft on it.
async fn start(dir: &std::path::Path) -> (Raft, SharedState) {
    let dir = dir.to_owned();
    let (log, sm) = tokio::task::spawn_blocking(move || Store::open_waiting(&dir, WAIT))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("reopen: {e}"));
    let shared = sm.shared();
    let raft = Raft::new(1, config(), NoNetwork, log, sm).await.unwrap();
    (raft, shared)
}

fn submit(i: u64) -> Request {
    Request::Batch(Batch::unaudited(
        1_700_000_000_000 + i,
        i,
        vec![Command::Submit(SubmitTask {
            tenant: Tenant::from("acme"),
            payload: format!("{{\"i\":{i}}}"),
            ..SubmitTask::default()
        })],
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_restarts_from_snapshot_and_log() {
    let dir = tempfile::tempdir().unwrap();
    let (raft, shared) = start(dir.path()).await;
    let node = NodeInfo {
        raft_addr: "127.0.0.1:1".into(),
        ..NodeInfo::default()
    };
    raft.initialize(BTreeMap::from([(1, node)])).await.unwrap();
    raft.wait(Some(WAIT))
        .state(ServerState::Leader, "leader")
        .await
        .unwrap();

    for i in 0..25 {
        let written = raft.client_write(submit(i)).await.unwrap();
        let outcome = &written.data.outcomes[0];
        assert!(
            matches!(outcome, Ok(Reply::Submitted { created: true, .. })),
            "{outcome:?}"
        );
    }
    let metrics = raft
        .wait(Some(WAIT))
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= 10) && m.purged.is_some(),
            "snapshot and purge",
        )
        .await
        .unwrap();
    let last_applied = metrics.last_applied;
    let before = shared.read(|s| s.clone());
    assert_eq!(before.task_count(), 25);
    raft.shutdown().await.unwrap();
    drop(raft);

    let (raft, shared) = start(dir.path()).await;
    // restored from the snapshot, then the committed tail re-applied
    assert!(shared.last_applied() >= last_applied);
    assert_eq!(shared.read(|s| s.clone()), before);
    raft.wait(Some(WAIT))
        .state(ServerState::Leader, "leader again")
        .await
        .unwrap();
    let written = raft.client_write(submit(99)).await.unwrap();
    assert!(written.log_id > last_applied.unwrap());
    assert_eq!(shared.read(|s| s.task_count()), 26);
    raft.shutdown().await.unwrap();
}
