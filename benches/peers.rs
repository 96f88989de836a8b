//! Godel measured the way `../shared/peers` measures NATS JetStream and
//! RabbitMQ quorum queues, so the figures compare like for like in one
//! sitting: N tasks of SIZE bytes, one publisher keeping WINDOW submissions
//! in flight, WORKERS workers each holding up to PREFETCH tasks at once.
//!
//! `cargo bench --bench peers -- [--phases enqueue,e2e] [-n 20000]
//! [--size 256] [--window 256] [--workers 8] [--prefetch 16] [--batch 1]
//! [--worker agent|http] [--publish follower|leader|all] [--runs 1]
//! [--nodes 3] [--depth 100000] [--settle 0]`
//!
//! - `enqueue`: publish N with no worker; tasks acknowledged per second
//!   (first send to last acknowledgement) and the acknowledgement latency
//!   of each request (queueing inside the window included).
//! - `e2e`: publish N while the workers run; tasks per second from the
//!   first send to the last completion, and submit-to-completion latency.
//! - `depth`: park DEPTH tasks in the queue (`--depth`, default 100,000;
//!   a capability no agent has, submitted in batches of 1,000), then
//!   dispatch latency (submission to attempt start) of 500 tasks submitted
//!   at 100/s that the agents can run; each node's resident memory; and
//!   the time from a follower's kill -9 and restart until it serves a
//!   linearizable read of the whole depth. With `--settle S`, the
//!   restarted node's resident memory is then read every second for S
//!   seconds (a snapshot build may start right after a restart): the
//!   most seen and the last.
//!
//! Each phase runs on a fresh three-node cluster (fsync before every
//! acknowledgement, as always). Workers are `agent` (default): WORKERS
//! agents of capacity PREFETCH on zero-latency `sim` gateways, driven by
//! Godel itself; or `http`: WORKERS external workers, each leasing up to
//! PREFETCH tasks per `POST /leases` and reporting them in one `POST
//! /leases:batch`. `--batch B` publishes B tasks per `POST /tasks:batch`
//! (WINDOW / B requests in flight) instead of one per `POST /tasks`. The
//! publisher sends to one follower by default, as the peers' publisher
//! starts on a node other than the queue leader's. Tasks cycle through the
//! four priorities (the peers have none). CPU is the three node processes'
//! user + system time over the phase, per task.
//!
//! Prints one JSON line per phase (last on stdout) besides a readable line.
//! Figures go to BENCHMARKS.md by hand. Not a test: it asserts nothing
//! about speed.

#[allow(dead_code)]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::conn::Conn;
use common::support::Cluster;
use common::{hist, runtime_toml, sim_agents, wall_us};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

#[derive(Clone)]
struct Opts {
    phases: Vec<String>,
    n: u64,
    size: usize,
    window: usize,
    workers: usize,
    prefetch: u32,
    batch: usize,
    worker: String,
    publish: String,
    runs: usize,
    nodes: usize,
    depth: u64,
    settle: u64,
}

fn opts() -> Opts {
    let mut o = Opts {
        phases: vec!["enqueue".into(), "e2e".into()],
        n: 20_000,
        size: 256,
        window: 256,
        workers: 8,
        prefetch: 16,
        batch: 1,
        worker: "agent".into(),
        publish: "follower".into(),
        runs: 1,
        nodes: 3,
        depth: 100_000,
        settle: 0,
    };
    let mut it = common::args().into_iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--phases" => o.phases = val().split(',').map(str::to_owned).collect(),
            "-n" | "--tasks" => o.n = val().parse().expect("-n N"),
            "--size" => o.size = val().parse().expect("--size BYTES"),
            "--window" => o.window = val().parse().expect("--window W"),
            "--workers" => o.workers = val().parse().expect("--workers W"),
            "--prefetch" => o.prefetch = val().parse().expect("--prefetch P"),
            "--batch" => o.batch = val().parse().expect("--batch B"),
            "--worker" => o.worker = val(),
            "--publish" => o.publish = val(),
            "--runs" => o.runs = val().parse().expect("--runs R"),
            "--nodes" => o.nodes = val().parse().expect("--nodes N"),
            "--depth" => o.depth = val().parse().expect("--depth D"),
            "--settle" => o.settle = val().parse().expect("--settle SECONDS"),
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(o.batch >= 1 && o.batch <= 1000, "--batch 1..=1000");
    assert!(
        matches!(o.worker.as_str(), "agent" | "http"),
        "--worker agent|http"
    );
    o
}

