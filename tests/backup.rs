//! Backup and restore end to end, with real `godel` processes on
//! 127.0.0.1:
//!
//! - a backup taken from a follower while tasks are submitted and
//!   completed is whole and restores into a one-node cluster on which
//!   every task it holds reaches a terminal state (leases of the old
//!   cluster's agents expire or are given back, nothing is lost);
//! - a backup taken once the cluster is quiet restores into a cluster
//!   (which new nodes then join, and which runs new tasks) showing exactly
//!   the tasks, dead letters, registry and audit chain the old one showed;
//! - a damaged or truncated file, or a data directory in use, is refused
//!   and changes nothing; an existing file is never replaced; only an
//!   admin may take a backup (403 for the others, and no file);
//! - a cluster that lost its majority for good comes back from its
//!   survivor's data directory (unsafe recovery, `godel backup
//!   --data-dir`).

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::bail;
use godel::fsm::Role;
use serde_json::{Value, json};
use support::{ADMIN_KEY, Api, BIN, Cluster, NodeProc, bounded, deadline, task_body, wait_until};

/// Heartbeats on (the harness turns them off), so the old cluster's nodes
/// are dead soon after a restore and their gateways move.
const CONFIG: &str = "[queue]\nnode_heartbeat_interval = \"500ms\"\nnode_dead_after = \"3s\"\n";
/// Longest one `godel` client run may take before it is killed by PID.
const CLI_BOUND: Duration = Duration::from_secs(60);
/// Statuses a task does not leave.
const TERMINAL: [&str; 3] = ["completed", "dead_letter", "cancelled"];

/// What one `godel` run did.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(self, what: &str) -> Run {
        assert_eq!(self.code, 0, "{what}: {self:#?}");
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("{e}: {self:#?}"))
    }
}

/// Runs `godel ARGS` with credential `key` and no other `GODEL_*`
/// variable; killed by PID past [`CLI_BOUND`].
fn godel(key: &str, args: &[&str]) -> Run {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("GODEL_") {
            cmd.env_remove(k);
        }
    }
    let child = cmd
        .env("GODEL_API_KEY", key)
        .env("NO_COLOR", "1")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn godel");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(CLI_BOUND) {
        Ok(out) => {
            let out = out.expect("wait for godel");
            Run {
                code: out.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }
        }
        Err(_) => {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
            panic!("godel {args:?} ran past {CLI_BOUND:?}; killed pid {pid}");
        }
    }
}

/// [`godel`] off the async runtime.
async fn godel_async(key: &str, args: &[&str]) -> Run {
    let (key, args): (String, Vec<String>) = (
        key.to_owned(),
        args.iter().map(|a| (*a).to_owned()).collect(),
    );
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        godel(&key, &args)
    })
    .await
    .expect("godel run")
}

fn url(c: &Cluster, i: usize) -> String {
    format!("http://{}", c.node(i).api_addr)
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// `godel backup --out FILE` against node `i`, then `godel backup verify
/// FILE -o json`; the verified backup's JSON.
async fn backup_of(c: &Cluster, i: usize, file: &Path) -> Value {
    godel_async(
        ADMIN_KEY,
        &["--api", &url(c, i), "backup", "--out", path(file)],
    )
    .await
    .ok("godel backup");
    let v = godel_async(ADMIN_KEY, &["-o", "json", "backup", "verify", path(file)])
        .await
        .ok("godel backup verify")
        .json();
    v["backup"].clone()
}

/// `godel -o json backup --data-dir DATA [FLAGS] --out FILE`, which must
/// succeed (`what` names it); the backup's JSON.
async fn offline_backup(data: &Path, file: &Path, flags: &[&str], what: &str) -> Value {
    let mut args = vec!["-o", "json", "backup", "--data-dir", path(data)];
    args.extend_from_slice(flags);
    args.extend(["--out", path(file)]);
    godel_async(ADMIN_KEY, &args).await.ok(what).json()["backup"].clone()
}

/// `godel restore FILE --config <node's config>`: the prepare step of
/// [`Cluster::start_prepared`].
fn restore_for(file: &Path) -> impl FnOnce(&NodeProc) + '_ {
    move |p: &NodeProc| {
        let config = p.config_path().to_str().expect("utf-8 config path");
        godel(ADMIN_KEY, &["restore", path(file), "--config", config]).ok("godel restore");
    }
}

