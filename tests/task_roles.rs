//! Dispatch by role on a running node: a task submitted with `role` runs
//! only on an agent of that role (its capabilities list `role:<role>`);
//! a bad role is refused.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::time::Duration;

use anyhow::bail;
use serde_json::json;
use support::{Cluster, bounded, deadline, wait_until};

const TEST_BOUND: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_with_a_role_runs_on_an_agent_of_that_role() {
    let c = Cluster::start(1).await;
    bounded(TEST_BOUND, async {
        let api = c.api();
        c.leader().await;
        let gw = json!({"id": "gw-roles", "region": "local", "max_sessions": 8, "driver": {"kind": "sim"}});
        let r = api.post(0, "/api/v1/gateways", &gw).await.unwrap();
        assert_eq!(r.status, 201, "{r:?}");
        for (id, role) in [("rev-1", "reviewer"), ("mon-1", "monitor")] {
            let a = json!({"id": id, "gateway": "gw-roles", "capacity": 4, "role": role,
                           "capabilities": ["review"]});
            let r = api.post(0, "/api/v1/agents", &a).await.unwrap();
            assert_eq!(r.status, 201, "{r:?}");
        }
        let body = json!({"payload": {}, "capabilities": ["review"], "role": "reviewer"});
        let mut ids = Vec::new();
        for _ in 0..4 {
            let r = api.post(0, "/api/v1/tasks", &body).await.unwrap();
            assert_eq!(r.status, 201, "{r:?}");
            assert_eq!(
                r.body["capabilities"],
                json!(["review", "role:reviewer"]),
                "{r:?}"
            );
            ids.push(r.body["id"].as_u64().unwrap());
        }
        for id in ids {
            let t = wait_until(
                "the task to complete",
                deadline(Duration::from_secs(20)),
                async || {
                    let t = api.get_ok(0, &format!("/api/v1/tasks/{id}")).await;
                    if t["status"] == "completed" {
                        Ok(t)
                    } else {
                        bail!("{t}")
                    }
                },
            )
            .await;
            assert_eq!(t["agent_id"], "rev-1", "only the reviewer runs it: {t}");
        }
        let r = api
            .post(
                0,
                "/api/v1/tasks",
                &json!({"payload": {}, "role": "bad role"}),
            )
            .await
            .unwrap();
        r.assert_error(400, "invalid_request");
    })
    .await;
}
