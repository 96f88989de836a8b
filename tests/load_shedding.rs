//! Load shedding by priority on a running node: with
//! `queue.max_unfinished_tasks = 20` (and the default `shed_at`: low from
//! 50%, medium from 70%, high from 85%, critical at 100%), tasks that no
//! agent can take pile up, and the node refuses `low` first (at 10), then
//! `medium` (at 14), `high` (at 17) and last `critical` (at 20), each with
//! 429, code `shed`, `Retry-After` and a message naming the load; a refused
//! submission creates nothing, and a resend of a created task is answered
//! with it. Once tasks finish, low work is taken again.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::time::Duration;

use serde_json::json;
use support::{Api, Cluster, bounded};

const TEST_BOUND: Duration = Duration::from_secs(60);
const CONFIG: &str = "[queue]\nnode_heartbeat_interval = \"1h\"\nnode_dead_after = \"2h\"\n\
                      max_unfinished_tasks = 20\n";

/// Submits tasks of `priority` that no agent can run until one is refused;
/// returns how many were taken, checking the refusal.
async fn fill(api: &Api, priority: &str) -> usize {
    let body = json!({"payload": {}, "priority": priority, "capabilities": ["nobody-has-this"]});
    for taken in 0..=20 {
        let r = api.post(0, "/api/v1/tasks", &body).await.unwrap();
        if r.status == 201 {
            continue;
        }
        r.assert_error(429, "shed");
        assert_eq!(r.header("retry-after"), Some("1"), "{r:?}");
        assert!(
            r.message().contains("unfinished tasks") && r.message().contains(priority),
            "the refusal names the load and the priority: {r:?}"
        );
        return taken;
    }
    panic!("{priority} tasks were never refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lower_priorities_are_shed_first() {
    let c = Cluster::start_with(1, CONFIG).await;
    bounded(TEST_BOUND, async {
        let api = c.api();
        c.leader().await;
        let keyed = json!({"payload": {}, "priority": "low", "idempotency_key": "resend-me",
                           "capabilities": ["nobody-has-this"]});
        let first = api.post(0, "/api/v1/tasks", &keyed).await.unwrap();
        assert_eq!(first.status, 201, "{first:?}");
        let taken = [
            fill(&api, "low").await,
            fill(&api, "medium").await,
            fill(&api, "high").await,
            fill(&api, "critical").await,
        ];
        assert_eq!(taken, [9, 4, 3, 3], "low, then medium, high, critical");
        let tasks = api.list_tasks(0, "").await;
        assert_eq!(tasks.len(), 20, "refused submissions created nothing");
        // A resend of a task already created is answered with it, not shed.
        let again = api.post(0, "/api/v1/tasks", &keyed).await.unwrap();
        assert_eq!(again.status, 200, "{again:?}");
        assert_eq!(again.body["id"], first.body["id"], "{again:?}");
        // Still full for low work; room again once tasks finish.
        assert_eq!(fill(&api, "low").await, 0);
        for t in tasks.iter().take(11) {
            let id = t["id"].as_u64().unwrap();
            let r = api
                .post(0, &format!("/api/v1/tasks/{id}/cancel"), &json!({}))
                .await
                .unwrap();
            assert_eq!(r.status, 200, "{r:?}");
        }
        assert_eq!(fill(&api, "low").await, 1, "9 unfinished: one low fits");
    })
    .await;
}
