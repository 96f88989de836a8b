//! Property tests for the state machine.
//!
//! Random sequences of batches (submits with random tenants, priorities,
//! capabilities, schedules and attempt limits; leases; renewals, completions
//! and failures with live and stale tokens; cancels, retries, replays, weight
//! changes, clock moves forward and back) are applied to `fsm::State` and to
//! the naive model in `fsm_props/model.rs`, and checked after every batch:
//! the same outcome per command, the same tasks, depth equal to the counts a
//! scan finds, one live lease per task with unique tokens, tokens that only
//! grow, a clock that never goes back, terminal tasks that never change, no
//! acknowledged task missing, an event for every change. Two more properties:
//! the same log gives the same state and bytes, and a snapshot decodes to an
//! equal state that then behaves identically.
//!
//! `PROPTEST_CASES=N` overrides the case counts below (chosen so the suite
//! takes a few seconds in debug). A failure prints the shrunk steps and the
//! first batch after which the state machine and the model disagree.

#[path = "fsm_props/model.rs"]
mod model;
#[path = "fsm_props/ops.rs"]
mod ops;

use std::collections::{BTreeMap, BTreeSet};

use godel::codec;
use godel::fsm::{
    Batch, Command, Event, Outcome, Priority, Rejection, Reply, Request, Response, State, Task,
    TaskId, TaskStatus, Tenant, What,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use model::{Expect, MTask, Model};
use ops::{Leader, Step, TENANTS, all_tasks, steps};

/// `cases` unless `PROPTEST_CASES` is set.
fn config(cases: u32) -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config
}

// ---------------------------------------------------------------------------
// Checks.

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(TestCaseError::fail(format!($($fmt)+)));
        }
    };
}

fn observe(outcome: &Outcome) -> Expect {
    match outcome {
        Ok(Reply::Submitted { task, created }) => Expect::Submitted {
            id: task.id.0,
            created: *created,
        },
        Ok(Reply::Leased(grants)) => {
            Expect::Leased(grants.iter().map(|g| (g.task.id.0, g.token.0)).collect())
        }
        Ok(Reply::Task(task)) => Expect::Task {
            id: task.id.0,
            status: task.status,
        },
        Ok(Reply::Replayed(ids)) => Expect::Replayed(ids.iter().map(|id| id.0).collect()),
        Ok(Reply::Done) => Expect::Done,
        Ok(Reply::Session(s)) => panic!("session reply from a queue command: {s:?}"),
        Ok(Reply::Purged(n)) => Expect::Purged(*n),
        Ok(Reply::Checkpoint(c)) => panic!("checkpoint reply from a queue command: {c:?}"),
        Ok(other @ (Reply::Dispatched(_) | Reply::Renewed { .. } | Reply::Released(_))) => {
            panic!("runtime reply from a queue command: {other:?}")
        }
        Ok(other @ (Reply::ApiKey(_) | Reply::Tenant { .. })) => {
            panic!("credential reply from a queue command: {other:?}")
        }
        Err(
            r
            @ (Rejection::Conflict(_) | Rejection::QuotaExceeded { .. } | Rejection::Forbidden(_)),
        ) => panic!("tenancy rejection from an unscoped queue command: {r}"),
        Err(Rejection::NotFound(_)) => Expect::NotFound,
        Err(Rejection::StaleToken(_)) => Expect::Stale,
        Err(Rejection::IllegalTransition { .. }) => Expect::Illegal,
        Err(Rejection::Invalid { field, .. }) => Expect::Invalid(field.clone()),
        Err(Rejection::TooLarge { .. }) => Expect::TooLarge,
        Err(r @ Rejection::SessionTransition { .. }) => {
            panic!("session rejection from a queue command: {r:?}")
        }
        Err(r @ Rejection::Unknown { .. }) => {
            panic!("registry rejection from a queue command: {r}")
        }
        Ok(Reply::NotHere) | Err(Rejection::StaleRoute { .. }) => {
            panic!("routing answer to an unrouted command: {outcome:?}")
        }
    }
}

