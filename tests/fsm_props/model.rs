//! A naive reference model of the task queue, written from the semantics the
//! `fsm` essay states rather than from its code: tasks in a `Vec` indexed by
//! id, every question answered by a linear scan, no indexes to keep in step.
//!
//! Backoff jitter comes from the leader's seed through a mixing function the
//! model does not reproduce: a failed task gets the window its next attempt
//! must fall in, and the harness adopts the state machine's value after
//! checking it lies in that window.

use godel::fsm::{
    Backoff, Command, DeadLetterFilter, Priority, ReplaySelector, SubmitTask, TaskStatus,
};

/// What a command should come to; compared with the state machine's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    Submitted {
        id: u64,
        created: bool,
    },
    /// `(task id, token)` per grant, in grant order.
    Leased(Vec<(u64, u64)>),
    Task {
        id: u64,
        status: TaskStatus,
    },
    Replayed(Vec<u64>),
    Done,
    NotFound,
    Stale,
    Illegal,
    Invalid(String),
    TooLarge,
    Purged(u32),
}

fn invalid(field: &str) -> Expect {
    Expect::Invalid(field.to_owned())
}

#[derive(Clone, Debug)]
pub struct MLease {
    pub token: u64,
    pub agent: String,
    pub leased_at: u64,
    pub expires: u64,
}

#[derive(Clone, Debug)]
pub struct MTask {
    pub id: u64,
    pub tenant: String,
    pub priority: Priority,
    pub caps: Vec<String>,
    pub key: Option<String>,
    pub status: TaskStatus,
    pub attempts: u32,
    pub max_attempts: u32,
    pub timeout_ms: u64,
    pub backoff: Backoff,
    pub scheduled_at: Option<u64>,
    pub next_attempt: Option<u64>,
    /// While failed and not yet adopted: the window `next_attempt` must fall in.
    pub retry_window: Option<(u64, u64)>,
    pub lease: Option<MLease>,
    pub last_error: Option<String>,
    pub result: Option<String>,
    /// The task that spawned it.
    pub parent: Option<u64>,
    /// When it completed or was cancelled.
    pub finished_at: Option<u64>,
    /// When it was last dead-lettered.
    pub dead_at: Option<u64>,
    /// Forgotten by a purge: no longer in the state.
    pub purged: bool,
}

impl MTask {
    fn is_leased(&self) -> bool {
        matches!(self.status, TaskStatus::Leased | TaskStatus::Running)
    }
}

#[derive(Clone, Debug, Default)]
pub struct Model {
    pub clock: u64,
    /// `tasks[i].id == i + 1`.
    pub tasks: Vec<MTask>,
    pub last_token: u64,
    weights: Vec<(String, u32)>,
    /// Per priority, most urgent first: the tenant served last and how many
    /// consecutive leases it has had in its turn.
    turns: [Option<(String, u32)>; 4],
}

const MAX_NAME: usize = 256;

fn name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/".contains(c))
}

fn text_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME && !s.chars().any(char::is_control)
}

fn sorted(caps: &[String]) -> Vec<String> {
    let mut caps = caps.to_vec();
    caps.sort();
    caps.dedup();
    caps
}

/// The field at fault in a submission, if any.
fn submit_problem(s: &SubmitTask) -> Option<Expect> {
    if !name_ok(&s.tenant.0) {
        return Some(invalid("tenant"));
    }
    if s.payload.len() > 256 * 1024 {
        return Some(Expect::TooLarge);
    }
    let object = serde_json::from_str::<serde_json::Value>(&s.payload).is_ok_and(|v| v.is_object());
    if !object {
        return Some(invalid("payload"));
    }
    if s.capabilities.len() > 32 || !s.capabilities.iter().all(|c| name_ok(c)) {
        return Some(invalid("capabilities"));
    }
    if s.session_key.as_ref().is_some_and(|k| !text_ok(&k.0)) {
        return Some(invalid("session_key"));
    }
    if s.idempotency_key.as_ref().is_some_and(|k| !text_ok(k)) {
        return Some(invalid("idempotency_key"));
    }
    if s.max_attempts.is_some_and(|n| !(1..=100).contains(&n)) {
        return Some(invalid("max_attempts"));
    }
    if s.timeout_ms
        .is_some_and(|t| !(100..=7 * 24 * 3_600_000).contains(&t))
    {
        return Some(invalid("timeout_ms"));
    }
    let day = 24 * 3_600_000;
    if s.backoff.is_some_and(|b| {
        !(1..=day).contains(&b.initial_ms)
            || !(1..=10).contains(&b.multiplier)
            || !(b.initial_ms..=day).contains(&b.max_ms)
    }) {
        return Some(invalid("backoff"));
    }
    None
}

