//! The queue-shard keepers (`actors/keeper.rs`) on three `godel serve`
//! processes with three queue shards: each shard's keeper actor runs on
//! exactly one node, the one leading the shard's group, and keeps the
//! shard's timers there. When that node is killed with SIGKILL, the keeper
//! starts on the shard's new leader, which then expires a lease the dead
//! leader granted (the task goes back to `pending`): with no keeper
//! following the leadership, nothing would tick in that shard.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use support::{Api, Cluster, bounded, deadline, wait_until};

const TEST_BOUND: Duration = Duration::from_secs(180);

/// The shard a key of `tenant` routes to over three shards.
fn route(tenant: &str, key: &str) -> u64 {
    u64::from(godel::fsm::route(tenant, key, 3))
}

/// Per shard, its leader and the nodes running its keeper, over the live
/// nodes; an error until every live node agrees on each leader and the
/// leader alone runs the keeper.
async fn keepers_on_leaders(c: &Cluster, api: &Api) -> anyhow::Result<BTreeMap<u64, u64>> {
    let mut leaders: BTreeMap<u64, u64> = BTreeMap::new();
    let mut keepers: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for i in c.live() {
        let s = api.cluster(i).await?;
        let me = s["node_id"].as_u64().unwrap_or(0);
        for e in s["shards"].as_array().into_iter().flatten() {
            let (Some(shard), Some(leader)) = (e["shard"].as_u64(), e["leader"].as_u64()) else {
                anyhow::bail!("node {me}: shard without a leader: {e}");
            };
            if leaders.insert(shard, leader).is_some_and(|l| l != leader) {
                anyhow::bail!("nodes disagree on shard {shard}'s leader");
            }
        }
        for k in s["keepers"].as_array().into_iter().flatten() {
            keepers.entry(k.as_u64().unwrap_or(0)).or_default().push(me);
        }
    }
    for (shard, leader) in &leaders {
        let on = keepers.get(shard).cloned().unwrap_or_default();
        anyhow::ensure!(
            on == vec![*leader],
            "shard {shard}: leader {leader}, keeper on {on:?}"
        );
    }
    anyhow::ensure!(leaders.len() == 3, "leaders {leaders:?}");
    Ok(leaders)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_shards_keeper_runs_on_its_leader_and_moves_with_it() {
    let mut c = Cluster::start_with(3, "[cluster]\nshards = 3\n").await;
    let api = c.api();
    bounded(TEST_BOUND, async {
        let leaders = wait_until(
            "a keeper on each shard's leader",
            deadline(Duration::from_secs(40)),
            async || keepers_on_leaders(&c, &api).await,
        )
        .await;
        // A task in shard 2, leased for 2 s and never renewed.
        let key = (0..)
            .map(|n| format!("k{n}"))
            .find(|k| route("acme", k) == 2)
            .unwrap();
        let leader = c.index_of(leaders[&2]);
        let other = (leader + 1) % 3;
        let body = json!({ "tenant": "acme", "payload": {}, "idempotency_key": key });
        let r = api
            .post_retrying(
                other,
                "/api/v1/tasks",
                &body,
                deadline(Duration::from_secs(20)),
            )
            .await;
        assert_eq!(r.status, 201, "{r:?}");
        let id = r.body["id"].as_u64().unwrap();
        let r = api
            .post(
                other,
                "/api/v1/leases",
                &json!({ "agent_id": "w1", "capabilities": [], "max": 1, "lease_ms": 2000 }),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body["leases"][0]["task"]["id"], id, "{r:?}");

        // Shard 2's leader dies; its keeper comes up on the new leader.
        c.kill9(leader);
        let moved = wait_until(
            "shard 2's keeper on its new leader",
            deadline(Duration::from_secs(30)),
            async || keepers_on_leaders(&c, &api).await,
        )
        .await;
        assert_ne!(moved[&2], leaders[&2]);
        // The new leader's keeper expires the lease.
        let survivor = c.live()[0];
        let status = wait_until(
            "the lease to expire",
            deadline(Duration::from_secs(30)),
            async || {
                let t: Value = api
                    .get(survivor, &format!("/api/v1/tasks/{id}"))
                    .await?
                    .body;
                anyhow::ensure!(t["status"] == "pending", "task {t}");
                Ok(t)
            },
        )
        .await;
        assert_eq!(
            (&status["attempt_count"], &status["lease_count"]),
            (&json!(0), &json!(1)),
            "an expired lease spends no attempt: {status}"
        );
        c.restart(leader);
        c.wait_caught_up(leader, Duration::from_secs(40)).await;
        wait_until(
            "keepers settled after the restart",
            deadline(Duration::from_secs(40)),
            async || keepers_on_leaders(&c, &api).await,
        )
        .await;
    })
    .await;
}
