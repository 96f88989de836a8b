//! Micro-benchmarks of the state machine's apply path, with no network, disk
//! or Raft: what one committed entry costs to apply, per kind of command.
//!
//! `cargo bench --bench fsm` (about two minutes); `cargo bench --bench fsm --
//! dispatch` runs the benchmarks whose name contains `dispatch`.
//!
//! Every benchmark applies whole `Request`s through `State::apply`, as a node
//! does after commit, on a state holding a fleet registered as the cluster
//! benchmarks register it (one node, three gateways, agents online) and a
//! backlog of pending tasks over four priorities and eight tenants. Only the
//! apply is timed: the steps that put the state back where it started (give
//! leases back, lease again, start from a fresh copy) run outside the clock
//! (`iter_custom`). Not a test: it asserts nothing about speed.

use std::collections::VecDeque;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use godel::fsm::{
    AgentId, AgentRegistration, Audit, AuditCaller, AuditTarget, Batch, Command, DispatchPolicy,
    DispatchSpec, FencingToken, GatewayId, GatewayRegistration, MAX_AUDIT_ENTRIES, Priority, Reply,
    Request, State, SubmitTask, Write,
};

/// The leader's clock at the start of every benchmark, ms since the epoch.
const NOW: u64 = 1_800_000_000_000;
/// Lease length of every grant, ms.
const LEASE_MS: u64 = 30_000;
/// Pending tasks in the backlog.
const BACKLOG: u64 = 10_000;
/// Gateways the agents are spread over.
const GATEWAYS: usize = 3;
/// Submits between two fresh copies of the state, so it does not grow
/// without bound while criterion iterates.
const REFRESH_TASKS: u64 = 50_000;

fn entry(now_ms: u64, commands: Vec<Command>) -> Request {
    Request::Batch(Batch::unaudited(now_ms, 7, commands))
}

/// Applies `commands` as one entry; the granted tokens, if any.
fn apply(s: &mut State, now_ms: u64, commands: Vec<Command>) -> Vec<FencingToken> {
    let (response, _events) = s.apply(&entry(now_ms, commands));
    let mut tokens = Vec::new();
    for outcome in response.outcomes {
        match outcome {
            Ok(Reply::Dispatched(g) | Reply::Leased(g)) => {
                tokens.extend(g.iter().map(|g| g.token));
            }
            Ok(_) => {}
            Err(e) => panic!("benchmark setup rejected: {e}"),
        }
    }
    tokens
}

/// Task `i`: four priorities and eight tenants in turn, as the cluster
/// benchmarks submit them.
fn submit(i: u64) -> Command {
    Command::Submit(SubmitTask {
        tenant: format!("t{}", i % 8).as_str().into(),
        priority: Some(Priority::URGENT_FIRST[(i % 4) as usize]),
        payload: format!(r#"{{"n":{i},"prompt":"benchmark task"}}"#),
        ..Default::default()
    })
}

fn dispatch() -> Command {
    Command::Dispatch(DispatchSpec {
        lease_ms: LEASE_MS,
        max: 10_000,
        policy: DispatchPolicy::LeastLoaded,
        node_dead_after_ms: 2_000,
        session_limit_ms: 0,
        session_idle_ms: 0,
        session_checkpoint_every: 0,
    })
}

fn heartbeat() -> Command {
    Command::NodeHeartbeat {
        id: 1,
        region: "local".into(),
        api_addr: "127.0.0.1:1".into(),
    }
}

/// One node, three `sim` gateways placed on it, `agents` agents of
/// `capacity` online, and `backlog` pending tasks; nothing leased.
fn fleet(agents: usize, capacity: u32, backlog: u64) -> State {
    let mut s = State::default();
    let mut setup = vec![heartbeat()];
    for g in 0..GATEWAYS {
        let id = GatewayId(format!("gw{g}"));
        setup.push(Command::RegisterGateway(GatewayRegistration {
            id: id.clone(),
            kind: "sim".into(),
            spec: "{}".into(),
            region: "local".into(),
            capabilities: vec![],
            max_sessions: 10_000,
            model: None,
            managed: false,
        }));
        setup.push(Command::PlaceGateway { id, owner: Some(1) });
    }
    for a in 0..agents {
        let id = AgentId(format!("agent{a}"));
        setup.push(Command::RegisterAgent(AgentRegistration {
            id: id.clone(),
            gateway: GatewayId(format!("gw{}", a % GATEWAYS)),
            role: "bench".into(),
            capacity,
            ..Default::default()
        }));
        setup.push(Command::AgentOnline {
            agent: id,
            node: 1,
            release: vec![],
        });
    }
    apply(&mut s, NOW, setup);
    for chunk in (0..backlog).collect::<Vec<_>>().chunks(1000) {
        apply(&mut s, NOW, chunk.iter().map(|&i| submit(i)).collect());
    }
    s
}

type Group<'a> = BenchmarkGroup<'a, WallTime>;

/// Benchmarks `name` in `g`, counting `elements` per entry: each criterion
/// run starts from a copy of `start` and a fresh `prepare` from `runs`, and
/// times only the applies of the entries `prepare` returns. `prepare`
/// (untimed) may also change or reset the state first.
fn bench_applies<P>(
    g: &mut Group<'_>,
    name: &str,
    elements: u64,
    start: &State,
    mut runs: impl FnMut() -> P,
) where
    P: FnMut(&mut State) -> Request,
{
    g.throughput(Throughput::Elements(elements));
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut s = start.clone();
            let mut prepare = runs();
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let request = prepare(&mut s);
                let t = Instant::now();
                let out = s.apply(&request);
                total += t.elapsed();
                black_box(out);
            }
            total
        })
    });
}

