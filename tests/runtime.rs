//! Runtime acceptance tests against real `godel serve` processes on
//! 127.0.0.1: registered gateways and agents run submitted tasks through
//! their drivers while nodes are killed, drained and restarted. Run with
//! `cargo test --test runtime -- --test-threads=1`.
//!
//! What they prove:
//!
//! - a SIGKILLed gateway owner loses no task: its gateways move to the
//!   survivors, whose agents release the dead node's leases, and every task
//!   completes once, with its own result;
//! - a drained node gives up its gateways under load, reports not ready, and
//!   stops running work;
//! - dispatch keeps strict priority end to end when every agent is busy;
//! - the first and the third hold with pull dispatch too, and with three
//!   queue shards; there, deregistering an agent frees its lease and
//!   session in the task's shard at once;
//! - a gateway owner restarted before it counts as dead re-leases the tasks
//!   its previous process was running at once, with new fencing tokens,
//!   instead of letting their leases lapse.
//!
//! The fleet (gateways, agents, the `command` gateways' program and its
//! side-effect log) and the end-state check shared by the tests are in
//! `runtime/fleet.rs`.

// Each target that includes the harness uses a different subset of it.
#[allow(dead_code)]
mod support;

#[path = "runtime/fleet.rs"]
mod fleet;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use fleet::{
    Exec, Work, all_tasks, by_status, check_end_state, gateway_of, lease_of, mixed_gateways, ms,
    now_ms, owners, pids, register_agents, register_fleet, sim_gateway, submit_marked,
    wait_agents_started, wait_completed, wait_owners, wait_placed, wait_ready_is,
};
use serde_json::{Value, json};
use support::{Api, Cluster, bounded, deadline, wait_until};

/// Node heartbeats fast enough that a dead node's gateways move within
/// seconds, with room for a busy 2-core machine to commit a heartbeat late
/// without a live node being taken for dead.
const FAST_QUEUE: &str = "[queue]\nnode_heartbeat_interval = \"250ms\"\n\
                          node_dead_after = \"1500ms\"\ndefault_lease = \"30s\"\n";

/// Heartbeats as above, but a node counts as dead only after 20 s, so a
/// node restarted at once keeps its gateways.
const SLOW_DEATH: &str = "[queue]\nnode_heartbeat_interval = \"250ms\"\n\
                          node_dead_after = \"20s\"\ndefault_lease = \"30s\"\n";

/// Pull dispatch (`docs/shards.md`): each node leases for its own agents.
const PULL: &str = "[runtime]\ndispatch = \"pull\"\n";

/// Three queue shards (`docs/shards.md`): tasks go to the shard groups and
/// dispatch is pull (the default with several shards).
const SHARDS: &str = "[cluster]\nshards = 3\n";

/// How long after a drain is done the drained node may still start an
/// attempt: its runtime sees the move within one reconcile period (250 ms)
/// and waits up to 2 s for each agent actor to stop.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Kills the node owning the most gateways mid-run. Also guards two past
/// bugs: an agent re-running a lease it had just completed (its replica had
/// not applied the completion yet), and a moved gateway's old owner running
/// leases granted to the new owner's agents.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_gateway_owner_mid_run_every_task_completes_once() {
    let work = Work::new();
    let mut c = Cluster::start_with(3, &format!("{FAST_QUEUE}{}", work.policy_toml())).await;
    bounded(Duration::from_secs(200), kill_owner_body(&mut c, &work)).await;
}

/// The same with pull dispatch (`runtime.dispatch = "pull"`): each node
/// leases for the agents it runs, and a batch it writes that adds or frees
/// work ends with a pull for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_gateway_owner_mid_run_with_pull_dispatch() {
    let work = Work::new();
    let config = format!("{FAST_QUEUE}{PULL}{}", work.policy_toml());
    let mut c = Cluster::start_with(3, &config).await;
    bounded(Duration::from_secs(200), kill_owner_body(&mut c, &work)).await;
}

/// Three queue shards (`cluster.shards = 3`, `docs/shards.md` step 3):
/// tasks are routed to the shard groups, each node pulls for its agents
/// over the three, and the killed owner's leases in every shard are given
/// back by the agents that take its gateways over.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_gateway_owner_mid_run_with_three_shards() {
    let work = Work::new();
    let config = format!("{FAST_QUEUE}{SHARDS}{}", work.policy_toml());
    let mut c = Cluster::start_with(3, &config).await;
    bounded(Duration::from_secs(200), kill_owner_body(&mut c, &work)).await;
}

