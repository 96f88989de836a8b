//! Approvals over the HTTP API, on a running node: a task submitted with
//! `requires_approval` is `awaiting_approval` and never leased; a developer
//! cannot decide it (403), an operator can; the decision is shown on the
//! task and audited; a rejection needs a reason and cancels the task with
//! its children; an undecided request lapses at its expiry; a decision on a
//! task not awaiting one is a 409 and changes nothing.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::time::Duration;

use anyhow::bail;
use godel::fsm::Role;
use serde_json::{Value, json};
use support::{Api, Cluster, bounded, deadline, wait_until};

const TEST_BOUND: Duration = Duration::from_secs(90);

/// A key of `role` in tenant `tenant`, made by the admin, and its id.
async fn key_of(api: &Api, role: Role, tenant: &str) -> (String, String) {
    let body = json!({ "name": format!("{role}-{tenant}-key"), "role": role, "tenant": tenant });
    let r = api.post(0, "/api/v1/api-keys", &body).await.unwrap();
    assert_eq!(r.status, 201, "{r:?}");
    (
        r.body["key"].as_str().expect("the key, once").to_owned(),
        r.body["id"].as_str().expect("its id").to_owned(),
    )
}

async fn submit(api: &Api, body: Value) -> u64 {
    let r = api.post(0, "/api/v1/tasks", &body).await.unwrap();
    assert_eq!(r.status, 201, "{r:?}");
    r.body["id"].as_u64().unwrap()
}

async fn lease_all(api: &Api) -> Vec<u64> {
    let body = json!({"agent_id": "w1", "capabilities": [], "max": 50, "lease_ms": 30000});
    let r = api.post(0, "/api/v1/leases", &body).await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    r.body["leases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["task_id"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_gate_tasks_and_are_decided_by_operators() {
    let c = Cluster::start(1).await;
    bounded(TEST_BOUND, async {
        let admin = c.api();
        c.leader().await;
        let (dev_key, _) = key_of(&admin, Role::Developer, "acme").await;
        let (op_key, op_id) = key_of(&admin, Role::Operator, "acme").await;
        let dev = admin.with_key(&dev_key);
        let op = admin.with_key(&op_key);

        let risky = submit(
            &dev,
            json!({"payload": {"rm": "-rf"}, "requires_approval": true}),
        )
        .await;
        let child = submit(&dev, json!({"payload": {}, "parent_id": risky})).await;
        let t = dev.get_ok(0, &format!("/api/v1/tasks/{risky}")).await;
        assert_eq!(t["status"], "awaiting_approval", "{t}");
        assert_eq!(
            t["approval"],
            json!({"expires_at": null, "decision": null}),
            "{t}"
        );
        assert_eq!(
            t["waiting_for"],
            format!("an approval (POST /tasks/{risky}/approve)"),
            "{t}"
        );
        let pending = dev.list_tasks(0, "status=awaiting_approval").await;
        assert_eq!(pending.len(), 1, "the pending approvals list: {pending:?}");
        assert_eq!(
            lease_all(&dev).await,
            vec![child],
            "only the child is leased"
        );
        // Awaiting an approval and a dependency: both are named.
        let gated = submit(
            &dev,
            json!({"payload": {}, "requires_approval": true, "depends_on": [child]}),
        )
        .await;
        let t = dev.get_ok(0, &format!("/api/v1/tasks/{gated}")).await;
        assert_eq!(
            t["waiting_for"],
            format!("an approval (POST /tasks/{gated}/approve), and tasks {child} to complete"),
            "{t}"
        );

        // A developer may not decide; an operator (who works across
        // tenants, as an admin does) may.
        let r = dev
            .post(0, &format!("/api/v1/tasks/{risky}/approve"), &json!({}))
            .await
            .unwrap();
        r.assert_error(403, "forbidden");
        let r = op
            .post(
                0,
                &format!("/api/v1/tasks/{risky}/approve"),
                &json!({"reason": "reviewed"}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body["status"], "pending", "{r:?}");
        let d = &r.body["approval"]["decision"];
        assert_eq!(
            (&d["approved"], &d["by"], &d["reason"]),
            (
                &json!(true),
                &json!(format!("key:{op_id}")),
                &json!("reviewed")
            ),
            "{r:?}"
        );
        assert_eq!(lease_all(&dev).await, vec![risky]);
        let audit = admin.get_ok(0, "/api/v1/audit?action=tasks.approve").await;
        let items = audit["items"].as_array().unwrap();
        let outcomes: Vec<&str> = items
            .iter()
            .map(|e| e["outcome"].as_str().unwrap())
            .collect();
        assert_eq!(
            outcomes,
            ["denied:forbidden", "ok"],
            "both calls are audited: {audit}"
        );
        assert_eq!(items[1]["actor"], format!("key:{op_id}"), "{audit}");
        assert_eq!(items[1]["target"], format!("task/{risky}"), "{audit}");

        // Decided already: 409, nothing changes.
        let r = op
            .post(
                0,
                &format!("/api/v1/tasks/{risky}/reject"),
                &json!({"reason": "late"}),
            )
            .await
            .unwrap();
        r.assert_error(409, "conflict");
        let t = dev.get_ok(0, &format!("/api/v1/tasks/{risky}")).await;
        assert_eq!(t["status"], "leased", "{t}");

        // A rejection needs a reason, and cancels the task and its children.
        let second = submit(&dev, json!({"payload": {}, "requires_approval": true})).await;
        let its_child = submit(&dev, json!({"payload": {}, "parent_id": second})).await;
        for body in [json!({}), json!({"reason": ""})] {
            let r = op
                .post(0, &format!("/api/v1/tasks/{second}/reject"), &body)
                .await
                .unwrap();
            assert_eq!(r.status, 400, "{body}: {r:?}");
        }
        let r = op
            .post(
                0,
                &format!("/api/v1/tasks/{second}/reject"),
                &json!({"reason": "too risky"}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body["status"], "cancelled", "{r:?}");
        assert_eq!(
            r.body["error"],
            format!("rejected by key:{op_id}: too risky"),
            "{r:?}"
        );
        let t = dev.get_ok(0, &format!("/api/v1/tasks/{its_child}")).await;
        assert_eq!(t["status"], "cancelled", "{t}");
        assert_eq!(t["error"], format!("parent {second} was cancelled"), "{t}");

        // Undecided past its expiry: cancelled by the cluster's clock.
        let lapses = submit(
            &dev,
            json!({"payload": {}, "requires_approval": true, "approval_expires_in_ms": 1000}),
        )
        .await;
        let t = dev.get_ok(0, &format!("/api/v1/tasks/{lapses}")).await;
        assert!(t["approval"]["expires_at"].is_string(), "{t}");
        let t = wait_until(
            "the approval request to lapse",
            deadline(Duration::from_secs(20)),
            async || {
                let t = dev.get_ok(0, &format!("/api/v1/tasks/{lapses}")).await;
                if t["status"] == "cancelled" {
                    Ok(t)
                } else {
                    bail!("{t}")
                }
            },
        )
        .await;
        assert_eq!(t["error"], "approval expired undecided", "{t}");

        // Bad input: an expiry without approval, or out of range.
        for body in [
            json!({"payload": {}, "approval_expires_in_ms": 5000}),
            json!({"payload": {}, "requires_approval": true, "approval_expires_in_ms": 5}),
        ] {
            let r = dev.post(0, "/api/v1/tasks", &body).await.unwrap();
            assert_eq!(r.status, 400, "{body}: {r:?}");
        }
    })
    .await;
}
