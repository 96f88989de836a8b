//! Gateway sessions in the replicated state: one record per conversation on
//! a gateway, keyed for affinity by its session key while it lives.
//!
//! A session is opened by the node that owns its gateway, moves through the
//! lifecycle table ([`SessionState::can_become`]) by commands, and ends in a
//! terminal state. A session with a time limit is ended as `timeout` by the
//! state machine's clock, like a lease. While a session lives, its key maps
//! to it, so tasks with that key go to the same session.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::command::{Outcome, Rejection, Reply, check_name};
use super::event::{Event, EventKind, What};
use super::registry::{GatewayId, not_found};
use super::retry::mix;
use super::state::State;
use super::task::{AgentId, SessionKey, TaskId, Tenant};

/// A session's identity, from a counter.
pub type SessionId = u64;

/// The key a gateway knows a tenant's session by: `<tenant>~<key>`.
/// Affinity keys are per tenant, so the gateway-side conversation must be
/// too; `~` is outside the tenant alphabet, so no two (tenant, key) pairs
/// give the same name.
pub fn gateway_session_key(tenant: &Tenant, key: &SessionKey) -> SessionKey {
    SessionKey(format!("{tenant}~{key}"))
}

/// Where a session is in its life. Every legal move is in
/// [`SessionState::can_become`].
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// Recorded, nothing opened yet.
    Created,
    /// Being opened on the gateway.
    Initializing,
    /// Open and idle; takes the next task with its session key.
    Ready,
    /// Running a task.
    Running,
    /// Closing after its last task.
    Completing,
    /// Closed normally. Terminal.
    Completed,
    /// The gateway reported a failure. Terminal.
    Failed,
    /// Killed by an operator or a cancelled task. Terminal.
    Cancelled,
    /// Ran past its time limit. Terminal.
    Timeout,
    /// Lost (gateway gone, node dead). Terminal.
    Error,
}

impl std::fmt::Display for SessionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl SessionState {
    /// The state's name in the API (snake_case).
    pub fn as_str(self) -> &'static str {
        use SessionState::*;
        match self {
            Created => "created",
            Initializing => "initializing",
            Ready => "ready",
            Running => "running",
            Completing => "completing",
            Completed => "completed",
            Failed => "failed",
            Cancelled => "cancelled",
            Timeout => "timeout",
            Error => "error",
        }
    }

    /// The one table of legal session transitions.
    pub fn can_become(self, to: SessionState) -> bool {
        use SessionState::*;
        if self.is_terminal() {
            return false;
        }
        matches!(
            (self, to),
            (Created, Initializing)
                | (Initializing, Ready)
                | (Ready, Running | Completing)
                | (Running, Ready | Completing)
                | (Completing, Completed)
        ) || matches!(to, Failed | Cancelled | Timeout | Error)
    }

    /// Whether the session has ended.
    pub fn is_terminal(self) -> bool {
        use SessionState::*;
        matches!(self, Completed | Failed | Cancelled | Timeout | Error)
    }
}

/// What the state knows about a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Its id.
    pub id: SessionId,
    /// The gateway it runs on.
    pub gateway: GatewayId,
    /// The tenant whose tasks run in it: affinity keys are per tenant, so
    /// two tenants using the same key never share a conversation.
    pub tenant: Tenant,
    /// The affinity key, if any.
    pub session_key: Option<SessionKey>,
    /// The agent driving it.
    pub agent: Option<AgentId>,
    /// Where it is in its life.
    pub state: SessionState,
    /// The task it runs now.
    pub task: Option<TaskId>,
    /// When it is ended as `timeout`, ms since the epoch.
    pub deadline_ms: Option<u64>,
    /// Why it ended, when it did not complete.
    pub reason: Option<String>,
    /// Closed after this long `ready` with no task, in ms (0: never).
    pub idle_ms: u64,
    /// Creation time.
    pub created_at_ms: u64,
    /// Time of the last change.
    pub updated_at_ms: u64,
}