/// With three shards, deregistering an agent gives back its lease in the
/// task's shard at once (no attempt spent) and ends its session there
/// (`ReleaseAgent`), so the session's task goes to another agent well
/// before the 30 s lease would have lapsed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deregistering_an_agent_frees_its_shard_leases_with_three_shards() {
    let c = Cluster::start_with(3, &format!("{FAST_QUEUE}{SHARDS}")).await;
    bounded(Duration::from_secs(120), async {
        let api = c.api();
        let leader = c.leader().await;
        let until = deadline(Duration::from_secs(20));
        let slow = json!({ "dist": "fixed", "value": "60s" });
        let r = api
            .post_retrying(
                leader,
                "/api/v1/gateways",
                &sim_gateway("slow", slow),
                until,
            )
            .await;
        assert_eq!(r.status, 201, "{r:?}");
        wait_placed(&api, leader, &["slow".to_owned()]).await;
        let agent = |id: &str| json!({ "id": id, "gateway": "slow", "capacity": 1 });
        let r = api
            .post_retrying(leader, "/api/v1/agents", &agent("first"), until)
            .await;
        assert_eq!(r.status, 201, "{r:?}");
        let body = json!({ "tenant": "acme", "session_key": "dereg", "payload": {} });
        let r = api
            .post_retrying(leader, "/api/v1/tasks", &body, until)
            .await;
        assert_eq!(r.status, 201, "{r:?}");
        let id = r.body["id"].as_u64().expect("id");
        let path = format!("/api/v1/tasks/{id}");
        let held_by = async |agent: &'static str| {
            wait_until(
                &format!("task {id} leased to {agent}"),
                deadline(Duration::from_secs(20)),
                async || {
                    let t = api.get_ok(leader, &path).await;
                    match t["lease"]["agent_id"].as_str() {
                        Some(a) if a == agent && t["status"] == "leased" => Ok(t),
                        _ => bail!("{t}"),
                    }
                },
            )
            .await
        };
        let first = held_by("first").await;
        let r = api.delete(leader, "/api/v1/agents/first").await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        // At once, not at the lease's expiry: pending, no attempt spent.
        let t = api.get_ok(leader, &path).await;
        assert_eq!(t["status"], "pending", "{t}");
        assert_eq!(t["attempt_count"], first["attempt_count"], "{t}");
        let r = api
            .post(leader, "/api/v1/agents", &agent("second"))
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{r:?}");
        let t0 = Instant::now();
        held_by("second").await;
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "leased again after {:?}, not at the first lease's expiry",
            t0.elapsed()
        );
    })
    .await;
}

/// The node owning the most gateways (the highest id on a tie), and those
/// gateways.
fn most_loaded(placed: &BTreeMap<String, u64>) -> (u64, Vec<String>) {
    let mut per_node: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (g, n) in placed {
        per_node.entry(*n).or_default().push(g.clone());
    }
    per_node
        .into_iter()
        .max_by_key(|(n, gs)| (gs.len(), *n))
        .expect("placed gateways")
}

async fn kill_owner_body(c: &mut Cluster, work: &Work) {
    const N: usize = 2000;
    let t0 = Instant::now();
    let api = c.api();
    let leader = c.leader().await;
    let ids = register_fleet(&api, leader, &mixed_gateways(work), 2, 3).await;
    let placed = wait_placed(&api, leader, &ids).await;
    let (victim_id, lost) = most_loaded(&placed);
    let victim = c.index_of(victim_id);
    let victim_pid = c.node(victim).pid().expect("victim runs");
    let survivors: Vec<usize> = (0..c.len()).filter(|i| *i != victim).collect();
    let survivor_ids: BTreeSet<u64> = survivors.iter().map(|i| c.node(*i).id).collect();
    let watch = survivors[0];
    eprintln!(
        "[test] placement {placed:?}, pids {:?}, leader {}; node {victim_id} will be killed",
        pids(c),
        c.node(leader).id
    );

    let submitting = tokio::spawn(submit_marked(api.clone(), survivors, "rt1", N, "medium"));
    let before = wait_completed(&api, watch, N * 3 / 10, Duration::from_secs(90)).await;
    let kill_ms = now_ms();
    let t_kill = Instant::now();
    c.kill9(victim);
    eprintln!(
        "[test] killed node {victim_id} at {:?} with {before}",
        t0.elapsed()
    );
    let on_survivor = |o: Option<u64>| o.is_some_and(|n| survivor_ids.contains(&n));
    wait_owners(
        &api,
        watch,
        "the killed node's gateways to move",
        &lost,
        on_survivor,
    )
    .await;
    let moved_after = t_kill.elapsed();
    let markers = submitting.await.expect("submitter");
    wait_completed(&api, watch, N, Duration::from_secs(90)).await;
    let done_after = t_kill.elapsed();

    let tasks = all_tasks(&api, watch).await;
    let tally = check_end_state(&markers, &tasks, &work.execs(), Some(victim_pid));
    for (g, owner) in owners(&api, watch).await.expect("owners") {
        assert!(on_survivor(owner), "gateway {g} is on {owner:?}");
    }
    // The session-keyed tasks ran in sessions, and the survivors' session
    // actors opened gateway-side sessions for them.
    let sessions = api.get_ok(watch, "/api/v1/sessions?limit=1000").await;
    let sessions = sessions["items"].as_array().map_or(0, Vec::len);
    assert!(
        sessions > 0,
        "no session was opened for session-keyed tasks"
    );
    let mut opened = 0.0;
    for i in c.live() {
        opened += api
            .metric(i, "godel_gateway_sessions_total{event=\"opened\"}")
            .await;
    }
    assert!(opened > 0.0, "no survivor opened a gateway-side session");
    let first = first_completion_after(&tasks, &lost, kill_ms)
        .map_or_else(|| "none".to_owned(), |at| format!("{} ms", at - kill_ms));
    eprintln!(
        "[test] SUMMARY kill-owner: {} tasks completed ({} on command gateways), {} executions \
         ({} started by the killed node without their payload), {} ran twice, {} leased more \
         than once; gateways moved {moved_after:?} after the kill, first completion on a moved \
         gateway {first} after it, all done {done_after:?} after it ({:?} in all)",
        tally.completed,
        tally.on_command,
        tally.executions,
        tally.payload_lost,
        tally.executed_twice,
        tally.leased_again,
        t0.elapsed()
    );
}

