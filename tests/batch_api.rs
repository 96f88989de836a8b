//! The batch APIs end to end over real `godel serve` processes:
//! `POST /api/v1/tasks:batch` (up to 1,000 tasks, a result per task) and
//! `POST /api/v1/leases:batch` (complete and fail many leases at once), with
//! one queue group and with three queue shards.
//!
//! What it proves:
//!
//! - a batch sent through a follower answers a result per task, in order:
//!   201 with the task, 200 with the earlier task for an idempotency key
//!   seen before (in the same batch or an earlier one), and the error
//!   `POST /tasks` would have given for a task refused for what the
//!   cluster holds (a missing parent or dependency), which alone is not
//!   submitted;
//! - sending the same batch again creates nothing new;
//! - a batch that is not 1 to 1,000 valid tasks (one bad field value is
//!   enough, and the error names the task), or names a tenant
//!   the credential may not, is refused whole and changes nothing (the
//!   queue depth is unchanged), and a developer's batch lands in its own
//!   tenant only;
//! - `max` on the lease call leases several tasks, and one `leases:batch`
//!   completes some and fails others (a non-retryable failure is a dead
//!   letter), with per-item errors for a token that names no lease or one
//!   already finished (also when named twice in one call);
//! - full batches of 1,000 sent through a follower at once, with single
//!   submissions between them, all commit (a batch is never split, nor
//!   joined with others past what a forwarded entry may hold);
//! - a batch counts its own tasks against `max_unfinished_tasks`;
//! - with three shards, a batch spreads its tasks over the shards as
//!   single submissions would, and one `leases:batch` settles leases of
//!   several shards.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};
use support::work::lease_as;
use support::{Api, Cluster, bounded};

const TEST_BOUND: Duration = Duration::from_secs(180);

/// The pending tasks the queue holds.
async fn depth(api: &Api, i: usize) -> u64 {
    let d = api.depth(i).await;
    d["pending"]
        .as_u64()
        .unwrap_or_else(|| panic!("depth: {d}"))
}

