//! The runtime tests' fleet: gateways and agents registered through the
//! API, tasks that carry a unique marker in their payload, the `command`
//! gateways' program and its side-effect log, and the end-state check they
//! all share.
//!
//! [`SCRIPT`] appends one line per started execution to the side-effect log
//! (task id, fencing token, the task's marker from the payload, the pid of
//! the node that ran it, and the gateway's id, owner and placement token)
//! before it does its work, so a test can count executions: a task may run
//! more than once only across a lease loss (its `lease_count` is above 1),
//! and no lease may run twice. The gateway fields tell whether a gateway was
//! driven by two owners at once ([`two_owner_gateways`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Result, anyhow, bail};
use serde_json::{Value, json};

use crate::support::work::submit;
use crate::support::{Api, Cluster, deadline, wait_until};

/// The `command` gateways' program. The payload (one line of JSON) comes on
/// stdin; its `marker` is the task's unique marker. The line is appended
/// before the work, so every started execution is recorded; `$PPID` is the
/// `godel serve` process that started it. The gateway's id, the node that
/// drives it and its placement token (`GODEL_GATEWAY_ID`,
/// `GODEL_GATEWAY_OWNER`, `GODEL_GATEWAY_TOKEN`) are recorded as `-` when the
/// node does not set them. Only shell builtins besides `sleep`, to keep each
/// attempt cheap.
const SCRIPT: &str = r#"#!/bin/sh
IFS= read -r payload || true
marker=${payload#*'"marker":"'}
marker=${marker%%'"'*}
echo "$GODEL_TASK_ID $GODEL_FENCING_TOKEN $marker $PPID ${GODEL_GATEWAY_ID:--} ${GODEL_GATEWAY_OWNER:--} ${GODEL_GATEWAY_TOKEN:--}" >> "$SIDE_LOG"
sleep "$WORK_S"
printf '{"marker":"%s","task":%s,"token":%s}\n' "$marker" "$GODEL_TASK_ID" "$GODEL_FENCING_TOKEN"
"#;

/// Tenants the tasks are spread over.
const TENANTS: [&str; 3] = ["acme", "globex", "initech"];
/// Attempts per task: leases lost to a kill do not spend attempts, so this
/// only guards against a flaky script dead-lettering a task.
const MAX_ATTEMPTS: u32 = 10;

/// Wall-clock ms since the epoch (the nodes stamp commands with the same
/// clock: they run on this machine).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// An RFC 3339 time from the API, in ms since the epoch.
pub fn ms(v: &Value) -> u64 {
    let s = v.as_str().unwrap_or_else(|| panic!("not a time: {v}"));
    godel::clock::parse_rfc3339(s).unwrap_or_else(|e| panic!("{e}"))
}

/// The command gateways' program and side-effect log, in a temporary
/// directory that outlives the cluster.
pub struct Work {
    dir: tempfile::TempDir,
    script: PathBuf,
    log: PathBuf,
}

/// One started execution, as the side-effect log recorded it.
#[derive(Clone, Debug)]
pub struct Exec {
    pub task: u64,
    pub token: u64,
    pub marker: String,
    pub pid: u32,
    /// The gateway call's fencing, when the node passed all three variables.
    pub call: Option<GatewayCall>,
}

/// Which gateway an execution called, from which node, under which
/// placement token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayCall {
    pub gateway: String,
    pub owner: u64,
    pub token: u64,
}

impl Work {
    /// Writes the script before any node starts, so no fork of this process
    /// can hold it open for writing when a node executes it.
    pub fn new() -> Work {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("godel-runtime-")
            .tempdir()
            .expect("tempdir");
        let script = dir.path().join("attempt.sh");
        std::fs::write(&script, SCRIPT).expect("write script");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
            .expect("chmod script");
        let log = dir.path().join("side-effects.log");
        Work { dir, script, log }
    }

    /// The node config that lets `command` gateways run the script (and
    /// `/bin/sh`, for tests that run a shell line).
    pub fn policy_toml(&self) -> String {
        format!(
            "[gateways.command]\nallow = [{:?}, \"/bin/sh\"]\n",
            self.script.to_string_lossy()
        )
    }

    /// A `command` gateway running the script, each attempt working `work_s`
    /// seconds.
    pub fn command_gateway(&self, id: &str, work_s: &str) -> Value {
        self.command_gateway_in(id, "local", work_s)
    }