/// A simulated gateway that takes 20 ms per attempt and fails 30% of them,
/// and two agents on it.
async fn register_sim(api: &Api, i: usize) {
    let gw = json!({
        "id": "sim", "region": "local", "max_sessions": 16,
        "driver": {"kind": "sim", "latency": {"dist": "fixed", "value": "20ms"}, "failure_rate": 0.3},
    });
    let r = api
        .post_retrying(
            i,
            "/api/v1/gateways",
            &gw,
            deadline(Duration::from_secs(20)),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    for a in ["sim-a", "sim-b"] {
        let agent = json!({"id": a, "gateway": "sim", "capacity": 4});
        let r = api.post(i, "/api/v1/agents", &agent).await.unwrap();
        assert_eq!(r.status, 201, "{r:?}");
    }
}

/// Submits tasks through every node in turn until `stop`; the ids
/// acknowledged. Every fifth task has a single attempt, so some end as
/// dead letters.
/// Submits tasks until `stop`; every acknowledged id also goes into
/// `acked_so_far` as it is acknowledged.
async fn submitter(
    api: Api,
    worker: usize,
    stop: Arc<AtomicBool>,
    acked_so_far: Arc<std::sync::Mutex<Vec<u64>>>,
) -> Vec<u64> {
    let mut acked = Vec::new();
    for n in 0.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let tenant = ["acme", "beta"][n % 2];
        let priority = ["critical", "high", "medium", "low"][n % 4];
        let key = format!("load-{worker}-{n}");
        let mut body = task_body(tenant, priority, n, Some(&key));
        // 2 KiB each, so the state streams in several chunks.
        body["payload"]["pad"] = json!("x".repeat(2048));
        if n % 5 == 0 {
            body["max_attempts"] = json!(1);
        }
        let t = support::work::submit(&api, (worker + n) % api.len(), &body).await;
        let id = t["id"].as_u64().expect("id");
        acked.push(id);
        acked_so_far.lock().unwrap().push(id);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    acked
}

/// Every item of a paged list (`{items, next_cursor}`).
async fn all_pages(api: &Api, i: usize, path: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = match &cursor {
            Some(c) => {
                api.get_ok(i, &format!("{path}?limit=1000&cursor={c}"))
                    .await
            }
            None => api.get_ok(i, &format!("{path}?limit=1000")).await,
        };
        out.extend(page["items"].as_array().expect("items").iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return out,
        }
    }
}

/// What a cluster shows, in the fields a restore keeps.
#[derive(Debug, PartialEq)]
struct Shown {
    tasks: Vec<Value>,
    dead_letters: Vec<Value>,
    gateways: Vec<Value>,
    agents: Vec<Value>,
    audit_head: Value,
}

/// The fields of a registry item that describe it, not its life on the
/// nodes (owner, health, load).
fn stable(mut v: Value, volatile: &[&str]) -> Value {
    if let Some(m) = v.as_object_mut() {
        for k in volatile {
            m.remove(*k);
        }
    }
    v
}

impl Shown {
    fn task_ids(&self) -> std::collections::BTreeSet<u64> {
        self.tasks.iter().filter_map(|t| t["id"].as_u64()).collect()
    }
}

async fn shown(api: &Api, i: usize) -> Shown {
    let items = |v: Value| v["items"].as_array().cloned().unwrap_or_default();
    let gateways = items(api.get_ok(i, "/api/v1/gateways").await)
        .into_iter()
        // A restored gateway moves to a node of the new cluster (and a
        // placement raises its fencing token, where the view shows one).
        .map(|g| {
            stable(
                g,
                &[
                    "owner",
                    "placement_token",
                    "health",
                    "circuit",
                    "updated_at",
                ],
            )
        })
        .collect();
    let agents = items(api.get_ok(i, "/api/v1/agents").await)
        .into_iter()
        .map(|a| stable(a, &["current_load", "online_on", "status"]))
        .collect();
    Shown {
        tasks: all_pages(api, i, "/api/v1/tasks").await,
        dead_letters: all_pages(api, i, "/api/v1/dead-letter").await,
        gateways,
        agents,
        audit_head: api.get_ok(i, "/api/v1/audit?limit=1").await["head"].clone(),
    }
}

/// Tasks per status, from `GET /queue/depth`.
async fn by_status(api: &Api, i: usize) -> Value {
    api.depth(i).await["by_status"].clone()
}

