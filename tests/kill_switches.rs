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
use support::work::completed;
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

/// Waits until task `id` is `completed` and returns the agent that ran it.
async fn ran_on(api: &Api, id: u64) -> String {
    let t = completed(api, 0, id, Duration::from_secs(20)).await;
    t["agent_id"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_on_a_model_or_gateway_kind_keeps_work_off_those_agents() {
    let c = Cluster::start_with(1, "[cluster]\nshards = 2\n").await;
    bounded(TEST_BOUND, async {
        let api = c.api();
        c.leader().await;
        for (gw, model, latency) in [("gw-big", "m-big", "5ms"), ("gw-small", "m-small", "5ms")] {
            let body = json!({"id": gw, "region": "local", "max_sessions": 50, "model": model,
                              "driver": {"kind": "sim", "latency": {"dist": "fixed", "value": latency}}});
            let r = api.post(0, "/api/v1/gateways", &body).await.unwrap();
            assert_eq!(r.status, 201, "{r:?}");
            let agent = json!({"id": format!("a-{model}"), "gateway": gw, "capacity": 4});
            let r = api.post(0, "/api/v1/agents", &agent).await.unwrap();
            assert_eq!(r.status, 201, "{r:?}");
        }
        let r = api
            .post(0, "/api/v1/gateways", &json!({"id": "gw-bad", "region": "local",
                  "max_sessions": 1, "model": "bad model", "driver": {"kind": "sim"}}))
            .await
            .unwrap();
        assert_eq!(r.status, 400, "a bad model name is refused: {r:?}");

        // Model m-big stopped: every task runs on the m-small agent, on
        // both shards (one session key each spreads them).
        let r = api
            .put(0, "/api/v1/switches/no-big", &json!({"model": "m-big", "reason": "outage"}))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body["gateways"], json!(["gw-big"]), "{r:?}");
        let mut ids = Vec::new();
        for k in 0..8 {
            ids.push(submit(&api, 0, json!({"payload": {}, "session_key": format!("k{k}")})).await);
        }
        let shards: std::collections::BTreeSet<u64> = ids.iter().map(|id| id & 0xff).collect();
        assert!(shards.len() > 1, "the tasks span shards: {ids:?}");
        for id in &ids {
            assert_eq!(ran_on(&api, *id).await, "a-m-small", "task {id}");
        }

        // Swapped: a switch on the sim kind with a capability stops only
        // that work; the m-small switch stops the rest there.
        let r = api.delete(0, "/api/v1/switches/no-big").await.unwrap();
        assert_eq!(r.status, 204, "{r:?}");
        let r = api
            .put(0, "/api/v1/switches/no-small", &json!({"model": "m-small"}))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        for k in 0..4 {
            let id = submit(&api, 0, json!({"payload": {}, "session_key": format!("j{k}")})).await;
            assert_eq!(ran_on(&api, id).await, "a-m-big", "task {id}");
        }

        // A kind no gateway has stops nothing; a bad kind or share is a 400
        // and sets nothing.
        for body in [
            json!({"gateway_kind": "ftp"}),
            json!({"percent": 0}),
            json!({"percent": 101, "tenant": "acme"}),
            json!({"model": "has space"}),
        ] {
            let r = api.put(0, "/api/v1/switches/bad", &body).await.unwrap();
            assert_eq!(r.status, 400, "{body}: {r:?}");
        }
        let l = api.get_ok(0, "/api/v1/switches").await;
        let names: Vec<&str> = l["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["no-small"], "{l}");
    })
    .await;
}