/// Sessions and their indexes, part of [`State`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sessions {
    last_id: SessionId,
    records: BTreeMap<SessionId, Arc<SessionRecord>>,
    /// Live sessions by tenant and key (affinity).
    by_key: BTreeMap<(Tenant, SessionKey), SessionId>,
    /// Live sessions with a time limit, by deadline.
    deadlines: BTreeSet<(u64, SessionId)>,
    /// Idle sessions that close for idleness, by closing time.
    idle: BTreeSet<(u64, SessionId)>,
    /// Live sessions per gateway (backpressure).
    live_by_gateway: BTreeMap<GatewayId, u32>,
}

/// A session to open.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenSession {
    /// The gateway (must be registered).
    pub gateway: GatewayId,
    /// Whose session it is.
    pub tenant: Tenant,
    /// Affinity key: refused while another live session of the tenant holds it.
    pub session_key: Option<SessionKey>,
    /// The agent driving it.
    pub agent: Option<AgentId>,
    /// Longest life, in ms.
    pub time_limit_ms: Option<u64>,
}

/// Longest reason kept, in bytes.
const MAX_REASON_BYTES: usize = 1024;

impl Sessions {
    /// The last session id handed out (0: none yet).
    pub(crate) fn last_id(&self) -> SessionId {
        self.last_id
    }

    /// One session.
    pub fn get(&self, id: SessionId) -> Option<&Arc<SessionRecord>> {
        self.records.get(&id)
    }

    /// All sessions, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<SessionRecord>> {
        self.records.values()
    }

    /// The live session of `tenant` holding `key`.
    pub fn by_key(&self, tenant: &Tenant, key: &SessionKey) -> Option<&Arc<SessionRecord>> {
        // The map is keyed by owned pairs; lookups build one (two short
        // strings), which is cheaper than a second index.
        self.by_key
            .get(&(tenant.clone(), key.clone()))
            .and_then(|id| self.records.get(id))
    }

    /// The earliest session deadline or idle close.
    pub(crate) fn next_deadline(&self) -> Option<u64> {
        [self.deadlines.first(), self.idle.first()]
            .into_iter()
            .flatten()
            .map(|(at, _)| *at)
            .min()
    }

    /// The earliest session timer: `(time, session)`.
    pub(crate) fn next_due(&self) -> Option<(u64, SessionId)> {
        [self.deadlines.first(), self.idle.first()]
            .into_iter()
            .flatten()
            .copied()
            .min()
    }

    /// Live sessions on `gateway`.
    pub fn live_on(&self, gateway: &GatewayId) -> u32 {
        self.live_by_gateway.get(gateway).copied().unwrap_or(0)
    }

    /// Whether no live session holds `key`, or the one that does is ready,
    /// idle and driven by `agent` (or by no agent yet): a task with that key
    /// may go to `agent` now.
    pub(crate) fn admits(&self, tenant: &Tenant, key: &SessionKey, agent: &AgentId) -> bool {
        match self.by_key(tenant, key) {
            None => true,
            Some(s) => {
                s.state == SessionState::Ready
                    && s.task.is_none()
                    && s.agent.as_ref().is_none_or(|a| a == agent)
            }
        }
    }
}

impl State {
    /// The sessions.
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    pub(crate) fn open_session(&mut self, open: &OpenSession) -> Outcome {
        if self.registry.gateway(&open.gateway).is_none() {
            return Err(not_found("gateway", &open.gateway));
        }
        if let Some(key) = &open.session_key {
            check_name("session_key", &key.0, true).map_err(|(f, p)| Rejection::invalid(f, p))?;
            let owned = (open.tenant.clone(), key.clone());
            if let Some(live) = self.sessions.by_key.get(&owned) {
                return Err(Rejection::invalid(
                    "session_key",
                    format!("`{key}` is held by live session {live}"),
                ));
            }
        }
        Ok(Reply::Session(self.insert_session(open, 0)))
    }

