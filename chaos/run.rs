//! One drill, start to verdict: start the cluster, register the fleet
//! (three `sim` and three `command` gateways, or on the regions-3x3 shape
//! one of each per region), start the load, run the fault schedule, stop
//! the load, wait for quiescence, and gather the verdict.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::Value;

use crate::drill::{Drill, Shape};
use crate::events::Events;
use crate::fleet::{
    Work, all_tasks, mixed_gateways, now_ms, register_fleet, sim_gateway_in, wait_placed,
};
use crate::inject::{Injector, Mounts, Probes};
use crate::load::Load;
use crate::support::{Api, Cluster};
use crate::verdict::Verdict;

/// Extra node config for drills: node heartbeats fast enough that a dead
/// node's gateways move within seconds (as in `tests/runtime.rs`), and the
/// fault-injection endpoints on.
const NODE_CONFIG: &str = "[queue]\nnode_heartbeat_interval = \"250ms\"\n\
                           node_dead_after = \"1500ms\"\ndefault_lease = \"30s\"\n\n\
                           [runtime]\nfault_injection = true\n";
/// Raft timings for the regions-3x3 shape, where nine debug processes
/// share two cores. A follower of a leader that went silent stands for
/// election after the leader's lease (openraft: `election_timeout_max`)
/// plus a random election timeout, so a cut-off leader is replaced after
/// 1.5-2 times the longest timeout. Measured on the region drills
/// (2026-12-04, chaos/README.md): the harness's 50 ms heartbeat and
/// 150-300 ms elections (the three-node drills') elected two leaders while
/// no fault was held in a region-loss run (no heal there); `cluster-config/
/// regions-3x3`'s 100 ms and 400-800 ms replaced a cut-off leader's region
/// in 1.48-1.85 s, close to the 2 s bound; 100 ms and 250-500 ms did it in
/// 0.93-1.47 s, with no such elections.
const RAFT_9: &str = "[raft]\nheartbeat_interval = \"100ms\"\n\
                      election_timeout_min = \"250ms\"\nelection_timeout_max = \"500ms\"\n\n";
/// Statuses a task can leave.
const OPEN: [&str; 5] = ["pending", "scheduled", "leased", "running", "failed"];

/// Runs drill `d`; panics (bounded waits in the harness) abort it.
pub async fn run(d: Drill, seed: u64) -> Result<Verdict> {
    let started = Instant::now();
    let work = Work::new();
    // Declared before the cluster, so dropped after its nodes are killed.
    let mut mounts = Mounts::default();
    let raft = if d.shape == Shape::Regions3x3 {
        RAFT_9
    } else {
        ""
    };
    // `GODEL_CHAOS_DISPATCH=pull` runs a drill with pull dispatch
    // (`runtime.dispatch`; the default is push).
    let dispatch = match std::env::var("GODEL_CHAOS_DISPATCH") {
        Ok(mode) => format!("dispatch = {mode:?}\n"),
        Err(_) => String::new(),
    };
    // `GODEL_CHAOS_SHARDS=3` runs it with the queue in three shard groups
    // (`cluster.shards`; dispatch is then pull).
    let shards = match std::env::var("GODEL_CHAOS_SHARDS") {
        Ok(n) => Some(n.parse::<u32>()?),
        Err(_) => d.shards,
    };
    let shards = match shards {
        Some(n) => format!("[cluster]\nshards = {n}\n"),
        None => String::new(),
    };
    let config = format!(
        "{raft}{NODE_CONFIG}{dispatch}{}{shards}",
        work.policy_toml()
    );
    let mut c = Cluster::start_in_regions(&d.regions(), &config).await;
    let mut v = drive(&d, seed, &work, &mut c, &mut mounts).await?;
    v.wall_s = started.elapsed().as_secs_f64();
    Ok(v)
}

