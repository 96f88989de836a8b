//! The load generator: the PRD's load gates (10, 25, 50 and 100 concurrent
//! sessions) against a real 3-node cluster on 127.0.0.1, closed or open
//! loop, with latency percentiles from hdrhistogram.
//!
//! ```text
//! cargo bench --bench load -- --profile 25 --mode open --rate 3000 --secs 20
//! cargo bench --bench load -- --profile 25 --mode closed --clients 32 --secs 20
//! cargo bench --bench load -- --profile all --mode closed     # 10, 25, 50, 100 in turn
//! ```
//!
//! Each profile starts its own cluster (`tests/support`'s `Cluster`: real
//! `godel serve` processes, fsync before every acknowledgement, the
//! runtime benchmarks' config) with three zero-latency `sim` gateways and
//! as many agents of capacity 1 as the profile has sessions. Clients submit
//! tasks (four priorities, eight tenants) spread over the three nodes' APIs;
//! followers forward to the leader.
//!
//! - **closed loop** (`--clients C`): C clients, each sending its next
//!   submission when the last one is answered. Measures the most the
//!   cluster takes; latency is measured from the actual send. Each client
//!   keeps its own keep-alive connection to each node (`common::conn`).
//! - **open loop** (`--rate R`): submissions on a fixed schedule, R a
//!   second, whether or not earlier ones were answered (at most
//!   `--max-inflight` at once; past that, sends wait for a slot). Latency is
//!   measured from each submission's slot in the schedule, so a send that
//!   went out late because the cluster was slow counts against the cluster
//!   (no coordinated omission).
//!
//! Reported, for the submissions whose start falls in the measured window
//! (after `--warmup` seconds, for `--secs` seconds):
//!
//! - **submit**: start to the HTTP acknowledgement (201); also split by
//!   where it was sent: to the leader, or to a follower that forwards it.
//! - **dispatch**: start to the attempt starting on the agent's node (the
//!   `sim` result's `started_us`, wall clock in µs). This is submit, lease
//!   commit and the agent's node learning of the lease; the lease's own
//!   stamp is not kept on a completed task. Also from the task's submission
//!   stamp (`created_at`, leader clock in ms, so it reads up to 1 ms long)
//!   to the attempt's start: dispatch without the HTTP path.
//! - **end to end**: start to the completion stamp of the task (the leader's
//!   clock, in ms, stamped when it proposed the entry that applied the
//!   completion): ms resolution, and one commit before the completion is
//!   durable.
//! - **throughput**: acknowledged submissions a second, and completions a
//!   second in the window. After the window the generator stops and waits
//!   (at most `--drain` seconds) until every acknowledged task is completed.
//! - **CPU**: seconds of CPU each node and the generator used in the
//!   window, and how busy the whole machine was (other processes included);
//!   and how many of each process's threads were, on average, runnable but
//!   waiting for a CPU (`schedstat`): the cost of sharing 2 cores.
//!
//! One summary line per profile, then one JSON line (`{"bench":"load",...}`).
//! Every clock read is this machine's, so stamps from the nodes and the
//! generator compare. Not a test: it asserts nothing about speed.

#[allow(dead_code)]
mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::conn::{Conn, ConnError};
use common::support::Cluster;
use common::{Done, completed_tasks, hist, sim_fleet, task_body, wall_us};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

/// The PRD's load gates (sessions), plus 100.
const PROFILES: [usize; 4] = [10, 25, 50, 100];
/// `sim` gateways the sessions' agents are spread over.
const GATEWAYS: usize = 3;
/// Longest a submission may wait for its answer.
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Open,
    Closed,
}

struct Opts {
    profiles: Vec<usize>,
    mode: Mode,
    rate: f64,
    clients: usize,
    secs: f64,
    warmup: f64,
    drain: f64,
    nodes: usize,
    max_inflight: usize,
}

