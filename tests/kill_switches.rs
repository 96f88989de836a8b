//! Kill switches over the HTTP API, on three nodes with three queue shards:
//! a switch set through one node stops dispatch of its work on every shard
//! at once (held tasks stay `pending` and say why), the rest keeps running,
//! lifting it lets the held work run, a switch with `cancel_leased` cancels
//! matching leased work, bad switches are refused, and every change is
//! audited and listed.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::time::Duration;

use anyhow::bail;
use serde_json::{Value, json};
use support::{Api, Cluster, bounded, deadline, wait_until};

const TEST_BOUND: Duration = Duration::from_secs(120);

async fn submit(api: &Api, i: usize, body: Value) -> u64 {
    let r = api.post(i, "/api/v1/tasks", &body).await.unwrap();
    assert_eq!(r.status, 201, "{r:?}");
    r.body["id"].as_u64().unwrap()
}

async fn lease(api: &Api, caps: &[&str]) -> Vec<(u64, u64)> {
    let body = json!({"agent_id": "w-ext", "capabilities": caps, "max": 50, "lease_ms": 30000});
    let r = api.post(0, "/api/v1/leases", &body).await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    r.body["leases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["task_id"].as_u64().unwrap(),
                g["fencing_token"].as_u64().unwrap(),
            )
        })
        .collect()
}

async fn status(api: &Api, i: usize, id: u64) -> Value {
    api.get_ok(i, &format!("/api/v1/tasks/{id}")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_holds_its_work_on_every_shard_until_lifted() {
    let c = Cluster::start_with(3, "[cluster]\nshards = 3\n").await;
    bounded(TEST_BOUND, async {
        let api = c.api();
        c.leader().await;

        // Bad switches change nothing.
        for body in [
            json!({}),
            json!({"all": true, "tenant": "acme"}),
            json!({"tenant": "bad name"}),
        ] {
            let r = api.put(1, "/api/v1/switches/s1", &body).await.unwrap();
            assert_eq!(r.status, 400, "{body}: {r:?}");
        }
        let r = api.delete(1, "/api/v1/switches/never-set").await.unwrap();
        r.assert_error(404, "not_found");

        // Stop the `gpu` work through node 1; the switch is listed everywhere.
        let r = api
            .put(
                1,
                "/api/v1/switches/no-gpu",
                &json!({"capability": "gpu", "reason": "gpu pool down"}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body["capability"], "gpu", "{r:?}");
        assert!(
            r.body["set_by"].as_str().unwrap().starts_with("key:"),
            "{r:?}"
        );
        for i in 0..3 {
            let l = api.get_ok(i, "/api/v1/switches").await;
            assert_eq!(l["items"][0]["name"], "no-gpu", "node {i}: {l}");
        }
        // gpu tasks spread over the shards (one session key each) are held;
        // a cpu task runs.
        let mut gpu = Vec::new();
        for k in 0..9 {
            gpu.push(
                submit(
                    &api,
                    k % 3,
                    json!({"payload": {}, "capabilities": ["gpu"], "session_key": format!("g{k}")}),
                )
                .await,
            );
        }
        let shards: std::collections::BTreeSet<u64> = gpu.iter().map(|id| id & 0xff).collect();
        assert!(shards.len() > 1, "the held tasks span shards: {gpu:?}");
        let cpu = submit(&api, 2, json!({"payload": {}, "capabilities": ["cpu"]})).await;
        let granted = lease(&api, &["gpu", "cpu"]).await;
        assert_eq!(
            granted.iter().map(|g| g.0).collect::<Vec<_>>(),
            vec![cpu],
            "only the cpu task is leased"
        );
        let t = status(&api, 0, gpu[0]).await;
        assert_eq!(t["status"], "pending", "{t}");
        assert_eq!(t["waiting_for"], "held by kill switch no-gpu", "{t}");

        // Lifted: the held work is leased.
        let r = api.delete(2, "/api/v1/switches/no-gpu").await.unwrap();
        assert_eq!(r.status, 204, "{r:?}");
        let mut got: Vec<u64> = Vec::new();
        let got = wait_until(
            "the held tasks to be leased",
            deadline(Duration::from_secs(10)),
            async || {
                got.extend(lease(&api, &["gpu"]).await.iter().map(|g| g.0));
                if got.len() == gpu.len() {
                    Ok(got.clone())
                } else {
                    bail!("{got:?}")
                }
            },
        )
        .await;
        let mut got = got;
        got.sort_unstable();
        let mut want = gpu.clone();
        want.sort_unstable();
        assert_eq!(got, want);

        // A switch that cancels leased work: the gpu tasks are leased now.
        let r = api
            .put(
                0,
                "/api/v1/switches/stop-gpu",
                &json!({"capability": "gpu", "cancel_leased": true}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        for id in &gpu {
            let t = status(&api, 1, *id).await;
            assert_eq!(t["status"], "cancelled", "{t}");
            assert_eq!(t["error"], "kill switch stop-gpu", "{t}");
        }
        let t = status(&api, 1, cpu).await;
        assert_eq!(t["status"], "leased", "other leased work goes on: {t}");

        let audit = api.get_ok(0, "/api/v1/audit?action=switches.").await;
        let actions: Vec<&str> = audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["outcome"] == "ok")
            .map(|e| e["action"].as_str().unwrap())
            .collect();
        assert_eq!(
            actions,
            ["switches.set", "switches.lift", "switches.set"],
            "{audit}"
        );
    })
    .await;
}
