//! Feature flags over the HTTP API, on three nodes: a flag set through one
//! node is on for the next attempts of the work it matches, whichever node
//! runs them (the simulator echoes the flags it was handed); off or
//! removed, it is on for nothing; a share is on for part of the work; an
//! external worker gets the flags on for its task with the lease; bad
//! flags are refused and change nothing; every change is audited.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::work::completed;
use support::{Api, Cluster, bounded};

const TEST_BOUND: Duration = Duration::from_secs(120);

async fn submit(api: &Api, body: Value) -> u64 {
    let r = api.post(0, "/api/v1/tasks", &body).await.unwrap();
    assert_eq!(r.status, 201, "{r:?}");
    r.body["id"].as_u64().unwrap()
}

/// The flags the gateway was handed for task `id`, once it completed.
async fn flags_seen(api: &Api, id: u64) -> Vec<String> {
    let t = completed(api, 0, id, Duration::from_secs(20)).await;
    t["result"]["flags"]
        .as_array()
        .map(|a| a.iter().map(|f| f.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flag_reaches_the_attempts_of_the_work_it_matches() {
    let c = Cluster::start(3).await;
    bounded(TEST_BOUND, async {
        let api = c.api();
        c.leader().await;
        let gw = json!({"id": "gw-sim", "region": "local", "max_sessions": 50, "model": "m-1",
                        "capabilities": ["llm"], "driver": {"kind": "sim"}});
        let r = api.post(0, "/api/v1/gateways", &gw).await.unwrap();
        assert_eq!(r.status, 201, "{r:?}");
        let a = json!({"id": "a-1", "gateway": "gw-sim", "capacity": 8, "capabilities": ["llm"]});
        let r = api.post(0, "/api/v1/agents", &a).await.unwrap();
        assert_eq!(r.status, 201, "{r:?}");

        // No flag: none handed over.
        let id = submit(&api, json!({"payload": {}, "capabilities": ["llm"]})).await;
        assert!(flags_seen(&api, id).await.is_empty());

        // Set through node 2: on for the next attempts, wherever they run.
        let r = api
            .put(
                2,
                "/api/v1/flags/new-prompt",
                &json!({"enabled": true, "capability": "llm", "model": "m-1",
                 "description": "the new system prompt"}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body["enabled"], true, "{r:?}");
        assert!(
            r.body["set_by"].as_str().unwrap().starts_with("key:"),
            "{r:?}"
        );
        let r = api
            .put(
                1,
                "/api/v1/flags/other-model",
                &json!({"enabled": true, "model": "m-2"}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        for i in 0..3 {
            let l = api.get_ok(i, "/api/v1/flags").await;
            assert_eq!(l["items"].as_array().unwrap().len(), 2, "node {i}: {l}");
        }
        let id = submit(&api, json!({"payload": {}, "capabilities": ["llm"]})).await;
        assert_eq!(flags_seen(&api, id).await, ["new-prompt"]);
        let id = submit(&api, json!({"payload": {}})).await;
        assert!(
            flags_seen(&api, id).await.is_empty(),
            "a task without the capability is out of the flag's scope"
        );

        // Off: kept, on for nothing.
        let r = api
            .put(
                0,
                "/api/v1/flags/new-prompt",
                &json!({"enabled": false, "capability": "llm"}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        let id = submit(&api, json!({"payload": {}, "capabilities": ["llm"]})).await;
        assert!(flags_seen(&api, id).await.is_empty());

        // A share: on for part of the work, not none and not all.
        let r = api
            .put(
                0,
                "/api/v1/flags/half",
                &json!({"enabled": true, "percent": 50}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        let mut ids = Vec::new();
        for _ in 0..30 {
            ids.push(submit(&api, json!({"payload": {}})).await);
        }
        let mut on = 0;
        for id in ids {
            if flags_seen(&api, id).await == ["half"] {
                on += 1;
            }
        }
        assert!((3..=27).contains(&on), "{on} of 30 at 50%");

        // An external worker gets the flags on for its task with its lease.
        let r = api.delete(0, "/api/v1/flags/half").await.unwrap();
        assert_eq!(r.status, 204, "{r:?}");
        let r = api
            .put(
                0,
                "/api/v1/flags/for-workers",
                &json!({"enabled": true, "capability": "batch"}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        let id = submit(&api, json!({"payload": {}, "capabilities": ["batch"]})).await;
        let body = json!({"agent_id": "w-ext", "capabilities": ["batch"], "max": 1});
        let r = api.post(1, "/api/v1/leases", &body).await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body["leases"][0]["task_id"], id, "{r:?}");
        assert_eq!(
            r.body["leases"][0]["flags"],
            json!(["for-workers"]),
            "{r:?}"
        );

        // Bad flags: 400, nothing set; removing a missing one: 404.
        for body in [
            json!({}),
            json!({"enabled": true, "percent": 0}),
            json!({"enabled": true, "percent": 101}),
            json!({"enabled": true, "gateway_kind": "ftp"}),
            json!({"enabled": true, "tenant": "bad name"}),
            json!({"enabled": "yes"}),
            json!({"enabled": true, "surprise": 1}),
        ] {
            let r = api.put(0, "/api/v1/flags/bad", &body).await.unwrap();
            assert_eq!(r.status, 400, "{body}: {r:?}");
        }
        let r = api.delete(0, "/api/v1/flags/never-set").await.unwrap();
        r.assert_error(404, "not_found");
        let l = api.get_ok(0, "/api/v1/flags").await;
        let names: Vec<&str> = l["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["for-workers", "new-prompt", "other-model"], "{l}");

        let audit = api.get_ok(0, "/api/v1/audit?action=flags.").await;
        let actions: Vec<&str> = audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["outcome"] == "ok")
            .map(|e| e["action"].as_str().unwrap())
            .collect();
        assert_eq!(
            actions,
            [
                "flags.set",
                "flags.set",
                "flags.set",
                "flags.set",
                "flags.remove",
                "flags.set"
            ],
            "{audit}"
        );
    })
    .await;
}
