//! What the property tests generate and how it becomes log entries.
//!
//! The generator produces abstract steps (a clock move, a seed, one to three
//! operations). A [`Leader`] resolves each step into a concrete batch against
//! the state just before it applies, using only the state's public reads, so
//! tokens and ids mostly hit live leases, dead letters and existing tasks, and
//! sometimes stale or unknown ones.

use godel::fsm::{
    AgentId, Backoff, Batch, Command, DeadLetterFilter, FencingToken, Priority, ReplaySelector,
    Request, State, SubmitTask, Task, TaskFilter, TaskId, TaskStatus, Tenant,
};
use proptest::prelude::*;

pub const TENANTS: [&str; 3] = ["a", "b", "c"];
const CAPS: [&str; 2] = ["gpu", "ssd"];
const ERRORS: [&str; 3] = ["disk", "net", "oom"];

#[derive(Clone, Debug)]
pub struct Step {
    time: TimeMove,
    seed: u64,
    ops: Vec<Op>,
}

#[derive(Clone, Copy, Debug)]
enum TimeMove {
    Stay,
    Forward(u64),
    /// The leader's clock goes back (a new leader with a slower clock).
    Back(u64),
}

#[derive(Clone, Debug)]
enum Op {
    Submit(SubmitOp),
    Lease {
        agent: &'static str,
        caps: Vec<&'static str>,
        max: u32,
        lease_ms: u64,
    },
    Renew {
        token: TokenPick,
        lease_ms: u64,
    },
    Complete {
        token: TokenPick,
        oversize: bool,
    },
    Fail {
        token: TokenPick,
        error: &'static str,
        retryable: bool,
    },
    Cancel {
        id: IdPick,
        reason: bool,
        keep_children: bool,
    },
    Retry {
        id: IdPick,
    },
    ReplayIds {
        ids: Vec<IdPick>,
        limit: u32,
    },
    ReplayFilter {
        tenant: Option<&'static str>,
        priority: Option<Priority>,
        error: Option<&'static str>,
        limit: u32,
    },
    Weight {
        tenant: &'static str,
        weight: u32,
    },
    Tick,
    Purge {
        age: u64,
        keep: u64,
        max: u32,
        /// How long ago dead letters must have died to go (`None`: kept).
        dead_age: Option<u64>,
    },
}

/// A live token when `live` and one exists, else any token handed out so
/// far or the next one (never handed out).
#[derive(Clone, Copy, Debug)]
struct TokenPick {
    live: bool,
    index: u16,
}

/// A dead letter when `dead_letter` and one exists, else any task id or the
/// next one (no such task).
#[derive(Clone, Copy, Debug)]
struct IdPick {
    dead_letter: bool,
    index: u16,
}

#[derive(Clone, Debug)]
struct SubmitOp {
    tenant: &'static str,
    priority: Option<Priority>,
    caps: Vec<&'static str>,
    /// Scheduled time relative to the leader's now.
    at: Option<i64>,
    attempts: Option<u32>,
    timeout_ms: Option<u64>,
    fast_backoff: bool,
    key: Option<&'static str>,
    parent: Option<IdPick>,
    bad: Option<Bad>,
}

/// One invalid field.
#[derive(Clone, Copy, Debug)]
enum Bad {
    Tenant,
    Payload,
    Oversize,
    Capability,
    Attempts,
    Timeout,
    Backoff,
}

fn token_pick() -> impl Strategy<Value = TokenPick> {
    (prop::bool::weighted(0.7), any::<u16>()).prop_map(|(live, index)| TokenPick { live, index })
}

fn id_pick() -> impl Strategy<Value = IdPick> {
    (prop::bool::weighted(0.5), any::<u16>())
        .prop_map(|(dead_letter, index)| IdPick { dead_letter, index })
}

fn caps() -> impl Strategy<Value = Vec<&'static str>> {
    prop::collection::vec(prop::sample::select(&CAPS[..]), 0..=2)
}

fn priority() -> impl Strategy<Value = Priority> {
    prop::sample::select(&Priority::URGENT_FIRST[..])
}

fn bad() -> impl Strategy<Value = Option<Bad>> {
    use Bad::*;
    let kinds = vec![
        Tenant, Payload, Oversize, Capability, Attempts, Timeout, Backoff,
    ];
    prop_oneof![12 => Just(None), 1 => prop::sample::select(kinds).prop_map(Some)]
}

fn submit_op() -> impl Strategy<Value = SubmitOp> {
    let shape = (
        prop::sample::select(&TENANTS[..]),
        prop::option::of(priority()),
        caps(),
        prop::option::weighted(0.2, -2_000i64..20_000),
        prop::option::of(1u32..=4),
        prop::option::of(prop::sample::select(&[500u64, 5_000, 20_000][..])),
    );
    let extras = (
        any::<bool>(),
        prop::option::weighted(0.3, prop::sample::select(&["k1", "k2", "k3"][..])),
        prop::option::weighted(0.2, id_pick()),
        bad(),
    );
    (shape, extras).prop_map(
        |((tenant, priority, caps, at, attempts, timeout_ms), (fast, key, parent, bad))| SubmitOp {
            tenant,
            priority,
            caps,
            at,
            attempts,
            timeout_ms,
            fast_backoff: fast,
            key,
            parent,
            bad,
        },
    )
}