    /// [`Work::command_gateway`] in `region`.
    pub fn command_gateway_in(&self, id: &str, region: &str, work_s: &str) -> Value {
        json!({
            "id": id, "region": region, "max_sessions": 32,
            "driver": {
                "kind": "command",
                "program": self.script.to_string_lossy(),
                "env": { "SIDE_LOG": self.log.to_string_lossy(), "WORK_S": work_s },
            },
        })
    }

    /// Every execution recorded so far, in append order.
    pub fn execs(&self) -> Vec<Exec> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        parse_side_effects(&text)
            .unwrap_or_else(|e| panic!("side-effect log in {:?}: {e:#}", self.dir))
    }
}

/// The side-effect log's lines (as [`SCRIPT`] writes them), in order.
pub fn parse_side_effects(text: &str) -> Result<Vec<Exec>> {
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            if f.len() != 7 {
                bail!("bad side-effect line `{l}`: {} fields, not 7", f.len());
            }
            let num = |i: usize| -> Result<u64> {
                f[i].parse()
                    .map_err(|_| anyhow!("bad side-effect line `{l}`: field {i}"))
            };
            let call = match (f[4], f[5], f[6]) {
                ("-", _, _) | (_, "-", _) | (_, _, "-") => None,
                (gateway, _, _) => Some(GatewayCall {
                    gateway: gateway.to_owned(),
                    owner: num(5)?,
                    token: num(6)?,
                }),
            };
            Ok(Exec {
                task: num(0)?,
                token: num(1)?,
                marker: f[2].to_owned(),
                pid: num(3)? as u32,
                call,
            })
        })
        .collect()
}

/// Gateways driven by two owners, each with the first call that shows it:
/// in the log's append order (the order the calls started), a call whose
/// placement token is lower than one already seen for its gateway (an owner
/// that lost the gateway still drives it), or equal to it from another node
/// (one placement, two owners). Executions without the gateway variables
/// are not counted.
pub fn two_owner_gateways(execs: &[Exec]) -> BTreeMap<String, String> {
    // Gateway -> the highest token seen and the owner that used it.
    let mut newest: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    let mut found = BTreeMap::new();
    for (k, e) in execs.iter().enumerate() {
        let Some(c) = &e.call else { continue };
        let seen = newest.entry(&c.gateway).or_insert((c.token, c.owner));
        let why = if c.token < seen.0 {
            format!("token {} after token {}", c.token, seen.0)
        } else if c.token == seen.0 && c.owner != seen.1 {
            format!("token {} from nodes {} and {}", c.token, seen.1, c.owner)
        } else {
            *seen = (c.token, c.owner);
            continue;
        };
        let at = format!("{why} (call {k}: task {}, node {})", e.task, c.owner);
        found.entry(c.gateway.clone()).or_insert(at);
    }
    found
}

/// Checks [`two_owner_gateways`] on synthetic side-effect logs: a `#[test]`
/// in the runtime tests, and before every chaos drill (that harness runs no
/// `#[test]`s).
pub fn two_owner_self_check() {
    let count = |log: &str| two_owner_gateways(&parse_side_effects(log).unwrap());
    // Placed on node 1 (token 3), moved to node 2 (token 4), moved back to
    // node 1 (token 5); other gateways interleave; lines without the
    // variables are skipped.
    let clean = "1 10 m1 100 g1 1 3\n2 11 m2 100 g2 1 7\n3 12 m3 200 g1 2 4\n\
                 4 13 m4 200 - - -\n5 14 m5 200 g1 2 4\n6 15 m6 100 g1 1 5\n7 16 m7 300 g2 1 7\n";
    assert!(count(clean).is_empty(), "{:?}", count(clean));
    // The old owner calls after the new owner did.
    let stale = format!("{clean}8 17 m8 200 g1 2 4\n9 18 m9 200 g1 2 4\n");
    let found = count(&stale);
    assert_eq!(found.keys().collect::<Vec<_>>(), ["g1"], "{found:?}");
    assert!(
        found["g1"].starts_with("token 4 after token 5"),
        "{found:?}"
    );
    // Two nodes under one token.
    let twin = "1 10 m1 100 g2 1 7\n2 11 m2 200 g2 3 7\n";
    assert_eq!(count(twin).len(), 1, "{:?}", count(twin));
    // The same as the first, without the variables: not counted.
    let bare = "1 10 m1 100 - - -\n2 11 m2 200 - - -\n";
    assert!(count(bare).is_empty());
    assert!(parse_side_effects("1 10 m1 100\n").is_err(), "4 fields");
    assert!(
        parse_side_effects("1 10 m1 100 g1 x 3\n").is_err(),
        "bad owner"
    );
}

#[test]
fn two_owner_count_on_synthetic_logs() {
    two_owner_self_check();
}

