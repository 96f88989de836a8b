//! Leases: grant, renew, complete, fail. Every report carries a fencing token;
//! a token that is not a task's live lease is rejected and changes nothing.

use super::command::{LeaseGrant, Outcome, Rejection, Reply};
use super::event::{Event, EventKind};
use super::queue::normalize_caps;
use super::registry::GatewayId;
use super::retry::backoff_delay_ms;
use super::state::{State, truncate};
use super::task::{AgentId, FencingToken, LeaseInfo, Limits, TaskId, TaskStatus, Tenant};
use super::usage::{ReportedUsage, TaskUsage, UsageKey, UsageTotals, WaitKey, day_of, parse_usage};

impl State {
    pub(crate) fn lease(
        &mut self,
        agent: &AgentId,
        capabilities: &[String],
        max: u32,
        lease_ms: u64,
        tenant: Option<&Tenant>,
        events: &mut Vec<Event>,
    ) -> Outcome {
        if agent.0.is_empty() || agent.0.len() > Limits::MAX_NAME_BYTES {
            return Err(Rejection::invalid("agent_id", "must be 1..=256 bytes"));
        }
        if !(1..=Limits::MAX_LEASES_PER_REQUEST).contains(&max) {
            let problem = format!("must be 1..={}", Limits::MAX_LEASES_PER_REQUEST);
            return Err(Rejection::invalid("max", problem));
        }
        check_lease_ms(lease_ms)?;
        let caps = normalize_caps(capabilities);
        // A worker leasing by itself is in the region of the gateway it is
        // registered on, if it is registered: only then may it take a task
        // that requires a region (a preference does not bind it).
        let region = self
            .registry
            .agents
            .get(agent)
            .and_then(|a| self.registry.gateways.get(&a.reg.gateway))
            .map(|g| g.reg.region.clone());
        let mut grants = Vec::new();
        while grants.len() < max as usize {
            let weights = &self.weights;
            let weight = |t: &Tenant| weights.get(t).copied().unwrap_or(1);
            let tasks = &self.tasks;
            let sessions = &self.sessions;
            // A worker leasing by itself runs outside sessions, but not
            // the work of a session an operator paused.
            let allowed = |id| {
                let t = &tasks[&id];
                t.may_run_in(region.as_deref())
                    && t.session_key.as_ref().is_none_or(|k| {
                        sessions
                            .by_key(&t.tenant, k)
                            .is_none_or(|s| s.state != super::session::SessionState::Paused)
                    })
            };
            let picked = match tenant {
                None => self.ready.pick_allowed(&caps, weight, &allowed),
                Some(t) => self.ready.pick_in(t, &caps, &allowed),
            };
            let Some(id) = picked else {
                break;
            };
            let gateway = self
                .registry
                .agents
                .get(agent)
                .map(|a| a.reg.gateway.clone());
            grants.push(self.grant(id, agent, gateway.as_ref(), lease_ms, events));
        }
        Ok(Reply::Leased(grants))
    }

    pub(crate) fn grant(
        &mut self,
        id: TaskId,
        agent: &AgentId,
        gateway: Option<&GatewayId>,
        lease_ms: u64,
        events: &mut Vec<Event>,
    ) -> LeaseGrant {
        self.last_token = super::state::mint(self.last_token, self.group);
        let token = FencingToken(self.last_token);
        let lease = LeaseInfo {
            token,
            agent_id: agent.clone(),
            leased_at_ms: self.clock_ms,
            expires_at_ms: self.clock_ms.saturating_add(lease_ms),
            gateway: gateway.cloned(),
        };
        let t = &self.tasks[&id];
        if t.lease_count == 0 {
            let ready_at = t.extras().ready_at_ms.unwrap_or(t.created_at_ms);
            let key = WaitKey {
                tenant: t.tenant.clone(),
                day: day_of(self.clock_ms),
                priority: t.priority,
            };
            self.ledger
                .waited(key, self.clock_ms.saturating_sub(ready_at));
        }
        let expires_at_ms = lease.expires_at_ms;
        self.move_task(id, TaskStatus::Leased, |t| {
            t.lease = Some(Box::new(lease));
            t.lease_count += 1;
            t.outcome_mut().last_agent = Some(agent.clone());
        })
        .expect("invariant: picked tasks are pending");
        self.emit(
            events,
            id,
            EventKind::Leased {
                token,
                agent: agent.clone(),
            },
        );
        LeaseGrant {
            token,
            expires_at_ms,
            task: self.boxed(id),
        }
    }

    /// Counts leased task `id`'s attempt, ending now as `end`, in the
    /// ledger (under the day, model, gateway and agent it ran with); its
    /// time from lease to now, in ms.
    fn count_attempt(
        &mut self,
        id: TaskId,
        end: AttemptEnd,
        model: Option<String>,
        input_tokens: u64,
        output_tokens: u64,
    ) -> u64 {
        let t = &self.tasks[&id];
        let lease = t
            .lease
            .as_ref()
            .expect("invariant: leased tasks have a lease");
        let compute_ms = self.clock_ms.saturating_sub(lease.leased_at_ms);
        let key = UsageKey {
            tenant: t.tenant.clone(),
            day: day_of(self.clock_ms),
            model,
            gateway: lease.gateway.clone(),
            agent: lease.agent_id.clone(),
        };
        let totals = UsageTotals {
            completed: u64::from(end == AttemptEnd::Completed),
            failed_attempts: u64::from(end == AttemptEnd::Failed),
            lost_attempts: u64::from(end == AttemptEnd::Lost),
            input_tokens,
            output_tokens,
            compute_ms,
        };
        self.ledger.add(key, &totals);
        compute_ms
    }

