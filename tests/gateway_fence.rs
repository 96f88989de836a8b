//! Every call to a gateway names the node that drives it and the gateway's
//! placement token, which rises each time the gateway is placed on a node.
//! The gateway here is a `command` program that keeps the highest token it
//! has seen (under `flock`) and refuses lower ones with the documented exit
//! status: the contract a gateway follows to never be driven by two nodes.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail};
use serde_json::{Value, json};
use support::{Cluster, bounded, deadline, wait_until};

const TEST_BOUND: Duration = Duration::from_secs(150);

/// A fencing gateway: refuses a token lower than the highest in `state`,
/// else records it and answers who drove it.
fn fencing_gateway(state: &Path) -> Value {
    let script = format!(
        r#"exec 9>>"{state}.lock"; flock 9
seen=$(cat "{state}" 2>/dev/null || echo 0)
if [ "$GODEL_GATEWAY_TOKEN" -lt "$seen" ]; then echo "token $GODEL_GATEWAY_TOKEN < $seen" >&2; exit {code}; fi
echo "$GODEL_GATEWAY_TOKEN" > "{state}"
printf '{{"gateway":"%s","owner":%s,"token":%s}}' "$GODEL_GATEWAY_ID" "$GODEL_GATEWAY_OWNER" "$GODEL_GATEWAY_TOKEN""#,
        state = state.display(),
        code = godel::gateway::FENCED_EXIT_CODE,
    );
    json!({"id": "fenced", "region": "local", "max_sessions": 4, "capabilities": ["fence"],
           "breaker": {"failure_threshold": 3, "cool_down": "1s"},
           "driver": {"kind": "command", "program": "/bin/sh", "args": ["-c", script]}})
}

/// Submits a task for the gateway and waits for its result.
async fn run_one(api: &support::Api, node: usize, key: &str) -> Value {
    let body = json!({"payload": {}, "capabilities": ["fence"], "idempotency_key": key});
    let r = api
        .post_retrying(
            node,
            "/api/v1/tasks",
            &body,
            deadline(Duration::from_secs(20)),
        )
        .await;
    let id = r.body["id"].as_u64().expect("task id");
    wait_until(
        "the task to complete",
        deadline(Duration::from_secs(40)),
        async || {
            let t = api.get(node, &format!("/api/v1/tasks/{id}")).await?;
            if t.body["status"] == "completed" {
                Ok(t.body["result"].clone())
            } else {
                bail!("{}", t.body)
            }
        },
    )
    .await
}

async fn gateway(api: &support::Api, node: usize) -> anyhow::Result<Value> {
    let g = api.get(node, "/api/v1/gateways/fenced").await?;
    if g.status == 200 {
        Ok(g.body)
    } else {
        Err(anyhow!("{g:?}"))
    }
}

/// Registers the fencing gateway (state file `state`) and its agent
/// through node `leader`; returns the gateway once it is placed.
async fn register_fenced(api: &support::Api, leader: usize, state: &Path) -> Value {
    let r = api
        .post(leader, "/api/v1/gateways", &fencing_gateway(state))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{r:?}");
    let agent = json!({"id": "f-1", "gateway": "fenced", "capabilities": ["fence"], "capacity": 1});
    assert_eq!(
        api.post(leader, "/api/v1/agents", &agent)
            .await
            .unwrap()
            .status,
        201
    );
    wait_until(
        "the gateway to be placed",
        deadline(Duration::from_secs(15)),
        async || {
            let g = gateway(api, leader).await?;
            if g["owner"].is_u64() {
                Ok(g)
            } else {
                bail!("{g}")
            }
        },
    )
    .await
}

/// A call carries the owner and token the registry shows; after the owner
/// dies the new owner's calls carry a higher token; a gateway that has
/// seen a higher token refuses the call, which spends no attempt and trips
/// the breaker, and the task completes once the gateway takes calls again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_carry_the_owner_and_its_placement_token() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("highest-token");
    let cfg = "[gateways.command]\nallow = [\"/bin/sh\"]\n\
               [queue]\nnode_heartbeat_interval = \"300ms\"\nnode_dead_after = \"1500ms\"\n";
    let mut c = Cluster::start_with(3, cfg).await;
    bounded(TEST_BOUND, async {
        let api = c.api();
        let leader = c.leader().await;
        let placed = register_fenced(&api, leader, &state).await;
        assert_eq!(placed["placement_token"], 1, "{placed}");
        let first = run_one(&api, leader, "first").await;
        assert_eq!(
            first,
            json!({"gateway": "fenced", "owner": placed["owner"], "token": 1})
        );

        // The owner dies; the gateway moves and its token rises.
        let old_owner = placed["owner"].as_u64().unwrap();
        let victim = c.index_of(old_owner);
        c.kill9(victim);
        let survivor = (victim + 1) % 3;
        let moved = wait_until(
            "the gateway to move",
            deadline(Duration::from_secs(30)),
            async || {
                let g = gateway(&api, survivor).await?;
                if g["owner"].as_u64().is_some_and(|o| o != old_owner) {
                    Ok(g)
                } else {
                    bail!("{g}")
                }
            },
        )
        .await;
        assert_eq!(moved["placement_token"], 2, "{moved}");
        let second = run_one(&api, survivor, "second").await;
        assert_eq!(
            second,
            json!({"gateway": "fenced", "owner": moved["owner"], "token": 2})
        );

        // The gateway has seen a token the owner does not have: it refuses,
        // the lease goes back with no attempt spent, and the breaker opens.
        std::fs::write(&state, "99\n").unwrap();
        let body = json!({"payload": {}, "capabilities": ["fence"], "idempotency_key": "refused"});
        let t = api
            .post_retrying(
                survivor,
                "/api/v1/tasks",
                &body,
                deadline(Duration::from_secs(20)),
            )
            .await;
        let id = t.body["id"].as_u64().unwrap();
        wait_until(
            "the breaker to open",
            deadline(Duration::from_secs(30)),
            async || {
                let g = gateway(&api, survivor).await?;
                if g["circuit"] == "open" {
                    Ok(())
                } else {
                    bail!("{g}")
                }
            },
        )
        .await;
        let t = api.get_ok(survivor, &format!("/api/v1/tasks/{id}")).await;
        assert_eq!(
            t["attempt_count"], 0,
            "a refused fence spends no attempt: {t}"
        );
        assert_ne!(t["status"], "completed", "{t}");
        let refused = c
            .node(c.index_of(moved["owner"].as_u64().unwrap()))
            .log_tail(2000);
        assert!(
            refused.contains("gateway refused this node's fencing token"),
            "{refused}"
        );

        // The gateway takes calls again: the task completes under token 2.
        std::fs::write(&state, "2\n").unwrap();
        wait_until(
            "the refused task to complete",
            deadline(Duration::from_secs(40)),
            async || {
                let t = api.get(survivor, &format!("/api/v1/tasks/{id}")).await?;
                if t.body["status"] == "completed" {
                    Ok(())
                } else {
                    bail!("{}", t.body)
                }
            },
        )
        .await;
        let t = api.get_ok(survivor, &format!("/api/v1/tasks/{id}")).await;
        assert_eq!(t["result"]["token"], 2, "{t}");
    })
    .await;
}