/// Takes the state machine's jittered retry time for each task the model
/// failed in this batch, once it is checked to lie in the model's window.
fn adopt_retry_times(model: &mut Model, state: &State) -> Result<(), TestCaseError> {
    for t in &mut model.tasks {
        if let Some((lo, hi)) = t.retry_window.take() {
            let actual = state
                .task(TaskId(t.id))
                .and_then(|f| f.outcome().next_attempt_at_ms);
            ensure!(
                actual.is_some_and(|at| (lo..=hi).contains(&at)),
                "task {}: next attempt {actual:?} outside the backoff window {lo}..={hi}",
                t.id
            );
            t.next_attempt = actual;
        }
    }
    Ok(())
}

fn same_task(f: &Task, m: &MTask) -> Result<(), TestCaseError> {
    let lease = |l: &godel::fsm::LeaseInfo| {
        (
            l.token.0,
            l.agent_id.0.clone(),
            l.leased_at_ms,
            l.expires_at_ms,
        )
    };
    let actual = (
        f.status,
        f.priority,
        f.tenant.as_str(),
        &f.capabilities[..],
        f.attempts,
        f.max_attempts,
        f.lease.as_deref().map(lease),
        f.outcome().next_attempt_at_ms,
        &f.outcome().last_error,
        &f.outcome().result,
        f.idempotency_key.as_deref(),
    );
    let expected = (
        m.status,
        m.priority,
        m.tenant.as_str(),
        &m.caps[..],
        m.attempts,
        m.max_attempts,
        m.lease
            .as_ref()
            .map(|l| (l.token, l.agent.clone(), l.leased_at, l.expires)),
        m.next_attempt,
        &m.last_error,
        &m.result,
        m.key.as_deref(),
    );
    ensure!(
        actual == expected,
        "task {}: state machine {actual:?}\n  model {expected:?}",
        m.id
    );
    Ok(())
}

/// Depth per tenant, priority and status equals what a scan of the model
/// finds; the queue depth equals the pending tasks the state lists.
fn same_depth(model: &Model, state: &State, tasks: &[Task]) -> Result<(), TestCaseError> {
    let depth = state.depth();
    for tenant in depth.by_tenant.keys() {
        ensure!(
            TENANTS.contains(&tenant.as_str()),
            "depth has tenant {tenant}"
        );
    }
    for tenant in TENANTS {
        for p in Priority::URGENT_FIRST {
            for s in TaskStatus::ALL {
                let counted = depth.count(Some(p), s, Some(&Tenant::from(tenant)));
                let scanned = model.count(tenant, p, s);
                ensure!(
                    counted == scanned,
                    "depth {tenant}/{p:?}/{s:?}: state {counted}, model scan {scanned}"
                );
            }
        }
    }
    let pending = tasks
        .iter()
        .filter(|t| t.status == TaskStatus::Pending)
        .count() as u64;
    ensure!(
        depth.pending() == pending,
        "queue depth {} but {pending} pending tasks",
        depth.pending()
    );
    Ok(())
}

/// Exactly the leased and running tasks hold a lease, no two share a token,
/// and no token is above the last one handed out.
fn one_live_lease_per_task(state: &State, tasks: &[Task]) -> Result<(), TestCaseError> {
    let mut holders = BTreeMap::new();
    for t in tasks {
        let leased = matches!(t.status, TaskStatus::Leased | TaskStatus::Running);
        ensure!(
            leased == t.lease.is_some(),
            "task {} is {:?} with lease {:?}",
            t.id,
            t.status,
            t.lease
        );
        if let Some(l) = &t.lease {
            ensure!(
                l.token.0 <= state.last_token(),
                "token {} above the last",
                l.token
            );
            let other = holders.insert(l.token, t.id);
            ensure!(
                other.is_none(),
                "token {} held by {other:?} and {}",
                l.token,
                t.id
            );
        }
    }
    Ok(())
}