/// Where the delay after `failures` failures may fall: the capped
/// exponential base, give or take a quarter, never above the cap (the upper
/// end allows one ms of rounding).
pub fn backoff_window(b: &Backoff, failures: u32) -> (u64, u64) {
    let mut base = u128::from(b.initial_ms);
    for _ in 1..failures {
        base = (base * u128::from(b.multiplier)).min(u128::from(b.max_ms));
    }
    let base = u64::try_from(base).expect("capped at max_ms");
    let lo = base - base / 4;
    let hi = base + base.div_ceil(4);
    (lo.clamp(1, b.max_ms), hi.clamp(1, b.max_ms))
}

impl Model {
    /// Applies one batch: advance the clock and fire timers, then each command.
    pub fn apply_batch(&mut self, now_ms: u64, commands: &[Command]) -> Vec<Expect> {
        self.advance(now_ms);
        commands.iter().map(|c| self.apply(c)).collect()
    }

    pub fn task(&self, id: u64) -> Option<&MTask> {
        id.checked_sub(1)
            .and_then(|i| self.tasks.get(usize::try_from(i).ok()?))
            .filter(|t| !t.purged)
    }

    /// The tasks the state still holds.
    pub fn held(&self) -> impl Iterator<Item = &MTask> {
        self.tasks.iter().filter(|t| !t.purged)
    }

    fn index_of(&self, id: u64) -> Option<usize> {
        self.task(id).map(|t| (t.id - 1) as usize)
    }

    fn apply(&mut self, command: &Command) -> Expect {
        match command {
            Command::Submit(spec) => self.submit(spec),
            Command::Lease {
                agent_id,
                capabilities,
                max,
                lease_ms,
            } => self.lease(&agent_id.0, capabilities, *max, *lease_ms),
            Command::Renew { token, lease_ms } => self.renew(token.0, *lease_ms),
            Command::Complete { token, result } => self.complete(token.0, result),
            Command::Fail {
                token,
                error,
                retryable,
                ..
            } => match self.live(token.0) {
                Some(i) => {
                    self.fail_attempt(i, error.clone(), *retryable);
                    self.reply(i)
                }
                None => Expect::Stale,
            },
            Command::Cancel {
                id,
                reason,
                keep_children,
            } => self.cancel(id.0, reason.as_deref(), *keep_children),
            Command::Retry { id } => self.retry(id.0),
            Command::Replay { selector, limit } => self.replay(selector, *limit),
            Command::SetTenantWeight { tenant, weight } => {
                if !name_ok(&tenant.0) {
                    return invalid("tenant");
                }
                if !(1..=1000).contains(weight) {
                    return invalid("weight");
                }
                self.weights.retain(|(t, _)| *t != tenant.as_str());
                self.weights.push((tenant.to_string(), *weight));
                Expect::Done
            }
            Command::Tick => Expect::Done,
            Command::Purge {
                finished_before_ms,
                keep,
                max,
                dead_before_ms,
            } => self.purge(*finished_before_ms, *keep, *max, *dead_before_ms),
            // The task queue's model does not cover the registries (tested
            // by their own unit tests); the generator never produces these.
            other => unreachable!("registry command in the queue model: {other:?}"),
        }
    }

    fn reply(&self, i: usize) -> Expect {
        Expect::Task {
            id: self.tasks[i].id,
            status: self.tasks[i].status,
        }
    }

