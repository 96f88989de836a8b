//! Strict priority with prefetch windows, in one queue group: agents hold
//! up to their capacity (1 to 16 leases, their window) and external
//! workers lease up to `max` (1 to 16) at once. Random agents, workers and
//! steps check, after every dispatch round and every worker lease:
//!
//! - every lease granted is of the highest priority of any task left ready
//!   that its holder could run: a holder never fills its window with a
//!   lower-priority task while a higher one it could take stays waiting;
//! - after a dispatch round, no ready task waits while an online agent
//!   with free room could take it: an agent never holds a low-priority task
//!   while a higher one waits that another agent with room could take;
//! - no agent holds more than its capacity, and no worker lease call
//!   returns more than its `max`.

use godel::fsm::{
    AgentId, AgentRegistration, Batch, Command, DispatchPolicy, DispatchSpec, GatewayId,
    GatewayRegistration, Outcome, Priority, Reply, Request, State, SubmitTask, Task, TaskFilter,
    TaskStatus, Tenant,
};
use proptest::prelude::*;

#[derive(Clone, Debug)]
struct Agent {
    gpu: bool,
    capacity: u32,
}

#[derive(Clone, Debug)]
enum Step {
    Submit {
        priority: Priority,
        gpu: bool,
    },
    Dispatch,
    /// An external worker (gpu or not) leases up to `max`.
    Lease {
        gpu: bool,
        max: u32,
    },
    /// Complete the n-th live lease (mod their count), if any.
    Complete(usize),
    /// Fail the n-th live lease (retryable: it waits out its backoff).
    Fail(usize),
    /// A minute passes and the timers fire: failed tasks whose backoff
    /// ran out (and lapsed leases) are ready again, at their priority.
    Wait,
}

fn priority() -> impl Strategy<Value = Priority> {
    prop::sample::select(Priority::URGENT_FIRST.to_vec())
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (priority(), any::<bool>()).prop_map(|(priority, gpu)| Step::Submit { priority, gpu }),
        2 => Just(Step::Dispatch),
        1 => (any::<bool>(), 1..=16u32).prop_map(|(gpu, max)| Step::Lease { gpu, max }),
        2 => any::<usize>().prop_map(Step::Complete),
        1 => any::<usize>().prop_map(Step::Fail),
        1 => Just(Step::Wait),
    ]
}

fn case() -> impl Strategy<Value = (Vec<Agent>, Vec<Step>)> {
    let agent = (any::<bool>(), 1..=16u32).prop_map(|(gpu, capacity)| Agent { gpu, capacity });
    (
        prop::collection::vec(agent, 1..=4),
        prop::collection::vec(step(), 1..120),
    )
}

fn caps(gpu: bool) -> Vec<String> {
    if gpu { vec!["gpu".into()] } else { vec![] }
}

fn apply(state: &mut State, now_ms: u64, cmds: Vec<Command>) -> Vec<Outcome> {
    let req = Request::Batch(Batch::unaudited(now_ms, now_ms, cmds));
    state.apply(&req).0.outcomes
}

fn agent_id(i: usize) -> AgentId {
    AgentId(format!("agent{i}"))
}

/// Whether a holder with (or without) the `gpu` capability could run `t`.
fn could_run(gpu: bool, t: &Task) -> bool {
    t.capabilities.iter().all(|c| gpu && c == "gpu")
}

fn tasks_with(state: &State, status: TaskStatus) -> Vec<std::sync::Arc<Task>> {
    let filter = TaskFilter {
        status: Some(status),
        ..Default::default()
    };
    state.list(&filter, None, usize::MAX, usize::MAX).items
}

/// Ready tasks: pending and due (a failed task waits for its backoff in
/// status `failed`, not here).
fn ready(state: &State) -> Vec<std::sync::Arc<Task>> {
    tasks_with(state, TaskStatus::Pending)
}

fn best_ready(state: &State, gpu: bool) -> Option<Priority> {
    ready(state)
        .iter()
        .filter(|t| could_run(gpu, t))
        .map(|t| t.priority)
        .max()
}

/// One node, one `sim` gateway placed on it, the agents registered and
/// online.
fn fleet(agents: &[Agent]) -> State {
    let mut s = State::default();
    let mut setup = vec![Command::NodeHeartbeat {
        id: 1,
        region: "local".into(),
        api_addr: "127.0.0.1:1".into(),
    }];
    let gw = GatewayId("gw".into());
    setup.push(Command::RegisterGateway(GatewayRegistration {
        id: gw.clone(),
        kind: "sim".into(),
        spec: "{}".into(),
        region: "local".into(),
        capabilities: vec![],
        max_sessions: 10_000,
        model: None,
        managed: false,
    }));
    setup.push(Command::PlaceGateway {
        id: gw.clone(),
        owner: Some(1),
    });
    for (i, a) in agents.iter().enumerate() {
        setup.push(Command::RegisterAgent(AgentRegistration {
            id: agent_id(i),
            gateway: gw.clone(),
            role: "worker".into(),
            capacity: a.capacity,
            capabilities: caps(a.gpu),
            ..Default::default()
        }));
        setup.push(Command::AgentOnline {
            agent: agent_id(i),
            node: 1,
            release: vec![],
        });
    }
    for out in apply(&mut s, 1, setup) {
        assert!(out.is_ok(), "setup: {out:?}");
    }
    s
}