/// A `sim` gateway with the given latency distribution.
pub fn sim_gateway(id: &str, latency: Value) -> Value {
    sim_gateway_in(id, "local", latency)
}

/// [`sim_gateway`] in `region`.
pub fn sim_gateway_in(id: &str, region: &str, latency: Value) -> Value {
    json!({
        "id": id, "region": region, "max_sessions": 32,
        "driver": { "kind": "sim", "latency": latency },
    })
}

/// Three `sim` gateways (2 to 8 ms) and three `command` gateways (30 ms of
/// work per attempt).
pub fn mixed_gateways(work: &Work) -> Vec<Value> {
    let mut specs: Vec<Value> = (0..3)
        .map(|k| {
            let latency = json!({ "dist": "uniform", "min": "2ms", "max": "8ms" });
            sim_gateway(&format!("sim-{k}"), latency)
        })
        .collect();
    specs.extend((0..3).map(|k| work.command_gateway(&format!("cmd-{k}"), "0.03")));
    specs
}

/// The gateway an agent id names: agents are registered as `<gateway>.a<k>`.
pub fn gateway_of(agent: &str) -> &str {
    agent
        .rsplit_once('.')
        .map(|(g, _)| g)
        .unwrap_or_else(|| panic!("agent id `{agent}` names no gateway"))
}

/// Registers `specs` and `per_gateway` agents of `capacity` on each, through
/// node `via`; returns the gateway ids.
pub async fn register_fleet(
    api: &Api,
    via: usize,
    specs: &[Value],
    per_gateway: usize,
    capacity: u32,
) -> Vec<String> {
    let mut ids = Vec::new();
    for spec in specs {
        let until = deadline(Duration::from_secs(20));
        let r = api
            .post_retrying(via, "/api/v1/gateways", spec, until)
            .await;
        assert_eq!(r.status, 201, "register gateway {spec}: {r:?}");
        let id = spec["id"].as_str().expect("gateway id").to_owned();
        register_agents(api, via, &id, per_gateway, capacity).await;
        ids.push(id);
    }
    ids
}

/// Node id -> process id of every running node (the side-effect log names
/// the node that ran an execution by its pid).
pub fn pids(c: &Cluster) -> BTreeMap<u64, u32> {
    (0..c.len())
        .filter_map(|i| Some((c.node(i).id, c.node(i).pid()?)))
        .collect()
}

/// Gateway id -> owner node id (`None` while unplaced), read through node `i`.
pub async fn owners(api: &Api, i: usize) -> Result<BTreeMap<String, Option<u64>>> {
    let r = api.get(i, "/api/v1/gateways").await?;
    if r.status != 200 {
        bail!("GET /api/v1/gateways: {r:?}");
    }
    let items = r.body["items"]
        .as_array()
        .ok_or_else(|| anyhow!("no items: {:?}", r.body))?;
    Ok(items
        .iter()
        .map(|g| {
            let id = g["id"].as_str().unwrap_or_default().to_owned();
            (id, g["owner"].as_u64())
        })
        .collect())
}

/// Waits until every gateway in `ids` has an owner; gateway -> owner.
pub async fn wait_placed(api: &Api, i: usize, ids: &[String]) -> BTreeMap<String, u64> {
    wait_until(
        "every gateway placed",
        deadline(Duration::from_secs(20)),
        async || {
            let o = owners(api, i).await?;
            ids.iter()
                .map(|g| match o.get(g).copied().flatten() {
                    Some(n) => Ok((g.clone(), n)),
                    None => Err(anyhow!("gateway {g} not placed yet: {o:?}")),
                })
                .collect()
        },
    )
    .await
}

/// A submit body whose payload carries `marker` (also the idempotency key).
pub fn marked_task(marker: &str, k: usize, priority: &str) -> Value {
    let mut t = json!({
        "tenant": TENANTS[k % TENANTS.len()],
        "priority": priority,
        "payload": { "marker": marker },
        "max_attempts": MAX_ATTEMPTS,
        "idempotency_key": marker,
    });
    // One task in ten belongs to one of 16 conversations, so sessions (and
    // their actors) live through the same kills and drains as the rest.
    if k.is_multiple_of(10) {
        let prefix = marker.rsplit_once('-').map_or(marker, |(p, _)| p);
        t["session_key"] = json!(format!("{prefix}-conv-{}", (k / 10) % 16));
    }
    t
}