fn op() -> impl Strategy<Value = Op> {
    let lease_ms = || prop::sample::select(&[500u64, 3_000, 30_000][..]);
    let limit = || prop_oneof![19 => 1u32..=4, 1 => Just(0u32)];
    let ids = prop_oneof![
        9 => prop::collection::vec(id_pick(), 1..=3),
        1 => Just(Vec::new()),
    ];
    prop_oneof![
        6 => submit_op().prop_map(Op::Submit),
        5 => (
            prop::sample::select(&["w1", "w2"][..]),
            caps(),
            prop_oneof![19 => 1u32..=4, 1 => Just(0u32)],
            lease_ms(),
        )
            .prop_map(|(agent, caps, max, lease_ms)| Op::Lease { agent, caps, max, lease_ms }),
        3 => (token_pick(), lease_ms()).prop_map(|(token, lease_ms)| Op::Renew { token, lease_ms }),
        3 => (token_pick(), prop::bool::weighted(0.05))
            .prop_map(|(token, oversize)| Op::Complete { token, oversize }),
        3 => (token_pick(), prop::sample::select(&ERRORS[..]), prop::bool::weighted(0.7))
            .prop_map(|(token, error, retryable)| Op::Fail { token, error, retryable }),
        2 => (id_pick(), any::<bool>(), any::<bool>()).prop_map(|(id, reason, keep_children)| {
            Op::Cancel {
                id,
                reason,
                keep_children,
            }
        }),
        1 => id_pick().prop_map(|id| Op::Retry { id }),
        2 => (ids, prop_oneof![8 => Just(100u32), 1 => 1u32..=2, 1 => Just(0u32)])
            .prop_map(|(ids, limit)| Op::ReplayIds { ids, limit }),
        2 => (
            prop::option::of(prop::sample::select(&TENANTS[..])),
            prop::option::of(priority()),
            prop::option::of(prop::sample::select(&ERRORS[..])),
            limit(),
        )
            .prop_map(|(tenant, priority, error, limit)| Op::ReplayFilter {
                tenant,
                priority,
                error,
                limit,
            }),
        1 => (prop::sample::select(&TENANTS[..]), 0u32..=3)
            .prop_map(|(tenant, weight)| Op::Weight { tenant, weight }),
        1 => Just(Op::Tick),
        1 => (
            prop_oneof![Just(0u64), 1u64..5_000, Just(u64::MAX)],
            prop_oneof![Just(u64::MAX), 0u64..4],
            prop_oneof![8 => 1u32..=3, 1 => Just(10_000u32), 1 => Just(0u32)],
            prop_oneof![Just(None), Just(Some(0u64)), (1u64..5_000).prop_map(Some)],
        )
            .prop_map(|(age, keep, max, dead_age)| Op::Purge {
                age,
                keep,
                max,
                dead_age,
            }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let time = prop_oneof![
        4 => Just(TimeMove::Stay),
        4 => (1u64..3_000).prop_map(TimeMove::Forward),
        1 => (3_000u64..40_000).prop_map(TimeMove::Forward),
        1 => (1u64..5_000).prop_map(TimeMove::Back),
    ];
    (time, any::<u64>(), prop::collection::vec(op(), 1..=3)).prop_map(|(time, seed, ops)| Step {
        time,
        seed,
        ops,
    })
}

pub fn steps(max: usize) -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(step(), 1..=max)
}

pub fn all_tasks(state: &State) -> Vec<Task> {
    state
        .list(&TaskFilter::default(), None, usize::MAX, usize::MAX)
        .items
        .iter()
        .map(|t| Task::clone(t))
        .collect()
}

fn pick_token(state: &State, tasks: &[Task], pick: TokenPick) -> FencingToken {
    let live: Vec<u64> = tasks
        .iter()
        .filter_map(|t| t.lease.as_ref().map(|l| l.token.0))
        .collect();
    let index = usize::from(pick.index);
    if pick.live && !live.is_empty() {
        return FencingToken(live[index % live.len()]);
    }
    FencingToken(1 + (index as u64) % (state.last_token() + 1))
}

fn pick_id(tasks: &[Task], pick: IdPick) -> TaskId {
    let dead: Vec<TaskId> = tasks
        .iter()
        .filter(|t| t.status == TaskStatus::DeadLetter)
        .map(|t| t.id)
        .collect();
    let index = usize::from(pick.index);
    if pick.dead_letter && !dead.is_empty() {
        return dead[index % dead.len()];
    }
    // Ids run from 1 to the last one (purges leave holes); one past it is
    // no task.
    let last = tasks.iter().map(|t| t.id.0).max().unwrap_or(0);
    TaskId(1 + index as u64 % (last + 1))
}

fn submit_command(op: &SubmitOp, now_ms: u64, tasks: &[Task]) -> Command {
    let mut spec = SubmitTask {
        tenant: Tenant::from(op.tenant),
        priority: op.priority,
        payload: r#"{"n":1}"#.into(),
        capabilities: op.caps.iter().map(|c| c.to_string()).collect(),
        scheduled_at_ms: op.at.map(|d| now_ms.saturating_add_signed(d)),
        max_attempts: op.attempts,
        timeout_ms: op.timeout_ms,
        backoff: op.fast_backoff.then_some(Backoff {
            initial_ms: 100,
            multiplier: 3,
            max_ms: 2_000,
        }),
        idempotency_key: op.key.map(str::to_owned),
        parent_id: op.parent.map(|p| pick_id(tasks, p)),
        ..SubmitTask::default()
    };
    match op.bad {
        None => {}
        Some(Bad::Tenant) => spec.tenant = Tenant::from(""),
        Some(Bad::Payload) => spec.payload = "{oops".into(),
        Some(Bad::Oversize) => spec.payload = format!("{{\"p\":\"{}\"}}", "x".repeat(262_137)),
        Some(Bad::Capability) => spec.capabilities.push("no spaces".into()),
        Some(Bad::Attempts) => spec.max_attempts = Some(0),
        Some(Bad::Timeout) => spec.timeout_ms = Some(50),
        Some(Bad::Backoff) => {
            spec.backoff = Some(Backoff {
                multiplier: 0,
                ..Backoff::default()
            })
        }
    }
    Command::Submit(spec)
}

fn command(op: &Op, state: &State, now_ms: u64) -> Command {
    let tasks = all_tasks(state);
    match op {
        Op::Submit(s) => submit_command(s, now_ms, &tasks),
        Op::Lease {
            agent,
            caps,
            max,
            lease_ms,
        } => Command::Lease {
            agent_id: AgentId::from(*agent),
            capabilities: caps.iter().map(|c| c.to_string()).collect(),
            max: *max,
            lease_ms: *lease_ms,
        },
        Op::Renew { token, lease_ms } => Command::Renew {
            token: pick_token(state, &tasks, *token),
            lease_ms: *lease_ms,
        },
        Op::Complete { token, oversize } => Command::Complete {
            token: pick_token(state, &tasks, *token),
            result: if *oversize {
                "x".repeat(262_145)
            } else {
                r#"{"ok":true}"#.into()
            },
        },
        Op::Fail {
            token,
            error,
            retryable,
        } => Command::Fail {
            token: pick_token(state, &tasks, *token),
            error: (*error).into(),
            retryable: *retryable,
            usage: retryable.then(|| godel::fsm::ReportedUsage {
                input_tokens: 3,
                output_tokens: 2,
                model: Some("m".into()),
            }),
        },
        Op::Cancel {
            id,
            reason,
            keep_children,
        } => Command::Cancel {
            id: pick_id(&tasks, *id),
            reason: reason.then(|| "operator".into()),
            keep_children: *keep_children,
        },
        Op::Retry { id } => Command::Retry {
            id: pick_id(&tasks, *id),
        },
        Op::ReplayIds { .. } | Op::ReplayFilter { .. } => replay_command(op, &tasks),
        Op::Weight { tenant, weight } => Command::SetTenantWeight {
            tenant: Tenant::from(*tenant),
            weight: *weight,
        },
        Op::Tick => Command::Tick,
        Op::Purge {
            age,
            keep,
            max,
            dead_age,
        } => Command::Purge {
            finished_before_ms: now_ms.saturating_sub(*age),
            keep: *keep,
            max: *max,
            dead_before_ms: dead_age.map_or(0, |a| now_ms.saturating_sub(a)),
        },
    }
}

fn replay_command(op: &Op, tasks: &[Task]) -> Command {
    let (selector, limit) = match op {
        Op::ReplayIds { ids, limit } => {
            let ids = ids.iter().map(|p| pick_id(tasks, *p)).collect();
            (ReplaySelector::Ids(ids), *limit)
        }
        Op::ReplayFilter {
            tenant,
            priority,
            error,
            limit,
        } => {
            let filter = DeadLetterFilter {
                tenant: tenant.map(Tenant::from),
                priority: *priority,
                error_contains: error.map(str::to_owned),
            };
            (ReplaySelector::Filter(filter), *limit)
        }
        other => unreachable!("not a replay: {other:?}"),
    };
    Command::Replay { selector, limit }
}

/// The leader: moves its clock, then resolves and stamps one step into a
/// request against `state`. Commands of one batch are resolved against the
/// state before the batch.
pub struct Leader {
    pub now_ms: u64,
}

impl Leader {
    pub fn request(&mut self, step: &Step, state: &State) -> Request {
        self.now_ms = match step.time {
            TimeMove::Stay => self.now_ms,
            TimeMove::Forward(d) => self.now_ms + d,
            TimeMove::Back(d) => self.now_ms.saturating_sub(d),
        };
        Request::Batch(Batch::unaudited(
            self.now_ms,
            step.seed,
            step.ops
                .iter()
                .map(|op| command(op, state, self.now_ms))
                .collect(),
        ))
    }
}
