//! Cluster benchmarks against real `godel` processes on 127.0.0.1: replicated
//! submit throughput and latency, a lone client's latency, lease+complete
//! throughput, and time from a leader kill to the first successful write.
//!
//! `cargo bench --bench cluster -- <submit|lone|lease|failover|all> [--nodes N]
//! [--clients C] [--secs S]`. Figures go to BENCHMARKS.md by hand, with the
//! command, machine and date. Not a test: it asserts nothing about speed.

#[path = "../tests/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};
use support::Cluster;

struct Opts {
    what: String,
    nodes: usize,
    clients: usize,
    secs: u64,
}

fn opts() -> Opts {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mut o = Opts {
        what: "all".into(),
        nodes: 3,
        clients: 64,
        secs: 10,
    };
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().expect("flag needs a value");
        match a.as_str() {
            "--nodes" => o.nodes = val().parse().expect("--nodes N"),
            "--clients" => o.clients = val().parse().expect("--clients C"),
            "--secs" => o.secs = val().parse().expect("--secs S"),
            w => o.what = w.to_owned(),
        }
    }
    o
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(1024)
        .build()
        .expect("http client")
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

fn report(name: &str, h: &Histogram<u64>, ops: u64, elapsed: Duration) {
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{name}: {ops} ops in {:.1}s = {:.0} ops/s; latency ms p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}",
        elapsed.as_secs_f64(),
        ops as f64 / elapsed.as_secs_f64(),
        us(0.5),
        us(0.9),
        us(0.99),
        us(0.999),
        h.max() as f64 / 1000.0
    );
}

fn task(i: u64) -> Value {
    let p = ["critical", "high", "medium", "low"][(i % 4) as usize];
    json!({ "payload": { "n": i, "prompt": "benchmark task" }, "priority": p, "tenant": format!("t{}", i % 8) })
}

