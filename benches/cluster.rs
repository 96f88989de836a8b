//! Cluster benchmarks against real `godel` processes on 127.0.0.1: replicated
//! submit throughput and latency, a lone client's latency, lease+complete
//! throughput, and time from a leader kill to the first successful write.
//!
//! `cargo bench --bench cluster -- <submit|lone|lease|failover|all> [--nodes N]
//! [--clients C] [--secs S]`; `e2e` and `events` (the event stream under the
//! 100-session load) also take `[--tasks T]` (default 20,000). Figures go to BENCHMARKS.md by hand, with the
//! command, machine and date. Not a test: it asserts nothing about speed.

#[allow(dead_code)]
mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::conn::Conn;
use common::support::Cluster;
use common::{
    client, completed_tasks, hist, report, runtime_toml, sim_fleet, task, task_body, wait_completed,
};
use serde_json::{Value, json};

struct Opts {
    what: String,
    nodes: usize,
    clients: usize,
    secs: u64,
    tasks: u64,
}

fn opts() -> Opts {
    let args = common::args();
    let mut o = Opts {
        what: "all".into(),
        nodes: 3,
        clients: 64,
        secs: 10,
        tasks: 20_000,
    };
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().expect("flag needs a value");
        match a.as_str() {
            "--nodes" => o.nodes = val().parse().expect("--nodes N"),
            "--clients" => o.clients = val().parse().expect("--clients C"),
            "--secs" => o.secs = val().parse().expect("--secs S"),
            "--tasks" => o.tasks = val().parse().expect("--tasks T"),
            w => o.what = w.to_owned(),
        }
    }
    o
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
    common::print_batching(c).await;
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
        .default_headers(common::support::auth_headers())
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
        // Refused attempts, and when the last refused one was sent: the
        // first write's own round trip is the time after it.
        let (mut refused, mut last_refused) = (0u32, Duration::ZERO);
        loop {
            let sent = t0.elapsed();
            if let Ok(r) = http.post(&url).json(&task(round as u64)).send().await
                && r.status().as_u16() == 201
            {
                break;
            }
            refused += 1;
            last_refused = sent;
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "no write within 30 s of the kill"
            );
        }
        let took = t0.elapsed();
        let how = if pause { "SIGSTOP" } else { "kill -9" };
        println!(
            "  round {round}: first write {:.0} ms after {how} of node {} ({refused} refused before it, the last sent at {} ms)",
            took.as_secs_f64() * 1000.0,
            leader + 1,
            last_refused.as_millis()
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
            common::rss_mib(c.node(i).pid().unwrap_or(0))
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
        common::rss_mib(c.node(victim).pid().unwrap_or(0))
    );
}

/// Submits tasks `from..from + tasks` from `clients` closed-loop clients,
/// each on its own keep-alive connection, spread over the nodes; returns
/// when all are acknowledged (not completed).
async fn burst(c: &Cluster, clients: usize, from: u64, tasks: u64) -> Duration {
    let next = Arc::new(AtomicU64::new(from));
    let start = Instant::now();
    let mut handles = Vec::new();
    for w in 0..clients {
        // Each client on its own keep-alive connection (`common::conn`).
        let addr = c.node(w % c.len()).api_addr;
        let next = next.clone();
        handles.push(tokio::spawn(async move {
            let mut conn = Conn::new(addr, Duration::from_secs(5));
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= from + tasks {
                    return;
                }
                // A 503 (leader change, write timeout) or 429 is retried
                // with the same idempotency key, as a client should.
                let key = format!("e2e-{i}");
                loop {
                    let (status, body) = conn
                        .post_json("/api/v1/tasks", task_body(i, Some(&key)))
                        .await
                        .unwrap_or_else(|e| panic!("submit {i}: {e}"));
                    match status {
                        201 | 200 => break,
                        429 | 503 => {
                            eprintln!("  submit {i}: {status} (retrying)");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        s => panic!("submit {i}: {s} {}", String::from_utf8_lossy(&body)),
                    }
                }
            }
        }));
    }
    for h in handles {
        h.await.expect("client");
    }
    start.elapsed()
}