fn opts() -> Opts {
    let mut o = Opts {
        profiles: PROFILES.to_vec(),
        mode: Mode::Closed,
        rate: 2000.0,
        clients: 32,
        secs: 20.0,
        warmup: 2.0,
        drain: 120.0,
        nodes: 3,
        max_inflight: 4096,
    };
    let mut it = common::args().into_iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--profile" => {
                let v = val();
                o.profiles = if v == "all" {
                    PROFILES.to_vec()
                } else {
                    vec![v.parse().expect("--profile 10|25|50|100|all")]
                };
            }
            "--mode" => {
                o.mode = match val().as_str() {
                    "open" => Mode::Open,
                    "closed" => Mode::Closed,
                    m => panic!("--mode open|closed, not {m}"),
                }
            }
            "--rate" => o.rate = val().parse().expect("--rate R (submissions a second)"),
            "--clients" => o.clients = val().parse().expect("--clients C"),
            "--secs" => o.secs = val().parse().expect("--secs S"),
            "--warmup" => o.warmup = val().parse().expect("--warmup S"),
            "--drain" => o.drain = val().parse().expect("--drain S"),
            "--nodes" => o.nodes = val().parse().expect("--nodes N"),
            "--max-inflight" => o.max_inflight = val().parse().expect("--max-inflight N"),
            other => panic!("unknown argument {other}"),
        }
    }
    o
}

/// One submission as the generator saw it.
struct Sample {
    /// Start (the schedule's slot, or the actual send), wall clock µs.
    start_us: u64,
    /// Start to acknowledgement, µs.
    latency_us: u64,
    /// How late the generator began sending it, µs (open loop: behind
    /// its slot in the schedule).
    lag_us: u64,
    /// The node (index) it was sent to.
    node: usize,
    /// The task id, or why it was not acknowledged.
    outcome: Result<u64, String>,
}

#[derive(serde::Deserialize)]
struct Created {
    id: u64,
}

/// The submissions' targets and the clock they are measured against.
#[derive(Clone)]
struct Target {
    /// Every node's API address.
    addrs: Arc<Vec<std::net::SocketAddr>>,
    /// The open loop's idle connections, per node: a submission takes one
    /// (or opens one) and gives it back when answered.
    idle: Arc<Vec<Mutex<Vec<Conn>>>>,
    start: Instant,
    start_wall_us: u64,
}

impl Target {
    /// Every node's address, and the clock starting now.
    fn new(c: &Cluster) -> Self {
        Target {
            addrs: Arc::new((0..c.len()).map(|i| c.node(i).api_addr).collect()),
            idle: Arc::new((0..c.len()).map(|_| Mutex::default()).collect()),
            start: Instant::now(),
            start_wall_us: wall_us(),
        }
    }

    /// The node task `i` goes to.
    fn node_of(&self, i: u64) -> usize {
        (i as usize) % self.addrs.len()
    }

    /// Submits task `i` on an idle connection to its node (the open loop:
    /// many submissions in flight, each on its own connection).
    async fn submit(&self, i: u64, start: Instant) -> Sample {
        let node = self.node_of(i);
        let idle = self.idle[node].lock().expect("idle connections").pop();
        let mut conn = idle.unwrap_or_else(|| Conn::new(self.addrs[node], TIMEOUT));
        let sample = self.submit_on(&mut conn, i, start).await;
        self.idle[node].lock().expect("idle connections").push(conn);
        sample
    }

    /// Submits task `i` on `conn`, a keep-alive connection to node
    /// `self.node_of(i)`; `start` is when it should have gone out (open
    /// loop) or went out (closed loop).
    async fn submit_on(&self, conn: &mut Conn, i: u64, start: Instant) -> Sample {
        let lag_us = start.elapsed().as_micros() as u64;
        let outcome = match conn.post_json("/api/v1/tasks", task_body(i, None)).await {
            Ok((201, body)) => serde_json::from_slice::<Created>(&body)
                .map(|c| c.id)
                .map_err(|e| format!("body: {e}")),
            Ok((status, _)) => Err(format!("HTTP {status}")),
            Err(ConnError::Timeout) => Err("timeout".into()),
            Err(ConnError::Connect(_)) => Err("connect".into()),
            Err(e) => Err(e.to_string()),
        };
        self.sample(start, lag_us, self.node_of(i), outcome)
    }

