//! Durable sessions over the HTTP API, on a running node with two
//! simulated gateways (a sim gateway reports the conversation key it ran
//! in and the turns carried to it, as a model would see them):
//!
//! - every completed task is a turn, checkpointed (every turn by default)
//!   and by name; `GET /sessions/{id}/checkpoints` shows the turns;
//! - a paused session holds its next task until resumed, across a restart
//!   of the node;
//! - migrate on demand: the next task opens the session on the other
//!   gateway, in a new conversation that is given the earlier turns;
//! - an agent that leaves sends its sessions on the same way;
//! - bad requests change nothing and say why.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::time::Duration;

use anyhow::{bail, ensure};
use serde_json::{Value, json};

use support::{Api, Cluster, bounded, deadline, wait_until};

const TEST_BOUND: Duration = Duration::from_secs(150);

/// Registers sim gateways `gw-a` and `gw-b`, each with one agent taking
/// capability `chat`.
async fn two_gateways(api: &Api) {
    for (gw, agent) in [("gw-a", "agent-a"), ("gw-b", "agent-b")] {
        let g = json!({"id": gw, "region": "local", "max_sessions": 8, "driver": {"kind": "sim"}});
        let r = api.post(0, "/api/v1/gateways", &g).await.unwrap();
        assert_eq!(r.status, 201, "{r:?}");
        let a = json!({"id": agent, "gateway": gw, "capacity": 2, "capabilities": ["chat"]});
        let r = api.post(0, "/api/v1/agents", &a).await.unwrap();
        assert_eq!(r.status, 201, "{r:?}");
    }
}

/// Submits a `chat` task in session `key` with `message`; its id.
async fn say(api: &Api, key: &str, message: &str) -> u64 {
    let body =
        json!({"payload": {"message": message}, "capabilities": ["chat"], "session_key": key});
    let r = api.post(0, "/api/v1/tasks", &body).await.unwrap();
    assert_eq!(r.status, 201, "{r:?}");
    r.body["id"].as_u64().unwrap()
}

/// Waits for task `id` to complete; its result, parsed.
async fn result_of(api: &Api, id: u64) -> Value {
    let t = wait_until(
        "the task to complete",
        deadline(Duration::from_secs(30)),
        async || {
            let t = api.get(0, &format!("/api/v1/tasks/{id}")).await?;
            ensure!(t.body["status"] == "completed", "{:?}", t.body);
            Ok(t.body)
        },
    )
    .await;
    match &t["result"] {
        Value::String(s) => serde_json::from_str(s).unwrap(),
        other => other.clone(),
    }
}

/// The live session holding `key`.
async fn session_of(api: &Api, key: &str) -> Value {
    let page = api
        .get_ok(0, &format!("/api/v1/sessions?key={key}&live=true"))
        .await;
    match page["items"].as_array().and_then(|i| i.first()) {
        Some(s) => s.clone(),
        None => panic!("no live session for `{key}`: {page}"),
    }
}