/// Waits until no task is in a non-terminal status.
async fn wait_quiet(api: &Api, i: usize, limit: Duration) {
    wait_until(
        "every task in a terminal status",
        deadline(limit),
        async || {
            let s = by_status(api, i).await;
            let open: Vec<(String, u64)> = s
                .as_object()
                .expect("by_status")
                .iter()
                .filter(|(k, n)| !TERMINAL.contains(&k.as_str()) && n.as_u64() != Some(0))
                .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                .collect();
            if open.is_empty() {
                Ok(())
            } else {
                bail!("open: {open:?}")
            }
        },
    )
    .await
}

fn section(backup: &Value) -> &Value {
    let sections = backup["sections"].as_array().expect("sections");
    assert_eq!(sections.len(), 1, "one group today: {backup}");
    assert_eq!(sections[0]["meta"]["group"], 0);
    assert_eq!(sections[0]["meta"]["name"], "meta");
    &sections[0]["meta"]
}

fn count(v: &Value, status: &str) -> u64 {
    v[status].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_under_load_and_quiet_restore_into_new_clusters() {
    bounded(Duration::from_secs(420), async {
        let dir = tempfile::tempdir().unwrap();
        let (under_load, quiet) = (
            dir.path().join("under-load.backup"),
            dir.path().join("quiet.backup"),
        );
        let old = back_up_a_working_cluster(&under_load, &quiet).await;
        every_task_of_a_backup_finishes(&under_load, section(&old.under_load), &old.acked_before)
            .await;
        a_quiet_backup_restores_as_it_was(&quiet, &old.shown).await;
    })
    .await;
}

/// The backups of the old cluster, and what it showed after the quiet one.
struct OldCluster {
    under_load: Value,
    /// Tasks acknowledged before the under-load backup was asked for.
    acked_before: Vec<u64>,
    shown: Shown,
}

/// A three-node cluster under load: a backup from a follower while tasks
/// are submitted and completed, then (load stopped, every task finished)
/// one from the leader, checked against what the cluster shows.
async fn back_up_a_working_cluster(under_load: &Path, quiet: &Path) -> OldCluster {
    let c = Cluster::start_with(3, CONFIG).await;
    let api = c.api();
    let leader = c.leader().await;
    register_sim(&api, leader).await;
    let stop = Arc::new(AtomicBool::new(false));
    let acked_so_far = Arc::new(std::sync::Mutex::new(Vec::new()));
    let load: Vec<_> = (0..3)
        .map(|w| {
            let (stop, so_far) = (Arc::clone(&stop), Arc::clone(&acked_so_far));
            tokio::spawn(submitter(api.clone(), w, stop, so_far))
        })
        .collect();
    wait_until(
        "the load to run",
        deadline(Duration::from_secs(60)),
        async || {
            let s = by_status(&api, leader).await;
            if count(&s, "completed") >= 200 && count(&s, "dead_letter") >= 1 {
                Ok(())
            } else {
                bail!("{s}")
            }
        },
    )
    .await;
    let follower = (0..3).find(|i| *i != leader).expect("a follower");
    let acked_before = acked_so_far.lock().unwrap().clone();
    let ul = back_up_under_load(&c, follower, leader, under_load).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for l in load {
        acked.extend(l.await.expect("submitter"));
    }
    eprintln!("[test] {} tasks acknowledged under load", acked.len());

    wait_quiet(&api, leader, Duration::from_secs(120)).await;
    let q = backup_of(&c, leader, quiet).await;
    let shown = shown(&api, leader).await;
    let (ul_meta, q_meta) = (section(&ul), section(&q));
    let summary = &q_meta["summary"];
    assert_eq!(summary["tasks"], shown.tasks.len() as u64);
    assert_eq!(summary["dead_letters"], shown.dead_letters.len() as u64);
    assert!(!shown.dead_letters.is_empty());
    assert_eq!(
        (&summary["gateways"], &summary["agents"]),
        (&json!(1), &json!(2))
    );
    assert_eq!(summary["audit_head"], shown.audit_head["hash"]);
    assert_eq!(summary["audit_last_seq"], shown.audit_head["seq"]);
    let ids = shown.task_ids();
    assert!(
        acked.iter().all(|id| ids.contains(id)),
        "every acknowledged task is there"
    );
    let index = |m: &Value| m["applied"]["index"].as_u64().unwrap();
    assert!(index(ul_meta) < index(q_meta));
    assert!(ul_meta["summary"]["tasks"].as_u64() < summary["tasks"].as_u64());
    OldCluster {
        under_load: ul,
        acked_before,
        shown,
    }
}

/// `godel backup` from `follower` while the load runs: tasks complete
/// meanwhile, the file is whole, several chunks long, and counted.
async fn back_up_under_load(c: &Cluster, follower: usize, leader: usize, file: &Path) -> Value {
    let api = c.api();
    let before = by_status(&api, leader).await;
    let ul = backup_of(c, follower, file).await;
    let after = by_status(&api, leader).await;
    assert!(
        count(&after, "completed") > count(&before, "completed"),
        "tasks completed while the backup streamed: {before} -> {after}"
    );
    wait_until(
        "the backup counted",
        deadline(Duration::from_secs(10)),
        async || {
            let n = api
                .metric(follower, "godel_backups_total{outcome=\"ok\"}")
                .await;
            if n == 1.0 { Ok(()) } else { bail!("{n}") }
        },
    )
    .await;
    let state_bytes = ul["sections"][0]["state_bytes"].as_u64().unwrap();
    assert!(
        state_bytes > 2 * godel::backup::STREAM_CHUNK_BYTES as u64,
        "streamed in several pieces: {state_bytes} bytes"
    );
    assert_eq!(ul["header"]["cluster"]["source"], "api");
    assert_eq!(ul["header"]["cluster"]["node"], c.node(follower).id);
    ul
}

/// Restores `file` (whose section is `meta`) into a one-node cluster: it
/// holds the backup's tasks (every one in `acked_before` among them) and
/// audit head, and every task reaches a
/// terminal state (leases of the old agents expire or are given back).
async fn every_task_of_a_backup_finishes(file: &Path, meta: &Value, acked_before: &[u64]) {
    let c = Cluster::start_prepared(1, CONFIG, restore_for(file)).await;
    let api = c.api();
    let audit = api.get_ok(0, "/api/v1/audit?limit=1").await;
    assert_eq!(audit["head"]["hash"], meta["summary"]["audit_head"]);
    let tasks = all_pages(&api, 0, "/api/v1/tasks").await;
    assert_eq!(
        tasks.len() as u64,
        meta["summary"]["tasks"].as_u64().unwrap()
    );
    // Every task acknowledged before the backup was asked for is in it.
    let ids: std::collections::HashSet<u64> =
        tasks.iter().filter_map(|t| t["id"].as_u64()).collect();
    assert!(!acked_before.is_empty());
    let missing: Vec<&u64> = acked_before.iter().filter(|id| !ids.contains(id)).collect();
    assert!(
        missing.is_empty(),
        "acknowledged before the backup, missing from it: {missing:?}"
    );
    let open = tasks
        .iter()
        .filter(|t| !TERMINAL.contains(&t["status"].as_str().unwrap_or("")))
        .count();
    eprintln!(
        "[test] under-load backup: {} tasks, {open} not finished",
        tasks.len()
    );
    wait_quiet(&api, 0, Duration::from_secs(150)).await;
    let after = all_pages(&api, 0, "/api/v1/tasks").await;
    assert_eq!(after.len(), tasks.len(), "no task lost or added");
    godel_async(ADMIN_KEY, &["--api", &url(&c, 0), "audit", "verify"])
        .await
        .ok("audit verify on the restored under-load backup");
}

/// Restores the quiet backup `file`: the new cluster shows exactly what
/// the old one did (`old`), two new nodes join it, and it runs new tasks.
async fn a_quiet_backup_restores_as_it_was(file: &Path, old: &Shown) {
    let mut c = Cluster::start_prepared(1, CONFIG, restore_for(file)).await;
    let new = shown(&c.api(), 0).await;
    assert_eq!(new.tasks, old.tasks);
    assert_eq!(new.dead_letters, old.dead_letters);
    assert_eq!(new.gateways, old.gateways);
    assert_eq!(new.agents, old.agents);
    assert_eq!(new.audit_head, old.audit_head);
    let verified = godel_async(ADMIN_KEY, &["--api", &url(&c, 0), "audit", "verify"])
        .await
        .ok("audit verify on the restored quiet backup");
    assert!(verified.stdout.contains("verified"), "{verified:?}");

    let (j2, j3) = (c.start_joining(0), c.start_joining(0));
    let api = c.api();
    wait_until(
        "three voters",
        deadline(Duration::from_secs(60)),
        async || {
            let m = api.cluster(0).await?["members"].clone();
            let voters = m
                .as_array()
                .map_or(0, |m| m.iter().filter(|x| x["role"] == "voter").count());
            if voters == 3 { Ok(()) } else { bail!("{m}") }
        },
    )
    .await;
    c.wait_caught_up(j2, Duration::from_secs(60)).await;
    c.wait_caught_up(j3, Duration::from_secs(60)).await;
    let old_ids = old.task_ids();
    let mut fresh = Vec::new();
    for n in 0..10 {
        let body = task_body("acme", "high", n, Some(&format!("after-{n}")));
        let t = support::work::submit(&api, j2, &body).await;
        fresh.push(t["id"].as_u64().unwrap());
    }
    assert!(
        fresh.iter().all(|id| !old_ids.contains(id)),
        "new ids follow the copy's"
    );
    wait_until(
        "the new tasks to finish",
        deadline(Duration::from_secs(120)),
        async || {
            for id in &fresh {
                let t = api.get_ok(j3, &format!("/api/v1/tasks/{id}")).await;
                if !TERMINAL.contains(&t["status"].as_str().unwrap_or("")) {
                    bail!("task {id} is {}", t["status"]);
                }
            }
            Ok(())
        },
    )
    .await;
}

/// A key of `role` in tenant `acme`, made by the admin.
async fn key_of(api: &Api, role: Role) -> String {
    let body = json!({ "name": format!("{role}-key"), "role": role, "tenant": "acme" });
    let r = api.post(0, "/api/v1/api-keys", &body).await.unwrap();
    assert_eq!(r.status, 201, "{r:?}");
    r.body["key"].as_str().expect("the key, once").to_owned()
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_used_directories_and_non_admins_are_refused_and_change_nothing() {
    bounded(Duration::from_secs(180), async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let c = Cluster::start(1).await;
        let api = c.api();
        for n in 0..3 {
            let r = api
                .post(0, "/api/v1/tasks", &task_body("acme", "low", n, None))
                .await
                .unwrap();
            assert_eq!(r.status, 201, "{r:?}");
        }
        let good = d.join("good.backup");
        let g = backup_of(&c, 0, &good).await;
        assert_eq!(section(&g)["summary"]["tasks"], 3);
        only_an_admin_backs_up(&c, d).await;
        assert_eq!(names(d), ["good.backup"], "no file and no partial file");
        let bytes = std::fs::read(&good).unwrap();
        let run = godel_async(
            ADMIN_KEY,
            &["--api", &url(&c, 0), "backup", "--out", path(&good)],
        )
        .await;
        assert_eq!(run.code, 1, "{run:?}");
        assert!(
            run.stderr.contains("exists"),
            "an existing file is never replaced: {run:?}"
        );
        assert_eq!(std::fs::read(&good).unwrap(), bytes);
        damaged_files_are_refused(&bytes, d).await;
        assert_eq!(names(d), ["good.backup"], "no staging directory left");
        restores_need_an_empty_directory(&good, section(&g), d).await;
    })
    .await;
}

/// The route and the CLI refuse every role but admin (403 naming the
/// permission), and the CLI leaves no file behind.
async fn only_an_admin_backs_up(c: &Cluster, d: &Path) {
    let api = c.api();
    for role in [Role::Operator, Role::Developer, Role::Viewer] {
        let key = key_of(&api, role).await;
        let r = api
            .with_key(&key)
            .get(0, "/api/v1/admin/backup")
            .await
            .unwrap();
        r.assert_error(403, "forbidden");
        assert!(r.message().contains("cluster:backup"), "{r:?}");
        let out = d.join(format!("{role}.backup"));
        let run = godel_async(&key, &["--api", &url(c, 0), "backup", "--out", path(&out)]).await;
        assert_eq!(run.code, 1, "{run:?}");
        assert!(run.stderr.contains("forbidden"), "{run:?}");
    }
}

/// `godel restore FILE --data-dir DIR --node-id 7`.
async fn restore_as_7(file: &Path, dir: &Path) -> Run {
    godel_async(
        ADMIN_KEY,
        &[
            "restore",
            path(file),
            "--data-dir",
            path(dir),
            "--node-id",
            "7",
        ],
    )
    .await
}

/// A flipped byte (in the state, in the header) and a cut file are
/// refused by verify and by restore, which creates nothing.
async fn damaged_files_are_refused(good: &[u8], d: &Path) {
    let mut cases = Vec::new();
    for (name, at) in [("state", good.len() / 2), ("header", 40)] {
        let mut bad = good.to_vec();
        bad[at] ^= 0x40;
        cases.push((format!("flipped-{name}.backup"), bad, "damaged"));
    }
    cases.push((
        "cut.backup".into(),
        good[..good.len() - 10].to_vec(),
        "truncated",
    ));
    for (name, content, why) in cases {
        let file = d.join(&name);
        std::fs::write(&file, content).unwrap();
        let run = godel_async(ADMIN_KEY, &["backup", "verify", path(&file)]).await;
        assert_eq!(run.code, 1, "{name}: {run:?}");
        assert!(run.stderr.contains(why), "{name}: {run:?}");
        let target = d.join(format!("restored-{name}"));
        let run = restore_as_7(&file, &target).await;
        assert_eq!(run.code, 1, "{name}: {run:?}");
        assert!(run.stderr.contains(why), "{name}: {run:?}");
        assert!(
            run.stderr.contains("nothing was created"),
            "{name}: {run:?}"
        );
        assert!(!target.exists(), "{name}: {} was created", target.display());
        std::fs::remove_file(&file).unwrap();
    }
}

/// A directory that holds anything is refused and left as it was; an
/// empty one takes the restore, whose store reads back offline as the
/// backup's state (`was`) with the new node alone as its membership.
async fn restores_need_an_empty_directory(good: &Path, was: &Value, d: &Path) {
    let used = d.join("used");
    std::fs::create_dir(&used).unwrap();
    std::fs::write(used.join("keep"), b"mine").unwrap();
    let run = restore_as_7(good, &used).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("not empty"), "{run:?}");
    assert_eq!(names(&used), ["keep"]);

    let empty = d.join("empty");
    std::fs::create_dir(&empty).unwrap();
    restore_as_7(good, &empty)
        .await
        .ok("restore into an empty directory");
    godel_async(ADMIN_KEY, &["audit", "verify", "--data-dir", path(&empty)])
        .await
        .ok("audit verify offline");
    let again = d.join("again.backup");
    godel_async(
        ADMIN_KEY,
        &["backup", "--data-dir", path(&empty), "--out", path(&again)],
    )
    .await
    .ok("an offline backup of the restored directory");
    let a = godel_async(ADMIN_KEY, &["-o", "json", "backup", "verify", path(&again)])
        .await
        .ok("verify")
        .json();
    let now = section(&a["backup"]);
    assert_eq!(now["summary"], was["summary"]);
    assert_eq!(now["applied"], was["applied"]);
    let voters = &now["membership"]["membership"]["configs"];
    assert_eq!(voters, &json!([[7]]), "the new node alone: {now}");
}

