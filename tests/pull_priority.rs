//! Strict priority across queue shards (`docs/shards.md`): a node pulls for
//! its agents with `fsm::plan_pull` over every shard's state and proposes
//! each `Pull` to the shard it names (one per shard, each agent in one). Random shards, agents and steps check,
//! after every pull:
//!
//! - every lease is of the highest priority of any ready task the agent
//!   could run (capabilities, required region) in any shard when the pull
//!   was planned: never a lower one while a higher one waits elsewhere;
//! - no agent holds more leases over all shards than its capacity;
//! - every task id and fencing token names the shard that minted it.

use godel::fsm::{
    AgentId, AgentProfile, Batch, Command, DispatchPolicy, DispatchSpec, FencingToken, GatewayId,
    Outcome, Priority, PullSlot, PullSpec, Reply, Request, State, SubmitTask, Task, TaskFilter,
    TaskRegion, TaskStatus, Tenant, group_of, plan_pull,
};
use proptest::prelude::*;

const REGIONS: [&str; 2] = ["eu", "us"];

#[derive(Clone, Debug)]
struct Agent {
    gpu: bool,
    region: usize,
    capacity: u32,
}

#[derive(Clone, Debug)]
enum Step {
    Submit {
        shard: usize,
        priority: Priority,
        gpu: bool,
        /// 0: none; 1, 2: required in REGIONS[r-1]; 3: prefers eu.
        region: usize,
    },
    Pull,
    /// Complete the n-th live lease (mod their count), if any.
    Complete(usize),
}

fn priority() -> impl Strategy<Value = Priority> {
    prop::sample::select(Priority::URGENT_FIRST.to_vec())
}

fn step(shards: usize) -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..shards, priority(), any::<bool>(), 0..4usize).prop_map(
            |(shard, priority, gpu, region)| Step::Submit { shard, priority, gpu, region }
        ),
        2 => Just(Step::Pull),
        2 => any::<usize>().prop_map(Step::Complete),
    ]
}

fn case() -> impl Strategy<Value = (usize, Vec<Agent>, Vec<Step>)> {
    (2..=4usize).prop_flat_map(|shards| {
        let agent =
            (any::<bool>(), 0..2usize, 1..=3u32).prop_map(|(gpu, region, capacity)| Agent {
                gpu,
                region,
                capacity,
            });
        (
            Just(shards),
            prop::collection::vec(agent, 1..=4),
            prop::collection::vec(step(shards), 1..80),
        )
    })
}

fn caps(gpu: bool) -> Vec<String> {
    if gpu { vec!["gpu".into()] } else { vec![] }
}

fn apply(state: &mut State, now_ms: u64, cmd: Command) -> Outcome {
    let req = Request::Batch(Batch::unaudited(now_ms, now_ms, vec![cmd]));
    state.apply(&req).0.outcomes.remove(0)
}

fn agent_id(i: usize) -> AgentId {
    AgentId(format!("a{i}"))
}

/// Whether agent `a` could run task `t` (what the oracle counts).
fn could_run(a: &Agent, t: &Task) -> bool {
    let caps_ok = t.capabilities.iter().all(|c| a.gpu && c == "gpu");
    let region_ok = t
        .extras()
        .region
        .as_ref()
        .is_none_or(|r| !r.required || r.name == REGIONS[a.region]);
    caps_ok && region_ok
}

fn tasks_with(state: &State, status: TaskStatus) -> Vec<std::sync::Arc<Task>> {
    let filter = TaskFilter {
        status: Some(status),
        ..Default::default()
    };
    state.list(&filter, None, usize::MAX, usize::MAX).items
}

