//! Shard placement (`cluster.shard_placement`, `docs/shards.md`): six nodes
//! in three regions, run in this process, with three queue shards. With
//! more than five voters in three regions the default (`auto`) is `spread`:
//! each shard's leader makes the group's voters three nodes in three
//! regions and every other node a learner, so each node still has a
//! replica of every shard. `regional` puts a shard's voters in its home
//! region only.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use godel::config::Config;
use godel::node::Node;
use support::{SECRET, bounded, free_port, free_raft_port};
use tokio_util::sync::CancellationToken;

const TEST_BOUND: Duration = Duration::from_secs(120);
const SHARDS: u32 = 3;
const REGIONS: [&str; 3] = ["ap", "eu", "us"];

struct Member {
    id: u64,
    region: &'static str,
    api: u16,
    raft: u16,
    dir: tempfile::TempDir,
}

fn config(me: &Member, all: &[Member], placement: &str) -> Config {
    let mut text = format!(
        "[node]\nid = {}\nregion = {:?}\ndata_dir = {:?}\napi_addr = \"127.0.0.1:{}\"\nraft_addr = \"127.0.0.1:{}\"\n\
         [raft]\nheartbeat_interval = \"50ms\"\nelection_timeout_min = \"150ms\"\nelection_timeout_max = \"300ms\"\n\
         [queue]\nnode_heartbeat_interval = \"500ms\"\nnode_dead_after = \"1h\"\n\
         [fabric]\nenabled = false\n\
         [cluster]\nsecret = {:?}\nshards = {SHARDS}\nshard_placement = {placement:?}\n",
        me.id,
        me.region,
        me.dir.path().join("data"),
        me.api,
        me.raft,
        SECRET,
    );
    for m in all {
        text.push_str(&format!(
            "[[cluster.members]]\nid = {}\nraft_addr = \"127.0.0.1:{}\"\napi_addr = \"127.0.0.1:{}\"\nregion = {:?}\n",
            m.id, m.raft, m.api, m.region
        ));
    }
    let c = Config::from_toml(&text).expect("config parses");
    c.validate().expect("config is valid");
    c
}

/// Starts six nodes, two per region, with `placement`; waits until every
/// shard's voters, as every node sees them, pass `check`, and returns them.
async fn settle(
    placement: &str,
    check: impl Fn(u32, &BTreeSet<u64>, &BTreeMap<u64, &str>) -> Result<(), String>,
) {
    let members: Vec<Member> = (1..=6)
        .map(|id| Member {
            id,
            region: REGIONS[(id as usize - 1) / 2],
            api: free_port(),
            raft: free_raft_port(),
            dir: tempfile::tempdir().unwrap(),
        })
        .collect();
    let region_of: BTreeMap<u64, &str> = members.iter().map(|m| (m.id, m.region)).collect();
    let shutdown = CancellationToken::new();
    let starts = members
        .iter()
        .map(|m| Node::start(config(m, &members, placement), shutdown.child_token()));
    let nodes: Vec<Node> = futures_util::future::try_join_all(starts)
        .await
        .expect("nodes start");
    bounded(TEST_BOUND, async {
        let give_up = Instant::now() + Duration::from_secs(90);
        loop {
            let mut problems = Vec::new();
            for shard in 1..=SHARDS {
                for n in &nodes {
                    let group = n.group(shard).expect("every node hosts every shard");
                    let (voters, all) = group.members();
                    let voters: BTreeSet<u64> = voters.into_iter().collect();
                    if all.len() != 6 {
                        problems.push(format!(
                            "node {} sees {} members of shard {shard}",
                            n.id(),
                            all.len()
                        ));
                    }
                    if let Err(e) = check(shard, &voters, &region_of) {
                        problems.push(format!("node {}, shard {shard}: {e}", n.id()));
                    }
                }
            }
            if problems.is_empty() {
                break;
            }
            assert!(Instant::now() < give_up, "never settled: {problems:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    for n in &nodes {
        n.stop(Duration::from_secs(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_spreads_each_shards_voters_over_three_regions() {
    settle("auto", |_, voters, region_of| {
        let regions: BTreeSet<&str> = voters.iter().map(|v| region_of[v]).collect();
        if voters.len() == 3 && regions.len() == 3 {
            Ok(())
        } else {
            Err(format!("voters {voters:?} in {regions:?}"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regional_keeps_each_shards_voters_in_its_home_region() {
    settle("regional", |shard, voters, region_of| {
        let regions: BTreeSet<&str> = voters.iter().map(|v| region_of[v]).collect();
        let home = REGIONS[(shard as usize - 1) % REGIONS.len()];
        if voters.len() == 2 && regions == BTreeSet::from([home]) {
            Ok(())
        } else {
            Err(format!("voters {voters:?} in {regions:?}, home {home}"))
        }
    })
    .await;
}