/// Submits, one per entry and 64 per entry, onto the backlog; and 64
/// submits ending in the dispatch round the leader adds, with every agent
/// busy (the saturated case).
fn submits(c: &mut Criterion) {
    let mut g = c.benchmark_group("submit");
    let idle = fleet(100, 1, BACKLOG);
    let mut busy = idle.clone();
    apply(&mut busy, NOW, vec![dispatch()]);
    // What the API adds to each submission: its caller, for the audit log.
    let caller = AuditCaller {
        actor: "key:0123456789abcdef".into(),
        tenant: "t0".into(),
        action: "tasks.submit".into(),
    };
    for (name, per_entry, with_dispatch, audited, start) in [
        ("one", 1u64, false, false, &idle),
        ("batch_64", 64, false, false, &idle),
        ("batch_64_audited", 64, false, true, &idle),
        ("batch_64_then_dispatch_all_busy", 64, true, false, &busy),
    ] {
        let caller = &caller;
        bench_applies(&mut g, name, per_entry, start, || {
            let mut next = BACKLOG;
            move |s: &mut State| {
                if next - BACKLOG > REFRESH_TASKS {
                    *s = start.clone();
                    next = BACKLOG;
                }
                let mut writes: Vec<Write> = (next..next + per_entry)
                    .map(|i| Write {
                        command: submit(i),
                        audit: audited.then(|| Audit {
                            caller: caller.clone(),
                            scoped: false,
                            target: None,
                        }),
                    })
                    .collect();
                if with_dispatch {
                    writes.push(dispatch().into());
                }
                next += per_entry;
                Request::Batch(Batch::of(NOW, 7, writes))
            }
        });
    }
    g.finish();
}

/// Gives back every lease granted since token `*mark` (untimed setup), so
/// the next round finds the same idle agents and backlog.
fn release_since(s: &mut State, mark: &mut u64) {
    let last = s.last_token();
    if last > *mark {
        let tokens = (*mark + 1..=last).map(FencingToken).collect();
        apply(s, NOW, vec![Command::Release { tokens }]);
    }
    *mark = last;
}

/// A dispatch round leasing to every idle agent (agents x capacity grants)
/// from the backlog; the leases are given back, untimed, before the next.
/// Also the common case under light load: one ready task, 100 idle agents.
fn dispatch_rounds(c: &mut Criterion) {
    let mut g = c.benchmark_group("dispatch");
    for (agents, capacity, backlog) in [
        (10usize, 1u32, BACKLOG),
        (100, 1, BACKLOG),
        (100, 10, BACKLOG),
        (100, 1, 1),
    ] {
        let start = fleet(agents, capacity, backlog);
        let grants = (agents as u64 * u64::from(capacity)).min(backlog);
        let name = format!("{agents}_agents_x{capacity}_backlog_{backlog}");
        bench_applies(&mut g, &name, grants, &start, || {
            let mut mark = start.last_token();
            move |s: &mut State| {
                release_since(s, &mut mark);
                entry(NOW, vec![dispatch()])
            }
        });
    }
    g.finish();
}

/// An agent pulling up to 10 tasks (`POST /leases`) from the backlog.
fn pull_leases(c: &mut Criterion) {
    let mut g = c.benchmark_group("lease");
    let start = fleet(100, 1, BACKLOG);
    bench_applies(&mut g, "pull_10", 10, &start, || {
        let mut mark = start.last_token();
        move |s: &mut State| {
            release_since(s, &mut mark);
            let lease = Command::Lease {
                agent_id: "puller".into(),
                capabilities: vec![],
                max: 10,
                lease_ms: LEASE_MS,
            };
            entry(NOW, vec![lease])
        }
    });
    g.finish();
}

/// A state whose 100 agents of capacity `capacity` all hold leases, over
/// the backlog; the live tokens in grant order.
fn leased(capacity: u32) -> (State, Vec<FencingToken>) {
    let mut s = fleet(100, capacity, BACKLOG);
    let tokens = apply(&mut s, NOW, vec![dispatch()]);
    (s, tokens)
}

/// Batched heartbeats: one entry renewing 10 and 1,000 live leases, the
/// clock one ms later each time.
fn renew_many(c: &mut Criterion) {
    let mut g = c.benchmark_group("renew_many");
    let (start, tokens) = leased(10);
    for n in [10usize, 1000] {
        bench_applies(&mut g, &n.to_string(), n as u64, &start, || {
            let mut now = NOW;
            let tokens = &tokens[..n];
            move |_: &mut State| {
                now += 1;
                let renew = Command::RenewMany {
                    tokens: tokens.to_vec(),
                    lease_ms: LEASE_MS,
                };
                entry(now, vec![renew])
            }
        });
    }
    g.finish();
}