    fn sample(
        &self,
        start: Instant,
        lag_us: u64,
        node: usize,
        outcome: Result<u64, String>,
    ) -> Sample {
        let start_us =
            self.start_wall_us + start.saturating_duration_since(self.start).as_micros() as u64;
        Sample {
            start_us,
            latency_us: start.elapsed().as_micros() as u64,
            lag_us,
            node,
            outcome,
        }
    }
}

/// Submits at `rate` a second for `secs`, on schedule whatever the answers.
async fn open_loop(t: &Target, rate: f64, secs: f64, max_inflight: usize) -> Vec<Sample> {
    let total = (rate * secs) as u64;
    let samples = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let slots = Arc::new(Semaphore::new(max_inflight));
    let mut i = 0;
    while i < total {
        // Slot i is at i / rate: every slot up to now is due.
        let due = ((t.start.elapsed().as_secs_f64() * rate) as u64 + 1).min(total);
        while i < due {
            let permit = slots.clone().acquire_owned().await.expect("open");
            let at = t.start + Duration::from_secs_f64(i as f64 / rate);
            let (t, samples) = (t.clone(), samples.clone());
            tokio::spawn(async move {
                let s = t.submit(i, at).await;
                samples.lock().expect("samples").push(s);
                drop(permit);
            });
            i += 1;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let all = slots.acquire_many(max_inflight as u32).await.expect("open");
    drop(all);
    let mut samples = samples.lock().expect("samples");
    std::mem::take(&mut *samples)
}

/// `clients` clients, each submitting again as soon as it is answered, for `secs`.
async fn closed_loop(t: &Target, clients: usize, secs: f64) -> Vec<Sample> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for w in 0..clients {
        let (t, stop) = (t.clone(), stop.clone());
        handles.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut conns: Vec<Conn> = t.addrs.iter().map(|a| Conn::new(*a, TIMEOUT)).collect();
            let mut i = w as u64;
            while !stop.load(Ordering::Relaxed) {
                let conn = &mut conns[t.node_of(i)];
                out.push(t.submit_on(conn, i, Instant::now()).await);
                i += clients as u64;
            }
            out
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.expect("client"));
    }
    all
}

/// CPU seconds used so far by each node, this process and the machine, and
/// the seconds the nodes' and this process's threads waited for a CPU.
struct Cpu {
    nodes: Vec<f64>,
    generator: f64,
    waits: Vec<f64>,
    busy: f64,
    total: f64,
}

fn cpu(c: &Cluster) -> Cpu {
    let (busy, total) = common::machine_cpu_secs();
    Cpu {
        nodes: (0..c.len())
            .map(|i| common::cpu_secs(c.node(i).pid().unwrap_or(0)))
            .collect(),
        generator: common::cpu_secs(std::process::id()),
        waits: (0..c.len())
            .map(|i| common::runqueue_wait_secs(c.node(i).pid().unwrap_or(0)))
            .chain([common::runqueue_wait_secs(std::process::id())])
            .collect(),
        busy,
        total,
    }
}

fn percentiles(h: &Histogram<u64>) -> Value {
    let ms = |v: u64| (v as f64 / 10.0).round() / 100.0;
    json!({
        "n": h.len(),
        "p50": ms(h.value_at_quantile(0.5)),
        "p90": ms(h.value_at_quantile(0.9)),
        "p95": ms(h.value_at_quantile(0.95)),
        "p99": ms(h.value_at_quantile(0.99)),
        "p99.9": ms(h.value_at_quantile(0.999)),
        "max": ms(h.max()),
    })
}