    /// The clock never goes back. Scheduled and failed tasks whose time has
    /// come become pending. A leased task whose attempt deadline (lease
    /// start plus timeout) came strictly before its lease expiry fails as
    /// timed out; otherwise an expired lease returns it to pending, no
    /// attempt spent.
    fn advance(&mut self, now_ms: u64) {
        self.clock = self.clock.max(now_ms);
        let clock = self.clock;
        let due = |at: Option<u64>| at.is_some_and(|at| at <= clock);
        for i in 0..self.tasks.len() {
            let t = &self.tasks[i];
            let (ready, timed_out, expired) = match (&t.status, &t.lease) {
                (TaskStatus::Scheduled, _) => (due(t.scheduled_at), false, false),
                (TaskStatus::Failed, _) => (due(t.next_attempt), false, false),
                (TaskStatus::Leased | TaskStatus::Running, Some(lease)) => {
                    let deadline = lease.leased_at + t.timeout_ms;
                    let timed_out = deadline <= clock && deadline < lease.expires;
                    (false, timed_out, lease.expires <= clock)
                }
                _ => (false, false, false),
            };
            if timed_out {
                self.fail_attempt(i, "attempt timed out".into(), true);
            } else if ready || expired {
                let t = &mut self.tasks[i];
                t.status = TaskStatus::Pending;
                t.lease = None;
                t.next_attempt = None;
            }
        }
    }

    fn submit(&mut self, s: &SubmitTask) -> Expect {
        if let Some(problem) = submit_problem(s) {
            return problem;
        }
        if let Some(key) = &s.idempotency_key
            && let Some(t) = self
                .held()
                .find(|t| t.tenant == s.tenant.as_str() && t.key.as_ref() == Some(key))
        {
            return Expect::Submitted {
                id: t.id,
                created: false,
            };
        }
        let parent_priority = match s.parent_id {
            Some(p) => match self.task(p.0).filter(|t| t.tenant == s.tenant.as_str()) {
                Some(parent) => Some(parent.priority),
                None => return invalid("parent_id"),
            },
            None => None,
        };
        let id = self.tasks.len() as u64 + 1;
        let scheduled = s.scheduled_at_ms.is_some_and(|at| at > self.clock);
        self.tasks.push(MTask {
            id,
            tenant: s.tenant.to_string(),
            priority: s.priority.or(parent_priority).unwrap_or(Priority::Medium),
            caps: sorted(&s.capabilities),
            key: s.idempotency_key.clone(),
            status: if scheduled {
                TaskStatus::Scheduled
            } else {
                TaskStatus::Pending
            },
            attempts: 0,
            max_attempts: s.max_attempts.unwrap_or(3),
            timeout_ms: s.timeout_ms.unwrap_or(600_000),
            backoff: s.backoff.unwrap_or(Backoff {
                initial_ms: 1000,
                multiplier: 2,
                max_ms: 30_000,
            }),
            scheduled_at: s.scheduled_at_ms,
            next_attempt: None,
            retry_window: None,
            lease: None,
            last_error: None,
            result: None,
            parent: s.parent_id.map(|p| p.0),
            finished_at: None,
            dead_at: None,
            purged: false,
        });
        Expect::Submitted { id, created: true }
    }

    fn lease(&mut self, agent: &str, caps: &[String], max: u32, lease_ms: u64) -> Expect {
        if agent.is_empty() || agent.len() > MAX_NAME {
            return invalid("agent_id");
        }
        if !(1..=1000).contains(&max) {
            return invalid("max");
        }
        if !(100..=3_600_000).contains(&lease_ms) {
            return invalid("lease_ms");
        }
        let mut grants = Vec::new();
        while grants.len() < max as usize {
            let Some(i) = self.pick(caps) else { break };
            self.last_token += 1;
            let t = &mut self.tasks[i];
            t.status = TaskStatus::Leased;
            t.lease = Some(MLease {
                token: self.last_token,
                agent: agent.to_owned(),
                leased_at: self.clock,
                expires: self.clock + lease_ms,
            });
            grants.push((t.id, self.last_token));
        }
        Expect::Leased(grants)
    }

    fn weight(&self, tenant: &str) -> u32 {
        self.weights
            .iter()
            .find(|(t, _)| t == tenant)
            .map_or(1, |(_, w)| *w)
    }

    /// Strict priority; within it weighted round robin over tenants in name
    /// order; within the tenant the oldest task the agent can run.
    fn pick(&mut self, agent_caps: &[String]) -> Option<usize> {
        for (rank, priority) in Priority::URGENT_FIRST.into_iter().enumerate() {
            let runnable = |t: &MTask| {
                t.status == TaskStatus::Pending
                    && t.priority == priority
                    && t.caps.iter().all(|c| agent_caps.contains(c))
            };
            let mut tenants: Vec<String> = self
                .tasks
                .iter()
                .filter(|t| runnable(t))
                .map(|t| t.tenant.clone())
                .collect();
            tenants.sort();
            tenants.dedup();
            if tenants.is_empty() {
                continue;
            }
            let (tenant, used) = match &self.turns[rank] {
                Some((last, used)) if *used < self.weight(last) && tenants.contains(last) => {
                    (last.clone(), used + 1)
                }
                Some((last, _)) => {
                    let next = tenants.iter().find(|t| *t > last).unwrap_or(&tenants[0]);
                    (next.clone(), 1)
                }
                None => (tenants[0].clone(), 1),
            };
            let i = self
                .tasks
                .iter()
                .position(|t| runnable(t) && t.tenant == tenant);
            self.turns[rank] = Some((tenant, used));
            return i;
        }
        None
    }

