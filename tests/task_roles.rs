//! Dispatch by role on a running node: a task submitted with `agent_role` runs
//! only on an agent of that role (its capabilities list `role:<role>`);
//! a bad role is refused. Roles are built in or come from the config, and
//! give their agents capabilities, tools and a prompt. And a gateway shows
//! its live load (sessions and its agents' leases).

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::time::Duration;

use anyhow::bail;
use serde_json::json;
use support::work::completed;
use support::{Cluster, bounded, deadline, wait_until};

const TEST_BOUND: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_with_a_role_runs_on_an_agent_of_that_role() {
    let c = Cluster::start(1).await;
    bounded(TEST_BOUND, async {
        let api = c.api();
        c.leader().await;
        let gw = json!({"id": "gw-roles", "region": "local", "max_sessions": 8, "driver": {"kind": "sim"}});
        let r = api.post(0, "/api/v1/gateways", &gw).await.unwrap();
        assert_eq!(r.status, 201, "{r:?}");
        for (id, role) in [("rev-1", "reviewer"), ("mon-1", "monitor")] {
            let a = json!({"id": id, "gateway": "gw-roles", "capacity": 4, "role": role,
                           "capabilities": ["review"]});
            let r = api.post(0, "/api/v1/agents", &a).await.unwrap();
            assert_eq!(r.status, 201, "{r:?}");
        }
        let body = json!({"payload": {}, "capabilities": ["review"], "agent_role": "reviewer"});
        let mut ids = Vec::new();
        for _ in 0..4 {
            let r = api.post(0, "/api/v1/tasks", &body).await.unwrap();
            assert_eq!(r.status, 201, "{r:?}");
            assert_eq!(
                r.body["capabilities"],
                json!(["review", "role:reviewer"]),
                "{r:?}"
            );
            ids.push(r.body["id"].as_u64().unwrap());
        }
        for id in ids {
            let t = wait_until(
                "the task to complete",
                deadline(Duration::from_secs(20)),
                async || {
                    let t = api.get_ok(0, &format!("/api/v1/tasks/{id}")).await;
                    if t["status"] == "completed" {
                        Ok(t)
                    } else {
                        bail!("{t}")
                    }
                },
            )
            .await;
            assert_eq!(t["agent_id"], "rev-1", "only the reviewer runs it: {t}");
        }
        let r = api
            .post(
                0,
                "/api/v1/tasks",
                &json!({"payload": {}, "agent_role": "bad role"}),
            )
            .await
            .unwrap();
        r.assert_error(400, "invalid_request");
    })
    .await;
}

/// A gateway shows its live load: its sessions and its agents' leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_shows_its_live_sessions_and_active_tasks() {
    let c = Cluster::start(1).await;
    bounded(TEST_BOUND, async {
        let api = c.api();
        c.leader().await;
        let gw = json!({"id": "gw-busy", "region": "local", "max_sessions": 8,
                        "driver": {"kind": "sim", "hang_rate": 1.0}});
        let r = api.post(0, "/api/v1/gateways", &gw).await.unwrap();
        assert_eq!(r.status, 201, "{r:?}");
        assert_eq!(
            (&r.body["live_sessions"], &r.body["active_tasks"]),
            (&json!(0), &json!(0))
        );
        let a =
            json!({"id": "busy-1", "gateway": "gw-busy", "capacity": 3, "capabilities": ["hang"]});
        assert_eq!(api.post(0, "/api/v1/agents", &a).await.unwrap().status, 201);
        for k in 0..2 {
            let body =
                json!({"payload": {}, "capabilities": ["hang"], "session_key": format!("s{k}")});
            assert_eq!(
                api.post(0, "/api/v1/tasks", &body).await.unwrap().status,
                201
            );
        }
        let g = wait_until(
            "the gateway's load to show",
            deadline(Duration::from_secs(20)),
            async || {
                let g = api.get_ok(0, "/api/v1/gateways/gw-busy").await;
                if g["active_tasks"] == 2 && g["live_sessions"] == 2 {
                    Ok(g)
                } else {
                    bail!("{g}")
                }
            },
        )
        .await;
        let listed = api.get_ok(0, "/api/v1/gateways").await;
        let item = listed["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["id"] == "gw-busy")
            .cloned();
        assert_eq!(
            item.as_ref().map(|g| &g["active_tasks"]),
            Some(&g["active_tasks"]),
            "{listed}"
        );
    })
    .await;
}

/// A role from the config gives its agents its capabilities, tools and
/// prompt (shown on the agent, handed to the gateway with each attempt);
/// `GET /roles` lists it with the built-in ones; an unknown role is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_role_gives_its_agents_capabilities_tools_and_a_prompt() {
    let c = Cluster::start_with(
        1,
        "[roles.triager]\ndescription = \"sorts incoming issues\"\ncapabilities = [\"triage\"]\n\
         tools = [\"read\"]\nprompt = \"You triage.\"\n",
    )
    .await;
    bounded(TEST_BOUND, async {
        let api = c.api();
        c.leader().await;
        let roles = api.get_ok(0, "/api/v1/roles").await;
        let names: Vec<(&str, bool)> = roles["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["name"].as_str().unwrap(), r["builtin"].as_bool().unwrap()))
            .collect();
        assert_eq!(
            names,
            [
                ("coordinator", true),
                ("monitor", true),
                ("reviewer", true),
                ("triager", false),
                ("worker", true)
            ],
            "{roles}"
        );
        let gw =
            json!({"id": "gw-t", "region": "local", "max_sessions": 8, "driver": {"kind": "sim"}});
        let r = api.post(0, "/api/v1/gateways", &gw).await.unwrap();
        assert_eq!(r.status, 201, "{r:?}");
        let r = api
            .post(
                0,
                "/api/v1/agents",
                &json!({"id": "tri-1", "gateway": "gw-t", "role": "triager"}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{r:?}");
        assert_eq!(r.body["capabilities"], json!(["triage"]), "{r:?}");
        assert_eq!(r.body["tools"], json!(["read"]), "{r:?}");
        assert_eq!(r.body["prompt"], "You triage.", "{r:?}");
        let r = api
            .post(
                0,
                "/api/v1/agents",
                &json!({"id": "x-1", "gateway": "gw-t", "role": "mayor"}),
            )
            .await
            .unwrap();
        r.assert_error(404, "not_found");
        assert!(r.body.to_string().contains("no role `mayor`"), "{r:?}");
        let r = api.get(0, "/api/v1/agents/x-1").await.unwrap();
        assert_eq!(r.status, 404, "nothing registered: {r:?}");

        // A task that needs the role's capability runs on its agent, which
        // hands the gateway its role.
        let r = api
            .post(
                0,
                "/api/v1/tasks",
                &json!({"payload": {}, "capabilities": ["triage"]}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{r:?}");
        let id = r.body["id"].as_u64().unwrap();
        let t = completed(&api, 0, id, Duration::from_secs(20)).await;
        assert_eq!(t["agent_id"], "tri-1", "{t}");
        assert_eq!(t["result"]["role"], "triager", "{t}");
    })
    .await;
}