    /// Records a new session (the caller checked gateway and key).
    fn insert_session(&mut self, open: &OpenSession, idle_ms: u64) -> Arc<SessionRecord> {
        let now = self.clock_ms;
        self.sessions.last_id = super::state::mint(self.sessions.last_id, self.group);
        let id = self.sessions.last_id;
        let deadline_ms = open.time_limit_ms.map(|ms| now.saturating_add(ms));
        let rec = SessionRecord {
            id,
            gateway: open.gateway.clone(),
            tenant: open.tenant.clone(),
            session_key: open.session_key.clone(),
            agent: open.agent.clone(),
            state: SessionState::Created,
            task: None,
            deadline_ms,
            reason: None,
            idle_ms,
            created_at_ms: now,
            updated_at_ms: now,
        };
        if let Some(key) = &rec.session_key {
            self.sessions
                .by_key
                .insert((rec.tenant.clone(), key.clone()), id);
        }
        if let Some(at) = deadline_ms {
            self.sessions.deadlines.insert((at, id));
        }
        *self
            .sessions
            .live_by_gateway
            .entry(rec.gateway.clone())
            .or_default() += 1;
        let rec = Arc::new(rec);
        self.sessions.records.insert(id, Arc::clone(&rec));
        self.notice_session(&rec);
        rec
    }

    /// Records that session `rec` is now in its state (with the reason of
    /// an end).
    fn notice_session(&mut self, rec: &SessionRecord) {
        self.notice(What::Session {
            id: rec.id,
            tenant: rec.tenant.clone(),
            gateway: rec.gateway.clone(),
            state: rec.state,
            reason: rec
                .state
                .is_terminal()
                .then(|| rec.reason.clone())
                .flatten(),
        });
    }

    /// Moves a session along its lifecycle; terminal states free its key.
    pub(crate) fn move_session(
        &mut self,
        id: SessionId,
        to: SessionState,
        task: Option<TaskId>,
        reason: Option<&str>,
    ) -> Outcome {
        let now = self.clock_ms;
        let slot = self
            .sessions
            .records
            .get_mut(&id)
            .ok_or_else(|| not_found("session", id))?;
        if !slot.state.can_become(to) {
            return Err(Rejection::SessionTransition {
                id,
                from: slot.state,
                to,
            });
        }
        if slot.state == SessionState::Ready && slot.idle_ms > 0 {
            let at = slot.updated_at_ms.saturating_add(slot.idle_ms);
            self.sessions.idle.remove(&(at, id));
        }
        let rec = Arc::make_mut(slot);
        rec.state = to;
        rec.task = if matches!(to, SessionState::Running | SessionState::Initializing) {
            task
        } else {
            None
        };
        rec.updated_at_ms = now;
        if to == SessionState::Ready && rec.idle_ms > 0 {
            self.sessions
                .idle
                .insert((now.saturating_add(rec.idle_ms), id));
        }
        if let Some(r) = reason {
            rec.reason = Some(super::state::truncate(r, MAX_REASON_BYTES));
        }
        let rec = Arc::clone(slot);
        self.notice_session(&rec);
        if to.is_terminal() {
            if let Some(key) = &rec.session_key {
                self.sessions
                    .by_key
                    .remove(&(rec.tenant.clone(), key.clone()));
            }
            if let Some(at) = rec.deadline_ms {
                self.sessions.deadlines.remove(&(at, id));
            }
            if let Some(n) = self.sessions.live_by_gateway.get_mut(&rec.gateway) {
                *n -= 1;
                if *n == 0 {
                    self.sessions.live_by_gateway.remove(&rec.gateway);
                }
            }
        }
        Ok(Reply::Session(rec))
    }

    /// Fires the earliest session timer (the caller checked it is due): a
    /// time limit ends the session as `timeout`, failing the attempt it was
    /// running (which frees the agent); an idle session closes as
    /// `completed`.
    pub(crate) fn fire_session_timer(&mut self, seed: u64, events: &mut Vec<Event>) {
        let deadline = self.sessions.deadlines.first().copied();
        let idle = self.sessions.idle.first().copied();
        match (deadline, idle) {
            (Some((at, id)), i) if i.is_none_or(|i| (at, id) <= i) => {
                let entropy = mix(seed ^ id.rotate_left(17));
                self.end_session(
                    id,
                    SessionState::Timeout,
                    "time limit reached",
                    entropy,
                    events,
                )
                .expect("invariant: sessions with deadlines are live");
            }
            (_, Some((_, id))) => {
                for to in [SessionState::Completing, SessionState::Completed] {
                    self.move_session(id, to, None, None)
                        .expect("invariant: idle sessions are ready");
                }
            }
            (None, None) => {}
            (Some(_), None) => unreachable!("the first arm takes a deadline with no idle timer"),
        }
    }

