//! Adding a queue shard to a running cluster (`docs/shards.md`, "Changing
//! the number of shards"), end to end over real `godel serve` processes.
//!
//! A three-node cluster created with two shards takes keyed submissions
//! (idempotency keys, half of them with one of 30 session keys) and
//! resubmissions of earlier keys through other nodes, without a pause,
//! while each node in turn is killed with SIGKILL and started again with
//! `cluster.shards = 3`. Once every node hosts the third shard the meta
//! leader grows the count, initializes the new group, and opens routing
//! epoch 2 over three shards; the meta leader is killed with SIGKILL
//! while it does so, and started again. What it proves:
//!
//! - no downtime: the submissions go on through the live nodes the whole
//!   time (each is resent while the answer is "not now", which an
//!   idempotency key makes safe), and the new shard takes new tasks;
//! - 0 lost, 0 duplicated: every acknowledged task is listed afterwards,
//!   and nothing else is; every idempotency key names one task, whichever
//!   epoch and node it was first sent through, including keys the new
//!   epoch routes to another shard (a resubmission finds the task where the
//!   old epoch put it, with 200);
//! - a session's tasks stay in one shard: its unfinished tasks hold it where
//!   it started;
//! - a backup of the grown cluster restores into a node configured with
//!   three shards: the same tasks and routing epochs, and a moved key is
//!   still found in its first shard.

#[allow(dead_code)] // each test binary uses part of the shared harness
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Api, BIN, Cluster, bounded, deadline, wait_until};

const TEST_BOUND: Duration = Duration::from_secs(280);
/// Session keys the load spreads its session tasks over.
const SESSIONS: usize = 30;
/// How long one submission may keep being refused before the test fails.
const SUBMIT_PATIENCE: Duration = Duration::from_secs(30);

/// The shard an id names.
fn shard_of(id: u64) -> u64 {
    id & 0xff
}

/// The shard a key of `tenant` routes to over `shards` shards.
fn route(tenant: &str, key: &str, shards: u32) -> u64 {
    u64::from(godel::fsm::route(tenant, key, shards))
}

/// One acknowledged submission.
#[derive(Clone, Debug)]
struct Acked {
    key: String,
    session: Option<String>,
    id: u64,
    status: u16,
    /// Whether the routing epoch over three shards was open (as far as the
    /// load knew) when it was sent.
    after_growth: bool,
}