async fn drive(
    d: &Drill,
    seed: u64,
    work: &Work,
    c: &mut Cluster,
    mounts: &mut Mounts,
) -> Result<Verdict> {
    let api = c.api();
    let leader = c.leader().await;
    let gateways = match d.shape {
        Shape::OneRegion => mixed_gateways(work),
        Shape::Regions3x3 => regional_gateways(work, &crate::drill::REGIONS_3X3),
    };
    let ids = register_fleet(&api, leader, &gateways, 2, 3).await;
    let placed = wait_placed(&api, leader, &ids).await;
    check_placement(c, &gateways, &placed)?;
    let addrs = (0..c.len()).map(|i| c.node(i).api_addr).collect();
    let load_start = now_ms();
    let load = Load::start(addrs, d.rate, d.batch, d.name.clone());
    tokio::time::sleep(d.warmup).await;
    let mut inj = Injector {
        c,
        api,
        rng: seed,
        mounts,
        records: Vec::new(),
        probes: Probes::default(),
        hit_pid: None,
    };
    for f in &d.faults {
        inj.run(f).await?;
    }
    let (records, probes) = (inj.records, inj.probes);
    tokio::time::sleep(d.tail).await;
    let subs = load.finish().await;
    let load_end = now_ms();
    eprintln!(
        "[chaos] load stopped: {} submitted, {} acknowledged",
        subs.submitted,
        subs.acked.len()
    );
    let api = c.api();
    let leader = c.leader().await;
    let quiesced = quiesce(&api, leader, d.quiesce).await;
    let tasks = all_tasks(&api, leader).await;
    let mut v = Verdict {
        name: d.name.clone(),
        description: d.description.clone(),
        seed,
        quiesced,
        probes,
        ..Verdict::default()
    };
    v.tally_tasks(&subs, &tasks);
    v.tally_executions(&tasks, &work.execs());
    v.replica_mismatches = compare_replicas(c, &api, leader, &tasks).await;
    let logs: Vec<_> = (0..c.len()).map(|i| c.node(i).log_path()).collect();
    let ev = Events::read(&logs);
    v.tally_events(&ev, (load_start, load_end), records, &subs);
    Ok(v)
}

/// One `sim` (2 to 8 ms) and one `command` gateway (30 ms of work per
/// attempt) in each region: `sim-<region>`, `cmd-<region>`.
fn regional_gateways(work: &Work, regions: &[&str]) -> Vec<Value> {
    let latency = serde_json::json!({ "dist": "uniform", "min": "2ms", "max": "8ms" });
    regions
        .iter()
        .flat_map(|r| {
            [
                sim_gateway_in(&format!("sim-{r}"), r, latency.clone()),
                work.command_gateway_in(&format!("cmd-{r}"), r, "0.03"),
            ]
        })
        .collect()
}

/// Every gateway starts on a node of its own region (placement prefers
/// the gateway's region; each region has live nodes); prints where.
fn check_placement(c: &Cluster, specs: &[Value], placed: &BTreeMap<String, u64>) -> Result<()> {
    let mut line = Vec::new();
    for g in specs {
        let id = g["id"].as_str().unwrap_or_default();
        let node = c.node(c.index_of(placed[id]));
        line.push(format!("{id} on node {} ({})", node.id, node.region()));
        if g["region"] != node.region() {
            anyhow::bail!(
                "gateway {id} of region {} placed on node {} in {}",
                g["region"],
                node.id,
                node.region()
            );
        }
    }
    eprintln!("[chaos] placement: {}", line.join(", "));
    Ok(())
}

/// Waits (bounded) until no task is in an open status; whether it got there.
async fn quiesce(api: &Api, leader: usize, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    loop {
        let d = api.depth(leader).await;
        let open: u64 = OPEN
            .iter()
            .map(|s| d["by_status"][s].as_u64().unwrap_or(0))
            .sum();
        if open == 0 {
            return true;
        }
        if Instant::now() >= until {
            eprintln!("[chaos] not quiescent after {limit:?}: {}", d["by_status"]);
            return false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What a replica must agree on for each task.
fn digest(tasks: &BTreeMap<u64, Value>) -> BTreeMap<u64, String> {
    tasks
        .iter()
        .map(|(id, t)| {
            let d = format!("{} {} {}", t["status"], t["lease_count"], t["result"]);
            (*id, d)
        })
        .collect()
}

/// Each running node, caught up, must serve the leader's task list.
async fn compare_replicas(
    c: &Cluster,
    api: &Api,
    leader: usize,
    tasks: &BTreeMap<u64, Value>,
) -> Vec<String> {
    let want = digest(tasks);
    let mut out = Vec::new();
    for i in c.live().into_iter().filter(|i| *i != leader) {
        c.wait_caught_up(i, Duration::from_secs(60)).await;
        let got = digest(&all_tasks(api, i).await);
        let differ: Vec<u64> = want
            .keys()
            .chain(got.keys())
            .filter(|id| want.get(id) != got.get(id))
            .copied()
            .collect();
        if !differ.is_empty() {
            let first = differ[0];
            out.push(format!(
                "node {}: {} tasks differ, e.g. {first}: leader {:?}, node {:?}",
                c.node(i).id,
                differ.len(),
                want.get(&first),
                got.get(&first)
            ));
        }
    }
    out
}