fn run(agents: &[Agent], steps: &[Step]) -> Result<(), TestCaseError> {
    let mut state = fleet(agents);
    let mut now = 10;
    for step in steps {
        now += 1;
        match step {
            Step::Submit { priority, gpu } => {
                let submit = SubmitTask {
                    tenant: Tenant("t".into()),
                    priority: Some(*priority),
                    payload: "{}".into(),
                    capabilities: caps(*gpu),
                    ..Default::default()
                };
                let out = apply(&mut state, now, vec![Command::Submit(submit)]);
                prop_assert!(out[0].is_ok(), "submit: {:?}", out[0]);
            }
            Step::Wait => {
                // The node keeps beating meanwhile; leases older than
                // 30 s lapse and their tasks are ready again too.
                now += 60_000;
                let beat = Command::NodeHeartbeat {
                    id: 1,
                    region: "local".into(),
                    api_addr: "127.0.0.1:1".into(),
                };
                for out in apply(&mut state, now, vec![beat, Command::Tick]) {
                    prop_assert!(out.is_ok(), "wait: {out:?}");
                }
            }
            Step::Complete(k) | Step::Fail(k) => {
                let live: Vec<_> = tasks_with(&state, TaskStatus::Leased)
                    .into_iter()
                    .chain(tasks_with(&state, TaskStatus::Running))
                    .filter_map(|t| t.lease.as_ref().map(|l| l.token))
                    .collect();
                if !live.is_empty() {
                    let token = live[k % live.len()];
                    let cmd = match step {
                        Step::Complete(_) => Command::Complete {
                            token,
                            result: "{}".into(),
                        },
                        _ => Command::Fail {
                            token,
                            error: "again".into(),
                            retryable: true,
                            usage: None,
                        },
                    };
                    let out = apply(&mut state, now, vec![cmd]);
                    prop_assert!(out[0].is_ok(), "{step:?}: {:?}", out[0]);
                }
            }
            Step::Lease { gpu, max } => {
                let cmd = Command::Lease {
                    agent_id: AgentId(format!("worker-{now}")),
                    capabilities: caps(*gpu),
                    max: *max,
                    lease_ms: 30_000,
                };
                let out = apply(&mut state, now, vec![cmd]);
                let Ok(Reply::Leased(grants)) = &out[0] else {
                    return Err(TestCaseError::fail(format!("lease: {:?}", out[0])));
                };
                prop_assert!(grants.len() as u32 <= *max);
                let left = best_ready(&state, *gpu);
                for g in grants {
                    prop_assert!(could_run(*gpu, &g.task), "leased what it cannot run");
                    prop_assert!(
                        left.is_none_or(|p| p <= g.task.priority),
                        "a worker got #{} ({:?}) while a {:?} task it could run stays ready",
                        g.task.id.0,
                        g.task.priority,
                        left
                    );
                }
                // A worker with room left takes everything it could run.
                if (grants.len() as u32) < *max {
                    prop_assert!(left.is_none(), "worker left {:?} ready with room", left);
                }
            }
            Step::Dispatch => {
                let spec = DispatchSpec {
                    lease_ms: 30_000,
                    max: 100,
                    policy: DispatchPolicy::LeastLoaded,
                    node_dead_after_ms: 60_000,
                    session_limit_ms: 0,
                    session_idle_ms: 0,
                    session_checkpoint_every: 0,
                };
                let out = apply(&mut state, now, vec![Command::Dispatch(spec)]);
                let Ok(Reply::Dispatched(grants)) = &out[0] else {
                    return Err(TestCaseError::fail(format!("dispatch: {:?}", out[0])));
                };
                for g in grants {
                    let holder = &g.task.lease.as_ref().expect("a granted lease").agent_id;
                    let i: usize = holder.0["agent".len()..].parse().expect("an agent's id");
                    let left = best_ready(&state, agents[i].gpu);
                    prop_assert!(
                        left.is_none_or(|p| p <= g.task.priority),
                        "{} got #{} ({:?}) while a {:?} task it could run stays ready",
                        holder,
                        g.task.id.0,
                        g.task.priority,
                        left
                    );
                }
                for (i, a) in agents.iter().enumerate() {
                    let load = state.agent_load(&agent_id(i));
                    prop_assert!(load <= a.capacity, "agent {i}: {load} > {}", a.capacity);
                    if load < a.capacity {
                        let left = best_ready(&state, a.gpu);
                        prop_assert!(
                            left.is_none(),
                            "agent {i} has room ({load}/{}) and a {:?} task it could run waits",
                            a.capacity,
                            left
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
    ))]

    #[test]
    fn a_window_never_holds_lower_work_while_higher_waits((agents, steps) in case()) {
        run(&agents, &steps)?;
    }
}