/// `POST /tasks` of `body`, through node `first` and then the others in
/// turn while the answer is "not now" or the node is down.
async fn submit(api: &Api, first: usize, body: &Value) -> (u16, Value) {
    let until = deadline(SUBMIT_PATIENCE);
    let mut i = first;
    loop {
        let last = match api.post(i, "/api/v1/tasks", body).await {
            Ok(r) if matches!(r.status, 429 | 503 | 504) => format!("{r:?}"),
            Ok(r) => return (r.status, r.body),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            Instant::now() < until,
            "POST /tasks kept failing on every node: {last}"
        );
        i = (i + 1) % api.len();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

/// The load: new keyed tasks and resubmissions of earlier keys, one at a
/// time, until `stop`.
async fn load(
    api: Api,
    acked: Arc<Mutex<Vec<Acked>>>,
    grown: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) {
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let after_growth = grown.load(Ordering::Relaxed);
        let earlier = {
            let log = acked.lock().unwrap();
            (n.is_multiple_of(4) && !log.is_empty()).then(|| log[(n * 7919) % log.len()].clone())
        };
        let (key, session) = match earlier {
            Some(a) => (a.key, a.session),
            None => (
                format!("k{n}"),
                n.is_multiple_of(2).then(|| format!("s{}", n % SESSIONS)),
            ),
        };
        let mut body = json!({
            "tenant": "grow",
            "priority": "medium",
            "payload": { "n": n },
            "idempotency_key": key,
        });
        if let Some(s) = &session {
            body["session_key"] = json!(s);
        }
        let (status, answer) = submit(&api, n % api.len(), &body).await;
        assert!(
            matches!(status, 200 | 201),
            "submit {body}: {status} {answer}"
        );
        let id = answer["id"].as_u64().expect("task id");
        acked.lock().unwrap().push(Acked {
            key,
            session,
            id,
            status,
            after_growth,
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `godel ARGS` with the admin key, off the async runtime.
async fn cli(args: &[&str]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(BIN)
            .env("GODEL_API_KEY", support::ADMIN_KEY)
            .args(&args)
            .output()
            .expect("run godel")
    })
    .await
    .expect("godel ran")
}

/// `PUT /switches/{name}` holding capability `cap`, through whichever
/// node answers.
async fn put_switch(api: &Api, name: &str, cap: &str) {
    let until = deadline(SUBMIT_PATIENCE);
    let body = json!({ "capability": cap });
    let mut i = 0;
    loop {
        let last = match api.put(i, &format!("/api/v1/switches/{name}"), &body).await {
            Ok(r) if r.status == 200 => return,
            Ok(r) => format!("{r:?}"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            Instant::now() < until,
            "PUT /switches/{name} kept failing: {last}"
        );
        i = (i + 1) % api.len();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every node's `routes` from `GET /cluster`, when all answer.
async fn routes(api: &Api, nodes: usize) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for i in 0..nodes {
        out.push(api.cluster(i).await?["routes"].clone());
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_added_under_load_loses_nothing_and_keeps_keys_and_sessions() {
    let mut c = Cluster::start_with(3, "[cluster]\nshards = 2\n").await;
    let api = c.api();
    bounded(TEST_BOUND, async {
        wait_until("two shards recorded", deadline(Duration::from_secs(40)), async || {
            let r = routes(&api, 3).await?;
            anyhow::ensure!(r.iter().all(|r| *r == json!([2])), "routes {r:?}");
            Ok(())
        })
        .await;
        // A kill switch set before the add, and one while it is under way
        // (next to the meta leader's kill): both reach the added shard.
        put_switch(&api, "before", "held-before").await;
        let acked = Arc::new(Mutex::new(Vec::new()));
        let grown = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let worker = tokio::spawn(load(
            api.clone(),
            Arc::clone(&acked),
            Arc::clone(&grown),
            Arc::clone(&stop),
        ));

        // Each node in turn: SIGKILL, then back with three shards.
        for i in 0..3 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            c.kill9(i);
            c.edit_config(i, |t| t.replacen("shards = 2", "shards = 3", 1));
            c.restart(i);
            c.wait_caught_up(i, Duration::from_secs(40)).await;
            eprintln!("[test] node index {i} hosts three shards; {} acked", acked.lock().unwrap().len());
        }
        // The meta leader, killed while it adds the shard (growing the
        // count, initializing the group, opening the epoch: whichever step
        // it is at), comes back; the next leader carries the add through.
        let l = c.leader().await;
        let before = api.cluster(l).await.map(|s| (s["shard_count"].clone(), s["routes"].clone()));
        c.kill9(l);
        eprintln!("[test] killed the meta leader (node index {l}) at {before:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.restart(l);
        put_switch(&api, "during", "held-during").await;
        c.wait_caught_up(l, Duration::from_secs(40)).await;
        wait_until("routing epoch 2 over three shards", deadline(Duration::from_secs(60)), async || {
            c.check_alive()?;
            let r = routes(&api, 3).await?;
            anyhow::ensure!(r.iter().all(|r| *r == json!([2, 3])), "routes {r:?}");
            Ok(())
        })
        .await;
        grown.store(true, Ordering::Relaxed);
        // The load goes on until the new shard has taken new tasks, and
        // earlier keys have been sent again under the new epoch.
        wait_until("new tasks in shard 3", deadline(Duration::from_secs(60)), async || {
            let log = acked.lock().unwrap();
            let in_third = log
                .iter()
                .filter(|a| a.after_growth && shard_of(a.id) == 3 && a.status == 201)
                .count();
            let resent = log
                .iter()
                .filter(|a| a.after_growth && a.status == 200)
                .count();
            anyhow::ensure!(in_third >= 20 && resent >= 20, "{in_third} new in shard 3, {resent} resent");
            Ok(())
        })
        .await;
        stop.store(true, Ordering::Relaxed);
        worker.await.expect("the load ran to its end");

        // The added shard holds the work both switches match.
        for (switch, cap) in [("before", "held-before"), ("during", "held-during")] {
            let key = (0..)
                .map(|k| format!("{switch}-{k}"))
                .find(|k| route("held", k, 3) == 3)
                .unwrap();
            let body = json!({ "tenant": "held", "payload": {}, "capabilities": [cap], "idempotency_key": key });
            let (status, task) = submit(&api, 0, &body).await;
            assert_eq!(status, 201, "{task}");
            let id = task["id"].as_u64().unwrap();
            assert_eq!(shard_of(id), 3, "{task}");
            wait_until("the added shard holds the switched work", deadline(Duration::from_secs(5)), async || {
                let t = api.get_ok(1, &format!("/api/v1/tasks/{id}")).await;
                anyhow::ensure!(t["waiting_for"] == format!("held by kill switch {switch}"), "{t}");
                Ok(())
            })
            .await;
        }
        let acked = acked.lock().unwrap().clone();

        // Every key names one task; every session is in one shard.
        let mut by_key: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
        let mut sessions: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
        for a in &acked {
            by_key.entry(&a.key).or_default().insert(a.id);
            if let Some(s) = &a.session {
                sessions.entry(s).or_default().insert(shard_of(a.id));
            }
        }
        let split: Vec<_> = by_key.iter().filter(|(_, ids)| ids.len() > 1).collect();
        assert!(split.is_empty(), "keys naming several tasks: {split:?}");
        let split: Vec<_> = sessions.iter().filter(|(_, s)| s.len() > 1).collect();
        assert!(split.is_empty(), "sessions in several shards: {split:?}");

        // The lookback was exercised: keys first taken by a shard the new
        // epoch no longer routes them to were found there again.
        let found_elsewhere = acked
            .iter()
            .filter(|a| a.after_growth && a.status == 200 && a.session.is_none())
            .filter(|a| route("grow", &a.key, 3) != shard_of(a.id))
            .count();
        assert!(found_elsewhere > 0, "no resubmission crossed epochs");

        // 0 lost, nothing extra: the merged list is exactly the acked ids.
        let acked_ids: BTreeSet<u64> = acked.iter().map(|a| a.id).collect();
        for i in 0..3 {
            let listed: BTreeSet<u64> = api
                .list_tasks(i, "tenant=grow")
                .await
                .iter()
                .map(|t| t["id"].as_u64().expect("id"))
                .collect();
            let lost: Vec<_> = acked_ids.difference(&listed).collect();
            let extra: Vec<_> = listed.difference(&acked_ids).collect();
            assert!(lost.is_empty(), "node index {i}: acknowledged but not listed: {lost:?}");
            assert!(extra.is_empty(), "node index {i}: listed but never acknowledged: {extra:?}");
        }
        // A backup of the grown cluster restores into a node configured
        // with the grown count: the same tasks, the same routing epochs,
        // and a moved key still found in its first shard.
        let dir = tempfile::tempdir().expect("backup dir");
        let file = dir.path().join("grown.backup");
        let url = format!("http://{}", c.node(1).api_addr);
        let out = cli(&["--api", &url, "backup", "--out", file.to_str().unwrap()]).await;
        assert!(out.status.success(), "godel backup: {out:?}");
        let restored = Cluster::start_prepared(1, "[cluster]\nshards = 3\n", |p| {
            let config = p.config_path().to_str().unwrap().to_owned();
            let out = std::process::Command::new(BIN)
                .env("GODEL_API_KEY", support::ADMIN_KEY)
                .args(["restore", file.to_str().unwrap(), "--config", &config])
                .output()
                .expect("run godel restore");
            assert!(out.status.success(), "godel restore: {out:?}");
        })
        .await;
        let rapi = restored.api();
        assert_eq!(rapi.cluster(0).await.unwrap()["routes"], json!([2, 3]));
        let listed: BTreeSet<u64> = rapi
            .list_tasks(0, "tenant=grow")
            .await
            .iter()
            .map(|t| t["id"].as_u64().expect("id"))
            .collect();
        assert_eq!(listed, acked_ids, "the restored node lists what the cluster acknowledged");
        let moved = acked
            .iter()
            .find(|a| a.session.is_none() && route("grow", &a.key, 3) != shard_of(a.id))
            .expect("a key the new epoch routes elsewhere");
        let body = json!({ "tenant": "grow", "payload": {}, "idempotency_key": moved.key });
        let (status, answer) = submit(&rapi, 0, &body).await;
        assert_eq!((status, answer["id"].as_u64()), (200, Some(moved.id)), "{answer}");

        let third: usize = acked_ids.iter().filter(|id| shard_of(**id) == 3).count();
        eprintln!(
            "[test] {} submissions, {} tasks ({third} in shard 3), {} sessions, {found_elsewhere} keys found in their first shard",
            acked.len(),
            acked_ids.len(),
            sessions.len()
        );
    })
    .await;
}