/// The log line's timestamp (RFC 3339, fixed width, so strings compare as
/// times) of the first line of `log` that contains every one of `needles`.
fn logged_at(log: &str, needles: &[&str]) -> Option<String> {
    log.lines()
        .find(|l| needles.iter().all(|n| l.contains(n)))
        .and_then(|l| l.split_whitespace().next())
        .map(str::to_owned)
}

/// A node cut off from the majority stops its gateway and agent actors
/// before the majority places its gateway elsewhere (so the gateway is not
/// driven from both sides), says so in its log and metrics, and once healed
/// runs what the registry places on it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_off_node_stops_driving_its_gateway_before_the_majority_moves_it() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("highest-token");
    let cfg = "[gateways.command]\nallow = [\"/bin/sh\"]\n\
               [runtime]\nfault_injection = true\n\
               [queue]\nnode_heartbeat_interval = \"300ms\"\nnode_dead_after = \"1500ms\"\n";
    let c = Cluster::start_with(3, cfg).await;
    bounded(TEST_BOUND, async {
        let api = c.api();
        let leader = c.leader().await;
        let placed = register_fenced(&api, leader, &state).await;
        let owner = placed["owner"].as_u64().unwrap();
        let x = c.index_of(owner);
        run_one(&api, x, "before").await;
        assert_eq!(api.metric(x, "godel_node_cut_off").await, 0.0);

        // Cut the owner away from both others, both ways.
        let others: Vec<usize> = (0..3).filter(|j| *j != x).collect();
        let peers: Vec<u64> = others.iter().map(|j| c.node(*j).id).collect();
        let r = api
            .post(
                x,
                "/api/v1/admin/faults/partition",
                &json!({"peers": peers}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        for j in &others {
            let r = api
                .post(
                    *j,
                    "/api/v1/admin/faults/partition",
                    &json!({"peers": [owner]}),
                )
                .await
                .unwrap();
            assert_eq!(r.status, 200, "{r:?}");
        }
        let new_owner = wait_until(
            "the majority to move the gateway",
            deadline(Duration::from_secs(20)),
            async || {
                let g = gateway(&api, others[0]).await?;
                match g["owner"].as_u64() {
                    Some(o) if o != owner => Ok(o),
                    _ => bail!("{g}"),
                }
            },
        )
        .await;
        wait_until(
            "the cut-off node to say so",
            deadline(Duration::from_secs(10)),
            async || {
                if api.metric(x, "godel_node_cut_off").await == 1.0 {
                    Ok(())
                } else {
                    bail!("not yet")
                }
            },
        )
        .await;
        let stopped = logged_at(
            &c.node(x).log_tail(4000),
            &["stopping gateway actor", "gateway:fenced"],
        )
        .expect("the cut-off node stopped the gateway actor");
        let moved_by = c.index_of(
            api.get_ok(others[0], "/api/v1/cluster").await["leader"]
                .as_u64()
                .expect("a leader"),
        );
        let moved = logged_at(
            &c.node(moved_by).log_tail(4000),
            &[
                "gateway placed",
                "gateway=fenced",
                &format!("owner=Some({new_owner})"),
            ],
        )
        .expect("the leader logged the move");
        assert!(stopped < moved, "stopped at {stopped}, moved at {moved}");

        // Healed: the node is in contact again and runs nothing of the
        // gateway (placed elsewhere now), while the new owner runs its work.
        for i in 0..3 {
            let r = api
                .post(i, "/api/v1/admin/faults/heal", &json!({}))
                .await
                .unwrap();
            assert_eq!(r.status, 200, "{r:?}");
        }
        wait_until(
            "the healed node to be in contact",
            deadline(Duration::from_secs(20)),
            async || {
                if api.metric(x, "godel_node_cut_off").await == 0.0 {
                    Ok(())
                } else {
                    bail!("still cut off")
                }
            },
        )
        .await;
        let after = run_one(&api, x, "after").await;
        assert_eq!(after["owner"], new_owner, "{after}");
        assert_eq!(after["token"], 2, "{after}");
    })
    .await;
}