fn run(shards: usize, agents: &[Agent], steps: &[Step]) -> Result<(), TestCaseError> {
    let n = shards as u32;
    let mut states: Vec<State> = (1..=n)
        .map(|g| {
            let mut s = State::default();
            apply(&mut s, 0, Command::DefineGroup { group: g }).unwrap();
            s
        })
        .collect();
    let mut now = 1;
    for step in steps {
        now += 1;
        match step {
            Step::Submit {
                shard,
                priority,
                gpu,
                region,
            } => {
                let region = match region {
                    0 => None,
                    3 => Some(TaskRegion {
                        name: "eu".into(),
                        required: false,
                    }),
                    r => Some(TaskRegion {
                        name: REGIONS[r - 1].into(),
                        required: true,
                    }),
                };
                let submit = SubmitTask {
                    tenant: Tenant("t".into()),
                    priority: Some(*priority),
                    payload: "{}".into(),
                    capabilities: caps(*gpu),
                    region,
                    ..Default::default()
                };
                let out = apply(&mut states[*shard], now, Command::Submit(submit));
                let Ok(Reply::Submitted { task, .. }) = out else {
                    return Err(TestCaseError::fail(format!("submit: {out:?}")));
                };
                prop_assert_eq!(group_of(task.id.0, n), Some(*shard as u32 + 1));
            }
            Step::Complete(k) => {
                let live: Vec<(usize, FencingToken)> = states
                    .iter()
                    .enumerate()
                    .flat_map(|(g, s)| {
                        tasks_with(s, TaskStatus::Leased)
                            .into_iter()
                            .filter_map(move |t| t.lease.as_ref().map(|l| (g, l.token)))
                    })
                    .collect();
                if !live.is_empty() {
                    let (g, token) = live[k % live.len()];
                    let done = Command::Complete {
                        token,
                        result: "{}".into(),
                    };
                    prop_assert!(apply(&mut states[g], now, done).is_ok());
                }
            }
            Step::Pull => {
                // The node pulls until no agent with room has work anywhere
                // (a bounded number of rounds).
                for _ in 0..16 {
                    let slots: Vec<PullSlot> = agents
                        .iter()
                        .enumerate()
                        .map(|(i, a)| {
                            let load: u32 = states.iter().map(|s| s.agent_load(&agent_id(i))).sum();
                            PullSlot {
                                agent: agent_id(i),
                                free: a.capacity.saturating_sub(load),
                                min_priority: Priority::Low,
                                profile: Some(AgentProfile {
                                    capabilities: caps(a.gpu),
                                    gateway: GatewayId(format!("g{i}")),
                                    region: REGIONS[a.region].into(),
                                    capacity: a.capacity,
                                    session_room: 1000,
                                    placement_token: 1,
                                    kind: "sim".into(),
                                    model: None,
                                }),
                            }
                        })
                        .collect();
                    let views: Vec<&State> = states.iter().collect();
                    let plans = plan_pull(&views, &slots);
                    if plans.is_empty() {
                        break;
                    }
                    // One pull per shard, each agent in one of them.
                    let mut named = std::collections::BTreeSet::new();
                    for plan in &plans {
                        for slot in &plan.slots {
                            prop_assert!(
                                named.insert(slot.agent.clone()),
                                "{} named in two pulls of a round",
                                slot.agent
                            );
                        }
                    }
                    let shards: std::collections::BTreeSet<usize> =
                        plans.iter().map(|p| p.shard).collect();
                    prop_assert_eq!(shards.len(), plans.len(), "one pull per shard");
                    // The oracle: each agent's best over every shard, by scan.
                    let best: Vec<Option<Priority>> = agents
                        .iter()
                        .map(|a| {
                            states
                                .iter()
                                .flat_map(|s| tasks_with(s, TaskStatus::Pending))
                                .filter(|t| could_run(a, t))
                                .map(|t| t.priority)
                                .max()
                        })
                        .collect();
                    // The round's pulls, applied one after another as their
                    // shards would (each only changes its own shard).
                    let mut leased_any = false;
                    for plan in plans {
                        let spec = PullSpec {
                            round: DispatchSpec {
                                lease_ms: 30_000,
                                max: 100,
                                policy: DispatchPolicy::LeastLoaded,
                                node_dead_after_ms: 60_000,
                                session_limit_ms: 0,
                                session_idle_ms: 0,
                                session_checkpoint_every: 0,
                            },
                            node: 1,
                            slots: plan.slots,
                        };
                        let out = apply(&mut states[plan.shard], now, Command::Pull(spec));
                        let Ok(Reply::Dispatched(grants)) = out else {
                            return Err(TestCaseError::fail(format!("pull: {out:?}")));
                        };
                        for grant in &grants {
                            let i: usize = grant.task.lease.as_ref().unwrap().agent_id.0[1..]
                                .parse()
                                .unwrap();
                            prop_assert_eq!(
                                Some(grant.task.priority),
                                best[i],
                                "agent {} got #{} ({:?}) while its best ready was {:?}",
                                i,
                                grant.task.id.0,
                                grant.task.priority,
                                best[i]
                            );
                            prop_assert_eq!(
                                group_of(grant.token.0, n),
                                Some(plan.shard as u32 + 1)
                            );
                        }
                        leased_any |= !grants.is_empty();
                    }
                    for (i, a) in agents.iter().enumerate() {
                        let load: u32 = states.iter().map(|s| s.agent_load(&agent_id(i))).sum();
                        prop_assert!(load <= a.capacity, "agent {i}: {load} > {}", a.capacity);
                    }
                    if !leased_any {
                        break;
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
    fn a_pull_never_leases_below_a_ready_task_of_another_shard(
        (shards, agents, steps) in case()
    ) {
        run(shards, &agents, &steps)?;
    }
}