/// Waits until session `id` is in `state`.
async fn wait_state(api: &Api, id: u64, state: &str) -> Value {
    wait_until(
        "the session's state",
        deadline(Duration::from_secs(20)),
        async || {
            let s = api.get(0, &format!("/api/v1/sessions/{id}")).await?;
            ensure!(s.body["state"] == state, "{:?}", s.body);
            Ok(s.body)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_checkpoint_pause_resume_and_migrate() {
    let mut c = Cluster::start(1).await;
    let api = c.api();
    bounded(TEST_BOUND, async {
        c.leader().await;
        two_gateways(&api).await;

        // Two turns: each is checkpointed (every turn, by default), with
        // its prompt and the reply.
        let first = say(&api, "conv", "what is a fencing token?").await;
        let r1 = result_of(&api, first).await;
        let s = session_of(&api, "conv").await;
        let id = s["id"].as_u64().unwrap();
        let home = s["gateway"].as_str().unwrap().to_owned();
        let other = if home == "gw-a" { "gw-b" } else { "gw-a" };
        assert_eq!(r1["session_key"], s["gateway_key"], "{r1} {s}");
        assert!(
            r1.get("context").is_none(),
            "nothing carried on the first gateway: {r1}"
        );
        let second = say(&api, "conv", "and a lease?").await;
        result_of(&api, second).await;
        let s = wait_state(&api, id, "ready").await;
        assert_eq!(
            (&s["turns"], &s["checkpoint_seq"], &s["generation"]),
            (&json!(2), &json!(2), &json!(0)),
            "{s}"
        );
        let cps = api
            .get_ok(0, &format!("/api/v1/sessions/{id}/checkpoints"))
            .await;
        let last = &cps["items"][1];
        assert_eq!(last["turns"], 2, "{cps}");
        assert_eq!(
            last["transcript"][0]["prompt"], "what is a fencing token?",
            "{cps}"
        );
        assert_eq!(last["transcript"][1]["prompt"], "and a lease?", "{cps}");
        assert_eq!(
            last["transcript"][1]["reply"],
            format!("sim reply to task {second}"),
            "{cps}"
        );
        assert_eq!(last["transcript_ref"], s["gateway_key"], "{cps}");

        // A named checkpoint.
        let r = api
            .post(
                0,
                &format!("/api/v1/sessions/{id}/checkpoint"),
                &json!({"name": "before the move"}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{r:?}");
        assert_eq!(
            (&r.body["seq"], &r.body["name"]),
            (&json!(3), &json!("before the move"))
        );

        // Paused, the session holds its next task; the pause survives a
        // restart of the node; resumed, the task runs in it.
        let r = api
            .post(0, &format!("/api/v1/sessions/{id}/pause"), &json!({}))
            .await
            .unwrap();
        assert_eq!(
            (r.status, r.body["state"].as_str()),
            (200, Some("paused")),
            "{r:?}"
        );
        let held = say(&api, "conv", "are you there?").await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let t = api.get_ok(0, &format!("/api/v1/tasks/{held}")).await;
        assert_eq!(
            t["status"], "pending",
            "a paused session holds its task: {t}"
        );
        c.terminate(0, Duration::from_secs(10));
        c.restart(0);
        c.leader().await;
        let s = wait_state(&api, id, "paused").await;
        assert_eq!(s["turns"], 2, "{s}");
        let t = api.get_ok(0, &format!("/api/v1/tasks/{held}")).await;
        assert_eq!(t["status"], "pending", "still held after the restart: {t}");
        let r = api
            .post(0, &format!("/api/v1/sessions/{id}/resume"), &json!({}))
            .await
            .unwrap();
        assert_eq!(
            (r.status, r.body["state"].as_str()),
            (200, Some("resuming")),
            "{r:?}"
        );
        let r3 = result_of(&api, held).await;
        assert_eq!(
            r3["session_key"], s["gateway_key"],
            "same conversation: {r3}"
        );
        assert!(
            r3.get("context").is_none(),
            "nothing carried in place: {r3}"
        );
        let s = wait_state(&api, id, "ready").await;
        assert_eq!(
            (&s["turns"], &s["gateway"]),
            (&json!(3), &json!(home)),
            "{s}"
        );

        // Migrate on demand: the next task opens the session on the other
        // gateway, in a new conversation given the earlier turns.
        let r = api
            .post(
                0,
                &format!("/api/v1/sessions/{id}/migrate"),
                &json!({"gateway": other}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(
            (
                &r.body["state"],
                &r.body["moving"],
                &r.body["target_gateway"],
                &r.body["carry"]
            ),
            (&json!("migrating"), &json!(true), &json!(other), &json!(4)),
            "{r:?}"
        );
        let moved = say(&api, "conv", "where were we?").await;
        let r4 = result_of(&api, moved).await;
        let context = r4["context"].as_str().unwrap_or_default();
        for earlier in ["what is a fencing token?", "and a lease?", "are you there?"] {
            assert!(context.contains(earlier), "`{earlier}` carried: {r4}");
        }
        let s = wait_state(&api, id, "ready").await;
        assert_eq!(
            (
                &s["gateway"],
                &s["generation"],
                &s["turns"],
                &s["carry"],
                &s["moving"]
            ),
            (
                &json!(other),
                &json!(1),
                &json!(4),
                &Value::Null,
                &json!(false)
            ),
            "{s}"
        );
        assert_eq!(r4["session_key"], s["gateway_key"], "{r4} {s}");
        assert!(s["gateway_key"].as_str().unwrap().ends_with("~1"), "{s}");
        // The next turn needs nothing carried: the new gateway has it all.
        let next = say(&api, "conv", "go on").await;
        let r5 = result_of(&api, next).await;
        assert!(r5.get("context").is_none(), "{r5}");

        // Its agent leaves: the session moves on from its last checkpoint
        // (the other gateway's agent takes its next task).
        let agent = s["agent"].as_str().unwrap().to_owned();
        let r = api
            .delete(0, &format!("/api/v1/agents/{agent}"))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        let s = wait_state(&api, id, "migrating").await;
        assert_eq!(s["reason"], "agent deregistered", "{s}");
        let after = say(&api, "conv", "still here?").await;
        let r6 = result_of(&api, after).await;
        assert!(
            r6["context"].as_str().unwrap_or_default().contains("go on"),
            "{r6}"
        );
        let s = wait_state(&api, id, "ready").await;
        assert_eq!(
            (&s["gateway"], &s["generation"]),
            (&json!(home), &json!(2)),
            "{s}"
        );
        Ok::<(), anyhow::Error>(())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_controls_refuse_bad_requests() {
    let c = Cluster::start(1).await;
    let api = c.api();
    bounded(TEST_BOUND, async {
        c.leader().await;
        two_gateways(&api).await;
        let t = say(&api, "conv", "hello").await;
        result_of(&api, t).await;
        let id = session_of(&api, "conv").await["id"].as_u64().unwrap();
        let path = |verb: &str| format!("/api/v1/sessions/{id}/{verb}");

        // Not paused: nothing to resume.
        let r = api.post(0, &path("resume"), &json!({})).await.unwrap();
        r.assert_error(409, "conflict");
        // No such gateway, no such session, unknown fields, a bad name.
        let r = api
            .post(0, &path("migrate"), &json!({"gateway": "nope"}))
            .await
            .unwrap();
        r.assert_error(404, "not_found");
        let r = api
            .post(0, "/api/v1/sessions/999999/pause", &json!({}))
            .await
            .unwrap();
        r.assert_error(404, "not_found");
        let r = api
            .post(0, &path("checkpoint"), &json!({"label": "x"}))
            .await
            .unwrap();
        r.assert_error(400, "invalid_request");
        let r = api
            .post(0, &path("checkpoint"), &json!({"name": ""}))
            .await
            .unwrap();
        r.assert_error(400, "invalid_request");
        let s = api.get_ok(0, &format!("/api/v1/sessions/{id}")).await;
        assert_eq!(
            (&s["state"], &s["checkpoint_seq"]),
            (&json!("ready"), &json!(1)),
            "{s}"
        );

        // Ended: no pause, no checkpoint; a day later it is archived.
        let r = api.post(0, &path("kill"), &json!({})).await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        for verb in ["pause", "checkpoint", "migrate"] {
            let r = api.post(0, &path(verb), &json!({})).await.unwrap();
            r.assert_error(409, "conflict");
        }
        let cps = api.get_ok(0, &path("checkpoints")).await;
        assert_eq!(
            cps["items"].as_array().unwrap().len(),
            1,
            "kept until archived: {cps}"
        );
        let r = api
            .get(0, "/api/v1/sessions/999999/checkpoints")
            .await
            .unwrap();
        r.assert_error(404, "not_found");
        wait_until(
            "nothing else changes",
            deadline(Duration::from_secs(5)),
            async || {
                let s = api.get_ok(0, &format!("/api/v1/sessions/{id}")).await;
                if s["state"] != "cancelled" {
                    bail!("{s}");
                }
                Ok(())
            },
        )
        .await;
        Ok::<(), anyhow::Error>(())
    })
    .await
    .unwrap();
}

/// An `http` gateway the test runs: POSTs answer a reply; its health URL
/// answers 200 until `sick` is set, then 503.
async fn webhook(sick: std::sync::Arc<std::sync::atomic::AtomicBool>) -> String {
    use axum::http::StatusCode;
    use axum::routing::{get, post};
    use std::sync::atomic::Ordering;
    let app = axum::Router::new()
        .route("/run", post(|| async { r#"{"text":"webhook reply"}"# }))
        .route(
            "/health",
            get(move || async move {
                if sick.load(Ordering::SeqCst) {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// With two queue shards (sessions live in a shard, which holds no
/// registry): a gateway whose health probe keeps failing takes no new
/// work, and once it has for `runtime.session_move_after` the meta leader
/// tells the session's shard to move its sessions on; the next task opens
/// the session on the other gateway with the earlier turns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_leaves_a_gateway_that_turns_unhealthy_in_a_sharded_cluster() {
    let config = "[cluster]\nshards = 2\n\n[runtime]\ngateway_probe_interval = \"200ms\"\n\
                  session_move_after = \"1s\"\n";
    let c = Cluster::start_with(1, config).await;
    let api = c.api();
    bounded(TEST_BOUND, async {
        c.leader().await;
        let sick = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let base = webhook(std::sync::Arc::clone(&sick)).await;
        let until = deadline(Duration::from_secs(30));
        let g = json!({"id": "gw-web", "region": "local", "max_sessions": 8,
                       "driver": {"kind": "http", "url": format!("{base}/run"), "health_url": format!("{base}/health")}});
        let r = api.post_retrying(0, "/api/v1/gateways", &g, until).await;
        assert_eq!(r.status, 201, "{r:?}");
        let a = json!({"id": "web-agent", "gateway": "gw-web", "capacity": 2, "capabilities": ["chat"]});
        assert_eq!(api.post_retrying(0, "/api/v1/agents", &a, until).await.status, 201);

        // The first turn runs on the webhook (the only gateway yet).
        let body = json!({"payload": {"message": "remember the number 42"}, "capabilities": ["chat"], "session_key": "conv"});
        let r = api.post_retrying(0, "/api/v1/tasks", &body, until).await;
        assert_eq!(r.status, 201, "{r:?}");
        let first = r.body["id"].as_u64().unwrap();
        let r1 = result_of(&api, first).await;
        assert_eq!(r1["text"], "webhook reply", "{r1}");
        let s = session_of(&api, "conv").await;
        let id = s["id"].as_u64().unwrap();
        assert_eq!((&s["gateway"], &s["checkpoint_seq"]), (&json!("gw-web"), &json!(1)), "{s}");
        assert_ne!(id & 0xff, 0, "the session lives in a queue shard: {s}");

        // A second gateway, then the webhook's probe fails.
        let g = json!({"id": "gw-sim", "region": "local", "max_sessions": 8, "driver": {"kind": "sim"}});
        assert_eq!(api.post(0, "/api/v1/gateways", &g).await.unwrap().status, 201);
        let a = json!({"id": "sim-agent", "gateway": "gw-sim", "capacity": 2, "capabilities": ["chat"]});
        assert_eq!(api.post(0, "/api/v1/agents", &a).await.unwrap().status, 201);
        sick.store(true, std::sync::atomic::Ordering::SeqCst);
        let s = wait_state(&api, id, "migrating").await;
        let why = s["reason"].as_str().unwrap_or_default();
        assert!(why.starts_with("gateway gw-web has been unhealthy for"), "{s}");

        // The next turn opens the session on gw-sim, given the first turn.
        let next = say(&api, "conv", "what was the number?").await;
        let r2 = result_of(&api, next).await;
        let context = r2["context"].as_str().unwrap_or_default();
        assert!(
            context.contains("remember the number 42") && context.contains("webhook reply"),
            "{r2}"
        );
        let s = wait_state(&api, id, "ready").await;
        assert_eq!((&s["gateway"], &s["generation"]), (&json!("gw-sim"), &json!(1)), "{s}");
        Ok::<(), anyhow::Error>(())
    })
    .await
    .unwrap();
}