    /// Ends the live sessions driven by `agent` as `error` (the agent was
    /// deregistered or moved to another gateway).
    pub(crate) fn end_agent_sessions(&mut self, agent: &AgentId, why: &str) {
        let ids: Vec<SessionId> = self
            .sessions
            .by_key
            .values()
            .copied()
            .filter(|id| self.sessions.records[id].agent.as_ref() == Some(agent))
            .collect();
        for id in ids {
            self.move_session(id, SessionState::Error, None, Some(why))
                .expect("invariant: sessions by key are live");
        }
    }

    /// An operator ends a live session as `cancelled`.
    pub(crate) fn kill_session(
        &mut self,
        id: SessionId,
        reason: Option<&str>,
        entropy: u64,
        events: &mut Vec<Event>,
    ) -> Outcome {
        let reason = reason.unwrap_or("killed by an operator");
        self.end_session(id, SessionState::Cancelled, reason, entropy, events)
    }

    /// Ends a session in terminal state `to`; the attempt it was running
    /// fails (retryable) with `reason`, freeing the agent's capacity.
    fn end_session(
        &mut self,
        id: SessionId,
        to: SessionState,
        reason: &str,
        entropy: u64,
        events: &mut Vec<Event>,
    ) -> Outcome {
        let task = self.sessions.get(id).and_then(|s| s.task);
        let reply = self.move_session(id, to, None, Some(reason))?;
        if let Some(task) = task
            && self.tasks.get(&task).is_some_and(|t| t.status.is_leased())
        {
            let token = self.live_token(task);
            if to == SessionState::Timeout {
                self.emit(events, task, EventKind::TimedOut { token });
            }
            self.fail_attempt(
                task,
                format!("session {id} ended: {reason}"),
                true,
                entropy,
                events,
            );
        }
        Ok(reply)
    }

    /// Binds a just-leased task to its session: the idle live session for
    /// its key (which [`Sessions::admits`] checked is the agent's), or a new
    /// one on the agent's gateway. Tasks without a key have no session.
    pub(crate) fn session_for_grant(
        &mut self,
        task: TaskId,
        agent: &AgentId,
        gateway: &GatewayId,
        limit_ms: u64,
        idle_ms: u64,
    ) {
        let t = &self.tasks[&task];
        let Some(key) = t.session_key.clone() else {
            return;
        };
        let tenant = t.tenant.clone();
        if let Some(live) = self.sessions.by_key(&tenant, &key).map(|s| s.id) {
            let slot = self
                .sessions
                .records
                .get_mut(&live)
                .expect("invariant: sessions by key exist");
            if slot.agent.is_none() {
                Arc::make_mut(slot).agent = Some(agent.clone());
            }
            self.move_session(live, SessionState::Running, Some(task), None)
                .expect("invariant: dispatch admits only idle sessions of the agent");
            return;
        }
        let open = OpenSession {
            gateway: gateway.clone(),
            tenant,
            session_key: Some(key),
            agent: Some(agent.clone()),
            time_limit_ms: (limit_ms > 0).then_some(limit_ms),
        };
        let id = self.insert_session(&open, idle_ms).id;
        self.move_session(id, SessionState::Initializing, Some(task), None)
            .expect("invariant: new sessions can initialize");
    }

    /// The task's attempt started: its session, if opening, is now open and
    /// running it.
    pub(crate) fn session_task_started(&mut self, task: TaskId) {
        let Some(s) = self.session_of(task) else {
            return;
        };
        if s.state == SessionState::Initializing {
            for (to, t) in [
                (SessionState::Ready, None),
                (SessionState::Running, Some(task)),
            ] {
                self.move_session(s.id, to, t, None)
                    .expect("invariant: an opening session becomes ready, then runs");
            }
        }
    }

    /// The task's attempt ended (any way): its session is idle again, or
    /// ends as `error` if its gateway is unusable (see
    /// [`State::end_idle_sessions_on`]).
    pub(crate) fn session_task_ended(&mut self, task: TaskId) {
        if let Some(s) = self.session_of(task) {
            let (to, why) = match self.gateway_unusable(&s.gateway) {
                Some(why) => (SessionState::Error, Some(why)),
                None => (SessionState::Ready, None),
            };
            self.move_session(s.id, to, None, why.as_deref())
                .expect("invariant: a session with a task can become ready or end");
        }
    }