/// When the first task completed by an agent of `gateways` after `after_ms`
/// completed (ms, leader time: a completed task was last updated by its
/// completion). A figure, not a check: the survivors may have done all the
/// work before the gateways moved.
fn first_completion_after(
    tasks: &BTreeMap<u64, Value>,
    gateways: &[String],
    after_ms: u64,
) -> Option<u64> {
    tasks
        .values()
        .filter(|t| {
            let agent = t["agent_id"].as_str().unwrap_or(".");
            gateways.iter().any(|g| g == gateway_of(agent))
        })
        .map(|t| ms(&t["updated_at"]))
        .filter(|at| *at > after_ms)
        .min()
}

/// Drains the follower owning the most gateways under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn draining_a_node_under_load_moves_its_gateways() {
    let work = Work::new();
    let c = Cluster::start_with(3, &format!("{FAST_QUEUE}{}", work.policy_toml())).await;
    bounded(Duration::from_secs(180), drain_body(&c, &work)).await;
}

/// The follower owning the most gateways, and those gateways.
fn busiest_follower(
    c: &Cluster,
    leader: usize,
    placed: &BTreeMap<String, u64>,
) -> (u64, Vec<String>) {
    let leader_id = c.node(leader).id;
    let followers: BTreeMap<String, u64> = placed
        .iter()
        .filter(|(_, n)| **n != leader_id)
        .map(|(g, n)| (g.clone(), *n))
        .collect();
    assert!(
        !followers.is_empty(),
        "no follower owns a gateway: {placed:?}"
    );
    most_loaded(&followers)
}

async fn drain_body(c: &Cluster, work: &Work) {
    const N: usize = 1000;
    let t0 = Instant::now();
    let api = c.api();
    let leader = c.leader().await;
    let ids = register_fleet(&api, leader, &mixed_gateways(work), 2, 3).await;
    let placed = wait_placed(&api, leader, &ids).await;
    let (target_id, theirs) = busiest_follower(c, leader, &placed);
    let target = c.index_of(target_id);
    let target_pid = c.node(target).pid().expect("target runs");
    let others: Vec<usize> = (0..c.len()).filter(|i| *i != target).collect();
    let pids = pids(c);
    eprintln!("[test] placement {placed:?}, pids {pids:?}; draining node {target_id}");

    let submitting = tokio::spawn(submit_marked(api.clone(), others, "rt2", N, "high"));
    wait_completed(&api, leader, N / 5, Duration::from_secs(60)).await;
    let t_drain = Instant::now();
    let moved_after = drain(&api, leader, target, target_id, &theirs).await;
    let t_done = Instant::now();
    check_no_lease_on(&api, leader, target_id).await;

    let markers = submitting.await.expect("submitter");
    let settled = wait_all_sampling(&api, leader, N, work, t_done + STOP_GRACE).await;
    let all_done = t_drain.elapsed();
    let execs = work.execs();
    let tally = check_end_state(&markers, &all_tasks(&api, leader).await, &execs, None);
    let late: Vec<&Exec> = execs[settled..]
        .iter()
        .filter(|e| e.pid == target_pid)
        .collect();
    assert!(
        late.is_empty(),
        "the drained node still ran attempts {STOP_GRACE:?} after its drain was done: {late:?}"
    );
    let on_target = execs.iter().filter(|e| e.pid == target_pid).count();
    let p = api
        .get_ok(leader, &format!("/api/v1/admin/nodes/{target_id}/drain"))
        .await;
    let progress = (&p["draining"], &p["gateways_owned"], &p["done"]);
    assert_eq!(progress, (&json!(true), &json!(0), &json!(true)), "{p}");
    wait_ready_is(&api, target, 503).await;
    eprintln!(
        "[test] SUMMARY drain: {} tasks completed ({} on command gateways), {} executions \
         ({on_target} on the drained node, {} after the grace), {} ran twice, {} leased more \
         than once; gateways moved {moved_after:?} after the drain, all done {all_done:?} after \
         it ({:?} in all)",
        tally.completed,
        tally.on_command,
        tally.executions,
        execs.len() - settled,
        tally.executed_twice,
        tally.leased_again,
        t0.elapsed()
    );
}

