//! Tasks name a region, preferred or required, and dispatch honours it on a
//! running node: a required region with no gateway makes the task wait and
//! say why (it never runs elsewhere); once a gateway of that region has an
//! agent, the task runs there. Bad region input is refused and changes
//! nothing.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::time::Duration;

use anyhow::bail;
use serde_json::{Value, json};
use support::{Api, Cluster, bounded, deadline, wait_until};

const TEST_BOUND: Duration = Duration::from_secs(90);

async fn register(api: &Api, gateway: &str, region: &str, agent: &str) {
    let spec =
        json!({"id": gateway, "region": region, "max_sessions": 8, "driver": {"kind": "sim"}});
    let r = api.post(0, "/api/v1/gateways", &spec).await.unwrap();
    assert_eq!(r.status, 201, "{r:?}");
    let a = json!({"id": agent, "gateway": gateway, "capacity": 4});
    let r = api.post(0, "/api/v1/agents", &a).await.unwrap();
    assert_eq!(r.status, 201, "{r:?}");
}

async fn submit(api: &Api, body: Value) -> u64 {
    let r = api.post(0, "/api/v1/tasks", &body).await.unwrap();
    assert_eq!(r.status, 201, "{r:?}");
    r.body["id"].as_u64().unwrap()
}

async fn completed(api: &Api, id: u64) -> Value {
    wait_until(
        "the task to complete",
        deadline(Duration::from_secs(30)),
        async || {
            let t = api.get(0, &format!("/api/v1/tasks/{id}")).await?;
            if t.body["status"] == "completed" {
                Ok(t.body)
            } else {
                bail!("{}", t.body)
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_region_waits_then_runs_there_and_preferred_goes_home() {
    let c = Cluster::start(1).await;
    bounded(TEST_BOUND, async {
        let api = c.api();
        c.leader().await;
        register(&api, "gw-eu", "eu", "agent-eu").await;

        // Required in a region with no gateway: it waits and says why, while
        // an eu task runs.
        let ap = submit(
            &api,
            json!({"payload": {}, "region": "ap", "region_required": true}),
        )
        .await;
        let eu = submit(&api, json!({"payload": {}, "region": "eu"})).await;
        assert_eq!(completed(&api, eu).await["agent_id"], "agent-eu");
        let t = api.get_ok(0, &format!("/api/v1/tasks/{ap}")).await;
        assert_eq!(t["status"], "pending", "{t}");
        assert_eq!(
            (&t["region"], &t["region_required"]),
            (&json!("ap"), &json!(true))
        );
        assert_eq!(
            t["waiting_for"], "no gateway in region ap (required)",
            "{t}"
        );

        // A preferred region with no gateway runs wherever it can.
        let anywhere = submit(&api, json!({"payload": {}, "region": "mars"})).await;
        assert_eq!(completed(&api, anywhere).await["agent_id"], "agent-eu");
        assert_eq!(
            api.get_ok(0, &format!("/api/v1/tasks/{ap}")).await["status"],
            "pending",
            "a required region is never routed elsewhere"
        );

        // A gateway in ap appears: the waiting task runs there.
        register(&api, "gw-ap", "ap", "agent-ap").await;
        let t = completed(&api, ap).await;
        assert_eq!(t["agent_id"], "agent-ap", "{t}");
        assert!(t["waiting_for"].is_null(), "{t}");

        // Preferred ap with both gateways idle: it runs in ap.
        for i in 0..6 {
            let id = submit(&api, json!({"payload": {"i": i}, "region": "ap"})).await;
            assert_eq!(completed(&api, id).await["agent_id"], "agent-ap");
        }

        // Bad input is refused with a clear error and creates nothing.
        let before = api.get_ok(0, "/api/v1/queue/depth").await;
        for (body, says) in [
            (
                json!({"payload": {}, "region_required": true}),
                "`region_required`: needs `region`",
            ),
            (
                json!({"payload": {}, "region": "e u"}),
                "invalid field `region`",
            ),
            (
                json!({"payload": {}, "region": ""}),
                "invalid field `region`",
            ),
            (json!({"payload": {}, "region": 7}), "region"),
        ] {
            let r = api.post(0, "/api/v1/tasks", &body).await.unwrap();
            assert_eq!(r.status, 400, "{body}: {r:?}");
            assert!(r.message().contains(says), "{body}: {}", r.message());
        }
        assert_eq!(api.get_ok(0, "/api/v1/queue/depth").await, before);
    })
    .await;
}
