//! An agent's own health on a running node: its circuit breaker opens
//! after attempts keep failing on it (the other agents take the work, and
//! it cools down to half-open), and an agent whose actor falls silent is
//! taken out of dispatch until it is heard again. Both show in the agent's
//! view (the events are in the golden script `agent_breaker_and_silence`).

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::time::Duration;

use anyhow::bail;
use serde_json::{Value, json};
use support::{Api, Cluster, bounded, deadline, wait_until};

const TEST_BOUND: Duration = Duration::from_secs(90);

async fn add(api: &Api, gateway: &str, driver: Value, agent: &str) {
    let gw = json!({"id": gateway, "region": "local", "max_sessions": 50, "driver": driver});
    let r = api.post(0, "/api/v1/gateways", &gw).await.unwrap();
    assert_eq!(r.status, 201, "{r:?}");
    let a = json!({"id": agent, "gateway": gateway, "capacity": 4});
    let r = api.post(0, "/api/v1/agents", &a).await.unwrap();
    assert_eq!(r.status, 201, "{r:?}");
}

/// Waits until agent `id`'s view satisfies `ok`, and returns it.
async fn agent_until(api: &Api, id: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    wait_until(what, deadline(Duration::from_secs(20)), async || {
        let a = api.get_ok(0, &format!("/api/v1/agents/{id}")).await;
        if ok(&a) { Ok(a) } else { bail!("{a}") }
    })
    .await
}

/// Submits `n` tasks (one attempt each) and returns the agents that ran
/// the completed ones.
async fn run_tasks(api: &Api, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let r = api
            .post(
                0,
                "/api/v1/tasks",
                &json!({"payload": {}, "max_attempts": 1}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{r:?}");
        ids.push(r.body["id"].as_u64().unwrap());
    }
    let mut agents = Vec::new();
    for id in ids {
        let t = wait_until(
            "the task to end",
            deadline(Duration::from_secs(20)),
            async || {
                let t = api.get_ok(0, &format!("/api/v1/tasks/{id}")).await;
                if t["status"] == "completed" || t["status"] == "dead_letter" {
                    Ok(t)
                } else {
                    bail!("{t}")
                }
            },
        )
        .await;
        if t["status"] == "completed" {
            agents.push(t["agent_id"].as_str().unwrap().to_owned());
        }
    }
    agents
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_attempts_keep_failing_opens_its_breaker() {
    let c = Cluster::start_with(
        1,
        "[runtime.agent_breaker]\nfailure_threshold = 3\ncool_down = \"3s\"\nhalf_open_max_calls = 1\nsuccess_threshold = 1\n",
    )
    .await;
    bounded(TEST_BOUND, async {
        let api = c.api();
        c.leader().await;
        // Every attempt on a-bad's gateway fails (the task's fault, as the
        // gateway reports it: the gateway's own breaker stays closed).
        add(
            &api,
            "gw-bad",
            json!({"kind": "sim", "failure_rate": 1.0}),
            "a-bad",
        )
        .await;
        agent_until(&api, "a-bad", "a-bad online", |a| a["status"] == "idle").await;
        // Enough tasks that a-bad gets at least three (least loaded first).
        let ran = run_tasks(&api, 6).await;
        assert!(
            ran.is_empty(),
            "nothing completes on a failing agent: {ran:?}"
        );
        let a = agent_until(&api, "a-bad", "a-bad's breaker to open", |a| {
            a["circuit"] == "open"
        })
        .await;
        assert_eq!(a["silent_since"], Value::Null, "{a}");
        let gw = api.get_ok(0, "/api/v1/gateways/gw-bad").await;
        assert_eq!(
            gw["circuit"], "closed",
            "the gateway answered every time: {gw}"
        );

        // While it is open, a healthy agent takes all the work.
        add(&api, "gw-good", json!({"kind": "sim"}), "a-good").await;
        agent_until(&api, "a-good", "a-good online", |a| a["status"] == "idle").await;
        let ran = run_tasks(&api, 6).await;
        assert_eq!(ran, vec!["a-good"; 6], "an open agent takes nothing");

        // Cooled down: half-open, one trial at a time.
        agent_until(&api, "a-bad", "a-bad's breaker to go half-open", |a| {
            a["circuit"] == "half_open"
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_is_taken_out_of_dispatch_until_heard() {
    let c = Cluster::start_with(
        1,
        "[runtime]\nfault_injection = true\nagent_sync_interval = \"200ms\"\nagent_silent_after = \"1s\"\n",
    )
    .await;
    bounded(TEST_BOUND, async {
        let api = c.api();
        c.leader().await;
        // Each attempt takes a while, so work spreads over both agents
        // when both may take it.
        let slow = json!({"kind": "sim", "latency": {"dist": "fixed", "value": "100ms"}});
        add(&api, "gw-1", slow.clone(), "a-stuck").await;
        add(&api, "gw-2", slow, "a-fine").await;
        for a in ["a-stuck", "a-fine"] {
            agent_until(&api, a, "the agent online", |v| v["status"] == "idle").await;
        }
        let r = api
            .post(
                0,
                "/api/v1/admin/agents/a-stuck/stall",
                &json!({"ms": 4000}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 202, "{r:?}");
        let bad = api
            .post(0, "/api/v1/admin/agents/a-stuck/stall", &json!({"ms": 0}))
            .await
            .unwrap();
        bad.assert_error(400, "invalid_request");
        agent_until(&api, "a-stuck", "a-stuck to be silent", |a| {
            a["silent_since"].is_string()
        })
        .await;
        let ran = run_tasks(&api, 8).await;
        assert_eq!(ran, vec!["a-fine"; 8], "a silent agent takes nothing");
        // The stall ends: heard again, and back in dispatch.
        agent_until(&api, "a-stuck", "a-stuck to be heard", |a| {
            a["silent_since"].is_null()
        })
        .await;
        let ran = run_tasks(&api, 8).await;
        assert!(
            ran.iter().any(|a| a == "a-stuck"),
            "a-stuck takes work again: {ran:?}"
        );
    })
    .await;
}