/// Every file under `dir` with its bytes.
fn files(dir: &Path) -> std::collections::BTreeMap<std::path::PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.insert(path.clone(), std::fs::read(&path).unwrap());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_lost_its_majority_comes_back_from_its_survivor() {
    bounded(Duration::from_secs(180), async {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cluster::start(3).await;
        let api = c.api();
        let leader = c.leader().await;
        let mut acked = Vec::new();
        for n in 0..40 {
            let body = task_body("acme", "medium", n, Some(&format!("k{n}")));
            let t = support::work::submit(&api, leader, &body).await;
            acked.push(t["id"].as_u64().unwrap());
        }
        // The majority is gone for good; the leader, which holds every
        // committed entry, survives on disk.
        for i in (0..3).filter(|i| *i != leader) {
            c.kill9(i);
        }
        c.kill9(leader);
        let survivor = c.node(leader).data_dir();
        let untouched = files(&survivor.join("raft"));

        let file = dir.path().join("survivor.backup");
        let backup = offline_backup(&survivor, &file, &[], "offline backup of the survivor").await;
        let meta = section(&backup).clone();
        assert_eq!(meta["summary"]["tasks"], acked.len() as u64);
        let committed = dir.path().join("committed.backup");
        let backup = offline_backup(
            &survivor,
            &committed,
            &["--committed-only"],
            "offline backup up to the commit index",
        )
        .await;
        let upto = section(&backup)["applied"]["index"].as_u64().unwrap();
        assert!(upto <= meta["applied"]["index"].as_u64().unwrap());
        assert!(
            files(&survivor.join("raft")) == untouched,
            "the survivor's store is read, never written"
        );
        assert_eq!(names(dir.path()), ["committed.backup", "survivor.backup"]);

        let c2 = Cluster::start_prepared(4, "", restore_for(&file)).await;
        let a2 = c2.api();
        for id in &acked {
            let t = a2.get_ok(0, &format!("/api/v1/tasks/{id}")).await;
            assert_eq!(t["status"], "pending", "{t}");
        }
        let r = a2
            .post(0, "/api/v1/tasks", &task_body("acme", "low", 99, None))
            .await
            .unwrap();
        assert_eq!(r.status, 201, "the recovered cluster takes writes: {r:?}");
        let members = a2.cluster(0).await.unwrap()["members"].clone();
        assert_eq!(members.as_array().map(Vec::len), Some(1), "{members}");
        assert_eq!(members[0]["id"], 4);
        godel_async(ADMIN_KEY, &["--api", &url(&c2, 0), "audit", "verify"])
            .await
            .ok("audit verify");
    })
    .await;
}

