//! Token and cost accounting over the HTTP API, on a running node: a
//! simulated gateway whose attempts report usage as a model would (1000
//! tokens in, 200 out, model `m-1`), and a worker that leases by itself and
//! reports usage under other names, with no model. `GET /usage` adds them
//! up by tenant, model and gateway, prices `m-1` with the node's `[prices]`
//! and counts unpriced tokens apart; the task shows its own usage;
//! `GET /usage/export` is the same as CSV; a developer sees its own
//! tenant's only; bad dates and groups are refused. A tenant budget used up
//! refuses the tenant's new tasks (429 `budget`), `/metrics` shows each
//! limit's use, and the levels crossed are events, once each.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::time::Duration;

use anyhow::ensure;
use godel::fsm::Role;
use serde_json::{Value, json};
use support::{Cluster, bounded, deadline, wait_until};

const TEST_BOUND: Duration = Duration::from_secs(90);
const CONFIG: &str = "[prices.m-1]\ninput_per_mtok = 3.0\noutput_per_mtok = 15.0\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_counted_priced_and_scoped() {
    let c = Cluster::start_with(1, CONFIG).await;
    bounded(TEST_BOUND, async {
        let api = c.api();
        c.leader().await;
        let gw = json!({"id": "gw-usage", "region": "local", "max_sessions": 8,
                        "driver": {"kind": "sim", "usage": {"input_tokens": 1000, "output_tokens": 200, "model": "m-1"}}});
        let r = api.post(0, "/api/v1/gateways", &gw).await.unwrap();
        assert_eq!(r.status, 201, "{r:?}");
        let a = json!({"id": "u-1", "gateway": "gw-usage", "capacity": 4, "capabilities": ["metered"]});
        assert_eq!(api.post(0, "/api/v1/agents", &a).await.unwrap().status, 201);

        // Three tasks run on the gateway.
        let mut ids = Vec::new();
        for _ in 0..3 {
            let body = json!({"tenant": "acme", "payload": {}, "capabilities": ["metered"]});
            let r = api.post(0, "/api/v1/tasks", &body).await.unwrap();
            assert_eq!(r.status, 201, "{r:?}");
            ids.push(r.body["id"].as_u64().unwrap());
        }
        for id in &ids {
            let t = wait_until("the task to complete", deadline(Duration::from_secs(30)), async || {
                let t = api.get_ok(0, &format!("/api/v1/tasks/{id}")).await;
                ensure!(t["status"] == "completed", "{t}");
                Ok(t)
            })
            .await;
            assert_eq!(t["usage"]["input_tokens"], 1000, "{t}");
            assert_eq!(t["usage"]["output_tokens"], 200, "{t}");
            assert_eq!(t["usage"]["model"], "m-1", "{t}");
        }

        // A worker of its own: one attempt fails (reporting 20 + 4 tokens),
        // the next completes with usage under the common API names and no
        // model (30 + 6): the row holds both attempts' tokens.
        let body = json!({"tenant": "acme", "payload": {}, "capabilities": ["own-worker"]});
        let r = api.post(0, "/api/v1/tasks", &body).await.unwrap();
        assert_eq!(r.status, 201, "{r:?}");
        let own = r.body["id"].as_u64().unwrap();
        let lease = async || -> u64 {
            let body = json!({"agent_id": "w-own", "capabilities": ["own-worker"], "max": 1, "lease_ms": 30000});
            wait_until("a lease", deadline(Duration::from_secs(20)), async || {
                let r = api.post(0, "/api/v1/leases", &body).await?;
                let token = r.body["leases"][0]["fencing_token"].as_u64();
                ensure!(token.is_some(), "{r:?}");
                Ok(token.unwrap())
            })
            .await
        };
        let token = lease().await;
        let r = api
            .post(0, &format!("/api/v1/leases/{token}/fail"), &json!({"error": "flaky", "retryable": true, "usage": {"input_tokens": 20, "output_tokens": 4}}))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        let token = lease().await;
        let result = json!({"answer": 42, "usage": {"prompt_tokens": 30, "completion_tokens": 6}});
        let r = api
            .post(0, &format!("/api/v1/leases/{token}/complete"), &json!({"result": result}))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        let t = api.get_ok(0, &format!("/api/v1/tasks/{own}")).await;
        assert_eq!(
            (&t["usage"]["input_tokens"], &t["usage"]["output_tokens"], &t["usage"]["model"]),
            (&json!(30), &json!(6), &Value::Null),
            "{t}"
        );

        let u = api.get_ok(0, "/api/v1/usage?group_by=tenant,model,gateway").await;
        assert_eq!(u["group_by"], json!(["tenant", "model", "gateway"]), "{u}");
        let items = u["items"].as_array().unwrap();
        assert_eq!(items.len(), 2, "{u}");
        let (none, m1) = (&items[0], &items[1]);
        assert_eq!(
            (&m1["tenant"], &m1["model"], &m1["gateway"], &m1["completed"]),
            (&json!("acme"), &json!("m-1"), &json!("gw-usage"), &json!(3)),
            "{u}"
        );
        assert_eq!((&m1["input_tokens"], &m1["output_tokens"]), (&json!(3000), &json!(600)), "{u}");
        // 3000 in at $3/M and 600 out at $15/M.
        assert_eq!(m1["cost_usd"], json!(0.018), "{u}");
        assert_eq!(m1["unpriced_tokens"], 0, "{u}");
        assert_eq!(
            (&none["model"], &none["gateway"], &none["completed"], &none["failed_attempts"]),
            (&Value::Null, &Value::Null, &json!(1), &json!(1)),
            "{u}"
        );
        assert_eq!((&none["cost_usd"], &none["unpriced_tokens"]), (&json!(0.0), &json!(60)), "{u}");
        let waits = u["waits"].as_array().unwrap();
        assert_eq!(waits.len(), 1, "{u}");
        assert_eq!((&waits[0]["tenant"], &waits[0]["priority"], &waits[0]["tasks"]), (&json!("acme"), &json!("medium"), &json!(4)), "{u}");

        // One row for everything; the CSV export of the same.
        let all = api.get_ok(0, "/api/v1/usage?group_by=").await;
        assert_eq!(all["items"].as_array().unwrap().len(), 1, "{all}");
        assert_eq!(all["items"][0]["input_tokens"], 3050, "{all}");
        let csv = api.get(0, "/api/v1/usage/export?group_by=tenant,model").await.unwrap();
        assert_eq!(csv.status, 200, "{csv:?}");
        assert!(csv.header("content-type").unwrap().starts_with("text/csv"), "{csv:?}");
        let text = csv.body.as_str().unwrap();
        assert_eq!(
            text,
            "tenant,model,completed,failed_attempts,lost_attempts,input_tokens,output_tokens,compute_ms,cost_usd,unpriced_tokens\n\
             acme,,1,1,0,50,10,{c0},0.000000,60\n\
             acme,m-1,3,0,0,3000,600,{c1},0.018000,0\n"
                .replace("{c0}", &none["compute_ms"].to_string())
                .replace("{c1}", &m1["compute_ms"].to_string()),
        );

        // Budgets: acme has used 3660 tokens today. At a limit of 3660 its
        // new tasks are refused (429 `budget`, naming the limit and when it
        // resets); another tenant's are not; the metric shows the use.
        let r = api
            .post(0, "/api/v1/tenants", &json!({"name": "acme",
                "budget": {"daily_tokens": 3660, "monthly_cost_usd": 1.0, "soft_percent": 50}}))
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{r:?}");
        assert_eq!(
            r.body["budget"],
            json!({"daily_tokens": 3660, "monthly_tokens": null, "daily_cost_usd": null,
                   "monthly_cost_usd": 1.0, "soft_percent": 50}),
            "{r:?}"
        );
        let body = json!({"tenant": "acme", "payload": {}});
        let r = api.post(0, "/api/v1/tasks", &body).await.unwrap();
        r.assert_error(429, "budget");
        assert!(
            r.message().contains("3660 tokens of its day budget of 3660 tokens")
                && r.message().contains("T00:00:00"),
            "{r:?}"
        );
        // Retry-After: the seconds until the day ends (UTC).
        let until_midnight = 86_400 - (godel::clock::now_ms() / 1000) % 86_400;
        let wait: u64 = r.retry_after.as_deref().unwrap().parse().unwrap();
        assert!(
            wait.abs_diff(until_midnight) <= 5,
            "Retry-After {wait}, {until_midnight} s to midnight"
        );
        let beta = json!({"tenant": "beta", "payload": {}, "capabilities": ["nobody-has-this"]});
        let other = api.post(0, "/api/v1/tasks", &beta).await.unwrap();
        assert_eq!(other.status, 201, "{other:?}");
        let metrics = api.get(0, "/metrics").await.unwrap();
        let text = metrics.body.as_str().unwrap();
        for line in [
            r#"godel_tenant_budget_used_ratio{period="day",tenant="acme",unit="tokens"} 1"#,
            // $0.018 of $1.
            r#"godel_tenant_budget_used_ratio{period="month",tenant="acme",unit="cost"} 0.018"#,
            r#"godel_tenant_budget_soft_ratio{period="day",tenant="acme",unit="tokens"} 0.5"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        // The meta leader records each level crossed once, with an event
        // (its pass runs every 10 s): the soft share and the limit.
        let url = format!("http://{}", c.node(0).api_addr);
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("timeout")
                .args(["40", support::BIN, "--api", &url, "-o", "json", "events", "tenant.>", "--since", "0", "--count", "2"])
                .env("GODEL_API_KEY", support::ADMIN_KEY)
                .output()
                .expect("run godel events")
        })
        .await
        .unwrap();
        assert!(out.status.success(), "{out:?}");
        let events: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("an event per line"))
            .collect();
        let seen: Vec<(&str, &Value)> = events
            .iter()
            .map(|e| (e["type"].as_str().unwrap(), &e["data"]))
            .collect();
        assert_eq!(
            seen,
            [
                ("tenant.budget_soft_limit", &json!({"period": "day", "unit": "tokens", "used": 3660, "limit": 3660})),
                ("tenant.budget_exhausted", &json!({"period": "day", "unit": "tokens", "used": 3660, "limit": 3660})),
            ],
            "{events:?}"
        );

        // Raised, the tenant submits again; a bad budget changes nothing.
        for bad in [json!({}), json!({"daily_tokens": 0}), json!({"daily_cost_usd": -1.0}),
                    json!({"daily_tokens": 5, "soft_percent": 0})] {
            let r = api.patch(0, "/api/v1/tenants/acme", &json!({"budget": bad})).await.unwrap();
            assert_eq!(r.status, 400, "{bad}: {r:?}");
        }
        let r = api
            .patch(0, "/api/v1/tenants/acme", &json!({"budget": {"daily_tokens": 100000}}))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        let r = api.post(0, "/api/v1/tasks", &body).await.unwrap();
        assert_eq!(r.status, 201, "{r:?}");

        // A developer of another tenant sees none of it, and may not ask.
        let body = json!({"name": "beta-dev", "role": Role::Developer, "tenant": "beta"});
        let r = api.post(0, "/api/v1/api-keys", &body).await.unwrap();
        let dev = api.with_key(r.body["key"].as_str().unwrap());
        let mine = dev.get_ok(0, "/api/v1/usage").await;
        assert_eq!(mine["items"], json!([]), "{mine}");
        dev.get(0, "/api/v1/usage?tenant=acme").await.unwrap().assert_error(403, "forbidden");

        // Bad input.
        for q in ["from=2026-13-01", "to=yesterday", "from=2026-12-05&to=2026-12-01",
                  "from=2024-01-01&to=2026-01-01", "group_by=colour", "fromm=2026-01-01"] {
            let r = api.get(0, &format!("/api/v1/usage?{q}")).await.unwrap();
            assert_eq!(r.status, 400, "{q}: {r:?}");
        }
    })
    .await;
}
