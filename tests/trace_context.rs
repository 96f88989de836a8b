//! W3C trace context end to end: a `traceparent` sent with a submission is
//! kept in the task (Raft-replicated), shown in the task's view, sent to the
//! `http` gateway with each attempt (same trace, a new span), and written
//! in the node's log line for the attempt. A submission without one gets a
//! trace derived from the task, the same in every view and attempt.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::time::Duration;

use anyhow::bail;
use serde_json::{Value, json};
use support::{ADMIN_KEY, Api, Cluster, bounded, deadline, wait_until};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const SENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

async fn submit(base: &str, traceparent: Option<&str>) -> Value {
    let mut req = reqwest::Client::new()
        .post(format!("{base}/api/v1/tasks"))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"payload": {"n": 1}, "capabilities": ["traced"]}));
    if let Some(tp) = traceparent {
        req = req.header("traceparent", tp);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 201);
    r.json().await.unwrap()
}

async fn completed(api: &Api, id: u64) -> Value {
    let path = format!("/api/v1/tasks/{id}");
    wait_until(
        "the task to complete",
        deadline(Duration::from_secs(30)),
        async || {
            let t = api.get_ok(0, &path).await;
            match t["status"].as_str() {
                Some("completed") => Ok(t),
                other => bail!("task {id} is {other:?}"),
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_reaches_the_task_the_gateway_and_the_log() {
    // The attempt's log line is at debug level.
    // SAFETY: set before any node starts; nothing else in this test binary
    // reads or writes the environment concurrently.
    unsafe {
        std::env::set_var(
            "GODEL_TEST_LOG",
            "info,godel::actors::agent=debug,godel::api=debug",
        )
    };
    let c = Cluster::start(1).await;
    bounded(Duration::from_secs(90), async {
        let api = c.api();
        let (url, seen) = support::traceparent_gateway().await;
        let until = deadline(Duration::from_secs(20));
        let gw = json!({"id": "traced-gw", "region": "local", "capabilities": ["traced"], "max_sessions": 4,
                        "driver": {"kind": "http", "url": url}});
        let r = api.post_retrying(0, "/api/v1/gateways", &gw, until).await;
        assert_eq!(r.status, 201, "{r:?}");
        let agent = json!({"id": "traced-agent", "gateway": "traced-gw", "capabilities": ["traced"]});
        let r = api.post_retrying(0, "/api/v1/agents", &agent, until).await;
        assert_eq!(r.status, 201, "{r:?}");

        let base = format!("http://{}", c.node(0).api_addr);
        let task = submit(&base, Some(SENT)).await;
        assert_eq!(task["trace_id"], TRACE_ID, "{task}");
        let id = task["id"].as_u64().unwrap();
        assert_eq!(completed(&api, id).await["trace_id"], TRACE_ID);

        let sent_to_gateway = seen.lock().unwrap().clone();
        assert_eq!(sent_to_gateway.len(), 1, "{sent_to_gateway:?}");
        let parts: Vec<&str> = sent_to_gateway[0].split('-').collect();
        assert_eq!(parts.len(), 4, "{sent_to_gateway:?}");
        assert_eq!(parts[1], TRACE_ID, "same trace");
        assert_ne!(parts[2], "00f067aa0ba902b7", "the attempt is a span of its own");

        let log = c.node(0).log_tail(1_000_000);
        let line = log
            .lines()
            .find(|l| l.contains("attempt started") && l.contains(TRACE_ID))
            .unwrap_or_else(|| panic!("no attempt log line with the trace id:\n{log}"));
        assert!(line.contains(parts[2]), "the log names the attempt's span: {line}");

        // Every request is a span of the trace it names (or of a new one):
        // the response names the server span, and the request's log lines
        // carry its ids.
        let other = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let r = reqwest::Client::new()
            .get(format!("{base}/api/v1/cluster"))
            .bearer_auth(ADMIN_KEY)
            .header("traceparent", other)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let answered = r.headers()["traceparent"].to_str().unwrap().to_owned();
        let ids: Vec<&str> = answered.split('-').collect();
        assert_eq!(ids[1], "0af7651916cd43dd8448eb211c80319c", "{answered}");
        assert_ne!(ids[2], "b7ad6b7169203331", "a server span of its own: {answered}");
        let r = reqwest::Client::new()
            .get(format!("{base}/api/v1/cluster"))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .unwrap();
        let started = r.headers()["traceparent"].to_str().unwrap().to_owned();
        assert!(godel::trace::TraceContext::parse(&started).is_some(), "{started}");
        let log = c.node(0).log_tail(1_000_000);
        for (trace, span) in [(ids[1], ids[2]), (&started[3..35], &started[36..52])] {
            let line = log
                .lines()
                .find(|l| l.contains("request done") && l.contains(trace))
                .unwrap_or_else(|| panic!("no request log line with trace {trace}:\n{log}"));
            assert!(line.contains(span), "{line}");
            assert!(line.contains("path=/api/v1/cluster"), "{line}");
        }

        // No traceparent (or a malformed one): a derived trace, still carried.
        for tp in [None, Some("00-not-a-trace-01")] {
            let task = submit(&base, tp).await;
            let trace = task["trace_id"].as_str().unwrap().to_owned();
            assert_eq!(trace.len(), 32, "{task}");
            assert_ne!(trace, TRACE_ID);
            completed(&api, task["id"].as_u64().unwrap()).await;
            let last = seen.lock().unwrap().last().cloned().unwrap();
            assert!(last.contains(&trace), "{last} carries {trace}");
        }
    })
    .await;
}