/// Submit-to-completion with `sessions` concurrent attempts on zero-latency
/// `sim` gateways: throughput and latency under a burst of `tasks`, then
/// dispatch latency (submission to attempt start) at a low rate.
async fn e2e(nodes: usize, sessions: usize, clients: usize, tasks: u64) {
    let c = Cluster::start_with(nodes, &runtime_toml()).await;
    sim_fleet(&c, 3, sessions, "").await;
    let http = client();
    let base: Vec<String> = (0..c.len())
        .map(|i| format!("http://{}/api/v1/tasks", c.node(i).api_addr))
        .collect();
    let nodes_cpu = |c: &Cluster| -> f64 {
        (0..c.len())
            .map(|i| common::cpu_secs(c.node(i).pid().unwrap_or(0)))
            .sum()
    };
    let cpu0 = nodes_cpu(&c);
    let start = Instant::now();
    let submitted = burst(&c, clients, 0, tasks).await;
    wait_completed(&c, tasks, Duration::from_secs(300)).await;
    let elapsed = start.elapsed();
    let cpu = nodes_cpu(&c) - cpu0;
    let done = completed_tasks(&c).await;
    let mut e2e = hist();
    for d in &done {
        e2e.saturating_record(d.completed_ms.saturating_sub(d.created_ms) * 1000);
    }
    println!(
        "e2e nodes={nodes} sessions={sessions} clients={clients}: {tasks} tasks submitted in {:.2}s, all completed in {:.2}s = {:.0} tasks/s submit-to-completion; latency (leader clock, ms resolution) p50 {:.1} ms p99 {:.1} ms max {:.1} ms; CPU of the nodes {:.2} s = {:.0} us per task",
        submitted.as_secs_f64(),
        elapsed.as_secs_f64(),
        tasks as f64 / elapsed.as_secs_f64(),
        e2e.value_at_quantile(0.5) as f64 / 1000.0,
        e2e.value_at_quantile(0.99) as f64 / 1000.0,
        e2e.max() as f64 / 1000.0,
        cpu,
        cpu * 1e6 / tasks as f64,
    );
    // Not saturated: one client, 100 tasks/s.
    let low = 500u64;
    for i in 0..low {
        let t0 = Instant::now();
        let r = http
            .post(&base[(i as usize) % base.len()])
            .json(&task(tasks + i))
            .send()
            .await
            .expect("submit");
        assert_eq!(r.status().as_u16(), 201);
        tokio::time::sleep(Duration::from_millis(10).saturating_sub(t0.elapsed())).await;
    }
    wait_completed(&c, tasks + low, Duration::from_secs(60)).await;
    let mut dispatch = hist();
    let done = completed_tasks(&c).await;
    let mut lows: Vec<&common::Done> = done.iter().collect();
    lows.sort_by_key(|d| d.created_ms);
    for d in lows.iter().rev().take(low as usize) {
        dispatch.saturating_record(d.started_us.saturating_sub(d.created_ms * 1000));
    }
    println!(
        "  dispatch at 100 tasks/s (submission stamp to attempt start, ms stamp so +-1 ms): p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
        dispatch.value_at_quantile(0.5) as f64 / 1000.0,
        dispatch.value_at_quantile(0.99) as f64 / 1000.0,
        dispatch.max() as f64 / 1000.0,
    );
}