/// Completions, one per entry and 64 per entry (results forwarded to the
/// leader share entries); when the leases run out, the agents lease again
/// (untimed).
fn completes(c: &mut Criterion) {
    let mut g = c.benchmark_group("complete");
    let (start, first) = leased(10);
    let (start, first) = (&start, &first);
    for per_entry in [1usize, 64] {
        bench_applies(
            &mut g,
            &per_entry.to_string(),
            per_entry as u64,
            start,
            || {
                let mut live = first.clone();
                move |s: &mut State| {
                    if live.len() < per_entry {
                        if s.depth().pending() < 1000 {
                            *s = start.clone();
                            live = first.clone();
                        } else {
                            live.extend(apply(s, NOW, vec![dispatch()]));
                        }
                    }
                    entry(NOW, live.drain(..per_entry).map(complete).collect())
                }
            },
        );
    }
    g.finish();
}

fn complete(token: FencingToken) -> Command {
    Command::Complete {
        token,
        result: r#"{"ok":true}"#.into(),
    }
}

/// A tick that expires 100 and 1,000 leases at once (their tasks go back to
/// the ready queue); the agents lease them again, untimed, before the next.
fn expiring_tick(c: &mut Criterion) {
    let mut g = c.benchmark_group("tick");
    for capacity in [1u32, 10] {
        let (start, _) = leased(capacity);
        let leases = 100 * u64::from(capacity);
        bench_applies(&mut g, &format!("expire_{leases}"), leases, &start, || {
            let mut now = NOW;
            move |s: &mut State| {
                if now > NOW {
                    apply(s, now, vec![heartbeat(), dispatch()]);
                }
                now += LEASE_MS + 1;
                entry(now, vec![Command::Tick])
            }
        });
    }
    g.finish();
}

/// The leader's entry at saturation with 100 sessions: 32 results, 32 new
/// submissions and the dispatch round that hands the freed agents 32 tasks.
/// The per-task cost of the state machine in the load benchmark.
fn steady_cycle(c: &mut Criterion) {
    const PER_ENTRY: u64 = 32;
    let mut g = c.benchmark_group("cycle");
    let (start, first) = leased(1);
    let (start, first) = (&start, &first);
    let name = "complete_32_submit_32_dispatch_100_agents";
    bench_applies(&mut g, name, PER_ENTRY, start, || {
        let mut live = VecDeque::from(first.clone());
        let mut next = BACKLOG;
        let mut mark = start.last_token();
        move |s: &mut State| {
            if next - BACKLOG > REFRESH_TASKS {
                *s = start.clone();
                live = first.clone().into();
                next = BACKLOG;
                mark = s.last_token();
            }
            // The previous entry's grants are the newest leases.
            live.extend((mark + 1..=s.last_token()).map(FencingToken));
            mark = s.last_token();
            let mut commands: Vec<Command> =
                live.drain(..PER_ENTRY as usize).map(complete).collect();
            commands.extend((next..next + PER_ENTRY).map(submit));
            commands.push(dispatch());
            next += PER_ENTRY;
            entry(NOW, commands)
        }
    });
    g.finish();
}

/// What a snapshot costs the node: the copy of the state taken under the
/// apply lock (`get_snapshot_builder`; apply waits for it) and its encoding
/// (on a blocking thread), for the backlog state with an empty and a full
/// audit log.
fn snapshot_view(c: &mut Criterion) {
    let mut g = c.benchmark_group("snapshot");
    let empty = fleet(100, 1, BACKLOG);
    let mut full = empty.clone();
    let caller = AuditCaller {
        actor: "key:0123456789abcdef".into(),
        tenant: "t0".into(),
        action: "tasks.submit".into(),
    };
    let writes = |n: usize| -> Vec<Write> {
        (0..n)
            .map(|i| Write {
                command: heartbeat(),
                audit: Some(Audit {
                    caller: caller.clone(),
                    scoped: false,
                    target: Some(AuditTarget::Task(i as u64)),
                }),
            })
            .collect()
    };
    for _ in 0..MAX_AUDIT_ENTRIES / 1000 {
        let (response, _) = full.apply(&Request::Batch(Batch::of(NOW, 7, writes(1000))));
        assert!(response.outcomes.iter().all(Result::is_ok));
    }
    assert_eq!(full.audit().entries().count(), MAX_AUDIT_ENTRIES);
    for (name, state) in [("audit_empty", &empty), ("audit_full", &full)] {
        g.bench_function(format!("clone_{name}"), |b| {
            b.iter(|| black_box(state.clone()))
        });
        g.bench_function(format!("encode_{name}"), |b| {
            b.iter(|| black_box(godel::codec::encode(state).expect("encode")))
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = submits, dispatch_rounds, pull_leases, renew_many, completes, expiring_tick, steady_cycle,
        snapshot_view
}
criterion_main!(benches);
