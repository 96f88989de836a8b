//! Queue shards as Raft groups on running nodes (`docs/shards.md`, step 1):
//! with `cluster.shards = 3` every node hosts the meta group and three
//! shard groups, each replicated on every voter, with one shard leader per
//! node once the groups have settled. A node killed with its shard
//! leaderships hands them to the others, and takes its share back when it
//! returns; a draining node gives its shard leaderships away; a node that
//! joins becomes a voter of every shard, and one that leaves is out of
//! every group when `leave` returns; a node whose shard count differs from
//! the cluster's is refused, at join (named or probed) and at start.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Result, bail};
use serde_json::{Value, json};
use support::{Api, Cluster, bounded, deadline, wait_until};

const TEST_BOUND: Duration = Duration::from_secs(150);
const SETTLE: Duration = Duration::from_secs(40);
const SHARDED: &str = "[cluster]\nshards = 3\n";

/// Node `i`'s view of the groups, checked for shape: the meta group and
/// shards 1..=3, each with `voters` voters and a leader among `live`.
/// Returns the shard groups' leaders (node ids), in shard order.
async fn settled_groups(api: &Api, i: usize, voters: &BTreeSet<u64>) -> Result<Vec<u64>> {
    let view = api.cluster(i).await?;
    if view["shard_count"] != 3 {
        bail!("shard count not recorded yet: {}", view["shard_count"]);
    }
    let groups = view["groups"].as_array().cloned().unwrap_or_default();
    let ids: Vec<u64> = groups.iter().filter_map(|g| g["group"].as_u64()).collect();
    if ids != [0, 1, 2, 3] {
        bail!("groups {ids:?}");
    }
    let mut leaders = Vec::new();
    for g in &groups {
        let have: BTreeSet<u64> = g["voters"]
            .as_array()
            .map(|v| v.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        if &have != voters {
            bail!("group {}: voters {have:?}, want {voters:?}", g["group"]);
        }
        if g["learners"].as_array().is_some_and(|l| !l.is_empty()) {
            bail!("group {}: learners {}", g["group"], g["learners"]);
        }
        let Some(leader) = g["leader"].as_u64() else {
            bail!("group {} has no leader", g["group"]);
        };
        if !voters.contains(&leader) {
            bail!("group {} led by {leader}, not a voter", g["group"]);
        }
        if g["group"] != 0 {
            leaders.push(leader);
        }
    }
    let shards: Vec<u64> = view["shards"]
        .as_array()
        .map(|s| s.iter().filter_map(|x| x["leader"].as_u64()).collect())
        .unwrap_or_default();
    if shards != leaders {
        bail!("`shards` says {shards:?}, `groups` {leaders:?}");
    }
    Ok(leaders)
}

/// Waits until every live node sees the same settled groups whose shard
/// leaders are `spread` over distinct nodes (when asked); returns them.
async fn wait_settled(c: &Cluster, voters: &BTreeSet<u64>, spread: bool) -> Vec<u64> {
    let api = c.api();
    wait_until("the shard groups to settle", deadline(SETTLE), async || {
        c.check_alive()?;
        let mut seen = None;
        for i in c.live() {
            let leaders = settled_groups(&api, i, voters).await?;
            if seen.as_ref().is_some_and(|s| s != &leaders) {
                bail!("nodes disagree on shard leaders: {seen:?} vs {leaders:?}");
            }
            seen = Some(leaders);
        }
        let leaders = seen.unwrap_or_default();
        let distinct: BTreeSet<u64> = leaders.iter().copied().collect();
        if spread && distinct.len() != leaders.len().min(voters.len()) {
            bail!("shard leaders not spread: {leaders:?}");
        }
        Ok(leaders)
    })
    .await
}

fn ids(c: &Cluster, nodes: impl IntoIterator<Item = usize>) -> BTreeSet<u64> {
    nodes.into_iter().map(|i| c.node(i).id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_shards_spread_their_leaders_and_survive_a_kill() {
    let mut c = Cluster::start_with(3, SHARDED).await;
    bounded(TEST_BOUND, async {
        let all = ids(&c, 0..3);
        let leaders = wait_settled(&c, &all, true).await;
        eprintln!("shard leaders: {leaders:?}");
        // The metrics say the same as the view.
        let api = c.api();
        let mut led = 0.0;
        for i in 0..3 {
            for g in 1..=3 {
                led += api
                    .metric(i, &format!("godel_raft_group_is_leader{{group=\"{g}\"}}"))
                    .await;
            }
        }
        assert_eq!(led, 3.0, "one leader per shard group across the nodes");

        // kill -9 the leader of shard 1: the survivors lead every group.
        let victim = c.index_of(leaders[0]);
        c.kill9(victim);
        let rest = ids(&c, (0..3).filter(|i| *i != victim));
        let api = c.api();
        wait_until(
            "the survivors to lead every group",
            deadline(SETTLE),
            async || {
                for i in c.live() {
                    let view = api.cluster(i).await?;
                    for g in view["groups"].as_array().cloned().unwrap_or_default() {
                        match g["leader"].as_u64() {
                            Some(l) if rest.contains(&l) => {}
                            other => bail!("group {} led by {other:?}", g["group"]),
                        }
                    }
                }
                Ok(())
            },
        )
        .await;

        // It comes back with its data: every group counts it again and the
        // leaders spread over the three nodes once more.
        c.restart(victim);
        let again = wait_settled(&c, &all, true).await;
        eprintln!("shard leaders after the restart: {again:?}");

        // A draining node hands its shard leaderships to the others.
        let drained = again[1];
        let r = api
            .post(
                0,
                &format!("/api/v1/admin/nodes/{drained}/drain"),
                &json!({}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        let moved = wait_until(
            "shard leadership to leave the draining node",
            deadline(SETTLE),
            async || {
                let leaders = settled_groups(&api, 0, &all).await?;
                if leaders.contains(&drained) {
                    bail!("node {drained} still leads a shard: {leaders:?}");
                }
                Ok(leaders)
            },
        )
        .await;
        eprintln!("shard leaders with node {drained} draining: {moved:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_nodes_get_every_shard_and_a_different_count_is_refused() {
    let mut c = Cluster::start_with(3, SHARDED).await;
    bounded(TEST_BOUND, async {
        wait_settled(&c, &ids(&c, 0..3), true).await;
        let api = c.api();

        // A join that names another shard count is refused by value and
        // changes nothing.
        let r = api
            .post(
                0,
                "/api/v1/cluster/join",
                &json!({"id": 42, "raft_addr": "127.0.0.1:1", "api_addr": "127.0.0.1:2", "shards": 2}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{r:?}");
        assert!(r.message().contains("cluster.shards = 2"), "{r:?}");
        let members = api.cluster(0).await.unwrap()["members"]
            .as_array()
            .map_or(0, Vec::len);
        assert_eq!(members, 3);

        // A node that joins with the same count becomes a voter of the
        // meta group and of every shard.
        let new = c.start_joining(0);
        wait_settled(&c, &ids(&c, 0..4), false).await;

        // When it leaves, `leave` returns once no group lists it.
        let r = api
            .post(
                0,
                "/api/v1/cluster/leave",
                &json!({"id": c.node(new).id}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        // Every group has dropped it (the meta leader waited for that; this
        // node's replicas may apply the change a moment later).
        let three = ids(&c, 0..3);
        wait_until(
            "every group without the node",
            deadline(Duration::from_secs(3)),
            async || {
                let view = api.cluster(0).await?;
                for g in view["groups"].as_array().cloned().unwrap_or_default() {
                    let members: BTreeSet<u64> = ["voters", "learners"]
                        .iter()
                        .flat_map(|k| g[*k].as_array().cloned().unwrap_or_default())
                        .filter_map(|v| v.as_u64())
                        .collect();
                    if members != three {
                        bail!("group {}: {members:?}", g["group"]);
                    }
                }
                Ok(())
            },
        )
        .await;

        // A node restarted with fewer shards refuses to start, saying why.
        assert!(c.terminate(new, Duration::from_secs(10)));
        c.edit_config(new, |t| t.replace("shards = 3", "shards = 2"));
        c.restart(new);
        let exit = c.node(new).wait_exit(Duration::from_secs(20));
        assert!(exit.is_some_and(|s| !s.success()), "{exit:?}");
        let log = c.node(new).log_tail(40);
        assert!(
            log.contains("cluster.shards is 2 but this cluster has 3 queue shards"),
            "{log}"
        );

        // A node configured with another count asks to join and is refused
        // by the count it names; asked for it without a count (as `godel
        // cluster join` does), the leader probes its groups and refuses it
        // too. It never becomes a member.
        let odd = c.start_joining_with(0, "[cluster]\nshards = 2\n");
        wait_until("the join to be refused", deadline(SETTLE), async || {
            let log = c.node(odd).log_tail(60);
            if log.contains("is configured with cluster.shards = 2 but this cluster has 3") {
                Ok(())
            } else {
                bail!("not refused yet")
            }
        })
        .await;
        let n = c.node(odd);
        let r = api
            .post(
                0,
                "/api/v1/cluster/join",
                &json!({"id": n.id, "raft_addr": n.raft_addr.to_string(), "api_addr": n.api_addr.to_string()}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{r:?}");
        assert!(
            r.message()
                .contains("is not configured for this cluster's 3 queue shards: it hosts no shard group 3"),
            "{r:?}"
        );
        let members = api.cluster(0).await.unwrap()["members"]
            .as_array()
            .map_or(0, Vec::len);
        assert_eq!(members, 3);
    })
    .await;
}