fn line(h: &Histogram<u64>) -> String {
    let ms = |v: u64| v as f64 / 1000.0;
    format!(
        "p50 {:.2} p90 {:.2} p95 {:.2} p99 {:.2} p99.9 {:.2} max {:.2} ms",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.9)),
        ms(h.value_at_quantile(0.95)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max())
    )
}

/// Histograms and counts of the submissions started in `[from_us, to_us)`.
struct Figures {
    submit: Histogram<u64>,
    /// Submit latency of the submissions sent to the leader, and to a
    /// follower (which forwards them to the leader).
    submit_via_leader: Histogram<u64>,
    submit_via_follower: Histogram<u64>,
    dispatch: Histogram<u64>,
    /// From the task's submission stamp (leader clock, ms, so up to 1 ms
    /// more) to the attempt's start: dispatch without the HTTP path.
    dispatch_from_created: Histogram<u64>,
    /// How late the generator sent (open loop): if this grows, the
    /// generator, not the cluster, fell behind.
    send_lag: Histogram<u64>,
    e2e: Histogram<u64>,
    sent: u64,
    acked: u64,
    errors: BTreeMap<String, u64>,
    completed_in_window: u64,
    never_completed: u64,
}

fn figures(samples: &[Sample], done: &[Done], leader: usize, window: (u64, u64)) -> Figures {
    let (from_us, to_us) = window;
    let by_id: HashMap<u64, &Done> = done.iter().map(|d| (d.id, d)).collect();
    let mut f = Figures {
        submit: hist(),
        submit_via_leader: hist(),
        submit_via_follower: hist(),
        dispatch: hist(),
        dispatch_from_created: hist(),
        send_lag: hist(),
        e2e: hist(),
        sent: 0,
        acked: 0,
        errors: BTreeMap::new(),
        completed_in_window: done
            .iter()
            .filter(|d| (from_us..to_us).contains(&(d.completed_ms * 1000)))
            .count() as u64,
        never_completed: 0,
    };
    for s in samples
        .iter()
        .filter(|s| (from_us..to_us).contains(&s.start_us))
    {
        f.sent += 1;
        f.send_lag.saturating_record(s.lag_us.max(1));
        let id = match &s.outcome {
            Ok(id) => *id,
            Err(why) => {
                *f.errors.entry(why.clone()).or_default() += 1;
                continue;
            }
        };
        f.acked += 1;
        f.submit.saturating_record(s.latency_us.max(1));
        if s.node == leader {
            f.submit_via_leader.saturating_record(s.latency_us.max(1));
        } else {
            f.submit_via_follower.saturating_record(s.latency_us.max(1));
        }
        let Some(d) = by_id.get(&id) else {
            f.never_completed += 1;
            continue;
        };
        if d.started_us > 0 {
            f.dispatch
                .saturating_record(d.started_us.saturating_sub(s.start_us).max(1));
            f.dispatch_from_created
                .saturating_record(d.started_us.saturating_sub(d.created_ms * 1000).max(1));
        }
        f.e2e
            .saturating_record((d.completed_ms * 1000).saturating_sub(s.start_us).max(1));
    }
    f
}

/// What one profile's run measured.
struct Run {
    sessions: usize,
    f: Figures,
    /// CPU over the window, in cores: each node, the generator, everything
    /// else on the machine; and the machine's busy share.
    node_cpu: Vec<f64>,
    leader: usize,
    gen_cpu: f64,
    others_cpu: f64,
    machine_busy: f64,
    /// Runnable threads waiting for a CPU, on average over the window:
    /// each node, then the generator.
    waiting: Vec<f64>,
    batching: common::Batching,
    /// Acknowledged overall (warm-up included), and how many of them
    /// completed within the drain limit (`None`: all).
    acked_all: u64,
    short: Option<u64>,
    drain_s: f64,
    load: (f64, f64),
    start_wall_us: u64,
}

