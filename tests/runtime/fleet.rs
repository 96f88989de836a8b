//! The runtime tests' fleet: gateways and agents registered through the
//! API, tasks that carry a unique marker in their payload, the `command`
//! gateways' program and its side-effect log, and the end-state check they
//! all share.
//!
//! [`SCRIPT`] appends one line per started execution to the side-effect log
//! (task id, fencing token, the task's marker from the payload, and the pid
//! of the node that ran it) before it does its work, so a test can count
//! executions: a task may run more than once only across a lease loss (its
//! `lease_count` is above 1), and no lease may run twice.

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
/// `godel serve` process that started it. Only shell builtins besides
/// `sleep`, to keep each attempt cheap.
const SCRIPT: &str = r#"#!/bin/sh
IFS= read -r payload || true
marker=${payload#*'"marker":"'}
marker=${marker%%'"'*}
echo "$GODEL_TASK_ID $GODEL_FENCING_TOKEN $marker $PPID" >> "$SIDE_LOG"
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
        json!({
            "id": id, "region": "local", "max_sessions": 32,
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
        text.lines()
            .map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                let num = |i: usize| -> u64 {
                    f.get(i)
                        .and_then(|s| s.parse().ok())
                        .unwrap_or_else(|| panic!("bad side-effect line `{l}` in {:?}", self.dir))
                };
                assert_eq!(f.len(), 4, "bad side-effect line `{l}`");
                Exec {
                    task: num(0),
                    token: num(1),
                    marker: f[2].to_owned(),
                    pid: num(3) as u32,
                }
            })
            .collect()
    }
}

/// A `sim` gateway with the given latency distribution.
pub fn sim_gateway(id: &str, latency: Value) -> Value {
    json!({
        "id": id, "region": "local", "max_sessions": 32,
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