/// Task `i` as JSON bytes: its payload's JSON text is `size` bytes (at
/// least what the id and the send time take), the priority cycles.
fn task_json(i: u64, size: usize) -> Value {
    let p = ["critical", "high", "medium", "low"][(i % 4) as usize];
    let head = format!("{{\"n\":{i},\"t\":{},\"pad\":\"\"}}", wall_us());
    let pad = "x".repeat(size.saturating_sub(head.len()));
    json!({ "payload": { "n": i, "t": wall_us(), "pad": pad }, "priority": p, "idempotency_key": format!("p{i}") })
}

/// The node the publisher sends to, by `--publish`, for its `k`-th
/// connection.
fn publish_node(c: &Cluster, o: &Opts, leader: usize, k: usize) -> usize {
    match o.publish.as_str() {
        "leader" => leader,
        "all" => k % c.len(),
        _ => (leader + 1) % c.len(),
    }
}

/// Publishes tasks `0..n` with `window` tasks in flight; returns the
/// acknowledgement latency per request and when the last was acknowledged.
async fn publish(c: &Cluster, o: &Opts, leader: usize) -> (Histogram<u64>, Instant) {
    let next = Arc::new(AtomicU64::new(0));
    let conns = (o.window / o.batch).max(1);
    let mut handles = Vec::new();
    for k in 0..conns {
        let addr = c.node(publish_node(c, o, leader, k)).api_addr;
        let (next, o) = (next.clone(), o.clone());
        handles.push(tokio::spawn(async move {
            let mut conn = Conn::new(addr, Duration::from_secs(10));
            let mut h = hist();
            loop {
                let from = next.fetch_add(o.batch as u64, Ordering::Relaxed);
                if from >= o.n {
                    return h;
                }
                let to = (from + o.batch as u64).min(o.n);
                let (path, body) = if o.batch == 1 {
                    ("/api/v1/tasks", task_json(from, o.size))
                } else {
                    let tasks: Vec<Value> = (from..to).map(|i| task_json(i, o.size)).collect();
                    ("/api/v1/tasks:batch", json!({ "tasks": tasks }))
                };
                let body = serde_json::to_vec(&body).expect("JSON");
                let t0 = Instant::now();
                // 429 and 503 are sent again, whole or per task in a batch
                // (idempotency keys make it safe).
                loop {
                    let (status, answer) = conn
                        .post_json(path, body.clone())
                        .await
                        .unwrap_or_else(|e| panic!("publish {from}: {e}"));
                    match status {
                        200 | 201 => {
                            if o.batch > 1 {
                                let v: Value = serde_json::from_slice(&answer).expect("batch JSON");
                                if v["failed"] != 0 {
                                    // Tasks refused for now (a leader that lost its
                                    // quorum for a moment, a full queue) are sent
                                    // again with the rest (which answer 200).
                                    let again = v["items"].as_array().is_some_and(|items| {
                                        items.iter().all(|i| {
                                            matches!(
                                                i["status"].as_u64(),
                                                Some(200 | 201 | 429 | 503)
                                            )
                                        })
                                    });
                                    assert!(again, "batch {from}: {v}");
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                    continue;
                                }
                            }
                            break;
                        }
                        429 | 503 => tokio::time::sleep(Duration::from_millis(20)).await,
                        s => panic!("publish {from}: {s} {}", String::from_utf8_lossy(&answer)),
                    }
                }
                h.saturating_record(t0.elapsed().as_micros() as u64);
            }
        }));
    }
    let mut total = hist();
    for h in handles {
        total.add(h.await.expect("publisher")).expect("same bounds");
    }
    (total, Instant::now())
}

