//! Writes and linearizable reads per Raft group (`docs/shards.md`, step 1),
//! on three nodes run in this process: a command proposed to a shard group
//! from a node that does not lead it is forwarded to that group's leader,
//! commits there, and a read barrier on a third node's replica of the group
//! sees it; the meta group's state never does. A shard's ids carry it. A group the node does not
//! host is refused by value. When the group's leader stops, the survivors
//! elect another and take writes again.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::time::{Duration, Instant};

use godel::config::Config;
use godel::fsm::{Command, Reply, SubmitTask, TaskId, Tenant};
use godel::node::{Node, NodeError};
use support::{SECRET, bounded, free_port, free_raft_port};
use tokio_util::sync::CancellationToken;

const TEST_BOUND: Duration = Duration::from_secs(90);
const SHARD: u32 = 2;

struct Member {
    id: u64,
    api: u16,
    raft: u16,
    dir: tempfile::TempDir,
}

fn config(me: &Member, all: &[Member]) -> Config {
    let mut text = format!(
        "[node]\nid = {}\ndata_dir = {:?}\napi_addr = \"127.0.0.1:{}\"\nraft_addr = \"127.0.0.1:{}\"\n\
         [raft]\nheartbeat_interval = \"50ms\"\nelection_timeout_min = \"150ms\"\nelection_timeout_max = \"300ms\"\n\
         [queue]\nnode_heartbeat_interval = \"1h\"\nnode_dead_after = \"2h\"\n\
         [fabric]\nenabled = false\n\
         [cluster]\nsecret = {:?}\nshards = 3\n",
        me.id,
        me.dir.path().join("data"),
        me.api,
        me.raft,
        SECRET,
    );
    for m in all {
        text.push_str(&format!(
            "[[cluster.members]]\nid = {}\nraft_addr = \"127.0.0.1:{}\"\napi_addr = \"127.0.0.1:{}\"\n",
            m.id, m.raft, m.api
        ));
    }
    let c = Config::from_toml(&text).expect("config parses");
    c.validate().expect("config is valid");
    c
}

fn submit(tenant: &str, key: &str) -> Command {
    Command::Submit(SubmitTask {
        tenant: Tenant(tenant.into()),
        payload: "{}".into(),
        idempotency_key: Some(key.into()),
        ..Default::default()
    })
}

/// Writes `cmd` to `group` through `node` until it commits (a leader may be
/// being elected); returns the task it submitted.
async fn write_until_committed(node: &Node, group: u32, cmd: Command) -> TaskId {
    let give_up = Instant::now() + Duration::from_secs(20);
    loop {
        match node.write_to(group, cmd.clone()).await {
            Ok(Ok(Reply::Submitted { task, .. })) => return task.id,
            Ok(other) => panic!("unexpected outcome {other:?}"),
            Err(e) if Instant::now() < give_up => {
                eprintln!("write to group {group} not committed yet: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("write to group {group} never committed: {e}"),
        }
    }
}

/// Waits until every node knows one leader of `group`, other than `not`;
/// returns it.
async fn group_leader(nodes: &[&Node], group: u32, not: Option<u64>) -> u64 {
    let give_up = Instant::now() + Duration::from_secs(20);
    loop {
        let leaders: Vec<Option<u64>> = nodes
            .iter()
            .map(|n| n.group(group).and_then(|g| g.leader()).map(|(id, _)| id))
            .collect();
        if let Some(Some(l)) = leaders.first()
            && leaders.iter().all(|x| *x == Some(*l))
            && not != Some(*l)
        {
            return *l;
        }
        assert!(Instant::now() < give_up, "no agreed leader: {leaders:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_group_takes_its_own_writes_and_reads() {
    let members: Vec<Member> = (1..=3)
        .map(|id| Member {
            id,
            api: free_port(),
            raft: free_raft_port(),
            dir: tempfile::tempdir().unwrap(),
        })
        .collect();
    let shutdown = CancellationToken::new();
    let starts = members
        .iter()
        .map(|m| Node::start(config(m, &members), shutdown.child_token()));
    let nodes: Vec<Node> = futures_util::future::try_join_all(starts)
        .await
        .expect("nodes start");
    bounded(TEST_BOUND, async {
        let all: Vec<&Node> = nodes.iter().collect();
        let leader = group_leader(&all, SHARD, None).await;
        // The shard's first leader records which shard the group is.
        let from = nodes.iter().find(|n| n.id() != leader).unwrap();
        let give_up = Instant::now() + Duration::from_secs(20);
        loop {
            from.read_barrier_of(SHARD).await.ok();
            if from.group(SHARD).unwrap().state().read(|s| s.group()) == SHARD {
                break;
            }
            assert!(Instant::now() < give_up, "shard {SHARD} never defined");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Propose from a node that does not lead the shard: forwarded. The
        // id names the shard.
        let id = write_until_committed(from, SHARD, submit("acme", "k1")).await;
        assert_eq!(godel::fsm::group_of(id.0, 3), Some(SHARD), "{id:?}");
        // A third node's replica, after a read barrier, has it.
        let reader = nodes
            .iter()
            .find(|n| n.id() != leader && n.id() != from.id())
            .unwrap();
        reader.read_barrier_of(SHARD).await.unwrap();
        let shard = reader.group(SHARD).unwrap();
        assert!(
            shard.state().read(|s| s.task(id).is_some()),
            "task {id:?} on the shard"
        );
        // The meta group and the other shards never saw it.
        reader.read_barrier().await.unwrap();
        assert!(reader.state().read(|s| s.task(id).is_none()));
        for g in [1, 3] {
            reader.read_barrier_of(g).await.unwrap();
            let other = reader.group(g).unwrap();
            assert!(other.state().read(|s| s.task(id).is_none()), "group {g}");
        }
        // A group nobody hosts is refused by value.
        match from.write_to(9, submit("acme", "k9")).await {
            Err(NodeError::Invalid(m)) => assert!(m.contains("no Raft group 9"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            from.read_barrier_of(9).await,
            Err(NodeError::Invalid(_))
        ));

        // The shard's leader stops: the others elect one and take writes.
        let stopped = nodes.iter().find(|n| n.id() == leader).unwrap();
        stopped.stop(Duration::from_secs(5)).await;
        let rest: Vec<&Node> = nodes.iter().filter(|n| n.id() != leader).collect();
        group_leader(&rest, SHARD, Some(leader)).await;
        let again = write_until_committed(rest[0], SHARD, submit("acme", "k2")).await;
        rest[1].read_barrier_of(SHARD).await.unwrap();
        let shard = rest[1].group(SHARD).unwrap();
        assert!(
            shard
                .state()
                .read(|s| s.task(id).is_some() && s.task(again).is_some())
        );
    })
    .await;
    for n in &nodes {
        n.stop(Duration::from_secs(5)).await;
    }
}
