//! A node cut off from the others does not campaign, so healing the cut
//! deposes no leader (chaos/README.md finding 5). The cut-off node cannot
//! gather a majority in its pre-vote, so its terms stay where they were;
//! when the cut heals it follows the leaders it finds. Checked on every
//! Raft group of a 3-node, 3-shard cluster: the groups the cut-off node did
//! not lead keep their leader and term through the cut and the heal.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::bail;
use serde_json::{Value, json};
use support::{Api, Cluster, bounded, deadline, wait_until};

const TEST_BOUND: Duration = Duration::from_secs(120);
const CONFIG: &str = "[cluster]\nshards = 3\n[runtime]\nfault_injection = true\n";

/// Node `i`'s view: group -> (leader, term).
async fn groups(api: &Api, i: usize) -> anyhow::Result<BTreeMap<u64, (Option<u64>, u64)>> {
    let view = api.cluster(i).await?;
    Ok(view["groups"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|g| {
            (
                g["group"].as_u64().unwrap_or(u64::MAX),
                (g["leader"].as_u64(), g["term"].as_u64().unwrap_or(0)),
            )
        })
        .collect())
}

async fn fault(api: &Api, i: usize, path: &str, body: &Value) {
    let r = api
        .post(i, &format!("/api/v1/admin/faults/{path}"), body)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healed_node_deposes_no_leader() {
    let c = Cluster::start_with(3, CONFIG).await;
    bounded(TEST_BOUND, async {
        let api = c.api();
        // Settled: every group has a leader, one shard leader per node, and
        // nothing has changed for a while.
        let before = wait_until(
            "settled groups",
            deadline(Duration::from_secs(40)),
            async || {
                let g = groups(&api, 0).await?;
                let shard_leaders: std::collections::BTreeSet<_> = g
                    .iter()
                    .filter(|(id, _)| **id > 0)
                    .map(|(_, (l, _))| *l)
                    .collect();
                if g.len() != 4 || g.values().any(|(l, _)| l.is_none()) || shard_leaders.len() != 3
                {
                    bail!("not settled: {g:?}");
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
                let again = groups(&api, 0).await?;
                if again != g {
                    bail!("still moving: {g:?} -> {again:?}");
                }
                Ok(g)
            },
        )
        .await;
        let meta_leader = before[&0].0.unwrap();
        // Cut off a node that does not lead the meta group.
        let x = (0..3).find(|i| c.node(*i).id != meta_leader).unwrap();
        let xid = c.node(x).id;
        let others: Vec<usize> = (0..3).filter(|j| *j != x).collect();
        let peers: Vec<u64> = others.iter().map(|j| c.node(*j).id).collect();
        fault(&api, x, "partition", &json!({"peers": peers})).await;
        for j in &others {
            fault(&api, *j, "partition", &json!({"peers": [xid]})).await;
        }
        // Far longer than an election timeout (150-300 ms).
        tokio::time::sleep(Duration::from_secs(4)).await;
        let cut = groups(&api, x).await.unwrap();
        for (g, (_, term)) in &cut {
            let led_by_x = before[g].0 == Some(xid);
            if !led_by_x {
                assert_eq!(
                    *term, before[g].1,
                    "group {g}: the cut-off node campaigned (term {} -> {term})",
                    before[g].1
                );
            }
        }
        for i in [x].iter().chain(&others) {
            fault(&api, *i, "heal", &json!({})).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        // The groups node x did not lead kept their leader and term on
        // every node.
        for i in 0..3 {
            let after = groups(&api, i).await.unwrap();
            for (g, (leader, term)) in &before {
                if *leader == Some(xid) {
                    continue;
                }
                assert_eq!(
                    after[g],
                    (*leader, *term),
                    "group {g} on node {}: before {:?}, after {:?}",
                    c.node(i).id,
                    (leader, term),
                    after[g]
                );
            }
        }
    })
    .await;
}