    /// The task whose live lease is `token`.
    fn live(&self, token: u64) -> Option<usize> {
        self.tasks
            .iter()
            .position(|t| t.is_leased() && t.lease.as_ref().is_some_and(|l| l.token == token))
    }

    fn renew(&mut self, token: u64, lease_ms: u64) -> Expect {
        if !(100..=3_600_000).contains(&lease_ms) {
            return invalid("lease_ms");
        }
        let Some(i) = self.live(token) else {
            return Expect::Stale;
        };
        let clock = self.clock;
        let t = &mut self.tasks[i];
        t.status = TaskStatus::Running;
        t.lease.as_mut().expect("live").expires = clock + lease_ms;
        self.reply(i)
    }

    fn complete(&mut self, token: u64, result: &str) -> Expect {
        if result.len() > 256 * 1024 {
            return Expect::TooLarge;
        }
        let Some(i) = self.live(token) else {
            return Expect::Stale;
        };
        let clock = self.clock;
        let t = &mut self.tasks[i];
        t.status = TaskStatus::Completed;
        t.finished_at = Some(clock);
        t.lease = None;
        t.result = Some(result.to_owned());
        self.reply(i)
    }

    /// Spends an attempt; dead-letters when none are left or not retryable,
    /// else waits out the backoff.
    fn fail_attempt(&mut self, i: usize, error: String, retryable: bool) {
        let clock = self.clock;
        let t = &mut self.tasks[i];
        t.attempts += 1;
        t.lease = None;
        t.last_error = Some(error);
        t.next_attempt = None;
        if !retryable || t.attempts >= t.max_attempts {
            t.status = TaskStatus::DeadLetter;
            t.dead_at = Some(clock);
            t.retry_window = None;
        } else {
            t.status = TaskStatus::Failed;
            let (lo, hi) = backoff_window(&t.backoff, t.attempts);
            t.retry_window = Some((clock + lo, clock + hi));
        }
    }

    /// Cancels a task and, unless `keep_children`, every unfinished task
    /// below it in the parent tree, each with "parent P was cancelled".
    fn cancel(&mut self, id: u64, reason: Option<&str>, keep_children: bool) -> Expect {
        let Some(i) = self.index_of(id) else {
            return Expect::NotFound;
        };
        if matches!(
            self.tasks[i].status,
            TaskStatus::Completed | TaskStatus::Cancelled
        ) {
            return Expect::Illegal;
        }
        self.cancel_one(i, reason.map(str::to_owned));
        let reply = self.reply(i);
        let mut parents = if keep_children { vec![] } else { vec![id] };
        while let Some(p) = parents.pop() {
            let children: Vec<usize> = (0..self.tasks.len())
                .filter(|&c| {
                    self.tasks[c].parent == Some(p)
                        && !self.tasks[c].purged
                        && !matches!(
                            self.tasks[c].status,
                            TaskStatus::Completed | TaskStatus::Cancelled
                        )
                })
                .collect();
            for c in children {
                self.cancel_one(c, Some(format!("parent {p} was cancelled")));
                parents.push(self.tasks[c].id);
            }
        }
        reply
    }

    fn cancel_one(&mut self, i: usize, reason: Option<String>) {
        let clock = self.clock;
        let t = &mut self.tasks[i];
        t.status = TaskStatus::Cancelled;
        t.finished_at = Some(clock);
        t.lease = None;
        t.next_attempt = None;
        t.retry_window = None;
        if let Some(r) = reason {
            t.last_error = Some(r);
        }
    }

    fn retry(&mut self, id: u64) -> Expect {
        let Some(i) = self.index_of(id) else {
            return Expect::NotFound;
        };
        if !matches!(
            self.tasks[i].status,
            TaskStatus::Failed | TaskStatus::DeadLetter
        ) {
            return Expect::Illegal;
        }
        self.requeue(i);
        self.reply(i)
    }