/// The groups of a verified backup's JSON: (id, name) per section.
fn groups_of(backup: &Value) -> Vec<(u64, String)> {
    backup["sections"]
        .as_array()
        .expect("sections")
        .iter()
        .map(|s| {
            (
                s["meta"]["group"].as_u64().unwrap(),
                s["meta"]["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharded_cluster_backs_up_and_restores_every_group() {
    const SHARDED: &str = "[cluster]\nshards = 3\n";
    let mut c = Cluster::start_with(3, SHARDED).await;
    bounded(Duration::from_secs(240), async {
        let api = c.api();
        wait_until(
            "the shard count recorded",
            deadline(Duration::from_secs(30)),
            async || {
                let v = api.cluster(0).await?;
                if v["shard_count"] == 3 {
                    Ok(())
                } else {
                    bail!("{}", v["shard_count"])
                }
            },
        )
        .await;
        let want: Vec<(u64, String)> = vec![
            (0, "meta".into()),
            (1, "shard-1".into()),
            (2, "shard-2".into()),
            (3, "shard-3".into()),
        ];
        let dir = tempfile::tempdir().unwrap();

        // Through the API, from a follower: a section per group.
        let file = dir.path().join("sharded.backup");
        let leader = c.leader().await;
        let follower = (leader + 1) % 3;
        let v = backup_of(&c, follower, &file).await;
        assert_eq!(groups_of(&v), want, "{v}");

        // From a stopped node's data directory: the same groups.
        assert!(c.terminate(follower, Duration::from_secs(10)));
        let offline = dir.path().join("offline.backup");
        let data = c.node(follower).data_dir();
        let backup = offline_backup(&data, &offline, &[], "offline backup of a sharded node").await;
        assert_eq!(groups_of(&backup), want);

        // A node with another shard count is refused, and nothing is made.
        let refused_dir = dir.path().join("one-shard");
        let run = restore_as_7(&file, &refused_dir).await;
        assert_ne!(run.code, 0, "{run:?}");
        assert!(
            run.stderr.contains("restore with cluster.shards = 3"),
            "{run:?}"
        );
        assert!(!refused_dir.exists());

        // A node with three shards grows a cluster from it: it leads every
        // group alone, and records the same count.
        let restored = Cluster::start_prepared(1, SHARDED, restore_for(&file)).await;
        let api = restored.api();
        wait_until(
            "the restored node to lead every group",
            deadline(Duration::from_secs(30)),
            async || {
                let v = api.cluster(0).await?;
                let groups = v["groups"].as_array().cloned().unwrap_or_default();
                let ids: Vec<u64> = groups.iter().filter_map(|g| g["group"].as_u64()).collect();
                if ids != [0, 1, 2, 3] || v["shard_count"] != 3 {
                    bail!("{v}");
                }
                for g in &groups {
                    if g["leader"] != 1 || g["voters"] != json!([1]) {
                        bail!("group {g}");
                    }
                }
                Ok(())
            },
        )
        .await;
    })
    .await;
}
