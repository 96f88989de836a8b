//! Snapshots as files on a running cluster: a follower that was down while
//! the leader snapshotted and purged the log it would need catches up by
//! an InstallSnapshot of several chunks (received into a file, decoded as
//! it is read), and every node keeps one payload file per group.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use support::{Cluster, bounded, deadline, wait_until};

const TEST_BOUND: Duration = Duration::from_secs(120);
/// Snapshots every 20 entries, keeping 5: a follower away for 60 entries
/// can only catch up from a snapshot.
const CONFIG: &str = "[raft]\nsnapshot_every_entries = 20\nkeep_entries_after_snapshot = 5\n\
                      [queue]\nnode_heartbeat_interval = \"1h\"\nnode_dead_after = \"2h\"\n";
/// 300 tasks of 20 KiB: a state of about 6 MB, two or more of openraft's
/// 3 MiB snapshot chunks; and past openraft's purge batch (256 entries),
/// so the leader purges the log the follower would need.
const TASKS: u64 = 300;
const PAYLOAD: usize = 20 * 1024;

/// The snapshot payload files (`.snap`) in a node's store.
fn snapshot_files(data_dir: &Path) -> Vec<String> {
    let dir = data_dir.join("raft").join("godel-snapshots");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_the_purged_log_installs_a_snapshot_in_chunks() {
    let mut c = Cluster::start_with(3, CONFIG).await;
    bounded(TEST_BOUND, async {
        let leader = c.leader().await;
        let away = (leader + 1) % c.len();
        c.kill9(away);
        let api = c.api();
        let pad = "x".repeat(PAYLOAD);
        for i in 0..TASKS {
            let body =
                json!({"payload": {"i": i, "pad": pad}, "capabilities": ["nobody-has-this"]});
            let r = api.post(leader, "/api/v1/tasks", &body).await.unwrap();
            assert_eq!(r.status, 201, "{r:?}");
        }
        c.restart(away);
        let api = c.api();
        wait_until(
            "the restarted follower holding every task",
            deadline(Duration::from_secs(60)),
            async || match api.get(away, "/api/v1/queue/depth").await {
                Ok(r) if r.status == 200 && r.body["pending"].as_u64() == Some(TASKS) => Ok(()),
                other => Err(anyhow::anyhow!("{other:?}")),
            },
        )
        .await;
        let installed = api
            .metric(away, "godel_raft_snapshots_total{how=\"installed\"}")
            .await;
        assert!(
            installed >= 1.0,
            "caught up without a snapshot: {installed}"
        );
        assert!(api.metric(away, "godel_raft_snapshot_bytes").await > 5e6);
        // One payload file per group's snapshot, nothing left over.
        for i in 0..c.len() {
            wait_until(
                "one snapshot file",
                deadline(Duration::from_secs(10)),
                async || match snapshot_files(&c.node(i).data_dir()) {
                    files if files.len() == 1 && files[0].ends_with(".snap") => Ok(()),
                    files => Err(anyhow::anyhow!("node {i}: {files:?}")),
                },
            )
            .await;
        }
        // A task on the restarted follower reads back whole.
        let r = api.get(away, "/api/v1/tasks?limit=1").await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
    })
    .await;
}

/// A snapshot every 400 commands, and (in effect) never by entry count.
const BY_COMMANDS: &str = "[raft]\nsnapshot_every_entries = 100000\nsnapshot_every_commands = 400\n\
                           [queue]\nnode_heartbeat_interval = \"1h\"\nnode_dead_after = \"2h\"\n";

/// One batch of 500 tasks is one entry: openraft's policy, counting
/// entries, never snapshots it; the command count does, so a restart does
/// not apply those 500 again. Fewer commands than the count build nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_built_once_enough_commands_apply_whatever_the_entries() {
    let mut c = Cluster::start_with(1, BY_COMMANDS).await;
    bounded(TEST_BOUND, async {
        let api = c.api();
        let built = async |api: &support::Api| {
            api.metric(0, "godel_raft_snapshots_total{how=\"built\"}")
                .await
        };
        let batch = |from: u64, n: u64| {
            let tasks: Vec<_> = (from..from + n)
                .map(|i| json!({"payload": {"i": i}, "capabilities": ["nobody-has-this"]}))
                .collect();
            json!({ "tasks": tasks })
        };
        // 300 commands (and the runtime's own): under the count.
        let r = api
            .post(0, "/api/v1/tasks:batch", &batch(0, 300))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(built(&api).await, 0.0, "a snapshot under the command count");
        // 500 more in one entry: past it.
        let r = api
            .post(0, "/api/v1/tasks:batch", &batch(300, 500))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        wait_until(
            "a snapshot built by the command count",
            deadline(Duration::from_secs(15)),
            async || match built(&api).await {
                n if n >= 1.0 => Ok(()),
                n => Err(anyhow::anyhow!("{n} built")),
            },
        )
        .await;
        assert_eq!(snapshot_files(&c.node(0).data_dir()).len(), 1);
        // A restart restores it and still holds every task.
        c.kill9(0);
        c.restart(0);
        let api = c.api();
        wait_until(
            "the restarted node holding every task",
            deadline(Duration::from_secs(30)),
            async || match api.get(0, "/api/v1/queue/depth").await {
                Ok(r) if r.status == 200 && r.body["pending"].as_u64() == Some(800) => Ok(()),
                other => Err(anyhow::anyhow!("{other:?}")),
            },
        )
        .await;
    })
    .await;
}