    /// Ready now; a dead letter starts its attempts afresh.
    fn requeue(&mut self, i: usize) {
        let t = &mut self.tasks[i];
        if t.status == TaskStatus::DeadLetter {
            t.attempts = 0;
        }
        t.status = TaskStatus::Pending;
        t.next_attempt = None;
        t.retry_window = None;
    }

    fn replay(&mut self, selector: &ReplaySelector, limit: u32) -> Expect {
        if !(1..=10_000).contains(&limit) {
            return invalid("limit");
        }
        let chosen: Vec<usize> = match selector {
            ReplaySelector::Ids(ids) => {
                if ids.is_empty() || ids.len() > limit as usize {
                    return invalid("ids");
                }
                let mut ids: Vec<u64> = ids.iter().map(|id| id.0).collect();
                ids.sort();
                ids.dedup();
                let mut chosen = Vec::new();
                for id in ids {
                    match self.index_of(id) {
                        None => return Expect::NotFound,
                        Some(i) if self.tasks[i].status != TaskStatus::DeadLetter => {
                            return Expect::Illegal;
                        }
                        Some(i) => chosen.push(i),
                    }
                }
                chosen
            }
            ReplaySelector::Filter(f) => (0..self.tasks.len())
                .filter(|&i| self.dead_letter_matches(i, f))
                .take(limit as usize)
                .collect(),
        };
        for &i in &chosen {
            self.requeue(i);
        }
        Expect::Replayed(chosen.iter().map(|&i| self.tasks[i].id).collect())
    }

    fn dead_letter_matches(&self, i: usize, f: &DeadLetterFilter) -> bool {
        let t = &self.tasks[i];
        t.status == TaskStatus::DeadLetter
            && !t.purged
            && f.tenant.as_ref().is_none_or(|x| x.as_str() == t.tenant)
            && f.priority.is_none_or(|p| p == t.priority)
            && f.error_contains.as_ref().is_none_or(|needle| {
                t.last_error
                    .as_ref()
                    .is_some_and(|e| e.contains(needle.as_str()))
            })
    }

    /// Tasks of `tenant` at `priority` with `status`, by scanning.
    /// Forgets finished tasks, oldest finished first (ties by id): those
    /// that finished before `before`, then the oldest while more than
    /// `keep` remain; then dead letters that died before `dead_before`,
    /// oldest first, but those with unfinished children; at most `max` in
    /// all, looking at most `max` + 64 dead letters deep. (No task here
    /// has dependents.)
    fn purge(&mut self, before: u64, keep: u64, max: u32, dead_before: u64) -> Expect {
        if !(1..=10_000).contains(&max) {
            return invalid("max");
        }
        let mut finished: Vec<(u64, u64)> = self
            .held()
            .filter_map(|t| t.finished_at.map(|at| (at, t.id)))
            .collect();
        finished.sort_unstable();
        let over = (finished.len() as u64).saturating_sub(keep);
        let mut chosen = Vec::new();
        for (i, (at, id)) in finished.into_iter().enumerate() {
            if chosen.len() == max as usize || (at >= before && i as u64 >= over) {
                break;
            }
            chosen.push(id);
        }
        let mut dead: Vec<(u64, u64)> = self
            .held()
            .filter(|t| t.status == TaskStatus::DeadLetter)
            .map(|t| (t.dead_at.expect("a dead letter died"), t.id))
            .collect();
        dead.sort_unstable();
        for (i, (at, id)) in dead.into_iter().enumerate() {
            if chosen.len() == max as usize || i >= max as usize + 64 || at >= dead_before {
                break;
            }
            let parent_of_unfinished = self.held().any(|c| {
                c.parent == Some(id)
                    && !matches!(c.status, TaskStatus::Completed | TaskStatus::Cancelled)
            });
            if !parent_of_unfinished {
                chosen.push(id);
            }
        }
        for &id in &chosen {
            self.tasks[(id - 1) as usize].purged = true;
        }
        Expect::Purged(chosen.len() as u32)
    }

    pub fn count(&self, tenant: &str, priority: Priority, status: TaskStatus) -> u64 {
        self.held()
            .filter(|t| t.tenant == tenant && t.priority == priority && t.status == status)
            .count() as u64
    }
}