/// External workers: each leases up to `prefetch` tasks and reports them
/// all in one call, until `n` tasks are done; returns when the last is.
async fn http_workers(c: &Cluster, o: &Opts) -> Instant {
    let done = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for w in 0..o.workers {
        let addr = c.node(w % c.len()).api_addr;
        let (done, o) = (done.clone(), o.clone());
        handles.push(tokio::spawn(async move {
            let mut conn = Conn::new(addr, Duration::from_secs(10));
            let lease = serde_json::to_vec(&json!({
                "agent_id": format!("w{w}"), "capabilities": [], "max": o.prefetch, "lease_ms": 60_000
            }))
            .expect("JSON");
            while done.load(Ordering::Relaxed) < o.n {
                let (status, answer) = conn.post_json("/api/v1/leases", lease.clone()).await.expect("lease");
                if status != 200 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                let v: Value = serde_json::from_slice(&answer).expect("lease JSON");
                let leases = v["leases"].as_array().cloned().unwrap_or_default();
                if leases.is_empty() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
                let results: Vec<Value> = leases
                    .iter()
                    .map(|l| json!({ "fencing_token": l["fencing_token"], "result": { "ok": true } }))
                    .collect();
                let body = serde_json::to_vec(&json!({ "results": results })).expect("JSON");
                loop {
                    let (status, answer) = conn.post_json("/api/v1/leases:batch", body.clone()).await.expect("report");
                    match status {
                        200 => {
                            let v: Value = serde_json::from_slice(&answer).expect("report JSON");
                            done.fetch_add(v["done"].as_u64().unwrap_or(0), Ordering::Relaxed);
                            break;
                        }
                        429 | 503 => tokio::time::sleep(Duration::from_millis(20)).await,
                        s => panic!("report: {s} {}", String::from_utf8_lossy(&answer)),
                    }
                }
            }
        }));
    }
    for h in handles {
        h.await.expect("worker");
    }
    Instant::now()
}