/// Starts a cluster with `sessions` sessions, runs the load, waits for the
/// backlog to drain and reads every completed task back.
async fn profile(o: &Opts, sessions: usize) -> Run {
    let c = Cluster::start_with(o.nodes, &common::runtime_toml()).await;
    sim_fleet(&c, GATEWAYS, sessions, "").await;
    let leader = c.leader().await;
    // For a profiler to attach to (`perf record -p`).
    let pids: Vec<u32> = (0..c.len()).filter_map(|i| c.node(i).pid()).collect();
    eprintln!(
        "[load] sessions={sessions}: node pids {pids:?} (leader node{}), generator pid {}",
        leader + 1,
        std::process::id()
    );
    let t = Target::new(&c);
    let load_before = common::load_average();
    let from_us = t.start_wall_us + (o.warmup * 1e6) as u64;
    let to_us = from_us + (o.secs * 1e6) as u64;
    // CPU is sampled over the measured window only.
    let window = async {
        tokio::time::sleep(Duration::from_secs_f64(o.warmup)).await;
        let before = cpu(&c);
        tokio::time::sleep(Duration::from_secs_f64(o.secs)).await;
        (before, cpu(&c))
    };
    let run = async {
        match o.mode {
            Mode::Open => open_loop(&t, o.rate, o.warmup + o.secs, o.max_inflight).await,
            Mode::Closed => closed_loop(&t, o.clients, o.warmup + o.secs).await,
        }
    };
    let (samples, (cpu0, cpu1)) = tokio::join!(run, window);
    let load_after = common::load_average();
    let acked_all = samples.iter().filter(|s| s.outcome.is_ok()).count() as u64;
    let stopped = Instant::now();
    let drain = Duration::from_secs_f64(o.drain);
    let short = common::try_wait_completed(&c, acked_all, drain).await.err();
    let drain_s = stopped.elapsed().as_secs_f64();
    let per_sec = |a: f64, b: f64| (b - a) / o.secs;
    let node_cpu: Vec<f64> = (0..c.len())
        .map(|i| per_sec(cpu0.nodes[i], cpu1.nodes[i]))
        .collect();
    let gen_cpu = per_sec(cpu0.generator, cpu1.generator);
    let busy = per_sec(cpu0.busy, cpu1.busy);
    Run {
        sessions,
        f: figures(
            &samples,
            &completed_tasks(&c).await,
            leader,
            (from_us, to_us),
        ),
        others_cpu: (busy - node_cpu.iter().sum::<f64>() - gen_cpu).max(0.0),
        machine_busy: (cpu1.busy - cpu0.busy) / (cpu1.total - cpu0.total).max(1e-9),
        waiting: (0..cpu0.waits.len())
            .map(|i| per_sec(cpu0.waits[i], cpu1.waits[i]))
            .collect(),
        node_cpu,
        leader,
        gen_cpu,
        batching: common::batching(&c).await,
        acked_all,
        short,
        drain_s,
        load: (load_before, load_after),
        start_wall_us: t.start_wall_us,
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// The detail lines and the one-line summary.
fn print_run(o: &Opts, r: &Run) {
    let f = &r.f;
    let mode = match o.mode {
        Mode::Open => format!("open rate={}/s", o.rate),
        Mode::Closed => format!("closed clients={}", o.clients),
    };
    let nodes: Vec<String> = r
        .node_cpu
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let role = if i == r.leader { "leader" } else { "follower" };
            format!("node{} ({role}) {:.0}%", i + 1, v * 100.0)
        })
        .collect();
    let drained = match r.short {
        None => format!("all {} acknowledged tasks completed", r.acked_all),
        Some(n) => format!("only {n} of {} acknowledged tasks completed", r.acked_all),
    };
    println!("  submit     {}", line(&f.submit));
    println!("    via the leader    {}", line(&f.submit_via_leader));
    println!("    via a follower    {}", line(&f.submit_via_follower));
    println!("  dispatch   {}", line(&f.dispatch));
    println!(
        "    from the submission stamp {}",
        line(&f.dispatch_from_created)
    );
    println!("  end to end {}", line(&f.e2e));
    println!("  generator send lag {}", line(&f.send_lag));
    println!(
        "  cpu in the window (100% = one core): {}, generator {:.0}%, other processes {:.0}%; machine {:.0}% busy",
        nodes.join(", "),
        r.gen_cpu * 100.0,
        r.others_cpu * 100.0,
        r.machine_busy * 100.0
    );
    let waiting: Vec<String> = r.waiting.iter().map(|w| format!("{w:.2}")).collect();
    println!(
        "  threads waiting for a CPU, on average (nodes 1..n, generator): {}",
        waiting.join(", ")
    );
    println!(
        "  leader: {:.1} commands per Raft entry, {:.2} ms mean proposal-to-applied; {drained} {:.1}s after the load stopped",
        r.batching.commands_per_entry, r.batching.commit_ms, r.drain_s
    );
    let q = |h: &Histogram<u64>| {
        let ms = |p: f64| h.value_at_quantile(p) as f64 / 1000.0;
        format!("{:.2}/{:.2}/{:.2}", ms(0.5), ms(0.99), ms(0.999))
    };
    println!(
        "load sessions={} {mode} secs={}: sent {} acked {} ({:.0}/s) completed {:.0}/s errors {}; p50/p99/p99.9 ms: submit {} dispatch {} e2e {}; loadavg {:.2} -> {:.2}",
        r.sessions,
        o.secs,
        f.sent,
        f.acked,
        f.acked as f64 / o.secs,
        f.completed_in_window as f64 / o.secs,
        f.sent - f.acked,
        q(&f.submit),
        q(&f.dispatch),
        q(&f.e2e),
        r.load.0,
        r.load.1,
    );
}