/// Closed loop: `clients` tasks each submit as fast as answers come back,
/// spread over all nodes' APIs (followers forward to the leader).
async fn submit(c: &Cluster, clients: usize, secs: u64) {
    let http = client();
    let addrs: Arc<Vec<String>> = Arc::new(
        (0..c.len())
            .map(|i| format!("http://{}/api/v1/tasks", c.node(i).api_addr))
            .collect(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut handles = Vec::new();
    for w in 0..clients {
        let (http, addrs, stop, errors) =
            (http.clone(), addrs.clone(), stop.clone(), errors.clone());
        handles.push(tokio::spawn(async move {
            let mut h = hist();
            let mut i = w as u64;
            while !stop.load(Ordering::Relaxed) {
                let url = &addrs[(i as usize) % addrs.len()];
                let t0 = Instant::now();
                match http.post(url).json(&task(i)).send().await {
                    Ok(r) if r.status().as_u16() == 201 => {
                        h.saturating_record(t0.elapsed().as_micros() as u64)
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                i += clients as u64;
            }
            h
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = hist();
    for h in handles {
        total
            .add(h.await.expect("client task"))
            .expect("same bounds");
    }
    let elapsed = start.elapsed();
    report(
        &format!("submit nodes={} clients={clients}", c.len()),
        &total,
        total.len(),
        elapsed,
    );
    println!("  errors: {}", errors.load(Ordering::Relaxed));
    print_batching(c).await;
}

/// The leader's own account of batching: entries proposed, commands per entry.
async fn print_batching(c: &Cluster) {
    let leader = c.leader().await;
    let text = client()
        .get(format!("http://{}/metrics", c.node(leader).api_addr))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let entries = value("godel_raft_batch_commands_count");
    let commands = value("godel_raft_batch_commands_sum");
    let commit = value("godel_raft_commit_seconds_sum");
    println!(
        "  leader: {entries:.0} Raft entries, {:.1} commands per entry, {:.2} ms mean proposal-to-applied",
        commands / entries.max(1.0),
        1000.0 * commit / entries.max(1.0)
    );
}

/// One client, one request at a time, to the leader.
async fn lone(c: &Cluster, n: u64) {
    let http = client();
    let leader = c.leader().await;
    let url = format!("http://{}/api/v1/tasks", c.node(leader).api_addr);
    let mut h = hist();
    let start = Instant::now();
    for i in 0..n {
        let t0 = Instant::now();
        let r = http.post(&url).json(&task(i)).send().await.expect("submit");
        assert_eq!(r.status().as_u16(), 201);
        h.saturating_record(t0.elapsed().as_micros() as u64);
    }
    report(
        &format!("lone submit nodes={}", c.len()),
        &h,
        n,
        start.elapsed(),
    );
}

/// Workers lease up to 10 tasks at a time and complete each one.
async fn lease_complete(c: &Cluster, clients: usize, tasks: u64) {
    let http = client();
    let base: Vec<String> = (0..c.len())
        .map(|i| format!("http://{}/api/v1", c.node(i).api_addr))
        .collect();
    for chunk in (0..tasks).collect::<Vec<_>>().chunks(256) {
        let futs = chunk.iter().map(|i| {
            http.post(format!("{}/tasks", base[0]))
                .json(&task(*i))
                .send()
        });
        for r in futures_join(futs).await {
            assert_eq!(r.expect("preload").status().as_u16(), 201);
        }
    }
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut handles = Vec::new();
    for w in 0..clients {
        let (http, base, done) = (http.clone(), base.clone(), done.clone());
        handles.push(tokio::spawn(async move {
            let url = &base[w % base.len()];
            let mut h = hist();
            loop {
                let r: Value = http
                    .post(format!("{url}/leases"))
                    .json(&json!({"agent_id": format!("w{w}"), "capabilities": [], "max": 10}))
                    .send()
                    .await
                    .expect("lease")
                    .json()
                    .await
                    .expect("lease json");
                let leases = r["leases"].as_array().cloned().unwrap_or_default();
                if leases.is_empty() {
                    return h;
                }
                for l in leases {
                    let t0 = Instant::now();
                    let token = &l["fencing_token"];
                    let resp = http
                        .post(format!("{url}/leases/{token}/complete"))
                        .json(&json!({"result": {"ok": true}}))
                        .send()
                        .await
                        .expect("complete");
                    assert_eq!(resp.status().as_u16(), 200);
                    h.saturating_record(t0.elapsed().as_micros() as u64);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let mut total = hist();
    for h in handles {
        total.add(h.await.expect("worker")).expect("same bounds");
    }
    report(
        &format!(
            "lease+complete nodes={} workers={clients} (latency: complete)",
            c.len()
        ),
        &total,
        done.load(Ordering::Relaxed),
        start.elapsed(),
    );
}

async fn futures_join<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futs {
        set.push(f);
    }
    let mut out = Vec::with_capacity(set.len());
    for f in set {
        out.push(f.await);
    }
    out
}

/// Kill -9 the leader `rounds` times; time from the kill to the first 201
/// from a survivor (clients retry at once on any error).
async fn failover(c: &mut Cluster, rounds: usize, pause: bool) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .expect("client");
    let mut times = Vec::new();
    for round in 0..rounds {
        let leader = c.leader().await;
        let survivor = (leader + 1) % c.len();
        let url = format!("http://{}/api/v1/tasks", c.node(survivor).api_addr);
        let r = http
            .post(&url)
            .json(&task(round as u64))
            .send()
            .await
            .expect("warm-up submit");
        assert_eq!(r.status().as_u16(), 201);
        let t0 = Instant::now();
        if pause {
            c.pause(leader);
        } else {
            c.kill9(leader);
        }
        loop {
            if let Ok(r) = http.post(&url).json(&task(round as u64)).send().await
                && r.status().as_u16() == 201
            {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "no write within 30 s of the kill"
            );
        }
        let took = t0.elapsed();
        let how = if pause { "SIGSTOP" } else { "kill -9" };
        println!(
            "  round {round}: first write {:.0} ms after {how} of node {}",
            took.as_secs_f64() * 1000.0,
            leader + 1
        );
        times.push(took);
        if pause {
            c.resume(leader);
        } else {
            c.restart(leader);
        }
        c.wait_caught_up(leader, Duration::from_secs(30)).await;
    }
    times.sort();
    let ms: Vec<f64> = times.iter().map(|t| t.as_secs_f64() * 1000.0).collect();
    let how = if pause { "SIGSTOP" } else { "kill -9" };
    println!(
        "failover ({how}): median {:.0} ms, min {:.0} ms, max {:.0} ms over {rounds} rounds",
        ms[ms.len() / 2],
        ms[0],
        ms[ms.len() - 1]
    );
}

/// Resident memory of a process, in MiB (Linux).
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

/// Fills the queue with `n` tasks, reports each node's resident memory, then
/// kills -9 a follower, restarts it and times until it serves reads again.
async fn capacity(c: &mut Cluster, clients: usize, n: u64) {
    let http = client();
    let urls: Arc<Vec<String>> = Arc::new(
        (0..c.len())
            .map(|i| format!("http://{}/api/v1/tasks", c.node(i).api_addr))
            .collect(),
    );
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..clients {
        let (http, urls, next) = (http.clone(), urls.clone(), next.clone());
        handles.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                loop {
                    match http
                        .post(&urls[(i as usize) % urls.len()])
                        .json(&task(i))
                        .send()
                        .await
                    {
                        Ok(r) if r.status().as_u16() == 201 => break,
                        _ => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            }
        }));
    }
    for h in handles {
        h.await.expect("submitter");
    }
    println!(
        "capacity: {n} tasks submitted in {:.1}s",
        start.elapsed().as_secs_f64()
    );
    for i in 0..c.len() {
        println!(
            "  node {} resident: {:.0} MiB",
            i + 1,
            rss_mib(c.node(i).pid().unwrap_or(0))
        );
    }
    let leader = c.leader().await;
    let victim = (leader + 1) % c.len();
    c.kill9(victim);
    let t0 = Instant::now();
    c.restart(victim);
    let depth_url = format!("http://{}/api/v1/queue/depth", c.node(victim).api_addr);
    loop {
        if let Ok(r) = http.get(&depth_url).send().await
            && r.status().as_u16() == 200
            && let Ok(v) = r.json::<Value>().await
            && v["pending"].as_u64() == Some(n)
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "restarted node did not serve within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "  node {} restarted (kill -9) and serving a linearizable depth of {n} after {:.2}s; resident {:.0} MiB",
        victim + 1,
        t0.elapsed().as_secs_f64(),
        rss_mib(c.node(victim).pid().unwrap_or(0))
    );
}

#[tokio::main]
async fn main() {
    let o = opts();
    let all = o.what == "all";
    let mut c = Cluster::start(o.nodes).await;
    c.leader().await;
    if all || o.what == "lone" {
        lone(&c, 2000).await;
    }
    if all || o.what == "submit" {
        submit(&c, o.clients, o.secs).await;
    }
    if all || o.what == "lease" {
        lease_complete(&c, o.clients.min(32), 20_000).await;
    }
    if o.what == "capacity" {
        capacity(&mut c, o.clients, 1_000_000).await;
    }
    if (all || o.what == "failover") && o.nodes >= 3 {
        failover(&mut c, 10, false).await;
    }
    if (all || o.what == "pause") && o.nodes >= 3 {
        failover(&mut c, 10, true).await;
    }
}