/// Every lease is one attempt the ledger counts when it ends (completed,
/// failed or lost), so the attempts counted plus the leases still live
/// are all the leases ever granted (`purged_leases`: those of tasks purged
/// since).
fn every_attempt_is_counted(
    state: &State,
    tasks: &[Task],
    purged_leases: u64,
) -> Result<(), TestCaseError> {
    let granted: u64 = tasks.iter().map(|t| u64::from(t.lease_count)).sum::<u64>() + purged_leases;
    let live = tasks.iter().filter(|t| t.lease.is_some()).count() as u64;
    let counted: u64 = state
        .ledger()
        .rows()
        .values()
        .map(|v| v.completed + v.failed_attempts + v.lost_attempts)
        .sum();
    ensure!(
        counted + live == granted,
        "{granted} leases granted, {live} live, but {counted} attempts counted"
    );
    Ok(())
}

/// Every task a batch's replies carry, as the reply saw it.
fn replied_tasks(response: &Response) -> impl Iterator<Item = &Task> {
    response.outcomes.iter().flat_map(|o| -> Vec<&Task> {
        match o {
            Ok(Reply::Submitted { task, .. }) | Ok(Reply::Task(task)) => vec![&**task],
            Ok(Reply::Leased(grants)) | Ok(Reply::Dispatched(grants)) => {
                grants.iter().map(|g| &*g.task).collect()
            }
            _ => Vec::new(),
        }
    })
}

/// What must hold from one batch to the next, whatever the model says.
#[derive(Default)]
struct History {
    clock_ms: u64,
    last_token: u64,
    /// Completed and cancelled tasks as first seen: they never change again.
    finished: BTreeMap<TaskId, Task>,
    /// Every task a submit created (acknowledged to its client).
    acknowledged: Vec<TaskId>,
    /// Each task's status, lease token and attempts after the last batch.
    seen: BTreeMap<TaskId, (TaskStatus, Option<u64>, u32)>,
    /// The last event seq seen.
    last_seq: u64,
    /// Each task's leases granted, as of the last batch.
    leases_seen: BTreeMap<TaskId, u32>,
    /// Tasks a purge forgot, and the leases they had been granted.
    forgotten: BTreeSet<TaskId>,
    purged_leases: u64,
}

impl History {
    /// Tasks that left the state: each finished and purged by the model
    /// too, and as many as the batch's purges reported.
    fn note_purges(
        &mut self,
        state: &State,
        tasks: &[Task],
        model: &Model,
        response: &Response,
    ) -> Result<(), TestCaseError> {
        let reported: u64 = response
            .outcomes
            .iter()
            .map(|o| match o {
                Ok(Reply::Purged(n)) => u64::from(*n),
                _ => 0,
            })
            .sum();
        // Known before this batch, or created by it.
        let created = response.outcomes.iter().filter_map(|o| match o {
            Ok(Reply::Submitted {
                task,
                created: true,
            }) => Some(task.id),
            _ => None,
        });
        let candidates: BTreeSet<TaskId> =
            self.leases_seen.keys().copied().chain(created).collect();
        let mut gone = 0;
        for id in candidates {
            if state.task(id).is_some() {
                continue;
            }
            let m = &model.tasks[(id.0 - 1) as usize];
            ensure!(
                m.purged && (m.finished_at.is_some() || m.status == TaskStatus::DeadLetter),
                "task {id} left the state unfinished or unpurged: {m:?}"
            );
            // Leases granted before this batch, or in it (a task leased,
            // finished and purged in one batch: its replies carry the count).
            let before = self.leases_seen.remove(&id).unwrap_or(0);
            let during = replied_tasks(response)
                .filter(|t| t.id == id)
                .map(|t| t.lease_count)
                .max()
                .unwrap_or(0);
            self.purged_leases += u64::from(before.max(during));
            self.finished.remove(&id);
            self.forgotten.insert(id);
            gone += 1;
        }
        ensure!(
            gone == reported,
            "{gone} tasks left the state, purges reported {reported}"
        );
        for t in tasks {
            self.leases_seen.insert(t.id, t.lease_count);
        }
        Ok(())
    }