/// The machine-readable line.
fn print_json(o: &Opts, r: &Run) {
    let f = &r.f;
    let open = o.mode == Mode::Open;
    let summary = json!({
        "bench": "load",
        "sessions": r.sessions,
        "mode": if open { "open" } else { "closed" },
        "rate": open.then_some(o.rate),
        "clients": (!open).then_some(o.clients),
        "nodes": r.node_cpu.len(),
        "secs": o.secs,
        "warmup": o.warmup,
        "sent": f.sent,
        "acked": f.acked,
        "errors": f.errors,
        "acked_per_s": (f.acked as f64 / o.secs).round(),
        "completed_per_s": (f.completed_in_window as f64 / o.secs).round(),
        "never_completed": f.never_completed,
        "drain_s": round2(r.drain_s),
        "submit_ms": percentiles(&f.submit),
        "submit_via_leader_ms": percentiles(&f.submit_via_leader),
        "submit_via_follower_ms": percentiles(&f.submit_via_follower),
        "dispatch_ms": percentiles(&f.dispatch),
        "dispatch_from_created_ms": percentiles(&f.dispatch_from_created),
        "e2e_ms": percentiles(&f.e2e),
        "send_lag_ms": percentiles(&f.send_lag),
        "commands_per_entry": round2(r.batching.commands_per_entry),
        "cpu_cores": {
            "nodes": r.node_cpu.iter().map(|v| round2(*v)).collect::<Vec<_>>(),
            "leader_index": r.leader,
            "generator": round2(r.gen_cpu),
            "others": round2(r.others_cpu),
            "machine_busy_share": round2(r.machine_busy),
            "waiting_for_cpu": r.waiting.iter().map(|v| round2(*v)).collect::<Vec<_>>(),
        },
        "loadavg": [r.load.0, r.load.1],
        "wall_clock_start_us": r.start_wall_us,
    });
    println!("{summary}");
}

#[tokio::main]
async fn main() {
    let o = opts();
    for &sessions in &o.profiles {
        let run = profile(&o, sessions).await;
        print_run(&o, &run);
        print_json(&o, &run);
    }
}
