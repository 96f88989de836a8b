//! Retention on a running cluster: finished tasks (completed or cancelled)
//! are purged by the group's leader once they finished longer ago than
//! `queue.retain_finished`, or past `queue.retain_finished_max` of them,
//! oldest first, and dead letters once unchanged for
//! `queue.retain_dead_letters`; unfinished tasks stay, a purged task's
//! idempotency key is free again, and a restarted node holds the same
//! tasks.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Api, Cluster, bounded, deadline, wait_until};

const TEST_BOUND: Duration = Duration::from_secs(90);
const QUEUE: &str = "[queue]\nnode_heartbeat_interval = \"1h\"\nnode_dead_after = \"2h\"\n";

/// Submits a task no agent can run, with idempotency key `key`; its id.
async fn park(api: &Api, i: usize, key: &str) -> u64 {
    let body =
        json!({"payload": {"k": key}, "capabilities": ["nobody-has-this"], "idempotency_key": key});
    let r = api.post(i, "/api/v1/tasks", &body).await.unwrap();
    assert_eq!(r.status, 201, "{r:?}");
    r.body["id"].as_u64().unwrap()
}

async fn cancel(api: &Api, i: usize, id: u64) {
    let r = api
        .post(i, &format!("/api/v1/tasks/{id}/cancel"), &json!({}))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
}

async fn status_of(api: &Api, i: usize, id: u64) -> u16 {
    api.get(i, &format!("/api/v1/tasks/{id}"))
        .await
        .unwrap()
        .status
}

/// Ids of the cancelled tasks node `i` holds, in order.
async fn cancelled(api: &Api, i: usize) -> Vec<u64> {
    let items: Vec<Value> = api.list_tasks(i, "status=cancelled").await;
    let mut ids: Vec<u64> = items.iter().filter_map(|t| t["id"].as_u64()).collect();
    ids.sort_unstable();
    ids
}

/// Cancelled tasks go once older than `retain_finished`, on every node;
/// pending ones stay; the key of a purged task makes a new task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_tasks_are_purged_after_the_retention_period() {
    let config = format!("{QUEUE}retain_finished = \"1s\"\n");
    let c = Cluster::start_with(3, &config).await;
    bounded(TEST_BOUND, async {
        let api = c.api();
        let leader = c.leader().await;
        let kept = park(&api, leader, "kept").await;
        let gone = park(&api, leader, "gone").await;
        let also = park(&api, leader, "also").await;
        cancel(&api, leader, gone).await;
        cancel(&api, leader, also).await;
        // Still there right after (retention is a second).
        assert_eq!(status_of(&api, leader, gone).await, 200);
        assert_eq!(api.get_ok(leader, "/api/v1/queue/depth").await["by_status"]["cancelled"], 2);

        for i in 0..c.len() {
            wait_until(
                "the cancelled tasks purged",
                deadline(Duration::from_secs(20)),
                async || match (status_of(&api, i, gone).await, status_of(&api, i, also).await) {
                    (404, 404) => Ok(()),
                    other => Err(anyhow::anyhow!("node {i}: {other:?}")),
                },
            )
            .await;
            assert_eq!(status_of(&api, i, kept).await, 200, "node {i}");
        }
        let depth = api.get_ok(leader, "/api/v1/queue/depth").await;
        assert!(depth["by_status"]["cancelled"].as_u64().unwrap_or(0) == 0, "{depth}");
        assert!(api.metric(leader, "godel_tasks_purged_total").await >= 2.0);

        // The purged task's key is free; the kept one's still answers with
        // its task.
        let again = park(&api, leader, "gone").await;
        assert!(again > also, "a new task, not the purged one: {again}");
        let body = json!({"payload": {"k": "kept"}, "capabilities": ["nobody-has-this"], "idempotency_key": "kept"});
        let r = api.post(leader, "/api/v1/tasks", &body).await.unwrap();
        assert_eq!((r.status, r.body["id"].as_u64()), (200, Some(kept)), "{r:?}");
    })
    .await;
}

