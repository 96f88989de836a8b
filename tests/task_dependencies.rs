//! Task dependencies and cancel cascading over the HTTP API, on running
//! nodes: a task submitted with `depends_on` is not leased before its
//! dependencies complete, `GET /tasks/{id}` says what it waits for, a
//! dead-lettered dependency cancels or blocks its dependents by their
//! policy, bad dependencies are refused (400) and change nothing, and
//! cancelling a parent cancels its children unless `keep_children`. With
//! three queue shards a dependent goes to its dependencies' shard, and
//! dependencies in two shards are refused.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Api, Cluster, bounded};

const TEST_BOUND: Duration = Duration::from_secs(120);

async fn submit(api: &Api, i: usize, body: Value) -> u64 {
    let r = api.post(i, "/api/v1/tasks", &body).await.unwrap();
    assert_eq!(r.status, 201, "{r:?}");
    r.body["id"].as_u64().unwrap()
}

/// Leases up to `max` tasks for an external worker through node `i`: the
/// task ids and tokens granted.
async fn lease(api: &Api, i: usize, max: u32) -> Vec<(u64, u64)> {
    let body = json!({"agent_id": "w1", "capabilities": [], "max": max, "lease_ms": 30000});
    let r = api.post(i, "/api/v1/leases", &body).await.unwrap();
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

async fn report(api: &Api, token: u64, verb: &str, body: Value) -> Value {
    let r = api
        .post(0, &format!("/api/v1/leases/{token}/{verb}"), &body)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    r.body
}

async fn task(api: &Api, id: u64) -> Value {
    api.get_ok(0, &format!("/api/v1/tasks/{id}")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependents_wait_then_run_and_failures_cancel_or_block() {
    let c = Cluster::start(1).await;
    bounded(TEST_BOUND, async {
        let api = c.api();
        c.leader().await;

        let a = submit(&api, 0, json!({"payload": {"step": "a"}})).await;
        let b = submit(&api, 0, json!({"payload": {"step": "b"}})).await;
        let both = submit(
            &api,
            0,
            json!({"payload": {"step": "c"}, "depends_on": [a, b], "priority": "critical"}),
        )
        .await;
        let t = task(&api, both).await;
        assert_eq!(t["status"], "waiting", "{t}");
        assert_eq!(t["depends_on"], json!([a, b]), "{t}");
        assert_eq!(t["waiting_on"], json!([a, b]), "{t}");
        assert_eq!(t["on_dependency_failure"], "cancel", "{t}");
        assert_eq!(
            t["waiting_for"],
            format!("tasks {a}, {b} to complete"),
            "{t}"
        );
        let depth = api.depth(0).await;
        assert_eq!(
            depth["by_tenant"]["default"]["waiting"], 1,
            "depth counts it: {depth}"
        );

        // A critical dependent does not jump ahead of its medium
        // dependencies: a lease of everything gets a and b only.
        let granted = lease(&api, 0, 10).await;
        let ids: Vec<u64> = granted.iter().map(|g| g.0).collect();
        assert_eq!(ids, vec![a, b], "only the dependencies are leased");
        report(&api, granted[0].1, "complete", json!({"result": {}})).await;
        let t = task(&api, both).await;
        assert_eq!(
            (&t["status"], &t["waiting_on"]),
            (&json!("waiting"), &json!([b])),
            "{t}"
        );
        assert!(lease(&api, 0, 10).await.is_empty(), "nothing else is ready");
        report(&api, granted[1].1, "complete", json!({"result": {}})).await;
        let t = task(&api, both).await;
        assert_eq!(t["status"], "pending", "{t}");
        assert_eq!(t["waiting_on"], json!([]), "{t}");
        let next = lease(&api, 0, 10).await;
        assert_eq!(next.iter().map(|g| g.0).collect::<Vec<_>>(), vec![both]);
        report(&api, next[0].1, "complete", json!({"result": {}})).await;

        // A dead-lettered dependency: the `cancel` dependent is cancelled,
        // the `block` one waits, blocked, and goes on after a replay.
        let d = submit(&api, 0, json!({"payload": {}, "max_attempts": 1})).await;
        let cancels = submit(&api, 0, json!({"payload": {}, "depends_on": [d]})).await;
        let blocks = submit(
            &api,
            0,
            json!({"payload": {}, "depends_on": [d], "on_dependency_failure": "block"}),
        )
        .await;
        let g = lease(&api, 0, 10).await;
        assert_eq!(g.iter().map(|g| g.0).collect::<Vec<_>>(), vec![d]);
        let failed = report(
            &api,
            g[0].1,
            "fail",
            json!({"error": "bad input", "retryable": false}),
        )
        .await;
        assert_eq!(failed["status"], "dead_letter", "{failed}");
        let t = task(&api, cancels).await;
        assert_eq!(t["status"], "cancelled", "{t}");
        assert_eq!(t["error"], format!("dependency {d} is dead_letter"), "{t}");
        let t = task(&api, blocks).await;
        assert_eq!(t["status"], "waiting", "{t}");
        assert_eq!(
            t["blocked"],
            format!("dependency {d} is dead_letter"),
            "{t}"
        );
        assert_eq!(
            t["waiting_for"],
            format!("blocked: dependency {d} is dead_letter"),
            "{t}"
        );
        let r = api
            .post(0, "/api/v1/dead-letter/replay", &json!({"ids": [d]}))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        let t = task(&api, blocks).await;
        assert_eq!(t["blocked"], Value::Null, "a replay unblocks it: {t}");
        let g = lease(&api, 0, 10).await;
        assert_eq!(g.iter().map(|g| g.0).collect::<Vec<_>>(), vec![d]);
        report(&api, g[0].1, "complete", json!({"result": {}})).await;
        assert_eq!(task(&api, blocks).await["status"], "pending");
        let g = lease(&api, 0, 10).await;
        assert_eq!(g.iter().map(|g| g.0).collect::<Vec<_>>(), vec![blocks]);

        // Bad dependencies: 400, and nothing is created.
        let before = api.list_tasks(0, "").await.len();
        let cancelled = submit(&api, 0, json!({"payload": {}})).await;
        let r = api
            .post(0, &format!("/api/v1/tasks/{cancelled}/cancel"), &json!({}))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        for (body, says) in [
            (
                json!({"payload": {}, "depends_on": [999_999]}),
                "does not exist",
            ),
            (json!({"payload": {}, "depends_on": [a, a]}), "twice"),
            (
                json!({"payload": {}, "depends_on": [cancelled]}),
                "will never complete",
            ),
            (
                json!({"payload": {}, "on_dependency_failure": "block"}),
                "only with depends_on",
            ),
        ] {
            let r = api.post(0, "/api/v1/tasks", &body).await.unwrap();
            r.assert_error(400, "invalid_request");
            assert!(r.message().contains(says), "{body}: {r:?}");
        }
        let body = json!({"name": "other-operator", "role": "operator", "tenant": "other"});
        let r = api.post(0, "/api/v1/api-keys", &body).await.unwrap();
        assert_eq!(r.status, 201, "{r:?}");
        let other = api.with_key(r.body["key"].as_str().expect("the key, once"));
        let r = other
            .post(
                0,
                "/api/v1/tasks",
                &json!({"payload": {}, "depends_on": [a]}),
            )
            .await
            .unwrap();
        r.assert_error(400, "invalid_request");
        assert!(
            r.message().contains("does not exist"),
            "another tenant's task is not named: {r:?}"
        );
        assert_eq!(api.list_tasks(0, "").await.len(), before + 1);

        // Cancelling a parent cancels its children (and theirs), unless
        // the cancel keeps them.
        let parent = submit(&api, 0, json!({"payload": {}})).await;
        let child = submit(&api, 0, json!({"payload": {}, "parent_id": parent})).await;
        let grandchild = submit(&api, 0, json!({"payload": {}, "parent_id": child})).await;
        let r = api
            .post(
                0,
                &format!("/api/v1/tasks/{parent}/cancel"),
                &json!({"reason": "no longer needed"}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        for (id, why) in [(child, parent), (grandchild, child)] {
            let t = task(&api, id).await;
            assert_eq!(t["status"], "cancelled", "{t}");
            assert_eq!(t["error"], format!("parent {why} was cancelled"), "{t}");
        }
        let parent = submit(&api, 0, json!({"payload": {}})).await;
        let child = submit(&api, 0, json!({"payload": {}, "parent_id": parent})).await;
        let r = api
            .post(
                0,
                &format!("/api/v1/tasks/{parent}/cancel"),
                &json!({"keep_children": true}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(task(&api, child).await["status"], "pending");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_shards_a_dependent_goes_to_its_dependencies_shard() {
    let c = Cluster::start_with(3, "[cluster]\nshards = 3\n").await;
    bounded(TEST_BOUND, async {
        let api = c.api();
        c.leader().await;
        // Tasks with a session key each until two land in different shards.
        let mut by_shard: std::collections::BTreeMap<u64, u64> = Default::default();
        for k in 0..40 {
            let id = submit(
                &api,
                k % 3,
                json!({"payload": {}, "session_key": format!("s{k}")}),
            )
            .await;
            by_shard.entry(id & 0xff).or_insert(id);
            if by_shard.len() == 3 {
                break;
            }
        }
        assert_eq!(by_shard.len(), 3, "sessions spread over the shards");
        let ids: Vec<u64> = by_shard.values().copied().collect();
        for (i, dep) in ids.iter().enumerate() {
            let dependent = submit(&api, i, json!({"payload": {}, "depends_on": [dep]})).await;
            assert_eq!(
                dependent & 0xff,
                dep & 0xff,
                "task {dependent} goes to its dependency {dep}'s shard"
            );
            let t = api
                .get_ok((i + 1) % 3, &format!("/api/v1/tasks/{dependent}"))
                .await;
            assert_eq!(t["status"], "waiting", "{t}");
        }
        let r = api
            .post(
                0,
                "/api/v1/tasks",
                &json!({"payload": {}, "depends_on": [ids[0], ids[1]]}),
            )
            .await
            .unwrap();
        r.assert_error(400, "invalid_request");
        assert!(r.message().contains("different queue shards"), "{r:?}");
    })
    .await;
}