fn items(body: &Value) -> &Vec<Value> {
    body["items"]
        .as_array()
        .unwrap_or_else(|| panic!("items: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_of_tasks_and_of_lease_results() {
    bounded(TEST_BOUND, async {
        let c = Cluster::start(3).await;
        let api = c.api();
        let leader = c.leader().await;
        let follower = (leader + 1) % 3;

        // One batch through a follower: created, a repeated key, a refusal.
        let batch = json!({"tasks": [
            {"payload": {"n": 0}, "priority": "low", "idempotency_key": "k0"},
            {"payload": {"n": 1}, "priority": "critical", "idempotency_key": "k1"},
            {"payload": {"n": 2}, "parent_id": 999_999, "idempotency_key": "k2"},
            {"payload": {"n": 3}, "idempotency_key": "k1"},
            {"payload": {"n": 4}, "depends_on": [999_998], "idempotency_key": "k4"},
            {"payload": {"n": 5}, "priority": "high"},
        ]});
        let r = api.post(follower, "/api/v1/tasks:batch", &batch).await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        let it = items(&r.body);
        assert_eq!(it.len(), 6, "{}", r.body);
        let statuses: Vec<u64> = it.iter().map(|i| i["status"].as_u64().unwrap()).collect();
        assert_eq!(statuses, [201, 201, 400, 200, 400, 201], "{}", r.body);
        assert_eq!((r.body["created"].as_u64(), r.body["existing"].as_u64(), r.body["failed"].as_u64()),
                   (Some(3), Some(1), Some(2)), "{}", r.body);
        assert_eq!(it[1]["task"]["id"], it[3]["task"]["id"], "same key, same task: {}", r.body);
        assert_eq!(it[3]["task"]["payload"], json!({"n": 1}), "the first task's: {}", r.body);
        assert_eq!(it[2]["error"]["code"], "invalid_request", "{}", r.body);
        assert!(it[2]["error"]["message"].as_str().unwrap().contains("parent"), "{}", r.body);
        assert!(it[4]["error"]["message"].as_str().unwrap().contains("999998"), "{}", r.body);
        assert!(it[2].get("task").is_none(), "{}", r.body);
        assert_eq!(it[0]["task"]["priority"], "low");
        assert_eq!(it[5]["task"]["priority"], "high");
        let ids: Vec<u64> = [0, 1, 5].iter().map(|&k| it[k]["task"]["id"].as_u64().unwrap()).collect();
        assert!(ids[0] < ids[1] && ids[1] < ids[2], "submitted in order: {ids:?}");
        for (k, id) in [0, 1, 5].iter().zip(&ids) {
            let t = api.get_ok(leader, &format!("/api/v1/tasks/{id}")).await;
            assert_eq!(t["payload"], it[*k]["task"]["payload"], "{t}");
        }
        assert_eq!(depth(&api, leader).await, 3);

        // The same batch again: nothing new (the keyless task aside).
        let again = json!({"tasks": batch["tasks"].as_array().unwrap()[..5]});
        let r = api.post(leader, "/api/v1/tasks:batch", &again).await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        let statuses: Vec<u64> = items(&r.body).iter().map(|i| i["status"].as_u64().unwrap()).collect();
        assert_eq!(statuses, [200, 200, 400, 200, 400], "{}", r.body);
        assert_eq!(items(&r.body)[0]["task"]["id"], ids[0]);
        assert_eq!(depth(&api, leader).await, 3);

        // Refused whole, nothing changed.
        let many: Vec<Value> = (0..1001).map(|n| json!({"payload": {"n": n}})).collect();
        for (body, what) in [
            (json!({"tasks": []}), "tasks"),
            (json!({"tasks": many}), "tasks"),
            (json!({"tasks": [{"payload": {}}, {"payload": {}, "colour": "red"}]}), "colour"),
            (json!({"tasks": [{"payload": {}}], "extra": 1}), "extra"),
            (json!({"task": [{"payload": {}}]}), "task"),
            (json!({"tasks": [{"payload": {}}, {"payload": {}, "max_attempts": 0}]}), "tasks[1]: invalid field `max_attempts`"),
            (json!({"tasks": [{"payload": "not an object"}]}), "tasks[0]: invalid field `payload`"),
        ] {
            let r = api.post(follower, "/api/v1/tasks:batch", &body).await.unwrap();
            r.assert_error(400, "invalid_request");
            assert!(r.message().contains(what), "{what}: {r:?}");
        }
        assert_eq!(depth(&api, leader).await, 3);
        // Every task refused: answered per item, nothing written.
        let none = json!({"tasks": [{"payload": {}, "parent_id": 999_997}, {"payload": {}, "depends_on": [999_996]}]});
        let r = api.post(follower, "/api/v1/tasks:batch", &none).await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!((r.body["created"].as_u64(), r.body["failed"].as_u64()), (Some(0), Some(2)), "{}", r.body);
        assert_eq!(depth(&api, leader).await, 3);

        // A developer's batch: its own tenant, and no other.
        let key = json!({"name": "beta-dev", "role": "developer", "tenant": "beta"});
        let r = api.post(leader, "/api/v1/api-keys", &key).await.unwrap();
        assert_eq!(r.status, 201, "{r:?}");
        let dev = api.with_key(r.body["key"].as_str().unwrap());
        let foreign = json!({"tasks": [{"payload": {"n": 1}}, {"payload": {"n": 2}, "tenant": "acme"}]});
        dev.post(leader, "/api/v1/tasks:batch", &foreign).await.unwrap().assert_error(403, "forbidden");
        assert_eq!(depth(&api, leader).await, 3);
        let own = json!({"tasks": [{"payload": {"n": 7}}, {"payload": {"n": 8}, "tenant": "beta"}]});
        let r = dev.post(leader, "/api/v1/tasks:batch", &own).await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        for item in items(&r.body) {
            assert_eq!(item["status"], 201, "{}", r.body);
            assert_eq!(item["task"]["tenant"], "beta", "{}", r.body);
        }
        let beta: Vec<u64> = items(&r.body).iter().map(|i| i["task"]["id"].as_u64().unwrap()).collect();
        dev.get(leader, &format!("/api/v1/tasks/{}", ids[0])).await.unwrap().assert_error(404, "not_found");
        assert_eq!(depth(&api, leader).await, 5);

        // Lease five at once (strict priority: critical, high, medium x2, low).
        let grants = lease_as(&api, follower, "w1", 10, 60_000).await;
        assert_eq!(grants.len(), 5, "{grants:?}");
        assert_eq!(grants[0].task_id, ids[1], "critical first: {grants:?}");
        assert_eq!(grants[1].task_id, ids[2], "then high: {grants:?}");
        assert_eq!(grants[4].task_id, ids[0], "low last: {grants:?}");
        let tok = |k: usize| grants[k].token;

        let r = api.post(follower, "/api/v1/leases:batch", &json!({"results": []})).await.unwrap();
        r.assert_error(400, "invalid_request");
        assert_eq!(api.list_tasks(leader, "status=leased").await.len(), 5);

        // Complete two, fail one for good, one for a retry; an unknown lease.
        let report = json!({"results": [
            {"fencing_token": tok(0), "result": {"ok": 0}},
            {"fencing_token": tok(1), "error": "boom", "retryable": false},
            {"fencing_token": 4_000_000_000_u64},
            {"fencing_token": tok(2), "result": {"ok": 2}},
            {"fencing_token": tok(3), "error": "again"},
            {"fencing_token": tok(4), "retryable": false},
            {"fencing_token": 4_000_000_001_u64, "result": {"x": 1}, "error": "both"},
        ]});
        let r = api.post(follower, "/api/v1/leases:batch", &report).await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        let it = items(&r.body);
        let statuses: Vec<u64> = it.iter().map(|i| i["status"].as_u64().unwrap()).collect();
        assert_eq!(statuses[..2], [200, 200], "{}", r.body);
        assert!(statuses[2] == 404 || statuses[2] == 409, "{}", r.body);
        assert_eq!(statuses[3..], [200, 200, 400, 400], "{}", r.body);
        assert_eq!((r.body["done"].as_u64(), r.body["failed"].as_u64()), (Some(4), Some(3)), "{}", r.body);
        assert_eq!(it[0]["task"]["status"], "completed", "{}", r.body);
        assert_eq!(it[0]["task"]["result"], json!({"ok": 0}), "{}", r.body);
        assert_eq!(it[1]["task"]["status"], "dead_letter", "{}", r.body);
        assert_eq!(it[4]["task"]["status"], "failed", "waiting to retry: {}", r.body);
        // The one refused item changed nothing: still leased.
        let t = api.get_ok(leader, &format!("/api/v1/tasks/{}", grants[4].task_id)).await;
        assert_eq!(t["status"], "leased", "{t}");

        // Finished leases cannot be reported again; a lease named twice in
        // one call: the first report counts, the second is a conflict.
        let r = api.post(leader, "/api/v1/leases:batch",
                         &json!({"results": [{"fencing_token": tok(0)}, {"fencing_token": tok(4)},
                                             {"fencing_token": tok(4), "error": "late"}]})).await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        let it = items(&r.body);
        assert_eq!(it[0]["status"], 409, "{}", r.body);
        assert_eq!(it[1]["status"], 200, "{}", r.body);
        assert_eq!(it[1]["task"]["status"], "completed", "{}", r.body);
        assert_eq!(it[2]["status"], 409, "{}", r.body);
        assert!(beta.iter().all(|id| *id > ids[2]));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_batches_through_a_follower() {
    bounded(TEST_BOUND, async {
        let c = Cluster::start(3).await;
        let api = c.api();
        let leader = c.leader().await;
        let follower = (leader + 1) % 3;
        // Full batches through a follower at once, with single submissions
        // between them: each batch is one job, never split and never
        // joined past the entry limit (a follower forwards at most one
        // batch's worth, and a bigger entry would be refused whole).
        let full = |b: usize| {
            let tasks: Vec<Value> = (0..1000)
                .map(|n| json!({"payload": {"b": b, "n": n}, "idempotency_key": format!("full-{b}-{n}")}))
                .collect();
            json!({"tasks": tasks})
        };
        let batches = (0..3).map(|b| {
            let (api, body) = (api.clone(), full(b));
            tokio::spawn(async move { api.post(follower, "/api/v1/tasks:batch", &body).await })
        });
        let singles = (0..20).map(|n| {
            let api = api.clone();
            let body = json!({"payload": {"single": n}, "priority": "low", "idempotency_key": format!("one-{n}")});
            tokio::spawn(async move { api.post(follower, "/api/v1/tasks", &body).await })
        });
        let singles: Vec<_> = singles.collect();
        for b in batches.collect::<Vec<_>>() {
            let r = b.await.unwrap().unwrap();
            assert_eq!(r.status, 200, "{r:?}");
            assert_eq!(r.body["created"], 1000, "{}", r.body["items"][0]);
        }
        for s in singles {
            let r = s.await.unwrap().unwrap();
            assert_eq!(r.status, 201, "{r:?}");
        }
        assert_eq!(depth(&api, leader).await, 3000 + 20);

    })
    .await;
}

/// A batch counts its own tasks against `queue.max_unfinished_tasks`:
/// the tasks past the limit are refused (429, `shed`), not all admitted
/// against the count from before the batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_counts_itself_against_the_limits() {
    bounded(TEST_BOUND, async {
        let c = Cluster::start_with(1, "[queue]\nmax_unfinished_tasks = 20\n").await;
        let api = c.api();
        let one = api
            .post(
                0,
                "/api/v1/tasks",
                &json!({"payload": {}, "priority": "critical"}),
            )
            .await
            .unwrap();
        assert_eq!(one.status, 201, "{one:?}");
        let tasks: Vec<Value> = (0..30)
            .map(|n| json!({"payload": {"n": n}, "priority": "critical"}))
            .collect();
        let r = api
            .post(0, "/api/v1/tasks:batch", &json!({"tasks": tasks}))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(
            (r.body["created"].as_u64(), r.body["failed"].as_u64()),
            (Some(19), Some(11)),
            "{}",
            r.body
        );
        let it = items(&r.body);
        assert!(it[..19].iter().all(|i| i["status"] == 201), "{}", r.body);
        for i in &it[19..] {
            assert_eq!(
                (i["status"].as_u64(), i["error"]["code"].as_str()),
                (Some(429), Some("shed")),
                "{}",
                r.body
            );
        }
        assert_eq!(depth(&api, 0).await, 20);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_over_queue_shards() {
    bounded(TEST_BOUND, async {
        let c = Cluster::start_with(3, "[cluster]\nshards = 3\n").await;
        let api = c.api();
        let tasks: Vec<Value> = (0..30)
            .map(|n| json!({"payload": {"n": n}, "session_key": format!("s{n}"), "idempotency_key": format!("k{n}")}))
            .collect();
        let until = support::deadline(Duration::from_secs(40));
        let r = support::wait_until("a batch over the shards", until, async || {
            let r = api.post(1, "/api/v1/tasks:batch", &json!({"tasks": tasks})).await?;
            anyhow::ensure!(r.status == 200 && r.body["failed"] == 0, "{r:?}");
            Ok(r)
        })
        .await;
        assert_eq!(r.body["created"].as_u64().unwrap() + r.body["existing"].as_u64().unwrap(), 30, "{}", r.body);
        let shards: BTreeSet<u64> = items(&r.body)
            .iter()
            .map(|i| i["task"]["id"].as_u64().unwrap() & 0xff)
            .collect();
        assert_eq!(shards, BTreeSet::from([1, 2, 3]), "{}", r.body);
        // The same key through another node: the same task.
        let single = api.post(2, "/api/v1/tasks", &tasks[7]).await.unwrap();
        assert_eq!(single.status, 200, "{single:?}");
        assert_eq!(single.body["id"], items(&r.body)[7]["task"]["id"]);

        // Lease from every shard, then settle them all in one call.
        let mut grants = Vec::new();
        for w in 0..30 {
            grants.extend(lease_as(&api, w % 3, &format!("w{w}"), 30, 60_000).await);
            if grants.len() == 30 {
                break;
            }
        }
        assert_eq!(grants.len(), 30);
        let lease_shards: BTreeSet<u64> = grants.iter().map(|g| g.token & 0xff).collect();
        assert_eq!(lease_shards, BTreeSet::from([1, 2, 3]));
        let results: Vec<Value> = grants
            .iter()
            .map(|g| json!({"fencing_token": g.token, "result": {"task": g.task_id}}))
            .collect();
        let r = api.post(0, "/api/v1/leases:batch", &json!({"results": results})).await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body["done"], 30, "{}", r.body);
        for (g, item) in grants.iter().zip(items(&r.body)) {
            assert_eq!(item["task"]["id"], g.task_id, "in order: {}", r.body);
            assert_eq!(item["task"]["status"], "completed");
        }
        assert_eq!(depth(&api, 0).await, 0);
    })
    .await;
}
