//! Task-queue workflows over the API that stay correct when a spurious
//! election turns a reply into a 503: submits carry idempotency keys, each
//! lease request uses a fresh agent id whose result can be read back from
//! the committed state, and a completion retried after an unknown outcome
//! checks that the task did complete.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Api, deadline};

/// Long enough that no lease expires during a test.
pub const LONG_LEASE_MS: u64 = 600_000;

/// One lease: from a `POST /api/v1/leases` reply or read back from a task.
#[derive(Clone, Debug)]
pub struct Grant {
    /// The task.
    pub task_id: u64,
    /// Its fencing token.
    pub token: u64,
    /// The task's priority.
    pub priority: String,
    /// The task's tenant.
    pub tenant: String,
}

impl Grant {
    /// From a task view that has a live lease.
    pub fn of_task(t: &Value) -> Grant {
        Grant {
            task_id: t["id"].as_u64().expect("id"),
            token: t["lease"]["fencing_token"]
                .as_u64()
                .unwrap_or_else(|| panic!("task without a lease: {t}")),
            priority: t["priority"].as_str().expect("priority").into(),
            tenant: t["tenant"].as_str().expect("tenant").into(),
        }
    }
}

/// Leases up to `max` tasks for a fresh `agent` id through node `i`. A
/// reply lost to a 503 may still have committed, so after one the result is
/// read back from the committed state: every task leased to `agent`.
pub async fn lease_as(api: &Api, i: usize, agent: &str, max: u32, lease_ms: u64) -> Vec<Grant> {
    let body = json!({ "agent_id": agent, "capabilities": [], "max": max, "lease_ms": lease_ms });
    let until = deadline(Duration::from_secs(20));
    let mut ambiguous = false;
    loop {
        let last = match api.post(i, "/api/v1/leases", &body).await {
            Ok(r) if r.status == 200 && !ambiguous => {
                let leases = r.body["leases"].as_array().expect("leases");
                return leases
                    .iter()
                    .map(|g| {
                        let grant = Grant::of_task(&g["task"]);
                        assert_eq!(g["task_id"], grant.task_id, "{g}");
                        assert_eq!(g["fencing_token"], grant.token, "{g}");
                        assert!(g["expires_at"].is_string(), "{g}");
                        grant
                    })
                    .collect();
            }
            Ok(r) if r.status == 200 => break,
            Ok(r) if matches!(r.status, 429 | 503 | 504) => format!("{r:?}"),
            Ok(r) => panic!("lease as {agent} on node index {i}: {r:?}"),
            Err(e) => format!("{e:#}"),
        };
        ambiguous = true;
        eprintln!("[test] lease as {agent} retried: {last}");
        assert!(Instant::now() < until, "lease as {agent}: {last}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut mine: Vec<Grant> = api
        .list_tasks(i, "status=leased")
        .await
        .iter()
        .filter(|t| t["lease"]["agent_id"] == agent)
        .map(Grant::of_task)
        .collect();
    mine.sort_by_key(|g| g.token);
    mine
}

/// Completes lease `token` through node `i`, retrying a 503; a 409 after an
/// ambiguous attempt is accepted only if the task did complete with `result`.
pub async fn complete(api: &Api, i: usize, g: &Grant, result: Value) -> Value {
    let path = format!("/api/v1/leases/{}/complete", g.token);
    let body = json!({ "result": result });
    let until = deadline(Duration::from_secs(20));
    let mut ambiguous = false;
    loop {
        let last = match api.post(i, &path, &body).await {
            Ok(r) if r.status == 200 => return r.body,
            Ok(r) if r.status == 409 && ambiguous => {
                let t = api.get_ok(i, &format!("/api/v1/tasks/{}", g.task_id)).await;
                assert_eq!(t["status"], "completed", "{t}");
                assert_eq!(t["result"], result, "{t}");
                return t;
            }
            Ok(r) if matches!(r.status, 429 | 503 | 504) => format!("{r:?}"),
            Ok(r) => panic!("complete {g:?}: {r:?}"),
            Err(e) => format!("{e:#}"),
        };
        ambiguous = true;
        assert!(Instant::now() < until, "complete {g:?}: {last}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Submits (idempotently, by `key`) through node `i` until acknowledged;
/// returns the task.
pub async fn submit(api: &Api, i: usize, body: &Value) -> Value {
    assert!(body["idempotency_key"].is_string(), "retries need a key");
    let until = deadline(Duration::from_secs(30));
    let r = api.post_retrying(i, "/api/v1/tasks", body, until).await;
    // 200 only after a retry of a submit that did commit.
    assert!(matches!(r.status, 200 | 201), "submit {body}: {r:?}");
    r.body
}

/// Waits (up to `limit`) until task `id`, read through node `i`, is
/// `completed`, and returns its view.
pub async fn completed(api: &Api, i: usize, id: u64, limit: Duration) -> Value {
    super::wait_until("the task to complete", deadline(limit), async || {
        let t = api.get_ok(i, &format!("/api/v1/tasks/{id}")).await;
        if t["status"] == "completed" {
            Ok(t)
        } else {
            anyhow::bail!("{t}")
        }
    })
    .await
}