    /// Counts task `id`'s attempt as lost (no report) if it is leased and
    /// about to become `to`: its lease expired or was given back, or it is
    /// cancelled while it runs.
    pub(crate) fn count_lost_attempt(&mut self, id: TaskId, to: TaskStatus) {
        let leased = self
            .tasks
            .get(&id)
            .is_some_and(|t| t.status.is_leased() && t.status.can_become(to));
        if leased {
            self.count_attempt(id, AttemptEnd::Lost, None, 0, 0);
        }
    }

    /// The task holding live lease `token`.
    fn leased_task(&self, token: FencingToken) -> Result<TaskId, Rejection> {
        self.leases
            .get(&token)
            .copied()
            .ok_or(Rejection::StaleToken(token))
    }

    pub(crate) fn renew(
        &mut self,
        token: FencingToken,
        lease_ms: u64,
        events: &mut Vec<Event>,
    ) -> Outcome {
        check_lease_ms(lease_ms)?;
        let id = self.leased_task(token)?;
        let expires = self.clock_ms.saturating_add(lease_ms);
        let starting = self.tasks[&id].status == TaskStatus::Leased;
        self.edit_in_place(id, |t| {
            t.status = TaskStatus::Running;
            t.lease
                .as_mut()
                .expect("invariant: leased tasks have a lease")
                .expires_at_ms = expires;
        });
        if starting {
            self.emit(events, id, EventKind::Started);
            self.session_task_started(id);
        }
        Ok(Reply::Task(self.boxed(id)))
    }

    pub(crate) fn complete(
        &mut self,
        token: FencingToken,
        result: &str,
        events: &mut Vec<Event>,
    ) -> Outcome {
        if result.len() > Limits::MAX_RESULT_BYTES {
            let problem = format!(
                "is {} bytes; the limit is {}",
                result.len(),
                Limits::MAX_RESULT_BYTES
            );
            return Err(Rejection::TooLarge {
                field: "result".into(),
                problem,
            });
        }
        let id = self.leased_task(token)?;
        let (input_tokens, output_tokens, model) = parse_usage(result).unwrap_or_default();
        let compute_ms = self.count_attempt(
            id,
            AttemptEnd::Completed,
            model.clone(),
            input_tokens,
            output_tokens,
        );
        self.session_turn(id, Some(result), input_tokens, output_tokens);
        let usage =
            (input_tokens > 0 || output_tokens > 0 || model.is_some()).then_some(TaskUsage {
                input_tokens,
                output_tokens,
                model,
                compute_ms,
            });
        self.move_task(id, TaskStatus::Completed, |t| {
            t.lease = None;
            let o = t.outcome_mut();
            o.result = Some(result.to_owned());
            o.usage = usage;
        })
        .expect("invariant: leased tasks can complete");
        self.emit(events, id, EventKind::Completed);
        Ok(Reply::Task(self.boxed(id)))
    }

    pub(crate) fn fail(
        &mut self,
        token: FencingToken,
        error: &str,
        retryable: bool,
        usage: Option<&ReportedUsage>,
        entropy: u64,
        events: &mut Vec<Event>,
    ) -> Outcome {
        let id = self.leased_task(token)?;
        self.fail_attempt_using(
            id,
            truncate(error, Limits::MAX_ERROR_BYTES),
            retryable,
            usage,
            entropy,
            events,
        );
        Ok(Reply::Task(self.boxed(id)))
    }

    /// Ends a leased attempt as failed (counted in the ledger): spends an
    /// attempt, then waits out the backoff or, with none left (or not
    /// retryable), dead-letters the task.
    pub(crate) fn fail_attempt(
        &mut self,
        id: TaskId,
        error: String,
        retryable: bool,
        entropy: u64,
        events: &mut Vec<Event>,
    ) {
        self.fail_attempt_using(id, error, retryable, None, entropy, events);
    }

    /// [`State::fail_attempt`], counting the tokens the worker reported
    /// the attempt used.
    fn fail_attempt_using(
        &mut self,
        id: TaskId,
        error: String,
        retryable: bool,
        usage: Option<&ReportedUsage>,
        entropy: u64,
        events: &mut Vec<Event>,
    ) {
        let (input, output, model) = usage.map(ReportedUsage::bounded).unwrap_or_default();
        self.count_attempt(id, AttemptEnd::Failed, model, input, output);
        if input > 0 || output > 0 {
            self.session_turn(id, None, input, output);
        }
        let task = &self.tasks[&id];
        let failures = task.attempts + 1;
        let out_of_attempts = !retryable || failures >= task.max_attempts;
        let retry_at =
            self.clock_ms
                .saturating_add(backoff_delay_ms(&task.backoff, failures, entropy));
        let to = if out_of_attempts {
            TaskStatus::DeadLetter
        } else {
            TaskStatus::Failed
        };
        self.move_task(id, to, |t| {
            t.lease = None;
            t.attempts = failures;
            let o = t.outcome_mut();
            o.last_error = Some(error);
            o.next_attempt_at_ms = (!out_of_attempts).then_some(retry_at);
        })
        .expect("invariant: leased tasks can fail");
        let kind = if out_of_attempts {
            EventKind::DeadLettered
        } else {
            EventKind::Failed {
                retry_at_ms: retry_at,
            }
        };
        self.emit(events, id, kind);
    }
}

/// How an attempt ended, as the ledger counts it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AttemptEnd {
    Completed,
    Failed,
    Lost,
}

pub(crate) fn check_lease_ms(lease_ms: u64) -> Result<(), Rejection> {
    let (lo, hi) = Limits::LEASE_MS_RANGE;
    if !(lo..=hi).contains(&lease_ms) {
        return Err(Rejection::invalid(
            "lease_ms",
            format!("must be {lo}..={hi}"),
        ));
    }
    Ok(())
}