/// Past `retain_finished_max` finished tasks the oldest go at once, however
/// recent; a node killed and restarted holds the same tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_cap_the_oldest_finished_go_and_a_restart_agrees() {
    let config = format!("{QUEUE}retain_finished_max = 2\n");
    let mut c = Cluster::start_with(1, &config).await;
    bounded(TEST_BOUND, async {
        let api = c.api();
        let mut ids = Vec::new();
        for k in 0..5 {
            let id = park(&api, 0, &format!("t{k}")).await;
            cancel(&api, 0, id).await;
            ids.push(id);
        }
        let pending = park(&api, 0, "pending").await;
        wait_until(
            "two cancelled tasks left",
            deadline(Duration::from_secs(20)),
            async || match cancelled(&api, 0).await {
                left if left.len() == 2 => Ok(()),
                left => Err(anyhow::anyhow!("{left:?}")),
            },
        )
        .await;
        assert_eq!(
            cancelled(&api, 0).await,
            ids[3..].to_vec(),
            "the newest two stay"
        );

        c.kill9(0);
        c.restart(0);
        let api = c.api();
        wait_until(
            "the node serving again",
            deadline(Duration::from_secs(30)),
            async || match api.get(0, &format!("/api/v1/tasks/{pending}")).await {
                Ok(r) if r.status == 200 => Ok(()),
                other => Err(anyhow::anyhow!("{other:?}")),
            },
        )
        .await;
        assert_eq!(
            cancelled(&api, 0).await,
            ids[3..].to_vec(),
            "after a restart"
        );
        assert_eq!(status_of(&api, 0, ids[0]).await, 404);
        // The answer says why it may be gone.
        let r = api
            .get(0, &format!("/api/v1/tasks/{}", ids[0]))
            .await
            .unwrap();
        let why = r.body["error"]["message"].as_str().unwrap_or_default();
        assert!(why.contains("purged after queue.retain_finished"), "{r:?}");
    })
    .await;
}

/// A task no agent can run, leased and failed by hand until it is a dead
/// letter; its id.
async fn dead_letter(api: &Api, i: usize, key: &str) -> u64 {
    let body = json!({"payload": {}, "capabilities": ["by-hand"], "max_attempts": 1, "idempotency_key": key});
    let r = api.post(i, "/api/v1/tasks", &body).await.unwrap();
    assert_eq!(r.status, 201, "{r:?}");
    let id = r.body["id"].as_u64().unwrap();
    let lease = json!({"agent_id": "hand", "capabilities": ["by-hand"], "max": 1});
    let r = api.post(i, "/api/v1/leases", &lease).await.unwrap();
    assert_eq!(r.body["leases"][0]["task_id"], id, "{r:?}");
    let token = r.body["leases"][0]["fencing_token"].as_u64().unwrap();
    let fail = json!({"error": "failed by hand", "retryable": false});
    let r = api
        .post(i, &format!("/api/v1/leases/{token}/fail"), &fail)
        .await
        .unwrap();
    assert!(r.status < 300, "{r:?}");
    id
}

/// Dead letters go once unchanged for `retain_dead_letters`, on every
/// node, with the finished tasks kept longer; one replayed meanwhile
/// stays (it is pending again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_purged_after_their_retention_period() {
    let config = format!("{QUEUE}retain_dead_letters = \"2s\"\n");
    let c = Cluster::start_with(3, &config).await;
    bounded(TEST_BOUND, async {
        let api = c.api();
        let leader = c.leader().await;
        let gone = dead_letter(&api, leader, "gone").await;
        let replayed = dead_letter(&api, leader, "replayed").await;
        let done = park(&api, leader, "done").await;
        cancel(&api, leader, done).await;
        let r = api
            .post(
                leader,
                "/api/v1/dead-letter/replay",
                &json!({"ids": [replayed]}),
            )
            .await
            .unwrap();
        assert!(r.status < 300, "{r:?}");
        assert_eq!(api.depth(leader).await["by_status"]["dead_letter"], 1);

        for i in 0..c.len() {
            wait_until(
                "the dead letter purged",
                deadline(Duration::from_secs(20)),
                async || match status_of(&api, i, gone).await {
                    404 => Ok(()),
                    other => Err(anyhow::anyhow!("node {i}: {other}")),
                },
            )
            .await;
            assert_eq!(status_of(&api, i, replayed).await, 200, "node {i}");
            assert_eq!(status_of(&api, i, done).await, 200, "node {i}: kept 7 days");
        }
        let depth = api.depth(leader).await;
        assert_eq!(
            depth["by_status"]["dead_letter"].as_u64().unwrap_or(0),
            0,
            "{depth}"
        );
        // Its key is free again.
        let body =
            json!({"payload": {}, "capabilities": ["nobody-has-this"], "idempotency_key": "gone"});
        let r = api.post(leader, "/api/v1/tasks", &body).await.unwrap();
        assert_eq!(r.status, 201, "a new task: {r:?}");
    })
    .await;
}