/// Drains node `target` (id `target_id`) through node `via` and waits until
/// it is not ready, `theirs` moved to other nodes and the drain reports
/// done; returns how long the gateways took to move.
async fn drain(
    api: &Api,
    via: usize,
    target: usize,
    target_id: u64,
    theirs: &[String],
) -> Duration {
    let path = format!("/api/v1/admin/nodes/{target_id}/drain");
    let until = deadline(Duration::from_secs(20));
    let r = api.post_retrying(via, &path, &json!({}), until).await;
    assert_eq!(r.status, 200, "drain: {r:?}");
    assert_eq!(r.body["draining"], true, "{r:?}");
    let t_drain = Instant::now();
    wait_ready_is(api, target, 503).await;
    let elsewhere = |o: Option<u64>| o.is_some_and(|n| n != target_id);
    wait_owners(
        api,
        via,
        "the drained node's gateways to move",
        theirs,
        elsewhere,
    )
    .await;
    let moved_after = t_drain.elapsed();
    let p = wait_until(
        "the drain to be done",
        deadline(Duration::from_secs(20)),
        async || {
            let p = api.get_ok(via, &path).await;
            if p["done"] == true {
                Ok(p)
            } else {
                bail!("{p}")
            }
        },
    )
    .await;
    assert_eq!(p["gateways_owned"], 0, "{p}");
    moved_after
}

/// Waits until `n` tasks are completed and `settle_at` has passed; returns
/// how many executions had been recorded when it passed.
async fn wait_all_sampling(
    api: &Api,
    via: usize,
    n: usize,
    work: &Work,
    settle_at: Instant,
) -> usize {
    let mut settled: Option<usize> = None;
    wait_until(
        &format!("{n} tasks completed"),
        deadline(Duration::from_secs(90)),
        async || {
            let lines = work.execs().len();
            if settled.is_none() && Instant::now() >= settle_at {
                settled = Some(lines);
            }
            let s = by_status(api, via).await;
            let done = s["completed"].as_u64().unwrap_or(0);
            match settled {
                Some(lines) if done >= n as u64 => Ok(lines),
                _ => bail!("{done} completed: {s}"),
            }
        },
    )
    .await
}