fn nodes_cpu(c: &Cluster) -> f64 {
    (0..c.len())
        .map(|i| common::cpu_secs(c.node(i).pid().unwrap_or(0)))
        .sum()
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

async fn phase(o: &Opts, name: &str, run: usize) {
    let c = Cluster::start_with(o.nodes, &runtime_toml()).await;
    let leader = c.leader().await;
    let e2e = name == "e2e";
    if e2e && o.worker == "agent" {
        sim_agents(&c, c.len(), o.workers, o.prefetch, "").await;
    }
    let load0 = common::load_average();
    let cpu0 = nodes_cpu(&c);
    let start = Instant::now();
    let workers = if e2e && o.worker == "http" {
        let (c2, o2) = (&c, o.clone());
        Some(async move { http_workers(c2, &o2).await })
    } else {
        None
    };
    let (acks, last_ack, last_done) = match workers {
        Some(w) => {
            let ((acks, last_ack), last_done) = tokio::join!(publish(&c, o, leader), w);
            (acks, last_ack, Some(last_done))
        }
        None => {
            let (acks, last_ack) = publish(&c, o, leader).await;
            let last_done = if e2e {
                common::wait_completed(&c, o.n, Duration::from_secs(600)).await;
                Some(Instant::now())
            } else {
                None
            };
            (acks, last_ack, last_done)
        }
    };
    let cpu = nodes_cpu(&c) - cpu0;
    let end = last_done.unwrap_or(last_ack);
    let secs = end.duration_since(start).as_secs_f64();
    let mut line = json!({
        "phase": name, "run": run, "n": o.n, "size": o.size, "window": o.window,
        "workers": o.workers, "prefetch": o.prefetch, "batch": o.batch, "worker": o.worker,
        "publish": o.publish, "nodes": o.nodes,
        "tasks_per_s": (o.n as f64 / secs).round(),
        "ack_tasks_per_s": (o.n as f64 / last_ack.duration_since(start).as_secs_f64()).round(),
        "ack_p50_ms": ms(acks.value_at_quantile(0.5)),
        "ack_p99_ms": ms(acks.value_at_quantile(0.99)),
        "server_cpu_us_per_task": (cpu * 1e6 / o.n as f64).round(),
        "server_cores": cpu / secs,
        "load_average_before": load0,
    });
    if e2e {
        let mut lat = hist();
        for d in common::completed_tasks(&c).await {
            lat.saturating_record(d.completed_ms.saturating_sub(d.created_ms) * 1000);
        }
        line["e2e_p50_ms"] = json!(ms(lat.value_at_quantile(0.5)));
        line["e2e_p99_ms"] = json!(ms(lat.value_at_quantile(0.99)));
    }
    let b = common::batching(&c).await;
    line["leader_entries"] = json!(b.entries);
    line["commands_per_entry"] = json!((b.commands_per_entry * 10.0).round() / 10.0);
    eprintln!(
        "{name} run {run}: {:.0} tasks/s, acks p50 {:.1} ms p99 {:.1} ms, {} us CPU per task, {:.1} commands per entry",
        line["tasks_per_s"].as_f64().unwrap_or(0.0),
        line["ack_p50_ms"].as_f64().unwrap_or(0.0),
        line["ack_p99_ms"].as_f64().unwrap_or(0.0),
        line["server_cpu_us_per_task"],
        b.commands_per_entry,
    );
    println!("{line}");
}

/// Parks `o.depth` tasks no agent can run, then measures dispatch, memory
/// and a follower's restart at that depth.
async fn depth(o: &Opts, run: usize) {
    let mut c = Cluster::start_with(o.nodes, &runtime_toml()).await;
    let leader = c.leader().await;
    sim_agents(&c, c.len(), o.workers, o.prefetch, "").await;
    let load0 = common::load_average();
    // Preload: batches of 1,000 from 4 connections, spread over the nodes.
    let start = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for k in 0..4 {
        let addr = c.node(k % c.len()).api_addr;
        let (next, total, size) = (next.clone(), o.depth, o.size);
        handles.push(tokio::spawn(async move {
            let mut conn = Conn::new(addr, Duration::from_secs(30));
            loop {
                let from = next.fetch_add(1000, Ordering::Relaxed);
                if from >= total {
                    return;
                }
                let tasks: Vec<Value> = (from..(from + 1000).min(total))
                    .map(|i| {
                        let mut t = task_json(i, size);
                        t["capabilities"] = json!(["parked"]);
                        t
                    })
                    .collect();
                let body = serde_json::to_vec(&json!({ "tasks": tasks })).expect("JSON");
                loop {
                    let (status, answer) = conn
                        .post_json("/api/v1/tasks:batch", body.clone())
                        .await
                        .unwrap_or_else(|e| panic!("preload {from}: {e}"));
                    match status {
                        200 => break,
                        429 | 503 => tokio::time::sleep(Duration::from_millis(50)).await,
                        s => panic!("preload {from}: {s} {}", String::from_utf8_lossy(&answer)),
                    }
                }
            }
        }));
    }
    for h in handles {
        h.await.expect("preload");
    }
    let preload_s = start.elapsed().as_secs_f64();
    let rss: Vec<f64> = (0..c.len())
        .map(|i| common::rss_mib(c.node(i).pid().unwrap_or(0)))
        .collect();
    // The most each node had resident, snapshots during the preload included.
    let peak: Vec<f64> = (0..c.len())
        .map(|i| common::peak_rss_mib(c.node(i).pid().unwrap_or(0)).round())
        .collect();
    // Dispatch at 100/s with the queue that deep.
    let addr = c.node((leader + 1) % c.len()).api_addr;
    let mut conn = Conn::new(addr, Duration::from_secs(10));
    let probe = 500u64;
    let mut resent = 0;
    for i in 0..probe {
        let t0 = Instant::now();
        let body = serde_json::to_vec(&task_json(o.depth + i, o.size)).expect("JSON");
        // A 503 (a leader change) is sent again: the key makes it safe.
        loop {
            let (status, answer) = conn
                .post_json("/api/v1/tasks", body.clone())
                .await
                .expect("probe");
            match status {
                200 | 201 => break,
                429 | 503 => {
                    resent += 1;
                    eprintln!("  probe {i}: {status} {}", String::from_utf8_lossy(&answer));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                s => panic!("probe {i}: {s} {}", String::from_utf8_lossy(&answer)),
            }
        }
        tokio::time::sleep(Duration::from_millis(10).saturating_sub(t0.elapsed())).await;
    }
    common::wait_completed(&c, probe, Duration::from_secs(60)).await;
    let mut dispatch = hist();
    for d in common::completed_tasks(&c).await {
        dispatch.saturating_record(d.started_us.saturating_sub(d.created_ms * 1000));
    }
    // A follower killed and restarted with the queue that deep.
    let victim = (leader + 1) % c.len();
    c.kill9(victim);
    let t0 = Instant::now();
    c.restart(victim);
    let api = c.api();
    let restart_s = loop {
        if let Ok(r) = api.get(victim, "/api/v1/queue/depth").await
            && r.status == 200
            && r.body["pending"].as_u64() == Some(o.depth)
        {
            break t0.elapsed().as_secs_f64();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no restart within 300 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // What the restarted node keeps resident once it has settled.
    let victim_pid = c.node(victim).pid().unwrap_or(0);
    let restarted_rss = common::rss_mib(victim_pid);
    let (mut settle_max, mut settled) = (restarted_rss, restarted_rss);
    for _ in 0..o.settle {
        tokio::time::sleep(Duration::from_secs(1)).await;
        settled = common::rss_mib(victim_pid);
        settle_max = f64::max(settle_max, settled);
    }
    let line = json!({
        "phase": "depth", "run": run, "depth": o.depth, "size": o.size, "nodes": o.nodes,
        "preload_s": preload_s, "preload_tasks_per_s": (o.depth as f64 / preload_s).round(),
        "dispatch_p50_ms": ms(dispatch.value_at_quantile(0.5)),
        "dispatch_p99_ms": ms(dispatch.value_at_quantile(0.99)),
        "rss_mib": rss.iter().map(|r| r.round()).collect::<Vec<_>>(),
        "peak_rss_mib": peak,
        "restart_serving_s": restart_s,
        "probe_resent": resent,
        "restarted_rss_mib": restarted_rss.round(),
        "restarted_peak_rss_mib": common::peak_rss_mib(victim_pid).round(),
        "settle_s": o.settle,
        "settle_max_rss_mib": settle_max.round(),
        "settled_rss_mib": settled.round(),
        "load_average_before": load0,
    });
    eprintln!(
        "depth {} run {run}: dispatch p50 {:.2} ms p99 {:.2} ms, RSS {:?} MiB, restart {:.2} s",
        o.depth,
        ms(dispatch.value_at_quantile(0.5)),
        ms(dispatch.value_at_quantile(0.99)),
        line["rss_mib"],
        restart_s
    );
    println!("{line}");
}

#[tokio::main]
async fn main() {
    let o = opts();
    for run in 1..=o.runs {
        for name in &o.phases {
            match name.as_str() {
                "enqueue" | "e2e" => phase(&o, name, run).await,
                "depth" => depth(&o, run).await,
                other => panic!("unknown phase {other} (enqueue, e2e, depth)"),
            }
        }
    }
}