    fn check(
        &mut self,
        state: &State,
        tasks: &[Task],
        response: &Response,
    ) -> Result<(), TestCaseError> {
        ensure!(
            state.clock_ms() >= self.clock_ms,
            "clock went back from {} to {}",
            self.clock_ms,
            state.clock_ms()
        );
        self.clock_ms = state.clock_ms();
        for outcome in &response.outcomes {
            match outcome {
                Ok(Reply::Leased(grants)) => {
                    for g in grants {
                        ensure!(
                            g.token.0 > self.last_token,
                            "token {} granted after token {}",
                            g.token,
                            self.last_token
                        );
                        self.last_token = g.token.0;
                    }
                }
                Ok(Reply::Submitted {
                    task,
                    created: true,
                }) => self.acknowledged.push(task.id),
                _ => {}
            }
        }
        ensure!(
            state.last_token() == self.last_token,
            "last token {} but the last grant was {}",
            state.last_token(),
            self.last_token
        );
        for id in &self.acknowledged {
            ensure!(
                state.task(*id).is_some() || self.forgotten.contains(id),
                "acknowledged task {id} is gone"
            );
        }
        for (id, before) in &self.finished {
            ensure!(
                state.task(*id) == Some(before),
                "finished task {id} changed: {:?}",
                state.task(*id)
            );
        }
        for t in tasks.iter().filter(|t| t.status.is_terminal()) {
            self.finished.entry(t.id).or_insert_with(|| t.clone());
        }
        Ok(())
    }

    /// Every change of status, lease or attempts comes with an event about
    /// the task; events carry the task's priority and tenant, and are
    /// numbered 1, 2, 3, ... with no gap across batches.
    fn check_events(&mut self, tasks: &[Task], events: &[Event]) -> Result<(), TestCaseError> {
        for e in events {
            ensure!(
                e.seq == self.last_seq + 1,
                "event {e:?} follows seq {}",
                self.last_seq
            );
            self.last_seq = e.seq;
            let What::Task {
                task: id,
                tenant,
                priority,
                ..
            } = &e.what
            else {
                continue;
            };
            let task = tasks.iter().find(|t| t.id == *id);
            // A task purged in the batch that its events describe is gone.
            ensure!(
                task.is_some_and(|t| t.priority == *priority && t.tenant == *tenant)
                    || (task.is_none() && self.forgotten.contains(id)),
                "event {e:?} does not match its task {task:?}"
            );
        }
        for t in tasks {
            let now = (t.status, t.lease.as_ref().map(|l| l.token.0), t.attempts);
            let before = self.seen.insert(t.id, now);
            ensure!(
                before == Some(now)
                    || events
                        .iter()
                        .any(|e| matches!(&e.what, What::Task { task, .. } if *task == t.id)),
                "task {} went from {before:?} to {now:?} without an event",
                t.id
            );
        }
        Ok(())
    }
}

/// A command's debug text, cut short (payloads can be 256 KiB).
fn brief(commands: &[Command]) -> String {
    let text = format!("{commands:?}");
    match text.char_indices().nth(600) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text,
    }
}

fn check_step(
    model: &mut Model,
    state: &State,
    history: &mut History,
    batch: &Batch,
    (response, events): &Applied,
    expected: &[Expect],
) -> Result<(), TestCaseError> {
    let actual: Vec<Expect> = response.outcomes.iter().map(observe).collect();
    ensure!(
        actual == expected,
        "outcomes differ\n  commands {}\n  state machine {actual:?}\n  model {expected:?}",
        brief(&batch.commands)
    );
    adopt_retry_times(model, state)?;
    let tasks = all_tasks(state);
    let held: Vec<&MTask> = model.held().collect();
    ensure!(
        tasks.len() == held.len(),
        "{} tasks, model has {}",
        tasks.len(),
        held.len()
    );
    for (f, m) in tasks.iter().zip(held) {
        same_task(f, m)?;
    }
    ensure!(
        state.clock_ms() == model.clock,
        "clock {} but model {}",
        state.clock_ms(),
        model.clock
    );
    ensure!(
        state.last_token() == model.last_token,
        "last token {} but model {}",
        state.last_token(),
        model.last_token
    );
    same_depth(model, state, &tasks)?;
    one_live_lease_per_task(state, &tasks)?;
    history.note_purges(state, &tasks, model, response)?;
    every_attempt_is_counted(state, &tasks, history.purged_leases)?;
    history.check_events(&tasks, events)?;
    history.check(state, &tasks, response)
}