/// No live lease is held by an agent of a gateway that node `node_id` owns.
async fn check_no_lease_on(api: &Api, via: usize, node_id: u64) {
    let o = owners(api, via).await.expect("owners");
    for status in ["leased", "running"] {
        for t in api.list_tasks(via, &format!("status={status}")).await {
            let agent = t["lease"]["agent_id"]
                .as_str()
                .unwrap_or_else(|| panic!("{t}"));
            let owner = o.get(gateway_of(agent)).copied().flatten();
            assert_ne!(owner, Some(node_id), "the drained node still holds {t}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strict_priority_end_to_end_with_saturated_agents() {
    let work = Work::new();
    let c = Cluster::start_with(1, &format!("{FAST_QUEUE}{}", work.policy_toml())).await;
    bounded(Duration::from_secs(120), priority_body(&c, &work, false)).await;
}

/// Strict priority with pull dispatch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strict_priority_end_to_end_with_pull_dispatch() {
    let work = Work::new();
    let config = format!("{FAST_QUEUE}{PULL}{}", work.policy_toml());
    let c = Cluster::start_with(1, &config).await;
    bounded(Duration::from_secs(120), priority_body(&c, &work, false)).await;
}

/// Strict priority with three queue shards: the pull goes to the shard
/// holding the most urgent task an agent could run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strict_priority_end_to_end_with_three_shards() {
    let work = Work::new();
    let config = format!("{FAST_QUEUE}{SHARDS}{}", work.policy_toml());
    let c = Cluster::start_with(1, &config).await;
    bounded(Duration::from_secs(120), priority_body(&c, &work, true)).await;
}

/// Records every lease seen (token -> leased_at in ms, leader time) by
/// listing all tasks until `stop`.
async fn poll_leases(api: Api, stop: Arc<AtomicBool>) -> BTreeMap<u64, u64> {
    let mut seen = BTreeMap::new();
    while !stop.load(Ordering::Relaxed) {
        for t in api.list_tasks(0, "").await {
            if let Some(token) = t["lease"]["fencing_token"].as_u64() {
                seen.insert(token, ms(&t["lease"]["leased_at"]));
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    seen
}

async fn priority_body(c: &Cluster, work: &Work, sharded: bool) {
    const LOW: usize = 40;
    const CRITICAL: usize = 4;
    let api = c.api();
    // One agent of capacity 2: at most two attempts at once, 150 ms each.
    let spec = work.command_gateway("cmd-prio", "0.15");
    let ids = register_fleet(&api, 0, &[spec], 1, 2).await;
    wait_placed(&api, 0, &ids).await;
    let stop = Arc::new(AtomicBool::new(false));
    let poller = tokio::spawn(poll_leases(api.clone(), stop.clone()));

    let mut markers = submit_marked(api.clone(), vec![0], "low", LOW, "low").await;
    wait_until(
        "low tasks to start",
        deadline(Duration::from_secs(20)),
        async || {
            let n = work.execs().len();
            if n >= 2 { Ok(()) } else { bail!("{n} started") }
        },
    )
    .await;
    markers.extend(submit_marked(api.clone(), vec![0], "crit", CRITICAL, "critical").await);
    let d = api.depth(0).await;
    let low_waiting = d["by_priority"]["low"].as_u64().expect("pending low");
    // Otherwise a dispatcher blind to priority could not show itself here.
    assert!(
        low_waiting >= 10,
        "too few low tasks still pending once the critical ones were acknowledged: {d}"
    );
    wait_completed(&api, 0, LOW + CRITICAL, Duration::from_secs(60)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = poller.await.expect("poller");

    let tasks = all_tasks(&api, 0).await;
    let execs = work.execs();
    let tally = check_end_state(&markers, &tasks, &execs, None);
    let critical = |e: &Exec| markers[&e.task].starts_with("crit");
    let order: String = execs
        .iter()
        .map(|e| if critical(e) { 'C' } else { 'L' })
        .collect();
    let (checked, ties) = check_strict_priority(&tasks, &execs, &seen, sharded);
    eprintln!(
        "[test] SUMMARY priority: {} tasks completed, {} executions, {low_waiting} low tasks \
         pending when the critical ones were acknowledged, {checked} (low, critical) pairs \
         checked, {ties} same-millisecond ties, {} of {} leases seen by the poller; start \
         order {order}",
        tally.completed,
        tally.executions,
        seen.len(),
        execs.len()
    );
}

/// Strict priority from the committed record. Fencing tokens and lease and
/// submit times are both assigned as entries apply, by the state's clock,
/// which never goes back: so a lease with token `t` leased at `lt` was
/// dispatched after a task created at `ct < lt`, and before any lease with a
/// token above `t`. A low lease that comes after a critical task's submit
/// and before that task's own lease is a violation. The time of a low lease
/// the poller missed is bounded below by that of a smaller token it saw.
///
/// With several shards (`sharded`) tokens count per shard (the low byte
/// names it): the token order holds within a shard, and a low lease and a
/// critical task in different shards are compared by their lease times
/// when the poller saw both (`created < low leased < critical leased` is a
/// violation).
///
/// It cannot pass by accident: enough low tasks were still pending when the
/// critical ones were acknowledged (checked by the caller) that a dispatcher
/// ignoring priority would have leased several of them, one by one as a
/// slot freed, 150 ms apart, before the critical ones: each such lease has a
/// smaller token than a critical lease and a later time than its submit.
/// Returns (pairs checked, same-millisecond ties that could not be ordered).
fn check_strict_priority(
    tasks: &BTreeMap<u64, Value>,
    execs: &[Exec],
    seen: &BTreeMap<u64, u64>,
    sharded: bool,
) -> (usize, usize) {
    let group = |token: u64| if sharded { token & 0xff } else { 0 };
    let mut per_group: BTreeMap<u64, BTreeMap<u64, u64>> = BTreeMap::new();
    for (t, at) in seen {
        per_group.entry(group(*t)).or_default().insert(*t, *at);
    }
    for (g, leases) in &per_group {
        let times: Vec<u64> = leases.values().copied().collect();
        assert!(
            times.windows(2).all(|w| w[0] <= w[1]),
            "lease times of group {g} go back as tokens grow: {leases:?}"
        );
    }
    let lower_bound = |token: u64| {
        per_group
            .get(&group(token))
            .and_then(|l| l.range(..=token).next_back())
            .map_or(0, |(_, at)| *at)
    };
    let critical: Vec<(u64, u64, u64)> = tasks
        .values()
        .filter(|t| t["priority"] == "critical")
        .map(|t| {
            let id = t["id"].as_u64().expect("id");
            let token = execs.iter().filter(|e| e.task == id).map(|e| e.token).min();
            let token = token.unwrap_or_else(|| panic!("critical {id} never ran"));
            (id, ms(&t["created_at"]), token)
        })
        .collect();
    let (mut checked, mut ties) = (0, 0);
    for e in execs.iter().filter(|e| tasks[&e.task]["priority"] == "low") {
        let leased = lower_bound(e.token);
        for &(id, created, token) in &critical {
            let before_critical = if group(token) == group(e.token) {
                e.token < token
            } else {
                match (seen.get(&e.token), seen.get(&token)) {
                    (Some(low_at), Some(crit_at)) => low_at < crit_at,
                    _ => continue,
                }
            };
            if !before_critical {
                continue;
            }
            checked += 1;
            ties += usize::from(leased == created);
            assert!(
                leased <= created,
                "low task {} was leased (token {}, at {leased}) after critical task {id} was \
                 submitted (at {created}) and before it was leased (token {token})",
                e.task,
                e.token
            );
        }
    }
    (checked, ties)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn panicking_or_restarted_agent_task_is_leased_again() {
    let mut c = Cluster::start_with(3, SLOW_DEATH).await;
    bounded(Duration::from_secs(120), restart_body(&mut c)).await;
}

/// Every task's live lease (token, expiry in ms), once all `n` are leased.
async fn all_leased(api: &Api, via: usize, n: usize) -> Result<BTreeMap<u64, (u64, u64)>> {
    let tasks = all_tasks(api, via).await;
    let leased: BTreeMap<u64, (u64, u64)> = tasks
        .iter()
        .filter_map(|(id, t)| Some((*id, lease_of(t)?)))
        .collect();
    if leased.len() == n {
        Ok(leased)
    } else {
        bail!("{} of {n} leased", leased.len())
    }
}

async fn restart_body(c: &mut Cluster) {
    const N: usize = 6;
    let api = c.api();
    let leader = c.leader().await;
    let leader_id = c.node(leader).id;
    let five_s = json!({ "dist": "fixed", "value": "5s" });
    let specs: Vec<Value> = (0..6)
        .map(|k| sim_gateway(&format!("long-{k}"), five_s.clone()))
        .collect();
    let ids = register_fleet(&api, leader, &specs, 0, 1).await;
    let placed = wait_placed(&api, leader, &ids).await;
    let (gw, victim_id) = placed
        .iter()
        .find(|(_, n)| **n != leader_id)
        .map(|(g, n)| (g.clone(), *n))
        .unwrap_or_else(|| panic!("every gateway is on the leader: {placed:?}"));
    let victim = c.index_of(victim_id);
    register_agents(&api, leader, &gw, 2, 3).await;
    // Dispatch leases only to agents whose actors announced themselves;
    // wait for them so the leases read below go to the process killed next.
    wait_agents_started(c, victim, &[format!("{gw}.a0"), format!("{gw}.a1")]).await;
    let markers = submit_marked(api.clone(), vec![leader], "rt4", N, "high").await;
    let until = deadline(Duration::from_secs(20));
    let before = wait_until("every task leased", until, async || {
        all_leased(&api, leader, N).await
    })
    .await;
    // The leases are committed; give the agents a moment to start their
    // attempts, so that the process killed below was running them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let still = all_leased(&api, leader, N).await.expect("still leased");
    assert_eq!(still, before, "the leases changed before the kill");
    let t_kill = Instant::now();
    c.kill9(victim);
    c.restart(victim);
    let t_restart = Instant::now();

    let relet = wait_leased_again(&api, leader, &before).await;
    let log = c.node(victim).log_tail(5000);
    let since_restart = log
        .rsplit("===== harness: starting node")
        .next()
        .unwrap_or_default();
    let released_some = since_restart.lines().any(|l| {
        l.contains("agent online") && l.contains("released=") && !l.contains("released=0")
    });
    assert!(
        released_some,
        "the restarted node's agents came online without giving back a lease:\n{since_restart}"
    );
    let owner = owners(&api, leader).await.expect("owners")[&gw];
    assert_eq!(
        owner,
        Some(victim_id),
        "the gateway stayed on the restarted node"
    );

    wait_completed(&api, leader, N, Duration::from_secs(40)).await;
    let tasks = all_tasks(&api, leader).await;
    let tally = check_end_state(&markers, &tasks, &[], None);
    for (id, t) in &tasks {
        let count = t["lease_count"].as_u64();
        assert!(count >= Some(2), "task {id} was not leased again: {t}");
        assert_eq!(
            gateway_of(t["agent_id"].as_str().expect("agent")),
            gw,
            "{t}"
        );
    }
    eprintln!(
        "[test] SUMMARY restart: {} tasks completed, {} leased more than once; every running \
         task leased again {relet:?} after the restart ({:?} after the kill), done {:?} after it",
        tally.completed,
        tally.leased_again,
        t_restart - t_kill + relet,
        t_restart.elapsed()
    );
}

/// Waits until every task of `before` (task -> its lease's token and
/// expiry) holds a lease with a newer token, each seen before the old lease
/// would have lapsed; returns how long it took from the call.
async fn wait_leased_again(api: &Api, via: usize, before: &BTreeMap<u64, (u64, u64)>) -> Duration {
    let start = Instant::now();
    let mut again: BTreeMap<u64, u64> = BTreeMap::new();
    wait_until(
        "every task leased again",
        deadline(Duration::from_secs(20)),
        async || {
            for (id, (old, expires)) in before {
                if again.contains_key(id) {
                    continue;
                }
                let t = api.get_ok(via, &format!("/api/v1/tasks/{id}")).await;
                match lease_of(&t) {
                    Some((token, _)) if token > *old => {
                        assert!(
                            now_ms() < *expires,
                            "task {id} re-leased only after its old lease lapsed: {t}"
                        );
                        again.insert(*id, token);
                    }
                    _ => {}
                }
            }
            if again.len() == before.len() {
                Ok(())
            } else {
                bail!(
                    "{} of {} leased again: {again:?}",
                    again.len(),
                    before.len()
                )
            }
        },
    )
    .await;
    start.elapsed()
}

/// Drain with running work: a draining node keeps a gateway whose agents
/// still run tasks (and gets no new leases), so those tasks finish where
/// they run, once, and the gateway moves when they are done; a task still
/// running at `runtime.drain_deadline` is handed back instead: the gateway
/// moves at the deadline and the task is leased again, with a new token, on
/// the new owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_lets_running_tasks_finish_and_hands_back_at_the_deadline() {
    let toml = format!("{FAST_QUEUE}[runtime]\ndrain_deadline = \"4s\"\n");
    let c = Cluster::start_with(3, &toml).await;
    bounded(Duration::from_secs(150), drain_handover_body(&c)).await;
}

async fn drain_handover_body(c: &Cluster) {
    let api = c.api();
    let leader = c.leader().await;
    let two_s = json!({ "dist": "fixed", "value": "2s" });
    let minute = json!({ "dist": "fixed", "value": "60s" });
    let specs = [sim_gateway("finish", two_s), sim_gateway("stuck", minute)];
    let ids = register_fleet(&api, leader, &specs, 0, 2).await;
    for gw in &ids {
        // The capability routes each task to its gateway's agent.
        let body = json!({ "id": format!("{gw}.a0"), "gateway": gw, "capacity": 2,
            "capabilities": [gw] });
        let r = api
            .post_retrying(
                leader,
                "/api/v1/agents",
                &body,
                deadline(Duration::from_secs(20)),
            )
            .await;
        assert_eq!(r.status, 201, "{r:?}");
    }
    let placed = wait_placed(&api, leader, &ids).await;
    for (gw, owner) in &placed {
        wait_agents_started(c, c.index_of(*owner), &[format!("{gw}.a0")]).await;
    }

    // 1. Tasks that finish before the deadline finish on the draining node.
    let owner = placed["finish"];
    let tasks = submit_to(&api, leader, "finish", 2).await;
    wait_leased(&api, leader, &tasks).await;
    let t_drain = Instant::now();
    set_drain(&api, leader, owner, true).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let o = owners(&api, leader).await.expect("owners");
    assert_eq!(
        o["finish"],
        Some(owner),
        "the gateway stays while its tasks run"
    );
    let p = api
        .get_ok(leader, &format!("/api/v1/admin/nodes/{owner}/drain"))
        .await;
    assert!(p["leases_held"].as_u64().unwrap_or(0) > 0, "{p}");
    let finish = vec!["finish".to_string()];
    wait_owners(
        &api,
        leader,
        "finish to move after its tasks",
        &finish,
        |o| o.is_some_and(|n| n != owner),
    )
    .await;
    let moved = t_drain.elapsed();
    for id in &tasks {
        let t = api.get_ok(leader, &format!("/api/v1/tasks/{id}")).await;
        assert_eq!(t["status"], "completed", "{t}");
        assert_eq!(
            t["lease_count"], 1,
            "finished where it ran, leased once: {t}"
        );
    }
    assert!(
        moved < Duration::from_secs(4),
        "moved when done, before the deadline: {moved:?}"
    );
    set_drain(&api, leader, owner, false).await;

    // 2. A task still running at the deadline is handed back.
    let owner = owners(&api, leader).await.expect("owners")["stuck"].expect("placed");
    let tasks = submit_to(&api, leader, "stuck", 1).await;
    let first = wait_leased(&api, leader, &tasks).await[0];
    let t_drain = Instant::now();
    set_drain(&api, leader, owner, true).await;
    let stuck = vec!["stuck".to_string()];
    wait_owners(&api, leader, "stuck to move at the deadline", &stuck, |o| {
        o.is_some_and(|n| n != owner)
    })
    .await;
    let moved = t_drain.elapsed();
    assert!(
        moved >= Duration::from_secs(3),
        "held until about the 4 s deadline: {moved:?}"
    );
    let path = format!("/api/v1/tasks/{}", tasks[0]);
    let again = wait_until(
        "the task leased again",
        deadline(Duration::from_secs(10)),
        async || {
            let t = api.get_ok(leader, &path).await;
            match lease_of(&t) {
                Some((token, _)) if token > first => Ok(token),
                _ => bail!("not leased again yet: {t}"),
            }
        },
    )
    .await;
    eprintln!(
        "[test] SUMMARY drain handover: finished tasks let the gateway go; the stuck one moved \
         {moved:?} after the drain and was leased again (token {first} -> {again})"
    );
    let r = api
        .post(leader, &format!("{path}/cancel"), &json!({}))
        .await
        .expect("cancel");
    assert_eq!(r.status, 200, "{r:?}");
}

/// Submits `n` tasks that only `gateway`'s agents can run (the capability
/// is the gateway's name); returns their ids.
async fn submit_to(api: &Api, via: usize, gateway: &str, n: usize) -> Vec<u64> {
    let mut ids = Vec::new();
    for k in 0..n {
        let body = json!({ "tenant": "drain", "priority": "high", "payload": { "k": k },
            "capabilities": [gateway] });
        let r = api.post(via, "/api/v1/tasks", &body).await.expect("submit");
        assert_eq!(r.status, 201, "{r:?}");
        ids.push(r.body["id"].as_u64().expect("id"));
    }
    ids
}

/// Waits until every task in `ids` holds a lease; returns their tokens.
async fn wait_leased(api: &Api, via: usize, ids: &[u64]) -> Vec<u64> {
    wait_until(
        "the tasks to be leased",
        deadline(Duration::from_secs(15)),
        async || {
            let mut tokens = Vec::new();
            for id in ids {
                let t = api.get_ok(via, &format!("/api/v1/tasks/{id}")).await;
                match lease_of(&t) {
                    Some((token, _)) => tokens.push(token),
                    None => bail!("task {id} not leased: {t}"),
                }
            }
            Ok(tokens)
        },
    )
    .await
}

async fn set_drain(api: &Api, via: usize, node: u64, on: bool) {
    let verb = if on { "drain" } else { "undrain" };
    let path = format!("/api/v1/admin/nodes/{node}/{verb}");
    let r = api
        .post_retrying(via, &path, &json!({}), deadline(Duration::from_secs(20)))
        .await;
    assert_eq!(r.status, 200, "{verb}: {r:?}");
}

/// A node killed with SIGKILL takes the programs its `command` gateways
/// started with it, instead of leaving them to run on (and write their side
/// effects) while their leases are run elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn programs_of_a_killed_node_die_with_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pids = dir.path().join("pids");
    let config = format!("{FAST_QUEUE}[gateways.command]\nallow = [\"/bin/sh\"]\n");
    let mut c = Cluster::start_with(1, &config).await;
    bounded(Duration::from_secs(60), async {
        let api = c.api();
        let spec = json!({
            "id": "cmd-long", "region": "local", "max_sessions": 8,
            "driver": {
                "kind": "command", "program": "/bin/sh",
                "args": ["-c", "echo $$ >> \"$PIDS\"; exec sleep 120"],
                "env": { "PIDS": pids.to_string_lossy() },
            },
        });
        let ids = register_fleet(&api, 0, &[spec], 1, 2).await;
        wait_placed(&api, 0, &ids).await;
        for k in 0..2 {
            let task = json!({ "payload": { "k": k }, "timeout_ms": 600_000 });
            let r = api.post(0, "/api/v1/tasks", &task).await.expect("submit");
            assert_eq!(r.status, 201, "{r:?}");
        }
        let started: Vec<i32> = wait_until(
            "both programs to start",
            deadline(Duration::from_secs(20)),
            async || {
                let text = std::fs::read_to_string(&pids).unwrap_or_default();
                let p: Vec<i32> = text.lines().filter_map(|l| l.parse().ok()).collect();
                if p.len() == 2 {
                    Ok(p)
                } else {
                    bail!("{} started", p.len())
                }
            },
        )
        .await;
        c.kill9(0);
        wait_until(
            "the programs to die with their node",
            deadline(Duration::from_secs(5)),
            async || {
                let alive: Vec<i32> = started.iter().copied().filter(|p| running(*p)).collect();
                if alive.is_empty() {
                    Ok(())
                } else {
                    bail!("still running: {alive:?}")
                }
            },
        )
        .await;
    })
    .await;
}

/// Whether process `pid` exists and is not a zombie.
fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}