    /// Ends the idle live sessions on `gateway` (ready, no task) as `error`
    /// with `why`: the gateway cannot serve them, and a task with one of
    /// their keys would otherwise wait for it rather than open a session
    /// elsewhere. The gateway-side conversation is lost either way.
    pub(crate) fn end_idle_sessions_on(&mut self, gateway: &GatewayId, why: &str) {
        let ids: Vec<SessionId> = self
            .sessions
            .by_key
            .values()
            .copied()
            .filter(|id| {
                let s = &self.sessions.records[id];
                s.gateway == *gateway && s.state == SessionState::Ready && s.task.is_none()
            })
            .collect();
        for id in ids {
            self.move_session(id, SessionState::Error, None, Some(why))
                .expect("invariant: sessions by key are live");
        }
    }

    /// The live session whose current task is `task`.
    fn session_of(&self, task: TaskId) -> Option<Arc<SessionRecord>> {
        let t = self.tasks.get(&task)?;
        self.sessions
            .by_key(&t.tenant, t.session_key.as_ref()?)
            .filter(|s| s.task == Some(task))
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::{Command, GatewayRegistration};

    fn apply(state: &mut State, now_ms: u64, cmd: Command) -> Outcome {
        state.apply_one(now_ms, cmd)
    }

    fn with_gateway() -> State {
        let mut s = State::default();
        let reg = GatewayRegistration {
            id: GatewayId("gw".into()),
            kind: "sim".into(),
            spec: "{}".into(),
            region: "eu".into(),
            capabilities: vec![],
            max_sessions: 4,
        };
        apply(&mut s, 0, Command::RegisterGateway(reg)).unwrap();
        s
    }

    fn open(key: Option<&str>, limit: Option<u64>) -> Command {
        Command::OpenSession(OpenSession {
            gateway: GatewayId("gw".into()),
            tenant: Tenant::from("a"),
            session_key: key.map(|k| SessionKey(k.into())),
            agent: None,
            time_limit_ms: limit,
        })
    }

    fn state_of(s: &State, id: SessionId) -> SessionState {
        s.sessions().get(id).unwrap().state
    }

    #[test]
    fn lifecycle_and_affinity() {
        let mut s = with_gateway();
        let Ok(Reply::Session(r)) = apply(&mut s, 10, open(Some("k1"), None)) else {
            panic!()
        };
        assert!(
            apply(&mut s, 11, open(Some("k1"), None)).is_err(),
            "key held by a live session"
        );
        let mv = |to, task| Command::MoveSession {
            id: r.id,
            to,
            task,
            reason: None,
        };
        apply(&mut s, 12, mv(SessionState::Initializing, None)).unwrap();
        assert!(
            apply(&mut s, 12, mv(SessionState::Running, None)).is_err(),
            "must be ready first"
        );
        apply(&mut s, 13, mv(SessionState::Ready, None)).unwrap();
        apply(&mut s, 14, mv(SessionState::Running, Some(TaskId(7)))).unwrap();
        assert_eq!(
            s.sessions()
                .by_key(&"a".into(), &SessionKey("k1".into()))
                .unwrap()
                .task,
            Some(TaskId(7))
        );
        apply(&mut s, 15, mv(SessionState::Completing, None)).unwrap();
        apply(&mut s, 16, mv(SessionState::Completed, None)).unwrap();
        assert!(
            s.sessions()
                .by_key(&"a".into(), &SessionKey("k1".into()))
                .is_none(),
            "ended sessions free their key"
        );
        assert!(apply(&mut s, 17, open(Some("k1"), None)).is_ok());
        let mut other = OpenSession {
            gateway: GatewayId("gw".into()),
            tenant: Tenant::from("b"),
            session_key: Some(SessionKey("k1".into())),
            agent: None,
            time_limit_ms: None,
        };
        let Ok(Reply::Session(b)) = apply(&mut s, 17, Command::OpenSession(other.clone())) else {
            panic!("another tenant's key k1 is a different session")
        };
        assert_eq!(b.tenant, Tenant::from("b"));
        assert!(apply(&mut s, 17, Command::OpenSession(other.clone())).is_err());
        other.tenant = Tenant::from("c");
        assert!(apply(&mut s, 17, Command::OpenSession(other)).is_ok());
        assert!(
            apply(&mut s, 18, mv(SessionState::Error, None)).is_err(),
            "terminal stays terminal"
        );
    }

    #[test]
    fn time_limit_ends_a_session_as_timeout() {
        let mut s = with_gateway();
        let Ok(Reply::Session(r)) = apply(&mut s, 100, open(Some("k"), Some(1000))) else {
            panic!()
        };
        assert_eq!(s.next_due_ms(), Some(1100));
        apply(&mut s, 1099, Command::Tick).unwrap();
        assert_eq!(state_of(&s, r.id), SessionState::Created);
        apply(&mut s, 1100, Command::Tick).unwrap();
        assert_eq!(state_of(&s, r.id), SessionState::Timeout);
        assert_eq!(
            s.sessions().get(r.id).unwrap().reason.as_deref(),
            Some("time limit reached")
        );
        assert!(
            s.sessions()
                .by_key(&"a".into(), &SessionKey("k".into()))
                .is_none()
        );
    }

    #[test]
    fn dispatch_waits_for_a_session_that_is_not_ready() {
        use crate::fsm::{AgentRegistration, DispatchPolicy, DispatchSpec, Reply, SubmitTask};
        let mut s = with_gateway();
        apply(
            &mut s,
            0,
            Command::NodeHeartbeat {
                id: 1,
                region: "eu".into(),
                api_addr: "a".into(),
            },
        )
        .unwrap();
        apply(
            &mut s,
            0,
            Command::PlaceGateway {
                id: GatewayId("gw".into()),
                owner: Some(1),
            },
        )
        .unwrap();
        let agent = AgentRegistration {
            id: AgentId("a".into()),
            gateway: GatewayId("gw".into()),
            capacity: 2,
            role: "r".into(),
            ..Default::default()
        };
        apply(&mut s, 0, Command::RegisterAgent(agent)).unwrap();
        let online = Command::AgentOnline {
            agent: AgentId("a".into()),
            node: 1,
            release: vec![],
        };
        apply(&mut s, 0, online).unwrap();
        // An operator opened the session: created, not ready, no agent.
        apply(&mut s, 0, open(Some("k"), None)).unwrap();
        let submit = SubmitTask {
            tenant: "a".into(),
            payload: "{}".into(),
            session_key: Some(SessionKey("k".into())),
            ..Default::default()
        };
        apply(&mut s, 0, Command::Submit(submit)).unwrap();
        let dispatch = Command::Dispatch(DispatchSpec {
            lease_ms: 30_000,
            max: 10,
            policy: DispatchPolicy::LeastLoaded,
            node_dead_after_ms: 3_000,
            session_limit_ms: 0,
            session_idle_ms: 0,
        });
        let out = apply(&mut s, 1, dispatch.clone());
        assert_eq!(out, Ok(Reply::Dispatched(vec![])), "waits for the session");
        for to in [SessionState::Initializing, SessionState::Ready] {
            let mv = Command::MoveSession {
                id: 1,
                to,
                task: None,
                reason: None,
            };
            apply(&mut s, 2, mv).unwrap();
        }
        let Ok(Reply::Dispatched(grants)) = apply(&mut s, 3, dispatch) else {
            panic!()
        };
        assert_eq!(grants.len(), 1, "a ready session takes its key's task");
        let rec = s.sessions().get(1).unwrap();
        assert_eq!(
            (rec.state, rec.agent.clone()),
            (SessionState::Running, Some(AgentId("a".into())))
        );
    }

    #[test]
    fn session_lifecycle_table() {
        use SessionState::*;
        let path = [
            Created,
            Initializing,
            Ready,
            Running,
            Ready,
            Running,
            Completing,
            Completed,
        ];
        for w in path.windows(2) {
            assert!(w[0].can_become(w[1]), "{:?} -> {:?}", w[0], w[1]);
        }
        assert!(!Created.can_become(Running), "must initialize first");
        assert!(!Ready.can_become(Completed), "completes through completing");
        for end in [Failed, Cancelled, Timeout, Error] {
            assert!(Running.can_become(end));
            assert!(
                !end.can_become(Ready) && !end.can_become(Failed),
                "{end:?} is terminal"
            );
        }
        assert!(!Completed.can_become(Error));
    }
}