/// Kills (SIGKILL) the non-leader node owning the most gateways under a
/// steady load and reports how long until its gateways have new owners and
/// until tasks run again on them.
async fn replace(rounds: usize) {
    for round in 0..rounds {
        let mut c = Cluster::start_with(3, &runtime_toml()).await;
        // 200 ms attempts on 12 agents (60 tasks/s) under 150 tasks/s: every
        // agent is busy, so moved agents get work as soon as they are online.
        sim_fleet(&c, 6, 12, "200ms").await;
        let api = c.api();
        let leader = c.leader().await;
        let gws = api.get_ok(leader, "/api/v1/gateways").await;
        let mut owned: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for g in gws["items"].as_array().expect("items") {
            let owner = g["owner"].as_u64().expect("placed");
            owned
                .entry(owner)
                .or_default()
                .push(g["id"].as_str().expect("id").to_owned());
        }
        let leader_id = c.node(leader).id;
        let (victim_id, victim_gws) = owned
            .iter()
            .filter(|(n, _)| **n != leader_id)
            .max_by_key(|(_, g)| g.len())
            .map(|(n, g)| (*n, g.clone()))
            .expect("a follower owns a gateway");
        let victim = c.index_of(victim_id);
        let stop = Arc::new(AtomicBool::new(false));
        let load = {
            let (api, stop) = (c.api(), stop.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let _ = api.post(leader, "/api/v1/tasks", &task(i)).await;
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        let kill_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64;
        let t0 = Instant::now();
        let victim_agents: Vec<String> = (0..12)
            .filter(|a| victim_gws.contains(&format!("gw{}", a % 6)))
            .map(|a| format!("agent{a}"))
            .collect();
        // The tasks the killed node was running.
        let mut stranded = Vec::new();
        let mut priorities = Vec::new();
        for status in ["leased", "running"] {
            for t in api.list_tasks(leader, &format!("status={status}")).await {
                let agent = t["lease"]["agent_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                if victim_agents.contains(&agent) {
                    stranded.push(t["id"].as_u64().expect("id"));
                    priorities.push(t["priority"].as_str().unwrap_or("?").to_owned());
                }
            }
        }
        c.kill9(victim);
        let replaced = loop {
            let g = api.get_ok(leader, "/api/v1/gateways").await;
            let moved = g["items"]
                .as_array()
                .expect("items")
                .iter()
                .filter(|i| victim_gws.iter().any(|v| i["id"] == v.as_str()))
                .all(|i| i["owner"].as_u64().is_some_and(|o| o != victim_id));
            if moved {
                break t0.elapsed();
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "not re-placed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        // Tasks running again on a moved gateway: an attempt started after
        // the kill by one of its agents.
        let running = loop {
            let page = api.list_tasks(leader, "status=completed").await;
            let again = page.iter().any(|t| {
                victim_agents.iter().any(|a| t["agent_id"] == a.as_str())
                    && t["result"]["started_us"].as_u64().unwrap_or(0) / 1000 > kill_ms
            });
            if again {
                break t0.elapsed();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "moved gateways run nothing"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // Every task the dead node was running, completed elsewhere.
        let recovered = loop {
            let mut done = 0;
            for id in &stranded {
                let t = api.get_ok(leader, &format!("/api/v1/tasks/{id}")).await;
                if t["status"] == "completed" {
                    done += 1;
                }
            }
            if done == stranded.len() {
                break t0.elapsed();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "stranded tasks not completed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        stop.store(true, Ordering::Relaxed);
        let _ = load.await;
        println!(
            "replace round {round}: its {} running tasks (priorities {}) all completed elsewhere after {:.2}s",
            stranded.len(),
            priorities.join(","),
            recovered.as_secs_f64()
        );
        println!(
            "replace round {round}: killed node {victim_id} owning {} gateways; re-placed after {:.2}s, tasks completing on them again after {:.2}s",
            victim_gws.len(),
            replaced.as_secs_f64(),
            running.as_secs_f64()
        );
    }
}

/// The event stream under the 100-session load: `subscribers` clients on
/// `>` (everything), spread over the nodes, `stalled` of them connected but
/// never reading. Readers resume with `since` when told they lagged, as
/// `godel events` does. Reports throughput, events delivered, the time
/// from the leader stamping an entry to a reader receiving its event (the
/// same host clock), lag, and each node's memory with the stalled ones
/// still connected.
async fn events(nodes: usize, clients: usize, tasks: u64, subscribers: usize, stalled: usize) {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    struct Seen {
        delivered: u64,
        lagged: u64,
        latency: hdrhistogram::Histogram<u64>,
    }
    let c = Cluster::start_with(nodes, &runtime_toml()).await;
    sim_fleet(&c, 3, 100, "").await;
    let rss_idle: Vec<f64> = (0..c.len())
        .map(|i| common::rss_mib(c.node(i).pid().unwrap_or(0)))
        .collect();
    let request = |addr: std::net::SocketAddr, since: Option<u64>| {
        let q = since.map_or_else(String::new, |s| format!("&since={s}"));
        let mut req = format!("ws://{addr}/api/v1/events?subscribe=%3E{q}")
            .into_client_request()
            .expect("ws url");
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {}", common::support::ADMIN_KEY)
                .parse()
                .expect("header"),
        );
        req
    };
    let mut idle = Vec::new();
    for s in 0..stalled {
        let addr = c.node(s % c.len()).api_addr;
        let (ws, _) = tokio_tungstenite::connect_async(request(addr, None))
            .await
            .expect("connect");
        idle.push(ws);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(std::sync::Mutex::new(Seen {
        delivered: 0,
        lagged: 0,
        latency: hist(),
    }));
    let mut readers = Vec::new();
    for s in stalled..subscribers {
        let addr = c.node(s % c.len()).api_addr;
        let (stop, seen) = (stop.clone(), seen.clone());
        let (ws, _) = tokio_tungstenite::connect_async(request(addr, None))
            .await
            .expect("connect");
        readers.push(tokio::spawn(async move {
            let mut ws = ws;
            let mut last = None;
            let mut lat = hist();
            let (mut delivered, mut lagged) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let msg = tokio::time::timeout(Duration::from_millis(200), ws.next()).await;
                let Ok(Some(Ok(Message::Text(t)))) = msg else {
                    if matches!(msg, Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_))))) {
                        lagged += 1;
                        let (again, _) = tokio_tungstenite::connect_async(request(addr, last))
                            .await
                            .expect("reconnect");
                        ws = again;
                    }
                    continue;
                };
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("clock")
                    .as_millis() as u64;
                // Cheap field reads: this client shares the cores with the nodes.
                let field = |name: &str| {
                    t.find(name).and_then(|at| {
                        t[at + name.len()..]
                            .split(|ch: char| !ch.is_ascii_digit())
                            .next()
                            .and_then(|n| n.parse::<u64>().ok())
                    })
                };
                if let (Some(seq), Some(time)) = (field("\"seq\":"), field("\"time\":")) {
                    delivered += 1;
                    last = Some(seq);
                    lat.saturating_record(now.saturating_sub(time) * 1000);
                }
            }
            let mut s = seen.lock().expect("seen");
            s.delivered += delivered;
            s.lagged += lagged;
            s.latency.add(&lat).expect("hist");
        }));
    }
    let start = Instant::now();
    burst(&c, clients, 0, tasks).await;
    wait_completed(&c, tasks, Duration::from_secs(300)).await;
    let elapsed = start.elapsed();
    let rss_loaded: Vec<f64> = (0..c.len())
        .map(|i| common::rss_mib(c.node(i).pid().unwrap_or(0)))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.expect("reader");
    }
    let s = seen.lock().expect("seen");
    let readers_n = (subscribers - stalled).max(1) as f64;
    println!(
        "events nodes={nodes} subscribers={subscribers} (stalled {stalled}) clients={clients}: {tasks} tasks completed in {:.2}s = {:.0} tasks/s; {} events delivered = {:.0}/s in all, {:.0}/s per reader; entry stamped -> event received (ms resolution) p50 {:.1} ms p99 {:.1} ms max {:.1} ms; {} lagged reconnects",
        elapsed.as_secs_f64(),
        tasks as f64 / elapsed.as_secs_f64(),
        s.delivered,
        s.delivered as f64 / elapsed.as_secs_f64(),
        s.delivered as f64 / readers_n / elapsed.as_secs_f64(),
        s.latency.value_at_quantile(0.5) as f64 / 1000.0,
        s.latency.value_at_quantile(0.99) as f64 / 1000.0,
        s.latency.max() as f64 / 1000.0,
        s.lagged,
    );
    println!(
        "  resident MiB per node: idle {:?}, after the burst with {stalled} stalled subscribers {:?}",
        rss_idle.iter().map(|m| m.round()).collect::<Vec<_>>(),
        rss_loaded.iter().map(|m| m.round()).collect::<Vec<_>>(),
    );
    drop(idle);
}

#[tokio::main]
async fn main() {
    let o = opts();
    if o.what == "e2e" {
        // GODEL_BENCH_SESSIONS=10,25 runs only those profiles.
        let profiles: Vec<usize> = std::env::var("GODEL_BENCH_SESSIONS")
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().parse().expect("GODEL_BENCH_SESSIONS: numbers"))
                    .collect()
            })
            .unwrap_or_else(|_| vec![10, 25, 50, 100]);
        for sessions in profiles {
            e2e(o.nodes, sessions, o.clients, o.tasks).await;
        }
        return;
    }
    if o.what == "events" {
        // GODEL_BENCH_SUBSCRIBERS=3:0,100:10 (subscribers:stalled) picks profiles.
        let profiles: Vec<(usize, usize)> = std::env::var("GODEL_BENCH_SUBSCRIBERS")
            .unwrap_or_else(|_| "0:0,3:0,100:10".into())
            .split(',')
            .map(|p| {
                let (a, b) = p.split_once(':').expect("subscribers:stalled");
                (
                    a.trim().parse().expect("number"),
                    b.trim().parse().expect("number"),
                )
            })
            .collect();
        for (subscribers, stalled) in profiles {
            events(o.nodes, o.clients, o.tasks, subscribers, stalled).await;
        }
        return;
    }
    if o.what == "replace" {
        replace(5).await;
        return;
    }
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
