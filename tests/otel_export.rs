//! OTLP span export: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, a node sends
//! its `request` and `attempt` spans to the collector, each a child of the
//! W3C trace it belongs to, under the ids the response's `traceparent` and
//! the gateway call name.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use axum::routing::post;
use serde_json::{Value, json};
use support::{ADMIN_KEY, Cluster, bounded, deadline, wait_until};

const TASK_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TASK_PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const REQUEST_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const REQUEST_PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// A collector taking OTLP/HTTP JSON on `/v1/traces`: its base URL and the
/// spans it got.
async fn collector() -> (String, Arc<Mutex<Vec<Value>>>) {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let keep = Arc::clone(&spans);
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: axum::body::Bytes| {
            let keep = Arc::clone(&keep);
            async move {
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                for rs in v["resourceSpans"].as_array().into_iter().flatten() {
                    for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                        for s in ss["spans"].as_array().into_iter().flatten() {
                            keep.lock().unwrap().push(s.clone());
                        }
                    }
                }
                axum::Json(json!({}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), spans)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_go_to_the_collector_in_their_traces() {
    let (base, spans) = collector().await;
    let (run_url, seen) = support::traceparent_gateway().await;
    // SAFETY: set before any node starts; nothing else in this test binary
    // reads or writes the environment concurrently.
    unsafe {
        std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", &base);
        std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "200");
    }
    let c = Cluster::start(1).await;
    bounded(Duration::from_secs(90), async {
        let api = c.api();
        let until = deadline(Duration::from_secs(20));
        let gw = json!({"id": "otel-gw", "region": "local", "capabilities": ["otel"], "max_sessions": 4,
                        "driver": {"kind": "http", "url": run_url}});
        let r = api.post_retrying(0, "/api/v1/gateways", &gw, until).await;
        assert_eq!(r.status, 201, "{r:?}");
        let agent = json!({"id": "otel-agent", "gateway": "otel-gw", "capabilities": ["otel"]});
        let r = api.post_retrying(0, "/api/v1/agents", &agent, until).await;
        assert_eq!(r.status, 201, "{r:?}");

        let node = format!("http://{}", c.node(0).api_addr);
        let http = reqwest::Client::new();
        let r = http
            .post(format!("{node}/api/v1/tasks"))
            .bearer_auth(ADMIN_KEY)
            .header("traceparent", TASK_PARENT)
            .json(&json!({"payload": {}, "capabilities": ["otel"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let r = http
            .get(format!("{node}/api/v1/cluster"))
            .bearer_auth(ADMIN_KEY)
            .header("traceparent", REQUEST_PARENT)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let answered = r.headers()["traceparent"].to_str().unwrap().to_owned();
        let server_span = answered.split('-').nth(2).unwrap().to_owned();

        wait_until("the attempt's call", deadline(Duration::from_secs(20)), async || {
            match seen.lock().unwrap().len() {
                0 => bail!("no attempt yet"),
                _ => Ok(()),
            }
        })
        .await;
        let called = seen.lock().unwrap()[0].clone();
        let attempt_span = called.split('-').nth(2).unwrap().to_owned();
        assert!(called.contains(TASK_TRACE), "{called}");

        let find = |name: &str, trace: &str, span: &str| {
            spans
                .lock()
                .unwrap()
                .iter()
                .find(|s| s["name"] == name && s["traceId"] == trace && s["spanId"] == span)
                .cloned()
        };
        wait_until("both spans exported", deadline(Duration::from_secs(20)), async || {
            let r = find("request", REQUEST_TRACE, &server_span);
            let a = find("attempt", TASK_TRACE, &attempt_span);
            if r.is_some() && a.is_some() {
                Ok(())
            } else {
                let all = spans.lock().unwrap().clone();
                bail!("request {r:?}, attempt {a:?}; exported: {all:?}")
            }
        })
        .await;
        let request = find("request", REQUEST_TRACE, &server_span).unwrap();
        assert_eq!(request["parentSpanId"], "b7ad6b7169203331", "{request}");
        let attempt = find("attempt", TASK_TRACE, &attempt_span).unwrap();
        assert_eq!(attempt["parentSpanId"], "00f067aa0ba902b7", "{attempt}");
    })
    .await;
}