/// Submits `n` tasks with markers `<prefix>-<k>` round robin through `via`,
/// 16 in flight; returns each acknowledged task's marker by id.
pub async fn submit_marked(
    api: Api,
    via: Vec<usize>,
    prefix: &'static str,
    n: usize,
    priority: &'static str,
) -> BTreeMap<u64, String> {
    let next = Arc::new(AtomicUsize::new(0));
    let via = Arc::new(via);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (api, next, via) = (api.clone(), next.clone(), via.clone());
        workers.spawn(async move {
            let mut acked = Vec::new();
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= n {
                    return acked;
                }
                let marker = format!("{prefix}-{k}");
                let t = submit(&api, via[k % via.len()], &marked_task(&marker, k, priority)).await;
                acked.push((t["id"].as_u64().expect("id"), marker));
            }
        });
    }
    let mut all = BTreeMap::new();
    while let Some(res) = workers.join_next().await {
        for (id, m) in res.expect("submit worker") {
            assert!(all.insert(id, m).is_none(), "task {id} acknowledged twice");
        }
    }
    assert_eq!(all.len(), n, "every submit acknowledged");
    all
}

/// Task counts by status through node `i`; fails at once on a dead letter
/// or a cancellation, which no test here expects.
pub async fn by_status(api: &Api, i: usize) -> Value {
    let d = api.depth(i).await;
    let s = d["by_status"].clone();
    for bad in ["dead_letter", "cancelled"] {
        assert_eq!(s[bad].as_u64().unwrap_or(0), 0, "tasks {bad}: {d}");
    }
    s
}

/// Waits until at least `n` tasks are completed (as seen by node `i`).
pub async fn wait_completed(api: &Api, i: usize, n: usize, limit: Duration) -> Value {
    wait_until(
        &format!("{n} tasks completed"),
        deadline(limit),
        async || {
            let s = by_status(api, i).await;
            let done = s["completed"].as_u64().unwrap_or(0);
            if done >= n as u64 {
                Ok(s)
            } else {
                bail!("{done} completed: {s}")
            }
        },
    )
    .await
}

/// Every task, by id, through node `i`.
pub async fn all_tasks(api: &Api, i: usize) -> BTreeMap<u64, Value> {
    api.list_tasks(i, "")
        .await
        .into_iter()
        .map(|t| (t["id"].as_u64().expect("id"), t))
        .collect()
}

/// What the end-state check counted.
#[derive(Debug, Default)]
pub struct Tally {
    pub completed: usize,
    pub on_command: usize,
    pub executions: usize,
    pub executed_twice: usize,
    pub leased_again: usize,
    pub payload_lost: usize,
}

/// Checks the end state: every acknowledged task (and no other) completed
/// with its own result, every command execution recorded belongs to a task
/// and a distinct lease of it, a task ran more than once only if it was
/// leased more than once, and each accepted command result came from a
/// recorded execution. An execution started by the process `killed`
/// (SIGKILLed by the test) may have no marker: the node died before it wrote
/// the payload to the program's stdin.
pub fn check_end_state(
    markers: &BTreeMap<u64, String>,
    tasks: &BTreeMap<u64, Value>,
    execs: &[Exec],
    killed: Option<u32>,
) -> Tally {
    let ids: BTreeSet<&u64> = tasks.keys().collect();
    assert_eq!(
        ids,
        markers.keys().collect(),
        "the tasks are exactly the acknowledged ones"
    );
    let mut payload_lost = 0;
    let mut runs: BTreeMap<u64, Vec<&Exec>> = BTreeMap::new();
    let mut by_lease: BTreeMap<u64, Vec<&Exec>> = BTreeMap::new();
    for e in execs {
        let marker = markers
            .get(&e.task)
            .unwrap_or_else(|| panic!("execution of unknown task: {e:?}"));
        if e.marker.is_empty() && Some(e.pid) == killed {
            payload_lost += 1;
        } else {
            assert_eq!(
                &e.marker, marker,
                "the program got another task's payload: {e:?}"
            );
        }
        runs.entry(e.task).or_default().push(e);
        by_lease.entry(e.token).or_default().push(e);
    }
    let twice: Vec<(&Vec<&Exec>, &Value)> = by_lease
        .values()
        .filter(|es| es.len() > 1)
        .map(|es| (es, &tasks[&es[0].task]["lease_count"]))
        .collect();
    assert!(
        twice.is_empty(),
        "{} leases ran more than once (execution, pid = the node process that ran it; the \
         task's lease_count): {twice:?}",
        twice.len()
    );
    let mut tally = Tally {
        executions: execs.len(),
        payload_lost,
        ..Tally::default()
    };
    for (id, t) in tasks {
        assert_eq!(t["status"], "completed", "task {id} did not complete: {t}");
        tally.completed += 1;
        let lease_count = t["lease_count"].as_u64().expect("lease_count");
        let ran = runs.get(id).map_or(0, Vec::len);
        assert!(
            ran <= 1 || lease_count > 1,
            "task {id} ran {ran} times on one lease: {:?} {t}",
            runs[id]
        );
        tally.executed_twice += usize::from(ran > 1);
        tally.leased_again += usize::from(lease_count > 1);
        let agent = t["agent_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no agent: {t}"));
        check_result(*id, &markers[id], agent, t, runs.get(id));
        tally.on_command += usize::from(gateway_of(agent).starts_with("cmd"));
    }
    tally
}