fn run_against_model(steps: &[Step]) -> Result<(), TestCaseError> {
    let (mut state, mut model, mut history) =
        (State::default(), Model::default(), History::default());
    let mut leader = Leader { now_ms: 0 };
    for (n, step) in steps.iter().enumerate() {
        let request = leader.request(step, &state);
        let Request::Batch(batch) = &request;
        let applied = state.apply(&request);
        let expected = model.apply_batch(batch.now_ms, &batch.commands);
        check_step(&mut model, &state, &mut history, batch, &applied, &expected).map_err(|e| {
            let why = match e {
                TestCaseError::Fail(why) | TestCaseError::Reject(why) => why,
            };
            TestCaseError::fail(format!(
                "after step {n} (now={}): {}",
                batch.now_ms,
                why.message()
            ))
        })?;
    }
    Ok(())
}

type Applied = (Response, Vec<Event>);

/// Applies `steps` to a fresh state, recording the log and what each entry returned.
fn record(steps: &[Step]) -> (State, Leader, Vec<Request>, Vec<Applied>) {
    let (mut state, mut leader) = (State::default(), Leader { now_ms: 0 });
    let (mut log, mut applied) = (Vec::new(), Vec::new());
    for step in steps {
        let request = leader.request(step, &state);
        applied.push(state.apply(&request));
        log.push(request);
    }
    (state, leader, log, applied)
}

fn encode(state: &State) -> Vec<u8> {
    codec::encode(state).expect("a state always encodes")
}

proptest! {
    #![proptest_config(config(768))]

    /// The state machine and the naive model agree after every batch, and
    /// every invariant holds.
    #[test]
    fn state_machine_agrees_with_model(steps in steps(60)) {
        run_against_model(&steps)?;
    }
}

proptest! {
    #![proptest_config(config(128))]

    /// The same log applied to two fresh states gives the same responses,
    /// equal states and identical bytes.
    #[test]
    fn same_log_same_state(steps in steps(60)) {
        let (state, _, log, applied) = record(&steps);
        let (mut a, mut b) = (State::default(), State::default());
        for (request, expected) in log.iter().zip(&applied) {
            prop_assert_eq!(&a.apply(request), expected);
            prop_assert_eq!(&b.apply(request), expected);
        }
        prop_assert_eq!(&a, &state);
        prop_assert_eq!(&b, &state);
        prop_assert_eq!(encode(&a), encode(&b));
        prop_assert_eq!(encode(&a), encode(&state));
    }

    /// A snapshot taken at any point decodes to an equal state, which then
    /// answers every later entry exactly as the original does.
    #[test]
    fn snapshot_round_trip(steps in steps(60), split in any::<prop::sample::Index>()) {
        let at = split.index(steps.len() + 1);
        let (mut original, mut leader, _, _) = record(&steps[..at]);
        let bytes = encode(&original);
        let mut restored: State = codec::decode(&bytes).expect("a snapshot decodes");
        prop_assert_eq!(&restored, &original);
        prop_assert_eq!(encode(&restored), bytes);
        for step in &steps[at..] {
            let request = leader.request(step, &original);
            prop_assert_eq!(restored.apply(&request), original.apply(&request));
        }
        prop_assert_eq!(&restored, &original);
        prop_assert_eq!(encode(&restored), encode(&original));
    }
}
