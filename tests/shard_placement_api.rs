//! A queue shard's own placement over the HTTP API (`PUT` and `DELETE
//! /shards/{id}/placement`), on three `godel serve` processes in three
//! regions with three shards. By default (`auto`, three voters) every
//! shard's voters are the three nodes; placing shard 2 `regional` in `eu`
//! makes the `eu` node its only voter (the others keep replicas as
//! learners) while shards 1 and 3 keep all three, and it still takes and
//! serves tasks; deleting the placement brings the three voters back. Bad
//! input (a home with another placement, a region no node is in, an
//! unknown placement, a shard the cluster lacks) is refused and changes
//! nothing. `godel cluster unplace-shard` sends the `DELETE`.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Api, BIN, Cluster, bounded, deadline, wait_until};

const TEST_BOUND: Duration = Duration::from_secs(200);
const REGIONS: [&str; 3] = ["ap", "eu", "us"];

/// Shard `shard`'s voters and its entry in `shards`, as node `i` sees them.
async fn shard_view(api: &Api, i: usize, shard: u64) -> anyhow::Result<(Vec<u64>, Value)> {
    let s = api.cluster(i).await?;
    let group = s["groups"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["group"] == shard))
        .ok_or_else(|| anyhow::anyhow!("no group {shard}"))?;
    let mut voters: Vec<u64> = group["voters"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    voters.sort_unstable();
    let entry = s["shards"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["shard"] == shard))
        .cloned()
        .unwrap_or(Value::Null);
    Ok((voters, entry))
}

/// Waits until every node sees `voters` for each shard of `want`.
async fn wait_voters(c: &Cluster, want: &[(u64, Vec<u64>)], what: &str) {
    let api = c.api();
    wait_until(what, deadline(Duration::from_secs(60)), async || {
        c.check_alive()?;
        for i in 0..3 {
            for (shard, voters) in want {
                let (seen, _) = shard_view(&api, i, *shard).await?;
                anyhow::ensure!(
                    seen == *voters,
                    "node index {i}, shard {shard}: voters {seen:?}, want {voters:?}"
                );
            }
        }
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_placed_in_its_home_region_has_its_voters_there_and_back() {
    let c = Cluster::start_in_regions(&REGIONS, "[cluster]\nshards = 3\n").await;
    let api = c.api();
    bounded(TEST_BOUND, async {
        let ids: Vec<u64> = (0..3).map(|i| c.node(i).id).collect();
        let eu = ids[REGIONS.iter().position(|r| *r == "eu").unwrap()];
        let all = {
            let mut v = ids.clone();
            v.sort_unstable();
            v
        };
        wait_voters(
            &c,
            &[(1, all.clone()), (2, all.clone()), (3, all.clone())],
            "every shard on all three nodes",
        )
        .await;
        let (_, entry) = shard_view(&api, 0, 2).await.unwrap();
        assert_eq!(entry["placement"], "auto", "{entry}");

        // Bad input is refused and changes nothing.
        let path = "/api/v1/shards/2/placement";
        for (body, status) in [
            (json!({ "placement": "spread", "home": "eu" }), 400),
            (json!({ "placement": "regional", "home": "mars" }), 400),
            (json!({ "placement": "wide" }), 400),
            (json!({ "placement": "regional", "extra": 1 }), 400),
        ] {
            let r = api.put(0, path, &body).await.unwrap();
            assert_eq!(r.status, status, "{body}: {r:?}");
        }
        for bad in ["9", "0", "x"] {
            let r = api
                .put(
                    1,
                    &format!("/api/v1/shards/{bad}/placement"),
                    &json!({ "placement": "every" }),
                )
                .await
                .unwrap();
            assert_eq!(r.status, 404, "shard {bad}: {r:?}");
        }
        let (_, entry) = shard_view(&api, 0, 2).await.unwrap();
        assert_eq!(entry["placement"], "auto", "unchanged: {entry}");

        // Shard 2 in eu: its one voter is the eu node.
        let r = api
            .put(1, path, &json!({ "placement": "regional", "home": "eu" }))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(
            r.body,
            json!({ "shard": 2, "placement": "regional", "home": "eu", "own": true })
        );
        wait_voters(
            &c,
            &[(1, all.clone()), (2, vec![eu]), (3, all.clone())],
            "shard 2's voters in eu only",
        )
        .await;
        for i in 0..3 {
            let (_, entry) = shard_view(&api, i, 2).await.unwrap();
            assert_eq!(
                (&entry["placement"], &entry["home"]),
                (&json!("regional"), &json!("eu"))
            );
        }

        // It still takes and serves tasks: a key routed to shard 2.
        let key = (0..)
            .map(|n| format!("k{n}"))
            .find(|k| route("acme", k) == 2)
            .unwrap();
        let body = json!({ "tenant": "acme", "payload": {}, "idempotency_key": key });
        let r = api
            .post_retrying(2, "/api/v1/tasks", &body, deadline(Duration::from_secs(30)))
            .await;
        assert_eq!(r.status, 201, "{r:?}");
        let id = r.body["id"].as_u64().unwrap();
        assert_eq!(id & 0xff, 2);
        for i in 0..3 {
            let t = api.get_ok(i, &format!("/api/v1/tasks/{id}")).await;
            assert_eq!(t["id"], id);
        }

        // Back to the cluster's placement (through the CLI, which sends
        // the DELETE): all three voters again.
        let url = format!("http://{}", c.node(0).api_addr);
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new(BIN)
                .env("GODEL_API_KEY", support::ADMIN_KEY)
                .args(["--api", &url, "-o", "json", "cluster", "unplace-shard", "2"])
                .output()
                .expect("run godel")
        })
        .await
        .unwrap();
        assert!(out.status.success(), "{out:?}");
        let body: Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(body["own"], false, "{body}");
        wait_voters(
            &c,
            &[(1, all.clone()), (2, all.clone()), (3, all.clone())],
            "shard 2 on all three nodes again",
        )
        .await;
    })
    .await;
}

/// The shard a key of `tenant` routes to over three shards.
fn route(tenant: &str, key: &str) -> u64 {
    u64::from(godel::fsm::route(tenant, key, 3))
}