/// The recorded result is the one the task's own execution produced.
fn check_result(id: u64, marker: &str, agent: &str, t: &Value, runs: Option<&Vec<&Exec>>) {
    let tokens: Vec<u64> = runs.map_or_else(Vec::new, |rs| rs.iter().map(|e| e.token).collect());
    if let Some(problem) = result_problem(id, marker, agent, t, &tokens) {
        panic!("task {id}: {problem}: {t}");
    }
}

/// Why a completed task's result is not the one its own execution produced
/// (`None` when it is): a `command` result must carry the task's marker, id
/// and the token of one of its recorded executions (`executed`); a `sim`
/// result must name the task.
pub fn result_problem(
    id: u64,
    marker: &str,
    agent: &str,
    t: &Value,
    executed: &[u64],
) -> Option<String> {
    let r = &t["result"];
    if gateway_of(agent).starts_with("cmd") {
        if r["marker"] != marker || r["task"] != id {
            return Some("result of another task".into());
        }
        let Some(token) = r["token"].as_u64() else {
            return Some("result without a token".into());
        };
        if !executed.contains(&token) {
            return Some(format!("accepted result of lease {token}, which never ran"));
        }
    } else if r["sim"] != true || r["task_id"] != id {
        return Some("result of another task".into());
    }
    None
}

/// Waits until node `i`'s log says the actor of each agent in `agents` started.
pub async fn wait_agents_started(c: &Cluster, i: usize, agents: &[String]) {
    wait_until(
        "the agents' actors to start",
        deadline(Duration::from_secs(20)),
        async || {
            let log = c.node(i).log_tail(5000);
            let started = |a: &&String| {
                log.lines()
                    .any(|l| l.contains("agent started") && l.contains(&format!("agent:{a} ")))
            };
            match agents.iter().find(|a| !started(a)) {
                Some(a) => bail!("agent {a} not started on node index {i}"),
                None => Ok(()),
            }
        },
    )
    .await;
}

/// One lease as read from a task: token and expiry (ms, leader time).
pub fn lease_of(t: &Value) -> Option<(u64, u64)> {
    let token = t["lease"]["fencing_token"].as_u64()?;
    Some((token, ms(&t["lease"]["expires_at"])))
}

/// Registers `n` agents of `capacity` on `gateway` through node `via`.
pub async fn register_agents(api: &Api, via: usize, gateway: &str, n: usize, capacity: u32) {
    let until = deadline(Duration::from_secs(20));
    for k in 0..n {
        let body =
            json!({ "id": format!("{gateway}.a{k}"), "gateway": gateway, "capacity": capacity });
        let r = api.post_retrying(via, "/api/v1/agents", &body, until).await;
        assert_eq!(r.status, 201, "register agent {body}: {r:?}");
    }
}

/// Waits until the owner of each gateway in `gateways` passes `ok` (as
/// read through node `via`).
pub async fn wait_owners(
    api: &Api,
    via: usize,
    what: &str,
    gateways: &[String],
    ok: impl Fn(Option<u64>) -> bool,
) {
    wait_until(what, deadline(Duration::from_secs(30)), async || {
        let o = owners(api, via).await?;
        match gateways.iter().find(|g| !ok(o.get(*g).copied().flatten())) {
            Some(g) => bail!("{g} is on {:?}", o.get(g)),
            None => Ok(()),
        }
    })
    .await;
}

/// Waits until node `i`'s `/health/ready` answers `status`.
pub async fn wait_ready_is(api: &Api, i: usize, status: u16) {
    let what = format!("node index {i} to answer {status} on /health/ready");
    wait_until(&what, deadline(Duration::from_secs(10)), async || {
        let r = api.get(i, "/health/ready").await?;
        if r.status == status {
            Ok(())
        } else {
            bail!("ready: {r:?}")
        }
    })
    .await;
}
