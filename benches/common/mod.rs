//! Helpers shared by the cluster benchmarks (`cluster.rs`, `load.rs`): the
//! test harness's `Cluster`, an HTTP client sized for many requests in
//! flight, latency histograms, the task bodies they submit, and a fleet of
//! `sim` gateways with the reads that tell when its tasks are done.
//!
//! Includers declare it `#[allow(dead_code)] mod common;`: each benchmark
//! uses a different subset.

#[path = "../../tests/support/mod.rs"]
#[allow(dead_code)]
pub mod support;

pub mod conn;

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};
use support::Cluster;

/// The command line after `cargo bench`'s own `--bench` flag.
pub fn args() -> Vec<String> {
    std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect()
}

/// An HTTP client for load: 5 s per request, many idle connections kept.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .default_headers(support::auth_headers())
        .timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(1024)
        .build()
        .expect("http client")
}

/// A latency histogram in µs, 1 µs to 60 s, 3 significant digits.
pub fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

/// Prints `ops` operations over `elapsed` and the percentiles of `h` (µs).
pub fn report(name: &str, h: &Histogram<u64>, ops: u64, elapsed: Duration) {
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

/// Task `i`'s submit body: four priorities and eight tenants in turn.
pub fn task(i: u64) -> Value {
    let p = ["critical", "high", "medium", "low"][(i % 4) as usize];
    json!({ "payload": { "n": i, "prompt": "benchmark task" }, "priority": p, "tenant": format!("t{}", i % 8) })
}

/// Task `i`'s submit body as JSON bytes (what [`task`] serializes to),
/// with an idempotency key if given.
pub fn task_body(i: u64, idempotency_key: Option<&str>) -> Vec<u8> {
    let mut body = task(i);
    if let Some(key) = idempotency_key {
        body["idempotency_key"] = json!(key);
    }
    serde_json::to_vec(&body).expect("a JSON value serializes")
}

/// Config for the runtime benchmarks: node liveness as in production, and
/// pages big enough to read every task back. `GODEL_BENCH_FABRIC=off` turns
/// the lease-hint fabric off, to compare; `GODEL_BENCH_SHARDS=N` runs the
/// queue in N shard groups.
pub fn runtime_toml() -> String {
    let mut t = RUNTIME_TOML.to_owned();
    // Proposals in flight at once (`queue.max_inflight_batches`, default 1).
    if let Ok(n) = std::env::var("GODEL_BENCH_INFLIGHT") {
        let n: usize = n.parse().expect("GODEL_BENCH_INFLIGHT is a number");
        t = t.replace(
            "[queue]\n",
            &format!("[queue]\nmax_inflight_batches = {n}\n"),
        );
    }
    // Who matches tasks to agents (`runtime.dispatch`: push or pull).
    if let Ok(mode) = std::env::var("GODEL_BENCH_DISPATCH") {
        t.push_str(&format!("[runtime]\ndispatch = {mode:?}\n"));
    }
    // Queue shards (`cluster.shards`; dispatch is then pull).
    if let Ok(n) = std::env::var("GODEL_BENCH_SHARDS") {
        let n: u32 = n.parse().expect("GODEL_BENCH_SHARDS is a number");
        t.push_str(&format!("[cluster]\nshards = {n}\n"));
    }
    if std::env::var("GODEL_BENCH_FABRIC").is_ok_and(|v| v == "off") {
        t.push_str("[fabric]\nenabled = false\n");
    }
    t
}

const RUNTIME_TOML: &str = "[queue]\nnode_heartbeat_interval = \"500ms\"\nnode_dead_after = \"2s\"\n[api]\nmax_page_size = 1000\n";

/// Registers `gateways` `sim` gateways (`latency` per attempt, "" for none)
/// and `sessions` agents of capacity 1 spread over them: `sessions`
/// attempts can run at once. Returns once every gateway is placed.
pub async fn sim_fleet(c: &Cluster, gateways: usize, sessions: usize, latency: &str) {
    sim_agents(c, gateways, sessions, 1, latency).await;
}

/// Registers `gateways` `sim` gateways and `agents` agents of `capacity`
/// each (leases an agent may hold at once: its prefetch window) spread
/// over them; returns once every gateway is placed.
pub async fn sim_agents(c: &Cluster, gateways: usize, agents: usize, capacity: u32, latency: &str) {
    let api = c.api();
    let leader = c.leader().await;
    for g in 0..gateways {
        let mut driver = json!({ "kind": "sim" });
        if !latency.is_empty() {
            driver["latency"] = json!({ "dist": "fixed", "value": latency });
        }
        let spec = json!({ "id": format!("gw{g}"), "region": "local", "max_sessions": 10_000, "driver": driver });
        let r = api
            .post(leader, "/api/v1/gateways", &spec)
            .await
            .expect("gateway");
        assert_eq!(r.status, 201, "{:?}", r.body);
    }
    for a in 0..agents {
        let body = json!({ "id": format!("agent{a}"), "gateway": format!("gw{}", a % gateways), "capacity": capacity });
        let r = api
            .post(leader, "/api/v1/agents", &body)
            .await
            .expect("agent");
        assert_eq!(r.status, 201, "{:?}", r.body);
    }
    // Every gateway placed before the clock starts.
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let g = api.get(leader, "/api/v1/gateways").await.expect("gateways");
        let items = g.body["items"].as_array().cloned().unwrap_or_default();
        if items.len() == gateways && items.iter().all(|i| !i["owner"].is_null()) {
            break;
        }
        assert!(Instant::now() < until, "gateways not placed: {}", g.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
}

/// An RFC 3339 timestamp of the API, in ms since the epoch.
pub fn rfc3339_ms(v: &Value) -> u64 {
    let s = v.as_str().expect("timestamp");
    let t = humantime::parse_rfc3339(s).expect("rfc3339");
    t.duration_since(std::time::UNIX_EPOCH)
        .expect("after epoch")
        .as_millis() as u64
}

/// A completed task as the benchmarks read it back.
pub struct Done {
    /// Task id.
    pub id: u64,
    /// Submission stamp (leader clock, ms).
    pub created_ms: u64,
    /// Completion stamp (leader clock, ms): the time of the batch that
    /// applied the completion, stamped when the leader proposed it.
    pub completed_ms: u64,
    /// Wall-clock start of the attempt on the agent's node, µs (`sim`
    /// gateways put it in their result; 0 for other drivers).
    pub started_us: u64,
}

/// Every completed task.
pub async fn completed_tasks(c: &Cluster) -> Vec<Done> {
    let api = c.api();
    api.list_tasks(0, "status=completed")
        .await
        .iter()
        .map(|t| Done {
            id: t["id"].as_u64().expect("id"),
            created_ms: rfc3339_ms(&t["created_at"]),
            completed_ms: rfc3339_ms(&t["updated_at"]),
            started_us: t["result"]["started_us"].as_u64().unwrap_or(0),
        })
        .collect()
}

/// Waits until at least `n` tasks are completed, at most `limit`; how long
/// it waited.
pub async fn wait_completed(c: &Cluster, n: u64, limit: Duration) -> Duration {
    match try_wait_completed(c, n, limit).await {
        Ok(waited) => waited,
        Err(done) => panic!("only {done} of {n} tasks completed within {limit:?}"),
    }
}

/// Like [`wait_completed`], but past `limit` returns `Err` with the number
/// completed so far instead of failing.
pub async fn try_wait_completed(c: &Cluster, n: u64, limit: Duration) -> Result<Duration, u64> {
    let api = c.api();
    let t0 = Instant::now();
    loop {
        let d = api.depth(0).await;
        let done = d["by_status"]["completed"].as_u64().unwrap_or(0);
        if done >= n {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() >= limit {
            return Err(done);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The leader's account of batching since it started.
pub struct Batching {
    /// Raft entries the leader proposed.
    pub entries: f64,
    /// Commands per entry, on average.
    pub commands_per_entry: f64,
    /// Mean time from proposal to applied, ms.
    pub commit_ms: f64,
}

/// Reads the leader's batching metrics.
pub async fn batching(c: &Cluster) -> Batching {
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
    Batching {
        entries,
        commands_per_entry: value("godel_raft_batch_commands_sum") / entries.max(1.0),
        commit_ms: 1000.0 * value("godel_raft_commit_seconds_sum") / entries.max(1.0),
    }
}

/// Prints the leader's entries proposed and commands per entry.
pub async fn print_batching(c: &Cluster) {
    let b = batching(c).await;
    println!(
        "  leader: {:.0} Raft entries, {:.1} commands per entry, {:.2} ms mean proposal-to-applied",
        b.entries, b.commands_per_entry, b.commit_ms
    );
}

/// Resident memory of a process, MiB (`VmRSS`); 0 if it is gone.
pub fn rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmRSS:")
}

/// The most memory a process has had resident since it started, in MiB
/// (`VmHWM`); 0 if it is gone.
pub fn peak_rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmHWM:")
}

fn status_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

/// CPU time (user + system) a process has used, in seconds; 0 if it is gone.
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    ticks as f64 / clock_ticks()
}

/// Time a process's threads spent runnable but waiting for a CPU, in
/// seconds (the second field of each `/proc/<pid>/task/<tid>/schedstat`;
/// threads that have exited no longer count).
pub fn runqueue_wait_secs(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    let ns: u64 = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    ns as f64 / 1e9
}

/// The machine's busy and total CPU time, in seconds over all cores (from
/// `/proc/stat`; idle and iowait count as not busy).
pub fn machine_cpu_secs() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let total: u64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    let t = clock_ticks();
    ((total - idle) as f64 / t, total as f64 / t)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// The 1-minute load average (`/proc/loadavg`).
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// Wall-clock time, µs since the epoch (comparable with `started_us` and
/// the API's stamps: every process runs on this machine).
pub fn wall_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after epoch")
        .as_micros() as u64
}
